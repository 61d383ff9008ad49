//! A test harness: a real server (in process, temp dir, port 0) and a real
//! agent (in process) attested with a join token.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use oxid_agent::config::{AgentConfig, AgentFile};
use oxid_proto::admin as admin_pb;
use oxid_proto::admin::admin_client::AdminClient;
use oxid_server::clock::SystemClock;
use oxid_server::config::{Config, Overrides};
use tonic::transport::{Channel, Endpoint, Uri};

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Harness {
    pub dir: tempfile::TempDir,
    server: Option<tokio::task::JoinHandle<Result<(), oxid_server::run::RunError>>>,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
    agent: Option<tokio::task::JoinHandle<Result<(), oxid_agent::AgentError>>>,
    stop_agent: Option<tokio::sync::oneshot::Sender<()>>,
    pub server_addr: std::net::SocketAddr,
    pub agent_id: String,
    /// `--max-presigned-svids` for the next agent start (default if None).
    pub presign: Option<usize>,
    /// `--jwt-svid-cache-size` for the next agent start (default if None).
    pub jwt_cache_size: Option<usize>,
    /// `max_streams_per_uid` for the next agent start, if set.
    pub max_streams_per_uid: Option<usize>,
    /// `max_request_kib` for the next agent start, if set.
    pub max_request_kib: Option<usize>,
    /// Where the next agent start dials the server (a [`Proxy`]), if not
    /// directly.
    pub agent_server_addr: Option<std::net::SocketAddr>,
    /// x509pop node certificate and key for the next agent start.
    pub node_credentials: Option<(PathBuf, PathBuf)>,
    /// The wall clock of the next agent start (tests jump it).
    pub clock: oxid_agent::clock::WallClock,
    /// Any other settings of the next agent start (the fields above win).
    pub agent_extra: AgentFile,
}

