//! Every SQL statement of the tasks service, and nothing else. One implementation for both
//! backends (portable SQL, `$n` placeholders).
//!
//! - this module: tasks, with their reminders and escalation as leased jobs scheduled in the
//!   same transaction as the change that asks for them;
//! - [`activities`]: activity records and the supervision counts;
//! - [`calendar`]: meetings and calls, agendas and calendar feeds;
//! - [`comments`]: comments on tasks and activity records.
//!
//! What a caller sees is decided in each statement ([`Viewer`]): a task by its assignee's owner
//! scope or its creator, an activity record by its author's.

pub mod activities;
pub mod calendar;
pub mod comments;

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Backend, Db, Edit, Migrations, Sql, Tx, idempotency};
use crm_kit::events::Outbox;
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::jobs;
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::tasks::v1::{Task, TaskAssigned, TaskStatus};
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::domain::{self, NO_DUE};

pub fn migrations() -> Migrations {
    Migrations { postgres: sqlx::migrate!("migrations/postgres"), sqlite: sqlx::migrate!("migrations/sqlite") }
}

/// The job kind of a task's reminders (key `<task id>/<n>`, payload: the due time it was set
/// for).
pub const REMINDER_JOB: &str = "tasks.reminder";
/// The job kind of a task's escalation to the assignee's supervisor (key: the task id).
pub const ESCALATION_JOB: &str = "tasks.escalation";

/// Record types of idempotent creation.
const CREATED_TASK: i64 = 1;
pub(crate) const CREATED_ACTIVITY: i64 = 2;
pub(crate) const CREATED_COMMENT: i64 = 3;
pub(crate) const CREATED_EVENT: i64 = 4;

pub(crate) const TASK_COLUMNS: &str = "id, title, kind, status, priority, assignee_id, creator_id, due_at, deal_id, \
                            handover_needed, comment_count, created_at, updated_at, closed_at, version, doc";

/// Who is looking: their id and the owners their data scope allows.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub id: String,
    pub scope: OwnerScope,
}

impl Viewer {
    /// ` AND (creator_id = me OR assignee_id in scope)`: the tasks the viewer may see.
    fn push_tasks(&self, sql: &mut Sql, backend: Backend) {
        if let OwnerScope::All = self.scope {
            return;
        }
        sql.push(" AND (creator_id = ").bind(self.id.as_str()).push(" OR 1=1");
        self.scope.push_condition(sql, backend, "assignee_id");
        sql.push(")");
    }

    /// ` AND author_id in scope`: the activity records the viewer may see.
    fn push_authors(&self, sql: &mut Sql, backend: Backend) {
        self.scope.push_condition(sql, backend, "author_id");
    }
}

/// The filterable fields of ListTasks.
pub const TASK_FIELDS: &[Field] = &[
    Field { name: "assignee_id", column: "assignee_id", kind: FieldKind::Text },
    Field { name: "creator_id", column: "creator_id", kind: FieldKind::Text },
    Field {
        name: "status",
        column: "status",
        kind: FieldKind::Enum { prefix: "TASK_STATUS_", values: &[("OPEN", 1), ("DONE", 2), ("CANCELLED", 3)] },
    },
    Field {
        name: "priority",
        column: "priority",
        kind: FieldKind::Enum { prefix: "PRIORITY_", values: &[("LOW", 1), ("NORMAL", 2), ("HIGH", 3), ("URGENT", 4)] },
    },
    Field {
        name: "kind",
        column: "kind",
        kind: FieldKind::Enum { prefix: "TASK_KIND_", values: &[("TODO", 1), ("FOLLOW_UP", 2)] },
    },
    Field { name: "due_time", column: "due_at", kind: FieldKind::Time },
    Field { name: "create_time", column: "created_at", kind: FieldKind::Time },
    Field { name: "customer_id", column: "customer_id", kind: FieldKind::Text },
    Field { name: "deal_id", column: "deal_id", kind: FieldKind::Text },
    Field { name: "handover_needed", column: "handover_needed", kind: FieldKind::Bool },
];

/// The order of a task listing from `order_by`.
pub fn task_order(order_by: &str) -> Result<Order, ApiError> {
    let text = order_by.trim();
    let (name, desc) = match text.strip_suffix(" desc") {
        Some(name) => (name.trim(), true),
        None => (text.strip_suffix(" asc").unwrap_or(text).trim(), false),
    };
    let column = match name {
        "" | "due_time" => "due_at",
        "create_time" => "created_at",
        "update_time" => "updated_at",
        "priority" => "priority",
        other => {
            return Err(ApiError::invalid(
                "order_by",
                format!("cannot sort by {other:?}; use due_time, create_time, update_time or priority"),
            ));
        }
    };
    Ok(Order { column, tie: "id", text: false, desc })
}

