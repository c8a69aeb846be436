//! The notifications service (SPEC N1-N6): each user's inbox with a live stream, e-mail to users
//! over SMTP, text messages through an SMS provider, signed outgoing webhooks, templates per
//! event type, channel and locale, preferences per user and event type, messages to customers,
//! and a log of every delivery attempt with dead letters an administrator retries.
//!
//! Nobody calls it to notify: it consumes the other services' events ([`intake`]) — contacts'
//! assignments and transfers, auth's lock-outs and password changes, tasks' assignments,
//! reminders, overdue tasks and comments, deals' stage automations — and turns those of its
//! [`catalog`] into notifications. A new kind of notification is a catalog entry and its
//! templates, not a new mechanism.

pub mod api;
pub mod catalog;
pub mod deliver;
pub mod email;
pub mod intake;
pub mod live;
pub mod outbound;
pub mod render;
pub mod sms;
pub mod store;
pub mod templates;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{AUTH_ROLE, Grant, Permission, RemoteDirectory};
use crm_kit::db::Migrations;
use crm_kit::jobs::{Runner, RunnerSettings};
use crm_kit::role::{self, Calls, Context, Opened, RoleSpec, SERVICE_SECRET_ENV};
use crm_proto::notifications::v1::NotificationCreated;
use crm_proto::notifications::v1::notifications_service_server::{self, NotificationsServiceServer};

pub use api::NotificationsApi;
pub use store::Store;

use crate::deliver::{DeliveryJob, Senders};
use crate::email::{EmailSender, Mailer, SmtpSettings, SmtpTls};
use crate::intake::{Intake, IntakeSettings};
use crate::live::Hub;
use crate::outbound::{Network, Policy};
use crate::sms::{SmsSender, SmsSettings};
use crate::webhooks::WebhookSender;

/// The name notifications publishes its events under, and its consumer group.
pub const SOURCE: &str = "notifications";

/// The contacts service: its events, and its customers' addresses and do-not-contact flags.
pub const CONTACTS_ROLE: &str = "contacts";

/// The tasks service: its assignments, reminders, overdue tasks and comments.
pub const TASKS_ROLE: &str = "tasks";

/// The deals service: its stage automations' notices.
pub const DEALS_ROLE: &str = "deals";

/// The services whose events it turns into notifications.
pub const CONSUMES: &[&str] = &[CONTACTS_ROLE, AUTH_ROLE, TASKS_ROLE, DEALS_ROLE];

/// The permissions the notifications service's calls check (a user's own inbox and preferences
/// need none).
pub mod permissions {
    use super::{Grant, Permission};

    /// Event types, templates and deliveries.
    pub const ADMIN: Permission = Permission {
        name: "notifications.admin",
        about: "change which events notify and how (channels, templates, webhooks), see deliveries and retry them",
        grant: Grant::Administrators,
        for_services: false,
    };
    /// E-mail and text messages to customers.
    pub const SEND: Permission = Permission {
        name: "notifications.send",
        about: "send e-mail and text messages to customers one may see",
        grant: Grant::Everyone,
        for_services: true,
    };
    pub const ALL: &[Permission] = &[ADMIN, SEND];
}

/// The environment variable holding the SMTP password (never a flag).
pub const SMTP_PASSWORD_ENV: &str = "CRM_SMTP_PASSWORD";
/// The environment variable holding the SMS provider's key (never a flag).
pub const SMS_KEY_ENV: &str = "CRM_SMS_API_KEY";

