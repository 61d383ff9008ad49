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
    /// This CA's certificate, then its parents up to and including the
    /// trust anchor (the last element).
    chain: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// An issued X509-SVID: the SPIFFE ID and the chain a workload presents.
#[derive(Debug, Clone)]
pub struct X509Svid {
    /// The identity certified.
    pub spiffe_id: SpiffeId,
    /// The leaf first, then the intermediates; never the root.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
}

impl X509Svid {
    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
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
        let ca = Self::from_chain(trust_domain, vec![cert.der().clone()], key)?;
        ca.validate_own_cert()?;
        Ok(ca)
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
        let ca = Self::from_chain(trust_domain, chain, key)?;
        ca.validate_own_cert()?;
        Ok(ca)
    }

    /// Restores a CA from its chain (own certificate first, trust anchor last)
    /// and key, e.g. from the server's CA journal. Checks that the certificate
    /// can sign and that the key is its own.
    pub fn from_chain(
        trust_domain: TrustDomain,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
    ) -> Result<Self, X509Error> {
        let own = chain.first().ok_or(X509Error::EmptyChain)?;
        let parsed = parse_cert(own)?;
        rules::check_signing_cert(&parsed).map_err(|v| match v {
            rules::Violation::SignerNotCa => X509Error::NotACa("basicConstraints is not CA:TRUE"),
            _ => X509Error::NotACa("keyUsage lacks keyCertSign"),
        })?;
        if parsed.public_key().raw != key.public_key_spki() {
            return Err(X509Error::KeyMismatch);
        }
        for cert in &chain[1..] {
            parse_cert(cert)?;
        }
        let not_before = asn1_to_system_time(parsed.validity().not_before);
        let not_after = asn1_to_system_time(parsed.validity().not_after);
        let issuer = rcgen::Issuer::from_ca_cert_der(own, key)?;
        Ok(Self {
            trust_domain,
            issuer,
            chain,
            not_before,
            not_after,
        })
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
        Self::from_chain(trust_domain, chain, key)
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
        rules::check_issued_ca(&parse_cert(&der)?, trust_domain)?;
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
        // Invariant: `from_chain` refuses an empty chain.
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

    /// End of this CA's validity: nothing it signs outlives it.
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

/// `[now - BACKDATE, min(now + ttl, limit)]`.
fn validity(
    now: SystemTime,
    ttl: Duration,
    limit: Option<SystemTime>,
) -> Result<Validity, X509Error> {
    if ttl.is_zero() {
        return Err(X509Error::ZeroTtl);
    }
    let mut not_after = now.checked_add(ttl).ok_or(X509Error::ZeroTtl)?;
    if let Some(limit) = limit {
        not_after = not_after.min(limit);
    }
    // DER time has whole seconds; truncate so the returned expiry is exact.
    let secs = super::unix_secs(not_after).max(0).unsigned_abs();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    Ok(Validity {
        not_before: now.checked_sub(BACKDATE).unwrap_or(now),
        not_after,
    })
}
