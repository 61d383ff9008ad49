//! The client of the server's agent API: a TLS 1.3 channel that accepts
//! only `spiffe://<td>/oxid/server` (verified against the live bundle), and
//! the calls that node attestation and renewal of the agent SVID make. What
//! the agent does with its identity is `identity`'s.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use oxid_pki::x509::Csr;
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId};
use oxid_proto::agent as pb;
use oxid_proto::agent::agent_api_client::AgentApiClient;
use oxid_tls::{SharedBundle, SpiffeServerVerifier, SvidResolver};
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::AgentError;
use crate::clock::WallClock;
use crate::identity::{Attestation, Identity};
use crate::servers::{Connected, ServerAddresses, Servers, Start};

/// A connection to the server.
pub struct ServerClient {
    servers: Arc<Servers>,
    server_id: SpiffeId,
    bundle: Arc<SharedBundle>,
    certs: Arc<SvidResolver>,
    channel: RwLock<Channel>,
    /// For lifetimes from a server that does not count them itself.
    wall: WallClock,
    /// Until when workload-driven calls step aside because the server
    /// refused one of this agent's calls as over its rate.
    busy_until: Mutex<Option<tokio::time::Instant>>,
    /// The key of a renewal still without an answer: the next try uses it
    /// again, since the server lets the previous SVID renew again only for
    /// the pending SVID's key (a lost answer stays recoverable, a copied
    /// old SVID cannot renew).
    renewal_key: Mutex<Option<KeyPair>>,
    /// Woken when the server refuses a call for who the agent is (its sync
    /// stream refused), so the identity is checked now, not at renewal.
    identity_refused: tokio::sync::Notify,
    /// Bumped whenever the agent presents a new identity (attested or
    /// renewed): a sync stream opened with the old one reconnects at once,
    /// so the server sees the new SVID used and the old one retired,
    /// instead of cutting the old stream at its expiry.
    identity_generation: tokio::sync::watch::Sender<u64>,
    /// The keepalive ping interval.
    keepalive: Duration,
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field("servers", &self.servers.addresses().to_string())
            .finish_non_exhaustive()
    }
}

impl ServerClient {
    /// A client for `servers` (one connection, to one of them at a time)
    /// that trusts `bundle` (shared with sync, so CA rotation is followed)
    /// and presents `certs` once set.
    pub fn new(
        servers: ServerAddresses,
        server_id: SpiffeId,
        bundle: Arc<SharedBundle>,
        certs: Arc<SvidResolver>,
    ) -> Result<Self, AgentError> {
        let servers = Arc::new(Servers::new(servers));
        let channel = make_channel(
            &servers,
            Start::Same,
            DEFAULT_KEEPALIVE,
            &server_id,
            &bundle,
            &certs,
        )?;
        Ok(Self {
            servers,
            server_id,
            bundle,
            certs,
            channel: RwLock::new(channel),
            wall: WallClock::default(),
            busy_until: Mutex::new(None),
            renewal_key: Mutex::new(None),
            identity_refused: tokio::sync::Notify::new(),
            identity_generation: tokio::sync::watch::Sender::new(0),
            keepalive: DEFAULT_KEEPALIVE,
        })
    }

    /// This client, reading wall-clock time from `wall`.
    #[must_use]
    pub fn with_clock(mut self, wall: WallClock) -> Self {
        self.wall = wall;
        self
    }

    /// This client, pinging the server after `interval` without a frame
    /// from it (see [`DEFAULT_KEEPALIVE`]).
    pub fn with_keepalive(mut self, interval: Duration) -> Result<Self, AgentError> {
        self.keepalive = interval;
        self.replace_channel(Start::Same)?;
        Ok(self)
    }

