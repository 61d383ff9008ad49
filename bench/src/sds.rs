//! Envoy SDS at scale: 1,000 `StreamSecrets` streams on one agent. As a
//! real Envoy 1.40 opens them (`tests/envoy.rs` reads it from Envoy's
//! stats): one stream per secret, multiplexed on one HTTP/2 connection, so
//! two per connection for an Envoy with a certificate and a validation
//! context, one asking for the SVID and one for the SPIFFE-validator
//! bundle (`ALL`): 500 such Envoys. Two bounds beside it, every stream
//! asking for both names: one stream per connection, and ten per
//! connection. It reports the agent's memory per stream, a Workload API
//! stream per connection as the baseline, and, when the SVID rotates (on
//! the one-per-connection agent), the time from the Workload API's own
//! stream seeing the new SVID to every SDS stream carrying it. Another
//! agent holds 1,000 `DeltaSecrets` streams, one per connection, for their
//! memory. SPIRE's agent reached ~3.5 GB at ~450 SDS connections
//! (spiffe/spire#5348); the goal here is at most 20 KB per stream.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use oxid_proto::workload as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::BenchResult;
use crate::cluster::{
    Cluster, entry, own_uid_selector, proc_stat, uds_channel, wait_first_x509, with_header,
    workload_client,
};
use crate::stats::median;

/// Streams held open on each agent.
const STREAMS: usize = 1000;
const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const ID: &str = "spiffe://example.org/bench/sds";
/// X509-SVID TTL, s: short enough that rotations come within the run
/// (the agent renews at about half of it).
const TTL_SECS: u64 = 20;

/// A stream's update: which stream, when it arrived.
type Update = (usize, Instant);

/// Set when the figures are in: the streams' errors from then on are the
/// agents being stopped, not news.
static DONE: AtomicBool = AtomicBool::new(false);
/// The same for the agents stopped once measured (Envoy's shape, delta).
static ENVOY_DONE: AtomicBool = AtomicBool::new(false);
static DELTA_DONE: AtomicBool = AtomicBool::new(false);

/// How an agent's 1,000 streams are opened.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// `StreamSecrets` streams, this many to a connection, each asking for
    /// the SVID and `ALL`.
    Both(usize),
    /// Two `StreamSecrets` streams to a connection, one asking for the
    /// SVID and one for `ALL`: a real Envoy with one certificate and one
    /// validation context.
    Envoy,
    /// `DeltaSecrets` streams, one to a connection, subscribed to both.
    Delta,
}

impl Shape {
    /// Streams to a connection.
    fn per(self) -> usize {
        match self {
            Self::Both(per) => per,
            Self::Envoy => 2,
            Self::Delta => 1,
        }
    }
}

pub(crate) async fn run(rounds: usize) -> BenchResult<()> {
    eprintln!("sds: server and five agents; {STREAMS} streams on each");
    let mut c = Cluster::start("", "[ca]\nttl = \"6h\"\n").await?;
    let (one, mut updates, opened) = sds_agent(&mut c, "one", Shape::Both(1), &DONE).await?;
    let (_ten, _, ten_opened) = sds_agent(&mut c, "ten", Shape::Both(10), &DONE).await?;
    let (mut envoy, _, envoy_opened) =
        sds_agent(&mut c, "envoy", Shape::Envoy, &ENVOY_DONE).await?;
    // Measured: stopped, so it adds no load to the rotation rows below.
    ENVOY_DONE.store(true, Ordering::Relaxed);
    envoy.stop().await;
    let (mut delta, _, delta_opened) =
        sds_agent(&mut c, "delta", Shape::Delta, &DELTA_DONE).await?;
    DELTA_DONE.store(true, Ordering::Relaxed);
    delta.stop().await;
    let baseline = workload_baseline(&mut c).await?;

    // Rotations on the one-per-connection agent: the Workload API stream
    // of the same uid is the reference for "the SVID rotated".
    let mut rotations = reference_rotations(&one).await?;
    let (mut lasts, mut spreads) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let (last, spread) = one_rotation(&mut updates, &mut rotations).await?;
        lasts.push(last);
        spreads.push(spread);
    }

    DONE.store(true, Ordering::Relaxed);
    println!("\n## Envoy SDS: {STREAMS} streams on one agent\n");
    println!(
        "`oxid-bench sds`: on each agent {STREAMS} `StreamSecrets` streams on Unix \
         connections: two per connection, one asking for `{ID}` and one for `ALL` (as {} \
         Envoys 1.40 with a certificate and a validation context open them); or each asking \
         for both, one per connection or ten per connection. X509-SVID TTL {TTL_SECS} s, so \
         the agent renews about every {} s. Memory is the agent's RSS with the streams open \
         minus before, / {STREAMS}.\n",
        STREAMS / 2,
        TTL_SECS / 2
    );
    println!("| measure | figure | goal |\n|---|---:|---|");
    for (what, (per_stream, took)) in [
        (
            "two per connection, one for the SVID, one for `ALL` (as Envoy opens them)",
            envoy_opened,
        ),
        ("one stream per connection", opened),
        ("ten streams per connection", ten_opened),
        ("DeltaSecrets, one stream per connection", delta_opened),
    ] {
        println!(
            "| **agent memory per SDS stream**, {what} | **{:.1} KB** | ≤ 20 KB {} |",
            per_stream / 1000.0,
            if per_stream <= 20_000.0 { "✔" } else { "✘" }
        );
        if what.contains("Envoy") {
            println!(
                "| … per Envoy (its connection and two streams) | {:.1} KB | — |",
                2.0 * per_stream / 1000.0
            );
        }
        println!(
            "| … all {STREAMS} open and answered | {:.0} ms | — |",
            took.as_secs_f64() * 1e3
        );
    }
    println!(
        "| baseline: agent memory per FetchX509SVID stream, one per connection | {:.1} KB | — |",
        baseline / 1000.0
    );
    println!(
        "| rotation → all {STREAMS} SDS streams updated, counted from the Workload API stream, \
         median of {} | {:.1} ms | — |",
        lasts.len(),
        median(&lasts)
    );
    println!(
        "| … first to last SDS stream updated, median | {:.1} ms | — |",
        median(&spreads)
    );
    Ok(())
}

