//! oxid-tls: the one place that fixes TLS policy between agents and servers.
//!
//! - TLS 1.3 only, ring as the crypto provider, ALPN `h2` (gRPC).
//! - No session resumption on the server: every handshake re-checks the peer
//!   chain against the *current* bundle, so a removed authority or a revoked
//!   agent cannot ride on an old session.
//! - Peers are authenticated as SPIFFE IDs: the chain must verify to the live
//!   bundle of the peer's trust domain, and the ID must be the expected one
//!   (a client) or pass the caller's rule (a server accepting agents).
//! - Certificates rotate under running connections: resolvers hold the
//!   current SVID and each new handshake picks it up.

pub mod lock;
pub mod socket;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{ExtendedKeyUsage, verify_x509_svid};
use oxid_pki::{KeyPair, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// ALPN protocol for gRPC over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The crypto provider: ring, TLS 1.3 cipher suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let base = rustls::crypto::ring::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..base
    })
}

fn verification_algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Where a verifier reads the bundle it trusts *now*: a live handle that
/// hands out the current snapshot (cheap: an `Arc`), which is then checked
/// through `oxid_pki`'s `BundleSource`. The server reads its CA's bundle; an
/// agent, the bundle it last synced.
pub trait LiveBundle: Send + Sync + fmt::Debug {
    /// The current bundle of the trust domain the peer must belong to.
    fn current_bundle(&self) -> Arc<Bundle>;
}

/// A bundle that only changes when told to.
#[derive(Debug)]
pub struct SharedBundle(RwLock<Arc<Bundle>>);

impl SharedBundle {
    /// Starts with `bundle`.
    pub fn new(bundle: Bundle) -> Self {
        Self(RwLock::new(Arc::new(bundle)))
    }

    /// Replaces the bundle; new handshakes use it at once.
    pub fn set(&self, bundle: Bundle) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(bundle);
    }
}

impl LiveBundle for SharedBundle {
    fn current_bundle(&self) -> Arc<Bundle> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn unix_to_system(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &dyn LiveBundle,
    usage: ExtendedKeyUsage,
    now: UnixTime,
) -> Result<SpiffeId, Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let bundle = bundles.current_bundle();
    verify_x509_svid(&chain, bundle.as_ref(), usage, unix_to_system(now))
        .map(|v| v.spiffe_id)
        .map_err(|e| Error::General(format!("peer SVID rejected: {e}")))
}

/// Client side: the server must present exactly `expected`, chained to the
/// live bundle. DNS names are irrelevant: SPIFFE IDs are the identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    expected: SpiffeId,
    bundles: Arc<dyn LiveBundle>,
}

impl SpiffeServerVerifier {
    /// Accepts only `expected`, verified against `bundles`.
    pub fn new(expected: SpiffeId, bundles: Arc<dyn LiveBundle>) -> Self {
        Self { expected, bundles }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify_peer(
            end_entity,
            intermediates,
            self.bundles.as_ref(),
            ExtendedKeyUsage::ServerAuth,
            now,
        )?;
        if id != self.expected {
            return Err(Error::General(format!(
                "server presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &verification_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verification_algorithms().supported_schemes()
    }
}

/// Server side: a client certificate is optional at the TLS layer (agents
/// attest without one); when present it must chain to the live bundle and its
/// SPIFFE ID must pass `accept`.
pub struct SpiffeClientVerifier {
    bundles: Arc<dyn LiveBundle>,
    accept: Box<dyn Fn(&SpiffeId) -> bool + Send + Sync>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// Verifies optional client certificates against `bundles`, accepting
    /// IDs for which `accept` is true.
    pub fn new(
        bundles: Arc<dyn LiveBundle>,
        accept: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            bundles,
            accept: Box::new(accept),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = verify_peer(
            end_entity,
            intermediates,
            self.bundles.as_ref(),
            ExtendedKeyUsage::ClientAuth,
            now,
        )?;
        if !(self.accept)(&id) {
            return Err(Error::General(format!("client {id} is not accepted here")));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &verification_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verification_algorithms().supported_schemes()
    }
}

/// Holds the current SVID for a TLS endpoint; replacing it changes what new
/// handshakes present, without touching open connections.
#[derive(Debug)]
pub struct SvidResolver(RwLock<Option<Arc<CertifiedKey>>>);

impl Default for SvidResolver {
    fn default() -> Self {
        Self(RwLock::new(None))
    }
}

impl SvidResolver {
    /// Presents `chain` (leaf first) with `key` from now on.
    pub fn set(&self, chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Result<(), Error> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        let signing = provider().key_provider.load_private_key(der)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(CertifiedKey::new(chain, signing)));
        Ok(())
    }

    /// The current certified key, if one was set.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// The server's TLS configuration: TLS 1.3, h2, no resumption (no session
/// cache, no tickets), optional SPIFFE client certificates.
pub fn server_config(
    certs: Arc<SvidResolver>,
    client_verifier: Arc<SpiffeClientVerifier>,
) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(certs);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client's TLS configuration: TLS 1.3, h2, the server verified as a SPIFFE
/// ID, and the client's own SVID (if `certs` holds one) presented.
pub fn client_config(
    server_verifier: Arc<SpiffeServerVerifier>,
    certs: Option<Arc<SvidResolver>>,
) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier);
    let mut config = match certs {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The SPIFFE ID of a peer's leaf certificate (already verified by the
/// handshake), and its serial number in hex.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<(SpiffeId, String)> {
    oxid_pki::x509::leaf_identity(chain.first()?).ok()
}
