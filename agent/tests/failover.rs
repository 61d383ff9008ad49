//! An agent given several server addresses (issue 15 item 5): when the
//! connection to its server goes silent it leaves it for the next address
//! within seconds (HTTP/2 keepalive), resumes its sync there, and its
//! workloads' streams never end; when the server ends the connection at
//! its `max_connection_age`, the agent moves to the next address the same
//! way, and that is not counted as a failover. One real server (sled)
//! reached through two TCP proxies stands for two servers: which one the
//! agent is on is the proxy it dialled, read from `oxid_agent_server`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Harness, NetMode, Proxy, WAIT, http_get, my_uid};
use oxid_agent::config::AgentFile;
use tokio_stream::StreamExt as _;

fn free_port() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// The value of the sample `name` (with its labels) on `/metrics`, if any.
async fn sample(metrics: SocketAddr, name: &str) -> Option<f64> {
    let body = http_get(metrics, "/metrics").await.ok()?;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the agent's sync stream is on `proxy`.
async fn until_on(metrics: SocketAddr, proxy: &Proxy) {
    let name = format!("oxid_agent_server{{address=\"{}\"}}", proxy.addr);
    let deadline = tokio::time::Instant::now() + WAIT;
    while sample(metrics, &name).await != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never got onto {}",
            proxy.addr
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A workload's X.509 context stream, followed in a task: the SPIFFE IDs
/// of each update; the task ends only if the stream does.
struct Watched {
    ids: tokio::sync::watch::Receiver<BTreeSet<String>>,
    task: tokio::task::JoinHandle<String>,
}

async fn watch_contexts(client: spiffe::WorkloadApiClient) -> Watched {
    // Once the restarted agent serves the identity: a stream opened before
    // would end at once with "no identity issued".
    common::eventually(|| client.fetch_x509_context()).await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let (tx, ids) = tokio::sync::watch::channel(BTreeSet::new());
    let task = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Some(Ok(context)) => {
                    let now: BTreeSet<String> = context
                        .svids()
                        .iter()
                        .map(|s| s.spiffe_id().to_string())
                        .collect();
                    let _ = tx.send(now);
                }
                Some(Err(e)) => return format!("the stream failed: {e}"),
                None => return "the stream ended".to_owned(),
            }
        }
    });
    Watched { ids, task }
}

impl Watched {
    async fn until_holds(&mut self, id: &str) {
        tokio::time::timeout(WAIT, self.ids.wait_for(|ids| ids.contains(id)))
            .await
            .unwrap_or_else(|_| panic!("{id} never reached the workload"))
            .unwrap();
    }

    fn assert_open(&self) {
        assert!(
            !self.task.is_finished(),
            "the workload's stream ended during the server change"
        );
    }
}

