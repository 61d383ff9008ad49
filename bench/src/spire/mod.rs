//! oxid against SPIRE v1.13.3, on the same machine, in the same run, with
//! the same client code: every row's steps run against oxid, SPIRE with its
//! defaults, and SPIRE with the settings that make it faster (a shorter
//! agent `sync_interval` and server `cache_reload_interval`, with the
//! events-based entry cache). `scripts/bench spire` builds SPIRE into
//! `target/spire/` first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::BenchResult;

mod rows;
mod sys;

use sys::{Kind, Setup};

/// `oxid-bench spire`: sizes and rounds.
#[derive(clap::Args, Clone, Copy, PartialEq)]
pub(crate) struct SpireArgs {
    /// Small sizes and short runs (about 5 minutes on 2 cores): fill 200
    /// and 1,000, 5,000 entries at the server restart, 1 s per latency
    /// cell.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Entries created one at a time for propagation [default: 60].
    #[arg(long)]
    pub(crate) propagation_entries: Option<usize>,
    /// Pause between two creations of the propagation row, ms.
    #[arg(long, default_value_t = 100)]
    pub(crate) propagation_gap_ms: u64,
    /// The smaller fill [default: 1000; quick 200].
    #[arg(long)]
    pub(crate) fill_small: Option<usize>,
    /// The larger fill, also the memory and agent-restart size [default:
    /// 10000; quick 1000].
    #[arg(long)]
    pub(crate) fill_large: Option<usize>,
    /// Entries on the server for its start-to-ready time [default: 100000;
    /// quick 5000].
    #[arg(long)]
    pub(crate) scale_entries: Option<usize>,
    /// Stop registering the start-to-ready entries after this many seconds
    /// (SPIRE's sqlite3 registration slows as entries grow); the rows say
    /// how many were registered.
    #[arg(long, default_value_t = 600)]
    pub(crate) register_limit_secs: u64,
    /// Seconds per Workload API latency cell [default: 3; quick 1].
    #[arg(long)]
    pub(crate) latency_secs: Option<u64>,
    /// Offered rate of the fixed-rate Workload API cells, requests/s.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rate: u64,
    /// The tuned SPIRE's agent `sync_interval` and server
    /// `cache_reload_interval`, ms (SPIRE's defaults: 5,000).
    #[arg(long, default_value_t = 1000)]
    pub(crate) spire_interval_ms: u64,
    /// Leave out the tuned SPIRE.
    #[arg(long)]
    pub(crate) no_tuned: bool,
    /// Measure oxid alone (its column of the table, to check a change to
    /// oxid without the 15 minutes SPIRE's rows take).
    #[arg(long)]
    pub(crate) oxid_only: bool,
}

/// The sizes of one run, from the flags.
#[derive(Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) rounds: usize,
    pub(crate) propagation: usize,
    pub(crate) gap: Duration,
    pub(crate) fill_small: usize,
    pub(crate) fill_large: usize,
    pub(crate) scale: usize,
    pub(crate) register_limit: Duration,
    pub(crate) latency: Duration,
    pub(crate) rate: f64,
    /// Connections held through the server restart.
    pub(crate) held: usize,
    /// How long the server stays down.
    pub(crate) down: Duration,
}

impl SpireArgs {
    fn sizes(&self, rounds: usize) -> Sizes {
        let q = self.quick;
        Sizes {
            rounds: if q { 1 } else { rounds },
            propagation: self.propagation_entries.unwrap_or(60),
            gap: Duration::from_millis(self.propagation_gap_ms),
            fill_small: self.fill_small.unwrap_or(if q { 200 } else { 1000 }),
            fill_large: self.fill_large.unwrap_or(if q { 1000 } else { 10_000 }),
            scale: self.scale_entries.unwrap_or(if q { 5000 } else { 100_000 }),
            register_limit: Duration::from_secs(self.register_limit_secs),
            latency: Duration::from_secs(self.latency_secs.unwrap_or(if q { 1 } else { 3 })),
            rate: self.rate as f64,
            held: 100,
            down: Duration::from_secs(2),
        }
    }
}

/// Figures, and rows that could not be measured with why.
pub(crate) type Partial = (Vec<(&'static str, f64)>, Vec<(&'static str, String)>);

