//! Reports (D8) laid out as tables from the store's tallies ([`crate::store::reports`]), and
//! written as CSV. Plain Rust, without I/O.
//!
//! Money is never added across currencies: each money figure has a column per currency found
//! (one with a currency filter). Rates are hundredths of a percent, rounded half up; a rate of
//! nothing (no deals) is an empty cell.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crm_proto::deals::v1::{
    ColumnType, DealStatus, Pipeline, ReportCell, ReportColumn, ReportRow, StageKind, report_cell,
};

use crate::store::reports::Tally;

const WON: i64 = DealStatus::Won as i64;
const LOST: i64 = DealStatus::Lost as i64;
const OPEN: i64 = DealStatus::Open as i64;

/// A report's table.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Table {
    pub columns: Vec<ReportColumn>,
    pub rows: Vec<ReportRow>,
}

fn column(title: &str, name: &str, kind: ColumnType) -> ReportColumn {
    ReportColumn { title: title.into(), name: name.into(), r#type: kind as i32, currency_code: String::new() }
}

fn money_column(title: &str, name: &str, currency: &str) -> ReportColumn {
    ReportColumn {
        title: format!("{title} ({currency})"),
        name: format!("{name}_{}", currency.to_lowercase()),
        r#type: ColumnType::Money as i32,
        currency_code: currency.into(),
    }
}

fn text(s: impl Into<String>) -> ReportCell {
    ReportCell { value: Some(report_cell::Value::Text(s.into())) }
}

fn number(n: i64) -> ReportCell {
    ReportCell { value: Some(report_cell::Value::Number(n)) }
}

fn empty() -> ReportCell {
    ReportCell { value: None }
}

/// `part` of `whole` in hundredths of a percent, rounded half up; empty for a whole of 0.
pub fn rate(part: i64, whole: i64) -> ReportCell {
    if whole <= 0 {
        return empty();
    }
    number(((i128::from(part) * 10_000 + i128::from(whole) / 2) / i128::from(whole)) as i64)
}

/// `total` / `count` rounded half up; empty for no count.
fn average(total: i64, count: i64) -> ReportCell {
    if count <= 0 {
        return empty();
    }
    number(((i128::from(total) + i128::from(count) / 2) / i128::from(count)) as i64)
}

/// The currencies of `tallies` (deals without an amount have none), sorted.
fn currencies<'a>(tallies: impl IntoIterator<Item = &'a Tally>) -> Vec<String> {
    let set: BTreeSet<&str> = tallies.into_iter().map(|t| t.currency.as_str()).filter(|c| !c.is_empty()).collect();
    set.into_iter().map(str::to_string).collect()
}

/// Counts and money of a group of tallies: deals, and per currency the deals with an amount
/// and their sum.
#[derive(Debug, Default, Clone)]
struct Sums {
    count: i64,
    extra: i64,
    money: HashMap<String, (i64, i64)>,
}

impl Sums {
    fn add(&mut self, t: &Tally) {
        self.count += t.count;
        self.extra += t.extra;
        if !t.currency.is_empty() {
            let m = self.money.entry(t.currency.clone()).or_default();
            m.0 += t.count;
            m.1 += t.amount;
        }
    }

    fn amount(&self, currency: &str) -> i64 {
        self.money.get(currency).map_or(0, |m| m.1)
    }

    fn average(&self, currency: &str) -> ReportCell {
        self.money.get(currency).map_or_else(empty, |m| average(m.1, m.0))
    }
}

