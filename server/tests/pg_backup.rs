//! The README's HA backup and restore, as written: `pg_dump --format=custom`
//! of the database while two servers run, a restore with `pg_restore
//! --no-owner` into an empty database, and both servers started on it with
//! their own data directories (their CA keys). They are the same CAs: an
//! agent attested before the backup keeps its identity and gets an SVID
//! that verifies with the bundle it held; a token made before the backup
//! still attests; what was written after the backup is gone from what a
//! restarted agent gets and from the running agent's resumed view, and an
//! entry changed after the backup is back as the backup holds it, though
//! the restored store's revision has passed the agent's: the restored
//! database is another incarnation, so the resumed agent gets a snapshot.
//! Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
#[path = "support/resume.rs"]
mod resume;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::SystemTime;

use oxid_pki::x509::{ExtendedKeyUsage, verify_x509_svid};
use oxid_server::datastore::postgres::PgHost;
use resume::synced;
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
    let kept = a.create_id("kept", agent.id.as_str());

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
    let lost = b.create_id("lost", agent.id.as_str());
    a.ok(&[
        "entry",
        "update",
        "--entry-id",
        &kept,
        "--x509-svid-ttl",
        "17m",
    ]);
    let before = rt.block_on(synced(addr_b, &bundle, &agent, None, |v| {
        v.ttls.len() == 2 && v.ttls.get(&kept) == Some(&1020)
    }));
    assert!(before.ttls.contains_key(&lost));
    assert!(!before.incarnation.is_empty());
    // Every server on the database is of the same incarnation.
    let addr_a: SocketAddr = a.ready_field("agent_api").parse().unwrap();
    let on_a = rt.block_on(synced(addr_a, &bundle, &agent, None, |v| v.ttls.len() == 2));
    assert_eq!(on_a.incarnation, before.incarnation);

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
        // A restarted agent (revision 0) gets the restored state: the entry
        // written after the backup is gone, the changed one as it was.
        let restored_ttls: BTreeMap<String, u64> = [(kept.clone(), 3600)].into();
        let fresh = synced(addr_b, &bundle, &agent, None, |v| v.ttls.len() == 1).await;
        assert_eq!(fresh.ttls, restored_ttls);
        assert_ne!(
            fresh.incarnation, before.incarnation,
            "a restore is another incarnation"
        );
        // The restored store's revision passes the running agent's (the
        // servers' own start writes, then others' entries), so its
        // revision alone would resume it by a delta that keeps its 17m.
        let mut revision = fresh.revision;
        let mut i = 0;
        while revision < before.revision {
            b.create_id(&format!("other-{i}"), "spiffe://example.org/elsewhere");
            i += 1;
            revision = synced(addr_b, &bundle, &agent, None, |_| true)
                .await
                .revision;
        }
        // The running agent resumes from its revision, with its
        // incarnation: a snapshot of the restored state.
        let resumed = synced(addr_b, &bundle, &agent, Some(&before), |v| {
            v.ttls.len() == 1
        })
        .await;
        assert!(
            resumed.snapshot,
            "another incarnation's revision gets a snapshot"
        );
        assert_eq!(
            resumed.ttls, restored_ttls,
            "the database's TTL, not the stale one"
        );
        // Resumed again with what it now holds: a delta.
        let again = synced(addr_b, &bundle, &agent, Some(&resumed), |v| {
            v.ttls.len() == 1
        })
        .await;
        assert!(!again.snapshot, "the same incarnation resumes by a delta");
        assert_eq!(again.ttls, restored_ttls);
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
        let svid = support::inproc::sign_on(&mut client, &kept).await.unwrap();
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
