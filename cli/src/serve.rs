//! `crm serve <role>…`: cluster roles, one or more per process, each on its own port. Roles
//! served together find each other in the process unless their `--<role>-addr` says otherwise.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use crm_kit::events::EventArgs;
use crm_kit::peer::Peers;
use crm_kit::role::{CommonArgs, Context, Placement, ServiceAccountArgs, callees};

use crate::{SUITE, SuiteFlags};

/// How long a role may take to report SERVING before the next starts.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Roles to run in this process.
    #[arg(required = true, value_name = "ROLE", value_parser = crate::role_names())]
    pub roles: Vec<String>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub service_account: ServiceAccountArgs,
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub flags: SuiteFlags<true>,
}

/// Where role `name` is placed.
pub fn placement(args: &ServeArgs, name: &str) -> anyhow::Result<Placement> {
    let role = SUITE.get(name).with_context(|| format!("no role {name}"))?;
    Placement::read(args.flags.matches(), role.spec()).map_err(|e| anyhow::anyhow!("{e}"))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (trigger, shutdown) = crm_kit::shutdown::on_os_signal();
    let served: Vec<_> = SUITE.roles().iter().filter(|r| args.roles.iter().any(|n| n == r.spec().name)).collect();
    let mut placements = HashMap::new();
    for role in SUITE.roles() {
        placements.insert(role.spec().name, placement(&args, role.spec().name)?);
    }
    let here = |name: &str| served.iter().any(|r| r.spec().name == name);
    let callees = callees(&SUITE, |spec| {
        let placement = &placements[spec.name];
        if placement.addrs.is_empty() && here(spec.name) {
            vec![Placement::local_addr(placement.listen)]
        } else {
            placement.addrs.clone()
        }
    });
    let credentials = args.service_account.credentials().map_err(|e| anyhow::anyhow!("{e}"))?;
    let intervals = args.common.intervals().map_err(|e| anyhow::anyhow!("{e}"))?;
    let peers = Peers::new(callees, intervals, args.common.keys_refresh_interval, credentials, shutdown.clone())
        .with_visibility(args.common.visibility())
        .with_tls(args.common.tls.peers().map_err(|e| anyhow::anyhow!("{e}"))?);
    let events = args.events.events(&SUITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Without Redis, a consumer reads its producers' outboxes in this process: say at start
    // which producers' events will not reach it (a benchmark may run a few roles on purpose).
    let here: Vec<&str> = served.iter().map(|r| r.spec().name).collect();
    for role in &served {
        let spec = role.spec();
        if let Err(err) = events.check_sources(spec.name, spec.consumes, &here) {
            tracing::warn!(role = spec.name, "{err}");
        }
    }
    let settings = args.common.server_settings().map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut tasks = tokio::task::JoinSet::new();
    for role in served {
        let spec = role.spec();
        let placement = &placements[spec.name];
        let listener = crate::bind(placement.listen, spec.name).await?;
        let addr = listener.local_addr()?;
        let ctx = Context::new(spec, SUITE, placement.database.clone(), peers.clone(), events.clone());
        let opened = role.open(args.flags.matches(), ctx).await.map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))?;
        let opened = opened.server_settings(settings.clone());
        if let Some(notice) = opened.notice_text() {
            println!("{notice}");
        }
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            opened.serve(listener, shutdown).await.map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))
        });
        // The next role starts once this one serves: those that call it find it ready.
        for service in spec.services {
            let local = Placement::local_addr(addr).parse()?;
            crm_kit::server::wait_serving(local, service, START_TIMEOUT).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    crate::run_roles(tasks, trigger).await
}
