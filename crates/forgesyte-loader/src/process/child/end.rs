//! A runner's end: letting it go ([`retire`]: its input closed, killed
//! after [`STOP_GRACE`]), killing it for a reason recorded first
//! ([`kill`]), the threads that read its answers and its stderr
//! ([`start_threads`]), and, once its output ends, reaping it and working
//! out what its death reports ([`process_death`]): the exit callbacks run
//! before the calls still waiting are failed.

use std::io::Read;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use forgesyte_errors::{CrashCause, CrashError, PluginError};

use super::super::exit::{classify, oom_kills, signal_name, with_oom_kills};
use super::super::os_process::OsProcess;
use super::super::runners::HOST_STOPPING;
use super::super::stacks::{STUCK_AT_MAX, stuck_at_for_log};
use super::super::watched_pipe::WatchedPipe;
use super::{EXIT_GRACE, KillReason, STDERR_GRACE, STOP_GRACE, Shared, SpawnError};
use crate::host::ExitReport;

/// Lets the process go: no exit callbacks, its stdin closed (the runner
/// exits on its own), killed after [`STOP_GRACE`] if it has not (asked
/// first where its code is, with `stack_signal`, as before a timeout's
/// kill: the log says where its `on_unload` was stuck). Never waits: the
/// grace runs on a thread of its own, and a request being written (to a
/// runner that reads nothing, it holds the writer until its own deadline)
/// is not waited for: the kill ends that write.
pub(super) fn retire(shared: &Arc<Shared>, stack_signal: Option<i32>) {
    shared.retired.store(true, Ordering::SeqCst);
    let closed = shared.transport.close_writer_within(Duration::ZERO);
    if shared.exit.lock().report.is_some() {
        if !closed {
            shared.transport.close_writer();
        }
        return;
    }
    let shared = Arc::clone(shared);
    let stopper = std::thread::Builder::new()
        .name(format!("forgesyte-stop-{}", shared.pid))
        .spawn({
            let shared = Arc::clone(&shared);
            move || {
                // A request being written gets half the grace to end, so
                // the runner still sees its stdin end and exits on its own.
                let closed = closed || shared.transport.close_writer_within(STOP_GRACE / 2);
                // The grace's end is kept for the stack dump, so a stop
                // takes no longer than it did without one.
                if wait_dead(&shared, STOP_GRACE.saturating_sub(STUCK_AT_MAX)).is_none() {
                    let at = stuck_at_for_log(&shared, stack_signal, retired_reason())
                        .map(|at| format!(" (stuck at {at})"))
                        .unwrap_or_default();
                    // Said: otherwise a runner whose `on_unload` held on
                    // (a hook that ignores its own deadline, a C call
                    // holding the GIL) vanished from the log without a word.
                    tracing::warn!(
                        plugin = %shared.plugin,
                        pid = shared.pid,
                        "plugin process {} of {} did not exit within {} s of its input's end \
                         (its on_unload still running?); killed{at}",
                        shared.pid,
                        shared.plugin,
                        STOP_GRACE.as_secs()
                    );
                    kill(&shared, retired_reason());
                }
                if !closed {
                    shared.transport.close_writer();
                }
            }
        });
    if stopper.is_err() {
        kill(&shared, retired_reason());
        if !closed {
            shared.transport.close_writer();
        }
    }
}

fn retired_reason() -> KillReason {
    KillReason {
        cause: CrashCause::Killed {
            reason: "retired by the host".into(),
        },
        registry_reason: None,
        provisional: false,
    }
}

pub(in crate::process) fn wait_dead(shared: &Shared, timeout: Duration) -> Option<Arc<ExitReport>> {
    let deadline = Instant::now() + timeout;
    let mut exit = shared.exit.lock();
    while exit.report.is_none() {
        if shared.exited.wait_until(&mut exit, deadline).timed_out() {
            break;
        }
    }
    exit.report.clone()
}

