//! The rules of pipelines, products and money in plain Rust, without I/O.

use std::collections::HashMap;

use crm_kit::Violations;
use crm_proto::deals::v1::{
    Contract, Deal, DealStatus, LineItem, MessageChannel, Money, Pipeline, Product, Quote, Stage, StageKind, Target,
    TargetMetric, automation,
};

pub const MAX_NAME: usize = 100;
pub const MAX_PRODUCT_NAME: usize = 300;
pub const MAX_TEXT: usize = 10_000;
pub const MAX_STAGES: usize = 30;
pub const MAX_PRICES: usize = 20;
/// Longest a deal may sit in a stage before it rots, at most.
pub const MAX_ROTTING_DAYS: i32 = 3_650;

/// The stages a new install starts with: the funnel from a first contact to an order received.
pub const STARTING_PIPELINE: &str = "Sales";
pub const STARTING_STAGES: &[(&str, i32, StageKind)] = &[
    ("New lead", 10, StageKind::Open),
    ("Client contacted", 20, StageKind::Open),
    ("Needs identified", 40, StageKind::Open),
    ("Proposal sent", 60, StageKind::Open),
    ("Negotiation", 80, StageKind::Open),
    ("Payment", 90, StageKind::Open),
    ("Order received", 100, StageKind::Won),
    ("Lost", 0, StageKind::Lost),
];

