//! Sign-in, tokens and data scope end to end (SPEC A1–A4, A6): the real `crm` binary as
//! processes, driven over the network through the gateway, and around it straight to a service
//! where a check must hold there too.
//!
//! - `cluster_signs_in_and_scopes_data`: on PostgreSQL, the visibility matrix of a three-level
//!   organisation, refresh rotation and reuse detection, lock-out, service accounts,
//!   permission denials and signing-key rotation.
//! - `cluster_refuses_every_bad_token`: missing, malformed, tampered, unsigned, foreign and
//!   expired tokens, at the gateway and at each service.
//! - `dev_mode_scopes_data_on_sqlite`: the visibility matrix in `crm dev`.
//! - `dev_mode_prints_a_generated_admin_password_once`.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crm_kit::auth::{Claims, SigningKey};
use crm_proto::auth::v1::org_service_client::OrgServiceClient;
use crm_proto::auth::v1::{
    CreateDepartmentRequest, CreateRoleRequest, CreateServiceAccountRequest, CreateUserRequest, DataScope,
    DeleteServiceAccountRequest, Department, GetJwksRequest, GetMeRequest, IssueServiceTokenRequest, ListRolesRequest,
    ListSecurityEventsRequest, ListServiceAccountsRequest, ListUsersRequest, RefreshRequest, ResolveVisibilityRequest,
    Role, RotateSigningKeyRequest, SecurityEvent, ServiceAccount, SignOutRequest, TokenPair, UpdateDepartmentRequest,
    UpdateUserRequest, User,
};
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::contacts::v1::{
    Company, CreateCompanyRequest, CreatePersonRequest, DeletePersonRequest, Email, GetCompanyRequest,
    GetPersonRequest, LifecycleStage, ListCompaniesRequest, ListPeopleRequest, ListRevisionsRequest, Person, Phone,
    UpdatePersonRequest, revision,
};
use crm_tests::*;
use prost_types::FieldMask;
use tonic::Code;
use tonic_types::StatusExt;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const CONTACTS_READ: &str = crm_contacts::permissions::READ.name;
const CONTACTS_WRITE: &str = crm_contacts::permissions::WRITE.name;
const ORG_READ: &str = crm_auth::permissions::ORG_READ.name;
/// Every permission of the suite.
static PERMISSIONS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| SUITE.catalog().names());

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

fn password_of(email: &str) -> String {
    format!("{email}-secret-1")
}

/// A phone number no other record in the run has.
fn next_phone() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    format!("+7 916 555 {:04}", NEXT.fetch_add(1, Ordering::SeqCst))
}

