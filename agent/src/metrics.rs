//! The agent's metrics: one `prometheus-client` registry holding every
//! family its `/metrics` serves, and what `/ready` answers. The RPC families
//! (the Workload API's calls) come from [`oxid_telemetry::RpcLayer`]; the
//! rest is read from the cache, the JWT cache and the mint budget when
//! scraped, so a value cannot drift from the state it reports.
//!
//! The README's "Monitoring" section lists the families; the dashboard and
//! alerts that query them are in `deploy/`, and `tests/monitoring.rs`
//! checks that each one exists and moves.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::time::Instant;

use oxid_telemetry::{ComponentMetrics, ComponentState, encode_single as single};

use crate::cache::Cache;
use crate::workload::budget::MintBudget;
use crate::workload::jwt_cache::JwtCache;

/// What the agent's `/metrics` and `/ready` read.
pub(crate) type AgentMetrics = ComponentMetrics<AgentState>;

/// The state the agent's scrape-time families read.
pub(crate) struct AgentState {
    cache: Arc<Cache>,
    jwts: Arc<Mutex<JwtCache>>,
    mints: Arc<MintBudget>,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentState")
    }
}

impl ComponentState for AgentState {
    /// Ready: synced once, and connected to the server now.
    fn ready(&self) -> bool {
        self.cache.current().synced && self.cache.counters.server_connected.load(Relaxed)
    }
}

impl AgentState {
    /// The state of an agent with this cache, JWT cache and mint budget.
    pub(crate) fn new(
        cache: Arc<Cache>,
        jwts: Arc<Mutex<JwtCache>>,
        mints: Arc<MintBudget>,
    ) -> Self {
        Self { cache, jwts, mints }
    }

    /// How stale the agent's view may be: 0 while the sync stream is up
    /// (the server pushes every change on it at once, so no update is not
    /// staleness), else the seconds since it was last current; -1 before
    /// the first sync.
    fn sync_age(&self) -> f64 {
        let last = *self
            .cache
            .counters
            .last_sync
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match last {
            None => -1.0,
            Some(_) if self.cache.counters.server_connected.load(Relaxed) => 0.0,
            Some(t) => t.elapsed().as_secs_f64(),
        }
    }
}

fn count(n: usize) -> ConstGauge {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

impl Collector for AgentState {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.cache.current();
        let counters = &self.cache.counters;
        let now = Instant::now();
        single(
            &mut encoder,
            "oxid_agent_entries",
            "Entries authorised for this agent",
            count(snapshot.entries.len()),
        )?;
        single(
            &mut encoder,
            "oxid_agent_svids_cached",
            "X509-SVIDs held for workloads",
            count(snapshot.svids.len()),
        )?;
        // The soonest expiry among held SVIDs: rotation keeps it above
        // about 40 % of an SVID's life while the server signs.
        let remaining = snapshot
            .svids
            .values()
            .map(|s| s.expires.saturating_duration_since(now).as_secs_f64())
            .reduce(f64::min)
            .unwrap_or(-1.0);
        single(
            &mut encoder,
            "oxid_agent_svid_min_remaining_seconds",
            "Seconds until the soonest held X509-SVID expires (-1: none held)",
            ConstGauge::new(remaining),
        )?;
        let overdue = snapshot
            .svids
            .values()
            .filter(|s| s.rotate_at <= now)
            .count();
        single(
            &mut encoder,
            "oxid_agent_svids_past_rotation",
            "Held X509-SVIDs past their rotation time, not yet replaced (rotation failing when it stays above 0)",
            count(overdue),
        )?;
        let jwts = self.jwts.lock().unwrap_or_else(|e| e.into_inner()).len();
        single(
            &mut encoder,
            "oxid_agent_jwt_svids_cached",
            "JWT-SVIDs held for reuse",
            count(jwts),
        )?;
        single(
            &mut encoder,
            "oxid_agent_svid_rotations",
            "X509-SVIDs replaced by a newer one (rotation or entry change)",
            ConstCounter::new(counters.rotations.load(Relaxed)),
        )?;
        single(
            &mut encoder,
            "oxid_agent_attestation_failures",
            "Workload attestations refused",
            ConstCounter::new(counters.attestation_failures.load(Relaxed)),
        )?;
        single(
            &mut encoder,
            "oxid_agent_sds_nacks",
            "SDS responses Envoy rejected (NACK), each logged with Envoy's error",
            ConstCounter::new(counters.sds_nacks.load(Relaxed)),
        )?;
        single(
            &mut encoder,
            "oxid_agent_server_connected",
            "1 while the sync stream to the server is up",
            ConstGauge::new(i64::from(counters.server_connected.load(Relaxed))),
        )?;
        single(
            &mut encoder,
            "oxid_agent_server_failovers",
            "Times the sync stream came back on another server than the one it was lost from (moves at the server's max_connection_age not counted)",
            ConstCounter::new(counters.server_failovers.load(Relaxed)),
        )?;
        // Which server, while connected: an info metric, its one label
        // bounded by the configured addresses.
        let server = counters
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|_| counters.server_connected.load(Relaxed));
        let mut metric = encoder.encode_descriptor(
            "oxid_agent_server",
            "1 for the server the sync stream is on (label address: as configured, with the address dialled in brackets when it differs); absent while disconnected",
            None,
            MetricType::Gauge,
        )?;
        if let Some(server) = server {
            ConstGauge::new(1).encode(metric.encode_family(&[("address", server.as_str())])?)?;
        }
        single(
            &mut encoder,
            "oxid_agent_sync_age_seconds",
            "0 while the sync stream is up, else seconds since the agent's view was last current (-1: never synced)",
            ConstGauge::new(self.sync_age()),
        )?;
        single(
            &mut encoder,
            "oxid_agent_ready",
            "1 when /ready says ready: synced once and connected to the server now",
            ConstGauge::new(i64::from(self.ready())),
        )?;
        let refused = &self.mints.refused;
        let mut metric = encoder.encode_descriptor(
            "oxid_agent_jwt_mints_refused",
            "JWT-SVID mints refused, by the budget that refused them",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("uid", &refused.uid),
            ("agent", &refused.agent),
            ("server", &refused.server),
        ] {
            ConstCounter::new(n.load(Relaxed))
                .encode(metric.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}
