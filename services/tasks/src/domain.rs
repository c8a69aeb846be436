//! The rules of tasks and activity records in plain Rust, without I/O: what a valid task or
//! record is, and time on a user's wall clock — when a reminder fires, which day a record counts
//! for, how a due time reads in its time zone.

use chrono::{DateTime, Days, Utc};
use chrono_tz::Tz;
use crm_kit::Violations;
use crm_proto::contacts::v1::RecordType;
use crm_proto::tasks::v1::{Activity, ActivityType, CalendarEvent, CustomerRef, EventKind, Priority, Task, TaskKind};

/// `due_at` of a task without a due time: after every dated one.
pub const NO_DUE: i64 = i64::MAX;
pub const MAX_TITLE: usize = 300;
pub const MAX_TEXT: usize = 10_000;
pub const MAX_SUMMARY: usize = 500;
pub const MAX_COMMENT: usize = 5_000;
pub const MAX_REMINDERS: usize = 5;
/// Longest a reminder may come before the due time.
pub const MAX_REMINDER_LEAD_SECS: i64 = 30 * 86_400;
/// How far in the future an activity record's time may lie (clocks differ a little).
pub const FUTURE_SLACK_MICROS: i64 = 5 * 60 * 1_000_000;
const DAY_SECS: i64 = 86_400;

use crm_kit::time::local_instant as instant;
pub use crm_kit::time::{parse_date, today, zone};

