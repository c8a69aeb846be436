//! What contacts does with other services' events: an activity record logged in the tasks
//! service moves its customer's last activity time and summary (SPEC C8), so that "not
//! contacted for 90 days" is a filter over true data.

use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_proto::tasks::v1::ActivityLogged;
use futures_util::future::BoxFuture;

use crate::domain::Kind;
use crate::store::{LastActivity, Store};

/// The service whose activity records move customers' last activity.
pub const TASKS_ROLE: &str = "tasks";

/// The events contacts consumes (its consumer group's handler).
pub struct Intake {
    store: Store,
}

impl Intake {
    pub fn new(store: Store) -> Intake {
        Intake { store }
    }

    /// The last activities `events` report, the newest per customer.
    fn activities(events: &[&Delivered]) -> Result<Vec<LastActivity>, HandlerError> {
        let mut out: Vec<LastActivity> = Vec::new();
        for event in events {
            let Some(logged) = event.payload::<ActivityLogged>() else { continue };
            let logged = logged.map_err(|e| format!("ActivityLogged does not decode: {e}"))?;
            let Some(kind) = Kind::from_record_type(i64::from(logged.customer_type)) else { continue };
            if logged.customer_id.is_empty() {
                continue;
            }
            let at = logged.occur_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
            match out.iter_mut().find(|a| a.kind == kind && a.id == logged.customer_id) {
                Some(seen) if seen.at >= at => {}
                Some(seen) => {
                    seen.at = at;
                    seen.summary = logged.summary;
                }
                None => out.push(LastActivity { kind, id: logged.customer_id, at, summary: logged.summary }),
            }
        }
        Ok(out)
    }
}

impl Handler for Intake {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let activities = Self::activities(&[event])?;
            self.store.record_activities(tx, &activities).await?;
            Ok(())
        })
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Delivered],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let activities = Self::activities(events)?;
            self.store.record_activities(tx, &activities).await?;
            Ok(())
        })
    }
}
