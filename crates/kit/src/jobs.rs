//! Leased jobs (ARCHITECTURE §4): durable scheduled work — a reminder, a retry, a return to the
//! pool — that fires once however many replicas run.
//!
//! A job is a row of the service's `jobs` table (kind, optional key, due time, payload). Runners
//! claim due jobs with a lease (`UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)` on
//! PostgreSQL; SQLite has one writer), then run each in a transaction that first deletes the
//! job — only if the lease is still theirs — and then makes its effect: the effect and the
//! completion commit together or not at all. A runner killed mid-job leaves the lease to expire
//! and another runner takes the job; a handler that fails is tried again with back-off and kept
//! as failed (`dead`) after the last attempt.
//!
//! A job whose effect leaves the database (an e-mail, an HTTP call) cannot commit with it: an
//! [`ExternalJobHandler`] runs with no transaction open, under its lease, keeps its own record
//! of each attempt (so that an attempt cut short by a crash is recognised, not silently
//! repeated), and tells the runner whether it is done or when to run again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::Row;

use crate::ApiError;
use crate::db::{Backend, Db, Sql, Tx};
use crate::events::HandlerError;
use crate::shutdown::Shutdown;
use crate::time::now_micros;

/// A claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// This run included.
    pub attempts: i64,
    /// When it was due (microseconds since the epoch).
    pub due_at: i64,
    lease_until: i64,
}

/// Schedules a job of `kind` due at `due_at` (microseconds since the epoch), in `tx` (so that it
/// exists exactly when the change that asks for it commits). With a `key`, scheduling the same
/// kind and key again replaces the waiting job (its time and payload). Returns the job's id.
pub async fn schedule(
    tx: &mut Tx,
    kind: &str,
    key: Option<&str>,
    due_at: i64,
    payload: &[u8],
) -> Result<String, ApiError> {
    let id = crate::id::new();
    let mut sql = Sql::new("INSERT INTO jobs (id, kind, job_key, due_at, payload, created_at) VALUES (");
    sql.bind(id.as_str()).push(", ").bind(kind).push(", ");
    match key {
        Some(key) => sql.bind(key),
        None => sql.push("NULL"),
    };
    sql.push(", ").bind(due_at).push(", ").bind(payload).push(", ").bind(now_micros()).push(")");
    sql.push(
        " ON CONFLICT (kind, job_key) DO UPDATE SET due_at = excluded.due_at, payload = excluded.payload, \
         attempts = 0, dead = 0, last_error = '', lease_until = 0, leased_by = '' RETURNING id",
    );
    Ok(sql.query().fetch_one(&mut **tx).await?.try_get("id")?)
}

