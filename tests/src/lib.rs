//! The end-to-end harness: starts the real `crm` binary as separate processes — every role of
//! the suite's list ([`SUITE`]), each told where the roles it calls are — waits until they
//! answer health checks, and hands out gRPC clients, signed in where calls need it. Processes
//! are stopped when dropped; a failing test prints what they logged.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crm_kit::testing::TestDb;
use crm_proto::auth::v1::auth_service_client::AuthServiceClient;
use crm_proto::auth::v1::org_service_client::OrgServiceClient;
use crm_proto::auth::v1::{CreateUserRequest, ListRolesRequest, SignInRequest, TokenPair, User};
use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::deals::v1::deals_service_client::DealsServiceClient;
use crm_proto::notifications::v1::notifications_service_client::NotificationsServiceClient;
use crm_proto::tasks::v1::tasks_service_client::TasksServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use crm::SUITE;

pub const CONTACTS_SERVICE: &str = "crm.contacts.v1.ContactsService";
pub const AUTH_SERVICE: &str = "crm.auth.v1.AuthService";
pub const ORG_SERVICE: &str = "crm.auth.v1.OrgService";
pub const NOTIFICATIONS_SERVICE: &str = "crm.notifications.v1.NotificationsService";
pub const TASKS_SERVICE: &str = "crm.tasks.v1.TasksService";
pub const DEALS_SERVICE: &str = "crm.deals.v1.DealsService";

/// The first administrator of every suite the harness starts.
pub const ADMIN_EMAIL: &str = "admin@example.com";
/// Their password, handed to the suite in `CRM_ADMIN_PASSWORD`.
pub const ADMIN_PASSWORD: &str = "first-admin-password-1";
/// The suite's service account in every cluster the harness starts (what a Secret would hold).
pub const SERVICE_CLIENT_ID: &str = "crm-test-services";
pub const SERVICE_CLIENT_SECRET: &str = "test-service-secret-0123456789abcdef";

/// The `crm` binary, built once per test run so that it is never stale.
pub fn crm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "crm", "--bin", "crm"])
            .current_dir(&workspace)
            .status()
            .expect("run cargo build for the crm binary");
        assert!(status.success(), "building the crm binary failed");
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace.join("target"));
        target.join("debug").join("crm")
    })
}

/// A port free right now on 127.0.0.1, never handed out before in this test process, and
/// outside the kernel's ephemeral range (32768 and up here): the processes under test bind
/// their own internal listeners to port 0, and an ephemeral port handed out here could be given
/// to one of them before the process it was meant for listens on it.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Each test process starts at its own place in the range.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, (std::process::id() * 97) % SPAN, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(port).expect("a port");
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("local addr");
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// A running `crm` process; its output goes to a log file shown when a test fails.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `crm <args>` with `env` on top of the test's environment (minus the
    /// administrator password, which only a test sets).
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::start_program(crm_bin(), name, args, env)
    }

    /// Starts `program <args>` the same way.
    pub fn start_program(program: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut process = Process {
            name: name.to_string(),
            child: None,
            log: PathBuf::new(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            _dir: tempfile::tempdir().expect("temp dir"),
        };
        process.log = process._dir.path().join(format!("{name}.log"));
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(file.try_clone().expect("clone log")).stderr(file);
        cmd.env("RUST_LOG", "info").env_remove("OTEL_EXPORTER_OTLP_ENDPOINT").env_remove("CRM_ADMIN_PASSWORD");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", self.name)));
    }

    /// Starts it again as it was first started (after a kill, say); its log goes on.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends a signal (`STOP`, `CONT`…) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {}", self.name);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL), like a crashed pod.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `within` for the exit; returns whether it exited cleanly.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// Waits up to `within` for the process to exit on its own; `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the process answers `grpc.health.v1` SERVING for `service` at `addr`.
    pub async fn wait_serving(&mut self, addr: SocketAddr, service: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("{} exited with {status} before serving:\n{}", self.name, self.output());
            }
            if health(addr, service).await == Some(ServingStatus::Serving) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{} did not become healthy at {addr}:\n{}", self.name, self.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `within` until the output contains `text`.
    pub async fn wait_output(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.output().contains(text) {
            assert!(Instant::now() < deadline, "{} never printed {text:?}:\n{}", self.name, self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} output ----\n{}", self.name, self.output());
        }
        self.kill();
    }
}

