//! A gRPC channel to the admin API over the server's Unix socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use oxid_proto::admin::admin_client::AdminClient;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the admin socket at `path` (a path or a `unix:` URI), once
/// its path is one no other user could have redirected (the calls carry
/// tokens, keys and entries).
pub(crate) async fn connect(path: &Path) -> Result<AdminClient<AdminChannel>, String> {
    let path = match path.to_str() {
        Some(s) => {
            oxid_tls::socket::parse_socket_address(s).map_err(|e| format!("--socket-path: {e}"))?
        }
        None => path.to_owned(),
    };
    let shown = path.display().to_string();
    if let Err(e) = oxid_tls::socket::check_socket_to_connect(&path) {
        return Err(match std::fs::metadata(&path) {
            Err(cause) => unreachable_because(&shown, &cause),
            Ok(_) => e.to_string(),
        });
    }
    let dial: PathBuf = path.clone();
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = Endpoint::try_from("http://oxid-server.invalid").map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = dial.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| match io_cause(&e) {
            Some(cause) => unreachable_because(&shown, cause),
            None => format!(
                "cannot reach the server at {shown}: {e} (is it running? see --socket-path)"
            ),
        })?;
    Ok(AdminClient::new(AdminChannel {
        inner: channel,
        socket: shown.into(),
    })
    .max_decoding_message_size(MAX_ANSWER_BYTES))
}

/// The largest answer the CLI reads. The admin API lists entries in one
/// message (about 140 bytes each), and tonic's 4 MiB default refused
/// `entry count` at 100,000 entries. The server on the other end of this
/// socket is trusted (the path was checked above); the bound only stops
/// a runaway answer.
const MAX_ANSWER_BYTES: usize = 1 << 30;

/// The I/O error under a transport error (the connector's, from connect).
fn io_cause(e: &tonic::transport::Error) -> Option<&std::io::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

/// Why the socket at `shown` could not be reached, and what to do.
fn unreachable_because(shown: &str, cause: &std::io::Error) -> String {
    if cause.kind() == std::io::ErrorKind::PermissionDenied {
        return format!(
            "cannot reach the server at {shown}: permission denied (the socket or its \
             directory is not open to this user); run this as the server's user or as root"
        );
    }
    format!("cannot reach the server at {shown}: {cause} (is it running? see --socket-path)")
}

/// The channel to the admin socket, which turns the empty `Unimplemented`
/// that a socket serving something else (an agent's Workload API) answers
/// into a message that says so.
#[derive(Clone, Debug)]
pub(crate) struct AdminChannel {
    inner: Channel,
    socket: Arc<str>,
}

type ResponseFuture = Pin<
    Box<
        dyn Future<Output = Result<http::Response<tonic::body::Body>, tonic::transport::Error>>
            + Send,
    >,
>;

impl tower::Service<http::Request<tonic::body::Body>> for AdminChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.inner.call(request);
        let socket = self.socket.clone();
        Box::pin(async move {
            let mut response = response.await?;
            explain_unimplemented(&mut response, &socket);
            Ok(response)
        })
    }
}

/// A service that is not there answers at once (status in the headers)
/// with `Unimplemented` and no message; the admin API itself never does.
fn explain_unimplemented(response: &mut http::Response<tonic::body::Body>, socket: &str) {
    let headers = response.headers_mut();
    let unimplemented = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"12");
    let silent = headers.get("grpc-message").is_none_or(|v| v.is_empty());
    if !(unimplemented && silent) {
        return;
    }
    let message = format!(
        "{socket} does not serve the oxid admin API (is it an oxid-agent Workload API socket?)"
    );
    // A path that is not a valid header value keeps the bare status.
    if let Ok(value) = http::HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2); tonic decodes it.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
