//! The SVID manager: keeps an X509-SVID for every authorised entry, signed
//! in batches with keys generated here, replaced at about half-life with
//! ±10 % jitter (so thousands of SVIDs never renew in one burst) and at once
//! when their entry changes.

use std::sync::Arc;
use std::time::Duration;

use oxid_pki::x509::Csr;
use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::agent as pb;
use oxid_proto::limit::{Limit, LimitExceeded};
use ring::rand::SecureRandom as _;
use tokio::time::Instant;

use crate::cache::{Cache, Entries, Entry, HeldSvid};
use crate::clock::{self, WallClock};
use crate::server_client::ServerClient;

/// CSRs per `SignX509Svids` call at first. A server that takes fewer (its
/// `max_csrs_per_call` or `max_request_kib`) gets halved batches instead.
const BATCH: usize = 500;

/// Why a signing call failed.
#[derive(Debug, thiserror::Error)]
enum SignError {
    /// The server takes fewer CSRs, or fewer bytes, in one call.
    #[error("the batch is too large for the server: {0}")]
    BatchTooLarge(String),
    /// Anything else: retried on the next pass.
    #[error("{0}")]
    Failed(String),
}

/// When to replace an SVID valid for `life` from `issued`: at half its
/// life, moved by up to ±10 % of the life.
pub(crate) fn rotate_at(issued: Instant, life: Duration, jitter_unit: f64) -> Instant {
    clock::after(
        issued,
        life.mul_f64(0.4 + 0.2 * jitter_unit.clamp(0.0, 1.0)),
    )
}

/// The shortest wait between two signing passes: an SVID that stays due
/// (its entry just left) must not make the loop spin.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);
/// The wait when nothing is held.
const IDLE_PASS_INTERVAL: Duration = Duration::from_secs(3600);

/// How long to sleep before the next signing pass, given when each held
/// SVID is to be rotated. An SVID whose time came while the last pass was
/// signing others is due now: it used to make this wait an hour, so with
/// thousands of SVIDs most of them expired unrotated (found by
/// `oxid-bench agent`).
pub(crate) fn next_pass(rotate_at: impl Iterator<Item = Instant>, now: Instant) -> Duration {
    rotate_at
        .min()
        .map_or(IDLE_PASS_INTERVAL, |t| t.saturating_duration_since(now))
        .max(MIN_PASS_INTERVAL)
}

/// A random number in [0, 1) for jitter.
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    unit_from(u16::from_le_bytes(b))
}

/// `raw` mapped onto [0, 1). Dividing by 2^16 rather than `u16::MAX` keeps
/// 1.0 out, so jittered ranges stay half-open as documented.
pub(crate) fn unit_from(raw: u16) -> f64 {
    f64::from(raw) / 65536.0
}

/// Entries that need a (new) SVID now: the first `presign` entries (in SVID
/// order), any a workload asked for, and those already held (to rotate);
/// others wait for a first request, so memory follows the entries in use.
fn due(
    entries: &Entries,
    held: &std::collections::HashMap<Arc<str>, Arc<HeldSvid>>,
    demanded: &std::collections::HashSet<String>,
    presign: usize,
    now: Instant,
) -> Vec<Arc<Entry>> {
    let mut due = entries
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            *i < presign || demanded.contains(&e.id) || held.contains_key(e.id.as_str())
        })
        .map(|(_, e)| e)
        .filter(|e| match held.get(e.id.as_str()) {
            None => true,
            Some(s) => s.entry_revision != e.revision || now >= s.rotate_at,
        })
        .cloned()
        .collect::<Vec<_>>();
    // What a workload is waiting for goes first (a stable sort keeps the
    // SVID order otherwise): after a restart with thousands of entries, a
    // caller used to wait for the whole pass.
    due.sort_by_key(|e| !demanded.contains(&e.id));
    due
}

