//! The `unix` workload attestor: who is calling, from the socket's peer
//! credentials and `/proc`.
//!
//! The caller is the process pinned when its connection was accepted
//! ([`Peer`]). It is checked after everything is read: if it has exited
//! (and its PID could have been reused by another process), attestation is
//! refused.

use std::collections::{BTreeSet, HashMap};
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxid_pki::Selector;

use super::peer::{Cred, Exe, Peer};

/// Largest executable hashed for `unix:sha256` (bigger ones get no hash
/// selector rather than stalling the call).
pub const MAX_HASH_BYTES: u64 = 1 << 30;

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The process went away during attestation (its PID may be reused).
    #[error("the calling process exited during attestation")]
    ProcessExited,
    /// The process runs another program than it did when its connection
    /// was accepted: the connection is not that program's.
    #[error(
        "the calling process has executed another program since it connected; \
         connect again from the program itself"
    )]
    Executed,
    /// The process no longer holds its end of the connection: it was handed
    /// to another process, which is not the one attested.
    #[error(
        "the calling process no longer holds its connection (it was handed to \
         another process); connect from the process that makes the calls"
    )]
    HandedOff,
    /// `/proc` could not be read for the caller.
    #[error("cannot inspect the calling process: {0}")]
    Proc(String),
}

/// File identity used as the hash cache key: a replaced or modified
/// executable never reuses a stale hash.
type FileKey = (u64, u64, u64, i64, i64, i64, i64);

fn file_key(meta: &std::fs::Metadata) -> FileKey {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// The attestor, with its executable-hash and user/group-name caches.
#[derive(Debug)]
pub struct UnixAttestor {
    hashes: Mutex<HashMap<FileKey, String>>,
    users: NameFile,
    groups: NameFile,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self {
            hashes: Mutex::default(),
            users: NameFile::new("/etc/passwd"),
            groups: NameFile::new("/etc/group"),
        }
    }
}

/// id → name, shared between calls.
type Names = Arc<HashMap<u32, String>>;

/// A passwd- or group-format file, parsed again only when it changes:
/// parsing both on every call was the largest user-space cost of a
/// Workload API call (BENCHMARKS.md).
#[derive(Debug)]
struct NameFile {
    path: &'static str,
    /// How long a parse is used before the file's identity is checked again:
    /// one `statx` a second rather than one per call. A renamed user shows
    /// in names that long after; ids (`unix:uid:`) are never stale.
    recheck: Duration,
    parsed: Mutex<Option<Parsed>>,
}

#[derive(Debug)]
struct Parsed {
    key: FileKey,
    names: Names,
    checked: Instant,
}

impl NameFile {
    fn new(path: &'static str) -> Self {
        Self {
            path,
            recheck: Duration::from_secs(1),
            parsed: Mutex::new(None),
        }
    }

    /// id → name, as the file is now (empty if it cannot be read).
    fn names(&self) -> Names {
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = parsed.as_ref() {
            if p.checked.elapsed() < self.recheck {
                return p.names.clone();
            }
        }
        // The identity is taken before reading, so a change during the read
        // shows as a new identity next time and the file is read again.
        let key = std::fs::metadata(self.path).ok().map(|m| file_key(&m));
        let checked = Instant::now();
        if let (Some(key), Some(p)) = (key, parsed.as_mut()) {
            if key == p.key {
                p.checked = checked;
                return p.names.clone();
            }
        }
        let names = Arc::new(read_names(self.path));
        *parsed = key.map(|key| Parsed {
            key,
            names: names.clone(),
            checked,
        });
        names
    }
}

impl UnixAttestor {
    /// Selectors of the process `peer` pinned, as it was pinned: its path
    /// and hash are those of the executable it ran then. Refused if that
    /// process has exited by the time they are read (its PID may belong to
    /// another process by then), runs another executable, or no longer holds
    /// its connection ([`Peer::check`]).
    pub fn attest(&self, peer: &Peer) -> Result<BTreeSet<Selector>, AttestError> {
        let Some(Cred {
            pid: Some(pid),
            uid,
            gid,
        }) = peer.cred()
        else {
            return Err(AttestError::Proc(
                "the kernel did not name the calling process".into(),
            ));
        };
        let exe = peer.exe()?;
        let selectors = self.inspect(pid, uid, gid, exe).map_err(|e| {
            // `/proc/<pid>` gone: say why, rather than what failed to open.
            if peer.still_running(pid) {
                e
            } else {
                AttestError::ProcessExited
            }
        })?;
        peer.check()?;
        Ok(selectors)
    }

