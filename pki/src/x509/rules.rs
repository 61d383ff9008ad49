//! The SPIFFE X.509 profile as checks on a parsed certificate.
//!
//! Two levels: what every X509-SVID must satisfy to be *accepted* (the SPIFFE
//! X509-SVID spec, used when verifying anyone's SVID), and the stricter profile
//! oxid *issues* (README, "What `oxid-pki` guarantees"), checked on our own output.

use std::time::SystemTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};

use crate::id::{IdError, SpiffeId, TrustDomain};

/// A SPIFFE rule a certificate breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// An X509-SVID must carry exactly one URI SAN.
    #[error("expected exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffeId(IdError),
    /// A leaf's SPIFFE ID has no path (that names a trust domain, not a workload).
    #[error("leaf SPIFFE ID {0} has no path")]
    TrustDomainIdInLeaf(String),
    /// An extension appears twice or its contents do not parse.
    #[error("extension {0} is duplicated or malformed")]
    BadExtension(&'static str),
    /// The basicConstraints extension is absent.
    #[error("basicConstraints extension is missing")]
    MissingBasicConstraints,
    /// A leaf claims to be a CA.
    #[error("leaf certificate has CA:TRUE")]
    LeafIsCa,
    /// The keyUsage extension is absent.
    #[error("keyUsage extension is missing")]
    MissingKeyUsage,
    /// keyUsage is present but not marked critical.
    #[error("keyUsage extension is not critical")]
    KeyUsageNotCritical,
    /// A leaf without digitalSignature.
    #[error("leaf keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    /// A leaf with keyCertSign: it could sign certificates.
    #[error("leaf keyUsage has keyCertSign")]
    LeafKeyCertSign,
    /// A leaf with cRLSign.
    #[error("leaf keyUsage has cRLSign")]
    LeafCrlSign,
    /// extendedKeyUsage absent or lacking serverAuth/clientAuth.
    #[error("extendedKeyUsage must contain serverAuth and clientAuth")]
    ExtendedKeyUsage,
    /// subjectKeyIdentifier absent.
    #[error("subjectKeyIdentifier extension is missing")]
    MissingSubjectKeyId,
    /// authorityKeyIdentifier absent.
    #[error("authorityKeyIdentifier extension is missing")]
    MissingAuthorityKeyId,
    /// A signing certificate without CA:TRUE.
    #[error("signing certificate is not a CA (basicConstraints CA:FALSE or missing)")]
    SignerNotCa,
    /// A signing certificate without keyCertSign.
    #[error("signing certificate keyUsage lacks keyCertSign")]
    SignerNoKeyCertSign,
    /// A CA certificate of ours lacking cRLSign.
    #[error("CA keyUsage lacks cRLSign")]
    CaNoCrlSign,
    /// A CA certificate whose URI SAN is not the trust domain's ID.
    #[error("CA URI SAN must be {expected}, found {found}")]
    CaWrongUri {
        /// The trust domain ID.
        expected: String,
        /// What the certificate holds.
        found: String,
    },
    /// The issued certificate names another SPIFFE ID than requested.
    #[error("certificate names {found}, expected {expected}")]
    WrongSpiffeId {
        /// The requested ID.
        expected: String,
        /// The ID in the certificate.
        found: String,
    },
    /// The issued certificate certifies another key than requested.
    #[error("certificate public key differs from the requested key")]
    WrongPublicKey,
    /// The issued certificate expires after its CA.
    #[error("certificate outlives its CA")]
    OutlivesCa,
    /// The issued certificate's issuer name differs from the CA's subject.
    #[error("certificate issuer name differs from the CA subject")]
    WrongIssuer,
    /// A signing certificate's SPIFFE ID has a path (only a leaf may).
    #[error("signing certificate SPIFFE ID {0} has a path")]
    SignerHasPath(String),
}

/// Checks the SPIFFE X509-SVID leaf rules and returns the leaf's SPIFFE ID.
pub(crate) fn check_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, Violation> {
    let id = single_uri_san(cert)?
        .parse::<SpiffeId>()
        .map_err(Violation::NotSpiffeId)?;
    if id.is_trust_domain_id() {
        return Err(Violation::TrustDomainIdInLeaf(id.to_string()));
    }
    if let Some((_, true)) = basic_constraints(cert)? {
        return Err(Violation::LeafIsCa);
    }
    let (_, ku) = key_usage(cert)?.ok_or(Violation::MissingKeyUsage)?;
    if !ku.digital_signature() {
        return Err(Violation::NoDigitalSignature);
    }
    if ku.key_cert_sign() {
        return Err(Violation::LeafKeyCertSign);
    }
    if ku.crl_sign() {
        return Err(Violation::LeafCrlSign);
    }
    Ok(id)
}

