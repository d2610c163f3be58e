//! One runner process: spawning it ([`super::spawn::spawn_runner`]) and
//! its handshake, its calls, and (in [`end`]) the reader thread that feeds
//! its answers to the [`Transport`], the stderr thread, stopping it, and
//! what happens when it dies.
//!
//! When the process dies (or is killed), the reader reaps it, works out why,
//! runs the exit callbacks (the supervisor marks the plugin FAILED there),
//! and only then fails every call still waiting — so a caller that gets a
//! crash error already sees the plugin FAILED.
//!
//! Hygiene: each runner leads its own process group (a terminal's Ctrl-C
//! reaches the server only, and a kill takes the plugin's own children
//! too); it gets `SIGKILL` when the server dies (parent-death signal, set
//! from one long-lived spawner thread because the signal follows the
//! *thread* that forked), and the runner itself also watches its parent as
//! a fallback. Stopping asks first (the runner's stdin is closed) and kills
//! after [`STOP_GRACE`], on a thread of its own, never the caller's.
//!
//! Its protocol output is read through [`super::watched_pipe`]; the host's
//! count of its runners is [`super::runners`]'s, and its environment
//! [`super::spawn::runner_env`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use forgesyte_errors::{CrashCause, fmt_duration};
use forgesyte_protocol::wire::shm::{SHM_FD_ENV, SHM_THRESHOLD_ENV};
use forgesyte_protocol::wire::{Greeting, HandshakeError, Hello, WireError};
use parking_lot::{Condvar, Mutex};
use std::os::fd::OwnedFd;

use super::os_process::OsProcess;
use super::runners::{HOST_STOPPING, Runners};
use super::spawn::{pass_fd, runner_env, spawn_runner, spawn_runner_logging_stdout};
use super::stacks::stuck_at;
use super::stderr::StderrLog;
use super::transport::{Reply, RequestError, Sent, Transport, TrySend};
use super::zygote::Zygote;
use crate::host::{ExitCallback, ExitReport};

mod end;

pub(super) use end::{kill, kill_locked, kill_unless_reaping, wait_dead};
use end::{retire, start_threads};

/// How long a process whose protocol pipe closed may take to exit before
/// it is killed.
pub(super) const EXIT_GRACE: Duration = Duration::from_millis(300);
/// How long the death report waits for the last stderr lines.
const STDERR_GRACE: Duration = Duration::from_millis(500);
/// How long a caller that killed the process waits for the death to be
/// processed.
pub(crate) const DEATH_SYNC: Duration = Duration::from_secs(5);

/// How long a runner asked to stop (its stdin closed) may take to exit
/// before it is killed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);

/// The longest a runner asked to stop takes to be recorded ended, its
/// process group killed: half its 2 s grace for a request being written,
/// the grace, 0.3 s for a closed pipe, 0.5 s for its last stderr lines
/// and, forked by a zygote that does not report its exit, 2 s more (a test
/// checks the sum of the constants).
pub const RUNNER_STOP_WAIT: Duration = Duration::from_secs(6);

/// Why the host is killing the process, recorded before the signal so the
/// death is reported for what it is rather than as a `SIGKILL`.
#[derive(Debug, Clone)]
pub(crate) struct KillReason {
    /// What the crash report says.
    pub(crate) cause: CrashCause,
    /// What the registry says; `None`: derived from the crash report.
    pub(crate) registry_reason: Option<String>,
    /// Recorded before the host asks the runner for its stacks, to stand if
    /// the runner dies of the asking (a plugin's own handler of the signal
    /// may end it); the kill that follows replaces it.
    pub(crate) provisional: bool,
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
            provisional: false,
        }
    }

    /// The host kills the process for a time limit: the crash report says
    /// `plain` (other calls' clients read it), the registry `located`
    /// (where the plugin was stuck: for its operator and author).
    pub(crate) fn timed_out(plain: String, located: String) -> Self {
        KillReason {
            cause: CrashCause::Killed { reason: plain },
            registry_reason: Some(located),
            provisional: false,
        }
    }
}

/// How to start a runner.
#[derive(Debug, Clone)]
pub(crate) struct SpawnOptions<'a> {
    pub(crate) plugin: &'a str,
    pub(crate) memory_limit_mib: u64,
    pub(crate) max_response_bytes: u64,
    /// Where the runner is counted from its start, if anywhere.
    pub(crate) runners: Option<&'a Runners>,
    /// The signal on which the runner writes its threads' stacks before
    /// its hello says (the host's Python runner's), for a handshake's
    /// timeout.
    pub(crate) stack_signal: Option<i32>,
}

