//! Deliveries outside the inbox: one row per (event, recipient, channel), sent by a leased job,
//! each attempt logged. An attempt is recorded as under way before anything leaves, so that a
//! sender that died mid-way is recognised by the next one: that delivery is parked as dead, not
//! sent again by itself (at most one visible delivery), until an administrator retries it.

use crm_kit::ApiError;
use crm_kit::db::{Sql, Tx};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::notifications::v1::{
    Channel, CustomerMessage, CustomerMessageSent, Delivery, DeliveryAttempt, DeliveryState,
};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;

/// The job kind that sends a delivery (its key: the delivery's id).
pub const JOB_KIND: &str = "notifications.delivery";

/// The event type of deliveries that are messages to customers (SendCustomerMessage): their
/// variables are a [`CustomerDraft`], already rendered.
pub const CUSTOMER_MESSAGE: &str = "crm.notifications.v1.CustomerMessageSent";

/// Where a message to `person` on `channel` goes: their first e-mail address, or their first
/// phone number (in E.164 when known) for a text; `None` when they have none.
pub fn customer_address(person: &crm_proto::contacts::v1::Person, channel: Channel) -> Option<String> {
    match channel {
        Channel::Email => person.emails.first().map(|e| e.address.clone()),
        _ => person.phones.first().map(|p| if p.e164.is_empty() { p.number.clone() } else { p.e164.clone() }),
    }
    .filter(|a| !a.trim().is_empty())
}

/// A message to a customer as written, kept as the delivery's variables.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CustomerDraft {
    pub person_id: String,
    pub to: String,
    pub to_name: String,
    pub subject: String,
    pub body: String,
    pub sent_by: String,
}

/// Newest first.
pub const ORDER: Order = Order::newest("created_at");

const COLUMNS: &str = "id, notification_id, event_id, event_type, recipient_id, channel, state, variables, address, \
                       subject, round_attempts, next_attempt_at, created_at, sent_at, last_error";

/// A delivery about to be made.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub notification_id: String,
    pub event_id: String,
    pub event_type: String,
    pub recipient_id: String,
    pub channel: i32,
    /// The template context without the recipient's details (JSON).
    pub variables: String,
}

/// What a sender works from.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub delivery_id: String,
    pub number: i64,
    /// Attempts since the delivery was created or last retried, this one included.
    pub round: i64,
    pub recipient_id: String,
    pub channel: i32,
    pub event_type: String,
    pub variables: String,
}

/// Whether an attempt may go ahead.
#[derive(Debug, Clone)]
pub enum Start {
    Go(Attempt),
    /// Sent or dead already: nothing to do.
    Finished,
    /// The last attempt never recorded its outcome: parked as dead (attempt `number`).
    Interrupted {
        number: i64,
    },
}

/// What an attempt came to.
#[derive(Debug, Clone, Default)]
pub struct AttemptResult {
    pub sent: bool,
    /// A failure no retry can fix (no address, a refused recipient).
    pub permanent: bool,
    /// The receiver may have it (the connection broke mid-way): not retried by itself.
    pub unknown: bool,
    pub latency_micros: i64,
    pub response_code: i32,
    pub error: String,
    pub address: String,
    pub subject: String,
}

impl AttemptResult {
    /// Not delivered, for `error`; `permanent`: no retry can help.
    pub fn failed(permanent: bool, error: impl Into<String>) -> AttemptResult {
        AttemptResult { permanent, error: error.into(), ..AttemptResult::default() }
    }
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub state: Option<i32>,
    pub channel: Option<i32>,
    pub recipient_id: Option<String>,
    pub notification_id: Option<String>,
}

fn state_of(row: &AnyRow) -> Result<i32, ApiError> {
    Ok(i32::try_from(row.try_get::<i64, _>("state")?).unwrap_or_default())
}

fn decode(row: &AnyRow) -> Result<Delivery, ApiError> {
    Ok(Delivery {
        id: row.try_get("id")?,
        notification_id: row.try_get("notification_id")?,
        recipient_id: row.try_get("recipient_id")?,
        channel: i32::try_from(row.try_get::<i64, _>("channel")?).unwrap_or_default(),
        event_type: row.try_get("event_type")?,
        event_id: row.try_get("event_id")?,
        state: state_of(row)?,
        address: row.try_get("address")?,
        subject: row.try_get("subject")?,
        attempts: Vec::new(),
        create_time: to_timestamp(row.try_get("created_at")?),
        next_attempt_time: if state_of(row)? == DeliveryState::Pending as i32 {
            to_timestamp(row.try_get("next_attempt_at")?)
        } else {
            None
        },
        sent_time: to_timestamp(row.try_get("sent_at")?),
        last_error: row.try_get("last_error")?,
    })
}

