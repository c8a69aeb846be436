//! The gateway in front of in-process contacts replicas (a small test implementation of the
//! real `ContactsService`): routing, balancing, failover, status and metadata passthrough,
//! edge policy, ops endpoints and gRPC-Web.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_gateway::{EdgePolicy, Gateway, Upstream};
use crm_kit::balance::Intervals;
use crm_kit::peer::{Callee, Peers};
use crm_kit::server::Server;
use crm_kit::shutdown::{Shutdown, Trigger};
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::contacts::v1::contacts_service_server::{ContactsService, ContactsServiceServer};
use crm_proto::contacts::v1::*;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CONTACTS_SERVICE: &str = "crm.contacts.v1.ContactsService";

/// A replica that answers GetPerson with its own name, sits in ListPeople until released,
/// and implements nothing else.
struct TestContacts {
    name: String,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this test replica"))
}

#[tonic::async_trait]
impl ContactsService for TestContacts {
    async fn create_company(&self, _: Request<CreateCompanyRequest>) -> Result<Response<Company>, Status> {
        unimplemented()
    }
    async fn get_company(&self, _: Request<GetCompanyRequest>) -> Result<Response<Company>, Status> {
        unimplemented()
    }
    async fn update_company(&self, _: Request<UpdateCompanyRequest>) -> Result<Response<Company>, Status> {
        unimplemented()
    }
    async fn delete_company(&self, _: Request<DeleteCompanyRequest>) -> Result<Response<()>, Status> {
        unimplemented()
    }
    async fn list_companies(
        &self,
        _: Request<ListCompaniesRequest>,
    ) -> Result<Response<ListCompaniesResponse>, Status> {
        unimplemented()
    }
    async fn create_person(&self, _: Request<CreatePersonRequest>) -> Result<Response<Person>, Status> {
        // Not an idempotent read: never retried by the gateway.
        if self.name == "replica-0" {
            return Err(Status::unavailable("replica-0 is going away"));
        }
        Ok(Response::new(Person { full_name: self.name.clone(), ..Default::default() }))
    }
    async fn get_person(&self, request: Request<GetPersonRequest>) -> Result<Response<Person>, Status> {
        let metadata = request.metadata();
        let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        let notes = format!(
            "authorization={} x-request-id={} grpc-timeout={}",
            header("authorization"),
            header("x-request-id"),
            if metadata.contains_key("grpc-timeout") { "set" } else { "-" },
        );
        // A TCP peer never has port 0: a call from this process does (see `in_process`).
        let from_this_process = request.remote_addr().is_some_and(|peer| peer.port() == 0);
        let id = request.into_inner().id;
        if id == "from-where" {
            let place = if from_this_process { "this process" } else { "the network" };
            return Ok(Response::new(Person {
                id,
                full_name: self.name.clone(),
                notes: place.into(),
                ..Default::default()
            }));
        }
        if id == "flaky" && self.name == "replica-0" {
            return Err(Status::unavailable("replica-0 is going away"));
        }
        if id == "missing" {
            return Err(Status::not_found(format!("no person {id} at {} — sorry", self.name)));
        }
        Ok(Response::new(Person { id, full_name: self.name.clone(), notes, ..Default::default() }))
    }
    async fn update_person(&self, _: Request<UpdatePersonRequest>) -> Result<Response<Person>, Status> {
        unimplemented()
    }
    async fn delete_person(&self, _: Request<DeletePersonRequest>) -> Result<Response<()>, Status> {
        unimplemented()
    }
    async fn list_people(&self, _: Request<ListPeopleRequest>) -> Result<Response<ListPeopleResponse>, Status> {
        self.entered.notify_one();
        self.release.notified().await;
        Ok(Response::new(ListPeopleResponse::default()))
    }
    async fn batch_get_customers(
        &self,
        _: Request<BatchGetCustomersRequest>,
    ) -> Result<Response<BatchGetCustomersResponse>, Status> {
        unimplemented()
    }
    async fn check_duplicates(
        &self,
        _: Request<CheckDuplicatesRequest>,
    ) -> Result<Response<CheckDuplicatesResponse>, Status> {
        unimplemented()
    }
    async fn list_revisions(
        &self,
        _: Request<ListRevisionsRequest>,
    ) -> Result<Response<ListRevisionsResponse>, Status> {
        unimplemented()
    }
}

