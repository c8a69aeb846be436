//! The deals service against both backends, through its API (validation, rules, scope and SQL
//! together). PostgreSQL comes from CRM_TEST_POSTGRES_URL (a fresh database per test); SQLite
//! from a temporary file. The organisation and contacts' customers are fixtures.

use std::sync::Arc;
use std::time::Duration;

use crm_deals::{DealsApi, Store};
use crm_kit::ApiError;
use crm_kit::auth::{Principal, ScopeCache};
use crm_kit::customers::Customers;
use crm_kit::testing::{Org, TestDb};
use crm_proto::contacts::v1::{CustomerKey, CustomerSummary, RecordType};
use crm_proto::deals::v1::deals_service_server::DealsService;
use crm_proto::deals::v1::*;
use futures_util::future::BoxFuture;
use tonic::{Code, Request};
use tonic_types::StatusExt;

const READ: &str = crm_deals::permissions::READ.name;
const WRITE: &str = crm_deals::permissions::WRITE.name;
const ADMIN_PERMISSION: &str = crm_deals::permissions::ADMIN.name;

const ADMIN: &str = "0190a000-0000-7000-8000-000000000001";
const HEAD: &str = "0190a000-0000-7000-8000-000000000002";
const ALICE: &str = "0190a000-0000-7000-8000-000000000003";
const BOB: &str = "0190a000-0000-7000-8000-000000000004";
const CAROL: &str = "0190a000-0000-7000-8000-000000000005";
const ACME: &str = "0190a000-0000-7000-8000-0000000000c1";
const ANNA: &str = "0190a000-0000-7000-8000-0000000000c2";
/// Alice's department.
const TEAM: &str = "0190a000-0000-7000-8000-0000000000d1";
/// A department with nobody in it yet.
const NEW_TEAM: &str = "0190a000-0000-7000-8000-0000000000d2";

/// Contacts as a fixture: the company Acme (from a referral) and the person Anna (from the web
/// form), which everyone but Carol may see.
struct Contacts;

impl Customers for Contacts {
    fn find<'a>(
        &'a self,
        caller: &'a Principal,
        keys: Vec<CustomerKey>,
    ) -> BoxFuture<'a, Result<Vec<CustomerSummary>, ApiError>> {
        let found = keys
            .into_iter()
            .filter(|_| caller.subject != CAROL)
            .filter_map(|k| {
                let (kind, source) = match k.id.as_str() {
                    ACME => (RecordType::Company, "referral"),
                    ANNA => (RecordType::Person, "web_form"),
                    _ => return None,
                };
                (k.record_type == kind as i32).then(|| CustomerSummary {
                    record_type: k.record_type,
                    id: k.id,
                    source: source.into(),
                    ..Default::default()
                })
            })
            .collect();
        Box::pin(async move { Ok(found) })
    }
}

struct Env {
    store: Store,
    api: DealsApi,
    _db: TestDb,
}

async fn env(db: TestDb) -> Env {
    let opened = crm_kit::db::Db::open(db.url(), 4, &crm_deals::store::migrations(), "deals").await.unwrap();
    let store = Store::new(opened);
    assert!(store.ensure_starting_pipeline().await.unwrap());
    let org = Org::new().sees_all(ADMIN).sees(HEAD, &[ALICE, BOB]).user(ALICE).user(BOB).user(CAROL);
    let org = org.department(TEAM, &[ALICE]).department(NEW_TEAM, &[]);
    let scopes = ScopeCache::new(Arc::new(org.clone()), Duration::ZERO);
    let api = DealsApi::new(store.clone(), scopes, Arc::new(org), Arc::new(Contacts));
    Env { store, api, _db: db }
}

fn as_user<T>(user: &str, message: T) -> Request<T> {
    let permissions: &[&str] = if user == ADMIN { &[READ, WRITE, ADMIN_PERMISSION] } else { &[READ, WRITE] };
    crm_kit::testing::request(&crm_kit::testing::principal(user, permissions), message)
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

fn money(currency: &str, minor_units: i64) -> Option<Money> {
    Some(Money { currency_code: currency.into(), minor_units })
}

fn stage(name: &str, probability: i32, kind: StageKind) -> Stage {
    Stage { name: name.into(), probability, kind: kind as i32, ..Default::default() }
}

async fn sales(env: &Env) -> Pipeline {
    let list = env.api.list_pipelines(as_user(ALICE, ListPipelinesRequest::default())).await.unwrap().into_inner();
    list.pipelines.into_iter().find(|p| p.name == "Sales").expect("the starting pipeline")
}

fn stage_id(pipeline: &Pipeline, name: &str) -> String {
    pipeline.stages.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("stage {name}")).id.clone()
}

async fn create_deal(env: &Env, user: &str, deal: Deal) -> Result<Deal, tonic::Status> {
    env.api
        .create_deal(as_user(user, CreateDealRequest { deal: Some(deal), request_id: String::new() }))
        .await
        .map(|r| r.into_inner())
}

async fn move_deal(env: &Env, user: &str, id: &str, stage_id: &str, reason: &str) -> Result<Deal, tonic::Status> {
    let r =
        MoveDealRequest { id: id.into(), stage_id: stage_id.into(), lost_reason: reason.into(), etag: String::new() };
    env.api.move_deal(as_user(user, r)).await.map(|r| r.into_inner())
}

