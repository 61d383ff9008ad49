//! Running a server: open the store, start the CA, serve the admin socket,
//! rotate on schedule, stop cleanly when told to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, AdminAccess, AdminService, EntryPolicy, SocketError};
use crate::agent_api::{self, AgentApiConfig, IndexHandle};
use crate::ca::{CaConfig, CaError, CaManager, UpstreamConfig};
use crate::clock::Clock;
use crate::config::{Config, KeyStorage};
use crate::datastore::{DataStore, DataStoreError, PgStore, SledStore};
use crate::metrics::{RpcMetrics, ServerMetrics, ServerState};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The datastore did not open.
    #[error("datastore: {0}")]
    Store(#[from] DataStoreError),
    /// The CA did not start.
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    /// The admin socket could not be bound.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The admin server failed.
    #[error("admin API: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A listen address (`bind_address` or `metrics_address`) could not be
    /// bound.
    #[error("{setting} {address}: {source}")]
    Bind {
        /// The setting that gave it.
        setting: &'static str,
        /// The address.
        address: String,
        /// The error.
        source: std::io::Error,
    },
    /// The agent API failed.
    #[error("agent API: {0}")]
    AgentApi(String),
    /// The server's own uid, which the admin API always allows, could not
    /// be read (from `/proc/self`).
    #[error("admin access: cannot read the server's own uid from /proc/self: {0}")]
    AdminAccess(std::io::Error),
    /// The x509pop node CA file is unusable.
    #[error("x509pop node CA bundle {0}")]
    X509Pop(String),
}

/// How long a stopping server waits for open calls to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often the rotation schedule is checked: often enough that a step is
/// never more than 1/120 of the CA lifetime late, never busier than 1/s.
fn rotation_interval(ca_ttl: Duration) -> Duration {
    (ca_ttl / 120).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Runs the server until `shutdown` completes, with the agent API on
/// `config.bind_address`.
pub async fn run(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let bind = |setting, address: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| RunError::Bind {
                setting,
                address: address.to_string(),
                source,
            })
    };
    let listeners = Listeners {
        agent_api: bind("bind_address (the agent API)", config.bind_address).await?,
        metrics: match config.metrics_address {
            Some(a) => Some(bind("metrics_address", a).await?),
            None => None,
        },
    };
    run_with(config, clock, listeners, shutdown).await
}

/// The TCP listeners a server serves on, bound by the caller (tests bind
/// port 0 and read the port back).
pub struct Listeners {
    /// The agent API.
    pub agent_api: tokio::net::TcpListener,
    /// `/metrics`, `/live`, `/ready`, if enabled.
    pub metrics: Option<tokio::net::TcpListener>,
}

/// Loads the x509pop node CAs; refuses a file holding one of oxid's own
/// authorities, since then any workload SVID could attest as a node.
fn load_node_cas(
    path: &std::path::Path,
    own: &oxid_pki::bundle::Bundle,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, RunError> {
    let invalid = |m: String| RunError::X509Pop(format!("{}: {m}", path.display()));
    let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let cas = oxid_pki::x509::certs_from_pem(&pem).map_err(|e| invalid(e.to_string()))?;
    let own_keys: Vec<Vec<u8>> = own
        .x509_authorities()
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.public_key().raw.to_vec())
        .collect();
    for ca in &cas {
        let key = x509_parser::parse_x509_certificate(ca)
            .map(|(_, c)| c.public_key().raw.to_vec())
            .map_err(|e| invalid(e.to_string()))?;
        if own_keys.contains(&key) {
            return Err(invalid(
                "holds one of oxid's own CAs: any workload SVID could then attest as a node".into(),
            ));
        }
    }
    Ok(cas)
}

/// Runs the server with the agent API on an already bound `listener` (so
/// tests can use port 0): builds every component, then supervises them.
pub async fn run_with(
    config: Config,
    clock: Arc<dyn Clock>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let server = build(&config, clock, listeners).await?;
    server.supervise(&config, shutdown).await
}

/// A server built and not yet running: no task is spawned until
/// [`Built::supervise`], so a start that fails part-way leaves nothing
/// behind holding the store.
struct Built {
    /// Held until the server stops; removes the socket only if it is still
    /// the one bound here.
    socket: oxid_tls::socket::SocketLock,
    admin_listener: tokio::net::UnixListener,
    admin: AdminService,
    agent_listener: tokio::net::TcpListener,
    agent_config: AgentApiConfig,
    metrics: Option<(tokio::net::TcpListener, Arc<ServerMetrics>)>,
    rpc: Arc<RpcMetrics>,
    store: Arc<dyn DataStore>,
    ca: Arc<CaManager>,
    index: Arc<IndexHandle>,
}

