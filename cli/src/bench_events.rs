//! `crm bench events`: the events backbone end to end in one process, as a service runs it —
//! producers committing events into the outbox of one database, the relay publishing them (Redis
//! Streams, or through the database without Redis), one consumer group handling them in
//! transactions of another database with their processed marks — reporting sustained
//! throughput and commit-to-handled latency percentiles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crm_kit::db::{Db, Migrations, Sql, Tx};
use crm_kit::events::envelope::envelope;
use crm_kit::events::{Delivered, Events, Handler, HandlerError, Settings};
use crm_kit::role::Suite;
use crm_proto::events::v1::Envelope;
use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;

#[derive(clap::Args, Debug)]
pub struct EventsBenchArgs {
    /// A database for the bench alone (postgres://… or sqlite://…): its outbox is emptied first.
    #[arg(long)]
    database_url: String,
    /// The consumer's database (its processed marks); defaults to the producer's.
    #[arg(long)]
    consumer_database_url: Option<String>,
    /// Redis carrying the events; without it they go through the producer's database.
    #[arg(long)]
    redis_url: Option<String>,
    /// Events to publish.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Events per second to aim at; 0: as fast as the producers go.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Events per committed transaction.
    #[arg(long, default_value_t = 50)]
    per_tx: u64,
    /// Concurrent producing transactions.
    #[arg(long, default_value_t = 4)]
    producers: u64,
}

/// Remembers when each event's transaction committed; the handler reads it back.
#[derive(Default)]
struct Clock {
    committed: Committed,
    latencies: Mutex<Option<Histogram<u64>>>,
    handled: std::sync::atomic::AtomicU64,
}

struct Measure(Arc<Clock>, String);

impl Handler for Measure {
    fn handle<'a>(&'a self, _tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        if !event.envelope.subject.starts_with(&self.1) {
            return Box::pin(async { Ok(()) });
        }
        let committed = self.0.committed.lock().expect("clock").remove(&event.envelope.id);
        if let Some(at) = committed {
            let micros = at.elapsed().as_micros() as u64;
            if let Some(h) = self.0.latencies.lock().expect("clock").as_mut() {
                let _ = h.record(micros.max(1));
            }
        }
        self.0.handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

/// When each event's transaction committed, by event id.
pub(crate) type Committed = Arc<Mutex<HashMap<String, Instant>>>;

/// How producers load an outbox: `transactions` of `per_tx` events from `producers` tasks, at
/// `rate` events per second (0: as fast as they go).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub transactions: u64,
    pub per_tx: u64,
    pub producers: u64,
    pub rate: u64,
}

/// Commits the events `make` builds (numbered from 0) into `outbox` in `db` as `load` says,
/// noting each event's commit time in `committed`.
pub(crate) async fn produce(
    db: &Db,
    outbox: &crm_kit::events::Outbox,
    committed: &Committed,
    load: Load,
    make: Arc<dyn Fn(u64) -> Envelope + Send + Sync>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..load.producers.max(1) {
        let (db, outbox, committed, next, make) =
            (db.clone(), outbox.clone(), committed.clone(), next.clone(), make.clone());
        set.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= load.transactions {
                    return Ok::<(), anyhow::Error>(());
                }
                if load.rate > 0 {
                    let due = started + Duration::from_secs_f64((n * load.per_tx) as f64 / load.rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let batch: Vec<Envelope> = (0..load.per_tx).map(|i| make(n * load.per_tx + i)).collect();
                let mut tx = db.begin_write().await?;
                outbox.append_all(&mut tx, &batch).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                // Noted just before the commit (a consumer may see an event before this task
                // runs again), then moved to the commit's end for the events not yet handled.
                let before = Instant::now();
                committed.lock().expect("clock").extend(batch.iter().map(|e| (e.id.clone(), before)));
                tx.commit().await?;
                let now = Instant::now();
                let mut committed = committed.lock().expect("clock");
                for e in &batch {
                    if let Some(at) = committed.get_mut(&e.id) {
                        *at = now;
                    }
                }
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(())
}

fn no_migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate::Migrator::DEFAULT, sqlite: sqlx::migrate::Migrator::DEFAULT }
}

pub async fn run(args: EventsBenchArgs) -> anyhow::Result<()> {
    let producer = Db::open(&args.database_url, (args.producers as u32 + 4).max(8), &no_migrations(), "bench-producer")
        .await
        .context("open the producer's database")?;
    let consumer = match &args.consumer_database_url {
        Some(url) => {
            Db::open(url, 8, &no_migrations(), "bench-consumer").await.context("open the consumer's database")?
        }
        None => producer.clone(),
    };
    Sql::new("DELETE FROM outbox").query().execute(producer.pool()).await.context("empty the bench outbox")?;
    let source = "bench";
    let run = crm_kit::id::new()[24..].to_string();
    let group = format!("bench-{run}");
    let settings = Settings {
        external_groups: vec![(source.into(), group.clone())],
        stream_prefix: format!("crm-bench:{}:", &crm_kit::id::new()[24..]),
        ..Settings::default()
    };
    let transport = if args.redis_url.is_some() { "Redis Streams" } else { "the producer's database" };
    let events = match &args.redis_url {
        Some(url) => Events::redis(&Suite::new(&[]), url, settings).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Events::embedded(&Suite::new(&[]), settings),
    };
    let outbox = events.outbox(source, &producer);
    let clock = Arc::new(Clock {
        latencies: Mutex::new(Some(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
        ..Clock::default()
    });
    let (trigger, shutdown) = crm_kit::shutdown::channel();
    let relay = tokio::spawn(events.relay(&outbox, &producer).run(shutdown.clone()));
    let consumer_task = tokio::spawn(
        events
            .consumer(&group, &consumer, &[source], Arc::new(Measure(clock.clone(), run.clone())))
            .run(shutdown.clone()),
    );
    // The group exists before the first event (the relay creates it in its first round).
    tokio::time::sleep(Duration::from_millis(300)).await;

    println!(
        "{} events, {} per transaction, {} producers, rate {}, through {transport}",
        args.events,
        args.per_tx,
        args.producers,
        if args.rate == 0 { "unlimited".to_string() } else { format!("{}/s", args.rate) }
    );
    let started = Instant::now();
    let per_tx = args.per_tx.max(1);
    let transactions = args.events.div_ceil(per_tx);
    let make = move |n: u64| envelope(source, &format!("{run}-{n}"), "bench", &Envelope::default());
    let (rate, producers) = (args.rate, args.producers);
    produce(&producer, &outbox, &clock.committed, Load { transactions, per_tx, producers, rate }, Arc::new(make))
        .await?;
    let produced = started.elapsed();
    let total = transactions * per_tx;
    let deadline = Instant::now() + Duration::from_secs(600);
    while clock.handled.load(std::sync::atomic::Ordering::SeqCst) < total {
        anyhow::ensure!(Instant::now() < deadline, "events stopped arriving");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consumed = started.elapsed();
    trigger.fire();
    let _ = relay.await;
    let _ = consumer_task.await;
    let h = clock.latencies.lock().expect("clock").take().expect("histogram");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "committed {total} events in {:.2} s ({:.0}/s); all handled after {:.2} s: {:.0} events/s end to end",
        produced.as_secs_f64(),
        total as f64 / produced.as_secs_f64(),
        consumed.as_secs_f64(),
        total as f64 / consumed.as_secs_f64()
    );
    println!(
        "commit to handled: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    Ok(())
}
