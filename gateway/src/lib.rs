//! The CRM edge: one port serving gRPC (h2c), gRPC-Web and HTTP/1.1, proxying gRPC calls at the
//! HTTP/2 level (messages are never decoded) to the replicas of the service that owns the
//! call's package, with discovery by DNS, active and passive health checking,
//! power-of-two-choices balancing, a concurrency limit with load shedding and deadlines.
//!
//! Server reflection over every CRM service, `grpc.health.v1` (including one status per
//! upstream service), `/healthz`, `/readyz` and `/metrics` are answered by the gateway itself.

#![warn(missing_docs)]

mod balance;
mod edge;
mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{AuthClientArgs, Verifier};
use crm_kit::config::parse_duration;
use crm_kit::server::{ReadyCheck, Server};
use crm_kit::shutdown::Shutdown;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::balance::{Endpoint, Pool};

/// CLI/env settings of the gateway role.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address the gateway listens on (gRPC, gRPC-Web, /healthz, /readyz, /metrics).
    #[arg(
        id = "gateway_listen",
        long = "gateway-listen",
        value_name = "ADDR",
        env = "CRM_GATEWAY_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Contacts replicas: comma-separated host:port list; DNS names are re-resolved every
    /// --discovery-interval and every address they resolve to becomes a replica (headless Services).
    #[arg(
        id = "gateway_contacts_addr",
        long = "contacts-addr",
        value_name = "HOST:PORT,...",
        env = "CRM_CONTACTS_ADDR",
        value_delimiter = ','
    )]
    pub contacts_addr: Vec<String>,
    /// Longest wait for an upstream's response headers, e.g. "30s", "500ms", "2m" (a bare number
    /// is seconds; 0 disables). A shorter `grpc-timeout` sent by the client wins; streamed
    /// response bodies are not cut off once headers arrived.
    #[arg(
        id = "gateway_request_timeout",
        long = "request-timeout",
        value_name = "DURATION",
        env = "CRM_GATEWAY_REQUEST_TIMEOUT",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub request_timeout: Duration,
    /// Most calls waiting for upstream response headers at once; calls beyond it are refused
    /// at once with RESOURCE_EXHAUSTED.
    #[arg(
        id = "gateway_max_concurrency",
        long = "max-concurrency",
        value_name = "N",
        env = "CRM_GATEWAY_MAX_CONCURRENCY",
        default_value_t = 1024
    )]
    pub max_concurrency: usize,
    /// How often upstream host names are re-resolved, e.g. "5s".
    #[arg(
        id = "gateway_discovery_interval",
        long = "discovery-interval",
        value_name = "DURATION",
        env = "CRM_GATEWAY_DISCOVERY_INTERVAL",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub discovery_interval: Duration,
    /// How often every upstream replica is health-checked (`grpc.health.v1.Health/Check`), e.g. "1s".
    #[arg(
        id = "gateway_health_interval",
        long = "health-interval",
        value_name = "DURATION",
        env = "CRM_GATEWAY_HEALTH_INTERVAL",
        default_value = "1s",
        value_parser = parse_duration
    )]
    pub health_interval: Duration,
}

impl GatewayArgs {
    /// Default settings listening on `listen` in front of the contacts replicas `contacts_addr`
    /// (for running every role in one process).
    pub fn for_upstreams(listen: SocketAddr, contacts_addr: Vec<String>) -> GatewayArgs {
        let defaults = Settings::default();
        GatewayArgs {
            listen,
            contacts_addr,
            request_timeout: defaults.request_timeout,
            max_concurrency: defaults.max_concurrency,
            discovery_interval: defaults.discovery_interval,
            health_interval: defaults.health_interval,
        }
    }

    /// The edge policy, discovery and health-checking settings.
    pub fn settings(&self) -> Settings {
        Settings {
            request_timeout: self.request_timeout,
            max_concurrency: self.max_concurrency,
            discovery_interval: self.discovery_interval,
            health_interval: self.health_interval,
        }
    }

    /// The upstream services and their configured replica addresses.
    pub fn upstreams(&self, auth: &AuthClientArgs) -> Vec<Upstream> {
        let clean = |addrs: &[String]| addrs.iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
        vec![Upstream::auth(auth.addrs()), Upstream::contacts(clean(&self.contacts_addr))]
    }
}

