//! Every SQL statement of the contacts service, and nothing else. One implementation for both
//! backends: portable SQL with `$n` placeholders, and named dialect branches only for text
//! search and row locking.

use std::collections::BTreeSet;

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Backend, Db, DbError, Migrations, Sql};
use crm_kit::filter::{self, Field, FieldKind};
use crm_kit::page::{Cursor, KeyValue, fingerprint};
use crm_kit::time::now_micros;
use crm_kit::validate::check_etag;
use crm_proto::contacts::v1::Revision;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::domain::{self, Change, Columns, Key, Kind, Meta, Record};

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

const STAGES: &[(&str, i64)] =
    &[("UNSPECIFIED", 0), ("LEAD", 1), ("PROSPECT", 2), ("CUSTOMER", 3), ("REPEAT_CUSTOMER", 4), ("LOST", 5)];

const fn text(name: &'static str) -> Field {
    Field { name, column: name, kind: FieldKind::Text }
}

const COMMON_FIELDS: [Field; 9] = [
    Field { name: "id", column: "id", kind: FieldKind::Text },
    text("owner_id"),
    Field { name: "stage", column: "stage", kind: FieldKind::Enum { prefix: "LIFECYCLE_STAGE_", values: STAGES } },
    text("source"),
    text("region"),
    Field {
        name: "tags",
        column: "",
        kind: FieldKind::Collection { prefix: "id IN (SELECT record_id FROM tags WHERE tag = ", suffix: ")" },
    },
    Field { name: "do_not_contact", column: "do_not_contact", kind: FieldKind::Bool },
    Field { name: "create_time", column: "created_at", kind: FieldKind::Time },
    Field { name: "update_time", column: "updated_at", kind: FieldKind::Time },
];
const ACTIVITY: Field = Field { name: "last_activity_time", column: "last_activity_at", kind: FieldKind::Time };

/// The fields a list filter may use, by kind.
pub fn filter_fields(kind: Kind) -> Vec<Field> {
    let mut fields = COMMON_FIELDS.to_vec();
    fields.push(ACTIVITY);
    fields.push(match kind {
        Kind::Company => text("industry"),
        Kind::Person => text("company_id"),
    });
    fields
}

fn table(kind: Kind) -> &'static str {
    match kind {
        Kind::Company => "companies",
        Kind::Person => "people",
    }
}

const COLUMNS: &str = "id, version, created_at, updated_at, last_activity_at, doc";

/// A sort order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    column: &'static str,
    text: bool,
    desc: bool,
}

/// Parses `order_by`: one of the sortable fields, optionally followed by `desc` or `asc`.
pub fn parse_order(kind: Kind, order_by: &str) -> Result<Order, ApiError> {
    let mut words = order_by.split_whitespace();
    let field = words.next().unwrap_or("create_time");
    let name_field = match kind {
        Kind::Company => "name",
        Kind::Person => "full_name",
    };
    let (column, text) = match field {
        "create_time" => ("created_at", false),
        "update_time" => ("updated_at", false),
        "last_activity_time" => ("last_activity_at", false),
        f if f == name_field => ("display_name", true),
        _ => {
            return Err(ApiError::invalid(
                "order_by",
                format!("cannot sort by '{field}'; use create_time, update_time, last_activity_time or {name_field}"),
            ));
        }
    };
    let desc = match (words.next(), order_by.trim().is_empty()) {
        (None, true) => true,
        (None, false) | (Some("asc"), _) => false,
        (Some("desc"), _) => true,
        (Some(other), _) => return Err(ApiError::invalid("order_by", format!("'{other}' is not asc or desc"))),
    };
    if words.next().is_some() || order_by.contains(',') {
        return Err(ApiError::invalid("order_by", "sorts by one field only"));
    }
    Ok(Order { column, text, desc })
}

/// A list or search request, validated.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub filter: String,
    pub query: String,
    pub order_by: String,
    pub page_size: i64,
    pub page_token: String,
    /// Whose records the caller may see.
    pub scope: OwnerScope,
}

#[derive(Serialize, Deserialize)]
struct StoredChange {
    field: String,
    old: String,
    new: String,
}

