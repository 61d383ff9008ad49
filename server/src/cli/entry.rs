//! `oxid-server entry`: create (from flags or a batch file), update (whole
//! or partial), delete, show, count.

// A command line reports failures on stderr; results go through `out!`.
#![allow(clippy::print_stderr)]

use std::time::SystemTime;

use oxid_proto::admin as pb;
use serde_json::json;
use tonic::metadata::MetadataValue;

use super::commands::{CliResult, read_input, status_line};
use super::import::import;
use super::output::{entry_json, entry_pretty, out, outln, print_list, println};
use super::time::parse_expiry;
use super::{EntryCommand, EntryFields, ImportArgs, ImportFormat, Output, client, spire_json};
use crate::admin::{ALLOW_UNKNOWN_SELECTOR_TYPE, UNKNOWN_TYPE_IN_API};

/// Entry fields as the admin API names them, and the flags that set them.
const FLAGS: [(&str, &str); 9] = [
    ("spiffe_id", "--spiffe-id"),
    ("parent_id", "--parent-id"),
    ("selectors", "--selector"),
    ("x509_svid_ttl", "--x509-svid-ttl"),
    ("jwt_svid_ttl", "--jwt-svid-ttl"),
    ("dns_names", "--dns-name"),
    ("federates_with", "--federates-with"),
    ("hint", "--hint"),
    ("expires_at", "--expires-at"),
];

pub(crate) async fn entry(cmd: EntryCommand) -> CliResult {
    match cmd {
        EntryCommand::Create {
            fields,
            entry_id,
            data,
            common,
        } => {
            let (allow_exe_only, allow_unknown) =
                (fields.allow_exe_only, fields.allow_unknown_selector_type);
            let (entries, from_flags) = match data {
                Some(path) => {
                    let text = read_input(&path)?;
                    if spire_json::looks_like_spire(&text) {
                        let args = ImportArgs {
                            format: ImportFormat::Spire,
                            data: path,
                            map_parent: Vec::new(),
                            drop: Vec::new(),
                            partial: false,
                            dry_run: false,
                            batch_size: 1000,
                            allow_exe_only,
                            allow_unknown_selector_type: allow_unknown,
                            common,
                        };
                        return import(&text, args).await;
                    }
                    (batch_entries(&text)?, false)
                }
                None => (
                    vec![fields_to_entry(entry_id.unwrap_or_default(), fields)?],
                    true,
                ),
            };
            let mut c = client::connect(&common.socket_path).await?;
            let r = c
                .create_entries(request(
                    pb::CreateEntriesRequest {
                        entries,
                        allow_exe_only,
                        mode: pb::BatchMode::Each.into(),
                    },
                    allow_unknown,
                ))
                .await
                .map_err(status_line)?
                .into_inner();
            report_results(common.output, &r.results, "Created")
                .map_err(|e| if from_flags { flag_names(&e) } else { e })
        }
        EntryCommand::Update {
            entry_id,
            fields,
            common,
        } => update(entry_id, fields, common).await,
        EntryCommand::Delete { entry_ids, common } => {
            let mut c = client::connect(&common.socket_path).await?;
            let r = c
                .delete_entries(pb::DeleteEntriesRequest { ids: entry_ids })
                .await
                .map_err(status_line)?
                .into_inner();
            report_results(common.output, &r.results, "Deleted")
        }
        EntryCommand::Show {
            entry_id,
            spiffe_id,
            parent_id,
            selectors,
            exact,
            common,
        } => {
            let mut c = client::connect(&common.socket_path).await?;
            let entries = match entry_id {
                Some(id) => vec![
                    c.get_entry(pb::GetEntryRequest { id })
                        .await
                        .map_err(status_line)?
                        .into_inner(),
                ],
                None => {
                    c.list_entries(pb::ListEntriesRequest {
                        spiffe_id: spiffe_id.unwrap_or_default(),
                        parent_id: parent_id.unwrap_or_default(),
                        selectors,
                        selectors_exact: exact,
                    })
                    .await
                    .map_err(status_line)?
                    .into_inner()
                    .entries
                }
            };
            print_list(
                common.output,
                ("entries", "entry"),
                &entries,
                entry_json,
                entry_pretty,
            );
            Ok(())
        }
        EntryCommand::Import(args) => import(&read_input(&args.data)?, args).await,
        EntryCommand::Count(common) => {
            let mut c = client::connect(&common.socket_path).await?;
            let n = c
                .list_entries(pb::ListEntriesRequest::default())
                .await
                .map_err(status_line)?
                .into_inner()
                .entries
                .len();
            match common.output {
                Output::Json => println(&json!({"count": n})),
                Output::Pretty => outln!("{n} registration entries"),
            }
            Ok(())
        }
    }
}

