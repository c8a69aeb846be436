//! Every SQL statement of the notifications service, one implementation for both backends:
//!
//! - this module: inboxes — a new notification (numbered per recipient under the lock of the
//!   recipient's inbox row, so numbers follow commit order), listing, reading after a number,
//!   marking read, the unread count;
//! - [`settings`]: users' preferences and language, administrators' event type settings and
//!   templates;
//! - [`deliveries`]: deliveries outside the inbox, their attempts and their jobs;
//! - [`webhooks`]: outgoing webhook subscriptions.

pub mod deliveries;
pub mod settings;
pub mod webhooks;

use crm_kit::ApiError;
use crm_kit::db::{Db, DbError, Migrations, Sql, Tx};
use crm_kit::events::Outbox;
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::notifications::v1::{Notification, NotificationCreated};
use sqlx::Row;
use sqlx::any::AnyRow;

pub use deliveries::{Attempt, AttemptResult, DeliveryFilter, NewDelivery, Start};
pub use settings::{EventTypeSettings, Prefs, StoredTemplate};
pub use webhooks::StoredWebhook;

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

/// Added to an unread notification's sequence in its `rank`: unread ones sort above every read
/// one (sequences stay far below it).
pub const UNREAD: i64 = 1 << 40;

/// Newest first.
pub const BY_TIME: Order = Order::newest("seq");
/// Unread first, each part newest first.
pub const UNREAD_FIRST: Order = Order::newest("rank");

const COLUMNS: &str =
    "id, seq, rank, event_id, event_type, source, subject_id, actor_id, title, body, created_at, read_at";

/// Most notifications one call marks read by id.
pub const MAX_MARK_IDS: usize = 1000;

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    outbox: Outbox,
}

/// A notification about to enter an inbox.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub recipient_id: String,
    pub event_id: String,
    pub event_type: String,
    pub source: String,
    pub subject_id: String,
    pub actor_id: String,
    pub title: String,
    pub body: String,
}

fn decode(row: &AnyRow) -> Result<Notification, ApiError> {
    let read_at: i64 = row.try_get("read_at")?;
    Ok(Notification {
        id: row.try_get("id")?,
        sequence: row.try_get("seq")?,
        event_type: row.try_get("event_type")?,
        event_id: row.try_get("event_id")?,
        source: row.try_get("source")?,
        subject_id: row.try_get("subject_id")?,
        actor_id: row.try_get("actor_id")?,
        title: row.try_get("title")?,
        body: row.try_get("body")?,
        read: read_at != 0,
        create_time: to_timestamp(row.try_get("created_at")?),
        read_time: to_timestamp(read_at),
    })
}

