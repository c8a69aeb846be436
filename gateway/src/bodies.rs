//! Plain GET addresses for the calls that answer with a raw HTTP body (`google.api.HttpBody`):
//! a calendar feed, which calendar apps fetch by URL with no gRPC and no token. They are found
//! in the suite's descriptors — a method returning `google.api.HttpBody` whose `google.api.http`
//! rule is a GET of `/<literal>/…/{field}` — so a new one needs no gateway change. The gateway
//! turns the GET into the gRPC call (the last path segment as `field`), sends it through the
//! upstream's pool like any call, and answers with the body and its content type, or with the
//! HTTP status matching the call's error. (Transcoding every annotated call to REST comes with
//! the REST edge.)

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, Value};
use tonic::Code;

use crate::Upstream;
use crate::edge::HttpBody;

/// One GET address and the call it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BodyRoute {
    /// The axum path: "/calendar/{token}".
    pub path: String,
    /// The call: "/crm.tasks.v1.TasksService/GetCalendarFeed".
    pub grpc_path: String,
    /// The request's string field the last segment fills.
    pub field: String,
    input: prost_reflect::MessageDescriptor,
}

/// Every such address in `pool` (the suite's descriptors).
pub(crate) fn routes(pool: &DescriptorPool) -> Vec<BodyRoute> {
    let Some(http) = pool.get_extension_by_name("google.api.http") else { return Vec::new() };
    let mut out = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            if method.output().full_name() != "google.api.HttpBody" || method.is_server_streaming() {
                continue;
            }
            let options = method.options();
            let Value::Message(rule) = options.get_extension(&http).into_owned() else { continue };
            let Some(Value::String(template)) = rule.get_field_by_name("get").map(|v| v.into_owned()) else {
                continue;
            };
            let Some((prefix, field)) = template.rsplit_once('/') else { continue };
            let Some(field) = field.strip_prefix('{').and_then(|f| f.strip_suffix('}')) else { continue };
            let literal = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !prefix.starts_with('/') || !prefix[1..].split('/').all(literal) {
                continue;
            }
            let input = method.input();
            if !input.get_field_by_name(field).is_some_and(|f| f.kind() == Kind::String && !f.is_list()) {
                continue;
            }
            out.push(BodyRoute {
                path: format!("{prefix}/{{{field}}}"),
                grpc_path: format!("/{}/{}", service.full_name(), method.name()),
                field: field.to_string(),
                input,
            });
        }
    }
    out
}

/// The suite's descriptors.
pub(crate) fn suite_pool() -> DescriptorPool {
    DescriptorPool::decode(crm_proto::FILE_DESCRIPTOR_SET).expect("the suite's descriptor set decodes")
}

fn text(status: StatusCode, message: &str) -> Response<HttpBody> {
    let mut response = Response::new(HttpBody::from(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The HTTP status of a gRPC error code (as `google.rpc.Code` maps them).
pub(crate) fn http_status(code: Code) -> StatusCode {
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

fn grpc_status(headers: &HeaderMap) -> Option<(Code, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
    let message = percent_decode(message);
    Some((Code::from_i32(code), message))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes the call of `route` with `value` in its field and answers as HTTP.
pub(crate) async fn answer(
    route: Arc<BodyRoute>,
    upstream: Upstream,
    value: String,
    timeout: Duration,
) -> Response<HttpBody> {
    let mut message = DynamicMessage::new(route.input.clone());
    message.set_field_by_name(&route.field, Value::String(value));
    let payload = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(payload.len() + 5);
    frame.put_u8(0);
    frame.put_u32(payload.len() as u32);
    frame.put_slice(&payload);
    let mut request = Request::new(HttpBody::from(frame.freeze()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = match route.grpc_path.parse() {
        Ok(uri) => uri,
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "bad route"),
    };
    request.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    request.headers_mut().insert(TE, HeaderValue::from_static("trailers"));
    let call = async {
        let response = crate::proxy::forward(&upstream, request).await;
        let (parts, body) = response.into_parts();
        if let Some((code, message)) = grpc_status(&parts.headers) {
            return Err((code, message));
        }
        let collected = body.collect().await.map_err(|e| (Code::Unavailable, e.to_string()))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        match grpc_status(&trailers) {
            Some((Code::Ok, _)) => Ok(collected.to_bytes()),
            Some(error) => Err(error),
            None => Err((Code::Internal, "the upstream answered without a status".into())),
        }
    };
    let bytes: Bytes = match tokio::time::timeout(timeout, call).await {
        Err(_) => return text(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time"),
        Ok(Err((code, message))) => return text(http_status(code), &message),
        Ok(Ok(bytes)) => bytes,
    };
    if bytes.len() < 5 {
        return text(StatusCode::BAD_GATEWAY, "the upstream's answer is not a message");
    }
    let body = match crm_proto::google::api::HttpBody::decode(&bytes[5..]) {
        Ok(body) => body,
        Err(e) => return text(StatusCode::BAD_GATEWAY, &format!("the upstream's answer does not decode: {e}")),
    };
    let mut response = Response::new(HttpBody::from(body.data));
    let content_type = HeaderValue::from_str(&body.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("private, max-age=60"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calendar_feed_is_found_in_the_descriptors() {
        let found = routes(&suite_pool());
        let feed =
            found.iter().find(|r| r.grpc_path == "/crm.tasks.v1.TasksService/GetCalendarFeed").expect("the feed");
        assert_eq!((feed.path.as_str(), feed.field.as_str()), ("/calendar/{token}", "token"));
        assert!(found.iter().all(|r| r.path.starts_with('/') && r.path.ends_with('}')));
    }

    #[test]
    fn errors_become_http_statuses() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(percent_decode("no%20feed%C3%A9"), "no feedé");
    }
}
