//! Listings: filtered, searched and sorted within the caller's data scope, one keyset page at
//! a time; and a record's revision history.

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Backend, Sql};
use crm_kit::filter::{self, Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::validate::quote;
use crm_proto::contacts::v1::{FieldChange, Revision};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row};

use super::{COLUMNS, Store, StoredChange, decode, table};
use crate::domain::search::{self, Term};
use crate::domain::{Kind, Record, Rules};

const STAGES: &[(&str, i64)] =
    &[("UNSPECIFIED", 0), ("LEAD", 1), ("PROSPECT", 2), ("CUSTOMER", 3), ("REPEAT_CUSTOMER", 4), ("LOST", 5)];

const fn text(name: &'static str) -> Field {
    Field { name, column: name, kind: FieldKind::Text }
}

const STAGE: Field =
    Field { name: "stage", column: "stage", kind: FieldKind::Enum { prefix: "LIFECYCLE_STAGE_", values: STAGES } };

const COMMON_FIELDS: [Field; 12] = [
    Field { name: "id", column: "id", kind: FieldKind::Text },
    text("owner_id"),
    STAGE,
    text("source"),
    text("region"),
    Field {
        name: "tags",
        column: "",
        // A probe per row (the tags' primary key), which both engines can run for the rows an
        // index walk yields, or turn into a join when the tag is rare.
        kind: FieldKind::Collection {
            prefix: "EXISTS (SELECT 1 FROM tags WHERE tags.record_id = id AND tags.tag = ",
            suffix: ")",
        },
    },
    Field { name: "do_not_contact", column: "do_not_contact", kind: FieldKind::Bool },
    Field { name: "create_time", column: "created_at", kind: FieldKind::Time },
    Field { name: "update_time", column: "updated_at", kind: FieldKind::Time },
    Field { name: "last_activity_time", column: "last_activity_at", kind: FieldKind::Time },
    Field { name: "purchase_count", column: "purchase_count", kind: FieldKind::Number },
    Field { name: "last_purchase_time", column: "last_purchase_at", kind: FieldKind::Time },
];

const COMPANY_FIELDS: &[Field] = &{
    let mut fields = [text("industry"); 13];
    let mut i = 0;
    while i < COMMON_FIELDS.len() {
        fields[i] = COMMON_FIELDS[i];
        i += 1;
    }
    fields
};

const PERSON_FIELDS: &[Field] = &{
    let mut fields = [text("company_id"); 13];
    let mut i = 0;
    while i < COMMON_FIELDS.len() {
        fields[i] = COMMON_FIELDS[i];
        i += 1;
    }
    fields
};

/// The fields a list filter may use, by kind.
pub fn filter_fields(kind: Kind) -> &'static [Field] {
    match kind {
        Kind::Company => COMPANY_FIELDS,
        Kind::Person => PERSON_FIELDS,
    }
}

/// Parses `order_by`: one of the sortable fields, optionally followed by `desc` or `asc`;
/// empty is `create_time desc` (newest first).
pub fn sort_order(kind: Kind, order_by: &str) -> Result<Order, ApiError> {
    let mut words = order_by.split_whitespace();
    let field = words.next().unwrap_or("create_time");
    let name_field = match kind {
        Kind::Company => "name",
        Kind::Person => "full_name",
    };
    let (column, text) = match field {
        "create_time" => ("created_at", false),
        "update_time" => ("updated_at", false),
        "last_activity_time" => ("last_activity_at", false),
        f if f == name_field => ("display_name", true),
        _ => {
            return Err(ApiError::invalid(
                "order_by",
                format!(
                    "cannot sort by {}; use create_time, update_time, last_activity_time or {name_field}",
                    quote(field)
                ),
            ));
        }
    };
    let desc = match (words.next(), order_by.trim().is_empty()) {
        (None, true) => true,
        (None, false) | (Some("asc"), _) => false,
        (Some("desc"), _) => true,
        (Some(other), _) => return Err(ApiError::invalid("order_by", format!("{} is not asc or desc", quote(other)))),
    };
    if words.next().is_some() || order_by.contains(',') {
        return Err(ApiError::invalid("order_by", "sorts by one field only"));
    }
    Ok(Order { column, tie: "id", text, desc })
}

