//! oxid-telemetry: metrics in the Prometheus text format, and `/live` and
//! `/ready`, on one optional HTTP listener. Shared by server and agent.
//!
//! RPCs of both APIs are counted by method and gRPC status with a latency
//! histogram (a tower layer, so no handler can forget it). State gauges
//! (entries, agents, CA expiry, SVIDs signed) are read when scraped.
//!
//! Also the other process plumbing both binaries share: the shutdown
//! signal, how their commands write to stdout, and the bounds on the
//! connections their listeners hold ([`conn`]).

pub mod conn;
mod heap;
pub mod logging;
// The workspace's one exception to `forbid(unsafe_code)`: a small module
// for a libc call, with a SAFETY comment (see its docs).
#[allow(unsafe_code)]
mod sys;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// RPC counters and latencies.
#[derive(Default)]
pub struct RpcMetrics {
    /// (api, method, code) → count.
    requests: Mutex<BTreeMap<(&'static str, String, String), u64>>,
    /// (api, method) → latency histogram.
    latency: Mutex<BTreeMap<(&'static str, String), Histogram>>,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RpcMetrics")
    }
}

impl RpcMetrics {
    fn record(&self, api: &'static str, method: &str, code: &str, seconds: f64) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *requests
            .entry((api, method.to_owned(), code.to_owned()))
            .or_default() += 1;
        drop(requests);
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = latency.entry((api, method.to_owned())).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// Appends the RPC families in text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP oxid_rpc_requests_total gRPC calls by API, method and status code.\n");
        out.push_str("# TYPE oxid_rpc_requests_total counter\n");
        for ((api, method, code), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "oxid_rpc_requests_total{{api=\"{api}\",method=\"{method}\",code=\"{code}\"}} {n}"
            );
        }
        out.push_str("# HELP oxid_rpc_duration_seconds gRPC call latency to response headers.\n");
        out.push_str("# TYPE oxid_rpc_duration_seconds histogram\n");
        for ((api, method), h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let labels = format!("api=\"{api}\",method=\"{method}\"");
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "oxid_rpc_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "oxid_rpc_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "oxid_rpc_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(
                out,
                "oxid_rpc_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
}

/// A tower layer that records every gRPC call of one API.
#[derive(Clone)]
pub struct RpcLayer {
    api: &'static str,
    metrics: Arc<RpcMetrics>,
}

impl RpcLayer {
    /// Records calls of `api` into `metrics`.
    pub fn new(api: &'static str, metrics: Arc<RpcMetrics>) -> Self {
        Self { api, metrics }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            api: self.api,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLayer`] wraps around each API.
#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    api: &'static str,
    metrics: Arc<RpcMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The method name is the last path segment; anything unexpected is
        // folded into one label so a client cannot grow the metric set.
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .filter(|m| m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or("other")
            .to_owned();
        let (api, metrics) = (self.api, self.metrics.clone());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            metrics.record(api, &method, &code, started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Produces the full metrics page and the readiness answer.
pub trait MetricsSource: Send + Sync + 'static {
    /// Prometheus text of every family.
    fn render(&self) -> String;
    /// True when the server can serve (active CA, store readable).
    fn ready(&self) -> bool;
}

/// Serves `/metrics`, `/live` and `/ready` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn MetricsSource>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return,
        };
        let Ok((tcp, _)) = accepted else {
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let source = source.clone();
                    async move { Ok::<_, Infallible>(answer(req.uri().path(), source.as_ref())) }
                });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(io, service);
            let _ = conn.await;
        });
    }
}

fn answer(path: &str, source: &dyn MetricsSource) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (200, "text/plain; version=0.0.4", source.render()),
        "/live" => (200, "text/plain", "live\n".to_owned()),
        "/ready" if source.ready() => (200, "text/plain", "ready\n".to_owned()),
        "/ready" => (503, "text/plain", "not ready\n".to_owned()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Writes command output to stdout. When the reader has gone (`oxid-server
/// entry show | head`), it has what it wanted: the process exits with 0
/// instead of panicking, as `print!` does on a broken pipe. Any other write
/// error is one line on stderr and exit 1.
pub fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        #[allow(clippy::print_stderr)]
        {
            eprintln!("error: cannot write the output: {e}");
        }
        std::process::exit(1);
    }
}

/// A future that completes on SIGINT or SIGTERM, for the server's and the
/// agent's `run`. The handlers are installed by this call, not when the
/// future is first polled: a SIGTERM that arrived between "ready" and that
/// first poll used to kill the process with the default action. Call it
/// inside the runtime (the handlers need its reactor).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_metrics_render_counts_and_buckets() {
        let m = RpcMetrics::default();
        m.record("admin", "CreateEntries", "0", 0.002);
        m.record("admin", "CreateEntries", "3", 0.0004);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "oxid_rpc_requests_total{api=\"admin\",method=\"CreateEntries\",code=\"0\"} 1"
        ));
        assert!(out.contains(
            "oxid_rpc_requests_total{api=\"admin\",method=\"CreateEntries\",code=\"3\"} 1"
        ));
        assert!(out.contains("le=\"0.0005\"} 1"));
        assert!(out.contains("le=\"0.0025\"} 2"));
        assert!(
            out.contains(
                "oxid_rpc_duration_seconds_count{api=\"admin\",method=\"CreateEntries\"} 2"
            )
        );
    }
}
