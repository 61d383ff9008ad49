//! The entry index, followed from the store's change feed and shared by
//! every agent API call and sync stream: [`IndexHandle`] follows the store,
//! [`authz::EntryIndex`] answers which entries an agent may have.

pub mod authz;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use oxid_pki::SpiffeId;
use tokio::sync::watch;

pub use self::authz::EntryIndex;
use crate::datastore::{Agent, ChangeEvent, DataStore, DataStoreError, EntryFilter};

/// Changes read per feed request.
const PAGE: usize = 4096;

/// The shared index and the revision it has reached.
#[derive(Debug)]
pub struct IndexHandle {
    index: RwLock<EntryIndex>,
    revision_tx: watch::Sender<u64>,
    /// Since when the store has held a revision the index has not applied
    /// (set by `follow` when the store moves, cleared once caught up).
    behind_since: std::sync::Mutex<Option<Instant>>,
    /// Moves when another server's CA authorities may have changed (a
    /// change of the feed said so, or the index reloaded).
    authorities_tx: watch::Sender<u64>,
}

impl IndexHandle {
    /// Loads the full state from `store` and returns the handle.
    pub async fn load(
        store: &dyn DataStore,
        server_id: SpiffeId,
    ) -> Result<Arc<Self>, DataStoreError> {
        let mut index = EntryIndex::new(server_id);
        reload(store, &mut index).await?;
        let (revision_tx, _) = watch::channel(index.revision());
        Ok(Arc::new(Self {
            index: RwLock::new(index),
            revision_tx,
            behind_since: std::sync::Mutex::new(None),
            authorities_tx: watch::channel(0).0,
        }))
    }

    /// Reads the index.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, EntryIndex> {
        // The index is only mutated by `apply`/`load`, which cannot leave it
        // half-updated on panic (plain map operations).
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of agent `id` as the index holds it, if the index has
    /// reached store revision `revision` (`Some(None)`: there is no such
    /// agent); `None` while the index trails it.
    pub(crate) fn agent_at(&self, id: &SpiffeId, revision: u64) -> Option<Option<Agent>> {
        let index = self.read();
        (index.revision() >= revision).then(|| index.agent(id).cloned())
    }

    /// The record of agent `id` as of the store's last acknowledged write:
    /// the index's copy when the index has reached that write, else read
    /// from the store (`None`: there is no such agent). See
    /// `agent_api::identity` (`Inner::current_agent`) for why.
    pub(crate) async fn agent_now(
        &self,
        store: &dyn DataStore,
        id: &SpiffeId,
    ) -> Result<Option<Agent>, DataStoreError> {
        let answered = *store.revision().borrow();
        if let Some(agent) = self.agent_at(id, answered) {
            return Ok(agent);
        }
        match store.get_agent(id).await {
            Ok(a) => Ok(Some(a)),
            Err(DataStoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Wakes when the index reaches a new revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Wakes when another server's CA authorities may have changed.
    pub fn authorities_changed(&self) -> watch::Receiver<u64> {
        self.authorities_tx.subscribe()
    }

    /// Brings the index up to the store's latest revision.
    pub async fn catch_up(&self, store: &dyn DataStore) -> Result<(), DataStoreError> {
        let authorities = || self.authorities_tx.send_modify(|n| *n += 1);
        loop {
            let from = self.read().revision();
            match store.changes_since(from, PAGE).await {
                Ok(changes) if changes.is_empty() => break,
                Ok(changes) => {
                    let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
                    for change in &changes {
                        index.apply(change.revision, &change.event);
                    }
                    drop(index);
                    if changes
                        .iter()
                        .any(|c| matches!(c.event, ChangeEvent::AuthoritiesChanged { .. }))
                    {
                        authorities();
                    }
                }
                Err(DataStoreError::RevisionGone { .. }) => {
                    let mut fresh = self.read().clone();
                    reload(store, &mut fresh).await?;
                    *self.index.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                    authorities();
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let revision = self.read().revision();
        self.revision_tx.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
        Ok(())
    }

    /// Follows the store until the task is dropped.
    pub fn follow(self: Arc<Self>, store: Arc<dyn DataStore>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut rx = store.revision();
            loop {
                let target = *rx.borrow_and_update();
                self.note_behind(target);
                if let Err(e) = self.catch_up(store.as_ref()).await {
                    tracing::error!(error = %e, "entry index cannot follow the store; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                if self.read().revision() >= target {
                    *self.behind() = None;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    fn behind(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Holds a plain value: a panic elsewhere cannot leave it half-set.
        self.behind_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the lag clock when the store holds `target` and the index
    /// has not reached it (and the clock is not already running).
    fn note_behind(&self, target: u64) {
        if self.read().revision() < target {
            self.behind().get_or_insert_with(Instant::now);
        }
    }

    /// How far this server may be behind the newest committed change
    /// (`oxid_feed_lag_seconds`): how long the store has held a revision
    /// the index has not applied, or, if longer, how long the store has
    /// been unable to learn the newest committed revision (another
    /// server's writes it cannot see: `DataStore::feed_stale_since`).
    /// Zero when caught up.
    pub fn feed_lag(&self, store: &dyn DataStore) -> Duration {
        let known = *store.revision().borrow();
        let index = if self.read().revision() < known {
            self.behind().map_or(Duration::ZERO, |t| t.elapsed())
        } else {
            Duration::ZERO
        };
        let stale = store
            .feed_stale_since()
            .map_or(Duration::ZERO, |t| t.elapsed());
        index.max(stale)
    }
}

async fn reload(store: &dyn DataStore, index: &mut EntryIndex) -> Result<(), DataStoreError> {
    // Revision first: changes that land while listing are re-applied by the
    // next catch-up, which is harmless (changes carry whole values).
    let revision = *store.revision().borrow();
    let entries = store.list_entries(&EntryFilter::default()).await?;
    let agents = store.list_agents().await?;
    index.load(entries, agents, revision);
    Ok(())
}
