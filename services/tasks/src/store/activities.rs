//! Activity records: logged once, listed newest first through the caller's scope, counted per
//! author and day in one aggregate.

use crm_kit::ApiError;
use crm_kit::db::{Sql, idempotency};
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::time::{from_timestamp, now_micros, to_timestamp};
use crm_proto::tasks::v1::{Activity, ActivityLogged, DayCounts};
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{CREATED_ACTIVITY, Store, Viewer};

const COLUMNS: &str = "id, kind, author_id, department_id, customer_id, deal_id, task_id, occurred_at, occur_date, comment_count, \
     created_at, doc";

/// The filterable fields of ListActivities.
pub const FIELDS: &[Field] = &[
    Field {
        name: "type",
        column: "kind",
        kind: FieldKind::Enum {
            prefix: "ACTIVITY_TYPE_",
            values: &[("CALL", 1), ("EMAIL", 2), ("MEETING", 3), ("VISIT", 4), ("MESSAGE", 5), ("NOTE", 6)],
        },
    },
    Field { name: "author_id", column: "author_id", kind: FieldKind::Text },
    Field { name: "department_id", column: "department_id", kind: FieldKind::Text },
    Field { name: "customer_id", column: "customer_id", kind: FieldKind::Text },
    Field { name: "deal_id", column: "deal_id", kind: FieldKind::Text },
    Field { name: "task_id", column: "task_id", kind: FieldKind::Text },
    Field { name: "occur_time", column: "occurred_at", kind: FieldKind::Time },
    Field { name: "occur_date", column: "occur_date", kind: FieldKind::Text },
];

/// Newest first.
pub const ORDER: Order = Order::newest("occurred_at");

/// An activity listing, decoded.
#[derive(Debug, Clone)]
pub struct ActivityQuery {
    pub filter: Option<Filter>,
    pub page: Page,
}

/// What CountActivities counts.
#[derive(Debug, Clone, Default)]
pub struct CountQuery {
    /// First and last day, YYYY-MM-DD, inclusive.
    pub start_date: String,
    pub end_date: String,
    pub department_id: String,
    pub author_ids: Vec<String>,
}

fn decode(row: &AnyRow) -> Result<Activity, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut a = Activity::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored activity record {id} does not decode: {e}")))?;
    a.r#type = row.try_get::<i64, _>("kind")? as i32;
    a.author_id = row.try_get("author_id")?;
    a.department_id = row.try_get("department_id")?;
    a.deal_id = row.try_get("deal_id")?;
    a.task_id = row.try_get("task_id")?;
    a.occur_time = to_timestamp(row.try_get("occurred_at")?);
    a.occur_date = row.try_get("occur_date")?;
    a.comment_count = row.try_get::<i64, _>("comment_count")? as i32;
    a.create_time = to_timestamp(row.try_get("created_at")?);
    a.id = id;
    Ok(a)
}

fn doc(a: &Activity) -> Vec<u8> {
    Activity {
        summary: a.summary.clone(),
        outcome: a.outcome.clone(),
        time_zone: a.time_zone.clone(),
        customer: a.customer.clone(),
        ..Activity::default()
    }
    .encode_to_vec()
}

pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("activity record {id} not found"))
}

