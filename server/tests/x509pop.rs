//! x509pop node selectors come from the verified path only: a node cannot
//! claim a CA's fingerprint (and with it a node alias and that group's
//! entries) by appending certificates its own chain does not use, nor pick a
//! configured root by putting that root's name on a certificate it made.
//!
//! A real server in process, its agent API over TLS on 127.0.0.1:0 and its
//! admin API on a Unix socket; the node CAs are built here with oxid-pki
//! (sibling intermediates) and rcgen (a forged issuer name).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::x509::{Csr, PublicKey, SvidParams, X509Ca};
use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use oxid_tls::SvidResolver;
use rustls_pki_types::CertificateDer;
use support::inproc::Server;
use tonic::Code;

const DAY: Duration = Duration::from_secs(86_400);

/// A server trusting `node_roots` for x509pop.
async fn start(node_roots: &[&CertificateDer<'static>]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("node-cas.pem");
    std::fs::write(
        &ca_file,
        oxid_pki::x509::certs_to_pem(node_roots.iter().copied()),
    )
    .unwrap();
    let config = format!("x509pop_ca_bundle = {:?}\n", ca_file.display().to_string());
    Server::start_in(dir, &config).await.unwrap()
}

async fn agent_selectors(s: &Server, agent: &support::Agent) -> BTreeSet<String> {
    s.admin()
        .await
        .get_agent(admin_pb::AgentRequest {
            spiffe_id: agent.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .selectors
        .into_iter()
        .collect()
}

/// Asks for an SVID of `entry_id` as `agent`: the refusal, if any.
async fn sign(s: &Server, agent: &support::Agent, entry_id: &str) -> Result<(), String> {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut c = s.client(Some(agent.certs.clone())).await;
    let svid = c
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: entry_id.into(),
                csr: Csr::create(&key).unwrap(),
            }],
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .svids
        .remove(0);
    match svid.error.is_empty() && !svid.cert_chain.is_empty() {
        true => Ok(()),
        false => Err(svid.error),
    }
}

fn nodes() -> TrustDomain {
    TrustDomain::new("nodes.example").unwrap()
}

fn key() -> KeyPair {
    KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()
}

fn root() -> X509Ca {
    X509Ca::new_root(nodes(), key(), DAY, SystemTime::now()).unwrap()
}

fn intermediate(upstream: &X509Ca) -> X509Ca {
    X509Ca::new_intermediate(upstream, nodes(), key(), DAY / 2, SystemTime::now()).unwrap()
}

/// A node certificate issued by `ca`, and its key.
fn node_cert(ca: &X509Ca, host: &str) -> (CertificateDer<'static>, KeyPair) {
    let key = key();
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
    (svid.cert_chain()[0].clone(), key)
}

fn fingerprint(cert: &CertificateDer<'_>) -> String {
    format!(
        "x509pop:ca:fingerprint:{}",
        oxid_pki::hex(ring::digest::digest(&ring::digest::SHA256, cert).as_ref())
    )
}

fn fingerprints(selectors: &BTreeSet<String>) -> BTreeSet<String> {
    selectors
        .iter()
        .filter(|s| s.starts_with("x509pop:ca:fingerprint:"))
        .cloned()
        .collect()
}

fn set<'a>(items: impl IntoIterator<Item = &'a CertificateDer<'static>>) -> BTreeSet<String> {
    items.into_iter().map(fingerprint).collect()
}

/// A CA certificate carrying `impersonated`'s subject as its issuer name but
/// signed by a key of the attacker's: what a node can make for nothing.
fn forged_under(impersonated: &CertificateDer<'static>) -> CertificateDer<'static> {
    let attacker = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(impersonated, &attacker).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "forged intermediate");
    let subject = rcgen::KeyPair::generate().unwrap();
    params.signed_by(&subject, &issuer).unwrap().der().clone()
}

/// Attests by x509pop, sending `chain` (leaf first) and signing with `key`.
async fn attest(
    s: &Server,
    chain: &[&CertificateDer<'static>],
    key: &KeyPair,
) -> Result<support::Agent, tonic::Status> {
    let agent_key = self::key();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::AttestRequest {
        data: Some(pb::AttestationData {
            r#type: "x509pop".into(),
            payload: oxid_pki::x509::concat_der(chain.iter().copied()),
        }),
        csr: Csr::create(&agent_key).unwrap(),
        challenge_response: vec![],
    })
    .await
    .unwrap();
    let mut responses = s
        .client(None)
        .await
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let challenge = responses.message().await?.unwrap().challenge;
    let mut message = b"oxid x509pop v1\0".to_vec();
    message.extend_from_slice(&challenge);
    tx.send(pb::AttestRequest {
        data: None,
        csr: vec![],
        challenge_response: key.sign_x509(&message).unwrap(),
    })
    .await
    .unwrap();
    let result = responses.message().await?.unwrap().result.unwrap();
    let chain = support::chain_of(result.svid_chain);
    let certs = Arc::new(SvidResolver::default());
    certs.set(chain.clone(), &agent_key).unwrap();
    Ok(support::Agent {
        id: result.spiffe_id.parse().unwrap(),
        certs,
        chain,
    })
}

