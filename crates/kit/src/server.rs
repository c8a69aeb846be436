//! The gRPC server every role runs: its services plus `grpc.health.v1` (a status for every
//! service served), server reflection (v1 and v1alpha), gRPC-Web and HTTP/1.1, `/healthz`,
//! `/readyz` and `/metrics` on the same port, a span and metrics for every call, token checks,
//! the request message limit (per method), TLS beside plaintext (`crate::tls`), CORS for
//! browser apps, and a graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::get;
use http::{Request, StatusCode};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Service;

use crate::metrics::RpcLayer;
use crate::shutdown::Shutdown;

/// Answers whether the process can do its work (database reachable…); `Err` says why not.
pub type ReadyCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How often readiness is re-checked and reflected in `grpc.health.v1`.
const READY_INTERVAL: Duration = Duration::from_secs(2);

/// How a server treats its connections.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Streams (calls) one HTTP/2 connection may have open at once, advertised to clients.
    pub max_concurrent_streams: u32,
    /// How long a request body may take to deliver each message, and then its end; also how
    /// long a new connection may stay silent.
    pub read_timeout: Duration,
    /// On shutdown, how long the server keeps taking calls after reporting NOT_SERVING, so that
    /// whoever balances over it (the gateway's health checks, a Kubernetes endpoint) stops
    /// sending first; then it stops accepting and finishes the calls in flight.
    pub drain_delay: Duration,
    /// TLS beside (or instead of) plaintext on the port.
    pub tls: Option<crate::tls::Tls>,
    /// Whether this process's own callers (the gateway, other roles' clients) call the server
    /// without the network while it accepts calls (see [`crate::balance::local`]).
    pub in_process: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_concurrent_streams: 256,
            read_timeout: crate::limit::DEFAULT_READ_TIMEOUT,
            drain_delay: Duration::ZERO,
            tls: None,
            in_process: false,
        }
    }
}

pub struct Server {
    role: &'static str,
    routes: RoutesBuilder,
    health: HealthReporter,
    names: Vec<String>,
    ready: ReadyCheck,
    fallback: Option<axum::Router>,
    auth: Option<crate::auth::Authenticator>,
    settings: ServerSettings,
    cors: Option<tower_http::cors::CorsLayer>,
    sizes: crate::limit::SizeLimits,
}

