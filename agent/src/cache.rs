//! What the agent knows, published as immutable snapshots: authorised
//! entries, the SVIDs signed for them, and the bundles. Workload API streams
//! watch the snapshot and send a full new state whenever it changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::{Pkcs8Key, Selector, SpiffeId, TrustDomain};
use oxid_proto::agent as pb;
use tokio::sync::watch;
use tokio::time::Instant;

/// A registration entry as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Entry ID.
    pub id: String,
    /// The identity a matching workload gets.
    pub spiffe_id: SpiffeId,
    /// All must be among the workload's selectors.
    pub selectors: BTreeSet<Selector>,
    /// X509-SVID TTL.
    pub x509_svid_ttl: Duration,
    /// JWT-SVID TTL.
    pub jwt_svid_ttl: Duration,
    /// Federated trust domains whose bundles the workload gets.
    pub federates_with: BTreeSet<TrustDomain>,
    /// Hint for the workload.
    pub hint: String,
    /// Creation time (the server's, to the millisecond): first key of the
    /// SVID order.
    pub created_at: SystemTime,
    /// Server revision of the entry.
    pub revision: u64,
}

impl Entry {
    /// Parses a synced entry; `None` (logged) if the server sent nonsense.
    pub fn from_pb(e: &pb::Entry) -> Option<Self> {
        let parsed = (|| -> Result<Self, String> {
            Ok(Self {
                id: e.id.clone(),
                spiffe_id: e.spiffe_id.parse().map_err(|err| format!("{err}"))?,
                selectors: e
                    .selectors
                    .iter()
                    .map(|s| s.parse().map_err(|err| format!("{err}")))
                    .collect::<Result<_, _>>()?,
                x509_svid_ttl: Duration::from_secs(e.x509_svid_ttl),
                jwt_svid_ttl: Duration::from_secs(e.jwt_svid_ttl),
                federates_with: e
                    .federates_with
                    .iter()
                    .map(|t| TrustDomain::new(t).map_err(|err| format!("{err}")))
                    .collect::<Result<_, _>>()?,
                hint: e.hint.clone(),
                created_at: SystemTime::UNIX_EPOCH
                    .checked_add(Duration::from_millis(e.created_at))
                    .ok_or("created_at out of range")?,
                revision: e.revision,
            })
        })();
        match parsed {
            Ok(entry) if !entry.selectors.is_empty() => Some(entry),
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(entry = %e.id, error = %err, "ignoring an unreadable synced entry");
                None
            }
        }
    }
}

/// An X509-SVID held for an entry.
#[derive(Debug)]
pub struct HeldSvid {
    /// The certificates, leaf first, then intermediates, as one DER
    /// concatenation: exactly the bytes the Workload API sends.
    pub chain_der: Vec<u8>,
    /// Its private key (generated here, never sent), kept only as the
    /// PKCS#8 the workload receives: the agent never signs with it.
    pub key: Pkcs8Key,
    /// The entry revision it was signed for.
    pub entry_revision: u64,
    /// When it stops being valid, on the monotonic clock (see
    /// [`crate::clock`]): never served after this.
    pub expires: Instant,
    /// When to replace it (about half-life, jittered), monotonic too.
    pub rotate_at: Instant,
}

/// The authorised entries in SVID order (creation time, then ID), indexed
/// by ID. Snapshots share one `Arc<Entries>` until the entries change, so
/// publishing a signed SVID copies no entry: with thousands of entries,
/// copying them on every update was most of the agent's allocation churn.
#[derive(Debug, Default)]
pub struct Entries {
    ordered: Vec<Arc<Entry>>,
    /// Entry ID → position in `ordered`.
    by_id: HashMap<String, usize>,
}

impl Entries {
    /// `entries` put in SVID order and indexed.
    pub fn new(mut entries: Vec<Arc<Entry>>) -> Self {
        entries.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let by_id = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.clone(), i))
            .collect();
        Self {
            ordered: entries,
            by_id,
        }
    }

    /// In SVID order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.ordered.iter()
    }

    /// Whether entry `id` is authorised.
    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

