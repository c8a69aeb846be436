//! What operators see and do (`crm events`): outbox backlog, consumer groups' lag, dead letters
//! and their retry. Reads a service's database (and Redis) directly, like `crm migrate`.

use std::time::Duration;

use crm_proto::events::v1::Envelope;
use prost::Message;
use sqlx::Row;

use super::embedded;
use super::redis::{self as streams, GroupState};
use crate::ApiError;
use crate::db::{Db, Sql};
use crate::role::Error;
use crate::time::now_micros;

/// The outbox of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Committed events not published yet.
    pub unpublished: i64,
    /// Age of the oldest of them.
    pub oldest_unpublished: Option<Duration>,
    /// Published events kept until every group has them.
    pub retained: i64,
    /// The last publication number.
    pub last_seq: i64,
}

pub async fn outbox_status(db: &Db) -> Result<OutboxStatus, ApiError> {
    let row = Sql::new("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE seq IS NULL")
        .query()
        .fetch_one(db.pool())
        .await?;
    let unpublished: i64 = row.try_get("n")?;
    let oldest: Option<i64> = row.try_get("oldest")?;
    let retained: i64 = Sql::new("SELECT COUNT(*) AS n FROM outbox WHERE seq IS NOT NULL")
        .query()
        .fetch_one(db.pool())
        .await?
        .try_get("n")?;
    Ok(OutboxStatus {
        unpublished,
        oldest_unpublished: oldest.map(|t| Duration::from_micros((now_micros() - t).max(0) as u64)),
        retained,
        last_seq: embedded::last_seq(db).await?,
    })
}

/// A consumer group reading a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: String,
    /// Events not delivered to it yet.
    pub lag: i64,
    /// Delivered, not acknowledged (Redis only).
    pub pending: i64,
}

/// The consumer groups of `source`: from its Redis stream (`redis`: URL and stream key), or
/// without Redis from the cursors in the source's database `db`.
pub async fn groups(db: &Db, redis: Option<(&str, &str)>) -> Result<Vec<GroupStatus>, Error> {
    match redis {
        Some((url, key)) => {
            let bus = streams::Bus::new(url)?;
            let states: Vec<GroupState> = streams::groups(&mut bus.conn(), key).await?.unwrap_or_default();
            Ok(states.into_iter().map(|s| GroupStatus { group: s.name, lag: s.lag, pending: s.pending }).collect())
        }
        None => {
            let last = embedded::last_seq(db).await?;
            Ok(embedded::cursors(db)
                .await?
                .into_iter()
                .map(|(group, seq)| GroupStatus { group, lag: (last - seq).max(0), pending: 0 })
                .collect())
        }
    }
}

/// An event a consumer gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub consumer: String,
    pub event_id: String,
    pub source: String,
    pub event_type: String,
    /// The record it is about.
    pub subject: String,
    pub attempts: i64,
    pub last_error: String,
    /// When it was parked (microseconds since the epoch).
    pub failed_at: i64,
    /// Whether a retry is asked for and not yet done.
    pub retry_requested: bool,
}

/// The dead letters of the consumers whose database is `db`, oldest first.
pub async fn dead_letters(db: &Db, limit: i64) -> Result<Vec<DeadLetter>, ApiError> {
    let mut sql = Sql::new(
        "SELECT consumer, event_id, source, event_type, envelope, attempts, last_error, failed_at, retry_requested_at \
         FROM dead_letters ORDER BY failed_at, event_id LIMIT ",
    );
    sql.bind(limit);
    let rows = sql.query().fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(DeadLetter {
                consumer: r.try_get("consumer")?,
                event_id: r.try_get("event_id")?,
                source: r.try_get("source")?,
                event_type: r.try_get("event_type")?,
                subject: Envelope::decode(r.try_get::<Vec<u8>, _>("envelope")?.as_slice())
                    .map(|e| e.subject)
                    .unwrap_or_default(),
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                failed_at: r.try_get("failed_at")?,
                retry_requested: r.try_get::<i64, _>("retry_requested_at")? > 0,
            })
        })
        .collect()
}

/// Asks the running consumers to handle dead letters again: one (`event_id`) or all. Returns
/// how many were marked.
pub async fn retry(db: &Db, event_id: Option<&str>) -> Result<u64, ApiError> {
    let mut sql = Sql::new("UPDATE dead_letters SET retry_requested_at = ");
    sql.bind(now_micros()).push(" WHERE 1 = 1");
    if let Some(id) = event_id {
        sql.push(" AND event_id = ").bind(id);
    }
    Ok(sql.query().execute(db.pool()).await?.rows_affected())
}
