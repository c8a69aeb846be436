//! Every contacts call, run against both backends through the API layer (validation, domain
//! rules and SQL together). PostgreSQL comes from CRM_TEST_POSTGRES_URL (a fresh database per
//! test); SQLite from a temporary file.

use crm_contacts::domain::Rules;
use crm_contacts::{ContactsApi, Store};
use crm_kit::testing::TestDb;
use crm_proto::contacts::v1::contacts_service_server::ContactsService;
use crm_proto::contacts::v1::*;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crm_kit::ApiError;
use crm_kit::auth::{CONTACTS_READ, CONTACTS_WRITE, Claims, OwnerScope, Principal, Visibility, VisibilitySource};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

// The test organisation: a head over Alice and Bob; Carol elsewhere; an administrator who sees all.
const ADMIN: &str = "0190a000-0000-7000-8000-000000000001";
const HEAD: &str = "0190a000-0000-7000-8000-000000000002";
const ALICE: &str = "0190a000-0000-7000-8000-000000000003";
const BOB: &str = "0190a000-0000-7000-8000-000000000004";
const CAROL: &str = "0190a000-0000-7000-8000-000000000005";

/// The data scopes the auth service would resolve for the test organisation.
struct Org;

impl VisibilitySource for Org {
    fn resolve<'a>(
        &'a self,
        principal: &'a Principal,
    ) -> Pin<Box<dyn Future<Output = Result<OwnerScope, ApiError>> + Send + 'a>> {
        let scope = match principal.subject.as_str() {
            ADMIN => OwnerScope::All,
            HEAD => OwnerScope::Owners([HEAD, ALICE, BOB].map(String::from).into()),
            other => OwnerScope::Owners([other.to_string()].into()),
        };
        Box::pin(async move { Ok(scope) })
    }
}

fn visibility() -> Visibility {
    Visibility::new(Arc::new(Org), Duration::ZERO)
}

/// A request from `user` holding `permissions`, as the authentication layer hands it on.
fn as_user<T>(user: &str, permissions: &[&str], message: T) -> Request<T> {
    let claims =
        Claims { sub: user.into(), perms: permissions.iter().map(|p| p.to_string()).collect(), ..Claims::default() };
    let mut request = Request::new(message);
    request.extensions_mut().insert(Principal::from_claims(claims, "token".into()));
    request
}

/// A request from the administrator (every record visible).
fn req<T>(message: T) -> Request<T> {
    as_user(ADMIN, &[CONTACTS_READ, CONTACTS_WRITE], message)
}

struct Env {
    api: ContactsApi,
    _db: TestDb,
}

async fn env(db: TestDb) -> Env {
    let store = Store::open(db.url(), 8).await.expect("open store");
    Env { api: ContactsApi::new(store, Rules { default_calling_code: "7".into() }, visibility()), _db: db }
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::env(crm_kit::testing::TestDb::sqlite()).await).await }) *
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::env(crm_kit::testing::TestDb::postgres().await).await).await }) *
        }
    };
}

both_backends!(
    people_crud,
    companies_crud,
    duplicates_are_refused_naming_the_holder,
    check_duplicates_reports_matches,
    revisions_record_every_change,
    stale_etag_is_aborted,
    bad_input_lists_field_violations,
    filters_and_search,
    pagination_is_stable_under_concurrent_inserts,
    create_is_idempotent_by_request_id,
    company_with_people_cannot_be_deleted,
    concurrent_creates_of_one_phone_admit_one,
    search_results_do_not_depend_on_the_window,
    data_scope_limits_every_call,
    owners_are_assigned_within_scope,
    permissions_are_required,
);

fn person(name: &str, phone: &str, email: &str) -> Person {
    Person {
        full_name: name.into(),
        phones: vec![Phone { number: phone.into(), ..Default::default() }],
        emails: vec![Email { address: email.into(), label: "work".into() }],
        stage: LifecycleStage::Lead as i32,
        ..Default::default()
    }
}

