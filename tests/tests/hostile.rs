//! Hostile input against real processes, through the gateway, on both backends: a generated
//! corpus of values with NUL and other control characters, long and non-ASCII text, put into
//! every kind of text input of auth and contacts; malformed and oversized request bodies sent as
//! raw HTTP/2. Nothing may come back INTERNAL or UNKNOWN, every refusal of a value names its
//! field in a `google.rpc.BadRequest`, and no error message echoes a whole input or names an
//! internal address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use crm_proto::auth::v1::{
    CreateDepartmentRequest, CreateRoleRequest, Department, IssueServiceTokenRequest, ListUsersRequest, Role,
    SignInRequest,
};
use crm_proto::contacts::v1::{
    CheckDuplicatesRequest, Company, CreateCompanyRequest, CreatePersonRequest, CustomValue, Email, GetPersonRequest,
    ListCompaniesRequest, ListPeopleRequest, Person, Phone, UpdatePersonRequest, custom_value,
};
use crm_tests::*;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use prost::Message;
use prost_types::FieldMask;
use tokio::sync::Mutex;
use tonic::Code;
use tonic_types::StatusExt;

/// Inputs per backend.
const CORPUS: usize = 10_000;
/// Sign-ins and service-token exchanges hash a password: a bounded share of the corpus.
const HASHING_EVERY: usize = 50;

/// A small deterministic generator (SplitMix64), so that a failure names an input that the next
/// run generates again.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One value: one to three pieces, at least one hostile in most values.
    fn value(&mut self) -> String {
        const PIECES: &[&str] = &[
            "\0",
            "a\0b",
            "\u{1}",
            "\u{8}",
            "\u{b}",
            "\u{1b}[31m",
            "\u{7f}",
            "\u{85}",
            "\u{9f}",
            "\t",
            "\r\n",
            "Анна Петрова",
            "李雷",
            "Müller",
            "😀",
            "e\u{301}",
            "\u{202e}evil",
            "\u{feff}",
            "' OR 1=1 --",
            "%",
            "_",
            "\\",
            "\"",
            "tags:",
            "stage = ",
            "(",
            ")",
            " ",
            "",
            "anna@example.com",
            "+7 913 000 00 00",
            "https://example.com/",
            "0190b8a2-0000-7000-8000-000000000001",
        ];
        let mut out = String::new();
        for _ in 0..=self.below(3) {
            match self.below(12) {
                0 => out.push_str(&"x".repeat(1 + self.below(6000))),
                1 => out.push_str(&"я".repeat(1 + self.below(3000))),
                2 => out.push(char::from_u32(self.below(0x20) as u32).unwrap_or('?')),
                _ => out.push_str(PIECES[self.below(PIECES.len())]),
            }
        }
        out
    }
}

#[derive(Default)]
struct Tally {
    calls: usize,
    by_code: BTreeMap<String, usize>,
    faults: Vec<String>,
}

impl Tally {
    fn record(&mut self, call: &str, input: &str, result: Result<(), tonic::Status>) {
        self.calls += 1;
        let status = match result {
            Ok(()) => {
                *self.by_code.entry("OK".into()).or_default() += 1;
                return;
            }
            Err(status) => status,
        };
        *self.by_code.entry(format!("{:?}", status.code())).or_default() += 1;
        let shown: String = input.chars().take(40).collect();
        let mut fault = |why: &str| {
            if self.faults.len() < 20 {
                self.faults.push(format!("{call} with {shown:?}…: {why}: {:?} {:?}", status.code(), status.message()));
            }
        };
        match status.code() {
            Code::Internal | Code::Unknown => fault("internal"),
            Code::InvalidArgument if status.get_details_bad_request().is_none() => fault("no BadRequest"),
            _ => {}
        }
        if status.message().len() > 2048 || status.details().len() > 4096 {
            fault("an oversized error");
        }
        if status.message().contains("127.0.0.1") {
            fault("an internal address");
        }
    }
}

/// Only whether a call succeeded.
fn ok<T>(result: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
    result.map(|_| ())
}

