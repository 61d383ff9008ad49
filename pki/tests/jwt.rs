//! JWT-SVID minting and verification: the token shape of the wire contract
//! (README, "What `oxid-pki` guarantees") and one test per rejection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::{
    JwtAlgorithm, JwtError, JwtSigner, MAX_AUDIENCE_LEN, MAX_TOKEN_LEN, check_audiences,
    verify_jwt_svid,
};
use oxid_pki::{KeyAlgorithm, KeyPair};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};

use common::{HOUR, id, now, openssl_rsa_key, td};

const AUD: &str = "spiffe://example.org/db";

struct Fixture {
    signer: JwtSigner,
    bundle: Bundle,
}

fn fixture_with(key: KeyPair, alg: Option<JwtAlgorithm>) -> Fixture {
    let kid = JwtSigner::key_id_for(&key);
    let signer = JwtSigner::new(td("example.org"), key, kid, alg, now() + 24 * HOUR).unwrap();
    let mut bundle = Bundle::new(td("example.org"));
    bundle
        .add_jwt_authority(signer.authority().clone())
        .unwrap();
    Fixture { signer, bundle }
}

fn fixture() -> Fixture {
    fixture_with(KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(), None)
}

fn mint(fx: &Fixture, audiences: &[&str]) -> String {
    let auds: Vec<String> = audiences.iter().map(|s| s.to_string()).collect();
    fx.signer
        .mint(
            &id("spiffe://example.org/web"),
            &auds,
            Duration::from_secs(300),
            now(),
        )
        .unwrap()
        .token
}

fn verify(fx: &Fixture, token: &str) -> Result<oxid_pki::jwt::VerifiedJwtSvid, JwtError> {
    verify_jwt_svid(token, &fx.bundle, AUD, now())
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Signs arbitrary header and claims with the fixture's P-256 key, as an
/// attacker holding that key (or a buggy issuer) could.
fn forge(fx: &Fixture, header: Value, claims: Value) -> String {
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        fx.signer.key().pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let signed = format!("{}.{}", b64(&header), b64(&claims));
    let sig = key
        .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
        .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn good_header(fx: &Fixture) -> Value {
    json!({"alg": "ES256", "kid": fx.signer.key_id(), "typ": "JWT"})
}

fn good_claims() -> Value {
    let t = now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"sub": "spiffe://example.org/web", "aud": [AUD], "exp": t + 300, "iat": t})
}

fn decode_part(token: &str, i: usize) -> Value {
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

// ---------- the token oxid mints ----------

#[test]
fn minted_token_has_exactly_the_contract_header_and_claims() {
    let fx = fixture();
    let token = mint(&fx, &[AUD, "other"]);
    let header = decode_part(&token, 0);
    assert_eq!(
        header,
        json!({"alg": "ES256", "kid": fx.signer.key_id(), "typ": "JWT"})
    );
    assert_eq!(header.as_object().unwrap().len(), 3);
    let claims = decode_part(&token, 1);
    let obj = claims.as_object().unwrap();
    let mut names: Vec<&str> = obj.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["aud", "exp", "iat", "sub"]);
    assert_eq!(claims["sub"], "spiffe://example.org/web");
    assert_eq!(claims["aud"], json!([AUD, "other"]));
    assert!(claims["exp"].is_u64() && claims["iat"].is_u64());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
}

#[test]
fn a_single_audience_is_still_an_array() {
    let fx = fixture();
    assert_eq!(decode_part(&mint(&fx, &[AUD]), 1)["aud"], json!([AUD]));
}

