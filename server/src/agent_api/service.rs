//! Agent API handlers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use oxid_pki::SpiffeId;
use oxid_pki::x509::{Csr, SvidParams};
use oxid_proto::agent as pb;
use oxid_proto::limit::{Limit, LimitExceeded};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::attest::{self, Attested};
pub(crate) use super::error::AgentApiError;
use super::rate::RateLimiter;
use super::{AgentApiConfig, sync};
use crate::ca::CaManager;
use crate::clock::{Clock, unix_secs};
use crate::datastore::{Agent, DataStore, DataStoreError, EntryId};
use crate::index::IndexHandle;

/// Longest time an attestation may take, challenge rounds included.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Inner {
    pub(crate) ca: Arc<CaManager>,
    pub(crate) store: Arc<dyn DataStore>,
    pub(crate) index: Arc<IndexHandle>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: AgentApiConfig,
    pub(crate) trust_domain: oxid_pki::TrustDomain,
    /// Calls per agent (after authentication).
    pub(crate) requests: RateLimiter,
    /// Attestations per attested ID.
    pub(crate) attestations: RateLimiter,
    /// What sync streams read.
    pub(crate) sync: Arc<sync::SyncDeps>,
}

/// The agent API service.
#[derive(Clone)]
pub struct AgentApiService(pub(crate) Arc<Inner>);

impl AgentApiService {
    pub(crate) fn new(
        ca: Arc<CaManager>,
        store: Arc<dyn DataStore>,
        index: Arc<IndexHandle>,
        clock: Arc<dyn Clock>,
        config: AgentApiConfig,
        server_id: SpiffeId,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, String> {
        let requests = RateLimiter::new(
            config.requests_per_second,
            Duration::from_secs(1),
            config.requests_per_second.saturating_mul(2),
        );
        let attestations = RateLimiter::new(
            config.attestations_per_minute,
            Duration::from_secs(60),
            config.attestations_per_minute,
        );
        let sync = Arc::new(sync::SyncDeps {
            index: index.clone(),
            store: store.clone(),
            ca: ca.subscribe(),
            clock: clock.clone(),
            trust_domain: server_id.trust_domain().clone(),
            default_x509_ttl: config.default_x509_ttl,
            default_jwt_ttl: config.default_jwt_ttl,
            stopping,
        });
        Ok(Self(Arc::new(Inner {
            sync,
            requests,
            attestations,
            trust_domain: server_id.trust_domain().clone(),
            ca,
            store,
            index,
            clock,
            config,
        })))
    }
}

impl Inner {
    pub(crate) fn now_secs(&self) -> u64 {
        unix_secs(self.clock.now())
    }

    /// Milliseconds from now until `expires_at` (Unix seconds): what the
    /// agent counts down on its monotonic clock.
    pub(crate) fn valid_for_ms(&self, expires_at: u64) -> u64 {
        let now_ms = self
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        expires_at.saturating_mul(1000).saturating_sub(now_ms)
    }

    /// `ttl` cut so that an SVID issued now for `entry` ends no later than
    /// the entry: its `expires_at` bounds what it grants.
    fn bounded_by(
        &self,
        entry: &crate::datastore::Entry,
        ttl: Duration,
    ) -> Result<Duration, AgentApiError> {
        let Some(expires_at) = entry.expires_at else {
            return Ok(ttl);
        };
        let end = std::time::UNIX_EPOCH + Duration::from_secs(expires_at);
        let left = end.duration_since(self.clock.now()).unwrap_or_default();
        if left.is_zero() {
            return Err(AgentApiError::PermissionDenied(format!(
                "entry {} has expired",
                entry.id
            )));
        }
        Ok(ttl.min(left))
    }

    pub(crate) async fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr: &Csr,
    ) -> Result<(Vec<Vec<u8>>, String, u64), AgentApiError> {
        let svid = self.ca.sign_x509_svid(&SvidParams {
            spiffe_id: agent_id,
            public_key: csr.public_key(),
            ttl: self.config.agent_svid_ttl,
            dns_names: &[],
        })?;
        let (_, serial) = oxid_pki::x509::leaf_identity(svid.leaf())
            .map_err(|e| AgentApiError::Internal(e.to_string()))?;
        let chain = svid.cert_chain().iter().map(|c| c.to_vec()).collect();
        Ok((chain, serial, unix_secs(svid.not_after())))
    }

