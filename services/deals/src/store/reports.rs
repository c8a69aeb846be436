//! The aggregates reports are made of (D8): one statement per report, grouped in the database
//! over every matching deal, within the owners a caller may see. The rows come back as
//! [`Tally`]s; [`crate::reports`] lays them out.
//!
//! Each statement walks one index per owner when the owners are listed (a head's department):
//! `deals_owner` (by creation), `deals_owner_closed` (by closing) or `deals_owner_forecast`
//! (open deals by expected close), which cover every column the statement adds up.

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::Sql;
use sqlx::Row;

use super::Store;
use crm_proto::deals::v1::DealStatus;

/// Which deals a report is about, and the time it covers.
#[derive(Debug, Clone)]
pub struct Coverage {
    /// Whose deals: the caller's scope narrowed by the report's owners and department.
    pub owners: OwnerScope,
    /// Empty: every pipeline.
    pub pipeline_id: String,
    /// Empty: every currency (and deals without an amount).
    pub currency: String,
    /// Epoch microseconds, `from` included, `to` not.
    pub from: i64,
    pub to: i64,
    /// Where each month after the first starts, in epoch microseconds: the buckets of a
    /// monthly report.
    pub month_starts: Vec<i64>,
    /// The period as days (the forecast compares expected close dates with them).
    pub from_date: String,
    pub to_date: String,
}

/// One group of an aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// What the report groups by: a stage, a month's index, an owner, a source, a reason.
    pub key: String,
    /// The funnel's second key: the furthest open stage.
    pub furthest: String,
    pub status: i64,
    /// Empty for deals without an amount.
    pub currency: String,
    pub count: i64,
    /// Sum of amounts, in minor units of `currency`.
    pub amount: i64,
    /// The forecast's weighted sum; the won-and-lost report's sum of sales cycles in seconds.
    pub extra: i64,
}

/// What a report on closed deals groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    Month,
    Owner,
    Source,
    Reason,
}

impl Coverage {
    /// The conditions every report shares: pipeline, currency and owners.
    fn push_conditions(&self, sql: &mut Sql, store: &Store) {
        if !self.pipeline_id.is_empty() {
            sql.push(" AND pipeline_id = ").bind(self.pipeline_id.as_str());
        }
        if !self.currency.is_empty() {
            sql.push(" AND currency = ").bind(self.currency.as_str());
        }
        self.owners.push_condition(sql, store.db.backend(), "owner_id");
    }

    /// The index of the month `column` falls in.
    fn push_month(&self, sql: &mut Sql, column: &str) {
        if self.month_starts.is_empty() {
            sql.push("CAST(0 AS BIGINT)");
            return;
        }
        sql.push("CAST(CASE");
        for (i, at) in self.month_starts.iter().enumerate() {
            sql.push(" WHEN ").push(column).push(" < ").bind(*at).push(" THEN ").literal(i as i64);
        }
        sql.push(" ELSE ").literal(self.month_starts.len() as i64).push(" END AS BIGINT)");
    }
}

fn tally(row: &sqlx::any::AnyRow, key_is_number: bool, furthest: bool) -> Result<Tally, ApiError> {
    let key = if key_is_number { row.try_get::<i64, _>("k")?.to_string() } else { row.try_get("k")? };
    Ok(Tally {
        key,
        furthest: if furthest { row.try_get("f")? } else { String::new() },
        status: row.try_get("status")?,
        currency: row.try_get("currency")?,
        count: row.try_get("n")?,
        amount: row.try_get("total")?,
        extra: row.try_get("extra")?,
    })
}

impl Store {
    /// Deals created in the period by the stage they are in, the furthest open stage they
    /// entered, status and currency.
    pub async fn funnel_tallies(&self, c: &Coverage) -> Result<Vec<Tally>, ApiError> {
        let backend = self.db.backend();
        let mut sql = Sql::new("SELECT stage_id AS k, furthest_stage_id AS f, status, currency, COUNT(*) AS n, ");
        sql.push(&backend.sum("amount"))
            .push(" AS total, CAST(0 AS BIGINT) AS extra FROM deals WHERE created_at >= ")
            .bind(c.from);
        sql.push(" AND created_at < ").bind(c.to);
        c.push_conditions(&mut sql, self);
        sql.push(" GROUP BY 1, 2, 3, 4");
        let rows = self.aggregate(&sql).await?;
        rows.iter().map(|r| tally(r, false, true)).collect()
    }

