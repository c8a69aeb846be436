//! A versioned change of one row (ARCHITECTURE §3, optimistic concurrency): every Update and
//! Delete of every store goes through [`Edit`], so that each one locks the row, honours the
//! caller's etag, writes the next version and refuses to delete what is still referenced in
//! the same way.
//!
//! A row's etag is its `version` as text; the table has `id`, `version` and `updated_at`
//! columns.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Db, Sql, Tx};
use crate::error::ApiError;

/// A row being changed under its write lock, inside the write transaction that will also hold
/// the change's side effects (revisions, audit events).
pub struct Edit {
    tx: Tx,
    table: &'static str,
    noun: &'static str,
    id: String,
    version: i64,
}

impl std::fmt::Debug for Edit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edit")
            .field("table", &self.table)
            .field("id", &self.id)
            .field("version", &self.version)
            .finish()
    }
}

/// NOT_FOUND for a `noun` ("person", "role") with this id.
pub fn not_found(noun: &str, id: &str) -> ApiError {
    ApiError::NotFound(format!("{noun} {id} not found"))
}

/// ABORTED when `sent` is not empty and not the etag of `version`.
fn require_etag(noun: &str, id: &str, sent: &str, version: i64) -> Result<(), ApiError> {
    let stored = version.to_string();
    if sent.is_empty() || sent == stored {
        Ok(())
    } else {
        Err(ApiError::Aborted(format!(
            "{noun} {id} was changed since you read it (etag {sent}, now {stored}); read it again and retry"
        )))
    }
}

impl Edit {
    /// Locks the row that `select` finds in `tx`: `select` reads the row of `table` by `id`
    /// (with any scope condition: a row outside it is NOT_FOUND like a missing one) including
    /// its `version`; the lock clause is appended here. Returns the edit and the row as read.
    pub async fn lock(
        db: &Db,
        mut tx: Tx,
        table: &'static str,
        noun: &'static str,
        id: &str,
        mut select: Sql,
    ) -> Result<(Edit, AnyRow), ApiError> {
        select.push(db.for_update());
        let row = select.query().fetch_optional(&mut *tx).await?.ok_or_else(|| not_found(noun, id))?;
        let version: i64 = row.try_get("version")?;
        Ok((Edit { tx, table, noun, id: id.to_string(), version }, row))
    }

    /// The row's version when it was locked.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The transaction, for the change's side effects.
    pub fn tx(&mut self) -> &mut Tx {
        &mut self.tx
    }

    /// ABORTED when the caller sent an etag (the version they read) and the row has another one
    /// now: someone changed it meanwhile. An empty etag skips the check.
    pub fn require_etag(&self, sent: &str) -> Result<(), ApiError> {
        require_etag(self.noun, &self.id, sent, self.version)
    }

    /// FAILED_PRECONDITION saying `why` when `probe` finds a row: the record is still referenced
    /// (a company's people, a department's users) and cannot go.
    pub async fn refuse_if_referenced(&mut self, mut probe: Sql, why: impl FnOnce() -> String) -> Result<(), ApiError> {
        probe.push(" LIMIT 1");
        if probe.query().fetch_optional(&mut *self.tx).await?.is_some() {
            return Err(ApiError::FailedPrecondition(why()));
        }
        Ok(())
    }

    /// Writes `assignments` (`name = $1, parent_id = $2`…), the next version and `updated_at =
    /// now`; ABORTED if the row changed after it was locked. Returns the new version.
    pub async fn save(&mut self, assignments: Sql, now: i64) -> Result<i64, ApiError> {
        self.save_unique(assignments, now, |err| err.into()).await
    }

    /// Like [`Edit::save`] for rows with unique columns: a unique violation (someone took the
    /// value since it was checked) becomes what `duplicate` makes of it.
    pub async fn save_unique(
        &mut self,
        assignments: Sql,
        now: i64,
        duplicate: impl FnOnce(sqlx::Error) -> ApiError,
    ) -> Result<i64, ApiError> {
        let next = self.version + 1;
        let mut sql = Sql::new("UPDATE ");
        sql.push(self.table).push(" SET ").push_sql(assignments);
        sql.push(", updated_at = ").bind(now).push(", version = ").bind(next);
        sql.push(" WHERE id = ").bind(self.id.as_str()).push(" AND version = ").bind(self.version);
        match sql.query().execute(&mut *self.tx).await {
            Ok(done) if done.rows_affected() == 1 => Ok(next),
            Ok(_) => Err(ApiError::Aborted(format!("{} {} changed concurrently; read it again", self.noun, self.id))),
            Err(err) if super::is_unique_violation(&err) => Err(duplicate(err)),
            Err(err) => Err(err.into()),
        }
    }

    /// Deletes the row.
    pub async fn delete(&mut self) -> Result<(), ApiError> {
        let mut sql = Sql::new("DELETE FROM ");
        sql.push(self.table).push(" WHERE id = ").bind(self.id.as_str());
        sql.query().execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Commits the change and its side effects.
    pub async fn commit(self) -> Result<(), ApiError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// The edit's transaction, its change written, for a change of another row that commits
    /// with it (the other row's own [`Edit`] takes it on).
    pub fn into_tx(self) -> Tx {
        self.tx
    }

    /// Ends the edit without writing anything (nothing changed).
    pub async fn abandon(self) -> Result<(), ApiError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_etags_are_aborted() {
        assert!(require_etag("person", "p1", "", 3).is_ok());
        assert!(require_etag("person", "p1", "3", 3).is_ok());
        let err = require_etag("person", "p1", "2", 3).unwrap_err();
        assert!(matches!(&err, ApiError::Aborted(m) if m.contains("person p1") && m.contains("now 3")));
    }
}
