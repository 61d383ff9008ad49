//! The server's own SVID (`spiffe://<td>/oxid/server`), issued by its CA
//! with a key that never leaves memory and renewed at half-life by the
//! injected clock, so tests (and a clock that jumps) drive the renewal.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId};
use oxid_tls::SvidResolver;

use crate::ca::CaManager;
use crate::clock::Clock;

/// Longest sleep between two looks at the clock: the injected clock can
/// move (or jump) without waking anyone, so the renewer polls it.
const CLOCK_POLL: Duration = Duration::from_secs(1);

/// Wait before retrying a renewal that failed.
const RETRY: Duration = Duration::from_secs(5);

/// Issues and renews the server SVID into a resolver.
pub(crate) struct ServerSvid {
    pub(crate) ca: Arc<CaManager>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) server_id: SpiffeId,
    pub(crate) ttl: Duration,
    pub(crate) resolver: Arc<SvidResolver>,
}

impl ServerSvid {
    /// Issues a new SVID into the resolver; returns when it is due for
    /// renewal (half its life, by the injected clock).
    pub(crate) fn issue(&self) -> Result<SystemTime, String> {
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).map_err(|e| e.to_string())?;
        let public_key = oxid_pki::x509::PublicKey::from_spki_der(key.public_key_spki())
            .map_err(|e| e.to_string())?;
        let svid = self
            .ca
            .sign_x509_svid(&oxid_pki::x509::SvidParams {
                spiffe_id: &self.server_id,
                public_key: &public_key,
                ttl: self.ttl,
                dns_names: &[],
            })
            .map_err(|e| e.to_string())?;
        let now = self.clock.now();
        let lifetime = svid.not_after().duration_since(now).unwrap_or_default();
        self.resolver
            .set(svid.into_cert_chain(), &key)
            .map_err(|e| e.to_string())?;
        Ok(now + (lifetime / 2).max(Duration::from_secs(1)))
    }

    /// Renews the SVID whenever it is due, until the task is aborted.
    pub(crate) fn spawn(self, mut renew_at: SystemTime) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let now = self.clock.now();
                match renew_at.duration_since(now) {
                    Ok(wait) if !wait.is_zero() => {
                        tokio::time::sleep(wait.min(CLOCK_POLL)).await;
                        continue;
                    }
                    _ => {}
                }
                renew_at = match self.issue() {
                    Ok(at) => {
                        tracing::debug!("renewed the server SVID");
                        at
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the server SVID failed; retrying");
                        now + RETRY
                    }
                };
            }
        })
    }
}
