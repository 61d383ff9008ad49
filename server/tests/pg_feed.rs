//! The PostgreSQL change feed across several stores (as several servers
//! would have) on one database (issue 15): a lower xid taking the higher
//! revision, a lost LISTEN connection, a session holding the lock, a long
//! history, a follower's index against the table, the database going away
//! and back. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_server::datastore::{
    ChangeEvent, CreateMode, DataStore, DataStoreError, Entry, EntryFilter, PgStore,
};

#[path = "support/pg.rs"]
mod pg_cluster;

use pg_cluster::{entry, reaches, store, until};

/// What a follower ends with after reading the whole feed from 0 in pages,
/// as the index does.
async fn followed_ids(store: &PgStore) -> BTreeSet<String> {
    let (mut after, mut ids) = (0, BTreeSet::new());
    loop {
        let page = store.changes_since(after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        for (expected, change) in (after + 1..).zip(&page) {
            assert_eq!(change.revision, expected, "a gap in the feed");
        }
        after = last.revision;
        for change in page {
            if let ChangeEvent::EntryUpserted { entry } = change.event {
                ids.insert(entry.id.to_string());
            }
        }
    }
    ids
}

/// A client whose open transaction has inserted a row holding `entry`'s
/// uniqueness key, so a store inserting `entry` waits for it.
async fn hold_key_of(
    config: &oxid_server::datastore::PgConfig,
    entry: &Entry,
) -> tokio_postgres::Client {
    let blocker = pg_cluster::raw(config).await;
    let key = ring::digest::digest(
        &ring::digest::SHA256,
        &serde_json::to_vec(&entry.unique_key()).unwrap(),
    );
    blocker.batch_execute("BEGIN").await.unwrap();
    blocker
        .execute(
            "INSERT INTO oxid_entries (id, unique_key, spiffe_id, parent_id, revision, entry) \
             VALUES ('blocker', $1, 'x', 'y', 0, '{}')",
            &[&key.as_ref()],
        )
        .await
        .unwrap();
    blocker
}

/// The xid of the transaction that wrote `entry`'s row.
async fn xid_of(raw: &tokio_postgres::Client, entry: &Entry) -> i64 {
    raw.query_one(
        "SELECT xmin::text::bigint FROM oxid_entries WHERE id = $1",
        &[&entry.id.as_str()],
    )
    .await
    .unwrap()
    .get(0)
}

/// The failure of SPIRE's event IDs (spiffe/spire#5021): transaction A
/// starts first (lower xid) but takes its revision after B. Here revisions
/// follow commit order, so A's come after B's, and a reader that followed
/// B's revision still reads A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lower_xid_taking_the_higher_revision_is_seen() {
    let config = pg_cluster::fresh().await;
    let (a, b) = (
        store(&config, "writer-a").await,
        store(&config, "writer-b").await,
    );
    let follower = store(&config, "follower").await;
    let raw = pg_cluster::raw(&config).await;

    // The blocker holds (uncommitted) the key A's second entry needs.
    let (a1, a2) = (entry("a1", 1), entry("a2", 2));
    let blocker = hold_key_of(&config, &a2).await;

    // A inserts a1 (taking its xid), then waits on a2's key.
    let writer = {
        let a = a.clone();
        let batch = vec![a1.clone(), a2.clone()];
        tokio::spawn(async move { a.create_entries(batch, CreateMode::Each).await })
    };
    until(
        &raw,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'writer-a' \
         AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL)",
    )
    .await;

    // B starts later (a higher xid), takes the next revision and commits.
    let b1 = b
        .create_entries(vec![entry("b1", 3)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    reaches(&follower, b1.revision).await;
    assert_eq!(followed_ids(&follower).await, [b1.id.to_string()].into());

    // The blocker gives up: A goes on and commits after B.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let created: Vec<Entry> = writer
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let (xid_a, xid_b) = (xid_of(&raw, &created[0]).await, xid_of(&raw, &b1).await);
    assert!(xid_a < xid_b, "A started first: xid {xid_a} < {xid_b}");
    assert!(
        created.iter().all(|e| e.revision > b1.revision),
        "A's revisions follow B's: {created:?} after {}",
        b1.revision
    );

    let everything: BTreeSet<String> = [&b1, &created[0], &created[1]]
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    let last = created[1].revision;
    for s in [&a, &b, &follower] {
        reaches(s, last).await;
        assert_eq!(followed_ids(s).await, everything);
    }
    assert_eq!(
        follower
            .list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_listen_connection_catches_up_on_reconnect() {
    let mut config = pg_cluster::fresh().await;
    // No timer: only the reconnection can bring the follower up to date.
    config.feed_poll = Duration::from_secs(3600);
    let follower = store(&config, "follower").await;
    let writer = store(&config, "writer").await;
    let admin = pg_cluster::raw(&pg_cluster::config_for("postgres")).await;
    let raw = pg_cluster::raw(&config).await;
    // A pooled connection the writer keeps while new ones are refused.
    writer.list_entries(&EntryFilter::default()).await.unwrap();
    until(
        &raw,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'follower feed')",
    )
    .await;

    let db = &config.dbname;
    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    raw.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'follower feed'",
        &[],
    )
    .await
    .unwrap();
    until(
        &raw,
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity \
         WHERE application_name = 'follower feed')",
    )
    .await;
    // Written while the follower listens nowhere: its NOTIFY is lost.
    let e = writer
        .create_entries(vec![entry("w", 1)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    assert!(*follower.revision().borrow() < e.revision);

    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    reaches(&follower, e.revision).await;
    assert_eq!(follower.get_entry(&e.id).await.unwrap(), e);
    // And it listens again: the next write wakes it at once.
    let next = writer
        .create_entries(vec![entry("x", 2)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    reaches(&follower, next.revision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_holding_the_feed_lock_times_writes_out_and_the_feed_recovers_when_killed() {
    let mut config = pg_cluster::fresh().await;
    config.statement_timeout = Duration::from_secs(1);
    let writer = store(&config, "writer").await;
    let follower = store(&config, "follower").await;
    let before = writer
        .create_entries(vec![entry("before", 1)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();

    // Another client takes the counter's row lock and sits on it.
    let stuck = pg_cluster::raw(&config).await;
    stuck
        .batch_execute("BEGIN; UPDATE oxid_feed SET revision = revision")
        .await
        .unwrap();
    let started = Instant::now();
    let refused = writer
        .create_entries(vec![entry("during", 2)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap_err();
    let DataStoreError::Backend(message) = &refused else {
        panic!("{refused:?}")
    };
    assert!(
        message.contains("statement_timeout") && message.contains("pg_stat_activity"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Nothing of the refused write is visible; reads still work.
    assert_eq!(
        writer.list_entries(&EntryFilter::default()).await.unwrap(),
        std::slice::from_ref(&before)
    );
    assert_eq!(follower.changes_since(0, 10).await.unwrap().len(), 1);

    let raw = pg_cluster::raw(&config).await;
    raw.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'oxid-test' \
         AND state = 'idle in transaction'",
        &[],
    )
    .await
    .unwrap();
    let after = writer
        .create_entries(vec![entry("after", 3)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(
        after.revision,
        before.revision + 1,
        "no revision was lost or skipped"
    );
    reaches(&follower, after.revision).await;
    assert_eq!(followed_ids(&follower).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_against_a_long_history_reads_the_current_state_not_the_history() {
    const HISTORY: i64 = 500_000;
    let config = pg_cluster::fresh().await;
    let first = store(&config, "first").await;
    let mut current = Vec::new();
    for i in 0..100 {
        current.push(entry(&format!("e{i}"), i));
    }
    first.create_entries(current, CreateMode::Each).await;
    drop(first);
    // Half a million older changes, as a long-lived deployment has them.
    let raw = pg_cluster::raw(&config).await;
    raw.batch_execute(&format!(
        "INSERT INTO oxid_changes (revision, event) \
         SELECT g, '{{\"type\": \"ca_journal_updated\"}}' FROM generate_series(101, {last}) g; \
         UPDATE oxid_feed SET revision = {last};",
        last = 100 + HISTORY
    ))
    .await
    .unwrap();

    let started = Instant::now();
    let second = store(&config, "second").await;
    let index = oxid_server::index::IndexHandle::load(
        second.as_ref(),
        "spiffe://example.org/oxid/server".parse().unwrap(),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(index.read().revision(), 100 + HISTORY as u64);
    assert!(
        second
            .changes_since(100 + HISTORY as u64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(took < Duration::from_secs(5), "start took {took:?}");
}

/// Issue 15 (c), at the store and index level: 10,000 entries created
/// through two stores at once (two servers' writes interleaving), some
/// deleted again, while a third store's index follows; afterwards that
/// index holds exactly the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_following_another_server_ends_equal_to_the_table() {
    let config = pg_cluster::fresh().await;
    let writers = [store(&config, "w1").await, store(&config, "w2").await];
    let reader: Arc<dyn DataStore> = store(&config, "reader").await;
    let index = oxid_server::index::IndexHandle::load(
        reader.as_ref(),
        "spiffe://example.org/oxid/server".parse().unwrap(),
    )
    .await
    .unwrap();
    let follower = index.clone().follow(reader.clone());
    let tasks: Vec<_> = (0..4u32)
        .map(|t| {
            let writer = writers[t as usize % 2].clone();
            tokio::spawn(async move {
                for batch in 0..25u32 {
                    let entries = (0..100u32)
                        .map(|i| entry(&format!("t{t}/b{batch}/e{i}"), i))
                        .collect();
                    let created = writer.create_entries(entries, CreateMode::Each).await;
                    // Every tenth entry goes again, from this same server.
                    for e in created.into_iter().step_by(10) {
                        writer.delete_entry(&e.unwrap().id).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let last = *writers[0].revision().borrow();
    let last = last.max(*writers[1].revision().borrow());
    let mut rx = index.subscribe();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|r| *r >= last))
        .await
        .expect("the index reached the last revision")
        .unwrap();
    follower.abort();
    let table = reader.list_entries(&EntryFilter::default()).await.unwrap();
    assert_eq!(table.len(), 4 * 25 * 90);
    let view = index.read();
    assert_eq!(view.entry_count(), table.len());
    for e in &table {
        assert_eq!(
            view.entry(&e.id),
            Some(e),
            "the index holds the stored entry"
        );
    }
}

/// The database goes away (every session killed, new ones refused) and
/// comes back: writes meanwhile fail with PostgreSQL's reason, then the
/// same store writes again and its listener catches up, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_recovers_by_itself_when_the_database_comes_back() {
    let config = pg_cluster::fresh().await;
    let writer = store(&config, "writer").await;
    let follower = store(&config, "follower").await;
    let admin = pg_cluster::raw(&pg_cluster::config_for("postgres")).await;
    let db = &config.dbname;
    let before = writer
        .create_entries(vec![entry("before", 1)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();

    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[db],
        )
        .await
        .unwrap();
    until(
        &admin,
        &format!("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = '{db}')"),
    )
    .await;
    let refused = writer
        .create_entries(vec![entry("during", 2)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&refused, DataStoreError::Backend(m) if m.contains("PostgreSQL")),
        "{refused:?}"
    );

    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let after = writer
        .create_entries(vec![entry("after", 3)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .expect("the first write after the database returns succeeds");
    assert_eq!(after.revision, before.revision + 1);
    reaches(&follower, after.revision).await;
    assert_eq!(follower.get_entry(&after.id).await.unwrap(), after);
}
