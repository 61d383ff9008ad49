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

/// The life of something the server just issued, as typed values: the agent
/// API carries it as `valid_for_ms` (milliseconds) and `expires_at` (Unix
/// seconds), and this is the one place those units are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Issued {
    /// The server's own count of the remaining life; `None` from a server
    /// that does not send one.
    valid_for: Option<Duration>,
    /// When it expires (its certificate's or token's own expiry).
    expires_at: SystemTime,
}

impl Issued {
    /// `valid_for_ms` as the server sent it (0: not sent), and the expiry.
    pub(crate) fn new(valid_for_ms: u64, expires_at: SystemTime) -> Self {
        Self {
            valid_for: (valid_for_ms > 0).then(|| Duration::from_millis(valid_for_ms)),
            expires_at,
        }
    }

    /// From the agent API's two fields. An `expires_at` past what the
    /// system clock can hold (a broken server) reads as far in the future
    /// rather than crashing the agent.
    pub(crate) fn from_wire(valid_for_ms: u64, expires_at_secs: u64) -> Self {
        let expires_at = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(expires_at_secs))
            .unwrap_or_else(|| SystemTime::UNIX_EPOCH + FAR_FUTURE);
        Self::new(valid_for_ms, expires_at)
    }

    /// How long it stays valid, counted from when the agent asked for it:
    /// the server's own count, or else `expires_at` against the agent's
    /// wall clock.
    pub(crate) fn life(&self, wall: &WallClock) -> Duration {
        self.valid_for.unwrap_or_else(|| {
            self.expires_at
                .duration_since(wall.now())
                .unwrap_or_default()
        })
    }
}

/// A century after 1970: what an expiry the system clock cannot hold is
/// taken as (only a broken server sends one).
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86_400);

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
            Issued::from_wire(3_600_000, expires_at).life(&clock),
            Duration::from_secs(3600)
        );
        // An older server: the wall clock is all there is (already expired).
        assert_eq!(
            Issued::from_wire(0, expires_at).life(&clock),
            Duration::ZERO
        );
        clock.jump(-86_400);
        let left = Issued::from_wire(0, expires_at).life(&clock);
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
        // The units: milliseconds of life, seconds of expiry.
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(expires_at);
        assert_eq!(Issued::from_wire(1500, expires_at), Issued::new(1500, at));
        assert_eq!(
            Issued::new(1500, at).life(&clock),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn an_expiry_past_the_clocks_range_does_not_crash() {
        let clock = WallClock::default();
        let life = Issued::from_wire(0, u64::MAX).life(&clock);
        assert!(life > Duration::from_secs(10 * 365 * 86_400), "{life:?}");
        assert!(after(Instant::now(), life) > Instant::now());
    }

    #[test]
    fn absurd_lifetimes_saturate() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400));
    }
}
