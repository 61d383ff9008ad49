//! The CA manager's wait for the other servers (`ca/propagation.rs`), with
//! real PostgreSQL stores and no server around them: servers starting at
//! once wait on each other and both finish, each with the other's
//! authority; a server whose heartbeat is stale is not waited for; a live
//! server that never catches up holds a new authority back only for the
//! bounded time. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use oxid_pki::{KeyAlgorithm, TrustDomain};
use oxid_server::ca::{CaConfig, CaManager, Propagation};
use oxid_server::clock::{Clock, ManualClock, SystemClock};
use oxid_server::datastore::{DataStore, PgConfig, PgStore};

fn config(dir: &std::path::Path) -> CaConfig {
    CaConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        key_type: KeyAlgorithm::EcdsaP256,
        ca_ttl: Duration::from_secs(3600),
        key_dir: Some(dir.join("keys")),
        upstream: None,
    }
}

async fn store(db: &PgConfig, name: &str) -> Arc<dyn DataStore> {
    let mut config = db.clone();
    config.server_name = name.to_owned();
    config.application_name = name.to_owned();
    Arc::new(PgStore::open(&config).await.unwrap())
}

fn propagation(timeout: Duration) -> Propagation {
    Propagation {
        timeout,
        grace: Duration::from_millis(50),
        ..Propagation::default()
    }
}

/// A CA named `name` on `db`, and (as a server's index would have it)
/// one that re-reads the other servers' rows whenever the store moves.
async fn start(
    db: &PgConfig,
    name: &str,
    dir: &tempfile::TempDir,
    timeout: Duration,
) -> Arc<CaManager> {
    start_at(db, name, dir, timeout, Arc::new(SystemClock)).await
}

/// [`start`] reading the time from `clock`.
async fn start_at(
    db: &PgConfig,
    name: &str,
    dir: &tempfile::TempDir,
    timeout: Duration,
    clock: Arc<dyn Clock>,
) -> Arc<CaManager> {
    let store = store(db, name).await;
    let ca = CaManager::start_with(
        config(dir.path()),
        propagation(timeout),
        clock,
        store.clone(),
    )
    .await
    .unwrap();
    tokio::spawn({
        let ca = Arc::downgrade(&ca);
        async move {
            let mut moved = store.revision();
            loop {
                let Some(ca) = ca.upgrade() else { return };
                ca.refresh_peers().await.unwrap();
                drop(ca);
                if moved.changed().await.is_err() {
                    return;
                }
            }
        }
    });
    ca
}

