//! One replica: its HTTP/2 connection, health, and the calls in flight on it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::body::Body;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::local::BoxError;
use crate::metrics::{UpstreamLabels, metrics};

/// Longest wait for a TCP connection and HTTP/2 handshake to a replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a health-check answer once connected.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a replica could not take a call.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("{0} is unreachable")]
    Unreachable(SocketAddr),
}

/// One replica of a service.
pub struct Endpoint {
    addr: SocketAddr,
    /// TLS to the replica, verified as the host it was configured with.
    tls: Option<(crate::tls::PeerTls, String)>,
    authority: Authority,
    service: &'static str,
    labels: UpstreamLabels,
    /// Whether this replica's health is exported (see [`Pool::export_health`]).
    exported: Arc<AtomicBool>,
    healthy: AtomicBool,
    /// Set once discovery dropped the replica; its health is no longer exported.
    retired: AtomicBool,
    /// Set once a health-check loop watches the replica.
    pub(super) watched: AtomicBool,
    in_flight: AtomicUsize,
    /// The live connection; cloned out for each call.
    conn: Mutex<Option<SendRequest<Body>>>,
    /// Held while (re)connecting so that one attempt runs at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Counts failed connection attempts: callers queued behind a failing attempt give up at
    /// once instead of each waiting out its own connect timeout.
    connect_failures: AtomicU64,
    /// Set once the replica was found served by this process (logged once).
    in_process: AtomicBool,
}

impl Endpoint {
    /// A replica, called over TLS when `tls` is given (with the host name its certificate must
    /// carry).
    pub(super) fn new(
        service: &'static str,
        addr: SocketAddr,
        exported: Arc<AtomicBool>,
        tls: Option<(crate::tls::PeerTls, String)>,
    ) -> Endpoint {
        // Only the `:authority` of forwarded calls; the connection goes to `addr` regardless.
        let authority =
            Authority::try_from(addr.to_string().as_str()).unwrap_or_else(|_| Authority::from_static("upstream"));
        let labels = UpstreamLabels { upstream: service.to_string(), endpoint: addr.to_string() };
        let endpoint = Endpoint {
            addr,
            tls,
            authority,
            service,
            labels,
            exported,
            healthy: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            watched: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            connect_failures: AtomicU64::new(0),
            in_process: AtomicBool::new(false),
        };
        endpoint.export();
        endpoint
    }

    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Writes the replica's health to `/metrics`, if its pool's health is exported.
    pub(super) fn export(&self) {
        if self.exported.load(Ordering::Relaxed) && !self.retired.load(Ordering::Relaxed) {
            metrics().upstream_up.get_or_create(&self.labels).set(i64::from(self.is_healthy()));
        }
    }

