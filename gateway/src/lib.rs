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
    pub fn upstreams(&self) -> Vec<Upstream> {
        let clean = |addrs: &[String]| addrs.iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
        vec![Upstream::contacts(clean(&self.contacts_addr))]
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
}

impl Upstream {
    /// The contacts service at `addrs`.
    pub fn contacts(addrs: Vec<String>) -> Upstream {
        Upstream {
            package: "crm.contacts.v1",
            service: crm_proto::contacts::v1::contacts_service_server::SERVICE_NAME,
            addrs,
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
        Gateway { pools, settings }
    }

    /// A gateway from command-line settings; refuses missing or malformed replica addresses and
    /// out-of-range settings.
    pub fn from_args(args: &GatewayArgs) -> Result<Gateway, GatewayError> {
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
        let upstreams = args.upstreams();
        for upstream in &upstreams {
            if upstream.addrs.is_empty() {
                return Err(GatewayError::NoReplicas {
                    service: upstream.service,
                    flag: "--contacts-addr (CRM_CONTACTS_ADDR)",
                });
            }
            if let Some(bad) = upstream.addrs.iter().find(|a| !is_host_port(a)) {
                return Err(GatewayError::BadAddress { service: upstream.service, addr: bad.clone() });
            }
        }
        Ok(Gateway::new(upstreams, settings))
    }

    /// Serves on `listener` until `shutdown` fires, then drains the calls in flight.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), GatewayError> {
        let Gateway { pools, settings } = self;
        let server = Server::new("gateway");
        let health = server.health_reporter();
        for pool in pools.iter() {
            health.set_service_status(pool.service(), ServingStatus::NotServing).await;
        }
        let maintenance = tokio::spawn(maintain(pools.clone(), settings.clone(), health, shutdown.clone()));
        let fallback = proxy::router(pools.clone(), &settings);
        let result = server.ready_check(ready_check(pools)).fallback(fallback).serve(listener, shutdown).await;
        maintenance.abort();
        result.map_err(GatewayError::Serve)
    }
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

/// Parses "30s", "500ms", "2m", "1h", "250us" or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let duration = match unit.trim() {
        "" | "s" => Duration::from_secs(value),
        "ms" => Duration::from_millis(value),
        "us" => Duration::from_micros(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        other => return Err(format!("unknown unit {other:?} in {text:?}; use ms, s, m or h")),
    };
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    #[test]
    fn validates_args() {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let ok = GatewayArgs::for_upstreams(listen, vec!["contacts:50051".into(), " 10.0.0.1:1 ".into(), "".into()]);
        let gateway = Gateway::from_args(&ok).unwrap();
        assert_eq!(gateway.pools.len(), 1);
        assert_eq!(ok.upstreams()[0].addrs, ["contacts:50051", "10.0.0.1:1"]);
        assert_eq!(ok.upstreams()[0].service, "crm.contacts.v1.ContactsService");

        let none = GatewayArgs::for_upstreams(listen, vec![]);
        assert!(matches!(Gateway::from_args(&none), Err(GatewayError::NoReplicas { .. })));
        let bad = GatewayArgs::for_upstreams(listen, vec!["contacts".into()]);
        assert!(matches!(Gateway::from_args(&bad), Err(GatewayError::BadAddress { .. })));
        let zero = GatewayArgs { max_concurrency: 0, ..ok.clone() };
        assert!(matches!(Gateway::from_args(&zero), Err(GatewayError::BadSetting(_))));
        let fast = GatewayArgs { health_interval: Duration::ZERO, ..ok };
        assert!(matches!(Gateway::from_args(&fast), Err(GatewayError::BadSetting(_))));
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
