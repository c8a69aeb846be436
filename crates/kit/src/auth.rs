//! Identity in every process (ARCHITECTURE §5): access tokens are EdDSA-signed JWTs that each
//! process verifies locally against the auth service's published keys (cached, refetched when a
//! token names a key not seen yet), turning them into a [`Principal`] that handlers read from
//! the request. [`Visibility`] answers which record owners a principal may see, cached briefly.
//!
//! The auth service signs with [`SigningKey`]; everything else only verifies.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crm_proto::auth::v1::auth_service_client::AuthServiceClient;
use crm_proto::auth::v1::{Jwk, Jwks};
use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::error::ApiError;

/// Read companies and people.
pub const CONTACTS_READ: &str = "contacts.read";
/// Create, change and delete companies and people.
pub const CONTACTS_WRITE: &str = "contacts.write";
/// Read the organisation: departments, users, roles.
pub const ORG_READ: &str = "org.read";
/// Change the organisation, service accounts and signing keys; read the security audit.
pub const ORG_ADMIN: &str = "org.admin";
/// Every permission a role can carry.
pub const PERMISSIONS: &[&str] = &[CONTACTS_READ, CONTACTS_WRITE, ORG_READ, ORG_ADMIN];

/// The `iss` of every access token.
pub const ISSUER: &str = "crm";

/// Calls that take no access token: they are how a caller gets one, gives one back, or checks one.
pub const PUBLIC_METHODS: &[&str] = &[
    "/crm.auth.v1.AuthService/SignIn",
    "/crm.auth.v1.AuthService/Refresh",
    "/crm.auth.v1.AuthService/SignOut",
    "/crm.auth.v1.AuthService/IssueServiceToken",
    "/crm.auth.v1.AuthService/GetJwks",
];

/// Clock skew tolerated on `exp`.
const LEEWAY_SECONDS: u64 = 5;
/// Shortest interval between two key fetches caused by unknown key ids (a flood of forged
/// `kid`s must not become a flood of fetches).
const MIN_REFETCH: Duration = Duration::from_secs(1);

/// What an access token asserts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Claims {
    pub iss: String,
    /// User id, or service account id when `svc`.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Token id.
    pub jti: String,
    #[serde(default)]
    pub svc: bool,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub email: String,
    /// Department id at issue time.
    #[serde(default)]
    pub dept: String,
    /// Permissions at issue time.
    #[serde(default)]
    pub perms: Vec<String>,
}

/// An Ed25519 key that signs access tokens.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    pkcs8: Arc<[u8]>,
    public: Vec<u8>,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key named by a new UUIDv7.
    pub fn generate() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("the system random source works");
        SigningKey::from_pkcs8(crate::validate::new_id(), pkcs8.as_ref()).expect("a generated key is valid")
    }

    /// A stored key.
    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<SigningKey, String> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| format!("signing key {kid} is not an Ed25519 PKCS#8 key"))?;
        Ok(SigningKey {
            public: pair.public_key().as_ref().to_vec(),
            encoding: EncodingKey::from_ed_der(pkcs8),
            pkcs8: pkcs8.into(),
            kid,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER, for storage.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK (RFC 8037).
    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            kid: self.kid.clone(),
            x: URL_SAFE_NO_PAD.encode(&self.public),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }

    /// A compact JWT whose header names this key.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("claims serialize and Ed25519 signs")
    }
}

/// How a process reaches the auth service (every role but auth itself).
#[derive(clap::Args, Debug, Clone)]
pub struct AuthClientArgs {
    /// Auth service replicas: comma-separated host:port list (DNS names resolve to every
    /// replica). Token verification keys and data scopes come from there.
    #[arg(long = "auth-addr", value_name = "HOST:PORT,...", env = "CRM_AUTH_ADDR", value_delimiter = ',')]
    pub auth_addr: Vec<String>,
    /// How often the token verification keys are refetched (a token signed by a key not seen
    /// yet fetches them at once), e.g. "60s".
    #[arg(
        long = "keys-refresh-interval",
        value_name = "DURATION",
        env = "CRM_KEYS_REFRESH_INTERVAL",
        default_value = "60s",
        value_parser = crate::config::parse_duration
    )]
    pub keys_refresh_interval: Duration,
}

