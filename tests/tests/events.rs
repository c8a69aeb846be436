//! Fault tests of the events backbone and leased jobs with real processes (SPEC X2): producers,
//! consumers, runners and Redis are killed (SIGKILL) or frozen while events flow, and every test
//! ends by counting effects exactly — every committed event's effect seen once, nothing lost.
//!
//! - `cluster_events_survive_kills_and_races`: two contacts replicas (two relays racing) publish
//!   through a Redis of the test's own to three members of a consumer group (`events-probe`);
//!   both producers are killed between commit and publish, a consumer is killed mid-stream, and
//!   Redis is restarted empty;
//! - `dev_events_survive_kill_9`: `crm dev` (SQLite, no Redis) killed and restarted while a
//!   consumer reads its outbox, and the consumer killed and restarted;
//! - `jobs_fire_once_across_processes`: 1,000 jobs due within seconds, three runner processes,
//!   one killed mid-way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crm_kit::db::{Db, Migrations, Sql};
use crm_kit::events::admin;
use crm_kit::testing::TestDb;
use crm_proto::contacts::v1::{CreatePersonRequest, Email, Person};
use crm_tests::*;
use sqlx::Row;

const PROBE: &str = env!("CARGO_BIN_EXE_events-probe");
const CREATED: &str = "crm.contacts.v1.ContactCreated";