fn utc(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// When a reminder `before_secs` ahead of `due_at` fires. Whole days are counted on the wall
/// clock of `tz` (a reminder a day before a 09:00 meeting fires at 09:00 the day before, even
/// when daylight saving changed in between); the rest of the lead is then taken off as elapsed
/// time.
pub fn reminder_at(due_at: i64, tz: Tz, before_secs: i64) -> i64 {
    let days = before_secs.div_euclid(DAY_SECS);
    let rest = before_secs.rem_euclid(DAY_SECS);
    let local = utc(due_at).with_timezone(&tz).naive_local();
    let day_earlier = local.checked_sub_days(Days::new(days as u64)).unwrap_or(local);
    let at = if days == 0 { due_at } else { instant(tz, day_earlier) };
    at - rest * 1_000_000
}

/// "2026-12-08 09:00 Europe/Berlin": an instant on the wall clock of `tz`.
pub fn local_label(micros: i64, tz: Tz) -> String {
    format!("{} {}", utc(micros).with_timezone(&tz).format("%Y-%m-%d %H:%M"), tz.name())
}

/// The day (YYYY-MM-DD) an instant falls on in `tz`.
pub fn local_date(micros: i64, tz: Tz) -> String {
    utc(micros).with_timezone(&tz).format("%Y-%m-%d").to_string()
}

fn micros(ts: &Option<prost_types::Timestamp>) -> Option<i64> {
    ts.as_ref().map(crm_kit::time::from_timestamp)
}

/// The customer a task or record links to, checked in form (that it exists and the caller may
/// see it is asked of contacts, which also names it).
fn check_customer(customer: &mut Option<CustomerRef>, field: &str, v: &mut Violations) {
    let Some(c) = customer else { return };
    c.id = c.id.trim().to_string();
    if c.id.is_empty() && c.record_type == 0 {
        *customer = None;
        return;
    }
    if !matches!(RecordType::try_from(c.record_type), Ok(RecordType::Company | RecordType::Person)) {
        v.add(format!("{field}.record_type"), "must be RECORD_TYPE_COMPANY or RECORD_TYPE_PERSON");
    }
    v.uuid(&format!("{field}.id"), &c.id);
}

/// Trims a task's fields and fills its defaults, adding a violation for each field that is
/// wrong. `field` prefixes the names ("task").
pub fn normalize_task(task: &mut Task, v: &mut Violations) {
    task.title = task.title.trim().to_string();
    v.required("task.title", &task.title);
    v.max_chars("task.title", &task.title, MAX_TITLE);
    v.max_chars("task.description", &task.description, MAX_TEXT);
    if task.kind == 0 {
        task.kind = TaskKind::Todo as i32;
    } else if TaskKind::try_from(task.kind).is_err() {
        v.add("task.kind", "must be TASK_KIND_TODO or TASK_KIND_FOLLOW_UP");
    }
    if task.priority == 0 {
        task.priority = Priority::Normal as i32;
    } else if Priority::try_from(task.priority).is_err() {
        v.add("task.priority", "must be PRIORITY_LOW, PRIORITY_NORMAL, PRIORITY_HIGH or PRIORITY_URGENT");
    }
    task.assignee_id = task.assignee_id.trim().to_string();
    v.optional_uuid("task.assignee_id", &task.assignee_id);
    task.time_zone = task.time_zone.trim().to_string();
    if task.time_zone.is_empty() {
        task.time_zone = "UTC".into();
    }
    if zone(&task.time_zone).is_none() {
        v.add("task.time_zone", "is not an IANA time zone such as Europe/Berlin or Asia/Shanghai");
    }
    if let Some(due) = &task.due_time
        && !(0..=253_402_300_799).contains(&due.seconds)
    {
        v.add("task.due_time", "must lie between 1970 and 9999");
    }
    v.max_items("task.reminders", &task.reminders, MAX_REMINDERS);
    if !task.reminders.is_empty() && task.due_time.is_none() {
        v.add("task.reminders", "need a due_time to count back from");
    }
    for (i, r) in task.reminders.iter().enumerate() {
        if r.seconds < 0 || r.nanos < 0 || r.seconds > MAX_REMINDER_LEAD_SECS {
            v.add(format!("task.reminders[{i}]"), "must be 0 to 30 days before the due time");
        }
    }
    task.reminders.sort_by_key(|r| std::cmp::Reverse(r.seconds));
    task.reminders.dedup_by_key(|r| r.seconds);
    task.deal_id = task.deal_id.trim().to_string();
    v.optional_uuid("task.deal_id", &task.deal_id);
    check_customer(&mut task.customer, "task.customer", v);
}

/// The due time of a task as stored.
pub fn due_at(task: &Task) -> i64 {
    micros(&task.due_time).unwrap_or(NO_DUE)
}

/// When each reminder of `task` fires, in its order; a violation for each that lies before
/// `now` (a reminder must be ahead when it is set).
pub fn reminder_times(task: &Task, now: i64, v: &mut Violations) -> Vec<i64> {
    let Some(due) = micros(&task.due_time) else { return Vec::new() };
    let tz = zone(&task.time_zone).unwrap_or(Tz::UTC);
    let mut times = Vec::new();
    for (i, r) in task.reminders.iter().enumerate() {
        let at = reminder_at(due, tz, r.seconds);
        if at < now {
            v.add(
                format!("task.reminders[{i}]"),
                format!("would fire at {}, which has passed", crm_kit::time::format_rfc3339(at)),
            );
        }
        times.push(at);
    }
    times
}

/// Trims an activity record's fields and fills its defaults (its time: `now`).
pub fn normalize_activity(activity: &mut Activity, now: i64, v: &mut Violations) {
    if activity.r#type == 0 || ActivityType::try_from(activity.r#type).is_err() {
        v.add("activity.type", "must be one of ACTIVITY_TYPE_CALL, _EMAIL, _MEETING, _VISIT, _MESSAGE or _NOTE");
    }
    activity.summary = activity.summary.trim().to_string();
    v.required("activity.summary", &activity.summary);
    v.max_chars("activity.summary", &activity.summary, MAX_SUMMARY);
    v.max_chars("activity.outcome", &activity.outcome, MAX_TEXT);
    match micros(&activity.occur_time) {
        None => activity.occur_time = crm_kit::time::to_timestamp(now),
        Some(at) if at > now + FUTURE_SLACK_MICROS => {
            v.add("activity.occur_time", "lies in the future; log what has happened (plan what will with a task)")
        }
        Some(at) if at <= 0 => v.add("activity.occur_time", "must lie after 1970"),
        Some(_) => {}
    }
    activity.time_zone = activity.time_zone.trim().to_string();
    if activity.time_zone.is_empty() {
        activity.time_zone = "UTC".into();
    }
    if zone(&activity.time_zone).is_none() {
        v.add("activity.time_zone", "is not an IANA time zone such as Europe/Berlin or Asia/Shanghai");
    }
    activity.deal_id = activity.deal_id.trim().to_string();
    v.optional_uuid("activity.deal_id", &activity.deal_id);
    activity.task_id = activity.task_id.trim().to_string();
    v.optional_uuid("activity.task_id", &activity.task_id);
    check_customer(&mut activity.customer, "activity.customer", v);
    if let (Some(at), Some(tz)) = (micros(&activity.occur_time), zone(&activity.time_zone)) {
        activity.occur_date = local_date(at, tz);
    }
}

/// Longest a calendar event may last.
pub const MAX_EVENT_MICROS: i64 = 14 * 86_400 * 1_000_000;
pub const MAX_ATTENDEES: usize = 50;
/// Most days one agenda spans.
pub const MAX_AGENDA_DAYS: i64 = 31;

