//! The CA journal: what must survive a restart to keep the same CA.
//!
//! Stored in the datastore as JSON. Public parts (certificates, JWT public
//! keys) are always in it, so retired authorities stay in the bundle after a
//! restart. Private keys never are: they live in 0600 files named here, or,
//! with in-memory keys, nowhere (a restart then starts a new authority).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::CaError;

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing everything.
    Active,
    /// Replaced; kept in the bundle until what it signed has expired.
    Old,
}

/// One generation of the CA: an X.509 CA and a JWT key, rotated together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalEntry {
    /// Increases by one per generation.
    pub sequence: u64,
    /// Lifecycle state.
    pub state: AuthorityState,
    /// Set by an operator: agents should replace what it signed.
    pub tainted: bool,
    /// The CA chain (own certificate first, anchor last), base64 DER.
    pub x509_chain: Vec<String>,
    /// The JWT key ID.
    pub jwt_key_id: String,
    /// The JWT public key, base64 SubjectPublicKeyInfo DER.
    pub jwt_public_key: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds; nothing the generation signed outlives it.
    pub not_after: u64,
    /// Key files (X.509, JWT) if keys are kept on disk.
    pub key_files: Option<(String, String)>,
}

/// The whole journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// Bumped on every change: the bundle's `spiffe_sequence`.
    pub version: u64,
    /// Generations, oldest first.
    pub entries: Vec<JournalEntry>,
}

impl Journal {
    /// Parses a stored journal.
    pub fn decode(bytes: &[u8]) -> Result<Self, CaError> {
        serde_json::from_slice(bytes).map_err(|e| CaError::Journal(e.to_string()))
    }

    /// Serialises for storage.
    pub fn encode(&self) -> Result<Vec<u8>, CaError> {
        serde_json::to_vec(self).map_err(|e| CaError::Journal(e.to_string()))
    }
}

/// Base64 of DER bytes, as the journal stores them.
pub(crate) fn b64(der: &[u8]) -> String {
    STANDARD.encode(der)
}

/// DER bytes from the journal.
pub(crate) fn unb64(s: &str) -> Result<Vec<u8>, CaError> {
    STANDARD
        .decode(s)
        .map_err(|_| CaError::Journal("a certificate or key is not base64".into()))
}
