//! The HTTP/2 proxy: routes a gRPC call by its service's package to that upstream, sends it
//! through the upstream's replica pool (power of two choices, failover while nothing was sent),
//! and streams headers, body and trailers back as they come (messages are never decoded or
//! buffered).

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crm_kit::limit::Refusal;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use tonic::Code;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use crate::edge::{AnswerErrorsLayer, DeadlineLayer, HttpBody, RetryLayer, grpc_error};
use crate::ratelimit::{Limiter, RateLimitLayer};
use crate::{EdgePolicy, Upstream};

/// The gateway's request path as one service: every gRPC call (and every REST call, once
/// transcoded) meets the edge policy in this order, built here and nowhere else:
///
/// 1. the caller's rate limit (refused calls take nothing else);
/// 2. load shedding over the concurrency limit (RESOURCE_EXHAUSTED when full);
/// 3. one retry of an idempotent read after UNAVAILABLE, on another replica if there is one;
/// 4. the balance over the upstream's replicas (the proxy: power of two choices, failover
///    while nothing was sent), each attempt under the deadline until response headers.
pub(crate) type Stack = BoxCloneSyncService<Request<HttpBody>, Response<HttpBody>, Infallible>;

/// See [`Stack`]; `reads` are the gRPC paths of idempotent reads.
pub(crate) fn stack(
    upstreams: Arc<[Upstream]>,
    policy: &EdgePolicy,
    limiter: Arc<Limiter>,
    reads: HashSet<String>,
) -> Stack {
    let service = ServiceBuilder::new()
        .layer(AnswerErrorsLayer)
        .layer(RateLimitLayer::new(limiter))
        .load_shed()
        .concurrency_limit(policy.max_concurrency)
        .layer(RetryLayer::new(reads, policy.request_timeout))
        .layer(DeadlineLayer::new(policy.request_timeout))
        .service(Proxy { upstreams });
    BoxCloneSyncService::new(service)
}

/// Where a request goes.
enum Route<'a> {
    /// A gRPC call of an upstream's package.
    Upstream(&'a Upstream),
    /// A gRPC call nobody here serves.
    UnknownGrpc,
    /// Not gRPC, on a path that names an upstream's method.
    NotGrpc,
    /// Not gRPC and nothing here.
    NotFound,
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The upstream whose package holds the service of `/package.Service/Method`.
fn upstream_for<'a>(upstreams: &'a [Upstream], path: &str) -> Option<&'a Upstream> {
    let (service, _method) = crm_kit::metrics::split_grpc_path(path)?;
    let (package, _name) = service.rsplit_once('.')?;
    upstreams.iter().find(|u| u.packages.contains(&package))
}

fn route<'a>(upstreams: &'a [Upstream], path: &str, headers: &HeaderMap) -> Route<'a> {
    match (upstream_for(upstreams, path), is_grpc(headers)) {
        (Some(upstream), true) => Route::Upstream(upstream),
        (None, true) => Route::UnknownGrpc,
        (Some(_), false) => Route::NotGrpc,
        (None, false) => Route::NotFound,
    }
}

/// Removes what belongs to one HTTP hop only: `connection` and the headers it names,
/// `keep-alive`, `proxy-*`, `transfer-encoding`, `upgrade`, `host` (the target goes in the URI),
/// and `te` unless it asks for trailers (then it becomes exactly `te: trailers`).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| *name != TE)
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in [TRANSFER_ENCODING, UPGRADE, HOST] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
        for name in proxy {
            headers.remove(name);
        }
    }
    let mut te = headers.get_all(TE).iter();
    match (te.next(), te.next()) {
        (None, _) => {}
        (Some(only), None) if only.as_bytes() == b"trailers" => {}
        _ => {
            let trailers = headers.get_all(TE).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',').any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
                })
            });
            headers.remove(TE);
            if trailers {
                headers.insert(TE, HeaderValue::from_static("trailers"));
            }
        }
    }
}

/// Sends each gRPC call to a replica of its upstream; answers the rest itself.
#[derive(Clone)]
struct Proxy {
    upstreams: Arc<[Upstream]>,
}

type ProxyFuture = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, Infallible>> + Send>>;

