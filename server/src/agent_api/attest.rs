//! Node attestation methods: join tokens and x509pop.

use std::collections::BTreeSet;
use std::time::SystemTime;

use oxid_pki::x509::PublicKey;
use oxid_pki::{KeyAlgorithm, Selector, SpiffeId, TrustDomain};
use ring::rand::SecureRandom as _;
use ring::signature::{self, UnparsedPublicKey};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;

use super::service::AgentApiError;
use crate::attest::{hex, token_hash};
use crate::datastore::{DataStore, DataStoreError};

/// Context string signed with the nonce, so an x509pop signature can never
/// be replayed as a signature over anything else.
pub(crate) const X509POP_CONTEXT: &[u8] = b"oxid x509pop v1\0";

/// Longest node certificate chain accepted.
const MAX_NODE_CHAIN: usize = 8;

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
pub(crate) struct X509PopChallenge {
    pub(crate) nonce: [u8; 32],
    public_key: PublicKey,
    attested: Attested,
}

/// Verifies the node certificate chain (`payload`: concatenated DER, leaf
/// first) against the configured node CAs and makes a challenge.
pub(crate) fn x509pop_begin(
    roots: &[CertificateDer<'static>],
    trust_domain: &TrustDomain,
    payload: &[u8],
    now: SystemTime,
) -> Result<X509PopChallenge, AgentApiError> {
    let bad = |m: String| AgentApiError::PermissionDenied(format!("x509pop: {m}"));
    let chain = oxid_pki::x509::split_der_certs(payload)
        .map_err(|e| AgentApiError::InvalidArgument(format!("x509pop: node chain: {e}")))?;
    if chain.len() > MAX_NODE_CHAIN {
        return Err(AgentApiError::InvalidArgument(format!(
            "x509pop: node chain has {} certificates; at most {MAX_NODE_CHAIN}",
            chain.len()
        )));
    }
    // Each anchor kept beside the root it came from, so the root that
    // verification used is found by position, never by a name the node sent.
    let (anchor_roots, anchors): (Vec<_>, Vec<_>) = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| (r, a)))
        .unzip();
    let leaf_der = &chain[0];
    let leaf = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| AgentApiError::InvalidArgument(format!("x509pop: node certificate: {e:?}")))?;
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| bad("clock before 1970".into()))?;
    let path = leaf
        .verify_for_usage(
            oxid_pki::policy::X509_SIGNATURE_ALGORITHMS,
            &anchors,
            &chain[1..],
            UnixTime::since_unix_epoch(secs),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| bad(format!("node certificate is not trusted: {e:?}")))?;
    // Only the CAs on the path that verified vouch for this node: anything
    // else the node appended is unchecked and could be anyone's certificate.
    let used_root = anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .map(|i| anchor_roots[i])
        .ok_or_else(|| AgentApiError::Internal("x509pop: verified anchor not found".into()))?;
    let path_cas: Vec<CertificateDer<'_>> = path
        .intermediate_certificates()
        .map(|c| c.der())
        .chain(std::iter::once(used_root.clone()))
        .collect();

    let parsed = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| AgentApiError::InvalidArgument(format!("x509pop: {e}")))?
        .1;
    let public_key = PublicKey::from_spki_der(parsed.public_key().raw)
        .map_err(|e| bad(format!("node key: {e}")))?;
    let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, leaf_der).as_ref());
    let spiffe_id = trust_domain
        .spiffe_id(&format!("/oxid/agent/x509pop/{fingerprint}"))
        .map_err(|e| AgentApiError::Internal(e.to_string()))?;

    let mut selectors = BTreeSet::new();
    let mut add = |kind: &str, value: String| match Selector::new(kind, &value) {
        Ok(s) => {
            selectors.insert(s);
        }
        Err(e) => tracing::warn!(value, error = %e, "x509pop: skipping a selector"),
    };
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        add("x509pop", format!("subject:cn:{cn}"));
    }
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                add("x509pop", format!("san:dns:{dns}"));
            }
        }
    }
    // Fingerprints of the CAs on the verified path: its intermediates and
    // the configured root it ends at.
    for ca in &path_cas {
        add(
            "x509pop",
            format!(
                "ca:fingerprint:{}",
                hex(ring::digest::digest(&ring::digest::SHA256, ca).as_ref())
            ),
        );
    }

    let mut nonce = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| AgentApiError::Internal("random generator failed".into()))?;
    Ok(X509PopChallenge {
        nonce,
        public_key,
        attested: Attested {
            spiffe_id,
            attestation_type: "x509pop",
            selectors,
            aliases: BTreeSet::new(),
        },
    })
}

/// The second half: the nonce must be signed by the node certificate's key.
pub(crate) fn x509pop_finish(
    challenge: X509PopChallenge,
    signature_bytes: &[u8],
) -> Result<Attested, AgentApiError> {
    let mut message = X509POP_CONTEXT.to_vec();
    message.extend_from_slice(&challenge.nonce);
    let raw = raw_public_key(&challenge.public_key)?;
    let alg: &dyn signature::VerificationAlgorithm = match challenge.public_key.algorithm() {
        KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
        _ => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(alg, raw)
        .verify(&message, signature_bytes)
        .map_err(|_| {
            AgentApiError::PermissionDenied(
                "x509pop: the challenge was not signed by the node certificate's key".into(),
            )
        })?;
    Ok(challenge.attested)
}

fn raw_public_key(pk: &PublicKey) -> Result<Vec<u8>, AgentApiError> {
    use x509_parser::prelude::FromDer as _;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(pk.spki_der())
        .map_err(|e| AgentApiError::Internal(e.to_string()))?;
    Ok(spki.subject_public_key.data.to_vec())
}
