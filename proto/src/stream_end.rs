//! Why the server ended an agent's stream on purpose, as a typed contract:
//! the status metadata `oxid-end` names the reason, so the agent can tell
//! a normal event (the server stopping, its own SVID just renewed) from a
//! failure without reading the human message.
//!
//! ```
//! use oxid_proto::stream_end::StreamEnd;
//!
//! let status = StreamEnd::ShuttingDown.attach(tonic::Status::unavailable("the server is shutting down"));
//! assert_eq!(StreamEnd::of(&status), Some(StreamEnd::ShuttingDown));
//! assert_eq!(StreamEnd::of(&tonic::Status::unavailable("down")), None);
//! ```

use tonic::Status;
use tonic::metadata::MetadataValue;

/// Metadata key naming the reason.
pub const END_KEY: &str = "oxid-end";

/// A reason the server ends a stream that is not a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The server is stopping (`Unavailable`); another may be starting.
    ShuttingDown,
    /// The stream's agent SVID was replaced by a renewed one
    /// (`PermissionDenied`): the agent reconnects with the new one.
    SvidReplaced,
    /// The connection reached the server's `max_connection_age`
    /// (`Unavailable`): the agent reconnects, to the next server first, so
    /// agents spread over the servers again.
    ConnectionAged,
}

impl StreamEnd {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShuttingDown => "shutting-down",
            Self::SvidReplaced => "svid-replaced",
            Self::ConnectionAged => "connection-aged",
        }
    }

    /// `status` with this reason in its metadata.
    pub fn attach(self, mut status: Status) -> Status {
        status
            .metadata_mut()
            .insert(END_KEY, MetadataValue::from_static(self.as_str()));
        status
    }

    /// The reason `status` carries, if it is one of these; anything else
    /// (no key, an unknown name) is `None`.
    pub fn of(status: &Status) -> Option<Self> {
        match status.metadata().get(END_KEY)?.to_str().ok()? {
            "shutting-down" => Some(Self::ShuttingDown),
            "svid-replaced" => Some(Self::SvidReplaced),
            "connection-aged" => Some(Self::ConnectionAged),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_what_it_does_not_know() {
        for end in [
            StreamEnd::ShuttingDown,
            StreamEnd::SvidReplaced,
            StreamEnd::ConnectionAged,
        ] {
            assert_eq!(
                StreamEnd::of(&end.attach(Status::unavailable("x"))),
                Some(end)
            );
        }
        let mut other = Status::unavailable("x");
        other
            .metadata_mut()
            .insert(END_KEY, MetadataValue::from_static("something-else"));
        assert_eq!(StreamEnd::of(&other), None);
        assert_eq!(
            StreamEnd::of(&Status::permission_denied("svid-replaced")),
            None
        );
    }
}
