//! Trust bundles: the X.509 and JWT authorities of one trust domain.
//!
//! Two JSON encodings exist and both are here: the SPIFFE bundle format
//! (a JWKS whose keys carry `use`, plus `spiffe_sequence` and
//! `spiffe_refresh_hint`; served by federation endpoints) and the plain JWKS
//! of JWT keys that the Workload API serves. Decoding is strict: a document
//! that parses but means something odd is refused with the reason.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey as ParsedKey;

use crate::id::TrustDomain;
use crate::key::{KeyAlgorithm, KeyPair, MIN_RSA_BITS};
use crate::x509::{self, MAX_RSA_BITS, PublicKey};

/// Largest bundle document decoded, in bytes.
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;

/// Longest JWT key ID accepted.
pub const MAX_KEY_ID_LEN: usize = 256;

/// Why a bundle could not be decoded or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Larger than [`MAX_BUNDLE_LEN`].
    #[error("bundle is {0} bytes; at most {MAX_BUNDLE_LEN} are accepted")]
    TooLarge(usize),
    /// Not JSON, or JSON of the wrong shape.
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    /// A field is missing or has a bad value.
    #[error("bundle field {field}: {reason}")]
    Field {
        /// JSON path of the field, e.g. `keys[2].x5c`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two JWT authorities share a key ID.
    #[error("duplicate JWT key ID {0:?}")]
    DuplicateKeyId(String),
    /// A JWT key ID is empty or too long.
    #[error("invalid JWT key ID {0:?}: must be 1 to {MAX_KEY_ID_LEN} bytes")]
    InvalidKeyId(String),
    /// An X.509 authority does not parse.
    #[error("invalid X.509 authority: {0}")]
    Certificate(String),
    /// A public key is of an unsupported type or malformed.
    #[error("unsupported public key: {0}")]
    UnsupportedKey(String),
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A public key that verifies JWT-SVIDs, in the form ring consumes.
///
/// Built only from a parsed SPKI, a key pair, or a checked JWK, so the key
/// material always has the right shape for its type.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtPublicKey(pub(crate) KeyMaterial);

/// The shapes a [`JwtPublicKey`] can take.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum KeyMaterial {
    /// P-256 uncompressed point: 65 bytes, starting with 0x04.
    EcP256(Vec<u8>),
    /// P-384 uncompressed point: 97 bytes, starting with 0x04.
    EcP384(Vec<u8>),
    /// RSA modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl std::fmt::Debug for JwtPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            KeyMaterial::EcP256(_) => f.write_str("JwtPublicKey(P-256)"),
            KeyMaterial::EcP384(_) => f.write_str("JwtPublicKey(P-384)"),
            KeyMaterial::Rsa { n, .. } => write!(f, "JwtPublicKey(RSA-{})", n.len() * 8),
        }
    }
}

impl JwtPublicKey {
    /// The public half of `key`.
    pub fn from_key_pair(key: &KeyPair) -> Result<Self, BundleError> {
        Self::from_spki_der(key.public_key_spki())
    }

