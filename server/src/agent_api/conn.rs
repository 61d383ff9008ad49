//! Accepting TLS connections for the agent API and exposing the verified
//! peer chain to handlers.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// A handshake that takes longer than this is dropped, so a slow or silent
/// peer cannot hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler learns about the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client certificate chain, verified during the handshake.
    pub chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The peer's address.
    pub addr: Option<SocketAddr>,
}

/// A TLS connection from an agent.
pub(crate) struct AgentConn {
    tls: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for AgentConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (one
/// slow peer never blocks the others); yields finished connections. The
/// accept task ends once the stream is dropped; await its handle to know
/// the listener (and the TLS config it holds) is gone.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> (
    ReceiverStream<Result<AgentConn, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let acceptor = TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "agent API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // gRPC messages are small writes; with Nagle on, one waiting
            // for the peer's delayed ACK added 40 ms to every sync push.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
            }
            let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let chain =
                            tls.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                            });
                        let info = PeerInfo {
                            chain,
                            addr: Some(addr),
                        };
                        let _ = conn_tx.send(Ok(AgentConn { tls, info })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%addr, error = %e, "agent TLS handshake refused"),
                    Err(_) => tracing::info!(%addr, "agent TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}
