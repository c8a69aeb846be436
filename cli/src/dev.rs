//! `crm dev`: every role in one process, each on its own loopback port like in a cluster (the
//! front role on `--listen`), with SQLite files under the data directory and a service account
//! of its own. Every role takes its settings as in `crm serve`, from flags or the environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crm_kit::auth::ServiceCredentials;
use crm_kit::events::{Events, Settings};
use crm_kit::peer::Peers;
use crm_kit::role::{CommonArgs, Context, Database, callees};
use crm_kit::server::ServerSettings;

use crate::{SUITE, SuiteFlags};

/// The client id of the service account `crm dev` makes for itself (with a new secret at every
/// start).
const DEV_SERVICE_CLIENT_ID: &str = "crm-dev-services";
/// How long a role may take to report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Directory for the SQLite databases (one file per role); created if missing.
    #[arg(long, value_name = "DIR", env = "CRM_DATA_DIR", default_value = "./crm-data")]
    pub data_dir: PathBuf,
    /// Address of the gateway: gRPC, gRPC-Web, /healthz, /readyz and /metrics on one port.
    #[arg(long, value_name = "ADDR", env = "CRM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub flags: SuiteFlags<false>,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (trigger, shutdown) = crm_kit::shutdown::on_os_signal();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize().context("data directory")?;

    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for role in SUITE.roles() {
        let spec = role.spec();
        let wanted = if spec.is_front() { args.listen } else { "127.0.0.1:0".parse()? };
        let listener = crate::bind(wanted, spec.name).await?;
        addrs.insert(spec.name, listener.local_addr()?);
        listeners.push(listener);
    }
    let callees = callees(&SUITE, |spec| vec![addrs[spec.name].to_string()]);
    let credentials = ServiceCredentials::generate(DEV_SERVICE_CLIENT_ID);
    let intervals = args.common.intervals().map_err(|e| anyhow::anyhow!("{e}"))?;
    let peers = Peers::new(callees, intervals, args.common.keys_refresh_interval, Some(credentials), shutdown.clone())
        .with_visibility(args.common.visibility())
        .with_tls(args.common.tls.peers().map_err(|e| anyhow::anyhow!("{e}"))?);
    // Events go through the roles' databases: every producer runs in this process.
    let events = Events::embedded(&SUITE, Settings::default());
    // One process: nothing balances over its roles, so a stop drains at once.
    let settings = args.common.server_settings().map_err(|e| anyhow::anyhow!("{e}"))?;
    let settings = ServerSettings { drain_delay: Duration::ZERO, ..settings };

    let mut tasks = tokio::task::JoinSet::new();
    let mut banner = Vec::new();
    let mut front = None;
    for (role, listener) in SUITE.roles().iter().zip(listeners) {
        let spec = role.spec();
        let database = role.migrations().map(|_| Database {
            url: format!("sqlite://{}", data_dir.join(format!("{}.db", spec.name)).display()),
            max_connections: 4,
        });
        let ctx = Context::new(spec, SUITE, database, peers.clone(), events.clone());
        let opened = role.open(args.flags.matches(), ctx).await.map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))?;
        let opened = opened.server_settings(settings.clone());
        banner.extend(opened.banner_lines().iter().cloned());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            opened.serve(listener, shutdown).await.map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))
        });
        let addr = addrs[spec.name];
        // The next role starts once this one serves, so the gateway's first health checks find
        // every service serving; the banner appears once the whole suite answers through it.
        let services: Vec<&str> = if spec.is_front() {
            front = Some(addr);
            SUITE.services()
        } else {
            spec.services.to_vec()
        };
        for service in services {
            crm_kit::server::wait_serving(addr, service, START_TIMEOUT)
                .await
                .map_err(|e| anyhow::anyhow!("the suite did not become ready: {e}; see the log above"))?;
        }
    }
    let listen = front.context("the suite has no front role")?;
    // The same binary is the client: named as it was started (`target/release/crm`…).
    let me = std::env::args().next().filter(|a| !a.is_empty()).unwrap_or_else(|| "crm".into());
    println!(
        "\nCRM is running (started in {} ms). Data: {}\n\n\
         Gateway (gRPC, gRPC-Web, REST/JSON, /openapi.json, /healthz, /readyz, /metrics, \
         /.well-known/jwks.json): http://{listen}\n\n\
         {}\n\n\
         Try it:\n  \
         {me} login --server {listen} --email <administrator>\n  \
         {me} contacts create \"Anna Petrova\" --email anna@example.com\n  \
         {me} contacts list --search anna\n  \
         curl -s http://{listen}/openapi.json     # the REST API, described\n  \
         grpcurl -plaintext {listen} list         # gRPC, with server reflection\n\n\
         Stop with ctrl-c.\n",
        started.elapsed().as_millis(),
        data_dir.display(),
        banner.join("\n"),
    );
    crate::run_roles(tasks, trigger).await
}
