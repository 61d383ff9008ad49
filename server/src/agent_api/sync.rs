//! The sync stream: a snapshot of the agent's authorised entries and the
//! bundles it needs, then a delta whenever the index moves. Computed as a
//! diff against what this stream already sent, so every way an entry can
//! leave the authorised set (deleted, re-parented, alias or node selectors
//! changed, expired) is a removal. A reconnecting agent resumes from the
//! revision it holds (a delta) if that is of this store's incarnation,
//! else gets a snapshot (a restored backup); a server whose index is
//! behind that revision waits for it, bounded, then refuses, so an agent's
//! view never goes back in time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oxid_pki::{SpiffeId, TrustDomain};
use oxid_proto::agent as pb;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;

use super::identity::{Caller, check_agent};
use crate::ca::CaSnapshot;
use crate::clock::{Clock, unix_secs};
use crate::datastore::{Agent, DataStore, DataStoreError, Entry, EntryId};
use crate::index::IndexHandle;

/// How often a stream recomputes without a change.
const RECHECK: Duration = Duration::from_secs(60);

/// Past an expiry the stream wakes for: timers may fire a moment early.
const EXPIRY_MARGIN: Duration = Duration::from_millis(10);

/// Page size bound: the sync contract (ARCHITECTURE.md) caps pages at 1 MiB.
const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// How long a stream whose agent is at a revision this server's index has
/// not reached waits for the index before refusing, so the agent tries
/// another server instead of being taken back in time.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(5);

/// What a sync stream reads: the index, the store (agent records while the
/// index trails, federated bundles), the CA's published bundle, the clock
/// and two defaults. Not the whole service, so what sync can touch is
/// visible here.
pub(crate) struct SyncDeps {
    pub(crate) index: Arc<IndexHandle>,
    pub(crate) store: Arc<dyn DataStore>,
    pub(crate) ca: tokio::sync::watch::Receiver<Arc<CaSnapshot>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) trust_domain: TrustDomain,
    /// X509-SVID TTL for entries without one.
    pub(crate) default_x509_ttl: Duration,
    /// JWT-SVID TTL for entries without one.
    pub(crate) default_jwt_ttl: Duration,
    /// Turns true when the server is stopping: open streams end.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
}

impl SyncDeps {
    fn now_secs(&self) -> u64 {
        unix_secs(self.clock.now())
    }
}

/// What one recomputation found.
struct Delta {
    upserts: Vec<pb::Entry>,
    removed_ids: Vec<String>,
    bundles: Vec<pb::Bundle>,
    removed_bundles: Vec<String>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removed_ids.is_empty()
            && self.bundles.is_empty()
            && self.removed_bundles.is_empty()
    }
}

/// What this stream has sent so far.
#[derive(Default)]
struct Sent {
    entries: HashMap<EntryId, u64>,
    /// Shared with the CA snapshot (own bundle) or the store's value, so a
    /// recompute copies no bundle document.
    bundles: HashMap<TrustDomain, Arc<str>>,
}

/// What the agent says it holds, as if this stream had sent it: entries at
/// their current revision if that is not newer than `revision`, others with
/// a revision that never matches (so they are re-sent, or removed if they
/// left the authorised set). `None` when a snapshot is needed instead.
fn resume_point(inner: &SyncDeps, revision: u64, known: Vec<String>) -> Option<Sent> {
    let index = inner.index.read();
    if revision == 0 || revision > index.revision() {
        return None;
    }
    let entries = known
        .into_iter()
        .filter_map(|id| id.parse::<EntryId>().ok())
        .map(|id| {
            let held = index
                .entry(&id)
                .map(|e| e.revision)
                .filter(|r| *r <= revision)
                .unwrap_or(u64::MAX);
            (id, held)
        })
        .collect();
    Some(Sent {
        entries,
        bundles: HashMap::new(),
    })
}

