//! Who is calling: the [`Principal`] that the authentication layer puts into every request
//! whose token verified.

use std::sync::Arc;

use super::Claims;
use crate::error::ApiError;

/// The caller, as their verified access token says.
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

/// The bearer token of an `authorization` header value.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}