#[test]
fn minted_tokens_verify_for_every_algorithm() {
    let cases = [
        (
            KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            None,
            "ES256",
        ),
        (
            KeyPair::generate(KeyAlgorithm::EcdsaP384).unwrap(),
            None,
            "ES384",
        ),
        (openssl_rsa_key(2048), None, "RS256"),
        (openssl_rsa_key(2048), Some(JwtAlgorithm::Rs384), "RS384"),
        (openssl_rsa_key(2048), Some(JwtAlgorithm::Ps256), "PS256"),
        (openssl_rsa_key(3072), Some(JwtAlgorithm::Ps384), "PS384"),
    ];
    for (key, alg, name) in cases {
        let fx = fixture_with(key, alg);
        let token = mint(&fx, &[AUD]);
        assert_eq!(decode_part(&token, 0)["alg"], name);
        let v = verify(&fx, &token).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/web");
        assert_eq!(v.audiences, [AUD]);
        assert_eq!(v.claims["sub"], "spiffe://example.org/web");
    }
}

#[test]
fn signer_refuses_an_algorithm_that_does_not_fit_its_key() {
    for (alg, key) in [
        (JwtAlgorithm::Es384, KeyAlgorithm::EcdsaP256),
        (JwtAlgorithm::Es256, KeyAlgorithm::EcdsaP384),
        (JwtAlgorithm::Rs256, KeyAlgorithm::EcdsaP256),
    ] {
        let err = JwtSigner::new(
            td("example.org"),
            KeyPair::generate(key).unwrap(),
            "k",
            Some(alg),
            now() + HOUR,
        )
        .unwrap_err();
        assert!(matches!(err, JwtError::IncompatibleKey { .. }), "{err}");
    }
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    assert!(matches!(
        JwtSigner::new(td("example.org"), key, "", None, now() + HOUR),
        Err(JwtError::InvalidKeyId(_))
    ));
}

#[test]
fn mint_refuses_bad_audiences_ttl_and_expired_keys() {
    let fx = fixture();
    let web = id("spiffe://example.org/web");
    let ttl = Duration::from_secs(60);
    let try_mint = |auds: Vec<String>| fx.signer.mint(&web, &auds, ttl, now());
    for auds in [
        vec![],
        vec![String::new()],
        (0..33).map(|i| format!("a{i}")).collect(),
        (0..10_000).map(|i| format!("a{i}")).collect(),
        vec!["x".repeat(MAX_AUDIENCE_LEN + 1)],
        vec!["x".repeat(1 << 20)],
    ] {
        let n = auds.len();
        assert!(
            matches!(try_mint(auds), Err(JwtError::InvalidAudience(_))),
            "{n} audiences"
        );
    }
    let thirty_two: Vec<String> = (0..32).map(|i| format!("a{i}")).collect();
    assert!(try_mint(thirty_two).is_ok());
    assert!(matches!(
        fx.signer.mint(&web, &[AUD.into()], Duration::ZERO, now()),
        Err(JwtError::ZeroTtl)
    ));
    assert!(matches!(
        fx.signer.mint(&web, &[AUD.into()], ttl, now() + 25 * HOUR),
        Err(JwtError::KeyExpired)
    ));
    assert!(matches!(
        fx.signer
            .mint(&id("spiffe://example.org"), &[AUD.into()], ttl, now()),
        Err(JwtError::InvalidClaim { claim: "sub", .. })
    ));
    assert!(check_audiences(&["ok".into()]).is_ok());
}

#[test]
fn token_lifetime_is_clamped_to_the_signing_key() {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let signer = JwtSigner::new(
        td("example.org"),
        key,
        "k",
        None,
        now() + Duration::from_secs(100),
    )
    .unwrap();
    let svid = signer
        .mint(&id("spiffe://example.org/web"), &[AUD.into()], HOUR, now())
        .unwrap();
    assert_eq!(svid.expiry, now() + Duration::from_secs(100));
}

// ---------- rejections ----------

#[test]
fn alg_none_is_refused() {
    let fx = fixture();
    let header = json!({"alg": "none", "kid": fx.signer.key_id(), "typ": "JWT"});
    let token = format!("{}.{}.", b64(&header), b64(&good_claims()));
    assert_eq!(
        verify(&fx, &token).unwrap_err(),
        JwtError::UnsupportedAlgorithm("none".into())
    );
}

