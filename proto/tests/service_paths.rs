//! The gRPC paths of the Workload API are a wire contract: SPIFFE clients call
//! `/SpiffeWorkloadAPI/<Method>` (no package prefix). These tests route real
//! gRPC requests through the generated server, in process and without any
//! transport: the generated server is a tower `Service` over HTTP requests, and
//! a tonic client can call such a service directly.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use oxid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use oxid_proto::workload::spiffe_workload_api_server::{
    self, SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use oxid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svidRequest, X509svidResponse,
};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::{self, Iter};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

type Server = SpiffeWorkloadApiServer<Fake>;
type OneItem<T> = Iter<std::vec::IntoIter<Result<T, Status>>>;

/// Answers every method with a message that names the method, so a test can
/// tell which handler a path was routed to.
struct Fake;

fn one<T>(message: T) -> Result<Response<OneItem<T>>, Status> {
    Ok(Response::new(tokio_stream::iter(vec![Ok(message)])))
}

#[tonic::codegen::async_trait]
impl SpiffeWorkloadApi for Fake {
    type FetchX509SVIDStream = OneItem<X509svidResponse>;
    type FetchX509BundlesStream = OneItem<X509BundlesResponse>;
    type FetchJWTBundlesStream = OneItem<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        one(X509svidResponse {
            crl: vec![b"FetchX509SVID".to_vec()],
            ..Default::default()
        })
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        one(X509BundlesResponse {
            crl: vec![b"FetchX509Bundles".to_vec()],
            ..Default::default()
        })
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                hint: "FetchJWTSVID".to_owned(),
                ..Default::default()
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        one(JwtBundlesResponse {
            bundles: [("FetchJWTBundles".to_owned(), Vec::new())].into(),
        })
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: "ValidateJWTSVID".to_owned(),
            claims: None,
        }))
    }
}

/// Runs a future to completion on this thread. Everything here is in memory,
/// so no runtime (and no tokio dependency) is needed.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        thread::park();
    }
}

/// Calls `path` (a literal string) on the generated server with tonic's
/// generic client: a unary call, or a server-streaming call whose first item
/// is returned.
async fn call_unary<Req, Resp>(path: &'static str, request: Req) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(Server::new(Fake));
    let Ok(()) = grpc.ready().await; // the server is always ready (Error = Infallible)
    let response = grpc
        .unary(
            Request::new(request),
            PathAndQuery::from_static(path),
            ProstCodec::default(),
        )
        .await?;
    Ok(response.into_inner())
}

async fn call_stream<Req, Resp>(path: &'static str, request: Req) -> Result<Option<Resp>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(Server::new(Fake));
    let Ok(()) = grpc.ready().await; // the server is always ready (Error = Infallible)
    let response = grpc
        .server_streaming(
            Request::new(request),
            PathAndQuery::from_static(path),
            ProstCodec::default(),
        )
        .await?;
    response.into_inner().message().await
}

#[test]
fn service_name_has_no_package() {
    assert_eq!(
        spiffe_workload_api_server::SERVICE_NAME,
        "SpiffeWorkloadAPI"
    );
    assert_eq!(<Server as NamedService>::NAME, "SpiffeWorkloadAPI");
}

