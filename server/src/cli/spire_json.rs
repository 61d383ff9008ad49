//! SPIRE's registration entries as JSON, turned into oxid entries: what
//! `spire-server entry show -output json` prints (protojson of SPIRE's
//! `types.Entry`: IDs as `{trust_domain, path}` objects, int64 as strings)
//! and what `spire-server entry create -data` reads (IDs as strings).
//!
//! No I/O: the command in `import.rs` reads the file and talks to the
//! server. Everything here is a pure function of the text and the options,
//! so the whole mapping is unit-tested. The file is untrusted input: one
//! malformed entry is refused with its reason, never guessed at.

use std::collections::{BTreeMap, HashSet};

use oxid_proto::admin as pb;
use serde_json::{Map, Value};

/// SPIRE fields oxid has no equivalent for. An entry that sets one is
/// refused unless the operator drops the field (`--drop`), so no meaning is
/// lost silently.
pub(crate) const UNHONOURED: [(&str, &str); 3] = [
    (
        "admin",
        "oxid's admin API is a local Unix socket, authorised by uid; no SVID grants admin rights",
    ),
    (
        "downstream",
        "oxid has no nested (downstream) servers; the entry would get a plain SVID, not a CA",
    ),
    (
        "store_svid",
        "oxid has no SVIDStore plugins; the SVID would go to a workload, not a secret store",
    ),
];

/// Store metadata SPIRE prints; oxid stamps its own when it stores the entry.
const METADATA: [&str; 2] = ["created_at", "revision_number"];

/// What one SPIRE entry became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// An oxid entry to create.
    Create(pb::Entry),
    /// Not an entry oxid needs, with why and what to do instead.
    Skip(String),
    /// Cannot be imported as it is, with every reason.
    Refuse(Vec<String>),
}

/// One entry of the file and what it became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    /// The SPIRE entry ID, or `#N` (its place in the file) if it has none.
    pub(crate) source: String,
    /// Its SPIFFE ID as SPIRE wrote it (for the report), maybe empty.
    pub(crate) spiffe_id: String,
    pub(crate) plan: Plan,
    /// What the operator should know even though the entry is imported:
    /// dropped fields, a parent nothing is known by yet.
    pub(crate) notes: Vec<String>,
}

/// How SPIRE's parents become oxid's.
#[derive(Debug, Clone, Default)]
pub(crate) struct ParentMap {
    explicit: BTreeMap<String, String>,
}

impl ParentMap {
    /// Parses `--map-parent OLD=NEW` values; both sides SPIFFE IDs, each
    /// OLD given once.
    pub(crate) fn parse(pairs: &[String]) -> Result<Self, String> {
        let mut explicit = BTreeMap::new();
        for pair in pairs {
            let (old, new) = pair
                .split_once('=')
                .ok_or_else(|| format!("--map-parent {pair:?}: expected OLD=NEW"))?;
            for side in [old, new] {
                if !side.starts_with("spiffe://") || side.len() <= "spiffe://".len() {
                    return Err(format!(
                        "--map-parent {pair:?}: {side:?} is not a SPIFFE ID (spiffe://...)"
                    ));
                }
            }
            if explicit.insert(old.to_owned(), new.to_owned()).is_some() {
                return Err(format!("--map-parent: {old} is mapped twice"));
            }
        }
        Ok(Self { explicit })
    }

    /// The oxid parent for a SPIRE parent: an explicit mapping first, then
    /// SPIRE's server ID (node entries) to oxid's; `Err` for a SPIRE agent
    /// or server ID left unmapped, which no oxid agent can ever carry.
    fn map(&self, parent: &str) -> Result<String, String> {
        if let Some(new) = self.explicit.get(parent) {
            return Ok(new.clone());
        }
        let (td, path) = split_id(parent);
        match path {
            "/spire/server" => Ok(format!("spiffe://{td}/oxid/server")),
            p if p.starts_with("/spire/agent/") || p.starts_with("/spire/server/") => Err(format!(
                "parent {parent} is a SPIRE agent ID, which no oxid agent has: give \
                 --map-parent {parent}=<the oxid agent ID or node alias that replaces it>"
            )),
            _ => Ok(parent.to_owned()),
        }
    }
}