#[test]
fn hmac_with_the_public_key_as_secret_is_refused() {
    // The classic confusion: sign HS256 with the verifier's public key bytes.
    let fx = fixture();
    let header = json!({"alg": "HS256", "kid": fx.signer.key_id(), "typ": "JWT"});
    let signed = format!("{}.{}", b64(&header), b64(&good_claims()));
    let hkey = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, fx.signer.key().public_key_spki());
    let tag = ring::hmac::sign(&hkey, signed.as_bytes());
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag));
    assert_eq!(
        verify(&fx, &token).unwrap_err(),
        JwtError::UnsupportedAlgorithm("HS256".into())
    );
}

#[test]
fn algorithms_outside_the_profile_are_refused() {
    let fx = fixture();
    for alg in [
        "HS384", "HS512", "EdDSA", "ES512", "RS512", "PS512", "es256", "",
    ] {
        let token = forge(
            &fx,
            json!({"alg": alg, "kid": fx.signer.key_id()}),
            good_claims(),
        );
        assert_eq!(
            verify(&fx, &token).unwrap_err(),
            JwtError::UnsupportedAlgorithm(alg.into()),
            "{alg}"
        );
    }
    let token = forge(&fx, json!({"kid": fx.signer.key_id()}), good_claims());
    assert!(matches!(
        verify(&fx, &token),
        Err(JwtError::UnsupportedAlgorithm(_))
    ));
    let token = forge(
        &fx,
        json!({"alg": 256, "kid": fx.signer.key_id()}),
        good_claims(),
    );
    assert!(matches!(
        verify(&fx, &token),
        Err(JwtError::UnsupportedAlgorithm(_))
    ));
}

#[test]
fn the_key_fixes_the_algorithm() {
    let fx = fixture();
    for alg in ["ES384", "RS256", "PS256"] {
        let token = forge(
            &fx,
            json!({"alg": alg, "kid": fx.signer.key_id()}),
            good_claims(),
        );
        assert!(
            matches!(verify(&fx, &token), Err(JwtError::AlgorithmMismatch { .. })),
            "{alg}"
        );
    }
}

#[test]
fn missing_empty_or_unknown_kid_is_refused() {
    let fx = fixture();
    let token = forge(&fx, json!({"alg": "ES256", "typ": "JWT"}), good_claims());
    assert_eq!(verify(&fx, &token).unwrap_err(), JwtError::MissingKeyId);
    let token = forge(&fx, json!({"alg": "ES256", "kid": ""}), good_claims());
    assert_eq!(verify(&fx, &token).unwrap_err(), JwtError::MissingKeyId);
    let token = forge(&fx, json!({"alg": "ES256", "kid": 7}), good_claims());
    assert_eq!(verify(&fx, &token).unwrap_err(), JwtError::MissingKeyId);
    let token = forge(&fx, json!({"alg": "ES256", "kid": "nope"}), good_claims());
    assert!(
        matches!(verify(&fx, &token), Err(JwtError::UnknownKeyId { kid, .. }) if kid == "nope")
    );
}

#[test]
fn extra_header_fields_are_refused() {
    let fx = fixture();
    for extra in ["jku", "x5u", "jwk", "crit", "x5c", "cty", "zip"] {
        let mut header = good_header(&fx);
        header[extra] = json!("x");
        let token = forge(&fx, header, good_claims());
        assert_eq!(
            verify(&fx, &token).unwrap_err(),
            JwtError::UnexpectedHeader(extra.into()),
            "{extra}"
        );
    }
}

#[test]
fn typ_must_be_jwt_or_jose_when_present() {
    let fx = fixture();
    let mut header = good_header(&fx);
    header["typ"] = json!("at+jwt");
    assert!(matches!(
        verify(&fx, &forge(&fx, header, good_claims())),
        Err(JwtError::BadType(_))
    ));
    let mut header = good_header(&fx);
    header["typ"] = json!("JOSE");
    assert!(verify(&fx, &forge(&fx, header, good_claims())).is_ok());
    let header = json!({"alg": "ES256", "kid": fx.signer.key_id()});
    assert!(verify(&fx, &forge(&fx, header, good_claims())).is_ok());
}

