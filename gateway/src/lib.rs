//! The CRM edge: one port serving gRPC (h2c), gRPC-Web and HTTP/1.1, proxying gRPC calls at the
//! HTTP/2 level (messages are never decoded) to the replicas of the service that owns the
//! call's package, through the process's replica pools (discovery by DNS, active and passive
//! health checking, power-of-two-choices balancing), behind rate limits, a concurrency limit
//! with load shedding, retries of idempotent reads and deadlines.
//!
//! Server reflection over every CRM service, `grpc.health.v1` (including one status per service
//! behind it), `/healthz`, `/readyz` and `/metrics` are answered by the gateway itself, and every
//! call with an HTTP rule also answers REST/JSON at its path (`rest`), the calendar feed's plain
//! GET included, described by an OpenAPI 3.1 document at `/openapi.json` (`openapi`).
//!
//! Every call, gRPC or REST, takes one request path (`proxy::stack`): the caller's rate limit
//! (`ratelimit`, shared through Redis), load shedding over the concurrency limit, one retry of
//! an idempotent read, the balance over the upstream's replicas under the deadline.

#![warn(missing_docs)]

mod edge;
mod openapi;
mod proxy;
mod ratelimit;
mod rest;

pub use ratelimit::{Limits, Rate, parse_rate};

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{Authenticator, Verifier};
use crm_kit::balance::Pool;
use crm_kit::config::parse_duration;
use crm_kit::limit::SizeLimits;
use crm_kit::role::{self, Calls, Context, Opened, RoleSpec};
use crm_kit::server::{ReadyCheck, Server};
use crm_kit::shutdown::Shutdown;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Settings of the gateway role.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Gateway")]
pub struct GatewayArgs {
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
    /// Rate limit per user (the subject of an access token): RATE/s or RATE/m, optionally
    /// :BURST (calls at once after a quiet spell; by default a second's worth), or "off".
    /// Shared by every gateway replica through Redis (--redis-url) when it is set.
    #[arg(
        id = "gateway_rate_limit_user",
        long = "rate-limit-user",
        value_name = "RATE",
        env = "CRM_GATEWAY_RATE_LIMIT_USER",
        default_value = "200/s:400"
    )]
    pub rate_limit_user: String,
    /// Rate limit per client (a service account's token), as --rate-limit-user.
    #[arg(
        id = "gateway_rate_limit_client",
        long = "rate-limit-client",
        value_name = "RATE",
        env = "CRM_GATEWAY_RATE_LIMIT_CLIENT",
        default_value = "1000/s:2000"
    )]
    pub rate_limit_client: String,
    /// Rate limit per address for calls without a token (signing in, refreshing), as
    /// --rate-limit-user. The address is the connection's peer.
    #[arg(
        id = "gateway_rate_limit_anonymous",
        long = "rate-limit-anonymous",
        value_name = "RATE",
        env = "CRM_GATEWAY_RATE_LIMIT_ANONYMOUS",
        default_value = "20/s:40"
    )]
    pub rate_limit_anonymous: String,
    /// Origins of browser apps allowed to call the gateway (gRPC-Web, REST), comma-separated,
    /// e.g. "https://crm.example.com"; "*" for any. None: no cross-origin calls.
    #[arg(
        id = "gateway_cors_allowed_origins",
        long = "cors-allowed-origins",
        value_name = "ORIGINS",
        env = "CRM_GATEWAY_CORS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allowed_origins: Vec<String>,
    /// Smaller request size limits for some methods, PREFIX=SIZE comma-separated: a method path
    /// or a service's prefix, and bytes (or KiB, MiB), at most 4MiB (what the services take,
    /// and the limit of every other method). A REST call's JSON body counts against its
    /// method's limit.
    #[arg(
        id = "gateway_route_max_request_size",
        long = "route-max-request-size",
        value_name = "PREFIX=SIZE",
        env = "CRM_GATEWAY_ROUTE_MAX_REQUEST_SIZE",
        value_delimiter = ',',
        default_value = "/crm.auth.v1.AuthService/=64KiB"
    )]
    pub route_max_request_size: Vec<String>,
}

