//! Building and reading [`Envelope`]s.

use std::collections::HashMap;

use crm_proto::events::v1::Envelope;
use opentelemetry::propagation::{Extractor, Injector};
use prost::Message;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::time::{now_micros, to_timestamp};

/// An event about `subject` caused by `actor`, in the current span's trace.
pub fn envelope<E: prost::Name>(source: &str, subject: &str, actor: &str, event: &E) -> Envelope {
    let mut context = TraceFields::default();
    let cx = Span::current().context();
    if opentelemetry::trace::TraceContextExt::span(&cx).span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut context));
    }
    Envelope {
        id: crate::id::new(),
        r#type: E::full_name(),
        source: source.to_string(),
        subject: subject.to_string(),
        time: to_timestamp(now_micros()),
        actor: actor.to_string(),
        traceparent: context.0.remove("traceparent").unwrap_or_default(),
        tracestate: context.0.remove("tracestate").unwrap_or_default(),
        payload: event.encode_to_vec(),
    }
}

/// The payload of `envelope` as `E`: `None` when it holds another type.
pub fn payload<E: prost::Name + Message + Default>(envelope: &Envelope) -> Option<Result<E, prost::DecodeError>> {
    (envelope.r#type == E::full_name()).then(|| E::decode(envelope.payload.as_slice()))
}

/// The span handling `envelope` in `consumer`: a child of the span that produced it.
pub fn handler_span(consumer: &str, envelope: &Envelope) -> Span {
    let mut fields = TraceFields::default();
    if !envelope.traceparent.is_empty() {
        fields.0.insert("traceparent".into(), envelope.traceparent.clone());
        if !envelope.tracestate.is_empty() {
            fields.0.insert("tracestate".into(), envelope.tracestate.clone());
        }
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&fields));
    let span = tracing::info_span!(
        "event",
        otel.name = %format_args!("handle {}", envelope.r#type),
        otel.kind = "consumer",
        messaging.system = "crm",
        messaging.consumer.group.name = %consumer,
        messaging.message.id = %envelope.id,
        messaging.source.name = %envelope.source,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    let trace_id = opentelemetry::trace::TraceContextExt::span(&span.context()).span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

#[derive(Default)]
struct TraceFields(HashMap<String, String>);

impl Injector for TraceFields {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

impl Extractor for TraceFields {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::events::v1::Envelope as Inner;

    #[test]
    fn envelopes_carry_their_payload_and_type() {
        let inner = Inner { id: "x".into(), ..Inner::default() };
        let env = envelope("contacts", "subject-1", "user-1", &inner);
        assert_eq!(env.r#type, "crm.events.v1.Envelope");
        assert_eq!(
            (env.source.as_str(), env.subject.as_str(), env.actor.as_str()),
            ("contacts", "subject-1", "user-1")
        );
        assert_eq!(env.id.len(), 36);
        assert_eq!(payload::<Inner>(&env).unwrap().unwrap().id, "x");
        assert!(payload::<crm_proto::google::api::Http>(&env).is_none());
    }
}
