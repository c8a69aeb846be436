//! Events in, notifications out: the notifications service's consumer of other services'
//! events. Every event goes to the webhooks subscribed to its type. For an event type of the
//! catalog it also finds the recipients (rules over the event's
//! fields, a supervisor through the auth service), each recipient's channels (their choice,
//! else the event type's default; in-app when mandatory), puts the notification into their
//! inbox and creates a delivery per outside channel — all in the consumer's transaction, so a
//! redelivered event has no second effect, and unique keys make it impossible anyway. A batch of
//! events read together is handled with a fixed number of statements. A deal entering a stage
//! carries the stage's automations: a message to the deal's contact person is queued (once per
//! entry and automation), and the entry goes to the webhooks they name.

use std::sync::Arc;

use crm_kit::auth::RemoteDirectory;
use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_kit::peer::Peer;
use crm_kit::time::format_rfc3339;
use crm_proto::contacts::v1::GetPersonRequest;
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::deals::v1::{DealStageChanged, MessageChannel, automation};
use crm_proto::events::v1::Envelope;
use crm_proto::notifications::v1::Channel;
use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::catalog::{self, EventSpec, Recipient};
use crate::render::{self, Context};
use crate::store::{CustomerDraft, NewDelivery, NewNotification, Prefs, Store};
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
    contacts: Option<Peer>,
}

impl Intake {
    /// `directory` resolves supervisors; without it a supervisor rule finds nobody (logged).
    pub fn new(store: Store, directory: Option<Arc<RemoteDirectory>>, settings: IntakeSettings) -> Intake {
        Intake { store, directory, settings, contacts: None }
    }

    /// Reads the persons deals' stage automations message (as the suite's service account).
    pub fn with_contacts(mut self, contacts: Peer) -> Intake {
        self.contacts = Some(contacts);
        self
    }

    /// The messages to clients the stage automations of `events` ask for, queued in `tx` (once
    /// per entry and automation, however often an event comes): to the deal's contact person,
    /// from its owner, unless the person is marked do-not-contact or has no address for the
    /// channel (then nothing is sent, and the log says why).
    async fn message_clients(&self, tx: &mut Tx, events: &[&Delivered]) -> Result<(), HandlerError> {
        for delivered in events {
            let Some(entry) = delivered.payload::<DealStageChanged>() else { continue };
            let entry = entry.map_err(|e| format!("DealStageChanged does not decode: {e}"))?;
            for (i, automation) in entry.automations.iter().enumerate() {
                let Some(automation::Action::MessageClient(message)) = &automation.action else { continue };
                let id = &delivered.envelope.id;
                if entry.person_id.is_empty() {
                    tracing::warn!(deal_id = %entry.deal_id, event_id = %id, "a stage's message to the client: the deal has no contact person; nothing was sent");
                    continue;
                }
                let Some(contacts) = &self.contacts else {
                    tracing::warn!(deal_id = %entry.deal_id, "a stage's message to the client: no contacts service to read the person from");
                    continue;
                };
                let channel = contacts.as_service().await.map_err(|e| format!("contacts service: {e}"))?;
                let request = GetPersonRequest { id: entry.person_id.clone() };
                let person = match ContactsServiceClient::new(channel).get_person(request).await {
                    Ok(person) => person.into_inner(),
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        tracing::warn!(deal_id = %entry.deal_id, person_id = %entry.person_id, "a stage's message to the client: no such person; nothing was sent");
                        continue;
                    }
                    Err(status) => return Err(format!("contacts service GetPerson: {}", status.message()).into()),
                };
                if person.do_not_contact {
                    tracing::info!(deal_id = %entry.deal_id, person_id = %person.id, "a stage's message to the client: the person is marked do-not-contact; nothing was sent");
                    continue;
                }
                let sms = message.channel == MessageChannel::Sms as i32;
                let channel = if sms { Channel::Sms } else { Channel::Email };
                let Some(to) = crate::store::customer_address(&person, channel) else {
                    tracing::info!(deal_id = %entry.deal_id, person_id = %person.id, sms, "a stage's message to the client: the person has no address for it; nothing was sent");
                    continue;
                };
                let draft = CustomerDraft {
                    person_id: person.id.clone(),
                    to,
                    to_name: person.full_name.clone(),
                    subject: message.subject.replace("{name}", &person.full_name),
                    body: message.body.replace("{name}", &person.full_name),
                    sent_by: entry.owner_id.clone(),
                };
                let key = format!("deal-entry:{id}:{i}");
                self.store.queue_customer_message(tx, &key, channel as i32, &draft).await?;
            }
        }
        Ok(())
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
                        (Some(directory), false) => directory.escalation_of(&of).await?,
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

