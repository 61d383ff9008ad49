//! Time in the agent.
//!
//! The wall clock of a node can jump: NTP stepping it, an operator, a VM
//! resumed from a snapshot. If SVID rotation and expiry were wall-clock
//! times, a jump forward would make every SVID look expired at once (a
//! signing storm, and workloads told their SVIDs expired), and a jump back
//! would postpone rotation past the real expiry. So the agent times what the
//! server issues on its **monotonic** clock: the server says how long each
//! SVID stays valid by its own clock (`valid_for_ms`), and the agent counts
//! that down from when it asked. The wall clock is read only where absolute
//! time is the point: the `exp` of a JWT-SVID being validated, and whether
//! the agent SVID saved on disk outlived a restart. It is read through
//! [`WallClock`], which tests shift to stage jumps.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The agent's wall clock: the system's, shifted by an offset that only
/// tests set.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    /// Seconds added to the system time; shared by every clone.
    offset_secs: Arc<AtomicI64>,
}

impl WallClock {
    /// The current wall-clock time.
    pub fn now(&self) -> SystemTime {
        let offset = self.offset_secs.load(Ordering::Relaxed);
        let magnitude = Duration::from_secs(offset.unsigned_abs());
        let system = SystemTime::now();
        if offset >= 0 {
            system.checked_add(magnitude).unwrap_or(system)
        } else {
            system.checked_sub(magnitude).unwrap_or(system)
        }
    }

    /// Moves this clock (and its clones) by `secs`, as a stepped system
    /// clock would move.
    pub fn jump(&self, secs: i64) {
        self.offset_secs.fetch_add(secs, Ordering::Relaxed);
    }
}

/// How long something the server just issued stays valid, counted from when
/// the agent asked for it: the server's own `valid_for_ms`, or, from a
/// server that does not send it (0), `expires_at` (Unix seconds) against the
/// agent's wall clock.
pub(crate) fn valid_for(valid_for_ms: u64, expires_at: u64, wall: &WallClock) -> Duration {
    if valid_for_ms > 0 {
        return Duration::from_millis(valid_for_ms);
    }
    (SystemTime::UNIX_EPOCH + Duration::from_secs(expires_at))
        .duration_since(wall.now())
        .unwrap_or_default()
}

/// `start + d`, saturating far in the future rather than overflowing on an
/// absurd lifetime.
pub(crate) fn after(start: Instant, d: Duration) -> Instant {
    start
        .checked_add(d)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_move_every_clone() {
        let clock = WallClock::default();
        let copy = clock.clone();
        let before = SystemTime::now();
        clock.jump(7200);
        assert!(copy.now() >= before + Duration::from_secs(7200));
        clock.jump(-14_400);
        assert!(copy.now() <= SystemTime::now() - Duration::from_secs(7199));
    }

    #[test]
    fn the_servers_count_wins_over_the_wall_clock() {
        let clock = WallClock::default();
        clock.jump(86_400);
        let expires_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        // The server says an hour: a day-ahead wall clock does not matter.
        assert_eq!(
            valid_for(3_600_000, expires_at, &clock),
            Duration::from_secs(3600)
        );
        // An older server: the wall clock is all there is (already expired).
        assert_eq!(valid_for(0, expires_at, &clock), Duration::ZERO);
        clock.jump(-86_400);
        let left = valid_for(0, expires_at, &clock);
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
    }

    #[test]
    fn absurd_lifetimes_saturate() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400));
    }
}
