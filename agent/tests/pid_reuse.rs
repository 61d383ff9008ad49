//! PID reuse, staged for real: a process connects to the Workload API, hands
//! its connection to another process and exits; a process with an entry then
//! gets the same PID. The connection must not be attested as that process.
//!
//! The kernel reports the *connecting* process in `SO_PEERCRED`; reading
//! `/proc/<pid>` later, at call time, reads whoever holds that PID now. This
//! test reproduces that attack (it failed before the agent pinned the peer
//! at accept time) and needs root: it steers the next PID through
//! `/proc/sys/kernel/ns_last_pid`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Mutex;

use common::{Harness, eventually, my_uid};
use hyper_util::rt::TokioIo;
use oxid_agent::workload::with_header;
use oxid_proto::workload as pb;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tonic::Code;
use tonic::transport::{Endpoint, Uri};

/// Connects to `socket` from a separate process that then exits, and returns
/// the connection (passed over `SCM_RIGHTS`) with that process's PID. The
/// process is reaped, so its PID is free again.
fn connection_from_a_dead_process(socket: &Path, scratch: &Path) -> (OwnedFd, u32) {
    let pass = scratch.join("pass.sock");
    let _ = std::fs::remove_file(&pass);
    let listener = std::os::unix::net::UnixListener::bind(&pass).unwrap();
    // Python's socket module passes descriptors without any native code here.
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  p = socket.socket(socket.AF_UNIX)\n\
                  p.connect(sys.argv[2])\n\
                  socket.send_fds(p, [b'x'], [s.fileno()])\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(socket)
        .arg(&pass)
        .spawn()
        .expect("python3 is required (apt-get install -y python3)");
    let pid = child.id();
    let (passed, _) = listener.accept().unwrap();
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &passed,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )
    .unwrap();
    let fd = control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("a descriptor was passed");
    assert!(child.wait().unwrap().success());
    (fd, pid)
}

/// Starts `program` so that it gets PID `pid`, by setting the last PID
/// handed out just below it. Other processes and threads fork meanwhile, so
/// it may take a few tries.
fn spawn_with_pid(program: &Path, pid: u32) -> Child {
    const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
    for _ in 0..200 {
        std::fs::write(LAST_PID, (pid - 1).to_string()).unwrap_or_else(|e| {
            panic!("{LAST_PID}: {e}: this test stages PID reuse and must run as root (CI does)")
        });
        let mut child = Command::new(program).arg("60").spawn().unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start a process with PID {pid}");
}

/// A gRPC channel over an already connected socket.
async fn channel_over(fd: OwnedFd) -> tonic::transport::Channel {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).unwrap();
    let once = Mutex::new(Some(stream));
    Endpoint::try_from("http://uds.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = once.lock().unwrap().take();
            async move {
                let stream = stream.ok_or_else(|| std::io::Error::other("used once"))?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(stream)?))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pid_does_not_inherit_a_dead_callers_connection() {
    let h = Harness::start().await;
    // The victim: a program with an entry by executable (and uid).
    let scratch = tempfile::tempdir().unwrap();
    let victim = scratch.path().canonicalize().unwrap().join("victim");
    std::fs::copy("/bin/sleep", &victim).unwrap();
    h.create_entry(
        "spiffe://example.org/victim",
        &[
            &format!("unix:path:{}", victim.display()),
            &format!("unix:uid:{}", my_uid()),
        ],
    )
    .await;
    // Wait until the agent serves: a first well-formed caller is answered
    // (with no identity, as the test process matches no entry).
    let client = h.client().await;
    eventually(|| async {
        match client.fetch_x509_svid().await {
            Err(e) if e.to_string().contains("no identity issued") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let (fd, pid) = connection_from_a_dead_process(&h.workload_socket(), scratch.path());
    let mut victim_process = spawn_with_pid(&victim, pid);
    let mut raw =
        pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel_over(fd).await);
    let outcome = match raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
    {
        Ok(stream) => stream.into_inner().message().await,
        Err(e) => Err(e),
    };
    let _ = victim_process.kill();
    let _ = victim_process.wait();
    match outcome {
        Err(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("exited"), "{status:?}");
        }
        Ok(answer) => panic!(
            "a connection of an exited process was attested as the process that reused its \
             PID: {:?}",
            answer.map(|a| a.svids.into_iter().map(|s| s.spiffe_id).collect::<Vec<_>>())
        ),
    }
}