/// Options of one import.
#[derive(Debug, Clone, Default)]
pub(crate) struct PlanOptions {
    pub(crate) parents: ParentMap,
    /// Unhonoured fields (names from [`UNHONOURED`]) to drop rather than
    /// refuse the entry.
    pub(crate) drop: Vec<String>,
}

/// Whether `text` looks like SPIRE's JSON rather than oxid's batch form:
/// an entry with an ID object, a selector object, or a SPIRE-only field.
pub(crate) fn looks_like_spire(text: &str) -> bool {
    let Ok(Value::Object(top)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let Some(Value::Array(entries)) = top.get("entries") else {
        return false;
    };
    entries.iter().filter_map(Value::as_object).any(|e| {
        e.get("spiffe_id").is_some_and(Value::is_object)
            || e.get("parent_id").is_some_and(Value::is_object)
            || e.get("selectors")
                .and_then(Value::as_array)
                .is_some_and(|s| s.iter().any(Value::is_object))
            || UNHONOURED.iter().any(|(f, _)| e.contains_key(*f))
            || METADATA.iter().any(|f| e.contains_key(*f))
            || e.contains_key("entry_id")
    })
}

/// Plans every entry of a SPIRE JSON file. Fails only when the file as a
/// whole is not SPIRE's form; a bad entry is a [`Plan::Refuse`].
pub(crate) fn plan(text: &str, options: &PlanOptions) -> Result<Vec<Planned>, String> {
    for field in &options.drop {
        if !UNHONOURED.iter().any(|(f, _)| f == field) {
            return Err(format!(
                "--drop {field}: only {} can be dropped",
                UNHONOURED.map(|(f, _)| f).join(", ")
            ));
        }
    }
    let top: Value =
        serde_json::from_str(text).map_err(|e| format!("invalid SPIRE entries file: {e}"))?;
    let Value::Object(top) = top else {
        return Err("invalid SPIRE entries file: expected an object {\"entries\": [...]}".into());
    };
    for key in top.keys() {
        if key != "entries" && key != "next_page_token" {
            return Err(format!(
                "invalid SPIRE entries file: unknown top-level field {key:?}"
            ));
        }
    }
    let Some(Value::Array(entries)) = top.get("entries") else {
        return Err("invalid SPIRE entries file: no \"entries\" array".into());
    };
    let mut planned: Vec<Planned> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| plan_one(i, e, options))
        .collect();
    refuse_duplicates(&mut planned);
    Ok(planned)
}

/// Adds a note to every planned entry whose parent nothing is known by:
/// not oxid's server, not in `known` (agents, their aliases, stored
/// entries' SPIFFE IDs), not the SPIFFE ID of another entry being created.
pub(crate) fn note_unknown_parents(planned: &mut [Planned], known: &HashSet<String>) {
    let created: HashSet<String> = planned
        .iter()
        .filter_map(|p| match &p.plan {
            Plan::Create(e) => Some(e.spiffe_id.clone()),
            _ => None,
        })
        .collect();
    for p in planned.iter_mut() {
        let Plan::Create(e) = &p.plan else { continue };
        let parent = &e.parent_id;
        if split_id(parent).1 == "/oxid/server"
            || known.contains(parent)
            || created.contains(parent)
        {
            continue;
        }
        p.notes.push(format!(
            "parent {parent} maps to nothing yet (no oxid agent, node alias or entry has that \
             ID): the entry applies once an agent is known by it, e.g. one attested with \
             `oxid-server token generate --spiffe-id {parent}`, or give --map-parent"
        ));
    }
}