impl AuthClientArgs {
    pub fn new(auth_addr: Vec<String>) -> AuthClientArgs {
        AuthClientArgs { auth_addr, keys_refresh_interval: Duration::from_secs(60) }
    }

    /// The configured addresses, trimmed, empty ones dropped.
    pub fn addrs(&self) -> Vec<String> {
        self.auth_addr.iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect()
    }

    /// A verifier over the auth service's published keys.
    pub fn verifier(&self) -> Result<Verifier, String> {
        Verifier::remote(&self.addrs(), self.keys_refresh_interval)
    }
}

/// Where a [`Verifier`] gets the published keys.
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>>;
}

/// The auth service's `GetJwks`, over gRPC.
struct RemoteKeys {
    client: AuthServiceClient<Channel>,
}

impl KeySource for RemoteKeys {
    fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            client
                .get_jwks(crm_proto::auth::v1::GetJwksRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("auth service GetJwks: {} ({:?})", s.message(), s.code()))
        })
    }
}

/// A channel to the auth service's replicas (`host:port` each), connected on first use.
pub fn auth_channel(addrs: &[String]) -> Result<Channel, String> {
    let endpoints = addrs
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .map(|a| {
            Endpoint::from_shared(format!("http://{a}"))
                .map(|e| e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)).tcp_nodelay(true))
                .map_err(|e| format!("auth address {a:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match endpoints.len() {
        0 => Err("no auth service address configured: set --auth-addr (CRM_AUTH_ADDR)".into()),
        1 => Ok(endpoints.into_iter().next().expect("one").connect_lazy()),
        _ => Ok(Channel::balance_list(endpoints.into_iter())),
    }
}

struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    jwks: Jwks,
}

struct VerifierInner {
    source: Arc<dyn KeySource>,
    keys: RwLock<Arc<KeySet>>,
    /// When keys were last fetched; held while fetching so that concurrent misses fetch once.
    fetched: tokio::sync::Mutex<Option<Instant>>,
    validation: Validation,
}

/// Verifies access tokens against cached published keys.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<VerifierInner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self.keys().by_kid.keys().cloned().collect();
        f.debug_struct("Verifier").field("kids", &kids).finish()
    }
}

impl Verifier {
    /// A verifier with no keys yet: the first token fetches them.
    pub fn new(source: Arc<dyn KeySource>) -> Verifier {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_aud = false;
        Verifier {
            inner: Arc::new(VerifierInner {
                source,
                keys: RwLock::new(Arc::new(KeySet { by_kid: HashMap::new(), jwks: Jwks::default() })),
                fetched: tokio::sync::Mutex::new(None),
                validation,
            }),
        }
    }

    /// A verifier fetching keys from the auth service at `addrs`, refreshing them every
    /// `refresh_every` (so that keys retired by the auth service stop verifying).
    pub fn remote(addrs: &[String], refresh_every: Duration) -> Result<Verifier, String> {
        let verifier = Verifier::new(Arc::new(RemoteKeys { client: AuthServiceClient::new(auth_channel(addrs)?) }));
        verifier.spawn_refresh(refresh_every);
        Ok(verifier)
    }