/// Why a runner did not get as far as its hello.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// The runner could not be started at all.
    Start(std::io::Error),
    /// The runner loaded nothing: the plugin's code failed its checks.
    Import(Box<WireError>),
    /// The runner speaks another protocol version.
    Version {
        /// The runner's.
        runner: u32,
    },
    /// The runner died first.
    Died(Arc<ExitReport>),
    /// No hello in time (the process was killed); where the plugin's code
    /// was stuck, when the runner said.
    TimedOut(Option<String>),
    /// Confinement is required and the runner reported itself unconfined
    /// (it was stopped): which parts, and why.
    Unconfined(String),
    /// The host is stopping ([`Runners::close`]): no runner starts (one
    /// started meanwhile was killed).
    Stopping,
}

#[derive(Default)]
pub(super) struct ExitState {
    pub(super) report: Option<Arc<ExitReport>>,
    callbacks: Vec<ExitCallback>,
}

/// What the owner, the reader thread and the stderr thread share.
pub(super) struct Shared {
    pub(super) plugin: String,
    pub(super) pid: u32,
    memory_limit_mib: u64,
    /// The machine's OOM kill count when it started ([`super::exit::oom_kills`]).
    oom_kills_at_start: Option<u64>,
    transport: Transport,
    pub(super) process: Mutex<OsProcess>,
    pub(super) kill_reason: Mutex<Option<KillReason>>,
    pub(super) exit: Mutex<ExitState>,
    exited: Condvar,
    /// [`Self::exited`] for tasks ([`Child::dead`]).
    died: tokio::sync::Notify,
    /// What the stderr thread keeps; that thread holds this alone (a
    /// process the plugin started may keep stderr open long after).
    pub(super) stderr: Arc<StderrLog>,
    retired: AtomicBool,
    /// Its plugin is constructed ([`Child::constructed`]): it serves, or
    /// will, rather than starts.
    pub(super) constructed: AtomicBool,
}

/// A runner's shared-memory socket pair (`PROTOCOL.md` §3.1), made when
/// the threshold is not 0: the runner's end is passed to it (close-on-exec
/// everywhere but in that runner), the host's end goes to its transport.
struct ShmOffer {
    host: OwnedFd,
    runner: OwnedFd,
    threshold: u64,
}

impl ShmOffer {
    fn new() -> std::io::Result<Option<ShmOffer>> {
        let threshold = super::transport::shm_threshold();
        if threshold == 0 {
            return Ok(None);
        }
        let (host, runner) = super::seqpacket_pair()?;
        Ok(Some(ShmOffer {
            host,
            runner,
            threshold,
        }))
    }

    /// Tells `command` where its end is ([`SHM_FD_ENV`], at the same
    /// number as here) and keeps that one descriptor open across its exec.
    fn pass_to(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        let fd = self.runner.as_raw_fd();
        command
            .env(SHM_FD_ENV, fd.to_string())
            .env(SHM_THRESHOLD_ENV, self.threshold.to_string());
        pass_fd(command, fd);
    }

    /// The host's end and the threshold; the runner's end is closed.
    fn host_end(self) -> (OwnedFd, u64) {
        (self.host, self.threshold)
    }
}

/// A runner's protocol pipe of its own, beside its stdio, passed as
/// `--protocol-fd N`, first on its command line: for a Python runner the
/// host starts itself, whose interpreter may print as it starts (a `.pth`
/// file, `sitecustomize`) before the runner has taken fd 1 over. Its fd 1
/// is then its stderr, the log.
pub(crate) struct ProtocolPipe {
    read: std::io::PipeReader,
    write: std::io::PipeWriter,
}

impl ProtocolPipe {
    /// The argument that names the runner's end.
    pub(crate) const ARG: &str = "--protocol-fd";

    /// A new pipe (close-on-exec, until passed).
    pub(crate) fn new() -> std::io::Result<ProtocolPipe> {
        let (read, write) = std::io::pipe()?;
        Ok(ProtocolPipe { read, write })
    }

    /// Names the runner's end on `command`'s line (next) and keeps it open
    /// across its exec, at the same number.
    pub(crate) fn pass_to(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        let fd = self.write.as_raw_fd();
        command.arg(Self::ARG).arg(fd.to_string());
        pass_fd(command, fd);
    }
}