    /// Notifications and deliveries for `events`, in `tx`, with a fixed number of statements
    /// whatever their number: the administrators' settings, the recipients' preferences and
    /// templates read once, inbox entries and deliveries written in multi-row statements.
    async fn handle_all(&self, tx: &mut Tx, events: &[&Delivered]) -> Result<(), HandlerError> {
        let admin = self.store.event_type_settings_in(tx).await?;
        // Who gets what.
        struct Planned<'e> {
            delivered: &'e Delivered,
            spec: &'static EventSpec,
            event: Value,
            occurred_at: String,
            recipients: Vec<String>,
        }
        let mut planned: Vec<Planned> = Vec::new();
        for delivered in events {
            let envelope = &delivered.envelope;
            let Some(spec) = catalog::event(&envelope.r#type) else { continue };
            if admin.get(spec.name).is_some_and(|s| !s.enabled) {
                continue;
            }
            let event = catalog::variables(spec.name, &envelope.payload)?;
            let recipients = self.recipients(spec, &event, &envelope.actor).await?;
            let occurred_at = occurred_at(envelope);
            planned.push(Planned { delivered, spec, event, occurred_at, recipients });
        }
        let mut users: Vec<&str> = planned.iter().flat_map(|p| p.recipients.iter().map(String::as_str)).collect();
        users.sort_unstable();
        users.dedup();
        let prefs = if users.is_empty() { Default::default() } else { self.store.prefs_of(tx, &users).await? };
        let mut types: Vec<&str> = planned.iter().map(|p| p.spec.name).collect();
        types.sort_unstable();
        types.dedup();
        let templates = self.store.templates_of(tx, &types, Channel::InApp as i32).await?;
        let no_prefs = Prefs::default();
        let mut inbox: Vec<NewNotification> = Vec::new();
        // Deliveries, with the index of their inbox entry (if any) for its id.
        let mut outside: Vec<(Option<usize>, NewDelivery)> = Vec::new();
        for p in &planned {
            let envelope = &p.delivered.envelope;
            let (defaults, mandatory) = match admin.get(p.spec.name) {
                Some(s) => (s.default_channels.clone(), s.mandatory_in_app),
                None => (p.spec.default_channels.iter().map(|c| *c as i32).collect(), p.spec.mandatory_in_app),
            };
            for recipient in &p.recipients {
                let user = prefs.get(recipient).unwrap_or(&no_prefs);
                let mut channels = user.channels.get(p.spec.name).cloned().unwrap_or_else(|| defaults.clone());
                if mandatory && !channels.contains(&(Channel::InApp as i32)) {
                    channels.push(Channel::InApp as i32);
                }
                let context = |channel: Channel| Context {
                    event: &p.event,
                    event_type: p.spec.name,
                    event_id: &envelope.id,
                    source: &envelope.source,
                    subject_id: &envelope.subject,
                    actor_id: &envelope.actor,
                    occurred_at: &p.occurred_at,
                    recipient: render::recipient(channel, recipient, "", ""),
                };
                let mut entry = None;
                if channels.contains(&(Channel::InApp as i32)) {
                    let chosen = templates::choose_from(
                        &templates,
                        p.spec.name,
                        Channel::InApp,
                        &user.locale,
                        &self.settings.default_locale,
                    )
                    .ok_or_else(|| format!("no in-app template for {}", p.spec.name))?;
                    let out = templates::render_chosen(
                        &chosen,
                        p.spec.name,
                        Channel::InApp,
                        &context(Channel::InApp).to_value(),
                    )?;
                    entry = Some(inbox.len());
                    inbox.push(NewNotification {
                        recipient_id: recipient.clone(),
                        event_id: envelope.id.clone(),
                        event_type: p.spec.name.to_string(),
                        source: envelope.source.clone(),
                        subject_id: envelope.subject.clone(),
                        actor_id: envelope.actor.clone(),
                        title: out.subject,
                        body: out.body,
                    });
                }
                for (channel, on) in [(Channel::Email, self.settings.email), (Channel::Sms, self.settings.sms)] {
                    if on && channels.contains(&(channel as i32)) {
                        let delivery = NewDelivery {
                            notification_id: String::new(),
                            event_id: envelope.id.clone(),
                            event_type: p.spec.name.to_string(),
                            recipient_id: recipient.clone(),
                            channel: channel as i32,
                            // The recipient's details are filled in at send time.
                            variables: context(channel).to_value().to_string(),
                        };
                        outside.push((entry, delivery));
                    }
                }
            }
        }
        let made = self.store.add_all(tx, &inbox).await?;
        let mut deliveries: Vec<NewDelivery> = outside
            .into_iter()
            .map(|(entry, mut d)| {
                if let Some(Some(n)) = entry.map(|i| &made[i]) {
                    d.notification_id = n.id.clone();
                }
                d
            })
            .collect();
        deliveries.extend(self.webhook_deliveries(tx, events).await?);
        self.store.add_deliveries(tx, &deliveries).await?;
        self.message_clients(tx, events).await?;
        Ok(())
    }

