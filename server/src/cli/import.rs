//! `oxid-server entry import --format spire`: SPIRE's registration entries
//! into oxid, all or nothing unless `--partial`, with a report per entry.
//!
//! Without `--partial` the whole file is first checked by the server (a
//! dry run, in calls of at most `--batch-size`), and created only if every
//! entry passes; the creation is then all-or-nothing per call, and if a
//! later call fails anyway (someone changed the store in between), the
//! entries of the earlier calls are deleted again.

// A command line reports failures on stderr; results go through `out!`.
#![allow(clippy::print_stderr)]

use std::collections::HashSet;

use oxid_proto::admin as pb;
use serde_json::json;

use super::client::{self, AdminChannel};
use super::commands::{CliResult, status_line};
use super::entry::request;
use super::output::{outln, println};
use super::spire_json::{self, ParentMap, Plan, PlanOptions, Planned};
use super::{ImportArgs, Output};

/// What happened to one entry, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Created(String),
    WouldCreate,
    Skipped(String),
    Refused(Vec<String>),
    /// Valid, but not created because others were refused (or the import
    /// was rolled back).
    NotCreated(String),
}

type Admin = pb::admin_client::AdminClient<AdminChannel>;

/// Imports the entries in `text` (the file `req.data` names, already read:
/// `entry create --data` reads it before it knows the format).
pub(crate) async fn import(text: &str, req: ImportArgs) -> CliResult {
    if req.batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    let options = PlanOptions {
        parents: ParentMap::parse(&req.map_parent)?,
        drop: req.drop.clone(),
    };
    let mut planned = spire_json::plan(text, &options)?;
    let mut c = client::connect(&req.common.socket_path).await?;
    spire_json::note_unknown_parents(&mut planned, &known_ids(&mut c).await?);

    let mut outcomes: Vec<Outcome> = planned
        .iter()
        .map(|p| match &p.plan {
            Plan::Create(_) => Outcome::WouldCreate,
            Plan::Skip(why) => Outcome::Skipped(why.clone()),
            Plan::Refuse(why) => Outcome::Refused(why.clone()),
        })
        .collect();
    let todo: Vec<usize> = (0..planned.len())
        .filter(|&i| outcomes[i] == Outcome::WouldCreate)
        .collect();

    if !req.partial || req.dry_run {
        // The server's own checks (selectors, TTL limits, IDs already
        // stored) for every entry, before anything is written.
        send(
            &mut c,
            &req,
            &planned,
            &todo,
            pb::BatchMode::DryRun,
            &mut outcomes,
        )
        .await?;
    }
    // Refused, or not checked because a whole call failed.
    let blocked = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Refused(_) | Outcome::NotCreated(_)))
        .count();
    if !req.dry_run {
        if blocked > 0 && !req.partial {
            for o in &mut outcomes {
                if *o == Outcome::WouldCreate {
                    *o = Outcome::NotCreated(format!(
                        "not created: {blocked} other entries failed (nothing is created \
                         unless all pass; --partial imports the others)"
                    ));
                }
            }
        } else {
            let mode = if req.partial {
                pb::BatchMode::Each
            } else {
                pb::BatchMode::AllOrNothing
            };
            let todo: Vec<usize> = todo
                .into_iter()
                .filter(|&i| outcomes[i] == Outcome::WouldCreate)
                .collect();
            send(&mut c, &req, &planned, &todo, mode, &mut outcomes).await?;
            if !req.partial {
                roll_back_if_incomplete(&mut c, &todo, &mut outcomes).await;
            }
        }
    }
    report(req.common.output, &planned, &outcomes, req.dry_run);
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Refused(_)))
        .count();
    let failed = refused
        + outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::NotCreated(_)))
            .count();
    match (failed, req.partial) {
        (0, _) => Ok(()),
        // Partial import was asked for: the valid entries are in.
        (_, true) if refused == failed => Ok(()),
        (n, _) => Err(format!(
            "{n} of {} entries were not imported{}",
            planned.len(),
            if req.dry_run { " (dry run)" } else { "" }
        )),
    }
}

/// The IDs an entry's parent may name in oxid: agents and their aliases,
/// and the SPIFFE IDs of stored entries.
async fn known_ids(c: &mut Admin) -> Result<HashSet<String>, String> {
    let agents = c
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map_err(status_line)?
        .into_inner()
        .agents;
    let entries = c
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .map_err(status_line)?
        .into_inner()
        .entries;
    Ok(agents
        .into_iter()
        .flat_map(|a| std::iter::once(a.spiffe_id).chain(a.aliases))
        .chain(entries.into_iter().map(|e| e.spiffe_id))
        .collect())
}