/// Waits (at most [`CATCH_UP`]) until the index has reached the agent's
/// `revision`. A server whose index stays behind refuses with
/// `Unavailable`: answering would take the agent back in time (an entry
/// deleted since could come back and be signed). Only when the store
/// itself is behind the agent (its newest committed revision is older and
/// its feed is not stale: a restored backup) does the stream go on, with a
/// snapshot.
async fn catch_up(inner: &SyncDeps, revision: u64) -> Result<(), Status> {
    if revision <= inner.index.read().revision() {
        return Ok(());
    }
    let mut index = inner.index.subscribe();
    if tokio::time::timeout(CATCH_UP, index.wait_for(|r| *r >= revision))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        return Ok(());
    }
    let reached = inner.index.read().revision();
    // Read from the database now, not from the revision watch: a watch
    // that trails (a wake-up not yet delivered, a listener stalled short of
    // its timeout) would pass this lagging server off as a restored backup
    // and send the agent older state.
    let committed = inner.store.committed_revision().await.map_err(|e| {
        Status::unavailable(format!(
            "this server is behind the agent (index at revision {reached}, the agent at \
             {revision}) and cannot read the database's revision ({e}); the agent tries \
             another server"
        ))
    })?;
    if committed >= revision || inner.store.feed_stale_since().is_some() {
        return Err(Status::unavailable(format!(
            "this server is behind the agent: its index is at revision {reached}, the agent \
             holds revision {revision}, and it did not catch up within {} s (its change feed \
             lags); the agent tries another server",
            CATCH_UP.as_secs()
        )));
    }
    tracing::warn!(
        agent_revision = revision,
        store_revision = committed,
        "an agent holds a revision newer than the store's (a restored backup?); sending it a snapshot"
    );
    Ok(())
}

/// The revision and entries `request` resumes from: revision 0 (a
/// snapshot) when they are of another incarnation of the store (a restored
/// backup), whose revisions say nothing of this one's. A request without
/// an incarnation (an older agent) is taken by its revision alone.
fn resume_from(inner: &SyncDeps, agent: &Agent, request: pb::SyncRequest) -> (u64, Vec<String>) {
    let pb::SyncRequest {
        revision,
        known_entry_ids,
        incarnation,
    } = request;
    if revision != 0
        && !incarnation.is_empty()
        && !inner.store.holds_history_of(&incarnation, revision)
    {
        tracing::info!(
            agent = %agent.spiffe_id,
            agent_revision = revision,
            agent_incarnation = %incarnation,
            store_incarnation = %inner.store.incarnation(),
            "an agent holds a view of another incarnation of the store (a restored backup?); \
             sending it a snapshot"
        );
        return (0, Vec::new());
    }
    (revision, known_entry_ids)
}