/// Whether `code` looks like an ISO 4217 currency code: three capital letters.
pub fn is_currency(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// Checks a money value: an ISO currency and a non-negative amount.
pub fn check_money(money: &Money, field: &str, v: &mut Violations) {
    if !is_currency(&money.currency_code) {
        v.add(format!("{field}.currency_code"), "must be an ISO 4217 code of three capital letters, e.g. EUR");
    }
    if money.minor_units < 0 {
        v.add(format!("{field}.minor_units"), "must not be negative");
    }
}

/// The total of a line: `quantity` × `unit_price` less `discount_bps` hundredths of a percent,
/// rounded half up to the minor unit; `None` when it does not fit (an amount overflow).
pub fn line_total(quantity: i64, unit_price: i64, discount_bps: i64) -> Option<i64> {
    if quantity < 0 || unit_price < 0 || !(0..=10_000).contains(&discount_bps) {
        return None;
    }
    let gross = i128::from(quantity) * i128::from(unit_price);
    let net = (gross * i128::from(10_000 - discount_bps) + 5_000) / 10_000;
    i64::try_from(net).ok()
}

/// The sum of amounts, `None` on overflow.
pub fn sum(amounts: impl IntoIterator<Item = i64>) -> Option<i64> {
    amounts.into_iter().try_fold(0_i64, |total, a| total.checked_add(a))
}

/// The lower-cased key a name or SKU is compared by.
pub fn key(text: &str) -> String {
    text.trim().to_lowercase()
}

/// Trims a stage and fills its defaults (won 100, lost 0 when no probability is given).
pub fn normalize_stage(stage: &mut Stage, field: &str, v: &mut Violations) {
    stage.name = stage.name.trim().to_string();
    v.required(&format!("{field}.name"), &stage.name);
    v.max_chars(&format!("{field}.name"), &stage.name, MAX_NAME);
    match StageKind::try_from(stage.kind) {
        Ok(StageKind::Unspecified) | Err(_) => {
            v.add(format!("{field}.kind"), "must be STAGE_KIND_OPEN, STAGE_KIND_WON or STAGE_KIND_LOST")
        }
        Ok(StageKind::Won) if stage.probability == 0 => stage.probability = 100,
        Ok(_) => {}
    }
    if !(0..=100).contains(&stage.probability) {
        v.add(format!("{field}.probability"), "must be 0 to 100");
    }
    if !(0..=MAX_ROTTING_DAYS).contains(&stage.rotting_days) {
        v.add(format!("{field}.rotting_days"), format!("must be 0 to {MAX_ROTTING_DAYS}"));
    }
    let mut required: Vec<String> = Vec::new();
    for (i, name) in stage.required_fields.iter().enumerate() {
        let name = name.trim();
        if !REQUIRABLE.contains(&name) {
            v.add(format!("{field}.required_fields[{i}]"), format!("must be one of {}", REQUIRABLE.join(", ")));
        } else if !required.iter().any(|r| r == name) {
            required.push(name.to_string());
        }
    }
    stage.required_fields = required;
    v.max_items(&format!("{field}.automations"), &stage.automations, MAX_AUTOMATIONS);
    for (i, automation) in stage.automations.iter_mut().enumerate() {
        let at = format!("{field}.automations[{i}]");
        match &mut automation.action {
            None => v.add(at, "needs an action: create_task, notify, message_client or call_webhook"),
            Some(automation::Action::MessageClient(message)) => {
                message.subject = message.subject.trim().to_string();
                message.body = message.body.trim().to_string();
                let sms = message.channel == MessageChannel::Sms as i32;
                if MessageChannel::try_from(message.channel).is_err() {
                    v.add(
                        format!("{at}.message_client.channel"),
                        "must be MESSAGE_CHANNEL_EMAIL or MESSAGE_CHANNEL_SMS",
                    );
                }
                if sms && !message.subject.is_empty() {
                    v.add(format!("{at}.message_client.subject"), "must be empty: a text message has only its body");
                } else if !sms {
                    v.required(&format!("{at}.message_client.subject"), &message.subject);
                }
                v.max_chars(&format!("{at}.message_client.subject"), &message.subject, MAX_PRODUCT_NAME);
                v.required(&format!("{at}.message_client.body"), &message.body);
                v.max_chars(&format!("{at}.message_client.body"), &message.body, MAX_TEXT);
            }
            Some(automation::Action::CallWebhook(hook)) => {
                hook.webhook_id = hook.webhook_id.trim().to_string();
                v.uuid(&format!("{at}.call_webhook.webhook_id"), &hook.webhook_id);
            }
            Some(automation::Action::CreateTask(task)) => {
                task.title = task.title.trim().to_string();
                v.required(&format!("{at}.create_task.title"), &task.title);
                v.max_chars(&format!("{at}.create_task.title"), &task.title, MAX_PRODUCT_NAME);
                v.max_chars(&format!("{at}.create_task.description"), &task.description, MAX_TEXT);
                if !(0..=365).contains(&task.due_in_days) {
                    v.add(format!("{at}.create_task.due_in_days"), "must be 0 to 365");
                }
            }
            Some(automation::Action::Notify(notify)) => {
                notify.message = notify.message.trim().to_string();
                v.required(&format!("{at}.notify.message"), &notify.message);
                v.max_chars(&format!("{at}.notify.message"), &notify.message, 1_000);
                v.max_items(&format!("{at}.notify.user_ids"), &notify.user_ids, 20);
                for (j, user) in notify.user_ids.iter_mut().enumerate() {
                    *user = user.trim().to_string();
                    v.uuid(&format!("{at}.notify.user_ids[{j}]"), user);
                }
                if notify.user_ids.is_empty() && !notify.owner && !notify.owner_supervisor {
                    v.add(format!("{at}.notify"), "names nobody: set user_ids, owner or owner_supervisor");
                }
            }
        }
    }
}

/// Most automations one stage has.
pub const MAX_AUTOMATIONS: usize = 10;

/// An automation's text with "{deal}" as the deal's title and "{stage}" as the stage's name.
fn fill(template: &str, deal: &Deal, stage: &Stage) -> String {
    template.replace("{deal}", &deal.title).replace("{stage}", &stage.name)
}

/// A stage's automations as a deal entering it publishes them: every text filled in
/// ([`fill`]), so that the services carrying them out take them as they are.
pub fn filled(
    automations: &[crm_proto::deals::v1::Automation],
    deal: &Deal,
    stage: &Stage,
) -> Vec<crm_proto::deals::v1::Automation> {
    let mut out = automations.to_vec();
    for automation in &mut out {
        match &mut automation.action {
            Some(automation::Action::CreateTask(task)) => {
                task.title = fill(&task.title, deal, stage);
                task.description = fill(&task.description, deal, stage);
            }
            Some(automation::Action::Notify(notify)) => notify.message = fill(&notify.message, deal, stage),
            Some(automation::Action::MessageClient(message)) => {
                message.subject = fill(&message.subject, deal, stage);
                message.body = fill(&message.body, deal, stage);
            }
            Some(automation::Action::CallWebhook(_)) | None => {}
        }
    }
    out
}

/// The fields a stage may require of the deals entering it.
pub const REQUIRABLE: &[&str] =
    &["amount", "expected_close_date", "company_id", "person_id", "customer", "line_items", "notes"];

/// The fields `stage` requires that `deal` lacks, each as `deal.<field>`.
pub fn missing_fields(deal: &Deal, stage: &Stage) -> Vec<String> {
    stage
        .required_fields
        .iter()
        .filter(|field| match field.as_str() {
            "amount" => deal.amount.as_ref().is_none_or(|m| m.minor_units == 0),
            "expected_close_date" => deal.expected_close_date.is_empty(),
            "company_id" => deal.company_id.is_empty(),
            "person_id" => deal.person_id.is_empty(),
            "customer" => deal.company_id.is_empty() && deal.person_id.is_empty(),
            "line_items" => deal.line_items.is_empty(),
            "notes" => deal.notes.trim().is_empty(),
            _ => false,
        })
        .map(|field| format!("deal.{field}"))
        .collect()
}

/// When a deal entering `stage` at `entered_at` starts rotting: never for a closed stage or one
/// without a threshold.
pub fn rot_at(stage: &Stage, entered_at: i64) -> i64 {
    if stage.kind != StageKind::Open as i32 || stage.rotting_days <= 0 {
        return i64::MAX;
    }
    entered_at.saturating_add(i64::from(stage.rotting_days) * 86_400_000_000)
}

/// Checks a pipeline's stages as a whole: names unique, at most [`MAX_STAGES`], and at least
/// one open, one won and one lost stage (every deal must be able to end either way).
pub fn check_stages(stages: &[Stage], field: &str, v: &mut Violations) {
    v.max_items(field, stages, MAX_STAGES);
    let mut seen: Vec<String> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let k = key(&stage.name);
        if !k.is_empty() && seen.contains(&k) {
            v.add(format!("{field}[{i}].name"), format!("{:?} is already a stage of this pipeline", stage.name));
        }
        seen.push(k);
    }
    for (kind, name) in [(StageKind::Open, "open"), (StageKind::Won, "won"), (StageKind::Lost, "lost")] {
        if !stages.iter().any(|s| s.kind == kind as i32) {
            v.add(field, format!("needs at least one {name} stage"));
        }
    }
}

