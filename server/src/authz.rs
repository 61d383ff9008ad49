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

/// The index.
#[derive(Debug, Clone)]
pub struct EntryIndex {
    server_id: SpiffeId,
    entries: HashMap<EntryId, Entry>,
    by_parent: HashMap<SpiffeId, BTreeSet<EntryId>>,
    agents: HashMap<SpiffeId, Agent>,
    /// The store revision the index reflects.
    revision: u64,
}

impl EntryIndex {
    /// An empty index for a server whose own ID is `server_id`.
    pub fn new(server_id: SpiffeId) -> Self {
        Self {
            server_id,
            entries: HashMap::new(),
            by_parent: HashMap::new(),
            agents: HashMap::new(),
            revision: 0,
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
        self.agents.clear();
        for e in entries {
            self.insert(e);
        }
        for a in agents {
            self.agents.insert(a.spiffe_id.clone(), a);
        }
        self.revision = revision;
    }

    /// Applies one change of the feed.
    pub fn apply(&mut self, revision: u64, event: &ChangeEvent) {
        match event {
            ChangeEvent::EntryUpserted { entry } => {
                self.remove(&entry.id);
                self.insert(entry.clone());
            }
            ChangeEvent::EntryDeleted { entry } => self.remove(&entry.id),
            ChangeEvent::AgentUpserted { agent } => {
                self.agents.insert(agent.spiffe_id.clone(), agent.clone());
            }
            ChangeEvent::AgentDeleted { agent } => {
                self.agents.remove(&agent.spiffe_id);
            }
            _ => {}
        }
        self.revision = self.revision.max(revision);
    }

    fn insert(&mut self, e: Entry) {
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.entries.insert(e.id.clone(), e);
    }

    fn remove(&mut self, id: &EntryId) {
        if let Some(old) = self.entries.remove(id) {
            if let Some(children) = self.by_parent.get_mut(&old.parent_id) {
                children.remove(id);
                if children.is_empty() {
                    self.by_parent.remove(&old.parent_id);
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

    /// The IDs an agent is known by: its own, its token aliases, and the
    /// node aliases its selectors satisfy.
    pub fn identities(&self, agent: &Agent) -> BTreeSet<SpiffeId> {
        let mut ids: BTreeSet<SpiffeId> = agent.aliases.iter().cloned().collect();
        ids.insert(agent.spiffe_id.clone());
        for id in self.by_parent.get(&self.server_id).into_iter().flatten() {
            if let Some(alias) = self.entries.get(id) {
                if alias.selectors.is_subset(&agent.selectors) {
                    ids.insert(alias.spiffe_id.clone());
                }
            }
        }
        ids
    }

    /// Entries authorised for `agent` at unix second `now` (expired entries
    /// excluded), in the stable order: creation time, then ID.
    pub fn authorized(&self, agent: &Agent, now: u64) -> Vec<&Entry> {
        let mut seen_ids: HashSet<SpiffeId> = HashSet::new();
        let mut queue: VecDeque<SpiffeId> = VecDeque::new();
        for id in self.identities(agent) {
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

    /// True if `entry` is authorised for `agent` at `now`.
    pub fn is_authorized(&self, agent: &Agent, entry: &EntryId, now: u64) -> bool {
        self.authorized(agent, now).iter().any(|e| &e.id == entry)
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
}
