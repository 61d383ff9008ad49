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
            "gRPC calls by API, method and the status code they ended with (a stream when it ends)",
            self.requests.clone(),
        );
        registry.register(
            "oxid_rpc_duration_seconds",
            "gRPC call latency to the response headers",
            self.latency.clone(),
        );
    }

    /// Counts one finished call; `code` is from [`code_name`].
    pub(crate) fn count(&self, api: &'static str, method: &str, code: &'static str) {
        self.requests
            .get_or_create(&CallLabels {
                api,
                method: method.to_owned(),
                code,
            })
            .inc();
    }

    /// Records the time one call took to its response headers.
    pub(crate) fn observe(&self, api: &'static str, method: &str, secs: f64) {
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
    RB: Send + 'static,
{
    type Response = http::Response<RpcBody<RB>>;
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
            metrics.observe(api, &method, started.elapsed().as_secs_f64());
            let resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    metrics.count(api, &method, "transport");
                    return Err(e);
                }
            };
            // A refusal is a trailers-only response, its status in the
            // headers; any other call ends with the status in its trailers
            // (a stream may start and then fail), counted when they come.
            let pending = match status_of(resp.headers()) {
                Some(code) => {
                    metrics.count(api, &method, code);
                    None
                }
                None => Some(Pending {
                    metrics,
                    api,
                    method,
                }),
            };
            Ok(resp.map(|inner| RpcBody {
                inner: Box::pin(inner),
                pending,
            }))
        })
    }
}

/// The code name of a `grpc-status` header, if there is one.
fn status_of(headers: &http::HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .map(|v| v.to_str().map_or("Unknown", code_name))
}

/// A call not counted yet: it is when its trailers arrive.
struct Pending {
    metrics: Arc<RpcMetrics>,
    api: &'static str,
    method: String,
}

impl Pending {
    fn finish(self, code: &'static str) {
        self.metrics.count(self.api, &self.method, code);
    }
}

/// A response body that counts its call with the status in its trailers.
/// Dropped before them (the client went away, the server stopped), the
/// call is counted as `Cancelled`, as a gRPC client would see it.
pub struct RpcBody<B> {
    inner: Pin<Box<B>>,
    pending: Option<Pending>,
}

impl<B> Drop for RpcBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish("Cancelled");
        }
    }
}

impl<B: http_body::Body> http_body::Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| status_of(t).unwrap_or("Unknown")),
            Poll::Ready(Some(Err(_))) => Some("Unknown"),
            // Ended without trailers: not a gRPC answer.
            Poll::Ready(None) => Some("Unknown"),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(p) = self.pending.take() {
                p.finish(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
        m.count("admin", "CreateEntries", code_name("0"));
        m.observe("admin", "CreateEntries", 0.002);
        m.count("admin", "CreateEntries", code_name("7"));
        m.observe("admin", "CreateEntries", 0.0004);
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

    /// A stream: one message, then trailers with `grpc-status`.
    struct Ends(Option<hyper::body::Bytes>, Option<http::HeaderMap>);

    impl http_body::Body for Ends {
        type Data = hyper::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            if let Some(message) = self.0.take() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(message))));
            }
            Poll::Ready(self.1.take().map(|t| Ok(http_body::Frame::trailers(t))))
        }
    }

    async fn call(m: &Arc<RpcMetrics>, trailers: Option<&'static str>) {
        use http_body_util::BodyExt as _;
        use tower::{Layer as _, ServiceExt as _};
        let service = RpcLayer::new("agent", m.clone()).layer(tower::service_fn(
            move |_: http::Request<()>| {
                let trailers = trailers.map(|code| {
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static(code));
                    t
                });
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Ends(
                        Some(hyper::body::Bytes::from_static(b"message")),
                        trailers,
                    )))
                }
            },
        ));
        let req = http::Request::builder()
            .uri("/oxid.agent.v1.AgentApi/Sync")
            .body(())
            .unwrap_or_default();
        let resp = service.oneshot(req).await.unwrap_or_else(|e| match e {});
        let _ = resp.into_body().collect().await;
    }

    /// A stream that started fine and ended with PermissionDenied (an
    /// agent banned mid-stream) is counted as PermissionDenied, not OK.
    #[tokio::test]
    async fn a_stream_is_counted_with_the_status_it_ends_with() {
        let m = Arc::new(RpcMetrics::default());
        let mut registry = Registry::default();
        m.register(&mut registry);
        call(&m, Some("7")).await;
        call(&m, Some("0")).await;
        call(&m, None).await;
        let out = crate::encode(&registry, crate::Format::Prometheus);
        for code in ["PermissionDenied", "OK", "Unknown"] {
            let line = format!(
                "oxid_rpc_requests_total{{api=\"agent\",method=\"Sync\",code=\"{code}\"}} 1"
            );
            assert!(out.contains(&line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn unknown_codes_fold_into_one_label() {
        assert_eq!(code_name("16"), "Unauthenticated");
        assert_eq!(code_name("99"), "Unknown");
        assert_eq!(code_name("-1"), "Unknown");
    }
}
