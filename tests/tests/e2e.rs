//! End-to-end: the real `crm` binary as separate processes, driven only over the network,
//! signed in as the first administrator. Cluster mode: `crm migrate`, auth, two contacts
//! replicas on one PostgreSQL database and a gateway balancing over them. Embedded mode:
//! `crm dev` on SQLite.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crm_proto::auth::v1::org_service_client::OrgServiceClient;
use crm_proto::auth::v1::{GetMeRequest, ListUsersRequest, User};
use crm_proto::contacts::v1::*;
use crm_proto::notifications::v1::{ListNotificationsRequest, SubscribeRequest};
use crm_tests::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::{v1, v1alpha};
use tonic_types::StatusExt;

async fn cluster() -> Cluster {
    Cluster::start(ClusterConfig { replicas: vec![("contacts", 2)], ..ClusterConfig::default() }).await
}

fn person(name: &str, phone: &str) -> Person {
    Person {
        full_name: name.into(),
        phones: vec![Phone { number: phone.into(), ..Default::default() }],
        stage: LifecycleStage::Lead as i32,
        ..Default::default()
    }
}

/// Every contacts call through the gateway, as a client would make them.
async fn exercise_contacts(gateway: SocketAddr, token: &str) {
    let mut c = contacts_as(gateway, token).await;
    let company = c
        .create_company(CreateCompanyRequest {
            company: Some(Company {
                name: "Vostok Logistics".into(),
                industry: "logistics".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("create company")
        .into_inner();
    let mut p = person("Nikolai Orlov", "8 (912) 000-00-01");
    p.company_id = company.id.clone();
    let created = c
        .create_person(CreatePersonRequest { person: Some(p), request_id: "e2e-1".into() })
        .await
        .expect("create person")
        .into_inner();
    assert_eq!(created.phones[0].e164, "+79120000001");

    let dup = c
        .create_person(CreatePersonRequest {
            person: Some(person("Someone", "+7 912 000 00 01")),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains(&created.id), "{}", dup.message());

    let got = c.get_person(GetPersonRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got, created);

    let updated = c
        .update_person(UpdatePersonRequest {
            person: Some(Person {
                id: created.id.clone(),
                etag: created.etag.clone(),
                stage: LifecycleStage::Customer as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["stage".into()] }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.etag, "2");
    let stale = c
        .update_person(UpdatePersonRequest {
            person: Some(Person {
                id: created.id.clone(),
                etag: created.etag.clone(),
                notes: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["notes".into()] }),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    let listed = c
        .list_people(ListPeopleRequest {
            filter: "stage = CUSTOMER".into(),
            query: "orlov".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.people, vec![updated.clone()]);
    let companies = c
        .list_companies(ListCompaniesRequest { query: "vostok".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(companies.companies.len(), 1);

    let bad = c
        .list_people(ListPeopleRequest { filter: "stage = ; DROP TABLE people".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(bad.get_details_bad_request().expect("BadRequest").field_violations[0].field, "filter");

    let dups = c
        .check_duplicates(CheckDuplicatesRequest {
            record_type: RecordType::Company as i32,
            company_name: "VOSTOK logistics LLC".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dups.matches[0].record_id, company.id);

    c.delete_person(DeletePersonRequest { id: created.id.clone(), etag: updated.etag.clone() }).await.unwrap();
    assert_eq!(c.get_person(GetPersonRequest { id: created.id.clone() }).await.unwrap_err().code(), Code::NotFound);
    let revisions = c
        .list_revisions(ListRevisionsRequest { record_id: created.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<i32> = revisions.revisions.iter().map(|r| r.action).collect();
    assert_eq!(
        actions,
        [revision::Action::Delete as i32, revision::Action::Update as i32, revision::Action::Create as i32]
    );
}

async fn reflection_lists_services(gateway: SocketAddr) {
    let expected = [CONTACTS_SERVICE, AUTH_SERVICE, ORG_SERVICE, "grpc.health.v1.Health"];
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(gateway).await);
    let mut stream =
        client.server_reflection_info(tonic::codegen::tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().expect("a reflection response");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = response.message_response
    else {
        panic!("unexpected reflection response")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(names.iter().any(|n| n == name), "v1 lists {name}: {names:?}");
    }

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            CONTACTS_SERVICE.into(),
        )),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel(gateway).await);
    let mut stream =
        client.server_reflection_info(tonic::codegen::tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().expect("a reflection response");
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

async fn ops_endpoints(addr: SocketAddr) {
    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200);
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("rpc_server_call_duration_seconds"), "{metrics}");
}

/// Without a token every CRM call but sign-in and its kin is refused; health and reflection
/// stay open.
async fn anonymous_calls(addr: SocketAddr) {
    let err = contacts(addr).await.list_people(ListPeopleRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = contacts(addr)
        .await
        .create_person(CreatePersonRequest {
            person: Some(person("Anonymous", "+7 915 000 00 01")),
            request_id: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut org = OrgServiceClient::new(channel(addr).await);
    let err = org.list_users(ListUsersRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = auth(addr).await.get_me(GetMeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // A wrong scheme is no token either.
    let mut request = tonic::Request::new(ListPeopleRequest::default());
    request.metadata_mut().insert("authorization", "Basic YWRtaW46YWRtaW4=".parse().unwrap());
    assert_eq!(contacts(addr).await.list_people(request).await.unwrap_err().code(), Code::Unauthenticated);

    assert_eq!(health(addr, "").await, Some(ServingStatus::Serving));
    assert_eq!(health(addr, CONTACTS_SERVICE).await, Some(ServingStatus::Serving));
    // Every service reflection lists has a health status (OrgService included).
    for service in served_services() {
        assert_eq!(health(addr, service).await, Some(ServingStatus::Serving), "{service}");
    }
    assert_eq!(health(addr, ORG_SERVICE).await, Some(ServingStatus::Serving));
    reflection_lists_services(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_serves_every_call_through_the_gateway() {
    // Every process exports its spans to a real OTLP receiver; contacts also logs the calls it
    // fails (at debug), so that the trace ids of JSON log lines can be checked.
    let otlp = OtlpReceiver::start().await;
    let mut env: Vec<(&'static str, &'static str, String)> =
        SUITE.names().into_iter().flat_map(|role| otlp.env().into_iter().map(move |(k, v)| (role, k, v))).collect();
    env.push(("contacts", "RUST_LOG", "info,crm_kit::metrics=debug".into()));
    let cluster =
        Cluster::start(ClusterConfig { replicas: vec![("contacts", 2)], env, ..ClusterConfig::default() }).await;
    let token = admin_token(cluster.gateway).await;
    exercise_contacts(cluster.gateway, &token).await;
    anonymous_calls(cluster.gateway).await;
    // The replicas check tokens themselves: going around the gateway does not go around sign-in.
    let err =
        contacts(cluster.replica("contacts", 0)).await.list_people(ListPeopleRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(health(cluster.gateway, AUTH_SERVICE).await, Some(ServingStatus::Serving));
    ops_endpoints(cluster.gateway).await;
    ops_endpoints(cluster.replica("contacts", 0)).await;
    // Calls are spread over both replicas (which calls land where is the balancer's choice).
    let (_, m0) = http_get(cluster.replica("contacts", 0), "/metrics").await;
    let (_, m1) = http_get(cluster.replica("contacts", 1), "/metrics").await;
    for m in [m0, m1] {
        assert!(m.contains("rpc_service=\"crm.contacts.v1.ContactsService\""), "{m}");
    }
    let prometheus = scraped_by_prometheus(&cluster, &token).await;
    traced_across_services(&cluster, &token, &otlp, &prometheus).await;
    dashboards_ask_for_what_processes_export(&cluster, &prometheus).await;
}

/// A real Prometheus scrapes the cluster (X3): a PromQL query over the RPC duration histogram
/// counts exactly the calls this test made, by role, method and code, and its quantiles answer.
async fn scraped_by_prometheus(cluster: &Cluster, token: &str) -> Prometheus {
    let targets =
        [cluster.gateway, cluster.replica("auth", 0), cluster.replica("contacts", 0), cluster.replica("contacts", 1)];
    let prometheus = Prometheus::start(&targets).await;
    let mut c = contacts_as(cluster.gateway, token).await;
    for _ in 0..5 {
        let missing = c.get_company(GetCompanyRequest { id: "0190b8a2-0000-7000-8000-00000000beef".into() }).await;
        assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    }
    let calls = |role: &str| {
        format!(
            "sum(rpc_server_call_duration_seconds_count{{crm_role=\"{role}\", \
             rpc_service=\"crm.contacts.v1.ContactsService\", rpc_method=\"GetCompany\", rpc_grpc_status_code=\"5\"}})"
        )
    };
    // Through the gateway, and at the replicas behind it (over both).
    prometheus.wait_for(&calls("gateway"), 5.0).await;
    prometheus.wait_for(&calls("contacts"), 5.0).await;
    // Over the process's life (a rate needs scrapes a while apart).
    let p99 = "histogram_quantile(0.99, sum by (le) (rpc_server_call_duration_seconds_bucket{crm_role=\"gateway\"}))";
    let result = prometheus.query(p99).await;
    let value = result.first().and_then(|r| r["value"][1].as_str()).and_then(|v| v.parse::<f64>().ok());
    assert!(value.is_some_and(|v| v > 0.0 && v.is_finite()), "{p99}: {result:?}");
    // Every target scraped. Polled: with the test processes busy, one scrape in a while takes
    // longer than the 1 s interval allows, and that target reads as down until the next one.
    prometheus.wait_for("sum(up{job=\"crm\"})", 4.0).await;
    prometheus
}

/// A W3C `traceparent` of a client's own: a new trace id and the client's span id.
fn client_trace() -> (String, String, tonic::metadata::MetadataValue<tonic::metadata::Ascii>) {
    let trace_id = uuid::Uuid::now_v7().simple().to_string();
    let span_id = uuid::Uuid::now_v7().simple().to_string()[16..].to_string();
    let header = format!("00-{trace_id}-{span_id}-01").parse().expect("a traceparent");
    (trace_id, span_id, header)
}

/// The span ids from `span` up through its parents (those received).
fn ancestry(spans: &[ReceivedSpan], span: &ReceivedSpan) -> Vec<String> {
    let mut chain = Vec::new();
    let mut at = Some(span);
    while let Some(s) = at {
        chain.push(s.span_id.clone());
        at = spans.iter().find(|p| p.span_id == s.parent_span_id);
    }
    chain
}

/// One call's trace, received by a real OTLP receiver (X3): a client's W3C context goes through
/// the gateway into contacts, into the events contacts publishes, and into notifications
/// handling them — one trace id, each span the child of the one before, SQL statements as
/// client spans under the work that ran them. The trace id is the exemplar of the call's bucket
/// in the RPC histogram Prometheus scraped, and is on the JSON log lines written inside a call.
async fn traced_across_services(cluster: &Cluster, token: &str, otlp: &OtlpReceiver, prometheus: &Prometheus) {
    let (seller, _) = salesperson(cluster.gateway, token, "traced-seller@example.com").await;
    let (trace_id, client_span, traceparent) = client_trace();
    let person = Person { full_name: "Traced Person".into(), owner_id: seller.id, ..Default::default() };
    let mut request = tonic::Request::new(CreatePersonRequest { person: Some(person), request_id: String::new() });
    request.metadata_mut().insert("traceparent", traceparent);
    contacts_as(cluster.gateway, token).await.create_person(request).await.unwrap();

    const METHOD: &str = "crm.contacts.v1.ContactsService/CreatePerson";
    const HANDLED: &str = "handle crm.contacts.v1.ContactOwnerChanged";
    let call = |spans: &[ReceivedSpan], role: &str| {
        spans.iter().find(|s| s.name == METHOD && s.attribute("crm.role") == role).cloned()
    };
    let spans = otlp
        .wait_for(&trace_id, |spans| {
            let published = call(spans, "contacts").map(|c| c.span_id).unwrap_or_default();
            let handled = spans.iter().any(|s| s.name == HANDLED);
            let handled_sql = spans
                .iter()
                .any(|s| s.kind == 3 && s.service == "crm-notifications" && ancestry(spans, s).contains(&published));
            let linked = spans
                .iter()
                .all(|s| s.parent_span_id == client_span || spans.iter().any(|p| p.span_id == s.parent_span_id));
            call(spans, "gateway").is_some() && handled && handled_sql && linked
        })
        .await;
    let gateway = call(&spans, "gateway").unwrap();
    assert_eq!((gateway.service.as_str(), gateway.kind), ("crm-gateway", 2), "{gateway:?}");
    assert_eq!(gateway.parent_span_id, client_span, "the gateway's span is the client's child");
    let contacts = call(&spans, "contacts").unwrap();
    assert_eq!((contacts.service.as_str(), contacts.kind), ("crm-contacts", 2), "{contacts:?}");
    assert_eq!(contacts.parent_span_id, gateway.span_id, "the replica's span is the gateway's child");
    let insert = spans
        .iter()
        .find(|s| s.parent_span_id == contacts.span_id && s.attribute("db.operation.name") == "INSERT")
        .unwrap_or_else(|| panic!("the call's INSERT statements are its children: {spans:#?}"));
    assert_eq!(insert.kind, 3);
    assert_eq!(insert.attribute("db.system.name"), "postgresql");
    assert!(insert.attribute("db.query.text").starts_with("INSERT INTO"), "{insert:?}");
    let handled = spans.iter().find(|s| s.name == HANDLED).unwrap();
    assert_eq!((handled.service.as_str(), handled.kind), ("crm-notifications", 5), "{handled:?}");
    assert_eq!(handled.parent_span_id, contacts.span_id, "the event's handling is the publishing call's child");
    assert_eq!(handled.attribute("messaging.consumer.group.name"), "notifications");
    // Notifications handles the call's events (created, assigned) in one batch: its statements
    // run under a batch span, the child of the first event's span and linked to the others'.
    let events: Vec<&ReceivedSpan> =
        spans.iter().filter(|s| s.kind == 5 && s.parent_span_id == contacts.span_id).collect();
    let batch = spans
        .iter()
        .find(|s| s.name == "handle events" && events.iter().any(|e| e.span_id == s.parent_span_id))
        .unwrap_or_else(|| panic!("a batch span under an event's: {spans:#?}"));
    for event in events.iter().filter(|e| e.span_id != batch.parent_span_id) {
        assert!(batch.links.contains(&(trace_id.clone(), event.span_id.clone())), "{batch:?} links {event:?}");
    }
    let statements = spans.iter().filter(|s| s.kind == 3 && s.parent_span_id == batch.span_id).count();
    assert!(statements > 0, "the batch's statements are its children: {spans:#?}");

    // The exemplar of the gateway's CreatePerson bucket is this call's trace.
    let selector = "rpc_server_call_duration_seconds_bucket{crm_role=\"gateway\",rpc_method=\"CreatePerson\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let series = prometheus.exemplars(selector).await;
        let traces: Vec<&str> = series
            .iter()
            .flat_map(|s| s["exemplars"].as_array().into_iter().flatten())
            .filter_map(|e| e["labels"]["trace_id"].as_str())
            .collect();
        if traces.contains(&trace_id.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "no exemplar of trace {trace_id}: {series:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A JSON log line written inside a call carries the call's trace id.
    let (trace_id, _, traceparent) = client_trace();
    let mut request = tonic::Request::new(GetPersonRequest { id: "0190b8a2-0000-7000-8000-00000000beef".into() });
    request.metadata_mut().insert("traceparent", traceparent);
    let missing = contacts_as(cluster.gateway, token).await.get_person(request).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let logged = |i: usize| {
        cluster
            .output("contacts", i)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|line| line["span"]["trace_id"] == trace_id.as_str() && line["fields"]["message"] == "call failed")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(logged(0) || logged(1)) {
        assert!(Instant::now() < deadline, "no JSON log line of trace {trace_id}:\n{}", cluster.output("contacts", 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Metric names in `text` (PromQL, or a template of it): identifiers right before a selector.
fn metric_names(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut names = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'{' || i == 0 {
            continue;
        }
        let start = text[..i].rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |p| p + 1);
        let name = &text[start..i];
        if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            names.push(name.to_string());
        }
    }
    names
}

/// The chart's dashboards and alerts ask for what the processes really export (X3): every
/// dashboard query is valid PromQL to a real Prometheus, and every metric a dashboard or an
/// alert rule names is on some process's `/metrics`.
async fn dashboards_ask_for_what_processes_export(cluster: &Cluster, prometheus: &Prometheus) {
    let mut exported = std::collections::HashSet::from(["up".to_string()]);
    for addr in cluster.addrs() {
        let (_, text) = http_get(addr, "/metrics").await;
        for line in text.lines() {
            let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|t| t.split_once(' ')) else { continue };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                _ => &[""],
            };
            exported.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/crm");
    let mut checked = 0;
    for entry in std::fs::read_dir(chart.join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                for name in metric_names(expr) {
                    assert!(exported.contains(&name), "{}: {name} is exported by no process", path.display());
                }
                // Grafana's variables as this Prometheus has them: no namespace label, any role.
                let promql = expr.replace("$__rate_interval", "1m").replace("$namespace", "");
                let promql = promql.replace("\"$role\"", "\".*\"").replace("\"$method\"", "\".*\"");
                assert!(!promql.contains('$'), "{}: a variable left in {promql}", path.display());
                prometheus.query(&promql).await;
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} dashboard queries");
    let rules = std::fs::read_to_string(chart.join("templates/prometheusrule.yaml")).unwrap();
    let named = metric_names(&rules);
    assert!(named.len() > 10, "{named:?}");
    for name in named {
        assert!(exported.contains(&name), "alert rules: {name} is exported by no process");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keeps_serving_when_a_replica_dies() {
    let mut cluster = cluster().await;
    let mut c = contacts_as(cluster.gateway, &admin_token(cluster.gateway).await).await;
    let created = c
        .create_person(CreatePersonRequest {
            person: Some(person("Failover Test", "+7 913 000 00 01")),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Crash one replica (SIGKILL, no goodbye).
    cluster.process("contacts", 0).kill();
    // Within a short settle time the gateway stops routing to it...
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut streak = 0;
    while streak < 20 {
        match c.get_person(GetPersonRequest { id: created.id.clone() }).await {
            Ok(_) => streak += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                streak = 0;
            }
        }
        assert!(Instant::now() < deadline, "gateway did not route around the dead replica");
    }
    // ...and then every call succeeds.
    for _ in 0..100 {
        c.get_person(GetPersonRequest { id: created.id.clone() }).await.expect("served by the live replica");
    }
    assert_eq!(health(cluster.gateway, CONTACTS_SERVICE).await, Some(ServingStatus::Serving));
    // A graceful stop of the last replica exits cleanly.
    let replica = cluster.process("contacts", 1);
    assert!(replica.terminate(Duration::from_secs(15)), "{}", replica.output());
    let gateway = cluster.process("gateway", 0);
    assert!(gateway.terminate(Duration::from_secs(15)), "{}", gateway.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_runs_the_suite_on_sqlite() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("crm-data");
    let addr = free_addr();
    let otlp = OtlpReceiver::start().await;
    let otel = otlp.env();
    let mut env = vec![("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD)];
    env.extend(otel.iter().map(|(k, v)| (*k, v.as_str())));
    let mut dev = start_dev("dev", &data_dir, addr, &env).await;
    let token = admin_token(addr).await;
    exercise_contacts(addr, &token).await;
    anonymous_calls(addr).await;
    ops_endpoints(addr).await;
    assignment_notifies_the_new_owner(addr, &token).await;
    let mut c = contacts_as(addr, &token).await;
    let (trace_id, _, traceparent) = client_trace();
    let mut request = tonic::Request::new(CreatePersonRequest {
        person: Some(person("Persisted", "+7 914 000 00 01")),
        request_id: String::new(),
    });
    request.metadata_mut().insert("traceparent", traceparent);
    let kept = c.create_person(request).await.unwrap().into_inner();
    // Traced on SQLite too: the statements (run on sqlx's worker threads) under the call's span.
    let inserted_under_call = |spans: &[ReceivedSpan]| {
        spans.iter().any(|call| {
            call.attribute("crm.role") == "contacts"
                && spans.iter().any(|s| {
                    s.parent_span_id == call.span_id
                        && s.attribute("db.system.name") == "sqlite"
                        && s.attribute("db.operation.name") == "INSERT"
                })
        })
    };
    let spans = otlp.wait_for(&trace_id, inserted_under_call).await;
    assert!(spans.iter().all(|s| s.service == "crm-dev"), "{spans:#?}");
    assert!(dev.terminate(Duration::from_secs(15)), "{}", dev.output());
    assert!(data_dir.join("contacts.db").exists());

    // Restart on the same data, without the password in the environment: the administrator
    // and the records are still there.
    let _dev = start_dev("dev-again", &data_dir, addr, &[]).await;
    let mut c = contacts_as(addr, &admin_token(addr).await).await;
    assert_eq!(c.get_person(GetPersonRequest { id: kept.id }).await.unwrap().into_inner().full_name, "Persisted");
}

/// A person created for a new salesperson reaches their live stream and inbox (events through
/// the databases in `crm dev`).
async fn assignment_notifies_the_new_owner(addr: SocketAddr, admin: &str) {
    let me = auth_as(addr, admin).await.get_me(GetMeRequest {}).await.unwrap().into_inner();
    let user = User {
        email: "dev-seller@example.com".into(),
        display_name: "Seller".into(),
        department_id: me.department_id,
        ..Default::default()
    };
    let (seller, token) = member(addr, admin, "Salesperson", user).await;
    let mut live =
        notifications_as(addr, &token).await.subscribe(SubscribeRequest::default()).await.unwrap().into_inner();
    let person = Person { full_name: "Vera Lebedeva".into(), owner_id: seller.id, ..Default::default() };
    contacts_as(addr, admin)
        .await
        .create_person(CreatePersonRequest { person: Some(person), request_id: String::new() })
        .await
        .unwrap();
    let pushed =
        tokio::time::timeout(Duration::from_secs(20), live.message()).await.expect("pushed in time").unwrap().unwrap();
    assert_eq!(pushed.title, "Assigned to you: Vera Lebedeva");
    let request = ListNotificationsRequest::default();
    let inbox = notifications_as(addr, &token).await.list_notifications(request).await.unwrap().into_inner();
    assert_eq!(inbox.notifications, [pushed]);
}

/// Without Redis, a role that consumes the events of roles running elsewhere says at start that
/// those events will not reach it, and how to fix it (before, it waited for them silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_redis_or_its_producers_is_told_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("notifications.db").display());
    let args = [
        "serve",
        "notifications",
        "--notifications-database-url",
        &url,
        "--notifications-listen",
        "127.0.0.1:0",
        "--auth-addr",
        "127.0.0.1:1",
        "--contacts-addr",
        "127.0.0.1:2",
    ];
    let alone = Process::start("notifications-alone", &args, &suite_env());
    let expected = "notifications consumes the events of contacts, which does not run in this process: \
                    they will not reach it; set --redis-url (CRM_REDIS_URL)";
    alone.wait_output(expected, Duration::from_secs(30)).await;
}

/// `crm serve` with every role in one process: the roles find each other there without any
/// `--<role>-addr`, and the suite works through the front role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serves_every_role() {
    let mut dbs = Vec::new();
    let mut args = vec!["serve".to_string()];
    args.extend(SUITE.names().into_iter().map(String::from));
    let mut front = None;
    let mut contacts_db = String::new();
    for role in SUITE.roles() {
        let spec = role.spec();
        let addr = free_addr();
        args.extend([format!("--{}-listen", spec.name), addr.to_string()]);
        if role.migrations().is_some() {
            let db = crm_kit::testing::TestDb::postgres().await;
            args.extend([format!("--{}-database-url", spec.name), db.url().to_string()]);
            if spec.name == "contacts" {
                contacts_db = db.url().to_string();
            }
            dbs.push(db);
        }
        if spec.is_front() {
            front = Some(addr);
        }
    }
    let gateway = front.expect("a front role");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut process = Process::start("every-role", &args, &suite_env());
    for service in served_services() {
        process.wait_serving(gateway, service).await;
    }
    exercise_contacts(gateway, &admin_token(gateway).await).await;
    bench_lists_a_later_page(gateway, &contacts_db).await;
    assert!(process.terminate(Duration::from_secs(15)), "{}", process.output());
}

/// `crm` with `args` (the administrator's password in `CRM_BENCH_PASSWORD`): whether it
/// succeeded, and its output.
async fn crm_bench(args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(crm_bin())
        .args(args)
        .env("CRM_BENCH_PASSWORD", ADMIN_PASSWORD)
        .env("CRM_BENCH_EMAIL", ADMIN_EMAIL)
        .output()
        .await
        .expect("run crm");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// `crm bench run --op list` with a filter, an order and a page of the user's: the pages before
/// it are walked once and every call asks for that page; one past the end, or a page with a
/// filter that changes per call, is refused with what is wrong.
async fn bench_lists_a_later_page(gateway: SocketAddr, contacts_db: &str) {
    let (ok, out) =
        crm_bench(&["bench", "seed", "--database-url", contacts_db, "--people", "120", "--companies", "3"]).await;
    assert!(ok, "{out}");
    let gateway = gateway.to_string();
    let run = |extra: &'static [&'static str]| {
        let mut args = vec!["bench", "run", "--target", gateway.as_str(), "--op", "list", "--concurrency", "2"];
        args.extend(["--seconds", "1"]);
        args.extend(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let call = |args: Vec<String>| async move { crm_bench(&args.iter().map(String::as_str).collect::<Vec<_>>()).await };

    let (ok, out) = call(run(&["--filter", "", "--order-by", "full_name desc", "--page", "3"])).await;
    assert!(ok, "{out}");
    assert!(out.contains("filter=\"\" order_by=\"full_name desc\" page=3"), "{out}");
    assert!(out.contains(" errors=0 "), "{out}");
    assert!(!out.contains("calls=0 "), "{out}");

    let (ok, out) = call(run(&["--filter", "", "--page", "4"])).await;
    assert!(!ok && out.contains("the listing has 3 page(s) of 50, not 4"), "{out}");
    let (ok, out) = call(run(&["--filter", "owner_id = \"{owner}\"", "--page", "2"])).await;
    assert!(!ok && out.contains("--page needs a filter without {owner} or {tag}"), "{out}");
    let (ok, out) = call(run(&["--filter", "stage = NOTASTAGE"])).await;
    assert!(ok && out.contains("first error: InvalidArgument"), "{out}");
}

/// Rolling restarts under load: each contacts replica in turn gets SIGTERM (reports
/// NOT_SERVING, keeps taking calls for `--drain-delay` while the gateway's health checks notice,
/// then stops accepting and finishes what is in flight) and comes back; twenty drains, and not
/// one call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_drains_under_load_fail_no_call() {
    let mut cluster = Cluster::start(ClusterConfig {
        replicas: vec![("contacts", 2)],
        flags: vec![
            ("contacts", ["--drain-delay", "600ms"].map(String::from).to_vec()),
            ("gateway", ["--health-interval", "100ms"].map(String::from).to_vec()),
        ],
        ..ClusterConfig::default()
    })
    .await;
    let token = admin_token(cluster.gateway).await;
    let mut c = contacts_as(cluster.gateway, &token).await;
    let request =
        CreatePersonRequest { person: Some(person("Drain Test", "+7 913 000 00 02")), request_id: String::new() };
    let id = c.create_person(request).await.unwrap().into_inner().id;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, token, id, gateway) = (stop.clone(), token.clone(), id.clone(), cluster.gateway);
            tokio::spawn(async move {
                let mut c = contacts_as(gateway, &token).await;
                let (mut ok, mut failed) = (0usize, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match c.get_person(GetPersonRequest { id: id.clone() }).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for drain in 0..20 {
        let i = drain % 2;
        let addr = cluster.replica("contacts", i);
        let replica = cluster.process("contacts", i);
        assert!(replica.terminate(Duration::from_secs(15)), "drain {drain}: {}", replica.output());
        replica.restart();
        replica.wait_serving(addr, CONTACTS_SERVICE).await;
        // The gateway must see the replica back before the other one goes (with neither up,
        // UNAVAILABLE would be the right answer).
        wait_contacts_up(cluster.gateway, 2, &format!("drain {drain}")).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for task in load {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!("20 drains: {ok} calls served, {} failed", failed.len());
    assert!(
        ok > 0 && failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// Waits until the gateway's `/metrics` shows `count` healthy contacts replicas.
async fn wait_contacts_up(gateway: SocketAddr, count: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = http_get(gateway, "/metrics").await;
        let up = metrics
            .lines()
            .filter(|l| l.starts_with("crm_gateway_upstream_up{") && l.contains(CONTACTS_SERVICE))
            .filter(|l| l.ends_with(" 1"))
            .count();
        if up == count {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: the gateway did not see {count} replicas up:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rolling update as Kubernetes does it with `maxUnavailable: 0` (X4): two contacts replicas
/// under reads and writes; a third starts, then an old one gets SIGTERM (it reports NOT_SERVING,
/// keeps serving through its drain delay, finishes what it has); again for the other; no call
/// fails, and every write that was answered is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_under_reads_and_writes_fails_no_call() {
    // Four addresses for the gateway; two replicas run at first, two come as the update.
    let mut cluster =
        Cluster::start(ClusterConfig { replicas: vec![("contacts", 4)], ..ClusterConfig::default() }).await;
    for i in [2, 3] {
        let replica = cluster.process("contacts", i);
        assert!(tokio::task::block_in_place(|| replica.terminate(Duration::from_secs(15))));
    }
    wait_contacts_up(cluster.gateway, 2, "before the update").await;
    let token = admin_token(cluster.gateway).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|n| {
            let (stop, token, gateway) = (stop.clone(), token.clone(), cluster.gateway);
            tokio::spawn(async move {
                let mut c = contacts_as(gateway, &token).await;
                let (mut created, mut failed) = (Vec::new(), Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    i += 1;
                    let request = CreatePersonRequest {
                        person: Some(person(
                            &format!("Rolling {n}-{i}"),
                            &format!("+7 913 {n:03} {:02} {:02}", i / 100 % 100, i % 100),
                        )),
                        request_id: String::new(),
                    };
                    match c.create_person(request).await {
                        Ok(p) => {
                            let id = p.into_inner().id;
                            if let Err(e) = c.get_person(GetPersonRequest { id: id.clone() }).await {
                                failed.push(format!("get {:?}: {}", e.code(), e.message()));
                            }
                            created.push(id);
                        }
                        Err(e) => failed.push(format!("create {:?}: {}", e.code(), e.message())),
                    }
                }
                (created, failed)
            })
        })
        .collect();
    for (new, old) in [(2, 0), (3, 1)] {
        let addr = cluster.replica("contacts", new);
        let replica = cluster.process("contacts", new);
        replica.restart();
        replica.wait_serving(addr, CONTACTS_SERVICE).await;
        wait_contacts_up(cluster.gateway, 3, "a new replica").await;
        let replica = cluster.process("contacts", old);
        let clean = tokio::task::block_in_place(|| replica.terminate(Duration::from_secs(15)));
        assert!(clean, "replica {old} drained and exited cleanly: {}", replica.output());
        wait_contacts_up(cluster.gateway, 2, "an old replica gone").await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut created, mut failed) = (Vec::new(), Vec::new());
    for task in load {
        let (c, f) = task.await.unwrap();
        created.extend(c);
        failed.extend(f);
    }
    eprintln!("rolling update: {} writes (each read back), {} failed", created.len(), failed.len());
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(created.len() > 20, "the load ran through the update: {}", created.len());
    // Every answered write is there, once (the cluster's people are this test's).
    let mut c = contacts_as(cluster.gateway, &token).await;
    let mut seen = std::collections::HashSet::new();
    let mut page_token = String::new();
    loop {
        let request = ListPeopleRequest { page_size: 500, page_token, ..Default::default() };
        let page = c.list_people(request).await.unwrap().into_inner();
        seen.extend(page.people.into_iter().map(|p| p.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let missing = created.iter().filter(|id| !seen.contains(*id)).count();
    assert_eq!((missing, seen.len()), (0, created.len()), "every write once");
}

/// Runs the `crm` client with its session in `config`, against `server`, feeding `stdin`:
/// whether it succeeded, its standard output and its standard error.
fn crm_client(config: &std::path::Path, server: SocketAddr, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(crm_bin())
        .args(args)
        .env("CRM_CONFIG_DIR", config)
        .env("CRM_SERVER", server.to_string())
        .env_remove("CRM_PASSWORD")
        .env_remove("CRM_OUTPUT")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run crm");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// The `crm` client commands against `crm dev` (X6): sign in, create, list, update, a report,
/// errors as field violations, JSON output, token refresh (the access token lives 3 s, so every
/// command renews it first; one refused as expired is renewed and the call made again), sign out.
/// And, on the same suite, what browser apps use: gRPC-Web from a real client library and CORS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_client_works_against_crm_dev() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let env = [
        ("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("CRM_ACCESS_TOKEN_TTL", "3s"),
        ("CRM_GATEWAY_CORS_ALLOWED_ORIGINS", "https://app.example.com"),
    ];
    let _dev = start_dev("dev", &data.path().join("crm-data"), addr, &env).await;
    browsers_reach_the_gateway(addr, data.path()).await;
    let config = data.path().join("config");
    let run = |args: &[&str]| crm_client(&config, addr, args, "");
    let ok = |args: &[&str]| {
        let (ok, out, err) = run(args);
        assert!(ok, "crm {args:?} failed: {out}{err}");
        out
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        serde_json::from_str(&ok(&args)).expect("JSON output")
    };

    let (signed_in, out, err) = crm_client(
        &config,
        addr,
        &["login", "--email", ADMIN_EMAIL, "--password-stdin"],
        &format!("{ADMIN_PASSWORD}\n"),
    );
    assert!(signed_in, "{out}{err}");
    assert!(out.contains(&format!("signed in to {addr} as {ADMIN_EMAIL}")), "{out}");
    let session_file = config.join("session.json");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&session_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the session is the user's alone");
    }
    let session = || -> serde_json::Value { serde_json::from_slice(&std::fs::read(&session_file).unwrap()).unwrap() };
    let first = session();
    assert_eq!(json(&["whoami"])["email"], ADMIN_EMAIL);
    let renewed = session();
    assert_ne!(renewed["access_token"], first["access_token"], "renewed before it ran out");
    assert_ne!(renewed["refresh_token"], first["refresh_token"], "the refresh token is used up");

    // People: create, list (a table), update only what is given, get as JSON.
    let ada =
        json(&["contacts", "create", "Ada Lovelace", "--email", "ada@example.com", "--phone", "+7 912 345 67 89"]);
    let id = ada["id"].as_str().expect("an id").to_string();
    let table = ok(&["contacts", "list"]);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("NAME") && header.contains("EMAIL"), "{table}");
    assert!(
        table.lines().any(|l| l.contains(&id) && l.contains("Ada Lovelace") && l.contains("ada@example.com")),
        "{table}"
    );
    let updated = ok(&["contacts", "update", &id, "--name", "Ada King"]);
    assert!(updated.contains("Ada King"), "{updated}");
    let got = json(&["contacts", "get", &id]);
    assert_eq!(
        (got["fullName"].as_str(), got["emails"][0]["address"].as_str()),
        (Some("Ada King"), Some("ada@example.com"))
    );

    // Refusals name the field.
    let (refused, _, err) = run(&["contacts", "create", " "]);
    assert!(!refused);
    assert!(err.contains("InvalidArgument") && err.contains("person.full_name"), "{err}");
    let (refused, _, err) = run(&["deals", "create", "Bad money", "--amount", "1.234", "--currency", "EUR"]);
    assert!(!refused && err.contains("not an amount of EUR"), "{err}");

    // A deal in euros, the forecast as a table and as CSV, any call by name.
    let deal = json(&["deals", "create", "Big deal", "--amount", "19.99", "--currency", "EUR", "--person", &id]);
    assert_eq!(deal["amount"]["minorUnits"], "1999");
    let deals = ok(&["deals", "list"]);
    assert!(deals.lines().any(|l| l.contains("Big deal") && l.contains("19.99 EUR") && l.contains("OPEN")), "{deals}");
    let forecast = ok(&["report", "forecast"]);
    assert!(forecast.starts_with("Month"), "{forecast}");
    let csv = ok(&["report", "forecast", "--csv"]);
    assert!(csv.starts_with("Month,"), "{csv}");
    let report = json(&["report", "funnel"]);
    assert_eq!(report["kind"], "REPORT_KIND_FUNNEL");
    let pipelines = json(&["call", "DealsService/ListPipelines"]);
    assert_eq!(pipelines["pipelines"][0]["name"], "Sales");
    ok(&["notifications", "list"]);

    // An access token refused as expired (here: not a token at all) is renewed and the call made
    // again.
    let mut broken = session();
    broken["access_token"] = "not-a-token".into();
    broken["access_expires_at"] = (chrono::Utc::now().timestamp() + 3600).into();
    std::fs::write(&session_file, broken.to_string()).unwrap();
    assert_eq!(json(&["whoami"])["email"], ADMIN_EMAIL);
    assert_ne!(session()["access_token"], "not-a-token");

    // Completion scripts; signing out ends the session here and on the server.
    assert!(ok(&["completion", "bash"]).contains("_crm"));
    let refresh = session()["refresh_token"].as_str().unwrap().to_string();
    assert!(ok(&["logout"]).contains("signed out"));
    assert!(!session_file.exists());
    let (listed, _, err) = run(&["contacts", "list"]);
    assert!(!listed && err.contains("not signed in"), "{err}");
    let refreshed = auth(addr).await.refresh(crm_proto::auth::v1::RefreshRequest { refresh_token: refresh }).await;
    assert_eq!(refreshed.unwrap_err().code(), tonic::Code::Unauthenticated, "signed out on the server too");
}

/// A test certificate authority and leaf certificates for 127.0.0.1 and localhost it signs.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "CRM test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa { issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap() }
    }

    /// A leaf named `name`: its certificate (DER), and the PEM of the certificate and its key.
    fn leaf(&self, name: &str) -> (Vec<u8>, String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), cert.pem(), key.serialize_pem())
    }

    /// A TLS client configuration trusting this authority (ALPN h2).
    fn client(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(crm_kit::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        std::sync::Arc::new(config)
    }
}

/// Calls `addr` over TLS (trusting `config`'s authority, as `localhost`): the certificate the
/// server presented and a gRPC channel over that connection.
async fn tls_channel(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> (Vec<u8>, tonic::transport::Channel) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("TLS handshake");
    let presented = tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "HTTP/2 negotiated");
    let stream = std::sync::Mutex::new(Some(tls));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = stream.lock().unwrap().take();
            async move { tls.map(hyper_util::rt::TokioIo::new).ok_or_else(|| std::io::Error::other("one connection")) }
        }))
        .await
        .expect("a channel over TLS");
    (presented, channel)
}

/// TLS on every role's port (G1), with a certificate made in the test: the handshake, calls over
/// it (the gateway calling the services over TLS too), and a renewed certificate taking effect
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_tls_and_reloads_its_certificate() {
    let data = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (first, cert_pem, key_pem) = ca.leaf("crm first");
    let (cert, key) = (data.path().join("tls.crt"), data.path().join("tls.key"));
    let authority = data.path().join("ca.crt");
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    std::fs::write(&authority, ca.issuer.pem()).unwrap();
    let addr = free_addr();
    let env = [
        ("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("CRM_TLS_CERT", cert.to_str().unwrap()),
        ("CRM_TLS_KEY", key.to_str().unwrap()),
        ("CRM_TLS_RELOAD_INTERVAL", "100ms"),
        // TLS only (but from loopback), and the roles call each other over TLS, verified.
        ("CRM_TLS_ONLY", "true"),
        ("CRM_PEERS_TLS_CA", authority.to_str().unwrap()),
    ];
    // The harness waits for it over plaintext, from loopback.
    let _dev = start_dev("dev", &data.path().join("crm-data"), addr, &env).await;

    let (presented, channel) = tls_channel(addr, ca.client()).await;
    assert_eq!(presented, first);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);
    let mut auth = crm_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel);
    let request = crm_proto::auth::v1::SignInRequest { email: ADMIN_EMAIL.into(), password: ADMIN_PASSWORD.into() };
    let pair = auth.sign_in(request).await.expect("a call over TLS").into_inner();
    let mut contacts = contacts_service_client::ContactsServiceClient::new(tls_channel(addr, ca.client()).await.1);
    let mut request = tonic::Request::new(ListPeopleRequest { page_size: 1, ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {}", pair.access_token).parse().unwrap());
    contacts.list_people(request).await.expect("a service call through the gateway over TLS");
    // The command-line client over TLS, trusting the test authority.
    let config = data.path().join("config");
    let server = format!("https://localhost:{}", addr.port());
    let tls_args = ["--server", server.as_str(), "--ca-file", authority.to_str().unwrap()];
    let login = [&["login", "--email", ADMIN_EMAIL, "--password-stdin"][..], &tls_args[..]].concat();
    let (signed_in, out, err) = crm_client(&config, addr, &login, &format!("{ADMIN_PASSWORD}\n"));
    assert!(signed_in && out.contains(&format!("signed in to {server}")), "{out}{err}");
    let whoami = [&["whoami", "--output", "json"][..], &tls_args[..]].concat();
    let (ok, out, err) = crm_client(&config, addr, &whoami, "");
    assert!(ok && out.contains(ADMIN_EMAIL), "{out}{err}");

    // A renewed certificate: new connections get it, no restart.
    let (second, cert_pem, key_pem) = ca.leaf("crm second");
    std::fs::write(&key, key_pem).unwrap();
    std::fs::write(&cert, cert_pem).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (presented, _) = tls_channel(addr, ca.client()).await;
        if presented == second {
            break;
        }
        assert_eq!(presented, first, "the old certificate until the new one loads");
        assert!(Instant::now() < deadline, "the renewed certificate was not served within 20s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Calls through the gateway still reach the services (new connections get the new one).
    let mut contacts = contacts_service_client::ContactsServiceClient::new(tls_channel(addr, ca.client()).await.1);
    let mut request = tonic::Request::new(ListPeopleRequest { page_size: 1, ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {}", pair.access_token).parse().unwrap());
    contacts.list_people(request).await.expect("a call after the renewal");
}

/// A real gRPC-Web client library (Connect-ES's gRPC-Web transport, under Node; its messages
/// from the suite's descriptor set, `tests/peers/grpcweb`) signing in and calling contacts
/// through the gateway, a refusal with its details; and CORS for an allowed origin (G1).
async fn browsers_reach_the_gateway(addr: SocketAddr, dir: &std::path::Path) {
    let descriptors = dir.join("crm_descriptor.bin");
    std::fs::write(&descriptors, crm_proto::FILE_DESCRIPTOR_SET).unwrap();
    let (gateway, descriptors) = (addr.to_string(), descriptors.to_str().unwrap().to_string());
    let args =
        ["--gateway", &gateway, "--descriptors", &descriptors, "--email", ADMIN_EMAIL, "--password", ADMIN_PASSWORD];
    let answer = run_peer("node", "grpcweb/check.mjs", &args).await;
    assert_eq!(answer["signedIn"], true);
    assert_eq!(answer["created"]["fullName"], "Web Client");
    assert_eq!(answer["fetched"]["id"], answer["created"]["id"]);
    assert_eq!(answer["fetched"]["emails"][0]["address"], "web@example.com");
    assert_eq!(answer["refused"]["code"], "InvalidArgument");
    assert_eq!(answer["refused"]["details"], serde_json::json!(["google.rpc.BadRequest"]));
    assert_eq!(answer["unauthenticated"], "Unauthenticated");

    // A browser's preflight from an allowed origin, and from another.
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /crm.contacts.v1.ContactsService/GetPerson HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization,content-type,x-grpc-web\r\nConnection: close\r\n\r\n"
        )
    };
    let head = raw_head(addr, &preflight("https://app.example.com")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("access-control-allow-origin: https://app.example.com"), "{head}");
    assert!(head.contains("authorization") && head.contains("x-grpc-web"), "{head}");
    let head = raw_head(addr, &preflight("https://elsewhere.example.com")).await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    // An answer to the allowed origin lets its script read the gRPC status.
    let call = format!(
        "POST /crm.contacts.v1.ContactsService/GetPerson HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://app.example.com\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0"
    );
    let head = raw_head(addr, &call).await;
    assert!(head.contains("access-control-allow-origin: https://app.example.com"), "{head}");
    assert!(head.contains("access-control-expose-headers") && head.contains("grpc-status"), "{head}");
}

/// Sends a raw HTTP/1.1 request; the response's head, its header names in lower case.
async fn raw_head(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.lines()
        .map(|l| match l.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
