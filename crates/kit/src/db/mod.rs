//! Storage: one pool of sqlx `Any` connections per service over PostgreSQL (cluster) or SQLite
//! (embedded), per-dialect migrations, and the pieces every store is built from:
//!
//! - [`Pool`], [`Conn`] and [`Tx`]: kit's pool (sqlx's pings every connection that comes back,
//!   this one only those left mid-statement; see [`pool`]);
//! - [`Sql`]: statements assembled from code fragments, every value a bound parameter;
//! - [`Edit`]: a versioned change of one row (lock, etag check, next version, `ABORTED` on a
//!   race, the "still referenced" guard);
//! - [`idempotency`]: create requests replayed by the caller's `request_id`;
//! - row-lock clauses, the one-writer-at-a-time lock and unique-violation detection.
//!
//! Portable columns only (ARCHITECTURE §11): TEXT, BIGINT and BLOB.

mod edit;
pub mod idempotency;
pub mod pool;
mod sql;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, ConnectOptions, Connection, Executor};

pub use edit::Edit;
pub use pool::{Conn, Pool, Tx};
pub use sql::{Bind, Sql, Values};

use crate::error::ApiError;
use crate::server::ReadyCheck;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL (use postgres://… or sqlite://…): {0}")]
    UnsupportedUrl(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// `SUM(expr)` read back as a BIGINT: PostgreSQL sums BIGINTs into NUMERIC, which the
    /// portable driver layer does not read (the sum must fit; a larger one is an error, never a
    /// wrong number).
    pub fn sum(self, expr: &str) -> String {
        match self {
            Backend::Postgres => format!("CAST(SUM({expr}) AS BIGINT)"),
            Backend::Sqlite => format!("SUM({expr})"),
        }
    }

    pub fn from_url(url: &str) -> Result<Backend, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(DbError::UnsupportedUrl(redact(url)))
        }
    }
}

/// Hides a password in a database URL so that it can be logged.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &userinfo[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Both dialects' migrations of one service (`sqlx::migrate!("migrations/postgres")`…).
pub struct Migrations {
    pub postgres: Migrator,
    pub sqlite: Migrator,
}

/// Kit's own tables, in every service's database, tracked in `_crm_kit_migrations` so that they
/// never clash with the service's migrations.
fn kit_migrations() -> Migrations {
    let mut postgres = sqlx::migrate!("migrations/postgres");
    postgres.dangerous_set_table_name("_crm_kit_migrations");
    let mut sqlite = sqlx::migrate!("migrations/sqlite");
    sqlite.dangerous_set_table_name("_crm_kit_migrations");
    Migrations { postgres, sqlite }
}

/// Whether a statement failed on a unique index (a key someone else holds).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// A service's database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: Pool,
    backend: Backend,
}

impl Db {
    /// Connects to `url` with at most `max_connections`, applies this service's `migrations` and
    /// reports the pool on `/metrics` as `name`. For SQLite the file (and its directory) is
    /// created if missing and put into WAL mode.
    pub async fn open(url: &str, max_connections: u32, migrations: &Migrations, name: &str) -> Result<Db, DbError> {
        let db = Db::connect(url, max_connections).await?;
        db.migrate(migrations).await?;
        crate::metrics::register_pool(name, db.pool.clone());
        Ok(db)
    }

    /// Connects to `url` without migrating.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        crate::metrics::note_db_system(backend);
        let url = match backend {
            Backend::Postgres => url.to_string(),
            Backend::Sqlite => prepare_sqlite(url).await?,
        };
        let pool = Pool::connect(&url, backend, max_connections).await.map_err(DbError::Connect)?;
        Ok(Db { pool, backend })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations of this backend's dialect: the service's own, then kit's (the
    /// outbox, consumers' bookkeeping and jobs every service has), each tracked apart.
    pub async fn migrate(&self, migrations: &Migrations) -> Result<(), DbError> {
        let kit = kit_migrations();
        for set in [migrations, &kit] {
            let migrator = match self.backend {
                Backend::Postgres => &set.postgres,
                Backend::Sqlite => &set.sqlite,
            };
            let mut conn = self.pool.acquire().await.map_err(DbError::Connect)?;
            // `run` over a connection's `Acquire` trips the compiler's check of higher-ranked
            // lifetimes in a `Send` future; `run_direct` is what it calls.
            migrator.run_direct(None, conn.raw(), false).await?;
        }
        Ok(())
    }

