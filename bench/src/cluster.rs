//! The parts under test, started for real: an `oxid-server` process, an
//! `oxid-agent` process, simulated agents that speak the agent API with the
//! agent's own client, and workloads that call the Workload API over the
//! agent's Unix socket.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use oxid_agent::identity::Attestation;
use oxid_agent::server_client::ServerClient;
use oxid_e2e::{Agent, Server};
use oxid_pki::bundle::Bundle;
use oxid_pki::{SpiffeId, TrustDomain};
use oxid_proto::admin as admin_pb;
use oxid_proto::admin::admin_client::AdminClient;
use oxid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use oxid_tls::{SharedBundle, SvidResolver};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::BenchResult;

/// A Workload API client on one connection.
pub(crate) type WorkloadClient = SpiffeWorkloadApiClient<Channel>;

/// The trust domain every benchmark uses.
pub(crate) const TRUST_DOMAIN: &str = "example.org";

/// A server on a temporary directory, with an admin client.
pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) server: Server,
    pub(crate) admin: AdminClient<Channel>,
    pub(crate) bundle_pem: Vec<u8>,
}

impl Cluster {
    /// Starts `oxid-server` with `top` (top-level keys) and `tables`
    /// (`[ca]` and below) as its configuration.
    pub(crate) async fn start(top: &str, tables: &str) -> BenchResult<Self> {
        let dir = tempfile::tempdir()?;
        let server = Server::start_with(dir.path(), top, tables).await;
        let mut admin = AdminClient::new(uds_channel(&server.admin_socket).await?)
            .max_decoding_message_size(64 << 20);
        let bundle_pem = admin
            .get_bundle(admin_pb::GetBundleRequest {})
            .await?
            .into_inner()
            .pem
            .into_bytes();
        Ok(Self {
            dir,
            server,
            admin,
            bundle_pem,
        })
    }

    /// A join token valid for an hour, and the agent ID it attests as.
    pub(crate) async fn token(&mut self) -> BenchResult<(String, String)> {
        let t = self
            .admin
            .create_join_token(admin_pb::CreateJoinTokenRequest {
                ttl: 3600,
                spiffe_id: String::new(),
            })
            .await?
            .into_inner();
        Ok((
            t.token,
            format!("spiffe://{TRUST_DOMAIN}/oxid/agent/join_token/{}", t.id),
        ))
    }

    /// Creates `entries` in batches of the admin API's limit; their IDs, in
    /// order. Any refused entry fails the benchmark.
    pub(crate) async fn create_entries(
        &mut self,
        entries: Vec<admin_pb::Entry>,
    ) -> BenchResult<Vec<String>> {
        let mut ids = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(1000) {
            let results = self
                .admin
                .create_entries(admin_pb::CreateEntriesRequest {
                    entries: chunk.to_vec(),
                    allow_exe_only: false,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .results;
            for r in results {
                match r.entry {
                    Some(e) if r.error.is_empty() => ids.push(e.id),
                    _ => return Err(format!("entry refused: {}", r.error).into()),
                }
            }
        }
        Ok(ids)
    }

    /// Starts an `oxid-agent` process with `extra` flags; it and its ID.
    pub(crate) async fn start_agent(&mut self, extra: &[&str]) -> BenchResult<(Agent, String)> {
        let (token, id) = self.token().await?;
        let dir = self
            .dir
            .path()
            .join(format!("agent-{}", &id[id.len() - 8..]));
        std::fs::create_dir_all(&dir)?;
        let agent = Agent::start_with(&dir, &self.server, &token, extra).await;
        Ok((agent, id))
    }

    /// A simulated agent: attested with a fresh join token through the
    /// agent's own client, on its own TLS connection.
    pub(crate) async fn sim_agent(&mut self) -> BenchResult<SimAgent> {
        let (token, _) = self.token().await?;
        SimAgent::attest(&self.server.address, &self.bundle_pem, token).await
    }

    /// The server's process ID.
    pub(crate) fn server_pid(&self) -> BenchResult<u32> {
        self.server
            .proc
            .pid()
            .ok_or_else(|| "the server is not running".into())
    }
}

/// A registration entry for `spiffe_id` under `parent`.
pub(crate) fn entry(spiffe_id: String, parent: &str, selector: String) -> admin_pb::Entry {
    admin_pb::Entry {
        spiffe_id,
        parent_id: parent.to_owned(),
        selectors: vec![selector],
        ..Default::default()
    }
}

/// This process's `unix:uid` selector: entries with it match the bench's
/// own workload calls.
pub(crate) fn own_uid_selector() -> String {
    format!("unix:uid:{}", rustix::process::getuid().as_raw())
}

/// An attested agent identity and its connection to the server.
pub(crate) struct SimAgent {
    pub(crate) client: Arc<ServerClient>,
    pub(crate) id: String,
}

impl SimAgent {
    pub(crate) async fn attest(
        address: &str,
        bundle_pem: &[u8],
        token: String,
    ) -> BenchResult<Self> {
        let td: TrustDomain = TRUST_DOMAIN.parse()?;
        let bundle = Bundle::from_x509_pem(td.clone(), bundle_pem)?;
        let server_id: SpiffeId = td.spiffe_id("/oxid/server")?;
        let client = ServerClient::new(
            oxid_agent::servers::ServerAddresses::new(&[address])?,
            server_id,
            Arc::new(SharedBundle::new(bundle)),
            Arc::new(SvidResolver::default()),
        )?;
        let (identity, _) = client.attest(&Attestation::JoinToken(token)).await?;
        client.use_identity(&identity)?;
        Ok(Self {
            client: Arc::new(client),
            id: identity.spiffe_id.to_string(),
        })
    }
}

/// One gRPC connection over the Unix socket at `socket`.
pub(crate) async fn uds_channel(socket: &Path) -> BenchResult<Channel> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Ok(Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?)
}

/// A Workload API client on a new connection to `socket`.
pub(crate) async fn workload_client(socket: &Path) -> BenchResult<WorkloadClient> {
    Ok(
        SpiffeWorkloadApiClient::new(uds_channel(socket).await?)
            .max_decoding_message_size(64 << 20),
    )
}

/// `msg` with the header every Workload API call must carry.
pub(crate) fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// The first FetchX509SVID message on `client`, waiting at most `wait`;
/// the SPIFFE IDs it carries.
pub(crate) async fn first_x509(client: &mut WorkloadClient) -> BenchResult<Vec<String>> {
    let mut stream = client
        .fetch_x509svid(with_header(oxid_proto::workload::X509svidRequest {}))
        .await?
        .into_inner();
    let msg = stream
        .message()
        .await?
        .ok_or("the X509-SVID stream ended")?;
    Ok(msg.svids.into_iter().map(|s| s.spiffe_id).collect())
}

/// Memory and CPU of a process, from `/proc`.
#[derive(Clone, Copy)]
pub(crate) struct ProcStat {
    /// Resident set size now, bytes.
    pub(crate) rss: u64,
    /// Peak resident set size, bytes.
    pub(crate) peak_rss: u64,
    /// User + system CPU time so far.
    pub(crate) cpu: Duration,
}

pub(crate) fn proc_stat(pid: u32) -> BenchResult<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> BenchResult<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse::<u64>()? * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: its closing
    // parenthesis is the last one.
    let rest = stat.rsplit_once(')').ok_or("odd /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    let ticks: u64 = fields.get(11).ok_or("short stat")?.parse::<u64>()?
        + fields.get(12).ok_or("short stat")?.parse::<u64>()?;
    let hz = rustix::param::clock_ticks_per_second();
    Ok(ProcStat {
        rss: kib("VmRSS:")?,
        peak_rss: kib("VmHWM:")?,
        cpu: Duration::from_secs_f64(ticks as f64 / hz as f64),
    })
}

/// MiB with one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The value of the Prometheus sample `name` (no labels) at `address`.
pub(crate) async fn metric(address: &str, name: &str) -> BenchResult<f64> {
    Ok(metrics(address, &[name]).await?[0])
}

/// The values of the Prometheus samples `names` (no labels) at `address`,
/// from one scrape.
pub(crate) async fn metrics(address: &str, names: &[&str]) -> BenchResult<Vec<f64>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    names
        .iter()
        .map(|name| {
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
                .ok_or_else(|| format!("no {name} at {address}"))?
                .trim()
                .parse::<f64>()
                .map_err(Into::into)
        })
        .collect()
}

