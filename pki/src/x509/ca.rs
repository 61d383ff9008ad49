//! The X.509 certificate authority of a trust domain.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use super::csr::PublicKey;
use super::template::{self, Validity};
use super::{BACKDATE, X509Error, asn1_to_system_time, parse_cert, rules};
use crate::id::{SpiffeId, TrustDomain};
use crate::key::KeyPair;

/// A CA that can sign X509-SVIDs and intermediate CA certificates.
pub struct X509Ca {
    trust_domain: TrustDomain,
    /// Owns the signing key; built from the CA certificate so issued
    /// certificates name it exactly as issuer (DN and key identifier).
    issuer: rcgen::Issuer<'static, KeyPair>,
    /// The CA certificate's subject DER: every issued certificate's issuer
    /// must equal it byte for byte, or no verifier will chain it.
    subject: Vec<u8>,
    /// This CA's certificate, then its parents up to and including the
    /// trust anchor (the last element).
    chain: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// An issued X509-SVID: the SPIFFE ID and the chain a workload presents.
/// Only issuance builds one, so the chain is never empty.
#[derive(Debug, Clone)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    cert_chain: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
}

impl X509Svid {
    /// The identity certified.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The leaf first, then the intermediates; never the root.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// Consumes the SVID, returning its chain.
    pub fn into_cert_chain(self) -> Vec<CertificateDer<'static>> {
        self.cert_chain
    }

    /// The leaf's `notAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // Invariant: `issue_x509_svid` always puts the leaf first.
        &self.cert_chain[0]
    }
}

/// What an X509-SVID is issued for. The caller (the server) fills it from a
/// registration entry; nothing here comes from the CSR except the key.
#[derive(Debug, Clone, Copy)]
pub struct SvidParams<'a> {
    /// The identity to certify; must belong to the CA's trust domain.
    pub spiffe_id: &'a SpiffeId,
    /// The key to certify (from a verified CSR, or given directly).
    pub public_key: &'a PublicKey,
    /// Requested lifetime; clamped so the SVID never outlives the CA.
    pub ttl: Duration,
    /// Extra DNS SANs (the first also becomes the subject CN).
    pub dns_names: &'a [String],
}

