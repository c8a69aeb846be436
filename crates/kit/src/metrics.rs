//! Prometheus metrics with OpenTelemetry semantic-convention names, and the tower layer that
//! gives every gRPC call a span (with W3C trace context from its headers) and a duration
//! observation labelled by service, method and status code, with the call's trace id as the
//! observation's exemplar (OpenMetrics).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument, Span};

const DURATION_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// Which process role served the call: "gateway", "contacts"…
    pub crm_role: &'static str,
    pub rpc_service: String,
    pub rpc_method: String,
    pub rpc_grpc_status_code: i32,
}

/// The exemplar of an observation: the trace it was made in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

/// `db.client.connection.*` attributes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The pool: the role whose database it is ("contacts"…).
    pub db_client_connection_pool_name: String,
    /// `idle` or `used`.
    pub db_client_connection_state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolNameLabels {
    pub db_client_connection_pool_name: String,
}

/// `db.client.operation.duration` attributes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbOperationLabels {
    /// `postgresql` or `sqlite` (`other_sql` in a process with both).
    pub db_system_name: &'static str,
    /// The statement's first keyword: `SELECT`, `INSERT`, `UPDATE`, `DELETE`, `WITH`, `BEGIN`…
    pub db_operation_name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The producing service.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub source: String,
    /// The consumer group (the consuming service).
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    /// `done`, `failed` (to be retried) or `dead` (failed for good).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobKindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// Whose limit: `user`, `client` (a service account) or `address` (a call without a token).
    pub caller: &'static str,
    /// `shared` (decided in Redis) or `local` (this replica alone: no Redis configured, or
    /// Redis unreachable).
    pub decided: &'static str,
}

/// Leased jobs' figures (kit::jobs).
pub struct JobMetrics {
    /// Jobs run, by kind and outcome.
    pub runs: Family<JobLabels, Counter>,
    /// How long after it was due a job started, seconds: whether reminders fire on time.
    pub start_delay: HistogramFamily<JobKindLabels>,
    /// How long a job's effect took, seconds.
    pub duration: HistogramFamily<JobKindLabels>,
}

impl JobMetrics {
    /// Zero series for jobs of `kind` (so that rates and increases over them answer from the
    /// start rather than once something happened).
    pub fn init(&self, kind: &str) {
        let labels = JobKindLabels { kind: kind.to_string() };
        let _ = self.start_delay.get_or_create(&labels);
        let _ = self.duration.get_or_create(&labels);
        for outcome in ["done", "failed", "dead"] {
            let _ = self.runs.get_or_create(&JobLabels { kind: kind.to_string(), outcome });
        }
    }

    fn register(registry: &mut Registry) -> JobMetrics {
        let m = JobMetrics {
            runs: Family::default(),
            start_delay: Family::new_with_constructor(duration_histogram),
            duration: Family::new_with_constructor(duration_histogram),
        };
        registry.register("crm_jobs_runs", "Jobs run, by kind and outcome", m.runs.clone());
        registry.register_with_unit(
            "crm_jobs_start_delay",
            "How long after it was due a job started",
            prometheus_client::registry::Unit::Seconds,
            m.start_delay.clone(),
        );
        registry.register_with_unit(
            "crm_jobs_duration",
            "How long a job's effect took",
            prometheus_client::registry::Unit::Seconds,
            m.duration.clone(),
        );
        m
    }
}

/// The events backbone's figures (kit::events).
pub struct EventMetrics {
    /// Committed events not yet published, per producing service.
    pub outbox_backlog: Family<EventLabels, Gauge>,
    /// Age of the oldest unpublished event, seconds.
    pub outbox_oldest_age: Family<EventLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub published: Family<EventLabels, Counter>,
    /// Events a consumer handled (their effect committed).
    pub consumed: Family<GroupLabels, Counter>,
    /// Events delivered again (after a consumer died with them, or a relay published again).
    pub redelivered: Family<GroupLabels, Counter>,
    /// Deliveries dropped because the event had been handled.
    pub duplicates: Family<GroupLabels, Counter>,
    pub dead_lettered: Family<GroupLabels, Counter>,
    /// Events published and not yet delivered to a group (as its source's relay last saw).
    pub consumer_lag: Family<GroupLabels, Gauge>,
    /// Events delivered to a group and not acknowledged.
    pub consumer_pending: Family<GroupLabels, Gauge>,
}

