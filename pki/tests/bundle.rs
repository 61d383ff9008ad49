//! Bundles: SPIFFE bundle JSON, the Workload API's plain JWKS, PEM/DER, and
//! strict decoding (README, "What `oxid-pki` guarantees").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use oxid_pki::bundle::{Bundle, BundleError, JwtAuthority, JwtPublicKey, MAX_BUNDLE_LEN};
use oxid_pki::jwt::JwtSigner;
use oxid_pki::{KeyAlgorithm, KeyPair};
use serde_json::{Value, json};

use common::{HOUR, openssl_rsa_key, root_ca, td};

fn full_bundle() -> Bundle {
    let mut b = Bundle::new(td("example.org"));
    b.add_x509_authority(root_ca("example.org", HOUR).cert().clone())
        .unwrap();
    b.add_x509_authority(root_ca("example.org", HOUR).cert().clone())
        .unwrap();
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384] {
        let key = KeyPair::generate(alg).unwrap();
        let auth = JwtAuthority::new(
            JwtSigner::key_id_for(&key),
            JwtPublicKey::from_key_pair(&key).unwrap(),
        )
        .unwrap();
        b.add_jwt_authority(auth).unwrap();
    }
    b.set_sequence_number(42);
    b.set_refresh_hint(Some(Duration::from_secs(300)));
    b
}

fn decode(doc: &Value) -> Result<Bundle, BundleError> {
    Bundle::from_spiffe_json(td("example.org"), doc.to_string().as_bytes())
}

#[test]
fn spiffe_format_round_trips_and_has_the_contract_shape() {
    let b = full_bundle();
    let json_text = b.to_spiffe_json();
    let doc: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(doc["spiffe_sequence"], 42);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4);
    for k in &keys[..2] {
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["x5c"].as_array().unwrap().len(), 1, "one-cert x5c");
        assert!(k.get("kid").is_none(), "x509-svid keys carry no kid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        let der = STANDARD.decode(k["x5c"][0].as_str().unwrap()).unwrap();
        assert!(b.x509_authorities().iter().any(|c| c.as_ref() == der));
    }
    for k in &keys[2..] {
        assert_eq!(k["use"], "jwt-svid");
        assert!(k["kid"].is_string());
        assert_eq!(k["kty"], "EC");
    }
    let again = Bundle::from_spiffe_json(td("example.org"), json_text.as_bytes()).unwrap();
    assert_eq!(again, b);
}

#[test]
fn workload_api_jwks_is_plain_with_kids() {
    let b = full_bundle();
    let doc: Value = serde_json::from_str(&b.to_jwks_json()).unwrap();
    assert_eq!(doc.as_object().unwrap().len(), 1, "only `keys`");
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "JWT keys only");
    for k in keys {
        assert!(k["kid"].is_string());
        assert!(k.get("use").is_none());
        assert!(k.get("x5c").is_none());
    }
    let again = Bundle::from_jwks_json(td("example.org"), b.to_jwks_json().as_bytes()).unwrap();
    assert_eq!(
        again.jwt_authorities().collect::<Vec<_>>(),
        b.jwt_authorities().collect::<Vec<_>>()
    );
}

#[test]
fn empty_jwks_is_never_empty_bytes() {
    let b = Bundle::new(td("example.org"));
    assert_eq!(b.to_jwks_json(), r#"{"keys":[]}"#);
}

#[test]
fn rsa_jwt_authorities_round_trip() {
    let key = openssl_rsa_key(2048);
    let mut b = Bundle::new(td("example.org"));
    b.add_jwt_authority(
        JwtAuthority::new("rsa", JwtPublicKey::from_key_pair(&key).unwrap()).unwrap(),
    )
    .unwrap();
    let doc: Value = serde_json::from_str(&b.to_spiffe_json()).unwrap();
    let jwk = &doc["keys"][0];
    assert_eq!(jwk["kty"], "RSA");
    assert_eq!(jwk["e"], "AQAB");
    assert_eq!(
        Bundle::from_spiffe_json(td("example.org"), b.to_spiffe_json().as_bytes()).unwrap(),
        b
    );
}

#[test]
fn pem_and_der_exports() {
    let b = full_bundle();
    let pem = b.x509_authorities_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    let from_pem = Bundle::from_x509_pem(td("example.org"), pem.as_bytes()).unwrap();
    assert_eq!(from_pem.x509_authorities(), b.x509_authorities());
    let der = b.x509_authorities_der();
    assert_eq!(
        oxid_pki::x509::split_der_certs(&der).unwrap(),
        b.x509_authorities()
    );
    assert!(Bundle::from_x509_pem(td("example.org"), b"nothing").is_err());
}

#[test]
fn authorities_are_deduplicated_and_kids_unique() {
    let mut b = full_bundle();
    let cert = b.x509_authorities()[0].clone();
    b.add_x509_authority(cert.clone()).unwrap();
    assert_eq!(b.x509_authorities().len(), 2);
    assert!(b.remove_x509_authority(&cert));
    assert!(!b.remove_x509_authority(&cert));
    let existing = b.jwt_authorities().next().unwrap().clone();
    b.add_jwt_authority(existing.clone()).unwrap();
    let other = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let clash = JwtAuthority::new(
        existing.key_id(),
        JwtPublicKey::from_key_pair(&other).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        b.add_jwt_authority(clash),
        Err(BundleError::DuplicateKeyId(_))
    ));
    assert!(b.remove_jwt_authority(existing.key_id()));
    assert!(JwtAuthority::new("", existing.public_key().clone()).is_err());
    assert!(JwtAuthority::new("k".repeat(257), existing.public_key().clone()).is_err());
    assert!(b.add_x509_authority(vec![1, 2, 3].into()).is_err());
}

