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

use std::path::PathBuf;

use oxid_server::datastore::PgConfig;
use oxid_server::datastore::postgres::{PgHost, SslMode};

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