/// Runs `crm migrate <role> --database-url <url>` to completion.
pub async fn migrate(service: &str, url: &str) {
    let mut migrate = Process::start(&format!("migrate-{service}"), &["migrate", service, "--database-url", url], &[]);
    let status = migrate.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()) && migrate.output().contains("is up to date"),
        "crm migrate {service} ended with {status:?}:\n{}",
        migrate.output()
    );
}

/// How [`Cluster::start`] runs the suite.
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// Replicas of a role (each its own process, sharing the role's database); 1 when not
    /// named, e.g. `("contacts", 2)`.
    pub replicas: Vec<(&'static str, usize)>,
    /// Extra flags for every process of a role, e.g. `("auth", vec!["--access-token-ttl", "2s"])`.
    pub flags: Vec<(&'static str, Vec<String>)>,
    /// Extra environment variables for every process of a role (secrets that are never flags),
    /// e.g. `("notifications", "CRM_SMS_API_KEY", "key")`.
    pub env: Vec<(&'static str, &'static str, String)>,
}

impl ClusterConfig {
    fn replicas(&self, role: &str) -> usize {
        self.replicas.iter().find(|(r, _)| *r == role).map_or(1, |(_, n)| *n)
    }

    fn flags(&self, role: &str) -> Vec<String> {
        self.flags.iter().filter(|(r, _)| *r == role).flat_map(|(_, f)| f.iter().cloned()).collect()
    }
}

/// The processes of one role: each replica's address and process.
pub struct Replicas {
    pub role: &'static str,
    pub replicas: Vec<(SocketAddr, Process)>,
}

/// The environment every process of a suite the harness starts gets: the first administrator
/// ([`ADMIN_EMAIL`], [`ADMIN_PASSWORD`]), calling code 7 and the suite's service account.
pub fn suite_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CRM_ADMIN_EMAIL", ADMIN_EMAIL),
        ("CRM_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("CRM_DEFAULT_CALLING_CODE", "7"),
        ("CRM_SERVICE_CLIENT_ID", SERVICE_CLIENT_ID),
        ("CRM_SERVICE_CLIENT_SECRET", SERVICE_CLIENT_SECRET),
    ]
    .into_iter()
    .chain(UNLIMITED)
    .collect()
}

/// The gateway's rate limits off: tests drive thousands of calls as one user from one address
/// (the tests of the limits set their own).
pub const UNLIMITED: [(&str, &str); 3] = [
    ("CRM_GATEWAY_RATE_LIMIT_USER", "off"),
    ("CRM_GATEWAY_RATE_LIMIT_CLIENT", "off"),
    ("CRM_GATEWAY_RATE_LIMIT_ANONYMOUS", "off"),
];

