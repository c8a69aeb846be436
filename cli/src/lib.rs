//! `crm`: the whole CRM suite in one binary.
//!
//! - `crm dev` runs every role in one process on SQLite files;
//! - `crm serve <role>…` runs cluster roles against PostgreSQL;
//! - `crm migrate <role>` applies a role's database migrations;
//! - `crm events …` shows a service's events backlog, consumer lag and dead letters;
//! - `crm bench …` loads realistic volume and measures latency;
//! - `crm login`, `crm contacts|deals|tasks|notifications …`, `crm report …`, `crm call …`:
//!   the client commands, calling a running CRM through its gateway (`client`).
//!
//! Every command works from [`SUITE`], the list of roles: adding a service is one line there.

mod bench;
mod bench_deals;
mod bench_events;
mod bench_inproc;
mod bench_notifications;
mod bench_plans;
mod bench_tasks;
mod client;
mod dev;
mod events;
mod serve;

use anyhow::Context;
use clap::builder::PossibleValuesParser;
use clap::{ArgMatches, Parser, Subcommand};
use crm_kit::config::LogArgs;
use crm_kit::role::{Entry, Role, Suite};
use crm_kit::telemetry::LogFormat;

/// The roles of the suite, in the order they start (each after those it calls).
static ROLES: &[&dyn Role] = &[
    &Entry::<crm_auth::Auth>::NEW,                   // the organisation, sign-in and tokens
    &Entry::<crm_contacts::Contacts>::NEW,           // companies and people
    &Entry::<crm_notifications::Notifications>::NEW, // inboxes, e-mail, templates, preferences
    &Entry::<crm_tasks::Tasks>::NEW,                 // tasks, reminders, activity records, comments
    &Entry::<crm_deals::Deals>::NEW,                 // pipelines, products (deals to come)
    &Entry::<crm_gateway::GatewayRole>::NEW,         // the edge, in front of every service
];

/// The suite this binary runs.
pub const SUITE: Suite = Suite::new(ROLES);

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
    /// Run one or more cluster roles (each on its own port) against PostgreSQL.
    Serve(Box<serve::ServeArgs>),
    /// Apply a role's database migrations and exit (for a migration Job).
    Migrate(MigrateArgs),
    /// A service's events: outbox backlog, consumer groups' lag, jobs, dead letters and retries.
    Events(events::EventsArgs),
    /// Load volume into a database and measure calls against a running suite.
    Bench(bench::BenchArgs),
    /// Sign in to a CRM (its gateway) and keep the session for the client commands.
    Login(client::LoginArgs),
    /// Sign out and forget the session.
    Logout(client::SessionArgs),
    /// Who the session is signed in as.
    Whoami(client::SessionArgs),
    /// People: list, get, create, update, delete.
    Contacts(client::ContactsArgs),
    /// Deals: list, get, create, update, move; pipelines.
    Deals(client::DealsArgs),
    /// Tasks: list, create, complete.
    Tasks(client::TasksArgs),
    /// My inbox: list, mark read, watch live.
    Notifications(client::NotificationsArgs),
    /// A report of the deals: as a table, CSV or JSON.
    Report(client::ReportArgs),
    /// Any call of the API by name, with its request as JSON.
    Call(client::CallArgs),
    /// Shell completion for crm (bash, zsh, fish, elvish, powershell).
    Completion(client::CompletionArgs),
}

/// Every role's flags, generated from [`SUITE`] and kept as parsed for each role to read its
/// own: with `PLACED`, also the flags that place each role in a cluster (`--<role>-listen`,
/// `--<role>-database-url`, `--<role>-max-connections`, `--<role>-addr`), which `crm serve`
/// takes and `crm dev` decides itself.
#[derive(Debug, Clone)]
pub struct SuiteFlags<const PLACED: bool>(ArgMatches);

impl<const PLACED: bool> clap::FromArgMatches for SuiteFlags<PLACED> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(SuiteFlags(matches.clone()))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = matches.clone();
        Ok(())
    }
}

impl<const PLACED: bool> clap::Args for SuiteFlags<PLACED> {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = SUITE.settings_args(cmd);
        if PLACED { SUITE.placement_args(cmd) } else { cmd }
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl<const PLACED: bool> SuiteFlags<PLACED> {
    /// The flags as parsed.
    pub fn matches(&self) -> &ArgMatches {
        &self.0
    }
}

fn role_names() -> PossibleValuesParser {
    PossibleValuesParser::new(SUITE.names())
}

fn roles_with_databases() -> PossibleValuesParser {
    PossibleValuesParser::new(SUITE.roles().iter().filter(|r| r.migrations().is_some()).map(|r| r.spec().name))
}

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// The role whose database to migrate.
    #[arg(value_name = "ROLE", value_parser = roles_with_databases())]
    role: String,
    /// The role's database URL (postgres://… or sqlite://…).
    #[arg(long, value_name = "URL", env = "CRM_DATABASE_URL")]
    database_url: String,
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let role = SUITE.get(&args.role).context("no such role")?;
    let migrations = role.migrations().context("this role has no database")?;
    let db = crm_kit::db::Db::open(&args.database_url, 1, &migrations, role.spec().name)
        .await
        .with_context(|| format!("migrate the {} database", args.role))?;
    db.close().await;
    println!("{} database is up to date: {}", args.role, crm_kit::db::redact(&args.database_url));
    Ok(())
}