/// The profile oxid issues: the accepted rules plus critical keyUsage,
/// explicit CA:FALSE, serverAuth+clientAuth, SKI and AKI, the requested ID
/// and key, and a lifetime inside the CA's.
pub(crate) fn check_issued_leaf(
    cert: &X509Certificate<'_>,
    expected_id: &SpiffeId,
    expected_spki: &[u8],
    ca_not_after: SystemTime,
) -> Result<(), Violation> {
    let id = check_leaf(cert)?;
    if &id != expected_id {
        return Err(Violation::WrongSpiffeId {
            expected: expected_id.to_string(),
            found: id.to_string(),
        });
    }
    if basic_constraints(cert)?.is_none() {
        return Err(Violation::MissingBasicConstraints);
    }
    if let Some((false, _)) = key_usage(cert)? {
        return Err(Violation::KeyUsageNotCritical);
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|_| Violation::BadExtension("extendedKeyUsage"))?
        .ok_or(Violation::ExtendedKeyUsage)?;
    if !(eku.value.server_auth && eku.value.client_auth) {
        return Err(Violation::ExtendedKeyUsage);
    }
    check_key_ids(cert, true)?;
    if cert.public_key().raw != expected_spki {
        return Err(Violation::WrongPublicKey);
    }
    if super::asn1_to_system_time(cert.validity().not_after) > ca_not_after {
        return Err(Violation::OutlivesCa);
    }
    Ok(())
}

/// Rules for a certificate that signs others in an SVID chain. Its URI SAN,
/// if it has one naming a SPIFFE ID, must have no path.
pub(crate) fn check_signing_cert(cert: &X509Certificate<'_>) -> Result<(), Violation> {
    match basic_constraints(cert)? {
        Some((_, true)) => {}
        _ => return Err(Violation::SignerNotCa),
    }
    for uri in uri_sans(cert)? {
        if let Ok(id) = uri.parse::<SpiffeId>() {
            if !id.is_trust_domain_id() {
                return Err(Violation::SignerHasPath(id.to_string()));
            }
        }
    }
    match key_usage(cert)? {
        Some((_, ku)) if ku.key_cert_sign() => Ok(()),
        _ => Err(Violation::SignerNoKeyCertSign),
    }
}

/// The profile of CA certificates oxid issues for `trust_domain`.
pub(crate) fn check_issued_ca(
    cert: &X509Certificate<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), Violation> {
    check_signing_cert(cert)?;
    match key_usage(cert)? {
        Some((false, _)) => return Err(Violation::KeyUsageNotCritical),
        Some((true, ku)) if !ku.crl_sign() => return Err(Violation::CaNoCrlSign),
        _ => {}
    }
    let uri = single_uri_san(cert)?;
    let expected = trust_domain.id();
    if uri != expected.as_str() {
        return Err(Violation::CaWrongUri {
            expected: expected.to_string(),
            found: uri.to_owned(),
        });
    }
    // A self-signed root needs no AKI; an intermediate does.
    let self_signed = cert.subject() == cert.issuer();
    check_key_ids(cert, !self_signed)
}

fn check_key_ids(cert: &X509Certificate<'_>, need_aki: bool) -> Result<(), Violation> {
    let has = |oid: &x509_parser::der_parser::oid::Oid<'_>, name| {
        cert.get_extension_unique(oid)
            .map(|e| e.is_some())
            .map_err(|_| Violation::BadExtension(name))
    };
    if !has(&OID_X509_EXT_SUBJECT_KEY_IDENTIFIER, "subjectKeyIdentifier")? {
        return Err(Violation::MissingSubjectKeyId);
    }
    if need_aki
        && !has(
            &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
            "authorityKeyIdentifier",
        )?
    {
        return Err(Violation::MissingAuthorityKeyId);
    }
    Ok(())
}

/// The issued certificate names the CA (whose subject DER is given) as issuer.
pub(crate) fn check_issuer_name(
    cert: &X509Certificate<'_>,
    ca_subject: &[u8],
) -> Result<(), Violation> {
    if cert.issuer().as_raw() == ca_subject {
        Ok(())
    } else {
        Err(Violation::WrongIssuer)
    }
}

/// Every URI SAN of the certificate.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, Violation> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| Violation::BadExtension("subjectAltName"))?;
    Ok(san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect())
}

/// The only URI SAN of the certificate.
fn single_uri_san<'a>(cert: &'a X509Certificate<'_>) -> Result<&'a str, Violation> {
    let uris = uri_sans(cert)?;
    match uris.as_slice() {
        [uri] => Ok(uri),
        other => Err(Violation::UriSanCount(other.len())),
    }
}

/// `(critical, ca)` of basicConstraints, if present. A present but
/// unparseable extension is an error, never "absent".
fn basic_constraints(cert: &X509Certificate<'_>) -> Result<Option<(bool, bool)>, Violation> {
    let bad = Violation::BadExtension("basicConstraints");
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_BASIC_CONSTRAINTS)
        .map_err(|_| bad.clone())?;
    match ext {
        None => Ok(None),
        Some(ext) => match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => Ok(Some((ext.critical, bc.ca))),
            _ => Err(bad),
        },
    }
}

