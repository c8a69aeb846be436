//! Every SQL statement of the contacts service, and nothing else. One implementation for both
//! backends: portable SQL with `$n` placeholders, and named dialect branches only for text
//! search and row locking.
//!
//! - this module: reading, creating, changing and deleting one record, with its duplicate keys,
//!   tags and revisions, in one transaction;
//! - [`list`]: filtered, searched, sorted listings and revision history, one keyset page at a
//!   time;
//! - [`keys`]: duplicate protection.

mod events;
mod keys;
mod list;

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Db, DbError, Edit, Migrations, Sql, Tx, idempotency};
use crm_kit::events::Outbox;
use crm_kit::time::now_micros;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

pub use keys::Duplicate;
pub use list::{
    Explained, KeptRuns, ListQuery, ListRequest, Planning, WINDOW_PER_ROW, filter_fields, revision_order, sort_order,
};

use crate::domain::{self, Change, Columns, Key, Kind, Meta, Record};

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

fn table(kind: Kind) -> &'static str {
    match kind {
        Kind::Company => "companies",
        Kind::Person => "people",
    }
}

const COLUMNS: &str = "id, version, display_name, created_at, updated_at, last_activity_at, last_activity_summary, \
                       purchase_count, last_purchase_at, lifetime_values, doc";

#[derive(Serialize, Deserialize)]
struct StoredChange {
    field: String,
    old: String,
    new: String,
}

/// What other services see of a customer ([`Store::summaries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub kind: Kind,
    pub id: String,
    pub display_name: String,
    pub owner_id: String,
    pub do_not_contact: bool,
    pub last_activity_at: i64,
    pub last_activity_summary: String,
    pub source: String,
}

/// A customer's newest activity as an event reports it ([`Store::record_activities`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastActivity {
    pub kind: Kind,
    pub id: String,
    pub at: i64,
    pub summary: String,
}

/// A change of a customer's purchase history, as the deals service's events report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purchase {
    /// The deal is won with the customer, for this amount (again, when its amount changed).
    Won { kind: Kind, id: String, deal_id: String, currency: String, amount: i64, at: i64 },
    /// The deal is won with the customer no more.
    Undone { kind: Kind, id: String, deal_id: String },
}

/// Revision actions, as stored.
const ACTION_CREATE: i64 = 1;
const ACTION_UPDATE: i64 = 2;
const ACTION_DELETE: i64 = 3;

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    /// Fixed window size; `None`: WINDOW_PER_ROW × (page size + 1).
    window_rows: Option<i64>,
    outbox: Outbox,
}