#[test]
fn audience_is_required_and_must_match() {
    let fx = fixture();
    let with = |aud: Value| {
        let mut c = good_claims();
        c["aud"] = aud;
        verify(&fx, &forge(&fx, good_header(&fx), c))
    };
    assert!(with(json!(AUD)).is_ok(), "a string aud is one audience");
    assert!(matches!(
        with(json!(["x"])),
        Err(JwtError::AudienceMismatch(_))
    ));
    assert!(matches!(
        with(json!([])),
        Err(JwtError::InvalidClaim { claim: "aud", .. })
    ));
    assert!(matches!(
        with(json!([1])),
        Err(JwtError::InvalidClaim { claim: "aud", .. })
    ));
    assert!(matches!(
        with(json!(7)),
        Err(JwtError::InvalidClaim { claim: "aud", .. })
    ));
    let many: Vec<String> = (0..33)
        .map(|i| format!("a{i}"))
        .chain([AUD.to_owned()])
        .collect();
    assert!(matches!(
        with(json!(many)),
        Err(JwtError::InvalidClaim { claim: "aud", .. })
    ));
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        verify(&fx, &forge(&fx, good_header(&fx), c)).unwrap_err(),
        JwtError::MissingClaim("aud")
    );
    // The minted token's own audience list is matched against the expected one.
    let token = mint(&fx, &["a", "b"]);
    assert!(verify_jwt_svid(&token, &fx.bundle, "b", now()).is_ok());
    assert!(matches!(
        verify_jwt_svid(&token, &fx.bundle, "c", now()),
        Err(JwtError::AudienceMismatch(_))
    ));
}

#[test]
fn exp_is_required_integer_and_enforced_with_small_skew() {
    let fx = fixture();
    let t = now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let with_exp = |exp: Option<Value>| {
        let mut c = good_claims();
        match exp {
            Some(v) => c["exp"] = v,
            None => {
                c.as_object_mut().unwrap().remove("exp");
            }
        }
        verify(&fx, &forge(&fx, good_header(&fx), c))
    };
    assert_eq!(with_exp(None).unwrap_err(), JwtError::MissingClaim("exp"));
    assert_eq!(
        with_exp(Some(json!(t - 3600))).unwrap_err(),
        JwtError::Expired
    );
    assert!(
        with_exp(Some(json!(t - 5))).is_ok(),
        "within the clock skew allowance"
    );
    for bad in [json!(t as f64 + 0.5), json!(t.to_string()), json!(null)] {
        assert!(
            matches!(
                with_exp(Some(bad.clone())),
                Err(JwtError::InvalidClaim { claim: "exp", .. })
            ),
            "{bad}"
        );
    }
    // The verifier's clock is a parameter.
    let token = mint(&fx, &[AUD]);
    assert_eq!(
        verify_jwt_svid(&token, &fx.bundle, AUD, now() + HOUR).unwrap_err(),
        JwtError::Expired
    );
}

#[test]
fn nbf_in_the_future_is_refused() {
    let fx = fixture();
    let t = now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut c = good_claims();
    c["nbf"] = json!(t + 600);
    assert_eq!(
        verify(&fx, &forge(&fx, good_header(&fx), c)).unwrap_err(),
        JwtError::NotYetValid
    );
    let mut c = good_claims();
    c["nbf"] = json!(t - 10);
    assert!(verify(&fx, &forge(&fx, good_header(&fx), c)).is_ok());
}

