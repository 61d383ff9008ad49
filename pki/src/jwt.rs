//! JWT-SVIDs: minting and verification.
//!
//! Tokens oxid mints have the header exactly `{"alg","kid","typ":"JWT"}` and
//! the claims `sub`, `aud` (always an array of every audience), `exp`, `iat`.
//! Verification is deliberately narrow: the algorithm is fixed by the key the
//! `kid` selects (a token cannot choose a weaker one), `none`/HS*/EdDSA never
//! verify, and every header or claim that could change the meaning of a token
//! and that we do not understand is refused.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value, json};

use crate::bundle::{BundleSource, JwtAuthority, JwtPublicKey, KeyMaterial};
use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::key::{KeyAlgorithm, KeyError, KeyPair};
use crate::policy::JWT_CLOCK_SKEW;

/// Most audiences a JWT-SVID may carry (SPIFFE clients refuse more).
pub const MAX_AUDIENCES: usize = 32;

/// Longest single audience accepted, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 1024;

/// Longest token accepted, in bytes: 32 maximal audiences and a maximal
/// SPIFFE ID, base64url-encoded, with room to spare.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Why a JWT-SVID could not be minted or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; at most {MAX_TOKEN_LEN} are accepted")]
    TooLong(usize),
    /// Not three dot-separated parts.
    #[error("token is not a compact JWS (header.payload.signature)")]
    NotCompact,
    /// A part is not unpadded base64url.
    #[error("token {0} is not valid base64url")]
    Base64(&'static str),
    /// The header or payload is not a JSON object (or repeats a key).
    #[error("token {part} is not a valid JSON object: {reason}")]
    Json {
        /// `header` or `payload`.
        part: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// `alg` is missing or not one of RS/ES/PS 256/384.
    #[error("algorithm {0:?} is not accepted for JWT-SVIDs")]
    UnsupportedAlgorithm(String),
    /// `kid` is missing or not a string.
    #[error("token header has no key ID (kid)")]
    MissingKeyId,
    /// `typ` is present but not `JWT` or `JOSE`.
    #[error("token type {0:?} is not JWT or JOSE")]
    BadType(String),
    /// A header member other than `alg`, `kid`, `typ`.
    #[error("token header member {0:?} is not allowed")]
    UnexpectedHeader(String),
    /// A required claim is absent.
    #[error("token has no {0:?} claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or value.
    #[error("claim {claim:?} is invalid: {reason}")]
    InvalidClaim {
        /// The claim name.
        claim: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// `sub` is not a workload SPIFFE ID.
    #[error("subject is not a valid SPIFFE ID: {0}")]
    Subject(IdError),
    /// No bundle for the subject's trust domain.
    #[error("no JWT bundle for trust domain {0}")]
    NoBundle(String),
    /// The bundle has no key with the token's `kid`.
    #[error("key ID {kid:?} is not in the bundle of {trust_domain}")]
    UnknownKeyId {
        /// The token's key ID.
        kid: String,
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// `alg` does not fit the key the `kid` selects.
    #[error("algorithm {alg} does not match the {key} key of key ID {kid:?}")]
    AlgorithmMismatch {
        /// The token's algorithm.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
        /// The key ID.
        kid: String,
    },
    /// The signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` is past (beyond the clock skew allowance).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the clock skew allowance).
    #[error("token is not valid yet")]
    NotYetValid,
    /// The expected audience is not among the token's.
    #[error("token audience does not include {0:?}")]
    AudienceMismatch(String),
    /// An audience list is empty, too long, or holds an empty/oversized value.
    #[error("invalid audience: {0}")]
    InvalidAudience(String),
    /// A mint request with a zero TTL.
    #[error("TTL must be greater than zero")]
    ZeroTtl,
    /// The signing key has expired at the time of minting.
    #[error("the JWT signing key is not valid at the requested time")]
    KeyExpired,
    /// The algorithm cannot be used with this key type.
    #[error("algorithm {alg} cannot be used with a {key} key")]
    IncompatibleKey {
        /// The requested algorithm.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
    },
    /// A signer's key ID is empty or too long.
    #[error("{0}")]
    InvalidKeyId(String),
    /// Signing failed.
    #[error("signing failed")]
    Sign,
}

/// A JWS algorithm accepted for JWT-SVIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JwtAlgorithm {
    /// ECDSA P-256 SHA-256 (the default).
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// RSA PKCS#1 v1.5 SHA-256.
    Rs256,
    /// RSA PKCS#1 v1.5 SHA-384.
    Rs384,
    /// RSA PSS SHA-256.
    Ps256,
    /// RSA PSS SHA-384.
    Ps384,
}

impl JwtAlgorithm {
    /// The JOSE name, e.g. `ES256`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
        }
    }

    /// Parses a JOSE name; anything outside the accepted set is `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            _ => return None,
        })
    }

    /// The algorithm used with a key when none is configured.
    pub fn default_for(key: KeyAlgorithm) -> Self {
        match key {
            KeyAlgorithm::EcdsaP384 => Self::Es384,
            KeyAlgorithm::Rsa => Self::Rs256,
            _ => Self::Es256,
        }
    }

    /// True if tokens of this algorithm can be made and checked with a key of `key` type.
    pub fn fits(self, key: KeyAlgorithm) -> bool {
        matches!(
            (self, key),
            (Self::Es256, KeyAlgorithm::EcdsaP256)
                | (Self::Es384, KeyAlgorithm::EcdsaP384)
                | (
                    Self::Rs256 | Self::Rs384 | Self::Ps256 | Self::Ps384,
                    KeyAlgorithm::Rsa
                )
        )
    }

    fn rsa_signing(self) -> &'static dyn signature::RsaEncoding {
        match self {
            Self::Rs384 => &signature::RSA_PKCS1_SHA384,
            Self::Ps256 => &signature::RSA_PSS_SHA256,
            Self::Ps384 => &signature::RSA_PSS_SHA384,
            _ => &signature::RSA_PKCS1_SHA256,
        }
    }
}

