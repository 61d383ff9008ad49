//! Running an agent: restore or attest its identity, follow the server, keep
//! SVIDs fresh, serve the Workload API until told to stop.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxid_pki::bundle::Bundle;
use oxid_tls::socket::SocketLock;
use oxid_tls::{SharedBundle, SvidResolver};

use crate::cache::Cache;
use crate::config::AgentConfig;
use crate::server_client::ServerClient;
use crate::workload::conn::WorkloadConn;
use crate::workload::jwt_cache::JwtCache;
use crate::workload::limits::ConnSettings;
use crate::workload::{WorkloadApi, attest::UnixAttestor, check_header};
use crate::{AgentError, identity, state, svids, sync};

/// How long open connections get to close after a stop.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` completes: checks everything local
/// (nothing is spent yet), establishes its identity and starts its tasks,
/// then serves the Workload API.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let local = Local::check(&config).await?;
    let agent = Started::start(&config, local).await?;
    agent.serve(&config, shutdown).await
}

/// What the agent holds once everything local has passed, before it has
/// contacted the server or spent a join token.
struct Local {
    connections: ConnSettings,
    /// Held until the agent stops: a second agent on this path is refused
    /// before it spends anything, instead of taking the socket.
    socket: SocketLock,
    metrics_listener: Option<tokio::net::TcpListener>,
    bundle: Bundle,
    /// The `[[files]]` writers, checked (root, directories), not started.
    files: Option<crate::files::supervise::Writers>,
}

impl Local {
    /// Everything that could fail without the server, so a refusal never
    /// comes after the join token was used up.
    async fn check(config: &AgentConfig) -> Result<Self, AgentError> {
        // First: whether this agent may start them at all (root).
        let files = crate::files::supervise::Writers::check(&config.files)?;
        // Caps that leave no descriptors for the agent's own files.
        let connections = config
            .connections
            .fitted(oxid_telemetry::conn::raise_nofile_limit())
            .map_err(AgentError::Config)?;
        // Data and socket directories no other user can redirect.
        oxid_tls::socket::prepare_private_dir(&config.data_dir, 0o700)
            .map_err(|e| AgentError::State(e.to_string()))?;
        let socket = oxid_tls::socket::lock_socket(&config.socket_path)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        // Without it, every Workload API caller would be refused.
        crate::workload::holder::self_test().map_err(|e| {
            AgentError::Config(format!(
                "cannot tell which process holds a Workload API connection ({e}): the agent \
                 needs the kernel's Unix sock_diag over AF_NETLINK (under systemd, \
                 RestrictAddressFamilies must include AF_NETLINK)"
            ))
        })?;
        // What would make binding the socket or the metrics port fail.
        check_socket_path(&config.socket_path)?;
        let metrics_listener = match config.metrics_address {
            Some(address) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|e| AgentError::Config(format!("metrics_address {address}: {e}")))?,
            ),
            None => None,
        };
        let bundle = bootstrap_bundle(config)?;
        Ok(Self {
            connections,
            socket,
            metrics_listener,
            bundle,
            files,
        })
    }
}

/// The saved bundle, or the operator's bootstrap bundle on a first start.
fn bootstrap_bundle(config: &AgentConfig) -> Result<Bundle, AgentError> {
    let td = &config.trust_domain;
    if let Some(saved) = state::load_bundle(&config.data_dir, td) {
        return Ok(saved);
    }
    let path = config.trust_bundle.as_ref().ok_or_else(|| {
        AgentError::Config(
            "no saved bundle: give --trust-bundle (from `oxid-server bundle show`)".into(),
        )
    })?;
    let pem =
        std::fs::read(path).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
    Bundle::from_x509_pem(td.clone(), &pem)
        .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
}

