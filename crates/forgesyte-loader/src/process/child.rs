//! The host side of one runner process: spawning it, the reader thread that
//! routes answers to waiting calls, the stderr thread, and what happens
//! when the process dies.
//!
//! Several requests can be in flight at once: each registers a one-shot
//! channel under a fresh id, the frame is written under the writer lock, and
//! the one reader thread hands each answer to the channel of its id. When
//! the process dies (or is killed), the reader reaps it, works out why, runs
//! the exit callbacks (the supervisor marks the plugin FAILED there), and
//! only then fails every call still waiting — so a caller that gets a crash
//! error already sees the plugin FAILED.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use forgesyte_errors::{CrashCause, CrashError, PluginError, fmt_duration};
use parking_lot::{Condvar, Mutex};

use super::exit::{classify, signal_name};
use super::protocol::{FrameError, HELLO_ID, Request, Response, read_frame, write_frame};
use crate::host::{ExitCallback, ExitReport};

/// Lines of stderr kept for crash reports.
pub(crate) const STDERR_TAIL_LINES: usize = 20;
/// Longest stderr line kept whole (longer ones are split).
const MAX_LINE_BYTES: u64 = 4096;
/// How long a process whose protocol pipe closed may take to exit before
/// it is killed.
const EXIT_GRACE: Duration = Duration::from_millis(300);
/// How long the death report waits for the last stderr lines.
const STDERR_GRACE: Duration = Duration::from_millis(500);
/// How long a caller that killed the process waits for the death to be
/// processed.
pub(crate) const DEATH_SYNC: Duration = Duration::from_secs(5);

/// What a waiting request receives.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The runner's answer.
    Answer(Response),
    /// The process died before answering.
    Died(Arc<ExitReport>),
}

/// Why the host is killing the process, recorded before the signal so the
/// death is reported for what it is rather than as a `SIGKILL`.
#[derive(Debug, Clone)]
pub(crate) struct KillReason {
    /// What the crash report says.
    pub(crate) cause: CrashCause,
    /// What the registry says; `None`: derived from the crash report.
    pub(crate) registry_reason: Option<String>,
}

impl KillReason {
    /// The host kills the process because of `reason` (a registry reason,
    /// e.g. `TimeoutError: timed out after 1 s during tool 'x'`).
    pub(crate) fn host(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        KillReason {
            cause: CrashCause::Killed {
                reason: reason.clone(),
            },
            registry_reason: Some(reason),
        }
    }
}

/// How to start a runner.
#[derive(Debug, Clone)]
pub(crate) struct SpawnOptions<'a> {
    pub(crate) runner: &'a Path,
    pub(crate) runner_args: &'a [std::ffi::OsString],
    pub(crate) library: &'a Path,
    pub(crate) plugin: &'a str,
    pub(crate) memory_limit_mib: u64,
    pub(crate) max_response_bytes: u64,
}

/// Why a runner did not get as far as its hello.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// The runner could not be started at all.
    Start(std::io::Error),
    /// The runner loaded nothing: the library failed its checks.
    Import(Box<super::protocol::WireError>),
    /// The runner died first.
    Died(Arc<ExitReport>),
    /// No hello in time (the process was killed).
    TimedOut,
}

#[derive(Debug, Default)]
struct Waiters {
    closed: bool,
    next_id: u64,
    map: HashMap<u64, SyncSender<Reply>>,
}

#[derive(Default)]
struct ExitState {
    report: Option<Arc<ExitReport>>,
    callbacks: Vec<ExitCallback>,
}

/// What the owner, the reader thread and the stderr thread share.
struct Shared {
    plugin: String,
    pid: u32,
    memory_limit_mib: u64,
    max_response_bytes: u64,
    writer: Mutex<Option<ChildStdin>>,
    waiters: Mutex<Waiters>,
    process: Mutex<std::process::Child>,
    kill_reason: Mutex<Option<KillReason>>,
    exit: Mutex<ExitState>,
    exited: Condvar,
    stderr_tail: Mutex<VecDeque<String>>,
    stderr_done: Mutex<bool>,
    stderr_closed: Condvar,
    retired: AtomicBool,
}

