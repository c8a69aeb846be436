//! What tasks does with other services' events:
//! - a deactivated user's open tasks are flagged for handover (SPEC A5; the handover itself, to
//!   a successor, comes with the contacts handover);
//! - a deal entering a stage whose automations ask for a task gets one, for its owner (SPEC D4):
//!   made in the transaction that marks the event handled, so once per entry.

use crm_kit::auth::AUTH_ROLE;
use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_proto::auth::v1::UserDeactivated;
use crm_proto::contacts::v1::RecordType;
use crm_proto::deals::v1::{DealStageChanged, automation};
use crm_proto::tasks::v1::{CustomerRef, Priority, Task, TaskKind, TaskStatus};
use futures_util::future::BoxFuture;

use crate::store::{Schedule, Store};

/// The deals service: its stage automations.
pub const DEALS_ROLE: &str = "deals";

/// The services whose events tasks consumes.
pub const CONSUMES: &[&str] = &[AUTH_ROLE, DEALS_ROLE];

pub struct Intake {
    store: Store,
    grace: i64,
}

impl Intake {
    /// `grace_micros`: how long after its due time an automation's task escalates.
    pub fn new(store: Store, grace_micros: i64) -> Intake {
        Intake { store, grace: grace_micros }
    }

    /// The tasks a deal's entry into a stage asks for.
    async fn automate(&self, tx: &mut Tx, event: &Delivered, entry: DealStageChanged) -> Result<(), HandlerError> {
        let at =
            event.envelope.time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or_else(crm_kit::time::now_micros);
        for automation in &entry.automations {
            let Some(automation::Action::CreateTask(template)) = &automation.action else { continue };
            let customer = if !entry.person_id.is_empty() {
                Some(CustomerRef {
                    record_type: RecordType::Person as i32,
                    id: entry.person_id.clone(),
                    ..Default::default()
                })
            } else if !entry.company_id.is_empty() {
                Some(CustomerRef {
                    record_type: RecordType::Company as i32,
                    id: entry.company_id.clone(),
                    ..Default::default()
                })
            } else {
                None
            };
            let due = at + i64::from(template.due_in_days.clamp(0, 365)) * 86_400_000_000;
            let mut task = Task {
                id: crm_kit::id::new(),
                title: crm_kit::validate::clip(template.title.clone(), crate::domain::MAX_TITLE),
                description: crm_kit::validate::clip(template.description.clone(), crate::domain::MAX_TEXT),
                kind: TaskKind::Todo as i32,
                priority: Priority::Normal as i32,
                status: TaskStatus::Open as i32,
                assignee_id: entry.owner_id.clone(),
                due_time: crm_kit::time::to_timestamp(due),
                time_zone: "UTC".into(),
                customer,
                deal_id: entry.deal_id.clone(),
                ..Default::default()
            };
            let now = crm_kit::time::now_micros();
            let schedule = Schedule::of(&task, &[], now, self.grace);
            let creator =
                if event.envelope.actor.is_empty() { entry.owner_id.clone() } else { event.envelope.actor.clone() };
            self.store.insert_task(tx, &mut task, &schedule, &creator, now).await?;
        }
        Ok(())
    }
}

impl Handler for Intake {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if let Some(entry) = event.payload::<DealStageChanged>() {
                let entry = entry.map_err(|e| format!("DealStageChanged does not decode: {e}"))?;
                return self.automate(tx, event, entry).await;
            }
            let Some(deactivated) = event.payload::<UserDeactivated>() else { return Ok(()) };
            let deactivated = deactivated.map_err(|e| format!("UserDeactivated does not decode: {e}"))?;
            let flagged = self.store.flag_handover(tx, &deactivated.user_id).await?;
            if flagged > 0 {
                tracing::info!(user = %deactivated.user_id, tasks = flagged, "open tasks of a deactivated user flagged for handover");
            }
            Ok(())
        })
    }
}