/// The agent with its identity established and its tasks running, ready to
/// serve the Workload API.
struct Started {
    local: Local,
    server: Arc<ServerClient>,
    cache: Arc<Cache>,
    identity_status: Arc<identity::Status>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Started {
    /// Establishes the agent's identity (restore, or attest), then spawns
    /// its renewal, the sync with the server and SVID signing.
    async fn start(config: &AgentConfig, local: Local) -> Result<Self, AgentError> {
        let td = config.trust_domain.clone();
        let tls_bundle = Arc::new(SharedBundle::new(local.bundle.clone()));
        let server_id = td
            .spiffe_id("/oxid/server")
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let server = Arc::new(
            ServerClient::new(
                config.server_addresses.clone(),
                server_id,
                tls_bundle.clone(),
                Arc::new(SvidResolver::default()),
            )?
            .with_clock(config.clock.clone())
            .with_keepalive(config.server_keepalive)?,
        );
        let settings = identity::Settings {
            dir: config.data_dir.clone(),
            trust_domain: td.clone(),
            attestation: config.attestation.clone(),
            clock: config.clock.clone(),
        };
        let identity = identity::establish(&server, &settings, &tls_bundle).await?;
        let identity_status = Arc::new(identity::Status::default());
        let cache = Arc::new(Cache::new(td));
        let tasks = vec![
            tokio::spawn(identity::keep(
                server.clone(),
                identity,
                settings,
                tls_bundle.clone(),
                identity_status.clone(),
            )),
            tokio::spawn(sync::run(
                server.clone(),
                cache.clone(),
                tls_bundle,
                config.data_dir.clone(),
            )),
            tokio::spawn(svids::run(
                server.clone(),
                cache.clone(),
                config.max_presigned_svids,
                config.clock.clone(),
            )),
        ];
        Ok(Self {
            local,
            server,
            cache,
            identity_status,
            tasks,
        })
    }

    /// Serves the Workload API (with gRPC health and reflection) and
    /// metrics until `shutdown`, then stops every task.
    async fn serve(
        self,
        config: &AgentConfig,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let Self {
            local,
            server,
            cache,
            identity_status,
            mut tasks,
        } = self;
        let Local {
            connections,
            mut socket,
            metrics_listener,
            files,
            ..
        } = local;
        let listener = socket
            .bind(0o777)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        // The writers connect to the socket just bound, as workloads do.
        let writers = files.map(|w| w.spawn(config.socket_path.clone(), stopping.clone()));
        let rpc = Arc::new(oxid_telemetry::RpcMetrics::default());
        let jwts = Arc::new(Mutex::new(JwtCache::new(
            config.jwt_svid_cache_size,
            config.jwt_svid_cache_per_uid,
        )));
        let mint_budget = Arc::new(crate::workload::budget::MintBudget::new(
            config.jwt_mints_per_second,
            config.jwt_mints_per_second_per_uid,
        ));
        if let Some(l) = metrics_listener {
            let state =
                crate::metrics::AgentState::new(cache.clone(), jwts.clone(), mint_budget.clone());
            let source = crate::metrics::AgentMetrics::new(&rpc, state);
            tasks.push(spawn_metrics(l, source));
        }
        // One stream cap per uid for the Workload API and SDS together.
        let streams = crate::workload::limits::StreamLimits::new(config.max_streams_per_uid);
        let attestor = Arc::new(UnixAttestor::default());
        // Envoy SDS on the same socket, attested the same way (no header).
        let sds = config.sds.enabled.then(|| {
            crate::sds::Sds::new(
                cache.clone(),
                attestor.clone(),
                config.sds.clone(),
                streams.clone(),
                stopping.clone(),
            )
            .into_server(config.max_request_bytes)
        });
        let api = WorkloadApi::new(
            cache.clone(),
            server,
            attestor,
            jwts,
            stopping.clone(),
            streams,
            config.clock.clone(),
        )
        .with_mint_budget(mint_budget);
        // gRPC health and reflection share the socket; neither needs the
        // Workload API's security header. Health is SERVING while ready.
        let (health, health_service) = tonic_health::server::health_reporter();
        tasks.push(tokio::spawn(report_health(health, cache, identity_status)));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(oxid_proto::WORKLOAD_FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        tracing::info!(socket = %config.socket_path.display(), sds = config.sds.enabled, "oxid-agent serving the Workload API");
        let signal = async move {
            shutdown.await;
            tracing::info!("oxid-agent stopping");
            let _ = stop.send(true);
        };
        // Capped and timed out at accept and on every read; see limits.
        let (incoming, accept_task) = crate::workload::limits::accept(listener, connections);
        tasks.push(accept_task);
        let serve = tonic::transport::Server::builder()
            .layer(oxid_telemetry::conn::ActivityLayer::<WorkloadConn>::new())
            .layer(oxid_telemetry::RpcLayer::new("workload", rpc))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                oxid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(api)
                    .max_decoding_message_size(config.max_request_bytes),
                check_header,
            ))
            .add_optional_service(sds)
            // Each connection goes through oxid_h2_authority's rewriter,
            // which lets gRPC C-core and Java clients in.
            .serve_with_incoming_shutdown(incoming, signal);
        // Workload API streams end at once on shutdown; a connection that
        // still holds on (a health Watch, a client ignoring GOAWAY) is
        // dropped after DRAIN_GRACE so a stop never hangs.
        let mut stopped = stopping;
        let result = tokio::select! {
            r = serve => r,
            _ = async {
                let _ = stopped.wait_for(|stop| *stop).await;
                tokio::time::sleep(DRAIN_GRACE).await;
            } => Ok(()),
        };
        // Each writer has had SIGTERM since the stop; they end by
        // themselves within STOP_GRACE (killed after it).
        if let Some(writers) = writers {
            let grace = crate::files::supervise::STOP_GRACE + Duration::from_secs(1);
            let _ = tokio::time::timeout(grace, writers).await;
        }
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        // Removes the socket only if it is still the one bound here.
        drop(socket);
        tracing::info!("oxid-agent stopped");
        result.map_err(|e| AgentError::Internal(e.to_string()))
    }
}

