//! The agent's own identity: eviction and recovery with a new join token,
//! readiness and `healthcheck` while refused, the one identity file (its
//! checks on load, the move from the old two-file layout), and the local
//! checks that come before a join token is spent. Real server and agent in
//! process, real sockets; the CLI as a process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::{Harness, admin, eventually, http_get};
use oxid_proto::admin as admin_pb;

const IDENTITY_FILE: &str = "agent-identity.pem";

/// A new join token; the agent ID it gives.
async fn new_token(h: &Harness) -> (String, String) {
    let t = admin(&h.admin_socket())
        .await
        .create_join_token(admin_pb::CreateJoinTokenRequest::default())
        .await
        .unwrap()
        .into_inner();
    (
        t.token,
        format!("spiffe://example.org/oxid/agent/join_token/{}", t.id),
    )
}

fn free_port() -> std::net::SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// `oxid-agent healthcheck [extra]` on the harness's socket: success, stderr.
fn healthcheck(h: &Harness, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oxid-agent"))
        .arg("healthcheck")
        .args(extra)
        .arg("--socket-path")
        .arg(h.workload_socket())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ready_status(metrics: std::net::SocketAddr) -> Result<u16, String> {
    let answer = http_get(metrics, "/ready").await?;
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evicted_agent_stays_serving_not_ready_and_recovers_with_a_new_token() {
    let mut h = Harness::start().await;
    let _ = h.with_web_identity().await;
    h.stop_agent().await;
    let metrics = free_port();
    h.start_agent_with_metrics(metrics);
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    eventually(|| async {
        match ready_status(metrics).await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually(|| async {
        match healthcheck(&h, &[]) {
            (true, _) => Ok(()),
            (false, e) => Err(e),
        }
    })
    .await;

    admin(&h.admin_socket())
        .await
        .evict_agent(admin_pb::AgentRequest {
            spiffe_id: h.agent_id.clone(),
        })
        .await
        .unwrap();
    // Running: not ready, and healthcheck agrees; alive, and still serving
    // the workload's unexpired SVID.
    eventually(|| async {
        match ready_status(metrics).await {
            Ok(503) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually(|| async {
        match healthcheck(&h, &[]) {
            (false, e) if e.contains("not ready") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (alive, e) = healthcheck(&h, &["--shallow"]);
    assert!(alive, "--shallow: {e}");
    let svid = h.client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    h.stop_agent().await;

    // Restarted without a token: exits, naming the fix.
    h.start_agent(None);
    let err = h.agent_exit().await.unwrap_err().to_string();
    assert!(
        err.contains("not attested") && err.contains("new join token"),
        "{err}"
    );

    // Restarted with a new token on the old data directory: attests with
    // it and serves again.
    let (token, id) = new_token(&h).await;
    h.agent_id = id;
    h.start_agent(Some(token));
    let client = h.with_web_identity().await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    h.stop_agent().await;
}

/// Key PEM block and certificate PEM blocks of the identity file.
fn split_identity(dir: &Path) -> (String, String) {
    let text = std::fs::read_to_string(dir.join(IDENTITY_FILE)).unwrap();
    let end = text.find("-----END PRIVATE KEY-----").unwrap() + 25;
    let (key, certs) = text.split_at(end);
    (format!("{key}\n"), certs.trim_start().to_owned())
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_identity_is_one_private_file_checked_on_load() {
    let mut h = Harness::start().await;
    let _ = h.with_web_identity().await;
    h.stop_agent().await;
    let data = h.dir.path().join("agent-data");
    assert_eq!(mode_of(&data.join(IDENTITY_FILE)), 0o600);
    assert!(!data.join("agent.key").exists());
    assert!(!data.join("agent-svid.pem").exists());
    let (key, certs) = split_identity(&data);

    // A key that is not the certificate's (a crash between two writes in
    // the old layout) is refused without a token...
    let other = oxid_pki::KeyPair::generate(oxid_pki::KeyAlgorithm::EcdsaP256).unwrap();
    let mismatched = format!("{}{certs}", other.to_pkcs8_pem().as_str());
    oxid_pki::key::write_private(&data.join(IDENTITY_FILE), mismatched.as_bytes()).unwrap();
    h.start_agent(None);
    let err = h.agent_exit().await.unwrap_err().to_string();
    assert!(err.contains("is not the key of its saved SVID"), "{err}");
    assert!(err.contains("new join token"), "{err}");

    // ...and so is a chain that does not verify against the bundle (here:
    // another server's CA as the only bundle the agent has).
    oxid_pki::key::write_private(
        &data.join(IDENTITY_FILE),
        format!("{key}{certs}").as_bytes(),
    )
    .unwrap();
    let saved_bundle = std::fs::read(data.join("bundle.json")).unwrap();
    std::fs::remove_file(data.join("bundle.json")).unwrap();
    let bootstrap = h.dir.path().join("bundle.pem");
    let ours = std::fs::read(&bootstrap).unwrap();
    let stranger = Harness::start().await;
    std::fs::copy(stranger.dir.path().join("bundle.pem"), &bootstrap).unwrap();
    drop(stranger);
    h.start_agent(None);
    let err = h.agent_exit().await.unwrap_err().to_string();
    assert!(
        err.contains("does not verify against the trust bundle"),
        "{err}"
    );
    std::fs::write(&bootstrap, ours).unwrap();
    oxid_pki::key::write_private(&data.join("bundle.json"), &saved_bundle).unwrap();

    // The old two-file layout is read once and moved into the one file.
    std::fs::remove_file(data.join(IDENTITY_FILE)).unwrap();
    oxid_pki::key::write_private(&data.join("agent.key"), key.as_bytes()).unwrap();
    std::fs::write(data.join("agent-svid.pem"), &certs).unwrap();
    h.start_agent(None);
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    h.stop_agent().await;
    assert_eq!(mode_of(&data.join(IDENTITY_FILE)), 0o600);
    assert!(!data.join("agent.key").exists());
    assert!(!data.join("agent-svid.pem").exists());

    // A mismatched pair with a token given: attests again and serves.
    let (_, certs) = split_identity(&data);
    let mismatched = format!("{}{certs}", other.to_pkcs8_pem().as_str());
    oxid_pki::key::write_private(&data.join(IDENTITY_FILE), mismatched.as_bytes()).unwrap();
    let (token, id) = new_token(&h).await;
    h.agent_id = id;
    h.start_agent(Some(token));
    let _ = h.with_web_identity().await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_would_fail_at_bind_is_refused_before_the_token_is_spent() {
    let mut h = Harness::start().await;
    let _ = h.client().await;
    h.stop_agent().await;
    let data = h.dir.path().join("agent-data");
    std::fs::remove_dir_all(&data).unwrap();
    let (token, id) = new_token(&h).await;
    h.agent_id = id;

    // A file that is not a socket at the socket path.
    std::fs::write(h.workload_socket(), b"not a socket").unwrap();
    h.start_agent(Some(token.clone()));
    let err = h.agent_exit().await.unwrap_err().to_string();
    assert!(err.contains("not a socket is in the way"), "{err}");
    std::fs::remove_file(h.workload_socket()).unwrap();

    // Fixed: the same token still attests.
    let _ = std::fs::remove_dir_all(&data);
    h.start_agent(Some(token));
    let _ = h.with_web_identity().await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_file_is_read_and_checked() {
    let mut h = Harness::start().await;
    let _ = h.client().await;
    h.stop_agent().await;
    let data = h.dir.path().join("agent-data");
    std::fs::remove_dir_all(&data).unwrap();
    let (token, id) = new_token(&h).await;
    h.agent_id = id;
    let file = h.dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();

    // Readable by others: refused as the configuration is read, before
    // anything else.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oxid-agent"))
        .args(["run", "--join-token-file"])
        .arg(&file)
        .args(["--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("mode 0644"), "{err}");
    // Both ways at once: refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oxid-agent"))
        .args(["run", "--join-token", "x", "--join-token-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 0600, with its trailing newline: attests.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    h.agent_extra.join_token_file = Some(file);
    h.start_agent(None);
    let _ = h.with_web_identity().await;
    h.stop_agent().await;
}
