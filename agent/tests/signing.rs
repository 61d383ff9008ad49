//! The SVID manager under a burst of new entries: entries that arrive while
//! a signing pass is under way are signed at once, not at the next rotation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Harness, WAIT, admin, http_get};
use oxid_proto::admin as admin_pb;

async fn svids_cached(metrics: std::net::SocketAddr) -> Option<u64> {
    http_get(metrics, "/metrics")
        .await
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oxid_agent_svids_cached "))
        .and_then(|v| v.trim().parse().ok())
}

async fn create(h: &Harness, ids: impl Iterator<Item = usize>) {
    let entries = ids
        .map(|i| admin_pb::Entry {
            spiffe_id: format!("spiffe://example.org/burst/{i}"),
            parent_id: h.agent_id.clone(),
            // No process here matches: only pre-signing signs these.
            selectors: vec![format!("unix:uid:{}", 100_000 + i)],
            ..Default::default()
        })
        .collect();
    let r = admin(&h.admin_socket())
        .await
        .create_entries(admin_pb::CreateEntriesRequest {
            entries,
            allow_exe_only: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results.iter().all(|r| r.error.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_created_during_a_signing_pass_are_signed_at_once() {
    let mut h = Harness::start().await;
    h.stop_agent().await;
    h.presign = Some(5000);
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = probe.local_addr().unwrap();
    drop(probe);
    h.start_agent_with_metrics(metrics);
    let _ = h.client().await; // the agent is up
    // 4,000 entries make a pass of eight batches. Once the first batches
    // are in, and before the last, one more entry is created: it lands while
    // the pass signs. Its SVID (default TTL 1 h) was not signed for half an
    // hour when its change went unnoticed.
    create(&h, 0..1000).await;
    create(&h, 1000..2000).await;
    create(&h, 2000..3000).await;
    create(&h, 3000..4000).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match svids_cached(metrics).await {
            Some(n) if n >= 4000 => panic!("the pass ended before the test could add to it"),
            Some(n) if n > 0 => break,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "no SVID signed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    create(&h, 4000..4001).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let cached = svids_cached(metrics).await;
        if cached == Some(4001) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cached:?} of 4001 SVIDs signed after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
