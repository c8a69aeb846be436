//! What tests of every service are built from: a uniquely named PostgreSQL database per test
//! (dropped afterwards) or a SQLite file in a temporary directory, so that tests run in
//! parallel; [`both_backends!`](crate::both_backends) to run store tests on both; fixtures for
//! the caller and the organisation; and [`spawn`], which serves a role on a port of its own
//! against a fresh database, as `crm serve` would (zero-to-production's `spawn_app`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

use crate::auth::{Claims, OwnerScope, Principal, ScopeSource, ServiceCredentials, UserDirectory, UserStatus};
use crate::error::ApiError;
use crate::peer::{Callee, Peers};
use crate::role::{Context, Database, Service, Suite};
use crate::shutdown::Trigger;

/// The PostgreSQL server tests use. Missing is a test failure, never a silent pass.
pub fn postgres_url() -> String {
    std::env::var("CRM_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("CRM_TEST_POSTGRES_URL is not set: run scripts/test.sh, or point it at a PostgreSQL server")
    })
}

/// The Redis server tests use. Missing is a test failure, never a silent pass.
pub fn redis_url() -> String {
    std::env::var("CRM_TEST_REDIS_URL")
        .unwrap_or_else(|_| panic!("CRM_TEST_REDIS_URL is not set: run scripts/test.sh, or point it at a Redis server"))
}

/// A stream key prefix no other test uses.
pub fn unique_stream_prefix() -> String {
    format!("crm-test:{}:", uuid::Uuid::now_v7().simple())
}

pub enum TestDb {
    Postgres { url: String, server: String, name: String },
    Sqlite { url: String, _dir: tempfile::TempDir },
}

impl TestDb {
    /// A new, empty PostgreSQL database on the test server.
    pub async fn postgres() -> TestDb {
        let server = postgres_url();
        let name = format!("crm_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnectOptions::from_str(&server)
            .expect("CRM_TEST_POSTGRES_URL parses")
            .connect()
            .await
            .expect("connect to CRM_TEST_POSTGRES_URL");
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create test database");
        let _ = conn.close().await;
        let url = with_database(&server, &name);
        TestDb::Postgres { url, server, name }
    }

    /// A new SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        TestDb::Sqlite { url, _dir: dir }
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Postgres { url, .. } | TestDb::Sqlite { url, .. } => url,
        }
    }
}

/// `server` with its database path replaced by `name`.
pub fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (server, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(base.len());
    format!("{}/{name}{query}", &base[..host_end])
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { server, name, .. } = self {
            let (server, name) = (server.clone(), name.clone());
            // Drop is synchronous and may run inside a runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async move {
                    if let Ok(mut conn) = PgConnectOptions::from_str(&server).expect("url").connect().await {
                        let _ = conn
                            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs store tests against SQLite and PostgreSQL: each named `async fn` gets a fresh
/// [`TestDb`] of each backend, or what `setup` makes of it:
///
/// ```ignore
/// crm_kit::both_backends!(people_crud, companies_crud);            // async fn people_crud(db: TestDb)
/// crm_kit::both_backends!(env => people_crud, companies_crud);     // async fn people_crud(env: Env)
/// ```
#[macro_export]
macro_rules! both_backends {
    ($setup:ident => $($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::$setup($crate::testing::TestDb::sqlite()).await).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::$setup($crate::testing::TestDb::postgres().await).await).await })*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::testing::TestDb::sqlite()).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::testing::TestDb::postgres().await).await })*
        }
    };
}

/// A caller holding `permissions`, as the authentication layer hands it on.
pub fn principal(user: &str, permissions: &[&str]) -> Principal {
    let claims =
        Claims { sub: user.into(), perms: permissions.iter().map(|p| p.to_string()).collect(), ..Claims::default() };
    Principal::from_claims(claims, format!("token-of-{user}"))
}

/// `message` as a request from `principal`.
pub fn request<T>(principal: &Principal, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(principal.clone());
    request
}

