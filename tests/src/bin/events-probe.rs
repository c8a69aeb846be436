//! A consumer group member and a job runner built on kit's events backbone, as a service would
//! build them, with an effect the fault tests can count: run as separate processes so that they
//! can be killed (SIGKILL) mid-stream.
//!
//! `events-probe consume --group G --source contacts --database-url URL (--redis-url URL
//! --stream-prefix P | --source-database-url URL)`: one member of group G; each event leaves a
//! row in `probe_effects`, in the transaction kit commits with the event's processed mark.
//!
//! `events-probe jobs --database-url URL`: a runner of `fire` jobs; each run leaves a row.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use crm_kit::db::{Db, Migrations, Sql, Tx};
use crm_kit::events::{Delivered, Events, Handler, HandlerError, Settings};
use crm_kit::jobs::{Job, JobHandler, Runner, RunnerSettings};
use crm_kit::role::Suite;
use futures_util::future::BoxFuture;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consumes a source's events as a member of a group.
    Consume {
        #[arg(long)]
        group: String,
        #[arg(long)]
        source: String,
        /// The probe's own database.
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        redis_url: Option<String>,
        #[arg(long, default_value = crm_kit::events::STREAM_PREFIX)]
        stream_prefix: String,
        /// Without Redis: the producer's database, read through.
        #[arg(long)]
        source_database_url: Option<String>,
        #[arg(long, default_value = "1s", value_parser = crm_kit::config::parse_duration)]
        claim_after: Duration,
        /// Handling fails while this file exists (a downstream outage).
        #[arg(long)]
        fail_while: Option<std::path::PathBuf>,
        #[arg(long, default_value = "5")]
        max_attempts: u32,
    },
    /// Runs `fire` jobs.
    Jobs {
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value = "2s", value_parser = crm_kit::config::parse_duration)]
        lease: Duration,
        /// How long each job's work takes.
        #[arg(long, default_value = "5ms", value_parser = crm_kit::config::parse_duration)]
        work: Duration,
    },
}

fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

async fn effect(tx: &mut Tx, id: &str, kind: &str, subject: &str) -> Result<(), HandlerError> {
    let mut sql = Sql::new("INSERT INTO probe_effects (event_id, event_type, subject, worker) VALUES (");
    sql.bind(id).push(", ").bind(kind).push(", ").bind(subject).push(", ").bind(std::process::id().to_string());
    sql.push(")");
    sql.query().execute(&mut **tx).await?;
    Ok(())
}

struct Effects {
    fail_while: Option<std::path::PathBuf>,
}

impl Handler for Effects {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        let e = &event.envelope;
        if self.fail_while.as_ref().is_some_and(|f| f.exists()) {
            return Box::pin(async { Err("the downstream system is unavailable".into()) });
        }
        Box::pin(effect(tx, &e.id, &e.r#type, &e.subject))
    }
}

struct Fire(Duration);

impl JobHandler for Fire {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            tokio::time::sleep(self.0).await;
            effect(tx, &job.id, &job.kind, job.key.as_deref().unwrap_or_default()).await
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _telemetry = crm_kit::telemetry::init("events-probe", crm_kit::telemetry::LogFormat::Pretty);
    let (_trigger, shutdown) = crm_kit::shutdown::on_os_signal();
    match Cli::parse().command {
        Command::Consume {
            group,
            source,
            database_url,
            redis_url,
            stream_prefix,
            source_database_url,
            claim_after,
            fail_while,
            max_attempts,
        } => {
            let db = Db::open(&database_url, 4, &migrations(), "probe").await?;
            let settings = Settings {
                claim_after,
                max_attempts,
                retry_backoff: Duration::from_millis(20),
                poll: Duration::from_millis(20),
                external_groups: vec![(source.clone(), group.clone())],
                stream_prefix,
                ..Settings::default()
            };
            let events = match (redis_url, source_database_url) {
                (Some(url), _) => Events::redis(&Suite::new(&[]), &url, settings)?,
                (None, Some(url)) => {
                    let events = Events::embedded(&Suite::new(&[]), settings);
                    events.attach_source(&source, &Db::connect(&url, 2).await?);
                    events
                }
                (None, None) => return Err("give --redis-url or --source-database-url".into()),
            };
            let consumer = events.consumer(&group, &db, &[source.as_str()], Arc::new(Effects { fail_while }));
            println!("ready");
            consumer.run(shutdown).await;
        }
        Command::Jobs { database_url, lease, work } => {
            let db = Db::open(&database_url, 4, &migrations(), "probe").await?;
            let settings =
                RunnerSettings { lease, poll: Duration::from_millis(20), batch: 20, ..RunnerSettings::default() };
            println!("ready");
            Runner::new(db, settings).handle("fire", Arc::new(Fire(work))).run(shutdown).await;
        }
    }
    Ok(())
}
