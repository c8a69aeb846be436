//! Contracts (D5): a contract on a deal, its payment plan (instalments, kept as rows too so that
//! balances are sums in the database), the payments received against it, and reminders of
//! instalments coming due (kit jobs, [`INSTALMENT_REMINDER_JOB`]). A contract is seen by whoever
//! may see its owner's records (the deal's owner when it was made).

use crm_kit::ApiError;
use crm_kit::auth::OwnerScope;
use crm_kit::db::{Edit, Sql, Tx, idempotency};
use crm_kit::events::envelope::envelope;
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::jobs;
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::deals::v1::{Balance, BalanceGrouping, Contract, InstalmentDue, Money, Payment};
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{CREATED_CONTRACT, CREATED_PAYMENT, Store};
use crate::domain;

/// The kind of the jobs that remind a contract's owner of an instalment coming due; key
/// `<contract id>/<instalment number>`, payload the instalment's due date.
pub const INSTALMENT_REMINDER_JOB: &str = "deals.instalment_reminder";

const COLUMNS: &str = "id, deal_id, owner_id, company_id, person_id, number, signed_date, currency, value, received, \
                       created_at, updated_at, version, doc";

/// The filterable fields of ListContracts and GetBalances.
pub const FIELDS: &[Field] = &[
    Field { name: "deal_id", column: "deal_id", kind: FieldKind::Text },
    Field { name: "owner_id", column: "owner_id", kind: FieldKind::Text },
    Field { name: "company_id", column: "company_id", kind: FieldKind::Text },
    Field { name: "person_id", column: "person_id", kind: FieldKind::Text },
    Field { name: "currency", column: "currency", kind: FieldKind::Text },
    Field { name: "signed_date", column: "signed_date", kind: FieldKind::Text },
];

/// Newest signed first.
pub const ORDER: Order = Order { column: "signed_date", tie: "id", text: true, desc: true };

const PAYMENT_COLUMNS: &str = "id, contract_id, amount, received_date, note, recorded_by, created_at";

/// Payments in the order they were recorded.
pub const PAYMENT_ORDER: Order = Order { column: "created_at", tie: "id", text: false, desc: false };

fn decode(row: &AnyRow) -> Result<Contract, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut c = Contract::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored contract {id} does not decode: {e}")))?;
    c.deal_id = row.try_get("deal_id")?;
    c.owner_id = row.try_get("owner_id")?;
    c.company_id = row.try_get("company_id")?;
    c.person_id = row.try_get("person_id")?;
    c.number = row.try_get("number")?;
    c.signed_date = row.try_get("signed_date")?;
    let currency: String = row.try_get("currency")?;
    let money = |n: i64| Some(Money { currency_code: currency.clone(), minor_units: n });
    c.value = money(row.try_get("value")?);
    c.received = money(row.try_get("received")?);
    c.create_time = to_timestamp(row.try_get("created_at")?);
    c.update_time = to_timestamp(row.try_get("updated_at")?);
    c.etag = row.try_get::<i64, _>("version")?.to_string();
    c.id = id;
    // Overdue means due before today where the contract is (its time zone).
    let tz = crm_kit::time::zone(&c.time_zone).unwrap_or(chrono_tz::Tz::UTC);
    domain::settle(&mut c, &crm_kit::time::today(tz).format("%Y-%m-%d").to_string());
    Ok(c)
}

fn doc(c: &Contract) -> Vec<u8> {
    let instalments = c
        .instalments
        .iter()
        .map(|i| crm_proto::deals::v1::Instalment {
            due_date: i.due_date.clone(),
            amount: i.amount.clone(),
            paid: None,
        })
        .collect();
    Contract {
        start_date: c.start_date.clone(),
        end_date: c.end_date.clone(),
        instalments,
        reminder_days: c.reminder_days,
        time_zone: c.time_zone.clone(),
        notes: c.notes.clone(),
        ..Contract::default()
    }
    .encode_to_vec()
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("contract {id} not found"))
}

fn duplicate_number(number: &str) -> ApiError {
    ApiError::invalid("contract.number", format!("{number:?} is the number of another contract"))
}

fn decode_payment(row: &AnyRow) -> Result<Payment, ApiError> {
    Ok(Payment {
        id: row.try_get("id")?,
        contract_id: row.try_get("contract_id")?,
        amount: Some(Money { currency_code: String::new(), minor_units: row.try_get("amount")? }),
        received_date: row.try_get("received_date")?,
        note: row.try_get("note")?,
        recorded_by: row.try_get("recorded_by")?,
        create_time: to_timestamp(row.try_get("created_at")?),
    })
}

