//! The job that makes a delivery outside the inbox (e-mail, SMS, webhook): one leased
//! external job per delivery (`crm_kit::jobs`), whatever its channel.
//!
//! At most one delivery: each attempt is recorded as under way before anything leaves. An
//! attempt that surely did not reach the receiver (refused for now, no connection) is tried
//! again on the retry schedule, with jitter; one refused for good ends the delivery. When the
//! outcome is unknown — the connection broke or timed out mid-way, or the sender was killed (the
//! next runner finds the attempt still under way) — the receiver may have it, so the delivery is
//! parked as dead with the reason rather than sent twice; an administrator retries it.

use std::sync::LazyLock;
use std::time::Duration;

use crm_kit::auth::RemoteDirectory;
use crm_kit::db::Db;
use crm_kit::events::HandlerError;
use crm_kit::jobs::{ExternalJobHandler, Job, Next};
use crm_kit::metrics::{HistogramFamily, duration_histogram};
use crm_kit::peer::Peer;
use crm_kit::time::now_micros;
use crm_proto::auth::v1::User;
use crm_proto::contacts::v1::GetPersonRequest;
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::notifications::v1::Channel;
use futures_util::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Unit;
use serde_json::Value;

use crate::email::EmailSender;
use crate::render::Rendered;
use crate::sms::SmsSender;
use crate::store::{Attempt, AttemptResult, CUSTOMER_MESSAGE, CustomerDraft, Start, Store};
use crate::templates;
use crate::webhooks::WebhookSender;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    /// `email`, `sms` or `webhook`.
    channel: &'static str,
    /// `sent`; `retried` (not delivered, tried again later); `dead` (not delivered, not tried
    /// again: refused for good, or the last attempt); `unknown` (the receiver may have it, not
    /// sent again by itself).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: &'static str,
}

/// Delivery attempts outside the inbox, on this process's `/metrics`.
struct DeliveryMetrics {
    attempts: Family<AttemptLabels, Counter>,
    duration: HistogramFamily<ChannelLabels>,
}

static METRICS: LazyLock<DeliveryMetrics> = LazyLock::new(|| {
    let metrics =
        DeliveryMetrics { attempts: Family::default(), duration: Family::new_with_constructor(duration_histogram) };
    crm_kit::metrics::register(
        "crm_notifications_delivery_attempts",
        "Delivery attempts (e-mail, SMS, webhooks) by channel and outcome",
        None,
        metrics.attempts.clone(),
    );
    crm_kit::metrics::register(
        "crm_notifications_delivery_attempt_duration",
        "How long a delivery attempt took (the receiver's answer included)",
        Some(Unit::Seconds),
        metrics.duration.clone(),
    );
    metrics
});

fn channel_label(channel: i32) -> &'static str {
    match Channel::try_from(channel) {
        Ok(Channel::Email) => "email",
        Ok(Channel::Sms) => "sms",
        Ok(Channel::Webhook) => "webhook",
        _ => "other",
    }
}

/// The senders of the channels this process can deliver to.
#[derive(Default)]
pub struct Senders {
    pub email: Option<EmailSender>,
    pub sms: Option<SmsSender>,
    pub webhooks: Option<WebhookSender>,
}

pub struct DeliveryJob {
    store: Store,
    senders: Senders,
    /// Pauses after each failed attempt; one attempt more than pauses.
    schedule: Vec<Duration>,
    /// Where a customer's do-not-contact flag is checked again before a message goes.
    contacts: Option<Peer>,
}

impl DeliveryJob {
    pub fn new(store: Store, senders: Senders, schedule: Vec<Duration>) -> DeliveryJob {
        // Zero series of each channel this replica delivers to, from the start.
        let configured = [
            (senders.email.is_some(), Channel::Email),
            (senders.sms.is_some(), Channel::Sms),
            (senders.webhooks.is_some(), Channel::Webhook),
        ];
        for channel in configured.into_iter().filter(|(on, _)| *on).map(|(_, c)| channel_label(c as i32)) {
            let _ = METRICS.duration.get_or_create(&ChannelLabels { channel });
            for outcome in ["sent", "retried", "dead", "unknown"] {
                let _ = METRICS.attempts.get_or_create(&AttemptLabels { channel, outcome });
            }
        }
        DeliveryJob { store, senders, schedule, contacts: None }
    }

    /// Checks customers with the contacts service (as the suite's service account) just before a
    /// message to one of them goes.
    pub fn with_contacts(mut self, contacts: Peer) -> DeliveryJob {
        self.contacts = Some(contacts);
        self
    }

