//! Every auth call, run against both backends through the API layer (validation, permissions,
//! domain rules and SQL together). Callers are real: they sign in, and their access tokens are
//! verified with the service's own key source, exactly as the authentication layer does.
//! PostgreSQL comes from CRM_TEST_POSTGRES_URL (a fresh database per test); SQLite from a
//! temporary file.

mod access;
mod first_start;
mod organisation;
mod serving;
mod sessions;

use std::time::Duration;

pub use base64::Engine;
pub use base64::engine::general_purpose::URL_SAFE_NO_PAD;
pub use crm_auth::bootstrap::{ADMINISTRATOR, EXECUTIVE, HEAD_OF_DEPARTMENT, HEAD_OFFICE, SALESPERSON};
pub use crm_auth::{AuthApi, KeyRing, Policy, Store, StoreKeys};
pub use crm_kit::auth::{Catalog, Principal, Verifier};
pub use crm_kit::testing::TestDb;
pub use crm_proto::auth::v1::auth_service_server::AuthService;
pub use crm_proto::auth::v1::org_service_server::OrgService;
pub use crm_proto::auth::v1::*;
pub use tonic::{Code, Request, Status};
pub use tonic_types::StatusExt;

use access::*;
use first_start::*;
use organisation::*;
use serving::*;
use sessions::*;

pub const CONTACTS_READ: &str = crm_contacts::permissions::READ.name;
pub const CONTACTS_WRITE: &str = crm_contacts::permissions::WRITE.name;
pub const ORG_READ: &str = crm_auth::permissions::ORG_READ.name;
pub const ORG_ADMIN: &str = crm_auth::permissions::ORG_ADMIN.name;
/// Every permission of the suite, in catalog order (grouped by service).
pub const PERMISSIONS: &[&str] = &[CONTACTS_READ, CONTACTS_WRITE, ORG_READ, ORG_ADMIN];

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const ADMIN_PASSWORD: &str = "first admin password";
pub const PASSWORD: &str = "a good long password";
pub const LOCKOUT: Duration = Duration::from_millis(1500);

/// The permissions of the suite the auth service runs in (auth's own and the contacts
/// service's).
pub fn catalog() -> Catalog {
    Catalog::new(crm_auth::permissions::ALL.iter().chain(crm_contacts::permissions::ALL).copied())
}

pub fn policy() -> Policy {
    Policy {
        access_token_ttl: Duration::from_secs(900),
        refresh_token_ttl: Duration::from_secs(3600),
        max_failed_sign_ins: 3,
        lockout: LOCKOUT,
        refresh_reuse_grace: Duration::from_secs(30),
    }
}

pub struct Env {
    pub api: AuthApi,
    pub store: Store,
    pub verifier: Verifier,
    pub admin: Principal,
    pub _db: TestDb,
}

pub async fn api_over(store: &Store) -> AuthApi {
    let keys = KeyRing::open(store.clone()).await.expect("signing key");
    AuthApi::new(store.clone(), keys, policy(), catalog())
}

