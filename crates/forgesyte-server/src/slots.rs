//! The bound on one plugin's tool calls in progress
//! (`--max-calls-per-plugin`): a slot per call, held until the plugin
//! returns from it. An in-process call past its time limit cannot be
//! stopped and keeps its slot while it runs on; such slots are counted
//! apart, so that a refusal can say why a plugin that looks idle is full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::RunError;

/// One plugin's calls in progress.
#[derive(Debug, Default)]
struct Taken {
    calls: usize,
    /// Of those, the ones given up on at their time limit, still running.
    abandoned: usize,
}

#[derive(Debug)]
struct Shared {
    taken: Mutex<HashMap<String, Taken>>,
    limit: usize,
}

impl Shared {
    fn taken(&self) -> std::sync::MutexGuard<'_, HashMap<String, Taken>> {
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every plugin's call slots; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct CallSlots(Arc<Shared>);

impl CallSlots {
    /// At most `limit` calls in progress per plugin.
    pub(crate) fn new(limit: usize) -> Self {
        CallSlots(Arc::new(Shared {
            taken: Mutex::new(HashMap::new()),
            limit,
        }))
    }

    /// Claims one of `plugin`'s slots: `TooManyCalls` when all are taken.
    /// The slot is freed when the guard is dropped, when the plugin has
    /// returned from the call (a refusal leaves no entry behind: a
    /// plugin's entry exists only while it has calls in progress).
    pub(crate) fn begin(&self, plugin: &str) -> Result<CallSlot, RunError> {
        let mut taken = self.0.taken();
        match taken.get_mut(plugin) {
            Some(t) if t.calls >= self.0.limit => return Err(self.refusal(t.abandoned)),
            Some(t) => t.calls += 1,
            None if self.0.limit == 0 => return Err(self.refusal(0)),
            None => {
                taken.insert(
                    plugin.to_owned(),
                    Taken {
                        calls: 1,
                        abandoned: 0,
                    },
                );
            }
        }
        drop(taken);
        Ok(CallSlot(Arc::new(SlotState {
            slots: self.clone(),
            plugin: plugin.to_owned(),
            stage: AtomicU8::new(CallSlot::LIVE),
        })))
    }

    /// The refusal [`begin`](Self::begin) would answer now, if any.
    pub(crate) fn full(&self, plugin: &str) -> Option<RunError> {
        let taken = self.0.taken();
        let t = taken.get(plugin)?;
        (t.calls >= self.0.limit).then(|| self.refusal(t.abandoned))
    }

    fn refusal(&self, abandoned: usize) -> RunError {
        RunError::TooManyCalls {
            limit: self.0.limit,
            abandoned,
        }
    }
}

/// One tool call of a plugin in progress; see [`CallSlots::begin`]. Its
/// place is freed when this is dropped (an [`Abandoner`] shares the state,
/// not the place).
#[derive(Debug)]
pub(crate) struct CallSlot(Arc<SlotState>);

#[derive(Debug)]
struct SlotState {
    slots: CallSlots,
    plugin: String,
    /// [`CallSlot::LIVE`], then abandoned and/or dropped; moved under the
    /// slots' lock, so the counts always agree with it.
    stage: AtomicU8,
}

impl CallSlot {
    const LIVE: u8 = 0;
    const ABANDONED: u8 = 1;
    const DROPPED: u8 = 2;

    /// A handle that marks this call as given up on (its time limit
    /// passed, it runs on), kept by whoever times the call while the slot
    /// goes with the call.
    pub(crate) fn abandoner(&self) -> Abandoner {
        Abandoner(Arc::clone(&self.0))
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let slot = &self.0;
        let mut taken = slot.slots.0.taken();
        let was = slot.stage.swap(Self::DROPPED, Ordering::AcqRel);
        if let Some(t) = taken.get_mut(&slot.plugin) {
            t.calls = t.calls.saturating_sub(1);
            if was == Self::ABANDONED {
                t.abandoned = t.abandoned.saturating_sub(1);
            }
            if t.calls == 0 {
                taken.remove(&slot.plugin);
            }
        }
    }
}

/// Marks a call given up on; see [`CallSlot::abandoner`].
#[derive(Debug)]
pub(crate) struct Abandoner(Arc<SlotState>);

impl Abandoner {
    /// The call passed its time limit and runs on in the plugin's code: its
    /// slot is counted as abandoned until the plugin returns. Nothing when
    /// the call has returned already.
    pub(crate) fn abandon(&self) {
        let slot = &self.0;
        let mut taken = slot.slots.0.taken();
        if slot
            .stage
            .compare_exchange(
                CallSlot::LIVE,
                CallSlot::ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
            && let Some(t) = taken.get_mut(&slot.plugin)
        {
            t.abandoned += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_call_leaves_no_slot_entry_behind() {
        let slots = CallSlots::new(0);
        for i in 0..100 {
            assert!(slots.begin(&format!("plugin-{i}")).is_err());
        }
        assert!(slots.0.taken().is_empty());
    }

    /// A refusal says how many of the calls in progress were given up on;
    /// each frees its slot, and its count, when it returns, and marking a
    /// call that returned already counts nothing.
    #[test]
    fn abandoned_calls_are_counted_until_they_return() {
        let slots = CallSlots::new(2);
        let first = slots.begin("p").unwrap();
        let second = slots.begin("p").unwrap();
        first.abandoner().abandon();
        first.abandoner().abandon(); // once only
        let refused = |abandoned| RunError::TooManyCalls {
            limit: 2,
            abandoned,
        };
        assert_eq!(slots.full("p"), Some(refused(1)));
        assert_eq!(slots.begin("p").err(), Some(refused(1)));
        let late = second.abandoner();
        drop(second);
        late.abandon(); // it returned first: not counted
        assert_eq!(slots.full("p"), None);
        let third = slots.begin("p").unwrap();
        assert_eq!(slots.begin("p").err(), Some(refused(1)));
        drop(first);
        assert_eq!(slots.full("p"), None);
        drop(third);
        assert!(slots.0.taken().is_empty());
    }
}
