//! Local Unix sockets, bound safely: the directory must belong to this
//! process's user and not be writable by group or others (anyone who can
//! write there could replace the socket and impersonate the service).

use std::path::Path;

use tokio::net::UnixListener;

/// The effective uid of this process, read from `/proc/self` (owned by it),
/// which spares an `unsafe` call to `geteuid`.
pub fn current_uid() -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// The directory is unsafe: owned by another user or writable by others.
    #[error("refusing to use socket directory {dir}: {reason}")]
    UnsafeDirectory {
        /// The directory.
        dir: String,
        /// What is wrong.
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

/// Binds a Unix socket at `path` after checking its directory: created
/// 0755 if missing; refused if owned by another user or writable by group
/// or others (anyone who can write there could swap the socket). A stale
/// socket file is replaced; any other file there is an error.
pub fn bind_unix_socket(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::{
        DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
    };
    let io = |source| SocketError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io)?;
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    let unsafe_dir = |reason: String| SocketError::UnsafeDirectory {
        dir: dir.display().to_string(),
        reason,
    };
    let me = current_uid().map_err(io)?;
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not by this process (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:04o} lets group or others write; use chmod go-w",
            meta.mode() & 0o7777
        )));
    }
    match std::fs::symlink_metadata(path) {
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
    // renamed into place: a client that sees the path can connect at once
    // (no window between bind and listen refusing it) and never finds it
    // with the wrong mode.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(io)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(io(e));
    }
    Ok(listener)
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

    #[tokio::test]
    async fn the_socket_appears_listening_with_its_mode_and_replaces_a_stale_one() {
        let dir = scratch();
        let path = dir.join("api.sock");
        let first = bind_unix_socket(&path, 0o777).unwrap();
        // Seen at its final path means connectable, with the final mode.
        tokio::net::UnixStream::connect(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777);
        drop(first);
        // A stale socket (its listener gone) is replaced.
        let _second = bind_unix_socket(&path, 0o770).unwrap();
        tokio::net::UnixStream::connect(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o770);
        // No staging file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["api.sock"]);
        // Any other file in the way is an error, and is left alone.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"data").unwrap();
        assert!(bind_unix_socket(&file, 0o777).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
