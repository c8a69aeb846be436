//! The transactional outbox: events are rows of the producer's own database, written by the
//! transaction that makes the change.

use std::sync::Arc;

use crm_proto::events::v1::Envelope;
use prost::Message;
use tokio::sync::Notify;

use crate::ApiError;
use crate::db::{Sql, Tx};
use crate::time::now_micros;

/// Where a service's changes leave their events.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: &'static str,
    appended: Arc<Notify>,
}

impl Outbox {
    /// The outbox of `source` (the producing service's name). A role gets its own from
    /// [`super::Events::outbox`], which also tells the relay when something is appended.
    pub fn new(source: &'static str) -> Outbox {
        Outbox { source, appended: Arc::new(Notify::new()) }
    }

    pub fn source(&self) -> &'static str {
        self.source
    }

    pub(crate) fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    /// Writes `event` about `subject`, caused by `actor`, in `tx`: it is published once `tx`
    /// commits, and never if it rolls back.
    pub async fn append<E: prost::Name>(
        &self,
        tx: &mut Tx,
        subject: &str,
        actor: &str,
        event: &E,
    ) -> Result<(), ApiError> {
        self.append_all(tx, &[super::envelope::envelope(self.source, subject, actor, event)]).await
    }

    /// Writes several events (built with [`super::envelope::envelope`]) in one statement per 500.
    pub async fn append_all(&self, tx: &mut Tx, events: &[Envelope]) -> Result<(), ApiError> {
        if events.is_empty() {
            return Ok(());
        }
        let now = now_micros();
        for chunk in events.chunks(500) {
            let mut sql = Sql::new("INSERT INTO outbox (event_id, event_type, created_at, envelope) VALUES ");
            sql.push_values(chunk, |v, envelope| {
                v.bind(envelope.id.as_str()).bind(envelope.r#type.as_str()).bind(now).bind(envelope.encode_to_vec());
            });
            sql.query().execute(&mut **tx).await?;
        }
        self.appended.notify_one();
        Ok(())
    }
}
