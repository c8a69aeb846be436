//! The contacts service (SPEC C1, C3, C5, C7): companies and people, duplicate protection,
//! search and filters with keyset pagination, and revision history.
//!
//! `run` is wiring only: open the store, build the API, serve it until shutdown.

pub mod api;
pub mod domain;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{AuthClientArgs, Visibility};
use crm_kit::server::Server;
use crm_kit::shutdown::Shutdown;
use crm_proto::contacts::v1::contacts_service_server::ContactsServiceServer;
use tokio::net::TcpListener;

pub use api::ContactsApi;
pub use store::Store;

/// Settings of the contacts role.
#[derive(clap::Args, Debug, Clone)]
pub struct ContactsArgs {
    /// Address the contacts service listens on (gRPC, gRPC-Web, /healthz, /readyz, /metrics).
    #[arg(
        id = "contacts_listen",
        long = "contacts-listen",
        value_name = "ADDR",
        env = "CRM_CONTACTS_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    pub listen: SocketAddr,
    /// Database of the contacts service: postgres://user:password@host/db or sqlite://path/contacts.db.
    #[arg(
        id = "contacts_database_url",
        long = "contacts-database-url",
        value_name = "URL",
        env = "CRM_CONTACTS_DATABASE_URL"
    )]
    pub database_url: Option<String>,
    /// Most database connections one process holds.
    #[arg(
        id = "contacts_max_connections",
        long = "contacts-max-connections",
        value_name = "N",
        env = "CRM_CONTACTS_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,
    /// Country calling code applied to phone numbers entered without one, e.g. 7, 49, 63, 1;
    /// empty: such numbers are refused.
    #[arg(long = "default-calling-code", env = "CRM_DEFAULT_CALLING_CODE", default_value = "")]
    pub default_calling_code: String,
    /// How long a caller's visible owners (their data scope, resolved by the auth service) are
    /// reused: an organisation change (a user moved, a role's scope changed) shows within it;
    /// "0" asks the auth service on every call.
    #[arg(
        long = "visibility-cache-ttl",
        value_name = "DURATION",
        env = "CRM_VISIBILITY_CACHE_TTL",
        default_value = "2s",
        value_parser = crm_kit::config::parse_duration
    )]
    pub visibility_cache_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ContactsError {
    #[error("no database configured: set --contacts-database-url or CRM_CONTACTS_DATABASE_URL")]
    NoDatabase,
    #[error("--default-calling-code must be 1 to 3 digits, got {0:?}")]
    BadCallingCode(String),
    #[error("{0}")]
    Auth(String),
    #[error(transparent)]
    Db(#[from] crm_kit::db::DbError),
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl ContactsArgs {
    pub fn database_url(&self) -> Result<&str, ContactsError> {
        self.database_url.as_deref().filter(|u| !u.is_empty()).ok_or(ContactsError::NoDatabase)
    }

    pub fn rules(&self) -> Result<domain::Rules, ContactsError> {
        let code = self.default_calling_code.trim().trim_start_matches('+');
        if !code.is_empty() && (code.len() > 3 || !code.chars().all(|c| c.is_ascii_digit())) {
            return Err(ContactsError::BadCallingCode(self.default_calling_code.clone()));
        }
        Ok(domain::Rules { default_calling_code: code.to_string() })
    }
}

/// Applies the contacts migrations to `url`.
pub async fn migrate(url: &str) -> Result<(), ContactsError> {
    let store = Store::open(url, 1).await?;
    store.db().close().await;
    Ok(())
}

/// Runs the contacts service on `listener` until `shutdown` fires, verifying tokens and
/// resolving data scopes with the auth service that `auth` names.
pub async fn run(
    args: &ContactsArgs,
    auth: &AuthClientArgs,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), ContactsError> {
    let rules = args.rules()?;
    let url = args.database_url()?;
    let store = Store::open(url, args.max_connections).await?;
    let verifier = auth.verifier().map_err(ContactsError::Auth)?;
    let visibility = Visibility::remote(&auth.addrs(), args.visibility_cache_ttl).map_err(ContactsError::Auth)?;
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        database = %crm_kit::db::redact(url),
        "contacts service listening"
    );
    let db = store.db().clone();
    let ready: crm_kit::server::ReadyCheck = Arc::new(move || {
        let db = db.clone();
        Box::pin(async move { db.ping().await.map_err(|e| format!("contacts database: {e}")) })
    });
    let result = Server::new("contacts")
        .add_service(ContactsServiceServer::new(ContactsApi::new(store.clone(), rules, visibility)))
        .authenticate(verifier)
        .ready_check(ready)
        .serve(listener, shutdown)
        .await;
    store.db().close().await;
    tracing::info!("contacts service stopped");
    Ok(result?)
}