/// Writes a contract's instalments as rows and its reminders as jobs, replacing those of its
/// plan before (`before` instalments).
async fn write_plan(tx: &mut Tx, c: &Contract, before: usize) -> Result<(), ApiError> {
    let mut sql = Sql::new("DELETE FROM instalments WHERE contract_id = ");
    sql.bind(c.id.as_str());
    sql.query().execute(&mut **tx).await?;
    if !c.instalments.is_empty() {
        let mut sql = Sql::new("INSERT INTO instalments (contract_id, seq, due_date, amount) VALUES ");
        let rows: Vec<(usize, &crm_proto::deals::v1::Instalment)> = c.instalments.iter().enumerate().collect();
        sql.push_values(rows, |v, (i, instalment)| {
            v.bind(c.id.as_str()).bind(i as i64 + 1).bind(instalment.due_date.as_str());
            v.bind(instalment.amount.as_ref().map_or(0, |m| m.minor_units));
        });
        sql.query().execute(&mut **tx).await?;
    }
    let keys: Vec<String> = (1..=before.max(c.instalments.len())).map(|seq| format!("{}/{seq}", c.id)).collect();
    let waiting: Vec<(&str, &str)> = keys.iter().map(|k| (INSTALMENT_REMINDER_JOB, k.as_str())).collect();
    jobs::cancel_all(tx, &waiting).await?;
    let now = now_micros();
    let reminders: Vec<(String, i64, Vec<u8>)> = domain::reminders(c)
        .into_iter()
        .filter(|(_, at, _)| *at > now)
        .map(|(seq, at, due)| (format!("{}/{seq}", c.id), at, due.into_bytes()))
        .collect();
    let jobs: Vec<(&str, i64, &[u8])> = reminders.iter().map(|(k, at, p)| (k.as_str(), *at, p.as_slice())).collect();
    jobs::schedule_all(tx, INSTALMENT_REMINDER_JOB, &jobs).await
}

impl Store {
    fn select_contract(&self, id: &str, scope: &OwnerScope) -> Sql {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM contracts WHERE id = ").bind(id);
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        sql
    }

    pub async fn get_contract(&self, id: &str, scope: &OwnerScope) -> Result<Contract, ApiError> {
        let row = self.select_contract(id, scope).query().fetch_optional(self.db.pool()).await?;
        decode(&row.ok_or_else(|| not_found(id))?)
    }

