//! Connection floods at the default caps (issue 12, findings 4 and 5),
//! loopback only and bounded in count and time:
//! - another uid (65534, no entry) asks the agent for `AGENT_FLOOD`
//!   Workload API connections and holds what it gets (the per-uid cap);
//!   meanwhile a workload with an entry is timed;
//! - unauthenticated TLS peers hold the server's maximum (`SOURCES`
//!   loopback addresses, each at the per-address cap, `max_connections` in
//!   all), having sent the preface so only the idle timeout would close
//!   them; meanwhile the admin API's entry count is timed;
//! - each process's RSS before, during, and 30 s after the flood ends.
//!
//! The flooding uid runs this binary again (`setpriv`), as [`hold`].

use std::io::BufRead as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;
use oxid_proto::admin as admin_pb;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, UnixStream};

use crate::BenchResult;
use crate::cluster::{
    Cluster, entry, first_x509, mib, own_uid_selector, proc_stat, workload_client,
};
use crate::stats::{Dist, ms};

/// Connections the flooding uid asks the agent for (its cap is 1024).
const AGENT_FLOOD: usize = 2000;
/// The agent's default per-uid cap, for the report.
const AGENT_PER_UID: usize = 1024;
/// Loopback source addresses of the server flood.
const SOURCES: usize = 128;
/// Connections each source asks for (the per-address cap is 64).
const PER_SOURCE: usize = 80;
/// The server's default caps, for the report.
const SERVER_PER_ADDRESS: usize = 64;
const SERVER_MAX: usize = 8192;
/// Calls timed in each phase.
const CALLS: usize = 500;
/// How long after a flood ends the RSS is read again.
const SETTLE: Duration = Duration::from_secs(30);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The environment that makes this binary the flooding process.
pub(crate) const HOLD_SOCKET: &str = "OXID_BENCH_HOLD_SOCKET";
const HOLD_COUNT: &str = "OXID_BENCH_HOLD_COUNT";

