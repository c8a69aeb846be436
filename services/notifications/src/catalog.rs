//! The event types that notify people, as shipped: who gets each (recipient rules over the
//! event's fields), on which channels by default, and a sample event for previews and template
//! checks. Administrators change channels, mandatory in-app and whether a type notifies at all
//! (stored in `event_types`); a new kind of notification is one entry here plus its templates.
//!
//! An event's variables come from its protobuf message by reflection over the suite's
//! descriptor set: every field by its proto name, so no event needs code to be templated.

use std::sync::OnceLock;

use crm_proto::notifications::v1::Channel;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;

/// Who gets a notification, read from the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// The user whose id is in this field of the event.
    Field(String),
    /// The supervisor (in the organisation) of the user whose id is in this field; for a user
    /// without one, the head of their department (or of the nearest one above with a head).
    SupervisorOf(String),
}

impl Recipient {
    /// "owner_id" or "supervisor_of:owner_id".
    pub fn parse(rule: &str) -> Option<Recipient> {
        match rule.split_once(':') {
            Some(("supervisor_of", field)) if is_field(field) => Some(Recipient::SupervisorOf(field.to_string())),
            None if is_field(rule) => Some(Recipient::Field(rule.to_string())),
            _ => None,
        }
    }
}

fn is_field(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// An event type that notifies, as shipped.
#[derive(Debug)]
pub struct EventSpec {
    /// The event's full protobuf name.
    pub name: &'static str,
    pub title: &'static str,
    /// Recipient rules ([`Recipient::parse`]).
    pub recipients: &'static [&'static str],
    pub default_channels: &'static [Channel],
    pub mandatory_in_app: bool,
    /// Whether the user who caused the event is left out (no notice of one's own action).
    pub skip_actor: bool,
    /// A sample event as JSON (proto field names), for previews and template checks.
    pub sample: &'static str,
}

impl EventSpec {
    pub fn recipient_rules(&self) -> Vec<Recipient> {
        self.recipients.iter().map(|r| Recipient::parse(r).expect("shipped rules parse")).collect()
    }
}

