//! Notifications end to end (SPEC N1-N4, N6): real `crm` processes — auth, contacts, two
//! notifications replicas, the gateway — with Redis carrying events and a real SMTP server
//! (aiosmtpd) receiving e-mail. Users act only through the gateway.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crm_proto::auth::v1::{GetMeRequest, User};
use crm_proto::contacts::v1::{CreatePersonRequest, Person, UpdatePersonRequest};
use crm_proto::notifications::v1::*;
use crm_tests::*;
use prost_types::FieldMask;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;

const OWNER_CHANGED: &str = "crm.contacts.v1.ContactOwnerChanged";

/// A salesperson created by the administrator, signed in.
struct Member {
    user: User,
    token: String,
}

async fn member(gateway: SocketAddr, admin: &str, email: &str, name: &str) -> Member {
    member_with_phone(gateway, admin, email, name, "").await
}

async fn member_with_phone(gateway: SocketAddr, admin: &str, email: &str, name: &str, phone: &str) -> Member {
    let me = auth_as(gateway, admin).await.get_me(GetMeRequest {}).await.unwrap().into_inner();
    let user = User {
        email: email.into(),
        display_name: name.into(),
        phone: phone.into(),
        department_id: me.department_id,
        ..Default::default()
    };
    let (user, token) = crm_tests::member(gateway, admin, "Salesperson", user).await;
    Member { user, token }
}

async fn set_locale(gateway: SocketAddr, token: &str, locale: &str, events: Vec<EventPreference>) {
    let mask = if events.is_empty() { vec!["locale".to_string()] } else { vec![] };
    let request = UpdatePreferencesRequest {
        preferences: Some(Preferences { locale: locale.into(), events }),
        update_mask: Some(FieldMask { paths: mask }),
    };
    notifications_as(gateway, token).await.update_preferences(request).await.expect("preferences saved");
}

/// Creates a person owned by `owner` (as the administrator: an assignment).
async fn assign(gateway: SocketAddr, admin: &str, owner: &str, name: &str) -> Person {
    let person = Person { full_name: name.into(), owner_id: owner.into(), ..Default::default() };
    let request = CreatePersonRequest { person: Some(person), request_id: String::new() };
    contacts_as(gateway, admin).await.create_person(request).await.expect("create a person").into_inner()
}

async fn inbox(gateway: SocketAddr, token: &str) -> Vec<Notification> {
    let request = ListNotificationsRequest { page_size: 1000, ..Default::default() };
    notifications_as(gateway, token).await.list_notifications(request).await.unwrap().into_inner().notifications
}

