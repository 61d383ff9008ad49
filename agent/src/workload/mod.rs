//! The SPIFFE Workload API on a Unix socket, exactly as the wire contract in
//! the SPIFFE spec (README, Workload API): the `workload.spiffe.io: true` header, `PermissionDenied
//! "no identity issued"`, `Unavailable` until the first sync, full state on
//! every change, never an empty field.

pub mod attest;
pub mod budget;
pub mod conn;
pub(crate) mod holder;
pub mod jwt_cache;
pub mod limits;
pub mod peer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::{Bundle, BundleSource};
use oxid_pki::{Selector, SpiffeId, TrustDomain};
use oxid_proto::agent as agent_pb;
use oxid_proto::workload as pb;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use self::attest::{AttestError, UnixAttestor};
use self::budget::MintBudget;
use self::jwt_cache::JwtCache;
use self::limits::{StreamLimits, StreamPermit};
use self::peer::Peer;
use crate::cache::{Cache, Entry, Snapshot};
use crate::clock::{self, WallClock};
use crate::server_client::ServerClient;

/// The message SPIFFE clients match on when a caller has no identity.
const NO_IDENTITY: &str = "no identity issued";

/// Rejects calls without the security header (clients do not retry this).
#[allow(clippy::result_large_err)]
pub fn check_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get("workload.spiffe.io") {
        Some(v) if v == "true" => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// `message` with the security header [`check_header`] requires, as SPIFFE
/// clients send it.
pub fn with_header<T>(message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// The Workload API.
pub struct WorkloadApi {
    cache: Arc<Cache>,
    server: Arc<ServerClient>,
    attestor: Arc<UnixAttestor>,
    /// JWT-SVIDs by (entry ID, audiences), kept until half their life;
    /// shared so metrics can report its size.
    jwts: Arc<Mutex<JwtCache>>,
    /// Turns true when the agent stops: open streams end with `Unavailable`
    /// (clients reconnect), or graceful shutdown would wait on them forever.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Open streams per uid, bounded.
    streams: Arc<StreamLimits>,
    /// For the `exp` of tokens to validate; see [`crate::clock`].
    wall: WallClock,
    /// What workloads may make the agent mint at the server.
    budget: Arc<MintBudget>,
}

impl WorkloadApi {
    /// A Workload API over `cache`, minting JWT-SVIDs through `server` and
    /// reusing them from `jwts`, whose streams end once `stopping` is true,
    /// validating tokens against `wall` time.
    pub fn new(
        cache: Arc<Cache>,
        server: Arc<ServerClient>,
        attestor: Arc<UnixAttestor>,
        jwts: Arc<Mutex<JwtCache>>,
        stopping: tokio::sync::watch::Receiver<bool>,
        streams: Arc<StreamLimits>,
        wall: WallClock,
    ) -> Self {
        Self {
            cache,
            server,
            attestor,
            jwts,
            stopping,
            streams,
            wall,
            budget: Arc::new(MintBudget::new(
                crate::config::DEFAULT_JWT_MINTS_PER_SECOND,
                crate::config::DEFAULT_JWT_MINTS_PER_SECOND_PER_UID,
            )),
        }
    }

    /// This API, holding JWT-SVID mints for workloads to `budget`.
    #[must_use]
    pub fn with_mint_budget(mut self, budget: Arc<MintBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// A stream of what `compute` makes of each snapshot, or its error on
    /// the current one (refused before the stream opens).
    #[allow(clippy::result_large_err)]
    fn open_stream<T, F>(
        &self,
        permit: StreamPermit,
        peer: &Peer,
        compute: F,
    ) -> Result<Response<WatchStream<T>>, Status>
    where
        T: Clone + PartialEq + Send + Sync + 'static,
        F: Fn(&Snapshot) -> Result<Option<T>, Status> + Send + 'static,
    {
        let snapshot = self.cache.current();
        let first = compute(&snapshot)?;
        Ok(Response::new(watch_stream(
            self.cache.clone(),
            self.stopping.clone(),
            permit,
            peer.clone(),
            compute,
            (snapshot, first),
        )))
    }

    /// A stream slot for the caller's uid.
    #[allow(clippy::result_large_err)]
    fn stream_permit<T>(&self, req: &Request<T>) -> Result<StreamPermit, Status> {
        let uid = peer(req)?.cred().ok_or_else(unidentified)?.uid;
        self.streams.acquire(uid)
    }
}

/// The process that made the caller's connection, pinned at accept.
#[allow(clippy::result_large_err)]
pub(crate) fn peer<T>(req: &Request<T>) -> Result<&Peer, Status> {
    req.extensions().get::<Peer>().ok_or_else(unidentified)
}

pub(crate) fn unidentified() -> Status {
    Status::permission_denied("cannot identify the calling process")
}

/// The caller's selectors, from its socket credentials.
#[allow(clippy::result_large_err)]
pub(crate) fn caller_selectors<T>(
    attestor: &UnixAttestor,
    cache: &Cache,
    req: &Request<T>,
) -> Result<BTreeSet<Selector>, Status> {
    let peer = peer(req)?;
    attestor
        .attest(peer)
        .map_err(|e| attestation_refused(cache, peer, &e))
}

/// Counts and logs a refused attestation; the caller's status.
pub(crate) fn attestation_refused(cache: &Cache, peer: &Peer, e: &AttestError) -> Status {
    cache
        .counters
        .attestation_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cred = peer.cred();
    tracing::warn!(
        pid = cred.and_then(|c| c.pid),
        uid = cred.map(|c| c.uid),
        error = %e,
        "workload attestation refused"
    );
    Status::permission_denied(format!("workload attestation failed: {e}"))
}

/// `Unavailable` before the first sync, `PermissionDenied` after.
pub(crate) fn no_identity(snapshot: &Snapshot) -> Status {
    if snapshot.synced {
        Status::permission_denied(NO_IDENTITY)
    } else {
        Status::unavailable("the agent has not synced with the server yet")
    }
}

fn td_key(td: &TrustDomain) -> String {
    td.id().to_string()
}

/// Bundles a caller with `entries` receives: its own trust domain's, and
/// the federated ones its entries ask for (when known).
pub(crate) fn bundles_for<'a>(
    snapshot: &'a Snapshot,
    own: &TrustDomain,
    entries: &[&Entry],
) -> BTreeMap<TrustDomain, &'a Arc<Bundle>> {
    let mut out = BTreeMap::new();
    if let Some(b) = snapshot.bundles.get(own) {
        out.insert(own.clone(), b);
    }
    for e in entries {
        for td in &e.federates_with {
            if let Some(b) = snapshot.bundles.get(td) {
                out.insert(td.clone(), b);
            }
        }
    }
    out
}

fn x509_response(
    snapshot: &Snapshot,
    own: &TrustDomain,
    selectors: &BTreeSet<Selector>,
) -> Result<Option<pb::X509svidResponse>, Status> {
    let entries: Vec<&Entry> = snapshot.matching(selectors).collect();
    if entries.is_empty() {
        return Err(no_identity(snapshot));
    }
    let bundles = bundles_for(snapshot, own, &entries);
    let own_bundle = bundles
        .get(own)
        .map(|b| b.x509_authorities_der())
        .filter(|b| !b.is_empty());
    let Some(own_bundle) = own_bundle else {
        return Ok(None); // no bundle yet: wait rather than send an empty one
    };
    let now = Instant::now();
    let svids: Vec<pb::X509svid> = entries
        .iter()
        .filter_map(|e| {
            let held = snapshot.svids.get(e.id.as_str())?;
            (held.expires > now).then(|| pb::X509svid {
                spiffe_id: e.spiffe_id.to_string(),
                x509_svid: held.chain_der.clone(),
                x509_svid_key: held.key.der().to_vec(),
                bundle: own_bundle.clone(),
                hint: e.hint.clone(),
            })
        })
        .collect();
    if svids.is_empty() {
        return Ok(None); // being signed: the next snapshot carries them
    }
    let federated_bundles = bundles
        .iter()
        .filter(|(td, _)| *td != own)
        .map(|(td, b)| (td_key(td), b.x509_authorities_der()))
        .filter(|(_, der)| !der.is_empty())
        .collect();
    Ok(Some(pb::X509svidResponse {
        svids,
        crl: vec![],
        federated_bundles,
    }))
}

type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How long a stream waits for its first message (an SVID being signed, the
/// first bundle) before telling the client `Unavailable`, so a client never
/// hangs on an agent that cannot get what it needs from the server.
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(10);

/// How often a stream re-checks expiry when nothing else changes.
const RECHECK: Duration = Duration::from_secs(30);

/// Streams `compute(snapshot)` on every snapshot change, skipping repeats.
/// `None` means nothing valid to send yet: it is waited for (at most
/// [`FIRST_MESSAGE_WAIT`] before the first message), and it ends the stream
/// with `Unavailable` once something was sent (the SVIDs expired unrenewed).
/// An error, or `stopping` turning true, ends the stream. Before each
/// message, `peer` is checked again: a process that has exited, executed
/// another program or handed its connection away gets `PermissionDenied`
/// rather than the next rotated key.
/// `first` is what `compute` gave for a snapshot already, so the first
/// message is not computed twice.
fn watch_stream<T, F>(
    cache: Arc<Cache>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    permit: StreamPermit,
    peer: Peer,
    compute: F,
    first: (Arc<Snapshot>, Option<T>),
) -> WatchStream<T>
where
    T: Clone + PartialEq + Send + Sync + 'static,
    F: Fn(&Snapshot) -> Result<Option<T>, Status> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        // Held for as long as the stream lives.
        let _permit = permit;
        let mut changes = cache.subscribe();
        let mut first = Some(first);
        let mut last: Option<T> = None;
        let first_deadline = tokio::time::Instant::now() + FIRST_MESSAGE_WAIT;
        loop {
            let snapshot = changes.borrow_and_update().clone();
            let outcome = match first.take() {
                Some((seen, message)) if Arc::ptr_eq(&seen, &snapshot) => Ok(message),
                _ => compute(&snapshot),
            };
            let end = match outcome {
                Err(status) => Some(status),
                Ok(None) if last.is_some() => Some(Status::unavailable(
                    "the caller's SVIDs expired before the agent could renew them \
                     (is the server reachable?); retry",
                )),
                Ok(None) if tokio::time::Instant::now() >= first_deadline => {
                    Some(Status::unavailable(
                        "the agent has no valid SVID or bundle for the caller yet \
                         (waiting for the server); retry",
                    ))
                }
                Ok(Some(msg)) if last.as_ref() != Some(&msg) => match peer.check() {
                    Err(e) => Some(attestation_refused(&cache, &peer, &e)),
                    Ok(()) => {
                        if tx.send(Ok(msg.clone())).await.is_err() {
                            return;
                        }
                        last = Some(msg);
                        None
                    }
                },
                Ok(_) => None,
            };
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
                return;
            }
            let wake = recheck_at(&snapshot, last.is_none().then_some(first_deadline));
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                    let _ = tx.send(Err(Status::unavailable("the agent is shutting down"))).await;
                    return;
                }
                // SVIDs expire without a snapshot change.
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// When a stream must look again without a snapshot change: the next SVID
/// expiry, the first-message deadline, or [`RECHECK`], whichever is first.
pub(crate) fn recheck_at(snapshot: &Snapshot, deadline: Option<Instant>) -> Instant {
    let now = Instant::now();
    let next_expiry = snapshot
        .svids
        .values()
        .filter(|held| held.expires > now)
        .map(|held| held.expires - now)
        .min()
        .unwrap_or(RECHECK);
    let at = now + next_expiry.min(RECHECK);
    deadline.map_or(at, |d| d.min(at))
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = WatchStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = WatchStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = WatchStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let permit = self.stream_permit(&req)?;
        let selectors = caller_selectors(&self.attestor, &self.cache, &req)?;
        let own = self.cache.trust_domain.clone();
        let cache = self.cache.clone();
        let compute = move |s: &Snapshot| {
            // Entries beyond the pre-signed ones are signed on first request.
            cache.request(
                s.matching(&selectors)
                    .filter(|e| !s.svids.contains_key(e.id.as_str()))
                    .map(|e| e.id.clone()),
            );
            x509_response(s, &own, &selectors)
        };
        self.open_stream(permit, peer(&req)?, compute)
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let permit = self.stream_permit(&req)?;
        let selectors = caller_selectors(&self.attestor, &self.cache, &req)?;
        let own = self.cache.trust_domain.clone();
        let compute = move |s: &Snapshot| {
            let entries: Vec<&Entry> = s.matching(&selectors).collect();
            if entries.is_empty() {
                return Err(no_identity(s));
            }
            let bundles: HashMap<String, Vec<u8>> = bundles_for(s, &own, &entries)
                .iter()
                .map(|(td, b)| (td_key(td), b.x509_authorities_der()))
                .filter(|(_, der)| !der.is_empty())
                .collect();
            Ok((!bundles.is_empty()).then_some(pb::X509BundlesResponse {
                crl: vec![],
                bundles,
            }))
        };
        self.open_stream(permit, peer(&req)?, compute)
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let permit = self.stream_permit(&req)?;
        let selectors = caller_selectors(&self.attestor, &self.cache, &req)?;
        let own = self.cache.trust_domain.clone();
        let compute = move |s: &Snapshot| {
            let entries: Vec<&Entry> = s.matching(&selectors).collect();
            if entries.is_empty() {
                return Err(no_identity(s));
            }
            let bundles: HashMap<String, Vec<u8>> = bundles_for(s, &own, &entries)
                .iter()
                .map(|(td, b)| (td_key(td), b.to_jwks_json().into_bytes()))
                .collect();
            Ok((!bundles.is_empty()).then_some(pb::JwtBundlesResponse { bundles }))
        };
        self.open_stream(permit, peer(&req)?, compute)
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let selectors = caller_selectors(&self.attestor, &self.cache, &req)?;
        let uid = peer(&req)?.cred().ok_or_else(unidentified)?.uid;
        let r = req.into_inner();
        let wanted = check_jwt_request(&r)?;
        let snapshot = self.cache.current();
        let entries: Vec<Entry> = snapshot
            .matching(&selectors)
            .filter(|e| wanted.as_ref().is_none_or(|w| w == &e.spiffe_id))
            .cloned()
            .collect();
        if entries.is_empty() {
            return Err(no_identity(&snapshot));
        }
        let mut svids = Vec::with_capacity(entries.len());
        for e in &entries {
            svids.push(pb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: self.jwt_for(uid, e, &r.audience).await?,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let snapshot = self.cache.current();
        validate_jwt(&req.into_inner(), &snapshot.bundles, self.wall.now()).map(Response::new)
    }
}

/// The SPIFFE ID a FetchJWTSVID request asks for, if any, once its
/// audiences are within bounds.
#[allow(clippy::result_large_err)]
pub(crate) fn check_jwt_request(r: &pb::JwtsvidRequest) -> Result<Option<SpiffeId>, Status> {
    oxid_pki::jwt::check_audiences(&r.audience)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if r.spiffe_id.is_empty() {
        return Ok(None);
    }
    r.spiffe_id
        .parse()
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))
}

