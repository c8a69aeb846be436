//! What contacts publishes (`crm.contacts.v1` events.proto), written with the change.

use crm_kit::events::envelope::envelope;
use crm_proto::contacts::v1::{ContactCreated, ContactDeleted, ContactOwnerChanged, ContactUpdated, FieldChange};
use crm_proto::events::v1::Envelope;

use crate::domain::{Change, Record};

const SOURCE: &str = "contacts";

fn owner_changed<R: Record>(record: &R, from: &str, to: &str, actor: &str) -> Envelope {
    let event = ContactOwnerChanged {
        record_type: R::KIND.record_type() as i32,
        id: record.id().to_string(),
        display_name: record.columns().display_name,
        from_owner_id: from.to_string(),
        to_owner_id: to.to_string(),
    };
    envelope(SOURCE, record.id(), actor, &event)
}

/// A record created by `actor`; created for someone else, it is also an assignment.
pub(super) fn created<R: Record>(record: &R, actor: &str, out: &mut Vec<Envelope>) {
    let c = record.columns();
    let event = ContactCreated {
        record_type: R::KIND.record_type() as i32,
        id: record.id().to_string(),
        display_name: c.display_name.clone(),
        owner_id: c.owner_id.clone(),
    };
    out.push(envelope(SOURCE, record.id(), actor, &event));
    if !c.owner_id.is_empty() && c.owner_id != actor {
        out.push(owner_changed(record, "", &c.owner_id, actor));
    }
}

/// A change (`changes`, now at `version`); a new owner is also an owner change.
pub(super) fn updated<R: Record>(old: &R, new: &R, version: i64, changes: &[Change], actor: &str) -> Vec<Envelope> {
    let (before, after) = (old.columns(), new.columns());
    let event = ContactUpdated {
        record_type: R::KIND.record_type() as i32,
        id: new.id().to_string(),
        display_name: after.display_name.clone(),
        owner_id: after.owner_id.clone(),
        version,
        changes: changes
            .iter()
            .map(|c| FieldChange { field: c.field.clone(), old_value: c.old.clone(), new_value: c.new.clone() })
            .collect(),
    };
    let mut out = vec![envelope(SOURCE, new.id(), actor, &event)];
    if before.owner_id != after.owner_id {
        out.push(owner_changed(new, &before.owner_id, &after.owner_id, actor));
    }
    out
}

pub(super) fn deleted<R: Record>(old: &R, actor: &str) -> Envelope {
    let c = old.columns();
    let event = ContactDeleted {
        record_type: R::KIND.record_type() as i32,
        id: old.id().to_string(),
        display_name: c.display_name,
        owner_id: c.owner_id,
    };
    envelope(SOURCE, old.id(), actor, &event)
}