/// The reading end of a runner's pipe, whichever made it.
fn pipe_file(end: impl Into<OwnedFd>) -> std::fs::File {
    std::fs::File::from(end.into())
}

/// Kills and reaps a runner started without all its pipes (never, with
/// `std`'s spawn), and says so.
fn pipes_not_set_up(mut process: std::process::Child) -> std::io::Error {
    let _ = process.kill();
    let _ = process.wait();
    std::io::Error::other("the runner's pipes were not set up")
}

/// A running runner process. Dropping it retires the process (killed, no
/// exit callbacks).
pub(crate) struct Child {
    pub(super) shared: Arc<Shared>,
    pub(super) hello: Hello,
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
    /// Starts `command` (a runner with its arguments) and waits (at most
    /// `timeout`) for its hello: written to its stdout, or to `protocol`
    /// when given (already [passed](ProtocolPipe::pass_to) to `command`).
    pub(crate) fn spawn(
        mut command: Command,
        protocol: Option<ProtocolPipe>,
        opts: &SpawnOptions<'_>,
        timeout: Duration,
        claim: &mut Option<super::headroom::Starting>,
    ) -> Result<Child, SpawnError> {
        command.envs(runner_env(opts.memory_limit_mib > 0));
        let shm = ShmOffer::new().map_err(SpawnError::Start)?;
        if let Some(offer) = &shm {
            offer.pass_to(&mut command);
        }
        let spawned = match protocol {
            None => spawn_runner(command).and_then(|mut process| {
                match (process.stdout.take(), process.stderr.take()) {
                    (Some(stdout), Some(stderr)) => {
                        Ok((process, pipe_file(stdout), pipe_file(stderr)))
                    }
                    _ => Err(pipes_not_set_up(process)),
                }
            }),
            Some(ProtocolPipe { read, write }) => {
                spawn_runner_logging_stdout(command).map(|(process, stderr)| {
                    // The runner has its end (or failed to start): ours goes.
                    drop(write);
                    (process, pipe_file(read), pipe_file(stderr))
                })
            }
        };
        // The runner has its end (or failed to start): ours goes.
        let shm = shm.map(ShmOffer::host_end);
        let (mut process, stdout, stderr) = spawned.map_err(SpawnError::Start)?;
        let Some(stdin) = process.stdin.take() else {
            return Err(SpawnError::Start(pipes_not_set_up(process)));
        };
        Self::start(
            OsProcess::direct(process),
            (stdin, stdout, stderr),
            shm,
            opts,
            timeout,
            claim,
        )
    }

    /// Has `zygote` fork a Python runner with arguments `argv` (and, when
    /// confined, the values of its environment `env`) and waits (at most
    /// `timeout`, the fork included) for its hello.
    pub(crate) fn fork(
        zygote: &Arc<Zygote>,
        argv: &[OsString],
        (env, sources): (
            Option<&std::collections::BTreeMap<String, String>>,
            Option<&std::os::fd::OwnedFd>,
        ),
        opts: &SpawnOptions<'_>,
        timeout: Duration,
        claim: &mut Option<super::headroom::Starting>,
    ) -> Result<Child, SpawnError> {
        let started = Instant::now();
        let (stdin, stdin_w) = std::io::pipe().map_err(SpawnError::Start)?;
        let (stdout_r, stdout) = std::io::pipe().map_err(SpawnError::Start)?;
        let (stderr_r, stderr) = std::io::pipe().map_err(SpawnError::Start)?;
        let shm = ShmOffer::new().map_err(SpawnError::Start)?;
        let (runner_shm, host_shm) = match shm {
            Some(offer) => (
                Some((offer.runner, offer.threshold)),
                Some((offer.host, offer.threshold)),
            ),
            None => (None, None),
        };
        let process = zygote
            .spawn(
                argv,
                [stdin.into(), stdout.into(), stderr.into()],
                runner_shm,
                (env, sources),
                timeout,
            )
            .map_err(SpawnError::Start)?;
        Self::start(
            OsProcess::Forked(process),
            (stdin_w, stdout_r, stderr_r),
            host_shm,
            opts,
            timeout.saturating_sub(started.elapsed()),
            claim,
        )
    }

