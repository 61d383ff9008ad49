//! Exec after connect, staged with the real binaries as processes: a process
//! connects to the Workload API, hands its connection to another process
//! (this test, which then makes the calls) and `execve`s a trusted program.
//! The PID survives the exec, so `SO_PEERCRED` and the pidfd still name it;
//! the agent must still not hand the trusted program's SVID to whoever
//! holds the connection.
//!
//! Each variant failed before the agent pinned the executable at accept and
//! checked that the caller still holds its connection: the relayed call got
//! the trusted program's SVID and private key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use oxid_e2e::{Agent, Server, WAIT, receive_fd};
use oxid_proto::workload as pb;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

const TRUSTED_ID: &str = "spiffe://example.org/trusted";

/// Debian's Python, which any uid may run (a pyenv shim may not be).
const PYTHON: &str = "/usr/bin/python3";

/// The attacker: connects to the agent (with a descriptor that survives
/// `execve` if asked), hands the connection over, and execs the trusted
/// program once told to. Python's socket module passes descriptors without
/// native code here.
const ATTACKER: &str = "\
import os, socket, sys
agent, handoff, mode, program = sys.argv[1:5]
s = socket.socket(socket.AF_UNIX)
if mode == 'inherit':
    s.set_inheritable(True)
s.connect(agent)
p = socket.socket(socket.AF_UNIX)
p.connect(handoff)
socket.send_fds(p, [b'x'], [s.fileno()])
if p.recv(1) == b'x':
    os.execv(program, [program, '60'])
";

/// A server, an agent, and a trusted program (a copy of `sleep`) with an
/// entry for its path and for `uid`.
struct Stage {
    dir: tempfile::TempDir,
    server: Server,
    agent: Agent,
    agent_id: String,
    trusted: PathBuf,
}

impl Stage {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Other uids (65534) run programs and reach sockets under it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let server = Server::start(dir.path()).await;
        let (token, agent_id) = server.join_token().await;
        let agent = Agent::start(dir.path(), &server, &token).await;
        let trusted = dir.path().canonicalize().unwrap().join("trusted");
        std::fs::copy("/bin/sleep", &trusted).unwrap();
        std::fs::set_permissions(&trusted, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            dir,
            server,
            agent,
            agent_id,
            trusted,
        }
    }

    async fn entry(&self, spiffe_id: &str, selectors: &[String]) {
        let mut extra = Vec::new();
        for s in selectors {
            extra.extend(["--selector", s.as_str()]);
        }
        self.server
            .create_entry(spiffe_id, &self.agent_id, &extra)
            .await;
    }

    /// Stops (`STOP`) or resumes (`CONT`) the agent process.
    fn signal_agent(&self, signal: rustix::process::Signal) {
        let pid = self.agent.proc.pid().unwrap();
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Starts the attacker (as `uid`, if given) and returns it with the
    /// connection it made to the agent.
    async fn attacker(&self, mode: &str, uid: Option<u32>) -> (Attacker, OwnedFd) {
        let handoff = self.dir.path().join(format!("handoff-{mode}.sock"));
        let _ = std::fs::remove_file(&handoff);
        let listener = tokio::net::UnixListener::bind(&handoff).unwrap();
        std::fs::set_permissions(&handoff, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    PYTHON,
                ]);
                c
            }
            None => Command::new(PYTHON),
        };
        cmd.args(["-c", ATTACKER])
            .arg(&self.agent.socket)
            .arg(&handoff)
            .arg(mode)
            .arg(&self.trusted)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect(
            "/usr/bin/python3 and setpriv are required (apt-get install -y python3 util-linux)",
        );
        let control = tokio::select! {
            accepted = listener.accept() => accepted.unwrap().0.into_std().unwrap(),
            exit = child.wait() => panic!("the attacker ended before handing its connection over: {exit:?}"),
            () = tokio::time::sleep(WAIT) => panic!("the attacker never connected"),
        };
        control.set_nonblocking(false).unwrap();
        let fd = receive_fd(&control);
        let pid = child.id().unwrap();
        (
            Attacker {
                child,
                control,
                pid,
            },
            fd,
        )
    }
}

struct Attacker {
    child: Child,
    control: UnixStream,
    pid: u32,
}

impl Attacker {
    /// The attacker's executable as the kernel shows it.
    fn exe(&self) -> PathBuf {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).unwrap_or_default()
    }

    /// Tells the attacker to exec the trusted program, and waits until it has.
    async fn exec(&mut self, trusted: &Path) {
        use std::io::Write as _;
        self.control.write_all(b"x").unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.exe() != trusted {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the attacker never exec'd"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Tells the attacker to exit instead, and reaps it.
    async fn exit(&mut self) {
        self.control.shutdown(std::net::Shutdown::Both).unwrap();
        self.child.wait().await.unwrap();
    }
}

/// A Workload API client over an already connected socket.
async fn client_over(
    fd: OwnedFd,
) -> pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).unwrap();
    let once = Mutex::new(Some(stream));
    let channel = Endpoint::try_from("http://uds.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = once.lock().unwrap().take();
            async move {
                let stream = stream.ok_or_else(|| std::io::Error::other("used once"))?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(stream)?))
            }
        }))
        .await
        .unwrap();
    pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// The SPIFFE IDs a FetchX509SVID on `client` hands out, or its status.
async fn fetch(
    client: &mut pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel>,
) -> Result<Vec<String>, Status> {
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the agent answered")?
        .expect("a first message");
    Ok(first.svids.into_iter().map(|s| s.spiffe_id).collect())
}

fn assert_refused(outcome: Result<Vec<String>, Status>, because: &str) {
    match outcome {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            assert!(s.message().contains(because), "{s:?}");
        }
        Ok(ids) => panic!("the relayed call was served the identities {ids:?}"),
    }
}

