//! Supervision on a fake clock: fake "processes" that the test crashes, a
//! fake runner that starts them (and can fail to), and time that moves
//! only when the test advances it. No test sleeps.

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};
use forgesyte_errors::{IntegrityError, ToolError};
use forgesyte_registry::{PluginInfo, PluginLifecycleState as S, PluginStatus, Registry};

use super::clock::FakeClock;
use super::*;
use crate::host::{ExitCallback, PluginLibrary, ToolInfo};

const NAME: &str = "flaky";
const MS: Duration = Duration::from_millis(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What one fake process shares with the test.
#[derive(Default)]
struct ProcessState {
    on_exit: Mutex<Option<ExitCallback>>,
}

impl std::fmt::Debug for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessState")
            .field("watched", &self.on_exit.lock().is_some())
            .finish()
    }
}

/// An isolated instance whose "process" ends when the test says so.
#[derive(Debug)]
struct FakeProcess {
    pid: u32,
    tools: Vec<ToolInfo>,
    state: Arc<ProcessState>,
}

impl PluginInstance for FakeProcess {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn call(&self, _tool: &str, _args: &[u8]) -> Result<Vec<u8>, ToolError> {
        Ok(b"null".to_vec())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn on_exit(&self, callback: ExitCallback) -> bool {
        *self.state.on_exit.lock() = Some(callback);
        true
    }
}

/// Starts fake processes; records the fake time of every attempt; fails
/// the next `fail_next` starts (a Python constructor that raised with
/// `raise_next`).
#[derive(Debug)]
struct FakeRunner {
    clock: Arc<FakeClock>,
    /// (fake time, pid, the process) per successful start.
    started: Mutex<Vec<(Duration, u32, Arc<ProcessState>)>>,
    /// Fake time of every start, failed ones included.
    attempts: Mutex<Vec<Duration>>,
    fail_next: AtomicU32,
    /// The next this many starts fail for want of the host's resources
    /// (before any attempt is recorded: the runner never started).
    short_next: AtomicU32,
    raise_next: std::sync::atomic::AtomicBool,
    /// While set, the next start says so on its sender and waits (10 s at
    /// most) for its receiver: [`Importer::stop_starting`] ends the wait,
    /// and the start fails ("killed").
    gate: Mutex<Option<Gate>>,
    /// What ends a gated start's wait.
    stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Set by a start as it returns.
    returned: std::sync::atomic::AtomicBool,
}

/// See [`FakeRunner::gate`].
#[derive(Debug)]
struct Gate {
    entered: std::sync::mpsc::Sender<()>,
    stopped: std::sync::mpsc::Receiver<()>,
}

#[derive(Debug)]
struct FakeRunnerLibrary(Arc<FakeRunner>);

#[derive(Debug)]
struct FakeRunnerImporter(Arc<FakeRunner>);

impl Importer for FakeRunnerImporter {
    fn open(&self, _path: &std::path::Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        let short = self
            .0
            .short_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if short {
            return Err(ImportError::HostResources {
                what: "the Python interpreter /usr/bin/python3".into(),
                detail: "the server is out of file descriptors".into(),
            });
        }
        Ok(Arc::new(FakeRunnerLibrary(Arc::clone(&self.0))))
    }

    fn stop_starting(&self) {
        self.0.stop.lock().take();
    }
}

impl PluginLibrary for FakeRunnerLibrary {
    fn instantiate(&self, _config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError> {
        let runner = &self.0;
        let now = runner.clock.elapsed();
        runner.attempts.lock().push(now);
        let gate = runner.gate.lock().take();
        if let Some(gate) = gate {
            gate.entered.send(()).unwrap();
            let waited = gate.stopped.recv_timeout(Duration::from_secs(10));
            if waited != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                runner.returned.store(true, Ordering::SeqCst);
                return Err(InitError::Failed {
                    message: "killed".into(),
                });
            }
        }
        let _returned = Returned(&runner.returned);
        let failing = runner
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing && runner.raise_next.load(Ordering::SeqCst) {
            return Err(InitError::Python {
                error_type: "OSError".into(),
                message: "weights not ready".into(),
                traceback: vec![
                    "Traceback (most recent call last):".into(),
                    "OSError: weights not ready".into(),
                ],
            });
        }
        if failing {
            return Err(InitError::Failed {
                message: "weights not ready".into(),
            });
        }
        let mut started = runner.started.lock();
        let pid = 100 + u32::try_from(started.len()).unwrap_or(u32::MAX);
        let state = Arc::new(ProcessState::default());
        started.push((now, pid, Arc::clone(&state)));
        Ok(Box::new(FakeProcess {
            pid,
            tools: Vec::new(),
            state,
        }))
    }
}

/// Sets its flag when dropped (a start returned).
struct Returned<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Returned<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One supervised plugin on a fake clock.
struct Harness {
    clock: Arc<FakeClock>,
    runner: Arc<FakeRunner>,
    registry: Registry,
    slot: Arc<Slot>,
    supervisor: Option<Arc<Supervisor>>,
    shutdown: ShutdownFlag,
    crashes: u32,
}

impl Harness {
    /// `flaky`, INITIALIZED in its first process at fake time 0.
    fn new(policy: SupervisionPolicy) -> Self {
        Self::with_recheck(policy, None)
    }

