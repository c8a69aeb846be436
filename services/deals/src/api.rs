//! The gRPC surface: decode and validate each request, apply the domain rules, call the store,
//! map the result back. Errors become statuses in `crm_kit::error`.

use std::sync::Arc;

use crm_kit::auth::{OwnerScope, Principal, ScopeCache, UserDirectory};
use crm_kit::customers::Customers;
use crm_kit::db::idempotency::MAX_REQUEST_ID_CHARS;
use crm_kit::page::Page;
use crm_kit::{ApiError, Violations, respond};
use crm_proto::contacts::v1::{CustomerKey, RecordType};
use crm_proto::deals::v1::deals_service_server::DealsService;
use crm_proto::deals::v1::*;
use crm_proto::google::api::HttpBody;
use tonic::{Request, Response, Status};

use crate::domain;
use crate::permissions::{ADMIN, READ, WRITE};
use crate::reports;
use crate::store::Store;
use crate::store::deals::{self, DealQuery};
use crate::store::products::{self, ProductQuery};
use crate::store::reports::{ClosedBy, Coverage};

mod paperwork;
mod targets;

const PIPELINE_MASK: crm_kit::mask::Mask<Pipeline> = crm_kit::mask!(Pipeline { name, department_id });
const STAGE_MASK: crm_kit::mask::Mask<Stage> =
    crm_kit::mask!(Stage { name, probability, kind, rotting_days, required_fields, automations });
const PRODUCT_MASK: crm_kit::mask::Mask<Product> = crm_kit::mask!(Product { name, sku, description, prices, active });

/// Longest product search.
pub const MAX_QUERY: usize = 100;

/// The fields UpdateDeal may replace.
const DEAL_MASK: crm_kit::mask::Mask<Deal> = crm_kit::mask!(Deal {
    title,
    company_id,
    person_id,
    owner_id,
    amount,
    expected_close_date,
    probability,
    line_items,
    notes
});

/// Every call runs as the signed-in caller: reading needs `deals.read`, changing deals
/// `deals.write`, changing pipelines and products `deals.admin`; deals are seen through the
/// caller's data scope (their owners).
#[derive(Clone)]
pub struct DealsApi {
    store: Store,
    scopes: ScopeCache,
    users: Arc<dyn UserDirectory>,
    customers: Arc<dyn Customers>,
}

impl std::fmt::Debug for DealsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DealsApi").finish_non_exhaustive()
    }
}

/// A caller of a deal call, and the owners they may see.
struct Caller {
    principal: Principal,
    scope: OwnerScope,
}

impl DealsApi {
    /// `users` checks owners; `customers` checks and names a deal's company and person.
    pub fn new(
        store: Store,
        scopes: ScopeCache,
        users: Arc<dyn UserDirectory>,
        customers: Arc<dyn Customers>,
    ) -> DealsApi {
        DealsApi { store, scopes, users, customers }
    }

    async fn deal_caller<T>(&self, request: &Request<T>, permission: &str) -> Result<Caller, ApiError> {
        let principal = Self::caller(request, permission)?;
        let scope = self.scopes.resolve(&principal).await?;
        Ok(Caller { principal, scope })
    }

    /// An owner the caller may give a deal to: in their scope, and active.
    async fn check_owner(&self, caller: &Caller, owner_id: &str) -> Result<(), ApiError> {
        crm_kit::auth::check_owner(&*self.users, &caller.principal, &caller.scope, "deal.owner_id", owner_id, "deals")
            .await
    }

    /// A pipeline of a department is for its people's deals: INVALID_ARGUMENT on
    /// `deal.owner_id` when the pipeline `pipeline_id` belongs to a department (or one above
    /// theirs) that `owner_id` is not in.
    async fn check_pipeline_owner(&self, pipeline_id: &str, owner_id: &str) -> Result<(), ApiError> {
        let pipeline = self.store.get_pipeline(pipeline_id).await?;
        if pipeline.department_id.is_empty() {
            return Ok(());
        }
        let members = self.users.department_members(&pipeline.department_id).await?;
        if members.iter().any(|m| m == owner_id) {
            return Ok(());
        }
        Err(ApiError::invalid(
            "deal.owner_id",
            format!("is not in the department the pipeline {:?} belongs to", pipeline.name),
        ))
    }

