//! `DeltaSecrets`: the incremental xDS protocol, which Envoy speaks when its
//! `api_config_source` says `DELTA_GRPC`. The client subscribes and
//! unsubscribes names; each resource carries its own version (a digest of
//! its encoding), and a response holds only the resources whose version
//! the client does not have yet: on a new subscription, on a change of
//! what a name resolves to, and never again for one the client already
//! has (its `initial_resource_versions` after a reconnect). Names not held
//! yet are sent when they resolve. There is no wildcard: SDS clients name
//! their secrets. As on the state-of-the-world stream, a NACK is logged and
//! counted and not answered until something changes, a malformed name is
//! `InvalidArgument`, and a caller whose entries are all gone gets
//! `PermissionDenied "no identity issued"`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::{Status, Streaming};

use crate::cache::Snapshot;
use crate::sds::BoxStream;
use crate::sds::names::{self, Name, View};
use crate::sds::secrets::{self, SECRET_TYPE_URL};
use crate::sds::stream::{Caller, Event, next_event, nonce, refuse, spawn_stream};
use crate::workload::limits::StreamPermit;

/// What one delta stream's client holds and wants.
#[derive(Default)]
struct State {
    /// Subscribed names, parsed.
    subscribed: BTreeMap<String, Name>,
    /// Name → the version the client holds.
    held: HashMap<String, String>,
    node: Option<Node>,
    /// Bumped on every response.
    system_version: u64,
}

type Tx = crate::sds::stream::Tx<DeltaDiscoveryResponse>;

/// Serves one DeltaSecrets stream, polled by the stream it returns.
pub(crate) fn spawn(
    caller: Caller,
    requests: Streaming<DeltaDiscoveryRequest>,
    permit: StreamPermit,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<DeltaDiscoveryResponse> {
    spawn_stream(permit, move |tx| async move {
        caller.serve_delta(requests, &tx, stopping).await
    })
}

/// A resource version: a digest of its encoding, so equal secrets have
/// equal versions across streams and reconnects.
fn version_of(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    oxid_pki::hex(&digest.as_ref()[..12])
}

impl Caller {
    async fn serve_delta(
        &self,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        tx: &Tx,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let mut changes = self.cache.subscribe();
        let mut state = State::default();
        loop {
            let snapshot = changes.borrow_and_update().clone();
            if !self.push_delta(&snapshot, &mut state, tx).await? {
                return Ok(());
            }
            let wake = crate::workload::recheck_at(&snapshot, None);
            match next_event(&mut requests, &mut changes, &mut stopping, wake).await? {
                Event::Request(req) => self.on_delta_request(req, &mut state)?,
                Event::Recompute => {}
                Event::Ended => return Ok(()),
            }
        }
    }

    #[allow(clippy::result_large_err)]
    fn on_delta_request(
        &self,
        req: DeltaDiscoveryRequest,
        state: &mut State,
    ) -> Result<(), Status> {
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "type_url {:?}: this service serves {SECRET_TYPE_URL}",
                req.type_url
            )));
        }
        if let Some(error) = &req.error_detail {
            self.cache.counters.sds_nacks.fetch_add(1, Relaxed);
            let cred = self.peer.cred();
            tracing::warn!(
                pid = cred.and_then(|c| c.pid),
                uid = cred.map(|c| c.uid),
                nonce = %req.response_nonce,
                envoy_error = %error.message,
                "Envoy rejected an SDS response (NACK)"
            );
        }
        if req.node.is_some() {
            state.node = req.node;
        }
        // Only on the first request of a stream (a reconnect).
        if state.system_version == 0 && state.subscribed.is_empty() {
            state.held.extend(req.initial_resource_versions);
        }
        for raw in req.resource_names_unsubscribe {
            state.subscribed.remove(&raw);
            state.held.remove(&raw);
        }
        for raw in req.resource_names_subscribe {
            let name = names::parse(&raw, &self.settings).map_err(|e| refuse(&e))?;
            state.subscribed.insert(raw, name);
        }
        Ok(())
    }

    /// Sends the resources whose version the client does not hold.
    /// `Ok(false)` when the client is gone.
    async fn push_delta(
        &self,
        snapshot: &Snapshot,
        state: &mut State,
        tx: &Tx,
    ) -> Result<bool, Status> {
        if state.subscribed.is_empty() {
            return Ok(true);
        }
        let validator = secrets::use_validator(
            self.settings.disable_spiffe_cert_validation,
            state.node.as_ref(),
        );
        let view = View::new(snapshot, &self.cache.trust_domain, &self.selectors);
        self.cache.request(view.unsigned());
        if !view.has_entries() && !state.held.is_empty() && snapshot.synced {
            return Err(crate::workload::no_identity(snapshot));
        }
        let mut resources = Vec::new();
        for (raw, name) in &state.subscribed {
            let Some(resolved) = view.one(raw, name, validator).map_err(|e| refuse(&e))? else {
                continue; // answered once it resolves
            };
            let Some(secret) = secrets::to_secret(&resolved, validator) else {
                return Err(Status::internal("a held SVID did not encode"));
            };
            let any = secrets::to_any(&secret);
            let version = version_of(&any.value);
            if state.held.get(raw) != Some(&version) {
                resources.push(Resource {
                    name: raw.clone(),
                    version,
                    resource: Some(any),
                    ..Resource::default()
                });
            }
        }
        if resources.is_empty() {
            return Ok(true);
        }
        self.peer
            .check()
            .map_err(|e| crate::workload::attestation_refused(&self.cache, &self.peer, &e))?;
        state.system_version += 1;
        let held: Vec<(String, String)> = resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        let response = DeltaDiscoveryResponse {
            system_version_info: state.system_version.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            nonce: format!("{}-{}", state.system_version, nonce()),
            ..DeltaDiscoveryResponse::default()
        };
        if tx.send(Ok(response)).await.is_err() {
            return Ok(false);
        }
        // A NACKed version is still the one sent: it is not sent again
        // until the secret changes, so a rejection does not loop.
        state.held.extend(held);
        Ok(true)
    }
}
