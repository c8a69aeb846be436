//! Token verification in every process: access tokens are verified locally against the auth
//! service's published keys (cached, refetched when a token names a key not seen yet), so no
//! call waits on auth to check a token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use crm_proto::auth::v1::Jwks;
use crm_proto::auth::v1::auth_service_client::AuthServiceClient;
use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{Claims, ISSUER, Principal};
use crate::error::ApiError;
use crate::peer::Peer;

/// Clock skew tolerated on `exp`.
const LEEWAY_SECONDS: u64 = 5;
/// Shortest interval between two key fetches caused by unknown key ids: however many made-up
/// `kid`s arrive, a process fetches at most this often, and a genuine new key waits at most this
/// long plus two fetches.
pub(crate) const FETCH_SPACING: Duration = Duration::from_millis(100);
/// How long a key id that a fetch did not find is answered "unknown" without fetching again.
pub(crate) const MISSING_FOR: Duration = Duration::from_secs(1);
/// Most verified tokens remembered (~1 KiB each); beyond it expired ones are dropped, then all.
const MAX_VERIFIED: usize = 10_000;

/// Most key ids remembered as missing (a flood of distinct ones clears the memory rather than
/// growing it).
const MAX_MISSING: usize = 4096;

/// Where a [`Verifier`] gets the published keys.
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>>;
}

/// The auth service's `GetJwks` (a call that needs no token).
struct RemoteKeys {
    auth: Peer,
}

impl KeySource for RemoteKeys {
    fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>> {
        let mut client = AuthServiceClient::new(self.auth.anonymous());
        Box::pin(async move {
            client
                .get_jwks(crm_proto::auth::v1::GetJwksRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("auth service GetJwks: {} ({:?})", s.message(), s.code()))
        })
    }
}

struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    jwks: Jwks,
}

/// Fetches so far, held while fetching so that callers missing a key share one fetch.
#[derive(Default)]
struct Fetches {
    /// Fetches started.
    started: u64,
    /// The number of the last fetch that completed, and when it started.
    done: Option<(u64, Instant)>,
}

