//! `oxid-agent api watch --write DIR`: SVIDs as files across rotations,
//! against a real server and agent. A reader in a tight loop never sees a
//! key with another generation's certificate; a child program starts after
//! the first files, is signalled on updates, and its exit status is the
//! watcher's; another uid running the same command gets nothing.

// A test reports failure by panicking, with the process output.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxid_e2e::{Agent, Proc, Server, bin};

/// Uids with no account (this suite runs as root, as CI does).
const OWNER_UID: &str = "65534";
const OTHER_UID: &str = "65533";

async fn cluster(dir: &Path) -> (Server, Agent, String) {
    let server = Server::start(dir).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir, &server, &token).await;
    (server, agent, agent_id)
}

/// A server and an agent, an entry `path` for [`OWNER_UID`] with `extra`
/// flags, and a directory for its files.
async fn owned(dir: &Path, path: &str, extra: &[&str]) -> (Server, Agent, PathBuf) {
    let (server, agent, agent_id) = cluster(dir).await;
    let selector = format!("unix:uid:{OWNER_UID}");
    let mut flags = vec!["--selector", &selector];
    flags.extend_from_slice(extra);
    server
        .create_entry(&format!("spiffe://example.org{path}"), &agent_id, &flags)
        .await;
    (server, agent, out_dir(dir, "files", 65534))
}

/// A directory for the files, owned by `uid`, mode 0755.
fn out_dir(dir: &Path, name: &str, uid: u32) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
    rustix::fs::chown(
        &out,
        Some(rustix::process::Uid::from_raw(uid)),
        Some(rustix::process::Gid::from_raw(uid)),
    )
    .unwrap();
    out
}

/// `oxid-agent api watch --write out <extra>` as `uid`.
fn watch(agent: &Agent, uid: &str, out: &Path, extra: &[&str]) -> Proc {
    let mut cmd = agent.workload(Path::new("setpriv"));
    cmd.args(["--reuid", uid, "--regid", uid, "--clear-groups"])
        .arg(bin("oxid-agent"))
        .args(["api", "watch", "--write"])
        .arg(out)
        .args(extra);
    Proc::spawn("watch", cmd)
}

/// The serial of the first certificate in `chain_pem` and whether
/// `key_pem` is its key.
fn pair(chain_pem: &[u8], key_pem: &[u8]) -> (String, bool) {
    // The first CERTIFICATE block: svid_key.pem starts with the key.
    let pem = x509_parser::pem::Pem::iter_from_buffer(chain_pem)
        .map(|p| p.expect("PEM"))
        .find(|p| p.label == "CERTIFICATE")
        .expect("a PEM certificate");
    let cert = pem.parse_x509().expect("a certificate");
    let key = oxid_pki::KeyPair::from_pkcs8_pem_or_der(key_pem).expect("a PKCS#8 key");
    (
        cert.raw_serial_as_string(),
        cert.public_key().raw == key.public_key_spki(),
    )
}

#[tokio::test]
async fn a_reader_never_sees_a_key_with_another_generations_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent, out) = owned(dir.path(), "/files", &["--x509-svid-ttl", "4s"]).await;
    let mut watcher = watch(&agent, OWNER_UID, &out, &[]);
    watcher.wait_for("wrote .oxid-gen-").await;

    // Read as fast as possible until three generations have been seen: the
    // pair under one resolved `current`, and the one-file form.
    let reader = {
        let out = out.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let (mut serials, mut reads) = (BTreeSet::new(), 0u64);
            while serials.len() < 3 {
                assert!(
                    Instant::now() < deadline,
                    "fewer than 3 generations in 30 s"
                );
                let generation = out.join(std::fs::read_link(out.join("current")).unwrap());
                let (Ok(chain), Ok(key)) = (
                    std::fs::read(generation.join("svid.pem")),
                    std::fs::read(generation.join("svid.key")),
                ) else {
                    // Pruned after we resolved it: two switches in between.
                    continue;
                };
                let (serial, matches) = pair(&chain, &key);
                assert!(
                    matches,
                    "generation {} holds a mismatched pair",
                    generation.display()
                );
                let combined = std::fs::read(out.join("svid_key.pem")).unwrap();
                let (_, matches) = pair(&combined, &combined);
                assert!(matches, "svid_key.pem holds a mismatched pair");
                serials.insert(serial);
                reads += 1;
            }
            reads
        })
    };
    let reads = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    eprintln!("{reads} consistent reads across 3 generations");
    let mode = |name: &str| {
        std::fs::metadata(out.join("current").join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!((mode("svid.key"), mode("svid.pem")), (0o600, 0o644));
    watcher.stop().await;
}

#[tokio::test]
async fn a_child_starts_after_the_files_is_signalled_and_its_status_is_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent, out) = owned(dir.path(), "/child", &["--x509-svid-ttl", "4s"]).await;
    let script = format!(
        "test -s {o}/svid.key || exit 90; trap 'echo hup >> {o}/hups' HUP; \
         trap 'exit 7' TERM; echo started; while :; do sleep 0.05; done",
        o = out.display()
    );
    let mut watcher = watch(
        &agent,
        OWNER_UID,
        &out,
        &["--signal", "HUP", "--", "sh", "-c", &script],
    );
    watcher.wait_for("started").await;
    // The agent rotates a 4 s SVID within about 2 s: the child gets a HUP.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(out.join("hups")).is_ok_and(|h| h.contains("hup")) {
        assert!(
            Instant::now() < deadline,
            "no HUP after a rotation:\n{}",
            watcher.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = rustix::process::Pid::from_raw(watcher.pid().unwrap() as i32).unwrap();
    // setpriv execs the watcher, so this PID is the watcher's own.
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(watcher.wait().await, Some(7), "{}", watcher.log());
}

