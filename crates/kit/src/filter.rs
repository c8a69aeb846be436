//! List filters: a small subset of AIP-160, parsed into an expression tree and compiled into a
//! SQL condition whose every value is a bound parameter — never concatenated into the SQL.
//!
//! ```text
//! filter     := or
//! or         := and ("OR" and)*
//! and        := unary ("AND" unary)*
//! unary      := "NOT" unary | "-" unary | "(" or ")" | comparison
//! comparison := FIELD op VALUE        op := = | != | < | <= | > | >= | :
//! VALUE      := "double quoted" | 'single quoted' | bare word (letters, digits, @ . + - _ / *)
//! ```
//! `:` means "has" and applies to list fields (`tags:vip`); `<`/`>` to times and numbers.
//! Times are RFC 3339 and must be quoted (`create_time > "2026-01-01T00:00:00Z"`).
//! Keywords are upper case. Input is bounded: 2,000 characters, 32 comparisons, nesting 8.
//!
//! A filter is parsed and checked against the listing's fields once, where the request is
//! decoded ([`parse`]); the store receives the resulting [`Filter`], a ready SQL condition.

use crate::db::Sql;
use crate::error::ApiError;
use crate::validate::quote;

pub const MAX_FILTER_CHARS: usize = 2000;
pub const MAX_COMPARISONS: usize = 32;
pub const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Has,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Eq | Op::Has => "=",
            Op::Ne => "<>",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Has => ":",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Cmp { field: String, op: Op, value: String },
}

/// What a filterable field is and how it maps to SQL.
#[derive(Debug, Clone, Copy)]
pub enum FieldKind {
    /// A TEXT column compared for equality.
    Text,
    /// A TEXT column holding trimmed, lower-cased values (e-mail addresses): values are
    /// trimmed and lower-cased before the comparison.
    Lowercase,
    /// An integer column holding an enum; values are named with or without `prefix`.
    Enum { prefix: &'static str, values: &'static [(&'static str, i64)] },
    /// A BIGINT column of epoch microseconds; values are RFC 3339.
    Time,
    /// A BIGINT 0/1 column; values `true`/`false`.
    Bool,
    /// A BIGINT column of whole numbers (an amount in minor units); values are integers.
    Number,
    /// A list kept in a side table: `field:value` becomes `{prefix}$n{suffix}`.
    Collection { prefix: &'static str, suffix: &'static str },
}

impl FieldKind {
    /// The number an enum's value names (`CUSTOMER` or `LIFECYCLE_STAGE_CUSTOMER`, any case);
    /// `None` for another value or another kind of field.
    pub fn enum_number(&self, value: &str) -> Option<i64> {
        let FieldKind::Enum { prefix, values } = self else { return None };
        let upper = value.to_ascii_uppercase();
        let short = upper.strip_prefix(prefix).unwrap_or(&upper);
        values.iter().find(|(name, _)| *name == short).map(|(_, n)| *n)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub column: &'static str,
    pub kind: FieldKind,
}

fn invalid(description: impl Into<String>) -> ApiError {
    ApiError::invalid("filter", description)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Op(Op),
    Open,
    Close,
    Minus,
}

fn lex(text: &str) -> Result<Vec<Token>, ApiError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(pos, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' => {
                chars.next();
                tokens.push(if c == '(' { Token::Open } else { Token::Close });
            }
            '"' | '\'' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => return Err(invalid(format!("unterminated string starting at {pos}"))),
                        Some((_, '\\')) => match chars.next() {
                            Some((_, e)) => value.push(e),
                            None => return Err(invalid("dangling escape at end")),
                        },
                        Some((_, q)) if q == c => break,
                        Some((_, other)) => value.push(other),
                    }
                }
                tokens.push(Token::Quoted(value));
            }
            '=' | ':' => {
                chars.next();
                tokens.push(Token::Op(if c == '=' { Op::Eq } else { Op::Has }));
            }
            '!' | '<' | '>' => {
                chars.next();
                let eq = chars.next_if(|&(_, n)| n == '=').is_some();
                tokens.push(Token::Op(match (c, eq) {
                    ('!', true) => Op::Ne,
                    ('<', false) => Op::Lt,
                    ('<', true) => Op::Le,
                    ('>', false) => Op::Gt,
                    ('>', true) => Op::Ge,
                    _ => return Err(invalid(format!("unexpected '!' at {pos}; did you mean '!='?"))),
                }));
            }
            '-' if tokens.last().is_none_or(|t| !matches!(t, Token::Op(_))) => {
                chars.next();
                tokens.push(Token::Minus);
            }
            c if is_word_char(c) => {
                let mut word = String::new();
                while let Some((_, c)) = chars.next_if(|&(_, c)| is_word_char(c)) {
                    word.push(c);
                }
                tokens.push(Token::Word(word));
            }
            other => return Err(invalid(format!("unexpected character {other:?} at {pos}"))),
        }
    }
    Ok(tokens)
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '@' | '+' | '-' | '/' | '*')
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    comparisons: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w == kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ApiError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!("nests deeper than {MAX_DEPTH} levels")));
        }
        let mut parts = vec![self.and(depth)?];
        while self.keyword("OR") {
            parts.push(self.and(depth)?);
        }
        Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Expr::Or(parts) })
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ApiError> {
        let mut parts = vec![self.unary(depth)?];
        loop {
            if self.keyword("AND") {
                parts.push(self.unary(depth)?);
            } else if matches!(self.peek(), None | Some(Token::Close))
                || matches!(self.peek(), Some(Token::Word(w)) if w == "OR")
            {
                break;
            } else {
                // AIP-160: juxtaposition means AND.
                parts.push(self.unary(depth)?);
            }
        }
        Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Expr::And(parts) })
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ApiError> {
        if self.keyword("NOT") || matches!(self.peek(), Some(Token::Minus)) && self.next().is_some() {
            if depth + 1 > MAX_DEPTH {
                return Err(invalid(format!("nests deeper than {MAX_DEPTH} levels")));
            }
            return Ok(Expr::Not(Box::new(self.unary(depth + 1)?)));
        }
        match self.next() {
            Some(Token::Open) => {
                let inner = self.or(depth + 1)?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err(invalid("missing ')'")),
                }
            }
            Some(Token::Word(field)) if !matches!(field.as_str(), "AND" | "OR" | "NOT") => {
                let op = match self.next() {
                    Some(Token::Op(op)) => op,
                    _ => return Err(invalid(format!("expected an operator after {}", quote(&field)))),
                };
                let value = match self.next() {
                    Some(Token::Word(v)) | Some(Token::Quoted(v)) => v,
                    _ => return Err(invalid(format!("expected a value after {} {}", quote(&field), op.text()))),
                };
                self.comparisons += 1;
                if self.comparisons > MAX_COMPARISONS {
                    return Err(invalid(format!("has more than {MAX_COMPARISONS} comparisons")));
                }
                Ok(Expr::Cmp { field, op, value })
            }
            Some(Token::Close) => Err(invalid("unexpected ')'")),
            Some(other) => Err(invalid(format!("expected a comparison, found {other:?}"))),
            None => Err(invalid("ends where a comparison was expected")),
        }
    }
}

