//! Selectors: `type:value` facts about a node or a workload, e.g.
//! `unix:uid:1000` or `x509pop:subject:cn:web-1`. An entry matches a caller
//! when every selector of the entry is among the caller's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest selector accepted, in bytes (type, colon and value).
pub const MAX_SELECTOR_LEN: usize = 1024;

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// No `:` separates the type from the value.
    #[error("selector {0:?} must be type:value, e.g. unix:uid:1000")]
    MissingColon(String),
    /// The type is empty or not `[a-z0-9_]`.
    #[error("selector type {0:?} must be lowercase letters, digits or '_'")]
    BadType(String),
    /// The value is empty.
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    /// The value holds a control character or whitespace at either end.
    #[error("selector value must be printable and not padded with spaces")]
    BadValue,
    /// Longer than [`MAX_SELECTOR_LEN`].
    #[error("selector is {0} bytes; at most {MAX_SELECTOR_LEN} are allowed")]
    TooLong(usize),
    /// Well formed, but no node or workload can ever carry it (e.g.
    /// `unix:uid:-1`): an entry holding it would silently never match.
    #[error("selector {selector:?} can never match: {reason}")]
    Impossible {
        /// The selector.
        selector: String,
        /// Why no caller can have it, and what it should look like.
        reason: &'static str,
    },
    /// A type no oxid attestor produces (see [`KNOWN_TYPES`]), so no node
    /// or workload carries it today; accepted only when the operator says
    /// it is for a future attestor.
    #[error(
        "selector {0:?} is of a type no oxid attestor produces (known types: unix, x509pop); \
         no caller carries it, so an entry holding it would never match \
         (pass --allow-unknown-selector-type if it is for a future attestor)"
    )]
    UnknownType(String),
}

/// The selector types oxid's attestors produce: `unix` (workloads, from the
/// kernel) and `x509pop` (nodes, from the verified certificate path).
/// join_token agents carry no selectors.
pub const KNOWN_TYPES: &[&str] = &["unix", "x509pop"];

/// A parsed selector. Ordered by type, then value, so sets of selectors
/// have one canonical order (stored, compared and printed the same way).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: Box<str>,
    value: Box<str>,
}

impl Selector {
    /// Builds a selector from its parts, with the same checks as parsing.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        format!("{kind}:{value}").parse()
    }

    /// The type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// What the values of one `unix:` or `x509pop:` key look like, as oxid's
/// attestors write them.
#[derive(Clone, Copy)]
enum ValueShape {
    /// A uid or gid: decimal, no sign or leading zero, below 2^32 - 1 (which
    /// the kernel reserves for "no id").
    Id,
    /// A user or group name: no `:` or whitespace.
    Name,
    /// An absolute, normalised path, as `/proc/<pid>/exe` reads.
    AbsolutePath,
    /// A SHA-256 as 64 lowercase hex digits.
    Sha256,
    /// Any non-empty text.
    Text,
}

/// The keys oxid's own attestors emit: for these types, any other key can
/// never match and is refused at create time.
const KNOWN_KEYS: &[(&str, &[(&str, ValueShape)])] = &[
    (
        "unix",
        &[
            ("uid", ValueShape::Id),
            ("gid", ValueShape::Id),
            ("user", ValueShape::Name),
            ("group", ValueShape::Name),
            ("supplementary_gid", ValueShape::Id),
            ("supplementary_group", ValueShape::Name),
            ("path", ValueShape::AbsolutePath),
            ("sha256", ValueShape::Sha256),
        ],
    ),
    (
        "x509pop",
        &[
            ("subject:cn", ValueShape::Text),
            ("san:dns", ValueShape::Text),
            ("ca:fingerprint", ValueShape::Sha256),
        ],
    ),
];

