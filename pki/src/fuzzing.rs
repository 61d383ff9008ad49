//! Invariant checks over untrusted bytes, shared by the cargo-fuzz targets in
//! `fuzz/` and the corpus replay test, so CI runs what the fuzzers run.
//!
//! Each function panics only when an invariant breaks: a parse that
//! succeeds must round-trip, and nothing may panic on any input.

// Panicking on a broken invariant is how a fuzz oracle reports it.
#![allow(clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::bundle::Bundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::jwt::{JwtSigner, verify_jwt_svid};
use crate::key::{KeyAlgorithm, KeyPair};
use crate::x509::{Csr, ExtendedKeyUsage, SvidParams, X509Ca, verify_x509_svid};

/// SPIFFE ID and trust domain parsing: print(parse(s)) == s, and parse again
/// gives the same value.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = s.parse::<SpiffeId>() {
        assert_eq!(id.to_string(), s);
        let again: SpiffeId = id.to_string().parse().expect("printed ID reparses");
        assert_eq!(again, id);
        assert!(id.as_str().len() <= crate::id::MAX_SPIFFE_ID_LEN);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain(), id.path()),
            s,
            "trust domain and path split"
        );
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(td.to_string(), s);
        assert_eq!(td.id().trust_domain(), &td);
    }
    let _ = s.parse::<TrustDomain>();
}

struct JwtFixture {
    bundle: Bundle,
    signer: JwtSigner,
}

fn jwt_fixture() -> &'static JwtFixture {
    static FIXTURE: OnceLock<JwtFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let td = TrustDomain::new("example.org").expect("literal trust domain");
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).expect("key generation");
        let signer = JwtSigner::new(
            td.clone(),
            key,
            "fuzz",
            None,
            SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        )
        .expect("signer");
        let mut bundle = Bundle::new(td);
        bundle
            .add_jwt_authority(signer.authority().clone())
            .expect("authority");
        JwtFixture { bundle, signer }
    })
}

/// JWT-SVID verification never panics; a token that verifies has a workload
/// subject and the expected audience. Also mints a token whose claims come
/// from the input and checks that it verifies.
pub fn jwt(data: &[u8]) {
    let fx = jwt_fixture();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let token = String::from_utf8_lossy(data);
    if let Ok(v) = verify_jwt_svid(&token, &fx.bundle, "fuzz", now) {
        assert!(!v.spiffe_id.is_trust_domain_id());
        assert!(v.audiences.iter().any(|a| a == "fuzz"));
    }
    // Mint with input-derived audience and path; a mint that succeeds must verify.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(2, '\n');
    let path = parts.next().unwrap_or_default();
    let audience = parts.next().unwrap_or("fuzz").to_owned();
    if let Ok(id) = fx.bundle.trust_domain().spiffe_id(&format!("/{path}")) {
        if let Ok(svid) = fx.signer.mint(
            &id,
            std::slice::from_ref(&audience),
            Duration::from_secs(60),
            now,
        ) {
            let v = verify_jwt_svid(&svid.token, &fx.bundle, &audience, now)
                .expect("a minted token verifies");
            assert_eq!(v.spiffe_id, id);
        }
    }
}

/// Bundle decoding never panics, and decode(encode(b)) == b for the SPIFFE
/// format; likewise for the plain JWKS.
pub fn bundle(data: &[u8]) {
    let td = TrustDomain::new("example.org").expect("literal trust domain");
    if let Ok(b) = Bundle::from_spiffe_json(td.clone(), data) {
        let again = Bundle::from_spiffe_json(td.clone(), b.to_spiffe_json().as_bytes())
            .expect("encoded bundle decodes");
        assert_eq!(again, b);
    }
    if let Ok(b) = Bundle::from_jwks_json(td.clone(), data) {
        let again =
            Bundle::from_jwks_json(td, b.to_jwks_json().as_bytes()).expect("encoded JWKS decodes");
        assert_eq!(
            again.jwt_authorities().collect::<Vec<_>>(),
            b.jwt_authorities().collect::<Vec<_>>()
        );
    }
}

fn ca_fixture() -> &'static X509Ca {
    static CA: OnceLock<X509Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let td = TrustDomain::new("example.org").expect("literal trust domain");
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).expect("key generation");
        X509Ca::new_root(
            td,
            key,
            Duration::from_secs(86400 * 365 * 50),
            SystemTime::now(),
        )
        .expect("root CA")
    })
}

