//! JWT-SVIDs the agent has already minted, keyed by (entry ID, audiences).
//!
//! A workload chooses its audiences freely, so without a bound one workload
//! could grow this map until the agent runs out of memory, and with only a
//! global bound it could evict everyone else's tokens (each eviction then
//! costs the victim a mint at the server). So each token is charged to the
//! uid whose request minted it, and:
//!
//! - a uid holds at most `per_owner` tokens: past that it evicts its own,
//!   soonest to refresh first (expired ones are the soonest);
//! - when the whole cache (`capacity`) is full, expired tokens go first,
//!   then the soonest to refresh of the uid holding the most. A uid holding
//!   fewer than its fair share (capacity / uids caching) is never evicted
//!   by another's request.
//!
//! A token is served to any caller whose selectors match its entry: the
//! entry, not the uid, is what it proves.

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
    /// The uid whose request minted it.
    owner: u32,
}

/// A size-bounded JWT-SVID cache. Time is passed in so tests control it;
/// it is monotonic, so a wall-clock jump neither expires nor prolongs tokens.
#[derive(Debug)]
pub struct JwtCache {
    capacity: usize,
    per_owner: usize,
    tokens: HashMap<JwtKey, CachedJwt>,
    /// Tokens held per owner (no zero counts).
    held: HashMap<u32, usize>,
}

