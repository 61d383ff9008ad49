//! Scale: one server, 100,000 entries, 1,000 simulated agents (each the
//! agent's own client on its own TLS connection, authorised for 100
//! entries). Then the server's restart with all of it on disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::BenchResult;
use crate::cluster::{Cluster, SimAgent, entry, mib, proc_stat, sync_snapshot};
use crate::stats::{Dist, ms, spread};

const AGENTS: usize = 1000;
const PER_AGENT: usize = 100;
/// Entries created one at a time while every agent is connected.
const PUSHES: usize = 200;
/// Attestations in flight.
const ATTEST_CONCURRENCY: usize = 32;
/// Server restarts timed.
const RESTARTS: usize = 3;

pub(crate) async fn run() -> BenchResult<()> {
    eprintln!("scale: {AGENTS} agents × {PER_AGENT} entries");
    let mut c = Cluster::start("", "").await?;
    let pid = c.server_pid()?;
    let empty = proc_stat(pid)?;

    eprintln!("scale: creating {AGENTS} join tokens");
    let t = Instant::now();
    let mut tokens = Vec::with_capacity(AGENTS);
    for _ in 0..AGENTS {
        tokens.push(c.token().await?);
    }
    let token_time = t.elapsed();

    let entries = tokens
        .iter()
        .enumerate()
        .flat_map(|(a, (_, agent_id))| {
            (0..PER_AGENT).map(move |i| {
                entry(
                    format!("spiffe://example.org/bench/scale/{a}/{i}"),
                    agent_id,
                    format!("unix:uid:{}", 10_000 + i),
                )
            })
        })
        .collect();
    eprintln!("scale: creating {} entries", AGENTS * PER_AGENT);
    let t = Instant::now();
    c.create_entries(entries).await?;
    let entry_time = t.elapsed();
    let loaded = proc_stat(pid)?;

    eprintln!("scale: attesting {AGENTS} agents");
    let t = Instant::now();
    let agents = match attest_all(&c, tokens).await {
        Ok(a) => a,
        Err(e) => {
            let log = c.server.proc.log();
            let odd: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("agent attested"))
                .collect();
            eprintln!("server log (without attestations):\n{}", odd.join("\n"));
            return Err(e);
        }
    };
    let attest_time = t.elapsed();

    // Every agent opens Sync at once and reads its snapshot.
    eprintln!("scale: initial sync of {AGENTS} agents");
    let before_sync = proc_stat(pid)?;
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, a) in agents.iter().enumerate() {
        let client = a.client.clone();
        set.spawn(async move {
            let stream = sync_snapshot(&client, PER_AGENT).await?;
            BenchResult::Ok((i, stream, t.elapsed()))
        });
    }
    let mut streams: Vec<Option<_>> = (0..AGENTS).map(|_| None).collect();
    let mut synced = Vec::with_capacity(AGENTS);
    while let Some(r) = set.join_next().await {
        let (i, stream, at) = r??;
        streams[i] = Some(stream);
        synced.push(at);
    }
    let sync_all = t.elapsed();
    let after_sync = proc_stat(pid)?;
    let synced = Dist::new(synced);

    eprintln!("scale: {PUSHES} pushes");
    let push = push_latency(&mut c, &agents, streams).await?;
    let connected = proc_stat(pid)?;
    drop(agents);

    println!(
        "\n## Scale: {} entries, {AGENTS} agents on one server\n",
        AGENTS * PER_AGENT
    );
    println!(
        "{AGENTS} simulated agents (the agent's own client, each on its own TLS connection) are \
         each authorised for {PER_AGENT} entries. Server memory is its VmRSS.\n"
    );
    println!("| step | figure |\n|---|---:|");
    println!(
        "| {AGENTS} join tokens, one call each | {:.2} s |",
        token_time.as_secs_f64()
    );
    println!(
        "| {} entries, CreateEntries batches of 1000 | {:.2} s ({:.0} entries/s) |",
        AGENTS * PER_AGENT,
        entry_time.as_secs_f64(),
        (AGENTS * PER_AGENT) as f64 / entry_time.as_secs_f64()
    );
    println!(
        "| {AGENTS} node attestations, {ATTEST_CONCURRENCY} in flight | {:.2} s |",
        attest_time.as_secs_f64()
    );
    println!(
        "| **all {AGENTS} agents' initial sync complete** (all open Sync at once) | **{:.2} s** \
         (p50 agent {} ms) |",
        sync_all.as_secs_f64(),
        ms(synced.q(0.5))
    );
    println!(
        "| server CPU during that sync | {:.2} s |",
        (after_sync.cpu - before_sync.cpu).as_secs_f64()
    );
    println!(
        "| sync push latency, entry created to its agent's stream, {PUSHES} entries with all \
         agents connected | p50 {} ms, p99 {} ms |",
        ms(push.q(0.5)),
        ms(push.q(0.99))
    );
    println!("| server RSS, empty | {} MiB |", mib(empty.rss));
    println!(
        "| server RSS, {} entries | {} MiB |",
        AGENTS * PER_AGENT,
        mib(loaded.rss)
    );
    println!(
        "| server RSS, {AGENTS} agents connected and synced | {} MiB (peak {} MiB) |",
        mib(connected.rss),
        mib(connected.peak_rss)
    );

    restarts(&mut c).await
}

