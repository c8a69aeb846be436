//! Keyset pagination (ARCHITECTURE §7): page sizes, opaque page tokens, and the one pager every
//! List uses.
//!
//! A listing walks an index in a fixed [`Order`]: a sort column and the row id that breaks ties.
//! A page token holds the sort key and id of the last row returned, plus a fingerprint of the
//! request's filter, order and query, so that a token cannot be replayed against a different
//! listing. The API decodes it once into a [`Page`]; the store asks the page for the keyset
//! condition and the order, and hands the rows back to make the next token. Token values are
//! only ever bound as SQL parameters.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::Sql;
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
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| not_ours())?;
        let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| not_ours())?;
        if cursor.fingerprint != fingerprint {
            return Err(ApiError::invalid("page_token", "was issued for a different filter, order_by or query"));
        }
        Ok(Some(cursor))
    }
}

fn not_ours() -> ApiError {
    ApiError::invalid("page_token", "is not a token returned by this listing")
}

/// The order of a keyset listing: `column` (also the name the row carries it under), then the
/// tie-breaking id column `tie`, both ascending or both descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    pub column: &'static str,
    pub tie: &'static str,
    /// Whether the column holds text (else a BIGINT).
    pub text: bool,
    pub desc: bool,
}

impl Order {
    /// Ascending by a text column, ties by `id`.
    pub const fn text(column: &'static str) -> Order {
        Order { column, tie: "id", text: true, desc: false }
    }

    /// Descending by a BIGINT column (newest first), ties by `id`.
    pub const fn newest(column: &'static str) -> Order {
        Order { column, tie: "id", text: false, desc: true }
    }

    /// The same order on other column names (an outer query over a subquery, a join alias).
    pub const fn on(self, column: &'static str, tie: &'static str) -> Order {
        Order { column, tie, ..self }
    }

    fn direction(&self) -> &'static str {
        if self.desc { " DESC" } else { " ASC" }
    }
}

/// One page of a listing, as the request asked for it: its size, and the position after which
/// it starts.
#[derive(Debug, Clone)]
pub struct Page {
    size: i64,
    after: Option<Cursor>,
    fingerprint: u64,
}

impl Page {
    /// Decodes `page_size` (AIP-158) and `page_token` of a listing in `order` whose request
    /// `parts` (its name, filter, query, order…) must stay the same from page to page.
    pub fn decode(parts: &[&str], page_size: i32, page_token: &str, order: &Order) -> Result<Page, ApiError> {
        let size = self::page_size(page_size, "page_size")?;
        let fingerprint = fingerprint(parts);
        let after = Cursor::decode(page_token, fingerprint)?;
        if let Some(cursor) = &after
            && matches!(cursor.key, KeyValue::Text(_)) != order.text
        {
            return Err(not_ours());
        }
        Ok(Page { size, after, fingerprint })
    }

    /// How many rows the page holds at most.
    pub fn size(&self) -> i64 {
        self.size
    }

    /// ` AND (column, tie) >= (key, id) AND NOT (column = key AND tie = id)` (`<=` when
    /// descending): the rows after the previous page. Nothing on the first page.
    ///
    /// The same rows as `(column, tie) > (key, id)`, and the same index
    /// bound; but PostgreSQL estimates a row comparison by its first column alone, and for a
    /// key many rows share (a last activity time of 0: never contacted) `column > key` looks
    /// empty, so it would walk the sort's index through everyone's rows instead of the owner's
    /// own index. `column >= key` keeps every such row in the estimate.
    pub fn push_after(&self, sql: &mut Sql, order: &Order) {
        self.push_after_as(sql, order, "", false);
    }

    /// [`Page::push_after`] for SQLite, with the key written `(+column, +tie)`, which SQLite
    /// never takes as a bound of the sort's index: for a listing whose rows a filter's own
    /// index chooses (then sorted), where SQLite would otherwise walk the sort's index from the
    /// key and filter every row after it (at 1M people, the fifth page of those marked
    /// do-not-contact by name: 169 ms that way, 2.7 ms through their own index). Not PostgreSQL
    /// (no unary `+` on text).
    pub fn push_after_unbounded(&self, sql: &mut Sql, order: &Order) {
        self.push_after_as(sql, order, "+", false);
    }

    /// [`Page::push_after`] for a statement PostgreSQL keeps prepared, a walk of one index
    /// whatever its values: the bound is `((SELECT key), (SELECT id))`, values the planner does
    /// not look into. PostgreSQL keeps one plan for any values only when it is estimated to cost
    /// no more than the plans made with them; with the key in sight, a plan made for the key was
    /// always estimated cheaper than the one for any key (whose range it guesses at a third of
    /// the index), so every later page was planned again (a tag's walk at 1M people: about 0.3
    /// ms of the database's 0.6 per listing). Out of sight, every plan is estimated alike, and
    /// after five runs the one kept is used: the same index walk, the bound still its start.
    pub fn push_after_unplanned(&self, sql: &mut Sql, order: &Order) {
        self.push_after_as(sql, order, "", true);
    }

