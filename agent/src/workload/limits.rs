//! How many Workload API connections and streams each uid holds open. A
//! stream costs the agent a task and a channel for as long as the client
//! keeps it, a connection two file descriptors (the socket and the caller's
//! pidfd) and its buffers, so one user's processes must not be able to hold
//! an unbounded number of either; other users are unaffected by one that
//! hits its limit. The connection caps are enforced here, at accept, before
//! the caller is pinned (which costs the pidfd).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxid_telemetry::conn::{ConnLimits, Refused, Timeouts};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::conn::RewrittenStream;

/// Open streams by uid, under a per-uid limit.
#[derive(Debug)]
pub struct StreamLimits {
    limit: usize,
    open: Mutex<HashMap<u32, usize>>,
}

impl StreamLimits {
    /// At most `limit` open streams per uid.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for one more stream of `uid`, released when dropped, or
    /// `ResourceExhausted` if the uid is at its limit.
    #[allow(clippy::result_large_err)]
    pub fn acquire(self: &Arc<Self>, uid: u32) -> Result<StreamPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(uid).or_default();
        if *count >= self.limit {
            return Err(Status::resource_exhausted(format!(
                "uid {uid} has {} Workload API streams open, the limit \
                 (max_streams_per_uid); close some and retry",
                self.limit
            )));
        }
        *count += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            uid,
        })
    }

    /// Streams `uid` holds open now.
    pub fn open(&self, uid: u32) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&uid).copied().unwrap_or(0)
    }
}

/// One open stream; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    uid: u32,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Descriptors one connection may cost: its socket, the caller's pidfd,
/// and one more held briefly while a call is attested (`/proc` reads).
pub const FDS_PER_CONNECTION: usize = 3;

/// Descriptors always kept for the agent's own files (state, bundle and
/// SVID writes, its connections to the server, metrics scrapes): the
/// connection caps are fitted under the open-file limit minus these.
pub const FD_RESERVE: usize = 512;

/// Fewer connections than this under the open-file limit is a setup error.
pub const MIN_CONNECTIONS: usize = 16;

/// The Workload API listener's connection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    /// Connections open at once, all uids together.
    pub max: usize,
    /// Connections open at once by one uid.
    pub per_uid: usize,
    /// Preface and idle timeouts.
    pub timeouts: Timeouts,
}

impl ConnSettings {
    /// These settings fitted under the open-file limit `fd_limit`: `max`
    /// lowered (with a warning) if it would leave less than [`FD_RESERVE`]
    /// descriptors for the agent's own files, `per_uid` never above `max`.
    pub fn fitted(self, fd_limit: Option<u64>) -> Result<Self, String> {
        let budget = oxid_telemetry::conn::FdBudget {
            per_connection: FDS_PER_CONNECTION,
            reserve: FD_RESERVE,
            minimum: MIN_CONNECTIONS,
        };
        let (max, per_uid) =
            oxid_telemetry::conn::fit_caps(self.max, self.per_uid, fd_limit, budget)?;
        Ok(Self {
            max,
            per_uid,
            ..self
        })
    }
}

/// Accepts Workload API connections under `settings`' caps and yields them
/// wrapped; a connection over a cap is answered with an HTTP/2 GOAWAY that
/// says which, and closed. The task ends when the stream is dropped.
pub fn accept(
    listener: UnixListener,
    settings: ConnSettings,
) -> (
    ReceiverStream<io::Result<RewrittenStream>>,
    tokio::task::JoinHandle<()>,
) {
    let limits = ConnLimits::new(settings.max, settings.per_uid);
    // A flood's freed buffers otherwise stay in the agent's RSS for good.
    limits.trim_heap_after_floods();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut last_warning: Option<tokio::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: do not spin; what is open keeps
                    // being served.
                    tracing::warn!(error = %e, "Workload API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // An unreadable uid is counted as one unknown caller.
            let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
            match limits.acquire(uid) {
                Ok(permit) => {
                    let conn = RewrittenStream::new(stream, permit, settings.timeouts);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(refused) => {
                    let message = refusal(uid, refused);
                    // One line per 10 s at most: a flood must not fill the log.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!("refusing Workload API connections: {message}");
                        last_warning = Some(tokio::time::Instant::now());
                    }
                    refuse(&stream, &message);
                }
            }
        }
    });
    (ReceiverStream::new(rx), task)
}

fn refusal(uid: u32, refused: Refused) -> String {
    match refused {
        Refused::Global(n) => format!(
            "the agent holds {n} Workload API connections, its limit (max_connections); \
             retry later"
        ),
        Refused::PerSource(n) => format!(
            "uid {uid} holds {n} Workload API connections, the limit \
             (max_connections_per_uid); close some and retry"
        ),
    }
}

/// Tells a refused client why, as an HTTP/2 server would (a GOAWAY).
/// Written without waiting (a fresh socket's buffer is empty); the caller
/// drops the socket at once.
fn refuse(stream: &UnixStream, message: &str) {
    let _ = stream.try_write(&oxid_telemetry::conn::goaway_frames(message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_per_uid_and_released_on_drop() {
        let limits = StreamLimits::new(2);
        let a = limits.acquire(1000).ok();
        let b = limits.acquire(1000).ok();
        assert!(a.is_some() && b.is_some());
        let refused = limits.acquire(1000).err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::ResourceExhausted));
        // Another uid is not affected.
        assert!(limits.acquire(1001).is_ok());
        drop(a);
        assert_eq!(limits.open(1000), 1);
        assert!(limits.acquire(1000).is_ok());
        drop(b);
        assert_eq!(limits.open(1000), 0);
    }
}
