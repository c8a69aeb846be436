//! The auth service (SPEC A1–A4, A6): the organisation (departments, users, roles, service
//! accounts), sign-in with access and refresh tokens, published verification keys, visibility
//! resolution and the security audit.
//!
//! [`Auth`] is the role: opening it applies the migrations, makes sure a signing key exists,
//! creates the starting organisation on first start and the suite's service account, then
//! serves both gRPC services with a job that deletes expired refresh tokens.

pub mod api;
pub mod bootstrap;
pub mod domain;
pub mod keys;
pub mod store;

use std::time::Duration;

use crm_kit::auth::{Grant, Permission, SigningKey};
use crm_kit::db::Migrations;
use crm_kit::role::{self, Calls, Context, Opened, RoleSpec};
use crm_kit::shutdown::Shutdown;
use crm_proto::auth::v1::auth_service_server::{self, AuthServiceServer};
use crm_proto::auth::v1::org_service_server::{self, OrgServiceServer};

pub use api::{AuthApi, Policy};
pub use bootstrap::{Bootstrap, bootstrap};
pub use keys::{KeyRing, StoreKeys};
pub use store::Store;

/// The permissions the auth service's calls check.
pub mod permissions {
    use super::{Grant, Permission};

    /// Read the organisation: departments, users, roles, service accounts.
    pub const ORG_READ: Permission = Permission {
        name: "org.read",
        about: "read the organisation: departments, users, roles, service accounts",
        grant: Grant::Managers,
        for_services: true,
    };
    /// Change the organisation, service accounts and signing keys; read the security audit.
    pub const ORG_ADMIN: Permission = Permission {
        name: "org.admin",
        about: "change the organisation, service accounts and signing keys; read the security audit",
        grant: Grant::Administrators,
        for_services: false,
    };
    pub const ALL: &[Permission] = &[ORG_READ, ORG_ADMIN];
}

/// The environment variable the first administrator's password is read from (never a flag:
/// flags show in process listings).
pub const ADMIN_PASSWORD_ENV: &str = "CRM_ADMIN_PASSWORD";

