//! Whether a process still holds its end of a Workload API connection.
//!
//! The process that connected may hand its socket to another process (fork,
//! `SCM_RIGHTS`) and then `execve` a trusted program: the PID, and so the
//! pidfd, survive the exec, and `SO_PEERCRED` still names it. When the
//! socket was opened with `CLOEXEC` (the default of every mainstream
//! runtime), the program it became no longer has the socket; only the
//! process it was handed to does. So the agent asks the kernel which socket
//! is the client's end of the connection (`sock_diag`, `UNIX_DIAG_PEER`) and
//! looks for that socket among the caller's descriptors (`/proc/<pid>/fd`).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{LazyLock, Mutex};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// `SOCK_DIAG_BY_FAMILY`, the request type of `sock_diag`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR`: the kernel's answer when the request failed.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `UDIAG_SHOW_PEER`: ask for the inode of the connected peer.
const UDIAG_SHOW_PEER: u32 = 0x4;
/// `UNIX_DIAG_PEER`: the attribute carrying it.
const UNIX_DIAG_PEER: u16 = 2;
const AF_UNIX: u8 = 1;
const NLMSG_HDRLEN: usize = 16;
/// `struct unix_diag_msg`.
const UNIX_DIAG_MSG_LEN: usize = 16;

/// The inode of the socket at the other end of the Unix socket whose inode
/// is `own`, or `None` if the kernel knows no such connected socket (the
/// client closed its end).
pub(crate) fn peer_inode(own: u64) -> io::Result<Option<u64>> {
    // Socket inodes come from a 32-bit counter (`get_next_ino`).
    let own = u32::try_from(own).map_err(|_| io::Error::other("socket inode over 32 bits"))?;
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(rustix::net::netlink::SOCK_DIAG),
    )?;
    rustix::net::send(&fd, &request(own), SendFlags::empty())?;
    let mut answer = [0u8; 512];
    let (n, _) = rustix::net::recv(&fd, &mut answer[..], RecvFlags::empty())?;
    parse_answer(answer.get(..n).unwrap_or_default(), own)
}