/// A running runner process. Dropping it retires the process (killed, no
/// exit callbacks).
pub(crate) struct Child {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("plugin", &self.shared.plugin)
            .field("pid", &self.shared.pid)
            .finish_non_exhaustive()
    }
}

impl Child {
    /// Starts a runner and waits (at most `timeout`) for its hello.
    pub(crate) fn spawn(opts: &SpawnOptions<'_>, timeout: Duration) -> Result<Child, SpawnError> {
        let mut command = Command::new(opts.runner);
        command
            .args(opts.runner_args)
            .arg("--library")
            .arg(opts.library)
            .arg("--memory-limit-mb")
            .arg(opts.memory_limit_mib.to_string())
            .arg("--plugin")
            .arg(opts.plugin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.memory_limit_mib > 0 {
            // glibc reserves 64 MiB of address space per malloc arena (one
            // per thread, up to 8 per core): under RLIMIT_AS that, not the
            // plugin, would exhaust the limit.
            command.env("MALLOC_ARENA_MAX", "2");
        }
        let mut process = command.spawn().map_err(SpawnError::Start)?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            process.stdin.take(),
            process.stdout.take(),
            process.stderr.take(),
        ) else {
            let _ = process.kill();
            let _ = process.wait();
            return Err(SpawnError::Start(std::io::Error::other(
                "the runner's pipes were not set up",
            )));
        };
        let pid = process.id();
        let shared = Arc::new(Shared {
            plugin: opts.plugin.to_owned(),
            pid,
            memory_limit_mib: opts.memory_limit_mib,
            max_response_bytes: opts.max_response_bytes,
            writer: Mutex::new(Some(stdin)),
            waiters: Mutex::new(Waiters {
                next_id: HELLO_ID + 1,
                ..Waiters::default()
            }),
            process: Mutex::new(process),
            kill_reason: Mutex::new(None),
            exit: Mutex::new(ExitState::default()),
            exited: Condvar::new(),
            stderr_tail: Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)),
            stderr_done: Mutex::new(false),
            stderr_closed: Condvar::new(),
            retired: AtomicBool::new(false),
        });
        let (hello_tx, hello_rx) = sync_channel(1);
        shared.waiters.lock().map.insert(HELLO_ID, hello_tx);
        let child = Child { shared };
        child.start_threads(stdout, stderr)?;
        match hello_rx.recv_timeout(timeout) {
            Ok(Reply::Answer(Response::Hello { .. })) => Ok(child),
            Ok(Reply::Answer(Response::ImportFailed { error })) => {
                Err(SpawnError::Import(Box::new(error)))
            }
            Ok(Reply::Answer(other)) => {
                let detail = format!("expected a hello frame, got {other:?}");
                child.kill(KillReason {
                    cause: CrashCause::Protocol { detail },
                    registry_reason: None,
                });
                match child.wait_dead(DEATH_SYNC) {
                    Some(report) => Err(SpawnError::Died(report)),
                    None => Err(SpawnError::TimedOut),
                }
            }
            Ok(Reply::Died(report)) => Err(SpawnError::Died(report)),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                child.kill(KillReason::host(format!(
                    "no hello within {}",
                    fmt_duration(timeout)
                )));
                let _ = child.wait_dead(DEATH_SYNC);
                Err(SpawnError::TimedOut)
            }
        }
    }

    fn start_threads(
        &self,
        stdout: ChildStdout,
        stderr: std::process::ChildStderr,
    ) -> Result<(), SpawnError> {
        let shared = Arc::clone(&self.shared);
        let stderr_thread = std::thread::Builder::new()
            .name(format!("forgesyte-stderr-{}", self.shared.pid))
            .spawn(move || read_stderr(&shared, stderr));
        let shared = Arc::clone(&self.shared);
        let reader_thread = std::thread::Builder::new()
            .name(format!("forgesyte-reader-{}", self.shared.pid))
            .spawn(move || read_answers(&shared, stdout));
        match (stderr_thread, reader_thread) {
            (Ok(_), Ok(_)) => Ok(()),
            (Err(e), _) | (_, Err(e)) => {
                // Dropping `self` (the caller's) kills the process.
                Err(SpawnError::Start(e))
            }
        }
    }

    /// The runner's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// Sends `request(id)` and waits up to `timeout` for its answer.
    /// `Err(None)` is a timeout (nothing killed yet).
    pub(crate) fn request(
        &self,
        request: impl FnOnce(u64) -> Request,
        timeout: Duration,
    ) -> Result<Reply, Option<Arc<ExitReport>>> {
        let (id, rx) = self.register().map_err(Some)?;
        let written = {
            let mut writer = self.shared.writer.lock();
            match writer.as_mut() {
                Some(stdin) => write_frame(stdin, &request(id)).is_ok(),
                None => false,
            }
        };
        if !written {
            // The process is dying (or retired): its death report follows.
            return match rx.recv_timeout(DEATH_SYNC) {
                Ok(reply) => Ok(reply),
                Err(_) => Err(self.dead()),
            };
        }
        wait_reply(&rx, timeout)
    }

    fn register(&self) -> Result<(u64, Receiver<Reply>), Arc<ExitReport>> {
        let mut waiters = self.shared.waiters.lock();
        if waiters.closed {
            drop(waiters);
            return Err(self
                .dead()
                .unwrap_or_else(|| Arc::new(ExitReport::protocol("the plugin process is gone"))));
        }
        let id = waiters.next_id;
        waiters.next_id += 1;
        let (tx, rx) = sync_channel(1);
        waiters.map.insert(id, tx);
        Ok((id, rx))
    }

    /// Kills the process, recording why first (the first reason wins).
    pub(crate) fn kill(&self, reason: KillReason) {
        kill(&self.shared, reason);
    }

    /// The death report, once the process is dead.
    pub(crate) fn dead(&self) -> Option<Arc<ExitReport>> {
        self.shared.exit.lock().report.clone()
    }

    /// Waits up to `timeout` for the death to be processed.
    pub(crate) fn wait_dead(&self, timeout: Duration) -> Option<Arc<ExitReport>> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.shared.exit.lock();
        while exit.report.is_none() {
            if self
                .shared
                .exited
                .wait_until(&mut exit, deadline)
                .timed_out()
            {
                break;
            }
        }
        exit.report.clone()
    }

    /// Runs `callback` once when the process has died (at once if it has);
    /// never for a retired process.
    pub(crate) fn on_exit(&self, callback: ExitCallback) {
        let mut exit = self.shared.exit.lock();
        match exit.report.clone() {
            Some(report) => {
                drop(exit);
                if !self.shared.retired.load(Ordering::SeqCst) {
                    callback(&report);
                }
            }
            None => exit.callbacks.push(callback),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.shared.retired.store(true, Ordering::SeqCst);
        self.shared.writer.lock().take();
        kill(
            &self.shared,
            KillReason {
                cause: CrashCause::Killed {
                    reason: "retired by the host".into(),
                },
                registry_reason: None,
            },
        );
    }
}

