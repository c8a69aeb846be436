//! Test databases: a uniquely named PostgreSQL database per test (dropped afterwards), or a
//! SQLite file in a temporary directory, so that tests run in parallel.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

/// The PostgreSQL server tests use. Missing is a test failure, never a silent pass.
pub fn postgres_url() -> String {
    std::env::var("CRM_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("CRM_TEST_POSTGRES_URL is not set: run scripts/test.sh, or point it at a PostgreSQL server")
    })
}

pub enum TestDb {
    Postgres { url: String, server: String, name: String },
    Sqlite { url: String, _dir: tempfile::TempDir },
}

impl TestDb {
    /// A new, empty PostgreSQL database on the test server.
    pub async fn postgres() -> TestDb {
        let server = postgres_url();
        let name = format!("crm_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnectOptions::from_str(&server)
            .expect("CRM_TEST_POSTGRES_URL parses")
            .connect()
            .await
            .expect("connect to CRM_TEST_POSTGRES_URL");
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create test database");
        let _ = conn.close().await;
        let url = with_database(&server, &name);
        TestDb::Postgres { url, server, name }
    }

    /// A new SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        TestDb::Sqlite { url, _dir: dir }
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Postgres { url, .. } | TestDb::Sqlite { url, .. } => url,
        }
    }
}

/// `server` with its database path replaced by `name`.
pub fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (server, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(base.len());
    format!("{}/{name}{query}", &base[..host_end])
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { server, name, .. } = self {
            let (server, name) = (server.clone(), name.clone());
            // Drop is synchronous and may run inside a runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async move {
                    if let Ok(mut conn) = PgConnectOptions::from_str(&server).expect("url").connect().await {
                        let _ = conn
                            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_database_name() {
        assert_eq!(super::with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(super::with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(super::with_database("postgres://h/db?sslmode=disable", "x"), "postgres://h/x?sslmode=disable");
    }
}