/// CSR parsing never panics; an accepted CSR's key can be certified, and the
/// certificate names the entry's ID (never one from the CSR).
pub fn csr(data: &[u8]) {
    if let Ok(csr) = Csr::parse(data) {
        let ca = ca_fixture();
        let id = ca.trust_domain().spiffe_id("/fuzz").expect("literal path");
        let svid = ca
            .issue_x509_svid(
                &SvidParams {
                    spiffe_id: &id,
                    public_key: csr.public_key(),
                    ttl: Duration::from_secs(60),
                    dns_names: &[],
                },
                SystemTime::now(),
            )
            .expect("an accepted CSR key can be certified");
        assert_eq!(svid.spiffe_id(), &id);
    }
}

/// X.509 chain verification never panics on any bytes (split as the Workload
/// API's concatenated DER, then verified against a fixed bundle); a chain
/// that verifies names a workload of the bundle's trust domain.
pub fn x509_chain(data: &[u8]) {
    let ca = ca_fixture();
    let mut bundle = Bundle::new(ca.trust_domain().clone());
    bundle
        .add_x509_authority(ca.root().clone())
        .expect("fixture root is an authority");
    let Ok(chain) = crate::x509::split_der_certs(data) else {
        return;
    };
    let now = SystemTime::now();
    for usage in [ExtendedKeyUsage::Any, ExtendedKeyUsage::ClientAuth] {
        if let Ok(v) = verify_x509_svid(&chain, &bundle, usage, now) {
            assert!(v.spiffe_id.is_member_of(ca.trust_domain()));
            assert!(!v.spiffe_id.is_trust_domain_id());
        }
    }
}

/// Selector parsing: print(parse(s)) == s, and kind and value split it.
pub fn selector(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = s.parse::<crate::Selector>() {
        assert_eq!(sel.to_string(), s);
        assert_eq!(format!("{}:{}", sel.kind(), sel.value()), s);
        let again = crate::Selector::new(sel.kind(), sel.value()).expect("parts rebuild");
        assert_eq!(again, sel);
    }
}

/// PEM bundles (`--trust-bundle`, `bundle set`): decoding never panics, and
/// what decodes re-encodes to the same authorities.
pub fn pem_bundle(data: &[u8]) {
    let td = TrustDomain::new("example.org").expect("literal trust domain");
    if let Ok(b) = Bundle::from_x509_pem(td.clone(), data) {
        let again = Bundle::from_x509_pem(td, b.x509_authorities_pem().as_bytes())
            .expect("encoded PEM decodes");
        assert_eq!(again.x509_authorities(), b.x509_authorities());
    }
}

/// Private key import (key files, upstream CA keys): never panics, and an
/// accepted key round-trips through PKCS#8 and can sign.
pub fn private_key(data: &[u8]) {
    if let Ok(key) = KeyPair::from_pkcs8_pem_or_der(data) {
        let again = KeyPair::from_pkcs8_der(key.pkcs8_der()).expect("own PKCS#8 re-imports");
        assert_eq!(again.fingerprint(), key.fingerprint());
        key.sign_x509(b"fuzz").expect("an imported key signs");
    }
}

/// Replays the checked-in corpus (`fuzz/corpus/<target>/`) and every input
/// that once broke a target (`fuzz/regressions/<target>/`) through `check`,
/// so `cargo test` runs what the fuzzers run. Fails on a broken invariant
/// or a target with no inputs. Shared by the agent's and server's replays.
pub fn replay_corpus(target: &str, check: fn(&[u8])) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut seen = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(
                result.is_ok(),
                "{target}: invariant broken by {}",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen > 0, "no corpus for fuzz target {target}");
}

#[cfg(test)]
mod corpus_replay {
    //! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) and every
    //! input that once broke a target (`fuzz/regressions/<target>/`) through
    //! the same checks the fuzzers run, so CI exercises them on stable.

    use super::replay_corpus as replay;

    #[test]
    fn spiffe_id_corpus() {
        replay("spiffe_id", super::spiffe_id);
    }

    #[test]
    fn jwt_corpus() {
        replay("jwt", super::jwt);
    }

    #[test]
    fn bundle_corpus() {
        replay("bundle", super::bundle);
    }

    #[test]
    fn x509_chain_corpus() {
        replay("x509_chain", super::x509_chain);
    }

    #[test]
    fn csr_corpus() {
        replay("csr", super::csr);
    }

    #[test]
    fn selector_corpus() {
        replay("selector", super::selector);
    }

    #[test]
    fn pem_bundle_corpus() {
        replay("pem_bundle", super::pem_bundle);
    }

    #[test]
    fn private_key_corpus() {
        // No private key is checked in: the corpus holds only truncated
        // encodings, so whole keys are generated here.
        replay("private_key", super::private_key);
        for alg in [
            crate::KeyAlgorithm::EcdsaP256,
            crate::KeyAlgorithm::EcdsaP384,
        ] {
            let key = crate::KeyPair::generate(alg).expect("key generation");
            super::private_key(key.pkcs8_der());
            super::private_key(key.to_pkcs8_pem().as_bytes());
        }
    }
}
