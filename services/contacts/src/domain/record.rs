//! What the service does with a company or a person: the [`Record`] trait both implement, and
//! the values kept beside a record (columns, duplicate keys, output-only meta).

use crm_kit::Violations;
use crm_kit::mask::Mask;

use super::{Kind, Rules};

/// Stored columns kept beside a record for filtering, sorting and search.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Columns {
    pub display_name: String,
    pub owner_id: String,
    pub stage: i64,
    pub source: String,
    pub region: String,
    pub industry: String,
    pub company_id: String,
    pub do_not_contact: i64,
    pub search_text: String,
    /// The digits of every phone (E.164 without '+'), space-separated: what a number typed into
    /// a search is looked for in.
    pub phone_digits: String,
}

/// A normalised value that only one record of a kind may hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// "phone", "email" or "name".
    pub field: &'static str,
    pub value: String,
}

/// Output-only values that live in columns, not in the stored document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_activity_at: i64,
    pub last_activity_summary: String,
    /// Deals won with the customer, the last one's time, and "EUR:123,USD:45" per currency.
    pub purchase_count: i64,
    pub last_purchase_at: i64,
    pub lifetime_values: String,
}

pub const MAX_NAME: usize = 300;
pub const MAX_SHORT: usize = 100;
pub const MAX_NOTES: usize = 10_000;
pub const MAX_LIST: usize = 20;
pub const MAX_TAGS: usize = 50;
pub const MAX_CUSTOM_FIELDS: usize = 100;

/// What the service does with a company or a person.
pub trait Record: prost::Message + Default + Clone + PartialEq + Send + Sync + Unpin + 'static {
    const KIND: Kind;
    /// The fields an update mask may name.
    const MASK: Mask<Self>;
    /// The request field holding the record ("company" / "person"), for violation paths.
    const FIELD: &'static str;

    fn id(&self) -> &str;
    fn etag(&self) -> &str;
    fn owner_id(&self) -> &str;
    fn set_owner_id(&mut self, owner_id: String);
    fn set_meta(&mut self, meta: &Meta);
    /// The output-only values, as set by [`Record::set_meta`].
    fn meta(&self) -> Meta;
    /// Tags, normalised.
    fn tags(&self) -> &[String];
    /// Clears output-only fields before storing the document.
    fn clear_meta(&mut self);
    fn columns(&self) -> Columns;
    /// Fills derived values (E.164 phones, lower-cased e-mails, tidy tags) and records every
    /// violation under `Self::FIELD`.
    fn normalize(&mut self, rules: &Rules, v: &mut Violations);
    /// Every key field rendered as text, for revisions.
    fn revision_fields(&self) -> Vec<(&'static str, String)>;
    /// Duplicate-protection keys.
    fn keys(&self) -> Vec<Key>;
}
