//! Replicas of a service this process calls: discovery by DNS, active and passive health, one
//! HTTP/2 connection per replica, power-of-two-choices selection by calls in flight, and
//! sending a call with failover while nothing of it has been sent.
//!
//! One mechanism for every caller: the gateway forwards client calls through a [`Pool`]
//! without decoding them, and a service's typed client to another service
//! ([`crate::peer::Peer`]) sends its calls through the same kind of pool.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tonic::Code;
use tonic::body::Body;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::metrics::{UpstreamLabels, metrics};
use crate::shutdown::Shutdown;

/// Longest wait for a TCP connection and HTTP/2 handshake to a replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a health-check answer once connected.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for one DNS resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Replicas tried for one call before it fails with UNAVAILABLE.
const MAX_ATTEMPTS: usize = 3;
/// Shortest discovery or health-check interval; smaller values are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// How often a process re-resolves the replicas of the services it calls, and health-checks
/// each of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    pub discovery: Duration,
    pub health: Duration,
}

impl Default for Intervals {
    fn default() -> Intervals {
        Intervals { discovery: Duration::from_secs(5), health: Duration::from_secs(1) }
    }
}

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

/// Why a call sent through a [`Pool`] got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No replica could take the call; nothing of it was sent, so it may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// The call failed on its way to or from a replica; it must not be sent twice blindly.
    #[error("{1}")]
    Failed(Code, String),
}

impl SendError {
    /// The gRPC code a caller sees.
    pub fn code(&self) -> Code {
        match self {
            SendError::Unavailable(_) => Code::Unavailable,
            SendError::Failed(code, _) => *code,
        }
    }
}

impl From<SendError> for tonic::Status {
    fn from(err: SendError) -> tonic::Status {
        tonic::Status::new(err.code(), err.to_string())
    }
}

/// One replica of a service.
pub struct Endpoint {
    addr: SocketAddr,
    authority: Authority,
    service: &'static str,
    labels: UpstreamLabels,
    /// Whether this replica's health is exported (see [`Pool::export_health`]).
    exported: Arc<AtomicBool>,
    healthy: AtomicBool,
    /// Set once discovery dropped the replica; its health is no longer exported.
    retired: AtomicBool,
    /// Set once a health-check loop watches the replica.
    watched: AtomicBool,
    in_flight: AtomicUsize,
    /// The live connection; cloned out for each call.
    conn: Mutex<Option<SendRequest<Body>>>,
    /// Held while (re)connecting so that one attempt runs at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Counts failed connection attempts: callers queued behind a failing attempt give up at
    /// once instead of each waiting out its own connect timeout.
    connect_failures: AtomicU64,
}

impl Endpoint {
    fn new(service: &'static str, addr: SocketAddr, exported: Arc<AtomicBool>) -> Endpoint {
        // Only the `:authority` of forwarded calls; the connection goes to `addr` regardless.
        let authority =
            Authority::try_from(addr.to_string().as_str()).unwrap_or_else(|_| Authority::from_static("upstream"));
        let labels = UpstreamLabels { upstream: service.to_string(), endpoint: addr.to_string() };
        let endpoint = Endpoint {
            addr,
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
    fn export(&self) {
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
    fn retire(&self) {
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
        let handshake = async {
            let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| ConnectError::Connect(addr, e))?;
            let _ = stream.set_nodelay(true);
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ConnectError::Handshake(addr, e))
        };
        let (sender, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| ConnectError::Timeout(addr))??;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection closed");
            }
        });
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
    type Response = Response<Incoming>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let endpoint = self.0.clone();
        Box::pin(async move {
            let mut sender = endpoint.sender().await?;
            if let Err(e) = sender.ready().await {
                endpoint.connection_lost();
                return Err(e.into());
            }
            Ok(sender.send_request(request).await?)
        })
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
    inner: Incoming,
    in_flight: Option<InFlight>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.in_flight = None,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.in_flight = None,
            _ => {}
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

/// The replicas of one service.
pub struct Pool {
    service: &'static str,
    /// Configured `host:port` targets.
    targets: Vec<String>,
    /// What each target resolved to last time it resolved, kept while its name does not.
    resolved: Mutex<Vec<Vec<SocketAddr>>>,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    /// Set by the first discovery, which the first call waits for.
    discovered: tokio::sync::OnceCell<()>,
    exported: Arc<AtomicBool>,
}

