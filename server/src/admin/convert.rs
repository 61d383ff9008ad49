//! Admin API messages to and from the server's types. Everything an operator
//! sends is parsed strictly here; nothing unchecked reaches the store.

use std::collections::BTreeSet;
use std::time::Duration;

use oxid_pki::{Selector, SelectorError, SpiffeId, TrustDomain};
use oxid_proto::admin as pb;

use super::AdminError;
use crate::datastore::{Agent, Entry, EntryId};

/// Longest hint accepted, in bytes.
const MAX_HINT_LEN: usize = 1024;

/// Most selectors, DNS names or federated domains on one entry.
const MAX_LIST_LEN: usize = 64;

/// How an admin API client (not the CLI) asks for unknown selector types;
/// the CLI drops this from the messages it shows.
pub const UNKNOWN_TYPE_IN_API: &str =
    "(in the admin API: the request header oxid-allow-unknown-selector-type: true)";

/// What a caller accepts beyond the default entry rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct EntryOptions {
    /// Accept selectors that name only the executable (see [`check_exe_only`]).
    pub allow_exe_only: bool,
    /// Accept selector types no oxid attestor produces (a future attestor's).
    pub allow_unknown_selector_type: bool,
}

/// The rules entries must follow on this server.
#[derive(Debug, Clone)]
pub struct EntryPolicy {
    /// The server's trust domain: every entry's IDs belong to it.
    pub trust_domain: TrustDomain,
    /// Longest SVID TTL an entry may ask for (the CA lifetime / 6).
    pub max_ttl: Duration,
}

impl EntryPolicy {
    /// The server's own SPIFFE ID: entries parented on it are node aliases.
    pub fn server_id(&self) -> SpiffeId {
        // Invariant: "/oxid/server" is a valid path.
        self.trust_domain
            .spiffe_id("/oxid/server")
            .unwrap_or_else(|_| self.trust_domain.id())
    }

    /// Parses an ID that a workload or alias may be granted: of this trust
    /// domain, with a path, and not under the reserved `/oxid/` path.
    pub fn grantable_id(&self, field: &str, s: &str) -> Result<SpiffeId, AdminError> {
        let id = self.member_id(field, s)?;
        if id.is_trust_domain_id() {
            return Err(AdminError::invalid(format!("{field} {id} has no path")));
        }
        if id.is_reserved() {
            return Err(AdminError::invalid(format!(
                "{field} {id} is under the reserved path {}/ (only the server issues those)",
                oxid_pki::RESERVED_PATH
            )));
        }
        Ok(id)
    }