impl Store {
    /// Logs `activity` (normalised, its customer and task checked) by `author` of
    /// `department_id`, and publishes it. With a `request_id`, the author's repeated call
    /// returns the record their first one logged.
    pub async fn log_activity(
        &self,
        mut activity: Activity,
        author: &str,
        department_id: &str,
        request_id: &str,
        viewer: &Viewer,
    ) -> Result<Activity, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, author, request_id, CREATED_ACTIVITY, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_activity(&record_id, viewer).await;
        }
        activity.id = id;
        activity.author_id = author.to_string();
        activity.department_id = department_id.to_string();
        let occurred_at = activity.occur_time.as_ref().map(from_timestamp).unwrap_or(now);
        let customer = activity.customer.clone().unwrap_or_default();
        let mut sql = Sql::new(
            "INSERT INTO activities (id, kind, author_id, department_id, customer_id, deal_id, task_id, occurred_at, \
             occur_date, created_at, doc) VALUES ",
        );
        sql.push_values([&activity], |v, a| {
            v.bind(a.id.as_str())
                .bind(i64::from(a.r#type))
                .bind(a.author_id.as_str())
                .bind(a.department_id.as_str())
                .bind(customer.id.as_str())
                .bind(a.deal_id.as_str())
                .bind(a.task_id.as_str())
                .bind(occurred_at)
                .bind(a.occur_date.as_str())
                .bind(now)
                .bind(doc(a));
        });
        sql.query().execute(&mut *tx).await?;
        let event = ActivityLogged {
            activity_id: activity.id.clone(),
            r#type: activity.r#type,
            summary: activity.summary.clone(),
            occur_time: activity.occur_time,
            author_id: author.to_string(),
            customer_type: customer.record_type,
            customer_id: customer.id.clone(),
            deal_id: activity.deal_id.clone(),
        };
        self.outbox.append(&mut tx, &activity.id, author, &event).await?;
        tx.commit().await?;
        activity.create_time = to_timestamp(now);
        Ok(activity)
    }

    /// Loads activity records as they are, in multi-row statements of one transaction (a bulk
    /// load of history, a benchmark's volume): no events are published and nothing is checked,
    /// so the caller owns their validity (normalised, ids and dates set). How many were written.
    pub async fn load_activities(&self, activities: &[Activity]) -> Result<u64, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let now = now_micros();
        for chunk in activities.chunks(500) {
            let mut sql = Sql::new(
                "INSERT INTO activities (id, kind, author_id, department_id, customer_id, deal_id, task_id, \
                 occurred_at, occur_date, created_at, doc) VALUES ",
            );
            sql.push_values(chunk, |v, a| {
                v.bind(a.id.as_str())
                    .bind(i64::from(a.r#type))
                    .bind(a.author_id.as_str())
                    .bind(a.department_id.as_str())
                    .bind(a.customer.as_ref().map_or("", |c| c.id.as_str()))
                    .bind(a.deal_id.as_str())
                    .bind(a.task_id.as_str())
                    .bind(a.occur_time.as_ref().map(from_timestamp).unwrap_or(now))
                    .bind(a.occur_date.as_str())
                    .bind(now)
                    .bind(doc(a));
            });
            sql.query().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(activities.len() as u64)
    }

    /// How many activity records are stored.
    pub async fn count_activity_records(&self) -> Result<i64, ApiError> {
        Ok(Sql::new("SELECT COUNT(*) AS n FROM activities").query().fetch_one(self.db.pool()).await?.try_get("n")?)
    }

    /// The activity record `id` if the viewer may see it.
    pub async fn get_activity(&self, id: &str, viewer: &Viewer) -> Result<Activity, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM activities WHERE id = ").bind(id);
        viewer.push_authors(&mut sql, self.db.backend());
        let row = sql.query().fetch_optional(self.db.pool()).await?.ok_or_else(|| not_found(id))?;
        decode(&row)
    }

    /// One page of the activity records the viewer may see, newest first.
    pub async fn list_activities(
        &self,
        query: &ActivityQuery,
        viewer: &Viewer,
    ) -> Result<(Vec<Activity>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM activities WHERE 1=1");
        if let Some(filter) = &query.filter {
            filter.push_onto(&mut sql);
        }
        viewer.push_authors(&mut sql, self.db.backend());
        query.page.push_keyset(&mut sql, &ORDER);
        let rows = sql.query_unprepared().fetch_all(self.db.pool()).await?;
        query.page.finish(&rows, &ORDER, decode)
    }

    /// Per author and day, the records of each type the viewer may see: one aggregate,
    /// answered from an index on (department or author, day).
    pub async fn count_activities(&self, query: &CountQuery, viewer: &Viewer) -> Result<Vec<DayCounts>, ApiError> {
        let mut sql = Sql::new("SELECT author_id, occur_date");
        for (n, name) in [(1, "calls"), (2, "emails"), (3, "meetings"), (4, "visits"), (5, "messages"), (6, "notes")] {
            sql.push(", SUM(CASE WHEN kind = ").literal(n).push(" THEN 1 ELSE 0 END) AS ").push(name);
        }
        sql.push(", COUNT(*) AS total FROM activities WHERE occur_date >= ").bind(query.start_date.as_str());
        sql.push(" AND occur_date <= ").bind(query.end_date.as_str());
        if !query.department_id.is_empty() {
            sql.push(" AND department_id = ").bind(query.department_id.as_str());
        }
        if !query.author_ids.is_empty() {
            sql.push(" AND ").push_in("author_id", query.author_ids.iter().map(String::as_str));
        }
        // Many rows filtered: the scope as a hashed set. Grouped without an order (a hash
        // aggregate, no sort of every row); the groups are put in order here.
        viewer.scope.push_set_condition(&mut sql, self.db.backend(), "author_id");
        sql.push(" GROUP BY author_id, occur_date");
        let rows = sql.query_unprepared().fetch_all(self.db.pool()).await?;
        let count = |row: &AnyRow, name: &str| -> Result<i32, ApiError> { Ok(row.try_get::<i64, _>(name)? as i32) };
        let mut days = rows
            .iter()
            .map(|row| {
                Ok(DayCounts {
                    author_id: row.try_get("author_id")?,
                    date: row.try_get("occur_date")?,
                    calls: count(row, "calls")?,
                    emails: count(row, "emails")?,
                    meetings: count(row, "meetings")?,
                    visits: count(row, "visits")?,
                    messages: count(row, "messages")?,
                    notes: count(row, "notes")?,
                    total: count(row, "total")?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        days.sort_unstable_by(|a, b| (&a.author_id, &a.date).cmp(&(&b.author_id, &b.date)));
        Ok(days)
    }
}
