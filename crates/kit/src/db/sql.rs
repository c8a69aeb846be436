//! SQL assembled from fixed fragments and `$n` placeholders: values only ever go into binds.

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AssertSqlSafe};

/// A value bound to a SQL parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

impl From<String> for Bind {
    fn from(v: String) -> Self {
        Bind::Text(v)
    }
}

impl From<&str> for Bind {
    fn from(v: &str) -> Self {
        Bind::Text(v.to_string())
    }
}

impl From<&String> for Bind {
    fn from(v: &String) -> Self {
        Bind::Text(v.clone())
    }
}

impl From<i64> for Bind {
    fn from(v: i64) -> Self {
        Bind::Int(v)
    }
}

impl From<Vec<u8>> for Bind {
    fn from(v: Vec<u8>) -> Self {
        Bind::Bytes(v)
    }
}

impl From<&[u8]> for Bind {
    fn from(v: &[u8]) -> Self {
        Bind::Bytes(v.to_vec())
    }
}

/// A statement: text from code, values in binds.
#[derive(Debug, Clone, Default)]
pub struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    pub fn new(fragment: &'static str) -> Sql {
        Sql { text: fragment.to_string(), binds: Vec::new() }
    }

    /// Appends a fixed SQL fragment (code, never user input).
    pub fn push(&mut self, fragment: &str) -> &mut Sql {
        self.text.push_str(fragment);
        self
    }

    /// ` LIMIT n` with `n` written into the statement, not bound: the plan a prepared statement
    /// settles on then knows how few rows are wanted (PostgreSQL plans a bound LIMIT for a tenth
    /// of the table, and may start parallel workers for a 50-row page).
    pub fn limit(&mut self, n: i64) -> &mut Sql {
        self.text.push_str(" LIMIT ");
        self.text.push_str(&n.max(0).to_string());
        self
    }

    /// Appends an integer written into the statement. For values from a fixed set (an enum's
    /// number, a flag), so that the planner sees the value itself: a partial index on it
    /// applies, and its statistics per value count, in every plan (a bound value gets a generic
    /// plan after a few runs).
    pub fn literal(&mut self, n: i64) -> &mut Sql {
        self.text.push_str(&n.to_string());
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Bind>) -> &mut Sql {
        self.binds.push(value.into());
        self.text.push('$');
        self.text.push_str(&self.binds.len().to_string());
        self
    }

    /// Appends one piece per item, `separator` between them.
    pub fn push_each<T>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        separator: &str,
        mut each: impl FnMut(&mut Sql, T),
    ) -> &mut Sql {
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.push(separator);
            }
            each(self, item);
        }
        self
    }

    /// `column IN ($1, $2, …)` over `values`, which must not be empty.
    pub fn push_in<V: Into<Bind>>(&mut self, column: &str, values: impl IntoIterator<Item = V>) -> &mut Sql {
        self.push(column).push(" IN (");
        self.push_each(values, ", ", |sql, value| {
            sql.bind(value);
        });
        self.push(")")
    }

    /// The rows of a `VALUES` list, `(…), (…)`: `each` binds the values of one row.
    pub fn push_values<T>(
        &mut self,
        rows: impl IntoIterator<Item = T>,
        mut each: impl FnMut(&mut Values<'_>, T),
    ) -> &mut Sql {
        self.push_each(rows, ", ", |sql, row| {
            sql.push("(");
            each(&mut Values { sql, first: true }, row);
            sql.push(")");
        })
    }

    /// Appends another statement (e.g. as a subquery), renumbering its placeholders.
    pub fn push_sql(&mut self, other: Sql) -> &mut Sql {
        let offset = self.binds.len();
        let mut chars = other.text.chars().peekable();
        while let Some(c) = chars.next() {
            self.text.push(c);
            if c == '$' {
                let mut digits = String::new();
                while let Some(d) = chars.next_if(|d| d.is_ascii_digit()) {
                    digits.push(d);
                }
                match digits.parse::<usize>() {
                    Ok(n) => self.text.push_str(&(n + offset).to_string()),
                    Err(_) => self.text.push_str(&digits),
                }
            }
        }
        self.binds.extend(other.binds);
        self
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// How many values are bound so far: a caller can tell whether a fragment it pushed bound
    /// any.
    pub fn bind_count(&self) -> usize {
        self.binds.len()
    }

    pub fn into_parts(self) -> (String, Vec<Bind>) {
        (self.text, self.binds)
    }

    /// The statement as a query that is planned with its values each time it runs, never
    /// cached as a prepared statement. For listings, whose best plan depends on the values (a
    /// tag, a cursor): PostgreSQL plans a cached statement once for any value after five runs,
    /// and that generic plan walked 25,000 rows for a page a value-aware plan finds in 500.
    /// It costs a round trip more and the planning (for a listing at 1M rows on PostgreSQL,
    /// about a third of the database's CPU per call); lookups by key, and statements whose
    /// best plan does not depend on their values, keep [`Sql::query`].
    pub fn query_unprepared(&self) -> Query<'static, Any, AnyArguments> {
        self.query().persistent(false)
    }

    /// The query, ready to run. The text holds only fragments from code and placeholders.
    pub fn query(&self) -> Query<'static, Any, AnyArguments> {
        let mut query = sqlx::query(AssertSqlSafe(self.text.clone()));
        for bind in &self.binds {
            query = match bind {
                Bind::Text(v) => query.bind(v.clone()),
                Bind::Int(v) => query.bind(*v),
                Bind::Bytes(v) => query.bind(v.clone()),
            };
        }
        query
    }
}