/// Serves `/metrics`, `/live` and `/ready` on `listener` until aborted.
fn spawn_metrics(
    listener: tokio::net::TcpListener,
    source: crate::metrics::AgentMetrics,
) -> tokio::task::JoinHandle<()> {
    // Logged as bound, so a port of 0 can be found.
    if let Ok(bound) = listener.local_addr() {
        tracing::info!(metrics_address = %bound, "oxid-agent serving metrics");
    }
    tokio::spawn(async move {
        let _ = oxid_telemetry::serve(listener, Arc::new(source), std::future::pending()).await;
    })
}

/// Refuses a socket path taken by something that is not a socket, which
/// binding would only find after the join token was spent.
fn check_socket_path(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(AgentError::Config(format!(
            "socket_path {}: a file that is not a socket is in the way",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// How often the Workload API's gRPC health follows readiness.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Keeps the Workload API's gRPC health SERVING while the agent is ready
/// (what `/ready` says: synced, connected to the server, its identity
/// accepted), NOT_SERVING otherwise, so `oxid-agent healthcheck` and
/// `/ready` agree.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    cache: Arc<Cache>,
    identity: Arc<identity::Status>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    type Svc =
        oxid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer<WorkloadApi>;
    reporter.set_not_serving::<Svc>().await;
    let mut serving = false;
    let mut changes = cache.subscribe();
    loop {
        let ready = changes.borrow_and_update().synced
            && cache.counters.server_connected.load(Relaxed)
            && identity.accepted();
        if ready != serving {
            serving = ready;
            match ready {
                true => reporter.set_serving::<Svc>().await,
                false => reporter.set_not_serving::<Svc>().await,
            }
        }
        // The connection flag has no wake-up of its own: poll it too.
        let _ = tokio::time::timeout(HEALTH_INTERVAL, changes.changed()).await;
    }
}
