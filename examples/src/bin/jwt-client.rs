//! jwt-client: fetches a JWT-SVID for `--audience` from the Workload API and
//! calls jwt-server with it as a bearer token; exits non-zero on refusal.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/oxid-agent/public/api.sock \
//!   jwt-client --url http://127.0.0.1:8080/ --audience spiffe://example.org/api
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Duration;

use clap::Parser;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use spiffe::WorkloadApiError;

/// Calls a JWT-SVID authenticated HTTP service.
#[derive(Parser)]
struct Args {
    /// http://host:port/path of the service.
    #[arg(long)]
    url: String,
    /// The audience to request the token for.
    #[arg(long)]
    audience: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jwt-client: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let client = spiffe::WorkloadApiClient::connect_env()
        .await
        .map_err(|e| e.to_string())?;
    // The agent may still be starting: retry what is transient for a while;
    // a refusal (no identity for this program) is final.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let token = loop {
        match client.fetch_jwt_token([args.audience.as_str()], None).await {
            Ok(token) => break token,
            Err(
                e @ (WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_)),
            ) => {
                return Err(format!("cannot get a JWT-SVID: {e}"));
            }
            Err(e) if e.is_invalid_argument() || tokio::time::Instant::now() > deadline => {
                return Err(format!("cannot get a JWT-SVID: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let uri: hyper::Uri = args.url.parse().map_err(|e| format!("{e}"))?;
    let host = uri
        .authority()
        .ok_or("the URL needs host:port")?
        .to_string();
    let tcp = tokio::net::TcpStream::connect(&host)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri.path())
        .header(hyper::header::HOST, &host)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    println!(
        "jwt-client: {status}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("refused ({status})"))
    }
}
