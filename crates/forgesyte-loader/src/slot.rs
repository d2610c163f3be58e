//! [`Slot`]: the live instance of one plugin, shared by its
//! [`PluginHandle`](crate::PluginHandle) (which calls it) and, for an
//! isolated plugin, its supervisor (which swaps it after a restart).
//!
//! A leaf: it knows the registry and the instance traits, nothing of
//! handles or supervision, so both can depend on it without depending on
//! each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use forgesyte_registry::Registry;
use parking_lot::RwLock;

use crate::host::PluginInstance;

/// One plugin's name, registry, current instance and retirement flag.
#[derive(Debug)]
pub(crate) struct Slot {
    /// The plugin's registry key.
    pub(crate) name: String,
    /// The registry its state is recorded in.
    pub(crate) registry: Registry,
    /// The live instance; swapped by a restart.
    instance: RwLock<Arc<dyn PluginInstance>>,
    /// Set when the loader lets the plugin go (reload, shutdown): no more
    /// restarts, no more registry changes from faults.
    retired: AtomicBool,
}

impl Slot {
    pub(crate) fn new(name: String, registry: Registry, instance: Arc<dyn PluginInstance>) -> Self {
        Slot {
            name,
            registry,
            instance: RwLock::new(instance),
            retired: AtomicBool::new(false),
        }
    }

    /// The current instance.
    pub(crate) fn current(&self) -> Arc<dyn PluginInstance> {
        Arc::clone(&*self.instance.read())
    }

    /// Puts `instance` in place of the current one (a restart).
    pub(crate) fn replace(&self, instance: Arc<dyn PluginInstance>) {
        *self.instance.write() = instance;
    }

    /// Marks the plugin as let go by the loader.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Whether the loader let the plugin go.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }
}
