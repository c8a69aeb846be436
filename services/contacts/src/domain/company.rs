//! A company: its own fields (name, industry, website) on top of the common ones; its
//! normalised name is a duplicate key.

use crm_kit::Violations;
use crm_kit::mask::Mask;
use crm_proto::contacts::v1::Company;

use super::common::{Common, View, common, meta_fields, search_text, trim, view};
use super::normalize;
use super::{Columns, Key, Kind, MAX_NAME, MAX_SHORT, Meta, Record, Rules};

impl Record for Company {
    const KIND: Kind = Kind::Company;
    const FIELD: &'static str = "company";

    const MASK: Mask<Self> = crm_kit::mask!(Company {
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
    });
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
            phone_digits: view!(self).phone_digits(),
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
