//! The TLS policy, asserted with real handshakes: TLS 1.3 only, no session
//! resumption, SPIFFE peer checks against the live bundle, rotation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{PublicKey, SvidParams, X509Ca};
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId, TrustDomain};
use oxid_tls::{
    SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, client_config,
    peer_identity, server_config,
};
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn ca() -> X509Ca {
    X509Ca::new_root(
        td(),
        KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        24 * HOUR,
        SystemTime::now(),
    )
    .unwrap()
}

/// A resolver holding a fresh SVID for `spiffe_id` from `ca`.
fn svid(ca: &X509Ca, spiffe_id: &str) -> Arc<SvidResolver> {
    let r = Arc::new(SvidResolver::default());
    set_svid(&r, ca, spiffe_id);
    r
}

fn set_svid(r: &SvidResolver, ca: &X509Ca, spiffe_id: &str) {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    let s = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &id(spiffe_id),
                public_key: &pk,
                ttl: HOUR,
                dns_names: &[],
            },
            SystemTime::now(),
        )
        .unwrap();
    r.set(s.cert_chain().to_vec(), &key).unwrap();
}

fn bundle(ca: &X509Ca) -> Arc<SharedBundle> {
    let mut b = Bundle::new(td());
    b.add_x509_authority(ca.root().clone()).unwrap();
    Arc::new(SharedBundle::new(b))
}

struct Outcome {
    client: Result<
        (
            Option<HandshakeKind>,
            Vec<rustls_pki_types::CertificateDer<'static>>,
        ),
        String,
    >,
    server_saw: Option<SpiffeId>,
}

/// One handshake over an in-memory pipe, with a byte exchanged each way.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Outcome {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let mut tls = TlsAcceptor::from(server).accept(b).await.ok()?;
        let peer = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.ok()?;
        tls.write_all(&byte).await.ok()?;
        tls.flush().await.ok()?;
        Some(peer.and_then(|p| peer_identity(&p)).map(|(id, _)| id))
    });
    let client_result = async {
        let name = ServerName::try_from("oxid-server").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, a)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        let conn = tls.get_ref().1;
        Ok((
            conn.handshake_kind(),
            conn.peer_certificates().unwrap_or_default().to_vec(),
        ))
    }
    .await;
    let server_saw = server_task.await.unwrap().flatten();
    Outcome {
        client: client_result,
        server_saw,
    }
}

fn accept_agents(id: &SpiffeId) -> bool {
    id.path().starts_with("/oxid/agent/")
}

#[tokio::test]
async fn mutual_spiffe_authentication_works() {
    let ca = ca();
    let bundles = bundle(&ca);
    let server = server_config(
        svid(&ca, "spiffe://example.org/oxid/server"),
        Arc::new(SpiffeClientVerifier::new(bundles.clone(), accept_agents)),
    )
    .unwrap();
    let client = client_config(
        Arc::new(SpiffeServerVerifier::new(
            id("spiffe://example.org/oxid/server"),
            bundles,
        )),
        Some(svid(&ca, "spiffe://example.org/oxid/agent/join_token/t1")),
    )
    .unwrap();
    let out = handshake(Arc::new(server), Arc::new(client)).await;
    out.client.unwrap();
    assert_eq!(
        out.server_saw,
        Some(id("spiffe://example.org/oxid/agent/join_token/t1"))
    );
}

#[tokio::test]
async fn client_certificates_are_optional_but_checked_when_present() {
    let ca = ca();
    let bundles = bundle(&ca);
    let server = Arc::new(
        server_config(
            svid(&ca, "spiffe://example.org/oxid/server"),
            Arc::new(SpiffeClientVerifier::new(bundles.clone(), accept_agents)),
        )
        .unwrap(),
    );
    let verifier = Arc::new(SpiffeServerVerifier::new(
        id("spiffe://example.org/oxid/server"),
        bundles,
    ));
    // No client certificate: allowed (attestation).
    let anonymous = client_config(verifier.clone(), None).unwrap();
    let out = handshake(server.clone(), Arc::new(anonymous)).await;
    out.client.unwrap();
    assert_eq!(out.server_saw, None);
    // A workload SVID is not an agent: refused.
    let workload = client_config(
        verifier.clone(),
        Some(svid(&ca, "spiffe://example.org/web")),
    )
    .unwrap();
    assert!(
        handshake(server.clone(), Arc::new(workload))
            .await
            .server_saw
            .is_none()
    );
    // An agent SVID from a CA outside the bundle: refused.
    let stranger = ca_for_stranger();
    let foreign = client_config(
        verifier,
        Some(svid(&stranger, "spiffe://example.org/oxid/agent/x")),
    )
    .unwrap();
    assert!(
        handshake(server, Arc::new(foreign))
            .await
            .server_saw
            .is_none()
    );
}

