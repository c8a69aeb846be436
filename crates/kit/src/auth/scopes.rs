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

/// How a process caches data scopes (the `--visibility-*` settings every process takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    /// How long a resolved scope is reused.
    pub ttl: Duration,
    /// How long past `ttl` it is still used while the auth service cannot be reached.
    pub stale_for: Duration,
}

impl Default for Visibility {
    fn default() -> Visibility {
        Visibility { ttl: Duration::from_secs(2), stale_for: DEFAULT_STALE_FOR }
    }
}

/// Whether an event of auth's changes who sees what (a user created, moved or deactivated, a
/// department or a role changed): cached scopes must go.
pub fn is_organisation_change(event_type: &str) -> bool {
    use crm_proto::auth::v1::{DepartmentChanged, RoleChanged, UserCreated, UserDeactivated, UserUpdated};
    use prost::Name;
    [
        UserCreated::full_name(),
        UserUpdated::full_name(),
        UserDeactivated::full_name(),
        DepartmentChanged::full_name(),
        RoleChanged::full_name(),
    ]
    .iter()
    .any(|name| name == event_type)
}

/// Most principals whose scope is cached; beyond it expired entries are dropped, then all.
const VISIBILITY_CACHE_ENTRIES: usize = 100_000;

/// How long a caller's last resolved scope is still used while the auth service cannot be
/// reached, unless told otherwise ([`ScopeCache::stale_for`]).
pub const DEFAULT_STALE_FOR: Duration = Duration::from_secs(300);

/// Visible-owner sets, cached per principal for a bounded time: a change in the organisation
/// (a user moved, a role's scope changed) shows within `ttl`. While the auth service cannot be
/// reached, a caller's last resolved scope stays usable for `stale_for` more (stale-if-error),
/// so that an auth outage does not take the services down with it; only callers never resolved
/// get UNAVAILABLE. [`ScopeCache::forget_all`] (an organisation event) drops stale scopes too.
#[derive(Clone)]
pub struct ScopeCache {
    source: Arc<dyn ScopeSource>,
    ttl: Duration,
    stale_for: Duration,
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
        f.debug_struct("ScopeCache").field("ttl", &self.ttl).field("stale_for", &self.stale_for).finish_non_exhaustive()
    }
}

impl ScopeCache {
    pub fn new(source: Arc<dyn ScopeSource>, ttl: Duration) -> ScopeCache {
        ScopeCache { source, ttl, stale_for: DEFAULT_STALE_FOR, cache: Arc::new(Mutex::new(Cached::default())) }
    }

    /// Resolution by the auth service's replicas.
    pub fn remote(auth: Peer, ttl: Duration) -> ScopeCache {
        ScopeCache::new(Arc::new(RemoteScopes { auth }), ttl)
    }

