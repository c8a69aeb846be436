//! Data scopes resolved by the auth service (`ResolveVisibility`) and cached per caller for a
//! bounded time, so that a change in the organisation shows within that time without asking
//! auth on every call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crm_proto::auth::v1::auth_service_client::AuthServiceClient;
use futures_util::future::BoxFuture;

use super::{OwnerScope, Principal};
use crate::error::ApiError;
use crate::peer::Peer;

/// Where [`ScopeCache`] resolves scopes.
pub trait ScopeSource: Send + Sync + 'static {
    fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>>;
}

/// The auth service's `ResolveVisibility`, called with the principal's own token.
struct RemoteScopes {
    auth: Peer,
}

impl ScopeSource for RemoteScopes {
    fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
        let mut client = AuthServiceClient::new(self.auth.as_caller(principal));
        Box::pin(async move {
            let request = crm_proto::auth::v1::ResolveVisibilityRequest {};
            let visibility = client.resolve_visibility(request).await.map_err(|status| match status.code() {
                tonic::Code::Unauthenticated => ApiError::Unauthenticated(status.message().to_string()),
                tonic::Code::PermissionDenied => ApiError::PermissionDenied(status.message().to_string()),
                code => {
                    ApiError::Unavailable(format!("auth service ResolveScopeCache: {} ({code:?})", status.message()))
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
pub struct ScopeCache {
    source: Arc<dyn ScopeSource>,
    ttl: Duration,
    cache: Arc<Mutex<Cached>>,
}

#[derive(Default)]
struct Cached {
    scopes: HashMap<String, (Instant, OwnerScope)>,
    /// Bumped by [`ScopeCache::forget_all`]: a resolution that started before is not kept.
    generation: u64,
}

impl std::fmt::Debug for ScopeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeCache").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl ScopeCache {
    pub fn new(source: Arc<dyn ScopeSource>, ttl: Duration) -> ScopeCache {
        ScopeCache { source, ttl, cache: Arc::new(Mutex::new(Cached::default())) }
    }

    /// Resolution by the auth service's replicas.
    pub fn remote(auth: Peer, ttl: Duration) -> ScopeCache {
        ScopeCache::new(Arc::new(RemoteScopes { auth }), ttl)
    }

    pub async fn resolve(&self, principal: &Principal) -> Result<OwnerScope, ApiError> {
        let generation = {
            let cache = self.cache.lock().expect("visibility cache lock");
            if !self.ttl.is_zero()
                && let Some((at, scope)) = cache.scopes.get(&principal.subject)
                && at.elapsed() < self.ttl
            {
                return Ok(scope.clone());
            }
            cache.generation
        };
        let scope = self.source.resolve(principal).await?;
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock().expect("visibility cache lock");
            if cache.generation != generation {
                return Ok(scope);
            }
            if cache.scopes.len() >= VISIBILITY_CACHE_ENTRIES {
                let ttl = self.ttl;
                cache.scopes.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.scopes.len() >= VISIBILITY_CACHE_ENTRIES {
                    cache.scopes.clear();
                }
            }
            cache.scopes.insert(principal.subject.clone(), (Instant::now(), scope.clone()));
        }
        Ok(scope)
    }

    /// Drops every cached scope (the organisation changed): the next call of each caller
    /// resolves theirs again. A resolution already under way is not cached.
    pub fn forget_all(&self) {
        let mut cache = self.cache.lock().expect("visibility cache lock");
        cache.scopes.clear();
        cache.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Claims;

    fn claims(exp: i64) -> Claims {
        Claims { sub: "user-1".into(), exp, ..Claims::default() }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    struct Counting(std::sync::atomic::AtomicUsize);

    impl ScopeSource for Counting {
        fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let owners: Arc<[String]> = vec![principal.subject.clone(), format!("seen-{n}")].into();
            Box::pin(async move { Ok(OwnerScope::Owners(owners)) })
        }
    }

    #[tokio::test]
    async fn scopes_are_cached_for_their_ttl_only() {
        let principal = Principal::from_claims(claims(now() + 60), "t".into());
        let source = Arc::new(Counting(Default::default()));
        let cached = ScopeCache::new(source.clone(), Duration::from_millis(200));
        let first = cached.resolve(&principal).await.unwrap();
        assert_eq!(cached.resolve(&principal).await.unwrap(), first);
        assert!(first.allows("user-1") && !first.allows("someone-else"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_ne!(cached.resolve(&principal).await.unwrap(), first);
        let uncached = ScopeCache::new(source.clone(), Duration::ZERO);
        let a = uncached.resolve(&principal).await.unwrap();
        assert_ne!(uncached.resolve(&principal).await.unwrap(), a);
    }
}
