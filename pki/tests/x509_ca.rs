//! X.509 CA and X509-SVID issuance, against every leaf and CA rule of the
//! wire contract (README, "What `oxid-pki` guarantees").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use oxid_pki::x509::{
    BACKDATE, Csr, ExtendedKeyUsage, PublicKey, SvidParams, Violation, X509Ca, X509Error,
    certs_from_pem, certs_to_pem, split_der_certs, verify_x509_svid,
};
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId, bundle::Bundle};
use rcgen::{BasicConstraints, CertificateParams, IsCa, SanType};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;

use common::{HOUR, id, now, root_ca, td, workload_key};

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

fn parsed(der: &[u8]) -> X509Certificate<'_> {
    parse_x509_certificate(der).unwrap().1
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn bundle_of(ca: &X509Ca) -> Bundle {
    let mut b = Bundle::new(ca.trust_domain().clone());
    b.add_x509_authority(ca.root().clone()).unwrap();
    b
}

// ---------- CA certificates ----------

#[test]
fn root_ca_follows_the_ca_profile() {
    let ca = root_ca("example.org", 24 * HOUR);
    let cert = parsed(ca.cert());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.value.ca);
    assert!(bc.critical);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical, "CA keyUsage must be critical");
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(uri_sans(&cert), ["spiffe://example.org"]);
    assert!(
        cert.get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .unwrap()
            .is_some()
    );
    assert_eq!(cert.subject(), cert.issuer(), "a root is self-signed");
    assert!(
        ca.intermediates().is_empty(),
        "an SVID chain never carries the root"
    );
    assert_eq!(ca.root(), ca.cert());
}

#[test]
fn every_ca_generation_has_unique_subject_and_key_ids() {
    let a = root_ca("example.org", HOUR);
    let b = root_ca("example.org", HOUR);
    let (pa, pb) = (parsed(a.cert()), parsed(b.cert()));
    assert_ne!(pa.subject().to_string(), pb.subject().to_string());
    let ski = |c: &X509Certificate<'_>| {
        c.get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .unwrap()
            .unwrap()
            .value
            .to_vec()
    };
    assert_ne!(ski(&pa), ski(&pb));
    assert_ne!(pa.raw_serial(), pb.raw_serial());
}

#[test]
fn ca_validity_is_backdated_and_bounded_by_ttl() {
    let t = now();
    let ca = X509Ca::new_root(td("example.org"), workload_key(), 24 * HOUR, t).unwrap();
    let cert = parsed(ca.cert());
    let secs = |d: SystemTime| d.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(cert.validity().not_before.timestamp(), secs(t - BACKDATE));
    assert_eq!(cert.validity().not_after.timestamp(), secs(t + 24 * HOUR));
    assert_eq!(secs(ca.not_after()), secs(t + 24 * HOUR));
}

#[test]
fn p384_ca_issues_p256_svids() {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP384).unwrap();
    let ca = X509Ca::new_root(td("example.org"), key, HOUR, now()).unwrap();
    let chain = issue(&ca, &id("spiffe://example.org/web"), HOUR, now());
    let v = verify_x509_svid(&chain, &bundle_of(&ca), ExtendedKeyUsage::ClientAuth, now()).unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/web");
}

