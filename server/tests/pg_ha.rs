//! Two real servers of one trust domain on one PostgreSQL database, each
//! with its own CA keys and journal row (issue 15 item 4): the bundle each
//! publishes is the union of both servers' authorities, an SVID from
//! either verifies with the bundle an agent gets from the other, an agent
//! attested on one is served by the other, and a rotation on one reaches
//! the agents of the other. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{ExtendedKeyUsage, verify_x509_svid};
use oxid_proto::agent as pb;
use oxid_tls::SvidResolver;
use support::cli_process::Server;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A server named `name` on the test database, over TLS with a password.
fn server(name: &str, url: &str, password: &str, ca: &std::path::Path) -> Server {
    let secrets = tempfile::tempdir().unwrap();
    let file = pg_cluster::password_file(secrets.path(), password);
    let config = format!(
        "server_name = {name:?}\n[datastore]\npassword_file = {:?}\nca_file = {:?}\n",
        file.display().to_string(),
        ca.display().to_string()
    );
    let s = Server::start_with_config(&config, &["--datastore-url", url]);
    // The password file is read at start only.
    drop(secrets);
    s
}

/// Polls `s`'s bundle until it holds `n` X.509 authorities.
fn until_authorities(s: &Server, n: usize) -> Bundle {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let bundle = s.spiffe_bundle();
        if bundle.x509_authorities().len() == n {
            return bundle;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bundle never held {n} authorities: {}",
            bundle.x509_authorities().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The own trust domain's bundle of the first sync message from `addr`
/// that holds `n` X.509 authorities.
async fn synced_bundle(
    addr: SocketAddr,
    trusted: Bundle,
    certs: Arc<SvidResolver>,
    n: usize,
) -> Bundle {
    let mut client = support::agent_api_client(addr, trusted, support::SERVER_ID, Some(certs))
        .await
        .unwrap();
    let mut stream = client
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no bundle of {n} authorities reached the agent"))
            .unwrap()
            .unwrap();
        let own = message
            .bundles
            .iter()
            .find(|b| b.trust_domain == "example.org")
            .map(|b| Bundle::from_spiffe_json(td(), b.spiffe_json.as_bytes()).unwrap());
        if let Some(bundle) = own.filter(|b| b.x509_authorities().len() == n) {
            return bundle;
        }
    }
}

/// An X509-SVID for `entry_id` from the server at `addr`.
async fn sign(
    addr: SocketAddr,
    trusted: Bundle,
    certs: Arc<SvidResolver>,
    entry_id: &str,
) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let mut client = support::agent_api_client(addr, trusted, support::SERVER_ID, Some(certs))
        .await
        .unwrap();
    let signed = support::inproc::sign_on(&mut client, entry_id)
        .await
        .unwrap();
    assert!(signed.error.is_empty(), "{}", signed.error);
    support::chain_of(signed.cert_chain)
}

#[test]
fn two_servers_on_one_database_trust_each_other_and_rotations_reach_every_agent() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let (port, ca, password) = pg_cluster::tcp();
    let url = format!("postgresql://postgres@localhost:{port}/{}", db.dbname);
    let a = server("a", &url, &password, &ca);
    let b = server("b", &url, &password, &ca);

    // Each keeps its own keys and journal row; both publish both CAs.
    let on_a = until_authorities(&a, 2);
    let on_b = until_authorities(&b, 2);
    assert_eq!(
        on_a.x509_authorities()
            .iter()
            .map(|c| c.to_vec())
            .collect::<std::collections::BTreeSet<_>>(),
        on_b.x509_authorities()
            .iter()
            .map(|c| c.to_vec())
            .collect::<std::collections::BTreeSet<_>>()
    );
    let rows = rt.block_on(async {
        let raw = pg_cluster::raw(&db).await;
        raw.query(
            "SELECT server, count(*) FROM oxid_authorities GROUP BY server ORDER BY server",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>()
    });
    assert_eq!(rows, [("a".to_owned(), 1), ("b".to_owned(), 1)]);
    for s in [&a, &b] {
        let keys = std::fs::read_dir(s.dir.path().join("data/keys"))
            .unwrap()
            .count();
        assert_eq!(
            keys, 2,
            "one authority's X.509 and JWT keys, on its own disk"
        );
    }

    // An agent attests on A; its entry is created through B.
    let addr_a: SocketAddr = a.ready_field("agent_api").parse().unwrap();
    let addr_b: SocketAddr = b.ready_field("agent_api").parse().unwrap();
    let token = a.json(&["token", "generate"]);
    let agent = rt.block_on(async {
        let client = support::agent_api_client(addr_a, on_a.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, token["token"].as_str().unwrap(), |csr| csr)
            .await
            .unwrap()
    });
    let created = b.json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        agent.id.as_str(),
        "--selector",
        "unix:uid:1000",
    ]);
    let entry_id = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    rt.block_on(async {
        // The bundles the agent gets from each server.
        let from_a = synced_bundle(addr_a, on_a.clone(), agent.certs.clone(), 2).await;
        // B accepts the agent A attested, and the bundle from A verifies
        // B's server certificate.
        let from_b = synced_bundle(addr_b, from_a.clone(), agent.certs.clone(), 2).await;
        let by_a = sign(addr_a, from_b.clone(), agent.certs.clone(), &entry_id).await;
        let by_b = sign(addr_b, from_a.clone(), agent.certs.clone(), &entry_id).await;
        let now = SystemTime::now();
        for (chain, bundle, what) in [
            (&by_a, &from_b, "A's SVID with the bundle from B"),
            (&by_b, &from_a, "B's SVID with the bundle from A"),
        ] {
            let verified = verify_x509_svid(chain, bundle, ExtendedKeyUsage::ServerAuth, now)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(verified.spiffe_id.as_str(), "spiffe://example.org/web");
        }
        // Each server signed with its own CA: B's SVID does not verify
        // with A's authority alone.
        assert!(
            verify_x509_svid(&by_b, &own_only(&on_a), ExtendedKeyUsage::ServerAuth, now).is_err()
        );
        assert!(
            verify_x509_svid(&by_a, &own_only(&on_a), ExtendedKeyUsage::ServerAuth, now).is_ok()
        );
    });

    // A rotation on B reaches the agent syncing from A.
    let stream = std::thread::spawn({
        let bundle = on_a.clone();
        let certs = agent.certs.clone();
        move || pg_cluster::runtime().block_on(synced_bundle(addr_a, bundle, certs, 3))
    });
    b.ok(&["ca", "rotate", "--prepare"]);
    let after = stream.join().unwrap();
    let on_b_now = until_authorities(&b, 3);
    for root in on_b_now.x509_authorities() {
        assert!(
            after.x509_authorities().contains(root),
            "B's new authority reached A's agent"
        );
    }
}

