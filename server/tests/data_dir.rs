//! The server's data directory: refused if another user could redirect its
//! path, and private (0700, files 0600) even when it existed before with
//! wider modes, or when sled made its files with the umask's. Real server
//! processes and a real store; runs as root (chown), as CI does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{PermissionsExt as _, chown};
use std::path::Path;
use std::process::Command;

use oxid_server::datastore::SledStore;

const BIN: &str = env!("CARGO_BIN_EXE_oxid-server");

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Every file and directory under `dir` (inclusive), with its mode.
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![(dir.display().to_string(), mode_of(dir))];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(modes(&path));
        } else {
            out.push((path.display().to_string(), mode_of(&path)));
        }
    }
    out
}

fn assert_private(dir: &Path) {
    for (path, mode) in modes(dir) {
        let want = if Path::new(&path).is_dir() {
            0o700
        } else {
            0o600
        };
        assert_eq!(mode, want, "{path} has mode {mode:04o}");
    }
}

#[test]
fn the_store_is_private_even_in_a_directory_that_existed_open() {
    let t = tempfile::tempdir().unwrap();
    let store_dir = t.path().join("datastore");
    // A directory made by hand (or by an older version), readable by all,
    // with the store's files readable by all.
    std::fs::create_dir(&store_dir).unwrap();
    set_mode(&store_dir, 0o755);
    drop(SledStore::open(&store_dir, 1 << 20).unwrap());
    set_mode(&store_dir, 0o755);
    for (path, _) in modes(&store_dir).into_iter().skip(1) {
        set_mode(Path::new(&path), 0o644);
    }
    let _store = SledStore::open(&store_dir, 1 << 20).unwrap();
    assert_private(&store_dir);

    // A fresh store too (sled creates its files with the umask's mode).
    let fresh = t.path().join("fresh/datastore");
    let _store = SledStore::open(&fresh, 1 << 20).unwrap();
    assert_private(&fresh);
}

/// Runs the server on `data_dir` until it is healthy (then stops it), or
/// until it exits: its stderr if it failed.
fn run_server(t: &Path, data_dir: &Path) -> Result<(), String> {
    let socket = t.join("run/admin.sock");
    let mut child = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(data_dir)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--bind-address", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return Err(format!("{status}: {err}"));
        }
        let healthy = Command::new(BIN)
            .args(["healthcheck", "--socket-path"])
            .arg(&socket)
            .output()
            .unwrap()
            .status
            .success();
        if healthy {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            child.wait().unwrap();
            return Ok(());
        }
        assert!(std::time::Instant::now() < deadline, "server not healthy");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_data_directory_another_user_could_redirect_is_refused() {
    let t = tempfile::tempdir().unwrap();
    // Under a directory of uid 65534's: they could rename it away and put
    // their own store (or CA keys) in its place.
    let theirs = t.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    set_mode(&theirs, 0o755);
    chown(&theirs, Some(65534), None).unwrap();
    let err = run_server(t.path(), &theirs.join("data")).unwrap_err();
    assert!(
        err.contains("refusing to use data directory") && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert!(!theirs.join("data").exists(), "nothing made under it");

    // One others can write is refused, not tightened.
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    set_mode(&open, 0o777);
    let err = run_server(t.path(), &open).unwrap_err();
    assert!(err.contains("refusing to use data directory"), "{err}");
    assert_eq!(mode_of(&open), 0o777);

    // One that existed readable by others is made private.
    let data = t.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o755);
    run_server(t.path(), &data).unwrap();
    assert_eq!(mode_of(&data), 0o700);
    assert_private(&data.join("datastore"));
}
