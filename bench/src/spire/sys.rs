//! The systems compared, behind one interface so that every row runs the
//! same steps with the same client code against each: oxid (`oxid-server`,
//! `oxid-agent`, the `oxid-server` CLI) and SPIRE (`spire-server`,
//! `spire-agent`, the `spire-server` CLI), each as its users run it on one
//! host.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxid_e2e::{Agent, Proc};
use tokio::process::Command;

use crate::BenchResult;
use crate::cluster::{Cluster, agent_metrics_address, proc_stat};

/// Entries per CLI batch file: the oxid admin API's limit, used for both.
const BATCH: usize = 1000;
/// How long a process may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(300);

/// One of the systems in the table.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Oxid,
    /// SPIRE with its defaults.
    Spire,
    /// SPIRE with the settings that make it faster (`Setup::interval`).
    SpireTuned,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Oxid => "oxid",
            Self::Spire => "SPIRE (defaults)",
            Self::SpireTuned => "SPIRE (tuned)",
        }
    }
}

/// What every system of a run shares.
#[derive(Clone)]
pub(crate) struct Setup {
    /// The directory holding `spire-server` and `spire-agent`.
    pub(crate) spire_bin: PathBuf,
    /// The tuned SPIRE's agent `sync_interval` and server
    /// `cache_reload_interval` (SPIRE's default for both is 5 s).
    pub(crate) interval: String,
}

/// A server (with its data directory) of one system.
pub(crate) struct System {
    pub(crate) kind: Kind,
    setup: Setup,
    inner: Inner,
}

enum Inner {
    Oxid(Box<Cluster>),
    Spire(Box<SpireServer>),
}

struct SpireServer {
    dir: tempfile::TempDir,
    conf: PathBuf,
    socket: PathBuf,
    port: u16,
    proc: Proc,
}

/// An entry to register: SPIFFE ID, parent ID and one `unix:uid` selector.
pub(crate) struct Spec {
    pub(crate) spiffe_id: String,
    pub(crate) parent: String,
    pub(crate) uid: u32,
}

impl System {
    /// Starts the server of `kind`.
    pub(crate) async fn start(kind: Kind, setup: &Setup) -> BenchResult<Self> {
        let inner = match kind {
            Kind::Oxid => Inner::Oxid(Box::new(Cluster::start("", "").await?)),
            Kind::Spire | Kind::SpireTuned => {
                let dir = tempfile::tempdir()?;
                let port = free_port()?;
                let socket = dir.path().join("server/api.sock");
                let conf = dir.path().join("server.conf");
                let experimental = if kind == Kind::SpireTuned {
                    format!(
                        "experimental {{\n        cache_reload_interval = \"{}\"\n        \
                         events_based_cache = true\n    }}",
                        setup.interval
                    )
                } else {
                    String::new()
                };
                std::fs::write(
                    &conf,
                    spire_server_conf(dir.path(), &socket, port, &experimental),
                )?;
                let (proc, _) = spire_server_launch(&setup.spire_bin, &conf, &socket).await?;
                Inner::Spire(Box::new(SpireServer {
                    dir,
                    conf,
                    socket,
                    port,
                    proc,
                }))
            }
        };
        Ok(Self {
            kind,
            setup: setup.clone(),
            inner,
        })
    }

    pub(crate) fn server_pid(&self) -> BenchResult<u32> {
        match &self.inner {
            Inner::Oxid(c) => c.server_pid(),
            Inner::Spire(s) => s.proc.pid().ok_or_else(|| "spire-server exited".into()),
        }
    }

    /// Stops the server (SIGTERM, waiting for its exit).
    pub(crate) async fn stop_server(&mut self) {
        match &mut self.inner {
            Inner::Oxid(c) => c.server.stop().await,
            Inner::Spire(s) => s.proc.stop().await,
        }
    }

