//! `crm bench seed` loads realistic volume straight into a contacts database (in batches, with
//! every key, tag and revision a real create writes); `crm bench run` drives a running suite
//! at fixed concurrency and reports throughput and latency percentiles from a histogram.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use crm_contacts::Store;
use crm_contacts::domain::{Kind, Record, Rules};
use crm_kit::Violations;
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::contacts::v1::*;
use hdrhistogram::Histogram;
use rand::Rng;
use rand::seq::IndexedRandom;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A contacts client whose every call carries the bench user's access token.
type Client = ContactsServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Insert generated companies and people into a contacts database. Re-running adds more.
    Seed(SeedArgs),
    /// Call a running suite (gateway or contacts service) and report latency percentiles.
    Run(RunArgs),
    /// Every call at 1, 16 and 64 in flight, through the gateway and straight to a contacts
    /// replica, in one table with the gateway/direct ratio.
    Suite(SuiteArgs),
    /// Measure the events backbone: outbox to consumer throughput and commit-to-handled latency.
    Events(crate::bench_events::EventsBenchArgs),
    /// Measure notifications: events to inboxes, commit to live subscribers, the inbox calls on
    /// a large inbox, webhook deliveries.
    Notifications(crate::bench_notifications::NotificationsBenchArgs),
    /// Measure the tasks service's calls on a million activity records, and the lag of
    /// reminders coming due at a steady rate.
    Tasks(crate::bench_tasks::TasksBenchArgs),
    /// Measure the deals service on a million deals: writes (with the board's totals), the board
    /// and the reports for an administrator, a head of 500 and a salesperson.
    Deals(crate::bench_deals::DealsBenchArgs),
    /// Every README filter and sort and a few searches against a seeded database, first page
    /// and a later page, each statement with the plan the database chose and its time.
    Plans(crate::bench_plans::PlansArgs),
    /// Measure what every process pays per call to verify an access token (in-process: a
    /// suite-shaped token signed with a fresh key, verified from the cached key set).
    Tokens(TokensArgs),
}

#[derive(clap::Args, Debug)]
struct TokensArgs {
    /// Verifications to time (after 1,000 warm-up ones).
    #[arg(long, default_value_t = 100_000)]
    count: u32,
}

#[derive(clap::Args, Debug)]
struct SeedArgs {
    /// The contacts database (postgres://… or sqlite://…); migrated if needed.
    #[arg(long, env = "CRM_CONTACTS_DATABASE_URL")]
    database_url: String,
    /// People to add.
    #[arg(long, default_value_t = 10_000)]
    people: u64,
    /// Companies to add (people are spread over them).
    #[arg(long, default_value_t = 1_000)]
    companies: u64,
    /// Distinct owners (user ids) the records are spread over.
    #[arg(long, default_value_t = 200)]
    owners: u64,
    /// Records per transaction.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Op {
    /// GetPerson of a random known id.
    Get,
    /// The same as REST/JSON (`GET /v1/people/{id}`, through the gateway's transcoder), one
    /// HTTP/1.1 keep-alive connection per call in flight. Gateway only.
    GetRest,
    /// ListPeople filtered by stage and a tag, first page of 50 (or as `--filter`, `--order-by`
    /// and `--page` say).
    List,
    /// ListPeople filtered by one owner, first page of 50.
    ListOwner,
    /// ListPeople with a text query (a random 4-letter surname fragment; broad), first page of 50.
    Search,
    /// ListPeople with a text query of 7 phone digits (selective, like finding a caller), first page.
    SearchPhone,
    /// CreatePerson with a new name, phone and e-mail.
    Create,
    /// UpdatePerson of a random known id (its notes).
    Update,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the gateway or of a contacts replica.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// The call to measure.
    #[arg(long, value_enum, default_value = "get")]
    op: Op,
    /// Calls in flight at any time.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to measure, in seconds (after a 2 s warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Where to sign in (the gateway); default: the target. Set it when the target is a
    /// contacts replica.
    #[arg(long)]
    sign_in_at: Option<String>,
    /// User the calls run as; their data scope applies.
    #[arg(long, env = "CRM_BENCH_EMAIL", default_value = "admin@crm.local")]
    email: String,
    /// That user's password (environment only, so that it never shows in a process list).
    #[arg(skip = std::env::var("CRM_BENCH_PASSWORD").unwrap_or_default())]
    password: String,
    /// With `--op list`: the listing's filter instead of a stage and a random tag (the syntax of
    /// the README's Filters; "" lists everyone). `{owner}` becomes a random owner of the people
    /// sampled and `{tag}` a random seeded tag, anew for each call.
    #[arg(long)]
    filter: Option<String>,
    /// With `--op list`: the listing's order (`create_time asc`, `full_name desc`…).
    #[arg(long, default_value = "")]
    order_by: String,
    /// With `--op list`: the page measured, of 50. The pages before it are walked once before
    /// the measurement, and every call asks for this one with its page token (a filter without
    /// `{owner}` or `{tag}`).
    #[arg(long, default_value_t = 1)]
    page: u32,
}