/// A second server started under a name already in use is refused at
/// start, saying why, instead of taking the other's journal over.
#[test]
fn a_server_under_another_ones_name_is_refused() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let (port, ca, password) = pg_cluster::tcp();
    let url = format!("postgresql://postgres@localhost:{port}/{}", db.dbname);
    let first = server("a", &url, &password, &ca);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        dir.path().join("server.toml"),
        format!(
            "server_name = \"a\"\n[datastore]\npassword_file = {:?}\nca_file = {:?}\n",
            file.display().to_string(),
            ca.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(support::cli_process::BIN)
        .args(["run", "--bind-address", "127.0.0.1:0", "--config"])
        .arg(dir.path().join("server.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("admin.sock"))
        .args(["--datastore-url", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another server may be running under this server_name"),
        "{err}"
    );
    // The first is untouched.
    first.ok(&["healthcheck"]);
    assert_eq!(until_authorities(&first, 1).x509_authorities().len(), 1);
}

/// A server's own authority alone: a server lists its own authorities
/// before the other servers'.
fn own_only(published: &Bundle) -> Bundle {
    let mut only = Bundle::new(td());
    only.add_x509_authority(published.x509_authorities()[0].clone())
        .unwrap();
    only
}

/// A row of server `name`'s authority `sequence` (the key material does
/// not matter to the store).
fn row(sequence: u64) -> oxid_server::datastore::ServerAuthority {
    oxid_server::datastore::ServerAuthority {
        server: String::new(),
        sequence,
        x509_authority: format!("x509-{sequence}"),
        jwt_key_id: format!("kid-{sequence}"),
        jwt_public_key: format!("jwt-{sequence}"),
        not_after: 4_000_000_000,
    }
}

/// Two servers replacing their rows at once, round after round (each
/// rotation is such a replacement), never drop each other's: each store
/// ends with exactly its last rows, and sees exactly the other's as peers.
#[test]
fn two_servers_rotating_at_once_keep_each_others_authorities() {
    use oxid_server::datastore::DataStore as _;
    let rt = pg_cluster::runtime();
    rt.block_on(async {
        let db = pg_cluster::fresh().await;
        let open = |name: &str| {
            let mut config = db.clone();
            config.server_name = name.to_owned();
            config.application_name = name.to_owned();
            async move {
                Arc::new(
                    oxid_server::datastore::PgStore::open(&config)
                        .await
                        .unwrap(),
                )
            }
        };
        let (a, b) = (open("a").await, open("b").await);
        let rounds = |store: Arc<oxid_server::datastore::PgStore>, base: u64| {
            tokio::spawn(async move {
                for round in 0..50 {
                    let rows = vec![row(base + round), row(base + round + 1)];
                    store.put_own_authorities(rows).await.unwrap();
                }
            })
        };
        let (ra, rb) = (rounds(a.clone(), 0), rounds(b.clone(), 1000));
        ra.await.unwrap();
        rb.await.unwrap();
        let seqs = |rows: Vec<oxid_server::datastore::ServerAuthority>| {
            rows.into_iter()
                .map(|r| (r.server, r.sequence))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            seqs(a.peer_authorities().await.unwrap()),
            [("b".to_owned(), 1049), ("b".to_owned(), 1050)]
        );
        assert_eq!(
            seqs(b.peer_authorities().await.unwrap()),
            [("a".to_owned(), 49), ("a".to_owned(), 50)]
        );
    });
}
