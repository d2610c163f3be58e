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
//! - Once the host is shutting down ([`ShutdownFlag`], set by
//!   `Loader::shutdown`), a process that ends is recorded (FAILED with
//!   `not restarted: the host is shutting down`) but never restarted, and
//!   a restart already waiting is dropped.
//!
//! Time comes from a [`Clock`]: the real one waits on one short-lived
//! thread per pending restart (nothing runs while a plugin is healthy); the
//! tests' fake one is advanced by hand.
//!
//! The supervisor shares the plugin's [`Slot`] with its handle; it knows
//! nothing of handles.

mod clock;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use forgesyte_errors::{
    CrashCause, CrashError, ImportError, InitError, LoadError, PluginError, fmt_duration,
};
use forgesyte_registry::ExitInfo;
use parking_lot::Mutex;

/// What the reason of a crashed plugin says when no thread could be
/// started for its restart (the host out of processes or threads): the
/// loader lists such a plugin with those the host was short for, and the
/// server tries it again on their backoff
/// ([`Loader::host_short_plugins`](crate::Loader::host_short_plugins)).
pub(crate) const NO_RESTART_THREAD: &str = "not restarted: cannot start the restart thread";

pub(crate) use clock::{Clock, SystemClock};

use crate::host::{ExitReport, Importer, PluginInstance};
use crate::slot::Slot;

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

/// Set once the host is shutting down; shared by the loader and every
/// supervisor it starts.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShutdownFlag(Arc<AtomicBool>);

impl ShutdownFlag {
    /// From now on, no restart is scheduled or started.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the host is shutting down.
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a restart repeats.
pub(crate) struct Restart {
    pub(crate) importer: Arc<dyn Importer>,
    pub(crate) library: PathBuf,
    pub(crate) config: Vec<u8>,
    /// The plugin's files checked again (its signed and pinned digests),
    /// before a new runner starts and once it has loaded them, as at load:
    /// a restart never runs code the load would have refused.
    pub(crate) recheck: Option<Recheck>,
}

impl std::fmt::Debug for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restart")
            .field("library", &self.library)
            .field("rechecked", &self.recheck.is_some())
            .finish_non_exhaustive()
    }
}

/// A check of the plugin's files; see [`Restart::recheck`].
pub(crate) type Recheck = Arc<dyn Fn() -> Result<(), PluginError> + Send + Sync>;

/// The host-wide side of supervision: policy, clock and shutdown flag.
#[derive(Debug, Clone)]
pub(crate) struct Supervision {
    pub(crate) policy: SupervisionPolicy,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) shutdown: ShutdownFlag,
}

/// Per-plugin supervision: the plugin's slot and state (one lock).
///
/// Kept alive by the plugin's handle; the exit callbacks and waiting
/// restarts hold it weakly, so once every handle is gone nothing restarts.
#[derive(Debug)]
pub(crate) struct Supervisor {
    slot: Arc<Slot>,
    restart: Restart,
    supervision: Supervision,
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

/// Why a crashed plugin is not restarted.
enum NoRestart {
    Budget,
    Shutdown,
    /// A rescan is retiring the plugin (its directory is gone): it waits
    /// for the plugin's calls in flight, then stops its process.
    Retiring,
}

impl Supervisor {
    /// Supervises the current instance of `slot`.
    pub(crate) fn start(slot: Arc<Slot>, restart: Restart, supervision: Supervision) -> Arc<Self> {
        let healthy_since = supervision.clock.now();
        let supervisor = Arc::new(Supervisor {
            slot,
            restart,
            supervision,
            state: Mutex::new(State {
                generation: 0,
                consecutive: 0,
                restarts: VecDeque::new(),
                healthy_since,
            }),
        });
        let instance = supervisor.slot.current();
        supervisor.watch(&instance);
        supervisor
    }

    /// Whether no instance it watches has ended yet: until then the first
    /// construction's load pass may record INITIALIZED; after, the state
    /// is this supervisor's (FAILED, a restart under way).
    pub(crate) fn never_ended(&self) -> bool {
        self.state.lock().generation == 0
    }

    /// The host is shutting down (the shared flag is set): a restart that
    /// waits is dropped, so the plugin no longer shows a retry time.
    pub(crate) fn stop_restarts(&self) {
        let _ = self.slot.registry.set_next_retry(&self.slot.name, None);
    }

