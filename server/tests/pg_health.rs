//! How a server on PostgreSQL reports the database (issue 15):
//! `oxid_feed_lag_seconds` moves when the index cannot apply a change that
//! is committed, and when the database cannot be reached; `/ready` and
//! `oxid-server healthcheck` say why while it is unreachable, and both
//! recover with no restart. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_server::datastore::{CreateMode, DataStore};
use oxid_server::index::IndexHandle;
use pg_cluster::{entry, store, until};
use support::cli_process::Server;

/// Polls `check` until it holds, for at most 30 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lag_grows_while_a_committed_change_cannot_be_applied_and_falls_back_to_zero() {
    let mut config = pg_cluster::fresh().await;
    config.statement_timeout = Duration::from_secs(1);
    let writer = store(&config, "writer").await;
    // The follower logs in as a role of its own, whose right to read the
    // feed the test takes away (a superuser would bypass that).
    let raw = pg_cluster::raw(&config).await;
    let role = format!("{}_follower", config.dbname);
    raw.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
    ))
    .await
    .unwrap();
    let mut as_follower = config.clone();
    as_follower.user = role.clone();
    let follower_pg = store(&as_follower, "follower").await;
    let follower: Arc<dyn DataStore> = follower_pg.clone();
    let index = IndexHandle::load(
        follower.as_ref(),
        "spiffe://example.org/oxid/server".parse().unwrap(),
    )
    .await
    .unwrap();
    let _following = index.clone().follow(follower.clone());
    let first = writer
        .create_entries(vec![entry("first", 1)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    eventually("the index applies the first entry", || {
        index.read().revision() >= first.revision
    })
    .await;
    assert_eq!(index.feed_lag(follower.as_ref()), Duration::ZERO);

    // A session holding the counter's lock stops every commit: nothing is
    // committed that the index lacks, so there is no lag to report.
    let stuck = pg_cluster::raw(&config).await;
    stuck
        .batch_execute("BEGIN; UPDATE oxid_feed SET revision = revision")
        .await
        .unwrap();
    let refused = writer
        .create_entries(vec![entry("refused", 2)], CreateMode::Each)
        .await
        .pop()
        .unwrap();
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(index.feed_lag(follower.as_ref()), Duration::ZERO);
    drop(stuck);
    until(
        &raw,
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE state = 'idle in transaction' \
         AND application_name = 'oxid-test')",
    )
    .await;

    // The follower still learns the newest revision (it may read the
    // counter) but cannot read the change itself: its index falls behind.
    raw.batch_execute(&format!("REVOKE SELECT ON oxid_changes FROM {role}"))
        .await
        .unwrap();
    let second = writer
        .create_entries(vec![entry("second", 3)], CreateMode::Each)
        .await
        .pop()
        .unwrap()
        .unwrap();
    pg_cluster::reaches(&follower_pg, second.revision).await;
    eventually("the lag passes a second", || {
        index.feed_lag(follower.as_ref()) > Duration::from_secs(1)
    })
    .await;
    assert!(index.read().revision() < second.revision);
    let lag = index.feed_lag(follower.as_ref());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        index.feed_lag(follower.as_ref()) > lag,
        "the lag keeps growing"
    );
    assert_eq!(follower.write_failure(), None, "the database is reachable");

    raw.batch_execute(&format!("GRANT SELECT ON oxid_changes TO {role}"))
        .await
        .unwrap();
    eventually("the index catches up", || {
        index.read().revision() >= second.revision
    })
    .await;
    assert_eq!(index.feed_lag(follower.as_ref()), Duration::ZERO);
    assert!(index.read().entry(&second.id).is_some());
}

