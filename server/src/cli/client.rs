//! A gRPC channel to the admin API over the server's Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use oxid_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the admin socket at `path`, once its path is one no other
/// user could have redirected (the calls carry tokens, keys and entries).
pub(crate) async fn connect(path: &Path) -> Result<AdminClient<Channel>, String> {
    let shown = path.display().to_string();
    if let Err(e) = oxid_tls::socket::check_socket_to_connect(path) {
        return Err(match std::fs::metadata(path) {
            Err(cause) => format!(
                "cannot reach the server at {shown}: {cause} (is it running? see --socket-path)"
            ),
            Ok(_) => e.to_string(),
        });
    }
    let path: PathBuf = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = Endpoint::try_from("http://oxid-server.invalid").map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(e.to_string(), ToString::to_string);
            format!(
                "cannot reach the server at {shown}: {cause} (is it running? see --socket-path)"
            )
        })?;
    Ok(AdminClient::new(channel))
}
