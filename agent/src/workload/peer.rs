//! The process at the other end of a Workload API connection, pinned when
//! the connection is accepted.
//!
//! `SO_PEERCRED` names the process that *connected*. Reading `/proc/<pid>`
//! later, when a call arrives, reads whoever holds that PID by then, and
//! whatever program that process runs by then. Three things are pinned at
//! accept, and every attestation (and every push on an open stream) checks
//! all three again:
//! - the process itself, by the pidfd the kernel recorded at `connect()`
//!   (`SO_PEERPIDFD`, Linux ≥ 6.5): a caller that passes its connection on
//!   and exits must not be attested as the next process given its PID (test
//!   `pid_reuse.rs`). Older kernels pin by `pidfd_open` at accept, or by the
//!   process start time where there is no pidfd; both leave the short window
//!   between the client's `connect()` and the agent's `accept()`;
//! - the executable it ran at accept (device and inode): a PID survives
//!   `execve`, so a caller that hands its socket to a child and then execs
//!   a trusted program must not be attested as that program (test
//!   `exec_after_connect.rs`). Its path and hash are those of that file;
//! - the client's end of the connection (see [`super::holder`]): the
//!   process must still hold it, so a process that connected, handed the
//!   socket on and then exec'd *before* the agent accepted is refused too.
//!
//! What no check here can see is a socket inherited across `execve` (no
//! `CLOEXEC`) by a program exec'd before accept: both processes then hold
//! it. SECURITY.md says what bounds that (the uid in every entry).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, OnceLock};

use tokio::net::UnixStream;

use super::attest::AttestError;
use super::holder;

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

/// The executable a process ran when it was pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exe {
    /// Where it was, as `/proc/<pid>/exe` said then: it ends in
    /// " (deleted)" if the file had been replaced or removed.
    pub(crate) path: PathBuf,
    /// The file's device and inode, which an `execve` changes.
    dev: u64,
    ino: u64,
}

impl Exe {
    fn of(pid: i32) -> Result<Self, String> {
        let link = format!("/proc/{pid}/exe");
        let path = std::fs::read_link(&link).map_err(|e| format!("{link}: {e}"))?;
        let file = std::fs::metadata(&link).map_err(|e| format!("{link}: {e}"))?;
        Ok(Self {
            path,
            dev: file.dev(),
            ino: file.ino(),
        })
    }

    /// Whether `file` is this executable.
    pub(crate) fn is(&self, file: &std::fs::Metadata) -> bool {
        file.dev() == self.dev && file.ino() == self.ino
    }
}

/// The client's end of a connection, as the kernel names it.
#[derive(Debug)]
struct ClientSocket {
    /// The inode of the agent's end.
    own: u64,
    /// The inode of the client's end, asked of the kernel once.
    client: OnceLock<Option<u64>>,
    /// The caller's descriptor that held it last time (-1: not looked yet).
    fd_hint: AtomicI32,
}

impl ClientSocket {
    fn client(&self) -> Result<Option<u64>, AttestError> {
        if let Some(known) = self.client.get() {
            return Ok(*known);
        }
        let found = holder::peer_inode(self.own).map_err(|e| {
            AttestError::Proc(format!(
                "cannot find the client end of the connection (sock_diag): {e}"
            ))
        })?;
        Ok(*self.client.get_or_init(|| found))
    }
}

/// What was pinned at accept.
#[derive(Debug)]
struct Pin {
    process: Pinned,
    /// The executable then, or why it could not be read (every attestation
    /// is then refused with that reason).
    exe: Result<Exe, String>,
    /// The connection, when the peer is on one.
    socket: Option<ClientSocket>,
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
    cred: Option<Cred>,
    /// Shared by every request on the connection.
    pin: Arc<Pin>,
}

impl Peer {
    /// The peer of a freshly accepted connection.
    pub fn of(stream: &UnixStream) -> Self {
        let cred = stream.peer_cred().ok().map(|c| Cred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
        let process = match nix::sys::socket::getsockopt(
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
        // Read after the process is pinned: if it exits and its PID is
        // reused before this read, the pin check refuses every call.
        let exe = exe_of(cred);
        let socket = rustix::fs::fstat(stream).ok().map(|st| ClientSocket {
            own: st.st_ino,
            client: OnceLock::new(),
            fd_hint: AtomicI32::new(-1),
        });
        Self {
            cred,
            pin: Arc::new(Pin {
                process,
                exe,
                socket,
            }),
        }
    }

    /// A peer for process `pid` running as `uid`/`gid`, pinned now: for
    /// attesting a process that is not on a socket (tests, tools).
    pub fn pin_pid(pid: i32, uid: u32, gid: u32) -> Self {
        let cred = Some(Cred {
            pid: Some(pid),
            uid,
            gid,
        });
        let process = pin_pid(pid);
        Self {
            cred,
            pin: Arc::new(Pin {
                process,
                exe: exe_of(cred),
                socket: None,
            }),
        }
    }

    /// Who connected, if the kernel said.
    pub fn cred(&self) -> Option<Cred> {
        self.cred
    }

    /// The executable the process ran when it was pinned.
    pub(crate) fn exe(&self) -> Result<&Exe, AttestError> {
        self.pin
            .exe
            .as_ref()
            .map_err(|e| AttestError::Proc(e.clone()))
    }

    /// Whether the pinned process is still the one running as `pid`.
    pub(crate) fn still_running(&self, pid: i32) -> bool {
        self.pin.process.still_running(pid)
    }

    /// Whether the connection still belongs to what was pinned: the same
    /// process, running the same executable, holding its end of the
    /// connection. Called after every attestation and before every push on
    /// a stream.
    pub(crate) fn check(&self) -> Result<(), AttestError> {
        let pid = self.cred.and_then(|c| c.pid).ok_or_else(|| {
            AttestError::Proc("the kernel did not name the calling process".into())
        })?;
        let exe = self.exe()?;
        let outcome = self.check_exe_and_socket(pid, exe);
        // Checked last: a process still running now was running throughout,
        // so `pid` named it for every read above.
        if !self.still_running(pid) {
            return Err(AttestError::ProcessExited);
        }
        outcome
    }

    fn check_exe_and_socket(&self, pid: i32, exe: &Exe) -> Result<(), AttestError> {
        let link = format!("/proc/{pid}/exe");
        let now =
            std::fs::metadata(&link).map_err(|e| AttestError::Proc(format!("{link}: {e}")))?;
        if !exe.is(&now) {
            return Err(AttestError::Executed);
        }
        let Some(socket) = &self.pin.socket else {
            return Ok(());
        };
        let Some(client) = socket.client()? else {
            return Err(AttestError::HandedOff);
        };
        match holder::holds(pid, client, &socket.fd_hint) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AttestError::HandedOff),
            Err(e) => Err(AttestError::Proc(format!("/proc/{pid}/fd: {e}"))),
        }
    }
}

fn exe_of(cred: Option<Cred>) -> Result<Exe, String> {
    match cred.and_then(|c| c.pid) {
        Some(pid) => Exe::of(pid),
        None => Err("the kernel did not name the calling process".into()),
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
    fn still_running(&self, pid: i32) -> bool {
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
        assert!(matches!(peer.pin.process, Pinned::Pidfd(_)), "{peer:?}");
        assert!(peer.still_running(me));
        // This process holds the client end and runs what it ran at accept.
        peer.check().unwrap();
        assert_eq!(peer.exe().unwrap().path, std::env::current_exe().unwrap());
    }
}
