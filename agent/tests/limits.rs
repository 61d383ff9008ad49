//! The agent's limits, lowered by configuration: the Workload API's request
//! size, and a server that takes fewer CSRs per call than the agent sends.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Harness, WAIT, my_uid};
use oxid_agent::workload::with_header;
use oxid_proto::workload as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_request_limit_refuses_larger_requests_only() {
    let mut h = Harness::start().await;
    h.stop_agent().await;
    h.max_request_kib = Some(64);
    h.start_agent(None);
    let client = h.with_web_identity().await;
    let mut raw = h.raw_client().await;
    let validate = |svid: String| {
        with_header(pb::ValidateJwtsvidRequest {
            audience: "spiffe://example.org/db".into(),
            svid,
        })
    };
    // Past 64 KiB: refused before it is decoded.
    let err = raw
        .validate_jwtsvid(validate("a".repeat(80 << 10)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // Under it: decoded, and judged as a token.
    let err = raw
        .validate_jwtsvid(validate("a".repeat(1 << 10)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // And the connection still serves.
    client
        .fetch_jwt_svid(&["spiffe://example.org/db"], None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_signs_in_smaller_batches_for_a_server_that_takes_fewer() {
    // The agent sends up to 500 CSRs a call; this server takes 3.
    let h = Harness::start_with("max_csrs_per_call = 3\n").await;
    let uid = format!("unix:uid:{}", my_uid());
    for i in 0..10 {
        h.create_entry(&format!("spiffe://example.org/w{i}"), &[&uid])
            .await;
    }
    let client = h.client().await;
    let all = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ctx) = client.fetch_x509_context().await {
                if ctx.svids().len() == 10 {
                    return ctx;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("all 10 SVIDs signed, 3 CSRs at a time");
    assert_eq!(
        all.svids()[9].spiffe_id().to_string(),
        "spiffe://example.org/w9"
    );
}

#[test]
fn bad_limits_are_configuration_errors() {
    use oxid_agent::config::{AgentConfig, AgentFile};
    for (text, key) in [
        ("max_request_kib = 0", "max_request_kib"),
        ("max_request_kib = 100000", "max_request_kib"),
        ("max_streams_per_uid = 0", "max_streams_per_uid"),
    ] {
        let err = AgentConfig::from_toml(text, AgentFile::default()).unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
    let ok = AgentConfig::from_toml("max_request_kib = 64", AgentFile::default()).unwrap();
    assert_eq!(ok.max_request_bytes, 64 * 1024);
}