fn kill(shared: &Shared, reason: KillReason) {
    {
        let mut slot = shared.kill_reason.lock();
        if slot.is_none() {
            *slot = Some(reason);
        }
    }
    // `Child::kill` does nothing once the process has been reaped, so the
    // signal never reaches a recycled pid.
    let _ = shared.process.lock().kill();
}

fn wait_reply(rx: &Receiver<Reply>, timeout: Duration) -> Result<Reply, Option<Arc<ExitReport>>> {
    match rx.recv_timeout(timeout) {
        Ok(reply) => Ok(reply),
        Err(RecvTimeoutError::Timeout) => Err(None),
        Err(RecvTimeoutError::Disconnected) => Err(Some(Arc::new(ExitReport::protocol(
            "the plugin process is gone",
        )))),
    }
}

/// The reader thread: routes answers until the stream ends or breaks, then
/// processes the death.
fn read_answers(shared: &Arc<Shared>, stdout: ChildStdout) {
    let mut stdout = std::io::BufReader::with_capacity(64 * 1024, stdout);
    let violation = loop {
        match read_frame(&mut stdout, shared.max_response_bytes) {
            Ok(body) => match serde_json::from_slice::<Response>(&body) {
                Ok(response) => {
                    if let Err(detail) = route(shared, response) {
                        break Some(detail);
                    }
                }
                Err(e) => break Some(format!("malformed answer frame: {e}")),
            },
            Err(FrameError::Eof) => break None,
            Err(FrameError::TooLarge { len }) => {
                break Some(format!(
                    "answer frame of {len} bytes exceeds the limit of {}",
                    fmt_bytes(shared.max_response_bytes)
                ));
            }
            Err(FrameError::Io(e)) => break Some(format!("broken answer stream: {e}")),
        }
    };
    if let Some(detail) = violation {
        kill(
            shared,
            KillReason {
                cause: CrashCause::Protocol { detail },
                registry_reason: None,
            },
        );
    }
    let status = reap(shared);
    process_death(shared, status);
}

