//! Workload API latency: real Unix-socket connections from this process to
//! a real `oxid-agent`, each call attested (SO_PEERCRED, /proc) as it
//! would be for any workload. Requests are issued at a fixed rate whatever
//! the answers do, so the figures are service times under that load rather
//! than a closed loop that slows itself down when the agent does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use oxid_proto::workload as pb;

use crate::BenchResult;
use crate::cluster::{
    Cluster, WorkloadClient, agent_restarts, entry, first_x509, own_uid_selector, pin, proc_stat,
    wait_first_x509, with_header, workload_client,
};
use crate::stats::{Dist, cores, median, spread};

/// The offered rate of the goal (p99 ≤ 1 ms at 100 connections).
const RATE: f64 = 2000.0;
/// Length of each paced run.
const TIME: Duration = Duration::from_secs(3);
/// Concurrent connections, each a separate HTTP/2 connection on the socket.
const CONNECTIONS: [usize; 3] = [1, 100, 1000];
/// Connections of the closed-loop maximum-rate run.
const MAX_RATE_CONNECTIONS: usize = 100;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Call {
    /// FetchJWTSVID for an audience already cached by the agent.
    Jwt,
    /// A new FetchX509SVID stream, until its first message.
    X509,
}

impl Call {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Jwt => "FetchJWTSVID (cached)",
            Self::X509 => "FetchX509SVID first message",
        }
    }

    pub(crate) async fn once(self, mut client: WorkloadClient) -> BenchResult<()> {
        match self {
            Self::Jwt => {
                let resp = client
                    .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                        audience: vec!["bench".into()],
                        spiffe_id: String::new(),
                    }))
                    .await?;
                if resp.get_ref().svids.is_empty() {
                    return Err("no JWT-SVID".into());
                }
            }
            Self::X509 => {
                if first_x509(&mut client).await?.is_empty() {
                    return Err("no X509-SVID".into());
                }
            }
        }
        Ok(())
    }
}

pub(crate) async fn run(rounds: usize) -> BenchResult<()> {
    eprintln!("workload: server, agent, one entry for this process's uid");
    let mut c = Cluster::start("", "").await?;
    let (mut agent, agent_id) = c.start_agent(&[]).await?;
    c.create_entries(vec![entry(
        "spiffe://example.org/bench/workload".into(),
        &agent_id,
        own_uid_selector(),
    )])
    .await?;
    // Once the agent has synced and signed, the JWT cache is warmed for
    // the audience every call asks for.
    wait_first_x509(&agent.socket).await?;
    Call::Jwt
        .once(workload_client(&agent.socket).await?)
        .await?;
    let agent_pid = agent.proc.pid().ok_or("the agent is not running")?;
    // The agent gets a core of its own and the load generator the other,
    // so the latencies are the agent's service time, not the two queueing
    // behind each other on shared cores.
    let pinned = cores() >= 2;
    if pinned {
        pin(agent_pid, 1)?;
        pin(std::process::id(), 0)?;
    }

    println!("\n## Workload API latency at {RATE:.0} requests/s\n");
    println!(
        "Requests are issued at a fixed rate ({RATE:.0}/s, in 1 ms ticks) for {TIME:?}, spread \
         over the connections in turn, each on its own task; latency runs from the call's start \
         to its answer (for FetchX509SVID, the stream's first message). {} Each cell: median \
         of {rounds} rounds (range).\n",
        if pinned {
            "The agent's threads are pinned to CPU 1 and the load generator's to CPU 0."
        } else {
            "Client and agent share the machine's one core."
        }
    );
    println!(
        "| connections | call | p50 (ms) | p99 (ms) | p99.9 (ms) | errors | agent CPU (% of one core) |\n\
         |---:|---|---:|---:|---:|---:|---:|"
    );
    for conns in CONNECTIONS {
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(workload_client(&agent.socket).await?);
        }
        let clients = Arc::new(clients);
        for call in [Call::Jwt, Call::X509] {
            let (mut p50, mut p99, mut p999, mut cpu) = (vec![], vec![], vec![], vec![]);
            let mut errors = 0;
            for _ in 0..rounds {
                let before = proc_stat(agent_pid)?;
                let (dist, errs) = paced(&clients, call, RATE, TIME).await;
                let used = proc_stat(agent_pid)?.cpu - before.cpu;
                p50.push(dist.q(0.5).as_secs_f64() * 1e3);
                p99.push(dist.q(0.99).as_secs_f64() * 1e3);
                p999.push(dist.q(0.999).as_secs_f64() * 1e3);
                cpu.push(used.as_secs_f64() / TIME.as_secs_f64() * 100.0);
                errors += errs;
            }
            println!(
                "| {conns} | {} | {} | {} | {} | {errors} | {:.0} |",
                call.name(),
                spread(&p50, 3),
                spread(&p99, 3),
                spread(&p999, 3),
                median(&cpu),
            );
        }
    }

    max_rate(&agent.socket, rounds).await?;
    restart(&c, &mut agent, rounds).await
}