struct VerifierInner {
    source: Arc<dyn KeySource>,
    keys: RwLock<Arc<KeySet>>,
    fetches: tokio::sync::Mutex<Fetches>,
    /// Fetches started (read without the lock: a caller that misses a key needs a fetch numbered
    /// above what it reads here).
    started: std::sync::atomic::AtomicU64,
    /// Key ids a recent fetch did not find, and when.
    missing: std::sync::Mutex<HashMap<String, Instant>>,
    /// Tokens verified, by the SHA-256 of the whole token (a token changed in any byte is
    /// another key, verified afresh), with the key id that signed them: valid until their `exp`.
    verified: RwLock<HashMap<[u8; 32], (Principal, String)>>,
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
                fetches: tokio::sync::Mutex::new(Fetches::default()),
                started: Default::default(),
                missing: Default::default(),
                verified: Default::default(),
                validation,
            }),
        }
    }

    /// A verifier fetching keys from the auth service's replicas, refreshing them every
    /// `refresh_every` (so that keys retired by the auth service stop verifying).
    pub fn remote(auth: Peer, refresh_every: Duration) -> Verifier {
        let verifier = Verifier::new(Arc::new(RemoteKeys { auth }));
        verifier.spawn_refresh(refresh_every);
        verifier
    }

    /// Refreshes the keys every `every` for as long as the verifier is in use.
    pub fn spawn_refresh(&self, every: Duration) {
        let weak: Weak<VerifierInner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every.max(FETCH_SPACING)).await;
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
        let mut fetches = self.inner.fetches.lock().await;
        if fetches.done.is_some_and(|(_, at)| at.elapsed() < min_age) {
            return Ok(());
        }
        self.fetch_locked(&mut fetches).await
    }

    /// Makes sure the keys were fetched after this call began, for a key id not known: callers
    /// that miss keys meanwhile share one fetch, and fetches are at least [`FETCH_SPACING`]
    /// apart. A key id a fetch did not find within [`MISSING_FOR`] is answered at once.
    async fn fetch_for(&self, kid: &str) -> Result<(), ApiError> {
        if self.recently_missing(kid) {
            return Ok(());
        }
        let needed = self.inner.started.load(std::sync::atomic::Ordering::SeqCst) + 1;
        let mut fetches = self.inner.fetches.lock().await;
        if fetches.done.is_some_and(|(number, _)| number >= needed) || self.keys().by_kid.contains_key(kid) {
            self.note_if_missing(kid);
            return Ok(());
        }
        if let Some((_, at)) = fetches.done {
            tokio::time::sleep(FETCH_SPACING.saturating_sub(at.elapsed())).await;
        }
        self.fetch_locked(&mut fetches).await?;
        self.note_if_missing(kid);
        Ok(())
    }

    fn recently_missing(&self, kid: &str) -> bool {
        let missing = self.inner.missing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        missing.get(kid).is_some_and(|at| at.elapsed() < MISSING_FOR)
    }

    fn note_if_missing(&self, kid: &str) {
        if !self.keys().by_kid.contains_key(kid) {
            let mut missing = self.inner.missing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if missing.len() >= MAX_MISSING {
                missing.retain(|_, at| at.elapsed() < MISSING_FOR);
                if missing.len() >= MAX_MISSING {
                    missing.clear();
                }
            }
            missing.insert(kid.to_string(), Instant::now());
        }
    }

    async fn fetch_locked(&self, fetches: &mut Fetches) -> Result<(), ApiError> {
        fetches.started += 1;
        let number = fetches.started;
        self.inner.started.store(number, std::sync::atomic::Ordering::SeqCst);
        let started_at = Instant::now();
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
        let keys = Arc::new(KeySet { by_kid, jwks });
        *self.inner.keys.write().expect("key set lock") = keys.clone();
        // What a retired or removed key signed is verified no more. After the new keys are in
        // place: a verification that remembers a token checks its key under the same lock.
        self.inner
            .verified
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, (_, kid)| keys.by_kid.contains_key(kid));
        fetches.done = Some((number, started_at));
        // A key published since is found by the next miss.
        self.inner.missing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|_, at| *at > started_at);
        Ok(())
    }

    /// The principal a token names, if its signature, issuer and expiry hold. A token verified
    /// before is answered from memory until its expiry (the signature check is most of a call's
    /// cost otherwise).
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let now = unix_now();
        if let Some((principal, _)) =
            self.inner.verified.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&digest)
            && principal.expires_at > now
        {
            return Ok(principal.clone());
        }
        let (principal, kid) = self.verify_signed(token).await?;
        let mut verified = self.inner.verified.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, (p, _)| p.expires_at > now);
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
        }
        // Only while its key is still published (a fetch may have retired it meanwhile).
        if self.keys().by_kid.contains_key(&kid) {
            verified.insert(digest, (principal.clone(), kid));
        }
        Ok(principal)
    }

    /// How many verified tokens are remembered.
    pub fn remembered(&self) -> usize {
        self.inner.verified.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    async fn verify_signed(&self, token: &str) -> Result<(Principal, String), ApiError> {
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
        Ok((Principal::from_claims(data.claims, token.to_string()), kid))
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use std::sync::Mutex;

    use super::*;
    use crate::auth::SigningKey;

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
            perms: vec!["contacts.read".into()],
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
        assert!(principal.has("contacts.read"));
        assert_eq!(principal.bearer(), token);
        assert!(principal.require("contacts.write").is_err());
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
        forged.perms.push("org.admin".into());
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

        // A made-up key id is refused; asked again at once, it costs no fetch.
        let forged = SigningKey::generate().sign(&claims(now() + 60));
        assert_eq!(code(verifier.verify(&forged).await), tonic::Code::Unauthenticated);
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(code(verifier.verify(&forged).await), tonic::Code::Unauthenticated);
        assert_eq!(
            source.1.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "a key id just found missing is not fetched again"
        );
    }

    /// A source whose fetch takes a while, as a call to the auth service does.
    struct Slow(Mutex<Jwks>, std::sync::atomic::AtomicUsize);

    impl KeySource for Slow {
        fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let jwks = self.0.lock().unwrap().clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(jwks)
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn made_up_key_ids_never_queue_a_genuine_new_key() {
        let key = SigningKey::generate();
        let source = Arc::new(Slow(Mutex::new(Jwks { keys: vec![key.jwk()] }), Default::default()));
        let verifier = Verifier::new(source.clone());
        verifier.verify(&key.sign(&claims(now() + 60))).await.unwrap();
        let fetches = || source.1.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(fetches(), 1);

        // Twenty tokens naming made-up keys, all at once, then a key rotation and a token it
        // signed, while they are still being answered.
        let forged: Vec<_> = (0..20)
            .map(|_| {
                let (verifier, token) = (verifier.clone(), SigningKey::generate().sign(&claims(now() + 60)));
                tokio::spawn(async move { verifier.verify(&token).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let rotated = SigningKey::generate();
        source.0.lock().unwrap().keys.push(rotated.jwk());
        let started = Instant::now();
        let genuine = verifier.verify(&rotated.sign(&claims(now() + 60))).await;
        let waited = started.elapsed();
        assert!(genuine.is_ok(), "the rotated key's token verifies: {genuine:?}");
        for refused in forged {
            assert_eq!(code(refused.await.unwrap()), tonic::Code::Unauthenticated);
        }
        // The made-up kids and the genuine one shared fetches: never one fetch each.
        assert!(fetches() <= 3, "{} fetches for 20 made-up key ids and one rotation", fetches());
        eprintln!("a genuine new key behind 20 made-up ones waited {waited:?} with {} fetches", fetches());
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered_until_its_key_goes() {
        let (key, source, verifier) = setup();
        let token = key.sign(&claims(now() + 60));
        let first = verifier.verify(&token).await.unwrap();
        let again = verifier.verify(&token).await.unwrap();
        assert_eq!((first.subject.as_str(), again.subject.as_str()), ("user-1", "user-1"));
        assert_eq!(verifier.remembered(), 1, "verified once, remembered");

        // A token changed in any byte is not the remembered one: it is checked, and refused.
        for at in [10, token.len() / 2, token.len() - 2] {
            let mut bytes = token.clone().into_bytes();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert_eq!(code(verifier.verify(&tampered).await), tonic::Code::Unauthenticated, "byte {at}");
        }
        assert_eq!(verifier.remembered(), 1);

        // The key removed from the published set: what it signed is refused from then on.
        source.0.lock().unwrap().keys.clear();
        verifier.fetch(Duration::ZERO).await.unwrap();
        assert_eq!(verifier.remembered(), 0);
        assert_eq!(code(verifier.verify(&token).await), tonic::Code::Unauthenticated);

        // An expired token is never answered from memory.
        source.0.lock().unwrap().keys.push(key.jwk());
        verifier.fetch(Duration::ZERO).await.unwrap();
        let expired = key.sign(&claims(now() - 60));
        assert_eq!(code(verifier.verify(&expired).await), tonic::Code::Unauthenticated);
        assert_eq!(verifier.remembered(), 0);
    }
}
