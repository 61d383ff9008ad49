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
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}