#[test]
fn intermediate_chain_is_leaf_then_intermediate_never_root() {
    let upstream = root_ca("example.org", 48 * HOUR);
    let inter = X509Ca::new_intermediate(
        &upstream,
        td("example.org"),
        workload_key(),
        24 * HOUR,
        now(),
    )
    .unwrap();
    assert_eq!(inter.intermediates(), &[inter.cert().clone()]);
    assert_eq!(inter.root(), upstream.cert());
    let p = parsed(inter.cert());
    assert_eq!(p.issuer(), parsed(upstream.cert()).subject());
    assert!(
        p.get_extension_unique(&oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .unwrap()
            .is_some()
    );
    let chain = issue(&inter, &id("spiffe://example.org/web"), HOUR, now());
    assert_eq!(chain.len(), 2);
    assert_eq!(&chain[1], inter.cert());
    assert!(!chain.contains(upstream.cert()));
    let bundle = bundle_of(&inter);
    assert_eq!(bundle.x509_authorities(), &[upstream.cert().clone()]);
    verify_x509_svid(&chain, &bundle, ExtendedKeyUsage::ServerAuth, now()).unwrap();
}

#[test]
fn intermediate_never_outlives_its_upstream() {
    let upstream = root_ca("example.org", HOUR);
    let inter = X509Ca::new_intermediate(
        &upstream,
        td("example.org"),
        workload_key(),
        24 * HOUR,
        now(),
    )
    .unwrap();
    assert_eq!(inter.not_after(), upstream.not_after());
}

#[test]
fn upstream_ca_loads_from_files_and_checks_key_and_permissions() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let upstream = root_ca("corp.example", 48 * HOUR);
    let cert_path = dir.path().join("upstream.pem");
    let key_path = dir.path().join("upstream.key");
    std::fs::write(&cert_path, certs_to_pem([upstream.cert()])).unwrap();
    upstream.key().store(&key_path).unwrap();

    let loaded = X509Ca::load_upstream(td("example.org"), &cert_path, &key_path).unwrap();
    let inter =
        X509Ca::new_intermediate(&loaded, td("example.org"), workload_key(), HOUR, now()).unwrap();
    let chain = issue(&inter, &id("spiffe://example.org/db"), HOUR, now());
    verify_x509_svid(&chain, &bundle_of(&inter), ExtendedKeyUsage::Any, now()).unwrap();

    // A key that is not the certificate's.
    let other_key = dir.path().join("other.key");
    workload_key().store(&other_key).unwrap();
    assert!(matches!(
        X509Ca::load_upstream(td("example.org"), &cert_path, &other_key),
        Err(X509Error::KeyMismatch)
    ));
    // A key file others can read.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = X509Ca::load_upstream(td("example.org"), &cert_path, &key_path).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    // A file without certificates.
    std::fs::write(&cert_path, "not pem").unwrap();
    assert!(X509Ca::load_upstream(td("example.org"), &cert_path, &other_key).is_err());
    // A missing file names the path.
    let err = X509Ca::load_upstream(td("example.org"), &dir.path().join("nope.pem"), &other_key)
        .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[test]
fn a_leaf_certificate_cannot_be_loaded_as_a_ca() {
    let ca = root_ca("example.org", HOUR);
    let key = workload_key();
    let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    let svid = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &id("spiffe://example.org/web"),
                public_key: &pk,
                ttl: HOUR,
                dns_names: &[],
            },
            now(),
        )
        .unwrap();
    let err = X509Ca::restore(td("example.org"), svid.cert_chain().to_vec(), key).unwrap_err();
    assert!(matches!(err, X509Error::NotACa(_)), "{err}");
}

// ---------- X509-SVID issuance ----------

#[test]
fn issued_svid_follows_every_leaf_rule() {
    let ca = root_ca("example.org", 24 * HOUR);
    let t = now();
    let key = workload_key();
    let csr = Csr::parse(&Csr::create(&key).unwrap()).unwrap();
    let dns = vec!["web.example.org".to_owned(), "web".to_owned()];
    let svid = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &id("spiffe://example.org/ns/prod/web"),
                public_key: csr.public_key(),
                ttl: HOUR,
                dns_names: &dns,
            },
            t,
        )
        .unwrap();
    assert_eq!(
        svid.cert_chain().len(),
        1,
        "root CA: the chain is the leaf alone"
    );
    let cert = parsed(svid.leaf());

    assert_eq!(uri_sans(&cert), ["spiffe://example.org/ns/prod/web"]);
    let dns_sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dns_sans, dns);
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cn, "web.example.org");

    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "CA:FALSE");
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage critical");
    assert!(ku.value.digital_signature());
    assert!(ku.value.key_encipherment());
    assert!(ku.value.key_agreement());
    assert!(!ku.value.key_cert_sign());
    assert!(!ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    for oid in [
        oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
    ] {
        assert!(cert.get_extension_unique(&oid).unwrap().is_some(), "{oid}");
    }
    let secs = |d: SystemTime| d.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(cert.validity().not_before.timestamp(), secs(t - BACKDATE));
    assert_eq!(cert.validity().not_after.timestamp(), secs(t + HOUR));
    assert_eq!(secs(svid.not_after()), secs(t + HOUR));
    assert_eq!(cert.public_key().raw, key.public_key_spki());
    assert_eq!(cert.issuer(), parsed(ca.cert()).subject());
}

#[test]
fn svid_lifetime_is_clamped_to_the_ca() {
    let t = now();
    let ca = X509Ca::new_root(td("example.org"), workload_key(), HOUR, t).unwrap();
    let chain = issue(&ca, &id("spiffe://example.org/web"), 10 * HOUR, t);
    assert_eq!(
        parsed(&chain[0]).validity().not_after.timestamp(),
        parsed(ca.cert()).validity().not_after.timestamp()
    );
}

#[test]
fn serials_are_unique_and_positive() {
    let ca = root_ca("example.org", HOUR);
    let mut serials = std::collections::HashSet::new();
    for _ in 0..50 {
        let chain = issue(&ca, &id("spiffe://example.org/web"), HOUR, now());
        let cert = parsed(&chain[0]);
        assert!(cert.raw_serial()[0] & 0x80 == 0, "serial must be positive");
        assert!(serials.insert(cert.raw_serial().to_vec()));
    }
}

