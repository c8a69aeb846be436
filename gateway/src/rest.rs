//! REST/JSON for every unary call with a `google.api.http` rule (SPEC G1), found in the suite's
//! descriptors — a new annotated call needs no gateway change. A request's path parameters,
//! query parameters and body (`body: "*"` or a named field) make the call's message; it goes
//! through the upstream's pool as a gRPC call (with the caller's `Authorization`); the answer
//! comes back as proto3 JSON (camelCase, 64-bit integers as strings, enums by name; both
//! spellings of names are read), and errors as a JSON `google.rpc.Status` with the matching
//! HTTP status and the field violations of a `google.rpc.BadRequest`.
//!
//! A call answering `google.api.HttpBody` answers with that body and its content type: the
//! calendar feed (`GET /calendar/<token>`, which calendar apps fetch with no token) and report
//! downloads.
//!
//! A server stream (the live notifications) answers as newline-delimited JSON, or as
//! server-sent events when the client accepts `text/event-stream` (a keep-alive comment after
//! 15 s of quiet); an error after the first
//! message ends the stream as an `{"error": …}` line or an `error` event.
//!
//! Every call goes through the gateway's request path ([`crate::proxy::Stack`]): the token is
//! checked here as the kit's authentication layer checks gRPC calls, then the caller's rate
//! limit, the concurrency limit, the retry of idempotent reads and the balance apply alike.

use std::collections::HashSet;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use crm_kit::auth::Authenticator;
use crm_kit::limit::SizeLimits;
use http::header::{AUTHORIZATION, CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value};
use serde_json::json;
use tonic::Code;

use tower::ServiceExt;

use crate::edge::HttpBody;
use crate::proxy::Stack;

/// One annotated call.
#[derive(Debug, Clone)]
pub(crate) struct RestRoute {
    pub(crate) method: Method,
    /// Literal segments and `{field.path}` variables.
    pub(crate) segments: Vec<Segment>,
    /// The `:verb` after the last segment.
    pub(crate) verb: Option<String>,
    /// "/crm.deals.v1.DealsService/GetDeal".
    pub(crate) grpc_path: String,
    /// `None`: no body; `Some("*")`: the whole message; `Some(field)`: that field.
    pub(crate) body: Option<String>,
    pub(crate) input: MessageDescriptor,
    pub(crate) output: MessageDescriptor,
    /// A server stream: answered as newline-delimited JSON or server-sent events.
    pub(crate) streaming: bool,
    /// The call's method.
    pub(crate) descriptor: prost_reflect::MethodDescriptor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(String),
    Field(String),
}

/// Every unary or server-streaming call of `pool` with an HTTP rule.
pub(crate) fn routes(pool: &DescriptorPool) -> Vec<RestRoute> {
    let Some(http) = pool.get_extension_by_name("google.api.http") else { return Vec::new() };
    let mut out = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            if method.is_client_streaming() {
                continue;
            }
            let options = method.options();
            let Value::Message(rule) = options.get_extension(&http).into_owned() else { continue };
            let pattern = ["get", "post", "patch", "put", "delete"].into_iter().find_map(|verb| {
                match rule.get_field_by_name(verb).map(|v| v.into_owned()) {
                    Some(Value::String(path)) if !path.is_empty() => Some((verb, path)),
                    _ => None,
                }
            });
            let Some((verb, template)) = pattern else { continue };
            let Some((segments, custom)) = parse_template(&template) else {
                tracing::warn!(method = method.full_name(), template, "an HTTP rule the gateway does not understand");
                continue;
            };
            let body = match rule.get_field_by_name("body").map(|v| v.into_owned()) {
                Some(Value::String(b)) if !b.is_empty() => Some(b),
                _ => None,
            };
            out.push(RestRoute {
                method: verb.to_uppercase().parse().expect("an HTTP method"),
                segments,
                verb: custom,
                grpc_path: format!("/{}/{}", service.full_name(), method.name()),
                body,
                input: method.input(),
                output: method.output(),
                streaming: method.is_server_streaming(),
                descriptor: method.clone(),
            });
        }
    }
    out
}

