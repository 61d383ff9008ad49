//! oxid-agent: the node agent.
//!
//! It proves to the server which node it runs on (join token or x509pop),
//! keeps its own SVID and the bundle in its data directory (0600), follows
//! the server's push sync, keeps an X509-SVID for every authorised entry
//! (keys generated here, never sent), and serves the SPIFFE Workload API on
//! a Unix socket to the processes it can attest. Any SPIFFE client works
//! unchanged: the wire contract is the SPIFFE spec's, not ours (ARCHITECTURE.md).

mod api_cli;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod files;
/// Fuzz oracles: only for `fuzz/` (feature `fuzzing`) and this crate's tests.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identity;
mod metrics;
pub mod run;
pub mod sds;
pub mod server_client;
pub mod servers;
pub mod state;
mod svids;
mod sync;
pub mod workload;

/// Why the agent could not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Bad flags or configuration file.
    #[error("configuration: {0}")]
    Config(String),
    /// The data directory could not be read or written.
    #[error("data directory: {0}")]
    State(String),
    /// The server refused the agent (unknown, banned, evicted, bad token).
    #[error("refused by the server: {0}")]
    Refused(String),
    /// The server could not be reached or answered oddly.
    #[error("server: {0}")]
    Server(String),
    /// The Workload API (for the `api` and `healthcheck` commands) could
    /// not be reached or refused the call.
    #[error("Workload API: {0}")]
    WorkloadApi(String),
    /// A command's output could not be written (`api fetch x509 --write`);
    /// the message names the flag and the path.
    #[error("{0}")]
    Output(String),
    /// A bug.
    #[error("internal: {0}")]
    Internal(String),
}

impl AgentError {
    pub(crate) fn from_status(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                Self::Refused(s.message().to_owned())
            }
            _ => Self::Server(format!("{} ({:?})", s.message(), s.code())),
        }
    }
}
