//! A request refused for passing one of the server's limits, as a typed
//! contract between the processes: the status code is `InvalidArgument`
//! and the status metadata names the limit (`oxid-limit`) and its value
//! (`oxid-limit-value`), so the agent recognises it without reading the
//! human message, which may change.
//!
//! ```
//! use oxid_proto::limit::{Limit, LimitExceeded};
//!
//! let refused = LimitExceeded { limit: Limit::MaxCsrsPerCall, max: 500 };
//! let status = refused.to_status("501 CSRs in one call; at most 500");
//! assert_eq!(status.code(), tonic::Code::InvalidArgument);
//! assert_eq!(LimitExceeded::from_status(&status), Some(refused));
//! ```

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key naming the limit.
pub const LIMIT_KEY: &str = "oxid-limit";
/// Metadata key holding the limit's value (decimal).
pub const LIMIT_VALUE_KEY: &str = "oxid-limit-value";

/// A limit a request can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// The most CSRs in one `SignX509Svids` call (server setting
    /// `max_csrs_per_call`).
    MaxCsrsPerCall,
}

impl Limit {
    /// The name on the wire: the setting's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxCsrsPerCall => "max_csrs_per_call",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "max_csrs_per_call" => Some(Self::MaxCsrsPerCall),
            _ => None,
        }
    }
}

/// A request passed `limit`, whose value is `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitExceeded {
    /// Which limit.
    pub limit: Limit,
    /// Its value at the server.
    pub max: u64,
}

impl LimitExceeded {
    /// The status the server answers with; `message` is for people.
    pub fn to_status(&self, message: impl Into<String>) -> Status {
        let mut metadata = MetadataMap::new();
        metadata.insert(LIMIT_KEY, MetadataValue::from_static(self.limit.as_str()));
        metadata.insert(LIMIT_VALUE_KEY, MetadataValue::from(self.max));
        Status::with_metadata(Code::InvalidArgument, message, metadata)
    }

    /// The refusal `status` carries, if it is one: the code and both keys
    /// must be there and well formed, or it is not.
    pub fn from_status(status: &Status) -> Option<Self> {
        if status.code() != Code::InvalidArgument {
            return None;
        }
        let metadata = status.metadata();
        let limit = Limit::parse(metadata.get(LIMIT_KEY)?.to_str().ok()?)?;
        let value = metadata.get(LIMIT_VALUE_KEY)?.to_str().ok()?;
        // Strict: digits only (no sign, no spaces), as `to_status` writes it.
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            limit,
            max: value.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_look_alikes() {
        let refused = LimitExceeded {
            limit: Limit::MaxCsrsPerCall,
            max: 7,
        };
        let status = refused.to_status("too many");
        assert_eq!(LimitExceeded::from_status(&status), Some(refused));
        // The message alone no longer counts.
        let plain = Status::invalid_argument("8 CSRs; at most 7 (max_csrs_per_call)");
        assert_eq!(LimitExceeded::from_status(&plain), None);
        // Another code with the same metadata is not this refusal.
        let other = Status::with_metadata(Code::Internal, "x", status.metadata().clone());
        assert_eq!(LimitExceeded::from_status(&other), None);
        for bad in ["", "-1", " 7", "7x", "99999999999999999999999"] {
            let mut m = MetadataMap::new();
            m.insert(LIMIT_KEY, MetadataValue::from_static("max_csrs_per_call"));
            m.insert(LIMIT_VALUE_KEY, bad.parse().unwrap());
            let s = Status::with_metadata(Code::InvalidArgument, "x", m);
            assert_eq!(LimitExceeded::from_status(&s), None, "{bad:?}");
        }
        let mut m = MetadataMap::new();
        m.insert(LIMIT_KEY, MetadataValue::from_static("max_something_else"));
        m.insert(LIMIT_VALUE_KEY, MetadataValue::from(7u64));
        let s = Status::with_metadata(Code::InvalidArgument, "x", m);
        assert_eq!(LimitExceeded::from_status(&s), None);
    }
}
