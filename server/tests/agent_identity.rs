//! Attacks on an agent's identity and on entry lifetimes, against a real
//! in-process server over real TLS (issue 12, findings 3, 8, 9, 10, 11): a
//! copied agent SVID renewing after it was replaced, ban and eviction
//! racing renewals, an expired SVID on a connection opened before its
//! notAfter, expired node aliases, a retired serial's Sync stream, and
//! entries whose `expires_at` did not bound their SVIDs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, SystemTime};

use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use tonic::Code;

use support::inproc::{Server, attest_x509pop, next, node_cert, node_pki, renew_with, sign_on};

fn key() -> KeyPair {
    KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()
}

fn refused<T>(r: Result<T, tonic::Status>, needle: &str) {
    let Err(err) = r else {
        panic!("the call should be refused ({needle})");
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(needle), "{}", err.message());
}

fn not_after(der: &[u8]) -> u64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.validity().not_after.timestamp().try_into().unwrap()
}

#[tokio::test]
async fn a_copy_of_a_replaced_svid_cannot_renew() {
    let s = Server::start("").await;
    let real = s.agent().await;
    // The thief holds a copy of the key and SVID (same resolver).
    let renewed = renew_with(&mut s.client(Some(real.certs.clone())).await, &real, &key())
        .await
        .unwrap();
    // Before the renewed SVID is used: the old serial may renew only with
    // the pending SVID's key, which the thief does not have.
    let mut thief = s.client(Some(real.certs.clone())).await;
    refused(
        renew_with(&mut thief, &real, &key()).await,
        "possible theft",
    );
    // The real agent is not locked out.
    let mut c = s.client(Some(renewed.certs.clone())).await;
    c.sync(pb::SyncRequest::default()).await.unwrap();
    // Once it is used, the old serial cannot renew at all.
    refused(renew_with(&mut thief, &real, &key()).await, "replaced");
    renew_with(&mut c, &renewed, &key()).await.unwrap();
}

#[tokio::test]
async fn a_lost_renew_answer_is_recovered_with_the_pending_key() {
    let s = Server::start("").await;
    let agent = s.agent().await;
    let mut old = s.client(Some(agent.certs.clone())).await;
    let pending = key();
    // The answer to this renewal is "lost": the agent keeps its old SVID.
    let lost_answer = renew_with(&mut old, &agent, &pending).await.unwrap();
    // Another key on the old serial is refused, and changes nothing...
    refused(renew_with(&mut old, &agent, &key()).await, "possible theft");
    // ...while the pending key gets a new SVID.
    let recovered = renew_with(&mut old, &agent, &pending).await.unwrap();
    let mut new = s.client(Some(recovered.certs.clone())).await;
    new.sync(pb::SyncRequest::default()).await.unwrap();
    // The recovered SVID is in use: every older serial is retired.
    refused(renew_with(&mut old, &agent, &pending).await, "replaced");
    let mut lost = s.client(Some(lost_answer.certs.clone())).await;
    refused(lost.sync(pb::SyncRequest::default()).await, "replaced");
}

/// Ten agents each renew ten times in a row (each renewal presenting the
/// SVID the last one got), 100 renewals in all; `cut` runs on every agent
/// once 30 are done. Returns the agents.
async fn race_renewals<F: std::future::Future<Output = ()>>(
    s: &Server,
    cut: impl Fn(String) -> F,
) -> Vec<String> {
    let bundle = s.bundle().await;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ids = Vec::new();
    let mut lanes = Vec::new();
    for _ in 0..10 {
        let mut agent = s.agent().await;
        ids.push(agent.id.to_string());
        let (bundle, done, addr) = (bundle.clone(), done_tx.clone(), s.addr);
        lanes.push(tokio::spawn(async move {
            for _ in 0..10 {
                let mut c = support::agent_api_client(
                    addr,
                    bundle.clone(),
                    support::SERVER_ID,
                    Some(agent.certs.clone()),
                )
                .await
                .unwrap();
                let renewed = renew_with(&mut c, &agent, &key()).await;
                let _ = done.send(());
                match renewed {
                    Ok(next) => agent = next,
                    Err(_) => return,
                }
            }
        }));
    }
    for _ in 0..30 {
        done_rx.recv().await.unwrap();
    }
    // One after another: each cut lands while the other lanes renew.
    for id in &ids {
        cut(id.clone()).await;
    }
    for lane in lanes {
        lane.await.unwrap();
    }
    ids
}

