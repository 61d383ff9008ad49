//! Propagation: from `CreateEntries` acknowledged to (a) the agent's view
//! of its entries, (b) the agent holding the new SVID, and (c) a
//! workload's open FetchX509SVID stream carrying it. The agent's view and
//! cache are read from its `/metrics`, polled every millisecond; the
//! stream is read as any workload reads it.

use std::time::{Duration, Instant};

use oxid_proto::admin as admin_pb;
use oxid_proto::workload as pb;

use crate::BenchResult;
use crate::cluster::{
    Cluster, agent_metrics_address, entry, metrics, own_uid_selector, wait_first_x509, with_header,
    workload_client,
};
use crate::stats::{Dist, median, ms};

/// Entries created, one at a time, per round.
const ENTRIES: usize = 200;
/// How long one entry may take before the benchmark gives up.
const LIMIT: Duration = Duration::from_secs(30);
/// The metrics read: entries synced, SVIDs held.
const GAUGES: [&str; 2] = ["oxid_agent_entries", "oxid_agent_svids_cached"];

pub(crate) async fn run(rounds: usize) -> BenchResult<()> {
    eprintln!(
        "propagation: server, agent, a workload holding an SVID, {ENTRIES} new entries per round"
    );
    let mut c = Cluster::start("", "").await?;
    let (mut agent, agent_id) = c.start_agent(&["--metrics-address", "127.0.0.1:0"]).await?;
    let address = agent_metrics_address(&mut agent).await?;
    c.create_entries(vec![entry(
        "spiffe://example.org/bench/holder".into(),
        &agent_id,
        own_uid_selector(),
    )])
    .await?;
    wait_first_x509(&agent.socket).await?;
    let mut client = workload_client(&agent.socket).await?;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    stream.message().await?.ok_or("the stream ended")?;

    let (mut view, mut cache, mut open) = (vec![], vec![], vec![]);
    let mut rows = String::new();
    for round in 1..=rounds {
        let mut ids = Vec::with_capacity(ENTRIES);
        let (mut v, mut k, mut o) = (vec![], vec![], vec![]);
        for i in 0..ENTRIES {
            let spiffe_id = format!("spiffe://example.org/bench/propagation/{round}/{i}");
            let base = metrics(&address, &GAUGES).await?;
            let created = c
                .create_entries(vec![entry(
                    spiffe_id.clone(),
                    &agent_id,
                    own_uid_selector(),
                )])
                .await?;
            let acked = Instant::now();
            ids.extend(created);
            let poll = async {
                let mut seen = [None, None];
                while seen.iter().any(Option::is_none) {
                    let now = metrics(&address, &GAUGES).await?;
                    for (slot, (now, base)) in seen.iter_mut().zip(now.iter().zip(&base)) {
                        if slot.is_none() && now > base {
                            *slot = Some(acked.elapsed());
                        }
                    }
                    if acked.elapsed() > LIMIT {
                        return Err("the agent's metrics did not move".into());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                BenchResult::Ok((seen[0].unwrap_or_default(), seen[1].unwrap_or_default()))
            };
            let delivered = async {
                loop {
                    let msg = stream.message().await?.ok_or("the stream ended")?;
                    if msg.svids.iter().any(|s| s.spiffe_id == spiffe_id) {
                        return BenchResult::Ok(acked.elapsed());
                    }
                }
            };
            let (polled, delivered) =
                tokio::time::timeout(LIMIT, async { tokio::join!(poll, delivered) })
                    .await
                    .map_err(|_| format!("{spiffe_id} did not arrive within {LIMIT:?}"))?;
            let (to_view, to_cache) = polled?;
            v.push(to_view);
            k.push(to_cache);
            o.push(delivered?);
        }
        let (v, k, o) = (Dist::new(v), Dist::new(k), Dist::new(o));
        rows += &format!(
            "| {round} | {} | {} | {} | {} | {} | {} |\n",
            ms(v.q(0.5)),
            ms(v.q(0.99)),
            ms(k.q(0.5)),
            ms(k.q(0.99)),
            ms(o.q(0.5)),
            ms(o.q(0.99)),
        );
        view.push(v.q(0.99).as_secs_f64() * 1e3);
        cache.push(k.q(0.99).as_secs_f64() * 1e3);
        open.push(o.q(0.99).as_secs_f64() * 1e3);
        // Back to one SVID on the stream for the next round.
        c.admin
            .delete_entries(admin_pb::DeleteEntriesRequest { ids })
            .await?;
        loop {
            let msg = stream.message().await?.ok_or("the stream ended")?;
            if msg.svids.len() == 1 {
                break;
            }
        }
    }
    println!("\n## Propagation: entry created to the workload's open stream\n");
    println!(
        "A workload holds an open FetchX509SVID stream (it already has one SVID). Each round \
         creates {ENTRIES} entries for it, one at a time; from each CreateEntries answer the \
         clock runs to the agent's entry count rising, its SVID count rising (both polled from \
         /metrics every 1 ms), and the stream's message carrying the new SPIFFE ID. Then the \
         round's entries are deleted. Times in ms.\n"
    );
    println!(
        "| round | to agent's view p50 | p99 | to agent's SVID cache p50 | p99 | to the open stream p50 | **p99** |\n\
         |---:|---:|---:|---:|---:|---:|---:|"
    );
    print!("{rows}");
    println!(
        "\nMedian p99 over {rounds} rounds: view {:.1} ms, cache {:.1} ms, **stream {:.1} ms** \
         (goal ≤ 250 ms; SPIRE's agent polls every 5 s: ratio {:.3} of that poll interval).",
        median(&view),
        median(&cache),
        median(&open),
        median(&open) / 5000.0,
    );
    Ok(())
}
