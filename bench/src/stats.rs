//! Percentiles, medians of rounds, and the machine description.

use std::time::Duration;

/// A latency distribution.
pub(crate) struct Dist {
    sorted: Vec<Duration>,
}

impl Dist {
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    pub(crate) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The nearest-rank quantile `q` (0..=1); zero when empty.
    pub(crate) fn q(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }
}

/// Milliseconds with three decimals.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The median of `values` (the lower one of an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// "median (min–max)" with `decimals`.
pub(crate) fn spread(values: &[f64], decimals: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.len() < 2 {
        return format!("{:.decimals$}", median(values));
    }
    format!(
        "{:.decimals$} ({min:.decimals$}–{max:.decimals$})",
        median(values)
    )
}

/// The machine the figures come from, as a Markdown paragraph.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {} × {model}, {mem_gib:.0} GiB RAM, Linux {}.",
        cores(),
        kernel.trim()
    )
}

/// The cores this process may use.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let d = Dist::new((1..=1000).rev().map(Duration::from_micros).collect());
        assert_eq!(d.q(0.5), Duration::from_micros(500));
        assert_eq!(d.q(0.99), Duration::from_micros(990));
        assert_eq!(d.q(0.999), Duration::from_micros(999));
        assert_eq!(d.q(1.0), Duration::from_micros(1000));
        assert_eq!(Dist::new(vec![]).q(0.5), Duration::ZERO);
    }

    #[test]
    fn medians_and_spreads() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(spread(&[0.8, 0.7, 0.9], 2), "0.80 (0.70–0.90)");
        assert_eq!(spread(&[1.0], 1), "1.0");
    }
}
