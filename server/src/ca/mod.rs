//! The CA manager: the server's X.509 CA and JWT key, rotated on schedule.
//!
//! Two slots, current and next. The next authority is prepared at 1/2 of
//! the current one's lifetime and published in the bundle at once, so every
//! agent trusts it before it signs anything; it becomes active at 5/6.
//! Retired authorities stay in the bundle until their `notAfter`, after
//! which nothing they signed is valid (every SVID is clamped to its CA).
//!
//! Every change is published as a [`CaSnapshot`] on a watch
//! ([`CaManager::subscribe`]) once the journal holding it is durable;
//! signing and every reader of the bundle use the latest snapshot.

mod generation;
mod journal;
mod peers;
mod propagation;
mod schedule;
mod snapshot;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::{JwtError, JwtSvid};
use oxid_pki::x509::{SvidParams, X509Ca, X509Error, X509Svid};
use oxid_pki::{KeyAlgorithm, KeyError, SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::clock::{Clock, unix_secs};
use crate::datastore::{DataStore, DataStoreError, StoredBundle};

use self::generation::{Generation, Signers};
pub use self::journal::{AuthorityState, Journal, JournalEntry};
pub use self::propagation::Propagation;
pub use self::schedule::{Action, plan};
pub use self::snapshot::CaSnapshot;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// No authority can sign right now.
    #[error("no active CA")]
    NoActiveAuthority,
    /// A forced rotation step is not possible in the current state.
    #[error("{0}")]
    InvalidTransition(String),
    /// The stored journal does not decode.
    #[error("CA journal is unreadable: {0}")]
    Journal(String),
    /// Certificate work failed.
    #[error(transparent)]
    X509(#[from] X509Error),
    /// JWT work failed.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// A key could not be made, stored or loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The datastore refused the journal or bundle.
    #[error(transparent)]
    Store(#[from] DataStoreError),
}

/// An upstream CA on disk that signs the server's intermediates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// PEM: the upstream CA certificate, then its chain to the root.
    pub cert_file: PathBuf,
    /// PKCS#8 key of the upstream CA (mode 0600).
    pub key_file: PathBuf,
}

/// How the CA is set up.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The trust domain it is the authority of.
    pub trust_domain: TrustDomain,
    /// Key type of CA and JWT keys.
    pub key_type: KeyAlgorithm,
    /// Lifetime of each authority (default 24 h).
    pub ca_ttl: Duration,
    /// Directory for key files (0600). `None` keeps keys in memory only: a
    /// restart then starts a new authority (old roots stay trusted until
    /// they expire).
    pub key_dir: Option<PathBuf>,
    /// Sign intermediates with this upstream CA instead of self-signing.
    pub upstream: Option<UpstreamConfig>,
}

#[derive(Default)]
struct State {
    version: u64,
    generations: Vec<Generation>,
}

/// The CA manager.
pub struct CaManager {
    config: CaConfig,
    clock: Arc<dyn Clock>,
    store: Arc<dyn DataStore>,
    upstream: Option<X509Ca>,
    state: RwLock<State>,
    /// The published state: what signing and the bundle's readers use.
    published: watch::Sender<Arc<CaSnapshot>>,
    /// Serialises rotation steps (timer and operator) so each persists whole.
    rotation: tokio::sync::Mutex<()>,
    /// The other servers' authorities (several servers on one database),
    /// published in the bundle beside this server's.
    peers: RwLock<Arc<Vec<peers::Peer>>>,
    /// How a new authority waits for the other servers.
    propagation: Propagation,
    /// The revision as of which the published bundle holds every other
    /// server's authorities (reported in the heartbeat).
    applied: std::sync::atomic::AtomicU64,
    /// The last heartbeat failed (logged once per outage).
    beat_failing: std::sync::atomic::AtomicBool,
    /// X509-SVIDs signed since start (metrics).
    x509_signed: std::sync::atomic::AtomicU64,
    /// JWT-SVIDs minted since start (metrics).
    jwt_signed: std::sync::atomic::AtomicU64,
}

