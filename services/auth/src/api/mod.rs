//! The gRPC surface of both services: decode and validate each request into typed values,
//! check the caller's permission, apply the domain rules, call the store, map the result back
//! to protobuf. Errors become statuses in `crm_kit::error`.
//!
//! - [`tokens`]: `AuthService` — sign-in, refresh and service tokens, keys, the caller, scopes;
//! - [`org`]: `OrgService` — departments, users, roles, service accounts and the audit.
//!
//! Sign-in, refresh and service-token failures are one uniform UNAUTHENTICATED each, so that an
//! answer never tells whether an e-mail, a token or a client id exists.

mod org;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{self, Catalog, Claims, ISSUER, Principal, Verifier};
use crm_kit::time::{now_micros, to_timestamp};
use crm_kit::{ApiError, Violations};
use crm_proto::auth::v1::TokenPair;
use tonic::Request;

use crate::domain::secrets;
use crate::keys::{KeyRing, StoreKeys};
use crate::permissions::{ORG_ADMIN, ORG_READ};
use crate::store::{Actor, NewRefreshToken, Store, Subject};

/// Longest refresh token, client id or client secret looked up (longer ones are refused unread).
const MAX_TOKEN_CHARS: usize = 256;

/// How sign-in works: token lifetimes and the lock-out rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Consecutive wrong passwords that lock an account.
    pub max_failed_sign_ins: u32,
    /// How long a lock-out lasts.
    pub lockout: Duration,
    /// How long after a refresh token's exchange presenting it again answers with the same
    /// successor (several tabs refreshing at once) instead of revoking the sign-in as a theft.
    pub refresh_reuse_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 86_400),
            max_failed_sign_ins: 5,
            lockout: Duration::from_secs(15 * 60),
            refresh_reuse_grace: Duration::from_secs(30),
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Both services, `AuthService` and `OrgService`, over one store.
#[derive(Clone)]
pub struct AuthApi {
    store: Store,
    keys: KeyRing,
    published: Arc<StoreKeys>,
    verifier: Verifier,
    policy: Policy,
    catalog: Catalog,
}

impl std::fmt::Debug for AuthApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthApi").field("keys", &self.keys).field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// The first `max` characters of untrusted text kept in the audit.
fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// The caller of a call that needs a token, and who they are for the audit.
fn caller<T>(request: &Request<T>) -> Result<(Principal, Actor), ApiError> {
    let principal = auth::principal(request)?;
    let actor = Actor { id: principal.subject.clone(), client_address: auth::client_address(request) };
    Ok((principal, actor))
}

fn can_read(principal: &Principal) -> Result<(), ApiError> {
    principal.require_any(&[ORG_READ.name, ORG_ADMIN.name])
}

fn uuid(field: &str, value: &str) -> Result<(), ApiError> {
    let mut v = Violations::new();
    v.uuid(field, value);
    v.check()
}

fn paths(mask: Option<prost_types::FieldMask>) -> Vec<String> {
    mask.map(|m| m.paths).unwrap_or_default()
}

impl AuthApi {
    /// Both services over `store`, signing with `keys`, offering the permissions of `catalog`.
    pub fn new(store: Store, keys: KeyRing, policy: Policy, catalog: Catalog) -> AuthApi {
        let published = Arc::new(StoreKeys::new(store.clone(), policy.access_token_ttl));
        let verifier = Verifier::new(published.clone());
        AuthApi { store, keys, published, verifier, policy, catalog }
    }

    /// The verifier of this service's access tokens (one per API, shared by its clones),
    /// reading the published keys from the store.
    pub fn verifier(&self) -> Verifier {
        self.verifier.clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A signed access token for `subject` and when it expires.
    async fn access_token(&self, subject: &Subject) -> Result<(String, i64), ApiError> {
        let key = self.keys.current().await?;
        let now = now_micros() / 1_000_000;
        let exp = now.saturating_add(i64::try_from(self.policy.access_token_ttl.as_secs()).unwrap_or(i64::MAX));
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: subject.id.clone(),
            iat: now,
            exp,
            jti: crm_kit::id::new(),
            svc: subject.service_account,
            name: subject.name.clone(),
            email: subject.email.clone(),
            dept: subject.department_id.clone(),
            // Only what the suite offers now, in its order.
            perms: self.catalog.union([&subject.permissions]),
        };
        Ok((key.sign(&claims), exp.saturating_mul(1_000_000)))
    }

    async fn token_pair(&self, subject: &Subject, refresh: Option<(String, i64)>) -> Result<TokenPair, ApiError> {
        let (access_token, access_expires) = self.access_token(subject).await?;
        let (refresh_token, refresh_expires) = refresh.unwrap_or_default();
        Ok(TokenPair {
            access_token,
            access_token_expire_time: to_timestamp(access_expires),
            refresh_token,
            refresh_token_expire_time: to_timestamp(refresh_expires),
            token_type: "Bearer".into(),
        })
    }

    fn new_refresh_token(&self) -> (String, NewRefreshToken) {
        let token = secrets::random_token();
        let expires_at = now_micros().saturating_add(micros(self.policy.refresh_token_ttl));
        let hash = secrets::token_hash(&token);
        (token, NewRefreshToken { hash, expires_at, sealed: Vec::new() })
    }
}