impl Server {
    /// A server for the role `role` ("contacts", "gateway"…).
    pub fn new(role: &'static str) -> Server {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Server {
            role,
            routes,
            health,
            names: Vec::new(),
            ready: Arc::new(|| Box::pin(async { Ok(()) })),
            fallback: None,
            auth: None,
            settings: ServerSettings::default(),
            cors: None,
            sizes: crate::limit::SizeLimits::new(crate::limit::MAX_MESSAGE_BYTES),
        }
    }

    /// The role it serves.
    pub fn role(&self) -> &'static str {
        self.role
    }

    /// Serves a tonic service; its health is reported under its full name.
    pub fn add_service<S>(mut self, service: S) -> Server
    where
        S: Service<Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME.to_string());
        self.routes.add_service(service);
        self
    }

    /// Reports health for a service that this process answers for without serving it itself
    /// (the gateway, for the services behind it).
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// What `/readyz` and the health service consult.
    pub fn ready_check(mut self, check: ReadyCheck) -> Server {
        self.ready = check;
        self
    }

    /// Verifies the access token of every call that needs one and hands handlers the caller as
    /// a `crate::auth::Principal`.
    pub fn authenticate(mut self, authenticator: crate::auth::Authenticator) -> Server {
        self.auth = Some(authenticator);
        self
    }

    /// The longest request message per method (by default [`crate::limit::MAX_MESSAGE_BYTES`]
    /// for every one).
    pub fn size_limits(mut self, sizes: crate::limit::SizeLimits) -> Server {
        self.sizes = sizes;
        self
    }

    /// Answers cross-origin requests (CORS) as `cors` says (see [`cors_layer`]).
    pub fn cors(mut self, cors: Option<tower_http::cors::CorsLayer>) -> Server {
        self.cors = cors;
        self
    }

    /// How connections are treated (stream limit, body read timeout, drain delay, TLS).
    pub fn settings(mut self, settings: ServerSettings) -> Server {
        self.settings = settings;
        self
    }

    /// Everything that matches no service goes here (the gateway's proxy).
    pub fn fallback(mut self, router: axum::Router) -> Server {
        self.fallback = Some(router);
        self
    }

    /// Serves until `shutdown` fires, then stops accepting, reports NOT_SERVING and drains the
    /// calls in flight.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), tonic::transport::Error> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("descriptor sets are valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("descriptor sets are valid");

        let Server { role, mut routes, health, names, ready, fallback, auth, settings, cors, sizes } = self;
        routes.add_service(reflection_v1).add_service(reflection_v1alpha);

        let ops = {
            let ready = ready.clone();
            axum::Router::new()
                .route("/healthz", get(|| async { "ok\n" }))
                .route(
                    "/readyz",
                    get(move || {
                        let ready = ready.clone();
                        async move {
                            match ready().await {
                                Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                            }
                        }
                    }),
                )
                .route("/metrics", get(|| async { metrics_response() }))
        };
        // The services served here check whole messages; what the fallback forwards (the
        // gateway's proxy) is followed by its frame headers only, and the service behind checks
        // the messages.
        let limit = |guard| {
            crate::limit::MessageLimitLayer::by_method(sizes.clone(), guard).read_timeout(settings.read_timeout)
        };
        let services = routes.routes().into_axum_router().layer(limit(crate::limit::Guard::Messages));
        let mut router = services.merge(ops);
        if let Some(fallback) = fallback {
            router = router.fallback_service(fallback.layer(limit(crate::limit::Guard::Frames)));
        }
        let routes = Routes::from(router);

        let watcher = tokio::spawn(watch_readiness(health.clone(), names.clone(), ready, shutdown.clone()));
        let reloader = settings.tls.clone().map(|tls| {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { tls.watch(shutdown.wait()).await })
        });
        // Every call meets these layers, off the wire or from this process.
        let stack = tower::ServiceBuilder::new()
            .layer(tower::util::option_layer(cors))
            .layer(GrpcWebSwitchLayer)
            .layer(RpcLayer::new(role))
            .layer(tower::util::option_layer(auth.map(crate::auth::AuthLayer::new)));
        let in_process = match (settings.in_process, listener.local_addr()) {
            (true, Ok(addr)) => {
                let service = stack
                    .clone()
                    .map_err(Into::into)
                    .map_response(|response: http::Response<_>| response.map(Body::new))
                    .service(routes.clone());
                Some(crate::balance::local::register(addr, crate::balance::local::LocalService::new(service)))
            }
            _ => None,
        };
        let drain = {
            let health = health.clone();
            async move {
                shutdown.wait().await;
                set_all(&health, &names, ServingStatus::NotServing).await;
                // Still taking calls while those balancing over this server notice.
                tokio::time::sleep(settings.drain_delay).await;
                // Then no new calls, from the network or from this process.
                drop(in_process);
            }
        };

        let result = tonic::transport::Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(settings.max_concurrent_streams))
            .layer(stack)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming(listener, settings.read_timeout, settings.tls.clone()), drain)
            .await;
        watcher.abort();
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        result
    }
}

