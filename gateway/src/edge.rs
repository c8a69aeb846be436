//! Edge policy and the gateway's own gRPC answers: trailers-only error responses, the
//! `grpc-timeout` header, the deadline until upstream response headers, load shedding, and the
//! retry of idempotent reads.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crm_kit::balance::local::grpc_timeout;
use crm_kit::balance::{Avoid, Replica};

use futures_util::FutureExt;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::time::error::Elapsed;
use tonic::Code;
use tower::{Layer, Service, ServiceExt};

/// Body of every response the proxy hands back.
pub(crate) type HttpBody = axum::body::Body;

/// A trailers-only gRPC error: HTTP 200, `content-type: application/grpc`, `grpc-status` and a
/// percent-encoded `grpc-message`, no body.
pub(crate) fn grpc_error(code: Code, message: &str) -> Response<HttpBody> {
    let mut response = Response::new(HttpBody::empty());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code as i32));
    if !message.is_empty() {
        headers.insert("grpc-message", grpc_message(message));
    }
    response
}

/// Percent-encodes a status message as gRPC requires: bytes outside printable ASCII, and '%'.
fn grpc_message(message: &str) -> HeaderValue {
    let plain = |b: &u8| (0x20..=0x7e).contains(b) && *b != b'%';
    if message.bytes().all(|b| plain(&b))
        && let Ok(value) = HeaderValue::from_str(message)
    {
        return value;
    }
    let mut encoded = String::with_capacity(message.len() + 16);
    for b in message.bytes() {
        if plain(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

/// The time a call may wait for upstream response headers: the gateway's limit, or the
/// client's `grpc-timeout` when that is shorter. `None`: no limit.
pub(crate) fn deadline(limit: Option<Duration>, headers: &HeaderMap) -> Option<Duration> {
    match (limit, grpc_timeout(headers)) {
        (Some(limit), Some(client)) => Some(limit.min(client)),
        (limit, client) => limit.or(client),
    }
}

/// Answers DEADLINE_EXCEEDED when upstream response headers do not arrive in time (see
/// [`deadline`]). A response body streaming after its headers is never cut off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadlineLayer {
    limit: Option<Duration>,
}

impl DeadlineLayer {
    /// `limit` zero: only the client's `grpc-timeout` applies.
    pub(crate) fn new(limit: Duration) -> DeadlineLayer {
        DeadlineLayer { limit: (!limit.is_zero()).then_some(limit) }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, limit: self.limit }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
    limit: Option<Duration>,
}

type Timed<E> = Result<Result<Response<HttpBody>, E>, Elapsed>;

/// The future of a call under a deadline.
pub(crate) type DeadlineFuture<F, E> =
    futures_util::future::Map<tokio::time::Timeout<F>, fn(Timed<E>) -> Result<Response<HttpBody>, E>>;

fn on_deadline<E>(timed: Timed<E>) -> Result<Response<HttpBody>, E> {
    timed.unwrap_or_else(|_| Ok(grpc_error(Code::DeadlineExceeded, "deadline exceeded waiting for the upstream")))
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<HttpBody>>,
{
    type Response = Response<HttpBody>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Duration::MAX sets no timer at all.
        let limit = deadline(self.limit, request.headers()).unwrap_or(Duration::MAX);
        tokio::time::timeout(limit, self.inner.call(request)).map(on_deadline::<S::Error> as fn(_) -> _)
    }
}

/// Turns the edge layers' errors into gRPC answers: a call refused by load shedding gets
/// RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AnswerErrorsLayer;

impl<S> Layer<S> for AnswerErrorsLayer {
    type Service = AnswerErrors<S>;

    fn layer(&self, inner: S) -> AnswerErrors<S> {
        AnswerErrors { inner, refused: None }
    }
}

/// See [`AnswerErrorsLayer`].
#[derive(Debug)]
pub(crate) struct AnswerErrors<S> {
    inner: S,
    /// Why the inner service could not take the next call (answered by that call).
    refused: Option<tower::BoxError>,
}

impl<S: Clone> Clone for AnswerErrors<S> {
    fn clone(&self) -> Self {
        AnswerErrors { inner: self.inner.clone(), refused: None }
    }
}

fn answer<E: Into<tower::BoxError>>(result: Result<Response<HttpBody>, E>) -> Result<Response<HttpBody>, Infallible> {
    Ok(result.unwrap_or_else(|e| error_response(e.into())))
}

fn error_response(error: tower::BoxError) -> Response<HttpBody> {
    if error.is::<tower::load_shed::error::Overloaded>() {
        grpc_error(Code::ResourceExhausted, "the gateway is at its concurrency limit; retry later")
    } else {
        grpc_error(Code::Internal, &format!("gateway: {error}"))
    }
}

/// The future of a call whose errors become answers.
pub(crate) type AnswerFuture<F, E> = futures_util::future::Either<
    std::future::Ready<Result<Response<HttpBody>, Infallible>>,
    futures_util::future::Map<F, fn(Result<Response<HttpBody>, E>) -> Result<Response<HttpBody>, Infallible>>,
>;

impl<S, B> Service<Request<B>> for AnswerErrors<S>
where
    S: Service<Request<B>, Response = Response<HttpBody>>,
    S::Error: Into<tower::BoxError>,
{
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = AnswerFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.refused.is_none()
            && let Err(e) = std::task::ready!(self.inner.poll_ready(cx))
        {
            self.refused = Some(e.into());
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.refused.take() {
            Some(e) => futures_util::future::Either::Left(std::future::ready(Ok(error_response(e)))),
            None => futures_util::future::Either::Right(self.inner.call(request).map(answer::<S::Error> as fn(_) -> _)),
        }
    }
}

/// Whether an answer is a trailers-only UNAVAILABLE (no replica took the call, the call failed
/// on its way, or the replica itself said so before answering anything).
fn is_unavailable(response: &Response<HttpBody>) -> bool {
    response.headers().get("grpc-status").is_some_and(|s| s.as_bytes() == b"14")
}

/// Retries an idempotent read (a call whose HTTP rule is a GET) once after UNAVAILABLE,
/// preferably on another replica, within what is left of the call's deadline. Such a call's
/// request (one small message) is read before it is sent, so that it can be sent again; other
/// calls stream through untouched.
#[derive(Debug, Clone)]
pub(crate) struct RetryLayer {
    reads: Arc<HashSet<String>>,
    limit: Option<Duration>,
}

impl RetryLayer {
    /// `reads`: the gRPC paths of idempotent reads; `limit`: the gateway's deadline (zero: none).
    pub(crate) fn new(reads: HashSet<String>, limit: Duration) -> RetryLayer {
        RetryLayer { reads: Arc::new(reads), limit: (!limit.is_zero()).then_some(limit) }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner, reads: self.reads.clone(), limit: self.limit }
    }
}

/// See [`RetryLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    reads: Arc<HashSet<String>>,
    limit: Option<Duration>,
}

