//! A server whose index is behind an agent's view never takes the agent
//! back in time (issue 15 item 5). Two real servers on one database; B
//! logs in as a role whose right to read the change feed the test takes
//! away, so its index stops while the database moves on. An entry deleted
//! through A must not come back from B: B waits (bounded) for its index,
//! then refuses with `Unavailable` saying it is behind, and once it can
//! read the feed again it resumes the agent from the agent's revision.
//! Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_pki::bundle::Bundle;
use oxid_proto::agent as pb;
use oxid_tls::SvidResolver;
use support::cli_process::Server;

/// A server named `name` on the test database over the cluster's socket,
/// logging in as `user`.
fn server(name: &str, db: &oxid_server::datastore::PgConfig, user: &str) -> Server {
    let oxid_server::datastore::postgres::PgHost::Unix(dir) = &db.host else {
        panic!("the tests reach the cluster over its socket");
    };
    let url = format!(
        "postgresql://{user}@/{}?host={}&port={}",
        db.dbname,
        dir.display(),
        db.port
    );
    Server::start_with_config(
        &format!("server_name = {name:?}\n"),
        &["--datastore-url", &url],
    )
}

/// `s`'s bundle once it holds both servers' authorities.
fn both_authorities(s: &Server) -> Bundle {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bundle = s.spiffe_bundle();
        if bundle.x509_authorities().len() == 2 {
            return bundle;
        }
        assert!(Instant::now() < deadline, "the bundle never held both CAs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first complete answer of a sync stream from `addr` opened at
/// `revision`: the page without `more`, or the status the stream ended
/// with. (The test's agent holds one entry at most: one page.)
async fn sync_once(
    addr: SocketAddr,
    bundle: &Bundle,
    certs: &Arc<SvidResolver>,
    revision: u64,
) -> Result<pb::SyncResponse, tonic::Status> {
    let mut client = support::agent_api_client(
        addr,
        bundle.clone(),
        support::SERVER_ID,
        Some(certs.clone()),
    )
    .await
    .unwrap();
    let mut stream = client
        .sync(pb::SyncRequest {
            revision,
            known_entry_ids: vec![],
            incarnation: String::new(),
        })
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the server neither answered nor refused")?
        .ok_or_else(|| tonic::Status::unknown("the stream ended"))
}

/// Opens streams from `addr` until one's snapshot satisfies `done`.
async fn until_synced(
    addr: SocketAddr,
    bundle: &Bundle,
    certs: &Arc<SvidResolver>,
    done: impl Fn(&pb::SyncResponse) -> bool,
) -> pb::SyncResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(page) = sync_once(addr, bundle, certs, 0).await {
            if done(&page) {
                return page;
            }
        }
        assert!(Instant::now() < deadline, "the server never got there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn holds(page: &pb::SyncResponse, entry: &str) -> bool {
    page.upserts.iter().any(|e| e.id == entry)
}

#[test]
fn a_server_behind_the_agent_waits_then_refuses_and_never_sends_older_state() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let a = server("a", &db, "postgres");
    // B's own role: a superuser would ignore the REVOKE below.
    let role = format!("{}_b", db.dbname);
    let raw = rt.block_on(pg_cluster::raw(&db));
    rt.block_on(raw.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"
    )))
    .unwrap();
    let b = server("b", &db, &role);
    let bundle = both_authorities(&a);
    let _ = both_authorities(&b);
    let addr_a: SocketAddr = a.ready_field("agent_api").parse().unwrap();
    let addr_b: SocketAddr = b.ready_field("agent_api").parse().unwrap();

    let token = a.json(&["token", "generate"]);
    let agent = rt.block_on(async {
        let client = support::agent_api_client(addr_a, bundle.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, token["token"].as_str().unwrap(), |csr| csr)
            .await
            .unwrap()
    });
    let created = a.json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/doomed",
        "--parent-id",
        agent.id.as_str(),
        "--selector",
        "unix:uid:1000",
    ]);
    let doomed = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // B has the entry; then it can no longer read the feed.
    rt.block_on(until_synced(addr_b, &bundle, &agent.certs, |p| {
        holds(p, &doomed)
    }));
    rt.block_on(raw.batch_execute(&format!("REVOKE SELECT ON oxid_changes FROM {role}")))
        .unwrap();

    // Deleted through A: the agent's view, from A, is past the deletion.
    a.ok(&["entry", "delete", "--entry-id", &doomed]);
    let view = rt.block_on(until_synced(addr_a, &bundle, &agent.certs, |p| {
        !holds(p, &doomed)
    }));

    // B waits for its index, then refuses: it never sends its older state.
    let asked = Instant::now();
    let refused = rt
        .block_on(sync_once(addr_b, &bundle, &agent.certs, view.revision))
        .expect_err("a server behind the agent must not answer");
    let waited = asked.elapsed();
    println!("B refused after {waited:?}: {}", refused.message());
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("behind the agent"),
        "{refused:?}"
    );
    assert!(
        waited >= Duration::from_secs(4),
        "B refused at once ({waited:?}) instead of waiting for its index"
    );

    // Once B reads the feed again it catches up, and resumes the agent
    // from its revision: a delta at or past it, without the deleted entry.
    rt.block_on(raw.batch_execute(&format!("GRANT SELECT ON oxid_changes TO {role}")))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        match rt.block_on(sync_once(addr_b, &bundle, &agent.certs, view.revision)) {
            Ok(page) => break page,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(Instant::now() < deadline, "B never caught up: {s:?}");
            }
        }
    };
    assert!(resumed.revision >= view.revision, "{resumed:?}");
    assert!(!resumed.snapshot, "a resumed stream starts with a delta");
    assert!(!holds(&resumed, &doomed), "the deleted entry came back");
}
