//! Which entries an agent may get SVIDs for, from an in-memory index kept
//! current by the store's change feed (no database scan per call).
//!
//! An agent is known by its own ID, by the aliases of its join token, and
//! by every node-alias entry (parent = the server's ID) whose selectors are
//! all among its node selectors. It is authorised for entries parented on
//! any of those IDs and, recursively, on the SPIFFE ID of any entry already
//! authorised for it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use oxid_pki::SpiffeId;

use crate::datastore::{Agent, ChangeEvent, Entry, EntryId};

/// Revisions of [`Touched`] history kept: a sync stream that fell further
/// behind than this simply recomputes.
const TOUCH_HISTORY: usize = 65_536;

/// What one applied change can affect.
#[derive(Debug, Clone)]
enum Touched {
    /// Entries hanging from these parent IDs (an entry's parent before and
    /// after the change).
    Parents(SpiffeId, Option<SpiffeId>),
    /// This agent's record (selectors, aliases, ban).
    Agent(SpiffeId),
    /// Every agent (bundles).
    Everyone,
}

/// The index.
#[derive(Debug, Clone)]
pub struct EntryIndex {
    server_id: SpiffeId,
    entries: HashMap<EntryId, Entry>,
    by_parent: HashMap<SpiffeId, BTreeSet<EntryId>>,
    /// Entries by the SPIFFE ID they grant: answers "is this entry
    /// authorised" by walking up from it, instead of listing everything an
    /// agent may have on every SVID signed.
    /// Almost always one entry per SPIFFE ID, so a `Vec` rather than a
    /// `BTreeSet`, whose first node alone is about 270 bytes.
    by_spiffe_id: HashMap<SpiffeId, Vec<EntryId>>,
    agents: HashMap<SpiffeId, Agent>,
    /// The store revision the index reflects.
    revision: u64,
    /// What each recent revision touched, oldest first: with a thousand
    /// agents connected, a change must wake only the sync streams it can
    /// concern, not make every one of them recompute its entries.
    touched: VecDeque<(u64, Touched)>,
    /// Changes at or before this revision are not in `touched`.
    touched_floor: u64,
}

impl EntryIndex {
    /// An empty index for a server whose own ID is `server_id`.
    pub fn new(server_id: SpiffeId) -> Self {
        Self {
            server_id,
            entries: HashMap::new(),
            by_parent: HashMap::new(),
            by_spiffe_id: HashMap::new(),
            agents: HashMap::new(),
            revision: 0,
            touched: VecDeque::new(),
            touched_floor: 0,
        }
    }

    /// The store revision the index reflects.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Loads a full state at `revision`.
    pub fn load(&mut self, entries: Vec<Entry>, agents: Vec<Agent>, revision: u64) {
        self.entries.clear();
        self.by_parent.clear();
        self.by_spiffe_id.clear();
        self.agents.clear();
        for e in entries {
            self.insert(e);
        }
        for a in agents {
            self.agents.insert(a.spiffe_id.clone(), a);
        }
        self.revision = revision;
        self.touched.clear();
        self.touched_floor = revision;
    }