/// "/v1/deals/{deal.id}:move" → its segments and verb.
fn parse_template(template: &str) -> Option<(Vec<Segment>, Option<String>)> {
    let path = template.strip_prefix('/')?;
    let (path, verb) = match path.rsplit_once(':') {
        Some((p, v)) if !v.contains('/') && !v.contains('}') => (p, Some(v.to_string())),
        _ => (path, None),
    };
    let mut segments = Vec::new();
    for part in path.split('/') {
        if let Some(field) = part.strip_prefix('{').and_then(|f| f.strip_suffix('}')) {
            if field.contains('=') {
                return None;
            }
            segments.push(Segment::Field(field.to_string()));
        } else if part.is_empty() || part.contains(['{', '}']) {
            return None;
        } else {
            segments.push(Segment::Literal(part.to_string()));
        }
    }
    Some((segments, verb))
}

impl RestRoute {
    /// The path variables when `method` and `path` are this route's.
    fn matches(&self, method: &Method, path: &str) -> Option<Vec<(String, String)>> {
        if method != self.method {
            return None;
        }
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut vars = Vec::new();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Field(_) if part.is_empty() || (self.verb.is_none() && part.contains(':')) => return None,
                Segment::Field(f) => vars.push((f.clone(), percent_decode(part, false))),
            }
        }
        Some(vars)
    }
}

/// The route of a request, if any.
pub(crate) fn find<'a>(
    routes: &'a [RestRoute],
    method: &Method,
    path: &str,
) -> Option<(&'a RestRoute, Vec<(String, String)>)> {
    routes.iter().find_map(|r| r.matches(method, path).map(|vars| (r, vars)))
}

/// `text` with its %XX escapes decoded; in a query (`plus_is_space`) a '+' is a space too.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if plus_is_space && bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The suite's descriptors.
pub(crate) fn suite_pool() -> DescriptorPool {
    DescriptorPool::decode(crm_proto::FILE_DESCRIPTOR_SET).expect("the suite's descriptor set decodes")
}

/// The gRPC paths of the idempotent reads: the unary calls whose HTTP rule is a GET.
pub(crate) fn reads(routes: &[RestRoute]) -> HashSet<String> {
    routes.iter().filter(|r| r.method == Method::GET && !r.streaming).map(|r| r.grpc_path.clone()).collect()
}

/// The first segments of the routes' paths, each once ("v1", "calendar").
pub(crate) fn prefixes(routes: &[RestRoute]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for route in routes {
        if let Some(Segment::Literal(first)) = route.segments.first()
            && !out.contains(first)
        {
            out.push(first.clone());
        }
    }
    out
}

/// The HTTP status of a gRPC error code (as `google.rpc.Code` maps them).
fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode;
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A JSON error as `google.rpc.Status`, with its HTTP status.
fn error(code: Code, message: &str, details: Vec<serde_json::Value>) -> Response<HttpBody> {
    let body = json!({"code": code as i32, "message": message, "details": details});
    let mut response = Response::new(HttpBody::from(body.to_string()));
    *response.status_mut() = http_status(code);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Why a call could not be made or answered: its code, message and details.
type Failure = (Code, String, Vec<serde_json::Value>);

fn invalid(field: &str, description: &str) -> Failure {
    let violation = json!({"field": field, "description": description});
    let details = vec![json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]})];
    (Code::InvalidArgument, format!("{field}: {description}"), details)
}

/// Sets the field at dotted `path` of `message` from the text `value` (a path or query
/// parameter): by the field's kind, a repeated field gaining an element.
fn set_text(message: &mut DynamicMessage, path: &str, value: &str) -> Result<(), String> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let field = field_by_name(&message.descriptor(), head).ok_or_else(|| format!("no field {head:?}"))?;
    if let Some(rest) = rest {
        let Kind::Message(_) = field.kind() else { return Err(format!("{head:?} has no fields")) };
        let Value::Message(inner) = message.get_field_mut(&field) else { return Err(format!("{head:?}")) };
        return set_text(inner, rest, value);
    }
    let parsed = scalar(&field, value)?;
    if field.is_list() {
        if let Value::List(list) = message.get_field_mut(&field) {
            list.push(parsed);
        }
    } else {
        message.set_field(&field, parsed);
    }
    Ok(())
}