fn uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The trusted program's entry: its path, with this test's uid (the
/// attacker's too), since an entry by executable alone is refused.
fn trusted_selectors(stage: &Stage, uid: u32) -> Vec<String> {
    vec![
        format!("unix:path:{}", stage.trusted.display()),
        format!("unix:uid:{uid}"),
    ]
}

/// Waits until `uid`'s own processes are served: the agent has the entry.
async fn wait_until_served(stage: &Stage) {
    let client = spiffe::WorkloadApiClient::connect_to(stage.agent.endpoint())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    // This test process is no trusted program: "no identity issued" once the
    // agent has synced.
    loop {
        match client.fetch_x509_svid().await {
            Err(e) if e.to_string().contains("no identity issued") => return,
            _ if tokio::time::Instant::now() > deadline => panic!("the agent never served"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_after_accept_is_refused() {
    let stage = Stage::start().await;
    stage
        .entry(TRUSTED_ID, &trusted_selectors(&stage, uid()))
        .await;
    wait_until_served(&stage).await;
    for mode in ["cloexec", "inherit"] {
        let (mut attacker, fd) = stage.attacker(mode, None).await;
        let mut client = client_over(fd).await;
        // Accepted and attested as what it is: Python, with no entry.
        assert_refused(fetch(&mut client).await, "no identity issued");
        attacker.exec(&stage.trusted).await;
        // With or without the socket inherited, it now runs another program
        // than the one pinned at accept.
        assert_refused(
            fetch(&mut client).await,
            "executed another program since it connected",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_before_accept_is_refused() {
    let stage = Stage::start().await;
    stage
        .entry(TRUSTED_ID, &trusted_selectors(&stage, uid()))
        .await;
    wait_until_served(&stage).await;
    // The agent is stopped, so the kernel completes the attacker's connect()
    // but nobody accepts it until the exec is done.
    stage.signal_agent(rustix::process::Signal::STOP);
    let (mut attacker, fd) = stage.attacker("cloexec", None).await;
    attacker.exec(&stage.trusted).await;
    stage.signal_agent(rustix::process::Signal::CONT);
    let mut client = client_over(fd).await;
    // At accept it already ran the trusted program, but the program does
    // not hold the connection: the process it was handed to does.
    assert_refused(fetch(&mut client).await, "no longer holds its connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_inherited_before_accept_gets_only_its_own_uids_entries() {
    // What no check can see: the socket survives the exec, which happened
    // before the agent accepted. The uid in every entry bounds it: another
    // uid gets nothing of the trusted program's, only what its own uid is
    // registered for.
    let stage = Stage::start().await;
    const NOBODY: u32 = 65534;
    stage
        .entry(TRUSTED_ID, &trusted_selectors(&stage, uid()))
        .await;
    let nobody_id = "spiffe://example.org/trusted-as-nobody";
    stage
        .entry(nobody_id, &trusted_selectors(&stage, NOBODY))
        .await;
    wait_until_served(&stage).await;
    stage.signal_agent(rustix::process::Signal::STOP);
    let (mut attacker, fd) = stage.attacker("inherit", Some(NOBODY)).await;
    attacker.exec(&stage.trusted).await;
    stage.signal_agent(rustix::process::Signal::CONT);
    let mut client = client_over(fd).await;
    // Until the agent has both entries, the answer is "no identity issued".
    let deadline = tokio::time::Instant::now() + WAIT;
    let served = loop {
        match fetch(&mut client).await {
            Err(s) if s.message() == "no identity issued" => {
                assert!(tokio::time::Instant::now() < deadline, "never served");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(served, [nobody_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_when_their_process_execs_or_exits() {
    let stage = Stage::start().await;
    wait_until_served(&stage).await;
    for how in ["exec", "exit"] {
        let (mut attacker, fd) = stage.attacker("cloexec", None).await;
        // The attacker runs Python with an entry of its own.
        let python = attacker.exe();
        let selectors = vec![
            format!("unix:path:{}", python.display()),
            format!("unix:uid:{}", uid()),
        ];
        stage
            .entry(&format!("spiffe://example.org/python-{how}"), &selectors)
            .await;
        let mut client = client_over(fd).await;
        // Served, with its entry, once the agent has it (the first round's
        // entries match this Python too, and may come first).
        let mine = format!("spiffe://example.org/python-{how}");
        let mut stream = tokio::time::timeout(WAIT, async {
            loop {
                let opened = client
                    .fetch_x509svid(with_header(pb::X509svidRequest {}))
                    .await;
                let mut stream = match opened {
                    Ok(s) => s.into_inner(),
                    // Not synced to the agent yet.
                    Err(s) if s.message() == "no identity issued" => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(s) => panic!("{s:?}"),
                };
                loop {
                    let m = stream.message().await.unwrap().unwrap();
                    if m.svids.iter().any(|s| s.spiffe_id == mine) {
                        return stream;
                    }
                }
            }
        })
        .await
        .expect("the stream carried the new entry");
        match how {
            "exec" => attacker.exec(&stage.trusted).await,
            _ => attacker.exit().await,
        }
        // A change the stream would push: another entry for the same selectors.
        stage
            .entry(&format!("spiffe://example.org/python-{how}-2"), &selectors)
            .await;
        let next = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("the stream moved");
        let expected = if how == "exec" {
            "executed another program"
        } else {
            "exited"
        };
        match next {
            Err(s) => {
                assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
                assert!(s.message().contains(expected), "{s:?}");
            }
            Ok(m) => panic!("the stream pushed to a caller that {how}ed: {m:?}"),
        }
    }
}