#[test]
fn issuance_refuses_what_the_ca_must_not_sign() {
    let t = now();
    let ca = X509Ca::new_root(td("example.org"), workload_key(), HOUR, t).unwrap();
    let key = workload_key();
    let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    let try_issue = |spiffe_id: &SpiffeId, ttl, dns: &[String], at| {
        ca.issue_x509_svid(
            &SvidParams {
                spiffe_id,
                public_key: &pk,
                ttl,
                dns_names: dns,
            },
            at,
        )
    };
    let web = id("spiffe://example.org/web");
    assert!(matches!(
        try_issue(&id("spiffe://other.org/web"), HOUR, &[], t),
        Err(X509Error::BadSpiffeId { .. })
    ));
    assert!(matches!(
        try_issue(&id("spiffe://example.org"), HOUR, &[], t),
        Err(X509Error::BadSpiffeId { .. })
    ));
    assert!(matches!(
        try_issue(&web, Duration::ZERO, &[], t),
        Err(X509Error::ZeroTtl)
    ));
    assert!(matches!(
        try_issue(&web, HOUR, &[], t + 2 * HOUR),
        Err(X509Error::CaNotValid)
    ));
    assert!(matches!(
        try_issue(&web, HOUR, &[], t - HOUR),
        Err(X509Error::CaNotValid)
    ));
    for bad in ["bad name", "", "a..b", "-x.example", "é.example"] {
        assert!(
            matches!(
                try_issue(&web, HOUR, &[bad.to_owned()], t),
                Err(X509Error::InvalidDnsName(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn the_spiffe_id_comes_from_the_caller_never_from_the_csr() {
    // A CSR asking for another identity: its names are ignored.
    let ca = root_ca("example.org", HOUR);
    let key = workload_key();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr_der = params.serialize_request(&key).unwrap().der().to_vec();
    let csr = Csr::parse(&csr_der).unwrap();
    let svid = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &id("spiffe://example.org/web"),
                public_key: csr.public_key(),
                ttl: HOUR,
                dns_names: &[],
            },
            now(),
        )
        .unwrap();
    let cert = parsed(svid.leaf());
    assert_eq!(uri_sans(&cert), ["spiffe://example.org/web"]);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
}

#[test]
fn csr_key_types_are_policed() {
    let ca = root_ca("example.org", HOUR);
    let p384 = KeyPair::generate(KeyAlgorithm::EcdsaP384).unwrap();
    let csr = Csr::parse(&Csr::create(&p384).unwrap()).unwrap();
    let chain = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &id("spiffe://example.org/web"),
                public_key: csr.public_key(),
                ttl: HOUR,
                dns_names: &[],
            },
            now(),
        )
        .unwrap()
        .into_cert_chain();
    verify_x509_svid(&chain, &bundle_of(&ca), ExtendedKeyUsage::Any, now()).unwrap();
}

// ---------- encodings ----------

#[test]
fn der_concatenation_and_pem_round_trip() {
    let upstream = root_ca("example.org", 48 * HOUR);
    let inter = X509Ca::new_intermediate(&upstream, td("example.org"), workload_key(), HOUR, now())
        .unwrap();
    let chain = issue(&inter, &id("spiffe://example.org/web"), HOUR, now());
    let concat = oxid_pki::x509::concat_der(&chain);
    assert_eq!(split_der_certs(&concat).unwrap(), chain);
    assert_eq!(
        certs_from_pem(certs_to_pem(&chain).as_bytes()).unwrap(),
        chain
    );
    assert!(split_der_certs(&concat[..concat.len() - 1]).is_err());
    assert!(matches!(split_der_certs(&[]), Err(X509Error::EmptyChain)));
    assert!(matches!(certs_from_pem(b""), Err(X509Error::NoCertificate)));
}

#[test]
fn absurd_ttls_are_errors_not_panics() {
    let err = X509Ca::new_root(
        td("example.org"),
        workload_key(),
        Duration::from_secs(20_000 * 365 * 86_400),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, X509Error::TtlTooLong), "{err}");
    assert!(matches!(
        X509Ca::new_root(td("example.org"), workload_key(), Duration::MAX, now()),
        Err(X509Error::TtlTooLong)
    ));
}

#[test]
fn restore_checks_the_trust_domain_and_the_chain() {
    let ca = root_ca("example.org", HOUR);
    let key = KeyPair::from_pkcs8_der(ca.key().pkcs8_der()).unwrap();
    let err = X509Ca::restore(td("other.org"), ca.chain().to_vec(), key).unwrap_err();
    assert!(
        matches!(err, X509Error::Rule(Violation::CaWrongUri { .. })),
        "{err}"
    );
    // An intermediate followed by an unrelated root: the chain does not link.
    let upstream = root_ca("example.org", 2 * HOUR);
    let inter = X509Ca::new_intermediate(&upstream, td("example.org"), workload_key(), HOUR, now())
        .unwrap();
    let stranger = root_ca("example.org", HOUR);
    let key = KeyPair::from_pkcs8_der(inter.key().pkcs8_der()).unwrap();
    let err = X509Ca::restore(
        td("example.org"),
        vec![inter.cert().clone(), stranger.cert().clone()],
        key,
    )
    .unwrap_err();
    assert!(matches!(err, X509Error::UnusableChain(_)), "{err}");
    let key = KeyPair::from_pkcs8_der(inter.key().pkcs8_der()).unwrap();
    X509Ca::restore(td("example.org"), inter.chain().to_vec(), key).unwrap();
}
