//! Certificate templates: which fields an oxid certificate carries. Templates
//! take only values the issuer decided (entry, TTL, clock), never CSR content.

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;

use super::X509Error;
use crate::id::{SpiffeId, TrustDomain};

/// The organisation name in every oxid certificate subject.
const ORGANIZATION: &str = "oxid";

/// OID of the X.520 `serialNumber` attribute: puts the certificate serial in
/// the CA subject so every CA generation has a distinct subject.
const OID_DN_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];

/// The validity window of a certificate, already backdated and clamped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Validity {
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets; the top
/// bit is cleared so the DER INTEGER stays positive without padding).
pub(crate) fn random_serial() -> Result<[u8; 16], X509Error> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| X509Error::Generate("random generator failed".into()))?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

/// An X509-SVID leaf: one URI SAN, CA:FALSE, critical keyUsage
/// digitalSignature+keyEncipherment+keyAgreement, EKU serverAuth+clientAuth,
/// SKI and AKI.
pub(crate) fn x509_svid(
    id: &SpiffeId,
    dns_names: &[String],
    validity: Validity,
    serial: [u8; 16],
) -> Result<CertificateParams, X509Error> {
    let mut params = base(validity, serial);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    // X.520 caps a CN at 64 characters; a longer name stays a SAN only.
    if let Some(first) = dns_names.first().filter(|n| n.len() <= 64) {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    params.subject_alt_names.push(uri_san(id)?);
    for name in dns_names {
        if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
            return Err(X509Error::InvalidDnsName(name.clone()));
        }
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|_| X509Error::InvalidDnsName(name.clone()))?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// A CA certificate of `trust_domain`: CA:TRUE, critical keyUsage
/// keyCertSign+cRLSign, URI SAN `spiffe://<td>`, a subject unique to this
/// generation.
pub(crate) fn ca(
    trust_domain: &TrustDomain,
    validity: Validity,
    serial: [u8; 16],
) -> Result<CertificateParams, X509Error> {
    let mut params = base(validity, serial);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, format!("oxid CA {trust_domain}"));
    dn.push(
        DnType::CustomDnType(OID_DN_SERIAL_NUMBER.to_vec()),
        crate::key::hex(&serial),
    );
    params.distinguished_name = dn;
    params.subject_alt_names.push(uri_san(&trust_domain.id())?);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn base(validity: Validity, serial: [u8; 16]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    params
}

fn uri_san(id: &SpiffeId) -> Result<SanType, X509Error> {
    let ia5 = id
        .as_str()
        .try_into()
        .map_err(|_| X509Error::Generate(format!("SPIFFE ID {id} is not IA5")))?;
    Ok(SanType::URI(ia5))
}
