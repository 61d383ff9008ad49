//! jwt-client: fetches a JWT-SVID for `--audience` from the Workload API and
//! calls jwt-server with it as a bearer token; exits non-zero on refusal.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/oxid-agent/public/api.sock \
//!   jwt-client --url http://127.0.0.1:8080/ --audience spiffe://example.org/api
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use clap::Parser;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;

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
    let token = client
        .fetch_jwt_token([args.audience.as_str()], None)
        .await
        .map_err(|e| format!("cannot get a JWT-SVID: {e}"))?;
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
