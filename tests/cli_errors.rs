//! What the operator CLIs say when something is wrong, with the real
//! binaries: each case is one `error:` line that names what happened (and
//! what to do), and a non-zero exit. Also: socket addresses as `unix:` URIs,
//! and times in RFC 3339.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use oxid_e2e::{Agent, Server, WAIT, bin, run};
use tokio::process::Command;

/// Runs `program args` (with `env`); asserts it failed with exactly one
/// `error:` line on stderr, which it returns.
async fn fails(program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(bin(program));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{program} {args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{program} {args:?}: one line expected:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

/// A server and an agent serving an entry for this test's uid, fetched
/// once through the CLI (so the agent has signed it).
async fn server_and_agent(dir: &Path) -> (Server, Agent) {
    let server = {
        std::fs::create_dir_all(dir.join("s")).unwrap();
        Server::start(&dir.join("s")).await
    };
    let (token, agent_id) = server.join_token().await;
    let uid = format!("unix:uid:{}", rustix::process::getuid().as_raw());
    server
        .create_entry(
            "spiffe://example.org/cli/test",
            &agent_id,
            &["--selector", &uid],
        )
        .await;
    let agent = Agent::start(dir, &server, &token).await;
    fetch_x509(&agent.socket.display().to_string(), &[]).await;
    (server, agent)
}

/// `oxid-agent api fetch x509 --socket-path <socket> <extra>`, retried
/// until the agent has the SVID; its stdout.
async fn fetch_x509(socket: &str, extra: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut args = vec!["api", "fetch", "x509", "--socket-path", socket];
    args.extend(extra);
    loop {
        let (code, out, err) = run(&bin("oxid-agent"), &args).await;
        if code == 0 {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no SVID from {socket}: {err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `2026-12-02T21:04:05Z`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[tokio::test]
async fn a_metrics_address_in_use_is_named_as_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!("trust_domain = \"example.org\"\nmetrics_address = \"{address}\"\n"),
    )
    .unwrap();
    let (data, socket) = (dir.path().join("data"), dir.path().join("run/admin.sock"));
    let line = fails(
        "oxid-server",
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--socket-path",
            socket.to_str().unwrap(),
            "--bind-address",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert!(
        line.contains(&format!("metrics_address {address}")) && !line.contains("agent API"),
        "{line}"
    );
    // The agent API's own address, taken, is named as bind_address.
    std::fs::write(&config, "trust_domain = \"example.org\"\n").unwrap();
    let line = fails(
        "oxid-server",
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--socket-path",
            socket.to_str().unwrap(),
            "--bind-address",
            &address,
        ],
        &[],
    )
    .await;
    assert!(
        line.contains(&format!("bind_address (the agent API) {address}")),
        "{line}"
    );
}

#[tokio::test]
async fn fetch_x509_write_names_the_flag_for_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent) = server_and_agent(dir.path()).await;
    let socket = agent.socket.display().to_string();
    let _ = &server;

    // --write into a missing directory, or onto a file: the flag is named,
    // not "data directory", and nothing is fetched or written.
    let missing = dir.path().join("missing/out");
    let missing = missing.to_str().unwrap();
    let line = fails(
        "oxid-agent",
        &[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &socket,
            "--write",
            missing,
        ],
        &[],
    )
    .await;
    assert_eq!(
        line,
        format!("error: --write {missing}: no such directory; create it first")
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let file = file.to_str().unwrap();
    let line = fails(
        "oxid-agent",
        &[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &socket,
            "--write",
            file,
        ],
        &[],
    )
    .await;
    assert_eq!(line, format!("error: --write {file}: not a directory"));
    // Into a directory that exists, it writes the three files.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    fetch_x509(&socket, &["--write", out.to_str().unwrap()]).await;
    for f in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(out.join(f).exists(), "{f}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn the_wrong_kind_of_socket_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent) = server_and_agent(dir.path()).await;
    let socket = agent.socket.display().to_string();
    let admin = server.admin_socket.display().to_string();

    // The wrong kind of socket says so, instead of an empty message.
    for args in [
        vec!["api", "fetch", "x509", "--socket-path", &admin],
        vec!["api", "watch", "--socket-path", &admin],
        vec![
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--socket-path",
            &admin,
        ],
        vec!["healthcheck", "--socket-path", &admin],
    ] {
        let line = fails("oxid-agent", &args, &[]).await;
        assert!(
            line.contains(&format!(
                "{admin} does not serve the Workload API (is it an oxid-server admin socket?)"
            )),
            "{args:?}: {line}"
        );
    }
    let line = fails(
        "oxid-server",
        &["entry", "count", "--socket-path", &socket],
        &[],
    )
    .await;
    assert!(
        line.contains(&format!(
            "{socket} does not serve the oxid admin API (is it an oxid-agent Workload API socket?)"
        )),
        "{line}"
    );
    let line = fails(
        "oxid-server",
        &["healthcheck", "--socket-path", &socket],
        &[],
    )
    .await;
    assert!(line.contains("does not serve the oxid admin API"), "{line}");
    agent.stop().await;
}

#[tokio::test]
async fn socket_addresses_take_unix_uris_and_refuse_other_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent) = server_and_agent(dir.path()).await;
    let socket = agent.socket.display().to_string();
    let admin = server.admin_socket.display().to_string();

    // Socket addresses as SPIFFE_ENDPOINT_SOCKET takes them.
    for form in [format!("unix://{socket}"), format!("unix:{socket}")] {
        fetch_x509(&form, &[]).await;
        let (code, _, err) = run(
            &bin("oxid-server"),
            &[
                "entry",
                "count",
                "--socket-path",
                &format!("unix://{admin}"),
            ],
        )
        .await;
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = run(
        &bin("oxid-agent"),
        &["healthcheck", "--socket-path", &format!("unix://{socket}")],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let mut env_fetch = Command::new(bin("oxid-agent"));
    env_fetch
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{socket}"));
    let out = env_fetch.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Other schemes are refused, naming where the address came from.
    let line = fails(
        "oxid-agent",
        &[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            "tcp://127.0.0.1:8081",
        ],
        &[],
    )
    .await;
    assert!(
        line.contains("--socket-path") && line.contains("only unix: addresses are supported"),
        "{line}"
    );
    let line = fails(
        "oxid-agent",
        &["api", "fetch", "x509"],
        &[("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:8081")],
    )
    .await;
    assert!(
        line.contains("SPIFFE_ENDPOINT_SOCKET") && line.contains("only unix:"),
        "{line}"
    );
    let line = fails(
        "oxid-server",
        &["entry", "count", "--socket-path", "tcp://127.0.0.1:8081"],
        &[],
    )
    .await;
    assert!(
        line.contains("only unix: addresses are supported"),
        "{line}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn svid_expiry_is_rfc3339_in_json_and_pretty_output() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent) = server_and_agent(dir.path()).await;
    let socket = agent.socket.display().to_string();
    let _ = &server;

    // Expiry times are RFC 3339, in JSON and in the pretty output.
    let json: serde_json::Value =
        serde_json::from_str(&fetch_x509(&socket, &["--output", "json"]).await).unwrap();
    let expires = json["svids"][0]["expires"].as_str().unwrap();
    assert!(is_rfc3339(expires), "{json}");
    let pretty = fetch_x509(&socket, &[]).await;
    let shown = pretty
        .split("expires ")
        .nth(1)
        .and_then(|s| s.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{pretty}"));
    assert!(is_rfc3339(shown), "{pretty}");
    agent.stop().await;
}

/// Runs `oxid-server args` as uid 65534 (needs root, as CI runs).
async fn as_nobody(args: &[&str]) -> std::process::Output {
    assert!(
        rustix::process::getuid().is_root(),
        "this test switches to uid 65534 and must run as root (CI does)"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin("oxid-server"))
        .args(args);
    cmd.output()
        .await
        .expect("setpriv (util-linux) is required")
}

#[tokio::test]
async fn permission_denied_on_the_admin_socket_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // Traversable by uid 65534 down to the server's directories.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(dir.path()).await;
    let socket = server.admin_socket.clone();
    let run_dir = socket.parent().unwrap();
    let expected = format!(
        "error: cannot reach the server at {}: permission denied (the socket or its directory \
         is not open to this user); run this as the server's user or as root",
        socket.display()
    );
    // The socket's directory closed to others; then the socket itself.
    for (path, mode) in [
        (run_dir, 0o700),
        (run_dir, 0o755),
        (socket.as_path(), 0o600),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        if mode == 0o755 {
            continue;
        }
        let out = as_nobody(&["entry", "count", "--socket-path", socket.to_str().unwrap()]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.trim_end(), expected, "{} {mode:o}", path.display());
    }
}

#[tokio::test]
async fn the_agent_serves_on_a_unix_uri_socket_path_and_refuses_other_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let server = {
        std::fs::create_dir_all(dir.path().join("s")).unwrap();
        Server::start(&dir.path().join("s")).await
    };
    let (token, _) = server.join_token().await;
    let admin = server.admin_socket.display().to_string();
    let (code, pem, err) = run(
        &bin("oxid-server"),
        &["bundle", "show", "--socket-path", &admin],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, pem).unwrap();
    let socket = dir.path().join("run/api.sock");
    let agent = |socket_path: String| {
        let mut cmd = Command::new(bin("oxid-agent"));
        cmd.arg("run")
            .args(["--server-address", &server.address])
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .args(["--socket-path", &socket_path])
            .args(["--join-token", &token]);
        cmd
    };
    let line = fails_cmd(agent("tcp://127.0.0.1:8081".into())).await;
    assert!(
        line.contains("socket_path") && line.contains("only unix:"),
        "{line}"
    );
    let mut proc =
        oxid_e2e::Proc::spawn("oxid-agent", agent(format!("unix://{}", socket.display())));
    proc.wait_for("serving the Workload API").await;
    // Healthy at its first sync, on the plain path the URI named.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, _, err) = run(
            &bin("oxid-agent"),
            &["healthcheck", "--socket-path", socket.to_str().unwrap()],
        )
        .await;
        if code == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proc.stop().await;
}

/// As [`fails`], for a prepared command.
async fn fails_cmd(mut cmd: Command) -> String {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0].to_owned()
}
