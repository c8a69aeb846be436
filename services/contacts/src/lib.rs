//! The contacts service (SPEC C1, C3, C5, C7): companies and people, duplicate protection,
//! search and filters with keyset pagination, and revision history.

pub mod domain;
