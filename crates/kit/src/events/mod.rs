//! The events backbone (ARCHITECTURE §4, SPEC X2): what crosses services asynchronously.
//!
//! - [`Envelope`](crm_proto::events::v1::Envelope): id, type, source, subject, time, actor, trace
//!   context and the encoded event, built by [`envelope`];
//! - [`Outbox`]: a change writes its events into its own database's `outbox` table in the same
//!   transaction (`outbox.append(&mut tx, …)`): no event without its change, no change without
//!   its event;
//! - [`Relay`]: numbers committed rows in publication order (one relay at a time per source,
//!   whatever the number of replicas) and hands them to the transport; keeps them until every
//!   consumer group has them, so a Redis that comes back empty loses nothing;
//! - transports: Redis Streams in a cluster (one stream per producing service, one consumer group
//!   per consuming service), or, embedded (`crm dev`, no Redis), consumers reading the producer's
//!   outbox through its database with a durable cursor;
//! - [`Consumer`]: a handler runs in the consumer's own transaction together with the
//!   `processed_events` mark, so a redelivered event has no second effect; failures are retried
//!   with back-off, then parked as dead letters ([`admin`]);
//! - [`Listener`]: every process of a service hears every event from now on (for in-memory
//!   caches), best effort;
//! - the leased jobs live beside, in [`crate::jobs`].
//!
//! Guarantee, in plain words: every committed event reaches every registered consumer group at
//! least once, and a consumer's effect happens once per event.

pub mod admin;
mod consumer;
mod embedded;
pub mod envelope;
mod outbox;
mod redis;
mod relay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

pub use consumer::{Consumer, Delivered, Handler, HandlerError, Listener};
pub use outbox::Outbox;
pub use relay::{Relay, Round};

use crate::db::Db;
use crate::role::{Error, Suite};

/// The prefix of the Redis streams' keys unless set otherwise.
pub const STREAM_PREFIX: &str = "crm:events:";

/// How the backbone behaves; `crm serve` and `crm dev` read it from flags ([`EventArgs`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often an idle relay looks for new outbox rows (a commit in this process wakes it
    /// sooner).
    pub poll: Duration,
    /// Most rows one relay round publishes.
    pub batch: usize,
    /// After how long without an acknowledgement an entry another consumer took is claimed.
    pub claim_after: Duration,
    /// How long published events are kept for a consumer group that has not acknowledged them.
    pub retention: Duration,
    /// How often a failing handler runs before its event is parked as a dead letter.
    pub max_attempts: u32,
    /// The first pause before a failed handler runs again (doubling each time).
    pub retry_backoff: Duration,
    /// Consumer groups outside the suite (`source:group`) whose events are kept until read.
    pub external_groups: Vec<(String, String)>,
    /// Prefix of the Redis streams' keys (`<prefix><source>`).
    pub stream_prefix: String,
}

impl Settings {
    /// The Redis stream `source` publishes to.
    pub fn stream_key(&self, source: &str) -> String {
        format!("{}{source}", self.stream_prefix)
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            poll: Duration::from_millis(100),
            batch: 500,
            claim_after: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(200),
            external_groups: Vec::new(),
            stream_prefix: STREAM_PREFIX.to_string(),
        }
    }
}

/// The backbone's settings, for every process (`crm serve`, `crm dev`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Events")]
pub struct EventArgs {
    /// Redis carrying events between processes (redis://host:6379/0). Without it, events go
    /// through the producers' databases, which needs every producer a role consumes from to run
    /// in the same process (as in `crm dev`).
    #[arg(long = "redis-url", value_name = "URL", env = "CRM_REDIS_URL")]
    pub redis_url: Option<String>,
    /// How long events are kept for a consumer group that has not acknowledged them.
    #[arg(long = "events-retention", value_name = "DURATION", env = "CRM_EVENTS_RETENTION", default_value = "7d",
          value_parser = crate::config::parse_duration)]
    pub retention: Duration,
    /// After how long without an acknowledgement an event a consumer took (and perhaps died
    /// with) goes to another consumer of its group.
    #[arg(long = "events-claim-after", value_name = "DURATION", env = "CRM_EVENTS_CLAIM_AFTER",
          default_value = "30s", value_parser = crate::config::parse_duration)]
    pub claim_after: Duration,
    /// How often a failing event handler runs before the event is parked as a dead letter.
    #[arg(long = "events-max-attempts", value_name = "N", env = "CRM_EVENTS_MAX_ATTEMPTS", default_value = "5",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Consumer groups outside the suite that read a source's Redis stream, as SOURCE:GROUP
    /// (comma-separated): the relay creates them and keeps events until they acknowledge.
    #[arg(
        long = "events-external-group",
        value_name = "SOURCE:GROUP",
        env = "CRM_EVENTS_EXTERNAL_GROUPS",
        value_delimiter = ','
    )]
    pub external_groups: Vec<String>,
    /// Prefix of the Redis streams' keys, `<prefix><service>`: lets several installations share
    /// one Redis.
    #[arg(long = "events-stream-prefix", value_name = "PREFIX", env = "CRM_EVENTS_STREAM_PREFIX",
          default_value = STREAM_PREFIX)]
    pub stream_prefix: String,
}

