//! How operator commands print results: pretty text or one JSON document.

use oxid_proto::admin as pb;
use serde_json::{Value, json};

use super::Output;
use super::time::{rfc3339, rfc3339_ms};

/// `print!` for command output: a reader that goes away (`oxid-server entry
/// show | head`) ends the command quietly ([`oxid_telemetry::write_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {
        oxid_telemetry::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` for command output; see [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {
        oxid_telemetry::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

pub(crate) fn entry_json(e: &pb::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "federates_with": e.federates_with,
        "hint": e.hint,
        "expires_at": (e.expires_at != 0).then(|| rfc3339(e.expires_at)),
        "created_at": rfc3339_ms(e.created_at),
        "revision": e.revision,
    })
}

pub(crate) fn entry_pretty(e: &pb::Entry) -> String {
    let mut s = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\n",
        e.id, e.spiffe_id, e.parent_id
    );
    for sel in &e.selectors {
        s += &format!("Selector         : {sel}\n");
    }
    let ttl = |t: u64| {
        if t == 0 {
            "default".to_owned()
        } else {
            format!("{t}s")
        }
    };
    s += &format!("X509-SVID TTL    : {}\n", ttl(e.x509_svid_ttl));
    s += &format!("JWT-SVID TTL     : {}\n", ttl(e.jwt_svid_ttl));
    for d in &e.dns_names {
        s += &format!("DNS name         : {d}\n");
    }
    for f in &e.federates_with {
        s += &format!("Federates with   : {f}\n");
    }
    if !e.hint.is_empty() {
        s += &format!("Hint             : {}\n", e.hint);
    }
    if e.expires_at != 0 {
        s += &format!("Expires at       : {}\n", rfc3339(e.expires_at));
    }
    s += &format!("Created at       : {}\n", rfc3339_ms(e.created_at));
    s += &format!("Revision         : {}\n", e.revision);
    s
}

pub(crate) fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "selectors": a.selectors,
        "aliases": a.aliases,
        "serial": a.serial,
        "expires_at": rfc3339(a.expires_at),
        "banned": a.banned,
    })
}

pub(crate) fn agent_pretty(a: &pb::Agent) -> String {
    // The same fields as agent_json, so neither form hides anything.
    let mut s = format!(
        "SPIFFE ID        : {}\nAttestation type : {}\nSerial           : {}\n\
         Expires at       : {}\nBanned           : {}\n",
        a.spiffe_id,
        a.attestation_type,
        a.serial,
        rfc3339(a.expires_at),
        a.banned
    );
    for sel in &a.selectors {
        s += &format!("Selector         : {sel}\n");
    }
    for alias in &a.aliases {
        s += &format!("Alias            : {alias}\n");
    }
    s
}

/// Prints a list: JSON array under `key`, or pretty blocks separated by a
/// blank line with a count header.
pub(crate) fn print_list<T>(
    output: Output,
    (key, singular): (&str, &str),
    items: &[T],
    to_json: fn(&T) -> Value,
    to_pretty: fn(&T) -> String,
) {
    match output {
        Output::Json => println(&json!({ key: items.iter().map(to_json).collect::<Vec<_>>() })),
        Output::Pretty => {
            let noun = if items.len() == 1 { singular } else { key };
            let mut text = format!("Found {} {noun}\n", items.len());
            for item in items {
                text.push('\n');
                text += &to_pretty(item);
            }
            out!("{text}");
        }
    }
}

pub(crate) fn println(v: &Value) {
    outln!("{v}");
}
