//! `oxid-server datastore migrate`: moves a single server's sled store into
//! PostgreSQL, so the deployment can grow to several servers without
//! registering anything again.
//!
//! What is copied: entries (with their IDs and creation times), agent
//! records (serials, bans, aliases), unused join tokens, bundles and the CA
//! journal. What is not: the change history (a server on PostgreSQL starts
//! from the current rows) and the CA's private keys, which stay in the data
//! directory where the journal names them; the server started on
//! PostgreSQL must run with the same `data_dir`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use super::commands::CliResult;
use super::output::{outln, println};
use crate::config::{Config, Overrides};
use crate::datastore::{DataStoreError, PgStore, SledStore, StoreContents};

/// Datastore commands.
#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Copy a stopped server's sled store into an empty PostgreSQL
    /// database: entries with their IDs, agents, join tokens, bundles and
    /// the CA journal. Then start the server with --datastore-url and the
    /// same --data-dir (its CA keys stay there).
    #[command(after_help = MIGRATE_HELP)]
    Migrate(MigrateArgs),
}

/// `datastore migrate` flags.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The stopped server's data directory (the store is DIR/datastore).
    #[arg(long, value_name = "DIR")]
    pub from_data_dir: PathBuf,
    /// The PostgreSQL database, postgresql://USER@HOST:PORT/DB, as
    /// `run --datastore-url` takes it (the password from password_file in
    /// the [datastore] table of --config, or PGPASSWORD).
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// The server's configuration file: its [datastore] table gives the
    /// password file, sslmode and CA file, as for `run`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The name the server will run under on PostgreSQL (its CA journal
    /// is stored under it); as `run --server-name`, default `default`.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Pretty)]
    pub output: Output,
}

const MIGRATE_HELP: &str = "\
The server must be stopped: a store in use is refused (its lock). The database must be empty: \
create it, migrate, then start the first server on it. The copy is one transaction: on any \
failure the database is left empty. Revisions continue past the old store's, so agents \
resume against the new server and receive every entry again. The sled store is left as it \
was; do not start a server on it again once one runs on PostgreSQL.";

/// Runs a datastore command.
pub(crate) async fn datastore(command: DatastoreCommand) -> CliResult {
    match command {
        DatastoreCommand::Migrate(args) => migrate(args).await,
    }
}

async fn migrate(args: MigrateArgs) -> CliResult {
    let config = Config::load(
        args.config.as_deref(),
        Overrides {
            data_dir: Some(args.from_data_dir.clone()),
            datastore_url: Some(args.to),
            server_name: args.server_name,
            ..Overrides::default()
        },
    )
    .map_err(|e| e.to_string())?;
    // Invariant: Config::resolve returns the PostgreSQL settings whenever a
    // URL was given, and one always is here.
    let Some(target) = config.postgres.clone() else {
        return Err("no PostgreSQL URL".into());
    };
    let contents = read_source(&args.from_data_dir, config.datastore_cache_bytes)?;
    let keys = journal_keys(&contents)?;
    let store = PgStore::open(&target)
        .await
        .map_err(|e| format!("cannot open {target}: {e}"))?;
    let revision = store.import(contents.clone()).await.map_err(|e| match e {
        DataStoreError::AlreadyExists(message) => message,
        other => format!("nothing was copied: {other}"),
    })?;
    report(
        &args.from_data_dir,
        &target.to_string(),
        &contents,
        keys,
        revision,
        args.output,
    );
    Ok(())
}

/// Everything in the sled store, read under its lock so no server writes
/// meanwhile (and none can start on it until this returns).
fn read_source(data_dir: &Path, cache_bytes: u64) -> Result<StoreContents, String> {
    let dir = data_dir.join("datastore");
    if !dir.join("db").is_file() {
        return Err(format!(
            "{} holds no sled store (no datastore/db): give the data_dir of the server to \
             migrate",
            data_dir.display()
        ));
    }
    let store = SledStore::open(&dir, cache_bytes).map_err(|e| match e {
        DataStoreError::InUse(message) => format!("the sled store is in use: {message}"),
        other => format!("cannot open the sled store in {}: {other}", dir.display()),
    })?;
    store
        .contents()
        .map_err(|e| format!("cannot read the sled store in {}: {e}", dir.display()))
}

/// (authorities in the journal, those whose key files are present). A key
/// file that is gone means that authority cannot sign after the move, as
/// after any restart; it is reported, not refused.
fn journal_keys(contents: &StoreContents) -> Result<(usize, usize), String> {
    let Some(bytes) = &contents.ca_journal else {
        return Ok((0, 0));
    };
    let journal = crate::ca::Journal::decode(bytes).map_err(|e| e.to_string())?;
    let present = journal
        .entries
        .iter()
        .filter(|e| {
            e.key_files
                .as_ref()
                .is_some_and(|(x, j)| Path::new(x).is_file() && Path::new(j).is_file())
        })
        .count();
    Ok((journal.entries.len(), present))
}

fn report(
    from: &Path,
    to: &str,
    c: &StoreContents,
    (authorities, with_keys): (usize, usize),
    revision: u64,
    output: Output,
) {
    match output {
        Output::Json => println(&json!({
            "from": from.join("datastore").display().to_string(),
            "to": to,
            "entries": c.entries.len(),
            "agents": c.agents.len(),
            "join_tokens": c.join_tokens.len(),
            "bundles": c.bundles.len(),
            "ca_authorities": authorities,
            "ca_authorities_with_keys": with_keys,
            "revision": revision,
        })),
        Output::Pretty => {
            outln!(
                "migrated {} to {to}\n  entries         : {}\n  agents          : {}\n  \
                 join tokens     : {}\n  bundles         : {}\n  CA authorities  : {authorities} \
                 ({with_keys} with their keys on disk)\n  revision        : {revision}\n\
                 Start the server with --datastore-url {to} and --data-dir {} (its CA keys \
                 stay there).",
                from.join("datastore").display(),
                c.entries.len(),
                c.agents.len(),
                c.join_tokens.len(),
                c.bundles.len(),
                from.display()
            );
        }
    }
}
