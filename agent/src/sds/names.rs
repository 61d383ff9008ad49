//! SDS resource names, SPIRE's, so Envoy configurations written for SPIRE
//! work unchanged: a SPIFFE ID, `spiffe://<td>`, and the three configurable
//! defaults (`default`, `ROOTCA`, `ALL`). What one caller may resolve is
//! decided from one snapshot and the caller's selectors.

use std::collections::BTreeMap;
use std::sync::Arc;

use oxid_pki::bundle::Bundle;
use oxid_pki::{Selector, SpiffeId, TrustDomain};
use tokio::time::Instant;

use crate::cache::{Entry, HeldSvid, Snapshot};
use crate::sds::SdsSettings;

/// One requested resource, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Name {
    /// An X509-SVID by its SPIFFE ID.
    Svid(SpiffeId),
    /// The caller's first SVID, in SVID order (`default_svid_name`).
    DefaultSvid,
    /// One trust domain's bundle, own or federated.
    Bundle(TrustDomain),
    /// The own trust domain's bundle (`default_bundle_name`).
    RootCa,
    /// Every bundle the caller may see, in one validator config
    /// (`default_all_bundles_name`).
    AllBundles,
}

/// Why a requested name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum NameError {
    /// Neither a configured default nor a SPIFFE ID / trust domain ID.
    #[error(
        "resource name {0:?} is neither a SPIFFE ID, spiffe://<trust domain>, nor one of the configured names"
    )]
    Malformed(String),
    /// A trust_ca context holds one trust domain; merging roots would let a
    /// federated CA mint the own trust domain's IDs.
    #[error(
        "{0:?} needs the SPIFFE certificate validator (Envoy >= 1.18, and not disabled): a trusted_ca holds one trust domain's roots"
    )]
    NeedsValidator(String),
}

/// Parses `raw` against the configured default names. The configured
/// names win over the ID forms (SPIRE's precedence).
pub(crate) fn parse(raw: &str, settings: &SdsSettings) -> Result<Name, NameError> {
    if raw == settings.default_svid_name {
        return Ok(Name::DefaultSvid);
    }
    if raw == settings.default_bundle_name {
        return Ok(Name::RootCa);
    }
    if raw == settings.default_all_bundles_name {
        return Ok(Name::AllBundles);
    }
    let id: SpiffeId = raw
        .parse()
        .map_err(|_| NameError::Malformed(raw.to_owned()))?;
    if id.path().is_empty() {
        Ok(Name::Bundle(id.trust_domain().clone()))
    } else {
        Ok(Name::Svid(id))
    }
}

/// A secret to send, before encoding: what it is named and what it holds.
#[derive(Debug, Clone)]
pub(crate) enum Resolved {
    /// An SVID with its key.
    Svid { name: String, held: Arc<HeldSvid> },
    /// The bundles of these trust domains, in one validation context.
    Bundles {
        name: String,
        bundles: Vec<(TrustDomain, Arc<Bundle>)>,
    },
}

/// What a request comes to on one snapshot.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every name resolved.
    Ready(Vec<Resolved>),
    /// Some name is not held yet (its entry, SVID or bundle is on its way):
    /// answered later, on a snapshot where it resolves.
    Pending { unresolved: Vec<String> },
}

/// The caller's view of one snapshot: its entries in SVID order, the held
/// unexpired SVIDs among them, and the bundles it may see.
pub(crate) struct View<'a> {
    entries: Vec<&'a Entry>,
    svids: Vec<(&'a Entry, &'a Arc<HeldSvid>)>,
    bundles: BTreeMap<TrustDomain, &'a Arc<Bundle>>,
    own: &'a TrustDomain,
}

impl<'a> View<'a> {
    /// What a caller with `selectors` sees in `snapshot`.
    pub(crate) fn new(
        snapshot: &'a Snapshot,
        own: &'a TrustDomain,
        selectors: &std::collections::BTreeSet<Selector>,
    ) -> Self {
        let entries: Vec<&Entry> = snapshot.matching(selectors).collect();
        let now = Instant::now();
        let svids = entries
            .iter()
            .filter_map(|e| {
                let held = snapshot.svids.get(e.id.as_str())?;
                (held.expires > now).then_some((*e, held))
            })
            .collect();
        let bundles = crate::workload::bundles_for(snapshot, own, &entries)
            .into_iter()
            .filter(|(_, b)| !b.x509_authorities().is_empty())
            .collect();
        Self {
            entries,
            svids,
            bundles,
            own,
        }
    }

    /// Whether the caller holds any entry at all.
    pub(crate) fn has_entries(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Entry IDs of the caller's entries that have no SVID yet.
    pub(crate) fn unsigned(&self) -> impl Iterator<Item = String> + '_ {
        self.entries
            .iter()
            .filter(|e| !self.svids.iter().any(|(s, _)| s.id == e.id))
            .map(|e| e.id.clone())
    }