/// A request carrying [`ALLOW_UNKNOWN_SELECTOR_TYPE`] when asked for.
pub(super) fn request<T>(message: T, allow_unknown_selector_type: bool) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if allow_unknown_selector_type {
        req.metadata_mut().insert(
            ALLOW_UNKNOWN_SELECTOR_TYPE,
            MetadataValue::from_static("true"),
        );
    }
    req
}

/// `entry update`: whole when the three identifying flags are given (as
/// spire-server does), else only the flags given, merged by the server.
async fn update(entry_id: String, fields: EntryFields, common: super::Common) -> CliResult {
    let whole =
        fields.spiffe_id.is_some() && fields.parent_id.is_some() && !fields.selectors.is_empty();
    let given = given_fields(&fields);
    if given.is_empty() {
        return Err(format!(
            "nothing to change: give the flags to change ({}), or --spiffe-id, --parent-id \
             and --selector to replace the whole entry",
            FLAGS.map(|(_, f)| f).join(", ")
        ));
    }
    let (allow_exe_only, allow_unknown) =
        (fields.allow_exe_only, fields.allow_unknown_selector_type);
    let mut c = client::connect(&common.socket_path).await?;
    let e = c
        .update_entry(request(
            pb::UpdateEntryRequest {
                entry: Some(fields_to_entry(entry_id, fields)?),
                allow_exe_only,
                fields: if whole {
                    Vec::new()
                } else {
                    given.iter().map(|f| (*f).to_owned()).collect()
                },
            },
            allow_unknown,
        ))
        .await
        .map_err(|s| flag_names(&status_line(s)))?
        .into_inner();
    match common.output {
        Output::Json => println(&entry_json(&e)),
        Output::Pretty if whole => out!(
            "Replaced entry {} (the whole entry: fields not given are back to their \
             defaults)\n{}",
            e.id,
            entry_pretty(&e)
        ),
        Output::Pretty => {
            let changed: Vec<&str> = FLAGS
                .iter()
                .filter(|(name, _)| given.contains(name))
                .map(|(_, flag)| *flag)
                .collect();
            out!(
                "Updated entry {} (changed {}; the rest is kept)\n{}",
                e.id,
                changed.join(", "),
                entry_pretty(&e)
            );
        }
    }
    Ok(())
}

/// The admin API names of the fields the flags set.
fn given_fields(f: &EntryFields) -> Vec<&'static str> {
    let set = [
        f.spiffe_id.is_some(),
        f.parent_id.is_some(),
        !f.selectors.is_empty(),
        f.x509_svid_ttl.is_some(),
        f.jwt_svid_ttl.is_some(),
        !f.dns_names.is_empty(),
        !f.federates_with.is_empty(),
        f.hint.is_some(),
        f.expires_at.is_some(),
    ];
    FLAGS
        .iter()
        .zip(set)
        .filter(|(_, given)| *given)
        .map(|((name, _), _)| *name)
        .collect()
}

/// Rewrites the admin API's field names in a message into the flags that
/// set them, so a command-line user reads the names they typed.
fn flag_names(message: &str) -> String {
    let message = message
        .replace(" (allow_exe_only in the admin API)", "")
        .replace(&format!(" {UNKNOWN_TYPE_IN_API}"), "")
        .replace(
            "at least one selector",
            "at least one selector (--selector)",
        );
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    'scan: while !rest.is_empty() {
        // "selectors" is also plain English in messages ("at most 64
        // selectors"), so it is left as it is.
        for (name, flag) in FLAGS.iter().filter(|(name, _)| *name != "selectors") {
            let before_ok = out
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '/' | '.')));
            let Some(after) = rest.strip_prefix(name) else {
                continue;
            };
            if before_ok && !after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                out.push_str(flag);
                rest = after;
                continue 'scan;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

fn fields_to_entry(id: String, f: EntryFields) -> Result<pb::Entry, String> {
    let expires_at = match &f.expires_at {
        Some(s) => parse_expiry(s, SystemTime::now())?,
        None => 0,
    };
    Ok(pb::Entry {
        id,
        spiffe_id: f.spiffe_id.unwrap_or_default(),
        parent_id: f.parent_id.unwrap_or_default(),
        selectors: f.selectors,
        x509_svid_ttl: f.x509_svid_ttl.map_or(0, |d| d.0.as_secs()),
        jwt_svid_ttl: f.jwt_svid_ttl.map_or(0, |d| d.0.as_secs()),
        dns_names: f.dns_names,
        federates_with: f.federates_with,
        hint: f.hint.unwrap_or_default(),
        expires_at,
        created_at: 0,
        revision: 0,
    })
}

/// A TTL in a batch file: "1h"/"90s" as the flags take, or seconds.
fn batch_ttl<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Ttl {
        Secs(u64),
        Text(String),
    }
    match <Ttl as serde::Deserialize>::deserialize(d)? {
        Ttl::Secs(s) => Ok(s),
        Ttl::Text(t) => t
            .parse::<crate::config::HumanDuration>()
            .map(|h| h.0.as_secs())
            .map_err(|e| serde::de::Error::custom(format!("TTL {t:?}: {e}"))),
    }
}

