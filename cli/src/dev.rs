//! `crm dev`: every role in one process, each on its own loopback port like in a cluster,
//! with SQLite files under the data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use crm_contacts::ContactsArgs;

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
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (trigger, shutdown) = crm_kit::shutdown::on_os_signal();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize().context("data directory")?;

    let contacts_listener = crate::bind("127.0.0.1:0".parse()?, "contacts").await?;
    let contacts_addr = contacts_listener.local_addr()?;
    let contacts = ContactsArgs {
        listen: contacts_addr,
        database_url: Some(format!("sqlite://{}", data_dir.join("contacts.db").display())),
        max_connections: 4,
        default_calling_code: args.default_calling_code.clone(),
    };
    contacts.rules()?;
    let gateway_listener = crate::bind(args.listen, "gateway").await?;
    let listen = gateway_listener.local_addr()?;
    let gateway = crm_gateway::Gateway::from_args(&crm_gateway::GatewayArgs::for_upstreams(
        listen,
        vec![contacts_addr.to_string()],
    ))
    .context("gateway settings")?;

    let mut tasks = tokio::task::JoinSet::new();
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { crm_contacts::run(&contacts, contacts_listener, shutdown).await.context("contacts") });
    }
    // The gateway starts once contacts answers, so its first health check finds it serving.
    wait_ready(contacts_addr).await?;
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { gateway.serve(gateway_listener, shutdown).await.context("gateway") });
    }
    wait_ready(listen).await?;
    println!(
        "\nCRM is running (started in {} ms). Data: {}\n\n\
         Gateway (gRPC, gRPC-Web, /healthz, /readyz, /metrics): http://{listen}\n\n\
         Try it:\n  \
         grpcurl -plaintext {listen} list\n  \
         grpcurl -plaintext -d '{{\"person\": {{\"full_name\": \"Anna Petrova\", \"emails\": [{{\"address\": \"anna@example.com\"}}]}}}}' \\\n    \
         {listen} crm.contacts.v1.ContactsService/CreatePerson\n  \
         grpcurl -plaintext -d '{{\"query\": \"anna\"}}' {listen} crm.contacts.v1.ContactsService/ListPeople\n\n\
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

/// Waits until `addr` (the contacts service, or the gateway in front of it) reports the contacts
/// service SERVING, so that the banner is true.
async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let request = HealthCheckRequest { service: "crm.contacts.v1.ContactsService".into() };
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
