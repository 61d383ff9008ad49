//! The admin API, served on the server's Unix socket only.
//!
//! Every call is checked against the caller's peer credentials (its uid must
//! be the server's, root's, or listed in `admin_uids`) and leaves one audit
//! log line: caller uid and pid, method, result.

mod convert;
mod entries;
mod service;

use std::collections::BTreeSet;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

use crate::ca::CaError;
use crate::datastore::DataStoreError;

pub use self::convert::{EntryOptions, EntryPolicy, UNKNOWN_TYPE_IN_API, agent_to_pb, entry_to_pb};
pub use self::entries::ALLOW_UNKNOWN_SELECTOR_TYPE;
pub use self::service::{AdminService, DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, not_ready};

/// Why an admin call failed. Mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The request is malformed or breaks a rule.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller may not use the admin API.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but not in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The datastore cannot serve (disk full, read-only, I/O error).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a damaged store.
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    pub(crate) fn invalid(message: String) -> Self {
        Self::InvalidArgument(message)
    }
}

impl From<DataStoreError> for AdminError {
    fn from(e: DataStoreError) -> Self {
        match e {
            DataStoreError::NotFound(_) => Self::NotFound(e.to_string()),
            DataStoreError::AlreadyExists(_) => Self::AlreadyExists(e.to_string()),
            DataStoreError::Backend(_) | DataStoreError::Conflict(_) => {
                Self::Unavailable(e.to_string())
            }
            _ => Self::Internal(e.to_string()),
        }
    }
}

impl From<CaError> for AdminError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::InvalidTransition(m) => Self::FailedPrecondition(m),
            CaError::NoActiveAuthority => Self::Unavailable(e.to_string()),
            CaError::X509(_) | CaError::Jwt(_) => Self::InvalidArgument(e.to_string()),
            CaError::Store(s) => s.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::InvalidArgument(m) => Status::invalid_argument(m),
            AdminError::PermissionDenied(m) => Status::permission_denied(m),
            AdminError::NotFound(m) => Status::not_found(m),
            AdminError::AlreadyExists(m) => Status::already_exists(m),
            AdminError::FailedPrecondition(m) => Status::failed_precondition(m),
            AdminError::Unavailable(m) => Status::unavailable(m),
            AdminError::Internal(m) => Status::internal(m),
        }
    }
}

/// Who may call the admin API.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    /// The server's own uid, root, and these.
    pub allowed_uids: BTreeSet<u32>,
}

impl AdminAccess {
    /// The server's uid and root, plus `admin_uids`.
    pub fn new(admin_uids: impl IntoIterator<Item = u32>) -> std::io::Result<Self> {
        let mut allowed_uids: BTreeSet<u32> = admin_uids.into_iter().collect();
        allowed_uids.insert(0);
        allowed_uids.insert(current_uid()?);
        Ok(Self { allowed_uids })
    }
}

pub use oxid_tls::socket::{SocketError, bind_unix_socket, current_uid, prepare_private_dir};

/// Serves the admin API on `listener` until `shutdown` completes; calls are
/// recorded in `rpc`, and requests over `max_request_bytes` are refused with
/// `OutOfRange` before decoding.
pub async fn serve(
    listener: UnixListener,
    service: AdminService,
    max_request_bytes: usize,
    rpc: std::sync::Arc<crate::metrics::RpcMetrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .layer(crate::metrics::RpcLayer::new("admin", rpc))
        .add_service(
            oxid_proto::admin::admin_server::AdminServer::new(service)
                .max_decoding_message_size(max_request_bytes),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
