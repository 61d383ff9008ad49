//! `oxid-server server list` and `server forget`: the servers sharing one
//! PostgreSQL database, read and changed in the database itself (like
//! `datastore migrate`, not through a server's admin socket: a server
//! knows only its own CA, and the one to forget is stopped).
//!
//! Both take the configuration of one of the servers (`--config`, and
//! `--datastore-url` / `--server-name` as `run` does): its name is "this
//! server", which `forget` refuses. Opening the store brings the schema up
//! to this binary's version, as starting a server would.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use super::commands::CliResult;
use super::output::{outln, println};
use super::time::rfc3339;
use crate::config::{Config, Overrides};
use crate::datastore::{
    DataStore as _, DataStoreError, ForgetOptions, LIVENESS, PgStore, ServerInfo,
};

/// Commands about the servers of one database.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// List every server sharing the PostgreSQL database: whether it is
    /// live, the feed revision its agents' bundle is current as of, and
    /// its CA authorities (key ID, not-after).
    List(ServerArgs),
    /// Remove a decommissioned server: its CA journal row, its heartbeat,
    /// and those of its authorities that have expired (its unexpired ones
    /// stay in the trust bundle, so what it signed keeps verifying, until
    /// they expire; the servers then remove them. --force removes them
    /// now).
    #[command(after_help = FORGET_HELP)]
    Forget {
        /// The server's name (its server_name).
        name: String,
        /// Remove its unexpired authorities too: SVIDs it signed stop
        /// verifying as soon as the servers re-read the bundle.
        #[arg(long)]
        force: bool,
        /// Forget it although it never recorded a heartbeat (a server of
        /// schema 2, or one that has not run since the upgrade): nothing
        /// shows it is stopped, so make sure it is.
        #[arg(long)]
        assume_stopped: bool,
        /// The database and this server's name.
        #[command(flatten)]
        args: ServerArgs,
    },
}

/// Where the database is, as for `run`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// A server's configuration file: its [datastore] table (password
    /// file, sslmode, CA file) and server_name.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The PostgreSQL database, as `run --datastore-url` takes it.
    #[arg(long, value_name = "URL")]
    pub datastore_url: Option<String>,
    /// This server's name, as `run --server-name`.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Pretty)]
    pub output: Output,
}

const FORGET_HELP: &str = "\
The server must be stopped: one whose heartbeat is fresh is refused (a server stopped cleanly \
is not live at once; one killed is live until its heartbeat is 10 s old). Its own name is \
refused. Its CA keys stay on its own disk: delete its data directory to destroy them.";

/// Runs a server command.
pub(crate) async fn servers(command: ServerCommand) -> CliResult {
    match command {
        ServerCommand::List(args) => list(args).await,
        ServerCommand::Forget {
            name,
            force,
            assume_stopped,
            args,
        } => {
            let options = ForgetOptions {
                force,
                assume_stopped,
            };
            forget(&name, options, args).await
        }
    }
}

/// The store of the database `args` names.
async fn open(args: &ServerArgs) -> Result<(PgStore, String), String> {
    let config = Config::load(
        args.config.as_deref(),
        Overrides {
            datastore_url: args.datastore_url.clone(),
            server_name: args.server_name.clone(),
            ..Overrides::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let Some(pg) = config.postgres else {
        return Err(
            "server commands are for several servers on one PostgreSQL database: give \
                    --datastore-url or a --config whose [datastore] table names the url (the \
                    embedded store has one server)"
                .into(),
        );
    };
    let store = PgStore::open(&pg)
        .await
        .map_err(|e| format!("cannot open {pg}: {e}"))?;
    Ok((store, config.server_name))
}

/// A server name as `server_name` allows (so a typo gets this, not a
/// NotFound that looks like the server is gone).
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "server name {name:?}: expected 1 to 64 of a-z, 0-9, '.', '_', '-'"
        ))
    }
}

fn now_secs() -> u64 {
    crate::clock::unix_secs(SystemTime::now())
}

async fn list(args: ServerArgs) -> CliResult {
    let (store, me) = open(&args).await?;
    let servers = store.servers().await.map_err(|e| e.to_string())?;
    let now = now_secs();
    match args.output {
        Output::Json => println(&json!({
            "servers": servers.iter().map(|s| server_json(s, &me, now)).collect::<Vec<_>>(),
        })),
        Output::Pretty => {
            if servers.is_empty() {
                outln!("no servers");
            }
            for s in &servers {
                outln!("{}", server_pretty(s, &me, now));
            }
        }
    }
    Ok(())
}