impl Service<Request<HttpBody>> for Proxy {
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<HttpBody>) -> ProxyFuture {
        let response = match route(&self.upstreams, request.uri().path(), request.headers()) {
            Route::Upstream(upstream) => {
                let upstream = upstream.clone();
                return Box::pin(async move { Ok(forward(&upstream, request).await) });
            }
            Route::UnknownGrpc => {
                let path = request.uri().path();
                let what = match crm_kit::metrics::split_grpc_path(path) {
                    Some((service, _)) => format!("unknown service {}", crm_kit::validate::quote(service)),
                    None => format!("{} is not a gRPC method path", crm_kit::validate::quote(path)),
                };
                grpc_error(Code::Unimplemented, &what)
            }
            Route::NotGrpc => {
                plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "gRPC calls need content-type application/grpc\n")
            }
            Route::NotFound => plain(StatusCode::NOT_FOUND, "not found\n"),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<HttpBody> {
    let mut response = Response::new(HttpBody::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Names the client for the services (security audit): the peer address is appended to
/// `x-forwarded-for`, so a proxy in front of the gateway keeps its entries first.
fn forwarded_for(parts: &mut http::request::Parts) {
    let Some(peer) = parts.extensions.get::<tonic::transport::server::TcpConnectInfo>().and_then(|i| i.remote_addr())
    else {
        return;
    };
    let value = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) if !earlier.trim().is_empty() => format!("{earlier}, {}", peer.ip()),
        _ => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        parts.headers.insert("x-forwarded-for", value);
    }
}

/// Forwards one call to a replica of `upstream`; a call no replica could take, or that failed
/// on its way, is answered with the matching gRPC status.
pub(crate) async fn forward(upstream: &Upstream, request: Request<HttpBody>) -> Response<HttpBody> {
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    forwarded_for(&mut parts);
    // The server follows the body's frame headers (an oversize or trickling message is refused
    // before it is uploaded; messages are neither buffered nor decoded) and says why here.
    let refusal = parts.extensions.get::<Refusal>().cloned().unwrap_or_default();
    let request = Request::from_parts(parts, tonic::body::Body::new(body));
    match upstream.pool.send(request).await {
        Ok(response) => response.map(HttpBody::new),
        // A body refused on its way fails the forwarding: the client hears why it was refused.
        Err(err) => match refusal.status() {
            Some(status) => grpc_error(status.code(), status.message()),
            None => grpc_error(err.code(), &err.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crm_kit::balance::Pool;

    fn pools() -> Arc<[Upstream]> {
        Arc::from(vec![
            Upstream {
                packages: &["crm.contacts.v1"],
                services: &["crm.contacts.v1.ContactsService"],
                pool: Arc::new(Pool::new("crm.contacts.v1.ContactsService", vec![])),
            },
            Upstream {
                packages: &["crm.deals.v1"],
                services: &["crm.deals.v1.DealsService"],
                pool: Arc::new(Pool::new("crm.deals.v1.DealsService", vec![])),
            },
        ])
    }

    fn grpc_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        h
    }

    #[test]
    fn routes_by_package_prefix() {
        let pools = pools();
        let service = |path: &str| upstream_for(&pools, path).map(|u| u.service());
        assert_eq!(service("/crm.contacts.v1.ContactsService/GetPerson"), Some("crm.contacts.v1.ContactsService"));
        assert_eq!(service("/crm.contacts.v1.OtherService/Do"), Some("crm.contacts.v1.ContactsService"));
        assert_eq!(service("/crm.deals.v1.DealsService/ListDeals"), Some("crm.deals.v1.DealsService"));
        // The package must match exactly, not merely start the same.
        assert_eq!(service("/crm.contacts.v1beta.ContactsService/GetPerson"), None);
        assert_eq!(service("/crm.contacts.v1.sub.Service/Do"), None);
        assert_eq!(service("/crm.contacts.v1/GetPerson"), None);
        assert_eq!(service("/ContactsService/GetPerson"), None);
        assert_eq!(service("/crm.contacts.v1.ContactsService/"), None);
        assert_eq!(service("/crm.contacts.v1.ContactsService/GetPerson/x"), None);
        assert_eq!(service("/"), None);
        assert_eq!(service(""), None);

        let grpc = grpc_headers();
        let plain = HeaderMap::new();
        let path = "/crm.contacts.v1.ContactsService/GetPerson";
        assert!(matches!(route(&pools, path, &grpc), Route::Upstream(_)));
        assert!(matches!(route(&pools, path, &plain), Route::NotGrpc));
        assert!(matches!(route(&pools, "/crm.nope.v1.X/Y", &grpc), Route::UnknownGrpc));
        assert!(matches!(route(&pools, "/index.html", &plain), Route::NotFound));
    }

    #[tokio::test]
    async fn answers_what_it_cannot_route() {
        let mut proxy = Proxy { upstreams: pools() };
        let request = |path: &str, grpc: bool| {
            let mut r = Request::builder().method("POST").uri(path);
            if grpc {
                r = r.header(CONTENT_TYPE, "application/grpc");
            }
            r.body(HttpBody::empty()).unwrap()
        };
        let unknown = proxy.call(request("/crm.nope.v1.X/Y", true)).await.unwrap();
        assert_eq!(unknown.status(), StatusCode::OK);
        assert_eq!(unknown.headers()["grpc-status"], "12");
        assert_eq!(unknown.headers()["grpc-message"], "unknown service 'crm.nope.v1.X'");
        let missing = proxy.call(request("/nothing-here", false)).await.unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let not_grpc = proxy.call(request("/crm.contacts.v1.ContactsService/GetPerson", false)).await.unwrap();
        assert_eq!(not_grpc.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // An upstream without any replica: UNAVAILABLE naming it.
        let none = proxy.call(request("/crm.deals.v1.DealsService/ListDeals", true)).await.unwrap();
        assert_eq!(none.headers()["grpc-status"], "14");
        let message = none.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("crm.deals.v1.DealsService"), "{message}");
    }

    #[test]
    fn strips_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("host", "gateway:8080"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("grpc-timeout", "1S"),
            ("authorization", "Bearer t"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ] {
            h.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type", "grpc-timeout", "te", "traceparent"]);
        assert_eq!(h["te"], "trailers");

        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip, trailers;q=1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("te, close"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["te"], "trailers");
    }
}