/// Trims a pipeline's own fields and its stages.
pub fn normalize_pipeline(p: &mut Pipeline, v: &mut Violations) {
    p.name = p.name.trim().to_string();
    v.required("pipeline.name", &p.name);
    v.max_chars("pipeline.name", &p.name, MAX_NAME);
    p.department_id = p.department_id.trim().to_string();
    v.optional_uuid("pipeline.department_id", &p.department_id);
}

/// Trims a product and checks its prices (one per currency).
pub fn normalize_product(p: &mut Product, v: &mut Violations) {
    p.name = p.name.trim().to_string();
    v.required("product.name", &p.name);
    v.max_chars("product.name", &p.name, MAX_PRODUCT_NAME);
    p.sku = p.sku.trim().to_string();
    v.max_chars("product.sku", &p.sku, MAX_NAME);
    v.max_chars("product.description", &p.description, MAX_TEXT);
    v.max_items("product.prices", &p.prices, MAX_PRICES);
    let mut currencies: Vec<&str> = Vec::new();
    for (i, price) in p.prices.iter().enumerate() {
        check_money(price, &format!("product.prices[{i}]"), v);
        if currencies.contains(&price.currency_code.as_str()) {
            v.add(format!("product.prices[{i}].currency_code"), "has a price already; one price per currency");
        }
        currencies.push(price.currency_code.as_str());
    }
}

/// The largest amount a deal or a line may have, in minor units (10^15: ten trillion of a
/// currency with cents), so that sums over millions of deals stay exact in 64 bits.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;
pub const MAX_LINES: usize = 200;
pub const MAX_REASON: usize = 500;

/// The weighted amount of a deal: `amount` × `probability` %, rounded half up (in SQL the same:
/// `(amount * probability + 50) / 100`).
pub fn weighted(amount: i64, probability: i32) -> i64 {
    ((i128::from(amount) * i128::from(probability) + 50) / 100) as i64
}

/// A deal's status from the kind of its stage.
pub fn status_of(kind: i32) -> DealStatus {
    match StageKind::try_from(kind) {
        Ok(StageKind::Won) => DealStatus::Won,
        Ok(StageKind::Lost) => DealStatus::Lost,
        _ => DealStatus::Open,
    }
}

/// Trims a deal's own fields (not its money: [`price`]).
pub fn normalize_deal(deal: &mut Deal, v: &mut Violations) {
    deal.title = deal.title.trim().to_string();
    v.required("deal.title", &deal.title);
    v.max_chars("deal.title", &deal.title, MAX_PRODUCT_NAME);
    v.max_chars("deal.notes", &deal.notes, MAX_TEXT);
    for (field, id) in [
        ("deal.company_id", &mut deal.company_id),
        ("deal.person_id", &mut deal.person_id),
        ("deal.owner_id", &mut deal.owner_id),
    ] {
        *id = id.trim().to_string();
        v.optional_uuid(field, id);
    }
    deal.expected_close_date = deal.expected_close_date.trim().to_string();
    if !deal.expected_close_date.is_empty() && parse_date(&deal.expected_close_date).is_none() {
        v.add("deal.expected_close_date", "must be a day as YYYY-MM-DD");
    }
    deal.lost_reason = deal.lost_reason.trim().to_string();
    v.max_chars("deal.lost_reason", &deal.lost_reason, MAX_REASON);
    if let Some(p) = deal.probability
        && !(0..=100).contains(&p)
    {
        v.add("deal.probability", "must be 0 to 100");
    }
}

