//! The rules of the customer base in plain Rust, without I/O: what a valid company or person
//! is, how it is normalised, which keys protect it from duplicates, what is indexed and
//! searched, how a field mask applies, and what a revision records.

pub mod normalize;

use std::collections::{BTreeMap, HashMap, HashSet};

use crm_kit::Violations;
use crm_proto::contacts::v1::{
    Company, CustomValue, Email, ImportantDate, LifecycleStage, Person, Phone, PostalAddress, RecordType, SocialHandle,
    custom_value,
};

/// The two kinds of customer record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Company,
    Person,
}

impl Kind {
    pub fn record_type(self) -> RecordType {
        match self {
            Kind::Company => RecordType::Company,
            Kind::Person => RecordType::Person,
        }
    }

    pub fn from_record_type(value: i64) -> Option<Kind> {
        match RecordType::try_from(i32::try_from(value).ok()?).ok()? {
            RecordType::Company => Some(Kind::Company),
            RecordType::Person => Some(Kind::Person),
            RecordType::Unspecified => None,
        }
    }

    /// "company" / "person", for messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Company => "company",
            Kind::Person => "person",
        }
    }
}

/// Service-wide settings the rules depend on.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Country calling code for phone numbers entered without one ("7", "49"); empty: refuse.
    pub default_calling_code: String,
}

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
    /// Field names an update mask may name.
    const PATHS: &'static [&'static str];
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
    /// Copies one field named by an update mask from `src`; false for an unknown name.
    fn apply_path(&mut self, src: &Self, path: &str) -> bool;
    /// Every key field rendered as text, for revisions.
    fn revision_fields(&self) -> Vec<(&'static str, String)>;
    /// Duplicate-protection keys.
    fn keys(&self) -> Vec<Key>;
}

/// Applies an update mask; unknown paths are violations. "*" names every writable field.
pub fn apply_mask<R: Record>(target: &mut R, src: &R, paths: &[String], v: &mut Violations) {
    if paths.is_empty() {
        v.add("update_mask", "is required; name the fields to change, or \"*\" for all");
        return;
    }
    for path in paths {
        if path == "*" {
            for p in R::PATHS {
                target.apply_path(src, p);
            }
        } else if !target.apply_path(src, path) {
            v.add("update_mask", format!("unknown field '{path}'; updatable: {}", R::PATHS.join(", ")));
        }
    }
}

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
        R::PATHS.iter().copied().filter(|p| before.contains_key(p) || after.contains_key(p)).collect();
    fields
        .into_iter()
        .filter_map(|field| {
            let old = before.get(field).cloned().unwrap_or_default();
            let new = after.get(field).cloned().unwrap_or_default();
            (old != new).then(|| Change { field: field.to_string(), old, new })
        })
        .collect()
}

fn json_list<I: IntoIterator<Item = String>>(items: I) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() { String::new() } else { serde_json::to_string(&items).unwrap_or_default() }
}

fn stage_name(stage: i32) -> String {
    match LifecycleStage::try_from(stage) {
        Ok(LifecycleStage::Unspecified) => String::new(),
        Ok(s) => s.as_str_name().trim_start_matches("LIFECYCLE_STAGE_").to_string(),
        Err(_) => stage.to_string(),
    }
}

fn render_custom(fields: &HashMap<String, CustomValue>) -> String {
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

/// The parts companies and people share, borrowed for normalisation and rendering.
struct Common<'a> {
    phones: &'a mut Vec<Phone>,
    emails: &'a mut Vec<Email>,
    social_handles: &'a mut Vec<SocialHandle>,
    addresses: &'a mut Vec<PostalAddress>,
    tags: &'a mut Vec<String>,
    source: &'a mut String,
    stage: i32,
    owner_id: &'a mut String,
    region: &'a mut String,
    do_not_contact: bool,
    do_not_contact_reason: &'a mut String,
    important_dates: &'a mut Vec<ImportantDate>,
    notes: &'a mut String,
    custom_fields: &'a mut HashMap<String, CustomValue>,
}

/// The shared parts, read-only: for rendering, search text and keys.
struct View<'a> {
    phones: &'a [Phone],
    emails: &'a [Email],
    social_handles: &'a [SocialHandle],
    addresses: &'a [PostalAddress],
    tags: &'a [String],
    source: &'a str,
    stage: i32,
    owner_id: &'a str,
    region: &'a str,
    do_not_contact: bool,
    do_not_contact_reason: &'a str,
    important_dates: &'a [ImportantDate],
    notes: &'a str,
    custom_fields: &'a HashMap<String, CustomValue>,
}

