//! X509-SVID issuance through one server on PostgreSQL against one on
//! sled: the same load as `issuance.rs`, the two servers taking turns.

use std::sync::Arc;
use std::time::Instant;

use oxid_pki::x509::Csr;
use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::agent as agent_pb;

use super::{Pg, Store};
use crate::BenchResult;
use crate::cluster::{SimAgent, entry, proc_stat, sync_snapshot};
use crate::stats::{median, spread};

/// Entries (and distinct CSRs) signed in turn.
const ISSUE_ENTRIES: usize = 1000;
/// CSRs per SignX509Svids call, and calls in flight (as `issuance.rs`).
const ISSUE_BATCH: usize = 100;
const ISSUE_IN_FLIGHT: usize = 8;
/// Batches per round.
const ISSUE_BATCHES: usize = 200;

/// X509-SVID issuance through one server, on sled and on PostgreSQL in
/// alternate rounds (so that drift on a shared host hits both alike).
pub(super) async fn run(pg: &Pg, rounds: usize) -> BenchResult<()> {
    eprintln!("ha issuance: one server on sled, one on PostgreSQL, alternate rounds");
    let top = "agent_requests_per_second = 1000000\n";
    let csrs = Arc::new(
        (0..ISSUE_ENTRIES)
            .map(|_| Ok(Csr::create(&KeyPair::generate(KeyAlgorithm::EcdsaP256)?)?))
            .collect::<BenchResult<Vec<_>>>()?,
    );
    let mut setups = Vec::new();
    for store in [Store::Sled, Store::Postgres] {
        let mut c = store.server(pg, "issuance", top).await?;
        let agent = c.sim_agent().await?;
        let entries = (0..ISSUE_ENTRIES)
            .map(|i| {
                entry(
                    format!("spiffe://example.org/bench/ha/svid/{i}"),
                    &agent.id,
                    format!("unix:uid:{}", 100_000 + i),
                )
            })
            .collect();
        let ids = Arc::new(c.create_entries(entries).await?);
        drop(sync_snapshot(&agent.client, ISSUE_ENTRIES).await?);
        // One warm-up pass each: connections, allocator, caches.
        sign_batches(&agent, &ids, &csrs, ISSUE_BATCHES / 4).await?;
        setups.push((store, c, agent, ids));
    }
    let mut rates: [Vec<f64>; 2] = [vec![], vec![]];
    let mut cpu: [Vec<f64>; 2] = [vec![], vec![]];
    for _ in 0..rounds {
        for (slot, (_, c, agent, ids)) in setups.iter().enumerate() {
            let pid = c.server_pid()?;
            let before = proc_stat(pid)?.cpu;
            let start = Instant::now();
            sign_batches(agent, ids, &csrs, ISSUE_BATCHES).await?;
            let wall = start.elapsed();
            let svids = (ISSUE_BATCH * ISSUE_BATCHES) as f64;
            rates[slot].push(svids / wall.as_secs_f64());
            cpu[slot].push((proc_stat(pid)?.cpu - before).as_secs_f64() * 1e6 / svids);
        }
    }
    let ratios: Vec<f64> = rates[1].iter().zip(&rates[0]).map(|(p, s)| p / s).collect();
    println!("\n## HA: X509-SVID issuance on PostgreSQL against sled\n");
    println!(
        "One server each, one simulated agent sending SignX509Svids batches of {ISSUE_BATCH} \
         CSRs for {ISSUE_ENTRIES} authorised entries, {ISSUE_IN_FLIGHT} calls in flight, \
         {ISSUE_BATCHES} batches per round; the two servers take turns, {rounds} rounds each. \
         Median (range).\n"
    );
    println!("| store | SVID/s | server CPU per SVID (µs) |\n|---|---:|---:|");
    for (slot, (store, ..)) in setups.iter().enumerate() {
        println!(
            "| {} | {} | {} |",
            store.name(),
            spread(&rates[slot], 0),
            spread(&cpu[slot], 1)
        );
    }
    println!(
        "\n**PostgreSQL / sled: {}** per round pair (goal ≥ 0.9); of the medians {:.2}.",
        spread(&ratios, 2),
        median(&rates[1]) / median(&rates[0]),
    );
    Ok(())
}

/// Signs `batches` batches, ISSUE_IN_FLIGHT at a time.
async fn sign_batches(
    agent: &SimAgent,
    ids: &Arc<Vec<String>>,
    csrs: &Arc<Vec<Vec<u8>>>,
    batches: usize,
) -> BenchResult<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..ISSUE_IN_FLIGHT {
        let (api, ids, csrs) = (agent.client.api(), ids.clone(), csrs.clone());
        tasks.spawn(async move {
            let mut api = api.max_decoding_message_size(64 << 20);
            for b in (worker..batches).step_by(ISSUE_IN_FLIGHT) {
                let requests = (0..ISSUE_BATCH)
                    .map(|i| {
                        let n = (b * ISSUE_BATCH + i) % ISSUE_ENTRIES;
                        agent_pb::SvidRequest {
                            entry_id: ids[n].clone(),
                            csr: csrs[n].clone(),
                        }
                    })
                    .collect();
                let resp = api
                    .sign_x509_svids(agent_pb::SignX509SvidsRequest { requests })
                    .await?
                    .into_inner();
                if let Some(bad) = resp.svids.iter().find(|s| !s.error.is_empty()) {
                    return Err(format!("SVID refused: {}", bad.error).into());
                }
                if resp.svids.len() != ISSUE_BATCH {
                    return Err("a batch came back short".into());
                }
            }
            BenchResult::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