    /// The rest of a start, whoever forked: the reader and stderr threads,
    /// and the wait for the hello.
    fn start(
        mut process: OsProcess,
        (stdin, stdout, stderr): (
            impl Write + std::os::fd::AsFd + Send + 'static,
            impl Read + std::os::fd::AsFd + Send + 'static,
            impl Read + Send + 'static,
        ),
        shm: Option<(OwnedFd, u64)>,
        opts: &SpawnOptions<'_>,
        timeout: Duration,
        claim: &mut Option<super::headroom::Starting>,
    ) -> Result<Child, SpawnError> {
        // The runner's descriptors are made (its pipes, its socket): the
        // lowest free descriptor counts them from now on, not its claim.
        drop(claim.take());
        let pid = process.id();
        let (transport, greeting) = match Transport::new(stdin, opts.max_response_bytes) {
            Ok((mut transport, greeting)) => {
                if let Some((socket, threshold)) = shm {
                    transport.offer_shm(socket, threshold);
                }
                (transport, greeting)
            }
            Err(e) => {
                process.kill();
                let _ = process.wait();
                return Err(SpawnError::Start(e));
            }
        };
        let shared = Arc::new(Shared {
            plugin: opts.plugin.to_owned(),
            pid,
            memory_limit_mib: opts.memory_limit_mib,
            oom_kills_at_start: super::exit::oom_kills(),
            transport,
            process: Mutex::new(process),
            kill_reason: Mutex::new(None),
            exit: Mutex::new(ExitState::default()),
            exited: Condvar::new(),
            died: tokio::sync::Notify::new(),
            stderr: Arc::new(StderrLog::new(opts.plugin, pid)),
            retired: AtomicBool::new(false),
            constructed: AtomicBool::new(false),
        });
        start_threads(&shared, stdout, stderr)?;
        if let Some(runners) = opts.runners
            && !runners.admit(&shared)
        {
            kill(&shared, KillReason::host(HOST_STOPPING));
            let _ = wait_dead(&shared, DEATH_SYNC);
            return Err(SpawnError::Stopping);
        }
        let failed = |shared: &Arc<Shared>, reason: KillReason| {
            kill(shared, reason);
            match wait_dead(shared, DEATH_SYNC) {
                Some(report) => SpawnError::Died(report),
                None => SpawnError::TimedOut(None),
            }
        };
        let deadline = Instant::now().checked_add(timeout);
        let greeted = match greeting.recv_timeout(timeout) {
            Err(RecvTimeoutError::Timeout) => super::transport::after_a_stall(&greeting, deadline)
                .ok_or(RecvTimeoutError::Timeout),
            other => other,
        };
        match greeted {
            Ok(Reply::Greeting(Ok(Greeting::Hello(hello)))) => Ok(Child { shared, hello }),
            Ok(Reply::Greeting(Ok(Greeting::ImportFailed(error)))) => {
                // The runner exits next; it is let go like any other.
                retire(&shared, opts.stack_signal);
                Err(SpawnError::Import(Box::new(error)))
            }
            Ok(Reply::Greeting(Err(HandshakeError::Version { runner, .. }))) => {
                retire(&shared, None);
                Err(SpawnError::Version { runner })
            }
            Ok(Reply::Greeting(Err(e))) => Err(failed(
                &shared,
                KillReason {
                    cause: CrashCause::Protocol {
                        detail: e.to_string(),
                    },
                    registry_reason: None,
                    provisional: false,
                },
            )),
            Ok(Reply::Answer(..) | Reply::Unreceived(_)) => Err(failed(
                &shared,
                KillReason {
                    cause: CrashCause::Protocol {
                        detail: "answered before its greeting".into(),
                    },
                    registry_reason: None,
                    provisional: false,
                },
            )),
            Ok(Reply::Died(report)) => Err(SpawnError::Died(report)),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                let reason = KillReason::host(format!("no hello within {}", fmt_duration(timeout)));
                let stuck_at = stuck_at(&shared, opts.stack_signal, reason.clone());
                kill(&shared, reason);
                let _ = wait_dead(&shared, DEATH_SYNC);
                Err(SpawnError::TimedOut(stuck_at))
            }
        }
    }

    /// Asks the runner to exit and kills it after [`STOP_GRACE`]; returns
    /// at once. No exit callbacks run: the host let it go.
    pub(crate) fn stop(&self) {
        retire(&self.shared, self.hello.stack_signal);
    }

    /// Its plugin is constructed: a host that begins to stop
    /// ([`Runners::stop_starting`]) leaves it serving.
    pub(crate) fn constructed(&self) {
        self.shared.constructed.store(true, Ordering::SeqCst);
    }

    /// What the runner said about itself.
    pub(crate) fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The runner's process id, until its death is processed: reaped, its
    /// number may be another process's (a metrics scrape read a stranger's
    /// memory and CPU time for a plugin FAILED for good).
    pub(crate) fn live_pid(&self) -> Option<u32> {
        self.shared
            .exit
            .lock()
            .report
            .is_none()
            .then_some(self.shared.pid)
    }

    /// Sends a request (see [`Transport::request`]) and waits up to
    /// `timeout` for its answer. `Err(None)` is a timeout (nothing killed
    /// yet); `Err(Some(report))` the end of the process.
    pub(crate) fn request(
        &self,
        head: impl FnOnce(u64) -> Vec<u8>,
        tail: &[&[u8]],
        attachments: &[&[u8]],
        timeout: Duration,
    ) -> Result<Reply, Option<Arc<ExitReport>>> {
        if let Some(report) = self.condemned_report() {
            return Err(Some(report));
        }
        let started = Instant::now();
        match self
            .shared
            .transport
            .request(head, tail, attachments, timeout)
        {
            Ok(reply) => Ok(reply),
            Err(RequestError::TimedOut) => Err(None),
            Err(RequestError::Closed(Some(report))) => Err(Some(report)),
            // The frame did not go: how the process ended is not how
            // the call did.
            // Within what is left of the call's limit: writing the request
            // may have taken most of it.
            Err(RequestError::Closed(None)) => Err(Some(ExitReport::for_an_unsent_call(
                self.closed_report(Some(timeout.saturating_sub(started.elapsed()))),
            ))),
        }
    }

    /// How the process ended, for a request that found its stream closed
    /// with no report yet. A runner the host let go has its request pipe
    /// closed by the host: the call never reached it. Else the process is
    /// dying and its death report follows; one that lives on has closed
    /// its end of the request pipe (a plugin may close or replace any
    /// descriptor): it can never be asked anything again, so it is killed
    /// as a protocol fault, once it has lived `within` (the call's time
    /// limit, when shorter than [`DEATH_SYNC`]: a call is answered within
    /// its limit). Blocks until the death is processed.
    pub(crate) fn closed_report(&self, within: Option<Duration>) -> Arc<ExitReport> {
        if let Some(report) = self.let_go_report() {
            return report;
        }
        self.wait_dead(death_wait(within))
            .or_else(|| {
                self.kill(stopped_reading());
                self.wait_dead(DEATH_SYNC)
            })
            .unwrap_or_else(gone)
    }

    /// [`Self::closed_report`], awaited (no thread blocks on the death).
    pub(crate) async fn closed_report_awaited(&self, within: Option<Duration>) -> Arc<ExitReport> {
        if let Some(report) = self.let_go_report() {
            return report;
        }
        if let Some(report) = self.dead(death_wait(within)).await {
            return report;
        }
        self.kill_from_task(stopped_reading());
        self.dead(DEATH_SYNC).await.unwrap_or_else(gone)
    }

    /// The report of a runner the host let go, whose request pipe the host
    /// closed: the call never reached it.
    fn let_go_report(&self) -> Option<Arc<ExitReport>> {
        self.shared.retired.load(Ordering::SeqCst).then(|| {
            Arc::new(ExitReport {
                reason: "its runner was let go by the host".into(),
                crash: None,
                signal: None,
                code: None,
                pid: None,
                unsent: true,
            })
        })
    }

    /// [`Transport::try_send`], unless the runner is condemned
    /// ([`Self::condemned_report`]).
    pub(crate) fn try_send(&self, head: impl FnOnce(u64) -> Vec<u8>, tail: &[&[u8]]) -> TrySend {
        if let Some(report) = self.condemned_report() {
            return TrySend::Closed(Some(report));
        }
        self.shared.transport.try_send(head, tail)
    }

    /// The report of a call that finds its runner condemned: its kill is
    /// decided (another call ran past its time limit, and the host waits
    /// for the runner's stacks before it kills it), so the call is not
    /// sent. It was, and failed as a crash of the runner it never saw.
    fn condemned_report(&self) -> Option<Arc<ExitReport>> {
        let kill = self.shared.kill_reason.lock();
        let cause = &kill.as_ref()?.cause;
        Some(Arc::new(ExitReport {
            reason: format!("its runner was being ended ({cause})"),
            crash: None,
            signal: None,
            code: None,
            pid: None,
            unsent: true,
        }))
    }

    /// The reply to a request [`Self::try_send`] sent, awaited until
    /// `deadline` (`None`: none): `Err(None)` past it, as for
    /// [`Self::request`].
    pub(crate) async fn wait(
        &self,
        sent: Sent,
        deadline: Option<Instant>,
    ) -> Result<Reply, Option<Arc<ExitReport>>> {
        match self.shared.transport.wait(sent, deadline).await {
            Ok(reply) => Ok(reply),
            Err(RequestError::TimedOut) => Err(None),
            Err(RequestError::Closed(report)) => Err(Some(report.unwrap_or_else(gone))),
        }
    }

    /// Kills the process, recording why first (the first reason wins).
    pub(crate) fn kill(&self, reason: KillReason) {
        kill(&self.shared, reason);
    }

    /// The process's lock, as the reaper holds it while it waits.
    #[cfg(test)]
    pub(crate) fn hold_process(&self) -> parking_lot::MutexGuard<'_, OsProcess> {
        self.shared.process.lock()
    }

    /// [`Self::kill`] for a task, which must not block: the process's lock
    /// is waited for 10 ms at most. Held longer, it is held by the reaper
    /// waiting for a death it has already asked for (`SIGKILL` sent: a
    /// process stuck in the kernel can take long to die), and the kill is
    /// left to it.
    pub(crate) fn kill_from_task(&self, reason: KillReason) {
        kill_unless_reaping(&self.shared, reason);
    }

    /// Kills the process for `reason` and waits up to [`DEATH_SYNC`] for
    /// its death to be processed (its exit callbacks run).
    pub(crate) fn kill_and_wait(&self, reason: KillReason) {
        self.kill(reason);
        let _ = self.wait_dead(DEATH_SYNC);
    }

    /// [`Self::kill_and_wait`] for a task: [`Self::kill_from_task`], and
    /// the death awaited ([`Self::dead`]).
    pub(crate) async fn kill_and_await(&self, reason: KillReason) {
        self.kill_from_task(reason);
        let _ = self.dead(DEATH_SYNC).await;
    }

    /// Waits up to `timeout` for the death to be processed.
    pub(crate) fn wait_dead(&self, timeout: Duration) -> Option<Arc<ExitReport>> {
        wait_dead(&self.shared, timeout)
    }

    /// [`Self::wait_dead`], awaited. It must be polled inside a tokio
    /// runtime whose timers are enabled.
    pub(crate) async fn dead(&self, timeout: Duration) -> Option<Arc<ExitReport>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Listening before looking: a death processed in between still
            // wakes this task.
            let mut died = std::pin::pin!(self.shared.died.notified());
            died.as_mut().enable();
            let report = self.shared.exit.lock().report.clone();
            if report.is_some() {
                return report;
            }
            if tokio::time::timeout_at(deadline, died).await.is_err() {
                return self.shared.exit.lock().report.clone();
            }
        }
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
        retire(&self.shared, self.hello.stack_signal);
    }
}

