//! The README's HA backup and restore, as written: `pg_dump --format=custom`
//! of the database while two servers run, a restore with `pg_restore
//! --no-owner` into an empty database, and both servers started on it with
//! their own data directories (their CA keys). They are the same CAs: an
//! agent attested before the backup keeps its identity and gets an SVID
//! that verifies with the bundle it held; a token made before the backup
//! still attests; what was written after the backup is gone from what a
//! restarted agent gets and from the running agent's resumed view. Needs
//! the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::SystemTime;

use oxid_pki::x509::{Csr, ExtendedKeyUsage, verify_x509_svid};
use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::agent as pb;
use oxid_server::datastore::postgres::PgHost;
use support::cli_process::Server;

/// `tool args…` against the test cluster's socket, as `postgres`; its
/// stderr if it fails.
fn pg_tool(tool: &str, args: &[&str]) {
    let config = pg_cluster::config_for("postgres");
    let PgHost::Unix(dir) = &config.host else {
        panic!("the test cluster is reached over its socket");
    };
    let out = Command::new(tool)
        .arg("--host")
        .arg(dir)
        .args(["--port", &config.port.to_string(), "--username", "postgres"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (Debian's postgresql-client) does not run: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config(name: &str) -> String {
    format!("server_name = {name:?}\n")
}

/// Entry `name` under `parent` through `s`; its ID.
fn create(s: &Server, name: &str, parent: &str) -> String {
    let created = s.json(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://example.org/{name}"),
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
    ]);
    created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_pg_dump_restored_into_a_new_database_serves_the_same_identities() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let url = |db: &str| pg_cluster::config_for(db).to_string();
    let a = Server::start_with_config(&config("a"), &["--datastore-url", &url(&db.dbname)]);
    let b = Server::start_with_config(&config("b"), &["--datastore-url", &url(&db.dbname)]);
    let addr_b: SocketAddr = b.ready_field("agent_api").parse().unwrap();
    // Both CAs, once B has followed A's rows.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let bundle = loop {
        let bundle = b.spiffe_bundle();
        if bundle.x509_authorities().len() == 2 {
            break bundle;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never published A's CA"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let token = a.json(&["token", "generate"]);
    let spare = a.json(&["token", "generate"]);
    let agent = rt.block_on(async {
        let client = support::agent_api_client(addr_b, bundle.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, token["token"].as_str().unwrap(), |c| c)
            .await
            .unwrap()
    });
    let kept = create(&a, "kept", agent.id.as_str());

    // The backup, while both run; then a write it does not hold, which
    // the agent receives.
    let dump = tempfile::tempdir().unwrap();
    let file = dump.path().join("oxid.dump");
    pg_tool(
        "pg_dump",
        &[
            "--format=custom",
            "--file",
            file.to_str().unwrap(),
            &db.dbname,
        ],
    );
    let lost = create(&b, "lost", agent.id.as_str());
    let (revision, held) = rt.block_on(synced(addr_b, &bundle, &agent, 2, None));
    assert!(held.contains(&kept) && held.contains(&lost));

    // Restore into an empty database; both servers start on it with their
    // own data directories.
    let (dir_a, dir_b) = (a.stop(), b.stop());
    let restored = rt.block_on(pg_cluster::fresh());
    pg_tool(
        "pg_restore",
        &[
            "--no-owner",
            "--dbname",
            &restored.dbname,
            file.to_str().unwrap(),
        ],
    );
    let _a = Server::start_in(
        dir_a,
        &config("a"),
        &["--datastore-url", &url(&restored.dbname)],
    );
    let b = Server::start_in(
        dir_b,
        &config("b"),
        &["--datastore-url", &url(&restored.dbname)],
    );
    let addr_b: SocketAddr = b.ready_field("agent_api").parse().unwrap();
    assert_eq!(
        b.spiffe_bundle().x509_authorities(),
        bundle.x509_authorities(),
        "the same two CAs"
    );

    rt.block_on(async {
        // A restarted agent (revision 0) gets the restored state; so does
        // the running one, resuming from its revision: the entry written
        // after the backup is removed from its view.
        let (_, fresh) = synced(addr_b, &bundle, &agent, 1, None).await;
        assert_eq!(fresh, [kept.clone()].into());
        let (_, resumed) = synced(addr_b, &bundle, &agent, 1, Some((revision, &held))).await;
        assert_eq!(resumed, [kept.clone()].into());
        // Its identity holds, and an SVID for the kept entry verifies with
        // the bundle it held before the backup.
        let mut client = support::agent_api_client(
            addr_b,
            bundle.clone(),
            support::SERVER_ID,
            Some(agent.certs.clone()),
        )
        .await
        .unwrap();
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let svid = client
            .sign_x509_svids(pb::SignX509SvidsRequest {
                requests: vec![pb::SvidRequest {
                    entry_id: kept.clone(),
                    csr: Csr::create(&key).unwrap(),
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .svids
            .remove(0);
        assert!(svid.error.is_empty(), "{}", svid.error);
        let chain = support::chain_of(svid.cert_chain);
        verify_x509_svid(
            &chain,
            &bundle,
            ExtendedKeyUsage::ServerAuth,
            SystemTime::now(),
        )
        .unwrap();
        // The token made before the backup still attests.
        let client = support::agent_api_client(addr_b, bundle.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, spare["token"].as_str().unwrap(), |c| c)
            .await
            .unwrap();
    });
}

/// Opens Sync for `agent` (from `resume`'s revision and entry IDs, if
/// given) and reads until a complete view holds `n` entries; the revision
/// reached and the entry IDs.
async fn synced(
    addr: SocketAddr,
    bundle: &oxid_pki::bundle::Bundle,
    agent: &support::Agent,
    n: usize,
    resume: Option<(u64, &std::collections::BTreeSet<String>)>,
) -> (u64, std::collections::BTreeSet<String>) {
    let mut client = support::agent_api_client(
        addr,
        bundle.clone(),
        support::SERVER_ID,
        Some(agent.certs.clone()),
    )
    .await
    .unwrap();
    let request = match resume {
        Some((revision, known)) => pb::SyncRequest {
            revision,
            known_entry_ids: known.iter().cloned().collect(),
        },
        None => pb::SyncRequest::default(),
    };
    let mut stream = client.sync(request).await.unwrap().into_inner();
    let mut ids = resume.map(|(_, known)| known.clone()).unwrap_or_default();
    loop {
        let page = stream.message().await.unwrap().unwrap();
        if page.snapshot {
            ids.clear();
        }
        ids.extend(page.upserts.into_iter().map(|e| e.id));
        for id in &page.removed_ids {
            ids.remove(id);
        }
        if !page.more && ids.len() == n {
            return (page.revision, ids);
        }
    }
}