    fn policy(&self) -> &SupervisionPolicy {
        &self.supervision.policy
    }

    /// Neither a restart nor its scheduling may happen: the plugin is let
    /// go, or being retired (a rescan drains its calls: another plugin may
    /// have its directory now), or the host is shutting down.
    fn restarts_stopped(&self) -> bool {
        self.slot.is_retired()
            || self.supervision.shutdown.is_set()
            || self
                .slot
                .registry
                .retiring_in_flight(&self.slot.name)
                .is_some()
    }

    /// The plugin is let go (its slot retired): a restart under way has
    /// its runner killed if it has not constructed the plugin yet, and is
    /// waited for until it has ended (its instance, refused, stopped), at
    /// most [`RUNNER_STOP_WAIT`] + 1 s. So the runner that replaces it (a
    /// reload's) starts once this one has ended, as after any let-go.
    pub(crate) fn cancel_attempt(&self) {
        self.restart.importer.stop_starting();
        if !self
            .slot
            .wait_built(crate::RUNNER_STOP_WAIT + Duration::from_secs(1))
        {
            let name = &self.slot.name;
            tracing::warn!(plugin = %name, "Plugin {name}: a restart under way had not ended; going on without it");
        }
    }

    /// Asks `instance` to report its end to this supervisor.
    fn watch(self: &Arc<Self>, instance: &Arc<dyn PluginInstance>) {
        let generation = self.state.lock().generation;
        let weak = Arc::downgrade(self);
        instance.on_exit(Box::new(move |report| {
            if let Some(supervisor) = weak.upgrade() {
                // A call past its time limit killed the runner: the
                // call's doing (any client's slow input), not a crash of
                // the plugin's. Restarted after the base delay, the
                // backoff not grown, and not counted in the restart
                // budget: six slow requests in ten minutes left the plugin
                // FAILED for good, and a slow request a minute kept it
                // down most of the time at the capped delay. Nor is a
                // runner lost with its zygote counted: that spent a
                // restart of every Python plugin of the zygote at once.
                let timed_out = killed_for_a_timeout(report);
                let end = End {
                    counted: !timed_out && !lost_with_its_zygote(report),
                    timed_out,
                };
                supervisor.ended(generation, report, exit_info(report), end);
            }
        }));
    }

