//! The role contract (ARCHITECTURE §2): a service is an entry in the suite's list of roles, not a
//! copy of the others' wiring.
//!
//! A role is a type implementing [`Service`]: its [`RoleSpec`] (name, gRPC packages and
//! services, permissions, public methods, whom it calls), its own settings as a `clap::Args`
//! type, its migrations, and [`Service::open`], which turns settings and a [`Context`] into an
//! [`Opened`] role — a server with its services, readiness and background jobs — that serves a
//! listener until shutdown (mini-redis's `run(listener, shutdown)`).
//!
//! Everything else iterates over the list ([`Suite`]): `crm serve`, `crm migrate` and `crm dev`,
//! the flags that place each role (`--<role>-listen`, `--<role>-database-url`,
//! `--<role>-max-connections`, `--<role>-addr`, generated here in one place), the gateway's
//! upstream table, the permission catalog and the end-to-end harness.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;

use crate::auth::{
    AUTH_ROLE, Authenticator, Catalog, Permission, ScopeCache, ServiceCredentials, Verifier, Visibility,
    is_organisation_change,
};
use crate::balance::Intervals;
use crate::db::{Db, Migrations};
use crate::events::{Events, Listener, Outbox, Relay};
use crate::peer::{Callee, Peer, Peers};
use crate::server::{Server, ServerSettings};
use crate::shutdown::Shutdown;

/// Any error a role reports; shown to the operator as is.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the suite knows of a role without running it.
#[derive(Debug)]
pub struct RoleSpec {
    /// Names the role on the command line (`crm serve contacts`) and in its flags
    /// (`--contacts-listen`, `CRM_CONTACTS_LISTEN`).
    pub name: &'static str,
    /// What it is, for help texts: "the contacts service".
    pub title: &'static str,
    /// Protobuf packages it serves: the gateway routes `/crm.contacts.v1.<Service>/<Method>` here.
    pub packages: &'static [&'static str],
    /// Full names of the gRPC services it serves, the first being its main one.
    pub services: &'static [&'static str],
    /// Methods callable without an access token (full paths: `/crm.auth.v1.AuthService/SignIn`).
    pub public_methods: &'static [&'static str],
    /// The permissions its calls check.
    pub permissions: &'static [Permission],
    /// The port it listens on by default (`0.0.0.0:<port>`).
    pub default_port: u16,
    /// The roles it calls.
    pub calls: Calls,
    /// The roles whose events it consumes as a durable consumer group (named after it): their
    /// relays keep every event until this group has it.
    pub consumes: &'static [&'static str],
}

/// Whom a role calls.
#[derive(Debug, Clone, Copy)]
pub enum Calls {
    /// These roles, by name.
    Roles(&'static [&'static str]),
    /// Every role that serves packages: the gateway, in front of the suite.
    Every,
}

impl RoleSpec {
    /// Whether this role fronts the suite (the gateway).
    pub fn is_front(&self) -> bool {
        matches!(self.calls, Calls::Every)
    }

    /// Its main gRPC service.
    pub fn main_service(&self) -> Option<&'static str> {
        self.services.first().copied()
    }

    /// The heading of its flags in `--help`: its title, capitalised ("Contacts service").
    pub fn heading(&self) -> String {
        let title = self.title.strip_prefix("the ").unwrap_or(self.title);
        let mut chars = title.chars();
        chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
    }
}

/// A role, typed: what a service crate implements.
pub trait Service: Send + Sync + 'static {
    /// The role's own settings, as flags with environment variables; `crm serve` and `crm dev`
    /// both take them.
    type Args: clap::Args + Clone + std::fmt::Debug + Send + Sync + 'static;

    const SPEC: RoleSpec;

    /// Both dialects' migrations, for a role with a database of its own.
    fn migrations() -> Option<Migrations> {
        None
    }

    /// Opens the role (its database, first-start work) ready to serve.
    fn open(args: Self::Args, ctx: Context) -> impl Future<Output = Result<Opened, Error>> + Send;
}

/// A role, as the suite's list holds it: [`Entry<S>`] for any [`Service`] `S`.
pub trait Role: Send + Sync {
    fn spec(&self) -> &'static RoleSpec;
    fn migrations(&self) -> Option<Migrations>;
    /// Adds the role's own settings to a command.
    fn augment_args(&self, cmd: Command) -> Command;
    /// Reads the role's settings from `matches` and opens it.
    fn open(&self, matches: &ArgMatches, ctx: Context) -> BoxFuture<'static, Result<Opened, Error>>;
}

