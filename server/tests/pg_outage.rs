//! PostgreSQL stopped and started again under a running server and load
//! (issue 15, "Tests" and item 6), on a cluster of this test's own
//! (`support/private_pg.rs`): while it is down, writes are refused with
//! a message naming PostgreSQL (`Unavailable` where the call has a status
//! of its own, a token), `healthcheck` says why,
//! and the agent keeps its open Sync stream and still gets SVIDs signed;
//! once it is back, writes succeed, a new entry reaches the stream opened
//! before the outage, and no acknowledged write is lost, all without a
//! restart of the server.

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

use oxid_pki::x509::Csr;
use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::admin as admin_pb;
use oxid_proto::agent as pb;
use support::cli_process::Server;
use tokio::sync::watch;

/// Where the database is when a call starts.
const UP: u8 = 0;
const STOPPING: u8 = 1;
const DOWN: u8 = 2;
const STARTING: u8 = 3;
const BACK: u8 = 4;
/// A call that started in one phase and ended in another.
const SPANNED: u8 = 5;
/// A failed call, in the list of successes [`load`] publishes.
const FAILED: u8 = u8::MAX;

/// One call of the load: the phase it ran in, and its outcome.
type Outcome = (u8, Result<String, String>);

/// Runs `call` in a loop until `stop`, recording each outcome; a
/// channel that counts them, so the test waits on outcomes, not time.
fn load<F, Fut>(
    phase: Arc<AtomicU8>,
    mut stop: watch::Receiver<bool>,
    mut call: F,
) -> (
    tokio::task::JoinHandle<Vec<Outcome>>,
    watch::Receiver<Vec<u8>>,
)
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
{
    // The phases of the successful calls so far, for waiting.
    let (tx, rx) = watch::channel(Vec::new());
    let task = tokio::spawn(async move {
        let mut outcomes = Vec::new();
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
            tx.send_modify(|ok| ok.push(if result.is_ok() { at } else { FAILED }));
            outcomes.push((at, result));
            // A refused call returns at once: pace the retries a little.
            if outcomes.last().is_some_and(|(_, r)| r.is_err()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        outcomes
    });
    (task, rx)
}

/// Waits until `outcomes` holds `n` successes of calls started in `phase`.
async fn successes(outcomes: &mut watch::Receiver<Vec<u8>>, phase: u8, n: usize, what: &str) {
    let reached = tokio::time::timeout(
        Duration::from_secs(60),
        outcomes.wait_for(|o| o.iter().filter(|p| **p == phase).count() >= n),
    )
    .await;
    assert!(
        reached.is_ok(),
        "never {n} successful {what} in phase {phase}"
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
    let cluster = Arc::new(blocking(private_pg::PrivateCluster::start).await);
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
    successes(&mut written, UP, 20, "writes").await;
    successes(&mut signed, UP, 5, "signatures").await;
    view.wait_for(|v| v.len() > 20).await.unwrap();

    // Down.
    phase.store(STOPPING, Ordering::SeqCst);
    blocking({
        let cluster = cluster.clone();
        move || cluster.stop()
    })
    .await;
    phase.store(DOWN, Ordering::SeqCst);
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
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        written.wait_for(|o| o.iter().filter(|p| **p == FAILED).count() >= 5),
    )
    .await
    .is_ok();
    assert!(refused, "writes were not refused while PostgreSQL was down");
    successes(&mut signed, DOWN, 5, "signatures").await;
    assert!(
        view.has_changed().is_ok(),
        "the Sync stream ended in the outage"
    );

    // Back, with no restart of the server.
    phase.store(STARTING, Ordering::SeqCst);
    blocking({
        let cluster = cluster.clone();
        move || cluster.start_again()
    })
    .await;
    phase.store(BACK, Ordering::SeqCst);
    successes(&mut written, BACK, 5, "writes").await;
    eventually("healthcheck passes again", {
        let s = s.clone();
        move || s.cli(&["healthcheck"]).status.success()
    })
    .await;
    let after = create(admin.clone(), &parent, "after").await.unwrap();
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
    let (writes, signs) = (writes.await.unwrap(), signs.await.unwrap());
    for (at, result) in &writes {
        match (*at, result) {
            (UP, r) => assert!(r.is_ok(), "a write before the outage failed: {r:?}"),
            (DOWN, Ok(id)) => panic!("a write while PostgreSQL was down succeeded: {id}"),
            (DOWN, Err(why)) => assert!(
                why.contains("datastore unavailable: ") && why.contains("PostgreSQL"),
                "the refusal does not say why: {why}"
            ),
            _ => {}
        }
    }
    for (at, result) in &signs {
        if matches!(*at, UP | DOWN) {
            assert!(result.is_ok(), "signing failed in phase {at}: {result:?}");
        }
    }

    // Every acknowledged write is in the table.
    let table: std::collections::BTreeSet<String> = cluster
        .raw(&db)
        .await
        .query("SELECT id FROM oxid_entries", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked: Vec<&String> = writes.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    assert!(acked.len() > 25, "{} writes acknowledged", acked.len());
    for id in acked.into_iter().chain([&first, &after]) {
        assert!(
            table.contains(id),
            "acknowledged entry {id} is not in the table"
        );
    }
    let mut s = Arc::into_inner(s).unwrap();
    let child = s.child.as_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
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
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut svids = api
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id,
                csr: Csr::create(&key).unwrap(),
            }],
        })
        .await
        .map_err(|s| format!("{s:?}"))?
        .into_inner()
        .svids;
    let svid = svids.remove(0);
    if svid.error.is_empty() {
        Ok(format!("{} certificates", svid.cert_chain.len()))
    } else {
        Err(svid.error)
    }
}