struct Replica {
    addr: SocketAddr,
    entered: Arc<Notify>,
    release: Arc<Notify>,
    trigger: Trigger,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Replica {
    async fn start(name: &str) -> Replica {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Replica::serve(name, listener)
    }

    fn serve(name: &str, listener: TcpListener) -> Replica {
        Replica::serve_with(name, listener, false)
    }

    /// A replica whose stack this process's callers call without the network when
    /// `in_process` (as `crm serve` sets up its servers).
    fn serve_with(name: &str, listener: TcpListener, in_process: bool) -> Replica {
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = crm_kit::shutdown::channel();
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let service = TestContacts { name: name.to_string(), entered: entered.clone(), release: release.clone() };
        let settings = crm_kit::server::ServerSettings { in_process, ..Default::default() };
        let server = Server::new("test").settings(settings).add_service(ContactsServiceServer::new(service));
        let task = tokio::spawn(server.serve(listener, shutdown));
        Replica { addr, entered, release, trigger, task }
    }

    /// Stops the replica gracefully and waits until it is gone.
    async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the replica drains within 10s")
            .unwrap()
            .unwrap();
    }
}

struct TestGateway {
    addr: SocketAddr,
    _trigger: Trigger,
}

/// A gateway in front of contacts replicas at `addrs`, its replica pool kept current as a
/// process's pools are: re-resolved every 200 ms, health-checked every 100 ms.
async fn gateway(addrs: Vec<String>, policy: EdgePolicy) -> TestGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown): (Trigger, Shutdown) = crm_kit::shutdown::channel();
    let intervals = Intervals { health: Duration::from_millis(100), discovery: Duration::from_millis(200) };
    let callee = Callee { role: "contacts", service: CONTACTS_SERVICE, addrs };
    let peers = Peers::new([callee], intervals, Duration::from_secs(60), None, shutdown.clone());
    let pool = peers.peer("contacts").unwrap().pool().clone();
    let upstream = Upstream { packages: &["crm.contacts.v1"], services: &[CONTACTS_SERVICE], pool };
    tokio::spawn(Gateway::new(vec![upstream], policy).serve(listener, shutdown));
    TestGateway { addr, _trigger: trigger }
}

fn fast_settings() -> EdgePolicy {
    EdgePolicy::default()
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap()
}

