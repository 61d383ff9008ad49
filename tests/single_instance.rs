//! One process per socket path and per data directory, with the real
//! binaries. A second `oxid-server` or `oxid-agent` given a path in use is
//! refused at start, with a line naming the path and the holder's pid,
//! before it touches anything; the first keeps its socket, and keeps
//! serving on it after the second has gone. Two started at the same moment:
//! exactly one wins (a lock, not a connect probe, decides).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use oxid_e2e::{Agent, Proc, Server, WAIT, bin, run};
use tokio::process::Command;

/// `oxid-server run` for `example.org` on `data` and `socket`.
fn server_cmd(dir: &Path, data: &Path, socket: &Path) -> Command {
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\n[ca]\nttl = \"6h\"\nagent_svid_ttl = \"10m\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(bin("oxid-server"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .arg("--socket-path")
        .arg(socket)
        .args(["--bind-address", "127.0.0.1:0"]);
    cmd
}

/// `oxid-agent run` against `server`, attesting with `token`.
async fn agent_cmd(server: &Server, dir: &Path, socket: &Path, token: &str) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let bundle = dir.join("bundle.pem");
    let admin = server.admin_socket.display().to_string();
    let (code, pem, err) = run(
        &bin("oxid-server"),
        &["bundle", "show", "--socket-path", &admin],
    )
    .await;
    assert_eq!(code, 0, "bundle show: {err}");
    std::fs::write(&bundle, pem).unwrap();
    let mut cmd = Command::new(bin("oxid-agent"));
    cmd.arg("run")
        .args(["--server-address", &server.address])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .arg("--socket-path")
        .arg(socket)
        .args(["--join-token", token]);
    cmd
}

/// Waits for `proc` to exit by itself; asserts it failed with exactly one
/// `error:` line, which it returns.
async fn refused(proc: &mut Proc) -> String {
    // The line first: the exit can be seen before its output is read.
    let line = proc.wait_for("error: ").await;
    let code = proc.wait().await;
    let log = proc.log();
    assert_ne!(code, Some(0), "it should have been refused:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors, [line.as_str()], "one error line expected:\n{log}");
    line
}

/// The line a process refused on `socket`, held by `pid`, prints. A
/// holder that has only just taken the lock may not have written its pid
/// yet: with `pid` None, a pid is not required, only checked if present.
fn assert_in_use(line: &str, socket: &Path, pid: Option<u32>, holder: Option<u32>) {
    let lock = format!("{}.lock", socket.display());
    assert!(
        line.contains(&format!(
            "socket {} is in use: another process",
            socket.display()
        )) && line.contains(&format!("holds {lock}")),
        "{line}"
    );
    if let Some(pid) = pid {
        assert!(line.contains(&format!("(pid {pid}) holds")), "{line}");
    } else if line.contains("(pid ") {
        let holder = holder.unwrap();
        assert!(
            line.contains(&format!("(pid {holder}) holds")),
            "not the winner's pid: {line}"
        );
    }
}

/// `oxid-server entry count` on `socket` answers.
async fn server_answers(socket: &Path) {
    let socket = socket.display().to_string();
    let (code, out, err) = run(
        &bin("oxid-server"),
        &["entry", "count", "--socket-path", &socket],
    )
    .await;
    assert_eq!(code, 0, "the first server is unreachable: {err}{out}");
}

/// `oxid-agent healthcheck` on `socket` passes (it turns healthy at the
/// agent's first sync, so it is retried until then).
async fn agent_answers(socket: &Path) {
    let socket = socket.display().to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, out, err) = run(
            &bin("oxid-agent"),
            &["healthcheck", "--socket-path", &socket],
        )
        .await;
        if code == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent on {socket} is unreachable: {err}{out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Of two processes started together, the one that exits first (the loser)
/// and the other; waits on their exits and output, not a fixed time.
async fn loser_first(a: Proc, b: Proc) -> (Proc, Proc) {
    let (mut a, mut b) = (a, b);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if !a.is_running() {
            return (a, b);
        }
        if !b.is_running() {
            return (b, a);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither was refused:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn gone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

#[tokio::test]
async fn a_second_server_on_a_live_socket_is_refused_and_the_first_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Server::start(dir.path()).await;
    let socket = first.admin_socket.clone();
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut second = Proc::spawn(
        "second oxid-server",
        server_cmd(&other, &other.join("data"), &socket),
    );
    let line = refused(&mut second).await;
    assert_in_use(&line, &socket, first.proc.pid(), None);
    // Refused before it made anything: no store, no CA.
    assert!(gone(&other.join("data/datastore")), "{line}");
    // The first still has its socket, after the second has gone.
    server_answers(&socket).await;
    // A stop removes the socket and its lock file.
    first.stop().await;
    assert!(gone(&socket) && gone(&PathBuf::from(format!("{}.lock", socket.display()))));
}

#[tokio::test]
async fn two_servers_started_at_once_on_one_socket_one_wins_and_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/admin.sock");
    for round in 0..3 {
        let (a, b) = (
            dir.path().join(format!("a{round}")),
            dir.path().join(format!("b{round}")),
        );
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
        }
        let (cmd_a, cmd_b) = (
            server_cmd(&a, &a.join("data"), &socket),
            server_cmd(&b, &b.join("data"), &socket),
        );
        let (pa, pb) = (
            Proc::spawn("server a", cmd_a),
            Proc::spawn("server b", cmd_b),
        );
        let (mut loser, mut winner) = loser_first(pa, pb).await;
        let line = refused(&mut loser).await;
        winner.wait_for("oxid-server ready").await;
        assert_in_use(&line, &socket, None, winner.pid());
        server_answers(&socket).await;
        winner.stop().await;
        assert!(
            gone(&socket),
            "round {round}: the socket outlived its server"
        );
    }
}

#[tokio::test]
async fn a_second_server_on_a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path()).await;
    let data = dir.path().join("server");
    let mut second = Proc::spawn(
        "second oxid-server",
        server_cmd(dir.path(), &data, &dir.path().join("other/admin.sock")),
    );
    let line = refused(&mut second).await;
    let pid = first.proc.pid().unwrap();
    assert!(
        line.contains(&format!(
            "another oxid-server is using {} (pid {pid})",
            data.display()
        )),
        "{line}"
    );
    assert!(!line.contains("could not acquire lock"), "{line}");
    server_answers(&first.admin_socket).await;
}