impl Store {
    /// Connects and applies migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Store, DbError> {
        Ok(Store::new(Db::open(url, max_connections, &migrations(), crate::SOURCE).await?))
    }

    pub fn new(db: Db) -> Store {
        Store { db, outbox: Outbox::new(crate::SOURCE) }
    }

    /// Publishes new notifications through `outbox` (the role's, which its relay watches).
    pub fn with_outbox(mut self, outbox: Outbox) -> Store {
        self.outbox = outbox;
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Puts `n` into its recipient's inbox in `tx`, with the next number of that inbox, and
    /// announces it (`NotificationCreated`). `None` when the recipient already has a
    /// notification of this event: at most one per event and recipient.
    pub async fn add(&self, tx: &mut Tx, n: &NewNotification) -> Result<Option<Notification>, ApiError> {
        // Taking the inbox row first serialises the recipient's new notifications: numbers are
        // given in commit order.
        let mut head = Sql::new("INSERT INTO inboxes (recipient_id, last_seq, unread) VALUES (");
        head.bind(n.recipient_id.as_str()).push(", 1, 1) ON CONFLICT (recipient_id) DO UPDATE SET ");
        head.push("last_seq = inboxes.last_seq + 1, unread = inboxes.unread + 1 RETURNING last_seq");
        let seq: i64 = head.query().fetch_one(&mut **tx).await?.try_get("last_seq")?;
        let id = crm_kit::id::new();
        let now = now_micros();
        let mut insert = Sql::new("INSERT INTO notifications (recipient_id, ");
        insert.push(COLUMNS).push(") VALUES ");
        insert.push_values([n], |v, n| {
            v.bind(n.recipient_id.as_str())
                .bind(id.as_str())
                .bind(seq)
                .bind(seq + UNREAD)
                .bind(n.event_id.as_str())
                .bind(n.event_type.as_str());
            v.bind(n.source.as_str()).bind(n.subject_id.as_str()).bind(n.actor_id.as_str());
            v.bind(n.title.as_str()).bind(n.body.as_str()).bind(now).bind(0_i64);
        });
        insert.push(" ON CONFLICT (event_id, recipient_id) DO NOTHING");
        if insert.query().execute(&mut **tx).await?.rows_affected() == 0 {
            // Still holding the inbox row: nobody took a number after ours.
            let mut undo =
                Sql::new("UPDATE inboxes SET last_seq = last_seq - 1, unread = unread - 1 WHERE recipient_id = ");
            undo.bind(n.recipient_id.as_str());
            undo.query().execute(&mut **tx).await?;
            return Ok(None);
        }
        let created = NotificationCreated {
            notification_id: id.clone(),
            recipient_id: n.recipient_id.clone(),
            sequence: seq,
            event_type: n.event_type.clone(),
        };
        self.outbox.append(tx, &n.recipient_id, &n.actor_id, &created).await?;
        Ok(Some(Notification {
            id,
            sequence: seq,
            event_type: n.event_type.clone(),
            event_id: n.event_id.clone(),
            source: n.source.clone(),
            subject_id: n.subject_id.clone(),
            actor_id: n.actor_id.clone(),
            title: n.title.clone(),
            body: n.body.clone(),
            read: false,
            create_time: to_timestamp(now),
            read_time: None,
        }))
    }

    /// One page of `recipient`'s notifications in `order`, unread ones only if asked.
    pub async fn list(
        &self,
        recipient: &str,
        unread_only: bool,
        order: &Order,
        page: &Page,
    ) -> Result<(Vec<Notification>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM notifications WHERE recipient_id = ").bind(recipient);
        if unread_only {
            // The same as read_at = 0, on the rank index.
            sql.push(" AND rank >= ").literal(UNREAD);
        }
        page.push_keyset(&mut sql, order);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        page.finish(&rows, order, decode)
    }

    /// `recipient`'s notifications numbered after `after`, in order, at most `limit`.
    pub async fn after(&self, recipient: &str, after: i64, limit: i64) -> Result<Vec<Notification>, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM notifications WHERE recipient_id = ").bind(recipient);
        sql.push(" AND seq > ").bind(after).push(" ORDER BY seq").limit(limit);
        sql.query().fetch_all(self.db.pool()).await?.iter().map(decode).collect()
    }

    /// The number of `recipient`'s notification `id`; NOT_FOUND when they have none with it.
    pub async fn sequence_of(&self, recipient: &str, id: &str) -> Result<i64, ApiError> {
        let mut sql = Sql::new("SELECT seq FROM notifications WHERE recipient_id = ");
        sql.bind(recipient).push(" AND id = ").bind(id);
        match sql.query().fetch_optional(self.db.pool()).await? {
            Some(row) => Ok(row.try_get("seq")?),
            None => Err(ApiError::NotFound(format!("notification {id} not found"))),
        }
    }

    /// `recipient`'s unread count and newest number.
    pub async fn unread(&self, recipient: &str) -> Result<(i64, i64), ApiError> {
        let mut sql = Sql::new("SELECT unread, last_seq FROM inboxes WHERE recipient_id = ");
        sql.bind(recipient);
        match sql.query().fetch_optional(self.db.pool()).await? {
            Some(row) => Ok((row.try_get("unread")?, row.try_get("last_seq")?)),
            None => Ok((0, 0)),
        }
    }

    /// Marks `ids` (all when `None`) of `recipient`'s notifications read. Returns how many were
    /// unread, and the unread count after. NOT_FOUND names an id the recipient has no
    /// notification with (nothing is marked then).
    pub async fn mark_read(&self, recipient: &str, ids: Option<&[String]>) -> Result<(i64, i64), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let mut lock = Sql::new("SELECT unread FROM inboxes WHERE recipient_id = ");
        lock.bind(recipient).push(self.db.for_update());
        if lock.query().fetch_optional(&mut *tx).await?.is_none() {
            return match ids.and_then(|ids| ids.first()) {
                Some(id) => Err(ApiError::NotFound(format!("notification {id} not found"))),
                None => Ok((0, 0)),
            };
        }
        if let Some(ids) = ids {
            let mut found = Sql::new("SELECT id FROM notifications WHERE recipient_id = ");
            found.bind(recipient).push(" AND ").push_in("id", ids);
            let found: Vec<String> =
                found.query().fetch_all(&mut *tx).await?.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
            if let Some(missing) = ids.iter().find(|id| !found.contains(id)) {
                return Err(ApiError::NotFound(format!("notification {missing} not found")));
            }
        }
        let mut mark = Sql::new("UPDATE notifications SET read_at = ");
        mark.bind(now_micros()).push(", rank = seq WHERE recipient_id = ").bind(recipient);
        mark.push(" AND rank >= ").literal(UNREAD);
        if let Some(ids) = ids {
            mark.push(" AND ").push_in("id", ids);
        }
        let marked = mark.query().execute(&mut *tx).await?.rows_affected() as i64;
        let mut count = Sql::new("UPDATE inboxes SET unread = unread - ");
        count.bind(marked).push(" WHERE recipient_id = ").bind(recipient).push(" RETURNING unread");
        let unread: i64 = count.query().fetch_one(&mut *tx).await?.try_get("unread")?;
        tx.commit().await?;
        Ok((marked, unread))
    }
}