/// A field by its proto name or its JSON (camelCase) name.
fn field_by_name(descriptor: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    descriptor.get_field_by_name(name).or_else(|| descriptor.get_field_by_json_name(name))
}

fn scalar(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let bad = || format!("{text:?} is not a value of {}", field.name());
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_string()),
        Kind::Bool => Value::Bool(text.parse().map_err(|_| bad())?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(text.parse().map_err(|_| bad())?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(text.parse().map_err(|_| bad())?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(text.parse().map_err(|_| bad())?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(text.parse().map_err(|_| bad())?),
        Kind::Float => Value::F32(text.parse().map_err(|_| bad())?),
        Kind::Double => Value::F64(text.parse().map_err(|_| bad())?),
        Kind::Bytes => Value::Bytes(Bytes::from(text.to_string())),
        Kind::Enum(e) => {
            let number = e.get_value_by_name(text).map(|v| v.number()).or_else(|| text.parse().ok()).ok_or_else(bad)?;
            Value::EnumNumber(number)
        }
        Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask" => {
            let mut mask = DynamicMessage::new(m.clone());
            let paths: Vec<Value> = text.split(',').map(|p| Value::String(p.trim().to_string())).collect();
            mask.set_field_by_name("paths", Value::List(paths));
            Value::Message(mask)
        }
        Kind::Message(_) => return Err(format!("{} takes a JSON body, not a parameter", field.name())),
    })
}

/// The call's message from the request's path variables, query and body.
fn build(route: &RestRoute, vars: &[(String, String)], query: &str, body: &[u8]) -> Result<DynamicMessage, Failure> {
    let mut message = DynamicMessage::new(route.input.clone());
    match route.body.as_deref() {
        None if !body.is_empty() && !body.iter().all(u8::is_ascii_whitespace) => {
            return Err(invalid("body", "this call takes no body; send its fields as query parameters"));
        }
        None => {}
        Some(target) => {
            let text = if body.iter().all(u8::is_ascii_whitespace) { &b"{}"[..] } else { body };
            let descriptor = if target == "*" {
                route.input.clone()
            } else {
                match field_by_name(&route.input, target).map(|f| f.kind()) {
                    Some(Kind::Message(m)) => m,
                    _ => {
                        return Err((Code::Internal, format!("the body field {target} is not a message"), vec![]));
                    }
                }
            };
            let mut de = serde_json::Deserializer::from_slice(text);
            let parsed = DynamicMessage::deserialize(descriptor, &mut de)
                .map_err(|e| invalid("body", &format!("is not this call's JSON: {e}")))?;
            if target == "*" {
                message = parsed;
            } else if let Some(field) = field_by_name(&route.input, target) {
                message.set_field(&field, Value::Message(parsed));
            }
        }
    }
    for (path, value) in vars {
        set_text(&mut message, path, value).map_err(|e| invalid(path, &e))?;
    }
    if !query.is_empty() {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key, true);
            if route.body.as_deref() == Some("*") {
                return Err(invalid(&key, "this call takes its fields in the body"));
            }
            set_text(&mut message, &key, &percent_decode(value, true)).map_err(|e| invalid(&key, &e))?;
        }
    }
    Ok(message)
}

/// The gRPC error of an answer's headers or trailers, with the field violations of its
/// `google.rpc.BadRequest` as JSON details.
fn grpc_error(headers: &HeaderMap) -> Option<(Code, String, Vec<serde_json::Value>)> {
    use tonic_types::StatusExt;
    let status = tonic::Status::from_header_map(headers)?;
    let mut details = Vec::new();
    if let Some(bad) = status.get_details_bad_request() {
        let violations: Vec<serde_json::Value> =
            bad.field_violations.iter().map(|v| json!({"field": v.field, "description": v.description})).collect();
        details.push(json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}));
    }
    if let Some(info) = status.get_details_error_info() {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": info.reason,
            "domain": info.domain, "metadata": info.metadata}));
    }
    Some((status.code(), status.message().to_string(), details))
}