    /// Resolves `names` (raw, as requested, with their parses); an empty
    /// list is everything the caller holds, each secret on its own.
    /// `validator` says whether bundles go out in the SPIFFE validator form.
    pub(crate) fn resolve(
        &self,
        names: &[(String, Name)],
        validator: bool,
    ) -> Result<Outcome, NameError> {
        if names.is_empty() {
            return Ok(self.everything());
        }
        let mut out = Vec::with_capacity(names.len());
        let mut unresolved = Vec::new();
        for (raw, name) in names {
            match self.one(raw, name, validator)? {
                Some(r) => out.push(r),
                None => unresolved.push(raw.clone()),
            }
        }
        Ok(if unresolved.is_empty() {
            Outcome::Ready(out)
        } else {
            Outcome::Pending { unresolved }
        })
    }

    /// One name: `None` while the caller does not hold it.
    pub(crate) fn one(
        &self,
        raw: &str,
        name: &Name,
        validator: bool,
    ) -> Result<Option<Resolved>, NameError> {
        let svid = |held: &Arc<HeldSvid>| Resolved::Svid {
            name: raw.to_owned(),
            held: held.clone(),
        };
        let bundles = |tds: Vec<(TrustDomain, Arc<Bundle>)>| Resolved::Bundles {
            name: raw.to_owned(),
            bundles: tds,
        };
        Ok(match name {
            Name::Svid(id) => self
                .svids
                .iter()
                .find(|(e, _)| &e.spiffe_id == id)
                .map(|(_, held)| svid(held)),
            // The first entry in SVID order, once it is signed: not the
            // first signed one, or `default` would change identity.
            Name::DefaultSvid => self.entries.first().and_then(|first| {
                self.svids
                    .iter()
                    .find(|(e, _)| e.id == first.id)
                    .map(|(_, held)| svid(held))
            }),
            Name::Bundle(td) => self.bundle(td).map(|b| bundles(vec![b])),
            Name::RootCa => self.bundle(self.own).map(|b| bundles(vec![b])),
            Name::AllBundles => {
                if !validator {
                    return Err(NameError::NeedsValidator(raw.to_owned()));
                }
                (self.has_entries() && !self.bundles.is_empty()).then(|| {
                    bundles(
                        self.bundles
                            .iter()
                            .map(|(td, b)| (td.clone(), (*b).clone()))
                            .collect(),
                    )
                })
            }
        })
    }

    /// A trust domain's bundle, only for a caller that holds an entry: a
    /// process with no identity learns nothing from the agent.
    fn bundle(&self, td: &TrustDomain) -> Option<(TrustDomain, Arc<Bundle>)> {
        if !self.has_entries() {
            return None;
        }
        self.bundles.get(td).map(|b| (td.clone(), (*b).clone()))
    }

    /// The empty request: every bundle (named by its trust domain ID) and
    /// every SVID (named by its SPIFFE ID); pending until the caller holds
    /// an entry with an SVID.
    fn everything(&self) -> Outcome {
        if self.svids.is_empty() || self.bundle(self.own).is_none() {
            return Outcome::Pending {
                unresolved: vec!["(everything)".into()],
            };
        }
        let mut out: Vec<Resolved> = self
            .bundles
            .iter()
            .map(|(td, b)| Resolved::Bundles {
                name: td.id().to_string(),
                bundles: vec![(td.clone(), (*b).clone())],
            })
            .collect();
        out.extend(self.svids.iter().map(|(e, held)| Resolved::Svid {
            name: e.spiffe_id.to_string(),
            held: (*held).clone(),
        }));
        Outcome::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_parse_as_spire_does() {
        let s = SdsSettings::default();
        assert_eq!(parse("default", &s), Ok(Name::DefaultSvid));
        assert_eq!(parse("ROOTCA", &s), Ok(Name::RootCa));
        assert_eq!(parse("ALL", &s), Ok(Name::AllBundles));
        assert_eq!(
            parse("spiffe://example.org", &s),
            Ok(Name::Bundle(TrustDomain::new("example.org").unwrap()))
        );
        assert_eq!(
            parse("spiffe://example.org/web", &s),
            Ok(Name::Svid("spiffe://example.org/web".parse().unwrap()))
        );
        for bad in [
            "",
            "web",
            "spiffe://",
            "https://example.org/x",
            "spiffe://Example.org/x",
        ] {
            assert!(
                matches!(parse(bad, &s), Err(NameError::Malformed(_))),
                "{bad}"
            );
        }
        let custom = SdsSettings {
            default_svid_name: "me".into(),
            default_bundle_name: "spiffe://example.org".into(),
            ..SdsSettings::default()
        };
        assert_eq!(parse("me", &custom), Ok(Name::DefaultSvid));
        assert_eq!(parse("spiffe://example.org", &custom), Ok(Name::RootCa));
        assert!(parse("default", &custom).is_err());
    }
}