fn plan_one(index: usize, value: &Value, options: &PlanOptions) -> Planned {
    let mut planned = Planned {
        source: format!("#{}", index + 1),
        spiffe_id: String::new(),
        plan: Plan::Refuse(Vec::new()),
        notes: Vec::new(),
    };
    let Some(e) = value.as_object() else {
        planned.plan = Plan::Refuse(vec!["not a JSON object".into()]);
        return planned;
    };
    let mut errors = Vec::new();
    let id = take(&mut errors, string_field(e, &["id", "entry_id"])).unwrap_or_default();
    if !id.is_empty() {
        planned.source = id.clone();
    }
    let spiffe_id = take(&mut errors, id_field(e, "spiffe_id")).unwrap_or_default();
    planned.spiffe_id = spiffe_id.clone();
    let spire_parent = take(&mut errors, id_field(e, "parent_id")).unwrap_or_default();
    let selectors = take(&mut errors, selectors(e)).unwrap_or_default();
    let x509_svid_ttl = take(&mut errors, seconds(e, &["x509_svid_ttl", "ttl"])).unwrap_or(0);
    let jwt_svid_ttl = take(&mut errors, seconds(e, &["jwt_svid_ttl"])).unwrap_or(0);
    let expires_at = take(
        &mut errors,
        seconds(e, &["expires_at", "entryExpiry", "entry_expiry"]),
    )
    .unwrap_or(0);
    let dns_names = take(&mut errors, strings(e, "dns_names")).unwrap_or_default();
    // SPIRE prints trust domain names; its flags take `spiffe://td`.
    let federates_with: Vec<String> = take(&mut errors, strings(e, "federates_with"))
        .unwrap_or_default()
        .into_iter()
        .map(|td| {
            td.strip_prefix("spiffe://")
                .map_or(td.clone(), str::to_owned)
        })
        .collect();
    let hint = take(&mut errors, string_field(e, &["hint"])).unwrap_or_default();
    for (key, v) in e {
        if let Some((field, why)) = UNHONOURED.iter().find(|(f, _)| f == key) {
            match v {
                Value::Bool(false) | Value::Null => {}
                Value::Bool(true) if options.drop.iter().any(|d| d == field) => planned
                    .notes
                    .push(format!("{field}: true was dropped (--drop {field}): {why}")),
                Value::Bool(true) => errors.push(format!(
                    "{field}: true cannot be honoured ({why}); give --drop {field} to import the \
                     entry without it"
                )),
                _ => errors.push(format!("{field}: expected true or false")),
            }
        } else if !KNOWN.contains(&key.as_str()) && !METADATA.contains(&key.as_str()) {
            errors.push(format!("unknown field {key:?}"));
        }
    }
    if !errors.is_empty() {
        planned.plan = Plan::Refuse(errors);
        return planned;
    }
    // SPIRE writes `token generate -spiffeID S` as an entry S parented on
    // the token's agent ID with the one selector spiffe_id:<agent ID>. oxid
    // gives that alias to the token itself.
    let alias_selector = format!("spiffe_id:{spire_parent}");
    if split_id(&spire_parent).1.starts_with("/spire/agent/") && selectors == [alias_selector] {
        planned.plan = Plan::Skip(format!(
            "SPIRE's record of a join-token alias ({spiffe_id} for agent {spire_parent}), not an \
             entry oxid needs: create the agent's token with `oxid-server token generate \
             --spiffe-id {spiffe_id}` and the entries parented on {spiffe_id} apply to it"
        ));
        return planned;
    }
    let parent_id = match options.parents.map(&spire_parent) {
        Ok(p) => p,
        Err(why) => {
            planned.plan = Plan::Refuse(vec![why]);
            return planned;
        }
    };
    if parent_id != spire_parent {
        planned
            .notes
            .push(format!("parent {spire_parent} is now {parent_id}"));
    }
    planned.plan = Plan::Create(pb::Entry {
        id,
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl,
        jwt_svid_ttl,
        dns_names,
        federates_with,
        hint,
        expires_at,
        created_at: 0,
        revision: 0,
    });
    planned
}

/// The value of `r`, or `None` with its error kept in `errors`, so every
/// bad field of an entry is reported at once.
fn take<T>(errors: &mut Vec<String>, r: Result<T, String>) -> Option<T> {
    r.map_err(|m| errors.push(m)).ok()
}

