//! A workload not written in Rust: py-spiffe (the Python `spiffe` package,
//! from PyPI) fetches an X509-SVID, bundles and a JWT-SVID from the agent
//! and validates the JWT through it.
//!
//! KNOWN FAILURE, kept as the acceptance test for the fix: gRPC C-core
//! 1.57+ (which py-spiffe 0.3 requires) sends the percent-encoded socket
//! path as `:authority` on Unix sockets; hyper's h2 (under tonic) rejects
//! that with RST_STREAM PROTOCOL_ERROR. With `grpc.default_authority =
//! localhost` set on the channel the same script passes, which isolates the
//! cause. Run it with `cargo test -p oxid-agent --test py_spiffe -- --ignored`
//! after `python3 -m venv target/py-venv && target/py-venv/bin/pip install
//! spiffe==0.3.2` (or with `OXID_PYTHON` naming a python that has py-spiffe).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::{Harness, eventually, my_uid};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("OXID_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv/bin/python");
    assert!(
        venv.exists(),
        "py-spiffe is required: python3 -m venv target/py-venv && \
         target/py-venv/bin/pip install spiffe==0.3.2 (expected at {}), or set OXID_PYTHON",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "known interop bug: h2 rejects the :authority gRPC C-core 1.57+ sends on Unix sockets"]
async fn py_spiffe_fetches_and_validates() {
    let python = python();
    let h = Harness::start().await;
    h.create_entry(
        "spiffe://example.org/python",
        &[&format!("unix:uid:{}", my_uid())],
    )
    .await;
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/workload_check.py");
    let socket = format!("unix://{}", h.workload_socket().display());
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&socket)
        .arg("spiffe://example.org/db")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(v["chain_len"], 1);
    assert_eq!(v["bundle_authorities"], 1);
    assert_eq!(v["jwt_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(
        v["jwt_audience"],
        serde_json::json!(["spiffe://example.org/db"])
    );
    assert_eq!(v["validated_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(v["jwt_bundle"], true);
}