/// As the flooding uid: opens `HOLD_COUNT` connections to `HOLD_SOCKET`,
/// sends each the preface, prints how many are still open after 3 s, and
/// holds them until stdin closes.
pub(crate) async fn hold(socket: &str) -> BenchResult<()> {
    let count: usize = std::env::var(HOLD_COUNT)?.parse()?;
    let mut conns = Vec::new();
    for _ in 0..count {
        let mut c = UnixStream::connect(socket).await?;
        // A refused connection may already be closed: that is the point.
        let _ = c.write_all(PREFACE).await;
        let _ = c.write_all(SETTINGS).await;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = conns.iter().filter(|c| still_open(c)).count();
    println!("held {open}");
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    drop(conns);
    Ok(())
}

/// Open unless the peer has closed (a read would return end of file).
fn still_open(c: &UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Descriptors `pid` holds open.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

pub(crate) async fn run() -> BenchResult<()> {
    raise_nofile();
    agent_flood().await?;
    server_flood().await?;
    Ok(())
}

/// `CALLS` FetchX509SVID streams to their first message, one at a time.
async fn workload_p99(socket: &std::path::Path) -> BenchResult<Dist> {
    let mut client = workload_client(socket).await?;
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        first_x509(&mut client).await?;
        samples.push(t.elapsed());
    }
    Ok(Dist::new(samples))
}

async fn agent_flood() -> BenchResult<()> {
    eprintln!("flood: uid 65534 asks the agent for {AGENT_FLOOD} connections");
    let mut c = Cluster::start("", "").await?;
    // Traversable, so uid 65534 reaches the agent's socket.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let (agent, agent_id) = c.start_agent(&[]).await?;
    std::fs::set_permissions(
        agent
            .socket
            .parent()
            .and_then(|p| p.parent())
            .ok_or("socket path")?,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    c.create_entries(vec![entry(
        "spiffe://example.org/bench/flood".into(),
        &agent_id,
        own_uid_selector(),
    )])
    .await?;
    let pid = agent.proc.pid().ok_or("the agent is not running")?;
    crate::cluster::wait_first_x509(&agent.socket).await?;
    let before_p99 = workload_p99(&agent.socket).await?;
    let before = proc_stat(pid)?;
    let before_fds = fds(pid);

    let mut flood = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(std::env::current_exe()?)
        .env(HOLD_SOCKET, &agent.socket)
        .env(HOLD_COUNT, AGENT_FLOOD.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(flood.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let held = line.trim().to_owned();
    let during_p99 = workload_p99(&agent.socket).await?;
    let during = proc_stat(pid)?;
    let during_fds = fds(pid);
    flood.kill()?;
    flood.wait()?;
    tokio::time::sleep(SETTLE).await;
    let after = proc_stat(pid)?;
    let after_fds = fds(pid);

    println!("\n## Connection floods (issue 12)\n");
    println!(
        "### Workload API: uid 65534 asks for {AGENT_FLOOD} connections \
         (max_connections_per_uid {AGENT_PER_UID})\n"
    );
    println!("Flooding process: {held} of {AGENT_FLOOD}.\n");
    println!(
        "| phase | FetchX509SVID first message p50 (ms) | p99 (ms) | agent RSS (MiB) | agent fds |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| before | {} | {} | {} | {} |",
        ms(before_p99.q(0.5)),
        ms(before_p99.q(0.99)),
        mib(before.rss),
        before_fds
    );
    println!(
        "| during | {} | {} | {} | {} |",
        ms(during_p99.q(0.5)),
        ms(during_p99.q(0.99)),
        mib(during.rss),
        during_fds
    );
    println!(
        "| 30 s after | - | - | {} | {} |",
        mib(after.rss),
        after_fds
    );
    Ok(())
}

/// `CALLS` admin ListEntries calls (what `entry count` does), one at a time.
async fn admin_latency(c: &mut Cluster) -> BenchResult<Dist> {
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        c.admin
            .list_entries(admin_pb::ListEntriesRequest::default())
            .await?;
        samples.push(t.elapsed());
    }
    Ok(Dist::new(samples))
}

async fn server_flood() -> BenchResult<()> {
    eprintln!("flood: {SOURCES} loopback addresses x {PER_SOURCE} unauthenticated TLS connections");
    let mut c = Cluster::start("", "").await?;
    let (_agent, agent_id) = c.start_agent(&[]).await?;
    let entries = (0..100)
        .map(|i| {
            entry(
                format!("spiffe://example.org/bench/flood/{i}"),
                &agent_id,
                format!("unix:uid:{}", 200_000 + i),
            )
        })
        .collect();
    c.create_entries(entries).await?;
    let pid = c.server_pid()?;
    let before_latency = admin_latency(&mut c).await?;
    let before = proc_stat(pid)?;
    let before_fds = fds(pid);

    let td = TrustDomain::new(crate::cluster::TRUST_DOMAIN)?;
    let bundle = Arc::new(oxid_tls::SharedBundle::new(Bundle::from_x509_pem(
        td.clone(),
        &c.bundle_pem,
    )?));
    let verifier = Arc::new(oxid_tls::SpiffeServerVerifier::new(
        td.spiffe_id("/oxid/server")?,
        bundle,
    ));
    let tls = tokio_rustls::TlsConnector::from(Arc::new(oxid_tls::client_config(verifier, None)?));
    let server: SocketAddr = c.server.address.parse()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for source in 0..SOURCES {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let ip = Ipv4Addr::new(127, 0, 1 + (source / 250) as u8, 1 + (source % 250) as u8);
            let mut held = Vec::new();
            for _ in 0..PER_SOURCE {
                let Ok(socket) = TcpSocket::new_v4() else {
                    break;
                };
                if socket.bind(SocketAddr::new(ip.into(), 0)).is_err() {
                    break;
                }
                let Ok(tcp) = socket.connect(server).await else {
                    continue;
                };
                let name = rustls_pki_types::ServerName::try_from("oxid-server.invalid")
                    .map_err(|e| e.to_string());
                let Ok(name) = name else { break };
                match tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp)).await {
                    Ok(Ok(mut conn)) => {
                        let _ = conn.write_all(PREFACE).await;
                        let _ = conn.write_all(SETTINGS).await;
                        let _ = conn.flush().await;
                        held.push(conn);
                    }
                    _ => continue,
                }
            }
            held
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.extend(t.await?);
    }
    // Give the server time to refuse what is over a cap.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut open = 0;
    for conn in &mut conns {
        let (tcp, _) = conn.get_mut();
        let mut buf = [0u8; 4096];
        let alive = loop {
            match tcp.try_read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        open += usize::from(alive);
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let during_latency = admin_latency(&mut c).await?;
    let during = proc_stat(pid)?;
    let during_fds = fds(pid);
    drop(conns);
    tokio::time::sleep(SETTLE).await;
    let after = proc_stat(pid)?;
    let after_fds = fds(pid);

    println!(
        "\n### Agent API: {SOURCES} addresses x {PER_SOURCE} unauthenticated TLS connections \
         (max_connections_per_address {SERVER_PER_ADDRESS}, max_connections {SERVER_MAX})\n"
    );
    println!(
        "Held after the handshake and preface: {open} of {} asked ({flood_secs:.1} s to open).\n",
        SOURCES * PER_SOURCE
    );
    println!(
        "| phase | admin ListEntries (100 entries) p50 (ms) | p99 (ms) | server RSS (MiB) | server fds |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| before | {} | {} | {} | {} |",
        ms(before_latency.q(0.5)),
        ms(before_latency.q(0.99)),
        mib(before.rss),
        before_fds
    );
    println!(
        "| during | {} | {} | {} | {} |",
        ms(during_latency.q(0.5)),
        ms(during_latency.q(0.99)),
        mib(during.rss),
        during_fds
    );
    println!(
        "| 30 s after | - | - | {} | {} |",
        mib(after.rss),
        after_fds
    );
    Ok(())
}
