//! SPIFFE IDs and trust domains, parsed strictly per the SPIFFE ID specification.
//!
//! A value of [`TrustDomain`] or [`SpiffeId`] is always valid: the only ways to
//! build one run the full syntax check, so code holding one never re-validates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The URI scheme of every SPIFFE ID. Case-sensitive: `SPIFFE://` is refused,
/// as go-spiffe does, so one identity has exactly one spelling.
pub const SCHEME_PREFIX: &str = "spiffe://";

/// The path under which oxid names its own server and agents. No entry,
/// alias or workload SVID may use it.
pub const RESERVED_PATH: &str = "/oxid";

/// Longest trust domain name accepted, in bytes (the spec's DNS-like bound).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest SPIFFE ID accepted, in bytes (URIs longer than this break common
/// URI handling; the spec says implementations may refuse them).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a valid trust domain or SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was the empty string.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The input does not start with the lowercase scheme `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    /// Nothing between the scheme and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain name exceeds [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {len} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong {
        /// Length of the offending trust domain, in bytes.
        len: usize,
    },
    /// A character outside `[a-z0-9._-]` in the trust domain. Covers ports (`:`),
    /// userinfo (`@`), percent-encoding (`%`), uppercase, query and fragment.
    #[error(
        "invalid character {ch:?} at byte {pos} of the trust domain: only lowercase letters, \
         digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar {
        /// The offending character.
        ch: char,
        /// Its byte offset within the trust domain name.
        pos: usize,
    },
    /// A path given on its own does not start with `/`.
    #[error("path must start with '/'")]
    NoLeadingSlash,
    /// A character outside `[a-zA-Z0-9._-]` in a path segment. Covers `?`, `#` and `%`.
    #[error(
        "invalid character {ch:?} at byte {pos} of the path: only letters, digits, '.', '-' \
         and '_' are allowed in a path segment"
    )]
    BadPathChar {
        /// The offending character.
        ch: char,
        /// Its byte offset within the path.
        pos: usize,
    },
    /// Two consecutive slashes in the path.
    #[error("path contains an empty segment (\"//\")")]
    EmptySegment,
    /// A `.` or `..` segment, which URI normalisation would rewrite.
    #[error("path contains a '.' or '..' segment")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path must not end with '/'")]
    TrailingSlash,
    /// The whole ID exceeds [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong {
        /// Length of the offending ID, in bytes.
        len: usize,
    },
}

/// The name of a SPIFFE trust domain, e.g. `example.org`.
///
/// Always lowercase `[a-z0-9._-]`, 1 to 255 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(Box<str>);

impl TrustDomain {
    /// Parses a bare trust domain name such as `example.org`.
    ///
    /// Unlike [`FromStr`], this does not accept a `spiffe://` URI.
    pub fn new(name: &str) -> Result<Self, IdError> {
        check_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself, `spiffe://<name>`, which names
    /// the trust domain in bundles and CA certificates (never a workload).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME_PREFIX}{}", self.0).into(),
            trust_domain: self.clone(),
        }
    }

    /// Builds the SPIFFE ID `spiffe://<self><path>`; `path` must start with `/`.
    pub fn spiffe_id(&self, path: &str) -> Result<SpiffeId, IdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(IdError::NoLeadingSlash);
        }
        check_path(path)?;
        let uri = format!("{SCHEME_PREFIX}{}{path}", self.0);
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: uri.len() });
        }
        Ok(SpiffeId {
            uri: uri.into(),
            trust_domain: self.clone(),
        })
    }
}

/// Accepts either a bare name (`example.org`) or any valid SPIFFE ID, whose
/// trust domain is taken (`spiffe://example.org/x` → `example.org`), as
/// go-spiffe's `TrustDomainFromString` does.
impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(":/") {
            return Ok(s.parse::<SpiffeId>()?.trust_domain);
        }
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
///
/// The path may be empty (the trust domain's own ID); workload and agent
/// identities always have one (see [`SpiffeId::is_trust_domain_id`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// The full URI; kept whole so `as_str` and `Display` never allocate.
    uri: Box<str>,
    /// Kept apart so `trust_domain()` is a borrow, not a parse.
    trust_domain: TrustDomain,
}

