//! The agent's `[[files]]` writers: one child per table, the agent's own
//! binary running `api watch --write DIR` as the table's user and group
//! (supplementary groups cleared). The agent does not write the files
//! itself: a writer is attested from the socket like any workload of its
//! user, so it gets that user's SVIDs and no others, and the files are
//! written with that user's rights only. A writer that exits is started
//! again with backoff; on the agent's stop each gets SIGTERM.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::watch;

use super::config::FilesTable;
use crate::AgentError;

/// Set in a writer's environment to the agent's PID: the writer asks the
/// kernel for SIGTERM when the agent dies, so a killed agent leaves no
/// writer behind to race the next agent's writer on the same directory.
pub const PARENT_ENV: &str = "OXID_FILES_PARENT_PID";

/// Backoff between restarts of a writer that exited.
const RESTART_FIRST: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A writer that ran this long before exiting is restarted at once
/// (after [`RESTART_FIRST`]), not after the grown backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// How long a writer has to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why the writers cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// Only root may start processes as other users.
    #[error(
        "[[files]] for user {user:?}: the agent must run as root to start writers as other \
         users (it runs as uid {euid}); remove the table, or run `oxid-agent api watch \
         --write {dir}` as that user yourself"
    )]
    NotRoot {
        /// The table's user.
        user: String,
        /// The agent's uid.
        euid: u32,
        /// The table's directory.
        dir: String,
    },
    /// The directory is not one the writer could use.
    #[error("[[files]] for user {user:?}: {source}")]
    Directory {
        /// The table's user.
        user: String,
        /// What is wrong.
        source: super::WriteError,
    },
    /// The agent's own executable cannot be found.
    #[error("[[files]]: cannot find the agent's own executable to run writers: {0}")]
    Executable(std::io::Error),
}

impl From<SuperviseError> for AgentError {
    fn from(e: SuperviseError) -> Self {
        AgentError::Config(e.to_string())
    }
}

/// The writers' tables, checked against this host; made before the agent
/// contacts the server, so a refusal spends nothing.
#[derive(Debug)]
pub struct Writers {
    exe: PathBuf,
    tables: Vec<FilesTable>,
}

impl Writers {
    /// Checks that the agent may start each table's writer (it is root)
    /// and that each directory is one the writer would accept.
    pub fn check(tables: &[FilesTable]) -> Result<Option<Self>, SuperviseError> {
        if tables.is_empty() {
            return Ok(None);
        }
        let euid = rustix::process::geteuid().as_raw();
        for t in tables {
            if euid != 0 {
                return Err(SuperviseError::NotRoot {
                    user: t.user.clone(),
                    euid,
                    dir: t.dir.display().to_string(),
                });
            }
            super::writer::check_dir_for(&t.dir, t.uid).map_err(|source| {
                SuperviseError::Directory {
                    user: t.user.clone(),
                    source,
                }
            })?;
        }
        let exe = std::env::current_exe().map_err(SuperviseError::Executable)?;
        Ok(Some(Self {
            exe,
            tables: tables.to_vec(),
        }))
    }

    /// Starts every writer; the task ends once all have stopped after
    /// `stopping` turned true.
    pub fn spawn(
        self,
        socket: PathBuf,
        stopping: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut all = tokio::task::JoinSet::new();
            for table in self.tables {
                let writer = Writer {
                    exe: self.exe.clone(),
                    argv: table.argv(&socket),
                    table,
                };
                all.spawn(writer.supervise(stopping.clone()));
            }
            while all.join_next().await.is_some() {}
        })
    }
}

/// One table's writer.
struct Writer {
    exe: PathBuf,
    argv: Vec<OsString>,
    table: FilesTable,
}

impl Writer {
    /// Runs the writer, again after each exit, until `stopping`.
    async fn supervise(self, mut stopping: watch::Receiver<bool>) {
        let dir = self.table.dir.display().to_string();
        let user = self.table.user.as_str();
        let mut delay = RESTART_FIRST;
        loop {
            if *stopping.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            match self.command().spawn() {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or_default();
                    tracing::info!(files = %dir, user, pid, "started a files writer");
                    forward(child.stdout.take(), &dir, user);
                    forward(child.stderr.take(), &dir, user);
                    tokio::select! {
                        status = child.wait() => {
                            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                            tracing::warn!(files = %dir, user, pid, %status, "the files writer exited; starting it again in {delay:?}");
                        }
                        () = stopped(&mut stopping) => {
                            stop(&mut child).await;
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(files = %dir, user, error = %e, "cannot start the files writer; trying again in {delay:?}");
                }
            }
            if started.elapsed() >= HEALTHY_RUN {
                delay = RESTART_FIRST;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stopping) => return,
            }
            delay = (delay * 2).min(RESTART_MAX);
        }
    }

    /// The writer's command: the table's user and group, no supplementary
    /// groups, an environment of only `PATH`, and `/` as its directory.
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&self.argv)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            )
            .env(PARENT_ENV, std::process::id().to_string())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A task aborted without the stop below must not leave it.
            .kill_on_drop(true);
        // std sets the gid, then clears the supplementary groups
        // (setgroups(0) when a uid is set and no groups are given), then
        // sets the uid, in the child before exec.
        cmd.uid(self.table.uid).gid(self.table.gid);
        cmd
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Completes once the agent is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // Holding its guard across an await would make the task not Send.
    let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| Pid::from_raw(i32::try_from(p).ok()?))
    {
        let _ = rustix::process::kill_process(pid, Signal::TERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Logs each line the writer prints, under its directory and user.
fn forward(pipe: Option<impl AsyncRead + Unpin + Send + 'static>, dir: &str, user: &str) {
    let Some(pipe) = pipe else { return };
    let (dir, user) = (dir.to_owned(), user.to_owned());
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("error:") {
                tracing::warn!(files = %dir, user, "{line}");
            } else {
                tracing::info!(files = %dir, user, "{line}");
            }
        }
    });
}

/// In a writer the agent started: asks for SIGTERM when the agent dies,
/// and stops at once if it already has.
pub fn exit_with_parent() -> Result<(), AgentError> {
    let Some(parent) = std::env::var_os(PARENT_ENV) else {
        return Ok(());
    };
    let parent: i32 = parent
        .to_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| AgentError::Config(format!("{PARENT_ENV}: not a process ID")))?;
    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
        .map_err(|e| AgentError::Internal(format!("prctl(PR_SET_PDEATHSIG): {e}")))?;
    // The agent may have died before the request above took effect.
    if rustix::process::getppid()
        .map(Pid::as_raw_nonzero)
        .map(|p| p.get())
        != Some(parent)
    {
        return Err(AgentError::Internal(
            "the agent that started this files writer is gone".into(),
        ));
    }
    Ok(())
}
