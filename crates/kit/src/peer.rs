//! Calls between services (ARCHITECTURE §2): one client type per callee, whether the callee
//! runs in the same process (each role on its own loopback port, as `crm dev` runs them) or as
//! replicas behind a DNS name. Either way its calls go through a [`Pool`]: the gateway's
//! discovery, health checks and power-of-two-choices balancing.
//!
//! [`Peers`] holds one pool per callee for the whole process, shared by every role in it (and by
//! the gateway, which forwards through the same pools). A call carries the caller's token
//! ([`Peer::as_caller`]), the suite's service-account token for work a service does for itself
//! ([`Peer::as_service`]), or none for the calls that need none ([`Peer::anonymous`]).
//!
//! ```ignore
//! let auth = ctx.peers().peer("auth")?;
//! let me = AuthServiceClient::new(auth.as_caller(&principal)).get_me(GetMeRequest {}).await?;
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tonic::body::Body;

use crate::auth::{AUTH_ROLE, Principal, ScopeCache, ServiceCredentials, ServiceTokens, Verifier, Visibility};
use crate::balance::{Intervals, Pool, ResponseBody};
use crate::error::ApiError;
use crate::shutdown::Shutdown;

/// Longest wait for a callee's response headers.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A role this process may call: its name, its main gRPC service (for logs and errors) and
/// where its replicas are.
#[derive(Debug, Clone)]
pub struct Callee {
    pub role: &'static str,
    pub service: &'static str,
    /// `host:port` targets; empty: not configured.
    pub addrs: Vec<String>,
}

struct Inner {
    callees: HashMap<&'static str, Callee>,
    pools: Mutex<HashMap<&'static str, Arc<Pool>>>,
    intervals: Intervals,
    keys_refresh: Duration,
    credentials: Option<ServiceCredentials>,
    tokens: OnceLock<Option<ServiceTokens>>,
    verifier: OnceLock<Verifier>,
    visibility: Visibility,
    scopes: OnceLock<ScopeCache>,
    /// TLS to the callees, when they are called over TLS.
    tls: Option<crate::tls::PeerTls>,
    shutdown: Shutdown,
}

/// How this process reaches the roles it calls.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut callees: Vec<_> = self.inner.callees.values().map(|c| (c.role, &c.addrs)).collect();
        callees.sort();
        f.debug_struct("Peers").field("callees", &callees).finish_non_exhaustive()
    }
}

/// Why a callee cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no replicas of {role} are configured: set {flag} ({env})")]
pub struct NotConfigured {
    pub role: String,
    pub flag: String,
    pub env: String,
}

impl Peers {
    /// The callees of this process; pools are kept current (re-resolved, health-checked) every
    /// `intervals` until `shutdown`. `keys_refresh` is how often token verification keys are
    /// refetched; `credentials` are the suite's service account, if this process has it.
    pub fn new(
        callees: impl IntoIterator<Item = Callee>,
        intervals: Intervals,
        keys_refresh: Duration,
        credentials: Option<ServiceCredentials>,
        shutdown: Shutdown,
    ) -> Peers {
        Peers {
            inner: Arc::new(Inner {
                callees: callees.into_iter().map(|c| (c.role, c)).collect(),
                pools: Mutex::new(HashMap::new()),
                intervals,
                keys_refresh,
                credentials,
                tokens: OnceLock::new(),
                verifier: OnceLock::new(),
                visibility: Visibility::default(),
                scopes: OnceLock::new(),
                tls: None,
                shutdown,
            }),
        }
    }

