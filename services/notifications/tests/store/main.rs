//! The notifications service against both backends, through its API and its event intake (the
//! consumer's handler, run in a transaction as the backbone runs it). PostgreSQL comes from
//! CRM_TEST_POSTGRES_URL (a fresh database per test); SQLite from a temporary file.

use std::time::Duration;

use crm_kit::auth::Claims;
use crm_kit::events::envelope::envelope;
use crm_kit::events::{Delivered, Handler};
use crm_kit::page::Page;
use crm_kit::testing::TestDb;
use crm_notifications::intake::{Intake, IntakeSettings};
use crm_notifications::live::Hub;
use crm_notifications::store::{self, AttemptResult, DeliveryFilter, Start};
use crm_notifications::{NotificationsApi, Store};
use crm_proto::auth::v1::{PasswordChanged, UserLockedOut};
use crm_proto::contacts::v1::{ContactOwnerChanged, RecordType};
use crm_proto::notifications::v1::notifications_service_server::NotificationsService;
use crm_proto::notifications::v1::*;
use tokio_stream::StreamExt;
use tonic::{Code, Request};
use tonic_types::StatusExt;

const ADMIN: &str = "0190a000-0000-7000-8000-000000000001";
const ALICE: &str = "0190a000-0000-7000-8000-000000000003";
const BOB: &str = "0190a000-0000-7000-8000-000000000004";
const OWNER_CHANGED: &str = "crm.contacts.v1.ContactOwnerChanged";
const PASSWORD_CHANGED: &str = "crm.auth.v1.PasswordChanged";
const ADMIN_PERMISSION: &str = crm_notifications::permissions::ADMIN.name;

struct Env {
    store: Store,
    api: NotificationsApi,
    intake: Intake,
    _db: TestDb,
}

async fn env(db: TestDb) -> Env {
    let store = Store::open(db.url(), 4).await.expect("open the store");
    let api = NotificationsApi::new(store.clone(), Hub::new(), "en".into(), Duration::from_millis(50));
    let intake =
        Intake::new(store.clone(), None, IntakeSettings { default_locale: "en".into(), email: true, sms: false });
    Env { store, api, intake, _db: db }
}

fn as_user<T>(user: &str, message: T) -> Request<T> {
    crm_kit::testing::request(&crm_kit::testing::principal(user, &[]), message)
}

fn as_admin<T>(message: T) -> Request<T> {
    crm_kit::testing::request(&crm_kit::testing::principal(ADMIN, &[ADMIN_PERMISSION]), message)
}

fn assigned(to: &str, name: &str) -> ContactOwnerChanged {
    ContactOwnerChanged {
        record_type: RecordType::Person as i32,
        id: crm_kit::id::new(),
        display_name: name.into(),
        from_owner_id: String::new(),
        to_owner_id: to.into(),
    }
}

/// Runs the intake on `event` in a transaction of its own, as the consumer would.
async fn deliver(env: &Env, delivered: &Delivered) {
    let mut tx = env.store.db().begin_write().await.unwrap();
    env.intake.handle(&mut tx, delivered).await.expect("the intake handles the event");
    tx.commit().await.unwrap();
}

fn delivered<E: prost::Name>(source: &str, subject: &str, actor: &str, event: &E) -> Delivered {
    Delivered { envelope: envelope(source, subject, actor, event), seq: 1, redelivered: false }
}

async fn inbox(env: &Env, user: &str) -> Vec<Notification> {
    let r = ListNotificationsRequest { page_size: 1000, ..Default::default() };
    env.api.list_notifications(as_user(user, r)).await.unwrap().into_inner().notifications
}

async fn unread(env: &Env, user: &str) -> i64 {
    env.api.get_unread_count(as_user(user, GetUnreadCountRequest {})).await.unwrap().into_inner().unread
}

fn field_violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}

