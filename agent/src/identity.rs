//! The agent's own identity, its whole life in one place: restore it from
//! the data directory (checked: key matches certificate, chain verifies
//! against the bundle, not expired), attest when there is none or the
//! server no longer knows it, renew it at half-life, persist it as one
//! file, and publish it to the channel to the server.
//!
//! An agent whose identity the server refused (evicted, banned) keeps
//! serving its workloads' unexpired SVIDs, reports not ready, and says how
//! to recover; at start, without credentials to attest with, it exits with
//! that advice instead (see ARCHITECTURE.md, "Agent").

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{ExtendedKeyUsage, leaf_identity, verify_x509_svid};
use oxid_pki::{KeyPair, SpiffeId, TrustDomain};
use oxid_tls::{LiveBundle as _, SharedBundle};
use rustls_pki_types::CertificateDer;

use crate::AgentError;
use crate::clock::{self, WallClock};
use crate::server_client::ServerClient;

/// The identity file: the key (PKCS#8 PEM) followed by the SVID chain, so
/// key and certificate are replaced together or not at all.
const IDENTITY_FILE: &str = "agent-identity.pem";
/// The layout before the one file: read once, then replaced by it.
const LEGACY_KEY_FILE: &str = "agent.key";
const LEGACY_SVID_FILE: &str = "agent-svid.pem";
/// Where the key's PEM block ends in the identity file.
const KEY_END: &str = "-----END PRIVATE KEY-----";

/// How long the check of a restored identity at start may take before the
/// agent goes on with it (a server that does not answer is retried later).
const START_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How often an agent whose identity the server refused asks again (the
/// refusal may be lifted, e.g. a ban mistaken and the record restored).
const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// After a check the server answered, sync refusals are not acted on again
/// for this long: a refusal that is not about the identity must not make
/// the agent renew at every sync retry.
const REFUSAL_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// The agent's own identity.
#[derive(Debug)]
pub struct Identity {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its key (generated here).
    pub key: KeyPair,
    /// Its SVID chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// When to renew it (half its life), on the monotonic clock: see
    /// [`crate::clock`].
    pub renew_at: tokio::time::Instant,
    /// When the SVID expires, by its certificate (wall-clock time: what is
    /// checked against a restart's clock).
    pub not_after: SystemTime,
}

impl Identity {
    /// Builds an identity from a signed chain, checking it names `expected`
    /// (or any agent ID if `None`). `valid_for_ms` is the server's count of
    /// its remaining life (0 if unknown: the `wall` clock is used then).
    pub fn from_chain(
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
        expected: Option<&SpiffeId>,
        valid_for_ms: u64,
        wall: &WallClock,
    ) -> Result<Self, AgentError> {
        let asked = tokio::time::Instant::now();
        let leaf = chain
            .first()
            .ok_or_else(|| AgentError::Server("empty agent SVID".into()))?;
        let (spiffe_id, _) = leaf_identity(leaf).map_err(|e| AgentError::Server(e.to_string()))?;
        if expected.is_some_and(|e| e != &spiffe_id) {
            return Err(AgentError::Server(format!(
                "server issued an SVID for {spiffe_id}"
            )));
        }
        let not_after = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| {
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(c.validity().not_after.timestamp().max(0).unsigned_abs())
            })
            .map_err(|e| AgentError::Server(e.to_string()))?;
        let life = clock::Issued::new(valid_for_ms, not_after).life(wall);
        Ok(Self {
            spiffe_id,
            key,
            chain,
            renew_at: clock::after(asked, life / 2),
            not_after,
        })
    }
}

/// How the node proves itself.
#[derive(Debug, Clone)]
pub enum Attestation {
    /// A single-use join token.
    JoinToken(String),
    /// A node certificate chain (PEM file) and its key (PKCS#8 file).
    X509Pop {
        /// Node certificate chain, PEM.
        cert: PathBuf,
        /// Node key, PKCS#8, mode 0600.
        key: PathBuf,
    },
}

/// Whether the server accepts the agent's identity, as last heard: read by
/// `/ready` and the gRPC health of the Workload API socket.
#[derive(Debug)]
pub struct Status {
    accepted: AtomicBool,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            accepted: AtomicBool::new(true),
        }
    }
}

impl Status {
    /// False once the server refused the identity, until it accepts one.
    pub fn accepted(&self) -> bool {
        self.accepted.load(Relaxed)
    }

