//! Targets (D7): goals per user or department, month or quarter, metric and currency, and what
//! was achieved against them — summed in the database from won deals or payments received.

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::Sql;
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::deals::v1::{DealStatus, Money, Target, TargetMetric};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;

const COLUMNS: &str = "id, user_id, department_id, period, metric, currency, amount, time_zone, created_at, updated_at";

fn decode(row: &AnyRow) -> Result<Target, ApiError> {
    let currency: String = row.try_get("currency")?;
    Ok(Target {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        department_id: row.try_get("department_id")?,
        period: row.try_get("period")?,
        metric: row.try_get::<i64, _>("metric")? as i32,
        amount: Some(Money { currency_code: currency, minor_units: row.try_get("amount")? }),
        time_zone: row.try_get("time_zone")?,
        create_time: to_timestamp(row.try_get("created_at")?),
        update_time: to_timestamp(row.try_get("updated_at")?),
        ..Default::default()
    })
}

/// What a target's achievement is counted over.
#[derive(Debug, Clone)]
pub struct Window {
    /// Epoch microseconds, `from` included, `to` not (when deals were won).
    pub from: i64,
    pub to: i64,
    /// The same as days, both included (when payments were received).
    pub start_date: String,
    pub end_date: String,
}

impl Store {
    /// Sets `target` (checked): a new one, or the amount and time zone of the one with its user
    /// or department, period, metric and currency.
    pub async fn set_target(&self, target: &Target) -> Result<Target, ApiError> {
        let now = now_micros();
        let (currency, amount) =
            target.amount.as_ref().map_or((String::new(), 0), |m| (m.currency_code.clone(), m.minor_units));
        let mut sql = Sql::new("INSERT INTO targets (");
        sql.push(COLUMNS).push(") VALUES ");
        sql.push_values([target], |v, t| {
            v.bind(crm_kit::id::new()).bind(t.user_id.as_str()).bind(t.department_id.as_str()).bind(t.period.as_str());
            v.bind(i64::from(t.metric)).bind(currency.as_str()).bind(amount).bind(t.time_zone.as_str());
            v.bind(now).bind(now);
        });
        sql.push(
            " ON CONFLICT (user_id, department_id, period, metric, currency) DO UPDATE SET amount = excluded.amount, \
             time_zone = excluded.time_zone, updated_at = excluded.updated_at RETURNING ",
        );
        sql.push(COLUMNS);
        let row = sql.query().fetch_one(self.db.pool()).await?;
        decode(&row)
    }

    /// The target `id`, whoever's it is (the caller checks who may see it).
    pub async fn get_target(&self, id: &str) -> Result<Target, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM targets WHERE id = ").bind(id);
        let row = sql.query().fetch_optional(self.db.pool()).await?;
        decode(&row.ok_or_else(|| ApiError::NotFound(format!("target {id} not found")))?)
    }

    pub async fn delete_target(&self, id: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("DELETE FROM targets WHERE id = ");
        sql.bind(id);
        sql.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// The users' targets `scope` covers and every department target, narrowed by user,
    /// department and period (each optional), by period.
    pub async fn list_targets(
        &self,
        user_id: &str,
        department_id: &str,
        period: &str,
        scope: &OwnerScope,
    ) -> Result<Vec<Target>, ApiError> {
        let mut out = Vec::new();
        for users in [true, false] {
            // Narrowed to a user, no department's targets; to a department, no user's.
            if (users && !department_id.is_empty()) || (!users && !user_id.is_empty()) {
                continue;
            }
            let mut sql = Sql::new("SELECT ");
            sql.push(COLUMNS).push(" FROM targets WHERE ");
            if users {
                sql.push("user_id <> ''");
                if !user_id.is_empty() {
                    sql.push(" AND user_id = ").bind(user_id);
                }
                scope.push_condition(&mut sql, self.db.backend(), "user_id");
            } else {
                sql.push("department_id <> ''");
                if !department_id.is_empty() {
                    sql.push(" AND department_id = ").bind(department_id);
                }
            }
            if !period.is_empty() {
                sql.push(" AND period = ").bind(period);
            }
            sql.push(" ORDER BY period, id");
            for row in sql.query().fetch_all(self.db.pool()).await? {
                out.push(decode(&row)?);
            }
        }
        Ok(out)
    }

    /// What `owners` achieved of `metric` in `currency` over `window`: the amounts of the deals
    /// they won, or the payments received on their contracts.
    pub async fn achieved(
        &self,
        metric: TargetMetric,
        currency: &str,
        owners: &OwnerScope,
        window: &Window,
    ) -> Result<i64, ApiError> {
        let backend = self.db.backend();
        let mut sql = Sql::new("SELECT ");
        match metric {
            TargetMetric::PaymentsReceived => {
                sql.push(&backend.sum("p.amount"))
                    .push(" AS total FROM payments p JOIN contracts c ON c.id = p.contract_id");
                sql.push(" WHERE c.currency = ").bind(currency);
                sql.push(" AND p.received_date >= ").bind(window.start_date.as_str());
                sql.push(" AND p.received_date <= ").bind(window.end_date.as_str());
                owners.push_set_condition(&mut sql, backend, "c.owner_id");
            }
            _ => {
                sql.push(&backend.sum("amount")).push(" AS total FROM deals WHERE status = ");
                sql.bind(DealStatus::Won as i64).push(" AND currency = ").bind(currency);
                sql.push(" AND closed_at >= ").bind(window.from).push(" AND closed_at < ").bind(window.to);
                owners.push_set_condition(&mut sql, backend, "owner_id");
            }
        }
        let row = sql.query_unprepared().fetch_one(self.db.pool()).await?;
        Ok(row.try_get::<Option<i64>, _>("total")?.unwrap_or(0))
    }
}
