//! The auth service (SPEC A1–A4, A6): the organisation (departments, users, roles, service
//! accounts), sign-in with access and refresh tokens, published verification keys, visibility
//! resolution and the security audit.
//!
//! Wiring only: [`run`] = [`open`] (store, signing key, first-start organisation) + [`serve`].
//! `crm dev` calls [`open`] itself to show the administrator's credentials in its own banner,
//! then [`serve`] with the opened store.

pub mod api;
pub mod bootstrap;
pub mod domain;
pub mod keys;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crm_kit::server::Server;
use crm_kit::shutdown::Shutdown;
use crm_proto::auth::v1::auth_service_server::AuthServiceServer;
use crm_proto::auth::v1::org_service_server::OrgServiceServer;
use tokio::net::TcpListener;

pub use api::{AuthApi, Settings};
pub use bootstrap::{Bootstrap, bootstrap};
pub use keys::{KeyRing, StoreKeys};
pub use store::Store;

/// The environment variable the first administrator's password is read from (never a flag:
/// flags show in process listings).
pub const ADMIN_PASSWORD_ENV: &str = "CRM_ADMIN_PASSWORD";

/// How often expired refresh tokens are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Settings of the auth role.
#[derive(clap::Args, Debug, Clone)]
pub struct AuthArgs {
    /// Address the auth service listens on (gRPC, gRPC-Web, /healthz, /readyz, /metrics).
    #[arg(
        id = "auth_listen",
        long = "auth-listen",
        value_name = "ADDR",
        env = "CRM_AUTH_LISTEN",
        default_value = "0.0.0.0:50052"
    )]
    pub listen: SocketAddr,
    /// Database of the auth service: postgres://user:password@host/db or sqlite://path/auth.db.
    #[arg(id = "auth_database_url", long = "auth-database-url", value_name = "URL", env = "CRM_AUTH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Most database connections one auth process holds.
    #[arg(
        id = "auth_max_connections",
        long = "auth-max-connections",
        value_name = "N",
        env = "CRM_AUTH_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,
    /// How long an access token is valid (15m, 1h…); services verify it without asking auth.
    #[arg(long, env = "CRM_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = crm_kit::config::parse_duration)]
    pub access_token_ttl: Duration,
    /// How long a refresh token is valid if unused (30d…); each use replaces it.
    #[arg(long, env = "CRM_REFRESH_TOKEN_TTL", default_value = "30d", value_parser = crm_kit::config::parse_duration)]
    pub refresh_token_ttl: Duration,
    /// Consecutive wrong passwords that lock an account.
    #[arg(long, env = "CRM_MAX_FAILED_SIGN_INS", default_value_t = 5)]
    pub max_failed_sign_ins: u32,
    /// How long a locked account stays locked.
    #[arg(long, env = "CRM_LOCKOUT", default_value = "15m", value_parser = crm_kit::config::parse_duration)]
    pub lockout: Duration,
    /// E-mail of the administrator created on first start (when the database has no users);
    /// the password comes from CRM_ADMIN_PASSWORD, or is generated and printed once.
    #[arg(long, env = "CRM_ADMIN_EMAIL", default_value = "admin@crm.local")]
    pub admin_email: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no database configured: set --auth-database-url or CRM_AUTH_DATABASE_URL")]
    NoDatabase,
    #[error("{0}")]
    BadSetting(String),
    #[error(transparent)]
    Db(#[from] crm_kit::db::DbError),
    #[error("auth store: {0}")]
    Store(#[from] crm_kit::ApiError),
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl AuthArgs {
    pub fn database_url(&self) -> Result<&str, AuthError> {
        self.database_url.as_deref().filter(|u| !u.is_empty()).ok_or(AuthError::NoDatabase)
    }

    /// Token lifetimes and the lock-out rule, checked.
    pub fn settings(&self) -> Result<Settings, AuthError> {
        if self.access_token_ttl < Duration::from_secs(1) {
            return Err(AuthError::BadSetting("--access-token-ttl must be at least 1s".into()));
        }
        if self.refresh_token_ttl < Duration::from_secs(1) {
            return Err(AuthError::BadSetting("--refresh-token-ttl must be at least 1s".into()));
        }
        if self.max_failed_sign_ins == 0 {
            return Err(AuthError::BadSetting("--max-failed-sign-ins must be at least 1".into()));
        }
        Ok(Settings {
            access_token_ttl: self.access_token_ttl,
            refresh_token_ttl: self.refresh_token_ttl,
            max_failed_sign_ins: self.max_failed_sign_ins,
            lockout: self.lockout,
        })
    }
}

/// The first administrator's password from CRM_ADMIN_PASSWORD, if set and not empty.
pub fn admin_password_from_env() -> Option<String> {
    std::env::var(ADMIN_PASSWORD_ENV).ok().filter(|p| !p.is_empty())
}

/// Applies the auth migrations to `url`.
pub async fn migrate(url: &str) -> Result<(), AuthError> {
    let store = Store::open(url, 1).await?;
    store.db().close().await;
    Ok(())
}

/// Opens the auth database (applying migrations), makes sure a signing key exists, and on
/// first start creates the starting organisation with the administrator `--admin-email`
/// (password from CRM_ADMIN_PASSWORD, else generated and returned in the [`Bootstrap`]).
pub async fn open(args: &AuthArgs) -> Result<(Store, Bootstrap), AuthError> {
    let url = args.database_url()?;
    let store = Store::open(url, args.max_connections).await?;
    store.ensure_signing_key(&crm_kit::auth::SigningKey::generate()).await?;
    let bootstrap = bootstrap(&store, &args.admin_email, admin_password_from_env()).await?;
    if bootstrap.created {
        tracing::info!(email = %bootstrap.email, "created the starting organisation and its administrator");
    }
    Ok((store, bootstrap))
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

/// Serves both auth services on `listener` with an opened store until `shutdown` fires, then
/// closes the store.
pub async fn serve(
    store: Store,
    settings: Settings,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), AuthError> {
    let keys = KeyRing::open(store.clone()).await?;
    keys.spawn_reload();
    let _ = tokio::task::spawn_blocking(domain::secrets::prepare).await;
    let api = AuthApi::new(store.clone(), keys, settings);
    let verifier = api.verifier();
    verifier.spawn_refresh(keys::KEY_RELOAD);
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "auth service listening"
    );
    let db = store.db().clone();
    let ready: crm_kit::server::ReadyCheck = Arc::new(move || {
        let db = db.clone();
        Box::pin(async move { db.ping().await.map_err(|e| format!("auth database: {e}")) })
    });
    let purge = tokio::spawn(purge_expired_tokens(store.clone(), shutdown.clone()));
    let result = Server::new("auth")
        .add_service(AuthServiceServer::new(api.clone()))
        .add_service(OrgServiceServer::new(api))
        .authenticate(verifier)
        .ready_check(ready)
        .serve(listener, shutdown)
        .await;
    purge.abort();
    store.db().close().await;
    tracing::info!("auth service stopped");
    Ok(result?)
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

/// Runs the auth service on `listener` until `shutdown` fires. A generated administrator
/// password is printed once to stdout (not to the log).
pub async fn run(args: &AuthArgs, listener: TcpListener, shutdown: Shutdown) -> Result<(), AuthError> {
    let settings = args.settings()?;
    let (store, bootstrap) = open(args).await?;
    tracing::info!(database = %crm_kit::db::redact(args.database_url()?), "auth database open");
    if let Some(notice) = generated_password_notice(&bootstrap) {
        println!("{notice}");
    }
    serve(store, settings, listener, shutdown).await
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
        let cli = Cli::try_parse_from(["crm", "--auth-database-url", "sqlite://auth.db"]).unwrap();
        assert_eq!(cli.auth.listen, "0.0.0.0:50052".parse().unwrap());
        assert_eq!(cli.auth.admin_email, "admin@crm.local");
        assert_eq!(cli.auth.settings().unwrap(), Settings::default());
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
        let settings = cli.auth.settings().unwrap();
        assert_eq!(settings.access_token_ttl, Duration::from_secs(300));
        assert_eq!(settings.refresh_token_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(settings.lockout, Duration::from_millis(500));
        assert_eq!(settings.max_failed_sign_ins, 10);
        assert!(matches!(cli.auth.database_url(), Err(AuthError::NoDatabase)));
        assert!(Cli::try_parse_from(["crm", "--lockout", "soon"]).is_err());
        let zero = Cli::try_parse_from(["crm", "--access-token-ttl", "0s"]).unwrap();
        assert!(matches!(zero.auth.settings(), Err(AuthError::BadSetting(_))));
    }
}