/// A YYYY-MM-DD day (ten characters), checked for its calendar (leap years included).
pub fn parse_date(text: &str) -> Option<chrono::NaiveDate> {
    (text.len() == 10).then(|| chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()).flatten()
}

/// Prices a deal: with line items, each line's unit price (default: its product's price in the
/// deal's currency), name (default: the product's) and total, and the amount their sum; without,
/// the amount as given. `products` holds the products the lines name. A violation for every
/// wrong value; nothing is half-priced.
pub fn price(deal: &mut Deal, products: &HashMap<String, Product>, v: &mut Violations) {
    let mut amount = deal.amount.take().unwrap_or_default();
    amount.currency_code = amount.currency_code.trim().to_string();
    if deal.line_items.is_empty() {
        if amount.minor_units != 0 || !amount.currency_code.is_empty() {
            check_money(&amount, "deal.amount", v);
            if amount.minor_units > MAX_AMOUNT {
                v.add("deal.amount.minor_units", format!("must be at most {MAX_AMOUNT}"));
            }
        }
        deal.amount = (!amount.currency_code.is_empty()).then_some(amount);
        return;
    }
    if !is_currency(&amount.currency_code) {
        v.add("deal.amount.currency_code", "is required with line items: the currency every line is priced in");
    }
    let currency = amount.currency_code.clone();
    deal.amount = price_lines(&mut deal.line_items, "deal.line_items", &currency, products, v)
        .map(|total| Money { currency_code: currency, minor_units: total });
}

/// Prices `lines` (the field `field`) in `currency` ([`price_line`]) and answers their sum;
/// `None` with a violation when it exceeds [`MAX_AMOUNT`].
pub fn price_lines(
    lines: &mut [LineItem],
    field: &str,
    currency: &str,
    products: &HashMap<String, Product>,
    v: &mut Violations,
) -> Option<i64> {
    v.max_items(field, lines, MAX_LINES);
    let mut totals = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter_mut().enumerate() {
        price_line(line, &format!("{field}[{i}]"), currency, products, v);
        totals.push(line.total.as_ref().map_or(0, |t| t.minor_units));
    }
    let total = sum(totals).filter(|t| *t <= MAX_AMOUNT);
    if total.is_none() {
        v.add(field, format!("add up to more than {MAX_AMOUNT} minor units"));
    }
    total
}

fn price_line(
    line: &mut LineItem,
    field: &str,
    currency: &str,
    products: &HashMap<String, Product>,
    v: &mut Violations,
) {
    line.product_id = line.product_id.trim().to_string();
    line.name = line.name.trim().to_string();
    line.total = None;
    if !line.product_id.is_empty() {
        match products.get(&line.product_id) {
            None => {
                // Its name and price would have come from the product: one violation says it.
                v.add(format!("{field}.product_id"), "no product has this id");
                return;
            }
            Some(product) => {
                if line.name.is_empty() {
                    line.name = product.name.clone();
                }
                if line.unit_price.is_none()
                    && let Some(price) = product.prices.iter().find(|p| p.currency_code == currency)
                {
                    line.unit_price = Some(price.clone());
                }
            }
        }
    }
    v.required(&format!("{field}.name"), &line.name);
    v.max_chars(&format!("{field}.name"), &line.name, MAX_PRODUCT_NAME);
    if line.quantity < 1 {
        v.add(format!("{field}.quantity"), "must be at least 1");
    }
    if !(0..=10_000).contains(&line.discount_bps) {
        v.add(format!("{field}.discount_bps"), "must be 0 to 10000 (hundredths of a percent)");
    }
    let Some(price) = &line.unit_price else {
        v.add(format!("{field}.unit_price"), format!("is required (the product has no price in {currency})"));
        return;
    };
    if price.currency_code != currency {
        v.add(
            format!("{field}.unit_price.currency_code"),
            format!("must be the currency the lines are in, {currency}"),
        );
        return;
    }
    if price.minor_units < 0 {
        v.add(format!("{field}.unit_price.minor_units"), "must not be negative");
        return;
    }
    if line.quantity < 1 || !(0..=10_000).contains(&line.discount_bps) {
        return;
    }
    match line_total(line.quantity, price.minor_units, i64::from(line.discount_bps)) {
        Some(total) if total <= MAX_AMOUNT => {
            line.total = Some(Money { currency_code: currency.to_string(), minor_units: total })
        }
        _ => v.add(format!("{field}.quantity"), format!("times the unit price exceeds {MAX_AMOUNT} minor units")),
    }
}

/// Longest a report's period may be, in months.
pub const MAX_REPORT_MONTHS: usize = 36;