/// `GET path` on `addr`: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: oxid\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of an unlabelled family on `/metrics`.
fn gauge(addr: &str, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_database_is_unreachable_the_server_is_not_ready_and_says_why() {
    let config = pg_cluster::fresh().await;
    let db = config.dbname.clone();
    let (port, ca, password) = pg_cluster::tcp();
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("pg-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let table = format!(
        "[datastore]\npassword_file = {:?}\nca_file = {:?}\n",
        file.display().to_string(),
        ca.display().to_string()
    );
    let url = format!("postgresql://postgres@localhost:{port}/{db}");
    let s = tokio::task::spawn_blocking(move || {
        Server::start_with_config(
            &table,
            &["--datastore-url", &url, "--metrics-address", "127.0.0.1:0"],
        )
    })
    .await
    .unwrap();
    let metrics = s.ready_field("metrics");
    assert_eq!(http_get(&metrics, "/ready").0, 200);
    assert_eq!(gauge(&metrics, "oxid_feed_lag_seconds"), 0.0);

    let admin = pg_cluster::raw(&pg_cluster::config_for("postgres")).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db],
        )
        .await
        .unwrap();
    eventually("healthcheck fails", || {
        !s.cli(&["healthcheck"]).status.success()
    })
    .await;
    let why = s.fails(&["healthcheck"]);
    assert!(
        why.contains("not ready") && why.contains("PostgreSQL unreachable"),
        "{why}"
    );
    let (status, body) = http_get(&metrics, "/ready");
    assert_eq!(status, 503);
    assert!(body.contains("PostgreSQL unreachable"), "{body}");
    eventually("the lag passes a second", || {
        gauge(&metrics, "oxid_feed_lag_seconds") > 1.0
    })
    .await;
    assert_eq!(gauge(&metrics, "oxid_server_ready"), 0.0);

    // Back: ready again with no restart, and the lag at zero.
    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    eventually("healthcheck passes again", || {
        s.cli(&["healthcheck"]).status.success()
    })
    .await;
    assert_eq!(http_get(&metrics, "/ready").0, 200);
    assert_eq!(gauge(&metrics, "oxid_feed_lag_seconds"), 0.0);
    assert!(s.child.is_some());
    s.ok(&["token", "generate"]);
}

/// A proxy on a Unix socket in a directory of its own, in front of the
/// cluster's socket; once `silent` is set it forwards nothing more and
/// closes nothing, as a network that drops packets does.
fn silent_proxy(
    config: &oxid_server::datastore::postgres::PgConfig,
    silent: Arc<std::sync::atomic::AtomicBool>,
) -> tempfile::TempDir {
    let oxid_server::datastore::postgres::PgHost::Unix(cluster) = &config.host else {
        panic!("the test cluster is reached over its socket");
    };
    let name = format!(".s.PGSQL.{}", config.port);
    let upstream = cluster.join(&name);
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::UnixListener::bind(dir.path().join(&name)).unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::UnixStream::connect(&upstream).await.unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pipe(client_read, server_write, silent.clone()));
            tokio::spawn(pipe(server_read, client_write, silent.clone()));
        }
    });
    dir
}

/// Copies `from` to `to` until `silent` is set, then holds both open.
async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    silent: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.load(std::sync::atomic::Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The committed-revision read is on an agent's Sync path (a server
/// behind the agent asks whether the database is): a database gone silent
/// must not hold it past the statement_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_database_does_not_hold_the_committed_revision_read() {
    let mut config = pg_cluster::fresh().await;
    config.statement_timeout = Duration::from_secs(1);
    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = silent_proxy(&config, silent.clone());
    config.host = oxid_server::datastore::postgres::PgHost::Unix(proxy.path().to_owned());
    let store = store(&config, "silent").await;
    let before = store.committed_revision().await.unwrap();

    silent.store(true, std::sync::atomic::Ordering::Release);
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(30), store.committed_revision())
        .await
        .expect("the read hung on a silent database");
    let took = started.elapsed();
    let err = read.expect_err("a silent database answered").to_string();
    assert!(
        err.contains("no answer") && err.contains("statement_timeout"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    eprintln!("revision {before} read; refused after {took:?} of silence: {err}");
}