/// The funnel of `pipeline` over the deals created in the period. A deal got at least as far
/// as an open stage when the furthest open stage it entered (or the one it is in) comes no
/// earlier in the pipeline's order now; a won deal got through every open stage.
pub fn funnel(pipeline: &Pipeline, tallies: &[Tally]) -> Table {
    let position: HashMap<&str, i32> = pipeline.stages.iter().map(|s| (s.id.as_str(), s.position)).collect();
    let at = |id: &str| position.get(id).copied().unwrap_or(0);
    let reached_position = |t: &Tally| {
        if t.status == WON {
            i32::MAX
        } else if t.status == OPEN {
            at(&t.furthest).max(at(&t.key))
        } else {
            at(&t.furthest)
        }
    };
    let currencies = currencies(tallies);
    let created: i64 = tallies.iter().map(|t| t.count).sum();
    let mut columns = vec![
        column("Stage", "stage", ColumnType::Text),
        column("Kind", "kind", ColumnType::Text),
        column("Reached", "reached", ColumnType::Count),
        column("In stage now", "in_stage", ColumnType::Count),
        column("Conversion from previous stage", "conversion", ColumnType::Percent),
        column("Share of deals created", "share", ColumnType::Percent),
    ];
    columns.extend(currencies.iter().map(|c| money_column("Value reached", "value", c)));
    let mut rows = Vec::new();
    let mut previous_open: Option<i64> = None;
    let mut last_open = 0;
    for stage in &pipeline.stages {
        let kind = StageKind::try_from(stage.kind).unwrap_or(StageKind::Open);
        let mut reached = Sums::default();
        let mut now = 0;
        for t in tallies {
            if t.key == stage.id {
                now += t.count;
            }
            let got_there = match kind {
                StageKind::Won | StageKind::Lost => t.key == stage.id,
                _ => reached_position(t) >= stage.position,
            };
            if got_there {
                reached.add(t);
            }
        }
        let (kind_name, conversion) = match kind {
            StageKind::Won => ("won", rate(reached.count, last_open)),
            StageKind::Lost => ("lost", empty()),
            _ => {
                let conversion = previous_open.map_or_else(empty, |p| rate(reached.count, p));
                previous_open = Some(reached.count);
                last_open = reached.count;
                ("open", conversion)
            }
        };
        let mut cells = vec![
            text(stage.name.clone()),
            text(kind_name),
            number(reached.count),
            number(now),
            conversion,
            rate(reached.count, created),
        ];
        cells.extend(currencies.iter().map(|c| number(reached.amount(c))));
        rows.push(ReportRow { cells });
    }
    Table { columns, rows }
}

/// Per month (`months` are their labels; a tally's key is a month's index): deals won and
/// lost, the win rate, the average sales cycle of the won ones, won value and average won deal
/// per currency; then the totals.
pub fn won_lost(months: &[String], tallies: &[Tally]) -> Table {
    let currencies = currencies(tallies.iter().filter(|t| t.status == WON));
    let mut columns = vec![
        column("Month", "month", ColumnType::Text),
        column("Won", "won", ColumnType::Count),
        column("Lost", "lost", ColumnType::Count),
        column("Win rate", "win_rate", ColumnType::Percent),
        column("Average sales cycle", "sales_cycle", ColumnType::Duration),
    ];
    for c in &currencies {
        columns.push(money_column("Won value", "won_value", c));
        columns.push(money_column("Average won deal", "average_won", c));
    }
    let row = |label: String, of: &dyn Fn(&Tally) -> bool| {
        let (mut won, mut lost) = (Sums::default(), Sums::default());
        for t in tallies.iter().filter(|t| of(t)) {
            match t.status {
                WON => won.add(t),
                LOST => lost.add(t),
                _ => {}
            }
        }
        let mut cells = vec![
            text(label),
            number(won.count),
            number(lost.count),
            rate(won.count, won.count + lost.count),
            average(won.extra, won.count),
        ];
        for c in &currencies {
            cells.push(number(won.amount(c)));
            cells.push(won.average(c));
        }
        ReportRow { cells }
    };
    let mut rows: Vec<ReportRow> =
        months.iter().enumerate().map(|(i, m)| row(m.clone(), &|t: &Tally| t.key == i.to_string())).collect();
    rows.push(row("Total".into(), &|_| true));
    Table { columns, rows }
}

/// Rows of `tallies` grouped by their key, most deals first (then by key): lost reasons, lead
/// sources. `none` names the empty key.
fn by_key(tallies: &[Tally], key: &str, none: &str, count: &str, value: &str) -> Table {
    let currencies = currencies(tallies);
    let mut columns = vec![
        column(key, &key.to_lowercase().replace(' ', "_"), ColumnType::Text),
        column(count, &count.to_lowercase().replace(' ', "_"), ColumnType::Count),
        column("Share", "share", ColumnType::Percent),
    ];
    columns.extend(currencies.iter().map(|c| money_column(value, &value.to_lowercase().replace(' ', "_"), c)));
    let mut groups: BTreeMap<&str, Sums> = BTreeMap::new();
    for t in tallies {
        groups.entry(t.key.as_str()).or_default().add(t);
    }
    let total: i64 = groups.values().map(|s| s.count).sum();
    let mut groups: Vec<(&str, Sums)> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let rows = groups
        .into_iter()
        .map(|(k, sums)| {
            let mut cells = vec![
                text(if k.is_empty() { none.to_string() } else { k.to_string() }),
                number(sums.count),
                rate(sums.count, total),
            ];
            cells.extend(currencies.iter().map(|c| number(sums.amount(c))));
            ReportRow { cells }
        })
        .collect();
    Table { columns, rows }
}