#[tokio::test]
async fn a_second_agent_on_a_live_socket_is_refused_before_it_spends_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = {
        std::fs::create_dir_all(dir.path().join("s")).unwrap();
        Server::start(&dir.path().join("s")).await
    };
    let (token, _) = server.join_token().await;
    let mut first = Agent::start(dir.path(), &server, &token).await;
    let (second_token, _) = server.join_token().await;
    let cmd = agent_cmd(
        &server,
        &dir.path().join("second"),
        &first.socket,
        &second_token,
    )
    .await;
    let mut second = Proc::spawn("second oxid-agent", cmd);
    let line = refused(&mut second).await;
    assert_in_use(&line, &first.socket, first.proc.pid(), None);
    agent_answers(&first.socket).await;
    // The refused agent did not attest: its token still works.
    let third_socket = dir.path().join("third-run/api.sock");
    let cmd = agent_cmd(
        &server,
        &dir.path().join("third"),
        &third_socket,
        &second_token,
    )
    .await;
    let mut third = Proc::spawn("third oxid-agent", cmd);
    third.wait_for("serving the Workload API").await;
    third.stop().await;
    first.stop().await;
    assert!(gone(&first.socket));
}

#[tokio::test]
async fn two_agents_started_at_once_on_one_socket_one_wins_and_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let server = {
        std::fs::create_dir_all(dir.path().join("s")).unwrap();
        Server::start(&dir.path().join("s")).await
    };
    let socket = dir.path().join("run/api.sock");
    let (ta, _) = server.join_token().await;
    let (tb, _) = server.join_token().await;
    let cmd_a = agent_cmd(&server, &dir.path().join("a"), &socket, &ta).await;
    let cmd_b = agent_cmd(&server, &dir.path().join("b"), &socket, &tb).await;
    let (pa, pb) = (Proc::spawn("agent a", cmd_a), Proc::spawn("agent b", cmd_b));
    let (mut loser, mut winner) = loser_first(pa, pb).await;
    let line = refused(&mut loser).await;
    assert_in_use(&line, &socket, None, winner.pid());
    winner.wait_for("serving the Workload API").await;
    agent_answers(&socket).await;
    winner.stop().await;
    assert!(gone(&socket));
}