/// Starts the stream for `agent`, called by `caller`: a snapshot, or, for
/// an agent that says which revision and entries it holds (of this
/// store's incarnation), a delta from there. It ends when the caller's
/// SVID expires or is retired (the renewed one was used), when the agent
/// is banned or evicted.
pub(crate) fn start(
    inner: Arc<SyncDeps>,
    agent: Agent,
    caller: Caller,
    request: pb::SyncRequest,
    aged_at: Option<tokio::time::Instant>,
) -> mpsc::Receiver<Result<pb::SyncResponse, Status>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let (revision, known) = resume_from(&inner, &agent, request);
        if let Err(status) = catch_up(&inner, revision).await {
            let _ = tx.send(Err(status)).await;
            return;
        }
        let resumed = resume_point(&inner, revision, known);
        let mut snapshot = resumed.is_none();
        let mut sent = resumed.unwrap_or_default();
        // The first message always goes out (at least the bundles), so the
        // agent knows it is current.
        let mut first = true;
        let mut changes = inner.index.subscribe();
        // The CA's own bundle reaches the store only after it is published
        // here: waking on the snapshot too sends it without waiting for
        // the index.
        let mut authority = inner.ca.clone();
        let mut stopping = inner.stopping.clone();
        loop {
            changes.borrow_and_update();
            authority.borrow_and_update();
            // From the store while the index trails it: nothing is sent
            // once a ban or an eviction has answered.
            let current = match inner
                .index
                .agent_now(inner.store.as_ref(), &agent.spiffe_id)
                .await
            {
                Ok(current) => current,
                Err(e) => {
                    let e = super::AgentApiError::from(e);
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let current = match current {
                Some(a) if !a.banned => a,
                Some(_) => {
                    let _ = tx
                        .send(Err(Status::permission_denied("agent is banned")))
                        .await;
                    return;
                }
                None => {
                    let _ = tx
                        .send(Err(Status::permission_denied(
                            "agent was evicted; it must attest again",
                        )))
                        .await;
                    return;
                }
            };
            let still = check_agent(&current, &caller.serial)
                .and_then(|()| caller.check_expiry(inner.clock.now()));
            if let Err(e) = still {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            let (delta, revision, closure, expiry) =
                match compute(&inner, &current, &mut sent).await {
                    Ok(d) => d,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
            if first || !delta.is_empty() {
                let incarnation = inner.store.incarnation();
                for page in paginate(delta, revision, snapshot, incarnation) {
                    if tx.send(Ok(page)).await.is_err() {
                        return;
                    }
                }
                snapshot = false;
                first = false;
            }
            // Wait for a change that may concern this agent, or for the
            // next expiry (an entry, a node alias, the caller's SVID), which
            // changes what it gets without any change to wake it.
            let mut seen = revision;
            let recheck = tokio::time::sleep(wake_after(&inner, &caller, expiry));
            tokio::pin!(recheck);
            loop {
                tokio::select! {
                    r = changes.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let index = inner.index.read();
                        if index.may_concern(seen, &agent.spiffe_id, &closure) {
                            break;
                        }
                        seen = index.revision();
                    }
                    r = authority.changed() => {
                        if r.is_err() {
                            return;
                        }
                        break;
                    }
                    () = tx.closed() => return,
                    r = stopping.changed() => {
                        // Read the flag in its own statement: the borrow
                        // guard must not live across an await.
                        let stop = r.is_err() || *stopping.borrow();
                        if stop {
                            let end = oxid_proto::stream_end::StreamEnd::ShuttingDown
                                .attach(Status::unavailable("the server is shutting down"));
                            let _ = tx.send(Err(end)).await;
                            return;
                        }
                    }
                    () = &mut recheck => break,
                    // The connection's maximum age: the agent reconnects,
                    // to the next server first.
                    () = until(aged_at) => {
                        let end = oxid_proto::stream_end::StreamEnd::ConnectionAged.attach(
                            Status::unavailable(
                                "the connection reached the server's max_connection_age; reconnect",
                            ),
                        );
                        let _ = tx.send(Err(end)).await;
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Completes at `at`, never without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn to_pb(e: &Entry, inner: &SyncDeps) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl: e.x509_svid_ttl.unwrap_or(inner.default_x509_ttl.as_secs()),
        jwt_svid_ttl: e.jwt_svid_ttl.unwrap_or(inner.default_jwt_ttl.as_secs()),
        dns_names: e.dns_names.clone(),
        federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
        hint: e.hint.clone(),
        created_at: e.created_at,
        revision: e.revision,
        expires_at: e.expires_at.unwrap_or(0),
    }
}

/// How long a stream may wait before what it sent can be out of date by
/// expiry alone: until the next entry or node-alias expiry (unix second
/// `expiry`) or the caller's notAfter, at most [`RECHECK`].
fn wake_after(inner: &SyncDeps, caller: &Caller, expiry: Option<u64>) -> Duration {
    let now = inner.clock.now();
    let until = |t: SystemTime| t.duration_since(now).unwrap_or_default() + EXPIRY_MARGIN;
    let mut wait = RECHECK.min(until(caller.not_after));
    if let Some(t) = expiry {
        wait = wait.min(until(UNIX_EPOCH + Duration::from_secs(t)));
    }
    wait
}

/// The delta since `sent`, the revision it brings the agent to, the
/// agent's [`EntryIndex::closure`](crate::index::EntryIndex::closure) at
/// that revision, and the next expiry that changes what it gets.
async fn compute(
    inner: &SyncDeps,
    agent: &Agent,
    sent: &mut Sent,
) -> Result<(Delta, u64, HashSet<SpiffeId>, Option<u64>), Status> {
    let now = inner.now_secs();
    let (entries, revision, closure, expiry) = {
        let index = inner.index.read();
        let authorized = index.authorized(agent, now);
        let closure = index.closure(agent, &authorized, now);
        let expiry = index.next_expiry(agent, &authorized, now);
        let entries: Vec<Entry> = authorized.into_iter().cloned().collect();
        (entries, index.revision(), closure, expiry)
    };
    let mut delta = Delta {
        upserts: vec![],
        removed_ids: vec![],
        bundles: vec![],
        removed_bundles: vec![],
    };
    let mut now_sent: HashMap<EntryId, u64> = HashMap::with_capacity(entries.len());
    let mut federated: BTreeSet<TrustDomain> = BTreeSet::new();
    for e in &entries {
        federated.extend(e.federates_with.iter().cloned());
        if sent.entries.get(&e.id) != Some(&e.revision) {
            delta.upserts.push(to_pb(e, inner));
        }
        now_sent.insert(e.id.clone(), e.revision);
    }
    delta.removed_ids = sent
        .entries
        .keys()
        .filter(|id| !now_sent.contains_key(*id))
        .map(ToString::to_string)
        .collect();
    sent.entries = now_sent;

    let mut bundles: HashMap<TrustDomain, Arc<str>> = HashMap::new();
    bundles.insert(
        inner.trust_domain.clone(),
        inner.ca.borrow().spiffe_json().clone(),
    );
    for td in federated {
        match inner.store.get_bundle(&td).await {
            Ok(b) => {
                bundles.insert(td, b.spiffe_json.into());
            }
            Err(DataStoreError::NotFound(_)) => {}
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
    }
    for (td, json) in &bundles {
        if sent.bundles.get(td) != Some(json) {
            delta.bundles.push(pb::Bundle {
                trust_domain: td.to_string(),
                spiffe_json: json.to_string(),
            });
        }
    }
    delta.removed_bundles = sent
        .bundles
        .keys()
        .filter(|td| !bundles.contains_key(*td))
        .map(ToString::to_string)
        .collect();
    sent.bundles = bundles;
    Ok((delta, revision, closure, expiry))
}

/// Splits a delta into pages under [`MAX_PAGE_BYTES`]; all but the last say
/// `more`. Each carries the store's incarnation with the revision.
fn paginate(
    delta: Delta,
    revision: u64,
    snapshot: bool,
    incarnation: &str,
) -> Vec<pb::SyncResponse> {
    let blank = |first: bool| pb::SyncResponse {
        revision,
        incarnation: incarnation.to_owned(),
        snapshot: snapshot && first,
        more: false,
        upserts: vec![],
        removed_ids: vec![],
        bundles: vec![],
        removed_bundles: vec![],
    };
    let mut pages = vec![blank(true)];
    pages[0].bundles = delta.bundles;
    pages[0].removed_bundles = delta.removed_bundles;
    pages[0].removed_ids = delta.removed_ids;
    for e in delta.upserts {
        let last = pages.len() - 1;
        if pages[last].encoded_len() + e.encoded_len() + 8 > MAX_PAGE_BYTES
            && !pages[last].upserts.is_empty()
        {
            pages[last].more = true;
            pages.push(blank(false));
        }
        let last = pages.len() - 1;
        pages[last].upserts.push(e);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize, size: usize) -> pb::Entry {
        pb::Entry {
            id: format!("e{i}"),
            hint: "x".repeat(size),
            ..Default::default()
        }
    }

    #[test]
    fn pages_stay_under_the_cap_and_flag_more() {
        let delta = Delta {
            upserts: (0..40).map(|i| entry(i, 100_000)).collect(),
            removed_ids: vec!["gone".into()],
            bundles: vec![],
            removed_bundles: vec![],
        };
        let pages = paginate(delta, 7, true, "i");
        assert!(pages.len() >= 4);
        assert!(pages[0].snapshot && !pages[1].snapshot);
        for (i, p) in pages.iter().enumerate() {
            assert!(p.encoded_len() <= MAX_PAGE_BYTES);
            assert_eq!(p.more, i + 1 < pages.len());
            assert_eq!(p.revision, 7);
            assert_eq!(p.incarnation, "i");
        }
        assert_eq!(pages.iter().map(|p| p.upserts.len()).sum::<usize>(), 40);
        assert_eq!(pages[0].removed_ids, ["gone"]);
    }

    #[test]
    fn an_empty_snapshot_is_one_page() {
        let delta = Delta {
            upserts: vec![],
            removed_ids: vec![],
            bundles: vec![],
            removed_bundles: vec![],
        };
        let pages = paginate(delta, 1, true, "i");
        assert_eq!(pages.len(), 1);
        assert!(pages[0].snapshot && !pages[0].more);
    }
}