pub(super) fn start_threads(
    shared: &Arc<Shared>,
    stdout: impl Read + std::os::fd::AsFd + Send + 'static,
    stderr: impl Read + Send + 'static,
) -> Result<(), SpawnError> {
    let stdout = WatchedPipe::new(stdout, shared.pid);
    let for_stderr = Arc::clone(&shared.stderr);
    let stderr_thread = std::thread::Builder::new()
        .name(format!("forgesyte-stderr-{}", shared.pid))
        .spawn(move || for_stderr.read(stderr));
    let for_reader = Arc::clone(shared);
    let reader_thread = std::thread::Builder::new()
        .name(format!("forgesyte-reader-{}", shared.pid))
        .spawn(move || read_answers(&for_reader, stdout));
    match (stderr_thread, reader_thread) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(e), Ok(_)) => {
            // The reader reaps it once its output ends.
            kill(shared, retired_reason());
            Err(SpawnError::Start(e))
        }
        (_, Err(e)) => {
            // No reader to reap it: reaped here, else a zombie for good.
            kill(shared, retired_reason());
            let _ = shared.process.lock().wait();
            Err(SpawnError::Start(e))
        }
    }
}

/// Kills the process and its group, recording why first (the first reason
/// wins). A process that has ended already is left as it is, its death
/// reported for what it was: a crash stays a crash, even if a timeout
/// fires just after.
pub(in crate::process) fn kill(shared: &Shared, reason: KillReason) {
    kill_locked(shared, &mut shared.process.lock(), reason);
}

/// [`kill`] that waits 10 ms at most for the process's lock: held longer,
/// the reaper holds it, waiting for a death it has already asked for
/// (`SIGKILL` sent: a process stuck in the kernel can take long to die),
/// and the kill is left to it. For whoever must not block on a death: a
/// task, a stopping host.
pub(in crate::process) fn kill_unless_reaping(shared: &Shared, reason: KillReason) {
    if let Some(mut process) = shared.process.try_lock_for(Duration::from_millis(10)) {
        kill_locked(shared, &mut process, reason);
    }
}

pub(in crate::process) fn kill_locked(
    shared: &Shared,
    process: &mut OsProcess,
    reason: KillReason,
) {
    if process.is_running() {
        let mut recorded = shared.kill_reason.lock();
        if recorded.as_ref().is_none_or(|r| r.provisional) {
            *recorded = Some(reason);
        }
    }
    process.kill();
}

/// The reader thread: routes answers until the stream ends or breaks, then
/// processes the death.
fn read_answers(shared: &Arc<Shared>, mut stdout: impl Read) {
    // The pipe stays open until the runner is killed: closed first, a
    // runner blocked writing an answer over the limit would end of the
    // closed pipe (exit 0) before the kill, and the violation would be
    // lost (its death read "exited with code 0").
    if let Some(detail) = shared.transport.read_answers(&mut stdout) {
        kill(
            shared,
            KillReason {
                cause: CrashCause::Protocol { detail },
                registry_reason: None,
                provisional: false,
            },
        );
    } else {
        // Its answers ended (it exited, or plugin code closed or replaced
        // its answer descriptor): its requests end too, so that a runner
        // whose reader is blocked on them wakes, finds its descriptors
        // changed and says so (exit 74) within the grace below. A request
        // being written (its caller preempted just after its write, say)
        // closes them as soon as it is done.
        shared.transport.close_writer_when_free();
    }
    drop(stdout);
    let status = reap(shared);
    process_death(shared, status);
}

/// Waits for the process to end; one that closed its protocol pipe but
/// keeps running is killed after a grace period.
fn reap(shared: &Shared) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + EXIT_GRACE;
    loop {
        match shared.process.lock().try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    kill(
        shared,
        KillReason {
            cause: CrashCause::Protocol {
                detail: "closed its end of the protocol but kept running (plugin code that \
                         closes file descriptors it did not open?)"
                    .into(),
            },
            registry_reason: None,
            provisional: false,
        },
    );
    shared.process.lock().wait()
}

