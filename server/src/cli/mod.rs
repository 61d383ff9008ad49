//! The `oxid-server` command line: `run`, `validate`, and the operator
//! commands, which talk to a running server over its admin socket.
//!
//! Every failure ends as one line on stderr and a non-zero exit code; the
//! binary only parses arguments and calls [`main`] here.

mod client;
mod commands;
mod datastore;
mod entry;
mod import;
mod output;
mod servers;
mod spire_json;
mod time;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use self::commands::main;
pub use self::datastore::{DatastoreCommand, MigrateArgs};
pub use self::servers::{ServerArgs, ServerCommand};

/// oxid-server: the SPIFFE certificate authority of one trust domain.
#[derive(Debug, Parser)]
#[command(name = "oxid-server", version, about, propagate_version = true)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Human-readable.
    #[default]
    Pretty,
    /// One JSON document.
    Json,
}

/// Options every operator command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Admin socket of the server.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_SOCKET_PATH)]
    pub socket_path: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Pretty)]
    pub output: Output,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run(RunArgs),
    /// Check a configuration file and exit.
    Validate {
        /// The configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Exit 0 if the server answers and has an active CA.
    Healthcheck(#[command(flatten)] Common),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Trust bundles (own and federated).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// X509-SVIDs for use outside agents.
    #[command(subcommand)]
    X509(X509Command),
    /// JWT-SVIDs for use outside agents.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// The CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The datastore itself (the server need not run; see `migrate`).
    #[command(subcommand)]
    Datastore(DatastoreCommand),
    /// The servers sharing one PostgreSQL database (read and changed in
    /// the database: list them, forget a decommissioned one).
    #[command(subcommand)]
    Server(ServerCommand),
}

/// `run` flags; they win over the configuration file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Trust domain.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Agent API listen address (ip:port).
    #[arg(long)]
    pub bind_address: Option<String>,
    /// Admin socket path.
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_parser = ["human", "json"])]
    pub log_format: Option<String>,
    /// Metrics and health listener (ip:port) for /metrics, /live, /ready;
    /// overrides metrics_address in the file.
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// PostgreSQL datastore, postgresql://USER@HOST:PORT/DB (no password:
    /// password_file in [datastore], or PGPASSWORD); overrides url in the
    /// [datastore] table. Unset: the embedded store in the data directory.
    #[arg(long)]
    pub datastore_url: Option<String>,
    /// This server's name among the servers sharing one PostgreSQL
    /// database (each its own); overrides server_name in the file.
    #[arg(long)]
    pub server_name: Option<String>,
}

/// The fields of an entry, for create and update.
#[derive(Debug, Clone, Args)]
pub struct EntryFields {
    /// SPIFFE ID granted.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Parent: an agent, a node alias, or another entry's SPIFFE ID.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// Selector `type:value` (repeat for several; all must match).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// X509-SVID TTL, e.g. 30m.
    #[arg(long)]
    pub x509_svid_ttl: Option<crate::config::HumanDuration>,
    /// JWT-SVID TTL, e.g. 5m.
    #[arg(long)]
    pub jwt_svid_ttl: Option<crate::config::HumanDuration>,
    /// DNS SAN (repeatable).
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    /// Federated trust domain whose bundle the workloads receive (repeatable).
    #[arg(long = "federates-with")]
    pub federates_with: Vec<String>,
    /// Hint passed to workloads.
    #[arg(long)]
    pub hint: Option<String>,
    /// When the entry stops applying: RFC 3339 (2026-12-31T00:00:00Z) or
    /// Unix seconds; must be in the future.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// Accept an entry whose only process selectors are unix:path or
    /// unix:sha256: any user's process running that executable (or with code
    /// injected into it) then matches. Add a unix:uid selector instead.
    #[arg(long)]
    pub allow_exe_only: bool,
    /// Accept selector types no oxid attestor produces (oxid's are unix and
    /// x509pop), e.g. for a future attestor. No caller carries them today,
    /// so such an entry matches nothing until one does.
    #[arg(long)]
    pub allow_unknown_selector_type: bool,
}

