//! What the agent checks before it spends a join token: a socket directory
//! or a data directory that another user could redirect is refused first,
//! so the operator can fix it and start again with the same token.
//! Real server and agent in process, real sockets; runs as root (chown).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{PermissionsExt as _, chown, lchown, symlink};
use std::path::Path;

use common::{Harness, admin, my_uid};
use oxid_proto::admin as admin_pb;

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

async fn new_token(h: &Harness) -> String {
    admin(&h.admin_socket())
        .await
        .create_join_token(admin_pb::CreateJoinTokenRequest::default())
        .await
        .unwrap()
        .into_inner()
        .token
}

/// A harness whose agent has stopped and forgotten its identity: the next
/// start must attest with a new token.
async fn fresh_agent_needed() -> Harness {
    let mut h = Harness::start().await;
    let _ = h.client().await;
    h.stop_agent().await;
    std::fs::remove_dir_all(h.dir.path().join("agent-data")).unwrap();
    h
}

/// The agent started with `token` refuses to start, saying `needle`.
async fn refused(h: &mut Harness, token: &str, needle: &str) {
    h.start_agent(Some(token.to_owned()));
    let err = h.agent_exit().await.unwrap_err().to_string();
    assert!(err.contains(needle), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_socket_directory_is_refused_before_the_token_is_spent() {
    let mut h = fresh_agent_needed().await;
    let run = h.dir.path().join("agent-run");
    set_mode(&run, 0o777);
    let token = new_token(&h).await;
    refused(&mut h, &token, "refusing to use socket directory").await;
    // Fixed: the same token still attests (with nothing saved by the
    // refused start to restore instead).
    let _ = std::fs::remove_dir_all(h.dir.path().join("agent-data"));
    set_mode(&run, 0o755);
    h.start_agent(Some(token));
    let _ = h.client().await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_data_directory_is_refused_before_the_token_is_spent() {
    assert_eq!(
        my_uid(),
        0,
        "this test chowns and must run as root (CI does)"
    );
    let mut h = fresh_agent_needed().await;
    let data = h.dir.path().join("agent-data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o755);
    chown(&data, Some(65534), None).unwrap();
    let token = new_token(&h).await;
    refused(&mut h, &token, "owned by uid 65534").await;
    // Fixed: the same token still attests, and the directory, open to
    // reading before, is the agent's alone.
    chown(&data, Some(0), None).unwrap();
    h.start_agent(Some(token));
    let _ = h.client().await;
    assert_eq!(mode_of(&data), 0o700);
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_cli_refuses_a_socket_reached_through_another_users_link() {
    let h = Harness::start().await;
    let _ = h.client().await;
    let sticky = h.dir.path().join("tmp");
    std::fs::create_dir(&sticky).unwrap();
    set_mode(&sticky, 0o1777);
    let link = sticky.join("agent");
    symlink(h.workload_socket().parent().unwrap(), &link).unwrap();
    lchown(&link, Some(65534), None).unwrap();
    let health = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_oxid-agent"))
            .args(["healthcheck", "--socket-path"])
            .arg(link.join("api.sock"))
            .output()
            .unwrap()
    };
    let out = health();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sent through uid 65534's link");
    assert!(err.contains("owned by uid 65534"), "{err}");
    // Root's own link is followed; the agent answers (once synced).
    lchown(&link, Some(0), None).unwrap();
    common::eventually(|| async {
        let out = health();
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    })
    .await;
}
