//! Signing keys. Each replica caches the current key and reloads it from the database every
//! [`KEY_RELOAD`] (in the background, and before signing when its copy is older than that), so
//! that after a rotation on any replica every replica signs with the new key within that time.
//! [`StoreKeys`] publishes the keys that verify tokens: every key not retired, and retired keys
//! for as long as a token they signed can still be valid.

use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use crm_kit::ApiError;
use crm_kit::auth::{KeySource, SigningKey};
use crm_kit::time::now_micros;
use crm_proto::auth::v1::Jwks;
use futures_util::future::BoxFuture;

use crate::store::{Event, Store};

/// The oldest a replica's copy of the current key gets before it is read again.
pub const KEY_RELOAD: Duration = Duration::from_secs(10);

/// How much longer than the access-token lifetime a retired key stays published: a replica may
/// sign with it for up to [`KEY_RELOAD`] after the rotation, and verifiers allow for clock skew.
pub const RETIRED_KEY_GRACE: Duration = Duration::from_secs(KEY_RELOAD.as_secs() + 30);

struct Inner {
    store: Store,
    cached: RwLock<(Instant, SigningKey)>,
}

/// The current signing key of this replica.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kid = self.inner.cached.read().expect("key cache lock").1.kid().to_string();
        f.debug_struct("KeyRing").field("kid", &kid).finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Loads the current key, creating the first one if the database has none (safe when
    /// several replicas start at once).
    pub async fn open(store: Store) -> Result<KeyRing, ApiError> {
        let key = store.ensure_signing_key(&SigningKey::generate()).await?;
        Ok(KeyRing { inner: Arc::new(Inner { store, cached: RwLock::new((Instant::now(), key)) }) })
    }

    /// The key to sign with now, read again first when this replica's copy is older than
    /// [`KEY_RELOAD`].
    pub async fn current(&self) -> Result<SigningKey, ApiError> {
        {
            let cached = self.inner.cached.read().expect("key cache lock");
            if cached.0.elapsed() < KEY_RELOAD {
                return Ok(cached.1.clone());
            }
        }
        self.reload().await
    }

    /// Reads the current key from the database.
    pub async fn reload(&self) -> Result<SigningKey, ApiError> {
        let key = match self.inner.store.current_signing_key().await? {
            Some(key) => key,
            None => self.inner.store.ensure_signing_key(&SigningKey::generate()).await?,
        };
        *self.inner.cached.write().expect("key cache lock") = (Instant::now(), key.clone());
        Ok(key)
    }

    /// Starts signing with a new key; the previous one is retired now (and stays published).
    pub async fn rotate(&self, event: &Event) -> Result<SigningKey, ApiError> {
        let key = SigningKey::generate();
        self.inner.store.rotate_signing_key(&key, event).await?;
        *self.inner.cached.write().expect("key cache lock") = (Instant::now(), key.clone());
        Ok(key)
    }

    /// Reloads the key every [`KEY_RELOAD`] for as long as the key ring is in use.
    pub fn spawn_reload(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEY_RELOAD).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(err) = (KeyRing { inner }).reload().await {
                    tracing::warn!(error = %err, "cannot reload the signing key");
                }
            }
        });
    }
}

/// The published verification keys, read from the database: what `GetJwks` answers and what
/// this service's own token verifier uses.
#[derive(Clone, Debug)]
pub struct StoreKeys {
    store: Store,
    keep_retired: Duration,
}

impl StoreKeys {
    /// Keys of a service whose access tokens live `access_token_ttl`.
    pub fn new(store: Store, access_token_ttl: Duration) -> StoreKeys {
        StoreKeys { store, keep_retired: access_token_ttl + RETIRED_KEY_GRACE }
    }

    /// Every key not retired, and retired keys that may still have valid tokens, newest first.
    pub async fn jwks(&self) -> Result<Jwks, ApiError> {
        let keep = i64::try_from(self.keep_retired.as_micros()).unwrap_or(i64::MAX);
        let keys = self.store.published_keys(now_micros().saturating_sub(keep)).await?;
        Ok(Jwks { keys })
    }
}

impl KeySource for StoreKeys {
    fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>> {
        Box::pin(async move { self.jwks().await.map_err(|e| e.to_string()) })
    }
}
