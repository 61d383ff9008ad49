//! The process at the other end of a Workload API connection, pinned when
//! the connection is accepted.
//!
//! `SO_PEERCRED` names the process that *connected*. Reading `/proc/<pid>`
//! later, when a call arrives, reads whoever holds that PID by then: a caller
//! that passes its connection on (fork, `SCM_RIGHTS`) and exits would be
//! attested as the next process given its PID (test `pid_reuse.rs`). So the
//! connecting process itself is pinned at accept time, by the pidfd the
//! kernel recorded at `connect()` (`SO_PEERPIDFD`, Linux ≥ 6.5), and every
//! attestation on the connection is refused once that process has exited.
//! Older kernels pin by `pidfd_open` at accept, or by the process start
//! time where there is no pidfd; both leave the short window between the
//! client's `connect()` and the agent's `accept()`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::net::UnixStream;

/// How the connecting process is pinned.
#[derive(Debug)]
pub(crate) enum Pinned {
    /// A pidfd for exactly that process: it turns readable when it exits.
    Pidfd(OwnedFd),
    /// No pidfd on this kernel: its start time (clock ticks since boot),
    /// which a later process with the same PID does not share.
    StartTime(u64),
    /// The process had already exited when the connection was accepted.
    Exited,
}

/// Who connected, as `SO_PEERCRED` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    /// The connecting process (none if it is in a PID namespace the agent
    /// cannot see).
    pub pid: Option<i32>,
    /// Its effective uid at `connect()`.
    pub uid: u32,
    /// Its effective gid at `connect()`.
    pub gid: u32,
}

/// The connecting process: its credentials and its pin. This is the
/// Workload API's connect info, so every request carries it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// PID, uid and gid at `connect()`.
    pub(crate) cred: Option<Cred>,
    /// Shared by every request on the connection.
    pub(crate) pin: Arc<Pinned>,
}

impl Peer {
    /// The peer of a freshly accepted connection.
    pub fn of(stream: &UnixStream) -> Self {
        let cred = stream.peer_cred().ok().map(|c| Cred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
        let pin = match nix::sys::socket::getsockopt(
            &stream.as_fd(),
            nix::sys::socket::sockopt::PeerPidfd,
        ) {
            Ok(fd) => Pinned::Pidfd(fd),
            // The connecting process is gone (and may be reaped already).
            Err(nix::errno::Errno::ESRCH) => Pinned::Exited,
            // An older kernel: pin by PID now, as close to connect() as the
            // agent gets.
            Err(_) => match cred.and_then(|c| c.pid) {
                Some(pid) => pin_pid(pid),
                None => Pinned::Exited,
            },
        };
        Self {
            cred,
            pin: Arc::new(pin),
        }
    }

    /// A peer for process `pid` running as `uid`/`gid`, pinned now: for
    /// attesting a process that is not on a socket (tests, tools).
    pub fn pin_pid(pid: i32, uid: u32, gid: u32) -> Self {
        Self {
            cred: Some(Cred {
                pid: Some(pid),
                uid,
                gid,
            }),
            pin: Arc::new(pin_pid(pid)),
        }
    }

    /// Who connected, if the kernel said.
    pub fn cred(&self) -> Option<Cred> {
        self.cred
    }
}

fn pin_pid(pid: i32) -> Pinned {
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    match pidfd {
        Some(fd) => Pinned::Pidfd(fd),
        None => match super::attest::start_time(pid) {
            Ok(t) => Pinned::StartTime(t),
            Err(_) => Pinned::Exited,
        },
    }
}

impl Pinned {
    /// Whether the pinned process is still the one running as `pid`.
    pub(crate) fn still_running(&self, pid: i32) -> bool {
        match self {
            Self::Pidfd(fd) => {
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let now = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // Not readable: it has not exited, so `pid` is still its PID.
                matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(0))
            }
            Self::StartTime(started) => super::attest::start_time(pid).ok() == Some(*started),
            Self::Exited => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    #[test]
    fn each_pin_sees_its_process_exit() {
        let mut c = child();
        let pid = i32::try_from(c.id()).unwrap();
        let by_pidfd = pin_pid(pid);
        assert!(matches!(by_pidfd, Pinned::Pidfd(_)), "{by_pidfd:?}");
        let by_start = Pinned::StartTime(super::super::attest::start_time(pid).unwrap());
        assert!(by_pidfd.still_running(pid) && by_start.still_running(pid));
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(!by_pidfd.still_running(pid));
        assert!(!by_start.still_running(pid));
        assert!(!Pinned::Exited.still_running(pid));
    }

    #[tokio::test]
    async fn a_connection_pins_the_process_that_connected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let peer = Peer::of(&accepted);
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(peer.cred().and_then(|c| c.pid), Some(me));
        // SO_PEERPIDFD (Linux ≥ 6.5), else pidfd_open at accept (≥ 5.3).
        assert!(matches!(*peer.pin, Pinned::Pidfd(_)), "{peer:?}");
        assert!(peer.pin.still_running(me));
    }
}