/// The suite in cluster mode, from the role list: one process per replica of each role, one
/// PostgreSQL database per role that has one, the front role (the gateway) in front. Processes
/// are listed before the databases so that they stop first.
pub struct Cluster {
    /// The front role's address.
    pub gateway: SocketAddr,
    /// Where its events travel: the test Redis, under a prefix of this cluster's own.
    pub redis_url: String,
    pub stream_prefix: String,
    roles: Vec<Replicas>,
    dbs: Vec<(&'static str, TestDb)>,
}

impl Cluster {
    /// Migrates a fresh database for every role that has one (`crm migrate`), starts every
    /// role's replicas (`crm serve <role>`, each told where its callees are), waits until they
    /// serve, then starts the front role and waits until it serves every service.
    pub async fn start(config: ClusterConfig) -> Cluster {
        let with_db: Vec<&str> =
            SUITE.roles().iter().filter(|r| r.migrations().is_some()).map(|r| r.spec().name).collect();
        let dbs = futures_util::future::join_all(with_db.iter().map(|_| TestDb::postgres())).await;
        futures_util::future::join_all(with_db.iter().zip(&dbs).map(|(role, db)| migrate(role, db.url()))).await;
        let database = |role: &str| with_db.iter().position(|r| *r == role).map(|i| dbs[i].url().to_string());

        let addrs: Vec<(&str, Vec<SocketAddr>)> = SUITE
            .roles()
            .iter()
            .map(|r| (r.spec().name, (0..config.replicas(r.spec().name)).map(|_| free_addr()).collect()))
            .collect();
        let addrs_of = |role: &str| addrs.iter().find(|(r, _)| *r == role).map(|(_, a)| a.clone()).unwrap_or_default();
        let (redis_url, stream_prefix) = (crm_kit::testing::redis_url(), crm_kit::testing::unique_stream_prefix());
        let mut env: Vec<(&str, &str)> = suite_env();
        env.extend([("CRM_REDIS_URL", redis_url.as_str()), ("CRM_EVENTS_STREAM_PREFIX", stream_prefix.as_str())]);
        let mut roles = Vec::new();
        let mut gateway = None;
        // Every role but the front one starts at once; the front one once they serve, so that
        // its first health checks find them all and it balances over all of them from its
        // first call.
        for front in [false, true] {
            for role in SUITE.roles().iter().filter(|r| r.spec().is_front() == front) {
                let spec = role.spec();
                let mut replicas = Vec::new();
                for (i, addr) in addrs_of(spec.name).into_iter().enumerate() {
                    let mut args = vec![
                        "serve".to_string(),
                        spec.name.into(),
                        format!("--{}-listen", spec.name),
                        addr.to_string(),
                    ];
                    if let Some(url) = database(spec.name) {
                        args.extend([format!("--{}-database-url", spec.name), url]);
                    }
                    for callee in SUITE.callees(spec) {
                        let list: Vec<String> = addrs_of(callee.name).iter().map(|a| a.to_string()).collect();
                        args.extend([format!("--{}-addr", callee.name), list.join(",")]);
                    }
                    args.extend(config.flags(spec.name));
                    let name = if front { spec.name.to_string() } else { format!("{}-{i}", spec.name) };
                    let mut env = env.clone();
                    env.extend(config.env.iter().filter(|(r, _, _)| *r == spec.name).map(|(_, k, v)| (*k, v.as_str())));
                    replicas.push((addr, Process::start(&name, &strs(&args), &env)));
                }
                roles.push(Replicas { role: spec.name, replicas });
            }
            for group in roles.iter_mut().filter(|g| SUITE.get(g.role).is_some_and(|r| r.spec().is_front() == front)) {
                let spec = SUITE.get(group.role).expect("a role of the suite").spec();
                let services: Vec<&str> = if spec.is_front() { served_services() } else { spec.services.to_vec() };
                for (addr, process) in &mut group.replicas {
                    for service in &services {
                        process.wait_serving(*addr, service).await;
                    }
                    if spec.is_front() {
                        gateway = Some(*addr);
                    }
                }
            }
        }
        let dbs = with_db.into_iter().zip(dbs).collect();
        Cluster { gateway: gateway.expect("the suite has a front role"), redis_url, stream_prefix, roles, dbs }
    }

    fn group(&self, role: &str) -> &Replicas {
        self.roles.iter().find(|g| g.role == role).unwrap_or_else(|| panic!("no role {role} in the cluster"))
    }

    /// The database of `role`.
    pub fn database_url(&self, role: &str) -> &str {
        self.dbs
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, db)| db.url())
            .unwrap_or_else(|| panic!("{role} has no database"))
    }

    /// The address of replica `i` of `role`, to call it directly (not through the gateway).
    pub fn replica(&self, role: &str, i: usize) -> SocketAddr {
        self.group(role).replicas[i].0
    }

    /// The process id of replica `i` of `role`.
    pub fn process_pid(&self, role: &str, i: usize) -> u32 {
        self.group(role).replicas[i].1.pid()
    }

    /// What replica `i` of `role` has logged so far.
    pub fn output(&self, role: &str, i: usize) -> String {
        self.group(role).replicas[i].1.output()
    }

    /// The address of every process of the cluster.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.roles.iter().flat_map(|g| g.replicas.iter().map(|(addr, _)| *addr)).collect()
    }

    /// The process of replica `i` of `role`.
    pub fn process(&mut self, role: &str, i: usize) -> &mut Process {
        let group = self.roles.iter_mut().find(|g| g.role == role).unwrap_or_else(|| panic!("no role {role}"));
        &mut group.replicas[i].1
    }
}

