//! PostgreSQL stopped and started again under a running server and load
//! (issue 15, "Tests" and item 6), on a cluster of this test's own
//! (`support/private_pg.rs`). While it is down: entry writes are refused
//! with a message naming PostgreSQL (`Unavailable` where the call has a
//! status of its own: a token, an attestation, whose token is kept for
//! later), `healthcheck` says why, the agent keeps its open Sync stream,
//! and SVID signing either goes on or is refused `Unavailable` for the
//! database (see `check_outcomes`). Once it is back, with no restart of the
//! server: writes and signing succeed, a new entry reaches the stream
//! opened before, the refused token attests, and no acknowledged write is
//! lost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
#[path = "support/private_pg.rs"]
mod private_pg;
mod support;
#[path = "support/sync_view.rs"]
mod sync_view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use oxid_proto::admin as admin_pb;
use private_pg::PrivateCluster;
use support::cli_process::Server;
use tokio::sync::watch;

/// Where the database is while a call runs.
const UP: u8 = 0;
const DOWN: u8 = 1;
const BACK: u8 = 2;
/// While pg_ctl stops or starts it.
const MOVING: u8 = 3;
/// A call that started in one phase and ended in another.
const SPANNED: u8 = 4;

/// One call of the load: the phase it ran in, and its outcome.
type Outcome = (u8, Result<String, String>);