/// One input put into one call (which one is picked from `i`); `Err` is the status it met.
async fn one_call(
    addr: SocketAddr,
    token: &str,
    person_id: &str,
    i: usize,
    v: String,
) -> (String, Result<(), tonic::Status>) {
    let mut contacts = contacts_as(addr, token).await;
    let mut org = org_as(addr, token).await;
    let value = || CustomValue { kind: Some(custom_value::Kind::StringValue(v.clone())) };
    if i.is_multiple_of(HASHING_EVERY) {
        let mut auth = auth(addr).await;
        let (call, result) = if i.is_multiple_of(2 * HASHING_EVERY) {
            ("SignIn.email", ok(auth.sign_in(SignInRequest { email: v.clone(), password: "x".into() }).await))
        } else {
            let request = IssueServiceTokenRequest { client_id: v.clone(), client_secret: v.clone() };
            ("IssueServiceToken.client_id", ok(auth.issue_service_token(request).await))
        };
        return (call.to_string(), result);
    }
    let (call, result) = match i % 17 {
        0 => ("ListPeople.query", ok(contacts.list_people(ListPeopleRequest { query: v, ..Default::default() }).await)),
        1 => {
            ("ListPeople.filter", ok(contacts.list_people(ListPeopleRequest { filter: v, ..Default::default() }).await))
        }
        2 => {
            let filter = format!("tags:\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
            (
                "ListPeople.filter tags",
                ok(contacts.list_people(ListPeopleRequest { filter, ..Default::default() }).await),
            )
        }
        3 => (
            "ListPeople.order_by",
            ok(contacts.list_people(ListPeopleRequest { order_by: v, ..Default::default() }).await),
        ),
        4 => {
            let request = ListPeopleRequest { page_token: v, ..Default::default() };
            ("ListPeople.page_token", ok(contacts.list_people(request).await))
        }
        5 => (
            "ListCompanies.query",
            ok(contacts.list_companies(ListCompaniesRequest { query: v, ..Default::default() }).await),
        ),
        6 => {
            let person = Person { full_name: v.clone(), tags: vec![v.clone()], ..Default::default() };
            let request = CreatePersonRequest { person: Some(person), request_id: v };
            ("CreatePerson.full_name,tags,request_id", ok(contacts.create_person(request).await))
        }
        7 => {
            let person = Person {
                full_name: "Corpus Person".into(),
                emails: vec![Email { address: v.clone(), ..Default::default() }],
                phones: vec![Phone { number: v.clone(), ..Default::default() }],
                ..Default::default()
            };
            let request = CreatePersonRequest { person: Some(person), request_id: String::new() };
            ("CreatePerson.emails,phones", ok(contacts.create_person(request).await))
        }
        8 => {
            let mut person = Person { full_name: "Corpus Custom".into(), ..Default::default() };
            person.custom_fields.insert(v.chars().take(64).collect(), value());
            let request = CreatePersonRequest { person: Some(person), request_id: String::new() };
            ("CreatePerson.custom_fields", ok(contacts.create_person(request).await))
        }
        9 => {
            let company = Company { name: v.clone(), website: v, ..Default::default() };
            (
                "CreateCompany.name,website",
                ok(contacts
                    .create_company(CreateCompanyRequest { company: Some(company), request_id: String::new() })
                    .await),
            )
        }
        10 => {
            let person = Person { id: person_id.to_string(), region: v, ..Default::default() };
            let update_mask = Some(FieldMask { paths: vec!["region".into()] });
            (
                "UpdatePerson.region",
                ok(contacts.update_person(UpdatePersonRequest { person: Some(person), update_mask }).await),
            )
        }
        11 => ("GetPerson.id", ok(contacts.get_person(GetPersonRequest { id: v }).await)),
        12 => {
            let request = CheckDuplicatesRequest {
                phones: vec![v.clone()],
                emails: vec![v.clone()],
                company_name: v,
                ..Default::default()
            };
            ("CheckDuplicates", ok(contacts.check_duplicates(request).await))
        }
        13 => ("ListUsers.filter", ok(org.list_users(ListUsersRequest { filter: v, ..Default::default() }).await)),
        14 => {
            let department = Department { name: v, ..Default::default() };
            (
                "CreateDepartment.name",
                ok(org.create_department(CreateDepartmentRequest { department: Some(department) }).await),
            )
        }
        15 => {
            let role = Role { name: v, permissions: vec!["contacts.read".into()], ..Default::default() };
            ("CreateRole.name", ok(org.create_role(CreateRoleRequest { role: Some(role) }).await))
        }
        _ => {
            ("ListUsers.page_token", ok(org.list_users(ListUsersRequest { page_token: v, ..Default::default() }).await))
        }
    };
    (call.to_string(), result)
}

/// Runs the corpus (seeded per backend) with 16 calls in flight.
async fn corpus(addr: SocketAddr, seed: u64) -> Tally {
    let token = admin_token(addr).await;
    let mut c = contacts_as(addr, &token).await;
    let person = Person { full_name: "Corpus Anchor".into(), ..Default::default() };
    let anchor = c.create_person(CreatePersonRequest { person: Some(person), request_id: String::new() }).await;
    let anchor = anchor.expect("create the record the corpus updates").into_inner().id;
    let mut generator = Gen(seed);
    let inputs: Vec<(usize, String)> = (0..CORPUS).map(|i| (i, generator.value())).collect();
    let tally = Arc::new(Mutex::new(Tally::default()));
    futures_util::stream::iter(inputs)
        .for_each_concurrent(16, |(i, v)| {
            let (tally, token, anchor) = (tally.clone(), token.clone(), anchor.clone());
            async move {
                let shown = v.clone();
                let (call, result) = one_call(addr, &token, &anchor, i, v).await;
                tally.lock().await.record(&call, &shown, result);
            }
        })
        .await;
    Arc::try_unwrap(tally).ok().expect("every call is done").into_inner()
}

fn assert_clean(backend: &str, tally: &Tally) {
    eprintln!("{backend}: {} calls, by code: {:?}", tally.calls, tally.by_code);
    assert_eq!(tally.calls, CORPUS);
    assert!(tally.faults.is_empty(), "{backend}: {} faults, e.g.:\n{}", tally.faults.len(), tally.faults.join("\n"));
    // The corpus did reach the checks: many refusals, and some values were fine.
    assert!(tally.by_code.get("InvalidArgument").copied().unwrap_or(0) > CORPUS / 4, "{:?}", tally.by_code);
    assert!(tally.by_code.get("OK").copied().unwrap_or(0) > CORPUS / 20, "{:?}", tally.by_code);
}

/// A raw HTTP/2 call: `chunks` as the request body, then the body ends, or (`hold`) stays
/// open. Returns the gRPC status and message, from the headers, the trailers or (gRPC-Web)
/// the trailer frame in the body; panics when no answer comes within 20 s.
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    token: &str,
    chunks: Vec<Bytes>,
    hold: bool,
) -> (i32, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let frames = futures_util::stream::iter(
        chunks.into_iter().map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))),
    );
    let body: http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible> = if hold {
        BodyExt::boxed(http_body_util::StreamBody::new(frames.chain(futures_util::stream::pending())))
    } else {
        BodyExt::boxed(http_body_util::StreamBody::new(frames))
    };
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(body)
        .unwrap();
    let answer = async {
        let response = sender.send_request(request).await.expect("a response");
        let headers = response.headers().clone();
        let status_of = |h: &http::HeaderMap| {
            h.get("grpc-status").map(|s| {
                let message = h.get("grpc-message").map(|m| m.to_str().unwrap_or("").to_string()).unwrap_or_default();
                (s.to_str().unwrap().parse::<i32>().unwrap(), message)
            })
        };
        if let Some(found) = status_of(&headers) {
            return found;
        }
        let collected = response.into_body().collect().await.expect("the response body");
        if let Some(found) = collected.trailers().and_then(status_of) {
            return found;
        }
        // gRPC-Web: the trailers travel in the body, in a frame flagged 0x80.
        let mut bytes = collected.to_bytes().to_vec();
        if content_type.contains("text") {
            bytes = STANDARD.decode(&bytes).expect("a base64 answer");
        }
        let mut at = 0;
        while at + 5 <= bytes.len() {
            let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]) as usize;
            if bytes[at] & 0x80 != 0 {
                let text = String::from_utf8_lossy(&bytes[at + 5..at + 5 + len]).to_string();
                let field = |name: &str| {
                    text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
                };
                return (field("grpc-status:").parse().unwrap(), field("grpc-message:"));
            }
            at += 5 + len;
        }
        panic!("no gRPC status in the answer to {path}");
    };
    tokio::time::timeout(Duration::from_secs(20), answer).await.expect("an answer without waiting for the body")
}

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend((message.len() as u32).to_be_bytes());
    out.extend(message);
    out
}

