//! The steps of each row, the same for every system: only
//! [`super::sys`] knows which one it talks to.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use oxid_proto::workload as pb;

use super::sys::{Kind, Setup, Spec, SysAgent, System};
use super::{Figures, Partial, SCALE_POINTS, Sizes};
use crate::BenchResult;
use crate::cluster::{
    WorkloadClient, pin, proc_stat, wait_first_x509, with_header, workload_client,
};
use crate::stats::{Dist, cores, median};
use crate::workload::{Call, closed_loop, paced};

/// The first uid of the fill's entries: none of them is this process's.
const FILL_UID: u32 = 100_000;
/// The longest a fill may take.
const FILL_LIMIT: Duration = Duration::from_secs(600);
/// How long the propagation reader waits after the last creation.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(60);
/// Between two probes of the server-restart row: under the oxid agent's
/// default of 50 JWT mints per second per uid.
const PROBE_EVERY: Duration = Duration::from_millis(25);

type Got = BenchResult<Vec<(&'static str, f64)>>;

/// Every row for `kind`; a group that fails is recorded as not measured.
pub(crate) async fn measure(kind: Kind, setup: &Setup, s: &Sizes) -> Figures {
    let mut f = Figures::default();
    let one = [
        "jwt_1_p50",
        "jwt_1_p99",
        "jwt_100_p50",
        "jwt_100_p99",
        "x509_1_p50",
        "x509_1_p99",
        "x509_100_p50",
        "x509_100_p99",
        "wl_errors",
        "jwt_max",
        "x509_max",
        "restart_1",
        "prop_p50",
        "prop_p99",
        "srv_errors",
        "srv_dropped",
        "srv_ready",
        "srv_recovery",
    ];
    f.record(&one, one_entry(kind, setup, s).await);
    let fill = [
        "fill_small",
        "fill_small_reg",
        "fill_small_cpu",
        "fill_large_reg",
        "fill_large",
        "fill_large_cpu",
        "mem_per_svid",
        "agent_rss",
        "restart_large",
    ];
    f.record(&fill, fills(kind, setup, s).await);
    let points: Vec<&'static str> = SCALE_POINTS.iter().flat_map(|(_, k)| *k).collect();
    f.record_partial(&points, scale(kind, setup, s).await);
    f
}

/// This process's uid, the selector of its own entries.
fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Rows 3, 6 (one entry), 1 and 7, on one server and agent, in that
/// order: the latency cells first, while the workload has one SVID.
async fn one_entry(kind: Kind, setup: &Setup, s: &Sizes) -> Got {
    let mut sys = System::start(kind, setup).await?;
    let mut agent = sys.agent(1000).await?;
    sys.create_entry(&Spec {
        spiffe_id: "spiffe://example.org/bench/workload".into(),
        parent: agent.id.clone(),
        uid: own_uid(),
    })
    .await?;
    wait_first_x509(&agent.socket).await?;
    Call::Jwt
        .once(workload_client(&agent.socket).await?)
        .await?;
    let mut out = latency(&agent, s).await?;

    let mut times = Vec::new();
    for _ in 0..s.rounds {
        times.push(agent_restart(&sys, &mut agent).await?);
    }
    out.push(("restart_1", median(&times)));

    let (p50, p99) = propagation(&sys, &agent, s).await?;
    out.extend([("prop_p50", p50), ("prop_p99", p99)]);
    out.extend(server_restart(&mut sys, &agent, s).await?);
    agent.stop().await;
    sys.stop_server().await;
    Ok(out)
}

/// Row 3: fixed-rate cells at 1 and 100 connections, then the closed-loop
/// maximum on 100, with the agent and this process on a core each.
async fn latency(agent: &SysAgent, s: &Sizes) -> Got {
    let pinned = cores() >= 2;
    if pinned {
        pin(agent.pid()?, 1)?;
        pin(std::process::id(), 0)?;
    }
    let result = latency_cells(agent, s).await;
    if pinned {
        unpin(agent.pid()?)?;
        unpin(std::process::id())?;
    }
    result
}

async fn latency_cells(agent: &SysAgent, s: &Sizes) -> Got {
    let mut out = Vec::new();
    let mut errors = 0;
    for conns in [1, 100] {
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(workload_client(&agent.socket).await?);
        }
        let clients = Arc::new(clients);
        for call in [Call::Jwt, Call::X509] {
            let (mut p50, mut p99) = (vec![], vec![]);
            for _ in 0..s.rounds {
                let (dist, errs) = paced(&clients, call, s.rate, s.latency).await;
                p50.push(dist.q(0.5).as_secs_f64() * 1e3);
                p99.push(dist.q(0.99).as_secs_f64() * 1e3);
                errors += errs;
            }
            let key = match (call, conns) {
                (Call::Jwt, 1) => ["jwt_1_p50", "jwt_1_p99"],
                (Call::Jwt, _) => ["jwt_100_p50", "jwt_100_p99"],
                (Call::X509, 1) => ["x509_1_p50", "x509_1_p99"],
                (Call::X509, _) => ["x509_100_p50", "x509_100_p99"],
            };
            out.extend([(key[0], median(&p50)), (key[1], median(&p99))]);
        }
    }
    out.push(("wl_errors", errors as f64));
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(workload_client(&agent.socket).await?);
    }
    for (call, key) in [(Call::Jwt, "jwt_max"), (Call::X509, "x509_max")] {
        let mut rates = Vec::new();
        for _ in 0..s.rounds {
            rates.push(closed_loop(&clients, call, s.latency).await?.0);
        }
        out.push((key, median(&rates)));
    }
    Ok(out)
}

