//! The `oxid-server` binary end to end: a real server process on a temp dir,
//! driven by the real CLI over the real admin socket. Every command round
//! trips; every bad input is one error line, a non-zero exit, and no change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_oxid-server");
const AGENT: &str = "spiffe://example.org/oxid/agent/join_token/abc";

struct Server {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Server {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/admin.sock")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts a server with `extra` config lines and waits until it answers.
    fn start(extra_config: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra_config)
    }

    /// As [`Server::start`], in `dir` (whose `data/` may be prepared).
    fn start_in(dir: tempfile::TempDir, extra_config: &str) -> Self {
        // Traversable, so the unprivileged-uid test can reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut s = Self { dir, child: None };
        std::fs::write(s.dir.path().join("server.toml"), extra_config).unwrap();
        s.spawn();
        s
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) {
        // One log per run, in JSON, so the listen addresses can be read back.
        let log = std::fs::File::create(self.log()).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--log-format", "json", "--config"])
            .arg(self.dir.path().join("server.toml"))
            .arg("--data-dir")
            .arg(self.data())
            .arg("--socket-path")
            .arg(self.socket())
            .args(["--bind-address", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits for the healthcheck to pass: the event, not a fixed sleep.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.cli(&["healthcheck"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited early: {status}");
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            child.wait().unwrap();
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket-path")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Runs a command that must fail: one error line, non-zero exit.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one error line, got:\n{stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
        stderr
    }

    fn entry_count(&self) -> u64 {
        self.json(&["entry", "count"])["count"].as_u64().unwrap()
    }

    /// A field of this run's "oxid-server ready" log line (an address).
    fn ready_field(&self, field: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(self.log()).unwrap();
            let ready = log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["fields"]["message"] == "oxid-server ready");
            if let Some(line) = ready {
                return line["fields"][field].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "no ready line in {log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn bundle(&self) -> oxid_pki::bundle::Bundle {
        let td = oxid_pki::TrustDomain::new("example.org").unwrap();
        let json = self.ok(&["bundle", "show", "--format", "spiffe"]);
        oxid_pki::bundle::Bundle::from_spiffe_json(td, json.as_bytes()).unwrap()
    }

    /// Attests an agent with `token` over this run's agent API.
    async fn attest(&self, token: &str) -> Result<support::Agent, tonic::Status> {
        let addr = self.ready_field("agent_api").parse().unwrap();
        attest_at(addr, self.bundle(), token).await
    }

    /// `agent list` as SPIFFE ID → banned.
    fn agents(&self) -> BTreeMap<String, bool> {
        self.json(&["agent", "list"])["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let banned = a["banned"].as_bool().unwrap_or(false);
                (a["spiffe_id"].as_str().unwrap().to_owned(), banned)
            })
            .collect()
    }
}

async fn attest_at(
    addr: std::net::SocketAddr,
    bundle: oxid_pki::bundle::Bundle,
    token: &str,
) -> Result<support::Agent, tonic::Status> {
    let client = support::agent_api_client(addr, bundle, support::SERVER_ID, None)
        .await
        .map_err(tonic::Status::unavailable)?;
    support::attest_token_with(client, token, |csr| csr).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn create_args<'a>(spiffe_id: &'a str, selector: &'a str) -> Vec<&'a str> {
    vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        AGENT,
        "--selector",
        selector,
    ]
}

#[test]
fn entry_commands_round_trip() {
    let s = Server::start("");
    let created = s.json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:path:/usr/bin/web",
        "--x509-svid-ttl",
        "30m",
        "--jwt-svid-ttl",
        "5m",
        "--dns-name",
        "web.example.org",
        "--federates-with",
        "partner.example",
        "--hint",
        "primary",
    ]);
    let entry = &created["results"][0]["entry"];
    let id = entry["id"].as_str().unwrap().to_owned();
    assert_eq!(entry["x509_svid_ttl"], 1800);
    assert_eq!(entry["selectors"].as_array().unwrap().len(), 2);

    let shown = s.json(&["entry", "show", "--entry-id", &id]);
    assert_eq!(shown["entries"][0]["hint"], "primary");
    let pretty = s.ok(&["entry", "show", "--spiffe-id", "spiffe://example.org/web"]);
    assert!(
        pretty.contains("Found 1 entry") && pretty.contains(&id),
        "{pretty}"
    );
    let by_sel = s.json(&["entry", "show", "--selector", "unix:uid:1000"]);
    assert_eq!(by_sel["entries"].as_array().unwrap().len(), 1);
    let exact = s.json(&["entry", "show", "--selector", "unix:uid:1000", "--exact"]);
    assert_eq!(exact["entries"].as_array().unwrap().len(), 0);

    let updated = s.json(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--spiffe-id",
        "spiffe://example.org/web2",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1001",
    ]);
    assert_eq!(updated["spiffe_id"], "spiffe://example.org/web2");
    assert_eq!(s.entry_count(), 1);