/// A report's period from its days (YYYY-MM-DD, both included; either may be empty): by
/// default the twelve months up to `today` (the forecast: this month and the eleven after it),
/// or twelve months from or up to the one day given. `None` (with violations) when it is not
/// a period of at most [`MAX_REPORT_MONTHS`] months.
pub fn report_period(
    start: &str,
    end: &str,
    today: chrono::NaiveDate,
    ahead: bool,
    v: &mut Violations,
) -> Option<(chrono::NaiveDate, chrono::NaiveDate)> {
    use chrono::{Datelike, Months};
    let parse = |field: &str, text: &str, v: &mut Violations| {
        if text.trim().is_empty() {
            return Some(None);
        }
        let day = crm_kit::time::parse_date(text);
        if day.is_none() {
            v.add(field, "must be a day as YYYY-MM-DD");
        }
        day.map(Some)
    };
    let (start, end) = (parse("start_date", start, v)?, parse("end_date", end, v)?);
    let month_of = |d: chrono::NaiveDate| d.with_day(1).expect("every month has a first day");
    let last_of = |first: chrono::NaiveDate| first + Months::new(1) - chrono::Days::new(1);
    let (start, end) = match (start, end) {
        (Some(s), Some(e)) => (s, e),
        (Some(s), None) => (s, last_of(month_of(s) + Months::new(11))),
        (None, Some(e)) => (month_of(e) - Months::new(11), e),
        (None, None) if ahead => (month_of(today), last_of(month_of(today) + Months::new(11))),
        (None, None) => (month_of(today) - Months::new(11), today),
    };
    if end < start {
        v.add("end_date", "must not come before start_date");
        return None;
    }
    if months(start, end).len() > MAX_REPORT_MONTHS {
        v.add("end_date", format!("the period spans more than {MAX_REPORT_MONTHS} months"));
        return None;
    }
    Some((start, end))
}

/// The first days of the months from `start`'s to `end`'s (the first is `start` itself).
pub fn months(start: chrono::NaiveDate, end: chrono::NaiveDate) -> Vec<chrono::NaiveDate> {
    use chrono::{Datelike, Months};
    let mut out = vec![start];
    let mut next = start.with_day(1).expect("every month has a first day") + Months::new(1);
    while next <= end && out.len() <= MAX_REPORT_MONTHS {
        out.push(next);
        next = next + Months::new(1);
    }
    out
}

/// Most instalments a contract's plan has.
pub const MAX_INSTALMENTS: usize = 120;
/// Most days before an instalment's due date its reminder comes.
pub const MAX_REMINDER_DAYS: i32 = 60;
/// Days before an instalment's due date its reminder comes unless a contract says otherwise.
pub const DEFAULT_REMINDER_DAYS: i32 = 3;

/// Trims a quote and prices it: each line as a deal's (in the quote's currency), the subtotal,
/// the tax on it (rounded half up) and the total, all in minor units. `products` holds the
/// products the lines name.
pub fn price_quote(q: &mut Quote, products: &HashMap<String, Product>, v: &mut Violations) {
    q.currency_code = q.currency_code.trim().to_string();
    if !is_currency(&q.currency_code) {
        v.add("quote.currency_code", "must be an ISO 4217 code of three capital letters (default: the deal's)");
    }
    if !(0..=10_000).contains(&q.tax_rate_bps) {
        v.add("quote.tax_rate_bps", "must be 0 to 10000 (hundredths of a percent)");
    }
    q.valid_until = q.valid_until.trim().to_string();
    if !q.valid_until.is_empty() && parse_date(&q.valid_until).is_none() {
        v.add("quote.valid_until", "must be a day as YYYY-MM-DD");
    }
    v.max_chars("quote.notes", &q.notes, MAX_TEXT);
    if q.line_items.is_empty() {
        v.add("quote.line_items", "needs at least one line");
    }
    let currency = q.currency_code.clone();
    // Lines are priced only in a valid currency (one violation says it is not).
    let subtotal = if is_currency(&currency) {
        price_lines(&mut q.line_items, "quote.line_items", &currency, products, v)
    } else {
        None
    };
    let money = |n: i64| Some(Money { currency_code: currency.clone(), minor_units: n });
    let subtotal = subtotal.unwrap_or(0);
    let tax = line_total(1, subtotal, 0)
        .map_or(0, |s| ((i128::from(s) * i128::from(q.tax_rate_bps.clamp(0, 10_000)) + 5_000) / 10_000) as i64);
    let total = subtotal.checked_add(tax).filter(|t| *t <= MAX_AMOUNT);
    if total.is_none() {
        v.add("quote.line_items", format!("add up, with tax, to more than {MAX_AMOUNT} minor units"));
    }
    q.subtotal = money(subtotal);
    q.tax = money(tax);
    q.total = money(total.unwrap_or(0));
}

