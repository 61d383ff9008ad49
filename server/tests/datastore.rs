//! Both datastores (sled, PostgreSQL) against one contract: atomic, durable
//! writes, a gap-free change feed readable from any retained revision,
//! single-use join tokens under concurrency, and clear errors instead of
//! crashes. Every test runs once per backend (`sled::name`, `pg::name`); the
//! PostgreSQL ones need the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use oxid_pki::{Selector, SpiffeId, TrustDomain};
use oxid_server::datastore::{
    Agent, ChangeEvent, CreateMode, DataStore, DataStoreError, Entry, EntryFilter, EntryId,
    JoinToken, PgConfig, PgStore, ServerAuthority, SledStore, StoredBundle,
};

#[path = "support/pg.rs"]
mod pg_cluster;

const CACHE: u64 = 8 * 1024 * 1024;

/// Where one test's store lives, so it can be opened again.
enum Backend {
    Sled(tempfile::TempDir),
    Pg(PgConfig),
}

impl Backend {
    fn sled() -> Self {
        Self::Sled(tempfile::tempdir().unwrap())
    }

    async fn pg() -> Self {
        Self::Pg(pg_cluster::fresh().await)
    }

    async fn open(&self) -> Arc<dyn DataStore> {
        match self {
            Self::Sled(dir) => Arc::new(SledStore::open(dir.path(), CACHE).unwrap()),
            Self::Pg(config) => Arc::new(PgStore::open(config).await.unwrap()),
        }
    }

    /// Overwrites entry `id`'s stored record with something that is not
    /// an entry, behind the store's back (with no store open on it).
    async fn damage_entry(&self, id: &EntryId) {
        match self {
            Self::Sled(dir) => {
                let db = sled::open(dir.path()).unwrap();
                db.open_tree("entries")
                    .unwrap()
                    .insert(id.as_str(), b"{not json".as_slice())
                    .unwrap();
                db.flush().unwrap();
            }
            Self::Pg(config) => {
                let raw = pg_cluster::raw(config).await;
                let damaged = raw
                    .execute(
                        "UPDATE oxid_entries SET entry = '{\"not\": \"an entry\"}' WHERE id = $1",
                        &[&id.as_str()],
                    )
                    .await
                    .unwrap();
                assert_eq!(damaged, 1);
            }
        }
    }
}

/// Each contract test once per backend: `sled_store::name` and `pg::name`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sled_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::sled()).await;
                }
            )*
        }
        mod pg {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::pg().await).await;
                }
            )*
        }
    };
}