/// The values of one row of a `VALUES` list, comma-separated.
pub struct Values<'a> {
    sql: &'a mut Sql,
    first: bool,
}

impl Values<'_> {
    fn separate(&mut self) {
        if !std::mem::replace(&mut self.first, false) {
            self.sql.push(", ");
        }
    }

    /// The next value, bound.
    pub fn bind(&mut self, value: impl Into<Bind>) -> &mut Self {
        self.separate();
        self.sql.bind(value);
        self
    }

    /// The next value as a fixed SQL fragment (a literal from code).
    pub fn fragment(&mut self, fragment: &str) -> &mut Self {
        self.separate();
        self.sql.push(fragment);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_placeholders() {
        let mut sql = Sql::new("SELECT * FROM t WHERE a = ");
        sql.bind("x").push(" AND b > ").bind(3_i64);
        assert_eq!(sql.text(), "SELECT * FROM t WHERE a = $1 AND b > $2");
    }

    #[test]
    fn nests_statements_renumbering_placeholders() {
        let mut inner = Sql::new("SELECT id FROM t WHERE a = ");
        inner.bind("x").limit(10);
        let mut outer = Sql::new("SELECT * FROM (");
        outer.push_sql(inner).push(") s WHERE b = ").bind("y");
        let mut first = Sql::new("WHERE c = ");
        first.bind(1_i64).push(" AND d IN (").push_sql({
            let mut sub = Sql::new("SELECT 1 WHERE e = ");
            sub.bind(2_i64);
            sub
        });
        assert_eq!(outer.text(), "SELECT * FROM (SELECT id FROM t WHERE a = $1 LIMIT 10) s WHERE b = $2");
        assert_eq!(first.text(), "WHERE c = $1 AND d IN (SELECT 1 WHERE e = $2");
        let (_, binds) = first.into_parts();
        assert_eq!(binds, vec![Bind::Int(1), Bind::Int(2)]);
    }

    #[test]
    fn lists_values_and_in() {
        let mut sql = Sql::new("INSERT INTO t (a, b, c) VALUES ");
        sql.push_values([("x", 1_i64), ("y", 2)], |v, (a, b)| {
            v.bind(a).bind(b).fragment("0");
        });
        assert_eq!(sql.text(), "INSERT INTO t (a, b, c) VALUES ($1, $2, 0), ($3, $4, 0)");
        let mut sql = Sql::new("SELECT 1 FROM t WHERE ");
        sql.push_in("id", ["a", "b", "c"]);
        assert_eq!(sql.text(), "SELECT 1 FROM t WHERE id IN ($1, $2, $3)");
        let mut sql = Sql::new("");
        sql.push_each(["a", "b"], " OR ", |sql, v| {
            sql.push("x = ").bind(v);
        });
        assert_eq!(sql.text(), "x = $1 OR x = $2");
    }
}
