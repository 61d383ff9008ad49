//! Playing an agent against a real server's agent API: a TLS 1.3 channel
//! with oxid-tls's client policy, and join-token attestation. Shared by the
//! in-process tests (`agent_api.rs`) and the binary tests (`cli.rs`).

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub(crate) mod cli_process;
pub(crate) mod inproc;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use oxid_pki::bundle::Bundle;
use oxid_pki::x509::Csr;
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId};
use oxid_proto::agent as pb;
use oxid_proto::agent::agent_api_client::AgentApiClient;
use oxid_tls::{SharedBundle, SpiffeServerVerifier, SvidResolver, client_config};
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// The server's SPIFFE ID in the default trust domain.
pub(crate) const SERVER_ID: &str = "spiffe://example.org/oxid/server";

/// A TLS channel to the agent API at `addr`, trusting `bundle`, expecting
/// `server_id`, presenting `certs` if given.
pub(crate) async fn agent_api_client(
    addr: SocketAddr,
    bundle: Bundle,
    server_id: &str,
    certs: Option<Arc<SvidResolver>>,
) -> Result<AgentApiClient<Channel>, String> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        server_id.parse().unwrap(),
        Arc::new(SharedBundle::new(bundle)),
    ));
    let tls = Arc::new(client_config(verifier, certs).unwrap());
    let channel = Endpoint::try_from("http://oxid-server.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("oxid-server").unwrap();
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(AgentApiClient::new(channel))
}

/// An attested agent: its ID, key and current SVID.
pub(crate) struct Agent {
    pub(crate) id: SpiffeId,
    pub(crate) certs: Arc<SvidResolver>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
}

pub(crate) fn chain_of(v: Vec<Vec<u8>>) -> Vec<CertificateDer<'static>> {
    v.into_iter().map(CertificateDer::from).collect()
}

/// Attests over `client` with `token`, sending the CSR as `tamper` leaves it.
pub(crate) async fn attest_token_with(
    mut client: AgentApiClient<Channel>,
    token: &str,
    tamper: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> Result<Agent, tonic::Status> {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let first = pb::AttestRequest {
        data: Some(pb::AttestationData {
            r#type: "join_token".into(),
            payload: token.as_bytes().to_vec(),
        }),
        csr: tamper(Csr::create(&key).unwrap()),
        challenge_response: vec![],
    };
    let mut responses = client
        .attest(tokio_stream::iter(vec![first]))
        .await?
        .into_inner();
    let result = responses.message().await?.unwrap().result.unwrap();
    let chain = chain_of(result.svid_chain);
    let certs = Arc::new(SvidResolver::default());
    certs.set(chain.clone(), &key).unwrap();
    Ok(Agent {
        id: result.spiffe_id.parse().unwrap(),
        certs,
        chain,
    })
}

/// Accepts any server certificate and keeps it: for reading what a server
/// presents when its clock runs ahead of the test's (only the handshake
/// signature is checked).
#[derive(Debug)]
struct Recorder(std::sync::Mutex<Option<CertificateDer<'static>>>);

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate the agent API at `addr` presents now (a fresh TLS 1.3
/// handshake, whatever the certificate's validity).
pub(crate) async fn server_certificate(addr: SocketAddr) -> CertificateDer<'static> {
    let recorder = Arc::new(Recorder(std::sync::Mutex::new(None)));
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(recorder.clone())
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("oxid-server").unwrap(), tcp)
        .await
        .unwrap();
    recorder.0.lock().unwrap().take().unwrap()
}