    /// [`Harness::new`], its restarts checking the files with `recheck`.
    fn with_recheck(policy: SupervisionPolicy, recheck: Option<Recheck>) -> Self {
        let clock = FakeClock::new();
        let runner = Arc::new(FakeRunner {
            clock: Arc::clone(&clock),
            started: Mutex::new(Vec::new()),
            attempts: Mutex::new(Vec::new()),
            fail_next: AtomicU32::new(0),
            short_next: AtomicU32::new(0),
            raise_next: std::sync::atomic::AtomicBool::new(false),
            gate: Mutex::new(None),
            stop: Mutex::new(None),
            returned: std::sync::atomic::AtomicBool::new(false),
        });
        let registry = Registry::new();
        registry.register(NAME, PluginInfo::default()).unwrap();
        let first = FakeRunnerLibrary(Arc::clone(&runner))
            .instantiate(&[])
            .unwrap();
        registry.mark_initialized(NAME).unwrap();
        let slot = Arc::new(Slot::new(NAME.into(), registry.clone(), Arc::from(first)));
        let shutdown = ShutdownFlag::default();
        let supervisor = Supervisor::start(
            Arc::clone(&slot),
            Restart {
                importer: Arc::new(FakeRunnerImporter(Arc::clone(&runner))),
                library: "/plugins/flaky/lib.so".into(),
                config: Vec::new(),
                recheck,
            },
            Supervision {
                policy,
                clock: clock.clone(),
                shutdown: shutdown.clone(),
            },
        );
        Harness {
            clock,
            runner,
            registry,
            slot,
            supervisor: Some(supervisor),
            shutdown,
            crashes: 0,
        }
    }

    /// Ends the current process with a crash report `CrashError: boom N`.
    fn crash(&mut self) {
        self.crashes += 1;
        self.end_with(&ExitReport {
            reason: format!("CrashError: boom {}", self.crashes),
            crash: None,
            signal: Some("SIGSEGV".into()),
            code: None,
            pid: None,
            unsent: false,
        });
    }

    /// Ends the current process with `report`.
    fn end_with(&self, report: &ExitReport) {
        let state = Arc::clone(&self.runner.started.lock().last().unwrap().2);
        let callback = state.on_exit.lock().take();
        let callback = callback.expect("the current process is watched");
        callback(report);
    }

    fn status(&self) -> PluginStatus {
        self.registry.get_status(NAME).unwrap()
    }

    fn starts(&self) -> Vec<Duration> {
        self.runner.started.lock().iter().map(|s| s.0).collect()
    }

    fn attempts(&self) -> Vec<Duration> {
        self.runner.attempts.lock().clone()
    }

