//! Logs and traces: `tracing` with human-readable or JSON lines, OpenTelemetry export over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the other standard `OTEL_*` variables apply), and
//! W3C trace context read from and written to gRPC metadata.
//!
//! Every SQL statement sqlx runs is recorded from its own statement record (the `sqlx::query`
//! event it writes when a statement ends): its duration in `db_client_operation_duration_seconds`
//! and, inside a traced operation (a call, an event's handling, a job), a client span with the
//! statement's text (values are always bound parameters, never in the text). Statements outside
//! any traced operation (the outbox relay's and job runners' polling) make no spans.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context as OtelContext, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Flushes pending spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

const DEFAULT_FILTER: &str = "info,sqlx=warn,h2=warn,hyper=warn,tower=warn,opentelemetry=warn";

/// What becomes spans (and span events) in exported traces, whatever `RUST_LOG` says of log
/// lines: the suite's own spans and events; not the libraries' internals, not sqlx's statement
/// records (those become spans of their own), and never the exporter's own doings.
const TRACE_FILTER: &str = "info,sqlx=off,h2=off,hyper=off,hyper_util=off,tower=off,tonic=off,reqwest=off,\
                            opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// Installs the global subscriber. `RUST_LOG` sets which log lines are written (default: info,
/// libraries at warn). The service name of exported traces is `OTEL_SERVICE_NAME` when set, else
/// `service_name`.
pub fn init(service_name: &str, format: LogFormat) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));

    let provider = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.is_empty()).and_then(|_| {
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => {
                // The resource reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
                    resource = resource.with_service_name(service_name.to_string());
                }
                Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
            }
            Err(err) => {
                eprintln!("OpenTelemetry export disabled: {err}");
                None
            }
        }
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("crm")).with_filter(EnvFilter::new(TRACE_FILTER)));
    let statements = SqlStatements { tracer: provider.as_ref().map(|p| p.tracer("crm.sql")) }
        .with_filter(Targets::new().with_target("sqlx::query", Level::DEBUG));

    let registry = tracing_subscriber::registry().with(statements).with(otel);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer().compact().with_filter(filter)).try_init(),
    };
    // A subscriber may already be installed (several roles in one process, tests): keep it.
    let _ = result;
    TelemetryGuard { provider }
}

/// Turns sqlx's statement records into the statement duration metric and, inside a traced
/// operation, client spans (see the module's doc).
struct SqlStatements {
    tracer: Option<SdkTracer>,
}

/// What a statement record says. The text is kept only when it goes into a span.
#[derive(Default)]
struct StatementFields {
    keep_text: bool,
    operation: &'static str,
    /// sqlx's first words of the statement; `text` is empty when they are the whole statement.
    summary: String,
    text: String,
    elapsed: Option<f64>,
    rows_returned: u64,
}

impl Visit for StatementFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => {
                self.operation = operation_name(value);
                if self.keep_text {
                    self.summary = value.to_string();
                }
            }
            "db.statement" if self.keep_text => self.text = value.trim().to_string(),
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed = Some(value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "rows_returned" {
            self.rows_returned = value;
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

/// The statement's operation (`db.operation.name`): its first keyword, from a known list so that
/// the metric's series stay bounded.
fn operation_name(summary: &str) -> &'static str {
    const KNOWN: [&str; 22] = [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "WITH",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "DO",
        "PRAGMA",
        "CREATE",
        "ALTER",
        "DROP",
        "ANALYZE",
        "LOCK",
        "SHOW",
        "EXPLAIN",
        "VACUUM",
        "TRUNCATE",
    ];
    let first = summary.split_whitespace().next().unwrap_or_default().trim_start_matches('(');
    KNOWN.into_iter().find(|k| k.eq_ignore_ascii_case(first)).unwrap_or("OTHER")
}

impl<S: Subscriber> Layer<S> for SqlStatements {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields =
            StatementFields { keep_text: self.tracer.is_some(), operation: "OTHER", ..StatementFields::default() };
        event.record(&mut fields);
        let Some(elapsed) = fields.elapsed else { return };
        let system = crate::metrics::db_system();
        let operation = fields.operation;
        let labels = crate::metrics::DbOperationLabels { db_system_name: system, db_operation_name: operation };
        crate::metrics::metrics().db_operation_duration.get_or_create(&labels).observe(elapsed);

        let Some(tracer) = &self.tracer else { return };
        // The span entered on this thread (a call, an event's handling, a job) is the active
        // OpenTelemetry context: tracing-opentelemetry activates it on entry (sqlx's SQLite
        // worker threads enter the caller's span around each command).
        let parent = OtelContext::current();
        if !parent.span().span_context().is_sampled() {
            return;
        }
        let end = SystemTime::now();
        let start = end.checked_sub(Duration::from_secs_f64(elapsed)).unwrap_or(end);
        let text = if fields.text.is_empty() { fields.summary } else { fields.text };
        let mut span = tracer
            .span_builder(operation)
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes([
                KeyValue::new("db.system.name", system),
                KeyValue::new("db.operation.name", operation),
                KeyValue::new("db.query.text", text),
                KeyValue::new("db.response.returned_rows", fields.rows_returned as i64),
            ])
            .start_with_context(tracer, &parent);
        opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// The span of one gRPC call, child of the W3C trace context in `headers`, and its trace id
/// when there is one. Its `trace_id` field puts the trace id on every log line written inside
/// the call.
pub fn rpc_span(role: &'static str, service: &str, method: &str, headers: &HeaderMap) -> (Span, Option<String>) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        crm.role = role,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        trace_id = tracing::field::Empty,
    );
    let parent_trace = parent.span().span_context().trace_id();
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    let trace_id = if trace_id != opentelemetry::trace::TraceId::INVALID { trace_id } else { parent_trace };
    if trace_id == opentelemetry::trace::TraceId::INVALID {
        return (span, None);
    }
    let trace_id = trace_id.to_string();
    span.record("trace_id", trace_id.as_str());
    (span, Some(trace_id))
}

/// Writes the span's trace context into outgoing headers (`traceparent`), when it has one.
pub fn inject_context(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
    }
}

#[cfg(test)]
mod tests {
    use super::operation_name;

    #[test]
    fn statements_are_named_by_their_first_keyword() {
        assert_eq!(operation_name("SELECT id, doc FROM people …"), "SELECT");
        assert_eq!(operation_name("insert into tags"), "INSERT");
        assert_eq!(operation_name("(SELECT 1) UNION …"), "SELECT");
        assert_eq!(operation_name("VACUUM ANALYZE"), "VACUUM");
        // Anything else shares one label value: the series stay bounded.
        assert_eq!(operation_name("REINDEX people"), "OTHER");
        assert_eq!(operation_name(""), "OTHER");
    }
}
