//! The agent API end to end, in process: a real server on a temp dir with
//! the agent API on 127.0.0.1:0 and the admin API on a Unix socket; real TLS
//! 1.3 handshakes; agents played by tonic clients with oxid-tls configs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::x509::{Csr, ExtendedKeyUsage, PublicKey, SvidParams, X509Ca, verify_x509_svid};
use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use oxid_tls::SvidResolver;
use tonic::Code;

use support::inproc::{Server, WAIT};
use support::{Agent, chain_of};

async fn attest_token(s: &Server, token: &str) -> Result<Agent, tonic::Status> {
    attest_token_with(s, token, |csr| csr).await
}

/// Attests with `token`, sending the CSR as `tamper` leaves it.
async fn attest_token_with(
    s: &Server,
    token: &str,
    tamper: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> Result<Agent, tonic::Status> {
    support::attest_token_with(s.client(None).await, token, tamper).await
}

async fn renew(s: &Server, agent: &Agent) -> Agent {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut c = s.client(Some(agent.certs.clone())).await;
    let r = c
        .renew(pb::RenewRequest {
            csr: Csr::create(&key).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let chain = chain_of(r.svid_chain);
    let certs = Arc::new(SvidResolver::default());
    certs.set(chain.clone(), &key).unwrap();
    Agent {
        id: agent.id.clone(),
        certs,
        chain,
    }
}

async fn sign(s: &Server, agent: &Agent, entry_id: &str) -> pb::SignedSvid {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut c = s.client(Some(agent.certs.clone())).await;
    c.sign_x509_svids(pb::SignX509SvidsRequest {
        requests: vec![pb::SvidRequest {
            entry_id: entry_id.into(),
            csr: Csr::create(&key).unwrap(),
        }],
    })
    .await
    .unwrap()
    .into_inner()
    .svids
    .remove(0)
}

#[tokio::test]
async fn join_token_attestation_ok_reused_unknown_expired() {
    let s = Server::start("").await;
    let token = s.token("").await;
    let agent = attest_token(&s, &token).await.unwrap();
    assert!(agent.id.path().starts_with("/oxid/agent/join_token/"));
    assert!(
        !agent.id.as_str().contains(&token),
        "the agent ID never holds the secret"
    );
    let bundle = s.bundle().await;
    let v = verify_x509_svid(
        &agent.chain,
        &bundle,
        ExtendedKeyUsage::ClientAuth,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(v.spiffe_id, agent.id);

    let reused = attest_token(&s, &token).await.err().unwrap();
    assert_eq!(reused.code(), Code::PermissionDenied);
    assert!(
        reused.message().contains("already used"),
        "{}",
        reused.message()
    );

    let unknown = attest_token(&s, "not-a-token").await.err().unwrap();
    assert_eq!(unknown.code(), Code::PermissionDenied);

    let expiring = s.token("").await;
    s.clock.advance(Duration::from_secs(601));
    let expired = attest_token(&s, &expiring).await.err().unwrap();
    assert_eq!(expired.code(), Code::PermissionDenied);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );
}

async fn listed_entries(s: &Server) -> Vec<admin_pb::Entry> {
    s.admin()
        .await
        .list_entries(admin_pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}

async fn agents(s: &Server) -> Vec<admin_pb::Agent> {
    s.admin()
        .await
        .list_agents(admin_pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
}

#[tokio::test]
async fn bad_csrs_are_refused_without_burning_the_token_or_the_agent() {
    let s = Server::start("").await;
    let token = s.token("").await;
    // Garbage, and a well-formed CSR whose signature does not match its key.
    let forged = |mut csr: Vec<u8>| {
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        csr
    };
    for (what, result) in [
        (
            "garbage",
            attest_token_with(&s, &token, |_| b"not a csr".to_vec()).await,
        ),
        ("forged", attest_token_with(&s, &token, forged).await),
    ] {
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{what} CSR accepted"));
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().starts_with("csr: "),
            "{what}: {}",
            err.message()
        );
    }
    assert!(agents(&s).await.is_empty(), "no agent stored");
    // The token still works.
    let agent = attest_token(&s, &token).await.unwrap();
    // A bad CSR on renewal changes nothing: the old SVID keeps working.
    let mut c = s.client(Some(agent.certs.clone())).await;
    let err = c
        .renew(pb::RenewRequest {
            csr: b"not a csr".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(agents(&s).await.len(), 1);
    let entry = s
        .add_entry("spiffe://example.org/w", agent.id.as_str(), "unix:uid:1")
        .await;
    assert!(sign(&s, &agent, &entry).await.error.is_empty());
}

#[tokio::test]
async fn concurrent_attestations_with_one_token_yield_one_agent() {
    let s = Arc::new(Server::start("").await);
    let token = s.token("").await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, token) = (s.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            attest_token(&s, &token).await.is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn agents_accept_only_the_server_id() {
    let s = Server::start("").await;
    let err = s
        .channel_as("spiffe://example.org/oxid/not-the-server", None)
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("server presented spiffe://example.org/oxid/server"),
        "{err}"
    );
}

#[tokio::test]
async fn calls_need_an_agent_svid() {
    let s = Server::start("").await;
    let mut anonymous = s.client(None).await;
    let err = anonymous
        .sync(pb::SyncRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn renewal_retires_the_old_serial_once_the_new_one_is_used() {
    let s = Server::start("").await;
    let first = attest_token(&s, &s.token("").await).await.unwrap();
    let second = renew(&s, &first).await;
    // Until the renewed SVID is used, the old one still works.
    let mut old = s.client(Some(first.certs.clone())).await;
    old.sync(pb::SyncRequest::default()).await.unwrap();
    let mut new = s.client(Some(second.certs.clone())).await;
    new.sync(pb::SyncRequest::default()).await.unwrap();
    let mut old = s.client(Some(first.certs.clone())).await;
    let err = old.sync(pb::SyncRequest::default()).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("replaced"), "{}", err.message());
}

#[tokio::test]
async fn svids_are_signed_only_for_authorised_entries_with_the_entry_id() {
    let s = Server::start("").await;
    let a = attest_token(&s, &s.token("").await).await.unwrap();
    let b = attest_token(&s, &s.token("").await).await.unwrap();
    let mine = s
        .add_entry("spiffe://example.org/web", a.id.as_str(), "unix:uid:1000")
        .await;
    let theirs = s
        .add_entry("spiffe://example.org/db", b.id.as_str(), "unix:uid:1001")
        .await;
    // Wait for the index to see both entries: through a sync snapshot.
    let _ = snapshot(&s, &a).await;

    let signed = sign(&s, &a, &mine).await;
    assert!(signed.error.is_empty(), "{}", signed.error);
    let chain = chain_of(signed.cert_chain);
    let v = verify_x509_svid(
        &chain,
        &s.bundle().await,
        ExtendedKeyUsage::Any,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/web");

    let refused = sign(&s, &a, &theirs).await;
    assert!(
        refused.error.contains("not authorised"),
        "{}",
        refused.error
    );
    assert!(refused.cert_chain.is_empty());
    let unknown = sign(&s, &a, "0123456789abcdef").await;
    assert!(
        unknown.error.contains("not authorised"),
        "{}",
        unknown.error
    );

    let mut c = s.client(Some(a.certs.clone())).await;
    let jwt = c
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            entry_id: mine.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    oxid_pki::jwt::verify_jwt_svid(&jwt.token, &s.bundle().await, "db", SystemTime::now()).unwrap();
    let err = c
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            entry_id: theirs,
            audience: vec!["db".into()],
        })
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            entry_id: mine,
            audience: (0..33).map(|i| i.to_string()).collect(),
        })
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn snapshot(
    s: &Server,
    agent: &Agent,
) -> (tonic::Streaming<pb::SyncResponse>, pb::SyncResponse) {
    let mut c = s.client(Some(agent.certs.clone())).await;
    let mut stream = c
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.snapshot);
    (stream, first)
}

#[tokio::test]
async fn sync_pushes_new_entries_and_removals_at_once() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    let (mut stream, first) = snapshot(&s, &agent).await;
    assert!(first.upserts.is_empty());
    assert_eq!(first.bundles.len(), 1, "the own bundle");

    let started = std::time::Instant::now();
    let id = s
        .add_entry("spiffe://example.org/web", agent.id.as_str(), "unix:uid:1")
        .await;
    let delta = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let latency = started.elapsed();
    assert!(!delta.snapshot);
    assert_eq!(delta.upserts.len(), 1);
    assert_eq!(delta.upserts[0].id, id);
    assert_eq!(
        delta.upserts[0].x509_svid_ttl, 3600,
        "TTL resolved to the default"
    );
    eprintln!("entry create -> sync delta: {latency:?}");

    // An entry parented on this entry is authorised too (recursion).
    let child = s
        .add_entry(
            "spiffe://example.org/web/child",
            "spiffe://example.org/web",
            "unix:uid:2",
        )
        .await;
    let delta = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delta.upserts[0].id, child);

    s.admin()
        .await
        .delete_entries(admin_pb::DeleteEntriesRequest {
            ids: vec![id.clone()],
        })
        .await
        .unwrap();
    let delta = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut removed = delta.removed_ids.clone();
    removed.sort();
    let mut expected = vec![id, child];
    expected.sort();
    assert_eq!(removed, expected, "the child leaves with its parent");
}

#[tokio::test]
async fn token_aliases_authorise_entries() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("spiffe://example.org/group/edge").await)
        .await
        .unwrap();
    let e = s
        .add_entry(
            "spiffe://example.org/edge-app",
            "spiffe://example.org/group/edge",
            "unix:uid:1",
        )
        .await;
    let (_stream, first) = snapshot(&s, &agent).await;
    assert_eq!(first.upserts.len(), 1);
    assert_eq!(first.upserts[0].id, e);
}