/// The list entry of the [`Service`] `S`: `&Entry::<Contacts>::NEW`.
pub struct Entry<S>(PhantomData<fn() -> S>);

impl<S> Entry<S> {
    pub const NEW: Entry<S> = Entry(PhantomData);
}

impl<S: Service> Role for Entry<S> {
    fn spec(&self) -> &'static RoleSpec {
        &S::SPEC
    }

    fn migrations(&self) -> Option<Migrations> {
        S::migrations()
    }

    fn augment_args(&self, cmd: Command) -> Command {
        <S::Args as clap::Args>::augment_args(cmd)
    }

    fn open(&self, matches: &ArgMatches, ctx: Context) -> BoxFuture<'static, Result<Opened, Error>> {
        match <S::Args as clap::FromArgMatches>::from_arg_matches(matches) {
            Ok(args) => Box::pin(S::open(args, ctx)),
            Err(err) => Box::pin(std::future::ready(Err(err.into()))),
        }
    }
}

/// The roles of the suite, in the order they start (a role starts after those it calls).
#[derive(Clone, Copy)]
pub struct Suite {
    roles: &'static [&'static dyn Role],
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.roles.iter().map(|r| r.spec().name)).finish()
    }
}

impl Suite {
    pub const fn new(roles: &'static [&'static dyn Role]) -> Suite {
        Suite { roles }
    }

    pub fn roles(&self) -> &'static [&'static dyn Role] {
        self.roles
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.roles.iter().map(|r| r.spec().name).collect()
    }

    pub fn get(&self, name: &str) -> Option<&'static dyn Role> {
        self.roles.iter().copied().find(|r| r.spec().name == name)
    }

    /// Every permission the suite's calls check.
    pub fn catalog(&self) -> Catalog {
        Catalog::new(self.roles.iter().flat_map(|r| r.spec().permissions.iter().copied()))
    }

    /// Every method callable without a token.
    pub fn public_methods(&self) -> Vec<&'static str> {
        self.roles.iter().flat_map(|r| r.spec().public_methods.iter().copied()).collect()
    }

    /// Every gRPC service the suite serves (what the front role reports health for).
    pub fn services(&self) -> Vec<&'static str> {
        self.routed().flat_map(|spec| spec.services.iter().copied()).collect()
    }

    /// The roles that serve gRPC packages (the gateway's upstreams).
    pub fn routed(&self) -> impl Iterator<Item = &'static RoleSpec> + '_ {
        self.roles.iter().map(|r| r.spec()).filter(|s| !s.packages.is_empty())
    }

    /// The roles `spec` calls.
    pub fn callees(&self, spec: &RoleSpec) -> Vec<&'static RoleSpec> {
        match spec.calls {
            Calls::Roles(names) => names.iter().filter_map(|n| self.get(n)).map(|r| r.spec()).collect(),
            Calls::Every => self.routed().filter(|s| s.name != spec.name).collect(),
        }
    }

    /// Adds every role's own settings to `cmd`.
    pub fn settings_args(&self, mut cmd: Command) -> Command {
        for role in self.roles {
            cmd = role.augment_args(cmd);
        }
        cmd
    }

    /// Adds the flags that place each role in a cluster: where it listens, its database, and
    /// where the roles that call it find it.
    pub fn placement_args(&self, mut cmd: Command) -> Command {
        for role in self.roles {
            let spec = role.spec();
            let (name, title) = (spec.name, spec.title);
            cmd = cmd.next_help_heading(spec.heading());
            cmd = cmd.arg(
                flag(name, "listen")
                    .arg()
                    .value_name("ADDR")
                    .value_parser(clap::value_parser!(SocketAddr))
                    .default_value(format!("0.0.0.0:{}", spec.default_port))
                    .help(format!("Address {title} listens on (gRPC, gRPC-Web, /healthz, /readyz, /metrics)")),
            );
            if role.migrations().is_some() {
                cmd = cmd
                    .arg(flag(name, "database-url").arg().value_name("URL").help(format!(
                        "Database of {title}: postgres://user:password@host/db or sqlite://path/{name}.db"
                    )))
                    .arg(
                        flag(name, "max-connections")
                            .arg()
                            .value_name("N")
                            .value_parser(clap::value_parser!(u32).range(1..))
                            .default_value("16")
                            .help(format!("Most database connections one process of {title} holds")),
                    );
            }
            if !spec.packages.is_empty() {
                cmd = cmd.arg(
                    flag(name, "addr")
                        .arg()
                        .value_name("HOST:PORT,...")
                        .value_delimiter(',')
                        .action(ArgAction::Append)
                        .help(format!(
                            "Replicas of {title} for the roles that call it: comma-separated host:port list \
                             (DNS names are re-resolved and resolve to every replica; point it at a headless \
                             Service). Roles served in one process find each other without it"
                        )),
                );
            }
        }
        cmd.next_help_heading(None::<&str>)
    }
}