    /// The registry's `next_retry_at` for a restart due `at` (fake time).
    fn retry_at(&self, at: Duration) -> Option<String> {
        let wall = DateTime::<Utc>::from(self.clock.wall_at(at));
        Some(wall.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    /// `restarts` crashes, each restarted after `delay` (the budget still
    /// allows them), then one more, which leaves the plugin FAILED for
    /// good: the budget is spent.
    fn spend_the_budget(&mut self, restarts: usize, delay: Duration) {
        for _ in 0..restarts {
            self.crash();
            self.clock.advance(delay);
            assert_eq!(self.status().state, S::Initialized);
        }
        self.crash();
        self.clock.advance(delay);
        let status = self.status();
        assert_eq!(
            (status.state, status.next_retry_at.as_deref()),
            (S::Failed, None),
            "{status:?}"
        );
    }

    /// Crashes the plugin and checks that exactly one restart waits, due
    /// `delay` from now, and that nothing happens until it is due; then
    /// lets it come due and checks the plugin is back up. Returns the
    /// delay observed between the crash and the new process.
    fn crash_and_restart(&mut self, delay: Duration) -> Duration {
        let crashed_at = self.clock.elapsed();
        let starts = self.starts().len();
        self.crash();
        let status = self.status();
        assert_eq!(status.state, S::Failed, "{status:?}");
        let reason = status.reason.clone().unwrap_or_default();
        assert_eq!(reason, format!("CrashError: boom {}", self.crashes));
        assert_eq!(status.next_retry_at, self.retry_at(crashed_at + delay));
        assert_eq!(self.clock.waiting(), [crashed_at + delay]);

        self.clock.advance(delay - MS);
        assert_eq!(self.status().state, S::Failed, "restarted early");
        assert_eq!(self.starts().len(), starts);

        self.clock.advance(MS);
        let status = self.status();
        assert_eq!(status.state, S::Initialized, "{status:?}");
        assert_eq!(status.next_retry_at, None);
        assert!(self.clock.waiting().is_empty());
        let started = self.runner.started.lock();
        let (at, pid, _) = started.last().unwrap();
        assert_eq!(started.len(), starts + 1);
        assert_eq!(self.slot.current().pid(), Some(*pid), "instance swapped");
        *at - crashed_at
    }
}

#[test]
fn restarts_follow_the_policy_exactly_on_a_fake_clock() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: ms(500),
        healthy_reset: Duration::from_secs(3600),
        max_restarts: 5,
        window: Duration::from_secs(3600),
    };
    let mut h = Harness::new(policy);
    let mut delays = Vec::new();
    for (round, expected) in [100, 200, 400, 500, 500].into_iter().enumerate() {
        delays.push(h.crash_and_restart(ms(expected)));
        assert_eq!(h.status().restart_count, round as u64 + 1);
        // Up for a while (less than the healthy reset) before the next crash.
        h.clock.advance(ms(7));
    }
    // Initial delay, doubling, capped: exactly, to the millisecond.
    assert_eq!(delays, [ms(100), ms(200), ms(400), ms(500), ms(500)]);

    // The sixth crash is past the budget: FAILED for good, nothing waits.
    h.crash();
    let status = h.status();
    assert_eq!(
        (status.state, status.next_retry_at.as_deref()),
        (S::Failed, None)
    );
    assert_eq!(
        status.reason.as_deref(),
        Some("CrashError: boom 6; not restarted: 5 restarts within 3600 s")
    );
    assert!(h.clock.waiting().is_empty());
    h.clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(h.starts().len(), 6, "first process and five restarts");
    assert_eq!(h.status().state, S::Failed);
}

#[test]
fn a_plugin_up_for_the_healthy_reset_starts_again_from_the_base_delay() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: Duration::from_secs(10),
        healthy_reset: Duration::from_secs(1),
        max_restarts: 10,
        window: Duration::from_secs(3600),
    };
    let mut h = Harness::new(policy);
    assert_eq!(h.crash_and_restart(ms(100)), ms(100));
    assert_eq!(h.crash_and_restart(ms(200)), ms(200));
    // Up 1 ms short of the healthy reset: the series goes on.
    h.clock.advance(Duration::from_secs(1) - MS);
    assert_eq!(h.crash_and_restart(ms(400)), ms(400));
    // Up exactly the healthy reset: back to the base delay.
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.crash_and_restart(ms(100)), ms(100));
}

