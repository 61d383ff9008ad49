//! The agent API: node agents talk to the server over TLS 1.3 on one port.
//!
//! `Attest` needs no client certificate. Every other call must present the
//! agent's SVID; the handshake already checked it against the live bundle,
//! and each call then checks it against the agent's record: known, not
//! banned, serial current (the previous serial only until the renewed SVID
//! is first used).

pub(crate) mod attest;
mod conn;
mod error;
mod identity;
mod rate;
mod server_svid;
mod service;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use oxid_pki::SpiffeId;
use oxid_pki::bundle::Bundle;
use oxid_tls::{LiveBundle, SpiffeClientVerifier, SvidResolver};
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::server_svid::ServerSvid;
use crate::ca::{CaManager, CaSnapshot};
use crate::clock::Clock;
use crate::datastore::DataStore;

pub use self::conn::{ConnSettings, DEFAULT_MAX_CONNECTION_AGE, PeerInfo};
pub use self::error::AgentApiError;
pub use self::service::AgentApiService;
pub use crate::index::IndexHandle;

/// How often each side pings an idle agent-API connection, and how long it
/// waits for the answer before dropping the connection.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);
/// See [`KEEPALIVE`].
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settings of the agent API.
#[derive(Debug, Clone)]
pub struct AgentApiConfig {
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Duration,
    /// X509-SVID TTL for entries without one.
    pub default_x509_ttl: Duration,
    /// JWT-SVID TTL for entries without one.
    pub default_jwt_ttl: Duration,
    /// Most CSRs in one `SignX509Svids` call.
    pub max_batch: usize,
    /// Largest request message; tonic answers `OutOfRange` past it, before
    /// decoding.
    pub max_request_bytes: usize,
    /// Calls each agent may make per second (bursts of twice that).
    pub requests_per_second: u32,
    /// Attestations each node (attested ID) may make per minute.
    pub attestations_per_minute: u32,
    /// Trusted CAs for x509pop node attestation; `None` turns x509pop off.
    pub x509pop_roots: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// Where calls are counted.
    pub rpc_metrics: Arc<crate::metrics::RpcMetrics>,
    /// Connection caps and timeouts, already fitted to the open-file limit.
    pub connections: ConnSettings,
}

/// The server's trust bundle as the TLS layer reads it: the CA's latest
/// published snapshot, so a handshake costs an `Arc` clone, not a rebuild.
pub(crate) struct CaBundle(pub(crate) watch::Receiver<Arc<CaSnapshot>>);

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaBundle")
    }
}

impl LiveBundle for CaBundle {
    fn current_bundle(&self) -> Arc<Bundle> {
        self.0.borrow().bundle().clone()
    }
}

/// Serves the agent API on `listener` until `shutdown` completes.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    ca: Arc<CaManager>,
    store: Arc<dyn DataStore>,
    index: Arc<IndexHandle>,
    clock: Arc<dyn Clock>,
    config: AgentApiConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let trust_domain = ca.bundle().trust_domain().clone();
    let server_id = trust_domain
        .spiffe_id("/oxid/server")
        .map_err(|e| e.to_string())?;
    let resolver = Arc::new(SvidResolver::default());
    let server_svid = ServerSvid {
        ca: ca.clone(),
        clock: clock.clone(),
        server_id: server_id.clone(),
        ttl: config.default_x509_ttl,
        resolver: resolver.clone(),
    };
    let renew_at = server_svid.issue()?;
    let renewer = server_svid.spawn(renew_at);
    let agent_prefix = trust_domain
        .spiffe_id("/oxid/agent")
        .map_err(|e| e.to_string())?;
    let verifier = Arc::new(SpiffeClientVerifier::new(
        Arc::new(CaBundle(ca.subscribe())),
        move |id: &SpiffeId| {
            id.is_member_of(agent_prefix.trust_domain()) && id.path_has_prefix(agent_prefix.path())
        },
    ));
    let tls = oxid_tls::server_config(resolver, verifier).map_err(|e| e.to_string())?;
    let rpc_layer = crate::metrics::RpcLayer::new("agent", config.rpc_metrics.clone());
    let max_request_bytes = config.max_request_bytes;
    let connections = config.connections;
    // Long-lived streams (sync) must end when the server stops, or a
    // graceful shutdown would wait for agents forever.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let service = AgentApiService::new(ca, store, index, clock, config, server_id, stopping)?;
    let (incoming, accept_task) = conn::incoming(listener, Arc::new(tls), connections);
    let result = tonic::transport::Server::builder()
        // An agent that vanished without closing (host gone, NAT state
        // dropped) is noticed and its Sync stream freed.
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // The Sync stream ends at the connection's own (jittered) age and
        // the agent moves on; GOAWAY after the latest such age closes what
        // a client left open, letting its calls in flight finish.
        .max_connection_age(conn::goaway_after(connections.max_age))
        .layer(oxid_telemetry::conn::ActivityLayer::<PeerInfo>::new())
        .layer(rpc_layer)
        .add_service(
            oxid_proto::agent::agent_api_server::AgentApiServer::new(service)
                .max_decoding_message_size(max_request_bytes),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| e.to_string());
    renewer.abort();
    let _ = renewer.await;
    let _ = accept_task.await;
    result
}
