//! x509pop node attestation, both halves: what the agent sends and signs,
//! and how the server verifies it. One module, so the wire format (the
//! signed context, the nonce length, the chain encoding) has one definition.
//!
//! The exchange, inside the agent API's `Attest` stream:
//! 1. the agent sends its node chain ([`payload`]: concatenated DER, leaf
//!    first);
//! 2. the server verifies it against its node CAs ([`Challenge::begin`]) and
//!    sends a nonce of [`NONCE_LEN`] random bytes;
//! 3. the agent signs [`signing_input`] of the nonce with the node key
//!    ([`respond`]);
//! 4. the server checks that signature with the leaf's key
//!    ([`Challenge::finish`]) and only then learns the node's [`Node`].
//!
//! The node's selectors come from the verified path only (`subject:cn`,
//! `san:dns`, `ca:fingerprint` of the path's intermediates and the root it
//! ended at): anything else the node appended is unchecked and could be
//! anyone's certificate. Time is a parameter, as everywhere in this crate.

use std::collections::BTreeSet;
use std::time::SystemTime;

use ring::rand::SecureRandom as _;
use ring::signature::{self, UnparsedPublicKey};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::key::{KeyAlgorithm, KeyPair, hex};
use crate::x509::PublicKey;
use crate::{Selector, SelectorError, SpiffeId, TrustDomain};

/// The attestation type named in `AttestationData.type`.
pub const ATTESTATION_TYPE: &str = "x509pop";

/// Prefixed to the nonce before signing, so an x509pop signature can never
/// be replayed as a signature over anything else.
pub const CONTEXT: &[u8] = b"oxid x509pop v1\0";

/// Length of the server's nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// Longest node certificate chain accepted.
pub const MAX_CHAIN: usize = 8;

/// Why an x509pop step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopError {
    /// The node chain does not parse (not DER certificates, or empty).
    #[error("x509pop: node chain: {0}")]
    MalformedChain(String),
    /// The node chain is longer than [`MAX_CHAIN`].
    #[error("x509pop: node chain has {0} certificates; at most {MAX_CHAIN}")]
    ChainTooLong(usize),
    /// The node chain does not verify for client auth against the node CAs.
    #[error("x509pop: node certificate is not trusted: {0}")]
    Untrusted(String),
    /// The node certificate's key is not of an accepted type.
    #[error("x509pop: node key: {0}")]
    UnsupportedKey(String),
    /// `now` is before the Unix epoch.
    #[error("x509pop: clock before 1970")]
    Clock,
    /// The challenge to sign is not [`NONCE_LEN`] bytes.
    #[error("x509pop: the challenge is {0} bytes; expected {NONCE_LEN}")]
    BadChallenge(usize),
    /// The answer is not a signature by the node certificate's key.
    #[error("x509pop: the challenge was not signed by the node certificate's key")]
    BadSignature,
    /// The node key could not sign.
    #[error("x509pop: signing the challenge failed: {0}")]
    Sign(crate::KeyError),
    /// The random generator failed, or verification lost its anchor.
    #[error("x509pop: {0}")]
    Internal(&'static str),
}

/// The attestation payload for a node chain (leaf first).
pub fn payload<'a>(chain: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> Vec<u8> {
    crate::x509::concat_der(chain)
}

/// The bytes the node key signs for `nonce`: [`CONTEXT`] then the nonce.
pub fn signing_input(nonce: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTEXT.len() + nonce.len());
    message.extend_from_slice(CONTEXT);
    message.extend_from_slice(nonce);
    message
}

/// The agent's half: signs the server's `challenge` with the node key.
/// Anything but a nonce of [`NONCE_LEN`] bytes is refused, so the node key
/// signs nothing else even for a server that misbehaves.
pub fn respond(node_key: &KeyPair, challenge: &[u8]) -> Result<Vec<u8>, X509PopError> {
    if challenge.len() != NONCE_LEN {
        return Err(X509PopError::BadChallenge(challenge.len()));
    }
    node_key
        .sign_x509(&signing_input(challenge))
        .map_err(X509PopError::Sign)
}