    s.ok(&["entry", "delete", "--entry-id", &id]);
    assert_eq!(s.entry_count(), 0);
}

#[test]
fn batches_from_a_file_and_from_stdin() {
    let s = Server::start("");
    let batch = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/a", "parent_id": AGENT, "selectors": ["unix:uid:1"]},
        {"spiffe_id": "spiffe://example.org/b", "parent_id": AGENT, "selectors": ["unix:uid:2"]},
    ]});
    let file = s.dir.path().join("batch.json");
    std::fs::write(&file, batch.to_string()).unwrap();
    s.ok(&["entry", "create", "--data", file.to_str().unwrap()]);
    assert_eq!(s.entry_count(), 2);

    let stdin_batch = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/c", "parent_id": AGENT, "selectors": ["unix:uid:3"]},
        {"spiffe_id": "spiffe://example.org/a", "parent_id": AGENT, "selectors": ["unix:uid:1"]},
    ]});
    let mut child = Command::new(BIN)
        .args(["entry", "create", "--data", "-", "--socket-path"])
        .arg(s.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin_batch.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "one duplicate fails the command");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("1 of 2 entries failed"),
        "{err}"
    );
    assert_eq!(
        s.entry_count(),
        3,
        "the good entry of the batch was created"
    );
}

#[test]
fn impossible_and_exe_only_selectors_are_refused_unless_allowed() {
    let s = Server::start("");
    let hash = format!("unix:sha256:{}", "ab".repeat(32));
    for (selector, needle) in [
        ("unix:uid:-1", "decimal number"),
        ("unix:uid:", "empty"),
        ("unix:gid:wheel", "decimal number"),
        ("unix:uid:01000", "decimal number"),
        ("unix:sha256:abc", "64 lowercase hex"),
        ("unix:path:usr/bin/web", "absolute"),
        ("unix:pid:7", "unix keys are"),
    ] {
        let mut args = create_args("spiffe://example.org/x", selector);
        args.push("--allow-exe-only");
        let err = s.fails(&args);
        assert!(
            err.contains("can never match") && err.contains(needle),
            "{selector}: {err}"
        );
    }
    // Exe-only: refused with the reason and the flag, then accepted with it.
    for selector in ["unix:path:/usr/bin/web", hash.as_str()] {
        let err = s.fails(&create_args("spiffe://example.org/exe", selector));
        assert!(
            err.contains("--allow-exe-only") && err.contains("any user's process"),
            "{err}"
        );
    }
    assert_eq!(s.entry_count(), 0, "nothing stored");
    let mut args = create_args("spiffe://example.org/exe", "unix:path:/usr/bin/web");
    args.push("--allow-exe-only");
    let created = s.json(&args);
    let id = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Update follows the same rule.
    let update = |extra: &[&str]| {
        let mut a = vec![
            "entry",
            "update",
            "--entry-id",
            &id,
            "--spiffe-id",
            "spiffe://example.org/exe",
            "--parent-id",
            AGENT,
            "--selector",
            &hash,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let args = update(&[]);
    let err = s.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("--allow-exe-only"), "{err}");
    let args = update(&["--allow-exe-only"]);
    s.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = update(&["--selector", "unix:uid:1000"]);
    s.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A batch: refused entry by entry, or all accepted with the flag.
    let batch = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/b1", "parent_id": AGENT, "selectors": [hash]},
        {"spiffe_id": "spiffe://example.org/b2", "parent_id": AGENT,
         "selectors": [hash, "unix:uid:1"]},
        {"spiffe_id": "spiffe://example.org/b3", "parent_id": AGENT, "selectors": ["unix:uid:-1"]},
    ]});
    let file = s.dir.path().join("batch.json");
    std::fs::write(&file, batch.to_string()).unwrap();
    let out = s.cli(&["entry", "create", "--data", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("2 of 3 entries failed"),
        "{err}"
    );
    assert!(
        err.contains("--allow-exe-only") && err.contains("can never match"),
        "{err}"
    );
    assert_eq!(s.entry_count(), 2);
    let out = s.cli(&[
        "entry",
        "create",
        "--allow-exe-only",
        "--data",
        file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 of 3 entries failed"),
        "b2 exists, b3 is impossible: {err}"
    );
    assert_eq!(s.entry_count(), 3);
}

#[test]
fn bad_input_is_one_error_line_and_changes_nothing() {
    let s = Server::start("");
    s.ok(&create_args("spiffe://example.org/web", "unix:uid:1000"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (create_args("web", "unix:uid:1"), "--spiffe-id"),
        (
            create_args("spiffe://example.org/oxid/agent/x", "unix:uid:1"),
            "reserved",
        ),
        (
            create_args("spiffe://other.org/web", "unix:uid:1"),
            "not in trust domain",
        ),
        (create_args("spiffe://example.org/x", "nocolon"), "selector"),
        (
            create_args("spiffe://example.org/web", "unix:uid:1000"),
            "already exists",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
            ],
            "at least one selector",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:9",
                "--x509-svid-ttl",
                "5h",
            ],
            "maximum",
        ),
        (
            vec!["entry", "create", "--data", "/nonexistent/batch.json"],
            "cannot read",
        ),
        (
            vec!["entry", "delete", "--entry-id", "0123456789abcdef"],
            "not found",
        ),
        (vec!["entry", "delete", "--entry-id", "bad id"], "entry ID"),
        (
            vec!["entry", "show", "--entry-id", "0123456789abcdef"],
            "not found",
        ),
        (vec!["entry", "show", "--entry-id", "bad id"], "entry ID"),
        (
            vec![
                "entry",
                "update",
                "--entry-id",
                "0123456789abcdef",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "not found",
        ),
        (
            vec![
                "entry",
                "update",
                "--entry-id",
                "bad id",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "entry ID",
        ),
        (vec!["agent", "show", "--spiffe-id", AGENT], "not found"),
        (vec!["agent", "evict", "--spiffe-id", AGENT], "not found"),
        (vec!["agent", "evict", "--spiffe-id", "nope"], "spiffe_id"),
        (
            vec!["x509", "mint", "--spiffe-id", "spiffe://example.org/oxid/x"],
            "reserved",
        ),
        (vec!["agent", "ban", "--spiffe-id", "nope"], "spiffe_id"),
        (
            vec![
                "token",
                "generate",
                "--spiffe-id",
                "spiffe://example.org/oxid/x",
            ],
            "reserved",
        ),
        (vec!["token", "generate", "--ttl", "30d"], "maximum"),
        (
            vec![
                "bundle",
                "set",
                "--id",
                "example.org",
                "--path",
                "/dev/null",
            ],
            "own trust domain",
        ),
        (
            vec![
                "bundle",
                "set",
                "--id",
                "partner.example",
                "--path",
                "/nonexistent",
            ],
            "cannot read",
        ),
        (
            vec!["bundle", "delete", "--id", "partner.example"],
            "not found",
        ),
        (
            vec![
                "jwt",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/web",
                "--audience",
                "",
            ],
            "audience",
        ),
        (
            vec!["x509", "mint", "--spiffe-id", "spiffe://example.org"],
            "no path",
        ),
        (vec!["ca", "rotate", "--activate"], "no prepared authority"),
        (
            vec!["ca", "rotate", "--taint", "1"],
            "only a retired authority",
        ),
    ];
    for (args, needle) in cases {
        let err = s.fails(&args);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
    }
    let empty_bundle = s.dir.path().join("empty.pem");
    std::fs::write(&empty_bundle, "not a bundle").unwrap();
    s.fails(&[
        "bundle",
        "set",
        "--id",
        "partner.example",
        "--path",
        empty_bundle.to_str().unwrap(),
    ]);
    assert_eq!(s.entry_count(), 1, "nothing changed");
    assert_eq!(
        s.json(&["bundle", "list"])["bundles"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Argument errors from the parser also exit non-zero.
    assert!(
        !s.cli(&["entry", "create", "--no-such-flag"])
            .status
            .success()
    );
    let down = Command::new(BIN)
        .args(["entry", "count", "--socket-path", "/nonexistent/admin.sock"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach the server"));
}

#[test]
fn tokens_bundles_svids_and_the_ca() {
    let s = Server::start("");
    let token = s.ok(&["token", "generate"]);
    assert_eq!(token.trim().len(), 64);
    let t = s.json(&[
        "token",
        "generate",
        "--ttl",
        "1h",
        "--spiffe-id",
        "spiffe://example.org/nodes/a",
    ]);
    assert_eq!(t["id"].as_str().unwrap().len(), 16);
    assert!(
        !t["token"]
            .as_str()
            .unwrap()
            .contains(t["id"].as_str().unwrap())
    );

    let pem = s.ok(&["bundle", "show"]);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let spiffe: serde_json::Value =
        serde_json::from_str(&s.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(
        spiffe["keys"].as_array().unwrap().len(),
        2,
        "one X.509 and one JWT authority"
    );

    // A federated bundle from PEM (another server's root).
    let other = Server::start("trust_domain = \"partner.example\"\n");
    let partner_pem = other.dir.path().join("partner.pem");
    std::fs::write(&partner_pem, other.ok(&["bundle", "show"])).unwrap();
    s.ok(&[
        "bundle",
        "set",
        "--id",
        "partner.example",
        "--path",
        partner_pem.to_str().unwrap(),
    ]);
    let list = s.json(&["bundle", "list"]);
    assert_eq!(list["bundles"][0]["trust_domain"], "partner.example");
    s.ok(&["bundle", "delete", "--id", "partner.example"]);

    // An X509-SVID written to disk verifies with openssl against the bundle.
    let out = s.dir.path().join("svid");
    std::fs::create_dir(&out).unwrap();
    s.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--write",
        out.to_str().unwrap(),
    ]);
    let key_mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .expect("openssl is required (apt-get install -y openssl, or run ./scripts/test)");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let jwt = s.ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "db",
    ]);
    assert_eq!(jwt.trim().split('.').count(), 3);

    let ca = s.json(&["ca", "show"]);
    assert_eq!(ca["authorities"][0]["state"], "active");
    s.ok(&["ca", "rotate", "--prepare"]);
    s.ok(&["ca", "rotate", "--activate"]);
    let ca = s.json(&["ca", "rotate", "--taint", "1"]);
    assert_eq!(ca["authorities"][0]["tainted"], true);
    assert_eq!(ca["authorities"][1]["state"], "active");
    assert_eq!(s.json(&["agent", "count"])["count"], 0);
    assert_eq!(
        s.json(&["agent", "list"])["agents"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn a_restart_keeps_entries_and_the_ca() {
    let mut s = Server::start("");
    s.ok(&create_args("spiffe://example.org/web", "unix:uid:1"));
    let bundle = s.ok(&["bundle", "show", "--format", "spiffe"]);
    s.stop();
    assert!(!s.socket().exists(), "a clean stop removes the socket");
    s.spawn();
    assert_eq!(s.entry_count(), 1);
    assert_eq!(
        s.ok(&["bundle", "show", "--format", "spiffe"]),
        bundle,
        "same CA"
    );
}

#[test]
fn kill_9_loses_no_acknowledged_entry() {
    let mut s = Server::start("");
    let socket = s.socket();
    let (acks, acked) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        for i in 0..10_000 {
            let sid = format!("spiffe://example.org/burst/{i}");
            let out = Command::new(BIN)
                .args([
                    "entry",
                    "create",
                    "--output",
                    "json",
                    "--spiffe-id",
                    &sid,
                    "--parent-id",
                    AGENT,
                ])
                .args(["--selector", "unix:uid:1", "--socket-path"])
                .arg(&socket)
                .output()
                .unwrap();
            if !out.status.success() {
                break; // the server is gone
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            acknowledged.push(v["results"][0]["entry"]["id"].as_str().unwrap().to_owned());
            let _ = acks.send(());
        }
        acknowledged
    });
    // Kill once 20 writes are acknowledged, counted as the writer sees its
    // answers: counting stored entries killed the server before the 20th
    // answer under load.
    for _ in 0..20 {
        acked
            .recv_timeout(Duration::from_secs(60))
            .expect("the burst of writes started");
    }
    s.kill9();
    let acknowledged = writer.join().unwrap();
    assert!(acknowledged.len() >= 20);
    s.spawn();
    let stored = s.json(&["entry", "show"]);
    let ids: std::collections::HashSet<&str> = stored["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    for id in &acknowledged {
        assert!(
            ids.contains(id.as_str()),
            "acknowledged entry {id} was lost"
        );
    }
}

fn run_as_nobody(s: &Server, args: &[&str]) -> Output {
    assert_eq!(
        oxid_server::admin::current_uid().unwrap(),
        0,
        "this test switches to uid 65534 and must run as root (CI does; run ./scripts/test as root)"
    );
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
        ])
        .args(args)
        .arg("--socket-path")
        .arg(s.socket())
        .output()
        .expect("setpriv (util-linux) is required")
}

#[test]
fn the_admin_socket_refuses_other_uids_unless_allowed() {
    let s = Server::start("");
    let out = run_as_nobody(&s, &["entry", "count"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 65534 may not use the admin API"), "{err}");
    assert!(err.contains("PermissionDenied"), "{err}");

    let allowed = Server::start("admin_uids = [65534]\n");
    let out = run_as_nobody(&allowed, &["entry", "count"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_checks_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "trust_domain = \"prod.example\"\n[ca]\nttl = \"12h\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("prod.example"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "trust_domian = \"x\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("trust_domian"), "{err}");
    // Limits of 0, or absurd ones, are refused naming the setting.
    for (text, key) in [
        ("max_csrs_per_call = 0\n", "max_csrs_per_call"),
        ("max_admin_batch = 10000000\n", "max_admin_batch"),
        ("max_request_kib = 1\n", "max_request_kib"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = Command::new(BIN)
            .args(["validate", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(key) && err.contains("between"), "{err}");
    }
}

#[test]
fn an_unsafe_socket_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock_dir = dir.path().join("open");
    std::fs::create_dir(&sock_dir).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(sock_dir.join("admin.sock"))
        .args(["--bind-address", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to use socket directory"), "{err}");
    let _ = Path::new("");
}

#[test]
fn the_cli_refuses_a_socket_reached_through_another_users_link() {
    use std::os::unix::fs::{lchown, symlink};
    let s = Server::start("");
    // A sticky, world-writable directory (like /tmp) with a link of uid
    // 65534's to the server's socket directory: today it leads to the real
    // server; its owner may point it at their own socket at any time.
    let sticky = s.dir.path().join("tmp");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let link = sticky.join("oxid");
    symlink(s.socket().parent().unwrap(), &link).unwrap();
    lchown(&link, Some(65534), None).unwrap();
    let via_link = link.join("admin.sock");
    let out = Command::new(BIN)
        .args(["entry", "count", "--socket-path"])
        .arg(&via_link)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sent through uid 65534's link");
    assert!(
        err.contains("refusing to use socket directory") && err.contains("owned by uid 65534"),
        "{err}"
    );
    // Root's own link to the same place is fine.
    lchown(&link, Some(0), None).unwrap();
    let out = Command::new(BIN)
        .args(["entry", "count", "--socket-path"])
        .arg(&via_link)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small tmpfs mounted for the length of a test.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            // A tmpfs root is 1777 unless told: the server refuses a data
            // directory others can write.
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and must run as root, as CI does: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `oxid-server entry show | head -0`: the reader is gone before the first
/// line. The command ends quietly, where `println!` used to panic.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let s = Server::start("");
    for i in 0..3 {
        assert!(create_numbered(&s, i).status.success());
    }
    for output in ["pretty", "json"] {
        let mut child = Command::new(BIN)
            .args(["entry", "show", "--output", output, "--socket-path"])
            .arg(s.socket())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the command has even reached the server.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{output}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{output}: {stderr}");
    }
}

fn create_numbered(s: &Server, i: usize) -> Output {
    s.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://example.org/w{i}"),
        "--parent-id",
        AGENT,
        "--selector",
        &format!("unix:uid:{i}"),
    ])
}

#[test]
fn a_full_disk_refuses_writes_clearly_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _mount = Tmpfs::mount(&data, "4m");
    let mut s = Server::start_in(dir, "metrics_address = \"127.0.0.1:0\"\n");
    // Fill the filesystem, then leave about 40 KB.
    let filler = data.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(40 * 1024)).unwrap();
    }
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..5000 {
        let out = create_numbered(&s, i);
        if out.status.success() {
            acknowledged.push(format!("spiffe://example.org/w{i}"));
        } else {
            refusal = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let refusal = refusal.expect("the disk filled up");
    assert_first_refusal(&refusal, "No space left on device");
    // Freeing space does not bring writes back by surprise: they stay
    // refused, clearly, until a restart. Reads are still served.
    std::fs::remove_file(&filler).unwrap();
    let again = s.fails(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/later",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1",
    ]);
    assert!(again.contains("writes are refused"), "{again}");
    assert!(s.entry_count() >= acknowledged.len() as u64);
    assert!(http_status(&s.ready_field("metrics"), "/ready").contains("503"));
    // `oxid-server healthcheck` (what a unit or probe runs) says so too.
    let unhealthy = s.fails(&["healthcheck"]);
    assert!(
        unhealthy.contains("not ready") && unhealthy.contains("writes are refused"),
        "{unhealthy}"
    );
    // After a restart every acknowledged entry is there, and writes work.
    s.stop();
    s.spawn();
    assert_kept_and_writable(&s, &acknowledged);
}

/// The first write that could not be saved: one line naming `cause` and
/// saying what to do.
fn assert_first_refusal(refusal: &str, cause: &str) {
    assert_eq!(refusal.lines().count(), 1, "{refusal}");
    assert!(refusal.contains(cause), "{refusal}");
    assert!(refusal.contains("restart the server"), "{refusal}");
}

/// After a restart: every `acknowledged` SPIFFE ID has its entry, and
/// writes work again.
fn assert_kept_and_writable(s: &Server, acknowledged: &[String]) {
    let listed: Vec<String> = s.json(&["entry", "show"])["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap().to_owned())
        .collect();
    for id in acknowledged {
        assert!(listed.contains(id), "{id} was acknowledged but is gone");
    }
    assert!(create_numbered(s, 9999).status.success());
}

#[test]
fn kill_9_keeps_an_acknowledged_ca_rotation_step() {
    let mut s = Server::start("");
    let before = s.json(&["ca", "show"])["authorities"].clone();
    s.ok(&["ca", "rotate", "--prepare"]);
    let prepared = s.json(&["ca", "show"])["authorities"].clone();
    assert_eq!(
        prepared.as_array().unwrap().len(),
        before.as_array().unwrap().len() + 1,
        "{prepared}"
    );
    // Killed right after the acknowledgement: the step must survive.
    s.kill9();
    s.spawn();
    let after = s.json(&["ca", "show"])["authorities"].clone();
    let key = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["sequence"].as_u64().unwrap(),
                    a["state"].clone(),
                    a["jwt_key_id"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&after), key(&prepared));
    // And the next step works on the restored state.
    s.ok(&["ca", "rotate", "--activate"]);
}

/// Runs `write` in a thread until it fails (the server is gone), counting
/// acknowledged writes in the returned counter; the thread returns them.
fn burst<T: Send + 'static>(
    mut write: impl FnMut(usize) -> Option<T> + Send + 'static,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<Vec<T>>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let writer = std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        for i in 0..10_000 {
            match write(i) {
                Some(v) => acknowledged.push(v),
                None => break,
            }
            counter.store(acknowledged.len(), Ordering::SeqCst);
        }
        acknowledged
    });
    (count, writer)
}

/// Waits until `count` reaches `n`: a burst is under way.
fn wait_for(count: &std::sync::atomic::AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the burst did not get going");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn kill_9_keeps_every_acknowledged_join_token_usable_once() {
    let mut s = Server::start("");
    let socket = s.socket();
    let (count, writer) = burst(move |_| {
        let out = Command::new(BIN)
            .args(["token", "generate", "--output", "json", "--socket-path"])
            .arg(&socket)
            .output()
            .unwrap();
        out.status.success().then(|| {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["token"].as_str().unwrap().to_owned()
        })
    });
    wait_for(&count, 20);
    s.kill9();
    let acknowledged = writer.join().unwrap();
    s.spawn();
    runtime().block_on(async {
        for token in &acknowledged {
            s.attest(token)
                .await
                .unwrap_or_else(|e| panic!("acknowledged token refused after kill -9: {e:?}"));
            let again = s.attest(token).await.err().expect("a token works once");
            assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
            assert!(again.message().contains("already used"), "{again:?}");
        }
        // The write the kill interrupted, kept or not, broke nothing.
        let fresh = s.ok(&["token", "generate"]);
        s.attest(fresh.trim()).await.unwrap();
    });
    assert_eq!(s.agents().len(), acknowledged.len() + 1);
}

/// A step of the agent-record burst, and its effect on `agent list`.
enum AgentStep {
    Attest(String),
    Ban(String),
    Evict(String),
}

impl AgentStep {
    fn apply(&self, agents: &mut BTreeMap<String, bool>) {
        match self {
            Self::Attest(id) => {
                agents.insert(id.clone(), false);
            }
            Self::Ban(id) => {
                agents.insert(id.clone(), true);
            }
            Self::Evict(id) => {
                agents.remove(id);
            }
        }
    }
}

#[test]
fn kill_9_keeps_every_acknowledged_agent_record() {
    let mut s = Server::start("");
    let socket = s.socket();
    let addr = s.ready_field("agent_api").parse().unwrap();
    let bundle = s.bundle();
    let cli = move |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--output", "json", "--socket-path"])
            .arg(&socket)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    };
    let rt = runtime();
    let mut ids: Vec<String> = Vec::new();
    let mut cut_off = false;
    // Round i: attest agent i; ban it if i is odd; every third round, evict
    // the agent of two rounds before. A round yields its acknowledged steps
    // and the step the kill cut off, if any (then it is the last round).
    let (count, writer) = burst(move |i| {
        if cut_off {
            return None;
        }
        let token = cli(&["token", "generate"])?;
        let id = format!(
            "spiffe://example.org/oxid/agent/join_token/{}",
            token["id"].as_str().unwrap()
        );
        let attested = rt.block_on(attest_at(
            addr,
            bundle.clone(),
            token["token"].as_str().unwrap(),
        ));
        cut_off = true;
        match attested {
            Ok(agent) => assert_eq!(agent.id.as_str(), id),
            Err(_) => return Some((vec![], Some(AgentStep::Attest(id)))),
        }
        let mut done = vec![AgentStep::Attest(id.clone())];
        ids.push(id.clone());
        let mut next = Vec::new();
        if i % 2 == 1 {
            next.push(("ban", AgentStep::Ban(id)));
        }
        if i % 3 == 2 {
            next.push(("evict", AgentStep::Evict(ids[i - 2].clone())));
        }
        for (verb, step) in next {
            let (AgentStep::Ban(target) | AgentStep::Evict(target) | AgentStep::Attest(target)) =
                &step;
            if cli(&["agent", verb, "--spiffe-id", target]).is_none() {
                return Some((done, Some(step)));
            }
            done.push(step);
        }
        cut_off = false;
        Some((done, None))
    });
    wait_for(&count, 12);
    s.kill9();
    let mut acknowledged = BTreeMap::new();
    let mut cut = None;
    for (done, cut_step) in writer.join().unwrap() {
        for step in done {
            step.apply(&mut acknowledged);
        }
        cut = cut.or(cut_step);
    }
    s.spawn();
    let listed = s.agents();
    // The cut-off step may or may not have been applied; nothing else.
    let mut with_cut = acknowledged.clone();
    if let Some(step) = &cut {
        step.apply(&mut with_cut);
    }
    assert!(
        listed == acknowledged || listed == with_cut,
        "after kill -9, agent list shows {listed:?}; acknowledged {acknowledged:?}"
    );
    assert!(
        acknowledged.values().any(|banned| *banned),
        "some bans acknowledged"
    );
}

/// An ext4 image loop-mounted for the length of a test, mounted with
/// `errors=remount-ro` so that an error turns it read-only under the open
/// files of a running server, as a failing disk does (a tmpfs refuses
/// `remount,ro` while a file is open for writing).
struct Ext4 {
    image: PathBuf,
    at: PathBuf,
}

impl Ext4 {
    fn mount(image: &Path, at: &Path) -> Self {
        std::fs::File::create(image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs) is required");
        assert!(
            mkfs.status.success(),
            "{}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        std::fs::create_dir_all(at).unwrap();
        let fs = Self {
            image: image.to_owned(),
            at: at.to_owned(),
        };
        fs.attach();
        fs
    }

    fn attach(&self) {
        let out = Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(&self.at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test loop-mounts an ext4 image and must run as root, as CI does: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Reports a filesystem error, as ext4 does on a failing disk: the
    /// kernel turns the mount read-only at once.
    fn turn_read_only(&self) {
        let source = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.at)
            .output()
            .unwrap();
        let device = String::from_utf8(source.stdout).unwrap();
        let device = Path::new(device.trim()).file_name().unwrap().to_owned();
        let trigger = Path::new("/sys/fs/ext4")
            .join(device)
            .join("trigger_fs_error");
        std::fs::write(&trigger, "oxid test: turning read-only").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::write(self.at.join("probe"), "x").is_ok() {
            assert!(
                Instant::now() < deadline,
                "{} stayed writable",
                self.at.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Unmounts and mounts again: writable, with what reached the disk.
    fn remount(&self) {
        let out = Command::new("umount").arg(&self.at).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.attach();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// The status line of `GET path` on `addr`.
fn http_status(addr: &str, path: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_read_only_data_directory_refuses_writes_clearly_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fs = Ext4::mount(&dir.path().join("data.img"), &data);
    let mut s = Server::start_in(dir, "metrics_address = \"127.0.0.1:0\"\n");
    let metrics = s.ready_field("metrics");
    let acknowledged: Vec<String> = (0..20)
        .map(|i| {
            assert!(create_numbered(&s, i).status.success());
            format!("spiffe://example.org/w{i}")
        })
        .collect();
    assert!(http_status(&metrics, "/ready").contains("200"));

    fs.turn_read_only();
    // The first write that cannot be saved says why and what to do.
    let refusal = String::from_utf8(create_numbered(&s, 100).stderr).unwrap();
    assert_first_refusal(&refusal, "Read-only file system");
    // Later writes of every kind are refused the same way.
    for args in [
        &["token", "generate"][..],
        &["bundle", "delete", "--id", "partner.example"],
        &create_args("spiffe://example.org/later", "unix:uid:1"),
    ] {
        let err = s.fails(args);
        assert!(err.contains("writes are refused"), "{args:?}: {err}");
    }
    // Reads are still served, and the server says it is not ready.
    assert!(s.entry_count() >= acknowledged.len() as u64);
    assert_eq!(s.json(&["agent", "count"])["count"], 0);
    assert!(http_status(&metrics, "/ready").contains("503"));
    assert!(http_status(&metrics, "/live").contains("200"));

    // Stopped, then restarted on the disk made writable again: every
    // acknowledged entry is there, and writes work.
    s.stop();
    fs.remount();
    s.spawn();
    assert_kept_and_writable(&s, &acknowledged);
    assert!(http_status(&s.ready_field("metrics"), "/ready").contains("200"));
}
