//! Users' preferences and language; administrators' event type settings and templates.

use std::collections::HashMap;

use crm_kit::ApiError;
use crm_kit::db::{Conn, Sql};
use crm_kit::time::now_micros;
use sqlx::Row;

use super::Store;

const TEMPLATE_COLUMNS: &str = "event_type, channel, locale, subject, body, updated_at, updated_by";

/// Channel numbers as stored: "1,2".
pub fn channels_text(channels: &[i32]) -> String {
    channels.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
}

pub fn channels_of(text: &str) -> Vec<i32> {
    text.split(',').filter_map(|c| c.trim().parse().ok()).collect()
}

/// An administrator's settings of an event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTypeSettings {
    pub default_channels: Vec<i32>,
    pub mandatory_in_app: bool,
    pub enabled: bool,
}

/// A user's language and chosen channels per event type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefs {
    pub locale: String,
    pub channels: HashMap<String, Vec<i32>>,
}

/// An administrator's template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTemplate {
    pub event_type: String,
    pub channel: i32,
    pub locale: String,
    pub subject: String,
    pub body: String,
    pub updated_at: i64,
    pub updated_by: String,
}

impl Store {
    /// Every event type an administrator changed.
    pub async fn event_type_settings(&self) -> Result<HashMap<String, EventTypeSettings>, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        self.event_type_settings_in(&mut conn).await
    }

    /// [`Store::event_type_settings`], read through `conn` (a transaction's, say).
    pub async fn event_type_settings_in(
        &self,
        conn: &mut Conn,
    ) -> Result<HashMap<String, EventTypeSettings>, ApiError> {
        let rows = Sql::new("SELECT name, default_channels, mandatory_in_app, enabled FROM event_types")
            .query()
            .fetch_all(conn)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("name")?,
                    EventTypeSettings {
                        default_channels: channels_of(&r.try_get::<String, _>("default_channels")?),
                        mandatory_in_app: r.try_get::<i64, _>("mandatory_in_app")? != 0,
                        enabled: r.try_get::<i64, _>("enabled")? != 0,
                    },
                ))
            })
            .collect()
    }

    /// The language and choices of each of `users`, read through `conn` (two statements per
    /// 500 users).
    pub async fn prefs_of(&self, conn: &mut Conn, users: &[&str]) -> Result<HashMap<String, Prefs>, ApiError> {
        let mut out: HashMap<String, Prefs> = HashMap::new();
        for chunk in users.chunks(500) {
            let mut sql = Sql::new("SELECT user_id, locale FROM user_settings WHERE ");
            sql.push_in("user_id", chunk.iter().copied());
            for row in sql.query().fetch_all(&mut *conn).await? {
                out.entry(row.try_get("user_id")?).or_default().locale = row.try_get("locale")?;
            }
            let mut sql = Sql::new("SELECT user_id, event_type, channels FROM preferences WHERE ");
            sql.push_in("user_id", chunk.iter().copied());
            for row in sql.query().fetch_all(&mut *conn).await? {
                let channels = channels_of(&row.try_get::<String, _>("channels")?);
                out.entry(row.try_get("user_id")?).or_default().channels.insert(row.try_get("event_type")?, channels);
            }
        }
        Ok(out)
    }

    /// The administrators' templates of `event_types` on `channel`, read through `conn`.
    pub async fn templates_of(
        &self,
        conn: &mut Conn,
        event_types: &[&str],
        channel: i32,
    ) -> Result<Vec<StoredTemplate>, ApiError> {
        if event_types.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT ");
        sql.push(TEMPLATE_COLUMNS).push(" FROM templates WHERE channel = ").bind(i64::from(channel));
        sql.push(" AND ").push_in("event_type", event_types.iter().copied());
        sql.query().fetch_all(conn).await?.iter().map(template_of).collect()
    }

    pub async fn put_event_type(&self, name: &str, s: &EventTypeSettings, by: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new(
            "INSERT INTO event_types (name, default_channels, mandatory_in_app, enabled, updated_at, updated_by) VALUES ",
        );
        sql.push_values([s], |v, s| {
            v.bind(name).bind(channels_text(&s.default_channels)).bind(i64::from(s.mandatory_in_app));
            v.bind(i64::from(s.enabled)).bind(now_micros()).bind(by);
        });
        sql.push(
            " ON CONFLICT (name) DO UPDATE SET default_channels = excluded.default_channels, \
             mandatory_in_app = excluded.mandatory_in_app, enabled = excluded.enabled, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        );
        sql.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// `user`'s language and choices.
    pub async fn prefs(&self, user: &str) -> Result<Prefs, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(self.prefs_of(&mut conn, &[user]).await?.remove(user).unwrap_or_default())
    }

    /// Sets `user`'s language (when `locale` is given) and their channels for the event types
    /// in `channels` (the others keep theirs).
    pub async fn set_prefs(
        &self,
        user: &str,
        locale: Option<&str>,
        channels: &[(String, Vec<i32>)],
    ) -> Result<(), ApiError> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        if let Some(locale) = locale {
            let mut sql = Sql::new("INSERT INTO user_settings (user_id, locale, updated_at) VALUES (");
            sql.bind(user).push(", ").bind(locale).push(", ").bind(now).push(")");
            sql.push(" ON CONFLICT (user_id) DO UPDATE SET locale = excluded.locale, updated_at = excluded.updated_at");
            sql.query().execute(&mut *tx).await?;
        }
        if !channels.is_empty() {
            let mut sql = Sql::new("INSERT INTO preferences (user_id, event_type, channels, updated_at) VALUES ");
            sql.push_values(channels, |v, (event_type, chosen)| {
                v.bind(user).bind(event_type.as_str()).bind(channels_text(chosen)).bind(now);
            });
            sql.push(
                " ON CONFLICT (user_id, event_type) DO UPDATE SET channels = excluded.channels, \
                 updated_at = excluded.updated_at",
            );
            sql.query().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Administrators' templates, narrowed by whichever of the keys are given.
    pub async fn templates(
        &self,
        event_type: Option<&str>,
        channel: Option<i32>,
        locale: Option<&str>,
    ) -> Result<Vec<StoredTemplate>, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(TEMPLATE_COLUMNS).push(" FROM templates WHERE 1 = 1");
        if let Some(event_type) = event_type {
            sql.push(" AND event_type = ").bind(event_type);
        }
        if let Some(channel) = channel {
            sql.push(" AND channel = ").bind(i64::from(channel));
        }
        if let Some(locale) = locale {
            sql.push(" AND locale = ").bind(locale);
        }
        sql.push(" ORDER BY event_type, channel, locale");
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        rows.iter().map(template_of).collect()
    }

    pub async fn put_template(&self, t: &StoredTemplate) -> Result<(), ApiError> {
        let mut sql = Sql::new(
            "INSERT INTO templates (event_type, channel, locale, subject, body, updated_at, updated_by) VALUES ",
        );
        sql.push_values([t], |v, t| {
            v.bind(t.event_type.as_str()).bind(i64::from(t.channel)).bind(t.locale.as_str());
            v.bind(t.subject.as_str()).bind(t.body.as_str()).bind(t.updated_at).bind(t.updated_by.as_str());
        });
        sql.push(
            " ON CONFLICT (event_type, channel, locale) DO UPDATE SET subject = excluded.subject, \
             body = excluded.body, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        );
        sql.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// Removes an administrator's template; whether there was one.
    pub async fn delete_template(&self, event_type: &str, channel: i32, locale: &str) -> Result<bool, ApiError> {
        let mut sql = Sql::new("DELETE FROM templates WHERE event_type = ");
        sql.bind(event_type).push(" AND channel = ").bind(i64::from(channel)).push(" AND locale = ").bind(locale);
        Ok(sql.query().execute(self.db.pool()).await?.rows_affected() > 0)
    }
}

fn template_of(r: &sqlx::any::AnyRow) -> Result<StoredTemplate, ApiError> {
    Ok(StoredTemplate {
        event_type: r.try_get("event_type")?,
        channel: i32::try_from(r.try_get::<i64, _>("channel")?).unwrap_or_default(),
        locale: r.try_get("locale")?,
        subject: r.try_get("subject")?,
        body: r.try_get("body")?,
        updated_at: r.try_get("updated_at")?,
        updated_by: r.try_get("updated_by")?,
    })
}