#[tokio::test]
async fn a_banned_agent_is_cut_off_mid_stream_and_refused() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    let (mut stream, _) = snapshot(&s, &agent).await;
    s.admin()
        .await
        .ban_agent(admin_pb::AgentRequest {
            spiffe_id: agent.id.to_string(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    let err = end.expect_err("the stream ends with an error");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut c = s.client(Some(agent.certs.clone())).await;
    let err = c.sync(pb::SyncRequest::default()).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("banned"));
    // Evicted: the record is gone, the old SVID no longer works.
    s.admin()
        .await
        .evict_agent(admin_pb::AgentRequest {
            spiffe_id: agent.id.to_string(),
        })
        .await
        .unwrap();
    let mut c = s.client(Some(agent.certs.clone())).await;
    let err = c.sync(pb::SyncRequest::default()).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not attested"), "{}", err.message());
}

/// A node CA and a node certificate (with its key) for x509pop.
fn node_pki(dir: &std::path::Path) -> (X509Ca, PathBuf) {
    let node_ca = X509Ca::new_root(
        TrustDomain::new("nodes.example").unwrap(),
        KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .unwrap();
    let path = dir.join("node-ca.pem");
    std::fs::write(&path, oxid_pki::x509::certs_to_pem([node_ca.cert()])).unwrap();
    (node_ca, path)
}

/// A server trusting a fresh node CA for x509pop (plus `extra` config), and
/// that CA. `dir` holds the CA file and must outlive the server.
async fn x509pop_server(dir: &std::path::Path, extra: &str) -> (Server, X509Ca) {
    let (node_ca, ca_file) = node_pki(dir);
    let config = format!(
        "x509pop_ca_bundle = {:?}\n{extra}",
        ca_file.display().to_string()
    );
    (Server::start(&config).await, node_ca)
}

fn node_cert(ca: &X509Ca, host: &str) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    let svid = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &format!("spiffe://nodes.example/host/{host}")
                    .parse()
                    .unwrap(),
                public_key: &pk,
                ttl: Duration::from_secs(3600),
                dns_names: &[format!("{host}.nodes.example")],
            },
            SystemTime::now(),
        )
        .unwrap();
    (oxid_pki::x509::concat_der(svid.cert_chain()), key)
}