/// Schedules jobs of `kind` in one statement: each `(key, due_at, payload)` as [`schedule`]
/// would (a waiting job of the same kind and key is replaced).
pub async fn schedule_all(tx: &mut Tx, kind: &str, jobs: &[(&str, i64, &[u8])]) -> Result<(), ApiError> {
    let now = now_micros();
    for chunk in jobs.chunks(500) {
        let mut sql = Sql::new("INSERT INTO jobs (id, kind, job_key, due_at, payload, created_at) VALUES ");
        sql.push_values(chunk, |v, (key, due_at, payload)| {
            v.bind(crate::id::new()).bind(kind).bind(*key).bind(*due_at).bind(*payload).bind(now);
        });
        sql.push(
            " ON CONFLICT (kind, job_key) DO UPDATE SET due_at = excluded.due_at, payload = excluded.payload, \
             attempts = 0, dead = 0, last_error = '', lease_until = 0, leased_by = ''",
        );
        sql.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Cancels the waiting job of `kind` with `key`; whether there was one.
pub async fn cancel(tx: &mut Tx, kind: &str, key: &str) -> Result<bool, ApiError> {
    let mut sql = Sql::new("DELETE FROM jobs WHERE kind = ");
    sql.bind(kind).push(" AND job_key = ").bind(key);
    Ok(sql.query().execute(&mut **tx).await?.rows_affected() > 0)
}

/// Cancels the waiting jobs of these `(kind, key)`s in one statement (a change that replaces
/// what it had scheduled). Returns how many there were.
pub async fn cancel_all(tx: &mut Tx, jobs: &[(&str, &str)]) -> Result<u64, ApiError> {
    if jobs.is_empty() {
        return Ok(0);
    }
    let mut sql = Sql::new("DELETE FROM jobs WHERE (kind, job_key) IN (VALUES ");
    sql.push_values(jobs, |v, (kind, key)| {
        v.bind(*kind).bind(*key);
    });
    sql.push(")");
    Ok(sql.query().execute(&mut **tx).await?.rows_affected())
}

impl Job {
    /// Until when (microseconds since the epoch) the job is this runner's: an external effect
    /// must be over by then, or another runner takes the job.
    pub fn lease_until(&self) -> i64 {
        self.lease_until
    }
}

/// What a kind of job does: its effect, written in `tx`, commits with the job's completion.
pub trait JobHandler: Send + Sync + 'static {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// What an external job asks of the runner after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Finished (its effect happened, or will never happen): the job goes.
    Done,
    /// Run it again at this time (microseconds since the epoch), on its own schedule.
    RetryAt(i64),
}

/// A kind of job whose effect leaves the database: it runs with no transaction open, records
/// its own progress in `db`, and must finish before [`Job::lease_until`]. An error (its own
/// database unreachable, say) gives the job back with the runner's back-off, as for
/// [`JobHandler`].
pub trait ExternalJobHandler: Send + Sync + 'static {
    fn run<'a>(&'a self, db: &'a Db, job: &'a Job) -> BoxFuture<'a, Result<Next, HandlerError>>;
}

#[derive(Clone)]
enum Handling {
    InTransaction(Arc<dyn JobHandler>),
    External(Arc<dyn ExternalJobHandler>),
}

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// How long a claimed job is this runner's.
    pub lease: Duration,
    /// Most jobs claimed at once.
    pub batch: i64,
    /// How often an idle runner looks for due jobs.
    pub poll: Duration,
    /// Runs before a failing job is kept as failed.
    pub max_attempts: i64,
    /// First pause before a failed job runs again (doubling).
    pub retry_backoff: Duration,
}

impl Default for RunnerSettings {
    fn default() -> RunnerSettings {
        RunnerSettings {
            lease: Duration::from_secs(30),
            batch: 50,
            poll: Duration::from_millis(250),
            max_attempts: 10,
            retry_backoff: Duration::from_secs(1),
        }
    }
}

/// Runs the due jobs of the kinds it has handlers for.
pub struct Runner {
    db: Db,
    worker: String,
    settings: RunnerSettings,
    handlers: HashMap<String, Handling>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<&String> = self.handlers.keys().collect();
        f.debug_struct("Runner").field("worker", &self.worker).field("kinds", &kinds).finish_non_exhaustive()
    }
}

impl Runner {
    pub fn new(db: Db, settings: RunnerSettings) -> Runner {
        let worker = format!("{}-{}", std::process::id(), &crate::id::new()[24..]);
        Runner { db, worker, settings, handlers: HashMap::new() }
    }

    /// Runs jobs of `kind` with `handler`.
    pub fn handle(mut self, kind: &str, handler: Arc<dyn JobHandler>) -> Runner {
        crate::metrics::metrics().jobs.init(kind);
        self.handlers.insert(kind.to_string(), Handling::InTransaction(handler));
        self
    }

    /// Runs jobs of `kind` with an external `handler`.
    pub fn handle_external(mut self, kind: &str, handler: Arc<dyn ExternalJobHandler>) -> Runner {
        crate::metrics::metrics().jobs.init(kind);
        self.handlers.insert(kind.to_string(), Handling::External(handler));
        self
    }

