//! Calendar feeds: a secret address per user that any calendar app subscribes to, answered
//! with the user's agenda as iCalendar (RFC 5545, written by the `icalendar` crate). Only the
//! token's SHA-256 is stored; a new token replaces the old, and revoking it ends the feed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use crm_proto::tasks::v1::{CalendarEvent, EventKind, Task};
use icalendar::{Calendar, Component, EventLike};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Where the gateway answers a feed: this, then the token.
pub const PATH_PREFIX: &str = "/calendar/";
/// How far back and ahead a feed reaches.
pub const PAST_DAYS: i64 = 30;
pub const AHEAD_DAYS: i64 = 365;

/// A new feed token: 32 random bytes, URL-safe.
pub fn new_token() -> String {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored of a token. A calendar app may have added ".ics" to the address.
pub fn token_hash(token: &str) -> String {
    let token = token.trim().strip_suffix(".ics").unwrap_or(token.trim());
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn utc(micros: i64) -> DateTime<chrono::Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// The agenda as an iCalendar document: each event a VEVENT with its times, place and
/// description; each open task a VEVENT at its due time (calendar apps show events, not to-dos).
pub fn render(name: &str, events: &[CalendarEvent], tasks: &[Task]) -> String {
    let mut calendar = Calendar::new();
    calendar.name(name);
    for e in events {
        let start = e.start_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
        let end = e.end_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(start);
        let kind = if e.kind == EventKind::Call as i32 { "Call" } else { "Meeting" };
        let mut event = icalendar::Event::new();
        event.uid(&format!("event-{}@crm", e.id)).summary(&e.title).starts(utc(start)).ends(utc(end));
        event.add_property("CATEGORIES", kind);
        if !e.location.is_empty() {
            event.location(&e.location);
        }
        if !e.description.is_empty() {
            event.description(&e.description);
        }
        calendar.push(event.done());
    }
    for t in tasks {
        let due = crate::domain::due_at(t);
        let mut event = icalendar::Event::new();
        event.uid(&format!("task-{}@crm", t.id)).summary(&format!("Task: {}", t.title)).starts(utc(due)).ends(utc(due));
        event.add_property("CATEGORIES", "Task");
        if !t.description.is_empty() {
            event.description(&t.description);
        }
        calendar.push(event.done());
    }
    calendar.done().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_secret_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(token_hash(&a), token_hash(&format!("{a}.ics")));
        assert_ne!(token_hash(&a), token_hash(&b));
        assert_eq!(token_hash(&a).len(), 64);
    }

    #[test]
    fn agendas_render_as_icalendar() {
        let at = |t: &str| crm_kit::time::to_timestamp(crm_kit::time::parse_rfc3339(t).unwrap());
        let event = CalendarEvent {
            id: "e1".into(),
            title: "Demo, with Acme; part 1".into(),
            location: "Room 4".into(),
            start_time: at("2026-12-08T09:00:00Z"),
            end_time: at("2026-12-08T10:00:00Z"),
            ..Default::default()
        };
        let task = Task {
            id: "t1".into(),
            title: "Send the offer".into(),
            due_time: at("2026-12-08T12:00:00Z"),
            ..Default::default()
        };
        let text = render("Alice's agenda", &[event], &[task]);
        assert!(text.starts_with("BEGIN:VCALENDAR\r\n"), "{text}");
        for line in [
            "VERSION:2.0",
            "UID:event-e1@crm",
            "DTSTART:20261208T090000Z",
            "DTEND:20261208T100000Z",
            "SUMMARY:Demo\\, with Acme\\; part 1",
            "LOCATION:Room 4",
            "UID:task-t1@crm",
            "SUMMARY:Task: Send the offer",
            "DTSTART:20261208T120000Z",
        ] {
            assert!(text.contains(&format!("{line}\r\n")), "{line} missing in\n{text}");
        }
        assert_eq!(text.matches("BEGIN:VEVENT").count(), 2);
        assert!(text.contains("DTSTAMP:"), "every event is stamped");
    }
}
