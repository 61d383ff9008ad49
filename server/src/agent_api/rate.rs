//! Per-agent rate limits: a token bucket for each key (an agent's SPIFFE
//! ID). A stolen agent key, or a node stuck in a re-attestation loop, must
//! not be able to spend the server's signing CPU without bound; everyone
//! else keeps their own budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Beyond this many keys the table is cleared rather than grown: buckets
/// refill within seconds, so forgetting them costs little.
const MAX_KEYS: usize = 100_000;

/// Token buckets by key.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// Largest number of tokens a bucket holds (the allowed burst).
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `count` events per `per`, with bursts of up to `burst` events.
    pub(crate) fn new(count: u32, per: Duration, burst: u32) -> Self {
        Self {
            rate: f64::from(count) / per.as_secs_f64(),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket; false if it is empty.
    pub(crate) fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.clear();
        }
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_per_key() {
        let limiter = RateLimiter::new(2, Duration::from_secs(1), 3);
        let t0 = Instant::now();
        let allowed = (0..5).filter(|_| limiter.allow_at("a", t0)).count();
        assert_eq!(allowed, 3, "the burst");
        assert!(limiter.allow_at("b", t0), "another key has its own bucket");
        assert!(!limiter.allow_at("a", t0 + Duration::from_millis(100)));
        assert!(
            limiter.allow_at("a", t0 + Duration::from_millis(600)),
            "refilled"
        );
    }
}