/// The names of one of a role's placement flags (`what`: "listen", "database-url",
/// "max-connections", "addr"): the clap id, the flag and its environment variable.
pub(crate) struct FlagName {
    pub(crate) id: String,
    pub(crate) long: String,
    pub(crate) env: String,
}

pub(crate) fn flag(role: &str, what: &str) -> FlagName {
    FlagName {
        id: format!("{role}_{}", what.replace('-', "_")),
        long: format!("{role}-{what}"),
        env: format!("CRM_{}_{}", role.to_uppercase(), what.replace('-', "_").to_uppercase()),
    }
}

impl FlagName {
    fn arg(self) -> Arg {
        Arg::new(self.id).long(self.long).env(self.env)
    }
}

/// A role's database: where, and how many connections one process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub url: String,
    pub max_connections: u32,
}

/// Where `crm serve` places a role, read from the flags of [`Suite::placement_args`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub listen: SocketAddr,
    pub database: Option<Database>,
    /// Its replicas, as the roles that call it find them; empty: not configured.
    pub addrs: Vec<String>,
}

impl Placement {
    /// Reads role `spec`'s placement; refuses replica addresses that are not `host:port`.
    pub fn read(matches: &ArgMatches, spec: &RoleSpec) -> Result<Placement, Error> {
        let name = spec.name;
        let listen = *matches.get_one::<SocketAddr>(&flag(name, "listen").id).ok_or("listen address")?;
        let url =
            matches.try_get_one::<String>(&flag(name, "database-url").id).ok().flatten().filter(|u| !u.is_empty());
        let max_connections =
            matches.try_get_one::<u32>(&flag(name, "max-connections").id).ok().flatten().copied().unwrap_or(16);
        let addrs: Vec<String> = matches
            .try_get_many::<String>(&flag(name, "addr").id)
            .ok()
            .flatten()
            .map(|values| values.map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect())
            .unwrap_or_default();
        if let Some(bad) = addrs.iter().find(|a| !is_host_port(a)) {
            return Err(format!("--{}: {bad:?} is not a host:port address", flag(name, "addr").long).into());
        }
        Ok(Placement { listen, database: url.map(|url| Database { url: url.clone(), max_connections }), addrs })
    }

    /// Where a role listening on `listen` is reached from the same machine.
    pub fn local_addr(listen: SocketAddr) -> String {
        let host = if listen.ip().is_unspecified() { "127.0.0.1".to_string() } else { listen.ip().to_string() };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        format!("{host}:{}", listen.port())
    }
}

