//! [`Snapshot`]: an immutable view of every plugin at one generation.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::status::{Entry, Recorded};
use crate::{JournalEntry, PluginInfo, PluginLifecycleState, PluginStatus, Transition};

/// An immutable view of every plugin, sorted by name. Cloning is one `Arc`
/// clone.
#[derive(Clone)]
pub struct Snapshot {
    pub(super) generation: u64,
    pub(super) plugins: Arc<Vec<(Arc<str>, Arc<Entry>)>>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("plugins", &self.plugins.len())
            .finish()
    }
}

impl Snapshot {
    /// The registry's generation when this snapshot was taken.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn entry(&self, name: &str) -> Option<&(Arc<str>, Arc<Entry>)> {
        self.plugins
            .binary_search_by(|(key, _)| (**key).cmp(name))
            .ok()
            .and_then(|i| self.plugins.get(i))
    }

    /// One plugin's status (uptime measured now).
    pub fn get(&self, name: &str) -> Option<PluginStatus> {
        let now = Instant::now();
        self.entry(name).map(|(key, entry)| entry.status(key, now))
    }

    /// One plugin's state.
    pub fn state(&self, name: &str) -> Option<PluginLifecycleState> {
        self.entry(name).map(|(_, entry)| entry.state)
    }

    /// One plugin's registered info.
    pub fn info(&self, name: &str) -> Option<PluginInfo> {
        self.entry(name)
            .map(|(_, entry)| PluginInfo::clone(&entry.info))
    }

    /// One plugin's transition history, oldest first.
    pub fn history(&self, name: &str) -> Option<Vec<Transition>> {
        self.entry(name)
            .map(|(_, entry)| entry.history.iter().cloned().collect())
    }

    /// One plugin's failure journal, oldest first.
    pub fn journal(&self, name: &str) -> Option<Vec<JournalEntry>> {
        self.entry(name)
            .map(|(_, entry)| entry.journal.iter().map(Recorded::to_entry).collect())
    }

    /// Every plugin's status, sorted by name (uptimes measured at one instant).
    pub fn statuses(&self) -> Vec<PluginStatus> {
        let now = Instant::now();
        self.plugins
            .iter()
            .map(|(key, entry)| entry.status(key, now))
            .collect()
    }

    /// Every registered name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.plugins
            .iter()
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// Names of the plugins that can take tool calls, sorted.
    pub fn available(&self) -> Vec<String> {
        self.plugins
            .iter()
            .filter(|(_, entry)| entry.state.is_available())
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// Whether a plugin of that name is in this snapshot.
    pub fn contains(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }

    /// Number of plugins.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether there are no plugins.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}
