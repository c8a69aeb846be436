//! Events in, notifications out: the notifications service's consumer of other services'
//! events. Every event goes to the webhooks subscribed to its type. For an event type of the
//! catalog it also finds the recipients (rules over the event's
//! fields, a supervisor through the auth service), each recipient's channels (their choice,
//! else the event type's default; in-app when mandatory), puts the notification into their
//! inbox and creates a delivery per outside channel — all in the consumer's transaction, so a
//! redelivered event has no second effect, and unique keys make it impossible anyway.

use std::sync::Arc;

use crm_kit::auth::RemoteDirectory;
use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_kit::time::format_rfc3339;
use crm_proto::notifications::v1::Channel;
use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::catalog::{self, EventSpec, Recipient};
use crate::render::{self, Context};
use crate::store::{NewDelivery, NewNotification, Store};
use crate::templates;

/// What the intake needs to know of the role's settings.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    pub default_locale: String,
    /// Whether e-mail can be sent (an SMTP server is configured).
    pub email: bool,
    /// Whether text messages can be sent (an SMS provider is configured).
    pub sms: bool,
}

pub struct Intake {
    store: Store,
    directory: Option<Arc<RemoteDirectory>>,
    settings: IntakeSettings,
}

impl Intake {
    /// `directory` resolves supervisors; without it a supervisor rule finds nobody (logged).
    pub fn new(store: Store, directory: Option<Arc<RemoteDirectory>>, settings: IntakeSettings) -> Intake {
        Intake { store, directory, settings }
    }

    async fn recipients(&self, spec: &EventSpec, event: &Value, actor: &str) -> Result<Vec<String>, HandlerError> {
        let mut out: Vec<String> = Vec::new();
        for rule in spec.recipient_rules() {
            let user = match &rule {
                Recipient::Field(field) => text(event, field),
                Recipient::SupervisorOf(field) => {
                    let of = text(event, field);
                    match (&self.directory, of.is_empty()) {
                        (_, true) => String::new(),
                        (Some(directory), false) => {
                            directory.user(&of).await?.map(|u| u.supervisor_id).unwrap_or_default()
                        }
                        (None, false) => {
                            tracing::warn!(event_type = spec.name, "no auth service to find a supervisor with");
                            String::new()
                        }
                    }
                }
            };
            let own_action = spec.skip_actor && user == actor;
            if !user.is_empty() && !own_action && !out.contains(&user) {
                out.push(user);
            }
        }
        Ok(out)
    }

    async fn notify(&self, tx: &mut Tx, spec: &EventSpec, delivered: &Delivered) -> Result<(), HandlerError> {
        let envelope = &delivered.envelope;
        let admin = self.store.event_type_in(tx, spec.name).await?;
        let (defaults, mandatory) = match &admin {
            Some(s) if !s.enabled => return Ok(()),
            Some(s) => (s.default_channels.clone(), s.mandatory_in_app),
            None => (spec.default_channels.iter().map(|c| *c as i32).collect(), spec.mandatory_in_app),
        };
        let event = catalog::variables(spec.name, &envelope.payload)?;
        let occurred_at = envelope.time.map(|t| format_rfc3339(crm_kit::time::from_timestamp(&t))).unwrap_or_default();
        for recipient in self.recipients(spec, &event, &envelope.actor).await? {
            let prefs = self.store.prefs_for(tx, &recipient, spec.name).await?;
            let mut channels = prefs.channels.get(spec.name).cloned().unwrap_or_else(|| defaults.clone());
            if mandatory && !channels.contains(&(Channel::InApp as i32)) {
                channels.push(Channel::InApp as i32);
            }
            let context = |channel: Channel| Context {
                event: &event,
                event_type: spec.name,
                event_id: &envelope.id,
                source: &envelope.source,
                subject_id: &envelope.subject,
                actor_id: &envelope.actor,
                occurred_at: &occurred_at,
                recipient: render::recipient(channel, &recipient, "", ""),
            };
            let mut notification_id = String::new();
            if channels.contains(&(Channel::InApp as i32)) {
                let chosen = templates::choose(
                    &self.store,
                    tx,
                    spec.name,
                    Channel::InApp,
                    &prefs.locale,
                    &self.settings.default_locale,
                )
                .await?
                .ok_or_else(|| format!("no in-app template for {}", spec.name))?;
                let out =
                    templates::render_chosen(&chosen, spec.name, Channel::InApp, &context(Channel::InApp).to_value())?;
                let new = NewNotification {
                    recipient_id: recipient.clone(),
                    event_id: envelope.id.clone(),
                    event_type: spec.name.to_string(),
                    source: envelope.source.clone(),
                    subject_id: envelope.subject.clone(),
                    actor_id: envelope.actor.clone(),
                    title: out.subject,
                    body: out.body,
                };
                if let Some(n) = self.store.add(tx, &new).await? {
                    notification_id = n.id;
                }
            }
            for (channel, on) in [(Channel::Email, self.settings.email), (Channel::Sms, self.settings.sms)] {
                if on && channels.contains(&(channel as i32)) {
                    let delivery = NewDelivery {
                        notification_id: notification_id.clone(),
                        event_id: envelope.id.clone(),
                        event_type: spec.name.to_string(),
                        recipient_id: recipient.clone(),
                        channel: channel as i32,
                        // The recipient's details are filled in at send time.
                        variables: context(channel).to_value().to_string(),
                    };
                    self.store.add_delivery(tx, &delivery).await?;
                }
            }
        }
        Ok(())
    }

    /// A delivery of the event to every enabled webhook subscribed to its type.
    async fn webhooks(&self, tx: &mut Tx, delivered: &Delivered) -> Result<(), HandlerError> {
        let envelope = &delivered.envelope;
        let hooks = self.store.webhooks_for(tx, &envelope.r#type).await?;
        if hooks.is_empty() {
            return Ok(());
        }
        let data = match catalog::variables(&envelope.r#type, &envelope.payload) {
            Ok(data) => data,
            Err(err) => {
                tracing::warn!(event_type = %envelope.r#type, error = %err, "an event webhooks subscribe to does not decode; not sent");
                return Ok(());
            }
        };
        let time = envelope.time.map(|t| format_rfc3339(crm_kit::time::from_timestamp(&t))).unwrap_or_default();
        let body = crate::webhooks::payload(
            &envelope.id,
            &envelope.r#type,
            &envelope.source,
            &envelope.subject,
            &envelope.actor,
            &time,
            data,
        );
        for hook in hooks {
            let delivery = NewDelivery {
                notification_id: String::new(),
                event_id: envelope.id.clone(),
                event_type: envelope.r#type.clone(),
                recipient_id: hook,
                channel: Channel::Webhook as i32,
                variables: body.to_string(),
            };
            self.store.add_delivery(tx, &delivery).await?;
        }
        Ok(())
    }
}

fn text(event: &Value, field: &str) -> String {
    event.get(field).and_then(Value::as_str).unwrap_or_default().trim().to_string()
}

impl Handler for Intake {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if let Some(spec) = catalog::event(&event.envelope.r#type) {
                self.notify(tx, spec, event).await?;
            }
            self.webhooks(tx, event).await
        })
    }
}
