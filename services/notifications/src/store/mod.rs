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

pub use deliveries::{
    Attempt, AttemptResult, CUSTOMER_MESSAGE, CustomerDraft, DeliveryFilter, NewDelivery, Start, customer_address,
};
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

    /// Puts `items` into their recipients' inboxes in `tx` and announces each
    /// (`NotificationCreated`). Each recipient's new notifications take the next numbers of
    /// their inbox, given under the lock of its row (taken in recipient order, so concurrent
    /// batches never deadlock): numbers follow commit order. Returns, per item, the
    /// notification made, or `None` when that recipient already had one of that event.
    pub async fn add_all(&self, tx: &mut Tx, items: &[NewNotification]) -> Result<Vec<Option<Notification>>, ApiError> {
        let mut out: Vec<Option<Notification>> = vec![None; items.len()];
        if items.is_empty() {
            return Ok(out);
        }
        let mut events: Vec<&str> = items.iter().map(|n| n.event_id.as_str()).collect();
        events.sort_unstable();
        events.dedup();
        let mut there = std::collections::HashSet::new();
        for chunk in events.chunks(500) {
            let mut sql = Sql::new("SELECT event_id, recipient_id FROM notifications WHERE ");
            sql.push_in("event_id", chunk.iter().copied());
            for row in sql.query().fetch_all(&mut **tx).await? {
                there.insert((row.try_get::<String, _>("event_id")?, row.try_get::<String, _>("recipient_id")?));
            }
        }
        let mut fresh: Vec<usize> = Vec::new();
        for (i, n) in items.iter().enumerate() {
            if there.insert((n.event_id.clone(), n.recipient_id.clone())) {
                fresh.push(i);
            }
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        let mut counts: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for &i in &fresh {
            *counts.entry(items[i].recipient_id.as_str()).or_default() += 1;
        }
        let mut next: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        let counts: Vec<(&str, i64)> = counts.into_iter().collect();
        for chunk in counts.chunks(500) {
            let mut head = Sql::new("INSERT INTO inboxes (recipient_id, last_seq, unread) VALUES ");
            head.push_values(chunk, |v, (recipient, n)| {
                v.bind(*recipient).bind(*n).bind(*n);
            });
            head.push(
                " ON CONFLICT (recipient_id) DO UPDATE SET last_seq = inboxes.last_seq + excluded.last_seq, \
                 unread = inboxes.unread + excluded.unread RETURNING recipient_id, last_seq",
            );
            for row in head.query().fetch_all(&mut **tx).await? {
                let recipient: String = row.try_get("recipient_id")?;
                let last: i64 = row.try_get("last_seq")?;
                let n = chunk.iter().find(|(r, _)| *r == recipient).map_or(0, |(_, n)| *n);
                next.insert(recipient, last - n + 1);
            }
        }
        let now = now_micros();
        let mut made: Vec<(usize, Notification)> = Vec::with_capacity(fresh.len());
        for &i in &fresh {
            let n = &items[i];
            let seq = next.get_mut(&n.recipient_id).ok_or_else(|| ApiError::Internal("inbox row missing".into()))?;
            made.push((
                i,
                Notification {
                    id: crm_kit::id::new(),
                    sequence: *seq,
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
                },
            ));
            *seq += 1;
        }
        for chunk in made.chunks(400) {
            let mut insert = Sql::new("INSERT INTO notifications (recipient_id, ");
            insert.push(COLUMNS).push(") VALUES ");
            insert.push_values(chunk, |v, (i, n)| {
                v.bind(items[*i].recipient_id.as_str()).bind(n.id.as_str()).bind(n.sequence).bind(n.sequence + UNREAD);
                v.bind(n.event_id.as_str()).bind(n.event_type.as_str()).bind(n.source.as_str());
                v.bind(n.subject_id.as_str()).bind(n.actor_id.as_str()).bind(n.title.as_str()).bind(n.body.as_str());
                v.bind(now).bind(0_i64);
            });
            insert.push(" ON CONFLICT (event_id, recipient_id) DO NOTHING");
            if insert.query().execute(&mut **tx).await?.rows_affected() != chunk.len() as u64 {
                // Another transaction put one of these in meanwhile: this one's numbers are off.
                return Err(ApiError::Aborted("a notification of these events was added meanwhile".into()));
            }
        }
        let announcements: Vec<_> = made
            .iter()
            .map(|(i, n)| {
                let created = NotificationCreated {
                    notification_id: n.id.clone(),
                    recipient_id: items[*i].recipient_id.clone(),
                    sequence: n.sequence,
                    event_type: n.event_type.clone(),
                };
                crm_kit::events::envelope::envelope(crate::SOURCE, &items[*i].recipient_id, &n.actor_id, &created)
            })
            .collect();
        self.outbox.append_all(tx, &announcements).await?;
        for (i, n) in made {
            out[i] = Some(n);
        }
        Ok(out)
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
