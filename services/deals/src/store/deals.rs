//! Deals: their columns (stage, status, owner, money) beside a document (line items, notes,
//! lost reason), every stage change in `deal_history`, and the board's per-stage totals computed
//! by the database over every matching deal.

use std::collections::HashMap;

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Edit, Sql, Tx, idempotency};
use crm_kit::events::envelope::envelope;
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::deals::v1::{
    ColumnTotal, Deal, DealAutomationNotice, DealStageChanged, DealStatus, DealWinUndone, DealWon, Money, Product,
    Stage, StageChange, StageChangeKind, StageKind, automation,
};
use crm_proto::events::v1::Envelope;
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::pipelines::{STAGE_COLUMNS, stage_of};
use super::{CREATED_DEAL, Store};
use crate::domain;

const COLUMNS: &str = "id, title, pipeline_id, stage_id, status, owner_id, company_id, person_id, currency, amount, \
                       probability, probability_manual, expected_close, source, stage_entered_at, rot_at, closed_at, \
                       created_at, updated_at, version, doc, furthest_stage_id, lost_reason, last_activity_at";

/// The filterable fields of ListDeals.
pub const FIELDS: &[Field] = &[
    Field { name: "pipeline_id", column: "pipeline_id", kind: FieldKind::Text },
    Field { name: "stage_id", column: "stage_id", kind: FieldKind::Text },
    Field { name: "owner_id", column: "owner_id", kind: FieldKind::Text },
    Field { name: "company_id", column: "company_id", kind: FieldKind::Text },
    Field { name: "person_id", column: "person_id", kind: FieldKind::Text },
    Field {
        name: "status",
        column: "status",
        kind: FieldKind::Enum { prefix: "DEAL_STATUS_", values: &[("OPEN", 1), ("WON", 2), ("LOST", 3)] },
    },
    Field { name: "currency", column: "currency", kind: FieldKind::Text },
    Field { name: "amount", column: "amount", kind: FieldKind::Number },
    Field { name: "expected_close_date", column: "expected_close", kind: FieldKind::Text },
    Field { name: "create_time", column: "created_at", kind: FieldKind::Time },
    Field { name: "close_time", column: "closed_at", kind: FieldKind::Time },
    Field { name: "last_activity_time", column: "last_activity_at", kind: FieldKind::Time },
];

/// The order of a deal listing from `order_by`.
pub fn order(order_by: &str) -> Result<Order, ApiError> {
    let text = order_by.trim();
    let (name, desc) = match text.strip_suffix(" desc") {
        Some(name) => (name.trim(), true),
        None => (text.strip_suffix(" asc").unwrap_or(text).trim(), text.is_empty()),
    };
    let (column, is_text) = match name {
        "" | "create_time" => ("created_at", false),
        "update_time" => ("updated_at", false),
        "amount" => ("amount", false),
        "expected_close_date" => ("expected_close", true),
        other => {
            return Err(ApiError::invalid(
                "order_by",
                format!("cannot sort by {other:?}; use create_time, update_time, amount or expected_close_date"),
            ));
        }
    };
    Ok(Order { column, tie: "id", text: is_text, desc })
}

/// A deal listing, decoded.
#[derive(Debug, Clone)]
pub struct DealQuery {
    pub filter: Option<Filter>,
    pub order: Order,
    pub page: Page,
    /// Only deals rotting at this time.
    pub rotting_at: Option<i64>,
}

/// A deal as a bulk load writes it: as it stands after its moves.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its stage, status, owner, money, probability, expected close, source and lost reason.
    pub deal: Deal,
    /// The furthest open stage it entered.
    pub furthest_stage_id: String,
    pub created_at: i64,
    /// 0 while open.
    pub closed_at: i64,
}

/// A stage of a pipeline, as a deal moving into it needs it.
#[derive(Debug, Clone)]
pub struct Target {
    pub pipeline_id: String,
    pub stage: Stage,
}

fn decode(row: &AnyRow) -> Result<Deal, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut d = Deal::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored deal {id} does not decode: {e}")))?;
    d.title = row.try_get("title")?;
    d.pipeline_id = row.try_get("pipeline_id")?;
    d.stage_id = row.try_get("stage_id")?;
    d.status = row.try_get::<i64, _>("status")? as i32;
    d.owner_id = row.try_get("owner_id")?;
    d.company_id = row.try_get("company_id")?;
    d.person_id = row.try_get("person_id")?;
    let currency: String = row.try_get("currency")?;
    let amount: i64 = row.try_get("amount")?;
    let probability = row.try_get::<i64, _>("probability")? as i32;
    d.probability = Some(probability);
    d.probability_manual = row.try_get::<i64, _>("probability_manual")? != 0;
    if !currency.is_empty() {
        d.weighted_amount =
            Some(Money { currency_code: currency.clone(), minor_units: domain::weighted(amount, probability) });
        d.amount = Some(Money { currency_code: currency, minor_units: amount });
    }
    d.expected_close_date = row.try_get("expected_close")?;
    d.source = row.try_get("source")?;
    d.lost_reason = row.try_get("lost_reason")?;
    d.stage_enter_time = to_timestamp(row.try_get("stage_entered_at")?);
    d.rotting = row.try_get::<i64, _>("rot_at")? < now_micros();
    d.last_activity_time = to_timestamp(row.try_get("last_activity_at")?);
    d.close_time = to_timestamp(row.try_get("closed_at")?);
    d.create_time = to_timestamp(row.try_get("created_at")?);
    d.update_time = to_timestamp(row.try_get("updated_at")?);
    d.etag = row.try_get::<i64, _>("version")?.to_string();
    d.id = id;
    Ok(d)
}