impl GatewayArgs {
    /// The edge policy, checked.
    pub fn policy(&self) -> Result<EdgePolicy, GatewayError> {
        if self.max_concurrency == 0 {
            return Err(GatewayError::BadSetting("--max-concurrency must be at least 1".into()));
        }
        let rate = |flag: &str, text: &str| {
            ratelimit::parse_rate(text).map_err(|e| GatewayError::BadSetting(format!("--{flag}: {e}")))
        };
        let limits = Limits {
            user: rate("rate-limit-user", &self.rate_limit_user)?,
            client: rate("rate-limit-client", &self.rate_limit_client)?,
            address: rate("rate-limit-anonymous", &self.rate_limit_anonymous)?,
        };
        let cors_allowed_origins: Vec<String> =
            self.cors_allowed_origins.iter().map(|o| o.trim().to_string()).filter(|o| !o.is_empty()).collect();
        crm_kit::server::cors_layer(&cors_allowed_origins)
            .map_err(|e| GatewayError::BadSetting(format!("--cors-allowed-origins: {e}")))?;
        let sizes = SizeLimits::new(crm_kit::limit::MAX_MESSAGE_BYTES)
            .parse_routes(&self.route_max_request_size)
            .map_err(|e| GatewayError::BadSetting(format!("--route-max-request-size: {e}")))?;
        Ok(EdgePolicy {
            request_timeout: self.request_timeout,
            max_concurrency: self.max_concurrency,
            limits,
            cors_allowed_origins,
            sizes,
        })
    }
}

/// How the gateway treats calls: deadline, concurrency limit and rate limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgePolicy {
    /// Longest wait for an upstream's response headers; zero: no limit besides `grpc-timeout`.
    pub request_timeout: Duration,
    /// Most calls waiting for upstream response headers at once (at least 1).
    pub max_concurrency: usize,
    /// Rate limits per caller.
    pub limits: Limits,
    /// Origins of browser apps allowed to call (CORS); empty: none.
    pub cors_allowed_origins: Vec<String>,
    /// The longest request message per method (gRPC, or a REST call's JSON body).
    pub sizes: SizeLimits,
}

impl Default for EdgePolicy {
    /// A 30 s deadline, 1024 calls at once, no rate limits, no cross-origin calls, 4 MiB
    /// messages.
    fn default() -> EdgePolicy {
        EdgePolicy {
            request_timeout: Duration::from_secs(30),
            max_concurrency: 1024,
            limits: Limits::default(),
            cors_allowed_origins: Vec::new(),
            sizes: SizeLimits::new(crm_kit::limit::MAX_MESSAGE_BYTES),
        }
    }
}

/// How often the health of each upstream (and of the gateway) is published.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// A service behind the gateway: every call whose service lies in one of `packages` goes to one
/// of the replicas of `pool`.
#[derive(Clone)]
pub struct Upstream {
    /// Protobuf packages, e.g. "crm.contacts.v1": routes `/crm.contacts.v1.<Service>/<Method>`.
    pub packages: &'static [&'static str],
    /// Full names of its services, whose health the gateway reports.
    pub services: &'static [&'static str],
    /// Its replicas.
    pub pool: Arc<Pool>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("packages", &self.packages).field("targets", &self.pool.targets()).finish()
    }
}

impl Upstream {
    /// The upstream of a role of the suite, over its replica pool.
    pub fn of(spec: &RoleSpec, pool: Arc<Pool>) -> Upstream {
        Upstream { packages: spec.packages, services: spec.services, pool }
    }

    /// Its main service's full name.
    pub fn service(&self) -> &'static str {
        self.pool.service()
    }
}

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A setting is out of range.
    #[error("invalid gateway setting: {0}")]
    BadSetting(String),
}

/// The edge: the kit server with the proxy as its fallback.
pub struct Gateway {
    upstreams: Arc<[Upstream]>,
    policy: EdgePolicy,
    authenticator: Option<Authenticator>,
    /// Where the rate limits are shared, and under which key prefix.
    shared_limits: Option<(redis::Client, String)>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("upstreams", &self.upstreams).field("policy", &self.policy).finish()
    }
}

impl Gateway {
    /// A gateway in front of `upstreams` (whose pools are kept current by their owner). A zero
    /// concurrency limit is raised to 1.
    pub fn new(upstreams: Vec<Upstream>, policy: EdgePolicy) -> Gateway {
        let policy = EdgePolicy { max_concurrency: policy.max_concurrency.max(1), ..policy };
        for upstream in &upstreams {
            upstream.pool.export_health();
        }
        Gateway { upstreams: upstreams.into(), policy, authenticator: None, shared_limits: None }
    }

    /// Verifies access tokens at the edge: calls that need one and lack a valid one are refused
    /// with UNAUTHENTICATED before they reach a service (which verifies again), and the
    /// verification keys are published at `/.well-known/jwks.json`.
    pub fn authenticate(mut self, authenticator: Authenticator) -> Gateway {
        self.authenticator = Some(authenticator);
        self
    }

