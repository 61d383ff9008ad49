//! What the datastore holds. Plain data with serde, so every backend stores
//! the same shapes and a change-feed record carries a whole value.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use oxid_pki::{Selector, SpiffeId, TrustDomain};
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};

/// The ID of a registration entry: 1 to 64 characters of `[A-Za-z0-9_-]`.
/// New IDs are 32 random hex characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryId(String);

/// Why a string is not an entry ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid entry ID {0:?}: 1 to 64 characters of letters, digits, '-' or '_'")]
pub struct InvalidEntryId(pub String);

impl EntryId {
    /// A fresh random ID; fails only if the system random generator does.
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut bytes)?;
        Ok(Self(oxid_pki::hex(&bytes)))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryId {
    type Err = InvalidEntryId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidEntryId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for EntryId {
    type Error = InvalidEntryId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<EntryId> for String {
    fn from(id: EntryId) -> Self {
        id.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

/// A registration entry: "processes matching these selectors, on nodes
/// known as `parent_id`, are `spiffe_id`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Stable ID.
    pub id: EntryId,
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// The agent, node alias or entry this entry is parented on.
    pub parent_id: SpiffeId,
    /// All must be among the caller's selectors. Never empty.
    pub selectors: SelectorSet,
    /// X509-SVID lifetime in seconds; `None` uses the server default.
    pub x509_svid_ttl: Option<u64>,
    /// JWT-SVID lifetime in seconds; `None` uses the server default.
    pub jwt_svid_ttl: Option<u64>,
    /// Extra DNS SANs for the X509-SVID.
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles workloads of this entry receive.
    pub federates_with: BTreeSet<TrustDomain>,
    /// Free text passed to workloads as the SVID hint.
    pub hint: String,
    /// Unix seconds after which the entry no longer applies.
    pub expires_at: Option<u64>,
    /// Unix milliseconds of creation: the first key of the stable SVID order.
    pub created_at: u64,
    /// Store revision of the last change to this entry.
    pub revision: u64,
}

impl Entry {
    /// The fields that make an entry unique: two entries may not give the
    /// same identity to the same selectors under the same parent.
    pub fn unique_key(&self) -> (String, String, Vec<String>) {
        (
            self.spiffe_id.to_string(),
            self.parent_id.to_string(),
            self.selectors.iter().map(ToString::to_string).collect(),
        )
    }
}

/// An entry's selectors: sorted, without repeats, in one allocation. A
/// `BTreeSet` spends a 368-byte node on an entry's one or two selectors,
/// which at 100,000 entries was a seventh of the server's memory. Stored
/// (serde) as the same list a `BTreeSet` writes, so existing records load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SelectorSet(Box<[Selector]>);

impl SelectorSet {
    /// The selectors, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.0.iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `selector` is one of them.
    pub fn contains(&self, selector: &Selector) -> bool {
        self.0.binary_search(selector).is_ok()
    }

    /// Whether every one of them is in `others` (a caller's selectors).
    pub fn is_subset(&self, others: &BTreeSet<Selector>) -> bool {
        self.0.iter().all(|s| others.contains(s))
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        let mut all: Vec<Selector> = iter.into_iter().collect();
        all.sort();
        all.dedup();
        Self(all.into_boxed_slice())
    }
}

impl<const N: usize> From<[Selector; N]> for SelectorSet {
    fn from(selectors: [Selector; N]) -> Self {
        selectors.into_iter().collect()
    }
}

impl From<BTreeSet<Selector>> for SelectorSet {
    fn from(selectors: BTreeSet<Selector>) -> Self {
        Self(selectors.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for SelectorSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<Selector>::deserialize(d)?.into_iter().collect())
    }
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// The agent's SPIFFE ID, e.g. `spiffe://td/oxid/agent/join_token/<id>`.
    pub spiffe_id: SpiffeId,
    /// How it attested: `join_token` or `x509pop`.
    pub attestation_type: String,
    /// Node selectors from attestation.
    pub selectors: BTreeSet<Selector>,
    /// Extra IDs the agent is known by (from a join token's alias).
    pub aliases: BTreeSet<SpiffeId>,
    /// Serial (hex) of the agent's current SVID.
    pub serial: String,
    /// Serial of the previous SVID, accepted until the current one is used.
    pub previous_serial: Option<String>,
    /// While the current SVID is pending (`previous_serial` set), the
    /// SHA-256 (hex) of its public key: a Renew on the previous serial is
    /// accepted only for a CSR holding this key, that is from the agent
    /// retrying a renewal whose answer it lost. Left out when `None`, so
    /// records without one read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_key: Option<String>,
    /// Unix seconds at which the current SVID expires.
    pub expires_at: u64,
    /// Refused on every call and may not re-attest.
    pub banned: bool,
    /// Unix milliseconds of first attestation.
    pub created_at: u64,
}

/// A join token as stored: only its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Non-secret ID (a prefix of the hash), used in the agent's SPIFFE ID.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
    /// Optional node alias the agent using this token is also known by.
    pub alias: Option<SpiffeId>,
}

/// A trust bundle as stored: the SPIFFE bundle JSON of a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredBundle {
    /// The trust domain the bundle speaks for.
    pub trust_domain: TrustDomain,
    /// SPIFFE bundle format JSON.
    pub spiffe_json: String,
}

/// One record of the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Global, gap-free revision of this change.
    pub revision: u64,
    /// What changed.
    pub event: ChangeEvent,
}

