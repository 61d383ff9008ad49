//! Running an agent: restore or attest its identity, follow the server, keep
//! SVIDs fresh, serve the Workload API until told to stop.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxid_pki::bundle::Bundle;
use oxid_tls::{SharedBundle, SvidResolver};

use crate::cache::Cache;
use crate::config::AgentConfig;
use crate::server::{Attestation, Identity, ServerClient};
use crate::workload::conn::WorkloadConn;
use crate::workload::jwt_cache::JwtCache;
use crate::workload::{WorkloadApi, attest::UnixAttestor, check_header};
use crate::{AgentError, state, svids, sync};

/// How long open connections get to close after a stop.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    // Before anything is spent: connection caps that leave no descriptors
    // for the agent's own files are a setup error.
    let connections = config
        .connections
        .fitted(oxid_telemetry::conn::raise_nofile_limit())
        .map_err(AgentError::Config)?;
    let dir = config.data_dir.clone();
    // Before anything is spent (a join token): the data and socket
    // directories must be ones no other user can redirect, or a refusal
    // at bind would come after the token was used up.
    oxid_tls::socket::prepare_private_dir(&dir, 0o700)
        .map_err(|e| AgentError::State(e.to_string()))?;
    // Held until the agent stops: a second agent on this path is refused
    // here, before it spends anything, instead of taking the socket.
    let mut socket = oxid_tls::socket::lock_socket(&config.socket_path)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    // Before anything is spent (a join token): without it, every Workload
    // API caller would be refused.
    crate::workload::holder::self_test().map_err(|e| {
        AgentError::Config(format!(
            "cannot tell which process holds a Workload API connection ({e}): the agent \
             needs the kernel's Unix sock_diag over AF_NETLINK (under systemd, \
             RestrictAddressFamilies must include AF_NETLINK)"
        ))
    })?;
    let td = config.trust_domain.clone();
    let bundle = match state::load_bundle(&dir, &td) {
        Some(b) => b,
        None => {
            let path = config.trust_bundle.as_ref().ok_or_else(|| {
                AgentError::Config(
                    "no saved bundle: give --trust-bundle (from `oxid-server bundle show`)".into(),
                )
            })?;
            let pem = std::fs::read(path)
                .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
            Bundle::from_x509_pem(td.clone(), &pem)
                .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?
        }
    };
    let tls_bundle = Arc::new(SharedBundle::new(bundle));
    let server_id = td
        .spiffe_id("/oxid/server")
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let server = Arc::new(
        ServerClient::new(
            config.server_address.clone(),
            server_id,
            tls_bundle.clone(),
            Arc::new(SvidResolver::default()),
        )?
        .with_clock(config.clock.clone()),
    );

    let now = config.clock.now();
    let identity = match state::load_identity(&dir) {
        Some(i) if i.not_after > now => {
            tracing::info!(agent = %i.spiffe_id, "restored the agent identity");
            i
        }
        Some(i) if config.attestation.is_none() => {
            let ago = now
                .duration_since(i.not_after)
                .unwrap_or_default()
                .as_secs();
            return Err(AgentError::Config(format!(
                "the saved agent SVID of {} expired {ago} s ago: this agent needs a new join \
                 token (`oxid-server token generate`, then --join-token), or x509pop \
                 credentials (--node-cert and --node-key)",
                i.spiffe_id
            )));
        }
        Some(i) => {
            tracing::warn!(agent = %i.spiffe_id, "the saved agent SVID expired; attesting again");
            attest(&server, config.attestation.as_ref(), &dir, &tls_bundle, &td).await?
        }
        None => attest(&server, config.attestation.as_ref(), &dir, &tls_bundle, &td).await?,
    };
    server.use_identity(&identity)?;

    let cache = Arc::new(Cache::new(td));
    let renewer = tokio::spawn(keep_identity(
        server.clone(),
        identity,
        config.attestation.clone(),
        dir.clone(),
        tls_bundle.clone(),
    ));
    let syncer = tokio::spawn(sync::run(server.clone(), cache.clone(), tls_bundle, dir));
    let signer = tokio::spawn(svids::run(
        server.clone(),
        cache.clone(),
        config.max_presigned_svids,
        config.clock.clone(),
    ));

    let listener = socket
        .bind(0o777)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let rpc = Arc::new(oxid_telemetry::RpcMetrics::default());
    let jwts = Arc::new(Mutex::new(JwtCache::new(
        config.jwt_svid_cache_size,
        config.jwt_svid_cache_per_uid,
    )));
    let mint_budget = Arc::new(crate::workload::budget::MintBudget::new(
        config.jwt_mints_per_second,
        config.jwt_mints_per_second_per_uid,
    ));
    let metrics_task = match config.metrics_address {
        Some(address) => {
            let l = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| AgentError::Config(format!("metrics_address {address}: {e}")))?;
            // Logged as bound, so a port of 0 can be found.
            if let Ok(bound) = l.local_addr() {
                tracing::info!(metrics_address = %bound, "oxid-agent serving metrics");
            }
            let source = Arc::new(crate::metrics::AgentMetrics::new(
                &rpc,
                cache.clone(),
                jwts.clone(),
                mint_budget.clone(),
            ));
            Some(tokio::spawn(oxid_telemetry::serve(
                l,
                source,
                std::future::pending(),
            )))
        }
        None => None,
    };
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let api = WorkloadApi::new(
        cache.clone(),
        server,
        Arc::new(UnixAttestor::default()),
        jwts,
        stopping.clone(),
        crate::workload::limits::StreamLimits::new(config.max_streams_per_uid),
        config.clock.clone(),
    )
    .with_mint_budget(mint_budget);
    // gRPC health and reflection share the socket; neither needs the
    // Workload API's security header. Health turns SERVING at first sync.
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(health, cache));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(oxid_proto::WORKLOAD_FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    tracing::info!(socket = %config.socket_path.display(), "oxid-agent serving the Workload API");
    let signal = async move {
        shutdown.await;
        tracing::info!("oxid-agent stopping");
        let _ = stop.send(true);
    };
    // Capped and timed out at accept and on every read; see limits.
    let (incoming, accept_task) = crate::workload::limits::accept(listener, connections);
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
        // Each connection goes through oxid_h2_authority's rewriter, which lets
        // gRPC C-core and Java clients in.
        .serve_with_incoming_shutdown(incoming, signal);
    // Workload API streams end at once on shutdown; a connection that still
    // holds on (a health Watch, a client ignoring GOAWAY) is dropped after
    // DRAIN_GRACE so a stop never hangs.
    let mut stopped = stopping;
    let result = tokio::select! {
        r = serve => r,
        _ = async {
            let _ = stopped.wait_for(|stop| *stop).await;
            tokio::time::sleep(DRAIN_GRACE).await;
        } => Ok(()),
    };
    for task in [renewer, syncer, signer, health_task, accept_task]
        .into_iter()
        .chain(metrics_task)
    {
        task.abort();
        let _ = task.await;
    }
    // Removes the socket only if it is still the one bound here.
    drop(socket);
    tracing::info!("oxid-agent stopped");
    result.map_err(|e| AgentError::Internal(e.to_string()))
}

