//! What contacts does with other services' events (SPEC C8): an activity record logged in the
//! tasks service moves its customer's last activity time and summary, so that "not contacted
//! for 90 days" is a filter over true data; a deal won (or won no more) in the deals service
//! changes its customers' purchase history.

use crm_kit::db::Tx;
use crm_kit::events::{Delivered, Handler, HandlerError};
use crm_proto::deals::v1::{DealWinUndone, DealWon};
use crm_proto::tasks::v1::ActivityLogged;
use futures_util::future::BoxFuture;

use crate::domain::Kind;
use crate::store::{LastActivity, Purchase, Store};

/// The service whose activity records move customers' last activity.
pub const TASKS_ROLE: &str = "tasks";
/// The service whose won deals make customers' purchase history.
pub const DEALS_ROLE: &str = "deals";
/// The services contacts consumes the events of.
pub const CONSUMES: &[&str] = &[TASKS_ROLE, DEALS_ROLE];

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

/// The purchase-history changes `events` report, in their order.
fn purchases(events: &[&Delivered]) -> Result<Vec<Purchase>, HandlerError> {
    let mut out = Vec::new();
    let customers = |company: &str, person: &str| {
        let mut found = Vec::new();
        if !company.is_empty() {
            found.push((Kind::Company, company.to_string()));
        }
        if !person.is_empty() {
            found.push((Kind::Person, person.to_string()));
        }
        found
    };
    for event in events {
        if let Some(won) = event.payload::<DealWon>() {
            let won = won.map_err(|e| format!("DealWon does not decode: {e}"))?;
            let (currency, amount) = won.amount.map(|m| (m.currency_code, m.minor_units)).unwrap_or_default();
            let at = won.close_time.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
            for (kind, id) in customers(&won.company_id, &won.person_id) {
                out.push(Purchase::Won {
                    kind,
                    id,
                    deal_id: won.deal_id.clone(),
                    currency: currency.clone(),
                    amount,
                    at,
                });
            }
        } else if let Some(undone) = event.payload::<DealWinUndone>() {
            let undone = undone.map_err(|e| format!("DealWinUndone does not decode: {e}"))?;
            for (kind, id) in customers(&undone.company_id, &undone.person_id) {
                out.push(Purchase::Undone { kind, id, deal_id: undone.deal_id.clone() });
            }
        }
    }
    Ok(out)
}

impl Intake {
    /// The last activities and purchase-history changes of `events`, applied in `tx`.
    async fn apply(&self, tx: &mut Tx, events: &[&Delivered]) -> Result<(), HandlerError> {
        let activities = Self::activities(events)?;
        self.store.record_activities(tx, &activities).await?;
        self.store.record_purchases(tx, &purchases(events)?).await?;
        Ok(())
    }
}

impl Handler for Intake {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move { self.apply(tx, &[event]).await })
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Delivered],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.apply(tx, events))
    }
}