/// An expiry in a batch file: RFC 3339 or Unix seconds, in the future.
fn batch_expiry<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum At {
        Secs(u64),
        Text(String),
    }
    let text = match <At as serde::Deserialize>::deserialize(d)? {
        At::Secs(s) => s.to_string(),
        At::Text(t) => t,
    };
    parse_expiry(&text, SystemTime::now())
        .map_err(|e| serde::de::Error::custom(e.replace("--expires-at", "expires_at")))
}

/// Parses a batch file: `{"entries":[{...}]}` with the entry fields.
fn batch_entries(text: &str) -> Result<Vec<pb::Entry>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        entries: Vec<BatchEntry>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct BatchEntry {
        #[serde(default)]
        id: String,
        spiffe_id: String,
        parent_id: String,
        selectors: Vec<String>,
        #[serde(default, deserialize_with = "batch_ttl")]
        x509_svid_ttl: u64,
        #[serde(default, deserialize_with = "batch_ttl")]
        jwt_svid_ttl: u64,
        #[serde(default)]
        dns_names: Vec<String>,
        #[serde(default)]
        federates_with: Vec<String>,
        #[serde(default)]
        hint: String,
        #[serde(default, deserialize_with = "batch_expiry")]
        expires_at: u64,
    }
    let batch: Batch =
        serde_json::from_str(text).map_err(|e| format!("invalid entries file: {e}"))?;
    Ok(batch
        .entries
        .into_iter()
        .map(|e| pb::Entry {
            id: e.id,
            spiffe_id: e.spiffe_id,
            parent_id: e.parent_id,
            selectors: e.selectors,
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: e.dns_names,
            federates_with: e.federates_with,
            hint: e.hint,
            expires_at: e.expires_at,
            created_at: 0,
            revision: 0,
        })
        .collect())
}

/// Prints batch results; fails if any item failed.
fn report_results(output: Output, results: &[pb::EntryResult], verb: &str) -> CliResult {
    let failed = results.iter().filter(|r| !r.error.is_empty()).count();
    match output {
        Output::Json => println(&json!({"results": results.iter().map(|r| json!({
            "id": r.id,
            "entry": r.entry.as_ref().map(entry_json),
            "error": (!r.error.is_empty()).then_some(&r.error),
        })).collect::<Vec<_>>()})),
        Output::Pretty => {
            for r in results {
                match (&r.entry, r.error.is_empty()) {
                    (Some(e), true) => out!("{verb} entry {}\n{}\n", e.id, entry_pretty(e)),
                    // A lone failure is the command's error line; only batches
                    // list failures one by one.
                    _ if results.len() > 1 => {
                        let who = if r.id.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", r.id)
                        };
                        eprintln!("failed entry{who}: {}", r.error);
                    }
                    _ => {}
                }
            }
        }
    }
    match (failed, results.len()) {
        (0, _) => Ok(()),
        (1, 1) => Err(results[0].error.clone()),
        (n, total) => Err(format!("{n} of {total} entries failed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_field_names_become_flags() {
        assert_eq!(
            flag_names("x509_svid_ttl 99999s is above the maximum of 14400s"),
            "--x509-svid-ttl 99999s is above the maximum of 14400s"
        );
        assert_eq!(
            flag_names("spiffe_id is required"),
            "--spiffe-id is required"
        );
        assert_eq!(
            flag_names("parent_id spiffe://example.org/parent_id_x is not in trust domain"),
            "--parent-id spiffe://example.org/parent_id_x is not in trust domain"
        );
        assert_eq!(
            flag_names("pass --allow-exe-only (allow_exe_only in the admin API) to accept"),
            "pass --allow-exe-only to accept"
        );
        assert_eq!(
            flag_names("an entry needs at least one selector"),
            "an entry needs at least one selector (--selector)"
        );
    }

    #[test]
    fn batch_durations_take_the_flags_forms() {
        let e = batch_entries(
            r#"{"entries":[{"spiffe_id":"a","parent_id":"b","selectors":[],
                "x509_svid_ttl":"1h","jwt_svid_ttl":90,"expires_at":"2999-01-01T00:00:00Z"}]}"#,
        )
        .unwrap();
        assert_eq!((e[0].x509_svid_ttl, e[0].jwt_svid_ttl), (3600, 90));
        assert_eq!(e[0].expires_at, 32_472_144_000);
        for bad in [
            r#""x509_svid_ttl":"1 hour""#,
            r#""x509_svid_ttl":-1"#,
            r#""expires_at":"2001-01-01T00:00:00Z""#,
            r#""expires_at":1"#,
        ] {
            let text = format!(
                r#"{{"entries":[{{"spiffe_id":"a","parent_id":"b","selectors":[],{bad}}}]}}"#
            );
            assert!(batch_entries(&text).is_err(), "{bad}");
        }
    }
}
