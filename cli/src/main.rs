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
use crm_auth::AuthArgs;
use crm_contacts::ContactsArgs;
use crm_gateway::GatewayArgs;
use crm_kit::auth::AuthClientArgs;
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
    Serve(Box<ServeArgs>),
    /// Apply a service's database migrations and exit (for a migration Job).
    Migrate(MigrateArgs),
    /// Load volume into a database and measure calls against a running suite.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Auth,
    Contacts,
    Gateway,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Roles to run in this process.
    #[arg(required = true, value_enum)]
    roles: Vec<Role>,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    contacts: ContactsArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    auth_client: AuthClientArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Service {
    Auth,
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
                serve(*args).await
            }
            Command::Migrate(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-migrate", cli.log.format_or(LogFormat::Pretty));
                let name = match args.service {
                    Service::Auth => {
                        crm_auth::migrate(&args.database_url).await?;
                        "auth"
                    }
                    Service::Contacts => {
                        crm_contacts::migrate(&args.database_url).await?;
                        "contacts"
                    }
                };
                println!("{name} database is up to date: {}", crm_kit::db::redact(&args.database_url));
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
    roles.sort_by_key(|r| *r as u8);
    roles.dedup();
    // Roles served together find auth in the same process unless told otherwise.
    let mut auth_client = args.auth_client.clone();
    if auth_client.addrs().is_empty() && roles.contains(&Role::Auth) {
        let listen = args.auth.listen;
        let host = if listen.ip().is_unspecified() { "127.0.0.1".to_string() } else { listen.ip().to_string() };
        auth_client.auth_addr = vec![format!("{host}:{}", listen.port())];
    }
    for role in roles {
        match role {
            Role::Auth => {
                let listener = bind(args.auth.listen, "auth").await?;
                let (auth, shutdown) = (args.auth.clone(), shutdown.clone());
                tasks.spawn(async move { crm_auth::run(&auth, listener, shutdown).await.context("auth") });
            }
            Role::Contacts => {
                let listener = bind(args.contacts.listen, "contacts").await?;
                let (contacts, auth, shutdown) = (args.contacts.clone(), auth_client.clone(), shutdown.clone());
                tasks.spawn(async move {
                    crm_contacts::run(&contacts, &auth, listener, shutdown).await.context("contacts")
                });
            }
            Role::Gateway => {
                let listener = bind(args.gateway.listen, "gateway").await?;
                let gateway =
                    crm_gateway::Gateway::from_args(&args.gateway, &auth_client).context("gateway settings")?;
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

    #[test]
    fn every_role_takes_its_own_settings_in_one_process() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "crm",
            "serve",
            "auth",
            "contacts",
            "gateway",
            "--auth-database-url",
            "postgres://db/auth",
            "--auth-max-connections",
            "3",
            "--contacts-database-url",
            "postgres://db/contacts",
            "--contacts-max-connections",
            "5",
            "--contacts-addr",
            "127.0.0.1:50051",
            "--auth-addr",
            "127.0.0.1:50052",
        ])
        .expect("parses");
        let super::Command::Serve(args) = cli.command else { panic!("serve") };
        assert_eq!(args.auth.database_url.as_deref(), Some("postgres://db/auth"));
        assert_eq!(args.auth.max_connections, 3);
        assert_eq!(args.contacts.database_url.as_deref(), Some("postgres://db/contacts"));
        assert_eq!(args.contacts.max_connections, 5);
        assert_eq!(args.auth_client.addrs(), ["127.0.0.1:50052"]);
        assert_eq!(args.roles.len(), 3);
    }
}
