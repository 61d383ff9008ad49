//! Everything a store holds, as one value: what `datastore migrate` reads
//! out of sled and writes into PostgreSQL.

use super::{Agent, Entry, JoinToken, StoredBundle};

/// The whole state of a store (not its change history).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreContents {
    /// The store's last revision: agents synced from it hold revisions up
    /// to this, which the target must pass (see `PgStore::import`).
    pub revision: u64,
    /// Entries, with their IDs and creation times.
    pub entries: Vec<Entry>,
    /// Agent records (serials, bans, aliases).
    pub agents: Vec<Agent>,
    /// Unused join tokens (by hash).
    pub join_tokens: Vec<JoinToken>,
    /// Bundles, own and federated.
    pub bundles: Vec<StoredBundle>,
    /// The CA journal, if one was stored.
    pub ca_journal: Option<Vec<u8>>,
}

impl StoreContents {
    /// True if the store holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.agents.is_empty()
            && self.join_tokens.is_empty()
            && self.bundles.is_empty()
            && self.ca_journal.is_none()
    }
}
