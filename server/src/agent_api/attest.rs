//! Node attestation methods: join tokens and x509pop.

use std::collections::BTreeSet;
use std::time::SystemTime;

use oxid_pki::x509pop::{self, X509PopError};
use oxid_pki::{Selector, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;

use super::service::AgentApiError;
use crate::attest::token_hash;
use crate::datastore::{DataStore, DataStoreError};

/// What a successful attestation establishes about a node.
#[derive(Debug, Clone)]
pub(crate) struct Attested {
    pub(crate) spiffe_id: SpiffeId,
    pub(crate) attestation_type: &'static str,
    pub(crate) selectors: BTreeSet<Selector>,
    pub(crate) aliases: BTreeSet<SpiffeId>,
}

/// Consumes a join token. Of several agents racing with one token, exactly
/// one succeeds (the store removes it atomically).
pub(crate) async fn join_token(
    store: &dyn DataStore,
    trust_domain: &TrustDomain,
    payload: &[u8],
    now_secs: u64,
) -> Result<Attested, AgentApiError> {
    let token = std::str::from_utf8(payload)
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .ok_or_else(|| AgentApiError::InvalidArgument("join token is malformed".into()))?;
    let stored = match store.consume_join_token(&token_hash(token), now_secs).await {
        Ok(t) => t,
        Err(DataStoreError::NotFound(_)) => {
            return Err(AgentApiError::PermissionDenied(
                "join token is unknown or was already used; create a new one with \
                 `oxid-server token generate`"
                    .into(),
            ));
        }
        Err(DataStoreError::TokenExpired) => {
            return Err(AgentApiError::PermissionDenied(
                "join token has expired; create a new one with `oxid-server token generate`".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let spiffe_id = trust_domain
        .spiffe_id(&format!("/oxid/agent/join_token/{}", stored.id))
        .map_err(|e| AgentApiError::Internal(e.to_string()))?;
    Ok(Attested {
        spiffe_id,
        attestation_type: "join_token",
        selectors: BTreeSet::new(),
        aliases: stored.alias.into_iter().collect(),
    })
}

/// The first half of x509pop: the node's chain verified, a nonce to sign.
pub(crate) type X509PopChallenge = x509pop::Challenge;

/// Verifies the node certificate chain (`payload`: concatenated DER, leaf
/// first) against the configured node CAs and makes a challenge.
pub(crate) fn x509pop_begin(
    roots: &[CertificateDer<'static>],
    trust_domain: &TrustDomain,
    payload: &[u8],
    now: SystemTime,
) -> Result<X509PopChallenge, AgentApiError> {
    let challenge =
        x509pop::Challenge::begin(roots, trust_domain, payload, now).map_err(x509pop_error)?;
    for skipped in challenge.skipped() {
        tracing::warn!(value = skipped.value, error = %skipped.error, "x509pop: skipping a selector");
    }
    Ok(challenge)
}

/// The second half: the nonce must be signed by the node certificate's key.
pub(crate) fn x509pop_finish(
    challenge: X509PopChallenge,
    signature: &[u8],
) -> Result<Attested, AgentApiError> {
    let node = challenge.finish(signature).map_err(x509pop_error)?;
    Ok(Attested {
        spiffe_id: node.spiffe_id,
        attestation_type: x509pop::ATTESTATION_TYPE,
        selectors: node.selectors,
        aliases: BTreeSet::new(),
    })
}

/// A chain that does not parse is the caller's mistake; one that parses
/// but does not prove the node is a refusal.
fn x509pop_error(e: X509PopError) -> AgentApiError {
    match e {
        X509PopError::MalformedChain(_) | X509PopError::ChainTooLong(_) => {
            AgentApiError::InvalidArgument(e.to_string())
        }
        X509PopError::Internal(_) | X509PopError::Sign(_) => AgentApiError::Internal(e.to_string()),
        _ => AgentApiError::PermissionDenied(e.to_string()),
    }
}
