//! Several servers on one database: heartbeats, `server list` and
//! decommissioning a server (`server forget`), in the store and through
//! the binary against real servers. Needs the cluster `./scripts/test`
//! starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_server::datastore::{
    ChangeEvent, DataStore as _, DataStoreError, ForgetOptions, LIVENESS, PgConfig, PgStore,
    ServerAuthority,
};
use support::cli_process::{BIN, Server};

const KEEP: ForgetOptions = ForgetOptions {
    force: false,
    assume_stopped: false,
};
const FORCE: ForgetOptions = ForgetOptions {
    force: true,
    assume_stopped: false,
};
const ASSUME_STOPPED: ForgetOptions = ForgetOptions {
    force: false,
    assume_stopped: true,
};

fn authority(sequence: u64, not_after: u64) -> ServerAuthority {
    ServerAuthority {
        server: String::new(),
        sequence,
        x509_authority: format!("x509-{sequence}"),
        jwt_key_id: format!("kid-{sequence}"),
        jwt_public_key: format!("jwt-{sequence}"),
        not_after,
    }
}

async fn open(db: &PgConfig, name: &str) -> Arc<PgStore> {
    let mut config = db.clone();
    config.server_name = name.to_owned();
    config.application_name = name.to_owned();
    Arc::new(PgStore::open(&config).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_seen_by_the_others_and_their_applied_revision_never_goes_back() {
    let db = pg_cluster::fresh().await;
    let (a, b) = (open(&db, "a").await, open(&db, "b").await);
    b.beat(9).await.unwrap();
    b.beat(4).await.unwrap();
    let beats = a.peer_heartbeats().await.unwrap();
    assert_eq!(beats.len(), 1);
    assert_eq!(beats[0].server, "b");
    assert_eq!(
        beats[0].applied_revision, 9,
        "a late, older beat does not move it back"
    );
    assert!(beats[0].is_live(LIVENESS), "{beats:?}");
    b.stop_beating().await.unwrap();
    let stopped = &a.peer_heartbeats().await.unwrap()[0];
    assert!(stopped.stopped && !stopped.is_live(LIVENESS));
    // A beat of the stopped run landing after the stop (its task was
    // aborted with the beat on its way) does not undo it.
    b.beat(10).await.unwrap();
    let late = &a.peer_heartbeats().await.unwrap()[0];
    assert!(late.stopped && !late.is_live(LIVENESS), "{late:?}");
    // A restart (a new opening of the store) beating makes it live again.
    drop(b);
    let b = open(&db, "b").await;
    b.beat(11).await.unwrap();
    let restarted = &a.peer_heartbeats().await.unwrap()[0];
    assert!(restarted.is_live(LIVENESS), "{restarted:?}");
    assert_eq!(restarted.applied_revision, 11);
    // An old heartbeat, by the database's clock, is not live.
    let raw = pg_cluster::raw(&db).await;
    raw.batch_execute(
        "UPDATE oxid_server_heartbeats SET beat_at = clock_timestamp() - interval '1 hour'",
    )
    .await
    .unwrap();
    let stale = &a.peer_heartbeats().await.unwrap()[0];
    assert!(!stale.stopped && !stale.is_live(LIVENESS));
    assert!(stale.age >= Duration::from_secs(3599), "{stale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_server_refuses_a_live_one_and_keeps_its_unexpired_authorities() {
    let db = pg_cluster::fresh().await;
    let (a, b) = (open(&db, "a").await, open(&db, "b").await);
    b.put_ca_journal(b"b's journal".to_vec()).await.unwrap();
    b.put_own_authorities(vec![authority(1, 1_000), authority(2, 4_000_000_000)])
        .await
        .unwrap();
    b.beat(0).await.unwrap();
    let now = 2_000;

    let Err(DataStoreError::Refused(live)) = a.forget_server("b", now, KEEP).await else {
        panic!("a live server was forgotten");
    };
    assert!(
        live.contains("\"b\" is live") && live.contains("Stop it first"),
        "{live}"
    );
    let Err(DataStoreError::Refused(own)) = a.forget_server("a", now, FORCE).await else {
        panic!("a server forgot itself");
    };
    assert!(own.contains("own name"), "{own}");
    let Err(DataStoreError::NotFound(none)) = a.forget_server("nosuch", now, KEEP).await else {
        panic!("an unknown server was forgotten");
    };
    assert!(none.contains("\"nosuch\""), "{none}");
    assert_eq!(
        a.servers().await.unwrap().len(),
        1,
        "only b has rows so far"
    );

    b.stop_beating().await.unwrap();
    let before = *a.revision().borrow();
    let forgotten = a.forget_server("b", now, KEEP).await.unwrap();
    assert!(forgotten.journal);
    assert_eq!(forgotten.removed, [1], "the expired one");
    assert_eq!(forgotten.kept, [2], "what it signed may still be in use");
    // The change enters the feed, so every server re-reads the rows.
    pg_cluster::reaches(&a, before + 1).await;
    let last = a.changes_since(before, 10).await.unwrap();
    assert!(
        matches!(&last[..], [c] if matches!(&c.event, ChangeEvent::AuthoritiesChanged { server } if server == "b")),
        "{last:?}"
    );
    assert_eq!(
        a.peer_authorities()
            .await
            .unwrap()
            .iter()
            .map(|r| r.sequence)
            .collect::<Vec<_>>(),
        [2]
    );
    let listed = a.servers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].has_journal && listed[0].heartbeat.is_none());
    // b's journal is gone: a server started as b begins a new CA.
    assert!(b.get_ca_journal().await.unwrap().is_none());

    // Again with --force: the rest goes.
    let forced = a.forget_server("b", now, FORCE).await.unwrap();
    assert!(!forced.journal);
    assert_eq!(forced.removed, [2]);
    assert!(a.peer_authorities().await.unwrap().is_empty());
    assert!(a.servers().await.unwrap().is_empty());
    assert!(matches!(
        a.forget_server("b", now, FORCE).await,
        Err(DataStoreError::NotFound(_))
    ));
}

/// What `forget` kept goes by itself once it expires: every server's
/// rotation check prunes the expired rows of servers without a journal,
/// and leaves those of servers that have one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_servers_kept_authorities_go_once_they_expire() {
    let db = pg_cluster::fresh().await;
    let (a, gone, kept) = (
        open(&db, "a").await,
        open(&db, "gone").await,
        open(&db, "kept").await,
    );
    gone.put_ca_journal(b"j".to_vec()).await.unwrap();
    gone.put_own_authorities(vec![authority(1, 5_000)])
        .await
        .unwrap();
    kept.put_ca_journal(b"j".to_vec()).await.unwrap();
    kept.put_own_authorities(vec![authority(1, 1_000)])
        .await
        .unwrap();
    // gone never beat: nothing shows it is stopped, so the operator must say so.
    let Err(DataStoreError::Refused(unsure)) = a.forget_server("gone", 2_000, KEEP).await else {
        panic!("a server that never beat was forgotten");
    };
    assert!(unsure.contains("--assume-stopped"), "{unsure}");
    assert!(
        gone.get_ca_journal().await.unwrap().is_some(),
        "nothing changed"
    );
    let forgotten = a
        .forget_server("gone", 2_000, ASSUME_STOPPED)
        .await
        .unwrap();
    assert_eq!(forgotten.kept, [1]);
    let before = *a.revision().borrow();
    assert_eq!(a.prune_forgotten_authorities(4_999).await.unwrap(), 0);
    assert_eq!(
        *a.revision().borrow(),
        before,
        "nothing pruned, no revision"
    );
    assert_eq!(a.prune_forgotten_authorities(5_000).await.unwrap(), 1);
    let last = a.changes_since(before, 10).await.unwrap();
    assert!(
        matches!(&last[..], [c] if matches!(&c.event, ChangeEvent::AuthoritiesChanged { server } if server == "gone")),
        "{last:?}"
    );
    // kept's expired row is its own to replace: it has a journal.
    let left: Vec<String> = a
        .peer_authorities()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.server)
        .collect();
    assert_eq!(left, ["kept"]);

    // A running CA does it on its rotation check.
    gone.put_own_authorities(vec![authority(2, 1_000)])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = oxid_server::ca::CaManager::start(
        oxid_server::ca::CaConfig {
            trust_domain: oxid_pki::TrustDomain::new("example.org").unwrap(),
            key_type: oxid_pki::KeyAlgorithm::EcdsaP256,
            ca_ttl: Duration::from_secs(3600),
            key_dir: Some(dir.path().join("keys")),
            upstream: None,
        },
        Arc::new(oxid_server::clock::SystemClock),
        a.clone(),
    )
    .await
    .unwrap();
    ca.rotate().await.unwrap();
    let left: Vec<String> = a
        .peer_authorities()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.server)
        .collect();
    assert_eq!(left, ["kept"]);
}