    /// How long past its `ttl` a scope is still used while the auth service is unreachable
    /// (zero: never).
    pub fn stale_for(mut self, stale_for: Duration) -> ScopeCache {
        self.stale_for = stale_for;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn resolve(&self, principal: &Principal) -> Result<OwnerScope, ApiError> {
        let generation = {
            let cache = self.lock();
            if !self.ttl.is_zero()
                && let Some((at, scope)) = cache.scopes.get(&principal.subject)
                && at.elapsed() < self.ttl
            {
                return Ok(scope.clone());
            }
            cache.generation
        };
        let resolved = match self.source.resolve(principal).await {
            // Another replica may answer (the one asked may have just died).
            Err(ApiError::Unavailable(_)) => self.source.resolve(principal).await,
            other => other,
        };
        let scope = match resolved {
            Ok(scope) => scope,
            Err(ApiError::Unavailable(why)) => {
                let cache = self.lock();
                return match cache.scopes.get(&principal.subject) {
                    Some((at, scope)) if at.elapsed() < self.ttl + self.stale_for => {
                        tracing::debug!(error = %why, "auth unreachable; using the caller's last data scope");
                        crate::metrics::metrics().stale_scopes.inc();
                        Ok(scope.clone())
                    }
                    _ => Err(ApiError::Unavailable(why)),
                };
            }
            Err(other) => return Err(other),
        };
        let mut cache = self.lock();
        if cache.generation != generation {
            return Ok(scope);
        }
        if cache.scopes.len() >= VISIBILITY_CACHE_ENTRIES {
            let keep = self.ttl + self.stale_for;
            cache.scopes.retain(|_, (at, _)| at.elapsed() < keep);
            if cache.scopes.len() >= VISIBILITY_CACHE_ENTRIES {
                cache.scopes.clear();
            }
        }
        // Kept even with no ttl: the last scope is what an auth outage falls back on.
        if !self.ttl.is_zero() || !self.stale_for.is_zero() {
            cache.scopes.insert(principal.subject.clone(), (Instant::now(), scope.clone()));
        }
        Ok(scope)
    }

    /// Drops every cached scope (the organisation changed): the next call of each caller
    /// resolves theirs again. A resolution already under way is not cached.
    pub fn forget_all(&self) {
        let mut cache = self.lock();
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

    /// A source that fails (auth unreachable) for as many calls as `failures` says.
    struct Flaky {
        calls: std::sync::atomic::AtomicUsize,
        failures: std::sync::atomic::AtomicUsize,
    }

    impl ScopeSource for Flaky {
        fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
            use std::sync::atomic::Ordering::SeqCst;
            self.calls.fetch_add(1, SeqCst);
            let failing = self.failures.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
            let owners: Arc<[String]> = vec![principal.subject.clone()].into();
            Box::pin(async move {
                if failing { Err(ApiError::Unavailable("auth is down".into())) } else { Ok(OwnerScope::Owners(owners)) }
            })
        }
    }

    #[tokio::test]
    async fn a_callers_last_scope_outlives_an_auth_outage_for_a_bounded_time() {
        use std::sync::atomic::Ordering::SeqCst;
        let known = Principal::from_claims(claims(now() + 60), "t".into());
        let stranger =
            Principal::from_claims(Claims { sub: "user-2".into(), exp: now() + 60, ..Claims::default() }, "u".into());
        let source = Arc::new(Flaky { calls: Default::default(), failures: Default::default() });
        // No TTL: every call asks auth, and the last answer is only the fallback.
        let cache = ScopeCache::new(source.clone(), Duration::ZERO).stale_for(Duration::from_millis(300));
        let scope = cache.resolve(&known).await.unwrap();

        // One replica dies: the second try answers.
        source.failures.store(1, SeqCst);
        assert_eq!(cache.resolve(&known).await.unwrap(), scope);
        assert_eq!(source.calls.load(SeqCst), 3);

        // Auth is down: the known caller keeps their scope, a stranger is told to retry.
        source.failures.store(usize::MAX, SeqCst);
        assert_eq!(cache.resolve(&known).await.unwrap(), scope);
        let refused = tonic::Status::from(cache.resolve(&stranger).await.unwrap_err());
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(tonic_types::StatusExt::get_details_retry_info(&refused).is_some(), "with retry info");

        // For a bounded time only.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(matches!(cache.resolve(&known).await, Err(ApiError::Unavailable(_))));

        // An organisation event wins over a stale scope.
        source.failures.store(0, SeqCst);
        cache.resolve(&known).await.unwrap();
        source.failures.store(usize::MAX, SeqCst);
        cache.forget_all();
        assert!(matches!(cache.resolve(&known).await, Err(ApiError::Unavailable(_))));

        // Refusals other than unavailability are never papered over.
        let denied = ScopeCache::new(Arc::new(Denying), Duration::ZERO);
        assert!(matches!(denied.resolve(&known).await, Err(ApiError::Unauthenticated(_))));
    }

    struct Denying;

    impl ScopeSource for Denying {
        fn resolve<'a>(&'a self, _: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
            Box::pin(async { Err(ApiError::unauthenticated("revoked")) })
        }
    }
}
