//! One accepted Workload API connection: the client's bytes go through an
//! [`AuthorityRewriter`], the connection's deadlines are checked on every
//! read, and it holds its slot under the connection caps until dropped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use oxid_h2_authority::AuthorityRewriter;
use oxid_telemetry::conn::{Activity, ConnPermit, ConnTimer, Expired, Timeouts, Tracked};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;

use crate::workload::peer::Peer;

/// What each request on a connection carries: the pinned caller, and the
/// connection's activity (so the idle timeout knows a stream is open).
#[derive(Debug, Clone)]
pub struct WorkloadConn {
    /// The connecting process, pinned at accept (see [`Peer`]).
    pub peer: Peer,
    activity: Arc<Activity>,
}

impl Tracked for WorkloadConn {
    fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The Workload API handlers look the caller up as a [`Peer`].
    fn extend(&self, extensions: &mut http::Extensions) {
        extensions.insert(self.peer.clone());
    }
}

/// A Workload API connection whose client bytes go through an
/// [`AuthorityRewriter`]; the peer credentials are the socket's.
#[derive(Debug)]
pub struct RewrittenStream {
    inner: UnixStream,
    info: WorkloadConn,
    timer: ConnTimer,
    /// Its slot under `max_connections` and `max_connections_per_uid`.
    _permit: ConnPermit<u32>,
    rewriter: AuthorityRewriter,
    /// Client bytes not yet forming a complete unit.
    input: Vec<u8>,
    /// Rewritten bytes not yet read by the server, from `output_at`.
    output: Vec<u8>,
    output_at: usize,
    eof: bool,
}

impl RewrittenStream {
    /// Wraps an accepted connection that holds `permit`; its preface
    /// deadline starts now.
    pub fn new(inner: UnixStream, permit: ConnPermit<u32>, timeouts: Timeouts) -> Self {
        let activity = Activity::new();
        Self {
            info: WorkloadConn {
                peer: Peer::of(&inner),
                activity: activity.clone(),
            },
            timer: ConnTimer::new(timeouts, activity),
            _permit: permit,
            inner,
            rewriter: AuthorityRewriter::default(),
            input: Vec::new(),
            output: Vec::new(),
            output_at: 0,
            eof: false,
        }
    }
}

impl Connected for RewrittenStream {
    type ConnectInfo = WorkloadConn;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for RewrittenStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_at < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.output_at);
                buf.put_slice(&this.output[this.output_at..this.output_at + n]);
                this.output_at += n;
                if this.output_at == this.output.len() {
                    this.output.clear();
                    this.output_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // An expired deadline reads as the client's end of stream: the
            // HTTP/2 server then closes the connection (no stream is open,
            // or the deadline would not have passed).
            if let Poll::Ready(why) = this.timer.poll_expired(cx) {
                tracing::debug!(uid = ?this.info.peer.cred().map(|c| c.uid), ?why, "closing a Workload API connection");
                if why == Expired::Preface {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface in time",
                    )));
                }
                this.eof = true;
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.timer.read(read.filled().len());
            this.input.extend_from_slice(read.filled());
            if let Err(e) = this.rewriter.rewrite(&mut this.input, &mut this.output) {
                tracing::debug!(error = %e, "closing a Workload API connection");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl AsyncWrite for RewrittenStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