/// A parsed filter, checked against its listing's fields: a SQL condition whose values are
/// all bound parameters.
#[derive(Debug, Clone)]
pub struct Filter {
    /// The conjuncts of the filter's top-level `AND` (the whole condition when it is not one),
    /// each with the pin it is, when it is one.
    parts: Vec<(Option<(&'static str, String)>, Sql)>,
}

impl Filter {
    /// Appends ` AND (condition)`.
    pub fn push_onto(&self, sql: &mut Sql) {
        self.push_parts(sql, None);
    }

    /// Appends ` AND (condition)` without the comparison `field = value` (or `field:value`) of
    /// the top-level `AND`, for a query that already holds to it by its shape (walking a tag's
    /// own index, say): every other part still applies, and the query pays for no second check
    /// of what it joined on. A filter that is that comparison alone appends nothing.
    pub fn push_onto_except(&self, sql: &mut Sql, field: &str, value: &str) {
        self.push_parts(sql, Some((field, value)));
    }

    fn push_parts(&self, sql: &mut Sql, except: Option<(&str, &str)>) {
        let skipped = except.and_then(|(field, value)| {
            self.parts.iter().position(|(pin, _)| matches!(pin, Some((f, v)) if *f == field && v == value))
        });
        let parts: Vec<&Sql> =
            self.parts.iter().enumerate().filter(|(i, _)| Some(*i) != skipped).map(|(_, (_, part))| part).collect();
        if parts.is_empty() {
            return;
        }
        sql.push(" AND (");
        sql.push_each(parts, " AND ", |sql, part| {
            sql.push_sql(part.clone());
        });
        sql.push(")");
    }

    /// The fields every matching row has one value in (or, for a list, holds), with that value
    /// as typed: the `field = value` and `list:value` comparisons the filter's top-level `AND`
    /// requires. A store may tell a selective filter (one owner's records) from a broad one by
    /// them, or walk a tag's own index.
    pub fn pins(&self) -> impl Iterator<Item = &(&'static str, String)> {
        self.parts.iter().filter_map(|(pin, _)| pin.as_ref())
    }
}

/// The pin a conjunct of the top-level `AND` is: `field = value` or `list:value` on a field of
/// the listing.
fn pin(conjunct: &Expr, fields: &[Field]) -> Option<(&'static str, String)> {
    match conjunct {
        Expr::Cmp { field, op: Op::Eq | Op::Has, value } => {
            fields.iter().find(|f| f.name == field.as_str()).map(|spec| (spec.name, value.clone()))
        }
        _ => None,
    }
}

/// Parses the text of a filter into its expression; `None` for an empty one.
pub fn parse_expr(text: &str) -> Result<Option<Expr>, ApiError> {
    if text.chars().count() > MAX_FILTER_CHARS {
        return Err(invalid(format!("must be at most {MAX_FILTER_CHARS} characters")));
    }
    let tokens = lex(text)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut parser = Parser { tokens, pos: 0, comparisons: 0 };
    let expr = parser.or(0)?;
    if parser.pos < parser.tokens.len() {
        return Err(invalid("unexpected ')'"));
    }
    Ok(Some(expr))
}

/// Parses a filter over `fields`: every field must be one of them and every value must suit
/// its field. `None` for an empty filter.
pub fn parse(text: &str, fields: &[Field]) -> Result<Option<Filter>, ApiError> {
    let Some(expr) = parse_expr(text)? else { return Ok(None) };
    let mut conjuncts = Vec::new();
    flatten_and(&expr, &mut conjuncts);
    let mut parts = Vec::with_capacity(conjuncts.len());
    for conjunct in conjuncts {
        let mut condition = Sql::default();
        compile(conjunct, fields, &mut condition)?;
        parts.push((pin(conjunct, fields), condition));
    }
    Ok(Some(Filter { parts }))
}

/// The conjuncts of a top-level `AND`, those of `AND`s nested in it (parenthesised) included.
fn flatten_and<'e>(expr: &'e Expr, out: &mut Vec<&'e Expr>) {
    match expr {
        Expr::And(parts) => parts.iter().for_each(|part| flatten_and(part, out)),
        other => out.push(other),
    }
}

fn compile(expr: &Expr, fields: &[Field], sql: &mut Sql) -> Result<(), ApiError> {
    match expr {
        Expr::And(parts) | Expr::Or(parts) => {
            let joiner = if matches!(expr, Expr::And(_)) { " AND " } else { " OR " };
            sql.push("(");
            let mut result = Ok(());
            sql.push_each(parts, joiner, |sql, part| {
                if result.is_ok() {
                    result = compile(part, fields, sql);
                }
            });
            result?;
            sql.push(")");
        }
        Expr::Not(inner) => {
            sql.push("NOT (");
            compile(inner, fields, sql)?;
            sql.push(")");
        }
        Expr::Cmp { field, op, value } => {
            let spec = fields.iter().find(|f| f.name == field.as_str()).ok_or_else(|| {
                let names: Vec<_> = fields.iter().map(|f| f.name).collect();
                invalid(format!("unknown field {}; filterable fields: {}", quote(field), names.join(", ")))
            })?;
            comparison(spec, *op, value, sql)?;
        }
    }
    Ok(())
}

fn comparison(spec: &Field, op: Op, value: &str, sql: &mut Sql) -> Result<(), ApiError> {
    let unsupported = || invalid(format!("operator '{}' does not apply to '{}'", op.text(), spec.name));
    match spec.kind {
        FieldKind::Collection { prefix, suffix } => {
            if op != Op::Has {
                return Err(invalid(format!("'{}' is a list: use '{}:value'", spec.name, spec.name)));
            }
            sql.push(prefix).bind(value.to_string()).push(suffix);
            return Ok(());
        }
        FieldKind::Text | FieldKind::Lowercase => {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(unsupported());
            }
            let value =
                if matches!(spec.kind, FieldKind::Lowercase) { value.trim().to_lowercase() } else { value.to_string() };
            sql.push(spec.column).push(" ").push(op.sql()).push(" ").bind(value);
        }
        FieldKind::Enum { values, .. } => {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(unsupported());
            }
            let number = spec.kind.enum_number(value).ok_or_else(|| {
                let names: Vec<_> = values.iter().map(|(n, _)| *n).collect();
                invalid(format!("{} is not a {} value; one of: {}", quote(value), spec.name, names.join(", ")))
            })?;
            sql.push(spec.column).push(" ").push(op.sql()).push(" ").literal(number);
        }
        FieldKind::Time => {
            if op == Op::Has {
                return Err(unsupported());
            }
            let micros = crate::time::parse_rfc3339(value).ok_or_else(|| {
                invalid(format!("{} is not an RFC 3339 time such as \"2026-01-31T00:00:00Z\"", quote(value)))
            })?;
            sql.push(spec.column).push(" ").push(op.sql()).push(" ").bind(micros);
        }
        FieldKind::Number => {
            if op == Op::Has {
                return Err(unsupported());
            }
            let n: i64 = value
                .parse()
                .map_err(|_| invalid(format!("'{}' takes a whole number, got {}", spec.name, quote(value))))?;
            sql.push(spec.column).push(" ").push(op.sql()).push(" ").bind(n);
        }
        FieldKind::Bool => {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(unsupported());
            }
            let flag = match value {
                "true" => 1,
                "false" => 0,
                _ => return Err(invalid(format!("'{}' takes true or false", spec.name))),
            };
            sql.push(spec.column).push(" ").push(op.sql()).push(" ").literal(flag);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Bind;

