//! The shipped systemd unit and sample configuration for the agent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_oxid-agent");

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_unit_file_verifies_and_keeps_only_cap_sys_ptrace() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo("systemd/oxid-agent.service")).unwrap();
    assert!(unit.contains("CapabilityBoundingSet=CAP_SYS_PTRACE\n"));
    assert!(unit.contains("NoNewPrivileges=yes"));
    let path = dir.path().join("oxid-agent.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/oxid-agent", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is required: apt-get install -y systemd (or run ./scripts/test)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("user") && !l.contains("User"))
        .collect();
    assert!(problems.is_empty(), "{text}");
}

#[test]
fn the_sample_config_is_valid() {
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(repo("systemd/agent.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