async fn attest_x509pop(
    s: &Server,
    chain: Vec<u8>,
    signer: &KeyPair,
) -> Result<pb::AttestResult, tonic::Status> {
    let agent_key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::AttestRequest {
        data: Some(pb::AttestationData {
            r#type: "x509pop".into(),
            payload: chain,
        }),
        csr: Csr::create(&agent_key).unwrap(),
        challenge_response: vec![],
    })
    .await
    .unwrap();
    let mut c = s.client(None).await;
    let mut responses = c
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let challenge = responses.message().await?.unwrap().challenge;
    assert_eq!(challenge.len(), 32);
    let mut message = b"oxid x509pop v1\0".to_vec();
    message.extend_from_slice(&challenge);
    let sig = signer.sign_x509(&message).unwrap();
    tx.send(pb::AttestRequest {
        data: None,
        csr: vec![],
        challenge_response: sig,
    })
    .await
    .unwrap();
    Ok(responses.message().await?.unwrap().result.unwrap())
}

#[tokio::test]
async fn x509pop_attestation_ok_untrusted_and_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let (s, node_ca) = x509pop_server(dir.path(), "").await;
    let (chain, key) = node_cert(&node_ca, "web-1");
    let result = attest_x509pop(&s, chain.clone(), &key).await.unwrap();
    assert!(
        result
            .spiffe_id
            .starts_with("spiffe://example.org/oxid/agent/x509pop/")
    );
    let agent = s
        .admin()
        .await
        .get_agent(admin_pb::AgentRequest {
            spiffe_id: result.spiffe_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        agent
            .selectors
            .contains(&"x509pop:subject:cn:web-1.nodes.example".to_owned()),
        "{:?}",
        agent.selectors
    );
    assert!(
        agent
            .selectors
            .contains(&"x509pop:san:dns:web-1.nodes.example".to_owned())
    );
    assert!(
        agent
            .selectors
            .iter()
            .any(|s| s.starts_with("x509pop:ca:fingerprint:"))
    );
    // Re-attestation of the same node is allowed and keeps its ID.
    let again = attest_x509pop(&s, chain.clone(), &key).await.unwrap();
    assert_eq!(again.spiffe_id, result.spiffe_id);

    let wrong_key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let err = attest_x509pop(&s, chain, &wrong_key).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not signed by the node"),
        "{}",
        err.message()
    );

    let (other_ca, _) = node_pki(&dir.path().join(".."));
    let (stranger, stranger_key) = node_cert(&other_ca, "web-2");
    let err = attest_x509pop(&s, stranger, &stranger_key)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not trusted"), "{}", err.message());
}

