//! Rate limits per caller (SPEC G2), shared by every gateway replica through Redis.
//!
//! A caller is a user (the subject of an access token), a client (a service account's token),
//! or, for a call without a token (signing in), the address it comes from. Each kind has its
//! own limit: a sustained rate and a burst. The algorithm is GCRA (the generic cell rate
//! algorithm): one number per caller, the "theoretical arrival time" of its next call, kept in
//! Redis and moved by one Lua script in one round trip, with Redis's clock, so that every
//! replica decides on the same state. A caller with a large burst is granted a few calls at
//! once (a lease, a fiftieth of its burst, at most 100, usable for a second), so that a busy
//! caller costs one Redis round trip per lease rather than per call; a caller with a small burst
//! asks for each call.
//!
//! When Redis is unreachable, each replica decides alone with the same algorithm and limits in
//! memory (fail open with a per-replica limit, never closed for the whole CRM): the outage is
//! logged once, every call decided so is counted in `crm_gateway_rate_limit_fallback_total`,
//! and Redis is asked again a second later. Without Redis configured (`crm dev`, one gateway),
//! the limits are this replica's alone from the start.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crm_kit::auth::Principal;
use crm_kit::metrics::{RateLimitLabels, metrics};
use http::{HeaderValue, Request, Response};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tonic::Code;
use tower::{Layer, Service, ServiceExt};

use crate::edge::HttpBody;

/// A sustained rate and a burst: `50/s:100` is 50 calls a second on average, and up to 100 at
/// once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Microseconds between calls at the sustained rate (at least 1).
    interval_us: u64,
    /// Calls that may come at once.
    burst: u64,
}

impl Rate {
    /// Calls per second on average.
    pub fn per_second(&self) -> f64 {
        1e6 / self.interval_us as f64
    }

    /// Calls that may come at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }
}

/// Parses a limit setting: `RATE/s` or `RATE/m` (a sustained rate per second or per minute),
/// optionally `:BURST` (calls at once; by default a second's worth, at least 1); `off` (or `0`)
/// for no limit.
pub fn parse_rate(text: &str) -> Result<Option<Rate>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") || text == "0" {
        return Ok(None);
    }
    let bad =
        || format!("{text:?} is not a rate limit: write e.g. \"50/s\", \"3000/m:100\" (RATE/UNIT[:BURST]) or \"off\"");
    let (rate, burst) = match text.split_once(':') {
        Some((rate, burst)) => (rate, Some(burst.trim().parse::<u64>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
    let count: f64 = count.trim().parse().map_err(|_| bad())?;
    let window = match unit.trim() {
        "s" => 1e6,
        "m" => 60e6,
        _ => return Err(bad()),
    };
    if !count.is_finite() || count <= 0.0 || count > 1e6 {
        return Err(format!("{text:?}: the rate must be above 0 and at most 1000000 a second"));
    }
    let interval_us = ((window / count).round() as u64).max(1);
    let per_second = (1e6 / interval_us as f64).ceil() as u64;
    let burst = burst.unwrap_or(per_second).max(1);
    if burst > 1_000_000 {
        return Err(format!("{text:?}: the burst must be at most 1000000"));
    }
    Ok(Some(Rate { interval_us, burst }))
}

/// The limit of each kind of caller; `None`: not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Per user.
    pub user: Option<Rate>,
    /// Per service account.
    pub client: Option<Rate>,
    /// Per address, for calls without a token.
    pub address: Option<Rate>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.user.is_some() || self.client.is_some() || self.address.is_some()
    }
}

/// The kind of caller and its key, from what the authentication layer found.
fn caller<B>(request: &Request<B>) -> Option<(&'static str, String)> {
    if let Some(principal) = request.extensions().get::<Principal>() {
        let kind = if principal.service_account { "client" } else { "user" };
        return Some((kind, principal.subject.clone()));
    }
    let address = request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .map(|a| a.ip())?;
    // An IPv4 address mapped into IPv6 is the same caller.
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    Some(("address", address.to_string()))
}

/// One GCRA step: with the caller's theoretical arrival time `tat` (µs), may a call come at
/// `now`? Yes: `tat` moves on by one interval. No: how long (µs) until it may.
fn gcra(tat: &mut u64, now: u64, rate: Rate) -> Result<(), u64> {
    let next = (*tat).max(now) + rate.interval_us;
    let capacity = rate.interval_us.saturating_mul(rate.burst);
    if next - now > capacity {
        return Err(next - now - capacity);
    }
    *tat = next;
    Ok(())
}