fn new_person(name: &str, email: &str) -> Person {
    Person {
        full_name: name.into(),
        phones: vec![Phone { number: next_phone(), ..Default::default() }],
        emails: vec![Email { address: email.into(), ..Default::default() }],
        stage: LifecycleStage::Lead as i32,
        ..Default::default()
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
}

/// Part `i` (0 header, 1 payload) of a compact JWT, decoded.
fn jwt_part(token: &str, i: usize) -> serde_json::Value {
    let part = token.split('.').nth(i).unwrap_or_else(|| panic!("a JWT has part {i}: {token}"));
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

fn kid_of(token: &str) -> String {
    jwt_part(token, 0)["kid"].as_str().expect("the token names its key").to_string()
}

fn claims_of(token: &str) -> Claims {
    serde_json::from_value(jwt_part(token, 1)).expect("the payload holds the claims")
}

/// `status` is UNAUTHENTICATED; returns its message.
fn unauthenticated<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) -> String {
    match result {
        Err(status) if status.code() == Code::Unauthenticated => status.message().to_string(),
        other => panic!("{what}: expected UNAUTHENTICATED, got {other:?}"),
    }
}

fn permission_denied<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) {
    match result {
        Err(status) if status.code() == Code::PermissionDenied => {}
        other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

/// The first administrator, building the organisation over gRPC.
struct Admin {
    addr: SocketAddr,
    token: String,
    org: OrgServiceClient<Authed>,
    /// Roles by name.
    roles: HashMap<String, Role>,
    /// The administrator's own department.
    home: String,
}

impl Admin {
    async fn sign_in(addr: SocketAddr) -> Admin {
        let token = admin_token(addr).await;
        let mut org = org_as(addr, &token).await;
        let roles = org
            .list_roles(ListRolesRequest { page_size: 100, ..Default::default() })
            .await
            .expect("the administrator lists roles")
            .into_inner()
            .roles;
        let me = auth_as(addr, &token).await.get_me(GetMeRequest {}).await.expect("GetMe").into_inner();
        assert!(!me.department_id.is_empty(), "the first administrator has a department: {me:?}");
        Admin {
            addr,
            org,
            roles: roles.into_iter().map(|r| (r.name.clone(), r)).collect(),
            home: me.department_id,
            token,
        }
    }

    fn role(&self, name: &str) -> &Role {
        self.roles.get(name).unwrap_or_else(|| panic!("no role {name:?} among {:?}", self.roles.keys()))
    }

    async fn department(&mut self, name: &str, parent_id: &str) -> Department {
        let department = Department { name: name.into(), parent_id: parent_id.into(), ..Default::default() };
        let created = self
            .org
            .create_department(CreateDepartmentRequest { department: Some(department) })
            .await
            .unwrap_or_else(|e| panic!("create department {name}: {e:?}"))
            .into_inner();
        assert_eq!((created.name.as_str(), created.parent_id.as_str()), (name, parent_id));
        created
    }

    async fn create_role(&mut self, name: &str, permissions: &[&str], scope: DataScope) -> Role {
        let role = Role {
            name: name.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            data_scope: scope as i32,
            ..Default::default()
        };
        let created = self
            .org
            .create_role(CreateRoleRequest { role: Some(role) })
            .await
            .unwrap_or_else(|e| panic!("create role {name}: {e:?}"))
            .into_inner();
        self.roles.insert(name.into(), created.clone());
        created
    }

    /// Creates an active user with the named roles; their password is [`password_of`] their e-mail.
    async fn user(&mut self, email: &str, department_id: &str, roles: &[&str]) -> User {
        let user = User {
            email: email.into(),
            display_name: email.split('@').next().unwrap_or(email).into(),
            department_id: department_id.into(),
            role_ids: roles.iter().map(|r| self.role(r).id.clone()).collect(),
            active: true,
            ..Default::default()
        };
        let created = self
            .org
            .create_user(CreateUserRequest { user: Some(user), password: password_of(email) })
            .await
            .unwrap_or_else(|e| panic!("create user {email}: {e:?}"))
            .into_inner();
        assert_eq!(created.department_id, department_id);
        assert!(created.active);
        created
    }

    /// Creates a user and signs them in.
    async fn signed_in_user(&mut self, email: &str, roles: &[&str]) -> (User, TokenPair) {
        let home = self.home.clone();
        let user = self.user(email, &home, roles).await;
        let tokens =
            sign_in(self.addr, email, &password_of(email)).await.unwrap_or_else(|e| panic!("{email} signs in: {e:?}"));
        (user, tokens)
    }

    async fn security_events(&mut self, filter: &str) -> Vec<SecurityEvent> {
        self.org
            .list_security_events(ListSecurityEventsRequest {
                page_size: 500,
                filter: filter.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ListSecurityEvents {filter:?}: {e:?}"))
            .into_inner()
            .events
    }

    async fn event_types(&mut self, user_id: &str) -> Vec<String> {
        self.security_events(&format!("user_id = \"{user_id}\"")).await.into_iter().map(|e| e.r#type).collect()
    }
}

async fn people(
    c: &mut ContactsServiceClient<Authed>,
    filter: &str,
    query: &str,
) -> Result<BTreeSet<String>, tonic::Status> {
    let request =
        ListPeopleRequest { page_size: 1000, filter: filter.into(), query: query.into(), ..Default::default() };
    let response = c.list_people(request).await?.into_inner();
    assert!(response.next_page_token.is_empty(), "one page holds every record");
    Ok(response.people.into_iter().map(|p| p.id).collect())
}

async fn companies(c: &mut ContactsServiceClient<Authed>) -> Result<BTreeSet<String>, tonic::Status> {
    let request = ListCompaniesRequest { page_size: 1000, ..Default::default() };
    Ok(c.list_companies(request).await?.into_inner().companies.into_iter().map(|p| p.id).collect())
}

// ---------------------------------------------------------------------------------------------
// The visibility matrix (SPEC A1, A4)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dept {
    Company,
    Sales,
    East,
    West,
}

impl Dept {
    fn parent(self) -> Option<Dept> {
        match self {
            Dept::Company => None,
            Dept::Sales => Some(Dept::Company),
            Dept::East | Dept::West => Some(Dept::Sales),
        }
    }

    /// Whether this department is `root` or below it.
    fn within(self, root: Dept) -> bool {
        self == root || self.parent().is_some_and(|p| p.within(root))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scope {
    Own,
    Department,
    Tree,
    All,
}

/// A member of the test organisation, signed in.
struct Member {
    name: &'static str,
    /// A word only this member's records carry, to search for them.
    word: &'static str,
    dept: Dept,
    scope: Scope,
    id: String,
    contacts: ContactsServiceClient<Authed>,
}

/// What the data scope allows: whether `caller` may see records owned by `owner`.
fn sees(caller: &Member, owner: &Member) -> bool {
    match caller.scope {
        Scope::All => true,
        Scope::Tree => owner.dept.within(caller.dept),
        Scope::Department => owner.dept == caller.dept,
        Scope::Own => caller.id == owner.id,
    }
}

const ADMIN: usize = 0;
const EXEC: usize = 1;
const SALES_HEAD: usize = 2;
const EAST_HEAD: usize = 3;
const EAST_1: usize = 4;
const EAST_2: usize = 5;
const WEST_1: usize = 6;

/// Records a mismatch between what the scope allows and what a call did: visible records
/// must work, the others must be NOT_FOUND.
fn check<T>(failures: &mut Vec<String>, what: String, visible: bool, result: Result<T, tonic::Status>) {
    match (visible, result) {
        (true, Ok(_)) => {}
        (false, Err(s)) if s.code() == Code::NotFound => {}
        (true, Err(s)) => failures.push(format!("{what}: expected success, got {:?} {:?}", s.code(), s.message())),
        (false, Ok(_)) => failures.push(format!("{what}: expected NOT_FOUND, got success")),
        (false, Err(s)) => failures.push(format!("{what}: expected NOT_FOUND, got {:?} {:?}", s.code(), s.message())),
    }
}

/// Records a mismatch between the records a list should show and those it showed.
fn check_list(
    failures: &mut Vec<String>,
    what: String,
    expected: &BTreeSet<String>,
    got: Result<BTreeSet<String>, tonic::Status>,
    labels: &HashMap<String, String>,
) {
    let name = |ids: &mut dyn Iterator<Item = &String>| -> Vec<String> {
        ids.map(|id| labels.get(id).cloned().unwrap_or_else(|| id.clone())).collect()
    };
    match got {
        Ok(got) if &got == expected => {}
        Ok(got) => failures.push(format!(
            "{what}: missing {:?}, unexpected {:?}",
            name(&mut expected.difference(&got)),
            name(&mut got.difference(expected))
        )),
        Err(s) => failures.push(format!("{what}: {:?} {:?}", s.code(), s.message())),
    }
}

fn assert_no_failures(phase: &str, failures: &[String]) {
    assert!(failures.is_empty(), "{phase}: {} data scope violations:\n{}", failures.len(), failures.join("\n"));
}

/// Builds a three-level organisation as the administrator, lets everyone create records, and
/// checks every call for every (caller, record owner) pair against the data scope; then moves a
/// user to another department and expects the change to show within `settle` (the
/// visibility cache's bound; zero when contacts resolves scopes on every call).
async fn visibility_matrix(addr: SocketAddr, settle: Duration) {
    let mut admin = Admin::sign_in(addr).await;
    for (name, scope) in [
        ("Administrator", DataScope::All),
        ("Executive", DataScope::All),
        ("Head of department", DataScope::DepartmentTree),
        ("Salesperson", DataScope::Own),
    ] {
        let role = admin.role(name);
        assert_eq!(role.data_scope, scope as i32, "{role:?}");
        for permission in [CONTACTS_READ, CONTACTS_WRITE] {
            assert!(role.permissions.iter().any(|p| p == permission), "{name} may {permission}: {role:?}");
        }
    }
    let administrator = admin.role("Administrator");
    for permission in PERMISSIONS.iter() {
        assert!(administrator.permissions.iter().any(|p| p == permission), "{administrator:?}");
    }
    admin.create_role("Team lead", &[CONTACTS_READ, CONTACTS_WRITE], DataScope::Department).await;

    // Company (the administrator's department, renamed) > Sales > Sales East, Sales West.
    let company = admin
        .org
        .update_department(UpdateDepartmentRequest {
            department: Some(Department { id: admin.home.clone(), name: "Company".into(), ..Default::default() }),
            update_mask: mask(&["name"]),
        })
        .await
        .expect("rename the administrator's department")
        .into_inner();
    assert_eq!((company.name.as_str(), company.parent_id.as_str()), ("Company", ""));
    let sales = admin.department("Sales", &company.id).await;
    let east = admin.department("Sales East", &sales.id).await;
    let west = admin.department("Sales West", &sales.id).await;
    let dept_id = |d: Dept| match d {
        Dept::Company => company.id.clone(),
        Dept::Sales => sales.id.clone(),
        Dept::East => east.id.clone(),
        Dept::West => west.id.clone(),
    };

    let me = auth_as(addr, &admin.token).await.get_me(GetMeRequest {}).await.unwrap().into_inner();
    let mut members = vec![Member {
        name: "admin",
        word: "alpha",
        dept: Dept::Company,
        scope: Scope::All,
        id: me.subject,
        contacts: contacts_as(addr, &admin.token).await,
    }];
    let plan = [
        ("exec", "bravo", Dept::Company, Scope::All, "Executive"),
        ("sales-head", "charlie", Dept::Sales, Scope::Tree, "Head of department"),
        ("east-head", "delta", Dept::East, Scope::Department, "Team lead"),
        ("east-1", "echo", Dept::East, Scope::Own, "Salesperson"),
        ("east-2", "foxtrot", Dept::East, Scope::Own, "Salesperson"),
        ("west-1", "golf", Dept::West, Scope::Own, "Salesperson"),
    ];
    for (name, word, dept, scope, role) in plan {
        let email = format!("{name}@example.com");
        let user = admin.user(&email, &dept_id(dept), &[role]).await;
        let tokens = sign_in(addr, &email, &password_of(&email)).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(claims_of(&tokens.access_token).sub, user.id);
        let contacts = contacts_as(addr, &tokens.access_token).await;
        members.push(Member { name, word, dept, scope, id: user.id, contacts });
    }

    // Everyone creates a person and a company; they own what they create.
    let mut records = Vec::new();
    let mut firms = Vec::new();
    let mut labels = HashMap::new();
    for m in &members {
        let person = new_person(&format!("Matrix {}", m.word), &format!("{}@matrix.example", m.word));
        let created = m
            .contacts
            .clone()
            .create_person(CreatePersonRequest { person: Some(person), request_id: String::new() })
            .await
            .unwrap_or_else(|e| panic!("{} creates a person: {e:?}", m.name))
            .into_inner();
        assert_eq!(created.owner_id, m.id, "the owner defaults to the creator");
        let company = Company { name: format!("{} Trading", m.word), ..Default::default() };
        let firm = m
            .contacts
            .clone()
            .create_company(CreateCompanyRequest { company: Some(company), request_id: String::new() })
            .await
            .unwrap_or_else(|e| panic!("{} creates a company: {e:?}", m.name))
            .into_inner();
        assert_eq!(firm.owner_id, m.id, "the owner defaults to the creator");
        labels.insert(created.id.clone(), format!("{}'s person", m.name));
        labels.insert(firm.id.clone(), format!("{}'s company", m.name));
        records.push(created);
        firms.push(firm);
    }

    // Reads.
    let mut failures = Vec::new();
    for caller in &members {
        let mut c = caller.contacts.clone();
        let visible = |ids: &[String]| -> BTreeSet<String> {
            members.iter().zip(ids).filter(|(o, _)| sees(caller, o)).map(|(_, id)| id.clone()).collect()
        };
        let person_ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let company_ids: Vec<String> = firms.iter().map(|r| r.id.clone()).collect();
        let expected = visible(&person_ids);
        check_list(
            &mut failures,
            format!("{} ListPeople", caller.name),
            &expected,
            people(&mut c, "", "").await,
            &labels,
        );
        check_list(
            &mut failures,
            format!("{} ListPeople query=matrix", caller.name),
            &expected,
            people(&mut c, "", "matrix").await,
            &labels,
        );
        check_list(
            &mut failures,
            format!("{} ListCompanies", caller.name),
            &visible(&company_ids),
            companies(&mut c).await,
            &labels,
        );
        for ((owner, record), firm) in members.iter().zip(&records).zip(&firms) {
            let can = sees(caller, owner);
            let what = |op: &str| format!("{} {op} on {}'s record", caller.name, owner.name);
            check(
                &mut failures,
                what("GetPerson"),
                can,
                c.get_person(GetPersonRequest { id: record.id.clone() }).await,
            );
            check(
                &mut failures,
                what("GetCompany"),
                can,
                c.get_company(GetCompanyRequest { id: firm.id.clone() }).await,
            );
            let request = ListRevisionsRequest { record_id: record.id.clone(), ..Default::default() };
            check(&mut failures, what("ListRevisions"), can, c.list_revisions(request).await);
            let only: BTreeSet<String> = if can { [record.id.clone()].into() } else { BTreeSet::new() };
            check_list(
                &mut failures,
                what(&format!("ListPeople query={}", owner.word)),
                &only,
                people(&mut c, "", owner.word).await,
                &labels,
            );
            check_list(
                &mut failures,
                what("ListPeople filter=owner_id"),
                &only,
                people(&mut c, &format!("owner_id = \"{}\"", owner.id), "").await,
                &labels,
            );
        }
    }
    assert_no_failures("reads", &failures);

    // Updates: every caller tries every record.
    for caller in &members {
        let mut c = caller.contacts.clone();
        for (owner, record) in members.iter().zip(&records) {
            let person =
                Person { id: record.id.clone(), notes: format!("checked by {}", caller.name), ..Default::default() };
            let result =
                c.update_person(UpdatePersonRequest { person: Some(person), update_mask: mask(&["notes"]) }).await;
            check(
                &mut failures,
                format!("{} UpdatePerson on {}'s record", caller.name, owner.name),
                sees(caller, owner),
                result,
            );
        }
    }
    assert_no_failures("updates", &failures);
    // Exactly the permitted updates were applied, each recorded under its caller.
    let mut root = members[ADMIN].contacts.clone();
    for (owner, record) in members.iter().zip(&records) {
        let revisions = root
            .list_revisions(ListRevisionsRequest { record_id: record.id.clone(), page_size: 100, ..Default::default() })
            .await
            .expect("the administrator lists revisions")
            .into_inner()
            .revisions;
        let actors: BTreeSet<String> =
            revisions.iter().filter(|r| r.action == revision::Action::Update as i32).map(|r| r.actor.clone()).collect();
        let updates = revisions.iter().filter(|r| r.action == revision::Action::Update as i32).count();
        let expected: BTreeSet<String> = members.iter().filter(|c| sees(c, owner)).map(|c| c.id.clone()).collect();
        if updates != expected.len() || actors != expected {
            failures.push(format!(
                "{}'s record: {updates} updates by {actors:?}, expected one by each of {expected:?}",
                owner.name
            ));
        }
    }
    assert_no_failures("update history", &failures);

    // Deletes: first every delete the scope forbids, then one permitted delete per record.
    for caller in &members {
        let mut c = caller.contacts.clone();
        for (owner, record) in members.iter().zip(&records) {
            if !sees(caller, owner) {
                let result = c.delete_person(DeletePersonRequest { id: record.id.clone(), etag: String::new() }).await;
                check(&mut failures, format!("{} DeletePerson on {}'s record", caller.name, owner.name), false, result);
            }
        }
    }
    for (owner, record) in members.iter().zip(&records) {
        let result = root.get_person(GetPersonRequest { id: record.id.clone() }).await;
        check(&mut failures, format!("{}'s record after refused deletes", owner.name), true, result);
    }
    assert_no_failures("refused deletes", &failures);
    // Who deletes whose record: a head or colleague where the scope allows, the owner otherwise.
    let deleter = [EXEC, ADMIN, EXEC, SALES_HEAD, EAST_HEAD, EAST_2, SALES_HEAD];
    for (i, (owner, record)) in members.iter().zip(&records).enumerate() {
        let caller = &members[deleter[i]];
        assert!(sees(caller, owner));
        let result = caller
            .contacts
            .clone()
            .delete_person(DeletePersonRequest { id: record.id.clone(), etag: String::new() })
            .await;
        check(&mut failures, format!("{} DeletePerson on {}'s record", caller.name, owner.name), true, result);
        let gone = root.get_person(GetPersonRequest { id: record.id.clone() }).await;
        check(&mut failures, format!("{}'s record after its delete", owner.name), false, gone);
    }
    assert_no_failures("deletes", &failures);
    // The history of a deleted record stays listable, within the same scope.
    for caller in &members {
        let mut c = caller.contacts.clone();
        for (owner, record) in members.iter().zip(&records) {
            let request = ListRevisionsRequest { record_id: record.id.clone(), ..Default::default() };
            let result = c.list_revisions(request).await.and_then(|r| {
                let newest = r.into_inner().revisions.first().map(|r| r.action);
                if newest == Some(revision::Action::Delete as i32) {
                    Ok(())
                } else {
                    Err(tonic::Status::internal(format!("newest revision is {newest:?}, not a delete")))
                }
            });
            check(
                &mut failures,
                format!("{} ListRevisions on {}'s deleted record", caller.name, owner.name),
                sees(caller, owner),
                result,
            );
        }
    }
    assert_no_failures("history after delete", &failures);

    // A move in the organisation changes who sees what: west-1 joins Sales East.
    let moved = members[WEST_1]
        .contacts
        .clone()
        .create_person(CreatePersonRequest {
            person: Some(new_person("Matrix hotel", "hotel@matrix.example")),
            request_id: String::new(),
        })
        .await
        .expect("west-1 creates another person")
        .into_inner();
    let mut east_head = members[EAST_HEAD].contacts.clone();
    let before = east_head.get_person(GetPersonRequest { id: moved.id.clone() }).await;
    check(&mut failures, "east-head GetPerson on west-1's record before the move".into(), false, before);
    assert_no_failures("before the move", &failures);
    let user = admin
        .org
        .update_user(UpdateUserRequest {
            user: Some(User { id: members[WEST_1].id.clone(), department_id: east.id.clone(), ..Default::default() }),
            update_mask: mask(&["department_id"]),
        })
        .await
        .expect("move west-1 to Sales East")
        .into_inner();
    assert_eq!(user.department_id, east.id);
    assert!(user.active, "a move keeps the user active");
    members[WEST_1].dept = Dept::East;
    // Beyond the cache's bound, allow only for the calls' own latency; without a cache the
    // very first call must see the change.
    let patience = if settle.is_zero() { Duration::ZERO } else { settle + Duration::from_millis(500) };
    let moved_at = Instant::now();
    loop {
        match east_head.get_person(GetPersonRequest { id: moved.id.clone() }).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::NotFound && moved_at.elapsed() < patience => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => {
                panic!("east-head still cannot see west-1's record {:?} after the move: {e:?}", moved_at.elapsed())
            }
        }
    }
    for caller in &members {
        let expected: BTreeSet<String> =
            if sees(caller, &members[WEST_1]) { [moved.id.clone()].into() } else { BTreeSet::new() };
        let got = people(&mut caller.contacts.clone(), "", "").await;
        check_list(&mut failures, format!("{} ListPeople after the move", caller.name), &expected, got, &labels);
    }
    assert_no_failures("after the move", &failures);
    let events = admin.event_types(&members[WEST_1].id).await;
    assert!(events.iter().any(|t| t == "user_department_changed"), "the move is audited: {events:?}");

    // Ownership: creating for, or handing over to, someone outside one's scope is refused.
    let mut for_east_1 = new_person("Handover Subject", "handover@matrix.example");
    for_east_1.owner_id = members[EAST_1].id.clone();
    let handed = east_head
        .create_person(CreatePersonRequest { person: Some(for_east_1), request_id: String::new() })
        .await
        .expect("east-head creates a person for east-1")
        .into_inner();
    assert_eq!(handed.owner_id, members[EAST_1].id);
    let mut for_exec = new_person("Out Of Reach", "reach@matrix.example");
    for_exec.owner_id = members[EXEC].id.clone();
    let result =
        east_head.create_person(CreatePersonRequest { person: Some(for_exec), request_id: String::new() }).await;
    permission_denied("east-head creates a person for exec", result);
    let mut for_east_2 = new_person("Not Mine To Give", "give@matrix.example");
    for_east_2.owner_id = members[EAST_2].id.clone();
    let mut east_1 = members[EAST_1].contacts.clone();
    let result =
        east_1.create_person(CreatePersonRequest { person: Some(for_east_2), request_id: String::new() }).await;
    permission_denied("east-1 creates a person for east-2", result);
    let hand_over = |to: usize| UpdatePersonRequest {
        person: Some(Person { id: handed.id.clone(), owner_id: members[to].id.clone(), ..Default::default() }),
        update_mask: mask(&["owner_id"]),
    };
    permission_denied("east-1 hands over to east-2", east_1.update_person(hand_over(EAST_2)).await);
    permission_denied("east-head hands over to exec", east_head.update_person(hand_over(EXEC)).await);
    let mut sales_head = members[SALES_HEAD].contacts.clone();
    let transferred = sales_head.update_person(hand_over(WEST_1)).await.expect("sales-head hands over").into_inner();
    assert_eq!(transferred.owner_id, members[WEST_1].id);
    let gone = east_1.get_person(GetPersonRequest { id: handed.id.clone() }).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound, "east-1 no longer sees what they handed over");
    let mut west_1 = members[WEST_1].contacts.clone();
    west_1.get_person(GetPersonRequest { id: handed.id.clone() }).await.expect("the new owner sees it");
}

// ---------------------------------------------------------------------------------------------
// Tokens, sessions, accounts and keys (SPEC A2, A3, A6)
// ---------------------------------------------------------------------------------------------

/// Refresh tokens rotate; a used-up one presented again revokes its whole family; sign-out
/// revokes.
async fn refresh_rotation_and_reuse(addr: SocketAddr) {
    let mut admin = Admin::sign_in(addr).await;
    let email = "refresher@example.com";
    let (user, first) = admin.signed_in_user(email, &["Salesperson"]).await;
    assert_eq!(first.token_type, "Bearer");
    assert!(!first.refresh_token.is_empty() && first.access_token_expire_time.is_some());
    let me = auth_as(addr, &first.access_token).await.get_me(GetMeRequest {}).await.expect("GetMe").into_inner();
    assert_eq!((me.subject.as_str(), me.email.as_str(), me.service_account), (user.id.as_str(), email, false));
    assert_eq!(me.data_scope, DataScope::Own as i32);
    let visibility = auth_as(addr, &first.access_token)
        .await
        .resolve_visibility(ResolveVisibilityRequest {})
        .await
        .expect("ResolveVisibility")
        .into_inner();
    assert!(!visibility.all && visibility.owner_ids == [user.id.clone()], "{visibility:?}");

    let mut a = auth(addr).await;
    let refresh = |token: &str| RefreshRequest { refresh_token: token.to_string() };
    let second = a.refresh(refresh(&first.refresh_token)).await.expect("refresh").into_inner();
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(claims_of(&second.access_token).sub, user.id);
    people(&mut contacts_as(addr, &second.access_token).await, "", "").await.expect("the new access token works");
    let third = a.refresh(refresh(&second.refresh_token)).await.expect("refresh again").into_inner();

    // The first token was used up: presenting it again revokes the family.
    unauthenticated("reusing a used-up refresh token", a.refresh(refresh(&first.refresh_token)).await);
    unauthenticated("the newest refresh token of a revoked family", a.refresh(refresh(&third.refresh_token)).await);
    unauthenticated("a made-up refresh token", a.refresh(refresh("not-a-refresh-token")).await);

    // Sign-out revokes that session only.
    let session = sign_in(addr, email, &password_of(email)).await.expect("sign in again");
    let other = sign_in(addr, email, &password_of(email)).await.expect("sign in elsewhere");
    a.sign_out(SignOutRequest { refresh_token: session.refresh_token.clone() }).await.expect("sign out");
    unauthenticated("refresh after sign-out", a.refresh(refresh(&session.refresh_token)).await);
    let other = a.refresh(refresh(&other.refresh_token)).await.expect("another session is unaffected").into_inner();

    // Ten browser tabs refresh with the same token at once: every one keeps the session, with
    // the same successor (`--refresh-reuse-grace`).
    let tabs: Vec<_> = (0..10)
        .map(|_| {
            let token = other.refresh_token.clone();
            tokio::spawn(async move { auth(addr).await.refresh(RefreshRequest { refresh_token: token }).await })
        })
        .collect();
    let mut successors = BTreeSet::new();
    for tab in tabs {
        successors.insert(tab.await.unwrap().expect("no tab is signed out").into_inner().refresh_token);
    }
    assert_eq!(successors.len(), 1, "{successors:?}");
    a.refresh(refresh(successors.first().unwrap())).await.expect("the successor works");

    let events = admin.event_types(&user.id).await;
    for expected in ["sign_in", "refresh_reuse", "sign_out"] {
        assert!(events.iter().any(|t| t == expected), "{expected} is audited: {events:?}");
    }
}

/// After five wrong passwords even the right one fails, with the same answer as a wrong
/// password or an unknown e-mail; the lock lifts after `--lockout`.
async fn lock_out(addr: SocketAddr, lockout: Duration) {
    let mut admin = Admin::sign_in(addr).await;
    let email = "forgetful@example.com";
    let home = admin.home.clone();
    let user = admin.user(email, &home, &["Salesperson"]).await;
    let mut messages = BTreeSet::new();
    for i in 0..5 {
        messages
            .insert(unauthenticated(&format!("wrong password {i}"), sign_in(addr, email, "wrong-password-123").await));
    }
    let locked_at = Instant::now();
    messages
        .insert(unauthenticated("the right password while locked", sign_in(addr, email, &password_of(email)).await));
    let unknown = "nobody@example.com";
    messages.insert(unauthenticated("an unknown e-mail", sign_in(addr, unknown, "some-password-123").await));
    assert_eq!(messages.len(), 1, "every failed sign-in reads the same: {messages:?}");
    // Others are not affected.
    admin_token(addr).await;

    let events = admin.event_types(&user.id).await;
    assert!(events.iter().filter(|t| *t == "sign_in_failed").count() >= 5, "{events:?}");
    assert!(events.iter().any(|t| t == "locked_out"), "{events:?}");
    let failed = admin.security_events("type = \"sign_in_failed\"").await;
    assert!(failed.iter().all(|e| e.r#type == "sign_in_failed"), "{failed:?}");
    assert!(failed.iter().any(|e| e.email == unknown), "failures for unknown e-mails are audited: {failed:?}");

    tokio::time::sleep(lockout.saturating_sub(locked_at.elapsed()) + Duration::from_millis(500)).await;
    sign_in(addr, email, &password_of(email)).await.expect("the lock lifts after --lockout");
}

/// A service account exchanges its client id and secret for a token that works like a user's.
async fn service_accounts(cluster: &Cluster) {
    let addr = cluster.gateway;
    let mut admin = Admin::sign_in(addr).await;
    let executive = admin.role("Executive").id.clone();
    let created = admin
        .org
        .create_service_account(CreateServiceAccountRequest {
            service_account: Some(ServiceAccount {
                name: "billing-sync".into(),
                role_ids: vec![executive],
                ..Default::default()
            }),
        })
        .await
        .expect("create a service account")
        .into_inner();
    let account = created.service_account.expect("the account");
    assert!(!account.client_id.is_empty() && !created.client_secret.is_empty(), "{account:?}");

    let mut a = auth(addr).await;
    let issue = |secret: &str| IssueServiceTokenRequest {
        client_id: account.client_id.clone(),
        client_secret: secret.to_string(),
    };
    let tokens =
        a.issue_service_token(issue(&created.client_secret)).await.expect("issue a service token").into_inner();
    assert!(tokens.refresh_token.is_empty(), "service tokens are not refreshed");
    let me = auth_as(addr, &tokens.access_token).await.get_me(GetMeRequest {}).await.expect("GetMe").into_inner();
    assert!(me.service_account && me.subject == account.id, "{me:?}");

    // It sees every record, like the administrator (Executive: everything).
    let everything = people(&mut contacts_as(addr, &admin.token).await, "", "").await.unwrap();
    assert!(!everything.is_empty());
    let seen = people(&mut contacts_as(addr, &tokens.access_token).await, "", "").await.expect("list as the service");
    assert_eq!(seen, everything);
    let direct = people(&mut contacts_as(cluster.replica("contacts", 0), &tokens.access_token).await, "", "").await;
    assert_eq!(direct.expect("list on the service directly"), everything);

    unauthenticated("a wrong secret", a.issue_service_token(issue("wrong-secret")).await);
    let unknown =
        IssueServiceTokenRequest { client_id: "no-such-client".into(), client_secret: created.client_secret.clone() };
    unauthenticated("an unknown client id", a.issue_service_token(unknown).await);

    let listed = admin
        .org
        .list_service_accounts(ListServiceAccountsRequest::default())
        .await
        .expect("list service accounts")
        .into_inner()
        .service_accounts;
    assert!(listed.iter().any(|s| s.id == account.id), "{listed:?}");
    admin
        .org
        .delete_service_account(DeleteServiceAccountRequest { id: account.id.clone() })
        .await
        .expect("delete the service account");
    unauthenticated("a deleted account", a.issue_service_token(issue(&created.client_secret)).await);
}

/// Calls outside the caller's permissions are PERMISSION_DENIED.
async fn permission_denials(addr: SocketAddr) {
    let mut admin = Admin::sign_in(addr).await;
    let (_, salesperson) = admin.signed_in_user("junior@example.com", &["Salesperson"]).await;
    let mut org = org_as(addr, &salesperson.access_token).await;
    let user = User {
        email: "shadow@example.com".into(),
        display_name: "Shadow".into(),
        department_id: admin.home.clone(),
        active: true,
        ..Default::default()
    };
    let result = org.create_user(CreateUserRequest { user: Some(user), password: "shadow-password-1".into() }).await;
    permission_denied("a salesperson creates a user", result);
    permission_denied(
        "a salesperson reads the security audit",
        org.list_security_events(ListSecurityEventsRequest::default()).await,
    );
    let mut auth_client = auth_as(addr, &salesperson.access_token).await;
    permission_denied(
        "a salesperson rotates the signing key",
        auth_client.rotate_signing_key(RotateSigningKeyRequest {}).await,
    );

    // Read-only access to every record.
    admin.create_role("Viewer", &[CONTACTS_READ], DataScope::All).await;
    let (_, viewer) = admin.signed_in_user("viewer@example.com", &["Viewer"]).await;
    let mut c = contacts_as(addr, &viewer.access_token).await;
    let result = c
        .create_person(CreatePersonRequest {
            person: Some(new_person("Never Created", "never@example.com")),
            request_id: String::new(),
        })
        .await;
    permission_denied("a viewer creates a person", result);
    let visible = people(&mut c, "", "").await.expect("a viewer lists people");
    let some = visible.iter().next().expect("some record is visible to a viewer").clone();
    c.get_person(GetPersonRequest { id: some.clone() }).await.expect("a viewer reads a person");
    let change = UpdatePersonRequest {
        person: Some(Person { id: some.clone(), notes: "viewer was here".into(), ..Default::default() }),
        update_mask: mask(&["notes"]),
    };
    permission_denied("a viewer updates a person", c.update_person(change).await);
    permission_denied(
        "a viewer deletes a person",
        c.delete_person(DeletePersonRequest { id: some, etag: String::new() }).await,
    );

    // Organisation readers without contacts access.
    admin.create_role("Org reader", &[ORG_READ], DataScope::Own).await;
    let (_, reader) = admin.signed_in_user("org-reader@example.com", &["Org reader"]).await;
    let mut c = contacts_as(addr, &reader.access_token).await;
    permission_denied("an org reader lists people", c.list_people(ListPeopleRequest::default()).await);
    let mut org = org_as(addr, &reader.access_token).await;
    org.list_users(ListUsersRequest::default()).await.expect("an org reader lists users");
    let department = Department { name: "Skunkworks".into(), parent_id: admin.home.clone(), ..Default::default() };
    permission_denied(
        "an org reader creates a department",
        org.create_department(CreateDepartmentRequest { department: Some(department) }).await,
    );
}

/// After a key rotation, tokens signed by the old and the new key both work at once, through
/// the gateway and on each service, and both keys are published.
async fn key_rotation(cluster: &Cluster) {
    let addr = cluster.gateway;
    let before = admin_token(addr).await;
    let old_kid = kid_of(&before);
    let rotated = auth_as(addr, &before)
        .await
        .rotate_signing_key(RotateSigningKeyRequest {})
        .await
        .expect("the administrator rotates the signing key")
        .into_inner();
    assert_ne!(rotated.kid, old_kid);
    assert_eq!(
        (rotated.kty.as_str(), rotated.crv.as_str(), rotated.alg.as_str(), rotated.r#use.as_str()),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    let after = admin_token(addr).await;
    assert_eq!(kid_of(&after), rotated.kid, "new tokens are signed with the new key");

    for (name, token) in [("old key", &before), ("new key", &after)] {
        people(&mut contacts_as(addr, token).await, "", "")
            .await
            .unwrap_or_else(|e| panic!("a token signed with the {name} through the gateway: {e:?}"));
        people(&mut contacts_as(cluster.replica("contacts", 0), token).await, "", "")
            .await
            .unwrap_or_else(|e| panic!("a token signed with the {name} on contacts: {e:?}"));
        org_as(addr, token)
            .await
            .list_users(ListUsersRequest::default())
            .await
            .unwrap_or_else(|e| panic!("a token signed with the {name} on the organisation: {e:?}"));
        auth_as(cluster.replica("auth", 0), token)
            .await
            .get_me(GetMeRequest {})
            .await
            .unwrap_or_else(|e| panic!("a token signed with the {name} on auth: {e:?}"));
    }

    let published = auth(addr).await.get_jwks(GetJwksRequest {}).await.expect("GetJwks").into_inner();
    let kids: BTreeSet<String> = published.keys.iter().map(|k| k.kid.clone()).collect();
    assert!(kids.contains(&old_kid) && kids.contains(&rotated.kid), "GetJwks: {kids:?}");

    let (status, body) = http_get(addr, "/.well-known/jwks.json").await;
    assert_eq!(status, 200, "{body}");
    let json = &body[body.find('{').unwrap_or(0)..body.rfind('}').map(|i| i + 1).unwrap_or(body.len())];
    let jwks: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body}"));
    let keys = jwks["keys"].as_array().unwrap_or_else(|| panic!("keys: {body}"));
    let kids: BTreeSet<String> = keys.iter().filter_map(|k| k["kid"].as_str().map(String::from)).collect();
    assert!(kids.contains(&old_kid) && kids.contains(&rotated.kid), "/.well-known/jwks.json: {body}");
    for key in keys {
        for field in ["kty", "crv", "kid", "x", "alg", "use"] {
            assert!(key[field].as_str().is_some_and(|v| !v.is_empty()), "{field} in {key}");
        }
        assert!(key.get("d").is_none(), "no private key material is published: {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_signs_in_and_scopes_data() {
    let lockout = Duration::from_secs(3);
    let cluster = Cluster::start(ClusterConfig {
        flags: vec![
            ("auth", ["--max-failed-sign-ins", "5", "--lockout", "3s"].map(String::from).to_vec()),
            ("contacts", ["--visibility-cache-ttl", "0"].map(String::from).to_vec()),
        ],
        ..ClusterConfig::default()
    })
    .await;
    visibility_matrix(cluster.gateway, Duration::ZERO).await;
    refresh_rotation_and_reuse(cluster.gateway).await;
    lock_out(cluster.gateway, lockout).await;
    service_accounts(&cluster).await;
    permission_denials(cluster.gateway).await;
    key_rotation(&cluster).await;
}

// ---------------------------------------------------------------------------------------------
// Bad tokens (SPEC A2, G2)
// ---------------------------------------------------------------------------------------------

/// Calls `token` (none when `None`) at every place that verifies tokens: through the gateway to
/// contacts and to the organisation, and directly on a contacts replica and on auth.
async fn calls_with(cluster: &Cluster, token: Option<&str>) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let targets = [("gateway", cluster.gateway), ("contacts replica", cluster.replica("contacts", 0))];
    let mut results = Vec::new();
    for (name, addr) in targets {
        let result = match token {
            Some(t) => contacts_as(addr, t).await.list_people(ListPeopleRequest::default()).await.map(|_| ()),
            None => contacts(addr).await.list_people(ListPeopleRequest::default()).await.map(|_| ()),
        };
        results.push((name, result));
    }
    let org = match token {
        Some(t) => org_as(cluster.gateway, t).await.list_users(ListUsersRequest::default()).await.map(|_| ()),
        None => OrgServiceClient::new(channel(cluster.gateway).await)
            .list_users(ListUsersRequest::default())
            .await
            .map(|_| ()),
    };
    results.push(("gateway to OrgService", org));
    let me = match token {
        Some(t) => auth_as(cluster.replica("auth", 0), t).await.get_me(GetMeRequest {}).await.map(|_| ()),
        None => auth(cluster.replica("auth", 0)).await.get_me(GetMeRequest {}).await.map(|_| ()),
    };
    results.push(("auth directly", me));
    results
}

async fn refused_everywhere(cluster: &Cluster, what: &str, token: Option<&str>) {
    for (place, result) in calls_with(cluster, token).await {
        unauthenticated(&format!("{what} at {place}"), result);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_every_bad_token() {
    let cluster = Cluster::start(ClusterConfig {
        flags: vec![("auth", ["--access-token-ttl", "2s"].map(String::from).to_vec())],
        ..ClusterConfig::default()
    })
    .await;
    let tokens = sign_in(cluster.gateway, ADMIN_EMAIL, ADMIN_PASSWORD).await.expect("the administrator signs in");
    let good = tokens.access_token.clone();
    let claims = claims_of(&good);
    assert!(claims.exp - claims.iat <= 2, "the access token lives --access-token-ttl: {claims:?}");
    for (place, result) in calls_with(&cluster, Some(&good)).await {
        result.unwrap_or_else(|e| panic!("a fresh token at {place}: {e:?}"));
    }

    let parts: Vec<&str> = good.split('.').collect();
    let (header, payload, signature) = (parts[0], parts[1], parts[2]);
    // One character of the payload changed.
    let mut flipped = payload.as_bytes().to_vec();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{header}.{}.{signature}", String::from_utf8(flipped).unwrap());
    // Claims rewritten (someone else, more permissions) under the original signature.
    let mut forged_claims = claims.clone();
    forged_claims.sub = "someone-else".into();
    forged_claims.perms = PERMISSIONS.iter().map(|p| p.to_string()).collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
    let forged = format!("{header}.{forged_payload}.{signature}");
    // No signature at all.
    let none_header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#, kid_of(&good)));
    let unsigned = format!("{none_header}.{payload}.");
    // A key of our own, under a new kid and under the suite's kid.
    let stranger = SigningKey::generate();
    let mut fresh = claims.clone();
    fresh.iat = now();
    fresh.exp = now() + 600;
    let foreign = stranger.sign(&fresh);
    let impostor = SigningKey::from_pkcs8(kid_of(&good), stranger.pkcs8()).unwrap().sign(&fresh);

    refused_everywhere(&cluster, "no token", None).await;
    refused_everywhere(&cluster, "a garbage token", Some("garbage")).await;
    refused_everywhere(&cluster, "a tampered token", Some(&tampered)).await;
    refused_everywhere(&cluster, "a token with forged claims", Some(&forged)).await;
    refused_everywhere(&cluster, "an alg=none token", Some(&unsigned)).await;
    refused_everywhere(&cluster, "a token signed by an unknown key", Some(&foreign)).await;
    refused_everywhere(&cluster, "a token signed by a foreign key under the suite's kid", Some(&impostor)).await;

    // Expired: past `exp` and the 5 s leeway for clock skew.
    let wait = (claims.exp + 5 + 1 - now()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(500)).await;
    refused_everywhere(&cluster, "an expired token", Some(&good)).await;
    // The session goes on with a refreshed token.
    let renewed = auth(cluster.gateway)
        .await
        .refresh(RefreshRequest { refresh_token: tokens.refresh_token })
        .await
        .expect("refresh after the access token expired")
        .into_inner();
    for (place, result) in calls_with(&cluster, Some(&renewed.access_token)).await {
        result.unwrap_or_else(|e| panic!("a refreshed token at {place}: {e:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Embedded mode
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_scopes_data_on_sqlite() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _dev = start_dev("dev", &data.path().join("crm-data"), addr, &[("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD)]).await;
    // `crm dev` caches data scopes for 2 s.
    visibility_matrix(addr, Duration::from_secs(2)).await;
}

/// `crm dev` takes every role's settings from the environment, as `crm serve` does: auth's
/// token lifetime, and contacts' data-scope cache (off here, so a move shows at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_takes_every_roles_settings_from_the_environment() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let env =
        [("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD), ("CRM_ACCESS_TOKEN_TTL", "7m"), ("CRM_VISIBILITY_CACHE_TTL", "0")];
    let _dev = start_dev("dev", &data.path().join("crm-data"), addr, &env).await;
    let admin = Admin::sign_in(addr).await;
    let claims = claims_of(&admin.token);
    assert_eq!(claims.exp - claims.iat, 7 * 60, "CRM_ACCESS_TOKEN_TTL applies");

    let (mut head, customer) = move_a_salesperson_away_from_their_head(addr, "moved", 1).await;
    let seen = people(&mut head, "", "").await.unwrap();
    assert!(!seen.contains(&customer.id), "CRM_VISIBILITY_CACHE_TTL=0 applies: the move shows at once");
}

/// A head, and a salesperson of theirs who creates a customer; the head lists people `looks`
/// times (seeing the customer each time), then an administrator moves the salesperson to another
/// department. Returns the head's contacts client and the customer.
async fn move_a_salesperson_away_from_their_head(
    addr: SocketAddr,
    name: &str,
    looks: usize,
) -> (ContactsServiceClient<Authed>, Person) {
    let mut admin = Admin::sign_in(addr).await;
    let elsewhere = admin.department("Elsewhere", "").await;
    let (_, head) = admin.signed_in_user(&format!("{name}-head@example.com"), &["Head of department"]).await;
    let (seller, tokens) = admin.signed_in_user(&format!("{name}-seller@example.com"), &["Salesperson"]).await;
    let mut sales = contacts_as(addr, &tokens.access_token).await;
    let person = new_person(&format!("{name} customer"), &format!("{name}@example.com"));
    let request = CreatePersonRequest { person: Some(person), ..Default::default() };
    let customer = sales.create_person(request).await.expect("the salesperson creates").into_inner();
    let mut head = contacts_as(addr, &head.access_token).await;
    for _ in 0..looks {
        assert!(people(&mut head, "", "").await.unwrap().contains(&customer.id), "the head sees their team's records");
    }
    let moved = User { id: seller.id.clone(), department_id: elsewhere.id, ..Default::default() };
    admin
        .org
        .update_user(UpdateUserRequest { user: Some(moved), update_mask: mask(&["department_id"]) })
        .await
        .expect("move the salesperson");
    (head, customer)
}

/// A salesperson moved to another department: their records leave their old head's view at
/// once, through auth's organisation event, although contacts would keep the head's cached data
/// scope for an hour (`--visibility-cache-ttl 1h`), on every contacts replica.
async fn moved_salesperson_leaves_the_heads_view(addr: SocketAddr) {
    // Several looks before the move, so that every contacts replica behind the gateway caches
    // the head's scope.
    let (mut head, customer) = move_a_salesperson_away_from_their_head(addr, "moving", 8).await;
    // The event takes milliseconds; the cached scope would last an hour.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut consecutive = 0;
    while consecutive < 8 {
        let seen = people(&mut head, "", "").await.unwrap();
        consecutive = if seen.contains(&customer.id) { 0 } else { consecutive + 1 };
        assert!(Instant::now() < deadline, "the moved salesperson's record is still in the old head's view");
        if consecutive == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_organisation_changes_reach_every_contacts_replica() {
    let cluster = Cluster::start(ClusterConfig {
        replicas: vec![("contacts", 2)],
        flags: vec![("contacts", ["--visibility-cache-ttl", "1h"].map(String::from).to_vec())],
        ..ClusterConfig::default()
    })
    .await;
    moved_salesperson_leaves_the_heads_view(cluster.gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_organisation_changes_reach_contacts_at_once() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let env = [("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD), ("CRM_VISIBILITY_CACHE_TTL", "1h")];
    let _dev = start_dev("dev", &data.path().join("crm-data"), addr, &env).await;
    moved_salesperson_leaves_the_heads_view(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_prints_a_generated_admin_password_once() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("crm-data");
    let addr = free_addr();
    let mut dev = start_dev("dev", &data_dir, addr, &[]).await;
    let output = dev.output();
    // The password is on the banner line that mentions it, or the line after.
    let lines: Vec<&str> = output.lines().collect();
    let mut candidates = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.to_lowercase().contains("password") {
            for word in lines[i..(i + 2).min(lines.len())].iter().flat_map(|l| l.split_whitespace()) {
                let word = word.trim_matches(|c: char| "\"'`,;".contains(c)).trim_end_matches('.');
                if word.len() >= 12 && !word.contains('@') && !word.contains('/') && !candidates.contains(&word) {
                    candidates.push(word);
                }
            }
        }
    }
    let mut password = None;
    // Fewer tries than the lock-out allows.
    for candidate in candidates.iter().take(4) {
        if sign_in(addr, ADMIN_EMAIL, candidate).await.is_ok() {
            password = Some(candidate.to_string());
            break;
        }
    }
    let password = password.unwrap_or_else(|| panic!("no generated password in the banner:\n{output}"));
    assert_eq!(output.matches(&password).count(), 1, "the password is printed once:\n{output}");
    assert!(dev.terminate(Duration::from_secs(15)), "{}", dev.output());

    let dev = start_dev("dev-again", &data_dir, addr, &[]).await;
    assert!(!dev.output().contains(&password), "a restart does not print the password again:\n{}", dev.output());
    sign_in(addr, ADMIN_EMAIL, &password).await.expect("the generated password still signs in");
}

/// Calls to contacts by `callers` through the gateway, in a loop until `stop`: (succeeded,
/// failures with their codes).
async fn contacts_load(
    addr: SocketAddr,
    callers: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (usize, Vec<String>) {
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|token| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut c = contacts_as(addr, &token).await;
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match people(&mut c, "", "").await {
                        Ok(_) => ok += 1,
                        Err(status) => failed.push(format!("{:?}: {}", status.code(), status.message())),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, Vec::new());
    for task in tasks {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

/// Auth killed under load: with two replicas, losing one fails no contacts call; with none
/// left, callers contacts has seen keep their data scope (`--visibility-stale-for`) and only a
/// caller never seen is told UNAVAILABLE, with retry info, until auth is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_keeps_serving_while_auth_is_down() {
    let mut cluster = Cluster::start(ClusterConfig { replicas: vec![("auth", 2)], ..ClusterConfig::default() }).await;
    let addr = cluster.gateway;
    let mut admin = Admin::sign_in(addr).await;
    let mut callers = vec![admin.token.clone()];
    for name in ["outage-a", "outage-b", "outage-c"] {
        callers.push(admin.signed_in_user(&format!("{name}@example.com"), &["Salesperson"]).await.1.access_token);
    }
    let (_, unseen) = admin.signed_in_user("outage-unseen@example.com", &["Salesperson"]).await;
    let (_, late) = admin.signed_in_user("outage-late@example.com", &["Salesperson"]).await;
    let run = |callers: Vec<String>| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (stop.clone(), tokio::spawn(contacts_load(addr, callers, stop)))
    };

    // One auth replica of two killed mid-load: no call fails, a first-time caller included.
    let (stop, load) = run(callers.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.process("auth", 0).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    people(&mut contacts_as(addr, &late.access_token).await, "", "").await.expect("a new caller, one auth left");
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0 && failed.is_empty(), "{ok} served, {} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);

    // The last one killed: the callers seen keep working; a caller never seen is asked to retry.
    let (stop, load) = run(callers.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.process("auth", 1).kill();
    tokio::time::sleep(Duration::from_secs(4)).await; // past the 2 s visibility cache
    let refused = people(&mut contacts_as(addr, &unseen.access_token).await, "", "").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0 && failed.is_empty(), "{ok} served, {} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    eprintln!("auth down: {ok} contacts calls served, {} failed", failed.len());

    // Auth back: the new caller is served.
    cluster.process("auth", 1).restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = contacts_as(addr, &unseen.access_token).await;
    while people(&mut c, "", "").await.is_err() {
        assert!(Instant::now() < deadline, "served once auth is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