/// Deals lost in the period by reason.
pub fn lost_reasons(tallies: &[Tally]) -> Table {
    by_key(tallies, "Lost reason", "(none given)", "Lost", "Lost value")
}

/// Deals won in the period by lead source.
pub fn won_by_source(tallies: &[Tally]) -> Table {
    by_key(tallies, "Source", "(no source)", "Won", "Won value")
}

/// Per owner: won, lost, win rate, won value and average won deal per currency; the largest
/// won value first (currencies in their column order), then the most deals won.
pub fn leaderboard(tallies: &[Tally], names: &HashMap<String, String>) -> Table {
    let currencies = currencies(tallies.iter().filter(|t| t.status == WON));
    let mut columns = vec![
        column("Owner", "owner", ColumnType::Text),
        column("Owner id", "owner_id", ColumnType::Text),
        column("Won", "won", ColumnType::Count),
        column("Lost", "lost", ColumnType::Count),
        column("Win rate", "win_rate", ColumnType::Percent),
    ];
    for c in &currencies {
        columns.push(money_column("Won value", "won_value", c));
        columns.push(money_column("Average won deal", "average_won", c));
    }
    let mut owners: BTreeMap<&str, (Sums, Sums)> = BTreeMap::new();
    for t in tallies {
        let entry = owners.entry(t.key.as_str()).or_default();
        match t.status {
            WON => entry.0.add(t),
            LOST => entry.1.add(t),
            _ => {}
        }
    }
    let mut owners: Vec<(&str, (Sums, Sums))> = owners.into_iter().collect();
    let rank = |won: &Sums| (currencies.iter().map(|c| won.amount(c)).collect::<Vec<_>>(), won.count);
    owners.sort_by(|a, b| rank(&b.1.0).cmp(&rank(&a.1.0)).then(a.0.cmp(b.0)));
    let rows = owners
        .into_iter()
        .map(|(owner, (won, lost))| {
            let mut cells = vec![
                text(names.get(owner).cloned().unwrap_or_default()),
                text(owner),
                number(won.count),
                number(lost.count),
                rate(won.count, won.count + lost.count),
            ];
            for c in &currencies {
                cells.push(number(won.amount(c)));
                cells.push(won.average(c));
            }
            ReportRow { cells }
        })
        .collect();
    Table { columns, rows }
}

/// Per month of creation: deals created, won, lost, still open, and the share won; then the
/// totals.
pub fn conversion(months: &[String], tallies: &[Tally]) -> Table {
    let columns = vec![
        column("Month", "month", ColumnType::Text),
        column("Created", "created", ColumnType::Count),
        column("Won", "won", ColumnType::Count),
        column("Lost", "lost", ColumnType::Count),
        column("Open", "open", ColumnType::Count),
        column("Won of created", "conversion", ColumnType::Percent),
    ];
    let row = |label: String, of: &dyn Fn(&Tally) -> bool| {
        let count = |status: i64| tallies.iter().filter(|t| of(t) && t.status == status).map(|t| t.count).sum::<i64>();
        let (won, lost, open) = (count(WON), count(LOST), count(OPEN));
        let created = won + lost + open;
        ReportRow {
            cells: vec![text(label), number(created), number(won), number(lost), number(open), rate(won, created)],
        }
    };
    let mut rows: Vec<ReportRow> =
        months.iter().enumerate().map(|(i, m)| row(m.clone(), &|t: &Tally| t.key == i.to_string())).collect();
    rows.push(row("Total".into(), &|_| true));
    Table { columns, rows }
}