fn trim(s: &mut String) {
    let t = s.trim();
    if t.len() != s.len() {
        *s = t.to_string();
    }
}

fn days_in_month(month: i32, year: i32) -> i32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year != 0 && (year % 4 != 0 || (year % 100 == 0 && year % 400 != 0)) => 28,
        2 => 29,
        _ => 0,
    }
}

fn is_decimal(s: &str) -> bool {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let mut parts = body.splitn(2, '.');
    let int = parts.next().unwrap_or_default();
    let frac = parts.next();
    !int.is_empty()
        && int.chars().all(|c| c.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
        && body.len() <= 40
}

impl Common<'_> {
    fn normalize(self, rules: &Rules, p: &str, v: &mut Violations) {
        v.max_items(&format!("{p}.phones"), self.phones, MAX_LIST);
        let mut seen = HashSet::new();
        self.phones.retain_mut(|phone| {
            trim(&mut phone.label);
            match normalize::phone_e164(&phone.number, &rules.default_calling_code) {
                Ok(e164) => {
                    phone.e164 = e164;
                    phone.number = phone.number.trim().to_string();
                    seen.insert(phone.e164.clone())
                }
                Err(_) => true,
            }
        });
        for (i, phone) in self.phones.iter().enumerate() {
            if let Err(e) = normalize::phone_e164(&phone.number, &rules.default_calling_code) {
                v.add(format!("{p}.phones[{i}].number"), e.describe());
            }
            v.max_chars(&format!("{p}.phones[{i}].label"), &phone.label, MAX_SHORT);
        }

        v.max_items(&format!("{p}.emails"), self.emails, MAX_LIST);
        let mut seen = HashSet::new();
        let mut bad = Vec::new();
        for (i, email) in self.emails.iter_mut().enumerate() {
            trim(&mut email.label);
            v.max_chars(&format!("{p}.emails[{i}].label"), &email.label, MAX_SHORT);
            match crm_kit::validate::email(&email.address) {
                Some(addr) => email.address = addr,
                None => bad.push(i),
            }
        }
        for i in bad {
            v.add(format!("{p}.emails[{i}].address"), "is not an e-mail address");
        }
        self.emails.retain(|e| seen.insert(e.address.clone()));

        v.max_items(&format!("{p}.social_handles"), self.social_handles, MAX_LIST);
        for (i, s) in self.social_handles.iter_mut().enumerate() {
            trim(&mut s.network);
            trim(&mut s.handle);
            s.network = s.network.to_lowercase();
            v.required(&format!("{p}.social_handles[{i}].network"), &s.network);
            v.required(&format!("{p}.social_handles[{i}].handle"), &s.handle);
            v.max_chars(&format!("{p}.social_handles[{i}].network"), &s.network, MAX_SHORT);
            v.max_chars(&format!("{p}.social_handles[{i}].handle"), &s.handle, MAX_SHORT);
        }

        v.max_items(&format!("{p}.addresses"), self.addresses, MAX_LIST);
        for (i, a) in self.addresses.iter_mut().enumerate() {
            for field in [&mut a.label, &mut a.locality, &mut a.region, &mut a.postal_code, &mut a.country_code] {
                trim(field);
            }
            a.country_code = a.country_code.to_ascii_uppercase();
            if !a.country_code.is_empty()
                && (a.country_code.len() != 2 || !a.country_code.chars().all(|c| c.is_ascii_alphabetic()))
            {
                v.add(format!("{p}.addresses[{i}].country_code"), "must be an ISO 3166-1 alpha-2 code such as \"DE\"");
            }
            v.max_items(&format!("{p}.addresses[{i}].lines"), &a.lines, 5);
            for (j, line) in a.lines.iter().enumerate() {
                v.max_chars(&format!("{p}.addresses[{i}].lines[{j}]"), line, MAX_NAME);
            }
        }

        let mut tags: Vec<String> = Vec::new();
        for (i, tag) in self.tags.iter().enumerate() {
            let t = tag.trim().to_lowercase();
            if t.is_empty() {
                v.add(format!("{p}.tags[{i}]"), "must not be empty");
            } else if t.chars().count() > 64 {
                v.add(format!("{p}.tags[{i}]"), "must be at most 64 characters");
            } else if !tags.contains(&t) {
                tags.push(t);
            }
        }
        *self.tags = tags;
        v.max_items(&format!("{p}.tags"), self.tags, MAX_TAGS);

        trim(self.source);
        *self.source = self.source.to_lowercase();
        v.max_chars(&format!("{p}.source"), self.source, MAX_SHORT);
        trim(self.region);
        v.max_chars(&format!("{p}.region"), self.region, MAX_SHORT);
        if LifecycleStage::try_from(self.stage).is_err() {
            v.add(format!("{p}.stage"), "is not a LifecycleStage value");
        }
        trim(self.owner_id);
        v.optional_uuid(&format!("{p}.owner_id"), self.owner_id);
        trim(self.do_not_contact_reason);
        if self.do_not_contact && self.do_not_contact_reason.is_empty() {
            v.add(format!("{p}.do_not_contact_reason"), "is required when do_not_contact is set");
        }
        v.max_chars(&format!("{p}.do_not_contact_reason"), self.do_not_contact_reason, MAX_NAME);

        v.max_items(&format!("{p}.important_dates"), self.important_dates, MAX_LIST);
        for (i, d) in self.important_dates.iter_mut().enumerate() {
            trim(&mut d.kind);
            v.required(&format!("{p}.important_dates[{i}].kind"), &d.kind);
            if !(0..=9999).contains(&d.year) {
                v.add(format!("{p}.important_dates[{i}].year"), "must be 0 (unknown) or a year up to 9999");
            }
            if !(1..=12).contains(&d.month) {
                v.add(format!("{p}.important_dates[{i}].month"), "must be 1 to 12");
            } else if d.day < 1 || d.day > days_in_month(d.month, d.year) {
                v.add(format!("{p}.important_dates[{i}].day"), "is not a day of that month");
            }
            v.max_chars(&format!("{p}.important_dates[{i}].note"), &d.note, MAX_NAME);
        }

        v.max_chars(&format!("{p}.notes"), self.notes, MAX_NOTES);

        if self.custom_fields.len() > MAX_CUSTOM_FIELDS {
            v.add(format!("{p}.custom_fields"), format!("must have at most {MAX_CUSTOM_FIELDS} entries"));
        }
        let mut keys: Vec<&String> = self.custom_fields.keys().collect();
        keys.sort();
        for key in keys {
            let field = format!("{p}.custom_fields[{key:?}]");
            let valid_key = key.len() <= 64
                && key.starts_with(|c: char| c.is_ascii_lowercase())
                && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_key {
                v.add(&field, "keys are 1-64 characters of a-z, 0-9 and _, starting with a letter");
            }
            match &self.custom_fields[key].kind {
                None => v.add(&field, "needs a value"),
                Some(custom_value::Kind::StringValue(s)) if s.chars().count() > 1000 => {
                    v.add(&field, "text values must be at most 1000 characters")
                }
                Some(custom_value::Kind::DecimalValue(s)) if !is_decimal(s) => {
                    v.add(&field, "decimal_value must look like \"-12.50\"")
                }
                _ => {}
            }
        }
    }
}

