//! What every CRM service is built from (ARCHITECTURE §2): the role contract, storage and
//! migrations, the gRPC server with health, reflection, TLS and graceful shutdown, clients of other
//! services, the events backbone and leased jobs, token verification with data scope, the error model, keyset pagination, filters,
//! update masks, input validation, configuration and telemetry.

pub mod auth;
pub mod balance;
pub mod config;
pub mod customers;
pub mod db;
pub mod error;
pub mod events;
pub mod filter;
pub mod id;
pub mod jobs;
pub mod limit;
pub mod mask;
pub mod metrics;
pub mod page;
pub mod peer;
pub mod role;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod validate;
pub mod wire;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ApiError, respond};
pub use validate::Violations;