/// The fields [`plan_one`] reads (some under SPIRE's older names).
const KNOWN: [&str; 14] = [
    "id",
    "entry_id",
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "ttl",
    "jwt_svid_ttl",
    "expires_at",
    "entryExpiry",
    "entry_expiry",
    "dns_names",
    "federates_with",
    "hint",
];

/// Two entries of one file with the same ID, or the same SPIFFE ID, parent
/// and selectors, would collide in the store: both are refused here, so a
/// file split into several calls is still checked as a whole.
fn refuse_duplicates(planned: &mut [Planned]) {
    let key = |e: &pb::Entry| {
        let mut selectors = e.selectors.clone();
        selectors.sort();
        (e.spiffe_id.clone(), e.parent_id.clone(), selectors)
    };
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    let mut keys: BTreeMap<(String, String, Vec<String>), usize> = BTreeMap::new();
    let mut clashes: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, p) in planned.iter().enumerate() {
        let Plan::Create(e) = &p.plan else { continue };
        if !e.id.is_empty() {
            let first = *ids.entry(e.id.clone()).or_insert(i);
            if first != i {
                clashes.entry(i).or_default().push(format!(
                    "entry ID {} is also entry #{}",
                    e.id,
                    first + 1
                ));
            }
        }
        let first = *keys.entry(key(e)).or_insert(i);
        if first != i {
            clashes.entry(i).or_default().push(format!(
                "same SPIFFE ID, parent and selectors as entry #{}",
                first + 1
            ));
        }
    }
    for (i, why) in clashes {
        planned[i].plan = Plan::Refuse(why);
    }
}

/// `spiffe://td/path` as (td, path); anything else as ("", "").
fn split_id(id: &str) -> (&str, &str) {
    id.strip_prefix("spiffe://")
        .map(|rest| rest.find('/').map_or((rest, ""), |i| rest.split_at(i)))
        .unwrap_or(("", ""))
}

fn string_field(e: &Map<String, Value>, names: &[&str]) -> Result<String, String> {
    for name in names {
        match e.get(*name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(_) => return Err(format!("{name}: expected a string")),
        }
    }
    Ok(String::new())
}

/// A SPIFFE ID as SPIRE writes it: `"spiffe://td/path"` or
/// `{"trust_domain": "td", "path": "/path"}`. Required.
fn id_field(e: &Map<String, Value>, name: &str) -> Result<String, String> {
    match e.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Object(o)) => {
            for key in o.keys() {
                if key != "trust_domain" && key != "path" {
                    return Err(format!("{name}: unknown field {key:?}"));
                }
            }
            let part = |k: &str| match o.get(k) {
                Some(Value::String(s)) => Ok(s.as_str()),
                None => Ok(""),
                Some(_) => Err(format!("{name}.{k}: expected a string")),
            };
            let (td, path) = (part("trust_domain")?, part("path")?);
            if td.is_empty() {
                return Err(format!("{name}: no trust_domain"));
            }
            if !path.is_empty() && !path.starts_with('/') {
                return Err(format!("{name}.path {path:?} does not start with '/'"));
            }
            Ok(format!("spiffe://{td}{path}"))
        }
        None | Some(Value::Null) => Err(format!("{name} is required")),
        Some(_) => Err(format!(
            "{name}: expected \"spiffe://...\" or {{\"trust_domain\", \"path\"}}"
        )),
    }
}

/// Selectors as `[{"type": "unix", "value": "uid:0"}]`, as `type:value`.
fn selectors(e: &Map<String, Value>) -> Result<Vec<String>, String> {
    let Some(Value::Array(list)) = e.get("selectors") else {
        return Err("selectors: expected a list of {\"type\", \"value\"}".into());
    };
    list.iter()
        .map(|s| {
            let o = s
                .as_object()
                .ok_or("selectors: expected {\"type\", \"value\"} objects")?;
            if let Some(key) = o.keys().find(|k| *k != "type" && *k != "value") {
                return Err(format!("selectors: unknown field {key:?}"));
            }
            match (o.get("type"), o.get("value")) {
                (Some(Value::String(t)), Some(Value::String(v)))
                    if !t.is_empty() && !v.is_empty() =>
                {
                    Ok(format!("{t}:{v}"))
                }
                _ => Err(format!(
                    "selector {s}: type and value must be non-empty strings"
                )),
            }
        })
        .collect()
}