/// The REST edge: the routes, and the gateway's request path their calls take.
pub(crate) struct Rest {
    routes: Vec<RestRoute>,
    stack: Stack,
    authenticator: Option<Authenticator>,
    timeout: Duration,
    sizes: SizeLimits,
}

/// Request headers a REST call passes on to its gRPC call.
const PASSED_ON: [HeaderName; 4] = [
    AUTHORIZATION,
    HeaderName::from_static("grpc-timeout"),
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

impl Rest {
    /// REST over `routes`, each call sent through `stack`; tokens checked at the edge with
    /// `authenticator` (as gRPC calls are); a unary answer waits at most `timeout` (zero: no
    /// limit besides the stack's deadline).
    pub(crate) fn new(
        routes: Vec<RestRoute>,
        stack: Stack,
        authenticator: Option<Authenticator>,
        timeout: Duration,
    ) -> Rest {
        let timeout = if timeout.is_zero() { Duration::MAX } else { timeout };
        Rest { routes, stack, authenticator, timeout, sizes: SizeLimits::new(crm_kit::limit::MAX_MESSAGE_BYTES) }
    }

    /// Limits a call's JSON body as its method's messages are limited.
    pub(crate) fn with_sizes(mut self, sizes: SizeLimits) -> Rest {
        self.sizes = sizes;
        self
    }

    /// See [`prefixes`].
    pub(crate) fn prefixes(&self) -> Vec<String> {
        prefixes(&self.routes)
    }

    /// Answers an HTTP request: the call its method and path name, or a JSON NOT_FOUND.
    pub(crate) async fn serve(&self, request: Request<axum::body::Body>) -> Response<HttpBody> {
        let path = request.uri().path().to_string();
        let Some((route, vars)) = find(&self.routes, request.method(), &path) else {
            return error(Code::NotFound, &format!("no call answers {} {path}", request.method()), vec![]);
        };
        let (mut parts, body) = request.into_parts();
        if let Some(authenticator) = &self.authenticator {
            match authenticator.caller(&route.grpc_path, &parts.headers).await {
                Ok(Some(principal)) => {
                    parts.extensions.insert(principal);
                }
                Ok(None) => {}
                Err(err) => return error(Code::Unauthenticated, tonic::Status::from(err).message(), vec![]),
            }
        }
        let max = self.sizes.for_path(&route.grpc_path);
        let body = match http_body_util::Limited::new(body, max).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let mut refused = error(
                    Code::ResourceExhausted,
                    &format!("the body is over this call's limit of {max} bytes"),
                    vec![],
                );
                *refused.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
                return refused;
            }
            Err(e) => return error(Code::InvalidArgument, &format!("the body could not be read: {e}"), vec![]),
        };
        let message = match build(route, &vars, parts.uri.query().unwrap_or(""), &body) {
            Ok(message) => message,
            Err((code, message, details)) => return error(code, &message, details),
        };
        let payload = message.encode_to_vec();
        let mut frame = BytesMut::with_capacity(payload.len() + 5);
        frame.put_u8(0);
        frame.put_u32(payload.len() as u32);
        frame.put_slice(&payload);
        let mut call = Request::new(HttpBody::from(frame.freeze()));
        *call.method_mut() = Method::POST;
        *call.uri_mut() = match route.grpc_path.parse() {
            Ok(uri) => uri,
            Err(_) => return error(Code::Internal, "bad route", vec![]),
        };
        // The caller (for its rate limit and the services' audit) and the headers that matter.
        *call.extensions_mut() = parts.extensions;
        call.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        call.headers_mut().insert(TE, HeaderValue::from_static("trailers"));
        for name in &PASSED_ON {
            if let Some(value) = parts.headers.get(name) {
                call.headers_mut().insert(name.clone(), value.clone());
            }
        }
        if let Some(value) = parts.headers.get("x-forwarded-for") {
            call.headers_mut().insert("x-forwarded-for", value.clone());
        }
        let response = match self.stack.clone().oneshot(call).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if route.streaming {
            let format = StreamFormat::of(&parts.headers);
            return stream(route, response, format);
        }
        unary(route, response, self.timeout).await
    }
}