fn meta_of(row: &AnyRow) -> Result<Meta, sqlx::Error> {
    Ok(Meta {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_activity_at: row.try_get("last_activity_at")?,
        last_activity_summary: row.try_get("last_activity_summary")?,
        purchase_count: row.try_get("purchase_count")?,
        last_purchase_at: row.try_get("last_purchase_at")?,
        lifetime_values: row.try_get("lifetime_values")?,
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

/// The record `id` of `kind` if `scope` allows it.
fn select(db: &Db, kind: Kind, id: &str, scope: &OwnerScope) -> Sql {
    let mut sql = Sql::new("SELECT ");
    sql.push(COLUMNS).push(" FROM ").push(table(kind)).push(" WHERE id = ").bind(id);
    scope.push_condition(&mut sql, db.backend(), "owner_id");
    sql
}

impl Store {
    /// Connects and applies migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Store, DbError> {
        Ok(Store::new(Db::open(url, max_connections, &migrations(), "contacts").await?))
    }

    /// The store over an opened (and migrated) database.
    pub fn new(db: Db) -> Store {
        Store { db, window_rows: None, outbox: Outbox::new(crate::SOURCE) }
    }

    /// Publishes its events through `outbox` (the role's, which its relay watches).
    pub fn with_outbox(mut self, outbox: Outbox) -> Store {
        self.outbox = outbox;
        self
    }

    /// How many records of a kind are stored.
    pub async fn count(&self, kind: Kind) -> Result<i64, ApiError> {
        let mut sql = Sql::new("SELECT COUNT(*) AS n FROM ");
        sql.push(table(kind));
        Ok(sql.query().fetch_one(self.db.pool()).await?.try_get("n")?)
    }

    /// Sets how many rows a listing's first window looks through in sort order before it widens
    /// or runs the full query (tests make it small to exercise every path).
    pub fn with_window(mut self, rows: i64) -> Store {
        self.window_rows = Some(rows.max(1));
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// A record the scope allows; any other is NOT_FOUND, exactly like a missing one.
    pub async fn get<R: Record>(&self, id: &str, scope: &OwnerScope) -> Result<R, ApiError> {
        let row = select(&self.db, R::KIND, id, scope)
            .query()
            .fetch_optional(self.db.pool())
            .await?
            .ok_or_else(|| not_found(R::KIND, id))?;
        decode(&row)
    }

    /// The records of `keys` that `scope` allows, in the order asked (each at most once): one
    /// statement per kind, whatever their number.
    pub async fn summaries(&self, keys: &[(Kind, String)], scope: &OwnerScope) -> Result<Vec<Summary>, ApiError> {
        let mut found: Vec<Summary> = Vec::new();
        for kind in [Kind::Company, Kind::Person] {
            let ids: Vec<&str> = keys.iter().filter(|(k, _)| *k == kind).map(|(_, id)| id.as_str()).collect();
            if ids.is_empty() {
                continue;
            }
            let mut sql = Sql::new(
                "SELECT id, display_name, owner_id, do_not_contact, last_activity_at, last_activity_summary, source FROM ",
            );
            sql.push(table(kind)).push(" WHERE ").push_in("id", ids);
            scope.push_condition(&mut sql, self.db.backend(), "owner_id");
            for row in sql.query().fetch_all(self.db.pool()).await? {
                found.push(Summary {
                    kind,
                    id: row.try_get("id")?,
                    display_name: row.try_get("display_name")?,
                    owner_id: row.try_get("owner_id")?,
                    do_not_contact: row.try_get::<i64, _>("do_not_contact")? != 0,
                    last_activity_at: row.try_get("last_activity_at")?,
                    last_activity_summary: row.try_get("last_activity_summary")?,
                    source: row.try_get("source")?,
                });
            }
        }
        let mut ordered = Vec::with_capacity(found.len());
        for (kind, id) in keys {
            if let Some(i) = found.iter().position(|s| s.kind == *kind && s.id == *id) {
                ordered.push(found.swap_remove(i));
            }
        }
        Ok(ordered)
    }

    /// Moves each record's last activity to `at` with `summary`, where that is later than the one
    /// it has (so that events applied late or twice change nothing): system-kept fields, not an
    /// edit — no new version, no revision. Records that are gone are passed over.
    pub async fn record_activities(&self, tx: &mut Tx, activities: &[LastActivity]) -> Result<(), ApiError> {
        for activity in activities {
            let mut sql = Sql::new("UPDATE ");
            sql.push(table(activity.kind)).push(" SET last_activity_at = ").bind(activity.at);
            sql.push(", last_activity_summary = ").bind(activity.summary.as_str());
            sql.push(" WHERE id = ").bind(activity.id.as_str()).push(" AND last_activity_at < ").bind(activity.at);
            sql.query().execute(&mut **tx).await?;
            // The record's tag entries carry the time their listings by last activity walk by.
            let mut sql = Sql::new("UPDATE tags SET record_activity_at = ");
            sql.bind(activity.at).push(" WHERE record_id = ").bind(activity.id.as_str());
            sql.push(" AND record_activity_at < ").bind(activity.at);
            sql.query().execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Applies purchase-history changes in order, then sets each affected record's purchase
    /// count, last purchase time and value per currency from its won deals. System-kept fields,
    /// not an edit: no new version, no revision. Records that are gone are passed over.
    pub async fn record_purchases(&self, tx: &mut Tx, changes: &[Purchase]) -> Result<(), ApiError> {
        let mut touched: Vec<(Kind, String)> = Vec::new();
        for change in changes {
            let (kind, id) = match change {
                Purchase::Won { kind, id, deal_id, currency, amount, at } => {
                    let mut sql = Sql::new(
                        "INSERT INTO purchases (record_type, record_id, deal_id, currency, amount, won_at) VALUES ",
                    );
                    sql.push_values([()], |v, ()| {
                        v.bind(kind.record_type() as i64).bind(id.as_str()).bind(deal_id.as_str());
                        v.bind(currency.as_str()).bind(*amount).bind(*at);
                    });
                    sql.push(
                        " ON CONFLICT (record_type, record_id, deal_id) DO UPDATE SET currency = excluded.currency, \
                         amount = excluded.amount, won_at = excluded.won_at",
                    );
                    sql.query().execute(&mut **tx).await?;
                    (*kind, id)
                }
                Purchase::Undone { kind, id, deal_id } => {
                    let mut sql = Sql::new("DELETE FROM purchases WHERE record_type = ");
                    sql.bind(kind.record_type() as i64).push(" AND record_id = ").bind(id.as_str());
                    sql.push(" AND deal_id = ").bind(deal_id.as_str());
                    sql.query().execute(&mut **tx).await?;
                    (*kind, id)
                }
            };
            if !touched.iter().any(|(k, i)| *k == kind && i == id) {
                touched.push((kind, id.clone()));
            }
        }
        for (kind, id) in touched {
            let mut sql = Sql::new("SELECT currency, COUNT(*) AS n, ");
            sql.push(&self.db.backend().sum("amount"));
            sql.push(" AS total, MAX(won_at) AS last FROM purchases WHERE record_type = ");
            sql.bind(kind.record_type() as i64)
                .push(" AND record_id = ")
                .bind(id.as_str())
                .push(" GROUP BY currency ORDER BY currency");
            let rows = sql.query().fetch_all(&mut **tx).await?;
            let (mut count, mut last, mut values) = (0_i64, 0_i64, Vec::new());
            for row in &rows {
                count += row.try_get::<i64, _>("n")?;
                last = last.max(row.try_get::<i64, _>("last")?);
                let total: i64 = row.try_get("total")?;
                values.push(crm_proto::contacts::v1::LifetimeValue {
                    currency_code: row.try_get("currency")?,
                    minor_units: total,
                });
            }
            let mut sql = Sql::new("UPDATE ");
            sql.push(table(kind)).push(" SET purchase_count = ").bind(count).push(", last_purchase_at = ").bind(last);
            sql.push(", lifetime_values = ")
                .bind(domain::lifetime_text(&values))
                .push(" WHERE id = ")
                .bind(id.as_str());
            sql.query().execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Creates a normalised record for `caller`. With a `request_id`, the caller's repeated
    /// call returns the record their first one created (if `scope` still lets them see it).
    /// `scope` applies to the replay only: the caller checks the new record's owner.
    pub async fn create<R: Record>(
        &self,
        mut record: R,
        request_id: &str,
        caller: &str,
        scope: &OwnerScope,
    ) -> Result<R, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let id = crm_kit::id::new();
        let now = now_micros();
        let kind = R::KIND.record_type() as i64;
        match idempotency::claim(&mut tx, caller, request_id, kind, &id, now).await? {
            idempotency::Claim::First => {}
            idempotency::Claim::Retry { record_type, record_id } => {
                tx.rollback().await?;
                if record_type != kind {
                    return Err(ApiError::invalid(
                        "request_id",
                        "was already used to create a different kind of record",
                    ));
                }
                return self.get(&record_id, scope).await;
            }
        }
        let meta = Meta {
            id,
            version: 1,
            created_at: now,
            updated_at: now,
            last_activity_at: 0,
            last_activity_summary: String::new(),
            purchase_count: 0,
            last_purchase_at: 0,
            lifetime_values: String::new(),
        };
        record.set_meta(&meta);
        self.check_references(&mut tx, &record, scope).await?;
        let keys: Vec<(String, Key)> = record.keys().into_iter().map(|k| (meta.id.clone(), k)).collect();
        self.insert_key_rows::<R>(&mut tx, &keys).await?;
        self.insert_rows(&mut tx, std::slice::from_ref(&record), caller).await?;
        tx.commit().await?;
        Ok(record)
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
                id: crm_kit::id::new(),
                version: 1,
                created_at: now,
                updated_at: now,
                last_activity_at: 0,
                last_activity_summary: String::new(),
                purchase_count: 0,
                last_purchase_at: 0,
                lifetime_values: String::new(),
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

    /// The company a record links to must be one the caller sees: one outside their scope
    /// gets the same answer as one that does not exist, so that ids cannot be probed.
    async fn check_references<R: Record>(&self, tx: &mut Tx, record: &R, scope: &OwnerScope) -> Result<(), ApiError> {
        let company_id = record.columns().company_id;
        if company_id.is_empty() {
            return Ok(());
        }
        let sql = select(&self.db, Kind::Company, company_id.as_str(), scope);
        if sql.query().fetch_optional(&mut **tx).await?.is_none() {
            return Err(ApiError::invalid(format!("{}.company_id", R::FIELD), "is not a company you can see"));
        }
        Ok(())
    }

    /// Inserts records, their tags and their creation revisions.
    async fn insert_rows<R: Record>(&self, tx: &mut Tx, records: &[R], actor: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("INSERT INTO ");
        sql.push(table(R::KIND)).push(
            " (id, display_name, owner_id, stage, source, region, industry, company_id, do_not_contact, \
             search_text, phone_digits, created_at, updated_at, last_activity_at, version, doc) VALUES ",
        );
        let mut tags: Vec<TagRow<'_>> = Vec::new();
        let mut revisions = Vec::with_capacity(records.len());
        let mut published = Vec::with_capacity(records.len());
        sql.push_values(records, |v, record| {
            events::created(record, actor, &mut published);
            let c = record.columns();
            let created_at = record.meta().created_at;
            v.bind(record.id());
            push_columns(v, &c);
            v.bind(created_at).bind(created_at).bind(0_i64).bind(1_i64).bind(document(record));
            tags.extend(record.tags().iter().map(|t| TagRow {
                tag: t,
                record_id: record.id(),
                created_at,
                updated_at: created_at,
                activity_at: 0,
                name: c.display_name.clone(),
                stage: c.stage,
            }));
            revisions.push(NewRevision {
                record_id: record.id().to_string(),
                version: 1,
                action: ACTION_CREATE,
                changes: domain::diff(None, Some(record)),
                at: created_at,
                owner_id: c.owner_id,
            });
        });
        sql.query().execute(&mut **tx).await?;
        insert_tags(tx, R::KIND, &tags).await?;
        self.insert_revisions::<R>(tx, &revisions, actor).await?;
        self.outbox.append_all(tx, &published).await
    }

    async fn insert_revisions<R: Record>(
        &self,
        tx: &mut Tx,
        revisions: &[NewRevision],
        actor: &str,
    ) -> Result<(), ApiError> {
        let mut stored = Vec::with_capacity(revisions.len());
        for revision in revisions {
            let changes: Vec<StoredChange> = revision
                .changes
                .iter()
                .map(|c| StoredChange { field: c.field.clone(), old: c.old.clone(), new: c.new.clone() })
                .collect();
            stored.push(serde_json::to_string(&changes).map_err(|e| ApiError::Internal(e.to_string()))?);
        }
        let mut sql = Sql::new(
            "INSERT INTO revisions (record_id, version, record_type, action, actor, created_at, changes, owner_id) VALUES ",
        );
        sql.push_values(revisions.iter().zip(stored), |v, (r, changes)| {
            v.bind(r.record_id.as_str()).bind(r.version).bind(R::KIND.record_type() as i64).bind(r.action);
            v.bind(actor).bind(r.at).bind(changes).bind(r.owner_id.as_str());
        });
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// Locks the record `id` within `scope` for a change.
    async fn edit<R: Record>(&self, id: &str, scope: &OwnerScope) -> Result<(Edit, R), ApiError> {
        let tx = self.db.begin_write().await?;
        let select = select(&self.db, R::KIND, id, scope);
        let (edit, row) = Edit::lock(&self.db, tx, table(R::KIND), R::KIND.noun(), id, select).await?;
        Ok((edit, decode(&row)?))
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
        let (mut edit, old) = self.edit::<R>(id, scope).await?;
        edit.require_etag(etag)?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            edit.abandon().await?;
            return Ok(old);
        }
        let changes = domain::diff(Some(&old), Some(&new));
        let now = now_micros();
        let mut published = Vec::new();
        let (old_keys, new_keys) = (old.keys(), new.keys());
        if old_keys != new_keys {
            let mut sql = Sql::new("DELETE FROM contact_keys WHERE record_id = ");
            sql.bind(id);
            sql.query().execute(&mut **edit.tx()).await?;
            let rows: Vec<(String, Key)> = new_keys.into_iter().map(|k| (id.to_string(), k)).collect();
            self.insert_key_rows::<R>(edit.tx(), &rows).await?;
        }
        let (was, c) = (old.columns(), new.columns());
        if was.company_id != c.company_id {
            self.check_references(edit.tx(), &new, scope).await?;
        }
        // The record's tag entries carry the keys their listings walk by, the update time among
        // them: every change rewrites them.
        let (old_tags, new_tags) = (old.tags(), new.tags());
        if old_tags != new_tags {
            let mut sql = Sql::new("DELETE FROM tags WHERE record_id = ");
            sql.bind(id);
            sql.query().execute(&mut **edit.tx()).await?;
            let meta = old.meta();
            let rows: Vec<TagRow<'_>> = new_tags
                .iter()
                .map(|t| TagRow {
                    tag: t,
                    record_id: id,
                    created_at: meta.created_at,
                    updated_at: now,
                    activity_at: meta.last_activity_at,
                    name: c.display_name.clone(),
                    stage: c.stage,
                })
                .collect();
            insert_tags(edit.tx(), R::KIND, &rows).await?;
        } else if !new_tags.is_empty() {
            let mut sql = Sql::new("UPDATE tags SET record_updated_at = ");
            sql.bind(now).push(", record_stage = ").bind(c.stage);
            if was.display_name != c.display_name {
                sql.push(", record_name = ").bind(c.display_name.as_str());
            }
            sql.push(" WHERE record_id = ").bind(id);
            sql.query().execute(&mut **edit.tx()).await?;
        }
        let mut assignments = Sql::new("display_name = ");
        assignments.bind(c.display_name.as_str()).push(", owner_id = ").bind(c.owner_id.as_str());
        assignments.push(", stage = ").bind(c.stage).push(", source = ").bind(c.source.as_str());
        assignments.push(", region = ").bind(c.region.as_str()).push(", industry = ").bind(c.industry.as_str());
        assignments.push(", company_id = ").bind(c.company_id.as_str());
        assignments.push(", do_not_contact = ").bind(c.do_not_contact);
        assignments.push(", search_text = ").bind(c.search_text.as_str());
        assignments.push(", phone_digits = ").bind(c.phone_digits.as_str()).push(", doc = ").bind(document(&new));
        let version = edit.save(assignments, now).await?;
        published.extend(events::updated(&old, &new, version, &changes, actor));
        let revision = NewRevision {
            record_id: id.to_string(),
            version,
            action: ACTION_UPDATE,
            changes,
            at: now,
            owner_id: c.owner_id,
        };
        self.insert_revisions::<R>(edit.tx(), &[revision], actor).await?;
        self.outbox.append_all(edit.tx(), &published).await?;
        edit.commit().await?;
        new.set_meta(&Meta { version, updated_at: now, ..old.meta() });
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
        let (mut edit, old) = self.edit::<R>(id, scope).await?;
        edit.require_etag(etag)?;
        if R::KIND == Kind::Company {
            let mut probe = Sql::new("SELECT id FROM people WHERE company_id = ");
            probe.bind(id);
            edit.refuse_if_referenced(probe, || {
                format!("company {id} still has people; move them to another company or delete them first")
            })
            .await?;
        }
        for statement in ["DELETE FROM contact_keys WHERE record_id = ", "DELETE FROM tags WHERE record_id = "] {
            let mut sql = Sql::new(statement);
            sql.bind(id);
            sql.query().execute(&mut **edit.tx()).await?;
        }
        edit.delete().await?;
        let revision = NewRevision {
            record_id: id.to_string(),
            version: edit.version() + 1,
            action: ACTION_DELETE,
            changes: domain::diff(Some(&old), None),
            at: now_micros(),
            owner_id: old.columns().owner_id,
        };
        self.insert_revisions::<R>(edit.tx(), &[revision], actor).await?;
        self.outbox.append_all(edit.tx(), &[events::deleted(&old, actor)]).await?;
        edit.commit().await
    }
}

/// A record's tag, with what listings walk its entries by: each key the record is sorted by
/// (creation, update and last activity time, name) and its stage.
struct TagRow<'a> {
    tag: &'a str,
    record_id: &'a str,
    created_at: i64,
    updated_at: i64,
    activity_at: i64,
    name: String,
    stage: i64,
}

/// Inserts tag entries of records of one kind in one statement per 1,000.
async fn insert_tags(tx: &mut Tx, kind: Kind, rows: &[TagRow<'_>]) -> Result<(), ApiError> {
    let record_type = kind.record_type() as i64;
    for chunk in rows.chunks(1000) {
        let mut sql = Sql::new(
            "INSERT INTO tags (tag, record_id, record_type, record_created_at, record_updated_at, \
             record_activity_at, record_name, record_stage) VALUES ",
        );
        sql.push_values(chunk, |v, row| {
            v.bind(row.tag).bind(row.record_id).bind(record_type).bind(row.created_at).bind(row.updated_at);
            v.bind(row.activity_at).bind(row.name.as_str()).bind(row.stage);
        });
        sql.query().execute(&mut **tx).await?;
    }
    Ok(())
}

fn push_columns(v: &mut crm_kit::db::Values<'_>, c: &Columns) {
    v.bind(c.display_name.as_str()).bind(c.owner_id.as_str()).bind(c.stage).bind(c.source.as_str());
    v.bind(c.region.as_str()).bind(c.industry.as_str()).bind(c.company_id.as_str()).bind(c.do_not_contact);
    v.bind(c.search_text.as_str()).bind(c.phone_digits.as_str());
}