async fn attest_all(c: &Cluster, tokens: Vec<(String, String)>) -> BenchResult<Vec<SimAgent>> {
    let permits = Arc::new(Semaphore::new(ATTEST_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for (i, (token, _)) in tokens.into_iter().enumerate() {
        let permit = permits.clone().acquire_owned().await?;
        let (address, pem) = (c.server.address.clone(), c.bundle_pem.clone());
        set.spawn(async move {
            let agent = tokio::time::timeout(
                Duration::from_secs(60),
                SimAgent::attest(&address, &pem, token),
            )
            .await
            .map_err(|_| format!("attestation {i} took over 60 s"))
            .and_then(|r| r.map_err(|e| e.to_string()));
            drop(permit);
            agent.map(|a| (i, a))
        });
    }
    let mut agents: Vec<Option<SimAgent>> = Vec::new();
    agents.resize_with(set.len(), || None);
    while let Some(r) = set.join_next().await {
        let (i, a) = r?.map_err(|e| e.to_string())?;
        agents[i] = Some(a);
    }
    Ok(agents.into_iter().flatten().collect())
}

/// Creates PUSHES entries, each for one agent in turn, and times each from
/// its acknowledgement to its arrival on that agent's open Sync stream.
async fn push_latency(
    c: &mut Cluster,
    agents: &[SimAgent],
    streams: Vec<Option<tonic::Streaming<oxid_proto::agent::SyncResponse>>>,
) -> BenchResult<Dist> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = tokio::task::JoinSet::new();
    for mut stream in streams.into_iter().flatten() {
        let tx = tx.clone();
        readers.spawn(async move {
            while let Ok(Some(page)) = stream.message().await {
                let at = Instant::now();
                for e in page.upserts {
                    let _ = tx.send((e.id, at));
                }
            }
        });
    }
    let mut lats = Vec::with_capacity(PUSHES);
    for i in 0..PUSHES {
        let a = &agents[(i * 389) % agents.len()];
        let ids = c
            .create_entries(vec![entry(
                format!("spiffe://example.org/bench/push/{i}"),
                &a.id,
                "unix:uid:1".into(),
            )])
            .await?;
        let acked = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (id, at) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| "a pushed entry did not arrive within 30 s")?
                .ok_or("every sync stream ended")?;
            if id == ids[0] {
                lats.push(at.saturating_duration_since(acked));
                break;
            }
        }
    }
    readers.abort_all();
    Ok(Dist::new(lats))
}

/// Server stop and start with everything on disk: start to ready.
async fn restarts(c: &mut Cluster) -> BenchResult<()> {
    let (mut stops, mut starts, mut rss) = (vec![], vec![], vec![]);
    for _ in 0..RESTARTS {
        let t = Instant::now();
        c.server.stop().await;
        stops.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        c.server.restart().await;
        starts.push(t.elapsed().as_secs_f64() * 1e3);
        rss.push(proc_stat(c.server_pid()?)?.rss as f64 / (1024.0 * 1024.0));
    }
    println!(
        "\nServer restart with {} entries and {AGENTS} agents on disk, median of {RESTARTS} (range): \
         stop (SIGTERM) {} ms; **start to ready** (process start to `oxid-server ready`, the \
         entry index built) **{} ms**; RSS once ready {} MiB.",
        AGENTS * PER_AGENT + PUSHES,
        spread(&stops, 0),
        spread(&starts, 0),
        spread(&rss, 1),
    );
    Ok(())
}