/// A unary call's answer as HTTP: its message as JSON (or a raw body), or its error.
async fn unary(route: &RestRoute, response: Response<HttpBody>, timeout: Duration) -> Response<HttpBody> {
    let exchange = async {
        let (head, body) = response.into_parts();
        if let Some(err) = grpc_error(&head.headers) {
            return Err(err);
        }
        let collected = body.collect().await.map_err(|e| (Code::Unavailable, e.to_string(), vec![]))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        match grpc_error(&trailers) {
            Some((Code::Ok, _, _)) => Ok(collected.to_bytes()),
            Some(err) => Err(err),
            None => Err((Code::Internal, "the upstream answered without a status".into(), vec![])),
        }
    };
    let bytes = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return error(Code::DeadlineExceeded, "the upstream did not answer in time", vec![]),
        Ok(Err((code, message, details))) => return error(code, &message, details),
        Ok(Ok(bytes)) => bytes,
    };
    if bytes.len() < 5 {
        return error(Code::Internal, "the upstream's answer is not a message", vec![]);
    }
    let output = match DynamicMessage::decode(route.output.clone(), &bytes[5..]) {
        Ok(output) => output,
        Err(e) => return error(Code::Internal, &format!("the upstream's answer does not decode: {e}"), vec![]),
    };
    if route.output.full_name() == "google.api.HttpBody" {
        let body = crm_proto::google::api::HttpBody::decode(&bytes[5..]).unwrap_or_default();
        let mut response = Response::new(HttpBody::from(body.data));
        let content_type = HeaderValue::from_str(&body.content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
        response.headers_mut().insert(CONTENT_TYPE, content_type);
        // A feed or a download: the caller's own, briefly reusable.
        response.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=60"));
        return response;
    }
    let json = match serde_json::to_vec(&output) {
        Ok(json) => json,
        Err(e) => return error(Code::Internal, &format!("the answer as JSON: {e}"), vec![]),
    };
    let mut response = Response::new(HttpBody::from(json));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// How a server stream is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamFormat {
    /// One JSON message per line (`application/x-ndjson`); an error ends it as
    /// `{"error": <google.rpc.Status>}`.
    Lines,
    /// Server-sent events (`text/event-stream`, when the client accepts it): each message a
    /// `data:` event; an error ends it as an `error` event.
    Events,
}

impl StreamFormat {
    fn of(headers: &HeaderMap) -> StreamFormat {
        let accepts_events = headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().starts_with("text/event-stream")));
        if accepts_events { StreamFormat::Events } else { StreamFormat::Lines }
    }

    fn content_type(self) -> &'static str {
        match self {
            StreamFormat::Lines => "application/x-ndjson",
            StreamFormat::Events => "text/event-stream",
        }
    }

    fn message(self, json: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(json.len() + 8);
        if self == StreamFormat::Events {
            out.put_slice(b"data: ");
        }
        out.put_slice(json);
        out.put_slice(if self == StreamFormat::Events { b"\n\n" } else { b"\n" });
        out.freeze()
    }

    fn error(self, (code, message, details): Failure) -> Bytes {
        let status = json!({"code": code as i32, "message": message, "details": details});
        match self {
            StreamFormat::Lines => Bytes::from(format!("{}\n", json!({ "error": status }))),
            StreamFormat::Events => Bytes::from(format!("event: error\ndata: {status}\n\n")),
        }
    }
}

/// What is left to read of a server stream.
struct Streaming {
    body: HttpBody,
    buffer: BytesMut,
    output: MessageDescriptor,
    format: StreamFormat,
    done: bool,
    /// For server-sent events: a comment line while nothing else is sent, so that proxies with
    /// an idle timeout keep a quiet stream open.
    keepalive: Option<tokio::time::Interval>,
}

/// How long a server-sent event stream stays silent before a keep-alive comment.
const KEEPALIVE: Duration = Duration::from_secs(15);