    /// Shares the rate limits with every gateway replica through the Redis of `client`, under
    /// keys starting with `prefix`.
    pub fn share_limits(mut self, client: redis::Client, prefix: &str) -> Gateway {
        self.shared_limits = Some((client, prefix.to_string()));
        self
    }

    /// The gateway as a role on `server`: the proxy as its fallback, the published keys, its
    /// readiness, and the job that reports each upstream's health.
    pub fn open(self, mut server: Server) -> Opened {
        let Gateway { upstreams, policy, authenticator, shared_limits } = self;
        let health = server.health_reporter();
        let limiter = match shared_limits {
            Some((client, prefix)) => ratelimit::Limiter::shared(policy.limits, client, &prefix),
            None => Ok(ratelimit::Limiter::local(policy.limits)),
        };
        let limiter = Arc::new(limiter.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot share rate limits through Redis; each replica applies them alone");
            ratelimit::Limiter::local(policy.limits)
        }));
        // Every call with an HTTP rule at its path: one route per first segment of the paths
        // ("/v1/…", "/calendar/…"), none of which is a gRPC path ("/package.Service/Method").
        let descriptors = rest::suite_pool();
        let rest_routes = rest::routes(&descriptors);
        let stack = proxy::stack(upstreams.clone(), &policy, limiter, rest::reads(&rest_routes));
        // The REST edge described (OpenAPI 3.1), generated once.
        let needs_token = |path: &str| authenticator.as_ref().is_none_or(|a| a.needs_token(path));
        let document: Arc<str> = openapi::document(&descriptors, &rest_routes, &needs_token).to_string().into();
        let mut fallback = axum::Router::new().fallback_service(stack.clone()).route(
            "/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move {
                    (
                        [
                            (http::header::CONTENT_TYPE, "application/json"),
                            (http::header::CACHE_CONTROL, "max-age=300"),
                        ],
                        document.to_string(),
                    )
                }
            }),
        );
        let rest = rest::Rest::new(rest_routes, stack, authenticator.clone(), policy.request_timeout);
        let rest = Arc::new(rest.with_sizes(policy.sizes.clone()));
        for prefix in rest.prefixes() {
            let rest = rest.clone();
            fallback = fallback.route(
                &format!("/{prefix}/{{*rest}}"),
                axum::routing::any(move |request: http::Request<axum::body::Body>| {
                    let rest = rest.clone();
                    async move { rest.serve(request).await }
                }),
            );
        }
        if let Some(authenticator) = authenticator {
            let keys = authenticator.verifier().clone();
            fallback = fallback.route("/.well-known/jwks.json", axum::routing::get(move || jwks(keys.clone())));
            server = server.authenticate(authenticator);
        }
        let cors = crm_kit::server::cors_layer(&policy.cors_allowed_origins).unwrap_or_else(|err| {
            tracing::error!(error = %err, "no cross-origin calls: the allowed origins are not origins");
            None
        });
        let server = server
            .cors(cors)
            .size_limits(policy.sizes.clone())
            .ready_check(ready_check(upstreams.clone()))
            .fallback(fallback);
        Opened::new(server).job("report upstream health", move |shutdown| report(upstreams, health, shutdown))
    }

    /// Serves on `listener` until `shutdown` fires, then drains the calls in flight.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), role::Error> {
        self.open(Server::new("gateway")).serve(listener, shutdown).await
    }
}

/// The gateway role: in front of every role that serves gRPC packages.
pub struct GatewayRole;

impl role::Service for GatewayRole {
    type Args = GatewayArgs;

    const SPEC: RoleSpec = RoleSpec {
        name: "gateway",
        title: "the gateway",
        packages: &[],
        services: &[],
        public_methods: &[],
        permissions: &[],
        default_port: 8080,
        calls: Calls::Every,
        consumes: &[],
    };

    async fn open(args: GatewayArgs, ctx: Context) -> Result<Opened, role::Error> {
        let policy = args.policy()?;
        let upstreams = ctx
            .suite()
            .callees(ctx.spec())
            .into_iter()
            .map(|spec| Ok(Upstream::of(spec, ctx.peer(spec.name)?.pool().clone())))
            .collect::<Result<Vec<_>, role::Error>>()?;
        let mut gateway = Gateway::new(upstreams, policy).authenticate(ctx.authenticator()?);
        if let Some(client) = ctx.events().redis_client() {
            gateway = gateway.share_limits(client, &ctx.events().settings().stream_prefix);
        }
        Ok(gateway.open(ctx.server()))
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
fn ready_check(upstreams: Arc<[Upstream]>) -> ReadyCheck {
    Arc::new(move || {
        let missing: Vec<String> = upstreams
            .iter()
            .filter(|u| u.pool.healthy_count() == 0)
            .map(|u| format!("{} has no healthy replica ({} known)", u.service(), u.pool.len()))
            .collect();
        let result = if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) };
        Box::pin(async move { result })
    })
}

