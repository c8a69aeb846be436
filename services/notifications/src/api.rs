//! The gRPC surface: validate each request, check who calls, call the store, map back.
//! Inbox and preference calls act on the caller's own inbox (a user; service accounts have
//! none); event types, templates and deliveries need `notifications.admin`.

use std::pin::Pin;
use std::time::Duration;

use crm_kit::auth::Principal;
use crm_kit::page::Page;
use crm_kit::peer::Peer;
use crm_kit::time::to_timestamp;
use crm_kit::{ApiError, Violations, respond};
use crm_proto::contacts::v1::GetPersonRequest;
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::notifications::v1::notifications_service_server::NotificationsService;
use crm_proto::notifications::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::catalog::{self, EventSpec};
use crate::live::Hub;
use crate::outbound::Policy;
use crate::permissions::{ADMIN, SEND};
use crate::render::{self, Source};
use crate::store::{self, CustomerDraft, DeliveryFilter, EventTypeSettings, Store, StoredTemplate};
use crate::templates;

/// How many notifications a stream reads at a time.
const STREAM_BATCH: i64 = 200;

#[derive(Clone, Debug)]
pub struct NotificationsApi {
    store: Store,
    hub: Hub,
    default_locale: String,
    /// How often a stream looks for notifications without being woken.
    live_poll: Duration,
    /// Where webhooks may point.
    webhook_policy: Policy,
    /// Where customers are read (as the caller) for messages to them.
    contacts: Option<Peer>,
}

/// The caller, who must be a user with an inbox.
fn user<T>(request: &Request<T>) -> Result<Principal, ApiError> {
    let principal = crm_kit::auth::principal(request)?;
    if principal.service_account {
        return Err(ApiError::PermissionDenied("service accounts have no inbox or preferences".into()));
    }
    Ok(principal)
}

fn admin<T>(request: &Request<T>) -> Result<Principal, ApiError> {
    let principal = crm_kit::auth::principal(request)?;
    principal.require(ADMIN.name)?;
    Ok(principal)
}

/// A channel users choose (and templates are for), checked.
fn channel(v: &mut Violations, field: &str, value: i32) -> Option<Channel> {
    match Channel::try_from(value) {
        Ok(c @ (Channel::InApp | Channel::Email | Channel::Sms)) => Some(c),
        _ => {
            v.add(field, "must be CHANNEL_IN_APP, CHANNEL_EMAIL or CHANNEL_SMS");
            None
        }
    }
}

/// A channel deliveries go through, checked.
fn delivery_channel(v: &mut Violations, field: &str, value: i32) -> Option<Channel> {
    match Channel::try_from(value) {
        Ok(c @ (Channel::Email | Channel::Sms | Channel::Webhook)) => Some(c),
        _ => {
            v.add(field, "must be CHANNEL_EMAIL, CHANNEL_SMS or CHANNEL_WEBHOOK");
            None
        }
    }
}

/// Most webhook subscriptions, and most event types one subscribes to.
const MAX_WEBHOOKS: usize = 100;
const MAX_URL_CHARS: usize = 2000;

fn event_type(v: &mut Violations, field: &str, name: &str) -> Option<&'static EventSpec> {
    let spec = catalog::event(name.trim());
    if spec.is_none() {
        let known: Vec<&str> = catalog::EVENTS.iter().map(|e| e.name).collect();
        v.add(field, format!("is not an event type that notifies (one of: {})", known.join(", ")));
    }
    spec
}

fn locale(v: &mut Violations, field: &str, value: &str) -> Option<String> {
    let normalized = render::normalize_locale(value);
    if normalized.is_none() {
        v.add(field, "must be a language tag such as en, ru, zh or pt-BR");
    }
    normalized
}

/// An event type with its administrator's settings applied.
fn effective(spec: &EventSpec, admin: Option<&EventTypeSettings>) -> EventTypeSettings {
    admin.cloned().unwrap_or_else(|| EventTypeSettings {
        default_channels: spec.default_channels.iter().map(|c| *c as i32).collect(),
        mandatory_in_app: spec.mandatory_in_app,
        enabled: true,
    })
}

fn template(t: &StoredTemplate) -> Template {
    Template {
        event_type: t.event_type.clone(),
        channel: t.channel,
        locale: t.locale.clone(),
        subject: t.subject.clone(),
        body: t.body.clone(),
        customized: true,
        update_time: to_timestamp(t.updated_at),
        updated_by: t.updated_by.clone(),
    }
}