    fn inspect(
        &self,
        pid: i32,
        uid: u32,
        gid: u32,
        exe: &Exe,
    ) -> Result<BTreeSet<Selector>, AttestError> {
        let mut out = BTreeSet::new();
        let mut add = |kind: &str, value: String| {
            if let Ok(s) = Selector::new(kind, &value) {
                out.insert(s);
            }
        };
        add("unix", format!("uid:{uid}"));
        add("unix", format!("gid:{gid}"));
        let (users, groups) = (self.users.names(), self.groups.names());
        if let Some(name) = users.get(&uid) {
            add("unix", format!("user:{name}"));
        }
        if let Some(name) = groups.get(&gid) {
            add("unix", format!("group:{name}"));
        }
        for g in supplementary_gids(pid)? {
            add("unix", format!("supplementary_gid:{g}"));
            if let Some(name) = groups.get(&g) {
                add("unix", format!("supplementary_group:{name}"));
            }
        }
        let shown = exe.path.display().to_string();
        // A deleted or replaced executable shows " (deleted)": no path then.
        if !shown.ends_with(" (deleted)") {
            add("unix", format!("path:{shown}"));
        }
        if let Some(hash) = self.hash(pid, exe)? {
            add("unix", format!("sha256:{hash}"));
        }
        Ok(out)
    }

    /// SHA-256 of `exe`, read through `/proc/<pid>/exe` (the file the
    /// process runs, even if the path now names another), cached by identity.
    /// The file opened must be `exe` itself: a process that has executed
    /// another program since it was pinned gets no hash of that program.
    fn hash(&self, pid: i32, exe: &Exe) -> Result<Option<String>, AttestError> {
        let link = PathBuf::from(format!("/proc/{pid}/exe"));
        let mut file = std::fs::File::open(&link)
            .map_err(|e| AttestError::Proc(format!("{}: {e}", link.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| AttestError::Proc(e.to_string()))?;
        if !exe.is(&meta) {
            return Err(AttestError::Executed);
        }
        if meta.size() > MAX_HASH_BYTES {
            return Ok(None);
        }
        let key = file_key(&meta);
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Some(h.clone()));
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| AttestError::Proc(e.to_string()))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let hex = oxid_pki::hex(ctx.finish().as_ref());
        let mut cache = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        // Bound the cache: a host has few distinct executables, but a hostile
        // caller could cycle through many files.
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(key, hex.clone());
        Ok(Some(hex))
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
pub(crate) fn start_time(pid: i32) -> Result<u64, AttestError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| AttestError::ProcessExited)?;
    // The command name (field 2) may hold spaces and parentheses: skip past
    // its last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| AttestError::Proc("unreadable stat".into()))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| AttestError::Proc("unreadable stat".into()))
}

fn supplementary_gids(pid: i32) -> Result<Vec<u32>, AttestError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| AttestError::ProcessExited)?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default())
}