/// Checks the local setup and builds the components, in the order that
/// refuses a bad setup before it touches anything shared: connection caps,
/// the data directory, the socket lock, the store, the CA, the admin
/// socket and access list, the x509pop node CAs, the index.
async fn build(
    config: &Config,
    clock: Arc<dyn Clock>,
    listeners: Listeners,
) -> Result<Built, RunError> {
    // Before the store opens: caps that leave no descriptors for the
    // server's own files are a setup error.
    let connections = config
        .connections
        .fitted(oxid_telemetry::conn::raise_nofile_limit())
        .map_err(RunError::AgentApi)?;
    let rpc = Arc::new(RpcMetrics::default());
    let data_dir = &config.data_dir;
    // It holds the store and the CA keys: refused if another user could
    // redirect its path, and 0700 even if it existed with a wider mode.
    admin::prepare_private_dir(data_dir, 0o700)?;
    // Held until the server stops: a second server on this path is refused
    // here, before it touches the store, instead of taking the socket.
    let mut socket = oxid_tls::socket::lock_socket(&config.socket_path)?;
    let store: Arc<dyn DataStore> = match &config.postgres {
        Some(pg) => Arc::new(PgStore::open(pg).await?),
        None => Arc::new(SledStore::open(
            &data_dir.join("datastore"),
            config.datastore_cache_bytes,
        )?),
    };
    let ca = CaManager::start(
        CaConfig {
            trust_domain: config.trust_domain.clone(),
            key_type: config.ca_key_type,
            ca_ttl: config.ca_ttl,
            key_dir: (config.ca_keys == KeyStorage::Disk).then(|| data_dir.join("keys")),
            upstream: config.upstream.as_ref().map(|u| UpstreamConfig {
                cert_file: u.cert_file.clone(),
                key_file: u.key_file.clone(),
            }),
        },
        clock.clone(),
        store.clone(),
    )
    .await?;

    let admin_listener = socket.bind(0o666)?;
    let access =
        AdminAccess::new(config.admin_uids.iter().copied()).map_err(RunError::AdminAccess)?;
    let admin = AdminService {
        store: store.clone(),
        ca: ca.clone(),
        clock,
        policy: EntryPolicy {
            trust_domain: config.trust_domain.clone(),
            max_ttl: ca.max_svid_ttl(),
        },
        access,
        default_x509_ttl: config.x509_svid_ttl,
        default_jwt_ttl: config.jwt_svid_ttl,
        max_batch: config.max_admin_batch,
    };

    let x509pop_roots = match &config.x509pop_ca_bundle {
        Some(path) => Some(load_node_cas(path, ca.snapshot().bundle())?),
        None => None,
    };
    let server_id = config
        .trust_domain
        .spiffe_id("/oxid/server")
        .map_err(|e| RunError::AgentApi(e.to_string()))?;
    let index = IndexHandle::load(store.as_ref(), server_id).await?;
    let metrics = listeners.metrics.map(|listener| {
        let state = ServerState::new(ca.clone(), index.clone(), store.clone());
        let source = Arc::new(ServerMetrics::new(&rpc, state));
        (listener, source)
    });
    let agent_config = AgentApiConfig {
        agent_svid_ttl: config.agent_svid_ttl,
        default_x509_ttl: config.x509_svid_ttl,
        default_jwt_ttl: config.jwt_svid_ttl,
        max_batch: config.max_csrs_per_call,
        max_request_bytes: config.max_request_bytes,
        requests_per_second: config.agent_requests_per_second,
        attestations_per_minute: config.attestations_per_minute,
        x509pop_roots,
        rpc_metrics: rpc.clone(),
        connections,
    };
    Ok(Built {
        socket,
        admin_listener,
        admin,
        agent_listener: listeners.agent_api,
        agent_config,
        metrics,
        rpc,
        store,
        ca,
        index,
    })
}

/// Runs `ca.rotate()` on schedule until the task is aborted.
fn spawn_rotation(ca: Arc<CaManager>, ca_ttl: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(rotation_interval(ca_ttl));
        loop {
            tick.tick().await;
            match ca.rotate().await {
                Ok(crate::ca::Action::None) => {}
                Ok(action) => tracing::info!(?action, "CA rotation step"),
                Err(e) => tracing::error!(error = %e, "CA rotation failed; will retry"),
            }
        }
    })
}