impl EventMetrics {
    /// Zero series for consumer group `consumer` of `source`'s events.
    pub fn init_group(&self, source: &str, consumer: &str) {
        let labels = GroupLabels { source: source.to_string(), consumer: consumer.to_string() };
        for counter in [&self.consumed, &self.redelivered, &self.duplicates, &self.dead_lettered] {
            let _ = counter.get_or_create(&labels);
        }
    }

    fn register(registry: &mut Registry) -> EventMetrics {
        let m = EventMetrics {
            outbox_backlog: Family::default(),
            outbox_oldest_age: Family::default(),
            published: Family::default(),
            consumed: Family::default(),
            redelivered: Family::default(),
            duplicates: Family::default(),
            dead_lettered: Family::default(),
            consumer_lag: Family::default(),
            consumer_pending: Family::default(),
        };
        registry.register("crm_events_outbox_backlog", "Committed events not yet published", m.outbox_backlog.clone());
        registry.register_with_unit(
            "crm_events_outbox_oldest_age",
            "Age of the oldest unpublished event",
            prometheus_client::registry::Unit::Seconds,
            m.outbox_oldest_age.clone(),
        );
        registry.register("crm_events_published", "Events published", m.published.clone());
        registry.register("crm_events_consumed", "Events handled by a consumer group", m.consumed.clone());
        registry.register("crm_events_redelivered", "Events delivered again", m.redelivered.clone());
        registry.register("crm_events_duplicates", "Deliveries of events already handled", m.duplicates.clone());
        registry.register("crm_events_dead_lettered", "Events parked as dead letters", m.dead_lettered.clone());
        registry.register(
            "crm_events_consumer_lag",
            "Events not yet delivered to a consumer group",
            m.consumer_lag.clone(),
        );
        registry.register(
            "crm_events_consumer_pending",
            "Events delivered to a consumer group and not acknowledged",
            m.consumer_pending.clone(),
        );
        m
    }
}

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A family of duration histograms (seconds, the buckets of every duration here).
pub fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

type ExemplarHistogramFamily<L> =
    Family<L, HistogramWithExemplars<TraceExemplar>, fn() -> HistogramWithExemplars<TraceExemplar>>;

fn duration_histogram_with_exemplars() -> HistogramWithExemplars<TraceExemplar> {
    HistogramWithExemplars::new(DURATION_BUCKETS.into_iter())
}

pub struct Metrics {
    registry: Mutex<Registry>,
    /// rpc.server.call.duration, seconds, with the trace id of a call per bucket as exemplar.
    pub rpc_server_duration: ExemplarHistogramFamily<RpcLabels>,
    /// db.client.operation.duration, seconds: every SQL statement (see `telemetry`).
    pub db_operation_duration: HistogramFamily<DbOperationLabels>,
    /// db.client.connection.count by state (idle/used), refreshed at scrape time.
    pub db_connections: Family<PoolLabels, Gauge>,
    /// db.client.connection.max: the most connections a pool opens.
    pub db_connections_max: Family<PoolNameLabels, Gauge>,
    /// 1 when the gateway considers an upstream endpoint healthy, else 0.
    pub upstream_up: Family<UpstreamLabels, Gauge>,
    pub events: EventMetrics,
    pub jobs: JobMetrics,
    /// Calls served with a caller's last data scope because the auth service was unreachable.
    pub stale_scopes: Counter,
    /// Calls the gateway refused over a rate limit.
    pub rate_limited: Family<RateLimitLabels, Counter>,
    /// Calls whose rate limit this gateway replica decided alone because Redis was unreachable.
    pub rate_limit_fallback: Counter,
    pools: Mutex<Vec<(String, crate::db::Pool)>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let rpc_server_duration: ExemplarHistogramFamily<RpcLabels> =
        Family::new_with_constructor(duration_histogram_with_exemplars);
    registry.register_with_unit(
        "rpc_server_call_duration",
        "Duration of gRPC calls handled by this process",
        Unit::Seconds,
        rpc_server_duration.clone(),
    );
    let db_operation_duration: HistogramFamily<DbOperationLabels> = Family::new_with_constructor(duration_histogram);
    registry.register_with_unit(
        "db_client_operation_duration",
        "Duration of SQL statements, from sending to the last row read",
        Unit::Seconds,
        db_operation_duration.clone(),
    );
    let db_connections = Family::<PoolLabels, Gauge>::default();
    registry.register("db_client_connection_count", "Database connections by state", db_connections.clone());
    let db_connections_max = Family::<PoolNameLabels, Gauge>::default();
    registry.register("db_client_connection_max", "The most connections a pool opens", db_connections_max.clone());
    let upstream_up = Family::<UpstreamLabels, Gauge>::default();
    registry.register("crm_gateway_upstream_up", "Whether an upstream endpoint is healthy", upstream_up.clone());
    let events = EventMetrics::register(&mut registry);
    let jobs = JobMetrics::register(&mut registry);
    let stale_scopes = Counter::default();
    registry.register(
        "crm_auth_stale_scopes",
        "Calls served with the caller's last data scope while the auth service was unreachable",
        stale_scopes.clone(),
    );
    let rate_limited = Family::<RateLimitLabels, Counter>::default();
    registry.register("crm_gateway_rate_limited", "Calls refused over a rate limit", rate_limited.clone());
    let rate_limit_fallback = Counter::default();
    registry.register(
        "crm_gateway_rate_limit_fallback",
        "Calls whose rate limit one gateway replica decided alone because Redis was unreachable",
        rate_limit_fallback.clone(),
    );
    Metrics {
        registry: Mutex::new(registry),
        rpc_server_duration,
        db_operation_duration,
        db_connections,
        db_connections_max,
        upstream_up,
        events,
        jobs,
        stale_scopes,
        rate_limited,
        rate_limit_fallback,
        pools: Mutex::new(Vec::new()),
    }
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Adds a service's own metric to this process's `/metrics` (call it once per process, e.g.
/// from a `LazyLock`). Names follow the OpenTelemetry conventions where one exists, else
/// `crm_<service>_…`; a counter's exposition adds `_total`, a unit its suffix.
pub fn register(name: &str, help: &str, unit: Option<Unit>, metric: impl Metric) {
    let mut registry = METRICS.registry.lock().expect("registry lock");
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric),
        None => registry.register(name, help, metric),
    }
}