    /// Starts the stopped server again on its data; process start to ready
    /// (oxid: its `ready` line, printed once the entry index is built and
    /// it listens; SPIRE: its admin socket accepting, which it opens once
    /// its entry cache is built, confirmed by `spire-server healthcheck`).
    pub(crate) async fn start_server(&mut self) -> BenchResult<Duration> {
        let start = Instant::now();
        match &mut self.inner {
            Inner::Oxid(c) => {
                c.server.restart().await;
                Ok(start.elapsed())
            }
            Inner::Spire(s) => {
                let (proc, ready) =
                    spire_server_launch(&self.setup.spire_bin, &s.conf, &s.socket).await?;
                s.proc = proc;
                Ok(ready)
            }
        }
    }

    /// Starts an agent with a fresh join token; `cache` is how many SVIDs it
    /// signs ahead (oxid `--max-presigned-svids`, SPIRE
    /// `x509_svid_cache_max_size`; both default to 1,000).
    pub(crate) async fn agent(&mut self, cache: usize) -> BenchResult<SysAgent> {
        match &mut self.inner {
            Inner::Oxid(c) => {
                let cache = cache.to_string();
                let (mut agent, id) = c
                    .start_agent(&[
                        "--metrics-address",
                        "127.0.0.1:0",
                        "--max-presigned-svids",
                        &cache,
                    ])
                    .await?;
                let metrics = agent_metrics_address(&mut agent).await?;
                Ok(SysAgent {
                    id,
                    socket: agent.socket.clone(),
                    metrics,
                    inner: AgentInner::Oxid(agent),
                })
            }
            Inner::Spire(s) => {
                let bin = &self.setup.spire_bin;
                let sock = s.socket.display().to_string();
                let token = spire_token(bin, &s.socket).await?;
                let pem = cli(
                    bin,
                    "spire-server",
                    &["bundle", "show", "-socketPath", &sock],
                )
                .await?;
                let dir = s.dir.path().join(format!("agent-{}", &token[..8]));
                std::fs::create_dir_all(&dir)?;
                let bundle = dir.join("bundle.pem");
                std::fs::write(&bundle, pem)?;
                let metrics_port = free_port()?;
                let socket = dir.join("api.sock");
                let sync = if self.kind == Kind::SpireTuned {
                    format!(
                        "experimental {{\n        sync_interval = \"{}\"\n    }}",
                        self.setup.interval
                    )
                } else {
                    String::new()
                };
                let conf = dir.join("agent.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "agent {{\n    data_dir = \"{d}\"\n    log_level = \"WARN\"\n    \
                         server_address = \"127.0.0.1\"\n    server_port = \"{port}\"\n    \
                         socket_path = \"{socket}\"\n    trust_bundle_path = \"{bundle}\"\n    \
                         trust_domain = \"example.org\"\n    x509_svid_cache_max_size = {cache}\n    \
                         {sync}\n}}\n\
                         plugins {{\n    NodeAttestor \"join_token\" {{\n        plugin_data {{}}\n    }}\n    \
                         KeyManager \"disk\" {{\n        plugin_data {{\n            directory = \"{d}\"\n        }}\n    }}\n    \
                         WorkloadAttestor \"unix\" {{\n        plugin_data {{}}\n    }}\n}}\n\
                         telemetry {{\n    Prometheus {{\n        host = \"127.0.0.1\"\n        port = {metrics_port}\n    }}\n}}\n",
                        d = dir.display(),
                        port = s.port,
                        socket = socket.display(),
                        bundle = bundle.display(),
                    ),
                )?;
                let agent = SpireAgent {
                    conf,
                    token: token.clone(),
                };
                let proc = agent.launch(bin, &socket).await?;
                Ok(SysAgent {
                    id: format!("spiffe://example.org/spire/agent/join_token/{token}"),
                    socket,
                    metrics: format!("127.0.0.1:{metrics_port}"),
                    inner: AgentInner::Spire(agent, proc),
                })
            }
        }
    }

    /// The ID of an agent that could attest but does not run: a parent for
    /// entries that no agent fetches.
    pub(crate) async fn idle_parent(&mut self) -> BenchResult<String> {
        match &mut self.inner {
            Inner::Oxid(c) => Ok(c.token().await?.1),
            Inner::Spire(s) => Ok(format!(
                "spiffe://example.org/spire/agent/join_token/{}",
                spire_token(&self.setup.spire_bin, &s.socket).await?
            )),
        }
    }

    /// Registers one entry with the system's CLI, as an operator would.
    pub(crate) async fn create_entry(&self, e: &Spec) -> BenchResult<()> {
        let uid = format!("unix:uid:{}", e.uid);
        match &self.inner {
            Inner::Oxid(c) => {
                let sock = c.server.admin_socket.display().to_string();
                cli_path(
                    &oxid_e2e::bin("oxid-server"),
                    &[
                        "entry",
                        "create",
                        "--socket-path",
                        &sock,
                        "--spiffe-id",
                        &e.spiffe_id,
                        "--parent-id",
                        &e.parent,
                        "--selector",
                        &uid,
                    ],
                )
                .await?;
            }
            Inner::Spire(s) => {
                let sock = s.socket.display().to_string();
                cli(
                    &self.setup.spire_bin,
                    "spire-server",
                    &[
                        "entry",
                        "create",
                        "-socketPath",
                        &sock,
                        "-spiffeID",
                        &e.spiffe_id,
                        "-parentID",
                        &e.parent,
                        "-selector",
                        &uid,
                    ],
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Registers `entries` with the system's CLI from JSON files of
    /// [`BATCH`] entries (`entry create --data` / `-data`), one file after
    /// the other.
    pub(crate) async fn create_entries(&self, entries: &[Spec]) -> BenchResult<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("entries.json");
        for chunk in entries.chunks(BATCH) {
            let mut json = String::from("{\"entries\":[");
            for (i, e) in chunk.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                match self.kind {
                    Kind::Oxid => write!(
                        json,
                        "{sep}{{\"spiffe_id\":\"{}\",\"parent_id\":\"{}\",\"selectors\":[\"unix:uid:{}\"]}}",
                        e.spiffe_id, e.parent, e.uid
                    )?,
                    Kind::Spire | Kind::SpireTuned => write!(
                        json,
                        "{sep}{{\"spiffe_id\":\"{}\",\"parent_id\":\"{}\",\"selectors\":[{{\"type\":\"unix\",\"value\":\"uid:{}\"}}]}}",
                        e.spiffe_id, e.parent, e.uid
                    )?,
                }
            }
            json.push_str("]}");
            std::fs::write(&file, json)?;
            let path = file.display().to_string();
            match &self.inner {
                Inner::Oxid(c) => {
                    let sock = c.server.admin_socket.display().to_string();
                    cli_path(
                        &oxid_e2e::bin("oxid-server"),
                        &["entry", "create", "--socket-path", &sock, "--data", &path],
                    )
                    .await?;
                }
                Inner::Spire(s) => {
                    let sock = s.socket.display().to_string();
                    cli(
                        &self.setup.spire_bin,
                        "spire-server",
                        &["entry", "create", "-socketPath", &sock, "-data", &path],
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// An agent of one system.
pub(crate) struct SysAgent {
    /// Its SPIFFE ID, the parent of its workloads' entries.
    pub(crate) id: String,
    /// Its Workload API socket.
    pub(crate) socket: PathBuf,
    /// Its Prometheus endpoint.
    metrics: String,
    inner: AgentInner,
}

enum AgentInner {
    Oxid(Agent),
    Spire(SpireAgent, Proc),
}

struct SpireAgent {
    conf: PathBuf,
    token: String,
}

impl SpireAgent {
    /// Starts `spire-agent run`; ready once its Workload API socket accepts.
    async fn launch(&self, bin: &Path, socket: &Path) -> BenchResult<Proc> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(bin.join("spire-agent"));
        cmd.arg("run")
            .arg("-config")
            .arg(&self.conf)
            .args(["-joinToken", &self.token]);
        let mut proc = Proc::spawn("spire-agent", cmd);
        let deadline = Instant::now() + READY_LIMIT;
        while tokio::net::UnixStream::connect(socket).await.is_err() {
            if !proc.is_running() || Instant::now() > deadline {
                return Err(format!("spire-agent did not serve:\n{}", proc.log()).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(proc)
    }
}

impl SysAgent {
    pub(crate) fn pid(&self) -> BenchResult<u32> {
        match &self.inner {
            AgentInner::Oxid(a) => a.proc.pid(),
            AgentInner::Spire(_, p) => p.pid(),
        }
        .ok_or_else(|| "the agent exited".into())
    }

    /// How many X509-SVIDs the agent holds (oxid `oxid_agent_svids_cached`,
    /// SPIRE `spire_agent_lru_cache_svid_map_size`).
    pub(crate) async fn svids_cached(&self) -> BenchResult<f64> {
        let name = match &self.inner {
            AgentInner::Oxid(_) => "oxid_agent_svids_cached",
            AgentInner::Spire(..) => "spire_agent_lru_cache_svid_map_size",
        };
        Ok(scrape(&self.metrics, name).await?.unwrap_or(0.0))
    }

    pub(crate) async fn stop(&mut self) {
        match &mut self.inner {
            AgentInner::Oxid(a) => a.stop().await,
            AgentInner::Spire(_, p) => p.stop().await,
        }
    }

    /// Starts the stopped agent again with the identity it saved.
    pub(crate) async fn restart(&mut self, sys: &System) -> BenchResult<()> {
        match (&mut self.inner, &sys.inner) {
            (AgentInner::Oxid(a), Inner::Oxid(c)) => a.restart(&c.server).await,
            (AgentInner::Spire(agent, proc), Inner::Spire(_)) => {
                *proc = agent.launch(&sys.setup.spire_bin, &self.socket).await?;
            }
            _ => return Err("agent and server of different systems".into()),
        }
        Ok(())
    }

    pub(crate) fn rss(&self) -> BenchResult<u64> {
        Ok(proc_stat(self.pid()?)?.rss)
    }
}

fn spire_server_conf(dir: &Path, socket: &Path, port: u16, experimental: &str) -> String {
    let data = dir.join("data");
    // SPIRE's own conf/server/server.conf, with its paths; the TTLs are
    // oxid's (and SPIRE's) defaults, written out. KeyManager "disk" rather
    // than "memory" so that a restart keeps the CA its agents trust.
    format!(
        "server {{\n    bind_address = \"127.0.0.1\"\n    bind_port = \"{port}\"\n    \
         socket_path = \"{socket}\"\n    trust_domain = \"example.org\"\n    \
         data_dir = \"{data}\"\n    log_level = \"WARN\"\n    ca_ttl = \"24h\"\n    \
         default_x509_svid_ttl = \"1h\"\n    default_jwt_svid_ttl = \"5m\"\n    \
         agent_ttl = \"1h\"\n    {experimental}\n}}\n\
         plugins {{\n    DataStore \"sql\" {{\n        plugin_data {{\n            \
         database_type = \"sqlite3\"\n            connection_string = \"{data}/datastore.sqlite3\"\n        }}\n    }}\n    \
         NodeAttestor \"join_token\" {{\n        plugin_data {{}}\n    }}\n    \
         KeyManager \"disk\" {{\n        plugin_data {{\n            keys_path = \"{data}/keys.json\"\n        }}\n    }}\n}}\n",
        socket = socket.display(),
        data = data.display(),
    )
}

/// Starts `spire-server run`; returns once `spire-server healthcheck`
/// passes, with the time from the start to its admin socket accepting.
async fn spire_server_launch(
    bin: &Path,
    conf: &Path,
    socket: &Path,
) -> BenchResult<(Proc, Duration)> {
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new(bin.join("spire-server"));
    cmd.arg("run").arg("-config").arg(conf);
    let start = Instant::now();
    let mut proc = Proc::spawn("spire-server", cmd);
    let sock = socket.display().to_string();
    let deadline = Instant::now() + READY_LIMIT;
    // The server opens its sockets only after building its entry cache
    // (`endpoints.New`, then `ListenAndServe`). The health check costs a
    // process start (about 0.1 s), so it confirms rather than times.
    while tokio::net::UnixStream::connect(socket).await.is_err() {
        if !proc.is_running() || Instant::now() > deadline {
            return Err(format!("spire-server did not listen:\n{}", proc.log()).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ready = start.elapsed();
    loop {
        let ok = Command::new(bin.join("spire-server"))
            .args(["healthcheck", "-socketPath", &sock])
            .output()
            .await?
            .status
            .success();
        if ok {
            return Ok((proc, ready));
        }
        if !proc.is_running() || Instant::now() > deadline {
            return Err(format!("spire-server did not become ready:\n{}", proc.log()).into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A join token for an hour from `spire-server token generate`.
async fn spire_token(bin: &Path, socket: &Path) -> BenchResult<String> {
    let sock = socket.display().to_string();
    let out = cli(
        bin,
        "spire-server",
        &["token", "generate", "-socketPath", &sock, "-ttl", "3600"],
    )
    .await?;
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .ok_or_else(|| format!("no token in {out:?}"))?
        .trim()
        .to_owned())
}

/// Runs `bin/name args`; its stdout, or its stderr as the error.
async fn cli(bin: &Path, name: &str, args: &[&str]) -> BenchResult<String> {
    cli_path(&bin.join(name), args).await
}

async fn cli_path(program: &Path, args: &[&str]) -> BenchResult<String> {
    let out = Command::new(program).args(args).output().await?;
    if !out.status.success() {
        return Err(format!(
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A port free now on 127.0.0.1 (for the processes that cannot bind port 0
/// and say which they got).
fn free_port() -> BenchResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The value of the Prometheus sample `name` at `address` (with or without
/// labels; the first series), or None while it is not exported.
async fn scrape(address: &str, name: &str) -> BenchResult<Option<f64>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    sample(&body, name)
}

/// The value of the first series of `name` in a Prometheus text `body`.
fn sample(body: &str, name: &str) -> BenchResult<Option<f64>> {
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with(' ') || rest.starts_with('{') {
            let value = rest.rsplit(' ').next().unwrap_or_default();
            return Ok(Some(value.trim().parse()?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        // As spire-agent's Prometheus sink and oxid-agent's /metrics print them.
        let body = "# HELP spire_agent_lru_cache_svid_map_size x\n\
                    # TYPE spire_agent_lru_cache_svid_map_size gauge\n\
                    spire_agent_lru_cache_svid_map_size_total 9\n\
                    spire_agent_lru_cache_svid_map_size{host=\"vm\"} 1001\n\
                    oxid_agent_svids_cached 42\n";
        let v = |name| sample(body, name).unwrap();
        assert_eq!(v("spire_agent_lru_cache_svid_map_size"), Some(1001.0));
        assert_eq!(v("oxid_agent_svids_cached"), Some(42.0));
        assert_eq!(v("oxid_agent_entries"), None);
        assert!(sample("oxid_agent_svids_cached x\n", "oxid_agent_svids_cached").is_err());
    }

    #[test]
    fn tuned_server_config_names_spires_settings() {
        let conf = spire_server_conf(
            Path::new("/d"),
            Path::new("/d/api.sock"),
            8081,
            "experimental { cache_reload_interval = \"1s\" }",
        );
        for want in [
            "bind_port = \"8081\"",
            "database_type = \"sqlite3\"",
            "NodeAttestor \"join_token\"",
            "default_x509_svid_ttl = \"1h\"",
            "default_jwt_svid_ttl = \"5m\"",
            "cache_reload_interval",
        ] {
            assert!(conf.contains(want), "{want} missing from\n{conf}");
        }
    }
}
