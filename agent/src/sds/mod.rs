//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket,
//! SPIRE-compatible: the same resource names and secret shapes, so Envoy
//! configurations written for SPIRE's agent work unchanged.
//!
//! Callers are attested from the socket exactly like Workload API callers
//! (the pin taken at accept, [`crate::workload::attest`]); Envoy sends no
//! `workload.spiffe.io` header and none is asked for. `StreamSecrets`
//! pushes a full response on every change of what the caller resolves
//! ([`stream`]); `FetchSecrets` answers once; `DeltaSecrets` (which Envoy
//! uses when configured with `DELTA_GRPC`; SPIRE answers `Unimplemented`)
//! sends each changed resource on its own ([`delta`]).

pub mod config;
mod delta;
mod names;
mod secrets;
mod service;
mod stream;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub use self::config::{SdsFile, SdsSettings};
use crate::cache::Cache;
use crate::workload::attest::UnixAttestor;
use crate::workload::limits::{StreamLimits, StreamPermit};

/// How long `FetchSecrets` waits for names the caller does not hold yet.
const FETCH_WAIT: Duration = Duration::from_secs(10);

/// The SDS service.
pub struct Sds {
    cache: Arc<Cache>,
    attestor: Arc<UnixAttestor>,
    settings: Arc<SdsSettings>,
    /// Open streams per uid, shared with the Workload API's.
    streams: Arc<StreamLimits>,
    /// True once the agent stops: open streams end with `Unavailable`.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Sds {
    /// SDS over `cache`, with `streams` counted with the Workload API's.
    pub fn new(
        cache: Arc<Cache>,
        attestor: Arc<UnixAttestor>,
        settings: SdsSettings,
        streams: Arc<StreamLimits>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            cache,
            attestor,
            settings: Arc::new(settings),
            streams,
            stopping,
        }
    }

    /// The tonic service, decoding requests up to `max_request_bytes`.
    pub fn into_server(self, max_request_bytes: usize) -> service::SdsService {
        service::SdsService::new(self, max_request_bytes)
    }
}

impl Sds {
    /// A stream's slot under the caller's uid, and the attested caller.
    #[allow(clippy::result_large_err)]
    fn open<T>(&self, req: &Request<T>) -> Result<(stream::Caller, StreamPermit), Status> {
        let peer = crate::workload::peer(req)?.clone();
        let uid = peer.cred().ok_or_else(crate::workload::unidentified)?.uid;
        let permit = self.streams.acquire(uid)?;
        let selectors = crate::workload::caller_selectors(&self.attestor, &self.cache, req)?;
        let caller = stream::Caller {
            cache: self.cache.clone(),
            settings: self.settings.clone(),
            peer,
            selectors,
        };
        Ok((caller, permit))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (caller, permit) = self.open(&req)?;
        Ok(Response::new(delta::spawn(
            caller,
            req.into_inner(),
            permit,
            self.stopping.clone(),
        )))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (caller, permit) = self.open(&req)?;
        Ok(Response::new(stream::spawn(
            caller,
            req.into_inner(),
            permit,
            self.stopping.clone(),
        )))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let peer = crate::workload::peer(&req)?.clone();
        let selectors = crate::workload::caller_selectors(&self.attestor, &self.cache, &req)?;
        let caller = stream::Caller {
            cache: self.cache.clone(),
            settings: self.settings.clone(),
            peer,
            selectors,
        };
        caller
            .fetch(&req.into_inner(), FETCH_WAIT)
            .await
            .map(Response::new)
    }
}
