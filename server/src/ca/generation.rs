//! One generation of the CA: its keys and certificates, made new
//! (`mint`) or rebuilt from the journal (`restore`, `restore_state`).

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use oxid_pki::KeyPair;
use oxid_pki::bundle::{JwtAuthority, JwtPublicKey};
use oxid_pki::jwt::JwtSigner;
use oxid_pki::x509::X509Ca;
use rustls_pki_types::CertificateDer;

use super::journal::{b64, unb64};
use super::{AuthorityState, CaConfig, CaError, Journal, JournalEntry, State};
use crate::clock::unix_secs;

pub(super) struct Signers {
    pub(super) x509: X509Ca,
    pub(super) jwt: JwtSigner,
}

pub(super) struct Generation {
    pub(super) entry: JournalEntry,
    pub(super) root: CertificateDer<'static>,
    pub(super) jwt_authority: JwtAuthority,
    /// Absent for an authority whose keys were in memory before a restart.
    pub(super) signers: Option<Arc<Signers>>,
    /// The revision at which this process first wrote the generation into
    /// the shared bundle (`propagation.rs`).
    pub(super) shared_at: Option<u64>,
    /// Every live server has applied `shared_at`: it may sign.
    pub(super) cleared: bool,
}

/// Makes generation `sequence`: new keys (stored in the key directory, if
/// any) and its certificates, in `state`.
pub(super) fn mint(
    config: &CaConfig,
    upstream: Option<&X509Ca>,
    sequence: u64,
    state: AuthorityState,
    now: SystemTime,
) -> Result<Generation, CaError> {
    let td = config.trust_domain.clone();
    let x509_key = KeyPair::generate(config.key_type)?;
    let jwt_key = KeyPair::generate(config.key_type)?;
    let key_files = match &config.key_dir {
        Some(dir) => {
            let x = dir.join(format!("ca-{sequence}-x509.key"));
            let j = dir.join(format!("ca-{sequence}-jwt.key"));
            x509_key.store(&x)?;
            jwt_key.store(&j)?;
            Some((x.display().to_string(), j.display().to_string()))
        }
        None => None,
    };
    let x509 = match upstream {
        Some(up) => X509Ca::new_intermediate(up, td.clone(), x509_key, config.ca_ttl, now)?,
        None => X509Ca::new_root(td.clone(), x509_key, config.ca_ttl, now)?,
    };
    let jwt_public_key = b64(jwt_key.public_key_spki());
    let kid = JwtSigner::key_id_for(&jwt_key);
    let jwt = JwtSigner::new(td, jwt_key, kid.clone(), None, x509.not_after())?;
    let entry = JournalEntry {
        sequence,
        state,
        tainted: false,
        x509_chain: x509.chain().iter().map(|c| b64(c)).collect(),
        jwt_key_id: kid,
        jwt_public_key,
        not_before: unix_secs(x509.not_before()),
        not_after: unix_secs(x509.not_after()),
        key_files,
    };
    Ok(Generation {
        root: x509.root().clone(),
        jwt_authority: jwt.authority().clone(),
        entry,
        signers: Some(Arc::new(Signers { x509, jwt })),
        shared_at: None,
        cleared: false,
    })
}

/// The state a stored journal describes. A generation whose keys were in
/// memory can no longer sign, but what it signed stays trusted until it
/// expires: it is retired.
pub(super) fn restore_state(config: &CaConfig, bytes: &[u8]) -> Result<State, CaError> {
    let journal = Journal::decode(bytes)?;
    let mut state = State {
        version: journal.version,
        generations: Vec::new(),
    };
    for entry in journal.entries {
        let mut generation = restore(config, entry)?;
        if generation.signers.is_none() && generation.entry.state != AuthorityState::Old {
            generation.entry.state = AuthorityState::Old;
            state.version += 1;
        }
        state.generations.push(generation);
    }
    Ok(state)
}

/// A key file the journal names, read from this server's key directory
/// (where it was written, unless the data directory was moved with its
/// keys). Not there, it is most often a second server started under
/// another one's `server_name` (several servers on one database), reading
/// that server's journal without its keys: say so rather than share them.
fn load_key(key_dir: &Path, recorded: &str, sequence: u64) -> Result<KeyPair, CaError> {
    let recorded = Path::new(recorded);
    let local = recorded.file_name().map(|name| key_dir.join(name));
    match local {
        Some(path) if path.exists() => Ok(KeyPair::load(&path)?),
        _ => Err(CaError::Journal(format!(
            "the journal's authority {sequence} has its key in {}, which is not in this \
             server's key directory {}: another server may be running under this server_name \
             on the same database (give each its own), or this is not the data directory the \
             journal was written from",
            recorded.display(),
            key_dir.display()
        ))),
    }
}

/// Rebuilds a generation from its journal entry, with its keys if they are
/// on disk. A generation whose keys are gone keeps its public parts.
fn restore(config: &CaConfig, entry: JournalEntry) -> Result<Generation, CaError> {
    let chain: Vec<CertificateDer<'static>> = entry
        .x509_chain
        .iter()
        .map(|c| unb64(c).map(CertificateDer::from))
        .collect::<Result<_, _>>()?;
    let root = chain
        .last()
        .cloned()
        .ok_or_else(|| CaError::Journal(format!("authority {} has no chain", entry.sequence)))?;
    let jwt_public = JwtPublicKey::from_spki_der(&unb64(&entry.jwt_public_key)?)
        .map_err(|e| CaError::Journal(e.to_string()))?;
    let jwt_authority = JwtAuthority::new(entry.jwt_key_id.clone(), jwt_public)
        .map_err(|e| CaError::Journal(e.to_string()))?;
    let signers = match (&entry.key_files, &config.key_dir) {
        (Some((x, j)), Some(key_dir)) => {
            let x509 = X509Ca::restore(
                config.trust_domain.clone(),
                chain,
                load_key(key_dir, x, entry.sequence)?,
            )?;
            let jwt = JwtSigner::new(
                config.trust_domain.clone(),
                load_key(key_dir, j, entry.sequence)?,
                entry.jwt_key_id.clone(),
                None,
                x509.not_after(),
            )?;
            Some(Arc::new(Signers { x509, jwt }))
        }
        _ => None,
    };
    Ok(Generation {
        entry,
        root,
        jwt_authority,
        signers,
        shared_at: None,
        cleared: false,
    })
}
