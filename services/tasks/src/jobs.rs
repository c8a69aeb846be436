//! Background work, safe with any number of replicas: each reminder and each escalation is a
//! leased job (`crm_kit::jobs`) whose event commits with the job's completion, so it fires once
//! even when a replica dies mid-way. A job finding its task closed, or due at another time than
//! it was scheduled for, does nothing (the change that did so also replaced the job).

use std::sync::Arc;

use chrono_tz::Tz;
use crm_kit::auth::RemoteDirectory;
use crm_kit::db::Tx;
use crm_kit::events::HandlerError;
use crm_kit::jobs::{Job, JobHandler};
use crm_proto::tasks::v1::{Task, TaskOverdue, TaskReminderDue};
use futures_util::future::BoxFuture;

use crate::domain;
use crate::store::Store;

/// The task a job is about, and the due time it was scheduled for.
fn target(job: &Job) -> Result<(&str, i64), HandlerError> {
    let key = job.key.as_deref().ok_or("a task job without a key")?;
    let task_id = key.split('/').next().unwrap_or(key);
    let due_at = std::str::from_utf8(&job.payload)
        .ok()
        .and_then(|p| p.parse::<i64>().ok())
        .ok_or_else(|| format!("job {} does not say which due time it is for", job.id))?;
    Ok((task_id, due_at))
}

fn due_local(task: &Task) -> String {
    let tz = domain::zone(&task.time_zone).unwrap_or(Tz::UTC);
    domain::local_label(domain::due_at(task), tz)
}

fn customer_name(task: &Task) -> String {
    task.customer.as_ref().map(|c| c.display_name.clone()).unwrap_or_default()
}

/// A reminder came due: the assignee hears of it (TaskReminderDue).
pub struct ReminderJob {
    store: Store,
}

impl ReminderJob {
    pub fn new(store: Store) -> ReminderJob {
        ReminderJob { store }
    }
}

impl JobHandler for ReminderJob {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let (task_id, due_at) = target(job)?;
            let Some(task) = self.store.due_task(tx, task_id, due_at).await? else { return Ok(()) };
            let event = TaskReminderDue {
                task_id: task.id.clone(),
                title: task.title.clone(),
                assignee_id: task.assignee_id.clone(),
                due_time: task.due_time,
                due_local: due_local(&task),
                customer_name: customer_name(&task),
            };
            self.store.publish(tx, &task.id, &event).await?;
            Ok(())
        })
    }
}

/// A task stayed open past its due time and the grace period: the assignee's supervisor hears
/// of it (TaskOverdue; notifications finds the supervisor).
pub struct EscalationJob {
    store: Store,
    directory: Option<Arc<RemoteDirectory>>,
}

impl EscalationJob {
    /// `directory` names the assignee in the event; without it the name is left empty.
    pub fn new(store: Store, directory: Option<Arc<RemoteDirectory>>) -> EscalationJob {
        EscalationJob { store, directory }
    }
}

impl JobHandler for EscalationJob {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let (task_id, due_at) = target(job)?;
            let Some(task) = self.store.due_task(tx, task_id, due_at).await? else { return Ok(()) };
            let assignee_name = match &self.directory {
                Some(directory) => directory.user(&task.assignee_id).await?.map(|u| u.display_name).unwrap_or_default(),
                None => String::new(),
            };
            let event = TaskOverdue {
                task_id: task.id.clone(),
                title: task.title.clone(),
                assignee_id: task.assignee_id.clone(),
                assignee_name,
                due_time: task.due_time,
                due_local: due_local(&task),
                kind: task.kind,
                customer_name: customer_name(&task),
            };
            self.store.publish(tx, &task.id, &event).await?;
            Ok(())
        })
    }
}