/// Trims a calendar event's fields and fills its defaults, adding a violation for each field
/// that is wrong. The organizer is dropped from the attendees (they take part anyway).
pub fn normalize_event(event: &mut CalendarEvent, v: &mut Violations) {
    if event.kind == 0 {
        event.kind = EventKind::Meeting as i32;
    } else if EventKind::try_from(event.kind).is_err() {
        v.add("event.kind", "must be EVENT_KIND_MEETING or EVENT_KIND_CALL");
    }
    event.title = event.title.trim().to_string();
    v.required("event.title", &event.title);
    v.max_chars("event.title", &event.title, MAX_TITLE);
    v.max_chars("event.description", &event.description, MAX_TEXT);
    event.location = event.location.trim().to_string();
    v.max_chars("event.location", &event.location, MAX_TITLE);
    match (micros(&event.start_time), micros(&event.end_time)) {
        (None, _) => v.add("event.start_time", "is required"),
        (_, None) => v.add("event.end_time", "is required"),
        (Some(start), Some(end)) if end <= start => v.add("event.end_time", "must come after start_time"),
        (Some(start), Some(end)) if end - start > MAX_EVENT_MICROS => {
            v.add("event.end_time", "must be at most 14 days after start_time")
        }
        (Some(start), _) if !(0..=253_402_300_799_000_000).contains(&start) => {
            v.add("event.start_time", "must lie between 1970 and 9999")
        }
        _ => {}
    }
    event.time_zone = event.time_zone.trim().to_string();
    if event.time_zone.is_empty() {
        event.time_zone = "UTC".into();
    }
    if zone(&event.time_zone).is_none() {
        v.add("event.time_zone", "is not an IANA time zone such as Europe/Berlin or Asia/Shanghai");
    }
    let organizer = event.organizer_id.clone();
    let mut attendees: Vec<String> = Vec::new();
    for (i, id) in event.attendee_ids.iter().enumerate() {
        let id = id.trim().to_string();
        v.uuid(&format!("event.attendee_ids[{i}]"), &id);
        if id != organizer && !attendees.contains(&id) {
            attendees.push(id);
        }
    }
    event.attendee_ids = attendees;
    v.max_items("event.attendee_ids", &event.attendee_ids, MAX_ATTENDEES);
    event.deal_id = event.deal_id.trim().to_string();
    v.optional_uuid("event.deal_id", &event.deal_id);
    check_customer(&mut event.customer, "event.customer", v);
}

/// The first instant of `date` in `tz`, and of the day `days` later: an agenda's range.
pub fn day_range(date: chrono::NaiveDate, days: i64, tz: Tz) -> (i64, i64) {
    let end_date = date.checked_add_days(Days::new(days as u64)).unwrap_or(date);
    (crm_kit::time::day_start(date, tz), crm_kit::time::day_start(end_date, tz))
}

/// "2026-12-08 09:00": an instant on the wall clock of `tz`, without the zone's name.
pub fn local_time(micros: i64, tz: Tz) -> String {
    utc(micros).with_timezone(&tz).format("%Y-%m-%d %H:%M").to_string()
}

