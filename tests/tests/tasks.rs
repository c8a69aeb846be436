//! Tasks end to end (SPEC T1, T3-T5, C8): real `crm` processes — auth, contacts,
//! notifications, tasks, the gateway — with Redis carrying events. Users act only through the
//! gateway; effects in other services are polled for, never waited out.
//!
//! - `tasks_reach_people_and_customers`: an assignment reaches the assignee's inbox; a logged
//!   call moves the customer's last activity in contacts; a head sees and comments on the team's
//!   records and the author is told; an overdue task reaches the assignee's supervisor once (or,
//!   without one, their department's head);
//!   staff of another department see none of it; an agenda and a calendar feed fetched over
//!   plain HTTP, revoked;
//! - `crm_dev_runs_tasks_on_sqlite`: the same paths in the embedded mode (one process, SQLite,
//!   events in-process): an assignment reaches the inbox, a logged call reaches contacts;
//! - `reminders_fire_once_with_a_replica_killed`: 1,000 reminders coming due over a few seconds
//!   on three tasks replicas, one killed (SIGKILL) among them, make exactly 1,000 notifications.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crm_proto::auth::v1::{CreateDepartmentRequest, Department, UpdateDepartmentRequest, User};
use crm_proto::contacts::v1::{CreatePersonRequest, GetPersonRequest, Person, RecordType};
use crm_proto::notifications::v1::{ListNotificationsRequest, Notification};
use crm_proto::tasks::v1::*;
use crm_tests::*;
use tonic::Code;

const ASSIGNED: &str = "crm.tasks.v1.TaskAssigned";
const REMINDER: &str = "crm.tasks.v1.TaskReminderDue";
const OVERDUE: &str = "crm.tasks.v1.TaskOverdue";
const COMMENTED: &str = "crm.tasks.v1.CommentAdded";

/// A user created by the administrator, signed in.
struct Member {
    user: User,
    token: String,
}

async fn department(gateway: SocketAddr, admin: &str, name: &str) -> Department {
    sub_department(gateway, admin, name, "").await
}

async fn sub_department(gateway: SocketAddr, admin: &str, name: &str, parent_id: &str) -> Department {
    let department = Department { name: name.into(), parent_id: parent_id.into(), ..Default::default() };
    let request = CreateDepartmentRequest { department: Some(department) };
    org_as(gateway, admin).await.create_department(request).await.expect("create a department").into_inner()
}

async fn member(
    gateway: SocketAddr,
    admin: &str,
    email: &str,
    role: &str,
    department: &str,
    supervisor: &str,
) -> Member {
    let user = User {
        email: email.into(),
        display_name: email.split('@').next().unwrap().into(),
        department_id: department.into(),
        supervisor_id: supervisor.into(),
        ..Default::default()
    };
    let (user, token) = crm_tests::member(gateway, admin, role, user).await;
    Member { user, token }
}

async fn inbox(gateway: SocketAddr, token: &str) -> Vec<Notification> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListNotificationsRequest { page_size: 1000, page_token, ..Default::default() };
        let page = notifications_as(gateway, token).await.list_notifications(request).await.unwrap().into_inner();
        all.extend(page.notifications);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Waits until `token`'s inbox holds at least `count` notifications of `event_type`.
