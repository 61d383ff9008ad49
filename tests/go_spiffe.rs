//! go-spiffe, the reference SPIFFE client library, against a real oxid
//! server and agent: sources, JWT validation, spiffetls mTLS between two
//! uids across rotations, and the watcher behaviour go-spiffe has.
//!
//! The Go program is `tests/go` (go.mod and go.sum pin go-spiffe v2.9.0),
//! built once per run with its caches under `target/go` so grpc-go is
//! compiled once, not on every run.

// A test reports failure by panicking, with the process output.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use oxid_e2e::{Agent, Proc, Server};

const TD: &str = "spiffe://example.org";
/// Uids with no account, for the two sides of the mTLS test and for a
/// caller with no entry (this suite runs as root, as CI does).
const SERVER_UID: &str = "65534";
const CLIENT_UID: &str = "65533";
const STRANGER_UID: &str = "65532";

/// The built `gospiffe-check`, or a panic that says how to get Go.
fn gospiffe() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // Canonical: `unix:path` selectors name the path /proc shows.
        let target = root
            .join("../target")
            .canonicalize()
            .expect("target/ exists")
            .join("go");
        let out = target.join("bin/gospiffe-check");
        let start = Instant::now();
        let status = std::process::Command::new("go")
            .args(["build", "-mod=readonly", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(root.join("go"))
            .env("GOCACHE", target.join("cache"))
            .env("GOMODCACHE", target.join("mod"))
            .env("GOFLAGS", "-modcacherw")
            // The toolchain on the machine, never one fetched behind our back.
            .env("GOTOOLCHAIN", "local")
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `go` ({e}): these tests need Go >= 1.25 on PATH \
                     (https://go.dev/dl; Debian's golang-go is older than that before trixie-backports)"
                )
            });
        assert!(status.success(), "go build of tests/go failed ({status})");
        eprintln!("built gospiffe-check in {:.1?}", start.elapsed());
        out
    })
}

/// A server and an agent on a temp dir, and the agent's ID.
async fn cluster(dir: &Path) -> (Server, Agent, String) {
    let server = Server::start(dir).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir, &server, &token).await;
    (server, agent, agent_id)
}

/// Registers `gospiffe-check` run as `uid` as `path` (under the trust
/// domain); the entry ID.
async fn register(
    server: &Server,
    agent_id: &str,
    path: &str,
    uid: &str,
    extra: &[&str],
) -> String {
    let selector = format!("unix:path:{}", gospiffe().display());
    let uid = format!("unix:uid:{uid}");
    let mut args = vec!["--selector", &selector, "--selector", &uid];
    args.extend(extra);
    server
        .create_entry(&format!("{TD}{path}"), agent_id, &args)
        .await
}

/// `gospiffe-check args` as `uid`, against `agent`.
fn command(agent: &Agent, uid: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = agent.workload(Path::new("setpriv"));
    cmd.args(["--reuid", uid, "--regid", uid, "--clear-groups"])
        .arg(gospiffe())
        .args(args);
    cmd
}

