//! oxid beside a real SPIRE v1.13.3: the migration guide of the README
//! ("Coming from SPIRE") run step by step, and a bundle exchange both ways
//! so the two federate.
//!
//! SPIRE is built from the Go module proxy by `scripts/interop-spire` (into
//! target/spire/bin, never committed), which then runs these tests; they
//! are `#[ignore]`d in the default test run, which does not build SPIRE.

// A test reports failure by panicking, with the process output.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxid_e2e::{Agent, Proc, Server, bin, run};

/// `target/spire/bin` (or `OXID_SPIRE_BIN`), or a panic that says how to
/// build SPIRE.
fn spire_bin() -> PathBuf {
    let dir = std::env::var_os("OXID_SPIRE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/spire/bin"),
        PathBuf::from,
    );
    for name in ["spire-server", "spire-agent"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: ./scripts/interop-spire builds SPIRE v1.13.3 from the Go module \
             proxy into target/spire/bin (about 6 minutes the first time), then runs these tests",
            dir.join(name).display()
        );
    }
    dir
}

/// A `spire-server` for `trust_domain` on a temp dir: sqlite3, join_token,
/// KeyManager disk, as SPIRE's single-host users run it.
struct SpireServer {
    bin: PathBuf,
    socket: PathBuf,
    _proc: Proc,
}