/// Bodies that are not valid gRPC, sent to the gateway and straight to a replica.
async fn malformed_bodies(addrs: &[(&str, SocketAddr)], token: &str) {
    let get = "/crm.contacts.v1.ContactsService/GetPerson";
    let good = GetPersonRequest { id: "0190b8a2-0000-7000-8000-000000000001".into() }.encode_to_vec();
    let grpc = "application/grpc";
    for &(place, addr) in addrs {
        let cases: Vec<(&str, &str, Vec<Bytes>, bool, Code)> = vec![
            ("not protobuf", grpc, vec![framed(0, &[0x0a, 0x40, b'x']).into()], false, Code::InvalidArgument),
            ("an unknown wire type", grpc, vec![framed(0, &[0x0f, 0x01]).into()], false, Code::InvalidArgument),
            (
                "a NUL in a field",
                grpc,
                vec![framed(0, &GetPersonRequest { id: "a\0".into() }.encode_to_vec()).into()],
                false,
                Code::InvalidArgument,
            ),
            (
                "a body that stops inside a frame",
                grpc,
                vec![framed(0, &good)[..7].to_vec().into()],
                false,
                Code::InvalidArgument,
            ),
            ("a compressed flag", grpc, vec![framed(1, &good).into()], false, Code::Unimplemented),
            ("an unknown flag", grpc, vec![framed(9, &good).into()], false, Code::InvalidArgument),
            (
                "a 100 MB message announced",
                grpc,
                vec![[&[0u8][..], &(100u32 << 20).to_be_bytes()[..], &[0u8; 1024][..]].concat().into()],
                true,
                Code::ResourceExhausted,
            ),
            (
                "gRPC-Web text that is not base64",
                "application/grpc-web-text",
                vec![Bytes::from_static(b"!!!not base64!!!")],
                false,
                Code::InvalidArgument,
            ),
            (
                "gRPC-Web with bad framing",
                "application/grpc-web",
                vec![framed(0, &good)[..6].to_vec().into()],
                false,
                Code::InvalidArgument,
            ),
        ];
        for (what, content_type, chunks, hold, expected) in cases {
            let (code, message) = raw_call(addr, get, content_type, token, chunks, hold).await;
            assert_eq!(Code::from_i32(code), expected, "{what} at {place}: {message}");
            assert!(!message.contains("127.0.0.1"), "{what} at {place} names an address: {message}");
        }
        // The connection-level answer aside, a good call still works there.
        let (code, message) = raw_call(addr, get, grpc, token, vec![framed(0, &good).into()], false).await;
        assert_eq!(Code::from_i32(code), Code::NotFound, "a good call at {place}: {message}");
    }
}