fn strings(e: &Map<String, Value>, name: &str) -> Result<Vec<String>, String> {
    match e.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{name}: expected a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("{name}: expected a list of strings")),
    }
}

/// A non-negative count of seconds: a number, or protojson's int64 as a
/// decimal string. Absent is 0 (SPIRE's "default").
fn seconds(e: &Map<String, Value>, names: &[&str]) -> Result<u64, String> {
    for name in names {
        let bad = || format!("{name}: expected a whole number of seconds, 0 or more");
        match e.get(*name) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => return n.as_u64().ok_or_else(bad),
            Some(Value::String(s)) => return s.parse::<u64>().map_err(|_| bad()),
            Some(_) => return Err(bad()),
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two entries exactly as `spire-server entry show -output json`
    /// (v1.13.3) prints them, and a join-token alias record.
    const SHOWN: &str = r#"{"entries":[
      {"admin":false,"created_at":"1796288691","dns_names":["web.local"],"downstream":false,
       "expires_at":"1900000000","federates_with":["other.test"],"hint":"web",
       "id":"f89972de-738f-4344-af87-e037b07af039","jwt_svid_ttl":300,
       "parent_id":{"path":"/node/a","trust_domain":"example.org"},"revision_number":"0",
       "selectors":[{"type":"unix","value":"uid:1000"}],
       "spiffe_id":{"path":"/web","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":600},
      {"admin":false,"created_at":"1796288691","dns_names":[],"downstream":false,"expires_at":"0",
       "federates_with":[],"hint":"","id":"aec96ad2-6e09-4c41-829f-71605a3e6734","jwt_svid_ttl":0,
       "parent_id":{"path":"/spire/server","trust_domain":"example.org"},"revision_number":"0",
       "selectors":[{"type":"x509pop","value":"subject:cn:node-a"}],
       "spiffe_id":{"path":"/node/a","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":0},
      {"admin":false,"created_at":"1796288691","dns_names":[],"downstream":false,"expires_at":"0",
       "federates_with":[],"hint":"","id":"b2de2889-b9d3-4889-acf2-5dc5d8ca6d28","jwt_svid_ttl":0,
       "parent_id":{"path":"/spire/agent/join_token/2fd2","trust_domain":"example.org"},
       "revision_number":"0",
       "selectors":[{"type":"spiffe_id","value":"spiffe://example.org/spire/agent/join_token/2fd2"}],
       "spiffe_id":{"path":"/node/b","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":0}
    ],"next_page_token":""}"#;

    fn created(p: &Planned) -> &pb::Entry {
        match &p.plan {
            Plan::Create(e) => e,
            other => panic!("{}: {other:?}", p.source),
        }
    }

    #[test]
    fn spire_show_output_maps_field_by_field() {
        assert!(looks_like_spire(SHOWN));
        let planned = plan(SHOWN, &PlanOptions::default()).unwrap();
        let web = created(&planned[0]);
        assert_eq!(web.id, "f89972de-738f-4344-af87-e037b07af039");
        assert_eq!(web.spiffe_id, "spiffe://example.org/web");
        assert_eq!(web.parent_id, "spiffe://example.org/node/a");
        assert_eq!(web.selectors, ["unix:uid:1000"]);
        assert_eq!((web.x509_svid_ttl, web.jwt_svid_ttl), (600, 300));
        assert_eq!(web.expires_at, 1_900_000_000);
        assert_eq!(web.dns_names, ["web.local"]);
        assert_eq!(web.federates_with, ["other.test"]);
        assert_eq!(web.hint, "web");
        assert!(planned[0].notes.is_empty());
        // A node entry hangs from oxid's server ID instead of SPIRE's.
        let node = created(&planned[1]);
        assert_eq!(node.parent_id, "spiffe://example.org/oxid/server");
        assert_eq!(
            planned[1].notes,
            ["parent spiffe://example.org/spire/server is now spiffe://example.org/oxid/server"]
        );
        match &planned[2].plan {
            Plan::Skip(why) => assert!(
                why.contains("token generate --spiffe-id spiffe://example.org/node/b"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_create_data_form_with_string_ids_is_read_too() {
        let text = r#"{"entries":[{"selectors":[{"type":"unix","value":"uid:111"}],
            "spiffe_id":"spiffe://example.org/Blog","parent_id":"spiffe://example.org/node",
            "x509_svid_ttl":200,"entry_id":"blog-1"}]}"#;
        let planned = plan(text, &PlanOptions::default()).unwrap();
        let e = created(&planned[0]);
        assert_eq!((e.id.as_str(), e.x509_svid_ttl), ("blog-1", 200));
        assert_eq!(e.spiffe_id, "spiffe://example.org/Blog");
    }

    #[test]
    fn unhonoured_fields_refuse_the_entry_unless_dropped() {
        let text = r#"{"entries":[{"admin":true,"downstream":true,"store_svid":false,
            "selectors":[{"type":"unix","value":"uid:0"}],
            "spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/n"}]}"#;
        let planned = plan(text, &PlanOptions::default()).unwrap();
        let Plan::Refuse(why) = &planned[0].plan else {
            panic!("{planned:?}")
        };
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why[0].starts_with("admin: true cannot be honoured") && why[0].contains("--drop admin")
        );
        assert!(why[1].starts_with("downstream: true cannot be honoured"));
        let options = PlanOptions {
            drop: vec!["admin".into(), "downstream".into()],
            ..PlanOptions::default()
        };
        let planned = plan(text, &options).unwrap();
        created(&planned[0]);
        assert_eq!(planned[0].notes.len(), 2);
        assert!(
            plan(
                text,
                &PlanOptions {
                    drop: vec!["hint".into()],
                    ..PlanOptions::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn spire_agent_parents_need_a_mapping() {
        let text = r#"{"entries":[{"selectors":[{"type":"unix","value":"uid:1"}],
            "spiffe_id":"spiffe://example.org/w",
            "parent_id":"spiffe://example.org/spire/agent/x509pop/abc"}]}"#;
        let planned = plan(text, &PlanOptions::default()).unwrap();
        let Plan::Refuse(why) = &planned[0].plan else {
            panic!("{planned:?}")
        };
        assert!(
            why[0].contains("--map-parent spiffe://example.org/spire/agent/x509pop/abc="),
            "{why:?}"
        );
        let parents = ParentMap::parse(&[
            "spiffe://example.org/spire/agent/x509pop/abc=spiffe://example.org/oxid/agent/x".into(),
        ])
        .unwrap();
        let planned = plan(
            text,
            &PlanOptions {
                parents,
                drop: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(
            created(&planned[0]).parent_id,
            "spiffe://example.org/oxid/agent/x"
        );
        for bad in ["a=b", "spiffe://x", "spiffe://x=", "=spiffe://x"] {
            assert!(ParentMap::parse(&[bad.into()]).is_err(), "{bad}");
        }
        let twice = [
            "spiffe://a/x=spiffe://a/y".to_owned(),
            "spiffe://a/x=spiffe://a/z".to_owned(),
        ];
        assert!(ParentMap::parse(&twice).is_err());
    }

    #[test]
    fn parents_nothing_is_known_by_are_noted() {
        let mut planned = plan(SHOWN, &PlanOptions::default()).unwrap();
        note_unknown_parents(&mut planned, &HashSet::new());
        // /web hangs from /node/a, which the file's node entry creates.
        assert!(planned[0].notes.is_empty(), "{:?}", planned[0].notes);
        let text = r#"{"entries":[{"selectors":[{"type":"unix","value":"uid:1"}],
            "spiffe_id":"spiffe://example.org/w","parent_id":"spiffe://example.org/nowhere"}]}"#;
        let mut planned = plan(text, &PlanOptions::default()).unwrap();
        note_unknown_parents(&mut planned, &HashSet::new());
        assert!(planned[0].notes[0].contains("maps to nothing yet"));
        let mut planned = plan(text, &PlanOptions::default()).unwrap();
        note_unknown_parents(
            &mut planned,
            &HashSet::from(["spiffe://example.org/nowhere".to_owned()]),
        );
        assert!(planned[0].notes.is_empty());
    }

    #[test]
    fn malformed_entries_are_refused_one_by_one() {
        for (bad, why) in [
            (
                r#""spiffe_id":{"trust_domain":"example.org","path":"w"}"#,
                "does not start with '/'",
            ),
            (r#""spiffe_id":{"path":"/w"}"#, "no trust_domain"),
            (
                r#""spiffe_id":{"trust_domain":"example.org","path":"/w","x":1}"#,
                "unknown field",
            ),
            (r#""spiffe_id":7"#, "expected"),
            (r#""x509_svid_ttl":-5"#, "x509_svid_ttl"),
            (r#""x509_svid_ttl":"1h""#, "x509_svid_ttl"),
            (r#""expires_at":1.5"#, "expires_at"),
            (r#""dns_names":"a""#, "dns_names"),
            (r#""admin":"yes""#, "admin"),
            (r#""surprise":1"#, "unknown field \"surprise\""),
        ] {
            let text = format!(
                r#"{{"entries":[{{"selectors":[{{"type":"unix","value":"uid:1"}}],
                "parent_id":"spiffe://example.org/n","spiffe_id":"spiffe://example.org/w",{bad}}}]}}"#
            );
            // serde_json keeps the last of a repeated key, so the bad one wins.
            let planned = plan(&text, &PlanOptions::default()).unwrap();
            let Plan::Refuse(reasons) = &planned[0].plan else {
                panic!("{bad}: {planned:?}")
            };
            assert!(
                reasons.iter().any(|r| r.contains(why)),
                "{bad}: {reasons:?}"
            );
        }
        for bad in [
            r#"[{"type":"unix"}]"#,
            r#"[{"type":"","value":"x"}]"#,
            r#"["unix:uid:1"]"#,
            r#"[{"type":"unix","value":"uid:1","extra":1}]"#,
        ] {
            let text = format!(
                r#"{{"entries":[{{"selectors":{bad},"parent_id":"spiffe://example.org/n",
                "spiffe_id":"spiffe://example.org/w"}}]}}"#
            );
            let planned = plan(&text, &PlanOptions::default()).unwrap();
            assert!(matches!(planned[0].plan, Plan::Refuse(_)), "{bad}");
        }
        for file in [
            "[]",
            "{}",
            r#"{"entries":{}}"#,
            r#"{"entries":[],"x":1}"#,
            "not json",
        ] {
            assert!(plan(file, &PlanOptions::default()).is_err(), "{file}");
        }
        let planned = plan(r#"{"entries":[7]}"#, &PlanOptions::default()).unwrap();
        assert_eq!(
            planned[0].plan,
            Plan::Refuse(vec!["not a JSON object".into()])
        );
    }

    #[test]
    fn duplicates_within_the_file_are_refused() {
        let one = r#"{"id":"x","selectors":[{"type":"unix","value":"uid:1"}],
            "parent_id":"spiffe://example.org/n","spiffe_id":"spiffe://example.org/w"}"#;
        let other_id = one.replace(r#""id":"x""#, r#""id":"y""#);
        let planned = plan(
            &format!(r#"{{"entries":[{one},{one},{other_id}]}}"#),
            &PlanOptions::default(),
        )
        .unwrap();
        created(&planned[0]);
        assert!(
            matches!(&planned[1].plan, Plan::Refuse(w) if w[0].contains("entry ID x is also entry #1"))
        );
        assert!(
            matches!(&planned[2].plan, Plan::Refuse(w) if w[0].contains("same SPIFFE ID, parent and selectors as entry #1"))
        );
    }
}