/// The calls one measurement makes: `op`, as `listing` says for a listing.
struct Work {
    op: Op,
    listing: Option<Listing>,
}

/// A listing asked for by `--filter`, `--order-by` and `--page`.
#[derive(Debug, Clone, Default)]
struct Listing {
    filter: String,
    order_by: String,
    /// The token of the page measured (empty: the first).
    page_token: String,
}

impl Listing {
    /// A page of 50 of this listing, with `filter` (its own, or with `{owner}` and `{tag}` drawn).
    fn request(&self, filter: String, page_token: String) -> ListPeopleRequest {
        ListPeopleRequest { page_size: 50, filter, order_by: self.order_by.clone(), page_token, ..Default::default() }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Seed(a) => seed(a).await,
        BenchCommand::Run(a) => measure(a).await,
        BenchCommand::Suite(a) => suite(a).await,
        BenchCommand::Tokens(a) => tokens(a).await,
        BenchCommand::Plans(a) => crate::bench_plans::plans(a).await,
        BenchCommand::Events(a) => crate::bench_events::run(a).await,
        BenchCommand::Notifications(a) => crate::bench_notifications::run(a).await,
        BenchCommand::Tasks(a) => crate::bench_tasks::run(a).await,
        BenchCommand::Deals(a) => crate::bench_deals::run(a).await,
    }
}

/// Serves the key set of one key, as the auth service's GetJwks would.
struct OneKey(crm_proto::auth::v1::Jwks);

impl crm_kit::auth::KeySource for OneKey {
    fn fetch(&self) -> futures_util::future::BoxFuture<'_, Result<crm_proto::auth::v1::Jwks, String>> {
        let jwks = self.0.clone();
        Box::pin(async move { Ok(jwks) })
    }
}

async fn tokens(args: TokensArgs) -> anyhow::Result<()> {
    use crm_kit::auth::{Claims, SigningKey, Verifier};
    let key = SigningKey::generate();
    let verifier = Verifier::new(Arc::new(OneKey(crm_proto::auth::v1::Jwks { keys: vec![key.jwk()] })));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let claims = Claims {
        iss: crm_kit::auth::ISSUER.into(),
        sub: crm_kit::id::new(),
        iat: now,
        exp: now + 900,
        jti: crm_kit::id::new(),
        svc: false,
        name: "Bench User".into(),
        email: "bench.user@example.com".into(),
        dept: crm_kit::id::new(),
        perms: crate::SUITE.catalog().names().iter().map(|p| p.to_string()).collect(),
    };
    // Distinct tokens: each is verified in full (the signature) the first time it is seen.
    let fresh: Vec<String> =
        (0..2_000).map(|_| key.sign(&Claims { jti: crm_kit::id::new(), ..claims.clone() })).collect();
    verifier.verify(&fresh[0]).await?;
    let start = Instant::now();
    for token in &fresh[1..] {
        verifier.verify(token).await?;
    }
    let first = start.elapsed() / (fresh.len() as u32 - 1);
    // The same token again, as every later call of a signed-in user: remembered until it expires.
    let token = &fresh[0];
    for _ in 0..1_000 {
        verifier.verify(token).await?;
    }
    let count = args.count.max(1);
    let start = Instant::now();
    for _ in 0..count {
        verifier.verify(token).await?;
    }
    let per_call = start.elapsed() / count;
    println!(
        "token verification on one core ({} bytes token, EdDSA): first sight {:.1} µs; \
         {count} calls with a token seen before {:.2} µs each",
        token.len(),
        first.as_secs_f64() * 1e6,
        per_call.as_secs_f64() * 1e6,
    );
    Ok(())
}

