//! What every CRM service is built from (ARCHITECTURE §2): configuration, telemetry, storage and
//! migrations, the gRPC server with health, reflection and graceful shutdown, the error model,
//! keyset pagination, filters, input validation, and token verification with data scope.

pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod page;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod validate;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::ApiError;
pub use validate::Violations;