contract!(
    entries_round_trip_with_increasing_revisions,
    duplicate_entries_are_refused_and_change_nothing,
    a_batch_creates_the_good_entries_and_reports_the_bad,
    an_all_or_nothing_batch_with_one_bad_entry_creates_none_and_a_dry_run_writes_nothing,
    updates_cannot_collide_or_invent_entries,
    list_filters_and_orders_by_creation_then_id,
    everything_survives_a_reopen,
    the_change_feed_resumes_from_any_retained_revision,
    followers_are_woken_by_writes,
    join_tokens_are_single_use_and_expire,
    a_join_token_is_consumed_once_under_concurrency,
    agents_and_bundles_round_trip,
    a_corrupt_record_is_an_error_not_a_crash,
    concurrent_writers_all_finish_and_persist,
    a_stores_own_authorities_are_never_its_peers,
    a_store_beats_but_never_counts_itself_among_its_peers,
    a_store_never_forgets_its_own_server,
    the_ca_journal_is_replaced_whole,
    pruning_with_nothing_forgotten_removes_nothing_and_takes_no_revision,
    the_committed_revision_is_read_now_not_from_the_watch,
);

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// Selectors as whichever set the caller needs (an entry's, a filter's).
fn selectors<S: FromIterator<Selector>>(list: &[&str]) -> S {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn entry(spiffe_id: &str, parent: &str, sels: &[&str], created_at: u64) -> Entry {
    Entry {
        id: EntryId::random().unwrap(),
        spiffe_id: id(spiffe_id),
        parent_id: id(parent),
        selectors: selectors(sels),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        dns_names: vec![],
        federates_with: BTreeSet::new(),
        hint: String::new(),
        expires_at: None,
        created_at,
        revision: 0,
    }
}

const AGENT: &str = "spiffe://example.org/oxid/agent/join_token/abc";

fn agent(spiffe_id: &str) -> Agent {
    Agent {
        spiffe_id: id(spiffe_id),
        attestation_type: "join_token".into(),
        selectors: BTreeSet::new(),
        aliases: BTreeSet::new(),
        serial: "01".into(),
        previous_serial: None,
        pending_key: None,
        expires_at: 2_000_000_000,
        banned: false,
        created_at: 1,
    }
}

async fn create_one(store: &dyn DataStore, e: Entry) -> Result<Entry, DataStoreError> {
    store
        .create_entries(vec![e], CreateMode::Each)
        .await
        .pop()
        .unwrap()
}

async fn entries_round_trip_with_increasing_revisions(b: Backend) {
    let store = b.open().await;
    let a = create_one(
        &*store,
        entry("spiffe://example.org/web", AGENT, &["unix:uid:1000"], 1),
    )
    .await
    .unwrap();
    let b = create_one(
        &*store,
        entry("spiffe://example.org/db", AGENT, &["unix:uid:1001"], 2),
    )
    .await
    .unwrap();
    assert_eq!((a.revision, b.revision), (1, 2));
    assert_eq!(store.get_entry(&a.id).await.unwrap(), a);

    let mut changed = b.clone();
    changed.hint = "primary".into();
    changed.created_at = 99; // ignored: creation time is kept
    let updated = store.update_entry(changed).await.unwrap();
    assert_eq!(updated.revision, 3);
    assert_eq!(updated.created_at, 2);
    assert_eq!(store.get_entry(&b.id).await.unwrap().hint, "primary");

    let deleted = store.delete_entry(&a.id).await.unwrap();
    assert_eq!(deleted, a);
    assert!(matches!(
        store.get_entry(&a.id).await,
        Err(DataStoreError::NotFound(_))
    ));

    let changes = store.changes_since(0, 100).await.unwrap();
    let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, [1, 2, 3, 4]);
    assert!(matches!(&changes[0].event, ChangeEvent::EntryUpserted { entry } if entry == &a));
    assert!(matches!(&changes[2].event, ChangeEvent::EntryUpserted { entry } if entry == &updated));
    assert!(matches!(&changes[3].event, ChangeEvent::EntryDeleted { entry } if entry.id == a.id));
    assert_eq!(*store.revision().borrow(), 4);
}

async fn duplicate_entries_are_refused_and_change_nothing(b: Backend) {
    let store = b.open().await;
    let first = entry("spiffe://example.org/web", AGENT, &["unix:uid:1000"], 1);
    create_one(&*store, first.clone()).await.unwrap();
    // Same identity, parent and selectors under a new ID.
    let dup = entry("spiffe://example.org/web", AGENT, &["unix:uid:1000"], 2);
    assert!(matches!(
        create_one(&*store, dup).await,
        Err(DataStoreError::AlreadyExists(_))
    ));
    // Same ID again.
    assert!(matches!(
        create_one(&*store, first).await,
        Err(DataStoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store
            .list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        *store.revision().borrow(),
        1,
        "a refused write takes no revision"
    );
}

async fn a_batch_creates_the_good_entries_and_reports_the_bad(b: Backend) {
    let store = b.open().await;
    let batch = vec![
        entry("spiffe://example.org/a", AGENT, &["unix:uid:1"], 1),
        entry("spiffe://example.org/a", AGENT, &["unix:uid:1"], 2), // duplicate of the first
        entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], 3),
    ];
    let results = store.create_entries(batch, CreateMode::Each).await;
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(DataStoreError::AlreadyExists(_))));
    assert!(results[2].is_ok());
    assert_eq!(
        store
            .list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        2
    );
}

