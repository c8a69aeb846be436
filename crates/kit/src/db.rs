//! Storage: one sqlx `Any` pool per service over PostgreSQL (cluster) or SQLite (embedded),
//! per-dialect migrations, and a small SQL builder whose values are always bound parameters.
//!
//! Portable columns only (ARCHITECTURE §11): TEXT, BIGINT and BLOB.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyArguments, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::query::Query;
use sqlx::{Any, AnyPool, AssertSqlSafe, ConnectOptions, Connection, Executor, Transaction};

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

/// A service's database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connects to `url`. For SQLite the file (and its directory) is created if missing and put
    /// into WAL mode.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let url = match backend {
            Backend::Postgres => url.to_string(),
            Backend::Sqlite => prepare_sqlite(url).await?,
        };
        let mut options =
            AnyPoolOptions::new().max_connections(max_connections.max(1)).acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await.map_err(DbError::Connect)?;
        Ok(Db { pool, backend })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations of this backend's dialect.
    pub async fn migrate(&self, migrations: &Migrations) -> Result<(), DbError> {
        let migrator = match self.backend {
            Backend::Postgres => &migrations.postgres,
            Backend::Sqlite => &migrations.sqlite,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// A transaction for writing. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`) so that concurrent writers queue instead of failing to upgrade a read lock.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend {
            Backend::Postgres => self.pool.begin().await,
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
        }
    }

    /// Whether the database answers.
    /// ` FOR UPDATE` on PostgreSQL; nothing on SQLite, where a write transaction (see
    /// `begin_write`) already holds the database's one write lock.
    pub fn for_update(&self) -> &'static str {
        if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" }
    }

    /// ` FOR SHARE` on PostgreSQL (the row must not change or go until commit); nothing on SQLite.
    pub fn for_share(&self) -> &'static str {
        if self.backend == Backend::Postgres { " FOR SHARE" } else { "" }
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
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

/// A value bound to a SQL parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

impl From<String> for Bind {
    fn from(v: String) -> Self {
        Bind::Text(v)
    }
}

impl From<&str> for Bind {
    fn from(v: &str) -> Self {
        Bind::Text(v.to_string())
    }
}

impl From<&String> for Bind {
    fn from(v: &String) -> Self {
        Bind::Text(v.clone())
    }
}

impl From<i64> for Bind {
    fn from(v: i64) -> Self {
        Bind::Int(v)
    }
}

impl From<Vec<u8>> for Bind {
    fn from(v: Vec<u8>) -> Self {
        Bind::Bytes(v)
    }
}

/// SQL assembled from fixed fragments and `$n` placeholders; values only ever go into binds.
#[derive(Debug, Clone, Default)]
pub struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    pub fn new(fragment: &'static str) -> Sql {
        Sql { text: fragment.to_string(), binds: Vec::new() }
    }

    /// Appends a fixed SQL fragment (code, never user input).
    pub fn push(&mut self, fragment: &str) -> &mut Sql {
        self.text.push_str(fragment);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Bind>) -> &mut Sql {
        self.binds.push(value.into());
        self.text.push('$');
        self.text.push_str(&self.binds.len().to_string());
        self
    }

    /// Appends another statement (e.g. as a subquery), renumbering its placeholders.
    pub fn push_sql(&mut self, other: Sql) -> &mut Sql {
        let offset = self.binds.len();
        let mut chars = other.text.chars().peekable();
        while let Some(c) = chars.next() {
            self.text.push(c);
            if c == '$' {
                let mut digits = String::new();
                while let Some(d) = chars.next_if(|d| d.is_ascii_digit()) {
                    digits.push(d);
                }
                match digits.parse::<usize>() {
                    Ok(n) => self.text.push_str(&(n + offset).to_string()),
                    Err(_) => self.text.push_str(&digits),
                }
            }
        }
        self.binds.extend(other.binds);
        self
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_parts(self) -> (String, Vec<Bind>) {
        (self.text, self.binds)
    }

    /// The query, ready to run. The text holds only fragments from code and placeholders.
    pub fn query(&self) -> Query<'static, Any, AnyArguments> {
        let mut query = sqlx::query(AssertSqlSafe(self.text.clone()));
        for bind in &self.binds {
            query = match bind {
                Bind::Text(v) => query.bind(v.clone()),
                Bind::Int(v) => query.bind(*v),
                Bind::Bytes(v) => query.bind(v.clone()),
            };
        }
        query
    }
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
    fn numbers_placeholders() {
        let mut sql = Sql::new("SELECT * FROM t WHERE a = ");
        sql.bind("x").push(" AND b > ").bind(3_i64);
        assert_eq!(sql.text(), "SELECT * FROM t WHERE a = $1 AND b > $2");
    }

    #[test]
    fn nests_statements_renumbering_placeholders() {
        let mut inner = Sql::new("SELECT id FROM t WHERE a = ");
        inner.bind("x").push(" LIMIT ").bind(10_i64);
        let mut outer = Sql::new("SELECT * FROM (");
        outer.push_sql(inner).push(") s WHERE b = ").bind("y");
        let mut first = Sql::new("WHERE c = ");
        first.bind(1_i64).push(" AND d IN (").push_sql({
            let mut sub = Sql::new("SELECT 1 WHERE e = ");
            sub.bind(2_i64);
            sub
        });
        assert_eq!(outer.text(), "SELECT * FROM (SELECT id FROM t WHERE a = $1 LIMIT $2) s WHERE b = $3");
        assert_eq!(first.text(), "WHERE c = $1 AND d IN (SELECT 1 WHERE e = $2");
        let (_, binds) = first.into_parts();
        assert_eq!(binds, vec![Bind::Int(1), Bind::Int(2)]);
    }

    #[test]
    fn backend_from_url() {
        assert_eq!(Backend::from_url("postgres://h/db").unwrap(), Backend::Postgres);
        assert_eq!(Backend::from_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert!(Backend::from_url("mysql://h/db").is_err());
    }
}
