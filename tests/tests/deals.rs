//! Deals end to end (SPEC D1-D4, D6, D8, C8): real `crm` processes, users acting through the gateway.
//! The starting pipeline is there at first start; a salesperson opens a deal on their own
//! customer (checked with the real contacts service), priced from the catalogue, moves it
//! through the funnel (lost needs a reason, every move recorded); the board totals what each
//! viewer may see; a colleague elsewhere sees nothing of it; the won deal reaches the customer's
//! purchase history in contacts; a call logged on the deal in tasks reaches it; a quote accepted
//! into the deal, a contract and a payment are the owner's alone; entering
//! "Payment" makes the owner one task and one notice, in both modes; the reports count what each
//! viewer may see, a department's figures its people's.

use crm_proto::auth::v1::{
    CreateDepartmentRequest, CreateRoleRequest, DataScope, Department, Role, UpdateUserRequest, User,
};
use crm_proto::contacts::v1::{CreatePersonRequest, Person};
use crm_proto::deals::v1::*;
use crm_tests::*;
use tonic::Code;

/// Gives the stage `payment` two automations: a task for the owner, due in two days, and a
/// notice to the owner.
async fn automate_payment(gw: std::net::SocketAddr, admin: &str, pipeline_id: &str, payment: &str) {
    let task = Automation {
        action: Some(automation::Action::CreateTask(TaskAutomation {
            title: "Send the invoice for {deal}".into(),
            due_in_days: 2,
            ..Default::default()
        })),
    };
    let notify = Automation {
        action: Some(automation::Action::Notify(NotifyAutomation {
            owner: true,
            message: "{deal} is waiting for payment".into(),
            ..Default::default()
        })),
    };
    let request = UpdateStageRequest {
        pipeline_id: pipeline_id.into(),
        stage: Some(Stage { id: payment.into(), automations: vec![task, notify], ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["automations".into()] }),
        etag: String::new(),
    };
    deals_as(gw, admin).await.update_stage(request).await.expect("the administrator sets automations");
}