/// Revisions are listed newest first.
pub fn revision_order() -> Order {
    Order { column: "version", tie: "record_id", text: false, desc: true }
}

/// Longest text query, in characters.
const MAX_QUERY: usize = 200;

/// A list request's parts as they came, from `ListCompaniesRequest` or `ListPeopleRequest`.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub page_size: i32,
    pub page_token: String,
    pub filter: String,
    pub order_by: String,
    pub query: String,
}

/// A list or search request, decoded and checked.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub filter: Option<Filter>,
    /// What a text query looks for; empty: no search.
    pub terms: Vec<Term>,
    pub order: Order,
    pub page: Page,
    /// Whose records the caller may see.
    pub scope: OwnerScope,
}

/// Rows in sort order a listing first looks through, per row of the page, before it runs its
/// full query (see [`Store::window`]): a condition matching at least 1 row in 40 (2.5%) is
/// served from the window; a rarer one costs the window scan plus the full query.
pub const WINDOW_PER_ROW: i64 = 40;

impl ListQuery {
    /// A list request decoded once: its filter parsed against the kind's fields, its order and
    /// page token decoded, its search terms found.
    pub fn parse(kind: Kind, r: &ListRequest, rules: &Rules, scope: OwnerScope) -> Result<ListQuery, ApiError> {
        if r.query.chars().count() > MAX_QUERY {
            return Err(ApiError::invalid("query", format!("must be at most {MAX_QUERY} characters")));
        }
        let order = sort_order(kind, &r.order_by)?;
        let page = Page::decode(&[kind.noun(), &r.filter, &r.query, &r.order_by], r.page_size, &r.page_token, &order)?;
        let filter = filter::parse(&r.filter, filter_fields(kind))?;
        let terms = search::terms(&r.query, rules);
        Ok(ListQuery { filter, terms, order, page, scope })
    }
}

/// A record order as a tag's entries hold it: the same keys (a record's creation, update or last
/// activity time, or name, and id), kept with the record, so that the rows' own keys make the
/// page token either way. Every order of [`sort_order`] has one.
fn tag_order(order: &Order) -> Option<Order> {
    let column = match order.column {
        "created_at" => "record_created_at",
        "updated_at" => "record_updated_at",
        "last_activity_at" => "record_activity_at",
        "display_name" => "record_name",
        _ => return None,
    };
    Some(Order { column, tie: "record_id", ..*order })
}

/// How a filter (within a scope) picks few records through an index of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chooser {
    /// One owner's records (their indexes come in every sort order), or one record.
    InEveryOrder,
    /// One company's records (their index is in creation order), or those marked
    /// do-not-contact (few, with a small index of their own in each order since migration 0011).
    InCreationOrder,
}

/// How a filter (if any) within a scope chooses the rows itself rather than sift a window, if it
/// does (see [`Chooser`]).
fn chooser(filter: Option<&Filter>, scope: &OwnerScope) -> Option<Chooser> {
    let one_owner = matches!(scope, OwnerScope::Owners(owners) if owners.len() == 1);
    let pins = || filter.into_iter().flat_map(|filter| filter.pins());
    if one_owner || pins().any(|(field, _)| matches!(*field, "id" | "owner_id")) {
        return Some(Chooser::InEveryOrder);
    }
    pins()
        .any(|(field, value)| *field == "company_id" || (*field == "do_not_contact" && value == "true"))
        .then_some(Chooser::InCreationOrder)
}

/// Whether a filter (within a scope) picks few records through an index of its own: one owner's,
/// one company's, one record, or those marked do-not-contact. Such a filter chooses the rows
/// itself rather than sift a window.
fn selective(filter: &Filter, scope: &OwnerScope) -> bool {
    chooser(Some(filter), scope).is_some()
}