#[test]
fn server_answers_the_literal_spec_paths() {
    block_on(async {
        let x509 = call_stream::<_, X509svidResponse>(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            X509svidRequest {},
        )
        .await;
        assert_eq!(
            x509.map_err(err).map(|m| m.map(|m| m.crl)),
            Ok(Some(vec![b"FetchX509SVID".to_vec()]))
        );

        let bundles = call_stream::<_, X509BundlesResponse>(
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            X509BundlesRequest {},
        )
        .await;
        assert_eq!(
            bundles.map_err(err).map(|m| m.map(|m| m.crl)),
            Ok(Some(vec![b"FetchX509Bundles".to_vec()]))
        );

        let jwt = call_unary::<_, JwtsvidResponse>(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            JwtsvidRequest::default(),
        )
        .await;
        assert_eq!(jwt.map_err(err).map(hint), Ok("FetchJWTSVID".to_owned()));

        let jwt_bundles = call_stream::<_, JwtBundlesResponse>(
            "/SpiffeWorkloadAPI/FetchJWTBundles",
            JwtBundlesRequest {},
        )
        .await;
        assert_eq!(
            jwt_bundles.map_err(err).map(|m| m.map(keys)),
            Ok(Some(vec!["FetchJWTBundles".to_owned()]))
        );

        let validated = call_unary::<_, ValidateJwtsvidResponse>(
            "/SpiffeWorkloadAPI/ValidateJWTSVID",
            ValidateJwtsvidRequest::default(),
        )
        .await;
        assert_eq!(
            validated.map_err(err).map(|m| m.spiffe_id),
            Ok("ValidateJWTSVID".to_owned())
        );
    });
}

/// The server must not also answer under a package prefix or another
/// spelling; otherwise the test above would prove less than it claims.
#[test]
fn server_rejects_other_paths() {
    block_on(async {
        for path in [
            "/spiffe.workload.SpiffeWorkloadAPI/FetchJWTSVID",
            "/SpiffeWorkloadApi/FetchJWTSVID",
            "/SpiffeWorkloadAPI/FetchJwtSvid",
            "/SpiffeWorkloadAPI/fetch_jwtsvid",
        ] {
            let result = call_unary::<_, JwtsvidResponse>(path, JwtsvidRequest::default()).await;
            assert_eq!(
                result.map_err(|s| s.code()),
                Err(Code::Unimplemented),
                "{path}"
            );
        }
    });
}

/// The generated client reaches each handler of the generated server. The
/// server routes only the literal paths checked above, so this pins the
/// client's paths as well.
#[test]
fn generated_client_uses_the_same_paths() {
    block_on(async {
        let mut client = SpiffeWorkloadApiClient::new(Server::new(Fake));

        let x509 = client.fetch_x509svid(X509svidRequest {}).await;
        let x509 = match x509 {
            Ok(response) => response.into_inner().message().await,
            Err(status) => Err(status),
        };
        assert_eq!(
            x509.map_err(err).map(|m| m.map(|m| m.crl)),
            Ok(Some(vec![b"FetchX509SVID".to_vec()]))
        );

        let bundles = client.fetch_x509_bundles(X509BundlesRequest {}).await;
        let bundles = match bundles {
            Ok(response) => response.into_inner().message().await,
            Err(status) => Err(status),
        };
        assert_eq!(
            bundles.map_err(err).map(|m| m.map(|m| m.crl)),
            Ok(Some(vec![b"FetchX509Bundles".to_vec()]))
        );

        let jwt = client.fetch_jwtsvid(JwtsvidRequest::default()).await;
        assert_eq!(
            jwt.map_err(err).map(|r| hint(r.into_inner())),
            Ok("FetchJWTSVID".to_owned())
        );

        let jwt_bundles = client.fetch_jwt_bundles(JwtBundlesRequest {}).await;
        let jwt_bundles = match jwt_bundles {
            Ok(response) => response.into_inner().message().await,
            Err(status) => Err(status),
        };
        assert_eq!(
            jwt_bundles.map_err(err).map(|m| m.map(keys)),
            Ok(Some(vec!["FetchJWTBundles".to_owned()]))
        );

        let validated = client
            .validate_jwtsvid(ValidateJwtsvidRequest::default())
            .await;
        assert_eq!(
            validated.map_err(err).map(|r| r.into_inner().spiffe_id),
            Ok("ValidateJWTSVID".to_owned())
        );
    });
}

/// `Status` has no `PartialEq`; its text names the code and the message.
fn err(status: Status) -> String {
    status.to_string()
}

fn hint(response: JwtsvidResponse) -> String {
    response.svids.into_iter().map(|svid| svid.hint).collect()
}

fn keys(response: JwtBundlesResponse) -> Vec<String> {
    response.bundles.into_keys().collect()
}
