//! Consumers: durable groups whose handlers have one effect per event, and listeners that hear
//! every event in every process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_proto::events::v1::Envelope;
use futures_util::future::BoxFuture;
use prost::Message;
use sqlx::Row;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::redis::{self as streams, Entry};
use super::{Events, Transport, embedded, envelope};
use crate::ApiError;
use crate::db::{Db, Sql, Tx};
use crate::metrics::{GroupLabels, metrics};
use crate::shutdown::Shutdown;
use crate::time::now_micros;

/// Why a handler failed: kept as the dead letter's last error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// An event as a consumer gets it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub envelope: Envelope,
    /// Its publication number in its source.
    pub seq: i64,
    /// Whether it was delivered before (to a consumer that may have died with it).
    pub redelivered: bool,
}

impl Delivered {
    /// The payload as `E`; `None` when the event is of another type.
    pub fn payload<E: prost::Name + Message + Default>(&self) -> Option<Result<E, prost::DecodeError>> {
        envelope::payload(&self.envelope)
    }
}

/// What a consuming service does with events: its effect, written in `tx`, commits together
/// with the mark that the event was handled. An error rolls both back; the event is tried
/// again later, and parked as a dead letter after the last attempt. Events of types it does not
/// know are simply `Ok`.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Several events (a batch read together, none handled before) in one transaction: a
    /// handler that can do its work with set-based statements overrides this; by default each
    /// is handled in turn. An error rolls the whole batch back, which is then handled one event
    /// at a time.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Delivered],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for event in events {
                self.handle(tx, event).await?;
            }
            Ok(())
        })
    }
}

/// What handling one event came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Handled,
    /// Handled before: no second effect.
    Duplicate,
    DeadLettered,
}

const READ_COUNT: usize = 500;
const BLOCK: Duration = Duration::from_millis(500);
const UPKEEP_EVERY: Duration = Duration::from_secs(2);

/// A durable consumer group: every replica of the consuming service runs one, and each event
/// goes to one of them.
pub struct Consumer {
    events: Events,
    name: String,
    /// This process's consumer name within the group.
    member: String,
    db: Db,
    sources: Vec<String>,
    handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("group", &self.name).field("sources", &self.sources).finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(events: Events, name: &str, db: Db, sources: &[&str], handler: Arc<dyn Handler>) -> Consumer {
        let member = format!("{}-{}", std::process::id(), &crate::id::new()[24..]);
        for source in sources {
            metrics().events.init_group(source, name);
        }
        Consumer {
            events,
            name: name.to_string(),
            member,
            db,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            handler,
        }
    }