async fn create_person(api: &ContactsApi, p: Person) -> Result<Person, Status> {
    api.create_person(req(CreatePersonRequest { person: Some(p), request_id: String::new() }))
        .await
        .map(|r| r.into_inner())
}

async fn create_company(api: &ContactsApi, name: &str) -> Company {
    let company = Company { name: name.into(), industry: "retail".into(), ..Default::default() };
    api.create_company(req(CreateCompanyRequest { company: Some(company), request_id: String::new() }))
        .await
        .expect("create company")
        .into_inner()
}

async fn list_people(
    api: &ContactsApi,
    filter: &str,
    query: &str,
    order_by: &str,
    size: i32,
    token: &str,
) -> Result<ListPeopleResponse, Status> {
    api.list_people(req(ListPeopleRequest {
        page_size: size,
        page_token: token.into(),
        filter: filter.into(),
        order_by: order_by.into(),
        query: query.into(),
    }))
    .await
    .map(|r| r.into_inner())
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

async fn people_crud(env: Env) {
    let api = &env.api;
    let created = create_person(api, person("Anna Petrova", "8 916 123-45-67", "Anna@Example.com")).await.unwrap();
    assert_eq!(created.phones[0].e164, "+79161234567");
    assert_eq!(created.emails[0].address, "anna@example.com");
    assert_eq!(created.etag, "1");
    assert!(created.create_time.is_some());
    uuid::Uuid::parse_str(&created.id).expect("uuid id");

    let got = api.get_person(req(GetPersonRequest { id: created.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, created);

    let patch = Person {
        id: created.id.clone(),
        etag: created.etag.clone(),
        notes: "Prefers calls".into(),
        full_name: "ignored".into(),
        ..Default::default()
    };
    let updated = api
        .update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["notes"]) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.notes, "Prefers calls");
    assert_eq!(updated.full_name, "Anna Petrova", "fields outside the mask stay");
    assert_eq!(updated.etag, "2");
    assert_eq!(updated.create_time, created.create_time);
    let reread = api.get_person(req(GetPersonRequest { id: created.id.clone() })).await.unwrap().into_inner();
    assert_eq!(reread, updated);

    let page = list_people(api, "", "", "", 10, "").await.unwrap();
    assert_eq!(page.people, vec![updated.clone()]);
    assert!(page.next_page_token.is_empty());

    api.delete_person(req(DeletePersonRequest { id: created.id.clone(), etag: String::new() })).await.unwrap();
    let err = api.get_person(req(GetPersonRequest { id: created.id.clone() })).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        api.delete_person(req(DeletePersonRequest { id: created.id.clone(), etag: String::new() })).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The phone is free again.
    create_person(api, person("Anna P.", "+79161234567", "anna@example.com")).await.unwrap();
}

async fn companies_crud(env: Env) {
    let api = &env.api;
    let acme = create_company(api, "Acme, Inc.").await;
    assert_eq!(acme.name, "Acme, Inc.");
    let patch = Company {
        id: acme.id.clone(),
        stage: LifecycleStage::Customer as i32,
        tags: vec!["Key Account".into()],
        ..Default::default()
    };
    let updated = api
        .update_company(req(UpdateCompanyRequest { company: Some(patch), update_mask: mask(&["stage", "tags"]) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.stage, LifecycleStage::Customer as i32);
    assert_eq!(updated.tags, ["key account"]);
    assert_eq!(updated.name, "Acme, Inc.");
    let listed = api
        .list_companies(req(ListCompaniesRequest { filter: "stage = CUSTOMER".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.companies, vec![updated.clone()]);
    let listed = api
        .list_companies(req(ListCompaniesRequest {
            filter: "industry = retail AND tags:\"key account\"".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.companies.len(), 1);
    api.delete_company(req(DeleteCompanyRequest { id: acme.id.clone(), etag: updated.etag })).await.unwrap();
    assert_eq!(api.get_company(req(GetCompanyRequest { id: acme.id })).await.unwrap_err().code(), Code::NotFound);
}

async fn duplicates_are_refused_naming_the_holder(env: Env) {
    let api = &env.api;
    let owner = uuid::Uuid::now_v7().to_string();
    let mut first = person("Ivan Sidorov", "+7 495 000-11-22", "ivan@corp.ru");
    first.owner_id = owner.clone();
    let first = create_person(api, first).await.unwrap();

    for dup in [
        person("Someone Else", "8 (495) 000 11 22", "other@corp.ru"),
        person("Someone Else", "+7 999 000-00-01", "IVAN@corp.RU"),
    ] {
        let err = create_person(api, dup).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains(&first.id), "{}", err.message());
        assert!(err.message().contains(&owner), "{}", err.message());
        let info = err.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "DUPLICATE_RECORD");
        assert_eq!(info.metadata["record_id"], first.id);
        assert_eq!(info.metadata["owner_id"], owner);
    }
    // Nothing of the refused records was stored.
    let all = list_people(api, "", "", "", 100, "").await.unwrap();
    assert_eq!(all.people.len(), 1);

    // Updating another record onto a taken e-mail is refused too.
    let other = create_person(api, person("Petr", "+7 900 000-00-02", "petr@corp.ru")).await.unwrap();
    let patch = Person {
        id: other.id.clone(),
        emails: vec![Email { address: "ivan@corp.ru".into(), label: String::new() }],
        ..Default::default()
    };
    let err = api
        .update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["emails"]) }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let still = api.get_person(req(GetPersonRequest { id: other.id })).await.unwrap().into_inner();
    assert_eq!(still.emails[0].address, "petr@corp.ru");

    create_company(api, "ООО «Ромашка»").await;
    let err = api
        .create_company(req(CreateCompanyRequest {
            company: Some(Company { name: "Ромашка ООО".into(), ..Default::default() }),
            request_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

async fn check_duplicates_reports_matches(env: Env) {
    let api = &env.api;
    let p = create_person(api, person("Olga", "+7 912 345-67-89", "olga@shop.ru")).await.unwrap();
    let c = create_company(api, "Blue Sky Ltd").await;
    let r = api
        .check_duplicates(req(CheckDuplicatesRequest {
            record_type: RecordType::Person as i32,
            phones: vec!["8 912 345 67 89".into()],
            emails: vec!["nobody@shop.ru".into()],
            company_name: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.matches.len(), 1);
    assert_eq!((r.matches[0].field.as_str(), r.matches[0].record_id.as_str()), ("phone", p.id.as_str()));
    assert_eq!(r.matches[0].display_name, "Olga");
    let r = api
        .check_duplicates(req(CheckDuplicatesRequest {
            record_type: RecordType::Company as i32,
            company_name: "BLUE SKY".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.matches[0].record_id, c.id);
    let err = api
        .check_duplicates(req(CheckDuplicatesRequest { phones: vec!["abc".into()], ..Default::default() }))
        .await
        .unwrap_err();
    let fields: Vec<String> =
        err.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["record_type", "phones[0]"]);
}

async fn revisions_record_every_change(env: Env) {
    let api = &env.api;
    let p = create_person(api, person("Maria", "+7 901 111-22-33", "maria@x.ru")).await.unwrap();
    let patch = Person { id: p.id.clone(), stage: LifecycleStage::Customer as i32, ..Default::default() };
    api.update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["stage"]) })).await.unwrap();
    // An update that changes nothing writes no revision.
    let same = Person { id: p.id.clone(), stage: LifecycleStage::Customer as i32, ..Default::default() };
    let unchanged = api
        .update_person(req(UpdatePersonRequest { person: Some(same), update_mask: mask(&["stage"]) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.etag, "2");
    api.delete_person(req(DeletePersonRequest { id: p.id.clone(), etag: "2".into() })).await.unwrap();

    let first = api
        .list_revisions(req(ListRevisionsRequest { record_id: p.id.clone(), page_size: 2, page_token: String::new() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.revisions.iter().map(|r| r.version).collect::<Vec<_>>(), [3, 2]);
    let deleted = &first.revisions[0];
    assert_eq!(deleted.action, revision::Action::Delete as i32);
    assert!(deleted.changes.iter().any(|c| c.field == "full_name" && c.old_value == "Maria" && c.new_value.is_empty()));
    let update = &first.revisions[1];
    assert_eq!(update.action, revision::Action::Update as i32);
    assert_eq!(update.changes.len(), 1);
    assert_eq!((update.changes[0].old_value.as_str(), update.changes[0].new_value.as_str()), ("LEAD", "CUSTOMER"));
    assert_eq!(update.actor, ADMIN);
    assert!(update.create_time.is_some());

    let rest = api
        .list_revisions(req(ListRevisionsRequest {
            record_id: p.id.clone(),
            page_size: 2,
            page_token: first.next_page_token,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.revisions.len(), 1);
    assert_eq!(rest.revisions[0].action, revision::Action::Create as i32);
    assert_eq!(rest.revisions[0].record_type, RecordType::Person as i32);
    assert!(rest.revisions[0].changes.iter().any(|c| c.field == "emails" && c.new_value == r#"["maria@x.ru"]"#));
    assert!(rest.next_page_token.is_empty());
}

async fn stale_etag_is_aborted(env: Env) {
    let api = &env.api;
    let p = create_person(api, person("Egor", "+7 902 000-00-00", "egor@x.ru")).await.unwrap();
    let first = Person { id: p.id.clone(), etag: p.etag.clone(), notes: "first".into(), ..Default::default() };
    api.update_person(req(UpdatePersonRequest { person: Some(first), update_mask: mask(&["notes"]) })).await.unwrap();
    let stale = Person { id: p.id.clone(), etag: p.etag.clone(), notes: "second".into(), ..Default::default() };
    let err = api
        .update_person(req(UpdatePersonRequest { person: Some(stale), update_mask: mask(&["notes"]) }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = api.delete_person(req(DeletePersonRequest { id: p.id.clone(), etag: "1".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let now = api.get_person(req(GetPersonRequest { id: p.id })).await.unwrap().into_inner();
    assert_eq!(now.notes, "first");
}

async fn bad_input_lists_field_violations(env: Env) {
    let api = &env.api;
    let bad = Person {
        full_name: "".into(),
        phones: vec![Phone { number: "not a phone".into(), ..Default::default() }],
        emails: vec![Email { address: "x@".into(), label: String::new() }],
        company_id: "not-a-uuid".into(),
        ..Default::default()
    };
    let err = create_person(api, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        err.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(
        fields,
        ["person.full_name", "person.company_id", "person.phones[0].number", "person.emails[0].address"]
    );

    let missing_company =
        Person { full_name: "X".into(), company_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
    let err = create_person(api, missing_company).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("person.company_id"), "{}", err.message());

    let err = api.get_person(req(GetPersonRequest { id: "1; DROP TABLE people".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = api.create_person(req(CreatePersonRequest::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let p = create_person(api, person("Valid", "+7 903 000-00-00", "valid@x.ru")).await.unwrap();
    let err = api
        .update_person(req(UpdatePersonRequest {
            person: Some(Person { id: p.id.clone(), ..Default::default() }),
            update_mask: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, "update_mask");
    let err = api
        .update_person(req(UpdatePersonRequest {
            person: Some(Person { id: p.id.clone(), ..Default::default() }),
            update_mask: mask(&["full_name"]),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, "person.full_name");

    for (filter, order, token, field) in [
        ("owner_id = 'x' OR", "", "", "filter"),
        ("nonsense = 1", "", "", "filter"),
        ("", "phones", "", "order_by"),
        ("", "", "garbage", "page_token"),
    ] {
        let err = list_people(api, filter, "", order, 10, token).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, field);
    }
    let err = list_people(api, "", "", "", -1, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The table survived every attempt.
    assert_eq!(list_people(api, "", "", "", 10, "").await.unwrap().people.len(), 1);
}

async fn filters_and_search(env: Env) {
    let api = &env.api;
    let alice = uuid::Uuid::now_v7().to_string();
    let bob = uuid::Uuid::now_v7().to_string();
    let company = create_company(api, "Northwind Traders").await;
    let mut ids = Vec::new();
    for (i, (name, owner, stage, tags, region)) in [
        ("Zhang Wei", &alice, LifecycleStage::Customer, vec!["vip"], "Shanghai"),
        ("Juan dela Cruz", &alice, LifecycleStage::Lead, vec!["wholesale"], "Manila"),
        ("Ekaterina Ivanova", &bob, LifecycleStage::Customer, vec!["vip", "wholesale"], "Moscow"),
        ("Jo Lee", &bob, LifecycleStage::Lost, vec![], "Seoul"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = person(name, &format!("+7 900 555-00-0{i}"), &format!("p{i}@mail{i}.example"));
        p.owner_id = owner.clone();
        p.stage = stage as i32;
        p.tags = tags.into_iter().map(String::from).collect();
        p.region = region.into();
        if i == 0 {
            p.company_id = company.id.clone();
        }
        ids.push(create_person(api, p).await.unwrap().id);
    }
    let names = |r: ListPeopleResponse| r.people.into_iter().map(|p| p.full_name).collect::<Vec<_>>();

    let by = |f: &'static str| list_people(api, f, "", "full_name", 50, "");
    assert_eq!(names(by("stage = CUSTOMER").await.unwrap()), ["Ekaterina Ivanova", "Zhang Wei"]);
    assert_eq!(names(by("tags:vip AND tags:wholesale").await.unwrap()), ["Ekaterina Ivanova"]);
    assert_eq!(names(by("stage != CUSTOMER AND region = Seoul").await.unwrap()), ["Jo Lee"]);
    assert_eq!(
        names(by("(region = Manila OR region = Moscow) AND NOT stage = LOST").await.unwrap()),
        ["Ekaterina Ivanova", "Juan dela Cruz"]
    );
    let owner_filter = format!("owner_id = \"{alice}\"");
    assert_eq!(
        names(list_people(api, &owner_filter, "", "full_name desc", 50, "").await.unwrap()),
        ["Zhang Wei", "Juan dela Cruz"]
    );
    assert_eq!(
        names(list_people(api, &format!("company_id = \"{}\"", company.id), "", "", 50, "").await.unwrap()),
        ["Zhang Wei"]
    );
    assert_eq!(
        names(
            by("create_time > \"2000-01-01T00:00:00Z\" AND last_activity_time < \"2000-01-01T00:00:00Z\"")
                .await
                .unwrap()
        )
        .len(),
        4
    );
    assert!(names(by("create_time > \"2999-01-01T00:00:00Z\"").await.unwrap()).is_empty());

    let search = |q: &'static str| list_people(api, "", q, "full_name", 50, "");
    assert_eq!(names(search("ivanova").await.unwrap()), ["Ekaterina Ivanova"]);
    assert_eq!(names(search("KATERINA").await.unwrap()), ["Ekaterina Ivanova"], "substring, any case");
    assert_eq!(names(search("mail2.example").await.unwrap()), ["Ekaterina Ivanova"], "e-mail");
    assert_eq!(names(search("5550003").await.unwrap()), ["Jo Lee"], "phone digits");
    assert_eq!(names(search("jo").await.unwrap()), ["Jo Lee"], "short terms work too");
    assert_eq!(names(search("juan cruz").await.unwrap()), ["Juan dela Cruz"], "every term must match");
    assert!(names(search("juan ivanova").await.unwrap()).is_empty());
    assert!(names(search("100%_").await.unwrap()).is_empty(), "LIKE wildcards are literal");
    assert!(names(search("\"quoted\" OR 1").await.unwrap()).is_empty(), "FTS syntax is literal");
    let filtered_search = list_people(api, "stage = CUSTOMER", "wei", "", 50, "").await.unwrap();
    assert_eq!(names(filtered_search), ["Zhang Wei"]);

    let companies = api
        .list_companies(req(ListCompaniesRequest { query: "northwind".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(companies.companies.len(), 1);
}

async fn pagination_is_stable_under_concurrent_inserts(env: Env) {
    let api = &env.api;
    for i in 0..25 {
        create_person(api, person(&format!("Early {i:02}"), &format!("+7 911 000-00-{i:02}"), &format!("e{i}@x.ru")))
            .await
            .unwrap();
    }
    for order in ["", "create_time", "full_name", "full_name desc", "update_time desc"] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut round = 0;
        loop {
            let page = list_people(api, "", "", order, 7, &token).await.unwrap();
            seen.extend(page.people.iter().map(|p| p.full_name.clone()));
            // Someone inserts while we page.
            create_person(
                api,
                person(
                    &format!("Late {order} {round}"),
                    &format!("+7 922 {:03}-{round:02}-00", order.len()),
                    &format!("l{}{round}@x.ru", order.len()),
                ),
            )
            .await
            .unwrap();
            round += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            // A token is bound to its listing.
            let err = list_people(api, "stage = LEAD", "", order, 7, &token).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        let early: Vec<&String> = seen.iter().filter(|n| n.starts_with("Early")).collect();
        assert_eq!(early.len(), 25, "order {order:?}: every record present at the start is listed once: {seen:?}");
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "order {order:?}: no record twice");
        if order == "full_name" {
            let mut sorted = seen.clone();
            sorted.sort();
            assert_eq!(sorted, seen);
        }
    }
}

async fn create_is_idempotent_by_request_id(env: Env) {
    let api = &env.api;
    let request = || CreatePersonRequest {
        person: Some(person("Retry", "+7 904 000-00-00", "retry@x.ru")),
        request_id: "req-42".into(),
    };
    let a = api.create_person(req(request())).await.unwrap().into_inner();
    let b = api.create_person(req(request())).await.unwrap().into_inner();
    assert_eq!(a, b);
    assert_eq!(list_people(api, "", "", "", 10, "").await.unwrap().people.len(), 1);
    let err = api
        .create_company(req(CreateCompanyRequest {
            company: Some(Company { name: "Other".into(), ..Default::default() }),
            request_id: "req-42".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn company_with_people_cannot_be_deleted(env: Env) {
    let api = &env.api;
    let c = create_company(api, "Globex").await;
    let mut p = person("Hank", "+7 905 000-00-00", "hank@globex.com");
    p.company_id = c.id.clone();
    let p = create_person(api, p).await.unwrap();
    let err =
        api.delete_company(req(DeleteCompanyRequest { id: c.id.clone(), etag: String::new() })).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    api.delete_person(req(DeletePersonRequest { id: p.id, etag: String::new() })).await.unwrap();
    api.delete_company(req(DeleteCompanyRequest { id: c.id, etag: String::new() })).await.unwrap();
}

async fn concurrent_creates_of_one_phone_admit_one(env: Env) {
    let api = env.api.clone();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                create_person(&api, person(&format!("Racer {i}"), "+7 906 000-00-00", &format!("r{i}@x.ru"))).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(list_people(&api, "", "", "", 10, "").await.unwrap().people.len(), 1);
}

async fn search_results_do_not_depend_on_the_window(env: Env) {
    for i in 0..40 {
        let name = if i % 3 == 0 { format!("Petrov {i:02}") } else { format!("Smith {i:02}") };
        let mut p = person(&name, &format!("+7 915 000-00-{i:02}"), &format!("w{i}@x.ru"));
        p.stage = if i % 2 == 0 { LifecycleStage::Customer as i32 } else { LifecycleStage::Lead as i32 };
        create_person(&env.api, p).await.unwrap();
    }
    let rules = || Rules { default_calling_code: "7".into() };
    let mut by_window = Vec::new();
    for window in [Some(3), Some(10), None] {
        let store = Store::open(env._db.url(), 4).await.unwrap();
        let store = match window {
            Some(rows) => store.with_search_window(rows),
            None => store,
        };
        let api = ContactsApi::new(store, rules(), visibility());
        let mut results = Vec::new();
        for (filter, query, order) in [
            ("", "petrov", ""),
            ("", "petrov", "full_name"),
            ("stage = CUSTOMER", "petrov", "full_name desc"),
            ("", "smith", "create_time"),
            ("", "nobody", ""),
        ] {
            let mut names = Vec::new();
            let mut token = String::new();
            loop {
                let page = list_people(&api, filter, query, order, 4, &token).await.unwrap();
                names.extend(page.people.into_iter().map(|p| p.full_name));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            results.push(names);
        }
        by_window.push(results);
    }
    assert_eq!(by_window[0][0].len(), 14);
    assert_eq!(by_window[0][2].len(), 7);
    assert_eq!(by_window[0][3].len(), 26);
    assert!(by_window[0][4].is_empty());
    assert_eq!(by_window[0], by_window[1]);
    assert_eq!(by_window[0], by_window[2]);
}

async fn person_as(api: &ContactsApi, user: &str, name: &str, phone: &str) -> Person {
    let request = as_user(
        user,
        &[CONTACTS_READ, CONTACTS_WRITE],
        CreatePersonRequest {
            person: Some(person(name, phone, &format!("{}@example.com", name.replace(' ', ".")))),
            request_id: String::new(),
        },
    );
    let created = api.create_person(request).await.expect("create").into_inner();
    assert_eq!(created.owner_id, user, "the creator owns the record");
    created
}

fn rw<T>(user: &str, message: T) -> Request<T> {
    as_user(user, &[CONTACTS_READ, CONTACTS_WRITE], message)
}

async fn visible_names(api: &ContactsApi, user: &str, query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListPeopleRequest {
            page_size: 2,
            page_token,
            query: query.into(),
            order_by: "full_name".into(),
            ..Default::default()
        };
        let page = api.list_people(rw(user, request)).await.expect("list").into_inner();
        names.extend(page.people.into_iter().map(|p| p.full_name));
        if page.next_page_token.is_empty() {
            return names;
        }
        page_token = page.next_page_token;
    }
}

async fn data_scope_limits_every_call(env: Env) {
    let api = &env.api;
    let mut phone = 0;
    let mut records = Vec::new();
    for (owner, name) in [(ALICE, "Alice Client"), (BOB, "Bob Client"), (CAROL, "Carol Client"), (HEAD, "Head Client")]
    {
        phone += 1;
        records.push((owner, person_as(api, owner, name, &format!("+7 916 100-00-0{phone}")).await));
    }
    let visible_to = |user: &str, owner: &str| match user {
        ADMIN => true,
        HEAD => owner != CAROL,
        _ => user == owner,
    };
    for user in [ADMIN, HEAD, ALICE, BOB, CAROL] {
        let mut expected: Vec<String> =
            records.iter().filter(|(o, _)| visible_to(user, o)).map(|(_, p)| p.full_name.clone()).collect();
        expected.sort();
        assert_eq!(visible_names(api, user, "").await, expected, "list as {user}");
        assert_eq!(visible_names(api, user, "client").await, expected, "search as {user}");
        for (owner, record) in &records {
            let got = api.get_person(rw(user, GetPersonRequest { id: record.id.clone() })).await;
            let revisions = api
                .list_revisions(rw(user, ListRevisionsRequest { record_id: record.id.clone(), ..Default::default() }))
                .await;
            let mut patch = record.clone();
            patch.company_role = format!("changed by {user}");
            patch.etag = String::new();
            let update = UpdatePersonRequest {
                person: Some(patch),
                update_mask: Some(prost_types::FieldMask { paths: vec!["company_role".into()] }),
            };
            let updated = api.update_person(rw(user, update)).await;
            if visible_to(user, owner) {
                assert_eq!(got.unwrap().into_inner().id, record.id, "{user} gets {owner}'s record");
                assert!(!revisions.unwrap().into_inner().revisions.is_empty());
                assert_eq!(updated.unwrap().into_inner().company_role, format!("changed by {user}"));
            } else {
                assert_eq!(got.unwrap_err().code(), Code::NotFound, "{user} must not get {owner}'s record");
                assert_eq!(revisions.unwrap_err().code(), Code::NotFound);
                assert_eq!(updated.unwrap_err().code(), Code::NotFound);
                let delete = DeletePersonRequest { id: record.id.clone(), etag: String::new() };
                assert_eq!(api.delete_person(rw(user, delete)).await.unwrap_err().code(), Code::NotFound);
            }
        }
    }
    // A deleted record's history stays visible to those who could see the record, only.
    let bob_record = &records[1].1;
    api.delete_person(rw(HEAD, DeletePersonRequest { id: bob_record.id.clone(), etag: String::new() })).await.unwrap();
    let history = |user: &'static str| {
        api.list_revisions(rw(user, ListRevisionsRequest { record_id: bob_record.id.clone(), ..Default::default() }))
    };
    assert_eq!(history(HEAD).await.unwrap().into_inner().revisions.len(), 5);
    assert_eq!(history(BOB).await.unwrap().into_inner().revisions.len(), 5);
    assert_eq!(history(ALICE).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(history(CAROL).await.unwrap_err().code(), Code::NotFound);
}

async fn owners_are_assigned_within_scope(env: Env) {
    let api = &env.api;
    // A salesperson cannot create for a colleague.
    let mut p = person("For Bob", "+7 916 200-00-01", "for.bob@example.com");
    p.owner_id = BOB.into();
    let refused =
        api.create_person(rw(ALICE, CreatePersonRequest { person: Some(p.clone()), ..Default::default() })).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    // Their head can, and can hand the record over; the previous owner loses sight of it.
    let created =
        api.create_person(rw(HEAD, CreatePersonRequest { person: Some(p), ..Default::default() })).await.unwrap();
    let created = created.into_inner();
    assert_eq!(created.owner_id, BOB);
    let mut patch = created.clone();
    patch.owner_id = ALICE.into();
    let mask = Some(prost_types::FieldMask { paths: vec!["owner_id".into()] });
    let moved = api
        .update_person(rw(HEAD, UpdatePersonRequest { person: Some(patch.clone()), update_mask: mask.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.owner_id, ALICE);
    let get = |user: &'static str| api.get_person(rw(user, GetPersonRequest { id: created.id.clone() }));
    assert_eq!(get(BOB).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(ALICE).await.unwrap().into_inner().owner_id, ALICE);
    // The owner cannot give it away outside their scope, nor leave it ownerless.
    for owner in [CAROL, ""] {
        patch.owner_id = owner.into();
        patch.etag = String::new();
        let refused = api
            .update_person(rw(ALICE, UpdatePersonRequest { person: Some(patch.clone()), update_mask: mask.clone() }))
            .await
            .unwrap_err();
        let expected = if owner.is_empty() { Code::InvalidArgument } else { Code::PermissionDenied };
        assert_eq!(refused.code(), expected, "owner {owner:?}");
    }
    // Duplicate protection spans scopes and names the holder (SPEC C3).
    let duplicate = person("Same Phone", "+7 916 200-00-01", "same.phone@example.com");
    let refused = api
        .create_person(rw(CAROL, CreatePersonRequest { person: Some(duplicate), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert_eq!(refused.get_details_error_info().unwrap().metadata.get("owner_id").map(String::as_str), Some(ALICE));
}

async fn permissions_are_required(env: Env) {
    let api = &env.api;
    let refused = api.create_person(as_user(
        ALICE,
        &[CONTACTS_READ],
        CreatePersonRequest { person: Some(person("X", "+7 916 300-00-01", "x@example.com")), ..Default::default() },
    ));
    let refused = refused.await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("contacts.write"), "{}", refused.message());
    let list = api.list_people(as_user(ALICE, &[CONTACTS_READ], ListPeopleRequest::default())).await;
    assert!(list.unwrap().into_inner().people.is_empty());
    let nothing = as_user(ALICE, &[], ListPeopleRequest::default());
    assert_eq!(api.list_people(nothing).await.unwrap_err().code(), Code::PermissionDenied);
    let anonymous = Request::new(ListPeopleRequest::default());
    assert_eq!(api.list_people(anonymous).await.unwrap_err().code(), Code::Unauthenticated);
}