impl Store {
    /// Creates the deliveries (but those whose event already has one for the same recipient and
    /// channel) and their jobs, due now, in `tx`. Returns the ids of those created.
    pub async fn add_deliveries(&self, tx: &mut Tx, items: &[NewDelivery]) -> Result<Vec<String>, ApiError> {
        let now = now_micros();
        let mut created = Vec::new();
        for chunk in items.chunks(400) {
            let mut sql = Sql::new(
                "INSERT INTO deliveries (id, notification_id, event_id, event_type, recipient_id, channel, state, \
                 variables, next_attempt_at, created_at) VALUES ",
            );
            sql.push_values(chunk, |v, d| {
                v.bind(crm_kit::id::new()).bind(d.notification_id.as_str()).bind(d.event_id.as_str());
                v.bind(d.event_type.as_str()).bind(d.recipient_id.as_str()).bind(i64::from(d.channel));
                v.bind(DeliveryState::Pending as i64).bind(d.variables.as_str()).bind(now).bind(now);
            });
            sql.push(" ON CONFLICT (event_id, recipient_id, channel) DO NOTHING RETURNING id");
            for row in sql.query().fetch_all(&mut **tx).await? {
                created.push(row.try_get::<String, _>("id")?);
            }
        }
        let jobs: Vec<(&str, i64, &[u8])> = created.iter().map(|id| (id.as_str(), now, id.as_bytes())).collect();
        crm_kit::jobs::schedule_all(tx, JOB_KIND, &jobs).await?;
        Ok(created)
    }

    /// [`Store::add_deliveries`] of one delivery: its id when created.
    pub async fn add_delivery(&self, tx: &mut Tx, d: &NewDelivery) -> Result<Option<String>, ApiError> {
        Ok(self.add_deliveries(tx, std::slice::from_ref(d)).await?.pop())
    }