/// Reports a database pool's connections on `/metrics`.
pub fn register_pool(name: &str, pool: crate::db::Pool) {
    let max = i64::from(pool.max_connections());
    let labels = PoolNameLabels { db_client_connection_pool_name: name.to_string() };
    METRICS.db_connections_max.get_or_create(&labels).set(max);
    METRICS.pools.lock().expect("pools lock").push((name.to_string(), pool));
}

const POSTGRES: u8 = 1;
const SQLITE: u8 = 2;
static DB_SYSTEMS: AtomicU8 = AtomicU8::new(0);

/// Notes which database system this process connects to (`db.system.name` of its statements).
pub(crate) fn note_db_system(backend: crate::db::Backend) {
    let bit = match backend {
        crate::db::Backend::Postgres => POSTGRES,
        crate::db::Backend::Sqlite => SQLITE,
    };
    DB_SYSTEMS.fetch_or(bit, Ordering::Relaxed);
}

/// `db.system.name` of this process's statements: `postgresql`, `sqlite`, or `other_sql` when
/// it uses both (sqlx's statement records do not say which connection ran them).
pub fn db_system() -> &'static str {
    match DB_SYSTEMS.load(Ordering::Relaxed) {
        POSTGRES => "postgresql",
        SQLITE => "sqlite",
        _ => "other_sql",
    }
}