/// Reports each upstream service's health (SERVING while it has a healthy replica), and the
/// gateway's own ("": every upstream has one), until shutdown. Publishing only reads counters,
/// so it runs often: a replica's change of health shows within [`REPORT_INTERVAL`] of its check.
async fn report(upstreams: Arc<[Upstream]>, health: HealthReporter, shutdown: Shutdown) {
    // Every service behind the gateway, with the index of its upstream.
    let services: Vec<(&'static str, usize)> =
        upstreams.iter().enumerate().flat_map(|(i, u)| u.services.iter().map(move |s| (*s, i))).collect();
    for (service, _) in &services {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    let publish = async {
        let mut tick = crm_kit::balance::interval(REPORT_INTERVAL);
        // Last reported status of each service, then of the gateway as a whole ("").
        let mut reported: Vec<Option<ServingStatus>> = vec![None; services.len() + 1];
        loop {
            tick.tick().await;
            let healthy: Vec<bool> = upstreams.iter().map(|u| u.pool.healthy_count() > 0).collect();
            let statuses = services.iter().map(|(service, i)| (*service, healthy[*i]));
            let all = ("", healthy.iter().all(|h| *h));
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
        () = publish => {}
        () = shutdown.wait() => {}
    }
    // Draining: nothing is to be sent here any more.
    for service in services.iter().map(|(s, _)| *s).chain([""]) {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_command_line() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            gateway: GatewayArgs,
        }
        let cli = Cli::try_parse_from(["crm", "--request-timeout", "2s"]).unwrap();
        assert_eq!(cli.gateway.request_timeout, Duration::from_secs(2));
        assert_eq!(cli.gateway.max_concurrency, 1024);
        let policy = cli.gateway.policy().unwrap();
        assert_eq!((policy.request_timeout, policy.max_concurrency), (Duration::from_secs(2), 1024));
        assert_eq!(policy.limits.user, parse_rate("200/s:400").unwrap());
        let off = Cli::try_parse_from(["crm", "--rate-limit-user", "off", "--rate-limit-anonymous", "5/m"]).unwrap();
        let limits = off.gateway.policy().unwrap().limits;
        assert_eq!((limits.user, limits.address), (None, parse_rate("5/m").unwrap()));
        let cors =
            Cli::try_parse_from(["crm", "--cors-allowed-origins", "https://a.example.com, http://b:3000"]).unwrap();
        assert_eq!(cors.gateway.policy().unwrap().cors_allowed_origins, ["https://a.example.com", "http://b:3000"]);
        let not_origin = Cli::try_parse_from(["crm", "--cors-allowed-origins", "a.example.com/app"]).unwrap();
        assert!(matches!(not_origin.gateway.policy(), Err(GatewayError::BadSetting(m)) if m.contains("not an origin")));
        assert_eq!(policy.sizes.for_path("/crm.auth.v1.AuthService/SignIn"), 64 * 1024);
        assert_eq!(policy.sizes.for_path("/crm.deals.v1.DealsService/CreateDeal"), 4 * 1024 * 1024);
        let sizes = Cli::try_parse_from(["crm", "--route-max-request-size", "/crm.a.v1.A/=1KiB,/crm.a.v1.A/Big=2KiB"]);
        let sizes = sizes.unwrap().gateway.policy().unwrap().sizes;
        assert_eq!((sizes.for_path("/crm.a.v1.A/Big"), sizes.for_path("/crm.a.v1.A/Small")), (2048, 1024));
        assert_eq!(sizes.for_path("/crm.auth.v1.AuthService/SignIn"), 4 * 1024 * 1024, "the default replaced");
        for bad in ["/x=5MiB", "x=1KiB", "/x", "/x=lots"] {
            let cli = Cli::try_parse_from(["crm", "--route-max-request-size", bad]).unwrap();
            assert!(cli.gateway.policy().is_err(), "{bad}");
        }
        let bad = Cli::try_parse_from(["crm", "--rate-limit-client", "lots"]).unwrap();
        assert!(matches!(bad.gateway.policy(), Err(GatewayError::BadSetting(m)) if m.contains("--rate-limit-client")));
        let zero = Cli::try_parse_from(["crm", "--max-concurrency", "0"]).unwrap();
        assert!(matches!(zero.gateway.policy(), Err(GatewayError::BadSetting(_))));
        assert!(Cli::try_parse_from(["crm", "--request-timeout", "soon"]).is_err());
    }
}
