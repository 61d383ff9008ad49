//! The live server and agent the monitoring tests scrape, and the
//! helpers they share: an HTTP GET, a parsed scrape, promtool.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use oxid_e2e::{Agent, Server, WAIT, bin, receive_fd, run};
use oxid_proto::workload as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The repository root (deploy/ lives there).
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub(crate) fn promtool() -> PathBuf {
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
pub(crate) async fn promtool_run(args: &[&str], stdin: &str) -> (i32, String) {
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
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) body: String,
}

pub(crate) async fn get(address: SocketAddr, path: &str, accept: Option<&str>) -> Answer {
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
pub(crate) struct Scrape {
    pub(crate) text: String,
    /// (sample name, labels) → value.
    pub(crate) samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub(crate) async fn of(address: SocketAddr) -> Self {
        let answer = get(address, "/metrics", None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer.content_type, "text/plain; version=0.0.4; charset=utf-8",
            "what Prometheus and promtool read"
        );
        Self::parse(answer.body)
    }

    pub(crate) fn parse(text: String) -> Self {
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
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    /// Every metric name the page serves (families and samples).
    pub(crate) fn names(&self) -> BTreeSet<String> {
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
pub(crate) async fn until(
    address: SocketAddr,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> Scrape {
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

pub(crate) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The `key=value` word of the log line containing `marker`.
pub(crate) fn logged(proc_log: &str, marker: &str, key: &str) -> SocketAddr {
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
pub(crate) struct Live {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) server: Server,
    pub(crate) agent: Agent,
    pub(crate) agent_id: String,
    pub(crate) server_metrics: SocketAddr,
    pub(crate) agent_metrics: SocketAddr,
}

impl Live {
    pub(crate) async fn start() -> Self {
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

    pub(crate) async fn entry(&self, ttl: &str) -> String {
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
    pub(crate) async fn api(&self, args: &[&str]) -> (i32, String) {
        let socket = self.agent.socket.display().to_string();
        let mut all = vec!["api"];
        all.extend(args);
        all.extend(["--socket-path", &socket]);
        let (code, _, err) = run(&bin("oxid-agent"), &all).await;
        (code, err)
    }
}

/// The attacker: connects to the agent, hands the connection to this
/// test over `handoff`, and exits once the test has it.
pub(crate) const HANDOFF: &str = "\
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
pub(crate) async fn attestation_refused(live: &Live) -> (tonic::Code, String) {
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