impl X509Ca {
    /// Creates a self-signed root CA for `trust_domain`.
    pub fn new_root(
        trust_domain: TrustDomain,
        key: KeyPair,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, X509Error> {
        let validity = validity(now, ttl, None)?;
        let params = template::ca(&trust_domain, validity, template::random_serial()?)?;
        let cert = params.self_signed(&key)?;
        Self::restore(trust_domain, vec![cert.der().clone()], key)
    }

    /// Creates an intermediate CA for `trust_domain` signed by `upstream`
    /// (the upstream's lifetime bounds the intermediate's).
    pub fn new_intermediate(
        upstream: &X509Ca,
        trust_domain: TrustDomain,
        key: KeyPair,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, X509Error> {
        let cert = upstream.sign_ca(&trust_domain, &key, ttl, now)?;
        let mut chain = vec![cert];
        chain.extend(upstream.chain.iter().cloned());
        Self::restore(trust_domain, chain, key)
    }

    /// Restores one of oxid's own CAs (e.g. from the server's CA journal) from
    /// its chain, own certificate first, trust anchor last, and its key. The
    /// certificate must follow oxid's CA profile for `trust_domain`.
    pub fn restore(
        trust_domain: TrustDomain,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
    ) -> Result<Self, X509Error> {
        let ca = Self::assemble(trust_domain, chain, key)?;
        ca.validate_own_cert()?;
        Ok(ca)
    }

    /// Builds a CA from a chain and key after checking that they belong
    /// together: the certificate can sign, the key is its own, every
    /// certificate is issued and signed by the next, and a certificate this
    /// CA signs verifies up to the anchor (which catches issuer names rcgen
    /// cannot reproduce, path-length limits and algorithm policy at load
    /// time, not when the first workload fails).
    fn assemble(
        trust_domain: TrustDomain,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
    ) -> Result<Self, X509Error> {
        let own = chain.first().ok_or(X509Error::EmptyChain)?;
        let parsed = parse_cert(own)?;
        rules::check_signing_cert(&parsed).map_err(|v| X509Error::NotACa(v.to_string()))?;
        if parsed.public_key().raw != key.public_key_spki() {
            return Err(X509Error::KeyMismatch);
        }
        let (not_before, not_after) = check_chain_links(&chain)?;
        let subject = parsed.subject().as_raw().to_vec();
        let issuer = rcgen::Issuer::from_ca_cert_der(own, key)?;
        let ca = Self {
            trust_domain,
            issuer,
            subject,
            chain,
            not_before,
            not_after,
        };
        ca.probe()?;
        Ok(ca)
    }

    /// Issues a throwaway SVID at the middle of the CA's validity and verifies
    /// it against the trust anchor.
    fn probe(&self) -> Result<(), X509Error> {
        let key = KeyPair::generate(crate::KeyAlgorithm::EcdsaP256)?;
        let public_key = PublicKey::from_spki_der(key.public_key_spki())?;
        let id = self.trust_domain.spiffe_id("/oxid/ca-probe")?;
        let span = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let at = self.not_before + span / 2;
        let params = SvidParams {
            spiffe_id: &id,
            public_key: &public_key,
            ttl: Duration::from_secs(1),
            dns_names: &[],
        };
        let svid = self.issue_x509_svid(&params, at).map_err(|e| match e {
            X509Error::Rule(rules::Violation::WrongIssuer) => X509Error::UnusableChain(
                "the CA subject name cannot be reproduced exactly as an issuer name (a subject \
                 that repeats an attribute type, such as two DC= or OU= parts, is not supported)"
                    .into(),
            ),
            other => X509Error::UnusableChain(format!("cannot sign with this CA: {other}")),
        })?;
        let mut bundle = crate::bundle::Bundle::new(self.trust_domain.clone());
        bundle
            .add_x509_authority(self.root().clone())
            .map_err(|e| X509Error::UnusableChain(e.to_string()))?;
        super::verify_x509_svid(svid.cert_chain(), &bundle, super::ExtendedKeyUsage::Any, at)
            .map_err(|e| X509Error::UnusableChain(e.to_string()))?;
        Ok(())
    }

    /// Loads an upstream CA from a PEM certificate file (the CA certificate
    /// first, optionally followed by its chain up to the root) and a PKCS#8
    /// key file (mode 0600). The certificate need not follow the SPIFFE
    /// profile (it is the organisation's CA), but it must be able to sign.
    pub fn load_upstream(
        trust_domain: TrustDomain,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, X509Error> {
        let pem = std::fs::read(cert_path).map_err(|source| X509Error::Io {
            path: cert_path.to_owned(),
            source,
        })?;
        let chain = super::certs_from_pem(&pem)?;
        let key = KeyPair::load(key_path)?;
        Self::assemble(trust_domain, chain, key)
    }

    /// Issues an X509-SVID: template, signature, then validation of the output
    /// against the whole oxid leaf profile before it is returned.
    pub fn issue_x509_svid(
        &self,
        params: &SvidParams<'_>,
        now: SystemTime,
    ) -> Result<X509Svid, X509Error> {
        let id = params.spiffe_id;
        if !id.is_member_of(&self.trust_domain) {
            return Err(X509Error::BadSpiffeId {
                id: id.to_string(),
                reason: "it belongs to another trust domain than the CA",
            });
        }
        if id.is_trust_domain_id() {
            return Err(X509Error::BadSpiffeId {
                id: id.to_string(),
                reason: "an X509-SVID needs a path",
            });
        }
        let validity = self.child_validity(now, params.ttl)?;
        let template =
            template::x509_svid(id, params.dns_names, validity, template::random_serial()?)?;
        let cert = template.signed_by(params.public_key, &self.issuer)?;
        let der = cert.der().clone();

        let parsed = parse_cert(&der)?;
        rules::check_issued_leaf(&parsed, id, params.public_key.spki_der(), self.not_after)?;
        rules::check_issuer_name(&parsed, &self.subject)?;

        let mut cert_chain = Vec::with_capacity(self.chain.len());
        cert_chain.push(der);
        cert_chain.extend(self.intermediates().iter().cloned());
        Ok(X509Svid {
            spiffe_id: id.clone(),
            cert_chain,
            not_after: validity.not_after,
        })
    }

    /// Signs a CA certificate for `trust_domain` over `subject_key`, e.g. a new
    /// intermediate of a server whose root this is.
    pub fn sign_ca(
        &self,
        trust_domain: &TrustDomain,
        subject_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, X509Error> {
        let validity = self.child_validity(now, ttl)?;
        let params = template::ca(trust_domain, validity, template::random_serial()?)?;
        let der = params.signed_by(subject_key, &self.issuer)?.der().clone();
        let parsed = parse_cert(&der)?;
        rules::check_issued_ca(&parsed, trust_domain)?;
        rules::check_issuer_name(&parsed, &self.subject)?;
        Ok(der)
    }

    fn child_validity(&self, now: SystemTime, ttl: Duration) -> Result<Validity, X509Error> {
        if now >= self.not_after || now < self.not_before {
            return Err(X509Error::CaNotValid);
        }
        validity(now, ttl, Some(self.not_after))
    }

    fn validate_own_cert(&self) -> Result<(), X509Error> {
        rules::check_issued_ca(&parse_cert(&self.chain[0])?, &self.trust_domain)?;
        Ok(())
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This CA's own certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        // Invariant: `assemble` refuses an empty chain.
        &self.chain[0]
    }

    /// The chain from this CA's certificate to the trust anchor, inclusive.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The certificates an SVID carries after its leaf: the chain without its
    /// trust anchor (empty for a self-signed root).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain[..self.chain.len() - 1]
    }

    /// The trust anchor that goes into the bundle.
    pub fn root(&self) -> &CertificateDer<'static> {
        // Invariant: `assemble` refuses an empty chain.
        &self.chain[self.chain.len() - 1]
    }

    /// The signing key.
    pub fn key(&self) -> &KeyPair {
        self.issuer.key()
    }

    /// Start of this CA's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of this CA's validity, or of its chain's if a parent expires
    /// sooner: nothing it signs outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl std::fmt::Debug for X509Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Ca")
            .field("trust_domain", &self.trust_domain)
            .field("key", self.key())
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The last instant an X.509 time can express: 9999-12-31T23:59:59Z.
fn max_certificate_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// Checks that each certificate of `chain` is issued and signed by the next,
/// and that a self-issued last certificate is self-signed (a last one that is
/// not self-issued is accepted as a partial-chain anchor). Returns the
/// window in which the whole chain is valid.
fn check_chain_links(
    chain: &[CertificateDer<'static>],
) -> Result<(SystemTime, SystemTime), X509Error> {
    let parsed: Vec<_> = chain
        .iter()
        .map(|c| parse_cert(c))
        .collect::<Result<_, _>>()?;
    for (i, pair) in parsed.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.issuer().as_raw() != parent.subject().as_raw()
            || child.verify_signature(Some(parent.public_key())).is_err()
        {
            return Err(X509Error::UnusableChain(format!(
                "certificate {i} of the chain is not issued by certificate {}",
                i + 1
            )));
        }
    }
    if let Some(last) = parsed.last() {
        if last.subject().as_raw() == last.issuer().as_raw() && last.verify_signature(None).is_err()
        {
            return Err(X509Error::UnusableChain(
                "the self-issued anchor's signature does not verify".into(),
            ));
        }
    }
    let not_before = parsed
        .iter()
        .map(|c| asn1_to_system_time(c.validity().not_before))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let not_after = parsed
        .iter()
        .map(|c| asn1_to_system_time(c.validity().not_after))
        .min()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((not_before, not_after))
}

/// `[now - BACKDATE, min(now + ttl, limit)]`.
fn validity(
    now: SystemTime,
    ttl: Duration,
    limit: Option<SystemTime>,
) -> Result<Validity, X509Error> {
    if ttl.is_zero() {
        return Err(X509Error::ZeroTtl);
    }
    let mut not_after = now.checked_add(ttl).ok_or(X509Error::TtlTooLong)?;
    if let Some(limit) = limit {
        not_after = not_after.min(limit);
    }
    if not_after > max_certificate_time() {
        return Err(X509Error::TtlTooLong);
    }
    // DER time has whole seconds; truncate so the returned expiry is exact.
    let secs = super::unix_secs(not_after).max(0).unsigned_abs();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    Ok(Validity {
        not_before: now.checked_sub(BACKDATE).unwrap_or(now),
        not_after,
    })
}