fn doc(d: &Deal) -> Vec<u8> {
    Deal { line_items: d.line_items.clone(), notes: d.notes.clone(), ..Deal::default() }.encode_to_vec()
}

fn money(d: &Deal) -> (&str, i64) {
    d.amount.as_ref().map_or(("", 0), |m| (m.currency_code.as_str(), m.minor_units))
}

/// The key of a `stage_totals` row: stage, owner, currency.
type TotalKey = (String, String, String);

/// What `old` becoming `new` (either absent: created, deleted) changes in `stage_totals`, by
/// row, in key order (the order rows are locked in, so that two changes never wait on each
/// other in opposite orders); rows that do not change are left out.
fn total_changes(old: Option<&Deal>, new: Option<&Deal>) -> Vec<(TotalKey, [i64; 3])> {
    let mut changes: std::collections::BTreeMap<TotalKey, [i64; 3]> = std::collections::BTreeMap::new();
    for (deal, sign) in [(old, -1_i64), (new, 1)] {
        let Some(d) = deal else { continue };
        let (currency, amount) = money(d);
        let weighted = domain::weighted(amount, d.probability.unwrap_or(0));
        let entry = changes.entry((d.stage_id.clone(), d.owner_id.clone(), currency.to_string())).or_default();
        entry[0] += sign;
        entry[1] += sign * amount;
        entry[2] += sign * weighted;
    }
    changes.into_iter().filter(|(_, delta)| *delta != [0, 0, 0]).collect()
}

/// Applies [`total_changes`] in one statement.
async fn change_totals(tx: &mut Tx, changes: &[(TotalKey, [i64; 3])]) -> Result<(), ApiError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut sql = Sql::new("INSERT INTO stage_totals (stage_id, owner_id, currency, deals, amount, weighted) VALUES ");
    sql.push_values(changes, |v, ((stage, owner, currency), delta)| {
        v.bind(stage.as_str()).bind(owner.as_str()).bind(currency.as_str());
        v.bind(delta[0]).bind(delta[1]).bind(delta[2]);
    });
    sql.push(
        " ON CONFLICT (stage_id, owner_id, currency) DO UPDATE SET deals = stage_totals.deals + excluded.deals, \
         amount = stage_totals.amount + excluded.amount, weighted = stage_totals.weighted + excluded.weighted",
    );
    sql.query().execute(&mut **tx).await?;
    Ok(())
}

/// Counts `stage_totals` of `stages` afresh from their deals (after a change of many deals at
/// once: a stage's deals moved, a new default probability).
pub(crate) async fn recount_totals(
    tx: &mut Tx,
    backend: crm_kit::db::Backend,
    stages: &[&str],
) -> Result<(), ApiError> {
    let mut sql = Sql::new("DELETE FROM stage_totals WHERE ");
    sql.push_in("stage_id", stages.iter().copied());
    sql.query().execute(&mut **tx).await?;
    let mut sql = Sql::new(
        "INSERT INTO stage_totals (stage_id, owner_id, currency, deals, amount, weighted) \
         SELECT stage_id, owner_id, currency, COUNT(*), ",
    );
    sql.push(&backend.sum("amount")).push(", ").push(&backend.sum("(amount * probability + 50) / 100"));
    sql.push(" FROM deals WHERE ");
    sql.push_in("stage_id", stages.iter().copied());
    sql.push(" GROUP BY stage_id, owner_id, currency");
    sql.query().execute(&mut **tx).await?;
    Ok(())
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("deal {id} not found"))
}