const FIRST: &[&str] = &[
    "Anna",
    "Ivan",
    "Maria",
    "Dmitry",
    "Olga",
    "Wei",
    "Li",
    "Fang",
    "Jose",
    "Maria Clara",
    "Juan",
    "Ana",
    "John",
    "Emma",
    "Lukas",
    "Sofia",
    "Hiroshi",
    "Yuki",
    "Ahmed",
    "Fatima",
    "Pedro",
    "Elena",
    "Sergei",
    "Mei",
    "Carlos",
];
const LAST: &[&str] = &[
    "Petrova",
    "Ivanov",
    "Smirnova",
    "Kuznetsov",
    "Zhang",
    "Wang",
    "Chen",
    "Liu",
    "Santos",
    "Reyes",
    "Cruz",
    "Bautista",
    "Smith",
    "Johnson",
    "Muller",
    "Schmidt",
    "Tanaka",
    "Sato",
    "Haddad",
    "Garcia",
    "Lopez",
    "Popov",
    "Sokolova",
    "Huang",
    "Mendoza",
    "Novak",
    "Kowalski",
    "Nguyen",
    "Kim",
    "Park",
];
const REGIONS: &[&str] =
    &["Moscow", "Shanghai", "Manila", "Berlin", "Cebu", "Kazan", "Shenzhen", "Austin", "Lyon", "Osaka"];
const SOURCES: &[&str] = &["web_form", "referral", "cold_call", "exhibition", "wechat", "telegram", "email"];
const TAGS: &[&str] = &["vip", "wholesale", "retail", "partner", "newsletter", "b2b", "b2c", "overdue", "loyal"];
const INDUSTRIES: &[&str] = &["retail", "manufacturing", "logistics", "it", "construction", "food", "finance"];

fn owners(n: u64) -> Vec<String> {
    // Stable ids, so that repeated seeds share owners and `crm bench run` can find them.
    (0..n.max(1))
        .map(|i| uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | u128::from(i)).to_string())
        .collect()
}

/// The `i`th of a billion distinct numbers in an order that looks random, as real phone numbers
/// do (sequential ones would share long runs of digits, which no real address book has).
fn spread(i: u64) -> u64 {
    // 3^18 has no factor in common with 10^9, so this is a permutation of 0..10^9.
    (i % 1_000_000_000 * 387_420_489 + 123_456_789) % 1_000_000_000
}