    fn push_after_as(&self, sql: &mut Sql, order: &Order, prefix: &str, unplanned: bool) {
        let Some(cursor) = &self.after else { return };
        sql.push(" AND (").push(prefix).push(order.column).push(", ").push(prefix).push(order.tie).push(") ");
        sql.push(if order.desc { "<= (" } else { ">= (" });
        let key = |sql: &mut Sql| {
            match &cursor.key {
                KeyValue::Int(v) => sql.bind(*v),
                KeyValue::Text(v) => sql.bind(v.as_str()),
            };
        };
        if unplanned {
            sql.push("(SELECT ");
            key(sql);
            sql.push("), (SELECT ").bind(cursor.id.as_str()).push(")");
        } else {
            key(sql);
            sql.push(", ").bind(cursor.id.as_str());
        }
        sql.push(") AND NOT (").push(order.column).push(" = ");
        key(sql);
        sql.push(" AND ").push(order.tie).push(" = ").bind(cursor.id.as_str()).push(")");
    }

    /// ` ORDER BY column, tie` in the order's direction.
    pub fn push_order(&self, sql: &mut Sql, order: &Order) {
        let dir = order.direction();
        sql.push(" ORDER BY ").push(order.column).push(dir).push(", ").push(order.tie).push(dir);
    }

    /// ` LIMIT size + 1`: one row more than the page tells whether another page follows.
    pub fn push_limit(&self, sql: &mut Sql) {
        sql.limit(self.size + 1);
    }

    /// [`Page::push_after`], [`Page::push_order`] and [`Page::push_limit`] in one.
    pub fn push_keyset(&self, sql: &mut Sql, order: &Order) {
        self.push_after(sql, order);
        self.push_order(sql, order);
        self.push_limit(sql);
    }

    /// The page's items from `rows` (fetched with [`Page::push_limit`]) and the next page's
    /// token, empty after the last page. Each row carries the order's column and tie.
    pub fn finish<T>(
        &self,
        rows: &[AnyRow],
        order: &Order,
        mut decode: impl FnMut(&AnyRow) -> Result<T, ApiError>,
    ) -> Result<(Vec<T>, String), ApiError> {
        let take = rows.len().min(self.size as usize);
        let items = rows[..take].iter().map(&mut decode).collect::<Result<Vec<T>, ApiError>>()?;
        let next = match rows[..take].last() {
            Some(last) if rows.len() > take => {
                let key = if order.text {
                    KeyValue::Text(last.try_get(order.column)?)
                } else {
                    KeyValue::Int(last.try_get(order.column)?)
                };
                Cursor::new(key, last.try_get(order.tie)?, self.fingerprint).encode()
            }
            _ => String::new(),
        };
        Ok((items, next))
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

    #[test]
    fn pages_build_keyset_conditions() {
        let order = Order::text("name");
        let first = Page::decode(&["roles"], 2, "", &order).unwrap();
        let mut sql = Sql::new("SELECT id, name FROM roles WHERE 1=1");
        first.push_keyset(&mut sql, &order);
        assert_eq!(sql.text(), "SELECT id, name FROM roles WHERE 1=1 ORDER BY name ASC, id ASC LIMIT 3");

        let token = Cursor::new(KeyValue::Text("Sales".into()), "r-9".into(), fingerprint(&["roles"])).encode();
        let next = Page::decode(&["roles"], 2, &token, &order).unwrap();
        let mut sql = Sql::new("SELECT id, name FROM roles WHERE 1=1");
        next.push_keyset(&mut sql, &order);
        assert_eq!(
            sql.text(),
            "SELECT id, name FROM roles WHERE 1=1 AND (name, id) >= ($1, $2) AND NOT (name = $3 AND id = $4) \
             ORDER BY name ASC, id ASC LIMIT 3"
        );
        let mut sql = Sql::new("SELECT id, name FROM roles WHERE 1=1");
        next.push_after_unbounded(&mut sql, &order);
        assert_eq!(
            sql.text(),
            "SELECT id, name FROM roles WHERE 1=1 AND (+name, +id) >= ($1, $2) AND NOT (name = $3 AND id = $4)"
        );
        let mut sql = Sql::new("SELECT id FROM roles WHERE 1=1");
        next.push_after_unplanned(&mut sql, &order);
        assert_eq!(
            sql.text(),
            "SELECT id FROM roles WHERE 1=1 AND (name, id) >= ((SELECT $1), (SELECT $2)) AND NOT (name = $3 AND id = $4)"
        );
        let mut sql = Sql::new("SELECT 1");
        first.push_after_unbounded(&mut sql, &order);
        first.push_after_unplanned(&mut sql, &order);
        assert_eq!(sql.text(), "SELECT 1", "nothing before the first page");
        let events = Order::newest("occurred_at");
        assert!(Page::decode(&["roles"], 2, &token, &events).is_err(), "a text key does not suit a time order");
        assert!(Page::decode(&["users"], 2, &token, &order).is_err(), "another listing's token");
    }
}
