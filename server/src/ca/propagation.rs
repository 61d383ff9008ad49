//! When a new authority may sign: only once it has reached the agents of
//! every live server of the trust domain (several servers on one database).
//!
//! Being in the shared bundle is not enough: an agent learns an authority
//! from its own server's sync stream, which pushes it when that server's
//! CA snapshot changes, which happens when its index has applied the feed
//! change holding the rows and it has re-read them. So each server
//! reports, in its heartbeat row (`DataStore::beat`, outside the feed),
//! the revision as of which its published bundle holds every server's
//! authorities (`applied`: the snapshot revision of its last read of the
//! rows, `DataStore::peer_authorities_at`), written right after it
//! publishes, and once a second to show it is live.
//!
//! A generation records the revision its rows first entered the feed at
//! (`shared_at`). It signs only once `cleared`: every live server's
//! applied revision has reached `shared_at` (`await_peers`), and then a
//! short grace has passed for the sync streams' push to reach the agents.
//! That is checked for the authority a new server creates at start (it
//! serves nothing until then), for one restored at start unless a previous
//! run shared it longer ago than `timeout` (its row in the shared bundle is
//! as restored, and that run would have signed with it by now whatever the
//! others did, so a server restarting while another is dead but not yet
//! stale must not wait for it; a younger one waits again, since the run
//! that shared it may have died in its own wait), and before a
//! prepared authority is activated (the old one signs meanwhile; on
//! schedule the prepared one has been shared for 1/3 of a lifetime, so the
//! wait is over at once). A server is live while its heartbeat is fresher
//! than `liveness` and it has not stopped cleanly; a server of schema 2
//! (rolling upgrade) has none and is not waited on. The wait is bounded:
//! past `timeout` a live server still behind is named in a warning and the
//! authority signs anyway (that server's agents may then refuse what it
//! signs until it catches up). While waiting, the waiting server keeps its
//! own view and heartbeat current, so servers starting at once never wait
//! on each other forever.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::generation::Generation;
use super::journal::unb64;
use super::{CaError, CaManager};
use crate::datastore::{HEARTBEAT_INTERVAL, Heartbeat, LIVENESS, ServerAuthority};

/// How a new authority waits for the other servers.
#[derive(Debug, Clone)]
pub struct Propagation {
    /// A heartbeat older than this is of a server that is not live.
    pub liveness: Duration,
    /// How long a new authority waits for the live servers at most.
    pub timeout: Duration,
    /// How often the heartbeats are read while waiting.
    pub poll: Duration,
    /// After every live server has applied the revision, for its sync
    /// streams' push to reach the agents.
    pub grace: Duration,
    /// How often this server beats.
    pub heartbeat: Duration,
}

impl Default for Propagation {
    fn default() -> Self {
        Self {
            liveness: LIVENESS,
            timeout: Duration::from_secs(30),
            poll: Duration::from_millis(50),
            grace: Duration::from_millis(500),
            heartbeat: HEARTBEAT_INTERVAL,
        }
    }
}

/// After this long, a wait is logged.
const LOG_AFTER: Duration = Duration::from_secs(1);

/// What one wait has logged already: each thing once.
#[derive(Default)]
struct WaitLog {
    waiting: bool,
    unreadable: bool,
    stale: Vec<String>,
}

impl WaitLog {
    /// Names each server not waited for because its heartbeat is stale.
    fn stale(&mut self, beats: &[Heartbeat], liveness: Duration) {
        for b in beats.iter().filter(|b| !b.stopped && !b.is_live(liveness)) {
            if !self.stale.contains(&b.server) {
                tracing::info!(
                    server = %b.server,
                    heartbeat_age_s = b.age.as_secs(),
                    "not waiting for a server whose heartbeat is stale (not live); if it is \
                     gone for good, remove it with `oxid-server server forget`"
                );
                self.stale.push(b.server.clone());
            }
        }
    }

    fn waiting(&mut self, sequence: u64, revision: u64, started: Instant, behind: &[&str]) {
        if !self.waiting && started.elapsed() >= LOG_AFTER {
            tracing::info!(
                sequence,
                revision,
                servers = ?behind,
                "waiting for the other live servers to apply this server's new CA authority \
                 before it signs"
            );
            self.waiting = true;
        }
    }

    fn unreadable(&mut self, e: &crate::datastore::DataStoreError) {
        if !std::mem::replace(&mut self.unreadable, true) {
            tracing::warn!(error = %e, "cannot read the other servers' heartbeats; retrying");
        }
    }

    fn done(&self, sequence: u64, revision: u64, started: Instant) {
        if self.waiting {
            tracing::info!(
                sequence,
                revision,
                waited_ms = started.elapsed().as_millis() as u64,
                "every live server has this server's new CA authority; it may sign"
            );
        }
    }
}