impl ValueShape {
    /// Why `v` cannot be a value of this shape, if it cannot.
    fn refuse(self, v: &str) -> Option<&'static str> {
        match self {
            _ if v.is_empty() => Some("the value after the key is empty"),
            Self::Id => {
                let canonical =
                    v.bytes().all(|b| b.is_ascii_digit()) && (v == "0" || !v.starts_with('0'));
                match v.parse::<u32>() {
                    Ok(id) if canonical && id != u32::MAX => None,
                    _ => Some("an id is a decimal number from 0 to 4294967294"),
                }
            }
            Self::Name => (v.contains(':') || v.chars().any(char::is_whitespace))
                .then_some("a user or group name has no ':' or spaces"),
            Self::AbsolutePath => {
                let normalised = v.starts_with('/')
                    && (v == "/"
                        || (!v.ends_with('/')
                            && v[1..].split('/').all(|c| !matches!(c, "" | "." | ".."))));
                (!normalised).then_some(
                    "a path is absolute and normalised (no '.', '..', '//' or trailing '/'), \
                     as /proc/<pid>/exe shows it",
                )
            }
            Self::Sha256 => (v.len() != 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then_some("a SHA-256 is 64 lowercase hex digits"),
            Self::Text => None,
        }
    }
}

impl Selector {
    /// [`Self::check_possible`], and refuses a type no oxid attestor
    /// produces unless `allow_unknown_type`.
    pub fn check_known(&self, allow_unknown_type: bool) -> Result<(), SelectorError> {
        if !allow_unknown_type && !KNOWN_TYPES.contains(&self.kind()) {
            return Err(SelectorError::UnknownType(self.to_string()));
        }
        self.check_possible()
    }

