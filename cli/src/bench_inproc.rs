//! What the in-process service benches (`crm bench tasks`, `crm bench deals`) share: a stand-in
//! organisation resolved in-process (users by number in departments of a given size, whose
//! first user heads the department and sees its users; one administrator who sees everyone),
//! no customers, and the timing loop. The rest of such a bench is the service's own code.

use std::collections::HashMap;
use std::time::Instant;

use crm_kit::ApiError;
use crm_kit::auth::{Claims, OwnerScope, Principal, ScopeSource, UserDirectory, UserStatus};
use crm_kit::customers::Customers;
use crm_proto::contacts::v1::{CustomerKey, CustomerSummary};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;

const USER_PREFIX: &str = "0190b000-0000-7000-8000-";
const DEPARTMENT_PREFIX: &str = "0190b000-0000-7000-8001-";

pub fn user(i: u64) -> String {
    format!("{USER_PREFIX}{i:012x}")
}

pub fn department(i: u64) -> String {
    format!("{DEPARTMENT_PREFIX}{i:012x}")
}

/// The stand-in organisation: users by number, departments of `size`, and [`Org::ADMIN`].
#[derive(Clone)]
pub struct Org {
    pub users: u64,
    pub size: u64,
}

impl Org {
    /// The user who sees everyone's records.
    pub const ADMIN: u64 = 0xffff_ffff_ffff;

    pub fn index(&self, id: &str) -> Option<u64> {
        id.strip_prefix(USER_PREFIX).and_then(|n| u64::from_str_radix(n, 16).ok())
    }

    fn exists(&self, i: u64) -> bool {
        i < self.users || i == Org::ADMIN
    }

    pub fn department_of(&self, i: u64) -> u64 {
        i / self.size
    }

    pub fn head_of(&self, d: u64) -> u64 {
        d * self.size
    }

    /// How many departments there are.
    pub fn departments(&self) -> u64 {
        self.users.div_ceil(self.size)
    }

    /// The users of department `d`, its head first.
    pub fn members(&self, d: u64) -> Vec<String> {
        let last = ((d + 1) * self.size).min(self.users);
        (self.head_of(d)..last).map(user).collect()
    }

    /// User `i` signed in with `permissions`.
    pub fn principal(&self, i: u64, permissions: &[&str]) -> Principal {
        let claims = Claims {
            sub: user(i),
            name: format!("User {i}"),
            dept: department(self.department_of(i)),
            perms: permissions.iter().map(|p| p.to_string()).collect(),
            ..Claims::default()
        };
        Principal::from_claims(claims, format!("bench-token-{i}"))
    }
}

impl ScopeSource for Org {
    fn resolve<'a>(&'a self, principal: &'a Principal) -> BoxFuture<'a, Result<OwnerScope, ApiError>> {
        let scope = match self.index(&principal.subject) {
            Some(Org::ADMIN) => OwnerScope::All,
            Some(i) if i % self.size == 0 => OwnerScope::Owners(self.members(self.department_of(i)).into()),
            _ => OwnerScope::Owners(vec![principal.subject.clone()].into()),
        };
        Box::pin(async move { Ok(scope) })
    }
}

impl UserDirectory for Org {
    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>> {
        let known = self.index(user_id).is_some_and(|i| self.exists(i));
        Box::pin(async move { Ok(if known { UserStatus::Active } else { UserStatus::Unknown }) })
    }

    fn statuses<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<UserStatus>, ApiError>> {
        let found =
            user_ids
                .iter()
                .map(|id| {
                    if self.index(id).is_some_and(|i| self.exists(i)) {
                        UserStatus::Active
                    } else {
                        UserStatus::Unknown
                    }
                })
                .collect();
        Box::pin(async move { Ok(found) })
    }

    fn department_members<'a>(&'a self, department_id: &'a str) -> BoxFuture<'a, Result<Vec<String>, ApiError>> {
        let d = department_id.strip_prefix(DEPARTMENT_PREFIX).and_then(|n| u64::from_str_radix(n, 16).ok());
        let members = d.filter(|d| *d < self.departments()).map(|d| self.members(d));
        Box::pin(async move { members.ok_or_else(|| ApiError::invalid("department_id", "no department has this id")) })
    }

    fn names<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, String>, ApiError>> {
        let names = user_ids
            .iter()
            .filter_map(|id| self.index(id).filter(|i| self.exists(*i)).map(|i| (id.clone(), format!("User {i}"))))
            .collect();
        Box::pin(async move { Ok(names) })
    }
}

/// No customers: the benches link none.
pub struct NoCustomers;

impl Customers for NoCustomers {
    fn find<'a>(
        &'a self,
        _: &'a Principal,
        _: Vec<CustomerKey>,
    ) -> BoxFuture<'a, Result<Vec<CustomerSummary>, ApiError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// A call as `principal` makes it (the authentication layer's work done).
pub fn request<T>(principal: &Principal, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(principal.clone());
    request
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

pub fn ms(micros: u64) -> String {
    format!("{:.2} ms", micros as f64 / 1000.0)
}

/// Runs `n` calls of `call` with `concurrency` in flight; prints and returns their latencies.
pub async fn timed<F, Fut>(name: &str, n: u64, concurrency: usize, call: F) -> anyhow::Result<Histogram<u64>>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let started = Instant::now();
    let mut hist = histogram();
    let mut results = futures_util::stream::iter(0..n)
        .map(|i| {
            let call = call(i);
            async move {
                let at = Instant::now();
                call.await.map(|()| at.elapsed().as_micros() as u64)
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = results.next().await {
        let micros = result.map_err(|s| anyhow::anyhow!("{name}: {:?} {}", s.code(), s.message()))?;
        hist.record(micros.max(1))?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{name:<48} {n:>7} calls {:>9.0}/s   p50 {:>10}   p99 {:>10}   max {:>10}",
        n as f64 / secs,
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
    Ok(hist)
}