    /// Applies one change of the feed.
    pub fn apply(&mut self, revision: u64, event: &ChangeEvent) {
        let touched = match event {
            ChangeEvent::EntryUpserted { entry } => {
                let before = self.entries.get(&entry.id).map(|e| e.parent_id.clone());
                self.remove(&entry.id);
                self.insert(entry.clone());
                Touched::Parents(entry.parent_id.clone(), before)
            }
            ChangeEvent::EntryDeleted { entry } => {
                let before = self.entries.get(&entry.id).map(|e| e.parent_id.clone());
                self.remove(&entry.id);
                Touched::Parents(entry.parent_id.clone(), before)
            }
            ChangeEvent::AgentUpserted { agent } => {
                self.agents.insert(agent.spiffe_id.clone(), agent.clone());
                Touched::Agent(agent.spiffe_id.clone())
            }
            ChangeEvent::AgentDeleted { agent } => {
                self.agents.remove(&agent.spiffe_id);
                Touched::Agent(agent.spiffe_id.clone())
            }
            // Bundles, and anything a later version adds: everyone looks.
            _ => Touched::Everyone,
        };
        self.touched.push_back((revision, touched));
        while self.touched.len() > TOUCH_HISTORY {
            if let Some((r, _)) = self.touched.pop_front() {
                self.touched_floor = self.touched_floor.max(r);
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// The IDs whose entries are authorised for `agent`, given `authorized`
    /// (from [`EntryIndex::authorized`] at `now`): its identities, the
    /// SPIFFE IDs of those entries, and the server's ID (node aliases). A
    /// change to an entry hanging from none of these cannot change what the
    /// agent gets.
    pub fn closure(&self, agent: &Agent, authorized: &[&Entry], now: u64) -> HashSet<SpiffeId> {
        let mut ids: HashSet<SpiffeId> = self.identities(agent, now).into_iter().collect();
        ids.extend(authorized.iter().map(|e| e.spiffe_id.clone()));
        ids.insert(self.server_id.clone());
        ids
    }

    /// Whether a change applied after revision `since` may change the
    /// entries or bundles of `agent`, whose [`EntryIndex::closure`] at
    /// `since` was `closure`. True when the history does not reach back
    /// that far.
    pub fn may_concern(&self, since: u64, agent: &SpiffeId, closure: &HashSet<SpiffeId>) -> bool {
        if since < self.touched_floor {
            return true;
        }
        self.touched
            .iter()
            .rev()
            .take_while(|(r, _)| *r > since)
            .any(|(_, t)| match t {
                Touched::Parents(now, before) => {
                    closure.contains(now) || before.as_ref().is_some_and(|b| closure.contains(b))
                }
                Touched::Agent(id) => id == agent,
                Touched::Everyone => true,
            })
    }

    fn insert(&mut self, e: Entry) {
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        let same_id = self.by_spiffe_id.entry(e.spiffe_id.clone()).or_default();
        if !same_id.contains(&e.id) {
            same_id.push(e.id.clone());
        }
        self.entries.insert(e.id.clone(), e);
    }

    fn remove(&mut self, id: &EntryId) {
        if let Some(old) = self.entries.remove(id) {
            unlink(&mut self.by_parent, &old.parent_id, id);
            if let Some(ids) = self.by_spiffe_id.get_mut(&old.spiffe_id) {
                ids.retain(|other| other != id);
                if ids.is_empty() {
                    self.by_spiffe_id.remove(&old.spiffe_id);
                }
            }
        }
    }

    /// Number of entries.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of agents.
    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// An agent record.
    pub fn agent(&self, id: &SpiffeId) -> Option<&Agent> {
        self.agents.get(id)
    }

    /// One entry.
    pub fn entry(&self, id: &EntryId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// The IDs an agent is known by at unix second `now`: its own, its
    /// token aliases, and the unexpired node aliases its selectors satisfy.
    pub fn identities(&self, agent: &Agent, now: u64) -> BTreeSet<SpiffeId> {
        let mut ids: BTreeSet<SpiffeId> = agent.aliases.iter().cloned().collect();
        ids.insert(agent.spiffe_id.clone());
        ids.extend(self.node_aliases(agent, now).map(|a| a.spiffe_id.clone()));
        ids
    }

    /// The unexpired node-alias entries whose selectors `agent` satisfies.
    fn node_aliases<'a>(&'a self, agent: &'a Agent, now: u64) -> impl Iterator<Item = &'a Entry> {
        self.by_parent
            .get(&self.server_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.entries.get(id))
            .filter(move |a| a.expires_at.is_none_or(|t| t > now))
            .filter(|a| a.selectors.is_subset(&agent.selectors))
    }

    /// The first unix second after `now` at which what `agent` gets changes
    /// by expiry alone: the earliest `expires_at` among `authorized` (from
    /// [`EntryIndex::authorized`] at `now`) and its node aliases.
    pub fn next_expiry(&self, agent: &Agent, authorized: &[&Entry], now: u64) -> Option<u64> {
        authorized
            .iter()
            .copied()
            .chain(self.node_aliases(agent, now))
            .filter_map(|e| e.expires_at)
            .filter(|t| *t > now)
            .min()
    }

    /// Entries authorised for `agent` at unix second `now` (expired entries
    /// excluded), in the stable order: creation time, then ID.
    pub fn authorized(&self, agent: &Agent, now: u64) -> Vec<&Entry> {
        let mut seen_ids: HashSet<SpiffeId> = HashSet::new();
        let mut queue: VecDeque<SpiffeId> = VecDeque::new();
        for id in self.identities(agent, now) {
            if seen_ids.insert(id.clone()) {
                queue.push_back(id);
            }
        }
        let mut out: Vec<&Entry> = Vec::new();
        let mut seen_entries: HashSet<&EntryId> = HashSet::new();
        while let Some(parent) = queue.pop_front() {
            for child in self.by_parent.get(&parent).into_iter().flatten() {
                let Some(e) = self.entries.get(child) else {
                    continue;
                };
                if e.expires_at.is_some_and(|t| t <= now) || !seen_entries.insert(&e.id) {
                    continue;
                }
                out.push(e);
                if seen_ids.insert(e.spiffe_id.clone()) {
                    queue.push_back(e.spiffe_id.clone());
                }
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out
    }

    /// True if `entry` is authorised for `agent` at `now`: the same answer
    /// as looking for it in [`EntryIndex::authorized`], found by walking
    /// from the entry up its parents (any unexpired entry granting the
    /// parent's ID) to one of the agent's identities.
    pub fn is_authorized(&self, agent: &Agent, entry: &EntryId, now: u64) -> bool {
        let live = |e: &&Entry| e.expires_at.is_none_or(|t| t > now);
        let Some(entry) = self.entries.get(entry).filter(live) else {
            return false;
        };
        let identities = self.identities(agent, now);
        // Parent IDs already followed: entries may form cycles.
        let mut followed: HashSet<&SpiffeId> = HashSet::new();
        let mut parents = vec![&entry.parent_id];
        while let Some(parent) = parents.pop() {
            if identities.contains(parent) {
                return true;
            }
            if !followed.insert(parent) {
                continue;
            }
            let granting = self.by_spiffe_id.get(parent).into_iter().flatten();
            parents.extend(
                granting
                    .filter_map(|id| self.entries.get(id))
                    .filter(live)
                    .map(|e| &e.parent_id),
            );
        }
        false
    }
}

/// Removes `id` from the set under `key`, and the set once empty.
fn unlink(map: &mut HashMap<SpiffeId, BTreeSet<EntryId>>, key: &SpiffeId, id: &EntryId) {
    if let Some(ids) = map.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "spiffe://example.org";

    fn id(path: &str) -> SpiffeId {
        format!("{TD}{path}").parse().unwrap()
    }

    fn entry(eid: &str, spiffe: &str, parent: &str, sels: &[&str], created: u64) -> Entry {
        Entry {
            id: eid.parse().unwrap(),
            spiffe_id: id(spiffe),
            parent_id: id(parent),
            selectors: sels.iter().map(|s| s.parse().unwrap()).collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: vec![],
            federates_with: BTreeSet::new(),
            hint: String::new(),
            expires_at: None,
            created_at: created,
            revision: 1,
        }
    }

    fn agent(path: &str, sels: &[&str], aliases: &[&str]) -> Agent {
        Agent {
            spiffe_id: id(path),
            attestation_type: "x509pop".into(),
            selectors: sels.iter().map(|s| s.parse().unwrap()).collect(),
            aliases: aliases.iter().map(|a| id(a)).collect(),
            serial: "1".into(),
            previous_serial: None,
            pending_key: None,
            expires_at: 0,
            banned: false,
            created_at: 0,
        }
    }

    fn ids(v: Vec<&Entry>) -> Vec<String> {
        v.iter().map(|e| e.id.to_string()).collect()
    }

    fn index(entries: Vec<Entry>) -> EntryIndex {
        let mut idx = EntryIndex::new(id("/oxid/server"));
        idx.load(entries, vec![], 1);
        idx
    }

    #[test]
    fn direct_alias_and_recursive_entries() {
        let a = agent(
            "/oxid/agent/x509pop/aa",
            &["x509pop:subject:cn:web-1", "x509pop:ca:fingerprint:f"],
            &[],
        );
        let idx = index(vec![
            entry(
                "direct",
                "/web",
                "/oxid/agent/x509pop/aa",
                &["unix:uid:1"],
                3,
            ),
            entry(
                "alias",
                "/nodes/web",
                "/oxid/server",
                &["x509pop:subject:cn:web-1"],
                1,
            ),
            entry("via-alias", "/api", "/nodes/web", &["unix:uid:2"], 2),
            entry("nested", "/api/worker", "/api", &["unix:uid:3"], 4),
            entry(
                "other-alias",
                "/nodes/db",
                "/oxid/server",
                &["x509pop:subject:cn:db-1"],
                1,
            ),
            entry("via-other", "/db", "/nodes/db", &["unix:uid:4"], 5),
            entry(
                "foreign",
                "/x",
                "/oxid/agent/x509pop/bb",
                &["unix:uid:5"],
                6,
            ),
        ]);
        assert_eq!(
            ids(idx.authorized(&a, 0)),
            ["via-alias", "direct", "nested"]
        );
        assert!(idx.is_authorized(&a, &"nested".parse().unwrap(), 0));
        assert!(!idx.is_authorized(&a, &"foreign".parse().unwrap(), 0));
        assert!(
            !idx.is_authorized(&a, &"alias".parse().unwrap(), 0),
            "alias definitions are not workload entries"
        );
    }

    #[test]
    fn token_aliases_count() {
        let a = agent("/oxid/agent/join_token/t1", &[], &["/group/edge"]);
        let idx = index(vec![entry(
            "e",
            "/edge-app",
            "/group/edge",
            &["unix:uid:1"],
            1,
        )]);
        assert_eq!(ids(idx.authorized(&a, 0)), ["e"]);
    }

    #[test]
    fn cycles_terminate_and_expired_entries_drop_out() {
        let a = agent("/oxid/agent/join_token/t1", &[], &[]);
        let mut e2 = entry("b", "/a", "/b", &["unix:uid:1"], 2);
        e2.expires_at = Some(100);
        let idx = index(vec![
            entry("a", "/b", "/oxid/agent/join_token/t1", &["unix:uid:1"], 1),
            e2,
            entry("c", "/b", "/a", &["unix:uid:2"], 3),
        ]);
        assert_eq!(ids(idx.authorized(&a, 50)), ["a", "b", "c"]);
        assert_eq!(ids(idx.authorized(&a, 100)), ["a"]);
    }

    #[test]
    fn expired_node_aliases_grant_nothing_and_their_expiry_is_the_next() {
        let a = agent("/oxid/agent/x509pop/aa", &["x509pop:subject:cn:n1"], &[]);
        let mut alias = entry(
            "alias",
            "/nodes/n",
            "/oxid/server",
            &["x509pop:subject:cn:n1"],
            1,
        );
        alias.expires_at = Some(100);
        let mut app = entry("app", "/app", "/nodes/n", &["unix:uid:1"], 2);
        app.expires_at = Some(200);
        let idx = index(vec![alias, app]);
        let app_id: EntryId = "app".parse().unwrap();
        assert_eq!(ids(idx.authorized(&a, 99)), ["app"]);
        assert!(idx.is_authorized(&a, &app_id, 99));
        assert_eq!(idx.next_expiry(&a, &idx.authorized(&a, 99), 99), Some(100));
        assert!(idx.authorized(&a, 100).is_empty());
        assert!(!idx.is_authorized(&a, &app_id, 100));
        assert!(!idx.identities(&a, 100).contains(&id("/nodes/n")));
        assert_eq!(idx.next_expiry(&a, &[], 100), None);
    }

    #[test]
    fn changes_move_entries_in_and_out() {
        let a = agent("/oxid/agent/join_token/t1", &[], &[]);
        let mut idx = index(vec![]);
        let e = entry("e", "/web", "/oxid/agent/join_token/t1", &["unix:uid:1"], 1);
        idx.apply(2, &ChangeEvent::EntryUpserted { entry: e.clone() });
        assert_eq!(ids(idx.authorized(&a, 0)), ["e"]);
        let mut moved = e.clone();
        moved.parent_id = id("/elsewhere");
        idx.apply(
            3,
            &ChangeEvent::EntryUpserted {
                entry: moved.clone(),
            },
        );
        assert!(
            idx.authorized(&a, 0).is_empty(),
            "re-parenting is a removal"
        );
        idx.apply(4, &ChangeEvent::EntryDeleted { entry: moved });
        assert!(idx.entry(&"e".parse().unwrap()).is_none());
        assert_eq!(idx.revision(), 4);
        idx.apply(5, &ChangeEvent::AgentUpserted { agent: a.clone() });
        assert!(idx.agent(&a.spiffe_id).is_some());
        idx.apply(6, &ChangeEvent::AgentDeleted { agent: a.clone() });
        assert!(idx.agent(&a.spiffe_id).is_none());
    }

    #[test]
    fn walking_up_agrees_with_listing_on_random_graphs() {
        // Small ID spaces make chains, shared IDs, cycles and node aliases
        // frequent; a fixed LCG keeps the graphs reproducible.
        let mut seed: u64 = 0x5eed;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let agents = [
            agent("/oxid/agent/join_token/t1", &[], &["/p0"]),
            agent("/oxid/agent/x509pop/aa", &["x509pop:subject:cn:n1"], &[]),
        ];
        for graph in 0..300 {
            let mut entries = Vec::new();
            for i in 0..12 {
                let parent = match next(5) {
                    0 => "/oxid/agent/join_token/t1".to_owned(),
                    1 => "/oxid/agent/x509pop/aa".to_owned(),
                    2 => "/oxid/server".to_owned(),
                    _ => format!("/p{}", next(6)),
                };
                let mut e = entry(
                    &format!("e{i}"),
                    &format!("/p{}", next(6)),
                    &parent,
                    &[if next(2) == 0 {
                        "x509pop:subject:cn:n1"
                    } else {
                        "unix:uid:1"
                    }],
                    next(100),
                );
                e.expires_at = (next(4) == 0).then(|| next(20));
                entries.push(e);
            }
            let idx = index(entries.clone());
            for a in &agents {
                for now in [0, 10, 30] {
                    let listed = ids(idx.authorized(a, now));
                    for e in &entries {
                        assert_eq!(
                            idx.is_authorized(a, &e.id, now),
                            listed.contains(&e.id.to_string()),
                            "graph {graph}, agent {}, entry {}, now {now}",
                            a.spiffe_id,
                            e.id
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn only_changes_that_can_concern_an_agent_wake_its_sync() {
        let a = agent("/oxid/agent/join_token/a", &["x509pop:subject:cn:n1"], &[]);
        let b = agent("/oxid/agent/join_token/b", &[], &[]);
        let mut idx = index(vec![
            entry(
                "web",
                "/web",
                "/oxid/agent/join_token/a",
                &["unix:uid:1"],
                1,
            ),
            entry("db", "/db", "/oxid/agent/join_token/b", &["unix:uid:1"], 2),
        ]);
        let closure = idx.closure(&a, &idx.authorized(&a, 0), 0);
        let concerns = |idx: &EntryIndex, since| idx.may_concern(since, &a.spiffe_id, &closure);
        assert!(!concerns(&idx, 1), "nothing applied since");

        // Another agent's entries and record: not A's business.
        let db2 = entry(
            "db2",
            "/db2",
            "/oxid/agent/join_token/b",
            &["unix:uid:2"],
            3,
        );
        idx.apply(2, &ChangeEvent::EntryUpserted { entry: db2.clone() });
        idx.apply(3, &ChangeEvent::AgentUpserted { agent: b.clone() });
        assert!(!concerns(&idx, 1));

        // An entry moved from B to under A's workload: A's business.
        let mut moved = db2.clone();
        moved.parent_id = id("/web");
        idx.apply(
            4,
            &ChangeEvent::EntryUpserted {
                entry: moved.clone(),
            },
        );
        assert!(concerns(&idx, 3));
        // Moved away again: the old parent is what matters.
        idx.apply(5, &ChangeEvent::EntryUpserted { entry: db2 });
        assert!(concerns(&idx, 4));
        // Deleting a B entry is not; a node alias, A's record or a bundle is.
        let db = idx.entry(&"db".parse().unwrap()).unwrap().clone();
        idx.apply(6, &ChangeEvent::EntryDeleted { entry: db });
        assert!(!concerns(&idx, 5));
        let alias = entry(
            "alias",
            "/nodes/x",
            "/oxid/server",
            &["x509pop:subject:cn:n1"],
            4,
        );
        idx.apply(7, &ChangeEvent::EntryUpserted { entry: alias });
        assert!(concerns(&idx, 6));
        idx.apply(8, &ChangeEvent::AgentUpserted { agent: a.clone() });
        assert!(concerns(&idx, 7));
        idx.apply(
            9,
            &ChangeEvent::BundleUpserted {
                bundle: crate::datastore::StoredBundle {
                    trust_domain: "example.org".parse().unwrap(),
                    spiffe_json: "{}".into(),
                },
            },
        );
        assert!(concerns(&idx, 8));

        // A reload forgets the history: everything before it concerns all.
        idx.load(vec![], vec![], 20);
        assert!(concerns(&idx, 19));
        assert!(!concerns(&idx, 20));
    }
}