    /// An API client on the current channel.
    pub fn api(&self) -> AgentApiClient<Channel> {
        AgentApiClient::new(
            self.channel
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// Notes a refusal `status` from the server: if it says the agent is
    /// over its rate (`agent_requests_per_second`), workload-driven calls
    /// step aside for [`BUSY_PUSHBACK`] so the agent's own calls, which
    /// retry, get the server's next tokens.
    pub fn note_refusal(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::ResourceExhausted {
            let until = tokio::time::Instant::now() + BUSY_PUSHBACK;
            *self.busy_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        }
    }

    /// Notes that the server refused the agent's sync stream with `status`:
    /// a `PermissionDenied` there is about the agent itself (evicted,
    /// banned, serial retired), which the identity task then checks.
    pub fn note_sync_refusal(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::PermissionDenied {
            self.identity_refused.notify_one();
        }
    }

    /// Completes when [`Self::note_sync_refusal`] saw a refusal.
    pub(crate) async fn identity_refused(&self) {
        self.identity_refused.notified().await;
    }

    /// Whether workload-driven calls are to step aside now (see
    /// [`Self::note_refusal`]).
    pub fn busy(&self) -> bool {
        self.busy_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| tokio::time::Instant::now() < t)
    }

    /// Replaces the channel so new calls present the current SVID (an
    /// HTTP/2 connection keeps the certificate it was opened with), on the
    /// same server.
    pub fn reconnect(&self) -> Result<(), AgentError> {
        self.replace_channel(Start::Same)
    }

    /// Replaces the channel with one that tries the next server first:
    /// the current one refused to serve (behind the agent's revision,
    /// stopping, its database unreachable) or ended the connection at its
    /// maximum age, so agents spread over the servers again.
    pub fn move_on(&self) -> Result<(), AgentError> {
        self.replace_channel(Start::Next)
    }

    fn replace_channel(&self, start: Start) -> Result<(), AgentError> {
        let channel = make_channel(
            &self.servers,
            start,
            self.keepalive,
            &self.server_id,
            &self.bundle,
            &self.certs,
        )?;
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = channel;
        Ok(())
    }

    /// The server the connection is on (or was on last).
    pub fn connected(&self) -> Option<Connected> {
        self.servers.connected()
    }

    /// Presents `identity` from now on.
    pub fn use_identity(&self, identity: &Identity) -> Result<(), AgentError> {
        self.certs
            .set(identity.chain.clone(), &identity.key)
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        self.reconnect()?;
        self.identity_generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Changes when the agent presents a new identity (see
    /// [`Self::use_identity`]).
    pub(crate) fn identity_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.identity_generation.subscribe()
    }

    /// Node attestation; returns the agent's new identity and the bundle.
    pub async fn attest(&self, how: &Attestation) -> Result<(Identity, String), AgentError> {
        // A new identity renews with keys of its own.
        *self.renewal_key.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256)
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let csr = Csr::create(&key).map_err(|e| AgentError::Internal(e.to_string()))?;
        let (data, node_key) = match how {
            Attestation::JoinToken(token) => (
                pb::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                },
                None,
            ),
            Attestation::X509Pop { cert, key } => {
                let pem = std::fs::read(cert)
                    .map_err(|e| AgentError::Config(format!("{}: {e}", cert.display())))?;
                let chain = oxid_pki::x509::certs_from_pem(&pem)
                    .map_err(|e| AgentError::Config(format!("{}: {e}", cert.display())))?;
                let node_key = KeyPair::load(key).map_err(|e| AgentError::Config(e.to_string()))?;
                (
                    pb::AttestationData {
                        r#type: oxid_pki::x509pop::ATTESTATION_TYPE.into(),
                        payload: oxid_pki::x509pop::payload(&chain),
                    },
                    Some(node_key),
                )
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let first = pb::AttestRequest {
            data: Some(data),
            csr,
            challenge_response: vec![],
        };
        tx.send(first)
            .await
            .map_err(|_| AgentError::Internal("attest channel".into()))?;
        // The request stream is closed as soon as nothing more will be sent
        // on it (join_token: now; x509pop: after the answer). Left open, the
        // server ends the call with RST_STREAM, which can overtake the
        // result: the agent then saw an error for a join token the server
        // had already consumed (found by `oxid-bench scale`).
        let mut tx = node_key.is_some().then_some(tx);
        let mut responses = self
            .api()
            .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(AgentError::from_status)?
            .into_inner();
        loop {
            let msg = responses
                .message()
                .await
                .map_err(AgentError::from_status)?
                .ok_or_else(|| AgentError::Server("attestation ended without a result".into()))?;
            if let Some(result) = msg.result {
                let chain: Vec<CertificateDer<'static>> = result
                    .svid_chain
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect();
                let identity =
                    Identity::from_chain(key, chain, None, result.valid_for_ms, &self.wall)?;
                return Ok((identity, result.bundle));
            }
            let node_key = node_key
                .as_ref()
                .ok_or_else(|| AgentError::Server("unexpected attestation challenge".into()))?;
            let signature = oxid_pki::x509pop::respond(node_key, &msg.challenge)
                .map_err(|e| AgentError::Server(e.to_string()))?;
            tx.take()
                .ok_or_else(|| AgentError::Server("a second attestation challenge".into()))?
                .send(pb::AttestRequest {
                    data: None,
                    csr: vec![],
                    challenge_response: signature,
                })
                .await
                .map_err(|_| AgentError::Server("the server closed the attestation".into()))?;
        }
    }

    /// Renews the agent SVID with a new key. A server that says the agent
    /// is over its rate is asked again with backoff (the refusal comes
    /// before the server changes anything, so the same CSR is safe to
    /// resend), and meanwhile workload-driven calls step aside.
    pub async fn renew(&self, current: &Identity) -> Result<Identity, AgentError> {
        let key = self.renewal_key()?;
        let csr = Csr::create(&key).map_err(|e| AgentError::Internal(e.to_string()))?;
        let mut backoff = BUSY_BACKOFF_MIN;
        let mut tries = 1;
        let resp = loop {
            match self
                .api()
                .renew(pb::RenewRequest { csr: csr.clone() })
                .await
            {
                Ok(resp) => break resp.into_inner(),
                Err(s) => {
                    self.note_refusal(&s);
                    if s.code() != tonic::Code::ResourceExhausted || tries >= BUSY_TRIES {
                        return Err(AgentError::from_status(s));
                    }
                    tracing::info!(error = %s.message(), "the server is busy; renewing again shortly");
                    tokio::time::sleep(crate::sync::jittered(backoff)).await;
                    backoff = (backoff * 2).min(BUSY_BACKOFF_MAX);
                    tries += 1;
                }
            }
        };
        let chain = resp
            .svid_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let renewed = Identity::from_chain(
            key,
            chain,
            Some(&current.spiffe_id),
            resp.valid_for_ms,
            &self.wall,
        )?;
        *self.renewal_key.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(renewed)
    }

    /// The key for this renewal: that of a renewal without an answer, else
    /// a new one, kept until a renewal answers.
    fn renewal_key(&self) -> Result<KeyPair, AgentError> {
        let internal = |e: oxid_pki::KeyError| AgentError::Internal(e.to_string());
        let mut kept = self.renewal_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = kept.as_ref() {
            return KeyPair::from_pkcs8_der(key.pkcs8_der()).map_err(internal);
        }
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).map_err(internal)?;
        let copy = KeyPair::from_pkcs8_der(key.pkcs8_der()).map_err(internal)?;
        *kept = Some(key);
        Ok(copy)
    }
}

/// How long workload-driven calls step aside after the server said the
/// agent is over its rate: longer than the agent's own first retries.
pub const BUSY_PUSHBACK: Duration = Duration::from_secs(2);
/// The agent's own calls refused as over the server's rate are retried
/// after this, doubling up to [`BUSY_BACKOFF_MAX`] (each ±50 %)...
const BUSY_BACKOFF_MIN: Duration = Duration::from_millis(250);
const BUSY_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// ...for this many tries in all (about 12 s), before the caller's own
/// retry takes over.
const BUSY_TRIES: u32 = 7;

/// Keepalive: a ping after this long without a frame from the server,
/// dropped when unanswered for half as long again, so a server that died
/// without a reset (host gone, network cut) is left for another within
/// about 5 s. A live server's HTTP/2 layer answers pings itself, however
/// busy. (`server_keepalive_secs` in agent.toml.)
pub const DEFAULT_KEEPALIVE: Duration =
    Duration::from_secs(crate::config::DEFAULT_SERVER_KEEPALIVE_SECS);

/// A lazy channel to one of `servers`: its first connection tries them
/// from `start`, every later one (the connection failed) from the server
/// after the one it was on.
fn make_channel(
    servers: &Arc<Servers>,
    start: Start,
    keepalive: Duration,
    server_id: &SpiffeId,
    bundle: &Arc<SharedBundle>,
    certs: &Arc<SvidResolver>,
) -> Result<Channel, AgentError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(server_id.clone(), bundle.clone()));
    let tls = Arc::new(
        oxid_tls::client_config(verifier, Some(certs.clone()))
            .map_err(|e| AgentError::Internal(e.to_string()))?,
    );
    let servers = servers.clone();
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let endpoint = Endpoint::try_from("http://oxid-server.invalid")
        .map_err(|e| AgentError::Internal(e.to_string()))?
        // A connection that dies silently (server host gone, NAT state
        // dropped, a cut cable) must not leave Sync waiting: ping after
        // `keepalive`, drop the connection after half as long again without
        // an answer, even with only the Sync stream open.
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive.mul_f64(1.5))
        .keep_alive_while_idle(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let (tls, servers) = (tls.clone(), servers.clone());
            let start = match first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                true => start,
                false => Start::Next,
            };
            async move {
                let stream = servers
                    .connect(start, |tcp| {
                        let tls = tls.clone();
                        async move {
                            let name = ServerName::try_from("oxid-server")
                                .map_err(std::io::Error::other)?;
                            tokio_rustls::TlsConnector::from(tls)
                                .connect(name, tcp)
                                .await
                        }
                    })
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })),
    )
}
