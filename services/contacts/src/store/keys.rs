//! Duplicate protection (SPEC C3): a normalised phone, e-mail or company name belongs to one
//! record of a kind. Whoever entered it first keeps it; the refusal names the holder and its
//! owner, across data scopes, so that the second salesperson learns who has the customer.

use std::collections::BTreeSet;

use crm_kit::ApiError;
use crm_kit::db::{Conn, Sql, Tx};
use sqlx::Row;

use super::{Store, table};
use crate::domain::{Key, Kind, Record};

/// A record holding a duplicate-protection key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub field: String,
    pub value: String,
    pub kind: Kind,
    pub record_id: String,
    pub owner_id: String,
    pub display_name: String,
}

impl Store {
    /// Claims duplicate-protection keys; fails naming the record that already holds one.
    pub(super) async fn insert_key_rows<R: Record>(&self, tx: &mut Tx, rows: &[(String, Key)]) -> Result<(), ApiError> {
        if rows.is_empty() {
            return Ok(());
        }
        let kind = R::KIND.record_type() as i64;
        let mut sql = Sql::new("INSERT INTO contact_keys (record_type, field, value, record_id) VALUES ");
        sql.push_values(rows, |v, (record_id, key)| {
            v.bind(kind).bind(key.field).bind(key.value.as_str()).bind(record_id.as_str());
        });
        sql.push(" ON CONFLICT (record_type, field, value) DO NOTHING RETURNING field, value");
        let inserted: BTreeSet<(String, String)> = sql
            .query()
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("field")?, row.try_get("value")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        let Some((_, key)) = rows.iter().find(|(_, k)| !inserted.contains(&(k.field.to_string(), k.value.clone())))
        else {
            return Ok(());
        };
        let holder = self.find_duplicates_in(tx, R::KIND, std::slice::from_ref(key)).await?;
        let message = match holder.first() {
            Some(d) if rows.iter().any(|(id, _)| *id == d.record_id) => {
                format!("the {} {} appears twice in this batch", key.field, key.value)
            }
            // The holder's id and owner, never its content: it may be outside the caller's scope.
            Some(d) => format!(
                "a {} with {} {} already exists: {}{}",
                R::KIND.noun(),
                key.field,
                key.value,
                d.record_id,
                if d.owner_id.is_empty() { String::new() } else { format!(", owned by {}", d.owner_id) }
            ),
            None => format!("the {} {} is already taken", key.field, key.value),
        };
        let mut metadata = vec![
            ("field".to_string(), key.field.to_string()),
            ("value".to_string(), key.value.clone()),
            ("record_type".to_string(), R::KIND.noun().to_string()),
        ];
        if let Some(d) = holder.first() {
            metadata.push(("record_id".to_string(), d.record_id.clone()));
            metadata.push(("owner_id".to_string(), d.owner_id.clone()));
        }
        Err(ApiError::AlreadyExists { message, reason: "DUPLICATE_RECORD", metadata })
    }

    /// Records of `kind` holding any of `keys`.
    pub async fn find_duplicates(&self, kind: Kind, keys: &[Key]) -> Result<Vec<Duplicate>, ApiError> {
        let mut conn = self.db().pool().acquire().await?;
        self.find_duplicates_in(&mut conn, kind, keys).await
    }

    async fn find_duplicates_in(&self, conn: &mut Conn, kind: Kind, keys: &[Key]) -> Result<Vec<Duplicate>, ApiError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql =
            Sql::new("SELECT k.field, k.value, k.record_id, t.owner_id, t.display_name FROM contact_keys k JOIN ");
        sql.push(table(kind)).push(" t ON t.id = k.record_id WHERE k.record_type = ").bind(kind.record_type() as i64);
        sql.push(" AND (");
        sql.push_each(keys, " OR ", |sql, key| {
            sql.push("(k.field = ").bind(key.field).push(" AND k.value = ").bind(key.value.as_str()).push(")");
        });
        sql.push(") ORDER BY k.field, k.value");
        let rows = sql.query().fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|row| {
                Ok(Duplicate {
                    field: row.try_get("field")?,
                    value: row.try_get("value")?,
                    kind,
                    record_id: row.try_get("record_id")?,
                    owner_id: row.try_get("owner_id")?,
                    display_name: row.try_get("display_name")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(ApiError::from)
    }
}
