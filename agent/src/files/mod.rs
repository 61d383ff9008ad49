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

pub mod config;
pub mod supervise;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use oxid_proto::workload as pb;
use rustix::process::{Pid, Signal};
use tokio::process::Child;

pub use self::writer::{Contents, Layout, Names, WriteError, Writer};
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

/// The contents of `svid` (from `resp`) as files, with the federated
/// bundles if `federated`.
fn contents(
    resp: &pb::X509svidResponse,
    svid: &pb::X509svid,
    federated: bool,
) -> Result<Contents, AgentError> {
    let pem = |der: &[u8]| -> Result<String, AgentError> {
        let certs = oxid_pki::x509::split_der_certs(der)
            .map_err(|e| AgentError::WorkloadApi(e.to_string()))?;
        Ok(oxid_pki::x509::certs_to_pem(&certs))
    };
    let mut federated: Vec<_> = resp
        .federated_bundles
        .iter()
        .filter(|_| federated)
        .collect();
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
        jwt_svids: Vec::new(),
        jwt_bundle: None,
    })
}

/// When to fetch the JWT-SVIDs again: at half their life (the earliest of
/// them), as a workload library would, so a reader never holds one in its
/// last half. A token whose times cannot be read is fetched again in 30 s.
fn jwt_refresh_in(tokens: &[zeroize::Zeroizing<String>], now_unix: u64) -> Duration {
    let half_life = |token: &str| -> Option<u64> {
        use base64::Engine as _;
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let (iat, exp) = (claims.get("iat")?.as_u64()?, claims.get("exp")?.as_u64()?);
        Some(iat + exp.saturating_sub(iat) / 2)
    };
    tokens
        .iter()
        .map(|t| {
            half_life(t).map_or(JWT_RETRY, |at| {
                Duration::from_secs(at.saturating_sub(now_unix))
            })
        })
        .min()
        .map_or(JWT_RETRY, |d| d.max(Duration::from_secs(1)))
}

const JWT_RETRY: Duration = Duration::from_secs(30);

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `watch` needs from the Workload API client in `api_cli`.
pub trait Source {
    /// Opens a FetchX509SVID stream.
    fn open(
        &self,
    ) -> impl Future<Output = Result<tonic::Streaming<pb::X509svidResponse>, AgentError>> + Send;

    /// A JWT-SVID of `spiffe_id` for `audience`.
    fn jwt_svid(
        &self,
        spiffe_id: &str,
        audience: &str,
    ) -> impl Future<Output = Result<String, AgentError>> + Send;

    /// The JWT bundle (JWKS) of `trust_domain`.
    fn jwt_bundle(
        &self,
        trust_domain: &str,
    ) -> impl Future<Output = Result<String, AgentError>> + Send;
}

/// Adds the JWT-SVIDs for `audiences` and the JWT bundle to `contents`.
async fn add_jwts(
    source: &impl Source,
    contents: &mut Contents,
    spiffe_id: &str,
    audiences: &[String],
) -> Result<(), AgentError> {
    let trust_domain = spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let mut tokens = Vec::with_capacity(audiences.len());
    for audience in audiences {
        tokens.push(zeroize::Zeroizing::new(
            source.jwt_svid(spiffe_id, audience).await?,
        ));
    }
    contents.jwt_svids = tokens;
    contents.jwt_bundle = Some(source.jwt_bundle(trust_domain).await?);
    Ok(())
}