/// The harness's agent restarted with its saved identity, dialling the two
/// proxies in this order, with a metrics listener.
async fn agent_on_two(h: &mut Harness) -> (Proxy, Proxy, SocketAddr) {
    let (first, second) = (
        Proxy::start(h.server_addr).await,
        Proxy::start(h.server_addr).await,
    );
    h.stop_agent().await;
    h.agent_extra = AgentFile {
        server_addresses: Some(vec![first.addr.to_string(), second.addr.to_string()]),
        ..Default::default()
    };
    let metrics = free_port();
    h.start_agent_with_metrics(metrics);
    (first, second, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_gone_silent_is_left_for_the_next_address_and_workload_streams_go_on() {
    // Agent SVIDs of 12 s: renewed every 3 to 9 s, so also after the move.
    let mut h = Harness::start_with("[ca]\nagent_svid_ttl = \"12s\"\n").await;
    let _ = h.with_web_identity().await;
    let (first, second, metrics) = agent_on_two(&mut h).await;
    let mut watched = watch_contexts(h.client().await).await;
    watched.until_holds("spiffe://example.org/web").await;
    until_on(metrics, &first).await;
    assert_eq!(
        sample(metrics, "oxid_agent_server_failovers_total").await,
        Some(0.0)
    );

    // The first "server" stops answering anything, keepalive pings
    // included, without closing the connection; and, as a hung server
    // would, it completes no new connection (its listener goes away, the
    // silent connection stays held), so an agent renewal reconnecting
    // meanwhile cannot land there again.
    first.set(NetMode::Blackhole);
    drop(first);
    let cut = Instant::now();
    until_on(metrics, &second).await;
    println!(
        "failover after the connection went silent: {:?}",
        cut.elapsed()
    );
    assert_eq!(
        sample(metrics, "oxid_agent_server_failovers_total").await,
        Some(1.0)
    );
    watched.assert_open();

    // The sync goes on from the new server: a new entry reaches the
    // workload's open stream.
    h.create_entry(
        "spiffe://example.org/after-failover",
        &[&format!("unix:uid:{}", my_uid())],
    )
    .await;
    watched
        .until_holds("spiffe://example.org/after-failover")
        .await;
    // The agent renews its own SVID there too (the first address is still
    // silent, so the renewal went through the second).
    let moved = serial(&h).await;
    common::eventually(|| async {
        let now = serial(&h).await;
        if now == moved {
            Err(format!("still {now}"))
        } else {
            Ok(())
        }
    })
    .await;
    watched.assert_open();
}

/// The agent's current serial, as the server stores it.
async fn serial(h: &Harness) -> String {
    common::admin(&h.admin_socket())
        .await
        .get_agent(oxid_proto::admin::AgentRequest {
            spiffe_id: h.agent_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_servers_max_connection_age_the_agent_moves_to_the_next_address() {
    let mut h = Harness::start_with("max_connection_age = \"2s\"\n").await;
    let _ = h.with_web_identity().await;
    let (first, second, metrics) = agent_on_two(&mut h).await;
    let watched = watch_contexts(h.client().await).await;
    until_on(metrics, &first).await;
    // 2 s ± 10 % per connection, then the next address, then back.
    until_on(metrics, &second).await;
    until_on(metrics, &first).await;
    watched.assert_open();
    // Planned moves, not failovers.
    assert_eq!(
        sample(metrics, "oxid_agent_server_failovers_total").await,
        Some(0.0)
    );
    let ready = http_get(metrics, "/ready").await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

#[test]
fn a_server_toml_with_a_bad_max_connection_age_is_refused() {
    for (value, why) in [
        ("\"0s\"", "must be between 1s and 7d"),
        ("\"8d\"", "must be between 1s and 7d"),
        ("\"soon\"", "invalid duration"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, format!("max_connection_age = {value}\n")).unwrap();
        let e = oxid_server::config::Config::load(Some(&path), Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{value}: {e}");
    }
}

/// The binary refuses bad server addresses with one error line naming the
/// problem, from flags and from agent.toml, before it contacts anything.
#[test]
fn the_binary_refuses_bad_server_addresses_saying_why() {
    let bin = env!("CARGO_BIN_EXE_oxid-agent");
    let dir = tempfile::tempdir().unwrap();
    let one_line = |out: std::process::Output, why: &str| {
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: configuration: ") && err.contains(why),
            "{err}"
        );
    };
    for (flags, why) in [
        (vec!["--server-address", "https://ca-1:8081"], "not a URL"),
        (vec!["--server-address", "ca-1"], "no port"),
        (
            vec![
                "--server-address",
                "ca-1:8081",
                "--server-address",
                "CA-1:8081",
            ],
            "given twice",
        ),
        (vec!["--server-address", "::1:8081"], "needs brackets"),
        (vec!["--server-keepalive-secs", "0"], "between 1 and 60"),
    ] {
        let out = std::process::Command::new(bin)
            .arg("run")
            .args(&flags)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        one_line(out, why);
    }
    for (toml, why) in [
        (
            "server_address = \"a:1\"\nserver_addresses = [\"b:1\"]\n",
            "not both",
        ),
        ("server_addresses = []\n", "is empty"),
        ("server_addresses = [\"a:0\"]\n", "between 1 and 65535"),
    ] {
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, toml).unwrap();
        let out = std::process::Command::new(bin)
            .arg("validate")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        one_line(out, why);
    }
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "server_addresses = [\"ca-1.example:8081\", \"[::1]:8081\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .arg("validate")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("servers ca-1.example:8081, [::1]:8081"),
        "{said}"
    );
}
