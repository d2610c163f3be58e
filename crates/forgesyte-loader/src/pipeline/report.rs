//! What a load or reload pass reports: [`PluginLoadOutcome`] per plugin
//! and the [`LoadReport`] of the pass.

use std::path::PathBuf;
use std::time::Duration;

use forgesyte_registry::PluginLifecycleState;
use serde::Serialize;

/// The outcome of loading one plugin directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginLoadOutcome {
    /// Registry key.
    pub name: String,
    /// The plugin directory.
    pub dir: PathBuf,
    /// State after the pass.
    pub state: PluginLifecycleState,
    /// Why it is not available, if it is not.
    pub reason: Option<String>,
    /// Time spent on this plugin (manifest to final state), in milliseconds.
    pub elapsed_ms: f64,
}

/// The outcome of a load pass, sorted by plugin name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// One entry per plugin directory with a manifest.
    pub plugins: Vec<PluginLoadOutcome>,
    /// Wall time of the whole pass, in milliseconds.
    pub elapsed_ms: f64,
}

impl LoadReport {
    fn count(&self, state: PluginLifecycleState) -> usize {
        self.plugins.iter().filter(|p| p.state == state).count()
    }
    /// Plugins that ended INITIALIZED.
    pub fn loaded(&self) -> usize {
        self.plugins
            .iter()
            .filter(|p| p.state.is_available())
            .count()
    }
    /// Plugins that ended FAILED.
    pub fn failed(&self) -> usize {
        self.count(PluginLifecycleState::Failed)
    }
    /// Plugins that ended UNAVAILABLE.
    pub fn unavailable(&self) -> usize {
        self.count(PluginLifecycleState::Unavailable)
    }

    /// Takes in the outcomes of plugins loaded again after the pass
    /// ([`Loader::settle_dependents`](super::loader::Loader)): each
    /// replaces the plugin's outcome, or is added.
    pub(super) fn settle(&mut self, settled: Vec<PluginLoadOutcome>) {
        for outcome in settled {
            match self.plugins.iter_mut().find(|o| o.name == outcome.name) {
                Some(slot) => *slot = outcome,
                None => self.plugins.push(outcome),
            }
        }
    }

    /// The pass's one-line summary in the log (`verb`: "Loaded", "Reloaded").
    pub(super) fn log_summary(&self, verb: &str, from: Option<&str>) {
        let from = from.map(|what| format!(" from {what}")).unwrap_or_default();
        tracing::info!(
            loaded = self.loaded(),
            failed = self.failed(),
            unavailable = self.unavailable(),
            elapsed_ms = self.elapsed_ms,
            "{verb} {} plugin{}{from} ({} failed, {} unavailable)",
            self.loaded(),
            if self.loaded() == 1 { "" } else { "s" },
            self.failed(),
            self.unavailable()
        );
    }
}

/// A duration in milliseconds, as reports give them.
pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
