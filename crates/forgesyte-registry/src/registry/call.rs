//! [`CallGuard`]: one tool call in progress, finished when dropped.

use std::time::Duration;

use super::Registry;

/// Finishes a tool call when dropped; see [`Registry::begin_call`].
#[must_use = "dropping the guard finishes the call at once"]
#[derive(Debug)]
pub struct CallGuard {
    pub(super) registry: Registry,
    pub(super) name: String,
    pub(super) ended: bool,
}

impl CallGuard {
    /// The plugin this call runs on.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts the call as a success and finishes it (one write).
    pub fn succeeded(mut self, elapsed: Duration) {
        self.ended = self.registry.end_call(&self.name, elapsed, true).is_ok();
    }

    /// Counts the call as an error and finishes it (one write).
    pub fn failed(mut self, elapsed: Duration) {
        self.ended = self.registry.end_call(&self.name, elapsed, false).is_ok();
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.ended {
            // Fails only if someone else already called `finish` for this
            // call; nothing useful to do about that in a destructor.
            let _ = self.registry.finish(&self.name);
        }
    }
}
