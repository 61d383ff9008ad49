//! Issue 15 item 3, test (c), with real server processes: 10,000 entries
//! created (and 1,000 of them deleted again) through server A while server
//! B, on the same PostgreSQL database, serves 100 agents over open Sync
//! streams. Afterwards B's index equals the table (its entry count, and a
//! fresh snapshot for every agent), and every agent's view, built only from
//! what its stream pushed, equals B's. Needs the cluster `./scripts/test`
//! starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;
#[path = "support/sync_view.rs"]
mod sync_view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use oxid_proto::admin as admin_pb;
use support::cli_process::Server;
use sync_view::{View, follow, snapshot};

const AGENTS: usize = 100;
const PER_AGENT: usize = 100;
/// Entries per CreateEntries call: 100 transactions, each a feed batch.
const BATCH: usize = 100;
/// Every DELETE_EVERY-th entry of each agent is deleted again once all
/// are created.
const DELETE_EVERY: usize = 10;

/// A server named `name` on database `db`, over the cluster's socket, with
/// metrics on port 0.
fn server(name: &str, db: &str) -> Server {
    let url = pg_cluster::config_for(db).to_string();
    Server::start_with_config(
        &format!("server_name = {name:?}\n"),
        &["--datastore-url", &url, "--metrics-address", "127.0.0.1:0"],
    )
}

/// The value of the unlabelled sample `name` at `addr`'s `/metrics`.
fn gauge(addr: &str, name: &str) -> f64 {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: oxid\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} on /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn ten_thousand_entries_written_on_a_reach_the_hundred_agents_of_b_exactly() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let a = server("a", &db.dbname);
    let b = server("b", &db.dbname);
    let addr_b: SocketAddr = b.ready_field("agent_api").parse().unwrap();
    let metrics_b = b.ready_field("metrics");

    rt.block_on(async {
        let mut admin_a = a.admin().await;
        // B's bundle holds both servers' authorities once it has followed
        // A's rows; B's own is all an agent of B needs.
        let bundle = b.spiffe_bundle();

        // 100 agents attest on B and hold their Sync streams open.
        let mut agents = Vec::with_capacity(AGENTS);
        let mut views = Vec::with_capacity(AGENTS);
        for _ in 0..AGENTS {
            let token = admin_a
                .create_join_token(admin_pb::CreateJoinTokenRequest {
                    ttl: 3600,
                    spiffe_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            let client =
                support::agent_api_client(addr_b, bundle.clone(), support::SERVER_ID, None)
                    .await
                    .unwrap();
            let agent = support::attest_token_with(client, &token.token, |csr| csr)
                .await
                .unwrap();
            let mut rx = follow(addr_b, bundle.clone(), &agent).await;
            // The (empty) first snapshot: the stream is being served.
            rx.changed().await.unwrap();
            agents.push(agent);
            views.push(rx);
        }

        // 10,000 entries through A, 100 per agent, interleaved across
        // agents so that every batch touches many streams; then every
        // tenth deleted again.
        let mut created = Vec::with_capacity(AGENTS * PER_AGENT);
        let all: Vec<admin_pb::Entry> = (0..PER_AGENT)
            .flat_map(|i| {
                agents
                    .iter()
                    .enumerate()
                    .map(move |(n, agent)| admin_pb::Entry {
                        spiffe_id: format!("spiffe://example.org/w/{n}/{i}"),
                        parent_id: agent.id.to_string(),
                        selectors: vec![format!("unix:uid:{}", 1000 + i)],
                        ..Default::default()
                    })
            })
            .collect();
        for chunk in all.chunks(BATCH) {
            let results = admin_a
                .create_entries(admin_pb::CreateEntriesRequest {
                    entries: chunk.to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .results;
            for r in results {
                assert!(r.error.is_empty(), "{}", r.error);
                created.push(r.entry.unwrap().id);
            }
        }
        // Entry k is agent k mod AGENTS's number k / AGENTS.
        let doomed: Vec<String> = created
            .iter()
            .enumerate()
            .filter(|(k, _)| (k / AGENTS) % DELETE_EVERY == 0)
            .map(|(_, id)| id.clone())
            .collect();
        for chunk in doomed.chunks(BATCH) {
            let results = admin_a
                .delete_entries(admin_pb::DeleteEntriesRequest {
                    ids: chunk.to_vec(),
                })
                .await
                .unwrap()
                .into_inner()
                .results;
            assert!(results.iter().all(|r| r.error.is_empty()), "{results:?}");
        }

        // The table, per agent.
        let raw = pg_cluster::raw(&db).await;
        let rows = raw
            .query(
                "SELECT id, parent_id, revision, spiffe_id FROM oxid_entries",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), AGENTS * PER_AGENT - doomed.len());
        let mut table: HashMap<String, View> = HashMap::new();
        for row in &rows {
            let revision: i64 = row.get(2);
            table
                .entry(row.get(1))
                .or_default()
                .insert(row.get(0), (u64::try_from(revision).unwrap(), row.get(3)));
        }

        // Every agent's pushed view reaches exactly its rows of the table.
        for (agent, view) in agents.iter().zip(views.iter_mut()) {
            let expected = table.remove(agent.id.as_str()).unwrap();
            assert_eq!(expected.len(), PER_AGENT - PER_AGENT / DELETE_EVERY);
            let reached =
                tokio::time::timeout(Duration::from_secs(60), view.wait_for(|v| *v == expected))
                    .await
                    .is_ok();
            assert!(
                reached,
                "{}: the pushed view ({} entries) never equalled the table ({})",
                agent.id,
                view.borrow().len(),
                expected.len()
            );
            // B's index, read afresh, is the same.
            assert_eq!(snapshot(addr_b, bundle.clone(), agent).await, expected);
        }
        assert!(table.is_empty(), "rows for no agent: {:?}", table.keys());
    });
    assert_eq!(
        gauge(&metrics_b, "oxid_entries") as usize,
        AGENTS * PER_AGENT - AGENTS * PER_AGENT / DELETE_EVERY
    );
    assert_eq!(gauge(&metrics_b, "oxid_feed_lag_seconds"), 0.0);
}
