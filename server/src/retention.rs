//! Change-feed retention: every change committed more than
//! `change_retention` ago is dropped from the feed (sled's change tree,
//! PostgreSQL's `oxid_changes`).
//!
//! Changes carry no time, only a revision, so the task samples the store's
//! newest revision on each tick: a sample `(t, r)` means every change at or
//! below `r` was committed by `t`. Once `t` is older than the retention,
//! changes up to `r` go. Samples live in memory, so a restarted server
//! prunes nothing until it has run for the retention: it keeps more, never
//! less. On PostgreSQL each server prunes from its own samples; the prune is
//! idempotent (the retention mark only rises), so several at once are safe.
//! Readers of a pruned revision: the entry index reloads from the store
//! (`IndexHandle::catch_up` on `RevisionGone`); agent sync never reads the
//! feed (it resumes against the index, `agent_api::sync`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datastore::DataStore;

/// The newest-revision samples of one server, oldest first.
#[derive(Debug)]
pub struct Retention {
    keep: Duration,
    samples: VecDeque<(Instant, u64)>,
    pruned: u64,
}

impl Retention {
    /// Keeps every change newer than `keep`.
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            samples: VecDeque::new(),
            pruned: 0,
        }
    }

    /// Records that the store's newest revision was `revision` at `now`,
    /// and returns the revision to prune up to, if it moved: the newest
    /// sample taken at least `keep` before `now`.
    pub fn observe(&mut self, now: Instant, revision: u64) -> Option<u64> {
        self.samples.push_back((now, revision));
        let mut up_to = None;
        while let Some(&(at, r)) = self.samples.front() {
            if now.saturating_duration_since(at) < self.keep {
                break;
            }
            up_to = Some(r);
            self.samples.pop_front();
        }
        let up_to = up_to.filter(|r| *r > self.pruned)?;
        self.pruned = up_to;
        Some(up_to)
    }
}

/// How often the task samples and prunes: a few times per retention, at
/// most every five minutes.
pub fn tick(keep: Duration) -> Duration {
    (keep / 8).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// Samples and prunes `store` until the task is aborted.
pub fn spawn(store: Arc<dyn DataStore>, keep: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut retention = Retention::new(keep);
        let mut interval = tokio::time::interval(tick(keep));
        loop {
            interval.tick().await;
            let revision = *store.revision().borrow();
            let Some(up_to) = retention.observe(Instant::now(), revision) else {
                continue;
            };
            match store.prune_changes(up_to).await {
                Ok(removed) => tracing::info!(
                    removed,
                    up_to,
                    "pruned the change feed of changes older than the retention"
                ),
                // The next due sample prunes past this revision too.
                Err(e) => tracing::warn!(error = %e, up_to, "cannot prune the change feed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_older_than_the_retention_are_pruned() {
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        let mut r = Retention::new(Duration::from_secs(60));
        assert_eq!(r.observe(at(0), 10), None, "nothing is old yet");
        assert_eq!(r.observe(at(30), 20), None);
        assert_eq!(r.observe(at(59), 25), None);
        // At 60 s the sample of 0 s is due: changes up to 10 were committed by then.
        assert_eq!(r.observe(at(60), 30), Some(10));
        // 90 s: the 30 s sample is due, the 59 s one not yet.
        assert_eq!(r.observe(at(90), 30), Some(20));
        assert_eq!(r.observe(at(100), 30), None, "no newer sample is due");
        assert_eq!(r.observe(at(200), 30), Some(30));
        assert_eq!(r.observe(at(400), 30), None, "the mark did not move");
    }

    #[test]
    fn the_tick_is_a_few_per_retention_and_at_most_five_minutes() {
        assert_eq!(tick(Duration::from_secs(60)), Duration::from_millis(7500));
        assert_eq!(tick(Duration::from_secs(86_400)), Duration::from_secs(300));
    }
}