#[tokio::test]
async fn another_uid_running_the_same_command_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    let selector = format!("unix:uid:{OWNER_UID}");
    server
        .create_entry(
            "spiffe://example.org/owner-only",
            &agent_id,
            &["--selector", &selector],
        )
        .await;
    let theirs = out_dir(dir.path(), "other", 65533);
    let mut other = watch(&agent, OTHER_UID, &theirs, &[]);
    other.wait_for("waiting for the Workload API").await;
    assert!(other.log().contains("PermissionDenied"), "{}", other.log());
    assert!(!theirs.join("current").exists());
    other.stop().await;
    // The same command as the entry's uid gets its files.
    let ours = out_dir(dir.path(), "owner", 65534);
    let mut owner = watch(&agent, OWNER_UID, &ours, &[]);
    owner.wait_for("wrote .oxid-gen-").await;
    assert!(ours.join("svid.pem").exists());
    owner.stop().await;
}

#[tokio::test]
async fn an_unsafe_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent, _) = cluster(dir.path()).await;
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = oxid_e2e::run(
        &bin("oxid-agent"),
        &[
            "api",
            "watch",
            "--socket-path",
            agent.socket.to_str().unwrap(),
            "--write",
            open.to_str().unwrap(),
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("group or others may write to it"), "{err}");
}

/// Where nginx is, or a panic that says how to install it.
fn nginx() -> &'static str {
    for path in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(path).exists() {
            return path;
        }
    }
    panic!("nginx is missing: apt-get install -y nginx (./scripts/test installs it)");
}

#[tokio::test]
async fn nginx_serves_mtls_from_the_files_across_rotations_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = cluster(dir.path()).await;
    for (path, uid) in [("/nginx", OWNER_UID), ("/curl", OTHER_UID)] {
        let selector = format!("unix:uid:{uid}");
        server
            .create_entry(
                &format!("spiffe://example.org{path}"),
                &agent_id,
                &[
                    "--selector",
                    &selector,
                    "--x509-svid-ttl",
                    "4s",
                    "--dns-name",
                    "localhost",
                ],
            )
            .await;
    }
    let srv = out_dir(dir.path(), "nginx-files", 65534);
    let ngx = out_dir(dir.path(), "nginx", 65534);
    let cli = out_dir(dir.path(), "curl-files", 65533);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // nginx as the watcher's child: started after the first files, reloaded
    // (HUP) after each update. This is the README's example, with paths.
    let conf = include_str!("../examples/nginx/nginx.conf")
        .replace("/run/nginx-oxid", ngx.to_str().unwrap())
        .replace("/var/lib/oxid-files", srv.to_str().unwrap())
        .replace("8443", &port.to_string());
    std::fs::write(ngx.join("nginx.conf"), conf).unwrap();
    let conf = ngx.join("nginx.conf");
    let mut served = watch(
        &agent,
        OWNER_UID,
        &srv,
        &[
            "--signal",
            "HUP",
            "--",
            nginx(),
            "-p",
            ngx.to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
        ],
    );
    let mut client = watch(&agent, OTHER_UID, &cli, &[]);
    client.wait_for("wrote .oxid-gen-").await;
    served.wait_for("wrote .oxid-gen-").await;

    let url = format!("https://localhost:{port}/");
    let cert = cli.join("svid_key.pem");
    let ca = cli.join("bundle.pem");
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut server_serials, mut client_serials, mut requests) =
        (BTreeSet::new(), BTreeSet::new(), 0);
    while server_serials.len() < 3 || client_serials.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 rotations on each side in 40 s (server {server_serials:?}, client \
             {client_serials:?}):\n{}",
            served.log()
        );
        let out = tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--cacert"])
            .arg(&ca)
            .arg("--cert")
            .arg(&cert)
            .args(["-w", "\n%{certs}", &url])
            .output()
            .await
            .expect("curl is needed: apt-get install -y curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let started = served.log().contains("nginx: [emerg]");
        assert!(!started, "nginx failed:\n{}", served.log());
        // Until nginx listens, connections are refused; after, none may fail.
        if requests == 0 && out.status.code() == Some(7) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert!(
            out.status.success(),
            "request {requests} failed: {}{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr),
            served.log()
        );
        let (body, certs) = stdout.split_once('\n').unwrap();
        client_serials.insert(body.strip_prefix("client serial ").unwrap().to_owned());
        let serial = certs
            .lines()
            .find(|l| l.starts_with("Serial Number:"))
            .unwrap_or_else(|| panic!("no server certificate in curl's output: {certs}"));
        server_serials.insert(serial.to_owned());
        requests += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{requests} requests, none failed, across {} server and {} client certificates",
        server_serials.len(),
        client_serials.len()
    );
    served.stop().await;
    client.stop().await;
}