/// A key that mints JWT-SVIDs, with its key ID and lifetime.
#[derive(Debug)]
pub struct JwtSigner {
    /// Tokens are minted only for IDs of this trust domain, whose bundle
    /// publishes the key.
    trust_domain: TrustDomain,
    key: KeyPair,
    /// Key ID and public key, built (and so validated) once in `new`.
    authority: JwtAuthority,
    algorithm: JwtAlgorithm,
    not_after: SystemTime,
}

/// A minted JWT-SVID. `Debug` leaves the token out: it is a bearer credential.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The compact token.
    pub token: String,
    /// Its subject.
    pub spiffe_id: SpiffeId,
    /// Its audiences, as requested.
    pub audiences: Vec<String>,
    /// Its `exp`.
    pub expiry: SystemTime,
    /// Its `iat`.
    pub issued_at: SystemTime,
}

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("audiences", &self.audiences)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// Wraps `key` to mint for `trust_domain`. The algorithm defaults by key
    /// type; a mismatched one is refused. Tokens never outlive `not_after`
    /// (the key's retirement).
    pub fn new(
        trust_domain: TrustDomain,
        key: KeyPair,
        key_id: impl Into<String>,
        algorithm: Option<JwtAlgorithm>,
        not_after: SystemTime,
    ) -> Result<Self, JwtError> {
        let algorithm = algorithm.unwrap_or_else(|| JwtAlgorithm::default_for(key.algorithm()));
        if !algorithm.fits(key.algorithm()) {
            return Err(JwtError::IncompatibleKey {
                alg: algorithm.name(),
                key: key.algorithm().name(),
            });
        }
        let public_key =
            JwtPublicKey::from_key_pair(&key).map_err(|_| JwtError::IncompatibleKey {
                alg: algorithm.name(),
                key: key.algorithm().name(),
            })?;
        let authority = JwtAuthority::new(key_id, public_key)
            .map_err(|e| JwtError::InvalidKeyId(e.to_string()))?;
        Ok(Self {
            trust_domain,
            key,
            authority,
            algorithm,
            not_after,
        })
    }

    /// A key ID derived from the public key: the first 128 bits of its
    /// SHA-256, in hex. Public, stable, and unique per key.
    pub fn key_id_for(key: &KeyPair) -> String {
        key.fingerprint()[..32].to_owned()
    }

    /// The bundle entry that verifies this signer's tokens.
    pub fn authority(&self) -> &JwtAuthority {
        &self.authority
    }

    /// The key ID.
    pub fn key_id(&self) -> &str {
        self.authority.key_id()
    }

    /// The algorithm tokens are signed with.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// The signing key.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Mints a JWT-SVID for `spiffe_id` and `audiences` (1 to 32, each 1 to
    /// [`MAX_AUDIENCE_LEN`] bytes), valid `ttl` from `now` but never past the
    /// key's `not_after`.
    pub fn mint(
        &self,
        spiffe_id: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, JwtError> {
        if spiffe_id.is_trust_domain_id() {
            return Err(JwtError::InvalidClaim {
                claim: "sub",
                reason: "a JWT-SVID subject needs a path",
            });
        }
        if !spiffe_id.is_member_of(&self.trust_domain) {
            return Err(JwtError::InvalidClaim {
                claim: "sub",
                reason: "the subject belongs to another trust domain than the signing key",
            });
        }
        check_audiences(audiences)?;
        if ttl.is_zero() {
            return Err(JwtError::ZeroTtl);
        }
        if now >= self.not_after {
            return Err(JwtError::KeyExpired);
        }
        let iat = unix(now);
        let exp = unix(
            now.checked_add(ttl)
                .unwrap_or(self.not_after)
                .min(self.not_after),
        );
        let header = json!({"alg": self.algorithm.name(), "kid": self.key_id(), "typ": "JWT"});
        let claims = json!({"sub": spiffe_id.as_str(), "aud": audiences, "exp": exp, "iat": iat});
        let mut token = String::with_capacity(512);
        URL_SAFE_NO_PAD.encode_string(header.to_string(), &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims.to_string(), &mut token);
        let sig = self
            .key
            .sign_jws(self.algorithm.rsa_signing(), token.as_bytes())
            .map_err(|_: KeyError| JwtError::Sign)?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut token);
        Ok(JwtSvid {
            token,
            spiffe_id: spiffe_id.clone(),
            audiences: audiences.to_vec(),
            expiry: from_unix(exp),
            issued_at: from_unix(iat),
        })
    }
}