/// The Prometheus text exposition (OpenMetrics) of every metric of this process.
pub fn render() -> String {
    let m = metrics();
    for (name, pool) in m.pools.lock().expect("pools lock").iter() {
        let idle = pool.num_idle() as i64;
        let size = i64::from(pool.size());
        for (state, value) in [("idle", idle), ("used", size - idle)] {
            let labels = PoolLabels { db_client_connection_pool_name: name.clone(), db_client_connection_state: state };
            m.db_connections.get_or_create(&labels).set(value);
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry.lock().expect("registry lock"))
        .expect("metrics encode");
    out
}

/// Splits "/crm.contacts.v1.ContactsService/GetPerson" into service and method.
pub fn split_grpc_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// Every method of every service a CRM process can serve ("pkg.Service/Method"), from the
/// descriptor sets. Calls to anything else share one label value, so that arbitrary paths sent
/// by clients cannot grow the metric series without bound.
static KNOWN_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let sets = [
        crm_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut known = HashSet::new();
    for bytes in sets {
        let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(bytes) else { continue };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!("{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
    }
    known
});

/// The metric labels of a call: its service and method if known, else "unknown".
fn method_labels(service: &str, method: &str) -> (String, String) {
    if KNOWN_METHODS.contains(&format!("{service}/{method}")) {
        (service.to_string(), method.to_string())
    } else {
        ("unknown".to_string(), "unknown".to_string())
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Span + duration histogram for every gRPC call passing through.
#[derive(Clone, Copy, Debug)]
pub struct RpcLayer {
    role: &'static str,
}

impl RpcLayer {
    pub fn new(role: &'static str) -> Self {
        RpcLayer { role }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService { inner, role: self.role }
    }
}

#[derive(Clone, Debug)]
pub struct RpcService<S> {
    inner: S,
    role: &'static str,
}

impl<S, B> Service<Request<B>> for RpcService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let route = split_grpc_path(req.uri().path()).filter(|_| is_grpc(req.headers()));
        let Some((service, method)) = route else {
            return Box::pin(self.inner.call(req));
        };
        let (rpc_service, rpc_method) = method_labels(service, method);
        let labels = RpcLabels { crm_role: self.role, rpc_service, rpc_method, rpc_grpc_status_code: 0 };
        let (span, trace_id) = crate::telemetry::rpc_span(self.role, service, method, req.headers());
        crate::telemetry::inject_context(&span, req.headers_mut());
        let start = Instant::now();
        let future = self.inner.call(req);
        let recorder_span = span.clone();
        Box::pin(
            async move {
                let response = future.await?;
                let (parts, body) = response.into_parts();
                let mut recorder = Recorder { labels, start, span: recorder_span, trace_id, done: false };
                if let Some(code) = grpc_status(&parts.headers) {
                    recorder.finish(code);
                }
                Ok(Response::from_parts(parts, Body::new(RecordedBody { inner: body, recorder })))
            }
            .instrument(span),
        )
    }
}

/// Records a call when its status is known; holds its span open until then (a stream's span
/// lasts as long as the stream).
struct Recorder {
    labels: RpcLabels,
    start: Instant,
    span: Span,
    trace_id: Option<String>,
    done: bool,
}

impl Recorder {
    fn finish(&mut self, code: i32) {
        if !self.done {
            self.done = true;
            self.labels.rpc_grpc_status_code = code;
            let exemplar = self.trace_id.take().map(|trace_id| TraceExemplar { trace_id });
            metrics().rpc_server_duration.get_or_create(&self.labels).observe(
                self.start.elapsed().as_secs_f64(),
                exemplar,
                Some(SystemTime::now()),
            );
            if code != 0 {
                tracing::debug!(parent: &self.span, rpc.grpc.status_code = code, "call failed");
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // The body was dropped before its trailers: the client went away.
        self.finish(1);
    }
}

struct RecordedBody {
    inner: Body,
    recorder: Recorder,
}

impl HttpBody for RecordedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.recorder.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.recorder.finish(13),
            Poll::Ready(None) => this.recorder.finish(0),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            split_grpc_path("/crm.contacts.v1.ContactsService/GetPerson"),
            Some(("crm.contacts.v1.ContactsService", "GetPerson"))
        );
        assert_eq!(split_grpc_path("/metrics"), None);
        assert_eq!(split_grpc_path("/a/b/c"), None);
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(
            method_labels("crm.contacts.v1.ContactsService", "GetPerson"),
            ("crm.contacts.v1.ContactsService".to_string(), "GetPerson".to_string())
        );
        assert_eq!(method_labels("grpc.health.v1.Health", "Check").1, "Check");
        assert_eq!(method_labels("x.Junk", "A1b2c3"), ("unknown".to_string(), "unknown".to_string()));
        assert_eq!(method_labels("crm.contacts.v1.ContactsService", "Nope").1, "unknown");
    }

    #[test]
    fn renders_registered_metrics() {
        let labels =
            RpcLabels { crm_role: "test", rpc_service: "svc".into(), rpc_method: "M".into(), rpc_grpc_status_code: 5 };
        let trace = TraceExemplar { trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into() };
        metrics().rpc_server_duration.get_or_create(&labels).observe(0.002, Some(trace), None);
        let text = render();
        assert!(text.contains("rpc_server_call_duration_seconds_bucket"), "{text}");
        assert!(text.contains("rpc_grpc_status_code=\"5\""), "{text}");
        // OpenMetrics: the exemplar follows its bucket's sample.
        assert!(text.contains("# {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.002"), "{text}");
    }
}
