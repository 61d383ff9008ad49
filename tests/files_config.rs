//! `[[files]]` in agent.toml: the agent runs one writer per table as the
//! table's user, each attested like any workload of that user, keeps them
//! running, and stops them with itself. Real server, agent and writers;
//! the suite runs as root, as CI does, so writers can run as other uids.

// A test reports failure by panicking, with the process output.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxid_e2e::{Agent, Server, bin};

/// A directory owned by `uid:uid` with `mode`.
fn out_dir(dir: &Path, name: &str, uid: u32, mode: u32) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode)).unwrap();
    rustix::fs::chown(
        &out,
        Some(rustix::process::Uid::from_raw(uid)),
        Some(rustix::process::Gid::from_raw(uid)),
    )
    .unwrap();
    out
}

/// The URI SAN of the first certificate in the PEM file at `path`.
fn spiffe_id(path: &Path) -> String {
    let pem = std::fs::read(path).unwrap();
    let block = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .next()
        .expect("a PEM block")
        .expect("PEM");
    let cert = block.parse_x509().expect("a certificate");
    let san = cert
        .subject_alternative_name()
        .expect("a SAN extension")
        .expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .expect("a URI SAN")
}

/// The `pid=N` field of a log line.
fn pid_in(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid= in {line:?}"))
}

/// One line of `/proc/PID/status`, e.g. `Groups:`.
fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Waits until process `pid` has exited (a zombie has: an orphan waits
/// for whoever adopted it to reap it).
async fn gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    while running() {
        assert!(Instant::now() < deadline, "writer {pid} is still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn each_table_gets_its_users_svids_rotated_and_a_killed_writer_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let (token, agent_id) = server.join_token().await;
    for (path, uid) in [("/files-a", 65534), ("/files-b", 65533)] {
        server
            .create_entry(
                &format!("spiffe://example.org{path}"),
                &agent_id,
                &[
                    "--selector",
                    &format!("unix:uid:{uid}"),
                    "--x509-svid-ttl",
                    "4s",
                ],
            )
            .await;
    }
    let a = out_dir(dir.path(), "a", 65534, 0o755);
    let b = out_dir(dir.path(), "b", 65533, 0o750);
    // 65532 has no entry: its writer gets nothing.
    let none = out_dir(dir.path(), "none", 65532, 0o755);
    let config = write_config(
        dir.path(),
        &format!(
            "[[files]]\nuser = \"nobody\"\ndir = \"{}\"\n\n\
             [[files]]\nuser = \"65533\"\ngroup = \"65533\"\ndir = \"{}\"\n\
             svid_file_name = \"tls.crt\"\nkey_file_name = \"tls.key\"\nkey_mode = \"0640\"\n\n\
             [[files]]\nuser = \"65532\"\ngroup = \"65532\"\ndir = \"{}\"\n",
            a.display(),
            b.display(),
            none.display()
        ),
    );
    let mut agent = Agent::start_with(dir.path(), &server, &token, &["--config", &config]).await;
    let wrote_a = format!("for spiffe://example.org/files-a into {}", a.display());
    let wrote_b = format!("for spiffe://example.org/files-b into {}", b.display());
    let started = |d: &Path| format!("started a files writer files={} ", d.display());
    agent.proc.wait_for(&wrote_a).await;
    agent.proc.wait_for(&wrote_b).await;

    // Each directory holds its own user's SVID, in files that user owns.
    assert_eq!(
        spiffe_id(&a.join("current/svid.pem")),
        "spiffe://example.org/files-a"
    );
    assert_eq!(
        spiffe_id(&b.join("current/tls.crt")),
        "spiffe://example.org/files-b"
    );
    let meta = |p: PathBuf| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o777)
    };
    assert_eq!(meta(a.join("current/svid.key")), (65534, 65534, 0o600));
    assert_eq!(meta(b.join("current/tls.key")), (65533, 65533, 0o640));
    assert_eq!(meta(b.join("current/tls.crt")), (65533, 65533, 0o644));

    // Each writer runs as its user and group alone: no supplementary
    // groups (root's would let it read what the user cannot).
    let pid_a = pid_in(&agent.proc.wait_for(&started(&a)).await);
    let pid_b = pid_in(&agent.proc.wait_for(&started(&b)).await);
    for (pid, id) in [(pid_a, "65534"), (pid_b, "65533")] {
        assert_eq!(proc_status(pid, "Uid:"), [id; 4].join(" "));
        assert_eq!(proc_status(pid, "Gid:"), [id; 4].join(" "));
        assert_eq!(proc_status(pid, "Groups:"), "", "writer {pid}");
    }

    // The uid with no entry is refused, and nothing is written for it.
    let refused = agent.proc.wait_for("no identity issued").await;
    assert!(refused.contains(&none.display().to_string()), "{refused}");

    // Kept rotated: 4 s SVIDs are replaced about every 2 s.
    agent.proc.wait_for_nth(&wrote_a, 3).await;
    agent.proc.wait_for_nth(&wrote_b, 3).await;

    // A killed writer is started again and goes on writing.
    let writes = agent.proc.log().matches(&wrote_a).count();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid_a as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    agent.proc.wait_for("the files writer exited").await;
    let again = pid_in(&agent.proc.wait_for_nth(&started(&a), 2).await);
    assert_ne!(again, pid_a);
    agent.proc.wait_for_nth(&wrote_a, writes + 1).await;
    assert_eq!(
        spiffe_id(&a.join("current/svid.pem")),
        "spiffe://example.org/files-a"
    );
    assert!(
        !none.join("current").exists(),
        "files for a uid with no entry"
    );
    assert_eq!(std::fs::read_dir(&none).unwrap().count(), 0);

    // The writers stop with the agent.
    let pid_none = pid_in(&agent.proc.wait_for(&started(&none)).await);
    agent.stop().await;
    for pid in [again, pid_b, pid_none] {
        gone(pid).await;
    }
}

