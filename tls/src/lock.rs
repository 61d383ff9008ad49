//! Lock files: one process at a time on a socket path or a data directory.
//!
//! An exclusive `flock` on a file beside what it guards, held for the life
//! of the holder. Probing instead (connect to the socket, look for a pid)
//! lets two processes that start at the same moment both see the path free
//! and both take it; `flock` has exactly one winner. The kernel drops the
//! lock when its holder dies however it dies, so a crash leaves nothing to
//! clear by hand.

use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

/// How many times a lock file removed by its stopping holder, between our
/// open and our lock, is opened again before giving up.
const MAX_ATTEMPTS: usize = 8;

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process (or another open in this one) holds the lock.
    #[error("{} is held by {}", path.display(), holder(*pid))]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, as it wrote it in the file (absent while it is
        /// still writing it).
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    #[error("lock file {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// "pid N", or "another process" when the pid is not known.
pub fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("another process (pid {pid})"),
        None => "another process".into(),
    }
}

/// An exclusive lock on a file, held until dropped. Dropping it removes the
/// file (while still holding the lock) and then releases the lock.
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
    file: File,
}

impl LockFile {
    /// Takes the lock on `path` without waiting, creating the file 0600 if
    /// missing, and writes this process's pid into it. The directory must
    /// already have been checked (no other user can replace the file); the
    /// file must be a regular file owned by root or this user.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |source: std::io::Error| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let me = crate::socket::current_uid().map_err(io)?;
        for _ in 0..MAX_ATTEMPTS {
            let fd = rustix::fs::open(
                path,
                OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| io(e.into()))?;
            let file = File::from(fd);
            let meta = file.metadata().map_err(io)?;
            if !meta.is_file() || ![0, me].contains(&meta.uid()) {
                return Err(io(std::io::Error::other(format!(
                    "not a regular file owned by root or uid {me}; remove it"
                ))));
            }
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(LockError::Held {
                        path: path.to_path_buf(),
                        pid: read_pid(&file),
                    });
                }
                Err(e) => return Err(io(e.into())),
            }
            // A holder that was stopping may have removed the file between
            // our open and our lock: ours is then on a file nobody else will
            // open, so start again with the one at the path.
            if !same_file(path, &meta) {
                continue;
            }
            if meta.mode() & 0o7777 != 0o600 {
                rustix::fs::fchmod(&file, Mode::from_raw_mode(0o600)).map_err(|e| io(e.into()))?;
            }
            file.set_len(0).map_err(io)?;
            file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
                .map_err(io)?;
            return Ok(Self {
                path: path.to_path_buf(),
                file,
            });
        }
        Err(io(std::io::Error::other(
            "it kept being replaced while being locked",
        )))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed only if it is still ours; a process that opened it just
        // before sees, once it has the lock, that the path no longer leads
        // to its file, and opens the path again.
        if let Ok(meta) = self.file.metadata() {
            if same_file(&self.path, &meta) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Whether `path` (not followed) is the file `meta` describes.
fn same_file(path: &Path, meta: &std::fs::Metadata) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
}

/// The pid a holder wrote in its lock file.
fn read_pid(file: &File) -> Option<u32> {
    let mut buf = [0u8; 16];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}
