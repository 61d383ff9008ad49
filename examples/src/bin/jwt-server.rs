//! jwt-server: an HTTP service that accepts requests carrying a JWT-SVID
//! (`Authorization: Bearer <token>`) and checks it offline: signature against
//! the JWT bundle from the Workload API (refreshed on every change), the
//! audience it serves, and the caller's SPIFFE ID against `--allow`.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/oxid-agent/public/api.sock \
//!   jwt-server --listen 127.0.0.1:8080 --audience spiffe://example.org/api \
//!   --allow spiffe://example.org/client
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use oxid_pki::bundle::Bundle;
use oxid_pki::{SpiffeId, TrustDomain};
use oxid_proto::workload as pb;

/// A JWT-SVID authenticated HTTP service.
#[derive(Parser)]
struct Args {
    /// Address to listen on (port 0 picks one; it is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The audience tokens must carry.
    #[arg(long)]
    audience: String,
    /// SPIFFE ID allowed to call (repeatable).
    #[arg(long = "allow", required = true)]
    allow: Vec<SpiffeId>,
}

type Bundles = Arc<RwLock<BTreeMap<TrustDomain, Bundle>>>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jwt-server: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How long to wait for the first JWT bundles (the agent may be starting).
const FIRST_BUNDLES_WAIT: Duration = Duration::from_secs(30);

/// Follows FetchJWTBundles into `bundles` for as long as the program runs,
/// reconnecting when the stream breaks (agent restart, agent not synced
/// yet). Returns once the first bundles are in.
async fn follow_bundles(bundles: Bundles) -> Result<(), String> {
    let (status, mut first) = tokio::sync::watch::channel(Err("not connected yet".to_owned()));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(e) = stream_bundles(&bundles, &status).await {
                status.send_if_modified(|s| {
                    let waiting = s.is_err();
                    if waiting {
                        *s = Err(e);
                    }
                    waiting
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    let waited = tokio::time::timeout(FIRST_BUNDLES_WAIT, first.wait_for(|s| s.is_ok()))
        .await
        .is_ok_and(|r| r.is_ok());
    if waited {
        return Ok(());
    }
    Err(format!(
        "no JWT bundles from the Workload API within {FIRST_BUNDLES_WAIT:?}: {}",
        first.borrow().clone().err().unwrap_or_default()
    ))
}

/// One FetchJWTBundles stream, applied to `bundles` until it ends.
async fn stream_bundles(
    bundles: &Bundles,
    status: &tokio::sync::watch::Sender<Result<(), String>>,
) -> Result<(), String> {
    let mut client = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        oxid_examples::workload_channel().await?,
    );
    let mut req = tonic::Request::new(pb::JwtBundlesRequest {});
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = client
        .fetch_jwt_bundles(req)
        .await
        .map_err(|s| format!("cannot fetch JWT bundles: {}", s.message()))?
        .into_inner();
    while let Some(resp) = stream.message().await.map_err(|s| s.message().to_owned())? {
        let mut map = BTreeMap::new();
        for (key, jwks) in resp.bundles {
            if let Ok(td) = key.parse::<TrustDomain>()
                && let Ok(b) = Bundle::from_jwks_json(td.clone(), &jwks)
            {
                map.insert(td, b);
            }
        }
        *bundles.write().unwrap_or_else(|e| e.into_inner()) = map;
        let _ = status.send(Ok(()));
    }
    Err("the bundle stream ended".into())
}

fn check(
    req: &hyper::Request<hyper::body::Incoming>,
    bundles: &Bundles,
    audience: &str,
    allow: &[SpiffeId],
) -> Result<SpiffeId, String> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("no bearer token")?;
    let bundles = bundles.read().unwrap_or_else(|e| e.into_inner()).clone();
    let verified =
        oxid_pki::jwt::verify_jwt_svid(token, &bundles, audience, std::time::SystemTime::now())
            .map_err(|e| e.to_string())?;
    if !allow.contains(&verified.spiffe_id) {
        return Err(format!("{} is not allowed", verified.spiffe_id));
    }
    Ok(verified.spiffe_id)
}

async fn run(args: Args) -> Result<(), String> {
    let bundles: Bundles = Arc::default();
    follow_bundles(bundles.clone()).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "jwt-server: listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let (audience, allow) = (Arc::new(args.audience), Arc::new(args.allow));
    loop {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let (bundles, audience, allow) = (bundles.clone(), audience.clone(), allow.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let outcome = check(&req, &bundles, &audience, &allow);
                async move {
                    let (status, body) = match outcome {
                        Ok(id) => {
                            println!("jwt-server: authorised {id}");
                            (200, format!("hello {id}\n"))
                        }
                        Err(e) => {
                            println!("jwt-server: refused a request: {e}");
                            (401, format!("unauthorised: {e}\n"))
                        }
                    };
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status)
                        .unwrap_or(hyper::StatusCode::UNAUTHORIZED);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}