/// What `ca show` reports of an authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityStatus {
    /// Generation sequence.
    pub sequence: u64,
    /// Lifecycle state.
    pub state: AuthorityState,
    /// Operator-tainted.
    pub tainted: bool,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// JWT key ID.
    pub jwt_key_id: String,
    /// False if its keys were lost in a restart (in-memory keys).
    pub can_sign: bool,
}

impl CaManager {
    /// Loads the journal (or starts fresh), restores what it can, and makes
    /// sure an authority is active, with the default [`Propagation`].
    pub async fn start(
        config: CaConfig,
        clock: Arc<dyn Clock>,
        store: Arc<dyn DataStore>,
    ) -> Result<Arc<Self>, CaError> {
        Self::start_with(config, Propagation::default(), clock, store).await
    }

    /// [`Self::start`] with `propagation`. Returns once the active
    /// authority may sign: every live server has applied it (bounded).
    pub async fn start_with(
        config: CaConfig,
        propagation: Propagation,
        clock: Arc<dyn Clock>,
        store: Arc<dyn DataStore>,
    ) -> Result<Arc<Self>, CaError> {
        let upstream = match &config.upstream {
            Some(u) => Some(X509Ca::load_upstream(
                config.trust_domain.clone(),
                &u.cert_file,
                &u.key_file,
            )?),
            None => None,
        };
        if let Some(dir) = &config.key_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                CaError::Journal(format!(
                    "cannot create key directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let mut state = match store.get_ca_journal().await? {
            Some(bytes) => generation::restore_state(&config, &bytes)?,
            None => State::default(),
        };
        // What a previous run of this server shared (its rows are in the
        // shared bundle as they are) longer ago than the wait's bound signs
        // without waiting again, so a server restarting while another is
        // dead but not yet stale is not held up (`propagation.rs`): that
        // run would have signed with it by now, whatever the others did. A
        // younger one waits again: the previous run may have died in its
        // own wait (a crash at start), before anyone else had it.
        let shared = store.own_authorities().await?;
        let now = unix_secs(clock.now());
        for g in &mut state.generations {
            g.cleared = propagation::shared_long_enough(g, &shared, now, propagation.timeout);
        }
        let (rows, applied) = store.peer_authorities_at().await?;
        let peers = peers::parse(rows);
        let restored = !state.generations.is_empty();
        let (published, _) = watch::channel(Arc::new(snapshot_of(
            &config.trust_domain,
            &state,
            &peers,
            now,
            Sequence {
                previous: stored_bundle(store.as_ref(), &config.trust_domain)
                    .await?
                    .map(|stored| (stored, state.version)),
                floor: applied,
            },
        )));
        let manager = Arc::new(Self {
            config,
            clock,
            store,
            upstream,
            state: RwLock::new(state),
            published,
            rotation: tokio::sync::Mutex::new(()),
            peers: RwLock::new(Arc::new(peers)),
            propagation,
            applied: std::sync::atomic::AtomicU64::new(applied),
            beat_failing: std::sync::atomic::AtomicBool::new(false),
            x509_signed: std::sync::atomic::AtomicU64::new(0),
            jwt_signed: std::sync::atomic::AtomicU64::new(0),
        });
        manager.share_and_clear(restored).await?;
        Ok(manager)
    }

    /// The end of a start: this server is live from now (another server's
    /// new authority waits for it too); what was restored is shared again
    /// (the bundle write may have been lost with a crash after the journal
    /// write); a due rotation step runs; and the active authority signs
    /// once every live server has it.
    async fn share_and_clear(&self, restored: bool) -> Result<(), CaError> {
        self.beat().await;
        if restored {
            let _guard = self.rotation.lock().await;
            self.persist().await?;
        }
        self.rotate().await?;
        let _guard = self.rotation.lock().await;
        let uncleared = self
            .read()
            .generations
            .iter()
            .find(|g| g.entry.state == AuthorityState::Active && !g.cleared)
            .map(|g| g.entry.sequence);
        if let Some(sequence) = uncleared {
            self.clear(sequence).await?;
        }
        Ok(())
    }

    /// One scheduled rotation step, if one is due. Returns what was done.
    /// Also drops forgotten servers' authorities once they have expired
    /// (`DataStore::prune_forgotten_authorities`).
    pub async fn rotate(&self) -> Result<Action, CaError> {
        let _guard = self.rotation.lock().await;
        let now = self.clock.now();
        let action = {
            let state = self.read();
            let entries: Vec<&JournalEntry> = state.generations.iter().map(|g| &g.entry).collect();
            plan(&entries, now)
        };
        self.apply(&action, now).await?;
        match self.store.prune_forgotten_authorities(unix_secs(now)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "removed expired authorities of forgotten servers"),
            Err(e) => tracing::warn!(error = %e, "cannot prune forgotten servers' authorities"),
        }
        Ok(action)
    }

