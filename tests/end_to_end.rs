//! End to end, with the real binaries as processes: the operator CLI
//! registers workloads on a running `oxid-server`, an `oxid-agent` attests
//! with a join token and serves them, and workloads (the example programs,
//! this test process through the `spiffe` crate, py-spiffe) authenticate
//! each other with mTLS and JWT-SVIDs while certificates rotate, servers
//! restart and agents get banned.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oxid_e2e::{Agent, Proc, Server, WAIT, bin};
use rustls_pki_types::{CertificateDer, ServerName};
use spiffe::{WorkloadApiClient, X509Source};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_stream::StreamExt as _;

const SERVER_ID: &str = "spiffe://example.org/e2e/server";
const TEST_ID: &str = "spiffe://example.org/e2e/test";

/// This test executable, as the agent sees it in `/proc/<pid>/exe`.
fn me() -> PathBuf {
    std::env::current_exe().unwrap().canonicalize().unwrap()
}

fn path_selector(program: &std::path::Path) -> String {
    format!("unix:path:{}", program.display())
}

/// This test's uid as a selector: entries also name the uid their program
/// runs as (an executable alone would match it under any uid).
fn uid_selector() -> String {
    format!("unix:uid:{}", rustix::process::getuid().as_raw())
}

/// Lowercase hex SHA-256 of a file, as `unix:sha256:` wants it.
fn sha256_selector(program: &std::path::Path) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(program).unwrap());
    format!("unix:sha256:{}", oxid_pki::hex(digest.as_ref()))
}

/// The SPIFFE ID and serial of a certificate.
fn identity(der: &[u8]) -> (String, String) {
    let (id, serial) = oxid_pki::x509::leaf_identity(&CertificateDer::from(der.to_vec())).unwrap();
    (id.to_string(), serial)
}

/// Waits (on the agent's events, via retries) until `client` has an SVID.
async fn first_svid(client: &WorkloadApiClient) -> spiffe::X509Svid {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, client.fetch_x509_svid()).await {
            Ok(Ok(svid)) => return svid,
            Ok(Err(e)) if tokio::time::Instant::now() > deadline => panic!("no SVID: {e}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => panic!("the agent never answered"),
        }
    }
}

/// A server and an agent under `dir`, and this test process registered
/// (by its executable) as `TEST_ID` and served: the agent's ID and a client.
async fn serving_this_test(dir: &std::path::Path) -> (Server, Agent, String, WorkloadApiClient) {
    let server = Server::start(dir).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir, &server, &token).await;
    server
        .create_entry(
            TEST_ID,
            &agent_id,
            &[
                "--selector",
                &path_selector(&me()),
                "--selector",
                &uid_selector(),
            ],
        )
        .await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    first_svid(&client).await;
    (server, agent, agent_id, client)
}

type Conn = (
    tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>>,
    tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
);

/// An mTLS connection to the example server; the serial it presented.
async fn connect(connector: &tokio_rustls::TlsConnector, addr: &str) -> (Conn, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("mtls-server").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (id, serial) = identity(&leaf);
    assert_eq!(id, SERVER_ID);
    let (read, write) = tokio::io::split(tls);
    ((BufReader::new(read).lines(), write), serial)
}

