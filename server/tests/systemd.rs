//! The shipped systemd unit and sample configuration for the server: the
//! unit passes `systemd-analyze verify` (pointed at the built binary), and
//! the sample `server.toml` is a valid configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_oxid-server");

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_unit_file_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo("systemd/oxid-server.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/oxid-server run"));
    let local = unit.replace("/usr/local/bin/oxid-server", BIN);
    let path = dir.path().join("oxid-server.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is required: apt-get install -y systemd (or run ./scripts/test)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Users named in the unit need not exist on a build machine.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("user") && !l.contains("User"))
        .collect();
    assert!(out.status.success() || problems.is_empty(), "{text}");
    assert!(problems.is_empty(), "{text}");
}

#[test]
fn the_sample_config_is_valid() {
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(repo("systemd/server.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
