//! The other servers of the trust domain (several on one PostgreSQL
//! database): their authorities join this server's in the bundle it
//! publishes, so what agents receive is the union, an SVID from any server
//! verifies with the bundle from any other, and each server's agent-API
//! verifier accepts agents whose SVIDs another server signed. Their keys
//! never leave their servers: only the public parts are in the store, one
//! row per server and authority (`DataStore::put_own_authorities`).

use std::sync::Arc;

use oxid_pki::bundle::{Bundle, JwtAuthority, JwtPublicKey};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use super::journal::{b64, unb64};
use super::{CaError, CaManager, State};
use crate::clock::unix_secs;
use crate::datastore::ServerAuthority;

/// One authority of another server, parsed.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    root: CertificateDer<'static>,
    jwt: JwtAuthority,
    not_after: u64,
}

/// This server's rows of the shared bundle: the public parts of every
/// generation it holds (the store fills in the server's name).
pub(super) fn own_rows(state: &State) -> Vec<ServerAuthority> {
    state
        .generations
        .iter()
        .map(|g| ServerAuthority {
            server: String::new(),
            sequence: g.entry.sequence,
            x509_authority: b64(&g.root),
            jwt_key_id: g.entry.jwt_key_id.clone(),
            jwt_public_key: g.entry.jwt_public_key.clone(),
            not_after: g.entry.not_after,
        })
        .collect()
}

/// The rows of other servers that parse; a row that does not is skipped
/// with a warning (one bad row must not take the others' trust away).
pub(super) fn parse(rows: Vec<ServerAuthority>) -> Vec<Peer> {
    rows.into_iter()
        .filter_map(|row| match parse_one(&row) {
            Ok(peer) => Some(peer),
            Err(e) => {
                tracing::warn!(server = %row.server, sequence = row.sequence, error = %e,
                    "skipping another server's CA authority that does not parse");
                None
            }
        })
        .collect()
}

fn parse_one(row: &ServerAuthority) -> Result<Peer, CaError> {
    let root = CertificateDer::from(unb64(&row.x509_authority)?);
    let key = JwtPublicKey::from_spki_der(&unb64(&row.jwt_public_key)?)
        .map_err(|e| CaError::Journal(e.to_string()))?;
    let jwt = JwtAuthority::new(row.jwt_key_id.clone(), key)
        .map_err(|e| CaError::Journal(e.to_string()))?;
    Ok(Peer {
        root,
        jwt,
        not_after: row.not_after,
    })
}

/// Adds the peers' unexpired authorities to `bundle` (an authority already
/// in it, such as an upstream root several servers share, is added once).
pub(super) fn add_to(bundle: &mut Bundle, peers: &[Peer], now_secs: u64) {
    for peer in peers.iter().filter(|p| p.not_after > now_secs) {
        if !bundle.x509_authorities().contains(&peer.root) {
            // A peer's root is refused only if it is not a CA certificate;
            // then it is simply not trusted.
            let _ = bundle.add_x509_authority(peer.root.clone());
        }
        let _ = bundle.add_jwt_authority(peer.jwt.clone());
    }
}

impl CaManager {
    /// Reads the other servers' authorities and republishes the bundle
    /// with them. Under the rotation lock, so it never races a rotation's
    /// publish.
    pub async fn refresh_peers(&self) -> Result<(), CaError> {
        let _guard = self.rotation.lock().await;
        self.reload_peers().await
    }

    /// `refresh_peers` with `rotation` held by the caller: reads the rows
    /// with the revision they are current as of, publishes, and then
    /// reports that revision as applied (`propagation.rs`): the sync
    /// streams, woken by the publish, push the new bundle to the agents.
    pub(super) async fn reload_peers(&self) -> Result<(), CaError> {
        let (rows, revision) = self.store.peer_authorities_at().await?;
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(parse(rows));
        let snapshot = self.snapshot_now();
        self.published.send_replace(Arc::new(snapshot));
        self.applied
            .fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
        self.beat().await;
        Ok(())
    }

    /// Refreshes the peers now, then each time `changed` moves (the index
    /// saw another server's authorities change), until the task is aborted.
    pub fn follow_peers(
        self: Arc<Self>,
        mut changed: watch::Receiver<u64>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // Once first: rows written between `start`'s read and the
            // index's load carry a change the index never replays.
            let mut first = true;
            loop {
                if !std::mem::take(&mut first) && changed.changed().await.is_err() {
                    return;
                }
                while let Err(e) = self.refresh_peers().await {
                    tracing::warn!(error = %e, "cannot read the other servers' CA authorities; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        })
    }

    /// The peers as last read.
    pub(super) fn peers(&self) -> Arc<Vec<Peer>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn now_secs(&self) -> u64 {
        unix_secs(self.clock.now())
    }
}