/// Works out why the process ended, publishes the report, runs the exit
/// callbacks, then fails every request still waiting.
fn process_death(shared: &Shared, status: std::io::Result<ExitStatus>) {
    // The last lines (the abort message, the allocation failure) arrive just
    // as the process dies.
    let stderr_tail = shared.stderr.tail_after(STDERR_GRACE);
    let kill_reason = shared.kill_reason.lock().take();
    let (cause, registry_reason) = match kill_reason {
        Some(k) => (k.cause, k.registry_reason),
        None => match &status {
            Ok(status) => (
                with_oom_kills(
                    classify(*status, shared.memory_limit_mib, &stderr_tail),
                    shared.oom_kills_at_start,
                    oom_kills(),
                ),
                None,
            ),
            Err(e) => (
                CrashCause::Lost {
                    detail: e.to_string(),
                },
                None,
            ),
        },
    };
    let status = status.ok();
    let retired = shared.retired.load(Ordering::SeqCst);
    // Ended by the host's stop (a construction a shutdown cut off): no
    // fault, and no ERROR line for every rollout to alert on.
    let stopping = matches!(&cause, CrashCause::Killed { reason } if reason == HOST_STOPPING);
    // Classified on the whole tail, reported as the host's policy says.
    let stderr_tail = shared.stderr.for_report(stderr_tail, retired || stopping);
    let crash = CrashError { cause, stderr_tail };
    let reason = registry_reason.unwrap_or_else(|| PluginError::Crash(crash.clone()).reason());
    let report = Arc::new(ExitReport {
        reason,
        signal: status
            .and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s))
            .map(signal_name),
        code: status.and_then(|s| s.code()),
        crash: Some(crash.clone()),
        pid: Some(shared.pid),
        unsent: false,
    });
    if retired {
        tracing::debug!(plugin = %shared.plugin, pid = shared.pid, "plugin process {} ended", shared.pid);
    } else if stopping {
        tracing::info!(plugin = %shared.plugin, pid = shared.pid, "plugin process {} of {} ended: {HOST_STOPPING}", shared.pid, shared.plugin);
    } else {
        // Said at ERROR once, by whoever records it: the load pass (a
        // construction), the supervisor (a crash), each with the reason
        // and the stderr tail. (A runner that reported its import failed
        // exits 0 by design; this line called that a crash.)
        tracing::debug!(
            plugin = %shared.plugin,
            pid = shared.pid,
            reason = %report.reason,
            "plugin process {} of {} ended: {}",
            shared.pid,
            shared.plugin,
            crash
        );
    }
    // Callbacks first (the supervisor marks the plugin FAILED there), then
    // the report is published: whoever waits for the death (a caller that
    // killed the process) sees its consequences. A callback registered
    // meanwhile is run in the next round.
    loop {
        let callbacks = {
            let mut exit = shared.exit.lock();
            if exit.callbacks.is_empty() {
                exit.report = Some(Arc::clone(&report));
                break;
            }
            std::mem::take(&mut exit.callbacks)
        };
        if !retired {
            for callback in callbacks {
                callback(&report);
            }
        }
    }
    shared.exited.notify_all();
    shared.died.notify_waiters();
    shared.transport.fail_all(&for_calls(shared, report));
}

/// What the calls in flight of a runner are told of its end: a runner the
/// host let go (a reload, a rescan, the host's stop) that ended as let go
/// (it exited with code 0 once its input closed, or the host killed it)
/// ended no call by a crash of its own: its report then carries none (the
/// calls are `Stopped`). One that crashed in its last moments (a signal,
/// its memory limit, an exit code) did.
fn for_calls(shared: &Shared, report: Arc<ExitReport>) -> Arc<ExitReport> {
    let let_go = shared.retired.load(Ordering::SeqCst)
        && report.crash.as_ref().is_some_and(|crash| {
            matches!(
                crash.cause,
                CrashCause::Exit { code: 0 } | CrashCause::Killed { .. }
            )
        });
    if !let_go {
        return report;
    }
    Arc::new(ExitReport {
        crash: None,
        ..(*report).clone()
    })
}
