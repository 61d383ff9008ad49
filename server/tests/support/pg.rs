//! The PostgreSQL the tests run against: the private cluster `scripts/test`
//! starts, named by `OXID_TEST_PG` (`host=<socket dir> port=<port>
//! user=postgres`). Every test gets a database of its own.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_server::datastore::postgres::{PgHost, SslMode};
use oxid_server::datastore::{DataStore, Entry, EntryId, PgConfig, PgStore};

/// A runtime for the tests that drive processes from synchronous code.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `password` in `dir/pg-password`, mode 0600 (a looser file is refused).
pub fn password_file(dir: &std::path::Path, password: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let file = dir.join("pg-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

/// The `[datastore]` table `run` and `migrate` both read: a password file
/// in `dir` and the cluster's CA, verify-full.
pub fn datastore_table(dir: &std::path::Path, password: &str, ca: &std::path::Path) -> String {
    format!(
        "[datastore]\npassword_file = {:?}\nca_file = {:?}\nsslmode = \"verify-full\"\n",
        password_file(dir, password).display().to_string(),
        ca.display().to_string()
    )
}

/// The parent of the test entries.
pub const AGENT: &str = "spiffe://example.org/oxid/agent/join_token/abc";

/// The cluster's settings, or a failure that says how to get one.
fn cluster() -> (PathBuf, u16, String) {
    let spec = std::env::var("OXID_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "OXID_TEST_PG is not set: the PostgreSQL tests need the private cluster that \
             ./scripts/test starts (it installs postgresql from Debian if missing); run the \
             tests with ./scripts/test"
        )
    });
    let (mut host, mut port, mut user) = (None, None, None);
    for pair in spec.split_whitespace() {
        match pair.split_once('=') {
            Some(("host", v)) => host = Some(PathBuf::from(v)),
            Some(("port", v)) => port = v.parse().ok(),
            Some(("user", v)) => user = Some(v.to_owned()),
            _ => panic!("OXID_TEST_PG: unexpected {pair:?}"),
        }
    }
    (
        host.expect("OXID_TEST_PG names no host"),
        port.expect("OXID_TEST_PG names no port"),
        user.unwrap_or_else(|| "postgres".into()),
    )
}

/// The TCP side of the cluster: (port, CA file, password of `postgres`).
pub fn tcp() -> (u16, PathBuf, String) {
    let (_, port, _) = cluster();
    let ca = std::env::var("OXID_TEST_PG_CA")
        .expect("OXID_TEST_PG_CA is not set: run the tests with ./scripts/test");
    let password = std::env::var("OXID_TEST_PG_PASSWORD")
        .expect("OXID_TEST_PG_PASSWORD is not set: run the tests with ./scripts/test");
    (port, ca.into(), password)
}

/// Settings for database `dbname` over the cluster's Unix socket.
pub fn config_for(dbname: &str) -> PgConfig {
    let (dir, port, user) = cluster();
    let mut config = PgConfig::from_url(&format!("postgresql://{user}@localhost/{dbname}"))
        .expect("test URL parses");
    config.host = PgHost::Unix(dir);
    config.port = port;
    config.sslmode = SslMode::Disable;
    config
}

/// A raw connection (not through the store) to `config`'s database.
pub async fn raw(config: &PgConfig) -> tokio_postgres::Client {
    let PgHost::Unix(dir) = &config.host else {
        panic!("raw connections go over the socket");
    };
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(dir)
        .port(config.port)
        .user(&config.user)
        .dbname(&config.dbname)
        .application_name("oxid-test")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster: {e}"));
    tokio::spawn(connection);
    client
}

/// A new, empty database of its own.
pub async fn fresh() -> PgConfig {
    let admin = raw(&config_for("postgres")).await;
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    let name = format!("oxid_test_{}", oxid_pki::hex(&bytes));
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    config_for(&name)
}

/// An entry for `spiffe://example.org/<name>`, uid `uid`, under [`AGENT`].
pub fn entry(name: &str, uid: u32) -> Entry {
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
pub async fn store(config: &PgConfig, name: &str) -> Arc<PgStore> {
    let mut config = config.clone();
    config.application_name = name.to_owned();
    Arc::new(PgStore::open(&config).await.unwrap())
}

/// Polls `condition` (a query returning one bool) until it holds.
pub async fn until(raw: &tokio_postgres::Client, condition: &str) {
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
pub async fn reaches(store: &PgStore, revision: u64) {
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