/// A Redis server of a test's own (so that it can be stopped, killed and restarted empty), on a
/// free port, keeping nothing on disk.
pub struct RedisServer {
    pub port: u16,
    pub process: Process,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = free_addr().port();
        let args = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let process = Process::start_program(Path::new("redis-server"), &format!("redis-{port}"), &args, &[]);
        let server = RedisServer { port, process };
        server.wait_ready().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until it answers PING.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("redis-cli").args(["-p", &self.port.to_string(), "ping"]).output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG") {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it and starts it again, empty (as a Redis that keeps nothing on disk restarts).
    pub async fn restart_empty(&mut self) {
        self.process.restart();
        self.wait_ready().await;
    }
}

/// A real Prometheus (Debian's `prometheus`) scraping `targets` every second, keeping its data in
/// a directory of its own, on a free port.
pub struct Prometheus {
    pub addr: SocketAddr,
    pub process: Process,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub async fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("a directory for Prometheus");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: crm\n    \
             static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write the Prometheus configuration");
        let addr = free_addr();
        let args = [
            format!("--config.file={}", file.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={addr}"),
            // Exemplars (trace ids on histogram buckets) scraped and kept.
            "--enable-feature=exemplar-storage".to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::start_program(Path::new("prometheus"), "prometheus", &args, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() || http_get(addr, "/-/ready").await.0 != 200 {
            assert!(Instant::now() < deadline, "Prometheus did not start:\n{}", process.output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Prometheus { addr, process, _dir: dir }
    }

    /// An instant PromQL query: its result vector (`data.result`).
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", url_encode(promql))).await;
        assert_eq!(status, 200, "{promql}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
        answer["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The exemplars of the series `selector` selects over the last hour (`data`: one entry per
    /// series, each with its `exemplars`).
    pub async fn exemplars(&self, selector: &str) -> Vec<serde_json::Value> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
        let path =
            format!("/api/v1/query_exemplars?query={}&start={}&end={}", url_encode(selector), now - 3600, now + 60);
        let (status, body) = http_get(self.addr, &path).await;
        assert_eq!(status, 200, "{selector}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
        answer["data"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (up to 30 s) until `promql` gives one sample equal to `expected`.
    pub async fn wait_for(&self, promql: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let result = self.query(promql).await;
            let value = result.first().and_then(|r| r["value"][1].as_str()).and_then(|v| v.parse::<f64>().ok());
            if value == Some(expected) {
                return;
            }
            assert!(Instant::now() < deadline, "{promql} gave {result:?}, expected {expected}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One span an [`OtlpReceiver`] received, its ids in hex.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    /// OTLP's span kind: 2 server, 3 client, 5 consumer…
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent_span_id: String,
    /// Attribute values as text.
    pub attributes: std::collections::HashMap<String, String>,
    /// The spans it links to: (trace id, span id).
    pub links: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// A minimal OpenTelemetry collector: the OTLP trace service over gRPC (its
/// `opentelemetry-proto` definitions) on a free port, keeping every span it is sent.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let text = |value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match value
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                    links: span.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                });
            }
        }
        self.0.lock().expect("spans lock").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("its address");
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let service = TraceServiceServer::new(Collector(spans.clone()));
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        OtlpReceiver { addr, spans, server }
    }

    /// The environment that makes a `crm` process export its spans here, without delay.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", self.addr)),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ]
    }

    /// Every span received of trace `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans lock").iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// Waits (up to 30 s) until the spans of `trace_id` satisfy `complete`; returns them.
    pub async fn wait_for(&self, trace_id: &str, complete: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.trace(trace_id);
            if complete(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "trace {trace_id} is incomplete: {spans:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn url_encode(text: &str) -> String {
    let mut encoded = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// Every service the suite serves, as the front role reports them.
pub fn served_services() -> Vec<&'static str> {
    SUITE.services()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The password of every user [`member`] creates.
pub const MEMBER_PASSWORD: &str = "member-password-1";

/// Creates `user`, active and with the role named `role`, as the administrator (`admin`'s
/// token), and signs them in with [`MEMBER_PASSWORD`]: the user and their access token.
pub async fn member(gw: SocketAddr, admin: &str, role: &str, user: User) -> (User, String) {
    let mut org = org_as(gw, admin).await;
    let roles = org.list_roles(ListRolesRequest { page_size: 100, ..Default::default() }).await.unwrap().into_inner();
    let role_id = roles.roles.iter().find(|r| r.name == role).unwrap_or_else(|| panic!("a {role} role")).id.clone();
    let user = User { role_ids: vec![role_id], active: true, ..user };
    let request = CreateUserRequest { user: Some(user), password: MEMBER_PASSWORD.into() };
    let user = org.create_user(request).await.unwrap().into_inner();
    let token = sign_in(gw, &user.email, MEMBER_PASSWORD).await.expect("the member signs in").access_token;
    (user, token)
}

/// A new salesperson named by their e-mail, in no department: the user and their access token.
pub async fn salesperson(gw: SocketAddr, admin: &str, email: &str) -> (User, String) {
    member(gw, admin, "Salesperson", User { email: email.into(), display_name: email.into(), ..Default::default() })
        .await
}

/// Runs a test peer written in another language, `program tests/peers/<script> <args>`, which
/// prints one JSON line; asserts it succeeded and returns that line.
pub async fn run_peer(program: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers").join(script);
    let output =
        tokio::process::Command::new(program).arg(&path).args(args).output().await.expect("the peer's program runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{script} failed: {stdout}{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script} printed no JSON line ({e}): {stdout}"))
}

/// Starts `crm dev` on `data_dir`, its gateway on `addr`, with [`ADMIN_EMAIL`] as the first
/// administrator and `env` (e.g. `CRM_ADMIN_PASSWORD`; the gateway's rate limits are off unless
/// `env` sets them); waits until it serves every service and has printed its banner.
pub async fn start_dev(name: &str, data_dir: &Path, addr: SocketAddr, env: &[(&str, &str)]) -> Process {
    let args = [
        "dev",
        "--data-dir",
        data_dir.to_str().expect("UTF-8 path"),
        "--listen",
        &addr.to_string(),
        "--admin-email",
        ADMIN_EMAIL,
        "--default-calling-code",
        "7",
    ];
    let env: Vec<(&str, &str)> = UNLIMITED.into_iter().chain(env.iter().copied()).collect();
    let mut dev = Process::start(name, &args, &env);
    for service in served_services() {
        dev.wait_serving(addr, service).await;
    }
    // The banner says how to call it once the suite is ready.
    dev.wait_output(&format!("grpcurl -plaintext {addr} list"), Duration::from_secs(10)).await;
    dev
}

/// A channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Adds `authorization: Bearer <token>` to every call made through it.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Bearer {
        Bearer(format!("Bearer {token}").parse().expect("the token is a valid header value"))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel whose calls carry an access token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A channel to `addr` whose calls carry `token`.
pub async fn authed(addr: SocketAddr, token: &str) -> Authed {
    InterceptedService::new(channel(addr).await, Bearer::new(token))
}

/// Contacts at `addr` without a token (only health-like behaviour is expected of it).
pub async fn contacts(addr: SocketAddr) -> ContactsServiceClient<Channel> {
    ContactsServiceClient::new(channel(addr).await)
}

/// Contacts at `addr`, calling as the holder of `token`.
pub async fn contacts_as(addr: SocketAddr, token: &str) -> ContactsServiceClient<Authed> {
    ContactsServiceClient::new(authed(addr, token).await)
}

/// The organisation service at `addr`, calling as the holder of `token`.
pub async fn org_as(addr: SocketAddr, token: &str) -> OrgServiceClient<Authed> {
    OrgServiceClient::new(authed(addr, token).await)
}

/// Deals at `addr`, calling as the holder of `token`.
pub async fn deals_as(addr: SocketAddr, token: &str) -> DealsServiceClient<Authed> {
    DealsServiceClient::new(authed(addr, token).await)
}

/// Tasks at `addr`, calling as the holder of `token`.
pub async fn tasks_as(addr: SocketAddr, token: &str) -> TasksServiceClient<Authed> {
    TasksServiceClient::new(authed(addr, token).await)
}

/// Notifications at `addr`, calling as the holder of `token`.
pub async fn notifications_as(addr: SocketAddr, token: &str) -> NotificationsServiceClient<Authed> {
    NotificationsServiceClient::new(authed(addr, token).await)
}

/// The auth service at `addr` without a token: sign-in, refresh, sign-out, keys.
pub async fn auth(addr: SocketAddr) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(channel(addr).await)
}

/// The auth service at `addr`, calling as the holder of `token`.
pub async fn auth_as(addr: SocketAddr, token: &str) -> AuthServiceClient<Authed> {
    AuthServiceClient::new(authed(addr, token).await)
}

/// Signs in with an e-mail and password at `addr` (the gateway, or auth itself).
pub async fn sign_in(addr: SocketAddr, email: &str, password: &str) -> Result<TokenPair, tonic::Status> {
    let request = SignInRequest { email: email.into(), password: password.into() };
    auth(addr).await.sign_in(request).await.map(tonic::Response::into_inner)
}

/// An access token of the first administrator.
pub async fn admin_token(addr: SocketAddr) -> String {
    sign_in(addr, ADMIN_EMAIL, ADMIN_PASSWORD).await.expect("the administrator signs in").access_token
}

/// The health of `service` ("" for the whole process) at `addr`, if it answers.
pub async fn health(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel).check(HealthCheckRequest { service: service.to_string() }).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "", "").await
}

/// A plain HTTP/1.1 request with a bearer `token` (none when empty) and a JSON `body` (none
/// when empty); returns the status code and body.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !token.is_empty() {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let chunked = head.lines().any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    (status, if chunked { dechunk(body) } else { body.to_string() })
}

/// A chunked HTTP/1.1 body's content.
fn dechunk(mut body: &str) -> String {
    let mut content = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        content.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    content
}

/// An HTTP/1.1 response read as it streams (a REST server stream): its status and headers,
/// then its chunked body as it arrives.
pub struct HttpStream {
    pub status: u16,
    pub head: String,
    stream: tokio::net::TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
}

impl HttpStream {
    /// Sends `GET path` with a bearer `token` and an `Accept` header, and reads the head.
    pub async fn get(addr: SocketAddr, path: &str, token: &str, accept: &str) -> HttpStream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: {accept}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
                .await
                .expect("response head within 20s")
                .expect("read");
            assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let raw = raw[end + 4..].to_vec();
        HttpStream { status, head, stream, raw, body: Vec::new() }
    }

    /// The body received so far (chunks decoded).
    pub fn body(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// Reads until the body holds `needle`, for at most `within`; the body so far.
    pub async fn read_until(&mut self, needle: &str, within: Duration) -> String {
        use tokio::io::AsyncReadExt;
        let deadline = Instant::now() + within;
        loop {
            self.decode();
            if self.body().contains(needle) {
                return self.body();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 4096];
            let n = match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(read) => read.expect("read"),
                Err(_) => panic!("{needle:?} not streamed within {within:?}; got {:?}", self.body()),
            };
            assert!(n > 0, "the stream ended before {needle:?}; got {:?}", self.body());
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// Moves every whole chunk from `raw` into `body` (all of `raw` when the body is not chunked).
    fn decode(&mut self) {
        if !self.head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            self.body.append(&mut self.raw);
            return;
        }
        loop {
            let Some(line) = self.raw.windows(2).position(|w| w == b"\r\n") else { return };
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&self.raw[..line]).trim(), 16).expect("chunk size");
            if self.raw.len() < line + 2 + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[line + 2..line + 2 + size]);
            self.raw.drain(..line + 2 + size + 2);
        }
    }
}