    /// Parses a SubjectPublicKeyInfo DER (checked by [`PublicKey`] rules).
    pub fn from_spki_der(spki: &[u8]) -> Result<Self, BundleError> {
        let checked = PublicKey::from_spki_der(spki)
            .map_err(|e| BundleError::UnsupportedKey(e.to_string()))?;
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| BundleError::UnsupportedKey(e.to_string()))?;
        // `PublicKey` checked the point length and prefix, and the RSA size.
        let material = match (checked.algorithm(), parsed.parsed()) {
            (KeyAlgorithm::EcdsaP256, Ok(ParsedKey::EC(p))) => {
                KeyMaterial::EcP256(p.data().to_vec())
            }
            (KeyAlgorithm::EcdsaP384, Ok(ParsedKey::EC(p))) => {
                KeyMaterial::EcP384(p.data().to_vec())
            }
            (KeyAlgorithm::Rsa, Ok(ParsedKey::RSA(rsa)))
                if !strip_zeros(rsa.exponent).is_empty() =>
            {
                KeyMaterial::Rsa {
                    n: strip_zeros(rsa.modulus).to_vec(),
                    e: strip_zeros(rsa.exponent).to_vec(),
                }
            }
            _ => {
                return Err(BundleError::UnsupportedKey(
                    "unexpected key encoding".into(),
                ));
            }
        };
        Ok(Self(material))
    }

    /// The key's type.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.0 {
            KeyMaterial::EcP256(_) => KeyAlgorithm::EcdsaP256,
            KeyMaterial::EcP384(_) => KeyAlgorithm::EcdsaP384,
            KeyMaterial::Rsa { .. } => KeyAlgorithm::Rsa,
        }
    }

    /// JWK members describing the key (`kty`, `crv`, `x`, `y` or `n`, `e`).
    fn jwk_members(&self, out: &mut Map<String, Value>) {
        let b64 = |b: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(b));
        match &self.0 {
            KeyMaterial::EcP256(point) | KeyMaterial::EcP384(point) => {
                let crv = if matches!(self.0, KeyMaterial::EcP256(_)) {
                    "P-256"
                } else {
                    "P-384"
                };
                // Invariant: every constructor yields 0x04 || x || y.
                let coord = (point.len() - 1) / 2;
                out.insert("kty".into(), "EC".into());
                out.insert("crv".into(), crv.into());
                out.insert("x".into(), b64(&point[1..1 + coord]));
                out.insert("y".into(), b64(&point[1 + coord..]));
            }
            KeyMaterial::Rsa { n, e } => {
                out.insert("kty".into(), "RSA".into());
                out.insert("n".into(), b64(n));
                out.insert("e".into(), b64(e));
            }
        }
    }

    /// Parses the key members of a JWK object. A key type or curve oxid does
    /// not know is `None`: the bundle spec says such keys are skipped, so one
    /// new key type from a federated peer does not cut federation.
    fn from_jwk(jwk: &Map<String, Value>, at: &str) -> Result<Option<Self>, BundleError> {
        let kty = str_member(jwk, "kty", at)?;
        match kty {
            "EC" => {
                let crv = str_member(jwk, "crv", at)?;
                let width = match crv {
                    "P-256" => 32,
                    "P-384" => 48,
                    _ => return Ok(None),
                };
                let mut point = vec![4u8];
                for coord in ["x", "y"] {
                    let bytes = b64url_member(jwk, coord, at)?;
                    if bytes.len() != width {
                        return Err(field_err(
                            format!("{at}.{coord}"),
                            format!("must be {width} bytes for {crv}"),
                        ));
                    }
                    point.extend_from_slice(&bytes);
                }
                Ok(Some(Self(if width == 32 {
                    KeyMaterial::EcP256(point)
                } else {
                    KeyMaterial::EcP384(point)
                })))
            }
            "RSA" => {
                let n = b64url_member(jwk, "n", at)?;
                let e = b64url_member(jwk, "e", at)?;
                for (name, v) in [("n", &n), ("e", &e)] {
                    if v.first().is_none_or(|b| *b == 0) {
                        return Err(field_err(
                            format!("{at}.{name}"),
                            "must be a non-zero integer without leading zero bytes",
                        ));
                    }
                }
                // Invariant: the loop above refused an empty `n`.
                let bits = n.len() * 8 - n[0].leading_zeros() as usize;
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    return Err(field_err(
                        format!("{at}.n"),
                        format!(
                            "RSA key of {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} accepted"
                        ),
                    ));
                }
                Ok(Some(Self(KeyMaterial::Rsa { n, e })))
            }
            _ => Ok(None),
        }
    }
}

/// A JWT signing authority: a key ID and its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    key_id: String,
    public_key: JwtPublicKey,
}

impl JwtAuthority {
    /// Pairs a key ID (1 to [`MAX_KEY_ID_LEN`] bytes) with a key.
    pub fn new(key_id: impl Into<String>, public_key: JwtPublicKey) -> Result<Self, BundleError> {
        let key_id = key_id.into();
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
            return Err(BundleError::InvalidKeyId(key_id));
        }
        Ok(Self { key_id, public_key })
    }

    /// The key ID, matched against a JWT's `kid`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key.
    pub fn public_key(&self) -> &JwtPublicKey {
        &self.public_key
    }

    fn to_jwk(&self, spiffe_use: bool) -> Value {
        let mut jwk = Map::new();
        if spiffe_use {
            jwk.insert("use".into(), "jwt-svid".into());
        }
        jwk.insert("kid".into(), self.key_id.clone().into());
        self.public_key.jwk_members(&mut jwk);
        Value::Object(jwk)
    }
}

/// The authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<CertificateDer<'static>>,
    /// Keyed by key ID: unique by construction, and ordered so encodings
    /// are deterministic.
    jwt_authorities: BTreeMap<String, JwtAuthority>,
    sequence_number: u64,
    refresh_hint: Option<Duration>,
}

/// Something that holds bundles by trust domain.
pub trait BundleSource {
    /// The bundle of `trust_domain`, if known.
    fn bundle_for(&self, trust_domain: &TrustDomain) -> Option<&Bundle>;
}

impl BundleSource for Bundle {
    fn bundle_for(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        (&self.trust_domain == trust_domain).then_some(self)
    }
}

// Maps and lists of `Bundle` or of shared `Arc<Bundle>` alike, so a holder
// of shared snapshots (the agent's synced bundles) verifies against them as
// they are, without copying a bundle per check.
impl<B: Borrow<Bundle>> BundleSource for HashMap<TrustDomain, B> {
    fn bundle_for(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        self.get(trust_domain).map(Borrow::borrow)
    }
}