    /// Runs due jobs until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let mut failures = 0u32;
        while !shutdown.is_fired() {
            let wait = match self.run_due(&shutdown).await {
                Ok(n) if n as i64 >= self.settings.batch => continue,
                Ok(_) => {
                    failures = 0;
                    self.settings.poll
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(worker = %self.worker, error = %err, "running jobs failed; retrying");
                    crate::events::backoff(Duration::from_millis(200), failures, Duration::from_secs(5))
                }
            };
            tokio::select! {
                _ = shutdown.clone().wait() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Claims the jobs due now and runs them; how many were claimed.
    pub async fn run_due(&self, shutdown: &Shutdown) -> Result<usize, ApiError> {
        let jobs = self.claim().await?;
        let claimed = jobs.len();
        for job in jobs {
            if shutdown.is_fired() {
                // Unstarted claims go back at once rather than after the lease.
                self.release(&job, None).await?;
                continue;
            }
            self.run_one(&job).await?;
        }
        Ok(claimed)
    }

    async fn claim(&self) -> Result<Vec<Job>, ApiError> {
        if self.handlers.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_micros();
        let mut sql = Sql::new("UPDATE jobs SET lease_until = ");
        sql.bind(now + self.settings.lease.as_micros() as i64).push(", leased_by = ").bind(self.worker.as_str());
        sql.push(", attempts = attempts + 1 WHERE id IN (SELECT id FROM jobs WHERE dead = 0 AND due_at <= ");
        sql.bind(now).push(" AND lease_until < ").bind(now).push(" AND ");
        sql.push_in("kind", self.handlers.keys().map(String::as_str));
        sql.push(" ORDER BY due_at").limit(self.settings.batch);
        if self.db.backend() == Backend::Postgres {
            sql.push(" FOR UPDATE SKIP LOCKED");
        }
        sql.push(") RETURNING id, kind, job_key, payload, attempts, due_at, lease_until");
        let mut tx = self.db.begin_write().await?;
        let rows = sql.query().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let mut jobs = rows
            .iter()
            .map(|r| {
                Ok(Job {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    key: r.try_get("job_key")?,
                    payload: r.try_get("payload")?,
                    attempts: r.try_get("attempts")?,
                    due_at: r.try_get("due_at")?,
                    lease_until: r.try_get("lease_until")?,
                })
            })
            .collect::<Result<Vec<Job>, ApiError>>()?;
        jobs.sort_by_key(|j| j.due_at);
        Ok(jobs)
    }

    async fn run_one(&self, job: &Job) -> Result<(), ApiError> {
        let handler = match self.handlers.get(&job.kind) {
            Some(Handling::InTransaction(handler)) => handler,
            Some(Handling::External(handler)) => return self.run_external(handler.as_ref(), job).await,
            None => return Ok(()),
        };
        let mut tx = self.db.begin_write().await?;
        let mut done = Sql::new("DELETE FROM jobs WHERE id = ");
        done.bind(job.id.as_str()).push(" AND leased_by = ").bind(self.worker.as_str());
        done.push(" AND lease_until = ").bind(job.lease_until);
        if done.query().execute(&mut *tx).await?.rows_affected() == 0 {
            // The lease ran out and another runner has the job.
            tx.rollback().await?;
            return Ok(());
        }
        let started = self.started(job);
        let result = {
            use tracing::Instrument;
            handler.run(&mut tx, job).instrument(job_span(job)).await
        };
        let outcome = match result {
            Ok(()) => {
                tx.commit().await?;
                "done"
            }
            Err(err) => {
                tx.rollback().await?;
                tracing::warn!(worker = %self.worker, job = %job.id, kind = %job.kind, attempts = job.attempts, error = %err, "job failed");
                self.release(job, Some(err.to_string())).await?;
                if self.is_last_attempt(job) { "dead" } else { "failed" }
            }
        };
        self.finished(job, started, outcome);
        Ok(())
    }

    /// Runs an external job outside any transaction, then removes it or reschedules it as the
    /// handler asks, if the lease is still this runner's.
    async fn run_external(&self, handler: &dyn ExternalJobHandler, job: &Job) -> Result<(), ApiError> {
        let started = self.started(job);
        let result = {
            use tracing::Instrument;
            handler.run(&self.db, job).instrument(job_span(job)).await
        };
        let outcome = match result {
            Ok(Next::Done) => {
                let mut done = Sql::new("DELETE FROM jobs WHERE id = ");
                done.bind(job.id.as_str()).push(" AND leased_by = ").bind(self.worker.as_str());
                done.push(" AND lease_until = ").bind(job.lease_until);
                done.query().execute(self.db.pool()).await?;
                "done"
            }
            Ok(Next::RetryAt(at)) => {
                // The handler keeps its own count and schedule; the runner's count starts over.
                let mut sql = Sql::new("UPDATE jobs SET lease_until = 0, leased_by = '', attempts = 0, due_at = ");
                sql.bind(at).push(" WHERE id = ").bind(job.id.as_str());
                sql.push(" AND leased_by = ")
                    .bind(self.worker.as_str())
                    .push(" AND lease_until = ")
                    .bind(job.lease_until);
                sql.query().execute(self.db.pool()).await?;
                "failed"
            }
            Err(err) => {
                tracing::warn!(worker = %self.worker, job = %job.id, kind = %job.kind, attempts = job.attempts, error = %err, "job failed");
                self.release(job, Some(err.to_string())).await?;
                if self.is_last_attempt(job) { "dead" } else { "failed" }
            }
        };
        self.finished(job, started, outcome);
        Ok(())
    }

    /// Counts a job's start (how late it is) and times it.
    fn started(&self, job: &Job) -> std::time::Instant {
        let kind = crate::metrics::JobKindLabels { kind: job.kind.clone() };
        let late = (now_micros() - job.due_at).max(0) as f64 / 1e6;
        crate::metrics::metrics().jobs.start_delay.get_or_create(&kind).observe(late);
        std::time::Instant::now()
    }

    /// Counts a run's outcome ("done", "failed", "dead") and duration.
    fn finished(&self, job: &Job, started: std::time::Instant, outcome: &'static str) {
        let metrics = &crate::metrics::metrics().jobs;
        let kind = crate::metrics::JobKindLabels { kind: job.kind.clone() };
        metrics.duration.get_or_create(&kind).observe(started.elapsed().as_secs_f64());
        let labels = crate::metrics::JobLabels { kind: job.kind.clone(), outcome };
        metrics.runs.get_or_create(&labels).inc();
    }

    /// Whether a failure of this run fails the job for good.
    fn is_last_attempt(&self, job: &Job) -> bool {
        job.attempts >= self.settings.max_attempts
    }

    /// Gives a claimed job back: failed (`error`), later or for good; or unstarted, at once.
    async fn release(&self, job: &Job, error: Option<String>) -> Result<(), ApiError> {
        let mut sql = Sql::new("UPDATE jobs SET lease_until = 0, leased_by = ''");
        match error {
            Some(error) => {
                let attempt = u32::try_from(job.attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                let delay = crate::events::backoff(self.settings.retry_backoff, attempt, Duration::from_secs(3600));
                sql.push(", last_error = ").bind(error.chars().take(2000).collect::<String>());
                sql.push(", due_at = ").bind(now_micros() + delay.as_micros() as i64);
                sql.push(", dead = ").bind(i64::from(self.is_last_attempt(job)));
            }
            None => {
                sql.push(", attempts = attempts - 1");
            }
        }
        sql.push(" WHERE id = ").bind(job.id.as_str()).push(" AND leased_by = ").bind(self.worker.as_str());
        sql.query().execute(self.db.pool()).await?;
        Ok(())
    }
}

fn job_span(job: &Job) -> tracing::Span {
    tracing::info_span!("job", otel.name = %format_args!("job {}", job.kind), job.id = %job.id, job.attempts = job.attempts)
}

/// How many jobs wait (due or not) and how many failed for good.
pub async fn counts(db: &Db) -> Result<(i64, i64), ApiError> {
    let row =
        Sql::new("SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN dead = 1 THEN 1 ELSE 0 END), 0) AS dead FROM jobs")
            .query()
            .fetch_one(db.pool())
            .await?;
    let (n, dead): (i64, i64) = (row.try_get("n")?, row.try_get("dead")?);
    Ok((n - dead, dead))
}