/// A bootstrapped organisation and its administrator, signed in.
pub async fn env(db: TestDb) -> Env {
    let store = Store::open(db.url(), 8).await.expect("open store");
    let boot =
        crm_auth::bootstrap(&store, &catalog(), ADMIN_EMAIL, Some(ADMIN_PASSWORD.into())).await.expect("bootstrap");
    assert!(boot.created && boot.generated_password.is_none());
    let api = api_over(&store).await;
    let verifier = api.verifier();
    let pair = sign_in(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await.expect("administrator signs in");
    let admin = verifier.verify(&pair.access_token).await.expect("token verifies");
    Env { api, store, verifier, admin, _db: db }
}

crm_kit::both_backends!(
    bootstrap_runs_once_even_when_raced,
    the_suite_service_account_is_made_sure_of_at_every_start,
    sign_in_fails_uniformly_and_locks_out,
    refresh_rotates_and_reuse_revokes_the_family,
    concurrent_refreshes_share_one_successor,
    reuse_after_the_grace_revokes,
    sign_out_revokes_the_sign_in,
    service_accounts_get_tokens,
    departments_crud_with_etags_and_no_cycles,
    users_crud_with_etags_and_references,
    roles_crud_and_held_roles_stay,
    visibility_follows_the_organisation,
    permissions_are_enforced,
    passwords_change_and_revoke_sessions,
    deactivation_revokes_sessions,
    security_events_are_listed_and_filtered,
    key_rotation_keeps_old_tokens_valid,
    validation_errors_name_fields,
    served_over_grpc_with_authentication,
);

#[test]
fn the_catalog_groups_permissions_by_service() {
    assert_eq!(catalog().names(), PERMISSIONS);
}

pub fn req<T>(principal: &Principal, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(principal.clone());
    request
}

pub async fn sign_in(api: &AuthApi, email: &str, password: &str) -> Result<TokenPair, Status> {
    AuthService::sign_in(api, Request::new(SignInRequest { email: email.into(), password: password.into() }))
        .await
        .map(|r| r.into_inner())
}

pub async fn refresh(api: &AuthApi, token: &str) -> Result<TokenPair, Status> {
    api.refresh(Request::new(RefreshRequest { refresh_token: token.into() })).await.map(|r| r.into_inner())
}

pub async fn login(env: &Env, email: &str, password: &str) -> Principal {
    let pair = sign_in(&env.api, email, password).await.expect("signs in");
    env.verifier.verify(&pair.access_token).await.expect("token verifies")
}

pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

pub fn fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status.get_details_bad_request().expect("BadRequest").field_violations.into_iter().map(|v| v.field).collect()
}

pub async fn role_id(env: &Env, name: &str) -> String {
    let roles = env.api.list_roles(req(&env.admin, ListRolesRequest::default())).await.unwrap().into_inner().roles;
    roles.into_iter().find(|r| r.name == name).unwrap_or_else(|| panic!("role {name}")).id
}

pub async fn head_office(env: &Env) -> Department {
    let filter = ListDepartmentsRequest { filter: "parent_id = \"\"".into(), ..Default::default() };
    let page = env.api.list_departments(req(&env.admin, filter)).await.unwrap().into_inner();
    page.departments.into_iter().find(|d| d.name == HEAD_OFFICE).expect("head office")
}

pub async fn create_department(env: &Env, name: &str, parent_id: &str) -> Department {
    let department = Department { name: name.into(), parent_id: parent_id.into(), ..Default::default() };
    env.api
        .create_department(req(&env.admin, CreateDepartmentRequest { department: Some(department) }))
        .await
        .expect("create department")
        .into_inner()
}

pub async fn try_create_user(
    env: &Env,
    email: &str,
    name: &str,
    department_id: &str,
    roles: &[&str],
) -> Result<User, Status> {
    let user = User {
        email: email.into(),
        display_name: name.into(),
        department_id: department_id.into(),
        role_ids: roles.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    };
    env.api
        .create_user(req(&env.admin, CreateUserRequest { user: Some(user), password: PASSWORD.into() }))
        .await
        .map(|r| r.into_inner())
}

pub async fn create_user(env: &Env, email: &str, name: &str, department_id: &str, roles: &[&str]) -> User {
    try_create_user(env, email, name, department_id, roles).await.expect("create user")
}

pub async fn update_user(env: &Env, user: User, paths: &[&str]) -> Result<User, Status> {
    env.api
        .update_user(req(&env.admin, UpdateUserRequest { user: Some(user), update_mask: mask(paths) }))
        .await
        .map(|r| r.into_inner())
}

pub async fn visibility(env: &Env, principal: &Principal) -> Result<Visibility, Status> {
    env.api.resolve_visibility(req(principal, ResolveVisibilityRequest {})).await.map(|r| r.into_inner())
}

pub async fn events(env: &Env, filter: &str) -> Vec<SecurityEvent> {
    let request = ListSecurityEventsRequest { filter: filter.into(), page_size: 1000, ..Default::default() };
    env.api.list_security_events(req(&env.admin, request)).await.expect("list events").into_inner().events
}

pub fn kid_of(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let json: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    json["kid"].as_str().expect("kid").to_string()
}

pub fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

// ----- tests -----