impl Streaming {
    /// The next piece to write, or `None` at the end.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(message) = self.take_message() {
                return Some(message);
            }
            if self.done {
                return None;
            }
            let frame = match &mut self.keepalive {
                Some(tick) => tokio::select! {
                    frame = self.body.frame() => frame,
                    _ = tick.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
                },
                None => self.body.frame().await,
            };
            if frame.is_some()
                && let Some(tick) = &mut self.keepalive
            {
                tick.reset();
            }
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        self.done = true;
                        let trailers = frame.into_trailers().unwrap_or_default();
                        match grpc_error(&trailers) {
                            Some((Code::Ok, _, _)) => {}
                            Some(err) => return Some(self.format.error(err)),
                            None => {
                                let why = (Code::Internal, "the upstream ended without a status".into(), vec![]);
                                return Some(self.format.error(why));
                            }
                        }
                    }
                },
                Some(Err(e)) => {
                    self.done = true;
                    return Some(self.format.error((Code::Unavailable, e.to_string(), vec![])));
                }
                None => {
                    self.done = true;
                    let why = (Code::Internal, "the upstream ended without a status".into(), vec![]);
                    return Some(self.format.error(why));
                }
            }
        }
    }

    /// A whole message from the buffer, as JSON written in the stream's format.
    fn take_message(&mut self) -> Option<Bytes> {
        if self.buffer.len() < 5 {
            return None;
        }
        let length = u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]) as usize;
        if self.buffer.len() < 5 + length {
            return None;
        }
        let frame = self.buffer.split_to(5 + length);
        let json = DynamicMessage::decode(self.output.clone(), &frame[5..])
            .map_err(|e| e.to_string())
            .and_then(|m| serde_json::to_vec(&m).map_err(|e| e.to_string()));
        Some(match json {
            Ok(json) => self.format.message(&json),
            Err(e) => {
                self.done = true;
                self.buffer.clear();
                self.format.error((Code::Internal, format!("the upstream's message does not decode: {e}"), vec![]))
            }
        })
    }
}