/// Open deals per expected close month (`months` as "YYYY-MM"): how many, their value and their
/// value weighted by probability per currency; then the totals.
pub fn forecast(months: &[String], tallies: &[Tally]) -> Table {
    let currencies = currencies(tallies);
    let mut columns =
        vec![column("Month", "month", ColumnType::Text), column("Open deals", "deals", ColumnType::Count)];
    for c in &currencies {
        columns.push(money_column("Value", "value", c));
        columns.push(money_column("Weighted value", "weighted", c));
    }
    let row = |label: String, of: &dyn Fn(&Tally) -> bool| {
        let chosen: Vec<&Tally> = tallies.iter().filter(|t| of(t)).collect();
        let mut cells = vec![text(label), number(chosen.iter().map(|t| t.count).sum())];
        for c in &currencies {
            let of_currency = chosen.iter().filter(|t| &t.currency == c);
            let (value, weighted) = of_currency.fold((0, 0), |(v, w), t| (v + t.amount, w + t.extra));
            cells.push(number(value));
            cells.push(number(weighted));
        }
        ReportRow { cells }
    };
    let mut rows: Vec<ReportRow> = months.iter().map(|m| row(m.clone(), &|t: &Tally| &t.key == m)).collect();
    rows.push(row("Total".into(), &|_| true));
    Table { columns, rows }
}

/// Digits after the decimal point of an ISO 4217 currency (2 unless listed).
pub fn minor_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "UYI" | "VND"
        | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

/// `n` with `digits` of it after a decimal point: 123456, 2 → "1234.56".
fn decimal(n: i64, digits: u32) -> String {
    if digits == 0 {
        return n.to_string();
    }
    let scale = 10_u64.pow(digits);
    let sign = if n < 0 { "-" } else { "" };
    let abs = n.unsigned_abs();
    format!("{sign}{}.{:0width$}", abs / scale, abs % scale, width = digits as usize)
}

/// An amount for people to read: minor units in major ones with the currency, "2500.00 EUR".
pub fn money_text(minor_units: i64, currency: &str) -> String {
    format!("{} {currency}", decimal(minor_units, minor_digits(currency)))
}

/// A cell as CSV shows it: money in major units, rates as percentages, durations in days.
fn csv_value(column: &ReportColumn, cell: &ReportCell) -> String {
    match &cell.value {
        None => String::new(),
        Some(report_cell::Value::Text(t)) => t.clone(),
        Some(report_cell::Value::Number(n)) => match ColumnType::try_from(column.r#type) {
            Ok(ColumnType::Money) => decimal(*n, minor_digits(&column.currency_code)),
            Ok(ColumnType::Percent) => decimal(*n, 2),
            Ok(ColumnType::Duration) => decimal((n * 10 + 43_200) / 86_400, 1),
            _ => n.to_string(),
        },
    }
}

