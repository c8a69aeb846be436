//! `crm bench plans`: every README filter and sort, a few searches, first page and a later
//! page (and companies by tag), run against a seeded contacts database with the plan the
//! database chose for each statement. A plan that does not walk an index shows here first, at
//! the size it was seeded to. A statement prepared once and kept (a tag's or one owner's walk,
//! or one without values) is marked, with how many of its runs on one connection used
//! PostgreSQL's generic plan.

use std::time::Duration;

use anyhow::Context;
use crm_contacts::Store;
use crm_contacts::domain::{Kind, Record, Rules};
use crm_contacts::store::{ListQuery, ListRequest, Planning};
use crm_kit::auth::OwnerScope;
use crm_proto::contacts::v1::{Company, Person};
use sqlx::Row;

#[derive(clap::Args, Debug)]
pub struct PlansArgs {
    /// The contacts database seeded by `crm bench seed` (postgres://… or sqlite://…).
    #[arg(long, env = "CRM_CONTACTS_DATABASE_URL")]
    database_url: String,
    /// Rows per page.
    #[arg(long, default_value_t = 50)]
    page_size: i32,
    /// The later page measured beside the first.
    #[arg(long, default_value_t = 5)]
    later_page: u32,
    /// Run as a head who sees this many owners' records (0: everything, as an administrator).
    #[arg(long, default_value_t = 0)]
    scope_owners: usize,
    /// Print every statement's whole plan, not only its outline.
    #[arg(long)]
    verbose: bool,
    /// Only the cases whose filter, sort or query contains this text.
    #[arg(long, default_value = "")]
    only: String,
}

/// A statement slower than this is marked in the table.
const SLOW: Duration = Duration::from_millis(10);

pub async fn plans(args: PlansArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.later_page >= 2, "--later-page must be 2 or more");
    let store = Store::open(&args.database_url, 2).await.context("open the contacts database")?;
    let pool = store.db().pool();
    let one = |sql: &'static str| async move {
        let row = sqlx::query(sql).fetch_optional(pool).await?;
        anyhow::Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?.unwrap_or_default())
    };
    let owner = one("SELECT owner_id FROM people WHERE owner_id <> '' LIMIT 1").await?;
    let company = one("SELECT company_id FROM people WHERE company_id <> '' LIMIT 1").await?;
    let region = one("SELECT region FROM people WHERE region <> '' LIMIT 1").await?;
    let phone = one("SELECT value FROM contact_keys WHERE record_type = 2 AND field = 'phone' LIMIT 1").await?;
    let scope = if args.scope_owners == 0 {
        OwnerScope::All
    } else {
        let mut sql =
            crm_kit::db::Sql::new("SELECT DISTINCT owner_id FROM people WHERE owner_id <> '' ORDER BY owner_id");
        sql.limit(args.scope_owners as i64);
        let owners: Vec<String> =
            sql.query().fetch_all(pool).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
        OwnerScope::Owners(owners.into())
    };
    let month_ago = crm_kit::time::format_rfc3339(crm_kit::time::now_micros() - 30 * 86_400 * 1_000_000);
    let filters = [
        String::new(),
        format!("owner_id = \"{owner}\""),
        "stage = CUSTOMER".into(),
        "source = referral".into(),
        format!("region = \"{region}\""),
        "tags:vip".into(),
        "do_not_contact = true".into(),
        format!("company_id = \"{company}\""),
        format!("create_time > \"{month_ago}\""),
        format!("update_time > \"{month_ago}\""),
        format!("last_activity_time < \"{month_ago}\""),
        "stage = CUSTOMER AND tags:vip".into(),
        format!("(region = \"{region}\" OR region = Kazan) AND NOT do_not_contact = true"),
        format!("owner_id = \"{owner}\" AND last_activity_time < \"{month_ago}\""),
    ];
    let sorts = ["", "create_time asc", "update_time desc", "last_activity_time", "full_name", "full_name desc"];
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    let searches = ["ivan".to_string(), "petr".to_string(), digits[digits.len().saturating_sub(7)..].to_string()];
    let mut cases: Vec<ListRequest> = Vec::new();
    for filter in &filters {
        for sort in sorts {
            cases.push(ListRequest { filter: filter.clone(), order_by: sort.into(), ..Default::default() });
        }
    }
    for query in &searches {
        for filter in ["", "stage = CUSTOMER"] {
            cases.push(ListRequest { filter: filter.into(), query: query.clone(), ..Default::default() });
        }
    }
    let wanted = |c: &ListRequest| {
        args.only.is_empty() || [&c.filter, &c.order_by, &c.query].iter().any(|t| t.contains(args.only.as_str()))
    };
    cases.retain(wanted);

    let rules = Rules::default();
    println!(
        "{} people; scope: {}; pages of {}; statements over {} ms marked *",
        store.count(Kind::Person).await?,
        if args.scope_owners == 0 { "everything".to_string() } else { format!("{} owners", args.scope_owners) },
        args.page_size,
        SLOW.as_millis()
    );
    println!("{:<58} {:<20} {:>5} {:>5} {:>9}  plan", "filter / query", "order_by", "page", "rows", "ms");
    let mut times = Vec::new();
    let run = Run { store: &store, rules: &rules, scope: &scope, args: &args };
    run.cases::<Person>(cases, &mut times).await?;
    // Companies by tag: the few records whose tag entries lie in one table with the many's.
    let companies = ["tags:vip", "stage = CUSTOMER AND tags:vip"].into_iter().flat_map(|filter| {
        ["", "create_time asc"].map(|order| ListRequest {
            filter: filter.into(),
            order_by: order.into(),
            ..Default::default()
        })
    });
    run.cases::<Company>(companies.filter(wanted).collect(), &mut times).await?;
    times.sort();
    if let (Some(max), false) = (times.last(), times.is_empty()) {
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
        println!(
            "{} statements: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms; {} over {} ms",
            times.len(),
            at(0.5),
            at(0.9),
            max.as_secs_f64() * 1000.0,
            times.iter().filter(|t| **t > SLOW).count(),
            SLOW.as_millis()
        );
    }
    store.db().close().await;
    Ok(())
}

