//! The crypto bound: what ring does on this machine's cores with nothing
//! else in the way. Every issuance figure is divided by one of these,
//! measured in the same run.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};

/// About the size of an SVID's TBSCertificate, the message the CA signs.
const MESSAGE: [u8; 450] = [0x5a; 450];

/// P-256 (1 verify + 1 sign) per second on `threads` threads: what one
/// X509-SVID costs at least (check the CSR's signature, sign the
/// certificate).
pub(crate) fn x509_svids_per_sec(threads: usize, time: Duration) -> f64 {
    on_threads(threads, time, || {
        let (key, rng) = key(&signature::ECDSA_P256_SHA256_ASN1_SIGNING);
        let public = key.public_key().as_ref().to_vec();
        let csr_signature = key.sign(&rng, &MESSAGE).map(|s| s.as_ref().to_vec());
        move || {
            let verified = csr_signature.as_ref().is_ok_and(|sig| {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public)
                    .verify(&MESSAGE, sig)
                    .is_ok()
            });
            verified && key.sign(&rng, &MESSAGE).is_ok()
        }
    })
}

/// ES256 signatures per second on `threads` threads: what one JWT-SVID
/// costs at least.
pub(crate) fn es256_per_sec(threads: usize, time: Duration) -> f64 {
    on_threads(threads, time, || {
        let (key, rng) = key(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        move || key.sign(&rng, &MESSAGE[..200]).is_ok()
    })
}

// ring generating and parsing its own fresh key cannot fail short of a
// broken ring; the bound would be meaningless then anyway.
#[allow(clippy::expect_used)]
fn key(alg: &'static signature::EcdsaSigningAlgorithm) -> (EcdsaKeyPair, SystemRandom) {
    let rng = SystemRandom::new();
    // ring generates and parses its own PKCS#8 here; failing would mean
    // ring cannot do P-256 at all.
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ring generates a P-256 key");
    let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ring parses its key");
    (key, rng)
}

/// Total operations per second of `make()`'s operation, one instance per
/// thread, all threads released together. An operation that fails stops
/// being counted, so a broken bound shows as zero rather than as speed.
fn on_threads<F, O>(threads: usize, time: Duration, make: F) -> f64
where
    F: Fn() -> O + Sync,
    O: FnMut() -> bool,
{
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut op = make();
                    start.wait();
                    let begin = Instant::now();
                    let mut done = 0u64;
                    while begin.elapsed() < time {
                        for _ in 0..8 {
                            if !op() {
                                return 0.0;
                            }
                            done += 1;
                        }
                    }
                    done as f64 / begin.elapsed().as_secs_f64()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum()
    })
}