/// The agent's view at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// True once the first sync snapshot has arrived.
    pub synced: bool,
    /// Authorised entries.
    pub entries: Arc<Entries>,
    /// SVIDs by entry ID (shared keys: a snapshot copy allocates no string).
    pub svids: HashMap<Arc<str>, Arc<HeldSvid>>,
    /// Bundles by trust domain (own and federated).
    pub bundles: BTreeMap<TrustDomain, Arc<Bundle>>,
}

/// Counters the agent's metrics report.
#[derive(Debug, Default)]
pub struct Counters {
    /// X509-SVIDs replaced (rotation or entry change).
    pub rotations: std::sync::atomic::AtomicU64,
    /// Workload attestations refused.
    pub attestation_failures: std::sync::atomic::AtomicU64,
    /// When the last sync snapshot or delta was applied.
    pub last_sync: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether the sync stream is up now: `/ready` is false without it,
    /// while the Workload API keeps serving what the agent holds.
    pub server_connected: std::sync::atomic::AtomicBool,
    /// SDS responses Envoy rejected (requests with `error_detail`).
    pub sds_nacks: std::sync::atomic::AtomicU64,
    /// Times the sync stream came back up on another server than the one
    /// it was lost from (not counting moves at the connection's maximum
    /// age).
    pub server_failovers: std::sync::atomic::AtomicU64,
    /// The server the sync stream is (or was last) on, as
    /// `address` or `address (ip:port)`.
    pub server: std::sync::Mutex<Option<String>>,
}

/// The published snapshot.
#[derive(Debug)]
pub struct Cache {
    tx: watch::Sender<Arc<Snapshot>>,
    /// The agent's trust domain.
    pub trust_domain: TrustDomain,
    /// Metrics counters.
    pub counters: Counters,
    /// Entries a workload asked for that have no SVID yet (beyond the
    /// pre-signed ones): the SVID manager signs them next.
    pub demand: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Wakes the SVID manager when `demand` grows.
    pub demand_notify: tokio::sync::Notify,
}

impl Cache {
    /// An empty cache.
    pub fn new(trust_domain: TrustDomain) -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            tx,
            trust_domain,
            counters: Counters::default(),
            demand: std::sync::Mutex::new(std::collections::HashSet::new()),
            demand_notify: tokio::sync::Notify::new(),
        }
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Wakes on every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Records that workloads need SVIDs for `entry_ids` now.
    pub fn request(&self, entry_ids: impl IntoIterator<Item = String>) {
        let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
        let before = demand.len();
        demand.extend(entry_ids);
        if demand.len() > before {
            drop(demand);
            self.demand_notify.notify_one();
        }
    }

    /// Replaces the snapshot with `f(current)`.
    pub fn update(&self, f: impl FnOnce(&Snapshot) -> Snapshot) {
        self.tx.send_modify(|s| {
            *s = Arc::new(f(s));
        });
    }
}

impl Snapshot {
    /// A copy with the same entries, SVIDs and bundles (cheap: shared
    /// `Arc`s).
    pub fn clone_shallow(&self) -> Self {
        Self {
            synced: self.synced,
            entries: self.entries.clone(),
            svids: self.svids.clone(),
            bundles: self.bundles.clone(),
        }
    }

    /// Entries whose selectors are all among `selectors`, in SVID order.
    pub fn matching<'a>(
        &'a self,
        selectors: &BTreeSet<Selector>,
    ) -> impl Iterator<Item = &'a Entry> {
        let selectors = selectors.clone();
        self.entries
            .iter()
            .map(|e| e.as_ref())
            .filter(move |e| e.selectors.is_subset(&selectors))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(id: &str, created_at_ms: u64) -> Arc<Entry> {
        Arc::new(
            Entry::from_pb(&pb::Entry {
                id: id.into(),
                spiffe_id: format!("spiffe://example.org/{id}"),
                selectors: vec!["unix:uid:1".into()],
                x509_svid_ttl: 3600,
                jwt_svid_ttl: 300,
                created_at: created_at_ms,
                revision: 1,
                ..Default::default()
            })
            .unwrap(),
        )
    }

    #[test]
    fn synced_times_are_typed_in_their_wire_units() {
        let e = entry("a", 1_700_000_000_123);
        assert_eq!(e.x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(e.jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(
            e.created_at,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
        );
        // SVID order: by creation time to the millisecond, then by ID.
        let entries = Entries::new(vec![entry("b", 1001), entry("c", 1000), entry("a", 1001)]);
        let order: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
    }
}
