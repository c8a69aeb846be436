//! The events backbone and leased jobs on both backends, with real Redis: outbox atomicity,
//! publication order, one effect per event through redelivery and a Redis that lost its data,
//! dead letters and their retry, racing relays, jobs firing once with racing and dying runners,
//! external jobs rescheduling themselves and losing their lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crm_kit::db::{Db, Migrations, Sql, Tx};
use crm_kit::events::{self, Delivered, Events, Handler, HandlerError, Outbox, Round, Settings, admin};
use crm_kit::jobs::{self, ExternalJobHandler, Job, JobHandler, Next, Runner, RunnerSettings};
use crm_kit::role::Suite;
use crm_kit::shutdown::{self, Shutdown, Trigger};
use crm_kit::testing::{TestDb, redis_url, unique_stream_prefix};
use crm_proto::events::v1::Envelope;
use futures_util::future::BoxFuture;
use sqlx::Row;

const SOURCE: &str = "probe";
const GROUP: &str = "probe-effects";

fn migrations() -> Migrations {
    Migrations {
        postgres: sqlx::migrate!("tests/migrations/postgres"),
        sqlite: sqlx::migrate!("tests/migrations/sqlite"),
    }
}

async fn open(db: &TestDb) -> Db {
    Db::open(db.url(), 8, &migrations(), "test").await.expect("open test database")
}

fn settings(prefix: &str) -> Settings {
    Settings {
        poll: Duration::from_millis(20),
        claim_after: Duration::from_millis(300),
        max_attempts: 3,
        retry_backoff: Duration::from_millis(10),
        external_groups: vec![(SOURCE.into(), GROUP.into())],
        stream_prefix: prefix.to_string(),
        ..Settings::default()
    }
}

fn embedded() -> Events {
    Events::embedded(&Suite::new(&[]), settings(&unique_stream_prefix()))
}

fn redis() -> Events {
    Events::redis(&Suite::new(&[]), &redis_url(), settings(&unique_stream_prefix())).expect("redis events")
}

/// Records one effect per handled event; fails on subjects starting with "poison" while
/// `poisoned` is set.
struct Effects {
    poisoned: AtomicBool,
}

impl Handler for Effects {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.poisoned.load(Ordering::SeqCst) && event.envelope.subject.starts_with("poison") {
                return Err("this event cannot be handled".into());
            }
            let mut sql = Sql::new("INSERT INTO effects (event_id, subject, handled_at) VALUES (");
            sql.bind(event.envelope.id.as_str())
                .push(", ")
                .bind(event.envelope.subject.as_str())
                .push(", ")
                .bind(0_i64);
            sql.push(")");
            sql.query().execute(&mut **tx).await?;
            Ok(())
        })
    }
}

fn effects(poisoned: bool) -> Arc<Effects> {
    Arc::new(Effects { poisoned: AtomicBool::new(poisoned) })
}

/// Appends `n` events about subjects `<prefix>-<i>`, `per_tx` per transaction.
async fn produce(db: &Db, outbox: &Outbox, prefix: &str, n: usize, per_tx: usize) -> Vec<String> {
    let mut subjects = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(per_tx.max(1)) {
        let mut tx = db.begin_write().await.unwrap();
        let batch: Vec<Envelope> = chunk
            .iter()
            .map(|i| {
                let subject = format!("{prefix}-{i}");
                subjects.push(subject.clone());
                events::envelope::envelope(
                    SOURCE,
                    &subject,
                    "tester",
                    &Envelope { id: subject.clone(), ..Envelope::default() },
                )
            })
            .collect();
        outbox.append_all(&mut tx, &batch).await.unwrap();
        tx.commit().await.unwrap();
    }
    subjects
}

/// Effects per subject.
async fn effect_counts(db: &Db) -> HashMap<String, i64> {
    let rows = Sql::new("SELECT subject, COUNT(*) AS n FROM effects GROUP BY subject")
        .query()
        .fetch_all(db.pool())
        .await
        .unwrap();
    rows.iter().map(|r| (r.get::<String, _>("subject"), r.get::<i64, _>("n"))).collect()
}

async fn wait_for_effects(db: &Db, subjects: &[String]) -> HashMap<String, i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = effect_counts(db).await;
        if subjects.iter().all(|s| counts.contains_key(s)) || Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_exactly_once(counts: &HashMap<String, i64>, subjects: &[String]) {
    let missing: Vec<&String> = subjects.iter().filter(|s| !counts.contains_key(*s)).collect();
    let twice: Vec<(&String, &i64)> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events had no effect, e.g. {:?}",
        missing.len(),
        subjects.len(),
        missing.first()
    );
    assert!(twice.is_empty(), "events with more than one effect: {twice:?}");
    assert_eq!(counts.len(), subjects.len());
}

