//! PKCS#10 certificate signing requests and subject public keys.
//!
//! A CSR is used for one thing only: its public key, after its signature
//! proves the requester holds the private half. Names and extensions asked
//! for in a CSR are ignored — the SPIFFE ID comes from the registration entry.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_SIG_ECDSA_WITH_SHA256,
    OID_SIG_ECDSA_WITH_SHA384,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey as ParsedKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::key::{KeyAlgorithm, MIN_RSA_BITS};

/// Largest RSA modulus accepted in a public key: ring verifies up to 8192.
pub const MAX_RSA_BITS: usize = 8192;

/// Largest CSR accepted, in bytes: an RSA-8192 CSR is about 2 KiB; anything
/// far larger is an attempt to make the parser work for nothing.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a CSR or public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes; at most {MAX_CSR_LEN} are accepted")]
    TooLarge(usize),
    /// Not a DER PKCS#10 request.
    #[error("malformed CSR: {0}")]
    Malformed(String),
    /// Signed with an algorithm outside ECDSA/RSA with SHA-256/384.
    #[error("CSR signature algorithm {0} is not accepted")]
    SignatureAlgorithm(String),
    /// The signature does not verify with the CSR's own key.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// The subject public key is not ECDSA P-256/P-384 or RSA ≥ 2048 bits.
    #[error("unsupported public key: {0}")]
    UnsupportedKey(String),
}

/// A subject public key of an accepted type: ECDSA P-256, P-384, or RSA ≥ 2048.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: KeyAlgorithm,
    /// The whole SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
    /// The BIT STRING contents: EC point or RSAPublicKey DER.
    raw: Vec<u8>,
}

impl PublicKey {
    /// Parses and checks a SubjectPublicKeyInfo DER.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, CsrError> {
        match SubjectPublicKeyInfo::from_der(der) {
            Ok(([], spki)) => Self::from_parsed(&spki),
            Ok(_) => Err(CsrError::UnsupportedKey("trailing bytes after key".into())),
            Err(e) => Err(CsrError::UnsupportedKey(e.to_string())),
        }
    }

    fn from_parsed(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, CsrError> {
        let unsupported = |what: &str| CsrError::UnsupportedKey(what.to_owned());
        let alg_oid = &spki.algorithm.algorithm;
        let algorithm = if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| unsupported("EC key without a named curve"))?;
            let (algorithm, point_len) = if curve == OID_EC_P256 {
                (KeyAlgorithm::EcdsaP256, 65)
            } else if curve == OID_NIST_EC_P384 {
                (KeyAlgorithm::EcdsaP384, 97)
            } else {
                return Err(unsupported(&format!(
                    "EC curve {curve} (use P-256 or P-384)"
                )));
            };
            let point = spki.subject_public_key.as_ref();
            if point.len() != point_len || point[0] != 4 {
                return Err(unsupported(
                    "EC point is not an uncompressed point on its curve",
                ));
            }
            algorithm
        } else if *alg_oid == OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(ParsedKey::RSA(rsa))
                    if (MIN_RSA_BITS..=MAX_RSA_BITS).contains(&rsa.key_size()) =>
                {
                    KeyAlgorithm::Rsa
                }
                Ok(ParsedKey::RSA(rsa)) => {
                    return Err(unsupported(&format!(
                        "RSA key of {} bits ({MIN_RSA_BITS} to {MAX_RSA_BITS} accepted)",
                        rsa.key_size()
                    )));
                }
                _ => return Err(unsupported("malformed RSA key")),
            }
        } else {
            return Err(unsupported(&format!("key algorithm {alg_oid}")));
        };
        let key = Self {
            algorithm,
            spki: spki.raw.to_vec(),
            raw: spki.subject_public_key.as_ref().to_vec(),
        };
        // BER (e.g. long-form lengths) parses but is not what a certificate
        // will carry: refuse anything but the canonical DER encoding, so the
        // key certified is byte for byte the key requested.
        if rcgen::PublicKeyData::subject_public_key_info(&key) != key.spki {
            return Err(unsupported("public key is not in canonical DER form"));
        }
        Ok(key)
    }

    /// The key's type.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.spki);
        f.debug_struct("PublicKey")
            .field("algorithm", &self.algorithm)
            .field("spki_sha256", &crate::key::hex(digest.as_ref()))
            .finish()
    }
}