/// A server of schema 2 (during a rolling upgrade) has no heartbeats: it
/// writes none, sees none, and cannot forget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_2_server_writes_and_reads_no_heartbeats() {
    let db = pg_cluster::fresh().await;
    let mut old = db.clone();
    old.schema_version = 2;
    old.server_name = "old".into();
    let old = PgStore::open(&old).await.unwrap();
    let raw = pg_cluster::raw(&db).await;
    let version: i32 = raw
        .query_one("SELECT version FROM oxid_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    old.beat(1).await.unwrap();
    old.stop_beating().await.unwrap();
    assert!(old.peer_heartbeats().await.unwrap().is_empty());
    let Err(DataStoreError::Refused(why)) = old.forget_server("x", 0, KEEP).await else {
        panic!("a schema 2 store forgot a server");
    };
    assert!(why.contains("schema version 3"), "{why}");
    // The new one migrates; the old one's beats still go nowhere.
    let new = open(&db, "new").await;
    old.beat(1).await.unwrap();
    assert!(new.peer_heartbeats().await.unwrap().is_empty());
    new.beat(1).await.unwrap();
    assert_eq!(old.peer_heartbeats().await.unwrap().len(), 0);
    // A version this binary does not have is refused clearly.
    let mut bogus = db.clone();
    bogus.schema_version = 9;
    let Err(e) = PgStore::open(&bogus).await else {
        panic!("schema version 9 accepted");
    };
    assert!(
        e.to_string().contains("not one this oxid-server has"),
        "{e}"
    );
}

