//! X509-SVID verification: path validation plus every SPIFFE leaf rule,
//! each shown with a crafted bad certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use oxid_pki::x509::{
    BACKDATE, Csr, ExtendedKeyUsage, PublicKey, SvidParams, Violation, X509Ca, X509Error,
    verify_x509_svid,
};
use oxid_pki::{KeyPair, SpiffeId, bundle::Bundle};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;

use common::{HOUR, id, now, root_ca, workload_key};

fn issue(
    ca: &X509Ca,
    spiffe_id: &SpiffeId,
    ttl: Duration,
    at: SystemTime,
) -> Vec<CertificateDer<'static>> {
    let key = workload_key();
    let csr = Csr::parse(&Csr::create(&key).unwrap()).unwrap();
    ca.issue_x509_svid(
        &SvidParams {
            spiffe_id,
            public_key: csr.public_key(),
            ttl,
            dns_names: &[],
        },
        at,
    )
    .unwrap()
    .into_cert_chain()
}

fn bundle_of(ca: &X509Ca) -> Bundle {
    let mut b = Bundle::new(ca.trust_domain().clone());
    b.add_x509_authority(ca.root().clone()).unwrap();
    b
}

// ---------- verification ----------

/// Builds a leaf signed by `ca` from a good template changed by `edit`.
fn craft(ca: &X509Ca, edit: impl FnOnce(&mut CertificateParams)) -> Vec<CertificateDer<'static>> {
    let signer = KeyPair::from_pkcs8_der(ca.key().pkcs8_der()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.cert(), signer).unwrap();
    let t = now();
    let mut p = CertificateParams::default();
    p.not_before = (t - BACKDATE).into();
    p.not_after = (t + HOUR).into();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "test");
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org/web".try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    edit(&mut p);
    let leaf_key = workload_key();
    let leaf = p.signed_by(&leaf_key, &issuer).unwrap();
    let mut chain = vec![leaf.der().clone()];
    chain.extend(ca.intermediates().iter().cloned());
    chain
}

fn verify(chain: &[CertificateDer<'_>], ca: &X509Ca) -> Result<SpiffeId, X509Error> {
    verify_x509_svid(chain, &bundle_of(ca), ExtendedKeyUsage::Any, now()).map(|v| v.spiffe_id)
}

#[test]
fn crafted_good_leaf_verifies() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |_| {});
    assert_eq!(
        verify(&chain, &ca).unwrap().as_str(),
        "spiffe://example.org/web"
    );
}

#[test]
fn leaf_with_two_uri_sans_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/other".try_into().unwrap(),
        ))
    });
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::UriSanCount(2)))
    ));
}

#[test]
fn leaf_without_uri_san_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| {
        p.subject_alt_names = vec![SanType::DnsName("web.example.org".try_into().unwrap())]
    });
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::UriSanCount(0)))
    ));
}

#[test]
fn leaf_with_a_non_spiffe_uri_is_refused() {
    let ca = root_ca("example.org", HOUR);
    for uri in [
        "https://example.org/web",
        "spiffe://EXAMPLE.org/web",
        "spiffe://example.org/a/",
    ] {
        let chain = craft(&ca, |p| {
            p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())]
        });
        assert!(
            matches!(
                verify(&chain, &ca),
                Err(X509Error::Rule(Violation::NotSpiffeId(_)))
            ),
            "{uri}"
        );
    }
}

#[test]
fn leaf_naming_the_trust_domain_itself_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())]
    });
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::TrustDomainIdInLeaf(_)))
    ));
}

#[test]
fn ca_leaf_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::LeafIsCa))
    ));
}

#[test]
fn leaf_without_key_usage_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| p.key_usages.clear());
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::MissingKeyUsage))
    ));
}

#[test]
fn leaf_without_digital_signature_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
    });
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::NoDigitalSignature))
    ));
}

#[test]
fn leaf_with_key_cert_sign_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::LeafKeyCertSign))
    ));
}

#[test]
fn leaf_with_crl_sign_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| p.key_usages.push(KeyUsagePurpose::CrlSign));
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::LeafCrlSign))
    ));
}

#[test]
fn expired_leaf_is_refused() {
    let ca = root_ca("example.org", 48 * HOUR);
    let chain = craft(&ca, |p| {
        p.not_before = (now() - 3 * HOUR).into();
        p.not_after = (now() - HOUR).into();
    });
    assert!(matches!(verify(&chain, &ca), Err(X509Error::Expired)));
}

#[test]
fn not_yet_valid_leaf_is_refused() {
    let ca = root_ca("example.org", 48 * HOUR);
    let chain = craft(&ca, |p| p.not_before = (now() + HOUR).into());
    assert!(matches!(verify(&chain, &ca), Err(X509Error::NotYetValid)));
}