impl View<'_> {
    fn render(&self, out: &mut Vec<(&'static str, String)>) {
        out.push(("phones", json_list(self.phones.iter().map(|p| p.e164.clone()))));
        out.push(("emails", json_list(self.emails.iter().map(|e| e.address.clone()))));
        out.push((
            "social_handles",
            json_list(self.social_handles.iter().map(|s| format!("{}:{}", s.network, s.handle))),
        ));
        out.push((
            "addresses",
            json_list(self.addresses.iter().map(|a| {
                let mut parts: Vec<&str> = a.lines.iter().map(String::as_str).collect();
                parts.extend([a.locality.as_str(), a.region.as_str(), a.postal_code.as_str(), a.country_code.as_str()]);
                parts.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", ")
            })),
        ));
        out.push(("tags", json_list(self.tags.iter().cloned())));
        out.push(("source", self.source.to_string()));
        out.push(("stage", stage_name(self.stage)));
        out.push(("owner_id", self.owner_id.to_string()));
        out.push(("region", self.region.to_string()));
        out.push(("do_not_contact", if self.do_not_contact { "true".into() } else { String::new() }));
        out.push(("do_not_contact_reason", self.do_not_contact_reason.to_string()));
        out.push((
            "important_dates",
            json_list(self.important_dates.iter().map(|d| {
                let date = if d.year == 0 {
                    format!("--{:02}-{:02}", d.month, d.day)
                } else {
                    format!("{:04}-{:02}-{:02}", d.year, d.month, d.day)
                };
                format!("{} {date} {}", d.kind, d.note).trim().to_string()
            })),
        ));
        out.push(("notes", self.notes.to_string()));
        out.push(("custom_fields", render_custom(self.custom_fields)));
    }

    fn search_parts(&self, out: &mut Vec<String>) {
        out.extend(self.emails.iter().map(|e| e.address.clone()));
        out.extend(self.phones.iter().map(|p| p.e164.clone()));
        out.extend(self.social_handles.iter().map(|s| s.handle.to_lowercase()));
        out.push(self.region.to_lowercase());
    }

    fn keys(&self, out: &mut Vec<Key>) {
        out.extend(self.phones.iter().map(|p| Key { field: "phone", value: p.e164.clone() }));
        out.extend(self.emails.iter().map(|e| Key { field: "email", value: e.address.clone() }));
    }
}