/// The events of a deal `deal` (as it is now) entering `stage` from `from` (empty: opened):
/// the entry, with the stage's automations for their consumers, and a notice per person a
/// notify automation names.
fn entering(deal: &Deal, from: &str, stage: &Stage, kind: StageChangeKind, actor: &str) -> Vec<Envelope> {
    let automations = domain::filled(&stage.automations, deal, stage);
    let mut notices = Vec::new();
    for automation in &automations {
        let Some(automation::Action::Notify(notify)) = &automation.action else { continue };
        let message = &notify.message;
        let notice = |recipient: &str, supervisor_of: &str| {
            let event = DealAutomationNotice {
                deal_id: deal.id.clone(),
                title: deal.title.clone(),
                stage_name: stage.name.clone(),
                message: message.to_string(),
                recipient_id: recipient.to_string(),
                supervisor_of_id: supervisor_of.to_string(),
                owner_id: deal.owner_id.clone(),
            };
            envelope(crate::SOURCE, &deal.id, actor, &event)
        };
        for user in &notify.user_ids {
            notices.push(notice(user, ""));
        }
        if notify.owner {
            notices.push(notice(&deal.owner_id, ""));
        }
        if notify.owner_supervisor {
            notices.push(notice("", &deal.owner_id));
        }
    }
    let mut events = vec![entered(deal, from, stage, kind, actor, automations)];
    events.extend(notices);
    events
}

fn entered(
    deal: &Deal,
    from: &str,
    stage: &Stage,
    kind: StageChangeKind,
    actor: &str,
    automations: Vec<crm_proto::deals::v1::Automation>,
) -> Envelope {
    let event = DealStageChanged {
        deal_id: deal.id.clone(),
        title: deal.title.clone(),
        pipeline_id: deal.pipeline_id.clone(),
        from_stage_id: from.to_string(),
        to_stage_id: stage.id.clone(),
        to_stage_name: stage.name.clone(),
        kind: kind as i32,
        status: deal.status,
        owner_id: deal.owner_id.clone(),
        company_id: deal.company_id.clone(),
        person_id: deal.person_id.clone(),
        amount: deal.amount.clone(),
        automations,
    };
    envelope(crate::SOURCE, &deal.id, actor, &event)
}

fn won(deal: &Deal, closed_at: i64, actor: &str) -> Envelope {
    let event = DealWon {
        deal_id: deal.id.clone(),
        title: deal.title.clone(),
        owner_id: deal.owner_id.clone(),
        company_id: deal.company_id.clone(),
        person_id: deal.person_id.clone(),
        amount: deal.amount.clone(),
        close_time: to_timestamp(closed_at),
    };
    envelope(crate::SOURCE, &deal.id, actor, &event)
}

fn undone(deal: &Deal, actor: &str) -> Envelope {
    let event = DealWinUndone {
        deal_id: deal.id.clone(),
        company_id: deal.company_id.clone(),
        person_id: deal.person_id.clone(),
    };
    envelope(crate::SOURCE, &deal.id, actor, &event)
}

/// The purchase-history events of a change from `old` to `new`: a win, a win undone, or a won
/// deal's amount or customer changed.
fn purchase_events(old: Option<&Deal>, new: Option<&Deal>, closed_at: i64, actor: &str) -> Vec<Envelope> {
    fn is_won(d: Option<&Deal>) -> Option<&Deal> {
        d.filter(|d| d.status == DealStatus::Won as i32)
    }
    match (is_won(old), is_won(new)) {
        (None, Some(new)) => vec![won(new, closed_at, actor)],
        (Some(old), None) => vec![undone(old, actor)],
        (Some(old), Some(new)) if (&old.company_id, &old.person_id) != (&new.company_id, &new.person_id) => {
            vec![undone(old, actor), won(new, closed_at, actor)]
        }
        (Some(old), Some(new)) if old.amount != new.amount => vec![won(new, closed_at, actor)],
        _ => Vec::new(),
    }
}

/// A history row about to be written.
struct Change<'a> {
    deal_id: &'a str,
    from: &'a str,
    to: &'a str,
    kind: StageChangeKind,
    actor: &'a str,
    at: i64,
    seconds_in_previous: i64,
    lost_reason: &'a str,
}

async fn record(tx: &mut Tx, change: &Change<'_>) -> Result<(), ApiError> {
    let mut sql = Sql::new(
        "INSERT INTO deal_history (id, deal_id, from_stage_id, to_stage_id, kind, actor_id, at, seconds_in_previous, \
         lost_reason) VALUES ",
    );
    sql.push_values([change], |v, c| {
        v.bind(crm_kit::id::new()).bind(c.deal_id).bind(c.from).bind(c.to).bind(c.kind as i64).bind(c.actor);
        v.bind(c.at).bind(c.seconds_in_previous).bind(c.lost_reason);
    });
    sql.query().execute(&mut **tx).await?;
    Ok(())
}

/// What moving from a stage of `from` kind to one of `to` kind is.
pub fn change_kind(from: i32, to: i32) -> StageChangeKind {
    let closed = |k: i32| k == StageKind::Won as i32 || k == StageKind::Lost as i32;
    match (closed(from), closed(to)) {
        (_, true) => StageChangeKind::Closed,
        (true, false) => StageChangeKind::Reopened,
        (false, false) => StageChangeKind::Moved,
    }
}