#[tokio::test]
async fn x509pop_is_off_without_a_node_ca() {
    let s = Server::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let (node_ca, _) = node_pki(dir.path());
    let (chain, key) = node_cert(&node_ca, "web-1");
    let key_pair = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut c = s.client(None).await;
    let first = pb::AttestRequest {
        data: Some(pb::AttestationData {
            r#type: "x509pop".into(),
            payload: chain,
        }),
        csr: Csr::create(&key_pair).unwrap(),
        challenge_response: vec![],
    };
    let mut r = c
        .attest(tokio_stream::iter(vec![first]))
        .await
        .unwrap()
        .into_inner();
    let err = r.message().await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not enabled"));
    let _ = key;
}

#[tokio::test]
async fn a_node_ca_file_holding_the_server_ca_is_refused() {
    let first = Server::start("").await;
    let pem = first.bundle().await.x509_authorities_pem();
    let dir = first.stop().await;
    let ca_file = dir.path().join("own-ca.pem");
    std::fs::write(&ca_file, pem).unwrap();
    // Same data directory, so the same CA: it must not be a node CA.
    let err = Server::start_in(
        dir,
        &format!("x509pop_ca_bundle = {:?}\n", ca_file.display().to_string()),
    )
    .await
    .err()
    .expect("the server must refuse to start");
    assert!(err.contains("holds one of oxid's own CAs"), "{err}");
}

/// One HTTP/1.1 GET; returns (status line, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: oxid\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    s.add_entry("spiffe://example.org/web", agent.id.as_str(), "unix:uid:1")
        .await;
    let _ = attest_token(&s, "bogus").await;
    let (status, body) = http_get(s.metrics_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for needle in [
        "oxid_rpc_requests_total{api=\"agent\",method=\"Attest\",code=\"OK\"}",
        "oxid_rpc_requests_total{api=\"admin\",method=\"CreateEntries\",code=\"OK\"} 1",
        "oxid_rpc_duration_seconds_bucket{api=\"admin\",method=\"CreateEntries\",le=\"+Inf\"} 1",
        "oxid_svids_signed_total{kind=\"x509\"}",
        "oxid_agents 1",
        "oxid_ca_not_after_seconds{sequence=\"1\",state=\"active\"}",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    assert!(http_get(s.metrics_addr, "/live").await.0.contains("200"));
    assert!(http_get(s.metrics_addr, "/ready").await.0.contains("200"));
    assert!(http_get(s.metrics_addr, "/nope").await.0.contains("404"));
}

#[tokio::test]
async fn a_restart_keeps_agents_entries_and_the_ca() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    let entry = s
        .add_entry("spiffe://example.org/web", agent.id.as_str(), "unix:uid:1")
        .await;
    let bundle = s.bundle().await;
    let dir = s.stop().await;
    let s = Server::start_in(dir, "").await.unwrap();
    assert_eq!(s.bundle().await, bundle, "same CA");
    // The agent's SVID from before the restart is still accepted, and its
    // entries are still authorised.
    let (_stream, snapshot) = snapshot(&s, &agent).await;
    assert_eq!(snapshot.upserts.len(), 1);
    assert_eq!(snapshot.upserts[0].id, entry);
    let signed = sign(&s, &agent, &entry).await;
    assert!(signed.error.is_empty(), "{}", signed.error);
}