/// A verified JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwtSvid {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// All audiences of the token.
    pub audiences: Vec<String>,
    /// `exp`.
    pub expiry: SystemTime,
    /// Every claim as sent, except `aud`, which is always the list of
    /// audiences (ValidateJWTSVID's `claims` must hold `aud` as a list).
    pub claims: Map<String, Value>,
}

/// Verifies `token` at `now`: signature by the key `kid` names in the bundle
/// of the subject's trust domain, with the algorithm that key fixes; `exp`
/// (required) and `nbf` (optional) with [`JWT_CLOCK_SKEW`]; and
/// `expected_audience` among `aud`.
pub fn verify_jwt_svid(
    token: &str,
    bundles: &(impl BundleSource + ?Sized),
    expected_audience: &str,
    now: SystemTime,
) -> Result<VerifiedJwtSvid, JwtError> {
    if expected_audience.is_empty() {
        return Err(JwtError::InvalidAudience(
            "the expected audience is empty".into(),
        ));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::NotCompact);
    };
    let header = decode_object(h64, "header")?;
    let mut claims = decode_object(p64, "payload")?;
    let sig = URL_SAFE_NO_PAD
        .decode(s64)
        .map_err(|_| JwtError::Base64("signature"))?;

    let (alg, kid) = check_header(&header)?;
    let spiffe_id = subject(&claims)?;
    let audiences = audiences(&claims)?;
    let exp = int_claim(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    let nbf = int_claim(&claims, "nbf")?;

    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .bundle_for(td)
        .ok_or_else(|| JwtError::NoBundle(td.to_string()))?;
    let authority = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtError::UnknownKeyId {
            kid: kid.to_owned(),
            trust_domain: td.to_string(),
        })?;
    let key = authority.public_key();
    if !alg.fits(key.algorithm()) {
        return Err(JwtError::AlgorithmMismatch {
            alg: alg.name(),
            key: key.algorithm().name(),
            kid: kid.to_owned(),
        });
    }
    let signed = &token[..h64.len() + 1 + p64.len()];
    verify_signature(alg, key, signed.as_bytes(), &sig)?;

    let now_secs = unix(now);
    let skew = JWT_CLOCK_SKEW.as_secs() as i64;
    if now_secs >= exp.saturating_add(skew) {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = nbf {
        if now_secs.saturating_add(skew) < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    if !audiences.iter().any(|a| a == expected_audience) {
        return Err(JwtError::AudienceMismatch(expected_audience.to_owned()));
    }
    claims.insert("aud".into(), Value::from(audiences.clone()));
    Ok(VerifiedJwtSvid {
        spiffe_id,
        audiences,
        expiry: from_unix(exp),
        claims,
    })
}

fn decode_object(part: &str, name: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Base64(name))?;
    crate::json::parse_strict_object(&bytes).map_err(|reason| JwtError::Json { part: name, reason })
}

