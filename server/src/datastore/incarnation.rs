//! A store's incarnation: which history its revisions belong to. A
//! restored backup counts its revisions again from the backup's, and its
//! own writes soon pass what running agents hold, so a revision alone
//! cannot tell an agent's view from one of another history: an agent
//! resuming by a delta would keep its copy of every entry changed after
//! the backup. Revisions compare only within one incarnation; an agent of
//! another gets a snapshot (`agent_api/sync.rs`).
//!
//! PostgreSQL: the cluster's `system_identifier` and the database's OID,
//! which a restore into a new database or cluster changes and a dump
//! cannot copy (`postgres/mod.rs`). sled is backed up by copying its
//! directory, so nothing in it tells the copy from the original: each
//! opening of the store is an incarnation of its own, and the store keeps
//! the [`Lineage`] of its past openings, so an agent of an earlier one
//! still resumes by a delta after a restart. A copy restored later opens
//! as a new incarnation, and the openings the original made after the
//! copy are not in its lineage.

use serde::{Deserialize, Serialize};

/// How many past openings a sled store remembers. An agent that last
/// synced before all of them gets a snapshot, which is always correct.
pub(crate) const KEPT: usize = 64;

/// One opening of a store: its incarnation and the revision it opened at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Opening {
    pub(crate) id: String,
    pub(crate) from: u64,
}

/// A store's openings, oldest first; the last is the current one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lineage {
    pub(crate) openings: Vec<Opening>,
}

impl Lineage {
    /// Adds an opening `id` at `revision`, forgetting the oldest past
    /// [`KEPT`].
    pub(crate) fn open(&mut self, id: String, revision: u64) {
        self.openings.push(Opening { id, from: revision });
        let excess = self.openings.len().saturating_sub(KEPT);
        self.openings.drain(..excess);
    }

    /// True if a view at `revision` of incarnation `id` is a state of this
    /// history, so a delta from it is right: `id` is one of its openings
    /// and `revision` is no later than where the next opening started (a
    /// later one was written in another history, a copy that ran on).
    pub(crate) fn holds(&self, id: &str, revision: u64) -> bool {
        let Some(i) = self.openings.iter().position(|o| o.id == id) else {
            return false;
        };
        self.openings
            .get(i + 1)
            .is_none_or(|next| revision <= next.from)
    }
}

/// A new random incarnation: 128 bits, hex.
pub(crate) fn random() -> Result<String, ring::error::Unspecified> {
    let bytes: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new())?.expose();
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opening_holds_revisions_up_to_the_next_one() {
        let mut lineage = Lineage::default();
        lineage.open("a".into(), 0);
        lineage.open("b".into(), 10);
        assert!(lineage.holds("a", 10));
        assert!(!lineage.holds("a", 11), "written in another history");
        assert!(lineage.holds("b", 10_000), "the current one: any revision");
        assert!(!lineage.holds("c", 1), "not of this store");
    }

    #[test]
    fn only_the_last_openings_are_kept() {
        let mut lineage = Lineage::default();
        for i in 0..=KEPT {
            lineage.open(format!("{i}"), i as u64);
        }
        assert_eq!(lineage.openings.len(), KEPT);
        assert!(!lineage.holds("0", 0));
        assert!(lineage.holds("1", 1));
    }

    #[test]
    fn random_incarnations_differ() {
        let (a, b) = (random().unwrap(), random().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