    /// Consumes until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        let mut tasks = tokio::task::JoinSet::new();
        match this.events.transport().clone() {
            Transport::Redis(bus) => {
                let (this, shutdown) = (this.clone(), shutdown.clone());
                tasks.spawn(async move { this.run_redis(bus, shutdown).await });
            }
            Transport::Embedded => {
                for source in this.sources.clone() {
                    let (this, shutdown) = (this.clone(), shutdown.clone());
                    tasks.spawn(async move { this.run_embedded(&source, shutdown).await });
                }
            }
        }
        let upkeep = {
            let (this, shutdown) = (this.clone(), shutdown.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.clone().wait() => break,
                        _ = tokio::time::sleep(UPKEEP_EVERY) => {}
                    }
                    if let Err(err) = this.upkeep(&shutdown).await {
                        tracing::warn!(consumer = %this.name, error = %err, "consumer upkeep failed");
                    }
                }
            }
        };
        tasks.spawn(upkeep);
        while tasks.join_next().await.is_some() {}
    }

    async fn run_redis(&self, bus: super::redis::Bus, shutdown: Shutdown) {
        let keys: Vec<String> = self.sources.iter().map(|s| self.events.settings().stream_key(s)).collect();
        let mut conn = match bus.blocking(BLOCK) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::error!(consumer = %self.name, error = %err, "cannot use Redis");
                return;
            }
        };
        let claim_after = self.events.settings().claim_after;
        let claim_every = (claim_after / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut claimed_at = Instant::now() - claim_every;
        let mut failures = 0u32;
        while !shutdown.is_fired() {
            let round = async {
                if claimed_at.elapsed() >= claim_every {
                    claimed_at = Instant::now();
                    for key in &keys {
                        loop {
                            let (entries, gone) =
                                streams::claim(&mut conn, key, &self.name, &self.member, claim_after, READ_COUNT)
                                    .await?;
                            streams::ack(&mut conn, key, &self.name, &gone).await?;
                            if entries.is_empty() {
                                break;
                            }
                            self.handle_entries(&mut conn, entries, true, &keys, &shutdown).await?;
                        }
                    }
                }
                let entries =
                    streams::read_group(&mut conn, &self.name, &self.member, &keys, READ_COUNT, BLOCK).await?;
                self.handle_entries(&mut conn, entries, false, &keys, &shutdown).await
            };
            let result = tokio::select! {
                _ = shutdown.clone().wait() => break,
                result = round => result,
            };
            match result {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures += 1;
                    if streams::is_no_group(&err) {
                        tracing::debug!(consumer = %self.name, "consumer group not created yet; waiting for the relay");
                    } else {
                        tracing::warn!(consumer = %self.name, error = %err, "reading events failed; retrying");
                    }
                    let wait = super::backoff(Duration::from_millis(100), failures, Duration::from_secs(2));
                    tokio::select! {
                        _ = shutdown.clone().wait() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn handle_entries(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        entries: Vec<Entry>,
        redelivered: bool,
        keys: &[String],
        shutdown: &Shutdown,
    ) -> Result<(), redis::RedisError> {
        let incoming: Vec<Incoming> = entries
            .iter()
            .map(|entry| {
                let seq = streams::seq_of(&entry.id).unwrap_or(0);
                let source = keys.iter().position(|k| *k == entry.key).map_or("", |i| self.sources[i].as_str());
                let event = match entry.envelope.as_deref().map(Envelope::decode) {
                    Some(Ok(envelope)) => Some(Delivered { envelope, seq, redelivered }),
                    _ => {
                        tracing::error!(consumer = %self.name, id = %entry.id, "undecodable event entry; dropped");
                        None
                    }
                };
                Incoming { event, source: source.to_string() }
            })
            .collect();
        // What is not done (stopping) stays pending and goes to another consumer.
        let done = self.process_all(incoming, shutdown).await;
        let mut acks: Vec<(&str, Vec<&str>)> = Vec::new();
        for entry in &entries[..done] {
            match acks.iter_mut().find(|(k, _)| *k == entry.key) {
                Some((_, ids)) => ids.push(&entry.id),
                None => acks.push((&entry.key, vec![&entry.id])),
            }
        }
        for (key, ids) in acks {
            streams::ack(conn, key, &self.name, &ids).await?;
        }
        Ok(())
    }

    /// Handles events in order, all in one transaction when every handler succeeds (one commit
    /// for the lot), else one by one with retries and dead letters. Returns how many from the
    /// start are done (all, unless stopped).
    async fn process_all(&self, incoming: Vec<Incoming>, shutdown: &Shutdown) -> usize {
        let decoded = incoming.iter().filter(|i| i.event.is_some()).count();
        if decoded > 1 && !shutdown.is_fired() {
            match self.try_batch(&incoming).await {
                Ok(outcomes) => {
                    for (item, outcome) in incoming.iter().filter(|i| i.event.is_some()).zip(outcomes) {
                        self.count(item, outcome);
                    }
                    return incoming.len();
                }
                Err(Failure::Store(err)) => {
                    tracing::debug!(consumer = %self.name, error = %err, "batch not committed; one by one");
                }
                Err(Failure::Handler(err)) => {
                    tracing::debug!(consumer = %self.name, error = %err, "a handler failed in a batch; one by one");
                }
            }
        }
        let mut done = 0;
        for item in incoming {
            if let Some(event) = item.event
                && self.process(event, &item.source, shutdown).await.is_none()
            {
                return done;
            }
            done += 1;
        }
        done
    }

    async fn try_batch(&self, incoming: &[Incoming]) -> Result<Vec<Outcome>, Failure> {
        let events: Vec<&Delivered> = incoming.iter().filter_map(|i| i.event.as_ref()).collect();
        let mut tx = self.db.begin_write().await.map_err(|e| Failure::Store(e.into()))?;
        // Every processed mark in one statement; the events whose mark is new have their effect.
        let mut marks = Sql::new("INSERT INTO processed_events (consumer, event_id, processed_at) VALUES ");
        let now = now_micros();
        marks.push_values(&events, |v, event| {
            v.bind(self.name.as_str()).bind(event.envelope.id.as_str()).bind(now);
        });
        marks.push(" ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id");
        let rows = marks.query().fetch_all(&mut *tx).await.map_err(|e| Failure::Store(e.into()))?;
        let mut fresh = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            fresh.insert(row.try_get::<String, _>("event_id").map_err(|e| Failure::Store(e.into()))?);
        }
        let mut outcomes = Vec::with_capacity(events.len());
        let mut handled: Vec<&Delivered> = Vec::with_capacity(events.len());
        for event in events {
            // An event delivered twice in one read has its effect once.
            if fresh.remove(&event.envelope.id) {
                handled.push(event);
                outcomes.push(Outcome::Handled);
            } else {
                outcomes.push(Outcome::Duplicate);
            }
        }
        // Each event's handling is a span in its producer's trace; the batch's shared work runs
        // in a span under the first of them, linked to the others'.
        let event_spans: Vec<tracing::Span> =
            handled.iter().map(|event| envelope::handler_span(&self.name, &event.envelope)).collect();
        let first = event_spans.first().and_then(|s| s.id());
        let span = tracing::info_span!(parent: first, "handle events", consumer = %self.name, events = handled.len());
        for other in event_spans.iter().skip(1) {
            span.add_link(opentelemetry::trace::TraceContextExt::span(&other.context()).span_context().clone());
        }
        if let Err(err) = self.handler.handle_batch(&mut tx, &handled).instrument(span).await {
            let _ = tx.rollback().await;
            return Err(Failure::Handler(err));
        }
        tx.commit().await.map_err(|e| Failure::Store(e.into()))?;
        Ok(outcomes)
    }

    /// The processed mark and, unless it was there already, the handler's effect, in `tx`.
    async fn handle_in(&self, tx: &mut Tx, event: &Delivered) -> Result<Outcome, Failure> {
        let mut mark = Sql::new("INSERT INTO processed_events (consumer, event_id, processed_at) VALUES (");
        mark.bind(self.name.as_str()).push(", ").bind(event.envelope.id.as_str()).push(", ").bind(now_micros());
        mark.push(") ON CONFLICT (consumer, event_id) DO NOTHING");
        let done = mark.query().execute(&mut **tx).await.map_err(|e| Failure::Store(e.into()))?;
        if done.rows_affected() == 0 {
            return Ok(Outcome::Duplicate);
        }
        self.handler.handle(tx, event).await.map_err(Failure::Handler)?;
        Ok(Outcome::Handled)
    }

    fn count(&self, item: &Incoming, outcome: Outcome) {
        let labels = GroupLabels { source: item.source.clone(), consumer: self.name.clone() };
        let events = &metrics().events;
        if item.event.as_ref().is_some_and(|e| e.redelivered) {
            events.redelivered.get_or_create(&labels).inc();
        }
        let counter = if outcome == Outcome::Duplicate { &events.duplicates } else { &events.consumed };
        counter.get_or_create(&labels).inc();
    }

    async fn run_embedded(&self, source: &str, shutdown: Shutdown) {
        let local = tokio::select! {
            _ = shutdown.clone().wait() => return,
            local = self.events.wait_local(source) => local,
        };
        let mut cursor = loop {
            // A group reading through the database is known to the relay by its cursor: from the
            // first read on, the events after it are kept for the group.
            let read = async {
                let cursor = embedded::cursor(&local.db, &self.name).await?;
                embedded::advance(&local.db, &self.name, cursor).await?;
                Ok::<i64, ApiError>(cursor)
            };
            match read.await {
                Ok(cursor) => break cursor,
                Err(err) => {
                    tracing::warn!(consumer = %self.name, source, error = %err, "reading the event cursor failed");
                    tokio::select! {
                        _ = shutdown.clone().wait() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let poll = self.events.settings().poll;
        let mut redelivered = true; // what follows a stored cursor may have been handled
        while !shutdown.is_fired() {
            let published = local.published.notified();
            let rows = match embedded::read_after(&local.db, cursor, READ_COUNT as i64).await {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::warn!(consumer = %self.name, source, error = %err, "reading events failed; retrying");
                    tokio::select! {
                        _ = shutdown.clone().wait() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if rows.is_empty() {
                redelivered = false;
                tokio::select! {
                    _ = shutdown.clone().wait() => return,
                    _ = published => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                continue;
            }
            let seqs: Vec<i64> = rows.iter().map(|(seq, _)| *seq).collect();
            let incoming: Vec<Incoming> = rows
                .into_iter()
                .map(|(seq, bytes)| {
                    let event = match Envelope::decode(bytes.as_slice()) {
                        Ok(envelope) => Some(Delivered { envelope, seq, redelivered }),
                        Err(err) => {
                            tracing::error!(consumer = %self.name, source, seq, error = %err, "undecodable event; dropped");
                            None
                        }
                    };
                    Incoming { event, source: source.to_string() }
                })
                .collect();
            let done = self.process_all(incoming, &shutdown).await;
            let last = if done > 0 { seqs[done - 1] } else { cursor };
            if last > cursor {
                cursor = last;
                if let Err(err) = embedded::advance(&local.db, &self.name, cursor).await {
                    tracing::warn!(consumer = %self.name, source, error = %err, "saving the event cursor failed");
                }
            }
        }
    }

    /// Handles one event: its effect and the processed mark in one transaction, retried with
    /// back-off, parked as a dead letter after the last attempt. `None` when stopped first.
    async fn process(&self, event: Delivered, source: &str, shutdown: &Shutdown) -> Option<Outcome> {
        self.process_with(event, source, shutdown, false).await
    }

    async fn process_with(&self, event: Delivered, source: &str, shutdown: &Shutdown, retry: bool) -> Option<Outcome> {
        let span = envelope::handler_span(&self.name, &event.envelope);
        let labels = GroupLabels { source: source.to_string(), consumer: self.name.clone() };
        let events = &metrics().events;
        if event.redelivered {
            events.redelivered.get_or_create(&labels).inc();
        }
        let settings = self.events.settings();
        let mut attempt = 0u32;
        let mut unavailable = 0u32;
        loop {
            if shutdown.is_fired() {
                return None;
            }
            match self.try_once(&event, retry).instrument(span.clone()).await {
                Ok(outcome) => {
                    let counter = if outcome == Outcome::Duplicate { &events.duplicates } else { &events.consumed };
                    counter.get_or_create(&labels).inc();
                    return Some(outcome);
                }
                Err(Failure::Store(err)) => {
                    // The consumer's own database: not the event's fault; wait, do not count.
                    unavailable += 1;
                    tracing::warn!(parent: &span, consumer = %self.name, error = %err, "consumer database unavailable");
                    let wait = super::backoff(settings.retry_backoff, unavailable, Duration::from_secs(5));
                    tokio::select! {
                        _ = shutdown.clone().wait() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(Failure::Handler(err)) => {
                    attempt += 1;
                    tracing::warn!(parent: &span, consumer = %self.name, attempt, error = %err, "event handler failed");
                    if attempt >= settings.max_attempts {
                        match self.park(&event, source, attempt, &err).await {
                            Ok(()) => {
                                events.dead_lettered.get_or_create(&labels).inc();
                                tracing::error!(parent: &span, consumer = %self.name, event = %event.envelope.id,
                                    error = %err, "event parked as a dead letter");
                                return Some(Outcome::DeadLettered);
                            }
                            Err(store) => {
                                tracing::warn!(consumer = %self.name, error = %store, "parking a dead letter failed");
                                attempt -= 1;
                            }
                        }
                    }
                    let wait =
                        super::backoff(settings.retry_backoff, attempt.saturating_sub(1), Duration::from_secs(10));
                    tokio::select! {
                        _ = shutdown.clone().wait() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn try_once(&self, event: &Delivered, retry: bool) -> Result<Outcome, Failure> {
        let mut tx = self.db.begin_write().await.map_err(|e| Failure::Store(e.into()))?;
        if retry {
            // A retried dead letter goes with the effect (or stays, when the handler fails again).
            let mut delete = Sql::new("DELETE FROM dead_letters WHERE consumer = ");
            delete.bind(self.name.as_str()).push(" AND event_id = ").bind(event.envelope.id.as_str());
            delete.query().execute(&mut *tx).await.map_err(|e| Failure::Store(e.into()))?;
        }
        let outcome = match self.handle_in(&mut tx, event).await {
            Ok(outcome) => outcome,
            Err(err) => {
                let _ = tx.rollback().await;
                return Err(err);
            }
        };
        // A duplicate commits too: it keeps a retried dead letter's removal.
        tx.commit().await.map_err(|e| Failure::Store(e.into()))?;
        Ok(outcome)
    }

    async fn park(&self, event: &Delivered, source: &str, attempts: u32, err: &HandlerError) -> Result<(), ApiError> {
        let mut sql = Sql::new(
            "INSERT INTO dead_letters (consumer, event_id, source, event_type, envelope, attempts, last_error, \
             failed_at, retry_requested_at) VALUES ",
        );
        let error: String = err.to_string().chars().take(2000).collect();
        sql.push_values([event], |v, event| {
            v.bind(self.name.as_str()).bind(event.envelope.id.as_str()).bind(source);
            v.bind(event.envelope.r#type.as_str()).bind(event.envelope.encode_to_vec()).bind(i64::from(attempts));
            v.bind(error.as_str()).bind(now_micros()).bind(0_i64);
        });
        sql.push(
            " ON CONFLICT (consumer, event_id) DO UPDATE SET attempts = dead_letters.attempts + excluded.attempts, \
             last_error = excluded.last_error, failed_at = excluded.failed_at, retry_requested_at = 0",
        );
        sql.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// Runs the dead letters an operator asked to retry, and forgets processed marks older than
    /// the retention window (no event comes back after it).
    /// A retry cut short by `shutdown` stays requested, for the next start.
    async fn upkeep(&self, shutdown: &Shutdown) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT event_id, source, envelope FROM dead_letters WHERE consumer = ");
        sql.bind(self.name.as_str()).push(" AND retry_requested_at > 0 ORDER BY failed_at LIMIT 100");
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        for row in rows {
            let id: String = row.try_get("event_id")?;
            let source: String = row.try_get("source")?;
            let bytes: Vec<u8> = row.try_get("envelope")?;
            match Envelope::decode(bytes.as_slice()) {
                Ok(envelope) => {
                    let event = Delivered { envelope, seq: 0, redelivered: true };
                    let Some(outcome) = self.process_with(event, &source, shutdown, true).await else {
                        return Ok(());
                    };
                    tracing::info!(consumer = %self.name, event = %id, ?outcome, "dead letter retried");
                }
                Err(err) => {
                    tracing::error!(consumer = %self.name, event = %id, error = %err, "undecodable dead letter dropped")
                }
            }
        }
        let horizon =
            now_micros() - (self.events.settings().retention + Duration::from_secs(86_400)).as_micros() as i64;
        let mut prune = Sql::new("DELETE FROM processed_events WHERE consumer = ");
        prune.bind(self.name.as_str()).push(" AND processed_at < ").bind(horizon);
        prune.query().execute(self.db.pool()).await?;
        Ok(())
    }
}

enum Failure {
    Store(ApiError),
    Handler(HandlerError),
}

/// An entry read, decoded (`None`: undecodable, skipped) and the source it came from.
struct Incoming {
    event: Option<Delivered>,
    source: String,
}

/// Hears every event of one source in this process, from the moment it starts (for in-memory
/// state such as caches; an event missed while Redis is away is not made up for).
pub struct Listener {
    events: Events,
    source: String,
    on_event: Arc<dyn Fn(&Delivered) + Send + Sync>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Listener {
    pub(crate) fn new(events: Events, source: &str, on_event: Arc<dyn Fn(&Delivered) + Send + Sync>) -> Listener {
        Listener { events, source: source.to_string(), on_event }
    }

    pub async fn run(self, shutdown: Shutdown) {
        match self.events.transport().clone() {
            Transport::Redis(bus) => self.run_redis(bus, shutdown).await,
            Transport::Embedded => self.run_embedded(shutdown).await,
        }
    }

    fn deliver(&self, seq: i64, bytes: &[u8]) {
        match Envelope::decode(bytes) {
            Ok(envelope) => {
                let event = Delivered { envelope, seq, redelivered: false };
                let span = envelope::handler_span("listener", &event.envelope);
                span.in_scope(|| (self.on_event)(&event));
            }
            Err(err) => tracing::error!(source = %self.source, seq, error = %err, "undecodable event; skipped"),
        }
    }

    async fn run_redis(&self, bus: super::redis::Bus, shutdown: Shutdown) {
        let key = self.events.settings().stream_key(&self.source);
        let Ok(mut conn) = bus.blocking(BLOCK) else { return };
        let mut after: Option<String> = None;
        let mut failures = 0u32;
        while !shutdown.is_fired() {
            let round = async {
                let from = match &after {
                    Some(id) => id.clone(),
                    None => streams::entry_id(streams::last_seq(&mut conn, &key).await?),
                };
                after = Some(from.clone());
                streams::read_after(&mut conn, &key, &from, READ_COUNT, BLOCK).await
            };
            let result = tokio::select! {
                _ = shutdown.clone().wait() => break,
                result = round => result,
            };
            match result {
                Ok(entries) => {
                    failures = 0;
                    for entry in entries {
                        let seq = streams::seq_of(&entry.id).unwrap_or(0);
                        if let Some(bytes) = &entry.envelope {
                            self.deliver(seq, bytes);
                        }
                        after = Some(entry.id);
                    }
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(source = %self.source, error = %err, "listening for events failed; retrying");
                    let wait = super::backoff(Duration::from_millis(100), failures, Duration::from_secs(2));
                    tokio::select! {
                        _ = shutdown.clone().wait() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn run_embedded(&self, shutdown: Shutdown) {
        let local = tokio::select! {
            _ = shutdown.clone().wait() => return,
            local = self.events.wait_local(&self.source) => local,
        };
        let mut after: Option<i64> = None;
        while !shutdown.is_fired() {
            let published = local.published.notified();
            let from = match after {
                Some(seq) => Ok(seq),
                None => embedded::last_seq(&local.db).await,
            };
            let rows = match from {
                Ok(from) => {
                    after = Some(from);
                    embedded::read_after(&local.db, from, READ_COUNT as i64).await
                }
                Err(err) => Err(err),
            };
            match rows {
                Ok(rows) if !rows.is_empty() => {
                    for (seq, bytes) in rows {
                        self.deliver(seq, &bytes);
                        after = Some(seq);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(source = %self.source, error = %err, "listening for events failed; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.clone().wait() => return,
                _ = published => {}
                _ = tokio::time::sleep(self.events.settings().poll) => {}
            }
        }
    }
}