#[tokio::test]
async fn a_killed_agent_leaves_no_writer_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let (token, _) = server.join_token().await;
    let out = out_dir(dir.path(), "out", 65534, 0o755);
    let config = write_config(
        dir.path(),
        &format!("[[files]]\nuser = \"65534\"\ndir = \"{}\"\n", out.display()),
    );
    let mut agent = Agent::start_with(dir.path(), &server, &token, &["--config", &config]).await;
    let pid = pid_in(&agent.proc.wait_for("started a files writer").await);
    let agent_pid = agent.proc.pid().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(agent_pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // The kernel sends the orphan SIGTERM (PR_SET_PDEATHSIG).
    gone(pid).await;
}

#[tokio::test]
async fn bad_tables_and_unsafe_directories_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let open = out_dir(dir.path(), "open", 65534, 0o777);
    let theirs = out_dir(dir.path(), "theirs", 65533, 0o755);
    let fine = out_dir(dir.path(), "fine", 65534, 0o755);
    let table = |d: &Path, extra: &str| {
        format!(
            "[[files]]\nuser = \"65534\"\ndir = \"{}\"\n{extra}",
            d.display()
        )
    };
    let run_agent = |config: String, as_uid: Option<&'static str>| {
        let data = dir.path().join("data").display().to_string();
        let socket = dir.path().join("run/api.sock").display().to_string();
        let path = write_config(dir.path(), &config);
        async move {
            let mut args: Vec<String> = Vec::new();
            let program = match as_uid {
                Some(uid) => {
                    args.extend(
                        ["--reuid", uid, "--regid", uid, "--clear-groups"].map(String::from),
                    );
                    args.push(bin("oxid-agent").display().to_string());
                    PathBuf::from("setpriv")
                }
                None => bin("oxid-agent"),
            };
            args.extend(
                [
                    "run",
                    "--config",
                    &path,
                    "--data-dir",
                    &data,
                    "--socket-path",
                    &socket,
                ]
                .map(String::from),
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            oxid_e2e::run(&program, &args).await
        }
    };
    for (config, says) in [
        (table(&open, ""), "group or others may write to it"),
        (table(&theirs, ""), "owned by uid 65533"),
        (table(&dir.path().join("missing"), ""), "no such directory"),
        (table(&fine, "cmd = \"nginx\"\n"), "unknown field `cmd`"),
        (table(&fine, "user = \"0\"\n"), "duplicate key"),
        (
            format!("{}{}", table(&fine, ""), table(&fine, "")),
            "is also table #1's",
        ),
    ] {
        let (code, _, err) = run_agent(config.clone(), None).await;
        assert_ne!(code, 0, "{config}");
        assert!(err.contains(says), "{config}: {err}");
    }
    // Not root: it cannot start writers as other users, and says so.
    let (code, _, err) = run_agent(table(&fine, ""), Some("65534")).await;
    assert_ne!(code, 0);
    assert!(err.contains("the agent must run as root"), "{err}");
    // `validate` refuses a bad table as well.
    let path = write_config(dir.path(), &table(&fine, "key_mode = \"0604\"\n"));
    let (code, _, err) = oxid_e2e::run(&bin("oxid-agent"), &["validate", "--config", &path]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("lets every user read the private key"),
        "{err}"
    );
}
