//! The security audit (SPEC A6): every change and every sign-in attempt leaves an event,
//! written in the same transaction as what it records.

use crm_kit::ApiError;
use crm_kit::db::{Conn, Sql};
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::auth::v1::SecurityEvent;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;

const EVENT_COLUMNS: &str = "id, event_type, occurred_at, actor_id, user_id, email, client_address, detail";

/// What `ListSecurityEvents` filters on.
pub const EVENT_FIELDS: &[Field] = &[
    Field { name: "type", column: "event_type", kind: FieldKind::Text },
    Field { name: "user_id", column: "user_id", kind: FieldKind::Text },
    Field { name: "actor_id", column: "actor_id", kind: FieldKind::Text },
];

/// The audit is listed newest first.
pub const EVENT_ORDER: Order = Order::newest("occurred_at");

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

fn event_of(row: &AnyRow) -> Result<SecurityEvent, ApiError> {
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

/// Writes `event` in the transaction (or on the connection) of what it records.
pub(super) async fn insert_event(conn: &mut Conn, event: &Event) -> Result<(), ApiError> {
    let mut sql = Sql::new("INSERT INTO security_events (");
    sql.push(EVENT_COLUMNS).push(") VALUES ");
    sql.push_values([event], |v, e| {
        v.bind(crm_kit::id::new()).bind(e.kind).bind(now_micros()).bind(&e.actor_id).bind(&e.user_id);
        v.bind(&e.email).bind(&e.client_address).bind(&e.detail);
    });
    sql.query().execute(conn).await?;
    Ok(())
}

impl Store {
    /// Records an event on its own.
    pub async fn record_event(&self, event: &Event) -> Result<(), ApiError> {
        let mut conn = self.db().pool().acquire().await?;
        insert_event(&mut conn, event).await
    }

    /// One page of the audit, newest first.
    pub async fn list_events(
        &self,
        filter: Option<&Filter>,
        page: &Page,
    ) -> Result<(Vec<SecurityEvent>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(EVENT_COLUMNS).push(" FROM security_events WHERE 1=1");
        if let Some(filter) = filter {
            filter.push_onto(&mut sql);
        }
        page.push_keyset(&mut sql, &EVENT_ORDER);
        let rows = sql.query().fetch_all(self.db().pool()).await?;
        page.finish(&rows, &EVENT_ORDER, event_of)
    }
}