async fn an_event_reaches_each_recipient_once(env: Env) {
    let event = delivered("contacts", "c1", ADMIN, &assigned(ALICE, "Anna Petrova"));
    for _ in 0..3 {
        deliver(&env, &event).await;
    }
    let alice = inbox(&env, ALICE).await;
    assert_eq!(alice.len(), 1, "one inbox entry however often the event comes");
    assert_eq!(alice[0].title, "Assigned to you: Anna Petrova");
    assert_eq!(alice[0].sequence, 1);
    assert_eq!((alice[0].event_type.as_str(), alice[0].source.as_str()), (OWNER_CHANGED, "contacts"));
    assert_eq!(unread(&env, ALICE).await, 1, "the unread count is not raised by repeats");
    // One e-mail delivery too, however often.
    let list =
        env.store.list_deliveries(&DeliveryFilter::default(), &first_page(&store::deliveries::ORDER)).await.unwrap().0;
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].recipient_id.as_str(), list[0].channel), (ALICE, Channel::Email as i32));
    // Taking a record oneself notifies nobody; other users see nothing of Alice's.
    deliver(&env, &delivered("contacts", "c2", BOB, &assigned(BOB, "Boris"))).await;
    assert!(inbox(&env, BOB).await.is_empty());
    // Events that notify nobody are simply handled.
    deliver(&env, &delivered("auth", ALICE, ADMIN, &crm_proto::auth::v1::UserDeactivated { user_id: ALICE.into() }))
        .await;
    assert_eq!(inbox(&env, ALICE).await.len(), 1);
}

fn first_page(order: &crm_kit::page::Order) -> Page {
    Page::decode(&["deliveries", "0", "0", "", ""], 100, "", order).unwrap()
}

