//! The rules of the customer base in plain Rust, without I/O: what a valid company or person
//! is, how it is normalised, which keys protect it from duplicates, what is indexed and
//! searched, how a field mask applies, and what a revision records.
//!
//! - [`record`]: the [`Record`] trait both kinds implement, and what is kept beside a record;
//! - [`common`](self): the parts companies and people share, normalised and rendered once;
//! - [`company`](self), [`person`](self): each kind's own fields;
//! - [`revision`]: field-by-field changes; [`search`]: query terms; [`normalize`]: phones,
//!   e-mails and company names for duplicate protection.

mod common;
mod company;
pub mod normalize;
mod person;
pub mod record;
pub mod revision;
pub mod search;

use crm_proto::contacts::v1::RecordType;

pub(crate) use common::lifetime_text;
pub use record::{Columns, Key, MAX_CUSTOM_FIELDS, MAX_LIST, MAX_NAME, MAX_NOTES, MAX_SHORT, MAX_TAGS, Meta, Record};
pub use revision::{Change, diff};

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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crm_kit::Violations;
    use crm_proto::contacts::v1::{
        Company, CustomValue, Email, ImportantDate, LifecycleStage, Person, Phone, custom_value,
    };

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
        assert_eq!(cols.search_text, "анна петрова anna@example.com");
        assert_eq!(cols.phone_digits, "79161234567");
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
        Person::MASK.apply(&mut target, &src, &["notes".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!(target.notes, "n");
        assert_eq!(target.full_name, "  Анна Петрова ");
        Person::MASK.apply(&mut target, &src, &["id".into(), "nope".into()], &mut v);
        assert_eq!(v.iter().count(), 2);
        let mut v = Violations::new();
        Person::MASK.apply(&mut target, &src, &[], &mut v);
        assert!(!v.is_empty());
        let mut v = Violations::new();
        Person::MASK.apply(&mut target, &src, &["*".into()], &mut v);
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
            assert!(common::is_decimal(ok), "{ok}");
        }
        for bad in ["", ".5", "5.", "1e3", "1.2.3", "abc"] {
            assert!(!common::is_decimal(bad), "{bad}");
        }
    }
}