#[test]
fn restarts_are_counted_in_a_sliding_window() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: ms(100),
        healthy_reset: Duration::from_secs(3600),
        max_restarts: 2,
        window: Duration::from_secs(10),
    };
    for (extra, restarted) in [(Duration::ZERO, false), (MS, true)] {
        let mut h = Harness::new(policy);
        h.crash_and_restart(ms(100)); // restart 1 at 100 ms
        h.crash_and_restart(ms(100)); // restart 2 at 200 ms
        // The first restart is now exactly `window` old, plus `extra`.
        h.clock.advance(Duration::from_secs(10) - ms(100) + extra);
        if restarted {
            assert_eq!(h.crash_and_restart(ms(100)), ms(100));
            assert_eq!(h.status().restart_count, 3);
        } else {
            h.crash();
            let status = h.status();
            assert_eq!(status.state, S::Failed);
            assert!(
                status
                    .reason
                    .as_deref()
                    .unwrap_or_default()
                    .ends_with("not restarted: 2 restarts within 10 s"),
                "{status:?}"
            );
            assert!(h.clock.waiting().is_empty());
        }
    }
}

#[test]
fn a_failed_restart_counts_as_another_crash() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: Duration::from_secs(1),
        healthy_reset: Duration::from_secs(3600),
        max_restarts: 5,
        window: Duration::from_secs(3600),
    };
    let mut h = Harness::new(policy);
    h.runner.fail_next.store(2, Ordering::SeqCst);
    h.crash();
    h.clock.advance(ms(100));
    let status = h.status();
    assert_eq!(status.state, S::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("InitError: weights not ready")
    );
    assert_eq!(status.next_retry_at, h.retry_at(ms(300)));
    h.clock.advance(Duration::from_secs(5));
    // Attempts at 100, 100 + 200 and 300 + 400 ms; the third one holds.
    assert_eq!(h.attempts(), [ms(0), ms(100), ms(300), ms(700)]);
    assert_eq!(h.starts(), [ms(0), ms(700)]);
    let status = h.status();
    assert_eq!((status.state, status.restart_count), (S::Initialized, 3));
}

/// A restart whose Python constructor raised: its journal entry keeps the
/// traceback's last lines, and the status how the process last ended (the
/// crash's), not nothing.
#[test]
fn a_failed_restart_keeps_its_traceback_and_the_last_exit() {
    let h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    });
    h.runner.fail_next.store(1, Ordering::SeqCst);
    h.runner.raise_next.store(true, Ordering::SeqCst);
    let state = Arc::clone(&h.runner.started.lock().last().unwrap().2);
    let callback = state.on_exit.lock().take().unwrap();
    callback(&ExitReport {
        reason: "CrashError: exited with code 3".into(),
        crash: Some(CrashError {
            cause: CrashCause::Exit { code: 3 },
            stderr_tail: vec!["bye".into()],
        }),
        signal: None,
        code: Some(3),
        pid: None,
        unsent: false,
    });
    h.clock.advance(ms(100));
    let status = h.status();
    assert_eq!(status.state, S::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("InitError: OSError: weights not ready")
    );
    assert_eq!(
        status.last_exit_reason.as_deref(),
        Some("exited with code 3")
    );
    let journal = h.registry.journal(NAME).unwrap();
    let last = journal.last().unwrap();
    assert_eq!(
        last.stderr_tail,
        [
            "Traceback (most recent call last):",
            "OSError: weights not ready"
        ],
        "{journal:#?}"
    );
}

/// Ends of `report`'s kind back off (at the 100 ms of this policy) and are
/// restarted however many come, but do not spend the restart budget, which
/// crashes still spend.
fn back_off_without_spending_the_budget(report: &ExitReport) {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: ms(100),
        healthy_reset: Duration::from_secs(3600),
        max_restarts: 2,
        window: Duration::from_secs(3600),
    });
    for round in 0..5 {
        h.end_with(report);
        assert_eq!(
            h.status().next_retry_at,
            h.retry_at(h.clock.elapsed() + ms(100))
        );
        h.clock.advance(ms(100));
        assert_eq!(h.status().state, S::Initialized, "round {round}");
    }
    h.spend_the_budget(2, ms(100));
}

/// A runner the host killed because a call ran past its time limit is
/// restarted, but does not spend the restart budget: any client's slow
/// input left the plugin FAILED for good after six. (Its delay: see
/// `timeouts_restart_after_the_base_delay_however_many_in_a_row`.)
#[test]
fn timeouts_are_restarted_but_do_not_spend_the_restart_budget() {
    back_off_without_spending_the_budget(&timed_out());
}

