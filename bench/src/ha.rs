//! High availability on PostgreSQL (issue 15): several `oxid-server`
//! processes of one trust domain on one database, against one server on
//! PostgreSQL and one on sled in the same run. Every part makes its own
//! database on the cluster it is given (`--pg`, else `$OXID_TEST_PG`, the
//! private cluster `scripts/bench ha` starts), and the servers reach it over
//! TCP with TLS (verify-full) and a SCRAM password, as servers on other
//! hosts would.
//!
//! Rows: propagation with the entry written on another server than the
//! agent's; X509-SVID issuance through one server on PostgreSQL and on
//! sled; 3 servers × 1,000 simulated agents × 100 entries against one
//! server on sled; failover when the agent's server is killed
//! (`failover.rs`); the issuance part is `issuance.rs`.

mod failover;
mod issuance;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxid_proto::workload as workload_pb;
use tokio::sync::Semaphore;

use crate::BenchResult;
use crate::cluster::{
    Cluster, SimAgent, agent_metrics_address, entry, mib, own_uid_selector, proc_stat,
    sync_snapshot, wait_first_x509, wait_metric, with_header, workload_client,
};
use crate::stats::{Dist, ms, spread};

#[derive(clap::Args, Clone, PartialEq, Eq)]
pub(crate) struct HaArgs {
    /// The PostgreSQL cluster, as `host=<socket dir or host> port=<port>
    /// user=<superuser>` [default: $OXID_TEST_PG]. The bench connects as
    /// that user without TLS to create one database per part (a Unix
    /// socket, or a host whose pg_hba allows it); the servers connect to
    /// 127.0.0.1 (or the host) on that port with TLS and the password.
    #[arg(long)]
    pg: Option<String>,
    /// The user's password for the servers [default: $OXID_TEST_PG_PASSWORD].
    #[arg(long)]
    pg_password: Option<String>,
    /// The CA of the PostgreSQL server's certificate [default:
    /// $OXID_TEST_PG_CA].
    #[arg(long)]
    pg_ca: Option<PathBuf>,
    /// Parts to run, comma-separated: propagation, issuance, scale,
    /// failover.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "propagation,issuance,scale,failover"
    )]
    parts: Vec<String>,
    /// Kills of the agent's server in the failover part.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Entries created one at a time per propagation round.
    #[arg(long, default_value_t = 100)]
    propagation_entries: usize,
    /// Simulated agents in the scale part.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Entries per simulated agent in the scale part.
    #[arg(long, default_value_t = 100)]
    per_agent: usize,
}

/// Servers on one database in the multi-server rows.
const SERVERS: usize = 3;

