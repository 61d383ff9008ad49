//! Lock files and socket locks: one holder at a time, refused with the
//! holder's pid, exactly one winner among racers, and a stopping holder
//! removes only the socket it made.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use oxid_tls::lock::{LockError, LockFile};
use oxid_tls::socket::{SocketError, lock_socket};

/// A scratch directory (0755), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Scratch {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "oxid-lock-files-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    Scratch(path)
}

#[test]
fn a_held_lock_is_refused_with_the_holders_pid_and_freed_on_drop() {
    let t = scratch();
    let path = t.path().join("x.lock");
    let held = LockFile::acquire(&path).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", std::process::id())
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // flock is per open file: a second open in this process is refused too.
    match LockFile::acquire(&path) {
        Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("{other:?}"),
    }
    drop(held);
    assert!(!path.exists(), "the lock file outlived its holder");
    drop(LockFile::acquire(&path).unwrap());
}

#[test]
fn a_lock_file_that_is_a_link_is_refused() {
    let t = scratch();
    let target = t.path().join("elsewhere");
    std::fs::write(&target, b"keep").unwrap();
    let path = t.path().join("x.lock");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    assert!(matches!(
        LockFile::acquire(&path),
        Err(LockError::Io { .. })
    ));
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
}

#[tokio::test]
async fn a_second_holder_of_a_socket_is_refused_and_the_first_keeps_serving() {
    let t = scratch();
    let socket = t.path().join("run/api.sock");
    let mut first = lock_socket(&socket).unwrap();
    let listener = first.bind(0o777).unwrap();
    let err = lock_socket(&socket).unwrap_err();
    assert!(matches!(err, SocketError::InUse { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "socket {} is in use: another process (pid {}) holds {}.lock; stop it first, or \
             give this one another socket path",
            socket.display(),
            std::process::id(),
            socket.display()
        )
    );
    let (client, accepted) =
        tokio::join!(tokio::net::UnixStream::connect(&socket), listener.accept());
    client.unwrap();
    accepted.unwrap();
    drop(first);
    assert!(!socket.exists() && !t.path().join("run/api.sock.lock").exists());
}

#[test]
fn of_many_racing_for_a_socket_exactly_one_wins() {
    let t = scratch();
    let socket = t.path().join("api.sock");
    for _ in 0..20 {
        let barrier = std::sync::Barrier::new(8);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        lock_socket(&socket)
                    })
                })
                .collect();
            // All results are collected before any winner is dropped.
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, SocketError::InUse { .. }), "{e}");
            }
        }
    }
}

#[tokio::test]
async fn a_stopping_holder_leaves_a_socket_it_did_not_make() {
    let t = scratch();
    let socket = t.path().join("api.sock");
    let mut lock = lock_socket(&socket).unwrap();
    let _listener = lock.bind(0o777).unwrap();
    // Something else now sits at the path (an operator's hand, or a holder
    // that ignored the lock): not ours, so not removed.
    std::fs::remove_file(&socket).unwrap();
    let _other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(lock);
    assert!(is_socket(&socket));
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