/// The end of a runner the host killed for a call's time limit.
fn timed_out() -> ExitReport {
    let reason = "TimeoutError: timed out after 1 s during tool 'slow'";
    ExitReport {
        reason: format!("CrashError: killed by the host: {reason}"),
        crash: Some(CrashError {
            cause: CrashCause::Killed {
                reason: reason.into(),
            },
            stderr_tail: Vec::new(),
        }),
        signal: Some("SIGKILL".into()),
        code: None,
        pid: None,
        unsent: false,
    }
}

/// Timeouts in a row do not grow the backoff: each restart comes after the
/// base delay (a slow request a minute kept a plugin down most of the time
/// at the capped delay), and a crash after them starts from the base.
#[test]
fn timeouts_restart_after_the_base_delay_however_many_in_a_row() {
    let timed_out = timed_out();
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: ms(800),
        healthy_reset: Duration::from_secs(3600),
        max_restarts: 5,
        window: Duration::from_secs(3600),
    });
    for round in 0..6 {
        h.end_with(&timed_out);
        assert_eq!(
            h.status().next_retry_at,
            h.retry_at(h.clock.elapsed() + ms(100)),
            "round {round}"
        );
        h.clock.advance(ms(100));
        assert_eq!(h.status().state, S::Initialized, "round {round}");
    }
    h.crash();
    assert_eq!(
        h.status().next_retry_at,
        h.retry_at(h.clock.elapsed() + ms(100))
    );
}

/// A runner lost with its Python zygote (killed, or dead of its own) is
/// restarted with the backoff, but does not spend the restart budget: each
/// zygote death spent a restart of every Python plugin at once, and five
/// left them all FAILED for good.
#[test]
fn runners_lost_with_their_zygote_do_not_spend_the_restart_budget() {
    back_off_without_spending_the_budget(&ExitReport {
        reason: "CrashError: lost: its Python zygote (pid 7) exited".into(),
        crash: Some(CrashError {
            cause: CrashCause::Lost {
                detail: "its Python zygote (pid 7) exited".into(),
            },
            stderr_tail: Vec::new(),
        }),
        signal: None,
        code: None,
        pid: None,
        unsent: false,
    });
}

/// Restarts the host could not start for want of its own descriptors or
/// processes back off to the cap and go on until the resources are back:
/// they spent the budget, and the plugin stayed FAILED for good after the
/// pressure went. Its own crashes still spend it.
#[test]
fn restarts_the_host_could_not_start_do_not_spend_the_restart_budget() {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: ms(400),
        healthy_reset: Duration::from_secs(3600),
        max_restarts: 2,
        window: Duration::from_secs(3600),
    });
    h.runner.short_next.store(6, Ordering::SeqCst);
    h.crash();
    // Tries at 100, 300, 700, 1100, 1500, 1900 ms fail (six, with a
    // budget of two); 2300 ms holds.
    for _ in 0..5 {
        h.clock.advance(ms(400));
        let status = h.status();
        assert_eq!(status.state, S::Failed, "{status:?}");
        assert!(status.next_retry_at.is_some(), "{status:?}");
        assert_eq!(
            status.reason.as_deref(),
            Some(
                "ImportError: cannot start the Python interpreter /usr/bin/python3: the server \
                 is out of file descriptors"
            )
        );
    }
    h.clock.advance(ms(400));
    let status = h.status();
    assert_eq!(status.state, S::Initialized, "{status:?}");
    // The budget spent by the first crash's restart only (one of two):
    // one crash more restarts, the next is FAILED for good.
    h.spend_the_budget(1, ms(400));
}

/// The streak starts again after a plugin was up for the healthy reset,
/// but the wait for a restart is no health: restarts that fail after a
/// crash of a long-healthy plugin still double their delay.
#[test]
fn failed_restarts_of_a_long_healthy_plugin_still_back_off() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: Duration::from_secs(10),
        healthy_reset: Duration::from_secs(1),
        max_restarts: 10,
        window: Duration::from_secs(3600),
    };
    let mut h = Harness::new(policy);
    // Up past the healthy reset, then it crashes, and 3 restarts fail.
    h.clock.advance(Duration::from_secs(5));
    h.runner.fail_next.store(3, Ordering::SeqCst);
    h.crash();
    h.clock.advance(Duration::from_secs(5));
    // The first start, then attempts 100, 100 + 200, 300 + 400 and
    // 700 + 800 ms after the crash at 5 s; the fourth one holds.
    assert_eq!(
        h.attempts(),
        [ms(0), ms(5100), ms(5300), ms(5700), ms(6500)]
    );
    assert_eq!(h.status().state, S::Initialized);
}

