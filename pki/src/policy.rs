//! Crypto policy: the one place that says which algorithms oxid accepts.
//!
//! Every signature oxid verifies (certificate chains, JWT-SVIDs) goes through
//! the lists here, so tightening the policy is a one-line change.

use rustls_pki_types::SignatureVerificationAlgorithm;

/// Certificate signature algorithms accepted in X509-SVID chains: ECDSA on
/// P-256/P-384 and RSA (≥ 2048 bits) with PKCS#1 v1.5 or PSS. Ed25519 and
/// SHA-1 are refused.
pub static X509_SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
];

/// Leeway applied to JWT `exp`/`nbf` checks, for clocks slightly apart.
pub const JWT_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(30);