/// A real server of the tests' own (`tests/peers/`): an SMTP server ([`Sink::smtp`], aiosmtpd)
/// or an HTTP server ([`Sink::http`]) that verifies webhook signatures with the Standard
/// Webhooks library, each on a free port, writing what it receives into a directory as JSON
/// (decoded by Python's own libraries); it can be told to refuse or to hold ([`Sink::control`]).
pub struct Sink {
    pub port: u16,
    pub process: Process,
    dir: tempfile::TempDir,
    control: PathBuf,
}

impl Sink {
    /// An SMTP server.
    pub async fn smtp() -> Sink {
        Sink::start("smtp_sink.py").await
    }

    /// An HTTP server taking POSTs at any path.
    pub async fn http() -> Sink {
        Sink::start("http_sink.py").await
    }

    async fn start(script: &str) -> Sink {
        let dir = tempfile::tempdir().expect("temp dir");
        let control = dir.path().join("control.json");
        std::fs::write(&control, "{}").expect("write the control file");
        let mail = dir.path().join("received");
        std::fs::create_dir(&mail).expect("received dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers").join(script);
        let port = free_addr().port();
        let args = [
            script.to_str().expect("UTF-8 path"),
            "--port",
            &port.to_string(),
            "--dir",
            mail.to_str().expect("UTF-8 path"),
            "--control",
            control.to_str().expect("UTF-8 path"),
        ];
        let process = Process::start_program(Path::new("python3"), &format!("sink-{port}"), &args, &[]);
        process.wait_output("ready", Duration::from_secs(30)).await;
        Sink { port, process, dir, control }
    }