#[test]
fn a_restart_checks_the_files_before_and_after_it_starts_a_runner() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        backoff_cap: ms(100),
        ..SupervisionPolicy::default()
    };
    // Each check answers the next of `plan` (then passes): a file changed.
    let plan = Arc::new(Mutex::new(VecDeque::<bool>::new()));
    let recheck: Recheck = {
        let plan = Arc::clone(&plan);
        Arc::new(move || match plan.lock().pop_front() {
            Some(false) => Err(IntegrityError::ChangedSinceCheck {
                subject: "plugin.py".into(),
                detail: "sha256 now 00, signed 11".into(),
            }
            .into()),
            _ => Ok(()),
        })
    };
    let mut h = Harness::with_recheck(policy, Some(recheck));
    // Files unchanged: restarted as usual.
    h.crash_and_restart(ms(100));
    // Changed before the restart: no runner starts, the plugin stays
    // FAILED with the reason.
    plan.lock().push_back(false);
    h.crash();
    h.clock.advance(ms(100));
    assert_eq!(h.starts().len(), 2, "a runner started for changed files");
    let status = h.status();
    assert_eq!(status.state, S::Failed, "{status:?}");
    assert!(
        status
            .reason
            .clone()
            .unwrap_or_default()
            .contains("plugin.py changed"),
        "{status:?}"
    );
    // Changed while the runner started: it is let go, never put in place.
    let before = h.slot.current().pid();
    plan.lock().extend([true, false]);
    h.clock.advance(ms(100));
    assert_eq!(h.starts().len(), 3, "the runner started");
    assert_eq!(
        h.slot.current().pid(),
        before,
        "the runner was put in place"
    );
    assert_eq!(h.status().state, S::Failed);
    // Unchanged again: the next restart holds.
    h.clock.advance(ms(100));
    assert_eq!(h.status().state, S::Initialized);
    assert_eq!(h.starts().len(), 4);
}

/// The load pass records the first construction INITIALIZED once its
/// whole wave is constructed; a runner that ended meanwhile is its
/// supervisor's: the load pass writes nothing, and does not mark a plugin
/// INITIALIZED whose restart is building a runner, the dead one still in
/// the slot.
#[test]
fn a_load_pass_leaves_the_state_of_a_runner_that_ended_to_its_supervisor() {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    });
    let supervisor = h.supervisor.clone().unwrap();
    let handle = crate::PluginHandle::isolated(Arc::clone(&h.slot), ms(1000), supervisor);
    h.crash();
    // The restart's first step (FAILED -> LOADED) while it builds a runner.
    h.registry.mark_restarting(NAME).unwrap();
    assert_eq!(h.status().state, S::Loaded);
    assert!(handle.mark_first_initialized().is_none());
    assert_eq!(h.status().state, S::Loaded, "left to the restart");
    // A runner that never ended is the load pass's to record.
    let h = Harness::new(SupervisionPolicy::default());
    let handle =
        crate::PluginHandle::isolated(Arc::clone(&h.slot), ms(1000), h.supervisor.clone().unwrap());
    assert!(handle.mark_first_initialized().is_some());
}

#[test]
fn a_retired_or_dropped_plugin_is_not_restarted() {
    let policy = SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    };
    // Retired while a restart waits.
    let mut h = Harness::new(policy);
    h.crash();
    assert_eq!(h.clock.waiting(), [ms(100)]);
    h.slot.retire();
    h.clock.advance(Duration::from_secs(1));
    assert_eq!((h.clock.cancelled(), h.attempts().len()), (1, 1));
    assert_eq!(h.status().state, S::Failed);

    // Every handle (and so the supervisor) gone while a restart waits.
    let mut h = Harness::new(policy);
    h.crash();
    h.supervisor = None;
    h.clock.advance(Duration::from_secs(1));
    assert_eq!((h.clock.cancelled(), h.attempts().len()), (1, 1));
}

