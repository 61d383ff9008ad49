//! The `oxid-agent` command line.

// A command line prints its errors; that is its job.
#![allow(clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{AgentConfig, AgentFile};

/// oxid-agent: serves SPIFFE identities to the workloads of this node.
#[derive(Debug, Parser)]
#[command(name = "oxid-agent", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Check a configuration file and exit.
    Validate {
        /// The configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Exit 0 if the agent is ready (synced, connected to the server, its
    /// identity accepted: what `/ready` says), or with --shallow alive.
    Healthcheck(HealthArgs),
    /// Use the Workload API as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
}

/// Where the Workload API is and how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, else the
    /// agent's default socket).
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_parser = ["pretty", "json"], default_value = "pretty")]
    pub output: String,
}

/// `healthcheck` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// Only check that the agent is alive (its Workload API answers), not
    /// that it is ready: a liveness probe.
    #[arg(long)]
    pub shallow: bool,
    /// Socket and output.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `api` commands.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate a JWT-SVID through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print every X509-SVID update as it arrives (rotations, entry
    /// changes), or with --write keep them as files for programs that read
    /// PEM files, and tell those programs when they change.
    #[command(after_help = WATCH_HELP)]
    Watch(Box<WatchArgs>),
}

const WATCH_HELP: &str = "\
With --write DIR, each update is written whole into a new DIR/.oxid-gen-N directory (svid.pem: \
leaf and intermediates, svid.key: PKCS#8, svid_key.pem: both, bundle.pem, \
federated_bundle.N.pem, and with --jwt-audience jwt_svid.N.token and jwt_bundle.json), then DIR/current is switched to it by one rename; DIR/svid.pem and \
the like point into current/. Read a key and its certificate from one resolved current/, \
from svid_key.pem, or after the signal, never from two paths at unrelated moments. The \
watcher retries when the agent is away and never deletes good files.";

/// `api watch` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Keep the SVIDs as files in this directory (owned by this user or
    /// root, not writable by others).
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// With --write: which SVID, when the process has several [default:
    /// the first].
    #[arg(long, requires = "write")]
    pub spiffe_id: Option<String>,
    /// Mode of the certificate and bundle files.
    #[arg(long, default_value = "0644", value_parser = parse_mode, requires = "write")]
    pub cert_mode: u32,
    /// Mode of svid.key and svid_key.pem; never readable by every user.
    #[arg(long, default_value = "0600", value_parser = parse_mode, requires = "write")]
    pub key_mode: u32,
    /// Name of the X509-SVID file (leaf and intermediates).
    #[arg(long, default_value = "svid.pem", requires = "write")]
    pub svid_file_name: String,
    /// Name of the private key file.
    #[arg(long, default_value = "svid.key", requires = "write")]
    pub key_file_name: String,
    /// Name of the bundle file.
    #[arg(long, default_value = "bundle.pem", requires = "write")]
    pub bundle_file_name: String,
    /// Give the files this group (a name or a gid the user belongs to),
    /// e.g. the group a server runs as, with --key-mode 0640.
    #[arg(long, requires = "write")]
    pub group: Option<String>,
    /// Also keep a JWT-SVID for this audience as jwt_svid.N.token (N in
    /// the order given; repeatable), fetched again at half its life, and
    /// the JWT bundle as jwt_bundle.json (plain JWKS).
    #[arg(long = "jwt-audience", requires = "write")]
    pub jwt_audiences: Vec<String>,
    /// Leave out the federated trust domains' bundles
    /// (federated_bundle.N.pem), which are written by default when the
    /// entry federates with them.
    #[arg(long, requires = "write")]
    pub no_federated_bundles: bool,
    /// After each update, send this signal (HUP, USR1, ...) to the process
    /// in --pid-file, or to the command after `--` (from its second update
    /// on).
    #[arg(long, requires = "write")]
    pub signal: Option<String>,
    /// The process to signal: a file holding its PID, read at each update.
    #[arg(long, requires = "signal", conflicts_with_all = ["reload_command", "command"])]
    pub pid_file: Option<PathBuf>,
    /// After each update, run this through `sh -c` (e.g. `nginx -s reload`).
    #[arg(long, requires = "write", conflicts_with = "command")]
    pub reload_command: Option<String>,
    /// Run this program once the first files are written; SIGTERM and
    /// SIGINT are passed on to it, and the watcher exits with its status.
    #[arg(last = true, requires = "write")]
    pub command: Vec<String>,
    /// Socket and output.
    #[command(flatten)]
    pub api: ApiArgs,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?}: expected an octal file mode such as 0640"))
}

