//! The embedded datastore, on sled: one directory, no setup.
//!
//! sled writes reach disk only on flush, so every write here ends with a
//! flush before the caller hears of success. Flushes run one at a time:
//! concurrent `flush_async` calls deadlock sled 0.34 (the server hung for
//! good under concurrent attestations). A write that finds a flush started
//! after its commit rides on it (group commit). Commits are counted apart
//! from revisions: join-token writes take no revision, and skipping their
//! flush on that account once lost acknowledged tokens to a `SIGKILL`.
//!
//! sled's flush ends in `sync_file_range` on Linux, which writes the data
//! but not the metadata that finds it (block allocation, file size): on
//! ext4, writes acknowledged in the last few seconds were lost when the
//! file system went read-only under the server, as a power cut would lose
//! them. So each flush also `fdatasync`s sled's log file.
//!
//! Multi-key writes run as one sled transaction across all trees, including
//! the revision counter and the change-feed record, so a crash leaves either
//! all of a write or none.

use std::path::Path;

use async_trait::async_trait;
use oxid_pki::{SpiffeId, TrustDomain};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use tokio::sync::watch;

use super::incarnation::{self, Lineage};
use super::{
    Agent, Change, ChangeEvent, CreateMode, DataStore, DataStoreError, Entry, EntryFilter, EntryId,
    JoinToken, StoredBundle,
};

const REVISION_KEY: &[u8] = b"revision";
const PRUNED_KEY: &[u8] = b"pruned_up_to";
const CA_JOURNAL_KEY: &[u8] = b"ca_journal";
/// The store's past openings (`incarnation::Lineage`).
const LINEAGE_KEY: &[u8] = b"lineage";

/// The trees of one transaction, named.
struct Txn<'a> {
    entries: &'a TransactionalTree,
    entry_keys: &'a TransactionalTree,
    agents: &'a TransactionalTree,
    tokens: &'a TransactionalTree,
    bundles: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    changes: &'a TransactionalTree,
}

type TxResult<T> = Result<T, ConflictableTransactionError<DataStoreError>>;

impl Txn<'_> {
    /// Takes the next global revision.
    fn next_revision(&self) -> TxResult<u64> {
        let current = match self.meta.get(REVISION_KEY)? {
            Some(v) => decode_u64(&v).map_err(abort)?,
            None => 0,
        };
        let revision = current + 1;
        self.meta.insert(REVISION_KEY, &revision.to_be_bytes())?;
        Ok(revision)
    }

    /// Appends `event` to the change feed under `revision`.
    fn append(&self, revision: u64, event: ChangeEvent) -> TxResult<()> {
        let change = Change { revision, event };
        self.changes
            .insert(&revision.to_be_bytes(), encode(&change).map_err(abort)?)?;
        Ok(())
    }

    /// Takes the next revision and records `event` under it.
    fn record(&self, event: ChangeEvent) -> TxResult<u64> {
        let revision = self.next_revision()?;
        self.append(revision, event)?;
        Ok(revision)
    }

    /// Stores `entry` under the next revision and records it.
    fn store_entry(&self, mut entry: Entry) -> TxResult<Entry> {
        entry.revision = self.next_revision()?;
        self.entries
            .insert(entry.id.as_str(), encode(&entry).map_err(abort)?)?;
        self.append(
            entry.revision,
            ChangeEvent::EntryUpserted {
                entry: entry.clone(),
            },
        )?;
        Ok(entry)
    }
}

/// How long `open` waits for the directory lock of a store that was just
/// closed: sled's background threads release it a moment after the last
/// handle is dropped, so a restart in the same process can race them.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, DataStoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            // sled has no error variant for this; its message is stable in
            // 0.34. Past the wait, another process really holds the store.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

