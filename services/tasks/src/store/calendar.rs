//! The calendar: meetings and calls with who takes part, a user's agenda (their events and the
//! open tasks due, from one index each), and the secret of each user's calendar feed.

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Edit, Sql, Tx, idempotency};
use crm_kit::time::{from_timestamp, now_micros, to_timestamp};
use crm_proto::tasks::v1::{CalendarEvent, Task, TaskStatus};
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{CREATED_EVENT, Store, TASK_COLUMNS, Viewer, decode_task};
use crate::domain::MAX_EVENT_MICROS;

const COLUMNS: &str = "id, kind, title, organizer_id, start_at, end_at, deal_id, created_at, updated_at, version, doc";

/// Most events and most tasks one agenda or feed holds.
pub const MAX_AGENDA_ITEMS: i64 = 1_000;

fn decode(row: &AnyRow, attendees: Vec<String>) -> Result<CalendarEvent, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut e = CalendarEvent::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored event {id} does not decode: {e}")))?;
    e.kind = row.try_get::<i64, _>("kind")? as i32;
    e.title = row.try_get("title")?;
    e.organizer_id = row.try_get("organizer_id")?;
    e.start_time = to_timestamp(row.try_get("start_at")?);
    e.end_time = to_timestamp(row.try_get("end_at")?);
    e.deal_id = row.try_get("deal_id")?;
    e.create_time = to_timestamp(row.try_get("created_at")?);
    e.update_time = to_timestamp(row.try_get("updated_at")?);
    e.etag = row.try_get::<i64, _>("version")?.to_string();
    e.attendee_ids = attendees;
    e.id = id;
    Ok(e)
}

fn doc(e: &CalendarEvent) -> Vec<u8> {
    CalendarEvent {
        description: e.description.clone(),
        location: e.location.clone(),
        time_zone: e.time_zone.clone(),
        customer: e.customer.clone(),
        ..CalendarEvent::default()
    }
    .encode_to_vec()
}

fn times(e: &CalendarEvent) -> (i64, i64) {
    (e.start_time.as_ref().map(from_timestamp).unwrap_or(0), e.end_time.as_ref().map(from_timestamp).unwrap_or(0))
}

fn customer_id(e: &CalendarEvent) -> &str {
    e.customer.as_ref().map_or("", |c| c.id.as_str())
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("event {id} not found"))
}

impl Viewer {
    /// ` AND (the viewer takes part OR the organizer is in scope)`: the events the viewer may see.
    fn push_events(&self, sql: &mut Sql, backend: crm_kit::db::Backend) {
        if let OwnerScope::All = self.scope {
            return;
        }
        sql.push(" AND (EXISTS (SELECT 1 FROM event_attendees a WHERE a.event_id = events.id AND a.user_id = ");
        sql.bind(self.id.as_str()).push(") OR 1=1");
        self.scope.push_condition(sql, backend, "organizer_id");
        sql.push(")");
    }
}

/// ` AND <alias>start_at` bounds of the events overlapping `[from, to)`: every event starts at
/// most 14 days before it ends, so the start's index bounds the walk on both sides.
fn push_overlapping(sql: &mut Sql, from: i64, to: i64) {
    sql.push(" AND a.start_at >= ").bind(from.saturating_sub(MAX_EVENT_MICROS));
    sql.push(" AND a.start_at < ").bind(to).push(" AND a.end_at > ").bind(from);
}

impl Store {
    async fn attendees_of(&self, tx: Option<&mut Tx>, ids: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new(
            "SELECT e.id AS event_id, a.user_id FROM events e JOIN event_attendees a ON a.event_id = e.id WHERE ",
        );
        sql.push_in("e.id", ids.iter().copied()).push(" AND a.user_id <> e.organizer_id ORDER BY a.user_id");
        let rows = match tx {
            Some(tx) => sql.query().fetch_all(&mut **tx).await?,
            None => sql.query().fetch_all(self.db.pool()).await?,
        };
        rows.iter().map(|r| Ok((r.try_get("event_id")?, r.try_get("user_id")?))).collect()
    }

    async fn with_attendees(&self, rows: &[AnyRow]) -> Result<Vec<CalendarEvent>, ApiError> {
        let ids: Vec<String> = rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let attendees = self.attendees_of(None, &refs).await?;
        rows.iter()
            .zip(&ids)
            .map(|(row, id)| {
                let mine = attendees.iter().filter(|(e, _)| e == id).map(|(_, u)| u.clone()).collect();
                decode(row, mine)
            })
            .collect()
    }

