//! Supervision of isolated plugins: when a plugin's process ends, the
//! plugin goes FAILED with the reason and is restarted after a backoff.
//!
//! - The delay starts at [`SupervisionPolicy::backoff_base`] and doubles
//!   with each crash in a row, up to [`SupervisionPolicy::backoff_cap`]; a
//!   plugin that stayed up for [`SupervisionPolicy::healthy_reset`] starts
//!   again from the base.
//! - At most [`SupervisionPolicy::max_restarts`] restarts happen within
//!   [`SupervisionPolicy::window`]; after that the plugin stays FAILED (its
//!   reason says so) until an explicit reload.
//! - While it waits, the plugin is FAILED with the crash reason and
//!   `next_retry_at`; calls get [`crate::CallError::NotRunnable`].
//! - A restart is `FAILED -> LOADED` (`restart_count + 1`), a new runner and
//!   construction, the handle's instance swapped, then `INITIALIZED`. A
//!   failed restart counts as another crash.
//!
//! One short-lived thread per pending restart; nothing runs while a plugin
//! is healthy.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use forgesyte_errors::{
    CrashCause, CrashError, ImportError, InitError, LoadError, PluginError, fmt_duration,
};
use forgesyte_registry::ExitInfo;
use parking_lot::Mutex;

use crate::handle::Inner;
use crate::host::{ExitReport, Importer, PluginInstance};

/// When and how often a crashed isolated plugin is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisionPolicy {
    /// Delay before the first restart (default 1 s); doubles per crash in a row.
    pub backoff_base: Duration,
    /// Longest delay (default 60 s).
    pub backoff_cap: Duration,
    /// Up this long, a plugin's next crash starts again from the base delay
    /// (default 5 min).
    pub healthy_reset: Duration,
    /// Most restarts within [`window`](Self::window) (default 5); then the
    /// plugin stays FAILED. 0: never restart.
    pub max_restarts: u32,
    /// The sliding window restarts are counted in (default 10 min).
    pub window: Duration,
}

impl Default for SupervisionPolicy {
    fn default() -> Self {
        SupervisionPolicy {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            healthy_reset: Duration::from_secs(5 * 60),
            max_restarts: 5,
            window: Duration::from_secs(10 * 60),
        }
    }
}

impl SupervisionPolicy {
    /// The delay before restart number `attempt` of a series (0-based):
    /// `base * 2^attempt`, at most the cap.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_cap)
    }
}

/// What a restart repeats.
#[derive(Debug)]
pub(crate) struct Restart {
    pub(crate) importer: Arc<dyn Importer>,
    pub(crate) library: PathBuf,
    pub(crate) config: Vec<u8>,
}

/// Per-plugin supervision state (one lock).
#[derive(Debug)]
pub(crate) struct Supervisor {
    restart: Restart,
    policy: SupervisionPolicy,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Bumped at every death: exit reports of older instances are stale.
    generation: u64,
    /// Crashes in a row (the backoff exponent).
    consecutive: u32,
    /// When recent restarts began.
    restarts: VecDeque<Instant>,
    /// When the current instance came up.
    healthy_since: Instant,
}

impl Supervisor {
    pub(crate) fn new(restart: Restart, policy: SupervisionPolicy) -> Self {
        Supervisor {
            restart,
            policy,
            state: Mutex::new(State {
                generation: 0,
                consecutive: 0,
                restarts: VecDeque::new(),
                healthy_since: Instant::now(),
            }),
        }
    }
}

/// Asks `instance` to report its end to the supervisor of `inner`.
pub(crate) fn watch(inner: &Arc<Inner>, instance: &Arc<dyn PluginInstance>) {
    let Some(supervisor) = &inner.supervisor else {
        return;
    };
    let generation = supervisor.state.lock().generation;
    let weak = Arc::downgrade(inner);
    instance.on_exit(Box::new(move |report| {
        if let Some(inner) = weak.upgrade() {
            ended(&inner, generation, report);
        }
    }));
}

/// The instance of `generation` ended: FAILED, then a restart is scheduled
/// (or not, past the budget).
fn ended(inner: &Arc<Inner>, generation: u64, report: &ExitReport) {
    if inner.retired.load(Ordering::SeqCst) {
        return;
    }
    let Some(supervisor) = &inner.supervisor else {
        return;
    };
    let policy = &supervisor.policy;
    let decision = {
        let mut state = supervisor.state.lock();
        if state.generation != generation {
            return;
        }
        state.generation += 1;
        let now = Instant::now();
        if now.saturating_duration_since(state.healthy_since) >= policy.healthy_reset {
            state.consecutive = 0;
        }
        while state
            .restarts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > policy.window)
        {
            state.restarts.pop_front();
        }
        if state.restarts.len() >= policy.max_restarts as usize {
            None
        } else {
            let delay = policy.delay(state.consecutive);
            state.consecutive = state.consecutive.saturating_add(1);
            Some((delay, state.generation))
        }
    };
    let name = &inner.name;
    let registry = &inner.registry;
    let reason = match decision {
        Some(_) => report.reason.clone(),
        None => format!(
            "{}; not restarted: {} restarts within {}",
            report.reason,
            policy.max_restarts,
            fmt_duration(policy.window)
        ),
    };
    if registry
        .mark_crashed(name, reason.clone(), exit_info(report))
        .is_err()
    {
        return;
    }
    tracing::error!(plugin = %name, %reason, "✗ Plugin FAILED: {name}");
    let Some((delay, generation)) = decision else {
        let _ = registry.set_next_retry(name, None);
        return;
    };
    let _ = registry.set_next_retry(name, Some(SystemTime::now() + delay));
    tracing::warn!(plugin = %name, delay_ms = delay.as_millis() as u64, "Restarting plugin {name} in {}", fmt_duration(delay));
    let weak = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new()
        .name(format!("forgesyte-restart-{name}"))
        .spawn(move || restart_after(&weak, delay, generation));
    if let Err(e) = spawned {
        tracing::error!(plugin = %name, error = %e, "cannot start the restart thread; {name} stays FAILED");
        let _ = registry.set_next_retry(name, None);
    }
}