fn shipped_template(event_type: &str, channel: Channel, locale: &str, source: Source) -> Template {
    Template {
        event_type: event_type.to_string(),
        channel: channel as i32,
        locale: locale.to_string(),
        subject: source.subject,
        body: source.body,
        ..Template::default()
    }
}

impl NotificationsApi {
    pub fn new(store: Store, hub: Hub, default_locale: String, live_poll: Duration) -> NotificationsApi {
        NotificationsApi { store, hub, default_locale, live_poll, webhook_policy: Policy::default(), contacts: None }
    }

    /// Reads customers from the contacts service (messages to customers).
    pub fn with_contacts(mut self, contacts: Peer) -> NotificationsApi {
        self.contacts = Some(contacts);
        self
    }

    /// Where webhooks may point (the operator's allowed networks).
    pub fn with_webhook_policy(mut self, policy: Policy) -> NotificationsApi {
        self.webhook_policy = policy;
        self
    }

    async fn list(&self, request: Request<ListNotificationsRequest>) -> Result<ListNotificationsResponse, ApiError> {
        let caller = user(&request)?;
        let r = request.into_inner();
        let order = match r.order_by.trim() {
            "" | "create_time desc" => store::BY_TIME,
            "unread" => store::UNREAD_FIRST,
            _ => return Err(ApiError::invalid("order_by", "must be \"create_time desc\" or \"unread\"")),
        };
        let unread = if r.unread_only { "unread" } else { "all" };
        let page = Page::decode(&["notifications", unread, r.order_by.trim()], r.page_size, &r.page_token, &order)?;
        let (notifications, next_page_token) = self.store.list(&caller.subject, r.unread_only, &order, &page).await?;
        Ok(ListNotificationsResponse { notifications, next_page_token })
    }

    async fn mark(&self, request: Request<MarkReadRequest>) -> Result<MarkReadResponse, ApiError> {
        let caller = user(&request)?;
        let r = request.into_inner();
        let mut v = Violations::new();
        if r.all && !r.ids.is_empty() {
            v.add("ids", "must be empty when all is set");
        }
        if !r.all && r.ids.is_empty() {
            v.add("ids", "name at least one notification, or set all");
        }
        v.max_items("ids", &r.ids, store::MAX_MARK_IDS);
        for (i, id) in r.ids.iter().enumerate().take(store::MAX_MARK_IDS) {
            v.uuid(&format!("ids[{i}]"), id);
        }
        v.check()?;
        let ids = (!r.all).then_some(r.ids.as_slice());
        let (marked, unread) = self.store.mark_read(&caller.subject, ids).await?;
        Ok(MarkReadResponse { marked, unread })
    }