    /// Refreshes the keys every `every` for as long as the verifier is in use.
    pub fn spawn_refresh(&self, every: Duration) {
        let weak: Weak<VerifierInner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every.max(MIN_REFETCH)).await;
                let Some(inner) = weak.upgrade() else { return };
                let verifier = Verifier { inner };
                if let Err(err) = verifier.fetch(Duration::ZERO).await {
                    tracing::warn!(error = %err, "cannot refresh the token verification keys");
                }
            }
        });
    }

    fn keys(&self) -> Arc<KeySet> {
        self.inner.keys.read().expect("key set lock").clone()
    }

    /// The keys as last fetched.
    pub fn jwks(&self) -> Jwks {
        self.keys().jwks.clone()
    }

    /// Fetches the keys unless they were fetched within `min_age`.
    pub async fn fetch(&self, min_age: Duration) -> Result<(), ApiError> {
        let mut fetched = self.inner.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < min_age) {
            return Ok(());
        }
        self.fetch_locked(&mut fetched).await
    }

    /// Fetches the keys for a key id not known yet: at once, unless the last fetch was less than
    /// MIN_REFETCH ago — then after waiting out the rest, so that a key published just after a
    /// fetch (a rotation) is still found, while a flood of made-up key ids costs one fetch a
    /// second.
    async fn fetch_for(&self, kid: &str) -> Result<(), ApiError> {
        let mut fetched = self.inner.fetched.lock().await;
        if self.keys().by_kid.contains_key(kid) {
            return Ok(());
        }
        if let Some(at) = *fetched {
            tokio::time::sleep(MIN_REFETCH.saturating_sub(at.elapsed())).await;
        }
        self.fetch_locked(&mut fetched).await
    }

    async fn fetch_locked(&self, fetched: &mut Option<Instant>) -> Result<(), ApiError> {
        let jwks = self.inner.source.fetch().await.map_err(ApiError::Unavailable)?;
        let mut by_kid = HashMap::new();
        for jwk in &jwks.keys {
            if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
                continue;
            }
            match DecodingKey::from_ed_components(&jwk.x) {
                Ok(key) => {
                    by_kid.insert(jwk.kid.clone(), key);
                }
                Err(_) => tracing::warn!(kid = %jwk.kid, "published key is not a valid Ed25519 key"),
            }
        }
        *self.inner.keys.write().expect("key set lock") = Arc::new(KeySet { by_kid, jwks });
        *fetched = Some(Instant::now());
        Ok(())
    }

    /// The principal a token names, if its signature, issuer and expiry hold.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::unauthenticated("the access token is malformed"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(ApiError::unauthenticated("the access token is not signed with EdDSA"));
        }
        let kid = header.kid.ok_or_else(|| ApiError::unauthenticated("the access token names no signing key"))?;
        let mut keys = self.keys();
        if !keys.by_kid.contains_key(&kid) {
            self.fetch_for(&kid).await?;
            keys = self.keys();
        }
        let key = keys
            .by_kid
            .get(&kid)
            .ok_or_else(|| ApiError::unauthenticated("the access token is signed by an unknown key"))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.inner.validation).map_err(|err| match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ApiError::unauthenticated("the access token has expired")
                }
                _ => ApiError::unauthenticated("the access token is invalid"),
            })?;
        Ok(Principal::from_claims(data.claims, token.to_string()))
    }
}

/// Who is calling, as their verified access token says.
#[derive(Clone)]
pub struct Principal {
    /// User id, or service account id.
    pub subject: String,
    pub service_account: bool,
    pub name: String,
    pub email: String,
    pub department_id: String,
    pub permissions: Vec<String>,
    /// The token's `jti`.
    pub token_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    token: Arc<str>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("subject", &self.subject)
            .field("service_account", &self.service_account)
            .field("department_id", &self.department_id)
            .field("permissions", &self.permissions)
            .finish_non_exhaustive()
    }
}

impl Principal {
    pub fn from_claims(claims: Claims, token: String) -> Principal {
        Principal {
            subject: claims.sub,
            service_account: claims.svc,
            name: claims.name,
            email: claims.email,
            department_id: claims.dept,
            permissions: claims.perms,
            token_id: claims.jti,
            expires_at: claims.exp,
            token: token.into(),
        }
    }

    pub fn has(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }

    /// PERMISSION_DENIED naming `permission` unless the principal holds it.
    pub fn require(&self, permission: &str) -> Result<(), ApiError> {
        self.require_any(&[permission])
    }

    /// PERMISSION_DENIED unless the principal holds one of `permissions`.
    pub fn require_any(&self, permissions: &[&str]) -> Result<(), ApiError> {
        if permissions.iter().any(|p| self.has(p)) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!("this call needs the permission {}", permissions.join(" or "))))
        }
    }

    /// The access token, to call another service on the principal's behalf.
    pub fn bearer(&self) -> &str {
        &self.token
    }

    /// Attaches the principal's token to an outgoing call.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), ApiError> {
        let value = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ApiError::Internal("access token is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }
}

