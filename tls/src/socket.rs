//! Local Unix sockets and private directories, set up safely.
//!
//! Anyone who can change any component of a socket's path (a directory on
//! the way, a symbolic link, the socket's own directory) could swap in their
//! own socket and receive the calls meant for the service, so every
//! component is checked, not only the last directory: each must be owned by
//! root or this process's user, and no directory may be writable by group or
//! others, except a sticky one such as `/tmp` on the way (its children can
//! be replaced only by their owners, who are checked next). A symbolic link
//! is followed only if it and everything it leads to pass the same checks.
//! Data directories get the same checks.

use std::path::{Component, Path, PathBuf};

use tokio::net::UnixListener;

/// Most symbolic links followed in one path (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// The effective uid of this process, read from `/proc/self` (owned by it),
/// which spares an `unsafe` call to `geteuid`.
pub fn current_uid() -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// Why a socket or a directory could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// A component of the socket's path is unsafe: owned by another user,
    /// or a directory others can write.
    #[error("refusing to use socket directory {dir}: {reason}")]
    UnsafeDirectory {
        /// The directory.
        dir: String,
        /// Which component is wrong, and how.
        reason: String,
    },
    /// A component of a data directory's path is unsafe.
    #[error("refusing to use data directory {dir}: {reason}")]
    UnsafeDataDirectory {
        /// The directory.
        dir: String,
        /// Which component is wrong, and how.
        reason: String,
    },
    /// Another process serves on this socket path (it holds the path's
    /// lock file).
    #[error(
        "socket {path} is in use: {} holds {lock}; stop it first, or give this one \
         another socket path",
        crate::lock::holder(*pid)
    )]
    InUse {
        /// The socket path.
        path: String,
        /// The lock file.
        lock: String,
        /// The holder's pid, if it had written it yet.
        pid: Option<u32>,
    },
    /// A socket address (`--socket-path`, `SPIFFE_ENDPOINT_SOCKET`) that is
    /// not a path or a `unix:` URI.
    #[error("socket address {address:?}: {reason}")]
    BadAddress {
        /// What was given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Creating, cleaning or binding failed.
    #[error("socket {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The socket path named by `address`, which is a path or a URI as
/// `SPIFFE_ENDPOINT_SOCKET` takes it: `unix:///run/api.sock` or
/// `unix:/run/api.sock` (an absolute path, no host, query or fragment).
/// Other schemes (`tcp:`) are refused: oxid serves on Unix sockets only.
/// A relative path whose first component holds a `:` must start `./`.
pub fn parse_socket_address(address: &str) -> Result<PathBuf, SocketError> {
    let refuse = |reason: &str| SocketError::BadAddress {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let scheme_len = address.find(':').filter(|&i| {
        let scheme = &address[..i];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let Some(i) = scheme_len else {
        if address.is_empty() {
            return Err(refuse("empty"));
        }
        return Ok(PathBuf::from(address));
    };
    if !address[..i].eq_ignore_ascii_case("unix") {
        return Err(refuse(
            "only unix: addresses are supported (unix:///path/to/socket, or the path itself)",
        ));
    }
    let rest = &address[i + 1..];
    let path = match rest.strip_prefix("//") {
        Some(after) if after.starts_with('/') => after,
        Some(_) => {
            return Err(refuse(
                "a unix: URI names no host; use unix:///absolute/path (three slashes)",
            ));
        }
        None => rest,
    };
    if !path.starts_with('/') {
        return Err(refuse("a unix: URI takes an absolute path"));
    }
    if path.contains(['?', '#', '%']) {
        return Err(refuse(
            "a query, fragment or percent-encoding is not supported; give the path itself",
        ));
    }
    Ok(PathBuf::from(path))
}

/// Checks every component of the path to the directory `dir`, which must
/// exist; `Err` says which component is wrong and how.
pub fn check_dir_path(dir: &Path) -> Result<(), String> {
    check_path(dir, false)
}

/// As [`check_dir_path`]; `sticky_last` lets the last directory be a
/// writable sticky one (to create a child in, which is checked after).
fn check_path(dir: &Path, sticky_last: bool) -> Result<(), String> {
    let me = current_uid().map_err(|e| format!("cannot read /proc/self: {e}"))?;
    let absolute = std::path::absolute(dir)
        .map_err(|e| format!("cannot make {} absolute: {e}", dir.display()))?;
    let mut walk = Walk { me, links: 0 };
    let resolved = walk.resolve(PathBuf::from("/"), &absolute)?;
    let meta = lstat(&resolved)?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", resolved.display()));
    }
    // The last directory holds the socket or the data itself: no one else
    // may create files there, sticky or not.
    if mode(&meta) & 0o022 != 0 && !(sticky_last && mode(&meta) & 0o1000 != 0) {
        return Err(format!(
            "{} has mode {:04o}, which lets group or others write; use chmod go-w",
            resolved.display(),
            mode(&meta)
        ));
    }
    Ok(())
}

/// Creates `dir` with `mode` if missing (checking the part of its path that
/// exists first, so nothing is created through an unsafe component), then
/// checks every component of its path.
fn prepare_dir(dir: &Path, mode: u32) -> Result<(), PrepareError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if std::fs::symlink_metadata(dir).is_err() {
        if let Some(existing) = dir.ancestors().skip(1).find(|a| a.exists()) {
            check_path(existing, true).map_err(PrepareError::Unsafe)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(PrepareError::Io)?;
    }
    check_dir_path(dir).map_err(PrepareError::Unsafe)
}

enum PrepareError {
    Unsafe(String),
    Io(std::io::Error),
}

/// Checks the directory a socket at `path` will live in, creating it 0755
/// if missing: what [`bind_unix_socket`] does first, for a caller that must
/// know before spending something (e.g. an agent's join token).
pub fn prepare_socket_dir(path: &Path) -> Result<(), SocketError> {
    let dir = socket_dir(path);
    prepare_dir(dir, 0o755).map_err(|e| match e {
        PrepareError::Unsafe(reason) => SocketError::UnsafeDirectory {
            dir: dir.display().to_string(),
            reason,
        },
        PrepareError::Io(source) => SocketError::Io {
            path: path.display().to_string(),
            source,
        },
    })
}

/// Prepares a private data directory: created with `mode` if missing, every
/// component of its path checked, and its mode then set to `mode` even if it
/// existed before (an older or hand-made directory may be readable by
/// others). One that others can write is refused, not tightened: they may
/// have put files in it already.
pub fn prepare_private_dir(dir: &Path, mode: u32) -> Result<(), SocketError> {
    use std::os::unix::fs::PermissionsExt as _;
    let refuse = |reason| SocketError::UnsafeDataDirectory {
        dir: dir.display().to_string(),
        reason,
    };
    prepare_dir(dir, mode).map_err(|e| match e {
        PrepareError::Unsafe(reason) => refuse(reason),
        PrepareError::Io(e) => refuse(format!("cannot create it: {e}")),
    })?;
    let current = std::fs::metadata(dir)
        .map_err(|e| refuse(e.to_string()))?
        .permissions()
        .mode()
        & 0o7777;
    if current != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| refuse(format!("cannot set its mode to {mode:04o}: {e}")))?;
    }
    Ok(())
}

/// Checks the path of a socket a client is about to send to, so that a
/// user who owns a link or a directory on the way cannot put their own
/// socket there and receive the calls. As for a server binding, except that
/// the socket's own directory, and the socket, may also belong to one other
/// user (a service running under its own account, whose uid the client does
/// not know): that directory must still not be writable by group or others,
/// and the socket must belong to root, this user or that directory's owner.
pub fn check_socket_to_connect(path: &Path) -> Result<(), SocketError> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let refuse = |reason| SocketError::UnsafeDirectory {
        dir: socket_dir(path).display().to_string(),
        reason,
    };
    let me = current_uid().map_err(|e| refuse(format!("cannot read /proc/self: {e}")))?;
    let absolute = std::path::absolute(path)
        .map_err(|e| refuse(format!("cannot make {} absolute: {e}", path.display())))?;
    let (Some(dir), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(refuse(format!("{} names no socket", path.display())));
    };
    let mut walk = Walk { me, links: 0 };
    let resolved = match (dir.parent(), dir.file_name()) {
        (Some(above), Some(last)) => {
            let above = walk.resolve(PathBuf::from("/"), above).map_err(refuse)?;
            let candidate = above.join(last);
            let meta = lstat(&candidate).map_err(refuse)?;
            if meta.file_type().is_symlink() {
                walk.resolve(above, Path::new(last)).map_err(refuse)?
            } else if meta.is_dir() {
                candidate
            } else {
                return Err(refuse(format!(
                    "{} is not a directory",
                    candidate.display()
                )));
            }
        }
        _ => walk.resolve(PathBuf::from("/"), dir).map_err(refuse)?,
    };
    let dir_meta = lstat(&resolved).map_err(refuse)?;
    if mode(&dir_meta) & 0o022 != 0 {
        return Err(refuse(format!(
            "{} has mode {:04o}, which lets group or others replace the socket",
            resolved.display(),
            mode(&dir_meta)
        )));
    }
    let socket = resolved.join(name);
    let meta = lstat(&socket).map_err(refuse)?;
    if !meta.file_type().is_socket() {
        return Err(refuse(format!("{} is not a socket", socket.display())));
    }
    if ![0, me, dir_meta.uid()].contains(&meta.uid()) {
        return Err(refuse(format!(
            "socket {} is owned by uid {}, neither root, this user nor its directory's owner",
            socket.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// The directory a socket at `path` lives in.
fn socket_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// One walk along a path, counting the symbolic links followed.
struct Walk {
    me: u32,
    links: usize,
}

impl Walk {
    /// Follows `path` from `base` (a checked, link-free directory), checking
    /// each component; returns the link-free path it leads to.
    fn resolve(&mut self, base: PathBuf, path: &Path) -> Result<PathBuf, String> {
        let mut current = base;
        for component in path.components() {
            match component {
                Component::RootDir => {
                    current = PathBuf::from("/");
                    self.check_dir(&current, &lstat(&current)?)?;
                }
                Component::CurDir | Component::Prefix(_) => {}
                // `current` holds no link, so its parent is the real one,
                // and was checked on the way here.
                Component::ParentDir => {
                    current.pop();
                }
                Component::Normal(name) => {
                    let next = current.join(name);
                    let meta = lstat(&next)?;
                    if meta.file_type().is_symlink() {
                        self.check_owner(&next, &meta, "symbolic link")?;
                        self.links += 1;
                        if self.links > MAX_SYMLINKS {
                            return Err(format!(
                                "more than {MAX_SYMLINKS} symbolic links at {}",
                                next.display()
                            ));
                        }
                        let target = std::fs::read_link(&next)
                            .map_err(|e| format!("{}: {e}", next.display()))?;
                        current = self.resolve(current, &target)?;
                    } else if meta.is_dir() {
                        self.check_dir(&next, &meta)?;
                        current = next;
                    } else {
                        return Err(format!("{} is not a directory", next.display()));
                    }
                }
            }
        }
        Ok(current)
    }

    fn check_owner(&self, path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let owner = meta.uid();
        if owner != 0 && owner != self.me {
            return Err(format!(
                "{what} {} is owned by uid {owner}; each component of the path must be \
                 owned by root or by this process's user (uid {})",
                path.display(),
                self.me
            ));
        }
        Ok(())
    }

    fn check_dir(&self, path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
        self.check_owner(path, meta, "directory")?;
        let mode = mode(meta);
        // A sticky directory is safe to pass through: its children can be
        // renamed or removed only by their owners, and the child on this
        // path is checked next.
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "directory {} has mode {mode:04o}, which lets group or others replace what \
                 is inside; use chmod go-w (or chmod +t)",
                path.display()
            ));
        }
        Ok(())
    }
}

fn lstat(path: &Path) -> Result<std::fs::Metadata, String> {
    std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    meta.permissions().mode() & 0o7777
}

/// A socket path held by this process: the exclusive lock on
/// `<socket>.lock` beside it, and the socket once bound. Dropping it removes
/// the socket if the file at the path is still the one bound here, then the
/// lock file, then releases the lock; so a second process started on the
/// same path is refused instead of taking the socket from the first, and a
/// stopping process never removes a socket it did not make.
#[derive(Debug)]
pub struct SocketLock {
    path: PathBuf,
    /// Device and inode of the socket file bound here.
    bound: Option<(u64, u64)>,
    // Dropped after `Drop::drop` has removed the socket: the socket is
    // never removed by a process that no longer holds the lock.
    _lock: crate::lock::LockFile,
}

/// Takes the socket path `path` for this process: checks (or creates 0755)
/// its directory as [`prepare_socket_dir`] does, then takes the lock on
/// `<path>.lock`, refusing with [`SocketError::InUse`] if another process
/// holds it. Called before anything is spent, then [`SocketLock::bind`].
pub fn lock_socket(path: &Path) -> Result<SocketLock, SocketError> {
    prepare_socket_dir(path)?;
    let Some(name) = path.file_name() else {
        return Err(SocketError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no socket file"),
        });
    };
    let mut lock_name = name.to_os_string();
    lock_name.push(".lock");
    let lock_path = path.with_file_name(lock_name);
    let lock = crate::lock::LockFile::acquire(&lock_path).map_err(|e| match e {
        crate::lock::LockError::Held { pid, .. } => SocketError::InUse {
            path: path.display().to_string(),
            lock: lock_path.display().to_string(),
            pid,
        },
        other => SocketError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    Ok(SocketLock {
        path: path.to_path_buf(),
        bound: None,
        _lock: lock,
    })
}

/// [`lock_socket`], then [`SocketLock::bind`]: the listener, and the guard
/// to keep for as long as it serves.
pub fn bind_unix_socket(path: &Path, mode: u32) -> Result<(UnixListener, SocketLock), SocketError> {
    let mut lock = lock_socket(path)?;
    let listener = lock.bind(mode)?;
    Ok((listener, lock))
}

impl SocketLock {
    /// Binds the socket, with `mode`. A socket file left at the path (by a
    /// process that died: the lock is ours) is replaced; any other file
    /// there is an error.
    pub fn bind(&mut self, mode: u32) -> Result<UnixListener, SocketError> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
        let path = self.path.clone();
        let io = |source| SocketError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            // A stale socket is replaced by the rename below.
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            Err(_) => {}
        }
        // Bound and listening under a temporary name, given its mode, then
        // renamed into place: a client that sees the path can connect at
        // once (no window between bind and listen refusing it) and never
        // finds it with the wrong mode.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging).map_err(io)?;
        let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::fs::symlink_metadata(&staging))
            .and_then(|m| {
                std::fs::rename(&staging, &path)?;
                Ok(m)
            });
        match placed {
            Ok(meta) => {
                self.bound = Some((meta.dev(), meta.ino()));
                Ok(listener)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                Err(io(e))
            }
        }
    }
}

