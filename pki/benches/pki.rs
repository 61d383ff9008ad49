//! oxid-pki benchmarks: issuance cost against the raw signature cost.
//!
//! `cargo bench -p oxid-pki` runs them and ends with the ratio
//! "SVID mint (CSR check included) per second / raw (1 verify + 1 sign) per
//! second", computed from the same run's estimates.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group};
use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::{JwtSigner, verify_jwt_svid};
use oxid_pki::x509::{Csr, PublicKey, SvidParams, X509Ca};
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId, TrustDomain};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};

const HOUR: Duration = Duration::from_secs(3600);

/// CSRs are made before timing starts; the benchmark cycles through them so
/// every iteration verifies a real, distinct request.
const CSR_POOL: usize = 256;

fn raw_crypto(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    // A message the size of an SVID's TBSCertificate.
    let msg = vec![0x5a; 450];
    let sig = key.sign(&rng, &msg).unwrap();
    let public = UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );

    let mut g = c.benchmark_group("raw");
    g.bench_function("p256_sign", |b| {
        b.iter(|| key.sign(&rng, black_box(&msg)).unwrap())
    });
    g.bench_function("p256_verify", |b| {
        b.iter(|| {
            public
                .verify(black_box(&msg), black_box(sig.as_ref()))
                .unwrap()
        })
    });
    g.finish();
}

fn issuance(c: &mut Criterion) {
    let now = SystemTime::now();
    let td = TrustDomain::new("example.org").unwrap();
    let ca = X509Ca::new_root(
        td.clone(),
        KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        24 * HOUR,
        now,
    )
    .unwrap();
    let csrs: Vec<Vec<u8>> = (0..CSR_POOL)
        .map(|_| Csr::create(&KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()).unwrap())
        .collect();
    let public_key = PublicKey::from_spki_der(
        KeyPair::generate(KeyAlgorithm::EcdsaP256)
            .unwrap()
            .public_key_spki(),
    )
    .unwrap();
    let id: SpiffeId = "spiffe://example.org/ns/prod/sa/web".parse().unwrap();

    let mut g = c.benchmark_group("x509_svid");
    let mut i = 0;
    g.bench_function("csr_verify_and_mint", |b| {
        b.iter(|| {
            i = (i + 1) % CSR_POOL;
            let csr = Csr::parse(black_box(&csrs[i])).unwrap();
            let params = SvidParams {
                spiffe_id: &id,
                public_key: csr.public_key(),
                ttl: HOUR,
                dns_names: &[],
            };
            ca.issue_x509_svid(&params, now).unwrap()
        })
    });
    g.bench_function("csr_verify", |b| {
        b.iter(|| {
            i = (i + 1) % CSR_POOL;
            Csr::parse(black_box(&csrs[i])).unwrap()
        })
    });
    g.bench_function("mint_from_public_key", |b| {
        b.iter(|| {
            let params = SvidParams {
                spiffe_id: &id,
                public_key: &public_key,
                ttl: HOUR,
                dns_names: &[],
            };
            ca.issue_x509_svid(black_box(&params), now).unwrap()
        })
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    let now = SystemTime::now();
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let kid = JwtSigner::key_id_for(&key);
    let signer = JwtSigner::new(
        TrustDomain::new("example.org").unwrap(),
        key,
        kid,
        None,
        now + 24 * HOUR,
    )
    .unwrap();
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    bundle
        .add_jwt_authority(signer.authority().clone())
        .unwrap();
    let id: SpiffeId = "spiffe://example.org/ns/prod/sa/web".parse().unwrap();
    let aud = vec!["spiffe://example.org/db".to_owned()];
    let token = signer
        .mint(&id, &aud, Duration::from_secs(300), now)
        .unwrap()
        .token;

    let mut g = c.benchmark_group("jwt_svid");
    g.bench_function("es256_mint", |b| {
        b.iter(|| {
            signer
                .mint(black_box(&id), &aud, Duration::from_secs(300), now)
                .unwrap()
        })
    });
    g.bench_function("es256_verify", |b| {
        b.iter(|| verify_jwt_svid(black_box(&token), &bundle, &aud[0], now).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = raw_crypto, issuance, jwt
}

/// Reads criterion's point estimate (mean, ns) of a benchmark from this run.
fn mean_ns(id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_owned());
    let path = format!("{dir}/criterion/{id}/new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let (Some(sign), Some(verify), Some(mint)) = (
        mean_ns("raw/p256_sign"),
        mean_ns("raw/p256_verify"),
        mean_ns("x509_svid/csr_verify_and_mint"),
    ) else {
        return; // a filtered run: not every figure was measured
    };
    let raw_rate = 1e9 / (sign + verify);
    let mint_rate = 1e9 / mint;
    println!("\n== oxid-pki issuance vs raw crypto (one core) ==");
    println!("raw P-256 sign      {:>9.1} µs", sign / 1e3);
    println!("raw P-256 verify    {:>9.1} µs", verify / 1e3);
    println!("raw bound (1 verify + 1 sign)  {raw_rate:>9.0} /s");
    println!("X509-SVID mint incl. CSR check {mint_rate:>9.0} /s");
    println!(
        "ratio mint / raw               {:>9.2}",
        mint_rate / raw_rate
    );
    if let (Some(jwt_mint), Some(jwt_verify)) = (
        mean_ns("jwt_svid/es256_mint"),
        mean_ns("jwt_svid/es256_verify"),
    ) {
        println!("JWT-SVID mint / raw sign       {:>9.2}", sign / jwt_mint);
        println!(
            "JWT-SVID verify / raw verify   {:>9.2}",
            verify / jwt_verify
        );
    }
}
