//! What the example programs share: the `spiffe` crate's `X509Source`
//! (which follows the Workload API and always holds the current SVID and
//! bundles), the identity it currently holds, and a plain gRPC channel to
//! the Workload API for the JWT examples.
//!
//! The mTLS pair builds its rustls configs with `spiffe-rustls` from the
//! source. Both sides read it at every handshake, so a rotated SVID is
//! presented, and a rotated bundle trusted, by the next connection without
//! a restart; connections already open are left alone.

use oxid_pki::SpiffeId;
use rustls_pki_types::CertificateDer;
use spiffe::X509Source;

/// The SPIFFE ID and serial (hex) of the source's current SVID.
pub fn identity(source: &X509Source) -> Option<(SpiffeId, String)> {
    let svid = source.svid().ok()?;
    let leaf = CertificateDer::from(svid.leaf().as_bytes().to_vec());
    oxid_pki::x509::leaf_identity(&leaf).ok()
}

/// The ALPN protocol of the mTLS demo.
pub const ALPN: &[u8] = b"oxid-demo";

/// Connects to the Workload API named by `SPIFFE_ENDPOINT_SOCKET` and waits
/// for the first SVID.
pub async fn source() -> Result<X509Source, String> {
    X509Source::new()
        .await
        .map_err(|e| format!("cannot get an X509-SVID from the Workload API: {e}"))
}

/// A gRPC channel to the Workload API socket named by
/// `SPIFFE_ENDPOINT_SOCKET` (`unix:///abs/path`, `unix:/abs/path`, or the
/// path itself).
pub async fn workload_channel() -> Result<tonic::transport::Channel, String> {
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET")
        .map_err(|_| "SPIFFE_ENDPOINT_SOCKET is not set".to_owned())?;
    let path = oxid_tls::socket::parse_socket_address(&endpoint)
        .map_err(|e| format!("SPIFFE_ENDPOINT_SOCKET: {e}"))?;
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
