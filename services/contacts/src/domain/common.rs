//! The parts companies and people share (phones, e-mails, addresses, tags, stage, owner,
//! notes, custom fields…): their normalisation and validation, how they render into
//! revisions, search text and duplicate keys, and the macros that lend them to both records.

use std::collections::{HashMap, HashSet};

use crm_kit::Violations;
use crm_proto::contacts::v1::{
    CustomValue, Email, ImportantDate, LifecycleStage, Phone, PostalAddress, SocialHandle, custom_value,
};

use super::revision::{json_list, render_custom, stage_name};
use super::{Key, MAX_CUSTOM_FIELDS, MAX_LIST, MAX_NAME, MAX_NOTES, MAX_SHORT, MAX_TAGS, Rules, normalize};

/// The parts companies and people share, borrowed for normalisation and rendering.
pub(super) struct Common<'a> {
    pub(super) phones: &'a mut Vec<Phone>,
    pub(super) emails: &'a mut Vec<Email>,
    pub(super) social_handles: &'a mut Vec<SocialHandle>,
    pub(super) addresses: &'a mut Vec<PostalAddress>,
    pub(super) tags: &'a mut Vec<String>,
    pub(super) source: &'a mut String,
    pub(super) stage: i32,
    pub(super) owner_id: &'a mut String,
    pub(super) region: &'a mut String,
    pub(super) do_not_contact: bool,
    pub(super) do_not_contact_reason: &'a mut String,
    pub(super) important_dates: &'a mut Vec<ImportantDate>,
    pub(super) notes: &'a mut String,
    pub(super) custom_fields: &'a mut HashMap<String, CustomValue>,
}

/// The shared parts, read-only: for rendering, search text and keys.
pub(super) struct View<'a> {
    pub(super) phones: &'a [Phone],
    pub(super) emails: &'a [Email],
    pub(super) social_handles: &'a [SocialHandle],
    pub(super) addresses: &'a [PostalAddress],
    pub(super) tags: &'a [String],
    pub(super) source: &'a str,
    pub(super) stage: i32,
    pub(super) owner_id: &'a str,
    pub(super) region: &'a str,
    pub(super) do_not_contact: bool,
    pub(super) do_not_contact_reason: &'a str,
    pub(super) important_dates: &'a [ImportantDate],
    pub(super) notes: &'a str,
    pub(super) custom_fields: &'a HashMap<String, CustomValue>,
}

pub(super) fn trim(s: &mut String) {
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

pub(super) fn is_decimal(s: &str) -> bool {
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
    pub(super) fn normalize(self, rules: &Rules, p: &str, v: &mut Violations) {
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
    pub(super) fn render(&self, out: &mut Vec<(&'static str, String)>) {
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

    pub(super) fn search_parts(&self, out: &mut Vec<String>) {
        out.extend(self.emails.iter().map(|e| e.address.clone()));
        out.extend(self.social_handles.iter().map(|s| s.handle.to_lowercase()));
        out.push(self.region.to_lowercase());
    }

    pub(super) fn phone_digits(&self) -> String {
        let numbers: Vec<&str> = self.phones.iter().map(|p| p.e164.trim_start_matches('+')).collect();
        numbers.join(" ")
    }

    pub(super) fn keys(&self, out: &mut Vec<Key>) {
        out.extend(self.phones.iter().map(|p| Key { field: "phone", value: p.e164.clone() }));
        out.extend(self.emails.iter().map(|e| Key { field: "email", value: e.address.clone() }));
    }
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
            self.last_activity_summary = meta.last_activity_summary.clone();
            self.purchase_count = meta.purchase_count as i32;
            self.last_purchase_time = crm_kit::time::to_timestamp(meta.last_purchase_at);
            self.lifetime_value = super::common::lifetime_values(&meta.lifetime_values);
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
                last_activity_summary: self.last_activity_summary.clone(),
                purchase_count: i64::from(self.purchase_count),
                last_purchase_at: micros(&self.last_purchase_time),
                lifetime_values: super::common::lifetime_text(&self.lifetime_value),
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
            self.last_activity_summary.clear();
            self.purchase_count = 0;
            self.last_purchase_time = None;
            self.lifetime_value.clear();
        }
    };
}

pub(super) use {common, meta_fields, view};

/// "EUR:12345,USD:500" as values per currency.
pub(crate) fn lifetime_values(text: &str) -> Vec<crm_proto::contacts::v1::LifetimeValue> {
    text.split(',')
        .filter_map(|pair| pair.split_once(':'))
        .filter_map(|(currency, n)| {
            Some(crm_proto::contacts::v1::LifetimeValue {
                currency_code: currency.to_string(),
                minor_units: n.parse().ok()?,
            })
        })
        .collect()
}

/// Values per currency as stored: "EUR:12345,USD:500".
pub(crate) fn lifetime_text(values: &[crm_proto::contacts::v1::LifetimeValue]) -> String {
    values.iter().map(|v| format!("{}:{}", v.currency_code, v.minor_units)).collect::<Vec<_>>().join(",")
}

pub(super) fn search_text(mut parts: Vec<String>) -> String {
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}