    /// The instance of `generation` ended: FAILED, then a restart is
    /// scheduled (or not: past the budget, or the host is shutting down).
    fn ended(self: &Arc<Self>, generation: u64, report: &ExitReport, exit: ExitInfo, end: End) {
        let End { counted, timed_out } = end;
        if self.slot.is_retired() {
            return;
        }
        let policy = *self.policy();
        let clock = &self.supervision.clock;
        let decision = {
            let mut state = self.state.lock();
            if state.generation != generation {
                return;
            }
            state.generation += 1;
            let now = clock.now();
            if now.saturating_duration_since(state.healthy_since) >= policy.healthy_reset {
                state.consecutive = 0;
            }
            // Down from now on: the wait for a restart, and a restart that
            // fails, are no health (a success sets it again).
            state.healthy_since = now;
            while state
                .restarts
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > policy.window)
            {
                state.restarts.pop_front();
            }
            if self.supervision.shutdown.is_set() {
                Err(NoRestart::Shutdown)
            } else if self
                .slot
                .registry
                .retiring_in_flight(&self.slot.name)
                .is_some()
            {
                Err(NoRestart::Retiring)
            } else if counted && state.restarts.len() >= policy.max_restarts as usize {
                Err(NoRestart::Budget)
            } else if timed_out {
                Ok((policy.delay(0), state.generation))
            } else {
                let delay = policy.delay(state.consecutive);
                state.consecutive = state.consecutive.saturating_add(1);
                Ok((delay, state.generation))
            }
        };
        let name = &self.slot.name;
        let registry = &self.slot.registry;
        let reason = match decision {
            Ok(_) => report.reason.clone(),
            Err(NoRestart::Budget) => format!(
                "{}; not restarted: {} restarts within {}",
                report.reason,
                policy.max_restarts,
                fmt_duration(policy.window)
            ),
            Err(NoRestart::Shutdown) => format!(
                "{}; not restarted: the host is shutting down",
                report.reason
            ),
            Err(NoRestart::Retiring) => format!(
                "{}; not restarted: its directory is gone and it is being retired",
                report.reason
            ),
        };
        // Under the slot's lock: a reload that retires the slot meanwhile
        // comes before these writes (which then do not happen) or after
        // them (and writes its own state over them).
        let recorded = self.slot.unless_retired(|| {
            // The retry time in the crash's own write: an observer told of
            // the crash (the server's settling of dependents) never reads
            // the plugin as FAILED for good in between.
            let retry = decision
                .as_ref()
                .ok()
                .map(|(delay, _)| clock.wall() + *delay);
            if registry
                .mark_crashed_until(name, reason.clone(), exit, retry)
                .is_err()
            {
                return false;
            }
            // A shutdown that cleared the retry time before this set it.
            if retry.is_some() && self.supervision.shutdown.is_set() {
                let _ = registry.set_next_retry(name, None);
            }
            true
        });
        if recorded != Some(true) {
            return;
        }
        // A restart the host's stop cut short: no fault of the plugin's,
        // and no ERROR line for every rollout to alert on (as at load).
        if matches!(decision, Err(NoRestart::Shutdown))
            && report.reason.contains(crate::process::HOST_STOPPING)
        {
            tracing::info!(plugin = %name, %reason, "Plugin {name} not restarted: the host is stopping");
        } else if let Ok((delay, _)) = &decision {
            // One ERROR per crash, saying what comes next: a crash that is
            // restarted reads apart from the last one (`not restarted: …`).
            let restarts = self.state.lock().restarts.len();
            let budget = if counted {
                format!(
                    "restarts in the last {}: {restarts} of at most {}",
                    fmt_duration(policy.window),
                    policy.max_restarts
                )
            } else {
                "not counted among its restarts: a call's time limit, or its zygote's end, is no \
                 crash of its own"
                    .to_owned()
            };
            tracing::error!(
                plugin = %name,
                reason = %forgesyte_errors::logged(&reason),
                pid = report.pid,
                restart_in_ms = delay.as_millis() as u64,
                "✗ Plugin FAILED: {name}; restarting it in {} ({budget})",
                fmt_duration(*delay),
            );
        } else {
            tracing::error!(plugin = %name, reason = %forgesyte_errors::logged(&reason), pid = report.pid, "✗ Plugin FAILED: {name}");
        }
        let Ok((delay, generation)) = decision else {
            return;
        };
        let weak = Arc::downgrade(self);
        let cancelled = Box::new({
            let weak = Weak::clone(&weak);
            move || weak.upgrade().is_none_or(|s| s.restarts_stopped())
        });
        let task = Box::new(move || {
            if let Some(supervisor) = weak.upgrade() {
                supervisor.attempt(generation, counted);
            }
        });
        let scheduled =
            clock.run_after(delay, format!("forgesyte-restart-{name}"), cancelled, task);
        if let Err(e) = scheduled {
            tracing::error!(plugin = %name, error = %e, "cannot start the restart thread; {name} stays FAILED");
            // Said in its reason (observers are told: its dependents follow).
            self.slot.unless_retired(|| {
                let _ = registry.set_next_retry(name, None);
                let _ = registry.mark_failed(name, format!("{reason}; {NO_RESTART_THREAD} ({e})"));
            });
        }
    }