/// `host:port` with a non-empty host and a numeric port (`[v6]:port` included).
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Settings every process takes, whatever its roles.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Every process")]
pub struct CommonArgs {
    /// How often token verification keys are refetched from the auth service (a token signed
    /// by a key not seen yet fetches them at once), e.g. "60s".
    #[arg(
        long = "keys-refresh-interval",
        value_name = "DURATION",
        env = "CRM_KEYS_REFRESH_INTERVAL",
        default_value = "60s",
        value_parser = crate::config::parse_duration
    )]
    pub keys_refresh_interval: Duration,
    /// How often the host names of the services this process calls are re-resolved, e.g. "5s".
    #[arg(
        long = "discovery-interval",
        value_name = "DURATION",
        env = "CRM_DISCOVERY_INTERVAL",
        default_value = "5s",
        value_parser = crate::config::parse_duration
    )]
    pub discovery_interval: Duration,
    /// How often every replica of a service this process calls is health-checked
    /// (`grpc.health.v1.Health/Check`), e.g. "1s".
    #[arg(
        long = "health-interval",
        value_name = "DURATION",
        env = "CRM_HEALTH_INTERVAL",
        default_value = "1s",
        value_parser = crate::config::parse_duration
    )]
    pub health_interval: Duration,
    /// Calls one HTTP/2 connection may have open at once (advertised to clients).
    #[arg(
        long = "max-concurrent-streams",
        value_name = "N",
        env = "CRM_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    pub max_concurrent_streams: u32,
    /// How long a request body may take to deliver each message, then its end (slow clients are
    /// cut off with DEADLINE_EXCEEDED), and how long a new connection may stay silent, e.g.
    /// "30s"; "0" for no limit.
    #[arg(
        long = "request-read-timeout",
        value_name = "DURATION",
        env = "CRM_REQUEST_READ_TIMEOUT",
        default_value = "30s",
        value_parser = crate::config::parse_duration
    )]
    pub request_read_timeout: Duration,
    /// On SIGTERM, how long to keep taking calls after reporting NOT_SERVING, so that the
    /// gateway (and Kubernetes) stop sending first; then stop accepting and finish the calls in
    /// flight. Longer than the callers' health-check interval.
    #[arg(
        long = "drain-delay",
        value_name = "DURATION",
        env = "CRM_DRAIN_DELAY",
        default_value = "2s",
        value_parser = crate::config::parse_duration
    )]
    pub drain_delay: Duration,
    /// Whether a call from one role to another running in the same process (the gateway
    /// forwarding to contacts, a service asking auth) skips the network: the callee's stack
    /// takes it in the process, with the same checks as on its port; "false" sends every call
    /// over HTTP/2.
    #[arg(
        long = "in-process-calls",
        value_name = "BOOL",
        env = "CRM_IN_PROCESS_CALLS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub in_process_calls: bool,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// How long a caller's visible owners (their data scope, resolved by the auth service) are
    /// reused by every service that lists records: an organisation change (a user moved, a
    /// role's scope changed) shows within it even while its event is delayed; "0" asks the auth
    /// service on every call.
    #[arg(
        long = "visibility-cache-ttl",
        value_name = "DURATION",
        env = "CRM_VISIBILITY_CACHE_TTL",
        default_value = "2s",
        value_parser = crate::config::parse_duration
    )]
    pub visibility_cache_ttl: Duration,
    /// While the auth service cannot be reached, how long past the cache TTL a caller's last
    /// resolved data scope is still used (callers never resolved get UNAVAILABLE); "0": never.
    #[arg(
        long = "visibility-stale-for",
        value_name = "DURATION",
        env = "CRM_VISIBILITY_STALE_FOR",
        default_value = "5m",
        value_parser = crate::config::parse_duration
    )]
    pub visibility_stale_for: Duration,
}

impl CommonArgs {
    /// How data scopes are cached ([`Peers::scopes`]).
    pub fn visibility(&self) -> Visibility {
        Visibility { ttl: self.visibility_cache_ttl, stale_for: self.visibility_stale_for }
    }

    /// How servers treat their connections.
    pub fn server_settings(&self) -> Result<ServerSettings, Error> {
        if self.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".into());
        }
        Ok(ServerSettings {
            max_concurrent_streams: self.max_concurrent_streams,
            read_timeout: self.request_read_timeout,
            drain_delay: self.drain_delay,
            tls: self.tls.tls()?,
            in_process: self.in_process_calls,
        })
    }

    /// Discovery and health-check intervals, refused below 10 ms.
    pub fn intervals(&self) -> Result<Intervals, Error> {
        for (name, value) in
            [("--discovery-interval", self.discovery_interval), ("--health-interval", self.health_interval)]
        {
            if value < crate::balance::MIN_INTERVAL {
                return Err(format!("{name} must be at least 10ms, got {value:?}").into());
            }
        }
        Ok(Intervals { discovery: self.discovery_interval, health: self.health_interval })
    }
}

/// The suite's service account as a cluster is given it: the same Secret in every role.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Every process")]
pub struct ServiceAccountArgs {
    /// Client id of the suite's own service account, with which services call each other for
    /// work of their own (the same for every role; the auth service creates the account). Its
    /// secret is read from CRM_SERVICE_CLIENT_SECRET only, never from a flag.
    #[arg(long = "service-client-id", value_name = "ID", env = "CRM_SERVICE_CLIENT_ID")]
    pub client_id: Option<String>,
}

/// The environment variable holding the suite's service-account secret.
pub const SERVICE_SECRET_ENV: &str = "CRM_SERVICE_CLIENT_SECRET";