async fn an_all_or_nothing_batch_with_one_bad_entry_creates_none_and_a_dry_run_writes_nothing(
    b: Backend,
) {
    let store = b.open().await;
    let batch = || {
        vec![
            entry("spiffe://example.org/a", AGENT, &["unix:uid:1"], 1),
            entry("spiffe://example.org/a", AGENT, &["unix:uid:1"], 2), // duplicate of the first
            entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], 3),
        ]
    };
    let before = *store.revision().borrow();
    for mode in [CreateMode::AllOrNothing, CreateMode::DryRun] {
        let results = store.create_entries(batch(), mode).await;
        assert!(
            matches!(results[1], Err(DataStoreError::AlreadyExists(_))),
            "{mode:?}"
        );
        if mode == CreateMode::AllOrNothing {
            assert!(matches!(results[0], Err(DataStoreError::BatchAborted)));
            assert!(matches!(results[2], Err(DataStoreError::BatchAborted)));
        } else {
            assert!(results[0].is_ok() && results[2].is_ok());
        }
    }
    let good = vec![entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], 3)];
    assert!(store.create_entries(good, CreateMode::DryRun).await[0].is_ok());
    assert!(
        store
            .list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(*store.revision().borrow(), before);
    assert!(store.changes_since(0, 10).await.unwrap().is_empty());
    let results = store
        .create_entries(
            vec![
                entry("spiffe://example.org/a", AGENT, &["unix:uid:1"], 1),
                entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], 3),
            ],
            CreateMode::AllOrNothing,
        )
        .await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        store
            .list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        2
    );
}

async fn updates_cannot_collide_or_invent_entries(b: Backend) {
    let store = b.open().await;
    create_one(
        &*store,
        entry("spiffe://example.org/a", AGENT, &["unix:uid:1"], 1),
    )
    .await
    .unwrap();
    let b = create_one(
        &*store,
        entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], 2),
    )
    .await
    .unwrap();
    let mut clash = b.clone();
    clash.spiffe_id = id("spiffe://example.org/a");
    clash.selectors = selectors(&["unix:uid:1"]);
    assert!(matches!(
        store.update_entry(clash).await,
        Err(DataStoreError::AlreadyExists(_))
    ));
    assert_eq!(store.get_entry(&b.id).await.unwrap(), b, "unchanged");
    let ghost = entry("spiffe://example.org/c", AGENT, &["unix:uid:3"], 3);
    assert!(matches!(
        store.update_entry(ghost.clone()).await,
        Err(DataStoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete_entry(&ghost.id).await,
        Err(DataStoreError::NotFound(_))
    ));
    // Moving an entry to a free key frees the old one.
    let mut moved = b.clone();
    moved.selectors = selectors(&["unix:uid:9"]);
    store.update_entry(moved).await.unwrap();
    create_one(
        &*store,
        entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], 4),
    )
    .await
    .unwrap();
}

