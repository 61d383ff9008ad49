//! Follows the server's sync stream into the cache, reconnecting with
//! jittered exponential backoff. While the server is unreachable the agent
//! keeps serving what it has.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;
use oxid_proto::agent as pb;
use oxid_proto::stream_end::StreamEnd;
use oxid_tls::SharedBundle;

use crate::cache::{Cache, Entries, Entry};
use crate::server_client::ServerClient;
use crate::servers::Connected;

/// Bounds of the reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `base` scaled by a random factor in [0.5, 1.5), so agents that lost the
/// server together do not return together.
pub(crate) fn jittered(base: Duration) -> Duration {
    jitter_by(base, crate::svids::random_unit())
}

/// `base` scaled by `0.5 + unit`, `unit` in [0, 1).
fn jitter_by(base: Duration, unit: f64) -> Duration {
    base.mul_f64(0.5 + unit)
}

/// The entries and bundles being assembled from one snapshot or delta.
#[derive(Default)]
struct View {
    revision: u64,
    /// The incarnation of the store `revision` is of, as the server gave
    /// it: a server whose store is of another (a restored backup) answers
    /// with a snapshot instead of a delta. Empty from an older server.
    incarnation: String,
    /// Shared with published snapshots: a delta copies pointers, not entries.
    entries: HashMap<String, Arc<Entry>>,
    bundles: BTreeMap<TrustDomain, Arc<Bundle>>,
}

/// Since when, and from which server, the agent has had no sync stream.
struct Lost {
    at: std::time::Instant,
    from: Option<Connected>,
    /// The server ended the connection at its maximum age: a planned move,
    /// not a failover.
    aged: bool,
}