#[tokio::test]
async fn a_reconnecting_agent_resumes_with_a_delta() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    let keep = s
        .add_entry("spiffe://example.org/keep", agent.id.as_str(), "unix:uid:1")
        .await;
    let gone = s
        .add_entry("spiffe://example.org/gone", agent.id.as_str(), "unix:uid:2")
        .await;
    let (stream, first) = snapshot(&s, &agent).await;
    assert_eq!(first.upserts.len(), 2);
    drop(stream);
    s.admin()
        .await
        .delete_entries(admin_pb::DeleteEntriesRequest {
            ids: vec![gone.clone()],
        })
        .await
        .unwrap();
    let new = s
        .add_entry("spiffe://example.org/new", agent.id.as_str(), "unix:uid:3")
        .await;
    // The index follows the store asynchronously: wait until a fresh
    // snapshot shows the change, then resume from the old point.
    loop {
        let (_s, now) = snapshot(&s, &agent).await;
        if now.upserts.iter().any(|e| e.id == new) {
            break;
        }
    }
    let mut c = s.client(Some(agent.certs.clone())).await;
    let mut resumed = c
        .sync(pb::SyncRequest {
            revision: first.revision,
            known_entry_ids: vec![keep.clone(), gone.clone()],
            incarnation: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let delta = tokio::time::timeout(WAIT, resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!delta.snapshot, "a resumed stream starts with a delta");
    assert_eq!(delta.removed_ids, [gone]);
    let upserted: Vec<&str> = delta.upserts.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        upserted,
        [new.as_str()],
        "unchanged entries are not sent again"
    );
    // A revision the store never reached (a restored backup) means a
    // snapshot, once the server has waited for its index (sync::CATCH_UP).
    let mut c = s.client(Some(agent.certs.clone())).await;
    let mut future = c
        .sync(pb::SyncRequest {
            revision: u64::MAX,
            known_entry_ids: vec![keep],
            incarnation: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = tokio::time::timeout(WAIT, future.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(snap.snapshot);
}

#[tokio::test]
async fn a_banned_x509pop_node_cannot_attest_again_until_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let (s, node_ca) = x509pop_server(dir.path(), "").await;
    let (chain, key) = node_cert(&node_ca, "web-1");
    let first = attest_x509pop(&s, chain.clone(), &key).await.unwrap();
    let request = || admin_pb::AgentRequest {
        spiffe_id: first.spiffe_id.clone(),
    };
    s.admin().await.ban_agent(request()).await.unwrap();
    let err = attest_x509pop(&s, chain.clone(), &key).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("is banned; evict it"),
        "{}",
        err.message()
    );
    // Still banned, still one agent: the refused attempt changed nothing.
    let stored = s
        .admin()
        .await
        .get_agent(request())
        .await
        .unwrap()
        .into_inner();
    assert!(stored.banned);
    assert_eq!(agents(&s).await.len(), 1);
    // Eviction lifts the ban: the node attests again under the same ID.
    s.admin().await.evict_agent(request()).await.unwrap();
    let again = attest_x509pop(&s, chain, &key).await.unwrap();
    assert_eq!(again.spiffe_id, first.spiffe_id);
}

#[tokio::test]
async fn oversized_batches_are_refused_whole_and_change_nothing() {
    let s = Server::start("").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    let entry = s
        .add_entry("spiffe://example.org/w", agent.id.as_str(), "unix:uid:1")
        .await;
    // 1,001 CSRs in one SignX509Svids call: over the batch limit of 1,000.
    let csr = Csr::create(&KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()).unwrap();
    let requests = (0..1001)
        .map(|_| pb::SvidRequest {
            entry_id: entry.clone(),
            csr: csr.clone(),
        })
        .collect();
    let mut c = s.client(Some(agent.certs.clone())).await;
    let err = c
        .sign_x509_svids(pb::SignX509SvidsRequest { requests })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    // 1,001 entries in one admin call: refused whole, none created.
    let entries = (0..1001)
        .map(|i| admin_pb::Entry {
            spiffe_id: format!("spiffe://example.org/bulk/{i}"),
            parent_id: agent.id.to_string(),
            selectors: vec!["unix:uid:2".into()],
            ..Default::default()
        })
        .collect();
    let err = s
        .admin()
        .await
        .create_entries(admin_pb::CreateEntriesRequest {
            entries,
            allow_exe_only: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    assert_eq!(
        listed_entries(&s).await.len(),
        1,
        "only the first entry exists"
    );
    // The agent is still served.
    assert!(sign(&s, &agent, &entry).await.error.is_empty());
}

#[tokio::test]
async fn agent_calls_and_node_attestations_are_rate_limited_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (s, node_ca) = x509pop_server(
        dir.path(),
        "agent_requests_per_second = 2\nattestations_per_minute = 2\n",
    )
    .await;
    let a = attest_token(&s, &s.token("").await).await.unwrap();
    let b = attest_token(&s, &s.token("").await).await.unwrap();
    let entry = s
        .add_entry("spiffe://example.org/w", a.id.as_str(), "unix:uid:1")
        .await;
    // A burst of 10 calls from agent A: the first few pass, then the limit.
    let mut c = s.client(Some(a.certs.clone())).await;
    let mut refused = None;
    for _ in 0..10 {
        let r = c
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                entry_id: entry.clone(),
                audience: vec!["db".into()],
            })
            .await;
        if let Err(e) = r {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("agent A hit its limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("agent_requests_per_second"),
        "{refused:?}"
    );
    // Agent B has its own budget.
    let mut c = s.client(Some(b.certs.clone())).await;
    assert!(c.sync(pb::SyncRequest::default()).await.is_ok());
    // A node re-attesting in a loop: the third attestation in a minute is refused.
    let (chain, key) = node_cert(&node_ca, "web-1");
    attest_x509pop(&s, chain.clone(), &key).await.unwrap();
    attest_x509pop(&s, chain.clone(), &key).await.unwrap();
    let err = attest_x509pop(&s, chain, &key).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("attestations_per_minute"), "{err:?}");
}

fn assert_refused(err: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(needle), "{}", err.message());
}