    fn set(&self, accepted: bool) {
        self.accepted.store(accepted, Relaxed);
    }
}

/// What the agent's identity needs: where it lives and how to attest.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The data directory.
    pub dir: PathBuf,
    /// The agent's trust domain.
    pub trust_domain: TrustDomain,
    /// Credentials to attest with, if given.
    pub attestation: Option<Attestation>,
    /// The wall clock (tests shift it).
    pub clock: WallClock,
}

/// Why a saved identity cannot be used.
enum Restored {
    /// Nothing saved.
    None,
    /// Checked and usable.
    Valid(Box<Identity>),
    /// Saved, but expired, mismatched or untrusted: the reason, with the
    /// agent's ID when it could be read.
    Invalid(String),
}

/// Restores, checks with the server, or attests: the identity the agent
/// starts with, published on `server`. Without credentials, a saved
/// identity that is unusable or that the server refuses is an error that
/// names the fix.
pub async fn establish(
    server: &ServerClient,
    settings: &Settings,
    tls_bundle: &SharedBundle,
) -> Result<Identity, AgentError> {
    let identity = match restore(&settings.dir, &tls_bundle.current_bundle(), &settings.clock)? {
        Restored::Valid(saved) => {
            tracing::info!(agent = %saved.spiffe_id, "restored the agent identity");
            server.use_identity(&saved)?;
            match confirm(server, &saved).await {
                Confirmed::Renewed(next) => {
                    persist(&settings.dir, &next)?;
                    *next
                }
                Confirmed::Unknown => *saved,
                Confirmed::Refused(message) => {
                    let Some(how) = settings.attestation.as_ref() else {
                        return Err(AgentError::Refused(format!(
                            "{message}; {}",
                            fix(&saved.spiffe_id)
                        )));
                    };
                    tracing::warn!(
                        agent = %saved.spiffe_id, error = %message,
                        "the server refused the saved agent identity; attesting with the \
                         credentials given"
                    );
                    attest(server, how, settings, tls_bundle).await?
                }
            }
        }
        Restored::Invalid(reason) => {
            let Some(how) = settings.attestation.as_ref() else {
                return Err(AgentError::Config(format!(
                    "{reason}: this agent needs a new join token (`oxid-server token \
                     generate`, then --join-token-file or --join-token), or x509pop \
                     credentials (--node-cert and --node-key)"
                )));
            };
            tracing::warn!(reason = %reason, "the saved agent identity cannot be used; attesting again");
            attest(server, how, settings, tls_bundle).await?
        }
        Restored::None => {
            let how = settings.attestation.as_ref().ok_or_else(|| {
                AgentError::Config(
                    "no saved agent identity: give --join-token-file (or --join-token), or \
                     --node-cert and --node-key"
                        .into(),
                )
            })?;
            attest(server, how, settings, tls_bundle).await?
        }
    };
    server.use_identity(&identity)?;
    Ok(identity)
}

/// What to do about a refused identity, for the operator.
fn fix(id: &SpiffeId) -> String {
    format!(
        "the agent {id} must attest again: give it a new join token (`oxid-server token \
         generate`, then restart with --join-token-file or --join-token; its saved identity \
         is replaced), or x509pop credentials"
    )
}

/// The server's answer to a restored identity.
enum Confirmed {
    /// Accepted and renewed.
    Renewed(Box<Identity>),
    /// Not reached in time: go on with it, the renewal task asks again.
    Unknown,
    /// Refused (evicted, banned, unknown): the server's message.
    Refused(String),
}

/// Asks the server whether it still accepts `saved`, by renewing it, so an
/// evicted agent finds out before it serves rather than at half-life.
async fn confirm(server: &ServerClient, saved: &Identity) -> Confirmed {
    match tokio::time::timeout(START_CHECK_TIMEOUT, server.renew(saved)).await {
        Ok(Ok(next)) => match server.use_identity(&next) {
            Ok(()) => Confirmed::Renewed(Box::new(next)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot present the renewed agent SVID");
                Confirmed::Unknown
            }
        },
        Ok(Err(AgentError::Refused(message))) => Confirmed::Refused(message),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot check the saved agent identity with the server yet; serving with it");
            Confirmed::Unknown
        }
        Err(_) => {
            tracing::warn!(
                "the server did not answer the check of the saved agent identity; serving with it"
            );
            Confirmed::Unknown
        }
    }
}