    /// A delivery of each event to every enabled webhook subscribed to its type.
    async fn webhook_deliveries(&self, tx: &mut Tx, events: &[&Delivered]) -> Result<Vec<NewDelivery>, HandlerError> {
        let hooks = self.store.enabled_webhooks(tx).await?;
        let mut out = Vec::new();
        if hooks.is_empty() {
            return Ok(out);
        }
        for delivered in events {
            let envelope = &delivered.envelope;
            let mut subscribed: Vec<&String> = hooks
                .iter()
                .filter(|(_, types)| types.iter().any(|t| t == &envelope.r#type))
                .map(|(id, _)| id)
                .collect();
            // A deal's stage automations may name webhooks of their own for the entry.
            if let Some(Ok(entry)) = delivered.payload::<DealStageChanged>() {
                for automation in &entry.automations {
                    let Some(automation::Action::CallWebhook(call)) = &automation.action else { continue };
                    match hooks.iter().find(|(id, _)| *id == call.webhook_id) {
                        Some((id, _)) if !subscribed.contains(&id) => subscribed.push(id),
                        Some(_) => {}
                        None => {
                            tracing::warn!(deal_id = %entry.deal_id, webhook_id = %call.webhook_id, "a stage's webhook is not an enabled webhook; nothing was posted")
                        }
                    }
                }
            }
            if subscribed.is_empty() {
                continue;
            }
            let data = match catalog::variables(&envelope.r#type, &envelope.payload) {
                Ok(data) => data,
                Err(err) => {
                    tracing::warn!(event_type = %envelope.r#type, error = %err, "an event webhooks subscribe to does not decode; not sent");
                    continue;
                }
            };
            let time = occurred_at(envelope);
            let body = crate::webhooks::payload(
                &envelope.id,
                &envelope.r#type,
                &envelope.source,
                &envelope.subject,
                &envelope.actor,
                &time,
                data,
            )
            .to_string();
            for hook in subscribed {
                out.push(NewDelivery {
                    notification_id: String::new(),
                    event_id: envelope.id.clone(),
                    event_type: envelope.r#type.clone(),
                    recipient_id: hook.clone(),
                    channel: Channel::Webhook as i32,
                    variables: body.clone(),
                });
            }
        }
        Ok(out)
    }
}

/// When the event's change committed, in RFC 3339 (empty when it does not say).
fn occurred_at(envelope: &Envelope) -> String {
    envelope.time.map(|t| format_rfc3339(crm_kit::time::from_timestamp(&t))).unwrap_or_default()
}

fn text(event: &Value, field: &str) -> String {
    event.get(field).and_then(Value::as_str).unwrap_or_default().trim().to_string()
}

impl Handler for Intake {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move { self.handle_all(tx, &[event]).await })
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Delivered],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.handle_all(tx, events))
    }
}
