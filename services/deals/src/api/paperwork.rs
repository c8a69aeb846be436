//! The calls of quotes, contracts and payments (D5): decoded, checked and priced here, stored by
//! [`crate::store::quotes`] and [`crate::store::contracts`].

use crm_kit::db::idempotency::MAX_REQUEST_ID_CHARS;
use crm_kit::page::Page;
use crm_kit::{ApiError, Violations};
use crm_proto::deals::v1::*;

use super::{Caller, DealsApi, check_id};
use crate::domain;
use crate::store::contracts;

/// The fields UpdateQuote may replace.
const QUOTE_MASK: crm_kit::mask::Mask<Quote> =
    crm_kit::mask!(Quote { currency_code, line_items, tax_rate_bps, valid_until, notes });

/// The fields UpdateContract may replace.
const CONTRACT_MASK: crm_kit::mask::Mask<Contract> = crm_kit::mask!(Contract {
    number,
    signed_date,
    start_date,
    end_date,
    value,
    instalments,
    reminder_days,
    time_zone,
    notes
});

/// Longest note on a payment.
const MAX_NOTE: usize = 1_000;

fn today() -> String {
    crm_kit::time::today(chrono_tz::Tz::UTC).format("%Y-%m-%d").to_string()
}

impl DealsApi {
    pub(super) async fn create_quote(&self, caller: Caller, r: CreateQuoteRequest) -> Result<Quote, ApiError> {
        let mut quote = r.quote.ok_or_else(|| ApiError::invalid("quote", "is required"))?;
        quote.deal_id = quote.deal_id.trim().to_string();
        check_id("quote.deal_id", &quote.deal_id)?;
        let mut v = Violations::new();
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        v.check()?;
        let deal = self.store.get_deal(&quote.deal_id, &caller.scope).await?;
        if quote.currency_code.trim().is_empty() {
            quote.currency_code = deal.amount.as_ref().map(|m| m.currency_code.clone()).unwrap_or_default();
        }
        if quote.line_items.is_empty() {
            quote.line_items = deal.line_items.clone();
        }
        let known: Vec<String> = deal.line_items.iter().map(|l| l.product_id.clone()).collect();
        let mut v = Violations::new();
        let products = self.products_for(&quote.line_items, "quote.line_items", &known, &mut v).await?;
        domain::price_quote(&mut quote, &products, &mut v);
        v.check()?;
        let me = caller.principal.subject.clone();
        self.store.create_quote(quote, &me, r.request_id.trim(), &caller.scope).await
    }