fn check_header(header: &Map<String, Value>) -> Result<(JwtAlgorithm, &str), JwtError> {
    for name in header.keys() {
        if !matches!(name.as_str(), "alg" | "kid" | "typ") {
            return Err(JwtError::UnexpectedHeader(name.clone()));
        }
    }
    let alg_name = match header.get("alg") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(JwtError::UnsupportedAlgorithm(other.to_string())),
        None => return Err(JwtError::UnsupportedAlgorithm(String::new())),
    };
    let alg = JwtAlgorithm::from_name(alg_name)
        .ok_or_else(|| JwtError::UnsupportedAlgorithm(alg_name.to_owned()))?;
    let kid = match header.get("kid") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => return Err(JwtError::MissingKeyId),
    };
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => return Err(JwtError::BadType(other.to_string())),
    }
    Ok((alg, kid))
}

fn subject(claims: &Map<String, Value>) -> Result<SpiffeId, JwtError> {
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(JwtError::InvalidClaim {
                claim: "sub",
                reason: "must be a string",
            });
        }
        None => return Err(JwtError::MissingClaim("sub")),
    };
    let id: SpiffeId = sub.parse().map_err(JwtError::Subject)?;
    if id.is_trust_domain_id() {
        return Err(JwtError::InvalidClaim {
            claim: "sub",
            reason: "a JWT-SVID subject needs a path",
        });
    }
    Ok(id)
}

/// `aud` as a list: a string (one audience) or an array of 1 to 32 strings.
fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    let invalid = |reason| JwtError::InvalidClaim {
        claim: "aud",
        reason,
    };
    let list = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_AUDIENCES {
                return Err(invalid("more than 32 audiences"));
            }
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or(invalid("must hold strings"))
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(invalid("must be a string or an array of strings")),
    };
    if list.is_empty() {
        return Err(invalid("is empty"));
    }
    Ok(list)
}

/// An integer NumericDate claim; fractional or non-numeric values are refused.
fn int_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or(JwtError::InvalidClaim {
            claim: name,
            reason: "must be an integer number of seconds",
        }),
    }
}

fn verify_signature(
    alg: JwtAlgorithm,
    key: &JwtPublicKey,
    signed: &[u8],
    sig: &[u8],
) -> Result<(), JwtError> {
    let result = match &key.0 {
        KeyMaterial::EcP256(point) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(signed, sig)
        }
        KeyMaterial::EcP384(point) => {
            UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point).verify(signed, sig)
        }
        KeyMaterial::Rsa { n, e } => {
            let params: &signature::RsaParameters = match alg {
                JwtAlgorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                JwtAlgorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                JwtAlgorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                JwtAlgorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                // Invariant: `fits` was checked, so an RSA key has an RSA algorithm.
                _ => return Err(JwtError::BadSignature),
            };
            RsaPublicKeyComponents { n, e }.verify(params, signed, sig)
        }
    };
    result.map_err(|_| JwtError::BadSignature)
}

/// Checks a requested audience list (1 to 32 non-empty values, each at most
/// [`MAX_AUDIENCE_LEN`] bytes). Callers that take audiences from workloads
/// use it to answer `InvalidArgument` before any work.
pub fn check_audiences(audiences: &[String]) -> Result<(), JwtError> {
    if audiences.is_empty() {
        return Err(JwtError::InvalidAudience(
            "at least one audience is required".into(),
        ));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(JwtError::InvalidAudience(format!(
            "{} audiences requested; at most {MAX_AUDIENCES} are allowed",
            audiences.len()
        )));
    }
    for a in audiences {
        if a.is_empty() {
            return Err(JwtError::InvalidAudience("an audience is empty".into()));
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(JwtError::InvalidAudience(format!(
                "an audience is {} bytes; at most {MAX_AUDIENCE_LEN} are allowed",
                a.len()
            )));
        }
    }
    Ok(())
}

fn unix(t: SystemTime) -> i64 {
    crate::x509::unix_secs(t)
}

fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}
