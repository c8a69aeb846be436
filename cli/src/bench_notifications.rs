//! `crm bench notifications`: the notifications pipeline in one process, as its replicas run it
//! — a stand-in for contacts committing `ContactOwnerChanged` events into its outbox, the relays
//! and Redis (or the databases without it), the real intake putting each into its recipient's
//! inbox, every new notification announced back through the backbone to live streams — and
//! reports event-to-inbox throughput, commit-to-inbox and commit-to-subscriber latency, the
//! inbox calls on the largest inbox, and webhook deliveries to a local receiver.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bench_events::{Committed, Load, produce};
use anyhow::Context;
use crm_kit::auth::{Claims, Principal};
use crm_kit::db::{Db, Migrations, Sql, Tx};
use crm_kit::events::envelope::envelope;
use crm_kit::events::{Delivered, Events, Handler, HandlerError, Settings};
use crm_kit::jobs::{Runner, RunnerSettings};
use crm_kit::page::Page;
use crm_kit::role::Suite;
use crm_notifications::NotificationsApi;
use crm_notifications::deliver::{DeliveryJob, Senders};
use crm_notifications::intake::{Intake, IntakeSettings};
use crm_notifications::live::Hub;
use crm_notifications::outbound::Policy;
use crm_notifications::store::{self, Store};
use crm_notifications::webhooks::WebhookSender;
use crm_proto::contacts::v1::{ContactCreated, ContactOwnerChanged, RecordType};
use crm_proto::events::v1::Envelope;
use crm_proto::notifications::v1::notifications_service_server::NotificationsService;
use crm_proto::notifications::v1::{
    CreateWebhookRequest, GetUnreadCountRequest, NotificationCreated, SubscribeRequest, Webhook,
};
use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use tokio_stream::StreamExt;

#[derive(clap::Args, Debug)]
pub struct NotificationsBenchArgs {
    /// A notifications database for the bench (postgres://… or sqlite://…), migrated if needed;
    /// each run uses recipients of its own.
    #[arg(long)]
    database_url: String,
    /// A scratch database standing in for the contacts service (its outbox is emptied first).
    #[arg(long)]
    source_database_url: String,
    /// Redis carrying the events; without it they go through the databases.
    #[arg(long)]
    redis_url: Option<String>,
    /// Events (one notification each).
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Events per second to aim at; 0: as fast as the producers go.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Events per committed transaction of the producers.
    #[arg(long, default_value_t = 50)]
    per_tx: u64,
    /// Concurrent producing transactions.
    #[arg(long, default_value_t = 4)]
    producers: u64,
    /// Users the notifications go to, in turn.
    #[arg(long, default_value_t = 100)]
    recipients: u64,
    /// Open a live stream per recipient and time commit to receipt.
    #[arg(long)]
    subscribe: bool,
    /// Then this many webhook deliveries to a receiver in this process (0: none).
    #[arg(long, default_value_t = 0)]
    webhooks: u64,
}

/// When each event's transaction committed, and what has been seen of it.
struct Clock {
    committed: Committed,
    to_inbox: Mutex<Histogram<u64>>,
    to_subscriber: Mutex<Histogram<u64>>,
    handled: AtomicU64,
    received: AtomicU64,
}

impl Clock {
    fn since_commit(&self, event_id: &str) -> Option<u64> {
        self.committed.lock().expect("clock").get(event_id).map(|at| at.elapsed().as_micros() as u64)
    }
}

/// The intake, timed: the event's effect is the real intake's.
struct Timed {
    intake: Intake,
    clock: Arc<Clock>,
}

impl Timed {
    /// Counts `events` as in their inboxes (their transaction is about to commit).
    fn note(&self, events: &[&Delivered]) {
        for event in events {
            if let Some(micros) = self.clock.since_commit(&event.envelope.id) {
                let _ = self.clock.to_inbox.lock().expect("clock").record(micros.max(1));
            }
        }
        self.clock.handled.fetch_add(events.len() as u64, Ordering::SeqCst);
    }
}

impl Handler for Timed {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.intake.handle(tx, event).await?;
            self.note(&[event]);
            Ok(())
        })
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Delivered],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.intake.handle_batch(tx, events).await?;
            self.note(events);
            Ok(())
        })
    }
}

fn no_migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate::Migrator::DEFAULT, sqlite: sqlx::migrate::Migrator::DEFAULT }
}

fn principal(user: &str) -> Principal {
    let claims = Claims { sub: user.into(), exp: i64::MAX / 2, ..Claims::default() };
    Principal::from_claims(claims, format!("bench-{user}"))
}

fn request<T>(user: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(principal(user));
    request
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn percentiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(h, 0.5),
        ms(h, 0.9),
        ms(h, 0.99),
        h.max() as f64 / 1000.0
    )
}

