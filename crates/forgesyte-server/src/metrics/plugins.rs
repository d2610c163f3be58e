//! The per-plugin metrics read at scrape time from the plugin registry and
//! the loader (state, in-flight calls, restarts, a runner's memory and CPU
//! time), so the registry stays their one source of truth.
//!
//! Knows the registry's snapshot and the loader's handles (for a runner's
//! pid); nothing of HTTP.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use forgesyte_loader::{Isolation, Loader};
use forgesyte_registry::{PluginLifecycleState, PluginStatus};

use super::proc::{ProcessUsage, usage};

/// Encodes the per-plugin metrics of every registered plugin at each scrape.
#[derive(Debug)]
pub(super) struct PluginCollector {
    loader: Arc<Loader>,
}

impl PluginCollector {
    pub(super) fn new(loader: Arc<Loader>) -> Self {
        PluginCollector { loader }
    }

    /// Memory and CPU time of `name`'s runner process, for isolated plugins
    /// whose process is up.
    fn process_usage(&self, name: &str) -> Option<ProcessUsage> {
        let handle = self.loader.handle(name)?;
        if handle.isolation() != Isolation::Process {
            return None;
        }
        usage(handle.pid()?)
    }
}

impl Collector for PluginCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let statuses = self.loader.registry().snapshot().statuses();
        let usages: Vec<(&str, ProcessUsage)> = statuses
            .iter()
            .filter_map(|s| Some((s.name.as_str(), self.process_usage(&s.name)?)))
            .collect();

        let mut state = encoder.encode_descriptor(
            "plugin_state",
            "1 for the plugin's current lifecycle state, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for status in &statuses {
            for candidate in PluginLifecycleState::ALL {
                let labels = [
                    ("plugin", status.name.as_str()),
                    ("state", candidate.as_str()),
                ];
                ConstGauge::new(i64::from(status.state == candidate))
                    .encode(state.encode_family(&labels)?)?;
            }
        }
        per_plugin(
            &mut encoder,
            "plugin_in_flight_calls",
            "Tool calls of the plugin in progress",
            &statuses,
            |s| ConstGauge::new(i64::from(s.in_flight)),
        )?;
        per_plugin(
            &mut encoder,
            "plugin_restarts",
            "Restarts of the plugin's process by its supervisor",
            &statuses,
            |s| ConstCounter::new(s.restart_count),
        )?;
        if !usages.is_empty() {
            let mut rss = encoder.encode_descriptor(
                "plugin_process_resident_memory_bytes",
                "Resident memory of the plugin's runner process (isolated and Python plugins)",
                None,
                MetricType::Gauge,
            )?;
            for (name, usage) in &usages {
                ConstGauge::new(i64::try_from(usage.resident_bytes).unwrap_or(i64::MAX))
                    .encode(rss.encode_family(&[("plugin", *name)])?)?;
            }
            let mut cpu = encoder.encode_descriptor(
                "plugin_process_cpu_seconds",
                "User and system CPU time of the plugin's current runner process",
                None,
                MetricType::Counter,
            )?;
            for (name, usage) in &usages {
                ConstCounter::new(usage.cpu_seconds)
                    .encode(cpu.encode_family(&[("plugin", *name)])?)?;
            }
        }
        Ok(())
    }
}

/// One metric with a `plugin` label and one sample per plugin.
fn per_plugin<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    statuses: &[PluginStatus],
    metric: impl Fn(&PluginStatus) -> M,
) -> Result<(), std::fmt::Error> {
    let Some(first) = statuses.first() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, metric(first).metric_type())?;
    for status in statuses {
        metric(status).encode(family.encode_family(&[("plugin", status.name.as_str())])?)?;
    }
    Ok(())
}
