//! One SDS caller's streams: the xDS state-of-the-world protocol as Envoy
//! speaks it to SPIRE. Each response carries a new `version_info` and a
//! random nonce; a request whose `response_nonce` is not the last nonce
//! sent is stale and ignored (names and all); a request with
//! `error_detail` is a NACK, logged with Envoy's message and counted
//! (`oxid_agent_sds_nacks_total`), and not answered again until something
//! changes, so a rejected secret does not loop. A full response goes out on
//! every change of what the caller resolves (rotation, an entry added or
//! removed, a bundle change); names not held yet are answered once they
//! resolve, on the same stream.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use oxid_pki::Selector;
use ring::rand::SecureRandom as _;
use tonic::{Status, Streaming};

use crate::cache::{Cache, Snapshot};
use crate::sds::names::{self, Name, NameError, Outcome, View};
use crate::sds::secrets::{self, SECRET_TYPE_URL};
use crate::sds::{BoxStream, SdsSettings};
use crate::workload::limits::StreamPermit;
use crate::workload::peer::Peer;

/// An attested SDS caller.
pub(crate) struct Caller {
    pub(crate) cache: Arc<Cache>,
    pub(crate) settings: Arc<SdsSettings>,
    pub(crate) peer: Peer,
    pub(crate) selectors: BTreeSet<Selector>,
}

/// What a stream answers and has answered.
#[derive(Default)]
struct State {
    /// The names asked for, parsed; `None` before the first request.
    names: Option<Vec<(String, Name)>>,
    /// The last node seen (Envoy may leave it out after the first request).
    node: Option<Node>,
    /// The nonce of the last response; requests must echo it.
    last_nonce: Option<String>,
    version: u64,
    /// A digest of the last response's resources, to push only on a
    /// change. Not the secrets themselves: a copy of every private key per
    /// stream was 2.3 KB of each stream's memory, and keys are held no
    /// longer than needed.
    last_sent: Option<ring::digest::Digest>,
    /// The names changed since the last response: answer even if the
    /// secrets are the same.
    must_answer: bool,
}

/// SHA-256 over the resources' types and encodings, each length-prefixed.
fn digest_of(resources: &[envoy_types::pb::google::protobuf::Any]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for any in resources {
        for part in [any.type_url.as_bytes(), any.value.as_slice()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    ctx.finish()
}

#[allow(clippy::result_large_err)]
pub(crate) fn refuse(e: &NameError) -> Status {
    Status::invalid_argument(e.to_string())
}

#[allow(clippy::result_large_err)]
fn parse_names(
    req: &DiscoveryRequest,
    settings: &SdsSettings,
) -> Result<Vec<(String, Name)>, Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "type_url {:?}: this service serves {SECRET_TYPE_URL}",
            req.type_url
        )));
    }
    req.resource_names
        .iter()
        .map(|raw| names::parse(raw, settings).map(|n| (raw.clone(), n)))
        .collect::<Result<_, _>>()
        .map_err(|e| refuse(&e))
}

pub(crate) fn nonce() -> String {
    let mut b = [0u8; 8];
    // SystemRandom fails only without a kernel RNG; a zero nonce still
    // works for the protocol (it only has to differ from stale ones,
    // which the version in it makes sure of).
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    oxid_pki::hex(&b)
}

impl Caller {
    /// What `names` come to on `snapshot`, with the caller's unsigned
    /// entries put in the signing queue.
    #[allow(clippy::result_large_err)]
    fn compute(
        &self,
        snapshot: &Snapshot,
        names: &[(String, Name)],
        node: Option<&Node>,
    ) -> Result<(Outcome, bool, bool), Status> {
        let validator = secrets::use_validator(self.settings.disable_spiffe_cert_validation, node);
        let view = View::new(snapshot, &self.cache.trust_domain, &self.selectors);
        self.cache.request(view.unsigned());
        let outcome = view.resolve(names, validator).map_err(|e| refuse(&e))?;
        Ok((outcome, validator, view.has_entries()))
    }

    /// Encodes resolved secrets, or `None` if one did not encode.
    fn encode(resolved: &[names::Resolved], validator: bool) -> Option<Vec<Secret>> {
        resolved
            .iter()
            .map(|r| secrets::to_secret(r, validator))
            .collect()
    }

    /// One FetchSecrets answer: waits up to `wait` for names not held yet.
    pub(crate) async fn fetch(
        &self,
        req: &DiscoveryRequest,
        wait: Duration,
    ) -> Result<DiscoveryResponse, Status> {
        let names = parse_names(req, &self.settings)?;
        let mut changes = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let snapshot = changes.borrow_and_update().clone();
            let (outcome, validator, has_entries) =
                self.compute(&snapshot, &names, req.node.as_ref())?;
            match outcome {
                Outcome::Ready(resolved) => {
                    let secrets = Self::encode(&resolved, validator)
                        .ok_or_else(|| Status::internal("a held SVID did not encode"))?;
                    self.peer.check().map_err(|e| {
                        crate::workload::attestation_refused(&self.cache, &self.peer, &e)
                    })?;
                    return Ok(DiscoveryResponse {
                        resources: secrets.iter().map(secrets::to_any).collect(),
                        type_url: SECRET_TYPE_URL.into(),
                        ..DiscoveryResponse::default()
                    });
                }
                Outcome::Pending { unresolved } => {
                    let timed_out = tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_err();
                    if timed_out {
                        return Err(if !has_entries {
                            crate::workload::no_identity(&snapshot)
                        } else {
                            Status::not_found(format!(
                                "the caller holds no {unresolved:?} yet (being signed, or not its identity)"
                            ))
                        });
                    }
                }
            }
        }
    }
}