impl Pool {
    /// The replicas of `service` (its full name, for logs, errors and metrics) found at
    /// `targets` (`host:port`; each address a name resolves to is one replica).
    pub fn new(service: &'static str, targets: Vec<String>) -> Pool {
        let resolved = Mutex::new(vec![Vec::new(); targets.len()]);
        Pool {
            service,
            targets,
            resolved,
            endpoints: RwLock::new(Vec::new()),
            discovered: tokio::sync::OnceCell::new(),
            exported: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The full name of the service the replicas serve.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The configured targets.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Exports each replica's health on `/metrics` (`crm_gateway_upstream_up`): the gateway
    /// does for the services behind it.
    pub fn export_health(&self) {
        self.exported.store(true, Ordering::Relaxed);
        for endpoint in self.read().iter() {
            endpoint.export();
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Endpoint>>> {
        self.endpoints.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Known replicas.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.read().clone()
    }

    pub fn healthy_count(&self) -> usize {
        self.read().iter().filter(|e| e.is_healthy()).count()
    }

    /// Power of two choices among the healthy replicas not in `exclude`: two at random, the one
    /// with fewer calls in flight. When none is healthy, chooses among the other replicas all
    /// the same (a call may still get through; refusing it certainly fails it).
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let endpoints = self.read();
        let untried = |e: &&Arc<Endpoint>| !exclude.contains(&e.addr);
        let healthy = endpoints.iter().filter(untried).filter(|e| e.is_healthy());
        let mut rng = rand::rng();
        match choose_p2c(healthy, |e| e.in_flight(), &mut rng) {
            Some(e) => Some(e.clone()),
            None => choose_p2c(endpoints.iter().filter(untried), |e| e.in_flight(), &mut rng).cloned(),
        }
    }

    /// Re-resolves the targets; adds new addresses, drops vanished ones. A target that fails to
    /// resolve keeps what it resolved to last. Returns the replicas added.
    pub async fn discover(&self) -> Vec<Arc<Endpoint>> {
        let lookups = self.targets.iter().map(|target| async move {
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(target.as_str())).await {
                Ok(Ok(addrs)) => Some(addrs.collect::<Vec<_>>()).filter(|a| !a.is_empty()),
                Ok(Err(e)) => {
                    tracing::warn!(upstream = self.service, target = %target, error = %e, "cannot resolve");
                    None
                }
                Err(_) => {
                    tracing::warn!(upstream = self.service, target = %target, "resolving timed out");
                    None
                }
            }
        });
        let results = futures_util::future::join_all(lookups).await;
        let wanted: HashSet<SocketAddr> = {
            let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
            for (last, now) in resolved.iter_mut().zip(results) {
                if let Some(now) = now {
                    *last = now;
                }
            }
            resolved.iter().flatten().copied().collect()
        };
        {
            let current = self.read();
            if current.len() == wanted.len() && current.iter().all(|e| wanted.contains(&e.addr)) {
                return Vec::new();
            }
        }
        let mut endpoints = self.endpoints.write().unwrap_or_else(PoisonError::into_inner);
        endpoints.retain(|e| {
            let keep = wanted.contains(&e.addr);
            if !keep {
                tracing::info!(upstream = self.service, endpoint = %e.addr, "replica removed");
                e.retire();
            }
            keep
        });
        let mut added = Vec::new();
        for addr in wanted {
            if !endpoints.iter().any(|e| e.addr == addr) {
                tracing::info!(upstream = self.service, endpoint = %addr, "replica added");
                let endpoint = Arc::new(Endpoint::new(self.service, addr, self.exported.clone()));
                endpoints.push(endpoint.clone());
                added.push(endpoint);
            }
        }
        added
    }

    /// Sends a call to a replica chosen by [`Pool::pick`] and returns its response as it starts
    /// to arrive. A replica whose connection cannot be had (or turns out closed before the call
    /// was handed to it) is marked unhealthy and the call goes to another: nothing of it has
    /// been sent yet, so this is safe for any method.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<ResponseBody>, SendError> {
        self.discovered
            .get_or_init(|| async {
                self.discover().await;
            })
            .await;
        let (mut parts, body) = request.into_parts();
        parts.version = Version::HTTP_2;
        let path = parts.uri.path_and_query().cloned();
        let mut request = Request::from_parts(parts, body);

        let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_ATTEMPTS];
        let mut last_error = None;
        for attempt in 0..MAX_ATTEMPTS {
            let Some(endpoint) = self.pick(&tried[..attempt]) else { break };
            tried[attempt] = endpoint.addr();
            let in_flight = endpoint.track();
            let mut sender = match endpoint.sender().await {
                Ok(sender) => sender,
                Err(e) => {
                    endpoint.set_healthy(false);
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            if let Err(e) = sender.ready().await {
                endpoint.connection_lost();
                endpoint.set_healthy(false);
                last_error = Some(format!("connection to {} closed: {e}", endpoint.addr()));
                continue;
            }
            *request.uri_mut() = endpoint.uri(path.clone());
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|body| ResponseBody { inner: body, in_flight: Some(in_flight) }));
                }
                Err(mut e) => {
                    let closed = sender.is_closed();
                    if closed {
                        endpoint.connection_lost();
                        endpoint.set_healthy(false);
                    }
                    match e.take_message() {
                        Some(unsent) => {
                            request = unsent;
                            last_error = Some(format!("{} refused the call: {}", endpoint.addr(), e.into_error()));
                        }
                        None => {
                            let error = e.into_error();
                            // The call was on its way: it must not be sent twice.
                            let message =
                                format!("{}: call to replica {} failed: {error}", self.service, endpoint.addr());
                            let code = if closed { Code::Unavailable } else { code_of(error) };
                            return Err(SendError::Failed(code, message));
                        }
                    }
                }
            }
        }
        Err(SendError::Unavailable(match last_error {
            Some(e) => format!("no replica of {} could take the call; last error: {e}", self.service),
            None => format!("no replica of {} is available", self.service),
        }))
    }
}