/// Checks a contract's own fields and fills its defaults (reminders 3 days ahead, UTC).
pub fn normalize_contract(c: &mut Contract, v: &mut Violations) {
    c.number = c.number.trim().to_string();
    v.required("contract.number", &c.number);
    v.max_chars("contract.number", &c.number, MAX_NAME);
    let mut day = |field: &str, text: &mut String, required: bool| {
        *text = text.trim().to_string();
        if text.is_empty() {
            if required {
                v.add(field, "is required, a day as YYYY-MM-DD");
            }
            return None;
        }
        let day = parse_date(text);
        if day.is_none() {
            v.add(field, "must be a day as YYYY-MM-DD");
        }
        day
    };
    day("contract.signed_date", &mut c.signed_date, true);
    let start = day("contract.start_date", &mut c.start_date, false);
    let end = day("contract.end_date", &mut c.end_date, false);
    if let (Some(start), Some(end)) = (start, end)
        && end < start
    {
        v.add("contract.end_date", "must not come before the start date");
    }
    let value = c.value.clone().unwrap_or_default();
    check_money(&value, "contract.value", v);
    if value.minor_units <= 0 || value.minor_units > MAX_AMOUNT {
        v.add("contract.value.minor_units", format!("must be more than 0 and at most {MAX_AMOUNT}"));
    }
    v.max_items("contract.instalments", &c.instalments, MAX_INSTALMENTS);
    let mut previous = String::new();
    let mut planned: i64 = 0;
    for (i, instalment) in c.instalments.iter_mut().enumerate() {
        let field = format!("contract.instalments[{i}]");
        instalment.due_date = instalment.due_date.trim().to_string();
        instalment.paid = None;
        if parse_date(&instalment.due_date).is_none() {
            v.add(format!("{field}.due_date"), "must be a day as YYYY-MM-DD");
        } else if instalment.due_date < previous {
            v.add(format!("{field}.due_date"), "must not come before the instalment before it");
        }
        previous = instalment.due_date.clone();
        let amount = instalment.amount.clone().unwrap_or_default();
        if amount.currency_code != value.currency_code {
            v.add(format!("{field}.amount.currency_code"), "must be the contract's currency");
        }
        if amount.minor_units <= 0 {
            v.add(format!("{field}.amount.minor_units"), "must be more than 0");
        }
        planned = planned.saturating_add(amount.minor_units.max(0));
    }
    if planned > value.minor_units {
        v.add("contract.instalments", "add up to more than the contract's value");
    }
    match c.reminder_days {
        None => c.reminder_days = Some(DEFAULT_REMINDER_DAYS),
        Some(days) if !(0..=MAX_REMINDER_DAYS).contains(&days) => {
            v.add("contract.reminder_days", format!("must be 0 to {MAX_REMINDER_DAYS}"))
        }
        Some(_) => {}
    }
    c.time_zone = c.time_zone.trim().to_string();
    if crm_kit::time::zone(&c.time_zone).is_none() {
        v.add("contract.time_zone", "must be an IANA time zone such as Europe/Berlin");
    }
    v.max_chars("contract.notes", &c.notes, MAX_TEXT);
}

/// Fills what a contract's money comes to on `today` (YYYY-MM-DD) from its value and what was
/// received: each instalment's paid part (payments pay instalments in due order), what is
/// outstanding, and what of the instalments due before today is unpaid.
pub fn settle(c: &mut Contract, today: &str) {
    let currency = c.value.as_ref().map(|m| m.currency_code.clone()).unwrap_or_default();
    let value = c.value.as_ref().map_or(0, |m| m.minor_units);
    let received = c.received.as_ref().map_or(0, |m| m.minor_units);
    let money = |n: i64| Some(Money { currency_code: currency.clone(), minor_units: n });
    let mut left = received;
    let mut overdue = 0;
    for instalment in &mut c.instalments {
        let amount = instalment.amount.as_ref().map_or(0, |m| m.minor_units);
        let paid = left.min(amount);
        left -= paid;
        instalment.paid = money(paid);
        if instalment.due_date.as_str() < today {
            overdue += amount - paid;
        }
    }
    c.outstanding = money((value - received).max(0));
    c.overdue = money(overdue);
}