/// What a change did. Carries whole values so a follower can update an
/// index without reading the store again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChangeEvent {
    /// An entry was created or updated.
    EntryUpserted {
        /// The entry as stored.
        entry: Entry,
    },
    /// An entry was deleted.
    EntryDeleted {
        /// The entry as it was.
        entry: Entry,
    },
    /// An agent attested, renewed, or was banned/unbanned.
    AgentUpserted {
        /// The agent as stored.
        agent: Agent,
    },
    /// An agent was evicted.
    AgentDeleted {
        /// The agent as it was.
        agent: Agent,
    },
    /// A bundle was set.
    BundleUpserted {
        /// The bundle as stored.
        bundle: StoredBundle,
    },
    /// A federated bundle was deleted.
    BundleDeleted {
        /// Its trust domain.
        trust_domain: TrustDomain,
    },
    /// The CA journal changed (rotation).
    CaJournalUpdated,
    /// A server's authorities in the trust domain's shared bundle changed
    /// (several servers on one database; see [`ServerAuthority`]).
    AuthoritiesChanged {
        /// The server whose rows changed.
        server: String,
    },
}

/// One CA authority of one server, as the trust domain's shared bundle
/// stores it: one row per server and authority, so servers rotating at
/// once each replace only their own rows. Public parts only: the keys stay
/// on the disk of the server that made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerAuthority {
    /// The server's name (`server_name`); filled in by the store.
    pub server: String,
    /// The authority's sequence on that server.
    pub sequence: u64,
    /// The X.509 root (or upstream root) of the authority, base64 DER.
    pub x509_authority: String,
    /// The JWT key ID.
    pub jwt_key_id: String,
    /// The JWT public key, base64 SubjectPublicKeyInfo DER.
    pub jwt_public_key: String,
    /// Unix seconds; nothing the authority signed outlives it.
    pub not_after: u64,
}

/// What another server last reported of itself (several servers on one
/// database; `DataStore::peer_heartbeats`).
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// The server's name.
    pub server: String,
    /// The feed revision as of which its published bundle holds every
    /// server's authorities: its sync streams have pushed them.
    pub applied_revision: u64,
    /// How long ago it beat, by the database's clock (so the servers'
    /// clocks need not agree).
    pub age: std::time::Duration,
    /// It stopped cleanly: not live, however recent its last beat.
    pub stopped: bool,
}

impl Heartbeat {
    /// Running, as far as anyone can tell: not stopped, and beat within
    /// `bound`. A server killed without a clean stop stays live until its
    /// heartbeat is `bound` old.
    pub fn is_live(&self, bound: std::time::Duration) -> bool {
        !self.stopped && self.age < bound
    }
}

/// One server of the database as `server list` shows it: its journal
/// row, its heartbeat and its rows of the shared bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    /// The server's name.
    pub server: String,
    /// It has a CA journal row (false: forgotten, its unexpired
    /// authorities kept until they expire).
    pub has_journal: bool,
    /// Its heartbeat; `None` if it never beat (a server of schema 2, or
    /// one forgotten).
    pub heartbeat: Option<Heartbeat>,
    /// Its authorities, by sequence.
    pub authorities: Vec<ServerAuthority>,
}

/// How `DataStore::forget_server` forgets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForgetOptions {
    /// Remove its unexpired authorities too.
    pub force: bool,
    /// Forget it although it never recorded a heartbeat (a server of
    /// schema 2, or one that has not run since the upgrade), so nothing
    /// shows it is stopped: the operator says it is.
    pub assume_stopped: bool,
}

/// What `DataStore::forget_server` removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// The journal row was removed (false: it had none left).
    pub journal: bool,
    /// Authority rows removed.
    pub removed: Vec<u64>,
    /// Authority rows kept because they have not expired (SVIDs they
    /// signed may still be in use), by sequence; `--force` removes them.
    pub kept: Vec<u64>,
}