/// `(critical, usage)` of keyUsage, if present.
fn key_usage(
    cert: &X509Certificate<'_>,
) -> Result<Option<(bool, x509_parser::extensions::KeyUsage)>, Violation> {
    let bad = Violation::BadExtension("keyUsage");
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_KEY_USAGE)
        .map_err(|_| bad.clone())?;
    match ext {
        None => Ok(None),
        Some(ext) => match ext.parsed_extension() {
            ParsedExtension::KeyUsage(ku) => Ok(Some((ext.critical, *ku))),
            _ => Err(bad),
        },
    }
}

#[cfg(test)]
mod tests {
    //! The output checks must fail closed: each case a template bug could
    //! produce is refused.

    use std::time::{Duration, SystemTime};

    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
        KeyUsagePurpose, SanType,
    };

    use super::*;
    use crate::{KeyAlgorithm, KeyPair};

    const WEB: &str = "spiffe://example.org/web";

    fn good() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_after = (SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)).into();
        p
    }

    /// Self-signs `p` and runs `check_issued_leaf` with the expected values.
    fn issued(p: &CertificateParams) -> Result<(), Violation> {
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let cert = crate::x509::parse_cert(&der).unwrap();
        let ca_not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(3_000_000_000);
        check_issued_leaf(
            &cert,
            &WEB.parse().unwrap(),
            key.public_key_spki(),
            ca_not_after,
        )
    }

    #[test]
    fn the_good_template_passes() {
        issued(&good()).unwrap();
    }

    #[test]
    fn wrong_id_key_or_lifetime_is_refused() {
        let mut p = good();
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org/db".try_into().unwrap())];
        assert!(matches!(issued(&p), Err(Violation::WrongSpiffeId { .. })));

        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let other = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let der = good().self_signed(&key).unwrap().der().to_vec();
        let cert = crate::x509::parse_cert(&der).unwrap();
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(3_000_000_000);
        assert_eq!(
            check_issued_leaf(&cert, &WEB.parse().unwrap(), other.public_key_spki(), far),
            Err(Violation::WrongPublicKey)
        );
        let soon = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            check_issued_leaf(&cert, &WEB.parse().unwrap(), key.public_key_spki(), soon),
            Err(Violation::OutlivesCa)
        );
    }

    #[test]
    fn missing_profile_extensions_are_refused() {
        let mut p = good();
        p.is_ca = IsCa::NoCa;
        assert_eq!(issued(&p), Err(Violation::MissingBasicConstraints));
        let mut p = good();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        assert_eq!(issued(&p), Err(Violation::ExtendedKeyUsage));
        let mut p = good();
        p.extended_key_usages.clear();
        assert_eq!(issued(&p), Err(Violation::ExtendedKeyUsage));
        let mut p = good();
        p.use_authority_key_identifier_extension = false;
        assert_eq!(issued(&p), Err(Violation::MissingAuthorityKeyId));
    }

    #[test]
    fn non_critical_key_usage_is_refused() {
        let mut p = good();
        p.key_usages.clear();
        // keyUsage digitalSignature, not critical: BIT STRING 0x80.
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[2, 5, 29, 15],
            vec![0x03, 0x02, 0x07, 0x80],
        )];
        assert_eq!(issued(&p), Err(Violation::KeyUsageNotCritical));
    }

    #[test]
    fn malformed_extensions_are_errors_never_absent() {
        for oid in [[2u64, 5, 29, 19], [2, 5, 29, 15], [2, 5, 29, 17]] {
            let mut p = good();
            match oid[3] {
                19 => p.is_ca = IsCa::NoCa,
                15 => p.key_usages.clear(),
                _ => p.subject_alt_names.clear(),
            }
            let mut junk = CustomExtension::from_oid_content(&oid, vec![0x04, 0x01, 0xff]);
            junk.set_criticality(true);
            p.custom_extensions = vec![junk];
            let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
            let der = p.self_signed(&key).unwrap().der().to_vec();
            let cert = crate::x509::parse_cert(&der).unwrap();
            assert!(
                matches!(check_leaf(&cert), Err(Violation::BadExtension(_))),
                "{oid:?}: {:?}",
                check_leaf(&cert)
            );
        }
    }

    #[test]
    fn signing_certificates_need_key_cert_sign_and_no_path() {
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::CrlSign];
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            check_signing_cert(&crate::x509::parse_cert(&der).unwrap()),
            Err(Violation::SignerNoKeyCertSign)
        );
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert!(matches!(
            check_signing_cert(&crate::x509::parse_cert(&der).unwrap()),
            Err(Violation::SignerHasPath(_))
        ));
    }
}
