//! Accepting TLS connections for the agent API and exposing the verified
//! peer chain to handlers.
//!
//! Every connection holds a slot under `max_connections` from accept on;
//! until it presents an agent SVID it also holds one of its address's
//! `max_connections_per_address` (so agents behind one NAT address are not
//! capped together, while one unauthenticated peer cannot take every slot).
//! After the handshake it must send the HTTP/2 preface within
//! `connection_preface_timeout`, and it is closed once it has had no call
//! in flight for `connection_idle_timeout` (an open Sync stream is a call).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use oxid_telemetry::conn::{
    Activity, ConnLimits, ConnPermit, ConnTimer, Expired, Refused, Timeouts, Tracked,
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// A handshake that takes longer than this is dropped, so a slow or silent
/// peer cannot hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors one connection costs: its socket.
pub(super) const FDS_PER_CONNECTION: usize = 1;

/// Descriptors always kept for the server's own files (the datastore, CA
/// keys, admin and metrics connections): `max_connections` is fitted
/// under the open-file limit minus these.
pub(super) const FD_RESERVE: usize = 512;

/// Fewer connections than this under the open-file limit is a setup error.
pub(super) const MIN_CONNECTIONS: usize = 16;

/// The agent API listener's connection caps and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    /// Connections open at once, from everyone.
    pub max: usize,
    /// Connections open at once from one address that have not presented
    /// an agent SVID (handshaking, attesting, or silent).
    pub per_address: usize,
    /// Preface and idle timeouts.
    pub timeouts: Timeouts,
    /// Connections end at about this age (±[`MAX_AGE_JITTER`]): the Sync
    /// stream ends with `StreamEnd::ConnectionAged`, the agent moves on,
    /// and HTTP/2 GOAWAY closes what is left once its calls finish.
    pub max_age: Duration,
}

/// Default `max_connection_age`.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

/// Each connection's age is `max_age` times a random factor in 1 ± this,
/// so agents that connected together (after a restart) do not all move
/// together.
pub(super) const MAX_AGE_JITTER: f64 = 0.1;

/// How long after the latest a connection can reach its age (the Sync
/// stream ended) the server sends GOAWAY regardless, for a client that did
/// not move on by itself; in-flight calls still finish.
pub(super) fn goaway_after(max_age: Duration) -> Duration {
    max_age.mul_f64(1.0 + MAX_AGE_JITTER) + Duration::from_secs(1)
}

/// `max_age` scaled by `1 + MAX_AGE_JITTER * (2 * unit - 1)`, `unit` in
/// [0, 1).
fn jittered_age(max_age: Duration, unit: f64) -> Duration {
    max_age.mul_f64(1.0 + MAX_AGE_JITTER * (2.0 * unit - 1.0))
}

/// A random number in [0, 1).
fn random_unit() -> f64 {
    let mut bytes = [0u8; 2];
    // No randomness: no jitter; the age itself still holds.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u16::from_le_bytes(bytes)) / 65_536.0
}

impl ConnSettings {
    /// These settings fitted under the open-file limit `fd_limit`: `max`
    /// lowered (with a warning) if it would leave less than [`FD_RESERVE`]
    /// descriptors for the server's own files.
    pub fn fitted(self, fd_limit: Option<u64>) -> Result<Self, String> {
        let budget = oxid_telemetry::conn::FdBudget {
            per_connection: FDS_PER_CONNECTION,
            reserve: FD_RESERVE,
            minimum: MIN_CONNECTIONS,
        };
        let (max, per_address) =
            oxid_telemetry::conn::fit_caps(self.max, self.per_address, fd_limit, budget)?;
        Ok(Self {
            max,
            per_address,
            ..self
        })
    }
}

/// What a handler learns about the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client certificate chain, verified during the handshake.
    pub chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The peer's address.
    pub addr: Option<SocketAddr>,
    /// Calls in flight on the connection, for the idle timeout.
    activity: Arc<Activity>,
    /// When the connection reaches its maximum age (jittered).
    pub aged_at: tokio::time::Instant,
}

impl Tracked for PeerInfo {
    fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

/// A TLS connection from an agent.
pub(crate) struct AgentConn {
    tls: TlsStream<TcpStream>,
    info: PeerInfo,
    timer: ConnTimer,
    /// Its slots under the caps, freed when the connection is dropped.
    _permits: Permits,
    eof: bool,
}

impl tonic::transport::server::Connected for AgentConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.eof {
            return Poll::Ready(Ok(()));
        }
        // An expired deadline reads as the client's end of stream, so the
        // HTTP/2 server closes the connection and its buffers are freed.
        if let Poll::Ready(why) = this.timer.poll_expired(cx) {
            tracing::debug!(addr = ?this.info.addr, ?why, "closing an agent API connection");
            if why == Expired::Preface {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface in time",
                )));
            }
            this.eof = true;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.tls).poll_read(cx, buf);
        this.timer.read(buf.filled().len() - before);
        result
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

/// The three counts a connection is held to.
struct Limits {
    /// Every connection, from accept to close.
    all: Arc<ConnLimits<()>>,
    /// Handshakes in progress, per address: nobody has shown an SVID yet.
    handshaking: Arc<ConnLimits<IpAddr>>,
    /// Connections after the handshake without an agent SVID, per address.
    unauthenticated: Arc<ConnLimits<IpAddr>>,
}

