//! The SDS service as tonic serves it. `StreamSecrets`, the stream an
//! Envoy holds for its whole life, is served by our own glue: its requests
//! are decoded with a small buffer (tonic's default 8 KiB per stream), and
//! each response is encoded into a buffer of exactly its size, handed to
//! HTTP/2 and freed once written. tonic's encoder keeps a buffer per stream
//! that grows to the largest response (4 KiB for an SVID, its key and a
//! bundle) and stays for the stream's life; these buffers were a third of
//! what an SDS stream cost the agent (`oxid-bench sds`, BENCHMARKS.md).
//! `DeltaSecrets` is served the same way; `FetchSecrets`, one request and
//! one answer, goes to the generated service.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use http_body::Frame;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::codegen::{Body, BoxFuture, Bytes, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Status};
use tonic_prost::ProstCodec;

use super::Sds;

const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// The request decoder's initial buffer: a request is a few hundred
/// bytes (the buffer grows for a larger one).
fn buffers() -> BufferSettings {
    BufferSettings::new(1024, 8 * 1024)
}

/// The SDS service: `StreamSecrets` with [`SmallBuffers`], the rest
/// generated.
#[derive(Clone)]
pub struct SdsService {
    generated: SecretDiscoveryServiceServer<Sds>,
    inner: Arc<Sds>,
    max_request_bytes: usize,
}

impl SdsService {
    pub(super) fn new(sds: Sds, max_request_bytes: usize) -> Self {
        let inner = Arc::new(sds);
        Self {
            generated: SecretDiscoveryServiceServer::from_arc(inner.clone())
                .max_decoding_message_size(max_request_bytes),
            inner,
            max_request_bytes,
        }
    }
}

impl std::fmt::Debug for SdsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsService").finish_non_exhaustive()
    }
}

impl NamedService for SdsService {
    const NAME: &'static str = "envoy.service.secret.v3.SecretDiscoveryService";
}

impl<B> Service<http::Request<B>> for SdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (inner, max) = (self.inner.clone(), self.max_request_bytes);
        match req.uri().path() {
            STREAM_SECRETS => Box::pin(async move {
                Ok(streaming(max, req, |r| async move { inner.stream_secrets(r).await }).await)
            }),
            DELTA_SECRETS => Box::pin(async move {
                Ok(streaming(max, req, |r| async move { inner.delta_secrets(r).await }).await)
            }),
            _ => self.generated.call(req),
        }
    }
}

/// A stream of `Req` to `Resp` (`StreamSecrets`, `DeltaSecrets`): the
/// requests through tonic's decoder, the responses through [`Frames`].
/// Compression is not offered, so a compressed request is refused, as
/// tonic refuses it.
async fn streaming<B, Req, Resp, F, Fut>(
    max_request_bytes: usize,
    req: http::Request<B>,
    call: F,
) -> http::Response<tonic::body::Body>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Request<Streaming<Req>>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<super::BoxStream<Resp>>, Status>>,
{
    if let Some(refused) = compressed(req.headers()) {
        return refused.into_http();
    }
    let decoder = SmallBuffers::<Resp, Req>::default().decoder();
    let request = Request::from_http(
        req.map(|body| Streaming::new_request(decoder, body, None, Some(max_request_bytes))),
    );
    match call(request).await {
        Ok(response) => {
            let (metadata, responses, extensions) = response.into_parts();
            let mut http = http::Response::new(tonic::body::Body::new(Frames {
                responses,
                ended: false,
            }));
            *http.headers_mut() = metadata.into_headers();
            *http.extensions_mut() = extensions;
            http.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            http
        }
        Err(status) => status.into_http(),
    }
}

/// The refusal of a compressed request (none is offered in
/// `grpc-accept-encoding`, so a client compresses only against the rules).
fn compressed(headers: &http::HeaderMap) -> Option<Status> {
    let encoding = headers.get("grpc-encoding")?;
    (encoding != "identity").then(|| {
        Status::unimplemented(format!(
            "requests compressed with {encoding:?} are not supported"
        ))
    })
}

/// The responses of one stream as gRPC messages, each encoded into a
/// buffer of its own size, then the status as trailers.
struct Frames<T> {
    responses: super::BoxStream<T>,
    ended: bool,
}

/// One length-prefixed gRPC message (uncompressed).
fn grpc_message(response: &impl prost::Message) -> Result<Bytes, Status> {
    let len = response.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::internal("an SDS response past 4 GiB"))?
        .to_be_bytes();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&prefix);
    response
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding an SDS response: {e}")))?;
    Ok(Bytes::from(buf))
}

/// `grpc-status` (and `grpc-message`) of `status` as trailers.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value gets here.
        map.insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::Internal as i32),
        );
    }
    map
}

impl<T: prost::Message> Body for Frames<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let next = ready!(this.responses.as_mut().poll_next(cx));
        let frame = match next.map(|r| r.and_then(|response| grpc_message(&response))) {
            Some(Ok(message)) => Frame::data(message),
            Some(Err(status)) => {
                this.ended = true;
                Frame::trailers(trailers(&status))
            }
            None => {
                this.ended = true;
                Frame::trailers(trailers(&Status::ok("")))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// Prost encoding with [`buffers`] instead of tonic's defaults.
struct SmallBuffers<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffers())
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

    use super::*;

    #[test]
    fn a_message_is_framed_in_a_buffer_of_its_own_size() {
        use prost::Message as _;
        let response = DiscoveryResponse {
            version_info: "7".into(),
            nonce: "7-abc".into(),
            ..DiscoveryResponse::default()
        };
        let framed = grpc_message(&response).unwrap();
        let len = response.encoded_len();
        assert_eq!(framed.len(), 5 + len);
        assert_eq!(framed[0], 0, "not compressed");
        assert_eq!(&framed[1..5], &(len as u32).to_be_bytes());
        assert_eq!(DiscoveryResponse::decode(&framed[5..]).unwrap(), response);
    }

    #[test]
    fn the_status_goes_out_as_trailers() {
        let ok = trailers(&Status::ok(""));
        assert_eq!(ok.get("grpc-status").unwrap(), "0");
        let refused = trailers(&Status::permission_denied("no identity issued"));
        assert_eq!(refused.get("grpc-status").unwrap(), "7");
        // Percent-encoded, as the gRPC spec has it.
        assert_eq!(
            refused.get("grpc-message").unwrap(),
            "no%20identity%20issued"
        );
    }

    #[test]
    fn compressed_requests_are_refused() {
        let mut headers = http::HeaderMap::new();
        assert!(compressed(&headers).is_none());
        headers.insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        assert!(compressed(&headers).is_none());
        headers.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let refused = compressed(&headers).unwrap();
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(refused.message().contains("gzip"), "{}", refused.message());
    }
}