    /// Checks a deal's company and person with contacts (one call, as the caller); the source
    /// they came from (the person's, else the company's).
    async fn check_customers(&self, caller: &Caller, company_id: &str, person_id: &str) -> Result<String, ApiError> {
        let mut keys = Vec::new();
        if !company_id.is_empty() {
            keys.push(CustomerKey { record_type: RecordType::Company as i32, id: company_id.to_string() });
        }
        if !person_id.is_empty() {
            keys.push(CustomerKey { record_type: RecordType::Person as i32, id: person_id.to_string() });
        }
        if keys.is_empty() {
            return Ok(String::new());
        }
        let found = self.customers.find(&caller.principal, keys).await?;
        let of = |kind: RecordType, id: &str| found.iter().find(|c| c.record_type == kind as i32 && c.id == id);
        let mut v = Violations::new();
        let company = (!company_id.is_empty()).then(|| of(RecordType::Company, company_id));
        let person = (!person_id.is_empty()).then(|| of(RecordType::Person, person_id));
        if matches!(company, Some(None)) {
            v.add("deal.company_id", "no company with this id that you may see");
        }
        if matches!(person, Some(None)) {
            v.add("deal.person_id", "no person with this id that you may see");
        }
        v.check()?;
        let source = |c: Option<Option<&crm_proto::contacts::v1::CustomerSummary>>| {
            c.flatten().map(|c| c.source.clone()).unwrap_or_default()
        };
        let person_source = source(person);
        Ok(if person_source.is_empty() { source(company) } else { person_source })
    }

    /// The products `lines` (the field `field`) name: each id a UUID, and each product active
    /// unless it is among `known` (those already on the record, which may since have become
    /// inactive).
    async fn products_for(
        &self,
        lines: &[LineItem],
        field: &str,
        known: &[String],
        v: &mut Violations,
    ) -> Result<std::collections::HashMap<String, Product>, ApiError> {
        let ids: Vec<&str> = lines.iter().map(|l| l.product_id.trim()).filter(|id| !id.is_empty()).collect();
        for (i, line) in lines.iter().enumerate() {
            let id = line.product_id.trim();
            if !id.is_empty() && uuid::Uuid::parse_str(id).is_err() {
                v.add(format!("{field}[{i}].product_id"), "must be a UUID");
            }
        }
        let valid: Vec<&str> = ids.into_iter().filter(|id| uuid::Uuid::parse_str(id).is_ok()).collect();
        let products = self.store.products_by_id(&valid).await?;
        for (i, line) in lines.iter().enumerate() {
            let id = line.product_id.trim();
            if let Some(product) = products.get(id)
                && !product.active
                && !known.iter().any(|k| k == id)
            {
                v.add(format!("{field}[{i}].product_id"), "is an inactive product");
            }
        }
        Ok(products)
    }

    /// Prices `deal` from its lines; `known` are the products already on it (which may since
    /// have become inactive), others must be active.
    async fn price(&self, deal: &mut Deal, known: &[String], v: &mut Violations) -> Result<(), ApiError> {
        let products = self.products_for(&deal.line_items, "deal.line_items", known, v).await?;
        domain::price(deal, &products, v);
        Ok(())
    }

    async fn create_deal(&self, caller: Caller, r: CreateDealRequest) -> Result<Deal, ApiError> {
        let mut deal = r.deal.ok_or_else(|| ApiError::invalid("deal", "is required"))?;
        let mut v = Violations::new();
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        domain::normalize_deal(&mut deal, &mut v);
        deal.stage_id = deal.stage_id.trim().to_string();
        deal.pipeline_id = deal.pipeline_id.trim().to_string();
        v.optional_uuid("deal.stage_id", &deal.stage_id);
        v.optional_uuid("deal.pipeline_id", &deal.pipeline_id);
        self.price(&mut deal, &[], &mut v).await?;
        v.check()?;
        let target = if deal.stage_id.is_empty() {
            self.store.first_stage(&deal.pipeline_id).await?.ok_or_else(|| {
                ApiError::invalid("deal.pipeline_id", "no pipeline has this id (or there is no pipeline)")
            })?
        } else {
            let target = self.store.target(&deal.stage_id).await?;
            let target = target.ok_or_else(|| ApiError::invalid("deal.stage_id", "no stage has this id"))?;
            if !deal.pipeline_id.is_empty() && deal.pipeline_id != target.pipeline_id {
                return Err(ApiError::invalid("deal.stage_id", "is not a stage of deal.pipeline_id"));
            }
            target
        };
        if target.stage.kind == StageKind::Lost as i32 && deal.lost_reason.is_empty() {
            return Err(ApiError::invalid("deal.lost_reason", "is required to enter a lost stage"));
        }
        let missing = domain::missing_fields(&deal, &target.stage);
        if !missing.is_empty() {
            let mut v = Violations::new();
            for field in missing {
                v.add(field, format!("is required to enter the stage {:?}", target.stage.name));
            }
            let message = format!("the deal cannot start in {:?}", target.stage.name);
            return Err(ApiError::Unmet { message, violations: v });
        }
        if deal.owner_id.is_empty() {
            deal.owner_id = caller.principal.subject.clone();
        }
        self.check_owner(&caller, &deal.owner_id).await?;
        self.check_pipeline_owner(&target.pipeline_id, &deal.owner_id).await?;
        deal.source = self.check_customers(&caller, &deal.company_id, &deal.person_id).await?;
        let me = caller.principal.subject.clone();
        self.store.create_deal(deal, &target, &me, r.request_id.trim(), &caller.scope).await
    }