/// Whether a listing's rows are one owner's (or one record), found through the owner's index in
/// the sort's own order.
fn one_owners(q: &ListQuery) -> bool {
    chooser(q.filter.as_ref(), &q.scope) == Some(Chooser::InEveryOrder)
}

/// Whether a [`selective`] filter's rows are found apart from the sort's index over the whole
/// table (one company's records by name: through the company's index in creation order, and
/// sorted on every page; those marked do-not-contact: through their own small index in that
/// order). On SQLite a later page's key is then written so that it is not taken as a bound of the
/// sort's whole index, which SQLite would walk from there.
fn chosen_apart_from_the_sort(q: &ListQuery) -> bool {
    q.order.column != "created_at" && chooser(q.filter.as_ref(), &q.scope) == Some(Chooser::InCreationOrder)
}

/// The tag a listing walks the records of, in its order (as the tag's entries hold it), through
/// the tags' own index for that order: a tag the filter requires, for a caller who sees every record, when nothing is searched
/// and nothing more [`selective`] chooses the rows. Walking the records' order and probing each
/// one's tags instead depends on where the tag's records lie: the newest thousands of records
/// untagged made a first page of 50 newest first walk 52,000 rows, and a tag one record in nine
/// carries costs about 450 probes a page by name, update or last activity. Within a data scope of
/// some owners, their records are found through the owners' own indexes (walking everyone's
/// tagged records for one salesperson took 30 ms, and for a head of ten PostgreSQL hashed them
/// all: 160 ms).
fn driving_tag(q: &ListQuery) -> Option<(&str, Order)> {
    if !q.terms.is_empty() || !matches!(q.scope, OwnerScope::All) {
        return None;
    }
    let order = tag_order(&q.order)?;
    let filter = q.filter.as_ref().filter(|f| !selective(f, &q.scope))?;
    filter.pins().find(|(field, _)| *field == "tags").map(|(_, tag)| (tag.as_str(), order))
}

/// The first rows in sort order a listing looks through (see [`Store::window`]).
#[derive(Debug, Clone, Copy)]
struct Window {
    rows: i64,
    /// Whether the filter applies to the window's rows, rather than choosing them.
    filter_outside: bool,
    /// How many times the window may still grow (×4) before the full query runs.
    widenings: u32,
}

impl Window {
    /// The next window to look through when this one did not fill the page.
    fn wider(self) -> Option<Window> {
        (self.widenings > 0).then(|| Window { rows: self.rows * 4, widenings: self.widenings - 1, ..self })
    }
}

/// How a listing statement is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// With its values, each time it runs ([`Sql::query_unprepared`]): its best plan depends on
    /// them (how rare a tag, a region or an owner is; where a page's key lies).
    EachRun,
    /// Prepared once per connection and kept ([`Sql::query`]): PostgreSQL plans it with its
    /// values for five runs, then keeps one plan for any values unless that plan is estimated
    /// to cost more. Only for a statement whose values cannot change which plan is best: a walk
    /// of an index whose only values are the index's leading key and the page's key (they say
    /// where the walk starts, never which index) — a tag's walk, or one owner's records
    /// through the owner's index in the sort's order; and a statement with no values at all.
    /// At 1M people, stage and tag newest first: about a third less database CPU per listing.
    Kept,
}

/// A listing statement and how it is planned.
#[derive(Debug, Clone)]
struct Statement {
    sql: Sql,
    planning: Planning,
}

impl Statement {
    /// `sql`, kept when it is a walk whose values only say where it starts, or when it binds no
    /// value at all (a first page of everyone's records, or of a stage): a plan made without
    /// values is the plan every run would get.
    fn new(sql: Sql, values_only_start_the_walk: bool) -> Statement {
        let planning =
            if values_only_start_the_walk || sql.bind_count() == 0 { Planning::Kept } else { Planning::EachRun };
        Statement { sql, planning }
    }

    fn query(&self) -> Query<'static, Any, AnyArguments> {
        match self.planning {
            Planning::EachRun => self.sql.query_unprepared(),
            Planning::Kept => self.sql.query(),
        }
    }
}

