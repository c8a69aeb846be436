//! Keyset pagination: page sizes and opaque page tokens (ARCHITECTURE §7).
//!
//! A token holds the sort key and id of the last row returned, plus a fingerprint of the
//! request's filter, order and query, so that a token cannot be replayed against a different
//! listing. Its values are only ever bound as SQL parameters.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// AIP-158 page size: 0 means the default, larger than the maximum is coerced down, negative is
/// an error.
pub fn page_size(requested: i32, field: &str) -> Result<i64, ApiError> {
    match i64::from(requested) {
        n if n < 0 => Err(ApiError::invalid(field, "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// The sort-key value of the last row of a page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyValue {
    Int(i64),
    Text(String),
}

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "k")]
    pub key: KeyValue,
    #[serde(rename = "i")]
    pub id: String,
    #[serde(rename = "f")]
    fingerprint: u64,
}

/// A stable fingerprint (FNV-1a) of the parts of a request that must not change between pages.
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

impl Cursor {
    pub fn new(key: KeyValue, id: String, fingerprint: u64) -> Self {
        Cursor { key, id, fingerprint }
    }

    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("cursor serialises"))
    }

    /// Decodes `token` for a request with this `fingerprint`; empty means the first page.
    pub fn decode(token: &str, fingerprint: u64) -> Result<Option<Cursor>, ApiError> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || ApiError::invalid("page_token", "is not a token returned by this listing");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if cursor.fingerprint != fingerprint {
            return Err(ApiError::invalid("page_token", "was issued for a different filter, order_by or query"));
        }
        Ok(Some(cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_follow_aip_158() {
        assert_eq!(page_size(0, "page_size").unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7, "page_size").unwrap(), 7);
        assert_eq!(page_size(5000, "page_size").unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1, "page_size").is_err());
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_the_request() {
        let f = fingerprint(&["stage = LEAD", "create_time desc"]);
        let c = Cursor::new(KeyValue::Int(42), "id-1".into(), f);
        let token = c.encode();
        assert_eq!(Cursor::decode(&token, f).unwrap(), Some(c));
        assert!(Cursor::decode(&token, fingerprint(&["stage = LOST", "create_time desc"])).is_err());
        assert!(Cursor::decode("not a token!", f).is_err());
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(b"{}"), f).is_err());
        assert_eq!(Cursor::decode("", f).unwrap(), None);
        let text = Cursor::new(KeyValue::Text("Acme".into()), "id-2".into(), f);
        assert_eq!(Cursor::decode(&text.encode(), f).unwrap(), Some(text));
    }

    #[test]
    fn fingerprint_separates_parts() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
    }
}