/// What every case is run against.
struct Run<'a> {
    store: &'a Store,
    rules: &'a Rules,
    scope: &'a OwnerScope,
    args: &'a PlansArgs,
}

impl Run<'_> {
    /// Runs each case's first and later page, printing each statement's plan and time, and
    /// adds the times to `times`.
    async fn cases<R: Record>(&self, cases: Vec<ListRequest>, times: &mut Vec<Duration>) -> anyhow::Result<()> {
        for mut case in cases {
            case.page_size = self.args.page_size;
            for page in [1, self.args.later_page] {
                case.page_token.clear();
                // Walk to the page through the pages before it, as a client would.
                let mut reached = true;
                for _ in 1..page {
                    let q = ListQuery::parse(R::KIND, &case, self.rules, self.scope.clone())?;
                    let (_, next) = self.store.list::<R>(&q).await?;
                    if next.is_empty() {
                        reached = false;
                        break;
                    }
                    case.page_token = next;
                }
                if !reached {
                    continue;
                }
                let q = ListQuery::parse(R::KIND, &case, self.rules, self.scope.clone())?;
                let mut label = if case.query.is_empty() {
                    case.filter.clone()
                } else {
                    format!("query {:?} {}", case.query, case.filter)
                };
                if matches!(R::KIND, Kind::Company) {
                    label = format!("companies: {label}");
                }
                for (i, statement) in self.store.explain::<R>(&q).await?.into_iter().enumerate() {
                    let ms = statement.elapsed.as_secs_f64() * 1000.0;
                    times.push(statement.elapsed);
                    let mark = if statement.elapsed > SLOW { "*" } else { " " };
                    let page = if i == 0 { page.to_string() } else { format!("{page}+") };
                    let kept = match (statement.planning, statement.kept) {
                        (Planning::Kept, Some(runs)) => {
                            format!("[kept: generic plan {} of {} runs] ", runs.generic, runs.generic + runs.custom)
                        }
                        (Planning::Kept, None) => "[kept] ".to_string(),
                        (Planning::EachRun, _) => String::new(),
                    };
                    println!(
                        "{:<58} {:<20} {:>5} {:>5} {:>8.2}{mark}  {kept}{}",
                        clip(&label, 58),
                        case.order_by,
                        page,
                        statement.rows,
                        ms,
                        outline(&statement.plan)
                    );
                    if self.args.verbose {
                        for line in &statement.plan {
                            println!("        {line}");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(width - 1).collect();
    clipped.push('…');
    clipped
}

/// The plan's scans and joins, outermost first: `Limit > Index Scan Backward using people_stage`.
fn outline(plan: &[String]) -> String {
    let mut nodes = Vec::new();
    for line in plan {
        let node = line.trim_start().trim_start_matches("->").trim();
        // PostgreSQL's node lines carry a cost or timing in parentheses; details do not.
        let Some(name) = node.split("  (").next().filter(|_| node.contains("(cost=") || node.contains("(actual"))
        else {
            // SQLite's plan lines are the nodes themselves.
            if !line.contains(':') && !line.trim().is_empty() && !line.starts_with(' ') {
                nodes.push(node.to_string());
            }
            continue;
        };
        nodes.push(name.to_string());
    }
    nodes.join(" > ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlines_name_the_nodes() {
        let plan: Vec<String> = [
            "Limit  (cost=0.42..10.1 rows=51 width=300) (actual time=0.02..0.3 rows=51 loops=1)",
            "  Buffers: shared hit=60",
            "  ->  Index Scan Backward using people_stage on people  (cost=0.42..9000 rows=200000 width=300) (actual time=0.02..0.2 rows=51 loops=1)",
            "        Index Cond: (stage = 3)",
            "Planning Time: 0.2 ms",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(outline(&plan), "Limit > Index Scan Backward using people_stage on people");
        let sqlite: Vec<String> = ["SEARCH people USING INDEX people_stage (stage=?)"].map(String::from).to_vec();
        assert_eq!(outline(&sqlite), "SEARCH people USING INDEX people_stage (stage=?)");
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}
