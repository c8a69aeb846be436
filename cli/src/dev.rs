//! `crm dev`: every role in one process, each on its own loopback port like in a cluster,
//! with SQLite files under the data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use crm_auth::AuthArgs;
use crm_contacts::ContactsArgs;
use crm_kit::auth::AuthClientArgs;

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Directory for the SQLite databases (one file per service); created if missing.
    #[arg(long, env = "CRM_DATA_DIR", default_value = "./crm-data")]
    pub data_dir: PathBuf,
    /// Address of the gateway: gRPC, gRPC-Web, /healthz, /readyz and /metrics on one port.
    #[arg(long, env = "CRM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Country calling code for phone numbers entered without one (e.g. 7, 49, 1).
    #[arg(long = "default-calling-code", env = "CRM_DEFAULT_CALLING_CODE", default_value = "")]
    pub default_calling_code: String,
    /// E-mail of the administrator created at first start. The password comes from
    /// CRM_ADMIN_PASSWORD, or is generated and printed once.
    #[arg(long = "admin-email", env = "CRM_ADMIN_EMAIL", default_value = "admin@crm.local")]
    pub admin_email: String,
}

/// The auth role's settings as `crm serve auth` would take them (so that its environment
/// variables, e.g. CRM_ACCESS_TOKEN_TTL, apply in dev mode too).
#[derive(Parser)]
struct AuthSettings {
    #[command(flatten)]
    auth: AuthArgs,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (trigger, shutdown) = crm_kit::shutdown::on_os_signal();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize().context("data directory")?;

    let auth_listener = crate::bind("127.0.0.1:0".parse()?, "auth").await?;
    let auth_addr = auth_listener.local_addr()?;
    let auth_db = format!("sqlite://{}", data_dir.join("auth.db").display());
    let auth = AuthSettings::try_parse_from([
        "crm-dev",
        "--auth-listen",
        &auth_addr.to_string(),
        "--auth-database-url",
        &auth_db,
        "--auth-max-connections",
        "4",
        "--admin-email",
        &args.admin_email,
    ])
    .context("auth settings")?
    .auth;
    let auth_settings = auth.settings().context("auth settings")?;
    let (auth_store, bootstrap) = crm_auth::open(&auth).await.context("auth")?;
    let auth_client = AuthClientArgs::new(vec![auth_addr.to_string()]);

    let contacts_listener = crate::bind("127.0.0.1:0".parse()?, "contacts").await?;
    let contacts_addr = contacts_listener.local_addr()?;
    let contacts = ContactsArgs {
        listen: contacts_addr,
        database_url: Some(format!("sqlite://{}", data_dir.join("contacts.db").display())),
        max_connections: 4,
        default_calling_code: args.default_calling_code.clone(),
        visibility_cache_ttl: std::time::Duration::from_secs(2),
    };
    contacts.rules()?;
    let gateway_listener = crate::bind(args.listen, "gateway").await?;
    let listen = gateway_listener.local_addr()?;
    let gateway = crm_gateway::Gateway::from_args(
        &crm_gateway::GatewayArgs::for_upstreams(listen, vec![contacts_addr.to_string()]),
        &auth_client,
    )
    .context("gateway settings")?;

    let mut tasks = tokio::task::JoinSet::new();
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            crm_auth::serve(auth_store, auth_settings, auth_listener, shutdown).await.context("auth")
        });
    }
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            crm_contacts::run(&contacts, &auth_client, contacts_listener, shutdown).await.context("contacts")
        });
    }
    // The gateway starts once auth and contacts answer, so its first health checks find them serving.
    wait_ready(auth_addr, AUTH_SERVICE).await?;
    wait_ready(contacts_addr, CONTACTS_SERVICE).await?;
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { gateway.serve(gateway_listener, shutdown).await.context("gateway") });
    }
    wait_ready(listen, AUTH_SERVICE).await?;
    wait_ready(listen, CONTACTS_SERVICE).await?;
    let email = &bootstrap.email;
    let password = match (&bootstrap.generated_password, bootstrap.created) {
        (Some(generated), _) => format!(
            "{generated}\n  (generated now and shown only this once: note it, or start with CRM_ADMIN_PASSWORD set)"
        ),
        (None, true) => "the one in CRM_ADMIN_PASSWORD".to_string(),
        (None, false) => "as set before (the administrator exists since an earlier start)".to_string(),
    };
    println!(
        "\nCRM is running (started in {} ms). Data: {}\n\n\
         Gateway (gRPC, gRPC-Web, /healthz, /readyz, /metrics, /.well-known/jwks.json): http://{listen}\n\n\
         Administrator: {email}\n\
         Password:      {password}\n\n\
         Try it:\n  \
         grpcurl -plaintext {listen} list\n  \
         TOKEN=$(grpcurl -plaintext -d '{{\"email\": \"{email}\", \"password\": \"<password>\"}}' \\\n    \
         {listen} crm.auth.v1.AuthService/SignIn | sed -n 's/.*\"accessToken\": \"\\(.*\\)\".*/\\1/p')\n  \
         grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" \\\n    \
         -d '{{\"person\": {{\"full_name\": \"Anna Petrova\", \"emails\": [{{\"address\": \"anna@example.com\"}}]}}}}' \\\n    \
         {listen} crm.contacts.v1.ContactsService/CreatePerson\n  \
         grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" -d '{{\"query\": \"anna\"}}' \\\n    \
         {listen} crm.contacts.v1.ContactsService/ListPeople\n\n\
         Stop with ctrl-c.\n",
        started.elapsed().as_millis(),
        data_dir.display(),
    );
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined.context("role task panicked").and_then(|r| r) {
            tracing::error!(error = %format!("{err:#}"), "role failed");
            trigger.fire();
            result = Err(err);
        }
    }
    result
}

const AUTH_SERVICE: &str = "crm.auth.v1.AuthService";
const CONTACTS_SERVICE: &str = "crm.contacts.v1.ContactsService";

/// Waits until `addr` (a service, or the gateway in front of it) reports `service` SERVING, so
/// that the banner is true.
async fn wait_ready(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let request = HealthCheckRequest { service: service.into() };
            if let Ok(r) = HealthClient::new(channel).check(request).await
                && r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the suite did not become ready within 60 s; see the log above");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