/// CORS for browser apps at `origins` ("*": any origin; none: no cross-origin calls):
/// preflights, and the headers gRPC-Web and REST need sent and read (the token, the gRPC status,
/// the retry delay). An entry that is not an origin (`https://crm.example.com`) is refused.
pub fn cors_layer(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, String> {
    use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
    use http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                let o = o.trim().trim_end_matches('/');
                match http::Uri::try_from(o) {
                    Ok(uri) if uri.scheme().is_some() && uri.host().is_some() && uri.path() == "/" => {
                        HeaderValue::from_str(o).map_err(|e| e.to_string())
                    }
                    _ => Err(format!("{o:?} is not an origin such as https://crm.example.com")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    let names = |names: &[&'static str]| names.iter().map(|n| HeaderName::from_static(n)).collect::<Vec<_>>();
    let mut request_headers = vec![AUTHORIZATION, CONTENT_TYPE];
    request_headers.extend(names(&["x-grpc-web", "x-user-agent", "grpc-timeout", "traceparent", "tracestate"]));
    let mut exposed = names(&["grpc-status", "grpc-message", "grpc-status-details-bin"]);
    exposed.push(RETRY_AFTER);
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers(request_headers)
            .expose_headers(exposed)
            .max_age(Duration::from_secs(600)),
    ))
}

/// Waits until the server at `addr` reports `service` ("" for the whole process) SERVING over
/// `grpc.health.v1`, for at most `within`.
pub async fn wait_serving(addr: std::net::SocketAddr, service: &str, within: Duration) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = tokio::time::Instant::now() + within;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let request = HealthCheckRequest { service: service.into() };
            if let Ok(r) = HealthClient::new(channel).check(request).await
                && r.into_inner().status == Status::Serving as i32
            {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{service:?} at {addr} did not report SERVING within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn metrics_response() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::render(),
    )
}

/// Connections waiting for their first bytes at once; beyond it, accepting waits.
const MAX_HANDSHAKES: usize = 4096;

/// Accepted connections with Nagle's algorithm off (tonic applies its own `tcp_nodelay` only to
/// listeners it binds itself, and small gRPC frames otherwise wait for delayed ACKs, ~40 ms),
/// handed to the server once the client has started sending: a connection silent for
/// `first_bytes` is closed, so idle sockets cannot pile up (HTTP/1.1 headers then have 30 s,
/// HTTP/2 streams the body read timeout). With `tls`, a connection whose first byte starts a
/// TLS handshake is served over TLS (the handshake, too, within `first_bytes`), and plaintext
/// unless TLS alone is allowed.
fn incoming(
    listener: TcpListener,
    first_bytes: Duration,
    tls: Option<crate::tls::Tls>,
) -> impl tokio_stream::Stream<Item = std::io::Result<crate::tls::Conn>> {
    use futures_util::StreamExt;

    use crate::tls::{Conn, Tls};
    let limit = if first_bytes.is_zero() { Duration::MAX } else { first_bytes };
    TcpListenerStream::new(listener)
        .map(move |accepted| {
            let tls = tls.clone();
            async move {
                let stream = accepted?;
                stream.set_nodelay(true)?;
                if first_bytes.is_zero() && tls.is_none() {
                    return Ok(Some(Conn::Plain(stream)));
                }
                let mut byte = [0u8; 1];
                let first = match tokio::time::timeout(limit, stream.peek(&mut byte)).await {
                    Ok(Ok(n)) if n > 0 => byte[0],
                    // Silent, or gone before saying anything.
                    _ => return Ok(None),
                };
                match tls {
                    Some(tls) if Tls::starts_tls(first) => {
                        match tokio::time::timeout(limit, tls.accept(stream)).await {
                            Ok(Ok(conn)) => Ok(Some(conn)),
                            Ok(Err(error)) => {
                                tracing::debug!(%error, "TLS handshake failed");
                                Ok(None)
                            }
                            Err(_) => Ok(None),
                        }
                    }
                    Some(tls) if tls.only() && !stream.peer_addr().is_ok_and(|a| a.ip().is_loopback()) => {
                        tracing::debug!("a plaintext connection refused: TLS only");
                        Ok(None)
                    }
                    _ => Ok(Some(Conn::Plain(stream))),
                }
            }
        })
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(|result: std::io::Result<Option<Conn>>| async move { result.transpose() })
}

async fn set_all(health: &HealthReporter, names: &[String], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in names {
        health.set_service_status(name, status).await;
    }
}

async fn watch_readiness(health: HealthReporter, names: Vec<String>, ready: ReadyCheck, shutdown: Shutdown) {
    let mut last = None;
    loop {
        if shutdown.is_fired() {
            return;
        }
        let status = match tokio::time::timeout(READY_INTERVAL, ready()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            Ok(Err(why)) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(reason = %why, "not ready");
                }
                ServingStatus::NotServing
            }
            Err(_) => ServingStatus::NotServing,
        };
        if last != Some(status) {
            set_all(&health, &names, status).await;
            last = Some(status);
        }
        tokio::time::sleep(READY_INTERVAL).await;
    }
}

/// Sends gRPC-Web requests through the gRPC-Web translation and everything else (gRPC, and
/// plain HTTP/1.1 such as `/healthz` probes, which the translation would refuse) straight on.
#[derive(Clone, Copy, Debug)]
struct GrpcWebSwitchLayer;

impl<S> tower::Layer<S> for GrpcWebSwitchLayer {
    type Service = GrpcWebSwitch<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcWebSwitch { plain: inner }
    }
}

#[derive(Clone, Debug)]
struct GrpcWebSwitch<S> {
    plain: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<Body>> for GrpcWebSwitch<S>
where
    S: Service<Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let is_web = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc-web"));
        // The router is always ready: take the polled one, leave a clone for the next call.
        let plain = self.plain.clone();
        let plain = std::mem::replace(&mut self.plain, plain);
        if is_web {
            let mut web = tower::Layer::layer(&tonic_web::GrpcWebLayer::new(), plain);
            Box::pin(web.call(req))
        } else {
            let mut plain = plain;
            Box::pin(plain.call(req))
        }
    }
}