/// Edge policy, discovery and health-checking settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Longest wait for an upstream's response headers; zero: no limit besides `grpc-timeout`.
    pub request_timeout: Duration,
    /// Most calls waiting for upstream response headers at once (at least 1).
    pub max_concurrency: usize,
    /// How often upstream host names are re-resolved.
    pub discovery_interval: Duration,
    /// How often every upstream replica is health-checked.
    pub health_interval: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            request_timeout: Duration::from_secs(30),
            max_concurrency: 1024,
            discovery_interval: Duration::from_secs(5),
            health_interval: Duration::from_secs(1),
        }
    }
}

/// Shortest discovery or health-check interval; smaller values are raised to it.
/// How often the health of each upstream (and of the gateway) is published.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// A service behind the gateway: every call whose service name lies in `package` goes to one of
/// the replicas found at `addrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Protobuf package, e.g. "crm.contacts.v1": routes `/crm.contacts.v1.<Service>/<Method>`.
    pub package: &'static str,
    /// Full service name whose health the gateway reports, e.g. "crm.contacts.v1.ContactsService".
    pub service: &'static str,
    /// `host:port` targets; each address a name resolves to is one replica.
    pub addrs: Vec<String>,
    /// The setting that configures `addrs`, for error messages.
    pub flag: &'static str,
}

impl Upstream {
    /// The auth service (sign-in, tokens, the organisation) at `addrs`.
    pub fn auth(addrs: Vec<String>) -> Upstream {
        Upstream {
            package: "crm.auth.v1",
            service: crm_proto::auth::v1::auth_service_server::SERVICE_NAME,
            addrs,
            flag: "--auth-addr (CRM_AUTH_ADDR)",
        }
    }

    /// The contacts service at `addrs`.
    pub fn contacts(addrs: Vec<String>) -> Upstream {
        Upstream {
            package: "crm.contacts.v1",
            service: crm_proto::contacts::v1::contacts_service_server::SERVICE_NAME,
            addrs,
            flag: "--contacts-addr (CRM_CONTACTS_ADDR)",
        }
    }
}

/// Why the gateway cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// An upstream has no replica address configured.
    #[error("no replicas configured for {service}: set {flag}")]
    NoReplicas {
        /// The upstream service.
        service: &'static str,
        /// The flag (and environment variable) that configures its replicas.
        flag: &'static str,
    },
    /// A replica address is not `host:port`.
    #[error("{service}: {addr:?} is not a host:port address")]
    BadAddress {
        /// The upstream service.
        service: &'static str,
        /// The offending address.
        addr: String,
    },
    /// A setting is out of range.
    #[error("invalid gateway setting: {0}")]
    BadSetting(String),
    /// The listening server failed.
    #[error("gateway server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The edge process: the kit server with the proxy as its fallback.
pub struct Gateway {
    pools: Arc<[Arc<Pool>]>,
    settings: Settings,
    verifier: Option<Verifier>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services: Vec<&str> = self.pools.iter().map(|p| p.service()).collect();
        f.debug_struct("Gateway").field("upstreams", &services).field("settings", &self.settings).finish()
    }
}

impl Gateway {
    /// A gateway in front of `upstreams`. Intervals below 10 ms and a zero concurrency limit are
    /// raised to the smallest usable value; addresses are checked only when resolved (see
    /// [`Gateway::from_args`] for up-front validation).
    pub fn new(upstreams: Vec<Upstream>, settings: Settings) -> Gateway {
        let settings = Settings {
            max_concurrency: settings.max_concurrency.max(1),
            discovery_interval: settings.discovery_interval.max(MIN_INTERVAL),
            health_interval: settings.health_interval.max(MIN_INTERVAL),
            ..settings
        };
        let pools = upstreams.into_iter().map(|u| Arc::new(Pool::new(u.package, u.service, u.addrs))).collect();
        Gateway { pools, settings, verifier: None }
    }

    /// Verifies access tokens at the edge: calls that need one and lack a valid one are refused
    /// with UNAUTHENTICATED before they reach a service (which verifies again), and the
    /// verification keys are published at `/.well-known/jwks.json`.
    pub fn authenticate(mut self, verifier: Verifier) -> Gateway {
        self.verifier = Some(verifier);
        self
    }