/// Waits until the owner (`token`) has the automation's task for `deal_id` and both notices
/// (the task given to them, the stage's notice), then checks there is exactly one of each.
async fn expect_automation(gw: std::net::SocketAddr, token: &str, deal_id: &str) {
    use crm_proto::notifications::v1::ListNotificationsRequest;
    use crm_proto::tasks::v1::ListTasksRequest;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let tasks = tasks_as(gw, token)
            .await
            .list_tasks(ListTasksRequest { filter: format!("deal_id = \"{deal_id}\""), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .tasks;
        let inbox = notifications_as(gw, token)
            .await
            .list_notifications(ListNotificationsRequest { page_size: 100, ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .notifications;
        let notices = inbox.iter().filter(|n| n.event_type == "crm.deals.v1.DealAutomationNotice").count();
        let assigned = inbox.iter().filter(|n| n.event_type == "crm.tasks.v1.TaskAssigned").count();
        if !tasks.is_empty() && notices >= 1 && assigned >= 1 {
            assert_eq!(tasks.len(), 1, "one task per entry");
            assert!(tasks[0].title.starts_with("Send the invoice for "), "{:?}", tasks[0].title);
            assert_eq!((notices, assigned), (1, 1), "one notice and one assignment per entry");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the automation's effects never all arrived: {} task(s), {notices} notice(s), {assigned} assignment(s)",
            tasks.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The embedded mode: `crm dev` runs the same automations on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_dev_runs_deal_automations() {
    let data = tempfile::tempdir().unwrap();
    let gw = free_addr();
    let _dev = start_dev("dev", &data.path().join("crm-data"), gw, &[("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD)]).await;
    let admin = admin_token(gw).await;
    let (alice_user, alice) = salesperson(gw, &admin, "alice@example.com").await;
    let pipelines =
        deals_as(gw, &alice).await.list_pipelines(ListPipelinesRequest::default()).await.unwrap().into_inner();
    let sales = pipelines.pipelines.into_iter().find(|p| p.name == "Sales").expect("the starting pipeline");
    let payment = sales.stages.iter().find(|s| s.name == "Payment").expect("Payment").id.clone();
    automate_payment(gw, &admin, &sales.id, &payment).await;
    let deal = deals_as(gw, &alice)
        .await
        .create_deal(CreateDealRequest {
            deal: Some(Deal { title: "Dev deal".into(), ..Default::default() }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    deals_as(gw, &admin)
        .await
        .move_deal(MoveDealRequest { id: deal.id.clone(), stage_id: payment, ..Default::default() })
        .await
        .expect("the administrator moves Alice's deal");
    expect_automation(gw, &alice, &deal.id).await;
    rest_calls_reach_deals(gw, &alice).await;
    rest_streams_notifications(gw, &admin, &alice_user.id, &alice).await;
    openapi_drives_calls(gw).await;
}

/// The gateway's OpenAPI document, validated by an independent validator (openapi-spec-validator)
/// and driven by a generic client that knows only the document, every answer checked against
/// the document's schema for its status (`tests/peers/openapi_check.py`).
async fn openapi_drives_calls(gw: std::net::SocketAddr) {
    let gateway = gw.to_string();
    let args = ["--gateway", &gateway, "--email", ADMIN_EMAIL, "--password", ADMIN_PASSWORD];
    let summary = run_peer("python3", "openapi_check.py", &args).await;
    assert_eq!(summary["openapi"], "3.1.0");
    assert!(summary["operations"].as_u64().unwrap() > 100, "{summary}");
    let calls = summary["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 11, "{summary}");
    assert!(calls.iter().any(|c| c["status"] == 404) && calls.iter().any(|c| c["status"] == 400), "{summary}");
}

/// A server stream over REST: Alice's live notifications as newline-delimited JSON and as
/// server-sent events, both seeing a record assigned to her (over REST too).
async fn rest_streams_notifications(gw: std::net::SocketAddr, admin: &str, alice_id: &str, alice: &str) {
    let path = "/v1/notifications:subscribe";
    let mut lines = HttpStream::get(gw, path, alice, "application/json").await;
    let mut events = HttpStream::get(gw, path, alice, "text/event-stream").await;
    assert_eq!((lines.status, events.status), (200, 200), "{} / {}", lines.head, events.head);
    assert!(lines.head.to_ascii_lowercase().contains("content-type: application/x-ndjson"), "{}", lines.head);
    assert!(events.head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{}", events.head);
    let person = format!(r#"{{"fullName": "Streamed Customer", "ownerId": "{alice_id}"}}"#);
    let (status, body) = http_request(gw, "POST", "/v1/people", admin, &person).await;
    assert_eq!(status, 200, "{body}");
    let body = lines.read_until("Streamed Customer", std::time::Duration::from_secs(20)).await;
    let line = body.lines().find(|l| l.contains("Streamed Customer")).expect("a line");
    let notification: serde_json::Value = serde_json::from_str(line).expect("one JSON message per line");
    assert!(notification["title"].as_str().is_some_and(|t| t.contains("Streamed Customer")), "{notification}");
    assert!(notification["sequence"].is_string(), "64-bit integers as strings: {notification}");
    let body = events.read_until("Streamed Customer", std::time::Duration::from_secs(20)).await;
    let event = body.split("\n\n").find(|e| e.contains("Streamed Customer")).expect("an event");
    let data = event.strip_prefix("data: ").expect("a data event");
    assert_eq!(serde_json::from_str::<serde_json::Value>(data).unwrap()["id"], notification["id"]);
    // A bad request is refused before anything streams, as a JSON status.
    let mut refused = HttpStream::get(gw, &format!("{path}?after_id=not-a-notification"), alice, "*/*").await;
    assert_eq!(refused.status, 400, "{}", refused.head);
    let body = refused.read_until("}", std::time::Duration::from_secs(5)).await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["code"], 3, "{body}");
}

/// REST/JSON through the gateway (G1): every annotated call at its HTTP path, with path, query
/// and body parameters, proto3 JSON out, errors as JSON statuses with their field violations.
async fn rest_calls_reach_deals(gw: std::net::SocketAddr, token: &str) {
    let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("JSON");
    let (status, body) = http_request(gw, "GET", "/v1/pipelines", token, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["pipelines"][0]["name"], "Sales");
    let create = r#"{"title": "Over REST", "amount": {"currencyCode": "EUR", "minorUnits": "1500"}}"#;
    let (status, body) = http_request(gw, "POST", "/v1/deals", token, create).await;
    assert_eq!(status, 200, "{body}");
    let created = json(&body);
    let id = created["id"].as_str().expect("an id").to_string();
    assert_eq!(created["amount"]["minorUnits"], "1500", "64-bit integers as strings");
    assert_eq!(created["status"], "DEAL_STATUS_OPEN", "enums by name");
    let (status, body) =
        http_request(gw, "PATCH", &format!("/v1/deals/{id}?update_mask=title"), token, r#"{"title": "Renamed"}"#).await;
    assert_eq!((status, json(&body)["title"].clone()), (200, "Renamed".into()), "{body}");
    let (status, body) =
        http_request(gw, "GET", "/v1/deals?filter=amount%20%3E%3D%201000&page_size=5", token, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(json(&body)["deals"].as_array().unwrap().iter().any(|d| d["id"] == id.as_str()));
    let (status, body) = http_request(gw, "POST", "/v1/deals", token, r#"{"title": "  "}"#).await;
    assert_eq!(status, 400, "{body}");
    let error = json(&body);
    assert_eq!(error["code"], 3);
    assert_eq!(error["details"][0]["fieldViolations"][0]["field"], "deal.title");
    let (status, _) = http_request(gw, "GET", &format!("/v1/deals/{id}"), "", "").await;
    assert_eq!(status, 401, "no token");
    let (status, body) = http_request(gw, "GET", "/v1/nothing/here", token, "").await;
    assert_eq!((status, json(&body)["code"].clone()), (404, 5.into()));
    // Signing in takes small bodies (the gateway's default route limit for auth: 64 KiB).
    let huge = format!(r#"{{"email": "a@example.com", "password": "{}"}}"#, "x".repeat(70 * 1024));
    let (status, body) = http_request(gw, "POST", "/v1/auth:signIn", "", &huge).await;
    assert_eq!((status, json(&body)["code"].clone()), (413, 8.into()), "{body}");
    let (status, body) = http_request(gw, "GET", "/v1/reports/REPORT_KIND_FORECAST:csv", token, "").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("Month,Open deals"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deals_move_through_the_funnel() {
    let cluster = Cluster::start(ClusterConfig::default()).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    let (alice_user, alice) = salesperson(gw, &admin, "alice@example.com").await;
    let (_bob, bob) = salesperson(gw, &admin, "bob@example.com").await;

    let pipelines =
        deals_as(gw, &alice).await.list_pipelines(ListPipelinesRequest::default()).await.unwrap().into_inner();
    let sales = pipelines.pipelines.into_iter().find(|p| p.name == "Sales").expect("the starting pipeline");
    let stage = |name: &str| sales.stages.iter().find(|s| s.name == name).expect(name).id.clone();
    let widget = Product {
        name: "Widget".into(),
        prices: vec![Money { currency_code: "EUR".into(), minor_units: 1_999 }],
        ..Default::default()
    };
    let widget = deals_as(gw, &admin)
        .await
        .create_product(CreateProductRequest { product: Some(widget), request_id: String::new() })
        .await
        .expect("the administrator adds a product")
        .into_inner();

    let person = Person { full_name: "Anna Petrova".into(), source: "web_form".into(), ..Default::default() };
    let anna = contacts_as(gw, &alice)
        .await
        .create_person(CreatePersonRequest { person: Some(person), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let deal = Deal {
        title: "Widgets for Anna".into(),
        person_id: anna.id.clone(),
        amount: Some(Money { currency_code: "EUR".into(), minor_units: 0 }),
        line_items: vec![LineItem {
            product_id: widget.id.clone(),
            quantity: 10,
            discount_bps: 500,
            ..Default::default()
        }],
        ..Default::default()
    };
    let deal = deals_as(gw, &alice)
        .await
        .create_deal(CreateDealRequest { deal: Some(deal), request_id: String::new() })
        .await
        .expect("Alice opens a deal")
        .into_inner();
    assert_eq!(deal.amount.as_ref().unwrap().minor_units, 18_991, "10 × 19.99 less 5%");
    assert_eq!(deal.source, "web_form", "copied from the customer");
    // The same deal over REST/JSON through the cluster's gateway.
    let (status, body) = http_request(gw, "GET", &format!("/v1/deals/{}", deal.id), &alice, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"title\":\"Widgets for Anna\""), "{body}");
    // Bob may not link Alice's customer, nor see her deal.
    let stolen = Deal { title: "Mine now".into(), person_id: anna.id.clone(), ..Default::default() };
    let refused =
        deals_as(gw, &bob).await.create_deal(CreateDealRequest { deal: Some(stolen), request_id: String::new() }).await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
    let peek = deals_as(gw, &bob).await.get_deal(GetDealRequest { id: deal.id.clone() }).await;
    assert_eq!(peek.unwrap_err().code(), Code::NotFound);

    // D4: entering "Payment" makes a task for the owner and tells them, once.
    automate_payment(gw, &admin, &sales.id, &stage("Payment")).await;
    let moved = deals_as(gw, &admin)
        .await
        .move_deal(MoveDealRequest { id: deal.id.clone(), stage_id: stage("Payment"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.probability, Some(90));
    expect_automation(gw, &alice, &deal.id).await;
    let mut client = deals_as(gw, &alice).await;
    let lost =
        client.move_deal(MoveDealRequest { id: deal.id.clone(), stage_id: stage("Lost"), ..Default::default() }).await;
    assert_eq!(lost.unwrap_err().code(), Code::InvalidArgument, "lost needs a reason");
    let won = client
        .move_deal(MoveDealRequest { id: deal.id.clone(), stage_id: stage("Order received"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(won.status, DealStatus::Won as i32);
    // C8: contacts hears of the win; Anna's purchase history holds it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got = contacts_as(gw, &alice)
            .await
            .get_person(crm_proto::contacts::v1::GetPersonRequest { id: anna.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if got.purchase_count == 1 {
            assert_eq!(got.lifetime_value[0].minor_units, 18_991);
            assert_eq!(got.lifetime_value[0].currency_code, "EUR");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "contacts never recorded the won deal");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A call logged on the deal in the tasks service reaches the deal (its rotting clock).
    let call = crm_proto::tasks::v1::Activity {
        r#type: crm_proto::tasks::v1::ActivityType::Call as i32,
        summary: "Talked delivery dates".into(),
        deal_id: deal.id.clone(),
        ..Default::default()
    };
    tasks_as(gw, &alice)
        .await
        .log_activity(crm_proto::tasks::v1::LogActivityRequest { activity: Some(call), request_id: String::new() })
        .await
        .expect("Alice logs a call on her deal");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got = client.get_deal(GetDealRequest { id: deal.id.clone() }).await.unwrap().into_inner();
        if got.last_activity_time.is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "deals never heard of the call");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // D5 through the gateway: a quote accepted into the deal, a contract with a plan, a payment;
    // Bob sees none of it; the administrator's balances hold it.
    let quote = client
        .create_quote(CreateQuoteRequest {
            quote: Some(Quote { deal_id: deal.id.clone(), tax_rate_bps: 2_000, ..Default::default() }),
            request_id: String::new(),
        })
        .await
        .expect("Alice quotes her deal")
        .into_inner();
    assert_eq!(quote.total.as_ref().unwrap().minor_units, 22_789, "18,991 and 20% tax, rounded half up");
    for state in [QuoteState::Sent, QuoteState::Accepted] {
        let r = SetQuoteStateRequest {
            id: quote.id.clone(),
            state: state as i32,
            apply_to_deal: state == QuoteState::Accepted,
            etag: String::new(),
        };
        client.set_quote_state(r).await.unwrap();
    }
    let contract = Contract {
        deal_id: deal.id.clone(),
        number: "E2E-1".into(),
        signed_date: "2026-12-01".into(),
        value: Some(Money { currency_code: "EUR".into(), minor_units: 18_991 }),
        instalments: vec![Instalment {
            due_date: "2099-01-31".into(),
            amount: Some(Money { currency_code: "EUR".into(), minor_units: 18_991 }),
            paid: None,
        }],
        ..Default::default()
    };
    let contract = client
        .create_contract(CreateContractRequest { contract: Some(contract), request_id: String::new() })
        .await
        .expect("Alice records the contract")
        .into_inner();
    let payment = Payment {
        contract_id: contract.id.clone(),
        amount: Some(Money { currency_code: "EUR".into(), minor_units: 5_000 }),
        ..Default::default()
    };
    let paid = client
        .record_payment(RecordPaymentRequest { payment: Some(payment), request_id: "e2e-pay".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid.outstanding.as_ref().unwrap().minor_units, 13_991);
    let hidden = deals_as(gw, &bob).await.get_contract(GetContractRequest { id: contract.id.clone() }).await;
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound);
    let balances = deals_as(gw, &admin)
        .await
        .get_balances(GetBalancesRequest { group_by: BalanceGrouping::Owner as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert_eq!(balances.len(), 1);
    assert_eq!(balances[0].outstanding.as_ref().unwrap().minor_units, 13_991);

    let history = client
        .list_stage_history(ListStageHistoryRequest { deal_id: deal.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(history.len(), 3);

    let board = |token: String| {
        let pipeline_id = sales.id.clone();
        async move {
            deals_as(gw, &token)
                .await
                .get_board(GetBoardRequest { pipeline_id, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mine = board(alice.clone()).await;
    let column = mine.columns.iter().find(|c| c.stage.as_ref().unwrap().name == "Order received").unwrap();
    assert_eq!((column.count, column.totals[0].sum.as_ref().unwrap().minor_units), (1, 18_991));
    let bobs = board(bob.clone()).await;
    assert!(bobs.columns.iter().all(|c| c.count == 0), "Bob's board holds none of Alice's deals");
    let all = board(admin.clone()).await;
    assert_eq!(all.columns.iter().map(|c| c.count).sum::<i64>(), 1);

    // D8 through the gateway: Bob wins a deal of his own; the reports count what each viewer
    // may see, and a department's figures are its people's (asked of the real auth service).
    let bobs_deal = Deal {
        title: "Bob's gadgets".into(),
        amount: Some(Money { currency_code: "EUR".into(), minor_units: 5_000 }),
        ..Default::default()
    };
    let mut bob_deals = deals_as(gw, &bob).await;
    let bobs_deal =
        bob_deals.create_deal(CreateDealRequest { deal: Some(bobs_deal), request_id: String::new() }).await.unwrap();
    bob_deals
        .move_deal(MoveDealRequest {
            id: bobs_deal.into_inner().id,
            stage_id: stage("Order received"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut org = org_as(gw, &admin).await;
    let east = Department { name: "East".into(), ..Default::default() };
    let east = org.create_department(CreateDepartmentRequest { department: Some(east) }).await.unwrap().into_inner();
    let lead_role = Role {
        name: "Sales lead".into(),
        permissions: vec!["deals.read".into(), "deals.write".into()],
        data_scope: DataScope::Department as i32,
        ..Default::default()
    };
    let lead_role = org.create_role(CreateRoleRequest { role: Some(lead_role) }).await.unwrap().into_inner();
    let (lead, _) = salesperson(gw, &admin, "lead@example.com").await;
    for (user, roles) in [(&alice_user, None), (&lead, Some(vec![lead_role.id.clone()]))] {
        let mut patch = User { id: user.id.clone(), department_id: east.id.clone(), ..Default::default() };
        let mut paths = vec!["department_id".to_string()];
        if let Some(roles) = roles {
            patch.role_ids = roles;
            paths.push("role_ids".into());
        }
        let mask = prost_types::FieldMask { paths };
        org.update_user(UpdateUserRequest { user: Some(patch), update_mask: Some(mask) }).await.unwrap();
    }
    // The lead's token carries the new role once they sign in again.
    let lead_token = sign_in(gw, "lead@example.com", "member-password-1").await.expect("signs in").access_token;
    let leaderboard = |token: String, department_id: &str| {
        let r = RunReportRequest {
            kind: ReportKind::Leaderboard as i32,
            department_id: department_id.to_string(),
            ..Default::default()
        };
        async move {
            let report = deals_as(gw, &token).await.run_report(r).await.unwrap().into_inner();
            report.rows.iter().map(|r| (r.cells[0].clone(), r.cells[2].clone())).collect::<Vec<_>>()
        }
    };
    let text = |t: &str| ReportCell { value: Some(report_cell::Value::Text(t.into())) };
    let count = |n: i64| ReportCell { value: Some(report_cell::Value::Number(n)) };
    let bob_row = (text("bob@example.com"), count(1));
    let alice_row = (text("alice@example.com"), count(1));
    assert_eq!(leaderboard(admin.clone(), "").await, [alice_row.clone(), bob_row.clone()], "by won value, named");
    assert_eq!(
        leaderboard(admin.clone(), &east.id).await,
        std::slice::from_ref(&alice_row),
        "East is Alice and the lead"
    );
    assert_eq!(leaderboard(lead_token.clone(), "").await, std::slice::from_ref(&alice_row), "the lead sees East's");
    assert_eq!(leaderboard(bob.clone(), "").await, [bob_row], "Bob sees his own");
    // D7: East's target for the month, set by the administrator, is the lead's to see, with
    // Alice's win counted; Bob does not see it.
    let target = Target {
        department_id: east.id.clone(),
        period: chrono::Utc::now().format("%Y-%m").to_string(),
        metric: TargetMetric::WonValue as i32,
        amount: Some(Money { currency_code: "EUR".into(), minor_units: 37_982 }),
        ..Default::default()
    };
    deals_as(gw, &admin).await.set_target(SetTargetRequest { target: Some(target) }).await.unwrap();
    let seen = deals_as(gw, &lead_token).await.list_targets(ListTargetsRequest::default()).await.unwrap().into_inner();
    assert_eq!(seen.targets.len(), 1);
    assert_eq!(
        (seen.targets[0].achieved.as_ref().unwrap().minor_units, seen.targets[0].attainment_bps),
        (18_991, 5_000)
    );
    let bobs = deals_as(gw, &bob).await.list_targets(ListTargetsRequest::default()).await.unwrap().into_inner();
    assert!(bobs.targets.is_empty());
    let csv = deals_as(gw, &alice)
        .await
        .export_report(RunReportRequest { kind: ReportKind::WonBySource as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        String::from_utf8(csv.data).unwrap(),
        "Source,Won,Share,Won value (EUR)\r\nweb_form,1,100.00,189.91\r\n"
    );
}

/// D4 through events: entering "Proposal sent" e-mails the deal's contact person (never one
/// marked do-not-contact) from notifications, and posts the entry to a webhook the stage names —
/// each once per entry, through the real SMTP server and a real HTTP receiver that verifies
/// the signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_message_clients_and_call_webhooks() {
    let mail = Sink::smtp().await;
    let receiver = Sink::http().await;
    let mut flags = mail.smtp_flags();
    flags.extend(["--webhooks-allow-networks", "127.0.0.0/8"].map(String::from));
    let cluster =
        Cluster::start(ClusterConfig { flags: vec![("notifications", flags)], ..ClusterConfig::default() }).await;
    let gw = cluster.gateway;
    let admin = admin_token(gw).await;
    let (_, alice) = salesperson(gw, &admin, "alice@example.com").await;
    use crm_proto::notifications::v1::{CreateWebhookRequest, Webhook};
    let hook = Webhook {
        url: receiver.url("/hooks/deals"),
        event_types: vec!["crm.deals.v1.DealWon".into()],
        ..Default::default()
    };
    let created = notifications_as(gw, &admin)
        .await
        .create_webhook(CreateWebhookRequest { webhook: Some(hook) })
        .await
        .expect("the administrator adds a webhook")
        .into_inner();
    receiver.control(serde_json::json!({"secret": created.secret}));
    let webhook_id = created.webhook.unwrap().id;

    let pipelines =
        deals_as(gw, &alice).await.list_pipelines(ListPipelinesRequest::default()).await.unwrap().into_inner();
    let sales = pipelines.pipelines.into_iter().find(|p| p.name == "Sales").expect("the starting pipeline");
    let proposal = sales.stages.iter().find(|s| s.name == "Proposal sent").unwrap().id.clone();
    let automations = vec![
        Automation {
            action: Some(automation::Action::MessageClient(ClientMessageAutomation {
                channel: MessageChannel::Email as i32,
                subject: "Our offer: {deal}".into(),
                body: "Dear {name}, our offer for {deal} is on its way.".into(),
            })),
        },
        Automation { action: Some(automation::Action::CallWebhook(WebhookAutomation { webhook_id })) },
    ];
    let update = UpdateStageRequest {
        pipeline_id: sales.id.clone(),
        stage: Some(Stage { id: proposal.clone(), automations, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["automations".into()] }),
        etag: String::new(),
    };
    deals_as(gw, &admin).await.update_stage(update).await.expect("the administrator sets the automations");

    let mut people = contacts_as(gw, &alice).await;
    let mut deals = deals_as(gw, &alice).await;
    for (name, email, do_not_contact) in
        [("Anna Petrova", "anna@example.org", false), ("Boris Orlov", "boris@example.org", true)]
    {
        let person = Person {
            full_name: name.into(),
            emails: vec![crm_proto::contacts::v1::Email { address: email.into(), ..Default::default() }],
            do_not_contact,
            do_not_contact_reason: if do_not_contact { "asked not to be contacted".into() } else { String::new() },
            ..Default::default()
        };
        let person = people
            .create_person(CreatePersonRequest { person: Some(person), request_id: String::new() })
            .await
            .unwrap()
            .into_inner();
        let deal = Deal { title: format!("Widgets for {name}"), person_id: person.id, ..Default::default() };
        let deal = deals
            .create_deal(CreateDealRequest { deal: Some(deal), request_id: String::new() })
            .await
            .unwrap()
            .into_inner();
        deals
            .move_deal(MoveDealRequest { id: deal.id, stage_id: proposal.clone(), ..Default::default() })
            .await
            .unwrap();
    }
    // One e-mail (Anna's), two posts (both entries); nothing more arrives.
    mail.wait_for(1, std::time::Duration::from_secs(60)).await;
    receiver.wait_for(2, std::time::Duration::from_secs(60)).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mails = mail.messages();
    assert_eq!(mails.len(), 1, "Boris is marked do-not-contact: {mails:#?}");
    assert_eq!(mails[0]["subject"], "Our offer: Widgets for Anna Petrova");
    assert!(mails[0]["body"].as_str().unwrap().contains("Dear Anna Petrova, our offer for Widgets for Anna Petrova"));
    assert!(mails[0]["to"].as_str().unwrap().contains("anna@example.org"), "{}", mails[0]);
    let posts = receiver.messages();
    assert_eq!(posts.len(), 2, "{posts:#?}");
    for post in &posts {
        assert_eq!(post["verified"], true, "{post}");
        let body: serde_json::Value = serde_json::from_str(post["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["type"], "crm.deals.v1.DealStageChanged");
        assert_eq!(body["data"]["to_stage_name"], "Proposal sent");
    }
}
