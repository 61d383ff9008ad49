//! SVIDs written by `oxid-agent api fetch x509 --write` work with plain
//! OpenSSL: `s_server` and `s_client` complete mutual TLS, each verifying
//! the other against the bundle the agent wrote.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Harness, eventually, my_uid};

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_oxid-agent");

/// Runs `oxid-agent api fetch x509 --write dir`, as uid 65534 if `nobody`.
fn fetch_into(h: &Harness, dir: &Path, nobody: bool) -> Result<(), String> {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            AGENT_BIN,
        ]);
        c
    } else {
        Command::new(AGENT_BIN)
    };
    let out = cmd
        .args(["api", "fetch", "x509", "--write"])
        .arg(dir)
        .arg("--socket-path")
        .arg(h.workload_socket())
        .output()
        .expect("setpriv (util-linux) is required");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openssl_s_server_and_s_client_do_mtls_with_written_svids() {
    assert_eq!(
        my_uid(),
        0,
        "this test switches uid and must run as root (CI does)"
    );
    let h = Harness::start().await;
    h.create_entry("spiffe://example.org/openssl-server", &["unix:uid:0"])
        .await;
    h.create_entry("spiffe://example.org/openssl-client", &["unix:uid:65534"])
        .await;
    let srv = h.dir.path().join("srv");
    let cli = h.dir.path().join("cli");
    for (d, nobody) in [(&srv, false), (&cli, true)] {
        std::fs::create_dir(d).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        eventually(|| async { fetch_into(&h, d, nobody) }).await;
    }

    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-naccept",
            "1",
            "-tls1_3",
        ])
        .args(["-Verify", "2", "-verify_return_error"])
        .arg("-cert")
        .arg(srv.join("svid.pem"))
        .arg("-key")
        .arg(srv.join("svid.key"))
        .arg("-CAfile")
        .arg(srv.join("bundle.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is required (apt-get install -y openssl)");
    // The port comes from the server's own "ACCEPT host:port" line.
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "s_server ended early"
        );
        if let Some(addr) = line.trim().strip_prefix("ACCEPT ") {
            break addr.to_owned();
        }
    };
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &port,
            "-tls1_3",
            "-verify_return_error",
            "-verify",
            "2",
        ])
        .arg("-cert")
        .arg(cli.join("svid.pem"))
        .arg("-key")
        .arg(cli.join("svid.key"))
        .arg("-CAfile")
        .arg(cli.join("bundle.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello over SPIFFE mTLS\n")
        .unwrap();
    let client_out = client.wait_with_output().unwrap();
    let client_text = String::from_utf8_lossy(&client_out.stdout);
    assert!(
        client_text.contains("Verify return code: 0 (ok)"),
        "client:\n{client_text}\n{}",
        String::from_utf8_lossy(&client_out.stderr)
    );
    let _ = server.stdin.take();
    let server_out = server.wait_with_output().unwrap();
    let mut server_text = line;
    server_text.push_str(&String::from_utf8_lossy(&server_out.stdout));
    let rest: Vec<String> = out.lines().map_while(Result::ok).collect();
    server_text.push_str(&rest.join("\n"));
    server_text.push_str(&String::from_utf8_lossy(&server_out.stderr));
    assert!(
        server_text.contains("hello over SPIFFE mTLS"),
        "server:\n{server_text}"
    );
    assert!(
        server_text.contains("openssl-client") || server_text.contains("verify return:1"),
        "server:\n{server_text}"
    );
}