struct Running {
    trigger: Trigger,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    fn new() -> (Running, Shutdown) {
        let (trigger, shutdown) = shutdown::channel();
        (Running { trigger, tasks: tokio::task::JoinSet::new() }, shutdown)
    }

    async fn stop(mut self) {
        self.trigger.fire();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn outbox_rows(db: &Db) -> i64 {
    Sql::new("SELECT COUNT(*) AS n FROM outbox").query().fetch_one(db.pool()).await.unwrap().get("n")
}

/// No event without its change: a rolled-back transaction leaves none; a committed one does.
async fn outbox_follows_the_transaction(db: TestDb) {
    let db = open(&db).await;
    let outbox = Outbox::new(SOURCE);
    let mut tx = db.begin_write().await.unwrap();
    outbox.append(&mut tx, "s-1", "tester", &Envelope::default()).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(outbox_rows(&db).await, 0);
    let mut tx = db.begin_write().await.unwrap();
    outbox.append(&mut tx, "s-1", "tester", &Envelope::default()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox_rows(&db).await, 1);
    let status = admin::outbox_status(&db).await.unwrap();
    assert_eq!((status.unpublished, status.retained, status.last_seq), (1, 0, 0));
}

/// Published in commit order and handled once each, then pruned once the group has them.
async fn delivers_each_event_once(events: Events, producer: TestDb, consumer: TestDb) {
    let (producer, consumer) = (open(&producer).await, open(&consumer).await);
    let outbox = events.outbox(SOURCE, &producer);
    let (mut running, shutdown) = Running::new();
    let relay = events.relay(&outbox, &producer);
    running.tasks.spawn(relay.run(shutdown.clone()));
    let group = events.consumer(GROUP, &consumer, &[SOURCE], effects(false));
    running.tasks.spawn(group.run(shutdown.clone()));
    let subjects = produce(&producer, &outbox, "ev", 300, 7).await;
    let counts = wait_for_effects(&consumer, &subjects).await;
    assert_exactly_once(&counts, &subjects);
    // Published in order: publication numbers follow the order of appending.
    let rows = Sql::new("SELECT position, seq FROM outbox WHERE seq IS NOT NULL ORDER BY position")
        .query()
        .fetch_all(producer.pool())
        .await
        .unwrap();
    let seqs: Vec<i64> = rows.iter().map(|r| r.get("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "publication order follows commit order");
    // Once the group has everything, the relay prunes the outbox.
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox_rows(&producer).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outbox_rows(&producer).await, 0, "acknowledged events are pruned");
    running.stop().await;
}

async fn delivers_each_event_once_embedded(producer: TestDb) {
    let consumer = fresh_like(&producer).await;
    delivers_each_event_once(embedded(), producer, consumer).await;
}

async fn delivers_each_event_once_through_redis(producer: TestDb) {
    let consumer = fresh_like(&producer).await;
    delivers_each_event_once(redis(), producer, consumer).await;
}

async fn fresh_like(db: &TestDb) -> TestDb {
    match db {
        TestDb::Postgres { .. } => TestDb::postgres().await,
        TestDb::Sqlite { .. } => TestDb::sqlite(),
    }
}

/// A handler that keeps failing parks its event; a retry after the fix has its effect once.
async fn dead_letters_are_parked_and_retried(producer: TestDb) {
    let consumer = fresh_like(&producer).await;
    let (producer, consumer) = (open(&producer).await, open(&consumer).await);
    let events = embedded();
    let outbox = events.outbox(SOURCE, &producer);
    let (mut running, shutdown) = Running::new();
    running.tasks.spawn(events.relay(&outbox, &producer).run(shutdown.clone()));
    let handler = effects(true);
    running.tasks.spawn(events.consumer(GROUP, &consumer, &[SOURCE], handler.clone()).run(shutdown.clone()));
    let good = produce(&producer, &outbox, "good", 5, 5).await;
    let poison = produce(&producer, &outbox, "poison", 2, 1).await;
    let after = produce(&producer, &outbox, "after", 5, 5).await;
    // The poisoned events do not block those after them.
    let counts = wait_for_effects(&consumer, &[good.clone(), after.clone()].concat()).await;
    assert_exactly_once(&counts, &[good.clone(), after.clone()].concat());
    let letters = admin::dead_letters(&consumer, 10).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters.iter().all(|l| l.attempts == 3 && l.last_error.contains("cannot be handled") && l.consumer == GROUP)
    );
    handler.poisoned.store(false, Ordering::SeqCst);
    assert_eq!(admin::retry(&consumer, Some(&letters[0].event_id)).await.unwrap(), 1);
    assert_eq!(admin::retry(&consumer, None).await.unwrap(), 2);
    let all = [good, poison, after].concat();
    let counts = wait_for_effects(&consumer, &all).await;
    assert_exactly_once(&counts, &all);
    assert!(admin::dead_letters(&consumer, 10).await.unwrap().is_empty());
    running.stop().await;
}

/// Redis loses its data (the stream and the group with it) while events flow: the relay notices,
/// publishes again what the group had not acknowledged, and the consumer drops the duplicates.
async fn survives_redis_losing_its_data(producer: TestDb) {
    let consumer = fresh_like(&producer).await;
    let (producer, consumer) = (open(&producer).await, open(&consumer).await);
    let events = redis();
    let outbox = events.outbox(SOURCE, &producer);
    let key = events.settings().stream_key(SOURCE);
    let (mut running, shutdown) = Running::new();
    running.tasks.spawn(events.relay(&outbox, &producer).run(shutdown.clone()));
    let mut subjects = produce(&producer, &outbox, "before", 200, 10).await;
    // No consumer yet: the events wait in the stream (and in the outbox). Redis forgets them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin::outbox_status(&producer).await.unwrap().unpublished > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    subjects.extend(produce(&producer, &outbox, "during", 100, 10).await);
    running.tasks.spawn(events.consumer(GROUP, &consumer, &[SOURCE], effects(false)).run(shutdown.clone()));
    subjects.extend(produce(&producer, &outbox, "after", 100, 10).await);
    let counts = wait_for_effects(&consumer, &subjects).await;
    assert_exactly_once(&counts, &subjects);
    running.stop().await;
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
}

/// Two relays publish one outbox at once; three consumers of one group share the stream; one
/// consumer dies holding entries (they go to the others after the claim time). Each event has
/// exactly one effect.
async fn racing_relays_and_consumers(producer: TestDb) {
    let consumer = fresh_like(&producer).await;
    let (producer, consumer) = (open(&producer).await, open(&consumer).await);
    let events = redis();
    let outbox = events.outbox(SOURCE, &producer);
    let (mut running, shutdown) = Running::new();
    for _ in 0..2 {
        running.tasks.spawn(events.relay(&outbox, &producer).run(shutdown.clone()));
    }
    for _ in 0..3 {
        running.tasks.spawn(events.consumer(GROUP, &consumer, &[SOURCE], effects(false)).run(shutdown.clone()));
    }
    // A fourth consumer takes entries and dies without acknowledging them.
    let (doomed_trigger, doomed_shutdown) = shutdown::channel();
    let doomed = tokio::spawn(events.consumer(GROUP, &consumer, &[SOURCE], Arc::new(Stall)).run(doomed_shutdown));
    let subjects = produce(&producer, &outbox, "race", 600, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    doomed.abort();
    drop(doomed_trigger);
    let counts = wait_for_effects(&consumer, &subjects).await;
    assert_exactly_once(&counts, &subjects);
    let key = events.settings().stream_key(SOURCE);
    running.stop().await;
    let mut conn = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
}

/// A handler that never finishes (a consumer hung or about to die).
struct Stall;

impl Handler for Stall {
    fn handle<'a>(&'a self, _tx: &'a mut Tx, _event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(std::future::pending())
    }
}

/// Counts each run of a job as an effect.
struct Fire;

impl JobHandler for Fire {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if job.key.as_deref().is_some_and(|k| k.starts_with("poison")) {
                return Err("cannot fire".into());
            }
            let mut sql = Sql::new("INSERT INTO effects (event_id, subject, handled_at) VALUES (");
            sql.bind(job.id.as_str())
                .push(", ")
                .bind(job.key.clone().unwrap_or_default())
                .push(", ")
                .bind(0_i64)
                .push(")");
            sql.query().execute(&mut **tx).await?;
            Ok(())
        })
    }
}