    /// Records that an attempt at delivery `id` starts, before anything is sent; or tells why
    /// none may.
    pub async fn start_attempt(&self, id: &str) -> Result<Start, ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        let mut sql = Sql::new(
            "SELECT state, round_attempts, recipient_id, channel, event_type, variables FROM deliveries WHERE id = ",
        );
        sql.bind(id).push(self.db.for_update());
        let Some(row) = sql.query().fetch_optional(&mut *tx).await? else {
            return Ok(Start::Finished);
        };
        let mut last = Sql::new("SELECT COALESCE(MAX(number), 0) AS n FROM delivery_attempts WHERE delivery_id = ");
        last.bind(id);
        let last: i64 = last.query().fetch_one(&mut *tx).await?.try_get("n")?;
        let state = state_of(&row)?;
        if state == DeliveryState::Sending as i32 {
            let error = format!(
                "attempt {last} stopped before its outcome was known; not sent again by itself (at most one \
                 delivery): retry it to send it again"
            );
            let mut attempt = Sql::new("UPDATE delivery_attempts SET outcome = 'interrupted', error = ");
            attempt.bind(error.as_str()).push(" WHERE delivery_id = ").bind(id).push(" AND number = ").bind(last);
            attempt.query().execute(&mut *tx).await?;
            let mut park = Sql::new("UPDATE deliveries SET state = ");
            park.bind(DeliveryState::Dead as i64).push(", last_error = ").bind(error.as_str());
            park.push(" WHERE id = ").bind(id);
            park.query().execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(Start::Interrupted { number: last });
        }
        if state != DeliveryState::Pending as i32 {
            return Ok(Start::Finished);
        }
        let number = last + 1;
        let round: i64 = row.try_get::<i64, _>("round_attempts")? + 1;
        let mut begin = Sql::new("UPDATE deliveries SET state = ");
        begin.bind(DeliveryState::Sending as i64).push(", round_attempts = ").bind(round);
        begin.push(" WHERE id = ").bind(id);
        begin.query().execute(&mut *tx).await?;
        let mut attempt = Sql::new("INSERT INTO delivery_attempts (delivery_id, number, started_at, outcome) VALUES (");
        attempt.bind(id).push(", ").bind(number).push(", ").bind(now).push(", 'sending')");
        attempt.query().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Start::Go(Attempt {
            delivery_id: id.to_string(),
            number,
            round,
            recipient_id: row.try_get("recipient_id")?,
            channel: i32::try_from(row.try_get::<i64, _>("channel")?).unwrap_or_default(),
            event_type: row.try_get("event_type")?,
            variables: row.try_get("variables")?,
        }))
    }

    /// Records an attempt's outcome: sent; failed, to be tried again at `retry_at`; or dead
    /// (`retry_at` `None`).
    pub async fn finish_attempt(
        &self,
        attempt: &Attempt,
        result: &AttemptResult,
        retry_at: Option<i64>,
    ) -> Result<(), ApiError> {
        let now = now_micros();
        let error: String = result.error.chars().take(2000).collect();
        let mut tx = self.db.begin_write().await?;
        let outcome = match (result.sent, result.unknown) {
            (true, _) => "sent",
            (false, true) => "unknown",
            (false, false) => "failed",
        };
        let mut log = Sql::new("UPDATE delivery_attempts SET outcome = ");
        log.bind(outcome).push(", latency_micros = ").bind(result.latency_micros);
        log.push(", response_code = ").bind(i64::from(result.response_code)).push(", error = ").bind(error.as_str());
        log.push(" WHERE delivery_id = ")
            .bind(attempt.delivery_id.as_str())
            .push(" AND number = ")
            .bind(attempt.number);
        log.query().execute(&mut *tx).await?;
        let state = match (result.sent, retry_at) {
            (true, _) => DeliveryState::Sent,
            (false, Some(_)) => DeliveryState::Pending,
            (false, None) => DeliveryState::Dead,
        };
        let mut sql = Sql::new("UPDATE deliveries SET state = ");
        sql.bind(state as i64).push(", address = ").bind(result.address.as_str());
        sql.push(", subject = ").bind(result.subject.as_str()).push(", last_error = ").bind(error.as_str());
        if result.sent {
            sql.push(", sent_at = ").bind(now);
        }
        if let Some(at) = retry_at {
            sql.push(", next_attempt_at = ").bind(at);
        }
        sql.push(" WHERE id = ").bind(attempt.delivery_id.as_str());
        sql.query().execute(&mut *tx).await?;
        if result.sent && attempt.event_type == CUSTOMER_MESSAGE {
            // For the customer's timeline, with the outcome.
            let draft: CustomerDraft = serde_json::from_str(&attempt.variables)
                .map_err(|e| ApiError::Internal(format!("stored customer message: {e}")))?;
            let channel = if attempt.channel == Channel::Sms as i32 { "sms" } else { "email" };
            let event = CustomerMessageSent {
                message_id: attempt.delivery_id.clone(),
                person_id: draft.person_id.clone(),
                channel: channel.into(),
                address: draft.to,
                subject: draft.subject,
                body: draft.body,
                sent_by: draft.sent_by.clone(),
            };
            self.outbox.append(&mut tx, &draft.person_id, &draft.sent_by, &event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Queues a message to a customer in `tx`, unless one with the same `key` is queued already.
    pub async fn queue_customer_message(
        &self,
        tx: &mut Tx,
        key: &str,
        channel: i32,
        draft: &CustomerDraft,
    ) -> Result<(), ApiError> {
        let new = NewDelivery {
            notification_id: String::new(),
            event_id: key.to_string(),
            event_type: CUSTOMER_MESSAGE.to_string(),
            recipient_id: draft.person_id.clone(),
            channel,
            variables: serde_json::to_string(draft).map_err(|e| ApiError::Internal(e.to_string()))?,
        };
        if let Some(id) = self.add_delivery(tx, &new).await? {
            let mut sql = Sql::new("UPDATE deliveries SET address = ");
            sql.bind(draft.to.as_str())
                .push(", subject = ")
                .bind(draft.subject.as_str())
                .push(" WHERE id = ")
                .bind(id.as_str());
            sql.query().execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Queues a message to a customer; with the same `key` (from the caller's request id) as an
    /// earlier one, that one is returned instead.
    pub async fn add_customer_message(
        &self,
        key: &str,
        channel: i32,
        draft: &CustomerDraft,
    ) -> Result<CustomerMessage, ApiError> {
        let mut tx = self.db.begin_write().await?;
        self.queue_customer_message(&mut tx, key, channel, draft).await?;
        tx.commit().await?;
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM deliveries WHERE event_id = ").bind(key);
        sql.push(" AND recipient_id = ")
            .bind(draft.person_id.as_str())
            .push(" AND channel = ")
            .bind(i64::from(channel));
        let row = sql.query().fetch_one(self.db.pool()).await?;
        let delivery = decode(&row)?;
        let stored: CustomerDraft = serde_json::from_str(&row.try_get::<String, _>("variables")?)
            .map_err(|e| ApiError::Internal(format!("stored customer message: {e}")))?;
        Ok(CustomerMessage {
            id: delivery.id,
            person_id: stored.person_id,
            channel: delivery.channel,
            address: stored.to,
            subject: stored.subject,
            body: stored.body,
            state: delivery.state,
            create_time: delivery.create_time,
        })
    }

    /// One page of deliveries, newest first, each with its attempts.
    pub async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: &Page,
    ) -> Result<(Vec<Delivery>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM deliveries WHERE 1 = 1");
        if let Some(state) = filter.state {
            sql.push(" AND state = ").literal(i64::from(state));
        }
        if let Some(channel) = filter.channel {
            sql.push(" AND channel = ").literal(i64::from(channel));
        }
        if let Some(recipient) = &filter.recipient_id {
            sql.push(" AND recipient_id = ").bind(recipient.as_str());
        }
        if let Some(notification) = &filter.notification_id {
            sql.push(" AND notification_id = ").bind(notification.as_str());
        }
        page.push_keyset(&mut sql, &ORDER);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let (mut deliveries, next) = page.finish(&rows, &ORDER, decode)?;
        if deliveries.is_empty() {
            return Ok((deliveries, next));
        }
        let mut attempts = Sql::new(
            "SELECT delivery_id, number, started_at, latency_micros, outcome, response_code, error \
             FROM delivery_attempts WHERE ",
        );
        attempts.push_in("delivery_id", deliveries.iter().map(|d| d.id.as_str())).push(" ORDER BY delivery_id, number");
        for row in attempts.query().fetch_all(self.db.pool()).await? {
            let delivery: String = row.try_get("delivery_id")?;
            if let Some(d) = deliveries.iter_mut().find(|d| d.id == delivery) {
                d.attempts.push(DeliveryAttempt {
                    number: i32::try_from(row.try_get::<i64, _>("number")?).unwrap_or(i32::MAX),
                    start_time: to_timestamp(row.try_get("started_at")?),
                    latency_micros: row.try_get("latency_micros")?,
                    outcome: row.try_get("outcome")?,
                    response_code: i32::try_from(row.try_get::<i64, _>("response_code")?).unwrap_or_default(),
                    error: row.try_get("error")?,
                });
            }
        }
        Ok((deliveries, next))
    }

    /// Sends dead deliveries again, from the start of the retry schedule: those in `ids`, or
    /// every dead one on `channel`. Returns how many. Ids that are not dead deliveries are
    /// NOT_FOUND (nothing is retried then).
    pub async fn retry_deliveries(&self, ids: &[String], channel: Option<i32>) -> Result<i64, ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        let mut select = Sql::new("SELECT id FROM deliveries WHERE state = ");
        select.literal(DeliveryState::Dead as i64);
        if !ids.is_empty() {
            select.push(" AND ").push_in("id", ids);
        }
        if let Some(channel) = channel {
            select.push(" AND channel = ").literal(i64::from(channel));
        }
        select.push(self.db.for_update());
        let dead: Vec<String> =
            select.query().fetch_all(&mut *tx).await?.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        if let Some(missing) = ids.iter().find(|id| !dead.contains(id)) {
            return Err(ApiError::NotFound(format!("no dead delivery {missing}")));
        }
        for chunk in dead.chunks(500) {
            let mut sql = Sql::new("UPDATE deliveries SET state = ");
            sql.bind(DeliveryState::Pending as i64).push(", round_attempts = 0, next_attempt_at = ").bind(now);
            sql.push(" WHERE ").push_in("id", chunk);
            sql.query().execute(&mut *tx).await?;
            for id in chunk {
                crm_kit::jobs::schedule(&mut tx, JOB_KIND, Some(id), now, id.as_bytes()).await?;
            }
        }
        tx.commit().await?;
        Ok(dead.len() as i64)
    }
}