/// How long a runner found with its request pipe closed is given to die
/// (its death report on the way) before it is killed: [`DEATH_SYNC`], or
/// what is left of the call's time limit when shorter (one that closed its
/// pipe and lives on answered a call with a 2 s limit after 5 s), but at
/// least [`DEATH_WAIT_MIN`]: a runner dying of its own cause is not killed
/// (and its death misnamed) before the host has seen it die.
fn death_wait(within: Option<Duration>) -> Duration {
    within.map_or(DEATH_SYNC, |left| left.clamp(DEATH_WAIT_MIN, DEATH_SYNC))
}

/// The least [`death_wait`].
const DEATH_WAIT_MIN: Duration = Duration::from_secs(1);

/// Why a runner that lives on with its request pipe closed is killed.
fn stopped_reading() -> KillReason {
    KillReason {
        cause: CrashCause::Protocol {
            detail: "stopped reading its requests (its request pipe is closed)".into(),
        },
        registry_reason: None,
        provisional: false,
    }
}

/// The report of a runner whose death was never processed.
fn gone() -> Arc<ExitReport> {
    Arc::new(ExitReport::protocol("the plugin process is gone"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_stop_wait_covers_every_grace_a_stop_can_take() {
        use super::*;
        let longest = STOP_GRACE / 2
            + STOP_GRACE
            + EXIT_GRACE
            + STDERR_GRACE
            + crate::process::zygote::UNREPORTED_EXIT;
        assert!(
            RUNNER_STOP_WAIT >= longest,
            "{RUNNER_STOP_WAIT:?} < {longest:?}"
        );
        // The stack dump before a stop's kill comes out of the grace.
        assert!(STOP_GRACE > crate::process::stacks::STUCK_AT_MAX);
    }
}