impl Built {
    /// Starts the tasks and serves until `shutdown` or until either API
    /// ends (which stops the other); open calls then get
    /// [`SHUTDOWN_GRACE`]. Returns once every task that holds the store is
    /// gone, so a restart can reopen it.
    async fn supervise(
        self,
        config: &Config,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RunError> {
        let Built {
            socket,
            admin_listener,
            admin,
            agent_listener,
            agent_config,
            metrics,
            rpc,
            store,
            ca,
            index,
        } = self;
        // Logged with the ready line, so whoever bound port 0 can find them.
        let address = |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.to_string());
        let agent_address = address(agent_listener.local_addr()).unwrap_or_default();
        let metrics_address = metrics
            .as_ref()
            .and_then(|(l, _)| address(l.local_addr()).ok())
            .unwrap_or_else(|| "off".into());

        let rotation = spawn_rotation(ca.clone(), config.ca_ttl);
        let retention = crate::retention::spawn(store.clone(), config.change_retention);
        let follower = index.clone().follow(store.clone());
        let peers = ca.clone().follow_peers(index.authorities_changed());
        let heartbeat = ca.clone().keep_beating();
        let beating = ca.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let metrics_server = metrics.map(|(listener, source)| {
            tokio::spawn(crate::metrics::serve(
                listener,
                source,
                stopped(stop_rx.clone()),
            ))
        });
        let agent_api = agent_api::serve(
            agent_listener,
            ca,
            store,
            index,
            admin.clock.clone(),
            agent_config,
            stopped(stop_rx.clone()),
        );
        let admin_api = admin::serve(
            admin_listener,
            admin,
            config.max_request_bytes,
            rpc,
            stopped(stop_rx),
        );
        // Either API ending (an error, or shutdown) stops the other one too.
        let stop_tx = &stop_tx;
        let admin_api = async move {
            let r = admin_api.await;
            let _ = stop_tx.send(true);
            r
        };
        let agent_api = async move {
            let r = agent_api.await;
            let _ = stop_tx.send(true);
            r
        };
        tracing::info!(
            trust_domain = %config.trust_domain,
            agent_api = %agent_address,
            metrics = %metrics_address,
            admin_socket = %config.socket_path.display(),
            data_dir = %config.data_dir.display(),
            "oxid-server ready"
        );
        // Stop on the signal; give open calls a grace period, then drop them.
        let servers = async { tokio::join!(admin_api, agent_api) };
        tokio::pin!(servers);
        tokio::pin!(shutdown);
        let (admin_result, agent_result) = tokio::select! {
            results = &mut servers => results,
            () = &mut shutdown => {
                let _ = stop_tx.send(true);
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut servers).await {
                    Ok(results) => results,
                    Err(_) => {
                        tracing::warn!("open connections did not close in time; dropping them");
                        (Ok(()), Ok(()))
                    }
                }
            }
        };
        // Wait for the background tasks to be gone: they hold the store,
        // whose lock must be released when `run` returns (a restart
        // reopens it).
        rotation.abort();
        retention.abort();
        follower.abort();
        peers.abort();
        heartbeat.abort();
        let _ = rotation.await;
        let _ = retention.await;
        let _ = follower.await;
        let _ = peers.await;
        let _ = heartbeat.await;
        // No agent is served any more: no server need wait for this one.
        beating.stop_beating().await;
        if let Some(task) = metrics_server {
            let _ = task.await;
        }
        // Removes the socket only if it is still the one bound here.
        drop(socket);
        tracing::info!("oxid-server stopped");
        admin_result?;
        agent_result.map_err(RunError::AgentApi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_access_failure_is_not_reported_as_the_data_directory() {
        let e = RunError::AdminAccess(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        let shown = e.to_string();
        assert!(shown.starts_with("admin access: "), "{shown}");
        assert!(shown.contains("/proc/self"), "{shown}");
        assert!(!shown.contains("data directory"), "{shown}");
    }

    #[test]
    fn rotation_interval_is_bounded() {
        assert_eq!(
            rotation_interval(Duration::from_secs(86_400)),
            Duration::from_secs(30)
        );
        assert_eq!(
            rotation_interval(Duration::from_secs(600)),
            Duration::from_secs(5)
        );
        assert_eq!(
            rotation_interval(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }
}
