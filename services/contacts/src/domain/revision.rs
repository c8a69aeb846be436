//! Revisions: what changed in a record, field by field, rendered as text.

use std::collections::{BTreeMap, HashMap};

use crm_proto::contacts::v1::{CustomValue, LifecycleStage, custom_value};

use super::Record;

/// One field change of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub field: String,
    pub old: String,
    pub new: String,
}

/// The key fields that differ between `old` and `new` (`None` standing for no record).
pub fn diff<R: Record>(old: Option<&R>, new: Option<&R>) -> Vec<Change> {
    let before: BTreeMap<_, _> = old.map(|r| r.revision_fields()).unwrap_or_default().into_iter().collect();
    let after: BTreeMap<_, _> = new.map(|r| r.revision_fields()).unwrap_or_default().into_iter().collect();
    let fields: Vec<&'static str> =
        R::MASK.paths().iter().copied().filter(|p| before.contains_key(p) || after.contains_key(p)).collect();
    fields
        .into_iter()
        .filter_map(|field| {
            let old = before.get(field).cloned().unwrap_or_default();
            let new = after.get(field).cloned().unwrap_or_default();
            (old != new).then(|| Change { field: field.to_string(), old, new })
        })
        .collect()
}

pub(super) fn json_list<I: IntoIterator<Item = String>>(items: I) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() { String::new() } else { serde_json::to_string(&items).unwrap_or_default() }
}

pub(super) fn stage_name(stage: i32) -> String {
    match LifecycleStage::try_from(stage) {
        Ok(LifecycleStage::Unspecified) => String::new(),
        Ok(s) => s.as_str_name().trim_start_matches("LIFECYCLE_STAGE_").to_string(),
        Err(_) => stage.to_string(),
    }
}

pub(super) fn render_custom(fields: &HashMap<String, CustomValue>) -> String {
    if fields.is_empty() {
        return String::new();
    }
    let sorted: BTreeMap<&String, String> = fields
        .iter()
        .map(|(k, v)| {
            let text = match &v.kind {
                Some(custom_value::Kind::StringValue(s)) | Some(custom_value::Kind::DecimalValue(s)) => s.clone(),
                Some(custom_value::Kind::IntValue(i)) => i.to_string(),
                Some(custom_value::Kind::BoolValue(b)) => b.to_string(),
                Some(custom_value::Kind::TimeValue(t)) => t.to_string(),
                None => String::new(),
            };
            (k, text)
        })
        .collect();
    serde_json::to_string(&sorted).unwrap_or_default()
}
