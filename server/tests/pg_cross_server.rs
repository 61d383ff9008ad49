//! What one server does to an agent holds on every other server of the
//! database (issue 15 item 4), shown with real servers (`run_with`, each
//! with its own data directory and CA) on one real PostgreSQL database,
//! and agent-API clients that attest, sync, sign and renew as the agent
//! does:
//!
//! - a ban or an eviction through server A's admin API ends the agent's
//!   open Sync stream on server B at once (B learns it through the change
//!   feed; the delay is printed), and B refuses the agent's next calls;
//! - one join token raced by three agents against three servers attests
//!   exactly one;
//! - renewals on B racing a ban on A never undo it: once the ban has
//!   answered no renewal succeeds anywhere, and the record stays banned
//!   as both servers read it.
//!
//! The store-level races are in `pg_servers.rs`, the one-server ones in
//! `agent_api.rs`, `ban_race.rs` and `agent_identity.rs`. Needs the
//! cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use oxid_proto::agent::agent_api_client::AgentApiClient;
use tonic::Code;
use tonic::transport::Channel;

use support::Agent;
use support::inproc::{Server, next, renew_with, sign_on};

/// How long a stream may take to end after the ban has answered.
const CUT_BOUND: Duration = Duration::from_secs(5);

/// Servers named `names`, started one after another on one new database.
async fn servers(names: &[&str]) -> Vec<Server> {
    let db = pg_cluster::fresh().await;
    let mut started = Vec::new();
    for name in names {
        let config = format!(
            "server_name = {name:?}\n[datastore]\nurl = {:?}\n",
            db.to_string()
        );
        started.push(Server::start(&config).await);
    }
    started
}

fn request(id: &str) -> admin_pb::AgentRequest {
    admin_pb::AgentRequest {
        spiffe_id: id.to_owned(),
    }
}

/// `r` is the refusal of an agent that is banned (or, `evicted`, gone).
fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, evicted: bool, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    let expected = if evicted { "not attested" } else { "banned" };
    assert!(e.message().contains(expected), "{what}: {e:?}");
}

/// The status `sync` ends with, within [`CUT_BOUND`] of `answered`
/// (messages sent before the cut may still arrive first).
async fn end_of(sync: &mut tonic::Streaming<pb::SyncResponse>, answered: Instant) -> tonic::Status {
    let deadline = tokio::time::Instant::from_std(answered + CUT_BOUND);
    loop {
        match tokio::time::timeout_at(deadline, sync.message()).await {
            Err(_) => panic!("the Sync stream was still open {CUT_BOUND:?} after the answer"),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the Sync stream ended without a status"),
            Ok(Err(status)) => return status,
        }
    }
}

/// Agents attested and syncing on B, banned (then others evicted) through
/// A: each stream on B ends with `PermissionDenied` soon after A answered,
/// and B refuses the agent's next SignX509Svids, Sync and Renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_or_eviction_on_one_server_cuts_the_agents_stream_on_another() {
    let s = servers(&["a", "b"]).await;
    let (a, b) = (&s[0], &s[1]);
    let mut delays = Vec::new();
    for evict in [false, true] {
        for round in 0..5 {
            let agent = b.agent().await;
            let id = agent.id.to_string();
            let entry = b
                .add_entry(
                    &format!("spiffe://example.org/cut/{evict}/{round}"),
                    &id,
                    "unix:uid:1000",
                )
                .await;
            let mut client = b.client(Some(agent.certs.clone())).await;
            let mut sync = client
                .sync(pb::SyncRequest::default())
                .await
                .unwrap()
                .into_inner();
            // Served before the cut: the entry reaches the stream (B's
            // index has it) and is signed.
            while !next(&mut sync)
                .await
                .unwrap()
                .expect("Sync messages until the entry")
                .upserts
                .iter()
                .any(|e| e.id == entry)
            {}
            let signed = sign_on(&mut client, &entry).await.unwrap();
            assert!(signed.error.is_empty(), "{}", signed.error);
            // A knows the agent only from the database.
            let mut admin = a.admin().await;
            if evict {
                admin.evict_agent(request(&id)).await.unwrap();
            } else {
                admin.ban_agent(request(&id)).await.unwrap();
            }
            let answered = Instant::now();
            let end = end_of(&mut sync, answered).await;
            let delay = answered.elapsed();
            delays.push(delay);
            assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
            let said = if evict { "evicted" } else { "banned" };
            assert!(end.message().contains(said), "{end:?}");
            // B refuses what comes next, on the open connection and on a
            // new one.
            assert_refused(
                sign_on(&mut client, &entry).await,
                evict,
                "SignX509Svids on B",
            );
            let mut fresh = b.client(Some(agent.certs.clone())).await;
            assert_refused(
                fresh.sync(pb::SyncRequest::default()).await,
                evict,
                "Sync on B",
            );
            let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
            assert_refused(
                renew_with(&mut fresh, &agent, &key).await.map(|_| ()),
                evict,
                "Renew on B",
            );
        }
    }
    delays.sort();
    println!(
        "ban/evict on A to stream end on B, {} rounds: min {:?}, median {:?}, max {:?}",
        delays.len(),
        delays[0],
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
}