impl<B: Borrow<Bundle>> BundleSource for BTreeMap<TrustDomain, B> {
    fn bundle_for(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        self.get(trust_domain).map(Borrow::borrow)
    }
}

impl<B: Borrow<Bundle>> BundleSource for [B] {
    fn bundle_for(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        self.iter()
            .map(Borrow::borrow)
            .find(|b: &&Bundle| &b.trust_domain == trust_domain)
    }
}

impl Bundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence_number: 0,
            refresh_hint: None,
        }
    }

    /// The trust domain the authorities speak for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// X.509 roots, in insertion order.
    pub fn x509_authorities(&self) -> &[CertificateDer<'static>] {
        &self.x509_authorities
    }

    /// Adds an X.509 root (ignored if already present). It must be a CA
    /// certificate whose key oxid accepts (ECDSA P-256/P-384, RSA 2048 to
    /// 8192), so every authority can be published as a complete JWK.
    pub fn add_x509_authority(&mut self, cert: CertificateDer<'static>) -> Result<(), BundleError> {
        let parsed =
            x509::parse_cert(&cert).map_err(|e| BundleError::Certificate(e.to_string()))?;
        crate::x509::check_authority(&parsed)
            .map_err(|v| BundleError::Certificate(v.to_string()))?;
        JwtPublicKey::from_spki_der(parsed.public_key().raw)?;
        if !self.x509_authorities.contains(&cert) {
            self.x509_authorities.push(cert);
        }
        Ok(())
    }

    /// Removes an X.509 root; true if it was present.
    pub fn remove_x509_authority(&mut self, cert: &[u8]) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|c| c.as_ref() != cert);
        before != self.x509_authorities.len()
    }

    /// JWT authorities, ordered by key ID.
    pub fn jwt_authorities(&self) -> impl ExactSizeIterator<Item = &JwtAuthority> {
        self.jwt_authorities.values()
    }

    /// The JWT authority with key ID `kid`.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.get(kid)
    }

    /// Adds a JWT authority; a second key under the same ID is refused.
    pub fn add_jwt_authority(&mut self, authority: JwtAuthority) -> Result<(), BundleError> {
        match self.jwt_authorities.get(&authority.key_id) {
            Some(existing) if existing == &authority => Ok(()),
            Some(_) => Err(BundleError::DuplicateKeyId(authority.key_id)),
            None => {
                self.jwt_authorities
                    .insert(authority.key_id.clone(), authority);
                Ok(())
            }
        }
    }

    /// Removes the JWT authority `kid`; true if it was present.
    pub fn remove_jwt_authority(&mut self, kid: &str) -> bool {
        self.jwt_authorities.remove(kid).is_some()
    }

    /// The bundle's sequence number (`spiffe_sequence`). The bundle's owner
    /// sets it, and must change it whenever the authorities change.
    pub fn sequence_number(&self) -> u64 {
        self.sequence_number
    }

    /// Sets the sequence number.
    pub fn set_sequence_number(&mut self, sequence: u64) {
        self.sequence_number = sequence;
    }

    /// How often a federated peer should refetch (`spiffe_refresh_hint`).
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// Sets the refresh hint (whole seconds are kept).
    pub fn set_refresh_hint(&mut self, hint: Option<Duration>) {
        self.refresh_hint = hint.map(|d| Duration::from_secs(d.as_secs()));
    }

    /// X.509 roots as concatenated DER (the Workload API `bundle` encoding).
    pub fn x509_authorities_der(&self) -> Vec<u8> {
        x509::concat_der(&self.x509_authorities)
    }

    /// X.509 roots as PEM.
    pub fn x509_authorities_pem(&self) -> String {
        x509::certs_to_pem(&self.x509_authorities)
    }

    /// A bundle of X.509 roots read from PEM.
    pub fn from_x509_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let mut bundle = Self::new(trust_domain);
        for cert in
            x509::certs_from_pem(pem).map_err(|e| BundleError::Certificate(e.to_string()))?
        {
            bundle.add_x509_authority(cert)?;
        }
        Ok(bundle)
    }

    /// Encodes the SPIFFE bundle format (federation endpoint, `bundle show
    /// --format spiffe`).
    pub fn to_spiffe_json(&self) -> String {
        let mut keys: Vec<Value> = Vec::new();
        for cert in &self.x509_authorities {
            let mut jwk = Map::new();
            jwk.insert("use".into(), "x509-svid".into());
            // Invariant: every stored authority parsed when added; a key we
            // cannot describe as a JWK is still published through x5c.
            if let Ok(cert_key) = x509::parse_cert(cert)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    JwtPublicKey::from_spki_der(c.public_key().raw).map_err(|e| e.to_string())
                })
            {
                cert_key.jwk_members(&mut jwk);
            }
            jwk.insert("x5c".into(), json!([STANDARD.encode(cert)]));
            keys.push(Value::Object(jwk));
        }
        keys.extend(self.jwt_authorities.values().map(|a| a.to_jwk(true)));
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), self.sequence_number.into());
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), hint.as_secs().into());
        }
        Value::Object(doc).to_string()
    }

    /// Decodes the SPIFFE bundle format. Keys with an unknown `use` are
    /// skipped (the format is extensible); every key of a known use must be
    /// complete and valid.
    pub fn from_spiffe_json(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        let root = parse_doc(doc)?;
        let mut bundle = Self::new(trust_domain);
        if let Some(seq) = root.get("spiffe_sequence") {
            bundle.sequence_number = seq
                .as_u64()
                .ok_or_else(|| field_err("spiffe_sequence", "must be a non-negative integer"))?;
        }
        if let Some(hint) = root.get("spiffe_refresh_hint") {
            let secs = hint.as_u64().ok_or_else(|| {
                field_err("spiffe_refresh_hint", "must be a non-negative integer")
            })?;
            bundle.refresh_hint = Some(Duration::from_secs(secs));
        }
        for (i, jwk) in keys_array(&root)?.iter().enumerate() {
            let at = format!("keys[{i}]");
            let jwk = jwk
                .as_object()
                .ok_or_else(|| field_err(&at, "must be an object"))?;
            match str_member(jwk, "use", &at)? {
                "x509-svid" => {
                    let x5c = jwk
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or_else(|| field_err(format!("{at}.x5c"), "missing or not an array"))?;
                    let [cert] = x5c.as_slice() else {
                        return Err(field_err(
                            format!("{at}.x5c"),
                            "must hold exactly one certificate",
                        ));
                    };
                    let der = cert
                        .as_str()
                        .and_then(|s| STANDARD.decode(s).ok())
                        .ok_or_else(|| field_err(format!("{at}.x5c[0]"), "not base64"))?;
                    bundle.add_x509_authority(CertificateDer::from(der))?;
                }
                "jwt-svid" => {
                    let kid = str_member(jwk, "kid", &at)?;
                    if let Some(key) = JwtPublicKey::from_jwk(jwk, &at)? {
                        bundle.add_jwt_authority(JwtAuthority::new(kid, key)?)?;
                    }
                }
                _ => {}
            }
        }
        Ok(bundle)
    }

    /// Encodes the JWT authorities as a plain JWKS (the Workload API's JWT
    /// bundle): `{"keys":[...]}`, each key with its `kid`; never absent.
    pub fn to_jwks_json(&self) -> String {
        let keys: Vec<Value> = self
            .jwt_authorities
            .values()
            .map(|a| a.to_jwk(false))
            .collect();
        json!({ "keys": keys }).to_string()
    }

    /// Decodes a plain JWKS of JWT keys. Every key needs a `kid`; a `use`, if
    /// present, must be `jwt-svid` or `sig`.
    pub fn from_jwks_json(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        let root = parse_doc(doc)?;
        let mut bundle = Self::new(trust_domain);
        for (i, jwk) in keys_array(&root)?.iter().enumerate() {
            let at = format!("keys[{i}]");
            let jwk = jwk
                .as_object()
                .ok_or_else(|| field_err(&at, "must be an object"))?;
            if let Some(u) = jwk.get("use") {
                if !matches!(u.as_str(), Some("jwt-svid" | "sig")) {
                    return Err(field_err(
                        format!("{at}.use"),
                        "must be \"jwt-svid\" or \"sig\"",
                    ));
                }
            }
            let kid = str_member(jwk, "kid", &at)?;
            if let Some(key) = JwtPublicKey::from_jwk(jwk, &at)? {
                bundle.add_jwt_authority(JwtAuthority::new(kid, key)?)?;
            }
        }
        Ok(bundle)
    }
}

fn parse_doc(doc: &[u8]) -> Result<Map<String, Value>, BundleError> {
    if doc.len() > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge(doc.len()));
    }
    crate::json::parse_strict_object(doc).map_err(BundleError::Json)
}

fn keys_array(root: &Map<String, Value>) -> Result<&Vec<Value>, BundleError> {
    root.get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| field_err("keys", "missing or not an array"))
}

fn str_member<'a>(
    jwk: &'a Map<String, Value>,
    name: &str,
    at: &str,
) -> Result<&'a str, BundleError> {
    jwk.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| field_err(format!("{at}.{name}"), "missing or not a string"))
}

fn b64url_member(jwk: &Map<String, Value>, name: &str, at: &str) -> Result<Vec<u8>, BundleError> {
    URL_SAFE_NO_PAD
        .decode(str_member(jwk, name, at)?)
        .map_err(|_| field_err(format!("{at}.{name}"), "not unpadded base64url"))
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