async fn health(channel: &Channel, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(channel.clone());
    let response = client.check(HealthCheckRequest { service: service.to_string() }).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Waits (at most 10s) until the gateway reports `service` as `status`.
async fn wait_for_health(channel: &Channel, service: &str, status: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(channel, service).await != Some(status) {
        assert!(Instant::now() < deadline, "{service} did not become {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_person(client: &mut ContactsServiceClient<Channel>, id: &str) -> Result<Person, Status> {
    client.get_person(GetPersonRequest { id: id.into() }).await.map(Response::into_inner)
}

/// Checks that a call's metadata reaches the replica as sent (the replica writes what it got
/// into the person's notes) and returns the NOT_FOUND of a missing person, for its message.
async fn passes_metadata_and_status(client: &mut ContactsServiceClient<Channel>) -> Status {
    let mut request = Request::new(GetPersonRequest { id: "p".into() });
    request.metadata_mut().insert("authorization", "Bearer secret-token".parse().unwrap());
    request.metadata_mut().insert("x-request-id", "req-42".parse().unwrap());
    request.set_timeout(Duration::from_secs(5));
    let person = client.get_person(request).await.unwrap().into_inner();
    assert_eq!(person.notes, "authorization=Bearer secret-token x-request-id=req-42 grpc-timeout=set");
    let missing = get_person(client, "missing").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    missing
}

/// A raw HTTP/1.1 exchange (the connection is closed after it): status, headers, body.
async fn http1(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.expect("response").unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = String::from_utf8_lossy(&raw[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("chunk size");
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// gRPC-Web frames of a response body: (flag, payload).
fn grpc_web_frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        frames.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_balances_and_fails_over() {
    let replicas = [Replica::start("replica-0").await, Replica::start("replica-1").await];
    let gw = gateway(replicas.iter().map(|r| r.addr.to_string()).collect(), fast_settings()).await;
    let channel = channel(gw.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    wait_for_health(&channel, "", ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(channel.clone());

    // Calls reach the replicas, spread over both.
    let mut served: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        let person = get_person(&mut client, &format!("p{i}")).await.expect("a call through the gateway");
        assert_eq!(person.id, format!("p{i}"));
        *served.entry(person.full_name).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "both replicas served calls: {served:?}");

    // Metadata goes through as sent, status and message come back unchanged.
    let missing = passes_metadata_and_status(&mut client).await;
    assert!(missing.message().starts_with("no person missing at replica-") && missing.message().ends_with("— sorry"));
    let unimplemented = client.get_company(GetCompanyRequest::default()).await.unwrap_err();
    assert_eq!((unimplemented.code(), unimplemented.message()), (Code::Unimplemented, "not in this test replica"));

    // Unknown methods: of a routed package (the replica answers), of an unknown package (the gateway does).
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    for (path, needle) in [
        ("/crm.contacts.v1.ContactsService/NoSuchMethod", ""),
        ("/crm.nothing.v1.NothingService/Call", "unknown service 'crm.nothing.v1.NothingService'"),
    ] {
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<GetPersonRequest, Person>::default();
        let status =
            grpc.unary(Request::new(GetPersonRequest::default()), path.parse().unwrap(), codec).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
        assert!(status.message().contains(needle), "{path}: {status:?}");
    }

    // Ops endpoints over HTTP/1.1.
    let (status, _, body) = http1(gw.addr, "GET /healthz HTTP/1.1", b"").await;
    assert_eq!((status, String::from_utf8_lossy(&body).trim()), (200, "ok"));
    let (status, _, body) = http1(gw.addr, "GET /readyz HTTP/1.1", b"").await;
    assert_eq!((status, String::from_utf8_lossy(&body).trim()), (200, "ready"));
    let (status, _, body) = http1(gw.addr, "GET /metrics HTTP/1.1", b"").await;
    let metrics = String::from_utf8_lossy(&body);
    assert_eq!(status, 200);
    for replica in &replicas {
        let line =
            format!("crm_gateway_upstream_up{{upstream=\"{CONTACTS_SERVICE}\",endpoint=\"{}\"}} 1", replica.addr);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let (status, _, _) = http1(gw.addr, "GET /no/such/page HTTP/1.1", b"").await;
    assert_eq!(status, 404);

    // gRPC-Web over HTTP/1.1.
    let message = GetPersonRequest { id: "web".into() }.encode_to_vec();
    let mut frame = vec![0_u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let head = "POST /crm.contacts.v1.ContactsService/GetPerson HTTP/1.1\r\n\
                Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nAccept: application/grpc-web+proto";
    let (status, headers, body) = http1(gw.addr, head, &frame).await;
    assert_eq!(status, 200, "{headers:?}");
    assert!(headers["content-type"].starts_with("application/grpc-web"), "{headers:?}");
    let frames = grpc_web_frames(&body);
    let (flag, data) = frames.first().expect("a message frame");
    assert_eq!(*flag, 0);
    let person = Person::decode(data.as_slice()).unwrap();
    assert_eq!(person.id, "web");
    assert!(person.full_name.starts_with("replica-"));
    let (flag, trailers) = frames.last().unwrap();
    assert_eq!(*flag, 0x80, "a trailer frame ends the body");
    let trailers = String::from_utf8_lossy(trailers).to_ascii_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    // One replica stops: after a short settle time every call succeeds, on the other one.
    let [first, second] = replicas;
    let survivor = first.addr;
    second.stop().await;
    let settle = Instant::now() + Duration::from_secs(3);
    loop {
        let ok = get_person(&mut client, "x").await.is_ok_and(|p| p.full_name == "replica-0");
        if ok || Instant::now() >= settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..50 {
        let person = get_person(&mut client, "after").await.expect("served by the remaining replica");
        assert_eq!(person.full_name, "replica-0");
    }
    let (status, _, _) = http1(gw.addr, "GET /readyz HTTP/1.1", b"").await;
    assert_eq!(status, 200);
    assert_eq!(health(&channel, CONTACTS_SERVICE).await, Some(ServingStatus::Serving));

    // The last one stops: calls fail with UNAVAILABLE naming the upstream, and the gateway
    // reports the service (and itself) not ready.
    first.stop().await;
    let status = get_person(&mut client, "none").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(CONTACTS_SERVICE), "{status:?}");
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::NotServing).await;
    wait_for_health(&channel, "", ServingStatus::NotServing).await;
    let (status, _, body) = http1(gw.addr, "GET /readyz HTTP/1.1", b"").await;
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains(CONTACTS_SERVICE), "{}", String::from_utf8_lossy(&body));
    let metrics = String::from_utf8_lossy(&http1(gw.addr, "GET /metrics HTTP/1.1", b"").await.2).to_string();
    let line = format!("crm_gateway_upstream_up{{upstream=\"{CONTACTS_SERVICE}\",endpoint=\"{survivor}\"}} 0");
    assert!(metrics.contains(&line), "{line} in\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheds_load_and_enforces_the_deadline() {
    let replica = Replica::start("slow").await;
    let settings = EdgePolicy { max_concurrency: 1, request_timeout: Duration::from_secs(1), ..EdgePolicy::default() };
    let gw = gateway(vec![replica.addr.to_string()], settings).await;
    let channel = channel(gw.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(channel.clone());

    // A call that waits in the replica holds the only slot...
    let mut slow_client = client.clone();
    let slow = tokio::spawn(async move { slow_client.list_people(ListPeopleRequest::default()).await });
    tokio::time::timeout(Duration::from_secs(10), replica.entered.notified()).await.expect("the slow call arrives");
    // ...so another is refused at once...
    let refused = get_person(&mut client, "p").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // ...and the slow one ends at the gateway's deadline, as no response headers came.
    let status = slow.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The slot is free again.
    assert_eq!(get_person(&mut client, "p").await.unwrap().full_name, "slow");

    replica.release.notify_waiters();
}

/// The answer of a replica pool to a raw ListPeople call (which waits in the test replica)
/// with `grpc-timeout: 100m`: gRPC status and message.
async fn list_people_timing_out(pool: &crm_kit::balance::Pool) -> (String, String) {
    let message = ListPeopleRequest { page_size: 10, ..Default::default() }.encode_to_vec();
    let mut frame = vec![0];
    frame.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend(message);
    let request = http::Request::builder()
        .method("POST")
        .uri("/crm.contacts.v1.ContactsService/ListPeople")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "100m")
        .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame))))
        .unwrap();
    let response = pool.send(request).await.unwrap();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    (header("grpc-status"), header("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_in_this_process_is_called_without_the_network() {
    let near = Replica::serve_with("near", TcpListener::bind("127.0.0.1:0").await.unwrap(), true);
    let far = Replica::start("far").await;
    let gw = gateway(vec![near.addr.to_string()], fast_settings()).await;
    let channel = channel(gw.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(channel.clone());
    // Through the gateway, from this process: the replica's whole stack took the call, headers
    // passed on as over the wire.
    assert_eq!(get_person(&mut client, "from-where").await.unwrap().notes, "this process");
    let missing = passes_metadata_and_status(&mut client).await;
    assert_eq!(missing.message(), "no person missing at near — sorry");
    // Straight to its port, from outside: the network, as ever.
    let mut direct = ContactsServiceClient::new(self::channel(near.addr).await);
    assert_eq!(get_person(&mut direct, "from-where").await.unwrap().notes, "the network");

    // The caller's grpc-timeout is enforced as the replica's server enforces it off the wire.
    let (_trigger, shutdown) = crm_kit::shutdown::channel();
    let peers = |addr: SocketAddr| {
        let callee = Callee { role: "contacts", service: CONTACTS_SERVICE, addrs: vec![addr.to_string()] };
        Peers::new([callee], Intervals::default(), Duration::from_secs(60), None, shutdown.clone())
    };
    let (near_peers, far_peers) = (peers(near.addr), peers(far.addr));
    let in_process = list_people_timing_out(near_peers.peer("contacts").unwrap().pool()).await;
    let networked = list_people_timing_out(far_peers.peer("contacts").unwrap().pool()).await;
    assert_eq!(in_process, networked);
    // CANCELLED, percent-encoded as on the wire.
    assert_eq!(in_process, ("1".to_string(), "Timeout%20expired".to_string()));

    // Once the replica stops, nothing reaches its stack: the call finds no replica.
    near.stop().await;
    let gone = get_person(&mut client, "p").await.unwrap_err();
    assert_eq!(gone.code(), Code::Unavailable, "{gone:?}");
    far.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_comes_up_later_takes_calls() {
    // The port is taken but nothing answers on it yet: connections hang, health checks fail.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = gateway(vec![format!("localhost:{}", addr.port())], fast_settings()).await;
    let channel = channel(gw.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::NotServing).await;
    let (status, _, body) = http1(gw.addr, "GET /readyz HTTP/1.1", b"").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));

    let replica = Replica::serve("late", listener);
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(channel);
    assert_eq!(get_person(&mut client, "p").await.unwrap().full_name, "late");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_resource_exhausted() {
    let replica = Replica::start("replica").await;
    let gw = gateway(vec![replica.addr.to_string()], fast_settings()).await;
    let through = channel(gw.addr).await;
    wait_for_health(&through, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let huge = "x".repeat(crm_kit::limit::MAX_MESSAGE_BYTES + 1);
    for (place, channel) in [("the replica", channel(replica.addr).await), ("the gateway", through)] {
        let mut client = ContactsServiceClient::new(channel);
        let refused = get_person(&mut client, &huge).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "at {place}: {refused:?}");
        assert!(refused.message().contains("limit"), "at {place}: {}", refused.message());
        // The connection stays usable.
        assert_eq!(get_person(&mut client, "p").await.unwrap().full_name, "replica", "at {place}");
    }
    // A smaller limit for one method, at the gateway: others keep the default.
    let sizes = crm_kit::limit::SizeLimits::new(crm_kit::limit::MAX_MESSAGE_BYTES)
        .route("/crm.contacts.v1.ContactsService/GetPerson", 64);
    let small = gateway(vec![replica.addr.to_string()], EdgePolicy { sizes, ..EdgePolicy::default() }).await;
    let through = channel(small.addr).await;
    wait_for_health(&through, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(through);
    let refused = get_person(&mut client, &"x".repeat(100)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(get_person(&mut client, "p").await.unwrap().full_name, "replica");
    let created = client.create_person(CreatePersonRequest { request_id: "x".repeat(100), ..Default::default() });
    assert_eq!(created.await.unwrap().into_inner().full_name, "replica", "another method: the default");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_reads_are_retried_once_on_another_replica() {
    let replicas = [Replica::start("replica-0").await, Replica::start("replica-1").await];
    let gw = gateway(replicas.iter().map(|r| r.addr.to_string()).collect(), fast_settings()).await;
    let channel = channel(gw.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(channel.clone());
    // replica-0 answers UNAVAILABLE to this read: every call still succeeds, at replica-1.
    for _ in 0..20 {
        let person = get_person(&mut client, "flaky").await.expect("retried at the other replica");
        assert_eq!(person.full_name, "replica-1");
    }
    // A create is not an idempotent read: what replica-0 says reaches the caller.
    let mut unavailable = 0;
    for _ in 0..40 {
        match client.create_person(CreatePersonRequest::default()).await {
            Ok(person) => assert_eq!(person.into_inner().full_name, "replica-1"),
            Err(status) => {
                assert_eq!((status.code(), status.message()), (Code::Unavailable, "replica-0 is going away"));
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "creates are never retried");
    // With one replica left, the read is retried there and fails as it says.
    let lone = gateway(vec![replicas[0].addr.to_string()], fast_settings()).await;
    let channel = self::channel(lone.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let status = get_person(&mut ContactsServiceClient::new(channel), "flaky").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_over_their_rate_limit_are_told_when_to_come_back() {
    use tonic_types::StatusExt;
    let replica = Replica::start("replica-0").await;
    let limits = crm_gateway::Limits { address: crm_gateway::parse_rate("1/m:3").unwrap(), ..Default::default() };
    let gw = gateway(vec![replica.addr.to_string()], EdgePolicy { limits, ..EdgePolicy::default() }).await;
    let channel = channel(gw.addr).await;
    wait_for_health(&channel, CONTACTS_SERVICE, ServingStatus::Serving).await;
    let mut client = ContactsServiceClient::new(channel);
    for i in 0..3 {
        get_person(&mut client, &format!("p{i}")).await.expect("within the burst");
    }
    let refused = get_person(&mut client, "p3").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("rate limit"), "{}", refused.message());
    let retry = refused.get_details_retry_info().expect("retry info");
    let delay = retry.retry_delay.expect("a delay");
    assert!(delay > Duration::from_secs(50) && delay <= Duration::from_secs(60), "{delay:?}");
    // Health checks and the ops endpoints are not limited.
    let (status, _, _) = http1(gw.addr, "GET /healthz HTTP/1.1", b"").await;
    assert_eq!(status, 200);
}