fn ca_for_stranger() -> X509Ca {
    ca()
}

#[tokio::test]
async fn a_server_with_another_spiffe_id_is_refused() {
    let ca = ca();
    let bundles = bundle(&ca);
    // Same CA, but the certificate names a workload, not the server.
    let server = server_config(
        svid(&ca, "spiffe://example.org/evil"),
        Arc::new(SpiffeClientVerifier::new(bundles.clone(), accept_agents)),
    )
    .unwrap();
    let client = client_config(
        Arc::new(SpiffeServerVerifier::new(
            id("spiffe://example.org/oxid/server"),
            bundles,
        )),
        None,
    )
    .unwrap();
    let err = handshake(Arc::new(server), Arc::new(client))
        .await
        .client
        .unwrap_err();
    assert!(
        err.contains("server presented spiffe://example.org/evil"),
        "{err}"
    );
}

#[tokio::test]
async fn sessions_are_never_resumed_and_rotation_shows_on_new_handshakes() {
    let ca = ca();
    let bundles = bundle(&ca);
    let server_certs = svid(&ca, "spiffe://example.org/oxid/server");
    let server = Arc::new(
        server_config(
            server_certs.clone(),
            Arc::new(SpiffeClientVerifier::new(bundles.clone(), accept_agents)),
        )
        .unwrap(),
    );
    assert_eq!(server.send_tls13_tickets, 0);
    // A client that *would* resume if the server let it.
    let mut eager = client_config(
        Arc::new(SpiffeServerVerifier::new(
            id("spiffe://example.org/oxid/server"),
            bundles,
        )),
        None,
    )
    .unwrap();
    eager.resumption = rustls::client::Resumption::in_memory_sessions(16);
    let eager = Arc::new(eager);
    let first = handshake(server.clone(), eager.clone())
        .await
        .client
        .unwrap();
    let second = handshake(server.clone(), eager.clone())
        .await
        .client
        .unwrap();
    assert_eq!(first.0, Some(HandshakeKind::Full));
    assert_eq!(second.0, Some(HandshakeKind::Full), "no resumption");
    set_svid(&server_certs, &ca, "spiffe://example.org/oxid/server");
    let third = handshake(server, eager).await.client.unwrap();
    assert_ne!(
        third.1[0], first.1[0],
        "the rotated certificate is presented"
    );
}

#[tokio::test]
async fn bundle_changes_apply_to_the_next_handshake() {
    let old = ca();
    let new = ca();
    let bundles = bundle(&old);
    let server = Arc::new(
        server_config(
            svid(&new, "spiffe://example.org/oxid/server"),
            Arc::new(SpiffeClientVerifier::new(bundles.clone(), accept_agents)),
        )
        .unwrap(),
    );
    let client = Arc::new(
        client_config(
            Arc::new(SpiffeServerVerifier::new(
                id("spiffe://example.org/oxid/server"),
                bundles.clone(),
            )),
            None,
        )
        .unwrap(),
    );
    assert!(
        handshake(server.clone(), client.clone())
            .await
            .client
            .is_err()
    );
    let mut both = Bundle::new(td());
    both.add_x509_authority(old.root().clone()).unwrap();
    both.add_x509_authority(new.root().clone()).unwrap();
    bundles.set(both);
    handshake(server, client).await.client.unwrap();
}

#[test]
fn only_tls13_suites_are_offered() {
    let p = oxid_tls::provider();
    assert!(!p.cipher_suites.is_empty());
    for suite in &p.cipher_suites {
        assert!(
            suite.tls13().is_some(),
            "{:?} is not a TLS 1.3 suite",
            suite.suite()
        );
    }
}

#[tokio::test]
async fn a_tls12_client_is_refused() {
    let ca = ca();
    let bundles = bundle(&ca);
    let server = Arc::new(
        server_config(
            svid(&ca, "spiffe://example.org/oxid/server"),
            Arc::new(SpiffeClientVerifier::new(bundles, accept_agents)),
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsAcceptor::from(server).accept(tcp).await.is_ok()
    });
    let target = addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-tls1_2", "-connect", &target])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is required (apt-get install -y openssl, or run ./scripts/test)")
    })
    .await
    .unwrap();
    assert!(
        !accept.await.unwrap(),
        "the server must not complete a TLS 1.2 handshake"
    );
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("protocol version") || text.contains("alert"),
        "{text}"
    );
}