fn live(s: &ServerInfo) -> bool {
    s.heartbeat.as_ref().is_some_and(|b| b.is_live(LIVENESS))
}

/// What the server is, in a word or two. Live comes first: a server
/// starting beats before it writes its CA journal, so a live one without a
/// journal is starting, not forgotten (forgetting removes the heartbeat).
fn state(s: &ServerInfo) -> &'static str {
    match &s.heartbeat {
        Some(b) if b.is_live(LIVENESS) => "live",
        _ if !s.has_journal => "forgotten",
        None => "no heartbeat (schema 2 server, or never started)",
        Some(b) if b.stopped => "stopped",
        Some(_) => "not live (heartbeat stale)",
    }
}

fn server_json(s: &ServerInfo, me: &str, now: u64) -> serde_json::Value {
    json!({
        "name": s.server,
        "this_server": s.server == me,
        "live": live(s),
        "state": state(s),
        "has_journal": s.has_journal,
        "heartbeat_age_s": s.heartbeat.as_ref().map(|b| b.age.as_secs_f64()),
        "applied_revision": s.heartbeat.as_ref().map(|b| b.applied_revision),
        "authorities": s.authorities.iter().map(|a| json!({
            "sequence": a.sequence,
            "jwt_key_id": a.jwt_key_id,
            "not_after": rfc3339(a.not_after),
            "expired": a.not_after <= now,
        })).collect::<Vec<_>>(),
    })
}

fn server_pretty(s: &ServerInfo, me: &str, now: u64) -> String {
    let mut out = format!(
        "{}{}: {}",
        s.server,
        if s.server == me { " (this server)" } else { "" },
        state(s)
    );
    if let Some(b) = &s.heartbeat {
        out.push_str(&format!(
            ", heartbeat {:.1} s ago, applied revision {}",
            b.age.as_secs_f64(),
            b.applied_revision
        ));
    }
    for a in &s.authorities {
        out.push_str(&format!(
            "\n  authority {}  jwt kid {}  not after {}{}",
            a.sequence,
            a.jwt_key_id,
            rfc3339(a.not_after),
            if a.not_after <= now { " (expired)" } else { "" }
        ));
    }
    out
}

async fn forget(name: &str, options: ForgetOptions, args: ServerArgs) -> CliResult {
    check_name(name)?;
    let (store, _) = open(&args).await?;
    let forgotten = store
        .forget_server(name, now_secs(), options)
        .await
        .map_err(|e| match e {
            DataStoreError::NotFound(what) => format!("no such server: {what}"),
            other => other.to_string(),
        })?;
    match args.output {
        Output::Json => println(&json!({
            "forgotten": name,
            "journal_removed": forgotten.journal,
            "authorities_removed": forgotten.removed,
            "authorities_kept": forgotten.kept,
        })),
        Output::Pretty => {
            outln!(
                "forgot server {name}: journal {}, {} authorities removed{}",
                if forgotten.journal {
                    "removed"
                } else {
                    "already gone"
                },
                forgotten.removed.len(),
                if forgotten.kept.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} kept until they expire (sequences {:?}; the servers remove them \
                         then, --force now)",
                        forgotten.kept.len(),
                        forgotten.kept
                    )
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::datastore::Heartbeat;

    fn info(has_journal: bool, beat: Option<(u64, bool)>) -> ServerInfo {
        ServerInfo {
            server: "b".into(),
            has_journal,
            heartbeat: beat.map(|(age, stopped)| Heartbeat {
                server: "b".into(),
                applied_revision: 1,
                age: Duration::from_secs(age),
                stopped,
            }),
            authorities: vec![],
        }
    }

    #[test]
    fn a_live_server_is_live_with_or_without_a_journal() {
        // Starting: it beats before its first journal write.
        assert_eq!(state(&info(false, Some((0, false)))), "live");
        assert_eq!(state(&info(true, Some((0, false)))), "live");
        assert_eq!(state(&info(false, None)), "forgotten");
        assert_eq!(state(&info(false, Some((3600, false)))), "forgotten");
        assert_eq!(state(&info(true, Some((0, true)))), "stopped");
        assert_eq!(
            state(&info(true, Some((3600, false)))),
            "not live (heartbeat stale)"
        );
        assert!(state(&info(true, None)).starts_with("no heartbeat"));
    }

    #[test]
    fn server_names_are_checked_before_the_database_is_asked() {
        assert!(check_name("b").is_ok());
        assert!(check_name("server-2.eu_west").is_ok());
        for bad in ["", "B", "a b", "a;drop", &"x".repeat(65)] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains("expected 1 to 64"), "{bad:?}: {e}");
        }
    }
}