impl EventArgs {
    pub fn settings(&self) -> Result<Settings, Error> {
        let mut external_groups = Vec::new();
        for pair in self.external_groups.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            match pair.split_once(':') {
                Some((source, group)) if is_name(source) && is_name(group) => {
                    external_groups.push((source.to_string(), group.to_string()))
                }
                _ => {
                    return Err(format!(
                        "--events-external-group: {pair:?} is not SOURCE:GROUP (letters, digits, '-', '_', '.')"
                    )
                    .into());
                }
            }
        }
        if self.claim_after < Duration::from_millis(100) {
            return Err(format!("--events-claim-after must be at least 100ms, got {:?}", self.claim_after).into());
        }
        Ok(Settings {
            retention: self.retention,
            claim_after: self.claim_after,
            max_attempts: self.max_attempts,
            external_groups,
            stream_prefix: self.stream_prefix.clone(),
            ..Settings::default()
        })
    }

    /// The backbone of a process running roles of `suite`.
    pub fn events(&self, suite: &Suite) -> Result<Events, Error> {
        let settings = self.settings()?;
        match self.redis_url.as_deref().filter(|u| !u.trim().is_empty()) {
            Some(url) => Events::redis(suite, url, settings),
            None => Ok(Events::embedded(suite, settings)),
        }
    }
}

fn is_name(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Clone)]
pub(crate) enum Transport {
    Redis(redis::Bus),
    Embedded,
}

/// A producer opened in this process: its database and the signals of its outbox.
#[derive(Clone)]
pub(crate) struct Local {
    pub(crate) db: Db,
    /// Rung by the relay once rows are published.
    pub(crate) published: Arc<Notify>,
}