fn pick<'a>(rng: &mut impl Rng, items: &'a [&'a str]) -> &'a str {
    items.choose(rng).copied().unwrap_or_default()
}

fn normalized<R: Record>(mut record: R, rules: &Rules) -> anyhow::Result<R> {
    let mut v = Violations::new();
    record.normalize(rules, &mut v);
    if !v.is_empty() {
        bail!("generated record is invalid: {v:?}");
    }
    Ok(record)
}

async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.batch > 20_000 {
        bail!("--batch must be between 1 and 20000");
    }
    let store = Store::open(&args.database_url, 4).await.context("open the contacts database")?;
    let rules = Rules::default();
    let owners = owners(args.owners);
    let mut rng = rand::rng();
    let started = Instant::now();

    // Numbering continues after what is there, so phones, e-mails and names stay unique.
    let company_base = store.count(Kind::Company).await? as u64;
    let mut company_ids = Vec::with_capacity(args.companies as usize);
    let mut done = 0;
    while done < args.companies {
        let n = (args.companies - done).min(args.batch as u64);
        let mut batch = Vec::with_capacity(n as usize);
        for i in company_base + done..company_base + done + n {
            batch.push(normalized(
                Company {
                    name: format!("{} {} Trading {i}", pick(&mut rng, LAST), pick(&mut rng, INDUSTRIES)),
                    industry: pick(&mut rng, INDUSTRIES).into(),
                    region: pick(&mut rng, REGIONS).into(),
                    phones: vec![Phone { number: format!("+1 {:010}", 2_000_000_000 + i), ..Default::default() }],
                    stage: rng.random_range(1..=5),
                    source: pick(&mut rng, SOURCES).into(),
                    owner_id: owners.choose(&mut rng).cloned().unwrap_or_default(),
                    tags: vec![pick(&mut rng, TAGS).into()],
                    ..Default::default()
                },
                &rules,
            )?);
        }
        company_ids.extend(store.create_many(batch, "bench-seed").await?);
        done += n;
    }
    if args.companies > 0 {
        println!("companies: {} added in {:.1} s", args.companies, started.elapsed().as_secs_f64());
    }

    let person_base = store.count(Kind::Person).await? as u64;
    let started = Instant::now();
    let mut done = 0;
    let mut last_report = Instant::now();
    while done < args.people {
        let n = (args.people - done).min(args.batch as u64);
        let mut batch = Vec::with_capacity(n as usize);
        for i in person_base + done..person_base + done + n {
            let first = pick(&mut rng, FIRST);
            let last = pick(&mut rng, LAST);
            let tag_count = rng.random_range(0..3);
            let company_id = if rng.random_bool(0.3) { company_ids.choose(&mut rng).cloned() } else { None };
            batch.push(normalized(
                Person {
                    full_name: format!("{first} {last}"),
                    company_id: company_id.unwrap_or_default(),
                    phones: vec![Phone {
                        number: format!("+7 {:010}", 8_000_000_000 + spread(i)),
                        label: "mobile".into(),
                        ..Default::default()
                    }],
                    emails: vec![Email {
                        address: format!(
                            "{}.{}.{i}@example.com",
                            first.to_lowercase().replace(' ', ""),
                            last.to_lowercase()
                        ),
                        label: "work".into(),
                    }],
                    tags: (0..tag_count).map(|_| pick(&mut rng, TAGS).to_string()).collect(),
                    stage: rng.random_range(1..=5),
                    source: pick(&mut rng, SOURCES).into(),
                    region: pick(&mut rng, REGIONS).into(),
                    owner_id: owners.choose(&mut rng).cloned().unwrap_or_default(),
                    notes: "Seeded by crm bench seed".into(),
                    // A few, as in a real address book (and so that statistics know of them).
                    do_not_contact: i % 1000 == 999,
                    do_not_contact_reason: if i % 1000 == 999 {
                        "asked not to be called".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                },
                &rules,
            )?);
        }
        store.create_many(batch, "bench-seed").await?;
        done += n;
        if last_report.elapsed() >= Duration::from_secs(5) || done == args.people {
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            println!("people: {done}/{} ({:.0}/s)", args.people, rate);
            last_report = Instant::now();
        }
    }
    // Fresh statistics, so that the planner's first plans at this size are the right ones (and
    // on PostgreSQL a visibility map, so that index-only scans read no table pages).
    let analyze = match store.db().backend() {
        crm_kit::db::Backend::Postgres => "VACUUM ANALYZE",
        crm_kit::db::Backend::Sqlite => "ANALYZE",
    };
    println!("updating the planner's statistics ({analyze})");
    sqlx::query(analyze).execute(store.db().pool()).await?;
    println!(
        "seeded {} companies and {} people in {:.1} s; the database now holds {} people",
        args.companies,
        args.people,
        started.elapsed().as_secs_f64(),
        store.count(Kind::Person).await?
    );
    store.db().close().await;
    Ok(())
}

struct Plan {
    op: Op,
    ids: Vec<String>,
    owners: Vec<String>,
    phones: Vec<String>,
    listing: Option<Listing>,
}

enum Call {
    Get(GetPersonRequest),
    List(ListPeopleRequest),
    Create(CreatePersonRequest),
    Update(UpdatePersonRequest),
}

impl Plan {
    /// The next request; decided before any await (the random generator stays on its thread).
    fn next(&self) -> Call {
        let mut rng = rand::rng();
        let list = |filter: String, query: String| {
            Call::List(ListPeopleRequest { page_size: 50, filter, query, ..Default::default() })
        };
        match self.op {
            Op::Get | Op::GetRest => {
                Call::Get(GetPersonRequest { id: self.ids.choose(&mut rng).cloned().unwrap_or_default() })
            }
            Op::List => match &self.listing {
                Some(listing) => {
                    let owner = self.owners.choose(&mut rng).map(String::as_str).unwrap_or_default();
                    let filter = listing.filter.replace("{owner}", owner).replace("{tag}", pick(&mut rng, TAGS));
                    Call::List(listing.request(filter, listing.page_token.clone()))
                }
                None => list(format!("stage = CUSTOMER AND tags:{}", pick(&mut rng, TAGS)), String::new()),
            },
            Op::ListOwner => {
                let owner = self.owners.choose(&mut rng).cloned().unwrap_or_default();
                list(format!("owner_id = \"{owner}\""), String::new())
            }
            Op::Search => {
                let last = pick(&mut rng, LAST).to_lowercase();
                let start = rng.random_range(0..=last.len().saturating_sub(4));
                list(String::new(), last[start..(start + 4).min(last.len())].to_string())
            }
            Op::SearchPhone => {
                // The last 7 digits of a known person's phone.
                let phone = self.phones.choose(&mut rng).cloned().unwrap_or_default();
                list(String::new(), phone[phone.len().saturating_sub(7)..].to_string())
            }
            Op::Create => {
                // Random 10-digit numbers: a collision with a seeded phone is rare (and counted).
                let n: u64 = rng.random_range(1_000_000_000..10_000_000_000);
                Call::Create(CreatePersonRequest {
                    person: Some(Person {
                        full_name: format!("{} {}", pick(&mut rng, FIRST), pick(&mut rng, LAST)),
                        phones: vec![Phone { number: format!("+1{n}"), ..Default::default() }],
                        emails: vec![Email { address: format!("bench.{n}@example.org"), ..Default::default() }],
                        // Shaped like the seeded people, so that a bench run does not leave a
                        // block of newest records unlike all the others (which skews plans).
                        stage: rng.random_range(1..=5),
                        source: pick(&mut rng, SOURCES).into(),
                        region: pick(&mut rng, REGIONS).into(),
                        tags: (0..rng.random_range(0..3)).map(|_| pick(&mut rng, TAGS).to_string()).collect(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
            }
            Op::Update => Call::Update(UpdatePersonRequest {
                person: Some(Person {
                    id: self.ids.choose(&mut rng).cloned().unwrap_or_default(),
                    notes: format!("updated by crm bench at {}", rng.random::<u32>()),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["notes".into()] }),
            }),
        }
    }

    /// GetPerson as REST/JSON over `rest`.
    async fn call_rest(&self, rest: &mut Rest, authorization: &str) -> Result<(), tonic::Status> {
        use http_body_util::BodyExt;
        let Call::Get(get) = self.next() else { unreachable!("a REST op is a get") };
        let request = http::Request::get(format!("/v1/people/{}", get.id))
            .header(http::header::HOST, rest.host.as_str())
            .header(http::header::AUTHORIZATION, authorization)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        rest.sender.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let response =
            rest.sender.send_request(request).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        if status != http::StatusCode::OK {
            let text = String::from_utf8_lossy(&body.to_bytes()).to_string();
            return Err(tonic::Status::unknown(format!("HTTP {status}: {text}")));
        }
        Ok(())
    }

    async fn call(&self, client: &mut Client) -> Result<(), tonic::Status> {
        match self.next() {
            Call::Get(request) => client.get_person(request).await.map(|_| ()),
            Call::List(request) => client.list_people(request).await.map(|_| ()),
            Call::Create(request) => client.create_person(request).await.map(|_| ()),
            Call::Update(request) => client.update_person(request).await.map(|_| ()),
        }
    }
}

/// An HTTP/1.1 keep-alive connection for REST calls.
struct Rest {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: String,
}

impl Rest {
    async fn connect(target: &str) -> anyhow::Result<Rest> {
        let stream =
            tokio::net::TcpStream::connect(target).await.with_context(|| format!("cannot connect to {target}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1.1 to {target}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Rest { sender, host: target.to_string() })
    }
}

/// What the calls need: the user's token, and known ids, owners and phones to pick from.
struct Prepared {
    bearer: Bearer,
    /// The `authorization` header value.
    authorization: String,
    ids: Vec<String>,
    owners: Vec<String>,
    phones: Vec<String>,
}

async fn connect(target: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = format!("http://{target}");
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            Channel::from_shared(endpoint.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {target}"))?,
        );
    }
    Ok(channels)
}

/// Signs in at `sign_in_at` and samples records through `channel`.
async fn prepare(channel: Channel, sign_in_at: &str, email: &str, password: &str) -> anyhow::Result<Prepared> {
    if password.is_empty() {
        bail!("set CRM_BENCH_PASSWORD to the password of {email} (the user the calls run as)");
    }
    let auth_channel = Channel::from_shared(format!("http://{sign_in_at}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {sign_in_at}"))?;
    let signed_in = crm_proto::auth::v1::auth_service_client::AuthServiceClient::new(auth_channel)
        .sign_in(crm_proto::auth::v1::SignInRequest { email: email.to_string(), password: password.to_string() })
        .await
        .with_context(|| format!("sign in as {email} at {sign_in_at}"))?
        .into_inner();
    let authorization = format!("Bearer {}", signed_in.access_token);
    let bearer = Bearer(authorization.parse().context("access token")?);
    let mut client = ContactsServiceClient::with_interceptor(channel, bearer.clone());
    let sample = client
        .list_people(ListPeopleRequest { page_size: 1000, order_by: "update_time desc".into(), ..Default::default() })
        .await
        .context("list people to sample ids")?
        .into_inner();
    let ids: Vec<String> = sample.people.iter().map(|p| p.id.clone()).collect();
    if ids.is_empty() {
        bail!("no people to call: run `crm bench seed` first");
    }
    let mut owners: Vec<String> = sample.people.iter().map(|p| p.owner_id.clone()).filter(|o| !o.is_empty()).collect();
    owners.sort();
    owners.dedup();
    let phones = sample.people.iter().flat_map(|p| p.phones.iter().map(|ph| ph.e164.clone())).collect();
    Ok(Prepared { bearer, authorization, ids, owners, phones })
}

/// The token of page `page` of `listing`, walking the pages before it once.
async fn page_token(channel: &Channel, prepared: &Prepared, listing: &Listing, page: u32) -> anyhow::Result<String> {
    if listing.filter.contains("{owner}") || listing.filter.contains("{tag}") {
        bail!("--page needs a filter without {{owner}} or {{tag}}: each call asks for the same page");
    }
    let mut client = ContactsServiceClient::with_interceptor(channel.clone(), prepared.bearer.clone());
    let mut token = String::new();
    for walked in 1..page {
        let response = client
            .list_people(listing.request(listing.filter.clone(), token))
            .await
            .map_err(|s| anyhow::anyhow!("listing page {walked}: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        if response.next_page_token.is_empty() {
            bail!("the listing has {walked} page(s) of 50, not {page}");
        }
        token = response.next_page_token;
    }
    Ok(token)
}

/// What one measurement came to.
struct Measured {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<tonic::Status>,
    secs: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.hist.len() as f64 / self.secs
    }

    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Keeps `concurrency` calls of `op` in flight over `channels`: `warmup`, then `seconds` measured.
async fn load(
    target: &str,
    channels: &[Channel],
    prepared: &Prepared,
    Work { op, listing }: Work,
    concurrency: usize,
    warmup: Duration,
    seconds: u64,
) -> anyhow::Result<Measured> {
    let plan = Arc::new(Plan {
        op,
        ids: prepared.ids.clone(),
        owners: prepared.owners.clone(),
        phones: prepared.phones.clone(),
        listing,
    });
    let measure_for = Duration::from_secs(seconds.max(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency.max(1) {
        let mut client =
            ContactsServiceClient::with_interceptor(channels[i % channels.len()].clone(), prepared.bearer.clone());
        let mut rest = if op == Op::GetRest { Some(Rest::connect(target).await?) } else { None };
        let authorization = prepared.authorization.clone();
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut errors = 0_u64;
            let mut first_error = None;
            loop {
                let t = Instant::now();
                if t.duration_since(start) >= warmup + measure_for {
                    break;
                }
                let result = match &mut rest {
                    Some(rest) => plan.call_rest(rest, &authorization).await,
                    None => plan.call(&mut client).await,
                };
                if t.duration_since(start) < warmup {
                    continue;
                }
                match result {
                    Ok(()) => hist.saturating_record(t.elapsed().as_micros() as u64),
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert(status);
                    }
                }
            }
            (hist, errors, first_error)
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (hist, e, fe) = task.await?;
        total.add(&hist)?;
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    Ok(Measured { hist: total, errors, first_error, secs: measure_for.as_secs_f64() })
}

async fn measure(args: RunArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    let asks_listing = args.filter.is_some() || !args.order_by.is_empty() || args.page != 1;
    if asks_listing && args.op != Op::List {
        bail!("--filter, --order-by and --page are for --op list");
    }
    if args.page == 0 {
        bail!("--page counts from 1");
    }
    let mut listing = asks_listing.then(|| Listing {
        filter: args.filter.clone().unwrap_or_else(|| "stage = CUSTOMER AND tags:{tag}".into()),
        order_by: args.order_by.clone(),
        page_token: String::new(),
    });
    let channels = connect(&args.target, args.connections).await?;
    let sign_in_at = args.sign_in_at.clone().unwrap_or_else(|| args.target.clone());
    let prepared = prepare(channels[0].clone(), &sign_in_at, &args.email, &args.password).await?;
    if let Some(listing) = listing.as_mut().filter(|_| args.page > 1) {
        listing.page_token = page_token(&channels[0], &prepared, listing, args.page).await?;
    }
    let described = match &listing {
        Some(l) => format!(" filter={:?} order_by={:?} page={}", l.filter, l.order_by, args.page),
        None => String::new(),
    };
    let m = load(
        &args.target,
        &channels,
        &prepared,
        Work { op: args.op, listing },
        args.concurrency,
        Duration::from_secs(2),
        args.seconds,
    )
    .await?;
    println!(
        "op={:?}{described} target={} concurrency={} connections={} duration={:.0}s\n\
         calls={} errors={} throughput={:.0}/s\n\
         latency ms: p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2}",
        args.op,
        args.target,
        args.concurrency,
        args.connections,
        m.secs,
        m.hist.len(),
        m.errors,
        m.rate(),
        m.ms(0.5),
        m.ms(0.9),
        m.ms(0.99),
        m.ms(0.999),
        m.hist.max() as f64 / 1000.0,
    );
    if let Some(status) = m.first_error {
        println!("first error: {:?}: {}", status.code(), status.message());
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct SuiteArgs {
    /// Address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway: String,
    /// Address of a contacts replica, measured directly beside the gateway (omit: gateway only).
    #[arg(long)]
    direct: Option<String>,
    /// Calls to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "get,get-rest,list,list-owner,search,search-phone,create,update"
    )]
    ops: Vec<Op>,
    /// Calls in flight, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds measured per cell (after a 1 s warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// User the calls run as; their data scope applies.
    #[arg(long, env = "CRM_BENCH_EMAIL", default_value = "admin@crm.local")]
    email: String,
    /// That user's password (environment only).
    #[arg(skip = std::env::var("CRM_BENCH_PASSWORD").unwrap_or_default())]
    password: String,
}

/// Every op at every concurrency, through the gateway and (when given) directly, in one table.
async fn suite(args: SuiteArgs) -> anyhow::Result<()> {
    let gateway = connect(&args.gateway, args.connections).await?;
    let direct = match &args.direct {
        Some(addr) => Some(connect(addr, args.connections).await?),
        None => None,
    };
    let prepared = prepare(gateway[0].clone(), &args.gateway, &args.email, &args.password).await?;
    println!(
        "{:<13} {:>9} | {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>7}",
        "op", "in flight", "gateway/s", "p50 ms", "p99 ms", "direct/s", "p50 ms", "p99 ms", "gw/dir"
    );
    let warmup = Duration::from_secs(1);
    for &op in &args.ops {
        for &concurrency in &args.concurrency {
            let through =
                load(&args.gateway, &gateway, &prepared, Work { op, listing: None }, concurrency, warmup, args.seconds)
                    .await?;
            // REST is the gateway's: a service answers gRPC only.
            let straight = match (&direct, &args.direct) {
                (Some(channels), Some(addr)) if op != Op::GetRest => Some(
                    load(addr, channels, &prepared, Work { op, listing: None }, concurrency, warmup, args.seconds)
                        .await?,
                ),
                _ => None,
            };
            let name = op.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
            let (d_rate, d50, d99, ratio) = match &straight {
                Some(d) => (
                    format!("{:.0}", d.rate()),
                    format!("{:.2}", d.ms(0.5)),
                    format!("{:.2}", d.ms(0.99)),
                    format!("{:.2}", through.rate() / d.rate().max(1e-9)),
                ),
                None => ("—".into(), "—".into(), "—".into(), "—".into()),
            };
            println!(
                "{:<13} {:>9} | {:>10.0} {:>8.2} {:>8.2} | {:>10} {:>8} {:>8} | {:>7}",
                name,
                concurrency,
                through.rate(),
                through.ms(0.5),
                through.ms(0.99),
                d_rate,
                d50,
                d99,
                ratio
            );
            for (place, m) in [("gateway", Some(&through)), ("direct", straight.as_ref())] {
                if let Some(m) = m
                    && let Some(status) = &m.first_error
                {
                    println!("  {place}: {} errors, first: {:?}: {}", m.errors, status.code(), status.message());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_numbers_are_distinct() {
        let numbers: std::collections::HashSet<u64> = (0..100_000).map(spread).collect();
        assert_eq!(numbers.len(), 100_000);
        assert!(numbers.iter().all(|n| *n < 1_000_000_000));
    }
}