/// Answers a ValidateJWTSVID request against `bundles`.
#[allow(clippy::result_large_err)]
pub(crate) fn validate_jwt(
    r: &pb::ValidateJwtsvidRequest,
    bundles: &(impl BundleSource + ?Sized),
    now: SystemTime,
) -> Result<pb::ValidateJwtsvidResponse, Status> {
    if r.audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if r.svid.is_empty() {
        return Err(Status::invalid_argument("svid must be specified"));
    }
    let verified = oxid_pki::jwt::verify_jwt_svid(&r.svid, bundles, &r.audience, now)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(pb::ValidateJwtsvidResponse {
        spiffe_id: verified.spiffe_id.to_string(),
        claims: Some(to_struct(verified.claims)),
    })
}

impl WorkloadApi {
    /// A JWT-SVID for `entry` and `audiences`, asked for by `uid`: cached
    /// until half its life; a new one is minted within `uid`'s budget (see
    /// [`budget`]) and not while the server is refusing this agent's calls.
    async fn jwt_for(
        &self,
        uid: u32,
        entry: &Entry,
        audiences: &[String],
    ) -> Result<String, Status> {
        let key = (entry.id.clone(), audiences.to_vec());
        let now = Instant::now();
        if let Some(token) = self
            .jwts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key, now)
        {
            return Ok(token);
        }
        if self.server.busy() {
            self.budget
                .refused
                .server
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(server_busy());
        }
        self.budget.take(uid)?;
        let minted = self
            .server
            .api()
            .mint_jwt_svid(agent_pb::MintJwtSvidRequest {
                entry_id: entry.id.clone(),
                audience: audiences.to_vec(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::InvalidArgument => s,
                tonic::Code::PermissionDenied => Status::permission_denied(NO_IDENTITY),
                tonic::Code::ResourceExhausted => {
                    self.server.note_refusal(&s);
                    server_busy()
                }
                _ => Status::unavailable(format!("cannot reach the server: {}", s.message())),
            })?
            .into_inner();
        let life =
            clock::Issued::from_wire(minted.valid_for_ms, minted.expires_at).life(&self.wall);
        let refresh_at = clock::after(now, life / 2);
        self.jwts.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key,
            minted.token.clone(),
            refresh_at,
            now,
            uid,
        );
        Ok(minted.token)
    }
}

/// The status while the server refuses this agent's calls as over its rate.
fn server_busy() -> Status {
    Status::resource_exhausted(
        "the server is refusing this agent's calls as over its agent_requests_per_second; \
         new JWT-SVIDs wait while the agent's own calls go first; retry in a few seconds",
    )
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