async fn list_filters_and_orders_by_creation_then_id(b: Backend) {
    let store = b.open().await;
    let other_parent = "spiffe://example.org/oxid/agent/x509pop/ff";
    for (i, (sid, parent, sels)) in [
        (
            "spiffe://example.org/c",
            AGENT,
            vec!["unix:uid:1", "unix:gid:1"],
        ),
        ("spiffe://example.org/a", AGENT, vec!["unix:uid:1"]),
        ("spiffe://example.org/b", other_parent, vec!["unix:uid:1"]),
    ]
    .into_iter()
    .enumerate()
    {
        create_one(&*store, entry(sid, parent, &sels, 10 - i as u64))
            .await
            .unwrap();
    }
    let all = store.list_entries(&EntryFilter::default()).await.unwrap();
    let order: Vec<&str> = all.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(
        order,
        [
            "spiffe://example.org/b",
            "spiffe://example.org/a",
            "spiffe://example.org/c"
        ]
    );

    let by_parent = EntryFilter {
        parent_id: Some(id(AGENT)),
        ..Default::default()
    };
    assert_eq!(store.list_entries(&by_parent).await.unwrap().len(), 2);
    let by_id = EntryFilter {
        spiffe_id: Some(id("spiffe://example.org/c")),
        ..Default::default()
    };
    assert_eq!(store.list_entries(&by_id).await.unwrap().len(), 1);
    let uid1: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];
    let subset = EntryFilter {
        selectors: Some((uid1.clone(), false)),
        ..Default::default()
    };
    assert_eq!(store.list_entries(&subset).await.unwrap().len(), 3);
    let exact = EntryFilter {
        selectors: Some((uid1, true)),
        ..Default::default()
    };
    assert_eq!(store.list_entries(&exact).await.unwrap().len(), 2);
}

async fn everything_survives_a_reopen(b: Backend) {
    let (e, a) = {
        let store = b.open().await;
        let e = create_one(
            &*store,
            entry("spiffe://example.org/web", AGENT, &["unix:uid:1"], 1),
        )
        .await
        .unwrap();
        let a = store.put_agent(None, agent(AGENT)).await.unwrap();
        store.put_ca_journal(b"journal-v1".to_vec()).await.unwrap();
        store
            .put_bundle(StoredBundle {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                spiffe_json: "{\"keys\":[]}".into(),
            })
            .await
            .unwrap();
        (e, a)
    };
    let store = b.open().await;
    assert_eq!(store.get_entry(&e.id).await.unwrap(), e);
    assert_eq!(store.get_agent(&id(AGENT)).await.unwrap(), a);
    assert_eq!(
        store.get_ca_journal().await.unwrap().unwrap(),
        b"journal-v1"
    );
    assert_eq!(store.list_bundles().await.unwrap().len(), 1);
    assert_eq!(
        *store.revision().borrow(),
        4,
        "the revision counter resumes"
    );
    let next = create_one(
        &*store,
        entry("spiffe://example.org/db", AGENT, &["unix:uid:2"], 2),
    )
    .await
    .unwrap();
    assert_eq!(next.revision, 5);
    assert_eq!(store.changes_since(0, 100).await.unwrap().len(), 5);
}

async fn the_change_feed_resumes_from_any_retained_revision(b: Backend) {
    let store = b.open().await;
    for i in 0..10u64 {
        let sid = format!("spiffe://example.org/w{i}");
        create_one(&*store, entry(&sid, AGENT, &["unix:uid:1"], i))
            .await
            .unwrap();
    }
    let page = store.changes_since(3, 4).await.unwrap();
    assert_eq!(
        page.iter().map(|c| c.revision).collect::<Vec<_>>(),
        [4, 5, 6, 7]
    );
    assert!(store.changes_since(10, 10).await.unwrap().is_empty());
    store.prune_changes(5).await.unwrap();
    assert_eq!(
        store.changes_since(4, 10).await.unwrap_err(),
        DataStoreError::RevisionGone {
            requested: 4,
            oldest: 6
        }
    );
    let rest = store.changes_since(5, 10).await.unwrap();
    assert_eq!(rest.first().unwrap().revision, 6);
    assert_eq!(rest.len(), 5);
}

async fn followers_are_woken_by_writes(b: Backend) {
    let store = b.open().await;
    let mut rx = store.revision();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            create_one(
                &*store,
                entry("spiffe://example.org/web", AGENT, &["unix:uid:1"], 1),
            )
            .await
            .unwrap()
        })
    };
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), 1);
    writer.await.unwrap();
}

fn token(hash: &str, expires_at: u64) -> JoinToken {
    JoinToken {
        id: hash[..8].to_owned(),
        hash: hash.to_owned(),
        expires_at,
        alias: None,
    }
}