pub(crate) async fn run(args: HaArgs, rounds: usize) -> BenchResult<()> {
    let pg = Pg::from_args(&args)?;
    for part in &args.parts {
        match part.as_str() {
            "propagation" => propagation(&pg, args.propagation_entries, rounds).await?,
            "issuance" => issuance::run(&pg, rounds).await?,
            "scale" => scale(&pg, args.agents, args.per_agent).await?,
            "failover" => failover::run(&pg, args.kills).await?,
            other => {
                return Err(format!(
                    "unknown part {other:?} (propagation, issuance, scale, failover)"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// The cluster, and the password file every server reads.
struct Pg {
    /// Where the bench connects to create databases.
    admin: tokio_postgres::Config,
    /// Where the servers connect over TCP.
    host: String,
    port: u16,
    user: String,
    ca: PathBuf,
    /// Holds `pg-password` (0600, as the server requires).
    secrets: tempfile::TempDir,
}

impl Pg {
    fn from_args(args: &HaArgs) -> BenchResult<Self> {
        let need = |flag: &str, env: &str| -> BenchResult<String> {
            std::env::var(env).map_err(|_| {
                format!(
                    "oxid-bench ha needs a PostgreSQL cluster: give --{flag} or set {env} \
                     (./scripts/bench ha starts a private cluster and sets it)"
                )
                .into()
            })
        };
        let spec = match &args.pg {
            Some(s) => s.clone(),
            None => need("pg", "OXID_TEST_PG")?,
        };
        let password = match &args.pg_password {
            Some(s) => s.clone(),
            None => need("pg-password", "OXID_TEST_PG_PASSWORD")?,
        };
        let ca = match &args.pg_ca {
            Some(p) => p.clone(),
            None => need("pg-ca", "OXID_TEST_PG_CA")?.into(),
        };
        let (mut host, mut port, mut user) = (None, None, "postgres".to_owned());
        for pair in spec.split_whitespace() {
            match pair.split_once('=') {
                Some(("host", v)) => host = Some(v.to_owned()),
                Some(("port", v)) => port = Some(v.parse::<u16>()?),
                Some(("user", v)) => v.clone_into(&mut user),
                _ => return Err(format!("--pg: unexpected {pair:?} in {spec:?}").into()),
            }
        }
        let host = host.ok_or_else(|| format!("--pg names no host: {spec:?}"))?;
        let port = port.ok_or_else(|| format!("--pg names no port: {spec:?}"))?;
        let mut admin = tokio_postgres::Config::new();
        admin
            .host(&host)
            .port(port)
            .user(&user)
            .password(&password)
            .dbname("postgres")
            .application_name("oxid-bench");
        let secrets = tempfile::tempdir()?;
        let file = secrets.path().join("pg-password");
        std::fs::write(&file, format!("{password}\n"))?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        // A socket directory is on this host: the servers use its TCP side.
        let tcp_host = if host.starts_with('/') {
            "127.0.0.1".to_owned()
        } else {
            host
        };
        Ok(Self {
            admin,
            host: tcp_host,
            port,
            user,
            ca,
            secrets,
        })
    }

    /// A new, empty database; its name.
    async fn create_database(&self, part: &str) -> BenchResult<String> {
        let (client, connection) = self.admin.connect(tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(connection);
        let mut bytes = [0u8; 6];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| "no randomness")?;
        let name = format!("oxid_bench_{part}_{}", oxid_pki::hex(&bytes));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        drop(client);
        let _ = conn.await;
        Ok(name)
    }

    /// The `[datastore]` table of a server on database `db`.
    fn table(&self, db: &str) -> String {
        // verify-full checks the host name: 127.0.0.1 is in the private
        // cluster's certificate, and `localhost` too.
        format!(
            "[datastore]\nurl = \"postgresql://{}@{}:{}/{db}\"\npassword_file = {:?}\n\
             ca_file = {:?}\nsslmode = \"verify-full\"\n",
            self.user,
            self.host,
            self.port,
            self.secrets
                .path()
                .join("pg-password")
                .display()
                .to_string(),
            self.ca.display().to_string(),
        )
    }

    /// `n` servers named `ha-1`… on one new database, started one after
    /// another, each with `top` as extra top-level settings.
    async fn servers(&self, part: &str, n: usize, top: &str) -> BenchResult<Vec<Cluster>> {
        let db = self.create_database(part).await?;
        let mut out = Vec::with_capacity(n);
        for i in 1..=n {
            let top = format!("server_name = \"ha-{i}\"\n{top}");
            out.push(Cluster::start(&top, &self.table(&db)).await?);
        }
        Ok(out)
    }
}

/// Which store a single-server row runs on.
#[derive(Clone, Copy)]
enum Store {
    Sled,
    Postgres,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Self::Sled => "sled",
            Self::Postgres => "PostgreSQL",
        }
    }

    async fn server(self, pg: &Pg, part: &str, top: &str) -> BenchResult<Cluster> {
        match self {
            Self::Sled => Cluster::start(top, "").await,
            Self::Postgres => Ok(pg.servers(part, 1, top).await?.remove(0)),
        }
    }
}

// ---------------------------------------------------------------------------
// Propagation across servers.

/// Entry created through `writer` → the open stream of a workload of an
/// agent on `reader` (which may be the same server), `n` entries per round.
async fn propagation(pg: &Pg, n: usize, rounds: usize) -> BenchResult<()> {
    eprintln!("ha propagation: {SERVERS} servers on PostgreSQL, one on PostgreSQL, one on sled");
    let mut rows = String::new();
    let mut p99s = Vec::new();
    for (label, setup) in [
        (
            "3 servers on PostgreSQL, written on server 1, agent on server 2",
            0,
        ),
        ("1 server on PostgreSQL", 1),
        ("1 server on sled", 2),
    ] {
        let mut servers = match setup {
            0 => pg.servers("propagation", SERVERS, "").await?,
            1 => vec![Store::Postgres.server(pg, "propagation", "").await?],
            _ => vec![Store::Sled.server(pg, "propagation", "").await?],
        };
        // The writer is server 1, the agent on server 2; with one server,
        // both are it.
        let reader = usize::from(servers.len() > 1);
        let (mut agent, agent_id) = servers[reader]
            .start_agent(&["--metrics-address", "127.0.0.1:0"])
            .await?;
        let metrics = agent_metrics_address(&mut agent).await?;
        wait_metric(
            &metrics,
            "oxid_agent_server_connected",
            1.0,
            Duration::from_millis(5),
            Duration::from_secs(30),
        )
        .await?;
        servers[0]
            .create_entries(vec![entry(
                format!("spiffe://example.org/bench/ha/holder/{setup}"),
                &agent_id,
                own_uid_selector(),
            )])
            .await?;
        wait_first_x509(&agent.socket).await?;
        let mut client = workload_client(&agent.socket).await?;
        let mut stream = client
            .fetch_x509svid(with_header(workload_pb::X509svidRequest {}))
            .await?
            .into_inner();
        stream.message().await?.ok_or("the stream ended")?;
        let mut all = Vec::new();
        let mut round_p99 = Vec::new();
        for round in 0..rounds {
            let mut lats = Vec::with_capacity(n);
            for i in 0..n {
                let spiffe_id = format!("spiffe://example.org/bench/ha/p/{setup}/{round}/{i}");
                servers[0]
                    .create_entries(vec![entry(
                        spiffe_id.clone(),
                        &agent_id,
                        own_uid_selector(),
                    )])
                    .await?;
                let acked = Instant::now();
                let arrived = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        let msg = stream.message().await?.ok_or("the stream ended")?;
                        if msg.svids.iter().any(|s| s.spiffe_id == spiffe_id) {
                            return BenchResult::Ok(acked.elapsed());
                        }
                    }
                })
                .await
                .map_err(|_| format!("{spiffe_id} did not reach the workload within 30 s"))??;
                lats.push(arrived);
            }
            round_p99.push(Dist::new(lats.clone()).q(0.99).as_secs_f64() * 1e3);
            all.extend(lats);
        }
        let d = Dist::new(all);
        rows += &format!(
            "| {label} | {} | {} | **{}** | {} |\n",
            d.len(),
            ms(d.q(0.5)),
            ms(d.q(0.99)),
            spread(&round_p99, 1),
        );
        p99s.push(d.q(0.99));
        drop(stream);
        agent.proc.stop().await;
    }
    println!("\n## HA: propagation across servers on PostgreSQL\n");
    println!(
        "A workload holds an open FetchX509SVID stream on an agent; entries for it are created \
         one at a time through the admin API of server 1, and each is timed from the \
         CreateEntries answer to the stream's message carrying the new SPIFFE ID. With three \
         servers on one database the agent is connected to server 2, so every entry crosses \
         the database: server 1's commit, NOTIFY, server 2's feed read, its index, the agent's \
         sync, the agent's CSR signed by server 2, the workload's stream. The servers reach \
         PostgreSQL over TCP with TLS and SCRAM. {rounds} rounds of {n} entries; times in ms.\n"
    );
    println!("| setup | entries | p50 | p99 | p99 per round, median (range) |");
    println!("|---|---:|---:|---:|---:|");
    print!("{rows}");
    println!(
        "\nAcross servers: p99 {} ms (goal ≤ 50 ms), {:.1}× the single server on PostgreSQL \
         and {:.1}× the one on sled.",
        ms(p99s[0]),
        p99s[0].as_secs_f64() / p99s[1].as_secs_f64().max(1e-9),
        p99s[0].as_secs_f64() / p99s[2].as_secs_f64().max(1e-9),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Scale: 3 servers × 1,000 agents × 100 entries, against one server on sled.

/// Attestations in flight (as `scale.rs`).
const ATTEST_CONCURRENCY: usize = 32;

/// What one scale setup measured.
struct ScaleRow {
    entries: Duration,
    attest: Duration,
    sync_all: Duration,
    sync_p50: Duration,
    /// Each server's VmRSS with every agent synced, bytes.
    rss: Vec<u64>,
}

async fn scale(pg: &Pg, agents: usize, per_agent: usize) -> BenchResult<()> {
    let total = agents * per_agent;
    eprintln!("ha scale: {SERVERS} servers on PostgreSQL × {agents} agents × {per_agent} entries");
    // Every simulated agent connects from 127.0.0.1, where real ones come
    // from an address each: the per-address cap on handshakes would
    // refuse them when all open Sync at once.
    let top = format!("max_connections_per_address = {}\n", agents.max(64));
    let on_pg = scale_setup(pg.servers("scale", SERVERS, &top).await?, agents, per_agent).await?;
    eprintln!("ha scale: 1 server on sled × {agents} agents × {per_agent} entries");
    let on_sled = scale_setup(
        vec![Store::Sled.server(pg, "scale", &top).await?],
        agents,
        per_agent,
    )
    .await?;
    println!("\n## HA: {SERVERS} servers × {agents} agents × {per_agent} entries on PostgreSQL\n");
    println!(
        "{agents} simulated agents (the agent's own client, each on its own TLS connection), \
         each authorised for {per_agent} entries ({total} in all, created through server 1 in \
         CreateEntries batches of 1,000 before any agent attests). With {SERVERS} servers the \
         agents are spread evenly, agent i on server i mod {SERVERS}. Then every agent opens \
         Sync at once and reads its snapshot. RSS is each server's VmRSS once all are synced. \
         The servers take `max_connections_per_address = {agents}`, since every simulated agent \
         connects from 127.0.0.1.\n"
    );
    println!(
        "| setup | {total} entries created | {agents} attestations ({ATTEST_CONCURRENCY} in \
         flight) | **all initial syncs complete** | p50 agent | server RSS (MiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, r) in [
        (format!("{SERVERS} servers on PostgreSQL"), &on_pg),
        ("1 server on sled".to_owned(), &on_sled),
    ] {
        let rss: Vec<String> = r.rss.iter().map(|b| mib(*b)).collect();
        println!(
            "| {label} | {:.2} s | {:.2} s | **{:.2} s** | {} ms | {} |",
            r.entries.as_secs_f64(),
            r.attest.as_secs_f64(),
            r.sync_all.as_secs_f64(),
            ms(r.sync_p50),
            rss.join(" / "),
        );
    }
    println!(
        "\nInitial sync, {SERVERS} servers on PostgreSQL / 1 on sled: {:.2}. Each server on \
         PostgreSQL holds the whole index ({total} entries, all {agents} agent records) but \
         serves a third of the agents.",
        on_pg.sync_all.as_secs_f64() / on_sled.sync_all.as_secs_f64().max(1e-9)
    );
    Ok(())
}

async fn scale_setup(
    mut servers: Vec<Cluster>,
    agents: usize,
    per_agent: usize,
) -> BenchResult<ScaleRow> {
    let mut tokens = Vec::with_capacity(agents);
    for _ in 0..agents {
        tokens.push(servers[0].token().await?);
    }
    let entries = tokens
        .iter()
        .enumerate()
        .flat_map(|(a, (_, agent_id))| {
            (0..per_agent).map(move |i| {
                entry(
                    format!("spiffe://example.org/bench/ha/scale/{a}/{i}"),
                    agent_id,
                    format!("unix:uid:{}", 10_000 + i),
                )
            })
        })
        .collect();
    let t = Instant::now();
    servers[0].create_entries(entries).await?;
    let entries = t.elapsed();

    let t = Instant::now();
    let permits = Arc::new(Semaphore::new(ATTEST_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for (i, (token, _)) in tokens.into_iter().enumerate() {
        let permit = permits.clone().acquire_owned().await?;
        let server = &servers[i % servers.len()];
        let (address, pem) = (server.server.address.clone(), server.bundle_pem.clone());
        set.spawn(async move {
            let agent = tokio::time::timeout(
                Duration::from_secs(60),
                SimAgent::attest(&address, &pem, token),
            )
            .await
            .map_err(|_| format!("attestation {i} took over 60 s"))
            .and_then(|r| r.map_err(|e| e.to_string()));
            drop(permit);
            agent
        });
    }
    let mut sims = Vec::with_capacity(agents);
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(agent) => sims.push(agent),
            Err(e) => {
                for (i, s) in servers.iter().enumerate() {
                    let log = s.server.proc.log();
                    let odd: Vec<&str> = log
                        .lines()
                        .filter(|l| !l.contains("agent attested") && !l.contains(" INFO "))
                        .collect();
                    eprintln!(
                        "server {} log (warnings and errors):\n{}",
                        i + 1,
                        odd.join("\n")
                    );
                }
                return Err(e.into());
            }
        }
    }
    let attest = t.elapsed();

    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for a in &sims {
        let client = a.client.clone();
        set.spawn(async move {
            let stream = sync_snapshot(&client, per_agent).await?;
            BenchResult::Ok((stream, t.elapsed()))
        });
    }
    let mut streams = Vec::with_capacity(agents);
    let mut at = Vec::with_capacity(agents);
    while let Some(r) = set.join_next().await {
        let (stream, when) = r??;
        streams.push(stream);
        at.push(when);
    }
    let sync_all = t.elapsed();
    let rss = servers
        .iter()
        .map(|s| Ok(proc_stat(s.server_pid()?)?.rss))
        .collect::<BenchResult<Vec<_>>>()?;
    drop(streams);
    drop(sims);
    Ok(ScaleRow {
        entries,
        attest,
        sync_all,
        sync_p50: Dist::new(at).q(0.5),
        rss,
    })
}