/// Runs forever: sync, apply, publish; on error, back off and retry, on
/// the next server first unless the error was about the agent itself.
pub(crate) async fn run(
    server: Arc<ServerClient>,
    cache: Arc<Cache>,
    tls_bundle: Arc<SharedBundle>,
    data_dir: PathBuf,
) {
    let mut backoff = BACKOFF_MIN;
    let mut view = View::default();
    let mut lost: Option<Lost> = None;
    loop {
        let outcome = follow(
            &server,
            &cache,
            &tls_bundle,
            &data_dir,
            &mut view,
            &mut lost,
        )
        .await;
        // The view was current until a stream that was up ended: the sync
        // age counts from here.
        let was_up = cache.counters.server_connected.swap(false, Relaxed);
        if was_up && cache.current().synced {
            mark_synced(&cache);
        }
        let aged = outcome
            .as_ref()
            .err()
            .is_some_and(|s| StreamEnd::of(s) == Some(StreamEnd::ConnectionAged));
        if was_up {
            // A stream that was up: the backoff starts again from its
            // minimum (still jittered, so the agents of a server that died
            // do not all reach the next one at the same instant).
            backoff = BACKOFF_MIN;
            lost = Some(Lost {
                at: std::time::Instant::now(),
                from: server.connected(),
                aged,
            });
        }
        match outcome {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(status) => {
                let mut move_on = true;
                match StreamEnd::of(&status) {
                    // Normal events, not failures: the server stopping (a
                    // restart), the connection at its maximum age, or this
                    // agent's own renewal retiring the SVID the stream was
                    // opened with.
                    Some(StreamEnd::ShuttingDown) => {
                        tracing::info!(
                            "the server is stopping; reconnecting, to another server first"
                        );
                    }
                    Some(StreamEnd::ConnectionAged) => {
                        tracing::info!(
                            "the server ended the connection at its maximum age; reconnecting, to the next server first"
                        );
                        backoff = BACKOFF_MIN;
                    }
                    // Only a stream that was up: refused at once, the SVID
                    // this agent holds is not current, which is a failure.
                    Some(StreamEnd::SvidReplaced) if was_up => {
                        tracing::info!(
                            "sync stream ended after the agent SVID was renewed; reconnecting with the new one"
                        );
                        backoff = BACKOFF_MIN;
                        move_on = false;
                    }
                    _ => {
                        server.note_sync_refusal(&status);
                        // About the agent, not the server: another server
                        // would say the same.
                        move_on = !matches!(
                            status.code(),
                            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                        );
                        tracing::warn!(code = ?status.code(), error = %status.message(), "sync interrupted; retrying");
                    }
                }
                if move_on {
                    if let Err(e) = server.move_on() {
                        tracing::error!(error = %e, "cannot make a channel to the next server");
                    }
                }
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Logs (and counts) where the new stream is, against where the last one
/// was: a failover at INFO with both servers and how long the agent was
/// without a stream, so its time can be read from the log.
fn note_connected(
    cache: &Cache,
    lost: Option<Lost>,
    now_on: Option<Connected>,
    page: &pb::SyncResponse,
) {
    let server = now_on
        .as_ref()
        .map_or_else(|| "?".to_owned(), ToString::to_string);
    *cache
        .counters
        .server
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(server.clone());
    let Some(lost) = lost else {
        tracing::info!(%server, revision = page.revision, "connected to the server");
        return;
    };
    let after_ms = u64::try_from(lost.at.elapsed().as_millis()).unwrap_or(u64::MAX);
    let moved = lost.from.as_ref().map(|c| c.socket) != now_on.as_ref().map(|c| c.socket);
    let from = lost
        .from
        .as_ref()
        .map_or_else(|| "?".to_owned(), ToString::to_string);
    match (moved, lost.aged) {
        (true, false) => {
            cache.counters.server_failovers.fetch_add(1, Relaxed);
            tracing::info!(
                %from, to = %server, after_ms, revision = page.revision, snapshot = page.snapshot,
                "failed over to another server"
            );
        }
        (true, true) => tracing::info!(
            %from, to = %server, after_ms, revision = page.revision, snapshot = page.snapshot,
            "moved to another server at the connection's maximum age"
        ),
        (false, _) => tracing::info!(
            %server, after_ms, revision = page.revision, snapshot = page.snapshot,
            "reconnected to the server"
        ),
    }
}

async fn follow(
    server: &ServerClient,
    cache: &Cache,
    tls_bundle: &SharedBundle,
    data_dir: &std::path::Path,
    view: &mut View,
    lost: &mut Option<Lost>,
) -> Result<(), tonic::Status> {
    // Taken before the stream opens: a renewal from here on reconnects it.
    let mut identity = server.identity_changes();
    identity.mark_unchanged();
    let mut stream = server.api().sync(resume_request(view)).await?.into_inner();
    let mut staging: Option<View> = None;
    loop {
        let page = tokio::select! {
            page = stream.message() => match page? {
                Some(page) => page,
                None => break,
            },
            // Reopened with the new identity (the loop in `run` goes on at
            // once); the server then retires the old SVID.
            _ = identity.changed() => {
                tracing::info!("reconnecting the sync stream with the renewed agent SVID");
                return Ok(());
            }
        };
        if !cache.counters.server_connected.swap(true, Relaxed) {
            note_connected(cache, lost.take(), server.connected(), &page);
        }
        // A server never takes the agent back in time (it waits for its
        // index, or refuses): a page older than the view is a server bug,
        // and applying it could bring back a deleted entry.
        if page.revision < view.revision && !page.snapshot {
            return Err(tonic::Status::internal(format!(
                "the server sent revision {} to an agent at {}",
                page.revision, view.revision
            )));
        }
        let target = if page.snapshot {
            staging.insert(View::default())
        } else {
            staging.get_or_insert_with(|| View {
                revision: view.revision,
                incarnation: view.incarnation.clone(),
                entries: view.entries.clone(),
                bundles: view.bundles.clone(),
            })
        };
        apply(target, &page, &cache.trust_domain);
        if page.more {
            continue;
        }
        // A page without `more` completes the snapshot or delta.
        if let Some(done) = staging.take() {
            *view = done;
            publish(view, cache, tls_bundle, data_dir);
        }
    }
    Ok(())
}

/// Resumes from what the agent holds: the server answers with a delta if
/// its store is of the view's incarnation, else with a snapshot.
fn resume_request(view: &View) -> pb::SyncRequest {
    let known_entry_ids = if view.revision > 0 {
        view.entries.keys().cloned().collect()
    } else {
        vec![]
    };
    pb::SyncRequest {
        revision: view.revision,
        known_entry_ids,
        incarnation: view.incarnation.clone(),
    }
}

fn apply(view: &mut View, page: &pb::SyncResponse, own: &TrustDomain) {
    view.revision = page.revision;
    // A delta may come from a later opening of the same store (sled's
    // lineage), whose incarnation the agent resumes from next time.
    view.incarnation.clone_from(&page.incarnation);
    for e in &page.upserts {
        if let Some(entry) = Entry::from_pb(e) {
            view.entries.insert(entry.id.clone(), Arc::new(entry));
        }
    }
    for id in &page.removed_ids {
        view.entries.remove(id);
    }
    for b in &page.bundles {
        let Ok(td) = TrustDomain::new(&b.trust_domain) else {
            continue;
        };
        match Bundle::from_spiffe_json(td.clone(), b.spiffe_json.as_bytes()) {
            Ok(bundle) => {
                view.bundles.insert(td, Arc::new(bundle));
            }
            Err(e) => {
                tracing::warn!(trust_domain = %td, error = %e, "ignoring an unreadable bundle")
            }
        }
    }
    for td in &page.removed_bundles {
        if let Ok(td) = TrustDomain::new(td) {
            if &td != own {
                view.bundles.remove(&td);
            }
        }
    }
}

/// Records that the agent's view is current now (`oxid_agent_sync_age_seconds`).
fn mark_synced(cache: &Cache) {
    *cache
        .counters
        .last_sync
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
}

fn publish(view: &View, cache: &Cache, tls_bundle: &SharedBundle, data_dir: &std::path::Path) {
    let entries = Arc::new(Entries::new(view.entries.values().cloned().collect()));
    if let Some(own) = view.bundles.get(&cache.trust_domain) {
        // The TLS verifier follows the synced bundle, so CA rotation on the
        // server never locks the agent out; persisted for restarts.
        tls_bundle.set(own.as_ref().clone());
        if let Err(e) = crate::state::save_bundle(data_dir, own) {
            tracing::warn!(error = %e, "cannot persist the bundle");
        }
    }
    let bundles = view.bundles.clone();
    // Before the view is published: whoever sees it synced (readiness,
    // metrics) then also sees a sync time, never "not synced yet" (-1).
    mark_synced(cache);
    cache.update(|old| {
        let mut next = old.clone_shallow();
        next.synced = true;
        next.entries = entries;
        next.bundles = bundles;
        // SVIDs of entries that left are dropped at once.
        next.svids.retain(|id, _| next.entries.contains(id));
        next
    });
    tracing::debug!(
        revision = view.revision,
        entries = view.entries.len(),
        "synced"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_resumes_with_the_incarnation_of_its_last_page() {
        let own = TrustDomain::new("example.org").unwrap();
        let mut view = View::default();
        let page = pb::SyncResponse {
            revision: 9,
            incarnation: "pg-1-2".into(),
            ..Default::default()
        };
        apply(&mut view, &page, &own);
        let request = resume_request(&view);
        assert_eq!(request.revision, 9);
        assert_eq!(request.incarnation, "pg-1-2");
        // A delta from a later opening of the same store (sled) moves it on.
        let page = pb::SyncResponse {
            revision: 10,
            incarnation: "next".into(),
            ..Default::default()
        };
        apply(&mut view, &page, &own);
        assert_eq!(resume_request(&view).incarnation, "next");
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(5) && d < Duration::from_secs(15),
                "{d:?}"
            );
        }
        let top = jitter_by(Duration::from_secs(10), crate::svids::unit_from(u16::MAX));
        assert!(top < Duration::from_secs(15), "{top:?}");
        assert_eq!(
            jitter_by(Duration::from_secs(10), crate::svids::unit_from(0)),
            Duration::from_secs(5)
        );
    }
}