    /// Refuses a selector of a type oxid attests (`unix`, `x509pop`) whose
    /// key is unknown or whose value no caller can have: an entry should be
    /// refused at once rather than stored and never matched. Other types
    /// pass unchecked.
    pub fn check_possible(&self) -> Result<(), SelectorError> {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(kind, _)| *kind == &*self.kind) else {
            return Ok(());
        };
        let impossible = |reason| SelectorError::Impossible {
            selector: self.to_string(),
            reason,
        };
        let (shape, value) = keys
            .iter()
            .find_map(|(key, shape)| {
                self.value
                    .strip_prefix(key)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(|value| (*shape, value))
            })
            .ok_or_else(|| {
                impossible(match &*self.kind {
                    "unix" => {
                        "unix keys are uid, gid, user, group, supplementary_gid, \
                         supplementary_group, path and sha256, each followed by ':' and a value"
                    }
                    _ => {
                        "x509pop keys are subject:cn, san:dns and ca:fingerprint, each \
                         followed by ':' and a value"
                    }
                })
            })?;
        match shape.refuse(value) {
            Some(reason) => Err(impossible(reason)),
            None => Ok(()),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong(s.len()));
        }
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingColon(s.to_owned()))?;
        if kind.is_empty()
            || !kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(SelectorError::BadType(kind.to_owned()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(s.to_owned()));
        }
        if value.chars().any(char::is_control) || value.trim() != value {
            return Err(SelectorError::BadValue);
        }
        Ok(Self {
            kind: kind.into(),
            value: value.into(),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_value() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!((s.kind(), s.value()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        let s: Selector = "x509pop:subject:cn:web-1".parse().unwrap();
        assert_eq!(s.kind(), "x509pop");
        assert_eq!(
            Selector::new("unix", "path:/usr/bin/app").unwrap().value(),
            "path:/usr/bin/app"
        );
    }

    #[test]
    fn refuses_malformed_selectors() {
        let bad = [
            ("unix", SelectorError::MissingColon("unix".into())),
            (":uid:1", SelectorError::BadType(String::new())),
            ("Unix:uid:1", SelectorError::BadType("Unix".into())),
            ("un ix:uid:1", SelectorError::BadType("un ix".into())),
            ("unix:", SelectorError::EmptyValue("unix:".into())),
            ("unix:uid:1\n", SelectorError::BadValue),
            ("unix: uid:1", SelectorError::BadValue),
            ("unix:a\u{7f}", SelectorError::BadValue),
        ];
        for (input, err) in bad {
            assert_eq!(input.parse::<Selector>().unwrap_err(), err, "{input:?}");
        }
        let long = format!("unix:{}", "a".repeat(MAX_SELECTOR_LEN));
        assert!(matches!(
            long.parse::<Selector>(),
            Err(SelectorError::TooLong(_))
        ));
    }

    #[test]
    fn impossible_values_of_known_types_are_refused() {
        let hash = "ab".repeat(32);
        for ok in [
            "unix:uid:0".to_owned(),
            "unix:uid:4294967294".to_owned(),
            "unix:gid:1000".to_owned(),
            "unix:user:www-data".to_owned(),
            "unix:group:wheel".to_owned(),
            "unix:supplementary_gid:27".to_owned(),
            "unix:path:/usr/bin/app".to_owned(),
            "unix:path:/".to_owned(),
            format!("unix:sha256:{hash}"),
            format!("x509pop:ca:fingerprint:{hash}"),
            "x509pop:subject:cn:web-1".to_owned(),
            "x509pop:san:dns:web-1.example".to_owned(),
            "k8s:ns:anything goes".to_owned(),
        ] {
            let s: Selector = ok.parse().unwrap();
            assert_eq!(s.check_possible(), Ok(()), "{ok}");
        }
        for bad in [
            "unix:uid:-1".to_owned(),
            "unix:uid:".to_owned(),
            "unix:uid".to_owned(),
            "unix:uid:abc".to_owned(),
            "unix:uid:+1".to_owned(),
            "unix:uid:01".to_owned(),
            "unix:uid:4294967295".to_owned(),
            "unix:uid:99999999999".to_owned(),
            "unix:gid:1.5".to_owned(),
            "unix:user:".to_owned(),
            "unix:user:a b".to_owned(),
            "unix:group:a:b".to_owned(),
            "unix:path:usr/bin/app".to_owned(),
            "unix:path:./app".to_owned(),
            "unix:path:/usr/bin/../bin/app".to_owned(),
            "unix:path:/usr//bin/app".to_owned(),
            "unix:path:/usr/bin/".to_owned(),
            "unix:sha256:abc".to_owned(),
            format!("unix:sha256:{}", "AB".repeat(32)),
            format!("unix:sha256:{hash}0"),
            format!("unix:sha256:{}", "zz".repeat(32)),
            "unix:pid:1".to_owned(),
            "unix:uidx:1".to_owned(),
            "x509pop:ca:fingerprint:00".to_owned(),
            "x509pop:subject:cn:".to_owned(),
            "x509pop:san:uri:x".to_owned(),
        ] {
            let s: Selector = bad.parse().unwrap();
            assert!(
                matches!(s.check_possible(), Err(SelectorError::Impossible { .. })),
                "{bad}"
            );
        }
        let e = "unix:uid:-1"
            .parse::<Selector>()
            .unwrap()
            .check_possible()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"unix:uid:-1\" can never match") && e.contains("decimal"),
            "{e}"
        );
    }

    #[test]
    fn unknown_types_need_the_flag() {
        let s: Selector = "k8s:ns:default".parse().unwrap();
        let e = s.check_known(false).unwrap_err();
        assert_eq!(e, SelectorError::UnknownType("k8s:ns:default".into()));
        let m = e.to_string();
        assert!(
            m.contains("unix, x509pop") && m.contains("--allow-unknown-selector-type"),
            "{m}"
        );
        assert_eq!(s.check_known(true), Ok(()));
        for known in ["unix:uid:1", "x509pop:subject:cn:web"] {
            assert_eq!(
                known.parse::<Selector>().unwrap().check_known(false),
                Ok(())
            );
        }
        // The flag does not let an impossible value of a known type through.
        let bad: Selector = "unix:uid:x".parse().unwrap();
        assert!(matches!(
            bad.check_known(true),
            Err(SelectorError::Impossible { .. })
        ));
    }

    #[test]
    fn canonical_order_and_serde() {
        let mut v: Vec<Selector> = ["unix:uid:2", "k8s:ns:a", "unix:gid:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        v.sort();
        let printed: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["k8s:ns:a", "unix:gid:1", "unix:uid:2"]);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Selector>>(&json).unwrap(), v);
        assert!(serde_json::from_str::<Selector>("\"nocolon\"").is_err());
    }
}