/// The caller of a call that passed the authentication layer.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, ApiError> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| ApiError::unauthenticated("this call needs an access token"))
}

/// The client's address: the first `x-forwarded-for` entry the gateway set, else the peer.
pub fn client_address<T>(request: &tonic::Request<T>) -> String {
    if let Some(forwarded) = request.metadata().get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        let first = forwarded.split(',').next().unwrap_or("").trim();
        if !first.is_empty() {
            return first.to_string();
        }
    }
    request.remote_addr().map(|a| a.ip().to_string()).unwrap_or_default()
}

/// Whether a request path needs an access token: every CRM call except [`PUBLIC_METHODS`].
/// Health, reflection, `/healthz`, `/readyz`, `/metrics` and the published keys are open.
pub fn needs_token(path: &str) -> bool {
    path.starts_with("/crm.") && !PUBLIC_METHODS.contains(&path)
}

/// The bearer token of an `authorization` header value.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Tower layer: verifies the access token of every call that needs one and puts the
/// [`Principal`] into the request's extensions; refuses the rest with UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    verifier: Verifier,
}

impl AuthLayer {
    pub fn new(verifier: Verifier) -> AuthLayer {
        AuthLayer { verifier }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate { inner, verifier: self.verifier.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Authenticate<S> {
    inner: S,
    verifier: Verifier,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The polled service handles this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !needs_token(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let token = bearer_token(req.headers()).map(str::to_string);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let verified = match token {
                None => Err(ApiError::unauthenticated(
                    "this call needs an access token: send `authorization: Bearer <token>`",
                )),
                Some(token) => verifier.verify(&token).await,
            };
            match verified {
                Ok(principal) => {
                    req.extensions_mut().insert(principal);
                    inner.call(req).await
                }
                Err(err) => Ok(tonic::Status::from(err).into_http()),
            }
        })
    }
}

/// Which record owners a principal may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerScope {
    All,
    /// These user ids (the principal's own included).
    Owners(Arc<[String]>),
}

impl OwnerScope {
    pub fn allows(&self, owner_id: &str) -> bool {
        match self {
            OwnerScope::All => true,
            OwnerScope::Owners(owners) => owners.iter().any(|o| o == owner_id),
        }
    }

    /// Appends ` AND <column> in the visible owners` to a WHERE clause: one bound parameter
    /// whatever the number of owners (a JSON array unpacked by the engine), so that the statement
    /// text, and its cached plan, stay the same for every caller; on PostgreSQL the array
    /// becomes an index condition on `column`.
    pub fn push_condition(&self, sql: &mut crate::db::Sql, backend: crate::db::Backend, column: &str) {
        let owners = match self {
            OwnerScope::All => return,
            OwnerScope::Owners(owners) => owners,
        };
        sql.push(" AND ").push(column);
        if let [only] = &owners[..] {
            sql.push(" = ").bind(only.as_str());
            return;
        }
        let json = serde_json::to_string(&owners[..]).expect("strings serialize");
        match backend {
            crate::db::Backend::Postgres => {
                sql.push(" = ANY(ARRAY(SELECT jsonb_array_elements_text(").bind(json).push("::jsonb)))")
            }
            crate::db::Backend::Sqlite => sql.push(" IN (SELECT value FROM json_each(").bind(json).push("))"),
        };
    }
}

/// Where [`Visibility`] resolves scopes.
pub trait VisibilitySource: Send + Sync + 'static {
    fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>>;
}

/// The auth service's `ResolveVisibility`, called with the principal's own token.
struct RemoteVisibility {
    client: AuthServiceClient<Channel>,
}

impl VisibilitySource for RemoteVisibility {
    fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let mut request = tonic::Request::new(crm_proto::auth::v1::ResolveVisibilityRequest {});
            principal.authorize(&mut request)?;
            let visibility = client.resolve_visibility(request).await.map_err(|status| match status.code() {
                tonic::Code::Unauthenticated => ApiError::Unauthenticated(status.message().to_string()),
                tonic::Code::PermissionDenied => ApiError::PermissionDenied(status.message().to_string()),
                code => {
                    ApiError::Unavailable(format!("auth service ResolveVisibility: {} ({code:?})", status.message()))
                }
            })?;
            let visibility = visibility.into_inner();
            Ok(if visibility.all { OwnerScope::All } else { OwnerScope::Owners(visibility.owner_ids.into()) })
        })
    }
}

