//! `oxid-bench`: runs the real `oxid-server` and `oxid-agent` binaries (built
//! next to it, in `target/release/`) on temporary directories and measures
//! them against bounds taken in the same run: the raw crypto rate of this
//! machine, SPIRE's published figures and the goals in BENCHMARKS.md. It
//! prints Markdown tables; nothing here asserts a time.
//!
//! `./scripts/bench` builds everything and runs `oxid-bench all`.

// A benchmark report is written to stdout; progress goes to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use clap::{Parser, Subcommand};

mod agent_scale;
mod cluster;
mod flood;
mod ha;
mod issuance;
mod propagation;
mod raw;
mod scale;
mod sds;
mod spire;
mod stats;
mod workload;

/// Any failure ends the run with its message: a benchmark that cannot run
/// reports nothing rather than a partial figure.
pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
#[command(name = "oxid-bench", about = "oxid benchmarks (see BENCHMARKS.md)")]
struct Cli {
    /// Rounds per measurement; tables give the median and the range.
    #[arg(long, default_value_t = 3, global = true)]
    rounds: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Clone, PartialEq)]
enum Command {
    /// Every benchmark below, in order.
    All,
    /// X509-SVID batch signing and JWT-SVID minting through the agent API,
    /// against raw P-256 on all cores.
    Issuance,
    /// Workload API latency at a fixed offered rate with 1, 100 and 1,000
    /// connections, and the maximum rate.
    Workload,
    /// Entry create acknowledged -> agent cache -> the workload's stream.
    Propagation,
    /// 100,000 entries and 1,000 simulated agents on one server, and the
    /// server's restart with them.
    Scale,
    /// One agent with 10,000 SVIDs: memory, rotation CPU, restart.
    Agent,
    /// Connection floods at the default caps: Workload API latency while
    /// another uid holds its maximum, admin latency while unauthenticated
    /// TLS peers hold the server's, and RSS before, during and after.
    Flood,
    /// Envoy SDS: 1,000 StreamSecrets streams on one agent, its memory per
    /// stream, and rotation to every stream updated.
    Sds,
    /// oxid and SPIRE v1.13.3 side by side (not part of `all`; SPIRE must
    /// be built first, `scripts/bench spire` does).
    Spire(spire::SpireArgs),
    /// High availability on PostgreSQL: propagation across servers,
    /// issuance against sled, 3 servers × 1,000 agents, failover (not part
    /// of `all`: it needs a PostgreSQL cluster, `scripts/bench ha` starts
    /// one).
    Ha(ha::HaArgs),
}

#[tokio::main]
async fn main() {
    // This binary again, as the flooding uid of `flood`.
    if let Ok(socket) = std::env::var(flood::HOLD_SOCKET) {
        if let Err(e) = flood::hold(&socket).await {
            eprintln!("oxid-bench hold: {e}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("oxid-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> BenchResult<()> {
    let rounds = cli.rounds.max(1);
    println!("{}", stats::machine());
    let all = cli.command == Command::All;
    let start = Instant::now();
    if all || cli.command == Command::Issuance {
        issuance::run(rounds).await?;
    }
    if all || cli.command == Command::Workload {
        workload::run(rounds).await?;
    }
    if all || cli.command == Command::Propagation {
        propagation::run(rounds).await?;
    }
    if all || cli.command == Command::Scale {
        scale::run().await?;
    }
    if all || cli.command == Command::Agent {
        agent_scale::run().await?;
    }
    if all || cli.command == Command::Flood {
        flood::run().await?;
    }
    if all || cli.command == Command::Sds {
        sds::run(rounds).await?;
    }
    if let Command::Spire(args) = cli.command {
        spire::run(args, rounds).await?;
    }
    if let Command::Ha(args) = cli.command {
        ha::run(args, rounds).await?;
    }
    eprintln!("oxid-bench: done in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
