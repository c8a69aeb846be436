//! Every SQL statement of the auth service, and nothing else. One implementation for both
//! backends: portable SQL with `$n` placeholders, and named dialect branches only for row locks
//! and for serialising the few writes that must not interleave (moves in the department tree,
//! signing-key changes, the first start), which SQLite's single writer serialises by itself.
//!
//! Every change is one transaction that also writes its security event.

use std::collections::HashMap;

use crm_kit::ApiError;
use crm_kit::auth::SigningKey;
use crm_kit::db::{Backend, Db, DbError, Migrations, Sql};
use crm_kit::filter::{self, Expr, Field, FieldKind};
use crm_kit::page::{Cursor, KeyValue, fingerprint};
use crm_kit::time::{now_micros, to_timestamp};
use crm_kit::validate::{check_etag, new_id};
use crm_proto::auth::v1::{DataScope, Department, Jwk, Role, SecurityEvent, ServiceAccount, User};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row, Transaction};

use crate::domain::{self, BAD_CREDENTIALS, BAD_REFRESH_TOKEN, events};

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

/// Transaction-scoped locks (PostgreSQL advisory locks) for writes that must run one at a time.
const LOCK_DEPARTMENT_TREE: i64 = 0x6175_7468_0001;
const LOCK_SIGNING_KEYS: i64 = 0x6175_7468_0002;
const LOCK_BOOTSTRAP: i64 = 0x6175_7468_0003;

const DEPARTMENT_COLUMNS: &str = "id, name, parent_id, created_at, updated_at, version";
const USER_COLUMNS: &str =
    "id, email, display_name, phone, department_id, supervisor_id, active, created_at, updated_at, version";
const ROLE_COLUMNS: &str = "id, name, permissions, data_scope, created_at, updated_at, version";
const EVENT_COLUMNS: &str = "id, event_type, occurred_at, actor_id, user_id, email, client_address, detail";

const fn text(name: &'static str) -> Field {
    Field { name, column: name, kind: FieldKind::Text }
}

/// What `ListDepartments` filters on.
pub const DEPARTMENT_FIELDS: &[Field] = &[text("parent_id")];
/// What `ListUsers` filters on.
pub const USER_FIELDS: &[Field] = &[
    text("department_id"),
    text("supervisor_id"),
    Field { name: "active", column: "active", kind: FieldKind::Bool },
    text("email"),
];
/// What `ListSecurityEvents` filters on.
pub const EVENT_FIELDS: &[Field] =
    &[Field { name: "type", column: "event_type", kind: FieldKind::Text }, text("user_id"), text("actor_id")];

/// A security event about to be recorded.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub kind: &'static str,
    pub actor_id: String,
    pub user_id: String,
    pub email: String,
    pub client_address: String,
    pub detail: String,
}

/// Who makes a change, for the audit.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub id: String,
    pub client_address: String,
}

impl Actor {
    /// An event of `kind` caused by this actor.
    pub fn event(&self, kind: &'static str) -> Event {
        Event { kind, actor_id: self.id.clone(), client_address: self.client_address.clone(), ..Event::default() }
    }
}

/// A user or a service account as access tokens and visibility see them, from the records as
/// they are now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub id: String,
    pub service_account: bool,
    pub name: String,
    pub email: String,
    pub department_id: String,
    pub active: bool,
    /// Every permission of every role, each once.
    pub permissions: Vec<String>,
    /// The widest scope of their roles (OWN without roles).
    pub data_scope: DataScope,
}

/// What a sign-in checks. Its Debug output leaves the password hash out.
#[derive(Clone)]
pub struct Credentials {
    pub user_id: String,
    pub password_hash: String,
    pub active: bool,
    pub locked_until: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user_id", &self.user_id)
            .field("active", &self.active)
            .field("locked_until", &self.locked_until)
            .finish_non_exhaustive()
    }
}

/// A refresh token about to be stored (only its hash).
#[derive(Clone)]
pub struct NewRefreshToken {
    pub hash: Vec<u8>,
    pub expires_at: i64,
}

/// The lock-out rule applied to a failed password check.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    /// Consecutive failures that lock the account.
    pub max_failures: i64,
    /// Until when a lock-out caused now lasts (epoch microseconds).
    pub lock_until: i64,
}

/// The organisation a fresh database starts with.
pub struct BootstrapPlan {
    pub roles: Vec<Role>,
    pub department_name: String,
    pub admin_email: String,
    pub admin_display_name: String,
    pub admin_password_hash: String,
    /// Name of the role the administrator holds (one of `roles`).
    pub admin_role: String,
}

/// A new service account, its secret already hashed.
pub struct NewServiceAccount {
    pub name: String,
    pub client_id: String,
    pub secret_hash: Vec<u8>,
    pub role_ids: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

fn etag(version: i64) -> String {
    version.to_string()
}

fn department_of(row: &AnyRow) -> Result<(Department, i64), sqlx::Error> {
    let version: i64 = row.try_get("version")?;
    Ok((
        Department {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            parent_id: row.try_get("parent_id")?,
            create_time: to_timestamp(row.try_get("created_at")?),
            update_time: to_timestamp(row.try_get("updated_at")?),
            etag: etag(version),
        },
        version,
    ))
}

fn user_of(row: &AnyRow) -> Result<(User, i64), sqlx::Error> {
    let version: i64 = row.try_get("version")?;
    Ok((
        User {
            id: row.try_get("id")?,
            email: row.try_get("email")?,
            display_name: row.try_get("display_name")?,
            phone: row.try_get("phone")?,
            department_id: row.try_get("department_id")?,
            supervisor_id: row.try_get("supervisor_id")?,
            role_ids: Vec::new(),
            active: row.try_get::<i64, _>("active")? != 0,
            create_time: to_timestamp(row.try_get("created_at")?),
            update_time: to_timestamp(row.try_get("updated_at")?),
            etag: etag(version),
        },
        version,
    ))
}

fn permissions_of(json: &str) -> Result<Vec<String>, ApiError> {
    serde_json::from_str(json).map_err(|e| ApiError::Internal(format!("stored role permissions do not decode: {e}")))
}

fn permissions_json(permissions: &[String]) -> String {
    serde_json::to_string(permissions).expect("strings serialize")
}

fn role_of(row: &AnyRow) -> Result<(Role, i64), ApiError> {
    let version: i64 = row.try_get("version")?;
    let permissions: String = row.try_get("permissions")?;
    Ok((
        Role {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            permissions: permissions_of(&permissions)?,
            data_scope: row.try_get::<i64, _>("data_scope")? as i32,
            create_time: to_timestamp(row.try_get("created_at")?),
            update_time: to_timestamp(row.try_get("updated_at")?),
            etag: etag(version),
        },
        version,
    ))
}

fn event_of(row: &AnyRow) -> Result<SecurityEvent, sqlx::Error> {
    Ok(SecurityEvent {
        id: row.try_get("id")?,
        r#type: row.try_get("event_type")?,
        time: to_timestamp(row.try_get("occurred_at")?),
        actor_id: row.try_get("actor_id")?,
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        client_address: row.try_get("client_address")?,
        detail: row.try_get("detail")?,
    })
}

fn role_key(name: &str) -> String {
    name.trim().to_lowercase()
}

/// `field IN ($1, $2, …)` over `values` (which must not be empty).
fn push_in(sql: &mut Sql, column: &str, values: &[String]) {
    sql.push(column).push(" IN (");
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.bind(value.as_str());
    }
    sql.push(")");
}

