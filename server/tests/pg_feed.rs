//! The PostgreSQL store where it differs from sled: several stores (as
//! several servers would) on one database, the change feed across them
//! (issue 15: a lower xid taking the higher revision, a lost LISTEN
//! connection, a session holding a lock, a long history), migrations, and
//! TLS with a password. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_server::datastore::postgres::{PgHost, SCHEMA_VERSION, SslMode};
use oxid_server::datastore::{
    ChangeEvent, CreateMode, DataStore, DataStoreError, Entry, EntryFilter, EntryId, PgConfig,
    PgStore,
};

#[path = "support/pg.rs"]
mod pg_cluster;

const AGENT: &str = "spiffe://example.org/oxid/agent/join_token/abc";

fn entry(name: &str, uid: u32) -> Entry {
    Entry {
        id: EntryId::random().unwrap(),
        spiffe_id: format!("spiffe://example.org/{name}").parse().unwrap(),
        parent_id: AGENT.parse().unwrap(),
        selectors: [format!("unix:uid:{uid}")
            .parse::<oxid_pki::Selector>()
            .unwrap()]
        .into_iter()
        .collect(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        dns_names: vec![],
        federates_with: BTreeSet::new(),
        hint: String::new(),
        expires_at: None,
        created_at: 1,
        revision: 0,
    }
}

/// A store named `name` in `pg_stat_activity`.
async fn store(config: &PgConfig, name: &str) -> Arc<PgStore> {
    let mut config = config.clone();
    config.application_name = name.to_owned();
    Arc::new(PgStore::open(&config).await.unwrap())
}

/// Polls `condition` (a query returning one bool) until it holds.
async fn until(raw: &tokio_postgres::Client, condition: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = raw.query_one(condition, &[]).await.unwrap();
        if row.get::<_, bool>(0) {
            return;
        }
        assert!(Instant::now() < deadline, "never true: {condition}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `store`'s revision watch reaches `revision`.
async fn reaches(store: &PgStore, revision: u64) {
    let mut rx = store.revision();
    let reached = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r >= revision))
        .await
        .is_ok();
    assert!(
        reached,
        "the watch stayed at {} < {revision}",
        *store.revision().borrow()
    );
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_servers_starting_at_once_migrate_once() {
    let config = pg_cluster::fresh().await;
    let opens: Vec<_> = (0..3)
        .map(|i| {
            let config = config.clone();
            tokio::spawn(async move { store(&config, &format!("s{i}")).await })
        })
        .collect();
    for open in opens {
        open.await.unwrap();
    }
    let raw = pg_cluster::raw(&config).await;
    let rows = raw
        .query("SELECT version FROM oxid_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_binary_is_refused() {
    let config = pg_cluster::fresh().await;
    drop(store(&config, "old").await);
    let raw = pg_cluster::raw(&config).await;
    raw.execute(
        "UPDATE oxid_schema SET version = $1",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    let err = PgStore::open(&config).await.err().unwrap().to_string();
    assert!(
        err.contains(&format!("schema is at version {}", SCHEMA_VERSION + 1))
            && err.contains("newer"),
        "{err}"
    );
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
    let blocker = pg_cluster::raw(&config).await;

    // The blocker inserts (uncommitted) the key A's second entry needs.
    let (a1, a2) = (entry("a1", 1), entry("a2", 2));
    blocker.batch_execute("BEGIN").await.unwrap();
    let key = ring::digest::digest(
        &ring::digest::SHA256,
        &serde_json::to_vec(&a2.unique_key()).unwrap(),
    )
    .as_ref()
    .to_vec();
    blocker
        .execute(
            "INSERT INTO oxid_entries (id, unique_key, spiffe_id, parent_id, revision, entry) \
             VALUES ('blocker', $1, 'x', 'y', 0, '{}')",
            &[&key],
        )
        .await
        .unwrap();

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
    let xid = |id: &str| {
        let raw = &raw;
        let id = id.to_owned();
        async move {
            raw.query_one(
                "SELECT xmin::text::bigint FROM oxid_entries WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let (xid_a, xid_b) = (xid(created[0].id.as_str()).await, xid(b1.id.as_str()).await);
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

/// TCP with TLS checked against the cluster's CA (`verify-full`), and SCRAM
/// with the password from a 0600 file; a wrong CA or password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_and_a_password_file() {
    let local = pg_cluster::fresh().await;
    let (port, ca, password) = pg_cluster::tcp();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pg-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut tcp = local.clone();
    tcp.host = PgHost::Tcp("localhost".into());
    tcp.port = port;
    tcp.sslmode = SslMode::VerifyFull;
    tcp.ca_file = Some(ca);
    tcp.password_file = Some(password_file.clone());
    tcp.application_name = "tls-check".into();
    let s = PgStore::open(&tcp).await.unwrap();
    let e = s
        .create_entries(vec![entry("tls", 1)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(s.get_entry(&e.id).await.unwrap(), e);
    let raw = pg_cluster::raw(&local).await;
    // The pool's connections and the listener's, all over TLS.
    until(
        &raw,
        "SELECT count(*) >= 2 AND bool_and(s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'tls-check%'",
    )
    .await;

    let mut wrong_ca = tcp.clone();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    wrong_ca.ca_file = Some(other_ca);
    let err = PgStore::open(&wrong_ca).await.err().unwrap().to_string();
    assert!(err.contains("cannot connect to postgresql://"), "{err}");

    let mut wrong_password = tcp.clone();
    let bad = dir.path().join("bad-password");
    std::fs::write(&bad, "not-it").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    wrong_password.password_file = Some(bad.clone());
    let err = PgStore::open(&wrong_password)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("password authentication failed"), "{err}");

    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = PgStore::open(&wrong_password)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("readable by other users"), "{err}");
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

/// One join token, consumers racing on three stores (three servers):
/// exactly one gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_is_consumed_once_across_servers() {
    let config = pg_cluster::fresh().await;
    let servers = [
        store(&config, "s1").await,
        store(&config, "s2").await,
        store(&config, "s3").await,
    ];
    for round in 0..10 {
        let hash = format!("{round:0>16}");
        servers[0]
            .create_join_token(oxid_server::datastore::JoinToken {
                id: hash[..8].to_owned(),
                hash: hash.clone(),
                expires_at: 100,
                alias: None,
            })
            .await
            .unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(12));
        let racers: Vec<_> = (0..12)
            .map(|i| {
                let (s, barrier, hash) = (servers[i % 3].clone(), barrier.clone(), hash.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.consume_join_token(&hash, 1).await
                })
            })
            .collect();
        let mut winners = 0;
        for r in racers {
            match r.await.unwrap() {
                Ok(_) => winners += 1,
                Err(DataStoreError::NotFound(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

/// A ban on one server and a renewal on another, both swapping the same
/// agent record from the same read: one wins, the other gets `Conflict`
/// and must read again, so the ban is never undone unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_swap_races_across_servers_with_one_winner() {
    let config = pg_cluster::fresh().await;
    let (a, b) = (store(&config, "a").await, store(&config, "b").await);
    let record = oxid_server::datastore::Agent {
        spiffe_id: AGENT.parse().unwrap(),
        attestation_type: "join_token".into(),
        selectors: BTreeSet::new(),
        aliases: BTreeSet::new(),
        serial: "01".into(),
        previous_serial: None,
        pending_key: None,
        expires_at: 2_000_000_000,
        banned: false,
        created_at: 1,
    };
    let mut current = a.put_agent(None, record).await.unwrap();
    for round in 0..20 {
        let mut banned = current.clone();
        banned.banned = !current.banned;
        let mut renewed = current.clone();
        renewed.serial = format!("{round:02x}-renewed");
        let (read_a, read_b) = (current.clone(), current.clone());
        let (a2, b2) = (a.clone(), b.clone());
        let ban = tokio::spawn(async move { a2.put_agent(Some(&read_a), banned).await });
        let renew = tokio::spawn(async move { b2.put_agent(Some(&read_b), renewed).await });
        let outcomes = [ban.await.unwrap(), renew.await.unwrap()];
        let won: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Err(DataStoreError::Conflict(_)))),
            "{outcomes:?}"
        );
        current = a.get_agent(&AGENT.parse().unwrap()).await.unwrap();
        assert_eq!(Some(&current), won[0].as_ref().ok());
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
