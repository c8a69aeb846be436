//! What deals does with other services' events: an activity record logged on a deal in the
//! tasks service (a call, a meeting, a note) moves the deal's last activity time, from which a
//! deal in a stage with a rotting threshold rots (days without activity, SPEC D1).

use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_proto::tasks::v1::ActivityLogged;
use futures_util::future::BoxFuture;

use crate::store::Store;

/// The service whose activity records are deals' activity.
pub const TASKS_ROLE: &str = "tasks";
/// The services deals consumes the events of.
pub const CONSUMES: &[&str] = &[TASKS_ROLE];

/// The events deals consumes (its consumer group's handler). Each is one statement; a batch is
/// handled event by event (the default).
pub struct Intake {
    store: Store,
}

impl Intake {
    pub fn new(store: Store) -> Intake {
        Intake { store }
    }
}

impl Handler for Intake {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let Some(logged) = event.payload::<ActivityLogged>() else { return Ok(()) };
            let logged = logged.map_err(|e| format!("ActivityLogged does not decode: {e}"))?;
            if logged.deal_id.is_empty() {
                return Ok(());
            }
            let at = logged.occur_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
            self.store.record_activity(tx, &logged.deal_id, at).await?;
            Ok(())
        })
    }
}
