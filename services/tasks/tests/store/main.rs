//! The tasks service against both backends, through its API (validation, rules and SQL
//! together), its jobs (run as the runner runs them) and its event intake. PostgreSQL comes
//! from CRM_TEST_POSTGRES_URL (a fresh database per test); SQLite from a temporary file. The
//! organisation (scopes, users) and contacts' customers are fixtures.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_kit::ApiError;
use crm_kit::auth::{Principal, ScopeCache, UserStatus};
use crm_kit::customers::Customers;
use crm_kit::db::Sql;
use crm_kit::events::envelope::envelope;
use crm_kit::events::{Delivered, Handler};
use crm_kit::jobs::{Runner, RunnerSettings};
use crm_kit::testing::{Org, TestDb};
use crm_proto::auth::v1::UserDeactivated;
use crm_proto::contacts::v1::{CustomerKey, CustomerSummary, RecordType};
use crm_proto::events::v1::Envelope;
use crm_proto::tasks::v1::tasks_service_server::TasksService;
use crm_proto::tasks::v1::*;
use crm_tasks::store::{ESCALATION_JOB, REMINDER_JOB};
use crm_tasks::{Store, TasksApi};
use futures_util::future::BoxFuture;
use prost::Message;
use sqlx::Row;
use tonic::{Code, Request};
use tonic_types::StatusExt;

const READ: &str = crm_tasks::permissions::READ.name;
const WRITE: &str = crm_tasks::permissions::WRITE.name;

// A head over Alice and Bob; Carol elsewhere; an administrator who sees everything.
const ADMIN: &str = "0190a000-0000-7000-8000-000000000001";
const HEAD: &str = "0190a000-0000-7000-8000-000000000002";
const ALICE: &str = "0190a000-0000-7000-8000-000000000003";
const BOB: &str = "0190a000-0000-7000-8000-000000000004";
const CAROL: &str = "0190a000-0000-7000-8000-000000000005";
const GONE: &str = "0190a000-0000-7000-8000-000000000006";
const ACME: &str = "0190a000-0000-7000-8000-0000000000c1";
const DEPT: &str = "0190a000-0000-7000-8000-0000000000d1";

/// Contacts as a fixture: Acme, a company only Alice's side (Alice, Bob, the head, the
/// administrator) may see. Counts its calls.
#[derive(Default)]
struct Contacts {
    calls: Mutex<usize>,
}

impl Customers for Contacts {
    fn find<'a>(
        &'a self,
        caller: &'a Principal,
        keys: Vec<CustomerKey>,
    ) -> BoxFuture<'a, Result<Vec<CustomerSummary>, ApiError>> {
        *self.calls.lock().unwrap() += 1;
        let sees = caller.subject != CAROL;
        let found = keys
            .into_iter()
            .filter(|k| sees && k.id == ACME && k.record_type == RecordType::Company as i32)
            .map(|k| CustomerSummary {
                record_type: k.record_type,
                id: k.id,
                display_name: "Acme GmbH".into(),
                owner_id: ALICE.into(),
                ..Default::default()
            })
            .collect();
        Box::pin(async move { Ok(found) })
    }
}

struct Env {
    store: Store,
    api: TasksApi,
    org: Org,
    contacts: Arc<Contacts>,
    _db: TestDb,
}

async fn env(db: TestDb) -> Env {
    let opened = crm_kit::db::Db::open(db.url(), 4, &crm_tasks::store::migrations(), "tasks").await.unwrap();
    let store = Store::new(opened);
    let org = Org::new().sees_all(ADMIN).sees(HEAD, &[ALICE, BOB]).user(ALICE).user(BOB).user(CAROL);
    org.set_status(GONE, UserStatus::Deactivated);
    let contacts = Arc::new(Contacts::default());
    let scopes = ScopeCache::new(Arc::new(org.clone()), Duration::ZERO);
    let api = TasksApi::new(store.clone(), scopes, Arc::new(org.clone()), contacts.clone(), Duration::from_secs(3600));
    Env { store, api, org, contacts, _db: db }
}

fn as_user<T>(user: &str, message: T) -> Request<T> {
    let mut principal = crm_kit::testing::principal(user, &[READ, WRITE]);
    principal.department_id = DEPT.into();
    principal.name = format!("user {}", &user[user.len() - 2..]);
    crm_kit::testing::request(&principal, message)
}

fn ts(micros: i64) -> Option<prost_types::Timestamp> {
    crm_kit::time::to_timestamp(micros)
}