async fn pipelines_are_data(env: Env) {
    assert!(!env.store.ensure_starting_pipeline().await.unwrap(), "the starting pipeline is made once");
    let sales = sales(&env).await;
    let names: Vec<&str> = sales.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "New lead",
            "Client contacted",
            "Needs identified",
            "Proposal sent",
            "Negotiation",
            "Payment",
            "Order received",
            "Lost"
        ]
    );
    assert_eq!(sales.stages.iter().map(|s| s.position).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    // Only administrators change pipelines; a pipeline needs every kind of stage.
    let create =
        |user: &str, p: Pipeline| env.api.create_pipeline(as_user(user, CreatePipelineRequest { pipeline: Some(p) }));
    let partners = Pipeline {
        name: "Partners".into(),
        stages: vec![stage("Talking", 30, StageKind::Open), stage("Signed", 0, StageKind::Won)],
        ..Default::default()
    };
    assert_eq!(create(ALICE, partners.clone()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(violations(&create(ADMIN, partners.clone()).await.unwrap_err()), ["pipeline.stages"]);
    let mut full = partners.clone();
    full.stages.push(stage("Dropped", 0, StageKind::Lost));
    let partners = create(ADMIN, full.clone()).await.unwrap().into_inner();
    assert_eq!(partners.stages[1].probability, 100, "won stages default to 100");
    assert_eq!(
        violations(&create(ADMIN, Pipeline { name: " partners ".into(), ..full }).await.unwrap_err()),
        ["pipeline.name"]
    );
    // Add, rename, move, remove: ids stay, positions follow, the etag guards.
    let added = env
        .api
        .add_stage(as_user(
            ADMIN,
            AddStageRequest {
                pipeline_id: partners.id.clone(),
                stage: Some(stage("Demo", 50, StageKind::Open)),
                position: 2,
                etag: partners.etag.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        added.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["Talking", "Demo", "Signed", "Dropped"]
    );
    let demo = stage_id(&added, "Demo");
    let stale = env
        .api
        .move_stage(as_user(
            ADMIN,
            MoveStageRequest {
                pipeline_id: partners.id.clone(),
                stage_id: demo.clone(),
                position: 1,
                etag: partners.etag.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let moved = env
        .api
        .move_stage(as_user(
            ADMIN,
            MoveStageRequest {
                pipeline_id: partners.id.clone(),
                stage_id: demo.clone(),
                position: 1,
                etag: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.stages[0].id, demo);
    let renamed = env
        .api
        .update_stage(as_user(
            ADMIN,
            UpdateStageRequest {
                pipeline_id: partners.id.clone(),
                stage: Some(Stage { id: demo.clone(), name: "Product demo".into(), ..Default::default() }),
                update_mask: mask(&["name"]),
                etag: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((renamed.stages[0].id.as_str(), renamed.stages[0].name.as_str()), (demo.as_str(), "Product demo"));
    let clash = env
        .api
        .update_stage(as_user(
            ADMIN,
            UpdateStageRequest {
                pipeline_id: partners.id.clone(),
                stage: Some(Stage { id: demo.clone(), name: "talking".into(), ..Default::default() }),
                update_mask: mask(&["name"]),
                etag: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&clash), ["stage.name"]);
    let remove = |id: String| {
        env.api.remove_stage(as_user(
            ADMIN,
            RemoveStageRequest {
                pipeline_id: partners.id.clone(),
                stage_id: id,
                etag: String::new(),
                move_deals_to_stage_id: String::new(),
            },
        ))
    };
    let removed = remove(demo).await.unwrap().into_inner();
    assert_eq!(removed.stages.len(), 3);
    assert_eq!(
        violations(&remove(stage_id(&removed, "Dropped")).await.unwrap_err()),
        ["pipeline.stages"],
        "the last lost stage"
    );
    // Pipelines go, but never the last one.
    env.api
        .delete_pipeline(as_user(ADMIN, DeletePipelineRequest { id: partners.id.clone(), etag: String::new() }))
        .await
        .unwrap();
    let last =
        env.api.delete_pipeline(as_user(ADMIN, DeletePipelineRequest { id: sales.id, etag: String::new() })).await;
    assert_eq!(last.unwrap_err().code(), Code::FailedPrecondition);
}

async fn products_form_a_catalogue(env: Env) {
    let create = |p: Product| {
        env.api.create_product(as_user(ADMIN, CreateProductRequest { product: Some(p), request_id: String::new() }))
    };
    let widget = create(Product {
        name: "Widget".into(),
        sku: "W-1".into(),
        prices: vec![money("EUR", 1_999).unwrap(), money("USD", 2_199).unwrap()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert!(widget.active);
    let clash = create(Product { name: "Other".into(), sku: "w-1".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(violations(&clash), ["product.sku"]);
    create(Product { name: "Gadget".into(), ..Default::default() }).await.unwrap();
    let list = |filter: &str, query: &str| {
        env.api.list_products(as_user(
            ALICE,
            ListProductsRequest { filter: filter.into(), query: query.into(), ..Default::default() },
        ))
    };
    let names = |r: ListProductsResponse| r.products.into_iter().map(|p| p.name).collect::<Vec<_>>();
    assert_eq!(names(list("", "").await.unwrap().into_inner()), ["Gadget", "Widget"]);
    assert_eq!(names(list("", "w-").await.unwrap().into_inner()), ["Widget"]);
    env.api
        .update_product(as_user(
            ADMIN,
            UpdateProductRequest {
                product: Some(Product { id: widget.id.clone(), active: false, ..Default::default() }),
                update_mask: mask(&["active"]),
            },
        ))
        .await
        .unwrap();
    assert_eq!(names(list("active = true", "").await.unwrap().into_inner()), ["Gadget"]);
    assert_eq!(
        env.api
            .create_product(as_user(
                ALICE,
                CreateProductRequest {
                    product: Some(Product { name: "x".into(), ..Default::default() }),
                    request_id: String::new()
                }
            ))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}

async fn deals_keep_money_probability_and_history(env: Env) {
    let sales = sales(&env).await;
    let widget = env
        .api
        .create_product(as_user(
            ADMIN,
            CreateProductRequest {
                product: Some(Product {
                    name: "Widget".into(),
                    prices: vec![money("EUR", 1_999).unwrap()],
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let deal = Deal {
        title: " Renewal ".into(),
        person_id: ANNA.into(),
        company_id: ACME.into(),
        amount: money("EUR", 0),
        line_items: vec![
            LineItem { product_id: widget.id.clone(), quantity: 3, discount_bps: 1_000, ..Default::default() },
            LineItem { name: "Delivery".into(), quantity: 1, unit_price: money("EUR", 500), ..Default::default() },
        ],
        expected_close_date: "2026-12-31".into(),
        ..Default::default()
    };
    let created = create_deal(&env, ALICE, deal).await.unwrap();
    assert_eq!(
        (created.title.as_str(), created.owner_id.as_str(), created.source.as_str()),
        ("Renewal", ALICE, "web_form")
    );
    assert_eq!(created.amount, money("EUR", 5_897), "3 × 19.99 less 10% + 5.00");
    assert_eq!(created.line_items[0].name, "Widget");
    assert_eq!(
        (created.stage_id.clone(), created.probability, created.probability_manual),
        (stage_id(&sales, "New lead"), Some(10), false)
    );
    assert_eq!(created.weighted_amount, money("EUR", 590));
    assert_eq!(created.status, DealStatus::Open as i32);

    // Moves: the stage's probability until a user sets one, which then survives moves.
    let moved = move_deal(&env, ALICE, &created.id, &stage_id(&sales, "Proposal sent"), "").await.unwrap();
    assert_eq!(moved.probability, Some(60));
    let set = |probability: Option<i32>| UpdateDealRequest {
        deal: Some(Deal { id: created.id.clone(), probability, ..Default::default() }),
        update_mask: mask(&["probability"]),
    };
    let manual = env.api.update_deal(as_user(ALICE, set(Some(35)))).await.unwrap().into_inner();
    assert_eq!((manual.probability, manual.probability_manual), (Some(35), true));
    let moved = move_deal(&env, ALICE, &created.id, &stage_id(&sales, "Negotiation"), "").await.unwrap();
    assert_eq!(moved.probability, Some(35), "a manual probability survives the move");
    let cleared = env.api.update_deal(as_user(ALICE, set(None))).await.unwrap().into_inner();
    assert_eq!((cleared.probability, cleared.probability_manual), (Some(80), false));
    // Lost needs a reason; lost closes; back to an open stage reopens.
    let lost = stage_id(&sales, "Lost");
    assert_eq!(violations(&move_deal(&env, ALICE, &created.id, &lost, "").await.unwrap_err()), ["lost_reason"]);
    let closed = move_deal(&env, ALICE, &created.id, &lost, "Went with a competitor").await.unwrap();
    assert_eq!((closed.status, closed.lost_reason.as_str()), (DealStatus::Lost as i32, "Went with a competitor"));
    assert!(closed.close_time.is_some());
    let reopened = move_deal(&env, ALICE, &created.id, &stage_id(&sales, "Negotiation"), "").await.unwrap();
    assert_eq!(reopened.status, DealStatus::Open as i32);
    assert!(reopened.close_time.is_none() && reopened.lost_reason.is_empty());
    let history = env
        .api
        .list_stage_history(as_user(
            ALICE,
            ListStageHistoryRequest { deal_id: created.id.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .changes;
    let kinds: Vec<i32> = history.iter().map(|c| c.kind).collect();
    use StageChangeKind::*;
    assert_eq!(kinds, [Created as i32, Moved as i32, Moved as i32, Closed as i32, Reopened as i32]);
    assert_eq!(history[3].lost_reason, "Went with a competitor");
    assert!(history.iter().all(|c| c.seconds_in_previous >= 0 && c.actor_id == ALICE));
    assert_eq!(history[1].from_stage_id, stage_id(&sales, "New lead"));

    // Bad input: each a field violation, nothing half-written.
    let bad_lines = UpdateDealRequest {
        deal: Some(Deal {
            id: created.id.clone(),
            line_items: vec![
                LineItem { name: "x".into(), quantity: -1, unit_price: money("EUR", 1), ..Default::default() },
                LineItem { name: "y".into(), quantity: 1, unit_price: money("USD", 1), ..Default::default() },
                LineItem {
                    product_id: "0190a000-0000-7000-8000-0000000000ff".into(),
                    quantity: 1,
                    ..Default::default()
                },
                LineItem {
                    name: "z".into(),
                    quantity: 1_000_000,
                    unit_price: money("EUR", i64::MAX / 2),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        update_mask: mask(&["line_items"]),
    };
    let refused = env.api.update_deal(as_user(ALICE, bad_lines)).await.unwrap_err();
    assert_eq!(
        violations(&refused),
        [
            "deal.line_items[0].quantity",
            "deal.line_items[1].unit_price.currency_code",
            "deal.line_items[2].product_id",
            "deal.line_items[3].quantity",
        ]
    );
    let unchanged =
        env.api.get_deal(as_user(ALICE, GetDealRequest { id: created.id.clone() })).await.unwrap().into_inner();
    assert_eq!((unchanged.amount.clone(), unchanged.etag.clone()), (money("EUR", 5_897), reopened.etag.clone()));
    let other = env
        .api
        .create_pipeline(as_user(
            ADMIN,
            CreatePipelineRequest {
                pipeline: Some(Pipeline {
                    name: "Other".into(),
                    stages: vec![
                        stage("A", 10, StageKind::Open),
                        stage("W", 100, StageKind::Won),
                        stage("L", 0, StageKind::Lost),
                    ],
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        violations(&move_deal(&env, ALICE, &created.id, &other.stages[0].id, "").await.unwrap_err()),
        ["stage_id"]
    );
    let overflow = Deal { title: "Big".into(), amount: money("EUR", domain_max() + 1), ..Default::default() };
    assert_eq!(violations(&create_deal(&env, ALICE, overflow).await.unwrap_err()), ["deal.amount.minor_units"]);
    let no_customer =
        Deal { title: "x".into(), company_id: "0190a000-0000-7000-8000-0000000000ee".into(), ..Default::default() };
    assert_eq!(violations(&create_deal(&env, ALICE, no_customer).await.unwrap_err()), ["deal.company_id"]);
    let invisible = Deal { title: "x".into(), person_id: ANNA.into(), ..Default::default() };
    assert_eq!(violations(&create_deal(&env, CAROL, invisible).await.unwrap_err()), ["deal.person_id"]);
    let not_mine = Deal { title: "x".into(), owner_id: CAROL.into(), ..Default::default() };
    assert_eq!(create_deal(&env, ALICE, not_mine).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(
        env.api.get_deal(as_user(CAROL, GetDealRequest { id: created.id.clone() })).await.unwrap_err().code(),
        Code::NotFound
    );
}

fn domain_max() -> i64 {
    crm_deals::domain::MAX_AMOUNT
}

async fn boards_total_every_matching_deal(env: Env) {
    let sales = sales(&env).await;
    let new_lead = stage_id(&sales, "New lead");
    let payment = stage_id(&sales, "Payment");
    let deal = |title: &str, owner: &str, currency: &str, amount: i64| Deal {
        title: title.into(),
        owner_id: owner.into(),
        amount: money(currency, amount),
        ..Default::default()
    };
    for i in 0..5 {
        create_deal(&env, ALICE, deal(&format!("A{i}"), ALICE, "EUR", 1_000)).await.unwrap();
    }
    // A deal without an amount counts, in no currency.
    create_deal(&env, ALICE, Deal { title: "No amount yet".into(), ..Default::default() }).await.unwrap();
    let b = create_deal(&env, BOB, deal("B", BOB, "USD", 2_000)).await.unwrap();
    move_deal(&env, BOB, &b.id, &payment, "").await.unwrap();
    create_deal(&env, CAROL, deal("C", CAROL, "EUR", 7_000)).await.unwrap();
    let board = |user: &str, filter: &str| {
        env.api.get_board(as_user(
            user,
            GetBoardRequest { pipeline_id: sales.id.clone(), filter: filter.into(), cards_per_column: 2 },
        ))
    };
    let head = board(HEAD, "").await.unwrap().into_inner();
    let column = |b: &Board, id: &str| b.columns.iter().find(|c| c.stage.as_ref().unwrap().id == id).unwrap().clone();
    let first = column(&head, &new_lead);
    assert_eq!(first.count, 6, "the head sees Alice's six, not Carol's");
    assert_eq!(first.totals.len(), 1, "one currency: the deal without an amount counts in none");
    assert_eq!((first.totals[0].count, first.totals[0].sum.clone()), (5, money("EUR", 5_000)));
    assert_eq!(first.totals[0].weighted, money("EUR", 500));
    assert_eq!(first.cards.len(), 2, "a page of cards; the totals are over all");
    let paid = column(&head, &payment);
    assert_eq!(
        (paid.count, paid.totals[0].sum.clone(), paid.totals[0].weighted.clone()),
        (1, money("USD", 2_000), money("USD", 1_800))
    );
    // The rest of a column pages through ListDeals.
    let rest = env
        .api
        .list_deals(as_user(
            HEAD,
            ListDealsRequest {
                filter: first.next_filter.clone(),
                order_by: "create_time desc".into(),
                page_size: 2,
                page_token: first.next_page_token.clone(),
                rotting: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.deals.len(), 2);
    let all = board(ADMIN, "").await.unwrap().into_inner();
    assert_eq!(column(&all, &new_lead).count, 7);
    let mine = board(ADMIN, &format!("owner_id = \"{CAROL}\"")).await.unwrap().into_inner();
    assert_eq!(column(&mine, &new_lead).count, 1);
    assert_eq!(violations(&board(ADMIN, "stage_id = \"x\"").await.unwrap_err()), ["filter"]);
    let big = env
        .api
        .list_deals(as_user(ADMIN, ListDealsRequest { filter: "amount >= 2000".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.deals.len(), 2);

    // A stage with deals: its kind stays; a new default reaches deals without a manual one;
    // removing it moves them (recorded) or is refused.
    let update = |probability: i32, kind: StageKind, paths: &[&str]| UpdateStageRequest {
        pipeline_id: sales.id.clone(),
        stage: Some(Stage {
            id: new_lead.clone(),
            probability,
            kind: kind as i32,
            name: "New lead".into(),
            ..Default::default()
        }),
        update_mask: mask(paths),
        etag: String::new(),
    };
    assert_eq!(
        env.api.update_stage(as_user(ADMIN, update(0, StageKind::Won, &["kind"]))).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    env.api.update_stage(as_user(ADMIN, update(15, StageKind::Open, &["probability"]))).await.unwrap();
    let listed = env
        .api
        .list_deals(as_user(
            ADMIN,
            ListDealsRequest { filter: format!("stage_id = \"{new_lead}\""), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.deals.iter().all(|d| d.probability == Some(15)));
    same_totals(
        &board(ADMIN, "").await.unwrap().into_inner(),
        &board(ADMIN, "amount >= 0").await.unwrap().into_inner(),
    );
    let remove = |to: &str| RemoveStageRequest {
        pipeline_id: sales.id.clone(),
        stage_id: new_lead.clone(),
        etag: String::new(),
        move_deals_to_stage_id: to.into(),
    };
    assert_eq!(env.api.remove_stage(as_user(ADMIN, remove(""))).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(
        violations(&env.api.remove_stage(as_user(ADMIN, remove(&stage_id(&sales, "Lost")))).await.unwrap_err()),
        ["move_deals_to_stage_id"]
    );
    let contacted = stage_id(&sales, "Client contacted");
    env.api.remove_stage(as_user(ADMIN, remove(&contacted))).await.unwrap();
    let after = board(ADMIN, "").await.unwrap().into_inner();
    assert_eq!(column(&after, &contacted).count, 7);
    same_totals(&after, &board(ADMIN, "amount >= 0").await.unwrap().into_inner());
    same_totals(&board(HEAD, "").await.unwrap().into_inner(), &board(HEAD, "amount >= 0").await.unwrap().into_inner());
    let a0 = column(&after, &contacted).cards[0].clone();
    assert_eq!(a0.probability, Some(20), "the new stage's default");
    let history = env
        .api
        .list_stage_history(as_user(ADMIN, ListStageHistoryRequest { deal_id: a0.id.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(history.last().map(|c| (c.from_stage_id.clone(), c.to_stage_id.clone())), Some((new_lead, contacted)));
}

/// The board's totals kept per stage and owner (read without a filter) equal the aggregate over
/// the deals themselves (read with a filter every deal matches).
fn same_totals(kept: &Board, counted: &Board) {
    let of = |b: &Board| {
        b.columns.iter().map(|c| (c.stage.as_ref().unwrap().id.clone(), c.count, c.totals.clone())).collect::<Vec<_>>()
    };
    assert_eq!(of(kept), of(counted));
}

/// A stage may require fields of the deals entering it; a rotting threshold flags deals that
/// stay too long.
async fn stages_require_fields_and_deals_rot(env: Env) {
    let sales = sales(&env).await;
    let payment = stage_id(&sales, "Payment");
    let require = |fields: &[&str], rotting_days: i32| UpdateStageRequest {
        pipeline_id: sales.id.clone(),
        stage: Some(Stage {
            id: payment.clone(),
            required_fields: fields.iter().map(|f| f.to_string()).collect(),
            rotting_days,
            ..Default::default()
        }),
        update_mask: mask(&["required_fields", "rotting_days"]),
        etag: String::new(),
    };
    let wrong = env.api.update_stage(as_user(ADMIN, require(&["amount", "colour"], 0))).await.unwrap_err();
    assert_eq!(violations(&wrong), ["stage.required_fields[1]"]);
    let updated = env.api.update_stage(as_user(ADMIN, require(&["amount", "customer", "amount"], 0))).await.unwrap();
    let stage = updated.into_inner().stages.into_iter().find(|s| s.id == payment).unwrap();
    assert_eq!(stage.required_fields, ["amount", "customer"]);
    let bare = create_deal(&env, ALICE, Deal { title: "Bare".into(), ..Default::default() }).await.unwrap();
    let refused = move_deal(&env, ALICE, &bare.id, &payment, "").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(violations(&refused), ["deal.amount", "deal.customer"], "each missing field named");
    let fill = UpdateDealRequest {
        deal: Some(Deal {
            id: bare.id.clone(),
            amount: money("EUR", 100),
            person_id: ANNA.into(),
            ..Default::default()
        }),
        update_mask: mask(&["amount", "person_id"]),
    };
    env.api.update_deal(as_user(ALICE, fill)).await.unwrap();
    let entered = move_deal(&env, ALICE, &bare.id, &payment, "").await.unwrap();
    assert_eq!(entered.stage_id, payment);
    let straight = Deal { title: "Straight in".into(), stage_id: payment.clone(), ..Default::default() };
    assert_eq!(violations(&create_deal(&env, ALICE, straight).await.unwrap_err()), ["deal.amount", "deal.customer"]);

    // Rotting: a threshold already passed (the deal entered before it) flags the deal at once;
    // moving it on clears the flag; closed deals never rot.
    let rotting =
        |user: &str| env.api.list_deals(as_user(user, ListDealsRequest { rotting: true, ..Default::default() }));
    assert!(rotting(ALICE).await.unwrap().into_inner().deals.is_empty());
    let mut sql = crm_kit::db::Sql::new("UPDATE deals SET stage_entered_at = stage_entered_at - ");
    sql.bind(3 * 86_400_000_000_i64);
    sql.query().execute(env.store.db().pool()).await.unwrap();
    env.api.update_stage(as_user(ADMIN, require(&[], 2))).await.unwrap();
    let rotten = rotting(ALICE).await.unwrap().into_inner().deals;
    assert_eq!(rotten.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [bare.id.as_str()]);
    assert!(rotten[0].rotting);
    assert!(rotting(CAROL).await.unwrap().into_inner().deals.is_empty(), "within scope");
    // An activity on the deal (the tasks service's event) restarts its rotting clock: logged
    // a day ago, the deal rots a day from now. Older or repeated events change nothing.
    let day = 86_400_000_000_i64;
    let now = crm_kit::time::now_micros();
    let logged = |at: i64| crm_kit::events::Delivered {
        envelope: crm_kit::events::envelope::envelope(
            "tasks",
            "activity",
            ALICE,
            &crm_proto::tasks::v1::ActivityLogged {
                activity_id: "activity".into(),
                occur_time: crm_kit::time::to_timestamp(at),
                deal_id: bare.id.clone(),
                ..Default::default()
            },
        ),
        seq: 1,
        redelivered: false,
    };
    let intake = crm_deals::intake::Intake::new(env.store.clone());
    for at in [now - day, now - 2 * day, now - day, now - 5 * day] {
        let mut tx = env.store.db().begin_write().await.unwrap();
        crm_kit::events::Handler::handle(&intake, &mut tx, &logged(at)).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert!(rotting(ALICE).await.unwrap().into_inner().deals.is_empty(), "an activity a day ago: not rotting");
    let fresh = env.api.get_deal(as_user(ALICE, GetDealRequest { id: bare.id.clone() })).await.unwrap().into_inner();
    assert_eq!(fresh.last_activity_time, crm_kit::time::to_timestamp(now - day));
    assert_eq!(fresh.etag, rotten[0].etag, "no new version");
    let quiet = format!("last_activity_time < \"{}\"", chrono::Utc::now().format("%Y-%m-%dT00:00:00Z"));
    let listed = env.api.list_deals(as_user(ALICE, ListDealsRequest { filter: quiet, ..Default::default() }));
    assert!(listed.await.unwrap().into_inner().deals.iter().any(|d| d.id == bare.id), "filterable");
    // Two more days without activity than the threshold allows: rotting again.
    let mut sql = crm_kit::db::Sql::new("UPDATE deals SET rot_at = rot_at - ");
    sql.bind(2 * day).push(" WHERE id = ").bind(bare.id.as_str());
    sql.query().execute(env.store.db().pool()).await.unwrap();
    assert_eq!(rotting(ALICE).await.unwrap().into_inner().deals.len(), 1);
    let won = move_deal(&env, ALICE, &bare.id, &stage_id(&sales, "Order received"), "").await.unwrap();
    assert!(!won.rotting);
    assert!(rotting(ALICE).await.unwrap().into_inner().deals.is_empty());
}

/// Wins publish the purchase history's events: won, won again with a new amount, undone.
async fn wins_are_published(env: Env) {
    use prost::Message;
    let sales = sales(&env).await;
    let d = Deal { title: "Win".into(), person_id: ANNA.into(), amount: money("EUR", 1_000), ..Default::default() };
    let d = create_deal(&env, ALICE, d).await.unwrap();
    move_deal(&env, ALICE, &d.id, &stage_id(&sales, "Order received"), "").await.unwrap();
    let bigger = UpdateDealRequest {
        deal: Some(Deal { id: d.id.clone(), amount: money("EUR", 1_500), ..Default::default() }),
        update_mask: mask(&["amount"]),
    };
    env.api.update_deal(as_user(ALICE, bigger)).await.unwrap();
    move_deal(&env, ALICE, &d.id, &stage_id(&sales, "Negotiation"), "").await.unwrap();
    let rows = crm_kit::db::Sql::new("SELECT envelope FROM outbox ORDER BY seq")
        .query()
        .fetch_all(env.store.db().pool())
        .await
        .unwrap();
    let types: Vec<String> = rows
        .iter()
        .map(|r| {
            let bytes: Vec<u8> = sqlx::Row::try_get(r, "envelope").unwrap();
            crm_proto::events::v1::Envelope::decode(bytes.as_slice()).unwrap().r#type
        })
        .collect();
    assert_eq!(
        types,
        [
            "crm.deals.v1.DealStageChanged",
            "crm.deals.v1.DealStageChanged",
            "crm.deals.v1.DealWon",
            "crm.deals.v1.DealWon",
            "crm.deals.v1.DealStageChanged",
            "crm.deals.v1.DealWinUndone",
        ]
    );
}

/// Automations are data on a stage; entering it publishes them with the entry, and a notice
/// per person a notify automation names.
async fn automations_travel_with_the_entry(env: Env) {
    use prost::Message;
    let sales = sales(&env).await;
    let payment = stage_id(&sales, "Payment");
    let set = |automations: Vec<Automation>| UpdateStageRequest {
        pipeline_id: sales.id.clone(),
        stage: Some(Stage { id: payment.clone(), automations, ..Default::default() }),
        update_mask: mask(&["automations"]),
        etag: String::new(),
    };
    let task = Automation {
        action: Some(automation::Action::CreateTask(TaskAutomation {
            title: "Send the invoice for {deal}".into(),
            due_in_days: 2,
            ..Default::default()
        })),
    };
    let notify = Automation {
        action: Some(automation::Action::Notify(NotifyAutomation {
            user_ids: vec![HEAD.into()],
            owner: true,
            owner_supervisor: true,
            message: "{deal} reached {stage}".into(),
        })),
    };
    let nobody = Automation {
        action: Some(automation::Action::Notify(NotifyAutomation { message: "x".into(), ..Default::default() })),
    };
    let bad = env.api.update_stage(as_user(ADMIN, set(vec![nobody, Automation { action: None }]))).await.unwrap_err();
    assert_eq!(violations(&bad), ["stage.automations[0].notify", "stage.automations[1]"]);
    let text_with_subject = Automation {
        action: Some(automation::Action::MessageClient(ClientMessageAutomation {
            channel: MessageChannel::Sms as i32,
            subject: "Hello".into(),
            body: String::new(),
        })),
    };
    let no_hook =
        Automation { action: Some(automation::Action::CallWebhook(WebhookAutomation { webhook_id: "x".into() })) };
    let bad = env.api.update_stage(as_user(ADMIN, set(vec![text_with_subject, no_hook]))).await.unwrap_err();
    assert_eq!(
        violations(&bad),
        [
            "stage.automations[0].message_client.subject",
            "stage.automations[0].message_client.body",
            "stage.automations[1].call_webhook.webhook_id"
        ]
    );
    let updated = env.api.update_stage(as_user(ADMIN, set(vec![task, notify]))).await.unwrap().into_inner();
    assert_eq!(updated.stages.iter().find(|s| s.id == payment).unwrap().automations.len(), 2, "kept with the stage");
    let d = create_deal(&env, ALICE, Deal { title: "Widgets".into(), ..Default::default() }).await.unwrap();
    move_deal(&env, ADMIN, &d.id, &payment, "").await.unwrap();
    let rows = crm_kit::db::Sql::new("SELECT envelope FROM outbox ORDER BY seq")
        .query()
        .fetch_all(env.store.db().pool())
        .await
        .unwrap();
    let envelopes: Vec<crm_proto::events::v1::Envelope> = rows
        .iter()
        .map(|r| {
            crm_proto::events::v1::Envelope::decode(sqlx::Row::try_get::<Vec<u8>, _>(r, "envelope").unwrap().as_slice())
                .unwrap()
        })
        .collect();
    let entry = envelopes
        .iter()
        .filter_map(crm_kit::events::envelope::payload::<DealStageChanged>)
        .map(|p| p.unwrap())
        .find(|e| e.to_stage_id == payment)
        .expect("the entry");
    assert_eq!(entry.automations.len(), 2);
    let notices: Vec<(String, String, String)> = envelopes
        .iter()
        .filter_map(crm_kit::events::envelope::payload::<DealAutomationNotice>)
        .map(|p| p.unwrap())
        .map(|n| (n.recipient_id, n.supervisor_of_id, n.message))
        .collect();
    assert_eq!(
        notices,
        [
            (HEAD.to_string(), String::new(), "Widgets reached Payment".to_string()),
            (ALICE.to_string(), String::new(), "Widgets reached Payment".to_string()),
            (String::new(), ALICE.to_string(), "Widgets reached Payment".to_string()),
        ]
    );
}

fn report_request(kind: ReportKind) -> RunReportRequest {
    RunReportRequest { kind: kind as i32, ..Default::default() }
}

async fn report(env: &Env, user: &str, r: RunReportRequest) -> Result<Report, tonic::Status> {
    env.api.run_report(as_user(user, r)).await.map(|r| r.into_inner())
}

/// The cells of a report's rows as text ("" where empty).
fn cells(report: &Report) -> Vec<Vec<String>> {
    report
        .rows
        .iter()
        .map(|r| {
            r.cells
                .iter()
                .map(|c| match &c.value {
                    Some(report_cell::Value::Text(t)) => t.clone(),
                    Some(report_cell::Value::Number(n)) => n.to_string(),
                    None => String::new(),
                })
                .collect()
        })
        .collect()
}

fn column_names(report: &Report) -> Vec<&str> {
    report.columns.iter().map(|c| c.name.as_str()).collect()
}

/// Reports count every matching deal the caller may see, from the database's aggregates: the
/// funnel by how far deals got, won and lost per month, lost reasons, the leaderboard, sources,
/// conversion and the forecast; narrowed by owners, department, pipeline and currency; as CSV.
async fn reports_add_up_what_the_caller_may_see(env: Env) {
    let sales = sales(&env).await;
    let [contacted, proposal, payment, won, lost] =
        ["Client contacted", "Proposal sent", "Payment", "Order received", "Lost"].map(|n| stage_id(&sales, n));
    let today = chrono::Utc::now().date_naive().format("%Y-%m-%d").to_string();
    let deal = |title: &str, owner: &str, currency: &str, amount: i64, close: &str| Deal {
        title: title.into(),
        owner_id: owner.into(),
        amount: if currency.is_empty() { None } else { money(currency, amount) },
        expected_close_date: close.into(),
        company_id: if owner == ALICE { ACME.into() } else { String::new() },
        ..Default::default()
    };
    // Alice: two won (EUR 1,000 and 3,000, from a referral), one lost at the proposal, one at
    // the payment stage, one new. Bob: one lost early (USD), one new without an amount. Carol
    // (outside the head's scope): one won.
    let a1 = create_deal(&env, ALICE, deal("A1", ALICE, "EUR", 1_000, "")).await.unwrap();
    let a2 = create_deal(&env, ALICE, deal("A2", ALICE, "EUR", 3_000, "")).await.unwrap();
    let a3 = create_deal(&env, ALICE, deal("A3", ALICE, "EUR", 500, "")).await.unwrap();
    let a4 = create_deal(&env, ALICE, deal("A4", ALICE, "EUR", 800, &today)).await.unwrap();
    create_deal(&env, ALICE, deal("A5", ALICE, "EUR", 200, &today)).await.unwrap();
    let b1 = create_deal(&env, BOB, deal("B1", BOB, "USD", 700, "")).await.unwrap();
    create_deal(&env, BOB, deal("B2", BOB, "", 0, &today)).await.unwrap();
    let c1 = create_deal(&env, CAROL, deal("C1", CAROL, "EUR", 9_000, "")).await.unwrap();
    for (id, path) in [
        (&a1.id, vec![&proposal, &won]),
        (&a2.id, vec![&payment, &won]),
        (&a3.id, vec![&proposal, &contacted, &lost]),
        (&a4.id, vec![&payment]),
        (&b1.id, vec![&lost]),
        (&c1.id, vec![&won]),
    ] {
        let owner = if id == &b1.id {
            BOB
        } else if id == &c1.id {
            CAROL
        } else {
            ALICE
        };
        for to in path {
            let reason = if to == &lost { if id == &b1.id { "Too expensive" } else { "Went silent" } } else { "" };
            move_deal(&env, owner, id, to, reason).await.unwrap();
        }
    }

    // The funnel of the head's people: 7 deals created; how far each got.
    let funnel = report(&env, HEAD, report_request(ReportKind::Funnel)).await.unwrap();
    assert_eq!(funnel.deal_count, 7);
    assert!(funnel.title.starts_with("Funnel of Sales, deals created"), "{}", funnel.title);
    assert_eq!(
        column_names(&funnel),
        ["stage", "kind", "reached", "in_stage", "conversion", "share", "value_eur", "value_usd"]
    );
    let rows = cells(&funnel);
    let row = |name: &str| rows.iter().find(|r| r[0] == name).unwrap().clone();
    // Everyone reached the first stage; the client was contacted for A1-A4 (A3 went back to
    // it, having reached the proposal), proposal for A1-A4, payment for A2 and A4, won A1, A2.
    assert_eq!(row("New lead")[2..], ["7", "2", "", "10000", "5500", "700"]);
    assert_eq!(row("Client contacted")[2..], ["4", "0", "5714", "5714", "5300", "0"]);
    assert_eq!(row("Proposal sent")[2..], ["4", "0", "10000", "5714", "5300", "0"]);
    assert_eq!(row("Negotiation")[2..], ["3", "0", "7500", "4286", "4800", "0"]);
    assert_eq!(row("Payment")[2..], ["3", "1", "10000", "4286", "4800", "0"]);
    assert_eq!(row("Order received")[1..], ["won", "2", "2", "6667", "2857", "4000", "0"]);
    assert_eq!(row("Lost")[1..], ["lost", "2", "2", "", "2857", "500", "700"]);
    // The administrator sees Carol's too.
    let all = report(&env, ADMIN, report_request(ReportKind::Funnel)).await.unwrap();
    assert_eq!(all.deal_count, 8);

    // Won and lost this month, with the total row.
    let won_lost = report(&env, HEAD, report_request(ReportKind::WonLost)).await.unwrap();
    assert_eq!(won_lost.rows.len(), 13, "twelve months and the total");
    let total = cells(&won_lost).pop().unwrap();
    assert_eq!(column_names(&won_lost)[..5], ["month", "won", "lost", "win_rate", "sales_cycle"]);
    assert_eq!(total[0], "Total");
    assert_eq!(total[1..4], ["2", "2", "5000"]);
    assert_eq!(total[5..], ["4000", "2000"], "won value and average won deal in EUR");

    let reasons = report(&env, HEAD, report_request(ReportKind::LostReasons)).await.unwrap();
    assert_eq!(cells(&reasons), [["Too expensive", "1", "5000", "0", "700"], ["Went silent", "1", "5000", "500", "0"]]);

    let board = report(&env, ADMIN, report_request(ReportKind::Leaderboard)).await.unwrap();
    let ranked: Vec<(String, String, String)> =
        cells(&board).into_iter().map(|r| (r[1].clone(), r[2].clone(), r[3].clone())).collect();
    assert_eq!(
        ranked,
        [
            (CAROL.into(), "1".into(), "0".into()),
            (ALICE.into(), "2".into(), "1".into()),
            (BOB.into(), "0".into(), "1".into())
        ]
    );
    assert_eq!(cells(&board)[1][0], "User 0003", "owners are named");

    let sources = report(&env, HEAD, report_request(ReportKind::WonBySource)).await.unwrap();
    assert_eq!(cells(&sources), [["referral", "2", "10000", "4000"]]);

    let conversion = report(&env, HEAD, report_request(ReportKind::Conversion)).await.unwrap();
    assert_eq!(cells(&conversion).pop().unwrap(), ["Total", "7", "2", "2", "3", "2857"]);

    // Open deals expected to close this month: A4 (EUR 800 at 90%), A5 (EUR 200 at 10%), B2.
    let forecast = report(&env, HEAD, report_request(ReportKind::Forecast)).await.unwrap();
    assert_eq!(column_names(&forecast), ["month", "deals", "value_eur", "weighted_eur"]);
    assert_eq!(cells(&forecast)[0][1..], ["3", "1000", "740"]);

    // Narrowed: to Bob; to a department (Alice's); to a currency; to a pipeline.
    let only_bob =
        report(&env, HEAD, RunReportRequest { owner_ids: vec![BOB.into()], ..report_request(ReportKind::Funnel) })
            .await
            .unwrap();
    assert_eq!(only_bob.deal_count, 2);
    let outside =
        report(&env, HEAD, RunReportRequest { owner_ids: vec![CAROL.into()], ..report_request(ReportKind::Funnel) })
            .await
            .unwrap();
    assert_eq!(outside.deal_count, 0, "owners outside the scope are left out");
    let team =
        report(&env, ADMIN, RunReportRequest { department_id: TEAM.into(), ..report_request(ReportKind::Funnel) })
            .await
            .unwrap();
    assert_eq!(team.deal_count, 5);
    let usd =
        report(&env, HEAD, RunReportRequest { currency_code: "USD".into(), ..report_request(ReportKind::WonLost) })
            .await
            .unwrap();
    assert_eq!(usd.deal_count, 1);
    assert!(usd.title.ends_with(", in USD"));

    // CSV: money in major units, rates as percentages.
    let csv = env.api.export_report(as_user(HEAD, report_request(ReportKind::LostReasons))).await.unwrap().into_inner();
    assert_eq!(csv.content_type, "text/csv; charset=utf-8");
    assert_eq!(
        String::from_utf8(csv.data).unwrap(),
        "Lost reason,Lost,Share,Lost value (EUR),Lost value (USD)\r\nToo expensive,1,50.00,0.00,7.00\r\nWent silent,1,50.00,5.00,0.00\r\n"
    );

    // Bad input: each a field violation.
    let bad = |r: RunReportRequest| async { violations(&report(&env, HEAD, r).await.unwrap_err()) };
    assert_eq!(bad(RunReportRequest::default()).await, ["kind"]);
    let funnel_request = report_request(ReportKind::Funnel);
    assert_eq!(
        bad(RunReportRequest { start_date: "2026-13-01".into(), ..funnel_request.clone() }).await,
        ["start_date"]
    );
    assert_eq!(
        bad(RunReportRequest {
            start_date: "2020-01-01".into(),
            end_date: "2026-01-01".into(),
            ..funnel_request.clone()
        })
        .await,
        ["end_date"]
    );
    assert_eq!(
        bad(RunReportRequest {
            start_date: "2026-02-01".into(),
            end_date: "2026-01-01".into(),
            ..funnel_request.clone()
        })
        .await,
        ["end_date"]
    );
    assert_eq!(
        bad(RunReportRequest { time_zone: "Mars/Olympus".into(), ..funnel_request.clone() }).await,
        ["time_zone"]
    );
    assert_eq!(
        bad(RunReportRequest { currency_code: "eur".into(), ..funnel_request.clone() }).await,
        ["currency_code"]
    );
    assert_eq!(bad(RunReportRequest { owner_ids: vec!["x".into()], ..funnel_request.clone() }).await, ["owner_ids[0]"]);
    assert_eq!(bad(RunReportRequest { pipeline_id: ANNA.into(), ..funnel_request.clone() }).await, ["pipeline_id"]);
    assert_eq!(bad(RunReportRequest { department_id: ANNA.into(), ..funnel_request.clone() }).await, ["department_id"]);
}

/// D5: versioned quotes priced on the server (tax, line discounts, one currency), sent and
/// accepted into the deal; contracts with a payment plan, payments paying instalments in due
/// order, balances per contract, customer and owner, reminders as jobs that fire once for what
/// is unpaid; bad input as field violations with nothing half-written.
async fn quotes_contracts_and_payments(env: Env) {
    let widget = env
        .api
        .create_product(as_user(
            ADMIN,
            CreateProductRequest {
                product: Some(Product {
                    name: "Widget".into(),
                    prices: vec![money("EUR", 1_999).unwrap()],
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let line = |quantity: i64, discount_bps: i32| LineItem {
        product_id: widget.id.clone(),
        quantity,
        discount_bps,
        ..Default::default()
    };
    let deal = Deal {
        title: "Widgets".into(),
        company_id: ACME.into(),
        amount: money("EUR", 0),
        line_items: vec![line(10, 0)],
        ..Default::default()
    };
    let deal = create_deal(&env, ALICE, deal).await.unwrap();
    assert_eq!(deal.amount, money("EUR", 19_990));
    let create = |user: &str, quote: Quote| {
        env.api.create_quote(as_user(user, CreateQuoteRequest { quote: Some(quote), request_id: String::new() }))
    };
    // The first version takes the deal's lines; the tax is on the subtotal, rounded half up.
    let q1 = create(ALICE, Quote { deal_id: deal.id.clone(), tax_rate_bps: 1_950, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((q1.version, q1.state), (1, QuoteState::Draft as i32));
    assert_eq!(
        (q1.subtotal.clone(), q1.tax.clone(), q1.total.clone()),
        (money("EUR", 19_990), money("EUR", 3_898), money("EUR", 23_888))
    );
    // Bad input, each a field violation: a negative quantity, another currency, an unknown
    // product, an overflow, no tax above 100%.
    let bad = |lines: Vec<LineItem>, tax: i32| Quote {
        deal_id: deal.id.clone(),
        line_items: lines,
        tax_rate_bps: tax,
        ..Default::default()
    };
    let usd_line = LineItem { name: "Setup".into(), quantity: 1, unit_price: money("USD", 100), ..Default::default() };
    let unknown = LineItem { product_id: ANNA.into(), quantity: 1, ..Default::default() };
    let huge = LineItem {
        name: "Everything".into(),
        quantity: 1_000_000_000,
        unit_price: money("EUR", 1_000_000_000),
        ..Default::default()
    };
    let refused = create(ALICE, bad(vec![line(-1, 0), usd_line, unknown, huge], 10_001)).await.unwrap_err();
    assert_eq!(
        violations(&refused),
        [
            "quote.tax_rate_bps",
            "quote.line_items[0].quantity",
            "quote.line_items[1].unit_price.currency_code",
            "quote.line_items[2].product_id",
            "quote.line_items[3].quantity",
        ]
    );
    assert_eq!(
        violations(
            &create(ALICE, Quote { deal_id: deal.id.clone(), currency_code: "eur".into(), ..Default::default() })
                .await
                .unwrap_err()
        ),
        ["quote.currency_code"]
    );
    // Carol cannot see the deal, so neither quote it nor read its quotes.
    assert_eq!(
        create(CAROL, Quote { deal_id: deal.id.clone(), ..Default::default() }).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        env.api.get_quote(as_user(CAROL, GetQuoteRequest { id: q1.id.clone() })).await.unwrap_err().code(),
        Code::NotFound
    );
    // A second version with a discount; drafts change, sent ones do not.
    let q2 = create(ALICE, Quote { deal_id: deal.id.clone(), line_items: vec![line(20, 1_000)], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((q2.version, q2.total.clone()), (2, money("EUR", 35_982)));
    let notes = |etag: &str| UpdateQuoteRequest {
        quote: Some(Quote {
            id: q2.id.clone(),
            notes: "Valid for a month".into(),
            etag: etag.into(),
            ..Default::default()
        }),
        update_mask: mask(&["notes"]),
    };
    let noted = env.api.update_quote(as_user(ALICE, notes(&q2.etag))).await.unwrap().into_inner();
    assert_eq!((noted.notes.as_str(), noted.total.clone()), ("Valid for a month", money("EUR", 35_982)));
    assert_eq!(env.api.update_quote(as_user(ALICE, notes(&q2.etag))).await.unwrap_err().code(), Code::Aborted);
    let state = |id: &str, state: QuoteState, apply: bool| {
        env.api.set_quote_state(as_user(
            ALICE,
            SetQuoteStateRequest { id: id.into(), state: state as i32, apply_to_deal: apply, etag: String::new() },
        ))
    };
    assert_eq!(
        state(&q2.id, QuoteState::Accepted, false).await.unwrap_err().code(),
        Code::FailedPrecondition,
        "a draft is sent first"
    );
    state(&q2.id, QuoteState::Sent, false).await.unwrap();
    assert_eq!(env.api.update_quote(as_user(ALICE, notes(""))).await.unwrap_err().code(), Code::FailedPrecondition);
    // Accepted into the deal: its lines and amount become the quote's, in one transaction.
    let accepted = state(&q2.id, QuoteState::Accepted, true).await.unwrap().into_inner();
    assert_eq!(accepted.state, QuoteState::Accepted as i32);
    let priced = env.api.get_deal(as_user(ALICE, GetDealRequest { id: deal.id.clone() })).await.unwrap().into_inner();
    assert_eq!((priced.amount.clone(), priced.line_items.len()), (money("EUR", 35_982), 1));
    let listed = env
        .api
        .list_quotes(as_user(HEAD, ListQuotesRequest { deal_id: deal.id.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.quotes.iter().map(|q| q.version).collect::<Vec<_>>(), [2, 1], "newest version first");

    // A contract: its plan adds up to at most its value; payments pay the instalments in order.
    let day =
        |offset: i64| (chrono::Utc::now().date_naive() + chrono::Duration::days(offset)).format("%Y-%m-%d").to_string();
    let instalment = |due: String, amount: i64| Instalment { due_date: due, amount: money("EUR", amount), paid: None };
    let contract = Contract {
        deal_id: deal.id.clone(),
        number: "2026-041".into(),
        signed_date: day(-40),
        value: money("", 30_000),
        instalments: vec![instalment(day(-10), 10_000), instalment(day(10), 10_000), instalment(day(40), 10_000)],
        ..Default::default()
    };
    let new_contract = |user: &str, c: Contract| {
        env.api.create_contract(as_user(user, CreateContractRequest { contract: Some(c), request_id: String::new() }))
    };
    let over =
        Contract { instalments: vec![instalment(day(1), 20_000), instalment(day(0), 20_000)], ..contract.clone() };
    assert_eq!(
        violations(&new_contract(ALICE, over).await.unwrap_err()),
        ["contract.instalments[1].due_date", "contract.instalments"]
    );
    let c = new_contract(ALICE, contract.clone()).await.unwrap().into_inner();
    assert_eq!((c.owner_id.as_str(), c.company_id.as_str(), c.reminder_days), (ALICE, ACME, Some(3)));
    assert_eq!((c.outstanding.clone(), c.overdue.clone()), (money("EUR", 30_000), money("EUR", 10_000)));
    assert_eq!(
        violations(
            &new_contract(ALICE, Contract { number: " 2026-041 ".into(), ..contract.clone() }).await.unwrap_err()
        ),
        ["contract.number"]
    );
    // Reminders: one job per instalment still ahead (the past one has none).
    let jobs = |kind: &str| {
        let mut sql = crm_kit::db::Sql::new("SELECT job_key FROM jobs WHERE kind = ");
        sql.bind(kind.to_string()).push(" ORDER BY job_key");
        sql.query().fetch_all(env.store.db().pool())
    };
    let keys: Vec<String> = jobs(crm_deals::store::contracts::INSTALMENT_REMINDER_JOB)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get(r, "job_key"))
        .collect();
    assert_eq!(keys, [format!("{}/2", c.id), format!("{}/3", c.id)]);

    let pay = |amount: i64, request_id: &str| {
        env.api.record_payment(as_user(
            ALICE,
            RecordPaymentRequest {
                payment: Some(Payment {
                    contract_id: c.id.clone(),
                    amount: money("EUR", amount),
                    ..Default::default()
                }),
                request_id: request_id.into(),
            },
        ))
    };
    assert_eq!(violations(&pay(0, "").await.unwrap_err()), ["payment.amount.minor_units"]);
    assert_eq!(
        violations(&pay(30_001, "").await.unwrap_err()),
        ["payment.amount.minor_units"],
        "more than is outstanding"
    );
    let paid = pay(12_500, "first").await.unwrap().into_inner();
    let again = pay(12_500, "first").await.unwrap().into_inner();
    assert_eq!(again.received, money("EUR", 12_500), "a retried payment is recorded once");
    assert_eq!(
        paid.instalments.iter().map(|i| i.paid.clone()).collect::<Vec<_>>(),
        [money("EUR", 10_000), money("EUR", 2_500), money("EUR", 0)]
    );
    assert_eq!((paid.outstanding.clone(), paid.overdue.clone()), (money("EUR", 17_500), money("EUR", 0)));
    let payments = env
        .api
        .list_payments(as_user(ALICE, ListPaymentsRequest { contract_id: c.id.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(payments.payments.len(), 1);
    assert_eq!(payments.payments[0].amount, money("EUR", 12_500));

    // The second instalment paid in full too; the reminders come due (moved to now) and the real
    // runner fires them: the paid instalment's says nothing, the third's names what is unpaid.
    let paid = pay(7_500, "second").await.unwrap().into_inner();
    assert_eq!((paid.outstanding.clone(), paid.overdue.clone()), (money("EUR", 10_000), money("EUR", 0)));
    let mut sql = crm_kit::db::Sql::new("UPDATE jobs SET due_at = 1 WHERE kind = ");
    sql.bind(crm_deals::store::contracts::INSTALMENT_REMINDER_JOB);
    sql.query().execute(env.store.db().pool()).await.unwrap();
    let runner = crm_kit::jobs::Runner::new(env.store.db().clone(), crm_kit::jobs::RunnerSettings::default()).handle(
        crm_deals::store::contracts::INSTALMENT_REMINDER_JOB,
        Arc::new(crm_deals::jobs::InstalmentReminderJob::new(env.store.clone())),
    );
    let (_trigger, shutdown) = crm_kit::shutdown::channel();
    assert_eq!(runner.run_due(&shutdown).await.unwrap(), 2);
    assert_eq!(runner.run_due(&shutdown).await.unwrap(), 0, "each fires once");
    let rows =
        crm_kit::db::Sql::new("SELECT envelope FROM outbox").query().fetch_all(env.store.db().pool()).await.unwrap();
    let due: Vec<crm_proto::deals::v1::InstalmentDue> = rows
        .iter()
        .map(|r| {
            let bytes: Vec<u8> = sqlx::Row::try_get(r, "envelope").unwrap();
            <crm_proto::events::v1::Envelope as prost::Message>::decode(bytes.as_slice()).unwrap()
        })
        .filter_map(|e| crm_kit::events::envelope::payload::<crm_proto::deals::v1::InstalmentDue>(&e))
        .map(|p| p.unwrap())
        .collect();
    assert_eq!(due.len(), 1, "only the instalment not yet paid");
    assert_eq!(
        (due[0].due_date.clone(), due[0].amount_due.clone(), due[0].amount_due_text.as_str(), due[0].owner_id.as_str()),
        (day(40), money("EUR", 10_000), "100.00 EUR", ALICE)
    );

    // Balances: Bob's contract is overdue in full; per owner, per customer, per contract.
    let bobs = create_deal(&env, BOB, Deal { title: "Gadgets".into(), person_id: ANNA.into(), ..Default::default() })
        .await
        .unwrap();
    let b = new_contract(
        BOB,
        Contract {
            deal_id: bobs.id.clone(),
            number: "2026-042".into(),
            signed_date: day(-5),
            value: money("EUR", 5_000),
            instalments: vec![instalment(day(-1), 5_000)],
            reminder_days: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(b.overdue, money("EUR", 5_000));
    let balances = |user: &str, group_by: BalanceGrouping| {
        env.api.get_balances(as_user(user, GetBalancesRequest { group_by: group_by as i32, ..Default::default() }))
    };
    let by_owner = balances(HEAD, BalanceGrouping::Owner).await.unwrap().into_inner().balances;
    let owed: Vec<(String, Option<Money>, Option<Money>)> =
        by_owner.into_iter().map(|b| (b.key, b.outstanding, b.overdue)).collect();
    assert_eq!(
        owed,
        [
            (BOB.to_string(), money("EUR", 5_000), money("EUR", 5_000)),
            (ALICE.to_string(), money("EUR", 10_000), money("EUR", 0))
        ]
    );
    let by_customer = balances(ADMIN, BalanceGrouping::Customer).await.unwrap().into_inner().balances;
    assert_eq!(by_customer.iter().map(|b| b.key.as_str()).collect::<Vec<_>>(), [ANNA, ACME]);
    let mine = balances(ALICE, BalanceGrouping::Contract).await.unwrap().into_inner().balances;
    assert_eq!(mine.iter().map(|b| b.label.as_str()).collect::<Vec<_>>(), ["2026-041"], "Alice sees her own");
    let later = env
        .api
        .get_balances(as_user(
            ALICE,
            GetBalancesRequest { group_by: BalanceGrouping::Contract as i32, as_of: day(41), filter: String::new() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(later.balances[0].overdue, money("EUR", 10_000), "by then the third instalment is due too");
    // The plan changes: the reminders follow; the value cannot drop below what was received.
    let update = |c: Contract, paths: &[&str]| {
        env.api.update_contract(as_user(ALICE, UpdateContractRequest { contract: Some(c), update_mask: mask(paths) }))
    };
    assert_eq!(
        violations(
            &update(Contract { id: c.id.clone(), value: money("EUR", 15_000), ..Default::default() }, &["value"])
                .await
                .unwrap_err()
        ),
        ["contract.instalments", "contract.value.minor_units"]
    );
    update(Contract { id: c.id.clone(), reminder_days: Some(0), ..Default::default() }, &["reminder_days"])
        .await
        .unwrap();
    assert!(
        jobs(crm_deals::store::contracts::INSTALMENT_REMINDER_JOB).await.unwrap().is_empty(),
        "no reminders any more"
    );
    assert_eq!(
        env.api.get_contract(as_user(CAROL, GetContractRequest { id: c.id.clone() })).await.unwrap_err().code(),
        Code::NotFound
    );
}

/// D7: targets per user and per department, month or quarter, of won value or of payments
/// received; attainment from the database; seen by the user, by those whose scope covers them,
/// and (a department's) by its people; set by those who may.
async fn targets_measure_attainment(env: Env) {
    let sales = sales(&env).await;
    let won = stage_id(&sales, "Order received");
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let quarter = {
        use chrono::Datelike;
        let now = chrono::Utc::now();
        format!("{}-Q{}", now.year(), now.month0() / 3 + 1)
    };
    for (title, owner, amount) in [("A1", ALICE, 6_000), ("A2", ALICE, 1_500), ("B1", BOB, 9_000)] {
        let deal =
            create_deal(&env, owner, Deal { title: title.into(), amount: money("EUR", amount), ..Default::default() })
                .await
                .unwrap();
        move_deal(&env, owner, &deal.id, &won, "").await.unwrap();
    }
    let set = |user: &str, target: Target| env.api.set_target(as_user(user, SetTargetRequest { target: Some(target) }));
    let goal = |user_id: &str, department_id: &str, period: &str, metric: TargetMetric, amount: i64| Target {
        user_id: user_id.into(),
        department_id: department_id.into(),
        period: period.into(),
        metric: metric as i32,
        amount: money("EUR", amount),
        ..Default::default()
    };
    // The head sets Alice's month: 7,500 of 10,000 won.
    let alices = set(HEAD, goal(ALICE, "", &month, TargetMetric::WonValue, 10_000)).await.unwrap().into_inner();
    assert_eq!((alices.achieved.clone(), alices.attainment_bps), (money("EUR", 7_500), 7_500));
    // Setting it again replaces the goal.
    let raised = set(HEAD, goal(ALICE, "", &month, TargetMetric::WonValue, 5_000)).await.unwrap().into_inner();
    assert_eq!((raised.id.clone(), raised.attainment_bps), (alices.id.clone(), 15_000));
    // Alice may not set Bob's (outside her scope); a department's needs deals.admin.
    assert_eq!(
        set(ALICE, goal(BOB, "", &month, TargetMetric::WonValue, 1)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        set(HEAD, goal("", TEAM, &quarter, TargetMetric::WonValue, 1)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let team = set(ADMIN, goal("", TEAM, &quarter, TargetMetric::WonValue, 30_000)).await.unwrap().into_inner();
    assert_eq!((team.achieved.clone(), team.attainment_bps), (money("EUR", 7_500), 2_500), "the team is Alice");
    // Payments received: a contract on Alice's deal, half paid.
    let deal =
        create_deal(&env, ALICE, Deal { title: "Paid".into(), amount: money("EUR", 4_000), ..Default::default() })
            .await
            .unwrap();
    let contract = Contract {
        deal_id: deal.id.clone(),
        number: "T-1".into(),
        signed_date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        value: money("EUR", 4_000),
        ..Default::default()
    };
    let contract = env
        .api
        .create_contract(as_user(ALICE, CreateContractRequest { contract: Some(contract), request_id: String::new() }))
        .await
        .unwrap()
        .into_inner();
    let payment = Payment { contract_id: contract.id.clone(), amount: money("EUR", 2_000), ..Default::default() };
    env.api
        .record_payment(as_user(ALICE, RecordPaymentRequest { payment: Some(payment), request_id: String::new() }))
        .await
        .unwrap();
    let cash = set(HEAD, goal(ALICE, "", &month, TargetMetric::PaymentsReceived, 8_000)).await.unwrap().into_inner();
    assert_eq!((cash.achieved.clone(), cash.attainment_bps), (money("EUR", 2_000), 2_500));
    // Who sees what.
    let list = |user: &str| env.api.list_targets(as_user(user, ListTargetsRequest::default()));
    let ids = |targets: Vec<Target>| targets.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let mut everything = vec![alices.id.clone(), cash.id.clone(), team.id.clone()];
    everything.sort();
    let mut seen = ids(list(ALICE).await.unwrap().into_inner().targets);
    seen.sort();
    assert_eq!(seen, everything, "Alice sees hers and her department's");
    let mut seen = ids(list(HEAD).await.unwrap().into_inner().targets);
    seen.sort();
    assert_eq!(seen, everything, "the head sees Alice's and the team's (all its people are in scope)");
    assert!(list(BOB).await.unwrap().into_inner().targets.is_empty(), "Bob sees none of them");
    // A department with nobody in it yet: only who sees everyone sees its target.
    let empty = set(ADMIN, goal("", NEW_TEAM, &quarter, TargetMetric::WonValue, 1_000)).await.unwrap().into_inner();
    assert!(!ids(list(ALICE).await.unwrap().into_inner().targets).contains(&empty.id));
    assert!(ids(list(ADMIN).await.unwrap().into_inner().targets).contains(&empty.id));
    env.api.delete_target(as_user(ADMIN, DeleteTargetRequest { id: empty.id.clone() })).await.unwrap();
    assert!(list(CAROL).await.unwrap().into_inner().targets.is_empty());
    let only_team = env
        .api
        .list_targets(as_user(ADMIN, ListTargetsRequest { department_id: TEAM.into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(only_team.targets), std::slice::from_ref(&team.id));
    // Bad input.
    let bad = |t: Target| async { violations(&set(ADMIN, t).await.unwrap_err()) };
    assert_eq!(bad(goal(ALICE, TEAM, &month, TargetMetric::WonValue, 1)).await, ["target.user_id"]);
    assert_eq!(bad(goal(ALICE, "", "2026-13", TargetMetric::WonValue, 1)).await, ["target.period"]);
    assert_eq!(
        bad(goal(ALICE, "", "2026-Q5", TargetMetric::Unspecified, 0)).await,
        ["target.period", "target.metric", "target.amount.minor_units"]
    );
    assert_eq!(bad(goal("", ANNA, &month, TargetMetric::WonValue, 1)).await, ["target.department_id"]);
    // Deleting: Bob may not (he does not see it), the head may.
    let delete = |user: &str, id: &str| env.api.delete_target(as_user(user, DeleteTargetRequest { id: id.into() }));
    assert_eq!(delete(BOB, &alices.id).await.unwrap_err().code(), Code::NotFound);
    delete(HEAD, &alices.id).await.unwrap();
    assert_eq!(list(ALICE).await.unwrap().into_inner().targets.len(), 2);
}

/// A department's pipeline holds its people's deals: a deal there must be owned by one of them.
async fn department_pipelines_hold_their_peoples_deals(env: Env) {
    let pipeline = Pipeline {
        name: "Team".into(),
        department_id: TEAM.into(),
        stages: vec![
            stage("Open", 20, StageKind::Open),
            stage("Won", 0, StageKind::Won),
            stage("Lost", 0, StageKind::Lost),
        ],
        ..Default::default()
    };
    let team = env
        .api
        .create_pipeline(as_user(ADMIN, CreatePipelineRequest { pipeline: Some(pipeline) }))
        .await
        .unwrap()
        .into_inner();
    let deal = |owner: &str| Deal {
        title: "Team deal".into(),
        pipeline_id: team.id.clone(),
        owner_id: owner.into(),
        ..Default::default()
    };
    let alices = create_deal(&env, ALICE, deal(ALICE)).await.unwrap();
    assert_eq!(alices.pipeline_id, team.id);
    assert_eq!(
        violations(&create_deal(&env, HEAD, deal(BOB)).await.unwrap_err()),
        ["deal.owner_id"],
        "Bob is not in the team"
    );
    let hand_over = UpdateDealRequest {
        deal: Some(Deal { id: alices.id.clone(), owner_id: BOB.into(), ..Default::default() }),
        update_mask: mask(&["owner_id"]),
    };
    assert_eq!(violations(&env.api.update_deal(as_user(HEAD, hand_over)).await.unwrap_err()), ["deal.owner_id"]);
    // The shared pipeline takes anyone's.
    create_deal(&env, HEAD, Deal { title: "Shared".into(), owner_id: BOB.into(), ..Default::default() }).await.unwrap();
    let listed = env
        .api
        .list_pipelines(as_user(ALICE, ListPipelinesRequest { department_id: TEAM.into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.pipelines.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["Sales", "Team"]);
}

crm_kit::both_backends!(env =>
    pipelines_are_data,
    products_form_a_catalogue,
    deals_keep_money_probability_and_history,
    boards_total_every_matching_deal,
    stages_require_fields_and_deals_rot,
    wins_are_published,
    automations_travel_with_the_entry,
    reports_add_up_what_the_caller_may_see,
    quotes_contracts_and_payments,
    targets_measure_attainment,
    department_pipelines_hold_their_peoples_deals,
);