/// Polls `metric` every `every` until it reaches `at_least`, for at most
/// `limit`.
pub(crate) async fn wait_metric(
    address: &str,
    name: &str,
    at_least: f64,
    every: Duration,
    limit: Duration,
) -> BenchResult<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let value = metric(address, name).await?;
        if value >= at_least {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(
                format!("{name} did not reach {at_least} within {limit:?} (at {value})").into(),
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// The agent's metrics address, from its log (it binds port 0).
pub(crate) async fn agent_metrics_address(agent: &mut Agent) -> BenchResult<String> {
    let line = agent.proc.wait_for("oxid-agent serving metrics").await;
    Ok(line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics_address="))
        .ok_or_else(|| format!("no metrics_address= in {line:?}"))?
        .to_owned())
}

/// Opens Sync for `agent` and reads until a complete snapshot holds at
/// least `count` entries; the stream, for the deltas that follow.
pub(crate) async fn sync_snapshot(
    agent: &ServerClient,
    count: usize,
) -> BenchResult<tonic::Streaming<oxid_proto::agent::SyncResponse>> {
    let mut stream = agent
        .api()
        .max_decoding_message_size(64 << 20)
        .sync(oxid_proto::agent::SyncRequest::default())
        .await?
        .into_inner();
    let mut held = std::collections::HashSet::new();
    loop {
        let page = stream.message().await?.ok_or("sync ended")?;
        if page.snapshot {
            held.clear();
        }
        held.extend(page.upserts.into_iter().map(|e| e.id));
        for id in &page.removed_ids {
            held.remove(id);
        }
        if !page.more && held.len() >= count {
            return Ok(stream);
        }
    }
}

/// The first X509-SVID message for this process from the agent at
/// `socket`, retrying while the agent is still syncing or signing (it
/// answers Unavailable then); how long that took.
pub(crate) async fn wait_first_x509(socket: &Path) -> BenchResult<Duration> {
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs(60);
    loop {
        let outcome = match workload_client(socket).await {
            Ok(mut client) => first_x509(&mut client).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Restarts `agent` `times` times (SIGTERM, then a start with its saved
/// identity); for each, milliseconds from the process start to the first
/// X509-SVID served to this process.
pub(crate) async fn agent_restarts(
    server: &Server,
    agent: &mut Agent,
    times: usize,
) -> BenchResult<Vec<f64>> {
    let mut out = Vec::with_capacity(times);
    for _ in 0..times {
        agent.stop().await;
        let start = std::time::Instant::now();
        agent.restart(server).await;
        wait_first_x509(&agent.socket).await?;
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Pins every thread of process `pid` (threads it starts later inherit the
/// mask) to CPU `cpu`.
pub(crate) fn pin(pid: u32, cpu: usize) -> BenchResult<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        let tid = rustix::process::Pid::from_raw(tid).ok_or("bad thread ID")?;
        // A thread that exited meanwhile needs no pinning.
        let _ = rustix::thread::sched_setaffinity(Some(tid), &set);
    }
    Ok(())
}