async fn ask(conn: &mut Conn, line: &str) -> String {
    conn.1
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    conn.0
        .next_line()
        .await
        .unwrap()
        .expect("the server answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_cli_to_mtls_between_workloads_with_live_rotation() {
    let dir = tempfile::tempdir().unwrap();
    // Other uids must reach the agent's socket (inside this directory).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let server = Server::start(dir.path()).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir.path(), &server, &token).await;
    let ttl = ["--x509-svid-ttl", "8s"];
    for (id, selector) in [
        (SERVER_ID, path_selector(&bin("mtls-server"))),
        (
            "spiffe://example.org/e2e/client",
            sha256_selector(&bin("mtls-client")),
        ),
        (TEST_ID, path_selector(&me())),
    ] {
        let uid = uid_selector();
        let mut args = vec!["--selector", &selector, "--selector", &uid];
        args.extend(ttl);
        server.create_entry(id, &agent_id, &args).await;
    }

    let mut cmd = agent.workload(&bin("mtls-server"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--allow",
        "spiffe://example.org/e2e/client",
    ])
    .args(["--allow", TEST_ID]);
    let mut mtls_server = Proc::spawn("mtls-server", cmd);
    let listening = mtls_server.wait_for("listening on").await;
    let addr = listening.rsplit(' ').next().unwrap().to_owned();

    // The example client, attested by its hash, talks to the example server.
    let mut cmd = agent.workload(&bin("mtls-client"));
    cmd.args(["--connect", &addr, "--server-id", SERVER_ID])
        .args(["--count", "2", "--interval", "0"]);
    let mut client = Proc::spawn("mtls-client", cmd);
    assert_eq!(client.wait().await, Some(0), "{}", client.log());
    assert!(
        client
            .log()
            .contains("hello spiffe://example.org/e2e/client"),
        "{}",
        client.log()
    );

    // This process, through the spiffe crate and spiffe-rustls, keeps one
    // connection open while both sides rotate.
    let source = X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let (my_id, my_first_serial) = identity(source.svid().unwrap().leaf().as_bytes());
    assert_eq!(my_id, TEST_ID);
    let config = spiffe_rustls::mtls_client(source.clone())
        .authorize(spiffe_rustls::exact([SERVER_ID]).unwrap())
        .with_alpn_protocols([b"oxid-demo"])
        .build()
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (mut long_lived, server_first_serial) = connect(&connector, &addr).await;
    assert_eq!(
        ask(&mut long_lived, "first").await,
        format!("hello {TEST_ID}, you said \"first\"")
    );
    let mut updates = source.updated();
    tokio::time::timeout(WAIT, updates.changed())
        .await
        .expect("my SVID rotated")
        .unwrap();
    let (_, my_second_serial) = identity(source.svid().unwrap().leaf().as_bytes());
    assert_ne!(my_second_serial, my_first_serial);
    // New handshakes present the server's rotated certificate, and ours.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (mut fresh, serial) = connect(&connector, &addr).await;
        ask(&mut fresh, "fresh").await;
        if serial != server_first_serial {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never rotated"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mtls_server
        .wait_for(&format!("authorised {TEST_ID} (new handshake"))
        .await;
    // The connection opened before both rotations is still up.
    assert_eq!(
        ask(&mut long_lived, "still there?").await,
        format!("hello {TEST_ID}, you said \"still there?\"")
    );

    // A program with no entry is refused.
    let out = agent.workload(&bin("whoami")).output().await.unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no identity issued"), "whoami: {said}");
    // So is a program under another uid (nobody), with no entry of its own,
    // even though this test's uid holds identities.
    let out = agent
        .workload(std::path::Path::new("setpriv"))
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin("whoami"))
        .output()
        .await
        .expect("setpriv (util-linux) is required; this test runs as root, as CI does");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no identity issued"),
        "whoami as nobody: {said}"
    );
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwt_svids_between_the_example_programs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir.path(), &server, &token).await;
    const API: &str = "spiffe://example.org/e2e/api";
    const CALLER: &str = "spiffe://example.org/e2e/caller";
    for (id, program) in [(API, "jwt-server"), (CALLER, "jwt-client")] {
        let selector = path_selector(&bin(program));
        server
            .create_entry(
                id,
                &agent_id,
                &["--selector", &selector, "--selector", &uid_selector()],
            )
            .await;
    }
    let mut cmd = agent.workload(&bin("jwt-server"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--audience",
        API,
        "--allow",
        CALLER,
    ]);
    let mut jwt_server = Proc::spawn("jwt-server", cmd);
    let listening = jwt_server.wait_for("listening on").await;
    let url = format!("http://{}/", listening.rsplit(' ').next().unwrap());

    let call = |audience: &'static str| {
        let mut cmd = agent.workload(&bin("jwt-client"));
        cmd.args(["--url", &url, "--audience", audience]);
        cmd
    };
    let mut ok = Proc::spawn("jwt-client", call(API));
    assert_eq!(ok.wait().await, Some(0), "{}", ok.log());
    jwt_server.wait_for(&format!("authorised {CALLER}")).await;
    let mut wrong = Proc::spawn("jwt-client", call("spiffe://example.org/someone-else"));
    assert_ne!(wrong.wait().await, Some(0), "{}", wrong.log());
    jwt_server.wait_for("refused a request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_keep_identities_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, mut agent, agent_id, client) = serving_this_test(dir.path()).await;
    let mut stream = Box::pin(client.stream_x509_contexts().await.unwrap());
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 1);

    // Server down: the workload still gets its SVID from the agent.
    server.stop().await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), TEST_ID);

    // Server back: the agent reconnects by itself and the open stream
    // carries an entry created after the restart.
    server.restart().await;
    server
        .create_entry(
            "spiffe://example.org/e2e/second",
            &agent_id,
            &[
                "--selector",
                &path_selector(&me()),
                "--selector",
                &uid_selector(),
            ],
        )
        .await;
    let next = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream carried the new entry")
        .unwrap()
        .unwrap();
    let ids: Vec<String> = next
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(ids, [TEST_ID, "spiffe://example.org/e2e/second"]);

    // Agent restart: no token, same agent, same identities.
    agent.stop().await;
    agent.restart(&server).await;
    let agents = server.cli(&["agent", "list"]).await;
    let listed: Vec<&str> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [agent_id.as_str()]);
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    first_svid(&client).await;
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_banned_agent_stops_getting_new_svids() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let (token, agent_id) = server.join_token().await;
    let mut agent = Agent::start(dir.path(), &server, &token).await;
    let selector = path_selector(&me());
    server
        .create_entry(
            TEST_ID,
            &agent_id,
            &[
                "--selector",
                &selector,
                "--selector",
                &uid_selector(),
                "--x509-svid-ttl",
                "6s",
            ],
        )
        .await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let before = first_svid(&client).await;
    // Healthy: the SVID rotates.
    let mut stream = Box::pin(client.stream_x509_contexts().await.unwrap());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ctx.svids()[0].leaf().as_bytes() != before.leaf().as_bytes() {
            break;
        }
    }

    server
        .cli(&["agent", "ban", "--spiffe-id", &agent_id])
        .await;
    agent.proc.wait_for("agent is banned").await;
    // From now on the SVID in hand is the last: the open stream never
    // carries another, and when it expires the stream says so rather than
    // leaving the workload with an expired certificate.
    let last = client.fetch_x509_svid().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let refusal = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(ctx))) => assert_eq!(
                ctx.svids()[0].leaf().as_bytes(),
                last.leaf().as_bytes(),
                "a banned agent got a new SVID"
            ),
            Ok(Some(Err(e))) => break e.to_string(),
            Ok(None) => panic!("the stream ended without a status"),
            Err(_) => panic!("the last SVID never expired, or the agent went silent"),
        }
    };
    assert!(
        refusal.contains("expired before the agent could renew"),
        "{refusal}"
    );
    // A call made now waits a bounded time, then is told why.
    let err = tokio::time::timeout(WAIT, client.fetch_x509_svid())
        .await
        .expect("the agent answered within its first-message wait")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no valid SVID"), "{err}");
    assert!(
        agent.proc.is_running(),
        "the agent keeps running:\n{}",
        agent.proc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn py_spiffe_against_the_agent_binary() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir.path(), &server, &token).await;
    // The interpreter the venv links to is the executable the agent sees.
    let interpreter = python.canonicalize().unwrap();
    server
        .create_entry(
            "spiffe://example.org/python",
            &agent_id,
            &[
                "--selector",
                &path_selector(&interpreter),
                "--selector",
                &uid_selector(),
            ],
        )
        .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/workload_check.py");
    let deadline = tokio::time::Instant::now() + WAIT;
    let out = loop {
        let out = agent
            .workload(&python)
            .arg(&script)
            .arg(agent.endpoint())
            .arg("spiffe://example.org/db")
            .output()
            .await
            .unwrap();
        // Until the entry reaches the agent, py-spiffe is refused.
        if out.status.success() || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(v["chain_len"], 1);
    assert_eq!(v["bundle_authorities"], 1);
    assert_eq!(v["jwt_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(
        v["jwt_audience"],
        serde_json::json!(["spiffe://example.org/db"])
    );
    assert_eq!(v["validated_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(v["jwt_bundle"], true);
}

/// The python with py-spiffe: `target/py-venv` (made by `scripts/test`) or
/// `OXID_PYTHON`.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("OXID_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv/bin/python");
    assert!(
        venv.exists(),
        "py-spiffe is required: run ./scripts/test, which installs it, or \
         python3 -m venv target/py-venv && target/py-venv/bin/pip install -r \
         tests/py/requirements.txt (expected at {}), or set OXID_PYTHON",
        venv.display()
    );
    venv
}

/// The README's backup: stop the server, copy its data directory. Restored
/// on another host (another directory and port), it is the same CA with the
/// same entries and agents, and an agent pointed at it carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_restored_on_another_host_serves_the_same_identities() {
    let old_host = tempfile::tempdir().unwrap();
    let (mut server, mut agent, agent_id, _) = serving_this_test(old_host.path()).await;
    let bundle = server.cli(&["bundle", "show", "--format", "spiffe"]).await;

    server.stop().await;
    let new_host = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(old_host.path().join("server"))
        .arg(new_host.path().join("server"))
        .status()
        .unwrap();
    assert!(copied.success());
    let restored = Server::start(new_host.path()).await;
    assert_eq!(
        restored
            .cli(&["bundle", "show", "--format", "spiffe"])
            .await,
        bundle,
        "the same CA"
    );
    let agents = restored.cli(&["agent", "list"]).await;
    assert_eq!(agents["agents"][0]["spiffe_id"], agent_id.as_str());
    let entries = restored.cli(&["entry", "show"]).await;
    assert_eq!(entries["entries"][0]["spiffe_id"], TEST_ID);

    // The agent, pointed at the restored server, keeps its identity, and
    // what the restored server learns next reaches the workload.
    agent.stop().await;
    agent.restart(&restored).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    assert_eq!(first_svid(&client).await.spiffe_id().to_string(), TEST_ID);
    restored
        .create_entry(
            "spiffe://example.org/e2e/after-restore",
            &agent_id,
            &[
                "--selector",
                &path_selector(&me()),
                "--selector",
                &uid_selector(),
            ],
        )
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while client
        .fetch_x509_context()
        .await
        .map_or(0, |c| c.svids().len())
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new entry never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