/// How often expired refresh tokens are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Settings of the auth role.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Auth service")]
pub struct AuthArgs {
    /// How long an access token is valid (15m, 1h…); services verify it without asking auth.
    #[arg(
        long,
        value_name = "DURATION",
        env = "CRM_ACCESS_TOKEN_TTL",
        default_value = "15m",
        value_parser = crm_kit::config::parse_duration
    )]
    pub access_token_ttl: Duration,
    /// How long a refresh token is valid if unused (30d…); each use replaces it.
    #[arg(
        long,
        value_name = "DURATION",
        env = "CRM_REFRESH_TOKEN_TTL",
        default_value = "30d",
        value_parser = crm_kit::config::parse_duration
    )]
    pub refresh_token_ttl: Duration,
    /// For how long after its exchange a refresh token presented again (several browser tabs
    /// refreshing at once) gets the same successor instead of revoking the sign-in as a theft;
    /// 0 turns the grace off.
    #[arg(
        long,
        value_name = "DURATION",
        env = "CRM_REFRESH_REUSE_GRACE",
        default_value = "30s",
        value_parser = crm_kit::config::parse_duration
    )]
    pub refresh_reuse_grace: Duration,
    /// Consecutive wrong passwords that lock an account.
    #[arg(long, value_name = "N", env = "CRM_MAX_FAILED_SIGN_INS", default_value_t = 5)]
    pub max_failed_sign_ins: u32,
    /// How long a locked account stays locked.
    #[arg(long, value_name = "DURATION", env = "CRM_LOCKOUT", default_value = "15m", value_parser = crm_kit::config::parse_duration)]
    pub lockout: Duration,
    /// E-mail of the administrator created on first start (when the database has no users);
    /// the password comes from CRM_ADMIN_PASSWORD, or is generated and printed once.
    #[arg(long, value_name = "EMAIL", env = "CRM_ADMIN_EMAIL", default_value = "admin@crm.local")]
    pub admin_email: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    BadSetting(String),
    #[error(transparent)]
    Db(#[from] crm_kit::db::DbError),
    #[error("auth store: {0}")]
    Store(#[from] crm_kit::ApiError),
}

impl AuthArgs {
    /// Token lifetimes and the lock-out rule, checked.
    pub fn policy(&self) -> Result<Policy, AuthError> {
        if self.access_token_ttl < Duration::from_secs(1) {
            return Err(AuthError::BadSetting("--access-token-ttl must be at least 1s".into()));
        }
        if self.refresh_token_ttl < Duration::from_secs(1) {
            return Err(AuthError::BadSetting("--refresh-token-ttl must be at least 1s".into()));
        }
        if self.max_failed_sign_ins == 0 {
            return Err(AuthError::BadSetting("--max-failed-sign-ins must be at least 1".into()));
        }
        Ok(Policy {
            access_token_ttl: self.access_token_ttl,
            refresh_token_ttl: self.refresh_token_ttl,
            max_failed_sign_ins: self.max_failed_sign_ins,
            lockout: self.lockout,
            refresh_reuse_grace: self.refresh_reuse_grace,
        })
    }
}

/// The first administrator's password from CRM_ADMIN_PASSWORD, if set and not empty.
pub fn admin_password_from_env() -> Option<String> {
    std::env::var(ADMIN_PASSWORD_ENV).ok().filter(|p| !p.is_empty())
}

/// What to tell the operator once about a generated administrator password; `None` when no
/// password was generated.
pub fn generated_password_notice(bootstrap: &Bootstrap) -> Option<String> {
    let password = bootstrap.generated_password.as_ref()?;
    Some(format!(
        "The auth service created the administrator account.\n  e-mail:   {}\n  password: {password}\n\
         This password is shown only this once: sign in and change it (crm.auth.v1.OrgService/SetPassword).",
        bootstrap.email
    ))
}

/// The lines `crm dev` shows about the administrator.
fn banner(bootstrap: &Bootstrap) -> [String; 2] {
    let password = match (&bootstrap.generated_password, bootstrap.created) {
        (Some(generated), _) => format!(
            "{generated}\n  (generated now and shown only this once: note it, or start with CRM_ADMIN_PASSWORD set)"
        ),
        (None, true) => "the one in CRM_ADMIN_PASSWORD".to_string(),
        (None, false) => "as set before (the administrator exists since an earlier start)".to_string(),
    };
    [format!("Administrator: {}", bootstrap.email), format!("Password:      {password}")]
}

/// The auth role.
pub struct Auth;

/// The name auth publishes its events under (its role's name).
pub const SOURCE: &str = crm_kit::auth::AUTH_ROLE;

impl role::Service for Auth {
    type Args = AuthArgs;

    const SPEC: RoleSpec = RoleSpec {
        name: "auth",
        title: "the auth service",
        packages: &["crm.auth.v1"],
        services: &[auth_service_server::SERVICE_NAME, org_service_server::SERVICE_NAME],
        public_methods: &[
            "/crm.auth.v1.AuthService/SignIn",
            "/crm.auth.v1.AuthService/Refresh",
            "/crm.auth.v1.AuthService/SignOut",
            "/crm.auth.v1.AuthService/IssueServiceToken",
            "/crm.auth.v1.AuthService/GetJwks",
        ],
        permissions: permissions::ALL,
        default_port: 50052,
        calls: Calls::Roles(&[]),
        consumes: &[],
    };

    fn migrations() -> Option<Migrations> {
        Some(store::migrations())
    }

    async fn open(args: AuthArgs, ctx: Context) -> Result<Opened, role::Error> {
        let policy = args.policy()?;
        let db = ctx.open_db(&store::migrations()).await?;
        let (outbox, relay) = ctx.outbox(&db);
        let store = Store::new(db.clone()).with_outbox(outbox);
        let catalog = ctx.suite().catalog();
        store.ensure_signing_key(&SigningKey::generate()).await?;
        let bootstrap = bootstrap(&store, &catalog, &args.admin_email, admin_password_from_env()).await?;
        if bootstrap.created {
            tracing::info!(email = %bootstrap.email, "created the starting organisation and its administrator");
        }
        if let Some(credentials) = ctx.service_credentials() {
            let outcome = bootstrap::ensure_suite_account(&store, &catalog, credentials).await?;
            tracing::info!(client_id = credentials.client_id(), ?outcome, "the suite's service account is in place");
        }
        let keys = KeyRing::open(store.clone()).await?;
        keys.spawn_reload();
        let _ = tokio::task::spawn_blocking(domain::secrets::prepare).await;
        let api = AuthApi::new(store.clone(), keys, policy, catalog);
        let verifier = api.verifier();
        verifier.spawn_refresh(keys::KEY_RELOAD);
        let server = ctx
            .server()
            .add_service(AuthServiceServer::new(api.clone()))
            .add_service(OrgServiceServer::new(api))
            .authenticate(ctx.authenticator_with(verifier));
        let [administrator, password] = banner(&bootstrap);
        let mut opened = Opened::new(server)
            .with_db(db)
            .job("delete expired refresh tokens", move |shutdown| purge_expired_tokens(store, shutdown))
            .job("event relay", move |shutdown| relay.run(shutdown))
            .banner(administrator)
            .banner(password);
        if let Some(notice) = generated_password_notice(&bootstrap) {
            opened = opened.notice(notice);
        }
        Ok(opened)
    }
}

/// Deletes expired refresh tokens every [`PURGE_EVERY`] (idempotent: safe on every replica).
async fn purge_expired_tokens(store: Store, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.clone().wait() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
        match store.purge_expired(crm_kit::time::now_micros()).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "deleted expired refresh tokens"),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot delete expired refresh tokens"),
        }
    }
}

/// The catalog of the suite the auth service runs in, for tests of this crate.
#[cfg(test)]
pub(crate) fn suite_catalog_for_tests() -> crm_kit::auth::Catalog {
    crm_kit::auth::Catalog::new(crm_contacts::permissions::ALL.iter().chain(permissions::ALL).copied())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        auth: AuthArgs,
    }

    #[test]
    fn flags_have_defaults_and_durations() {
        let cli = Cli::try_parse_from(["crm"]).unwrap();
        assert_eq!(cli.auth.admin_email, "admin@crm.local");
        assert_eq!(cli.auth.policy().unwrap(), Policy::default());
        let cli = Cli::try_parse_from([
            "crm",
            "--access-token-ttl",
            "5m",
            "--refresh-token-ttl",
            "7d",
            "--lockout",
            "500ms",
            "--max-failed-sign-ins",
            "10",
        ])
        .unwrap();
        let policy = cli.auth.policy().unwrap();
        assert_eq!(policy.access_token_ttl, Duration::from_secs(300));
        assert_eq!(policy.refresh_token_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(policy.lockout, Duration::from_millis(500));
        assert_eq!(policy.max_failed_sign_ins, 10);
        assert!(Cli::try_parse_from(["crm", "--lockout", "soon"]).is_err());
        let zero = Cli::try_parse_from(["crm", "--access-token-ttl", "0s"]).unwrap();
        assert!(matches!(zero.auth.policy(), Err(AuthError::BadSetting(_))));
    }
}