/// A `SOCK_DIAG_BY_FAMILY` request for the socket with inode `own`.
fn request(own: u32) -> [u8; NLMSG_HDRLEN + 24] {
    let mut out = [0u8; NLMSG_HDRLEN + 24];
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    out[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    // struct unix_diag_req: family, protocol, pad, states (all), inode,
    // what to show, and the "no cookie" cookie (the inode alone selects).
    out[16] = AF_UNIX;
    out[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    out[24..28].copy_from_slice(&own.to_ne_bytes());
    out[28..32].copy_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    out[32..40].fill(0xff);
    out
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The peer inode in the kernel's answer about socket `own`.
fn parse_answer(b: &[u8], own: u32) -> io::Result<Option<u64>> {
    let bad = || io::Error::other("malformed sock_diag answer");
    let len = u32_at(b, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(b, 4).ok_or_else(bad)?;
    let msg = b.get(NLMSG_HDRLEN..len).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        // struct nlmsgerr: a negated errno first.
        let errno = i32::from_ne_bytes(u32_at(msg, 0).ok_or_else(bad)?.to_ne_bytes());
        return match errno {
            0 => Err(bad()),
            e if -e == rustix::io::Errno::NOENT.raw_os_error() => Ok(None),
            e => Err(io::Error::from_raw_os_error(-e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY || u32_at(msg, 4) != Some(own) {
        return Err(bad());
    }
    // Attributes (struct rtattr: length, type, value), 4-byte aligned.
    let mut at = UNIX_DIAG_MSG_LEN;
    while let (Some(alen), Some(atype)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
        let alen = usize::from(alen);
        if alen < 4 {
            return Err(bad());
        }
        if atype == UNIX_DIAG_PEER {
            let peer = u32_at(msg, at + 4).filter(|_| alen >= 8).ok_or_else(bad)?;
            // 0: not connected to anything.
            return Ok((peer != 0).then_some(u64::from(peer)));
        }
        at += alen.div_ceil(4) * 4;
    }
    Ok(None)
}

/// Socket inode → descriptor for each process, from the last full scan of
/// its descriptors. A client that opens a pool of connections before using
/// them (a load generator, a gRPC channel pool) then has all of them found by
/// one scan instead of one scan per connection: with 1,000 connections from
/// one process, a scan each made the first calls cost seconds of agent CPU.
/// Only hints: every hit is checked again with a `readlink`, so an entry
/// left by an exited process (whose PID was reused) only costs that check.
static SCANS: LazyLock<Mutex<HashMap<i32, HashMap<u64, i32>>>> = LazyLock::new(Mutex::default);

/// Bounds on [`SCANS`]: processes remembered, sockets per process.
const SCANNED_PROCESSES: usize = 1024;
const SOCKETS_PER_SCAN: usize = 1 << 16;

/// Whether process `pid` holds the socket with inode `socket` among its
/// descriptors. `hint` is the descriptor where it was found last time, which
/// is looked at first (a workload may hold thousands of descriptors, and a
/// call should cost one `readlink`); then the last scan of `pid`; then a
/// new scan.
pub(crate) fn holds(pid: i32, socket: u64, hint: &AtomicI32) -> io::Result<bool> {
    let is_it = |fd: i32| socket_at(pid, fd) == Some(socket);
    let last = hint.load(Ordering::Relaxed);
    if last >= 0 && is_it(last) {
        return Ok(true);
    }
    let scanned = lock(&SCANS).get(&pid).and_then(|s| s.get(&socket).copied());
    if let Some(fd) = scanned.filter(|&fd| fd != last && is_it(fd)) {
        hint.store(fd, Ordering::Relaxed);
        return Ok(true);
    }
    let mut sockets = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(inode) = socket_at(pid, fd) {
            if sockets.len() < SOCKETS_PER_SCAN || inode == socket {
                sockets.insert(inode, fd);
            }
        }
    }
    let found = sockets.get(&socket).copied();
    let mut scans = lock(&SCANS);
    if scans.len() >= SCANNED_PROCESSES {
        scans.clear();
    }
    scans.insert(pid, sockets);
    drop(scans);
    if let Some(fd) = found {
        hint.store(fd, Ordering::Relaxed);
    }
    Ok(found.is_some())
}

/// The inode of the socket that descriptor `fd` of `pid` is, if it is one.
fn socket_at(pid: i32, fd: i32) -> Option<u64> {
    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves only hints behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks, once at start, that this kernel and sandbox let the agent find a
/// connection's client socket: without that, every caller would be refused.
pub(crate) fn self_test() -> io::Result<()> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let ino = |s: &std::os::unix::net::UnixStream| -> io::Result<u64> {
        Ok(rustix::fs::fstat(s).map(|st| st.st_ino)?)
    };
    let peer = peer_inode(ino(&ours)?)?;
    if peer != Some(ino(&theirs)?) {
        return Err(io::Error::other(format!(
            "sock_diag named {peer:?} as the peer of a socket pair"
        )));
    }
    let me = i32::try_from(std::process::id()).map_err(io::Error::other)?;
    if !holds(me, ino(&theirs)?, &AtomicI32::new(-1))? {
        return Err(io::Error::other("/proc/self/fd does not list a socket"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_the_peer_and_the_fd_table_holds_it() {
        self_test().unwrap();
    }

    #[test]
    fn a_closed_peer_and_a_foreign_socket_are_not_held() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let their_ino = rustix::fs::fstat(&theirs).unwrap().st_ino;
        let own_ino = rustix::fs::fstat(&ours).unwrap().st_ino;
        let me = i32::try_from(std::process::id()).unwrap();
        let hint = AtomicI32::new(-1);
        assert!(holds(me, their_ino, &hint).unwrap());
        assert!(
            hint.load(Ordering::Relaxed) >= 0,
            "the descriptor is remembered"
        );
        drop(theirs);
        assert!(!holds(me, their_ino, &hint).unwrap());
        // The peer is gone: the kernel says so, or names no peer.
        assert_eq!(peer_inode(own_ino).unwrap(), None);
        // Another process holds none of our sockets.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(!holds(pid, own_ino, &AtomicI32::new(-1)).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn one_scan_finds_every_socket_of_a_pool() {
        let pairs: Vec<_> = (0..64)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        let me = i32::try_from(std::process::id()).unwrap();
        let inode = |s: &std::os::unix::net::UnixStream| rustix::fs::fstat(s).unwrap().st_ino;
        for (_, theirs) in &pairs {
            let hint = AtomicI32::new(-1);
            assert!(holds(me, inode(theirs), &hint).unwrap());
            // The descriptor found is that very socket.
            let fd = hint.load(Ordering::Relaxed);
            assert_eq!(socket_at(me, fd), Some(inode(theirs)));
        }
        let remembered = lock(&SCANS).get(&me).map_or(0, HashMap::len);
        assert!(remembered >= 64, "{remembered}");
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        assert!(parse_answer(&[], 1).is_err());
        assert!(parse_answer(&[0xff; 8], 1).is_err());
        let mut short = request(7).to_vec();
        short[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_answer(&short, 7).is_err());
        // A well-formed answer about another socket is refused too.
        let mut other = vec![0u8; NLMSG_HDRLEN + UNIX_DIAG_MSG_LEN];
        let len = u32::try_from(other.len()).unwrap();
        other[0..4].copy_from_slice(&len.to_ne_bytes());
        other[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        other[20..24].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_answer(&other, 7).is_err());
        assert_eq!(parse_answer(&other, 8).unwrap(), None);
        // A zero-length attribute would loop forever if not refused.
        other.extend_from_slice(&[0, 0, 2, 0]);
        let len = u32::try_from(other.len()).unwrap();
        other[0..4].copy_from_slice(&len.to_ne_bytes());
        assert!(parse_answer(&other, 8).is_err());
    }
}