/// Every event type that notifies.
pub const EVENTS: &[EventSpec] = &[
    EventSpec {
        name: "crm.contacts.v1.ContactOwnerChanged",
        title: "A company or person was assigned or transferred to you",
        recipients: &["to_owner_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: true,
        sample: r#"{"record_type": "RECORD_TYPE_PERSON", "id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e6f",
                    "display_name": "Anna Petrova", "from_owner_id": "0190f5e2-0000-7000-8000-000000000001",
                    "to_owner_id": "0190f5e2-0000-7000-8000-000000000002"}"#,
    },
    EventSpec {
        name: "crm.auth.v1.UserLockedOut",
        title: "Your account was locked after wrong passwords",
        recipients: &["user_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: true,
        skip_actor: false,
        sample: r#"{"user_id": "0190f5e2-0000-7000-8000-000000000002", "email": "anna@example.com",
                    "failed_attempts": 5, "locked_until": "2026-12-01T10:15:00Z", "client_address": "203.0.113.7"}"#,
    },
    EventSpec {
        name: "crm.auth.v1.PasswordChanged",
        title: "Your password was changed",
        recipients: &["user_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: true,
        skip_actor: false,
        sample: r#"{"user_id": "0190f5e2-0000-7000-8000-000000000002", "by_self": false, "revoked_sessions": 2}"#,
    },
    EventSpec {
        name: "crm.tasks.v1.TaskAssigned",
        title: "A task was given to you",
        recipients: &["assignee_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: true,
        sample: r#"{"task_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e70", "title": "Send the renewal offer",
                    "assignee_id": "0190f5e2-0000-7000-8000-000000000002",
                    "creator_id": "0190f5e2-0000-7000-8000-000000000001", "due_time": "2026-12-08T08:00:00Z",
                    "due_local": "2026-12-08 09:00 Europe/Berlin", "priority": "PRIORITY_HIGH",
                    "customer_name": "Acme GmbH"}"#,
    },
    EventSpec {
        name: "crm.tasks.v1.TaskReminderDue",
        title: "A reminder of one of your tasks",
        recipients: &["assignee_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: false,
        sample: r#"{"task_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e70", "title": "Send the renewal offer",
                    "assignee_id": "0190f5e2-0000-7000-8000-000000000002", "due_time": "2026-12-08T08:00:00Z",
                    "due_local": "2026-12-08 09:00 Europe/Berlin", "customer_name": "Acme GmbH"}"#,
    },
    EventSpec {
        name: "crm.tasks.v1.TaskOverdue",
        title: "A task of someone you supervise is overdue",
        recipients: &["supervisor_of:assignee_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: false,
        sample: r#"{"task_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e70", "title": "Call back about the delivery",
                    "assignee_id": "0190f5e2-0000-7000-8000-000000000002", "assignee_name": "Anna Petrova",
                    "due_time": "2026-12-08T08:00:00Z", "due_local": "2026-12-08 09:00 Europe/Berlin",
                    "kind": "TASK_KIND_FOLLOW_UP", "customer_name": "Acme GmbH"}"#,
    },
    EventSpec {
        name: "crm.tasks.v1.CommentAdded",
        title: "A comment on your task or activity record",
        recipients: &["author_id", "creator_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: true,
        sample: r#"{"comment_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e71", "subject_type": "SUBJECT_TYPE_ACTIVITY",
                    "subject_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e72", "subject_title": "Called about the renewal",
                    "commenter_id": "0190f5e2-0000-7000-8000-000000000001", "commenter_name": "Ivan Sidorov",
                    "author_id": "0190f5e2-0000-7000-8000-000000000002", "creator_id": "",
                    "body": "Good. Offer them the two-year plan."}"#,
    },
    EventSpec {
        name: "crm.deals.v1.DealAutomationNotice",
        title: "A deal entered a stage whose automation tells you",
        recipients: &["recipient_id", "supervisor_of:supervisor_of_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: true,
        sample: r#"{"deal_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e73", "title": "Widgets for Acme",
                    "stage_name": "Payment", "message": "Send the invoice for Widgets for Acme",
                    "recipient_id": "0190f5e2-0000-7000-8000-000000000002", "supervisor_of_id": "",
                    "owner_id": "0190f5e2-0000-7000-8000-000000000002"}"#,
    },
    EventSpec {
        name: "crm.deals.v1.InstalmentDue",
        title: "An instalment of your contract is due soon and not paid yet",
        recipients: &["owner_id"],
        default_channels: &[Channel::InApp, Channel::Email],
        mandatory_in_app: false,
        skip_actor: false,
        sample: r#"{"contract_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e74", "number": "2026-041",
                    "deal_id": "0190f5e2-7c4a-7d1e-9a53-3f1c2b4d5e73", "owner_id": "0190f5e2-0000-7000-8000-000000000002",
                    "due_date": "2026-12-15", "amount_due": {"currency_code": "EUR", "minor_units": "250000"},
                    "amount_due_text": "2500.00 EUR",
                    "company_id": "", "person_id": ""}"#,
    },
];

/// The shipped event type `name`.
pub fn event(name: &str) -> Option<&'static EventSpec> {
    EVENTS.iter().find(|e| e.name == name)
}

/// Locales every shipped template exists in; others fall back (see [`crate::render`]).
pub const LOCALES: &[&str] = &["en", "ru", "zh"];

/// Channels that have templates (and that users choose).
pub const CHANNELS: &[Channel] = &[Channel::InApp, Channel::Email, Channel::Sms];