/// An agent with an entry for this uid and `STREAMS` SDS streams opened
/// as `shape` says (their errors unreported once `stopped` or `DONE` is
/// set): the agent, the streams' updates, and (memory per
/// stream in bytes, time to open and answer them all).
async fn sds_agent(
    c: &mut Cluster,
    name: &'static str,
    shape: Shape,
    stopped: &'static AtomicBool,
) -> BenchResult<(
    oxid_e2e::Agent,
    mpsc::UnboundedReceiver<Update>,
    (f64, Duration),
)> {
    let (agent, agent_id) = c.start_agent(&[]).await?;
    let mut e = entry(format!("{ID}/{name}"), &agent_id, own_uid_selector());
    e.x509_svid_ttl = TTL_SECS;
    c.create_entries(vec![e]).await?;
    wait_first_x509(&agent.socket).await?;
    let pid = agent.proc.pid().ok_or("the agent is not running")?;
    let before = proc_stat(pid)?.rss;
    let (tx, mut rx) = mpsc::unbounded_channel::<Update>();
    let start = Instant::now();
    let per = shape.per();
    for conn in 0..STREAMS / per {
        let (socket, tx) = (agent.socket.clone(), tx.clone());
        let resource = format!("{ID}/{name}");
        tokio::spawn(async move {
            if let Err(e) = hold(conn * per, shape, &socket, resource, tx).await
                && !DONE.load(Ordering::Relaxed)
                && !stopped.load(Ordering::Relaxed)
            {
                eprintln!("sds: {name} connection {conn}: {e}");
            }
        });
    }
    drop(tx);
    let mut answered = vec![false; STREAMS];
    let mut count = 0;
    while count < STREAMS {
        let (i, _) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .map_err(|_| format!("only {count} of {STREAMS} SDS streams answered in 60 s"))?
            .ok_or("every SDS stream ended")?;
        if !std::mem::replace(&mut answered[i], true) {
            count += 1;
        }
    }
    let took = start.elapsed();
    // Allocator caches settle before the figure is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_stream = proc_stat(pid)?.rss.saturating_sub(before) as f64 / STREAMS as f64;
    Ok((agent, rx, (per_stream, took)))
}

/// One connection's SDS streams, as `shape` says, numbered from `first`,
/// asking for `resource` (the SVID) and `ALL`; each ACKs every response
/// and reports it on `updates`.
async fn hold(
    first: usize,
    shape: Shape,
    socket: &Path,
    resource: String,
    updates: mpsc::UnboundedSender<Update>,
) -> BenchResult<()> {
    let client = SecretDiscoveryServiceClient::new(uds_channel(socket).await?);
    let mut streams = tokio::task::JoinSet::new();
    if shape == Shape::Delta {
        let (client, updates) = (client.clone(), updates.clone());
        streams.spawn(hold_delta(first, client, resource.clone(), updates));
    }
    for i in (first..first + shape.per()).filter(|_| shape != Shape::Delta) {
        // Envoy's shape: the connection's first stream for the SVID, its
        // second for the bundle.
        let names = match shape {
            Shape::Envoy if i % 2 == 0 => vec![resource.clone()],
            Shape::Envoy => vec!["ALL".to_owned()],
            _ => vec![resource.clone(), "ALL".to_owned()],
        };
        let (mut client, updates) = (client.clone(), updates.clone());
        streams.spawn(async move {
            let (tx, rx) = mpsc::channel(2);
            let request = |version: String, nonce: String| DiscoveryRequest {
                version_info: version,
                resource_names: names.clone(),
                type_url: SECRET.into(),
                response_nonce: nonce,
                ..DiscoveryRequest::default()
            };
            tx.send(request(String::new(), String::new())).await?;
            let mut stream = client
                .stream_secrets(ReceiverStream::new(rx))
                .await?
                .into_inner();
            while let Some(resp) = stream.message().await? {
                let _ = updates.send((i, Instant::now()));
                tx.send(request(resp.version_info.clone(), resp.nonce.clone()))
                    .await?;
            }
            BenchResult::Ok(())
        });
    }
    while let Some(done) = streams.join_next().await {
        done??;
    }
    Err("the SDS streams ended".into())
}

