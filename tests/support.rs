//! Runs the real oxid binaries as processes for the end-to-end tests: the
//! server, the agent, the operator CLI and the example workloads, each on a
//! temporary directory, with their output collected so a test can wait for
//! an event ("ready", "restored the agent identity") instead of sleeping.
//!
//! The binaries are the ones cargo built next to this test, in
//! `target/<profile>/`. `cargo test --workspace` builds the server and agent
//! binaries; `scripts/test` also runs `cargo build --workspace --bins` so the
//! example programs are there too.

// A test harness reports failure by panicking, with the process logs.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How long any single awaited event may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// The path of a workspace binary built alongside this test (or alongside
/// `oxid-bench`, which lives in `target/<profile>/` itself).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .map(|d| {
            if d.ends_with("deps") {
                d.parent().unwrap_or(d)
            } else {
                d
            }
        })
        .expect("executable in target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` \
         (./scripts/test does)",
        path.display()
    );
    path
}

/// A running process whose stdout and stderr lines are kept.
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Bumped on every new line and when output ends.
    changed: watch::Receiver<usize>,
}

impl Proc {
    /// Starts `cmd`, collecting its output.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = watch::channel(0);
        let tx = Arc::new(tx);
        collect(child.stdout.take(), lines.clone(), tx.clone());
        collect(child.stderr.take(), lines.clone(), tx);
        Self {
            name: name.to_owned(),
            child,
            lines,
            changed,
        }
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line containing `pattern`, waiting for it to be printed.
    pub async fn wait_for(&mut self, pattern: &str) -> String {
        self.wait_for_nth(pattern, 1).await
    }

    /// The `n`th line (from 1) containing `pattern`, waiting for it.
    pub async fn wait_for_nth(&mut self, pattern: &str, n: usize) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(pattern))
                .nth(n - 1)
            {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Output may still be draining; one last look after it ends.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.changed.changed()).await;
                if let Some(line) = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(pattern))
                {
                    return line.clone();
                }
                panic!(
                    "{} exited ({status}) before printing {pattern:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                // Output closed: the exit check above reports it next round.
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => panic!(
                    "{} did not print {pattern:?} within {WAIT:?}:\n{}",
                    self.name,
                    self.log()
                ),
            }
        }
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit:\n{}", self.name, self.log()))
            .ok()
            .and_then(|s| s.code())
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let pid =
                rustix::process::Pid::from_raw(pid as i32).expect("a running child has a pid");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} ignored SIGTERM:\n{}", self.name, self.log()))
            .unwrap();
        assert!(
            status.success(),
            "{} stopped with {status}:\n{}",
            self.name,
            self.log()
        );
    }
}

fn collect(
    pipe: Option<impl AsyncRead + Unpin + Send + 'static>,
    lines: Arc<Mutex<Vec<String>>>,
    tx: Arc<watch::Sender<usize>>,
) {
    let Some(pipe) = pipe else { return };
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.lock().unwrap().push(line);
            tx.send_modify(|n| *n += 1);
        }
        tx.send_modify(|n| *n += 1);
    });
}

/// Runs a command to completion: (exit code, stdout, stderr).
pub async fn run(program: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(WAIT, Command::new(program).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} hung", program.display()))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `oxid-server` on a temporary data directory.
pub struct Server {
    /// The server process, to read its log.
    pub proc: Proc,
    /// Where the agent API listens (fixed across restarts).
    pub address: String,
    /// The admin socket the CLI talks to.
    pub admin_socket: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
}

impl Server {
    /// Starts a server for `example.org` under `dir`.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, "", "[ca]\nttl = \"6h\"\nagent_svid_ttl = \"10m\"\n").await
    }

    /// Starts a server for `example.org` under `dir` with `top` (top-level
    /// keys) and `tables` (from `[ca]` on) as its configuration.
    pub async fn start_with(dir: &Path, top: &str, tables: &str) -> Self {
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!("trust_domain = \"example.org\"\n{top}\n{tables}"),
        )
        .unwrap();
        let admin_socket = dir.join("server-run/admin.sock");
        let data_dir = dir.join("server");
        let (proc, address) = Self::launch(&config, &data_dir, &admin_socket, "127.0.0.1:0").await;
        Self {
            proc,
            address,
            admin_socket,
            config,
            data_dir,
        }
    }

    async fn launch(config: &Path, data_dir: &Path, admin: &Path, address: &str) -> (Proc, String) {
        let mut cmd = Command::new(bin("oxid-server"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--socket-path")
            .arg(admin)
            .args(["--bind-address", address]);
        let mut proc = Proc::spawn("oxid-server", cmd);
        let ready = proc.wait_for("oxid-server ready").await;
        let address = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("agent_api="))
            .unwrap_or_else(|| panic!("no agent_api= in {ready:?}"))
            .to_owned();
        (proc, address)
    }

    /// Starts the server process again on the same data directory and agent
    /// API address (after [`Server::stop`]).
    pub async fn restart(&mut self) {
        let (proc, _) = Self::launch(
            &self.config,
            &self.data_dir,
            &self.admin_socket,
            &self.address,
        )
        .await;
        self.proc = proc;
    }

    /// Stops the server with SIGTERM.
    pub async fn stop(&mut self) {
        self.proc.stop().await;
    }

    /// Runs `oxid-server <args> --output json` against this server; its JSON
    /// output, or a panic with stderr if it failed.
    pub async fn cli(&self, args: &[&str]) -> serde_json::Value {
        let admin = self.admin_socket.display().to_string();
        let mut all = args.to_vec();
        all.extend(["--socket-path", &admin, "--output", "json"]);
        let (code, out, err) = run(&bin("oxid-server"), &all).await;
        assert_eq!(code, 0, "oxid-server {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// A join token and the agent ID it attests as.
    pub async fn join_token(&self) -> (String, String) {
        let token = self.cli(&["token", "generate"]).await;
        let id = token["id"].as_str().unwrap();
        (
            token["token"].as_str().unwrap().to_owned(),
            format!("spiffe://example.org/oxid/agent/join_token/{id}"),
        )
    }

    /// Creates an entry parented on `parent`; its entry ID.
    pub async fn create_entry(&self, spiffe_id: &str, parent: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent,
        ];
        args.extend(extra);
        let entry = self.cli(&args).await;
        entry["results"][0]["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no entry id in {entry}"))
            .to_owned()
    }
}