/// Most principals whose scope is cached; beyond it expired entries are dropped, then all.
const VISIBILITY_CACHE_ENTRIES: usize = 100_000;

/// Visible-owner sets, cached per principal for a bounded time: a change in the organisation
/// (a user moved, a role's scope changed) shows within `ttl`.
#[derive(Clone)]
pub struct Visibility {
    source: Arc<dyn VisibilitySource>,
    ttl: Duration,
    cache: Arc<Mutex<HashMap<String, (Instant, OwnerScope)>>>,
}

impl std::fmt::Debug for Visibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Visibility").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl Visibility {
    pub fn new(source: Arc<dyn VisibilitySource>, ttl: Duration) -> Visibility {
        Visibility { source, ttl, cache: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Resolution by the auth service at `addrs`.
    pub fn remote(addrs: &[String], ttl: Duration) -> Result<Visibility, String> {
        Ok(Visibility::new(Arc::new(RemoteVisibility { client: AuthServiceClient::new(auth_channel(addrs)?) }), ttl))
    }

    pub async fn resolve(&self, principal: &Principal) -> Result<OwnerScope, ApiError> {
        if !self.ttl.is_zero()
            && let Some((at, scope)) = self.cache.lock().expect("visibility cache lock").get(&principal.subject)
            && at.elapsed() < self.ttl
        {
            return Ok(scope.clone());
        }
        let scope = self.source.resolve(principal).await?;
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock().expect("visibility cache lock");
            if cache.len() >= VISIBILITY_CACHE_ENTRIES {
                let ttl = self.ttl;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.len() >= VISIBILITY_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(principal.subject.clone(), (Instant::now(), scope.clone()));
        }
        Ok(scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Mutex<Jwks>, std::sync::atomic::AtomicUsize);

    impl KeySource for Fixed {
        fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let jwks = self.0.lock().unwrap().clone();
            Box::pin(async move { Ok(jwks) })
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "user-1".into(),
            iat: now(),
            exp,
            jti: "t1".into(),
            dept: "d1".into(),
            perms: vec![CONTACTS_READ.into()],
            ..Claims::default()
        }
    }

    fn setup() -> (SigningKey, Arc<Fixed>, Verifier) {
        let key = SigningKey::generate();
        let source = Arc::new(Fixed(Mutex::new(Jwks { keys: vec![key.jwk()] }), Default::default()));
        let verifier = Verifier::new(source.clone());
        (key, source, verifier)
    }

    fn code(result: Result<Principal, ApiError>) -> tonic::Code {
        tonic::Status::from(result.expect_err("refused")).code()
    }

    #[tokio::test]
    async fn verifies_a_good_token() {
        let (key, _, verifier) = setup();
        let token = key.sign(&claims(now() + 60));
        let principal = verifier.verify(&token).await.unwrap();
        assert_eq!(principal.subject, "user-1");
        assert_eq!(principal.department_id, "d1");
        assert!(principal.has(CONTACTS_READ));
        assert_eq!(principal.bearer(), token);
        assert!(principal.require(CONTACTS_WRITE).is_err());
        assert!(!format!("{principal:?}").contains(&token), "Debug never shows the token");
    }

    #[tokio::test]
    async fn refuses_expired_tampered_unknown_key_and_unsigned_tokens() {
        let (key, _, verifier) = setup();
        let expired = key.sign(&claims(now() - 60));
        assert_eq!(code(verifier.verify(&expired).await), tonic::Code::Unauthenticated);

        let good = key.sign(&claims(now() + 60));
        let parts: Vec<&str> = good.split('.').collect();
        let mut forged = claims(now() + 60);
        forged.perms.push(ORG_ADMIN.into());
        let tampered =
            format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap()), parts[2]);
        assert_eq!(code(verifier.verify(&tampered).await), tonic::Code::Unauthenticated);

        let stranger = SigningKey::generate();
        assert_eq!(code(verifier.verify(&stranger.sign(&claims(now() + 60))).await), tonic::Code::Unauthenticated);
        // A foreign key under a known kid: the signature does not verify.
        let impostor = SigningKey::from_pkcs8(key.kid().into(), stranger.pkcs8()).unwrap();
        assert_eq!(code(verifier.verify(&impostor.sign(&claims(now() + 60))).await), tonic::Code::Unauthenticated);

        let none_header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#, key.kid()));
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert_eq!(code(verifier.verify(&unsigned).await), tonic::Code::Unauthenticated);
        let hs_header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, key.kid()));
        assert_eq!(
            code(verifier.verify(&format!("{hs_header}.{}.{}", parts[1], parts[2])).await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(code(verifier.verify("not a token").await), tonic::Code::Unauthenticated);

        let mut foreign = claims(now() + 60);
        foreign.iss = "elsewhere".into();
        assert_eq!(code(verifier.verify(&key.sign(&foreign)).await), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn a_new_key_is_fetched_once_on_first_sight() {
        let (key, source, verifier) = setup();
        verifier.verify(&key.sign(&claims(now() + 60))).await.unwrap();
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 1);
        verifier.verify(&key.sign(&claims(now() + 60))).await.unwrap();
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 1, "known keys are not refetched");

        // A key published right after a fetch (a rotation) is still found.
        let rotated = SigningKey::generate();
        source.0.lock().unwrap().keys.push(rotated.jwk());
        verifier.verify(&rotated.sign(&claims(now() + 60))).await.unwrap();
        verifier.verify(&key.sign(&claims(now() + 60))).await.unwrap();
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 2);

        // Made-up key ids cost at most one fetch per MIN_REFETCH.
        let started = Instant::now();
        for _ in 0..3 {
            let refused = verifier.verify(&SigningKey::generate().sign(&claims(now() + 60))).await;
            assert_eq!(code(refused), tonic::Code::Unauthenticated);
        }
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert!(started.elapsed() >= MIN_REFETCH * 2, "fetches are spaced by MIN_REFETCH");
    }

    #[test]
    fn stored_keys_round_trip() {
        let key = SigningKey::generate();
        let again = SigningKey::from_pkcs8(key.kid().into(), key.pkcs8()).unwrap();
        assert_eq!(key.jwk(), again.jwk());
        assert!(SigningKey::from_pkcs8("k".into(), b"junk").is_err());
        assert!(!format!("{key:?}").contains(&URL_SAFE_NO_PAD.encode(key.pkcs8())));
    }

    #[test]
    fn token_paths_and_headers() {
        assert!(needs_token("/crm.contacts.v1.ContactsService/GetPerson"));
        assert!(needs_token("/crm.auth.v1.OrgService/CreateUser"));
        assert!(!needs_token("/crm.auth.v1.AuthService/SignIn"));
        assert!(!needs_token("/grpc.health.v1.Health/Check"));
        assert!(!needs_token("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!needs_token("/metrics"));
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(http::header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc.def"));
        headers.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }

    struct Counting(std::sync::atomic::AtomicUsize);

    impl VisibilitySource for Counting {
        fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let owners: Arc<[String]> = vec![principal.subject.clone(), format!("seen-{n}")].into();
            Box::pin(async move { Ok(OwnerScope::Owners(owners)) })
        }
    }

    #[tokio::test]
    async fn visibility_is_cached_for_its_ttl_only() {
        let principal = Principal::from_claims(claims(now() + 60), "t".into());
        let source = Arc::new(Counting(Default::default()));
        let cached = Visibility::new(source.clone(), Duration::from_millis(200));
        let first = cached.resolve(&principal).await.unwrap();
        assert_eq!(cached.resolve(&principal).await.unwrap(), first);
        assert!(first.allows("user-1") && !first.allows("someone-else"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_ne!(cached.resolve(&principal).await.unwrap(), first);
        let uncached = Visibility::new(source.clone(), Duration::ZERO);
        let a = uncached.resolve(&principal).await.unwrap();
        assert_ne!(uncached.resolve(&principal).await.unwrap(), a);
    }
}
