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

/// A new time-ordered id (UUIDv7) as text.
pub fn new_id() -> String {
    Uuid::now_v7().to_string()
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
        assert!(v.uuid("other", &new_id()).is_some());
        v.optional_uuid("company_id", "");
        let fields: Vec<_> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["name", "notes", "id"]);
        assert!(matches!(v.check(), Err(ApiError::InvalidArgument(_))));
        assert!(Violations::new().check().is_ok());
    }
}
