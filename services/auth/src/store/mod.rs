//! Every SQL statement of the auth service, and nothing else, one module per area. One
//! implementation for both backends: portable SQL with `$n` placeholders, and named dialect
//! branches only for row locks and for the few writes that must not interleave (moves in the
//! department tree, signing-key changes, the first start), which SQLite's single writer runs
//! one at a time by itself.
//!
//! Every change is one transaction that also writes its security event.

mod departments;
mod events;
mod first_start;
mod identities;
mod roles;
mod service_accounts;
mod sessions;
mod signing_keys;
mod users;

use std::collections::HashMap;

use crm_kit::ApiError;
use crm_kit::db::{Conn, Db, DbError, Migrations, Sql, Tx};
use crm_kit::events::Outbox;
use sqlx::Row;

pub use departments::{DEPARTMENT_FIELDS, DEPARTMENT_ORDER};
pub use events::{Actor, EVENT_FIELDS, EVENT_ORDER, Event};
pub use first_start::{BootstrapPlan, SuiteAccount, SuiteAccountPlan};
pub use identities::Subject;
pub use roles::ROLE_ORDER;
pub use service_accounts::{NewServiceAccount, SERVICE_ACCOUNT_ORDER};
pub use sessions::{Credentials, Exchange, LockPolicy, NewRefreshToken};
pub use users::{USER_FIELDS, USER_ORDER};

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

/// Keys of the writes that run one at a time ([`Db::one_writer_at_a_time`]).
const DEPARTMENT_TREE: i64 = 0x6175_7468_0001;
const SIGNING_KEYS: i64 = 0x6175_7468_0002;
const FIRST_START: i64 = 0x6175_7468_0003;

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    outbox: Outbox,
}

impl Store {
    /// Connects and applies migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Store, DbError> {
        Ok(Store::new(Db::open(url, max_connections, &migrations(), "auth").await?))
    }

    /// The store over an opened (and migrated) database.
    pub fn new(db: Db) -> Store {
        Store { db, outbox: Outbox::new(crate::SOURCE) }
    }

    /// Publishes organisation changes through `outbox` (the role's, which its relay watches).
    pub fn with_outbox(mut self, outbox: Outbox) -> Store {
        self.outbox = outbox;
        self
    }

    /// Writes an organisation change about `subject` into the outbox of `tx`.
    pub(crate) async fn publish<E: prost::Name>(
        &self,
        tx: &mut Tx,
        subject: &str,
        actor: &Actor,
        event: &E,
    ) -> Result<(), ApiError> {
        self.outbox.append(tx, subject, &actor.id, event).await
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

fn etag(version: i64) -> String {
    version.to_string()
}

/// Role ids per owner from a link table (`user_roles` or `service_account_roles`).
async fn role_links(
    conn: &mut Conn,
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
    sql.push_in(owner_column, owners);
    sql.push(" ORDER BY role_id");
    for row in sql.query().fetch_all(conn).await? {
        links.entry(row.try_get("owner")?).or_default().push(row.try_get("role_id")?);
    }
    Ok(links)
}

/// Replaces the roles linked to `owner` in a link table.
async fn set_role_links(
    tx: &mut Tx,
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
    sql.push_values(role_ids, |v, role| {
        v.bind(owner).bind(role);
    });
    sql.query().execute(&mut **tx).await?;
    Ok(())
}