/// The backbone of one process: its transport, settings, the consumer groups each source
/// publishes for, and the producers opened here.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    settings: Settings,
    groups: HashMap<String, Vec<String>>,
    local: Mutex<HashMap<String, Local>>,
    changed: Notify,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("transport", &self.transport_name())
            .field("groups", &self.inner.groups)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Events between processes through Redis Streams at `url`.
    pub fn redis(suite: &Suite, url: &str, settings: Settings) -> Result<Events, Error> {
        let bus = redis::Bus::new(url)?;
        Ok(Events::with(suite, Transport::Redis(bus), settings))
    }

    /// Events through the producers' databases, without Redis.
    pub fn embedded(suite: &Suite, settings: Settings) -> Events {
        Events::with(suite, Transport::Embedded, settings)
    }

    fn with(suite: &Suite, transport: Transport, settings: Settings) -> Events {
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for role in suite.roles() {
            let spec = role.spec();
            for source in spec.consumes {
                groups.entry(source.to_string()).or_default().push(spec.name.to_string());
            }
        }
        for (source, group) in &settings.external_groups {
            let list = groups.entry(source.clone()).or_default();
            if !list.contains(group) {
                list.push(group.clone());
            }
        }
        Events {
            inner: Arc::new(Inner {
                transport,
                settings,
                groups,
                local: Mutex::new(HashMap::new()),
                changed: Notify::new(),
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The Redis server events travel through, if any (the gateway keeps its shared rate
    /// limits there too).
    pub fn redis_client(&self) -> Option<::redis::Client> {
        match &self.inner.transport {
            Transport::Redis(bus) => Some(bus.client()),
            Transport::Embedded => None,
        }
    }

    /// "redis" or "embedded".
    pub fn transport_name(&self) -> &'static str {
        match self.inner.transport {
            Transport::Redis(_) => "redis",
            Transport::Embedded => "embedded",
        }
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// The consumer groups that must get every event of `source`.
    pub fn groups(&self, source: &str) -> Vec<String> {
        self.inner.groups.get(source).cloned().unwrap_or_default()
    }

    /// The outbox of `source` whose database is `db`, known to this process from now on.
    pub fn outbox(&self, source: &'static str, db: &Db) -> Outbox {
        self.attach_source(source, db);
        Outbox::new(source)
    }

    /// Makes the outbox in `db` of a producer running elsewhere readable here (embedded
    /// transport only: a process reading another's database file).
    pub fn attach_source(&self, source: &str, db: &Db) {
        let local = Local { db: db.clone(), published: Arc::new(Notify::new()) };
        self.inner.local.lock().expect("events lock").insert(source.to_string(), local);
        self.inner.changed.notify_waiters();
    }

    pub(crate) fn local(&self, source: &str) -> Option<Local> {
        self.inner.local.lock().expect("events lock").get(source).cloned()
    }

    /// The producer `source` opened in this process, once it is.
    pub(crate) async fn wait_local(&self, source: &str) -> Local {
        let mut warned = false;
        loop {
            let changed = self.inner.changed.notified();
            if let Some(local) = self.local(source) {
                return local;
            }
            if !warned {
                tracing::info!(source, "waiting for the producer of these events to open in this process");
                warned = true;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    }

    /// Whether `consumer` can read every source it needs: without Redis, each must be opened in
    /// this process (one of `here`) or attached. The error names the first one that is not.
    pub fn check_sources(&self, consumer: &str, sources: &[&str], here: &[&str]) -> Result<(), Error> {
        if matches!(self.inner.transport, Transport::Redis(_)) {
            return Ok(());
        }
        for source in sources {
            if !here.contains(source) && self.local(source).is_none() {
                return Err(format!(
                    "{consumer} consumes the events of {source}, which does not run in this process: \
                     they will not reach it; set --redis-url (CRM_REDIS_URL) so that events travel \
                     between processes"
                )
                .into());
            }
        }
        Ok(())
    }

    /// The relay publishing `outbox` (a background job of the producing role).
    pub fn relay(&self, outbox: &Outbox, db: &Db) -> Relay {
        Relay::new(self.clone(), outbox.clone(), db.clone())
    }

    /// A durable consumer group `name` (the consuming service) over `sources`, handling events in
    /// transactions of `db`.
    pub fn consumer(&self, name: &str, db: &Db, sources: &[&str], handler: Arc<dyn Handler>) -> Consumer {
        Consumer::new(self.clone(), name, db.clone(), sources, handler)
    }

    /// Every event of `source` from now on, in this process (best effort: for caches).
    pub fn listener(&self, source: &str, on_event: impl Fn(&Delivered) + Send + Sync + 'static) -> Listener {
        Listener::new(self.clone(), source, Arc::new(on_event))
    }
}

/// Back-off with jitter: `base` doubled per attempt, at most `max`.
pub(crate) fn backoff(base: Duration, attempt: u32, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
    let delay = base.saturating_mul(factor).min(max);
    let jitter = rand::random_range(0..=delay.as_millis() as u64 / 4 + 1);
    delay + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_groups_are_checked() {
        let mut args = EventArgs {
            redis_url: None,
            retention: Duration::from_secs(60),
            claim_after: Duration::from_secs(1),
            max_attempts: 3,
            external_groups: vec!["contacts:warehouse".into()],
            stream_prefix: STREAM_PREFIX.into(),
        };
        assert_eq!(args.settings().unwrap().external_groups, vec![("contacts".to_string(), "warehouse".to_string())]);
        args.external_groups = vec!["contacts".into()];
        assert!(args.settings().unwrap_err().to_string().contains("SOURCE:GROUP"));
        args.external_groups = vec!["contacts:a b".into()];
        assert!(args.settings().is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 0, Duration::from_secs(5)) >= base);
        assert!(backoff(base, 3, Duration::from_secs(5)) >= Duration::from_millis(800));
        assert!(backoff(base, 30, Duration::from_secs(5)) <= Duration::from_millis(6300));
    }
}
