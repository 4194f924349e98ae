//! Rate limits and the failure throttle held across replicas, over the shared state
//! ([`crate::state`]): a replica takes tokens from a limit's shared bucket in leases (a
//! twentieth of a second's worth of the rate, at most a tenth of the burst, at least one), uses
//! them locally, fetches the next lease when half is used, and returns what it has not used
//! within [`LEASE_IDLE`]. Failed authentications are counted in Redis as they happen; a block
//! made anywhere is learnt by each replica at its next failure from that address.
//!
//! Invariants: the per-replica count (`auth`) is always taken too, so a Redis that goes away
//! leaves every replica exactly as limited as a lone one; a request waits on Redis only when
//! its lease is empty, and never past [`crate::state::DEADLINE`]; the table of leases is
//! bounded ([`LEASES_PER_SHARD`]), an evicted lease returns its tokens.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::credentials::{FailureLimit, Rate};
use crate::sharded::{Sharded, lock};
use crate::state::SharedState;

/// A lease unused this long returns its tokens to the shared bucket.
const LEASE_IDLE: Duration = Duration::from_secs(1);
/// Leases one shard keeps at most (16 shards).
const LEASES_PER_SHARD: usize = 4096;

/// Whose limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LimitKey {
    /// A client address (`rate_limit.per_address`).
    Address(IpAddr),
    /// An identity's key (`rate_limit.per_identity`, a token's own `rate`).
    Identity(Arc<str>),
}

impl LimitKey {
    /// Its name in Redis (no credential: an address, or an identity's key).
    fn name(&self) -> String {
        match self {
            LimitKey::Address(ip) => format!("a:{ip}"),
            LimitKey::Identity(k) => format!("i:{k}"),
        }
    }
}

/// Tokens a replica holds of one shared bucket.
#[derive(Debug, Default)]
struct Lease {
    tokens: u32,
    /// The rate they were taken under (for returning them).
    rate: Option<Rate>,
    /// A lease is being fetched ahead.
    fetching: bool,
    /// When a token was last used.
    used: Option<Instant>,
    /// The shared bucket said it is empty until then.
    refused_until: Option<Instant>,
}

/// How many tokens one lease of `rate` holds: 50 ms of the rate, at most a tenth of the burst,
/// at least one.
pub(crate) fn lease_size(rate: Rate) -> u32 {
    let per_sec = f64::from(rate.count) / rate.per.as_secs_f64().max(0.001);
    let fifty_ms = (per_sec / 20.0).floor();
    let cap = (rate.count / 10).max(1);
    // In range: a non-negative float below u32::MAX (clamped to the cap first).
    let size = if fifty_ms >= f64::from(cap) { cap } else { fifty_ms as u32 };
    size.clamp(1, cap)
}

/// One step of taking a token.
enum Step {
    /// Taken from the lease.
    Taken,
    /// Taken, and the lease is running low: fetch the next ahead.
    TakenRefill,
    /// The shared bucket was empty until then.
    Refused(Duration),
    /// The lease is empty: fetch one now.
    Fetch,
}

/// The limits of one credential table over the shared state.
pub(crate) struct SharedLimits {
    state: Arc<SharedState>,
    leases: Sharded<LimitKey, Arc<Mutex<Lease>>>,
}

impl SharedLimits {
    pub(crate) fn new(state: Arc<SharedState>) -> Self {
        SharedLimits { state, leases: Sharded::new() }
    }

    /// Takes one token of `key`'s shared bucket: None when Redis cannot say (the per-replica
    /// count decides), else admitted, or refused with how long until a token is there.
    pub(crate) async fn take(&self, key: LimitKey, rate: Rate) -> Option<Result<(), Duration>> {
        if !self.state.is_up() {
            return None;
        }
        let now = Instant::now();
        let size = lease_size(rate);
        let lease = self.lease(&key, now);
        let step = {
            let mut l = lock(&lease);
            if l.rate != Some(rate) {
                // A reload changed the rate: tokens of the old bucket are not this one's.
                l.tokens = 0;
                l.refused_until = None;
                l.rate = Some(rate);
            }
            if l.tokens > 0 {
                l.tokens -= 1;
                l.used = Some(now);
                if l.tokens <= size / 2 && !l.fetching {
                    l.fetching = true;
                    Step::TakenRefill
                } else {
                    Step::Taken
                }
            } else {
                match l.refused_until {
                    Some(until) if until > now => Step::Refused(until - now),
                    _ => Step::Fetch,
                }
            }
        };
        match step {
            Step::Taken => Some(Ok(())),
            Step::Refused(wait) => Some(Err(wait)),
            Step::TakenRefill => {
                let state = self.state.clone();
                tokio::spawn(async move {
                    let got = state.take(&key.name(), rate, size).await;
                    let mut l = lock(&lease);
                    l.fetching = false;
                    if let Ok(g) = got {
                        l.tokens = l.tokens.saturating_add(g.granted);
                        if g.granted == 0 {
                            l.refused_until = Some(Instant::now() + g.wait);
                        }
                    }
                });
                Some(Ok(()))
            }
            Step::Fetch => match self.state.take(&key.name(), rate, size).await {
                Ok(g) if g.granted > 0 => {
                    let mut l = lock(&lease);
                    l.tokens = l.tokens.saturating_add(g.granted - 1);
                    l.used = Some(now);
                    l.refused_until = None;
                    Some(Ok(()))
                }
                Ok(g) => {
                    lock(&lease).refused_until = Some(now + g.wait);
                    Some(Err(g.wait))
                }
                Err(_) => None,
            },
        }
    }