/// Sends the entries at `todo` in calls of `--batch-size` and records each
/// result: created, refused, or (dry run) would be created.
async fn send(
    c: &mut Admin,
    req: &ImportArgs,
    planned: &[Planned],
    todo: &[usize],
    mode: pb::BatchMode,
    outcomes: &mut [Outcome],
) -> CliResult {
    for chunk in todo.chunks(req.batch_size) {
        let entries = chunk
            .iter()
            .filter_map(|&i| match &planned[i].plan {
                Plan::Create(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        let call = request(
            pb::CreateEntriesRequest {
                entries,
                allow_exe_only: req.allow_exe_only,
                mode: mode.into(),
            },
            req.allow_unknown_selector_type,
        );
        let results = match c.create_entries(call).await {
            Ok(r) => r.into_inner().results,
            // A call refused whole (the server down, a batch too large)
            // leaves the earlier calls' entries: the caller rolls back.
            Err(status) => {
                let line = status_line(status);
                for &i in chunk {
                    outcomes[i] = Outcome::NotCreated(format!("not created: {line}"));
                }
                continue;
            }
        };
        for (&i, r) in chunk.iter().zip(results) {
            outcomes[i] = match (r.error.is_empty(), mode, r.entry) {
                (true, pb::BatchMode::DryRun, _) => Outcome::WouldCreate,
                (true, _, Some(e)) => Outcome::Created(e.id),
                (true, _, None) => Outcome::NotCreated("the server returned no entry".into()),
                (false, _, _) if r.error.starts_with("not created:") => {
                    Outcome::NotCreated(r.error)
                }
                (false, _, _) => Outcome::Refused(vec![r.error]),
            };
        }
    }
    Ok(())
}

/// All or nothing across calls: if any entry of `todo` was not created,
/// deletes the ones that were.
async fn roll_back_if_incomplete(c: &mut Admin, todo: &[usize], outcomes: &mut [Outcome]) {
    if todo
        .iter()
        .all(|&i| matches!(outcomes[i], Outcome::Created(_)))
    {
        return;
    }
    let created: Vec<usize> = todo
        .iter()
        .copied()
        .filter(|&i| matches!(outcomes[i], Outcome::Created(_)))
        .collect();
    for chunk in created.chunks(1000) {
        let ids = chunk
            .iter()
            .filter_map(|&i| match &outcomes[i] {
                Outcome::Created(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        let results = c
            .delete_entries(pb::DeleteEntriesRequest { ids })
            .await
            .map(|r| r.into_inner().results);
        for (n, &i) in chunk.iter().enumerate() {
            let Outcome::Created(id) = &outcomes[i] else {
                continue;
            };
            let undone = match &results {
                Ok(r) => r.get(n).is_some_and(|r| r.error.is_empty()),
                Err(_) => false,
            };
            outcomes[i] = Outcome::NotCreated(if undone {
                "created, then deleted again: other entries of the import failed".into()
            } else {
                format!("created as {id} but could not be deleted again: delete it by hand")
            });
        }
    }
}

fn report(output: Output, planned: &[Planned], outcomes: &[Outcome], dry_run: bool) {
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let created = count(|o| matches!(o, Outcome::Created(_)));
    let would = count(|o| *o == Outcome::WouldCreate);
    let skipped = count(|o| matches!(o, Outcome::Skipped(_)));
    let refused = count(|o| matches!(o, Outcome::Refused(_)));
    let not_created = count(|o| matches!(o, Outcome::NotCreated(_)));
    match output {
        Output::Json => println(&json!({
            "dry_run": dry_run,
            "entries": planned.iter().zip(outcomes).map(|(p, o)| {
                let (status, id, reasons): (&str, Option<&String>, Vec<String>) = match o {
                    Outcome::Created(id) => ("created", Some(id), Vec::new()),
                    Outcome::WouldCreate => ("would_create", None, Vec::new()),
                    Outcome::Skipped(why) => ("skipped", None, vec![why.clone()]),
                    Outcome::Refused(why) => ("refused", None, why.clone()),
                    Outcome::NotCreated(why) => ("not_created", None, vec![why.clone()]),
                };
                json!({
                    "source": p.source,
                    "spiffe_id": p.spiffe_id,
                    "status": status,
                    "id": id,
                    "reasons": reasons,
                    "notes": p.notes,
                })
            }).collect::<Vec<_>>(),
            "created": created,
            "skipped": skipped,
            "refused": refused,
            "not_created": not_created,
        })),
        Output::Pretty => {
            for (p, o) in planned.iter().zip(outcomes) {
                let what = format!("SPIRE entry {} ({})", p.source, p.spiffe_id);
                match o {
                    Outcome::Created(id) => outln!("{what}: created as {id}"),
                    Outcome::WouldCreate => outln!("{what}: would be created"),
                    Outcome::Skipped(why) => outln!("{what}: skipped: {why}"),
                    Outcome::Refused(why) => eprintln!("{what}: refused: {}", why.join("; ")),
                    Outcome::NotCreated(why) => eprintln!("{what}: {why}"),
                }
                for note in &p.notes {
                    outln!("  note: {note}");
                }
            }
            if dry_run {
                outln!(
                    "Dry run: {would} of {} entries would be created, {skipped} skipped, \
                     {refused} refused; nothing was written",
                    planned.len()
                );
            } else {
                outln!(
                    "Imported {created} of {} entries ({skipped} skipped, {refused} refused, \
                     {not_created} not created)",
                    planned.len()
                );
            }
        }
    }
}