/// Where row 5 restarts the server: after a tenth, half and all of the
/// entries.
pub(crate) const SCALE_POINTS: [(usize, [&str; 3]); 3] = [
    (10, ["scale_10_register", "scale_10_ready", "scale_10_rss"]),
    (2, ["scale_50_register", "scale_50_ready", "scale_50_rss"]),
    (
        1,
        ["scale_100_register", "scale_100_ready", "scale_100_rss"],
    ),
];

/// One system's figures by row key, and why a row could not be measured.
#[derive(Default)]
pub(crate) struct Figures {
    values: HashMap<&'static str, f64>,
    failed: HashMap<&'static str, String>,
}

impl Figures {
    /// Records a group of rows, or the error that stopped it for all of
    /// `keys`.
    fn record(&mut self, keys: &[&'static str], got: BenchResult<Vec<(&'static str, f64)>>) {
        match got {
            Ok(values) => self.values.extend(values),
            Err(e) => {
                let why = e.to_string().lines().next().unwrap_or_default().to_owned();
                for k in keys {
                    self.failed.insert(k, why.clone());
                }
            }
        }
    }

    /// Records figures and rows that could not be measured, with why.
    fn record_partial(&mut self, keys: &[&'static str], got: BenchResult<Partial>) {
        match got {
            Ok((values, failed)) => {
                self.values.extend(values);
                self.failed.extend(failed);
            }
            Err(e) => self.record(keys, Err(e)),
        }
    }

    fn cell(&self, row: &Row) -> String {
        match (self.values.get(row.key), self.failed.get(row.key)) {
            (Some(v), _) => format!("{:.*}", row.decimals, v),
            (None, Some(why)) if why.starts_with("not reached") => why.clone(),
            (None, Some(why)) => format!("not measured: {why}"),
            (None, None) => "—".into(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
    /// A count that should be zero: no ratio.
    Zero,
}

/// One line of the table.
struct Row {
    key: &'static str,
    label: String,
    better: Better,
    decimals: usize,
    /// The goal for oxid / SPIRE, when there is one.
    goal: Option<(f64, &'static str)>,
}

fn rows(s: &Sizes) -> Vec<Row> {
    let r = |key, label: String, better, decimals, goal| Row {
        key,
        label,
        better,
        decimals,
        goal,
    };
    use Better::{Higher, Lower, Zero};
    let half = Some((0.5, "≤ 1/2"));
    let mut rows = vec![
        r(
            "prop_p50",
            format!(
                "1. propagation, entry create (CLI started) → open FetchX509SVID stream carries it, p50 of {} (ms)",
                s.propagation
            ),
            Lower,
            1,
            None,
        ),
        r(
            "prop_p99",
            "1. propagation, p99 (ms)".into(),
            Lower,
            1,
            Some((0.01, "≤ 1/100")),
        ),
        r(
            "fill_small",
            format!(
                "2. fill: {} entries registered (CLI) → all their SVIDs cached (s)",
                s.fill_small
            ),
            Lower,
            2,
            half,
        ),
        r(
            "fill_small_reg",
            format!(
                "2. fill {}: of which the CLI registering them (s)",
                s.fill_small
            ),
            Lower,
            2,
            None,
        ),
        r(
            "fill_small_cpu",
            format!("2. fill {}: server CPU (s)", s.fill_small),
            Lower,
            2,
            None,
        ),
        r(
            "fill_large",
            format!(
                "2. fill: {} entries registered (CLI) → all their SVIDs cached (s)",
                s.fill_large
            ),
            Lower,
            2,
            half,
        ),
        r(
            "fill_large_reg",
            format!(
                "2. fill {}: of which the CLI registering them (s)",
                s.fill_large
            ),
            Lower,
            2,
            None,
        ),
        r(
            "fill_large_cpu",
            format!("2. fill {}: server CPU (s)", s.fill_large),
            Lower,
            2,
            None,
        ),
        r(
            "jwt_1_p50",
            format!(
                "3. FetchJWTSVID (cached), 1 connection, {:.0}/s: p50 (ms)",
                s.rate
            ),
            Lower,
            3,
            None,
        ),
        r(
            "jwt_1_p99",
            "3. FetchJWTSVID (cached), 1 connection: p99 (ms)".into(),
            Lower,
            3,
            half,
        ),
        r(
            "jwt_100_p50",
            format!(
                "3. FetchJWTSVID (cached), 100 connections, {:.0}/s: p50 (ms)",
                s.rate
            ),
            Lower,
            3,
            None,
        ),
        r(
            "jwt_100_p99",
            "3. FetchJWTSVID (cached), 100 connections: p99 (ms)".into(),
            Lower,
            3,
            half,
        ),
        r(
            "x509_1_p50",
            format!(
                "3. FetchX509SVID first message, 1 connection, {:.0}/s: p50 (ms)",
                s.rate
            ),
            Lower,
            3,
            None,
        ),
        r(
            "x509_1_p99",
            "3. FetchX509SVID first message, 1 connection: p99 (ms)".into(),
            Lower,
            3,
            half,
        ),
        r(
            "x509_100_p50",
            format!(
                "3. FetchX509SVID first message, 100 connections, {:.0}/s: p50 (ms)",
                s.rate
            ),
            Lower,
            3,
            None,
        ),
        r(
            "x509_100_p99",
            "3. FetchX509SVID first message, 100 connections: p99 (ms)".into(),
            Lower,
            3,
            half,
        ),
        r(
            "wl_errors",
            "3. Workload API calls failed in the cells above".into(),
            Zero,
            0,
            None,
        ),
        r(
            "jwt_max",
            "3. FetchJWTSVID (cached), closed loop, 100 connections (requests/s)".into(),
            Higher,
            0,
            None,
        ),
        r(
            "x509_max",
            "3. FetchX509SVID first message, closed loop, 100 connections (requests/s)".into(),
            Higher,
            0,
            None,
        ),
        r(
            "mem_per_svid",
            format!(
                "4. agent memory per cached SVID at {} ((RSS − RSS before) / SVIDs, B)",
                s.fill_large
            ),
            Lower,
            0,
            half,
        ),
        r(
            "agent_rss",
            format!("4. agent RSS with {} SVIDs (MiB)", s.fill_large),
            Lower,
            1,
            None,
        ),
        r("scale_points", String::new(), Lower, 0, None),
        r(
            "restart_1",
            "6. agent restart → first X509-SVID served, 1 entry (ms)".into(),
            Lower,
            0,
            None,
        ),
        r(
            "restart_large",
            format!(
                "6. agent restart → first X509-SVID served, {} entries (ms)",
                s.fill_large + 1
            ),
            Lower,
            0,
            None,
        ),
        r(
            "srv_errors",
            format!(
                "7. server down {:?} and restarted, {} workloads connected: FetchX509SVID calls failed",
                s.down, s.held
            ),
            Zero,
            0,
            None,
        ),
        r(
            "srv_dropped",
            "7. … open FetchX509SVID streams that ended".into(),
            Zero,
            0,
            None,
        ),
        r(
            "srv_ready",
            "7. … server start to ready (ms)".into(),
            Lower,
            0,
            None,
        ),
        r(
            "srv_recovery",
            "7. … server start → agent mints again (a new JWT audience served) (ms)".into(),
            Lower,
            0,
            None,
        ),
    ];
    // Row 5 at each restart point, where the placeholder stands.
    let mut points = Vec::new();
    for (div, keys) in SCALE_POINTS {
        let n = s.scale / div;
        points.push(r(
            keys[0],
            format!("5. register {n} entries (CLI, files of 1,000) (s)"),
            Lower,
            1,
            None,
        ));
        points.push(r(
            keys[1],
            format!("5. server start to ready with {n} entries (ms)"),
            Lower,
            0,
            None,
        ));
        points.push(r(
            keys[2],
            format!("5. server RSS once ready with {n} entries (MiB)"),
            Lower,
            1,
            None,
        ));
    }
    if let Some(at) = rows.iter().position(|row| row.key == "scale_points") {
        rows.splice(at..=at, points);
    }
    rows
}

pub(crate) async fn run(args: SpireArgs, rounds: usize) -> BenchResult<()> {
    let spire_bin = spire_bin()?;
    let out = std::process::Command::new(spire_bin.join("spire-server"))
        .arg("--version")
        .output()?;
    // SPIRE prints its version on stderr.
    let version = String::from_utf8_lossy(&out.stderr).trim().to_owned()
        + String::from_utf8_lossy(&out.stdout).trim();
    let sizes = args.sizes(rounds);
    let setup = Setup {
        spire_bin,
        interval: format!("{}ms", args.spire_interval_ms),
    };
    let mut kinds = vec![Kind::Oxid];
    if !args.oxid_only {
        kinds.push(Kind::Spire);
        if !args.no_tuned {
            kinds.push(Kind::SpireTuned);
        }
    }
    let mut all = Vec::new();
    for &kind in &kinds {
        eprintln!("spire: measuring {}", kind.name());
        all.push(rows::measure(kind, &setup, &sizes).await);
    }
    report(&args, &sizes, &kinds, &all, &version);
    Ok(())
}

/// `target/spire/bin` beside this binary's `target/release/`, or
/// `OXID_BENCH_SPIRE_BIN`.
fn spire_bin() -> BenchResult<PathBuf> {
    let dir = match std::env::var_os("OXID_BENCH_SPIRE_BIN") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .and_then(|d| d.parent())
            .ok_or("oxid-bench is not in target/<profile>/")?
            .join("spire/bin"),
    };
    for name in ["spire-server", "spire-agent"] {
        if !dir.join(name).exists() {
            return Err(format!(
                "{} is missing: `scripts/bench spire` builds SPIRE v1.13.3 there",
                dir.join(name).display()
            )
            .into());
        }
    }
    Ok(dir)
}

fn report(args: &SpireArgs, s: &Sizes, kinds: &[Kind], all: &[Figures], version: &str) {
    let command: Vec<String> = std::env::args().skip(1).collect();
    println!("\n## oxid vs SPIRE, same machine, same run\n");
    println!(
        "`oxid-bench {}` (`spire-server --version`: {version}). Each system runs \
         as a server and one agent on this host, started fresh for each group of rows; the \
         same Workload API client (tonic, over the agent's Unix socket, with the \
         `workload.spiffe.io` header) and the same load generator measure all of them. \
         SPIRE: sqlite3 datastore, `join_token` node attestation, the `unix` workload \
         attestor, KeyManager `disk`, TTLs written out as oxid's defaults (CA 24 h, \
         X509-SVID 1 h, JWT-SVID 5 m, agent 1 h), everything else default. SPIRE (tuned): \
         the same, plus agent `experimental {{ sync_interval = \"{}ms\" }}` and server \
         `experimental {{ cache_reload_interval = \"{}ms\", events_based_cache = true }}` \
         (both intervals default to 5 s). For the fill, memory and restart rows both agents \
         sign ahead as many SVIDs as there are entries (oxid `--max-presigned-svids`, SPIRE \
         `x509_svid_cache_max_size`; both default to 1,000). Latency cells: {:.0} requests/s \
         for {:?}, {} round(s); the agent is pinned to CPU 1 and the load generator to CPU 0. \
         Ratios are oxid / SPIRE.\n",
        command.join(" "),
        args.spire_interval_ms,
        args.spire_interval_ms,
        s.rate,
        s.latency,
        s.rounds,
    );
    if args.quick {
        println!(
            "**Quick mode**: small sizes and one round, a check that every row runs; not \
             figures to publish.\n"
        );
    }
    let mut head = String::from("| row |");
    let mut rule = String::from("|---|");
    for k in kinds {
        head += &format!(" {} |", k.name());
        rule += "---:|";
    }
    for k in &kinds[1..] {
        head += &format!(" oxid / {} |", k.name());
        rule += "---:|";
    }
    head += " goal |";
    rule += "---|";
    println!("{head}\n{rule}");
    for row in rows(s) {
        let mut line = format!("| {} |", row.label);
        for f in all {
            line += &format!(" {} |", f.cell(&row));
        }
        let ours = all[0].values.get(row.key).copied();
        let mut verdicts = Vec::new();
        for (k, f) in kinds[1..].iter().zip(&all[1..]) {
            let theirs = f.values.get(row.key).copied();
            match (ours, theirs, row.better) {
                (Some(o), Some(t), Better::Lower | Better::Higher) if t > 0.0 => {
                    let ratio = o / t;
                    line += &format!(" {ratio:.3} |");
                    if let Some((goal, _)) = row.goal {
                        let met = ratio <= goal;
                        verdicts.push(format!("{} vs {}", if met { "✔" } else { "✘" }, k.name()));
                    }
                }
                _ => line += " — |",
            }
        }
        match row.goal {
            Some((_, text)) => line += &format!(" {text} {} |", verdicts.join(", ")),
            None if row.better == Better::Zero => line += " 0 |",
            None => line += " — |",
        }
        println!("{line}");
    }
}
