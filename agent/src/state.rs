//! What the agent keeps in its data directory besides its identity (which
//! is `identity`'s), so a restart (even a day later, after CA rotation)
//! needs no new bundle: the latest bundle, written 0600, atomically.

use std::path::Path;

use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;

use crate::AgentError;

const BUNDLE_FILE: &str = "bundle.json";

/// Writes `bytes` to `path` with mode 0600, atomically and durably (pki's
/// one writer of private files).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    oxid_pki::key::write_private(path, bytes)
        .map_err(|e| AgentError::State(format!("{}: {e}", path.display())))
}

/// Saves the latest bundle of the agent's trust domain.
pub fn save_bundle(dir: &Path, bundle: &Bundle) -> Result<(), AgentError> {
    write_private(&dir.join(BUNDLE_FILE), bundle.to_spiffe_json().as_bytes())
}

/// Loads the saved bundle.
pub fn load_bundle(dir: &Path, trust_domain: &TrustDomain) -> Option<Bundle> {
    let json = std::fs::read(dir.join(BUNDLE_FILE)).ok()?;
    Bundle::from_spiffe_json(trust_domain.clone(), &json).ok()
}