/// Node attestation: the new identity is persisted and published, and the
/// bundle that came with it is trusted and saved.
async fn attest(
    server: &ServerClient,
    how: &Attestation,
    settings: &Settings,
    tls_bundle: &SharedBundle,
) -> Result<Identity, AgentError> {
    let (identity, bundle_json) = server.attest(how).await?;
    if let Ok(bundle) =
        Bundle::from_spiffe_json(settings.trust_domain.clone(), bundle_json.as_bytes())
    {
        tls_bundle.set(bundle.clone());
        crate::state::save_bundle(&settings.dir, &bundle)?;
    }
    persist(&settings.dir, &identity)?;
    server.use_identity(&identity)?;
    tracing::info!(agent = %identity.spiffe_id, "attested to the server");
    Ok(identity)
}

/// Keeps the identity: renews it at half-life, or at once when the server
/// refused the sync stream. If the server refuses it, an x509pop agent
/// attests again on its own; a join-token agent reports not ready and says
/// plainly that it needs a new token, and keeps serving what it holds.
pub async fn keep(
    server: Arc<ServerClient>,
    mut identity: Identity,
    settings: Settings,
    tls_bundle: Arc<SharedBundle>,
    status: Arc<Status>,
) {
    let mut last_check = tokio::time::Instant::now();
    loop {
        let wait = identity
            .renew_at
            .saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            () = tokio::time::sleep(crate::sync::jittered(wait.max(Duration::from_millis(200)))) => {}
            () = async {
                server.identity_refused().await;
                tokio::time::sleep_until(last_check + REFUSAL_CHECK_INTERVAL).await;
            } => {}
        }
        last_check = tokio::time::Instant::now();
        match server.renew(&identity).await {
            Ok(next) => {
                if let Err(e) =
                    persist(&settings.dir, &next).and_then(|()| server.use_identity(&next))
                {
                    tracing::error!(error = %e, "cannot store the renewed agent SVID");
                }
                if !status.accepted() {
                    tracing::info!(agent = %next.spiffe_id, "the server accepts the agent identity again");
                }
                status.set(true);
                identity = next;
            }
            Err(AgentError::Refused(message)) => {
                status.set(false);
                identity =
                    refused(&server, identity, &settings, &tls_bundle, &status, &message).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the agent SVID failed; retrying");
                tokio::time::sleep(crate::sync::jittered(Duration::from_secs(5))).await;
            }
        }
    }
}

/// After the server refused `identity`: the identity to go on with.
async fn refused(
    server: &ServerClient,
    identity: Identity,
    settings: &Settings,
    tls_bundle: &SharedBundle,
    status: &Status,
    message: &str,
) -> Identity {
    if let Some(x509 @ Attestation::X509Pop { .. }) = &settings.attestation {
        tracing::warn!(error = %message, "the server refused the agent SVID; attesting again");
        match attest(server, x509, settings, tls_bundle).await {
            Ok(next) => {
                status.set(true);
                return next;
            }
            Err(e) => tracing::error!(error = %e, "re-attestation failed"),
        }
    } else {
        // A join token is spent once: the one given at start cannot help.
        tracing::error!(
            error = %message,
            "the server refused the agent SVID; still serving the workloads' unexpired SVIDs, \
             not ready; {}",
            fix(&identity.spiffe_id)
        );
    }
    tokio::time::sleep(crate::sync::jittered(REFUSED_RETRY)).await;
    identity
}

/// Saves `identity` as one file, atomically, 0600.
pub fn persist(dir: &Path, identity: &Identity) -> Result<(), AgentError> {
    let mut text = identity.key.to_pkcs8_pem();
    text.push_str(&oxid_pki::x509::certs_to_pem(&identity.chain));
    crate::state::write_private(&dir.join(IDENTITY_FILE), text.as_bytes())
}

/// The saved identity as it is on disk, unchecked (for tools and tests;
/// the agent itself restores through [`establish`]).
pub fn load(dir: &Path) -> Option<Identity> {
    let bytes = oxid_pki::key::read_private(&dir.join(IDENTITY_FILE)).ok()?;
    let (key, chain) = split(&bytes).ok()?;
    Identity::from_chain(key, chain, None, 0, &WallClock::default()).ok()
}

