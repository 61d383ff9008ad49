//! Connection exhaustion on the Workload API socket (issue 12, finding 4):
//! another uid holding as many connections as it can get is capped with a
//! clear refusal while a workload with an entry keeps being served; silent,
//! half-preface and idle connections are closed after the (lowered)
//! timeouts, an open stream never is; caps that leave no descriptors for
//! the agent's own files are refused at start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Harness, WAIT, my_uid};
use oxid_agent::config::AgentFile;
use oxid_agent::workload::with_header;
use oxid_proto::workload as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_oxid-agent");
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// What the flooding process is told, in its environment.
const FLOOD_SOCKET: &str = "OXID_TEST_FLOOD_SOCKET";
const FLOOD_COUNT: &str = "OXID_TEST_FLOOD_COUNT";

/// Reads until the agent closes `conn`; everything it sent. Panics if it
/// stays open for `within`.
async fn read_to_close(conn: &mut UnixStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the agent closed the connection");
    got
}

/// The debug text of the first GOAWAY frame in `bytes`, if any.
fn goaway_text(mut bytes: &[u8]) -> Option<String> {
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let payload = bytes.get(9..9 + len)?;
        if bytes[3] == 0x7 && len >= 8 {
            return Some(String::from_utf8_lossy(&payload[8..]).into_owned());
        }
        bytes = &bytes[9 + len..];
    }
    None
}

/// The flooding process (this test binary again, under another uid): opens
/// `FLOOD_COUNT` connections, prints `held <n> refused <n> <reason>`, then
/// holds the connections until its stdin closes. A no-op in a normal run.
#[tokio::test]
async fn flood_helper() {
    let Ok(socket) = std::env::var(FLOOD_SOCKET) else {
        return;
    };
    let count: usize = std::env::var(FLOOD_COUNT).unwrap().parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..count {
        conns.push(UnixStream::connect(&socket).await.unwrap());
    }
    // A refused connection is answered and closed at once; a held one
    // stays open (the agent's SETTINGS aside).
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                let closed = tokio::time::timeout(Duration::from_secs(3), async {
                    loop {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await
                .is_ok();
                let verdict = closed
                    .then(|| goaway_text(&got).unwrap_or_else(|| "closed without GOAWAY".into()));
                (c, verdict)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (_, Some(why)) => refused.push(why),
            (c, None) => held.push(c),
        }
    }
    println!(
        "held {} refused {} {}",
        held.len(),
        refused.len(),
        refused.first().map_or("-", |s| s.as_str())
    );
    // Held until the test closes our stdin (or kills us).
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    drop(held);
}

/// Starts the flooding process as uid 65534; returns it (kill it to end
/// the flood) and its summary line.
// The caller kills and waits for it; on a panic, dropping its stdin ends it.
#[allow(clippy::zombie_processes)]
fn flood_as_nobody(socket: &std::path::Path, count: usize) -> (std::process::Child, String) {
    assert_eq!(
        my_uid(),
        0,
        "this test switches uid and must run as root (CI does)"
    );
    let mut child = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "flood_helper",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(FLOOD_SOCKET, socket)
        .env(FLOOD_COUNT, count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) is required");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // libtest may print "test flood_helper ... " on the same line first.
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the flood helper exited"
        );
        if let Some(at) = line.find("held ") {
            return (child, line[at..].trim().to_owned());
        }
    }
}

