//! The `oxid-server` binary on PostgreSQL: `run --datastore-url` over TCP
//! with TLS (`verify-full`) and a SCRAM password, serving an entry to an
//! agent; the password never printed, by `run`'s log or by `validate`.
//! Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use oxid_proto::agent as pb;
use support::cli_process::{BIN, Server};

#[test]
fn run_with_a_datastore_url_serves_an_entry_to_an_agent() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let (port, ca, password) = pg_cluster::tcp();
    let secrets = tempfile::tempdir().unwrap();
    let config = pg_cluster::datastore_table(secrets.path(), &password, &ca);
    let url = format!("postgresql://postgres@localhost:{port}/{}", db.dbname);
    let s = Server::start_with_config(&config, &["--datastore-url", &url]);

    let token = s.json(&["token", "generate"]);
    let addr = s.ready_field("agent_api").parse().unwrap();
    let td = oxid_pki::TrustDomain::new("example.org").unwrap();
    let bundle_json = s.ok(&["bundle", "show", "--format", "spiffe"]);
    let bundle = oxid_pki::bundle::Bundle::from_spiffe_json(td, bundle_json.as_bytes()).unwrap();
    let agent = rt.block_on(async {
        let client = support::agent_api_client(addr, bundle.clone(), support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, token["token"].as_str().unwrap(), |csr| csr)
            .await
            .unwrap()
    });
    let agent_id = agent.id.to_string();
    let created = s.json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:1000",
    ]);
    let entry_id = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let first = rt.block_on(async {
        let mut client =
            support::agent_api_client(addr, bundle, support::SERVER_ID, Some(agent.certs.clone()))
                .await
                .unwrap();
        let mut stream = client
            .sync(pb::SyncRequest::default())
            .await
            .unwrap()
            .into_inner();
        // The server's index follows the store: the entry comes in the
        // first message, or in a delta right after it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message())
                .await
                .expect("the entry reached the agent")
                .unwrap()
                .unwrap();
            if let Some(e) = message.upserts.into_iter().find(|e| e.id == entry_id) {
                break e;
            }
        }
    });
    assert_eq!(first.spiffe_id, "spiffe://example.org/web");

    // It is all in PostgreSQL, not in the data directory.
    let counts = rt.block_on(async {
        let raw = pg_cluster::raw(&db).await;
        let row = raw
            .query_one(
                "SELECT (SELECT count(*) FROM oxid_entries), (SELECT count(*) FROM oxid_agents), \
                 (SELECT count(*) FROM oxid_server_journals)",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
        )
    });
    assert_eq!(counts, (1, 1, 1));
    assert!(!s.dir.path().join("data/datastore").exists());
    assert!(!s.log().contains(&password), "the log shows the password");
}

#[test]
fn pgpassword_is_read_and_never_printed() {
    let rt = pg_cluster::runtime();
    let db = rt.block_on(pg_cluster::fresh());
    let (port, ca, password) = pg_cluster::tcp();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!("[datastore]\nca_file = {:?}\n", ca.display().to_string()),
    )
    .unwrap();
    let url = format!("postgresql://postgres@localhost:{port}/{}", db.dbname);
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--log-format",
            "json",
            "--bind-address",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("admin.sock"))
        .args(["--datastore-url", &url])
        .env("PGPASSWORD", &password)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let health = Command::new(BIN)
            .args(["healthcheck", "--socket-path"])
            .arg(dir.path().join("admin.sock"))
            .output()
            .unwrap();
        if health.status.success() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut log = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
            panic!("server exited: {status}: {log}");
        }
        assert!(std::time::Instant::now() < deadline, "never healthy");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("oxid-server ready"), "{log}");
    assert!(!log.contains(&password), "{log}");

    // Without the password the server says why it cannot start.
    let refused = Command::new(BIN)
        .args(["run", "--bind-address", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("admin.sock"))
        .args(["--datastore-url", &url])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("cannot connect to postgresql://postgres@localhost"),
        "{err}"
    );
}

#[test]
fn validate_and_run_never_print_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-never-shown";
    let with_password = dir.path().join("with-password.toml");
    std::fs::write(
        &with_password,
        format!("[datastore]\nurl = \"postgresql://oxid:{secret}@db.example:5432/oxid\"\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&with_password)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(printed.contains("password_file"), "{printed}");
    assert!(!printed.contains(secret), "{printed}");

    let out = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--datastore-url",
            &format!("postgres://oxid:{secret}@db.example/oxid"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(printed.contains("holds a password"), "{printed}");
    assert!(!printed.contains(secret), "{printed}");

    // A valid one is described without the password file's content.
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, secret).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[datastore]\nurl = \"postgresql://oxid@db.example:5432/oxid\"\n\
             password_file = {:?}\nsslmode = \"require\"\n",
            password_file.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("datastore postgresql://oxid@db.example:5432/oxid"),
        "{printed}"
    );
    assert!(!printed.contains(secret), "{printed}");
}

#[test]
fn a_server_that_cannot_reach_postgresql_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: the driver's own text is only "error
    // connecting to server"; the reason is in its causes.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args(["run", "--bind-address", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("admin.sock"))
        .args([
            "--datastore-url",
            &format!("postgresql://oxid@127.0.0.1:{port}/oxid?sslmode=disable"),
        ])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error connecting to server: ") && err.contains("refused"),
        "{err}"
    );
}