#[tokio::test]
async fn jwt_svids_and_the_jwt_bundle_are_files_fetched_again_at_half_life() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent, out) = owned(dir.path(), "/jwt-files", &["--jwt-svid-ttl", "4s"]).await;
    let mut watcher = watch(
        &agent,
        OWNER_UID,
        &out,
        &["--jwt-audience", "db", "--jwt-audience", "queue"],
    );
    watcher.wait_for("wrote .oxid-gen-").await;
    let read = |name: &str| std::fs::read_to_string(out.join("current").join(name)).unwrap();
    let jwks: serde_json::Value = serde_json::from_str(&read("jwt_bundle.json")).unwrap();
    assert!(!jwks["keys"].as_array().unwrap().is_empty(), "{jwks}");
    // Each token validates for its audience only, through the agent.
    let validate = |audience: &'static str, token: String| {
        let socket = agent.socket.display().to_string();
        async move {
            let mut cmd = tokio::process::Command::new("setpriv");
            cmd.args(["--reuid", OWNER_UID, "--regid", OWNER_UID, "--clear-groups"])
                .arg(bin("oxid-agent"))
                .args([
                    "api",
                    "validate",
                    "jwt",
                    "--socket-path",
                    &socket,
                    "--audience",
                    audience,
                    "--svid",
                    &token,
                ]);
            cmd.output().await.unwrap().status.success()
        }
    };
    let first = read("jwt_svid.0.token");
    assert!(validate("db", first.clone()).await);
    assert!(validate("queue", read("jwt_svid.1.token")).await);
    assert!(
        !validate("queue", first.clone()).await,
        "a db token must not pass for queue"
    );
    // 4 s tokens are fetched again after about 2 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    while read("jwt_svid.0.token") == first {
        assert!(
            Instant::now() < deadline,
            "the JWT-SVID was never refreshed:\n{}",
            watcher.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(validate("db", read("jwt_svid.0.token")).await);
    assert_eq!(
        std::fs::metadata(out.join("current/jwt_svid.0.token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    watcher.stop().await;
}

#[tokio::test]
async fn the_watcher_rides_out_an_agent_restart_and_keeps_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent, out) = owned(dir.path(), "/restart", &["--x509-svid-ttl", "4s"]).await;
    let mut watcher = watch(&agent, OWNER_UID, &out, &[]);
    watcher.wait_for("wrote .oxid-gen-").await;
    agent.stop().await;
    watcher.wait_for("reconnecting").await;
    // While the agent is away the files stay, and they are still a pair.
    let (_, matches) = pair(
        &std::fs::read(out.join("svid_key.pem")).unwrap(),
        &std::fs::read(out.join("svid_key.pem")).unwrap(),
    );
    assert!(matches);
    let writes = watcher.log().matches("wrote .oxid-gen-").count();
    agent.restart(&server).await;
    // Back on the agent, it writes the next generations.
    watcher.wait_for_nth("wrote .oxid-gen-", writes + 1).await;
    watcher.stop().await;
}