async fn attest(
    server: &ServerClient,
    how: Option<&Attestation>,
    dir: &std::path::Path,
    tls_bundle: &SharedBundle,
    td: &oxid_pki::TrustDomain,
) -> Result<Identity, AgentError> {
    let how = how.ok_or_else(|| {
        AgentError::Config(
            "no saved agent identity: give --join-token, or --node-cert and --node-key".into(),
        )
    })?;
    let (identity, bundle_json) = server.attest(how).await?;
    if let Ok(bundle) = Bundle::from_spiffe_json(td.clone(), bundle_json.as_bytes()) {
        tls_bundle.set(bundle.clone());
        state::save_bundle(dir, &bundle)?;
    }
    state::save_identity(dir, &identity)?;
    tracing::info!(agent = %identity.spiffe_id, "attested to the server");
    Ok(identity)
}

/// Renews the agent SVID at half-life. If the server says the agent is gone
/// (evicted, banned, expired), an x509pop agent attests again on its own; a
/// join-token agent says plainly that it needs a new token.
async fn keep_identity(
    server: Arc<ServerClient>,
    mut identity: Identity,
    how: Option<Attestation>,
    dir: std::path::PathBuf,
    tls_bundle: Arc<SharedBundle>,
) {
    let td = identity.spiffe_id.trust_domain().clone();
    loop {
        let wait = identity
            .renew_at
            .saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(sync::jittered(wait.max(Duration::from_millis(200)))).await;
        match server.renew(&identity).await {
            Ok(next) => {
                if let Err(e) =
                    state::save_identity(&dir, &next).and_then(|()| server.use_identity(&next))
                {
                    tracing::error!(error = %e, "cannot store the renewed agent SVID");
                }
                identity = next;
            }
            Err(AgentError::Refused(message)) => match &how {
                Some(x509 @ Attestation::X509Pop { .. }) => {
                    tracing::warn!(error = %message, "the server refused the agent SVID; attesting again");
                    match attest(&server, Some(x509), &dir, &tls_bundle, &td).await {
                        Ok(next) => {
                            let _ = server.use_identity(&next);
                            identity = next;
                        }
                        Err(e) => tracing::error!(error = %e, "re-attestation failed"),
                    }
                }
                _ => {
                    tracing::error!(
                        error = %message,
                        "the server refused the agent SVID; this agent needs a new join token \
                         (`oxid-server token generate`) and a restart with --join-token"
                    );
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "renewing the agent SVID failed; retrying");
                tokio::time::sleep(sync::jittered(Duration::from_secs(5))).await;
            }
        }
    }
}

/// Marks the Workload API service SERVING once the agent has synced.
async fn report_health(reporter: tonic_health::server::HealthReporter, cache: Arc<Cache>) {
    type Svc =
        oxid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer<WorkloadApi>;
    reporter.set_not_serving::<Svc>().await;
    let mut changes = cache.subscribe();
    loop {
        if changes.borrow_and_update().synced {
            reporter.set_serving::<Svc>().await;
            return;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}