    /// A gateway from command-line settings; refuses missing or malformed replica addresses and
    /// out-of-range settings.
    pub fn from_args(args: &GatewayArgs, auth: &AuthClientArgs) -> Result<Gateway, GatewayError> {
        let settings = args.settings();
        if settings.max_concurrency == 0 {
            return Err(GatewayError::BadSetting("--max-concurrency must be at least 1".into()));
        }
        for (name, value) in
            [("--discovery-interval", settings.discovery_interval), ("--health-interval", settings.health_interval)]
        {
            if value < MIN_INTERVAL {
                return Err(GatewayError::BadSetting(format!("{name} must be at least 10ms, got {value:?}")));
            }
        }
        let upstreams = args.upstreams(auth);
        for upstream in &upstreams {
            if upstream.addrs.is_empty() {
                return Err(GatewayError::NoReplicas { service: upstream.service, flag: upstream.flag });
            }
            if let Some(bad) = upstream.addrs.iter().find(|a| !is_host_port(a)) {
                return Err(GatewayError::BadAddress { service: upstream.service, addr: bad.clone() });
            }
        }
        let verifier = auth.verifier().map_err(GatewayError::BadSetting)?;
        Ok(Gateway::new(upstreams, settings).authenticate(verifier))
    }

    /// Serves on `listener` until `shutdown` fires, then drains the calls in flight.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), GatewayError> {
        let Gateway { pools, settings, verifier } = self;
        let mut server = Server::new("gateway");
        let health = server.health_reporter();
        for pool in pools.iter() {
            health.set_service_status(pool.service(), ServingStatus::NotServing).await;
        }
        let maintenance = tokio::spawn(maintain(pools.clone(), settings.clone(), health, shutdown.clone()));
        let mut fallback = proxy::router(pools.clone(), &settings);
        if let Some(verifier) = verifier {
            let keys = verifier.clone();
            fallback = fallback.route("/.well-known/jwks.json", axum::routing::get(move || jwks(keys.clone())));
            server = server.authenticate(verifier);
        }
        let result = server.ready_check(ready_check(pools)).fallback(fallback).serve(listener, shutdown).await;
        maintenance.abort();
        result.map_err(GatewayError::Serve)
    }
}