    /// One restart: a new runner, construction, the instance swapped in.
    fn attempt(self: &Arc<Self>, generation: u64, counted: bool) {
        let name = &self.slot.name;
        let registry = &self.slot.registry;
        // Held until the new instance is in place, or refused and stopped:
        // a let-go meanwhile waits for it (`cancel_attempt`).
        let _building = self.slot.building();
        if self.restarts_stopped() || self.state.lock().generation != generation {
            return;
        }
        // Refused when someone else moved the plugin (a reload): not ours
        // any more; under the slot's lock, as in `ended`.
        if self.slot.unless_retired(|| registry.mark_restarting(name)) != Some(Ok(())) {
            return;
        }
        let clock = &self.supervision.clock;
        if counted {
            self.state.lock().restarts.push_back(clock.now());
        }
        let count = registry
            .get_status(name)
            .map_or(0, |status| status.restart_count);
        tracing::info!(plugin = %name, restart = count, "Restarting plugin {name} (restart {count})");
        let restart = &self.restart;
        let recheck = || restart.recheck.as_ref().map_or(Ok(()), |recheck| recheck());
        let result = recheck()
            .and_then(|()| {
                restart
                    .importer
                    .open(&restart.library)
                    .map_err(PluginError::from)
            })
            .and_then(|library| {
                // Let go while its runner started: it is not asked to
                // construct the plugin (dropped, it stops).
                if self.slot.is_retired() {
                    return Err(PluginError::from(LoadError::Init(InitError::Failed {
                        message: "let go by the host while it restarted".into(),
                    })));
                }
                library
                    .instantiate(&restart.config)
                    .map_err(PluginError::from)
            })
            // Changed while it started: the new runner is dropped (it stops).
            .and_then(|instance| recheck().map(|()| instance));
        match result {
            Ok(instance) => {
                let instance: Arc<dyn PluginInstance> = Arc::from(instance);
                if instance.tools() != self.slot.current().tools() {
                    tracing::warn!(plugin = %name, "the restarted instance of {name} lists other tools than before: its list is served from now on");
                }
                self.state.lock().healthy_since = clock.now();
                self.watch(&instance);
                // Retired meanwhile: the new runner is let go (dropped, it
                // stops) and the plugin's state is the loader's.
                let mut initialized = false;
                let replaced = self.slot.replace_unless_retired(Arc::clone(&instance), || {
                    let _ = registry.set_confinement(name, instance.confinement());
                    initialized = registry.mark_initialized(name).is_ok();
                });
                match replaced {
                    Ok(()) if initialized => {
                        tracing::info!(plugin = %name, restart = count, "✓ Restarted plugin: {name}");
                    }
                    Ok(()) => {}
                    // Let go meanwhile: ended before the let-go's waiter
                    // goes on (a reload's runner starts after it).
                    Err(refused) => {
                        refused.stop();
                        let _ = refused.wait_stopped(crate::RUNNER_STOP_WAIT);
                    }
                }
            }
            // The journal keeps what the failure left: a crashed runner's
            // stderr tail, or the traceback of a Python import or
            // constructor that raised.
            Err(error) => {
                let report = report_of(&error);
                let mut exit = exit_info(&report);
                if exit.stderr_tail.is_empty() {
                    exit.stderr_tail = python_traceback(&error);
                }
                // A runner the host could not start for want of its own
                // descriptors or processes is tried again at the capped
                // backoff until they are back: spending the budget on it
                // left the plugin FAILED for good after the pressure went.
                let counted = !matches!(
                    error,
                    PluginError::Load(LoadError::Import(ImportError::HostResources { .. }))
                );
                self.ended(
                    generation,
                    &report,
                    exit,
                    End {
                        counted,
                        timed_out: false,
                    },
                );
            }
        }
    }
}

/// How an instance ended, for its restart.
#[derive(Debug, Clone, Copy)]
struct End {
    /// It spends the restart budget (the plugin's fault).
    counted: bool,
    /// The host killed it for a call's time limit: restarted after the
    /// base delay, the backoff not grown.
    timed_out: bool,
}

/// Whether the host killed the runner because a call ran past its time
/// limit (`KillReason::host` of a `TimeoutError`).
fn killed_for_a_timeout(report: &ExitReport) -> bool {
    matches!(
        &report.crash,
        Some(CrashError { cause: CrashCause::Killed { reason }, .. })
            if reason.starts_with("TimeoutError:")
    )
}

/// Whether the runner ended with the process that forked it (a Python
/// zygote), not by anything of its own that the host saw.
fn lost_with_its_zygote(report: &ExitReport) -> bool {
    matches!(
        &report.crash,
        Some(CrashError {
            cause: CrashCause::Lost { .. },
            ..
        })
    )
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
        Some(CrashCause::OomKilled { .. }) => (Some("SIGKILL".to_owned()), None),
        Some(CrashCause::Exit { code } | CrashCause::ChannelClosed { code }) => (None, Some(*code)),
        _ => (None, None),
    };
    ExitReport {
        reason: error.reason(),
        crash: crash.cloned(),
        signal,
        code,
        pid: None,
        unsent: false,
    }
}

/// The last lines of the traceback of a Python plugin whose import or
/// constructor raised (none for any other error).
pub(crate) fn python_traceback(error: &PluginError) -> Vec<String> {
    match error {
        PluginError::Load(LoadError::Import(ImportError::Python { traceback, .. }))
        | PluginError::Load(LoadError::Init(InitError::Python { traceback, .. })) => {
            traceback.clone()
        }
        _ => Vec::new(),
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
