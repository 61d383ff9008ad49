//! Giving the heap back after a connection flood. A flood of thousands of
//! connections grows the heap by their buffers (tens of KiB each); when
//! they close glibc keeps the freed pages, so the RSS stays near its peak
//! for good. [`ConnLimits::trim_heap_after_floods`] watches a listener's
//! open-connection count and, once it has fallen well below its peak and
//! stayed there, has glibc return the free pages (`crate::sys`).
//!
//! Why a trigger and not a periodic trim (simpler: one timer, no peak): a
//! trim walks every malloc arena holding its lock, stalling the threads
//! that allocate meanwhile, and under steady load it gives back pages that
//! the next requests fault straight back in. A fall in the open count is
//! the moment freed memory will not be reused soon, so trimming then costs
//! one trim per flood, and nothing while the load is steady. Memory freed
//! for other reasons stays with glibc as before.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::conn::ConnLimits;

/// How often the open count is sampled.
const TICK: Duration = Duration::from_secs(3);
/// Consecutive samples the count must stay low for: a flood has ended, not
/// paused, and trims are at least this many ticks apart.
const SAMPLES: u32 = 2;
/// Fewest connections closed since the last trim worth a trim: at about
/// 20 KiB each, less than that is a few MiB, which glibc mostly reuses.
const MIN_CLOSED: usize = 128;

/// Decides, one sample at a time, when to trim.
#[derive(Debug, Default)]
struct Trigger {
    low_samples: u32,
}

impl Trigger {
    /// `peak` is the most connections open since the last trim (or the
    /// start), `open` those open now; `true` if the heap should be trimmed
    /// now, after which the caller resets the peak to `open`. Low means
    /// under half the peak and at least [`MIN_CLOSED`] below it, so for a
    /// peak of 256 or more, under half of it; a second trim follows if the
    /// connections left at the first one close too.
    fn sample(&mut self, peak: usize, open: usize) -> bool {
        let low = open <= peak / 2 && peak.saturating_sub(open) >= MIN_CLOSED;
        if !low {
            self.low_samples = 0;
            return false;
        }
        self.low_samples += 1;
        if self.low_samples < SAMPLES {
            return false;
        }
        self.low_samples = 0;
        true
    }
}

/// The task behind [`ConnLimits::trim_heap_after_floods`]; it ends when the
/// limits are dropped.
pub(crate) async fn watch<K>(limits: Weak<ConnLimits<K>>)
where
    K: std::hash::Hash + Eq + Clone,
{
    let mut trigger = Trigger::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        let (peak, open) = limits.peak_and_open();
        if !trigger.sample(peak, open) {
            continue;
        }
        limits.reset_peak();
        drop(limits);
        let started = Instant::now();
        match tokio::task::spawn_blocking(crate::sys::trim_heap).await {
            Ok(released) => tracing::info!(
                peak,
                open,
                released,
                ms = started.elapsed().as_millis(),
                "connections fell well below their peak; returned freed heap memory to the kernel"
            ),
            // Only if the runtime is shutting down.
            Err(e) => tracing::debug!(error = %e, "heap trim did not run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_after_a_flood_ends_and_not_under_steady_load() {
        let mut t = Trigger::default();
        // Steady load, at the peak and wobbling below it.
        for open in [1000, 1000, 990, 800, 1000, 600, 501] {
            assert!(!t.sample(1000, open), "steady load at {open}");
        }
        // The flood ends: the first low sample waits, the second fires.
        assert!(!t.sample(1000, 10));
        assert!(t.sample(1000, 10));
        // The caller reset the peak to 10: no more trims while it idles.
        for _ in 0..10 {
            assert!(!t.sample(10, 10));
        }
    }

    #[test]
    fn a_pause_is_not_an_end() {
        let mut t = Trigger::default();
        assert!(!t.sample(1000, 0));
        assert!(!t.sample(1000, 900), "the flood came back");
        assert!(!t.sample(1000, 0));
        assert!(t.sample(1000, 0));
    }

    #[test]
    fn small_falls_do_not_fire_and_leftovers_get_a_second_trim() {
        let mut t = Trigger::default();
        for _ in 0..5 {
            assert!(!t.sample(100, 0), "100 connections are not a flood");
        }
        // Trimmed with 300 still open, then those close too.
        assert!(!t.sample(1000, 300));
        assert!(t.sample(1000, 300));
        assert!(!t.sample(300, 0));
        assert!(t.sample(300, 0));
    }
}