/// Reads the saved identity (the one file, else the old two-file layout,
/// which is then rewritten as the one file) and checks it against `bundle`
/// by the `wall` clock.
fn restore(dir: &Path, bundle: &Bundle, wall: &WallClock) -> Result<Restored, AgentError> {
    let path = dir.join(IDENTITY_FILE);
    let (key, chain, migrated) = if path.exists() {
        let bytes =
            oxid_pki::key::read_private(&path).map_err(|e| AgentError::State(e.to_string()))?;
        match split(&bytes) {
            Ok((key, chain)) => (key, chain, false),
            Err(e) => return Ok(Restored::Invalid(format!("{}: {e}", path.display()))),
        }
    } else {
        let (key_path, svid_path) = (dir.join(LEGACY_KEY_FILE), dir.join(LEGACY_SVID_FILE));
        if !key_path.exists() && !svid_path.exists() {
            return Ok(Restored::None);
        }
        let key = KeyPair::load(&key_path);
        let chain = std::fs::read(&svid_path)
            .map_err(|e| e.to_string())
            .and_then(|pem| oxid_pki::x509::certs_from_pem(&pem).map_err(|e| e.to_string()));
        match (key, chain) {
            (Ok(key), Ok(chain)) => (key, chain, true),
            (Err(e), _) => return Ok(Restored::Invalid(format!("{}: {e}", key_path.display()))),
            (_, Err(e)) => return Ok(Restored::Invalid(format!("{}: {e}", svid_path.display()))),
        }
    };
    let restored = check(key, chain, bundle, wall);
    if migrated {
        if let Restored::Valid(identity) = &restored {
            persist(dir, identity)?;
            for old in [LEGACY_KEY_FILE, LEGACY_SVID_FILE] {
                let _ = std::fs::remove_file(dir.join(old));
            }
            tracing::info!(file = %path.display(), "moved the agent identity into one file");
        }
    }
    Ok(restored)
}

/// The key and chain of an identity file.
fn split(bytes: &[u8]) -> Result<(KeyPair, Vec<CertificateDer<'static>>), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not PEM text".to_owned())?;
    let end = text
        .find(KEY_END)
        .map(|i| i + KEY_END.len())
        .ok_or_else(|| "no private key".to_owned())?;
    let (key_pem, certs_pem) = text.split_at(end);
    if !key_pem
        .trim_start()
        .starts_with("-----BEGIN PRIVATE KEY-----")
    {
        return Err("the private key must come first".into());
    }
    let key = KeyPair::from_pkcs8_pem_or_der(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let chain = oxid_pki::x509::certs_from_pem(certs_pem.as_bytes()).map_err(|e| e.to_string())?;
    Ok((key, chain))
}

/// Checks a saved key and chain: the key is the leaf's, the chain verifies
/// against `bundle`, and the leaf has not expired by the `wall` clock.
fn check(
    key: KeyPair,
    chain: Vec<CertificateDer<'static>>,
    bundle: &Bundle,
    wall: &WallClock,
) -> Restored {
    let now = wall.now();
    let Some(leaf) = chain.first() else {
        return Restored::Invalid("the saved agent SVID is empty".into());
    };
    let id = leaf_identity(leaf).map_or_else(|_| "the agent".to_owned(), |(id, _)| id.to_string());
    let leaf_spki = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.public_key().raw.to_vec())
        .unwrap_or_default();
    if leaf_spki != key.public_key_spki() {
        return Restored::Invalid(format!(
            "the saved key of {id} is not the key of its saved SVID"
        ));
    }
    match verify_x509_svid(&chain, bundle, ExtendedKeyUsage::ClientAuth, now) {
        Ok(_) => {}
        Err(oxid_pki::x509::X509Error::Expired) => {
            let not_after = x509_parser::parse_x509_certificate(leaf)
                .map(|(_, c)| c.validity().not_after.timestamp())
                .unwrap_or_default();
            let now_s = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let ago = now_s.saturating_sub(not_after.max(0).unsigned_abs());
            return Restored::Invalid(format!("the saved agent SVID of {id} expired {ago} s ago"));
        }
        Err(e) => {
            return Restored::Invalid(format!(
                "the saved agent SVID of {id} does not verify against the trust bundle: {e}"
            ));
        }
    }
    match Identity::from_chain(key, chain, None, 0, wall) {
        Ok(identity) => Restored::Valid(Box::new(identity)),
        Err(e) => Restored::Invalid(format!("the saved agent SVID of {id}: {e}")),
    }
}