/// A connection's slots: the global one, and the per-address one while it
/// has no agent SVID.
type Permits = (ConnPermit<()>, Option<ConnPermit<IpAddr>>);

/// Accepts TCP connections and completes TLS handshakes concurrently (one
/// slow peer never blocks the others); yields finished connections. The
/// accept task ends once the stream is dropped; await its handle to know
/// the listener (and the TLS config it holds) is gone.
///
/// A connection over `max_connections` is closed at accept. One from an
/// address with `max_connections_per_address` handshakes in progress is
/// closed at accept too; one whose handshake ends without an agent SVID
/// while its address holds that many such connections gets an HTTP/2
/// GOAWAY saying so. Agents with an SVID are held to the global cap only,
/// so an unauthenticated flood from their address does not lock them out
/// (short of one that keeps every handshake slot of the address busy).
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: ConnSettings,
) -> (
    ReceiverStream<Result<AgentConn, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let acceptor = TlsAcceptor::from(tls);
    let limits = Arc::new(Limits {
        all: ConnLimits::new(settings.max, settings.max),
        handshaking: ConnLimits::new(usize::MAX, settings.per_address),
        unauthenticated: ConnLimits::new(usize::MAX, settings.per_address),
    });
    // `all` counts every connection: after a flood its fall says when the
    // freed buffers can go back to the kernel.
    limits.all.trim_heap_after_floods();
    let warned = Arc::new(std::sync::Mutex::new(None));
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
            // Refused before any TLS work: closing costs the server nothing.
            let slots = limits.all.acquire(()).and_then(|global| {
                let handshake = limits.handshaking.acquire(addr.ip())?;
                Ok((global, handshake))
            });
            let (global, handshake) = match slots {
                Ok(slots) => slots,
                Err(refused) => {
                    warn_refused(&warned, addr, refused);
                    drop(tcp);
                    continue;
                }
            };
            // gRPC messages are small writes; with Nagle on, one waiting
            // for the peer's delayed ACK added 40 ms to every sync push.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
            }
            let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
            let (limits, warned) = (limits.clone(), warned.clone());
            tokio::spawn(async move {
                let handshake_result =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshake);
                let tls = match handshake_result {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%addr, error = %e, "agent TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%addr, "agent TLS handshake timed out");
                        return;
                    }
                };
                let chain = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                // Only a connection without an agent SVID counts against its
                // address: many agents may share one NAT address.
                let permits: Permits = match chain {
                    Some(_) => (global, None),
                    None => match limits.unauthenticated.acquire(addr.ip()) {
                        Ok(slot) => (global, Some(slot)),
                        Err(refused) => {
                            warn_refused(&warned, addr, refused);
                            refuse(tls, &refusal(refused)).await;
                            return;
                        }
                    },
                };
                let activity = Activity::new();
                let info = PeerInfo {
                    chain,
                    addr: Some(addr),
                    activity: activity.clone(),
                    aged_at: tokio::time::Instant::now()
                        + jittered_age(settings.max_age, random_unit()),
                };
                let conn = AgentConn {
                    tls,
                    info,
                    timer: ConnTimer::new(settings.timeouts, activity),
                    _permits: permits,
                    eof: false,
                };
                let _ = conn_tx.send(Ok(conn)).await;
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Logs a refusal, once per 10 s at most: a flood must not fill the log.
fn warn_refused(
    warned: &std::sync::Mutex<Option<tokio::time::Instant>>,
    addr: SocketAddr,
    refused: Refused,
) {
    let mut last = warned.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        tracing::warn!(%addr, "refusing agent API connections: {}", refusal(refused));
        *last = Some(tokio::time::Instant::now());
    }
}

/// Tells a client over the cap why (an HTTP/2 GOAWAY), then closes.
async fn refuse(mut tls: TlsStream<TcpStream>, message: &str) {
    use tokio::io::AsyncWriteExt as _;
    let frames = oxid_telemetry::conn::goaway_frames(message);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tls.write_all(&frames).await?;
        tls.shutdown().await
    })
    .await;
}

fn refusal(refused: Refused) -> String {
    match refused {
        Refused::Global(n) => {
            format!("{n} connections open, the limit (max_connections)")
        }
        Refused::PerSource(n) => format!(
            "{n} connections without an agent SVID open or handshaking from this address, \
             the limit (max_connections_per_address)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_stay_within_ten_percent_and_goaway_comes_after_the_latest() {
        let age = Duration::from_secs(1800);
        assert_eq!(jittered_age(age, 0.0), Duration::from_secs(1620));
        assert_eq!(jittered_age(age, 0.5), age);
        assert!(jittered_age(age, 65_535.0 / 65_536.0) < Duration::from_secs(1980));
        for _ in 0..1000 {
            let a = jittered_age(age, random_unit());
            assert!(
                a >= Duration::from_secs(1620) && a < Duration::from_secs(1980),
                "{a:?}"
            );
            assert!(goaway_after(age) > a);
        }
    }
}