/// An organisation for tests: who sees whose records, and which users exist. A user without
/// a scope of their own sees their own records only; an id not added is no user.
#[derive(Debug, Clone, Default)]
pub struct Org {
    scopes: Arc<Mutex<HashMap<String, OwnerScope>>>,
    users: Arc<Mutex<HashMap<String, UserStatus>>>,
    /// Department → its users (sub-departments' included).
    departments: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl Org {
    pub fn new() -> Org {
        Org::default()
    }

    /// An active user.
    pub fn user(self, id: &str) -> Org {
        self.set_status(id, UserStatus::Active);
        self
    }

    /// `id` sees every record.
    pub fn sees_all(self, id: &str) -> Org {
        self.scopes.lock().expect("org lock").insert(id.into(), OwnerScope::All);
        self.user(id)
    }

    /// `id` sees the records of `owners` (and their own).
    pub fn sees(self, id: &str, owners: &[&str]) -> Org {
        let mut visible: Vec<String> = owners.iter().map(|o| o.to_string()).collect();
        visible.push(id.to_string());
        visible.sort();
        visible.dedup();
        self.scopes.lock().expect("org lock").insert(id.into(), OwnerScope::Owners(visible.into()));
        self.user(id)
    }

    /// The users of the department `id` (and of the departments below it).
    pub fn department(self, id: &str, members: &[&str]) -> Org {
        let members = members.iter().map(|m| m.to_string()).collect();
        self.departments.lock().expect("org lock").insert(id.into(), members);
        self
    }

    /// Changes a user's status (deactivation, say).
    pub fn set_status(&self, id: &str, status: UserStatus) {
        self.users.lock().expect("org lock").insert(id.into(), status);
    }
}

impl ScopeSource for Org {
    fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
        let scope = self.scopes.lock().expect("org lock").get(&principal.subject).cloned();
        let scope = scope.unwrap_or_else(|| OwnerScope::Owners([principal.subject.clone()].into()));
        Box::pin(async move { Ok(scope) })
    }
}

impl UserDirectory for Org {
    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>> {
        let status = self.users.lock().expect("org lock").get(user_id).copied().unwrap_or(UserStatus::Unknown);
        Box::pin(async move { Ok(status) })
    }

    fn statuses<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<UserStatus>, ApiError>> {
        let users = self.users.lock().expect("org lock");
        let found = user_ids.iter().map(|id| users.get(id).copied().unwrap_or(UserStatus::Unknown)).collect();
        Box::pin(async move { Ok(found) })
    }

    fn department_members<'a>(&'a self, department_id: &'a str) -> BoxFuture<'a, Result<Vec<String>, ApiError>> {
        let members = self.departments.lock().expect("org lock").get(department_id).cloned();
        Box::pin(async move { members.ok_or_else(|| ApiError::invalid("department_id", "no department has this id")) })
    }

    /// A test user's name is "User " and the end of their id.
    fn names<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, String>, ApiError>> {
        let users = self.users.lock().expect("org lock");
        let names = user_ids
            .iter()
            .filter(|id| users.contains_key(*id))
            .map(|id| (id.clone(), format!("User {}", &id[id.len().saturating_sub(4)..])))
            .collect();
        Box::pin(async move { Ok(names) })
    }
}

/// Where [`spawn`] finds the roles the spawned one calls, and the suite it belongs to.
#[derive(Debug, Clone)]
pub struct Surroundings {
    pub suite: Suite,
    pub callees: Vec<Callee>,
    pub credentials: Option<ServiceCredentials>,
}

/// A role serving on 127.0.0.1, stopped (and its database dropped) when this is dropped.
pub struct TestApp {
    pub addr: SocketAddr,
    trigger: Trigger,
    task: Option<tokio::task::JoinHandle<Result<(), crate::role::Error>>>,
    _db: Option<TestDb>,
}

impl TestApp {
    /// A channel to it.
    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).expect("address").connect_lazy()
    }

    /// Stops it gracefully and answers how its serving ended.
    pub async fn stop(mut self) -> Result<(), crate::role::Error> {
        self.trigger.fire();
        let task = self.task.take().expect("running");
        task.await.expect("the role task does not panic")
    }
}

/// Opens the role `S` with `args` on `db` (its migrations applied by opening) and serves it on a
/// free port of 127.0.0.1 until the returned app is stopped or dropped.
pub async fn spawn<S: Service>(args: S::Args, db: Option<TestDb>, around: Surroundings) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
    let addr = listener.local_addr().expect("local address");
    let (trigger, shutdown) = crate::shutdown::channel();
    let peers = Peers::new(
        around.callees,
        crate::balance::Intervals::default(),
        std::time::Duration::from_secs(60),
        around.credentials,
        shutdown.clone(),
    );
    let database = db.as_ref().map(|db| Database { url: db.url().to_string(), max_connections: 4 });
    let events = crate::events::Events::embedded(&around.suite, crate::events::Settings::default());
    let ctx = Context::new(&S::SPEC, around.suite, database, peers, events);
    let opened = S::open(args, ctx).await.unwrap_or_else(|e| panic!("open {}: {e}", S::SPEC.name));
    let task = tokio::spawn(opened.serve(listener, shutdown));
    for service in S::SPEC.services {
        crate::server::wait_serving(addr, service, std::time::Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", S::SPEC.name));
    }
    TestApp { addr, trigger, task: Some(task), _db: db }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.trigger.fire();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_database_name() {
        assert_eq!(super::with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(super::with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(super::with_database("postgres://h/db?sslmode=disable", "x"), "postgres://h/x?sslmode=disable");
    }
}