/// People created through the gateway by a few concurrent writers until stopped; failures (a
/// replica being down) are counted and retried.
struct Load {
    created: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    async fn start(addr: SocketAddr, writers: usize) -> Load {
        let token = sign_in(addr, ADMIN_EMAIL, ADMIN_PASSWORD).await.expect("the administrator signs in").access_token;
        let (created, failed, stop) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writers {
            let mut contacts = contacts_as(addr, &token).await;
            let (created, failed, stop) = (created.clone(), failed.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let id = uuid::Uuid::now_v7().simple().to_string();
                    let person = Person {
                        full_name: format!("Load {}", &id[20..]),
                        emails: vec![Email { address: format!("{id}@load.example"), ..Default::default() }],
                        ..Default::default()
                    };
                    let request = CreatePersonRequest { person: Some(person), request_id: String::new() };
                    match tokio::time::timeout(Duration::from_secs(10), contacts.create_person(request)).await {
                        Ok(Ok(_)) => {
                            created.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        Load { created, failed, stop, tasks }
    }

    /// Waits until `more` people beyond the current count are created.
    async fn wait_more(&self, more: usize) {
        let target = self.created.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.created.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the load stalled at {} people", self.created.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        while self.tasks.join_next().await.is_some() {}
        (self.created.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

fn probe_migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

/// Starts a consumer group member; `transport` is `--redis-url …` or `--source-database-url …`.
fn start_probe(name: &str, database_url: &str, transport: &[&str]) -> Process {
    let mut args = vec!["consume", "--group", "probe", "--source", "contacts", "--database-url", database_url];
    args.extend(transport);
    Process::start_program(Path::new(PROBE), name, &args, &[])
}

/// Every person in the contacts database.
async fn people_ids(contacts_url: &str) -> Vec<String> {
    let db = Db::connect(contacts_url, 2).await.expect("contacts database");
    let rows = Sql::new("SELECT id FROM people").query().fetch_all(db.pool()).await.unwrap();
    db.close().await;
    rows.iter().map(|r| r.get::<String, _>("id")).collect()
}

/// Effects of `event_type` per subject, and the ids of events with more than one effect.
async fn effects(probe_url: &str, event_type: &str) -> (HashMap<String, i64>, Vec<String>) {
    let db = Db::connect(probe_url, 2).await.expect("probe database");
    let mut sql = Sql::new("SELECT subject, COUNT(*) AS n FROM probe_effects WHERE event_type = ");
    sql.bind(event_type).push(" GROUP BY subject");
    let rows = sql.query().fetch_all(db.pool()).await.unwrap();
    let counts = rows.iter().map(|r| (r.get::<String, _>("subject"), r.get::<i64, _>("n"))).collect();
    let twice = Sql::new("SELECT event_id FROM probe_effects GROUP BY event_id HAVING COUNT(*) > 1")
        .query()
        .fetch_all(db.pool())
        .await
        .unwrap();
    db.close().await;
    (counts, twice.iter().map(|r| r.get::<String, _>("event_id")).collect())
}

/// Waits until every subject has an effect of `event_type`, then checks each has exactly one.
async fn assert_exactly_once(probe_url: &str, event_type: &str, subjects: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let (counts, twice) = loop {
        let (counts, twice) = effects(probe_url, event_type).await;
        if subjects.iter().all(|s| counts.contains_key(s)) || Instant::now() > deadline {
            break (counts, twice);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing = subjects.iter().filter(|s| !counts.contains_key(*s)).count();
    assert_eq!(missing, 0, "{missing} of {} committed events had no effect", subjects.len());
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "subjects with more than one effect: {repeated:?}");
    assert!(twice.is_empty(), "events with more than one effect: {twice:?}");
    assert_eq!(counts.len(), subjects.len(), "effects for subjects that were never committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_events_survive_kills_and_races() {
    let mut redis = RedisServer::start().await;
    let on_redis = vec!["--redis-url".to_string(), redis.url()];
    let mut contacts_flags = on_redis.clone();
    contacts_flags.extend(["--events-external-group".to_string(), "contacts:probe".to_string()]);
    let mut cluster = Cluster::start(ClusterConfig {
        replicas: vec![("contacts", 2)],
        flags: vec![("auth", on_redis.clone()), ("contacts", contacts_flags), ("gateway", on_redis)],
        ..ClusterConfig::default()
    })
    .await;
    let probe_db = TestDb::postgres().await;
    let redis_url = redis.url();
    let transport = ["--redis-url", &redis_url, "--stream-prefix", &cluster.stream_prefix, "--claim-after", "1s"];
    let mut probes: Vec<Process> =
        (0..3).map(|i| start_probe(&format!("probe-{i}"), probe_db.url(), &transport)).collect();
    let contacts_db = cluster.database_url("contacts").to_string();
    let load = Load::start(cluster.gateway, 4).await;
    load.wait_more(60).await;

    // Both producers killed between commit and publish: Redis frozen, changes keep committing
    // into the outbox, then the processes die with events unpublished.
    redis.process.signal("STOP");
    let contacts = Db::connect(&contacts_db, 2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin::outbox_status(&contacts).await.unwrap().unpublished < 20 {
        assert!(Instant::now() < deadline, "changes stopped committing while Redis was frozen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..2 {
        cluster.process("contacts", i).kill();
    }
    let stranded = admin::outbox_status(&contacts).await.unwrap().unpublished;
    assert!(stranded >= 20, "killed with {stranded} committed events unpublished");
    redis.process.signal("CONT");
    for i in 0..2 {
        let addr = cluster.replica("contacts", i);
        let process = cluster.process("contacts", i);
        process.restart();
        process.wait_serving(addr, CONTACTS_SERVICE).await;
    }
    load.wait_more(60).await;

    // A consumer killed mid-stream: what it held goes to the others after the claim time.
    probes[0].kill();
    load.wait_more(30).await;
    probes[0].restart();
    load.wait_more(30).await;

    // Redis restarted empty while events flow: the relays publish again what was not
    // acknowledged, the consumers drop what they had.
    redis.restart_empty().await;
    load.wait_more(60).await;
    let (created, failed) = load.stop().await;

    let people = people_ids(&contacts_db).await;
    assert!(people.len() >= created, "{} people stored, {created} creations acknowledged", people.len());
    assert_exactly_once(probe_db.url(), CREATED, &people).await;
    println!("{} people created ({failed} calls failed while replicas were down), each handled once", people.len());
    // Everything is published again: the relay may still be waiting out its back-off from
    // publishing while Redis was away (5 s at most, and jitter), every event being handled.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = admin::outbox_status(&contacts).await.unwrap();
    while status.unpublished > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = admin::outbox_status(&contacts).await.unwrap();
    }
    assert_eq!(status.unpublished, 0, "{status:?}");
    contacts.close().await;
    // Operators see it: the relay's figures on /metrics, the group's lag through `crm events`.
    let (_, metrics) = http_get(cluster.replica("contacts", 0), "/metrics").await;
    for line in ["crm_events_published_total{source=\"contacts\"}", "crm_events_outbox_backlog{source=\"contacts\"}"] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let args = ["events", "status", "contacts", "--database-url", &contacts_db, "--redis-url", &redis_url];
        let out = std::process::Command::new(crm_bin())
            .args(args)
            .args(["--events-stream-prefix", &cluster.stream_prefix])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("consumer group probe: 0 not delivered, 0 not acknowledged") {
            break;
        }
        assert!(Instant::now() < deadline, "the probe group's lag does not drain: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(probes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_events_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("crm-data");
    let addr = free_addr();
    let mut dev = start_dev("dev", &data_dir, addr, &[("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD)]).await;
    let contacts_url = format!("sqlite://{}", data_dir.join("contacts.db").display());
    let probe_url = format!("sqlite://{}", data.path().join("probe.db").display());
    let mut probe = start_probe("probe", &probe_url, &["--source-database-url", &contacts_url]);
    let load = Load::start(addr, 2).await;
    load.wait_more(60).await;

    dev.kill();
    dev.restart();
    for service in served_services() {
        dev.wait_serving(addr, service).await;
    }
    load.wait_more(60).await;
    probe.kill();
    load.wait_more(30).await;
    probe.restart();
    load.wait_more(30).await;
    let (created, _) = load.stop().await;

    let people = people_ids(&contacts_url).await;
    assert!(people.len() >= created);
    assert_exactly_once(&probe_url, CREATED, &people).await;
    let status = crm_output(&["events", "status", "contacts", "--database-url", &contacts_url]);
    assert!(status.contains("0 unpublished"), "{status}");
    assert!(status.contains("consumer group probe: 0 not delivered"), "{status}");

    // A consumer whose downstream is out parks what it cannot handle; an operator retries
    // once it is back, with `crm events`, and each event has its effect once.
    let outage = data.path().join("outage");
    std::fs::write(&outage, b"").unwrap();
    let failing_url = format!("sqlite://{}", data.path().join("failing.db").display());
    let fail_while = outage.display().to_string();
    let args = ["consume", "--group", "failing", "--source", "contacts", "--database-url", &failing_url];
    let transport = ["--source-database-url", &contacts_url, "--fail-while", &fail_while, "--max-attempts", "2"];
    let _failing = Process::start_program(Path::new(PROBE), "failing", &[&args[..], &transport[..]].concat(), &[]);
    let load = Load::start(addr, 1).await;
    load.wait_more(3).await;
    load.stop().await;
    let latest: Vec<String> = people_ids(&contacts_url).await.into_iter().filter(|id| !people.contains(id)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed =
            crm_output(&["events", "dead-letters", "failing", "--limit", "100000", "--database-url", &failing_url]);
        let parked = latest.iter().filter(|id| listed.contains(&format!("about {id}"))).count();
        if parked == latest.len() {
            assert!(
                listed.contains("the downstream system is unavailable") && listed.contains("2 attempts"),
                "{listed}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the new people's events were not parked: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything this group read failed: the new people's events and any older ones it found
    // still kept for the other group.
    let failing = Db::connect(&failing_url, 1).await.unwrap();
    let parked: Vec<String> =
        admin::dead_letters(&failing, 10_000).await.unwrap().into_iter().map(|l| l.subject).collect();
    failing.close().await;
    assert!(latest.iter().all(|id| parked.contains(id)));
    std::fs::remove_file(&outage).unwrap();
    let retried = crm_output(&["events", "retry", "failing", "--all", "--database-url", &failing_url]);
    assert!(retried.contains(&format!("{} dead letter(s) will be handled again", parked.len())), "{retried}");
    assert_exactly_once(&failing_url, CREATED, &parked).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !crm_output(&["events", "dead-letters", "failing", "--database-url", &failing_url])
        .contains("no dead letters")
    {
        assert!(Instant::now() < deadline, "dead letters left after the retry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `crm <args>` to completion and returns what it printed; it must succeed.
fn crm_output(args: &[&str]) -> String {
    let out = std::process::Command::new(crm_bin()).args(args).output().expect("run crm");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "crm {args:?} failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_fire_once_across_processes() {
    let test_db = TestDb::postgres().await;
    let db = Db::open(test_db.url(), 4, &probe_migrations(), "jobs-test").await.unwrap();
    let now = crm_kit::time::now_micros();
    let mut keys = Vec::new();
    let mut tx = db.begin_write().await.unwrap();
    for i in 0..1000 {
        let key = format!("job-{i}");
        crm_kit::jobs::schedule(&mut tx, "fire", Some(&key), now + (i % 30) * 100_000, b"").await.unwrap();
        keys.push(key);
    }
    tx.commit().await.unwrap();
    let mut runners: Vec<Process> = (0..3)
        .map(|i| {
            let args = ["jobs", "--database-url", test_db.url(), "--lease", "2s", "--work", "5ms"];
            Process::start_program(Path::new(PROBE), &format!("runner-{i}"), &args, &[])
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while effects(test_db.url(), "fire").await.0.len() < 300 {
        assert!(Instant::now() < deadline, "jobs are not running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runners[0].kill();
    let deadline = Instant::now() + Duration::from_secs(90);
    while crm_kit::jobs::counts(&db).await.unwrap() != (0, 0) {
        assert!(Instant::now() < deadline, "jobs left: {:?}", crm_kit::jobs::counts(&db).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_exactly_once(test_db.url(), "fire", &keys).await;
    drop(runners);
    db.close().await;
}