/// Revision actions, as stored.
const ACTION_CREATE: i64 = 1;
const ACTION_UPDATE: i64 = 2;
const ACTION_DELETE: i64 = 3;

/// A duplicate found by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub field: String,
    pub value: String,
    pub kind: Kind,
    pub record_id: String,
    pub owner_id: String,
    pub display_name: String,
}

/// Rows in sort order a search first looks through, per row of the page, before it asks the
/// text index (see `list`): a query matching at least 1 row in 40 (2.5%) is served from the
/// window; a rarer one costs the window scan plus the index lookup.
pub const SEARCH_WINDOW_PER_ROW: i64 = 40;

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    /// Fixed window size; `None`: SEARCH_WINDOW_PER_ROW × (page size + 1).
    search_window: Option<i64>,
}

fn like_pattern(term: &str) -> String {
    let escaped = term.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

fn fts_phrase(term: &str) -> String {
    format!("\"{}\"", term.replace('"', "\"\""))
}

fn meta_of(row: &AnyRow) -> Result<Meta, sqlx::Error> {
    Ok(Meta {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_activity_at: row.try_get("last_activity_at")?,
    })
}

fn decode<R: Record>(row: &AnyRow) -> Result<R, ApiError> {
    let meta = meta_of(row)?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut record = R::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored {} {} does not decode: {e}", R::KIND.noun(), meta.id)))?;
    record.set_meta(&meta);
    Ok(record)
}

fn document<R: Record>(record: &R) -> Vec<u8> {
    let mut doc = record.clone();
    doc.clear_meta();
    doc.encode_to_vec()
}

/// A revision about to be written; `owner_id` is the record's owner after the change (before it,
/// for a deletion).
struct NewRevision {
    record_id: String,
    version: i64,
    action: i64,
    changes: Vec<Change>,
    at: i64,
    owner_id: String,
}

fn not_found(kind: Kind, id: &str) -> ApiError {
    ApiError::NotFound(format!("{} {id} not found", kind.noun()))
}

impl Store {
    /// Connects and applies migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Store, DbError> {
        let db = Db::connect(url, max_connections).await?;
        db.migrate(&migrations()).await?;
        crm_kit::metrics::register_pool("contacts", db.pool().clone());
        Ok(Store { db, search_window: None })
    }

    /// How many records of a kind are stored.
    pub async fn count(&self, kind: Kind) -> Result<i64, ApiError> {
        let mut sql = Sql::new("SELECT COUNT(*) AS n FROM ");
        sql.push(table(kind));
        Ok(sql.query().fetch_one(self.db.pool()).await?.try_get("n")?)
    }

    /// Sets how many rows a text search looks through in sort order before it asks the text
    /// index (tests make it small to exercise both paths).
    pub fn with_search_window(mut self, rows: i64) -> Store {
        self.search_window = Some(rows.max(1));
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// A record the scope allows; any other is NOT_FOUND, exactly like a missing one.
    pub async fn get<R: Record>(&self, id: &str, scope: &OwnerScope) -> Result<R, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM ").push(table(R::KIND)).push(" WHERE id = ").bind(id);
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        let row = sql.query().fetch_optional(self.db.pool()).await?.ok_or_else(|| not_found(R::KIND, id))?;
        decode(&row)
    }

    /// Creates a normalised record. With a `request_id`, a repeated call returns the record the
    /// first one created.
    /// `scope` applies to the replay only: the caller checks the new record's owner.
    pub async fn create<R: Record>(
        &self,
        mut record: R,
        request_id: &str,
        actor: &str,
        scope: &OwnerScope,
    ) -> Result<R, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let id = crm_kit::validate::new_id();
        if !request_id.is_empty() {
            let mut sql =
                Sql::new("INSERT INTO create_requests (request_id, record_type, record_id, created_at) VALUES (");
            sql.bind(request_id)
                .push(", ")
                .bind(R::KIND.record_type() as i64)
                .push(", ")
                .bind(id.as_str())
                .push(", ")
                .bind(now_micros())
                .push(") ON CONFLICT (request_id) DO NOTHING");
            if sql.query().execute(&mut *tx).await?.rows_affected() == 0 {
                tx.rollback().await?;
                return self.replay::<R>(request_id, scope).await;
            }
        }
        let now = now_micros();
        let meta = Meta { id, version: 1, created_at: now, updated_at: now, last_activity_at: 0 };
        record.set_meta(&meta);
        self.check_references(&mut tx, &record).await?;
        let keys: Vec<(String, Key)> = record.keys().into_iter().map(|k| (meta.id.clone(), k)).collect();
        self.insert_key_rows::<R>(&mut tx, &keys).await?;
        self.insert_rows(&mut tx, std::slice::from_ref(&record), actor).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn replay<R: Record>(&self, request_id: &str, scope: &OwnerScope) -> Result<R, ApiError> {
        let mut sql = Sql::new("SELECT record_type, record_id FROM create_requests WHERE request_id = ");
        sql.bind(request_id);
        let row = sql.query().fetch_one(self.db.pool()).await?;
        let (record_type, record_id): (i64, String) = (row.try_get("record_type")?, row.try_get("record_id")?);
        if record_type != R::KIND.record_type() as i64 {
            return Err(ApiError::invalid("request_id", "was already used to create a different kind of record"));
        }
        self.get(&record_id, scope).await
    }

    /// Inserts many normalised records in one transaction (bulk load) and returns their ids;
    /// every record gets its keys, tags and a creation revision, exactly as one by one.
    pub async fn create_many<R: Record>(&self, records: Vec<R>, actor: &str) -> Result<Vec<String>, ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        let mut prepared = Vec::with_capacity(records.len());
        let mut keys: Vec<(String, Key)> = Vec::new();
        for mut record in records {
            let meta = Meta {
                id: crm_kit::validate::new_id(),
                version: 1,
                created_at: now,
                updated_at: now,
                last_activity_at: 0,
            };
            record.set_meta(&meta);
            keys.extend(record.keys().into_iter().map(|k| (meta.id.clone(), k)));
            prepared.push(record);
        }
        for chunk in keys.chunks(1000) {
            self.insert_key_rows::<R>(&mut tx, chunk).await?;
        }
        for chunk in prepared.chunks(500) {
            self.insert_rows(&mut tx, chunk, actor).await?;
        }
        tx.commit().await?;
        Ok(prepared.iter().map(|r| r.id().to_string()).collect())
    }

    async fn check_references<R: Record>(
        &self,
        tx: &mut Transaction<'static, Any>,
        record: &R,
    ) -> Result<(), ApiError> {
        let company_id = record.columns().company_id;
        if company_id.is_empty() {
            return Ok(());
        }
        let mut sql = Sql::new("SELECT id FROM companies WHERE id = ");
        sql.bind(company_id.as_str());
        if sql.query().fetch_optional(&mut **tx).await?.is_none() {
            return Err(ApiError::invalid(format!("{}.company_id", R::FIELD), "no company has this id"));
        }
        Ok(())
    }

    /// Claims duplicate-protection keys; fails naming the record that already holds one.
    async fn insert_key_rows<R: Record>(
        &self,
        tx: &mut Transaction<'static, Any>,
        rows: &[(String, Key)],
    ) -> Result<(), ApiError> {
        if rows.is_empty() {
            return Ok(());
        }
        let kind = R::KIND.record_type() as i64;
        let mut sql = Sql::new("INSERT INTO contact_keys (record_type, field, value, record_id) VALUES ");
        for (i, (record_id, key)) in rows.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(").bind(kind).push(", ").bind(key.field).push(", ").bind(key.value.as_str());
            sql.push(", ").bind(record_id.as_str()).push(")");
        }
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
            Some(d) => format!(
                "a {} with {} {} already exists: {} \"{}\"{}",
                R::KIND.noun(),
                key.field,
                key.value,
                d.record_id,
                d.display_name,
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

    /// Inserts records, their tags and their creation revisions.
    async fn insert_rows<R: Record>(
        &self,
        tx: &mut Transaction<'static, Any>,
        records: &[R],
        actor: &str,
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new("INSERT INTO ");
        sql.push(table(R::KIND)).push(
            " (id, display_name, owner_id, stage, source, region, industry, company_id, do_not_contact, \
             search_text, created_at, updated_at, last_activity_at, version, doc) VALUES ",
        );
        let mut tags: Vec<(&str, &str)> = Vec::new();
        let mut revisions = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let c = record.columns();
            let id = record.id().to_string();
            let created_at = record.meta().created_at;
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(").bind(id.as_str());
            push_columns(&mut sql, c.clone());
            sql.push(", ").bind(created_at).push(", ").bind(created_at).push(", ").bind(0_i64);
            sql.push(", ").bind(1_i64).push(", ").bind(document(record)).push(")");
            tags.extend(record.tags().iter().map(|t| (t.as_str(), record.id())));
            let owner = record.columns().owner_id.to_string();
            revisions.push(NewRevision {
                record_id: id,
                version: 1,
                action: ACTION_CREATE,
                changes: domain::diff(None, Some(record)),
                at: created_at,
                owner_id: owner,
            });
        }
        sql.query().execute(&mut **tx).await?;
        insert_tags(tx, &tags).await?;
        self.insert_revisions::<R>(tx, &revisions, actor).await
    }

    async fn insert_revisions<R: Record>(
        &self,
        tx: &mut Transaction<'static, Any>,
        revisions: &[NewRevision],
        actor: &str,
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new(
            "INSERT INTO revisions (record_id, version, record_type, action, actor, created_at, changes, owner_id) VALUES ",
        );
        for (i, NewRevision { record_id, version, action, changes, at, owner_id: owner }) in
            revisions.iter().enumerate()
        {
            let stored: Vec<StoredChange> = changes
                .iter()
                .map(|c| StoredChange { field: c.field.clone(), old: c.old.clone(), new: c.new.clone() })
                .collect();
            let json = serde_json::to_string(&stored).map_err(|e| ApiError::Internal(e.to_string()))?;
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(").bind(record_id.as_str()).push(", ").bind(*version).push(", ");
            sql.bind(R::KIND.record_type() as i64).push(", ").bind(*action).push(", ").bind(actor);
            sql.push(", ").bind(*at).push(", ").bind(json).push(", ").bind(owner.as_str()).push(")");
        }
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    async fn lock<R: Record>(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: &str,
        scope: &OwnerScope,
    ) -> Result<R, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM ").push(table(R::KIND)).push(" WHERE id = ").bind(id);
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        sql.push(self.db.for_update());
        let row = sql.query().fetch_optional(&mut **tx).await?.ok_or_else(|| not_found(R::KIND, id))?;
        decode(&row)
    }

    /// Reads the record under a write lock, checks `etag`, lets `change` modify it (rules and
    /// validation live there), and stores the result with its revision. No change, no write.
    pub async fn update<R, F>(
        &self,
        id: &str,
        etag: &str,
        actor: &str,
        scope: &OwnerScope,
        change: F,
    ) -> Result<R, ApiError>
    where
        R: Record,
        F: FnOnce(&mut R) -> Result<(), ApiError>,
    {
        let mut tx = self.db.begin_write().await?;
        let old: R = self.lock(&mut tx, id, scope).await?;
        check_etag(R::KIND.noun(), id, etag, old.etag())?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            tx.rollback().await?;
            return Ok(old);
        }
        let changes = domain::diff(Some(&old), Some(&new));
        let version = old.meta().version;
        let now = now_micros();
        let (old_keys, new_keys) = (old.keys(), new.keys());
        if old_keys != new_keys {
            let mut sql = Sql::new("DELETE FROM contact_keys WHERE record_id = ");
            sql.bind(id);
            sql.query().execute(&mut *tx).await?;
            let rows: Vec<(String, Key)> = new_keys.into_iter().map(|k| (id.to_string(), k)).collect();
            self.insert_key_rows::<R>(&mut tx, &rows).await?;
        }
        if old.columns().company_id != new.columns().company_id {
            self.check_references(&mut tx, &new).await?;
        }
        let (old_tags, new_tags) = (old.tags(), new.tags());
        if old_tags != new_tags {
            let mut sql = Sql::new("DELETE FROM tags WHERE record_id = ");
            sql.bind(id);
            sql.query().execute(&mut *tx).await?;
            let pairs: Vec<(&str, &str)> = new_tags.iter().map(|t| (t.as_str(), id)).collect();
            insert_tags(&mut tx, &pairs).await?;
        }
        let c = new.columns();
        let mut sql = Sql::new("UPDATE ");
        sql.push(table(R::KIND)).push(" SET display_name = ").bind(c.display_name);
        sql.push(", owner_id = ").bind(c.owner_id).push(", stage = ").bind(c.stage);
        sql.push(", source = ").bind(c.source).push(", region = ").bind(c.region);
        sql.push(", industry = ").bind(c.industry).push(", company_id = ").bind(c.company_id);
        sql.push(", do_not_contact = ").bind(c.do_not_contact).push(", search_text = ").bind(c.search_text);
        sql.push(", updated_at = ").bind(now).push(", version = ").bind(version + 1);
        sql.push(", doc = ").bind(document(&new));
        sql.push(" WHERE id = ").bind(id).push(" AND version = ").bind(version);
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            return Err(ApiError::Aborted(format!("{} {id} changed concurrently; read it again", R::KIND.noun())));
        }
        let owner = new.columns().owner_id.to_string();
        self.insert_revisions::<R>(
            &mut tx,
            &[NewRevision {
                record_id: id.to_string(),
                version: version + 1,
                action: ACTION_UPDATE,
                changes,
                at: now,
                owner_id: owner,
            }],
            actor,
        )
        .await?;
        tx.commit().await?;
        new.set_meta(&Meta { version: version + 1, updated_at: now, ..old.meta() });
        Ok(new)
    }

    /// Deletes a record; its revisions stay, the last one holding every value it had.
    pub async fn delete<R: Record>(
        &self,
        id: &str,
        etag: &str,
        actor: &str,
        scope: &OwnerScope,
    ) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let old: R = self.lock(&mut tx, id, scope).await?;
        check_etag(R::KIND.noun(), id, etag, old.etag())?;
        if R::KIND == Kind::Company {
            let mut sql = Sql::new("SELECT id FROM people WHERE company_id = ");
            sql.bind(id).push(" LIMIT 1");
            if sql.query().fetch_optional(&mut *tx).await?.is_some() {
                return Err(ApiError::FailedPrecondition(format!(
                    "company {id} still has people; move them to another company or delete them first"
                )));
            }
        }
        for statement in ["DELETE FROM contact_keys WHERE record_id = ", "DELETE FROM tags WHERE record_id = "] {
            let mut sql = Sql::new(statement);
            sql.bind(id);
            sql.query().execute(&mut *tx).await?;
        }
        let mut sql = Sql::new("DELETE FROM ");
        sql.push(table(R::KIND)).push(" WHERE id = ").bind(id);
        sql.query().execute(&mut *tx).await?;
        let version = old.meta().version;
        let changes = domain::diff(Some(&old), None);
        self.insert_revisions::<R>(
            &mut tx,
            &[NewRevision {
                record_id: id.to_string(),
                version: version + 1,
                action: ACTION_DELETE,
                changes,
                at: now_micros(),
                owner_id: old.columns().owner_id.to_string(),
            }],
            actor,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One page of a filtered, searched, sorted listing within `q.scope`, and the token of the
    /// next page.
    pub async fn list<R: Record>(&self, q: &ListQuery) -> Result<(Vec<R>, String), ApiError> {
        let kind = R::KIND;
        let order = parse_order(kind, &q.order_by)?;
        let fp = fingerprint(&[kind.noun(), &q.filter, &q.query, &q.order_by]);
        let cursor = Cursor::decode(&q.page_token, fp)?;
        let fields = filter_fields(kind);

        let searching = !domain::search_terms(&q.query).is_empty();
        let rows = if searching {
            // A broad query matches a large share of the table; its first page is usually found
            // among the first rows in sort order, which the sort index yields cheaply. When that
            // window fills the page, the page is exactly what the full query returns.
            let size = self.search_window.unwrap_or(SEARCH_WINDOW_PER_ROW * (q.page_size + 1));
            let window = self.select(kind, order, q, cursor.as_ref(), &fields, Some(size))?;
            let rows = window.query().fetch_all(self.db.pool()).await?;
            if rows.len() as i64 > q.page_size {
                rows
            } else {
                self.select(kind, order, q, cursor.as_ref(), &fields, None)?.query().fetch_all(self.db.pool()).await?
            }
        } else {
            self.select(kind, order, q, cursor.as_ref(), &fields, None)?.query().fetch_all(self.db.pool()).await?
        };
        let more = rows.len() as i64 > q.page_size;
        let mut records = Vec::with_capacity(rows.len());
        let mut last_key = None;
        for row in rows.iter().take(q.page_size as usize) {
            records.push(decode::<R>(row)?);
            last_key = Some(if order.text {
                KeyValue::Text(row.try_get("sort_key")?)
            } else {
                KeyValue::Int(row.try_get("sort_key")?)
            });
        }
        let next = match (more, last_key, records.last()) {
            (true, Some(key), Some(last)) => Cursor::new(key, last.id().to_string(), fp).encode(),
            _ => String::new(),
        };
        Ok((records, next))
    }

    /// The listing query. With `window`, the text search applies only to the first `window`
    /// rows (in sort order) that pass the filter and the cursor.
    fn select(
        &self,
        kind: Kind,
        order: Order,
        q: &ListQuery,
        cursor: Option<&Cursor>,
        fields: &[Field],
        window: Option<i64>,
    ) -> Result<Sql, ApiError> {
        let dir = if order.desc { " DESC" } else { " ASC" };
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(", ").push(order.column).push(" AS sort_key");
        if window.is_some() {
            sql.push(", search_text");
            if self.db.backend() == Backend::Sqlite {
                sql.push(", seq");
            }
        }
        sql.push(" FROM ").push(table(kind)).push(" WHERE 1=1");
        filter::apply(&q.filter, fields, &mut sql)?;
        q.scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        if window.is_none() {
            self.push_search(&mut sql, kind, &q.query);
        }
        if let Some(cursor) = cursor {
            sql.push(" AND (").push(order.column).push(", id) ").push(if order.desc { "< (" } else { "> (" });
            match (&cursor.key, order.text) {
                (KeyValue::Int(v), false) => sql.bind(*v),
                (KeyValue::Text(v), true) => sql.bind(v.as_str()),
                _ => return Err(ApiError::invalid("page_token", "does not match order_by")),
            };
            sql.push(", ").bind(cursor.id.as_str()).push(")");
        }
        sql.push(" ORDER BY ").push(order.column).push(dir).push(", id").push(dir);
        match window {
            None => {
                sql.push(" LIMIT ").bind(q.page_size + 1);
                Ok(sql)
            }
            Some(window) => {
                sql.push(" LIMIT ").bind(window);
                let mut outer = Sql::new("SELECT * FROM (");
                outer.push_sql(sql).push(") AS candidates WHERE 1=1");
                self.push_search(&mut outer, kind, &q.query);
                outer.push(" ORDER BY sort_key").push(dir).push(", id").push(dir);
                outer.push(" LIMIT ").bind(q.page_size + 1);
                Ok(outer)
            }
        }
    }

    fn push_search(&self, sql: &mut Sql, kind: Kind, query: &str) {
        let terms = domain::search_terms(query);
        if terms.is_empty() {
            return;
        }
        let (long, short): (Vec<&String>, Vec<&String>) = match self.db.backend() {
            // The trigram index serves LIKE directly.
            Backend::Postgres => (Vec::new(), terms.iter().collect()),
            // FTS5 trigram MATCH needs 3+ characters; shorter terms fall back to LIKE.
            Backend::Sqlite => terms.iter().partition(|t| t.chars().count() >= 3),
        };
        if !long.is_empty() {
            let phrase = long.iter().map(|t| fts_phrase(t)).collect::<Vec<_>>().join(" ");
            sql.push(" AND seq IN (SELECT rowid FROM ").push(table(kind)).push("_fts WHERE ");
            sql.push(table(kind)).push("_fts MATCH ").bind(phrase).push(")");
        }
        for term in short {
            sql.push(" AND search_text LIKE ").bind(like_pattern(term)).push(" ESCAPE '\\'");
        }
    }

    /// Revisions of a record, newest first.
    /// Revisions of a record whose owner (as of its latest revision, so also after deletion)
    /// the scope allows; any other record's history is NOT_FOUND.
    pub async fn revisions(
        &self,
        record_id: &str,
        page_size: i64,
        page_token: &str,
        scope: &OwnerScope,
    ) -> Result<(Vec<Revision>, String), ApiError> {
        let fp = fingerprint(&["revisions", record_id]);
        let cursor = Cursor::decode(page_token, fp)?;
        let mut latest = Sql::new("SELECT owner_id FROM revisions WHERE record_id = ");
        latest.bind(record_id).push(" ORDER BY version DESC LIMIT 1");
        let owner: Option<String> =
            latest.query().fetch_optional(self.db.pool()).await?.map(|row| row.try_get("owner_id")).transpose()?;
        if !owner.is_some_and(|owner| scope.allows(&owner)) {
            return Err(ApiError::NotFound(format!("record {record_id} not found")));
        }
        let mut sql = Sql::new(
            "SELECT record_id, version, record_type, action, actor, created_at, changes FROM revisions WHERE record_id = ",
        );
        sql.bind(record_id);
        if let Some(Cursor { key: KeyValue::Int(version), .. }) = &cursor {
            sql.push(" AND version < ").bind(*version);
        }
        sql.push(" ORDER BY version DESC LIMIT ").bind(page_size + 1);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let more = rows.len() as i64 > page_size;
        let mut revisions = Vec::with_capacity(rows.len());
        for row in rows.iter().take(page_size as usize) {
            let changes: String = row.try_get("changes")?;
            let changes: Vec<StoredChange> =
                serde_json::from_str(&changes).map_err(|e| ApiError::Internal(format!("revision changes: {e}")))?;
            revisions.push(Revision {
                record_id: row.try_get("record_id")?,
                record_type: row.try_get::<i64, _>("record_type")? as i32,
                version: row.try_get("version")?,
                action: row.try_get::<i64, _>("action")? as i32,
                actor: row.try_get("actor")?,
                create_time: crm_kit::time::to_timestamp(row.try_get("created_at")?),
                changes: changes
                    .into_iter()
                    .map(|c| crm_proto::contacts::v1::FieldChange {
                        field: c.field,
                        old_value: c.old,
                        new_value: c.new,
                    })
                    .collect(),
            });
        }
        let next = match (more, revisions.last()) {
            (true, Some(last)) => Cursor::new(KeyValue::Int(last.version), record_id.to_string(), fp).encode(),
            _ => String::new(),
        };
        Ok((revisions, next))
    }

    /// Records of `kind` holding any of `keys`.
    pub async fn find_duplicates(&self, kind: Kind, keys: &[Key]) -> Result<Vec<Duplicate>, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        self.find_duplicates_in(&mut conn, kind, keys).await
    }

    async fn find_duplicates_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: Kind,
        keys: &[Key],
    ) -> Result<Vec<Duplicate>, ApiError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql =
            Sql::new("SELECT k.field, k.value, k.record_id, t.owner_id, t.display_name FROM contact_keys k JOIN ");
        sql.push(table(kind)).push(" t ON t.id = k.record_id WHERE k.record_type = ").bind(kind.record_type() as i64);
        sql.push(" AND (");
        for (i, key) in keys.iter().enumerate() {
            if i > 0 {
                sql.push(" OR ");
            }
            sql.push("(k.field = ").bind(key.field).push(" AND k.value = ").bind(key.value.as_str()).push(")");
        }
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

/// Inserts (tag, record id) pairs in one statement per 1,000.
async fn insert_tags(tx: &mut Transaction<'static, Any>, pairs: &[(&str, &str)]) -> Result<(), ApiError> {
    for chunk in pairs.chunks(1000) {
        let mut sql = Sql::new("INSERT INTO tags (tag, record_id) VALUES ");
        for (i, (tag, record_id)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(").bind(*tag).push(", ").bind(*record_id).push(")");
        }
        sql.query().execute(&mut **tx).await?;
    }
    Ok(())
}

fn push_columns(sql: &mut Sql, c: Columns) {
    sql.push(", ").bind(c.display_name).push(", ").bind(c.owner_id).push(", ").bind(c.stage);
    sql.push(", ").bind(c.source).push(", ").bind(c.region).push(", ").bind(c.industry);
    sql.push(", ").bind(c.company_id).push(", ").bind(c.do_not_contact).push(", ").bind(c.search_text);
}