    /// Records `contract` (checked; its deal's customer, owner and currency filled in), with its
    /// plan and reminders.
    pub async fn create_contract(
        &self,
        mut contract: Contract,
        actor: &str,
        request_id: &str,
        scope: &OwnerScope,
    ) -> Result<Contract, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, actor, request_id, CREATED_CONTRACT, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_contract(&record_id, scope).await;
        }
        contract.id = id;
        let (currency, value) =
            contract.value.as_ref().map_or((String::new(), 0), |m| (m.currency_code.clone(), m.minor_units));
        let mut sql = Sql::new("INSERT INTO contracts (");
        sql.push(COLUMNS).push(", number_key) VALUES ");
        sql.push_values([&contract], |v, c| {
            v.bind(c.id.as_str()).bind(c.deal_id.as_str()).bind(c.owner_id.as_str()).bind(c.company_id.as_str());
            v.bind(c.person_id.as_str()).bind(c.number.as_str()).bind(c.signed_date.as_str()).bind(currency.as_str());
            v.bind(value).bind(0_i64).bind(now).bind(now).bind(1_i64).bind(doc(c)).bind(domain::key(&c.number));
        });
        match sql.query().execute(&mut *tx).await {
            Err(err) if crm_kit::db::is_unique_violation(&err) => return Err(duplicate_number(&contract.number)),
            other => other?,
        };
        write_plan(&mut tx, &contract, 0).await?;
        tx.commit().await?;
        self.get_contract(&contract.id, scope).await
    }

    /// Changes the contract `id` under its row lock: `change` gets it as stored (with what was
    /// received) and may change its own fields; the plan and reminders are written again.
    /// ABORTED when `etag` is set and stale.
    pub async fn edit_contract(
        &self,
        id: &str,
        etag: &str,
        scope: &OwnerScope,
        change: impl FnOnce(&mut Contract) -> Result<(), ApiError>,
    ) -> Result<Contract, ApiError> {
        let tx = self.db.begin_write().await?;
        let (mut edit, row) =
            Edit::lock(&self.db, tx, "contracts", "contract", id, self.select_contract(id, scope)).await?;
        edit.require_etag(etag)?;
        let old = decode(&row)?;
        let mut contract = old.clone();
        change(&mut contract)?;
        if contract == old {
            edit.abandon().await?;
            return Ok(old);
        }
        let value = contract.value.as_ref().map_or(0, |m| m.minor_units);
        let mut set = Sql::new("number = ");
        set.bind(contract.number.as_str()).push(", number_key = ").bind(domain::key(&contract.number));
        set.push(", signed_date = ").bind(contract.signed_date.as_str()).push(", value = ").bind(value);
        set.push(", doc = ").bind(doc(&contract));
        let number = contract.number.clone();
        edit.save_unique(set, now_micros(), |_| duplicate_number(&number)).await?;
        write_plan(edit.tx(), &contract, old.instalments.len()).await?;
        edit.commit().await?;
        self.get_contract(id, scope).await
    }

    /// A page of the contracts `scope` allows, newest signed first.
    pub async fn list_contracts(
        &self,
        filter: Option<&Filter>,
        page: &Page,
        scope: &OwnerScope,
    ) -> Result<(Vec<Contract>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM contracts WHERE 1=1");
        if let Some(filter) = filter {
            filter.push_onto(&mut sql);
        }
        scope.push_condition(&mut sql, self.db.backend(), "owner_id");
        page.push_keyset(&mut sql, &ORDER);
        let rows = sql.query_unprepared().fetch_all(self.db.pool()).await?;
        page.finish(&rows, &ORDER, decode)
    }

    /// Records `payment` (checked: more than 0) on its contract: in the contract's currency and
    /// at most what is outstanding. With a `request_id`, a repeated call records nothing more.
    pub async fn record_payment(
        &self,
        payment: Payment,
        actor: &str,
        request_id: &str,
        scope: &OwnerScope,
    ) -> Result<Contract, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let contract_id = payment.contract_id.clone();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { .. } =
            idempotency::claim(&mut tx, actor, request_id, CREATED_PAYMENT, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_contract(&contract_id, scope).await;
        }
        let select = self.select_contract(&contract_id, scope);
        let (mut edit, row) = Edit::lock(&self.db, tx, "contracts", "contract", &contract_id, select).await?;
        let contract = decode(&row)?;
        let amount = payment.amount.clone().unwrap_or_default();
        let currency = contract.value.as_ref().map_or("", |m| m.currency_code.as_str());
        if amount.currency_code != currency {
            return Err(ApiError::invalid(
                "payment.amount.currency_code",
                format!("must be the contract's, {currency}"),
            ));
        }
        let outstanding = contract.outstanding.as_ref().map_or(0, |m| m.minor_units);
        if amount.minor_units > outstanding {
            return Err(ApiError::invalid(
                "payment.amount.minor_units",
                format!("is more than the {outstanding} minor units still outstanding"),
            ));
        }
        let mut sql = Sql::new("INSERT INTO payments (");
        sql.push(PAYMENT_COLUMNS).push(") VALUES ");
        sql.push_values([&payment], |v, p| {
            v.bind(id.as_str()).bind(contract_id.as_str()).bind(amount.minor_units).bind(p.received_date.as_str());
            v.bind(p.note.as_str()).bind(actor).bind(now);
        });
        sql.query().execute(&mut **edit.tx()).await?;
        let mut set = Sql::new("received = received + ");
        set.bind(amount.minor_units);
        edit.save(set, now).await?;
        edit.commit().await?;
        self.get_contract(&contract_id, scope).await
    }

    /// A page of a contract's payments, oldest first, if `scope` allows the contract.
    pub async fn list_payments(
        &self,
        contract_id: &str,
        page: &Page,
        scope: &OwnerScope,
    ) -> Result<(Vec<Payment>, String), ApiError> {
        let contract = self.get_contract(contract_id, scope).await?;
        let currency = contract.value.map(|m| m.currency_code).unwrap_or_default();
        let mut sql = Sql::new("SELECT ");
        sql.push(PAYMENT_COLUMNS).push(" FROM payments WHERE contract_id = ").bind(contract_id);
        page.push_keyset(&mut sql, &PAYMENT_ORDER);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let (mut payments, next) = page.finish(&rows, &PAYMENT_ORDER, decode_payment)?;
        for p in &mut payments {
            if let Some(m) = p.amount.as_mut() {
                m.currency_code = currency.clone();
            }
        }
        Ok((payments, next))
    }

    /// Per contract, customer or owner and currency: the contracts `filter` and `scope` allow,
    /// their value, what was received, what is outstanding, and what of the instalments due
    /// before `as_of` is unpaid (payments pay instalments in due order, so that is the sum due
    /// before then less what was received, when more). One aggregate in the database.
    pub async fn balances(
        &self,
        grouping: BalanceGrouping,
        as_of: &str,
        filter: Option<&Filter>,
        scope: &OwnerScope,
    ) -> Result<Vec<Balance>, ApiError> {
        let backend = self.db.backend();
        let key = match grouping {
            BalanceGrouping::Customer => "CASE WHEN company_id <> '' THEN company_id ELSE person_id END",
            BalanceGrouping::Owner => "owner_id",
            _ => "id",
        };
        let label = if matches!(grouping, BalanceGrouping::Contract | BalanceGrouping::Unspecified) {
            "MIN(number)"
        } else {
            "''"
        };
        let mut sql = Sql::new("SELECT ");
        sql.push(key).push(" AS k, ").push(label).push(" AS label, currency, COUNT(*) AS n, ");
        sql.push(&backend.sum("value")).push(" AS value, ").push(&backend.sum("received")).push(" AS received, ");
        sql.push(&backend.sum("CASE WHEN due > received THEN due - received ELSE 0 END")).push(" AS overdue");
        sql.push(" FROM (SELECT c.*, COALESCE((SELECT SUM(i.amount) FROM instalments i WHERE i.contract_id = c.id");
        sql.push(" AND i.due_date < ").bind(as_of).push("), 0) AS due FROM contracts c WHERE 1=1");
        if let Some(filter) = filter {
            filter.push_onto(&mut sql);
        }
        scope.push_condition(&mut sql, backend, "owner_id");
        sql.push(") contracts GROUP BY 1, 3");
        let rows = self.aggregate(&sql).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let currency: String = row.try_get("currency")?;
            let money = |n: i64| Some(Money { currency_code: currency.clone(), minor_units: n });
            let (value, received): (i64, i64) = (row.try_get("value")?, row.try_get("received")?);
            out.push(Balance {
                key: row.try_get("k")?,
                label: row.try_get("label")?,
                contracts: row.try_get("n")?,
                value: money(value),
                received: money(received),
                outstanding: money((value - received).max(0)),
                overdue: money(row.try_get("overdue")?),
            });
        }
        let amount = |m: &Option<Money>| m.as_ref().map_or(0, |m| m.minor_units);
        out.sort_by(|a, b| {
            (amount(&b.overdue), amount(&b.outstanding), &a.key).cmp(&(
                amount(&a.overdue),
                amount(&a.outstanding),
                &b.key,
            ))
        });
        Ok(out)
    }

    /// The reminder of instalment `seq` (due on `due_date`) of contract `contract_id`, in `tx`
    /// (the job's): InstalmentDue for its owner when the contract still has it, due that day,
    /// and it is not paid yet.
    pub async fn remind_instalment(
        &self,
        tx: &mut Tx,
        contract_id: &str,
        seq: usize,
        due_date: &str,
    ) -> Result<bool, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM contracts WHERE id = ").bind(contract_id);
        let Some(row) = sql.query().fetch_optional(&mut **tx).await? else { return Ok(false) };
        let contract = decode(&row)?;
        let Some(instalment) = contract.instalments.get(seq.wrapping_sub(1)) else { return Ok(false) };
        let amount = instalment.amount.as_ref().map_or(0, |m| m.minor_units);
        let paid = instalment.paid.as_ref().map_or(0, |m| m.minor_units);
        if instalment.due_date != due_date || paid >= amount {
            return Ok(false);
        }
        let currency = contract.value.as_ref().map(|m| m.currency_code.clone()).unwrap_or_default();
        let event = InstalmentDue {
            contract_id: contract.id.clone(),
            number: contract.number.clone(),
            deal_id: contract.deal_id.clone(),
            owner_id: contract.owner_id.clone(),
            due_date: due_date.to_string(),
            amount_due_text: crate::reports::money_text(amount - paid, &currency),
            amount_due: Some(Money { currency_code: currency, minor_units: amount - paid }),
            company_id: contract.company_id.clone(),
            person_id: contract.person_id.clone(),
        };
        self.outbox.append_all(tx, &[envelope(crate::SOURCE, &contract.id, "", &event)]).await?;
        Ok(true)
    }
}