/// `url` for `server_name`, by the cluster's socket.
fn start(name: &str, db: &PgConfig) -> Server {
    Server::start_with_config(
        &format!("server_name = {name:?}\n"),
        &["--datastore-url", &db.to_string()],
    )
}

/// `oxid-server server ARGS` as server `me` would run it.
fn server_cli(db: &PgConfig, me: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("server")
        .args(args)
        .args(["--datastore-url", &db.to_string(), "--server-name", me])
        .output()
        .unwrap()
}

fn ok(out: std::process::Output) -> String {
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn error_line(out: std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn list(db: &PgConfig, me: &str) -> serde_json::Value {
    serde_json::from_str(&ok(server_cli(db, me, &["list", "--output", "json"]))).unwrap()
}

/// Stops `s` with SIGTERM (a clean stop) and waits for it.
fn stop_cleanly(mut s: Server) {
    let mut child = s.child.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success(), "{}", s.log());
}

#[test]
fn decommissioning_a_server_with_the_cli() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let a = start("a", &db);
    // A server killed long ago: its heartbeat is stale, so b does not wait
    // for it, says so, and it may be forgotten.
    rt.block_on(async {
        pg_cluster::raw(&db)
            .await
            .batch_execute(
                "INSERT INTO oxid_server_heartbeats (server, applied_revision, beat_at) \
                 VALUES ('killed', 0, clock_timestamp() - interval '1 hour')",
            )
            .await
            .unwrap();
    });
    let b = start("b", &db);
    let stale = b
        .log()
        .lines()
        .find(|l| l.contains("not waiting for a server whose heartbeat is stale"))
        .unwrap_or_else(|| panic!("{}", b.log()))
        .to_owned();
    assert!(stale.contains("\"server\":\"killed\""), "{stale}");
    let killed = ok(server_cli(&db, "a", &["forget", "killed"]));
    assert!(
        killed.contains("forgot server killed: journal already gone, 0 authorities removed"),
        "{killed}"
    );
    // One with a journal that never beat (a schema 2 server, which may be
    // running): only with --assume-stopped.
    rt.block_on(async {
        pg_cluster::raw(&db)
            .await
            .batch_execute("INSERT INTO oxid_server_journals VALUES ('older', '\\x7b7d')")
            .await
            .unwrap();
    });
    let unsure = error_line(server_cli(&db, "a", &["forget", "older"]));
    assert!(
        unsure.contains("never recorded a heartbeat") && unsure.contains("--assume-stopped"),
        "{unsure}"
    );
    let older = ok(server_cli(
        &db,
        "a",
        &["forget", "older", "--assume-stopped"],
    ));
    assert!(
        older.contains("forgot server older: journal removed"),
        "{older}"
    );

    // Every server with its authorities, live or not.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let listed = list(&db, "a");
        let servers = listed["servers"].as_array().unwrap();
        if servers.len() == 2 && servers.iter().all(|s| s["live"] == true) {
            break listed;
        }
        assert!(Instant::now() < deadline, "{listed}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let servers = listed["servers"].as_array().unwrap();
    assert_eq!(servers[0]["name"], "a");
    assert_eq!(servers[0]["this_server"], true);
    assert_eq!(servers[1]["name"], "b");
    assert_eq!(servers[1]["this_server"], false);
    for s in servers {
        let authorities = s["authorities"].as_array().unwrap();
        assert_eq!(authorities.len(), 1, "{s}");
        assert!(!authorities[0]["jwt_key_id"].as_str().unwrap().is_empty());
        assert!(authorities[0]["not_after"].as_str().unwrap().ends_with('Z'));
        assert_eq!(authorities[0]["expired"], false);
    }
    let pretty = ok(server_cli(&db, "a", &["list"]));
    assert!(pretty.contains("a (this server): live"), "{pretty}");
    assert!(pretty.contains("b: live"), "{pretty}");

    // Refused: a live server, its own name, a bad name, an unknown one.
    let live = error_line(server_cli(&db, "a", &["forget", "b"]));
    assert!(live.contains("\"b\" is live"), "{live}");
    let own = error_line(server_cli(&db, "a", &["forget", "a", "--force"]));
    assert!(own.contains("own name"), "{own}");
    let bad = error_line(server_cli(&db, "a", &["forget", "B;drop"]));
    assert!(bad.contains("expected 1 to 64"), "{bad}");
    let unknown = error_line(server_cli(&db, "a", &["forget", "nosuch"]));
    assert!(unknown.contains("no such server"), "{unknown}");
    let sled = Command::new(BIN).args(["server", "list"]).output().unwrap();
    assert!(error_line(sled).contains("several servers on one PostgreSQL database"));

    // Stopped cleanly, b is not live at once and may be forgotten; its
    // unexpired authority stays in a's bundle until it expires.
    stop_cleanly(b);
    let stopped = list(&db, "a");
    assert_eq!(stopped["servers"][1]["state"], "stopped");
    let done: serde_json::Value = serde_json::from_str(&ok(server_cli(
        &db,
        "a",
        &["forget", "b", "--output", "json"],
    )))
    .unwrap();
    assert_eq!(done["journal_removed"], true);
    assert_eq!(done["authorities_removed"], serde_json::json!([]));
    assert_eq!(done["authorities_kept"], serde_json::json!([1]));
    let after = list(&db, "a");
    assert_eq!(after["servers"][1]["state"], "forgotten");
    assert_eq!(a.spiffe_bundle().x509_authorities().len(), 2);

    // --force removes it now, and a's bundle drops it.
    let forced = ok(server_cli(&db, "a", &["forget", "b", "--force"]));
    assert!(
        forced.contains("forgot server b: journal already gone, 1 authorities removed"),
        "{forced}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.spiffe_bundle().x509_authorities().len() != 1 {
        assert!(Instant::now() < deadline, "a kept b's authority");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(list(&db, "a")["servers"].as_array().unwrap().len(), 1);
}
