//! The SDS service as tonic serves it. `StreamSecrets`, the stream an
//! Envoy holds for its whole life, gets a codec with small buffers:
//! tonic's default 8 KiB encode buffer and 8 KiB decode buffer per stream
//! were a third of what an SDS stream cost the agent (`oxid-bench sds`,
//! BENCHMARKS.md). The buffers still grow to whatever a message needs.
//! `FetchSecrets` and `DeltaSecrets` go to the generated service as they
//! are.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::NamedService;
use tonic_prost::ProstCodec;

use super::Sds;

const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";

/// Initial buffer size, and the size past which an encoded batch is sent:
/// a request is a few hundred bytes, a response a few KiB.
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
        if req.uri().path() != STREAM_SECRETS {
            return self.generated.call(req);
        }
        let (inner, max) = (self.inner.clone(), self.max_request_bytes);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SmallBuffers::default())
                .apply_max_message_size_config(Some(max), None);
            Ok(grpc.streaming(StreamSecrets(inner), req).await)
        })
    }
}

struct StreamSecrets(Arc<Sds>);

impl tonic::server::StreamingService<DiscoveryRequest> for StreamSecrets {
    type Response = DiscoveryResponse;
    type ResponseStream = <Sds as SecretDiscoveryService>::StreamSecretsStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream_secrets(request).await })
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