#[tokio::test]
async fn lowered_limits_from_the_config_refuse_whole_and_change_nothing() {
    let s =
        Server::start("max_csrs_per_call = 2\nmax_admin_batch = 2\nmax_request_kib = 64\n").await;
    let agent = attest_token(&s, &s.token("").await).await.unwrap();
    let entry = s
        .add_entry("spiffe://example.org/w", agent.id.as_str(), "unix:uid:1")
        .await;
    let csr = Csr::create(&KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()).unwrap();
    let batch = |n: usize, csr: &[u8]| pb::SignX509SvidsRequest {
        requests: (0..n)
            .map(|_| pb::SvidRequest {
                entry_id: entry.clone(),
                csr: csr.to_vec(),
            })
            .collect(),
    };
    let mut c = s.client(Some(agent.certs.clone())).await;
    let at_limit = c
        .sign_x509_svids(batch(2, &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(at_limit.svids.len(), 2);
    let err = c.sign_x509_svids(batch(3, &csr)).await.unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "at most 2 (max_csrs_per_call)");
    // The typed refusal the agent halves its batches on, not the message.
    assert_eq!(
        oxid_proto::limit::LimitExceeded::from_status(&err),
        Some(oxid_proto::limit::LimitExceeded {
            limit: oxid_proto::limit::Limit::MaxCsrsPerCall,
            max: 2,
        }),
        "{err:?}"
    );
    // Two 40 KiB CSRs: over max_request_kib, refused before decoding.
    let err = c
        .sign_x509_svids(batch(2, &vec![0x30; 40 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    let entries = |n: usize, hint: &str| admin_pb::CreateEntriesRequest {
        entries: (0..n)
            .map(|i| admin_pb::Entry {
                spiffe_id: format!("spiffe://example.org/bulk/{i}"),
                parent_id: agent.id.to_string(),
                selectors: vec!["unix:uid:2".into()],
                hint: hint.into(),
                ..Default::default()
            })
            .collect(),
        allow_exe_only: false,
        ..Default::default()
    };
    let mut admin = s.admin().await;
    let err = admin.create_entries(entries(3, "")).await.unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "at most 2 (max_admin_batch)");
    let err = admin
        .delete_entries(admin_pb::DeleteEntriesRequest {
            ids: vec![entry.clone(); 3],
        })
        .await
        .unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "at most 2 (max_admin_batch)");
    let err = admin
        .create_entries(entries(1, &"h".repeat(65 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(
        listed_entries(&s).await.len(),
        1,
        "only the first entry exists"
    );
    // The agent is still served, on the same connection.
    let ok = c
        .sign_x509_svids(batch(1, &csr))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.svids[0].error.is_empty(), "{:?}", ok.svids[0].error);
}
