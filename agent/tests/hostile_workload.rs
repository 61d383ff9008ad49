//! A hostile workload against a real agent: absurd audiences, oversized
//! tokens and messages, many streams at once. Each gets a clear gRPC error
//! and the agent keeps serving well-behaved callers afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Harness, eventually};
use oxid_agent::workload::with_header;
use oxid_proto::workload as pb;
use tonic::Code;

/// A harness whose test process has an X509-SVID and can mint JWT-SVIDs.
async fn harness_with_identity() -> Harness {
    let h = Harness::start().await;
    h.with_web_identity().await;
    h
}

/// The agent still serves a normal JWT-SVID request.
async fn still_serving(h: &Harness) {
    let client = h.client().await;
    let jwt = client
        .fetch_jwt_svid(&["spiffe://example.org/db"], None)
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_audiences_are_invalid_arguments() {
    let h = harness_with_identity().await;
    let mut raw = h.raw_client().await;
    let cases: [(&str, Vec<String>); 5] = [
        ("none", vec![]),
        ("empty string", vec![String::new()]),
        ("33", (0..33).map(|i| format!("a{i}")).collect()),
        ("10,000", (0..10_000).map(|i| format!("a{i}")).collect()),
        ("1 MB", vec!["a".repeat(1 << 20)]),
    ];
    for (name, audience) in cases {
        let err = raw
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .err()
            .unwrap_or_else(|| panic!("{name} audiences were accepted"));
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains("audience"), "{name}: {err:?}");
    }
    still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_tokens_and_messages_are_refused() {
    let h = harness_with_identity().await;
    let mut raw = h.raw_client().await;
    // A 1 MB "token" fits the message limit but not the JWT parser's.
    let err = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "spiffe://example.org/db".into(),
            svid: "a".repeat(1 << 20),
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Past the gRPC message limit the request is never decoded at all.
    let err = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "spiffe://example.org/db".into(),
            svid: "a".repeat(8 << 20),
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_open_streams_do_not_starve_others() {
    let h = harness_with_identity().await;
    let channel = h.channel().await;
    let mut streams = Vec::new();
    for _ in 0..1000 {
        let mut raw = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel.clone());
        let mut s = raw
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        // Read the first update, then hold the stream open unread.
        let first = s.message().await.unwrap().unwrap();
        assert_eq!(first.svids.len(), 1);
        streams.push(s);
    }
    // A new connection is served while all of them stay open.
    still_serving(&h).await;
    drop(streams);
    still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_per_uid_are_capped_and_freed_on_close() {
    let mut h = harness_with_identity().await;
    h.stop_agent().await;
    h.max_streams_per_uid = Some(5);
    h.start_agent(None);
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let mut raw = h.raw_client().await;
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut stream = raw
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        open.push(stream);
    }
    let Err(refused) = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
    else {
        panic!("a sixth stream was accepted");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_streams_per_uid"),
        "{refused:?}"
    );
    // Unary calls are not streams: still served.
    still_serving(&h).await;
    // Closing one frees its slot once the agent sees it go.
    drop(open.pop());
    eventually(|| {
        let mut raw = raw.clone();
        async move {
            raw.fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map(|_| ())
        }
    })
    .await;
}