/// Whether restored generation `g` is in `shared` (this server's rows of
/// the shared bundle) as it is, and was made more than `bound` before
/// `now` (its certificate's `not_before` is backdated by
/// [`oxid_pki::x509::BACKDATE`]): shared so long ago that the run that
/// shared it had stopped waiting for the other servers.
pub(super) fn shared_long_enough(
    g: &Generation,
    shared: &[ServerAuthority],
    now: u64,
    bound: Duration,
) -> bool {
    let made = g
        .entry
        .not_before
        .saturating_add(oxid_pki::x509::BACKDATE.as_secs());
    made.saturating_add(bound.as_secs()) < now
        && shared.iter().any(|row| {
            row.sequence == g.entry.sequence
                && unb64(&row.x509_authority).is_ok_and(|der| der == g.root.as_ref())
        })
}

impl CaManager {
    /// Lets generation `sequence` sign once every live server has applied
    /// the revision that shared it (bounded), and publishes. Called with
    /// `rotation` held.
    pub(super) async fn clear(&self, sequence: u64) -> Result<(), CaError> {
        let (cleared, shared_at) = self
            .read()
            .generations
            .iter()
            .find(|g| g.entry.sequence == sequence)
            .map_or((false, None), |g| (g.cleared, g.shared_at));
        if cleared {
            return Ok(());
        }
        if let Some(revision) = shared_at {
            self.await_peers(sequence, revision).await;
        }
        {
            let mut state = self.write();
            if let Some(g) = state
                .generations
                .iter_mut()
                .find(|g| g.entry.sequence == sequence)
            {
                g.cleared = true;
            }
        }
        self.published.send_replace(Arc::new(self.snapshot_now()));
        Ok(())
    }

    /// Waits until every live server other than this one has applied
    /// `revision`, at most `timeout`, then the grace if it waited on any.
    async fn await_peers(&self, sequence: u64, revision: u64) {
        let p = &self.propagation;
        let started = Instant::now();
        let mut log = WaitLog::default();
        loop {
            // Our own view first: a server waiting on us while we wait on
            // it must see us apply its change.
            if *self.store.revision().borrow() > self.applied.load(Ordering::Acquire) {
                if let Err(e) = self.reload_peers().await {
                    tracing::warn!(error = %e, "cannot read the other servers' CA authorities");
                }
            }
            let timed_out = started.elapsed() >= p.timeout;
            match self.store.peer_heartbeats().await {
                Ok(beats) => {
                    log.stale(&beats, p.liveness);
                    let live = beats.iter().any(|b| b.is_live(p.liveness));
                    let behind: Vec<&str> = beats
                        .iter()
                        .filter(|b| b.is_live(p.liveness) && b.applied_revision < revision)
                        .map(|b| b.server.as_str())
                        .collect();
                    if behind.is_empty() {
                        if live {
                            tokio::time::sleep(p.grace).await;
                        }
                        log.done(sequence, revision, started);
                        return;
                    }
                    if timed_out {
                        tracing::warn!(
                            sequence,
                            revision,
                            servers = ?behind,
                            "live servers have not applied this server's new CA authority after \
                             {} s; signing with it anyway: their agents may refuse what it signs \
                             until they catch up (is their feed following? see \
                             oxid_feed_lag_seconds)",
                            p.timeout.as_secs()
                        );
                        return;
                    }
                    log.waiting(sequence, revision, started, &behind);
                }
                // Not knowing who is behind is not "nobody": retry.
                Err(e) if !timed_out => log.unreadable(&e),
                Err(e) => {
                    tracing::warn!(error = %e, sequence, revision,
                        "cannot read the other servers' heartbeats for {} s; signing with the \
                         new CA authority anyway", p.timeout.as_secs());
                    return;
                }
            }
            tokio::time::sleep(p.poll).await;
        }
    }

    /// Beats every `heartbeat` until the task is aborted.
    pub fn keep_beating(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.propagation.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.beat().await;
            }
        })
    }

    /// Reports this server live, its bundle current as of `applied`. A
    /// failure is logged when it starts and when it ends, not every beat
    /// (the database being away is already reported by readiness).
    pub(super) async fn beat(&self) {
        let applied = self.applied.load(Ordering::Acquire);
        match self.store.beat(applied).await {
            Ok(()) => {
                if self.beat_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("this server's heartbeat is recorded again");
                }
            }
            Err(e) => {
                if !self.beat_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e,
                        "cannot record this server's heartbeat; the other servers will stop \
                         waiting for it after {} s", self.propagation.liveness.as_secs());
                }
            }
        }
    }

    /// Records a clean stop, so no server waits for this one and it may be
    /// forgotten at once. Call once nothing serves agents any more.
    pub async fn stop_beating(&self) {
        if let Err(e) = self.store.stop_beating().await {
            tracing::warn!(error = %e, "cannot record this server's stop");
        }
    }
}