/// The gRPC code for an HTTP/2 failure of a call in flight (a reset stream keeps its meaning;
/// anything the client did not ask for is UNAVAILABLE).
fn code_of(error: hyper::Error) -> Code {
    match tonic::Status::from_error(Box::new(error)).code() {
        Code::Unknown | Code::Cancelled | Code::Ok => Code::Unavailable,
        code => code,
    }
}

/// Keeps `pool` current until `shutdown` fires: re-resolves its targets every
/// `intervals.discovery`, and health-checks each replica every `intervals.health`, each in its
/// own loop so that a slow or hung replica delays no other's.
pub async fn maintain(pool: Arc<Pool>, intervals: Intervals, shutdown: Shutdown) {
    let mut checkers = tokio::task::JoinSet::new();
    let discovery = async {
        let mut tick = interval(intervals.discovery);
        loop {
            tick.tick().await;
            pool.discover().await;
            let _ = pool.discovered.set(());
            for endpoint in pool.endpoints() {
                if !endpoint.watched.swap(true, Ordering::Relaxed) {
                    checkers.spawn(watch(endpoint, intervals.health));
                }
            }
            while checkers.try_join_next().is_some() {}
        }
    };
    tokio::select! {
        () = discovery => {}
        () = shutdown.wait() => {}
    }
}

/// Health-checks one replica every `period` until discovery drops it.
async fn watch(endpoint: Arc<Endpoint>, period: Duration) {
    let mut tick = interval(period);
    loop {
        tick.tick().await;
        if endpoint.is_retired() {
            return;
        }
        endpoint.check().await;
    }
}

