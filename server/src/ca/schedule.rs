//! The rotation schedule as a pure function of the journal and the time, so
//! every edge is tested without a clock or a store.

use std::time::SystemTime;

use super::journal::{AuthorityState, JournalEntry};
use crate::clock::unix_secs;

/// The next rotation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing is due.
    None,
    /// No usable active authority: create one and activate it at once.
    CreateActive,
    /// Half of the active authority's life is gone: prepare the next.
    Prepare,
    /// Five sixths are gone (or the active one expired): activate the next.
    Activate,
    /// These retired authorities have expired: drop them from the bundle.
    Prune(Vec<u64>),
}

/// What to do at `now` given the authorities (oldest first).
pub fn plan(authorities: &[&JournalEntry], now: SystemTime) -> Action {
    let now = unix_secs(now);
    let expired: Vec<u64> = authorities
        .iter()
        .filter(|a| a.state == AuthorityState::Old && a.not_after <= now)
        .map(|a| a.sequence)
        .collect();
    if !expired.is_empty() {
        return Action::Prune(expired);
    }
    let prepared = authorities
        .iter()
        .any(|a| a.state == AuthorityState::Prepared);
    let Some(active) = authorities
        .iter()
        .find(|a| a.state == AuthorityState::Active)
    else {
        return if prepared {
            Action::Activate
        } else {
            Action::CreateActive
        };
    };
    if active.not_after <= now {
        return if prepared {
            Action::Activate
        } else {
            Action::CreateActive
        };
    }
    let life = active.not_after.saturating_sub(active.not_before);
    if !prepared && now >= active.not_before + life / 2 {
        return Action::Prepare;
    }
    if prepared && now >= active.not_before + life * 5 / 6 {
        return Action::Activate;
    }
    Action::None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn authority(
        sequence: u64,
        state: AuthorityState,
        not_before: u64,
        not_after: u64,
    ) -> JournalEntry {
        JournalEntry {
            sequence,
            state,
            tainted: false,
            x509_chain: vec![],
            jwt_key_id: String::new(),
            jwt_public_key: String::new(),
            not_before,
            not_after,
            key_files: None,
        }
    }

    #[test]
    fn nothing_active_creates_one() {
        assert_eq!(plan(&[], at(0)), Action::CreateActive);
    }

    #[test]
    fn prepares_at_half_and_activates_at_five_sixths() {
        let active = authority(1, AuthorityState::Active, 1000, 1600);
        assert_eq!(plan(&[&active], at(1299)), Action::None);
        assert_eq!(plan(&[&active], at(1300)), Action::Prepare);
        let next = authority(2, AuthorityState::Prepared, 1300, 1900);
        assert_eq!(plan(&[&active, &next], at(1499)), Action::None);
        assert_eq!(plan(&[&active, &next], at(1500)), Action::Activate);
    }

    #[test]
    fn an_expired_active_is_replaced() {
        let active = authority(1, AuthorityState::Active, 1000, 1600);
        assert_eq!(plan(&[&active], at(1600)), Action::CreateActive);
        let next = authority(2, AuthorityState::Prepared, 1300, 1900);
        assert_eq!(plan(&[&active, &next], at(5000)), Action::Activate);
    }

    #[test]
    fn retired_authorities_stay_until_they_expire() {
        let old = authority(1, AuthorityState::Old, 1000, 1600);
        let active = authority(2, AuthorityState::Active, 1500, 2100);
        assert_eq!(plan(&[&old, &active], at(1599)), Action::None);
        assert_eq!(plan(&[&old, &active], at(1600)), Action::Prune(vec![1]));
    }

    #[test]
    fn a_prepared_authority_with_no_active_one_is_activated() {
        let next = authority(2, AuthorityState::Prepared, 1300, 1900);
        assert_eq!(plan(&[&next], at(1400)), Action::Activate);
    }
}
