//! A person: full name and their place at a company on top of the common ones.

use crm_kit::Violations;
use crm_kit::mask::Mask;
use crm_proto::contacts::v1::Person;

use super::common::{Common, View, common, meta_fields, search_text, trim, view};
use super::{Columns, Key, Kind, MAX_NAME, MAX_SHORT, Meta, Record, Rules};

impl Record for Person {
    const KIND: Kind = Kind::Person;
    const FIELD: &'static str = "person";

    const MASK: Mask<Self> = crm_kit::mask!(Person {
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
    });
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
            phone_digits: view!(self).phone_digits(),
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