/// One `DeltaSecrets` stream, numbered `i`, subscribed to `resource` and
/// `ALL`; it ACKs every response and reports it on `updates`.
async fn hold_delta(
    i: usize,
    mut client: SecretDiscoveryServiceClient<tonic::transport::Channel>,
    resource: String,
    updates: mpsc::UnboundedSender<Update>,
) -> BenchResult<()> {
    let (tx, rx) = mpsc::channel(2);
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET.into(),
        resource_names_subscribe: vec![resource, "ALL".into()],
        ..DeltaDiscoveryRequest::default()
    })
    .await?;
    let mut stream = client
        .delta_secrets(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(resp) = stream.message().await? {
        let _ = updates.send((i, Instant::now()));
        tx.send(DeltaDiscoveryRequest {
            type_url: SECRET.into(),
            response_nonce: resp.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        })
        .await?;
    }
    Ok(())
}

/// The instants at which the Workload API stream of this uid on `agent`
/// sees a new X509-SVID.
async fn reference_rotations(
    agent: &oxid_e2e::Agent,
) -> BenchResult<mpsc::UnboundedReceiver<Instant>> {
    let mut stream = workload_client(&agent.socket)
        .await?
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = stream.message().await?.ok_or("the X509 stream ended")?;
    let svid = |m: &pb::X509svidResponse| m.svids.first().map(|s| s.x509_svid.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut current = svid(&first);
        while let Ok(Some(m)) = stream.message().await {
            if svid(&m) != current {
                current = svid(&m);
                if tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// The next rotation: (from the reference stream's new SVID to the last
/// SDS stream updated, from the first SDS stream updated to the last), ms.
/// SDS streams may be told a moment before the reference stream (the same
/// change wakes both); an update more than a second before it belongs to
/// an earlier change.
async fn one_rotation(
    updates: &mut mpsc::UnboundedReceiver<Update>,
    rotations: &mut mpsc::UnboundedReceiver<Instant>,
) -> BenchResult<(f64, f64)> {
    let rotated = tokio::time::timeout(Duration::from_secs(3 * TTL_SECS), rotations.recv())
        .await
        .map_err(|_| format!("no rotation within {} s", 3 * TTL_SECS))?
        .ok_or("the Workload API stream ended")?;
    let mut seen = vec![false; STREAMS];
    let (mut count, mut first, mut last) = (0, None::<Instant>, rotated);
    let deadline = tokio::time::Instant::from_std(rotated + Duration::from_secs(30));
    while count < STREAMS {
        let (i, at) = tokio::time::timeout_at(deadline, updates.recv())
            .await
            .map_err(|_| format!("only {count} of {STREAMS} SDS streams updated in 30 s"))?
            .ok_or("every SDS stream ended")?;
        if at + Duration::from_secs(1) < rotated {
            continue;
        }
        if !std::mem::replace(&mut seen[i], true) {
            count += 1;
            first = Some(first.map_or(at, |f| f.min(at)));
            last = last.max(at);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((
        ms(last.saturating_duration_since(rotated)),
        ms(last.saturating_duration_since(first.unwrap_or(rotated))),
    ))
}

/// Agent memory per FetchX509SVID stream, one per connection, on an agent
/// of its own: what a connection and a stream cost without SDS.
async fn workload_baseline(c: &mut Cluster) -> BenchResult<f64> {
    let (agent, agent_id) = c.start_agent(&[]).await?;
    c.create_entries(vec![entry(
        format!("{ID}/baseline"),
        &agent_id,
        own_uid_selector(),
    )])
    .await?;
    wait_first_x509(&agent.socket).await?;
    let pid = agent.proc.pid().ok_or("the agent is not running")?;
    let before = proc_stat(pid)?.rss;
    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let mut client = workload_client(&agent.socket).await?;
        let mut stream = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await?
            .into_inner();
        stream.message().await?.ok_or("the X509 stream ended")?;
        held.push((client, stream));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proc_stat(pid)?.rss;
    drop(held);
    Ok(after.saturating_sub(before) as f64 / STREAMS as f64)
}
