//! The relay: numbers committed outbox rows in publication order and publishes them; prunes
//! what every consumer group has; rebuilds a stream Redis lost.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;

use super::redis as streams;
use super::{Events, Outbox, Transport, embedded};
use crate::ApiError;
use crate::db::{Backend, Db, Sql};
use crate::metrics::{EventLabels, GroupLabels, metrics};
use crate::role::Error;
use crate::shutdown::Shutdown;
use crate::time::now_micros;

/// How often the relay looks at consumer groups, prunes and trims.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// Most rows pruned per statement, and the most a statement reads to find them.
const PRUNE_BATCH: i64 = 5_000;
/// Unpublished rows counted one by one for the backlog; above, it is the span of their
/// positions.
const BACKLOG_COUNTED: i64 = 10_000;

/// Publishes one producer's outbox; run it as a background job of the producing role. Several
/// replicas may run one each: they take turns, one round at a time.
pub struct Relay {
    events: Events,
    outbox: Outbox,
    db: Db,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("source", &self.outbox.source()).finish_non_exhaustive()
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Another relay of this source is in a round.
    Busy,
    /// Rows published (0: nothing to publish).
    Published(usize),
}

impl Relay {
    pub(crate) fn new(events: Events, outbox: Outbox, db: Db) -> Relay {
        Relay { events, outbox, db }
    }

