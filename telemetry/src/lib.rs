//! oxid-telemetry: `/metrics`, `/live` and `/ready` on one optional HTTP
//! listener, shared by server and agent. Metrics are `prometheus-client`
//! registries: each component builds one in its own metrics module
//! (`server/src/metrics.rs`, `agent/src/metrics.rs`) and this crate serves
//! it in the format the scraper asks for.
//!
//! RPCs of every API are counted by method and gRPC status name with a
//! latency histogram ([`RpcLayer`], a tower layer, so no handler can forget
//! it). State gauges (entries, agents, CA expiry, ...) are read when scraped.
//!
//! Also the other process plumbing both binaries share: the shutdown
//! signal, how their commands write to stdout, and the bounds on the
//! connections their listeners hold ([`conn`]).

pub mod conn;
mod heap;
pub mod logging;
mod rpc;
// The workspace's one exception to `forbid(unsafe_code)`: a small module
// for a libc call, with a SAFETY comment (see its docs).
#[allow(unsafe_code)]
mod sys;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
pub use prometheus_client;
use prometheus_client::registry::Registry;

pub use crate::rpc::{RpcBody, RpcLayer, RpcMetrics, RpcService, code_name};

/// What `/metrics` and `/ready` read.
pub trait MetricsSource: Send + Sync + 'static {
    /// Every family of the component; scrape-time values are collectors.
    fn registry(&self) -> &Registry;
    /// True when the component can serve (the server: active CA and a
    /// writable store; the agent: synced and connected).
    fn ready(&self) -> bool;
    /// Why it is not ready, for the body of `/ready`'s 503, if the
    /// component can say.
    fn not_ready_reason(&self) -> Option<String> {
        None
    }
}

/// A component's scrape-time state: the families it encodes when scraped
/// (so they cannot drift from what they report) and its readiness.
pub trait ComponentState: prometheus_client::collector::Collector {
    /// What `/ready` answers.
    fn ready(&self) -> bool;
    /// Why it is not ready, if it can say (see [`MetricsSource`]).
    fn not_ready_reason(&self) -> Option<String> {
        None
    }
}

/// A component's registry: the RPC families its [`RpcLayer`] counts into
/// `rpc`, and its [`ComponentState`]. The server and the agent each serve
/// one on `/metrics` and `/ready`.
#[derive(Debug)]
pub struct ComponentMetrics<S> {
    registry: Registry,
    state: Arc<S>,
}

impl<S: ComponentState> ComponentMetrics<S> {
    /// The registry of a component whose RPCs count into `rpc`.
    pub fn new(rpc: &RpcMetrics, state: S) -> Self {
        let mut registry = Registry::default();
        rpc.register(&mut registry);
        let state = Arc::new(state);
        registry.register_collector(Box::new(state.clone()));
        Self { registry, state }
    }
}

impl<S: ComponentState> MetricsSource for ComponentMetrics<S> {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn ready(&self) -> bool {
        self.state.ready()
    }

    fn not_ready_reason(&self) -> Option<String> {
        self.state.not_ready_reason()
    }
}

/// Encodes one family of a single unlabelled value (a scrape-time gauge
/// or counter of a [`ComponentState`]).
pub fn encode_single<M: prometheus_client::encoding::EncodeMetric>(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: M,
) -> Result<(), std::fmt::Error> {
    value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)
}

/// The text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// The Prometheus text format 0.0.4: what `promtool check metrics`
    /// reads and what a scraper gets unless it asks for OpenMetrics.
    Prometheus,
    /// OpenMetrics 1.0 text, for a scraper whose `Accept` names it first.
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for. Prometheus lists
    /// OpenMetrics first; curl and promtool pipelines name neither.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Every family of `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector that fails leaves its
    // family out, which the scraper sees, rather than a 500.
    let result = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
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
                    async move { Ok::<_, Infallible>(answer(&req, source.as_ref())) }
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

fn answer<B>(req: &hyper::Request<B>, source: &dyn MetricsSource) -> hyper::Response<Full<Bytes>> {
    let format = Format::negotiate(
        req.headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            200,
            format.content_type(),
            encode(source.registry(), format),
        ),
        "/live" => (200, "text/plain", "live\n".to_owned()),
        "/ready" if source.ready() => (200, "text/plain", "ready\n".to_owned()),
        "/ready" => (
            503,
            "text/plain",
            match source.not_ready_reason() {
                Some(reason) => format!("not ready: {reason}\n"),
                None => "not ready\n".to_owned(),
            },
        ),
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
    fn prometheus_asks_for_openmetrics_and_others_get_prometheus_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        let mut registry = Registry::default();
        registry.register(
            "oxid_x",
            "a counter",
            prometheus_client::metrics::counter::Counter::<u64>::default(),
        );
        let text = encode(&registry, Format::Prometheus);
        assert!(
            text.contains("# TYPE oxid_x_total counter\noxid_x_total 0\n"),
            "{text}"
        );
        let om = encode(&registry, Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
