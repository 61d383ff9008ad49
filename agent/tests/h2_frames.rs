//! The Workload API at the HTTP/2 frame level, written by hand on a real
//! socket: a request whose `:authority` is the percent-encoded socket path
//! (what gRPC C-core and Java send) is served, and garbage or a
//! decompression bomb closes that one connection while the agent keeps
//! serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Harness, eventually, my_uid};
use oxid_h2_authority::hpack::{Decoder, Field, encode_literals};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = len[1..].to_vec();
    out.extend([frame_type, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn field(name: &str, value: &str) -> Field {
    Field {
        name: name.into(),
        value: value.into(),
        never_indexed: false,
    }
}

/// One whole gRPC request for FetchJWTBundles with the given `:authority`.
fn fetch_jwt_bundles(authority: &str) -> Vec<u8> {
    let mut block = Vec::new();
    encode_literals(
        &[
            field(":method", "POST"),
            field(":scheme", "http"),
            field(":path", "/SpiffeWorkloadAPI/FetchJWTBundles"),
            field(":authority", authority),
            field("content-type", "application/grpc"),
            field("te", "trailers"),
            field("workload.spiffe.io", "true"),
        ],
        &mut block,
    );
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    bytes.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // empty message, END_STREAM
    bytes
}

/// Reads frames until one of `frame_type` on stream 1: (flags, payload).
async fn read_until(conn: &mut UnixStream, frame_type: u8) -> Option<(u8, Vec<u8>)> {
    loop {
        let mut header = [0u8; 9];
        conn.read_exact(&mut header).await.ok()?;
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        if header[3] == frame_type && stream == 1 {
            return Some((header[4], payload));
        }
    }
}

async fn harness_with_identity() -> Harness {
    let h = Harness::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_percent_encoded_socket_authority_is_served() {
    let h = harness_with_identity().await;
    let authority = h
        .workload_socket()
        .display()
        .to_string()
        .replace('/', "%2F");
    let mut conn = UnixStream::connect(h.workload_socket()).await.unwrap();
    conn.write_all(&fetch_jwt_bundles(&authority))
        .await
        .unwrap();
    let read = async {
        let (_, headers) = read_until(&mut conn, 0x1).await.expect("response headers");
        let (_, data) = read_until(&mut conn, 0x0).await.expect("response message");
        (headers, data)
    };
    let (headers, data) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the agent answered");
    let fields = Decoder::new(4096, 65536).decode(&headers).unwrap();
    assert!(
        fields.contains(&field(":status", "200")),
        "response headers: {fields:?}"
    );
    // A gRPC message (5-byte prefix) holding the JWKS of example.org.
    let text = String::from_utf8_lossy(&data[5..]);
    assert!(
        text.contains("spiffe://example.org") && text.contains("\"keys\""),
        "{text}"
    );
}

/// Sends `bytes` on a fresh connection and expects the agent to close it.
async fn closed_after(h: &Harness, bytes: &[u8]) {
    let mut conn = UnixStream::connect(h.workload_socket()).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let drained = async {
        let mut sink = Vec::new();
        // Ends with EOF or a reset, never with an answer to stream 1.
        let _ = conn.read_to_end(&mut sink).await;
        sink
    };
    let sink = tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the agent closed the connection");
    let mut rest = &sink[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        assert_ne!(rest[3], 0x1, "the agent answered a malformed request");
        rest = &rest[(9 + len).min(rest.len())..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_bombs_close_only_their_connection() {
    let h = harness_with_identity().await;
    // Keep a healthy client connected throughout.
    let client = h.client().await;

    closed_after(&h, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;

    // An HPACK index that does not exist.
    let mut bad_index = PREFACE.to_vec();
    bad_index.extend(frame(0x1, 0x5, 1, &[0xff, 0x7f]));
    closed_after(&h, &bad_index).await;

    // One 4 KB header added to the table, then referenced 500 times in
    // 500 bytes: 2 MB once decoded, refused before it is built.
    // (Value length 4000: 127 + 0x21 + (0x1e << 7).)
    let mut bomb = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
    bomb.extend(std::iter::repeat_n(b'v', 4000));
    bomb.extend(std::iter::repeat_n(0xbe, 500));
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x1, 0x5, 1, &bomb));
    closed_after(&h, &bytes).await;

    // A header block that never ends.
    let mut endless = PREFACE.to_vec();
    endless.extend(frame(0x1, 0x0, 1, &[0x82; 16_384]));
    for _ in 0..5 {
        endless.extend(frame(0x9, 0x0, 1, &[0x82; 16_384]));
    }
    closed_after(&h, &endless).await;

    let jwt = client
        .fetch_jwt_svid(&["spiffe://example.org/db"], None)
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
}