impl SpiffeId {
    /// The full URI, e.g. `spiffe://example.org/web`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len() + self.trust_domain.0.len()..]
    }

    /// True for `spiffe://<td>` with no path: a trust domain, not a workload.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// True if this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        &self.trust_domain == trust_domain
    }

    /// The path's segments, without slashes.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// True if the path starts with the whole segments of `prefix`: `/oxid`
    /// and `/oxid/` are prefixes of `/oxid` and `/oxid/agent`, not of
    /// `/oxidant`. An empty prefix (or `/`) matches nothing, so a blank
    /// setting can never select every ID.
    pub fn path_has_prefix(&self, prefix: &str) -> bool {
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return false;
        }
        match self.path().strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// True if the path is under [`RESERVED_PATH`]: such IDs name oxid's own
    /// server and agents, and only the server mints them.
    pub fn is_reserved(&self) -> bool {
        self.path_has_prefix(RESERVED_PATH)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(td)?;
        check_path(path)?;
        Ok(Self {
            uri: s.into(),
            trust_domain,
        })
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

fn check_trust_domain(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if let Some((pos, ch)) = name
        .char_indices()
        .find(|&(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(IdError::BadTrustDomainChar { ch, pos });
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: name.len() });
    }
    Ok(())
}

/// Checks a path that is empty or starts with `/`.
fn check_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // Byte offset of the segment being checked, to report positions in the path.
    let mut offset = 1;
    for segment in path[1..].split('/') {
        match segment {
            "" => {
                return Err(if offset == path.len() {
                    IdError::TrailingSlash
                } else {
                    IdError::EmptySegment
                });
            }
            "." | ".." => return Err(IdError::DotSegment),
            _ => {}
        }
        if let Some((pos, ch)) = segment
            .char_indices()
            .find(|&(_, c)| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::BadPathChar {
                ch,
                pos: offset + pos,
            });
        }
        offset += segment.len() + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors() {
        let id: SpiffeId = "spiffe://example.org/ns/web".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/web");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["ns", "web"]);
        assert!(!id.is_trust_domain_id());
        assert!(id.path_has_prefix("/ns"));
        assert!(id.path_has_prefix("/ns/"));
        assert!(id.path_has_prefix("/ns/web"));
        assert!(!id.path_has_prefix("/n"));
        assert!(!id.path_has_prefix(""));
        assert!(!id.path_has_prefix("/"));
        let td_id = id.trust_domain().id();
        assert_eq!(td_id.as_str(), "spiffe://example.org");
        assert!(td_id.is_trust_domain_id());
    }

    #[test]
    fn reserved_paths() {
        for reserved in [
            "spiffe://td/oxid",
            "spiffe://td/oxid/agent/x509pop/ab",
            "spiffe://td/oxid/server",
        ] {
            assert!(
                reserved.parse::<SpiffeId>().unwrap().is_reserved(),
                "{reserved}"
            );
        }
        for free in [
            "spiffe://td/oxidant",
            "spiffe://td/web/oxid",
            "spiffe://td",
            "spiffe://td/Oxid",
        ] {
            assert!(!free.parse::<SpiffeId>().unwrap().is_reserved(), "{free}");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let err = "spiffe://Example.org/x".parse::<SpiffeId>().unwrap_err();
        assert_eq!(err, IdError::BadTrustDomainChar { ch: 'E', pos: 0 });
        let err = "spiffe://example.org/a/b?c"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert_eq!(err, IdError::BadPathChar { ch: '?', pos: 4 });
        assert!(err.to_string().contains("'?'"), "{err}");
        assert_eq!(
            "spiffe://example.org/a/".parse::<SpiffeId>().unwrap_err(),
            IdError::TrailingSlash
        );
        assert_eq!(
            "spiffe://example.org//a".parse::<SpiffeId>().unwrap_err(),
            IdError::EmptySegment
        );
    }

    #[test]
    fn trust_domain_from_str_accepts_ids() {
        let td: TrustDomain = "spiffe://example.org/x".parse().unwrap();
        assert_eq!(td.as_str(), "example.org");
        assert!(TrustDomain::new("spiffe://example.org").is_err());
    }

    #[test]
    fn builder_checks_path() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            td.spiffe_id("/a/b").unwrap().as_str(),
            "spiffe://example.org/a/b"
        );
        assert_eq!(td.spiffe_id("a"), Err(IdError::NoLeadingSlash));
        assert_eq!(td.spiffe_id("/a/../b"), Err(IdError::DotSegment));
        let long = format!("/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(td.spiffe_id(&long), Err(IdError::TooLong { .. })));
    }

    #[test]
    fn serde_round_trip_and_rejects_bad_ids() {
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://example.org/web\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x/\"").is_err());
    }
}