/// Runs `call` in a loop until `stop`; every outcome so far, on a channel
/// the test waits on (outcomes, not time).
fn load<F, Fut>(
    phase: Arc<AtomicU8>,
    mut stop: watch::Receiver<bool>,
    mut call: F,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Vec<Outcome>>)
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
{
    let (tx, rx) = watch::channel(Vec::new());
    let task = tokio::spawn(async move {
        let mut n = 0;
        while !*stop.borrow_and_update() {
            let started = phase.load(Ordering::SeqCst);
            let result = call(n).await;
            n += 1;
            // A call that spans a change of phase counts for neither.
            let at = if phase.load(Ordering::SeqCst) == started {
                started
            } else {
                SPANNED
            };
            let failed = result.is_err();
            tx.send_modify(|all| all.push((at, result)));
            // A refused call returns at once: pace the retries a little.
            if failed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    (task, rx)
}

/// Waits until `outcomes` holds `n` calls of `phase` that `ok` or failed.
async fn until_n(
    outcomes: &mut watch::Receiver<Vec<Outcome>>,
    phase: u8,
    ok: bool,
    n: usize,
    what: &str,
) {
    let count = |all: &Vec<Outcome>| {
        all.iter()
            .filter(|(at, r)| *at == phase && r.is_ok() == ok)
            .count()
    };
    let reached = tokio::time::timeout(
        Duration::from_secs(60),
        outcomes.wait_for(|all| count(all) >= n),
    )
    .await
    .is_ok();
    let all = outcomes.borrow();
    assert!(
        reached,
        "never {n} {what} in phase {phase} ({} so far); the last calls: {:?}",
        count(&all),
        &all[all.len().saturating_sub(3)..]
    );
}

/// Polls `check` (blocking: it runs the CLI) until it holds, for at most
/// 60 s.
async fn eventually(what: &str, check: impl Fn() -> bool + Send + Sync + 'static) {
    let check = Arc::new(check);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = check.clone();
        if tokio::task::spawn_blocking(move || c()).await.unwrap() {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `f` on a blocking thread: the CLI, pg_ctl.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_and_started_under_load_refuses_writes_clearly_then_recovers() {
    let cluster = Arc::new(blocking(PrivateCluster::start).await);
    let db = cluster.create_database("oxid_outage").await;
    let url = cluster.url(&db);
    let s = Arc::new(
        blocking(move || {
            Server::start_with_config(
                "[datastore]\nstatement_timeout = \"2s\"\n",
                &["--datastore-url", &url],
            )
        })
        .await,
    );
    let addr: SocketAddr = s.ready_field("agent_api").parse().unwrap();
    let bundle = s.spiffe_bundle();
    let token = s.json(&["token", "generate"]);
    // For a node that attests during the outage.
    let spare = s.json(&["token", "generate"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = support::agent_api_client(addr, bundle.clone(), support::SERVER_ID, None)
        .await
        .unwrap();
    let agent = support::attest_token_with(client, token["token"].as_str().unwrap(), |c| c)
        .await
        .unwrap();
    let parent = agent.id.to_string();
    let admin = s.admin().await;
    let first = create(admin.clone(), &parent, "first").await.unwrap();
    let mut view = sync_view::follow(addr, bundle.clone(), &agent).await;

    // Load for the whole test: entries created one per call, and SVIDs
    // signed for the first entry.
    let phase = Arc::new(AtomicU8::new(UP));
    let (stop_tx, stop) = watch::channel(false);
    let (writes, mut written) = load(phase.clone(), stop.clone(), {
        let (admin, parent) = (admin.clone(), parent.clone());
        move |n| {
            let (admin, parent) = (admin.clone(), parent.clone());
            async move { create(admin, &parent, &format!("load/{n}")).await }
        }
    });
    let api = support::agent_api_client(
        addr,
        bundle.clone(),
        support::SERVER_ID,
        Some(agent.certs.clone()),
    )
    .await
    .unwrap();
    let (signs, mut signed) = load(phase.clone(), stop, {
        let first = first.clone();
        move |_| sign(api.clone(), first.clone())
    });
    until_n(&mut written, UP, true, 20, "writes").await;
    until_n(&mut signed, UP, true, 5, "signatures").await;

    // Down, under the load.
    move_db(&cluster, &phase, DOWN, PrivateCluster::stop).await;
    eventually("healthcheck fails", {
        let s = s.clone();
        move || !s.cli(&["healthcheck"]).status.success()
    })
    .await;
    let why = s.fails(&["healthcheck"]);
    assert!(why.contains("PostgreSQL unreachable"), "{why}");
    // A write with a status of its own: Unavailable, saying why.
    let refused = admin
        .clone()
        .create_join_token(admin_pb::CreateJoinTokenRequest {
            ttl: 600,
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("PostgreSQL"), "{refused:?}");
    // A node attesting now is refused the same way (its token's use and
    // its record are writes), and its token is not spent.
    let refused = attest(addr, &bundle, &spare).await.err().unwrap();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("PostgreSQL"), "{refused:?}");
    until_n(&mut written, DOWN, false, 5, "refused writes").await;
    let signing = |all: &Vec<Outcome>| all.iter().filter(|(at, _)| *at == DOWN).count();
    signed.wait_for(|all| signing(all) >= 5).await.unwrap();
    assert!(
        view.has_changed().is_ok(),
        "the Sync stream ended in the outage"
    );

    // Back, with no restart of the server.
    move_db(&cluster, &phase, BACK, PrivateCluster::start_again).await;
    until_n(&mut written, BACK, true, 5, "writes").await;
    until_n(&mut signed, BACK, true, 5, "signatures").await;
    eventually("healthcheck passes again", {
        let s = s.clone();
        move || s.cli(&["healthcheck"]).status.success()
    })
    .await;
    let after = create(admin.clone(), &parent, "after").await.unwrap();
    attest(addr, &bundle, &spare)
        .await
        .expect("the token refused in the outage attests once the database is back");
    // The stream opened before the outage carries it.
    let reached = tokio::time::timeout(
        Duration::from_secs(30),
        view.wait_for(|v| v.contains_key(&after)),
    )
    .await
    .is_ok();
    assert!(
        reached,
        "the entry written after the outage never reached the stream"
    );

    stop_tx.send_replace(true);
    writes.await.unwrap();
    signs.await.unwrap();
    let (writes, signs) = (written.borrow().clone(), signed.borrow().clone());
    check_outcomes(&writes, &signs);
    every_acknowledged_write_is_kept(&cluster, &db, &writes, [&first, &after]).await;
    let mut s = Arc::into_inner(s).unwrap();
    let child = s.child.as_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
}

/// Stops or starts the cluster (`how`, blocking), the phase `MOVING`
/// meanwhile and `then` after.
async fn move_db(
    cluster: &Arc<PrivateCluster>,
    phase: &AtomicU8,
    then: u8,
    how: fn(&PrivateCluster),
) {
    phase.store(MOVING, Ordering::SeqCst);
    let cluster = cluster.clone();
    blocking(move || how(&cluster)).await;
    phase.store(then, Ordering::SeqCst);
}

/// What each phase allows: writes succeed while the database is up and
/// are refused, saying why, while it is down. While it is down, SVIDs are
/// signed from the server's view in memory, or, when the store knows of a
/// commit that view has not applied (a write that committed as the
/// database went away), refused `Unavailable` for the database rather
/// than signed on a view known to be behind: a refusal must be that one.
fn check_outcomes(writes: &[Outcome], signs: &[Outcome]) {
    let refused_for_the_database =
        |why: &str| why.contains("datastore unavailable: ") && why.contains("PostgreSQL");
    for (at, result) in writes {
        match (*at, result) {
            (UP, r) => assert!(r.is_ok(), "a write before the outage failed: {r:?}"),
            (DOWN, Ok(id)) => {
                panic!("a write while PostgreSQL was down succeeded: {id}")
            }
            (DOWN, Err(why)) => assert!(
                refused_for_the_database(why),
                "the refusal does not say why: {why}"
            ),
            _ => {}
        }
    }
    for (at, result) in signs {
        match (*at, result) {
            (UP, r) => assert!(r.is_ok(), "signing failed before the outage: {r:?}"),
            (DOWN, Err(why)) => assert!(
                why.contains("Unavailable") && refused_for_the_database(why),
                "signing refused for another reason: {why}"
            ),
            _ => {}
        }
    }
}

/// Every write the load saw acknowledged, and `more`, are in the table.
async fn every_acknowledged_write_is_kept<'a>(
    cluster: &PrivateCluster,
    db: &str,
    writes: &'a [Outcome],
    more: [&'a String; 2],
) {
    let table: std::collections::BTreeSet<String> = cluster
        .raw(db)
        .await
        .query("SELECT id FROM oxid_entries", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked: Vec<&String> = writes.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    assert!(acked.len() > 25, "{} writes acknowledged", acked.len());
    for id in acked.into_iter().chain(more) {
        assert!(
            table.contains(id),
            "acknowledged entry {id} is not in the table"
        );
    }
}

/// Attests a new node with join token `token`.
async fn attest(
    addr: SocketAddr,
    bundle: &oxid_pki::bundle::Bundle,
    token: &str,
) -> Result<support::Agent, tonic::Status> {
    let client = support::agent_api_client(addr, bundle.clone(), support::SERVER_ID, None)
        .await
        .unwrap();
    support::attest_token_with(client, token, |c| c).await
}

/// Creates `spiffe://example.org/<name>` under `parent`: its entry ID, or
/// the entry's refusal.
async fn create(
    mut admin: oxid_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    parent: &str,
    name: &str,
) -> Result<String, String> {
    let request = admin_pb::CreateEntriesRequest {
        entries: vec![admin_pb::Entry {
            spiffe_id: format!("spiffe://example.org/{name}"),
            parent_id: parent.to_owned(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut results = admin
        .create_entries(request)
        .await
        .map_err(|s| format!("{s:?}"))?
        .into_inner()
        .results;
    let r = results.remove(0);
    match r.entry {
        Some(e) if r.error.is_empty() => Ok(e.id),
        _ => Err(r.error),
    }
}

/// One X509-SVID for `entry_id`, or the refusal.
async fn sign(
    mut api: oxid_proto::agent::agent_api_client::AgentApiClient<tonic::transport::Channel>,
    entry_id: String,
) -> Result<String, String> {
    let svid = support::inproc::sign_on(&mut api, &entry_id)
        .await
        .map_err(|s| format!("{s:?}"))?;
    if svid.error.is_empty() {
        Ok(format!("{} certificates", svid.cert_chain.len()))
    } else {
        Err(svid.error)
    }
}