async fn join_tokens_are_single_use_and_expire(b: Backend) {
    let store = b.open().await;
    store
        .create_join_token(token("aaaaaaaaaaaa", 100))
        .await
        .unwrap();
    assert!(matches!(
        store.create_join_token(token("aaaaaaaaaaaa", 100)).await,
        Err(DataStoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store
            .consume_join_token("aaaaaaaaaaaa", 50)
            .await
            .unwrap()
            .id,
        "aaaaaaaa"
    );
    assert!(matches!(
        store.consume_join_token("aaaaaaaaaaaa", 50).await,
        Err(DataStoreError::NotFound(_))
    ));
    store
        .create_join_token(token("bbbbbbbbbbbb", 100))
        .await
        .unwrap();
    assert_eq!(
        store
            .consume_join_token("bbbbbbbbbbbb", 100)
            .await
            .unwrap_err(),
        DataStoreError::TokenExpired
    );
    // An expired token is gone, not merely refused.
    assert!(matches!(
        store.consume_join_token("bbbbbbbbbbbb", 0).await,
        Err(DataStoreError::NotFound(_))
    ));
}

async fn a_join_token_is_consumed_once_under_concurrency(b: Backend) {
    let store = b.open().await;
    for round in 0..5 {
        let hash = format!("{round:0>12}");
        store.create_join_token(token(&hash, 100)).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (store, barrier, hash) = (store.clone(), barrier.clone(), hash.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.consume_join_token(&hash, 1).await
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => winners += 1,
                Err(DataStoreError::NotFound(_)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn agents_and_bundles_round_trip(b: Backend) {
    let store = b.open().await;
    let created = store.put_agent(None, agent(AGENT)).await.unwrap();
    let mut a = created.clone();
    a.banned = true;
    store.put_agent(Some(&created), a.clone()).await.unwrap();
    // A write from a stale copy (or a create over a record) is refused.
    let mut stale = created.clone();
    stale.serial = "02".into();
    for expected in [Some(&created), None] {
        assert!(matches!(
            store.put_agent(expected, stale.clone()).await,
            Err(DataStoreError::Conflict(_))
        ));
    }
    assert!(store.get_agent(&id(AGENT)).await.unwrap().banned);
    assert_eq!(store.list_agents().await.unwrap(), [a.clone()]);
    assert_eq!(store.delete_agent(&id(AGENT)).await.unwrap(), a);
    assert!(matches!(
        store.get_agent(&id(AGENT)).await,
        Err(DataStoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete_agent(&id(AGENT)).await,
        Err(DataStoreError::NotFound(_))
    ));
    // An evicted agent is not re-created by a write that read it before.
    assert!(matches!(
        store.put_agent(Some(&a), stale).await,
        Err(DataStoreError::Conflict(_))
    ));
    assert!(store.list_agents().await.unwrap().is_empty());

    let td = TrustDomain::new("partner.example").unwrap();
    let bundle = StoredBundle {
        trust_domain: td.clone(),
        spiffe_json: "{\"keys\":[]}".into(),
    };
    store.put_bundle(bundle.clone()).await.unwrap();
    assert_eq!(store.get_bundle(&td).await.unwrap(), bundle);
    store.delete_bundle(&td).await.unwrap();
    assert!(matches!(
        store.delete_bundle(&td).await,
        Err(DataStoreError::NotFound(_))
    ));
    assert!(store.get_ca_journal().await.unwrap().is_none());
    let kinds: Vec<String> = store
        .changes_since(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| {
            format!("{:?}", c.event)
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "AgentUpserted",
            "AgentUpserted",
            "AgentDeleted",
            "BundleUpserted",
            "BundleDeleted"
        ]
    );
}

/// A row of this server's authority `sequence` (the store does not look
/// inside the key material).
fn authority(sequence: u64) -> ServerAuthority {
    ServerAuthority {
        server: String::new(),
        sequence,
        x509_authority: format!("x509-{sequence}"),
        jwt_key_id: format!("kid-{sequence}"),
        jwt_public_key: format!("jwt-{sequence}"),
        not_after: 4_000_000_000,
    }
}

/// `put_own_authorities` gives a revision the store has reached (where
/// the rows entered the feed, on a store that keeps them), and a store's
/// own rows are never among its peers, read with a revision at least that.
async fn a_stores_own_authorities_are_never_its_peers(b: Backend) {
    let store = b.open().await;
    let at = store
        .put_own_authorities(vec![authority(1), authority(2)])
        .await
        .unwrap();
    assert!(at <= *store.revision().borrow());
    let (peers, current) = store.peer_authorities_at().await.unwrap();
    assert!(peers.is_empty(), "{peers:?}");
    assert!(current >= at);
    assert!(store.peer_authorities().await.unwrap().is_empty());
    // Replaced whole: the second write leaves no row of the first.
    let again = store.put_own_authorities(vec![authority(3)]).await.unwrap();
    assert!(again >= at);
    let own = store.own_authorities().await.unwrap();
    if let Backend::Pg(_) = b {
        let mut expected = authority(3);
        expected.server = "default".into();
        assert_eq!(own, [expected], "the last rows written, under its name");
        assert!(again > at, "each write of the rows enters the feed");
        let last = store.changes_since(again - 1, 10).await.unwrap();
        assert!(
            matches!(&last[0].event, ChangeEvent::AuthoritiesChanged { server } if server == "default"),
            "{last:?}"
        );
    } else {
        assert!(own.is_empty(), "a single-server store keeps no rows");
    }
}

/// A store's own heartbeat is never among its peers', and stopping is
/// always accepted.
async fn a_store_beats_but_never_counts_itself_among_its_peers(b: Backend) {
    let store = b.open().await;
    store.beat(7).await.unwrap();
    store.beat(3).await.unwrap();
    assert!(store.peer_heartbeats().await.unwrap().is_empty());
    store.stop_beating().await.unwrap();
    assert!(store.peer_heartbeats().await.unwrap().is_empty());
}

/// Forgetting the store's own server is refused, saying why, and changes
/// nothing.
async fn a_store_never_forgets_its_own_server(b: Backend) {
    let store = b.open().await;
    store.put_ca_journal(b"journal".to_vec()).await.unwrap();
    let before = *store.revision().borrow();
    let refused = store
        .forget_server(
            "default",
            u64::MAX,
            oxid_server::datastore::ForgetOptions {
                force: true,
                assume_stopped: true,
            },
        )
        .await;
    let Err(DataStoreError::Refused(why)) = refused else {
        panic!("{refused:?}");
    };
    assert!(why.contains("\"default\""), "{why}");
    assert_eq!(*store.revision().borrow(), before);
    assert_eq!(store.get_ca_journal().await.unwrap().unwrap(), b"journal");
}

/// With no forgotten server, the prune every rotation check runs removes
/// nothing, not even this server's own expired rows, and writes nothing.
async fn pruning_with_nothing_forgotten_removes_nothing_and_takes_no_revision(b: Backend) {
    let store = b.open().await;
    store.put_ca_journal(b"journal".to_vec()).await.unwrap();
    let mut expired = authority(1);
    expired.not_after = 10;
    store.put_own_authorities(vec![expired]).await.unwrap();
    let before = *store.revision().borrow();
    assert_eq!(
        store
            .prune_forgotten_authorities(u64::MAX / 2)
            .await
            .unwrap(),
        0
    );
    assert_eq!(*store.revision().borrow(), before);
    assert_eq!(store.changes_since(before, 10).await.unwrap(), []);
}

/// `committed_revision` is the revision committed now: after this store's
/// own write, that write's; and on PostgreSQL, also a revision another
/// writer committed whose wake-up this store has not had (here a commit
/// that sends none, with no poll for an hour), which its `revision()`
/// watch does not show yet. A server deciding whether the database itself
/// is behind an agent must not take that lag for a restored backup.
async fn the_committed_revision_is_read_now_not_from_the_watch(b: Backend) {
    let store = b.open().await;
    assert_eq!(store.committed_revision().await.unwrap(), 0);
    let e = create_one(
        &*store,
        entry("spiffe://example.org/web", AGENT, &["unix:uid:1"], 1),
    )
    .await
    .unwrap();
    assert_eq!(store.committed_revision().await.unwrap(), e.revision);
    let Backend::Pg(config) = &b else {
        return;
    };
    let mut config = config.clone();
    config.feed_poll = std::time::Duration::from_secs(3600);
    let lagging = PgStore::open(&config).await.unwrap();
    let raw = pg_cluster::raw(&config).await;
    let bumped: i64 = raw
        .query_one(
            "UPDATE oxid_feed SET revision = revision + 1 RETURNING revision",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let bumped = u64::try_from(bumped).unwrap();
    assert_eq!(
        *lagging.revision().borrow(),
        e.revision,
        "the watch had a wake-up"
    );
    assert_eq!(lagging.committed_revision().await.unwrap(), bumped);
}

/// The CA journal is one value, replaced whole, and its write enters the
/// feed.
async fn the_ca_journal_is_replaced_whole(b: Backend) {
    let store = b.open().await;
    assert!(store.get_ca_journal().await.unwrap().is_none());
    store
        .put_ca_journal(b"first, longer".to_vec())
        .await
        .unwrap();
    store.put_ca_journal(b"second".to_vec()).await.unwrap();
    assert_eq!(store.get_ca_journal().await.unwrap().unwrap(), b"second");
    let changes = store.changes_since(0, 10).await.unwrap();
    assert_eq!(changes.len(), 2);
    assert!(
        changes
            .iter()
            .all(|c| matches!(c.event, ChangeEvent::CaJournalUpdated))
    );
}

async fn a_corrupt_record_is_an_error_not_a_crash(b: Backend) {
    let e = {
        let store = b.open().await;
        create_one(
            &*store,
            entry("spiffe://example.org/web", AGENT, &["unix:uid:1"], 1),
        )
        .await
        .unwrap()
    };
    b.damage_entry(&e.id).await;
    let store = b.open().await;
    assert!(matches!(
        store.get_entry(&e.id).await,
        Err(DataStoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.list_entries(&EntryFilter::default()).await,
        Err(DataStoreError::Corrupt(_))
    ));
}

#[test]
fn entry_ids_are_checked() {
    assert!("abc-DEF_123".parse::<EntryId>().is_ok());
    for bad in ["", "a b", "a/b", &"x".repeat(65)] {
        assert!(bad.parse::<EntryId>().is_err(), "{bad:?}");
    }
    let a = EntryId::random().unwrap();
    assert_eq!(a.as_str().len(), 32);
    assert_ne!(a, EntryId::random().unwrap());
    assert!(serde_json::from_str::<EntryId>("\"a b\"").is_err());
}

/// sled 0.34 deadlocks when several `flush_async` calls run at once (the
/// server hung for good under 32 concurrent attestations in
/// `oxid-bench scale`). Many concurrent writers must all finish, and every
/// acknowledged write must be there after a reopen.
async fn concurrent_writers_all_finish_and_persist(b: Backend) {
    let store = b.open().await;
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    store
                        .put_agent(
                            None,
                            agent(&format!(
                                "spiffe://example.org/oxid/agent/join_token/w{w}-{i}"
                            )),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let all = async {
        for w in writers {
            w.await.unwrap();
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), all)
        .await
        .expect("concurrent writes hung (flush deadlock)");
    assert_eq!(*store.revision().borrow(), 64 * 20);
    drop(store);
    let reopened = b.open().await;
    assert_eq!(reopened.list_agents().await.unwrap().len(), 64 * 20);
}