/// The same step in Redis, with Redis's clock, for up to ARGV[3] calls at once: KEYS[1] the
/// caller's key, ARGV[1] the interval, ARGV[2] the burst. Answers how many calls it granted
/// (as many as fit, at most ARGV[3]) and, when none, the microseconds to wait. The key expires
/// when its caller is back to a full burst.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local fit = math.floor((capacity - (tat - now)) / interval)
if fit < 1 then return {0, tat + interval - now - capacity} end
local granted = math.min(tonumber(ARGV[3]), fit)
local next = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000))
return {granted, 0}
";

/// Calls granted by Redis at once for a caller whose burst is large: its burst over this, at
/// most [`MAX_LEASE`]; a caller with a small burst asks Redis for each call.
const LEASE_SHARE: u64 = 50;
const MAX_LEASE: u64 = 100;
/// How long granted calls not made yet stay usable.
const LEASE_FOR: Duration = Duration::from_secs(1);

/// Longest wait for Redis's answer before a replica decides alone.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// After Redis failed, how long a replica decides alone before asking it again.
const REDIS_PAUSE: Duration = Duration::from_secs(1);
/// Callers remembered in memory; beyond it, those back to a full burst are forgotten.
const MAX_LOCAL: usize = 100_000;

/// The limits in Redis.
struct Shared {
    conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    /// Until when (µs since the limiter's start) Redis is not asked; 0: ask it.
    paused_until: AtomicU64,
}

/// A caller's kind and key.
type CallerKey = (&'static str, String);

/// Decides whether a caller's call may go on.
pub(crate) struct Limiter {
    limits: Limits,
    shared: Option<Shared>,
    local: Mutex<HashMap<CallerKey, u64>>,
    /// Calls Redis granted ahead and not made yet, per caller, and until when (µs) they last.
    leases: Mutex<HashMap<CallerKey, (u64, u64)>>,
    started: Instant,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("limits", &self.limits).field("shared", &self.shared.is_some()).finish()
    }
}

