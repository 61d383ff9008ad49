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
}

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
