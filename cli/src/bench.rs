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
    /// Measure the events backbone: outbox to consumer throughput and commit-to-handled latency.
    Events(crate::bench_events::EventsBenchArgs),
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
    /// ListPeople filtered by stage and a tag, first page of 50.
    List,
    /// ListPeople filtered by one owner, first page of 50.
    ListOwner,
    /// ListPeople with a text query (a random 4-letter surname fragment; broad), first page of 50.
    Search,
    /// ListPeople with a text query of 7 phone digits (selective, like finding a caller), first page.
    SearchPhone,
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
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Seed(a) => seed(a).await,
        BenchCommand::Run(a) => measure(a).await,
        BenchCommand::Tokens(a) => tokens(a).await,
        BenchCommand::Events(a) => crate::bench_events::run(a).await,
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
    let token = key.sign(&claims);
    for _ in 0..1_000 {
        verifier.verify(&token).await?;
    }
    let count = args.count.max(1);
    let start = Instant::now();
    for _ in 0..count {
        verifier.verify(&token).await?;
    }
    let per_call = start.elapsed() / count;
    println!(
        "token verification: {count} calls, {:.1} µs per call on one core ({} bytes token, EdDSA)",
        per_call.as_secs_f64() * 1e6,
        token.len()
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
                        number: format!("+7 {:010}", 9_000_000_000 + i),
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
}

enum Call {
    Get(GetPersonRequest),
    List(ListPeopleRequest),
}

impl Plan {
    /// The next request; decided before any await (the random generator stays on its thread).
    fn next(&self) -> Call {
        let mut rng = rand::rng();
        let list = |filter: String, query: String| {
            Call::List(ListPeopleRequest { page_size: 50, filter, query, ..Default::default() })
        };
        match self.op {
            Op::Get => Call::Get(GetPersonRequest { id: self.ids.choose(&mut rng).cloned().unwrap_or_default() }),
            Op::List => list(format!("stage = CUSTOMER AND tags:{}", pick(&mut rng, TAGS)), String::new()),
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
        }
    }

    async fn call(&self, client: &mut Client) -> Result<(), tonic::Status> {
        match self.next() {
            Call::Get(request) => client.get_person(request).await.map(|_| ()),
            Call::List(request) => client.list_people(request).await.map(|_| ()),
        }
    }
}

async fn measure(args: RunArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    let endpoint = format!("http://{}", args.target);
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(
            Channel::from_shared(endpoint.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {}", args.target))?,
        );
    }
    if args.password.is_empty() {
        bail!("set CRM_BENCH_PASSWORD to the password of {} (the user the calls run as)", args.email);
    }
    let sign_in_at = args.sign_in_at.clone().unwrap_or_else(|| args.target.clone());
    let auth_channel = Channel::from_shared(format!("http://{sign_in_at}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {sign_in_at}"))?;
    let signed_in = crm_proto::auth::v1::auth_service_client::AuthServiceClient::new(auth_channel)
        .sign_in(crm_proto::auth::v1::SignInRequest { email: args.email.clone(), password: args.password.clone() })
        .await
        .with_context(|| format!("sign in as {} at {sign_in_at}", args.email))?
        .into_inner();
    let bearer = Bearer(format!("Bearer {}", signed_in.access_token).parse().context("access token")?);
    let mut client = ContactsServiceClient::with_interceptor(channels[0].clone(), bearer.clone());
    let sample = client
        .list_people(ListPeopleRequest { page_size: 1000, order_by: "update_time desc".into(), ..Default::default() })
        .await
        .context("list people to sample ids")?
        .into_inner();
    let ids: Vec<String> = sample.people.iter().map(|p| p.id.clone()).collect();
    if ids.is_empty() {
        bail!("no people at {}: run `crm bench seed` first", args.target);
    }
    let mut owners: Vec<String> = sample.people.iter().map(|p| p.owner_id.clone()).filter(|o| !o.is_empty()).collect();
    owners.sort();
    owners.dedup();
    let phones = sample.people.iter().flat_map(|p| p.phones.iter().map(|ph| ph.e164.clone())).collect();
    let plan = Arc::new(Plan { op: args.op, ids, owners, phones });

    let warmup = Duration::from_secs(2);
    let measure_for = Duration::from_secs(args.seconds.max(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let mut client = ContactsServiceClient::with_interceptor(channels[i % channels.len()].clone(), bearer.clone());
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
                let result = plan.call(&mut client).await;
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
    let secs = measure_for.as_secs_f64();
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "op={:?} target={} concurrency={} connections={} duration={:.0}s\n\
         calls={} errors={} throughput={:.0}/s\n\
         latency ms: p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2}",
        args.op,
        args.target,
        args.concurrency,
        args.connections,
        secs,
        total.len(),
        errors,
        total.len() as f64 / secs,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        total.max() as f64 / 1000.0,
    );
    if let Some(status) = first_error {
        println!("first error: {:?}: {}", status.code(), status.message());
    }
    Ok(())
}