/// Lets every thread of `pid` run on every core again.
fn unpin(pid: u32) -> BenchResult<()> {
    let mut set = rustix::thread::CpuSet::new();
    for cpu in 0..cores() {
        set.set(cpu);
    }
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        let tid = rustix::process::Pid::from_raw(tid).ok_or("bad thread ID")?;
        let _ = rustix::thread::sched_setaffinity(Some(tid), &set);
    }
    Ok(())
}

/// Row 6: SIGTERM, start with the saved identity, until the first
/// X509-SVID is served to this process; ms from the process start.
async fn agent_restart(sys: &System, agent: &mut SysAgent) -> BenchResult<f64> {
    agent.stop().await;
    let start = Instant::now();
    agent.restart(sys).await?;
    wait_first_x509(&agent.socket).await?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Row 1: a workload holds an open FetchX509SVID stream; entries for it
/// are created one at a time with the CLI, `gap` apart. Each is timed from
/// its CLI's start to the first stream message that carries it. Creation
/// overlaps the agent's poll cycle at every phase, so a polling agent is
/// sampled fairly.
async fn propagation(sys: &System, agent: &SysAgent, s: &Sizes) -> BenchResult<(f64, f64)> {
    let n = s.propagation;
    let prefix = "spiffe://example.org/bench/propagation/";
    let mut client = workload_client(&agent.socket).await?;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    stream.message().await?.ok_or("the stream ended")?;
    let reader = tokio::spawn(async move {
        let mut arrived: HashMap<String, Instant> = HashMap::new();
        while arrived.len() < n {
            let msg = stream.message().await?.ok_or("the stream ended")?;
            let now = Instant::now();
            for svid in msg.svids {
                if svid.spiffe_id.starts_with(prefix) {
                    arrived.entry(svid.spiffe_id).or_insert(now);
                }
            }
        }
        BenchResult::Ok(arrived)
    });
    let mut started = HashMap::new();
    for i in 0..n {
        let spiffe_id = format!("{prefix}{i}");
        started.insert(spiffe_id.clone(), Instant::now());
        sys.create_entry(&Spec {
            spiffe_id,
            parent: agent.id.clone(),
            uid: own_uid(),
        })
        .await?;
        tokio::time::sleep(s.gap).await;
    }
    let arrived = tokio::time::timeout(PROPAGATION_LIMIT, reader)
        .await
        .map_err(|_| {
            format!("not every entry reached the stream within {PROPAGATION_LIMIT:?}")
        })???;
    let lats = started
        .iter()
        .map(|(id, t)| {
            Ok(arrived
                .get(id)
                .ok_or("an entry never arrived")?
                .duration_since(*t))
        })
        .collect::<BenchResult<Vec<_>>>()?;
    let d = Dist::new(lats);
    Ok((d.q(0.5).as_secs_f64() * 1e3, d.q(0.99).as_secs_f64() * 1e3))
}

/// Row 7: `held` workloads hold FetchX509SVID streams; the server is
/// stopped, stays down for `down`, and starts again. Meanwhile a probe
/// asks for a new X509 stream's first message every [`PROBE_EVERY`]; after
/// the start it also asks for a JWT-SVID for a new audience, which the
/// agent must mint through the server, until one is served.
async fn server_restart(sys: &mut System, agent: &SysAgent, s: &Sizes) -> Got {
    let opened = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let mut holders = tokio::task::JoinSet::new();
    for _ in 0..s.held {
        let mut client = workload_client(&agent.socket).await?;
        let (opened, ended) = (opened.clone(), ended.clone());
        holders.spawn(async move {
            let stream = client
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await;
            let Ok(stream) = stream else {
                ended.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut stream = stream.into_inner();
            if let Ok(Some(_)) = stream.message().await {
                opened.fetch_add(1, Ordering::Relaxed);
                while let Ok(Some(_)) = stream.message().await {}
            }
            ended.fetch_add(1, Ordering::Relaxed);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::Relaxed) + ended.load(Ordering::Relaxed) < s.held {
        if Instant::now() > deadline {
            return Err("the held streams did not open".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let probe = workload_client(&agent.socket).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (probe, stop, failed) = (probe.clone(), stop.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if Call::X509.once(probe.clone()).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        })
    };
    sys.stop_server().await;
    tokio::time::sleep(s.down).await;
    let start = Instant::now();
    let minted = async {
        let mut n = 0;
        loop {
            n += 1;
            let got = mint(probe.clone(), format!("recovery-{n}")).await;
            if got.is_ok() {
                return BenchResult::Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(300) {
                return Err(format!("the agent did not mint again: {got:?}").into());
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    };
    let (ready, recovery) = tokio::join!(sys.start_server(), minted);
    let (ready, recovery) = (ready?, recovery?);
    stop.store(true, Ordering::Relaxed);
    prober.await?;
    let dropped = ended.load(Ordering::Relaxed);
    holders.abort_all();
    Ok(vec![
        ("srv_errors", failed.load(Ordering::Relaxed) as f64),
        ("srv_dropped", dropped as f64),
        ("srv_ready", ready.as_secs_f64() * 1e3),
        ("srv_recovery", recovery.as_secs_f64() * 1e3),
    ])
}

/// A JWT-SVID for `audience`, new to the agent.
async fn mint(mut client: WorkloadClient, audience: String) -> BenchResult<()> {
    let resp = client
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec![audience],
            spiffe_id: String::new(),
        }))
        .await?;
    if resp.get_ref().svids.is_empty() {
        return Err("no JWT-SVID".into());
    }
    Ok(())
}

/// Rows 2, 4 and 6 (many entries): for each size a new agent with one
/// entry for this process, then `size` entries for other uids registered
/// with the CLI, until the agent holds all their SVIDs.
async fn fills(kind: Kind, setup: &Setup, s: &Sizes) -> Got {
    let mut sys = System::start(kind, setup).await?;
    let mut out = Vec::new();
    for (size, keys) in [
        (
            s.fill_small,
            ["fill_small", "fill_small_cpu", "fill_small_reg"],
        ),
        (
            s.fill_large,
            ["fill_large", "fill_large_cpu", "fill_large_reg"],
        ),
    ] {
        let mut agent = sys.agent(size + 1).await?;
        sys.create_entry(&Spec {
            spiffe_id: format!("spiffe://example.org/bench/fill-{size}/own"),
            parent: agent.id.clone(),
            uid: own_uid(),
        })
        .await?;
        wait_first_x509(&agent.socket).await?;
        wait_cached(&agent, 1).await?;
        let rss_before = agent.rss()?;
        let entries: Vec<Spec> = (0..size)
            .map(|i| Spec {
                spiffe_id: format!("spiffe://example.org/bench/fill-{size}/{i}"),
                parent: agent.id.clone(),
                uid: FILL_UID + i as u32,
            })
            .collect();
        let cpu = proc_stat(sys.server_pid()?)?.cpu;
        let start = Instant::now();
        sys.create_entries(&entries).await?;
        let registered = start.elapsed();
        wait_cached(&agent, size + 1).await?;
        let took = start.elapsed();
        let cpu = proc_stat(sys.server_pid()?)?.cpu - cpu;
        out.extend([
            (keys[0], took.as_secs_f64()),
            (keys[1], cpu.as_secs_f64()),
            (keys[2], registered.as_secs_f64()),
        ]);
        if size == s.fill_large {
            let rss = agent.rss()?;
            out.push((
                "mem_per_svid",
                rss.saturating_sub(rss_before) as f64 / size as f64,
            ));
            out.push(("agent_rss", rss as f64 / (1024.0 * 1024.0)));
            let mut times = Vec::new();
            for _ in 0..s.rounds {
                times.push(agent_restart(&sys, &mut agent).await?);
            }
            out.push(("restart_large", median(&times)));
        }
        agent.stop().await;
    }
    sys.stop_server().await;
    Ok(out)
}

/// Polls the agent's SVID count every 10 ms until it holds `n`.
async fn wait_cached(agent: &SysAgent, n: usize) -> BenchResult<()> {
    let deadline = Instant::now() + FILL_LIMIT;
    loop {
        let held = agent.svids_cached().await?;
        if held >= n as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the agent held {held} of {n} SVIDs after {FILL_LIMIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Row 5: `scale` entries (for an agent that does not run) registered with
/// the CLI; at each of [`SCALE_POINTS`] the server restarts on them: start
/// to ready, and RSS. Registering stops at `register_limit`; the points not
/// reached then say so, with the figures at what was registered.
async fn scale(kind: Kind, setup: &Setup, s: &Sizes) -> BenchResult<Partial> {
    let mut sys = System::start(kind, setup).await?;
    let parent = sys.idle_parent().await?;
    let entries: Vec<Spec> = (0..s.scale)
        .map(|i| Spec {
            spiffe_id: format!("spiffe://example.org/bench/scale/{i}"),
            parent: parent.clone(),
            uid: FILL_UID + i as u32,
        })
        .collect();
    let (mut values, mut failed) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut done = 0;
    for (at, (div, keys)) in SCALE_POINTS.iter().enumerate() {
        let target = s.scale / div;
        while done < target && start.elapsed() < s.register_limit {
            let next = (done + 1000).min(target);
            sys.create_entries(&entries[done..next]).await?;
            done = next;
        }
        let register = start.elapsed().as_secs_f64();
        let (ready, rss) = restarts(&mut sys, s.rounds).await?;
        if done < target {
            let why = format!(
                "registering stopped at the {:?} limit with {done} entries; with those: \
                 registered in {register:.1} s, ready in {ready:.0} ms, RSS {rss:.1} MiB",
                s.register_limit
            );
            // This point and the later ones are not reached; the first
            // row says why.
            for (i, k) in SCALE_POINTS[at..].iter().flat_map(|(_, k)| k).enumerate() {
                let note = if i == 0 {
                    why.clone()
                } else {
                    "not reached, see above".into()
                };
                failed.push((*k, note));
            }
            break;
        }
        values.extend([(keys[0], register), (keys[1], ready), (keys[2], rss)]);
    }
    sys.stop_server().await;
    Ok((values, failed))
}

/// Restarts the server `rounds` times: the median start to ready (ms) and
/// RSS once ready (MiB).
async fn restarts(sys: &mut System, rounds: usize) -> BenchResult<(f64, f64)> {
    let (mut ready, mut rss) = (vec![], vec![]);
    for _ in 0..rounds {
        sys.stop_server().await;
        ready.push(sys.start_server().await?.as_secs_f64() * 1e3);
        rss.push(proc_stat(sys.server_pid()?)?.rss as f64 / (1024.0 * 1024.0));
    }
    Ok((median(&ready), median(&rss)))
}