/// The table as CSV (RFC 4180): a header of the columns' titles (durations "(days)"), then a
/// line per row.
pub fn csv(table: &Table) -> Result<Vec<u8>, csv::Error> {
    let mut out = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(Vec::new());
    out.write_record(table.columns.iter().map(|c| {
        if c.r#type == ColumnType::Duration as i32 { format!("{} (days)", c.title) } else { c.title.clone() }
    }))?;
    for row in &table.rows {
        out.write_record(table.columns.iter().zip(&row.cells).map(|(c, cell)| csv_value(c, cell)))?;
    }
    out.into_inner().map_err(|e| e.into_error().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::deals::v1::Stage;

    fn t(key: &str, furthest: &str, status: i64, currency: &str, count: i64, amount: i64) -> Tally {
        Tally { key: key.into(), furthest: furthest.into(), status, currency: currency.into(), count, amount, extra: 0 }
    }

    fn numbers(row: &ReportRow) -> Vec<Option<i64>> {
        row.cells
            .iter()
            .map(|c| match c.value {
                Some(report_cell::Value::Number(n)) => Some(n),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn funnel_counts_how_far_deals_got() {
        let stage = |id: &str, position: i32, kind: StageKind| Stage {
            id: id.into(),
            name: id.to_uppercase(),
            position,
            kind: kind as i32,
            ..Default::default()
        };
        let pipeline = Pipeline {
            stages: vec![
                stage("a", 1, StageKind::Open),
                stage("b", 2, StageKind::Open),
                stage("c", 3, StageKind::Open),
                stage("won", 4, StageKind::Won),
                stage("lost", 5, StageKind::Lost),
            ],
            ..Default::default()
        };
        let tallies = [
            // 4 open in a, 3 open in b (one got to c and came back), 2 won, 1 lost after b.
            t("a", "a", OPEN, "", 4, 0),
            t("b", "b", OPEN, "EUR", 2, 2_000),
            t("b", "c", OPEN, "EUR", 1, 500),
            t("won", "c", WON, "EUR", 2, 10_000),
            t("lost", "b", LOST, "USD", 1, 700),
        ];
        let table = funnel(&pipeline, &tallies);
        let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["stage", "kind", "reached", "in_stage", "conversion", "share", "value_eur", "value_usd"]);
        let rows: Vec<Vec<Option<i64>>> = table.rows.iter().map(numbers).collect();
        // Reached: a 10, b 6 (2+1+2+1), c 3 (1+2), won 2, lost 1.
        assert_eq!(rows[0], [None, None, Some(10), Some(4), None, Some(10_000), Some(12_500), Some(700)]);
        assert_eq!(rows[1], [None, None, Some(6), Some(3), Some(6_000), Some(6_000), Some(12_500), Some(700)]);
        assert_eq!(rows[2], [None, None, Some(3), Some(0), Some(5_000), Some(3_000), Some(10_500), Some(0)]);
        assert_eq!(rows[3], [None, None, Some(2), Some(2), Some(6_667), Some(2_000), Some(10_000), Some(0)]);
        assert_eq!(rows[4], [None, None, Some(1), Some(1), None, Some(1_000), Some(0), Some(700)]);
    }

    #[test]
    fn won_lost_adds_up_per_month_and_in_total() {
        let mut won = t("0", "", WON, "EUR", 2, 3_001);
        won.extra = 2 * 86_400 * 10;
        let tallies = [won, t("1", "", LOST, "EUR", 3, 900), t("1", "", WON, "JPY", 1, 500)];
        let table = won_lost(&["2026-01".into(), "2026-02".into()], &tallies);
        let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "month",
                "won",
                "lost",
                "win_rate",
                "sales_cycle",
                "won_value_eur",
                "average_won_eur",
                "won_value_jpy",
                "average_won_jpy"
            ]
        );
        let rows: Vec<Vec<Option<i64>>> = table.rows.iter().map(numbers).collect();
        assert_eq!(
            rows[0],
            [None, Some(2), Some(0), Some(10_000), Some(864_000), Some(3_001), Some(1_501), Some(0), None]
        );
        assert_eq!(rows[1], [None, Some(1), Some(3), Some(2_500), Some(0), Some(0), None, Some(500), Some(500)]);
        assert_eq!(
            rows[2],
            [None, Some(3), Some(3), Some(5_000), Some(576_000), Some(3_001), Some(1_501), Some(500), Some(500)]
        );
        let csv = String::from_utf8(csv(&table).unwrap()).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "Month,Won,Lost,Win rate,Average sales cycle (days),Won value (EUR),Average won deal (EUR),Won value (JPY),Average won deal (JPY)"
        );
        assert_eq!(lines[1], "2026-01,2,0,100.00,10.0,30.01,15.01,0,");
    }

    #[test]
    fn keyed_reports_rank_by_count_and_name_the_empty_key() {
        let tallies = [t("", "", WON, "EUR", 1, 100), t("web, \"form\"", "", WON, "EUR", 3, 300)];
        let table = won_by_source(&tallies);
        let csv = String::from_utf8(csv(&table).unwrap()).unwrap();
        assert_eq!(
            csv,
            "Source,Won,Share,Won value (EUR)\r\n\"web, \"\"form\"\"\",3,75.00,3.00\r\n(no source),1,25.00,1.00\r\n"
        );
    }

    #[test]
    fn leaderboard_ranks_by_won_value_then_deals() {
        let tallies = [
            t("u1", "", WON, "EUR", 1, 500),
            t("u2", "", WON, "EUR", 3, 500),
            t("u3", "", WON, "EUR", 1, 900),
            t("u4", "", LOST, "EUR", 2, 900),
        ];
        let names = HashMap::from([("u1".to_string(), "Ann".to_string())]);
        let table = leaderboard(&tallies, &names);
        let owners: Vec<String> = table
            .rows
            .iter()
            .map(|r| match &r.cells[1].value {
                Some(report_cell::Value::Text(t)) => t.clone(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(owners, ["u3", "u2", "u1", "u4"]);
        assert_eq!(table.rows[2].cells[0], text("Ann"));
        assert_eq!(table.rows[3].cells[4], rate(0, 2));
    }

    #[test]
    fn money_prints_in_major_units() {
        assert_eq!(decimal(123_456, 2), "1234.56");
        assert_eq!(decimal(5, 2), "0.05");
        assert_eq!(decimal(-5, 3), "-0.005");
        assert_eq!(decimal(1_000, 0), "1000");
        assert_eq!(minor_digits("JPY"), 0);
        assert_eq!(minor_digits("KWD"), 3);
        assert_eq!(minor_digits("EUR"), 2);
    }
}
