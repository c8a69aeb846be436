//! The embedded transport: consumers read the producer's outbox through its database, in
//! publication order, and keep their cursor in it (so that the relay keeps what they have not
//! read). No Redis; what a consumer has handled is still marked in its own database, so a
//! cursor that lags behind (a kill between the two commits) only costs a duplicate dropped.

use sqlx::Row;

use crate::ApiError;
use crate::db::{Db, Sql};
use crate::time::now_micros;

/// Published rows of the outbox in `db` after `seq`, oldest first.
pub(crate) async fn read_after(db: &Db, seq: i64, limit: i64) -> Result<Vec<(i64, Vec<u8>)>, ApiError> {
    let mut sql = Sql::new("SELECT seq, envelope FROM outbox WHERE seq IS NOT NULL AND seq > ");
    sql.bind(seq).push(" ORDER BY seq").limit(limit);
    let rows = sql.query().fetch_all(db.pool()).await?;
    rows.iter().map(|r| Ok((r.try_get("seq")?, r.try_get("envelope")?))).collect()
}

/// The last publication number of the outbox in `db`.
pub(crate) async fn last_seq(db: &Db) -> Result<i64, ApiError> {
    let row = Sql::new("SELECT last_seq FROM outbox_relay WHERE id = 1").query().fetch_one(db.pool()).await?;
    Ok(row.try_get("last_seq")?)
}

/// Where `consumer` is in the outbox in `db` (0 before its first event).
pub(crate) async fn cursor(db: &Db, consumer: &str) -> Result<i64, ApiError> {
    let mut sql = Sql::new("SELECT seq FROM outbox_cursors WHERE consumer = ");
    sql.bind(consumer);
    Ok(match sql.query().fetch_optional(db.pool()).await? {
        Some(row) => row.try_get("seq")?,
        None => 0,
    })
}

/// Moves `consumer`'s cursor forward to `seq`.
pub(crate) async fn advance(db: &Db, consumer: &str, seq: i64) -> Result<(), ApiError> {
    let mut sql = Sql::new("INSERT INTO outbox_cursors (consumer, seq, updated_at) VALUES (");
    sql.bind(consumer).push(", ").bind(seq).push(", ").bind(now_micros());
    sql.push(
        ") ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at \
         WHERE outbox_cursors.seq < excluded.seq",
    );
    sql.query().execute(db.pool()).await?;
    Ok(())
}

/// Every cursor kept in the outbox's database.
pub(crate) async fn cursors(db: &Db) -> Result<Vec<(String, i64)>, ApiError> {
    let rows = Sql::new("SELECT consumer, seq FROM outbox_cursors").query().fetch_all(db.pool()).await?;
    rows.iter().map(|r| Ok((r.try_get("consumer")?, r.try_get("seq")?))).collect()
}