    /// The lease of `key`, made when missing; a full shard first forgets leases holding
    /// nothing, then returns the least recently used one's tokens.
    fn lease(&self, key: &LimitKey, now: Instant) -> Arc<Mutex<Lease>> {
        let mut shard = lock(self.leases.shard(key));
        if let Some(l) = shard.get(key) {
            return l.clone();
        }
        if shard.len() >= LEASES_PER_SHARD {
            shard.retain(|_, l| holds_something(&lock(l), now));
            if shard.len() >= LEASES_PER_SHARD {
                let oldest = shard.iter().min_by_key(|(_, l)| lock(l).used).map(|(k, _)| k.clone());
                if let Some((k, l)) = oldest.and_then(|k| shard.remove_entry(&k)) {
                    self.give_back(&k, &mut lock(&l));
                }
            }
        }
        shard.entry(key.clone()).or_default().clone()
    }

    /// Returns the tokens of leases unused for [`LEASE_IDLE`] and forgets leases that hold
    /// nothing (called by the gateway's sweep, a few times a second).
    pub(crate) fn release_idle(&self) {
        let now = Instant::now();
        self.leases.retain(|k, l| {
            let mut l = lock(l);
            if l.tokens > 0 && !l.fetching && l.used.is_none_or(|u| now.duration_since(u) >= LEASE_IDLE) {
                self.give_back(k, &mut l);
            }
            holds_something(&l, now) || l.used.is_some_and(|u| now.duration_since(u) < LEASE_IDLE)
        });
    }

    /// Returns a lease's tokens to its shared bucket (in the background).
    fn give_back(&self, key: &LimitKey, l: &mut Lease) {
        let (n, Some(rate)) = (std::mem::take(&mut l.tokens), l.rate) else { return };
        if n == 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let state = self.state.clone();
        let name = key.name();
        rt.spawn(async move {
            let _ = state.refund(&name, rate, n).await;
        });
    }

    /// Counts a failed authentication from `client` on every replica (in the background);
    /// `blocked` learns of a block, made here or on another replica.
    pub(crate) fn report_failure(
        &self,
        client: IpAddr,
        limit: FailureLimit,
        blocked: impl FnOnce(Duration) + Send + 'static,
    ) {
        if !self.state.is_up() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let state = self.state.clone();
        rt.spawn(async move {
            if let Ok(Some(d)) = state.failed(client, limit).await {
                blocked(d);
            }
        });
    }
}

impl Drop for SharedLimits {
    /// A credential table replaced by a reload returns what its leases hold.
    fn drop(&mut self) {
        for (k, l) in self.leases.entries() {
            self.give_back(&k, &mut lock(&l));
        }
    }
}

fn holds_something(l: &Lease, now: Instant) -> bool {
    l.tokens > 0 || l.fetching || l.refused_until.is_some_and(|u| u > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_fifty_milliseconds_of_the_rate_within_a_tenth_of_the_burst() {
        let r = |count, secs| Rate { count, per: Duration::from_secs(secs) };
        assert_eq!(lease_size(r(30, 60)), 1);
        assert_eq!(lease_size(r(6000, 60)), 5);
        assert_eq!(lease_size(r(1000, 1)), 50);
        assert_eq!(lease_size(r(100, 1)), 5);
        assert_eq!(lease_size(r(20, 1)), 1);
        assert_eq!(lease_size(r(1_000_000, 1)), 50_000);
        assert_eq!(lease_size(r(u32::MAX, 1)), u32::MAX / 20);
        assert_eq!(lease_size(r(5, 1)), 1);
    }
}