    pub(super) async fn update_quote(&self, caller: Caller, r: UpdateQuoteRequest) -> Result<Quote, ApiError> {
        let patch = r.quote.ok_or_else(|| ApiError::invalid("quote", "is required"))?;
        check_id("quote.id", &patch.id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        QUOTE_MASK.apply(&mut Quote::default(), &patch, &paths, &mut v);
        v.check()?;
        let mut edit = self.store.lock_quote(&patch.id, &patch.etag, &caller.scope).await?;
        if edit.quote.state != QuoteState::Draft as i32 {
            return Err(ApiError::FailedPrecondition(format!(
                "quote {} was sent; only a draft changes (make a new version with CreateQuote)",
                patch.id
            )));
        }
        let mut quote = edit.quote.clone();
        let mut v = Violations::new();
        QUOTE_MASK.apply(&mut quote, &patch, &paths, &mut v);
        let known: Vec<String> = edit.quote.line_items.iter().map(|l| l.product_id.clone()).collect();
        let products = self.products_for(&quote.line_items, "quote.line_items", &known, &mut v).await?;
        domain::price_quote(&mut quote, &products, &mut v);
        v.check()?;
        if quote == edit.quote {
            edit.abandon().await?;
            return Ok(quote);
        }
        edit.save(&quote).await?;
        edit.commit().await?;
        self.store.get_quote(&patch.id, &caller.scope).await
    }

    pub(super) async fn set_quote_state(&self, caller: Caller, r: SetQuoteStateRequest) -> Result<Quote, ApiError> {
        check_id("id", &r.id)?;
        let to = QuoteState::try_from(r.state).unwrap_or(QuoteState::Unspecified);
        if !matches!(to, QuoteState::Sent | QuoteState::Accepted | QuoteState::Rejected) {
            return Err(ApiError::invalid(
                "state",
                "must be QUOTE_STATE_SENT, QUOTE_STATE_ACCEPTED or QUOTE_STATE_REJECTED",
            ));
        }
        if r.apply_to_deal && to != QuoteState::Accepted {
            return Err(ApiError::invalid("apply_to_deal", "applies only when the quote is accepted"));
        }
        let mut edit = self.store.lock_quote(&r.id, &r.etag, &caller.scope).await?;
        let from = QuoteState::try_from(edit.quote.state).unwrap_or(QuoteState::Unspecified);
        let allowed = matches!(
            (from, to),
            (QuoteState::Draft, QuoteState::Sent) | (QuoteState::Sent, QuoteState::Accepted | QuoteState::Rejected)
        );
        if !allowed {
            return Err(ApiError::FailedPrecondition(format!(
                "a {} quote cannot become {} (draft → sent → accepted or rejected)",
                from.as_str_name(),
                to.as_str_name()
            )));
        }
        let mut quote = edit.quote.clone();
        quote.state = to as i32;
        edit.save(&quote).await?;
        if r.apply_to_deal {
            // The deal takes the quote's lines and subtotal in the same transaction.
            let me = caller.principal.subject.clone();
            let (lines, subtotal) = (quote.line_items.clone(), quote.subtotal.clone());
            self.store
                .edit_deal_in(edit.into_tx(), &quote.deal_id, "", &me, &caller.scope, None, |deal| {
                    deal.line_items = lines;
                    deal.amount = subtotal;
                    Ok(())
                })
                .await?;
        } else {
            edit.commit().await?;
        }
        self.store.get_quote(&r.id, &caller.scope).await
    }

    pub(super) async fn list_quotes(
        &self,
        caller: Caller,
        r: ListQuotesRequest,
    ) -> Result<ListQuotesResponse, ApiError> {
        check_id("deal_id", &r.deal_id)?;
        let page = Page::decode(&["quotes", &r.deal_id], r.page_size, &r.page_token, &crate::store::quotes::ORDER)?;
        let (quotes, next_page_token) = self.store.list_quotes(&r.deal_id, &page, &caller.scope).await?;
        Ok(ListQuotesResponse { quotes, next_page_token })
    }

    pub(super) async fn create_contract(&self, caller: Caller, r: CreateContractRequest) -> Result<Contract, ApiError> {
        let mut contract = r.contract.ok_or_else(|| ApiError::invalid("contract", "is required"))?;
        contract.deal_id = contract.deal_id.trim().to_string();
        check_id("contract.deal_id", &contract.deal_id)?;
        let deal = self.store.get_deal(&contract.deal_id, &caller.scope).await?;
        let mut v = Violations::new();
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        if let (Some(value), Some(amount)) = (contract.value.as_mut(), deal.amount.as_ref()) {
            if value.currency_code.trim().is_empty() {
                value.currency_code = amount.currency_code.clone();
            } else if value.currency_code != amount.currency_code {
                v.add("contract.value.currency_code", format!("must be the deal's currency, {}", amount.currency_code));
            }
        }
        domain::normalize_contract(&mut contract, &mut v);
        v.check()?;
        contract.owner_id = deal.owner_id;
        contract.company_id = deal.company_id;
        contract.person_id = deal.person_id;
        let me = caller.principal.subject.clone();
        self.store.create_contract(contract, &me, r.request_id.trim(), &caller.scope).await
    }

    pub(super) async fn update_contract(&self, caller: Caller, r: UpdateContractRequest) -> Result<Contract, ApiError> {
        let patch = r.contract.ok_or_else(|| ApiError::invalid("contract", "is required"))?;
        check_id("contract.id", &patch.id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        CONTRACT_MASK.apply(&mut Contract::default(), &patch, &paths, &mut v);
        v.check()?;
        self.store
            .edit_contract(&patch.id, &patch.etag, &caller.scope, |contract| {
                let before = contract.clone();
                let mut v = Violations::new();
                CONTRACT_MASK.apply(contract, &patch, &paths, &mut v);
                domain::normalize_contract(contract, &mut v);
                let currency = |c: &Contract| c.value.as_ref().map(|m| m.currency_code.clone()).unwrap_or_default();
                let received = before.received.as_ref().map_or(0, |m| m.minor_units);
                if received > 0 && currency(contract) != currency(&before) {
                    v.add("contract.value.currency_code", "cannot change once payments were received");
                }
                if contract.value.as_ref().map_or(0, |m| m.minor_units) < received {
                    v.add(
                        "contract.value.minor_units",
                        format!("must be at least the {received} minor units received"),
                    );
                }
                v.check()?;
                // What the store computes is not the caller's to set.
                contract.received = before.received;
                Ok(())
            })
            .await
    }

    pub(super) async fn list_contracts(
        &self,
        caller: Caller,
        r: ListContractsRequest,
    ) -> Result<ListContractsResponse, ApiError> {
        let filter = crm_kit::filter::parse(&r.filter, contracts::FIELDS)?;
        let page = Page::decode(&["contracts", &r.filter], r.page_size, &r.page_token, &contracts::ORDER)?;
        let (contracts, next_page_token) = self.store.list_contracts(filter.as_ref(), &page, &caller.scope).await?;
        Ok(ListContractsResponse { contracts, next_page_token })
    }

    pub(super) async fn record_payment(&self, caller: Caller, r: RecordPaymentRequest) -> Result<Contract, ApiError> {
        let mut payment = r.payment.ok_or_else(|| ApiError::invalid("payment", "is required"))?;
        let mut v = Violations::new();
        v.uuid("payment.contract_id", &payment.contract_id);
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        match &payment.amount {
            Some(m) if m.minor_units > 0 => domain::check_money(m, "payment.amount", &mut v),
            _ => v.add("payment.amount.minor_units", "must be more than 0"),
        }
        payment.received_date = payment.received_date.trim().to_string();
        if payment.received_date.is_empty() {
            payment.received_date = today();
        } else if domain::parse_date(&payment.received_date).is_none() {
            v.add("payment.received_date", "must be a day as YYYY-MM-DD");
        }
        payment.note = payment.note.trim().to_string();
        v.max_chars("payment.note", &payment.note, MAX_NOTE);
        v.check()?;
        let me = caller.principal.subject.clone();
        self.store.record_payment(payment, &me, r.request_id.trim(), &caller.scope).await
    }

    pub(super) async fn list_payments(
        &self,
        caller: Caller,
        r: ListPaymentsRequest,
    ) -> Result<ListPaymentsResponse, ApiError> {
        check_id("contract_id", &r.contract_id)?;
        let page = Page::decode(&["payments", &r.contract_id], r.page_size, &r.page_token, &contracts::PAYMENT_ORDER)?;
        let (payments, next_page_token) = self.store.list_payments(&r.contract_id, &page, &caller.scope).await?;
        Ok(ListPaymentsResponse { payments, next_page_token })
    }

    pub(super) async fn balances(
        &self,
        caller: Caller,
        r: GetBalancesRequest,
    ) -> Result<GetBalancesResponse, ApiError> {
        let grouping = BalanceGrouping::try_from(r.group_by).unwrap_or(BalanceGrouping::Unspecified);
        let mut as_of = r.as_of.trim().to_string();
        if as_of.is_empty() {
            as_of = today();
        } else if domain::parse_date(&as_of).is_none() {
            return Err(ApiError::invalid("as_of", "must be a day as YYYY-MM-DD"));
        }
        let filter = crm_kit::filter::parse(&r.filter, contracts::FIELDS)?;
        let balances = self.store.balances(grouping, &as_of, filter.as_ref(), &caller.scope).await?;
        Ok(GetBalancesResponse { balances })
    }
}