/// A gRPC channel over the Unix socket at `socket`.
pub async fn uds_channel(socket: &Path) -> Channel {
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::try_from("http://uds.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap()
}

pub async fn admin(socket: &Path) -> AdminClient<Channel> {
    AdminClient::new(uds_channel(socket).await)
}

impl Harness {
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("server/admin.sock")
    }

    pub fn workload_socket(&self) -> PathBuf {
        self.dir.path().join("agent-run/api.sock")
    }

    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts the server with `server_toml` and an agent attested to it.
    pub async fn start_with(server_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Traversable, so a workload of another uid can reach the socket.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(dir.path().join("server.toml"), server_toml).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let mut h = Self {
            dir,
            server: None,
            stop_server: None,
            agent: None,
            stop_agent: None,
            server_addr,
            agent_id: String::new(),
            presign: None,
            jwt_cache_size: None,
            max_streams_per_uid: None,
            max_request_kib: None,
            agent_server_addr: None,
            node_credentials: None,
            clock: oxid_agent::clock::WallClock::default(),
            agent_extra: AgentFile::default(),
        };
        h.spawn_server(listener);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !h.admin_socket().exists() {
            assert!(tokio::time::Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut a = admin(&h.admin_socket()).await;
        let bundle = a
            .get_bundle(admin_pb::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        std::fs::write(h.dir.path().join("bundle.pem"), bundle.pem).unwrap();
        let token = a
            .create_join_token(admin_pb::CreateJoinTokenRequest::default())
            .await
            .unwrap()
            .into_inner();
        h.agent_id = format!("spiffe://example.org/oxid/agent/join_token/{}", token.id);
        h.start_agent(Some(token.token));
        h
    }

    fn spawn_server(&mut self, listener: tokio::net::TcpListener) {
        let config = Config::load(
            Some(&self.dir.path().join("server.toml")),
            Overrides {
                data_dir: Some(self.dir.path().join("server/data")),
                socket_path: Some(self.dir.path().join("server/admin.sock")),
                ..Default::default()
            },
        )
        .unwrap();
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        self.server = Some(tokio::spawn(oxid_server::run::run_with(
            config,
            Arc::new(SystemClock),
            oxid_server::run::Listeners {
                agent_api: listener,
                metrics: None,
            },
            async {
                let _ = stopped.await;
            },
        )));
        self.stop_server = Some(stop_server);
    }

    /// Stops the server (the agent keeps running).
    pub async fn stop_server(&mut self) {
        let _ = self.stop_server.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
    }

    /// Starts the server again on the same address and data.
    pub async fn restart_server(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.server_addr)
            .await
            .unwrap();
        self.spawn_server(listener);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.admin_socket().exists() {
            assert!(tokio::time::Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn start_agent(&mut self, token: Option<String>) {
        self.start_agent_inner(token, None);
    }

    /// Starts the agent (saved identity) with a metrics listener.
    pub fn start_agent_with_metrics(&mut self, address: std::net::SocketAddr) {
        self.start_agent_inner(None, Some(address.to_string()));
    }

    fn start_agent_inner(&mut self, token: Option<String>, metrics: Option<String>) {
        let mut config = AgentConfig::load(
            None,
            AgentFile {
                metrics_address: metrics,
                max_presigned_svids: self.presign,
                jwt_svid_cache_size: self.jwt_cache_size,
                max_streams_per_uid: self.max_streams_per_uid,
                max_request_kib: self.max_request_kib,
                // A test giving several addresses (agent_extra) gives them all.
                server_address: self.agent_extra.server_addresses.is_none().then(|| {
                    self.agent_server_addr
                        .unwrap_or(self.server_addr)
                        .to_string()
                }),
                trust_bundle: Some(self.dir.path().join("bundle.pem")),
                join_token: token,
                node_cert: self.node_credentials.as_ref().map(|c| c.0.clone()),
                node_key: self.node_credentials.as_ref().map(|c| c.1.clone()),
                data_dir: Some(self.dir.path().join("agent-data")),
                socket_path: Some(self.workload_socket()),
                ..self.agent_extra.clone()
            },
        )
        .unwrap();
        config.clock = self.clock.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.agent = Some(tokio::spawn(oxid_agent::run::run(config, async {
            let _ = stopped.await;
        })));
        self.stop_agent = Some(stop);
    }

    /// Waits for the agent to exit by itself; its outcome.
    pub async fn agent_exit(&mut self) -> Result<(), oxid_agent::AgentError> {
        self.stop_agent = None;
        tokio::time::timeout(WAIT, self.agent.take().unwrap())
            .await
            .expect("the agent exited")
            .unwrap()
    }

    pub async fn stop_agent(&mut self) {
        let _ = self.stop_agent.take().unwrap().send(());
        self.agent.take().unwrap().await.unwrap().unwrap();
    }

    pub async fn client(&self) -> spiffe::WorkloadApiClient {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.workload_socket().exists() {
            if self.agent.as_ref().unwrap().is_finished() {
                panic!("agent exited early");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent socket did not appear"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let endpoint = format!("unix://{}", self.workload_socket().display());
        spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .unwrap()
    }

    /// A plain gRPC channel on the agent's socket, once it exists.
    pub async fn channel(&self) -> Channel {
        let _ = self.client().await; // waits for the socket
        uds_channel(&self.workload_socket()).await
    }

    /// A generated (not `spiffe` crate) Workload API client on the agent's
    /// socket, for sending what a well-behaved client never would. Calls
    /// carry no security header unless the test adds it.
    pub async fn raw_client(
        &self,
    ) -> oxid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
        oxid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            self.channel().await,
        )
        .max_encoding_message_size(usize::MAX)
    }

    /// Registers `spiffe://example.org/web` for this test's uid and waits
    /// until the agent serves it; a `spiffe` client for it.
    pub async fn with_web_identity(&self) -> spiffe::WorkloadApiClient {
        self.create_entry(
            "spiffe://example.org/web",
            &[&format!("unix:uid:{}", my_uid())],
        )
        .await;
        let client = self.client().await;
        eventually(|| client.fetch_x509_svid()).await;
        client
    }

    pub async fn create_entry(&self, spiffe_id: &str, selectors: &[&str]) {
        self.create_entry_with(spiffe_id, selectors, false).await;
    }

    /// As `create_entry`, for a test about entries matched by executable
    /// only (`unix:path`/`unix:sha256`, no uid), which the server refuses
    /// without `allow_exe_only`.
    pub async fn create_exe_only_entry(&self, spiffe_id: &str, selectors: &[&str]) {
        self.create_entry_with(spiffe_id, selectors, true).await;
    }

    async fn create_entry_with(&self, spiffe_id: &str, selectors: &[&str], allow_exe_only: bool) {
        let r = admin(&self.admin_socket())
            .await
            .create_entries(admin_pb::CreateEntriesRequest {
                entries: vec![admin_pb::Entry {
                    spiffe_id: spiffe_id.into(),
                    parent_id: self.agent_id.clone(),
                    selectors: selectors.iter().map(|s| s.to_string()).collect(),
                    hint: "primary".into(),
                    ..Default::default()
                }],
                allow_exe_only,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results[0].error.is_empty(), "{}", r.results[0].error);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop_agent.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.stop_server.take() {
            let _ = s.send(());
        }
    }
}

/// `GET path` on the agent's metrics listener: the whole HTTP answer.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// An X509-SVID leaf's serial number and expiry.
pub fn serial_and_expiry(svid: &spiffe::X509Svid) -> (Vec<u8>, std::time::SystemTime) {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    let not_after = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().unsigned_abs());
    (cert.raw_serial().to_vec(), not_after)
}

pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Retries `f` until it succeeds: the agent needs a moment to sync and
/// sign after an entry is created (push, not poll, but not instant).
pub async fn eventually<T, E: std::fmt::Debug, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "gave up: {e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// What a [`Proxy`] does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    /// Forward everything.
    Open,
    /// Close every connection and refuse new ones (a cut with resets).
    Cut,
    /// Existing connections go silent, held open, forwarding nothing (a
    /// dead peer without a reset); new connections are forwarded.
    Blackhole,
}

/// A TCP proxy between agent and server whose network can be cut.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    mode: Arc<tokio::sync::watch::Sender<(NetMode, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watch) = tokio::sync::watch::channel((NetMode::Open, 0u64));
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let watch = watch.clone();
                tokio::spawn(proxy_one(conn, target, watch));
            }
        });
        Self {
            addr,
            mode: Arc::new(mode),
            task,
        }
    }

    pub fn set(&self, mode: NetMode) {
        self.mode.send_modify(|(m, generation)| {
            *m = mode;
            *generation += 1;
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_one(
    conn: tokio::net::TcpStream,
    target: std::net::SocketAddr,
    mut watch: tokio::sync::watch::Receiver<(NetMode, u64)>,
) {
    let (mode, born) = *watch.borrow_and_update();
    if mode == NetMode::Cut {
        return; // dropped: refused
    }
    let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let (mut a_read, mut a_write) = conn.into_split();
    let (mut b_read, mut b_write) = upstream.into_split();
    let forward = async {
        tokio::join!(
            tokio::io::copy(&mut a_read, &mut b_write),
            tokio::io::copy(&mut b_read, &mut a_write)
        )
    };
    let changed = async {
        let _ = watch.wait_for(|(_, generation)| *generation > born).await;
    };
    tokio::select! {
        _ = forward => return,
        () = changed => {}
    }
    if watch.borrow().0 == NetMode::Blackhole {
        // Hold both sockets, forwarding nothing, until the proxy goes away.
        std::future::pending::<()>().await;
    }
    // Cut: the sockets close here.
}