impl Drop for SocketLock {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let Some((dev, ino)) = self.bound else {
            return;
        };
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "oxid-socket-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn socket_addresses_are_paths_or_unix_uris() {
        for (given, path) in [
            ("/run/oxid/api.sock", "/run/oxid/api.sock"),
            ("run/api.sock", "run/api.sock"),
            ("./a:b.sock", "./a:b.sock"),
            ("unix:///run/oxid/api.sock", "/run/oxid/api.sock"),
            ("unix:/run/oxid/api.sock", "/run/oxid/api.sock"),
            ("UNIX:///x.sock", "/x.sock"),
        ] {
            assert_eq!(
                parse_socket_address(given).unwrap(),
                Path::new(path),
                "{given}"
            );
        }
        for (given, why) in [
            ("tcp://127.0.0.1:8081", "only unix:"),
            ("tcp:127.0.0.1:8081", "only unix:"),
            ("http://localhost/x", "only unix:"),
            ("unix://host/run/api.sock", "no host"),
            ("unix:run/api.sock", "absolute"),
            ("unix:///run/api.sock?x=1", "query"),
            ("unix:///run/a%20b.sock", "percent"),
            ("", "empty"),
        ] {
            let err = parse_socket_address(given).unwrap_err().to_string();
            assert!(err.contains(why), "{given}: {err}");
        }
    }

    #[tokio::test]
    async fn the_socket_appears_listening_with_its_mode_and_replaces_a_stale_one() {
        let dir = scratch();
        let path = dir.join("api.sock");
        // A socket left by a process that died (its listener gone, its lock
        // released by the kernel) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (_listener, lock) = bind_unix_socket(&path, 0o770).unwrap();
        // Seen at its final path means connectable, with the final mode.
        tokio::net::UnixStream::connect(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o770);
        // No staging file is left behind; the lock file is 0600.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["api.sock", "api.sock.lock"]);
        let lock_mode = std::fs::metadata(dir.join("api.sock.lock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(lock_mode & 0o777, 0o600);
        // Released: both files go.
        drop(lock);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // Any other file in the way is an error, and is left alone.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"data").unwrap();
        assert!(bind_unix_socket(&file, 0o777).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
