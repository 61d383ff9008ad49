//! JWT-SVIDs the agent has already minted, keyed by (entry ID, audiences).
//!
//! A workload chooses its audiences freely, so without a bound one workload
//! could grow this map until the agent runs out of memory. The cache keeps at
//! most `capacity` tokens; when full it drops expired tokens first, then the
//! ones closest to their refresh time (the least valuable to keep).

use std::collections::HashMap;

use tokio::time::Instant;

/// What a cached token is filed under.
pub type JwtKey = (String, Vec<String>);

/// A cached JWT-SVID.
#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    /// Past this instant the token is re-minted rather than served.
    refresh_at: Instant,
}

/// A size-bounded JWT-SVID cache. Time is passed in so tests control it;
/// it is monotonic, so a wall-clock jump neither expires nor prolongs tokens.
#[derive(Debug)]
pub struct JwtCache {
    capacity: usize,
    tokens: HashMap<JwtKey, CachedJwt>,
}

impl JwtCache {
    /// A cache of at most `capacity` tokens; 0 disables caching.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tokens: HashMap::new(),
        }
    }

    /// The token under `key` if it is still fresh at `now`.
    pub fn get(&self, key: &JwtKey, now: Instant) -> Option<String> {
        self.tokens
            .get(key)
            .filter(|c| now < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// Files `token` under `key`, evicting to stay within capacity.
    pub fn insert(&mut self, key: JwtKey, token: String, refresh_at: Instant, now: Instant) {
        if self.capacity == 0 || refresh_at <= now {
            return;
        }
        self.tokens.remove(&key);
        if self.tokens.len() >= self.capacity {
            self.tokens.retain(|_, c| c.refresh_at > now);
        }
        while self.tokens.len() >= self.capacity {
            // Invariant: len >= capacity >= 1, so the map is not empty.
            let Some(victim) = self
                .tokens
                .iter()
                .min_by_key(|(_, c)| c.refresh_at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.tokens.remove(&victim);
        }
        self.tokens.insert(key, CachedJwt { token, refresh_at });
    }

    /// Tokens held now.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(aud: &str) -> JwtKey {
        ("entry".into(), vec![aud.into()])
    }

    #[test]
    fn serves_until_refresh_time() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(4);
        c.insert(key("a"), "tok".into(), t0 + Duration::from_secs(10), t0);
        assert_eq!(c.get(&key("a"), t0).as_deref(), Some("tok"));
        assert_eq!(c.get(&key("b"), t0), None);
        assert_eq!(c.get(&key("a"), t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn never_grows_past_capacity_and_evicts_soonest_first() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(3);
        for i in 0..100u64 {
            c.insert(
                key(&format!("aud{i}")),
                format!("t{i}"),
                t0 + Duration::from_secs(1000 - i),
                t0,
            );
            assert!(c.len() <= 3);
        }
        // The three kept are the latest-refreshing of the last inserted
        // ones: each insertion evicted the soonest to refresh.
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&key("aud99"), t0).as_deref(), Some("t99"));
    }

    #[test]
    fn expired_tokens_go_before_fresh_ones() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(2);
        c.insert(key("old"), "o".into(), t0 + Duration::from_secs(1), t0);
        c.insert(key("keep"), "k".into(), t0 + Duration::from_secs(100), t0);
        let later = t0 + Duration::from_secs(5);
        c.insert(
            key("new"),
            "n".into(),
            later + Duration::from_secs(50),
            later,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key("keep"), later).as_deref(), Some("k"));
        assert_eq!(c.get(&key("new"), later).as_deref(), Some("n"));
    }

    #[test]
    fn replacing_a_key_does_not_evict_others() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(2);
        c.insert(key("a"), "a1".into(), t0 + Duration::from_secs(10), t0);
        c.insert(key("b"), "b1".into(), t0 + Duration::from_secs(20), t0);
        c.insert(key("a"), "a2".into(), t0 + Duration::from_secs(30), t0);
        assert_eq!(c.get(&key("a"), t0).as_deref(), Some("a2"));
        assert_eq!(c.get(&key("b"), t0).as_deref(), Some("b1"));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(0);
        c.insert(key("a"), "a".into(), t0 + Duration::from_secs(10), t0);
        assert!(c.is_empty());
        assert_eq!(c.get(&key("a"), t0), None);
    }
}
