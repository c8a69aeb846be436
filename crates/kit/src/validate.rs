//! Input validation: collect every field violation of a request, then fail once with a
//! `google.rpc.BadRequest` listing them all.

use uuid::Uuid;

use crate::error::ApiError;

/// The field violations found in one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations(Vec<(String, String)>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is invalid, saying why.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }

    /// `Ok(())` when nothing was recorded, else INVALID_ARGUMENT with every violation.
    pub fn check(self) -> Result<(), ApiError> {
        if self.0.is_empty() { Ok(()) } else { Err(ApiError::InvalidArgument(self)) }
    }

    /// Requires a non-blank value.
    pub fn required(&mut self, field: &str, value: &str) {
        if value.trim().is_empty() {
            self.add(field, "is required");
        }
    }

    /// Limits a text to `max` characters.
    pub fn max_chars(&mut self, field: &str, value: &str, max: usize) {
        if value.chars().count() > max {
            self.add(field, format!("must be at most {max} characters"));
        }
    }

    /// Limits a list to `max` items.
    pub fn max_items<T>(&mut self, field: &str, items: &[T], max: usize) {
        if items.len() > max {
            self.add(field, format!("must have at most {max} items"));
        }
    }

    /// Parses a required UUID; records a violation and returns `None` when it is not one.
    pub fn uuid(&mut self, field: &str, value: &str) -> Option<Uuid> {
        if value.is_empty() {
            self.add(field, "is required");
            return None;
        }
        match Uuid::parse_str(value) {
            Ok(id) => Some(id),
            Err(_) => {
                self.add(field, "must be a UUID");
                None
            }
        }
    }

    /// Like [`Violations::uuid`] for an optional reference: empty is fine.
    pub fn optional_uuid(&mut self, field: &str, value: &str) {
        if !value.is_empty() && Uuid::parse_str(value).is_err() {
            self.add(field, "must be a UUID");
        }
    }
}

/// The most characters of a client's value an error message quotes.
pub const QUOTE_CHARS: usize = 40;

/// A client's value as an error message quotes it: in single quotes, at most [`QUOTE_CHARS`]
/// characters of it (then `…`), so that an error never echoes a whole oversized input.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(QUOTE_CHARS * 4) + 4);
    out.push('\'');
    let mut chars = value.chars();
    out.extend(chars.by_ref().take(QUOTE_CHARS));
    if chars.next().is_some() {
        out.push('…');
    }
    out.push('\'');
    out
}

/// Cuts a text to at most `max` characters (an error message's safety net).
pub fn clip(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// Longest e-mail address, in bytes (RFC 5321: 254 octets).
pub const MAX_EMAIL_LEN: usize = 254;

/// An e-mail address as stored and compared: trimmed and lower-cased.
pub fn normalize_email(input: &str) -> String {
    input.trim().to_lowercase()
}

/// Whether a normalised address looks like an e-mail address: one `@`, a non-empty local part
/// of at most 64 bytes, a dotted domain without empty labels at its ends or inside, no spaces or
/// control characters, at most [`MAX_EMAIL_LEN`] bytes in all.
pub fn is_email(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else { return false };
    !local.is_empty()
        && local.len() <= 64
        && address.len() <= MAX_EMAIL_LEN
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !address.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The normalised address, if `input` is an e-mail address.
pub fn email(input: &str) -> Option<String> {
    let address = normalize_email(input);
    is_email(&address).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_all_violations() {
        let mut v = Violations::new();
        v.required("name", "  ");
        v.max_chars("notes", "abcd", 3);
        assert_eq!(v.uuid("id", "nope"), None);
        assert!(v.uuid("other", &crate::id::new()).is_some());
        v.optional_uuid("company_id", "");
        let fields: Vec<_> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["name", "notes", "id"]);
        assert!(matches!(v.check(), Err(ApiError::InvalidArgument(_))));
        assert!(Violations::new().check().is_ok());
    }

    #[test]
    fn quotes_only_a_prefix() {
        assert_eq!(quote("name"), "'name'");
        let long = "я".repeat(4000);
        let quoted = quote(&long);
        assert_eq!(quoted.chars().count(), QUOTE_CHARS + 3);
        assert!(quoted.ends_with("…'"));
        assert_eq!(clip("abcdef".into(), 3), "abc…");
        assert_eq!(clip("abc".into(), 3), "abc");
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(email("  Anna.Petrova@Example.COM ").as_deref(), Some("anna.petrova@example.com"));
        assert!(is_email("admin@crm.local"));
        for bad in [
            "",
            "anna",
            "anna@",
            "@example.com",
            "anna@example",
            "a b@example.com",
            "a@b@c.com",
            "a@.com",
            "a@b.",
            "a@b..com",
            "a@b",
            "a@@b.com",
            "a b@c.com",
        ] {
            assert_eq!(email(bad), None, "{bad}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert_eq!(email(&long_local), None);
        let long = format!("a@{}.com", "b".repeat(MAX_EMAIL_LEN));
        assert_eq!(email(&long), None);
    }
}
