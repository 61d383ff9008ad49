//! X509-SVID and JWT-SVID issuance through the real server: agent API over
//! mutual TLS, entry authorisation, batch CSR signing. The bound is ring on
//! all of this machine's cores, measured just before each round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_pki::x509::Csr;
use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::agent as pb;

use crate::BenchResult;
use crate::cluster::{Cluster, SimAgent, entry, proc_stat, sync_snapshot};
use crate::raw;
use crate::stats::{Dist, cores, ms, spread};

/// Entries (and distinct CSRs) the simulated agent signs for, in turn.
const ENTRIES: usize = 1000;
/// CSRs per SignX509Svids call: what the agent sends at most at once.
const BATCH: usize = 100;
/// Batches per round.
const BATCHES: usize = 200;
/// Calls in flight: enough to keep every server core busy.
const IN_FLIGHT: usize = 8;
/// JWT-SVID mints in flight.
const JWT_IN_FLIGHT: usize = 32;
/// Duration of each JWT round and of each raw-bound measurement.
const TIME: Duration = Duration::from_secs(2);

pub(crate) async fn run(rounds: usize) -> BenchResult<()> {
    eprintln!("issuance: server, one simulated agent, {ENTRIES} entries");
    // One simulated agent stands for a fleet here, so its per-agent request
    // limit is lifted: this measures signing, not the limiter.
    let mut c = Cluster::start("agent_requests_per_second = 1000000\n", "").await?;
    let agent = c.sim_agent().await?;
    let entries = (0..ENTRIES)
        .map(|i| {
            entry(
                format!("spiffe://example.org/bench/svid/{i}"),
                &agent.id,
                format!("unix:uid:{}", 100_000 + i),
            )
        })
        .collect();
    let ids = Arc::new(c.create_entries(entries).await?);
    drop(sync_snapshot(&agent.client, ENTRIES).await?);
    let csrs = Arc::new(
        (0..ENTRIES)
            .map(|_| Ok(Csr::create(&KeyPair::generate(KeyAlgorithm::EcdsaP256)?)?))
            .collect::<BenchResult<Vec<_>>>()?,
    );
    let pid = c.server_pid()?;
    let threads = cores();

    let (mut bound, mut rate, mut ratio, mut cpu_ratio) = (vec![], vec![], vec![], vec![]);
    let mut latencies = Vec::new();
    let mut table = String::new();
    for round in 1..=rounds {
        let raw =
            tokio::task::spawn_blocking(move || raw::x509_svids_per_sec(threads, TIME)).await?;
        let before = cpu_sample(pid)?;
        let start = Instant::now();
        let mut lats = sign_batches(&agent, &ids, &csrs).await?;
        let r = Round::new(
            raw,
            threads,
            BATCH * BATCHES,
            start.elapsed(),
            before,
            cpu_sample(pid)?,
        );
        table += &r.row(round);
        bound.push(raw);
        rate.push(r.through);
        ratio.push(r.ratio());
        cpu_ratio.push(r.cpu_ratio());
        latencies.append(&mut lats);
    }
    let lat = Dist::new(latencies);
    println!("\n## X509-SVID issuance through the server\n");
    println!(
        "One simulated agent (the agent's own client, TLS 1.3, its SVID) sends SignX509Svids \
         batches of {BATCH} CSRs for {ENTRIES} authorised entries, {IN_FLIGHT} calls in flight, \
         {BATCHES} batches per round. The bound is ring P-256 (1 verify + 1 sign of a 450-byte \
         message) on {threads} threads, measured before each round. Server CPU comes from \
         /proc/<pid>/stat.\n"
    );
    println!(
        "| round | bound (SVID/s) | through the server (SVID/s) | ratio | server CPU per SVID (µs) | \
         bound CPU per SVID (µs) | CPU ratio | load generator CPU per SVID (µs) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    print!("{table}");
    println!(
        "\nMedian (range): bound {} SVID/s, through the server {} SVID/s, **ratio {}** \
         (goal ≥ 0.7), CPU ratio {}. Batch latency over {} batches: p50 {} ms, p99 {} ms.",
        spread(&bound, 0),
        spread(&rate, 0),
        spread(&ratio, 2),
        spread(&cpu_ratio, 2),
        lat.len(),
        ms(lat.q(0.5)),
        ms(lat.q(0.99)),
    );

    jwt(&agent, &ids, rounds, pid).await
}

/// Signs BATCHES batches, IN_FLIGHT at a time; each batch's latency.
async fn sign_batches(
    agent: &SimAgent,
    ids: &Arc<Vec<String>>,
    csrs: &Arc<Vec<Vec<u8>>>,
) -> BenchResult<Vec<Duration>> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..IN_FLIGHT {
        let (api, ids, csrs) = (agent.client.api(), ids.clone(), csrs.clone());
        tasks.spawn(async move {
            let mut api = api.max_decoding_message_size(64 << 20);
            let mut lats = Vec::new();
            for b in (worker..BATCHES).step_by(IN_FLIGHT) {
                let requests = (0..BATCH)
                    .map(|i| {
                        let n = (b * BATCH + i) % ENTRIES;
                        pb::SvidRequest {
                            entry_id: ids[n].clone(),
                            csr: csrs[n].clone(),
                        }
                    })
                    .collect();
                let t = Instant::now();
                let resp = api
                    .sign_x509_svids(pb::SignX509SvidsRequest { requests })
                    .await?
                    .into_inner();
                lats.push(t.elapsed());
                if let Some(bad) = resp.svids.iter().find(|s| !s.error.is_empty()) {
                    return Err(format!("SVID refused: {}", bad.error).into());
                }
                if resp.svids.len() != BATCH {
                    return Err("a batch came back short".into());
                }
            }
            BenchResult::Ok(lats)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.append(&mut r??);
    }
    Ok(all)
}

/// JWT-SVID minting (MintJwtSvid, one per call) against raw ES256.
async fn jwt(agent: &SimAgent, ids: &Arc<Vec<String>>, rounds: usize, pid: u32) -> BenchResult<()> {
    let threads = cores();
    let (mut ratio, mut cpu_ratio) = (vec![], vec![]);
    let mut latencies = Vec::new();
    let mut table = String::new();
    for round in 1..=rounds {
        let raw = tokio::task::spawn_blocking(move || raw::es256_per_sec(threads, TIME)).await?;
        let before = cpu_sample(pid)?;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..JWT_IN_FLIGHT {
            let (mut api, ids) = (agent.client.api(), ids.clone());
            tasks.spawn(async move {
                let mut lats = Vec::new();
                let mut n = worker;
                while start.elapsed() < TIME {
                    let t = Instant::now();
                    api.mint_jwt_svid(pb::MintJwtSvidRequest {
                        entry_id: ids[n % ids.len()].clone(),
                        audience: vec!["bench".into()],
                    })
                    .await?;
                    lats.push(t.elapsed());
                    n += JWT_IN_FLIGHT;
                }
                BenchResult::Ok(lats)
            });
        }
        let mut minted = 0;
        while let Some(r) = tasks.join_next().await {
            let mut lats = r??;
            minted += lats.len();
            latencies.append(&mut lats);
        }
        let r = Round::new(
            raw,
            threads,
            minted,
            start.elapsed(),
            before,
            cpu_sample(pid)?,
        );
        table += &r.row(round);
        ratio.push(r.ratio());
        cpu_ratio.push(r.cpu_ratio());
    }
    let lat = Dist::new(latencies);
    println!("\n## JWT-SVID minting through the server\n");
    println!(
        "The same agent calls MintJwtSvid ({JWT_IN_FLIGHT} calls in flight, one token per call, \
         {TIME:?} per round). The bound is ring ES256 signing on {threads} threads.\n"
    );
    println!(
        "| round | bound (sign/s) | through the server (JWT/s) | ratio | server CPU per JWT (µs) | \
         bound CPU per JWT (µs) | CPU ratio | load generator CPU per JWT (µs) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    print!("{table}");
    println!(
        "\nMedian (range): **ratio {}**, CPU ratio {}. Call latency over {} calls: p50 {} ms, \
         p99 {} ms.",
        spread(&ratio, 2),
        spread(&cpu_ratio, 2),
        lat.len(),
        ms(lat.q(0.5)),
        ms(lat.q(0.99)),
    );
    Ok(())
}

/// CPU used so far by the server (`pid`) and by this load generator,
/// sampled together.
fn cpu_sample(pid: u32) -> BenchResult<(Duration, Duration)> {
    Ok((proc_stat(pid)?.cpu, proc_stat(std::process::id())?.cpu))
}

/// One round's throughput and CPU, against its bound.
struct Round {
    bound: f64,
    through: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
    bound_cpu_us: f64,
}

impl Round {
    /// `ops` done in `wall`, with CPU samples taken before and after, against
    /// a bound of `bound` operations a second on `threads` threads.
    fn new(
        bound: f64,
        threads: usize,
        ops: usize,
        wall: Duration,
        before: (Duration, Duration),
        after: (Duration, Duration),
    ) -> Self {
        let per_op_us = |d: Duration| d.as_secs_f64() * 1e6 / ops as f64;
        Self {
            bound,
            through: ops as f64 / wall.as_secs_f64(),
            server_cpu_us: per_op_us(after.0 - before.0),
            client_cpu_us: per_op_us(after.1 - before.1),
            bound_cpu_us: threads as f64 * 1e6 / bound,
        }
    }

    fn ratio(&self) -> f64 {
        self.through / self.bound
    }

    fn cpu_ratio(&self) -> f64 {
        self.bound_cpu_us / self.server_cpu_us
    }

    /// The table row: round, bound, throughput, ratio, server CPU, bound
    /// CPU, CPU ratio, load generator CPU.
    fn row(&self, round: usize) -> String {
        format!(
            "| {round} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            self.bound,
            self.through,
            self.ratio(),
            self.server_cpu_us,
            self.bound_cpu_us,
            self.cpu_ratio(),
            self.client_cpu_us,
        )
    }
}
