//! Identity in every process (ARCHITECTURE §5): access tokens are EdDSA-signed JWTs that each
//! process verifies locally against the auth service's published keys, turning them into a
//! [`Principal`] that handlers read from the request; data scopes ([`OwnerScope`]) resolved by
//! the auth service and cached briefly; permissions declared by the services that check them;
//! and the suite's own service account for calls a service makes for itself.
//!
//! The auth service signs with [`SigningKey`]; everything else only verifies.

mod directory;
mod keys;
mod layer;
mod permission;
mod principal;
mod scope;
mod scopes;
mod service_token;
mod verifier;

pub use directory::{RemoteDirectory, UserDirectory, UserStatus, check_owner, require_active};
pub use keys::{Claims, ISSUER, SigningKey};
pub use layer::{AuthLayer, Authenticate, Authenticator};
pub use permission::{Catalog, Grant, Permission};
pub use principal::{Principal, bearer_token, client_address, principal};
pub use scope::OwnerScope;
pub use scopes::{ScopeCache, ScopeSource, Visibility, is_organisation_change};
pub use service_token::{ServiceCredentials, ServiceTokens};
pub use verifier::{KeySource, Verifier};

/// The role that issues tokens, publishes their keys and resolves data scopes.
pub const AUTH_ROLE: &str = "auth";
