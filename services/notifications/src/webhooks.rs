//! Outgoing webhooks, signed per the Standard Webhooks scheme (standardwebhooks.com), so that
//! receivers verify them with that scheme's libraries:
//!
//! - `webhook-id`: the delivery's id, the same on every attempt (receivers drop repeats by it);
//! - `webhook-timestamp`: Unix seconds of the attempt (receivers refuse old ones: replays);
//! - `webhook-signature`: `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` with the
//!   subscription's secret (`whsec_<base64 key>`), and during a day after a rotation a second
//!   `v1,…` with the previous secret, space-separated.
//!
//! The body is the event as JSON: `{"id", "type", "source", "subject_id", "actor_id",
//! "timestamp", "data": {its fields by proto name}}`. Any 2xx is delivered; anything else is
//! tried again on the schedule; the URL is checked against the network policy on every attempt
//! ([`crate::outbound`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crm_kit::time::now_micros;
use ring::hmac;
use serde_json::{Value, json};

use crate::outbound::{self, Policy};
use crate::store::{Attempt, AttemptResult, Store};

/// How long the previous secret keeps signing after a rotation.
pub const ROTATION_OVERLAP_MICROS: i64 = 24 * 3600 * 1_000_000;

/// A new secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(key))
}

/// The `webhook-signature` value for `body` sent as `id` at `timestamp` (Unix seconds), one
/// `v1,…` per secret.
pub fn signature(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let mut out = Vec::new();
    for secret in secrets {
        let key = STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
            .map_err(|e| format!("a stored webhook secret is not base64: {e}"))?;
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &signed);
        out.push(format!("v1,{}", STANDARD.encode(tag.as_ref())));
    }
    Ok(out.join(" "))
}

/// The body of a webhook for an event.
pub fn payload(id: &str, event_type: &str, source: &str, subject: &str, actor: &str, time: &str, data: Value) -> Value {
    json!({
        "id": id,
        "type": event_type,
        "source": source,
        "subject_id": subject,
        "actor_id": actor,
        "timestamp": time,
        "data": data,
    })
}

pub struct WebhookSender {
    store: Store,
    client: reqwest::Client,
    policy: Policy,
}

impl WebhookSender {
    pub fn new(store: Store, policy: Policy, timeout: std::time::Duration) -> Result<WebhookSender, String> {
        Ok(WebhookSender { client: policy.client(timeout)?, store, policy })
    }

    pub async fn attempt(&self, attempt: &Attempt) -> AttemptResult {
        let hook = match self.store.webhook(&attempt.recipient_id).await {
            Ok(hook) => hook,
            Err(crm_kit::ApiError::NotFound(_)) => return AttemptResult::failed(true, "the webhook was deleted"),
            Err(err) => return AttemptResult::failed(false, err.to_string()),
        };
        if !hook.webhook.enabled {
            return AttemptResult::failed(true, "the webhook is disabled");
        }
        let body = attempt.variables.clone().into_bytes();
        let timestamp = now_micros() / 1_000_000;
        let signature = match signature(&hook.signing_secrets(now_micros()), &attempt.delivery_id, timestamp, &body) {
            Ok(s) => s,
            Err(err) => return AttemptResult::failed(true, err),
        };
        let headers = [
            ("webhook-id", attempt.delivery_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let outcome = outbound::post(&self.client, &self.policy, &hook.webhook.url, &headers, body).await;
        AttemptResult {
            sent: outcome.sent,
            permanent: outcome.permanent,
            unknown: outcome.unknown,
            response_code: i32::from(outcome.status),
            error: outcome.error,
            address: hook.webhook.url,
            subject: attempt.event_type.clone(),
            ..AttemptResult::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_scheme() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let two = signature(&[secret, secret], "msg", 1, b"x").unwrap();
        assert_eq!(two.split(' ').count(), 2);
        assert!(new_secret().starts_with("whsec_"));
        assert_ne!(new_secret(), new_secret());
    }
}