    async fn subscribe_stream(&self, request: Request<SubscribeRequest>) -> Result<NotificationStream, ApiError> {
        let caller = user(&request)?;
        let r = request.into_inner();
        let recipient = caller.subject;
        let mut watch = self.hub.watch(&recipient);
        if *watch.closed.borrow() {
            return Err(ApiError::Unavailable("the service is stopping: subscribe again".into()));
        }
        let mut after = if r.after_id.trim().is_empty() {
            self.store.unread(&recipient).await?.1
        } else {
            let mut v = Violations::new();
            v.uuid("after_id", r.after_id.trim());
            v.check()?;
            self.store.sequence_of(&recipient, r.after_id.trim()).await.map_err(|_| {
                ApiError::invalid(
                    "after_id",
                    "is not a notification of yours (pass the id of the last one you received)",
                )
            })?
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let store = self.store.clone();
        let poll = self.live_poll;
        tokio::spawn(async move {
            loop {
                watch.changed.borrow_and_update();
                let batch = match store.after(&recipient, after, STREAM_BATCH).await {
                    Ok(batch) => batch,
                    Err(err) => {
                        let _ = tx
                            .send(Err(Status::from(ApiError::Unavailable(format!("reading the inbox: {err}")))))
                            .await;
                        return;
                    }
                };
                let full = batch.len() as i64 == STREAM_BATCH;
                for n in batch {
                    after = n.sequence;
                    if tx.send(Ok(n)).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    _ = watch.changed.changed() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = tx.closed() => return,
                    _ = watch.closed.changed() => {
                        let _ = tx.send(Err(Status::unavailable(
                            "the service is stopping: subscribe again with after_id set to the last notification you received",
                        ))).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn preferences(&self, caller: &Principal) -> Result<Preferences, ApiError> {
        let prefs = self.store.prefs(&caller.subject).await?;
        let admin = self.store.event_type_settings().await?;
        let events = catalog::EVENTS
            .iter()
            .map(|spec| {
                let settings = effective(spec, admin.get(spec.name));
                let chosen = prefs.channels.get(spec.name);
                let mut channels = chosen.cloned().unwrap_or_else(|| settings.default_channels.clone());
                if settings.mandatory_in_app && !channels.contains(&(Channel::InApp as i32)) {
                    channels.insert(0, Channel::InApp as i32);
                }
                EventPreference {
                    event_type: spec.name.to_string(),
                    channels,
                    customized: chosen.is_some(),
                    mandatory_in_app: settings.mandatory_in_app,
                }
            })
            .collect();
        Ok(Preferences { locale: prefs.locale, events })
    }

    async fn update_preferences_(&self, request: Request<UpdatePreferencesRequest>) -> Result<Preferences, ApiError> {
        let caller = user(&request)?;
        let r = request.into_inner();
        let prefs = r.preferences.ok_or_else(|| ApiError::invalid("preferences", "is required"))?;
        let paths: Vec<String> = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        for path in &paths {
            if !matches!(path.as_str(), "locale" | "events") {
                v.add("update_mask", format!("{path:?} is not \"locale\" or \"events\""));
            }
        }
        let all = paths.is_empty();
        let new_locale = if all || paths.iter().any(|p| p == "locale") {
            if prefs.locale.trim().is_empty() {
                Some(String::new())
            } else {
                locale(&mut v, "preferences.locale", &prefs.locale)
            }
        } else {
            None
        };
        let mut choices: Vec<(String, Vec<i32>)> = Vec::new();
        if all || paths.iter().any(|p| p == "events") {
            v.max_items("preferences.events", &prefs.events, catalog::EVENTS.len());
            for (i, e) in prefs.events.iter().enumerate() {
                let field = format!("preferences.events[{i}]");
                let Some(spec) = event_type(&mut v, &format!("{field}.event_type"), &e.event_type) else { continue };
                if choices.iter().any(|(name, _)| name == spec.name) {
                    v.add(format!("{field}.event_type"), "is listed twice");
                    continue;
                }
                let mut channels: Vec<i32> = Vec::new();
                for (j, c) in e.channels.iter().enumerate() {
                    if let Some(c) = channel(&mut v, &format!("{field}.channels[{j}]"), *c)
                        && !channels.contains(&(c as i32))
                    {
                        channels.push(c as i32);
                    }
                }
                choices.push((spec.name.to_string(), channels));
            }
        }
        v.check()?;
        self.store.set_prefs(&caller.subject, new_locale.as_deref(), &choices).await?;
        self.preferences(&caller).await
    }

    async fn event_types(&self) -> Result<Vec<EventType>, ApiError> {
        let admin = self.store.event_type_settings().await?;
        Ok(catalog::EVENTS
            .iter()
            .map(|spec| event_type_message(spec, &effective(spec, admin.get(spec.name))))
            .collect())
    }

    async fn update_event_type_(&self, request: Request<UpdateEventTypeRequest>) -> Result<EventType, ApiError> {
        let caller = admin(&request)?;
        let r = request.into_inner();
        let patch = r.event_type.ok_or_else(|| ApiError::invalid("event_type", "is required"))?;
        let paths: Vec<String> = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        let spec = event_type(&mut v, "event_type.name", &patch.name);
        if paths.is_empty() {
            v.add("update_mask", "name the fields to change: default_channels, mandatory_in_app, enabled");
        }
        for path in &paths {
            if !matches!(path.as_str(), "default_channels" | "mandatory_in_app" | "enabled") {
                v.add(
                    "update_mask",
                    format!("{path:?} cannot be changed (default_channels, mandatory_in_app, enabled)"),
                );
            }
        }
        let mut channels: Vec<i32> = Vec::new();
        for (i, c) in patch.default_channels.iter().enumerate() {
            if let Some(c) = channel(&mut v, &format!("event_type.default_channels[{i}]"), *c)
                && !channels.contains(&(c as i32))
            {
                channels.push(c as i32);
            }
        }
        v.check()?;
        let spec = spec.expect("checked");
        let admin_settings = self.store.event_type_settings().await?;
        let mut settings = effective(spec, admin_settings.get(spec.name));
        for path in &paths {
            match path.as_str() {
                "default_channels" => settings.default_channels = channels.clone(),
                "mandatory_in_app" => settings.mandatory_in_app = patch.mandatory_in_app,
                _ => settings.enabled = patch.enabled,
            }
        }
        self.store.put_event_type(spec.name, &settings, &caller.subject).await?;
        Ok(event_type_message(spec, &settings))
    }

    async fn templates(&self, request: Request<ListTemplatesRequest>) -> Result<Vec<Template>, ApiError> {
        admin(&request)?;
        let r = request.into_inner();
        let mut v = Violations::new();
        let spec = (!r.event_type.is_empty()).then(|| event_type(&mut v, "event_type", &r.event_type)).flatten();
        let channel_filter = (r.channel != 0).then(|| channel(&mut v, "channel", r.channel)).flatten();
        let locale_filter = (!r.locale.is_empty()).then(|| locale(&mut v, "locale", &r.locale)).flatten();
        v.check()?;
        let stored = self
            .store
            .templates(spec.map(|s| s.name), channel_filter.map(|c| c as i32), locale_filter.as_deref())
            .await?;
        let mut out: Vec<Template> = Vec::new();
        for spec in catalog::EVENTS.iter().filter(|s| spec.is_none_or(|f| f.name == s.name)) {
            for &ch in catalog::CHANNELS.iter().filter(|c| channel_filter.is_none_or(|f| f == **c)) {
                let mut locales: Vec<String> = catalog::LOCALES.iter().map(|l| l.to_string()).collect();
                for t in stored.iter().filter(|t| t.event_type == spec.name && t.channel == ch as i32) {
                    if !locales.contains(&t.locale) {
                        locales.push(t.locale.clone());
                    }
                }
                for l in locales.iter().filter(|l| locale_filter.as_ref().is_none_or(|f| f == *l)) {
                    match stored.iter().find(|t| t.event_type == spec.name && t.channel == ch as i32 && &t.locale == l)
                    {
                        Some(t) => out.push(template(t)),
                        None => {
                            if let Some(source) = render::shipped(spec.name, ch, l) {
                                out.push(shipped_template(spec.name, ch, l, source));
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Checks a template's keys; returns the event type, channel and locale.
    fn keys(
        v: &mut Violations,
        prefix: &str,
        event_type_name: &str,
        channel_value: i32,
        locale_value: &str,
    ) -> Option<(&'static EventSpec, Channel, String)> {
        let spec = event_type(v, &format!("{prefix}event_type"), event_type_name);
        let ch = channel(v, &format!("{prefix}channel"), channel_value);
        let l = locale(v, &format!("{prefix}locale"), locale_value);
        Some((spec?, ch?, l?))
    }

    async fn put_template_(&self, request: Request<PutTemplateRequest>) -> Result<Template, ApiError> {
        let caller = admin(&request)?;
        let t = request.into_inner().template.ok_or_else(|| ApiError::invalid("template", "is required"))?;
        let mut v = Violations::new();
        let keys = Self::keys(&mut v, "template.", &t.event_type, t.channel, &t.locale);
        if keys.as_ref().is_some_and(|(_, ch, _)| render::has_subject(*ch)) {
            v.required("template.subject", &t.subject);
        } else if !t.subject.is_empty() {
            v.add("template.subject", "must be empty: a text message has only its body");
        }
        v.required("template.body", &t.body);
        v.max_chars("template.subject", &t.subject, render::MAX_SUBJECT_SOURCE);
        v.max_chars("template.body", &t.body, render::MAX_BODY_SOURCE);
        v.check()?;
        let (spec, ch, l) = keys.expect("checked");
        let source = Source { subject: t.subject.clone(), body: t.body.clone() };
        let sample = catalog::variables_from_json(spec.name, spec.sample).map_err(ApiError::Internal)?;
        if let Err(err) = render::render(&source, &render::sample_context(spec.name, ch, &sample)) {
            let field = if err.starts_with("subject") { "template.subject" } else { "template.body" };
            return Err(ApiError::invalid(
                field,
                format!("does not render against a sample {} event: {err}", spec.name),
            ));
        }
        let stored = StoredTemplate {
            event_type: spec.name.to_string(),
            channel: ch as i32,
            locale: l,
            subject: t.subject,
            body: t.body,
            updated_at: crm_kit::time::now_micros(),
            updated_by: caller.subject,
        };
        self.store.put_template(&stored).await?;
        Ok(template(&stored))
    }

    async fn reset_template_(&self, request: Request<ResetTemplateRequest>) -> Result<Template, ApiError> {
        admin(&request)?;
        let r = request.into_inner();
        let mut v = Violations::new();
        let keys = Self::keys(&mut v, "", &r.event_type, r.channel, &r.locale);
        v.check()?;
        let (spec, ch, l) = keys.expect("checked");
        let removed = self.store.delete_template(spec.name, ch as i32, &l).await?;
        match render::shipped(spec.name, ch, &l) {
            Some(source) => Ok(shipped_template(spec.name, ch, &l, source)),
            None if removed => {
                let mut conn = self.store.db().pool().acquire().await?;
                let chosen = templates::choose(&self.store, &mut conn, spec.name, ch, &l, &self.default_locale)
                    .await?
                    .ok_or_else(|| ApiError::Internal(format!("no template for {}", spec.name)))?;
                Ok(shipped_template(spec.name, ch, &chosen.locale, chosen.source))
            }
            None => Err(ApiError::NotFound(format!("no {l} template of {} on this channel to reset", spec.name))),
        }
    }

    async fn preview(&self, request: Request<PreviewTemplateRequest>) -> Result<RenderedTemplate, ApiError> {
        admin(&request)?;
        let r = request.into_inner();
        let t = r.template.ok_or_else(|| ApiError::invalid("template", "is required"))?;
        let mut v = Violations::new();
        let keys = Self::keys(
            &mut v,
            "template.",
            &t.event_type,
            t.channel,
            if t.locale.is_empty() { "en" } else { &t.locale },
        );
        v.max_chars("template.subject", &t.subject, render::MAX_SUBJECT_SOURCE);
        v.max_chars("template.body", &t.body, render::MAX_BODY_SOURCE);
        v.max_chars("event_json", &r.event_json, 64 * 1024);
        v.check()?;
        let (spec, ch, l) = keys.expect("checked");
        let event = if r.event_json.trim().is_empty() {
            catalog::variables_from_json(spec.name, spec.sample).map_err(ApiError::Internal)?
        } else {
            catalog::variables_from_json(spec.name, &r.event_json).map_err(|e| ApiError::invalid("event_json", e))?
        };
        let source = if t.subject.is_empty() && t.body.is_empty() {
            let mut conn = self.store.db().pool().acquire().await?;
            templates::choose(&self.store, &mut conn, spec.name, ch, &l, &self.default_locale)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no template for {} on this channel", spec.name)))?
                .source
        } else {
            Source { subject: t.subject, body: t.body }
        };
        let out = render::render(&source, &render::sample_context(spec.name, ch, &event)).map_err(|err| {
            let field = if err.starts_with("subject") { "template.subject" } else { "template.body" };
            ApiError::invalid(field, err)
        })?;
        Ok(RenderedTemplate { subject: out.subject, body: out.body })
    }

    async fn deliveries(&self, request: Request<ListDeliveriesRequest>) -> Result<ListDeliveriesResponse, ApiError> {
        admin(&request)?;
        let r = request.into_inner();
        let mut v = Violations::new();
        let state = match DeliveryState::try_from(r.state) {
            Ok(DeliveryState::Unspecified) => None,
            Ok(state) => Some(state as i32),
            Err(_) => {
                v.add("state", "is not a delivery state");
                None
            }
        };
        let ch = (r.channel != 0).then(|| delivery_channel(&mut v, "channel", r.channel)).flatten();
        if !r.recipient_id.is_empty() {
            v.uuid("recipient_id", &r.recipient_id);
        }
        if !r.notification_id.is_empty() {
            v.uuid("notification_id", &r.notification_id);
        }
        v.check()?;
        let filter = DeliveryFilter {
            state,
            channel: ch.map(|c| c as i32),
            recipient_id: (!r.recipient_id.is_empty()).then_some(r.recipient_id.clone()),
            notification_id: (!r.notification_id.is_empty()).then_some(r.notification_id.clone()),
        };
        let parts = [
            "deliveries".to_string(),
            r.state.to_string(),
            r.channel.to_string(),
            r.recipient_id.clone(),
            r.notification_id.clone(),
        ];
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let page = Page::decode(&parts, r.page_size, &r.page_token, &store::deliveries::ORDER)?;
        let (deliveries, next_page_token) = self.store.list_deliveries(&filter, &page).await?;
        Ok(ListDeliveriesResponse { deliveries, next_page_token })
    }

    async fn retry(&self, request: Request<RetryDeliveriesRequest>) -> Result<RetryDeliveriesResponse, ApiError> {
        admin(&request)?;
        let r = request.into_inner();
        let mut v = Violations::new();
        if r.ids.is_empty() && r.channel == 0 {
            v.add("ids", "name dead deliveries, or set channel to retry every dead one of it");
        }
        v.max_items("ids", &r.ids, 1000);
        for (i, id) in r.ids.iter().enumerate().take(1000) {
            v.uuid(&format!("ids[{i}]"), id);
        }
        let ch = (r.channel != 0).then(|| delivery_channel(&mut v, "channel", r.channel)).flatten();
        v.check()?;
        let retried = self.store.retry_deliveries(&r.ids, ch.map(|c| c as i32)).await?;
        Ok(RetryDeliveriesResponse { retried })
    }
}

impl NotificationsApi {
    async fn send_customer_message_(
        &self,
        request: Request<SendCustomerMessageRequest>,
    ) -> Result<CustomerMessage, ApiError> {
        let caller = crm_kit::auth::principal(&request)?;
        caller.require(SEND.name)?;
        let r = request.into_inner();
        let mut v = Violations::new();
        v.uuid("person_id", &r.person_id);
        let ch = match Channel::try_from(r.channel) {
            Ok(c @ (Channel::Email | Channel::Sms)) => Some(c),
            _ => {
                v.add("channel", "must be CHANNEL_EMAIL or CHANNEL_SMS");
                None
            }
        };
        match ch {
            Some(Channel::Email) => v.required("subject", &r.subject),
            Some(_) if !r.subject.is_empty() => v.add("subject", "must be empty: a text message has only its body"),
            _ => {}
        }
        v.required("body", &r.body);
        v.max_chars("subject", &r.subject, render::MAX_SUBJECT_SOURCE);
        v.max_chars("body", &r.body, render::MAX_BODY_SOURCE);
        v.max_chars("request_id", &r.request_id, crm_kit::db::idempotency::MAX_REQUEST_ID_CHARS);
        v.check()?;
        let ch = ch.expect("checked");
        let contacts = self
            .contacts
            .as_ref()
            .ok_or_else(|| ApiError::Unavailable("no contacts service to read customers from".into()))?;
        // As the caller: a person outside their data scope is NOT_FOUND, as in contacts.
        let person = match ContactsServiceClient::new(contacts.as_caller(&caller))
            .get_person(GetPersonRequest { id: r.person_id.clone() })
            .await
        {
            Ok(person) => person.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(ApiError::NotFound(format!("person {} not found", r.person_id)));
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                return Err(ApiError::PermissionDenied(status.message().to_string()));
            }
            Err(status) => return Err(ApiError::Unavailable(format!("contacts service: {}", status.message()))),
        };
        if person.do_not_contact {
            let reason = if person.do_not_contact_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", person.do_not_contact_reason)
            };
            return Err(ApiError::FailedPrecondition(format!(
                "{} is marked do-not-contact{reason}: nothing was sent",
                person.full_name
            )));
        }
        let to = crate::store::customer_address(&person, ch).ok_or_else(|| {
            let what = if ch == Channel::Email { "e-mail address" } else { "phone number" };
            ApiError::FailedPrecondition(format!("{} has no {what}: nothing was sent", person.full_name))
        })?;
        let context = serde_json::json!({
            "person": {
                "id": person.id,
                "full_name": person.full_name,
                "company_id": person.company_id,
                "company_role": person.company_role,
                "region": person.region,
                "owner_id": person.owner_id,
            },
            "sender": {"id": caller.subject, "display_name": caller.name},
        });
        let out =
            render::render(&Source { subject: r.subject.clone(), body: r.body.clone() }, &context).map_err(|err| {
                let field = if err.starts_with("subject") { "subject" } else { "body" };
                ApiError::invalid(field, err)
            })?;
        let key = if r.request_id.trim().is_empty() {
            crm_kit::id::new()
        } else {
            format!("customer-message:{}:{}", caller.subject, r.request_id.trim())
        };
        let draft = CustomerDraft {
            person_id: person.id.clone(),
            to,
            to_name: person.full_name.clone(),
            subject: out.subject,
            body: out.body,
            sent_by: caller.subject.clone(),
        };
        self.store.add_customer_message(&key, ch as i32, &draft).await
    }

    /// Checks a webhook's URL, event types and description; the checked URL and types.
    async fn check_webhook(&self, v: &mut Violations, w: &Webhook, paths: Option<&[String]>) -> (String, Vec<String>) {
        let wants = |field: &str| paths.is_none_or(|p| p.iter().any(|x| x == field));
        let mut url = String::new();
        if wants("url") {
            if w.url.chars().count() > MAX_URL_CHARS {
                v.add("webhook.url", format!("must be at most {MAX_URL_CHARS} characters"));
            } else {
                match self.webhook_policy.check_url(&w.url).await {
                    Ok(parsed) => url = parsed.to_string(),
                    Err(err) => v.add("webhook.url", err),
                }
            }
        }
        let mut types: Vec<String> = Vec::new();
        if wants("event_types") {
            let known = catalog::webhook_event_types();
            if w.event_types.is_empty() {
                v.add("webhook.event_types", "name at least one event type (ListEventTypes lists them)");
            }
            v.max_items("webhook.event_types", &w.event_types, known.len());
            for (i, t) in w.event_types.iter().enumerate().take(known.len()) {
                let t = t.trim();
                if !known.iter().any(|k| k == t) {
                    v.add(
                        format!("webhook.event_types[{i}]"),
                        format!("{} is not an event webhooks can receive", crm_kit::validate::quote(t)),
                    );
                } else if !types.iter().any(|x| x == t) {
                    types.push(t.to_string());
                }
            }
        }
        if wants("description") {
            v.max_chars("webhook.description", &w.description, 500);
        }
        (url, types)
    }

    async fn create_webhook_(&self, request: Request<CreateWebhookRequest>) -> Result<WebhookWithSecret, ApiError> {
        let caller = admin(&request)?;
        let w = request.into_inner().webhook.ok_or_else(|| ApiError::invalid("webhook", "is required"))?;
        let mut v = Violations::new();
        let (url, event_types) = self.check_webhook(&mut v, &w, None).await;
        v.check()?;
        if self.store.webhooks().await?.len() >= MAX_WEBHOOKS {
            return Err(ApiError::FailedPrecondition(format!("at most {MAX_WEBHOOKS} webhooks; delete one first")));
        }
        let new = Webhook { url, event_types, enabled: true, description: w.description.trim().to_string(), ..w };
        let secret = crate::webhooks::new_secret();
        let stored = self.store.create_webhook(&new, &secret, &caller.subject).await?;
        Ok(WebhookWithSecret { webhook: Some(stored.webhook), secret })
    }

    async fn update_webhook_(&self, request: Request<UpdateWebhookRequest>) -> Result<Webhook, ApiError> {
        admin(&request)?;
        let r = request.into_inner();
        let patch = r.webhook.ok_or_else(|| ApiError::invalid("webhook", "is required"))?;
        let paths: Vec<String> = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        v.uuid("webhook.id", &patch.id);
        if paths.is_empty() {
            v.add("update_mask", "name the fields to change: url, event_types, enabled, description");
        }
        for path in &paths {
            if !matches!(path.as_str(), "url" | "event_types" | "enabled" | "description") {
                v.add("update_mask", format!("{path:?} cannot be changed (url, event_types, enabled, description)"));
            }
        }
        let (url, types) = self.check_webhook(&mut v, &patch, Some(&paths)).await;
        v.check()?;
        let mut hook = self.store.webhook(&patch.id).await?.webhook;
        for path in &paths {
            match path.as_str() {
                "url" => hook.url = url.clone(),
                "event_types" => hook.event_types = types.clone(),
                "enabled" => hook.enabled = patch.enabled,
                _ => hook.description = patch.description.trim().to_string(),
            }
        }
        Ok(self.store.update_webhook(&hook).await?.webhook)
    }

    async fn rotate_webhook_(
        &self,
        request: Request<RotateWebhookSecretRequest>,
    ) -> Result<WebhookWithSecret, ApiError> {
        admin(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        v.uuid("id", &id);
        v.check()?;
        let secret = crate::webhooks::new_secret();
        let until = crm_kit::time::now_micros() + crate::webhooks::ROTATION_OVERLAP_MICROS;
        let stored = self.store.rotate_webhook_secret(&id, &secret, until).await?;
        Ok(WebhookWithSecret { webhook: Some(stored.webhook), secret })
    }

    async fn delete_webhook_(&self, request: Request<DeleteWebhookRequest>) -> Result<(), ApiError> {
        admin(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        v.uuid("id", &id);
        v.check()?;
        self.store.delete_webhook(&id).await
    }
}

fn event_type_message(spec: &EventSpec, settings: &EventTypeSettings) -> EventType {
    EventType {
        name: spec.name.to_string(),
        title: spec.title.to_string(),
        recipients: spec.recipients.iter().map(|r| r.to_string()).collect(),
        default_channels: settings.default_channels.clone(),
        mandatory_in_app: settings.mandatory_in_app,
        enabled: settings.enabled,
        variables: render::variables(spec.name, Channel::Email),
    }
}

type NotificationStream = Pin<Box<dyn Stream<Item = Result<Notification, Status>> + Send>>;

#[tonic::async_trait]
impl NotificationsService for NotificationsApi {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        respond(self.list(request).await)
    }

    async fn get_unread_count(&self, request: Request<GetUnreadCountRequest>) -> Result<Response<UnreadCount>, Status> {
        respond(
            async {
                let caller = user(&request)?;
                let (unread, last_sequence) = self.store.unread(&caller.subject).await?;
                Ok(UnreadCount { unread, last_sequence })
            }
            .await,
        )
    }

    async fn mark_read(&self, request: Request<MarkReadRequest>) -> Result<Response<MarkReadResponse>, Status> {
        respond(self.mark(request).await)
    }

    type SubscribeStream = NotificationStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        respond(self.subscribe_stream(request).await)
    }

    async fn get_preferences(&self, request: Request<GetPreferencesRequest>) -> Result<Response<Preferences>, Status> {
        respond(async { self.preferences(&user(&request)?).await }.await)
    }

    async fn update_preferences(
        &self,
        request: Request<UpdatePreferencesRequest>,
    ) -> Result<Response<Preferences>, Status> {
        respond(self.update_preferences_(request).await)
    }

    async fn list_event_types(
        &self,
        request: Request<ListEventTypesRequest>,
    ) -> Result<Response<ListEventTypesResponse>, Status> {
        respond(
            async {
                crm_kit::auth::principal(&request)?;
                Ok(ListEventTypesResponse {
                    event_types: self.event_types().await?,
                    webhook_event_types: catalog::webhook_event_types(),
                })
            }
            .await,
        )
    }

    async fn update_event_type(&self, request: Request<UpdateEventTypeRequest>) -> Result<Response<EventType>, Status> {
        respond(self.update_event_type_(request).await)
    }

    async fn list_templates(
        &self,
        request: Request<ListTemplatesRequest>,
    ) -> Result<Response<ListTemplatesResponse>, Status> {
        respond(self.templates(request).await.map(|templates| ListTemplatesResponse { templates }))
    }

    async fn put_template(&self, request: Request<PutTemplateRequest>) -> Result<Response<Template>, Status> {
        respond(self.put_template_(request).await)
    }

    async fn reset_template(&self, request: Request<ResetTemplateRequest>) -> Result<Response<Template>, Status> {
        respond(self.reset_template_(request).await)
    }

    async fn preview_template(
        &self,
        request: Request<PreviewTemplateRequest>,
    ) -> Result<Response<RenderedTemplate>, Status> {
        respond(self.preview(request).await)
    }

    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        respond(self.deliveries(request).await)
    }

    async fn retry_deliveries(
        &self,
        request: Request<RetryDeliveriesRequest>,
    ) -> Result<Response<RetryDeliveriesResponse>, Status> {
        respond(self.retry(request).await)
    }

    async fn send_customer_message(
        &self,
        request: Request<SendCustomerMessageRequest>,
    ) -> Result<Response<CustomerMessage>, Status> {
        respond(self.send_customer_message_(request).await)
    }

    async fn create_webhook(
        &self,
        request: Request<CreateWebhookRequest>,
    ) -> Result<Response<WebhookWithSecret>, Status> {
        respond(self.create_webhook_(request).await)
    }

    async fn list_webhooks(
        &self,
        request: Request<ListWebhooksRequest>,
    ) -> Result<Response<ListWebhooksResponse>, Status> {
        respond(
            async {
                admin(&request)?;
                let webhooks = self.store.webhooks().await?.into_iter().map(|w| w.webhook).collect();
                Ok(ListWebhooksResponse { webhooks })
            }
            .await,
        )
    }

    async fn update_webhook(&self, request: Request<UpdateWebhookRequest>) -> Result<Response<Webhook>, Status> {
        respond(self.update_webhook_(request).await)
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<RotateWebhookSecretRequest>,
    ) -> Result<Response<WebhookWithSecret>, Status> {
        respond(self.rotate_webhook_(request).await)
    }

    async fn delete_webhook(&self, request: Request<DeleteWebhookRequest>) -> Result<Response<()>, Status> {
        respond(self.delete_webhook_(request).await)
    }
}
