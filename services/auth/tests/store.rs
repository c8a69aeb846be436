//! Every auth call, run against both backends through the API layer (validation, permissions,
//! domain rules and SQL together). Callers are real: they sign in, and their access tokens are
//! verified with the service's own key source, exactly as the authentication layer does.
//! PostgreSQL comes from CRM_TEST_POSTGRES_URL (a fresh database per test); SQLite from a
//! temporary file.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crm_auth::bootstrap::{ADMINISTRATOR, EXECUTIVE, HEAD_OF_DEPARTMENT, HEAD_OFFICE, SALESPERSON};
use crm_auth::{AuthApi, KeyRing, Settings, Store, StoreKeys};
use crm_kit::auth::{CONTACTS_READ, CONTACTS_WRITE, ORG_ADMIN, ORG_READ, PERMISSIONS, Principal, Verifier};
use crm_kit::testing::TestDb;
use crm_proto::auth::v1::auth_service_server::AuthService;
use crm_proto::auth::v1::org_service_server::OrgService;
use crm_proto::auth::v1::*;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const ADMIN_EMAIL: &str = "admin@example.com";
const ADMIN_PASSWORD: &str = "first admin password";
const PASSWORD: &str = "a good long password";
const LOCKOUT: Duration = Duration::from_millis(1500);

fn settings() -> Settings {
    Settings {
        access_token_ttl: Duration::from_secs(900),
        refresh_token_ttl: Duration::from_secs(3600),
        max_failed_sign_ins: 3,
        lockout: LOCKOUT,
    }
}

struct Env {
    api: AuthApi,
    store: Store,
    verifier: Verifier,
    admin: Principal,
    _db: TestDb,
}

async fn api_over(store: &Store) -> AuthApi {
    let keys = KeyRing::open(store.clone()).await.expect("signing key");
    AuthApi::new(store.clone(), keys, settings())
}

/// A bootstrapped organisation and its administrator, signed in.
async fn env(db: TestDb) -> Env {
    let store = Store::open(db.url(), 8).await.expect("open store");
    let boot = crm_auth::bootstrap(&store, ADMIN_EMAIL, Some(ADMIN_PASSWORD.into())).await.expect("bootstrap");
    assert!(boot.created && boot.generated_password.is_none());
    let api = api_over(&store).await;
    let verifier = api.verifier();
    let pair = sign_in(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await.expect("administrator signs in");
    let admin = verifier.verify(&pair.access_token).await.expect("token verifies");
    Env { api, store, verifier, admin, _db: db }
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(crm_kit::testing::TestDb::sqlite()).await }) *
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(crm_kit::testing::TestDb::postgres().await).await }) *
        }
    };
}

