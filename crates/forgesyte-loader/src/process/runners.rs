//! Every runner of a host that has not ended ([`Runners`]): what a
//! stopping host closes and ends, with each runner's process group. Knows
//! a runner's shared state ([`super::child`]'s) and how to kill it; nothing
//! of plugins or calls.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::Mutex;

use super::child::{KillReason, Shared, kill_unless_reaping, wait_dead};

/// Every runner of a host that has not ended, whatever it is doing
/// (constructing its plugin in a load pass, a reload or a restart, serving,
/// or being let go): what a stopping host ends, with its process group. A
/// runner is counted as soon as it is spawned, before the host sends it
/// anything; once
/// [`closed`](Runners::close), none starts (one that started meanwhile is
/// killed at once): a load pass or a restart still running when the host
/// stops could otherwise start runners after the host has let its own
/// go, and what their plugins start would outlive it.
#[derive(Debug, Default)]
pub(crate) struct Runners {
    live: Mutex<Live>,
}

/// What [`Runners`] holds under its lock.
#[derive(Debug, Default)]
struct Live {
    closed: bool,
    runners: Vec<std::sync::Weak<Shared>>,
}

/// Why the host kills the runners it still has when it stops (and one that
/// starts after); the start of why it refuses to start one then.
pub(crate) const HOST_STOPPING: &str = "the host is stopping";

impl Runners {
    /// Counts `shared`; `false` once closed.
    pub(super) fn admit(&self, shared: &Arc<Shared>) -> bool {
        let mut live = self.live.lock();
        if live.closed {
            return false;
        }
        // The ended ones go (a host starts runners for as long as it runs).
        live.runners.retain(|runner| {
            runner
                .upgrade()
                .is_some_and(|r| r.exit.lock().report.is_none())
        });
        live.runners.push(Arc::downgrade(shared));
        true
    }

    /// Closes: no runner starts from now on.
    pub(crate) fn close(&self) {
        self.live.lock().closed = true;
    }

    /// The host begins to stop: closes (no runner starts from now on) and
    /// kills, with their groups, the runners still constructing their
    /// plugin (a load pass, a reload or a restart in progress), whose
    /// construction would otherwise hold the stop for as long as its own
    /// time limit. Those that serve keep serving the calls in flight.
    /// Waits for nothing.
    pub(crate) fn stop_starting(&self) {
        self.close();
        for runner in self.counted() {
            if !runner.constructed.load(Ordering::SeqCst) {
                end_for_the_host(&runner);
            }
        }
    }

    /// Kills, with their groups, the runners of `plugin` still
    /// constructing it (a restart in progress as the plugin is let go), for
    /// `reason`.
    pub(crate) fn stop_starting_of(&self, plugin: &str, reason: &str) {
        for runner in self.counted() {
            if runner.plugin == plugin
                && !runner.constructed.load(Ordering::SeqCst)
                && runner.exit.lock().report.is_none()
            {
                kill_unless_reaping(&runner, KillReason::host(reason));
            }
        }
    }

    /// The runners counted that are still held somewhere.
    fn counted(&self) -> Vec<Arc<Shared>> {
        self.live
            .lock()
            .runners
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.live.lock().closed
    }

    /// Kills every runner not ended yet (with its group, as any runner's
    /// end) and waits until `deadline` for their ends to be processed;
    /// whether all were.
    pub(crate) fn end_all(&self, deadline: Instant) -> bool {
        let live = self.counted();
        for runner in &live {
            end_for_the_host(runner);
        }
        live.iter().all(|runner| {
            wait_dead(runner, deadline.saturating_duration_since(Instant::now())).is_some()
        })
    }
}

/// Kills `runner` as the host stops, unless it has ended.
fn end_for_the_host(runner: &Arc<Shared>) {
    if runner.exit.lock().report.is_none() {
        kill_unless_reaping(runner, KillReason::host(HOST_STOPPING));
    }
}