    /// Operator: prepare the next authority now.
    pub async fn force_prepare(&self) -> Result<(), CaError> {
        let _guard = self.rotation.lock().await;
        if self.find(AuthorityState::Prepared).is_some() {
            return Err(CaError::InvalidTransition(
                "an authority is already prepared".into(),
            ));
        }
        self.apply(&Action::Prepare, self.clock.now()).await
    }

    /// Operator: activate the prepared authority now.
    pub async fn force_activate(&self) -> Result<(), CaError> {
        let _guard = self.rotation.lock().await;
        if self.find(AuthorityState::Prepared).is_none() {
            return Err(CaError::InvalidTransition(
                "no prepared authority to activate (run `ca rotate --prepare` first)".into(),
            ));
        }
        self.apply(&Action::Activate, self.clock.now()).await
    }

    /// Operator: mark a retired authority tainted, so agents replace what it
    /// signed. The active authority cannot be tainted: rotate first.
    pub async fn taint(&self, sequence: u64) -> Result<(), CaError> {
        let _guard = self.rotation.lock().await;
        {
            let mut state = self.write();
            let g = state
                .generations
                .iter_mut()
                .find(|g| g.entry.sequence == sequence)
                .ok_or_else(|| CaError::InvalidTransition(format!("no authority {sequence}")))?;
            if g.entry.state != AuthorityState::Old {
                return Err(CaError::InvalidTransition(format!(
                    "authority {sequence} is {:?}; only a retired authority can be tainted",
                    g.entry.state
                )));
            }
            g.entry.tainted = true;
            state.version += 1;
        }
        self.persist().await
    }

    /// Signs an X509-SVID with the active authority.
    pub fn sign_x509_svid(&self, params: &SvidParams<'_>) -> Result<X509Svid, CaError> {
        let signers = self.active_signers()?;
        let svid = signers.x509.issue_x509_svid(params, self.clock.now())?;
        self.x509_signed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(svid)
    }

    /// Mints a JWT-SVID with the active authority's key.
    pub fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, CaError> {
        let signers = self.active_signers()?;
        let svid = signers
            .jwt
            .mint(spiffe_id, audiences, ttl, self.clock.now())?;
        self.jwt_signed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(svid)
    }

    /// The trust domain's bundle: every authority not yet expired. A copy;
    /// readers on a hot path use [`Self::snapshot`].
    pub fn bundle(&self) -> Bundle {
        Bundle::clone(self.snapshot().bundle())
    }

    /// The published state now.
    pub fn snapshot(&self) -> Arc<CaSnapshot> {
        self.published.borrow().clone()
    }