pub async fn run(args: NotificationsBenchArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.database_url, 16).await.context("open the notifications database")?;
    let source_db =
        Db::open(&args.source_database_url, (args.producers as u32 + 4).max(8), &no_migrations(), "bench-source")
            .await
            .context("open the source database")?;
    Sql::new("DELETE FROM outbox").query().execute(source_db.pool()).await.context("empty the source outbox")?;
    let run = crm_kit::id::new()[24..].to_string();
    let settings = Settings {
        external_groups: vec![("contacts".into(), "notifications".into())],
        stream_prefix: format!("crm-bench:{run}:"),
        ..Settings::default()
    };
    let transport = if args.redis_url.is_some() { "Redis Streams" } else { "the databases" };
    let events = match &args.redis_url {
        Some(url) => Events::redis(&Suite::new(&[]), url, settings).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Events::embedded(&Suite::new(&[]), settings),
    };
    let source_outbox = events.outbox("contacts", &source_db);
    let own_outbox = events.outbox(crm_notifications::SOURCE, store.db());
    let store = store.with_outbox(own_outbox.clone());
    let hist = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds");
    let clock = Arc::new(Clock {
        committed: Committed::default(),
        to_inbox: Mutex::new(hist()),
        to_subscriber: Mutex::new(hist()),
        handled: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let hub = Hub::new();
    let (trigger, shutdown) = crm_kit::shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(events.relay(&source_outbox, &source_db).run(shutdown.clone()));
    tasks.spawn(events.relay(&own_outbox, store.db()).run(shutdown.clone()));
    let intake =
        Intake::new(store.clone(), None, IntakeSettings { default_locale: "en".into(), email: false, sms: false });
    let timed = Arc::new(Timed { intake, clock: clock.clone() });
    tasks.spawn(events.consumer(crm_notifications::SOURCE, store.db(), &["contacts"], timed).run(shutdown.clone()));
    let listener = events.listener(crm_notifications::SOURCE, {
        let hub = hub.clone();
        move |event| {
            if let Some(Ok(created)) = crm_kit::events::envelope::payload::<NotificationCreated>(&event.envelope) {
                hub.announce(&created.recipient_id, created.sequence);
            }
        }
    });
    tasks.spawn(listener.run(shutdown.clone()));
    let api = NotificationsApi::new(store.clone(), hub.clone(), "en".into(), Duration::from_secs(5));
    let recipients: Vec<String> = (0..args.recipients.max(1)).map(|_| crm_kit::id::new()).collect();
    if args.subscribe {
        for user in &recipients {
            let mut stream = api
                .subscribe(request(user, SubscribeRequest::default()))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_inner();
            let clock = clock.clone();
            tasks.spawn(async move {
                while let Some(Ok(n)) = stream.next().await {
                    if let Some(micros) = clock.since_commit(&n.event_id) {
                        let _ = clock.to_subscriber.lock().expect("clock").record(micros.max(1));
                    }
                    clock.received.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    }
    // The consumer group and the streams exist before the first event.
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "{} assignment events to {} recipients, {} per transaction, {} producers, rate {}, through {transport}{}",
        args.events,
        recipients.len(),
        args.per_tx,
        args.producers,
        if args.rate == 0 { "unlimited".to_string() } else { format!("{}/s", args.rate) },
        if args.subscribe { ", a live stream per recipient" } else { "" }
    );
    let started = Instant::now();
    let per_tx = args.per_tx.max(1);
    let transactions = args.events.div_ceil(per_tx);
    let total = transactions * per_tx;
    let make = {
        let recipients = recipients.clone();
        move |n: u64| -> Envelope {
            let to = &recipients[(n % recipients.len() as u64) as usize];
            let event = ContactOwnerChanged {
                record_type: RecordType::Person as i32,
                id: crm_kit::id::new(),
                display_name: format!("Customer {n}"),
                from_owner_id: String::new(),
                to_owner_id: to.clone(),
            };
            envelope("contacts", &event.id, "bench", &event)
        }
    };
    let load = Load { transactions, per_tx, producers: args.producers, rate: args.rate };
    produce(&source_db, &source_outbox, &clock.committed, load, Arc::new(make)).await?;
    let produced = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(900);
    while clock.handled.load(Ordering::SeqCst) < total
        || (args.subscribe && clock.received.load(Ordering::SeqCst) < total)
    {
        anyhow::ensure!(Instant::now() < deadline, "notifications stopped arriving");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = started.elapsed();
    println!(
        "committed {total} events in {:.2} s ({:.0}/s); all in their inboxes{} after {:.2} s: {:.0} notifications/s",
        produced.as_secs_f64(),
        total as f64 / produced.as_secs_f64(),
        if args.subscribe { " and received live" } else { "" },
        done.as_secs_f64(),
        total as f64 / done.as_secs_f64()
    );
    println!("commit to inbox:      {}", percentiles(&clock.to_inbox.lock().expect("clock")));
    if args.subscribe {
        println!("commit to subscriber: {}", percentiles(&clock.to_subscriber.lock().expect("clock")));
    }
    inbox_calls(&api, &store, &recipients[0]).await?;
    if args.webhooks > 0 {
        webhooks(&api, &store, &source_db, &source_outbox, &clock, &args, shutdown.clone()).await?;
    }
    trigger.fire();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The inbox calls on `user`'s inbox (the run's first recipient: the largest).
async fn inbox_calls(api: &NotificationsApi, store: &Store, user: &str) -> anyhow::Result<()> {
    let (unread, last) = store.unread(user).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("inbox calls on a user with {last} notifications ({unread} unread), 500 calls each, one at a time:");
    for (name, order) in [("list, newest first", store::BY_TIME), ("list, unread first", store::UNREAD_FIRST)] {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for _ in 0..500 {
            let page = Page::decode(&["notifications"], 50, "", &order).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = Instant::now();
            store.list(user, false, &order, &page).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            h.record((t.elapsed().as_micros() as u64).max(1))?;
        }
        println!("  {name:<22} first page of 50: {}", percentiles(&h));
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..500 {
        let t = Instant::now();
        api.get_unread_count(request(user, GetUnreadCountRequest {})).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        h.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    println!("  {:<22} {}", "unread count", percentiles(&h));
    Ok(())
}

/// `args.webhooks` events of one type to a webhook served by a receiver in this process, sent
/// by one delivery runner: how fast they arrive.
async fn webhooks(
    api: &NotificationsApi,
    store: &Store,
    source_db: &Db,
    source_outbox: &crm_kit::events::Outbox,
    clock: &Arc<Clock>,
    args: &NotificationsBenchArgs,
    shutdown: crm_kit::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let received = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move || {
                received.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let policy = Policy { allowed: vec!["127.0.0.0/8".parse().map_err(|e: String| anyhow::anyhow!(e))?] };
    let api = api.clone().with_webhook_policy(policy.clone());
    let admin = crm_kit::id::new();
    let mut create = request(
        &admin,
        CreateWebhookRequest {
            webhook: Some(Webhook {
                url: format!("http://{addr}/hook"),
                event_types: vec!["crm.contacts.v1.ContactCreated".into()],
                ..Default::default()
            }),
        },
    );
    let mut admin_principal = principal(&admin);
    admin_principal.permissions = vec![crm_notifications::permissions::ADMIN.name.to_string()];
    create.extensions_mut().insert(admin_principal);
    let hook =
        api.create_webhook(create).await.map_err(|e| anyhow::anyhow!("{e}"))?.into_inner().webhook.unwrap_or_default();
    let sender = WebhookSender::new(store.clone(), policy, Duration::from_secs(10)).map_err(|e| anyhow::anyhow!(e))?;
    let job = DeliveryJob::new(
        store.clone(),
        Senders { webhooks: Some(sender), ..Senders::default() },
        vec![Duration::from_secs(1)],
    );
    let runner = Runner::new(
        store.db().clone(),
        RunnerSettings { batch: 100, poll: Duration::from_millis(20), ..RunnerSettings::default() },
    )
    .handle_external(store::deliveries::JOB_KIND, Arc::new(job));
    // Stops with the bench's shutdown.
    tokio::spawn(runner.run(shutdown));
    let per_tx = args.per_tx.max(1);
    let transactions = args.webhooks.div_ceil(per_tx);
    let total = transactions * per_tx;
    println!("{total} webhook deliveries to a receiver in this process, one delivery runner:");
    let started = Instant::now();
    let make = |n: u64| -> Envelope {
        let event = ContactCreated {
            record_type: RecordType::Company as i32,
            id: crm_kit::id::new(),
            display_name: format!("Company {n}"),
            owner_id: String::new(),
        };
        envelope("contacts", &event.id, "bench", &event)
    };
    let load = Load { transactions, per_tx, producers: args.producers, rate: 0 };
    produce(source_db, source_outbox, &clock.committed, load, Arc::new(make)).await?;
    let deadline = Instant::now() + Duration::from_secs(900);
    while received.load(Ordering::SeqCst) < total {
        anyhow::ensure!(Instant::now() < deadline, "webhooks stopped arriving");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    println!(
        "  all {total} signed and received after {:.2} s: {:.0} deliveries/s",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    // Later runs on this database get no deliveries for this run's receiver.
    store.delete_webhook(&hook.id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    server.abort();
    Ok(())
}
