//! A workload not written in Rust: py-spiffe (the Python `spiffe` package,
//! from PyPI) fetches an X509-SVID, bundles and a JWT-SVID from the agent
//! and validates the JWT through it.
//!
//! py-spiffe runs on gRPC C-core, which sends the percent-encoded socket
//! path as `:authority`; this test is what shows the agent's HTTP/2
//! rewriter (`workload::h2_authority`) lets such clients in. `scripts/test`
//! installs the pinned packages of `tests/py/requirements.txt` into
//! `target/py-venv`; `OXID_PYTHON` names another python that has them.

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
        "py-spiffe is required: run ./scripts/test, which installs it, or \
         python3 -m venv target/py-venv && target/py-venv/bin/pip install -r \
         agent/tests/py/requirements.txt (expected at {}), or set OXID_PYTHON",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
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