impl rcgen::PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// rcgen writes the SPKI algorithm identifier from this: the curve for EC,
    /// `rsaEncryption` for RSA.
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.algorithm {
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Rsa => &rcgen::PKCS_RSA_SHA256,
            _ => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

/// A PKCS#10 request whose signature has been verified.
#[derive(Debug, Clone)]
pub struct Csr {
    public_key: PublicKey,
}

impl Csr {
    /// Parses a DER CSR, checks the key type and the signature algorithm, and
    /// verifies the signature with the CSR's own public key.
    pub fn parse(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge(der.len()));
        }
        let csr = match X509CertificationRequest::from_der(der) {
            Ok(([], csr)) => csr,
            Ok(_) => return Err(CsrError::Malformed("trailing bytes after CSR".into())),
            Err(e) => return Err(CsrError::Malformed(e.to_string())),
        };
        let public_key = PublicKey::from_parsed(&csr.certification_request_info.subject_pki)?;
        let sig_oid = &csr.signature_algorithm.algorithm;
        let allowed = match public_key.algorithm {
            KeyAlgorithm::Rsa => {
                *sig_oid == OID_PKCS1_SHA256WITHRSA || *sig_oid == OID_PKCS1_SHA384WITHRSA
            }
            _ => *sig_oid == OID_SIG_ECDSA_WITH_SHA256 || *sig_oid == OID_SIG_ECDSA_WITH_SHA384,
        };
        if !allowed {
            return Err(CsrError::SignatureAlgorithm(sig_oid.to_id_string()));
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        Ok(Self { public_key })
    }

    /// The requester's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// Builds a CSR for `key` (used by agents; the server ignores its subject).
    pub fn create(key: &crate::KeyPair) -> Result<Vec<u8>, CsrError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .serialize_request(key)
            .map(|csr| csr.der().to_vec())
            .map_err(|e| CsrError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;

    #[test]
    fn round_trip_and_key_types() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384] {
            let key = KeyPair::generate(alg).unwrap();
            let csr = Csr::parse(&Csr::create(&key).unwrap()).unwrap();
            assert_eq!(csr.public_key().algorithm(), alg);
            assert_eq!(csr.public_key().spki_der(), key.public_key_spki());
        }
    }

    #[test]
    fn tampered_signature_is_refused() {
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut der = Csr::create(&key).unwrap();
        // Flip a bit in the last byte: inside the signature value.
        let last = der.len() - 1;
        der[last] ^= 1;
        assert_eq!(Csr::parse(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn swapped_key_is_refused() {
        // A CSR whose public key is replaced by another key's: the signature
        // no longer matches, so the requester does not prove possession.
        let a = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let b = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let der = Csr::create(&a).unwrap();
        let point_a = a.public_key_raw();
        let pos = der
            .windows(point_a.len())
            .position(|w| w == point_a)
            .unwrap();
        let mut forged = der.clone();
        forged[pos..pos + point_a.len()].copy_from_slice(b.public_key_raw());
        assert_eq!(Csr::parse(&forged).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn garbage_trailing_and_oversized_are_refused() {
        assert!(matches!(Csr::parse(b""), Err(CsrError::Malformed(_))));
        assert!(matches!(
            Csr::parse(&[0x30, 0x03, 1, 2, 3]),
            Err(CsrError::Malformed(_))
        ));
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut der = Csr::create(&key).unwrap();
        der.push(0);
        assert!(matches!(Csr::parse(&der), Err(CsrError::Malformed(_))));
        let big = vec![0u8; MAX_CSR_LEN + 1];
        assert_eq!(
            Csr::parse(&big).unwrap_err(),
            CsrError::TooLarge(MAX_CSR_LEN + 1)
        );
    }

    #[test]
    fn spki_parsing_refuses_garbage() {
        assert!(PublicKey::from_spki_der(b"\x30\x00").is_err());
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP384).unwrap();
        let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
        assert_eq!(pk.algorithm(), KeyAlgorithm::EcdsaP384);
    }
}