/// A plugin let go (a reload) while a restart builds its runner: the
/// runner is killed and the restart has ended when the let-go returns, so
/// the reload's own runner never starts beside it.
#[test]
fn a_restart_under_way_ends_before_the_let_go_returns() {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    });
    let supervisor = h.supervisor.clone().unwrap();
    let handle = crate::PluginHandle::isolated(Arc::clone(&h.slot), ms(1000), supervisor);
    let (entered, building) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel();
    *h.runner.gate.lock() = Some(Gate { entered, stopped });
    *h.runner.stop.lock() = Some(stop);
    h.runner.returned.store(false, Ordering::SeqCst);
    h.crash();
    let clock = Arc::clone(&h.clock);
    let restarting = std::thread::spawn(move || clock.advance(Duration::from_secs(1)));
    building
        .recv_timeout(Duration::from_secs(10))
        .expect("the restart builds its runner");
    let last = handle.retire();
    assert!(
        h.runner.returned.load(Ordering::SeqCst),
        "the let-go returned while the restart still built its runner"
    );
    restarting.join().unwrap();
    assert_eq!(last.pid(), Some(100), "the dead first process");
    assert_eq!(h.starts().len(), 1, "no second process");
    assert_eq!(h.attempts().len(), 2);
}

#[test]
fn a_plugin_a_rescan_retires_is_not_restarted_while_its_calls_are_waited_for() {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    });
    // A rescan found its directory gone: out of the registry's list, its
    // calls in flight waited for before the slot is retired.
    h.registry.retire(NAME).unwrap();
    h.crash();
    // (Its state is no longer readable: a retiring plugin is out of the
    // list. What shows is that no restart waits, or ever runs.)
    assert!(h.clock.waiting().is_empty(), "nothing scheduled");
    h.clock.advance(Duration::from_secs(3600));
    assert_eq!(h.attempts(), [ms(0)], "never restarted");
}

#[test]
fn once_the_host_shuts_down_an_exit_is_recorded_but_never_restarted() {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    });
    h.shutdown.set();
    h.crash();
    let status = h.status();
    assert_eq!(
        (status.state, status.next_retry_at.as_deref()),
        (S::Failed, None)
    );
    assert_eq!(
        status.reason.as_deref(),
        Some("CrashError: boom 1; not restarted: the host is shutting down")
    );
    let journal = h.registry.journal(NAME).unwrap();
    let last = journal.last().unwrap();
    assert_eq!(
        (last.state, last.exit_signal.as_deref()),
        (S::Failed, Some("SIGSEGV"))
    );
    assert!(h.clock.waiting().is_empty(), "nothing scheduled");
    h.clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(h.attempts(), [ms(0)], "never restarted");
    assert_eq!(h.status().restart_count, 0);
}

#[test]
fn shutting_down_drops_a_restart_that_waits() {
    let mut h = Harness::new(SupervisionPolicy {
        backoff_base: ms(100),
        ..SupervisionPolicy::default()
    });
    h.crash();
    assert_eq!(h.status().next_retry_at, h.retry_at(ms(100)));
    h.clock.advance(ms(50));
    h.shutdown.set();
    if let Some(supervisor) = &h.supervisor {
        supervisor.stop_restarts();
    }
    assert_eq!(h.status().next_retry_at, None);
    h.clock.advance(Duration::from_secs(3600));
    assert_eq!((h.clock.cancelled(), h.attempts().len()), (1, 1));
    let status = h.status();
    assert_eq!((status.state, status.restart_count), (S::Failed, 0));
}

#[test]
fn the_real_clock_runs_a_task_after_its_delay_and_not_when_cancelled() {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    let tx2 = tx.clone();
    SystemClock
        .run_after(
            ms(30),
            "clock-test".into(),
            Box::new(|| false),
            Box::new(move || {
                let _ = tx.send(("ran", started.elapsed()));
            }),
        )
        .unwrap();
    SystemClock
        .run_after(
            ms(0),
            "clock-test-cancelled".into(),
            Box::new(|| true),
            Box::new(move || {
                let _ = tx2.send(("cancelled one ran", Duration::ZERO));
            }),
        )
        .unwrap();
    // Both senders are gone once both threads end: the channel closes.
    let got: Vec<_> = rx.iter().collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "ran");
    assert!(got[0].1 >= ms(30), "ran after {:?}", got[0].1);
}

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
