//! What tasks does with other services' events: a deactivated user's open tasks are flagged for
//! handover (SPEC A5); the handover itself, to a successor, comes with the contacts handover.

use crm_kit::auth::AUTH_ROLE;
use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_proto::auth::v1::UserDeactivated;
use futures_util::future::BoxFuture;

use crate::store::Store;

/// The services whose events tasks consumes.
pub const CONSUMES: &[&str] = &[AUTH_ROLE];

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
