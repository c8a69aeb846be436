//! `crm bench tasks`: the tasks service's calls in one process, through its API (validation,
//! data scope, SQL), on a database of realistic volume — a million activity records of a
//! thousand users in departments of 200 over a year, tasks and events of their own — and the
//! lag between a reminder's due time and its event when reminders come due at a steady rate
//! under the real job runner.
//!
//! The organisation is a stand-in ([`crate::bench_inproc::Org`]: a department's first user
//! heads it and sees its 200 users); the rest is the service's own code.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crm_kit::auth::ScopeCache;
use crm_kit::db::{Backend, Sql, Tx};
use crm_kit::events::HandlerError;
use crm_kit::jobs::{Job, JobHandler, Runner, RunnerSettings};
use crm_proto::tasks::v1::tasks_service_server::TasksService;
use crm_proto::tasks::v1::*;
use crm_tasks::store::REMINDER_JOB;
use crm_tasks::{Store, TasksApi};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use rand::Rng;

use crate::bench_inproc::{NoCustomers, Org, department, histogram, ms, request, timed, user};

/// What the bench's users may do.
const PERMISSIONS: [&str; 2] = [crm_tasks::permissions::READ.name, crm_tasks::permissions::WRITE.name];

#[derive(clap::Args, Debug)]
pub struct TasksBenchArgs {
    /// A tasks database for the bench (postgres://… or sqlite://…), migrated if needed. Its
    /// activity records are topped up to `--activities`; tasks and events are added each run.
    #[arg(long)]
    database_url: String,
    /// Activity records the database should hold.
    #[arg(long, default_value_t = 1_000_000)]
    activities: u64,
    /// Users the records, tasks and events belong to.
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Users per department (the first of each heads it).
    #[arg(long, default_value_t = 200)]
    department_size: u64,
    /// Days back the activity records spread over.
    #[arg(long, default_value_t = 365)]
    days: u64,
    /// Tasks to create (timed), each with a reminder.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Meetings to plan (timed), each with two colleagues.
    #[arg(long, default_value_t = 5_000)]
    events: u64,
    /// Calls of each read to time.
    #[arg(long, default_value_t = 2_000)]
    reads: u64,
    /// Reminders coming due at `--reminder-rate` per minute, their lag timed.
    #[arg(long, default_value_t = 1_000)]
    reminders: u64,
    #[arg(long, default_value_t = 1_000)]
    reminder_rate: u64,
    /// Calls in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

/// Tops the activity records up to `args.activities`, in transactions of 5,000, then has the
/// database gather statistics.
async fn seed(store: &Store, org: &Org, args: &TasksBenchArgs) -> anyhow::Result<()> {
    let have = store.count_activity_records().await? as u64;
    if have < args.activities {
        let started = Instant::now();
        let now = crm_kit::time::now_micros();
        let span = (args.days.max(1) * 86_400_000_000) as i64;
        let mut left = args.activities - have;
        let mut rng = rand::rng();
        println!("seeding {left} activity records over {} users and {} days…", args.users, args.days);
        while left > 0 {
            let n = left.min(5_000);
            let batch: Vec<Activity> = (0..n)
                .map(|_| {
                    let author = rng.random_range(0..args.users);
                    let at = now - rng.random_range(0..span);
                    let kind = rng.random_range(1..=6);
                    Activity {
                        id: crm_kit::id::new(),
                        r#type: kind,
                        summary: format!("Follow-up {}", rng.random_range(0..100_000)),
                        occur_time: crm_kit::time::to_timestamp(at),
                        time_zone: "UTC".into(),
                        author_id: user(author),
                        department_id: department(org.department_of(author)),
                        occur_date: crm_tasks::domain::local_date(at, chrono_tz::Tz::UTC),
                        ..Default::default()
                    }
                })
                .collect();
            store.load_activities(&batch).await?;
            left -= n;
            let done = args.activities - have - left;
            if done.is_multiple_of(100_000) || left == 0 {
                println!("  {done} in {:.0?}", started.elapsed());
            }
        }
        // Statistics for the planner, and on PostgreSQL the visibility map too: per-day counts
        // are index-only scans, which read the table for pages not yet marked all-visible (as
        // autovacuum marks an insert-heavy table's in steady state; right after a bulk load,
        // every page: 23k heap reads, 213 ms, against 40 ms once vacuumed).
        let analyze = match store.db().backend() {
            Backend::Postgres => "VACUUM ANALYZE activities",
            Backend::Sqlite => "ANALYZE",
        };
        Sql::new(analyze).query().execute(store.db().pool()).await?;
    }
    println!("{} activity records", store.count_activity_records().await?);
    Ok(())
}

/// Reminder jobs timed from their due time to their effect (the event committed right after).
struct TimedReminders {
    inner: crm_tasks::jobs::ReminderJob,
    tasks: HashSet<String>,
    lags: Mutex<Histogram<u64>>,
}

impl JobHandler for TimedReminders {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.inner.run(tx, job).await?;
            let task = job.key.as_deref().and_then(|k| k.split('/').next()).unwrap_or_default();
            if self.tasks.contains(task) {
                let lag = (crm_kit::time::now_micros() - job.due_at).max(1) as u64;
                let _ = self.lags.lock().expect("lags").record(lag);
            }
            Ok(())
        })
    }
}

