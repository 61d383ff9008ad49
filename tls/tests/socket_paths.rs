//! Socket and data directory paths that another user could redirect are
//! refused: a symbolic link they own, a directory on the way they (or their
//! group) can write, a child of a sticky directory that is theirs. Real
//! sockets, bound and connected; the other user is uid 65534, given its
//! files with chown, so these run as root (as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{PermissionsExt as _, chown, lchown, symlink};
use std::path::{Path, PathBuf};

use oxid_tls::socket::{
    SocketError, bind_unix_socket, check_socket_to_connect, current_uid, prepare_private_dir,
};

const NOBODY: u32 = 65534;

/// A scratch tree (0700, root's), removed at the end.
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

/// A scratch tree, or `None` when not root (chown needs root).
fn scratch() -> Option<Scratch> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    if current_uid().unwrap() != 0 {
        return None;
    }
    let path = std::env::temp_dir().join(format!(
        "oxid-socket-paths-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&path);
    Some(Scratch(dir(&path, 0o700, 0)))
}

fn dir(path: &Path, mode: u32, owner: u32) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    chown(path, Some(owner), None).unwrap();
    path.to_owned()
}

fn link(at: &Path, to: &Path, owner: u32) {
    symlink(to, at).unwrap();
    lchown(at, Some(owner), None).unwrap();
}

/// Binding `socket` is refused, naming `culprit` and `why`.
fn refused(socket: &Path, culprit: &Path, why: &str) {
    match bind_unix_socket(socket, 0o777) {
        Err(SocketError::UnsafeDirectory { reason, .. }) => {
            assert!(
                reason.contains(&culprit.display().to_string()) && reason.contains(why),
                "{reason}"
            );
        }
        Err(other) => panic!("{}: wrong refusal: {other}", socket.display()),
        Ok(_) => panic!(
            "{}: bound, though {} lets uid {NOBODY} swap the socket",
            socket.display(),
            culprit.display()
        ),
    }
}

/// Binding `socket` works and a client reaches that listener.
async fn bound(socket: &Path) {
    let (listener, _lock) = bind_unix_socket(socket, 0o777).unwrap();
    let (client, accepted) =
        tokio::join!(tokio::net::UnixStream::connect(socket), listener.accept());
    client.unwrap();
    accepted.unwrap();
}

#[tokio::test]
async fn a_symbolic_link_owned_by_another_user_is_refused() {
    let Some(t) = scratch() else { return };
    let sticky = dir(&t.path().join("tmp"), 0o1777, 0);
    let real = dir(&t.path().join("real"), 0o755, 0);
    // /tmp/run -> a root directory, but the link is nobody's: in a sticky
    // directory its owner may delete it and point the path elsewhere.
    let theirs = sticky.join("run");
    link(&theirs, &real, NOBODY);
    refused(&theirs.join("api.sock"), &theirs, "owned by uid 65534");

    // The same link owned by root is followed (its target passes too).
    let ours = sticky.join("run-root");
    link(&ours, &real, 0);
    bound(&ours.join("api.sock")).await;

    // A root link leading to a directory of nobody's is refused at the target.
    let elsewhere = dir(&t.path().join("nobody"), 0o755, NOBODY);
    let to_theirs = t.path().join("to-nobody");
    link(&to_theirs, &elsewhere, 0);
    refused(
        &to_theirs.join("api.sock"),
        &elsewhere,
        "owned by uid 65534",
    );

    // A loop ends with an error, not a hang.
    let (a, b) = (t.path().join("loop-a"), t.path().join("loop-b"));
    link(&a, &b, 0);
    link(&b, &a, 0);
    assert!(bind_unix_socket(&a.join("api.sock"), 0o777).is_err());
}

#[tokio::test]
async fn a_writable_directory_anywhere_on_the_path_is_refused() {
    let Some(t) = scratch() else { return };
    for mode in [0o777, 0o775, 0o757] {
        let open = dir(&t.path().join(format!("open-{mode:o}")), mode, 0);
        // The socket's own directory is fine; the one above it is not.
        let sock_dir = dir(&open.join("run"), 0o755, 0);
        refused(&sock_dir.join("api.sock"), &open, "lets group or others");
    }
    // A parent owned by another user, even if not writable.
    let theirs = dir(&t.path().join("theirs"), 0o755, NOBODY);
    let sock_dir = dir(&theirs.join("run"), 0o755, 0);
    refused(&sock_dir.join("api.sock"), &theirs, "owned by uid 65534");
    // Through `..`, the real parent is what counts.
    let open = t.path().join("open-777");
    refused(
        &open.join("run/../run/api.sock"),
        &open,
        "lets group or others",
    );
    dir(&t.path().join("fine"), 0o755, 0);
    bound(&t.path().join("fine/../fine/api.sock")).await;
}