    async fn update_deal(&self, caller: Caller, r: UpdateDealRequest) -> Result<Deal, ApiError> {
        let patch = r.deal.ok_or_else(|| ApiError::invalid("deal", "is required"))?;
        check_id("deal.id", &patch.id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        let mut probe = Deal::default();
        DEAL_MASK.apply(&mut probe, &patch, &paths, &mut v);
        v.check()?;
        let touches = |field: &str| paths.iter().any(|p| p == field || p == "*");
        let current = self.store.get_deal(&patch.id, &caller.scope).await?;
        // What only other services know is checked before the row is locked.
        let mut v = Violations::new();
        let mut next = current.clone();
        DEAL_MASK.apply(&mut next, &patch, &paths, &mut v);
        domain::normalize_deal(&mut next, &mut v);
        let known: Vec<String> = current.line_items.iter().map(|l| l.product_id.clone()).collect();
        if touches("line_items") || touches("amount") {
            if !touches("amount") && !next.line_items.is_empty() {
                // Lines keep the deal's currency unless a new amount names another.
                next.amount = current.amount.clone().map(|m| crm_proto::deals::v1::Money { minor_units: 0, ..m });
            }
            self.price(&mut next, &known, &mut v).await?;
        }
        v.check()?;
        if touches("owner_id") && next.owner_id != current.owner_id {
            if next.owner_id.is_empty() {
                return Err(ApiError::invalid("deal.owner_id", "is required: a deal always has an owner"));
            }
            self.check_owner(&caller, &next.owner_id).await?;
            self.check_pipeline_owner(&current.pipeline_id, &next.owner_id).await?;
        }
        if (touches("company_id") || touches("person_id"))
            && (next.company_id != current.company_id || next.person_id != current.person_id)
        {
            self.check_customers(&caller, &next.company_id, &next.person_id).await?;
        }
        let me = caller.principal.subject.clone();
        self.store
            .edit_deal(&patch.id, &patch.etag, &me, &caller.scope, None, |deal| {
                // The mask applies to the deal as locked; money comes priced from above.
                let mut v = Violations::new();
                DEAL_MASK.apply(deal, &patch, &paths, &mut v);
                domain::normalize_deal(deal, &mut v);
                if touches("line_items") || touches("amount") {
                    deal.line_items = next.line_items;
                    deal.amount = next.amount;
                }
                if touches("probability") {
                    deal.probability_manual = patch.probability.is_some();
                    if !deal.probability_manual {
                        // Cleared: the store puts the stage's default back.
                        deal.probability = None;
                    }
                }
                v.check()
            })
            .await
    }

    async fn move_deal(&self, caller: Caller, r: MoveDealRequest) -> Result<Deal, ApiError> {
        let mut v = Violations::new();
        v.uuid("id", &r.id);
        v.uuid("stage_id", &r.stage_id);
        let reason = r.lost_reason.trim().to_string();
        v.max_chars("lost_reason", &reason, domain::MAX_REASON);
        v.check()?;
        let target = self.store.target(&r.stage_id).await?;
        let target = target.ok_or_else(|| ApiError::invalid("stage_id", "no stage has this id"))?;
        if target.stage.kind == StageKind::Lost as i32 && reason.is_empty() {
            return Err(ApiError::invalid("lost_reason", "is required to enter a lost stage"));
        }
        let me = caller.principal.subject.clone();
        self.store
            .edit_deal(&r.id, &r.etag, &me, &caller.scope, Some(&target), |deal| {
                if target.stage.kind == StageKind::Lost as i32 {
                    deal.lost_reason = reason;
                }
                Ok(())
            })
            .await
    }

    /// A report (D8) over the deals the caller may see, narrowed by the request's filters.
    async fn report(&self, caller: Caller, r: RunReportRequest) -> Result<Report, ApiError> {
        let mut v = Violations::new();
        let kind = ReportKind::try_from(r.kind).unwrap_or(ReportKind::Unspecified);
        if kind == ReportKind::Unspecified {
            v.add(
                "kind",
                "must be one of FUNNEL, WON_LOST, LOST_REASONS, LEADERBOARD, CONVERSION, WON_BY_SOURCE, FORECAST",
            );
        }
        let tz = crm_kit::time::zone(&r.time_zone);
        if tz.is_none() {
            v.add("time_zone", "must be an IANA time zone such as Europe/Berlin");
        }
        let tz = tz.unwrap_or(chrono_tz::Tz::UTC);
        let period = domain::report_period(
            &r.start_date,
            &r.end_date,
            crm_kit::time::today(tz),
            kind == ReportKind::Forecast,
            &mut v,
        );
        v.max_items("owner_ids", &r.owner_ids, MAX_REPORT_OWNERS);
        for (i, id) in r.owner_ids.iter().enumerate().take(MAX_REPORT_OWNERS) {
            v.uuid(&format!("owner_ids[{i}]"), id);
        }
        let department = r.department_id.trim();
        v.optional_uuid("department_id", department);
        let pipeline_id = r.pipeline_id.trim();
        v.optional_uuid("pipeline_id", pipeline_id);
        let currency = r.currency_code.trim();
        if !currency.is_empty() && !domain::is_currency(currency) {
            v.add("currency_code", "must be an ISO 4217 code of three capital letters, e.g. EUR");
        }
        v.check()?;
        let Some((start, end)) = period else { return Err(ApiError::Internal("a checked period is missing".into())) };
        let mut owners = caller.scope.clone();
        if !r.owner_ids.is_empty() {
            owners = narrow(owners, r.owner_ids.clone());
        }
        if !department.is_empty() {
            owners = narrow(owners, self.users.department_members(department).await?);
        }
        let pipeline = if kind == ReportKind::Funnel && pipeline_id.is_empty() {
            let first = self.store.first_stage("").await?;
            let first = first.ok_or_else(|| ApiError::FailedPrecondition("there is no pipeline".into()))?;
            Some(self.store.get_pipeline(&first.pipeline_id).await?)
        } else if pipeline_id.is_empty() {
            None
        } else {
            Some(self.store.get_pipeline(pipeline_id).await.map_err(|e| match e {
                ApiError::NotFound(_) => ApiError::invalid("pipeline_id", "no pipeline has this id"),
                other => other,
            })?)
        };
        let months = domain::months(start, end);
        let (from, to) = crm_kit::time::days_span(start, end, tz);
        let coverage = Coverage {
            owners,
            pipeline_id: pipeline.as_ref().map(|p| p.id.clone()).unwrap_or_default(),
            currency: currency.to_string(),
            from,
            to,
            month_starts: months.iter().skip(1).map(|m| crm_kit::time::day_start(*m, tz)).collect(),
            from_date: start.format("%Y-%m-%d").to_string(),
            to_date: end.format("%Y-%m-%d").to_string(),
        };
        let labels: Vec<String> = months.iter().map(|m| m.format("%Y-%m").to_string()).collect();
        let (tallies, table, what) = match kind {
            ReportKind::Funnel => {
                let tallies = self.store.funnel_tallies(&coverage).await?;
                let pipeline = pipeline.as_ref().expect("the funnel has a pipeline");
                let table = reports::funnel(pipeline, &tallies);
                (tallies, table, format!("Funnel of {}, deals created", pipeline.name))
            }
            ReportKind::WonLost => {
                let tallies = self.store.closed_tallies(&coverage, ClosedBy::Month).await?;
                let table = reports::won_lost(&labels, &tallies);
                (tallies, table, "Deals won and lost per month, closed".to_string())
            }
            ReportKind::LostReasons => {
                let tallies = self.store.closed_tallies(&coverage, ClosedBy::Reason).await?;
                let table = reports::lost_reasons(&tallies);
                (tallies, table, "Lost reasons, deals lost".to_string())
            }
            ReportKind::Leaderboard => {
                let tallies = self.store.closed_tallies(&coverage, ClosedBy::Owner).await?;
                let mut ids: Vec<String> = tallies.iter().map(|t| t.key.clone()).collect();
                ids.sort();
                ids.dedup();
                let names = self.users.names(&ids).await?;
                let table = reports::leaderboard(&tallies, &names);
                (tallies, table, "Leaderboard, deals closed".to_string())
            }
            ReportKind::Conversion => {
                let tallies = self.store.created_tallies(&coverage).await?;
                let table = reports::conversion(&labels, &tallies);
                (tallies, table, "Conversion by month of creation, deals created".to_string())
            }
            ReportKind::WonBySource => {
                let tallies = self.store.closed_tallies(&coverage, ClosedBy::Source).await?;
                let table = reports::won_by_source(&tallies);
                (tallies, table, "Won value by lead source, deals won".to_string())
            }
            ReportKind::Forecast | ReportKind::Unspecified => {
                let tallies = self.store.forecast_tallies(&coverage).await?;
                let table = reports::forecast(&labels, &tallies);
                (tallies, table, "Forecast of open deals, expected to close".to_string())
            }
        };
        let mut title = format!("{what} {} to {} ({})", coverage.from_date, coverage.to_date, tz.name());
        if let Some(p) = pipeline.as_ref().filter(|_| kind != ReportKind::Funnel) {
            title.push_str(&format!(", pipeline {}", p.name));
        }
        if !currency.is_empty() {
            title.push_str(&format!(", in {currency}"));
        }
        Ok(Report {
            kind: kind as i32,
            title,
            columns: table.columns,
            rows: table.rows,
            start_date: coverage.from_date,
            end_date: coverage.to_date,
            deal_count: tallies.iter().map(|t| t.count).sum(),
        })
    }

    async fn get_board(&self, caller: Caller, r: GetBoardRequest) -> Result<Board, ApiError> {
        check_id("pipeline_id", &r.pipeline_id)?;
        let cards = match r.cards_per_column {
            0 => 20,
            n if (1..=100).contains(&n) => n,
            _ => return Err(ApiError::invalid("cards_per_column", "must be 1 to 100")),
        };
        let filter = crm_kit::filter::parse(&r.filter, deals::FIELDS)?;
        if let Some(f) = &filter
            && f.pins().any(|(field, _)| *field == "pipeline_id" || *field == "stage_id")
        {
            return Err(ApiError::invalid("filter", "names the pipeline and stages itself; filter on the rest"));
        }
        let pipeline = self.store.get_pipeline(&r.pipeline_id).await?;
        let mut totals = self.store.board_totals(&pipeline.id, filter.as_ref(), &caller.scope).await?;
        let order = deals::order("create_time desc")?;
        let mut columns = Vec::with_capacity(pipeline.stages.len());
        for stage in &pipeline.stages {
            let next_filter = if r.filter.trim().is_empty() {
                format!("stage_id = \"{}\"", stage.id)
            } else {
                format!("stage_id = \"{}\" AND ({})", stage.id, r.filter.trim())
            };
            let page = deals_page(&next_filter, "create_time desc", false, cards, "", &order)?;
            let column_filter = crm_kit::filter::parse(&next_filter, deals::FIELDS)?;
            let (cards, next_page_token) = self
                .store
                .list_deals(&DealQuery { filter: column_filter, order, page, rotting_at: None }, &caller.scope)
                .await?;
            let (count, money) = totals.remove(&stage.id).unwrap_or_default();
            columns.push(BoardColumn {
                stage: Some(stage.clone()),
                count,
                totals: money,
                cards,
                next_filter,
                next_page_token,
            });
        }
        Ok(Board { pipeline: Some(pipeline), columns })
    }
}

impl DealsApi {
    fn caller<T>(request: &Request<T>, permission: &str) -> Result<Principal, ApiError> {
        let principal = crm_kit::auth::principal(request)?;
        principal.require(permission)?;
        Ok(principal)
    }
}

/// Most owners a report names.
pub const MAX_REPORT_OWNERS: usize = 500;

/// `scope` narrowed to `owners` (those outside it are left out, not refused: a report covers
/// what the caller may see).
fn narrow(scope: OwnerScope, mut owners: Vec<String>) -> OwnerScope {
    if let OwnerScope::Owners(visible) = &scope {
        owners.retain(|o| visible.contains(o));
    }
    owners.sort();
    owners.dedup();
    OwnerScope::Owners(owners.into())
}

fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    let mut v = Violations::new();
    v.uuid(field, id);
    v.check()
}

