//! mtls-server: a SPIFFE mTLS echo server.
//!
//! It gets its identity from the Workload API (`SPIFFE_ENDPOINT_SOCKET`),
//! accepts only clients whose SPIFFE ID is given with `--allow`, and answers
//! each line with who it is and who it talks to. Its certificate rotates
//! under it: each new handshake presents the current SVID.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/oxid-agent/public/api.sock \
//!   mtls-server --listen 127.0.0.1:8443 --allow spiffe://example.org/client
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;

use clap::Parser;
use oxid_pki::SpiffeId;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

/// A SPIFFE mTLS echo server.
#[derive(Parser)]
struct Args {
    /// Address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// SPIFFE ID allowed to connect (repeatable).
    #[arg(long = "allow", required = true)]
    allow: Vec<SpiffeId>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-server: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let source = oxid_examples::source().await?;
    let trust_domain = spiffe::TrustDomain::new(args.allow[0].trust_domain().as_str())
        .map_err(|e| e.to_string())?;
    let allowed: Vec<String> = args.allow.iter().map(|id| id.to_string()).collect();
    // spiffe-rustls: client certificate required, verified against the
    // source's current bundle, then authorised by exact SPIFFE ID.
    let config = spiffe_rustls::mtls_server(source.clone())
        .authorize(spiffe_rustls::exact(allowed).map_err(|e| e.to_string())?)
        .trust_domain_policy(spiffe_rustls::LocalOnly(trust_domain))
        .with_alpn_protocols([oxid_examples::ALPN])
        .build()
        .map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some((id, serial)) = oxid_examples::identity(&source) {
        println!("server: I am {id} (certificate serial {serial})");
    }
    println!("server: listening on {addr}");
    loop {
        let (tcp, peer_addr) = listener.accept().await.map_err(|e| e.to_string())?;
        let (acceptor, source) = (acceptor.clone(), source.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    println!("server: refused a connection from {peer_addr}: {e}");
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(oxid_tls::peer_identity)
                .map(|(id, _)| id.to_string())
                .unwrap_or_default();
            let mine = oxid_examples::identity(&source)
                .map(|(_, serial)| serial)
                .unwrap_or_default();
            println!("server: authorised {peer} (new handshake; my certificate serial {mine})");
            let (read, mut write) = tokio::io::split(tls);
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = format!("hello {peer}, you said {line:?}\n");
                if write.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