    /// The published state, now and at every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CaSnapshot>> {
        self.published.subscribe()
    }

    /// All authorities, oldest first.
    pub fn authorities(&self) -> Vec<AuthorityStatus> {
        self.read()
            .generations
            .iter()
            .map(|g| AuthorityStatus {
                sequence: g.entry.sequence,
                state: g.entry.state,
                tainted: g.entry.tainted,
                not_before: g.entry.not_before,
                not_after: g.entry.not_after,
                jwt_key_id: g.entry.jwt_key_id.clone(),
                can_sign: g.signers.is_some(),
            })
            .collect()
    }

    /// (X509-SVIDs, JWT-SVIDs) signed since start.
    pub fn signed_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.x509_signed.load(Relaxed),
            self.jwt_signed.load(Relaxed),
        )
    }

    /// Longest SVID TTL an entry may ask for: 1/6 of the CA lifetime, so an
    /// SVID signed just before a rotation never outlives its CA by design.
    pub fn max_svid_ttl(&self) -> Duration {
        self.config.ca_ttl / 6
    }

    fn active_signers(&self) -> Result<Arc<Signers>, CaError> {
        self.published
            .borrow()
            .signers()
            .cloned()
            .ok_or(CaError::NoActiveAuthority)
    }

    fn find(&self, wanted: AuthorityState) -> Option<u64> {
        self.read()
            .generations
            .iter()
            .find(|g| g.entry.state == wanted)
            .map(|g| g.entry.sequence)
    }

    async fn apply(&self, action: &Action, now: SystemTime) -> Result<(), CaError> {
        match action {
            Action::None => return Ok(()),
            Action::CreateActive | Action::Prepare => {
                let state = if *action == Action::CreateActive {
                    AuthorityState::Active
                } else {
                    AuthorityState::Prepared
                };
                let generation = self.mint_generation(state, now)?;
                let sequence = generation.entry.sequence;
                {
                    let mut s = self.write();
                    if state == AuthorityState::Active {
                        for g in &mut s.generations {
                            if g.entry.state == AuthorityState::Active {
                                g.entry.state = AuthorityState::Old;
                            }
                        }
                    }
                    s.generations.push(generation);
                    s.version += 1;
                }
                self.persist().await?;
                if state == AuthorityState::Active {
                    // Nothing else can sign: this one may once it has
                    // reached every live server's agents.
                    self.clear(sequence).await?;
                }
                return Ok(());
            }
            Action::Activate => {
                // The old authority signs until the prepared one has
                // reached every live server's agents.
                if let Some(prepared) = self.find(AuthorityState::Prepared) {
                    self.clear(prepared).await?;
                }
                let mut s = self.write();
                for g in &mut s.generations {
                    g.entry.state = match g.entry.state {
                        AuthorityState::Active => AuthorityState::Old,
                        AuthorityState::Prepared => AuthorityState::Active,
                        other => other,
                    };
                }
                s.version += 1;
            }
            Action::Prune(sequences) => {
                let removed: Vec<JournalEntry> = {
                    let mut s = self.write();
                    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut s.generations)
                        .into_iter()
                        .partition(|g| sequences.contains(&g.entry.sequence));
                    s.generations = kept;
                    s.version += 1;
                    gone.into_iter().map(|g| g.entry).collect()
                };
                self.persist().await?;
                for entry in removed {
                    if let Some((x, j)) = entry.key_files {
                        let _ = std::fs::remove_file(x);
                        let _ = std::fs::remove_file(j);
                    }
                }
                return Ok(());
            }
        }
        self.persist().await
    }

    /// Creates a new generation's keys and certificates.
    fn mint_generation(
        &self,
        state: AuthorityState,
        now: SystemTime,
    ) -> Result<Generation, CaError> {
        let sequence = self
            .read()
            .generations
            .iter()
            .map(|g| g.entry.sequence)
            .max()
            .unwrap_or(0)
            + 1;
        generation::mint(&self.config, self.upstream.as_ref(), sequence, state, now)
    }

    /// Writes the journal durably, then this server's rows of the shared
    /// bundle, publishes the new state, then writes the bundle durably.
    /// Published only once the journal holds it, so nothing is signed by an
    /// authority a restart would not know, and only once the shared bundle
    /// holds it, so nothing is signed by an authority the other servers
    /// (and, through them, their agents) cannot learn; published before the
    /// bundle write, so a sync stream woken by that write (through the
    /// index) reads the new bundle. Called with `rotation` held, so `state`
    /// does not change meanwhile.
    async fn persist(&self) -> Result<(), CaError> {
        let (journal, rows, snapshot) = {
            let state = self.read();
            let journal = Journal {
                version: state.version,
                entries: state.generations.iter().map(|g| g.entry.clone()).collect(),
            };
            let snapshot = snapshot_of(
                &self.config.trust_domain,
                &state,
                &self.peers(),
                self.now_secs(),
                self.sequence(),
            );
            (journal, peers::own_rows(&state), snapshot)
        };
        self.store.put_ca_journal(journal.encode()?).await?;
        let shared_at = self.store.put_own_authorities(rows).await?;
        for g in &mut self.write().generations {
            g.shared_at.get_or_insert(shared_at);
        }
        let spiffe_json = snapshot.spiffe_json().to_string();
        self.published.send_replace(Arc::new(snapshot));
        self.store
            .put_bundle(StoredBundle {
                trust_domain: self.config.trust_domain.clone(),
                spiffe_json,
            })
            .await?;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated:
        // every writer mutates plain fields in place.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot of the current state and peers (with `rotation` held).
    fn snapshot_now(&self) -> CaSnapshot {
        snapshot_of(
            &self.config.trust_domain,
            &self.read(),
            &self.peers(),
            self.now_secs(),
            self.sequence(),
        )
    }

    /// What the next snapshot's `spiffe_sequence` follows.
    fn sequence(&self) -> Sequence {
        let last = self.snapshot();
        Sequence {
            previous: Some((last.bundle().clone(), last.version())),
            floor: self.applied.load(std::sync::atomic::Ordering::Acquire),
        }
    }
}

