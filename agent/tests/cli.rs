//! The `oxid-agent` binary with bad input: every case exits non-zero with
//! one `error:` line that names the problem, and starts nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_oxid-agent");

#[test]
fn bad_input_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "bogus_key = 1\n").unwrap();
    let bad_td = dir.path().join("td.toml");
    std::fs::write(&bad_td, "trust_domain = \"Not A Domain\"\n").unwrap();
    let nowhere = dir.path().join("nowhere.sock");
    let socket = nowhere.to_str().unwrap();
    let bad = bad_toml.to_str().unwrap();
    let td = bad_td.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "run",
                "--join-token",
                "t",
                "--node-cert",
                "c",
                "--node-key",
                "k",
            ],
            "not both",
        ),
        (vec!["run", "--node-cert", "c"], "needs both"),
        (vec!["run", "--config", bad], "unknown field `bogus_key`"),
        (vec!["run", "--config", td], "trust_domain"),
        (
            vec!["run", "--metrics-address", "not-an-address"],
            "metrics_address",
        ),
        (vec!["validate", "--config", bad], "unknown field"),
        (
            vec!["validate", "--config", "/nonexistent.toml"],
            "/nonexistent.toml",
        ),
        (
            vec!["healthcheck", "--socket-path", socket],
            "is the agent running",
        ),
        (
            vec!["api", "fetch", "x509", "--socket-path", socket],
            "cannot connect",
        ),
        (
            vec![
                "api",
                "fetch",
                "jwt",
                "--audience",
                "a",
                "--socket-path",
                socket,
            ],
            "cannot connect",
        ),
        (
            vec![
                "api",
                "validate",
                "jwt",
                "--audience",
                "a",
                "--svid",
                "x",
                "--socket-path",
                socket,
            ],
            "cannot connect",
        ),
        (
            vec!["api", "watch", "--socket-path", socket],
            "cannot connect",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(BIN)
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line expected, got:\n{err}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
        assert!(
            lines[0].contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
    }
    // The refused runs created no data directory (the default is ./.oxid).
    assert!(!dir.path().join(".oxid").exists());
}

/// `oxid-agent validate | head -0`: the reader is gone before the first
/// line; the command ends quietly instead of panicking.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "trust_domain = \"example.org\"\n").unwrap();
    let mut child = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}
