//! The server's metrics: one `prometheus-client` registry holding every
//! family `/metrics` serves, and the readiness `/ready` answers. The RPC
//! families come from [`oxid_telemetry::RpcLayer`] (shared with the agent);
//! the state gauges are read from the CA, the index and the store when
//! scraped, so they cannot drift from what they report.
//!
//! The README's "Monitoring" section lists the families; the dashboard and
//! alerts that query them are in `deploy/`, and `tests/monitoring.rs`
//! checks that each one exists and moves.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use oxid_telemetry::{ComponentMetrics, ComponentState, encode_single as single};
pub use oxid_telemetry::{MetricsSource, RpcLayer, RpcMetrics, serve};

use crate::ca::CaManager;
use crate::datastore::DataStore;
use crate::index::IndexHandle;

/// What the server's `/metrics` and `/ready` read.
pub type ServerMetrics = ComponentMetrics<ServerState>;

/// The state the server's scrape-time families read.
pub struct ServerState {
    ca: Arc<CaManager>,
    index: Arc<IndexHandle>,
    store: Arc<dyn DataStore>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerState")
    }
}

impl ServerState {
    /// The state of a server with this CA, index and store.
    pub fn new(ca: Arc<CaManager>, index: Arc<IndexHandle>, store: Arc<dyn DataStore>) -> Self {
        Self { ca, index, store }
    }
}

impl ComponentState for ServerState {
    fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    fn not_ready_reason(&self) -> Option<String> {
        crate::admin::not_ready(self.store.as_ref(), &self.ca)
    }
}

/// One family of plain values, with labels given as `(name, value)` pairs.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ServerState {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (x509, jwt) = self.ca.signed_counts();
        family(
            &mut encoder,
            "oxid_svids_signed",
            "SVIDs signed since start, by kind",
            MetricType::Counter,
            [
                (vec![("kind", "x509".to_owned())], ConstCounter::new(x509)),
                (vec![("kind", "jwt".to_owned())], ConstCounter::new(jwt)),
            ],
        )?;
        let (entries, agents) = {
            let index = self.index.read();
            (index.entry_count(), index.agent_count())
        };
        let gauge = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        single(
            &mut encoder,
            "oxid_entries",
            "Registration entries",
            gauge(entries),
        )?;
        single(
            &mut encoder,
            "oxid_agents",
            "Attested agents (an evicted agent leaves)",
            gauge(agents),
        )?;
        let authorities = self.ca.authorities();
        let labels = |a: &crate::ca::AuthorityStatus| {
            vec![
                ("sequence", a.sequence.to_string()),
                ("state", format!("{:?}", a.state).to_lowercase()),
            ]
        };
        let secs = |t: u64| ConstGauge::new(i64::try_from(t).unwrap_or(i64::MAX));
        family(
            &mut encoder,
            "oxid_ca_not_after_seconds",
            "When each CA authority expires (unix time), by sequence and state",
            MetricType::Gauge,
            authorities.iter().map(|a| (labels(a), secs(a.not_after))),
        )?;
        family(
            &mut encoder,
            "oxid_ca_not_before_seconds",
            "When each CA authority became valid (unix time), by sequence and state",
            MetricType::Gauge,
            authorities.iter().map(|a| (labels(a), secs(a.not_before))),
        )?;
        let revision = *self.store.revision().borrow();
        single(
            &mut encoder,
            "oxid_store_revision",
            "Latest durable datastore revision",
            secs(revision),
        )?;
        single(
            &mut encoder,
            "oxid_feed_lag_seconds",
            "How far the entry index may be behind the newest committed datastore change: how \
             long a known change has waited to be applied, or the database has been unreachable; \
             0 when caught up",
            ConstGauge::new(self.index.feed_lag(self.store.as_ref()).as_secs_f64()),
        )?;
        single(
            &mut encoder,
            "oxid_server_ready",
            "1 when the server can serve, as /ready: the store takes writes and an active CA can sign",
            ConstGauge::new(i64::from(self.ready())),
        )
    }
}