/// Runs the command line.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-dev", cli.log.format_or(LogFormat::Pretty));
                dev::run(args).await
            }
            Command::Serve(args) => {
                // Traces name the roles the process serves: crm-contacts, crm-auth+contacts…
                let name = format!("crm-{}", args.roles.join("+"));
                let _telemetry = crm_kit::telemetry::init(&name, cli.log.format_or(LogFormat::Json));
                serve::run(*args).await
            }
            Command::Migrate(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-migrate", cli.log.format_or(LogFormat::Pretty));
                migrate(args).await
            }
            Command::Events(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-events", cli.log.format_or(LogFormat::Pretty));
                events::run(args).await
            }
            Command::Bench(args) => {
                let _telemetry = crm_kit::telemetry::init("crm-bench", cli.log.format_or(LogFormat::Pretty));
                bench::run(args).await
            }
            Command::Login(args) => client::login(args).await,
            Command::Logout(args) => client::logout(args).await,
            Command::Whoami(args) => client::whoami(args).await,
            Command::Contacts(args) => client::contacts(args).await,
            Command::Deals(args) => client::deals(args).await,
            Command::Tasks(args) => client::tasks(args).await,
            Command::Notifications(args) => client::notifications(args).await,
            Command::Report(args) => client::report(args).await,
            Command::Call(args) => client::call(args).await,
            Command::Completion(args) => {
                use clap::CommandFactory;
                client::completion(args, Cli::command());
                Ok(())
            }
        }
    })
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("{what}: cannot listen on {addr}"))
}

/// Starts opened roles and waits for the first to stop: a role that fails stops the others.
async fn run_roles(
    mut tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    trigger: crm_kit::shutdown::Trigger,
) -> anyhow::Result<()> {
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
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_role_is_placed_by_generated_flags() {
        let cli = Cli::try_parse_from([
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
            "127.0.0.1:50051, contacts:50051,",
            "--auth-addr",
            "127.0.0.1:50052",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else { panic!("serve") };
        let place = |name| serve::placement(&args, name).unwrap();
        let auth = place("auth");
        assert_eq!(
            auth.database.as_ref().map(|d| (d.url.as_str(), d.max_connections)),
            Some(("postgres://db/auth", 3))
        );
        assert_eq!(auth.listen, "0.0.0.0:50052".parse().unwrap());
        assert_eq!(auth.addrs, ["127.0.0.1:50052"]);
        let contacts = place("contacts");
        assert_eq!(contacts.database.map(|d| d.max_connections), Some(5));
        assert_eq!(contacts.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(contacts.addrs, ["127.0.0.1:50051", "contacts:50051"]);
        let gateway = place("gateway");
        assert_eq!((gateway.listen, gateway.database), ("0.0.0.0:8080".parse().unwrap(), None));
        assert_eq!(args.roles, ["auth", "contacts", "gateway"]);

        let bad = Cli::try_parse_from(["crm", "serve", "gateway", "--contacts-addr", "contacts"]).unwrap();
        let Command::Serve(args) = bad.command else { panic!("serve") };
        let err = serve::placement(&args, "contacts").unwrap_err().to_string();
        assert!(err.contains("\"contacts\" is not a host:port address"), "{err}");
        assert!(Cli::try_parse_from(["crm", "serve", "nonsense"]).is_err());
        assert!(Cli::try_parse_from(["crm", "migrate", "gateway", "--database-url", "sqlite://x.db"]).is_err());
    }

    #[test]
    fn every_role_reads_its_own_settings_in_both_modes() {
        let cli = Cli::try_parse_from([
            "crm",
            "dev",
            "--visibility-cache-ttl",
            "0",
            "--access-token-ttl",
            "5m",
            "--request-timeout",
            "2s",
            "--default-calling-code",
            "49",
        ])
        .expect("parses");
        let Command::Dev(args) = cli.command else { panic!("dev") };
        assert_eq!(args.common.visibility().ttl, std::time::Duration::ZERO);
        let matches = args.flags.matches();
        use clap::FromArgMatches;
        let contacts = crm_contacts::ContactsArgs::from_arg_matches(matches).unwrap();
        assert_eq!(contacts.default_calling_code, "49");
        let auth = crm_auth::AuthArgs::from_arg_matches(matches).unwrap();
        assert_eq!(auth.access_token_ttl, std::time::Duration::from_secs(300));
        let gateway = crm_gateway::GatewayArgs::from_arg_matches(matches).unwrap();
        assert_eq!(gateway.request_timeout, std::time::Duration::from_secs(2));
    }
}
