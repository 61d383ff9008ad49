//! X.509: the CA, X509-SVID issuance and verification.
//!
//! Issuance follows three steps kept apart on purpose: a *template* (the
//! fields, decided only from the caller's entry, never from a CSR), a
//! *signature*, and a *validation of the output* that re-parses the issued
//! certificate and checks every SPIFFE rule, so a template bug fails closed.

mod ca;
mod csr;
mod rules;
mod template;
mod verify;

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use crate::id::IdError;

pub use self::ca::{SvidParams, X509Ca, X509Svid};
pub use self::csr::{Csr, CsrError, MAX_CSR_LEN, MAX_RSA_BITS, PublicKey};
pub use self::rules::Violation;
pub use self::verify::{ExtendedKeyUsage, VerifiedX509Svid, verify_x509_svid};

/// How far an issued certificate's `notBefore` is set in the past, so that a
/// peer whose clock runs slightly behind still accepts a fresh SVID.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Why an X.509 operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// Bytes that should hold a certificate do not parse as one.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// A certificate chain was empty.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// A PEM input held no certificate.
    #[error("no CERTIFICATE block found in PEM input")]
    NoCertificate,
    /// A certificate breaks a SPIFFE rule.
    #[error("certificate violates the SPIFFE profile: {0}")]
    Rule(#[from] Violation),
    /// A CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// A public key is not of a supported type.
    #[error("unsupported public key: {0}")]
    UnsupportedKey(String),
    /// The requested TTL is zero.
    #[error("TTL must be greater than zero")]
    ZeroTtl,
    /// The CA has expired (or is not yet valid) at the time of signing.
    #[error("the signing CA is not valid at the requested time")]
    CaNotValid,
    /// A DNS name for a SAN is not a valid DNS name.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),
    /// A SPIFFE ID that cannot be the subject of this certificate.
    #[error("SPIFFE ID {id} cannot be used here: {reason}")]
    BadSpiffeId {
        /// The offending ID.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The CA certificate and the key given with it do not belong together.
    #[error("the CA certificate does not match its private key")]
    KeyMismatch,
    /// A CA certificate cannot sign: it is not a CA, or its key usage forbids it.
    #[error("certificate cannot be used as a CA: {0}")]
    NotACa(String),
    /// A CA chain does not link up, or what the CA signs does not verify to
    /// its anchor (issuer name, path length, algorithm, validity).
    #[error("unusable CA chain: {0}")]
    UnusableChain(String),
    /// The requested lifetime ends after 9999-12-31, the last X.509 time.
    #[error("TTL is too long: the certificate would expire after the year 9999")]
    TtlTooLong,
    /// The certificate generator failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// The chain does not validate against the bundle (RFC 5280 path validation).
    #[error("certificate chain is not trusted: {0}")]
    Untrusted(String),
    /// The chain's leaf has expired.
    #[error("certificate has expired")]
    Expired,
    /// The chain's leaf is not valid yet.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// No bundle is known for the leaf's trust domain.
    #[error("no bundle for trust domain {0}")]
    NoBundle(String),
    /// A SPIFFE ID failed to parse.
    #[error("invalid SPIFFE ID: {0}")]
    Id(#[from] IdError),
    /// Reading a certificate or key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key could not be loaded or used.
    #[error(transparent)]
    Key(#[from] crate::key::KeyError),
}

impl From<rcgen::Error> for X509Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e.to_string())
    }
}

/// Encodes `der` as one PEM block with the given tag.
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der), config)
}

/// Encodes certificates as concatenated PEM `CERTIFICATE` blocks.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect()
}

/// Parses every `CERTIFICATE` block of a PEM input; other blocks are ignored.
/// Each certificate must parse as X.509.
pub fn certs_from_pem(pem_bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, X509Error> {
    let blocks = pem::parse_many(pem_bytes).map_err(|e| X509Error::Malformed(e.to_string()))?;
    if blocks.iter().any(|b| b.tag().contains("PRIVATE KEY")) {
        // A key in a certificate file usually means the key sits in a file
        // that is readable by more than its owner.
        return Err(X509Error::Malformed(
            "a certificate file must not contain a private key; keep keys in their own 0600 file"
                .into(),
        ));
    }
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(X509Error::NoCertificate);
    }
    for cert in &certs {
        parse_cert(cert)?;
    }
    Ok(certs)
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and
/// `bundle` encoding) into single certificates.
pub fn split_der_certs(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, X509Error> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| X509Error::Malformed(e.to_string()))?;
        let len = der.len() - rest.len();
        certs.push(CertificateDer::from(der[..len].to_vec()));
        der = rest;
    }
    if certs.is_empty() {
        return Err(X509Error::EmptyChain);
    }
    Ok(certs)
}

/// Concatenates DER certificates (the Workload API encoding).
pub fn concat_der<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> Vec<u8> {
    certs.into_iter().flat_map(|c| c.iter().copied()).collect()
}

/// The SPIFFE ID and hex serial number of an X509-SVID leaf (its SPIFFE
/// rules are checked; its chain is not: call this on a verified peer).
pub fn leaf_identity(der: &[u8]) -> Result<(crate::SpiffeId, String), X509Error> {
    let cert = parse_cert(der)?;
    let id = rules::check_leaf(&cert)?;
    Ok((id, crate::key::hex(cert.raw_serial())))
}

/// Checks that a certificate can be a trust anchor in a bundle: a CA that
/// may sign certificates.
pub(crate) fn check_authority(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(), Violation> {
    rules::check_signing_cert(cert)
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert(
    der: &[u8],
) -> Result<x509_parser::certificate::X509Certificate<'_>, X509Error> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(X509Error::Malformed(
            "trailing bytes after certificate".into(),
        )),
        Err(e) => Err(X509Error::Malformed(e.to_string())),
    }
}

/// Seconds since the Unix epoch, saturating at zero for earlier times.
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The `SystemTime` of a certificate validity bound.
pub(crate) fn asn1_to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    }
}