/// A running `oxid-agent` on a temporary data directory.
pub struct Agent {
    /// The agent process, to read its log.
    pub proc: Proc,
    /// The Workload API socket.
    pub socket: PathBuf,
    data_dir: PathBuf,
    bundle: PathBuf,
    /// Extra `run` flags, kept for restarts.
    extra: Vec<String>,
}

impl Agent {
    /// Attests with `token` and starts serving the Workload API.
    pub async fn start(dir: &Path, server: &Server, token: &str) -> Self {
        Self::start_with(dir, server, token, &[]).await
    }

    /// [`Agent::start`] with `extra` flags for `oxid-agent run`.
    pub async fn start_with(dir: &Path, server: &Server, token: &str, extra: &[&str]) -> Self {
        let bundle = dir.join("bundle.pem");
        let admin = server.admin_socket.display().to_string();
        let (code, pem, err) = run(
            &bin("oxid-server"),
            &["bundle", "show", "--socket-path", &admin],
        )
        .await;
        assert_eq!(code, 0, "bundle show: {err}");
        std::fs::write(&bundle, pem).unwrap();
        let socket = dir.join("agent-run/api.sock");
        let data_dir = dir.join("agent");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let proc = Self::launch(server, &bundle, &data_dir, &socket, Some(token), &extra).await;
        Self {
            proc,
            socket,
            data_dir,
            bundle,
            extra,
        }
    }

    /// Starts the agent process again (after [`Agent::stop`]), with the
    /// identity it saved and no token.
    pub async fn restart(&mut self, server: &Server) {
        self.proc = Self::launch(
            server,
            &self.bundle,
            &self.data_dir,
            &self.socket,
            None,
            &self.extra,
        )
        .await;
        self.proc.wait_for("restored the agent identity").await;
    }

    async fn launch(
        server: &Server,
        bundle: &Path,
        data_dir: &Path,
        socket: &Path,
        token: Option<&str>,
        extra: &[String],
    ) -> Proc {
        let mut cmd = Command::new(bin("oxid-agent"));
        cmd.arg("run")
            .args(["--server-address", &server.address])
            .arg("--trust-bundle")
            .arg(bundle)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--socket-path")
            .arg(socket);
        if let Some(token) = token {
            cmd.args(["--join-token", token]);
        }
        cmd.args(extra);
        let mut proc = Proc::spawn("oxid-agent", cmd);
        proc.wait_for("serving the Workload API").await;
        proc
    }

    /// `SPIFFE_ENDPOINT_SOCKET` for this agent.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A command for `program` with `SPIFFE_ENDPOINT_SOCKET` set.
    pub fn workload(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SPIFFE_ENDPOINT_SOCKET", self.endpoint());
        cmd
    }

    /// Stops the agent with SIGTERM.
    pub async fn stop(&mut self) {
        self.proc.stop().await;
    }
}

/// The one descriptor a peer passed over `from` with `SCM_RIGHTS` (the
/// tests' attackers hand their Workload API connection on this way).
pub fn receive_fd(from: &std::os::unix::net::UnixStream) -> std::os::fd::OwnedFd {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut byte = [0u8; 1];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        from,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )
    .expect("recvmsg on the control socket");
    control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("a descriptor was passed")
}
