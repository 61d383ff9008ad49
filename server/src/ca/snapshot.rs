//! What the CA publishes: one immutable [`CaSnapshot`] per change, on a
//! `tokio::sync::watch`, so the agent API's TLS verifier, sync streams,
//! attestation answers and signing read the current authority without
//! rebuilding or re-encoding the bundle per handshake or per recompute (the
//! model is linkerd2-proxy's credential store).

use std::sync::Arc;

use oxid_pki::bundle::Bundle;

use super::generation::Signers;

/// The CA at one moment: the bundle, its encodings, and the active signers.
/// Built once per change by [`super::CaManager`]; cheap to clone out of the
/// watch (an `Arc`).
pub struct CaSnapshot {
    bundle: Arc<Bundle>,
    spiffe_json: Arc<str>,
    pem: Arc<str>,
    der: Arc<[Vec<u8>]>,
    active: Option<(u64, Arc<Signers>)>,
    /// The journal version it was built from (how the next one numbers
    /// its bundle).
    version: u64,
}

impl std::fmt::Debug for CaSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Signers hold private keys: only their sequence is shown.
        f.debug_struct("CaSnapshot")
            .field("sequence_number", &self.bundle.sequence_number())
            .field("active", &self.active_sequence())
            .finish_non_exhaustive()
    }
}

impl CaSnapshot {
    pub(super) fn new(bundle: Bundle, active: Option<(u64, Arc<Signers>)>, version: u64) -> Self {
        Self {
            version,
            spiffe_json: bundle.to_spiffe_json().into(),
            pem: bundle.x509_authorities_pem().into(),
            der: bundle
                .x509_authorities()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            bundle: Arc::new(bundle),
            active,
        }
    }

    /// The trust domain's bundle: every authority not yet expired.
    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }

    /// The bundle as a SPIFFE bundle document (JWKS), as sync, attestation
    /// and the store carry it.
    pub fn spiffe_json(&self) -> &Arc<str> {
        &self.spiffe_json
    }

    /// The X.509 authorities as PEM.
    pub fn x509_authorities_pem(&self) -> &str {
        &self.pem
    }

    /// The X.509 authorities, one DER certificate each.
    pub fn x509_authorities_der(&self) -> &[Vec<u8>] {
        &self.der
    }

    /// The sequence of the authority that signs now, if any can.
    pub fn active_sequence(&self) -> Option<u64> {
        self.active.as_ref().map(|(sequence, _)| *sequence)
    }

    pub(super) fn version(&self) -> u64 {
        self.version
    }

    pub(super) fn signers(&self) -> Option<&Arc<Signers>> {
        self.active.as_ref().map(|(_, signers)| signers)
    }
}
