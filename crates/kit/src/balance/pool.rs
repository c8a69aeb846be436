//! The replicas of one service: discovery by DNS, power-of-two-choices selection, and sending a
//! call with failover while nothing of it has been sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http::{Request, Response, Version};
use tonic::Code;
use tonic::body::Body;

use super::choose_p2c;
use super::endpoint::{Endpoint, Inner, ResponseBody};

/// Longest wait for one DNS resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Replicas tried for one call before it fails with UNAVAILABLE.
const MAX_ATTEMPTS: usize = 3;

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

/// The host of a `host:port` target ("[::1]:50051" → "::1").
fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A request extension: a replica the call should not go to when another can take it (a
/// retry after that replica answered UNAVAILABLE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avoid(pub SocketAddr);

/// A response extension: the replica that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica(pub SocketAddr);

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
    /// TLS to the replicas, if they are called over TLS.
    tls: Option<crate::tls::PeerTls>,
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
            tls: None,
        }
    }

    /// Calls the replicas over `tls`, each verified as the host of its target.
    pub fn with_tls(mut self, tls: Option<crate::tls::PeerTls>) -> Pool {
        self.tls = tls;
        self
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

    /// Records that the first discovery is done (calls no longer wait for one).
    pub(super) fn mark_discovered(&self) {
        let _ = self.discovered.set(());
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
        let untried = |e: &&Arc<Endpoint>| !exclude.contains(&e.addr());
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
        // Each address with the host of the target it came from (the name TLS verifies).
        let wanted: HashMap<SocketAddr, &str> = {
            let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
            for (last, now) in resolved.iter_mut().zip(results) {
                if let Some(now) = now {
                    *last = now;
                }
            }
            resolved
                .iter()
                .zip(&self.targets)
                .flat_map(|(addrs, target)| addrs.iter().map(move |a| (*a, host_of(target))))
                .collect()
        };
        {
            let current = self.read();
            if current.len() == wanted.len() && current.iter().all(|e| wanted.contains_key(&e.addr())) {
                return Vec::new();
            }
        }
        let mut endpoints = self.endpoints.write().unwrap_or_else(PoisonError::into_inner);
        endpoints.retain(|e| {
            let keep = wanted.contains_key(&e.addr());
            if !keep {
                tracing::info!(upstream = self.service, endpoint = %e.addr(), "replica removed");
                e.retire();
            }
            keep
        });
        let mut added = Vec::new();
        for (addr, host) in wanted {
            if !endpoints.iter().any(|e| e.addr() == addr) {
                tracing::info!(upstream = self.service, endpoint = %addr, "replica added");
                let tls = self.tls.clone().map(|tls| (tls, host.to_string()));
                let endpoint = Arc::new(Endpoint::new(self.service, addr, self.exported.clone(), tls));
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

        let avoid = request.extensions().get::<Avoid>().map(|a| a.0);
        let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_ATTEMPTS];
        let mut last_error = None;
        for attempt in 0..MAX_ATTEMPTS {
            let preferred = match avoid {
                Some(avoid) if attempt == 0 => self.pick(&[avoid]),
                _ => None,
            };
            let Some(endpoint) = preferred.or_else(|| self.pick(&tried[..attempt])) else { break };
            tried[attempt] = endpoint.addr();
            let in_flight = endpoint.track();
            if let Some(local) = endpoint.local() {
                *request.uri_mut() = endpoint.uri(path.clone());
                let mut response = endpoint.call_local(local, request, Some(in_flight)).await;
                response.extensions_mut().insert(Replica(endpoint.addr()));
                return Ok(response);
            }
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
                Ok(mut response) => {
                    response.extensions_mut().insert(Replica(endpoint.addr()));
                    return Ok(
                        response.map(|body| ResponseBody { inner: Inner::Remote(body), in_flight: Some(in_flight) })
                    );
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
                            // The call was on its way: it must not be sent twice. Replica
                            // addresses go to the log, never to the client.
                            tracing::warn!(upstream = self.service, endpoint = %endpoint.addr(), error = %error,
                                "call to a replica failed on its way");
                            let message = format!("{}: the call failed on its way: {error}", self.service);
                            let code = if closed { Code::Unavailable } else { code_of(error) };
                            return Err(SendError::Failed(code, message));
                        }
                    }
                }
            }
        }
        Err(SendError::Unavailable(match last_error {
            Some(e) => {
                tracing::warn!(upstream = self.service, error = %e, "no replica could take a call");
                format!("no replica of {} could take the call", self.service)
            }
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn targets_name_their_hosts() {
        assert_eq!(host_of("contacts.crm.svc:50051"), "contacts.crm.svc");
        assert_eq!(host_of("127.0.0.1:50051"), "127.0.0.1");
        assert_eq!(host_of("[::1]:50051"), "::1");
    }

    #[test]
    fn pick_skips_unhealthy_and_tried_replicas() {
        let pool = Pool::new("svc.S", Vec::new());
        let a = Arc::new(Endpoint::new("svc.S", "127.0.0.1:1".parse().unwrap(), Default::default(), None));
        let b = Arc::new(Endpoint::new("svc.S", "127.0.0.1:2".parse().unwrap(), Default::default(), None));
        pool.endpoints.write().unwrap().extend([a.clone(), b.clone()]);
        // None healthy: any untried replica is still tried.
        assert!(pool.pick(&[]).is_some());
        assert_eq!(pool.pick(&[a.addr()]).unwrap().addr(), b.addr());
        assert!(pool.pick(&[a.addr(), b.addr()]).is_none());
        a.set_healthy(true);
        for _ in 0..50 {
            assert_eq!(pool.pick(&[]).unwrap().addr(), a.addr());
        }
        b.set_healthy(true);
        let _busy = [a.track(), a.track()];
        for _ in 0..50 {
            assert_eq!(pool.pick(&[]).unwrap().addr(), b.addr(), "the less loaded replica wins");
        }
        assert_eq!(pool.pick(&[b.addr()]).unwrap().addr(), a.addr());
        drop(_busy);
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test]
    async fn discovery_resolves_and_keeps_on_failure() {
        let pool = Pool::new("svc.S", vec!["127.0.0.1:1".into(), "localhost:2".into()]);
        let added = pool.discover().await;
        let ports: HashSet<u16> = pool.endpoints().iter().map(|e| e.addr().port()).collect();
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
