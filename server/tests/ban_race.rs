//! A ban or an eviction holds from the moment the admin call answers
//! (issue 12, SECURITY.md "Banned agent"): the very next SignX509Svids or
//! MintJwtSvid of that agent, sent without any pause, is refused, and its
//! open Sync stream ends with PermissionDenied. The agent API checks the
//! agent against an in-memory index that follows the datastore a moment
//! behind; a flood of admin writes keeps that follower busy, as a busy
//! server would, so a check that trusts the index alone is caught. The
//! same window once made a renewed SVID used at once look "replaced".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use oxid_proto::agent::agent_api_client::AgentApiClient;
use tonic::Code;
use tonic::transport::Channel;

use support::inproc::{Server, WAIT, next, renew_with, sign_on};

/// Agents banned, and as many evicted, one after another.
const ROUNDS: usize = 50;

/// Entries in each write of the flood that keeps the index follower busy.
const FLOOD_BATCH: usize = 300;

/// An attested agent with an entry of its own, an open connection
/// presenting its SVID, and an open Sync stream.
struct Victim {
    id: String,
    entry: String,
    client: AgentApiClient<Channel>,
    sync: tonic::Streaming<pb::SyncResponse>,
}

async fn victim(s: &Server, n: usize) -> Victim {
    let agent = s.agent().await;
    let id = agent.id.to_string();
    let entry = s
        .create_entry(
            &format!("spiffe://example.org/victim/{n}"),
            &id,
            "unix:uid:1000",
            0,
        )
        .await;
    let mut client = s.client(Some(agent.certs.clone())).await;
    // Served before the cut: the call and the entry work.
    sign_on(&mut client, &entry).await.unwrap();
    let mut sync = client
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    next(&mut sync)
        .await
        .unwrap()
        .expect("a first Sync message");
    Victim {
        id,
        entry,
        client,
        sync,
    }
}

/// Writes entries that no victim can have until `stop` is set.
async fn flood(s: &Server, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let mut admin = s.admin().await;
    tokio::spawn(async move {
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let entries = (0..FLOOD_BATCH)
                .map(|_| {
                    n += 1;
                    admin_pb::Entry {
                        spiffe_id: format!("spiffe://example.org/flood/{n}"),
                        parent_id: "spiffe://example.org/flood-parent".into(),
                        selectors: vec!["unix:uid:1".into()],
                        ..Default::default()
                    }
                })
                .collect();
            admin
                .create_entries(admin_pb::CreateEntriesRequest {
                    entries,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    })
}

/// A call's outcome, short.
fn outcome<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "was served".into(),
        Err(e) => format!("failed with {e:?}"),
    }
}

/// The calls `v` makes right after the cut answered: each must be
/// PermissionDenied. Returns those that were served or failed otherwise.
async fn calls_after_cut(v: &mut Victim) -> Vec<String> {
    let mut wrong = Vec::new();
    match sign_on(&mut v.client, &v.entry).await {
        Err(e) if e.code() == Code::PermissionDenied => {}
        other => wrong.push(format!("{}: SignX509Svids {}", v.id, outcome(&other))),
    }
    let jwt = v
        .client
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            entry_id: v.entry.clone(),
            audience: vec!["ban-race".into()],
        })
        .await;
    match jwt {
        Err(e) if e.code() == Code::PermissionDenied => {}
        other => wrong.push(format!("{}: MintJwtSvid {}", v.id, outcome(&other))),
    }
    wrong
}

/// The open Sync of `v` ends with PermissionDenied (messages sent before
/// the cut may still be in flight).
async fn sync_is_cut(v: &mut Victim) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: Sync still open",
            v.id
        );
        match next(&mut v.sync).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("{}: Sync ended without PermissionDenied", v.id),
            Err(e) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{}: {e:?}", v.id);
                return;
            }
        }
    }
}

/// Bans (or evicts) `ROUNDS` agents under the flood, each followed at once
/// by its calls; the served calls.
async fn race(s: &Server, evict: bool) -> Vec<String> {
    let mut victims = Vec::new();
    for n in 0..ROUNDS {
        victims.push(victim(s, n + usize::from(evict) * ROUNDS).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(s, stop.clone()).await;
    let mut admin = s.admin().await;
    let mut wrong = Vec::new();
    for v in &mut victims {
        let request = admin_pb::AgentRequest {
            spiffe_id: v.id.clone(),
        };
        if evict {
            admin.evict_agent(request).await.unwrap();
        } else {
            admin.ban_agent(request).await.unwrap();
        }
        wrong.extend(calls_after_cut(v).await);
    }
    stop.store(true, Ordering::Relaxed);
    flooding.await.unwrap();
    for v in &mut victims {
        sync_is_cut(v).await;
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_is_served_once_a_ban_has_answered() {
    let s = Server::start("").await;
    let wrong = race(&s, false).await;
    assert!(
        wrong.is_empty(),
        "{} of {} calls after the ban were not refused:\n{}",
        wrong.len(),
        2 * ROUNDS,
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_is_served_once_an_eviction_has_answered() {
    let s = Server::start("").await;
    let wrong = race(&s, true).await;
    assert!(
        wrong.is_empty(),
        "{} of {} calls after the eviction were not refused:\n{}",
        wrong.len(),
        2 * ROUNDS,
        wrong.join("\n")
    );
}

/// The same window the other way: an SVID renewed under the flood is
/// served at once, not refused as "replaced" by a copy without its serial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_svid_is_served_at_once() {
    let s = Server::start("").await;
    let mut agent = s.agent().await;
    let entry = s
        .create_entry(
            "spiffe://example.org/renewed",
            agent.id.as_str(),
            "unix:uid:1000",
            0,
        )
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(&s, stop.clone()).await;
    let mut wrong = Vec::new();
    for round in 0..ROUNDS {
        let key = oxid_pki::KeyPair::generate(oxid_pki::KeyAlgorithm::EcdsaP256).unwrap();
        let mut old = s.client(Some(agent.certs.clone())).await;
        agent = renew_with(&mut old, &agent, &key).await.unwrap();
        let mut new = s.client(Some(agent.certs.clone())).await;
        if let Err(e) = sign_on(&mut new, &entry).await {
            wrong.push(format!("round {round}: {e:?}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    flooding.await.unwrap();
    assert!(
        wrong.is_empty(),
        "{} of {ROUNDS} renewed SVIDs were refused at once:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