/// Entry commands.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create an entry (or a batch with --data).
    Create {
        /// Entry fields.
        #[command(flatten)]
        fields: EntryFields,
        /// Entry ID (default: generated).
        #[arg(long)]
        entry_id: Option<String>,
        /// JSON file of entries (`{"entries":[...]}`), or `-` for stdin. Each
        /// entry takes the flags' names with `_` (`spiffe_id`, `parent_id`,
        /// `selectors`, `x509_svid_ttl`, `jwt_svid_ttl`, `dns_names`,
        /// `federates_with`, `hint`, `expires_at`, `id`); TTLs as "1h" or
        /// seconds, `expires_at` as RFC 3339 or Unix seconds. SPIRE's JSON
        /// (`spire-server entry show -output json`) is recognised and
        /// imported as `entry import --format spire` does, with its defaults.
        #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "selectors"])]
        data: Option<PathBuf>,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Change an entry. With --spiffe-id, --parent-id and --selector all
    /// given, the whole entry is replaced: every flag not given is back to
    /// its default (no DNS names, hint or expiry; default TTLs). Otherwise
    /// only the flags given change, and the rest is kept (e.g.
    /// `entry update --entry-id ID --x509-svid-ttl 1h`); a concurrent change
    /// to the entry is merged, never overwritten.
    #[command(
        after_help = "Whole replacement: --spiffe-id, --parent-id and --selector all given \
                      (as spire-server entry update). Partial update: any other set of flags; \
                      each list flag given (--selector, --dns-name, --federates-with) replaces \
                      that list."
    )]
    Update {
        /// The entry to replace.
        #[arg(long)]
        entry_id: String,
        /// Entry fields.
        #[command(flatten)]
        fields: EntryFields,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Delete entries.
    Delete {
        /// Entry ID (repeatable).
        #[arg(long = "entry-id", required = true)]
        entry_ids: Vec<String>,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Show entries: one by ID, or those matching the filters.
    Show {
        /// Entry ID.
        #[arg(long)]
        entry_id: Option<String>,
        /// Filter: SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Filter: parent ID.
        #[arg(long)]
        parent_id: Option<String>,
        /// Filter: selector (repeatable).
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// With --selector: the entry's selectors are exactly these.
        #[arg(long)]
        exact: bool,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Count entries.
    Count(#[command(flatten)] Common),
    /// Import entries from another system: SPIRE's JSON as
    /// `spire-server entry show -output json` prints it. Nothing is created
    /// unless every entry can be (see --partial); each entry is reported.
    #[command(after_help = IMPORT_HELP)]
    Import(ImportArgs),
}

/// `entry import` flags.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The file's format.
    #[arg(long, value_enum)]
    pub format: ImportFormat,
    /// The entries file, or `-` for stdin.
    #[arg(long)]
    pub data: PathBuf,
    /// Replace parent ID OLD by NEW (repeatable), e.g. a SPIRE agent ID
    /// by the oxid agent ID or node alias that takes its place. SPIRE's
    /// server ID (`spiffe://<td>/spire/server`, node entries) becomes
    /// oxid's (`spiffe://<td>/oxid/server`) without a flag.
    #[arg(long = "map-parent", value_name = "OLD=NEW")]
    pub map_parent: Vec<String>,
    /// Import entries that set this SPIRE field to true without it
    /// (admin, downstream, store_svid: oxid has no equivalent);
    /// repeatable. Each drop is reported.
    #[arg(long = "drop", value_name = "FIELD")]
    pub drop: Vec<String>,
    /// Create the entries that pass and report the others, instead of
    /// creating nothing when one fails.
    #[arg(long)]
    pub partial: bool,
    /// Check every entry with the server and report; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Entries per admin call (at most the server's max_admin_batch).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// As for `entry create`.
    #[arg(long)]
    pub allow_exe_only: bool,
    /// As for `entry create`: e.g. SPIRE's k8s or docker selectors,
    /// which no oxid attestor produces yet.
    #[arg(long)]
    pub allow_unknown_selector_type: bool,
    /// Common options.
    #[command(flatten)]
    pub common: Common,
}

/// Formats `entry import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportFormat {
    /// SPIRE's JSON: `spire-server entry show -output json`, or an
    /// `entry create -data` file.
    Spire,
}

const IMPORT_HELP: &str = "\
How SPIRE's fields map: spiffe_id, parent_id (objects or strings), selectors ({type, value} \
as type:value), x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, hint, expires_at and \
id carry over; created_at and revision_number are SPIRE's store metadata and oxid stamps its \
own. admin, downstream and store_svid have no oxid equivalent: an entry setting one is \
refused unless --drop names it. SPIRE's join-token alias records (token generate -spiffeID) \
are skipped: give the alias to the oxid token instead. An entry whose parent no oxid agent, \
alias or entry has yet is imported with a note.";

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List agents.
    List(#[command(flatten)] Common),
    /// Show one agent.
    Show {
        /// Agent SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Ban an agent: refused on every call, may not re-attest.
    Ban {
        /// Agent SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Evict an agent: delete its record; it must attest again.
    Evict {
        /// Agent SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Count agents.
    Count(#[command(flatten)] Common),
}

/// Join token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token. The token alone goes to stdout; its
    /// ID, the SPIFFE ID the agent using it gets, and its expiry go to
    /// stderr (all of them in one document with --output json).
    Generate {
        /// Lifetime, e.g. 10m (default) or 1h.
        #[arg(long)]
        ttl: Option<crate::config::HumanDuration>,
        /// Node alias the agent using the token is also known by.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// PEM certificates (X.509 authorities only).
    Pem,
    /// SPIFFE bundle JSON.
    Spiffe,
}

/// Bundle commands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the server's own bundle.
    Show {
        /// Format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// Set a federated trust domain's bundle (SPIFFE JSON or PEM), e.g.
    /// what `spire-server bundle show -format spiffe` prints.
    Set {
        /// The federated trust domain (`td` or `spiffe://td`).
        #[arg(long)]
        id: String,
        /// The file's format [default: recognised from its content].
        #[arg(long, value_enum)]
        format: Option<BundleFormat>,
        /// Bundle file, or `-` for stdin.
        #[arg(long)]
        path: PathBuf,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
    /// List federated bundles.
    List(#[command(flatten)] Common),
    /// Delete a federated bundle.
    Delete {
        /// The federated trust domain.
        #[arg(long)]
        id: String,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
}

/// X509-SVID commands.
#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Mint an X509-SVID; the key is generated here and never sent.
    Mint {
        /// SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// TTL, e.g. 1h.
        #[arg(long)]
        ttl: Option<crate::config::HumanDuration>,
        /// DNS SAN (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Write svid.pem, key.pem (0600) and bundle.pem into this directory
        /// instead of printing them.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
}

/// JWT-SVID commands.
#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Mint a JWT-SVID and print it.
    Mint {
        /// SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Audience (repeatable, 1 to 32).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// TTL, e.g. 5m.
        #[arg(long)]
        ttl: Option<crate::config::HumanDuration>,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
}

/// CA commands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Show the CA's authorities.
    Show(#[command(flatten)] Common),
    /// Force a rotation step.
    Rotate {
        /// Prepare the next authority now (published in the bundle).
        #[arg(long, group = "step")]
        prepare: bool,
        /// Activate the prepared authority now.
        #[arg(long, group = "step")]
        activate: bool,
        /// Record a taint on an authority (by sequence), shown by `ca show`.
        /// That is all it does for now: the authority stays in the bundle,
        /// agents and workloads keep trusting it, and the SVIDs it signed
        /// stay valid until they expire. Nothing is revoked or re-signed.
        #[arg(long, group = "step")]
        taint: Option<u64>,
        /// Common options.
        #[command(flatten)]
        common: Common,
    },
}
