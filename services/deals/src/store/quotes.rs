//! Quotes (D5): versioned offers on a deal — numbered per deal, their state and total as columns
//! beside a document (lines, tax, validity, notes). A quote is seen through its deal: every
//! statement reads it only among the deals the caller's scope allows.

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Edit, Sql, Tx, idempotency};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::deals::v1::{Money, Quote, QuoteState};
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{CREATED_QUOTE, Store};

const COLUMNS: &str = "id, deal_id, quote_no, state, currency, total, created_at, updated_at, version, doc";

/// A deal's quotes, newest version first.
pub const ORDER: Order = Order { column: "quote_no", tie: "id", text: false, desc: true };

fn decode(row: &AnyRow) -> Result<Quote, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut q = Quote::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored quote {id} does not decode: {e}")))?;
    q.deal_id = row.try_get("deal_id")?;
    q.version = row.try_get::<i64, _>("quote_no")? as i32;
    q.state = row.try_get::<i64, _>("state")? as i32;
    q.currency_code = row.try_get("currency")?;
    q.total = Some(Money { currency_code: q.currency_code.clone(), minor_units: row.try_get("total")? });
    q.create_time = to_timestamp(row.try_get("created_at")?);
    q.update_time = to_timestamp(row.try_get("updated_at")?);
    q.etag = row.try_get::<i64, _>("version")?.to_string();
    q.id = id;
    Ok(q)
}

fn doc(q: &Quote) -> Vec<u8> {
    Quote {
        line_items: q.line_items.clone(),
        tax_rate_bps: q.tax_rate_bps,
        subtotal: q.subtotal.clone(),
        tax: q.tax.clone(),
        valid_until: q.valid_until.clone(),
        notes: q.notes.clone(),
        ..Quote::default()
    }
    .encode_to_vec()
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("quote {id} not found"))
}

impl Store {
    /// The quote `id` among the deals `scope` allows.
    fn select_quote(&self, id: &str, scope: &OwnerScope) -> Sql {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM quotes WHERE id = ").bind(id);
        sql.push(" AND deal_id IN (SELECT id FROM deals WHERE 1=1");
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        sql.push(")");
        sql
    }

    /// The deal `id` if `scope` allows it, locked in `tx` (its quotes are numbered under it).
    async fn lock_deal_for_quote(&self, tx: &mut Tx, deal_id: &str, scope: &OwnerScope) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT id FROM deals WHERE id = ");
        sql.bind(deal_id);
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        sql.push(self.db.for_update());
        match sql.query().fetch_optional(&mut **tx).await? {
            Some(_) => Ok(()),
            None => Err(ApiError::NotFound(format!("deal {deal_id} not found"))),
        }
    }

    /// Adds `quote` (priced) as its deal's next version, a draft.
    pub async fn create_quote(
        &self,
        mut quote: Quote,
        actor: &str,
        request_id: &str,
        scope: &OwnerScope,
    ) -> Result<Quote, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, actor, request_id, CREATED_QUOTE, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_quote(&record_id, scope).await;
        }
        self.lock_deal_for_quote(&mut tx, &quote.deal_id, scope).await?;
        let mut next = Sql::new("SELECT COALESCE(MAX(quote_no), 0) + 1 AS n FROM quotes WHERE deal_id = ");
        next.bind(quote.deal_id.as_str());
        let number: i64 = next.query().fetch_one(&mut *tx).await?.try_get("n")?;
        quote.id = id;
        quote.state = QuoteState::Draft as i32;
        let total = quote.total.as_ref().map_or(0, |m| m.minor_units);
        let mut sql = Sql::new("INSERT INTO quotes (");
        sql.push(COLUMNS).push(") VALUES ");
        sql.push_values([&quote], |v, q| {
            v.bind(q.id.as_str()).bind(q.deal_id.as_str()).bind(number).bind(i64::from(q.state));
            v.bind(q.currency_code.as_str()).bind(total).bind(now).bind(now).bind(1_i64).bind(doc(q));
        });
        sql.query().execute(&mut *tx).await?;
        tx.commit().await?;
        self.get_quote(&quote.id, scope).await
    }

    pub async fn get_quote(&self, id: &str, scope: &OwnerScope) -> Result<Quote, ApiError> {
        let row = self.select_quote(id, scope).query().fetch_optional(self.db.pool()).await?;
        decode(&row.ok_or_else(|| not_found(id))?)
    }

    /// A page of the quotes of a deal `scope` allows, newest version first.
    pub async fn list_quotes(
        &self,
        deal_id: &str,
        page: &Page,
        scope: &OwnerScope,
    ) -> Result<(Vec<Quote>, String), ApiError> {
        self.get_deal(deal_id, scope).await?;
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM quotes WHERE deal_id = ").bind(deal_id);
        page.push_keyset(&mut sql, &ORDER);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        page.finish(&rows, &ORDER, decode)
    }

    /// Locks the quote `id` and lets `change` change it (priced by the caller); ABORTED when
    /// `etag` is set and stale. The edit stays open: [`QuoteEdit::commit`] ends it, or
    /// [`QuoteEdit::into_tx`] hands its transaction on (accepting a quote changes its deal too).
    pub async fn lock_quote(&self, id: &str, etag: &str, scope: &OwnerScope) -> Result<QuoteEdit, ApiError> {
        let tx = self.db.begin_write().await?;
        let (edit, row) = Edit::lock(&self.db, tx, "quotes", "quote", id, self.select_quote(id, scope)).await?;
        edit.require_etag(etag)?;
        Ok(QuoteEdit { quote: decode(&row)?, edit })
    }
}

/// A quote locked for a change.
pub struct QuoteEdit {
    pub quote: Quote,
    edit: Edit,
}

impl QuoteEdit {
    /// Writes `quote` (its state, currency, total and document) as the next version.
    pub async fn save(&mut self, quote: &Quote) -> Result<(), ApiError> {
        let total = quote.total.as_ref().map_or(0, |m| m.minor_units);
        let mut set = Sql::new("state = ");
        set.bind(i64::from(quote.state)).push(", currency = ").bind(quote.currency_code.as_str());
        set.push(", total = ").bind(total).push(", doc = ").bind(doc(quote));
        self.edit.save(set, now_micros()).await?;
        Ok(())
    }

    pub async fn commit(self) -> Result<(), ApiError> {
        self.edit.commit().await
    }

    pub async fn abandon(self) -> Result<(), ApiError> {
        self.edit.abandon().await
    }

    /// The edit's transaction, the quote's change written, for the rest of a change that
    /// commits with it.
    pub fn into_tx(self) -> Tx {
        self.edit.into_tx()
    }
}
