//! `oxid-agent api watch --write DIR`: a Workload API client that keeps
//! SVIDs on disk for programs that speak no SPIFFE (nginx, PostgreSQL,
//! anything reading PEM files), and tells them, by a signal or by running
//! them as its child, when the files change.
//!
//! It is attested like any workload. Its executable is the agent binary,
//! so only `unix:uid`/`unix:gid` selectors tell one user's watcher from
//! another's. It never deletes good files: when the agent is restarted or
//! unreachable, it retries with backoff, and the last generation stays
//! current.

pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use oxid_proto::workload as pb;
use rustix::process::{Pid, Signal};
use tokio::process::Child;

pub use self::writer::{Contents, Layout, WriteError, Writer};
use crate::AgentError;

/// Where a change is announced.
#[derive(Debug, Clone)]
pub enum Notify {
    /// Nobody.
    None,
    /// `signal` to the process whose PID is in `pid_file`, read anew each
    /// time (the program may have restarted).
    PidFile {
        /// The signal.
        signal: Signal,
        /// The file.
        pid_file: PathBuf,
    },
    /// Run `command` through `sh -c` and wait for it.
    Command(String),
    /// Run `argv` as a child once the first files are written, send it
    /// `signal` (if any) on each later update, forward SIGTERM and SIGINT
    /// to it, and exit with its status.
    Child {
        /// The program and its arguments.
        argv: Vec<String>,
        /// Sent on updates after the first.
        signal: Option<Signal>,
    },
}

/// Backoff between two attempts to reach the agent.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Parses a signal name (`HUP`, `SIGHUP`, `USR1`, ...).
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    Ok(match bare.to_ascii_uppercase().as_str() {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "TERM" => Signal::TERM,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "WINCH" => Signal::WINCH,
        _ => {
            return Err(format!(
                "signal {name:?}: expected HUP, INT, QUIT, TERM, USR1, USR2 or WINCH"
            ));
        }
    })
}

/// The contents of `svid` (from `resp`) as files.
fn contents(resp: &pb::X509svidResponse, svid: &pb::X509svid) -> Result<Contents, AgentError> {
    let pem = |der: &[u8]| -> Result<String, AgentError> {
        let certs = oxid_pki::x509::split_der_certs(der)
            .map_err(|e| AgentError::WorkloadApi(e.to_string()))?;
        Ok(oxid_pki::x509::certs_to_pem(&certs))
    };
    let mut federated: Vec<_> = resp.federated_bundles.iter().collect();
    federated.sort();
    Ok(Contents {
        chain_pem: pem(&svid.x509_svid)?,
        key_pem: zeroize::Zeroizing::new(oxid_pki::x509::pem_encode(
            "PRIVATE KEY",
            &svid.x509_svid_key,
        )),
        bundle_pem: pem(&svid.bundle)?,
        federated_pem: federated
            .into_iter()
            .map(|(_, der)| pem(der))
            .collect::<Result<_, _>>()?,
    })
}

/// What `watch` needs from the Workload API client in `api_cli`.
pub trait Source {
    /// Opens a FetchX509SVID stream.
    fn open(
        &self,
    ) -> impl Future<Output = Result<tonic::Streaming<pb::X509svidResponse>, AgentError>> + Send;
}

