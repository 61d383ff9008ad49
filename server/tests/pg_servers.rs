//! The PostgreSQL store as several servers share it: migrations when they
//! start at once, a schema newer than the binary, compare-and-swaps and
//! join tokens raced across stores, and TLS (`verify-full`) with a SCRAM
//! password from a file. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use oxid_server::datastore::postgres::{PgHost, SCHEMA_VERSION, SslMode};
use oxid_server::datastore::{CreateMode, DataStore, DataStoreError, PgStore};

#[path = "support/pg.rs"]
mod pg_cluster;

use pg_cluster::{AGENT, entry, store, until};

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