    /// Whether the customer a message is for still exists and may be contacted.
    async fn customer_reachable(&self, attempt: &Attempt) -> Result<(), AttemptResult> {
        let Some(contacts) = &self.contacts else { return Ok(()) };
        let draft = customer_draft(attempt)?;
        let channel =
            contacts.as_service().await.map_err(|e| AttemptResult::failed(false, format!("contacts service: {e}")))?;
        let request = GetPersonRequest { id: draft.person_id.clone() };
        match ContactsServiceClient::new(channel).get_person(request).await {
            Ok(person) if person.get_ref().do_not_contact => {
                Err(AttemptResult::failed(true, "the customer is marked do-not-contact since the message was written"))
            }
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(AttemptResult::failed(true, "the customer was deleted"))
            }
            Err(status) => {
                Err(AttemptResult::failed(false, format!("contacts service GetPerson: {}", status.message())))
            }
        }
    }

    async fn attempt(&self, attempt: &Attempt, lease_until: i64) -> AttemptResult {
        if attempt.event_type == CUSTOMER_MESSAGE
            && let Err(refused) = self.customer_reachable(attempt).await
        {
            return refused;
        }
        let missing = |what: &str| AttemptResult::failed(false, format!("{what} is not configured on this replica"));
        match Channel::try_from(attempt.channel) {
            Ok(Channel::Email) => match &self.senders.email {
                Some(sender) => sender.attempt(attempt, lease_until).await,
                None => missing("e-mail (--smtp-host)"),
            },
            Ok(Channel::Sms) => match &self.senders.sms {
                Some(sender) => sender.attempt(attempt).await,
                None => missing("SMS (--sms-url)"),
            },
            Ok(Channel::Webhook) => match &self.senders.webhooks {
                Some(sender) => sender.attempt(attempt).await,
                None => missing("webhooks"),
            },
            _ => AttemptResult::failed(true, format!("channel {} is not delivered by jobs", attempt.channel)),
        }
    }

    /// When to try again after failed attempt `round` of this round; `None`: never.
    fn retry_at(&self, round: i64) -> Option<i64> {
        let pause = *self.schedule.get(usize::try_from(round - 1).ok()?)?;
        let jitter = rand::random_range(0..=pause.as_micros() as u64 / 10);
        Some(now_micros() + pause.as_micros() as i64 + jitter as i64)
    }
}

impl ExternalJobHandler for DeliveryJob {
    fn run<'a>(&'a self, _db: &'a Db, job: &'a Job) -> BoxFuture<'a, Result<Next, HandlerError>> {
        Box::pin(async move {
            let id = String::from_utf8_lossy(&job.payload).to_string();
            let attempt = match self.store.start_attempt(&id).await? {
                Start::Go(attempt) => attempt,
                Start::Finished => return Ok(Next::Done),
                Start::Interrupted { number } => {
                    tracing::error!(delivery = %id, attempt = number,
                        "a delivery attempt stopped before its outcome was known; parked as dead, not resent");
                    return Ok(Next::Done);
                }
            };
            let started = std::time::Instant::now();
            let mut result = self.attempt(&attempt, job.lease_until()).await;
            result.latency_micros = started.elapsed().as_micros() as i64;
            if result.unknown {
                result.error =
                    format!("outcome unknown, the receiver may have it; not sent again by itself: {}", result.error);
            }
            let retry_at =
                if result.sent || result.permanent || result.unknown { None } else { self.retry_at(attempt.round) };
            let channel = channel_label(attempt.channel);
            let outcome = match (result.sent, result.unknown, retry_at.is_some()) {
                (true, _, _) => "sent",
                (_, true, _) => "unknown",
                (_, _, true) => "retried",
                _ => "dead",
            };
            METRICS.attempts.get_or_create(&AttemptLabels { channel, outcome }).inc();
            METRICS.duration.get_or_create(&ChannelLabels { channel }).observe(started.elapsed().as_secs_f64());
            if result.sent {
                tracing::debug!(delivery = %id, channel = attempt.channel, attempt = attempt.number, "delivered");
            } else {
                tracing::warn!(delivery = %id, channel = attempt.channel, attempt = attempt.number,
                    error = %result.error, retry = retry_at.is_some(), "not delivered");
            }
            // The outcome must be recorded: a delivery left under way is parked as interrupted.
            let mut tries = 0;
            loop {
                match self.store.finish_attempt(&attempt, &result, retry_at).await {
                    Ok(()) => break,
                    Err(err) if tries < 5 => {
                        tries += 1;
                        tracing::warn!(delivery = %id, error = %err, "recording a delivery attempt failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(retry_at.map_or(Next::Done, Next::RetryAt))
        })
    }
}

/// The delivery's recipient as the organisation has them now; a failed attempt when they are
/// gone, deactivated or auth cannot be asked.
pub async fn recipient_user(directory: &RemoteDirectory, id: &str) -> Result<User, AttemptResult> {
    match directory.user(id).await {
        Ok(Some(user)) if user.active => Ok(user),
        Ok(Some(_)) => Err(AttemptResult::failed(true, "the recipient is deactivated")),
        Ok(None) => Err(AttemptResult::failed(true, "the recipient is no longer a user")),
        Err(err) => Err(AttemptResult::failed(false, format!("looking the recipient up: {err}"))),
    }
}

/// The delivery rendered with the template in use for the recipient's language on `channel`;
/// the error says whether another attempt could help.
pub async fn render_for(
    store: &Store,
    attempt: &Attempt,
    channel: Channel,
    recipient: Value,
    default_locale: &str,
) -> Result<Rendered, (bool, String)> {
    let prefs = store.prefs(&attempt.recipient_id).await.map_err(|e| (false, e.to_string()))?;
    let mut context: Value =
        serde_json::from_str(&attempt.variables).map_err(|e| (true, format!("stored variables: {e}")))?;
    context["recipient"] = recipient;
    let mut conn = store.db().pool().acquire().await.map_err(|e| (false, e.to_string()))?;
    let chosen = templates::choose(store, &mut conn, &attempt.event_type, channel, &prefs.locale, default_locale)
        .await
        .map_err(|e| (false, e.to_string()))?
        .ok_or_else(|| (true, format!("no {channel:?} template for {}", attempt.event_type)))?;
    drop(conn);
    templates::render_chosen(&chosen, &attempt.event_type, channel, &context)
        .map_err(|e| (true, format!("template: {e}")))
}

/// A message to a customer, as written.
pub fn customer_draft(attempt: &Attempt) -> Result<CustomerDraft, AttemptResult> {
    serde_json::from_str(&attempt.variables)
        .map_err(|e| AttemptResult::failed(true, format!("stored customer message: {e}")))
}
