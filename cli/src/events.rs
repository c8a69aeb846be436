//! `crm events …`: what operators check and do about a service's events, straight on its
//! database (and Redis), like `crm migrate`: the outbox backlog, how far each consumer group
//! is, jobs, dead letters, and retrying them (the running consumers pick the retry up).

use anyhow::Context;
use crm_kit::db::Db;
use crm_kit::events::{STREAM_PREFIX, admin};

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(clap::Args, Debug)]
struct Target {
    /// The service whose database to look at (its name also names its Redis stream).
    #[arg(value_name = "SERVICE")]
    role: String,
    /// Its database URL (postgres://… or sqlite://…).
    #[arg(long, value_name = "URL", env = "CRM_DATABASE_URL")]
    database_url: String,
}

#[derive(clap::Subcommand, Debug)]
enum EventsCommand {
    /// Outbox backlog, consumer groups' lag, waiting and failed jobs, dead letters.
    Status {
        #[command(flatten)]
        target: Target,
        /// The Redis carrying the events (without it: the groups reading through the database).
        #[arg(long, value_name = "URL", env = "CRM_REDIS_URL")]
        redis_url: Option<String>,
        #[arg(long, value_name = "PREFIX", env = "CRM_EVENTS_STREAM_PREFIX", default_value = STREAM_PREFIX)]
        events_stream_prefix: String,
    },
    /// The events this service's consumers gave up on, with their last error.
    DeadLetters {
        #[command(flatten)]
        target: Target,
        /// Most to list, oldest first.
        #[arg(long, default_value = "100")]
        limit: i64,
    },
    /// Asks the running consumers to handle dead letters again: one by its event id, or all.
    Retry {
        #[command(flatten)]
        target: Target,
        /// The dead letter's event id.
        #[arg(value_name = "EVENT_ID", required_unless_present = "all", conflicts_with = "all")]
        event_id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

async fn open(target: &Target) -> anyhow::Result<Db> {
    let db = Db::connect(&target.database_url, 1)
        .await
        .with_context(|| format!("open the {} database {}", target.role, crm_kit::db::redact(&target.database_url)))?;
    Ok(db)
}

fn age(duration: std::time::Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 1.0 { format!("{:.0} ms", secs * 1000.0) } else { format!("{secs:.1} s") }
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    match args.command {
        EventsCommand::Status { target, redis_url, events_stream_prefix } => {
            let db = open(&target).await?;
            let outbox = admin::outbox_status(&db).await.context("read the outbox (is the database migrated?)")?;
            println!("{} events", target.role);
            println!(
                "  outbox: {} unpublished{}, {} published and kept for consumer groups, last number {}",
                outbox.unpublished,
                outbox.oldest_unpublished.map(|a| format!(" (oldest {})", age(a))).unwrap_or_default(),
                outbox.retained,
                outbox.last_seq
            );
            let key = format!("{events_stream_prefix}{}", target.role);
            let redis = redis_url.as_deref().filter(|u| !u.is_empty()).map(|u| (u, key.as_str()));
            let groups = admin::groups(&db, redis).await.map_err(|e| anyhow::anyhow!("consumer groups: {e}"))?;
            if groups.is_empty() {
                println!("  consumer groups: none");
            }
            for group in groups {
                println!(
                    "  consumer group {}: {} not delivered, {} not acknowledged",
                    group.group, group.lag, group.pending
                );
            }
            let (waiting, failed) = crm_kit::jobs::counts(&db).await?;
            println!("  jobs: {waiting} waiting, {failed} failed");
            let letters = admin::dead_letters(&db, i64::MAX).await?;
            println!("  dead letters: {}", letters.len());
            db.close().await;
        }
        EventsCommand::DeadLetters { target, limit } => {
            let db = open(&target).await?;
            let letters = admin::dead_letters(&db, limit.max(1)).await?;
            if letters.is_empty() {
                println!("no dead letters in the {} database", target.role);
            }
            for l in letters {
                println!(
                    "{}  {} about {}  from {}  consumer {}  {} attempts  failed {}{}\n    {}",
                    l.event_id,
                    l.event_type,
                    l.subject,
                    l.source,
                    l.consumer,
                    l.attempts,
                    crm_kit::time::format_rfc3339(l.failed_at),
                    if l.retry_requested { "  (retry asked)" } else { "" },
                    l.last_error
                );
            }
            db.close().await;
        }
        EventsCommand::Retry { target, event_id, all } => {
            let db = open(&target).await?;
            let marked = admin::retry(&db, if all { None } else { event_id.as_deref() }).await?;
            db.close().await;
            match (marked, event_id) {
                (0, Some(id)) if !all => anyhow::bail!("no dead letter {id} in the {} database", target.role),
                (n, _) => println!("{n} dead letter(s) will be handled again by the running consumers"),
            }
        }
    }
    Ok(())
}
