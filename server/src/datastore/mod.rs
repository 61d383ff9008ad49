//! The datastore: the narrow async interface the rest of the server uses,
//! its embedded backend (sled, the default) and PostgreSQL (several servers
//! sharing one database; `postgres/`).
//!
//! Contract every backend keeps:
//! - A write the caller sees succeed is durable (flushed) before it returns.
//! - A write that touches several keys (an entry and its uniqueness index,
//!   the change feed, the revision counter) is one atomic transaction.
//! - Every write appends one record to the change feed with the next global
//!   revision; the feed is readable from any retained revision, so a
//!   restarted server (or several servers sharing one database) can resume.

mod contents;
mod incarnation;
pub mod postgres;
mod sled_store;
mod types;

use async_trait::async_trait;
use oxid_pki::{SpiffeId, TrustDomain};
use tokio::sync::watch;

pub use self::contents::StoreContents;
pub use self::postgres::{PgConfig, PgStore};
pub use self::sled_store::SledStore;
pub use self::types::{
    Agent, Change, ChangeEvent, Entry, EntryId, ForgetOptions, Forgotten, Heartbeat,
    InvalidEntryId, JoinToken, SelectorSet, ServerAuthority, ServerInfo, StoredBundle,
};

/// Why a datastore operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataStoreError {
    /// The record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record with the same identity already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The requested revision is older than the oldest retained change.
    #[error("revision {requested} is no longer retained (oldest is {oldest})")]
    RevisionGone {
        /// What the reader asked for.
        requested: u64,
        /// The oldest revision still readable.
        oldest: u64,
    },
    /// The record changed since the caller read it (compare-and-swap
    /// lost): read it again and decide again.
    #[error("{0} changed concurrently")]
    Conflict(String),
    /// Not created: another entry of an all-or-nothing batch was refused.
    #[error("not created: another entry of the batch was refused")]
    BatchAborted,
    /// A join token was used after it expired.
    #[error("join token has expired")]
    TokenExpired,
    /// The store could not complete the operation (I/O, disk full,
    /// read-only file system). Nothing was changed.
    #[error("datastore unavailable: {0}")]
    Backend(String),
    /// Another process (another oxid-server) has the store open.
    #[error("{0}")]
    InUse(String),
    /// A stored record does not decode: the store is damaged.
    #[error("datastore record is corrupt: {0}")]
    Corrupt(String),
    /// The operation is refused as asked (forgetting a live server, or
    /// this server itself); the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// How long a server's heartbeat counts: one older than this (and one
/// marked stopped) is of a server that is not live. Ten beats.
pub const LIVENESS: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a server beats.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Filters for listing entries. Every set filter must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries granting this ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries parented on this ID.
    pub parent_id: Option<SpiffeId>,
    /// Only entries whose selectors are exactly these (if `exact`), or
    /// include all of these.
    pub selectors: Option<(Vec<oxid_pki::Selector>, bool)>,
}

impl EntryFilter {
    /// True if `entry` passes the filter.
    pub fn matches(&self, entry: &Entry) -> bool {
        if self
            .spiffe_id
            .as_ref()
            .is_some_and(|id| id != &entry.spiffe_id)
        {
            return false;
        }
        if self
            .parent_id
            .as_ref()
            .is_some_and(|id| id != &entry.parent_id)
        {
            return false;
        }
        match &self.selectors {
            None => true,
            Some((wanted, true)) => {
                wanted.len() == entry.selectors.len()
                    && wanted.iter().all(|s| entry.selectors.contains(s))
            }
            Some((wanted, false)) => wanted.iter().all(|s| entry.selectors.contains(s)),
        }
    }
}

/// How [`DataStore::create_entries`] treats a batch in which some entries
/// are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// Each entry on its own: the valid ones are created.
    Each,
    /// Every entry or none.
    AllOrNothing,
    /// Check every entry against the store, as `AllOrNothing` would, and
    /// create none. Each success carries the entry as it would be stored;
    /// its revision means nothing.
    DryRun,
}

