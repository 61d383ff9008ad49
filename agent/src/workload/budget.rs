//! How many JWT-SVIDs workloads may make the agent mint at the server.
//!
//! The server holds each agent to `agent_requests_per_second`, and the
//! agent's own calls (Sync, Renew, SignX509Svids) share that budget with
//! the mints workloads ask for. A workload chooses its audiences freely, so
//! without a bound here one workload asking for fresh audiences spent the
//! node's whole share: other workloads' fetches and the agent's own renewal
//! were refused (issue 12, finding 7). So server-bound mints pass two token
//! buckets, both of which must have a token:
//!
//! - one per uid (`jwt_mints_per_second_per_uid`): the uid is what the
//!   kernel separates on a node; processes of one uid can trace and inject
//!   into one another, so a finer key (the entry, the executable) would
//!   separate nothing the kernel does not, and would let one uid multiply
//!   its budget by running binaries that match several entries. It is known
//!   from the socket at accept, before any attestation work;
//! - one for all workloads together (`jwt_mints_per_second`), below the
//!   server's rate, so the agent's own calls keep the rest; they never pass
//!   through here.
//!
//! Cache hits cost nothing. Each bucket holds up to twice its rate (the
//! burst), as the server's does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::time::Instant;
use tonic::Status;

/// Beyond this many uids, buckets that have refilled (and so are the same
/// as absent) are dropped. The agent-wide bucket bounds how many can be
/// short of full at once, so the table stays near that number.
const PRUNE_AT: usize = 4096;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    /// Adds what `rate` gave since the last look, up to `burst`.
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }
}

/// Why a mint was refused, counted for `/metrics`.
#[derive(Debug, Default)]
pub struct Refusals {
    /// The caller's uid was over `jwt_mints_per_second_per_uid`.
    pub uid: AtomicU64,
    /// All workloads together were over `jwt_mints_per_second`.
    pub agent: AtomicU64,
    /// The server had refused this agent's calls a moment before.
    pub server: AtomicU64,
}

#[derive(Debug)]
struct Buckets {
    agent: Bucket,
    uids: HashMap<u32, Bucket>,
}

/// The mint budgets of one agent.
#[derive(Debug)]
pub struct MintBudget {
    per_uid: u32,
    total: u32,
    buckets: Mutex<Buckets>,
    /// What was refused, by reason.
    pub refused: Refusals,
}

impl MintBudget {
    /// `total` mints a second for all workloads, `per_uid` for one uid,
    /// each with bursts of twice that. Both are at least 1 (the
    /// configuration checks it; 0 is taken as 1).
    pub fn new(total: u32, per_uid: u32) -> Self {
        let total = total.max(1);
        Self {
            per_uid: per_uid.max(1),
            total,
            buckets: Mutex::new(Buckets {
                agent: Bucket::full(burst(total), Instant::now()),
                uids: HashMap::new(),
            }),
            refused: Refusals::default(),
        }
    }

    /// Takes a token for one mint for `uid`, or says which setting refused
    /// it as `ResourceExhausted` (nothing is taken then).
    #[allow(clippy::result_large_err)]
    pub fn take(&self, uid: u32) -> Result<(), Status> {
        self.take_at(uid, Instant::now())
    }

    #[allow(clippy::result_large_err)]
    fn take_at(&self, uid: u32, now: Instant) -> Result<(), Status> {
        let (uid_rate, uid_burst) = (f64::from(self.per_uid), burst(self.per_uid));
        let (all_rate, all_burst) = (f64::from(self.total), burst(self.total));
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        // Through one &mut, so the two buckets can be borrowed together.
        let b = &mut *guard;
        if b.uids.len() >= PRUNE_AT && !b.uids.contains_key(&uid) {
            b.uids.retain(|_, bucket| {
                bucket.refill(uid_rate, uid_burst, now);
                bucket.tokens < uid_burst
            });
            if b.uids.len() >= PRUNE_AT {
                // Not reached with sane settings (see PRUNE_AT); forgetting
                // hands out at most one more burst each.
                b.uids.clear();
            }
        }
        b.agent.refill(all_rate, all_burst, now);
        let mine = b
            .uids
            .entry(uid)
            .or_insert_with(|| Bucket::full(uid_burst, now));
        mine.refill(uid_rate, uid_burst, now);
        if mine.tokens < 1.0 {
            self.refused.uid.fetch_add(1, Relaxed);
            return Err(Status::resource_exhausted(format!(
                "uid {uid} is over {} new JWT-SVIDs a second (jwt_mints_per_second_per_uid); \
                 reuse tokens (cached ones are free) or retry later",
                self.per_uid
            )));
        }
        if b.agent.tokens < 1.0 {
            self.refused.agent.fetch_add(1, Relaxed);
            return Err(Status::resource_exhausted(format!(
                "the workloads on this node are over {} new JWT-SVIDs a second \
                 (jwt_mints_per_second); retry later",
                self.total
            )));
        }
        mine.tokens -= 1.0;
        b.agent.tokens -= 1.0;
        Ok(())
    }
}

/// A bucket's size for `rate` a second: twice it, as the server's.
fn burst(rate: u32) -> f64 {
    f64::from(rate) * 2.0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn code(r: Result<(), Status>) -> Option<(tonic::Code, String)> {
        r.err().map(|s| (s.code(), s.message().to_owned()))
    }

    #[test]
    fn each_uid_has_its_own_burst_and_rate() {
        let b = MintBudget::new(100, 2);
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(b.take_at(1000, t0).is_ok());
        }
        let (c, m) = code(b.take_at(1000, t0)).unwrap();
        assert_eq!(c, tonic::Code::ResourceExhausted);
        assert!(m.contains("jwt_mints_per_second_per_uid"), "{m}");
        assert!(b.take_at(1001, t0).is_ok(), "another uid is not affected");
        assert!(b.take_at(1000, t0 + Duration::from_millis(400)).is_err());
        assert!(
            b.take_at(1000, t0 + Duration::from_millis(600)).is_ok(),
            "refilled at 2 a second"
        );
        assert_eq!(b.refused.uid.load(Relaxed), 2);
    }

    #[test]
    fn all_uids_together_stay_within_the_agent_budget() {
        let b = MintBudget::new(3, 3);
        let t0 = Instant::now();
        let granted = (0..20).filter(|uid| b.take_at(*uid, t0).is_ok()).count();
        assert_eq!(granted, 6, "the agent-wide burst");
        let (_, m) = code(b.take_at(99, t0)).unwrap();
        assert!(m.contains("(jwt_mints_per_second)"), "{m}");
        // A refusal by the agent-wide bucket takes nothing from the uid's.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..6 {
            assert!(b.take_at(99, t1).is_ok());
        }
    }

    #[test]
    fn the_uid_table_drops_refilled_buckets() {
        let b = MintBudget::new(100_000, 1);
        let t0 = Instant::now();
        for uid in 0..PRUNE_AT as u32 {
            assert!(b.take_at(uid, t0).is_ok());
        }
        // Two seconds on, every bucket is full again and forgotten.
        let t1 = t0 + Duration::from_secs(3);
        assert!(b.take_at(u32::MAX, t1).is_ok());
        let len = b.buckets.lock().unwrap().uids.len();
        assert_eq!(len, 1);
    }
}