/// Slow clients cannot hold a call open: a body that stops inside a message, or never ends
/// after one, is cut off after `--request-read-timeout` (2 s here) — at the gateway for its own
/// services and for what it forwards. Every server advertises a stream limit.
async fn slow_bodies(addrs: &[(&str, SocketAddr)], token: &str) {
    let health = "/grpc.health.v1.Health/Check";
    let get = "/crm.contacts.v1.ContactsService/GetPerson";
    let whole = framed(0, &GetPersonRequest { id: "0190b8a2-0000-7000-8000-000000000001".into() }.encode_to_vec());
    for &(place, addr) in addrs {
        for (what, path, chunks) in [
            ("a health check that never ends", health, vec![Bytes::from(framed(0, &[]))]),
            ("a message that stops half-way", get, vec![Bytes::copy_from_slice(&whole[..8])]),
            ("a call whose body never ends", get, vec![Bytes::from(whole.clone())]),
        ] {
            let started = std::time::Instant::now();
            let (code, message) = raw_call(addr, path, "application/grpc", token, chunks, true).await;
            assert_eq!(Code::from_i32(code), Code::DeadlineExceeded, "{what} at {place}: {message}");
            assert!(started.elapsed() < Duration::from_secs(15), "{what} at {place} was held too long");
        }
        assert_eq!(max_concurrent_streams(addr).await, Some(256), "at {place}");
        // A connection that never says anything is closed.
        use tokio::io::AsyncReadExt;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent connection at {place} stays open: {read:?}");
    }
}

/// The `SETTINGS_MAX_CONCURRENT_STREAMS` a server advertises in its first SETTINGS frame.
async fn max_concurrent_streams(addr: SocketAddr) -> Option<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // an empty SETTINGS frame
    loop {
        let mut header = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header)).await.ok()?.ok()?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.ok()?;
        // SETTINGS, not an acknowledgement: six bytes per setting.
        if header[3] == 4 && header[4] & 1 == 0 {
            return payload
                .chunks(6)
                .find(|c| c.len() == 6 && u16::from_be_bytes([c[0], c[1]]) == 3)
                .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]));
        }
    }
}

