//! Every SQL statement of the deals service, and nothing else. One implementation for both
//! backends (portable SQL, `$n` placeholders).
//!
//! - [`pipelines`]: pipelines and their ordered stages, changed as a whole under the
//!   pipeline's row lock;
//! - [`products`]: the catalogue;
//! - [`deals`]: deals, their stage history and the board's totals;
//! - [`quotes`]: a deal's versioned quotes;
//! - [`contracts`]: contracts, their payment plans, payments and balances;
//! - [`targets`]: targets and what was achieved against them;
//! - [`reports`]: the aggregates of the reports.

pub mod contracts;
pub mod deals;
pub mod pipelines;
pub mod products;
pub mod quotes;
pub mod reports;
pub mod targets;

use crm_kit::db::{Db, Migrations};
use crm_kit::events::Outbox;

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

/// Record types of idempotent creation.
pub(crate) const CREATED_PRODUCT: i64 = 1;
pub(crate) const CREATED_DEAL: i64 = 2;
pub(crate) const CREATED_QUOTE: i64 = 3;
pub(crate) const CREATED_CONTRACT: i64 = 4;
pub(crate) const CREATED_PAYMENT: i64 = 5;

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    outbox: Outbox,
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store { db, outbox: Outbox::new(crate::SOURCE) }
    }

    /// Publishes its events through `outbox` (the role's, which its relay watches).
    pub fn with_outbox(mut self, outbox: Outbox) -> Store {
        self.outbox = outbox;
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The rows of an aggregate over many deals, with the database's parallel workers.
    pub(crate) async fn aggregate(&self, sql: &crm_kit::db::Sql) -> Result<Vec<sqlx::any::AnyRow>, crm_kit::ApiError> {
        let mut tx = self.db.begin_aggregate().await?;
        let rows = sql.query_unprepared().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }
}