    fn source(&self) -> &'static str {
        self.outbox.source()
    }

    /// Publishes until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let poll = self.events.settings().poll;
        let batch = self.events.settings().batch;
        let published = self.events.local(self.source()).map(|l| l.published);
        let this = Arc::new(self);
        // Upkeep runs beside publishing, so that publishing never waits for it.
        let upkeep = {
            let (this, shutdown) = (this.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    if let Err(err) = this.maintain().await {
                        tracing::warn!(source = this.source(), error = %err, "event relay upkeep failed");
                    }
                    tokio::select! {
                        _ = shutdown.clone().wait() => break,
                        _ = tokio::time::sleep(MAINTAIN_EVERY) => {}
                    }
                }
            })
        };
        this.publish_until(shutdown, poll, batch, published).await;
        let _ = upkeep.await;
    }

    async fn publish_until(
        &self,
        shutdown: Shutdown,
        poll: Duration,
        batch: usize,
        published: Option<Arc<tokio::sync::Notify>>,
    ) {
        let appended = self.outbox.appended();
        let mut quick: Option<Duration> = None;
        let mut failures = 0u32;
        loop {
            if shutdown.is_fired() {
                break;
            }
            match self.publish_round().await {
                Ok(Round::Published(n)) => {
                    failures = 0;
                    if n > 0 {
                        if let Some(published) = &published {
                            published.notify_waiters();
                        }
                        quick = Some(Duration::from_millis(1));
                        if n >= batch {
                            continue;
                        }
                    }
                }
                Ok(Round::Busy) => failures = 0,
                Err(err) => {
                    failures += 1;
                    tracing::warn!(source = self.source(), error = %err, "publishing events failed; retrying");
                    let wait = super::backoff(Duration::from_millis(100), failures, Duration::from_secs(5));
                    tokio::select! {
                        _ = shutdown.clone().wait() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            }
            let wait = quick.unwrap_or(poll);
            tokio::select! {
                _ = shutdown.clone().wait() => break,
                _ = appended.notified() => quick = Some(Duration::from_millis(1)),
                _ = tokio::time::sleep(wait) => quick = quick.map(|d| d * 2).filter(|d| *d < poll),
            }
        }
        // What committed before the stop goes out now rather than at the next start.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.publish_round()).await;
    }

    /// Publishes the oldest unpublished rows (one batch), numbering them after the last.
    pub async fn publish_round(&self) -> Result<Round, Error> {
        let batch = self.events.settings().batch as i64;
        let mut tx = self.db.begin_write().await?;
        let mut lock = Sql::new("SELECT last_seq FROM outbox_relay WHERE id = 1");
        if self.db.backend() == Backend::Postgres {
            lock.push(" FOR UPDATE SKIP LOCKED");
        }
        let Some(row) = lock.query().fetch_optional(&mut *tx).await? else {
            tx.rollback().await?;
            return Ok(Round::Busy);
        };
        let last_seq: i64 = row.try_get("last_seq")?;
        let mut sql = Sql::new("SELECT position, envelope FROM outbox WHERE seq IS NULL ORDER BY position");
        sql.limit(batch);
        let rows = sql.query().fetch_all(&mut *tx).await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(Round::Published(0));
        }
        let mut positions = Vec::with_capacity(rows.len());
        let mut envelopes = Vec::with_capacity(rows.len());
        for row in &rows {
            positions.push(row.try_get::<i64, _>("position")?);
            envelopes.push(row.try_get::<Vec<u8>, _>("envelope")?);
        }
        // Numbers keep the rows' order: seq = position + offset, all above the last.
        let mut offset = last_seq + 1 - positions[0];
        if let Transport::Redis(bus) = self.events.transport() {
            let key = self.events.settings().stream_key(self.source());
            let mut conn = bus.conn();
            let entries = |offset: i64| -> Vec<(i64, Vec<u8>)> {
                positions.iter().zip(&envelopes).map(|(p, e)| (p + offset, e.clone())).collect()
            };
            if let Err(err) = streams::publish(&mut conn, &key, &entries(offset)).await {
                if !streams::is_id_too_small(&err) {
                    return Err(err.into());
                }
                // A relay stopped between publishing and committing: number after what it sent.
                let top = streams::last_seq(&mut conn, &key).await?;
                offset = offset.max(top + 1 - positions[0]);
                streams::publish(&mut conn, &key, &entries(offset)).await?;
            }
        }
        let mut update = Sql::new("UPDATE outbox SET seq = position + ");
        update.bind(offset).push(" WHERE ");
        update.push_in("position", positions.iter().copied());
        update.query().execute(&mut *tx).await?;
        let mut counter = Sql::new("UPDATE outbox_relay SET last_seq = ");
        counter.bind(positions[positions.len() - 1] + offset).push(" WHERE id = 1");
        counter.query().execute(&mut *tx).await?;
        tx.commit().await?;
        metrics().events.published.get_or_create(&source_labels(self.source())).inc_by(rows.len() as u64);
        Ok(Round::Published(rows.len()))
    }

    /// Looks at the consumer groups: recreates what Redis lost (and publishes again what it
    /// held), prunes what every group has, trims the stream, reports backlog and lag.
    pub async fn maintain(&self) -> Result<(), Error> {
        let source = self.source();
        let groups = self.events.groups(source);
        let last_seq = embedded::last_seq(&self.db).await?;
        // Every row below this number is acknowledged by every group.
        let mut acked_below = last_seq + 1;
        match self.events.transport() {
            Transport::Redis(bus) => {
                let key = self.events.settings().stream_key(source);
                let mut conn = bus.conn();
                let states = streams::groups(&mut conn, &key).await?.unwrap_or_default();
                let missing: Vec<&String> = groups.iter().filter(|g| !states.iter().any(|s| &s.name == *g)).collect();
                if !missing.is_empty() {
                    for group in &missing {
                        streams::create_group(&mut conn, &key, group).await?;
                    }
                    let republished = self.republish().await?;
                    if republished > 0 {
                        tracing::warn!(
                            source,
                            groups = ?missing,
                            events = republished,
                            "consumer groups were missing from Redis (new, or Redis lost its data); publishing \
                             every event not yet acknowledged again"
                        );
                    }
                    return Ok(());
                }
                for state in states.iter().filter(|s| groups.contains(&s.name)) {
                    acked_below = acked_below.min(state.acked_below);
                    let labels = GroupLabels { source: source.to_string(), consumer: state.name.clone() };
                    metrics().events.consumer_lag.get_or_create(&labels).set(state.lag);
                    metrics().events.consumer_pending.get_or_create(&labels).set(state.pending);
                }
            }
            Transport::Embedded => {
                // The suite's groups, and every other group that has started reading.
                let cursors = embedded::cursors(&self.db).await?;
                let mut all = groups.clone();
                all.extend(cursors.iter().map(|(c, _)| c.clone()).filter(|c| !groups.contains(c)));
                for group in &all {
                    let at = cursors.iter().find(|(c, _)| c == group).map(|(_, s)| *s).unwrap_or(0);
                    acked_below = acked_below.min(at + 1);
                    let labels = GroupLabels { source: source.to_string(), consumer: group.clone() };
                    metrics().events.consumer_lag.get_or_create(&labels).set((last_seq - at).max(0));
                }
            }
        }
        self.prune(acked_below).await?;
        if let Transport::Redis(bus) = self.events.transport() {
            let oldest = Sql::new("SELECT MIN(seq) AS seq FROM outbox WHERE seq IS NOT NULL")
                .query()
                .fetch_one(self.db.pool())
                .await?
                .try_get::<Option<i64>, _>("seq")?;
            streams::trim_below(
                &mut bus.conn(),
                &self.events.settings().stream_key(source),
                oldest.unwrap_or(last_seq + 1),
            )
            .await?;
        }
        self.report_backlog().await
    }

    /// Marks every published row unpublished: the relay numbers and publishes them again.
    async fn republish(&self) -> Result<u64, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let mut lock = Sql::new("SELECT last_seq FROM outbox_relay WHERE id = 1");
        lock.push(self.db.for_update());
        lock.query().fetch_one(&mut *tx).await?;
        let done = Sql::new("UPDATE outbox SET seq = NULL WHERE seq IS NOT NULL").query().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Deletes published rows below `acked_below` and those older than the retention window.
    ///
    /// Upkeep runs every second, so each statement reads at most a batch of rows, whatever the
    /// outbox holds: the oldest published rows by number, and only when the oldest of all is
    /// due. A condition over every published row read them all (2M rows kept for groups that
    /// had not read them yet: half a second of the database's CPU every second). Rows are
    /// numbered in the order they were appended, so those past retention come first; one
    /// appended with an earlier clock (another replica's) than the oldest row may wait until
    /// that row is due.
    async fn prune(&self, acked_below: i64) -> Result<(), ApiError> {
        let expired = now_micros() - self.events.settings().retention.as_micros() as i64;
        let oldest = Sql::new("SELECT seq, created_at FROM outbox WHERE seq IS NOT NULL ORDER BY seq LIMIT 1")
            .query()
            .fetch_optional(self.db.pool())
            .await?;
        let Some(oldest) = oldest else { return Ok(()) };
        if oldest.try_get::<i64, _>("seq")? >= acked_below && oldest.try_get::<i64, _>("created_at")? >= expired {
            return Ok(());
        }
        loop {
            let mut sql = Sql::new(
                "DELETE FROM outbox WHERE position IN (SELECT position FROM (SELECT position, seq, created_at FROM \
                 outbox WHERE seq IS NOT NULL ORDER BY seq",
            );
            sql.limit(PRUNE_BATCH).push(") AS oldest WHERE seq < ").bind(acked_below);
            sql.push(" OR created_at < ").bind(expired).push(")");
            let done = sql.query().execute(self.db.pool()).await?;
            if done.rows_affected() < PRUNE_BATCH as u64 {
                return Ok(());
            }
        }
    }

    /// Sets the backlog gauges: rows not yet published and the age of the oldest. Up to
    /// [`BACKLOG_COUNTED`] rows are counted; a larger backlog (Redis away for a while) is the
    /// span of the positions waiting, which also counts those of rolled-back appends among
    /// them, so that this stays two index probes however far publishing fell behind.
    async fn report_backlog(&self) -> Result<(), Error> {
        let mut head = Sql::new(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest, MIN(position) AS first FROM (SELECT position, \
             created_at FROM outbox WHERE seq IS NULL ORDER BY position",
        );
        head.limit(BACKLOG_COUNTED + 1).push(") AS head");
        let row = head.query().fetch_one(self.db.pool()).await?;
        let mut count: i64 = row.try_get("n")?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        if count > BACKLOG_COUNTED {
            let first: i64 = row.try_get("first")?;
            let last: i64 = Sql::new("SELECT MAX(position) AS last FROM outbox WHERE seq IS NULL")
                .query()
                .fetch_one(self.db.pool())
                .await?
                .try_get::<Option<i64>, _>("last")?
                .unwrap_or(first);
            count = count.max(last - first + 1);
        }
        let labels = source_labels(self.source());
        metrics().events.outbox_backlog.get_or_create(&labels).set(count);
        let age = oldest.map(|t| (now_micros() - t).max(0) as f64 / 1e6).unwrap_or(0.0);
        metrics().events.outbox_oldest_age.get_or_create(&labels).set(age);
        Ok(())
    }
}

fn source_labels(source: &str) -> EventLabels {
    EventLabels { source: source.to_string() }
}
