//! Normal events are not warnings: an operator who alerts on WARN must not
//! be paged by the agent renewing its own SVID or by a server restart.

// A test reports failure by panicking, with the process logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use oxid_e2e::{Agent, Server};

/// The WARN and ERROR lines of a log.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewals_and_a_server_restart_log_no_warning() {
    let dir = tempfile::tempdir().unwrap();
    // 10 s agent SVIDs: the agent renews its own every 5 s or so, and each
    // renewal retires the SVID its sync stream was opened with.
    let mut server = Server::start_with(
        dir.path(),
        "",
        "[ca]\nttl = \"6h\"\nagent_svid_ttl = \"10s\"\n",
    )
    .await;
    let (token, _) = server.join_token().await;
    let mut agent = Agent::start(dir.path(), &server, &token).await;
    agent
        .proc
        .wait_for_nth(
            "reconnecting the sync stream with the renewed agent SVID",
            2,
        )
        .await;
    // The stream opened with the second renewed SVID is up.
    agent.proc.wait_for_nth("connected to the server", 3).await;

    // A normal server stop ends the stream with the typed reason.
    server.stop().await;
    let stopping = agent
        .proc
        .wait_for("the server is stopping; reconnecting")
        .await;
    // Up to that line: the retries against a server that is down, after
    // it, are real failures and do warn.
    let log = agent.proc.log();
    let until = log
        .find(&stopping)
        .map_or(log.len(), |i| i + stopping.len());
    assert_eq!(
        warnings(&log[..until]),
        Vec::<&str>::new(),
        "agent log:\n{log}"
    );
    let server_log = server.proc.log();
    assert_eq!(
        warnings(&server_log),
        Vec::<&str>::new(),
        "server log:\n{server_log}"
    );

    // The agent comes back by itself once the server does.
    server.restart().await;
    let connected = agent.proc.log().matches("connected to the server").count();
    agent
        .proc
        .wait_for_nth("connected to the server", connected + 1)
        .await;
    agent.stop().await;
}