/// Hangs the first job it gets (a runner about to be killed), then behaves.
struct HangOnce(AtomicBool);

impl JobHandler for HangOnce {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if !self.0.swap(true, Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Fire.run(tx, job).await
        })
    }
}

/// 600 jobs due within a second, three runners, one killed mid-job: each job fires once; a
/// rescheduled key moves its job; a failing job is kept as failed after its last attempt.
async fn jobs_fire_once(db: TestDb) {
    let db = open(&db).await;
    let now = crm_kit::time::now_micros();
    let mut tx = db.begin_write().await.unwrap();
    let mut keys = Vec::new();
    for i in 0..600 {
        let key = format!("job-{i}");
        jobs::schedule(&mut tx, "fire", Some(&key), now + (i % 10) * 100_000, b"payload").await.unwrap();
        keys.push(key);
    }
    // Scheduled again under the same key: one job, not two.
    jobs::schedule(&mut tx, "fire", Some("job-0"), now, b"moved").await.unwrap();
    jobs::schedule(&mut tx, "fire", Some("poison-1"), now, b"").await.unwrap();
    jobs::schedule(&mut tx, "fire", Some("cancelled"), now + 10_000_000, b"").await.unwrap();
    assert!(jobs::cancel(&mut tx, "fire", "cancelled").await.unwrap());
    tx.commit().await.unwrap();
    let settings = RunnerSettings {
        lease: Duration::from_millis(500),
        batch: 20,
        poll: Duration::from_millis(20),
        max_attempts: 2,
        retry_backoff: Duration::from_millis(10),
    };
    let (mut running, shutdown) = Running::new();
    let doomed = tokio::spawn(
        Runner::new(db.clone(), settings.clone())
            .handle("fire", Arc::new(HangOnce(AtomicBool::new(false))))
            .run(shutdown.clone()),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        running
            .tasks
            .spawn(Runner::new(db.clone(), settings.clone()).handle("fire", Arc::new(Fire)).run(shutdown.clone()));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    doomed.abort();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (waiting, _) = jobs::counts(&db).await.unwrap();
        if waiting == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
    let counts = effect_counts(&db).await;
    assert_exactly_once(&counts, &keys);
    assert_eq!(jobs::counts(&db).await.unwrap(), (0, 1), "the failing job is kept as failed");
    let last_error: String = Sql::new("SELECT last_error FROM jobs WHERE dead = 1")
        .query()
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get("last_error");
    assert_eq!(last_error, "cannot fire");

    // What ran shows on /metrics: by kind and outcome, how late and how long.
    let text = crm_kit::metrics::render();
    let runs = |outcome: &str| -> f64 {
        let prefix = format!("crm_jobs_runs_total{{kind=\"fire\",outcome=\"{outcome}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    assert!(runs("done") >= keys.len() as f64 - 1.0, "{text}");
    assert!(runs("dead") >= 1.0, "{text}");
    assert!(text.contains("crm_jobs_start_delay_seconds_count{kind=\"fire\"}"), "{text}");
    assert!(text.contains("crm_jobs_duration_seconds_count{kind=\"fire\"}"), "{text}");
}

/// Runs of an external job, by key, with the runner's attempt count of each.
#[derive(Default)]
struct External(std::sync::Mutex<Vec<(String, i64)>>);

impl ExternalJobHandler for External {
    fn run<'a>(&'a self, _db: &'a Db, job: &'a Job) -> BoxFuture<'a, Result<Next, HandlerError>> {
        Box::pin(async move {
            let key = job.key.clone().unwrap_or_default();
            let runs = {
                let mut runs = self.0.lock().unwrap();
                runs.push((key.clone(), job.attempts));
                runs.iter().filter(|(k, _)| *k == key).count()
            };
            match key.as_str() {
                "later" if runs == 1 => Ok(Next::RetryAt(crm_kit::time::now_micros() + 100_000)),
                "broken" => Err("the receiver refused".into()),
                // Outlives its lease the first time: another runner takes it meanwhile.
                "slow" if runs == 1 => {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Ok(Next::Done)
                }
                _ => Ok(Next::Done),
            }
        })
    }
}

/// External jobs run outside any transaction: done goes, a retry at a time of the handler's own
/// comes back then (its attempt count starting over), an error is retried and kept as failed
/// after the last attempt, and a run that outlived its lease removes nothing of the runner that
/// took the job over.
async fn external_jobs_finish_reschedule_and_fail(db: TestDb) {
    let db = open(&db).await;
    let now = crm_kit::time::now_micros();
    let mut tx = db.begin_write().await.unwrap();
    for key in ["done", "later", "broken", "slow"] {
        jobs::schedule(&mut tx, "send", Some(key), now, b"").await.unwrap();
    }
    tx.commit().await.unwrap();
    let settings = RunnerSettings {
        lease: Duration::from_millis(300),
        batch: 1,
        poll: Duration::from_millis(20),
        max_attempts: 2,
        retry_backoff: Duration::from_millis(10),
    };
    let handler = Arc::new(External::default());
    let (mut running, shutdown) = Running::new();
    for _ in 0..2 {
        let runner = Runner::new(db.clone(), settings.clone()).handle_external("send", handler.clone());
        running.tasks.spawn(runner.run(shutdown.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while jobs::counts(&db).await.unwrap() != (0, 1) {
        assert!(Instant::now() < deadline, "jobs left: {:?}", jobs::counts(&db).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    running.stop().await;
    let runs = handler.0.lock().unwrap().clone();
    let of = |key: &str| runs.iter().filter(|(k, _)| k == key).map(|(_, a)| *a).collect::<Vec<i64>>();
    assert_eq!(of("done"), [1]);
    assert_eq!(of("later"), [1, 1], "rescheduled by the handler, its count started over");
    assert_eq!(of("broken"), [1, 2], "retried, then kept as failed");
    assert_eq!(of("slow").len(), 2, "taken over after its lease");
    assert_eq!(jobs::counts(&db).await.unwrap(), (0, 1), "only the failed one stays");
}

/// Relay upkeep on a large outbox: published rows past retention are pruned in publication
/// order, batch after batch, while those no group has read yet and within retention stay; the
/// backlog gauge counts what waits, one by one up to 10,000 and from positions above.
async fn upkeep_prunes_and_counts_a_large_outbox(db: TestDb) {
    let db = open(&db).await;
    // A source of its own (per database), so that no other relay sets its gauges.
    let source: &'static str = Box::leak(format!("upkeep-{}", unique_stream_prefix()).into_boxed_str());
    let events = Events::embedded(
        &Suite::new(&[]),
        Settings {
            external_groups: vec![(source.into(), GROUP.into())],
            retention: Duration::from_secs(3600),
            batch: 2_000,
            ..settings(&unique_stream_prefix())
        },
    );
    let outbox = events.outbox(source, &db);
    let relay = events.relay(&outbox, &db);
    let backlog = || {
        let labels = crm_kit::metrics::EventLabels { source: source.to_string() };
        crm_kit::metrics::metrics().events.outbox_backlog.get_or_create(&labels).get()
    };
    produce(&db, &outbox, "big", 10_500, 1_500).await;
    relay.maintain().await.unwrap();
    assert_eq!(backlog(), 10_500, "a backlog above 10,000 is the span of its positions");
    produce(&db, &outbox, "more", 1_700, 1_700).await;
    while relay.publish_round().await.unwrap() != Round::Published(0) {}
    relay.maintain().await.unwrap();
    assert_eq!(backlog(), 0);
    assert_eq!(outbox_rows(&db).await, 12_200, "the group has read nothing, and all are within retention");
    // The first 11,000 by number pass the retention window: two full batches and a part.
    let old = crm_kit::time::now_micros() - 2 * 3600 * 1_000_000;
    let mut aged = Sql::new("UPDATE outbox SET created_at = ");
    aged.bind(old).push(" WHERE seq <= ").bind(11_000_i64);
    aged.query().execute(db.pool()).await.unwrap();
    relay.maintain().await.unwrap();
    let left =
        Sql::new("SELECT MIN(seq) AS first, COUNT(*) AS n FROM outbox").query().fetch_one(db.pool()).await.unwrap();
    assert_eq!((left.get::<i64, _>("first"), left.get::<i64, _>("n")), (11_001, 1_200));
    // The last, appended with an earlier clock (another replica's), waits while the oldest is
    // not due, and goes with it.
    let mut skewed = Sql::new("UPDATE outbox SET created_at = ");
    skewed.bind(old).push(" WHERE seq = ").bind(12_200_i64);
    skewed.query().execute(db.pool()).await.unwrap();
    relay.maintain().await.unwrap();
    assert_eq!(outbox_rows(&db).await, 1_200);
    let mut due = Sql::new("UPDATE outbox SET created_at = ");
    due.bind(old).push(" WHERE seq < ").bind(12_200_i64);
    due.query().execute(db.pool()).await.unwrap();
    relay.maintain().await.unwrap();
    assert_eq!(outbox_rows(&db).await, 0);
    // Fewer than 10,000 waiting are counted one by one (a rolled-back append takes no place).
    let mut tx = db.begin_write().await.unwrap();
    outbox.append(&mut tx, "rolled-back", "tester", &Envelope::default()).await.unwrap();
    tx.rollback().await.unwrap();
    produce(&db, &outbox, "few", 30, 7).await;
    relay.maintain().await.unwrap();
    assert_eq!(backlog(), 30);
}

crm_kit::both_backends!(
    upkeep_prunes_and_counts_a_large_outbox,
    external_jobs_finish_reschedule_and_fail,
    outbox_follows_the_transaction,
    delivers_each_event_once_embedded,
    delivers_each_event_once_through_redis,
    dead_letters_are_parked_and_retried,
    survives_redis_losing_its_data,
    racing_relays_and_consumers,
    jobs_fire_once,
);