/// A contract's reminders: for each instalment (numbered from 1), when its owner hears of it —
/// 09:00 in the contract's time zone, `reminder_days` before its due date — and the due date.
pub fn reminders(c: &Contract) -> Vec<(usize, i64, String)> {
    let days = c.reminder_days.unwrap_or(DEFAULT_REMINDER_DAYS);
    if days <= 0 {
        return Vec::new();
    }
    let tz = crm_kit::time::zone(&c.time_zone).unwrap_or(chrono_tz::Tz::UTC);
    let nine = chrono::NaiveTime::from_hms_opt(9, 0, 0).expect("09:00 is a time");
    c.instalments
        .iter()
        .enumerate()
        .filter_map(|(i, instalment)| {
            let due = parse_date(&instalment.due_date)?;
            let day = due.checked_sub_days(chrono::Days::new(days as u64))?;
            Some((i + 1, crm_kit::time::local_instant(tz, day.and_time(nine)), instalment.due_date.clone()))
        })
        .collect()
}

/// A target's period, "2026-12" (a month) or "2026-Q4" (a quarter), as its first and last day.
pub fn target_period(period: &str) -> Option<(chrono::NaiveDate, chrono::NaiveDate)> {
    let (year, part) = period.split_once('-')?;
    if year.len() != 4 {
        return None;
    }
    let year: i32 = year.parse().ok()?;
    let (first_month, months) = match part.strip_prefix('Q') {
        Some(q) if q.len() == 1 => {
            let q: u32 = q.parse().ok().filter(|q| (1..=4).contains(q))?;
            (3 * q - 2, 3)
        }
        Some(_) => return None,
        None if part.len() == 2 => (part.parse().ok().filter(|m| (1..=12).contains(m))?, 1),
        None => return None,
    };
    let start = chrono::NaiveDate::from_ymd_opt(year, first_month, 1)?;
    let end = start.checked_add_months(chrono::Months::new(months))?.pred_opt()?;
    Some((start, end))
}

/// Checks a target: a user or a department (one of the two), a period, a metric, a goal of more
/// than 0 in a currency, a time zone.
pub fn normalize_target(t: &mut Target, v: &mut Violations) {
    t.user_id = t.user_id.trim().to_string();
    t.department_id = t.department_id.trim().to_string();
    match (t.user_id.is_empty(), t.department_id.is_empty()) {
        (true, true) | (false, false) => v.add("target.user_id", "set exactly one of user_id and department_id"),
        (false, true) => {
            v.uuid("target.user_id", &t.user_id);
        }
        (true, false) => {
            v.uuid("target.department_id", &t.department_id);
        }
    }
    t.period = t.period.trim().to_string();
    if target_period(&t.period).is_none() {
        v.add("target.period", "must be a month (2026-12) or a quarter (2026-Q4)");
    }
    if !matches!(TargetMetric::try_from(t.metric), Ok(TargetMetric::WonValue | TargetMetric::PaymentsReceived)) {
        v.add("target.metric", "must be TARGET_METRIC_WON_VALUE or TARGET_METRIC_PAYMENTS_RECEIVED");
    }
    let amount = t.amount.clone().unwrap_or_default();
    check_money(&amount, "target.amount", v);
    if amount.minor_units <= 0 || amount.minor_units > MAX_AMOUNT {
        v.add("target.amount.minor_units", format!("must be more than 0 and at most {MAX_AMOUNT}"));
    }
    t.time_zone = t.time_zone.trim().to_string();
    if crm_kit::time::zone(&t.time_zone).is_none() {
        v.add("target.time_zone", "must be an IANA time zone such as Europe/Berlin");
    }
}