/// Keyset condition and order for an ascending listing by `(column, id)` with text keys.
fn push_text_page(sql: &mut Sql, column: &str, cursor: Option<&Cursor>, size: i64) -> Result<(), ApiError> {
    if let Some(cursor) = cursor {
        let KeyValue::Text(key) = &cursor.key else {
            return Err(ApiError::invalid("page_token", "is not a token returned by this listing"));
        };
        sql.push(" AND (").push(column).push(", id) > (").bind(key.as_str()).push(", ");
        sql.bind(cursor.id.as_str()).push(")");
    }
    sql.push(" ORDER BY ").push(column).push(", id LIMIT ").bind(size + 1);
    Ok(())
}

/// The next page's token when more rows than `size` came back.
fn next_token(rows: usize, size: i64, last: Option<(String, String)>, fp: u64) -> String {
    match last {
        Some((key, id)) if rows as i64 > size => Cursor::new(KeyValue::Text(key), id, fp).encode(),
        _ => String::new(),
    }
}

/// Lower-cases the values compared with `email`, as addresses are stored lower-cased.
fn normalize_email_values(expr: &mut Expr) {
    match expr {
        Expr::And(parts) | Expr::Or(parts) => parts.iter_mut().for_each(normalize_email_values),
        Expr::Not(inner) => normalize_email_values(inner),
        Expr::Cmp { field, value, .. } => {
            if field == "email" {
                *value = crm_kit::validate::normalize_email(value);
            }
        }
    }
}

async fn insert_event(conn: &mut AnyConnection, event: &Event) -> Result<(), ApiError> {
    let mut sql = Sql::new("INSERT INTO security_events (");
    sql.push(EVENT_COLUMNS).push(") VALUES (").bind(new_id()).push(", ").bind(event.kind);
    sql.push(", ").bind(now_micros()).push(", ").bind(event.actor_id.as_str());
    sql.push(", ").bind(event.user_id.as_str()).push(", ").bind(event.email.as_str());
    sql.push(", ").bind(event.client_address.as_str()).push(", ").bind(event.detail.as_str()).push(")");
    sql.query().execute(conn).await?;
    Ok(())
}

/// Role ids per owner from a link table (`user_roles` or `service_account_roles`).
async fn role_links(
    conn: &mut AnyConnection,
    table: &str,
    owner_column: &str,
    owners: &[String],
) -> Result<HashMap<String, Vec<String>>, ApiError> {
    let mut links: HashMap<String, Vec<String>> = HashMap::new();
    if owners.is_empty() {
        return Ok(links);
    }
    let mut sql = Sql::new("SELECT ");
    sql.push(owner_column).push(" AS owner, role_id FROM ").push(table).push(" WHERE ");
    push_in(&mut sql, owner_column, owners);
    sql.push(" ORDER BY role_id");
    for row in sql.query().fetch_all(conn).await? {
        links.entry(row.try_get("owner")?).or_default().push(row.try_get("role_id")?);
    }
    Ok(links)
}

async fn load_subject(conn: &mut AnyConnection, id: &str, service_account: bool) -> Result<Option<Subject>, ApiError> {
    let mut sql = if service_account {
        Sql::new("SELECT name AS display_name, '' AS email, '' AS department_id, 1 AS active FROM service_accounts")
    } else {
        Sql::new("SELECT display_name, email, department_id, active FROM users")
    };
    sql.push(" WHERE id = ").bind(id);
    let Some(row) = sql.query().fetch_optional(&mut *conn).await? else { return Ok(None) };
    let mut roles = if service_account {
        Sql::new(
            "SELECT r.permissions, r.data_scope FROM service_account_roles l JOIN roles r ON r.id = l.role_id \
             WHERE l.account_id = ",
        )
    } else {
        Sql::new(
            "SELECT r.permissions, r.data_scope FROM user_roles l JOIN roles r ON r.id = l.role_id WHERE l.user_id = ",
        )
    };
    roles.bind(id);
    let mut permissions = Vec::new();
    let mut scopes = Vec::new();
    for role in roles.query().fetch_all(&mut *conn).await? {
        permissions.push(permissions_of(&role.try_get::<String, _>("permissions")?)?);
        scopes.push(role.try_get::<i64, _>("data_scope")? as i32);
    }
    Ok(Some(Subject {
        id: id.to_string(),
        service_account,
        name: row.try_get("display_name")?,
        email: row.try_get("email")?,
        department_id: row.try_get("department_id")?,
        active: row.try_get::<i64, _>("active")? != 0,
        permissions: domain::union_permissions(&permissions),
        data_scope: domain::effective_scope(scopes),
    }))
}

async fn insert_refresh_token(
    conn: &mut AnyConnection,
    token: &NewRefreshToken,
    family_id: &str,
    user_id: &str,
    now: i64,
) -> Result<(), ApiError> {
    let mut sql =
        Sql::new("INSERT INTO refresh_tokens (token_hash, family_id, user_id, created_at, expires_at) VALUES (");
    sql.bind(token.hash.clone()).push(", ").bind(family_id).push(", ").bind(user_id);
    sql.push(", ").bind(now).push(", ").bind(token.expires_at).push(")");
    sql.query().execute(conn).await?;
    Ok(())
}

/// Revokes every refresh-token family of a user still alive.
async fn revoke_user_sessions(conn: &mut AnyConnection, user_id: &str, now: i64) -> Result<u64, ApiError> {
    let mut sql = Sql::new("UPDATE refresh_families SET revoked_at = ");
    sql.bind(now).push(" WHERE user_id = ").bind(user_id).push(" AND revoked_at = 0");
    Ok(sql.query().execute(conn).await?.rows_affected())
}

async fn revoke_family(conn: &mut AnyConnection, family_id: &str, now: i64) -> Result<(), ApiError> {
    let mut sql = Sql::new("UPDATE refresh_families SET revoked_at = ");
    sql.bind(now).push(" WHERE id = ").bind(family_id).push(" AND revoked_at = 0");
    sql.query().execute(conn).await?;
    Ok(())
}

impl Store {
    /// Connects and applies migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Store, DbError> {
        let db = Db::connect(url, max_connections).await?;
        db.migrate(&migrations()).await?;
        crm_kit::metrics::register_pool("auth", db.pool().clone());
        Ok(Store { db })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Makes writes that call this with the same `key` run one at a time. SQLite's write
    /// transactions already do (`BEGIN IMMEDIATE`).
    async fn serialize(&self, tx: &mut Transaction<'static, Any>, key: i64) -> Result<(), ApiError> {
        if self.db.backend() == Backend::Postgres {
            let mut sql = Sql::new("SELECT pg_advisory_xact_lock(");
            sql.bind(key).push(")");
            sql.query().execute(&mut **tx).await?;
        }
        Ok(())
    }

    // ----- security events -----

