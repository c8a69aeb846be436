//! Every contacts call, run against both backends through the API layer (validation, domain
//! rules and SQL together). PostgreSQL comes from CRM_TEST_POSTGRES_URL (a fresh database per
//! test); SQLite from a temporary file. The organisation around the service (data scopes and
//! users) is a fixture standing in for the auth service.

mod listing;
mod records;
mod scope;

pub use std::sync::Arc;
use std::time::Duration;

pub use crm_contacts::domain::Kind;
pub use crm_contacts::domain::Rules;
pub use crm_contacts::store::{ListQuery, ListRequest, Planning};
pub use crm_contacts::{ContactsApi, Store};
pub use crm_kit::auth::OwnerScope;
use crm_kit::auth::ScopeCache;
pub use crm_kit::auth::UserStatus;
pub use crm_kit::testing::{Org, TestDb};
pub use crm_proto::contacts::v1::contacts_service_server::ContactsService;
pub use crm_proto::contacts::v1::*;
pub use tonic::{Code, Request, Status};
pub use tonic_types::StatusExt;

use listing::*;
use records::*;
use scope::*;

pub const CONTACTS_READ: &str = crm_contacts::permissions::READ.name;
pub const CONTACTS_WRITE: &str = crm_contacts::permissions::WRITE.name;

// The test organisation: a head over Alice and Bob; Carol elsewhere; an administrator who sees all.
pub const ADMIN: &str = "0190a000-0000-7000-8000-000000000001";
pub const HEAD: &str = "0190a000-0000-7000-8000-000000000002";
pub const ALICE: &str = "0190a000-0000-7000-8000-000000000003";
pub const BOB: &str = "0190a000-0000-7000-8000-000000000004";
pub const CAROL: &str = "0190a000-0000-7000-8000-000000000005";

/// The organisation the auth service would describe: who sees whom, and who is a user.
pub fn org() -> Org {
    Org::new().sees_all(ADMIN).sees(HEAD, &[ALICE, BOB]).user(ALICE).user(BOB).user(CAROL)
}

pub fn rules() -> Rules {
    Rules { default_calling_code: "7".into() }
}

/// The API over `store`, in `org` (data scopes asked on every call).
pub fn api_over(store: Store, org: &Org) -> ContactsApi {
    let scopes = ScopeCache::new(Arc::new(org.clone()), Duration::ZERO);
    ContactsApi::new(store, rules(), scopes, Arc::new(org.clone()))
}

/// A request from `user` holding `permissions`, as the authentication layer hands it on.
pub fn as_user<T>(user: &str, permissions: &[&str], message: T) -> Request<T> {
    crm_kit::testing::request(&crm_kit::testing::principal(user, permissions), message)
}

/// A request from the administrator (every record visible).
pub fn req<T>(message: T) -> Request<T> {
    as_user(ADMIN, &[CONTACTS_READ, CONTACTS_WRITE], message)
}

pub struct Env {
    pub api: ContactsApi,
    pub store: Store,
    pub org: Org,
    pub _db: TestDb,
}

async fn env(db: TestDb) -> Env {
    let store = Store::open(db.url(), 8).await.expect("open store");
    let org = org();
    Env { api: api_over(store.clone(), &org), store, org, _db: db }
}

crm_kit::both_backends!(env =>
    people_crud,
    companies_crud,
    duplicates_are_refused_naming_the_holder,
    check_duplicates_reports_matches,
    revisions_record_every_change,
    stale_etag_is_aborted,
    bad_input_lists_field_violations,
    filters_and_search,
    walks_binding_nothing_else_are_kept,
    tag_walks_follow_the_stage,
    tag_walks_follow_every_order,
    later_pages_of_kept_walks_settle_on_one_plan,
    pagination_is_stable_under_concurrent_inserts,
    create_is_idempotent_by_request_id,
    request_ids_are_scoped_to_the_caller,
    company_with_people_cannot_be_deleted,
    concurrent_creates_of_one_phone_admit_one,
    listings_do_not_depend_on_the_window,
    phones_are_found_however_they_are_typed,
    word_search_estimates_see_rarer_fragments,
    data_scope_limits_every_call,
    owners_are_assigned_within_scope,
    owners_must_be_active_users,
    permissions_are_required,
    nothing_leaks_outside_the_scope,
    activities_move_the_last_activity,
    customers_are_looked_up_in_one_call,
    won_deals_make_the_purchase_history,
);

/// The fields named by an INVALID_ARGUMENT's `google.rpc.BadRequest`.
pub fn fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status.get_details_bad_request().expect("BadRequest").field_violations.into_iter().map(|v| v.field).collect()
}

pub fn person(name: &str, phone: &str, email: &str) -> Person {
    Person {
        full_name: name.into(),
        phones: vec![Phone { number: phone.into(), ..Default::default() }],
        emails: vec![Email { address: email.into(), label: "work".into() }],
        stage: LifecycleStage::Lead as i32,
        ..Default::default()
    }
}

pub async fn create_person(api: &ContactsApi, p: Person) -> Result<Person, Status> {
    api.create_person(req(CreatePersonRequest { person: Some(p), request_id: String::new() }))
        .await
        .map(|r| r.into_inner())
}

pub async fn create_company(api: &ContactsApi, name: &str) -> Company {
    let company = Company { name: name.into(), industry: "retail".into(), ..Default::default() };
    api.create_company(req(CreateCompanyRequest { company: Some(company), request_id: String::new() }))
        .await
        .expect("create company")
        .into_inner()
}

pub async fn list_people(
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

/// The names on every page of a listing, `size` at a time, in the order listed.
pub async fn all_names(api: &ContactsApi, filter: &str, query: &str, order_by: &str, size: i32) -> Vec<String> {
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_people(api, filter, query, order_by, size, &token).await.unwrap();
        names.extend(page.people.into_iter().map(|p| p.full_name));
        if page.next_page_token.is_empty() {
            return names;
        }
        token = page.next_page_token;
    }
}

pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

pub async fn person_as(api: &ContactsApi, user: &str, name: &str, phone: &str) -> Person {
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

pub fn rw<T>(user: &str, message: T) -> Request<T> {
    as_user(user, &[CONTACTS_READ, CONTACTS_WRITE], message)
}

pub async fn visible_names(api: &ContactsApi, user: &str, query: &str) -> Vec<String> {
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
