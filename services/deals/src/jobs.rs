//! Background work, safe with any number of replicas: each reminder of an instalment coming due
//! is a leased job (`crm_kit::jobs`) whose event commits with the job's completion, so that it
//! fires once even when a replica dies mid-way. A job finding the instalment paid, gone or due
//! on another day does nothing (the change that did so also replaced the job).

use crm_kit::db::Tx;
use crm_kit::events::HandlerError;
use crm_kit::jobs::{Job, JobHandler};
use futures_util::future::BoxFuture;

use crate::store::Store;

/// An instalment is due soon: its contract's owner hears of it (InstalmentDue).
pub struct InstalmentReminderJob {
    store: Store,
}

impl InstalmentReminderJob {
    pub fn new(store: Store) -> InstalmentReminderJob {
        InstalmentReminderJob { store }
    }
}

impl JobHandler for InstalmentReminderJob {
    fn run<'a>(&'a self, tx: &'a mut Tx, job: &'a Job) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let key = job.key.as_deref().ok_or("an instalment reminder without a key")?;
            let (contract_id, seq) = key.split_once('/').ok_or_else(|| format!("instalment reminder key {key:?}"))?;
            let seq: usize = seq.parse().map_err(|_| format!("instalment reminder key {key:?}"))?;
            let due_date = std::str::from_utf8(&job.payload)
                .map_err(|_| format!("job {} does not say which due date it is for", job.id))?;
            self.store.remind_instalment(tx, contract_id, seq, due_date).await?;
            Ok(())
        })
    }
}
