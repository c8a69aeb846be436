//! Outgoing webhook subscriptions.

use crm_kit::ApiError;
use crm_kit::db::{Sql, Tx};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::notifications::v1::Webhook;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;

const COLUMNS: &str =
    "id, url, event_types, enabled, description, secret, previous_secret, previous_until, created_at, updated_at";

/// A subscription as stored, secrets included.
#[derive(Clone)]
pub struct StoredWebhook {
    pub webhook: Webhook,
    pub secret: String,
    pub previous_secret: String,
    pub previous_until: i64,
}

impl std::fmt::Debug for StoredWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredWebhook").field("webhook", &self.webhook).finish_non_exhaustive()
    }
}

impl StoredWebhook {
    /// The secrets that sign a delivery now: the current one, and the previous one during the
    /// day after a rotation.
    pub fn signing_secrets(&self, now: i64) -> Vec<&str> {
        let mut out = vec![self.secret.as_str()];
        if !self.previous_secret.is_empty() && self.previous_until > now {
            out.push(self.previous_secret.as_str());
        }
        out
    }
}

fn decode(row: &AnyRow) -> Result<StoredWebhook, ApiError> {
    let types: String = row.try_get("event_types")?;
    Ok(StoredWebhook {
        webhook: Webhook {
            id: row.try_get("id")?,
            url: row.try_get("url")?,
            event_types: types.split(',').filter(|t| !t.is_empty()).map(String::from).collect(),
            enabled: row.try_get::<i64, _>("enabled")? != 0,
            description: row.try_get("description")?,
            create_time: to_timestamp(row.try_get("created_at")?),
            update_time: to_timestamp(row.try_get("updated_at")?),
        },
        secret: row.try_get("secret")?,
        previous_secret: row.try_get("previous_secret")?,
        previous_until: row.try_get("previous_until")?,
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("webhook {id} not found"))
}

impl Store {
    pub async fn create_webhook(&self, w: &Webhook, secret: &str, by: &str) -> Result<StoredWebhook, ApiError> {
        let id = crm_kit::id::new();
        let now = now_micros();
        let mut sql = Sql::new("INSERT INTO webhooks (");
        sql.push(COLUMNS).push(", created_by) VALUES ");
        sql.push_values([w], |v, w| {
            v.bind(id.as_str()).bind(w.url.as_str()).bind(w.event_types.join(",")).bind(i64::from(w.enabled));
            v.bind(w.description.as_str()).bind(secret).bind("").bind(0_i64).bind(now).bind(now).bind(by);
        });
        sql.query().execute(self.db.pool()).await?;
        self.webhook(&id).await
    }

    pub async fn webhook(&self, id: &str) -> Result<StoredWebhook, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM webhooks WHERE id = ").bind(id);
        let row = sql.query().fetch_optional(self.db.pool()).await?.ok_or_else(|| not_found(id))?;
        decode(&row)
    }

    pub async fn webhooks(&self) -> Result<Vec<StoredWebhook>, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM webhooks ORDER BY created_at, id");
        sql.query().fetch_all(self.db.pool()).await?.iter().map(decode).collect()
    }

    /// Replaces the changeable fields of webhook `w.id`.
    pub async fn update_webhook(&self, w: &Webhook) -> Result<StoredWebhook, ApiError> {
        let mut sql = Sql::new("UPDATE webhooks SET url = ");
        sql.bind(w.url.as_str()).push(", event_types = ").bind(w.event_types.join(","));
        sql.push(", enabled = ").bind(i64::from(w.enabled)).push(", description = ").bind(w.description.as_str());
        sql.push(", updated_at = ").bind(now_micros()).push(" WHERE id = ").bind(w.id.as_str());
        if sql.query().execute(self.db.pool()).await?.rows_affected() == 0 {
            return Err(not_found(&w.id));
        }
        self.webhook(&w.id).await
    }

    /// A new secret; the old one keeps signing until `previous_until`.
    pub async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        previous_until: i64,
    ) -> Result<StoredWebhook, ApiError> {
        let mut sql = Sql::new("UPDATE webhooks SET previous_secret = secret, previous_until = ");
        sql.bind(previous_until).push(", secret = ").bind(secret).push(", updated_at = ").bind(now_micros());
        sql.push(" WHERE id = ").bind(id);
        if sql.query().execute(self.db.pool()).await?.rows_affected() == 0 {
            return Err(not_found(id));
        }
        self.webhook(id).await
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("DELETE FROM webhooks WHERE id = ");
        sql.bind(id);
        if sql.query().execute(self.db.pool()).await?.rows_affected() == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// The enabled webhooks and the event types each gets, read in `tx`.
    pub async fn enabled_webhooks(&self, tx: &mut Tx) -> Result<Vec<(String, Vec<String>)>, ApiError> {
        let rows =
            Sql::new("SELECT id, event_types FROM webhooks WHERE enabled = 1").query().fetch_all(&mut **tx).await?;
        rows.iter()
            .map(|row| {
                let types: String = row.try_get("event_types")?;
                Ok((row.try_get("id")?, types.split(',').filter(|t| !t.is_empty()).map(String::from).collect()))
            })
            .collect()
    }
}