both_backends!(
    bootstrap_runs_once_even_when_raced,
    sign_in_fails_uniformly_and_locks_out,
    refresh_rotates_and_reuse_revokes_the_family,
    concurrent_refreshes_admit_at_most_one,
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

// ----- helpers -----

fn req<T>(principal: &Principal, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(principal.clone());
    request
}

async fn sign_in(api: &AuthApi, email: &str, password: &str) -> Result<TokenPair, Status> {
    AuthService::sign_in(api, Request::new(SignInRequest { email: email.into(), password: password.into() }))
        .await
        .map(|r| r.into_inner())
}

async fn refresh(api: &AuthApi, token: &str) -> Result<TokenPair, Status> {
    api.refresh(Request::new(RefreshRequest { refresh_token: token.into() })).await.map(|r| r.into_inner())
}

async fn login(env: &Env, email: &str, password: &str) -> Principal {
    let pair = sign_in(&env.api, email, password).await.expect("signs in");
    env.verifier.verify(&pair.access_token).await.expect("token verifies")
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

fn fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status.get_details_bad_request().expect("BadRequest").field_violations.into_iter().map(|v| v.field).collect()
}

async fn role_id(env: &Env, name: &str) -> String {
    let roles = env.api.list_roles(req(&env.admin, ListRolesRequest::default())).await.unwrap().into_inner().roles;
    roles.into_iter().find(|r| r.name == name).unwrap_or_else(|| panic!("role {name}")).id
}

async fn head_office(env: &Env) -> Department {
    let filter = ListDepartmentsRequest { filter: "parent_id = \"\"".into(), ..Default::default() };
    let page = env.api.list_departments(req(&env.admin, filter)).await.unwrap().into_inner();
    page.departments.into_iter().find(|d| d.name == HEAD_OFFICE).expect("head office")
}

async fn create_department(env: &Env, name: &str, parent_id: &str) -> Department {
    let department = Department { name: name.into(), parent_id: parent_id.into(), ..Default::default() };
    env.api
        .create_department(req(&env.admin, CreateDepartmentRequest { department: Some(department) }))
        .await
        .expect("create department")
        .into_inner()
}

async fn try_create_user(
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

async fn create_user(env: &Env, email: &str, name: &str, department_id: &str, roles: &[&str]) -> User {
    try_create_user(env, email, name, department_id, roles).await.expect("create user")
}

async fn update_user(env: &Env, user: User, paths: &[&str]) -> Result<User, Status> {
    env.api
        .update_user(req(&env.admin, UpdateUserRequest { user: Some(user), update_mask: mask(paths) }))
        .await
        .map(|r| r.into_inner())
}

async fn visibility(env: &Env, principal: &Principal) -> Result<Visibility, Status> {
    env.api.resolve_visibility(req(principal, ResolveVisibilityRequest {})).await.map(|r| r.into_inner())
}

async fn events(env: &Env, filter: &str) -> Vec<SecurityEvent> {
    let request = ListSecurityEventsRequest { filter: filter.into(), page_size: 1000, ..Default::default() };
    env.api.list_security_events(req(&env.admin, request)).await.expect("list events").into_inner().events
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let json: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    json["kid"].as_str().expect("kid").to_string()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

// ----- tests -----

async fn bootstrap_runs_once_even_when_raced(db: TestDb) {
    let (a, b) = (Store::open(db.url(), 4).await.unwrap(), Store::open(db.url(), 4).await.unwrap());
    let (x, y) = tokio::join!(
        crm_auth::bootstrap(&a, " Boss@Example.com ", None),
        crm_auth::bootstrap(&b, "boss@example.com", None)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(u8::from(x.created) + u8::from(y.created), 1, "exactly one replica creates the organisation");
    let created = if x.created { x } else { y };
    assert_eq!(created.email, "boss@example.com");
    let password = created.generated_password.clone().expect("a generated password");
    assert_eq!(password.chars().count(), 20);
    let notice = crm_auth::generated_password_notice(&created).unwrap();
    assert!(notice.contains(&password) && notice.contains("boss@example.com"));

    let again = crm_auth::bootstrap(&a, "other@example.com", Some("another password".into())).await.unwrap();
    assert!(!again.created && again.generated_password.is_none());
    assert!(crm_auth::bootstrap(&a, "not an address", None).await.is_err());

    // Two replicas starting at once agree on one signing key.
    let (k1, k2) = tokio::join!(KeyRing::open(a.clone()), KeyRing::open(b.clone()));
    assert_eq!(k1.unwrap().current().await.unwrap().kid(), k2.unwrap().current().await.unwrap().kid());
    assert_eq!(a.published_keys(i64::MAX).await.unwrap().len(), 1);

    let api = api_over(&a).await;
    let pair = sign_in(&api, "BOSS@example.com", &password).await.expect("the administrator signs in");
    let admin = api.verifier().verify(&pair.access_token).await.unwrap();
    assert_eq!(admin.permissions, PERMISSIONS);
    assert_eq!(admin.name, "Administrator");

    let roles = api.list_roles(req(&admin, ListRolesRequest::default())).await.unwrap().into_inner().roles;
    let summary: Vec<(String, Vec<String>, i32)> =
        roles.into_iter().map(|r| (r.name, r.permissions, r.data_scope)).collect();
    let strings = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        summary,
        vec![
            (ADMINISTRATOR.into(), strings(PERMISSIONS), DataScope::All as i32),
            (EXECUTIVE.into(), strings(&[CONTACTS_READ, CONTACTS_WRITE, ORG_READ]), DataScope::All as i32),
            (
                HEAD_OF_DEPARTMENT.into(),
                strings(&[CONTACTS_READ, CONTACTS_WRITE, ORG_READ]),
                DataScope::DepartmentTree as i32
            ),
            (SALESPERSON.into(), strings(&[CONTACTS_READ, CONTACTS_WRITE]), DataScope::Own as i32),
        ]
    );
    let departments =
        api.list_departments(req(&admin, ListDepartmentsRequest::default())).await.unwrap().into_inner().departments;
    assert_eq!(departments.len(), 1);
    assert_eq!(departments[0].name, HEAD_OFFICE);
    assert_eq!(admin.department_id, departments[0].id);
}

async fn sign_in_fails_uniformly_and_locks_out(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = role_id(&env, SALESPERSON).await;
    let anna = create_user(&env, "Anna@Example.com", "Anna", &office.id, &[&sales]).await;

    let pair = sign_in(&env.api, "  ANNA@example.com ", PASSWORD).await.expect("e-mail is normalised");
    assert_eq!(pair.token_type, "Bearer");
    assert!(!pair.refresh_token.is_empty());
    let access_expiry = pair.access_token_expire_time.unwrap().seconds;
    let refresh_expiry = pair.refresh_token_expire_time.unwrap().seconds;
    assert!(access_expiry < refresh_expiry);
    let principal = env.verifier.verify(&pair.access_token).await.unwrap();
    assert_eq!(principal.subject, anna.id);
    assert!(!principal.service_account);
    assert_eq!((principal.email.as_str(), principal.name.as_str()), ("anna@example.com", "Anna"));
    assert_eq!(principal.department_id, office.id);
    assert_eq!(principal.permissions, [CONTACTS_READ, CONTACTS_WRITE]);

    let unknown = sign_in(&env.api, "nobody@example.com", PASSWORD).await.unwrap_err();
    let wrong = sign_in(&env.api, "anna@example.com", "not the password").await.unwrap_err();
    let empty = sign_in(&env.api, "", "").await.unwrap_err();
    for status in [&unknown, &wrong, &empty] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), unknown.message(), "one answer for every failure");
    }

    // max_failed_sign_ins = 3: the third consecutive failure locks (the one above counted).
    for _ in 0..2 {
        sign_in(&env.api, "anna@example.com", "still wrong!").await.unwrap_err();
    }
    let locked = sign_in(&env.api, "anna@example.com", PASSWORD).await.unwrap_err();
    assert_eq!((locked.code(), locked.message()), (Code::Unauthenticated, unknown.message()));
    tokio::time::sleep(LOCKOUT + Duration::from_millis(200)).await;
    sign_in(&env.api, "anna@example.com", PASSWORD).await.expect("the lock-out is over");

    // A success resets the count: two failures do not lock.
    for _ in 0..2 {
        sign_in(&env.api, "anna@example.com", "wrong again").await.unwrap_err();
    }
    sign_in(&env.api, "anna@example.com", PASSWORD).await.expect("not locked");

    let failed = events(&env, "type = sign_in_failed").await;
    assert!(failed.iter().any(|e| e.email == "nobody@example.com" && e.user_id.is_empty()));
    assert!(failed.iter().any(|e| e.user_id == anna.id && e.detail == "wrong password"));
    assert!(failed.iter().any(|e| e.user_id == anna.id && e.detail == "the account is locked"));
    let locked_out = events(&env, "type = locked_out").await;
    assert_eq!(locked_out.len(), 1);
    assert_eq!(locked_out[0].user_id, anna.id);
    let signed_in = events(&env, &format!("type = sign_in AND user_id = \"{}\"", anna.id)).await;
    assert_eq!(signed_in.len(), 3);
    assert_eq!(signed_in[0].actor_id, anna.id);
}

async fn refresh_rotates_and_reuse_revokes_the_family(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = role_id(&env, SALESPERSON).await;
    let executive = role_id(&env, EXECUTIVE).await;
    let anna = create_user(&env, "anna@example.com", "Anna", &office.id, &[&sales]).await;

    let first = sign_in(&env.api, "anna@example.com", PASSWORD).await.unwrap();
    let second = refresh(&env.api, &first.refresh_token).await.expect("exchanged");
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    let principal = env.verifier.verify(&second.access_token).await.unwrap();
    assert_eq!(principal.subject, anna.id);

    // The new pair carries the user's roles as they are now.
    let mut patch = User { id: anna.id.clone(), role_ids: vec![executive.clone()], ..Default::default() };
    patch.etag = String::new();
    update_user(&env, patch, &["role_ids"]).await.unwrap();
    let third = refresh(&env.api, &second.refresh_token).await.expect("exchanged again");
    let principal = env.verifier.verify(&third.access_token).await.unwrap();
    assert_eq!(principal.permissions, [CONTACTS_READ, CONTACTS_WRITE, ORG_READ]);

    // Presenting a used-up token revokes the whole sign-in, the newest token included.
    let reused = refresh(&env.api, &first.refresh_token).await.unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated);
    let newest = refresh(&env.api, &third.refresh_token).await.unwrap_err();
    assert_eq!(newest.code(), Code::Unauthenticated);
    assert_eq!(newest.message(), reused.message());
    let reuse = events(&env, "type = refresh_reuse").await;
    assert_eq!(reuse.len(), 1);
    assert_eq!(reuse[0].user_id, anna.id);

    // Other sign-ins of the same user are untouched.
    let other = sign_in(&env.api, "anna@example.com", PASSWORD).await.unwrap();
    refresh(&env.api, &other.refresh_token).await.expect("a separate sign-in");

    // Expired tokens are purged; a purged token is simply unknown.
    let later = crm_kit::time::now_micros() + 2 * 3600 * 1_000_000;
    assert!(env.store.purge_expired(later).await.unwrap() > 0);
    assert_eq!(refresh(&env.api, &other.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);

    for junk in ["", "junk", &"x".repeat(5000)] {
        let status = refresh(&env.api, junk).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Unauthenticated, reused.message()));
    }
}