/// A task listing, decoded.
#[derive(Debug, Clone)]
pub struct TaskQuery {
    pub filter: Option<Filter>,
    pub order: Order,
    pub page: Page,
    /// Only open tasks due before this time.
    pub overdue_at: Option<i64>,
}

pub(crate) fn decode_task(row: &AnyRow) -> Result<Task, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut task = Task::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored task {id} does not decode: {e}")))?;
    let due_at: i64 = row.try_get("due_at")?;
    task.title = row.try_get("title")?;
    task.kind = row.try_get::<i64, _>("kind")? as i32;
    task.status = row.try_get::<i64, _>("status")? as i32;
    task.priority = row.try_get::<i64, _>("priority")? as i32;
    task.assignee_id = row.try_get("assignee_id")?;
    task.creator_id = row.try_get("creator_id")?;
    task.due_time = if due_at == NO_DUE { None } else { to_timestamp(due_at) };
    task.deal_id = row.try_get("deal_id")?;
    task.handover_needed = row.try_get::<i64, _>("handover_needed")? != 0;
    task.comment_count = row.try_get::<i64, _>("comment_count")? as i32;
    task.create_time = to_timestamp(row.try_get("created_at")?);
    task.update_time = to_timestamp(row.try_get("updated_at")?);
    task.close_time = to_timestamp(row.try_get("closed_at")?);
    task.etag = row.try_get::<i64, _>("version")?.to_string();
    task.id = id;
    Ok(task)
}

/// The document of a task: what no column holds.
fn task_doc(task: &Task) -> Vec<u8> {
    Task {
        description: task.description.clone(),
        time_zone: task.time_zone.clone(),
        reminders: task.reminders.clone(),
        customer: task.customer.clone(),
        ..Task::default()
    }
    .encode_to_vec()
}

fn customer_id(task: &Task) -> &str {
    task.customer.as_ref().map_or("", |c| c.id.as_str())
}

/// What a change of a task asks of its jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// When each reminder fires (those already past are left out).
    pub reminders: Vec<i64>,
    /// When the escalation fires, if the task is open and has a due time.
    pub escalation: Option<i64>,
}

impl Schedule {
    /// The jobs an open `task` keeps: its reminders still ahead of `now`, and its escalation
    /// `grace` after its due time.
    pub fn of(task: &Task, reminder_times: &[i64], now: i64, grace_micros: i64) -> Schedule {
        if task.status != TaskStatus::Open as i32 {
            return Schedule::default();
        }
        let due = domain::due_at(task);
        Schedule {
            reminders: reminder_times.iter().copied().filter(|at| *at >= now).collect(),
            escalation: (due != NO_DUE).then(|| due.saturating_add(grace_micros)),
        }
    }
}

fn reminder_key(task_id: &str, n: usize) -> String {
    format!("{task_id}/{n}")
}