/// Sleeps out the backoff (giving up if the handle is retired or dropped),
/// then restarts.
fn restart_after(weak: &Weak<Inner>, delay: Duration, generation: u64) {
    let deadline = Instant::now() + delay;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.retired.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            attempt(&inner, generation);
            return;
        }
        drop(inner);
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

/// One restart: a new runner, construction, the instance swapped in.
fn attempt(inner: &Arc<Inner>, generation: u64) {
    let Some(supervisor) = &inner.supervisor else {
        return;
    };
    let name = &inner.name;
    let registry = &inner.registry;
    if supervisor.state.lock().generation != generation {
        return;
    }
    // Refused when someone else moved the plugin (a reload): not ours any more.
    if registry.mark_restarting(name).is_err() {
        return;
    }
    supervisor.state.lock().restarts.push_back(Instant::now());
    let count = registry
        .get_status(name)
        .map_or(0, |status| status.restart_count);
    tracing::warn!(plugin = %name, restart = count, "Restarting plugin {name} (restart {count})");
    let restart = &supervisor.restart;
    let result = restart
        .importer
        .open(&restart.library)
        .map_err(PluginError::from)
        .and_then(|library| {
            library
                .instantiate(&restart.config)
                .map_err(PluginError::from)
        });
    match result {
        Ok(instance) => {
            if inner.retired.load(Ordering::SeqCst) {
                return;
            }
            let instance: Arc<dyn PluginInstance> = Arc::from(instance);
            if instance.tools() != inner.instance.read().tools() {
                tracing::warn!(plugin = %name, "the restarted instance lists other tools than the first; the first list stays in use");
            }
            supervisor.state.lock().healthy_since = Instant::now();
            watch(inner, &instance);
            *inner.instance.write() = instance;
            if registry.mark_initialized(name).is_ok() {
                tracing::info!(plugin = %name, restart = count, "✓ Restarted plugin: {name}");
            }
        }
        Err(error) => ended(inner, generation, &report_of(&error)),
    }
}

/// An exit report for a restart that failed before the plugin was up.
pub(crate) fn report_of(error: &PluginError) -> ExitReport {
    let crash: Option<&CrashError> = match error {
        PluginError::Load(LoadError::Import(ImportError::Crashed(c)))
        | PluginError::Load(LoadError::Init(InitError::Crashed(c)))
        | PluginError::Crash(c) => Some(c),
        _ => None,
    };
    let (signal, code) = match crash.map(|c| &c.cause) {
        Some(CrashCause::Signal { name, .. }) => (Some(name.clone()), None),
        Some(CrashCause::Exit { code }) => (None, Some(*code)),
        _ => (None, None),
    };
    ExitReport {
        reason: error.reason(),
        crash: crash.cloned(),
        signal,
        code,
    }
}

pub(crate) fn exit_info(report: &ExitReport) -> ExitInfo {
    ExitInfo {
        description: report.crash.as_ref().map(|c| c.cause.to_string()),
        signal: report.signal.clone(),
        code: report.code,
        stderr_tail: report
            .crash
            .as_ref()
            .map(|c| c.stderr_tail.clone())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = SupervisionPolicy::default();
        let delays: Vec<u64> = (0..8).map(|n| policy.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(policy.delay(u32::MAX), Duration::from_secs(60));
        let fast = SupervisionPolicy {
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(100),
            ..policy
        };
        let delays: Vec<u128> = (0..4).map(|n| fast.delay(n).as_millis()).collect();
        assert_eq!(delays, [20, 40, 80, 100]);
    }

    #[test]
    fn failed_restarts_keep_their_crash_details() {
        let crash = CrashError {
            cause: CrashCause::Signal {
                name: "SIGSEGV".into(),
                number: 11,
            },
            stderr_tail: vec!["bye".into()],
        };
        let report = report_of(&PluginError::from(InitError::Crashed(crash)));
        assert_eq!(report.signal.as_deref(), Some("SIGSEGV"));
        assert!(report.reason.starts_with("InitError: plugin process died"));
        let info = exit_info(&report);
        assert_eq!(
            info.description.as_deref(),
            Some("killed by signal SIGSEGV (11)")
        );
        assert_eq!(info.stderr_tail, ["bye"]);
        let report = report_of(&PluginError::from(InitError::Failed {
            message: "no".into(),
        }));
        assert_eq!(
            (report.crash, report.signal, report.code),
            (None, None, None)
        );
    }
}