#[test]
fn verification_time_is_the_callers() {
    let ca = root_ca("example.org", 48 * HOUR);
    let chain = issue(&ca, &id("spiffe://example.org/web"), HOUR, now());
    let b = bundle_of(&ca);
    verify_x509_svid(&chain, &b, ExtendedKeyUsage::Any, now() + HOUR / 2).unwrap();
    assert!(matches!(
        verify_x509_svid(&chain, &b, ExtendedKeyUsage::Any, now() + 2 * HOUR),
        Err(X509Error::Expired)
    ));
}

#[test]
fn leaf_of_another_trust_domain_finds_no_bundle() {
    let ca = root_ca("example.org", HOUR);
    let chain = craft(&ca, |p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://other.org/web".try_into().unwrap())]
    });
    assert!(matches!(verify(&chain, &ca), Err(X509Error::NoBundle(td)) if td == "other.org"));
}

#[test]
fn leaf_claiming_our_trust_domain_from_a_foreign_ca_is_untrusted() {
    // other.org's CA signs a leaf naming example.org: the example.org bundle
    // does not hold that CA, so path validation fails.
    let ours = root_ca("example.org", HOUR);
    let theirs = root_ca("other.org", HOUR);
    let chain = craft(&theirs, |_| {});
    assert!(matches!(
        verify(&chain, &ours),
        Err(X509Error::Untrusted(_))
    ));
}

#[test]
fn unknown_issuer_is_untrusted() {
    let ca = root_ca("example.org", HOUR);
    let stranger = root_ca("example.org", HOUR);
    let chain = issue(&stranger, &id("spiffe://example.org/web"), HOUR, now());
    let err = verify(&chain, &ca).unwrap_err();
    assert!(
        matches!(&err, X509Error::Untrusted(m) if m.contains("UnknownIssuer")),
        "{err}"
    );
}

#[test]
fn tampered_leaf_is_untrusted() {
    let ca = root_ca("example.org", HOUR);
    let mut chain = issue(&ca, &id("spiffe://example.org/web"), HOUR, now());
    let mut der = chain[0].to_vec();
    let last = der.len() - 1;
    der[last] ^= 1;
    chain[0] = CertificateDer::from(der);
    assert!(matches!(verify(&chain, &ca), Err(X509Error::Untrusted(_))));
}

#[test]
fn intermediate_without_ca_flag_is_refused() {
    // A leaf signed by another leaf: the "intermediate" is not a CA.
    let ca = root_ca("example.org", HOUR);
    let signer_key = workload_key();
    let pk = PublicKey::from_spki_der(signer_key.public_key_spki()).unwrap();
    let fake_intermediate = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &id("spiffe://example.org/evil"),
                public_key: &pk,
                ttl: HOUR,
                dns_names: &[],
            },
            now(),
        )
        .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(fake_intermediate.leaf(), signer_key).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/victim".try_into().unwrap(),
    )];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = (now() - BACKDATE).into();
    p.not_after = (now() + HOUR).into();
    let leaf = p.signed_by(&workload_key(), &issuer).unwrap();
    let chain = vec![leaf.der().clone(), fake_intermediate.leaf().clone()];
    assert!(matches!(
        verify(&chain, &ca),
        Err(X509Error::Rule(Violation::SignerNotCa))
    ));
}

#[test]
fn extended_key_usage_is_enforced_when_asked() {
    let ca = root_ca("example.org", HOUR);
    let server_only = craft(&ca, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
    });
    let b = bundle_of(&ca);
    verify_x509_svid(&server_only, &b, ExtendedKeyUsage::ServerAuth, now()).unwrap();
    verify_x509_svid(&server_only, &b, ExtendedKeyUsage::Any, now()).unwrap();
    assert!(matches!(
        verify_x509_svid(&server_only, &b, ExtendedKeyUsage::ClientAuth, now()),
        Err(X509Error::Untrusted(_))
    ));
    // No EKU at all: any usage is allowed.
    let none = craft(&ca, |p| p.extended_key_usages.clear());
    verify_x509_svid(&none, &b, ExtendedKeyUsage::ClientAuth, now()).unwrap();
}

#[test]
fn empty_and_garbage_chains_are_refused() {
    let ca = root_ca("example.org", HOUR);
    assert!(matches!(verify(&[], &ca), Err(X509Error::EmptyChain)));
    let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff])];
    assert!(matches!(
        verify(&garbage, &ca),
        Err(X509Error::Malformed(_))
    ));
    let mut trailing = issue(&ca, &id("spiffe://example.org/web"), HOUR, now())[0].to_vec();
    trailing.push(0);
    assert!(matches!(
        verify(&[CertificateDer::from(trailing)], &ca),
        Err(X509Error::Malformed(_))
    ));
}