#[test]
fn subject_must_be_a_workload_spiffe_id_with_a_bundle() {
    let fx = fixture();
    let with_sub = |sub: Value| {
        let mut c = good_claims();
        c["sub"] = sub;
        verify(&fx, &forge(&fx, good_header(&fx), c))
    };
    assert!(matches!(with_sub(json!("web")), Err(JwtError::Subject(_))));
    assert!(matches!(
        with_sub(json!("spiffe://example.org/a/")),
        Err(JwtError::Subject(_))
    ));
    assert!(matches!(
        with_sub(json!("spiffe://example.org")),
        Err(JwtError::InvalidClaim { claim: "sub", .. })
    ));
    assert!(matches!(
        with_sub(json!(1)),
        Err(JwtError::InvalidClaim { claim: "sub", .. })
    ));
    assert!(matches!(
        with_sub(json!("spiffe://other.org/web")),
        Err(JwtError::NoBundle(_))
    ));
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(
        verify(&fx, &forge(&fx, good_header(&fx), c)).unwrap_err(),
        JwtError::MissingClaim("sub")
    );
}

#[test]
fn tampering_and_foreign_keys_break_the_signature() {
    let fx = fixture();
    let token = mint(&fx, &[AUD]);
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims = decode_part(&token, 1);
    claims["sub"] = json!("spiffe://example.org/admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    assert_eq!(verify(&fx, &tampered).unwrap_err(), JwtError::BadSignature);
    // Same kid, another key: the bundle's key decides.
    let other = fixture_with(KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(), None);
    let forged = forge(
        &other,
        json!({"alg": "ES256", "kid": fx.signer.key_id(), "typ": "JWT"}),
        good_claims(),
    );
    assert_eq!(verify(&fx, &forged).unwrap_err(), JwtError::BadSignature);
    let truncated = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..12]);
    assert_eq!(verify(&fx, &truncated).unwrap_err(), JwtError::BadSignature);
}

#[test]
fn malformed_tokens_are_refused() {
    let fx = fixture();
    let token = mint(&fx, &[AUD]);
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(verify(&fx, "").unwrap_err(), JwtError::NotCompact);
    assert_eq!(verify(&fx, "a.b").unwrap_err(), JwtError::NotCompact);
    assert_eq!(
        verify(&fx, &format!("{token}.x")).unwrap_err(),
        JwtError::NotCompact
    );
    assert_eq!(
        verify(&fx, &format!("{}=.{}.{}", parts[0], parts[1], parts[2])).unwrap_err(),
        JwtError::Base64("header")
    );
    assert_eq!(
        verify(&fx, &format!("{}.{}*.{}", parts[0], parts[1], parts[2])).unwrap_err(),
        JwtError::Base64("payload")
    );
    assert_eq!(
        verify(&fx, &format!("{}.{}.{}+", parts[0], parts[1], parts[2])).unwrap_err(),
        JwtError::Base64("signature")
    );
    let not_json = URL_SAFE_NO_PAD.encode("{not json");
    assert!(matches!(
        verify(&fx, &format!("{}.{not_json}.{}", parts[0], parts[2])),
        Err(JwtError::Json {
            part: "payload",
            ..
        })
    ));
    let array = URL_SAFE_NO_PAD.encode("[1]");
    assert!(matches!(
        verify(&fx, &format!("{array}.{}.{}", parts[1], parts[2])),
        Err(JwtError::Json { part: "header", .. })
    ));
    let huge = "a".repeat(MAX_TOKEN_LEN + 1);
    assert_eq!(
        verify(&fx, &huge).unwrap_err(),
        JwtError::TooLong(MAX_TOKEN_LEN + 1)
    );
}