    /// Records the replica's health; logs and exports changes.
    pub fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            if healthy {
                tracing::info!(upstream = self.service, endpoint = %self.addr, "replica healthy");
            } else {
                tracing::warn!(upstream = self.service, endpoint = %self.addr, "replica unhealthy");
            }
            self.export();
        }
    }

    /// Whether discovery dropped the replica.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Stops exporting the health of a replica that discovery dropped.
    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        metrics().upstream_up.remove(&self.labels);
    }

    /// `http://<replica>/<path>` for a call sent to this replica.
    pub fn uri(&self, path: Option<PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// The replica's service stack, when this process serves it (see [`super::local`]).
    pub(super) fn local(&self) -> Option<super::local::LocalService> {
        let local = super::local::find(self.addr);
        if local.is_some() && !self.in_process.swap(true, Ordering::Relaxed) {
            tracing::info!(upstream = self.service, endpoint = %self.addr, "replica served by this process: called without the network");
        }
        local
    }

    /// Sends `request` to the replica: in the process when it is served here, else over its
    /// HTTP/2 connection (connecting first if there is none).
    pub(super) async fn call(&self, request: Request<Body>) -> Result<Response<ResponseBody>, BoxError> {
        if let Some(local) = self.local() {
            return Ok(self.call_local(local, request, None).await);
        }
        let mut sender = self.sender().await?;
        if let Err(e) = sender.ready().await {
            self.connection_lost();
            return Err(e.into());
        }
        let response = sender.send_request(request).await?;
        Ok(response.map(|body| ResponseBody { inner: Inner::Remote(body), in_flight: None }))
    }

    /// Hands `request` to `local`, the replica's stack in this process; the response body
    /// keeps `in_flight` until it ends.
    pub(super) async fn call_local(
        &self,
        local: super::local::LocalService,
        request: Request<Body>,
        in_flight: Option<InFlight>,
    ) -> Response<ResponseBody> {
        let response = super::local::call(local, request, self.addr).await;
        response.map(|body| ResponseBody { inner: Inner::Local(body), in_flight })
    }

    fn cached(&self) -> Option<SendRequest<Body>> {
        let slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Forgets a connection found closed, so the next call reconnects.
    pub fn connection_lost(&self) {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|s| s.is_closed()) {
            *slot = None;
        }
    }

    /// A handle on the live connection, connecting first if there is none.
    pub async fn sender(&self) -> Result<SendRequest<Body>, ConnectError> {
        if let Some(sender) = self.cached() {
            return Ok(sender);
        }
        let failures = self.connect_failures.load(Ordering::Acquire);
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.cached() {
            return Ok(sender);
        }
        if self.connect_failures.load(Ordering::Acquire) != failures {
            return Err(ConnectError::Unreachable(self.addr));
        }
        match self.connect().await {
            Ok(sender) => {
                *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
                Ok(sender)
            }
            Err(e) => {
                self.connect_failures.fetch_add(1, Ordering::Release);
                Err(e)
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, ConnectError> {
        let addr = self.addr;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let closed = move |result: Result<(), hyper::Error>| {
            if let Err(e) = result {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection closed");
            }
        };
        let handshake = async {
            let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| ConnectError::Connect(addr, e))?;
            let _ = stream.set_nodelay(true);
            let sender = match &self.tls {
                None => {
                    let (sender, connection) =
                        builder.handshake(TokioIo::new(stream)).await.map_err(|e| ConnectError::Handshake(addr, e))?;
                    tokio::spawn(async move { closed(connection.await) });
                    sender
                }
                Some((tls, host)) => {
                    let stream = tls.connect(host, stream).await.map_err(|e| ConnectError::Connect(addr, e))?;
                    let (sender, connection) =
                        builder.handshake(TokioIo::new(stream)).await.map_err(|e| ConnectError::Handshake(addr, e))?;
                    tokio::spawn(async move { closed(connection.await) });
                    sender
                }
            };
            Ok::<_, ConnectError>(sender)
        };
        let sender =
            tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| ConnectError::Timeout(addr))??;
        tracing::debug!(upstream = self.service, endpoint = %addr, "connected");
        Ok(sender)
    }

    /// Counts a call in flight until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Asks the replica's `grpc.health.v1.Health/Check` (service "") over its connection and
    /// records the answer: SERVING is healthy, anything else (or no answer) is not.
    pub async fn check(self: &Arc<Self>) {
        let mut client = HealthClient::with_origin(Connection(self.clone()), self.uri(None));
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.set_timeout(HEALTH_TIMEOUT);
        let healthy = match tokio::time::timeout(CONNECT_TIMEOUT + HEALTH_TIMEOUT, client.check(request)).await {
            Ok(Ok(response)) => response.into_inner().status == ServingStatus::Serving as i32,
            Ok(Err(status)) => {
                if self.is_healthy() {
                    tracing::debug!(endpoint = %self.addr, error = %status, "health check failed");
                }
                false
            }
            Err(_) => false,
        };
        self.set_healthy(healthy);
    }
}

/// The replica's connection as a tower service, for the health client.
#[derive(Clone)]
struct Connection(Arc<Endpoint>);

impl tower::Service<Request<Body>> for Connection {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let endpoint = self.0.clone();
        Box::pin(async move { endpoint.call(request).await })
    }
}

/// A call in flight on a replica.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A replica's response body, passed through frame by frame; the call stops counting as in
/// flight on its replica when the body ends or is dropped.
pub struct ResponseBody {
    pub(super) inner: Inner,
    pub(super) in_flight: Option<InFlight>,
}

/// Where a response body comes from: the replica's connection, or its stack in this process.
pub(super) enum Inner {
    Remote(Incoming),
    Local(Body),
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.inner {
            Inner::Remote(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Local(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        };
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.in_flight = None,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.in_flight = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Remote(body) => body.is_end_stream(),
            Inner::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Inner::Remote(body) => body.size_hint(),
            Inner::Local(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_replica_uris() {
        let e = Endpoint::new("svc.S", "[::1]:50051".parse().unwrap(), Default::default(), None);
        let uri = e.uri(Some(PathAndQuery::from_static("/crm.contacts.v1.ContactsService/GetPerson")));
        assert_eq!(uri.to_string(), "http://[::1]:50051/crm.contacts.v1.ContactsService/GetPerson");
    }
}
