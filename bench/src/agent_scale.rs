//! One agent with 10,000 entries: what each cached SVID costs in memory
//! (all in: entry, key, certificate chain, indexes, allocator), what
//! rotating them costs in CPU, and how long a restart takes to serve again.

use std::time::{Duration, Instant};

use crate::BenchResult;
use crate::cluster::{
    Cluster, agent_metrics_address, agent_restarts, entry, metric, mib, own_uid_selector,
    proc_stat, wait_first_x509, wait_metric,
};
use crate::stats::spread;

const ENTRIES: usize = 10_000;
/// The X509-SVID TTL of these entries: short, so that every SVID rotates
/// within the run (at about half of it).
const TTL_SECS: u64 = 30;
/// The default X509-SVID TTL, to scale the rotation cost to an hour.
const DEFAULT_TTL_SECS: f64 = 3600.0;
/// Agent restarts timed.
const RESTARTS: usize = 3;
/// SPIRE's figure for its agent's memory per cached SVID.
const SPIRE_BYTES_PER_SVID: f64 = 3.0 * 1024.0;

pub(crate) async fn run() -> BenchResult<()> {
    eprintln!("agent: one agent, {ENTRIES} entries");
    let mut c = Cluster::start("", "").await?;
    let presign = ENTRIES.to_string();
    let (mut agent, agent_id) = c
        .start_agent(&[
            "--metrics-address",
            "127.0.0.1:0",
            "--max-presigned-svids",
            &presign,
        ])
        .await?;
    let address = agent_metrics_address(&mut agent).await?;
    let pid = agent.proc.pid().ok_or("the agent is not running")?;
    wait_metric(
        &address,
        "oxid_agent_server_connected",
        1.0,
        Duration::from_millis(10),
        Duration::from_secs(30),
    )
    .await?;
    let empty = proc_stat(pid)?;

    let entries = (0..ENTRIES)
        .map(|i| {
            let mut e = entry(
                format!("spiffe://example.org/bench/agent/{i}"),
                &agent_id,
                format!("unix:uid:{}", 100_000 + i),
            );
            e.x509_svid_ttl = TTL_SECS;
            e
        })
        .collect();
    let t = Instant::now();
    c.create_entries(entries).await?;
    wait_metric(
        &address,
        "oxid_agent_svids_cached",
        ENTRIES as f64,
        Duration::from_millis(10),
        Duration::from_secs(120),
    )
    .await?;
    let fill = t.elapsed();
    let full = proc_stat(pid)?;
    let per_svid = full.rss.saturating_sub(empty.rss) as f64 / ENTRIES as f64;
    let fill_cpu = (full.cpu - empty.cpu).as_secs_f64();

    // Every SVID rotates once, at about half its TTL.
    let rotated = metric(&address, "oxid_agent_svid_rotations_total").await?;
    let before = proc_stat(pid)?;
    let t = Instant::now();
    if let Err(e) = wait_metric(
        &address,
        "oxid_agent_svid_rotations_total",
        rotated + ENTRIES as f64,
        Duration::from_millis(100),
        Duration::from_secs(4 * TTL_SECS),
    )
    .await
    {
        let log = agent.proc.log();
        let odd: Vec<&str> = log.lines().filter(|l| !l.contains(" INFO ")).collect();
        eprintln!("agent log (warnings and errors):\n{}", odd.join("\n"));
        return Err(e);
    }
    let window = t.elapsed();
    let after = proc_stat(pid)?;
    let rotations = metric(&address, "oxid_agent_svid_rotations_total").await? - rotated;
    let per_rotation = (after.cpu - before.cpu).as_secs_f64() / rotations;
    let per_hour = per_rotation * ENTRIES as f64 * DEFAULT_TTL_SECS / (DEFAULT_TTL_SECS / 2.0);

    println!("\n## One agent with {ENTRIES} SVIDs\n");
    println!(
        "{ENTRIES} entries for workloads of this agent (distinct `unix:uid` selectors), all \
         pre-signed (`--max-presigned-svids {ENTRIES}`), X509-SVID TTL {TTL_SECS} s so that all \
         rotate within the run. Memory is the agent's VmRSS; CPU is user + system from \
         /proc/<pid>/stat and includes everything the agent did meanwhile.\n"
    );
    println!("| figure | value |\n|---|---:|");
    println!(
        "| agent RSS, attested, no entries | {} MiB |",
        mib(empty.rss)
    );
    println!(
        "| agent RSS, {ENTRIES} SVIDs cached | {} MiB |",
        mib(full.rss)
    );
    println!(
        "| **bytes per cached SVID**, all in ((RSS − empty RSS) / {ENTRIES}) | **{per_svid:.0} B** \
         (ratio to SPIRE's ~3 KB: {:.2}; goal ≤ 1) |",
        per_svid / SPIRE_BYTES_PER_SVID
    );
    println!(
        "| entries created to all {ENTRIES} SVIDs cached | {:.2} s, agent CPU {:.2} s |",
        fill.as_secs_f64(),
        fill_cpu
    );
    println!(
        "| {rotations:.0} rotations over {:.1} s | agent CPU {:.2} s, {:.0} µs per rotation |",
        window.as_secs_f64(),
        (after.cpu - before.cpu).as_secs_f64(),
        per_rotation * 1e6
    );
    println!(
        "| **rotation CPU per hour** for {ENTRIES} SVIDs at the default 1 h TTL (2 rotations per \
         SVID per hour) | **{per_hour:.1} s** ({:.2} % of one core) |",
        per_hour / 36.0
    );

    // Restart to the first SVID served, with all of the above to redo.
    c.create_entries(vec![entry(
        "spiffe://example.org/bench/agent/restart".into(),
        &agent_id,
        own_uid_selector(),
    )])
    .await?;
    wait_first_x509(&agent.socket).await?;
    let times = agent_restarts(&c.server, &mut agent, RESTARTS).await?;
    println!(
        "| agent restart to the first X509-SVID served, {} entries, median of {RESTARTS} (range) \
         | {} ms |",
        ENTRIES + 1,
        spread(&times, 0)
    );
    Ok(())
}