fn hours(n: i64) -> i64 {
    n * 3_600_000_000
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn create(env: &Env, user: &str, task: Task) -> Result<Task, tonic::Status> {
    env.api
        .create_task(as_user(user, CreateTaskRequest { task: Some(task), request_id: String::new() }))
        .await
        .map(|r| r.into_inner())
}

/// The events in the outbox, by type, oldest first.
async fn published(env: &Env) -> Vec<Envelope> {
    let rows =
        Sql::new("SELECT envelope FROM outbox ORDER BY seq").query().fetch_all(env.store.db().pool()).await.unwrap();
    rows.iter().map(|r| Envelope::decode(r.try_get::<Vec<u8>, _>("envelope").unwrap().as_slice()).unwrap()).collect()
}

async fn published_of<E: prost::Name + Message + Default>(env: &Env) -> Vec<E> {
    published(env).await.iter().filter_map(|e| crm_kit::events::envelope::payload::<E>(e)).map(|p| p.unwrap()).collect()
}

async fn jobs(env: &Env, kind: &str) -> Vec<(String, i64)> {
    let mut sql = Sql::new("SELECT job_key, due_at FROM jobs WHERE kind = ");
    sql.bind(kind).push(" ORDER BY due_at");
    let rows = sql.query().fetch_all(env.store.db().pool()).await.unwrap();
    rows.iter().map(|r| (r.try_get("job_key").unwrap(), r.try_get("due_at").unwrap())).collect()
}

/// Makes every waiting job due now and runs them as a runner would.
async fn run_jobs_now(env: &Env) -> usize {
    Sql::new("UPDATE jobs SET due_at = 0").query().execute(env.store.db().pool()).await.unwrap();
    let runner = Runner::new(env.store.db().clone(), RunnerSettings::default())
        .handle(REMINDER_JOB, Arc::new(crm_tasks::jobs::ReminderJob::new(env.store.clone())))
        .handle(ESCALATION_JOB, Arc::new(crm_tasks::jobs::EscalationJob::new(env.store.clone(), None)));
    let (_trigger, shutdown) = crm_kit::shutdown::channel();
    runner.run_due(&shutdown).await.unwrap()
}

async fn tasks_live_through_their_states(env: Env) {
    let now = crm_kit::time::now_micros();
    let task = Task {
        title: "  Send the renewal offer ".into(),
        assignee_id: BOB.into(),
        due_time: ts(now + hours(48)),
        time_zone: "Europe/Berlin".into(),
        reminders: vec![
            prost_types::Duration { seconds: 3_600, nanos: 0 },
            prost_types::Duration { seconds: 86_400, nanos: 0 },
        ],
        customer: Some(CustomerRef { record_type: RecordType::Company as i32, id: ACME.into(), ..Default::default() }),
        ..Default::default()
    };
    let created = create(&env, ALICE, task).await.unwrap();
    assert_eq!(created.title, "Send the renewal offer");
    assert_eq!((created.creator_id.as_str(), created.assignee_id.as_str()), (ALICE, BOB));
    assert_eq!(created.status, TaskStatus::Open as i32);
    assert_eq!(created.customer.as_ref().unwrap().display_name, "Acme GmbH", "named by contacts");
    assert_eq!(*env.contacts.calls.lock().unwrap(), 1, "one call to contacts");
    assert_eq!(jobs(&env, REMINDER_JOB).await.len(), 2);
    assert_eq!(jobs(&env, ESCALATION_JOB).await, [(created.id.clone(), now + hours(49))]);
    let assigned: Vec<TaskAssigned> = published_of(&env).await;
    assert_eq!(assigned.len(), 1);
    assert_eq!((assigned[0].assignee_id.as_str(), assigned[0].customer_name.as_str()), (BOB, "Acme GmbH"));

    let get = |user: &'static str| {
        let id = created.id.clone();
        let api = env.api.clone();
        async move { api.get_task(as_user(user, GetTaskRequest { id })).await }
    };
    assert!(get(ALICE).await.is_ok(), "the creator sees it");
    assert!(get(BOB).await.is_ok(), "the assignee sees it");
    assert!(get(HEAD).await.is_ok(), "the assignee's head sees it");
    assert_eq!(get(CAROL).await.unwrap_err().code(), Code::NotFound);

    // Updates: a stale etag is refused; moving the due time replaces the jobs.
    let update = |etag: &str, patch: Task, paths: &[&str]| UpdateTaskRequest {
        task: Some(Task { id: created.id.clone(), etag: etag.into(), ..patch }),
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
    };
    let moved = env
        .api
        .update_task(as_user(
            BOB,
            update("1", Task { due_time: ts(now + hours(72)), ..Default::default() }, &["due_time"]),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.etag, "2");
    assert_eq!(jobs(&env, ESCALATION_JOB).await, [(created.id.clone(), now + hours(73))]);
    let stale = env
        .api
        .update_task(as_user(BOB, update("1", Task { title: "x".into(), ..Default::default() }, &["title"])))
        .await;
    assert_eq!(stale.unwrap_err().code(), Code::Aborted);
    // Handing it to Carol tells her; Bob no longer sees it, Alice (its creator) still does.
    env.api
        .update_task(as_user(
            ALICE,
            update("", Task { assignee_id: CAROL.into(), ..Default::default() }, &["assignee_id"]),
        ))
        .await
        .unwrap();
    let assigned: Vec<TaskAssigned> = published_of(&env).await;
    assert_eq!((assigned[1].assignee_id.as_str(), assigned[1].previous_assignee_id.as_str()), (CAROL, BOB));
    assert_eq!(get(BOB).await.unwrap_err().code(), Code::NotFound);
    assert!(get(CAROL).await.is_ok() && get(ALICE).await.is_ok());

    // Done: jobs go; done twice is fine; cancelling a done task is not; reopening brings the
    // escalation back.
    let status = |user: &str| as_user(user, ChangeTaskStatusRequest { id: created.id.clone(), etag: String::new() });
    let done = env.api.complete_task(status(CAROL)).await.unwrap().into_inner();
    assert_eq!(done.status, TaskStatus::Done as i32);
    assert!(done.close_time.is_some());
    assert!(jobs(&env, REMINDER_JOB).await.is_empty() && jobs(&env, ESCALATION_JOB).await.is_empty());
    assert_eq!(env.api.complete_task(status(CAROL)).await.unwrap().into_inner().etag, done.etag);
    assert_eq!(env.api.cancel_task(status(CAROL)).await.unwrap_err().code(), Code::FailedPrecondition);
    let reopened = env.api.reopen_task(status(CAROL)).await.unwrap().into_inner();
    assert!(reopened.close_time.is_none());
    assert_eq!(jobs(&env, REMINDER_JOB).await.len(), 2);
    assert_eq!(jobs(&env, ESCALATION_JOB).await.len(), 1);

    // Listing: Carol's open tasks by due time; overdue ones; Carol sees only her own.
    let back_dated =
        create(&env, CAROL, Task { title: "Back-dated".into(), due_time: ts(now - hours(2)), ..Default::default() })
            .await
            .unwrap();
    create(&env, CAROL, Task { title: "Someday".into(), ..Default::default() }).await.unwrap();
    let list = |user: &str, filter: &str, overdue: bool| {
        as_user(user, ListTasksRequest { filter: filter.into(), overdue, page_size: 2, ..Default::default() })
    };
    let page = env
        .api
        .list_tasks(list(CAROL, &format!("assignee_id = \"{CAROL}\" AND status = OPEN"), false))
        .await
        .unwrap()
        .into_inner();
    let titles: Vec<&str> = page.tasks.iter().map(|t| t.title.as_str()).collect();
    assert_eq!(titles, ["Back-dated", "Send the renewal offer"], "by due time");
    let rest = env
        .api
        .list_tasks(as_user(
            CAROL,
            ListTasksRequest {
                filter: format!("assignee_id = \"{CAROL}\" AND status = OPEN"),
                page_size: 2,
                page_token: page.next_page_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.tasks.iter().map(|t| t.title.as_str()).collect::<Vec<_>>(), ["Someday"], "undated last");
    let overdue = env.api.list_tasks(list(CAROL, "", true)).await.unwrap().into_inner();
    assert_eq!(overdue.tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [back_dated.id.as_str()]);
    let bobs = env.api.list_tasks(list(BOB, "", false)).await.unwrap().into_inner();
    assert!(bobs.tasks.is_empty(), "Bob sees none of Carol's");
    let bad = env.api.list_tasks(list(CAROL, "colour = red", false)).await.unwrap_err();
    assert_eq!(violations(&bad), ["filter"]);

    // Deleting takes the jobs and comments with it.
    env.api
        .add_comment(as_user(
            ALICE,
            AddCommentRequest {
                subject_type: SubjectType::Task as i32,
                subject_id: created.id.clone(),
                body: "Hurry".into(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap();
    env.api
        .delete_task(as_user(ALICE, DeleteTaskRequest { id: created.id.clone(), etag: String::new() }))
        .await
        .unwrap();
    assert_eq!(get(ALICE).await.unwrap_err().code(), Code::NotFound);
    assert!(jobs(&env, REMINDER_JOB).await.is_empty());
    let comments =
        Sql::new("SELECT COUNT(*) AS n FROM comments").query().fetch_one(env.store.db().pool()).await.unwrap();
    assert_eq!(comments.try_get::<i64, _>("n").unwrap(), 0);
}

async fn reminders_and_escalations_fire_once(env: Env) {
    let now = crm_kit::time::now_micros();
    let task = Task {
        title: "Call back".into(),
        kind: TaskKind::FollowUp as i32,
        assignee_id: BOB.into(),
        due_time: ts(now + hours(1)),
        reminders: vec![prost_types::Duration { seconds: 600, nanos: 0 }],
        ..Default::default()
    };
    let open = create(&env, ALICE, task.clone()).await.unwrap();
    let closed = create(&env, ALICE, task).await.unwrap();
    env.api
        .complete_task(as_user(BOB, ChangeTaskStatusRequest { id: closed.id.clone(), etag: String::new() }))
        .await
        .unwrap();
    assert_eq!(run_jobs_now(&env).await, 2, "the open task's reminder and escalation");
    assert_eq!(run_jobs_now(&env).await, 0, "nothing twice");
    let reminders: Vec<TaskReminderDue> = published_of(&env).await;
    assert_eq!(reminders.len(), 1);
    assert_eq!((reminders[0].task_id.as_str(), reminders[0].assignee_id.as_str()), (open.id.as_str(), BOB));
    assert!(reminders[0].due_local.ends_with(" UTC"));
    let overdue: Vec<TaskOverdue> = published_of(&env).await;
    assert_eq!(overdue.len(), 1);
    assert_eq!((overdue[0].task_id.as_str(), overdue[0].kind), (open.id.as_str(), TaskKind::FollowUp as i32));

    // A job scheduled for a due time the task no longer has does nothing.
    let moved = create(&env, ALICE, Task { title: "Moved".into(), due_time: ts(now + hours(5)), ..Default::default() })
        .await
        .unwrap();
    let mut sql = Sql::new("UPDATE tasks SET due_at = ");
    sql.bind(now + hours(6)).push(" WHERE id = ").bind(moved.id.as_str());
    sql.query().execute(env.store.db().pool()).await.unwrap();
    assert_eq!(run_jobs_now(&env).await, 1);
    assert_eq!(published_of::<TaskOverdue>(&env).await.len(), 1, "no escalation for the old due time");
}

async fn bad_input_is_refused_field_by_field(env: Env) {
    let now = crm_kit::time::now_micros();
    // Back-dated is allowed; a reminder that has passed is not.
    let past = Task {
        title: "Late".into(),
        due_time: ts(now - hours(1)),
        reminders: vec![prost_types::Duration { seconds: 600, nanos: 0 }],
        ..Default::default()
    };
    assert_eq!(violations(&create(&env, ALICE, past).await.unwrap_err()), ["task.reminders[0]"]);
    assert!(
        create(&env, ALICE, Task { title: "Late".into(), due_time: ts(now - hours(1)), ..Default::default() })
            .await
            .is_ok()
    );
    let wrong = Task {
        title: " ".into(),
        time_zone: "Mars/Base".into(),
        priority: 9,
        reminders: vec![prost_types::Duration { seconds: 60, nanos: 0 }],
        deal_id: "deal-1".into(),
        ..Default::default()
    };
    assert_eq!(
        violations(&create(&env, ALICE, wrong).await.unwrap_err()),
        ["task.title", "task.priority", "task.time_zone", "task.reminders", "task.deal_id"]
    );
    let unknown =
        Task { title: "x".into(), assignee_id: "0190a000-0000-7000-8000-0000000000ff".into(), ..Default::default() };
    assert_eq!(violations(&create(&env, ALICE, unknown).await.unwrap_err()), ["task.assignee_id"]);
    let gone = Task { title: "x".into(), assignee_id: GONE.into(), ..Default::default() };
    assert_eq!(violations(&create(&env, ALICE, gone).await.unwrap_err()), ["task.assignee_id"]);
    // A customer that does not exist, or that the caller may not see, names its field.
    let customer = |id: &str| Task {
        title: "x".into(),
        customer: Some(CustomerRef { record_type: RecordType::Company as i32, id: id.into(), ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(violations(&create(&env, ALICE, customer(CAROL)).await.unwrap_err()), ["task.customer.id"]);
    assert_eq!(violations(&create(&env, CAROL, customer(ACME)).await.unwrap_err()), ["task.customer.id"]);
    let no_type = Task { customer: Some(CustomerRef { id: ACME.into(), ..Default::default() }), ..customer(ACME) };
    assert_eq!(violations(&create(&env, ALICE, no_type).await.unwrap_err()), ["task.customer.record_type"]);
    // Activity records from the future, and comments on what one may not see.
    let future = Activity {
        r#type: ActivityType::Call as i32,
        summary: "x".into(),
        occur_time: ts(now + hours(2)),
        ..Default::default()
    };
    let err = env
        .api
        .log_activity(as_user(ALICE, LogActivityRequest { activity: Some(future), request_id: String::new() }))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["activity.occur_time"]);
    let mine = create(&env, ALICE, Task { title: "Mine".into(), ..Default::default() }).await.unwrap();
    let comment = AddCommentRequest {
        subject_type: SubjectType::Task as i32,
        subject_id: mine.id.clone(),
        body: "Hm".into(),
        request_id: String::new(),
    };
    assert_eq!(env.api.add_comment(as_user(CAROL, comment)).await.unwrap_err().code(), Code::NotFound);
    let counts =
        CountActivitiesRequest { start_date: "2026-12-31".into(), end_date: "2026-12-01".into(), ..Default::default() };
    assert_eq!(violations(&env.api.count_activities(as_user(HEAD, counts)).await.unwrap_err()), ["end_date"]);
    let counts =
        CountActivitiesRequest { start_date: "2025-01-01".into(), end_date: "2026-12-01".into(), ..Default::default() };
    assert_eq!(violations(&env.api.count_activities(as_user(HEAD, counts)).await.unwrap_err()), ["end_date"]);
}

async fn activity_records_timelines_counts_and_comments(env: Env) {
    let day = |d: u32, h: u32| crm_kit::time::parse_rfc3339(&format!("2026-11-{d:02}T{h:02}:00:00Z")).unwrap();
    let log = |user: &'static str, kind: ActivityType, at: i64, customer: bool, request_id: &str| {
        let api = env.api.clone();
        let request_id = request_id.to_string();
        async move {
            let activity = Activity {
                r#type: kind as i32,
                summary: format!("{} at {at}", kind.as_str_name()),
                occur_time: ts(at),
                time_zone: "Asia/Shanghai".into(),
                customer: customer.then(|| CustomerRef {
                    record_type: RecordType::Company as i32,
                    id: ACME.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            api.log_activity(as_user(user, LogActivityRequest { activity: Some(activity), request_id }))
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = log(ALICE, ActivityType::Call, day(2, 3), true, "first").await.unwrap();
    assert_eq!((first.occur_date.as_str(), first.department_id.as_str()), ("2026-11-02", DEPT));
    assert_eq!(first.customer.as_ref().unwrap().display_name, "Acme GmbH");
    // The same request id again is the same record, logged once.
    assert_eq!(log(ALICE, ActivityType::Call, day(2, 3), true, "first").await.unwrap().id, first.id);
    // 17:00Z is the next day in Shanghai.
    assert_eq!(log(ALICE, ActivityType::Visit, day(2, 17), true, "").await.unwrap().occur_date, "2026-11-03");
    log(ALICE, ActivityType::Call, day(3, 4), false, "").await.unwrap();
    log(BOB, ActivityType::Meeting, day(3, 5), true, "").await.unwrap();
    log(CAROL, ActivityType::Call, day(3, 6), false, "").await.unwrap();
    let logged: Vec<ActivityLogged> = published_of(&env).await;
    assert_eq!(logged.len(), 5, "one event per record logged");
    assert_eq!((logged[0].customer_id.as_str(), logged[0].customer_type), (ACME, RecordType::Company as i32));

    // The customer's timeline, newest first, as the head sees it; Carol sees none of it.
    let timeline = |user: &str| {
        as_user(user, ListActivitiesRequest { filter: format!("customer_id = \"{ACME}\""), ..Default::default() })
    };
    let seen = env.api.list_activities(timeline(HEAD)).await.unwrap().into_inner().activities;
    let kinds: Vec<i32> = seen.iter().map(|a| a.r#type).collect();
    assert_eq!(kinds, [ActivityType::Meeting as i32, ActivityType::Visit as i32, ActivityType::Call as i32]);
    assert!(env.api.list_activities(timeline(CAROL)).await.unwrap().into_inner().activities.is_empty());
    assert_eq!(
        env.api.get_activity(as_user(CAROL, GetActivityRequest { id: first.id.clone() })).await.unwrap_err().code(),
        Code::NotFound
    );

    // Per user and day, within the caller's scope.
    let counts = |user: &str| {
        let r = CountActivitiesRequest {
            start_date: "2026-11-01".into(),
            end_date: "2026-11-30".into(),
            department_id: DEPT.into(),
            ..Default::default()
        };
        as_user(user, r)
    };
    let days = env.api.count_activities(counts(HEAD)).await.unwrap().into_inner().days;
    let shape: Vec<(&str, &str, i32, i32, i32, i32)> =
        days.iter().map(|d| (d.author_id.as_str(), d.date.as_str(), d.calls, d.visits, d.meetings, d.total)).collect();
    assert_eq!(
        shape,
        [(ALICE, "2026-11-02", 1, 0, 0, 1), (ALICE, "2026-11-03", 1, 1, 0, 2), (BOB, "2026-11-03", 0, 0, 1, 1),]
    );
    let all = env.api.count_activities(counts(ADMIN)).await.unwrap().into_inner().days;
    assert_eq!(all.len(), 4, "the administrator sees Carol's day too");
    let only_bob = CountActivitiesRequest {
        start_date: "2026-11-01".into(),
        end_date: "2026-11-30".into(),
        author_ids: vec![BOB.into()],
        ..Default::default()
    };
    assert_eq!(env.api.count_activities(as_user(HEAD, only_bob)).await.unwrap().into_inner().days.len(), 1);

    // The head comments ("批示") on Alice's record: Alice is told, the count follows.
    let comment = |user: &str, body: &str| {
        as_user(
            user,
            AddCommentRequest {
                subject_type: SubjectType::Activity as i32,
                subject_id: first.id.clone(),
                body: body.into(),
                request_id: String::new(),
            },
        )
    };
    env.api.add_comment(comment(HEAD, "Offer them the two-year plan")).await.unwrap();
    env.api.add_comment(comment(ALICE, "Will do")).await.unwrap();
    assert_eq!(env.api.add_comment(comment(CAROL, "?")).await.unwrap_err().code(), Code::NotFound);
    let added: Vec<CommentAdded> = published_of(&env).await;
    assert_eq!(added.len(), 2);
    assert_eq!((added[0].author_id.as_str(), added[0].commenter_id.as_str()), (ALICE, HEAD));
    assert_eq!(added[0].subject_title, first.summary);
    let listed = env
        .api
        .list_comments(as_user(
            ALICE,
            ListCommentsRequest {
                subject_type: SubjectType::Activity as i32,
                subject_id: first.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .comments;
    assert_eq!(listed.iter().map(|c| c.body.as_str()).collect::<Vec<_>>(), ["Offer them the two-year plan", "Will do"]);
    let again = env.api.get_activity(as_user(ALICE, GetActivityRequest { id: first.id.clone() })).await.unwrap();
    assert_eq!(again.into_inner().comment_count, 2);
}

async fn a_deactivated_users_open_tasks_wait_for_handover(env: Env) {
    let open = create(&env, ALICE, Task { title: "Open".into(), assignee_id: BOB.into(), ..Default::default() })
        .await
        .unwrap();
    let done = create(&env, ALICE, Task { title: "Done".into(), assignee_id: BOB.into(), ..Default::default() })
        .await
        .unwrap();
    env.api
        .complete_task(as_user(BOB, ChangeTaskStatusRequest { id: done.id.clone(), etag: String::new() }))
        .await
        .unwrap();
    env.org.set_status(BOB, UserStatus::Deactivated);
    let event = Delivered {
        envelope: envelope("auth", BOB, ADMIN, &UserDeactivated { user_id: BOB.into() }),
        seq: 1,
        redelivered: false,
    };
    let intake = crm_tasks::intake::Intake::new(env.store.clone(), 3_600_000_000);
    for _ in 0..2 {
        let mut tx = env.store.db().begin_write().await.unwrap();
        intake.handle(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
    }
    let get = |id: &str| env.api.get_task(as_user(ALICE, GetTaskRequest { id: id.into() }));
    let flagged = get(&open.id).await.unwrap().into_inner();
    assert!(flagged.handover_needed);
    assert_eq!(flagged.etag, "2", "flagged once, as a new version");
    assert!(!get(&done.id).await.unwrap().into_inner().handover_needed);
    let waiting = env
        .api
        .list_tasks(as_user(ALICE, ListTasksRequest { filter: "handover_needed = true".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(waiting.len(), 1);
    // Handing it over to an active user clears the flag; a deactivated one is refused.
    let hand = |to: &str| UpdateTaskRequest {
        task: Some(Task { id: open.id.clone(), assignee_id: to.into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["assignee_id".into()] }),
    };
    assert_eq!(violations(&env.api.update_task(as_user(ALICE, hand(GONE))).await.unwrap_err()), ["task.assignee_id"]);
    let handed = env.api.update_task(as_user(ALICE, hand(CAROL))).await.unwrap().into_inner();
    assert!(!handed.handover_needed);
}

async fn calendars_agendas_and_feeds(env: Env) {
    let at = |t: &str| crm_kit::time::parse_rfc3339(t).unwrap();
    let event = |title: &str, start: &str, end: &str, attendees: &[&str]| CalendarEvent {
        title: title.into(),
        start_time: ts(at(start)),
        end_time: ts(at(end)),
        time_zone: "Asia/Shanghai".into(),
        attendee_ids: attendees.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let plan = |user: &str, e: CalendarEvent| {
        let api = env.api.clone();
        let request = as_user(user, CreateEventRequest { event: Some(e), request_id: String::new() });
        async move { api.create_event(request).await.map(|r| r.into_inner()) }
    };
    // Alice plans a demo with Bob; then a call overlapping it; Bob's own meeting later.
    let demo = plan(ALICE, event("Demo", "2026-12-07T23:30:00Z", "2026-12-08T01:00:00Z", &[BOB, ALICE])).await.unwrap();
    assert_eq!(demo.attendee_ids, [BOB], "the organizer takes part without being listed");
    assert!(demo.overlapping_event_ids.is_empty());
    let call = plan(
        ALICE,
        CalendarEvent {
            kind: EventKind::Call as i32,
            ..event("Call Acme", "2026-12-08T00:30:00Z", "2026-12-08T00:45:00Z", &[])
        },
    )
    .await
    .unwrap();
    assert_eq!(call.overlapping_event_ids, std::slice::from_ref(&demo.id), "overlaps are allowed, and reported");
    plan(BOB, event("Bob's own", "2026-12-08T03:00:00Z", "2026-12-08T04:00:00Z", &[])).await.unwrap();
    // Who sees what: attendees and the organizer's head yes, Carol no.
    let get = |user: &str, id: &str| env.api.get_event(as_user(user, GetEventRequest { id: id.into() }));
    assert!(get(BOB, &demo.id).await.is_ok());
    assert!(get(HEAD, &call.id).await.is_ok());
    assert_eq!(get(CAROL, &demo.id).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(BOB, &call.id).await.unwrap_err().code(), Code::NotFound, "Bob takes no part in the call");
    // Attendees must be users, active ones.
    let bad = plan(
        ALICE,
        event("x", "2026-12-09T01:00:00Z", "2026-12-09T02:00:00Z", &[GONE, "0190a000-0000-7000-8000-0000000000ff"]),
    )
    .await;
    assert_eq!(violations(&bad.unwrap_err()), ["event.attendee_ids[0]", "event.attendee_ids[1]"]);
    let bad = plan(ALICE, event("x", "2026-12-09T02:00:00Z", "2026-12-09T01:00:00Z", &[])).await;
    assert_eq!(violations(&bad.unwrap_err()), ["event.end_time"]);

    // Alice's tasks due that day show in her agenda too.
    create(
        &env,
        ALICE,
        Task { title: "Send the minutes".into(), due_time: ts(at("2026-12-08T02:00:00Z")), ..Default::default() },
    )
    .await
    .unwrap();
    let agenda = |user: &str, whose: &str, date: &str, tz: &str| {
        let r = GetAgendaRequest { user_id: whose.into(), start_date: date.into(), days: 1, time_zone: tz.into() };
        env.api.get_agenda(as_user(user, r))
    };
    // In Shanghai (UTC+8) the 8th runs from 16:00Z on the 7th: the demo, the call, the task, Bob's
    // meeting not (Alice takes no part).
    let day = agenda(ALICE, "", "2026-12-08", "Asia/Shanghai").await.unwrap().into_inner();
    let labels: Vec<(String, &str)> = day
        .items
        .iter()
        .map(|i| {
            let title = match &i.item {
                Some(agenda_item::Item::Event(e)) => e.title.clone(),
                Some(agenda_item::Item::Task(t)) => t.title.clone(),
                None => String::new(),
            };
            (title, i.local_time.as_str())
        })
        .collect();
    assert_eq!(
        labels,
        [
            ("Demo".to_string(), "2026-12-08 07:30"),
            ("Call Acme".to_string(), "2026-12-08 08:30"),
            ("Send the minutes".to_string(), "2026-12-08 10:00"),
        ]
    );
    assert_eq!(day.overlaps.len(), 1);
    assert_eq!((day.start_date.as_str(), day.end_date.as_str()), ("2026-12-08", "2026-12-08"));
    // In UTC the demo starts on the 7th and runs into the 8th: both days hold it.
    let utc7 = agenda(ALICE, "", "2026-12-07", "UTC").await.unwrap().into_inner();
    assert_eq!(utc7.items.len(), 1);
    let week =
        GetAgendaRequest { start_date: "2026-12-07".into(), days: 7, time_zone: "UTC".into(), ..Default::default() };
    assert_eq!(env.api.get_agenda(as_user(ALICE, week)).await.unwrap().into_inner().items.len(), 3);
    // A head reads a subordinate's agenda; Carol may not.
    assert_eq!(agenda(HEAD, BOB, "2026-12-08", "UTC").await.unwrap().into_inner().items.len(), 2);
    assert_eq!(agenda(CAROL, BOB, "2026-12-08", "UTC").await.unwrap_err().code(), Code::PermissionDenied);
    let wrong =
        GetAgendaRequest { start_date: "8 Dec".into(), days: 40, time_zone: "Moon".into(), ..Default::default() };
    assert_eq!(
        violations(&env.api.get_agenda(as_user(ALICE, wrong)).await.unwrap_err()),
        ["time_zone", "start_date", "days"]
    );

    // Moving the call after the demo ends the overlap; deleting the demo takes it from Bob's day.
    let moved = env
        .api
        .update_event(as_user(
            ALICE,
            UpdateEventRequest {
                event: Some(CalendarEvent {
                    id: call.id.clone(),
                    etag: call.etag.clone(),
                    start_time: ts(at("2026-12-08T05:00:00Z")),
                    end_time: ts(at("2026-12-08T05:30:00Z")),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["start_time".into(), "end_time".into()] }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.etag, "2");
    assert!(moved.overlapping_event_ids.is_empty());
    env.api
        .delete_event(as_user(ALICE, DeleteEventRequest { id: demo.id.clone(), etag: String::new() }))
        .await
        .unwrap();
    assert_eq!(agenda(BOB, "", "2026-12-08", "UTC").await.unwrap().into_inner().items.len(), 1);

    // The feed: a secret token, iCalendar out, revoked at once.
    let feed = env.api.create_calendar_feed(as_user(ALICE, CreateCalendarFeedRequest {})).await.unwrap().into_inner();
    assert_eq!(feed.path, format!("/calendar/{}", feed.token));
    let read = |token: String| env.api.get_calendar_feed(Request::new(GetCalendarFeedRequest { token }));
    let body = read(format!("{}.ics", feed.token)).await.unwrap().into_inner();
    assert!(body.content_type.starts_with("text/calendar"));
    let text = String::from_utf8(body.data).unwrap();
    assert!(text.contains("SUMMARY:Call Acme\r\n") && text.contains("SUMMARY:Task: Send the minutes\r\n"), "{text}");
    assert!(!text.contains("Demo"), "deleted events leave the feed");
    let again = env.api.create_calendar_feed(as_user(ALICE, CreateCalendarFeedRequest {})).await.unwrap().into_inner();
    assert_eq!(read(feed.token.clone()).await.unwrap_err().code(), Code::NotFound, "a new token replaces the old");
    env.api.revoke_calendar_feed(as_user(ALICE, RevokeCalendarFeedRequest {})).await.unwrap();
    assert_eq!(read(again.token).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        env.api.revoke_calendar_feed(as_user(ALICE, RevokeCalendarFeedRequest {})).await.unwrap_err().code(),
        Code::NotFound
    );
}

/// A reminder a day before keeps the wall-clock time across daylight saving: its job is due at
/// 12:00 Berlin time the day before, 23 hours earlier (clocks went forward in between).
async fn reminders_keep_the_wall_clock(env: Env) {
    let at = |t: &str| crm_kit::time::parse_rfc3339(t).unwrap();
    // Berlin's clocks go forward on 2027-03-28: due 12:00 CEST (10:00Z) that day.
    let task = Task {
        title: "Sign the lease".into(),
        due_time: ts(at("2027-03-28T10:00:00Z")),
        time_zone: "Europe/Berlin".into(),
        reminders: vec![prost_types::Duration { seconds: 86_400, nanos: 0 }],
        ..Default::default()
    };
    let created = create(&env, ALICE, task).await.unwrap();
    assert_eq!(jobs(&env, REMINDER_JOB).await, [(format!("{}/0", created.id), at("2027-03-27T11:00:00Z"))]);
}

/// A deal entering a stage whose automation asks for a task: one task for the deal's owner,
/// linked to the deal and its customer, due in the days asked.
async fn deal_automations_make_tasks(env: Env) {
    use crm_proto::deals::v1::{Automation, DealStageChanged, TaskAutomation, automation};
    let entry = DealStageChanged {
        deal_id: "0190a000-0000-7000-8000-0000000000de".into(),
        title: "Widgets".into(),
        to_stage_name: "Payment".into(),
        owner_id: BOB.into(),
        person_id: ACME.into(),
        automations: vec![Automation {
            action: Some(automation::Action::CreateTask(TaskAutomation {
                // As deals publishes them: filled in for the deal.
                title: "Send the invoice for Widgets".into(),
                description: "The deal reached Payment".into(),
                due_in_days: 2,
            })),
        }],
        ..Default::default()
    };
    let event = Delivered { envelope: envelope("deals", &entry.deal_id, ALICE, &entry), seq: 1, redelivered: false };
    let intake = crm_tasks::intake::Intake::new(env.store.clone(), 3_600_000_000);
    let mut tx = env.store.db().begin_write().await.unwrap();
    intake.handle(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let tasks = env
        .api
        .list_tasks(as_user(
            BOB,
            ListTasksRequest { filter: format!("deal_id = \"{}\"", entry.deal_id), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    let task = &tasks[0];
    assert_eq!(
        (task.title.as_str(), task.description.as_str()),
        ("Send the invoice for Widgets", "The deal reached Payment")
    );
    assert_eq!((task.assignee_id.as_str(), task.creator_id.as_str()), (BOB, ALICE));
    assert_eq!(task.customer.as_ref().map(|c| c.id.as_str()), Some(ACME));
    let due = task.due_time.as_ref().map(crm_kit::time::from_timestamp).unwrap();
    let sent = event.envelope.time.as_ref().map(crm_kit::time::from_timestamp).unwrap();
    assert_eq!(due - sent, 2 * 86_400_000_000);
    let assigned: Vec<TaskAssigned> = published_of(&env).await;
    assert_eq!(assigned.len(), 1, "the owner hears of the task");
    assert_eq!(jobs(&env, ESCALATION_JOB).await.len(), 1);
}

/// A create sent again with its request id gets the task its first call created, even once the
/// task's reminder has passed (a retry after a long outage); another caller's call with that id
/// is a first call, and its reminder in the past is refused.
async fn retried_creates_get_their_task(env: Env) {
    let now = crm_kit::time::now_micros();
    let request = |due: i64| CreateTaskRequest {
        task: Some(Task {
            title: "Call back".into(),
            due_time: ts(due),
            reminders: vec![prost_types::Duration { seconds: 3600, nanos: 0 }],
            ..Default::default()
        }),
        request_id: "call-back-1".into(),
    };
    let first = env.api.create_task(as_user(ALICE, request(now + hours(2)))).await.unwrap().into_inner();
    // Sent again with times whose reminder (an hour before the due time) passed a minute ago.
    let late = now + hours(1) - 60_000_000;
    let again = env.api.create_task(as_user(ALICE, request(late))).await.unwrap().into_inner();
    assert_eq!((again.id.as_str(), again.due_time), (first.id.as_str(), first.due_time));
    let refused = env.api.create_task(as_user(BOB, request(late))).await.unwrap_err();
    assert_eq!(violations(&refused), ["task.reminders[0]"]);
    let created = published_of::<TaskAssigned>(&env).await;
    assert_eq!(created.len(), 1, "{created:?}");
}

crm_kit::both_backends!(env =>
    retried_creates_get_their_task,
    tasks_live_through_their_states,
    reminders_and_escalations_fire_once,
    bad_input_is_refused_field_by_field,
    activity_records_timelines_counts_and_comments,
    a_deactivated_users_open_tasks_wait_for_handover,
    calendars_agendas_and_feeds,
    reminders_keep_the_wall_clock,
    deal_automations_make_tasks,
);