/// Settings of the notifications role.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Notifications service")]
pub struct NotificationsArgs {
    /// Language of notifications for users who chose none (a template in it, else English).
    #[arg(
        long = "notifications-default-locale",
        value_name = "LOCALE",
        env = "CRM_NOTIFICATIONS_DEFAULT_LOCALE",
        default_value = "en"
    )]
    pub default_locale: String,
    /// SMTP server that sends e-mail to users; empty: no e-mail (in-app only).
    #[arg(long = "smtp-host", value_name = "HOST", env = "CRM_SMTP_HOST", default_value = "")]
    pub smtp_host: String,
    /// Its port.
    #[arg(long = "smtp-port", value_name = "PORT", env = "CRM_SMTP_PORT", default_value_t = 587)]
    pub smtp_port: u16,
    /// How the connection is protected: starttls (port 587), tls (port 465) or none (a relay on
    /// the same host, a test server).
    #[arg(long = "smtp-tls", value_name = "MODE", env = "CRM_SMTP_TLS", value_enum, default_value = "starttls")]
    pub smtp_tls: SmtpTls,
    /// User name to sign in to the SMTP server with; its password is read from
    /// CRM_SMTP_PASSWORD only, never from a flag.
    #[arg(long = "smtp-username", value_name = "NAME", env = "CRM_SMTP_USERNAME")]
    pub smtp_username: Option<String>,
    /// Sender of every e-mail, e.g. "CRM <crm@example.com>".
    #[arg(long = "smtp-from", value_name = "MAILBOX", env = "CRM_SMTP_FROM", default_value = "")]
    pub smtp_from: String,
    /// How long one e-mail may take to hand over before the attempt counts as failed.
    #[arg(long = "smtp-timeout", value_name = "DURATION", env = "CRM_SMTP_TIMEOUT", default_value = "20s",
          value_parser = crm_kit::config::parse_duration)]
    pub smtp_timeout: Duration,
    /// SMS provider's endpoint: a JSON POST {"from", "to", "text", "reference"} with
    /// `Authorization: Bearer` and the key in CRM_SMS_API_KEY; empty: no text messages.
    #[arg(long = "sms-url", value_name = "URL", env = "CRM_SMS_URL", default_value = "")]
    pub sms_url: String,
    /// Sender name or number of text messages.
    #[arg(long = "sms-from", value_name = "SENDER", env = "CRM_SMS_FROM", default_value = "CRM")]
    pub sms_from: String,
    /// How long the SMS provider may take to answer.
    #[arg(long = "sms-timeout", value_name = "DURATION", env = "CRM_SMS_TIMEOUT", default_value = "10s",
          value_parser = crm_kit::config::parse_duration)]
    pub sms_timeout: Duration,
    /// Internal networks webhooks may reach, comma-separated CIDRs (10.20.0.0/16, fd00::/8):
    /// URLs resolving to loopback, private or link-local addresses are refused otherwise.
    #[arg(
        long = "webhooks-allow-networks",
        value_name = "CIDRS",
        env = "CRM_WEBHOOKS_ALLOW_NETWORKS",
        value_delimiter = ','
    )]
    pub webhooks_allow_networks: Vec<String>,
    /// How long a webhook receiver may take to answer.
    #[arg(long = "webhooks-timeout", value_name = "DURATION", env = "CRM_WEBHOOKS_TIMEOUT", default_value = "10s",
          value_parser = crm_kit::config::parse_duration)]
    pub webhooks_timeout: Duration,
    /// Pauses before each new attempt at a failed delivery, comma-separated; after the last, the
    /// delivery is dead (listed, retried by an administrator).
    #[arg(
        long = "notifications-retry-schedule",
        value_name = "DURATIONS",
        env = "CRM_NOTIFICATIONS_RETRY_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h"
    )]
    pub retry_schedule: String,
    /// How often a live stream looks for notifications without being woken (a wake-up lost
    /// while Redis was away only delays by this much).
    #[arg(long = "notifications-live-poll", value_name = "DURATION", env = "CRM_NOTIFICATIONS_LIVE_POLL",
          default_value = "5s", value_parser = crm_kit::config::parse_duration)]
    pub live_poll: Duration,
}

impl NotificationsArgs {
    pub fn default_locale(&self) -> Result<String, String> {
        render::normalize_locale(&self.default_locale).ok_or_else(|| {
            format!(
                "--notifications-default-locale must be a language tag such as en, ru or zh, got {:?}",
                self.default_locale
            )
        })
    }

    pub fn retry_schedule(&self) -> Result<Vec<Duration>, String> {
        let pauses: Vec<Duration> = self
            .retry_schedule
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(crm_kit::config::parse_duration)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--notifications-retry-schedule: {e}"))?;
        if pauses.len() > 20 {
            return Err("--notifications-retry-schedule: at most 20 pauses".into());
        }
        Ok(pauses)
    }