/// Serves one StreamSecrets stream, polled by the stream it returns.
pub(crate) fn spawn(
    caller: Caller,
    requests: Streaming<DiscoveryRequest>,
    permit: StreamPermit,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<DiscoveryResponse> {
    spawn_stream(permit, move |tx| async move {
        caller.serve(requests, &tx, stopping).await
    })
}

/// Where a stream's loop puts its next response: a one-item mailbox that
/// the response stream empties. The loop is polled in place by the stream
/// (no task or channel of its own per stream: those were about 1 KB of
/// each SDS stream, `oxid-bench sds`), so `send` completes once the item
/// has been taken, and a client that leaves drops the loop with the stream.
pub(crate) struct Tx<T> {
    slot: Arc<std::sync::Mutex<Option<Result<T, Status>>>>,
}

impl<T> Tx<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Result<T, Status>>> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands `item` to the stream; completes when the stream has taken it.
    /// It cannot fail: a client that left drops the loop with the stream.
    pub(crate) async fn send(&self, item: Result<T, Status>) -> Result<(), Infallible> {
        *self.lock() = Some(item);
        // The stream takes the item right after this returns Pending, and
        // polls the loop again when its consumer wants the next item.
        std::future::poll_fn(|_| {
            if self.lock().is_some() {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        Ok(())
    }
}

/// Runs `serve` inside the returned stream, holding `permit` for as long
/// as the stream lives, and streams what it sends; an error it returns is
/// the last item.
pub(crate) fn spawn_stream<T, F, Fut>(permit: StreamPermit, serve: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(Tx<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let slot = Arc::new(std::sync::Mutex::new(None));
    let tx = Tx { slot: slot.clone() };
    Box::pin(InPlace {
        serve: Some(Box::pin(serve(tx))),
        slot,
        error: None,
        _permit: permit,
    })
}

/// A stream's loop, boxed.
type Loop = std::pin::Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// A stream loop polled by its own response stream.
struct InPlace<T> {
    /// `None` once the loop has ended.
    serve: Option<Loop>,
    slot: Arc<std::sync::Mutex<Option<Result<T, Status>>>>,
    /// Why the loop ended, sent after its last item.
    error: Option<Status>,
    _permit: StreamPermit,
}

impl<T> tokio_stream::Stream for InPlace<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(serve) = this.serve.as_mut()
            && let Poll::Ready(ended) = serve.as_mut().poll(cx)
        {
            // A finished future must not be polled again.
            this.serve = None;
            this.error = ended.err();
        }
        let item = this
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match item {
            Some(item) => Poll::Ready(Some(item)),
            None if this.serve.is_none() => Poll::Ready(this.error.take().map(Err)),
            None => Poll::Pending,
        }
    }
}

/// What a stream's loop wakes for.
pub(crate) enum Event<R> {
    /// The client sent this request.
    Request(R),
    /// The snapshot changed, or an SVID expired: compute again.
    Recompute,
    /// The client left, or the cache closed.
    Ended,
}

/// Waits for the next request, snapshot change or `wake` (the next SVID
/// expiry, which changes no snapshot); an error once the agent shuts down.
pub(crate) async fn next_event<R>(
    requests: &mut Streaming<R>,
    changes: &mut tokio::sync::watch::Receiver<Arc<Snapshot>>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
    wake: tokio::time::Instant,
) -> Result<Event<R>, Status> {
    tokio::select! {
        req = requests.message() => Ok(match req {
            Ok(Some(req)) => Event::Request(req),
            Ok(None) | Err(_) => Event::Ended,
        }),
        r = changes.changed() => Ok(if r.is_err() { Event::Ended } else { Event::Recompute }),
        () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
            Err(Status::unavailable("the agent is shutting down"))
        }
        () = tokio::time::sleep_until(wake) => Ok(Event::Recompute),
    }
}

impl Caller {
    /// The stream's loop; `Ok` when the client left, else why it ends.
    async fn serve(
        &self,
        mut requests: Streaming<DiscoveryRequest>,
        tx: &Tx<DiscoveryResponse>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let mut changes = self.cache.subscribe();
        let mut state = State::default();
        loop {
            let snapshot = changes.borrow_and_update().clone();
            if state.names.is_some() && !self.push(&snapshot, &mut state, tx).await? {
                return Ok(());
            }
            let wake = crate::workload::recheck_at(&snapshot, None);
            match next_event(&mut requests, &mut changes, &mut stopping, wake).await? {
                Event::Request(req) => self.on_request(req, &mut state)?,
                Event::Recompute => {}
                Event::Ended => return Ok(()),
            }
        }
    }

    /// Takes in one request: a stale one is dropped, a NACK logged.
    #[allow(clippy::result_large_err)]
    fn on_request(&self, req: DiscoveryRequest, state: &mut State) -> Result<(), Status> {
        if let Some(last) = &state.last_nonce
            && req.response_nonce != *last
        {
            tracing::debug!(nonce = %req.response_nonce, "ignoring a stale SDS request");
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            self.cache.counters.sds_nacks.fetch_add(1, Relaxed);
            let cred = self.peer.cred();
            tracing::warn!(
                pid = cred.and_then(|c| c.pid),
                uid = cred.map(|c| c.uid),
                version = %req.version_info,
                names = ?req.resource_names,
                envoy_error = %error.message,
                "Envoy rejected an SDS response (NACK)"
            );
        }
        if req.node.is_some() {
            state.node = req.node.clone();
        }
        let names = parse_names(&req, &self.settings)?;
        if state.names.as_ref() != Some(&names) {
            state.names = Some(names);
            state.must_answer = true;
        }
        Ok(())
    }

    /// Sends a response if the caller's secrets changed (or its names did).
    /// `Ok(false)` when the client is gone.
    async fn push(
        &self,
        snapshot: &Snapshot,
        state: &mut State,
        tx: &Tx<DiscoveryResponse>,
    ) -> Result<bool, Status> {
        let Some(names) = &state.names else {
            return Ok(true);
        };
        let (outcome, validator, has_entries) =
            self.compute(snapshot, names, state.node.as_ref())?;
        let resolved = match outcome {
            Outcome::Ready(resolved) => resolved,
            // Its entry went away after it was served: the stream ends as
            // a Workload API stream does; Envoy keeps what it has and asks
            // again.
            Outcome::Pending { .. } if !has_entries && state.last_sent.is_some() => {
                return Err(crate::workload::no_identity(snapshot));
            }
            Outcome::Pending { unresolved } => {
                tracing::debug!(
                    ?unresolved,
                    "SDS names not held yet; answering when they are"
                );
                return Ok(true);
            }
        };
        let Some(secrets) = Self::encode(&resolved, validator) else {
            return Err(Status::internal("a held SVID did not encode"));
        };
        let resources: Vec<_> = secrets.iter().map(secrets::to_any).collect();
        let digest = digest_of(&resources);
        if !state.must_answer
            && state
                .last_sent
                .as_ref()
                .is_some_and(|last| last.as_ref() == digest.as_ref())
        {
            return Ok(true);
        }
        self.peer
            .check()
            .map_err(|e| crate::workload::attestation_refused(&self.cache, &self.peer, &e))?;
        state.version += 1;
        let nonce = format!("{}-{}", state.version, nonce());
        let response = DiscoveryResponse {
            version_info: state.version.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            nonce: nonce.clone(),
            ..DiscoveryResponse::default()
        };
        if tx.send(Ok(response)).await.is_err() {
            return Ok(false);
        }
        state.last_nonce = Some(nonce);
        state.last_sent = Some(digest);
        state.must_answer = false;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::workload::limits::StreamLimits;

    #[tokio::test]
    async fn the_loop_runs_in_its_stream_ends_with_its_error_and_holds_the_permit() {
        let limits = StreamLimits::new(1);
        let mut responses = spawn_stream(limits.acquire(7).unwrap(), |tx| async move {
            for n in [1u32, 2] {
                let _ = tx.send(Ok(n)).await;
            }
            Err(Status::unavailable("the agent is shutting down"))
        });
        assert_eq!(responses.next().await.unwrap().unwrap(), 1);
        assert_eq!(responses.next().await.unwrap().unwrap(), 2);
        let end = responses.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(responses.next().await.is_none());
        assert!(
            responses.next().await.is_none(),
            "a finished loop is not polled"
        );
        // The stream holds the uid's slot until it is dropped.
        assert!(limits.acquire(7).is_err());
        drop(responses);
        assert!(limits.acquire(7).is_ok());
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_the_waiting_loop_and_its_slot() {
        let limits = StreamLimits::new(1);
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
        let mut responses = spawn_stream(limits.acquire(7).unwrap(), |tx| async move {
            let _guard = dropped_tx;
            let _ = tx.send(Ok(1u32)).await;
            std::future::pending::<Result<(), Status>>().await
        });
        assert_eq!(responses.next().await.unwrap().unwrap(), 1);
        // Polled once more, the loop is waiting, with nothing to send.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            tokio_stream::Stream::poll_next(responses.as_mut(), &mut cx).is_pending(),
            "the loop has nothing to send"
        );
        drop(responses);
        // The loop's state went with the stream: its sender is dropped.
        assert!(dropped.await.is_err());
        assert!(limits.acquire(7).is_ok());
    }
}
