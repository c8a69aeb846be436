//! Text messages to users through an HTTP SMS provider: one small adapter, a JSON POST with a
//! bearer key, so that a real provider's own API can be added beside it.
//!
//! ```text
//! POST <--sms-url>
//! Authorization: Bearer <CRM_SMS_API_KEY>
//! Content-Type: application/json
//!
//! {"from": "<--sms-from>", "to": "+79161234567", "text": "…", "reference": "<delivery id>"}
//! ```
//!
//! Any 2xx is sent; 408, 429 and 5xx are tried again on the schedule; any other 4xx is refused
//! for good. `reference` is the same for every attempt at a delivery, so a provider can drop a
//! repeat.

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::RemoteDirectory;
use crm_proto::notifications::v1::Channel;
use serde_json::json;

use crate::outbound::{self, Policy};
use crate::store::{Attempt, AttemptResult, CUSTOMER_MESSAGE, Store};

/// Where and how text messages are sent.
#[derive(Clone)]
pub struct SmsSettings {
    pub url: String,
    pub api_key: Option<String>,
    pub from: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for SmsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsSettings").field("url", &self.url).field("from", &self.from).finish_non_exhaustive()
    }
}

pub struct SmsSender {
    store: Store,
    directory: Arc<RemoteDirectory>,
    settings: SmsSettings,
    client: reqwest::Client,
    /// The provider is the operator's own choice: any address.
    policy: Policy,
    default_locale: String,
}

impl SmsSender {
    pub fn new(
        store: Store,
        directory: Arc<RemoteDirectory>,
        settings: SmsSettings,
        default_locale: String,
    ) -> Result<SmsSender, String> {
        let policy = Policy { allowed: vec!["0.0.0.0/0".parse()?, "::/0".parse()?] };
        let client = policy.client(settings.timeout)?;
        Ok(SmsSender { store, directory, settings, client, policy, default_locale })
    }

    pub async fn attempt(&self, attempt: &Attempt) -> AttemptResult {
        self.send(attempt).await.unwrap_or_else(|failure| failure)
    }

    async fn send(&self, attempt: &Attempt) -> Result<AttemptResult, AttemptResult> {
        let (phone, text) = if attempt.event_type == CUSTOMER_MESSAGE {
            let draft = crate::deliver::customer_draft(attempt)?;
            (draft.to, draft.body)
        } else {
            let user = crate::deliver::recipient_user(&self.directory, &attempt.recipient_id).await?;
            let recipient = crate::render::recipient(Channel::Sms, &user.id, &user.display_name, &user.email);
            let out = crate::deliver::render_for(&self.store, attempt, Channel::Sms, recipient, &self.default_locale)
                .await
                .map_err(|(permanent, error)| AttemptResult::failed(permanent, error))?;
            (user.phone.trim().to_string(), out.body)
        };
        if phone.is_empty() {
            return Err(AttemptResult::failed(true, "the recipient has no phone number"));
        }
        let body = json!({"from": self.settings.from, "to": phone, "text": text, "reference": attempt.delivery_id});
        let mut headers = Vec::new();
        if let Some(key) = &self.settings.api_key {
            headers.push(("authorization", format!("Bearer {key}")));
        }
        let outcome =
            outbound::post(&self.client, &self.policy, &self.settings.url, &headers, body.to_string().into_bytes())
                .await;
        let retry = matches!(outcome.status, 0 | 408 | 429 | 500..=599);
        Ok(AttemptResult {
            sent: outcome.sent,
            permanent: !outcome.sent && (outcome.permanent || !retry),
            unknown: outcome.unknown,
            response_code: i32::from(outcome.status),
            error: outcome.error,
            address: phone,
            subject: String::new(),
            ..AttemptResult::default()
        })
    }
}
