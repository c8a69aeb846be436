//! `crm bench deals`: the deals service's calls in one process, through its API (validation,
//! data scope, SQL), on a database of realistic volume — a million deals of a thousand users in
//! departments of 500 over a year, in the starting pipeline, a quarter won and a quarter lost —
//! seeded (topped up) by the command itself. It times the writes (which keep the board's totals
//! in the same transaction) and the board and reports for an administrator who sees everyone,
//! a department head who sees 500 owners, and a salesperson.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crm_deals::store::deals::Loaded;
use crm_deals::{DealsApi, Store};
use crm_kit::auth::ScopeCache;
use crm_kit::db::{Backend, Sql};
use crm_proto::deals::v1::deals_service_server::DealsService;
use crm_proto::deals::v1::*;
use rand::Rng;

use crate::bench_inproc::{NoCustomers, Org, request, timed, user};

#[derive(clap::Args, Debug)]
pub struct DealsBenchArgs {
    /// A deals database for the bench (postgres://… or sqlite://…), migrated if needed. Its
    /// deals are topped up to `--deals`; the timed writes add more each run.
    #[arg(long)]
    database_url: String,
    /// Deals the database should hold.
    #[arg(long, default_value_t = 1_000_000)]
    deals: u64,
    /// Users owning them.
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Users per department (the first of each heads it and sees its users).
    #[arg(long, default_value_t = 500)]
    department_size: u64,
    /// Deals to create, then move, timed.
    #[arg(long, default_value_t = 2_000)]
    writes: u64,
    /// Calls of each board and report to time.
    #[arg(long, default_value_t = 20)]
    reads: u64,
    /// Writes in flight (boards and reports run one at a time).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

const SOURCES: &[&str] = &["web_form", "referral", "cold_call", "exhibition", "partner", ""];
const REASONS: &[&str] = &["Too expensive", "Chose a competitor", "Went silent", "No budget", "Bad timing"];

/// Tops the deals up to `args.deals` in transactions of 5,000 — spread over a year, a quarter
/// won and a quarter lost, nine in ten in EUR — then counts the board's totals afresh and has
/// the database gather statistics.
async fn seed(store: &Store, pipeline: &Pipeline, args: &DealsBenchArgs) -> anyhow::Result<()> {
    let have = store.count_deals().await? as u64;
    if have < args.deals {
        let started = Instant::now();
        let now = crm_kit::time::now_micros();
        let day = 86_400_000_000_i64;
        let open: Vec<&Stage> = pipeline.stages.iter().filter(|s| s.kind == StageKind::Open as i32).collect();
        let of_kind = |kind: StageKind| pipeline.stages.iter().find(|s| s.kind == kind as i32).expect("every kind");
        let (won, lost) = (of_kind(StageKind::Won), of_kind(StageKind::Lost));
        let mut left = args.deals - have;
        let mut rng = rand::rng();
        println!("seeding {left} deals over {} users and a year…", args.users);
        while left > 0 {
            let n = left.min(5_000);
            let batch: Vec<Loaded> = (0..n)
                .map(|_| {
                    let created_at = now - rng.random_range(0..365 * day);
                    let furthest = open[rng.random_range(0..open.len())];
                    let (stage, furthest, closed_at) = match rng.random_range(0..4) {
                        0 => (won, furthest, (created_at + rng.random_range(day..90 * day)).min(now)),
                        1 => (lost, furthest, (created_at + rng.random_range(day..90 * day)).min(now)),
                        _ => {
                            let at = open[rng.random_range(0..open.len())];
                            (at, if furthest.position > at.position { furthest } else { at }, 0)
                        }
                    };
                    let close = chrono::DateTime::from_timestamp_micros(created_at + rng.random_range(0..180 * day))
                        .unwrap_or_default()
                        .format("%Y-%m-%d")
                        .to_string();
                    let currency = if rng.random_range(0..10) == 0 { "USD" } else { "EUR" };
                    let deal = Deal {
                        id: crm_kit::id::new(),
                        title: format!("Deal {}", rng.random_range(0..1_000_000)),
                        pipeline_id: pipeline.id.clone(),
                        stage_id: stage.id.clone(),
                        status: crm_deals::domain::status_of(stage.kind) as i32,
                        owner_id: user(rng.random_range(0..args.users)),
                        amount: Some(Money {
                            currency_code: currency.into(),
                            minor_units: rng.random_range(10_000..10_000_000),
                        }),
                        probability: Some(stage.probability),
                        expected_close_date: close,
                        source: SOURCES[rng.random_range(0..SOURCES.len())].into(),
                        lost_reason: if stage.id == lost.id {
                            REASONS[rng.random_range(0..REASONS.len())].into()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    };
                    Loaded { deal, furthest_stage_id: furthest.id.clone(), created_at, closed_at }
                })
                .collect();
            store.load_deals(&batch).await?;
            left -= n;
            let done = args.deals - have - left;
            if done.is_multiple_of(100_000) || left == 0 {
                println!("  {done} in {:.0?}", started.elapsed());
            }
        }
        store.recount_board_totals().await?;
        // Statistics for the planner, and on PostgreSQL the visibility map too (the reports are
        // index-only scans, which read the table for pages not yet marked all-visible).
        let analyze = match store.db().backend() {
            Backend::Postgres => "VACUUM ANALYZE deals",
            Backend::Sqlite => "ANALYZE",
        };
        Sql::new(analyze).query().execute(store.db().pool()).await?;
        println!("  board totals counted and statistics gathered in {:.0?}", started.elapsed());
    }
    println!("{} deals", store.count_deals().await?);
    Ok(())
}

pub async fn run(args: DealsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.users >= 3 && args.department_size >= 3, "--users and --department-size must be at least 3");
    let db = crm_kit::db::Db::open(&args.database_url, 16, &crm_deals::store::migrations(), "deals")
        .await
        .context("open the deals database")?;
    let store = Store::new(db);
    store.ensure_starting_pipeline().await?;
    let first = store.first_stage("").await?.context("a pipeline")?;
    let pipeline = store.get_pipeline(&first.pipeline_id).await?;
    seed(&store, &pipeline, &args).await?;
    let org = Org { users: args.users, size: args.department_size };
    let scopes = ScopeCache::new(Arc::new(org.clone()), Duration::from_secs(600));
    let api = DealsApi::new(store.clone(), scopes, Arc::new(org.clone()), Arc::new(NoCustomers));
    let permissions = [crm_deals::permissions::READ.name, crm_deals::permissions::WRITE.name];
    let pick = |i: u64| (i.wrapping_mul(2_654_435_761)) % args.users;
    println!();

    let created = Arc::new(Mutex::new(Vec::new()));
    timed("CreateDeal", args.writes, args.concurrency, |i| {
        let api = api.clone();
        let owner = pick(i);
        let principal = org.principal(owner, &permissions);
        let created = created.clone();
        async move {
            let deal = Deal {
                title: format!("Bench deal {i}"),
                amount: Some(Money { currency_code: "EUR".into(), minor_units: 100_000 + i as i64 }),
                ..Default::default()
            };
            let deal =
                api.create_deal(request(&principal, CreateDealRequest { deal: Some(deal), request_id: String::new() }));
            let deal = deal.await?.into_inner();
            created.lock().expect("created").push((owner, deal.id));
            Ok(())
        }
    })
    .await?;
    let created = std::mem::take(&mut *created.lock().expect("created"));
    let open: Vec<String> =
        pipeline.stages.iter().filter(|s| s.kind == StageKind::Open as i32).map(|s| s.id.clone()).collect();
    timed("MoveDeal (to another open stage)", created.len() as u64, args.concurrency, |i| {
        let api = api.clone();
        let (owner, id) = created[i as usize].clone();
        let principal = org.principal(owner, &permissions);
        let stage_id = open[1 + i as usize % (open.len() - 1)].clone();
        async move {
            let r = MoveDealRequest { id, stage_id, ..Default::default() };
            api.move_deal(request(&principal, r)).await.map(|_| ())
        }
    })
    .await?;

    let viewers = [
        ("everyone (administrator)", Org::ADMIN),
        ("a head of 500", org.head_of(0)),
        ("a salesperson", org.head_of(0) + 1),
    ];
    for (who, viewer) in viewers {
        let principal = org.principal(viewer, &permissions);
        timed(&format!("GetBoard: {who}"), args.reads, 1, |_| {
            let api = api.clone();
            let r = request(&principal, GetBoardRequest { pipeline_id: pipeline.id.clone(), ..Default::default() });
            async move { api.get_board(r).await.map(|_| ()) }
        })
        .await?;
    }
    let kinds = [
        ("funnel", ReportKind::Funnel),
        ("forecast", ReportKind::Forecast),
        ("leaderboard", ReportKind::Leaderboard),
        ("won and lost", ReportKind::WonLost),
        ("conversion", ReportKind::Conversion),
    ];
    for (name, kind) in kinds {
        for (who, viewer) in &viewers[..2] {
            let principal = org.principal(*viewer, &permissions);
            let covered = Arc::new(Mutex::new(0));
            timed(&format!("RunReport {name}: {who}"), args.reads, 1, |_| {
                let api = api.clone();
                let covered = covered.clone();
                let r = request(&principal, RunReportRequest { kind: kind as i32, ..Default::default() });
                async move {
                    *covered.lock().expect("covered") = api.run_report(r).await?.into_inner().deal_count;
                    Ok(())
                }
            })
            .await?;
            println!("  (over {} deals)", covered.lock().expect("covered"));
        }
    }
    Ok(())
}
