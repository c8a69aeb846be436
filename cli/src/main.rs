//! `crm`: the whole CRM suite in one binary.
//!
//! - `crm dev` runs every service and the gateway in one process on SQLite files;
//! - `crm serve <role>…` runs cluster roles against PostgreSQL;
//! - `crm migrate <service>` applies a service's database migrations;
//! - `crm bench …` loads realistic volume and measures latency.

mod bench;
mod dev;

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use crm_contacts::ContactsArgs;
use crm_gateway::GatewayArgs;
use crm_kit::config::LogArgs;
use crm_kit::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "crm",
    version,
    about = "Open-source CRM: contacts, deals, tasks, auth and notifications behind one gateway"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole suite in one process with embedded SQLite storage: no other setup.
    Dev(dev::DevArgs),
    /// Run one or more cluster roles (each its own port) against PostgreSQL.
    Serve(ServeArgs),
    /// Apply a service's database migrations and exit (for a migration Job).
    Migrate(MigrateArgs),
    /// Load volume into a database and measure calls against a running suite.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Contacts,
    Gateway,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Roles to run in this process.
    #[arg(required = true, value_enum)]
    roles: Vec<Role>,
    #[command(flatten)]
    contacts: ContactsArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Service {
    Contacts,
}

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// The service whose database to migrate.
    #[arg(value_enum)]
    service: Service,
    /// The service's database URL (postgres://… or sqlite://…).
    #[arg(long, env = "CRM_DATABASE_URL")]
    database_url: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-dev", cli.log.format_or(LogFormat::Pretty));
                dev::run(args).await
            }
            Command::Serve(args) => {
                let _telemetry = crm_kit::telemetry::init("crm", cli.log.format_or(LogFormat::Json));
                serve(args).await
            }
            Command::Migrate(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-migrate", cli.log.format_or(LogFormat::Pretty));
                match args.service {
                    Service::Contacts => crm_contacts::migrate(&args.database_url).await?,
                }
                println!("contacts database is up to date: {}", crm_kit::db::redact(&args.database_url));
                Ok(())
            }
            Command::Bench(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-bench", cli.log.format_or(LogFormat::Pretty));
                bench::run(args).await
            }
        }
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("{what}: cannot listen on {addr}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (trigger, shutdown) = crm_kit::shutdown::on_os_signal();
    let mut tasks = tokio::task::JoinSet::new();
    let mut roles = args.roles.clone();
    roles.dedup();
    for role in roles {
        match role {
            Role::Contacts => {
                let listener = bind(args.contacts.listen, "contacts").await?;
                let (contacts, shutdown) = (args.contacts.clone(), shutdown.clone());
                tasks.spawn(async move { crm_contacts::run(&contacts, listener, shutdown).await.context("contacts") });
            }
            Role::Gateway => {
                let listener = bind(args.gateway.listen, "gateway").await?;
                let gateway = crm_gateway::Gateway::from_args(&args.gateway).context("gateway settings")?;
                let shutdown = shutdown.clone();
                tracing::info!(addr = %args.gateway.listen, "gateway listening");
                tasks.spawn(async move { gateway.serve(listener, shutdown).await.context("gateway") });
            }
        }
    }
    // The first role to stop (with an error, or after shutdown) ends the process.
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.context("role task panicked").and_then(|r| r);
        if let Err(err) = outcome {
            tracing::error!(error = %format!("{err:#}"), "role failed");
            trigger.fire();
            result = Err(err);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