/// Runs until stopped: writes every update from `source` through `writer`
/// and announces it. Returns the exit code (the child's, with
/// [`Notify::Child`]).
pub async fn watch(
    source: impl Source,
    mut writer: Writer,
    spiffe_id: Option<String>,
    notify: Notify,
    say: impl Fn(&str),
) -> Result<i32, AgentError> {
    let mut child: Option<Child> = None;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let mut delay = RETRY_FIRST;
    let mut last: Option<Contents> = None;
    loop {
        let stream = tokio::select! {
            r = source.open() => r,
            code = wait_child(&mut child) => return Ok(code),
            _ = term.recv() => return stop(&mut child, Signal::TERM).await,
            _ = int.recv() => return stop(&mut child, Signal::INT).await,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                say(&format!(
                    "waiting for the Workload API: {e}; retrying in {delay:?}"
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    code = wait_child(&mut child) => return Ok(code),
                    _ = term.recv() => return stop(&mut child, Signal::TERM).await,
                    _ = int.recv() => return stop(&mut child, Signal::INT).await,
                }
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                code = wait_child(&mut child) => return Ok(code),
                _ = term.recv() => return stop(&mut child, Signal::TERM).await,
                _ = int.recv() => return stop(&mut child, Signal::INT).await,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    say("the Workload API stream ended; reconnecting");
                    break;
                }
                Err(status) => {
                    say(&format!(
                        "the Workload API stream failed: {} ({:?}); reconnecting",
                        status.message(),
                        status.code()
                    ));
                    break;
                }
            };
            delay = RETRY_FIRST;
            let chosen = match &spiffe_id {
                Some(id) => resp.svids.iter().find(|s| &s.spiffe_id == id),
                None => resp.svids.first(),
            };
            let Some(svid) = chosen else {
                say(&format!(
                    "no SVID for {} in this update; the files stay as they are",
                    spiffe_id.as_deref().unwrap_or("this process")
                ));
                continue;
            };
            let new = contents(&resp, svid)?;
            if last.as_ref() == Some(&new) {
                continue;
            }
            match writer.write(&new) {
                Ok(path) => say(&format!(
                    "wrote {} for {} into {}",
                    path.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    svid.spiffe_id,
                    path.parent()
                        .map_or_else(String::new, |p| p.display().to_string()),
                )),
                Err(e) => {
                    // The last good generation stays current.
                    say(&format!("error: {e}; the last files stay current"));
                    continue;
                }
            }
            let first = last.is_none();
            last = Some(new);
            announce(&notify, &mut child, first, &say).await?;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            code = wait_child(&mut child) => return Ok(code),
            _ = term.recv() => return stop(&mut child, Signal::TERM).await,
            _ = int.recv() => return stop(&mut child, Signal::INT).await,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Tells whoever `notify` names that the files changed.
async fn announce(
    notify: &Notify,
    child: &mut Option<Child>,
    first: bool,
    say: &impl Fn(&str),
) -> Result<(), AgentError> {
    match notify {
        Notify::None => {}
        Notify::PidFile { signal, pid_file } => match read_pid(pid_file) {
            Ok(pid) => {
                if let Err(e) = rustix::process::kill_process(pid, *signal) {
                    say(&format!("cannot signal pid {}: {e}", pid.as_raw_nonzero()));
                }
            }
            Err(e) => say(&format!("cannot signal: {e}")),
        },
        Notify::Command(command) => {
            match tokio::process::Command::new("sh")
                .args(["-c", command])
                .status()
                .await
            {
                Ok(s) if s.success() => {}
                Ok(s) => say(&format!("reload command {command:?} failed: {s}")),
                Err(e) => say(&format!("cannot run reload command {command:?}: {e}")),
            }
        }
        Notify::Child { argv, signal } => {
            if first {
                let (program, args) = argv
                    .split_first()
                    .ok_or_else(|| AgentError::Config("no command after --".into()))?;
                let spawned = tokio::process::Command::new(program)
                    .args(args)
                    .spawn()
                    .map_err(|e| AgentError::Config(format!("cannot run {program:?}: {e}")))?;
                *child = Some(spawned);
            } else if let (Some(signal), Some(pid)) =
                (signal, child.as_ref().and_then(Child::id).and_then(pid_of))
            {
                let _ = rustix::process::kill_process(pid, *signal);
            }
        }
    }
    Ok(())
}

fn pid_of(raw: u32) -> Option<Pid> {
    Pid::from_raw(i32::try_from(raw).ok()?)
}

fn read_pid(path: &std::path::Path) -> Result<Pid, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|n| *n > 1)
        .and_then(Pid::from_raw)
        .ok_or_else(|| format!("{}: no process ID in it", path.display()))
}

/// Completes with the child's exit code when there is a child and it
/// exits; never without one.
async fn wait_child(child: &mut Option<Child>) -> i32 {
    match child {
        Some(c) => exit_code(c.wait().await),
        None => std::future::pending().await,
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|n| 128 + n))
            .unwrap_or(1),
        Err(_) => 1,
    }
}

/// Forwards `signal` to the child and waits for it; without a child, the
/// watcher itself stops (exit 0).
async fn stop(child: &mut Option<Child>, signal: Signal) -> Result<i32, AgentError> {
    let Some(c) = child else { return Ok(0) };
    if let Some(pid) = c.id().and_then(pid_of) {
        let _ = rustix::process::kill_process(pid, signal);
    }
    Ok(exit_code(c.wait().await))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("HUP").unwrap(), Signal::HUP);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), Signal::USR1);
        assert_eq!(parse_signal("term").unwrap(), Signal::TERM);
        assert!(parse_signal("KILL").is_err());
        assert!(parse_signal("").is_err());
    }

    #[test]
    fn pid_files_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pid");
        for bad in ["", "abc", "1", "-5", "12 13"] {
            std::fs::write(&f, bad).unwrap();
            assert!(read_pid(&f).is_err(), "{bad:?}");
        }
        std::fs::write(&f, "4242\n").unwrap();
        assert_eq!(read_pid(&f).unwrap().as_raw_nonzero().get(), 4242);
    }
}
