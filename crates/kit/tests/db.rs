//! The connection pool against a real PostgreSQL: what it hands out after a connection died.

use std::time::Duration;

use crm_kit::db::Db;
use crm_kit::testing::TestDb;

async fn backend_pid(db: &Db) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(db.pool()).await.expect("a query on the pool")
}

/// A connection the server ended while it sat idle (a database restart, a proxy's idle timeout)
/// is found out by the ping before it is handed out again, and replaced: the caller's query
/// runs on a new connection rather than failing.
#[tokio::test]
async fn a_connection_ended_while_idle_is_replaced_before_use() {
    let test_db = TestDb::postgres().await;
    let db = Db::connect(test_db.url(), 1).await.unwrap();
    let other = Db::connect(test_db.url(), 1).await.unwrap();
    let first = backend_pid(&db).await;
    let ended: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(first).fetch_one(other.pool()).await.unwrap();
    assert!(ended);
    // Idle for longer than a connection is trusted without a ping.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = backend_pid(&db).await;
    assert_ne!(first, second, "the query ran on a new connection");
}