/// One join token per round, three agents attesting with it at once, each
/// against another server: exactly one gets an identity, the other two the
/// documented refusal, and every server knows the one winner only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_token_raced_against_three_servers_attests_one_agent() {
    const ROUNDS: usize = 10;
    let s = servers(&["a", "b", "c"]).await;
    let mut wins = [0usize; 3];
    for round in 0..ROUNDS {
        let token = s[round % 3].token("").await;
        // Connected before the race, so the attestations start together.
        let mut clients = Vec::new();
        for server in &s {
            clients.push(server.client(None).await);
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
        let racers: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let (barrier, token) = (barrier.clone(), token.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    support::attest_token_with(client, &token, |csr| csr).await
                })
            })
            .collect();
        let mut winner = None;
        for (i, racer) in racers.into_iter().enumerate() {
            match racer.await.unwrap() {
                Ok(agent) => {
                    assert!(winner.is_none(), "round {round}: two agents attested");
                    winner = Some(agent.id.to_string());
                    wins[i] += 1;
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::PermissionDenied, "round {round}: {e:?}");
                    assert!(
                        e.message()
                            .contains("join token is unknown or was already used"),
                        "round {round}: {e:?}"
                    );
                }
            }
        }
        let winner = winner.unwrap_or_else(|| panic!("round {round}: no agent attested"));
        for server in &s {
            let agents = server
                .admin()
                .await
                .list_agents(admin_pb::ListAgentsRequest {})
                .await
                .unwrap()
                .into_inner()
                .agents;
            assert_eq!(agents.len(), round + 1, "round {round}");
            assert!(agents.iter().any(|a| a.spiffe_id == winner));
        }
    }
    println!("one token, three servers, {ROUNDS} rounds: wins by server {wins:?}");
}

/// What the renewing agent saw around the ban.
#[derive(Default)]
struct Renewals {
    /// Renewals answered before the ban had answered.
    before: usize,
    /// Renewals served although they were sent after the ban answered.
    wrong: Vec<String>,
    /// The SVID the agent holds at the end.
    last: Option<Agent>,
}

/// Renews on `b` again and again, each time over a new
/// connection with the SVID the last renewal gave (so each round is a
/// first use and a renewal: two swaps of the record), reporting each
/// success on `progress`, until three renewals sent after `answered` have
/// been refused (or ten served).
async fn renew_until_refused(
    b: &Server,
    mut agent: Agent,
    answered: Arc<AtomicBool>,
    progress: tokio::sync::watch::Sender<usize>,
) -> Renewals {
    let mut seen = Renewals::default();
    let mut refused_after = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Ten served after the answer are enough to report (a ban undone
    // serves every later renewal).
    while refused_after < 3 && seen.wrong.len() < 10 {
        assert!(Instant::now() < deadline, "renewals never stopped");
        let mut client: AgentApiClient<Channel> = b.client(Some(agent.certs.clone())).await;
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let after = answered.load(Ordering::SeqCst);
        match renew_with(&mut client, &agent, &key).await {
            Ok(renewed) => {
                if after {
                    let n = seen.before + seen.wrong.len() + 1;
                    seen.wrong.push(format!("renewal {n} was served"));
                } else {
                    seen.before += 1;
                    progress.send_modify(|n| *n += 1);
                }
                agent = renewed;
            }
            Err(e) if after => {
                assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
                assert!(e.message().contains("banned"), "{e:?}");
                refused_after += 1;
            }
            // The ban landed and its answer is on its way.
            Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{e:?}"),
        }
    }
    seen.last = Some(agent);
    seen
}

/// An agent renewing in a loop on B while A bans it, several rounds (the
/// ban lands after a different number of renewals each time): no renewal
/// sent after the ban answered is served, on B or on A, and the record
/// both servers read back is banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_on_one_server_never_undo_a_ban_on_another() {
    const ROUNDS: usize = 8;
    let s = servers(&["a", "b"]).await;
    let (a, b) = (&s[0], &s[1]);
    let mut before = Vec::new();
    for round in 0..ROUNDS {
        let agent = b.agent().await;
        let id = agent.id.to_string();
        let answered = Arc::new(AtomicBool::new(false));
        let (progress, mut renewed) = tokio::sync::watch::channel(0usize);
        let renewing = renew_until_refused(b, agent, answered.clone(), progress);
        let banning = async {
            renewed.wait_for(|n| *n > round % 4).await.unwrap();
            a.admin().await.ban_agent(request(&id)).await.unwrap();
            answered.store(true, Ordering::SeqCst);
        };
        let (seen, ()) = tokio::join!(renewing, banning);
        assert!(
            seen.wrong.is_empty(),
            "round {round}: renewals served after the ban answered: {:?}",
            seen.wrong
        );
        before.push(seen.before);
        // Refused on A too, with the SVID the agent holds last.
        let last = seen.last.unwrap();
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut on_a = a.client(Some(last.certs.clone())).await;
        assert_refused(
            renew_with(&mut on_a, &last, &key).await.map(|_| ()),
            false,
            "Renew on A",
        );
        for (name, server) in [("A", a), ("B", b)] {
            let record = server
                .admin()
                .await
                .get_agent(request(&id))
                .await
                .unwrap()
                .into_inner();
            assert!(record.banned, "round {round}: {name} reads {record:?}");
        }
    }
    println!("renewals on B before A's ban answered, by round: {before:?}");
}
