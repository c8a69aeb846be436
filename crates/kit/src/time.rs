//! Times are stored as UTC epoch microseconds in BIGINT columns (portable across backends).

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use prost_types::Timestamp;

/// Now, in epoch microseconds.
pub fn now_micros() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Epoch microseconds to a protobuf timestamp; `None` for 0 (never).
pub fn to_timestamp(micros: i64) -> Option<Timestamp> {
    (micros != 0).then(|| Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    })
}

/// A protobuf timestamp to epoch microseconds (sub-microsecond part dropped).
pub fn from_timestamp(ts: &Timestamp) -> i64 {
    ts.seconds.saturating_mul(1_000_000).saturating_add(i64::from(ts.nanos) / 1_000)
}

/// Parses an RFC 3339 time ("2026-01-31T09:00:00Z") into epoch microseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    text.parse::<Timestamp>().ok().map(|ts| from_timestamp(&ts))
}

/// Epoch microseconds rendered as RFC 3339.
pub fn format_rfc3339(micros: i64) -> String {
    to_timestamp(micros).map(|t| t.to_string()).unwrap_or_default()
}

/// A time zone by its IANA name ("Europe/Berlin"); empty is UTC; `None` for no such zone.
pub fn zone(name: &str) -> Option<Tz> {
    let name = name.trim();
    if name.is_empty() { Some(Tz::UTC) } else { Tz::from_str(name).ok() }
}

/// A wall-clock time in `tz` as epoch microseconds: the earlier instant when the clock shows
/// it twice (the hour repeated when daylight saving ends), the first instant after it when the
/// clock skips it.
pub fn local_instant(tz: Tz, local: NaiveDateTime) -> i64 {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.timestamp_micros(),
        LocalResult::Ambiguous(earlier, _) => earlier.timestamp_micros(),
        LocalResult::None => {
            // In a gap: the same offset as just before it, which lands after the gap.
            let before = tz.offset_from_utc_datetime(&(local - chrono::Duration::hours(3)));
            let offset = chrono::Offset::fix(&before);
            (local - offset).and_utc().timestamp_micros()
        }
    }
}

/// Where the day `date` begins in `tz`, in epoch microseconds.
pub fn day_start(date: chrono::NaiveDate, tz: Tz) -> i64 {
    local_instant(tz, date.and_time(chrono::NaiveTime::MIN))
}

/// The instants the days `first` to `last` (both included) span in `tz`: where `first` begins
/// and where the day after `last` begins, in epoch microseconds.
pub fn days_span(first: chrono::NaiveDate, last: chrono::NaiveDate, tz: Tz) -> (i64, i64) {
    let after = last.checked_add_days(chrono::Days::new(1)).unwrap_or(last);
    (day_start(first, tz), day_start(after, tz))
}

/// Today in `tz`.
pub fn today(tz: Tz) -> chrono::NaiveDate {
    Utc::now().with_timezone(&tz).date_naive()
}

/// A calendar day given as YYYY-MM-DD.
pub fn parse_date(text: &str) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_timestamp() {
        let micros = 1_764_000_000_123_456;
        let ts = to_timestamp(micros).unwrap();
        assert_eq!(from_timestamp(&ts), micros);
        assert_eq!(to_timestamp(0), None);
        assert_eq!(to_timestamp(-1).map(|t| (t.seconds, t.nanos)), Some((-1, 999_999_000)));
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1_000_000));
        assert_eq!(parse_rfc3339("2026-02-30T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(format_rfc3339(1_000_000), "1970-01-01T00:00:01Z");
    }
}
