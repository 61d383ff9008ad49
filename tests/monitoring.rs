//! Monitoring, with the real binaries as processes: every metric the server
//! and the agent serve moves when the thing it counts happens, scraped over
//! HTTP from their `/metrics`; `promtool` accepts what they serve, the alert
//! rules, and the rule tests that fire each alert; and every metric the
//! Grafana dashboard and the alerts query exists on a live `/metrics`.
//!
//! `promtool` comes from Debian's `prometheus` package (scripts/test
//! installs it); without it these tests fail and say so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use oxid_e2e::{Agent, Server, WAIT, bin, run};
use oxid_proto::workload as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The repository root (deploy/ lives there).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("promtool is not installed; install it: apt-get install -y prometheus")
    })
}

/// Runs promtool with `args` and `stdin`; its exit code and output.
async fn promtool_run(args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = tokio::process::Command::new(promtool())
        .args(args)
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A `GET path` answer: its status code, Content-Type and body.
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

async fn get(address: SocketAddr, path: &str, accept: Option<&str>) -> Answer {
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: oxid\r\n{accept}Connection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Answer {
        status,
        content_type,
        body: body.to_owned(),
    }
}

/// One scrape of a `/metrics` page in the Prometheus text format.
struct Scrape {
    text: String,
    /// (sample name, labels) → value.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    async fn of(address: SocketAddr) -> Self {
        let answer = get(address, "/metrics", None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer.content_type, "text/plain; version=0.0.4; charset=utf-8",
            "what Prometheus and promtool read"
        );
        Self::parse(answer.body)
    }

    fn parse(text: String) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("{line:?}")),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self { text, samples }
    }

    /// The sum of the samples of `name` carrying all of `labels` (0 if
    /// none); `None` if the page has no such sample.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    /// Every metric name the page serves (families and samples).
    fn names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.samples.iter().map(|(n, _, _)| n.clone()).collect();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                names.insert(rest.split_whitespace().next().unwrap().to_owned());
            }
        }
        names
    }
}