#[tokio::test]
async fn ban_and_evict_racing_100_renewals_are_never_undone() {
    let s = Server::start("").await;
    let request = |id: String| admin_pb::AgentRequest { spiffe_id: id };
    let banned = race_renewals(&s, |id| {
        let s = &s;
        async move {
            s.admin().await.ban_agent(request(id)).await.unwrap();
        }
    })
    .await;
    for id in banned {
        let stored = s.admin().await.get_agent(request(id.clone())).await;
        assert!(
            stored.unwrap().into_inner().banned,
            "a renewal undid the ban of {id}"
        );
    }
    let evicted = race_renewals(&s, |id| {
        let s = &s;
        async move {
            s.admin().await.evict_agent(request(id)).await.unwrap();
        }
    })
    .await;
    for id in evicted {
        let err = s
            .admin()
            .await
            .get_agent(request(id.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "a renewal re-created {id}");
    }
}

#[tokio::test]
async fn an_expired_agent_svid_is_refused_on_a_connection_opened_before() {
    let s = Server::start("").await;
    let agent = s.agent().await;
    let entry = s
        .create_entry("spiffe://example.org/w", agent.id.as_str(), "unix:uid:1", 0)
        .await;
    let mut c = s.client(Some(agent.certs.clone())).await;
    let mut stream = c
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    next(&mut stream).await.unwrap().unwrap();
    assert!(sign_on(&mut c, &entry).await.unwrap().error.is_empty());
    // Past the SVID's notAfter (agent_svid_ttl 1h), same connection.
    s.clock.advance(Duration::from_secs(3601));
    refused(sign_on(&mut c, &entry).await, "expired");
    refused(renew_with(&mut c, &agent, &key()).await, "expired");
    refused(c.sync(pb::SyncRequest::default()).await, "expired");
    // The open stream ends at the next change instead of carrying it.
    s.create_entry("spiffe://example.org/x", agent.id.as_str(), "unix:uid:2", 0)
        .await;
    refused(next(&mut stream).await, "expired");
}

#[tokio::test]
async fn an_expired_node_alias_no_longer_grants_membership() {
    let dir = tempfile::tempdir().unwrap();
    let (node_ca, ca_file) = node_pki(dir.path());
    let config = format!("x509pop_ca_bundle = {:?}\n", ca_file.display().to_string());
    let s = Server::start(&config).await;
    let (chain, node_key) = node_cert(&node_ca, "web-1");
    let agent = attest_x509pop(&s, chain, &node_key).await;
    s.create_entry(
        "spiffe://example.org/nodes/web",
        "spiffe://example.org/oxid/server",
        "x509pop:subject:cn:web-1.nodes.example",
        s.now_secs() + 60,
    )
    .await;
    let api = s
        .create_entry(
            "spiffe://example.org/api",
            "spiffe://example.org/nodes/web",
            "unix:uid:1",
            0,
        )
        .await;
    let mut c = s.client(Some(agent.certs.clone())).await;
    assert!(sign_on(&mut c, &api).await.unwrap().error.is_empty());
    s.clock.advance(Duration::from_secs(120));
    let signed = sign_on(&mut c, &api).await.unwrap();
    assert!(
        signed.error.contains("not authorised"),
        "an expired alias granted {api}: {:?}",
        signed.error
    );
    let mut stream = c
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut stream).await.unwrap().unwrap();
    assert!(snapshot.upserts.is_empty(), "{:?}", snapshot.upserts);
}

#[tokio::test]
async fn a_retired_serials_sync_stream_ends_when_the_renewed_one_is_used() {
    let s = Server::start("").await;
    let agent = s.agent().await;
    let mut old = s.client(Some(agent.certs.clone())).await;
    let mut stream = old
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    next(&mut stream).await.unwrap().unwrap();
    let renewed = renew_with(&mut old, &agent, &key()).await.unwrap();
    let mut new = s.client(Some(renewed.certs.clone())).await;
    let mut current = new
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    next(&mut current).await.unwrap().unwrap();
    // A change after the renewed serial's first use reaches only its stream.
    let e = s
        .create_entry("spiffe://example.org/w", agent.id.as_str(), "unix:uid:1", 0)
        .await;
    refused(next(&mut stream).await, "replaced");
    let delta = next(&mut current).await.unwrap().unwrap();
    assert_eq!(delta.upserts[0].id, e);
}

#[tokio::test]
async fn an_entrys_expiry_bounds_its_svids_and_ends_its_service() {
    let s = Server::start("").await;
    let agent = s.agent().await;
    let expires_at = s.now_secs() + 600;
    let entry = s
        .create_entry(
            "spiffe://example.org/w",
            agent.id.as_str(),
            "unix:uid:1",
            expires_at,
        )
        .await;
    let mut c = s.client(Some(agent.certs.clone())).await;
    let signed = sign_on(&mut c, &entry).await.unwrap();
    assert!(signed.error.is_empty(), "{}", signed.error);
    assert!(
        signed.expires_at <= expires_at,
        "X509-SVID outlives its entry"
    );
    assert!(not_after(&signed.cert_chain[0]) <= expires_at);
    assert!(signed.valid_for_ms <= 600_000);
    // Within five minutes (the default JWT TTL) of the entry's expiry.
    s.clock.advance(Duration::from_secs(420));
    let jwt = c
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            entry_id: entry.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(jwt.expires_at <= expires_at, "JWT-SVID outlives its entry");
    assert!(jwt.valid_for_ms <= 180_000);
    let signed = sign_on(&mut c, &entry).await.unwrap();
    assert!(not_after(&signed.cert_chain[0]) <= expires_at);

    // An entry expiring in two seconds leaves the agent's view then,
    // without any other change to wake its stream.
    let soon = s
        .create_entry(
            "spiffe://example.org/soon",
            agent.id.as_str(),
            "unix:uid:2",
            s.now_secs() + 2,
        )
        .await;
    let mut stream = c
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap().unwrap();
    assert!(first.upserts.iter().any(|e| e.id == soon));
    let started = SystemTime::now();
    let delta = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(delta.removed_ids, std::slice::from_ref(&soon));
    eprintln!("expiry -> removal: {:?}", started.elapsed().unwrap());
    let signed = sign_on(&mut c, &soon).await.unwrap();
    assert!(signed.error.contains("not authorised"), "{}", signed.error);
}

#[tokio::test]
async fn an_expired_agent_svid_cannot_open_a_stream_either() {
    let s = Server::start("").await;
    let agent = s.agent().await;
    s.clock.advance(Duration::from_secs(3601));
    // A new connection: the handshake uses the real time, the call the
    // server's clock.
    let mut c = s.client(Some(agent.certs.clone())).await;
    refused(c.sync(pb::SyncRequest::default()).await, "expired");
}