/// Waits until `token`'s inbox holds `count` notifications.
async fn wait_inbox(gateway: SocketAddr, token: &str, count: usize) -> Vec<Notification> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = inbox(gateway, token).await;
        if list.len() >= count {
            return list;
        }
        assert!(Instant::now() < deadline, "{count} notification(s) expected, {} arrived", list.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn deliveries(gateway: SocketAddr, admin: &str, recipient: &str) -> Vec<Delivery> {
    let request = ListDeliveriesRequest { recipient_id: recipient.into(), page_size: 100, ..Default::default() };
    notifications_as(gateway, admin).await.list_deliveries(request).await.unwrap().into_inner().deliveries
}

/// Waits until `recipient`'s deliveries satisfy `done`.
async fn wait_deliveries(
    gateway: SocketAddr,
    admin: &str,
    recipient: &str,
    what: &str,
    done: impl Fn(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = deliveries(gateway, admin, recipient).await;
        if done(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "{what}: deliveries are {list:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn notifications_flags(sink: &Sink, extra: &[&str]) -> Vec<String> {
    let mut flags = sink.smtp_flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// Assignments reach the new owner's inbox, live stream and mailbox, in their language; three
/// subscribers of 500 notifications, one reconnecting mid-way, each see every one exactly once
/// and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_reach_inboxes_streams_and_mailboxes() {
    let sink = Sink::smtp().await;
    let config = ClusterConfig {
        replicas: vec![("notifications", 2)],
        flags: vec![("notifications", notifications_flags(&sink, &[]))],
        ..ClusterConfig::default()
    };
    let cluster = Cluster::start(config).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    let ivan = member(gw, &admin, "ivan@example.com", "Иван Петров").await;
    let li = member(gw, &admin, "li@example.com", "李伟").await;
    set_locale(gw, &ivan.token, "ru", vec![]).await;
    set_locale(gw, &li.token, "zh-CN", vec![]).await;

    // Ivan listens before anything happens.
    let mut live =
        notifications_as(gw, &ivan.token).await.subscribe(SubscribeRequest::default()).await.unwrap().into_inner();

    // A record transferred from the administrator to Ivan; one created for Li.
    let person = assign(gw, &admin, &cluster_admin_id(gw, &admin).await, "Анна Смирнова").await;
    let mut transfer = person.clone();
    transfer.owner_id = ivan.user.id.clone();
    let request =
        UpdatePersonRequest { person: Some(transfer), update_mask: Some(FieldMask { paths: vec!["owner_id".into()] }) };
    contacts_as(gw, &admin).await.update_person(request).await.expect("transfer to Ivan");
    assign(gw, &admin, &li.user.id, "王芳").await;

    let pushed =
        tokio::time::timeout(Duration::from_secs(20), live.next()).await.expect("pushed live").unwrap().unwrap();
    assert_eq!(pushed.title, "Передан вам: Анна Смирнова");
    assert_eq!((pushed.event_type.as_str(), pushed.sequence), (OWNER_CHANGED, 1));
    let ivan_inbox = wait_inbox(gw, &ivan.token, 1).await;
    assert_eq!(ivan_inbox.len(), 1);
    assert_eq!(ivan_inbox[0].id, pushed.id);
    let li_inbox = wait_inbox(gw, &li.token, 1).await;
    assert_eq!(li_inbox[0].title, "已分配给您：王芳");

    // One e-mail each, in their language, UTF-8 throughout, with the delivery's Message-ID.
    let mail = sink.wait_for(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.messages().len(), 2, "one e-mail per recipient and channel");
    let to_ivan = mail.iter().find(|m| m["rcpt_tos"][0] == "ivan@example.com").expect("Ivan's e-mail");
    assert_eq!(to_ivan["subject"], "Передан вам: Анна Смирнова");
    assert_eq!(to_ivan["to"], "Иван Петров <ivan@example.com>");
    assert_eq!(to_ivan["from"], "CRM <crm@example.com>");
    assert_eq!(to_ivan["charset"], "utf-8");
    assert!(to_ivan["body"].as_str().unwrap().starts_with("Здравствуйте, Иван Петров!"), "{}", to_ivan["body"]);
    let to_li = mail.iter().find(|m| m["rcpt_tos"][0] == "li@example.com").expect("Li's e-mail");
    assert_eq!(to_li["subject"], "已分配给您：王芳");
    assert!(to_li["body"].as_str().unwrap().contains("李伟，您好"), "{}", to_li["body"]);
    let sent = wait_deliveries(gw, &admin, &ivan.user.id, "Ivan's e-mail sent", |d| {
        d.len() == 1 && d[0].state == DeliveryState::Sent as i32
    })
    .await;
    assert_eq!(to_ivan["message_id"], format!("<{}@crm>", sent[0].id));
    assert_eq!((sent[0].attempts.len(), sent[0].attempts[0].response_code), (1, 250));
    assert_eq!(sent[0].address, "ivan@example.com");

    // Nobody reads another's inbox.
    let mark = MarkReadRequest { ids: vec![li_inbox[0].id.clone()], all: false };
    let status = notifications_as(gw, &ivan.token).await.mark_read(mark).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = notifications_as(gw, &ivan.token)
        .await
        .subscribe(SubscribeRequest { after_id: li_inbox[0].id.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // 500 more for Ivan (in-app only, by his choice), three subscribers from his first one.
    let in_app_only = vec![EventPreference {
        event_type: OWNER_CHANGED.into(),
        channels: vec![Channel::InApp as i32],
        ..Default::default()
    }];
    set_locale(gw, &ivan.token, "ru", in_app_only).await;
    let after = pushed.id.clone();
    let mut subscribers = Vec::new();
    for reconnect in [false, false, true] {
        let (gw, token, after) = (gw, ivan.token.clone(), after.clone());
        subscribers.push(tokio::spawn(async move { subscriber(gw, &token, &after, 500, reconnect).await }));
    }
    const WRITERS: usize = 4;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (admin, ivan_id) = (admin.clone(), ivan.user.id.clone());
        writers.push(tokio::spawn(async move {
            let mut contacts = contacts_as(gw, &admin).await;
            for i in 0..500 / WRITERS {
                let person =
                    Person {
                        full_name: format!("Клиент {w}-{i}"), owner_id: ivan_id.clone(), ..Default::default()
                    };
                let request = CreatePersonRequest { person: Some(person), request_id: String::new() };
                contacts.create_person(request).await.expect("create a person");
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let seen = subscriber.await.unwrap();
        let expected: Vec<i64> = (2..=501).collect();
        assert_eq!(seen, expected, "subscriber {i} saw every notification once, in order");
    }
    let count = notifications_as(gw, &ivan.token).await.get_unread_count(GetUnreadCountRequest {}).await.unwrap();
    assert_eq!((count.get_ref().unread, count.get_ref().last_sequence), (501, 501));
    assert_eq!(sink.messages().len(), 2, "no e-mail for the in-app-only assignments");

    customers_get_messages_unless_they_opted_out(&cluster, &sink, &admin, &ivan).await;
}

/// A message to a customer reaches them and their timeline; one marked do-not-contact, or out
/// of the sender's scope, gets nothing.
async fn customers_get_messages_unless_they_opted_out(cluster: &Cluster, sink: &Sink, admin: &str, ivan: &Member) {
    let gw = cluster.gateway;
    let mut contacts = contacts_as(gw, admin).await;
    let customer = Person {
        full_name: "Ольга Кузнецова".into(),
        emails: vec![crm_proto::contacts::v1::Email { address: "olga.k@example.com".into(), ..Default::default() }],
        ..Default::default()
    };
    let customer = contacts
        .create_person(CreatePersonRequest { person: Some(customer), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let message = SendCustomerMessageRequest {
        person_id: customer.id.clone(),
        channel: Channel::Email as i32,
        subject: "Предложение для {{ person.full_name }}".into(),
        body: "Здравствуйте, {{ person.full_name }}! Ваш менеджер: {{ sender.display_name }}.".into(),
        request_id: "offer-1".into(),
    };
    let mut client = notifications_as(gw, admin).await;
    let sent = client.send_customer_message(message.clone()).await.unwrap().into_inner();
    assert_eq!(
        (sent.address.as_str(), sent.subject.as_str()),
        ("olga.k@example.com", "Предложение для Ольга Кузнецова")
    );
    let again = client.send_customer_message(message.clone()).await.unwrap().into_inner();
    assert_eq!(again.id, sent.id, "the same request id: the same message");
    let mail = sink.wait_for(3, Duration::from_secs(30)).await;
    assert_eq!(mail[2]["rcpt_tos"][0], "olga.k@example.com");
    assert_eq!(mail[2]["subject"], "Предложение для Ольга Кузнецова");
    assert!(mail[2]["body"].as_str().unwrap().starts_with("Здравствуйте, Ольга Кузнецова!"), "{}", mail[2]["body"]);
    // Its timeline event, published once it was sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut conn =
            <sqlx::PgConnection as sqlx::Connection>::connect(cluster.database_url("notifications")).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE event_type = 'crm.notifications.v1.CustomerMessageSent'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no CustomerMessageSent event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Marked do-not-contact: refused, nothing sent.
    let mut opted_out = customer.clone();
    opted_out.do_not_contact = true;
    opted_out.do_not_contact_reason = "asked by phone".into();
    let mask = FieldMask { paths: vec!["do_not_contact".into(), "do_not_contact_reason".into()] };
    contacts.update_person(UpdatePersonRequest { person: Some(opted_out), update_mask: Some(mask) }).await.unwrap();
    let refused = SendCustomerMessageRequest { request_id: "offer-2".into(), ..message.clone() };
    let status = client.send_customer_message(refused).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("do-not-contact") && status.message().contains("asked by phone"),
        "{}",
        status.message()
    );
    // Outside Ivan's scope (the administrator's customer): as if it did not exist.
    let theirs = SendCustomerMessageRequest { request_id: "offer-3".into(), ..message };
    let status = notifications_as(gw, &ivan.token).await.send_customer_message(theirs).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.messages().len(), 3);
}

async fn cluster_admin_id(gw: SocketAddr, admin: &str) -> String {
    auth_as(gw, admin).await.get_me(GetMeRequest {}).await.unwrap().into_inner().subject
}

/// Reads `count` notifications after `after`, in order; with `reconnect`, drops the stream
/// half-way and resumes after the last one it saw.
async fn subscriber(gw: SocketAddr, token: &str, after: &str, count: usize, reconnect: bool) -> Vec<i64> {
    let mut seen = Vec::new();
    let mut last = after.to_string();
    let mut stream = notifications_as(gw, token)
        .await
        .subscribe(SubscribeRequest { after_id: last.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut reconnected = false;
    while seen.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} notifications", seen.len()))
            .expect("the stream goes on")
            .expect("a notification");
        seen.push(next.sequence);
        last = next.id;
        if reconnect && !reconnected && seen.len() == count / 2 {
            drop(stream);
            reconnected = true;
            let request = SubscribeRequest { after_id: last.clone() };
            stream = notifications_as(gw, token).await.subscribe(request).await.unwrap().into_inner();
        }
    }
    seen
}

/// A refusing server is retried on the schedule and delivered once; one that never recovers
/// leaves a dead delivery an administrator retries, delivered once; a replica killed while the
/// server holds the message has delivered it once — it is parked as dead, never resent by
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn email_is_retried_parked_and_never_sent_twice() {
    let sink = Sink::smtp().await;
    let flags =
        notifications_flags(&sink, &["--smtp-timeout", "2s", "--notifications-retry-schedule", "200ms,200ms,200ms"]);
    let config = ClusterConfig {
        replicas: vec![("notifications", 2)],
        flags: vec![("notifications", flags)],
        ..ClusterConfig::default()
    };
    let mut cluster = Cluster::start(config).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    let olga = member(gw, &admin, "olga@example.com", "Olga").await;
    let mut admin_client = notifications_as(gw, &admin).await;

    // Refused twice (451), then taken: one e-mail, three attempts logged.
    sink.control(json!({"fail": 2, "code": 451}));
    assign(gw, &admin, &olga.user.id, "First").await;
    let list = wait_deliveries(gw, &admin, &olga.user.id, "delivered after two refusals", |d| {
        d.len() == 1 && d[0].state == DeliveryState::Sent as i32
    })
    .await;
    let attempts: Vec<(&str, i32)> = list[0].attempts.iter().map(|a| (a.outcome.as_str(), a.response_code)).collect();
    assert_eq!(attempts, [("failed", 451), ("failed", 451), ("sent", 250)]);
    assert_eq!(sink.messages().len(), 1);

    // Refused for ever: dead after the schedule, then retried by the administrator.
    sink.control(json!({"fail": 1000, "code": 451}));
    assign(gw, &admin, &olga.user.id, "Second").await;
    let list = wait_deliveries(gw, &admin, &olga.user.id, "dead after the schedule", |d| {
        d.iter().any(|d| d.state == DeliveryState::Dead as i32)
    })
    .await;
    let dead = list.iter().find(|d| d.state == DeliveryState::Dead as i32).unwrap().clone();
    assert_eq!(dead.attempts.len(), 4, "one attempt and three retries");
    assert_eq!(sink.messages().len(), 1);
    let status = notifications_as(gw, &olga.token)
        .await
        .retry_deliveries(RetryDeliveriesRequest { ids: vec![dead.id.clone()], channel: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "only administrators retry");
    sink.control(json!({}));
    let retried =
        admin_client.retry_deliveries(RetryDeliveriesRequest { ids: vec![dead.id.clone()], channel: 0 }).await;
    assert_eq!(retried.unwrap().into_inner().retried, 1);
    wait_deliveries(gw, &admin, &olga.user.id, "the retried one sent", |d| {
        d.iter().all(|d| d.state == DeliveryState::Sent as i32)
    })
    .await;
    let mail = sink.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(mail[1]["subject"], "Assigned to you: Second");

    // The server holds the third message; the replica sending it is killed meanwhile.
    sink.control(json!({"hold": true}));
    assign(gw, &admin, &olga.user.id, "Third").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sink.holding() {
        assert!(Instant::now() < deadline, "the third e-mail never reached the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sender = sending_replica(&cluster).await;
    cluster.process("notifications", sender).kill();
    sink.control(json!({}));
    let list = wait_deliveries(gw, &admin, &olga.user.id, "the interrupted one parked", |d| {
        d.iter().any(|d| d.state == DeliveryState::Dead as i32)
    })
    .await;
    let parked = list.iter().find(|d| d.state == DeliveryState::Dead as i32).unwrap();
    let last = parked.attempts.last().unwrap();
    assert!(matches!(last.outcome.as_str(), "interrupted" | "unknown"), "{parked:#?}");
    assert!(parked.last_error.contains("not sent again by itself"), "{}", parked.last_error);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), 3, "the held message was delivered once and not sent again");
    cluster.process("notifications", sender).restart();
}

/// Which notifications replica holds the lease of the e-mail job under way (its pid is in the
/// lease).
async fn sending_replica(cluster: &Cluster) -> usize {
    use sqlx::Row;
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(cluster.database_url("notifications")).await.unwrap();
    let row = sqlx::query("SELECT leased_by FROM jobs WHERE kind = 'notifications.delivery' AND leased_by <> ''")
        .fetch_one(&mut conn)
        .await
        .expect("an e-mail job under way");
    let leased_by: String = row.get("leased_by");
    let pid: u32 = leased_by.split('-').next().unwrap().parse().unwrap();
    (0..2).find(|&i| cluster.process_pid("notifications", i) == pid).expect("the lease names a replica")
}

/// Webhooks reach a real receiver signed so that the Standard Webhooks library verifies them
/// (also across a secret rotation), refused ones are retried, and URLs inside the cluster are
/// refused; text messages reach the SMS provider with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_and_text_messages_reach_real_receivers() {
    let receiver = Sink::http().await;
    let flags = [
        "--webhooks-allow-networks",
        "127.0.0.0/8",
        "--sms-url",
        &receiver.url("/sms"),
        "--sms-from",
        "ACME CRM",
        "--notifications-retry-schedule",
        "200ms,200ms,200ms",
    ]
    .map(String::from)
    .to_vec();
    let config = ClusterConfig {
        flags: vec![("notifications", flags)],
        env: vec![("notifications", "CRM_SMS_API_KEY", "sms-provider-key".to_string())],
        ..ClusterConfig::default()
    };
    let cluster = Cluster::start(config).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    let mut admin_client = notifications_as(gw, &admin).await;

    // Inside addresses are refused (only 127.0.0.0/8 is allowed here).
    for url in ["http://10.0.0.5/hook", "http://169.254.169.254/latest/meta-data", "http://[fd00::1]/hook"] {
        let webhook = Webhook {
            url: url.into(),
            event_types: vec!["crm.contacts.v1.ContactCreated".into()],
            ..Default::default()
        };
        let status = admin_client.create_webhook(CreateWebhookRequest { webhook: Some(webhook) }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url}");
        assert!(status.message().contains("webhook.url"), "{url}: {}", status.message());
    }
    let webhook = Webhook {
        url: receiver.url("/hooks/crm"),
        event_types: vec!["crm.contacts.v1.ContactCreated".into(), OWNER_CHANGED.into()],
        description: "the data warehouse".into(),
        ..Default::default()
    };
    let created =
        admin_client.create_webhook(CreateWebhookRequest { webhook: Some(webhook) }).await.unwrap().into_inner();
    let hook = created.webhook.unwrap();
    receiver.control(json!({"secret": created.secret, "fail": 2, "status": 503, "fail_path": "/hooks/"}));

    // Pavel wants assignments by SMS too.
    let pavel = member_with_phone(gw, &admin, "pavel@example.com", "Pavel", "+79161234567").await;
    let channels = vec![EventPreference {
        event_type: OWNER_CHANGED.into(),
        channels: vec![Channel::InApp as i32, Channel::Sms as i32],
        ..Default::default()
    }];
    set_locale(gw, &pavel.token, "en", channels).await;
    let person = assign(gw, &admin, &pavel.user.id, "Maria Ivanova").await;

    // Two webhooks (created, assigned) after two refusals, and one text message: five requests.
    receiver.wait_for(5, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = receiver.messages();
    assert_eq!(received.len(), 5, "nothing more: {received:#?}");
    let hooks: Vec<&serde_json::Value> = received.iter().filter(|r| r["path"] == "/hooks/crm").collect();
    assert_eq!(hooks.len(), 4);
    for request in &hooks {
        assert_eq!(request["verified"], true, "the Standard Webhooks library verifies it: {request}");
    }
    assert_eq!(hooks.iter().filter(|r| r["status"] == 503).count(), 2);
    let delivered: Vec<serde_json::Value> = hooks
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| serde_json::from_str(r["body"].as_str().unwrap()).unwrap())
        .collect();
    let types: Vec<&str> = delivered.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"crm.contacts.v1.ContactCreated") && types.contains(&OWNER_CHANGED), "{types:?}");
    let assigned = delivered.iter().find(|b| b["type"] == OWNER_CHANGED).unwrap();
    assert_eq!(assigned["data"]["display_name"], "Maria Ivanova");
    assert_eq!(assigned["data"]["to_owner_id"], pavel.user.id.as_str());
    assert_eq!(assigned["subject_id"], person.id.as_str());
    let sms: Vec<&serde_json::Value> = received.iter().filter(|r| r["path"] == "/sms").collect();
    assert_eq!(sms.len(), 1);
    assert_eq!(sms[0]["headers"]["authorization"], "Bearer sms-provider-key");
    let text: serde_json::Value = serde_json::from_str(sms[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!((text["to"].as_str(), text["from"].as_str()), (Some("+79161234567"), Some("ACME CRM")));
    assert_eq!(text["text"], "CRM: Maria Ivanova is now yours.");

    // The deliveries tell the same story: the webhook ones tried three times, by HTTP status.
    let list = wait_deliveries(gw, &admin, &hook.id, "webhooks delivered", |d| {
        d.len() == 2 && d.iter().all(|d| d.state == DeliveryState::Sent as i32)
    })
    .await;
    let mut codes: Vec<Vec<i32>> = list.iter().map(|d| d.attempts.iter().map(|a| a.response_code).collect()).collect();
    codes.sort();
    assert_eq!(codes.concat().iter().filter(|c| **c == 503).count(), 2, "{codes:?}");
    let ids: Vec<&str> =
        hooks.iter().filter(|r| r["status"] == 200).map(|r| r["headers"]["webhook-id"].as_str().unwrap()).collect();
    assert!(list.iter().all(|d| ids.contains(&d.id.as_str())), "webhook-id is the delivery's id");

    // After a rotation the receiver verifies with the new secret (the old one signs too for a day).
    let rotated = admin_client.rotate_webhook_secret(RotateWebhookSecretRequest { id: hook.id.clone() }).await.unwrap();
    receiver.control(json!({"secret": rotated.get_ref().secret}));
    assign(gw, &admin, &pavel.user.id, "Second Customer").await;
    let received = receiver.wait_for(8, Duration::from_secs(60)).await;
    let after: Vec<&serde_json::Value> = received[5..].iter().filter(|r| r["path"] == "/hooks/crm").collect();
    assert_eq!(after.len(), 2);
    for request in after {
        assert_eq!(request["verified"], true, "{request}");
        assert_eq!(request["headers"]["webhook-signature"].as_str().unwrap().split(' ').count(), 2);
    }
}