    /// Its address as a URL path, for an HTTP sink: `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The notifications flags that send e-mail here (an SMTP sink).
    pub fn smtp_flags(&self) -> Vec<String> {
        ["--smtp-host", "127.0.0.1", "--smtp-port", &self.port.to_string(), "--smtp-tls", "none", "--smtp-from"]
            .iter()
            .map(|s| s.to_string())
            .chain(["CRM <crm@example.com>".to_string()])
            .collect()
    }

    /// Sets how it behaves from the next message on: SMTP `{"fail": 2, "code": 451}`,
    /// `{"hold": true}`; HTTP `{"secret": "whsec_…", "fail": 2, "status": 503}`; `{}`.
    pub fn control(&self, control: serde_json::Value) {
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, control.to_string()).expect("write the control file");
        std::fs::rename(&tmp, &self.control).expect("replace the control file");
    }

    /// Everything received so far, in order, as JSON: for e-mail `subject`, `to`, `body`,
    /// `message_id`, `charset`, `rcpt_tos`…; for HTTP `path`, `headers`, `body`, `status`,
    /// `verified`.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        let mail = self.dir.path().join("received");
        let mut numbered: Vec<(u64, serde_json::Value)> = std::fs::read_dir(&mail)
            .expect("read the mail dir")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n: u64 = name.strip_suffix(".json")?.parse().ok()?;
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some((n, serde_json::from_str(&text).expect("the sink writes JSON")))
            })
            .collect();
        numbered.sort_by_key(|(n, _)| *n);
        numbered.into_iter().map(|(_, m)| m).collect()
    }

    /// Whether a message is being held (received, its reply not sent).
    pub fn holding(&self) -> bool {
        std::fs::read_dir(self.dir.path().join("received"))
            .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".held")))
            .unwrap_or(false)
    }

    /// Waits until `count` messages have arrived (failing after `within`) and returns them all.
    pub async fn wait_for(&self, count: usize, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let messages = self.messages();
            if messages.len() >= count {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "{count} message(s) expected, {} arrived:\n{}",
                messages.len(),
                self.process.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