/// The group of nodes under `ca`: a node alias on its fingerprint and one
/// workload entry parented on the alias. Returns the workload entry's ID.
async fn group(s: &Server, name: &str, ca: &CertificateDer<'static>) -> String {
    let alias = format!("spiffe://example.org/nodes/{name}");
    s.add_entry(&alias, support::SERVER_ID, &fingerprint(ca))
        .await;
    s.add_entry(
        &format!("spiffe://example.org/{name}/db"),
        &alias,
        "unix:uid:0",
    )
    .await
}

#[tokio::test]
async fn a_sibling_intermediate_appended_to_the_chain_grants_nothing() {
    let root = root();
    let (a, b) = (intermediate(&root), intermediate(&root));
    let s = start(&[root.cert()]).await;
    let group_a = group(&s, "group-a", a.cert()).await;
    let group_b = group(&s, "group-b", b.cert()).await;

    // A node of A that appends B (a public certificate) to its chain.
    let (leaf, leaf_key) = node_cert(&a, "web-1");
    let node = attest(&s, &[&leaf, a.cert(), b.cert()], &leaf_key)
        .await
        .unwrap();
    sign(&s, &node, &group_a).await.unwrap();
    let err = sign(&s, &node, &group_b).await.unwrap_err();
    assert!(err.contains("not authorised"), "{err}");
    let selectors = agent_selectors(&s, &node).await;
    assert_eq!(
        fingerprints(&selectors),
        set([a.cert(), root.cert()]),
        "{selectors:?}"
    );

    // B first, then A: the path still runs through A only.
    let node = attest(&s, &[&leaf, b.cert(), a.cert()], &leaf_key)
        .await
        .unwrap();
    assert_eq!(
        fingerprints(&agent_selectors(&s, &node).await),
        set([a.cert(), root.cert()])
    );
    let err = sign(&s, &node, &group_b).await.unwrap_err();
    assert!(err.contains("not authorised"), "{err}");

    // A real node of B is in group B (the alias works when it should).
    let (leaf_b, leaf_b_key) = node_cert(&b, "db-1");
    let node_b = attest(&s, &[&leaf_b, b.cert()], &leaf_b_key).await.unwrap();
    assert_eq!(
        fingerprints(&agent_selectors(&s, &node_b).await),
        set([b.cert(), root.cert()])
    );
    sign(&s, &node_b, &group_b).await.unwrap();
}

#[tokio::test]
async fn a_padded_chain_cannot_pick_another_root_or_its_intermediates() {
    let (root_1, root_2) = (root(), root());
    let a = intermediate(&root_1);
    let c = intermediate(&root_2);
    let s = start(&[root_1.cert(), root_2.cert()]).await;
    let group_root_2 = group(&s, "root-2", root_2.cert()).await;
    let group_c = group(&s, "group-c", c.cert()).await;

    // A node of A (under root 1) pads its chain with C (under root 2) and
    // with a certificate that only names root 2 as its issuer.
    let (leaf, leaf_key) = node_cert(&a, "web-1");
    let forged = forged_under(root_2.cert());
    for chain in [
        vec![&leaf, a.cert(), c.cert()],
        vec![&leaf, a.cert(), &forged],
        vec![&leaf, a.cert(), c.cert(), &forged, root_2.cert()],
        vec![&leaf, &forged, a.cert(), root_1.cert()],
    ] {
        let node = attest(&s, &chain, &leaf_key).await.unwrap();
        let selectors = agent_selectors(&s, &node).await;
        assert_eq!(
            fingerprints(&selectors),
            set([a.cert(), root_1.cert()]),
            "chain of {}: {selectors:?}",
            chain.len()
        );
        for entry in [&group_root_2, &group_c] {
            let err = sign(&s, &node, entry).await.unwrap_err();
            assert!(err.contains("not authorised"), "{err}");
        }
    }

    // The forged certificate on its own is not trusted at all.
    let (lone, lone_key) = node_cert(&c, "db-1");
    let err = attest(&s, &[&lone, &forged], &lone_key)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}