    async fn attest(
        &self,
        inbound: &mut Streaming<pb::AttestRequest>,
        outbound: &tokio::sync::mpsc::Sender<Result<pb::AttestResponse, Status>>,
    ) -> Result<pb::AttestResult, AgentApiError> {
        let first = next(inbound).await?;
        // The CSR is checked before attestation, which may consume a
        // single-use join token: a bad CSR must not burn the token.
        let csr = parse_csr(&first.csr)?;
        let data = first
            .data
            .ok_or_else(|| AgentApiError::InvalidArgument("attestation data is required".into()))?;
        let attested: Attested = match data.r#type.as_str() {
            "join_token" => {
                attest::join_token(
                    self.store.as_ref(),
                    &self.trust_domain,
                    &data.payload,
                    self.now_secs(),
                )
                .await?
            }
            "x509pop" => {
                let roots = self.config.x509pop_roots.as_deref().ok_or_else(|| {
                    AgentApiError::PermissionDenied(
                        "x509pop is not enabled on this server (no node CA configured)".into(),
                    )
                })?;
                let challenge = attest::x509pop_begin(
                    roots,
                    &self.trust_domain,
                    &data.payload,
                    self.clock.now(),
                )?;
                let ask = pb::AttestResponse {
                    challenge: challenge.nonce().to_vec(),
                    result: None,
                };
                outbound
                    .send(Ok(ask))
                    .await
                    .map_err(|_| AgentApiError::InvalidArgument("agent went away".into()))?;
                let answer = next(inbound).await?;
                attest::x509pop_finish(challenge, &answer.challenge_response)?
            }
            other => {
                return Err(AgentApiError::InvalidArgument(format!(
                    "unknown attestation type {other:?}: expected join_token or x509pop"
                )));
            }
        };
        if !self.attestations.allow(attested.spiffe_id.as_str()) {
            return Err(AgentApiError::ResourceExhausted(format!(
                "{} attested more than {} times in a minute (attestations_per_minute); \
                 retry later",
                attested.spiffe_id, self.config.attestations_per_minute
            )));
        }
        let existing = match self.store.get_agent(&attested.spiffe_id).await {
            Ok(a) => Some(a),
            Err(DataStoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        refuse_banned(existing.as_ref())?;
        let (chain, serial, expires_at) = self.sign_agent_svid(&attested.spiffe_id, &csr).await?;
        let now_ms = self.now_secs() * 1000;
        self.record_attestation(existing, |existing| {
            refuse_banned(existing)?;
            Ok(Agent {
                spiffe_id: attested.spiffe_id.clone(),
                attestation_type: attested.attestation_type.into(),
                selectors: attested.selectors.clone(),
                aliases: attested.aliases.clone(),
                serial: serial.clone(),
                previous_serial: None,
                pending_key: None,
                expires_at,
                banned: false,
                created_at: existing.map_or(now_ms, |a| a.created_at),
            })
        })
        .await?;
        tracing::info!(agent = %attested.spiffe_id, kind = attested.attestation_type, "agent attested");
        Ok(pb::AttestResult {
            spiffe_id: attested.spiffe_id.to_string(),
            svid_chain: chain,
            bundle: self.ca.snapshot().spiffe_json().to_string(),
            valid_for_ms: self.valid_for_ms(expires_at),
        })
    }
}

/// Refuses to attest a banned agent again.
fn refuse_banned(existing: Option<&Agent>) -> Result<(), AgentApiError> {
    match existing {
        Some(a) if a.banned => Err(AgentApiError::PermissionDenied(format!(
            "agent {} is banned; evict it to allow it to attest again",
            a.spiffe_id
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn parse_csr(der: &[u8]) -> Result<Csr, AgentApiError> {
    Csr::parse(der).map_err(|e| AgentApiError::InvalidArgument(format!("csr: {e}")))
}

async fn next(
    inbound: &mut Streaming<pb::AttestRequest>,
) -> Result<pb::AttestRequest, AgentApiError> {
    match inbound.message().await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(AgentApiError::InvalidArgument(
            "the agent closed the attestation stream".into(),
        )),
        Err(s) => Err(AgentApiError::InvalidArgument(s.message().to_owned())),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_api_server::AgentApi for AgentApiService {
    type AttestStream = BoxStream<pb::AttestResponse>;
    type SyncStream = BoxStream<pb::SyncResponse>;

    async fn attest(
        &self,
        req: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let inner = self.0.clone();
        tokio::spawn(async move {
            let outcome =
                match tokio::time::timeout(ATTEST_TIMEOUT, inner.attest(&mut inbound, &tx)).await {
                    Ok(r) => r,
                    Err(_) => Err(AgentApiError::PermissionDenied(
                        "attestation timed out".into(),
                    )),
                };
            let message = match outcome {
                Ok(result) => Ok(pb::AttestResponse {
                    challenge: vec![],
                    result: Some(result),
                }),
                Err(e) => {
                    tracing::info!(error = %e, "attestation refused");
                    Err(Status::from(e))
                }
            };
            let _ = tx.send(message).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        Ok(Response::new(self.0.renew(&req).await?))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let inner = &self.0;
        let (agent, _) = inner.authenticate(&req).await?;
        let requests = req.into_inner().requests;
        if requests.len() > inner.config.max_batch {
            return Err(AgentApiError::LimitExceeded(
                LimitExceeded {
                    limit: Limit::MaxCsrsPerCall,
                    max: inner.config.max_batch as u64,
                },
                format!(
                    "{} CSRs in one call; at most {} (max_csrs_per_call)",
                    requests.len(),
                    inner.config.max_batch
                ),
            )
            .into());
        }
        let now = inner.now_secs();
        let mut svids = Vec::with_capacity(requests.len());
        for r in requests {
            let outcome = sign_one(inner, &agent, &r, now);
            svids.push(match outcome {
                Ok((cert_chain, expires_at)) => pb::SignedSvid {
                    entry_id: r.entry_id,
                    cert_chain,
                    expires_at,
                    error: String::new(),
                    valid_for_ms: inner.valid_for_ms(expires_at),
                },
                Err(e) => pb::SignedSvid {
                    entry_id: r.entry_id,
                    cert_chain: vec![],
                    expires_at: 0,
                    error: e.to_string(),
                    valid_for_ms: 0,
                },
            });
        }
        Ok(Response::new(pb::SignX509SvidsResponse { svids }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let inner = &self.0;
        let (agent, _) = inner.authenticate(&req).await?;
        let r = req.into_inner();
        let entry = authorized_entry(inner, &agent, &r.entry_id, inner.now_secs())?;
        oxid_pki::jwt::check_audiences(&r.audience)
            .map_err(|e| AgentApiError::InvalidArgument(e.to_string()))?;
        let ttl = inner.bounded_by(
            &entry,
            entry
                .jwt_svid_ttl
                .map_or(inner.config.default_jwt_ttl, Duration::from_secs),
        )?;
        let svid = inner
            .ca
            .mint_jwt_svid(&entry.spiffe_id, &r.audience, ttl)
            .map_err(AgentApiError::from)?;
        let expires_at = unix_secs(svid.expiry);
        Ok(Response::new(pb::MintJwtSvidResponse {
            expires_at,
            token: svid.token,
            valid_for_ms: inner.valid_for_ms(expires_at),
        }))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (agent, caller) = self.0.authenticate(&req).await?;
        let aged_at = req.extensions().get::<super::PeerInfo>().map(|p| p.aged_at);
        let r = req.into_inner();
        let rx = sync::start(self.0.sync.clone(), agent, caller, r, aged_at);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The entry `entry_id` if it is authorised for `agent`; PermissionDenied
/// otherwise (unknown entries too, so probing reveals nothing).
fn authorized_entry(
    inner: &Inner,
    agent: &Agent,
    entry_id: &str,
    now: u64,
) -> Result<crate::datastore::Entry, AgentApiError> {
    let denied = || {
        AgentApiError::PermissionDenied(format!(
            "entry {entry_id:?} is not authorised for agent {}",
            agent.spiffe_id
        ))
    };
    let id: EntryId = entry_id.parse().map_err(|_| denied())?;
    let index = inner.index.read();
    if !index.is_authorized(agent, &id, now) {
        return Err(denied());
    }
    index.entry(&id).cloned().ok_or_else(denied)
}

fn sign_one(
    inner: &Inner,
    agent: &Agent,
    r: &pb::SvidRequest,
    now: u64,
) -> Result<(Vec<Vec<u8>>, u64), AgentApiError> {
    let entry = authorized_entry(inner, agent, &r.entry_id, now)?;
    let csr =
        Csr::parse(&r.csr).map_err(|e| AgentApiError::InvalidArgument(format!("csr: {e}")))?;
    let ttl = inner.bounded_by(
        &entry,
        entry
            .x509_svid_ttl
            .map_or(inner.config.default_x509_ttl, Duration::from_secs),
    )?;
    let svid = inner.ca.sign_x509_svid(&SvidParams {
        spiffe_id: &entry.spiffe_id,
        public_key: csr.public_key(),
        ttl,
        dns_names: &entry.dns_names,
    })?;
    Ok((
        svid.cert_chain().iter().map(|c| c.to_vec()).collect(),
        unix_secs(svid.not_after()),
    ))
}
