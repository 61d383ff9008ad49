//! Why an agent API call failed, and the one place each reason becomes a
//! gRPC status (ARCHITECTURE.md, "Errors and status codes").

use oxid_proto::limit::LimitExceeded;
use oxid_proto::stream_end::StreamEnd;
use tonic::Status;

use crate::ca::CaError;
use crate::datastore::DataStoreError;

/// Why an agent API call failed. Mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentApiError {
    /// Malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// No (valid) agent SVID on the connection.
    #[error("{0}")]
    Unauthenticated(String),
    /// Known caller, refused.
    #[error("{0}")]
    PermissionDenied(String),
    /// The server cannot serve right now.
    #[error("{0}")]
    Unavailable(String),
    /// The caller is over its rate limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A bug or a damaged store.
    #[error("{0}")]
    Internal(String),
    /// The request passed one of the server's limits: answered with the
    /// typed refusal the agent recognises ([`LimitExceeded`]).
    #[error("{1}")]
    LimitExceeded(LimitExceeded, String),
    /// The caller's agent SVID was replaced by a renewed one: refused,
    /// with the typed reason ([`StreamEnd::SvidReplaced`]) so an agent
    /// whose stream ends this way after its own renewal knows it is normal.
    #[error("{0}")]
    SvidReplaced(String),
}

impl From<AgentApiError> for Status {
    fn from(e: AgentApiError) -> Self {
        match e {
            AgentApiError::InvalidArgument(m) => Status::invalid_argument(m),
            AgentApiError::Unauthenticated(m) => Status::unauthenticated(m),
            AgentApiError::PermissionDenied(m) => Status::permission_denied(m),
            AgentApiError::Unavailable(m) => Status::unavailable(m),
            AgentApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            AgentApiError::Internal(m) => Status::internal(m),
            AgentApiError::LimitExceeded(limit, m) => limit.to_status(m),
            AgentApiError::SvidReplaced(m) => {
                StreamEnd::SvidReplaced.attach(Status::permission_denied(m))
            }
        }
    }
}

impl From<DataStoreError> for AgentApiError {
    fn from(e: DataStoreError) -> Self {
        match e {
            DataStoreError::Backend(_) => Self::Unavailable(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<CaError> for AgentApiError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::NoActiveAuthority => Self::Unavailable(e.to_string()),
            CaError::X509(_) | CaError::Jwt(_) => Self::InvalidArgument(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}