/// `api fetch` commands.
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// This process's X509-SVIDs.
    X509 {
        /// Write svid.pem, svid.key (0600), bundle.pem and, per federated trust
        /// domain in name order, federated_bundle.N.pem (as spire-agent does) into
        /// this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Socket and output.
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A JWT-SVID.
    Jwt {
        /// Audience (repeatable, 1 to 32).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Only this SPIFFE ID (when the process has several).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Socket and output.
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `api validate` commands.
#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID for an audience.
    Jwt {
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
        /// Socket and output.
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `run` flags; they win over the configuration file.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Server agent API address, host:port; give it once per server of
    /// the trust domain to fail over between them (tried in this order).
    #[arg(long = "server-address", value_name = "HOST:PORT")]
    pub server_address: Vec<String>,
    /// Seconds without a frame from the server before it is pinged
    /// (default 2); unanswered for half as long again, the next server is
    /// tried.
    #[arg(long)]
    pub server_keepalive_secs: Option<u64>,
    /// Trust domain.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Bootstrap bundle (PEM, from `oxid-server bundle show`).
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// Join token (from `oxid-server token generate`); visible in `ps`:
    /// prefer --join-token-file.
    #[arg(long, conflicts_with = "join_token_file")]
    pub join_token: Option<String>,
    /// File holding the join token (mode 0600 or stricter, owned by the
    /// agent's user or root; systemd's LoadCredential= files are accepted).
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// x509pop node certificate chain (PEM).
    #[arg(long)]
    pub node_cert: Option<PathBuf>,
    /// x509pop node key (PKCS#8, mode 0600).
    #[arg(long)]
    pub node_key: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Workload API socket path.
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// Address for /metrics, /live and /ready (ip:port; off if unset).
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// X509-SVIDs signed ahead of any request (default 1000).
    #[arg(long)]
    pub max_presigned_svids: Option<usize>,
    /// JWT-SVIDs kept for reuse (default 1000).
    #[arg(long)]
    pub jwt_svid_cache_size: Option<usize>,
    /// Of those, the most one uid's requests may fill (default 100).
    #[arg(long)]
    pub jwt_svid_cache_per_uid: Option<usize>,
    /// JWT-SVIDs minted at the server a second for all workloads (default
    /// 250; keep it below the server's agent_requests_per_second).
    #[arg(long)]
    pub jwt_mints_per_second: Option<u32>,
    /// JWT-SVIDs minted at the server a second for one uid (default 50).
    #[arg(long)]
    pub jwt_mints_per_second_per_uid: Option<u32>,
    /// Workload API streams one uid may hold open at once (default 2048).
    #[arg(long)]
    pub max_streams_per_uid: Option<usize>,
    /// Largest Workload API request decoded, KiB (default 4096).
    #[arg(long)]
    pub max_request_kib: Option<usize>,
    /// Workload API connections open at once, all uids (default 4096,
    /// lowered to fit the open-file limit).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Workload API connections one uid may hold open at once (default 1024).
    #[arg(long)]
    pub max_connections_per_uid: Option<usize>,
    /// Seconds a new connection has to send the HTTP/2 preface (default 10).
    #[arg(long)]
    pub connection_preface_timeout_secs: Option<u64>,
    /// Seconds a connection may stay open with no call in flight (default 120).
    #[arg(long)]
    pub connection_idle_timeout_secs: Option<u64>,
    /// Log format.
    #[arg(long, value_parser = ["human", "json"])]
    pub log_format: Option<String>,
    /// Envoy SDS settings (agent.toml `[sds]`).
    #[command(flatten)]
    pub sds: crate::sds::SdsFile,
}

/// Entry point of the `oxid-agent` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::Validate { config } => {
            return finish(
                AgentConfig::load(config.as_deref(), AgentFile::default()).map(|c| {
                    crate::api_cli::say(&format!(
                        "configuration is valid: trust domain {}, servers {}, socket {}",
                        c.trust_domain,
                        c.server_addresses,
                        c.socket_path.display()
                    ));
                }),
            );
        }
        Command::Healthcheck(h) => {
            return finish(block_on(crate::api_cli::healthcheck(h.api, h.shallow)));
        }
        Command::Api(cmd) => return finish(block_on(crate::api_cli::run(cmd))),
    };
    let flags = AgentFile {
        server_address: None,
        // Empty when none is given: the file's (or the default) is used.
        server_addresses: (!args.server_address.is_empty()).then_some(args.server_address),
        server_keepalive_secs: args.server_keepalive_secs,
        trust_domain: args.trust_domain,
        trust_bundle: args.trust_bundle,
        join_token: args.join_token,
        join_token_file: args.join_token_file,
        node_cert: args.node_cert,
        node_key: args.node_key,
        data_dir: args.data_dir,
        socket_path: args.socket_path,
        metrics_address: args.metrics_address,
        max_presigned_svids: args.max_presigned_svids,
        jwt_svid_cache_size: args.jwt_svid_cache_size,
        jwt_svid_cache_per_uid: args.jwt_svid_cache_per_uid,
        jwt_mints_per_second: args.jwt_mints_per_second,
        jwt_mints_per_second_per_uid: args.jwt_mints_per_second_per_uid,
        max_streams_per_uid: args.max_streams_per_uid,
        max_request_kib: args.max_request_kib,
        max_connections: args.max_connections,
        max_connections_per_uid: args.max_connections_per_uid,
        connection_preface_timeout_secs: args.connection_preface_timeout_secs,
        connection_idle_timeout_secs: args.connection_idle_timeout_secs,
        log_level: None,
        log_format: args.log_format,
        sds: Some(args.sds),
        files: Vec::new(),
    };
    let result = AgentConfig::load(args.config.as_deref(), flags).and_then(|config| {
        init_logging(&config.log_level, &config.log_format)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::AgentError::Internal(e.to_string()))?;
        rt.block_on(async {
            // Inside the runtime: the handlers need its reactor.
            let signal = oxid_telemetry::shutdown_signal();
            let stop = async move {
                match signal {
                    Ok(signal) => signal.await,
                    Err(_) => std::future::pending().await,
                }
            };
            crate::run::run(config, stop).await
        })
    });
    finish(result)
}

fn finish(result: Result<(), crate::AgentError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn block_on<F: std::future::Future<Output = Result<(), crate::AgentError>>>(
    f: F,
) -> Result<(), crate::AgentError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::AgentError::Internal(e.to_string()))?
        .block_on(f)
}

fn init_logging(level: &str, format: &str) -> Result<(), crate::AgentError> {
    let config = |e: oxid_telemetry::logging::LogError| crate::AgentError::Config(e.to_string());
    oxid_telemetry::logging::init(level, format.parse().map_err(config)?).map_err(config)
}