/// id → name from a passwd/group-format file.
fn read_names(path: &str) -> HashMap<u32, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((id, name.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attests_this_process() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let a = UnixAttestor::default();
        let s = a.attest(&Peer::pin_pid(pid, 0, 0)).unwrap();
        let text: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert!(text.contains(&"unix:uid:0".to_owned()));
        let exe = std::env::current_exe().unwrap();
        assert!(
            text.contains(&format!("unix:path:{}", exe.display())),
            "{text:?}"
        );
        let sha = text.iter().find(|t| t.starts_with("unix:sha256:")).unwrap();
        let expected = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&exe).unwrap());
        let hex: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha, &format!("unix:sha256:{hex}"));
        // The second time comes from the cache, with the same answer.
        assert_eq!(a.attest(&Peer::pin_pid(pid, 0, 0)).unwrap(), s);
    }

    /// A child running `program` (a copy of `sleep`), killed on drop.
    struct Running(std::process::Child);

    impl Running {
        fn start(program: &std::path::Path) -> Self {
            Self(
                std::process::Command::new(program)
                    .arg("60")
                    .spawn()
                    .unwrap(),
            )
        }

        fn selectors(&self, a: &UnixAttestor) -> Vec<String> {
            let pid = i32::try_from(self.0.id()).unwrap();
            let s = a.attest(&Peer::pin_pid(pid, 0, 0)).unwrap();
            s.iter().map(ToString::to_string).collect()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sha256_of(path: &std::path::Path) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap());
        format!("unix:sha256:{}", oxid_pki::hex(digest.as_ref()))
    }

    fn executable_copy(to: &std::path::Path, extra: &[u8]) {
        use std::os::unix::fs::PermissionsExt as _;
        let mut bytes = std::fs::read("/bin/sleep").unwrap();
        // Trailing bytes after the ELF sections change the hash, not the program.
        bytes.extend_from_slice(extra);
        std::fs::write(to, bytes).unwrap();
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn replaced_and_symlinked_executables_are_seen_as_they_run() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let prog = dir.join("prog");
        executable_copy(&prog, b"");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&prog, &link).unwrap();
        let a = UnixAttestor::default();

        // Started through a symlink: the path is the file it runs.
        let old = Running::start(&link);
        let seen = old.selectors(&a);
        assert!(
            seen.contains(&format!("unix:path:{}", prog.display())),
            "{seen:?}"
        );
        assert!(!seen.iter().any(|s| s.ends_with("/link")), "{seen:?}");
        let old_hash = sha256_of(&prog);
        assert!(seen.contains(&old_hash), "{seen:?}");

        // The file is replaced (a new inode at the same path) while it runs.
        let staged = dir.join("prog.new");
        executable_copy(&staged, b"\0another build");
        std::fs::rename(&staged, &prog).unwrap();
        let new_hash = sha256_of(&prog);
        assert_ne!(new_hash, old_hash);

        // The running process keeps the old file's hash and loses its path,
        // which now names another file.
        let seen = old.selectors(&a);
        assert!(seen.contains(&old_hash), "{seen:?}");
        assert!(
            !seen.iter().any(|s| s.starts_with("unix:path:")),
            "{seen:?}"
        );

        // A process started from the new file gets the new hash: the cache
        // (keyed by device, inode, size and times) never serves the old one.
        let new = Running::start(&prog);
        let seen = new.selectors(&a);
        assert!(seen.contains(&new_hash), "{seen:?}");
        assert!(
            seen.contains(&format!("unix:path:{}", prog.display())),
            "{seen:?}"
        );
    }

    #[test]
    fn a_process_that_exits_during_attestation_is_refused() {
        // A large executable takes a while to hash: the caller exits while
        // the agent is still reading it, and the pidfd (or start-time)
        // check afterwards refuses the result.
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("big-sleep");
        executable_copy(&prog, &vec![0u8; 512 << 20]);
        let mut child = std::process::Command::new(&prog)
            .arg("0.05")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let outcome = UnixAttestor::default().attest(&Peer::pin_pid(pid, 0, 0));
        child.wait().unwrap();
        // Never an identity for a process that is gone. (If it exits before
        // its executable is even opened, /proc refuses instead.)
        assert!(
            matches!(
                outcome,
                Err(AttestError::ProcessExited | AttestError::Proc(_))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_dead_process_is_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        assert!(
            UnixAttestor::default()
                .attest(&Peer::pin_pid(pid, 0, 0))
                .is_err()
        );
    }

    #[test]
    fn stat_with_odd_command_names() {
        assert!(start_time(i32::try_from(std::process::id()).unwrap()).unwrap() > 0);
    }

    #[test]
    fn name_files_are_parsed_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "alice:x:1000:1000::/home/alice:/bin/sh\n").unwrap();
        let mut file = NameFile::new(Box::leak(path.display().to_string().into_boxed_str()));
        file.recheck = Duration::ZERO;
        assert_eq!(file.names().get(&1000).map(String::as_str), Some("alice"));
        let first = file.names();
        assert!(
            Arc::ptr_eq(&first, &file.names()),
            "unchanged: not parsed again"
        );
        // Replaced the way useradd does it: a new file renamed into place.
        let next = dir.path().join("passwd+");
        std::fs::write(&next, "robert:x:1000:1000::/home/robert:/bin/sh\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(file.names().get(&1000).map(String::as_str), Some("robert"));
        std::fs::remove_file(&path).unwrap();
        assert!(file.names().is_empty(), "a missing file names no one");
        // Within `recheck` of the last look, the file is not even statted.
        std::fs::write(&path, "carol:x:1000:1000::/home/carol:/bin/sh\n").unwrap();
        file.recheck = Duration::from_secs(3600);
        assert_eq!(file.names().get(&1000).map(String::as_str), Some("carol"));
        std::fs::write(&path, "dave:x:1000:1000::/home/dave:/bin/sh\n").unwrap();
        assert_eq!(file.names().get(&1000).map(String::as_str), Some("carol"));
    }
}