/// `achieved` of `goal` in hundredths of a percent, rounded half up (at most i32::MAX).
pub fn attainment_bps(achieved: i64, goal: i64) -> i32 {
    if goal <= 0 {
        return 0;
    }
    let bps = (i128::from(achieved) * 10_000 + i128::from(goal) / 2) / i128::from(goal);
    i32::try_from(bps).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_totals_are_exact_in_minor_units() {
        assert_eq!(line_total(3, 1_999, 0), Some(5_997));
        // 10% off 3 × 19.99 = 53.973 → 53.97.
        assert_eq!(line_total(3, 1_999, 1_000), Some(5_397));
        // Half a minor unit rounds up: 1 × 0.05 less 50% = 0.025 → 0.03.
        assert_eq!(line_total(1, 5, 5_000), Some(3));
        assert_eq!(line_total(2, i64::MAX, 0), None, "overflow");
        assert_eq!(line_total(-1, 100, 0), None);
        assert_eq!(line_total(1, 100, 10_001), None);
        assert_eq!(sum([i64::MAX, 1]), None);
        assert_eq!(sum([1, 2, 3]), Some(6));
    }

    #[test]
    fn pipelines_need_every_kind_of_stage_and_unique_names() {
        let stage = |name: &str, kind: StageKind| Stage { name: name.into(), kind: kind as i32, ..Default::default() };
        let mut v = Violations::new();
        check_stages(&[stage("New", StageKind::Open), stage(" new", StageKind::Won)], "pipeline.stages", &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["pipeline.stages[1].name", "pipeline.stages"]);
        let mut won = stage("Won", StageKind::Won);
        let mut v = Violations::new();
        normalize_stage(&mut won, "stage", &mut v);
        assert!(v.is_empty());
        assert_eq!(won.probability, 100);
        let mut bad = Stage { name: " ".into(), probability: 101, rotting_days: -1, ..Default::default() };
        let mut v = Violations::new();
        normalize_stage(&mut bad, "stage", &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["stage.name", "stage.kind", "stage.probability", "stage.rotting_days"]);
        let starting: Vec<Stage> = STARTING_STAGES.iter().map(|(n, _, k)| stage(n, *k)).collect();
        let mut v = Violations::new();
        check_stages(&starting, "pipeline.stages", &mut v);
        assert!(v.is_empty());
    }

    #[test]
    fn deals_are_priced_from_their_lines() {
        let money = |c: &str, n: i64| Some(Money { currency_code: c.into(), minor_units: n });
        let widget = Product {
            id: "p1".into(),
            name: "Widget".into(),
            prices: vec![Money { currency_code: "EUR".into(), minor_units: 1_999 }],
            ..Default::default()
        };
        let products = HashMap::from([("p1".to_string(), widget)]);
        let line = |product: &str, quantity: i64, price: Option<Money>, bps: i32| LineItem {
            product_id: product.into(),
            quantity,
            unit_price: price,
            discount_bps: bps,
            ..Default::default()
        };
        let mut deal = Deal {
            amount: money("EUR", 0),
            line_items: vec![line("p1", 3, None, 1_000), line("", 1, money("EUR", 500), 0)],
            ..Default::default()
        };
        deal.line_items[1].name = "Delivery".into();
        let mut v = Violations::new();
        price(&mut deal, &products, &mut v);
        assert!(v.is_empty(), "{:?}", v.iter().collect::<Vec<_>>());
        assert_eq!(deal.line_items[0].name, "Widget");
        assert_eq!(deal.line_items[0].total, money("EUR", 5_397));
        assert_eq!(deal.amount, money("EUR", 5_897));
        // Mixed currencies, an unknown product, a negative quantity, an overflow: each named.
        let mut bad = Deal {
            amount: money("EUR", 0),
            line_items: vec![
                line("", 1, money("USD", 100), 0),
                line("p9", 1, money("EUR", 1), 0),
                line("", -2, money("EUR", 1), 0),
                line("", 2, money("EUR", MAX_AMOUNT), 0),
            ],
            ..Default::default()
        };
        for (i, l) in bad.line_items.iter_mut().enumerate() {
            if i != 1 {
                l.name = "x".into();
            }
        }
        let mut v = Violations::new();
        price(&mut bad, &products, &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "deal.line_items[0].unit_price.currency_code",
                "deal.line_items[1].product_id",
                "deal.line_items[2].quantity",
                "deal.line_items[3].quantity",
            ]
        );
        assert_eq!(weighted(1_001, 50), 501, "half up");
        assert_eq!(weighted(MAX_AMOUNT, 100), MAX_AMOUNT);
        assert_eq!(parse_date("2028-02-29"), chrono::NaiveDate::from_ymd_opt(2028, 2, 29));
        assert!(parse_date("2027-02-29").is_none() && parse_date("2027-13-01").is_none());
    }

    #[test]
    fn products_have_one_price_per_currency() {
        let money = |c: &str, n: i64| Money { currency_code: c.into(), minor_units: n };
        let mut p = Product {
            name: " Widget ".into(),
            prices: vec![money("EUR", 100), money("eur", 1), money("EUR", -5)],
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_product(&mut p, &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            ["product.prices[1].currency_code", "product.prices[2].minor_units", "product.prices[2].currency_code"]
        );
        assert_eq!(p.name, "Widget");
    }

    #[test]
    fn target_periods_are_months_and_quarters() {
        let day = |t: &str| parse_date(t).unwrap();
        assert_eq!(target_period("2028-02"), Some((day("2028-02-01"), day("2028-02-29"))));
        assert_eq!(target_period("2026-Q4"), Some((day("2026-10-01"), day("2026-12-31"))));
        assert_eq!(target_period("2026-Q1"), Some((day("2026-01-01"), day("2026-03-31"))));
        for wrong in ["2026-13", "2026-Q0", "2026-Q5", "2026-1", "26-01", "2026", "2026-Q12", ""] {
            assert_eq!(target_period(wrong), None, "{wrong}");
        }
        assert_eq!(attainment_bps(7_500, 10_000), 7_500);
        assert_eq!(attainment_bps(2, 3), 6_667);
        assert_eq!(attainment_bps(1, 0), 0);
    }
}