macro_rules! mask_paths {
    ($($field:ident),* $(,)?) => {
        const PATHS: &'static [&'static str] = &[$(stringify!($field)),*];

        fn apply_path(&mut self, src: &Self, path: &str) -> bool {
            match path {
                $(stringify!($field) => { self.$field = src.$field.clone(); true })*
                _ => false,
            }
        }
    };
}

macro_rules! common {
    ($r:expr) => {
        Common {
            phones: &mut $r.phones,
            emails: &mut $r.emails,
            social_handles: &mut $r.social_handles,
            addresses: &mut $r.addresses,
            tags: &mut $r.tags,
            source: &mut $r.source,
            stage: $r.stage,
            owner_id: &mut $r.owner_id,
            region: &mut $r.region,
            do_not_contact: $r.do_not_contact,
            do_not_contact_reason: &mut $r.do_not_contact_reason,
            important_dates: &mut $r.important_dates,
            notes: &mut $r.notes,
            custom_fields: &mut $r.custom_fields,
        }
    };
}

macro_rules! view {
    ($r:expr) => {
        View {
            phones: &$r.phones,
            emails: &$r.emails,
            social_handles: &$r.social_handles,
            addresses: &$r.addresses,
            tags: &$r.tags,
            source: &$r.source,
            stage: $r.stage,
            owner_id: &$r.owner_id,
            region: &$r.region,
            do_not_contact: $r.do_not_contact,
            do_not_contact_reason: &$r.do_not_contact_reason,
            important_dates: &$r.important_dates,
            notes: &$r.notes,
            custom_fields: &$r.custom_fields,
        }
    };
}

macro_rules! meta_fields {
    () => {
        fn id(&self) -> &str {
            &self.id
        }

        fn etag(&self) -> &str {
            &self.etag
        }

        fn owner_id(&self) -> &str {
            &self.owner_id
        }

        fn set_owner_id(&mut self, owner_id: String) {
            self.owner_id = owner_id;
        }

        fn set_meta(&mut self, meta: &Meta) {
            self.id = meta.id.clone();
            self.etag = meta.version.to_string();
            self.create_time = crm_kit::time::to_timestamp(meta.created_at);
            self.update_time = crm_kit::time::to_timestamp(meta.updated_at);
            self.last_activity_time = crm_kit::time::to_timestamp(meta.last_activity_at);
        }

        fn meta(&self) -> Meta {
            let micros =
                |t: &Option<prost_types::Timestamp>| t.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
            Meta {
                id: self.id.clone(),
                version: self.etag.parse().unwrap_or(0),
                created_at: micros(&self.create_time),
                updated_at: micros(&self.update_time),
                last_activity_at: micros(&self.last_activity_time),
            }
        }

        fn tags(&self) -> &[String] {
            &self.tags
        }

        fn clear_meta(&mut self) {
            self.id.clear();
            self.etag.clear();
            self.create_time = None;
            self.update_time = None;
            self.last_activity_time = None;
        }
    };
}