/// The token verification keys as JSON (RFC 7517), fetched from auth when none are known yet.
async fn jwks(verifier: Verifier) -> axum::response::Response {
    use axum::response::IntoResponse;
    if verifier.jwks().keys.is_empty()
        && let Err(err) = verifier.fetch(Duration::from_secs(1)).await
    {
        tracing::warn!(error = %err, "cannot fetch the verification keys");
        return (http::StatusCode::SERVICE_UNAVAILABLE, "verification keys unavailable; retry later\n").into_response();
    }
    let keys: Vec<serde_json::Value> = verifier
        .jwks()
        .keys
        .iter()
        .map(|k| serde_json::json!({"kty": k.kty, "crv": k.crv, "kid": k.kid, "x": k.x, "alg": k.alg, "use": k.r#use}))
        .collect();
    (
        [(http::header::CONTENT_TYPE, "application/json"), (http::header::CACHE_CONTROL, "max-age=60")],
        serde_json::json!({ "keys": keys }).to_string(),
    )
        .into_response()
}

/// Ready when every upstream has at least one healthy replica; otherwise names those without.
fn ready_check(pools: Arc<[Arc<Pool>]>) -> ReadyCheck {
    Arc::new(move || {
        let missing: Vec<String> = pools
            .iter()
            .filter(|p| p.healthy_count() == 0)
            .map(|p| format!("{} has no healthy replica ({} known)", p.service(), p.len()))
            .collect();
        let result = if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) };
        Box::pin(async move { result })
    })
}

/// Discovery and health checking until shutdown; reports each upstream service's health, and
/// the gateway's own ("": every upstream has a healthy replica) without waiting for the
/// server's slower readiness poll.
async fn maintain(pools: Arc<[Arc<Pool>]>, settings: Settings, health: HealthReporter, shutdown: Shutdown) {
    // One health-check loop per replica, so that a slow or hung replica delays no other's.
    let mut checkers = tokio::task::JoinSet::new();
    let discovery = async {
        let mut tick = interval(settings.discovery_interval);
        loop {
            tick.tick().await;
            let added = futures_util::future::join_all(pools.iter().map(|p| p.discover())).await;
            for endpoint in added.into_iter().flatten() {
                checkers.spawn(watch(endpoint, settings.health_interval));
            }
            while checkers.try_join_next().is_some() {}
        }
    };
    let report = async {
        // Publishing only reads counters, so it runs often: a replica's change of health shows
        // within REPORT_INTERVAL of its check, not a whole health interval later.
        let mut tick = interval(REPORT_INTERVAL.min(settings.health_interval));
        // Last reported status of each upstream service, then of the gateway as a whole ("").
        let mut reported: Vec<Option<ServingStatus>> = vec![None; pools.len() + 1];
        loop {
            tick.tick().await;
            let statuses = pools.iter().map(|pool| (pool.service(), pool.healthy_count() > 0));
            let all = ("", pools.iter().all(|pool| pool.healthy_count() > 0));
            for ((service, healthy), last) in statuses.chain([all]).zip(reported.iter_mut()) {
                let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
                if *last != Some(status) {
                    if !healthy && !service.is_empty() {
                        tracing::warn!(upstream = service, "no healthy replica");
                    }
                    health.set_service_status(service, status).await;
                    *last = Some(status);
                }
            }
        }
    };
    tokio::select! {
        () = discovery => {}
        () = report => {}
        () = shutdown.wait() => {}
    }
    // Draining: nothing is to be sent here any more.
    for service in pools.iter().map(|p| p.service()).chain([""]) {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
}

/// Health-checks one replica every `period` until discovery drops it.
async fn watch(endpoint: Arc<Endpoint>, period: Duration) {
    let mut tick = interval(period);
    loop {
        tick.tick().await;
        if endpoint.is_retired() {
            return;
        }
        endpoint.check().await;
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period.max(MIN_INTERVAL));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// `host:port` with a non-empty host and a numeric port (`[v6]:port` included).
fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn validates_args() {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let ok = GatewayArgs::for_upstreams(listen, vec!["contacts:50051".into(), " 10.0.0.1:1 ".into(), "".into()]);
        let auth = AuthClientArgs::new(vec!["auth:50052".into()]);
        let gateway = Gateway::from_args(&ok, &auth).unwrap();
        assert_eq!(gateway.pools.len(), 2);
        assert!(gateway.verifier.is_some(), "a gateway from settings always verifies tokens");
        assert_eq!(ok.upstreams(&auth)[1].addrs, ["contacts:50051", "10.0.0.1:1"]);
        assert_eq!(ok.upstreams(&auth)[1].service, "crm.contacts.v1.ContactsService");
        assert_eq!(ok.upstreams(&auth)[0].service, "crm.auth.v1.AuthService");
        let no_auth = Gateway::from_args(&ok, &AuthClientArgs::new(vec![]));
        assert!(matches!(no_auth, Err(GatewayError::NoReplicas { service: "crm.auth.v1.AuthService", .. })));

        let none = GatewayArgs::for_upstreams(listen, vec![]);
        assert!(matches!(Gateway::from_args(&none, &auth), Err(GatewayError::NoReplicas { .. })));
        let bad = GatewayArgs::for_upstreams(listen, vec!["contacts".into()]);
        assert!(matches!(Gateway::from_args(&bad, &auth), Err(GatewayError::BadAddress { .. })));
        let zero = GatewayArgs { max_concurrency: 0, ..ok.clone() };
        assert!(matches!(Gateway::from_args(&zero, &auth), Err(GatewayError::BadSetting(_))));
        let fast = GatewayArgs { health_interval: Duration::ZERO, ..ok };
        assert!(matches!(Gateway::from_args(&fast, &auth), Err(GatewayError::BadSetting(_))));
        assert!(is_host_port("[::1]:50051"));
        assert!(!is_host_port(":50051"));
    }

    #[test]
    fn parses_command_line() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            gateway: GatewayArgs,
        }
        let cli = Cli::try_parse_from([
            "crm",
            "--contacts-addr",
            "a:1,b:2",
            "--request-timeout",
            "2s",
            "--health-interval",
            "250ms",
        ])
        .unwrap();
        assert_eq!(cli.gateway.contacts_addr, ["a:1", "b:2"]);
        assert_eq!(cli.gateway.request_timeout, Duration::from_secs(2));
        assert_eq!(cli.gateway.health_interval, Duration::from_millis(250));
        assert_eq!(cli.gateway.discovery_interval, Duration::from_secs(5));
        assert_eq!(cli.gateway.max_concurrency, 1024);
    }
}