/// Every event a webhook may subscribe to: each message of the `events.proto` of a service
/// whose events this one consumes.
pub fn webhook_event_types() -> Vec<String> {
    let mut out: Vec<String> = pool()
        .files()
        .filter(|f| {
            let parts: Vec<&str> = f.name().split('/').collect();
            matches!(parts.as_slice(), ["crm", source, _, "events.proto"] if crate::CONSUMES.contains(source))
        })
        .flat_map(|f| f.messages().map(|m| m.full_name().to_string()).collect::<Vec<_>>())
        .collect();
    out.sort();
    out
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crm_proto::FILE_DESCRIPTOR_SET).expect("the suite's descriptor set decodes")
    })
}

fn descriptor(name: &str) -> Result<MessageDescriptor, String> {
    pool().get_message_by_name(name).ok_or_else(|| format!("no event type {name} in the suite"))
}

fn options() -> SerializeOptions {
    SerializeOptions::new().use_proto_field_name(true).skip_default_fields(false).stringify_64_bit_integers(false)
}

/// An event's fields as template variables: every field by its proto name, defaults included.
pub fn variables(event_type: &str, payload: &[u8]) -> Result<Value, String> {
    let message = DynamicMessage::decode(descriptor(event_type)?, payload)
        .map_err(|e| format!("{event_type} does not decode: {e}"))?;
    message.serialize_with_options(serde_json::value::Serializer, &options()).map_err(|e| e.to_string())
}

/// An event given as JSON (proto field names or JSON names), checked against its type and
/// completed with every field.
pub fn variables_from_json(event_type: &str, json: &str) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize(descriptor(event_type)?, &mut de)
        .map_err(|e| format!("is not a {event_type} as JSON: {e}"))?;
    de.end().map_err(|e| format!("is not a {event_type} as JSON: {e}"))?;
    message.serialize_with_options(serde_json::value::Serializer, &options()).map_err(|e| e.to_string())
}

/// The names of an event type's fields (`event.<name>` in templates).
pub fn field_names(event_type: &str) -> Vec<String> {
    descriptor(event_type).map(|d| d.fields().map(|f| f.name().to_string()).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_event_types_exist_and_their_samples_and_rules_hold() {
        for spec in EVENTS {
            let sample = variables_from_json(spec.name, spec.sample).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            for rule in spec.recipient_rules() {
                let (Recipient::Field(field) | Recipient::SupervisorOf(field)) = rule;
                assert!(sample.get(&field).is_some_and(Value::is_string), "{}: no text field {field}", spec.name);
            }
        }
    }

    #[test]
    fn events_decode_into_variables_with_every_field() {
        use prost::Message;
        let event = crm_proto::auth::v1::PasswordChanged { user_id: "u1".into(), by_self: true, revoked_sessions: 0 };
        let vars = variables("crm.auth.v1.PasswordChanged", &event.encode_to_vec()).unwrap();
        assert_eq!(vars["user_id"], "u1");
        assert_eq!(vars["by_self"], true);
        assert_eq!(vars["revoked_sessions"], 0, "defaults are variables too");
        assert!(variables("crm.auth.v1.NoSuchEvent", &[]).is_err());
    }

    #[test]
    fn webhooks_may_subscribe_to_the_consumed_services_events() {
        let types = webhook_event_types();
        for name in
            ["crm.contacts.v1.ContactCreated", "crm.contacts.v1.ContactOwnerChanged", "crm.auth.v1.UserLockedOut"]
        {
            assert!(types.iter().any(|t| t == name), "{name} in {types:?}");
        }
        assert!(!types.iter().any(|t| t.starts_with("crm.notifications.")), "not its own");
        assert!(!types.iter().any(|t| t == "crm.contacts.v1.Person"), "not API messages");
    }

    #[test]
    fn recipient_rules_parse() {
        assert_eq!(Recipient::parse("owner_id"), Some(Recipient::Field("owner_id".into())));
        assert_eq!(Recipient::parse("supervisor_of:owner_id"), Some(Recipient::SupervisorOf("owner_id".into())));
        assert_eq!(Recipient::parse("boss_of:owner_id"), None);
        assert_eq!(Recipient::parse("Owner Id"), None);
    }
}