/// The pairs of `events` (id, start, end; sorted by start) whose times overlap.
pub fn overlaps(events: &[(String, i64, i64)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, (a, _, a_end)) in events.iter().enumerate() {
        for (b, b_start, _) in &events[i + 1..] {
            if *b_start >= *a_end {
                break;
            }
            out.push((a.clone(), b.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        crm_kit::time::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn whole_days_keep_the_wall_clock_across_daylight_saving() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // Clocks go forward on 2027-03-28 at 02:00: 12:00 CEST on the 28th is 10:00Z; a day
        // before is 12:00 CET on the 27th, 11:00Z — 23 hours earlier, not 24.
        let due = at("2027-03-28T10:00:00Z");
        assert_eq!(reminder_at(due, berlin, 86_400), at("2027-03-27T11:00:00Z"));
        assert_eq!(local_label(reminder_at(due, berlin, 86_400), berlin), "2027-03-27 12:00 Europe/Berlin");
        // A day and an hour before: the wall-clock day, then one elapsed hour.
        assert_eq!(reminder_at(due, berlin, 90_000), at("2027-03-27T10:00:00Z"));
        // Less than a day is elapsed time.
        assert_eq!(reminder_at(due, berlin, 3_600), at("2027-03-28T09:00:00Z"));
        // Back in autumn (2027-10-31, 03:00 → 02:00): a week before 09:00 CET is 09:00 CEST.
        let due = at("2027-11-02T08:00:00Z");
        assert_eq!(reminder_at(due, berlin, 7 * 86_400), at("2027-10-26T07:00:00Z"));
        // In UTC a day is 24 hours.
        assert_eq!(reminder_at(due, Tz::UTC, 86_400), due - 86_400_000_000);
    }

    #[test]
    fn wall_clock_times_in_a_gap_or_twice_resolve() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 02:30 on 2027-03-28 does not exist in Berlin: a day before 02:30 CET on the 29th…
        // that one exists; take a due time at 02:30 on the 29th, reminder 1 day → the 28th
        // 02:30, in the gap → 03:30 CEST (01:30Z).
        let due = at("2027-03-29T00:30:00Z");
        assert_eq!(local_label(due, berlin), "2027-03-29 02:30 Europe/Berlin");
        assert_eq!(reminder_at(due, berlin, 86_400), at("2027-03-28T01:30:00Z"));
        // 02:30 on 2027-10-31 happens twice: the earlier (CEST, 00:30Z).
        let due = at("2027-11-01T01:30:00Z");
        assert_eq!(reminder_at(due, berlin, 86_400), at("2027-10-31T00:30:00Z"));
    }

    #[test]
    fn agenda_days_follow_the_wall_clock() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // The day daylight saving starts has 23 hours in Berlin.
        let (start, end) = day_range(parse_date("2027-03-28").unwrap(), 1, berlin);
        assert_eq!((start, end), (at("2027-03-27T23:00:00Z"), at("2027-03-28T22:00:00Z")));
        let (start, end) = day_range(parse_date("2026-12-07").unwrap(), 7, Tz::UTC);
        assert_eq!((start, end), (at("2026-12-07T00:00:00Z"), at("2026-12-14T00:00:00Z")));
        let events = vec![("a".to_string(), 0, 10), ("b".to_string(), 5, 20), ("c".to_string(), 10, 15)];
        assert_eq!(overlaps(&events), [("a".to_string(), "b".to_string()), ("b".to_string(), "c".to_string())]);
    }

    #[test]
    fn events_are_checked() {
        let mut e = CalendarEvent {
            title: "Demo".into(),
            organizer_id: "0190a000-0000-7000-8000-000000000001".into(),
            attendee_ids: vec![
                "0190a000-0000-7000-8000-000000000001".into(),
                "0190a000-0000-7000-8000-000000000002".into(),
                " 0190a000-0000-7000-8000-000000000002".into(),
            ],
            start_time: crm_kit::time::to_timestamp(at("2026-12-08T09:00:00Z")),
            end_time: crm_kit::time::to_timestamp(at("2026-12-08T08:00:00Z")),
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_event(&mut e, &mut v);
        assert_eq!(v.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), ["event.end_time"]);
        assert_eq!(e.attendee_ids, ["0190a000-0000-7000-8000-000000000002"]);
        assert_eq!(e.kind, EventKind::Meeting as i32);
    }

    #[test]
    fn days_in_a_time_zone() {
        let shanghai: Tz = "Asia/Shanghai".parse().unwrap();
        assert_eq!(local_date(at("2026-12-01T17:00:00Z"), shanghai), "2026-12-02");
        assert_eq!(local_date(at("2026-12-01T17:00:00Z"), Tz::UTC), "2026-12-01");
        assert!(zone("Mars/Olympus").is_none());
        assert_eq!(zone(""), Some(Tz::UTC));
    }

    #[test]
    fn tasks_are_checked_and_completed() {
        let mut task = Task {
            title: "  Call back  ".into(),
            reminders: vec![prost_types::Duration { seconds: 60, nanos: 0 }],
            time_zone: "Nowhere/City".into(),
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_task(&mut task, &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["task.time_zone", "task.reminders"]);
        assert_eq!(task.title, "Call back");
        assert_eq!((task.kind, task.priority), (TaskKind::Todo as i32, Priority::Normal as i32));

        let now = at("2026-12-01T09:00:00Z");
        let mut task = Task {
            title: "Send the offer".into(),
            due_time: crm_kit::time::to_timestamp(at("2026-12-01T10:00:00Z")),
            reminders: vec![
                prost_types::Duration { seconds: 1_800, nanos: 0 },
                prost_types::Duration { seconds: 7_200, nanos: 0 },
            ],
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_task(&mut task, &mut v);
        assert!(v.is_empty());
        let times = reminder_times(&task, now, &mut v);
        assert_eq!(times, [at("2026-12-01T08:00:00Z"), at("2026-12-01T09:30:00Z")]);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["task.reminders[0]"], "the two-hour reminder has passed");
    }

    #[test]
    fn activity_records_count_for_their_local_day() {
        let now = at("2026-12-01T20:00:00Z");
        let mut a = Activity {
            r#type: ActivityType::Call as i32,
            summary: " Discussed the renewal ".into(),
            time_zone: "Asia/Shanghai".into(),
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_activity(&mut a, now, &mut v);
        assert!(v.is_empty());
        assert_eq!((a.summary.as_str(), a.occur_date.as_str()), ("Discussed the renewal", "2026-12-02"));
        let mut future = Activity {
            r#type: ActivityType::Note as i32,
            summary: "x".into(),
            occur_time: crm_kit::time::to_timestamp(now + 3_600_000_000),
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_activity(&mut future, now, &mut v);
        assert_eq!(v.iter().next().map(|(f, _)| f.as_str()), Some("activity.occur_time"));
    }
}
