//! The agent's wall clock jumps (NTP stepping it, a VM resumed from a
//! snapshot) while workloads hold streams: rotation and expiry follow the
//! SVIDs' real lifetimes, with no signing storm and no SVID served past its
//! real expiry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{Harness, WAIT, serial_and_expiry};
use tokio_stream::StreamExt as _;

/// SVIDs of 6 s (rotated about every 3 s), agent SVID of 10 s.
const SHORT_TTLS: &str = "[ca]\nttl = \"1m\"\nx509_svid_ttl = \"6s\"\nagent_svid_ttl = \"10s\"\njwt_svid_ttl = \"10s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wall_clock_jumps_move_neither_rotation_nor_expiry() {
    let mut h = Harness::start_with(SHORT_TTLS).await;
    // The agent again, on a clock this test moves.
    h.stop_agent().await;
    let clock = h.clock.clone();
    h.start_agent(None);
    let client = h.with_web_identity().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (mut serial, _) = serial_and_expiry(&first);
    let mut rotated_at = Instant::now();

    // Two hours ahead, then two hours behind the real time.
    for jump in [7200, -14_400] {
        clock.jump(jump);
        for _ in 0..2 {
            // The stream stays open and carries the next SVID...
            let next = loop {
                let update = tokio::time::timeout(WAIT, stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("no rotation within {WAIT:?} after a {jump} s jump"))
                    .expect("the stream ended")
                    .unwrap_or_else(|e| panic!("after a {jump} s jump: {e}"));
                if serial_and_expiry(&update).0 != serial {
                    break update;
                }
            };
            let (next_serial, not_after) = serial_and_expiry(&next);
            // ...valid in real time, rotated at its real half-life: a storm
            // would rotate every pass (100 ms), a postponed rotation not at
            // all within WAIT.
            assert!(not_after > SystemTime::now(), "an expired SVID was served");
            let gap = rotated_at.elapsed();
            assert!(
                gap >= Duration::from_secs(1),
                "rotated {gap:?} after the last one"
            );
            serial = next_serial;
            rotated_at = Instant::now();
        }
        // JWT-SVIDs are still minted (and cached by their real lifetime).
        let jwt = client
            .fetch_jwt_svid(&["spiffe://example.org/db"], None)
            .await
            .unwrap_or_else(|e| panic!("after a {jump} s jump: {e}"));
        assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    }
}