#[test]
fn duplicate_claims_are_refused() {
    // Two parsers disagreeing on which `sub` counts is a token confusion.
    let fx = fixture();
    let t = now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = format!(
        r#"{{"sub":"spiffe://example.org/web","sub":"spiffe://example.org/admin","aud":["{AUD}"],"exp":{}}}"#,
        t + 300
    );
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        fx.signer.key().pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let signed = format!(
        "{}.{}",
        b64(&good_header(&fx)),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = key
        .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
        .unwrap();
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert!(matches!(
        verify(&fx, &token),
        Err(JwtError::Json {
            part: "payload",
            ..
        })
    ));
}

#[test]
fn errors_read_well() {
    let e = JwtError::UnknownKeyId {
        kid: "k1".into(),
        trust_domain: "example.org".into(),
    };
    assert_eq!(
        e.to_string(),
        "key ID \"k1\" is not in the bundle of example.org"
    );
    assert_eq!(JwtError::Expired.to_string(), "token has expired");
}

#[test]
fn verified_claims_hold_aud_as_a_list() {
    let fx = fixture();
    let mut c = good_claims();
    c["aud"] = json!(AUD);
    let v = verify(&fx, &forge(&fx, good_header(&fx), c)).unwrap();
    assert_eq!(v.claims["aud"], json!([AUD]));
    assert!(v.claims["exp"].is_number());
    assert_eq!(v.claims["sub"], "spiffe://example.org/web");
}

#[test]
fn an_empty_expected_audience_never_matches() {
    let fx = fixture();
    let mut c = good_claims();
    c["aud"] = json!([""]);
    let token = forge(&fx, good_header(&fx), c);
    assert!(matches!(
        verify_jwt_svid(&token, &fx.bundle, "", now()),
        Err(JwtError::InvalidAudience(_))
    ));
}

#[test]
fn expiry_skew_edge() {
    let fx = fixture();
    let t = now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let skew = oxid_pki::policy::JWT_CLOCK_SKEW.as_secs();
    let with_exp = |exp: u64| {
        let mut c = good_claims();
        c["exp"] = json!(exp);
        verify(&fx, &forge(&fx, good_header(&fx), c))
    };
    assert_eq!(with_exp(t - skew).unwrap_err(), JwtError::Expired);
    assert!(with_exp(t - skew + 1).is_ok());
}

#[test]
fn debug_output_never_holds_the_token() {
    let fx = fixture();
    let svid = fx
        .signer
        .mint(
            &id("spiffe://example.org/web"),
            &[AUD.into()],
            Duration::from_secs(60),
            now(),
        )
        .unwrap();
    let sig = svid.token.rsplit('.').next().unwrap().to_owned();
    let debug = format!("{svid:?}");
    assert!(!debug.contains(&sig), "{debug}");
    assert!(debug.contains("spiffe://example.org/web"), "{debug}");
}

#[test]
fn a_signer_mints_only_for_its_trust_domain() {
    let fx = fixture();
    assert!(matches!(
        fx.signer.mint(
            &id("spiffe://other.org/web"),
            &[AUD.into()],
            Duration::from_secs(60),
            now()
        ),
        Err(JwtError::InvalidClaim { claim: "sub", .. })
    ));
}

#[test]
fn shared_bundles_are_verified_in_place() {
    // The agent keeps its synced bundles as `Arc<Bundle>` snapshots; they
    // are a bundle source as they are, with no copy per validation.
    use oxid_pki::bundle::BundleSource as _;
    let fx = fixture();
    let shared = std::sync::Arc::new(fx.bundle.clone());
    let by_td = std::collections::BTreeMap::from([(td("example.org"), shared.clone())]);
    let found = by_td.bundle_for(&td("example.org")).unwrap();
    assert!(std::ptr::eq(found, shared.as_ref()));
    assert!(by_td.bundle_for(&td("other.org")).is_none());
    let token = mint(&fx, &[AUD]);
    assert!(verify_jwt_svid(&token, &by_td, AUD, now()).is_ok());
    let hashed = std::collections::HashMap::from([(td("example.org"), shared.clone())]);
    assert!(verify_jwt_svid(&token, &hashed, AUD, now()).is_ok());
    assert!(verify_jwt_svid(&token, &[shared][..], AUD, now()).is_ok());
    let elsewhere = std::collections::BTreeMap::from([(
        td("other.org"),
        std::sync::Arc::new(Bundle::new(td("other.org"))),
    )]);
    assert!(verify_jwt_svid(&token, &elsewhere, AUD, now()).is_err());
}