async fn wait_inbox(gateway: SocketAddr, token: &str, event_type: &str, count: usize) -> Vec<Notification> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list: Vec<Notification> =
            inbox(gateway, token).await.into_iter().filter(|n| n.event_type == event_type).collect();
        if list.len() >= count {
            return list;
        }
        assert!(Instant::now() < deadline, "{count} {event_type} notification(s) expected, {} arrived", list.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ts(micros: i64) -> Option<prost_types::Timestamp> {
    crm_kit::time::to_timestamp(micros)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_reach_people_and_customers() {
    let config = ClusterConfig {
        flags: vec![("tasks", ["--tasks-escalation-grace", "1s"].map(String::from).to_vec())],
        ..Default::default()
    };
    let cluster = Cluster::start(config).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    let sales = department(gw, &admin, "Sales").await;
    let east = department(gw, &admin, "East").await;
    let head = member(gw, &admin, "head@example.com", "Head of department", &sales.id, "").await;
    let alice = member(gw, &admin, "alice@example.com", "Salesperson", &sales.id, &head.user.id).await;
    let bob = member(gw, &admin, "bob@example.com", "Salesperson", &sales.id, &head.user.id).await;
    let carol = member(gw, &admin, "carol@example.com", "Salesperson", &east.id, "").await;

    // T1: Alice gives Bob a task about her customer; Bob is told.
    let person = Person { full_name: "Anna Petrova".into(), ..Default::default() };
    let anna = contacts_as(gw, &alice.token)
        .await
        .create_person(CreatePersonRequest { person: Some(person), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let anna_ref = CustomerRef { record_type: RecordType::Person as i32, id: anna.id.clone(), ..Default::default() };
    let now = crm_kit::time::now_micros();
    let task = Task {
        title: "Send Anna the offer".into(),
        assignee_id: bob.user.id.clone(),
        due_time: ts(now + 86_400_000_000),
        time_zone: "Europe/Berlin".into(),
        customer: Some(anna_ref.clone()),
        ..Default::default()
    };
    let task = tasks_as(gw, &alice.token)
        .await
        .create_task(CreateTaskRequest { task: Some(task), request_id: String::new() })
        .await
        .expect("Alice creates a task for Bob")
        .into_inner();
    assert_eq!(task.customer.as_ref().unwrap().display_name, "Anna Petrova");
    let told = wait_inbox(gw, &bob.token, ASSIGNED, 1).await;
    assert_eq!(told[0].subject_id, task.id);
    assert!(told[0].title.contains("Send Anna the offer"), "{:?}", told[0].title);
    assert!(inbox(gw, &alice.token).await.iter().all(|n| n.event_type != ASSIGNED), "no notice of one's own act");
    // Carol, in another department, sees neither the task nor may she link Alice's customer.
    let carol_get = tasks_as(gw, &carol.token).await.get_task(GetTaskRequest { id: task.id.clone() }).await;
    assert_eq!(carol_get.unwrap_err().code(), Code::NotFound);
    let carol_task = Task { title: "Steal".into(), customer: Some(anna_ref.clone()), ..Default::default() };
    let refused = tasks_as(gw, &carol.token)
        .await
        .create_task(CreateTaskRequest { task: Some(carol_task), request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("task.customer.id") || format!("{refused:?}").contains("task.customer.id"));

    // T3 + C8: Alice logs a call; contacts moves Anna's last activity to it.
    let call = Activity {
        r#type: ActivityType::Call as i32,
        summary: "Discussed the renewal".into(),
        customer: Some(anna_ref.clone()),
        task_id: task.id.clone(),
        ..Default::default()
    };
    let call = tasks_as(gw, &alice.token)
        .await
        .log_activity(LogActivityRequest { activity: Some(call), request_id: String::new() })
        .await
        .expect("Alice logs a call")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let p = contacts_as(gw, &alice.token).await.get_person(GetPersonRequest { id: anna.id.clone() }).await.unwrap();
        let p = p.into_inner();
        if p.last_activity_time.is_some() {
            break p;
        }
        assert!(Instant::now() < deadline, "contacts never recorded the call");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen.last_activity_time, call.occur_time);
    assert_eq!(seen.last_activity_summary, "Discussed the renewal");
    assert_eq!(seen.etag, anna.etag, "the last activity is no edit of the record");

    // T4: the head sees Alice's call and comments; Alice is told. Carol cannot.
    let timeline = ListActivitiesRequest { filter: format!("customer_id = \"{}\"", anna.id), ..Default::default() };
    let head_view = tasks_as(gw, &head.token).await.list_activities(timeline.clone()).await.unwrap().into_inner();
    assert_eq!(head_view.activities.len(), 1);
    assert!(
        tasks_as(gw, &carol.token).await.list_activities(timeline).await.unwrap().into_inner().activities.is_empty()
    );
    let comment = |body: &str| AddCommentRequest {
        subject_type: SubjectType::Activity as i32,
        subject_id: call.id.clone(),
        body: body.into(),
        request_id: String::new(),
    };
    tasks_as(gw, &head.token).await.add_comment(comment("Offer the two-year plan")).await.expect("the head comments");
    let carol_comment = tasks_as(gw, &carol.token).await.add_comment(comment("?")).await.unwrap_err();
    assert_eq!(carol_comment.code(), Code::NotFound);
    let told = wait_inbox(gw, &alice.token, COMMENTED, 1).await;
    assert!(told[0].body.contains("Offer the two-year plan"), "{:?}", told[0].body);

    // T6: the head's per-user counts hold Alice's call; Bob's own view does not.
    let today = crm_kit::time::format_rfc3339(crm_kit::time::now_micros())[..10].to_string();
    let counts = CountActivitiesRequest { start_date: today.clone(), end_date: today, ..Default::default() };
    let days = tasks_as(gw, &head.token).await.count_activities(counts.clone()).await.unwrap().into_inner().days;
    assert_eq!(days.iter().map(|d| (d.author_id.as_str(), d.calls)).collect::<Vec<_>>(), [(alice.user.id.as_str(), 1)]);
    assert!(tasks_as(gw, &bob.token).await.count_activities(counts).await.unwrap().into_inner().days.is_empty());

    // T5: a back-dated task overdue past the grace reaches Alice's supervisor, once.
    let overdue = |title: &str| Task { title: title.into(), due_time: ts(now - 3_600_000_000), ..Default::default() };
    let late = tasks_as(gw, &alice.token)
        .await
        .create_task(CreateTaskRequest { task: Some(overdue("Call the bank")), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let escalated = wait_inbox(gw, &head.token, OVERDUE, 1).await;
    assert_eq!(escalated[0].subject_id, late.id);
    assert!(escalated[0].body.contains("alice"), "the assignee is named: {:?}", escalated[0].body);
    // A second one follows the first through the same path; the first is still there once.
    let later = tasks_as(gw, &bob.token)
        .await
        .create_task(CreateTaskRequest { task: Some(overdue("File the report")), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let escalated = wait_inbox(gw, &head.token, OVERDUE, 2).await;
    let mut subjects: Vec<&str> = escalated.iter().map(|n| n.subject_id.as_str()).collect();
    subjects.sort_unstable();
    let mut expected = vec![late.id.as_str(), later.id.as_str()];
    expected.sort_unstable();
    assert_eq!(subjects, expected, "each overdue task escalated exactly once");
    assert!(inbox(gw, &carol.token).await.is_empty(), "nothing of the Sales department reaches East");
    // Carol has no supervisor: her overdue task goes to the head of her department.
    let east_head = member(gw, &admin, "east-head@example.com", "Head of department", &east.id, "").await;
    let head_of_east = UpdateDepartmentRequest {
        department: Some(Department { id: east.id.clone(), head_id: east_head.user.id.clone(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["head_id".into()] }),
    };
    org_as(gw, &admin).await.update_department(head_of_east).await.expect("East gets a head");
    let carols = tasks_as(gw, &carol.token)
        .await
        .create_task(CreateTaskRequest { task: Some(overdue("Renew the permit")), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let escalated = wait_inbox(gw, &east_head.token, OVERDUE, 1).await;
    assert_eq!(escalated[0].subject_id, carols.id);

    // T2: Bob's agenda holds the task Alice gave him; his calendar feed serves it to any
    // calendar app at a secret address, until he revokes it.
    let due_day = crm_kit::time::format_rfc3339(now + 86_400_000_000)[..10].to_string();
    let agenda = GetAgendaRequest { start_date: due_day, days: 1, time_zone: "UTC".into(), ..Default::default() };
    let agenda = tasks_as(gw, &bob.token).await.get_agenda(agenda).await.unwrap().into_inner();
    assert_eq!(agenda.items.len(), 1);
    let feed = tasks_as(gw, &bob.token).await.create_calendar_feed(CreateCalendarFeedRequest {}).await.unwrap();
    let feed = feed.into_inner();
    let (status, body) = http_get(gw, &feed.path).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("BEGIN:VCALENDAR") && body.contains("SUMMARY:Task: Send Anna the offer"), "{body}");
    assert_eq!(http_get(gw, "/calendar/not-a-feed").await.0, 404);
    tasks_as(gw, &bob.token).await.revoke_calendar_feed(RevokeCalendarFeedRequest {}).await.unwrap();
    assert_eq!(http_get(gw, &feed.path).await.0, 404, "a revoked feed answers no more");

    visibility_matrix(gw, &admin).await;
}

/// Who sees whose tasks, events and activity records across a three-level organisation
/// (Sales, with East and West under it), through the gateway: each salesperson their own; the
/// head of East the East team's; the head of Sales both teams'; an executive everything. Every
/// (viewer, owner, kind) pair is checked with a Get, and each viewer's listings are counted.
async fn visibility_matrix(gw: SocketAddr, admin: &str) {
    let sales = department(gw, admin, "Matrix Sales").await;
    let east = sub_department(gw, admin, "Matrix East", &sales.id).await;
    let west = sub_department(gw, admin, "Matrix West", &sales.id).await;
    let exec = member(gw, admin, "m-exec@example.com", "Executive", &sales.id, "").await;
    let sales_head = member(gw, admin, "m-sales-head@example.com", "Head of department", &sales.id, "").await;
    let east_head = member(gw, admin, "m-east-head@example.com", "Head of department", &east.id, "").await;
    let east_1 = member(gw, admin, "m-east-1@example.com", "Salesperson", &east.id, &east_head.user.id).await;
    let west_1 = member(gw, admin, "m-west-1@example.com", "Salesperson", &west.id, &sales_head.user.id).await;
    // Each salesperson's own task, event and activity record.
    let mut owned = Vec::new();
    for owner in [&east_1, &west_1] {
        let mut client = tasks_as(gw, &owner.token).await;
        let task = Task { title: format!("{} task", owner.user.email), ..Default::default() };
        let task = client.create_task(CreateTaskRequest { task: Some(task), request_id: String::new() }).await.unwrap();
        let start = crm_kit::time::now_micros() + 3_600_000_000;
        let event = CalendarEvent {
            title: format!("{} meeting", owner.user.email),
            start_time: ts(start),
            end_time: ts(start + 1_800_000_000),
            ..Default::default()
        };
        let event =
            client.create_event(CreateEventRequest { event: Some(event), request_id: String::new() }).await.unwrap();
        let record =
            Activity { r#type: ActivityType::Note as i32, summary: "Matrix note".into(), ..Default::default() };
        let record = client
            .log_activity(LogActivityRequest { activity: Some(record), request_id: String::new() })
            .await
            .unwrap();
        owned.push((owner.user.id.clone(), task.into_inner().id, event.into_inner().id, record.into_inner().id));
    }
    let (east_owner, west_owner) = (owned[0].0.clone(), owned[1].0.clone());
    let viewers: [(&str, &Member, &[&str]); 5] = [
        ("exec", &exec, &[&east_owner, &west_owner]),
        ("sales-head", &sales_head, &[&east_owner, &west_owner]),
        ("east-head", &east_head, &[&east_owner]),
        ("east-1", &east_1, &[&east_owner]),
        ("west-1", &west_1, &[&west_owner]),
    ];
    let mut failures = Vec::new();
    for (name, viewer, sees) in viewers {
        let mut client = tasks_as(gw, &viewer.token).await;
        for (owner, task, event, record) in &owned {
            let expected = sees.contains(&owner.as_str());
            let got = [
                ("task", client.get_task(GetTaskRequest { id: task.clone() }).await.map(|_| ())),
                ("event", client.get_event(GetEventRequest { id: event.clone() }).await.map(|_| ())),
                ("activity", client.get_activity(GetActivityRequest { id: record.clone() }).await.map(|_| ())),
            ];
            for (kind, result) in got {
                match (&result, expected) {
                    (Ok(()), true) => {}
                    (Err(s), false) if s.code() == Code::NotFound => {}
                    _ => failures
                        .push(format!("{name} Get {kind} of {owner}: expected visible={expected}, got {result:?}")),
                }
            }
        }
        let notes = client
            .list_activities(ListActivitiesRequest {
                filter: "type = NOTE".into(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .activities;
        let listed: Vec<&str> =
            notes.iter().filter(|a| a.summary == "Matrix note").map(|a| a.author_id.as_str()).collect();
        if listed.len() != sees.len() || !sees.iter().all(|s| listed.contains(s)) {
            failures.push(format!("{name} lists the notes of {listed:?}, expected {sees:?}"));
        }
    }
    assert!(failures.is_empty(), "visibility failures:\n{}", failures.join("\n"));
}

/// 1,000 reminders on three tasks replicas, one killed while they come due: every reminder
/// reaches the assignee exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reminders_fire_once_with_a_replica_killed() {
    const TASKS: usize = 1_000;
    let config = ClusterConfig { replicas: vec![("tasks", 3)], ..Default::default() };
    let mut cluster = Cluster::start(config).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    // Each reminder fires 4 s after its task is created (5 s before a due time 9 s ahead).
    let create = |i: usize| {
        let admin = admin.clone();
        async move {
            let request = || {
                let now = crm_kit::time::now_micros();
                let task = Task {
                    title: format!("Reminder {i}"),
                    due_time: ts(now + 9_000_000),
                    reminders: vec![prost_types::Duration { seconds: 5, nanos: 0 }],
                    ..Default::default()
                };
                CreateTaskRequest { task: Some(task), request_id: format!("reminder-{i}") }
            };
            let mut client = tasks_as(gw, &admin).await;
            // A call cut off by the killed replica is retried with its request id (the task
            // its first call created comes back, if it did); its times are reckoned again, so
            // that retries on a busy machine never ask for a reminder in the past.
            loop {
                match client.create_task(request()).await {
                    Ok(task) => return task.into_inner().id,
                    Err(status) if status.code() == Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(status) => panic!("create task {i}: {status:?}"),
                }
            }
        }
    };
    let mut ids = Vec::with_capacity(TASKS);
    let mut killed = false;
    for chunk in (0..TASKS).collect::<Vec<_>>().chunks(50) {
        ids.extend(futures_util::future::join_all(chunk.iter().map(|i| create(*i))).await);
        if !killed && ids.len() >= TASKS / 2 {
            // Reminders of the first half are coming due now: one replica dies among them.
            cluster.process("tasks", 1).kill();
            killed = true;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let reminders = loop {
        let reminders: Vec<Notification> =
            inbox(gw, &admin).await.into_iter().filter(|n| n.event_type == REMINDER).collect();
        let mut seen: Vec<&str> = reminders.iter().map(|n| n.subject_id.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() >= TASKS || Instant::now() > deadline {
            break reminders;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut per_task: HashMap<&str, usize> = HashMap::new();
    for n in &reminders {
        *per_task.entry(n.subject_id.as_str()).or_default() += 1;
    }
    let missing = ids.iter().filter(|id| !per_task.contains_key(id.as_str())).count();
    assert_eq!(missing, 0, "{missing} of {TASKS} reminders never arrived");
    let twice: Vec<_> = per_task.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "reminders that arrived more than once: {twice:?}");
    assert_eq!(reminders.len(), TASKS);
}

/// The embedded mode: `crm dev` on SQLite carries tasks' events to notifications and contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_dev_runs_tasks_on_sqlite() {
    let data = tempfile::tempdir().unwrap();
    let gw = free_addr();
    let _dev = start_dev("dev", &data.path().join("crm-data"), gw, &[("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD)]).await;
    let admin = admin_token(gw).await;
    let sales = department(gw, &admin, "Sales").await;
    let alice = member(gw, &admin, "alice@example.com", "Salesperson", &sales.id, "").await;
    let task = Task { title: "Prepare the contract".into(), assignee_id: alice.user.id.clone(), ..Default::default() };
    let task = tasks_as(gw, &admin)
        .await
        .create_task(CreateTaskRequest { task: Some(task), request_id: String::new() })
        .await
        .expect("the administrator gives Alice a task")
        .into_inner();
    let told = wait_inbox(gw, &alice.token, ASSIGNED, 1).await;
    assert_eq!(told[0].subject_id, task.id);

    let person = Person { full_name: "Boris Ivanov".into(), ..Default::default() };
    let boris = contacts_as(gw, &alice.token)
        .await
        .create_person(CreatePersonRequest { person: Some(person), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let visit = Activity {
        r#type: ActivityType::Visit as i32,
        summary: "Visited the warehouse".into(),
        customer: Some(CustomerRef {
            record_type: RecordType::Person as i32,
            id: boris.id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    tasks_as(gw, &alice.token)
        .await
        .log_activity(LogActivityRequest { activity: Some(visit), request_id: String::new() })
        .await
        .expect("Alice logs a visit");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p =
            contacts_as(gw, &alice.token).await.get_person(GetPersonRequest { id: boris.id.clone() }).await.unwrap();
        if p.into_inner().last_activity_summary == "Visited the warehouse" {
            break;
        }
        assert!(Instant::now() < deadline, "contacts never recorded the visit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