impl SpireServer {
    async fn start(dir: &Path, trust_domain: &str) -> Self {
        let bin = spire_bin().join("spire-server");
        let data = dir.join("spire-data");
        std::fs::create_dir_all(&data).unwrap();
        let socket = dir.join("spire-api.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("spire-server.conf");
        std::fs::write(
            &conf,
            format!(
                "server {{\n  bind_address = \"127.0.0.1\"\n  bind_port = \"{port}\"\n  \
                 socket_path = \"{socket}\"\n  trust_domain = \"{trust_domain}\"\n  \
                 data_dir = \"{data}\"\n  log_level = \"WARN\"\n}}\n\
                 plugins {{\n  DataStore \"sql\" {{\n    plugin_data {{\n      \
                 database_type = \"sqlite3\"\n      connection_string = \"{data}/datastore.sqlite3\"\n    }}\n  }}\n  \
                 NodeAttestor \"join_token\" {{\n    plugin_data {{}}\n  }}\n  \
                 KeyManager \"disk\" {{\n    plugin_data {{\n      keys_path = \"{data}/keys.json\"\n    }}\n  }}\n}}\n",
                socket = socket.display(),
                data = data.display(),
            ),
        )
        .unwrap();
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("run").arg("-config").arg(&conf);
        let mut proc = Proc::spawn("spire-server", cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        while spire_cli(&bin, &socket, &["healthcheck"]).await.0 != 0 {
            assert!(proc.is_running(), "spire-server exited:\n{}", proc.log());
            assert!(
                Instant::now() < deadline,
                "spire-server not healthy:\n{}",
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            bin,
            socket,
            _proc: proc,
        }
    }

    /// `spire-server <args>`; its stdout, or a panic with stderr.
    async fn cli(&self, args: &[&str]) -> String {
        let (code, out, err) = spire_cli(&self.bin, &self.socket, args).await;
        assert_eq!(code, 0, "spire-server {args:?} failed: {err}{out}");
        out
    }
}

/// `spire-server <args> -socketPath <socket>`: (code, stdout, stderr).
async fn spire_cli(bin: &Path, socket: &Path, args: &[&str]) -> (i32, String, String) {
    let socket = socket.display().to_string();
    let mut all = args.to_vec();
    all.extend(["-socketPath", &socket]);
    run(bin, &all).await
}

/// `oxid-server <args>` against `server`, pretty output: (code, stdout, stderr).
async fn oxid(server: &Server, args: &[&str]) -> (i32, String, String) {
    let admin = server.admin_socket.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--socket-path", &admin]);
    run(&bin("oxid-server"), &all).await
}

/// `oxid-agent api fetch x509 --write DIR --output json` as this process,
/// again until its answer satisfies `done`; that answer.
async fn fetch_until(
    agent: &Agent,
    dir: &Path,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let socket = agent.socket.display().to_string();
    let dir = dir.to_str().unwrap();
    let args = [
        "api",
        "fetch",
        "x509",
        "--socket-path",
        &socket,
        "--output",
        "json",
        "--write",
        dir,
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, err) = run(&bin("oxid-agent"), &args).await;
        if code == 0 {
            let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
            if done(&answer) {
                return answer;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the workload never got what it waits for: {out}{err}"
        );
        // The agent signs a new entry's SVID within milliseconds; polling
        // is the CLI's only way to see it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn uid() -> String {
    rustix::process::getuid().as_raw().to_string()
}

/// The README's "Coming from SPIRE" steps: entries registered in a real
/// SPIRE, exported with `entry show -output json`, imported into oxid, and
/// a workload served from an imported entry.
#[tokio::test]
#[ignore = "needs SPIRE v1.13.3 built: run ./scripts/interop-spire"]
async fn entries_exported_from_spire_import_into_oxid_and_serve_a_workload() {
    let dir = tempfile::tempdir().unwrap();
    let spire = SpireServer::start(dir.path(), "example.org").await;
    let uid = uid();
    // What a SPIRE deployment holds: an agent's token with a node alias,
    // workloads under that alias, a node entry, an admin workload.
    spire
        .cli(&[
            "token",
            "generate",
            "-spiffeID",
            "spiffe://example.org/node/a",
        ])
        .await;
    let selector = format!("unix:uid:{uid}");
    spire
        .cli(&[
            "entry",
            "create",
            "-parentID",
            "spiffe://example.org/node/a",
            "-spiffeID",
            "spiffe://example.org/web",
            "-selector",
            &selector,
            "-x509SVIDTTL",
            "600",
            "-jwtSVIDTTL",
            "300",
            "-dns",
            "web.local",
            "-hint",
            "web",
        ])
        .await;
    spire
        .cli(&[
            "entry",
            "create",
            "-node",
            "-spiffeID",
            "spiffe://example.org/cluster/x509",
            "-selector",
            "x509pop:subject:cn:node-b",
        ])
        .await;
    spire
        .cli(&[
            "entry",
            "create",
            "-parentID",
            "spiffe://example.org/node/a",
            "-spiffeID",
            "spiffe://example.org/registrar",
            "-selector",
            "unix:uid:4242",
            "-admin",
        ])
        .await;

    // Step 1: export.
    let export = spire.cli(&["entry", "show", "-output", "json"]).await;
    let exported = dir.path().join("spire-entries.json");
    std::fs::write(&exported, &export).unwrap();
    let exported = exported.display().to_string();

    // Step 2: a dry run against the new oxid server says what needs a
    // decision, and writes nothing.
    let server = Server::start(dir.path()).await;
    let import = ["entry", "import", "--format", "spire", "--data", &exported];
    let (code, out, err) = oxid(&server, &[&import[..], &["--dry-run"]].concat()).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("admin: true cannot be honoured"), "{err}");
    assert!(
        out.contains("skipped: SPIRE's record of a join-token alias"),
        "{out}"
    );
    assert!(
        out.contains("Dry run: 2 of 4 entries would be created, 1 skipped, 1 refused"),
        "{out}"
    );
    assert_eq!(server.cli(&["entry", "count"]).await["count"], 0);

    // Step 3: import, dropping the admin flag (oxid's admin API is a local
    // socket).
    let (code, out, err) = oxid(&server, &[&import[..], &["--drop", "admin"]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Imported 3 of 4 entries (1 skipped, 0 refused, 0 not created)"),
        "{out}"
    );
    let node = server
        .cli(&[
            "entry",
            "show",
            "--spiffe-id",
            "spiffe://example.org/cluster/x509",
        ])
        .await;
    assert_eq!(
        node["entries"][0]["parent_id"],
        "spiffe://example.org/oxid/server"
    );

    // Step 4: the node's agent joins oxid with the alias its SPIRE token
    // carried, and the workload gets the SVID of the imported entry.
    let token = server
        .cli(&[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/a",
        ])
        .await;
    let agent = Agent::start(dir.path(), &server, token["token"].as_str().unwrap()).await;
    let out_dir = dir.path().join("svid");
    std::fs::create_dir(&out_dir).unwrap();
    let fetched = fetch_until(&agent, &out_dir, |out| {
        out.get("svids")
            .and_then(|s| s.as_array())
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    assert_eq!(fetched["svids"].as_array().unwrap().len(), 1, "{fetched}");
    assert_eq!(fetched["svids"][0]["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(fetched["svids"][0]["hint"], "web");
    let (code, text, err) = run(
        Path::new("openssl"),
        &[
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            out_dir.join("svid.pem").to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("DNS:web.local") && text.contains("URI:spiffe://example.org/web"),
        "{text}"
    );
}

/// Each side takes the other's bundle in SPIFFE form, and then verifies the
/// other's SVIDs: the two trust domains federate.
#[tokio::test]
#[ignore = "needs SPIRE v1.13.3 built: run ./scripts/interop-spire"]
async fn oxid_and_spire_take_each_others_spiffe_bundles_and_verify_each_others_svids() {
    let dir = tempfile::tempdir().unwrap();
    let spire = SpireServer::start(dir.path(), "spire.test").await;
    let server = Server::start(dir.path()).await;
    let path = |name: &str| dir.path().join(name).display().to_string();

    // SPIRE's bundle into oxid, exactly as `bundle show -format spiffe` prints it.
    std::fs::write(
        path("spire.json"),
        spire.cli(&["bundle", "show", "-format", "spiffe"]).await,
    )
    .unwrap();
    let (code, out, err) = oxid(
        &server,
        &[
            "bundle",
            "set",
            "--format",
            "spiffe",
            "--id",
            "spiffe://spire.test",
            "--path",
            &path("spire.json"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    // oxid's bundle into SPIRE.
    let (code, ours, err) = oxid(&server, &["bundle", "show", "--format", "spiffe"]).await;
    assert_eq!(code, 0, "{err}");
    std::fs::write(path("oxid.json"), &ours).unwrap();
    spire
        .cli(&[
            "bundle",
            "set",
            "-format",
            "spiffe",
            "-id",
            "spiffe://example.org",
            "-path",
            &path("oxid.json"),
        ])
        .await;
    std::fs::write(
        path("oxid-as-seen-by-spire.pem"),
        spire
            .cli(&[
                "bundle",
                "list",
                "-id",
                "spiffe://example.org",
                "-format",
                "pem",
            ])
            .await,
    )
    .unwrap();

    // An oxid workload federating with spire.test receives SPIRE's roots...
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir.path(), &server, &token).await;
    let selector = format!("unix:uid:{}", uid());
    server
        .create_entry(
            "spiffe://example.org/client",
            &agent_id,
            &["--selector", &selector, "--federates-with", "spire.test"],
        )
        .await;
    let out_dir = dir.path().join("oxid-svid");
    std::fs::create_dir(&out_dir).unwrap();
    fetch_until(&agent, &out_dir, |out| {
        out.get("federated_bundles")
            .and_then(|b| b.as_array())
            .is_some_and(|b| !b.is_empty())
    })
    .await;
    // ...with which it verifies an SVID SPIRE signed,
    let spire_svid = dir.path().join("spire-svid");
    std::fs::create_dir(&spire_svid).unwrap();
    spire
        .cli(&[
            "x509",
            "mint",
            "-spiffeID",
            "spiffe://spire.test/server",
            "-write",
            spire_svid.to_str().unwrap(),
        ])
        .await;
    let verify = |ca: PathBuf, cert: PathBuf| async move {
        run(
            Path::new("openssl"),
            &[
                "verify",
                "-CAfile",
                ca.to_str().unwrap(),
                cert.to_str().unwrap(),
            ],
        )
        .await
    };
    let (code, out, err) = verify(
        out_dir.join("federated_bundle.0.pem"),
        spire_svid.join("svid.pem"),
    )
    .await;
    assert_eq!(
        code, 0,
        "a SPIRE SVID against the bundle oxid serves: {out}{err}"
    );
    // and SPIRE's copy of oxid's bundle verifies the oxid workload's SVID.
    let (code, out, err) = verify(
        dir.path().join("oxid-as-seen-by-spire.pem"),
        out_dir.join("svid.pem"),
    )
    .await;
    assert_eq!(
        code, 0,
        "an oxid SVID against SPIRE's copy of oxid's bundle: {out}{err}"
    );
    // A bundle of the wrong trust domain does not verify: the checks can fail.
    let (code, _, _) = verify(out_dir.join("bundle.pem"), spire_svid.join("svid.pem")).await;
    assert_ne!(code, 0);
}