    /// The SMS provider, when text messages are on.
    pub fn sms(&self) -> Result<Option<SmsSettings>, String> {
        let url = self.sms_url.trim();
        if url.is_empty() {
            return Ok(None);
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("--sms-url {url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(format!("--sms-url {url:?} must be http:// or https://"));
        }
        let api_key = std::env::var(SMS_KEY_ENV).ok().filter(|k| !k.is_empty());
        Ok(Some(SmsSettings { url: url.to_string(), api_key, from: self.sms_from.clone(), timeout: self.sms_timeout }))
    }

    /// The networks webhooks may reach.
    pub fn webhook_policy(&self) -> Result<Policy, String> {
        let allowed = self
            .webhooks_allow_networks
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(|n| n.parse::<Network>().map_err(|e| format!("--webhooks-allow-networks: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Policy { allowed })
    }

    /// How long a delivery job holds its lease: three steps of its slowest channel, and some.
    pub fn lease(&self) -> Duration {
        self.smtp_timeout.max(self.sms_timeout).max(self.webhooks_timeout) * 3 + Duration::from_secs(5)
    }

    /// The SMTP settings, when e-mail is on.
    pub fn smtp(&self) -> Result<Option<SmtpSettings>, String> {
        let host = self.smtp_host.trim();
        if host.is_empty() {
            return Ok(None);
        }
        let from = self.smtp_from.trim();
        if from.is_empty() {
            return Err("--smtp-host is set but --smtp-from (CRM_SMTP_FROM) is not: e-mail needs a sender".into());
        }
        let from = from.parse().map_err(|e| format!("--smtp-from {from:?} is not a mailbox: {e}"))?;
        let password = std::env::var(SMTP_PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        let username = self.smtp_username.clone().filter(|u| !u.trim().is_empty());
        if username.is_some() != password.is_some() {
            return Err(format!("set both --smtp-username (CRM_SMTP_USERNAME) and {SMTP_PASSWORD_ENV}, or neither"));
        }
        Ok(Some(SmtpSettings {
            host: host.to_string(),
            port: self.smtp_port,
            tls: self.smtp_tls,
            username,
            password,
            from,
            timeout: self.smtp_timeout,
        }))
    }
}

/// The notifications role.
pub struct Notifications;

impl role::Service for Notifications {
    type Args = NotificationsArgs;

    const SPEC: RoleSpec = RoleSpec {
        name: SOURCE,
        title: "the notifications service",
        packages: &["crm.notifications.v1"],
        services: &[notifications_service_server::SERVICE_NAME],
        public_methods: &[],
        permissions: permissions::ALL,
        default_port: 50054,
        calls: Calls::Roles(&[AUTH_ROLE, CONTACTS_ROLE]),
        consumes: CONSUMES,
    };

    fn migrations() -> Option<Migrations> {
        Some(store::migrations())
    }

    async fn open(args: NotificationsArgs, ctx: Context) -> Result<Opened, role::Error> {
        let default_locale = args.default_locale()?;
        let schedule = args.retry_schedule()?;
        let smtp = args.smtp()?;
        let sms = args.sms()?;
        let policy = args.webhook_policy()?;
        let auth = ctx.peer(AUTH_ROLE)?;
        let contacts = ctx.peer(CONTACTS_ROLE)?;
        if ctx.service_credentials().is_none() {
            return Err(format!(
                "notifications looks users' addresses and supervisors up with the auth service, and customers' \
                 do-not-contact flags with the contacts service, as the suite's service account: set \
                 --service-client-id (CRM_SERVICE_CLIENT_ID) and {SERVICE_SECRET_ENV}"
            )
            .into());
        }
        let directory = Arc::new(RemoteDirectory::new(auth));
        let db = ctx.open_db(&store::migrations()).await?;
        let (outbox, relay) = ctx.outbox(&db);
        let store = Store::new(db.clone()).with_outbox(outbox);
        let hub = Hub::new();

        let intake_settings =
            IntakeSettings { default_locale: default_locale.clone(), email: smtp.is_some(), sms: sms.is_some() };
        let intake =
            Intake::new(store.clone(), Some(directory.clone()), intake_settings).with_contacts(contacts.clone());
        let consumer = ctx.events().consumer(SOURCE, &db, CONSUMES, Arc::new(intake));
        // Every replica hears every new notification and wakes the streams it holds.
        let listener = ctx.events().listener(SOURCE, {
            let hub = hub.clone();
            move |event| {
                if let Some(Ok(created)) = crm_kit::events::envelope::payload::<NotificationCreated>(&event.envelope) {
                    hub.announce(&created.recipient_id, created.sequence);
                }
            }
        });
        let mut channels = Vec::new();
        let mut senders = Senders {
            webhooks: Some(WebhookSender::new(store.clone(), policy.clone(), args.webhooks_timeout)?),
            ..Senders::default()
        };
        if let Some(settings) = &smtp {
            let mailer = Mailer::new(settings)?;
            senders.email = Some(EmailSender::new(store.clone(), directory.clone(), mailer, default_locale.clone()));
            channels.push(format!("e-mail through {}:{}", settings.host, settings.port));
        }
        if let Some(settings) = sms {
            channels.push(format!("SMS through {}", settings.url));
            senders.sms = Some(SmsSender::new(store.clone(), directory, settings, default_locale.clone())?);
        }
        channels.push("webhooks".into());
        let channels = format!("in-app, {}", channels.join(", "));
        tracing::info!(role = SOURCE, "delivers {channels}");
        let runner = Runner::new(db.clone(), RunnerSettings { lease: args.lease(), ..RunnerSettings::default() })
            .handle_external(
                store::deliveries::JOB_KIND,
                Arc::new(DeliveryJob::new(store.clone(), senders, schedule).with_contacts(contacts.clone())),
            );

        let api = NotificationsApi::new(store, hub.clone(), default_locale, args.live_poll)
            .with_webhook_policy(policy)
            .with_contacts(contacts);
        let server = ctx.server().add_service(NotificationsServiceServer::new(api)).authenticate(ctx.authenticator()?);
        Ok(Opened::new(server)
            .with_db(db)
            .banner(format!("Notifications: {channels}"))
            .job("event relay", move |shutdown| relay.run(shutdown))
            .job("event intake", move |shutdown| consumer.run(shutdown))
            .job("live inboxes", move |shutdown| listener.run(shutdown))
            .job("deliveries", move |shutdown| runner.run(shutdown))
            .job("stream closer", move |shutdown| async move {
                shutdown.wait().await;
                hub.close();
            }))
    }
}