#[tokio::test]
async fn a_sticky_directory_is_passed_only_to_a_child_of_root_or_ours() {
    let Some(t) = scratch() else { return };
    let sticky = dir(&t.path().join("tmp"), 0o1777, 0);
    // /tmp/theirs/mine/api.sock: nobody can rename `theirs` away.
    let theirs = dir(&sticky.join("theirs"), 0o755, NOBODY);
    let mine = dir(&theirs.join("mine"), 0o755, 0);
    refused(&mine.join("api.sock"), &theirs, "owned by uid 65534");
    // The socket straight in the sticky directory: others can create files
    // next to it (its staging name), so that is refused too.
    refused(&sticky.join("api.sock"), &sticky, "lets group or others");
    // /tmp/ours/api.sock is fine.
    let ours = dir(&sticky.join("ours"), 0o755, 0);
    bound(&ours.join("api.sock")).await;
    // Created when missing, under a checked path.
    bound(&sticky.join("new/run/api.sock")).await;
    let mode = std::fs::metadata(sticky.join("new/run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn data_directories_get_the_same_checks_and_lose_group_and_other_access() {
    let Some(t) = scratch() else { return };
    // An existing directory open to reading is tightened to 0700.
    let data = dir(&t.path().join("data"), 0o755, 0);
    prepare_private_dir(&data, 0o700).unwrap();
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o700);
    // A missing one is created 0700.
    let fresh = t.path().join("fresh/data");
    prepare_private_dir(&fresh, 0o700).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o700);
    // One others can write is refused, not tightened: they may have put
    // files in it.
    let writable = dir(&t.path().join("writable"), 0o777, 0);
    let err = prepare_private_dir(&writable, 0o700).unwrap_err();
    assert!(
        matches!(err, SocketError::UnsafeDataDirectory { .. }),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&writable).unwrap().permissions().mode() & 0o7777,
        0o777
    );
    // Under a directory of another user's, or through their link: refused,
    // and nothing is created there.
    let theirs = dir(&t.path().join("theirs"), 0o755, NOBODY);
    let err = prepare_private_dir(&theirs.join("data"), 0o700).unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    assert!(!theirs.join("data").exists());
    let sticky = dir(&t.path().join("tmp"), 0o1777, 0);
    link(&sticky.join("data"), &data, NOBODY);
    let err = prepare_private_dir(&sticky.join("data"), 0o700).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

/// A listening socket at `path`, made by hand (as another user's service
/// would), owned by `owner`.
fn foreign_socket(path: &Path, owner: u32) -> std::os::unix::net::UnixListener {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    chown(path, Some(owner), None).unwrap();
    l
}

#[tokio::test]
async fn clients_refuse_a_socket_reached_through_another_users_link_or_directory() {
    let Some(t) = scratch() else { return };
    // A service running as uid 65534 in its own directory: fine to call.
    let service = dir(&t.path().join("run/service"), 0o755, NOBODY);
    let _l = foreign_socket(&service.join("api.sock"), NOBODY);
    check_socket_to_connect(&service.join("api.sock")).unwrap();
    // Root's own socket in root's directory, through a root link: fine.
    let root_dir = dir(&t.path().join("root"), 0o755, 0);
    let _r = bind_unix_socket(&root_dir.join("api.sock"), 0o777).unwrap();
    link(&t.path().join("root-link"), &root_dir, 0);
    check_socket_to_connect(&t.path().join("root-link/api.sock")).unwrap();

    // Through a link of theirs in a sticky directory, to root's socket
    // today and to theirs whenever they like: refused.
    let sticky = dir(&t.path().join("tmp"), 0o1777, 0);
    link(&sticky.join("run"), &root_dir, NOBODY);
    let err = check_socket_to_connect(&sticky.join("run/api.sock")).unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    // Under a parent directory of theirs: refused.
    let theirs = dir(&t.path().join("theirs"), 0o755, NOBODY);
    let below = dir(&theirs.join("run"), 0o755, 0);
    let _s = foreign_socket(&below.join("api.sock"), 0);
    let err = check_socket_to_connect(&below.join("api.sock")).unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    // A socket directory others can write, or a socket of a third user's.
    let open = dir(&t.path().join("open"), 0o777, 0);
    let _o = foreign_socket(&open.join("api.sock"), 0);
    assert!(check_socket_to_connect(&open.join("api.sock")).is_err());
    let _x = foreign_socket(&root_dir.join("other.sock"), NOBODY);
    let err = check_socket_to_connect(&root_dir.join("other.sock")).unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
}