fn streaming(body: HttpBody, output: MessageDescriptor, format: StreamFormat) -> Streaming {
    let keepalive = (format == StreamFormat::Events).then(|| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    Streaming { body, buffer: BytesMut::new(), output, format, done: false, keepalive }
}

/// A server stream's answer: its messages as they come, in `format`; an error before the
/// first message is an ordinary JSON error with its HTTP status.
fn stream(route: &RestRoute, response: Response<HttpBody>, format: StreamFormat) -> Response<HttpBody> {
    let (head, body) = response.into_parts();
    if let Some((code, message, details)) = grpc_error(&head.headers) {
        return error(code, &message, details);
    }
    let state = streaming(body, route.output.clone(), format);
    let pieces = futures_util::stream::unfold(state, |mut state| async move {
        state.next().await.map(|piece| (Ok::<_, std::convert::Infallible>(piece), state))
    });
    let mut response = Response::new(HttpBody::from_stream(pieces));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    response.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_annotated_unary_call_has_a_route() {
        let found = routes(&suite_pool());
        let get = |m: &str, p: &str| find(&found, &m.parse().unwrap(), p).map(|(r, vars)| (r.grpc_path.clone(), vars));
        assert_eq!(
            get("GET", "/v1/deals/0190a000-0000-7000-8000-000000000001"),
            Some((
                "/crm.deals.v1.DealsService/GetDeal".to_string(),
                vec![("id".to_string(), "0190a000-0000-7000-8000-000000000001".to_string())]
            ))
        );
        assert_eq!(get("POST", "/v1/deals/abc:move").map(|r| r.0), Some("/crm.deals.v1.DealsService/MoveDeal".into()));
        assert_eq!(get("PATCH", "/v1/deals/abc").map(|r| r.1), Some(vec![("deal.id".into(), "abc".into())]));
        assert_eq!(
            get("GET", "/v1/reports/REPORT_KIND_FUNNEL:csv").map(|r| r.0),
            Some("/crm.deals.v1.DealsService/ExportReport".into())
        );
        assert_eq!(
            get("GET", "/v1/reports/REPORT_KIND_FUNNEL").map(|r| r.0),
            Some("/crm.deals.v1.DealsService/RunReport".into())
        );
        assert_eq!(get("DELETE", "/v1/deals"), None);
        assert_eq!(
            get("GET", "/calendar/feed-token"),
            Some(("/crm.tasks.v1.TasksService/GetCalendarFeed".into(), vec![("token".into(), "feed-token".into())]))
        );
        let mut first = prefixes(&found);
        first.sort();
        assert_eq!(first, ["calendar", "v1"], "each first segment once, none a gRPC path");
        assert_eq!(
            get("GET", "/v1/deals/a+b%20c").map(|r| r.1),
            Some(vec![("id".into(), "a+b c".into())]),
            "in a path a '+' is itself"
        );
        assert!(found.len() > 80, "every service's calls: {}", found.len());
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_event_streams_get_keep_alive_comments() {
        let output = suite_pool().get_message_by_name("crm.notifications.v1.Notification").unwrap();
        let (sender, body) = {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(4);
            (tx, HttpBody::new(http_body_util::StreamBody::new(tokio_stream_of(rx))))
        };
        let mut events = streaming(body, output.clone(), StreamFormat::Events);
        // Nothing for 15 s: a comment; a message then goes out as an event.
        assert_eq!(events.next().await.as_deref(), Some(&b": keep-alive\n\n"[..]));
        let message = DynamicMessage::new(output.clone()).encode_to_vec();
        let mut frame = vec![0, 0, 0, 0, message.len() as u8];
        frame.extend(&message);
        sender.send(Ok(http_body::Frame::data(Bytes::from(frame)))).await.unwrap();
        assert_eq!(events.next().await.as_deref(), Some(&b"data: {}\n\n"[..]));
        // Lines of JSON get none (a comment is no JSON line).
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(1);
        let mut lines =
            streaming(HttpBody::new(http_body_util::StreamBody::new(tokio_stream_of(rx))), output, StreamFormat::Lines);
        let waited = tokio::time::timeout(Duration::from_secs(60), lines.next()).await;
        assert!(waited.is_err(), "no keep-alive in NDJSON");
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + 'static {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[test]
    fn errors_become_http_statuses() {
        assert_eq!(http_status(Code::NotFound), http::StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::InvalidArgument), http::StatusCode::BAD_REQUEST);
        assert_eq!(percent_decode("no%20feed%C3%A9", false), "no feedé");
    }

    #[test]
    fn messages_are_built_from_paths_queries_and_bodies() {
        let found = routes(&suite_pool());
        let (route, vars) = find(&found, &Method::GET, "/v1/deals").unwrap();
        let message = build(route, &vars, "filter=status%20%3D%20OPEN&pageSize=5&order_by=amount+desc", b"").unwrap();
        let json = serde_json::to_value(&message).unwrap();
        assert_eq!(json, json!({"filter": "status = OPEN", "pageSize": 5, "orderBy": "amount desc"}));
        let (route, vars) = find(&found, &Method::PATCH, "/v1/deals/d-1").unwrap();
        let message =
            build(route, &vars, "update_mask=title,notes", br#"{"title": "Widgets", "amount": {"minorUnits": "100"}}"#)
                .unwrap();
        let json = serde_json::to_value(&message).unwrap();
        assert_eq!(
            json,
            json!({"deal": {"id": "d-1", "title": "Widgets", "amount": {"minorUnits": "100"}}, "updateMask": "title,notes"})
        );
        let (route, vars) = find(&found, &Method::GET, "/v1/reports/REPORT_KIND_FORECAST").unwrap();
        let message = build(route, &vars, "owner_ids=a&owner_ids=b", b"").unwrap();
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            json!({"kind": "REPORT_KIND_FORECAST", "ownerIds": ["a", "b"]})
        );
        assert!(build(route, &vars, "page_size=x", b"").is_err(), "not a field of the call");
        let (route, vars) = find(&found, &Method::POST, "/v1/deals/d-1:move").unwrap();
        assert!(build(route, &vars, "", b"{not json").is_err());
    }
}
