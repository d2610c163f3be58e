//! [`Slot`]: the live instance of one plugin, shared by its
//! [`PluginHandle`](crate::PluginHandle) (which calls it) and, for an
//! isolated plugin, its supervisor (which swaps it after a restart).
//!
//! A leaf: it knows the registry and the instance traits, nothing of
//! handles or supervision, so both can depend on it without depending on
//! each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forgesyte_registry::Registry;
use parking_lot::{Mutex, MutexGuard, RwLock};

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
    /// Held by a restart while it builds a new instance ([`Slot::building`]).
    building: Mutex<()>,
}

impl Slot {
    pub(crate) fn new(name: String, registry: Registry, instance: Arc<dyn PluginInstance>) -> Self {
        Slot {
            name,
            registry,
            instance: RwLock::new(instance),
            retired: AtomicBool::new(false),
            building: Mutex::new(()),
        }
    }

    /// The current instance.
    pub(crate) fn current(&self) -> Arc<dyn PluginInstance> {
        Arc::clone(&*self.instance.read())
    }

    /// Puts `instance` in place of the current one (a restart), unless the
    /// plugin is retired: then `instance` is handed back. The flag is read
    /// under the instance's lock, which [`Slot::retire`] takes to set it:
    /// a restart that ends as the plugin is retired either is refused here
    /// or puts in the instance that `retire` then hands out to be stopped,
    /// never a runner left running for a plugin let go.
    /// `then` runs under the lock once the instance is in place (the
    /// restart's registry writes), so a retirement waits for them and a
    /// reload's writes, which follow its retirement, come after.
    pub(crate) fn replace_unless_retired(
        &self,
        instance: Arc<dyn PluginInstance>,
        then: impl FnOnce(),
    ) -> Result<(), Arc<dyn PluginInstance>> {
        let mut current = self.instance.write();
        if self.is_retired() {
            return Err(instance);
        }
        *current = instance;
        then();
        Ok(())
    }

    /// Runs `write` (a supervisor's registry writes) unless the plugin is
    /// retired, under the instance's lock, which [`Slot::retire`] takes to
    /// set the flag: a reload or retirement either waits for `write` and
    /// overwrites what it wrote, or comes first and `write` never runs;
    /// never a supervisor's late write over a reload's state. `None` when
    /// retired.
    pub(crate) fn unless_retired<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        let _current = self.instance.read();
        (!self.is_retired()).then(write)
    }

    /// Marks the plugin as let go by the loader; the instance in place then,
    /// the last one (no restart replaces it afterwards).
    pub(crate) fn retire(&self) -> Arc<dyn PluginInstance> {
        let current = self.instance.write();
        self.retired.store(true, Ordering::SeqCst);
        Arc::clone(&*current)
    }

    /// Whether the loader let the plugin go.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Held by a restart from before its new instance is started until
    /// it is in place or, refused, stopped: see [`Slot::wait_built`].
    pub(crate) fn building(&self) -> MutexGuard<'_, ()> {
        self.building.lock()
    }

    /// Waits up to `timeout` for a restart under way to end (its instance
    /// in place, or refused and stopped); whether none is under way.
    pub(crate) fn wait_built(&self, timeout: Duration) -> bool {
        self.building.try_lock_for(timeout).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ToolInfo;
    use forgesyte_errors::ToolError;

    #[derive(Debug)]
    struct Named(u32);

    impl PluginInstance for Named {
        fn tools(&self) -> &[ToolInfo] {
            &[]
        }

        fn call(&self, _tool: &str, _args: &[u8]) -> Result<Vec<u8>, ToolError> {
            Ok(b"null".to_vec())
        }

        fn pid(&self) -> Option<u32> {
            Some(self.0)
        }
    }

    #[test]
    fn a_retired_slot_refuses_a_restarted_instance_and_retire_hands_out_the_last() {
        let slot = Slot::new("p".into(), Registry::new(), Arc::new(Named(1)));
        assert!(
            slot.replace_unless_retired(Arc::new(Named(2)), || {})
                .is_ok()
        );
        assert_eq!(slot.unless_retired(|| 7), Some(7));
        // Retire hands out the instance in place: the restarted one.
        assert_eq!(slot.retire().pid(), Some(2));
        assert!(slot.is_retired());
        let refused = slot
            .replace_unless_retired(Arc::new(Named(3)), || unreachable!("not run when retired"))
            .expect_err("a retired slot takes no new instance");
        assert_eq!(slot.unless_retired(|| 7), None);
        assert_eq!(refused.pid(), Some(3));
        assert_eq!(slot.current().pid(), Some(2));
    }
}
