//! The CA's published snapshot: a rotation step publishes a new one, which
//! the agent API's handshakes and sync streams use; the server's own SVID
//! is renewed by the injected clock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use oxid_pki::bundle::Bundle;
use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use support::inproc::{Server, WAIT, next, sign_on, td};

async fn rotate(s: &Server, step: &str) {
    s.admin()
        .await
        .rotate_ca(admin_pb::RotateCaRequest {
            step: step.into(),
            sequence: 0,
        })
        .await
        .unwrap();
}

fn own_bundle(m: &pb::SyncResponse) -> Option<Bundle> {
    m.bundles
        .iter()
        .find(|b| b.trust_domain == "example.org")
        .map(|b| Bundle::from_spiffe_json(td(), b.spiffe_json.as_bytes()).unwrap())
}

#[tokio::test]
async fn a_rotation_step_reaches_open_sync_streams_and_new_handshakes() {
    let s = Server::start("").await;
    let agent = s.agent().await;
    let entry = s
        .create_entry(
            "spiffe://example.org/web",
            agent.id.as_str(),
            "unix:uid:1000",
            0,
        )
        .await;
    let mut client = s.client(Some(agent.certs.clone())).await;
    let mut stream = client
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(own_bundle(&first).unwrap().x509_authorities().len(), 1);

    // Prepare: the stream gets the bundle with both authorities, unasked.
    rotate(&s, "prepare").await;
    let both = loop {
        let m = next(&mut stream).await.unwrap().unwrap();
        if let Some(b) = own_bundle(&m) {
            break b;
        }
    };
    assert_eq!(both.x509_authorities().len(), 2);
    assert_eq!(
        s.bundle().await,
        both,
        "the stream carries the published bundle"
    );

    // Activate: what is signed now chains to the new authority only, and an
    // agent attested by it passes the handshake (the verifier reads the
    // published bundle) and syncs.
    rotate(&s, "activate").await;
    let svid = sign_on(&mut client, &entry).await.unwrap();
    let leaf_chain = support::chain_of(svid.cert_chain);
    let mut only_new = Bundle::new(td());
    only_new
        .add_x509_authority(both.x509_authorities()[1].clone())
        .unwrap();
    oxid_pki::x509::verify_x509_svid(
        &leaf_chain,
        &only_new,
        oxid_pki::x509::ExtendedKeyUsage::Any,
        std::time::SystemTime::now(),
    )
    .expect("signed by the activated authority");
    let second = s.agent().await;
    let mut c2 = s.client(Some(second.certs.clone())).await;
    let mut s2 = c2
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut s2).await.unwrap().unwrap();
    let after = own_bundle(&m).unwrap();
    assert_eq!(after.x509_authorities(), both.x509_authorities());
    assert!(after.sequence_number() > both.sequence_number());
    // The open stream gets the activation too (the bundle's sequence).
    loop {
        let m = next(&mut stream).await.unwrap().unwrap();
        if own_bundle(&m).is_some_and(|b| b == after) {
            break;
        }
    }
}

#[tokio::test]
async fn the_server_svid_is_renewed_by_the_injected_clock() {
    let s = Server::start("").await;
    let before = support::server_certificate(s.addr).await;
    // Nothing is due by real time: only the injected clock moves past half
    // of the SVID's life.
    s.clock.advance(Duration::from_secs(31 * 60));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = support::server_certificate(s.addr).await;
        if now != before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server SVID was not renewed after the clock passed its half-life"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
