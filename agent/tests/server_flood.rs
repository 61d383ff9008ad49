//! Connection exhaustion on the server's agent-API port (issue 12, finding
//! 5), with lowered caps: TLS connections without a client certificate
//! that never send the HTTP/2 preface are closed; one address's
//! unauthenticated connections are capped with a clear refusal, while an
//! agent with an SVID from the same address still connects and the admin
//! API keeps answering.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Harness, admin};
use oxid_pki::bundle::Bundle;
use oxid_proto::admin as admin_pb;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A TLS client that verifies the server and presents no certificate.
fn anonymous_tls(h: &Harness) -> tokio_rustls::TlsConnector {
    let td = oxid_pki::TrustDomain::new("example.org").unwrap();
    let pem = std::fs::read(h.dir.path().join("bundle.pem")).unwrap();
    let bundle = Arc::new(oxid_tls::SharedBundle::new(
        Bundle::from_x509_pem(td.clone(), &pem).unwrap(),
    ));
    let verifier = Arc::new(oxid_tls::SpiffeServerVerifier::new(
        td.spiffe_id("/oxid/server").unwrap(),
        bundle,
    ));
    tokio_rustls::TlsConnector::from(Arc::new(oxid_tls::client_config(verifier, None).unwrap()))
}

async fn tls_connect(
    h: &Harness,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(h.server_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("oxid-server.invalid").unwrap();
    tls.connect(name, tcp).await.unwrap()
}

/// Everything the server sent until it closed the connection, or `None`
/// if it was still open after `within`.
async fn until_closed<R: AsyncRead + Unpin>(conn: &mut R, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| got)
}

/// The debug text of the first GOAWAY frame in `bytes`.
fn goaway_text(mut bytes: &[u8]) -> Option<String> {
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let payload = bytes.get(9..9 + len)?;
        if bytes[3] == 0x7 && len >= 8 {
            return Some(String::from_utf8_lossy(&payload[8..]).into_owned());
        }
        bytes = &bytes[9 + len..];
    }
    None
}

async fn entry_count(h: &Harness) -> usize {
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), async {
        admin(&h.admin_socket())
            .await
            .list_entries(admin_pb::ListEntriesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .len()
    })
    .await
    .expect("the admin API answers under the flood");
    assert!(started.elapsed() < Duration::from_secs(5));
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_addresss_unauthenticated_connections_are_capped_agents_still_connect() {
    let mut h = Harness::start_with(
        "max_connections_per_address = 16\nconnection_preface_timeout = \"1h\"\n\
         connection_idle_timeout = \"1h\"\n",
    )
    .await;
    let _ = h.with_web_identity().await;
    // The agent's own attestation connection is gone once it has its SVID.
    h.stop_agent().await;
    let tls = anonymous_tls(&h);

    // 16 TLS connections without a certificate that never send a preface
    // are held (this is the cap)...
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(tls_connect(&h, &tls).await);
    }
    for conn in &mut held {
        assert!(
            until_closed(conn, Duration::from_millis(200))
                .await
                .is_none()
        );
    }
    // ...the next one is told why and closed.
    let mut over = tls_connect(&h, &tls).await;
    let got = until_closed(&mut over, Duration::from_secs(5))
        .await
        .expect("the connection over the cap is closed");
    let why = goaway_text(&got).unwrap_or_default();
    assert!(why.contains("max_connections_per_address"), "{why:?}");

    // An agent with an SVID, from the same address, still connects: it
    // syncs an entry created after it started.
    h.start_agent(None);
    h.create_entry(
        "spiffe://example.org/after-flood",
        &[&format!("unix:uid:{}", common::my_uid())],
    )
    .await;
    let client = h.client().await;
    common::eventually(|| async {
        let ctx = client
            .fetch_x509_context()
            .await
            .map_err(|e| e.to_string())?;
        if ctx.svids().len() == 2 {
            Ok(())
        } else {
            Err(format!("{} SVIDs", ctx.svids().len()))
        }
    })
    .await;
    // And the admin API answers.
    assert_eq!(entry_count(&h).await, 2);

    // Handshakes count too: 16 TCP connections that never say hello are
    // held, the next is closed at accept.
    drop(held);
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(h.server_addr).await.unwrap());
    }
    // (The server counts them as it accepts: wait for the last one.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = TcpStream::connect(h.server_addr).await.unwrap();
    assert_eq!(
        until_closed(&mut refused, Duration::from_secs(5)).await,
        Some(Vec::new()),
        "closed at accept, no TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_connections_without_a_preface_or_idle_are_closed() {
    let h = Harness::start_with(
        "connection_preface_timeout = \"1s\"\nconnection_idle_timeout = \"2s\"\n",
    )
    .await;
    let _ = h.with_web_identity().await;
    let tls = anonymous_tls(&h);

    let started = Instant::now();
    let mut silent = tls_connect(&h, &tls).await;
    let mut half = tls_connect(&h, &tls).await;
    half.write_all(&PREFACE[..12]).await.unwrap();
    half.flush().await.unwrap();
    let mut idle = tls_connect(&h, &tls).await;
    idle.write_all(PREFACE).await.unwrap();
    idle.write_all(SETTINGS).await.unwrap();
    idle.flush().await.unwrap();
    for (name, conn, at_least) in [
        ("no preface", &mut silent, Duration::from_millis(900)),
        ("half a preface", &mut half, Duration::from_millis(900)),
        ("idle", &mut idle, Duration::from_millis(1900)),
    ] {
        until_closed(conn, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{name}: still open"));
        assert!(started.elapsed() >= at_least, "{name} closed too early");
    }

    // The agent's Sync stream is a call in flight: well past the idle
    // timeout it still delivers a new entry.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
    h.create_entry(
        "spiffe://example.org/later",
        &[&format!("unix:uid:{}", common::my_uid())],
    )
    .await;
    let client = h.client().await;
    common::eventually(|| async {
        let n = client
            .fetch_x509_context()
            .await
            .map_err(|e| e.to_string())?
            .svids()
            .len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} SVIDs"))
        }
    })
    .await;
    assert_eq!(entry_count(&h).await, 2);
}