impl Store {
    /// The stage that `condition` (` = $1`, ` = (SELECT …)`) names by id, with its pipeline.
    async fn target_where(&self, condition: Sql) -> Result<Option<Target>, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(STAGE_COLUMNS).push(" FROM stages WHERE id").push_sql(condition);
        Ok(match sql.query().fetch_optional(self.db.pool()).await? {
            Some(row) => Some(Target { pipeline_id: row.try_get("pipeline_id")?, stage: stage_of(&row)? }),
            None => None,
        })
    }

    /// The stage `id` with its pipeline.
    pub async fn target(&self, stage_id: &str) -> Result<Option<Target>, ApiError> {
        let mut condition = Sql::new(" = ");
        condition.bind(stage_id);
        self.target_where(condition).await
    }

    /// The first stage of `pipeline_id`, or of the first pipeline by name.
    pub async fn first_stage(&self, pipeline_id: &str) -> Result<Option<Target>, ApiError> {
        let mut condition =
            Sql::new(" = (SELECT s.id FROM stages s JOIN pipelines p ON p.id = s.pipeline_id WHERE 1=1");
        if !pipeline_id.is_empty() {
            condition.push(" AND p.id = ").bind(pipeline_id);
        }
        condition.push(" ORDER BY p.name_key, p.id, s.position LIMIT 1)");
        self.target_where(condition).await
    }

    /// The products of `ids`, by id.
    pub async fn products_by_id(&self, ids: &[&str]) -> Result<HashMap<String, Product>, ApiError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut sql =
            Sql::new("SELECT id, name_key, active, created_at, updated_at, version, doc FROM products WHERE ");
        sql.push_in("id", ids.iter().copied());
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        rows.iter().map(|r| super::products::decode(r).map(|p| (p.id.clone(), p))).collect()
    }

    /// Opens `deal` (normalised, priced, its owner and customer checked) in stage `target`, for
    /// `actor`; its first history row says where it started.
    pub async fn create_deal(
        &self,
        mut deal: Deal,
        target: &Target,
        actor: &str,
        request_id: &str,
        scope: &OwnerScope,
    ) -> Result<Deal, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, actor, request_id, CREATED_DEAL, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_deal(&record_id, scope).await;
        }
        deal.id = id;
        deal.pipeline_id = target.pipeline_id.clone();
        deal.stage_id = target.stage.id.clone();
        deal.status = domain::status_of(target.stage.kind) as i32;
        deal.probability_manual = deal.probability.is_some();
        let probability = deal.probability.unwrap_or(target.stage.probability);
        deal.probability = Some(probability);
        let closed_at = if deal.status == DealStatus::Open as i32 { 0 } else { now };
        let (currency, amount) = money(&deal);
        let mut sql = Sql::new("INSERT INTO deals (");
        sql.push(COLUMNS).push(") VALUES ");
        sql.push_values([&deal], |v, d| {
            v.bind(d.id.as_str()).bind(d.title.as_str()).bind(d.pipeline_id.as_str()).bind(d.stage_id.as_str());
            v.bind(i64::from(d.status))
                .bind(d.owner_id.as_str())
                .bind(d.company_id.as_str())
                .bind(d.person_id.as_str());
            v.bind(currency).bind(amount).bind(i64::from(probability)).bind(i64::from(d.probability_manual));
            v.bind(d.expected_close_date.as_str()).bind(d.source.as_str()).bind(now);
            v.bind(domain::rot_at(&target.stage, now)).bind(closed_at);
            v.bind(now).bind(now).bind(1_i64).bind(doc(d));
            let open = target.stage.kind == StageKind::Open as i32;
            v.bind(if open { d.stage_id.as_str() } else { "" }).bind(d.lost_reason.as_str()).bind(0_i64);
        });
        sql.query().execute(&mut *tx).await?;
        change_totals(&mut tx, &total_changes(None, Some(&deal))).await?;
        let change = Change {
            deal_id: &deal.id,
            from: "",
            to: &deal.stage_id,
            kind: if closed_at == 0 { StageChangeKind::Created } else { StageChangeKind::Closed },
            actor,
            at: now,
            seconds_in_previous: 0,
            lost_reason: &deal.lost_reason,
        };
        record(&mut tx, &change).await?;
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM deals WHERE id = ").bind(deal.id.as_str());
        let created = decode(&sql.query().fetch_one(&mut *tx).await?)?;
        let mut events = entering(&created, "", &target.stage, change.kind, actor);
        events.extend(purchase_events(None, Some(&created), now, actor));
        self.outbox.append_all(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(created)
    }

    fn select_deal(&self, id: &str, scope: &OwnerScope) -> Sql {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM deals WHERE id = ").bind(id);
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        sql
    }

    pub async fn get_deal(&self, id: &str, scope: &OwnerScope) -> Result<Deal, ApiError> {
        let row = self.select_deal(id, scope).query().fetch_optional(self.db.pool()).await?;
        decode(&row.ok_or_else(|| not_found(id))?)
    }

    /// Changes the deal `id` under its row lock. `change` gets the deal as stored and the stage it
    /// is in; a `move_to` stage is entered after it (recorded in the history, closing, reopening
    /// and taking the stage's probability unless a user set one). ABORTED when `etag` is set and
    /// stale.
    pub async fn edit_deal(
        &self,
        id: &str,
        etag: &str,
        actor: &str,
        scope: &OwnerScope,
        move_to: Option<&Target>,
        change: impl FnOnce(&mut Deal) -> Result<(), ApiError>,
    ) -> Result<Deal, ApiError> {
        let tx = self.db.begin_write().await?;
        self.edit_deal_in(tx, id, etag, actor, scope, move_to, change).await
    }

    /// [`Store::edit_deal`] in `tx`, which holds another change that commits with it (accepting
    /// a quote).
    #[allow(clippy::too_many_arguments)]
    pub async fn edit_deal_in(
        &self,
        tx: Tx,
        id: &str,
        etag: &str,
        actor: &str,
        scope: &OwnerScope,
        move_to: Option<&Target>,
        change: impl FnOnce(&mut Deal) -> Result<(), ApiError>,
    ) -> Result<Deal, ApiError> {
        let (mut edit, row) = Edit::lock(&self.db, tx, "deals", "deal", id, self.select_deal(id, scope)).await?;
        edit.require_etag(etag)?;
        let old = decode(&row)?;
        let mut deal = old.clone();
        change(&mut deal)?;
        let now = now_micros();
        let mut entered_at = old.stage_enter_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(now);
        let mut closed_at = old.close_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
        let mut moved = None;
        if let Some(target) = move_to.filter(|t| t.stage.id != old.stage_id) {
            if target.pipeline_id != old.pipeline_id {
                return Err(ApiError::invalid("stage_id", "is not a stage of the deal's pipeline"));
            }
            let from_kind = self.stage_kind(edit.tx(), &old.stage_id).await?;
            let kind = change_kind(from_kind, target.stage.kind);
            deal.stage_id = target.stage.id.clone();
            deal.status = domain::status_of(target.stage.kind) as i32;
            if !deal.probability_manual {
                deal.probability = Some(target.stage.probability);
            }
            closed_at = if deal.status == DealStatus::Open as i32 { 0 } else { now };
            if deal.status != DealStatus::Lost as i32 {
                deal.lost_reason.clear();
            }
            let missing = domain::missing_fields(&deal, &target.stage);
            if !missing.is_empty() {
                let mut v = crm_kit::Violations::new();
                for field in missing {
                    v.add(field, format!("is required to enter the stage {:?}", target.stage.name));
                }
                return Err(ApiError::Unmet {
                    message: format!("the deal cannot enter {:?} yet", target.stage.name),
                    violations: v,
                });
            }
            moved = Some((kind, ((now - entered_at) / 1_000_000).max(0)));
            entered_at = now;
        } else if !deal.probability_manual && deal.probability != old.probability {
            // Cleared: back to the stage's default.
            let stage = self.target(&deal.stage_id).await?;
            deal.probability = stage.map(|t| t.stage.probability).or(old.probability);
        }
        if deal == old && moved.is_none() {
            // Nothing of the deal changes; what else the transaction holds commits.
            edit.commit().await?;
            return Ok(old);
        }
        let (currency, amount) = money(&deal);
        let mut set = Sql::new("title = ");
        set.bind(deal.title.as_str()).push(", stage_id = ").bind(deal.stage_id.as_str());
        set.push(", status = ").bind(i64::from(deal.status)).push(", owner_id = ").bind(deal.owner_id.as_str());
        set.push(", company_id = ").bind(deal.company_id.as_str()).push(", person_id = ").bind(deal.person_id.as_str());
        set.push(", currency = ").bind(currency).push(", amount = ").bind(amount);
        set.push(", probability = ").bind(i64::from(deal.probability.unwrap_or(0)));
        set.push(", probability_manual = ").bind(i64::from(deal.probability_manual));
        set.push(", expected_close = ").bind(deal.expected_close_date.as_str());
        set.push(", stage_entered_at = ").bind(entered_at).push(", closed_at = ").bind(closed_at);
        if let Some(target) = move_to.filter(|_| moved.is_some()) {
            set.push(", rot_at = ").bind(domain::rot_at(&target.stage, entered_at));
            if target.stage.kind == StageKind::Open as i32 {
                // The furthest open stage it entered, by the stages' order now.
                set.push(", furthest_stage_id = CASE WHEN COALESCE((SELECT position FROM stages WHERE id = ");
                set.push("deals.furthest_stage_id), 0) < ").bind(i64::from(target.stage.position));
                set.push(" THEN ").bind(target.stage.id.as_str()).push(" ELSE furthest_stage_id END");
            }
        }
        set.push(", lost_reason = ").bind(deal.lost_reason.as_str());
        set.push(", doc = ").bind(doc(&deal));
        edit.save(set, now).await?;
        change_totals(edit.tx(), &total_changes(Some(&old), Some(&deal))).await?;
        let mut events = Vec::new();
        if let Some((kind, seconds)) = moved {
            let change = Change {
                deal_id: id,
                from: &old.stage_id,
                to: &deal.stage_id,
                kind,
                actor,
                at: now,
                seconds_in_previous: seconds,
                lost_reason: &deal.lost_reason,
            };
            record(edit.tx(), &change).await?;
            if let Some(target) = move_to {
                events.extend(entering(&deal, &old.stage_id, &target.stage, kind, actor));
            }
        }
        events.extend(purchase_events(Some(&old), Some(&deal), closed_at, actor));
        self.outbox.append_all(edit.tx(), &events).await?;
        edit.commit().await?;
        self.get_deal(id, &OwnerScope::All).await
    }

    async fn stage_kind(&self, tx: &mut Tx, stage_id: &str) -> Result<i32, ApiError> {
        let mut sql = Sql::new("SELECT kind FROM stages WHERE id = ");
        sql.bind(stage_id);
        Ok(match sql.query().fetch_optional(&mut **tx).await? {
            Some(row) => row.try_get::<i64, _>("kind")? as i32,
            None => StageKind::Open as i32,
        })
    }

    /// Deletes the deal `id` with its history.
    pub async fn delete_deal(&self, id: &str, etag: &str, actor: &str, scope: &OwnerScope) -> Result<(), ApiError> {
        let tx = self.db.begin_write().await?;
        let (mut edit, row) = Edit::lock(&self.db, tx, "deals", "deal", id, self.select_deal(id, scope)).await?;
        edit.require_etag(etag)?;
        let old = decode(&row)?;
        let events = purchase_events(Some(&old), None, 0, actor);
        self.outbox.append_all(edit.tx(), &events).await?;
        change_totals(edit.tx(), &total_changes(Some(&old), None)).await?;
        let mut sql = Sql::new("DELETE FROM deal_history WHERE deal_id = ");
        sql.bind(id);
        sql.query().execute(&mut **edit.tx()).await?;
        edit.delete().await?;
        edit.commit().await
    }

    /// One page of the deals `scope` allows.
    pub async fn list_deals(&self, query: &DealQuery, scope: &OwnerScope) -> Result<(Vec<Deal>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM deals WHERE 1=1");
        if let Some(filter) = &query.filter {
            filter.push_onto(&mut sql);
        }
        if let Some(at) = query.rotting_at {
            sql.push(" AND rot_at < ").bind(at);
        }
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        query.page.push_keyset(&mut sql, &query.order);
        let rows = sql.query_unprepared().fetch_all(self.db.pool()).await?;
        query.page.finish(&rows, &query.order, decode)
    }

    /// A deal's moves, oldest first, if `scope` allows the deal.
    pub async fn history(
        &self,
        deal_id: &str,
        page: &Page,
        scope: &OwnerScope,
    ) -> Result<(Vec<StageChange>, String), ApiError> {
        self.get_deal(deal_id, scope).await?;
        let order = Order { column: "at", tie: "id", text: false, desc: false };
        let mut sql = Sql::new(
            "SELECT id, from_stage_id, to_stage_id, kind, actor_id, at, seconds_in_previous, lost_reason FROM deal_history \
             WHERE deal_id = ",
        );
        sql.bind(deal_id);
        page.push_keyset(&mut sql, &order);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        page.finish(&rows, &order, |r| {
            Ok(StageChange {
                id: r.try_get("id")?,
                from_stage_id: r.try_get("from_stage_id")?,
                to_stage_id: r.try_get("to_stage_id")?,
                kind: r.try_get::<i64, _>("kind")? as i32,
                actor_id: r.try_get("actor_id")?,
                change_time: to_timestamp(r.try_get("at")?),
                seconds_in_previous: r.try_get("seconds_in_previous")?,
                lost_reason: r.try_get("lost_reason")?,
            })
        })
    }

    /// Per stage of `pipeline_id`, the count of the deals `filter` and `scope` allow, and per
    /// currency their count, sum and weighted sum (deals without an amount count, in no
    /// currency). Without a filter, read from `stage_totals` (a few rows per stage and owner
    /// however many deals there are); with one, one aggregate over every matching deal.
    pub async fn board_totals(
        &self,
        pipeline_id: &str,
        filter: Option<&Filter>,
        scope: &OwnerScope,
    ) -> Result<HashMap<String, (i64, Vec<ColumnTotal>)>, ApiError> {
        let backend = self.db.backend();
        let mut sql = Sql::new("SELECT stage_id, currency, ");
        if let Some(filter) = filter {
            sql.push("COUNT(*) AS n, ").push(&backend.sum("amount")).push(" AS total, ");
            sql.push(&backend.sum("(amount * probability + 50) / 100"));
            sql.push(" AS weighted FROM deals WHERE pipeline_id = ").bind(pipeline_id);
            filter.push_onto(&mut sql);
        } else {
            sql.push(&backend.sum("deals")).push(" AS n, ").push(&backend.sum("amount")).push(" AS total, ");
            sql.push(&backend.sum("weighted"));
            sql.push(" AS weighted FROM stage_totals WHERE stage_id IN (SELECT id FROM stages WHERE pipeline_id = ");
            sql.bind(pipeline_id).push(")");
        }
        scope.push_set_condition(&mut sql, backend, "owner_id");
        sql.push(" GROUP BY stage_id, currency");
        let rows = if filter.is_some() {
            self.aggregate(&sql).await?
        } else {
            sql.query_unprepared().fetch_all(self.db.pool()).await?
        };
        let mut out: HashMap<String, (i64, Vec<ColumnTotal>)> = HashMap::new();
        for row in rows {
            let currency: String = row.try_get("currency")?;
            let count: i64 = row.try_get("n")?;
            if count == 0 {
                continue;
            }
            let column = out.entry(row.try_get("stage_id")?).or_default();
            column.0 += count;
            if currency.is_empty() {
                continue;
            }
            let money = |n: i64| Money { currency_code: currency.clone(), minor_units: n };
            column.1.push(ColumnTotal {
                sum: Some(money(row.try_get("total")?)),
                weighted: Some(money(row.try_get("weighted")?)),
                count,
            });
        }
        for (_, totals) in out.values_mut() {
            totals.sort_by(|a, b| {
                let c = |t: &ColumnTotal| t.sum.as_ref().map(|m| m.currency_code.clone()).unwrap_or_default();
                c(a).cmp(&c(b))
            });
        }
        Ok(out)
    }

    /// How many deals are in `stage_id`.
    pub(crate) async fn deals_in_stage(tx: &mut Tx, stage_id: &str) -> Result<i64, ApiError> {
        let mut sql = Sql::new("SELECT COUNT(*) AS n FROM deals WHERE stage_id = ");
        sql.bind(stage_id);
        Ok(sql.query().fetch_one(&mut **tx).await?.try_get("n")?)
    }

    /// Moves every deal of stage `from` to `to` (a stage of the same kind), recording each move.
    pub(crate) async fn move_all(
        &self,
        tx: &mut Tx,
        from: &str,
        to: &Stage,
        actor: &str,
        now: i64,
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new(
            "INSERT INTO deal_history (id, deal_id, from_stage_id, to_stage_id, kind, actor_id, at, \
             seconds_in_previous, lost_reason) SELECT id || '-moved-' || ",
        );
        sql.bind(now.to_string()).push(", id, stage_id, ").bind(to.id.as_str()).push(", ");
        sql.bind(StageChangeKind::Moved as i64).push(", ").bind(actor).push(", ").bind(now);
        sql.push(", (").bind(now).push(" - stage_entered_at) / 1000000, '' FROM deals WHERE stage_id = ").bind(from);
        sql.query().execute(&mut **tx).await?;
        let mut sql = Sql::new("UPDATE deals SET stage_id = ");
        sql.bind(to.id.as_str()).push(", stage_entered_at = ").bind(now);
        sql.push(", rot_at = CASE WHEN status = ").bind(DealStatus::Open as i64).push(" THEN ");
        sql.bind(domain::rot_at(to, now)).push(" ELSE ").bind(i64::MAX).push(" END");
        sql.push(", probability = CASE WHEN probability_manual = 1 THEN probability ELSE ");
        sql.bind(i64::from(to.probability)).push(" END, version = version + 1, updated_at = ").bind(now);
        // A moved deal whose furthest stage was the one removed got as far as its new one.
        sql.push(", furthest_stage_id = CASE WHEN furthest_stage_id = ").bind(from).push(" THEN ");
        sql.bind(if to.kind == StageKind::Open as i32 { to.id.as_str() } else { "" });
        sql.push(" ELSE furthest_stage_id END");
        sql.push(" WHERE stage_id = ").bind(from);
        sql.query().execute(&mut **tx).await?;
        recount_totals(tx, self.db.backend(), &[from, to.id.as_str()]).await?;
        let mut moved = Sql::new("SELECT ");
        moved.push(COLUMNS).push(" FROM deals WHERE stage_id = ").bind(to.id.as_str());
        moved.push(" AND stage_entered_at = ").bind(now);
        let rows = moved.query().fetch_all(&mut **tx).await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            events.extend(entering(&decode(row)?, from, to, StageChangeKind::Moved, actor));
        }
        self.outbox.append_all(tx, &events).await?;
        Ok(())
    }

    /// A removed stage leaves no trace: deals that got as far as it got as far as `replacement`
    /// (empty: no open stage), and its totals go.
    pub(crate) async fn forget_stage(tx: &mut Tx, stage_id: &str, replacement: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("UPDATE deals SET furthest_stage_id = ");
        sql.bind(replacement).push(" WHERE furthest_stage_id = ").bind(stage_id);
        sql.query().execute(&mut **tx).await?;
        let mut sql = Sql::new("DELETE FROM stage_totals WHERE stage_id = ");
        sql.bind(stage_id);
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// Records an activity on the deal `deal_id` at `at` (the tasks service's ActivityLogged):
    /// a later one than the deal knows moves its last activity time, and the day it rots by as
    /// much as its rotting clock restarts later. Repeats and late arrivals change nothing; no
    /// new version (nothing a user set changed).
    pub async fn record_activity(&self, tx: &mut Tx, deal_id: &str, at: i64) -> Result<(), ApiError> {
        // A rotting clock starts at the later of the stage entry and the last activity.
        let mut sql = Sql::new("UPDATE deals SET rot_at = CASE WHEN rot_at = ");
        sql.bind(i64::MAX).push(" OR stage_entered_at >= ").bind(at).push(" THEN rot_at ELSE rot_at + ").bind(at);
        sql.push(
            " - CASE WHEN last_activity_at > stage_entered_at THEN last_activity_at ELSE stage_entered_at END END",
        );
        sql.push(", last_activity_at = ").bind(at);
        sql.push(" WHERE id = ").bind(deal_id).push(" AND last_activity_at < ").bind(at);
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// How many deals there are.
    pub async fn count_deals(&self) -> Result<i64, ApiError> {
        Ok(Sql::new("SELECT COUNT(*) AS n FROM deals").query().fetch_one(self.db.pool()).await?.try_get("n")?)
    }

    /// Writes `deals` as they stand (a bulk load: the bench's seeding) in one transaction, with
    /// no history; [`Store::recount_board_totals`] counts the board's totals afterwards.
    pub async fn load_deals(&self, deals: &[Loaded]) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        for chunk in deals.chunks(500) {
            let mut sql = Sql::new("INSERT INTO deals (");
            sql.push(COLUMNS).push(") VALUES ");
            sql.push_values(chunk, |v, l| {
                let d = &l.deal;
                let (currency, amount) = money(d);
                let entered = if l.closed_at > 0 { l.closed_at } else { l.created_at };
                v.bind(d.id.as_str()).bind(d.title.as_str()).bind(d.pipeline_id.as_str()).bind(d.stage_id.as_str());
                v.bind(i64::from(d.status))
                    .bind(d.owner_id.as_str())
                    .bind(d.company_id.as_str())
                    .bind(d.person_id.as_str());
                v.bind(currency).bind(amount).bind(i64::from(d.probability.unwrap_or(0))).bind(0_i64);
                v.bind(d.expected_close_date.as_str()).bind(d.source.as_str()).bind(entered);
                v.bind(i64::MAX).bind(l.closed_at).bind(l.created_at).bind(entered).bind(1_i64).bind(doc(d));
                v.bind(l.furthest_stage_id.as_str()).bind(d.lost_reason.as_str()).bind(0_i64);
            });
            sql.query().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Counts every stage's board totals afresh from the deals (after a bulk load).
    pub async fn recount_board_totals(&self) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let stages = Sql::new("SELECT id FROM stages").query().fetch_all(&mut *tx).await?;
        let stages: Vec<String> = stages.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        let stages: Vec<&str> = stages.iter().map(String::as_str).collect();
        recount_totals(&mut tx, self.db.backend(), &stages).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The open deals of `stage` rot by its new threshold.
    pub(crate) async fn follow_stage_rotting(tx: &mut Tx, stage: &Stage) -> Result<(), ApiError> {
        let mut sql = Sql::new("UPDATE deals SET rot_at = ");
        if stage.kind == StageKind::Open as i32 && stage.rotting_days > 0 {
            sql.push(
                "CASE WHEN last_activity_at > stage_entered_at THEN last_activity_at ELSE stage_entered_at END + ",
            );
            sql.bind(i64::from(stage.rotting_days) * 86_400_000_000);
        } else {
            sql.bind(i64::MAX);
        }
        sql.push(" WHERE stage_id = ").bind(stage.id.as_str());
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// The deals of a stage whose probability nobody set take its new default.
    pub(crate) async fn follow_stage_probability(
        tx: &mut Tx,
        backend: crm_kit::db::Backend,
        stage_id: &str,
        probability: i32,
    ) -> Result<(), ApiError> {
        let mut sql = Sql::new("UPDATE deals SET probability = ");
        sql.bind(i64::from(probability)).push(", version = version + 1, updated_at = ").bind(now_micros());
        sql.push(" WHERE stage_id = ").bind(stage_id).push(" AND probability_manual = 0 AND probability <> ");
        sql.bind(i64::from(probability));
        sql.query().execute(&mut **tx).await?;
        recount_totals(tx, backend, &[stage_id]).await
    }
}
