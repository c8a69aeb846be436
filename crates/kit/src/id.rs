//! Record ids: UUIDv7 (time-ordered, so new rows land at the end of every id index), as text.

/// A new id.
pub fn new() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_uuids_in_creation_order() {
        let (a, b) = (super::new(), super::new());
        assert!(uuid::Uuid::parse_str(&a).is_ok());
        assert!(a < b, "{a} then {b}");
    }
}
