//! Glue between the `spiffe` crate's `X509Source` (which follows the
//! Workload API and always holds the current SVID and bundles) and rustls,
//! using oxid-tls for the policy: TLS 1.3, SPIFFE peer verification.
//!
//! Both sides read the source at every handshake, so a rotated SVID is
//! presented, and a rotated bundle trusted, by the next connection without
//! a restart; connections already open are left alone.

use std::fmt;
use std::sync::Arc;

use oxid_pki::bundle::Bundle;
use oxid_pki::{SpiffeId, TrustDomain};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{BundleSource as _, X509Source};

/// The current SVID of an `X509Source`, for rustls.
pub struct SourceCerts(pub Arc<X509Source>);

impl fmt::Debug for SourceCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceCerts")
    }
}

impl SourceCerts {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let svid = self.0.svid().ok()?;
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let signer = oxid_tls::provider()
            .key_provider
            .load_private_key(key)
            .ok()?;
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }

    /// The SPIFFE ID and serial (hex) of the current SVID.
    pub fn identity(&self) -> Option<(SpiffeId, String)> {
        let svid = self.0.svid().ok()?;
        let leaf = CertificateDer::from(svid.leaf().as_bytes().to_vec());
        oxid_pki::x509::leaf_identity(&leaf).ok()
    }
}

impl ResolvesServerCert for SourceCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for SourceCerts {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The bundle of one trust domain from an `X509Source`, for oxid-tls.
pub struct SourceBundle {
    /// The source.
    pub source: Arc<X509Source>,
    /// The trust domain whose bundle is read.
    pub trust_domain: TrustDomain,
}

impl fmt::Debug for SourceBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceBundle")
    }
}

impl oxid_tls::BundleSource for SourceBundle {
    fn current_bundle(&self) -> Arc<Bundle> {
        let mut bundle = Bundle::new(self.trust_domain.clone());
        let td = spiffe::TrustDomain::new(self.trust_domain.as_str()).ok();
        if let Some(b) = td.and_then(|td| self.source.bundle_for_trust_domain(&td).ok().flatten()) {
            for cert in b.authorities() {
                let _ = bundle.add_x509_authority(CertificateDer::from(cert.as_bytes().to_vec()));
            }
        }
        Arc::new(bundle)
    }
}

/// Server TLS config: presents the source's SVID; accepts only clients whose
/// SPIFFE ID is in `allowed`.
pub fn server_config(
    source: Arc<X509Source>,
    allowed: Vec<SpiffeId>,
) -> Result<rustls::ServerConfig, String> {
    let td = allowed
        .first()
        .map(|id| id.trust_domain().clone())
        .ok_or("at least one allowed client ID is required")?;
    let bundles = Arc::new(SourceBundle {
        source: source.clone(),
        trust_domain: td,
    });
    let verifier = oxid_tls::SpiffeClientVerifier::new(bundles, move |id| allowed.contains(id));
    let mut config = rustls::ServerConfig::builder_with_provider(oxid_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(MandatoryClientAuth(verifier)))
        .with_cert_resolver(Arc::new(SourceCerts(source)));
    config.alpn_protocols = vec![b"oxid-demo".to_vec()];
    Ok(config)
}

/// Client TLS config: presents the source's SVID; accepts only `server_id`.
pub fn client_config(
    source: Arc<X509Source>,
    server_id: SpiffeId,
) -> Result<rustls::ClientConfig, String> {
    let bundles = Arc::new(SourceBundle {
        source: source.clone(),
        trust_domain: server_id.trust_domain().clone(),
    });
    let verifier = Arc::new(oxid_tls::SpiffeServerVerifier::new(server_id, bundles));
    let mut config = rustls::ClientConfig::builder_with_provider(oxid_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SourceCerts(source)));
    config.alpn_protocols = vec![b"oxid-demo".to_vec()];
    Ok(config)
}

/// Workload-to-workload mTLS needs the client's certificate: unlike the
/// agent API (where attestation happens without one), it is mandatory here.
#[derive(Debug)]
struct MandatoryClientAuth(oxid_tls::SpiffeClientVerifier);

impl rustls::server::danger::ClientCertVerifier for MandatoryClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Connects to the Workload API named by `SPIFFE_ENDPOINT_SOCKET` and waits
/// for the first SVID.
pub async fn source() -> Result<Arc<X509Source>, String> {
    X509Source::new()
        .await
        .map(Arc::new)
        .map_err(|e| format!("cannot get an X509-SVID from the Workload API: {e}"))
}

/// A gRPC channel to the Workload API socket named by
/// `SPIFFE_ENDPOINT_SOCKET` (`unix:///abs/path`).
pub async fn workload_channel() -> Result<tonic::transport::Channel, String> {
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET")
        .map_err(|_| "SPIFFE_ENDPOINT_SOCKET is not set".to_owned())?;
    let path = endpoint
        .strip_prefix("unix://")
        .ok_or("SPIFFE_ENDPOINT_SOCKET must be unix:///abs/path")?
        .to_owned();
    tonic::transport::Endpoint::try_from("http://workload-api.invalid")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("cannot reach the Workload API: {e}"))
}