/// The datastore the server uses. Implementations: [`SledStore`] (embedded,
/// the default) and [`PgStore`].
#[async_trait]
pub trait DataStore: Send + Sync + 'static {
    /// Creates entries in one durable write. Each result is the stored entry
    /// (with its revision) or why that one entry was refused. With
    /// [`CreateMode::Each`] the others are still created; with
    /// [`CreateMode::AllOrNothing`] one refusal creates none (the others
    /// then carry [`DataStoreError::BatchAborted`]); [`CreateMode::DryRun`]
    /// reports what would happen and writes nothing.
    async fn create_entries(
        &self,
        entries: Vec<Entry>,
        mode: CreateMode,
    ) -> Vec<Result<Entry, DataStoreError>>;

    /// Replaces an existing entry (same ID).
    async fn update_entry(&self, entry: Entry) -> Result<Entry, DataStoreError>;

    /// Replaces an existing entry only if it is still at `revision`, else
    /// `Conflict`: the compare-and-swap of a read-modify-write (a partial
    /// update), so a concurrent change is never overwritten unseen.
    async fn update_entry_at(&self, entry: Entry, revision: u64) -> Result<Entry, DataStoreError>;

    /// Deletes an entry, returning it as it was.
    async fn delete_entry(&self, id: &EntryId) -> Result<Entry, DataStoreError>;

    /// One entry.
    async fn get_entry(&self, id: &EntryId) -> Result<Entry, DataStoreError>;

    /// Entries passing `filter`, ordered by creation time, then ID.
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, DataStoreError>;

    /// Replaces the agent record `expected` (`None`: there must be none)
    /// with `agent`, atomically; `Conflict` if the stored record is no
    /// longer `expected`. Every agent-record change is such a swap, so a
    /// ban or an eviction landing between a caller's read and its write is
    /// never undone (nor an evicted agent re-created).
    async fn put_agent(
        &self,
        expected: Option<&Agent>,
        agent: Agent,
    ) -> Result<Agent, DataStoreError>;

    /// One agent.
    async fn get_agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError>;

    /// All agents, ordered by SPIFFE ID.
    async fn list_agents(&self) -> Result<Vec<Agent>, DataStoreError>;

    /// Deletes an agent (eviction), returning it as it was.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError>;

    /// Stores a new join token (by hash).
    async fn create_join_token(&self, token: JoinToken) -> Result<(), DataStoreError>;

    /// Atomically removes and returns the token with this hash: of several
    /// concurrent callers exactly one gets it. An expired token is removed
    /// and refused.
    async fn consume_join_token(
        &self,
        hash: &str,
        now_secs: u64,
    ) -> Result<JoinToken, DataStoreError>;

    /// Sets a bundle (own or federated).
    async fn put_bundle(&self, bundle: StoredBundle) -> Result<(), DataStoreError>;

    /// One bundle.
    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<StoredBundle, DataStoreError>;

    /// All bundles, ordered by trust domain.
    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, DataStoreError>;

    /// Deletes a bundle.
    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), DataStoreError>;

    /// Replaces the CA journal (opaque to the store).
    async fn put_ca_journal(&self, journal: Vec<u8>) -> Result<(), DataStoreError>;

    /// The CA journal, if one was ever stored.
    async fn get_ca_journal(&self) -> Result<Option<Vec<u8>>, DataStoreError>;

    /// Replaces this server's rows in the trust domain's shared bundle (the
    /// store knows which server it serves) and enters the change feed;
    /// other servers' rows are untouched. Returns the revision the change
    /// took: once every live server has applied it, their agents hold
    /// these authorities. A store only one server uses (sled) keeps none:
    /// that server's bundle is its own.
    async fn put_own_authorities(
        &self,
        authorities: Vec<ServerAuthority>,
    ) -> Result<u64, DataStoreError> {
        let _ = authorities;
        Ok(*self.revision().borrow())
    }

    /// This server's own rows of the shared bundle, as last written.
    async fn own_authorities(&self) -> Result<Vec<ServerAuthority>, DataStoreError> {
        Ok(Vec::new())
    }

    /// The other servers' rows of the shared bundle.
    async fn peer_authorities(&self) -> Result<Vec<ServerAuthority>, DataStoreError> {
        Ok(self.peer_authorities_at().await?.0)
    }

    /// The other servers' rows, and the revision they are current as of
    /// (read in one snapshot: every row committed at or below it is in).
    async fn peer_authorities_at(&self) -> Result<(Vec<ServerAuthority>, u64), DataStoreError> {
        Ok((Vec::new(), *self.revision().borrow()))
    }

    /// Records this server as live, its published bundle current as of
    /// `applied_revision`. Outside the change feed. A single-server store
    /// has no one to tell.
    async fn beat(&self, applied_revision: u64) -> Result<(), DataStoreError> {
        let _ = applied_revision;
        Ok(())
    }

    /// Records a clean stop: this server is not live from now on.
    async fn stop_beating(&self) -> Result<(), DataStoreError> {
        Ok(())
    }

    /// The other servers' heartbeats.
    async fn peer_heartbeats(&self) -> Result<Vec<Heartbeat>, DataStoreError> {
        Ok(Vec::new())
    }

    /// Every server the database knows (a journal row, a heartbeat or
    /// authority rows), this one included, by name. Empty for a
    /// single-server store.
    async fn servers(&self) -> Result<Vec<ServerInfo>, DataStoreError> {
        Ok(Vec::new())
    }

    /// Removes the authority rows of forgotten servers (no journal row)
    /// that expired by `now_secs`, entering the feed only if it removed
    /// any. Returns how many it removed. Every server runs it with its
    /// rotation check, so what `forget_server` kept goes once it expires.
    async fn prune_forgotten_authorities(&self, now_secs: u64) -> Result<usize, DataStoreError> {
        let _ = now_secs;
        Ok(0)
    }

    /// Removes a stopped server: its journal row and heartbeat, and its
    /// authority rows that expired by `now_secs` (all of them with
    /// `options.force`), in one transaction that enters the feed, so the
    /// other servers drop what it removed from their bundles. Refused for
    /// this server's own name, for a live server ([`LIVENESS`]), and for
    /// one with a journal that never beat unless `options.assume_stopped`.
    async fn forget_server(
        &self,
        name: &str,
        now_secs: u64,
        options: ForgetOptions,
    ) -> Result<Forgotten, DataStoreError> {
        let _ = (now_secs, options);
        Err(DataStoreError::Refused(format!(
            "cannot forget server {name:?}: this datastore has one server only (the embedded \
             store); forgetting servers is for several servers on one PostgreSQL database"
        )))
    }

    /// Changes with revision greater than `after`, oldest first, at most
    /// `limit`. Fails with `RevisionGone` if changes after `after` were pruned.
    async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, DataStoreError>;

    /// Drops changes with revision at most `up_to` (feed retention, see
    /// `retention.rs`) and returns how many this call removed. Idempotent:
    /// several servers may prune one PostgreSQL store at once.
    async fn prune_changes(&self, up_to: u64) -> Result<usize, DataStoreError>;

    /// The latest revision, updated after each durable write: followers wait
    /// on it instead of polling.
    fn revision(&self) -> watch::Receiver<u64>;

    /// Which history the store's revisions belong to (`incarnation.rs`):
    /// the same for every server on one database, another after a restore
    /// from a backup. Sync pages carry it, so an agent's revision is only
    /// taken as one of this store's when it comes with it.
    fn incarnation(&self) -> &str;

    /// True if a view at `revision` of incarnation `incarnation` is a state
    /// of this store's history, so a delta from it is right. A store whose
    /// incarnation changes when it is opened (sled) also holds those of
    /// its earlier openings.
    fn holds_history_of(&self, incarnation: &str, revision: u64) -> bool {
        let _ = revision;
        incarnation == self.incarnation()
    }

    /// The newest committed revision, read now where it is kept. For a
    /// store other processes write too, `revision()` can trail it (a
    /// wake-up not yet delivered, a listener stalled short of its timeout),
    /// so a decision that the store itself is behind a revision seen
    /// elsewhere must ask this instead. A store this process alone writes
    /// answers from `revision()`, which is then exact.
    async fn committed_revision(&self) -> Result<u64, DataStoreError> {
        Ok(*self.revision().borrow())
    }

    /// Why the store refuses writes, if it does (a write that could not be
    /// made durable, such as on a full disk; a database that cannot be
    /// reached), as a message for the operator. Reads are still served
    /// where they can be.
    fn write_failure(&self) -> Option<String> {
        None
    }

    /// While the store cannot learn the newest committed revision (its
    /// database unreachable), the last time it did: other writers' changes
    /// since may be missing from `revision()`. `None` when `revision()` is
    /// current, as it always is for a store this process alone writes.
    fn feed_stale_since(&self) -> Option<std::time::Instant> {
        None
    }
}