/// An error quotes a short prefix of what it refuses.
async fn bounded_errors(addr: SocketAddr, token: &str) {
    let mut c = contacts_as(addr, token).await;
    for long in ["o".repeat(4000), format!("full_name {}", "d".repeat(4000)), "я".repeat(100_000)] {
        let request = ListPeopleRequest { order_by: long.clone(), ..Default::default() };
        let err = c.list_people(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().len() < 300, "{} bytes: {}", err.message().len(), err.message());
        assert!(err.details().len() < 1024);
        let err =
            c.list_people(ListPeopleRequest { filter: format!("{long} = 1"), ..Default::default() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().len() < 300, "{} bytes: {}", err.message().len(), err.message());
    }
}

/// A process's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS").trim().trim_end_matches(" kB");
    kb.trim().parse::<u64>().expect("a number of kB") * 1024
}

/// Sixteen callers signing in with unknown e-mails for `secs` seconds, straight at auth (`pid`
/// at `addr`): every answer is UNAUTHENTICATED (or RESOURCE_EXHAUSTED when the queue is full),
/// and auth's memory stays bounded. Returns the peak resident memory.
async fn sign_in_flood(addr: SocketAddr, pid: u32, secs: u64) -> u64 {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let codes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let callers: Vec<_> = (0..16)
        .map(|n| {
            let codes = codes.clone();
            tokio::spawn(async move {
                let mut client = auth(addr).await;
                let mut i = 0;
                while std::time::Instant::now() < until {
                    i += 1;
                    let request =
                        SignInRequest { email: format!("nobody-{n}-{i}@example.com"), password: "guess-guess".into() };
                    let code =
                        client.sign_in(request).await.map_or_else(|s| format!("{:?}", s.code()), |_| "OK".into());
                    *codes.lock().await.entry(code).or_default() += 1;
                }
            })
        })
        .collect();
    let mut peak = rss_bytes(pid);
    while std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(rss_bytes(pid));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    peak = peak.max(rss_bytes(pid));
    let codes = codes.lock().await.clone();
    eprintln!("sign-in flood: {codes:?}, auth's peak RSS {} MiB", peak >> 20);
    assert!(codes.keys().all(|c| c == "Unauthenticated" || c == "ResourceExhausted"), "{codes:?}");
    assert!(codes.get("Unauthenticated").copied().unwrap_or(0) > 16, "{codes:?}");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_hostile_input_on_postgresql() {
    let slow = || ["--request-read-timeout", "2s"].map(String::from).to_vec();
    let flags = vec![("gateway", slow()), ("contacts", slow()), ("auth", slow())];
    let mut cluster = Cluster::start(ClusterConfig { flags, ..ClusterConfig::default() }).await;
    let (auth_addr, auth_pid) = (cluster.replica("auth", 0), cluster.process("auth", 0).pid());
    let peak = sign_in_flood(auth_addr, auth_pid, 6).await;
    assert!(peak < 150 << 20, "auth's memory through a sign-in flood: {} MiB", peak >> 20);
    let token = admin_token(cluster.gateway).await;
    malformed_bodies(
        &[("the gateway", cluster.gateway), ("a contacts replica", cluster.replica("contacts", 0))],
        &token,
    )
    .await;
    slow_bodies(&[("the gateway", cluster.gateway), ("a contacts replica", cluster.replica("contacts", 0))], &token)
        .await;
    bounded_errors(cluster.gateway, &token).await;
    let tally = corpus(cluster.gateway, 0x5eed_0001).await;
    assert_clean("PostgreSQL", &tally);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_refuses_hostile_input_on_sqlite() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let env = [("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD), ("CRM_REQUEST_READ_TIMEOUT", "2s")];
    let _dev = start_dev("dev", &data.path().join("crm-data"), addr, &env).await;
    let token = admin_token(addr).await;
    malformed_bodies(&[("crm dev", addr)], &token).await;
    slow_bodies(&[("crm dev", addr)], &token).await;
    bounded_errors(addr, &token).await;
    let tally = corpus(addr, 0x5eed_0002).await;
    assert_clean("SQLite", &tally);
}

/// Calls GetMe through `gateway` as `token` from `callers` tasks until `until`; counts the
/// answers by code. Nothing but OK and RESOURCE_EXHAUSTED (with its retry info) may come back.
async fn get_me_flood(
    gateway: SocketAddr,
    token: &str,
    callers: usize,
    until: std::time::Instant,
) -> BTreeMap<String, usize> {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let token = token.to_string();
            tokio::spawn(async move {
                let mut client = auth_as(gateway, &token).await;
                let mut codes = BTreeMap::<String, usize>::new();
                while std::time::Instant::now() < until {
                    let code = match client.get_me(crm_proto::auth::v1::GetMeRequest {}).await {
                        Ok(_) => "Ok".to_string(),
                        Err(status) => {
                            if status.code() == Code::ResourceExhausted {
                                let retry = status.get_details_retry_info().expect("retry info");
                                assert!(retry.retry_delay.is_some_and(|d| d <= Duration::from_secs(1)), "{retry:?}");
                            }
                            format!("{:?}", status.code())
                        }
                    };
                    *codes.entry(code).or_default() += 1;
                }
                codes
            })
        })
        .collect();
    let mut codes = BTreeMap::new();
    for task in tasks {
        for (code, n) in task.await.unwrap() {
            *codes.entry(code).or_default() += n;
        }
    }
    assert!(codes.keys().all(|c| c == "Ok" || c == "ResourceExhausted"), "{codes:?}");
    codes
}

/// The value of a counter on a process's `/metrics` (summed over its labels).
async fn counter(addr: SocketAddr, name: &str) -> f64 {
    let (_, metrics) = http_get(addr, "/metrics").await;
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Per-user rate limits shared by two gateway replicas through one Redis (G2): a user calling
/// both as fast as they can gets one limit between them, not one per replica; with Redis gone,
/// each replica applies the limit alone (calls go on, never all refused) and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_hold_across_gateway_replicas() {
    let mut redis = RedisServer::start().await;
    let (rate, burst) = (20.0, 20.0);
    let config = ClusterConfig {
        replicas: vec![("gateway", 2)],
        env: vec![
            // The gateways' own Redis, so that it can be stopped.
            ("gateway", "CRM_REDIS_URL", redis.url()),
            ("gateway", "CRM_GATEWAY_RATE_LIMIT_USER", format!("{rate}/s:{burst}")),
        ],
        ..ClusterConfig::default()
    };
    let cluster = Cluster::start(config).await;
    let (a, b) = (cluster.replica("gateway", 0), cluster.replica("gateway", 1));
    let admin = admin_token(a).await;

    let started = std::time::Instant::now();
    let until = started + Duration::from_secs(3);
    let (on_a, on_b) = tokio::join!(get_me_flood(a, &admin, 4, until), get_me_flood(b, &admin, 4, until));
    let elapsed = started.elapsed().as_secs_f64();
    let ok = on_a.get("Ok").copied().unwrap_or(0) + on_b.get("Ok").copied().unwrap_or(0);
    let refused =
        on_a.get("ResourceExhausted").copied().unwrap_or(0) + on_b.get("ResourceExhausted").copied().unwrap_or(0);
    let most = burst + rate * elapsed;
    eprintln!(
        "shared limit: {ok} allowed, {refused} refused in {elapsed:.2}s (at most {most:.0}; a: {on_a:?}, b: {on_b:?})"
    );
    // One limit between both (one per replica would allow about twice as many), within 10%.
    assert!(ok as f64 <= most * 1.1, "{ok} allowed, at most {most:.0}");
    assert!(ok as f64 >= burst, "at least the burst: {ok}");
    assert!(refused > 0 && on_a.contains_key("Ok") && on_b.contains_key("Ok"), "{on_a:?} {on_b:?}");
    assert!(counter(a, "crm_gateway_rate_limited_total").await > 0.0);

    // Redis gone: each replica decides alone, and says so.
    redis.process.kill();
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let (on_a, on_b) = tokio::join!(get_me_flood(a, &admin, 2, until), get_me_flood(b, &admin, 2, until));
    eprintln!("Redis gone: a: {on_a:?}, b: {on_b:?}");
    assert!(on_a.contains_key("Ok") && on_b.contains_key("Ok"), "fail open: {on_a:?} {on_b:?}");
    for gateway in [a, b] {
        assert!(counter(gateway, "crm_gateway_rate_limit_fallback_total").await > 0.0, "counted at {gateway}");
    }
}
