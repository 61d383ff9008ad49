//! Failover end to end, with the real binaries (issue 15): three
//! `oxid-server`s on one PostgreSQL database, an `oxid-agent` given all
//! three addresses and connected to A, a workload streaming its X.509
//! context. An entry created through C reaches the workload; then A is
//! killed (SIGKILL) while entries are being created through B. The
//! workload's stream never ends, the agent is on another server within
//! seconds (resumed with a delta), and every entry whose creation was
//! acknowledged reaches the workload. Then the server it is on hangs
//! (SIGSTOP): keepalive moves the agent to the last one, and an entry
//! created there reaches the workload. The times to fail over are printed,
//! not asserted. Needs the PostgreSQL cluster `./scripts/test` starts
//! (`OXID_TEST_PG`); every run makes a database of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use oxid_e2e::{Agent, Server, WAIT};
use tokio_stream::StreamExt as _;

/// The cluster's socket directory and port, from `OXID_TEST_PG`.
fn cluster() -> (PathBuf, u16) {
    let spec = std::env::var("OXID_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "OXID_TEST_PG is not set: this test needs the PostgreSQL cluster ./scripts/test \
             starts; run it with ./scripts/test"
        )
    });
    let (mut host, mut port) = (None, None);
    for pair in spec.split_whitespace() {
        match pair.split_once('=') {
            Some(("host", v)) => host = Some(PathBuf::from(v)),
            Some(("port", v)) => port = v.parse().ok(),
            _ => {}
        }
    }
    (
        host.expect("OXID_TEST_PG names no host"),
        port.expect("OXID_TEST_PG names no port"),
    )
}

/// A new database of this test's own; its `postgresql://` URL (over the
/// cluster's socket).
async fn fresh_database() -> String {
    let (dir, port) = cluster();
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    let name = format!(
        "oxid_e2e_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let conninfo = format!(
        "host={} port={port} user=postgres dbname=postgres",
        dir.display()
    );
    let out = tokio::process::Command::new("psql")
        .args([&conninfo, "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .await
        .expect("psql (from Debian's postgresql-client) runs");
    assert!(
        out.status.success(),
        "CREATE DATABASE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "postgresql://postgres@/{name}?host={}&port={port}",
        dir.display()
    )
}

/// Server `name` on the database at `url`, in `dir`.
async fn server(dir: &std::path::Path, name: &str, url: &str) -> Server {
    Server::start_with(
        dir,
        &format!("server_name = {name:?}"),
        &format!("[ca]\nttl = \"6h\"\nagent_svid_ttl = \"10m\"\n[datastore]\nurl = {url:?}\n"),
    )
    .await
}

/// The value of the sample `name` on the agent's `/metrics` at `address`.
fn sample(address: &str, name: &str) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(address).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The workload's X.509 context stream, followed in a task: the SPIFFE
/// IDs of its latest update. The task ends only if the stream does.
struct Workload {
    ids: tokio::sync::watch::Receiver<BTreeSet<String>>,
    task: tokio::task::JoinHandle<String>,
}

impl Workload {
    async fn start(agent: &Agent) -> Self {
        let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
            .await
            .unwrap();
        let mut stream = client.stream_x509_contexts().await.unwrap();
        let (tx, ids) = tokio::sync::watch::channel(BTreeSet::new());
        let task = tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Some(Ok(context)) => {
                        let _ = tx.send(
                            context
                                .svids()
                                .iter()
                                .map(|s| s.spiffe_id().to_string())
                                .collect(),
                        );
                    }
                    Some(Err(e)) => return format!("the stream failed: {e}"),
                    None => return "the stream ended".to_owned(),
                }
            }
        });
        Self { ids, task }
    }

    async fn until(&mut self, what: &str, done: impl Fn(&BTreeSet<String>) -> bool) {
        if tokio::time::timeout(WAIT, self.ids.wait_for(|ids| done(ids)))
            .await
            .is_err()
        {
            panic!(
                "never: {what}; the workload holds {} SVIDs",
                self.ids.borrow().len()
            );
        }
    }

    fn assert_open(&self) {
        assert!(
            !self.task.is_finished(),
            "the workload's stream ended while the agent changed servers"
        );
    }
}