/// How a new snapshot numbers its bundle (`spiffe_sequence`, which must
/// increase and change with every change of the content). The journal's
/// version alone does not: another server's rotation changes this
/// server's bundle (the union) and not its journal. So the number stays
/// while neither the content nor the journal version changes (at start:
/// the number last stored, if the content is the same), and otherwise
/// takes at least the last one plus one, the journal version, and the
/// feed revision of the peers' rows the bundle holds (`floor`: each
/// change of the number follows at least one new revision, which keeps it
/// increasing across restarts).
struct Sequence {
    /// The last bundle and the journal version it came from.
    previous: Option<(Arc<Bundle>, u64)>,
    floor: u64,
}

impl Sequence {
    fn of(&self, bundle: &Bundle, version: u64) -> u64 {
        let base = version.max(self.floor);
        let Some((previous, previous_version)) = &self.previous else {
            return base;
        };
        let mut same = Bundle::clone(previous);
        same.set_sequence_number(bundle.sequence_number());
        if same == *bundle && *previous_version == version {
            previous.sequence_number()
        } else {
            base.max(previous.sequence_number() + 1)
        }
    }
}

/// The own bundle as last stored (`persist`), if it parses: where the
/// numbering continues after a restart.
async fn stored_bundle(
    store: &dyn DataStore,
    trust_domain: &TrustDomain,
) -> Result<Option<Arc<Bundle>>, CaError> {
    match store.get_bundle(trust_domain).await {
        Ok(stored) => Ok(Bundle::from_spiffe_json(
            trust_domain.clone(),
            stored.spiffe_json.as_bytes(),
        )
        .ok()
        .map(Arc::new)),
        Err(DataStoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The published state: this server's generations (the signers among
/// them), and the other servers' unexpired authorities in the bundle.
fn snapshot_of(
    trust_domain: &TrustDomain,
    state: &State,
    peers: &[peers::Peer],
    now_secs: u64,
    sequence: Sequence,
) -> CaSnapshot {
    let mut bundle = Bundle::new(trust_domain.clone());
    for g in &state.generations {
        // Invariant: roots were accepted as authorities when created or restored.
        let _ = bundle.add_x509_authority(g.root.clone());
        let _ = bundle.add_jwt_authority(g.jwt_authority.clone());
    }
    peers::add_to(&mut bundle, peers, now_secs);
    bundle.set_sequence_number(sequence.of(&bundle, state.version));
    let version = state.version;
    let active = state
        .generations
        .iter()
        .find(|g| g.entry.state == AuthorityState::Active && g.cleared)
        .and_then(|g| Some((g.entry.sequence, g.signers.clone()?)));
    CaSnapshot::new(bundle, active, version)
}