/// The stage `id` of `pipeline`, by index.
fn stage_index(pipeline: &Pipeline, id: &str) -> Result<usize, ApiError> {
    pipeline
        .stages
        .iter()
        .position(|s| s.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("stage {id} is not in pipeline {}", pipeline.id)))
}

/// A page of ListDeals: its token is bound to the filter, the order and the rotting flag (a
/// board column's continuation is made here too, so that ListDeals takes it).
fn deals_page(
    filter: &str,
    order_by: &str,
    rotting: bool,
    size: i32,
    token: &str,
    order: &crm_kit::page::Order,
) -> Result<Page, ApiError> {
    let rotting = if rotting { "rotting" } else { "" };
    Page::decode(&["deals", filter, order_by, rotting], size, token, order)
}

/// A violation of `stage.name` when another stage of `pipeline` has the name.
fn unique_name(pipeline: &Pipeline, stage: &Stage, v: &mut Violations) {
    let key = domain::key(&stage.name);
    if pipeline.stages.iter().any(|s| s.id != stage.id && domain::key(&s.name) == key) {
        v.add("stage.name", format!("{:?} is already a stage of this pipeline", stage.name));
    }
}

/// Index of 1-based `position` among `len` places; 0 or past the end is the end.
fn place(position: i32, len: usize) -> Result<usize, ApiError> {
    if position < 0 {
        return Err(ApiError::invalid("position", "must be 1 or more (0: last)"));
    }
    Ok(if position == 0 { len } else { (position as usize - 1).min(len) })
}