fn field_error(r: Result<Bundle, BundleError>) -> String {
    match r {
        Err(BundleError::Field { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn malformed_documents_are_refused_with_the_reason() {
    let td = td("example.org");
    assert!(matches!(
        Bundle::from_spiffe_json(td.clone(), b"not json"),
        Err(BundleError::Json(_))
    ));
    assert!(matches!(
        Bundle::from_spiffe_json(td.clone(), b"[]"),
        Err(BundleError::Json(_))
    ));
    assert!(matches!(
        Bundle::from_spiffe_json(td.clone(), br#"{"keys":[],"keys":[]}"#),
        Err(BundleError::Json(_))
    ));
    assert_eq!(field_error(decode(&json!({}))), "keys");
    assert_eq!(field_error(decode(&json!({"keys": {}}))), "keys");
    assert_eq!(field_error(decode(&json!({"keys": [1]}))), "keys[0]");
    assert_eq!(
        field_error(decode(&json!({"keys": [{"kty": "EC"}]}))),
        "keys[0].use"
    );
    assert_eq!(
        field_error(decode(&json!({"keys": [], "spiffe_sequence": -1}))),
        "spiffe_sequence"
    );
    assert_eq!(
        field_error(decode(&json!({"keys": [], "spiffe_sequence": "1"}))),
        "spiffe_sequence"
    );
    assert_eq!(
        field_error(decode(&json!({"keys": [], "spiffe_refresh_hint": 1.5}))),
        "spiffe_refresh_hint"
    );
    let big = vec![b' '; MAX_BUNDLE_LEN + 1];
    assert!(matches!(
        Bundle::from_spiffe_json(td, &big),
        Err(BundleError::TooLarge(_))
    ));
}

#[test]
fn unknown_key_uses_are_skipped() {
    let b = decode(&json!({"keys": [{"use": "wit-svid", "kty": "EC"}]})).unwrap();
    assert_eq!(b.x509_authorities().len(), 0);
    assert_eq!(b.jwt_authorities().len(), 0);
}

#[test]
fn x509_keys_are_checked() {
    let cert = STANDARD.encode(root_ca("example.org", HOUR).cert());
    let ok = decode(&json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [cert]}]})).unwrap();
    assert_eq!(ok.x509_authorities().len(), 1);
    assert_eq!(
        field_error(decode(
            &json!({"keys": [{"use": "x509-svid", "x5c": [cert, cert]}]})
        )),
        "keys[0].x5c"
    );
    assert_eq!(
        field_error(decode(&json!({"keys": [{"use": "x509-svid", "x5c": []}]}))),
        "keys[0].x5c"
    );
    assert_eq!(
        field_error(decode(&json!({"keys": [{"use": "x509-svid"}]}))),
        "keys[0].x5c"
    );
    assert_eq!(
        field_error(decode(
            &json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]})
        )),
        "keys[0].x5c[0]"
    );
    assert!(matches!(
        decode(&json!({"keys": [{"use": "x509-svid", "x5c": [STANDARD.encode(b"not a cert")]}]})),
        Err(BundleError::Certificate(_))
    ));
}