    /// Parses an ID of this trust domain.
    pub fn member_id(&self, field: &str, s: &str) -> Result<SpiffeId, AdminError> {
        if s.is_empty() {
            return Err(AdminError::invalid(format!("{field} is required")));
        }
        let id: SpiffeId = s
            .parse()
            .map_err(|e| AdminError::invalid(format!("{field} {s:?}: {e}")))?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(AdminError::invalid(format!(
                "{field} {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }

    /// A TTL in seconds from the API: 0 is "default" (`None`).
    pub fn ttl(&self, field: &str, secs: u64) -> Result<Option<u64>, AdminError> {
        if secs == 0 {
            return Ok(None);
        }
        if secs > self.max_ttl.as_secs() {
            return Err(AdminError::invalid(format!(
                "{field} {secs}s is above the maximum of {}s (the CA lifetime / 6)",
                self.max_ttl.as_secs()
            )));
        }
        Ok(Some(secs))
    }

    /// Parses and checks an entry; `created_at` is the server's clock (Unix
    /// milliseconds), and an `expires_at` not after it is refused. An entry
    /// whose only process selectors name an executable, or with a selector
    /// type no attestor produces, is refused unless `options` accept it.
    pub fn entry(
        &self,
        e: pb::Entry,
        created_at: u64,
        options: EntryOptions,
    ) -> Result<Entry, AdminError> {
        let id = if e.id.is_empty() {
            EntryId::random().map_err(|_| AdminError::Internal("random generator failed".into()))?
        } else {
            e.id.parse()
                .map_err(|err| AdminError::invalid(format!("{err}")))?
        };
        let spiffe_id = self.grantable_id("spiffe_id", &e.spiffe_id)?;
        let parent_id = self.member_id("parent_id", &e.parent_id)?;
        if parent_id == spiffe_id {
            return Err(AdminError::invalid(
                "an entry cannot be its own parent".into(),
            ));
        }
        if e.selectors.is_empty() {
            return Err(AdminError::invalid(
                "an entry needs at least one selector".into(),
            ));
        }
        let selectors = parse_list(&e.selectors, "selector", |s| {
            let selector = s.parse::<Selector>().map_err(|err| err.to_string())?;
            selector
                .check_known(options.allow_unknown_selector_type)
                .map_err(|err| match err {
                    SelectorError::UnknownType(_) => format!("{err} {UNKNOWN_TYPE_IN_API}"),
                    other => other.to_string(),
                })?;
            Ok(selector)
        })?;
        if !options.allow_exe_only {
            check_exe_only(&selectors)?;
        }
        let dns_names = parse_list(&e.dns_names, "DNS name", |s| {
            rustls_pki_types::DnsName::try_from(s.as_str())
                .map(|_| s.clone())
                .map_err(|_| format!("{s:?} is not a valid DNS name"))
        })?;
        let federates_with = parse_list(&e.federates_with, "federated trust domain", |s| {
            let td = TrustDomain::new(s).map_err(|err| err.to_string())?;
            if td == self.trust_domain {
                return Err(format!("{td} is this server's own trust domain"));
            }
            Ok(td)
        })?;
        if e.hint.len() > MAX_HINT_LEN || e.hint.chars().any(char::is_control) {
            return Err(AdminError::invalid(format!(
                "hint must be printable and at most {MAX_HINT_LEN} bytes"
            )));
        }
        let now_secs = created_at / 1000;
        if e.expires_at != 0 && e.expires_at <= now_secs {
            return Err(AdminError::invalid(format!(
                "expires_at {} is not in the future (the server's clock reads {now_secs}, \
                 Unix seconds)",
                e.expires_at
            )));
        }
        Ok(Entry {
            id,
            spiffe_id,
            parent_id,
            selectors: selectors.into(),
            x509_svid_ttl: self.ttl("x509_svid_ttl", e.x509_svid_ttl)?,
            jwt_svid_ttl: self.ttl("jwt_svid_ttl", e.jwt_svid_ttl)?,
            dns_names: dns_names.into_iter().collect(),
            federates_with,
            hint: e.hint,
            expires_at: (e.expires_at != 0).then_some(e.expires_at),
            created_at,
            revision: 0,
        })
    }
}

/// `unix:` keys that tie a process to a user or group.
const PROCESS_OWNER_KEYS: [&str; 4] = ["uid:", "gid:", "user:", "group:"];

/// `unix:` keys that name only the executable.
const EXECUTABLE_KEYS: [&str; 2] = ["path:", "sha256:"];

/// Refuses selectors whose only process selectors are `unix:path` or
/// `unix:sha256`: any process of any user that runs (or injects code into,
/// e.g. with `LD_PRELOAD`) that executable would match, so the entry must
/// also name a uid, gid, user or group, or the operator must say they accept
/// that (`--allow-exe-only`).
fn check_exe_only(selectors: &BTreeSet<Selector>) -> Result<(), AdminError> {
    let unix = || selectors.iter().filter(|s| s.kind() == "unix");
    let has = |keys: &[&str]| unix().any(|s| keys.iter().any(|k| s.value().starts_with(k)));
    if has(&EXECUTABLE_KEYS) && !has(&PROCESS_OWNER_KEYS) {
        return Err(AdminError::invalid(
            "an entry whose only process selectors are unix:path or unix:sha256 matches any \
             user's process running that executable (or code injected into it); add \
             unix:uid, unix:gid, unix:user or unix:group, or pass --allow-exe-only \
             (allow_exe_only in the admin API) to accept that"
                .into(),
        ));
    }
    Ok(())
}

/// Parses every item of a list, refusing duplicates and long lists.
fn parse_list<T: Ord>(
    items: &[String],
    what: &str,
    parse: impl Fn(&String) -> Result<T, String>,
) -> Result<BTreeSet<T>, AdminError> {
    if items.len() > MAX_LIST_LEN {
        return Err(AdminError::invalid(format!(
            "at most {MAX_LIST_LEN} {what}s per entry"
        )));
    }
    let mut out = BTreeSet::new();
    for item in items {
        let value = parse(item).map_err(|e| AdminError::invalid(format!("{what}: {e}")))?;
        if !out.insert(value) {
            return Err(AdminError::invalid(format!("duplicate {what} {item:?}")));
        }
    }
    Ok(out)
}

/// An entry as the API shows it.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl: e.x509_svid_ttl.unwrap_or(0),
        jwt_svid_ttl: e.jwt_svid_ttl.unwrap_or(0),
        dns_names: e.dns_names.clone(),
        federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
        hint: e.hint.clone(),
        expires_at: e.expires_at.unwrap_or(0),
        created_at: e.created_at,
        revision: e.revision,
    }
}

/// An agent as the API shows it.
pub fn agent_to_pb(a: &Agent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        selectors: a.selectors.iter().map(ToString::to_string).collect(),
        aliases: a.aliases.iter().map(ToString::to_string).collect(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EntryPolicy {
        EntryPolicy {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            max_ttl: Duration::from_secs(4 * 3600),
        }
    }

    fn good() -> pb::Entry {
        pb::Entry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/oxid/agent/join_token/abc".into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }
    }

    fn refused(edit: impl FnOnce(&mut pb::Entry)) -> String {
        let mut e = good();
        edit(&mut e);
        match policy().entry(e, 1, EntryOptions::default()) {
            Err(AdminError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn exe_only() -> EntryOptions {
        EntryOptions {
            allow_exe_only: true,
            ..EntryOptions::default()
        }
    }

    #[test]
    fn unknown_selector_types_need_the_option() {
        let m = refused(|e| e.selectors = vec!["k8s:ns:default".into(), "unix:uid:1".into()]);
        assert!(m.contains("known types: unix, x509pop"), "{m}");
        let mut e = good();
        e.selectors = vec!["k8s:ns:default".into(), "unix:uid:1".into()];
        let options = EntryOptions {
            allow_unknown_selector_type: true,
            ..EntryOptions::default()
        };
        policy().entry(e, 1, options).unwrap();
    }

    #[test]
    fn expiry_in_the_past_is_refused() {
        let now_ms = 1_700_000_000_000;
        for past in [1, 1_700_000_000] {
            let mut e = good();
            e.expires_at = past;
            let m = policy()
                .entry(e, now_ms, EntryOptions::default())
                .unwrap_err()
                .to_string();
            assert!(m.contains("not in the future"), "{m}");
        }
        let mut e = good();
        e.expires_at = 1_700_000_001;
        policy().entry(e, now_ms, EntryOptions::default()).unwrap();
    }

    #[test]
    fn a_good_entry_parses() {
        let e = policy().entry(good(), 7, EntryOptions::default()).unwrap();
        assert_eq!(e.created_at, 7);
        assert_eq!(e.id.as_str().len(), 32);
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        assert!(refused(|e| e.spiffe_id = "web".into()).contains("spiffe_id"));
        assert!(
            refused(|e| e.spiffe_id = "spiffe://other.org/web".into())
                .contains("not in trust domain")
        );
        assert!(refused(|e| e.spiffe_id = "spiffe://example.org".into()).contains("no path"));
        assert!(
            refused(|e| e.spiffe_id = "spiffe://example.org/oxid/agent/x".into())
                .contains("reserved")
        );
        assert!(refused(|e| e.spiffe_id = "spiffe://example.org/oxid".into()).contains("reserved"));
        assert!(refused(|e| e.parent_id = String::new()).contains("parent_id is required"));
        assert!(refused(|e| e.parent_id = e.spiffe_id.clone()).contains("own parent"));
        assert!(refused(|e| e.selectors.clear()).contains("at least one selector"));
        assert!(refused(|e| e.selectors = vec!["nocolon".into()]).contains("selector"));
        assert!(
            refused(|e| e.selectors = vec!["unix:uid:1".into(), "unix:uid:1".into()])
                .contains("duplicate")
        );
        assert!(refused(|e| e.x509_svid_ttl = 4 * 3600 + 1).contains("maximum"));
        assert!(refused(|e| e.jwt_svid_ttl = u64::MAX).contains("maximum"));
        assert!(refused(|e| e.dns_names = vec!["not a name".into()]).contains("DNS"));
        assert!(
            refused(|e| e.federates_with = vec!["example.org".into()]).contains("own trust domain")
        );
        assert!(refused(|e| e.federates_with = vec!["Bad".into()]).contains("federated"));
        assert!(refused(|e| e.hint = "a\nb".into()).contains("hint"));
        assert!(refused(|e| e.id = "has space".into()).contains("entry ID"));
        assert!(
            refused(|e| e.selectors = (0..65).map(|i| format!("unix:uid:{i}")).collect())
                .contains("at most")
        );
    }

    #[test]
    fn node_alias_entries_are_parented_on_the_server() {
        let mut e = good();
        e.parent_id = policy().server_id().to_string();
        e.selectors = vec!["x509pop:subject:cn:web-1".into()];
        e.spiffe_id = "spiffe://example.org/nodes/web".into();
        policy().entry(e, 1, EntryOptions::default()).unwrap();
    }

    #[test]
    fn impossible_selectors_are_refused() {
        for bad in [
            "unix:uid:-1",
            "unix:uid:",
            "unix:gid:x",
            "unix:path:bin/app",
        ] {
            let m = refused(|e| e.selectors = vec![bad.into()]);
            assert!(m.contains("can never match"), "{bad}: {m}");
        }
        let m = refused(|e| e.selectors = vec![format!("unix:sha256:{}", "a".repeat(63))]);
        assert!(m.contains("64 lowercase hex"), "{m}");
    }

    #[test]
    fn exe_only_entries_need_the_flag() {
        let hash = format!("unix:sha256:{}", "ab".repeat(32));
        for only in [
            vec!["unix:path:/usr/bin/app".to_owned()],
            vec![hash.clone()],
            vec![
                hash.clone(),
                "unix:path:/usr/bin/app".into(),
                "unix:supplementary_gid:5".into(),
            ],
        ] {
            let m = refused(|e| e.selectors = only.clone());
            assert!(
                m.contains("--allow-exe-only") && m.contains("any user's process"),
                "{m}"
            );
            let mut e = good();
            e.selectors = only;
            policy().entry(e, 1, exe_only()).unwrap();
        }
        for owner in [
            "unix:uid:1000",
            "unix:gid:1000",
            "unix:user:app",
            "unix:group:app",
        ] {
            let mut e = good();
            e.selectors = vec![hash.clone(), owner.into()];
            policy().entry(e, 1, EntryOptions::default()).unwrap();
        }
    }
}