    /// Deals created in the period by month of creation, status and currency.
    pub async fn created_tallies(&self, c: &Coverage) -> Result<Vec<Tally>, ApiError> {
        let backend = self.db.backend();
        let mut sql = Sql::new("SELECT ");
        c.push_month(&mut sql, "created_at");
        sql.push(" AS k, status, currency, COUNT(*) AS n, ").push(&backend.sum("amount"));
        sql.push(" AS total, CAST(0 AS BIGINT) AS extra FROM deals WHERE created_at >= ").bind(c.from);
        sql.push(" AND created_at < ").bind(c.to);
        c.push_conditions(&mut sql, self);
        sql.push(" GROUP BY 1, 2, 3");
        let rows = self.aggregate(&sql).await?;
        rows.iter().map(|r| tally(r, true, false)).collect()
    }

    /// Deals won or lost in the period (only won ones by source, only lost ones by reason),
    /// grouped by `by`, status and currency; `extra` is their summed sales cycle in seconds.
    pub async fn closed_tallies(&self, c: &Coverage, by: ClosedBy) -> Result<Vec<Tally>, ApiError> {
        let backend = self.db.backend();
        let mut sql = Sql::new("SELECT ");
        match by {
            ClosedBy::Month => c.push_month(&mut sql, "closed_at"),
            ClosedBy::Owner => {
                sql.push("owner_id");
            }
            ClosedBy::Source => {
                sql.push("source");
            }
            ClosedBy::Reason => {
                sql.push("lost_reason");
            }
        }
        sql.push(" AS k, status, currency, COUNT(*) AS n, ").push(&backend.sum("amount")).push(" AS total, ");
        sql.push(&backend.sum("(closed_at - created_at) / 1000000"));
        sql.push(" AS extra FROM deals WHERE closed_at > 0 AND closed_at >= ").bind(c.from);
        sql.push(" AND closed_at < ").bind(c.to);
        match by {
            ClosedBy::Source => {
                sql.push(" AND status = ").bind(DealStatus::Won as i64);
            }
            ClosedBy::Reason => {
                sql.push(" AND status = ").bind(DealStatus::Lost as i64);
            }
            ClosedBy::Month | ClosedBy::Owner => {}
        }
        c.push_conditions(&mut sql, self);
        sql.push(" GROUP BY 1, 2, 3");
        let rows = self.aggregate(&sql).await?;
        rows.iter().map(|r| tally(r, by == ClosedBy::Month, false)).collect()
    }

    /// Open deals expected to close in the period, by month ("YYYY-MM") and currency; `extra`
    /// is their weighted sum.
    pub async fn forecast_tallies(&self, c: &Coverage) -> Result<Vec<Tally>, ApiError> {
        let backend = self.db.backend();
        // The status is known (open), and left out of the columns read: what the statement reads
        // is then all in `deals_owner_forecast`, an index-only walk.
        let mut sql = Sql::new("SELECT SUBSTR(expected_close, 1, 7) AS k, CAST(");
        sql.literal(DealStatus::Open as i64).push(" AS BIGINT) AS status, currency, COUNT(*) AS n, ");
        sql.push(&backend.sum("amount")).push(" AS total, ");
        sql.push(&backend.sum("(amount * probability + 50) / 100"));
        sql.push(" AS extra FROM deals WHERE status = ").bind(DealStatus::Open as i64);
        sql.push(" AND expected_close >= ").bind(c.from_date.as_str());
        sql.push(" AND expected_close <= ").bind(c.to_date.as_str());
        c.push_conditions(&mut sql, self);
        sql.push(" GROUP BY 1, 2, 3");
        let rows = self.aggregate(&sql).await?;
        rows.iter().map(|r| tally(r, false, false)).collect()
    }
}