/// Scrapes `address` until `check` accepts a scrape; that scrape.
async fn until(address: SocketAddr, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = Scrape::of(address).await;
        if check(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never: {what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The `key=value` word of the log line containing `marker`.
fn logged(proc_log: &str, marker: &str, key: &str) -> SocketAddr {
    let line = proc_log
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in\n{proc_log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .trim_matches('"')
        .parse()
        .unwrap()
}

/// A server and an agent, both serving metrics on port 0, with an entry
/// for this test's uid whose SVID lives `ttl`.
struct Live {
    dir: tempfile::TempDir,
    server: Server,
    agent: Agent,
    agent_id: String,
    server_metrics: SocketAddr,
    agent_metrics: SocketAddr,
}

impl Live {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with(
            dir.path(),
            "metrics_address = \"127.0.0.1:0\"",
            "[ca]\nttl = \"6h\"\nagent_svid_ttl = \"10m\"\n",
        )
        .await;
        let server_metrics = logged(&server.proc.log(), "oxid-server ready", "metrics=");
        let (token, agent_id) = server.join_token().await;
        let agent = Agent::start_with(
            dir.path(),
            &server,
            &token,
            &["--metrics-address", "127.0.0.1:0"],
        )
        .await;
        let agent_metrics = logged(
            &agent.proc.log(),
            "oxid-agent serving metrics",
            "metrics_address=",
        );
        Self {
            dir,
            server,
            agent,
            agent_id,
            server_metrics,
            agent_metrics,
        }
    }

    async fn entry(&self, ttl: &str) -> String {
        let uid = format!("unix:uid:{}", rustix::process::getuid().as_raw());
        self.server
            .create_entry(
                "spiffe://example.org/monitored",
                &self.agent_id,
                &["--selector", &uid, "--x509-svid-ttl", ttl],
            )
            .await
    }

    /// `oxid-agent api <args>` against this agent: exit code and stderr.
    async fn api(&self, args: &[&str]) -> (i32, String) {
        let socket = self.agent.socket.display().to_string();
        let mut all = vec!["api"];
        all.extend(args);
        all.extend(["--socket-path", &socket]);
        let (code, _, err) = run(&bin("oxid-agent"), &all).await;
        (code, err)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_moves_with_what_it_counts() {
    let live = Live::start().await;
    let (srv, agt) = (live.server_metrics, live.agent_metrics);

    // An attested, synced agent: counted by the server; connected, current
    // (sync age 0, no longer -1), ready.
    let s = until(srv, "the server counts the agent", |s| {
        s.get("oxid_agents", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(s.value("oxid_entries", &[]), 0.0);
    assert_eq!(s.value("oxid_server_ready", &[]), 1.0);
    let active = [("state", "active")];
    let not_after = s.value("oxid_ca_not_after_seconds", &active);
    let not_before = s.value("oxid_ca_not_before_seconds", &active);
    assert!(not_before <= now_secs() && not_after > now_secs() + 5.0 * 3600.0);
    let x509_before = s.value("oxid_svids_signed_total", &[("kind", "x509")]);
    assert_eq!(s.value("oxid_svids_signed_total", &[("kind", "jwt")]), 0.0);
    let revision = s.value("oxid_store_revision", &[]);
    let a = until(agt, "the agent syncs", |a| {
        a.get("oxid_agent_server_connected", &[]) == Some(1.0)
            && a.get("oxid_agent_ready", &[]) == Some(1.0)
    })
    .await;
    let age = a.value("oxid_agent_sync_age_seconds", &[]);
    assert!((0.0..1.0).contains(&age), "sync age {age}");
    assert_eq!(a.value("oxid_agent_entries", &[]), 0.0);
    assert_eq!(a.value("oxid_agent_svid_min_remaining_seconds", &[]), -1.0);

    // An entry whose SVID lives 6 s: stored, synced, signed, rotated.
    let entry = live.entry("6s").await;
    let s = until(srv, "the server counts the entry and signs", |s| {
        s.get("oxid_entries", &[]) == Some(1.0)
            && s.value("oxid_svids_signed_total", &[("kind", "x509")]) > x509_before
    })
    .await;
    assert!(s.value("oxid_store_revision", &[]) > revision);
    assert!(
        s.value(
            "oxid_rpc_requests_total",
            &[
                ("api", "agent"),
                ("method", "SignX509Svids"),
                ("code", "OK")
            ]
        ) >= 1.0
    );
    let a = until(agt, "the agent holds the SVID", |a| {
        a.get("oxid_agent_svids_cached", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(a.value("oxid_agent_entries", &[]), 1.0);
    let remaining = a.value("oxid_agent_svid_min_remaining_seconds", &[]);
    assert!(remaining > 0.0 && remaining <= 6.0, "remaining {remaining}");
    let a = until(agt, "the agent rotates the SVID", |a| {
        a.value("oxid_agent_svid_rotations_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(a.value("oxid_agent_svids_past_rotation", &[]), 0.0);

    // A JWT-SVID for a workload: minted by the server (counted, bug 4),
    // cached by the agent, both calls counted with their latency.
    let (code, err) = live
        .api(&["fetch", "jwt", "--audience", "monitoring"])
        .await;
    assert_eq!(code, 0, "{err}");
    let s = until(srv, "the server counts the JWT-SVID", |s| {
        s.value("oxid_svids_signed_total", &[("kind", "jwt")]) == 1.0
    })
    .await;
    let mint = [("api", "agent"), ("method", "MintJwtSvid")];
    assert_eq!(
        s.value(
            "oxid_rpc_requests_total",
            &[mint[0], mint[1], ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(s.value("oxid_rpc_duration_seconds_count", &mint), 1.0);
    assert_eq!(
        s.value(
            "oxid_rpc_duration_seconds_bucket",
            &[mint[0], mint[1], ("le", "+Inf")]
        ),
        1.0
    );
    let a = Scrape::of(agt).await;
    assert_eq!(a.value("oxid_agent_jwt_svids_cached", &[]), 1.0);
    let fetch_jwt = [("api", "workload"), ("method", "FetchJWTSVID")];
    assert_eq!(
        a.value(
            "oxid_rpc_requests_total",
            &[fetch_jwt[0], fetch_jwt[1], ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(a.value("oxid_rpc_duration_seconds_count", &fetch_jwt), 1.0);

    // A refused admin call, counted by its code's name.
    let admin = live.server.admin_socket.display().to_string();
    let (code, _, _) = run(
        &bin("oxid-server"),
        &[
            "agent",
            "show",
            "--spiffe-id",
            "spiffe://example.org/oxid/agent/join_token/none",
            "--socket-path",
            &admin,
        ],
    )
    .await;
    assert_ne!(code, 0);
    let s = Scrape::of(srv).await;
    assert_eq!(
        s.value(
            "oxid_rpc_requests_total",
            &[("api", "admin"), ("code", "NotFound")]
        ),
        1.0
    );

    // A workload whose process is gone by the time it calls: attestation
    // refused, counted.
    let (code, msg) = attestation_refused(&live).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{msg}");
    let a = Scrape::of(agt).await;
    assert_eq!(a.value("oxid_agent_attestation_failures_total", &[]), 1.0);
    let denied = [
        ("api", "workload"),
        ("method", "FetchX509SVID"),
        ("code", "PermissionDenied"),
    ];
    let denied_before = a.value("oxid_rpc_requests_total", &denied);

    // The entry leaves: the agent drops it and its SVID, and a workload
    // that asks is refused (PermissionDenied, by name).
    live.server
        .cli(&["entry", "delete", "--entry-id", &entry])
        .await;
    until(srv, "the server counts the deletion", |s| {
        s.get("oxid_entries", &[]) == Some(0.0)
    })
    .await;
    until(agt, "the agent drops the entry", |a| {
        a.get("oxid_agent_entries", &[]) == Some(0.0)
            && a.get("oxid_agent_svids_cached", &[]) == Some(0.0)
            && a.get("oxid_agent_svid_min_remaining_seconds", &[]) == Some(-1.0)
    })
    .await;
    let (code, _) = live.api(&["fetch", "x509"]).await;
    assert_ne!(code, 0);
    let a = Scrape::of(agt).await;
    assert_eq!(
        a.value("oxid_rpc_requests_total", &denied),
        denied_before + 1.0
    );

    // A CA rotation step: the prepared authority appears, then is active.
    live.server.cli(&["ca", "rotate", "--prepare"]).await;
    let s = Scrape::of(srv).await;
    assert!(
        s.get("oxid_ca_not_after_seconds", &[("state", "prepared")])
            .is_some(),
        "{}",
        s.text
    );
    live.server.cli(&["ca", "rotate", "--activate"]).await;
    let s = Scrape::of(srv).await;
    assert!(
        s.get("oxid_ca_not_after_seconds", &[("state", "old")])
            .is_some(),
        "{}",
        s.text
    );
    assert!(s.value("oxid_ca_not_before_seconds", &active) >= not_before);

    // Evicted: the server stops counting it and refuses its calls; the
    // agent loses its stream and its view starts to age.
    live.server
        .cli(&["agent", "evict", "--spiffe-id", &live.agent_id])
        .await;
    let s = until(srv, "the server drops the agent", |s| {
        s.get("oxid_agents", &[]) == Some(0.0)
    })
    .await;
    drop(s);
    let a = until(agt, "the agent's view ages", |a| {
        a.get("oxid_agent_server_connected", &[]) == Some(0.0)
            && a.value("oxid_agent_sync_age_seconds", &[]) > 0.0
    })
    .await;
    assert_eq!(a.value("oxid_agent_ready", &[]), 0.0);
    let first = a.value("oxid_agent_sync_age_seconds", &[]);
    let a = until(agt, "the sync age grows", |a| {
        a.value("oxid_agent_sync_age_seconds", &[]) >= first + 0.2
    })
    .await;
    assert!(a.value("oxid_agent_sync_age_seconds", &[]) < 60.0);
    until(srv, "the server refuses the evicted agent", |s| {
        s.get(
            "oxid_rpc_requests_total",
            &[("api", "agent"), ("code", "PermissionDenied")],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    drop(live.dir);
}

/// The attacker: connects to the agent, hands the connection to this
/// test over `handoff`, and exits once the test has it.
const HANDOFF: &str = "\
import socket, sys
agent, handoff = sys.argv[1:3]
s = socket.socket(socket.AF_UNIX)
s.connect(agent)
p = socket.socket(socket.AF_UNIX)
p.connect(handoff)
socket.send_fds(p, [b'x'], [s.fileno()])
p.recv(1)
";

/// A FetchX509SVID over a connection whose process has exited: its status.
async fn attestation_refused(live: &Live) -> (tonic::Code, String) {
    let handoff = live.dir.path().join("handoff.sock");
    let listener = tokio::net::UnixListener::bind(&handoff).unwrap();
    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", HANDOFF])
        .arg(&live.agent.socket)
        .arg(&handoff)
        .kill_on_drop(true)
        .spawn()
        .expect("/usr/bin/python3 is required (apt-get install -y python3)");
    let (control, _) = listener.accept().await.unwrap();
    let control = control.into_std().unwrap();
    control.set_nonblocking(false).unwrap();
    let fd = receive_fd(&control);
    drop(control);
    child.wait().await.unwrap();
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).unwrap();
    let once = Mutex::new(Some(stream));
    let channel = tonic::transport::Endpoint::try_from("http://uds.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let stream = once.lock().unwrap().take();
            async move {
                let stream = stream.ok_or_else(|| std::io::Error::other("used once"))?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(stream)?))
            }
        }))
        .await
        .unwrap();
    let mut client = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(pb::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = match client.fetch_x509svid(req).await {
        Ok(mut stream) => stream.get_mut().message().await.err().unwrap(),
        Err(status) => status,
    };
    (status.code(), status.message().to_owned())
}

fn receive_fd(from: &std::os::unix::net::UnixStream) -> OwnedFd {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        from,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )
    .unwrap();
    control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("a descriptor was passed")
}

/// A live server's and agent's scrapes, once the agent holds an SVID and
/// a JWT-SVID (so every family has samples).
async fn live_scrapes() -> (Live, Scrape, Scrape) {
    let live = Live::start().await;
    live.entry("1h").await;
    until(live.agent_metrics, "the agent holds the SVID", |a| {
        a.get("oxid_agent_svids_cached", &[]) == Some(1.0)
    })
    .await;
    let (code, err) = live
        .api(&["fetch", "jwt", "--audience", "monitoring"])
        .await;
    assert_eq!(code, 0, "{err}");
    let server = Scrape::of(live.server_metrics).await;
    let agent = Scrape::of(live.agent_metrics).await;
    (live, server, agent)
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_the_metrics_the_rules_and_their_tests() {
    let (live, server, agent) = live_scrapes().await;
    for (who, scrape) in [("server", &server), ("agent", &agent)] {
        let (code, out) = promtool_run(&["check", "metrics"], &scrape.text).await;
        assert_eq!(
            code, 0,
            "promtool check metrics on the {who}'s /metrics:\n{out}\n{}",
            scrape.text
        );
    }
    // A scraper that asks for OpenMetrics (as Prometheus does) gets it.
    for address in [live.server_metrics, live.agent_metrics] {
        let om = get(
            address,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        )
        .await;
        assert_eq!(
            om.content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
        assert!(
            om.body.contains("# TYPE oxid_rpc_requests counter"),
            "{}",
            om.body
        );
    }
    let (code, out) = promtool_run(&["check", "rules", "deploy/prometheus/alerts.yml"], "").await;
    assert_eq!(code, 0, "promtool check rules:\n{out}");
    let (code, out) =
        promtool_run(&["test", "rules", "deploy/prometheus/alerts_test.yml"], "").await;
    assert_eq!(code, 0, "promtool test rules:\n{out}");
    let (code, out) =
        promtool_run(&["check", "config", "deploy/prometheus/prometheus.yml"], "").await;
    assert_eq!(code, 0, "promtool check config:\n{out}");

    // Each alert has a test case in which it fires.
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/alerts_test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for name in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let fires = lines
            .windows(2)
            .any(|w| w[0] == format!("alertname: {name}") && w[1] == "exp_alerts:");
        assert!(fires, "no test case in alerts_test.yml fires {name}");
    }
}

/// Every PromQL expression of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/oxid-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{panel}");
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}

/// The `oxid_*` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("oxid_") {
        let boundary = i == 0 || {
            let b = rest.as_bytes()[i - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if boundary {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_alerts_query_only_metrics_that_exist() {
    let (_live, server, agent) = live_scrapes().await;
    let served: BTreeSet<String> = server.names().union(&agent.names()).cloned().collect();
    let exprs = dashboard_exprs();
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    // Comments (the federation placeholder) name metrics not built yet.
    let alert_exprs: String = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut queried = metric_names(&exprs.join("\n"));
    // Annotations name metrics too; those in expressions are what matters,
    // but a name in a description must exist as well.
    queried.extend(metric_names(&alert_exprs));
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:?}\nserved: {served:?}"
    );

    // The dashboard's expressions are valid PromQL: promtool checks them as
    // recording rules, with Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$server", ".*")
            .replace("$agent", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let (code, out) = promtool_run(&["check", "rules", file.to_str().unwrap()], "").await;
    assert_eq!(code, 0, "the dashboard's PromQL:\n{out}");
}
