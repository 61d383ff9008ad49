//! The server away for longer than a workload SVID's TTL: the agent serves
//! its SVIDs until they expire (never after), says plainly why it has none
//! then, and recovers by itself when the server is back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use common::{Harness, WAIT, eventually, serial_and_expiry};
use tokio_stream::StreamExt as _;

/// Workload SVIDs of 4 s; the agent's own lasts the whole test.
const TTLS: &str = "[ca]\nttl = \"10m\"\nx509_svid_ttl = \"4s\"\nagent_svid_ttl = \"90s\"\njwt_svid_ttl = \"90s\"\n";

fn not_after(svid: &spiffe::X509Svid) -> SystemTime {
    serial_and_expiry(svid).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_the_svid_ttl_ends_in_unavailable_then_recovers() {
    let mut h = Harness::start_with(TTLS).await;
    let client = h.with_web_identity().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    let mut held = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    h.stop_server().await;
    // The stream carries what the agent holds until it expires, then ends
    // with the reason; it never carries an expired certificate.
    let ended = loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("the stream went silent")
        {
            Some(Ok(svid)) => {
                assert!(
                    not_after(&svid) > SystemTime::now(),
                    "an expired SVID was sent"
                );
                held = svid;
            }
            Some(Err(e)) => break e.to_string(),
            None => panic!("the stream ended without a reason"),
        }
    };
    assert!(
        ended.contains("expired before the agent could renew them"),
        "{ended}"
    );
    assert!(
        SystemTime::now() + Duration::from_secs(1) >= not_after(&held),
        "ended early"
    );
    // New callers are told the same, not handed the expired SVID.
    let refused = client.fetch_x509_svid().await.unwrap_err().to_string();
    assert!(
        refused.contains("Unavailable") || refused.contains("unavailable"),
        "{refused}"
    );

    // Back, with no agent restart: a fresh SVID is served again.
    h.restart_server().await;
    let svid = eventually(|| client.fetch_x509_svid()).await;
    assert!(not_after(&svid) > SystemTime::now());
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
}