    const STAGES: &[(&str, i64)] = &[("LEAD", 1), ("CUSTOMER", 3)];
    const FIELDS: &[Field] = &[
        Field { name: "owner_id", column: "owner_id", kind: FieldKind::Text },
        Field { name: "email", column: "email", kind: FieldKind::Lowercase },
        Field { name: "stage", column: "stage", kind: FieldKind::Enum { prefix: "LIFECYCLE_STAGE_", values: STAGES } },
        Field { name: "create_time", column: "created_at", kind: FieldKind::Time },
        Field { name: "do_not_contact", column: "do_not_contact", kind: FieldKind::Bool },
        Field {
            name: "tags",
            column: "",
            kind: FieldKind::Collection { prefix: "id IN (SELECT record_id FROM tags WHERE tag = ", suffix: ")" },
        },
    ];

    fn sql(filter: &str) -> Result<(String, Vec<Bind>), ApiError> {
        let mut sql = Sql::new("SELECT 1 WHERE 1=1");
        if let Some(filter) = parse(filter, FIELDS)? {
            filter.push_onto(&mut sql);
        }
        Ok(sql.into_parts())
    }

    #[test]
    fn compiles_to_bound_parameters() {
        // Typed values are bound; an enum's number or a flag (from a fixed set) is written in.
        let (text, binds) = sql(r#"stage = CUSTOMER AND tags:vip AND create_time > "2026-01-01T00:00:00Z""#).unwrap();
        assert_eq!(
            text,
            "SELECT 1 WHERE 1=1 AND (stage = 3 AND id IN (SELECT record_id FROM tags WHERE tag = $1) AND created_at > $2)"
        );
        assert_eq!(binds, vec![Bind::Text("vip".into()), Bind::Int(1_767_225_600_000_000)]);
    }

    #[test]
    fn pins_are_the_equalities_every_match_has() {
        let pinned = |text: &str| parse(text, FIELDS).unwrap().unwrap().pins().cloned().collect::<Vec<_>>();
        assert_eq!(pinned("owner_id = u1 AND stage = LEAD"), [("owner_id", "u1".into()), ("stage", "LEAD".into())]);
        assert!(pinned("owner_id = u1 OR stage = LEAD").is_empty());
        assert!(pinned("NOT owner_id = u1").is_empty());
        assert!(pinned("owner_id != u1").is_empty());
        assert_eq!(pinned("tags:vip create_time > \"2026-01-01T00:00:00Z\""), [("tags", "vip".into())]);
    }

    #[test]
    fn a_pin_the_query_holds_to_is_left_out() {
        let except = |text: &str, field: &str, value: &str| {
            let mut sql = Sql::new("SELECT 1 WHERE 1=1");
            parse(text, FIELDS).unwrap().unwrap().push_onto_except(&mut sql, field, value);
            sql.into_parts()
        };
        // Only that comparison goes; the others keep their places and their parameters.
        let (text, binds) =
            except("create_time > \"2026-01-01T00:00:00Z\" AND tags:vip AND (tags:b2b owner_id = u1)", "tags", "vip");
        assert_eq!(
            text,
            "SELECT 1 WHERE 1=1 AND (created_at > $1 AND id IN (SELECT record_id FROM tags WHERE tag = $2) AND owner_id = $3)"
        );
        assert_eq!(binds, vec![Bind::Int(1_767_225_600_000_000), Bind::Text("b2b".into()), Bind::Text("u1".into())]);
        // Alone, it leaves nothing to add.
        assert_eq!(except("tags:vip", "tags", "vip").0, "SELECT 1 WHERE 1=1");
        // Anything but a pin of the top-level AND stays: under OR or NOT it does not hold to every row.
        for text in ["tags:vip OR stage = LEAD", "NOT tags:vip", "tags:b2b"] {
            let (with, _) = except(text, "tags", "vip");
            let (plain, _) = sql(text).unwrap();
            assert_eq!(with, plain, "{text}");
        }
        // Written twice, it goes once.
        let (text, _) = except("tags:vip tags:vip", "tags", "vip");
        assert_eq!(text, "SELECT 1 WHERE 1=1 AND (id IN (SELECT record_id FROM tags WHERE tag = $1))");
    }

    #[test]
    fn or_not_and_parentheses() {
        let (text, binds) =
            sql("(stage = LEAD OR stage = LIFECYCLE_STAGE_CUSTOMER) NOT do_not_contact = true").unwrap();
        assert_eq!(text, "SELECT 1 WHERE 1=1 AND ((stage = 1 OR stage = 3) AND NOT (do_not_contact = 1))");
        assert!(binds.is_empty());
        let (text, _) = sql("-owner_id = abc").unwrap();
        assert!(text.ends_with("AND (NOT (owner_id = $1))"), "{text}");
    }

    #[test]
    fn lower_cased_fields_compare_lower_cased_values() {
        let (text, binds) = sql(r#"email = " Anna@Example.COM""#).unwrap();
        assert_eq!(text, "SELECT 1 WHERE 1=1 AND (email = $1)");
        assert_eq!(binds, vec![Bind::Text("anna@example.com".into())]);
    }

    #[test]
    fn empty_filter_adds_nothing() {
        assert_eq!(sql("   ").unwrap().0, "SELECT 1 WHERE 1=1");
    }

    #[test]
    fn malicious_values_stay_parameters() {
        for attack in [r#"owner_id = "x' OR '1'='1""#, r#"owner_id = "1; DROP TABLE people; --""#, "owner_id = 'a\\'b'"]
        {
            let (text, binds) = sql(attack).unwrap();
            assert_eq!(text, "SELECT 1 WHERE 1=1 AND (owner_id = $1)", "{attack}");
            assert_eq!(binds.len(), 1);
        }
    }

    #[test]
    fn rejects_bad_input_clearly() {
        let cases = [
            ("owner_id = 'open", "unterminated"),
            ("name = x", "unknown field 'name'"),
            ("owner_id; DROP TABLE people", "unexpected character"),
            ("stage = WON", "one of: LEAD, CUSTOMER"),
            ("stage > LEAD", "does not apply"),
            ("tags = vip", "is a list"),
            ("create_time > yesterday", "RFC 3339"),
            ("owner_id =", "expected a value"),
            ("(owner_id = a", "missing ')'"),
            ("owner_id = a)", "unexpected ')'"),
            ("AND", "expected a comparison"),
            ("do_not_contact = maybe", "true or false"),
            ("owner_id ! a", "did you mean"),
        ];
        for (filter, expected) in cases {
            let err = sql(filter).expect_err(filter);
            let ApiError::InvalidArgument(v) = err else { panic!("{filter}: not INVALID_ARGUMENT") };
            let (field, description) = v.iter().next().unwrap();
            assert_eq!(field, "filter");
            assert!(description.contains(expected), "{filter}: {description}");
        }
    }

    #[test]
    fn bounds_size_depth_and_count() {
        assert!(sql(&"(".repeat(50)).is_err());
        assert!(sql(&format!("{}owner_id = a{}", "(".repeat(20), ")".repeat(20))).is_err());
        assert!(sql(&format!("{}owner_id = a", "NOT ".repeat(20))).is_err());
        assert!(sql(&format!("{}owner_id = a", "NOT ".repeat(3))).is_ok());
        let many = vec!["owner_id = a"; MAX_COMPARISONS + 1].join(" AND ");
        assert!(sql(&many).is_err());
        assert!(sql(&"x".repeat(MAX_FILTER_CHARS + 1)).is_err());
        let ok = vec!["owner_id = a"; MAX_COMPARISONS].join(" OR ");
        assert!(sql(&ok).is_ok());
    }
}