/// Runs a one-shot subcommand; its JSON output.
async fn check(agent: &Agent, uid: &str, args: &[&str]) -> serde_json::Value {
    let out = command(agent, uid, args)
        .output()
        .await
        .expect("setpriv (util-linux) is required; this suite runs as root, as CI does");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gospiffe-check {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

fn my_uid() -> String {
    rustix::process::getuid().as_raw().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn x509_source_gets_the_svid_its_key_and_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    register(&server, &agent_id, "/go/x509", &my_uid(), &[]).await;

    let v = check(&agent, &my_uid(), &["x509"]).await;
    assert_eq!(v["spiffe_id"], format!("{TD}/go/x509"), "{v}");
    assert_eq!(v["key_matches_leaf"], true, "{v}");
    // x509svid.Verify against the bundle the source returned.
    assert_eq!(v["verified_id"], format!("{TD}/go/x509"), "{v}");
    assert_eq!(v["bundle_trust_domain"], "example.org", "{v}");
    assert!(v["bundle_authorities"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["chain_length"].as_u64().unwrap() >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwt_source_fetches_and_validates_for_several_audiences() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    register(&server, &agent_id, "/go/jwt", &my_uid(), &[]).await;
    let audiences = format!("{TD}/api,{TD}/audit");

    let v = check(&agent, &my_uid(), &["jwt", "-audiences", &audiences]).await;
    assert_eq!(v["spiffe_id"], format!("{TD}/go/jwt"), "{v}");
    assert_eq!(
        v["audience"],
        serde_json::json!([format!("{TD}/api"), format!("{TD}/audit")]),
        "{v}"
    );
    // jwtsvid.ParseAndValidate against the JWT bundle from the source.
    assert_eq!(v["parsed_id"], format!("{TD}/go/jwt"), "{v}");
    assert!(v["expires_in_secs"].as_i64().unwrap() > 0, "{v}");
    let other = v["other_audience_error"].as_str().unwrap();
    assert!(
        other.contains("audience"),
        "a token for other audiences validated: {v}"
    );
    // ValidateJWTSVID over the Workload API, for the second audience.
    assert_eq!(v["api_validated_id"], format!("{TD}/go/jwt"), "{v}");
    assert!(
        !v["api_other_audience_error"].as_str().unwrap().is_empty(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spiffetls_mtls_between_two_uids_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    // 4 s SVIDs: the agent renews at half-life, so 12 s of dialling spans
    // several rotations on both sides.
    let ttl = ["--x509-svid-ttl", "4s"];
    register(&server, &agent_id, "/go/server", SERVER_UID, &ttl).await;
    register(&server, &agent_id, "/go/client", CLIENT_UID, &ttl).await;

    let allow = format!("{TD}/go/client");
    let mut listener = Proc::spawn(
        "gospiffe-check serve",
        command(&agent, SERVER_UID, &["serve", "-allow", &allow]),
    );
    let line = listener.wait_for("listening on").await;
    let addr = line.rsplit(' ').next().unwrap().to_owned();

    let server_id = format!("{TD}/go/server");
    let v = check(
        &agent,
        CLIENT_UID,
        &[
            "dial",
            "-addr",
            &addr,
            "-server-id",
            &server_id,
            "-seconds",
            "12",
        ],
    )
    .await;
    assert_eq!(v["failures"], serde_json::json!([]), "{v}");
    assert!(v["connections"].as_u64().unwrap() >= 10, "{v}");
    // At least two rotations on each side: three serials or more.
    assert!(v["server_serials"].as_array().unwrap().len() >= 3, "{v}");
    assert!(v["client_serials"].as_array().unwrap().len() >= 3, "{v}");
    // The first connection carried a request after all of them.
    assert_eq!(v["long_connection_error"], "", "{v}");
    assert!(
        v["long_connection_reply"]
            .as_str()
            .unwrap()
            .contains(&format!("peer={allow}/")),
        "{v}"
    );
    // The server authorised the client by ID and saw it rotate too.
    let log = listener.log();
    let seen: std::collections::BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("accepted {allow}/")))
        .collect();
    assert!(
        seen.len() >= 3,
        "client serials seen by the server: {seen:?}\n{log}"
    );

    // A client that wants another server ID refuses this one.
    let out = command(
        &agent,
        CLIENT_UID,
        &[
            "dial",
            "-addr",
            &addr,
            "-server-id",
            &format!("{TD}/go/elsewhere"),
            "-seconds",
            "0",
        ],
    )
    .output()
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dial to the wrong ID succeeded");
    assert!(err.contains("unexpected ID"), "{err}");
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_follow_entry_changes_and_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent, agent_id) = cluster(dir.path()).await;
    let entry = register(&server, &agent_id, "/go/watch", &my_uid(), &[]).await;
    let mut watcher = Proc::spawn(
        "gospiffe-check watch",
        command(&agent, &my_uid(), &["watch"]),
    );
    let first = serial_in(&watcher.wait_for("ready serial=").await);

    // Entry deleted: the raw stream ends with PermissionDenied, while the
    // X509Source keeps its last SVID (go-spiffe's design: it retries).
    server.cli(&["entry", "delete", "--entry-id", &entry]).await;
    watcher.wait_for("raw ended code=PermissionDenied").await;
    assert_eq!(
        serial_in(&watcher.wait_for("source kept serial=").await),
        first
    );

    // Entry created again: the same source, in the same process, picks up
    // a new SVID (after its retry backoff).
    register(&server, &agent_id, "/go/watch", &my_uid(), &[]).await;
    let second = serial_in(&watcher.wait_for("source update #1 ").await);
    assert_ne!(second, first, "{}", watcher.log());

    // Agent restarted: the source reconnects and is updated again.
    agent.stop().await;
    agent.restart(&server).await;
    watcher.wait_for("source update #2 ").await;
    assert!(watcher.is_running(), "{}", watcher.log());
    watcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_with_no_entry_gets_no_source() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    // Someone else's entry exists; this uid has none.
    register(&server, &agent_id, "/go/someone", &my_uid(), &[]).await;
    let v = check(&agent, STRANGER_UID, &["no-entry"]).await;
    let err = v["error"].as_str().unwrap();
    assert!(
        !err.is_empty(),
        "NewX509Source succeeded with no entry: {v}"
    );
    assert!(err.contains("context deadline exceeded"), "{v}");
    let elapsed = v["elapsed_secs"].as_f64().unwrap();
    assert!((2.5..10.0).contains(&elapsed), "gave up after {elapsed} s");
}

fn serial_in(line: &str) -> String {
    line.rsplit("serial=").next().unwrap().trim().to_owned()
}