/// How often [`Store::explain`] runs a kept statement on one connection to see which plan
/// PostgreSQL settles on: five runs with their values, then the kept plan if it is chosen.
const KEPT_RUNS: i64 = 8;

/// The plans a kept statement's runs on one connection used (PostgreSQL's
/// `pg_prepared_statements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptRuns {
    /// Runs with the one plan kept for any values.
    pub generic: i64,
    /// Runs planned with their values.
    pub custom: i64,
}

/// One statement of a listing: its plan, and the rows it returned in how long.
#[derive(Debug, Clone)]
pub struct Explained {
    pub plan: Vec<String>,
    pub rows: usize,
    pub elapsed: std::time::Duration,
    pub planning: Planning,
    /// For a [`Planning::Kept`] statement on PostgreSQL: which plans its runs used.
    pub kept: Option<KeptRuns>,
}

fn like_pattern(term: &str) -> String {
    let escaped = term.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

fn fts_phrase(term: &str) -> String {
    format!("\"{}\"", term.replace('"', "\"\""))
}

impl Store {
    /// One page of a filtered, searched, sorted listing within `q.scope`, and the token of the
    /// next page.
    pub async fn list<R: Record>(&self, q: &ListQuery) -> Result<(Vec<R>, String), ApiError> {
        let rows = self.fetch(R::KIND, q, None).await?;
        q.page.finish(&rows, &q.order, decode::<R>)
    }

    /// The rows of a listing's page (and one more): through windows that widen while they do
    /// not fill the page, then the full query. Each statement run is added to `ran`.
    async fn fetch(
        &self,
        kind: Kind,
        q: &ListQuery,
        mut ran: Option<&mut Vec<Statement>>,
    ) -> Result<Vec<AnyRow>, ApiError> {
        let mut next = self.window(q);
        loop {
            let statement = self.select(kind, q, next);
            let rows = statement.query().fetch_all(self.db().pool()).await?;
            if let Some(ran) = ran.as_deref_mut() {
                ran.push(statement);
            }
            let Some(window) = next else { return Ok(rows) };
            if rows.len() as i64 > q.page.size() {
                return Ok(rows);
            }
            next = window.wider();
        }
    }

    /// The rows in sort order a listing first looks through, if it does. A broad condition
    /// matches a large share of the table; its first page is usually found among the first rows
    /// in sort order, which the sort's index yields cheaply. When that window fills the page,
    /// the page is exactly what the full query returns; when it does not, the full query runs.
    ///
    /// A text search looks through a window (its index cannot yield rows in order). So does a
    /// broad filter on SQLite, whose planner reads every row a filter's index yields and sorts
    /// them (200,000 rows for `stage = CUSTOMER` at 1M) rather than walk the sort's index;
    /// a [`selective`] one chooses its rows through its own index. A phone
    /// number is selective: it goes straight to its index, as does everything else on
    /// PostgreSQL, whose planner weighs the walk against the sort itself.
    fn window(&self, q: &ListQuery) -> Option<Window> {
        if q.terms.iter().any(|t| t.phone) || driving_tag(q).is_some() {
            return None;
        }
        let sqlite = self.db().backend() == Backend::Sqlite;
        let filter_outside = sqlite && q.filter.as_ref().is_some_and(|f| !selective(f, &q.scope));
        if q.terms.is_empty() && !filter_outside {
            return None;
        }
        let rows = self.window_rows.unwrap_or(WINDOW_PER_ROW * (q.page.size() + 1));
        // SQLite's fallback (the filter's index, then a sort) can read a large share of the
        // table, so a window widens twice (×4, ×16) before it; a windowed PostgreSQL search
        // goes straight to its trigram index.
        let widenings = if sqlite { 2 } else { 0 };
        Some(Window { rows, filter_outside, widenings })
    }

    /// The statements [`Store::list`] runs for `q`, each with the plan the database chose for
    /// its values and how long it took (run once more, warm, as the listing runs it): on
    /// PostgreSQL the plan of `EXPLAIN (ANALYZE, BUFFERS)`, on SQLite of `EXPLAIN QUERY PLAN`.
    /// A [`Planning::Kept`] statement on PostgreSQL is also run [`KEPT_RUNS`] times on one
    /// connection, to tell which plans its runs there used. For `crm bench plans`.
    pub async fn explain<R: Record>(&self, q: &ListQuery) -> Result<Vec<Explained>, ApiError> {
        let mut statements = Vec::new();
        self.fetch(R::KIND, q, Some(&mut statements)).await?;
        let backend = self.db().backend();
        let (prefix, column) = match backend {
            Backend::Postgres => ("EXPLAIN (ANALYZE, BUFFERS) ", 0),
            Backend::Sqlite => ("EXPLAIN QUERY PLAN ", 3),
        };
        let mut explained = Vec::with_capacity(statements.len());
        for statement in statements {
            let mut sql = Sql::new(prefix);
            sql.push_sql(statement.sql.clone());
            let lines = sql.query_unprepared().fetch_all(self.db().pool()).await?;
            let plan = lines.iter().map(|row| row.try_get::<String, _>(column)).collect::<Result<Vec<_>, _>>()?;
            let started = std::time::Instant::now();
            let rows = statement.query().fetch_all(self.db().pool()).await?.len();
            let elapsed = started.elapsed();
            let kept = match (statement.planning, backend) {
                (Planning::Kept, Backend::Postgres) => Some(self.kept_runs(&statement).await?),
                _ => None,
            };
            explained.push(Explained { plan, rows, elapsed, planning: statement.planning, kept });
        }
        Ok(explained)
    }

    /// Runs a kept statement [`KEPT_RUNS`] times on one PostgreSQL connection, then reads which
    /// plans its runs there used (all of them, earlier ones on that connection included).
    async fn kept_runs(&self, statement: &Statement) -> Result<KeptRuns, ApiError> {
        let mut conn = self.db().pool().acquire().await?;
        for _ in 0..KEPT_RUNS {
            statement.query().fetch_all(&mut conn).await?;
        }
        let mut sql = Sql::new("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = ");
        sql.bind(statement.sql.text());
        let row = sql.query_unprepared().fetch_optional(&mut conn).await?;
        let row = row.ok_or_else(|| ApiError::Internal("a kept statement is not prepared on its connection".into()))?;
        Ok(KeptRuns { generic: row.try_get("generic_plans")?, custom: row.try_get("custom_plans")? })
    }

    /// The listing query. With a `window`, the text search (and the filter, when it is
    /// outside) applies only to the first `window.rows` rows in sort order within the scope
    /// after the cursor.
    fn select(&self, kind: Kind, q: &ListQuery, window: Option<Window>) -> Statement {
        if let Some((tag, order)) = driving_tag(q) {
            return self.select_by_tag(kind, q, tag, &order);
        }
        let mut sql = Sql::new("SELECT ");
        sql.push(if window.is_some() { "*" } else { COLUMNS });
        sql.push(" FROM ").push(table(kind)).push(" WHERE 1=1");
        let filter_outside = window.is_some_and(|w| w.filter_outside);
        if let Some(filter) = q.filter.as_ref().filter(|_| !filter_outside) {
            filter.push_onto(&mut sql);
        }
        q.scope.push_condition(&mut sql, self.db().backend(), "owner_id");
        // One owner's walk whose one value is that owner (conditions on a stage or a flag are
        // written into the text, so a kept plan knows them): every sort has the owner's index.
        let owners_walk = window.is_none() && q.terms.is_empty() && sql.bind_count() == 1 && one_owners(q);
        if window.is_none() {
            self.push_search(&mut sql, kind, &q.terms, false);
        }
        if window.is_none() && self.db().backend() == Backend::Sqlite && chosen_apart_from_the_sort(q) {
            q.page.push_after_unbounded(&mut sql, &q.order);
        } else {
            self.push_walk_after(&mut sql, q, &q.order, owners_walk);
        }
        q.page.push_order(&mut sql, &q.order);
        let Some(window) = window else {
            q.page.push_limit(&mut sql);
            return Statement::new(sql, owners_walk);
        };
        sql.limit(window.rows);
        let mut outer = Sql::new("SELECT * FROM (");
        outer.push_sql(sql).push(") AS candidates WHERE 1=1");
        if let Some(filter) = q.filter.as_ref().filter(|_| filter_outside) {
            filter.push_onto(&mut outer);
        }
        self.push_search(&mut outer, kind, &q.terms, true);
        q.page.push_order(&mut outer, &q.order);
        q.page.push_limit(&mut outer);
        Statement::new(outer, false)
    }

    /// A listing that requires `tag`: the tag's entries in the listing's order (each holds its
    /// record's keys), each joined to its record, until the page is full. When the rest of the
    /// filter binds no value (`stage = CUSTOMER AND tags:vip`), the statement's values are the
    /// tag and the page's key: the plan is [`Planning::Kept`]. A bound value (a region, an
    /// owner, a time, another tag) may be rare enough that another plan wins, so then it is
    /// planned with its values each run.
    fn select_by_tag(&self, kind: Kind, q: &ListQuery, tag: &str, order: &Order) -> Statement {
        // The conditions on the record: the filter but for the tag (the walk holds every row to
        // it: probing each row's tags for it again cost, at 1M people, stage and tag, 1.2–2.0 ms
        // of execution rather than 0.64–0.76, and a join more to plan), and the scope.
        let mut record = Sql::new("");
        if let Some(filter) = &q.filter {
            filter.push_onto_except(&mut record, "tags", tag);
        }
        q.scope.push_condition(&mut record, self.db().backend(), "owner_id");
        let tags_walk = record.bind_count() == 0;
        let mut sql = Sql::new("SELECT ");
        // The conditions left for the statement's own WHERE: none when the lookup holds them.
        let record_in_where = if tags_walk && self.db().backend() == Backend::Postgres {
            // Each entry's record looked up by itself, which PostgreSQL cannot turn into another
            // join: it estimates a join of the tags to the records from the distinct record ids
            // of all the tags, so for companies (10,000 beside 1M people) it expected 19 of the
            // 1,151 entries of companies tagged `vip` to find their company, and read every
            // company to hash them (6–12 ms; the walk takes 0.5).
            sql.push("r.* FROM tags t CROSS JOIN LATERAL (SELECT ").push(COLUMNS).push(" FROM ");
            sql.push(table(kind)).push(" r WHERE r.id = t.record_id").push_sql(record).push(" OFFSET 0) r");
            None
        } else {
            sql.push(COLUMNS).push(" FROM tags t JOIN ").push(table(kind)).push(" r ON r.id = t.record_id");
            Some(record)
        };
        sql.push(" WHERE t.record_type = ").literal(kind.record_type() as i64);
        sql.push(" AND t.tag = ").bind(tag);
        // A stage the filter requires is on the tag's entries as well, last in each order's
        // index, so that the walk passes over other stages' entries within the index rather than
        // read each entry's record (about 280 for a page of 50 customers at 1M people). The
        // filter's own condition on the record stays.
        let stage = q.filter.as_ref().and_then(|f| f.pins().find(|(field, _)| *field == STAGE.name));
        if let Some(stage) = stage.and_then(|(_, value)| STAGE.kind.enum_number(value)) {
            sql.push(" AND t.record_stage = ").literal(stage);
        }
        if let Some(record) = record_in_where {
            sql.push_sql(record);
        }
        self.push_walk_after(&mut sql, q, order, tags_walk);
        q.page.push_order(&mut sql, order);
        q.page.push_limit(&mut sql);
        Statement::new(sql, tags_walk)
    }

    /// The rows after the previous page; for a walk kept prepared on PostgreSQL, with the
    /// page's key out of the planner's sight, so that later pages settle on the kept plan too
    /// ([`Page::push_after_unplanned`]).
    fn push_walk_after(&self, sql: &mut Sql, q: &ListQuery, order: &Order, kept: bool) {
        if kept && self.db().backend() == Backend::Postgres {
            q.page.push_after_unplanned(sql, order);
        } else {
            q.page.push_after(sql, order);
        }
    }

    /// Every term must match, text terms in `search_text` and phone terms in `phone_digits`:
    /// on PostgreSQL by `LIKE` (served by each column's trigram index), on SQLite by each
    /// column's FTS5 trigram index for terms of 3 characters or more, `LIKE` for shorter ones.
    /// Over a window's few rows, `LIKE` on each row everywhere: SQLite would otherwise list
    /// every match of the whole table first (30,000 for a common name: 20–38 ms).
    fn push_search(&self, sql: &mut Sql, kind: Kind, terms: &[Term], windowed: bool) {
        for (phone, column, index) in [(false, "search_text", "_fts"), (true, "phone_digits", "_phones")] {
            let terms = terms.iter().filter(|t| t.phone == phone);
            let indexed = |term: &&Term| {
                !windowed && self.db().backend() == Backend::Sqlite && term.forms.iter().all(|f| f.chars().count() >= 3)
            };
            let (fts, like): (Vec<&Term>, Vec<&Term>) = terms.partition(indexed);
            if !fts.is_empty() {
                let query = fts
                    .iter()
                    .map(|term| {
                        let forms: Vec<String> = term.forms.iter().map(|f| fts_phrase(f)).collect();
                        format!("({})", forms.join(" OR "))
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let fts_table = format!("{}{index}", table(kind));
                sql.push(" AND seq IN (SELECT rowid FROM ").push(&fts_table).push(" WHERE ");
                sql.push(&fts_table).push(" MATCH ").bind(query).push(")");
            }
            for term in like {
                sql.push(" AND (");
                sql.push_each(&term.forms, " OR ", |sql, form| {
                    sql.push(column).push(" LIKE ").bind(like_pattern(form)).push(" ESCAPE '\\'");
                });
                sql.push(")");
            }
        }
    }

    /// Revisions of a record whose owner (as of its latest revision, so also after deletion)
    /// the scope allows, newest first; any other record's history is NOT_FOUND.
    pub async fn revisions(
        &self,
        record_id: &str,
        page: &Page,
        scope: &OwnerScope,
    ) -> Result<(Vec<Revision>, String), ApiError> {
        let mut latest = Sql::new("SELECT owner_id FROM revisions WHERE record_id = ");
        latest.bind(record_id).push(" ORDER BY version DESC LIMIT 1");
        let owner: Option<String> =
            latest.query().fetch_optional(self.db().pool()).await?.map(|row| row.try_get("owner_id")).transpose()?;
        if !owner.is_some_and(|owner| scope.allows(&owner)) {
            return Err(ApiError::NotFound(format!("record {record_id} not found")));
        }
        let order = revision_order();
        let mut sql = Sql::new(
            "SELECT record_id, version, record_type, action, actor, created_at, changes FROM revisions WHERE record_id = ",
        );
        sql.bind(record_id);
        page.push_keyset(&mut sql, &order);
        let rows = sql.query().fetch_all(self.db().pool()).await?;
        page.finish(&rows, &order, revision_of)
    }
}

fn revision_of(row: &AnyRow) -> Result<Revision, ApiError> {
    let changes: String = row.try_get("changes")?;
    let changes: Vec<StoredChange> =
        serde_json::from_str(&changes).map_err(|e| ApiError::Internal(format!("revision changes: {e}")))?;
    Ok(Revision {
        record_id: row.try_get("record_id")?,
        record_type: row.try_get::<i64, _>("record_type")? as i32,
        version: row.try_get("version")?,
        action: row.try_get::<i64, _>("action")? as i32,
        actor: row.try_get("actor")?,
        create_time: crm_kit::time::to_timestamp(row.try_get("created_at")?),
        changes: changes
            .into_iter()
            .map(|c| FieldChange { field: c.field, old_value: c.old, new_value: c.new })
            .collect(),
    })
}