#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    outbox: Outbox,
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store { db, outbox: Outbox::new(crate::SOURCE) }
    }

    /// Publishes its events through `outbox` (the role's, which its relay watches).
    pub fn with_outbox(mut self, outbox: Outbox) -> Store {
        self.outbox = outbox;
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Replaces the task's pending jobs with those of `schedule`.
    async fn reschedule(tx: &mut Tx, task: &Task, schedule: &Schedule) -> Result<(), ApiError> {
        let reminder_keys: Vec<String> = (0..domain::MAX_REMINDERS).map(|n| reminder_key(&task.id, n)).collect();
        let mut waiting: Vec<(&str, &str)> = reminder_keys.iter().map(|k| (REMINDER_JOB, k.as_str())).collect();
        waiting.push((ESCALATION_JOB, task.id.as_str()));
        jobs::cancel_all(tx, &waiting).await?;
        let due = domain::due_at(task).to_string();
        let keys: Vec<String> = (0..schedule.reminders.len()).map(|n| reminder_key(&task.id, n)).collect();
        let reminders: Vec<(&str, i64, &[u8])> =
            keys.iter().zip(&schedule.reminders).map(|(k, at)| (k.as_str(), *at, due.as_bytes())).collect();
        jobs::schedule_all(tx, REMINDER_JOB, &reminders).await?;
        if let Some(at) = schedule.escalation {
            jobs::schedule(tx, ESCALATION_JOB, Some(&task.id), at, due.as_bytes()).await?;
        }
        Ok(())
    }

    async fn assigned(&self, tx: &mut Tx, task: &Task, previous: &str, actor: &str) -> Result<(), ApiError> {
        let tz = domain::zone(&task.time_zone).unwrap_or(chrono_tz::Tz::UTC);
        let due = domain::due_at(task);
        let event = TaskAssigned {
            task_id: task.id.clone(),
            title: task.title.clone(),
            assignee_id: task.assignee_id.clone(),
            previous_assignee_id: previous.to_string(),
            creator_id: task.creator_id.clone(),
            due_time: task.due_time,
            due_local: if due == NO_DUE { String::new() } else { domain::local_label(due, tz) },
            priority: task.priority,
            customer_name: task.customer.as_ref().map(|c| c.display_name.clone()).unwrap_or_default(),
        };
        self.outbox.append(tx, &task.id, actor, &event).await
    }

    /// The task `creator`'s earlier create with `request_id` made, if that call committed (see
    /// [`idempotency::earlier`]).
    pub async fn created_by_request(
        &self,
        creator: &str,
        request_id: &str,
        viewer: &Viewer,
    ) -> Result<Option<Task>, ApiError> {
        match idempotency::earlier(self.db.pool(), creator, request_id, CREATED_TASK).await? {
            Some(id) => self.get_task(&id, viewer).await.map(Some),
            None => Ok(None),
        }
    }

    /// Creates `task` (normalised, its assignee and customer checked) for `creator`, with the
    /// jobs of `schedule`. With a `request_id`, the creator's repeated call returns the task
    /// their first one created.
    pub async fn create_task(
        &self,
        mut task: Task,
        schedule: &Schedule,
        creator: &str,
        request_id: &str,
        viewer: &Viewer,
    ) -> Result<Task, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, creator, request_id, CREATED_TASK, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_task(&record_id, viewer).await;
        }
        task.id = id;
        self.insert_task(&mut tx, &mut task, schedule, creator, now).await?;
        tx.commit().await?;
        task.create_time = to_timestamp(now);
        task.update_time = to_timestamp(now);
        task.etag = "1".into();
        Ok(task)
    }

    /// Writes the new `task` (its id set) for `creator` in `tx`, with the jobs of `schedule`,
    /// and tells its assignee. What a deal's stage automation uses, in the transaction that
    /// marks its event handled.
    pub async fn insert_task(
        &self,
        tx: &mut Tx,
        task: &mut Task,
        schedule: &Schedule,
        creator: &str,
        now: i64,
    ) -> Result<(), ApiError> {
        task.creator_id = creator.to_string();
        task.status = TaskStatus::Open as i32;
        let mut sql = Sql::new(
            "INSERT INTO tasks (id, title, kind, status, priority, assignee_id, creator_id, due_at, customer_id, \
             deal_id, created_at, updated_at, version, doc) VALUES ",
        );
        sql.push_values([&*task], |v, t| {
            v.bind(t.id.as_str())
                .bind(t.title.as_str())
                .bind(i64::from(t.kind))
                .bind(i64::from(t.status))
                .bind(i64::from(t.priority))
                .bind(t.assignee_id.as_str())
                .bind(t.creator_id.as_str())
                .bind(domain::due_at(t))
                .bind(customer_id(t))
                .bind(t.deal_id.as_str())
                .bind(now)
                .bind(now)
                .bind(1_i64)
                .bind(task_doc(t));
        });
        sql.query().execute(&mut **tx).await?;
        Self::reschedule(tx, task, schedule).await?;
        self.assigned(tx, task, "", creator).await?;
        Ok(())
    }

    /// The statement reading the task `id` if the viewer may see it.
    fn select_task(&self, id: &str, viewer: &Viewer) -> Sql {
        let mut sql = Sql::new("SELECT ");
        sql.push(TASK_COLUMNS).push(" FROM tasks WHERE id = ").bind(id);
        viewer.push_tasks(&mut sql, self.db.backend());
        sql
    }

    /// The task `id` if the viewer may see it.
    pub async fn get_task(&self, id: &str, viewer: &Viewer) -> Result<Task, ApiError> {
        let row = self
            .select_task(id, viewer)
            .query()
            .fetch_optional(self.db.pool())
            .await?
            .ok_or_else(|| task_not_found(id))?;
        decode_task(&row)
    }

    /// Changes the task `id` under its row lock: `change` gets the task as stored and returns
    /// the jobs it should have from now on (`None`: keep them as they are). A new assignee
    /// is told (TaskAssigned) and clears the handover flag. ABORTED when `etag` is set and
    /// stale; an unchanged task is returned as it is.
    pub async fn edit_task(
        &self,
        id: &str,
        etag: &str,
        actor: &str,
        viewer: &Viewer,
        change: impl FnOnce(&mut Task, i64) -> Result<Option<Schedule>, ApiError>,
    ) -> Result<Task, ApiError> {
        let tx = self.db.begin_write().await?;
        let (mut edit, row) = Edit::lock(&self.db, tx, "tasks", "task", id, self.select_task(id, viewer)).await?;
        edit.require_etag(etag)?;
        let old = decode_task(&row)?;
        let mut task = old.clone();
        let now = now_micros();
        let schedule = change(&mut task, now)?;
        if task == old && schedule.is_none() {
            edit.abandon().await?;
            return Ok(old);
        }
        let reassigned = task.assignee_id != old.assignee_id;
        if reassigned {
            task.handover_needed = false;
        }
        let mut set = Sql::new("title = ");
        set.bind(task.title.as_str()).push(", kind = ").bind(i64::from(task.kind));
        set.push(", status = ").bind(i64::from(task.status)).push(", priority = ").bind(i64::from(task.priority));
        set.push(", assignee_id = ").bind(task.assignee_id.as_str());
        set.push(", due_at = ").bind(domain::due_at(&task)).push(", customer_id = ").bind(customer_id(&task));
        set.push(", deal_id = ").bind(task.deal_id.as_str());
        set.push(", handover_needed = ").bind(i64::from(task.handover_needed));
        let closed_at = task.close_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
        set.push(", closed_at = ").bind(closed_at).push(", doc = ").bind(task_doc(&task));
        let version = edit.save(set, now).await?;
        if let Some(schedule) = &schedule {
            Self::reschedule(edit.tx(), &task, schedule).await?;
        }
        if reassigned {
            self.assigned(edit.tx(), &task, &old.assignee_id, actor).await?;
        }
        edit.commit().await?;
        task.etag = version.to_string();
        task.update_time = to_timestamp(now);
        Ok(task)
    }

    /// Deletes the task `id` with its comments and pending jobs.
    pub async fn delete_task(&self, id: &str, etag: &str, viewer: &Viewer) -> Result<(), ApiError> {
        let tx = self.db.begin_write().await?;
        let (mut edit, row) = Edit::lock(&self.db, tx, "tasks", "task", id, self.select_task(id, viewer)).await?;
        edit.require_etag(etag)?;
        let task = decode_task(&row)?;
        Self::reschedule(edit.tx(), &task, &Schedule::default()).await?;
        comments::delete_of(edit.tx(), comments::Subject::Task, id).await?;
        edit.delete().await?;
        edit.commit().await
    }

    /// One page of the tasks the viewer may see.
    pub async fn list_tasks(&self, query: &TaskQuery, viewer: &Viewer) -> Result<(Vec<Task>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(TASK_COLUMNS).push(" FROM tasks WHERE 1=1");
        if let Some(filter) = &query.filter {
            filter.push_onto(&mut sql);
        }
        if let Some(at) = query.overdue_at {
            sql.push(" AND status = ").bind(TaskStatus::Open as i64).push(" AND due_at < ").bind(at);
        }
        viewer.push_tasks(&mut sql, self.db.backend());
        query.page.push_keyset(&mut sql, &query.order);
        let rows = sql.query_unprepared().fetch_all(self.db.pool()).await?;
        query.page.finish(&rows, &query.order, decode_task)
    }

    /// The open task `id` in `tx` if it is still due at `due_at` (what a reminder or an
    /// escalation was scheduled for).
    pub async fn due_task(&self, tx: &mut Tx, id: &str, due_at: i64) -> Result<Option<Task>, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(TASK_COLUMNS).push(" FROM tasks WHERE id = ").bind(id);
        sql.push(" AND status = ").bind(TaskStatus::Open as i64).push(" AND due_at = ").bind(due_at);
        match sql.query().fetch_optional(&mut **tx).await? {
            Some(row) => Ok(Some(decode_task(&row)?)),
            None => Ok(None),
        }
    }

    /// Publishes `event` about `subject` in `tx` (a job's effect).
    pub async fn publish<E: prost::Name>(&self, tx: &mut Tx, subject: &str, event: &E) -> Result<(), ApiError> {
        self.outbox.append(tx, subject, crate::SOURCE, event).await
    }

    /// Flags the open tasks of a deactivated user for handover; how many.
    pub async fn flag_handover(&self, tx: &mut Tx, user_id: &str) -> Result<u64, ApiError> {
        let mut sql = Sql::new("UPDATE tasks SET handover_needed = 1, version = version + 1, updated_at = ");
        sql.bind(now_micros()).push(" WHERE assignee_id = ").bind(user_id);
        sql.push(" AND status = ").bind(TaskStatus::Open as i64).push(" AND handover_needed = 0");
        Ok(sql.query().execute(&mut **tx).await?.rows_affected())
    }
}

pub(crate) fn task_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("task {id} not found"))
}