/// What a completed x509pop proves about a node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Node {
    /// `spiffe://<td>/oxid/agent/x509pop/<hex SHA-256 of the leaf>`.
    pub spiffe_id: SpiffeId,
    /// `x509pop:` selectors from the verified path.
    pub selectors: BTreeSet<Selector>,
}

/// A value from the node certificate that makes no valid selector (for
/// example a common name with a character selectors refuse): left out.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The selector value that was refused.
    pub value: String,
    /// Why.
    pub error: SelectorError,
}

/// The server's half between its two messages: the node chain verified, a
/// nonce for the node to sign.
#[derive(Debug)]
pub struct Challenge {
    nonce: [u8; NONCE_LEN],
    public_key: PublicKey,
    node: Node,
    skipped: Vec<Skipped>,
}

impl Challenge {
    /// Verifies the node chain (`payload`: concatenated DER, leaf first)
    /// against the node CAs `roots` at `now`, and draws a nonce.
    pub fn begin(
        roots: &[CertificateDer<'static>],
        trust_domain: &TrustDomain,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<Self, X509PopError> {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| X509PopError::Internal("random generator failed"))?;
        Self::begin_with_nonce(roots, trust_domain, payload, now, nonce)
    }

    fn begin_with_nonce(
        roots: &[CertificateDer<'static>],
        trust_domain: &TrustDomain,
        payload: &[u8],
        now: SystemTime,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, X509PopError> {
        let chain = crate::x509::split_der_certs(payload)
            .map_err(|e| X509PopError::MalformedChain(e.to_string()))?;
        if chain.len() > MAX_CHAIN {
            return Err(X509PopError::ChainTooLong(chain.len()));
        }
        let leaf_der = chain
            .first()
            .ok_or_else(|| X509PopError::MalformedChain("empty".into()))?;
        let path_cas = verified_path_cas(roots, &chain, now)?;

        let parsed = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|e| X509PopError::MalformedChain(e.to_string()))?
            .1;
        let public_key = PublicKey::from_spki_der(parsed.public_key().raw)
            .map_err(|e| X509PopError::UnsupportedKey(e.to_string()))?;
        let spiffe_id = trust_domain
            .spiffe_id(&format!("/oxid/agent/x509pop/{}", sha256_hex(leaf_der)))
            .map_err(|_| X509PopError::Internal("agent ID does not parse"))?;

        let mut values = Vec::new();
        if let Some(cn) = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            values.push(format!("subject:cn:{cn}"));
        }
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    values.push(format!("san:dns:{dns}"));
                }
            }
        }
        values.extend(
            path_cas
                .iter()
                .map(|ca| format!("ca:fingerprint:{}", sha256_hex(ca))),
        );
        let mut selectors = BTreeSet::new();
        let mut skipped = Vec::new();
        for value in values {
            match Selector::new(ATTESTATION_TYPE, &value) {
                Ok(s) => {
                    selectors.insert(s);
                }
                Err(error) => skipped.push(Skipped { value, error }),
            }
        }
        Ok(Self {
            nonce,
            public_key,
            node: Node {
                spiffe_id,
                selectors,
            },
            skipped,
        })
    }

    /// The nonce to send to the node.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    /// Values of the node certificate that made no valid selector.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Checks the node's answer: a signature over [`signing_input`] of the
    /// nonce by the leaf's key. Only then is the node known.
    pub fn finish(self, signature_bytes: &[u8]) -> Result<Node, X509PopError> {
        // The algorithms `KeyPair::sign_x509` signs with.
        let alg: &dyn signature::VerificationAlgorithm = match self.public_key.algorithm() {
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
            KeyAlgorithm::Rsa => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        let raw = rcgen::PublicKeyData::der_bytes(&self.public_key);
        UnparsedPublicKey::new(alg, raw)
            .verify(&signing_input(&self.nonce), signature_bytes)
            .map_err(|_| X509PopError::BadSignature)?;
        Ok(self.node)
    }
}