/// Issues `rate` × `time` calls of `call` at that fixed rate; their
/// latencies and the number that failed.
pub(crate) async fn paced(
    clients: &Arc<Vec<WorkloadClient>>,
    call: Call,
    rate: f64,
    time: Duration,
) -> (Dist, usize) {
    let total = (rate * time.as_secs_f64()) as usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut issued = 0;
    while issued < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
        while issued < due {
            let client = clients[issued % clients.len()].clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = call.once(client).await.is_ok();
                let _ = tx.send((t.elapsed(), ok));
            });
            issued += 1;
        }
    }
    drop(tx);
    let (mut lats, mut errors) = (Vec::with_capacity(total), 0);
    while let Some((lat, ok)) = rx.recv().await {
        if ok {
            lats.push(lat);
        } else {
            errors += 1;
        }
    }
    (Dist::new(lats), errors)
}

/// The maximum rate: every connection calls again as soon as it has its
/// answer.
async fn max_rate(socket: &std::path::Path, rounds: usize) -> BenchResult<()> {
    println!(
        "\nMaximum rate, closed loop on {MAX_RATE_CONNECTIONS} connections for {TIME:?} \
         (median of {rounds} rounds, range):\n"
    );
    println!("| call | requests/s | errors |\n|---|---:|---:|");
    let mut clients = Vec::new();
    for _ in 0..MAX_RATE_CONNECTIONS {
        clients.push(workload_client(socket).await?);
    }
    for call in [Call::Jwt, Call::X509] {
        let (mut rates, mut errors) = (vec![], 0);
        for _ in 0..rounds {
            let (rate, failed) = closed_loop(&clients, call, TIME).await?;
            rates.push(rate);
            errors += failed;
        }
        println!("| {} | {} | {errors} |", call.name(), spread(&rates, 0));
    }
    Ok(())
}

/// Every client calls `call` again as soon as it has its answer, for
/// `time`; the rate of successful calls and the number that failed.
pub(crate) async fn closed_loop(
    clients: &[WorkloadClient],
    call: Call,
    time: Duration,
) -> BenchResult<(f64, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, stop) = (client.clone(), stop.clone());
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                match call.once(client.clone()).await {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let start = Instant::now();
    tokio::time::sleep(time).await;
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut errors) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (ok, failed) = r?;
        done += ok;
        errors += failed;
    }
    Ok((done as f64 / start.elapsed().as_secs_f64(), errors))
}

/// Agent restart (SIGTERM, start with its saved identity) to the first
/// X509-SVID served to a workload.
async fn restart(c: &Cluster, agent: &mut oxid_e2e::Agent, rounds: usize) -> BenchResult<()> {
    let times = agent_restarts(&c.server, agent, rounds).await?;
    println!(
        "\nAgent restart (process start, saved identity, one entry) to the first X509-SVID \
         served: {} ms (median of {rounds}, range).",
        spread(&times, 0),
    );
    Ok(())
}