/// Runs until stopped: writes every update from `source` through `writer`
/// and announces it. Returns the exit code (the child's, with
/// [`Notify::Child`]).
pub async fn watch(
    source: impl Source,
    writer: Writer,
    choice: Choice,
    notify: Notify,
    say: impl Fn(&str),
) -> Result<i32, AgentError> {
    let mut control = Control::new()?;
    let mut files = Files {
        writer,
        spiffe_id: choice.spiffe_id,
        audiences: choice.jwt_audiences,
        federated: choice.federated_bundles,
        last: None,
        last_id: String::new(),
        jwt_due: tokio::time::Instant::now() + Duration::from_secs(86_400 * 365),
    };
    let mut delay = RETRY_FIRST;
    loop {
        let opened = tokio::select! {
            r = source.open() => r,
            stop = control.interrupted() => return Ok(control.finish(stop).await),
        };
        match opened {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    () = tokio::time::sleep_until(files.jwt_due), if files.wants_jwts() => {
                        if files.refresh_jwts(&source, &say).await {
                            announce(&notify, &mut control.child, false, &say).await?;
                        }
                        continue;
                    }
                    stop = control.interrupted() => return Ok(control.finish(stop).await),
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
                match files.update(&source, &resp, &say).await? {
                    Written::First => announce(&notify, &mut control.child, true, &say).await?,
                    Written::Again => announce(&notify, &mut control.child, false, &say).await?,
                    Written::Nothing => {}
                    Written::Reconnect => break,
                }
            },
            Err(e) => say(&format!(
                "waiting for the Workload API: {e}; retrying in {delay:?}"
            )),
        }
        if let Some(stop) = control.pause(delay).await {
            return Ok(control.finish(stop).await);
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// The child, if any, and the signals that stop the watcher.
struct Control {
    child: Option<Child>,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Why the watcher stops.
enum Stop {
    /// The child exited with this code.
    Exited(i32),
    /// The watcher got this signal.
    Signalled(Signal),
}

impl Control {
    fn new() -> Result<Self, AgentError> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| signal(kind).map_err(|e| AgentError::Internal(e.to_string()));
        Ok(Self {
            child: None,
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
        })
    }

    /// Completes when the child exits or SIGTERM or SIGINT arrives.
    async fn interrupted(&mut self) -> Stop {
        tokio::select! {
            code = wait_child(&mut self.child) => Stop::Exited(code),
            _ = self.term.recv() => Stop::Signalled(Signal::TERM),
            _ = self.int.recv() => Stop::Signalled(Signal::INT),
        }
    }

    /// Sleeps for `delay` unless interrupted first.
    async fn pause(&mut self, delay: Duration) -> Option<Stop> {
        tokio::select! {
            () = tokio::time::sleep(delay) => None,
            stop = self.interrupted() => Some(stop),
        }
    }

    /// The exit code for `stop`: a signal is passed on to the child, whose
    /// status then is the code; without a child the watcher exits 0.
    async fn finish(&mut self, stop: Stop) -> i32 {
        match stop {
            Stop::Exited(code) => code,
            Stop::Signalled(signal) => stop_child(&mut self.child, signal).await,
        }
    }
}

/// What an update did to the files.
enum Written {
    /// The first generation: start the child.
    First,
    /// A later generation.
    Again,
    /// Nothing changed, or the update could not be written.
    Nothing,
    /// The update needs something the agent did not give: reconnect.
    Reconnect,
}

/// What the files hold besides the X509-SVID and its bundle.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// Which SVID, when the process has several (default: the first).
    pub spiffe_id: Option<String>,
    /// JWT-SVIDs to keep, one per audience.
    pub jwt_audiences: Vec<String>,
    /// Whether the federated trust domains' bundles are written.
    pub federated_bundles: bool,
}

/// The files' state between updates.
struct Files {
    writer: Writer,
    spiffe_id: Option<String>,
    audiences: Vec<String>,
    federated: bool,
    /// What the current generation holds.
    last: Option<Contents>,
    /// The SPIFFE ID of the SVID in `last`.
    last_id: String,
    /// When the JWT-SVIDs in `last` are due to be fetched again.
    jwt_due: tokio::time::Instant,
}

impl Files {
    fn wants_jwts(&self) -> bool {
        self.last.is_some() && !self.audiences.is_empty()
    }

    /// Writes the SVID of `resp` this watcher keeps, if it changed.
    async fn update(
        &mut self,
        source: &impl Source,
        resp: &pb::X509svidResponse,
        say: &impl Fn(&str),
    ) -> Result<Written, AgentError> {
        let chosen = match &self.spiffe_id {
            Some(id) => resp.svids.iter().find(|s| &s.spiffe_id == id),
            None => resp.svids.first(),
        };
        let Some(svid) = chosen else {
            say(&format!(
                "no SVID for {} in this update; the files stay as they are",
                self.spiffe_id.as_deref().unwrap_or("this process")
            ));
            return Ok(Written::Nothing);
        };
        let mut new = contents(resp, svid, self.federated)?;
        if self.last.as_ref().is_some_and(|l| same_x509(l, &new)) {
            return Ok(Written::Nothing);
        }
        if !self.audiences.is_empty() {
            if let Err(e) = add_jwts(source, &mut new, &svid.spiffe_id, &self.audiences).await {
                // All the files are written together, or none.
                say(&format!(
                    "cannot fetch the JWT-SVIDs: {e}; the last files stay current"
                ));
                return Ok(Written::Reconnect);
            }
            self.jwt_due = tokio::time::Instant::now() + jwt_refresh_in(&new.jwt_svids, now_unix());
        }
        if !publish(&mut self.writer, &new, &svid.spiffe_id, say) {
            return Ok(Written::Nothing);
        }
        let first = self.last.is_none();
        self.last = Some(new);
        self.last_id.clone_from(&svid.spiffe_id);
        Ok(if first {
            Written::First
        } else {
            Written::Again
        })
    }

    /// The same X.509 files with new JWT-SVIDs; whether a generation was
    /// written.
    async fn refresh_jwts(&mut self, source: &impl Source, say: &impl Fn(&str)) -> bool {
        let Some(mut again) = self.last.clone() else {
            return false;
        };
        if let Err(e) = add_jwts(source, &mut again, &self.last_id, &self.audiences).await {
            say(&format!(
                "cannot refresh the JWT-SVIDs: {e}; retrying in {JWT_RETRY:?}"
            ));
            self.jwt_due = tokio::time::Instant::now() + JWT_RETRY;
            return false;
        }
        self.jwt_due = tokio::time::Instant::now() + jwt_refresh_in(&again.jwt_svids, now_unix());
        if !publish(&mut self.writer, &again, &self.last_id, say) {
            return false;
        }
        self.last = Some(again);
        true
    }
}

/// Whether `a` and `b` hold the same X.509 files (JWT-SVIDs aside).
fn same_x509(a: &Contents, b: &Contents) -> bool {
    a.chain_pem == b.chain_pem
        && a.key_pem == b.key_pem
        && a.bundle_pem == b.bundle_pem
        && a.federated_pem == b.federated_pem
}

/// Writes `contents` as the new generation; false (the last generation
/// stays current) if that failed.
fn publish(writer: &mut Writer, contents: &Contents, spiffe_id: &str, say: &impl Fn(&str)) -> bool {
    match writer.write(contents) {
        Ok(path) => {
            say(&format!(
                "wrote {} for {spiffe_id} into {}",
                path.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                path.parent()
                    .map_or_else(String::new, |p| p.display().to_string()),
            ));
            true
        }
        Err(e) => {
            say(&format!("error: {e}; the last files stay current"));
            false
        }
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
                .env_remove(supervise::PARENT_ENV)
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
                    .env_remove(supervise::PARENT_ENV)
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
async fn stop_child(child: &mut Option<Child>, signal: Signal) -> i32 {
    let Some(c) = child else { return 0 };
    if let Some(pid) = c.id().and_then(pid_of) {
        let _ = rustix::process::kill_process(pid, signal);
    }
    exit_code(c.wait().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federated_bundles_are_written_unless_left_out() {
        let root = |td: &str| {
            let key = oxid_pki::KeyPair::generate(oxid_pki::KeyAlgorithm::EcdsaP256).unwrap();
            let ca = oxid_pki::x509::X509Ca::new_root(
                oxid_pki::TrustDomain::new(td).unwrap(),
                key,
                Duration::from_secs(3600),
                std::time::SystemTime::now(),
            )
            .unwrap();
            ca.cert().to_vec()
        };
        let own = root("example.org");
        let svid = pb::X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            x509_svid: own.clone(),
            x509_svid_key: vec![1, 2, 3],
            bundle: own,
            ..pb::X509svid::default()
        };
        let resp = pb::X509svidResponse {
            svids: vec![svid.clone()],
            federated_bundles: [
                ("spiffe://b.org".to_owned(), root("b.org")),
                ("spiffe://a.org".to_owned(), root("a.org")),
            ]
            .into(),
            ..pb::X509svidResponse::default()
        };
        let with = contents(&resp, &svid, true).unwrap();
        assert_eq!(with.federated_pem.len(), 2);
        assert!(
            with.federated_pem
                .iter()
                .all(|p| p.contains("BEGIN CERTIFICATE"))
        );
        assert!(
            contents(&resp, &svid, false)
                .unwrap()
                .federated_pem
                .is_empty()
        );
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("HUP").unwrap(), Signal::HUP);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), Signal::USR1);
        assert_eq!(parse_signal("term").unwrap(), Signal::TERM);
        assert!(parse_signal("KILL").is_err());
        assert!(parse_signal("").is_err());
    }

    #[test]
    fn jwt_svids_are_fetched_again_at_half_life() {
        use base64::Engine as _;
        let token = |iat: u64, exp: u64| {
            let claims = format!(r#"{{"iat":{iat},"exp":{exp},"sub":"spiffe://td/x"}}"#);
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims);
            zeroize::Zeroizing::new(format!("e30.{b64}.sig"))
        };
        let both = [token(1000, 1300), token(1000, 1100)];
        assert_eq!(jwt_refresh_in(&both, 1000), Duration::from_secs(50));
        assert_eq!(jwt_refresh_in(&both[..1], 1100), Duration::from_secs(50));
        // Past half-life already: soon, not at once in a loop.
        assert_eq!(jwt_refresh_in(&both, 1090), Duration::from_secs(1));
        let junk = [zeroize::Zeroizing::new("not-a-jwt".to_owned())];
        assert_eq!(jwt_refresh_in(&junk, 0), JWT_RETRY);
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