/// Takes the store's lock file, so a second server on the same data
/// directory is refused with a message saying so, not with sled's own lock
/// error. Like sled's lock, it is waited for up to `LOCK_WAIT`: a store just
/// closed in this process may still be held by a task letting go of it.
fn lock_store(dir: &Path) -> Result<oxid_tls::lock::LockFile, DataStoreError> {
    let path = dir.join("oxid-server.lock");
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match oxid_tls::lock::LockFile::acquire(&path) {
            Ok(lock) => return Ok(lock),
            Err(oxid_tls::lock::LockError::Held { pid, .. }) => {
                if std::time::Instant::now() >= deadline {
                    // The store lives in `<data_dir>/datastore`: the data
                    // directory is what the operator configured.
                    let data_dir = dir.parent().unwrap_or(dir);
                    let by = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                    return Err(DataStoreError::InUse(format!(
                        "another oxid-server is using {}{by}; stop it first, or give this \
                         one its own data_dir",
                        data_dir.display()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

/// Sets every file under `dir` to 0600 and every directory to 0700 (sled
/// makes them with the process umask). Links are left alone: sled makes none.
fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let mode = if kind.is_dir() {
            make_private(&entry.path())?;
            0o700
        } else if kind.is_file() {
            0o600
        } else {
            continue;
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The last revision committed to `meta` (0 for a new store).
fn read_revision(meta: &sled::Tree) -> Result<u64, DataStoreError> {
    match meta.get(REVISION_KEY).map_err(backend)? {
        Some(v) => decode_u64(&v),
        None => Ok(0),
    }
}

/// Records this opening as a new incarnation (see `incarnation.rs`: a
/// copy of the directory cannot be told from the original, so every
/// opening is one), durably before the store serves: an agent given it
/// must find it here after a restart.
fn open_lineage(
    db: &sled::Db,
    meta: &sled::Tree,
    revision: u64,
) -> Result<Lineage, DataStoreError> {
    let mut lineage: Lineage = match meta.get(LINEAGE_KEY).map_err(backend)? {
        Some(v) => decode(&v)?,
        None => Lineage::default(),
    };
    let id = incarnation::random()
        .map_err(|_| DataStoreError::Backend("no randomness for the store's incarnation".into()))?;
    lineage.open(id, revision);
    meta.insert(LINEAGE_KEY, encode(&lineage)?)
        .map_err(backend)?;
    db.flush().map_err(backend)?;
    Ok(lineage)
}

/// The embedded store.
pub struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    /// Uniqueness index: hash of (SPIFFE ID, parent, selectors) → entry ID.
    entry_keys: sled::Tree,
    agents: sled::Tree,
    /// Join tokens by hash of the secret.
    tokens: sled::Tree,
    bundles: sled::Tree,
    /// Revision counter, retention mark, CA journal.
    meta: sled::Tree,
    /// The change feed, keyed by big-endian revision so iteration is ordered.
    changes: sled::Tree,
    revision_tx: watch::Sender<u64>,
    /// This opening's incarnation and the ones before it.
    lineage: Lineage,
    /// Set by the first write that could not be made durable. sled keeps
    /// failing after an I/O error, and the failed write may already be
    /// visible in memory, so no later write is attempted and the revision
    /// followers (the agents' index) never advance past the last durable
    /// one; a restart reopens the store at its durable state.
    failed: std::sync::OnceLock<String>,
    /// sled's log file (`<dir>/db`), for the `fdatasync` its flush lacks.
    log_file: std::sync::Arc<std::fs::File>,
    /// Transactions committed so far, counted after each commit.
    commits: std::sync::atomic::AtomicU64,
    /// Held while a flush runs; what is known durable.
    flushed: tokio::sync::Mutex<Durable>,
    /// `<dir>/oxid-server.lock`, held while the store is open. Last, so it
    /// is released only after sled's handles are dropped.
    _lock: oxid_tls::lock::LockFile,
}

/// What the last flush covered.
struct Durable {
    /// Commits counted before it started.
    commits: u64,
    /// The highest revision committed before it started.
    revision: u64,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds sled's
    /// page cache, which otherwise grows with the database.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, DataStoreError> {
        // The store holds join-token hashes, agent records and the CA
        // journal: 0700 even if the directory existed with a wider mode, and
        // after sled has opened (creating files with the umask's mode) every
        // file in it 0600.
        oxid_tls::socket::prepare_private_dir(dir, 0o700).map_err(backend)?;
        let lock = lock_store(dir)?;
        let db = open_db(dir, cache_bytes)?;
        make_private(dir).map_err(backend)?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let meta = tree("meta")?;
        let revision = read_revision(&meta)?;
        let lineage = open_lineage(&db, &meta, revision)?;
        let (revision_tx, _) = watch::channel(revision);
        let log_file = std::fs::File::open(dir.join("db")).map_err(backend)?;
        Ok(Self {
            entries: tree("entries")?,
            entry_keys: tree("entry_keys")?,
            agents: tree("agents")?,
            tokens: tree("tokens")?,
            bundles: tree("bundles")?,
            changes: tree("changes")?,
            meta,
            db,
            revision_tx,
            lineage,
            failed: std::sync::OnceLock::new(),
            log_file: std::sync::Arc::new(log_file),
            commits: std::sync::atomic::AtomicU64::new(0),
            flushed: tokio::sync::Mutex::new(Durable {
                commits: 0,
                revision,
            }),
            _lock: lock,
        })
    }

    /// Runs `f` as one transaction over every tree, then flushes, then
    /// publishes the new revision. The closure may run more than once (sled
    /// retries on conflict), so it must only touch the transaction.
    async fn write<R>(&self, f: impl Fn(&Txn<'_>) -> TxResult<R>) -> Result<R, DataStoreError> {
        if let Some(reason) = self.failed.get() {
            return Err(refused(reason));
        }
        let trees = (
            &self.entries,
            &self.entry_keys,
            &self.agents,
            &self.tokens,
            &self.bundles,
            &self.meta,
            &self.changes,
        );
        let result = sled::Transactional::transaction(&trees, |(e, k, a, t, b, m, c)| {
            f(&Txn {
                entries: e,
                entry_keys: k,
                agents: a,
                tokens: t,
                bundles: b,
                meta: m,
                changes: c,
            })
        });
        let value = match result {
            Ok(v) => v,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(self.fail(e)),
        };
        // Counted after the commit: a flush that reads a count at or past
        // ours started after our commit, so it covers it.
        let ours = self
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let durable = match self.flush_past(ours).await {
            Ok(durable) => durable,
            Err(e) => return Err(self.fail(e)),
        };
        // Followers only ever see durable revisions, in order.
        self.revision_tx.send_if_modified(|r| {
            let newer = durable > *r;
            *r = (*r).max(durable);
            newer
        });
        Ok(value)
    }

    fn current_revision(&self) -> Result<u64, DataStoreError> {
        read_revision(&self.meta)
    }

    /// Makes commit number `ours` (and every one before it) durable;
    /// returns the revision now known durable. One flush at a time; a flush
    /// that started after our commit already covers it.
    async fn flush_past(&self, ours: u64) -> Result<u64, String> {
        let mut flushed = self.flushed.lock().await;
        if flushed.commits >= ours {
            return Ok(flushed.revision);
        }
        // Everything committed before these reads is in the flush below.
        let commits = self.commits.load(std::sync::atomic::Ordering::SeqCst);
        let revision = self.current_revision().map_err(|e| e.to_string())?;
        self.flush_now().await?;
        flushed.commits = flushed.commits.max(commits);
        flushed.revision = flushed.revision.max(revision);
        Ok(flushed.revision)
    }

    /// A flush of writes made outside transactions (no revision to skip by).
    async fn flush_serialized(&self) -> Result<(), String> {
        let _one_at_a_time = self.flushed.lock().await;
        self.flush_now().await
    }

    /// One flush of everything written so far, on a blocking thread.
    async fn flush_now(&self) -> Result<(), String> {
        let (db, log_file) = (self.db.clone(), self.log_file.clone());
        tokio::task::spawn_blocking(move || {
            db.flush().map_err(|e| e.to_string())?;
            log_file.sync_data().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Records the first durability failure and says what it means.
    fn fail(&self, e: impl std::fmt::Display) -> DataStoreError {
        let reason = self.failed.get_or_init(|| {
            let reason = e.to_string();
            tracing::error!(
                error = %reason,
                "a datastore write could not be made durable: refusing writes until a restart"
            );
            reason
        });
        refused(reason)
    }

    fn read<T: DeserializeOwned>(
        tree: &sled::Tree,
        key: &[u8],
        what: &str,
    ) -> Result<T, DataStoreError> {
        match tree.get(key).map_err(backend)? {
            Some(v) => decode(&v),
            None => Err(DataStoreError::NotFound(what.to_owned())),
        }
    }

    fn scan<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, DataStoreError> {
        tree.iter()
            .values()
            .map(|v| v.map_err(backend).and_then(|v| decode(&v)))
            .collect()
    }

    /// Everything the store holds, for `datastore migrate`. The trees are
    /// read one after another, not in one snapshot: only consistent while
    /// nothing writes, which the caller ensures by holding the only handle
    /// (the store's lock keeps a server out).
    pub fn contents(&self) -> Result<super::StoreContents, DataStoreError> {
        Ok(super::StoreContents {
            revision: read_revision(&self.meta)?,
            entries: Self::scan(&self.entries)?,
            agents: Self::scan(&self.agents)?,
            join_tokens: Self::scan(&self.tokens)?,
            bundles: Self::scan(&self.bundles)?,
            ca_journal: self
                .meta
                .get(CA_JOURNAL_KEY)
                .map_err(backend)?
                .map(|v| v.to_vec()),
        })
    }
}

/// The uniqueness key of an entry.
fn entry_key(entry: &Entry) -> Result<Vec<u8>, DataStoreError> {
    let encoded = serde_json::to_vec(&entry.unique_key())
        .map_err(|e| DataStoreError::Corrupt(e.to_string()))?;
    Ok(ring::digest::digest(&ring::digest::SHA256, &encoded)
        .as_ref()
        .to_vec())
}

/// Inserts `entry` (refusing a duplicate) and records the change.
fn insert_entry(tx: &Txn<'_>, entry: Entry) -> TxResult<Result<Entry, DataStoreError>> {
    let key = entry_key(&entry).map_err(abort)?;
    if tx.entry_keys.get(&key)?.is_some() {
        return Ok(Err(DataStoreError::AlreadyExists(format!(
            "an entry for {} with parent {} and these selectors",
            entry.spiffe_id, entry.parent_id
        ))));
    }
    if tx.entries.get(entry.id.as_str())?.is_some() {
        return Ok(Err(DataStoreError::AlreadyExists(format!(
            "entry {}",
            entry.id
        ))));
    }
    tx.entry_keys.insert(key, entry.id.as_str())?;
    Ok(Ok(tx.store_entry(entry)?))
}

impl SledStore {
    /// Replaces an existing entry; with `expected`, only if it is still at
    /// that revision.
    async fn replace_entry(
        &self,
        entry: Entry,
        expected: Option<u64>,
    ) -> Result<Entry, DataStoreError> {
        self.write(|tx| {
            let old: Entry = match tx.entries.get(entry.id.as_str())? {
                Some(v) => decode(&v).map_err(abort)?,
                None => {
                    return Err(abort(DataStoreError::NotFound(format!(
                        "entry {}",
                        entry.id
                    ))));
                }
            };
            if expected.is_some_and(|revision| revision != old.revision) {
                return Err(abort(DataStoreError::Conflict(format!(
                    "entry {} changed meanwhile (now at revision {})",
                    entry.id, old.revision
                ))));
            }
            let old_key = entry_key(&old).map_err(abort)?;
            let new_key = entry_key(&entry).map_err(abort)?;
            if new_key != old_key {
                if tx.entry_keys.get(&new_key)?.is_some() {
                    return Err(abort(DataStoreError::AlreadyExists(format!(
                        "an entry for {} with parent {} and these selectors",
                        entry.spiffe_id, entry.parent_id
                    ))));
                }
                tx.entry_keys.remove(old_key)?;
                tx.entry_keys.insert(new_key, entry.id.as_str())?;
            }
            tx.store_entry(Entry {
                created_at: old.created_at,
                ..entry.clone()
            })
        })
        .await
    }
}

#[async_trait]
impl DataStore for SledStore {
    async fn create_entries(
        &self,
        entries: Vec<Entry>,
        mode: CreateMode,
    ) -> Vec<Result<Entry, DataStoreError>> {
        let count = entries.len();
        // An abort carries one error, not the batch's results: they wait
        // here (each retry of the closure overwrites them).
        let undone = std::sync::Mutex::new(Vec::new());
        let outcome = self
            .write(|tx| {
                let results = entries
                    .iter()
                    .map(|e| insert_entry(tx, e.clone()))
                    .collect::<TxResult<Vec<_>>>()?;
                let refused = results.iter().any(Result::is_err);
                if mode == CreateMode::Each || (mode == CreateMode::AllOrNothing && !refused) {
                    return Ok(results);
                }
                let results = results
                    .into_iter()
                    .map(|r| match r {
                        Ok(_) if mode == CreateMode::AllOrNothing => {
                            Err(DataStoreError::BatchAborted)
                        }
                        other => other,
                    })
                    .collect();
                *undone.lock().unwrap_or_else(|p| p.into_inner()) = results;
                // Aborting undoes every insert of the transaction.
                Err(abort(DataStoreError::BatchAborted))
            })
            .await;
        match outcome {
            Ok(results) => results,
            Err(DataStoreError::BatchAborted) => {
                undone.into_inner().unwrap_or_else(|p| p.into_inner())
            }
            Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
        }
    }

    async fn update_entry(&self, entry: Entry) -> Result<Entry, DataStoreError> {
        self.replace_entry(entry, None).await
    }

    async fn update_entry_at(&self, entry: Entry, revision: u64) -> Result<Entry, DataStoreError> {
        self.replace_entry(entry, Some(revision)).await
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<Entry, DataStoreError> {
        self.write(|tx| {
            let old: Entry = match tx.entries.remove(id.as_str())? {
                Some(v) => decode(&v).map_err(abort)?,
                None => return Err(abort(DataStoreError::NotFound(format!("entry {id}")))),
            };
            tx.entry_keys.remove(entry_key(&old).map_err(abort)?)?;
            tx.record(ChangeEvent::EntryDeleted { entry: old.clone() })?;
            Ok(old)
        })
        .await
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Entry, DataStoreError> {
        Self::read(
            &self.entries,
            id.as_str().as_bytes(),
            &format!("entry {id}"),
        )
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, DataStoreError> {
        let mut entries: Vec<Entry> = Self::scan(&self.entries)?;
        entries.retain(|e| filter.matches(e));
        entries.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(entries)
    }

    async fn put_agent(
        &self,
        expected: Option<&Agent>,
        agent: Agent,
    ) -> Result<Agent, DataStoreError> {
        self.write(|tx| {
            let stored: Option<Agent> = match tx.agents.get(agent.spiffe_id.as_str())? {
                Some(v) => Some(decode(&v).map_err(abort)?),
                None => None,
            };
            if stored.as_ref() != expected {
                return Err(abort(DataStoreError::Conflict(format!(
                    "agent {}",
                    agent.spiffe_id
                ))));
            }
            tx.agents
                .insert(agent.spiffe_id.as_str(), encode(&agent).map_err(abort)?)?;
            tx.record(ChangeEvent::AgentUpserted {
                agent: agent.clone(),
            })?;
            Ok(agent.clone())
        })
        .await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError> {
        Self::read(&self.agents, id.as_str().as_bytes(), &format!("agent {id}"))
    }

    async fn list_agents(&self) -> Result<Vec<Agent>, DataStoreError> {
        Self::scan(&self.agents)
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError> {
        self.write(|tx| {
            let old: Agent = match tx.agents.remove(id.as_str())? {
                Some(v) => decode(&v).map_err(abort)?,
                None => return Err(abort(DataStoreError::NotFound(format!("agent {id}")))),
            };
            tx.record(ChangeEvent::AgentDeleted { agent: old.clone() })?;
            Ok(old)
        })
        .await
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), DataStoreError> {
        self.write(|tx| {
            if tx.tokens.get(token.hash.as_str())?.is_some() {
                return Err(abort(DataStoreError::AlreadyExists("join token".into())));
            }
            tx.tokens
                .insert(token.hash.as_str(), encode(&token).map_err(abort)?)?;
            Ok(())
        })
        .await
    }

    async fn consume_join_token(
        &self,
        hash: &str,
        now_secs: u64,
    ) -> Result<JoinToken, DataStoreError> {
        // Removal inside the transaction is the single point of truth: two
        // concurrent consumers serialise on it and only one sees the token.
        let token = self
            .write(|tx| match tx.tokens.remove(hash)? {
                Some(v) => decode::<JoinToken>(&v).map_err(abort),
                None => Err(abort(DataStoreError::NotFound("join token".into()))),
            })
            .await?;
        if token.expires_at <= now_secs {
            return Err(DataStoreError::TokenExpired);
        }
        Ok(token)
    }

    async fn put_bundle(&self, bundle: StoredBundle) -> Result<(), DataStoreError> {
        self.write(|tx| {
            tx.bundles.insert(
                bundle.trust_domain.as_str(),
                encode(&bundle).map_err(abort)?,
            )?;
            tx.record(ChangeEvent::BundleUpserted {
                bundle: bundle.clone(),
            })?;
            Ok(())
        })
        .await
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<StoredBundle, DataStoreError> {
        Self::read(
            &self.bundles,
            trust_domain.as_str().as_bytes(),
            &format!("bundle of {trust_domain}"),
        )
    }

    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, DataStoreError> {
        Self::scan(&self.bundles)
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), DataStoreError> {
        self.write(|tx| {
            if tx.bundles.remove(trust_domain.as_str())?.is_none() {
                return Err(abort(DataStoreError::NotFound(format!(
                    "bundle of {trust_domain}"
                ))));
            }
            tx.record(ChangeEvent::BundleDeleted {
                trust_domain: trust_domain.clone(),
            })?;
            Ok(())
        })
        .await
    }

    async fn put_ca_journal(&self, journal: Vec<u8>) -> Result<(), DataStoreError> {
        self.write(|tx| {
            tx.meta.insert(CA_JOURNAL_KEY, journal.as_slice())?;
            tx.record(ChangeEvent::CaJournalUpdated)?;
            Ok(())
        })
        .await
    }

    async fn get_ca_journal(&self) -> Result<Option<Vec<u8>>, DataStoreError> {
        Ok(self
            .meta
            .get(CA_JOURNAL_KEY)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, DataStoreError> {
        let pruned = match self.meta.get(PRUNED_KEY).map_err(backend)? {
            Some(v) => decode_u64(&v)?,
            None => 0,
        };
        if after < pruned {
            return Err(DataStoreError::RevisionGone {
                requested: after,
                oldest: pruned + 1,
            });
        }
        let start = after.saturating_add(1).to_be_bytes();
        self.changes
            .range(start..)
            .values()
            .take(limit)
            .map(|v| v.map_err(backend).and_then(|v| decode(&v)))
            .collect()
    }

    async fn prune_changes(&self, up_to: u64) -> Result<usize, DataStoreError> {
        if let Some(reason) = self.failed.get() {
            return Err(refused(reason));
        }
        // Removing keys one by one outside a transaction is safe: readers
        // check the retention mark first, and it is raised before removal.
        // The mark never moves back (a lower `up_to` would leave a gap
        // below it): idempotent, as on PostgreSQL.
        let current = *self.revision_tx.borrow();
        let marked = match self.meta.get(PRUNED_KEY).map_err(backend)? {
            Some(v) => decode_u64(&v)?,
            None => 0,
        };
        let up_to = up_to.min(current).max(marked);
        self.meta
            .insert(PRUNED_KEY, &up_to.to_be_bytes())
            .map_err(backend)?;
        self.flush_serialized().await.map_err(backend)?;
        let mut removed = 0;
        for key in self.changes.range(..=up_to.to_be_bytes()).keys() {
            if self
                .changes
                .remove(key.map_err(backend)?)
                .map_err(backend)?
                .is_some()
            {
                removed += 1;
            }
        }
        self.flush_serialized().await.map_err(backend)?;
        Ok(removed)
    }

    fn revision(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    fn incarnation(&self) -> &str {
        // Invariant: `open_lineage` added this opening.
        self.lineage.openings.last().map_or("", |o| o.id.as_str())
    }

    fn holds_history_of(&self, incarnation: &str, revision: u64) -> bool {
        self.lineage.holds(incarnation, revision)
    }

    fn write_failure(&self) -> Option<String> {
        self.failed.get().map(|reason| refusal(reason))
    }
}

/// What every write is told once the store has failed, and what health
/// checks report.
fn refusal(reason: &str) -> String {
    format!(
        "writes are refused since a write could not be saved ({reason}); free space or \
         fix the data directory, then restart the server. That write may be lost; \
         every earlier acknowledged write is safe"
    )
}

/// The error every write gets once the store has failed.
fn refused(reason: &str) -> DataStoreError {
    DataStoreError::Backend(refusal(reason))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DataStoreError> {
    serde_json::to_vec(value).map_err(|e| DataStoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DataStoreError> {
    serde_json::from_slice(bytes).map_err(|e| DataStoreError::Corrupt(e.to_string()))
}

fn decode_u64(bytes: &[u8]) -> Result<u64, DataStoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| DataStoreError::Corrupt("counter is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(array))
}

fn backend(e: impl std::fmt::Display) -> DataStoreError {
    DataStoreError::Backend(e.to_string())
}

fn abort(e: DataStoreError) -> ConflictableTransactionError<DataStoreError> {
    ConflictableTransactionError::Abort(e)
}

impl From<UnabortableTransactionError> for DataStoreError {
    fn from(e: UnabortableTransactionError) -> Self {
        backend(e)
    }
}