/// Verifies `chain` for client auth against `roots` and returns the CAs of
/// the path that verified: its intermediates, then the root it used.
fn verified_path_cas(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<Vec<CertificateDer<'static>>, X509PopError> {
    // Each anchor kept beside the root it came from, so the root that
    // verification used is found by position, never by a name the node sent.
    let (anchor_roots, anchors): (Vec<_>, Vec<_>) = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| (r, a)))
        .unzip();
    let (leaf_der, intermediates) = chain
        .split_first()
        .ok_or_else(|| X509PopError::MalformedChain("empty".into()))?;
    let leaf = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| X509PopError::MalformedChain(format!("node certificate: {e:?}")))?;
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| X509PopError::Clock)?;
    let path = leaf
        .verify_for_usage(
            crate::policy::X509_SIGNATURE_ALGORITHMS,
            &anchors,
            intermediates,
            UnixTime::since_unix_epoch(secs),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| X509PopError::Untrusted(format!("{e:?}")))?;
    let used_root = anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .map(|i| anchor_roots[i])
        .ok_or(X509PopError::Internal("verified anchor not found"))?;
    Ok(path
        .intermediate_certificates()
        .map(|c| c.der().into_owned())
        .chain(std::iter::once(used_root.clone()))
        .collect())
}

fn sha256_hex(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use super::*;
    use crate::x509::{SvidParams, X509Ca};

    const DAY: Duration = Duration::from_secs(86_400);

    fn key() -> KeyPair {
        KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()
    }

    fn nodes() -> TrustDomain {
        TrustDomain::new("nodes.example").unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn node_cert(ca: &X509Ca, host: &str, key: &KeyPair) -> CertificateDer<'static> {
        let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
        let svid = ca
            .issue_x509_svid(
                &SvidParams {
                    spiffe_id: &format!("spiffe://nodes.example/host/{host}")
                        .parse()
                        .unwrap(),
                    public_key: &pk,
                    ttl: Duration::from_secs(3600),
                    dns_names: &[format!("{host}.nodes.example")],
                },
                now(),
            )
            .unwrap();
        svid.leaf().clone()
    }

    struct Setup {
        root: X509Ca,
        intermediate: X509Ca,
        leaf: CertificateDer<'static>,
        node_key: KeyPair,
    }

    fn setup() -> Setup {
        let root = X509Ca::new_root(nodes(), key(), DAY, now()).unwrap();
        let intermediate = X509Ca::new_intermediate(&root, nodes(), key(), DAY / 2, now()).unwrap();
        let node_key = key();
        let leaf = node_cert(&intermediate, "web-1", &node_key);
        Setup {
            root,
            intermediate,
            leaf,
            node_key,
        }
    }

    fn roots(s: &Setup) -> Vec<CertificateDer<'static>> {
        vec![s.root.chain().last().unwrap().clone()]
    }

    fn full_chain(s: &Setup) -> Vec<u8> {
        payload([&s.leaf, &s.intermediate.chain()[0]])
    }

    #[test]
    fn round_trip_gives_the_node_and_its_path_selectors() {
        let s = setup();
        let challenge = Challenge::begin(&roots(&s), &td(), &full_chain(&s), now()).unwrap();
        assert!(challenge.skipped().is_empty());
        let answer = respond(&s.node_key, challenge.nonce()).unwrap();
        let node = challenge.finish(&answer).unwrap();
        assert_eq!(
            node.spiffe_id.as_str(),
            format!(
                "spiffe://example.org/oxid/agent/x509pop/{}",
                sha256_hex(&s.leaf)
            )
        );
        let got: BTreeSet<String> = node.selectors.iter().map(|s| s.to_string()).collect();
        let want: BTreeSet<String> = [
            "x509pop:subject:cn:web-1.nodes.example".to_owned(),
            "x509pop:san:dns:web-1.nodes.example".to_owned(),
            format!(
                "x509pop:ca:fingerprint:{}",
                sha256_hex(&s.intermediate.chain()[0])
            ),
            format!("x509pop:ca:fingerprint:{}", sha256_hex(&roots(&s)[0])),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_signed_bytes_are_the_context_then_the_nonce() {
        // Pinned: the agent and server of different versions must agree.
        assert_eq!(CONTEXT, b"oxid x509pop v1\0");
        assert_eq!(signing_input(&[7; 3]), b"oxid x509pop v1\0\x07\x07\x07");
        let s = setup();
        let nonce = [9u8; NONCE_LEN];
        let challenge =
            Challenge::begin_with_nonce(&roots(&s), &td(), &full_chain(&s), now(), nonce).unwrap();
        let mut message = b"oxid x509pop v1\0".to_vec();
        message.extend_from_slice(&nonce);
        challenge
            .finish(&s.node_key.sign_x509(&message).unwrap())
            .unwrap();
    }

    #[test]
    fn a_signature_by_another_key_or_over_another_nonce_is_refused() {
        let s = setup();
        let challenge = Challenge::begin(&roots(&s), &td(), &full_chain(&s), now()).unwrap();
        let other = respond(&key(), challenge.nonce()).unwrap();
        assert!(matches!(
            challenge.finish(&other),
            Err(X509PopError::BadSignature)
        ));

        let challenge = Challenge::begin(&roots(&s), &td(), &full_chain(&s), now()).unwrap();
        let stale = respond(&s.node_key, &[0; NONCE_LEN]).unwrap();
        assert!(matches!(
            challenge.finish(&stale),
            Err(X509PopError::BadSignature)
        ));

        let challenge = Challenge::begin(&roots(&s), &td(), &full_chain(&s), now()).unwrap();
        let bare = s.node_key.sign_x509(challenge.nonce()).unwrap();
        assert!(matches!(
            challenge.finish(&bare),
            Err(X509PopError::BadSignature)
        ));
    }

    #[test]
    fn the_agent_signs_only_a_nonce_of_the_right_length() {
        let k = key();
        for len in [0, NONCE_LEN - 1, NONCE_LEN + 1, 4096] {
            assert!(matches!(
                respond(&k, &vec![1; len]),
                Err(X509PopError::BadChallenge(n)) if n == len
            ));
        }
    }

    #[test]
    fn chains_that_do_not_verify_are_refused() {
        let s = setup();
        // Another root: untrusted.
        let stranger = X509Ca::new_root(nodes(), key(), DAY, now()).unwrap();
        let err = Challenge::begin(
            &[stranger.chain()[0].clone()],
            &td(),
            &full_chain(&s),
            now(),
        )
        .unwrap_err();
        assert!(matches!(err, X509PopError::Untrusted(_)), "{err}");
        // Missing intermediate.
        let err = Challenge::begin(&roots(&s), &td(), &payload([&s.leaf]), now()).unwrap_err();
        assert!(matches!(err, X509PopError::Untrusted(_)), "{err}");
        // Expired by the `now` given.
        let err = Challenge::begin(&roots(&s), &td(), &full_chain(&s), now() + DAY).unwrap_err();
        assert!(matches!(err, X509PopError::Untrusted(_)), "{err}");
        let err = Challenge::begin(&roots(&s), &td(), &full_chain(&s), SystemTime::UNIX_EPOCH)
            .unwrap_err();
        assert!(matches!(err, X509PopError::Untrusted(_)), "{err}");
    }

    #[test]
    fn malformed_and_oversized_chains_are_refused() {
        let s = setup();
        for bad in [&b""[..], b"\x30\x03\x02\x01", b"not der"] {
            let err = Challenge::begin(&roots(&s), &td(), bad, now()).unwrap_err();
            assert!(matches!(err, X509PopError::MalformedChain(_)), "{err}");
        }
        let long: Vec<&CertificateDer<'_>> = std::iter::once(&s.leaf)
            .chain(std::iter::repeat_n(&s.intermediate.chain()[0], MAX_CHAIN))
            .collect();
        let err = Challenge::begin(&roots(&s), &td(), &payload(long), now()).unwrap_err();
        assert!(
            matches!(err, X509PopError::ChainTooLong(n) if n == MAX_CHAIN + 1),
            "{err}"
        );
    }
}
