//! What the agent keeps in its data directory, so a restart (even a day
//! later, after CA rotation) needs neither a new token nor a new bundle:
//! its key, its SVID and the latest bundle, each written 0600, atomically.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use oxid_pki::bundle::Bundle;
use oxid_pki::{KeyPair, TrustDomain};

use crate::AgentError;
use crate::server::Identity;

const KEY_FILE: &str = "agent.key";
const SVID_FILE: &str = "agent-svid.pem";
const BUNDLE_FILE: &str = "bundle.json";

/// Writes `bytes` to `path` with mode 0600: temp file, sync, rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let io = |e: std::io::Error| AgentError::State(format!("{}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Saves the agent identity.
pub fn save_identity(dir: &Path, identity: &Identity) -> Result<(), AgentError> {
    identity
        .key
        .store(&dir.join(KEY_FILE))
        .map_err(|e| AgentError::State(e.to_string()))?;
    let pem = oxid_pki::x509::certs_to_pem(&identity.chain);
    write_private(&dir.join(SVID_FILE), pem.as_bytes())
}

/// Loads the saved identity, if complete and readable. It is renewed at
/// half its remaining life by the system clock.
pub fn load_identity(dir: &Path) -> Option<Identity> {
    let key = KeyPair::load(&dir.join(KEY_FILE)).ok()?;
    let pem = std::fs::read(dir.join(SVID_FILE)).ok()?;
    let chain = oxid_pki::x509::certs_from_pem(&pem).ok()?;
    Identity::from_chain(key, chain, None, 0, &crate::clock::WallClock::default()).ok()
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