impl ServiceAccountArgs {
    /// The credentials, when both the client id and CRM_SERVICE_CLIENT_SECRET are set; an error
    /// when only one is.
    pub fn credentials(&self) -> Result<Option<ServiceCredentials>, Error> {
        let secret = std::env::var(SERVICE_SECRET_ENV).ok().filter(|s| !s.is_empty());
        let client_id = self.client_id.as_deref().filter(|c| !c.trim().is_empty());
        match (client_id, secret) {
            (Some(id), Some(secret)) => Ok(Some(ServiceCredentials::new(id, &secret)?)),
            (None, None) => Ok(None),
            (Some(_), None) => Err(format!("--service-client-id is set but {SERVICE_SECRET_ENV} is not").into()),
            (None, Some(_)) => {
                Err(format!("{SERVICE_SECRET_ENV} is set but --service-client-id (CRM_SERVICE_CLIENT_ID) is not")
                    .into())
            }
        }
    }
}

/// What a role is opened with.
pub struct Context {
    spec: &'static RoleSpec,
    suite: Suite,
    database: Option<Database>,
    peers: Peers,
    events: Events,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("role", &self.spec.name)
            .field("database", &self.database.is_some())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The context of role `spec` of `suite`: its database (if it has one) and the roles it
    /// calls, as `crm serve`, `crm dev` or a test places them.
    pub fn new(
        spec: &'static RoleSpec,
        suite: Suite,
        database: Option<Database>,
        peers: Peers,
        events: Events,
    ) -> Context {
        Context { spec, suite, database, peers, events }
    }

    /// The process's events backbone.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The outbox of this role (in `db`) and its relay, to run as a job: what a producing role
    /// calls once in [`Service::open`].
    pub fn outbox(&self, db: &Db) -> (Outbox, Relay) {
        let outbox = self.events.outbox(self.spec.name, db);
        let relay = self.events.relay(&outbox, db);
        (outbox, relay)
    }

