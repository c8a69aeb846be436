//! Idempotent creation (AIP-155): a Create call may carry a `request_id`; a retry with the same
//! id returns what the first call created instead of creating it again.
//!
//! Request ids are scoped to the caller: two users who happen to pick the same id create two
//! records, and nobody learns anything about another caller's request. A service that offers
//! this keeps, in its own database:
//!
//! ```sql
//! CREATE TABLE create_requests (
//!     caller_id   TEXT   NOT NULL,
//!     request_id  TEXT   NOT NULL,
//!     record_type BIGINT NOT NULL,
//!     record_id   TEXT   NOT NULL,
//!     created_at  BIGINT NOT NULL,
//!     PRIMARY KEY (caller_id, request_id)
//! );
//! ```

use sqlx::Row;

use super::{Pool, Sql, Tx};
use crate::error::ApiError;

/// Longest `request_id` accepted.
pub const MAX_REQUEST_ID_CHARS: usize = 100;

/// What a create request's id says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The first call with this id: go on and create the record (in the same transaction).
    First,
    /// A retry: the caller's earlier call with this id created this record.
    Retry { record_type: i64, record_id: String },
}

/// Records, in the creating transaction, that `caller`'s `request_id` creates `record_id` of
/// `record_type`; if the caller used this id before, says what it created then. An empty
/// `request_id` is always [`Claim::First`].
pub async fn claim(
    tx: &mut Tx,
    caller: &str,
    request_id: &str,
    record_type: i64,
    record_id: &str,
    now: i64,
) -> Result<Claim, ApiError> {
    if request_id.is_empty() {
        return Ok(Claim::First);
    }
    let mut sql =
        Sql::new("INSERT INTO create_requests (caller_id, request_id, record_type, record_id, created_at) VALUES ");
    sql.push_values([()], |v, ()| {
        v.bind(caller).bind(request_id).bind(record_type).bind(record_id).bind(now);
    });
    sql.push(" ON CONFLICT (caller_id, request_id) DO NOTHING");
    if sql.query().execute(&mut **tx).await?.rows_affected() == 1 {
        return Ok(Claim::First);
    }
    // The earlier call committed (a concurrent one is waited for by the conflict check).
    let row = created_by(caller, request_id).query().fetch_one(&mut **tx).await?;
    Ok(Claim::Retry { record_type: row.try_get("record_type")?, record_id: row.try_get("record_id")? })
}

/// The id of the record of `record_type` that `caller`'s earlier call with `request_id`
/// created, if that call committed. Read before a create is validated when its checks depend on
/// the time (a reminder that has since passed): a retry of a call that did create gets what it
/// created, rather than a refusal of times that were valid when it was first sent. An empty
/// `request_id` names nothing.
pub async fn earlier(
    pool: &Pool,
    caller: &str,
    request_id: &str,
    record_type: i64,
) -> Result<Option<String>, ApiError> {
    if request_id.is_empty() {
        return Ok(None);
    }
    let Some(row) = created_by(caller, request_id).query().fetch_optional(pool).await? else {
        return Ok(None);
    };
    let created: i64 = row.try_get("record_type")?;
    Ok(if created == record_type { Some(row.try_get("record_id")?) } else { None })
}

fn created_by(caller: &str, request_id: &str) -> Sql {
    let mut sql = Sql::new("SELECT record_type, record_id FROM create_requests WHERE caller_id = ");
    sql.bind(caller).push(" AND request_id = ").bind(request_id);
    sql
}