impl Limiter {
    /// Limits decided in this replica alone.
    pub(crate) fn local(limits: Limits) -> Limiter {
        // Zero series from the start, limited or not, so that dashboards and alerts see 0.
        for caller in ["user", "client", "address"] {
            for decided in ["shared", "local"] {
                let _ = metrics().rate_limited.get_or_create(&RateLimitLabels { caller, decided });
            }
        }
        Limiter {
            limits,
            shared: None,
            local: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    /// Limits shared through the Redis of `client`, its keys under `prefix`.
    pub(crate) fn shared(limits: Limits, client: redis::Client, prefix: &str) -> Result<Limiter, String> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(REDIS_PAUSE);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?;
        let shared = Shared {
            conn,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: format!("{prefix}ratelimit:"),
            paused_until: AtomicU64::new(0),
        };
        Ok(Limiter { shared: Some(shared), ..Limiter::local(limits) })
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn rate(&self, kind: &str) -> Option<Rate> {
        match kind {
            "user" => self.limits.user,
            "client" => self.limits.client,
            _ => self.limits.address,
        }
    }

    /// `Ok` when the call may go on; otherwise how long the caller should wait.
    pub(crate) async fn check(&self, kind: &'static str, key: &str) -> Result<(), Duration> {
        let Some(rate) = self.rate(kind) else { return Ok(()) };
        let decided = match &self.shared {
            Some(shared) if shared.paused_until.load(Ordering::Relaxed) <= self.now_us() => {
                match self.check_shared(shared, kind, key, rate).await {
                    Ok(verdict) => {
                        if shared.paused_until.swap(0, Ordering::Relaxed) != 0 {
                            tracing::info!("rate limits are shared through Redis again");
                        }
                        Some(verdict)
                    }
                    Err(err) => {
                        let until = self.now_us() + REDIS_PAUSE.as_micros() as u64;
                        if shared.paused_until.swap(until, Ordering::Relaxed) == 0 {
                            tracing::warn!(error = %err,
                                "Redis is unreachable: each gateway replica applies the rate limits alone");
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        let (verdict, how) = match decided {
            Some(verdict) => (verdict, "shared"),
            None => {
                if self.shared.is_some() {
                    metrics().rate_limit_fallback.inc();
                }
                (self.check_local(kind, key, rate), "local")
            }
        };
        if verdict.is_err() {
            metrics().rate_limited.get_or_create(&RateLimitLabels { caller: kind, decided: how }).inc();
        }
        verdict
    }

    /// Decides in Redis: from calls granted ahead to this replica, or by asking Redis for the
    /// next ones (several at once for a caller with a large burst: Redis is asked once per
    /// lease, and a lease not used within [`LEASE_FOR`] is dropped, which only ever makes the
    /// limit stricter).
    async fn check_shared(
        &self,
        shared: &Shared,
        kind: &'static str,
        key: &str,
        rate: Rate,
    ) -> Result<Result<(), Duration>, String> {
        let now = self.now_us();
        {
            let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((cells, until)) = leases.get_mut(&(kind, key.to_string()))
                && *cells > 0
                && *until > now
            {
                *cells -= 1;
                return Ok(Ok(()));
            }
        }
        let want = (rate.burst / LEASE_SHARE).clamp(1, MAX_LEASE);
        let mut conn = shared.conn.clone();
        let mut invocation = shared.script.key(format!("{}{kind}:{key}", shared.prefix));
        invocation.arg(rate.interval_us).arg(rate.burst).arg(want);
        let (granted, wait): (u64, u64) = tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer within {REDIS_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        if granted == 0 {
            return Ok(Err(Duration::from_micros(wait.max(1))));
        }
        if granted > 1 {
            let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            if leases.len() >= MAX_LOCAL {
                leases.retain(|_, (_, until)| *until > now);
            }
            leases.insert((kind, key.to_string()), (granted - 1, now + LEASE_FOR.as_micros() as u64));
        }
        Ok(Ok(()))
    }

    fn check_local(&self, kind: &'static str, key: &str, rate: Rate) -> Result<(), Duration> {
        let now = self.now_us();
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if local.len() >= MAX_LOCAL {
            local.retain(|_, tat| *tat > now);
        }
        let tat = local.entry((kind, key.to_string())).or_insert(0);
        gcra(tat, now, rate).map_err(Duration::from_micros)
    }
}

/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` saying when to come back (and, for HTTP
/// clients, `retry-after` in whole seconds).
fn refusal(kind: &str, wait: Duration) -> Response<HttpBody> {
    use tonic_types::{ErrorDetails, StatusExt};
    let whose = match kind {
        "user" => "your user's",
        "client" => "this service account's",
        _ => "this address's",
    };
    let message = format!("over {whose} rate limit; retry in {} ms", wait.as_millis().max(1));
    let status =
        tonic::Status::with_error_details(Code::ResourceExhausted, message, ErrorDetails::with_retry_info(Some(wait)));
    let mut response: Response<HttpBody> = status.into_http();
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// Tower layer: refuses a caller's call over its rate limit before it takes any other resource
/// of the gateway.
#[derive(Debug, Clone)]
pub(crate) struct RateLimitLayer {
    limiter: Option<Arc<Limiter>>,
}

impl RateLimitLayer {
    /// No layer work at all when no limit is set.
    pub(crate) fn new(limiter: Arc<Limiter>) -> RateLimitLayer {
        RateLimitLayer { limiter: limiter.limits.any().then_some(limiter) }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit { inner, limiter: self.limiter.clone() }
    }
}

/// See [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub(crate) struct RateLimit<S> {
    inner: S,
    limiter: Option<Arc<Limiter>>,
}

impl<S> Service<Request<HttpBody>> for RateLimit<S>
where
    S: Service<Request<HttpBody>, Response = Response<HttpBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<HttpBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, S::Error>> + Send>>;

    /// Ready at once: the inner layers (the concurrency limit) are asked only for calls that
    /// pass, so a refused call never holds their capacity.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<HttpBody>) -> Self::Future {
        let inner = self.inner.clone();
        let limiter = self.limiter.clone();
        Box::pin(async move {
            if let Some(limiter) = limiter
                && let Some((kind, key)) = caller(&request)
                && let Err(wait) = limiter.check(kind, &key).await
            {
                return Ok(refusal(kind, wait));
            }
            inner.oneshot(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("off"), Ok(None));
        assert_eq!(parse_rate("0"), Ok(None));
        assert_eq!(parse_rate("50/s"), Ok(Some(Rate { interval_us: 20_000, burst: 50 })));
        assert_eq!(parse_rate("50/s:200"), Ok(Some(Rate { interval_us: 20_000, burst: 200 })));
        assert_eq!(parse_rate("30/m"), Ok(Some(Rate { interval_us: 2_000_000, burst: 1 })));
        assert_eq!(parse_rate(" 0.5/s : 3 "), Ok(Some(Rate { interval_us: 2_000_000, burst: 3 })));
        for bad in ["", "50", "50/h", "x/s", "-1/s", "50/s:x", "50/s:-1", "2000000/s", "NaN/s", "10/s:2000000"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
        let rate = parse_rate("100/s:10").unwrap().unwrap();
        assert_eq!((rate.per_second(), rate.burst()), (100.0, 10));
    }

    #[test]
    fn gcra_allows_a_burst_then_the_rate() {
        let rate = Rate { interval_us: 1_000, burst: 3 };
        let mut tat = 0;
        // Three at once, the fourth waits one interval.
        for _ in 0..3 {
            assert_eq!(gcra(&mut tat, 10_000, rate), Ok(()));
        }
        assert_eq!(gcra(&mut tat, 10_000, rate), Err(1_000));
        // A refused call changes nothing; one interval later one more goes.
        assert_eq!(gcra(&mut tat, 10_999, rate), Err(1));
        assert_eq!(gcra(&mut tat, 11_000, rate), Ok(()));
        assert_eq!(gcra(&mut tat, 11_000, rate), Err(1_000));
        // After a quiet spell the whole burst is back, no more.
        for _ in 0..3 {
            assert_eq!(gcra(&mut tat, 100_000, rate), Ok(()));
        }
        assert!(gcra(&mut tat, 100_000, rate).is_err());
    }

    #[tokio::test]
    async fn local_limits_are_per_caller() {
        let limits = Limits { user: parse_rate("1/m:2").unwrap(), client: None, address: parse_rate("1/m").unwrap() };
        let limiter = Limiter::local(limits);
        assert!(limiter.check("user", "u1").await.is_ok());
        assert!(limiter.check("user", "u1").await.is_ok());
        let wait = limiter.check("user", "u1").await.unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60), "{wait:?}");
        assert!(limiter.check("user", "u2").await.is_ok(), "another user has a limit of its own");
        for _ in 0..100 {
            assert!(limiter.check("client", "svc").await.is_ok(), "service accounts are not limited here");
        }
        assert!(limiter.check("address", "10.0.0.1").await.is_ok());
        assert!(limiter.check("address", "10.0.0.1").await.is_err());
    }

    #[tokio::test]
    async fn shared_limits_hold_across_replicas_and_fall_back_alone() {
        let url = crm_kit::testing::redis_url();
        let prefix = crm_kit::testing::unique_stream_prefix();
        let limits = Limits { user: parse_rate("1/m:5").unwrap(), ..Limits::default() };
        let replica = || Limiter::shared(limits, redis::Client::open(url.as_str()).unwrap(), &prefix).unwrap();
        let (a, b) = (replica(), replica());
        let mut allowed = 0;
        for i in 0..10 {
            let limiter = if i % 2 == 0 { &a } else { &b };
            allowed += usize::from(limiter.check("user", "u1").await.is_ok());
        }
        assert_eq!(allowed, 5, "one burst between both replicas");
        let wait = a.check("user", "u1").await.unwrap_err();
        assert!(wait > Duration::from_secs(10), "{wait:?}");

        // A Redis nobody answers at: decided alone, with the same limit per replica, counted.
        let gone = closed_port();
        let before = metrics().rate_limit_fallback.get();
        let alone = Limiter::shared(limits, redis::Client::open(format!("redis://{gone}")).unwrap(), &prefix).unwrap();
        let mut allowed = 0;
        for _ in 0..10 {
            allowed += usize::from(alone.check("user", "u1").await.is_ok());
        }
        assert_eq!(allowed, 5, "a burst of this replica's own");
        assert!(metrics().rate_limit_fallback.get() >= before + 10);
    }

    #[tokio::test]
    async fn callers_with_large_bursts_ask_redis_once_per_lease() {
        let url = crm_kit::testing::redis_url();
        let prefix = crm_kit::testing::unique_stream_prefix();
        // 500 calls at once, then one a minute: leases of 10.
        let limits = Limits { user: parse_rate("1/m:500").unwrap(), ..Limits::default() };
        let replica = || Limiter::shared(limits, redis::Client::open(url.as_str()).unwrap(), &prefix).unwrap();
        let (a, b) = (replica(), replica());
        let mut allowed = 0;
        for i in 0..1000 {
            let limiter = if i % 3 == 0 { &a } else { &b };
            allowed += usize::from(limiter.check("user", "heavy").await.is_ok());
        }
        // Never more than the burst between both; at most a lease's worth left unused at each.
        assert!((500 - 2 * 9..=500).contains(&allowed), "{allowed}");
        let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let stored: Option<String> =
            redis::cmd("GET").arg(format!("{prefix}ratelimit:user:heavy")).query_async(&mut conn).await.unwrap();
        assert!(stored.is_some(), "the caller's state is in Redis");
    }

    /// An address where nothing listens.
    pub(super) fn closed_port() -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }
}