/// A ticker every `period` (at least [`MIN_INTERVAL`]) that does not catch up on missed ticks.
pub fn interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period.max(MIN_INTERVAL));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Picks the less loaded of two distinct random candidates (or the only one).
pub fn choose_p2c<I>(candidates: I, load: impl Fn(&I::Item) -> usize, rng: &mut impl Rng) -> Option<I::Item>
where
    I: Iterator + Clone,
{
    let n = candidates.clone().count();
    match n {
        0 => None,
        1 => candidates.into_iter().next(),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (first, second) = (a.min(b), a.max(b));
            let mut rest = candidates.skip(first);
            let x = rest.next()?;
            // The set may shrink between counting and walking (it never does for a slice).
            let Some(y) = rest.nth(second - first - 1) else { return Some(x) };
            // Ties go to the first one drawn, so that equal replicas share calls evenly.
            let (lx, ly) = (load(&x), load(&y));
            Some(if ly < lx || (ly == lx && a > b) { y } else { x })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2c_prefers_the_less_loaded_of_two() {
        let mut rng = rand::rng();
        let loads = [5_usize, 0];
        for _ in 0..100 {
            assert_eq!(choose_p2c(loads.iter(), |l| **l, &mut rng), Some(&0));
        }
        let reversed = [0_usize, 5];
        for _ in 0..100 {
            assert_eq!(choose_p2c(reversed.iter(), |l| **l, &mut rng), Some(&0));
        }
        assert_eq!(choose_p2c([].iter(), |l: &&usize| **l, &mut rng), None);
        assert_eq!(choose_p2c([7_usize].iter(), |l| **l, &mut rng), Some(&7));
        // Of three, the most loaded is never chosen: it loses to whichever other one is drawn.
        let three = [9_usize, 1, 2];
        for _ in 0..200 {
            assert_ne!(choose_p2c(three.iter(), |l| **l, &mut rng), Some(&9));
        }
        // With equal loads every candidate gets picked.
        let many = [0_usize, 1, 2, 3];
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            seen.insert(*choose_p2c(many.iter(), |_| 0, &mut rng).unwrap());
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn pick_skips_unhealthy_and_tried_replicas() {
        let pool = Pool::new("svc.S", Vec::new());
        let a = Arc::new(Endpoint::new("svc.S", "127.0.0.1:1".parse().unwrap(), Default::default()));
        let b = Arc::new(Endpoint::new("svc.S", "127.0.0.1:2".parse().unwrap(), Default::default()));
        pool.endpoints.write().unwrap().extend([a.clone(), b.clone()]);
        // None healthy: any untried replica is still tried.
        assert!(pool.pick(&[]).is_some());
        assert_eq!(pool.pick(&[a.addr]).unwrap().addr, b.addr);
        assert!(pool.pick(&[a.addr, b.addr]).is_none());
        a.set_healthy(true);
        for _ in 0..50 {
            assert_eq!(pool.pick(&[]).unwrap().addr, a.addr);
        }
        b.set_healthy(true);
        let _busy = [a.track(), a.track()];
        for _ in 0..50 {
            assert_eq!(pool.pick(&[]).unwrap().addr, b.addr, "the less loaded replica wins");
        }
        assert_eq!(pool.pick(&[b.addr]).unwrap().addr, a.addr);
        drop(_busy);
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn builds_replica_uris() {
        let e = Endpoint::new("svc.S", "[::1]:50051".parse().unwrap(), Default::default());
        let uri = e.uri(Some(PathAndQuery::from_static("/crm.contacts.v1.ContactsService/GetPerson")));
        assert_eq!(uri.to_string(), "http://[::1]:50051/crm.contacts.v1.ContactsService/GetPerson");
    }

    #[tokio::test]
    async fn discovery_resolves_and_keeps_on_failure() {
        let pool = Pool::new("svc.S", vec!["127.0.0.1:1".into(), "localhost:2".into()]);
        let added = pool.discover().await;
        let ports: HashSet<u16> = pool.endpoints().iter().map(|e| e.addr.port()).collect();
        assert!(ports.contains(&1) && ports.contains(&2), "{ports:?}");
        assert_eq!(added.len(), pool.len());
        assert!(pool.discover().await.is_empty(), "nothing new the second time");
        assert_eq!(pool.healthy_count(), 0, "new replicas wait for their first health check");
        for endpoint in pool.endpoints() {
            endpoint.check().await;
        }
        assert_eq!(pool.healthy_count(), 0, "nothing listens there");
        let bad = Pool::new("svc.S", vec!["no-such-host.invalid:1".into()]);
        bad.discover().await;
        assert_eq!(bad.len(), 0);
        assert!(bad.pick(&[]).is_none());
    }
}