    /// Caches data scopes as `visibility` says; call it on the new `Peers`, before it is cloned
    /// (later it changes nothing). The default is [`Visibility::default`].
    pub fn with_visibility(mut self, visibility: Visibility) -> Peers {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.visibility = visibility;
        }
        self
    }

    /// Calls the other roles over `tls` (None: plaintext); call it on the new `Peers`, as
    /// [`Peers::with_visibility`].
    pub fn with_tls(mut self, tls: Option<crate::tls::PeerTls>) -> Peers {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.tls = tls;
        }
        self
    }

    /// The callers' data scopes, resolved by the auth service: one cache for every role in the
    /// process.
    pub fn scopes(&self) -> Result<ScopeCache, NotConfigured> {
        if let Some(scopes) = self.inner.scopes.get() {
            return Ok(scopes.clone());
        }
        let auth = self.peer(AUTH_ROLE)?;
        let Visibility { ttl, stale_for } = self.inner.visibility;
        Ok(self.inner.scopes.get_or_init(|| ScopeCache::remote(auth, ttl).stale_for(stale_for)).clone())
    }

    /// The replicas of `role`, one pool for the whole process.
    pub fn peer(&self, role: &str) -> Result<Peer, NotConfigured> {
        let pool = self.pool(role)?;
        Ok(Peer { pool, tokens: self.tokens() })
    }

    fn pool(&self, role: &str) -> Result<Arc<Pool>, NotConfigured> {
        let callee = self.inner.callees.get(role).filter(|c| !c.addrs.is_empty()).ok_or_else(|| {
            let names = crate::role::flag(role, "addr");
            NotConfigured { role: role.to_string(), flag: format!("--{}", names.long), env: names.env }
        })?;
        let mut pools = self.inner.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(callee.role) {
            return Ok(pool.clone());
        }
        let pool = Arc::new(Pool::new(callee.service, callee.addrs.clone()).with_tls(self.inner.tls.clone()));
        tokio::spawn(crate::balance::maintain(pool.clone(), self.inner.intervals, self.inner.shutdown.clone()));
        pools.insert(callee.role, pool.clone());
        Ok(pool)
    }

    /// The suite's service-account tokens, when this process has the credentials and can reach
    /// auth.
    fn tokens(&self) -> Option<ServiceTokens> {
        self.inner
            .tokens
            .get_or_init(|| {
                let credentials = self.inner.credentials.clone()?;
                let auth = self.pool(AUTH_ROLE).ok()?;
                Some(ServiceTokens::new(credentials, Peer { pool: auth, tokens: None }))
            })
            .clone()
    }

    /// The token verifier of this process: keys from the auth service's replicas, one key set
    /// for every role in the process.
    pub fn verifier(&self) -> Result<Verifier, NotConfigured> {
        if let Some(verifier) = self.inner.verifier.get() {
            return Ok(verifier.clone());
        }
        let auth = self.peer(AUTH_ROLE)?;
        Ok(self.inner.verifier.get_or_init(|| Verifier::remote(auth, self.inner.keys_refresh)).clone())
    }

    /// The suite's service account, if this process was given it.
    pub fn credentials(&self) -> Option<&ServiceCredentials> {
        self.inner.credentials.as_ref()
    }
}

/// A role this process calls.
#[derive(Clone)]
pub struct Peer {
    pool: Arc<Pool>,
    tokens: Option<ServiceTokens>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("service", &self.pool.service()).finish_non_exhaustive()
    }
}

impl Peer {
    /// Its replicas.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// A channel for calls that need no token (sign-in, published keys).
    pub fn anonymous(&self) -> PeerChannel {
        PeerChannel { pool: self.pool.clone(), authorization: None }
    }

    /// A channel whose calls carry `principal`'s own token: the callee sees the caller.
    pub fn as_caller(&self, principal: &Principal) -> PeerChannel {
        let authorization = HeaderValue::from_str(&format!("Bearer {}", principal.bearer())).ok();
        PeerChannel { pool: self.pool.clone(), authorization }
    }

    /// A channel whose calls carry the suite's service-account token, for calls a service makes
    /// for itself.
    pub async fn as_service(&self) -> Result<PeerChannel, ApiError> {
        let tokens = self.tokens.as_ref().ok_or_else(|| {
            ApiError::Internal(
                "this process has no service account: set CRM_SERVICE_CLIENT_ID and CRM_SERVICE_CLIENT_SECRET".into(),
            )
        })?;
        let token = tokens.token().await?;
        let authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ApiError::Internal("the service token is not a valid header value".into()))?;
        Ok(PeerChannel { pool: self.pool.clone(), authorization: Some(authorization) })
    }
}

/// A channel to one role's replicas for its generated gRPC client
/// (`AuthServiceClient::new(channel)`), carrying a token or none, and the caller's trace
/// context.
#[derive(Clone)]
pub struct PeerChannel {
    pool: Arc<Pool>,
    authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for PeerChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerChannel")
            .field("service", &self.pool.service())
            .field("authorized", &self.authorization.is_some())
            .finish()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<Body>> for PeerChannel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(http::header::AUTHORIZATION, authorization.clone());
        }
        crate::telemetry::inject_context(&tracing::Span::current(), request.headers_mut());
        let pool = self.pool.clone();
        Box::pin(async move {
            match tokio::time::timeout(CALL_TIMEOUT, pool.send(request)).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(err)) => Err(Box::new(tonic::Status::from(err)) as BoxError),
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "{} did not answer within {CALL_TIMEOUT:?}",
                    pool.service()
                ))) as BoxError),
            }
        })
    }
}