impl JwtCache {
    /// A cache of at most `capacity` tokens, at most `per_owner` of them
    /// minted for one uid; either 0 disables caching.
    pub fn new(capacity: usize, per_owner: usize) -> Self {
        Self {
            capacity,
            per_owner: per_owner.min(capacity),
            tokens: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// The token under `key` if it is still fresh at `now`.
    pub fn get(&self, key: &JwtKey, now: Instant) -> Option<String> {
        self.tokens
            .get(key)
            .filter(|c| now < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// Files `token`, minted for `owner`'s request, under `key`, evicting
    /// to stay within both bounds.
    pub fn insert(
        &mut self,
        key: JwtKey,
        token: String,
        refresh_at: Instant,
        now: Instant,
        owner: u32,
    ) {
        if self.per_owner == 0 || refresh_at <= now {
            return;
        }
        self.remove(&key);
        while self.held_by(owner) >= self.per_owner {
            if !self.evict_soonest(owner) {
                break;
            }
        }
        if self.tokens.len() >= self.capacity {
            self.tokens.retain(|_, c| c.refresh_at > now);
            self.recount();
        }
        while self.tokens.len() >= self.capacity {
            // The largest holder pays; on a tie, the inserter itself.
            let Some(victim) = self
                .held
                .iter()
                .max_by_key(|(o, n)| (**n, **o == owner))
                .map(|(o, _)| *o)
            else {
                break;
            };
            if !self.evict_soonest(victim) {
                break;
            }
        }
        self.tokens.insert(
            key,
            CachedJwt {
                token,
                refresh_at,
                owner,
            },
        );
        *self.held.entry(owner).or_default() += 1;
    }

    /// Tokens held now.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Tokens held now that `owner`'s requests minted.
    pub fn held_by(&self, owner: u32) -> usize {
        self.held.get(&owner).copied().unwrap_or(0)
    }

    fn remove(&mut self, key: &JwtKey) {
        if let Some(old) = self.tokens.remove(key) {
            if let Some(n) = self.held.get_mut(&old.owner) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&old.owner);
                }
            }
        }
    }

    /// Drops `owner`'s token soonest to refresh; false if it holds none.
    fn evict_soonest(&mut self, owner: u32) -> bool {
        let victim = self
            .tokens
            .iter()
            .filter(|(_, c)| c.owner == owner)
            .min_by_key(|(_, c)| c.refresh_at)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.remove(&k);
                true
            }
            None => false,
        }
    }

    fn recount(&mut self) {
        self.held.clear();
        for c in self.tokens.values() {
            *self.held.entry(c.owner).or_default() += 1;
        }
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
        let mut c = JwtCache::new(4, 4);
        c.insert(key("a"), "tok".into(), t0 + Duration::from_secs(10), t0, 1);
        assert_eq!(c.get(&key("a"), t0).as_deref(), Some("tok"));
        assert_eq!(c.get(&key("b"), t0), None);
        assert_eq!(c.get(&key("a"), t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn never_grows_past_capacity_and_evicts_soonest_first() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(3, 3);
        for i in 0..100u64 {
            c.insert(
                key(&format!("aud{i}")),
                format!("t{i}"),
                t0 + Duration::from_secs(1000 - i),
                t0,
                1,
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
        let mut c = JwtCache::new(2, 2);
        c.insert(key("old"), "o".into(), t0 + Duration::from_secs(1), t0, 1);
        c.insert(
            key("keep"),
            "k".into(),
            t0 + Duration::from_secs(100),
            t0,
            1,
        );
        let later = t0 + Duration::from_secs(5);
        c.insert(
            key("new"),
            "n".into(),
            later + Duration::from_secs(50),
            later,
            1,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key("keep"), later).as_deref(), Some("k"));
        assert_eq!(c.get(&key("new"), later).as_deref(), Some("n"));
    }

    #[test]
    fn replacing_a_key_does_not_evict_others() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(2, 2);
        c.insert(key("a"), "a1".into(), t0 + Duration::from_secs(10), t0, 1);
        c.insert(key("b"), "b1".into(), t0 + Duration::from_secs(20), t0, 1);
        c.insert(key("a"), "a2".into(), t0 + Duration::from_secs(30), t0, 1);
        assert_eq!(c.get(&key("a"), t0).as_deref(), Some("a2"));
        assert_eq!(c.get(&key("b"), t0).as_deref(), Some("b1"));
    }

    #[test]
    fn one_owner_evicts_only_its_own_tokens() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(10, 3);
        c.insert(
            key("victim"),
            "v".into(),
            t0 + Duration::from_secs(1),
            t0,
            2,
        );
        for i in 0..100u64 {
            c.insert(
                key(&format!("flood{i}")),
                format!("f{i}"),
                t0 + Duration::from_secs(100 + i),
                t0,
                1,
            );
            assert!(c.held_by(1) <= 3);
        }
        assert_eq!(c.held_by(1), 3);
        assert_eq!(c.len(), 4);
        assert_eq!(
            c.get(&key("victim"), t0).as_deref(),
            Some("v"),
            "kept, though the soonest to refresh"
        );
        assert_eq!(c.get(&key("flood99"), t0).as_deref(), Some("f99"));
    }

    #[test]
    fn a_full_cache_evicts_from_the_largest_holder() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(6, 5);
        c.insert(key("small"), "s".into(), t0 + Duration::from_secs(1), t0, 2);
        for i in 0..5u64 {
            let at = t0 + Duration::from_secs(10 + i);
            c.insert(key(&format!("big{i}")), "b".into(), at, t0, 1);
        }
        assert_eq!(c.len(), 6);
        // Owner 3 arrives at a full cache: owner 1 (5 tokens) pays.
        c.insert(key("new"), "n".into(), t0 + Duration::from_secs(50), t0, 3);
        assert_eq!((c.held_by(1), c.held_by(2), c.held_by(3)), (4, 1, 1));
        assert_eq!(c.get(&key("big0"), t0), None, "its soonest went");
        // Owner 1, the largest holder, pays for its own insert.
        c.insert(key("big9"), "b".into(), t0 + Duration::from_secs(60), t0, 1);
        assert_eq!((c.held_by(1), c.held_by(2), c.held_by(3)), (4, 1, 1));
        assert_eq!(c.get(&key("small"), t0).as_deref(), Some("s"));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(0, 0);
        c.insert(key("a"), "a".into(), t0 + Duration::from_secs(10), t0, 1);
        assert!(c.is_empty());
        assert_eq!(c.get(&key("a"), t0), None);
    }
}