/// Hands an answer to its waiter.
fn route(shared: &Shared, response: Response) -> Result<(), String> {
    let id = response.id();
    let waiter = shared.waiters.lock().map.remove(&id);
    match waiter {
        Some(tx) => {
            // The caller may have given up (timed out): nobody to tell.
            let _ = tx.try_send(Reply::Answer(response));
            Ok(())
        }
        None => Err(format!("answer to unknown request id {id}")),
    }
}

/// Waits for the process to end; one that closed its protocol pipe but
/// keeps running is killed after a grace period.
fn reap(shared: &Shared) -> Option<ExitStatus> {
    let deadline = Instant::now() + EXIT_GRACE;
    loop {
        match shared.process.lock().try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
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
                detail: "closed its end of the protocol but kept running".into(),
            },
            registry_reason: None,
        },
    );
    shared.process.lock().wait().ok()
}

/// Works out why the process ended, publishes the report, runs the exit
/// callbacks, then fails every request still waiting.
fn process_death(shared: &Shared, status: Option<ExitStatus>) {
    // The last lines (the abort message, the allocation failure) arrive just
    // as the process dies.
    {
        let deadline = Instant::now() + STDERR_GRACE;
        let mut done = shared.stderr_done.lock();
        while !*done {
            if shared
                .stderr_closed
                .wait_until(&mut done, deadline)
                .timed_out()
            {
                break;
            }
        }
    }
    let stderr_tail: Vec<String> = shared.stderr_tail.lock().iter().cloned().collect();
    let kill_reason = shared.kill_reason.lock().take();
    let (cause, registry_reason) = match kill_reason {
        Some(k) => (k.cause, k.registry_reason),
        None => match status {
            Some(status) => (
                classify(status, shared.memory_limit_mib, &stderr_tail),
                None,
            ),
            None => (
                CrashCause::Protocol {
                    detail: "the process could not be waited for".into(),
                },
                None,
            ),
        },
    };
    let crash = CrashError { cause, stderr_tail };
    let reason = registry_reason.unwrap_or_else(|| PluginError::Crash(crash.clone()).reason());
    let report = Arc::new(ExitReport {
        reason,
        signal: status
            .and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s))
            .map(signal_name),
        code: status.and_then(|s| s.code()),
        crash: Some(crash.clone()),
    });
    let retired = shared.retired.load(Ordering::SeqCst);
    if retired {
        tracing::debug!(plugin = %shared.plugin, pid = shared.pid, "plugin process {} ended", shared.pid);
    } else {
        tracing::error!(
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
    let waiters = {
        let mut waiters = shared.waiters.lock();
        waiters.closed = true;
        std::mem::take(&mut waiters.map)
    };
    for (_, tx) in waiters {
        let _ = tx.try_send(Reply::Died(Arc::clone(&report)));
    }
}

/// The stderr thread: every line to the log, tagged with the plugin, and
/// the last [`STDERR_TAIL_LINES`] kept for crash reports.
fn read_stderr(shared: &Shared, stderr: std::process::ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if text.is_empty() {
                    continue;
                }
                tracing::info!(target: "forgesyte_loader::plugin_stderr", plugin = %shared.plugin, pid = shared.pid, "{text}");
                let mut tail = shared.stderr_tail.lock();
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text.to_owned());
            }
        }
    }
    *shared.stderr_done.lock() = true;
    shared.stderr_closed.notify_all();
}

/// `64 MiB`, `512 KiB`, `100 bytes`.
pub(crate) fn fmt_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_bytes;

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(fmt_bytes(64 * 1024 * 1024), "64 MiB");
        assert_eq!(fmt_bytes(512 * 1024), "512 KiB");
        assert_eq!(fmt_bytes(100), "100 bytes");
    }
}
