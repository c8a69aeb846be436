//! kit's connection pool against real databases (PostgreSQL, and a SQLite file): how each
//! connection comes back (finished, left mid-statement, inside a transaction, failed), what it
//! hands out after a connection died, its bound and its closing.

use std::time::Duration;

use crm_kit::db::{Db, Pool};
use crm_kit::testing::TestDb;
use futures_util::StreamExt;
use sqlx::{AssertSqlSafe, Executor, Row};

async fn backend_pid(db: &Db) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(db.pool()).await.expect("a query on the pool")
}

/// Both backends, each a new database.
async fn both() -> Vec<TestDb> {
    vec![TestDb::postgres().await, TestDb::sqlite()]
}

/// A statement yielding `n` rows on either backend.
fn counting_to(db: &Db, n: i64) -> String {
    match db.backend() {
        crm_kit::db::Backend::Postgres => format!("SELECT x FROM generate_series(1, {n}) AS x"),
        crm_kit::db::Backend::Sqlite => {
            format!("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c")
        }
    }
}

async fn answer(pool: &Pool) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT CAST(42 AS BIGINT)").fetch_one(pool).await.expect("the next statement runs")
}

/// Waits until the pool has `n` connections at rest (a connection left unsure is checked in a
/// task of its own before it is).
async fn until_idle(pool: &Pool, n: usize) {
    for _ in 0..500 {
        if pool.num_idle() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the pool has {} connections at rest, not {n}", pool.num_idle());
}

/// A connection whose statements finished is back at rest the moment it is dropped, with no
/// round trip to the database; one dropped while a statement was still sending rows is checked
/// first, in a task of its own, and then serves the next statement correctly.
#[tokio::test]
async fn connections_come_back_checked_only_when_left_mid_statement() {
    for test_db in both().await {
        let db = Db::connect(test_db.url(), 1).await.unwrap();
        let pool = db.pool();

        let mut conn = pool.acquire().await.unwrap();
        let rows = sqlx::query(AssertSqlSafe(counting_to(&db, 3))).fetch_all(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 3);
        drop(conn);
        assert_eq!(pool.num_idle(), 1, "back at rest at once");

        let mut conn = pool.acquire().await.unwrap();
        {
            let statement = counting_to(&db, 200_000);
            let mut rows = sqlx::query(AssertSqlSafe(statement.as_str())).fetch(&mut conn);
            let first: i64 = rows.next().await.unwrap().unwrap().get(0);
            assert_eq!(first, 1);
        }
        drop(conn);
        assert_eq!(pool.num_idle(), 0, "checked before it rests");
        until_idle(pool, 1).await;
        assert_eq!(answer(pool).await, 42, "{}", test_db.url());

        // A statement on the pool whose future is dropped before it ends.
        let slow = match db.backend() {
            crm_kit::db::Backend::Postgres => "SELECT pg_sleep(1)".to_string(),
            crm_kit::db::Backend::Sqlite => format!("SELECT COUNT(*) FROM ({})", counting_to(&db, 5_000_000)),
        };
        let cut =
            tokio::time::timeout(Duration::from_millis(50), sqlx::query(AssertSqlSafe(slow.clone())).execute(pool))
                .await;
        assert!(cut.is_err(), "the slow statement was cut");
        assert_eq!(answer(pool).await, 42, "{}", test_db.url());
        assert_eq!(pool.size(), 1);
    }
}

/// A transaction dropped without a commit, or whose statement was cut mid-way, is rolled back
/// before its connection is used again; a committed one stays.
#[tokio::test]
async fn transactions_left_open_are_rolled_back() {
    for test_db in both().await {
        let db = Db::connect(test_db.url(), 1).await.unwrap();
        db.pool().execute("CREATE TABLE kept (x BIGINT NOT NULL)").await.unwrap();
        let count = || async { sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM kept").fetch_one(db.pool()).await };

        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO kept (x) VALUES (1)").execute(&mut *tx).await.unwrap();
        drop(tx);
        assert_eq!(count().await.unwrap(), 0, "{}", test_db.url());

        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO kept (x) VALUES (2)").execute(&mut *tx).await.unwrap();
        let slow = match db.backend() {
            crm_kit::db::Backend::Postgres => "SELECT pg_sleep(1)".to_string(),
            crm_kit::db::Backend::Sqlite => format!("SELECT COUNT(*) FROM ({})", counting_to(&db, 5_000_000)),
        };
        let cut =
            tokio::time::timeout(Duration::from_millis(50), sqlx::query(AssertSqlSafe(slow.clone())).execute(&mut *tx))
                .await;
        assert!(cut.is_err(), "the slow statement was cut");
        drop(tx);
        assert_eq!(count().await.unwrap(), 0, "{}", test_db.url());

        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO kept (x) VALUES (3)").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO kept (x) VALUES (4)").execute(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        let kept: Vec<i64> = sqlx::query_scalar("SELECT x FROM kept").fetch_all(db.pool()).await.unwrap();
        assert_eq!(kept, vec![3], "{}", test_db.url());
        assert_eq!(db.pool().num_idle(), 1);
    }
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

/// A connection that failed while in use is closed, not put back: the next statement, right
/// after (well within the time a connection at rest is trusted without a ping), runs on a new
/// one.
#[tokio::test]
async fn a_connection_that_failed_in_use_is_not_handed_out_again() {
    let test_db = TestDb::postgres().await;
    let db = Db::connect(test_db.url(), 1).await.unwrap();
    let other = Db::connect(test_db.url(), 1).await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await.unwrap();
    let ended: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(first).fetch_one(other.pool()).await.unwrap();
    assert!(ended);
    let failed = sqlx::query("SELECT 1").execute(&mut conn).await;
    assert!(failed.is_err(), "a statement on the ended connection fails");
    drop(conn);
    assert_eq!(db.pool().size(), 0, "closed, not kept");
    let second = backend_pid(&db).await;
    assert_ne!(first, second);
}

/// No more connections than the pool's maximum are opened: an acquisition beyond it waits for
/// one to come back and gets that one. Closing refuses acquisitions and waits for the
/// connections in use.
#[tokio::test]
async fn the_pool_is_bounded_and_closes_after_its_connections_come_back() {
    for test_db in both().await {
        let db = Db::connect(test_db.url(), 2).await.unwrap();
        let pool = db.pool().clone();
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        assert_eq!(pool.size(), 2);
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { answer(&pool).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a third acquisition waits");
        drop(a);
        assert_eq!(waiting.await.unwrap(), 42);
        assert_eq!(pool.size(), 2, "no third connection was opened");

        let closing = tokio::spawn({
            let pool = pool.clone();
            async move { pool.close().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!closing.is_finished(), "closing waits for the connection in use");
        assert!(matches!(pool.acquire().await, Err(sqlx::Error::PoolClosed)));
        drop(b);
        closing.await.unwrap();
        assert_eq!(pool.size(), 0);
    }
}