fn search_text(mut parts: Vec<String>) -> String {
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

impl Record for Company {
    const KIND: Kind = Kind::Company;
    const FIELD: &'static str = "company";

    mask_paths!(
        name,
        industry,
        region,
        website,
        phones,
        emails,
        social_handles,
        addresses,
        tags,
        source,
        stage,
        owner_id,
        do_not_contact,
        do_not_contact_reason,
        important_dates,
        notes,
        custom_fields,
    );
    meta_fields!();

    fn columns(&self) -> Columns {
        let mut parts = vec![self.name.to_lowercase(), self.industry.to_lowercase(), self.website.to_lowercase()];
        view!(self).search_parts(&mut parts);
        Columns {
            display_name: self.name.clone(),
            owner_id: self.owner_id.clone(),
            stage: i64::from(self.stage),
            source: self.source.clone(),
            region: self.region.clone(),
            industry: self.industry.clone(),
            company_id: String::new(),
            do_not_contact: i64::from(self.do_not_contact),
            search_text: search_text(parts),
        }
    }

    fn normalize(&mut self, rules: &Rules, v: &mut Violations) {
        let p = Self::FIELD;
        for field in [&mut self.name, &mut self.industry, &mut self.website] {
            trim(field);
        }
        v.required(&format!("{p}.name"), &self.name);
        v.max_chars(&format!("{p}.name"), &self.name, MAX_NAME);
        v.max_chars(&format!("{p}.industry"), &self.industry, MAX_SHORT);
        v.max_chars(&format!("{p}.website"), &self.website, MAX_NAME);
        common!(self).normalize(rules, p, v);
    }

    fn revision_fields(&self) -> Vec<(&'static str, String)> {
        let mut out =
            vec![("name", self.name.clone()), ("industry", self.industry.clone()), ("website", self.website.clone())];
        view!(self).render(&mut out);
        out
    }

    fn keys(&self) -> Vec<Key> {
        let mut keys = vec![Key { field: "name", value: normalize::company_name(&self.name) }];
        view!(self).keys(&mut keys);
        keys.sort();
        keys.dedup();
        keys
    }
}

impl Record for Person {
    const KIND: Kind = Kind::Person;
    const FIELD: &'static str = "person";

    mask_paths!(
        full_name,
        company_id,
        company_role,
        phones,
        emails,
        social_handles,
        addresses,
        tags,
        source,
        stage,
        owner_id,
        region,
        do_not_contact,
        do_not_contact_reason,
        important_dates,
        notes,
        custom_fields,
    );
    meta_fields!();

    fn columns(&self) -> Columns {
        let mut parts = vec![self.full_name.to_lowercase(), self.company_role.to_lowercase()];
        view!(self).search_parts(&mut parts);
        Columns {
            display_name: self.full_name.clone(),
            owner_id: self.owner_id.clone(),
            stage: i64::from(self.stage),
            source: self.source.clone(),
            region: self.region.clone(),
            industry: String::new(),
            company_id: self.company_id.clone(),
            do_not_contact: i64::from(self.do_not_contact),
            search_text: search_text(parts),
        }
    }

    fn normalize(&mut self, rules: &Rules, v: &mut Violations) {
        let p = Self::FIELD;
        for field in [&mut self.full_name, &mut self.company_id, &mut self.company_role] {
            trim(field);
        }
        v.required(&format!("{p}.full_name"), &self.full_name);
        v.max_chars(&format!("{p}.full_name"), &self.full_name, MAX_NAME);
        v.optional_uuid(&format!("{p}.company_id"), &self.company_id);
        v.max_chars(&format!("{p}.company_role"), &self.company_role, MAX_SHORT);
        common!(self).normalize(rules, p, v);
    }

    fn revision_fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("full_name", self.full_name.clone()),
            ("company_id", self.company_id.clone()),
            ("company_role", self.company_role.clone()),
        ];
        view!(self).render(&mut out);
        out
    }

    fn keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        view!(self).keys(&mut keys);
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Lower-cased search terms of a text query; empty when there is nothing to search for.
pub fn search_terms(query: &str) -> Vec<String> {
    query.split_whitespace().map(|t| t.to_lowercase()).take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules { default_calling_code: "7".into() }
    }

    fn person() -> Person {
        Person {
            full_name: "  Анна Петрова ".into(),
            phones: vec![
                Phone { number: "8 (916) 123-45-67".into(), ..Default::default() },
                Phone { number: "+7 916 1234567".into(), label: "dup".into(), ..Default::default() },
            ],
            emails: vec![Email { address: "Anna@Example.com".into(), label: String::new() }],
            tags: vec!["VIP".into(), "vip ".into(), "wholesale".into()],
            stage: LifecycleStage::Customer as i32,
            ..Default::default()
        }
    }

    #[test]
    fn normalises_a_person() {
        let mut p = person();
        let mut v = Violations::new();
        p.normalize(&rules(), &mut v);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(p.full_name, "Анна Петрова");
        assert_eq!(p.phones.len(), 1, "the same number twice is kept once");
        assert_eq!(p.phones[0].e164, "+79161234567");
        assert_eq!(p.emails[0].address, "anna@example.com");
        assert_eq!(p.tags, ["vip", "wholesale"]);
        assert_eq!(
            p.keys(),
            vec![
                Key { field: "email", value: "anna@example.com".into() },
                Key { field: "phone", value: "+79161234567".into() },
            ]
        );
        let cols = p.columns();
        assert_eq!(cols.search_text, "анна петрова anna@example.com +79161234567");
        assert_eq!(cols.stage, 3);
    }

    #[test]
    fn reports_every_violation_with_its_path() {
        let mut p = Person {
            full_name: " ".into(),
            phones: vec![Phone { number: "abc".into(), ..Default::default() }],
            emails: vec![Email { address: "nope".into(), label: String::new() }],
            owner_id: "bob".into(),
            stage: 42,
            do_not_contact: true,
            important_dates: vec![ImportantDate {
                kind: "birthday".into(),
                month: 2,
                day: 30,
                year: 1990,
                note: String::new(),
            }],
            custom_fields: HashMap::from([
                ("Bad Key".to_string(), CustomValue { kind: Some(custom_value::Kind::IntValue(1)) }),
                ("budget".to_string(), CustomValue { kind: Some(custom_value::Kind::DecimalValue("1.2.3".into())) }),
            ]),
            ..Default::default()
        };
        let mut v = Violations::new();
        p.normalize(&rules(), &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "person.full_name",
                "person.phones[0].number",
                "person.emails[0].address",
                "person.stage",
                "person.owner_id",
                "person.do_not_contact_reason",
                "person.important_dates[0].day",
                "person.custom_fields[\"Bad Key\"]",
                "person.custom_fields[\"budget\"]",
            ]
        );
    }

    #[test]
    fn company_keys_include_the_normalised_name() {
        let mut c = Company { name: "ООО «Ромашка»".into(), ..Default::default() };
        c.normalize(&rules(), &mut Violations::new());
        assert_eq!(c.keys(), vec![Key { field: "name", value: "ромашка".into() }]);
    }

    #[test]
    fn masks_copy_only_named_fields() {
        let mut target = person();
        let src = Person { full_name: "New".into(), notes: "n".into(), ..Default::default() };
        let mut v = Violations::new();
        apply_mask(&mut target, &src, &["notes".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!(target.notes, "n");
        assert_eq!(target.full_name, "  Анна Петрова ");
        apply_mask(&mut target, &src, &["id".into(), "nope".into()], &mut v);
        assert_eq!(v.iter().count(), 2);
        let mut v = Violations::new();
        apply_mask(&mut target, &src, &[], &mut v);
        assert!(!v.is_empty());
        let mut v = Violations::new();
        apply_mask(&mut target, &src, &["*".into()], &mut v);
        assert_eq!(target, Person { full_name: "New".into(), notes: "n".into(), ..Default::default() });
    }

    #[test]
    fn diff_lists_changed_key_fields() {
        let mut old = person();
        old.normalize(&rules(), &mut Violations::new());
        let mut new = old.clone();
        new.stage = LifecycleStage::Lost as i32;
        new.tags.push("churned".into());
        let changes = diff(Some(&old), Some(&new));
        assert_eq!(
            changes,
            vec![
                Change {
                    field: "tags".into(),
                    old: r#"["vip","wholesale"]"#.into(),
                    new: r#"["vip","wholesale","churned"]"#.into()
                },
                Change { field: "stage".into(), old: "CUSTOMER".into(), new: "LOST".into() },
            ]
        );
        let created = diff(None, Some(&old));
        assert!(created.iter().any(|c| c.field == "full_name" && c.old.is_empty() && c.new == "Анна Петрова"));
        assert!(created.iter().all(|c| !c.new.is_empty()), "creation lists only fields that are set");
        assert!(diff(Some(&old), Some(&old)).is_empty());
    }

    #[test]
    fn decimals() {
        for ok in ["0", "-12.50", "+3", "1000000.0001"] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in ["", ".5", "5.", "1e3", "1.2.3", "abc"] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }
}