/// A heartbeat row of a server that is not running a CA here.
async fn ghost(raw: &tokio_postgres::Client, name: &str, age: &str) {
    raw.execute(
        "INSERT INTO oxid_server_heartbeats (server, applied_revision, beat_at) \
         VALUES ($1, 0, clock_timestamp() - $2::text::interval)",
        &[&name, &age],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_starting_at_once_wait_on_each_other_and_both_start_with_both_authorities() {
    let db = pg_cluster::fresh().await;
    // The schema first, so both see each other's heartbeats from the start.
    drop(store(&db, "migrate").await);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let long = Duration::from_secs(30);
    let started = Instant::now();
    let (a, b) = tokio::join!(start(&db, "a", &dir_a, long), start(&db, "b", &dir_b, long));
    // Neither waited out the bound: each saw the other apply its change.
    assert!(started.elapsed() < long, "{:?}", started.elapsed());
    // Whichever started second waited for the first to hold its
    // authority; the first read the second's at start or while waiting.
    for (ca, name) in [(&a, "a"), (&b, "b")] {
        assert_eq!(
            ca.snapshot().bundle().x509_authorities().len(),
            2,
            "{name} publishes both"
        );
        assert!(ca.snapshot().active_sequence().is_some(), "{name} signs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_heartbeat_is_stale_is_not_waited_for() {
    let db = pg_cluster::fresh().await;
    drop(store(&db, "migrate").await);
    let raw = pg_cluster::raw(&db).await;
    ghost(&raw, "gone", "1 hour").await;
    let dir = tempfile::tempdir().unwrap();
    let long = Duration::from_secs(30);
    let started = Instant::now();
    let ca = start(&db, "a", &dir, long).await;
    assert!(started.elapsed() < long, "{:?}", started.elapsed());
    assert!(ca.snapshot().active_sequence().is_some());
}

/// A server `stuck` that beats but never applies anything, until the task
/// is aborted.
async fn stuck_server(raw: Arc<tokio_postgres::Client>) -> tokio::task::JoinHandle<()> {
    ghost(&raw, "stuck", "0 seconds").await;
    tokio::spawn(async move {
        loop {
            raw.execute(
                "UPDATE oxid_server_heartbeats SET beat_at = clock_timestamp() \
                 WHERE server = 'stuck'",
                &[],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_server_that_never_catches_up_holds_a_new_authority_back_only_for_the_bound() {
    let db = pg_cluster::fresh().await;
    drop(store(&db, "migrate").await);
    let raw = Arc::new(pg_cluster::raw(&db).await);
    let beating = stuck_server(raw.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_secs(2);
    let started = Instant::now();
    let ca = start(&db, "a", &dir, bound).await;
    // It waited the whole bound, then signs (and says so in a warning).
    assert!(started.elapsed() >= bound, "{:?}", started.elapsed());
    assert!(ca.snapshot().active_sequence().is_some());

    // Restarted once its authority has been shared for longer than the
    // bound (the clock moved on past it, and the certificate's backdating),
    // it signs at once: the run before would have by now (a fresh one
    // would wait the whole bound, here 30 s).
    let long = Duration::from_secs(30);
    let later = SystemTime::now() + long + oxid_pki::x509::BACKDATE + Duration::from_secs(2);
    let restarted = Instant::now();
    let again = start_at(&db, "a", &dir, long, Arc::new(ManualClock::new(later))).await;
    assert!(restarted.elapsed() < long, "{:?}", restarted.elapsed());
    assert_eq!(
        again.snapshot().active_sequence(),
        ca.snapshot().active_sequence()
    );
    drop(again);

    // A forced rotation waits the bound too, and the old authority signs
    // meanwhile.
    ca.force_prepare().await.unwrap();
    let before = ca.snapshot().active_sequence();
    let activating = tokio::spawn({
        let ca = ca.clone();
        async move { ca.force_activate().await }
    });
    let mut published = ca.subscribe();
    let waited = Instant::now();
    assert_eq!(ca.snapshot().active_sequence(), before, "the old one signs");
    let switched = tokio::time::timeout(
        Duration::from_secs(30),
        published.wait_for(|s| s.active_sequence() != before),
    )
    .await
    .is_ok();
    assert!(switched, "the prepared authority never activated");
    assert!(waited.elapsed() >= bound - Duration::from_millis(200));
    activating.await.unwrap().unwrap();
    beating.abort();
}

/// A first run that shares its new authority and dies while waiting for
/// the other servers (a crash at start) has not made it safe to sign: the
/// restart, soon after, waits for them again (here to the bound, as the
/// live server never catches up) instead of signing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_run_that_died_waiting_waits_again() {
    let db = pg_cluster::fresh().await;
    drop(store(&db, "migrate").await);
    let raw = Arc::new(pg_cluster::raw(&db).await);
    let beating = stuck_server(raw.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let first = tokio::spawn({
        let (db, dir) = (db.clone(), dir.path().to_owned());
        async move {
            let store = store(&db, "a").await;
            let _ = CaManager::start_with(
                config(&dir),
                propagation(Duration::from_secs(600)),
                Arc::new(SystemClock),
                store,
            )
            .await;
        }
    });
    // Shared, then the run dies in its wait.
    pg_cluster::until(
        &raw,
        "SELECT EXISTS (SELECT 1 FROM oxid_authorities WHERE server = 'a')",
    )
    .await;
    first.abort();
    assert!(
        first.await.unwrap_err().is_cancelled(),
        "the first run finished"
    );

    let bound = Duration::from_secs(2);
    let restarted = Instant::now();
    let again = start(&db, "a", &dir, bound).await;
    assert!(
        restarted.elapsed() >= bound,
        "the restart signed after {:?} with an authority no other server had",
        restarted.elapsed()
    );
    assert!(again.snapshot().active_sequence().is_some());
    beating.abort();
}

/// Another server's rotation changes this server's bundle (the union) but
/// not its journal: the bundle's `spiffe_sequence` still moves, and a
/// re-read that changes nothing leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_union_bundles_sequence_moves_with_every_change_of_its_content() {
    let db = pg_cluster::fresh().await;
    drop(store(&db, "migrate").await);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let long = Duration::from_secs(30);
    let a = start(&db, "a", &dir_a, long).await;
    let b = start(&db, "b", &dir_b, long).await;
    let mut published = a.subscribe();
    let two = tokio::time::timeout(
        long,
        published.wait_for(|s| s.bundle().x509_authorities().len() == 2),
    )
    .await
    .is_ok();
    assert!(two, "a never held b's authority");
    let before = a.snapshot().bundle().sequence_number();
    a.refresh_peers().await.unwrap();
    assert_eq!(a.snapshot().bundle().sequence_number(), before);

    b.force_prepare().await.unwrap();
    let three = tokio::time::timeout(
        long,
        published.wait_for(|s| s.bundle().x509_authorities().len() == 3),
    )
    .await
    .is_ok();
    assert!(three, "a never held b's prepared authority");
    assert!(a.snapshot().bundle().sequence_number() > before);
}

/// Heartbeats that cannot be read do not count as "no server is behind":
/// the new authority waits (to the bound) as for a server behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_that_cannot_be_read_hold_a_new_authority_back_to_the_bound() {
    let db = pg_cluster::fresh().await;
    drop(store(&db, "migrate").await);
    let raw = pg_cluster::raw(&db).await;
    let role = format!("{}_blind", db.dbname);
    raw.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
         REVOKE SELECT ON oxid_server_heartbeats FROM {role}"
    ))
    .await
    .unwrap();
    let mut blind = db.clone();
    blind.user = role;
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_secs(2);
    let started = Instant::now();
    let ca = start(&blind, "a", &dir, bound).await;
    assert!(started.elapsed() >= bound, "{:?}", started.elapsed());
    assert!(ca.snapshot().active_sequence().is_some());
}