    pub fn spec(&self) -> &'static RoleSpec {
        self.spec
    }

    pub fn suite(&self) -> &Suite {
        &self.suite
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The replicas of a role this one calls.
    pub fn peer(&self, role: &str) -> Result<Peer, Error> {
        Ok(self.peers.peer(role)?)
    }

    /// The suite's service account, if this process has it.
    pub fn service_credentials(&self) -> Option<&ServiceCredentials> {
        self.peers.credentials()
    }

    /// The role's database settings; an error naming the flag when none is configured.
    pub fn database(&self) -> Result<&Database, Error> {
        let name = self.spec.name;
        self.database.as_ref().ok_or_else(|| {
            let FlagName { long, env, .. } = flag(name, "database-url");
            format!("no database configured for {name}: set --{long} or {env}").into()
        })
    }

    /// Opens the role's database and applies its migrations.
    pub async fn open_db(&self, migrations: &Migrations) -> Result<Db, Error> {
        let database = self.database()?;
        let db = Db::open(&database.url, database.max_connections, migrations, self.spec.name).await?;
        tracing::info!(role = self.spec.name, database = %crate::db::redact(&database.url), "database open");
        Ok(db)
    }

    /// The callers' data scopes, resolved by the auth service and cached for the whole process
    /// ([`Peers::scopes`]), and the listener to run as a job that drops them at once when auth
    /// publishes an organisation change.
    pub fn scopes(&self) -> Result<(ScopeCache, Listener), Error> {
        let scopes = self.peers.scopes()?;
        let listener = self.events.listener(AUTH_ROLE, {
            let scopes = scopes.clone();
            move |event| {
                if is_organisation_change(&event.envelope.r#type) {
                    tracing::debug!(event = %event.envelope.r#type, "organisation changed; data scopes dropped");
                    scopes.forget_all();
                }
            }
        });
        Ok((scopes, listener))
    }

    /// Token checks with this process's verifier (keys from the auth service).
    pub fn authenticator(&self) -> Result<Authenticator, Error> {
        Ok(self.authenticator_with(self.peers.verifier()?))
    }

    /// Token checks with `verifier` (the auth service's own).
    pub fn authenticator_with(&self, verifier: Verifier) -> Authenticator {
        Authenticator::new(verifier, self.suite.public_methods())
    }

    /// The role's server, to add its services to.
    pub fn server(&self) -> Server {
        Server::new(self.spec.name)
    }
}

type Job = Box<dyn FnOnce(Shutdown) -> BoxFuture<'static, ()> + Send>;

/// How long background jobs get to stop after the server has drained.
const JOB_STOP: Duration = Duration::from_secs(5);

/// An opened role, ready to serve: its server, its background jobs, its database, and what to
/// tell the operator.
pub struct Opened {
    name: &'static str,
    server: Server,
    jobs: Vec<(&'static str, Job)>,
    db: Option<Db>,
    notice: Option<String>,
    banner: Vec<String>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let jobs: Vec<&str> = self.jobs.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Opened").field("role", &self.name).field("jobs", &jobs).finish_non_exhaustive()
    }
}

impl Opened {
    /// A role serving `server`.
    pub fn new(server: Server) -> Opened {
        Opened { name: server.role(), server, jobs: Vec::new(), db: None, notice: None, banner: Vec::new() }
    }

    /// The role's database: readiness pings it, and it is closed after the server stops.
    pub fn with_db(mut self, db: Db) -> Opened {
        self.server = self.server.ready_check(db.ready_check(self.name));
        self.db = Some(db);
        self
    }

    /// How its server treats connections (see [`CommonArgs`]).
    pub fn server_settings(mut self, settings: ServerSettings) -> Opened {
        self.server = self.server.settings(settings);
        self
    }

    /// A background job: runs beside the server and must return soon after its shutdown fires.
    pub fn job<F, Fut>(mut self, name: &'static str, job: F) -> Opened
    where
        F: FnOnce(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.jobs.push((name, Box::new(move |shutdown| Box::pin(job(shutdown)))));
        self
    }

    /// Something to tell the operator once, on standard output, when the role starts on its own
    /// (`crm serve`): e.g. a generated password.
    pub fn notice(mut self, text: String) -> Opened {
        self.notice = Some(text);
        self
    }

    /// A line for `crm dev`'s start-up banner.
    pub fn banner(mut self, line: String) -> Opened {
        self.banner.push(line);
        self
    }

    pub fn notice_text(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    pub fn banner_lines(&self) -> &[String] {
        &self.banner
    }

    /// Serves on `listener` until `shutdown` fires, with the jobs running beside it; then
    /// drains the calls in flight, waits for the jobs and closes the database.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
        let Opened { name, server, jobs, db, .. } = self;
        let mut running = tokio::task::JoinSet::new();
        for (job, start) in jobs {
            let future = start(shutdown.clone());
            running.spawn(async move {
                future.await;
                tracing::debug!(role = name, job, "job stopped");
            });
        }
        tracing::info!(role = name, addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
        let result = server.serve(listener, shutdown).await;
        if tokio::time::timeout(JOB_STOP, async { while running.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(role = name, "background jobs did not stop in time");
            running.abort_all();
        }
        if let Some(db) = db {
            db.close().await;
        }
        tracing::info!(role = name, "stopped");
        Ok(result?)
    }
}

/// The callees of a process: every role that serves packages, at `addrs` (its placement, or
/// where it listens in this process).
pub fn callees(suite: &Suite, mut addrs: impl FnMut(&'static RoleSpec) -> Vec<String>) -> Vec<Callee> {
    suite
        .routed()
        .map(|spec| Callee { role: spec.name, service: spec.main_service().unwrap_or(spec.name), addrs: addrs(spec) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        assert!(is_host_port("contacts:50051"));
        assert!(is_host_port("[::1]:50051"));
        assert!(!is_host_port(":50051"));
        assert!(!is_host_port("contacts"));
        assert_eq!(Placement::local_addr("0.0.0.0:1".parse().unwrap()), "127.0.0.1:1");
        assert_eq!(Placement::local_addr("[::1]:2".parse().unwrap()), "[::1]:2");
        let spec = RoleSpec {
            name: "contacts",
            title: "the contacts service",
            packages: &[],
            services: &[],
            public_methods: &[],
            permissions: &[],
            default_port: 1,
            calls: Calls::Roles(&[]),
            consumes: &[],
        };
        assert_eq!(spec.heading(), "Contacts service");
        let names = flag("contacts", "max-connections");
        assert_eq!(
            (names.id.as_str(), names.long.as_str(), names.env.as_str()),
            ("contacts_max_connections", "contacts-max-connections", "CRM_CONTACTS_MAX_CONNECTIONS")
        );
    }
}
