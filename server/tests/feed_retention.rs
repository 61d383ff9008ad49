//! Change-feed retention (`retention.rs`): a prune drops the old changes
//! and only those, several servers may prune one PostgreSQL store at once,
//! and an index behind the pruned point reloads from the store and ends
//! equal to the table instead of stalling. On sled in process and on
//! PostgreSQL (the cluster `./scripts/test` starts), the follower there on
//! a store of its own, as another server's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use oxid_server::datastore::{CreateMode, DataStore, DataStoreError, EntryFilter, SledStore};
use oxid_server::index::IndexHandle;

#[path = "support/pg.rs"]
mod pg_cluster;

use pg_cluster::entry;

/// 20 entries, then every fourth deleted and every third updated: the
/// writer's revision afterwards.
async fn write_history(writer: &dyn DataStore) -> u64 {
    let created = writer
        .create_entries(
            (0..20u32).map(|i| entry(&format!("w{i}"), i)).collect(),
            CreateMode::Each,
        )
        .await;
    for (i, e) in created.into_iter().enumerate() {
        let e = e.unwrap();
        if i % 4 == 0 {
            writer.delete_entry(&e.id).await.unwrap();
        } else if i % 3 == 0 {
            let mut changed = e.clone();
            changed.x509_svid_ttl = Some(1020);
            writer.update_entry(changed).await.unwrap();
        }
    }
    *writer.revision().borrow()
}

/// Each entry's ID and revision: the table's, and the index's.
type Ids = BTreeMap<String, u64>;

async fn table(store: &dyn DataStore) -> Ids {
    store
        .list_entries(&EntryFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id.to_string(), e.revision))
        .collect()
}

/// An index loaded on `reader` before `writer` writes a history and prunes
/// all of it but the last change; following `reader`, it must end at the
/// last revision holding exactly the table.
async fn a_follower_behind_the_pruned_point_reloads(
    writer: Arc<dyn DataStore>,
    reader: Arc<dyn DataStore>,
) {
    let index = IndexHandle::load(
        reader.as_ref(),
        "spiffe://example.org/oxid/server".parse().unwrap(),
    )
    .await
    .unwrap();
    let behind = index.read().revision();
    let last = write_history(writer.as_ref()).await;
    assert!(last > behind + 20, "a history was written: {last}");
    let removed = writer.prune_changes(last - 1).await.unwrap();
    assert_eq!(removed as u64, last - 1, "every change but the last went");
    assert_eq!(
        writer.prune_changes(last - 1).await.unwrap(),
        0,
        "idempotent"
    );
    assert_eq!(
        writer.prune_changes(1).await.unwrap(),
        0,
        "the mark never goes back"
    );
    assert!(matches!(
        reader.changes_since(1, 10).await,
        Err(DataStoreError::RevisionGone { oldest, .. }) if oldest == last
    ));
    assert!(matches!(
        reader.changes_since(behind, 10).await,
        Err(DataStoreError::RevisionGone { .. })
    ));
    assert_eq!(reader.changes_since(last - 1, 10).await.unwrap().len(), 1);

    let follower = index.clone().follow(reader.clone());
    let mut rx = index.subscribe();
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r >= last))
        .await
        .expect("the follower reached the last revision")
        .unwrap();
    follower.abort();
    let table = table(reader.as_ref()).await;
    assert_eq!(table.len(), 15);
    let view = index.read();
    assert_eq!(view.entry_count(), table.len());
    for (id, revision) in &table {
        let held = view.entry(&id.parse().unwrap()).map(|e| e.revision);
        assert_eq!(held, Some(*revision), "entry {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_a_follower_behind_the_pruned_point_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    a_follower_behind_the_pruned_point_reloads(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_a_follower_of_another_server_behind_the_pruned_point_reloads() {
    let config = pg_cluster::fresh().await;
    let writer = pg_cluster::store(&config, "writer").await;
    let reader = pg_cluster::store(&config, "reader").await;
    a_follower_behind_the_pruned_point_reloads(writer, reader).await;
}

/// Two servers pruning at once delete each change once between them, and
/// the feed then starts after the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_servers_pruning_at_once_remove_each_change_once() {
    let config = pg_cluster::fresh().await;
    let a = pg_cluster::store(&config, "a").await;
    let b = pg_cluster::store(&config, "b").await;
    let last = write_history(a.as_ref()).await;
    let up_to = last - 5;
    let (ra, rb) = tokio::join!(a.prune_changes(up_to), b.prune_changes(up_to));
    assert_eq!(ra.unwrap() + rb.unwrap(), usize::try_from(up_to).unwrap());
    assert_eq!(
        b.changes_since(up_to - 1, 10).await.unwrap_err(),
        DataStoreError::RevisionGone {
            requested: up_to - 1,
            oldest: up_to + 1
        }
    );
    assert_eq!(b.changes_since(up_to, 10).await.unwrap().len(), 5);
}
