//! `oxid-server datastore migrate`: a real server on sled with an agent, an
//! entry and an unused join token, stopped, migrated into PostgreSQL (over
//! TCP with TLS and a password file, as `run` takes them), and started on
//! PostgreSQL with the same data directory: the agent keeps its identity,
//! gets its entry under the same ID and an SVID for it that verifies with
//! the bundle it already held, and the old token still attests. A store in
//! use and a database that is not empty are refused. Needs the cluster
//! `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use oxid_pki::x509::{ExtendedKeyUsage, verify_x509_svid};
use oxid_proto::agent as pb;
use support::cli_process::{BIN, Server};

fn migrate(dir: &std::path::Path, url: &str) -> Output {
    Command::new(BIN)
        .args([
            "datastore",
            "migrate",
            "--output",
            "json",
            "--from-data-dir",
        ])
        .arg(dir.join("data"))
        .args(["--to", url, "--config"])
        .arg(dir.join("migrate.toml"))
        .env_remove("PGPASSWORD")
        .output()
        .unwrap()
}

fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn a_sled_server_moves_to_postgres_and_its_agent_keeps_its_svids() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let (port, ca, password) = pg_cluster::tcp();
    let url = format!("postgresql://postgres@localhost:{port}/{}", db.dbname);

    // A single server on sled: an agent, its entry, a token not used yet.
    let sled = Server::start(&[]);
    let token = sled.json(&["token", "generate"]);
    let spare = sled.json(&["token", "generate"]);
    let addr = sled.ready_field("agent_api").parse().unwrap();
    let bundle = sled.spiffe_bundle();
    let agent = rt.block_on(async {
        let client = support::agent_api_client(addr, bundle.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, token["token"].as_str().unwrap(), |csr| csr)
            .await
            .unwrap()
    });
    let created = sled.json(&[
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
    let config = pg_cluster::datastore_table(sled.dir.path(), &password, &ca);
    std::fs::write(sled.dir.path().join("migrate.toml"), &config).unwrap();

    // While the server runs, its store is refused.
    let in_use = error_line(&migrate(sled.dir.path(), &url));
    assert!(in_use.contains("the sled store is in use"), "{in_use}");
    assert!(in_use.contains("stop it first"), "{in_use}");

    let dir = sled.stop();
    let out = migrate(dir.path(), &url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counts["entries"], 1, "{counts}");
    assert_eq!(counts["agents"], 1, "{counts}");
    assert_eq!(counts["join_tokens"], 1, "{counts}");
    assert_eq!(counts["bundles"], 1, "{counts}");
    assert_eq!(counts["ca_authorities"], 1, "{counts}");
    assert_eq!(counts["ca_authorities_with_keys"], 1, "{counts}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&password));

    // A second copy into the same database is refused, naming what is there.
    let again = error_line(&migrate(dir.path(), &url));
    assert!(again.contains("not empty"), "{again}");
    assert!(again.contains("1 entries"), "{again}");

    // The same data directory (its CA keys), now on PostgreSQL.
    let pg = Server::start_in(dir, &config, &["--datastore-url", &url]);
    let addr = pg.ready_field("agent_api").parse().unwrap();
    assert_eq!(pg.spiffe_bundle(), bundle, "the same CA");
    rt.block_on(async {
        // The agent's old SVID is accepted and the old bundle verifies the
        // new server: no re-attestation, no new trust.
        let mut client = support::agent_api_client(
            addr,
            bundle.clone(),
            support::SERVER_ID,
            Some(agent.certs.clone()),
        )
        .await
        .unwrap();
        let mut stream = client
            .sync(pb::SyncRequest::default())
            .await
            .unwrap()
            .into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let entry = loop {
            let message = tokio::time::timeout_at(deadline, stream.message())
                .await
                .expect("the entry reached the agent")
                .unwrap()
                .unwrap();
            if let Some(e) = message.upserts.into_iter().find(|e| e.id == entry_id) {
                break e;
            }
        };
        assert_eq!(entry.spiffe_id, "spiffe://example.org/web");
        let signed = support::inproc::sign_on(&mut client, &entry_id)
            .await
            .unwrap();
        assert!(signed.error.is_empty(), "{}", signed.error);
        let verified = verify_x509_svid(
            &support::chain_of(signed.cert_chain),
            &bundle,
            ExtendedKeyUsage::ServerAuth,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(verified.spiffe_id.as_str(), "spiffe://example.org/web");

        // The token generated on sled attests on PostgreSQL, once.
        let fresh = support::agent_api_client(addr, bundle.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(fresh, spare["token"].as_str().unwrap(), |csr| csr)
            .await
            .unwrap();
    });
}

#[test]
fn a_missing_store_and_a_bad_url_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("migrate.toml"), "").unwrap();
    let none = error_line(&migrate(
        dir.path(),
        "postgresql://oxid@localhost/oxid?sslmode=disable",
    ));
    assert!(none.contains("holds no sled store"), "{none}");
    let secret = error_line(&migrate(
        dir.path(),
        "postgresql://oxid:s3cret@localhost/oxid",
    ));
    assert!(secret.contains("holds a password"), "{secret}");
    assert!(!secret.contains("s3cret"), "{secret}");
}