#[test]
fn jwt_keys_are_checked() {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let good: Value = serde_json::from_str(&{
        let mut b = Bundle::new(td("example.org"));
        b.add_jwt_authority(
            JwtAuthority::new("k1", JwtPublicKey::from_key_pair(&key).unwrap()).unwrap(),
        )
        .unwrap();
        b.to_spiffe_json()
    })
    .unwrap();
    let jwk = good["keys"][0].clone();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut k = jwk.clone();
        edit(&mut k);
        decode(&json!({"keys": [k]}))
    };
    assert!(with(&|_| {}).is_ok());
    assert_eq!(
        field_error(with(&|k| {
            k.as_object_mut().unwrap().remove("kid");
        })),
        "keys[0].kid"
    );
    assert!(matches!(
        with(&|k| k["kid"] = json!("")),
        Err(BundleError::InvalidKeyId(_))
    ));
    // Unknown key types and curves are skipped, as the bundle spec says, so
    // a peer adding one new key type does not cut federation.
    for edit in [
        &(|k: &mut Value| k["kty"] = json!("oct")) as &dyn Fn(&mut Value),
        &|k: &mut Value| k["kty"] = json!("OKP"),
        &|k: &mut Value| k["crv"] = json!("P-521"),
    ] {
        assert_eq!(with(edit).unwrap().jwt_authorities().len(), 0);
    }
    assert_eq!(
        field_error(with(&|k| k["crv"] = json!("P-384"))),
        "keys[0].x"
    );
    assert_eq!(field_error(with(&|k| k["x"] = json!("AAAA"))), "keys[0].x");
    assert_eq!(
        field_error(with(&|k| k["y"] = json!("not base64url!"))),
        "keys[0].y"
    );
    assert_eq!(
        field_error(with(&|k| {
            k.as_object_mut().unwrap().remove("y");
        })),
        "keys[0].y"
    );
    // Two keys under one kid.
    let other = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut b = Bundle::new(td("example.org"));
    b.add_jwt_authority(
        JwtAuthority::new("k1", JwtPublicKey::from_key_pair(&other).unwrap()).unwrap(),
    )
    .unwrap();
    let other_jwk: Value = serde_json::from_str(&b.to_spiffe_json()).unwrap();
    assert!(matches!(
        decode(&json!({"keys": [jwk, other_jwk["keys"][0]]})),
        Err(BundleError::DuplicateKeyId(_))
    ));
}

#[test]
fn weak_or_non_canonical_rsa_keys_are_refused() {
    let small_n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xc5u8; 128]);
    let r = decode(
        &json!({"keys": [{"use": "jwt-svid", "kid": "r", "kty": "RSA", "n": small_n, "e": "AQAB"}]}),
    );
    assert_eq!(field_error(r), "keys[0].n");
    let mut padded = vec![0u8];
    padded.extend([0xc5u8; 256]);
    let padded_n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(padded);
    let r = decode(
        &json!({"keys": [{"use": "jwt-svid", "kid": "r", "kty": "RSA", "n": padded_n, "e": "AQAB"}]}),
    );
    assert_eq!(field_error(r), "keys[0].n");
}

#[test]
fn plain_jwks_requires_kids_and_sane_use() {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut b = Bundle::new(td("example.org"));
    b.add_jwt_authority(
        JwtAuthority::new("k1", JwtPublicKey::from_key_pair(&key).unwrap()).unwrap(),
    )
    .unwrap();
    let mut doc: Value = serde_json::from_str(&b.to_jwks_json()).unwrap();
    let parse = |d: &Value| Bundle::from_jwks_json(td("example.org"), d.to_string().as_bytes());
    assert!(parse(&doc).is_ok());
    doc["keys"][0]["use"] = json!("sig");
    assert!(parse(&doc).is_ok());
    doc["keys"][0]["use"] = json!("enc");
    assert_eq!(field_error(parse(&doc)), "keys[0].use");
    doc["keys"][0].as_object_mut().unwrap().remove("use");
    doc["keys"][0].as_object_mut().unwrap().remove("kid");
    assert_eq!(field_error(parse(&doc)), "keys[0].kid");
}

#[test]
fn only_ca_certificates_can_be_authorities() {
    let ca = root_ca("example.org", HOUR);
    let key = common::workload_key();
    let pk = oxid_pki::x509::PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    let svid = ca
        .issue_x509_svid(
            &oxid_pki::x509::SvidParams {
                spiffe_id: &common::id("spiffe://example.org/web"),
                public_key: &pk,
                ttl: HOUR,
                dns_names: &[],
            },
            common::now(),
        )
        .unwrap();
    let mut b = Bundle::new(td("example.org"));
    assert!(matches!(
        b.add_x509_authority(svid.leaf().clone()),
        Err(BundleError::Certificate(_))
    ));
    assert!(b.x509_authorities().is_empty());
}

#[test]
fn pem_with_a_private_key_is_refused() {
    let ca = root_ca("example.org", HOUR);
    let mut pem = oxid_pki::x509::certs_to_pem([ca.cert()]);
    pem.push_str(&ca.key().to_pkcs8_pem());
    let err = Bundle::from_x509_pem(td("example.org"), pem.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}