#[tonic::async_trait]
impl DealsService for DealsApi {
    async fn create_deal(&self, request: Request<CreateDealRequest>) -> Result<Response<Deal>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.create_deal(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn get_deal(&self, request: Request<GetDealRequest>) -> Result<Response<Deal>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            let id = request.into_inner().id;
            check_id("id", &id)?;
            self.store.get_deal(&id, &caller.scope).await
        };
        respond(result.await)
    }

    async fn update_deal(&self, request: Request<UpdateDealRequest>) -> Result<Response<Deal>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.update_deal(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn move_deal(&self, request: Request<MoveDealRequest>) -> Result<Response<Deal>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.move_deal(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn delete_deal(&self, request: Request<DeleteDealRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            let r = request.into_inner();
            check_id("id", &r.id)?;
            self.store.delete_deal(&r.id, &r.etag, &caller.principal.subject, &caller.scope).await
        };
        respond(result.await)
    }

    async fn list_deals(&self, request: Request<ListDealsRequest>) -> Result<Response<ListDealsResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            let r = request.into_inner();
            let filter = crm_kit::filter::parse(&r.filter, deals::FIELDS)?;
            let order = deals::order(&r.order_by)?;
            let page = deals_page(&r.filter, &r.order_by, r.rotting, r.page_size, &r.page_token, &order)?;
            let query = DealQuery { filter, order, page, rotting_at: r.rotting.then(crm_kit::time::now_micros) };
            let (deals, next_page_token) = self.store.list_deals(&query, &caller.scope).await?;
            Ok(ListDealsResponse { deals, next_page_token })
        };
        respond(result.await)
    }

    async fn list_stage_history(
        &self,
        request: Request<ListStageHistoryRequest>,
    ) -> Result<Response<ListStageHistoryResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            let r = request.into_inner();
            check_id("deal_id", &r.deal_id)?;
            let order = crm_kit::page::Order { column: "at", tie: "id", text: false, desc: false };
            let page = Page::decode(&["history", &r.deal_id], r.page_size, &r.page_token, &order)?;
            let (changes, next_page_token) = self.store.history(&r.deal_id, &page, &caller.scope).await?;
            Ok(ListStageHistoryResponse { changes, next_page_token })
        };
        respond(result.await)
    }

    async fn get_board(&self, request: Request<GetBoardRequest>) -> Result<Response<Board>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.get_board(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn run_report(&self, request: Request<RunReportRequest>) -> Result<Response<Report>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.report(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn export_report(&self, request: Request<RunReportRequest>) -> Result<Response<HttpBody>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            let report = self.report(caller, request.into_inner()).await?;
            let table = reports::Table { columns: report.columns, rows: report.rows };
            let data = reports::csv(&table).map_err(|e| ApiError::Internal(format!("write the report as CSV: {e}")))?;
            Ok(HttpBody { content_type: "text/csv; charset=utf-8".into(), data, extensions: Vec::new() })
        };
        respond(result.await)
    }

    async fn create_quote(&self, request: Request<CreateQuoteRequest>) -> Result<Response<Quote>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.create_quote(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn get_quote(&self, request: Request<GetQuoteRequest>) -> Result<Response<Quote>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            {
                let id = request.into_inner().id;
                check_id("id", &id)?;
                self.store.get_quote(&id, &caller.scope).await
            }
        };
        respond(result.await)
    }

    async fn update_quote(&self, request: Request<UpdateQuoteRequest>) -> Result<Response<Quote>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.update_quote(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn list_quotes(&self, request: Request<ListQuotesRequest>) -> Result<Response<ListQuotesResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.list_quotes(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn set_quote_state(&self, request: Request<SetQuoteStateRequest>) -> Result<Response<Quote>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.set_quote_state(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn create_contract(&self, request: Request<CreateContractRequest>) -> Result<Response<Contract>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.create_contract(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn get_contract(&self, request: Request<GetContractRequest>) -> Result<Response<Contract>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            {
                let id = request.into_inner().id;
                check_id("id", &id)?;
                self.store.get_contract(&id, &caller.scope).await
            }
        };
        respond(result.await)
    }

    async fn update_contract(&self, request: Request<UpdateContractRequest>) -> Result<Response<Contract>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.update_contract(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn list_contracts(
        &self,
        request: Request<ListContractsRequest>,
    ) -> Result<Response<ListContractsResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.list_contracts(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn record_payment(&self, request: Request<RecordPaymentRequest>) -> Result<Response<Contract>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.record_payment(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn list_payments(
        &self,
        request: Request<ListPaymentsRequest>,
    ) -> Result<Response<ListPaymentsResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.list_payments(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn get_balances(
        &self,
        request: Request<GetBalancesRequest>,
    ) -> Result<Response<GetBalancesResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.balances(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn set_target(&self, request: Request<SetTargetRequest>) -> Result<Response<Target>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.set_target(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn list_targets(
        &self,
        request: Request<ListTargetsRequest>,
    ) -> Result<Response<ListTargetsResponse>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, READ.name).await?;
            self.list_targets(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn delete_target(&self, request: Request<DeleteTargetRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let caller = self.deal_caller(&request, WRITE.name).await?;
            self.delete_target(caller, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn create_pipeline(&self, request: Request<CreatePipelineRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            Self::caller(&request, ADMIN.name)?;
            let mut pipeline =
                request.into_inner().pipeline.ok_or_else(|| ApiError::invalid("pipeline", "is required"))?;
            let mut v = Violations::new();
            domain::normalize_pipeline(&mut pipeline, &mut v);
            for (i, stage) in pipeline.stages.iter_mut().enumerate() {
                domain::normalize_stage(stage, &format!("pipeline.stages[{i}]"), &mut v);
            }
            domain::check_stages(&pipeline.stages, "pipeline.stages", &mut v);
            v.check()?;
            self.store.create_pipeline(pipeline).await
        };
        respond(result.await)
    }

    async fn get_pipeline(&self, request: Request<GetPipelineRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            Self::caller(&request, READ.name)?;
            let id = request.into_inner().id;
            check_id("id", &id)?;
            self.store.get_pipeline(&id).await
        };
        respond(result.await)
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let result = async {
            Self::caller(&request, READ.name)?;
            let department = request.into_inner().department_id.trim().to_string();
            let mut v = Violations::new();
            v.optional_uuid("department_id", &department);
            v.check()?;
            Ok(ListPipelinesResponse { pipelines: self.store.list_pipelines(&department).await? })
        };
        respond(result.await)
    }

    async fn update_pipeline(&self, request: Request<UpdatePipelineRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            let caller = Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            let patch = r.pipeline.ok_or_else(|| ApiError::invalid("pipeline", "is required"))?;
            check_id("pipeline.id", &patch.id)?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            self.store
                .edit_pipeline(&patch.id, &patch.etag, &caller.subject, None, |pipeline| {
                    let mut v = Violations::new();
                    PIPELINE_MASK.apply(pipeline, &patch, &paths, &mut v);
                    domain::normalize_pipeline(pipeline, &mut v);
                    v.check()
                })
                .await
        };
        respond(result.await)
    }

    async fn add_stage(&self, request: Request<AddStageRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            let caller = Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            check_id("pipeline_id", &r.pipeline_id)?;
            let mut stage = r.stage.ok_or_else(|| ApiError::invalid("stage", "is required"))?;
            let mut v = Violations::new();
            domain::normalize_stage(&mut stage, "stage", &mut v);
            v.check()?;
            stage.id.clear();
            self.store
                .edit_pipeline(&r.pipeline_id, &r.etag, &caller.subject, None, |pipeline| {
                    let mut v = Violations::new();
                    unique_name(pipeline, &stage, &mut v);
                    v.check()?;
                    let at = place(r.position, pipeline.stages.len())?;
                    pipeline.stages.insert(at, stage);
                    Ok(())
                })
                .await
        };
        respond(result.await)
    }

    async fn update_stage(&self, request: Request<UpdateStageRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            let caller = Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            check_id("pipeline_id", &r.pipeline_id)?;
            let patch = r.stage.ok_or_else(|| ApiError::invalid("stage", "is required"))?;
            check_id("stage.id", &patch.id)?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            self.store
                .edit_pipeline(&r.pipeline_id, &r.etag, &caller.subject, None, |pipeline| {
                    let i = stage_index(pipeline, &patch.id)?;
                    let mut v = Violations::new();
                    let stage = &mut pipeline.stages[i];
                    STAGE_MASK.apply(stage, &patch, &paths, &mut v);
                    domain::normalize_stage(stage, "stage", &mut v);
                    let stage = pipeline.stages[i].clone();
                    unique_name(pipeline, &stage, &mut v);
                    v.check()
                })
                .await
        };
        respond(result.await)
    }

    async fn move_stage(&self, request: Request<MoveStageRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            let caller = Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            check_id("pipeline_id", &r.pipeline_id)?;
            check_id("stage_id", &r.stage_id)?;
            self.store
                .edit_pipeline(&r.pipeline_id, &r.etag, &caller.subject, None, |pipeline| {
                    let i = stage_index(pipeline, &r.stage_id)?;
                    let stage = pipeline.stages.remove(i);
                    let at = place(r.position, pipeline.stages.len())?;
                    pipeline.stages.insert(at, stage);
                    Ok(())
                })
                .await
        };
        respond(result.await)
    }

    async fn remove_stage(&self, request: Request<RemoveStageRequest>) -> Result<Response<Pipeline>, Status> {
        let result = async {
            let caller = Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            check_id("pipeline_id", &r.pipeline_id)?;
            check_id("stage_id", &r.stage_id)?;
            let move_to = r.move_deals_to_stage_id.trim();
            if !move_to.is_empty() {
                check_id("move_deals_to_stage_id", move_to)?;
            }
            let move_to = (!move_to.is_empty()).then_some(move_to);
            self.store
                .edit_pipeline(&r.pipeline_id, &r.etag, &caller.subject, move_to, |pipeline| {
                    let i = stage_index(pipeline, &r.stage_id)?;
                    pipeline.stages.remove(i);
                    Ok(())
                })
                .await
        };
        respond(result.await)
    }

    async fn delete_pipeline(&self, request: Request<DeletePipelineRequest>) -> Result<Response<()>, Status> {
        let result = async {
            Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            check_id("id", &r.id)?;
            self.store.delete_pipeline(&r.id, &r.etag).await
        };
        respond(result.await)
    }

    async fn create_product(&self, request: Request<CreateProductRequest>) -> Result<Response<Product>, Status> {
        let result = async {
            let caller = Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            let mut product = r.product.ok_or_else(|| ApiError::invalid("product", "is required"))?;
            let mut v = Violations::new();
            v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
            domain::normalize_product(&mut product, &mut v);
            v.check()?;
            self.store.create_product(product, &caller.subject, r.request_id.trim()).await
        };
        respond(result.await)
    }

    async fn get_product(&self, request: Request<GetProductRequest>) -> Result<Response<Product>, Status> {
        let result = async {
            Self::caller(&request, READ.name)?;
            let id = request.into_inner().id;
            check_id("id", &id)?;
            self.store.get_product(&id).await
        };
        respond(result.await)
    }

    async fn update_product(&self, request: Request<UpdateProductRequest>) -> Result<Response<Product>, Status> {
        let result = async {
            Self::caller(&request, ADMIN.name)?;
            let r = request.into_inner();
            let patch = r.product.ok_or_else(|| ApiError::invalid("product", "is required"))?;
            check_id("product.id", &patch.id)?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            self.store
                .edit_product(&patch.id, &patch.etag, |product| {
                    let mut v = Violations::new();
                    PRODUCT_MASK.apply(product, &patch, &paths, &mut v);
                    domain::normalize_product(product, &mut v);
                    v.check()
                })
                .await
        };
        respond(result.await)
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let result = async {
            Self::caller(&request, READ.name)?;
            let r = request.into_inner();
            let mut v = Violations::new();
            v.max_chars("query", &r.query, MAX_QUERY);
            v.check()?;
            let filter = crm_kit::filter::parse(&r.filter, products::FIELDS)?;
            let query = domain::key(&r.query);
            let page = Page::decode(&["products", &r.filter, &query], r.page_size, &r.page_token, &products::ORDER)?;
            let (products, next_page_token) = self.store.list_products(&ProductQuery { filter, query, page }).await?;
            Ok(ListProductsResponse { products, next_page_token })
        };
        respond(result.await)
    }
}
