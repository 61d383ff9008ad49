//! X509-SVID verification: RFC 5280 path validation (webpki) to the bundle of
//! the leaf's trust domain, plus the SPIFFE leaf and signing-certificate rules.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};

use super::{X509Error, asn1_to_system_time, parse_cert, rules};
use crate::bundle::BundleSource;
use crate::id::SpiffeId;
use crate::policy::X509_SIGNATURE_ALGORITHMS;

const OID_SERVER_AUTH: [usize; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 1];
const OID_CLIENT_AUTH: [usize; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 2];
const OID_ANY_EKU: [usize; 5] = [2, 5, 29, 37, 0];

/// Which extended key usage the leaf must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtendedKeyUsage {
    /// No constraint (go-spiffe's default for SVID verification).
    Any,
    /// The leaf authenticates a TLS client: if it lists EKUs, clientAuth is one.
    ClientAuth,
    /// The leaf authenticates a TLS server: if it lists EKUs, serverAuth is one.
    ServerAuth,
}

impl ExtendedKeyUsageValidator for ExtendedKeyUsage {
    fn validate(&self, mut iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let wanted: &[usize] = match self {
            Self::Any => return iter.try_for_each(|r| r.map(|_| ())),
            Self::ClientAuth => &OID_CLIENT_AUTH,
            Self::ServerAuth => &OID_SERVER_AUTH,
        };
        let mut present = Vec::new();
        for purpose in iter {
            let oid = purpose?.to_decoded_oid();
            if oid == wanted || oid == OID_ANY_EKU {
                return Ok(());
            }
            present.push(oid);
        }
        if present.is_empty() {
            return Ok(());
        }
        let required = match self {
            Self::ServerAuth => webpki::KeyUsage::server_auth(),
            _ => webpki::KeyUsage::client_auth(),
        };
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext { required, present },
        ))
    }
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedX509Svid {
    /// The leaf's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
}

/// Verifies an X509-SVID chain (leaf first, then intermediates) at `now`
/// against the bundle for the leaf's trust domain.
pub fn verify_x509_svid(
    chain: &[CertificateDer<'_>],
    bundles: &(impl BundleSource + ?Sized),
    usage: ExtendedKeyUsage,
    now: SystemTime,
) -> Result<VerifiedX509Svid, X509Error> {
    let (leaf_der, intermediates) = chain.split_first().ok_or(X509Error::EmptyChain)?;
    let leaf = parse_cert(leaf_der)?;
    let spiffe_id = rules::check_leaf(&leaf)?;
    for der in intermediates {
        rules::check_signing_cert(&parse_cert(der)?)?;
    }
    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .bundle_for(td)
        .ok_or_else(|| X509Error::NoBundle(td.to_string()))?;
    let anchors: Vec<_> = bundle
        .x509_authorities()
        .iter()
        .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
        .collect();
    let end_entity =
        EndEntityCert::try_from(leaf_der).map_err(|e| X509Error::Malformed(e.to_string()))?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| X509Error::Untrusted("clock before 1970".into()))?;
    end_entity
        .verify_for_usage(
            X509_SIGNATURE_ALGORITHMS,
            &anchors,
            intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => X509Error::Expired,
            webpki::Error::CertNotValidYet { .. } => X509Error::NotYetValid,
            other => X509Error::Untrusted(format!("{other:?}")),
        })?;
    Ok(VerifiedX509Svid {
        spiffe_id,
        not_after: asn1_to_system_time(leaf.validity().not_after),
    })
}