async fn concurrent_refreshes_admit_at_most_one(db: TestDb) {
    let env = env(db).await;
    for _ in 0..3 {
        let pair = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
        let (a, b) = (env.api.clone(), env.api.clone());
        let (t1, t2) = (pair.refresh_token.clone(), pair.refresh_token.clone());
        let (x, y) = tokio::join!(
            tokio::spawn(async move { refresh(&a, &t1).await }),
            tokio::spawn(async move { refresh(&b, &t2).await })
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(!(x.is_ok() && y.is_ok()), "one refresh token exchanged twice");
        assert!(x.is_ok() || y.is_ok(), "one of them wins");
    }
}

async fn sign_out_revokes_the_sign_in(db: TestDb) {
    let env = env(db).await;
    let pair = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let next = refresh(&env.api, &pair.refresh_token).await.unwrap();
    // Signing out with an older token of the sign-in revokes the newer ones too.
    env.api.sign_out(Request::new(SignOutRequest { refresh_token: pair.refresh_token.clone() })).await.unwrap();
    assert_eq!(refresh(&env.api, &next.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    // Unknown tokens are fine and tell nothing.
    env.api.sign_out(Request::new(SignOutRequest { refresh_token: "never issued".into() })).await.unwrap();
    env.api.sign_out(Request::new(SignOutRequest { refresh_token: String::new() })).await.unwrap();
    let signed_out = events(&env, "type = sign_out").await;
    assert_eq!(signed_out.len(), 1);
    assert_eq!(signed_out[0].user_id, env.admin.subject);
}

async fn service_accounts_get_tokens(db: TestDb) {
    let env = env(db).await;
    let reader = Role {
        name: "Integration".into(),
        permissions: vec![CONTACTS_READ.into()],
        data_scope: DataScope::All as i32,
        ..Default::default()
    };
    let reader =
        env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(reader) })).await.unwrap().into_inner();
    let sales = role_id(&env, SALESPERSON).await;
    let create = |name: &str, role: &str| {
        let account = ServiceAccount { name: name.into(), role_ids: vec![role.into()], ..Default::default() };
        env.api.create_service_account(req(&env.admin, CreateServiceAccountRequest { service_account: Some(account) }))
    };
    let created = create("deals sync", &reader.id).await.unwrap().into_inner();
    let account = created.service_account.unwrap();
    assert!(account.client_id.starts_with("svc-"));
    assert_eq!(created.client_secret.len(), 43);
    assert_eq!(account.role_ids, vec![reader.id.clone()]);
    let narrow = create("reports", &sales).await.unwrap().into_inner();

    let issue = |client_id: &str, secret: &str| {
        env.api.issue_service_token(Request::new(IssueServiceTokenRequest {
            client_id: client_id.into(),
            client_secret: secret.into(),
        }))
    };
    let pair = issue(&account.client_id, &created.client_secret).await.unwrap().into_inner();
    assert!(pair.refresh_token.is_empty() && pair.refresh_token_expire_time.is_none());
    let principal = env.verifier.verify(&pair.access_token).await.unwrap();
    assert!(principal.service_account);
    assert_eq!(principal.subject, account.id);
    assert_eq!(principal.name, "deals sync");
    assert_eq!(principal.permissions, [CONTACTS_READ]);
    let seen = visibility(&env, &principal).await.unwrap();
    assert!(seen.all);
    let me = env.api.get_me(req(&principal, GetMeRequest {})).await.unwrap().into_inner();
    assert!(me.service_account);
    assert_eq!(me.data_scope, DataScope::All as i32);

    let narrow_account = narrow.service_account.unwrap();
    let narrow_pair = issue(&narrow_account.client_id, &narrow.client_secret).await.unwrap().into_inner();
    let narrow_principal = env.verifier.verify(&narrow_pair.access_token).await.unwrap();
    let seen = visibility(&env, &narrow_principal).await.unwrap();
    assert!(!seen.all);
    assert_eq!(seen.owner_ids, vec![narrow_account.id.clone()]);

    let wrong_secret = issue(&account.client_id, &narrow.client_secret).await.unwrap_err();
    let unknown = issue("svc-unknown", &created.client_secret).await.unwrap_err();
    let empty = issue("", "").await.unwrap_err();
    for status in [&wrong_secret, &unknown, &empty] {
        assert_eq!((status.code(), status.message()), (Code::Unauthenticated, wrong_secret.message()));
    }

    let listed = env
        .api
        .list_service_accounts(req(&env.admin, ListServiceAccountsRequest { page_size: 1, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.service_accounts.len(), 1);
    assert_eq!(listed.service_accounts[0].name, "deals sync");
    let rest = env
        .api
        .list_service_accounts(req(
            &env.admin,
            ListServiceAccountsRequest { page_size: 1, page_token: listed.next_page_token },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.service_accounts[0].name, "reports");
    assert!(rest.next_page_token.is_empty());

    env.api
        .delete_service_account(req(&env.admin, DeleteServiceAccountRequest { id: account.id.clone() }))
        .await
        .unwrap();
    let gone = issue(&account.client_id, &created.client_secret).await.unwrap_err();
    assert_eq!(gone.code(), Code::Unauthenticated);
    // Tokens already issued expire on their own, but the deleted account is no longer anyone.
    assert_eq!(visibility(&env, &principal).await.unwrap_err().code(), Code::Unauthenticated);
    let deleted = env
        .api
        .delete_service_account(req(&env.admin, DeleteServiceAccountRequest { id: account.id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(deleted.code(), Code::NotFound);

    assert_eq!(events(&env, "type = service_account_created").await.len(), 2);
    assert_eq!(events(&env, "type = service_account_deleted").await.len(), 1);
    assert_eq!(events(&env, &format!("type = service_token_issued AND actor_id = \"{}\"", account.id)).await.len(), 1);
    assert_eq!(events(&env, "type = service_token_failed").await.len(), 4);
}

async fn departments_crud_with_etags_and_no_cycles(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = create_department(&env, " Sales ", &office.id).await;
    assert_eq!(
        (sales.name.as_str(), sales.parent_id.as_str(), sales.etag.as_str()),
        ("Sales", office.id.as_str(), "1")
    );
    let east = create_department(&env, "Sales East", &sales.id).await;
    let west = create_department(&env, "Sales West", &sales.id).await;
    let got = env
        .api
        .get_department(req(&env.admin, GetDepartmentRequest { id: sales.id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, sales);

    let children = env
        .api
        .list_departments(req(
            &env.admin,
            ListDepartmentsRequest {
                filter: format!("parent_id = \"{}\"", sales.id),
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(children.departments, vec![east.clone()]);
    let next = env
        .api
        .list_departments(req(
            &env.admin,
            ListDepartmentsRequest {
                filter: format!("parent_id = \"{}\"", sales.id),
                page_size: 1,
                page_token: children.next_page_token.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.departments, vec![west.clone()]);
    assert!(next.next_page_token.is_empty());
    let replayed = env
        .api
        .list_departments(req(
            &env.admin,
            ListDepartmentsRequest { page_token: children.next_page_token, ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&replayed), ["page_token"]);

    let update = |department: Department, paths: &[&str]| {
        env.api.update_department(req(
            &env.admin,
            UpdateDepartmentRequest { department: Some(department), update_mask: mask(paths) },
        ))
    };
    let renamed = update(
        Department { id: east.id.clone(), etag: "1".into(), name: "East".into(), ..Default::default() },
        &["name"],
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (renamed.name.as_str(), renamed.parent_id.as_str(), renamed.etag.as_str()),
        ("East", sales.id.as_str(), "2")
    );
    let stale = update(
        Department { id: east.id.clone(), etag: "1".into(), name: "Stale".into(), ..Default::default() },
        &["name"],
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    // Under itself, or under anything below it: refused.
    for parent in [&sales.id, &east.id] {
        let cycle = update(
            Department { id: sales.id.clone(), parent_id: parent.clone(), ..Default::default() },
            &["parent_id"],
        )
        .await
        .unwrap_err();
        assert_eq!(fields(&cycle), ["department.parent_id"], "{parent}");
    }
    let unknown = update(
        Department { id: sales.id.clone(), parent_id: crm_kit::validate::new_id(), ..Default::default() },
        &["parent_id"],
    )
    .await
    .unwrap_err();
    assert_eq!(fields(&unknown), ["department.parent_id"]);
    // A legal move: West to the top level, then East under West.
    update(Department { id: west.id.clone(), ..Default::default() }, &["parent_id"]).await.unwrap();
    let moved =
        update(Department { id: east.id.clone(), parent_id: west.id.clone(), ..Default::default() }, &["parent_id"])
            .await
            .unwrap()
            .into_inner();
    assert_eq!(moved.parent_id, west.id);
    assert_eq!(events(&env, "type = department_moved").await.len(), 2);

    let delete = |id: &str, etag: &str| {
        env.api.delete_department(req(&env.admin, DeleteDepartmentRequest { id: id.into(), etag: etag.into() }))
    };
    assert_eq!(delete(&west.id, "").await.unwrap_err().code(), Code::FailedPrecondition, "it has a sub-department");
    create_user(&env, "east@example.com", "East person", &east.id, &[]).await;
    assert_eq!(delete(&east.id, "").await.unwrap_err().code(), Code::FailedPrecondition, "it has a user");
    assert_eq!(delete(&sales.id, "7").await.unwrap_err().code(), Code::Aborted);
    delete(&sales.id, &sales.etag).await.expect("empty department");
    let gone =
        env.api.get_department(req(&env.admin, GetDepartmentRequest { id: sales.id.clone() })).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let under_gone = Department { name: "Orphan".into(), parent_id: sales.id.clone(), ..Default::default() };
    let err = env
        .api
        .create_department(req(&env.admin, CreateDepartmentRequest { department: Some(under_gone) }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["department.parent_id"]);
}

async fn users_crud_with_etags_and_references(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales_dept = create_department(&env, "Sales", &office.id).await;
    let sales = role_id(&env, SALESPERSON).await;
    let head = role_id(&env, HEAD_OF_DEPARTMENT).await;
    let boss = create_user(&env, "boss@example.com", "Boss", &sales_dept.id, &[&head]).await;
    let user = User {
        email: " Anna@Example.COM ".into(),
        display_name: "Anna".into(),
        phone: " +7 916 000 ".into(),
        department_id: sales_dept.id.clone(),
        supervisor_id: boss.id.clone(),
        role_ids: vec![sales.clone(), sales.clone()],
        active: false,
        ..Default::default()
    };
    let anna = env
        .api
        .create_user(req(&env.admin, CreateUserRequest { user: Some(user), password: PASSWORD.into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(anna.email, "anna@example.com");
    assert_eq!(anna.phone, "+7 916 000");
    assert_eq!(anna.role_ids, vec![sales.clone()]);
    assert!(anna.active, "new users are active");
    assert_eq!(anna.etag, "1");
    uuid::Uuid::parse_str(&anna.id).unwrap();
    let got = env.api.get_user(req(&env.admin, GetUserRequest { id: anna.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, anna);

    let duplicate = try_create_user(&env, "ANNA@example.com", "Other Anna", "", &[]).await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    let info = duplicate.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata.get("record_id"), Some(&anna.id));

    let missing = crm_kit::validate::new_id();
    let err = try_create_user(&env, "x@example.com", "X", &missing, &[&missing]).await.unwrap_err();
    assert_eq!(fields(&err), ["user.department_id"]);
    let err = try_create_user(&env, "x@example.com", "X", "", &[&sales, &missing]).await.unwrap_err();
    let expected = if sales < missing { "user.role_ids[1]" } else { "user.role_ids[0]" };
    assert_eq!(fields(&err), [expected]);

    let patch = User { id: anna.id.clone(), etag: "1".into(), supervisor_id: missing.clone(), ..Default::default() };
    assert_eq!(fields(&update_user(&env, patch, &["supervisor_id"]).await.unwrap_err()), ["user.supervisor_id"]);
    let patch = User { id: anna.id.clone(), supervisor_id: anna.id.clone(), ..Default::default() };
    assert_eq!(fields(&update_user(&env, patch, &["supervisor_id"]).await.unwrap_err()), ["user.supervisor_id"]);
    let patch = User { id: anna.id.clone(), email: "boss@example.com".into(), ..Default::default() };
    assert_eq!(update_user(&env, patch, &["email"]).await.unwrap_err().code(), Code::AlreadyExists);

    let patch = User {
        id: anna.id.clone(),
        etag: "1".into(),
        display_name: "Anna Petrova".into(),
        phone: "ignored".into(),
        ..Default::default()
    };
    let updated = update_user(&env, patch, &["display_name"]).await.unwrap();
    assert_eq!(
        (updated.display_name.as_str(), updated.phone.as_str(), updated.etag.as_str()),
        ("Anna Petrova", "+7 916 000", "2")
    );
    assert_eq!(updated.role_ids, vec![sales.clone()]);
    let stale = User { id: anna.id.clone(), etag: "1".into(), display_name: "Stale".into(), ..Default::default() };
    assert_eq!(update_user(&env, stale, &["display_name"]).await.unwrap_err().code(), Code::Aborted);
    let unchanged = User { id: anna.id.clone(), display_name: "Anna Petrova".into(), ..Default::default() };
    assert_eq!(update_user(&env, unchanged, &["display_name"]).await.unwrap().etag, "2", "no change, no new version");

    // Many users, listed by name in pages, filtered.
    for i in 0..5 {
        create_user(&env, &format!("rep{i}@example.com"), &format!("Rep {i}"), &sales_dept.id, &[&sales]).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = env
            .api
            .list_users(req(
                &env.admin,
                ListUsersRequest {
                    filter: format!("department_id = \"{}\"", sales_dept.id),
                    page_size: 2,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.users.into_iter().map(|u| u.display_name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["Anna Petrova", "Boss", "Rep 0", "Rep 1", "Rep 2", "Rep 3", "Rep 4"]);
    let list = |filter: &str| {
        env.api.list_users(req(&env.admin, ListUsersRequest { filter: filter.into(), ..Default::default() }))
    };
    let by_email = list("email = \"ANNA@example.com\"").await.unwrap().into_inner().users;
    assert_eq!(by_email.len(), 1);
    assert_eq!(by_email[0].role_ids, vec![sales.clone()]);
    let reports = list(&format!("supervisor_id = \"{}\"", boss.id)).await.unwrap().into_inner().users;
    assert_eq!(reports.iter().map(|u| u.id.clone()).collect::<Vec<_>>(), vec![anna.id.clone()]);
    let deactivate = User { id: anna.id.clone(), active: false, ..Default::default() };
    update_user(&env, deactivate, &["active"]).await.unwrap();
    let inactive = list("active = false").await.unwrap().into_inner().users;
    assert_eq!(inactive.iter().map(|u| u.email.clone()).collect::<Vec<_>>(), ["anna@example.com"]);
    assert_eq!(list("active = true").await.unwrap().into_inner().users.len(), 7);
    assert_eq!(fields(&list("name = x").await.unwrap_err()), ["filter"]);
    assert_eq!(
        env.api.get_user(req(&env.admin, GetUserRequest { id: missing })).await.unwrap_err().code(),
        Code::NotFound
    );

    let changed = events(&env, &format!("user_id = \"{}\"", anna.id)).await;
    let kinds: Vec<&str> = changed.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(kinds, ["user_deactivated", "user_changed", "user_created"]);
    assert!(changed.iter().all(|e| e.actor_id == env.admin.subject));
}

async fn roles_crud_and_held_roles_stay(db: TestDb) {
    let env = env(db).await;
    let role = Role {
        name: "Auditor".into(),
        permissions: vec![ORG_READ.into(), CONTACTS_READ.into()],
        data_scope: DataScope::Department as i32,
        ..Default::default()
    };
    let auditor =
        env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(role) })).await.unwrap().into_inner();
    assert_eq!(auditor.permissions, [CONTACTS_READ, ORG_READ]);
    assert_eq!(auditor.etag, "1");
    let again = Role { name: " auditor ".into(), data_scope: DataScope::Own as i32, ..Default::default() };
    let duplicate = env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(again) })).await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    let update = |role: Role, paths: &[&str]| {
        env.api.update_role(req(&env.admin, UpdateRoleRequest { role: Some(role), update_mask: mask(paths) }))
    };
    let patch = Role {
        id: auditor.id.clone(),
        etag: "1".into(),
        data_scope: DataScope::DepartmentTree as i32,
        name: "ignored".into(),
        ..Default::default()
    };
    let changed = update(patch, &["data_scope"]).await.unwrap().into_inner();
    assert_eq!(
        (changed.name.as_str(), changed.data_scope, changed.etag.as_str()),
        ("Auditor", DataScope::DepartmentTree as i32, "2")
    );
    let stale = Role { id: auditor.id.clone(), etag: "1".into(), name: "Stale".into(), ..Default::default() };
    assert_eq!(update(stale, &["name"]).await.unwrap_err().code(), Code::Aborted);
    let clash = Role { id: auditor.id.clone(), name: "SALESPERSON".into(), ..Default::default() };
    assert_eq!(update(clash, &["name"]).await.unwrap_err().code(), Code::AlreadyExists);
    let unspecified = Role { id: auditor.id.clone(), ..Default::default() };
    assert_eq!(fields(&update(unspecified, &["data_scope"]).await.unwrap_err()), ["role.data_scope"]);
    let got = env.api.get_role(req(&env.admin, GetRoleRequest { id: auditor.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, changed);

    let page = env
        .api
        .list_roles(req(&env.admin, ListRolesRequest { page_size: 2, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.roles.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), [ADMINISTRATOR, "Auditor"]);
    assert!(!page.next_page_token.is_empty());

    let user = create_user(&env, "aud@example.com", "Aud", "", &[&auditor.id]).await;
    let delete = |etag: &str| {
        env.api.delete_role(req(&env.admin, DeleteRoleRequest { id: auditor.id.clone(), etag: etag.into() }))
    };
    assert_eq!(delete("").await.unwrap_err().code(), Code::FailedPrecondition);
    update_user(&env, User { id: user.id.clone(), ..Default::default() }, &["role_ids"]).await.unwrap();
    assert_eq!(delete("1").await.unwrap_err().code(), Code::Aborted);
    delete("2").await.expect("nobody holds it");
    let gone = env.api.get_role(req(&env.admin, GetRoleRequest { id: auditor.id.clone() })).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let changes = events(&env, "type = role_changed").await;
    assert_eq!(changes.len(), 1);
    assert!(changes[0].detail.contains("DEPARTMENT -> DEPARTMENT_TREE"), "{}", changes[0].detail);
    assert_eq!(events(&env, "type = role_created").await.len(), 1);
    assert_eq!(events(&env, "type = role_deleted").await.len(), 1);
    let roles_changed = events(&env, "type = user_roles_changed").await;
    assert_eq!(roles_changed.len(), 1);
    assert_eq!(roles_changed[0].detail, "roles [Auditor] -> []");
}

async fn visibility_follows_the_organisation(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = create_department(&env, "Sales", &office.id).await;
    let east = create_department(&env, "Sales East", &sales.id).await;
    let lead_role = Role {
        name: "Team lead".into(),
        permissions: vec![CONTACTS_READ.into(), CONTACTS_WRITE.into()],
        data_scope: DataScope::Department as i32,
        ..Default::default()
    };
    let lead_role = env
        .api
        .create_role(req(&env.admin, CreateRoleRequest { role: Some(lead_role) }))
        .await
        .unwrap()
        .into_inner()
        .id;
    let (executive, head, rep) =
        (role_id(&env, EXECUTIVE).await, role_id(&env, HEAD_OF_DEPARTMENT).await, role_id(&env, SALESPERSON).await);

    let ceo = create_user(&env, "ceo@example.com", "CEO", &office.id, &[&executive]).await;
    let h1 = create_user(&env, "h1@example.com", "Head of sales", &sales.id, &[&head]).await;
    let s1 = create_user(&env, "s1@example.com", "Rep 1", &sales.id, &[&rep]).await;
    let h2 = create_user(&env, "h2@example.com", "Head of east", &east.id, &[&lead_role, &rep]).await;
    let s2 = create_user(&env, "s2@example.com", "Rep 2", &east.id, &[&rep]).await;
    let s3 = create_user(&env, "s3@example.com", "Rep 3", &east.id, &[&rep]).await;
    let gone = create_user(&env, "s4@example.com", "Rep 4", &east.id, &[&rep]).await;
    let nobody = create_user(&env, "s5@example.com", "Rep 5", "", &[]).await;
    update_user(&env, User { id: gone.id.clone(), ..Default::default() }, &["active"]).await.unwrap();

    let (p_ceo, p_h1, p_h2, p_s2, p_nobody) = (
        login(&env, "ceo@example.com", PASSWORD).await,
        login(&env, "h1@example.com", PASSWORD).await,
        login(&env, "h2@example.com", PASSWORD).await,
        login(&env, "s2@example.com", PASSWORD).await,
        login(&env, "s5@example.com", PASSWORD).await,
    );
    let ceo_sees = visibility(&env, &p_ceo).await.unwrap();
    assert!(ceo_sees.all && ceo_sees.owner_ids.is_empty());
    assert_eq!(ceo_sees.data_scope, DataScope::All as i32);
    let ids = |users: &[&User]| sorted(users.iter().map(|u| u.id.clone()).collect());

    let h1_sees = visibility(&env, &p_h1).await.unwrap();
    assert!(!h1_sees.all);
    assert_eq!(h1_sees.data_scope, DataScope::DepartmentTree as i32);
    assert_eq!(h1_sees.owner_ids, ids(&[&h1, &s1, &h2, &s2, &s3, &gone]), "the subtree, people who left included");
    let h2_sees = visibility(&env, &p_h2).await.unwrap();
    assert_eq!(h2_sees.data_scope, DataScope::Department as i32);
    assert_eq!(h2_sees.owner_ids, ids(&[&h2, &s2, &s3, &gone]));
    let s2_sees = visibility(&env, &p_s2).await.unwrap();
    assert_eq!((s2_sees.owner_ids.clone(), s2_sees.data_scope), (vec![s2.id.clone()], DataScope::Own as i32));
    assert_eq!(visibility(&env, &p_nobody).await.unwrap().owner_ids, vec![nobody.id.clone()], "no roles: own");

    // Moving a user changes what others see at once, token or no token.
    update_user(
        &env,
        User { id: s3.id.clone(), department_id: sales.id.clone(), ..Default::default() },
        &["department_id"],
    )
    .await
    .unwrap();
    assert_eq!(visibility(&env, &p_h2).await.unwrap().owner_ids, ids(&[&h2, &s2, &gone]));
    assert_eq!(visibility(&env, &p_h1).await.unwrap().owner_ids, ids(&[&h1, &s1, &h2, &s2, &s3, &gone]));
    // The caller's own current department counts, not the one in their token.
    update_user(
        &env,
        User { id: h2.id.clone(), department_id: sales.id.clone(), ..Default::default() },
        &["department_id"],
    )
    .await
    .unwrap();
    assert_eq!(visibility(&env, &p_h2).await.unwrap().owner_ids, ids(&[&h1, &s1, &h2, &s3]));
    // A whole department moving out of the tree leaves the head's view.
    let elsewhere = create_department(&env, "Elsewhere", &office.id).await;
    env.api
        .update_department(req(
            &env.admin,
            UpdateDepartmentRequest {
                department: Some(Department {
                    id: east.id.clone(),
                    parent_id: elsewhere.id.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["parent_id"]),
            },
        ))
        .await
        .unwrap();
    assert_eq!(visibility(&env, &p_h1).await.unwrap().owner_ids, ids(&[&h1, &s1, &h2, &s3]));

    let me = env.api.get_me(req(&p_h1, GetMeRequest {})).await.unwrap().into_inner();
    assert_eq!(me.subject, h1.id);
    assert_eq!(me.display_name, "Head of sales");
    assert_eq!(me.email, "h1@example.com");
    assert_eq!(me.department_id, sales.id);
    assert_eq!(me.permissions, [CONTACTS_READ, CONTACTS_WRITE, ORG_READ]);
    assert_eq!(me.data_scope, DataScope::DepartmentTree as i32);

    // A deactivated caller resolves nothing, even with a token still unexpired.
    update_user(&env, User { id: s2.id.clone(), ..Default::default() }, &["active"]).await.unwrap();
    assert_eq!(visibility(&env, &p_s2).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(env.api.get_me(req(&p_s2, GetMeRequest {})).await.unwrap_err().code(), Code::Unauthenticated);
    let _ = ceo;
}

async fn permissions_are_enforced(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let (executive, rep) = (role_id(&env, EXECUTIVE).await, role_id(&env, SALESPERSON).await);
    create_user(&env, "exec@example.com", "Exec", &office.id, &[&executive]).await;
    let sam = create_user(&env, "sam@example.com", "Sam", &office.id, &[&rep]).await;
    let exec = login(&env, "exec@example.com", PASSWORD).await;
    let salesperson = login(&env, "sam@example.com", PASSWORD).await;
    assert!(exec.has(ORG_READ) && !exec.has(ORG_ADMIN));

    // Reads: org.read or org.admin.
    let get_user = |p: &Principal| env.api.get_user(req(p, GetUserRequest { id: sam.id.clone() }));
    get_user(&exec).await.expect("org.read reads");
    let denied = get_user(&salesperson).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains(ORG_READ), "{}", denied.message());
    assert_eq!(
        env.api.list_roles(req(&salesperson, ListRolesRequest::default())).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    env.api.list_departments(req(&exec, ListDepartmentsRequest::default())).await.expect("org.read lists");
    env.api.list_service_accounts(req(&exec, ListServiceAccountsRequest::default())).await.expect("org.read lists");

    // Changes, the audit and keys: org.admin only.
    let denied = [
        env.api
            .create_department(req(
                &exec,
                CreateDepartmentRequest { department: Some(Department { name: "X".into(), ..Default::default() }) },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        try_create_user_as(&env, &exec).await.unwrap_err(),
        env.api
            .update_user(req(
                &salesperson,
                UpdateUserRequest {
                    user: Some(User { id: sam.id.clone(), role_ids: vec![executive.clone()], ..Default::default() }),
                    update_mask: mask(&["role_ids"]),
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        env.api.list_security_events(req(&exec, ListSecurityEventsRequest::default())).await.map(|_| ()).unwrap_err(),
        env.api.rotate_signing_key(req(&exec, RotateSigningKeyRequest {})).await.map(|_| ()).unwrap_err(),
        env.api
            .delete_role(req(&exec, DeleteRoleRequest { id: rep.clone(), etag: String::new() }))
            .await
            .map(|_| ())
            .unwrap_err(),
        env.api
            .create_service_account(req(
                &exec,
                CreateServiceAccountRequest {
                    service_account: Some(ServiceAccount { name: "x".into(), ..Default::default() }),
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(ORG_ADMIN));
    }

    // Without a principal (the authentication layer let nothing through): UNAUTHENTICATED.
    let anonymous = env.api.get_user(Request::new(GetUserRequest { id: sam.id.clone() })).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert_eq!(env.api.get_me(Request::new(GetMeRequest {})).await.unwrap_err().code(), Code::Unauthenticated);
    // Anyone signed in resolves their own visibility and reads the public keys.
    visibility(&env, &salesperson).await.expect("any caller");
    assert!(!env.api.get_jwks(Request::new(GetJwksRequest {})).await.unwrap().into_inner().keys.is_empty());
}

async fn try_create_user_as(env: &Env, principal: &Principal) -> Result<(), Status> {
    let user = User { email: "new@example.com".into(), display_name: "New".into(), ..Default::default() };
    env.api
        .create_user(req(principal, CreateUserRequest { user: Some(user), password: PASSWORD.into() }))
        .await
        .map(|_| ())
}

async fn passwords_change_and_revoke_sessions(db: TestDb) {
    let env = env(db).await;
    let rep = role_id(&env, SALESPERSON).await;
    let sam = create_user(&env, "sam@example.com", "Sam", "", &[&rep]).await;
    let other = create_user(&env, "kim@example.com", "Kim", "", &[&rep]).await;
    let pair = sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap();
    let me = env.verifier.verify(&pair.access_token).await.unwrap();
    let set = |p: &Principal, user_id: &str, current: &str, new: &str| {
        env.api.set_password(req(
            p,
            SetPasswordRequest { user_id: user_id.into(), current_password: current.into(), new_password: new.into() },
        ))
    };

    let denied = set(&me, &other.id, PASSWORD, "a brand new password").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(fields(&set(&me, &sam.id, "", "a brand new password").await.unwrap_err()), ["current_password"]);
    assert_eq!(fields(&set(&me, &sam.id, PASSWORD, "short").await.unwrap_err()), ["new_password"]);
    assert_eq!(
        fields(&set(&me, &sam.id, "not my password", "a brand new password").await.unwrap_err()),
        ["current_password"]
    );

    set(&me, &sam.id, PASSWORD, "a brand new password").await.expect("own password with the current one");
    assert_eq!(sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    let fresh = sign_in(&env.api, "sam@example.com", "a brand new password").await.expect("the new password");
    assert_eq!(refresh(&env.api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated, "revoked");

    // Administrators set anyone's password without the current one.
    set(&env.admin, &sam.id, "", "set by the administrator").await.unwrap();
    assert_eq!(refresh(&env.api, &fresh.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    sign_in(&env.api, "sam@example.com", "set by the administrator").await.unwrap();
    let missing = set(&env.admin, &crm_kit::validate::new_id(), "", "whatever password").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let changed = events(&env, "type = password_changed").await;
    assert_eq!(changed.len(), 2);
    assert_eq!(
        (changed[0].actor_id.as_str(), changed[0].user_id.as_str()),
        (env.admin.subject.as_str(), sam.id.as_str())
    );
    assert_eq!((changed[1].actor_id.as_str(), changed[1].user_id.as_str()), (sam.id.as_str(), sam.id.as_str()));
    assert_eq!(events(&env, "type = password_change_failed").await.len(), 1);
}

async fn deactivation_revokes_sessions(db: TestDb) {
    let env = env(db).await;
    let rep = role_id(&env, SALESPERSON).await;
    let sam = create_user(&env, "sam@example.com", "Sam", "", &[&rep]).await;
    let pair = sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap();
    let wrong = sign_in(&env.api, "sam@example.com", "wrong password").await.unwrap_err();
    update_user(&env, User { id: sam.id.clone(), ..Default::default() }, &["active"]).await.unwrap();
    assert_eq!(refresh(&env.api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let inactive = sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap_err();
    assert_eq!((inactive.code(), inactive.message()), (Code::Unauthenticated, wrong.message()));
    let deactivated = events(&env, "type = user_deactivated").await;
    assert_eq!(deactivated.len(), 1);
    assert_eq!(deactivated[0].detail, "1 sign-in(s) revoked");

    update_user(&env, User { id: sam.id.clone(), active: true, ..Default::default() }, &["active"]).await.unwrap();
    sign_in(&env.api, "sam@example.com", PASSWORD).await.expect("reactivated");
    assert_eq!(events(&env, "type = user_reactivated").await.len(), 1);

    let myself = User { id: env.admin.subject.clone(), ..Default::default() };
    assert_eq!(update_user(&env, myself, &["active"]).await.unwrap_err().code(), Code::FailedPrecondition);
}

async fn security_events_are_listed_and_filtered(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let team = create_department(&env, "Team", &office.id).await;
    let rep = role_id(&env, SALESPERSON).await;
    let sam = create_user(&env, "sam@example.com", "Sam", &office.id, &[]).await;
    update_user(
        &env,
        User { id: sam.id.clone(), department_id: team.id.clone(), role_ids: vec![rep.clone()], ..Default::default() },
        &["department_id", "role_ids"],
    )
    .await
    .unwrap();
    let mut request = Request::new(SignInRequest { email: "sam@example.com".into(), password: PASSWORD.into() });
    request.metadata_mut().insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
    env.api.sign_in(request).await.unwrap();

    let all = events(&env, "").await;
    let kinds: Vec<&str> = all.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sign_in",
            "user_department_changed",
            "user_roles_changed",
            "user_created",
            "department_created",
            "sign_in",
            "organisation_bootstrapped"
        ],
        "newest first"
    );
    assert_eq!(all[0].client_address, "203.0.113.7");
    assert_eq!(all[0].user_id, sam.id);
    assert!(all.iter().all(|e| !e.id.is_empty() && e.time.is_some()));
    let micros = |e: &SecurityEvent| crm_kit::time::from_timestamp(e.time.as_ref().unwrap());
    assert!(all.windows(2).all(|w| micros(&w[0]) >= micros(&w[1])));
    assert_eq!(all[1].detail, format!("department {:?} -> {:?}", office.id, team.id));
    assert_eq!(all[2].detail, "roles [] -> [Salesperson]");
    assert!(all[1..5].iter().all(|e| e.actor_id == env.admin.subject));

    // Paging one at a time walks the same list.
    let mut walked = Vec::new();
    let mut token = String::new();
    loop {
        let page = env
            .api
            .list_security_events(req(
                &env.admin,
                ListSecurityEventsRequest { page_size: 2, page_token: token.clone(), filter: String::new() },
            ))
            .await
            .unwrap()
            .into_inner();
        walked.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(walked, all);

    let sams = events(&env, &format!("user_id = \"{}\" AND NOT type = sign_in", sam.id)).await;
    assert_eq!(sams.len(), 3);
    let by_admin = events(&env, &format!("actor_id = \"{}\"", env.admin.subject)).await;
    assert_eq!(by_admin.len(), 5);
    let bad = env
        .api
        .list_security_events(req(
            &env.admin,
            ListSecurityEventsRequest { filter: "severity = high".into(), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&bad), ["filter"]);
}

async fn key_rotation_keeps_old_tokens_valid(db: TestDb) {
    let env = env(db).await;
    let replica = KeyRing::open(env.store.clone()).await.unwrap();
    let before = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let old_kid = kid_of(&before.access_token);
    let jwk = env.api.rotate_signing_key(req(&env.admin, RotateSigningKeyRequest {})).await.unwrap().into_inner();
    assert_ne!(jwk.kid, old_kid);
    assert_eq!(
        (jwk.kty.as_str(), jwk.crv.as_str(), jwk.alg.as_str(), jwk.r#use.as_str()),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );

    let published = env.api.get_jwks(Request::new(GetJwksRequest {})).await.unwrap().into_inner();
    let kids: Vec<&str> = published.keys.iter().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids, [jwk.kid.as_str(), old_kid.as_str()], "the retired key stays published");

    let after = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    assert_eq!(kid_of(&after.access_token), jwk.kid, "new tokens carry the new key");
    env.verifier.verify(&before.access_token).await.expect("the old token still verifies");
    env.verifier.verify(&after.access_token).await.expect("the new token verifies");
    // A fresh verifier (another service) verifies both too.
    let fresh = Verifier::new(std::sync::Arc::new(StoreKeys::new(env.store.clone(), settings().access_token_ttl)));
    fresh.verify(&before.access_token).await.unwrap();
    fresh.verify(&after.access_token).await.unwrap();

    // Another replica picks the new key up when it reloads.
    assert_eq!(replica.reload().await.unwrap().kid(), jwk.kid);
    let rotations = events(&env, "type = key_rotated").await;
    assert_eq!(rotations.len(), 1);
    assert!(rotations[0].detail.contains(&old_kid) && rotations[0].detail.contains(&jwk.kid));
    // Keys retired longer ago than tokens live are no longer published.
    assert_eq!(env.store.published_keys(crm_kit::time::now_micros()).await.unwrap().len(), 1);
}

async fn validation_errors_name_fields(db: TestDb) {
    let env = env(db).await;
    let user = User { email: "not-an-email".into(), department_id: "nope".into(), ..Default::default() };
    let err = env
        .api
        .create_user(req(&env.admin, CreateUserRequest { user: Some(user), password: "short".into() }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["user.email", "user.display_name", "user.department_id", "password"]);
    let long = env
        .api
        .create_user(req(
            &env.admin,
            CreateUserRequest {
                user: Some(User { email: "a@example.com".into(), display_name: "A".into(), ..Default::default() }),
                password: "x".repeat(1025),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&long), ["password"]);
    let missing = env.api.create_user(req(&env.admin, CreateUserRequest::default())).await.unwrap_err();
    assert_eq!(fields(&missing), ["user"]);

    let role = Role { name: " ".into(), permissions: vec!["contacts.delete".into()], ..Default::default() };
    let err = env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(role) })).await.unwrap_err();
    assert_eq!(fields(&err), ["role.name", "role.permissions[0]", "role.data_scope"]);
    let bad = err.get_details_bad_request().unwrap();
    assert!(bad.field_violations[1].description.contains("contacts.read"), "lists the valid permissions");

    let department = Department { name: "x".repeat(201), ..Default::default() };
    let err = env
        .api
        .create_department(req(&env.admin, CreateDepartmentRequest { department: Some(department) }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["department.name"]);

    let err = env
        .api
        .update_user(req(
            &env.admin,
            UpdateUserRequest {
                user: Some(User { id: env.admin.subject.clone(), ..Default::default() }),
                update_mask: mask(&["password_hash"]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["update_mask"]);
    let err = env
        .api
        .update_role(req(
            &env.admin,
            UpdateRoleRequest { role: Some(Role { id: "x".into(), ..Default::default() }), update_mask: None },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["role.id"]);
    let err = env.api.get_department(req(&env.admin, GetDepartmentRequest { id: "12".into() })).await.unwrap_err();
    assert_eq!(fields(&err), ["id"]);
    let err = env
        .api
        .list_users(req(&env.admin, ListUsersRequest { page_size: -1, ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["page_size"]);
    let account = ServiceAccount { name: String::new(), role_ids: vec!["x".into()], ..Default::default() };
    let err = env
        .api
        .create_service_account(req(&env.admin, CreateServiceAccountRequest { service_account: Some(account) }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["service_account.name", "service_account.role_ids[0]"]);
}

async fn served_over_grpc_with_authentication(db: TestDb) {
    use crm_proto::auth::v1::auth_service_client::AuthServiceClient;
    use crm_proto::auth::v1::org_service_client::OrgServiceClient;

    let store = Store::open(db.url(), 4).await.unwrap();
    crm_auth::bootstrap(&store, ADMIN_EMAIL, Some(ADMIN_PASSWORD.into())).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = crm_kit::shutdown::channel();
    let server = tokio::spawn(crm_auth::serve(store, settings(), listener, shutdown));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut org = OrgServiceClient::new(channel);
    let pair = auth
        .sign_in(SignInRequest { email: ADMIN_EMAIL.into(), password: ADMIN_PASSWORD.into() })
        .await
        .expect("SignIn needs no token")
        .into_inner();
    auth.get_jwks(GetJwksRequest {}).await.expect("GetJwks needs no token");

    let anonymous = org.list_users(ListUsersRequest::default()).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let mut forged = Request::new(GetMeRequest {});
    forged.metadata_mut().insert("authorization", "Bearer not.a.token".parse().unwrap());
    assert_eq!(auth.get_me(forged).await.unwrap_err().code(), Code::Unauthenticated);

    let bearer = format!("Bearer {}", pair.access_token);
    let mut request = Request::new(GetMeRequest {});
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    let me = auth.get_me(request).await.expect("authenticated").into_inner();
    assert_eq!(me.email, ADMIN_EMAIL);
    let mut request = Request::new(ListUsersRequest::default());
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    assert_eq!(org.list_users(request).await.unwrap().into_inner().users.len(), 1);
    let next = auth.refresh(RefreshRequest { refresh_token: pair.refresh_token }).await.unwrap().into_inner();
    auth.sign_out(SignOutRequest { refresh_token: next.refresh_token }).await.expect("SignOut needs no token");

    trigger.fire();
    server.await.unwrap().expect("serves until shutdown");
}
