//! Which template a notification uses: for each locale in the recipient's fallback list
//! ([`render::fallbacks`]), an administrator's template, else the shipped one.

use crm_kit::ApiError;
use crm_proto::notifications::v1::Channel;
use serde_json::Value;

use crate::render::{self, Rendered, Source};
use crate::store::{Store, StoredTemplate};

/// A template chosen for a notification.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub source: Source,
    pub locale: String,
    pub customized: bool,
}

/// The template of `event_type` on `channel` for a user of `locale`, read through `conn`.
pub async fn choose(
    store: &Store,
    conn: &mut crm_kit::db::Conn,
    event_type: &str,
    channel: Channel,
    locale: &str,
    default_locale: &str,
) -> Result<Option<Chosen>, ApiError> {
    let stored = store.templates_of(conn, &[event_type], channel as i32).await?;
    Ok(choose_from(&stored, event_type, channel, locale, default_locale))
}

/// The template of `event_type` on `channel` for a user of `locale`, among the administrators'
/// templates `stored` (any event types, channels and locales) and the shipped ones.
pub fn choose_from(
    stored: &[StoredTemplate],
    event_type: &str,
    channel: Channel,
    locale: &str,
    default_locale: &str,
) -> Option<Chosen> {
    for candidate in render::fallbacks(locale, default_locale) {
        let own =
            stored.iter().find(|t| t.event_type == event_type && t.channel == channel as i32 && t.locale == candidate);
        if let Some(t) = own {
            let source = Source { subject: t.subject.clone(), body: t.body.clone() };
            return Some(Chosen { source, locale: candidate, customized: true });
        }
        if let Some(source) = render::shipped(event_type, channel, &candidate) {
            return Some(Chosen { source, locale: candidate, customized: false });
        }
    }
    None
}

/// Renders `chosen` with `context`; an administrator's template that fails on this event falls
/// back to the shipped one of its locale (logged), so that a template never loses a
/// notification.
pub fn render_chosen(chosen: &Chosen, event_type: &str, channel: Channel, context: &Value) -> Result<Rendered, String> {
    match render::render(&chosen.source, context) {
        Ok(out) => Ok(out),
        Err(err) if chosen.customized => {
            tracing::warn!(event_type, ?channel, locale = %chosen.locale, error = %err,
                "an administrator's template failed on this event; the shipped one is used");
            let shipped = render::shipped(event_type, channel, &chosen.locale)
                .or_else(|| render::shipped(event_type, channel, "en"))
                .ok_or(err)?;
            render::render(&shipped, context)
        }
        Err(err) => Err(err),
    }
}