    /// A transaction for writing. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`) so that concurrent writers queue instead of failing to upgrade a read lock.
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        let begin = match self.backend {
            Backend::Postgres => "BEGIN",
            Backend::Sqlite => "BEGIN IMMEDIATE",
        };
        Tx::begin(self.pool.acquire().await?, begin).await
    }

    /// A read-only transaction for statements that add up a large part of a table (a report
    /// over a million rows): on PostgreSQL with the server's parallel workers, which the pool's
    /// connections otherwise go without ([`prepare_connection`]) — a funnel over 930,000 deals
    /// takes about half the time with two workers. The setting ends with the transaction.
    pub async fn begin_aggregate(&self) -> Result<Tx, sqlx::Error> {
        match self.backend {
            Backend::Postgres => {
                let mut tx = Tx::begin(self.pool.acquire().await?, "BEGIN READ ONLY").await?;
                sqlx::query("SET LOCAL max_parallel_workers_per_gather TO DEFAULT").execute(&mut *tx).await?;
                Ok(tx)
            }
            Backend::Sqlite => Tx::begin(self.pool.acquire().await?, "BEGIN").await,
        }
    }

    /// ` FOR UPDATE` on PostgreSQL; nothing on SQLite, where a write transaction (see
    /// [`Db::begin_write`]) already holds the database's one write lock.
    pub fn for_update(&self) -> &'static str {
        if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" }
    }

    /// ` FOR SHARE` on PostgreSQL (the row must not change or go until commit); nothing on SQLite.
    pub fn for_share(&self) -> &'static str {
        if self.backend == Backend::Postgres { " FOR SHARE" } else { "" }
    }

    /// Makes the write transactions that call this with the same `key` run one after another:
    /// `tx` waits here until every other holder of `key` has committed or rolled back, and holds
    /// it until it ends itself (a PostgreSQL transaction-scoped advisory lock; SQLite's single
    /// writer already runs write transactions one at a time).
    pub async fn one_writer_at_a_time(&self, tx: &mut Tx, key: i64) -> Result<(), ApiError> {
        if self.backend == Backend::Postgres {
            let mut sql = Sql::new("SELECT pg_advisory_xact_lock(");
            sql.bind(key).push(")");
            sql.query().execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// The readiness check of a role whose work needs this database: `what` names it in the
    /// reason given when it does not answer.
    pub fn ready_check(&self, what: &'static str) -> ReadyCheck {
        let db = self.clone();
        Arc::new(move || {
            let db = db.clone();
            Box::pin(async move { db.ping().await.map_err(|e| format!("{what} database: {e}")) })
        })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The settings of each new connection.
async fn prepare_connection(backend: Backend, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    match backend {
        Backend::Sqlite => {
            conn.execute("PRAGMA synchronous = NORMAL").await?;
            conn.execute("PRAGMA foreign_keys = ON").await?;
            conn.execute("PRAGMA busy_timeout = 10000").await?;
        }
        // PostgreSQL's stock random_page_cost (4) prices an index walk in another order than
        // the table's as if it read spinning disks; with the data cached or on SSD it picks a
        // scan of the newest rows with a filter over a walk of the filter's own index (a
        // stage+tag first page at 1M people: 47 ms instead of 6.5 ms). The stock
        // max_parallel_workers_per_gather (2) starts workers for a page of 50 whenever the whole
        // listing would cost much: 11 ms of starting them for 2 ms of work. Unless the server or
        // the connection URL set them otherwise, each connection uses the SSD value and no
        // parallel workers.
        Backend::Postgres => {
            conn.execute(
                "DO $$ BEGIN IF current_setting('random_page_cost')::float8 = 4 THEN \
                 SET random_page_cost = 1.1; END IF; \
                 IF current_setting('max_parallel_workers_per_gather')::int = 2 THEN \
                 SET max_parallel_workers_per_gather = 0; END IF; END $$",
            )
            .await?;
        }
    }
    Ok(())
}

async fn prepare_sqlite(url: &str) -> Result<String, DbError> {
    let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(DbError::UnsupportedUrl(format!(
            "{url}: in-memory SQLite gives every connection its own database; use a file"
        )));
    }
    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DbError::DataDir { path: dir.display().to_string(), source })?;
    }
    let url = format!("sqlite://{path}?mode=rwc");
    // journal_mode is a property of the file: set it once, on one connection.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
        .map_err(DbError::Connect)?
        .connect()
        .await
        .map_err(DbError::Connect)?;
    conn.execute("PRAGMA journal_mode = WAL").await.map_err(DbError::Connect)?;
    conn.close().await.map_err(DbError::Connect)?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://crm:s3cret@db:5432/crm"), "postgres://crm:***@db:5432/crm");
        assert_eq!(redact("postgres://crm@db/crm"), "postgres://crm@db/crm");
        assert_eq!(redact("sqlite://data/contacts.db"), "sqlite://data/contacts.db");
    }

    #[test]
    fn backend_from_url() {
        assert_eq!(Backend::from_url("postgres://h/db").unwrap(), Backend::Postgres);
        assert_eq!(Backend::from_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert!(Backend::from_url("mysql://h/db").is_err());
    }
}