pub async fn run(args: TasksBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.users >= 3 && args.department_size >= 3, "--users and --department-size must be at least 3");
    let db = crm_kit::db::Db::open(&args.database_url, 16, &crm_tasks::store::migrations(), "tasks")
        .await
        .context("open the tasks database")?;
    let store = Store::new(db);
    let org = Org { users: args.users, size: args.department_size };
    seed(&store, &org, &args).await?;
    let scopes = ScopeCache::new(Arc::new(org.clone()), Duration::from_secs(600));
    let api =
        TasksApi::new(store.clone(), scopes, Arc::new(org.clone()), Arc::new(NoCustomers), Duration::from_secs(86_400));
    let now = crm_kit::time::now_micros();
    let hour = 3_600_000_000_i64;
    let pick = |i: u64| (i.wrapping_mul(2_654_435_761)) % args.users;
    println!();

    timed("CreateTask (with a reminder)", args.tasks, args.concurrency, |i| {
        let api = api.clone();
        let owner = pick(i);
        let principal = org.principal(owner, &PERMISSIONS);
        async move {
            let due = now + hour + (i as i64 % (30 * 24)) * hour;
            let task = Task {
                title: format!("Follow up on offer {i}"),
                due_time: crm_kit::time::to_timestamp(due),
                reminders: vec![prost_types::Duration { seconds: 1_800, nanos: 0 }],
                ..Default::default()
            };
            api.create_task(request(&principal, CreateTaskRequest { task: Some(task), request_id: String::new() }))
                .await
                .map(|_| ())
        }
    })
    .await?;
    timed("ListTasks: my open tasks by due time", args.reads, args.concurrency, |i| {
        let api = api.clone();
        let owner = pick(i * 7 + 3);
        let principal = org.principal(owner, &PERMISSIONS);
        async move {
            let filter = format!("assignee_id = \"{}\" AND status = OPEN", user(owner));
            api.list_tasks(request(&principal, ListTasksRequest { filter, ..Default::default() })).await.map(|_| ())
        }
    })
    .await?;
    timed("CreateEvent (two colleagues)", args.events, args.concurrency, |i| {
        let api = api.clone();
        let owner = pick(i * 13 + 1);
        let principal = org.principal(owner, &PERMISSIONS);
        let d = org.department_of(owner);
        let colleague =
            |k: u64| user(org.head_of(d) + (owner + k) % args.department_size.min(args.users - org.head_of(d)));
        let attendees = vec![colleague(1), colleague(2)];
        async move {
            let start = now + (i as i64 % (14 * 24)) * hour;
            let event = CalendarEvent {
                title: format!("Meeting {i}"),
                start_time: crm_kit::time::to_timestamp(start),
                end_time: crm_kit::time::to_timestamp(start + hour),
                attendee_ids: attendees,
                ..Default::default()
            };
            api.create_event(request(&principal, CreateEventRequest { event: Some(event), request_id: String::new() }))
                .await
                .map(|_| ())
        }
    })
    .await?;
    timed("GetAgenda: a week", args.reads, args.concurrency, |i| {
        let api = api.clone();
        let owner = pick(i * 5 + 2);
        let principal = org.principal(owner, &PERMISSIONS);
        async move {
            let r = GetAgendaRequest { days: 7, time_zone: "Europe/Berlin".into(), ..Default::default() };
            api.get_agenda(request(&principal, r)).await.map(|_| ())
        }
    })
    .await?;
    let departments = args.users.div_ceil(args.department_size);
    let today = crm_tasks::domain::today(chrono_tz::Tz::UTC);
    let start = today - chrono::Days::new(89);
    let days_found = Arc::new(Mutex::new(0_usize));
    timed("CountActivities: a department, 90 days", 50.min(args.reads), 1, |i| {
        let api = api.clone();
        let d = i % departments;
        let principal = org.principal(org.head_of(d), &PERMISSIONS);
        let days_found = days_found.clone();
        async move {
            let r = CountActivitiesRequest {
                start_date: start.format("%Y-%m-%d").to_string(),
                end_date: today.format("%Y-%m-%d").to_string(),
                department_id: department(d),
                ..Default::default()
            };
            let days = api.count_activities(request(&principal, r)).await?.into_inner().days;
            *days_found.lock().expect("days") = days.len();
            Ok(())
        }
    })
    .await?;
    println!("  (the last answer held {} user-days)", days_found.lock().expect("days"));

    // Reminders coming due at a steady rate, run by the real runner.
    let spacing = 60_000_000 / args.reminder_rate.max(1) as i64;
    let lead = 10_000_000_i64 + args.reminders as i64 * 2_000;
    let first = crm_kit::time::now_micros() + lead;
    let principal = org.principal(1, &PERMISSIONS);
    let ids = Arc::new(Mutex::new(HashSet::new()));
    let made = Instant::now();
    let mut creates = futures_util::stream::iter(0..args.reminders)
        .map(|i| {
            let api = api.clone();
            let principal = principal.clone();
            let ids = ids.clone();
            async move {
                let fires = first + i as i64 * spacing;
                let task = Task {
                    title: format!("Reminder {i}"),
                    due_time: crm_kit::time::to_timestamp(fires + 60_000_000),
                    reminders: vec![prost_types::Duration { seconds: 60, nanos: 0 }],
                    ..Default::default()
                };
                let request = request(&principal, CreateTaskRequest { task: Some(task), request_id: String::new() });
                let task = api.create_task(request).await?.into_inner();
                ids.lock().expect("ids").insert(task.id);
                Ok::<(), tonic::Status>(())
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    while let Some(result) = creates.next().await {
        result.map_err(|s| anyhow::anyhow!("create a reminder's task: {}", s.message()))?;
    }
    anyhow::ensure!(
        crm_kit::time::now_micros() < first,
        "creating the reminders' tasks took {:.1?}, past the first reminder: use fewer --reminders",
        made.elapsed()
    );
    let tasks = std::mem::take(&mut *ids.lock().expect("ids"));
    let timing = Arc::new(TimedReminders {
        inner: crm_tasks::jobs::ReminderJob::new(store.clone()),
        tasks,
        lags: Mutex::new(histogram()),
    });
    let runner = Runner::new(store.db().clone(), RunnerSettings::default()).handle(REMINDER_JOB, timing.clone());
    let (trigger, shutdown) = crm_kit::shutdown::channel();
    let running = tokio::spawn(runner.run(shutdown));
    let last = first + args.reminders as i64 * spacing;
    println!(
        "\n{} reminders due at {}/min over {:.0?} (runner polls every 250 ms)…",
        args.reminders,
        args.reminder_rate,
        Duration::from_micros((last - first) as u64)
    );
    let deadline =
        Instant::now() + Duration::from_micros((last - crm_kit::time::now_micros()).max(0) as u64 + 60_000_000);
    while timing.lags.lock().expect("lags").len() < args.reminders && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    trigger.fire();
    let _ = running.await;
    let lags = timing.lags.lock().expect("lags");
    println!(
        "{:<44} {:>7} fired   p50 {:>10}   p99 {:>10}   max {:>10}",
        "reminder due → TaskReminderDue committed",
        lags.len(),
        ms(lags.value_at_quantile(0.5)),
        ms(lags.value_at_quantile(0.99)),
        ms(lags.max())
    );
    anyhow::ensure!(lags.len() == args.reminders, "{} of {} reminders fired", lags.len(), args.reminders);
    Ok(())
}