    /// Writes who takes part in `event` (the organizer included), replacing what was there.
    async fn write_attendees(tx: &mut Tx, event: &CalendarEvent) -> Result<(), ApiError> {
        let mut sql = Sql::new("DELETE FROM event_attendees WHERE event_id = ");
        sql.bind(event.id.as_str());
        sql.query().execute(&mut **tx).await?;
        let (start, end) = times(event);
        let mut people: Vec<&str> = vec![event.organizer_id.as_str()];
        people.extend(event.attendee_ids.iter().map(String::as_str));
        let mut sql = Sql::new("INSERT INTO event_attendees (event_id, user_id, start_at, end_at) VALUES ");
        sql.push_values(&people, |v, user| {
            v.bind(event.id.as_str()).bind(*user).bind(start).bind(end);
        });
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// The events of anyone taking part in `event` that overlap it (at most 100).
    async fn overlapping(tx: &mut Tx, event: &CalendarEvent) -> Result<Vec<String>, ApiError> {
        let (start, end) = times(event);
        let mut people: Vec<&str> = vec![event.organizer_id.as_str()];
        people.extend(event.attendee_ids.iter().map(String::as_str));
        let mut sql = Sql::new("SELECT DISTINCT a.event_id FROM event_attendees a WHERE ");
        sql.push_in("a.user_id", people).push(" AND a.event_id <> ").bind(event.id.as_str());
        push_overlapping(&mut sql, start, end);
        sql.push(" ORDER BY a.event_id LIMIT 100");
        let rows = sql.query().fetch_all(&mut **tx).await?;
        rows.iter().map(|r| Ok(r.try_get("event_id")?)).collect()
    }

    /// Plans `event` (normalised, its attendees and customer checked) for `organizer`.
    pub async fn create_event(
        &self,
        mut event: CalendarEvent,
        organizer: &str,
        request_id: &str,
        viewer: &Viewer,
    ) -> Result<CalendarEvent, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, organizer, request_id, CREATED_EVENT, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_event(&record_id, viewer).await;
        }
        event.id = id;
        event.organizer_id = organizer.to_string();
        let (start, end) = times(&event);
        let mut sql = Sql::new(
            "INSERT INTO events (id, kind, title, organizer_id, start_at, end_at, customer_id, deal_id, created_at, \
             updated_at, version, doc) VALUES ",
        );
        sql.push_values([&event], |v, e| {
            v.bind(e.id.as_str())
                .bind(i64::from(e.kind))
                .bind(e.title.as_str())
                .bind(e.organizer_id.as_str())
                .bind(start)
                .bind(end)
                .bind(customer_id(e))
                .bind(e.deal_id.as_str())
                .bind(now)
                .bind(now)
                .bind(1_i64)
                .bind(doc(e));
        });
        sql.query().execute(&mut *tx).await?;
        Self::write_attendees(&mut tx, &event).await?;
        event.overlapping_event_ids = Self::overlapping(&mut tx, &event).await?;
        tx.commit().await?;
        event.create_time = to_timestamp(now);
        event.update_time = to_timestamp(now);
        event.etag = "1".into();
        Ok(event)
    }

    fn select_event(&self, id: &str, viewer: &Viewer) -> Sql {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM events WHERE id = ").bind(id);
        viewer.push_events(&mut sql, self.db.backend());
        sql
    }

    /// The event `id` if the viewer may see it.
    pub async fn get_event(&self, id: &str, viewer: &Viewer) -> Result<CalendarEvent, ApiError> {
        let row = self.select_event(id, viewer).query().fetch_optional(self.db.pool()).await?;
        let row = row.ok_or_else(|| not_found(id))?;
        Ok(self.with_attendees(std::slice::from_ref(&row)).await?.remove(0))
    }

    /// Changes the event `id` under its row lock (see [`Store::edit_task`]); `change` gets the
    /// event as stored, attendees included.
    pub async fn edit_event(
        &self,
        id: &str,
        etag: &str,
        viewer: &Viewer,
        change: impl FnOnce(&mut CalendarEvent) -> Result<(), ApiError>,
    ) -> Result<CalendarEvent, ApiError> {
        let tx = self.db.begin_write().await?;
        let (mut edit, row) = Edit::lock(&self.db, tx, "events", "event", id, self.select_event(id, viewer)).await?;
        edit.require_etag(etag)?;
        let attendees = self.attendees_of(Some(edit.tx()), &[id]).await?.into_iter().map(|(_, u)| u).collect();
        let old = decode(&row, attendees)?;
        let mut event = old.clone();
        change(&mut event)?;
        if event == old {
            edit.abandon().await?;
            return Ok(old);
        }
        let now = now_micros();
        let (start, end) = times(&event);
        let mut set = Sql::new("kind = ");
        set.bind(i64::from(event.kind)).push(", title = ").bind(event.title.as_str());
        set.push(", start_at = ").bind(start).push(", end_at = ").bind(end);
        set.push(", customer_id = ").bind(customer_id(&event)).push(", deal_id = ").bind(event.deal_id.as_str());
        set.push(", doc = ").bind(doc(&event));
        let version = edit.save(set, now).await?;
        Self::write_attendees(edit.tx(), &event).await?;
        event.overlapping_event_ids = Self::overlapping(edit.tx(), &event).await?;
        edit.commit().await?;
        event.etag = version.to_string();
        event.update_time = to_timestamp(now);
        Ok(event)
    }

    /// Deletes the event `id` with who takes part.
    pub async fn delete_event(&self, id: &str, etag: &str, viewer: &Viewer) -> Result<(), ApiError> {
        let tx = self.db.begin_write().await?;
        let (mut edit, _) = Edit::lock(&self.db, tx, "events", "event", id, self.select_event(id, viewer)).await?;
        edit.require_etag(etag)?;
        let mut sql = Sql::new("DELETE FROM event_attendees WHERE event_id = ");
        sql.bind(id);
        sql.query().execute(&mut **edit.tx()).await?;
        edit.delete().await?;
        edit.commit().await
    }

    /// `user`'s events overlapping `[from, to)` by start time, and their open tasks due then
    /// by due time (at most [`MAX_AGENDA_ITEMS`] of each).
    pub async fn agenda(&self, user: &str, from: i64, to: i64) -> Result<(Vec<CalendarEvent>, Vec<Task>), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(
            "e.id, e.kind, e.title, e.organizer_id, e.start_at, e.end_at, e.deal_id, e.created_at, e.updated_at, ",
        );
        sql.push("e.version, e.doc FROM event_attendees a JOIN events e ON e.id = a.event_id WHERE a.user_id = ");
        sql.bind(user);
        push_overlapping(&mut sql, from, to);
        sql.push(" ORDER BY a.start_at, a.event_id").limit(MAX_AGENDA_ITEMS);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let events = self.with_attendees(&rows).await?;
        let mut sql = Sql::new("SELECT ");
        sql.push(TASK_COLUMNS).push(" FROM tasks WHERE assignee_id = ").bind(user);
        sql.push(" AND status = ").bind(TaskStatus::Open as i64);
        sql.push(" AND due_at >= ").bind(from).push(" AND due_at < ").bind(to);
        sql.push(" ORDER BY due_at, id").limit(MAX_AGENDA_ITEMS);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let tasks = rows.iter().map(decode_task).collect::<Result<_, _>>()?;
        Ok((events, tasks))
    }

    /// Makes `user`'s calendar feed answer to the token whose SHA-256 is `token_hash`, replacing
    /// any earlier one; when it was made.
    pub async fn set_feed(&self, user: &str, token_hash: &str) -> Result<i64, ApiError> {
        let now = now_micros();
        let mut sql = Sql::new("INSERT INTO calendar_feeds (user_id, token_hash, created_at) VALUES ");
        sql.push_values([()], |v, ()| {
            v.bind(user).bind(token_hash).bind(now);
        });
        sql.push(
            " ON CONFLICT (user_id) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at",
        );
        sql.query().execute(self.db.pool()).await?;
        Ok(now)
    }

    /// Revokes `user`'s feed; whether there was one.
    pub async fn revoke_feed(&self, user: &str) -> Result<bool, ApiError> {
        let mut sql = Sql::new("DELETE FROM calendar_feeds WHERE user_id = ");
        sql.bind(user);
        Ok(sql.query().execute(self.db.pool()).await?.rows_affected() > 0)
    }

    /// Whose feed answers to the token whose SHA-256 is `token_hash`.
    pub async fn feed_owner(&self, token_hash: &str) -> Result<Option<String>, ApiError> {
        let mut sql = Sql::new("SELECT user_id FROM calendar_feeds WHERE token_hash = ");
        sql.bind(token_hash);
        Ok(match sql.query().fetch_optional(self.db.pool()).await? {
            Some(row) => Some(row.try_get("user_id")?),
            None => None,
        })
    }
}
