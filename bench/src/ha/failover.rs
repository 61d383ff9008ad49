//! Failover: three servers on one PostgreSQL database, one `oxid-agent`
//! given all three addresses, a workload holding a FetchX509SVID stream
//! and another calling FetchX509SVID every few milliseconds. The agent's
//! server is killed (SIGKILL) again and again; each time, the time from
//! the kill to the agent's first sync page from another server (its
//! "failed over to another server" log line), then the killed server is
//! started again on its data directory before the next kill.

use std::time::{Duration, Instant};

use oxid_proto::workload as workload_pb;

use super::Pg;
use crate::BenchResult;
use crate::cluster::{
    Cluster, agent_metrics_address, entry, own_uid_selector, wait_first_x509, with_header,
    workload_client,
};
use crate::stats::{Dist, ms};

/// Time between two probe calls of the second workload.
const PROBE_EVERY: Duration = Duration::from_millis(10);

pub(super) async fn run(pg: &Pg, kills: usize) -> BenchResult<()> {
    eprintln!("ha failover: 3 servers on PostgreSQL, one agent on all three, {kills} kills");
    let mut servers = pg.servers("failover", super::SERVERS, "").await?;
    let others: Vec<String> = servers[1..]
        .iter()
        .flat_map(|c| ["--server-address".to_owned(), c.server.address.clone()])
        .collect();
    let mut extra: Vec<&str> = others.iter().map(String::as_str).collect();
    extra.extend(["--metrics-address", "127.0.0.1:0"]);
    let (mut agent, agent_id) = servers[0].start_agent(&extra).await?;
    agent_metrics_address(&mut agent).await?;
    servers[0]
        .create_entries(vec![entry(
            "spiffe://example.org/bench/ha/failover".into(),
            &agent_id,
            own_uid_selector(),
        )])
        .await?;
    wait_first_x509(&agent.socket).await?;

    // The held stream: any end of it is counted.
    let mut client = workload_client(&agent.socket).await?;
    let mut stream = client
        .fetch_x509svid(with_header(workload_pb::X509svidRequest {}))
        .await?
        .into_inner();
    stream.message().await?.ok_or("the stream ended")?;
    let held = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return "the stream ended".to_owned(),
                Err(e) => return format!("the stream failed: {e}"),
            }
        }
    });
    // The probe: a new call every PROBE_EVERY; the longest time between
    // two answered calls, and how many failed.
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let socket = agent.socket.clone();
    let probe = tokio::spawn(async move {
        let (mut longest, mut failed, mut answered) = (Duration::ZERO, 0usize, 0usize);
        let mut last = Instant::now();
        let mut client = workload_client(&socket).await?;
        while !*stop.borrow_and_update() {
            let call = client.fetch_x509svid(with_header(workload_pb::X509svidRequest {}));
            let ok = match call.await {
                Ok(s) => s.into_inner().message().await.is_ok_and(|m| m.is_some()),
                Err(_) => false,
            };
            if ok {
                longest = longest.max(last.elapsed());
                last = Instant::now();
                answered += 1;
            } else {
                failed += 1;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        BenchResult::Ok((longest, failed, answered))
    });

    let mut on = 0;
    let mut times = Vec::with_capacity(kills);
    let mut snapshots = 0;
    for k in 1..=kills {
        let pid = servers[on].server_pid()?;
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).ok_or("bad pid")?;
        let killed = Instant::now();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
        let line = agent
            .proc
            .wait_for_nth("failed over to another server", k)
            .await;
        times.push(killed.elapsed());
        if line.contains("snapshot=true") {
            snapshots += 1;
        }
        let to = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("to="))
            .ok_or_else(|| format!("no to= in {line:?}"))?;
        let next = servers
            .iter()
            .position(|c| c.server.address == to)
            .ok_or_else(|| format!("the agent went to {to}, no server of this bench"))?;
        restart(&mut servers[on]).await?;
        on = next;
    }
    stop_tx.send_replace(true);
    let (longest, failed, answered) = probe.await??;
    let ended = if held.is_finished() {
        held.await?
    } else {
        held.abort();
        "no".to_owned()
    };
    let d = Dist::new(times);
    println!("\n## HA: failover when the agent's server is killed\n");
    println!(
        "Three servers on one PostgreSQL database; one agent started with all three addresses \
         (`--server-address` three times). The agent's current server is killed with SIGKILL \
         {kills} times; each time is from the kill to the agent's first sync page from \
         another server (its `failed over to another server` log line), and the killed \
         server is then started again on its data directory before the next kill. Meanwhile \
         one workload holds a FetchX509SVID stream, and another makes a new FetchX509SVID \
         call every {} ms.\n",
        PROBE_EVERY.as_millis()
    );
    println!("| figure | value |\n|---|---:|");
    println!(
        "| **kill → agent syncing from another server**, p50 / p99 (max) over {} kills | **{} / \
         {} ms** ({} ms) |",
        d.len(),
        ms(d.q(0.5)),
        ms(d.q(0.99)),
        ms(d.q(1.0)),
    );
    println!("| failovers that needed a full snapshot (not a delta) | {snapshots} |");
    println!("| held workload stream ended (goal: never) | {ended} |");
    println!(
        "| probe calls answered / failed | {answered} / {failed} |\n| **longest time between \
         two answered probe calls** | **{} ms** |",
        ms(longest)
    );
    agent.proc.stop().await;
    Ok(())
}

/// Starts a killed server again on its data directory and address.
async fn restart(c: &mut Cluster) -> BenchResult<()> {
    // The killed process has to be reaped before its address is free.
    let _ = c.server.proc.wait().await;
    c.server.restart().await;
    Ok(())
}
