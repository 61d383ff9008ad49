//! Helpers shared by the oxid-pki integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::time::{Duration, SystemTime};

use oxid_pki::x509::X509Ca;
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId, TrustDomain};

pub const HOUR: Duration = Duration::from_secs(3600);

pub fn now() -> SystemTime {
    // Whole seconds, so expectations computed here match DER times exactly.
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

pub fn workload_key() -> KeyPair {
    KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap()
}

pub fn root_ca(trust_domain: &str, ttl: Duration) -> X509Ca {
    X509Ca::new_root(td(trust_domain), workload_key(), ttl, now()).unwrap()
}

/// Runs a command that the test needs; a missing tool fails the test with
/// the command that installs it, never skips it.
pub fn run_tool(program: &str, args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    match std::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is required by this test but is not installed; install it with \
             `apt-get install -y {program}` (or run ./scripts/test, which does)"
        ),
        Err(e) => panic!("running {program}: {e}"),
    }
}

/// An RSA private key made by openssl (oxid never generates RSA keys).
pub fn openssl_rsa_key(bits: u32) -> KeyPair {
    let dir = tempfile::tempdir().unwrap();
    let bits_arg = format!("rsa_keygen_bits:{bits}");
    let out = run_tool(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &bits_arg,
            "-out",
            "rsa.pem",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read(dir.path().join("rsa.pem")).unwrap();
    KeyPair::from_pkcs8_pem_or_der(&pem).unwrap()
}
