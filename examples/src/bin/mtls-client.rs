//! mtls-client: talks to mtls-server over SPIFFE mTLS.
//!
//! It gets its identity from the Workload API (`SPIFFE_ENDPOINT_SOCKET`) and
//! accepts only the server ID given with `--server-id`. It keeps one
//! connection open for the whole run and also opens a new one for every
//! request, so it shows both: open connections stay up, and new handshakes
//! present (and see) rotated certificates.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/oxid-agent/public/api.sock \
//!   mtls-client --connect 127.0.0.1:8443 --server-id spiffe://example.org/server
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use oxid_pki::SpiffeId;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

/// A SPIFFE mTLS client.
#[derive(Parser)]
struct Args {
    /// Server address.
    #[arg(long)]
    connect: String,
    /// The only SPIFFE ID the server may have.
    #[arg(long)]
    server_id: SpiffeId,
    /// Requests to send.
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// Seconds between requests.
    #[arg(long, default_value_t = 1)]
    interval: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-client: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Conn = (
    tokio::io::Lines<
        BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
    >,
    tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    String,
);

async fn connect(connector: &tokio_rustls::TlsConnector, addr: &str) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("mtls-server").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(oxid_tls::peer_identity)
        .map(|(id, serial)| format!("{id} (serial {serial})"))
        .unwrap_or_default();
    let (read, write) = tokio::io::split(tls);
    Ok((BufReader::new(read).lines(), write, serial))
}

async fn ask(conn: &mut Conn, text: &str) -> Result<String, String> {
    conn.1
        .write_all(format!("{text}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    conn.0
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the server closed the connection".to_owned())
}

async fn run(args: Args) -> Result<(), String> {
    let source = oxid_examples::source().await?;
    if let Some((id, serial)) = oxid_examples::identity(&source) {
        println!("client: I am {id} (certificate serial {serial})");
    }
    let trust_domain = spiffe::TrustDomain::new(args.server_id.trust_domain().as_str())
        .map_err(|e| e.to_string())?;
    // spiffe-rustls: the server is verified against the source's current
    // bundle and must be exactly --server-id (the TLS server name is not used).
    let config = spiffe_rustls::mtls_client(source.clone())
        .authorize(spiffe_rustls::exact([args.server_id.to_string()]).map_err(|e| e.to_string())?)
        .trust_domain_policy(spiffe_rustls::LocalOnly(trust_domain))
        .with_alpn_protocols([oxid_examples::ALPN])
        .build()
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut long_lived = connect(&connector, &args.connect).await?;
    println!("client: long-lived connection to {}", long_lived.2);
    for i in 1..=args.count {
        let mut fresh = connect(&connector, &args.connect).await?;
        let mine = oxid_examples::identity(&source)
            .map(|(_, s)| s)
            .unwrap_or_default();
        let reply = ask(&mut fresh, &format!("request {i} on a new connection")).await?;
        println!(
            "client: new handshake with {} (my serial {mine}): {reply}",
            fresh.2
        );
        let reply = ask(
            &mut long_lived,
            &format!("request {i} on the long-lived connection"),
        )
        .await?;
        println!("client: long-lived connection still up: {reply}");
        tokio::time::sleep(Duration::from_secs(args.interval)).await;
    }
    Ok(())
}