    /// Records an event on its own.
    pub async fn record_event(&self, event: &Event) -> Result<(), ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        insert_event(&mut conn, event).await
    }

    /// One page of the audit, newest first.
    pub async fn list_events(
        &self,
        filter_text: &str,
        size: i64,
        page_token: &str,
    ) -> Result<(Vec<SecurityEvent>, String), ApiError> {
        let fp = fingerprint(&["security_events", filter_text]);
        let cursor = Cursor::decode(page_token, fp)?;
        let mut sql = Sql::new("SELECT ");
        sql.push(EVENT_COLUMNS).push(" FROM security_events WHERE 1=1");
        filter::apply(filter_text, EVENT_FIELDS, &mut sql)?;
        if let Some(cursor) = &cursor {
            let KeyValue::Int(at) = cursor.key else {
                return Err(ApiError::invalid("page_token", "is not a token returned by this listing"));
            };
            sql.push(" AND (occurred_at, id) < (").bind(at).push(", ").bind(cursor.id.as_str()).push(")");
        }
        sql.push(" ORDER BY occurred_at DESC, id DESC LIMIT ").bind(size + 1);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(size as usize) {
            events.push(event_of(row)?);
            last = Some((row.try_get::<i64, _>("occurred_at")?, row.try_get::<String, _>("id")?));
        }
        let next = match last {
            Some((at, id)) if rows.len() as i64 > size => Cursor::new(KeyValue::Int(at), id, fp).encode(),
            _ => String::new(),
        };
        Ok((events, next))
    }

    // ----- identities -----

    /// A user or service account as it is now; `None` if it does not exist.
    pub async fn subject(&self, id: &str, service_account: bool) -> Result<Option<Subject>, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        load_subject(&mut conn, id, service_account).await
    }

    /// Ids of the users (active or not) in a department, or in it and every department below.
    pub async fn department_members(&self, department_id: &str, with_subtree: bool) -> Result<Vec<String>, ApiError> {
        let mut sql = if with_subtree {
            let mut sql = Sql::new("WITH RECURSIVE tree (id) AS (SELECT id FROM departments WHERE id = ");
            sql.bind(department_id).push(
                " UNION SELECT d.id FROM departments d JOIN tree t ON d.parent_id = t.id) \
                 SELECT u.id FROM users u WHERE u.department_id IN (SELECT id FROM tree)",
            );
            sql
        } else {
            let mut sql = Sql::new("SELECT id FROM users WHERE department_id = ");
            sql.bind(department_id);
            sql
        };
        sql.push(" ORDER BY 1");
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        rows.iter().map(|r| r.try_get::<String, _>("id").map_err(ApiError::from)).collect()
    }

    // ----- sign-in, refresh, sign-out -----

    /// What a sign-in with this (normalised) e-mail checks.
    pub async fn credentials(&self, email: &str) -> Result<Option<Credentials>, ApiError> {
        let mut sql = Sql::new("SELECT id, password_hash, active, locked_until FROM users WHERE email = ");
        sql.bind(email);
        let Some(row) = sql.query().fetch_optional(self.db.pool()).await? else { return Ok(None) };
        Ok(Some(Credentials {
            user_id: row.try_get("id")?,
            password_hash: row.try_get("password_hash")?,
            active: row.try_get::<i64, _>("active")? != 0,
            locked_until: row.try_get("locked_until")?,
        }))
    }

    /// Records a failed password check: the event, and with a `policy` the failure count of
    /// `user_id`, locking the account when it reaches the limit. Answers whether it locked it.
    pub async fn password_failed(
        &self,
        user_id: &str,
        policy: Option<LockPolicy>,
        event: &Event,
    ) -> Result<bool, ApiError> {
        let mut tx = self.db.begin_write().await?;
        insert_event(&mut tx, event).await?;
        let mut locked = false;
        if let (false, Some(policy)) = (user_id.is_empty(), policy) {
            let mut sql = Sql::new("UPDATE users SET failed_sign_ins = failed_sign_ins + 1 WHERE id = ");
            sql.bind(user_id).push(" RETURNING failed_sign_ins");
            let failures: Option<i64> =
                sql.query().fetch_optional(&mut *tx).await?.map(|r| r.try_get("failed_sign_ins")).transpose()?;
            if failures.is_some_and(|n| n >= policy.max_failures) {
                let mut sql = Sql::new("UPDATE users SET failed_sign_ins = 0, locked_until = ");
                sql.bind(policy.lock_until).push(" WHERE id = ").bind(user_id);
                sql.query().execute(&mut *tx).await?;
                let detail = format!(
                    "{} failed attempts; locked until {}",
                    policy.max_failures,
                    crm_kit::time::format_rfc3339(policy.lock_until)
                );
                insert_event(&mut tx, &Event { kind: events::LOCKED_OUT, detail, ..event.clone() }).await?;
                locked = true;
            }
        }
        tx.commit().await?;
        Ok(locked)
    }

    /// Starts a session after a correct password: clears the failure count, stores the first
    /// refresh token of a new family and records the sign-in. Fails (UNAUTHENTICATED) if the
    /// account was deactivated or locked meanwhile.
    pub async fn start_session(
        &self,
        user_id: &str,
        token: &NewRefreshToken,
        event: &Event,
    ) -> Result<Subject, ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new("UPDATE users SET failed_sign_ins = 0, locked_until = 0 WHERE id = ");
        sql.bind(user_id).push(" AND active = 1 AND locked_until <= ").bind(now);
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            return Err(ApiError::unauthenticated(BAD_CREDENTIALS));
        }
        let subject =
            load_subject(&mut tx, user_id, false).await?.ok_or_else(|| ApiError::unauthenticated(BAD_CREDENTIALS))?;
        let family = new_id();
        let mut sql = Sql::new("INSERT INTO refresh_families (id, user_id, created_at) VALUES (");
        sql.bind(family.as_str()).push(", ").bind(user_id).push(", ").bind(now).push(")");
        sql.query().execute(&mut *tx).await?;
        insert_refresh_token(&mut tx, token, &family, user_id, now).await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(subject)
    }

    /// Exchanges the refresh token whose hash is `presented` for `next` in the same family and
    /// answers who it belongs to, as they are now. A token presented a second time revokes its
    /// family (and every token in it) and records `refresh_reuse`. Every refusal is the same
    /// UNAUTHENTICATED.
    pub async fn refresh(
        &self,
        presented: &[u8],
        next: &NewRefreshToken,
        client_address: &str,
    ) -> Result<Subject, ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new(
            "SELECT t.family_id, t.user_id, t.expires_at, f.revoked_at FROM refresh_tokens t \
             JOIN refresh_families f ON f.id = t.family_id WHERE t.token_hash = ",
        );
        sql.bind(presented.to_vec());
        let Some(row) = sql.query().fetch_optional(&mut *tx).await? else {
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        };
        let family: String = row.try_get("family_id")?;
        let user_id: String = row.try_get("user_id")?;
        let revoked_at: i64 = row.try_get("revoked_at")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        if revoked_at != 0 || expires_at <= now {
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        }
        // Mark it used only if nobody did: of two concurrent exchanges one wins, and the other is
        // a second presentation.
        let mut sql = Sql::new("UPDATE refresh_tokens SET used_at = ");
        sql.bind(now).push(" WHERE token_hash = ").bind(presented.to_vec()).push(" AND used_at = 0");
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            revoke_family(&mut tx, &family, now).await?;
            let event = Event {
                kind: events::REFRESH_REUSE,
                actor_id: user_id.clone(),
                user_id: user_id.clone(),
                client_address: client_address.to_string(),
                detail: format!("a used refresh token was presented again; sign-in {family} revoked"),
                ..Event::default()
            };
            insert_event(&mut tx, &event).await?;
            tx.commit().await?;
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        }
        let subject = match load_subject(&mut tx, &user_id, false).await? {
            Some(subject) if subject.active => subject,
            _ => return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN)),
        };
        insert_refresh_token(&mut tx, next, &family, &user_id, now).await?;
        tx.commit().await?;
        Ok(subject)
    }

    /// Revokes the family of the refresh token whose hash is `presented`; records `event` (its
    /// user filled in) when there was one. Unknown tokens change nothing.
    pub async fn sign_out(&self, presented: &[u8], event: &Event) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = ");
        sql.bind(presented.to_vec());
        let Some(row) = sql.query().fetch_optional(&mut *tx).await? else {
            tx.rollback().await?;
            return Ok(());
        };
        let (family, user_id): (String, String) = (row.try_get("family_id")?, row.try_get("user_id")?);
        revoke_family(&mut tx, &family, now_micros()).await?;
        let event = Event { actor_id: user_id.clone(), user_id, ..event.clone() };
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes refresh tokens that expired before `before`, and the sign-ins left without any.
    pub async fn purge_expired(&self, before: i64) -> Result<u64, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new("DELETE FROM refresh_tokens WHERE expires_at < ");
        sql.bind(before);
        let deleted = sql.query().execute(&mut *tx).await?.rows_affected();
        let mut sql = Sql::new(
            "DELETE FROM refresh_families WHERE NOT EXISTS \
             (SELECT 1 FROM refresh_tokens t WHERE t.family_id = refresh_families.id) AND created_at < ",
        );
        sql.bind(before);
        sql.query().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    // ----- signing keys -----

    /// The key that signs now: the newest one not retired.
    pub async fn current_signing_key(&self) -> Result<Option<SigningKey>, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        current_key(&mut conn).await
    }

    /// The current key, storing `candidate` as the first one if there is none. Safe when
    /// several replicas start at once: exactly one key is stored.
    pub async fn ensure_signing_key(&self, candidate: &SigningKey) -> Result<SigningKey, ApiError> {
        if let Some(key) = self.current_signing_key().await? {
            return Ok(key);
        }
        let mut tx = self.db.begin_write().await?;
        self.serialize(&mut tx, LOCK_SIGNING_KEYS).await?;
        if let Some(key) = current_key(&mut tx).await? {
            tx.rollback().await?;
            return Ok(key);
        }
        insert_key(&mut tx, candidate, now_micros()).await?;
        tx.commit().await?;
        Ok(candidate.clone())
    }

    /// Makes `key` the current key, retiring the previous one now.
    pub async fn rotate_signing_key(&self, key: &SigningKey, event: &Event) -> Result<(), ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        self.serialize(&mut tx, LOCK_SIGNING_KEYS).await?;
        let mut sql = Sql::new("UPDATE signing_keys SET retired_at = ");
        sql.bind(now).push(" WHERE retired_at = 0 RETURNING kid");
        let retired: Vec<String> =
            sql.query().fetch_all(&mut *tx).await?.iter().map(|r| r.try_get("kid")).collect::<Result<_, _>>()?;
        insert_key(&mut tx, key, now).await?;
        let detail = format!("key {} signs from now on; retired: {}", key.kid(), retired.join(", "));
        insert_event(&mut tx, &Event { detail, ..event.clone() }).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The public keys of every key not retired, or retired after `retired_after`, newest first.
    pub async fn published_keys(&self, retired_after: i64) -> Result<Vec<Jwk>, ApiError> {
        let mut sql = Sql::new("SELECT kid, public_x FROM signing_keys WHERE retired_at = 0 OR retired_at > ");
        sql.bind(retired_after).push(" ORDER BY created_at DESC, kid DESC");
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        rows.iter()
            .map(|row| {
                Ok(Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    kid: row.try_get("kid")?,
                    x: row.try_get("public_x")?,
                    alg: "EdDSA".into(),
                    r#use: "sig".into(),
                })
            })
            .collect()
    }

    // ----- first start -----

    /// Whether any user exists.
    pub async fn has_users(&self) -> Result<bool, ApiError> {
        Ok(Sql::new("SELECT id FROM users LIMIT 1").query().fetch_optional(self.db.pool()).await?.is_some())
    }

    /// Creates the starting organisation of `plan` in one transaction if there are no users yet;
    /// answers whether it did. Safe when several replicas start at once: one creates it.
    pub async fn bootstrap(&self, plan: &BootstrapPlan) -> Result<bool, ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        self.serialize(&mut tx, LOCK_BOOTSTRAP).await?;
        if Sql::new("SELECT id FROM users LIMIT 1").query().fetch_optional(&mut *tx).await?.is_some() {
            tx.rollback().await?;
            return Ok(false);
        }
        let mut admin_role = None;
        for role in &plan.roles {
            let mut sql = Sql::new("INSERT INTO roles (");
            sql.push(ROLE_COLUMNS).push(", name_key) VALUES (").bind(new_id()).push(", ").bind(role.name.as_str());
            sql.push(", ").bind(permissions_json(&role.permissions)).push(", ").bind(i64::from(role.data_scope));
            sql.push(", ").bind(now).push(", ").bind(now).push(", 1, ").bind(role_key(&role.name));
            sql.push(") ON CONFLICT (name_key) DO NOTHING");
            sql.query().execute(&mut *tx).await?;
            if role.name == plan.admin_role {
                let mut sql = Sql::new("SELECT id FROM roles WHERE name_key = ");
                sql.bind(role_key(&role.name));
                admin_role = Some(sql.query().fetch_one(&mut *tx).await?.try_get::<String, _>("id")?);
            }
        }
        let admin_role =
            admin_role.ok_or_else(|| ApiError::Internal("the administrator's role is not in the plan".into()))?;
        let department = new_id();
        let mut sql = Sql::new("INSERT INTO departments (");
        sql.push(DEPARTMENT_COLUMNS).push(") VALUES (").bind(department.as_str()).push(", ");
        sql.bind(plan.department_name.as_str()).push(", '', ").bind(now).push(", ").bind(now).push(", 1)");
        sql.query().execute(&mut *tx).await?;
        let admin = new_id();
        let mut sql = Sql::new("INSERT INTO users (");
        sql.push(USER_COLUMNS).push(", password_hash) VALUES (").bind(admin.as_str()).push(", ");
        sql.bind(plan.admin_email.as_str()).push(", ").bind(plan.admin_display_name.as_str()).push(", '', ");
        sql.bind(department.as_str()).push(", '', 1, ").bind(now).push(", ").bind(now).push(", 1, ");
        sql.bind(plan.admin_password_hash.as_str()).push(")");
        sql.query().execute(&mut *tx).await?;
        let mut sql = Sql::new("INSERT INTO user_roles (user_id, role_id) VALUES (");
        sql.bind(admin.as_str()).push(", ").bind(admin_role).push(")");
        sql.query().execute(&mut *tx).await?;
        let event = Event {
            kind: events::ORGANISATION_BOOTSTRAPPED,
            user_id: admin,
            email: plan.admin_email.clone(),
            detail: format!(
                "created {} roles, the department {:?} and the administrator",
                plan.roles.len(),
                plan.department_name
            ),
            ..Event::default()
        };
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(true)
    }

    // ----- departments -----

    async fn check_department(
        &self,
        tx: &mut Transaction<'static, Any>,
        field: &str,
        id: &str,
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT id FROM departments WHERE id = ");
        sql.bind(id).push(self.db.for_share());
        if sql.query().fetch_optional(&mut **tx).await?.is_none() {
            return Err(ApiError::invalid(field, "no department has this id"));
        }
        Ok(())
    }

    pub async fn create_department(&self, d: &Department, actor: &Actor) -> Result<Department, ApiError> {
        let now = now_micros();
        let id = new_id();
        let mut tx = self.db.begin_write().await?;
        if !d.parent_id.is_empty() {
            self.check_department(&mut tx, "department.parent_id", &d.parent_id).await?;
        }
        let mut sql = Sql::new("INSERT INTO departments (");
        sql.push(DEPARTMENT_COLUMNS).push(") VALUES (").bind(id.as_str()).push(", ").bind(d.name.as_str());
        sql.push(", ").bind(d.parent_id.as_str()).push(", ").bind(now).push(", ").bind(now).push(", 1)");
        sql.query().execute(&mut *tx).await?;
        let mut event = actor.event(events::DEPARTMENT_CREATED);
        event.detail = format!("department {id} {:?} under {:?}", d.name, d.parent_id);
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(Department {
            id,
            name: d.name.clone(),
            parent_id: d.parent_id.clone(),
            create_time: to_timestamp(now),
            update_time: to_timestamp(now),
            etag: etag(1),
        })
    }

    pub async fn get_department(&self, id: &str) -> Result<Department, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(DEPARTMENT_COLUMNS).push(" FROM departments WHERE id = ").bind(id);
        let row = sql
            .query()
            .fetch_optional(self.db.pool())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("department {id} not found")))?;
        Ok(department_of(&row)?.0)
    }

    /// Departments by name.
    pub async fn list_departments(
        &self,
        filter_text: &str,
        size: i64,
        page_token: &str,
    ) -> Result<(Vec<Department>, String), ApiError> {
        let fp = fingerprint(&["departments", filter_text]);
        let cursor = Cursor::decode(page_token, fp)?;
        let mut sql = Sql::new("SELECT ");
        sql.push(DEPARTMENT_COLUMNS).push(" FROM departments WHERE 1=1");
        filter::apply(filter_text, DEPARTMENT_FIELDS, &mut sql)?;
        push_text_page(&mut sql, "name", cursor.as_ref(), size)?;
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let departments: Vec<Department> =
            rows.iter().take(size as usize).map(|r| department_of(r).map(|d| d.0)).collect::<Result<_, _>>()?;
        let last = departments.last().map(|d| (d.name.clone(), d.id.clone()));
        Ok((departments, next_token(rows.len(), size, last, fp)))
    }

    async fn lock_department(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: &str,
    ) -> Result<(Department, i64), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(DEPARTMENT_COLUMNS).push(" FROM departments WHERE id = ").bind(id).push(self.db.for_update());
        let row = sql
            .query()
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("department {id} not found")))?;
        Ok(department_of(&row)?)
    }

    /// Renames or moves a department; `change` applies the request to it. A move under the
    /// department itself or anything below it is refused.
    pub async fn update_department<F>(
        &self,
        id: &str,
        etag_sent: &str,
        actor: &Actor,
        change: F,
    ) -> Result<Department, ApiError>
    where
        F: FnOnce(&mut Department) -> Result<(), ApiError>,
    {
        let mut tx = self.db.begin_write().await?;
        // Moves run one at a time, so that two concurrent moves cannot close a cycle together.
        self.serialize(&mut tx, LOCK_DEPARTMENT_TREE).await?;
        let (old, version) = self.lock_department(&mut tx, id).await?;
        check_etag("department", id, etag_sent, &etag(version))?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            tx.rollback().await?;
            return Ok(old);
        }
        let moved = new.parent_id != old.parent_id;
        if moved && !new.parent_id.is_empty() {
            self.check_department(&mut tx, "department.parent_id", &new.parent_id).await?;
            let mut sql =
                Sql::new("WITH RECURSIVE up (id, parent_id) AS (SELECT id, parent_id FROM departments WHERE id = ");
            sql.bind(new.parent_id.as_str()).push(
                " UNION SELECT d.id, d.parent_id FROM departments d JOIN up ON d.id = up.parent_id) \
                 SELECT id FROM up WHERE id = ",
            );
            sql.bind(id);
            if sql.query().fetch_optional(&mut *tx).await?.is_some() {
                return Err(ApiError::invalid(
                    "department.parent_id",
                    "would make a cycle: it is the department itself or one of its sub-departments",
                ));
            }
        }
        let now = now_micros();
        let mut sql = Sql::new("UPDATE departments SET name = ");
        sql.bind(new.name.as_str()).push(", parent_id = ").bind(new.parent_id.as_str());
        sql.push(", updated_at = ").bind(now).push(", version = ").bind(version + 1);
        sql.push(" WHERE id = ").bind(id).push(" AND version = ").bind(version);
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            return Err(ApiError::Aborted(format!("department {id} changed concurrently; read it again")));
        }
        if moved {
            let mut event = actor.event(events::DEPARTMENT_MOVED);
            event.detail = format!("department {id} moved from {:?} to {:?}", old.parent_id, new.parent_id);
            insert_event(&mut tx, &event).await?;
        }
        if new.name != old.name {
            let mut event = actor.event(events::DEPARTMENT_CHANGED);
            event.detail = format!("department {id} renamed from {:?} to {:?}", old.name, new.name);
            insert_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        new.update_time = to_timestamp(now);
        new.etag = etag(version + 1);
        Ok(new)
    }

    /// Deletes a department without users and sub-departments.
    pub async fn delete_department(&self, id: &str, etag_sent: &str, actor: &Actor) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let (old, version) = self.lock_department(&mut tx, id).await?;
        check_etag("department", id, etag_sent, &etag(version))?;
        for (statement, what) in [
            ("SELECT id FROM departments WHERE parent_id = ", "sub-departments"),
            ("SELECT id FROM users WHERE department_id = ", "users"),
        ] {
            let mut sql = Sql::new(statement);
            sql.bind(id).push(" LIMIT 1");
            if sql.query().fetch_optional(&mut *tx).await?.is_some() {
                return Err(ApiError::FailedPrecondition(format!(
                    "department {id} still has {what}; move them elsewhere first"
                )));
            }
        }
        let mut sql = Sql::new("DELETE FROM departments WHERE id = ");
        sql.bind(id);
        sql.query().execute(&mut *tx).await?;
        let mut event = actor.event(events::DEPARTMENT_DELETED);
        event.detail = format!("department {id} {:?}", old.name);
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    // ----- roles -----

    /// Checks that every role exists, locking each against deletion until the transaction ends.
    async fn check_roles(
        &self,
        tx: &mut Transaction<'static, Any>,
        field: &str,
        ids: &[String],
    ) -> Result<(), ApiError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sql = Sql::new("SELECT id FROM roles WHERE ");
        push_in(&mut sql, "id", ids);
        sql.push(self.db.for_share());
        let found: Vec<String> =
            sql.query().fetch_all(&mut **tx).await?.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        let mut v = crm_kit::Violations::new();
        for (i, id) in ids.iter().enumerate() {
            if !found.contains(id) {
                v.add(format!("{field}[{i}]"), "no role has this id");
            }
        }
        v.check()
    }

    /// Role names by id, for audit details.
    async fn role_names(&self, conn: &mut AnyConnection, ids: &[String]) -> Result<Vec<String>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT name FROM roles WHERE ");
        push_in(&mut sql, "id", ids);
        sql.push(" ORDER BY name");
        sql.query().fetch_all(conn).await?.iter().map(|r| r.try_get("name").map_err(ApiError::from)).collect()
    }

    fn duplicate_role(name: &str) -> ApiError {
        ApiError::AlreadyExists {
            message: format!("a role named {name:?} already exists"),
            reason: "DUPLICATE_RECORD",
            metadata: vec![("field".into(), "name".into()), ("value".into(), name.to_string())],
        }
    }

    async fn check_role_name(
        &self,
        tx: &mut Transaction<'static, Any>,
        name: &str,
        except_id: &str,
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT id FROM roles WHERE name_key = ");
        sql.bind(role_key(name)).push(" AND id <> ").bind(except_id);
        match sql.query().fetch_optional(&mut **tx).await? {
            Some(row) => {
                let holder: String = row.try_get("id")?;
                let mut err = Self::duplicate_role(name);
                if let ApiError::AlreadyExists { metadata, .. } = &mut err {
                    metadata.push(("record_id".into(), holder));
                }
                Err(err)
            }
            None => Ok(()),
        }
    }

    pub async fn create_role(&self, r: &Role, actor: &Actor) -> Result<Role, ApiError> {
        let now = now_micros();
        let id = new_id();
        let mut tx = self.db.begin_write().await?;
        self.check_role_name(&mut tx, &r.name, "").await?;
        let mut sql = Sql::new("INSERT INTO roles (");
        sql.push(ROLE_COLUMNS).push(", name_key) VALUES (").bind(id.as_str()).push(", ").bind(r.name.as_str());
        sql.push(", ").bind(permissions_json(&r.permissions)).push(", ").bind(i64::from(r.data_scope));
        sql.push(", ").bind(now).push(", ").bind(now).push(", 1, ").bind(role_key(&r.name)).push(")");
        if let Err(err) = sql.query().execute(&mut *tx).await {
            return Err(if is_unique_violation(&err) { Self::duplicate_role(&r.name) } else { err.into() });
        }
        let mut event = actor.event(events::ROLE_CREATED);
        event.detail = format!(
            "role {id} {:?}: permissions [{}], scope {}",
            r.name,
            r.permissions.join(", "),
            domain::scope_name(r.data_scope)
        );
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(Role {
            id,
            name: r.name.clone(),
            permissions: r.permissions.clone(),
            data_scope: r.data_scope,
            create_time: to_timestamp(now),
            update_time: to_timestamp(now),
            etag: etag(1),
        })
    }

    pub async fn get_role(&self, id: &str) -> Result<Role, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(ROLE_COLUMNS).push(" FROM roles WHERE id = ").bind(id);
        let row = sql
            .query()
            .fetch_optional(self.db.pool())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("role {id} not found")))?;
        Ok(role_of(&row)?.0)
    }

    /// Roles by name.
    pub async fn list_roles(&self, size: i64, page_token: &str) -> Result<(Vec<Role>, String), ApiError> {
        let fp = fingerprint(&["roles"]);
        let cursor = Cursor::decode(page_token, fp)?;
        let mut sql = Sql::new("SELECT ");
        sql.push(ROLE_COLUMNS).push(" FROM roles WHERE 1=1");
        push_text_page(&mut sql, "name", cursor.as_ref(), size)?;
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let roles: Vec<Role> =
            rows.iter().take(size as usize).map(|r| role_of(r).map(|r| r.0)).collect::<Result<_, _>>()?;
        let last = roles.last().map(|r| (r.name.clone(), r.id.clone()));
        Ok((roles, next_token(rows.len(), size, last, fp)))
    }

    async fn lock_role(&self, tx: &mut Transaction<'static, Any>, id: &str) -> Result<(Role, i64), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(ROLE_COLUMNS).push(" FROM roles WHERE id = ").bind(id).push(self.db.for_update());
        let row = sql
            .query()
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("role {id} not found")))?;
        role_of(&row)
    }

    /// Changes a role; `change` applies the request (and validates the result).
    pub async fn update_role<F>(&self, id: &str, etag_sent: &str, actor: &Actor, change: F) -> Result<Role, ApiError>
    where
        F: FnOnce(&mut Role) -> Result<(), ApiError>,
    {
        let mut tx = self.db.begin_write().await?;
        let (old, version) = self.lock_role(&mut tx, id).await?;
        check_etag("role", id, etag_sent, &etag(version))?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            tx.rollback().await?;
            return Ok(old);
        }
        if role_key(&new.name) != role_key(&old.name) {
            self.check_role_name(&mut tx, &new.name, id).await?;
        }
        let now = now_micros();
        let mut sql = Sql::new("UPDATE roles SET name = ");
        sql.bind(new.name.as_str()).push(", name_key = ").bind(role_key(&new.name));
        sql.push(", permissions = ").bind(permissions_json(&new.permissions));
        sql.push(", data_scope = ").bind(i64::from(new.data_scope)).push(", updated_at = ").bind(now);
        sql.push(", version = ").bind(version + 1).push(" WHERE id = ").bind(id).push(" AND version = ").bind(version);
        match sql.query().execute(&mut *tx).await {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => return Err(ApiError::Aborted(format!("role {id} changed concurrently; read it again"))),
            Err(err) if is_unique_violation(&err) => return Err(Self::duplicate_role(&new.name)),
            Err(err) => return Err(err.into()),
        }
        let mut changes = Vec::new();
        if new.name != old.name {
            changes.push(format!("name {:?} -> {:?}", old.name, new.name));
        }
        if new.permissions != old.permissions {
            changes.push(format!("permissions [{}] -> [{}]", old.permissions.join(", "), new.permissions.join(", ")));
        }
        if new.data_scope != old.data_scope {
            changes.push(format!(
                "scope {} -> {}",
                domain::scope_name(old.data_scope),
                domain::scope_name(new.data_scope)
            ));
        }
        let mut event = actor.event(events::ROLE_CHANGED);
        event.detail = format!("role {id}: {}", changes.join("; "));
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        new.update_time = to_timestamp(now);
        new.etag = etag(version + 1);
        Ok(new)
    }

    /// Deletes a role nobody holds.
    pub async fn delete_role(&self, id: &str, etag_sent: &str, actor: &Actor) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let (old, version) = self.lock_role(&mut tx, id).await?;
        check_etag("role", id, etag_sent, &etag(version))?;
        for (statement, holders) in [
            ("SELECT user_id FROM user_roles WHERE role_id = ", "users"),
            ("SELECT account_id FROM service_account_roles WHERE role_id = ", "service accounts"),
        ] {
            let mut sql = Sql::new(statement);
            sql.bind(id).push(" LIMIT 1");
            if sql.query().fetch_optional(&mut *tx).await?.is_some() {
                return Err(ApiError::FailedPrecondition(format!(
                    "role {id} is still held by {holders}; take it from them first"
                )));
            }
        }
        let mut sql = Sql::new("DELETE FROM roles WHERE id = ");
        sql.bind(id);
        sql.query().execute(&mut *tx).await?;
        let mut event = actor.event(events::ROLE_DELETED);
        event.detail = format!("role {id} {:?}", old.name);
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    // ----- users -----

    fn duplicate_email(email: &str, holder: Option<String>) -> ApiError {
        let mut metadata = vec![("field".to_string(), "email".to_string()), ("value".to_string(), email.to_string())];
        if let Some(holder) = holder {
            metadata.push(("record_id".to_string(), holder));
        }
        ApiError::AlreadyExists {
            message: format!("a user with the e-mail {email} already exists"),
            reason: "DUPLICATE_RECORD",
            metadata,
        }
    }

    /// Checks a user's references: e-mail not taken, department, supervisor and roles exist.
    async fn check_user_references(
        &self,
        tx: &mut Transaction<'static, Any>,
        new: &User,
        old: Option<&User>,
    ) -> Result<(), ApiError> {
        if old.is_none_or(|o| o.email != new.email) {
            let mut sql = Sql::new("SELECT id FROM users WHERE email = ");
            sql.bind(new.email.as_str()).push(" AND id <> ").bind(new.id.as_str());
            if let Some(row) = sql.query().fetch_optional(&mut **tx).await? {
                return Err(Self::duplicate_email(&new.email, Some(row.try_get("id")?)));
            }
        }
        if !new.department_id.is_empty() && old.is_none_or(|o| o.department_id != new.department_id) {
            self.check_department(tx, "user.department_id", &new.department_id).await?;
        }
        if !new.supervisor_id.is_empty() && old.is_none_or(|o| o.supervisor_id != new.supervisor_id) {
            let mut sql = Sql::new("SELECT id FROM users WHERE id = ");
            sql.bind(new.supervisor_id.as_str()).push(self.db.for_share());
            if sql.query().fetch_optional(&mut **tx).await?.is_none() {
                return Err(ApiError::invalid("user.supervisor_id", "no user has this id"));
            }
        }
        if old.is_none_or(|o| o.role_ids != new.role_ids) {
            self.check_roles(tx, "user.role_ids", &new.role_ids).await?;
        }
        Ok(())
    }

    async fn set_role_links(
        &self,
        tx: &mut Transaction<'static, Any>,
        table: &str,
        owner_column: &str,
        owner: &str,
        role_ids: &[String],
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new("DELETE FROM ");
        sql.push(table).push(" WHERE ").push(owner_column).push(" = ").bind(owner);
        sql.query().execute(&mut **tx).await?;
        if role_ids.is_empty() {
            return Ok(());
        }
        let mut sql = Sql::new("INSERT INTO ");
        sql.push(table).push(" (").push(owner_column).push(", role_id) VALUES ");
        for (i, role) in role_ids.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(").bind(owner).push(", ").bind(role.as_str()).push(")");
        }
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// Creates an active user with a (hashed) password; `user` is normalised.
    pub async fn create_user(&self, user: &User, password_hash: &str, actor: &Actor) -> Result<User, ApiError> {
        let now = now_micros();
        let mut new = User {
            id: new_id(),
            active: true,
            create_time: to_timestamp(now),
            update_time: to_timestamp(now),
            etag: etag(1),
            ..user.clone()
        };
        let mut tx = self.db.begin_write().await?;
        self.check_user_references(&mut tx, &new, None).await?;
        let mut sql = Sql::new("INSERT INTO users (");
        sql.push(USER_COLUMNS).push(", password_hash) VALUES (").bind(new.id.as_str());
        sql.push(", ").bind(new.email.as_str()).push(", ").bind(new.display_name.as_str());
        sql.push(", ").bind(new.phone.as_str()).push(", ").bind(new.department_id.as_str());
        sql.push(", ").bind(new.supervisor_id.as_str()).push(", 1, ").bind(now).push(", ").bind(now);
        sql.push(", 1, ").bind(password_hash).push(")");
        if let Err(err) = sql.query().execute(&mut *tx).await {
            return Err(if is_unique_violation(&err) { Self::duplicate_email(&new.email, None) } else { err.into() });
        }
        self.set_role_links(&mut tx, "user_roles", "user_id", &new.id, &new.role_ids).await?;
        let roles = self.role_names(&mut tx, &new.role_ids).await?;
        let mut event = actor.event(events::USER_CREATED);
        event.user_id = new.id.clone();
        event.email = new.email.clone();
        event.detail = format!("department {:?}, roles [{}]", new.department_id, roles.join(", "));
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        new.role_ids.sort();
        Ok(new)
    }

    pub async fn get_user(&self, id: &str) -> Result<User, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(self.read_user(&mut conn, id, false).await?.0)
    }

    async fn read_user(&self, conn: &mut AnyConnection, id: &str, lock: bool) -> Result<(User, i64), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(USER_COLUMNS).push(" FROM users WHERE id = ").bind(id);
        if lock {
            sql.push(self.db.for_update());
        }
        let row = sql
            .query()
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("user {id} not found")))?;
        let (mut user, version) = user_of(&row)?;
        user.role_ids = role_links(conn, "user_roles", "user_id", std::slice::from_ref(&user.id))
            .await?
            .remove(&user.id)
            .unwrap_or_default();
        Ok((user, version))
    }

    /// Users by display name.
    pub async fn list_users(
        &self,
        filter_text: &str,
        size: i64,
        page_token: &str,
    ) -> Result<(Vec<User>, String), ApiError> {
        let fp = fingerprint(&["users", filter_text]);
        let cursor = Cursor::decode(page_token, fp)?;
        let mut sql = Sql::new("SELECT ");
        sql.push(USER_COLUMNS).push(" FROM users WHERE 1=1");
        if let Some(mut expr) = filter::parse(filter_text)? {
            normalize_email_values(&mut expr);
            sql.push(" AND (");
            filter::compile(&expr, USER_FIELDS, &mut sql)?;
            sql.push(")");
        }
        push_text_page(&mut sql, "display_name", cursor.as_ref(), size)?;
        let mut conn = self.db.pool().acquire().await?;
        let rows = sql.query().fetch_all(&mut *conn).await?;
        let mut users: Vec<User> =
            rows.iter().take(size as usize).map(|r| user_of(r).map(|u| u.0)).collect::<Result<_, _>>()?;
        let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
        let mut roles = role_links(&mut conn, "user_roles", "user_id", &ids).await?;
        for user in &mut users {
            user.role_ids = roles.remove(&user.id).unwrap_or_default();
        }
        let last = users.last().map(|u| (u.display_name.clone(), u.id.clone()));
        Ok((users, next_token(rows.len(), size, last, fp)))
    }

    /// Changes a user; `change` applies the request (and validates the result). Deactivation
    /// revokes their refresh tokens.
    pub async fn update_user<F>(&self, id: &str, etag_sent: &str, actor: &Actor, change: F) -> Result<User, ApiError>
    where
        F: FnOnce(&mut User) -> Result<(), ApiError>,
    {
        let mut tx = self.db.begin_write().await?;
        let (old, version) = self.read_user(&mut tx, id, true).await?;
        check_etag("user", id, etag_sent, &etag(version))?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            tx.rollback().await?;
            return Ok(old);
        }
        self.check_user_references(&mut tx, &new, Some(&old)).await?;
        let now = now_micros();
        let mut sql = Sql::new("UPDATE users SET email = ");
        sql.bind(new.email.as_str()).push(", display_name = ").bind(new.display_name.as_str());
        sql.push(", phone = ").bind(new.phone.as_str()).push(", department_id = ").bind(new.department_id.as_str());
        sql.push(", supervisor_id = ").bind(new.supervisor_id.as_str());
        sql.push(", active = ").bind(i64::from(new.active)).push(", updated_at = ").bind(now);
        sql.push(", version = ").bind(version + 1).push(" WHERE id = ").bind(id).push(" AND version = ").bind(version);
        match sql.query().execute(&mut *tx).await {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => return Err(ApiError::Aborted(format!("user {id} changed concurrently; read it again"))),
            Err(err) if is_unique_violation(&err) => return Err(Self::duplicate_email(&new.email, None)),
            Err(err) => return Err(err.into()),
        }
        let user_event = |kind| Event { user_id: id.to_string(), email: new.email.clone(), ..actor.event(kind) };
        if new.role_ids != old.role_ids {
            self.set_role_links(&mut tx, "user_roles", "user_id", id, &new.role_ids).await?;
            let before = self.role_names(&mut tx, &old.role_ids).await?;
            let after = self.role_names(&mut tx, &new.role_ids).await?;
            let mut event = user_event(events::USER_ROLES_CHANGED);
            event.detail = format!("roles [{}] -> [{}]", before.join(", "), after.join(", "));
            insert_event(&mut tx, &event).await?;
        }
        if new.department_id != old.department_id {
            let mut event = user_event(events::USER_DEPARTMENT_CHANGED);
            event.detail = format!("department {:?} -> {:?}", old.department_id, new.department_id);
            insert_event(&mut tx, &event).await?;
        }
        if new.active != old.active {
            let mut event = user_event(if new.active { events::USER_REACTIVATED } else { events::USER_DEACTIVATED });
            if !new.active {
                let revoked = revoke_user_sessions(&mut tx, id, now).await?;
                event.detail = format!("{revoked} sign-in(s) revoked");
            }
            insert_event(&mut tx, &event).await?;
        }
        let mut changed = Vec::new();
        for (field, differs) in [
            ("email", new.email != old.email),
            ("display_name", new.display_name != old.display_name),
            ("phone", new.phone != old.phone),
            ("supervisor_id", new.supervisor_id != old.supervisor_id),
        ] {
            if differs {
                changed.push(field);
            }
        }
        if !changed.is_empty() {
            let mut event = user_event(events::USER_CHANGED);
            event.detail = format!("changed {}", changed.join(", "));
            if new.email != old.email {
                event.detail.push_str(&format!("; e-mail was {}", old.email));
            }
            insert_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        new.update_time = to_timestamp(now);
        new.etag = etag(version + 1);
        Ok(new)
    }

    /// A user's password hash; `None` when there is no such user.
    pub async fn password_hash(&self, user_id: &str) -> Result<Option<Credentials>, ApiError> {
        let mut sql = Sql::new("SELECT id, password_hash, active, locked_until FROM users WHERE id = ");
        sql.bind(user_id);
        let Some(row) = sql.query().fetch_optional(self.db.pool()).await? else { return Ok(None) };
        Ok(Some(Credentials {
            user_id: row.try_get("id")?,
            password_hash: row.try_get("password_hash")?,
            active: row.try_get::<i64, _>("active")? != 0,
            locked_until: row.try_get("locked_until")?,
        }))
    }

    /// Sets a user's password hash, clears a lock-out and revokes their refresh tokens.
    pub async fn set_password(&self, user_id: &str, password_hash: &str, event: &Event) -> Result<(), ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new("UPDATE users SET password_hash = ");
        sql.bind(password_hash).push(", failed_sign_ins = 0, locked_until = 0, updated_at = ").bind(now);
        sql.push(" WHERE id = ").bind(user_id);
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            return Err(ApiError::NotFound(format!("user {user_id} not found")));
        }
        let revoked = revoke_user_sessions(&mut tx, user_id, now).await?;
        let event = Event { detail: format!("{revoked} sign-in(s) revoked"), ..event.clone() };
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    // ----- service accounts -----

    fn service_account_of(row: &AnyRow) -> Result<ServiceAccount, sqlx::Error> {
        Ok(ServiceAccount {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            client_id: row.try_get("client_id")?,
            role_ids: Vec::new(),
            create_time: to_timestamp(row.try_get("created_at")?),
        })
    }

    pub async fn create_service_account(
        &self,
        new: &NewServiceAccount,
        actor: &Actor,
    ) -> Result<ServiceAccount, ApiError> {
        let now = now_micros();
        let id = new_id();
        let mut tx = self.db.begin_write().await?;
        self.check_roles(&mut tx, "service_account.role_ids", &new.role_ids).await?;
        let mut sql = Sql::new("INSERT INTO service_accounts (id, name, client_id, secret_hash, created_at) VALUES (");
        sql.bind(id.as_str()).push(", ").bind(new.name.as_str()).push(", ").bind(new.client_id.as_str());
        sql.push(", ").bind(new.secret_hash.clone()).push(", ").bind(now).push(")");
        sql.query().execute(&mut *tx).await?;
        self.set_role_links(&mut tx, "service_account_roles", "account_id", &id, &new.role_ids).await?;
        let roles = self.role_names(&mut tx, &new.role_ids).await?;
        let mut event = actor.event(events::SERVICE_ACCOUNT_CREATED);
        event.detail =
            format!("service account {id} {:?}, client id {}, roles [{}]", new.name, new.client_id, roles.join(", "));
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(ServiceAccount {
            id,
            name: new.name.clone(),
            client_id: new.client_id.clone(),
            role_ids: new.role_ids.clone(),
            create_time: to_timestamp(now),
        })
    }

    /// Service accounts by name.
    pub async fn list_service_accounts(
        &self,
        size: i64,
        page_token: &str,
    ) -> Result<(Vec<ServiceAccount>, String), ApiError> {
        let fp = fingerprint(&["service_accounts"]);
        let cursor = Cursor::decode(page_token, fp)?;
        let mut sql = Sql::new("SELECT id, name, client_id, created_at FROM service_accounts WHERE 1=1");
        push_text_page(&mut sql, "name", cursor.as_ref(), size)?;
        let mut conn = self.db.pool().acquire().await?;
        let rows = sql.query().fetch_all(&mut *conn).await?;
        let mut accounts: Vec<ServiceAccount> =
            rows.iter().take(size as usize).map(Self::service_account_of).collect::<Result<_, _>>()?;
        let ids: Vec<String> = accounts.iter().map(|a| a.id.clone()).collect();
        let mut roles = role_links(&mut conn, "service_account_roles", "account_id", &ids).await?;
        for account in &mut accounts {
            account.role_ids = roles.remove(&account.id).unwrap_or_default();
        }
        let last = accounts.last().map(|a| (a.name.clone(), a.id.clone()));
        Ok((accounts, next_token(rows.len(), size, last, fp)))
    }

    pub async fn delete_service_account(&self, id: &str, actor: &Actor) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new("SELECT name, client_id FROM service_accounts WHERE id = ");
        sql.bind(id).push(self.db.for_update());
        let row = sql
            .query()
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("service account {id} not found")))?;
        let (name, client_id): (String, String) = (row.try_get("name")?, row.try_get("client_id")?);
        let mut sql = Sql::new("DELETE FROM service_account_roles WHERE account_id = ");
        sql.bind(id);
        sql.query().execute(&mut *tx).await?;
        let mut sql = Sql::new("DELETE FROM service_accounts WHERE id = ");
        sql.bind(id);
        sql.query().execute(&mut *tx).await?;
        let mut event = actor.event(events::SERVICE_ACCOUNT_DELETED);
        event.detail = format!("service account {id} {name:?}, client id {client_id}");
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A service account's id and secret hash by client id.
    pub async fn service_credentials(&self, client_id: &str) -> Result<Option<(String, Vec<u8>)>, ApiError> {
        let mut sql = Sql::new("SELECT id, secret_hash FROM service_accounts WHERE client_id = ");
        sql.bind(client_id);
        let Some(row) = sql.query().fetch_optional(self.db.pool()).await? else { return Ok(None) };
        Ok(Some((row.try_get("id")?, row.try_get("secret_hash")?)))
    }
}

async fn current_key(conn: &mut AnyConnection) -> Result<Option<SigningKey>, ApiError> {
    let row =
        Sql::new("SELECT kid, pkcs8 FROM signing_keys WHERE retired_at = 0 ORDER BY created_at DESC, kid DESC LIMIT 1")
            .query()
            .fetch_optional(conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let kid: String = row.try_get("kid")?;
    let pkcs8: Vec<u8> = row.try_get("pkcs8")?;
    SigningKey::from_pkcs8(kid, &pkcs8).map(Some).map_err(ApiError::Internal)
}

async fn insert_key(conn: &mut AnyConnection, key: &SigningKey, now: i64) -> Result<(), ApiError> {
    let mut sql = Sql::new("INSERT INTO signing_keys (kid, pkcs8, public_x, created_at) VALUES (");
    sql.bind(key.kid()).push(", ").bind(key.pkcs8().to_vec()).push(", ").bind(key.jwk().x).push(", ").bind(now);
    sql.push(")");
    sql.query().execute(conn).await?;
    Ok(())
}
