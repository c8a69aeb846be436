//! Replicas of a service this process calls: discovery by DNS, active and passive health, one
//! HTTP/2 connection per replica, power-of-two-choices selection by calls in flight, and
//! sending a call with failover while nothing of it has been sent.
//!
//! One mechanism for every caller: the gateway forwards client calls through a [`Pool`]
//! without decoding them, and a service's typed client to another service
//! ([`crate::peer::Peer`]) sends its calls through the same kind of pool. A replica served by
//! this very process is called without the network ([`local`]).

mod endpoint;
pub mod local;
mod pool;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;

pub use endpoint::{ConnectError, Endpoint, InFlight, ResponseBody};
pub use pool::{Avoid, Pool, Replica, SendError};

use crate::shutdown::Shutdown;

/// Shortest discovery or health-check interval; smaller values are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// How often a process re-resolves the replicas of the services it calls, and health-checks
/// each of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    pub discovery: Duration,
    pub health: Duration,
}

impl Default for Intervals {
    fn default() -> Intervals {
        Intervals { discovery: Duration::from_secs(5), health: Duration::from_secs(1) }
    }
}

/// Keeps `pool` current until `shutdown` fires: re-resolves its targets every
/// `intervals.discovery`, and health-checks each replica every `intervals.health`, each in its
/// own loop so that a slow or hung replica delays no other's.
pub async fn maintain(pool: Arc<Pool>, intervals: Intervals, shutdown: Shutdown) {
    let mut checkers = tokio::task::JoinSet::new();
    let discovery = async {
        let mut tick = interval(intervals.discovery);
        loop {
            tick.tick().await;
            pool.discover().await;
            pool.mark_discovered();
            for endpoint in pool.endpoints() {
                if !endpoint.watched.swap(true, Ordering::Relaxed) {
                    checkers.spawn(watch(endpoint, intervals.health));
                }
            }
            while checkers.try_join_next().is_some() {}
        }
    };
    tokio::select! {
        () = discovery => {}
        () = shutdown.wait() => {}
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

/// A ticker every `period` (at least [`MIN_INTERVAL`]) that does not catch up on missed ticks.
pub fn interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period.max(MIN_INTERVAL));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Picks the less loaded of two distinct random candidates (or the only one).
pub fn choose_p2c<I>(candidates: I, load: impl Fn(&I::Item) -> usize, rng: &mut impl Rng) -> Option<I::Item>
where
    I: Iterator + Clone,
{
    let n = candidates.clone().count();
    match n {
        0 => None,
        1 => candidates.into_iter().next(),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (first, second) = (a.min(b), a.max(b));
            let mut rest = candidates.skip(first);
            let x = rest.next()?;
            // The set may shrink between counting and walking (it never does for a slice).
            let Some(y) = rest.nth(second - first - 1) else { return Some(x) };
            // Ties go to the first one drawn, so that equal replicas share calls evenly.
            let (lx, ly) = (load(&x), load(&y));
            Some(if ly < lx || (ly == lx && a > b) { y } else { x })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn p2c_prefers_the_less_loaded_of_two() {
        let mut rng = rand::rng();
        let loads = [5_usize, 0];
        for _ in 0..100 {
            assert_eq!(choose_p2c(loads.iter(), |l| **l, &mut rng), Some(&0));
        }
        let reversed = [0_usize, 5];
        for _ in 0..100 {
            assert_eq!(choose_p2c(reversed.iter(), |l| **l, &mut rng), Some(&0));
        }
        assert_eq!(choose_p2c([].iter(), |l: &&usize| **l, &mut rng), None);
        assert_eq!(choose_p2c([7_usize].iter(), |l| **l, &mut rng), Some(&7));
        // Of three, the most loaded is never chosen: it loses to whichever other one is drawn.
        let three = [9_usize, 1, 2];
        for _ in 0..200 {
            assert_ne!(choose_p2c(three.iter(), |l| **l, &mut rng), Some(&9));
        }
        // With equal loads every candidate gets picked.
        let many = [0_usize, 1, 2, 3];
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            seen.insert(*choose_p2c(many.iter(), |_| 0, &mut rng).unwrap());
        }
        assert_eq!(seen.len(), 4);
    }
}