async fn agent_with(h: &mut Harness, extra: AgentFile) {
    h.stop_agent().await;
    h.agent_extra = extra;
    h.start_agent(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_uid_at_its_connection_cap_is_refused_and_others_are_served() {
    let mut h = Harness::start().await;
    agent_with(
        &mut h,
        AgentFile {
            max_connections: Some(80),
            max_connections_per_uid: Some(64),
            connection_preface_timeout_secs: Some(3600),
            ..Default::default()
        },
    )
    .await;
    let client = h.with_web_identity().await;

    // uid 65534 (no entry) asks for 100 connections: 64 held, the rest
    // refused with a GOAWAY that names the limit.
    let (mut flood, summary) = flood_as_nobody(&h.workload_socket(), 100);
    let parts: Vec<&str> = summary.splitn(5, ' ').collect();
    assert_eq!((parts[1], parts[3]), ("64", "36"), "{summary}");
    assert!(
        parts[4].contains("uid 65534") && parts[4].contains("max_connections_per_uid"),
        "{summary}"
    );

    // While the flood holds its 64, a workload with an entry is served.
    for _ in 0..5 {
        let svid = client.fetch_x509_svid().await.unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    }
    // The global cap: 80 in all, so this uid gets the 16 left (one is the
    // client's), then a refusal naming max_connections.
    let mut mine = Vec::new();
    let refusal = loop {
        let mut c = UnixStream::connect(h.workload_socket()).await.unwrap();
        let mut buf = [0u8; 256];
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            let mut all = Vec::new();
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        match got {
            Ok(bytes) => break goaway_text(&bytes).unwrap_or_default(),
            Err(_) => mine.push(c),
        }
        assert!(mine.len() <= 16, "more than max_connections accepted");
    };
    assert!(refusal.contains("(max_connections)"), "{refusal}");
    assert!(
        mine.len() >= 14,
        "{} of this uid's connections held",
        mine.len()
    );

    // The flood ends: its slots are free again.
    let _ = flood.kill();
    let _ = flood.wait();
    drop(mine);
    let svid = common::eventually(|| client.fetch_x509_svid()).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_half_sent_and_idle_connections_are_closed_open_streams_are_not() {
    let mut h = Harness::start().await;
    agent_with(
        &mut h,
        AgentFile {
            connection_preface_timeout_secs: Some(1),
            connection_idle_timeout_secs: Some(2),
            ..Default::default()
        },
    )
    .await;
    let _client = h.with_web_identity().await;
    let socket = h.workload_socket();

    // An open FetchX509SVID stream: a call in flight, never idle.
    let mut raw = h.raw_client().await;
    let mut stream = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    let started = Instant::now();
    let mut silent = UnixStream::connect(&socket).await.unwrap();
    let mut half = UnixStream::connect(&socket).await.unwrap();
    half.write_all(&PREFACE[..12]).await.unwrap();
    let mut idle = UnixStream::connect(&socket).await.unwrap();
    idle.write_all(PREFACE).await.unwrap();
    idle.write_all(SETTINGS).await.unwrap();
    // A HEADERS frame announced as 100 bytes, 20 of them sent.
    let mut partial = UnixStream::connect(&socket).await.unwrap();
    partial.write_all(PREFACE).await.unwrap();
    partial.write_all(SETTINGS).await.unwrap();
    partial
        .write_all(&[0, 0, 100, 1, 4, 0, 0, 0, 1])
        .await
        .unwrap();
    partial.write_all(&[0x82; 20]).await.unwrap();

    for (name, conn) in [
        ("silent", &mut silent),
        ("half a preface", &mut half),
        ("idle", &mut idle),
        ("partial HEADERS", &mut partial),
    ] {
        read_to_close(conn, Duration::from_secs(10)).await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{name} closed before its timeout"
        );
    }

    // Three idle timeouts on, the stream is still open: a new entry for
    // this uid reaches it.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    h.create_entry(
        "spiffe://example.org/second",
        &[&format!("unix:uid:{}", my_uid())],
    )
    .await;
    let update = tokio::time::timeout(WAIT, async {
        loop {
            let m = stream
                .message()
                .await
                .expect("the stream stays open")
                .unwrap();
            if m.svids.len() == 2 {
                return m;
            }
        }
    })
    .await
    .expect("the open stream got the new SVID");
    assert_eq!(update.svids.len(), 2);
}

#[test]
fn caps_that_leave_no_room_for_the_agents_own_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |nofile: &str| {
        Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg(AGENT_BIN)
            .arg("run")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket-path")
            .arg(dir.path().join("run/api.sock"))
            .output()
            .expect("prlimit (util-linux) is required")
    };
    // 300 descriptors: fewer than the 512 kept for the agent itself.
    let out = run("300:300");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("open-file limit (300)"), "{stderr}");
}
