//! The gRPC counting layer: every call of every API, by method and status
//! code, with its latency. A tower layer, so no handler can forget it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets, seconds: local calls take well under a millisecond,
/// a batch of signatures or a first JWT mint tens of milliseconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    api: &'static str,
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    api: &'static str,
    method: String,
}

type LatencyFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// RPC counters and latencies, shared by every API of one process.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    requests: Family<CallLabels, Counter>,
    latency: LatencyFamily,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
        }
    }
}

impl RpcMetrics {
    /// Adds `oxid_rpc_requests_total` and `oxid_rpc_duration_seconds` to
    /// `registry` (they share this value's counters).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "oxid_rpc_requests",
            "gRPC calls by API, method and status code (the code a stream started with)",
            self.requests.clone(),
        );
        registry.register(
            "oxid_rpc_duration_seconds",
            "gRPC call latency to the response headers",
            self.latency.clone(),
        );
    }

    /// Records one call; `code` is from [`code_name`].
    pub(crate) fn record(&self, api: &'static str, method: &str, code: &'static str, secs: f64) {
        self.requests
            .get_or_create(&CallLabels {
                api,
                method: method.to_owned(),
                code,
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                api,
                method: method.to_owned(),
            })
            .observe(secs);
    }
}

/// The gRPC name of a `grpc-status` value, as Prometheus users of gRPC
/// servers expect (`code="PermissionDenied"`). A value outside the
/// standard set is `Unknown`, so a peer cannot grow the label set.
pub fn code_name(grpc_status: &str) -> &'static str {
    match grpc_status {
        "0" => "OK",
        "1" => "Cancelled",
        "2" => "Unknown",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "10" => "Aborted",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "15" => "DataLoss",
        "16" => "Unauthenticated",
        _ => "Unknown",
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
            // A refusal is a trailers-only response with the status in the
            // headers; a success carries it in the trailers, hence OK.
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map_or("OK", code_name),
                Err(_) => "transport",
            };
            metrics.record(api, &method, code, started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_code_name_with_buckets() {
        let m = RpcMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.record("admin", "CreateEntries", code_name("0"), 0.002);
        m.record("admin", "CreateEntries", code_name("7"), 0.0004);
        let out = crate::encode(&registry, crate::Format::Prometheus);
        for line in [
            "oxid_rpc_requests_total{api=\"admin\",method=\"CreateEntries\",code=\"OK\"} 1",
            "oxid_rpc_requests_total{api=\"admin\",method=\"CreateEntries\",code=\"PermissionDenied\"} 1",
            "oxid_rpc_duration_seconds_bucket{api=\"admin\",method=\"CreateEntries\",le=\"0.0005\"} 1",
            "oxid_rpc_duration_seconds_bucket{api=\"admin\",method=\"CreateEntries\",le=\"0.0025\"} 2",
            "oxid_rpc_duration_seconds_count{api=\"admin\",method=\"CreateEntries\"} 2",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn unknown_codes_fold_into_one_label() {
        assert_eq!(code_name("16"), "Unauthenticated");
        assert_eq!(code_name("99"), "Unknown");
        assert_eq!(code_name("-1"), "Unknown");
    }
}