/// Runs forever: sign what is due, then sleep until the next rotation or
/// the next cache change.
pub(crate) async fn run(
    server: Arc<ServerClient>,
    cache: Arc<Cache>,
    presign: usize,
    wall: WallClock,
) {
    let mut changes = cache.subscribe();
    let mut batch = BATCH;
    loop {
        let snapshot = cache.current();
        let now = Instant::now();
        let demanded = {
            let mut demand = cache.demand.lock().unwrap_or_else(|e| e.into_inner());
            // Entries that left the authorised set are no longer wanted.
            demand.retain(|id| snapshot.entries.contains(id));
            demand.clone()
        };
        let todo = due(&snapshot.entries, &snapshot.svids, &demanded, presign, now);
        let mut failed = false;
        let mut rest: &[Arc<Entry>] = &todo;
        while !rest.is_empty() {
            let n = batch.min(rest.len());
            match sign(&server, &rest[..n], &wall).await {
                Ok(signed) => {
                    cache.update(|old| {
                        let mut next = old.clone_shallow();
                        for (id, svid) in signed {
                            // Only for entries still authorised.
                            if next.entries.contains(&id)
                                && next.svids.insert(id.into(), Arc::new(svid)).is_some()
                            {
                                cache
                                    .counters
                                    .rotations
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        next
                    });
                    rest = &rest[n..];
                    // A workload asked for something new: start the pass
                    // again, with that first.
                    if cache.demand.lock().unwrap_or_else(|e| e.into_inner()).len() > demanded.len()
                    {
                        break;
                    }
                }
                Err(SignError::BatchTooLarge(why)) if n > 1 => {
                    batch = n / 2;
                    tracing::info!(batch, reason = %why, "signing in smaller batches");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "signing SVIDs failed; will retry");
                    failed = true;
                    rest = &rest[n..];
                }
            }
        }
        changes.borrow_and_update();
        let next = cache.current();
        // Entries that arrived during the pass are due now, not at the next
        // rotation: marking their change seen above used to leave them
        // unsigned for up to half a TTL (found by `oxid-bench agent`).
        if !Arc::ptr_eq(&next.entries, &snapshot.entries) {
            continue;
        }
        let wait = if failed {
            crate::sync::jittered(Duration::from_secs(2))
        } else {
            next_pass(next.svids.values().map(|s| s.rotate_at), Instant::now())
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = cache.demand_notify.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// A fresh key and its CSR for each (entry ID, revision).
#[allow(clippy::type_complexity)]
fn new_keys(
    wanted: Vec<(String, u64)>,
) -> Result<(Vec<(String, u64, KeyPair)>, Vec<pb::SvidRequest>), SignError> {
    let mut keys = Vec::with_capacity(wanted.len());
    let mut requests = Vec::with_capacity(wanted.len());
    for (id, revision) in wanted {
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256)
            .map_err(|e| SignError::Failed(e.to_string()))?;
        requests.push(pb::SvidRequest {
            entry_id: id.clone(),
            csr: Csr::create(&key).map_err(|e| SignError::Failed(e.to_string()))?,
        });
        keys.push((id, revision, key));
    }
    Ok((keys, requests))
}

async fn sign(
    server: &ServerClient,
    entries: &[Arc<Entry>],
    wall: &WallClock,
) -> Result<Vec<(String, HeldSvid)>, SignError> {
    let wanted: Vec<(String, u64)> = entries.iter().map(|e| (e.id.clone(), e.revision)).collect();
    // Hundreds of key pairs and CSRs take tens of milliseconds: off the
    // runtime's threads, so Workload API calls are not queued behind them.
    let (keys, requests) = tokio::task::spawn_blocking(move || new_keys(wanted))
        .await
        .map_err(|e| SignError::Failed(e.to_string()))??;
    // Lifetimes count from before the request: the SVIDs were signed after.
    let asked = Instant::now();
    let resp = server
        .api()
        .sign_x509_svids(pb::SignX509SvidsRequest { requests })
        .await
        .map_err(|s| {
            // Over the server's rate: workload mints step aside meanwhile.
            server.note_refusal(&s);
            let too_many =
                LimitExceeded::from_status(&s).is_some_and(|l| l.limit == Limit::MaxCsrsPerCall);
            match s.code() {
                // Over max_request_kib (tonic's size limit, before decoding).
                tonic::Code::OutOfRange => SignError::BatchTooLarge(s.message().to_owned()),
                // Over max_csrs_per_call: the server's typed refusal.
                _ if too_many => SignError::BatchTooLarge(s.message().to_owned()),
                _ => SignError::Failed(s.message().to_owned()),
            }
        })?
        .into_inner();
    let mut out = Vec::with_capacity(keys.len());
    for ((id, revision, key), signed) in keys.into_iter().zip(resp.svids) {
        // An empty chain would be served as an empty field: refused too.
        if !signed.error.is_empty() || signed.entry_id != id || signed.cert_chain.is_empty() {
            tracing::warn!(entry = %id, error = %signed.error, "the server refused an SVID");
            continue;
        }
        let chain_der = signed.cert_chain.concat();
        let life = clock::Issued::from_wire(signed.valid_for_ms, signed.expires_at).life(wall);
        out.push((
            id,
            HeldSvid {
                chain_der,
                key: key.into_pkcs8(),
                entry_revision: revision,
                expires: clock::after(asked, life),
                rotate_at: rotate_at(asked, life, random_unit()),
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_units_are_half_open() {
        assert_eq!(unit_from(0), 0.0);
        assert!(unit_from(u16::MAX) < 1.0);
    }

    fn entry(id: &str) -> Entry {
        crate::cache::Entry::from_pb(&oxid_proto::agent::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            selectors: vec!["unix:uid:1".into()],
            revision: 1,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn only_presigned_and_demanded_entries_are_due() {
        let entries = Entries::new(
            ["a", "b", "c", "d"]
                .iter()
                .map(|i| Arc::new(entry(i)))
                .collect(),
        );
        let held = std::collections::HashMap::new();
        let mut demanded = std::collections::HashSet::new();
        let ids = |v: Vec<Arc<Entry>>| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        let now = Instant::now();
        assert_eq!(ids(due(&entries, &held, &demanded, 2, now)), ["a", "b"]);
        demanded.insert("d".to_owned());
        assert_eq!(
            ids(due(&entries, &held, &demanded, 2, now)),
            ["d", "a", "b"],
            "what a workload waits for first"
        );
        assert_eq!(ids(due(&entries, &held, &demanded, 0, now)), ["d"]);
    }

    #[test]
    fn rotation_is_at_half_life_with_ten_percent_jitter() {
        let t0 = Instant::now();
        let life = Duration::from_secs(3600);
        assert_eq!(rotate_at(t0, life, 0.5), t0 + Duration::from_secs(1800));
        assert_eq!(rotate_at(t0, life, 0.0), t0 + Duration::from_secs(1440));
        assert_eq!(rotate_at(t0, life, 1.0), t0 + Duration::from_secs(2160));
        assert_eq!(
            rotate_at(t0, life, 7.0),
            t0 + Duration::from_secs(2160),
            "clamped"
        );
    }

    #[test]
    fn the_next_pass_comes_when_the_first_svid_is_due_even_if_overdue() {
        let now = Instant::now() + Duration::from_secs(1_000_000);
        let secs = Duration::from_secs;
        assert_eq!(
            next_pass([now + secs(90), now + secs(30)].into_iter(), now),
            secs(30)
        );
        assert_eq!(
            next_pass([now + secs(90), now - secs(5)].into_iter(), now),
            MIN_PASS_INTERVAL,
            "an overdue SVID is rotated at once, not in an hour"
        );
        assert_eq!(next_pass(std::iter::empty(), now), IDLE_PASS_INTERVAL);
    }
}