async fn inbox_pages_orders_marks_and_counts(env: Env) {
    for i in 1..=5 {
        deliver(&env, &delivered("contacts", "c", ADMIN, &assigned(ALICE, &format!("Person {i}")))).await;
    }
    // Newest first, two per page.
    let mut titles = Vec::new();
    let mut token = String::new();
    loop {
        let r = ListNotificationsRequest { page_size: 2, page_token: token.clone(), ..Default::default() };
        let page = env.api.list_notifications(as_user(ALICE, r)).await.unwrap().into_inner();
        titles.extend(page.notifications.iter().map(|n| n.sequence));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(titles, [5, 4, 3, 2, 1]);
    let all = inbox(&env, ALICE).await;
    let id_of = |seq: i64| all.iter().find(|n| n.sequence == seq).unwrap().id.clone();
    // Marking another's notification, or an unknown one, marks nothing.
    let mark = MarkReadRequest { ids: vec![id_of(4)], all: false };
    let status = env.api.mark_read(as_user(BOB, mark)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let mark = MarkReadRequest { ids: vec![id_of(4), crm_kit::id::new()], all: false };
    assert_eq!(env.api.mark_read(as_user(ALICE, mark)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(unread(&env, ALICE).await, 5);
    // Marking 4 and 5 read (5 twice: counted once).
    let mark = MarkReadRequest { ids: vec![id_of(4), id_of(5), id_of(5)], all: false };
    let marked = env.api.mark_read(as_user(ALICE, mark)).await.unwrap().into_inner();
    assert_eq!((marked.marked, marked.unread), (2, 3));
    let again = MarkReadRequest { ids: vec![id_of(5)], all: false };
    assert_eq!(env.api.mark_read(as_user(ALICE, again)).await.unwrap().into_inner().marked, 0);
    // Unread first: 3, 2, 1, then the read 5, 4.
    let r = ListNotificationsRequest { page_size: 2, order_by: "unread".into(), ..Default::default() };
    let first = env.api.list_notifications(as_user(ALICE, r.clone())).await.unwrap().into_inner();
    let r2 = ListNotificationsRequest { page_token: first.next_page_token.clone(), ..r.clone() };
    let second = env.api.list_notifications(as_user(ALICE, r2)).await.unwrap().into_inner();
    let r3 = ListNotificationsRequest { page_token: second.next_page_token.clone(), ..r.clone() };
    let third = env.api.list_notifications(as_user(ALICE, r3)).await.unwrap().into_inner();
    let order: Vec<(i64, bool)> =
        [first, second, third].iter().flat_map(|p| p.notifications.iter().map(|n| (n.sequence, n.read))).collect();
    assert_eq!(order, [(3, false), (2, false), (1, false), (5, true), (4, true)]);
    // A token of one order is refused by another.
    let wrong = ListNotificationsRequest { page_size: 2, page_token: r.page_token.clone(), ..Default::default() };
    assert!(env.api.list_notifications(as_user(ALICE, wrong)).await.is_ok());
    let p = ListNotificationsRequest { page_size: 2, order_by: "unread".into(), ..Default::default() };
    let token = env.api.list_notifications(as_user(ALICE, p)).await.unwrap().into_inner().next_page_token;
    let mixed = ListNotificationsRequest { page_size: 2, page_token: token, ..Default::default() };
    assert_eq!(env.api.list_notifications(as_user(ALICE, mixed)).await.unwrap_err().code(), Code::InvalidArgument);
    // Unread only.
    let r = ListNotificationsRequest { unread_only: true, ..Default::default() };
    let unread_list = env.api.list_notifications(as_user(ALICE, r)).await.unwrap().into_inner().notifications;
    assert_eq!(unread_list.iter().map(|n| n.sequence).collect::<Vec<_>>(), [3, 2, 1]);
    // All.
    let all = MarkReadRequest { ids: vec![], all: true };
    let marked = env.api.mark_read(as_user(ALICE, all)).await.unwrap().into_inner();
    assert_eq!((marked.marked, marked.unread), (3, 0));
    assert!(inbox(&env, ALICE).await.iter().all(|n| n.read && n.read_time.is_some()));
    // Bad requests.
    let both = MarkReadRequest { ids: vec![id_of(1)], all: true };
    let status = env.api.mark_read(as_user(ALICE, both)).await.unwrap_err();
    assert_eq!(field_violations(&status)[0].0, "ids");
    let bad = MarkReadRequest { ids: vec!["nope".into()], all: false };
    assert_eq!(field_violations(&env.api.mark_read(as_user(ALICE, bad)).await.unwrap_err())[0].0, "ids[0]");
    let bad = ListNotificationsRequest { order_by: "title".into(), ..Default::default() };
    assert_eq!(env.api.list_notifications(as_user(ALICE, bad)).await.unwrap_err().code(), Code::InvalidArgument);
}

async fn preferences_choose_channels_but_not_over_mandatory_in_app(env: Env) {
    let prefs = env.api.get_preferences(as_user(ALICE, GetPreferencesRequest {})).await.unwrap().into_inner();
    let owner = prefs.events.iter().find(|e| e.event_type == OWNER_CHANGED).unwrap();
    assert_eq!(owner.channels, [Channel::InApp as i32, Channel::Email as i32]);
    assert!(!owner.customized);
    // Alice wants nothing for assignments, only e-mail for password changes (in-app is mandatory).
    let update = UpdatePreferencesRequest {
        preferences: Some(Preferences {
            locale: "ru".into(),
            events: vec![
                EventPreference { event_type: OWNER_CHANGED.into(), channels: vec![], ..Default::default() },
                EventPreference {
                    event_type: PASSWORD_CHANGED.into(),
                    channels: vec![Channel::Email as i32],
                    ..Default::default()
                },
            ],
        }),
        update_mask: None,
    };
    let prefs = env.api.update_preferences(as_user(ALICE, update)).await.unwrap().into_inner();
    assert_eq!(prefs.locale, "ru");
    let password = prefs.events.iter().find(|e| e.event_type == PASSWORD_CHANGED).unwrap();
    assert_eq!(password.channels, [Channel::InApp as i32, Channel::Email as i32], "in-app stays: mandatory");
    assert!(password.customized && password.mandatory_in_app);
    deliver(&env, &delivered("contacts", "c1", ADMIN, &assigned(ALICE, "Anna"))).await;
    assert!(inbox(&env, ALICE).await.is_empty(), "assignments are off for Alice");
    let changed = PasswordChanged { user_id: ALICE.into(), by_self: false, revoked_sessions: 2 };
    deliver(&env, &delivered("auth", ALICE, ADMIN, &changed)).await;
    let alice = inbox(&env, ALICE).await;
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].title, "Ваш пароль изменён", "in her language");
    assert!(alice[0].body.contains("Администратор"), "{}", alice[0].body);
    // Bob keeps the defaults: a locked-out user hears of it in English, by e-mail too.
    let locked = UserLockedOut {
        user_id: BOB.into(),
        email: "bob@example.com".into(),
        failed_attempts: 5,
        locked_until: crm_kit::time::to_timestamp(1_700_000_000_000_000),
        client_address: "203.0.113.7".into(),
    };
    deliver(&env, &delivered("auth", BOB, "", &locked)).await;
    let bob = inbox(&env, BOB).await;
    assert_eq!(bob[0].title, "Your account was locked");
    assert!(bob[0].body.contains("5 wrong passwords") && bob[0].body.contains("203.0.113.7"), "{}", bob[0].body);
    let filter = DeliveryFilter { recipient_id: Some(BOB.into()), ..Default::default() };
    assert_eq!(env.store.list_deliveries(&filter, &first_page(&store::deliveries::ORDER)).await.unwrap().0.len(), 1);
    // An administrator turns assignments off for everyone.
    let off = UpdateEventTypeRequest {
        event_type: Some(EventType { name: OWNER_CHANGED.into(), enabled: false, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["enabled".into()] }),
    };
    assert_eq!(env.api.update_event_type(as_user(BOB, off.clone())).await.unwrap_err().code(), Code::PermissionDenied);
    assert!(!env.api.update_event_type(as_admin(off)).await.unwrap().into_inner().enabled);
    deliver(&env, &delivered("contacts", "c3", ADMIN, &assigned(BOB, "Vera"))).await;
    assert_eq!(inbox(&env, BOB).await.len(), 1, "no new notification of a disabled event type");
    // Bad preferences.
    let bad = UpdatePreferencesRequest {
        preferences: Some(Preferences {
            locale: "not a locale".into(),
            events: vec![EventPreference {
                event_type: "crm.x.v1.Nope".into(),
                channels: vec![9],
                ..Default::default()
            }],
        }),
        update_mask: None,
    };
    let status = env.api.update_preferences(as_user(ALICE, bad)).await.unwrap_err();
    let fields: Vec<String> = field_violations(&status).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["preferences.locale", "preferences.events[0].event_type"]);
}

async fn templates_are_checked_customised_previewed_and_reset(env: Env) {
    let template = |body: &str| Template {
        event_type: OWNER_CHANGED.into(),
        channel: Channel::InApp as i32,
        locale: "en".into(),
        subject: "New: {{ event.display_name }}".into(),
        body: body.into(),
        ..Default::default()
    };
    // Not an administrator; an unknown variable; an unknown event type; bad syntax.
    let put = |t: Template| PutTemplateRequest { template: Some(t) };
    let status = env.api.put_template(as_user(ALICE, put(template("x")))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = env.api.put_template(as_admin(put(template("{{ event.nickname }}")))).await.unwrap_err();
    let violations = field_violations(&status);
    assert_eq!(violations[0].0, "template.body");
    assert!(violations[0].1.contains("undefined"), "{violations:?}");
    let unknown = Template { event_type: "crm.contacts.v1.Nope".into(), ..template("x") };
    assert_eq!(
        field_violations(&env.api.put_template(as_admin(put(unknown))).await.unwrap_err())[0].0,
        "template.event_type"
    );
    let status = env.api.put_template(as_admin(put(template("{% if %}")))).await.unwrap_err();
    assert!(field_violations(&status)[0].1.contains("syntax"), "{:?}", field_violations(&status));
    let huge = template(&"x".repeat(crm_notifications::render::MAX_BODY_SOURCE + 1));
    assert_eq!(field_violations(&env.api.put_template(as_admin(put(huge))).await.unwrap_err())[0].0, "template.body");
    // A good one is used from now on.
    let saved =
        env.api.put_template(as_admin(put(template("{{ event.display_name }} joined your list.")))).await.unwrap();
    assert!(saved.get_ref().customized);
    deliver(&env, &delivered("contacts", "c1", ADMIN, &assigned(ALICE, "Anna"))).await;
    let alice = inbox(&env, ALICE).await;
    assert_eq!((alice[0].title.as_str(), alice[0].body.as_str()), ("New: Anna", "Anna joined your list."));
    // Listed as customised beside the shipped ones.
    let list = ListTemplatesRequest { event_type: OWNER_CHANGED.into(), ..Default::default() };
    let templates = env.api.list_templates(as_admin(list)).await.unwrap().into_inner().templates;
    assert_eq!(templates.len(), 9, "three channels × three languages");
    assert_eq!(templates.iter().filter(|t| t.customized).count(), 1);
    // Preview: the one in use, or a draft, against the sample or a given event.
    let preview = PreviewTemplateRequest {
        template: Some(Template { subject: String::new(), body: String::new(), ..template("") }),
        event_json: r#"{"display_name": "Oleg", "to_owner_id": "x"}"#.into(),
    };
    let out = env.api.preview_template(as_admin(preview)).await.unwrap().into_inner();
    assert_eq!((out.subject.as_str(), out.body.as_str()), ("New: Oleg", "Oleg joined your list."));
    let preview = PreviewTemplateRequest {
        template: Some(Template { channel: Channel::Email as i32, locale: "zh".into(), ..template("") }),
        event_json: String::new(),
    };
    let preview = PreviewTemplateRequest {
        template: Some(Template { subject: String::new(), body: String::new(), ..preview.template.unwrap() }),
        ..preview
    };
    let out = env.api.preview_template(as_admin(preview)).await.unwrap().into_inner();
    assert!(out.body.contains("Anna Petrova，您好"), "{}", out.body);
    let bad_event = PreviewTemplateRequest { template: Some(template("x")), event_json: r#"{"nope": 1}"#.into() };
    let status = env.api.preview_template(as_admin(bad_event)).await.unwrap_err();
    assert_eq!(field_violations(&status)[0].0, "event_json");
    // A text message has no subject.
    let sms = Template { channel: Channel::Sms as i32, ..template("{{ event.display_name }}") };
    let status = env.api.put_template(as_admin(put(sms.clone()))).await.unwrap_err();
    assert_eq!(field_violations(&status)[0].0, "template.subject");
    let sms = Template { subject: String::new(), ..sms };
    assert!(env.api.put_template(as_admin(put(sms))).await.is_ok());
    // Reset: the shipped one again.
    let reset =
        ResetTemplateRequest { event_type: OWNER_CHANGED.into(), channel: Channel::InApp as i32, locale: "en".into() };
    let shipped = env.api.reset_template(as_admin(reset)).await.unwrap().into_inner();
    assert!(!shipped.customized && shipped.subject.contains("Assigned to you"));
}

async fn deliveries_log_attempts_park_the_interrupted_and_retry(env: Env) {
    deliver(&env, &delivered("contacts", "c1", ADMIN, &assigned(ALICE, "Anna"))).await;
    let page = first_page(&store::deliveries::ORDER);
    let id = env.store.list_deliveries(&DeliveryFilter::default(), &page).await.unwrap().0[0].id.clone();
    // A first attempt fails and is to be retried.
    let Start::Go(first) = env.store.start_attempt(&id).await.unwrap() else { panic!("first attempt goes") };
    assert_eq!((first.number, first.round), (1, 1));
    let failed = AttemptResult { error: "451 try later".into(), response_code: 451, ..Default::default() };
    env.store.finish_attempt(&first, &failed, Some(crm_kit::time::now_micros())).await.unwrap();
    // The second starts, and its sender dies before recording the outcome.
    let Start::Go(second) = env.store.start_attempt(&id).await.unwrap() else { panic!("second attempt goes") };
    assert_eq!((second.number, second.round), (2, 2));
    match env.store.start_attempt(&id).await.unwrap() {
        Start::Interrupted { number } => assert_eq!(number, 2),
        other => panic!("an attempt found under way is interrupted, got {other:?}"),
    }
    assert!(matches!(env.store.start_attempt(&id).await.unwrap(), Start::Finished), "a dead delivery is not sent");
    // The administrator sees it dead with both attempts, and retries it.
    let dead = ListDeliveriesRequest { state: DeliveryState::Dead as i32, ..Default::default() };
    let list = env.api.list_deliveries(as_admin(dead.clone())).await.unwrap().into_inner().deliveries;
    assert_eq!(list.len(), 1);
    let outcomes: Vec<(&str, i32)> = list[0].attempts.iter().map(|a| (a.outcome.as_str(), a.response_code)).collect();
    assert_eq!(outcomes, [("failed", 451), ("interrupted", 0)]);
    assert!(list[0].last_error.contains("not sent again"));
    assert_eq!(env.api.list_deliveries(as_user(ALICE, dead.clone())).await.unwrap_err().code(), Code::PermissionDenied);
    let unknown = RetryDeliveriesRequest { ids: vec![crm_kit::id::new()], channel: 0 };
    assert_eq!(env.api.retry_deliveries(as_admin(unknown)).await.unwrap_err().code(), Code::NotFound);
    let retry = RetryDeliveriesRequest { ids: vec![], channel: Channel::Email as i32 };
    assert_eq!(env.api.retry_deliveries(as_admin(retry)).await.unwrap().into_inner().retried, 1);
    let Start::Go(third) = env.store.start_attempt(&id).await.unwrap() else { panic!("a retried delivery goes") };
    assert_eq!((third.number, third.round), (3, 1), "a new round of the schedule, the log goes on");
    let sent =
        AttemptResult { sent: true, response_code: 250, address: "alice@example.com".into(), ..Default::default() };
    env.store.finish_attempt(&third, &sent, None).await.unwrap();
    let all = env.api.list_deliveries(as_admin(ListDeliveriesRequest::default())).await.unwrap().into_inner();
    let d = &all.deliveries[0];
    assert_eq!((d.state, d.address.as_str()), (DeliveryState::Sent as i32, "alice@example.com"));
    assert!(d.sent_time.is_some());
    assert!(
        matches!(env.store.start_attempt(&id).await.unwrap(), Start::Finished),
        "a sent delivery is not sent again"
    );
}

async fn subscribers_resume_after_the_last_id_they_saw(env: Env) {
    for i in 1..=3 {
        deliver(&env, &delivered("contacts", "c", ADMIN, &assigned(ALICE, &format!("P{i}")))).await;
    }
    let first = inbox(&env, ALICE).await.into_iter().find(|n| n.sequence == 1).unwrap();
    let mut stream =
        env.api.subscribe(as_user(ALICE, SubscribeRequest { after_id: first.id.clone() })).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(stream.next().await.unwrap().unwrap().sequence);
    }
    for i in 4..=5 {
        deliver(&env, &delivered("contacts", "c", ADMIN, &assigned(ALICE, &format!("P{i}")))).await;
    }
    for _ in 0..2 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a new one arrives");
        seen.push(n.unwrap().unwrap().sequence);
    }
    assert_eq!(seen, [2, 3, 4, 5]);
    // Without an id: only what comes from now on.
    let mut fresh = env.api.subscribe(as_user(ALICE, SubscribeRequest::default())).await.unwrap().into_inner();
    deliver(&env, &delivered("contacts", "c", ADMIN, &assigned(ALICE, "P6"))).await;
    let n = tokio::time::timeout(Duration::from_secs(10), fresh.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(n.sequence, 6);
    // Someone else's id, or none at all, is refused; a service account has no inbox.
    let status = env.api.subscribe(as_user(BOB, SubscribeRequest { after_id: first.id.clone() })).await.err().unwrap();
    assert_eq!(field_violations(&status)[0].0, "after_id");
    let status = env.api.subscribe(as_user(BOB, SubscribeRequest { after_id: "x".into() })).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    let claims = Claims { sub: "svc".into(), svc: true, ..Claims::default() };
    let service = crm_kit::auth::Principal::from_claims(claims, "token".into());
    let request = crm_kit::testing::request(&service, GetUnreadCountRequest {});
    assert_eq!(env.api.get_unread_count(request).await.unwrap_err().code(), Code::PermissionDenied);
}

async fn webhooks_are_checked_and_get_the_events_of_their_types(env: Env) {
    let create = |url: &str, types: &[&str]| CreateWebhookRequest {
        webhook: Some(Webhook {
            url: url.into(),
            event_types: types.iter().map(|t| t.to_string()).collect(),
            description: "warehouse".into(),
            ..Default::default()
        }),
    };
    // Refused: private addresses, unknown types, not an administrator.
    let status = env
        .api
        .create_webhook(as_admin(create("https://127.0.0.1/hook", &["crm.contacts.v1.ContactCreated"])))
        .await
        .unwrap_err();
    let violations = field_violations(&status);
    assert_eq!(violations[0].0, "webhook.url");
    assert!(violations[0].1.contains("loopback"), "{violations:?}");
    let status = env
        .api
        .create_webhook(as_admin(create("https://192.168.0.10/", &["crm.contacts.v1.Person"])))
        .await
        .unwrap_err();
    let fields: Vec<String> = field_violations(&status).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["webhook.url", "webhook.event_types[0]"]);
    let status = env
        .api
        .create_webhook(as_user(ALICE, create("https://203.0.113.5/", &["crm.contacts.v1.ContactCreated"])))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Accepted: a public address (never called here); the secret is shown once.
    let created = env
        .api
        .create_webhook(as_admin(create(
            "https://93.184.215.14/crm",
            &["crm.contacts.v1.ContactCreated", "crm.contacts.v1.ContactCreated"],
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(created.secret.starts_with("whsec_"));
    let hook = created.webhook.unwrap();
    assert_eq!(hook.event_types, ["crm.contacts.v1.ContactCreated"], "listed once");
    let rotated =
        env.api.rotate_webhook_secret(as_admin(RotateWebhookSecretRequest { id: hook.id.clone() })).await.unwrap();
    assert_ne!(rotated.get_ref().secret, created.secret);
    let stored = env.store.webhook(&hook.id).await.unwrap();
    assert_eq!(stored.signing_secrets(crm_kit::time::now_micros()).len(), 2, "the old secret signs for a day");
    // Its events become deliveries, once each; others do not.
    let contact = crm_proto::contacts::v1::ContactCreated {
        record_type: RecordType::Company as i32,
        id: crm_kit::id::new(),
        display_name: "Acme".into(),
        owner_id: ADMIN.into(),
    };
    let event = delivered("contacts", &contact.id, ADMIN, &contact);
    deliver(&env, &event).await;
    deliver(&env, &event).await;
    deliver(&env, &delivered("contacts", "c", ADMIN, &assigned(BOB, "Boris"))).await;
    let filter = DeliveryFilter { channel: Some(Channel::Webhook as i32), ..Default::default() };
    let hooks = env.store.list_deliveries(&filter, &first_page(&store::deliveries::ORDER)).await.unwrap().0;
    assert_eq!(hooks.len(), 1);
    assert_eq!(
        (hooks[0].recipient_id.as_str(), hooks[0].event_type.as_str()),
        (hook.id.as_str(), "crm.contacts.v1.ContactCreated")
    );
    // Disabled: no more deliveries.
    let off = UpdateWebhookRequest {
        webhook: Some(Webhook { id: hook.id.clone(), enabled: false, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["enabled".into()] }),
    };
    let updated = env.api.update_webhook(as_admin(off)).await.unwrap().into_inner();
    assert!(!updated.enabled && updated.url == "https://93.184.215.14/crm");
    let again = crm_proto::contacts::v1::ContactCreated { id: crm_kit::id::new(), ..contact };
    deliver(&env, &delivered("contacts", &again.id, ADMIN, &again)).await;
    assert_eq!(env.store.list_deliveries(&filter, &first_page(&store::deliveries::ORDER)).await.unwrap().0.len(), 1);
    let list = env.api.list_webhooks(as_admin(ListWebhooksRequest {})).await.unwrap().into_inner().webhooks;
    assert_eq!(list, [updated]);
    env.api.delete_webhook(as_admin(DeleteWebhookRequest { id: hook.id.clone() })).await.unwrap();
    let status = env.api.delete_webhook(as_admin(DeleteWebhookRequest { id: hook.id })).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

async fn a_batch_numbers_each_inbox_in_order(env: Env) {
    deliver(&env, &delivered("contacts", "c0", ADMIN, &assigned(ALICE, "Before"))).await;
    let batch: Vec<Delivered> = (1..=6)
        .map(|i| delivered("contacts", "c", ADMIN, &assigned(if i % 2 == 0 { BOB } else { ALICE }, &format!("P{i}"))))
        .collect();
    let again = batch[0].clone();
    let mut refs: Vec<&Delivered> = batch.iter().collect();
    refs.push(&again);
    let mut tx = env.store.db().begin_write().await.unwrap();
    env.intake.handle_batch(&mut tx, &refs).await.expect("the batch is handled");
    tx.commit().await.unwrap();
    let numbers = |list: Vec<Notification>| {
        let mut out: Vec<(i64, String)> = list.into_iter().map(|n| (n.sequence, n.title)).collect();
        out.sort();
        out
    };
    let alice = numbers(inbox(&env, ALICE).await);
    assert_eq!(alice.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4], "{alice:?}");
    assert_eq!(alice[1].1, "Assigned to you: P1", "in the order of the batch");
    assert_eq!(alice[3].1, "Assigned to you: P5");
    let bob = numbers(inbox(&env, BOB).await);
    assert_eq!(bob.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!((unread(&env, ALICE).await, unread(&env, BOB).await), (4, 3));
    // The same events again, in a batch: nothing new.
    let mut tx = env.store.db().begin_write().await.unwrap();
    env.intake.handle_batch(&mut tx, &refs).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((inbox(&env, ALICE).await.len(), unread(&env, ALICE).await), (4, 4));
    let deliveries =
        env.store.list_deliveries(&DeliveryFilter::default(), &first_page(&store::deliveries::ORDER)).await.unwrap().0;
    assert_eq!(deliveries.len(), 7, "one e-mail per event and recipient");
    assert!(deliveries.iter().all(|d| !d.notification_id.is_empty()), "each tied to its inbox entry");
}

crm_kit::both_backends!(env =>
    a_batch_numbers_each_inbox_in_order,
    webhooks_are_checked_and_get_the_events_of_their_types,
    an_event_reaches_each_recipient_once,
    inbox_pages_orders_marks_and_counts,
    preferences_choose_channels_but_not_over_mandatory_in_app,
    templates_are_checked_customised_previewed_and_reset,
    deliveries_log_attempts_park_the_interrupted_and_retry,
    subscribers_resume_after_the_last_id_they_saw,
);