/// Keeps creating entries through `server` until told to stop; the SPIFFE
/// IDs of those whose creation was acknowledged.
fn keep_creating(
    server: Server,
    parent: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
    created: tokio::sync::watch::Sender<usize>,
) -> tokio::task::JoinHandle<(Server, Vec<String>)> {
    tokio::spawn(async move {
        let selector = format!("unix:uid:{}", my_uid());
        let mut acknowledged = vec![];
        let mut n = 0;
        while !*stop.borrow_and_update() {
            let id = format!("spiffe://example.org/load/{n}");
            n += 1;
            // `cli` asserts the command succeeded: only an acknowledged
            // write is counted.
            server
                .create_entry(&id, &parent, &["--selector", &selector])
                .await;
            acknowledged.push(id);
            created.send_replace(acknowledged.len());
        }
        (server, acknowledged)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_agents_server_moves_it_to_another_and_its_workloads_lose_nothing() {
    let url = fresh_database().await;
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = server(dirs[0].path(), "a", &url).await;
    let b = server(dirs[1].path(), "b", &url).await;
    let c = server(dirs[2].path(), "c", &url).await;

    // The agent attests on A and is given all three, A first.
    let (token, agent_id) = a.join_token().await;
    let mut agent = Agent::start_with(
        dirs[3].path(),
        &a,
        &token,
        &[
            "--server-address",
            &b.address,
            "--server-address",
            &c.address,
            "--metrics-address",
            "127.0.0.1:0",
        ],
    )
    .await;
    let connected = agent.proc.wait_for("connected to the server").await;
    assert!(connected.contains(&a.address), "{connected}");

    // An entry created through C reaches the workload on A's agent.
    let selector = format!("unix:uid:{}", my_uid());
    c.create_entry(
        "spiffe://example.org/web",
        &agent_id,
        &["--selector", &selector],
    )
    .await;
    // Once the entry from C has arrived, the workload opens its stream
    // (one opened before would end at once: "no identity issued").
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while client.fetch_x509_context().await.is_err() {
        assert!(Instant::now() < deadline, "the entry from C never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut workload = Workload::start(&agent).await;
    workload
        .until("the entry from C is on the stream", |ids| {
            ids.contains("spiffe://example.org/web")
        })
        .await;

    // Entries keep being created through B while A is killed.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (created_tx, mut created) = tokio::sync::watch::channel(0usize);
    let writer = keep_creating(b, agent_id.clone(), stopped, created_tx);
    created.wait_for(|n| *n >= 5).await.unwrap();
    let pid = a.proc.pid().expect("A runs");
    let killed = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("a running child has a pid"),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let failed_over = agent.proc.wait_for("failed over to another server").await;
    let took = killed.elapsed();
    println!("time to failover (kill -9 of A to the agent syncing from another server): {took:?}");
    println!("agent: {failed_over}");
    assert!(
        failed_over.contains(&format!("from={}", a.address)),
        "{failed_over}"
    );
    assert!(
        !failed_over.contains(&format!("to={}", a.address)),
        "{failed_over}"
    );
    assert!(
        failed_over.contains("snapshot=false"),
        "the new server resumed the agent with a delta: {failed_over}"
    );
    workload.assert_open();

    // More writes after the failover, then every acknowledged one must
    // reach the workload's stream, which never ended.
    let before = *created.borrow();
    created.wait_for(|n| *n >= before + 5).await.unwrap();
    stop.send_replace(true);
    let (writer_server, acknowledged) = writer.await.unwrap();
    println!(
        "{} entries created through B around the kill",
        acknowledged.len()
    );
    workload
        .until("every acknowledged entry reaches the workload", |ids| {
            acknowledged.iter().all(|id| ids.contains(id))
        })
        .await;
    workload.assert_open();
    let metrics = agent
        .proc
        .log()
        .lines()
        .find(|l| l.contains("oxid-agent serving metrics"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("metrics_address="))
        })
        .expect("the agent logs its metrics address")
        .to_owned();
    assert_eq!(
        sample(&metrics, "oxid_agent_server_failovers_total"),
        Some(1.0)
    );
    assert!(a.proc.wait().await.is_none(), "A was killed by a signal");

    // The server the agent is on now hangs (SIGSTOP: its connections stay
    // open, nothing answers, keepalive pings included): the agent leaves
    // it for the one server left within seconds.
    let b = writer_server;
    let (hung, left) = if failed_over.contains(&format!("to={}", b.address)) {
        (&b, &c)
    } else {
        (&c, &b)
    };
    let hung_pid = rustix::process::Pid::from_raw(hung.proc.pid().expect("it runs") as i32)
        .expect("a running child has a pid");
    rustix::process::kill_process(hung_pid, rustix::process::Signal::STOP).unwrap();
    let stopped_at = Instant::now();
    let second = agent
        .proc
        .wait_for_nth("failed over to another server", 2)
        .await;
    println!(
        "time to failover (SIGSTOP of the agent's server, noticed by keepalive): {:?}",
        stopped_at.elapsed()
    );
    println!("agent: {second}");
    assert!(second.contains(&format!("to={}", left.address)), "{second}");
    workload.assert_open();
    left.create_entry(
        "spiffe://example.org/after-the-hang",
        &agent_id,
        &["--selector", &selector],
    )
    .await;
    workload
        .until(
            "an entry created after the hang reaches the workload",
            |ids| ids.contains("spiffe://example.org/after-the-hang"),
        )
        .await;
    workload.assert_open();
    rustix::process::kill_process(hung_pid, rustix::process::Signal::CONT).unwrap();
    agent.stop().await;
}