impl<S> Service<Request<HttpBody>> for Retry<S>
where
    S: Service<Request<HttpBody>, Response = Response<HttpBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<HttpBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<HttpBody>) -> Self::Future {
        if !self.reads.contains(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        // The polled service takes the first attempt; a clone the retry.
        let clone = self.inner.clone();
        let mut first = std::mem::replace(&mut self.inner, clone.clone());
        let deadline = deadline(self.limit, request.headers());
        Box::pin(async move {
            use http_body_util::BodyExt;
            let started = tokio::time::Instant::now();
            let (parts, body) = request.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) => {
                    let refused = parts.extensions.get::<crm_kit::limit::Refusal>().and_then(|r| r.status());
                    return Ok(match refused {
                        Some(status) => grpc_error(status.code(), status.message()),
                        None => grpc_error(Code::Cancelled, &format!("the request could not be read: {err}")),
                    });
                }
            };
            let response = first.call(Request::from_parts(parts.clone(), HttpBody::from(body.clone()))).await?;
            if !is_unavailable(&response) {
                return Ok(response);
            }
            let left = match deadline {
                None => None,
                Some(deadline) => match deadline.checked_sub(started.elapsed()) {
                    Some(left) if left >= Duration::from_millis(1) => Some(left),
                    _ => return Ok(response),
                },
            };
            let mut retry = Request::from_parts(parts, HttpBody::from(body));
            if let Some(left) = left
                && let Ok(value) = HeaderValue::from_str(&format!("{}m", left.as_millis().min(99_999_999)))
            {
                retry.headers_mut().insert("grpc-timeout", value);
            }
            if let Some(Replica(addr)) = response.extensions().get::<Replica>() {
                retry.extensions_mut().insert(Avoid(*addr));
            }
            tracing::debug!(path = retry.uri().path(), "retrying an idempotent read after UNAVAILABLE");
            clone.oneshot(retry).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;

    use tower::{ServiceBuilder, ServiceExt};

    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        h
    }

    fn status(response: &Response<HttpBody>) -> (Option<&str>, Option<&str>, Option<&str>) {
        let h = response.headers();
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        (get("content-type"), get("grpc-status"), get("grpc-message"))
    }

    #[test]
    fn the_shorter_deadline_wins() {
        let limit = Some(Duration::from_secs(30));
        assert_eq!(deadline(limit, &headers("1S")), Some(Duration::from_secs(1)));
        assert_eq!(deadline(limit, &headers("1H")), limit);
        assert_eq!(deadline(limit, &HeaderMap::new()), limit);
        assert_eq!(deadline(None, &headers("5m")), Some(Duration::from_millis(5)));
        assert_eq!(deadline(None, &headers("garbage")), None);
    }

    #[test]
    fn errors_are_trailers_only() {
        let response = grpc_error(Code::Unavailable, "no replica of crm.x.v1.X answered");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(
            status(&response),
            (Some("application/grpc"), Some("14"), Some("no replica of crm.x.v1.X answered"))
        );
        assert!(http_body::Body::is_end_stream(response.body()));
        let encoded = grpc_error(Code::Internal, "100% déjà\nvu");
        assert_eq!(status(&encoded).2, Some("100%25 d%C3%A9j%C3%A0%0Avu"));
        assert_eq!(status(&grpc_error(Code::Unimplemented, "")), (Some("application/grpc"), Some("12"), None));
        // What a gRPC client makes of it.
        let parsed = tonic::Status::from_header_map(encoded.headers()).unwrap();
        assert_eq!((parsed.code(), parsed.message()), (Code::Internal, "100% déjà\nvu"));
    }

    /// Never answers.
    #[derive(Clone)]
    struct Stuck;

    impl Service<Request<()>> for Stuck {
        type Response = Response<HttpBody>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: Request<()>) -> Self::Future {
            Box::pin(std::future::pending())
        }
    }

    fn request(timeout: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(t) = timeout {
            request.headers_mut().insert("grpc-timeout", HeaderValue::from_str(t).unwrap());
        }
        request
    }

    #[tokio::test]
    async fn a_client_deadline_ends_a_call_without_headers() {
        let service = DeadlineLayer::new(Duration::from_secs(3600)).layer(Stuck);
        let response = service.oneshot(request(Some("20m"))).await.unwrap();
        assert_eq!(status(&response).1, Some("4"));
        let service = DeadlineLayer::new(Duration::from_millis(20)).layer(Stuck);
        let response = service.oneshot(request(None)).await.unwrap();
        assert_eq!(status(&response).1, Some("4"));
    }

    #[tokio::test]
    async fn calls_over_the_limit_are_shed() {
        let stack = ServiceBuilder::new()
            .layer(AnswerErrorsLayer)
            .load_shed()
            .concurrency_limit(1)
            .layer(DeadlineLayer::new(Duration::from_millis(20)))
            .service(Stuck);
        // The first call holds the only permit (its future is never polled, so it never ends).
        let mut first = stack.clone();
        let held = first.ready().await.unwrap().call(request(None));
        let shed = stack.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(status(&shed).1, Some("8"));
        drop(held);
        // Once it is gone, calls are taken again: this one reaches the stuck upstream and times out.
        let taken = stack.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(status(&taken).1, Some("4"));
    }
}
