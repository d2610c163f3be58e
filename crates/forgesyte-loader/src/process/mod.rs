//! Process isolation: a plugin in its own runner process, with the same
//! library and the same ABI as in-process.
//!
//! [`ProcessImporter`] is an [`Importer`] like [`crate::native::NativeImporter`]:
//!
//! - `open` checks the file without running it ([`crate::native::inspect`]:
//!   a complete ELF shared object with an acceptable fingerprint) and
//!   starts a runner (`forgesyte-runner`, or any binary that calls
//!   [`runner_main`]) that loads the library through the same native host
//!   and answers with a hello frame, or with the precise `ImportError`
//!   (ABI mismatch, missing entry symbol, unresolved symbol). The runner is
//!   kept for the first `instantiate`.
//! - `instantiate` sends the construction request and waits at most the
//!   init timeout; a later `instantiate` (a restart) starts a fresh runner.
//! - Each tool call is a request frame; several can be in flight on one
//!   runner (each runs on its own thread there: plugins are `Send + Sync`
//!   by contract, and one process per plugin keeps one copy of its models
//!   in memory). A call past its timeout kills the runner. A runner that did
//!   not announce `concurrent_calls` gets one call at a time: a call waits
//!   at most its timeout for its turn, then fails alone
//!   ([`forgesyte_errors::ToolError::QueueTimedOut`], the runner untouched: it never saw
//!   the call).
//!
//! The wire protocol is `forgesyte_protocol::wire` (specified in its
//! `PROTOCOL.md`); the runner's side is [`runner_main`]; the host's side is
//! `transport` (routing over any pair of streams), `child` (one runner:
//! its reader, stopping, reaping), `watched_pipe` (its protocol output, read
//! with an eye on its end), `runners` (every runner of a host not ended:
//! what a stopping host ends), `spawn` (the OS hygiene and the environment
//! of every child process the host starts) and `instance` (a constructed
//! plugin's calls).
//! Faults come back as typed errors with a precise reason
//! (`killed by signal SIGSEGV (11)`, `exited with code 3`, `exceeded memory
//! limit 512 MiB`, `timed out after 5 s during init`, a protocol violation)
//! and the last lines the plugin wrote to stderr. Every stderr line is also
//! logged (target `forgesyte_loader::plugin_stderr`), tagged with the plugin.
//!
//! Supervision (restart with backoff) is the [`crate::PluginHandle`]'s job;
//! see `ISOLATION.md`.

mod child;
mod exit;
mod headroom;
pub(crate) use headroom::host_short;
mod instance;
mod os_process;
mod received;
mod runner;
mod runners;
mod spares;
mod spawn;
mod stacks;
mod stderr;
mod transport;
mod watched_pipe;
mod wire_error;
mod workers;
mod zygote;

pub use child::RUNNER_STOP_WAIT;
pub use forgesyte_deps::raise_open_file_limit;
pub use received::{BodyFile, ReceivedBody};
pub use spawn::close_inherited_on_exec;
pub use stderr::{set_stderr_withheld, stderr_withheld};
pub use transport::{set_shm_threshold, shm_threshold};
pub use zygote::{ZYGOTE_ENV, end_zygotes};

use std::ffi::OsString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forgesyte_errors::{CrashCause, CrashError, ImportError, InitError, TimeoutError};
use parking_lot::Mutex;

use forgesyte_protocol::wire::{PROTOCOL_VERSION, Response, capability};

use std::process::Command;

use self::child::{Child, SpawnError, SpawnOptions};
pub(crate) use self::runners::{HOST_STOPPING, Runners};
use self::transport::Reply;
use self::wire_error::WireErrorExt;
use crate::host::{Importer, PluginInstance, PluginLibrary};
use crate::manifest::{Limits, PythonEntry};

pub use self::instance::ProcessInstance;
pub use self::runner::{runner_main, shrug_off_file_size_signal};

/// File name of the runner binary this crate builds.
pub const RUNNER_NAME: &str = "forgesyte-runner";

const MIB: u64 = 1024 * 1024;

/// Limits of an isolated plugin (the host's defaults, or a manifest's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Time for the runner to load the library and answer, and again for
    /// construction (`limits.init_timeout_s`; default 5 s).
    pub init_timeout: Duration,
    /// Time for one tool call before the runner is killed
    /// (`limits.call_timeout_s`; default 60 s).
    pub call_timeout: Duration,
    /// The runner's address-space limit in MiB, `RLIMIT_AS`
    /// (`limits.memory_mb`; default 512; 0: none).
    pub memory_limit_mib: u64,
    /// The largest answer frame accepted, in bytes (default 64 MiB; the
    /// host's value is also the most a manifest's `limits.max_response_mb`
    /// may ask for: see [`ProcessLimits::with_manifest`]).
    pub max_response_bytes: u64,
}

impl Default for ProcessLimits {
    fn default() -> Self {
        ProcessLimits {
            init_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(60),
            memory_limit_mib: 512,
            max_response_bytes: 64 * MIB,
        }
    }
}

impl ProcessLimits {
    /// These defaults, overridden by what the manifest sets; but a
    /// manifest's `max_response_mb` may only lower the host's answer limit,
    /// never raise it: the host holds every answer in its own memory, so
    /// how large one may be is the operator's to say
    /// ([`ProcessLimits::response_above_host`] tells which manifests ask
    /// for more).
    pub fn with_manifest(&self, limits: &Limits) -> Self {
        ProcessLimits {
            init_timeout: limits.init_timeout.unwrap_or(self.init_timeout),
            call_timeout: limits.call_timeout.unwrap_or(self.call_timeout),
            memory_limit_mib: limits.memory_mb.unwrap_or(self.memory_limit_mib),
            max_response_bytes: limits
                .max_response_mb
                .map_or(self.max_response_bytes, |mb| {
                    mb.saturating_mul(MIB).min(self.max_response_bytes)
                }),
        }
    }

    /// The answer limit in MiB that `limits` asks for, when it is more
    /// than these limits allow (and so is not granted).
    pub fn response_above_host(&self, limits: &Limits) -> Option<u64> {
        limits
            .max_response_mb
            .filter(|mb| mb.saturating_mul(MIB) > self.max_response_bytes)
    }
}

/// Where the runner is when the host names none: `forgesyte-runner` next to
/// the current executable (or one directory up, Cargo's layout for test
/// binaries). Never a program found on `PATH`: the runner is code the host
/// trusts with its plugins, so it is the configured one, the host itself,
/// or the one installed beside it; and whichever it is, it must pass the
/// handshake.
pub fn find_runner() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    exe.as_deref()
        .and_then(Path::parent)
        .into_iter()
        .flat_map(|dir| [Some(dir), dir.parent()])
        .flatten()
        .map(|dir| dir.join(RUNNER_NAME))
        .find(|p| p.is_file())
}

/// What a runner process is started as.
#[derive(Debug, Clone)]
enum Launch {
    /// A native runner (`forgesyte-runner`, or the host behind a hidden
    /// subcommand) hosting a shared library.
    Native {
        runner: PathBuf,
        runner_args: Vec<std::ffi::OsString>,
    },
    /// The host's Python runner (shipped in the binary, run with `-c`)
    /// under the plugin's interpreter.
    Python {
        interpreter: PathBuf,
        plugin_dir: PathBuf,
        entry: PythonEntry,
        installed: bool,
        /// A signed or pinned plugin's checked sources (a JSON object of
        /// relative path → SHA-256) in a sealed memory file, handed to each
        /// runner (`--sources-fd`; too big for a command line: a plugin
        /// bundling its dependencies lists thousands of files): the runner
        /// imports no module of the plugin's tree whose bytes differ or
        /// that it lacks.
        sources: Option<Arc<OwnedFd>>,
    },
}

/// The Python runner's arguments naming the plugin's code (absolute
/// paths: the runner may change directory).
fn python_runner_args(plugin_dir: &Path, entry: &PythonEntry, installed: bool) -> Vec<OsString> {
    let plugin_dir = std::path::absolute(plugin_dir).unwrap_or_else(|_| plugin_dir.to_owned());
    let mut argv = vec!["--plugin-dir".into(), plugin_dir.clone().into_os_string()];
    match entry {
        PythonEntry::File { file, class } => {
            argv.push("--file".into());
            argv.push(plugin_dir.join(file).into_os_string());
            if let Some(class) = class {
                argv.push("--class".into());
                argv.push(class.into());
            }
        }
        PythonEntry::Module { module, class } => {
            argv.push("--module".into());
            argv.push(match class {
                Some(class) => format!("{module}:{class}").into(),
                None => module.into(),
            });
        }
    }
    if installed {
        argv.push("--installed".into());
    }
    argv
}

/// Opens plugins in runner processes: native libraries, or Python code.
#[derive(Debug, Clone)]
pub struct ProcessImporter {
    launch: Launch,
    plugin: String,
    limits: ProcessLimits,
    /// The plan its runners apply; one that says `required` also makes
    /// the host refuse a runner that reports any part `unconfined`
    /// ([`SpawnError::Unconfined`]).
    confinement: Option<crate::sandbox::Confinement>,
    /// A library's path and its checked bytes, sealed in a memory file
    /// that each native runner of that library inherits and loads instead
    /// of the file (a restart too).
    library_fd: Option<(PathBuf, Arc<OwnedFd>)>,
    run_as: Option<crate::sandbox::RunAs>,
    /// Where its runners are counted (the loader's), if anywhere.
    runners: Option<Arc<Runners>>,
}

impl ProcessImporter {
    /// An importer that starts `runner` for plugin `plugin` (the name tags
    /// its log lines) under `limits`.
    pub fn new(
        runner: impl Into<PathBuf>,
        plugin: impl Into<String>,
        limits: ProcessLimits,
    ) -> Self {
        ProcessImporter {
            launch: Launch::Native {
                runner: runner.into(),
                runner_args: Vec::new(),
            },
            plugin: plugin.into(),
            limits,
            confinement: None,
            library_fd: None,
            run_as: None,
            runners: None,
        }
    }

    /// An importer that runs the Python plugin in `plugin_dir` (its code at
    /// `entry`) with `interpreter`, through the host's Python runner.
    pub fn python(
        interpreter: impl Into<PathBuf>,
        plugin_dir: impl Into<PathBuf>,
        entry: PythonEntry,
        plugin: impl Into<String>,
        limits: ProcessLimits,
    ) -> Self {
        ProcessImporter {
            launch: Launch::Python {
                interpreter: interpreter.into(),
                plugin_dir: plugin_dir.into(),
                entry,
                installed: false,
                sources: None,
            },
            plugin: plugin.into(),
            limits,
            confinement: None,
            library_fd: None,
            run_as: None,
            runners: None,
        }
    }

    /// Marks a Python plugin as an installed package (an entry point): its
    /// directory is not put on `sys.path`, where its files would shadow
    /// the standard library.
    pub fn installed(mut self) -> Self {
        if let Launch::Python { installed, .. } = &mut self.launch {
            *installed = true;
        }
        self
    }

    /// A signed or pinned Python plugin's checked sources (relative path
    /// → SHA-256, as its check computed and verified them): its runners
    /// (at every restart too) import no module of its tree whose bytes
    /// differ from them, nor one they do not list. (Python runners only.)
    ///
    /// # Errors
    ///
    /// When the memory file cannot be made.
    pub fn verified_sources(
        mut self,
        digests: &std::collections::BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        if let Launch::Python { sources, .. } = &mut self.launch {
            let json = serde_json::to_vec(digests).map_err(std::io::Error::other)?;
            *sources = Some(Arc::new(forgesyte_protocol::wire::shm::sealed(&json)?));
        }
        Ok(self)
    }

    /// Arguments put before the runner's own (`--library ...`): for a host
    /// binary that is its own runner behind a hidden subcommand. (Native
    /// runners only.)
    pub fn with_runner_args(mut self, args: Vec<std::ffi::OsString>) -> Self {
        if let Launch::Native { runner_args, .. } = &mut self.launch {
            *runner_args = args;
        }
        self
    }

    /// Confines its runners: each applies `plan` to itself before any of
    /// the plugin's code runs, and starts with the plan's environment only;
    /// a plan that says `required` is checked again in each runner's hello.
    pub fn confined(mut self, plan: crate::sandbox::Confinement) -> Self {
        self.confinement = Some(plan);
        self
    }

    /// Has its native runners load `bytes` (the library at `path`, as its
    /// digest was checked) from a sealed memory file they inherit, instead
    /// of the file, which may have changed since.
    ///
    /// # Errors
    ///
    /// The memory file cannot be made.
    pub fn with_library_bytes(mut self, path: &Path, bytes: &[u8]) -> Result<Self, ImportError> {
        let fd = crate::native::sealed_copy(path, bytes)?;
        self.library_fd = Some((path.to_path_buf(), Arc::new(fd)));
        Ok(self)
    }

    /// Runs its runners as `user` (the host must be root): user and group
    /// set, supplementary groups dropped, before the runner starts.
    pub fn run_as(mut self, user: crate::sandbox::RunAs) -> Self {
        self.run_as = Some(user);
        self
    }

    /// Counts its runners in `runners` from their start: a host that
    /// stops ends them all, whatever they are doing.
    pub(crate) fn counted_in(mut self, runners: Arc<Runners>) -> Self {
        self.runners = Some(runners);
        self
    }

    /// The limits its runners get.
    pub fn limits(&self) -> &ProcessLimits {
        &self.limits
    }

    /// The program started: the runner, or the Python interpreter.
    fn program(&self) -> &Path {
        match &self.launch {
            Launch::Native { runner, .. } => runner,
            Launch::Python { interpreter, .. } => interpreter,
        }
    }

    /// Starts a runner for `library`, refused when its plan requires
    /// confinement (`--require-confinement`) and it reports any part
    /// unconfined, or no confinement at all: it is stopped before any of
    /// the plugin's code is constructed.
    ///
    /// A runner handed a plan that leaves parts of it out of its report is
    /// otherwise served, those parts shown unconfined (and logged).
    fn spawn(&self, library: &Path) -> Result<Child, SpawnError> {
        let mut child = self.launch(library)?;
        let Some(plan) = &self.confinement else {
            return Ok(child);
        };
        if plan.required
            && let Some(why) = crate::sandbox::unconfined(child.hello().confinement.as_ref())
        {
            // Dropping it stops the runner.
            drop(child);
            return Err(SpawnError::Unconfined(why));
        }
        let (report, missing) = crate::sandbox::against_plan(child.hello.confinement.take());
        if !missing.is_empty() {
            tracing::warn!(
                plugin = %self.plugin,
                runner = %self.program().display(),
                "the plugin's runner did not report these parts of its confinement plan, shown \
                 unconfined: {}",
                missing.join(", ")
            );
        }
        child.hello.confinement = Some(report);
        Ok(child)
    }

    fn launch(&self, library: &Path) -> Result<Child, SpawnError> {
        if self.runners.as_deref().is_some_and(Runners::is_closed) {
            return Err(SpawnError::Stopping);
        }
        // Never the descriptors the server's connections need; claimed
        // until this start has made its own (taken by `Child::start`).
        let mut claim = Some(headroom::check_descriptors().map_err(SpawnError::Start)?);
        let opts = SpawnOptions {
            plugin: &self.plugin,
            memory_limit_mib: self.limits.memory_limit_mib,
            max_response_bytes: self.limits.max_response_bytes,
            runners: self.runners.as_deref(),
            stack_signal: matches!(self.launch, Launch::Python { .. })
                .then_some(crate::python::STACK_SIGNAL),
        };
        let mut common = vec![
            OsString::from("--memory-limit-mb"),
            self.limits.memory_limit_mib.to_string().into(),
            "--plugin".into(),
            self.plugin.clone().into(),
        ];
        // The checked library's memory file, at the same number in the
        // runner (`pass_fd`). (Landlock needs no rule for it: a memory file
        // is on no filesystem a rule can name, and is not restricted.)
        let library_fd = match (&self.launch, &self.library_fd) {
            (Launch::Native { .. }, Some((checked, fd))) if checked == library => {
                Some(fd.as_raw_fd())
            }
            (Launch::Native { .. }, Some((checked, _))) => {
                tracing::warn!(
                    plugin = %self.plugin,
                    "the checked bytes are those of {}, not of {}: the runner loads the file",
                    checked.display(),
                    library.display()
                );
                None
            }
            _ => None,
        };
        // The plan's environment is the runner's whole environment, with
        // what the protocol and the memory limit need (a zygote's runner
        // sets it itself, from the plan).
        let limited = self.limits.memory_limit_mib > 0;
        let plan = self.confinement.as_ref().map(|plan| {
            let mut plan = plan.clone();
            let runtime = spawn::runner_env(limited);
            plan.env
                .extend(runtime.into_iter().map(|(k, v)| (k.to_owned(), v)));
            // A thread count its manifest's grant passes wins.
            for (var, threads) in spawn::thread_caps(limited) {
                plan.env.entry(var.to_owned()).or_insert(threads);
            }
            plan
        });
        if let Some(plan) = &plan {
            common.extend(["--confine".into(), plan.to_arg().into()]);
        }
        let run_as = self.run_as;
        let confine_env = |command: &mut Command| {
            match &plan {
                // The plan's environment holds the thread counts already.
                Some(plan) => {
                    command.env_clear().envs(&plan.env);
                }
                None => spawn::cap_threads(command, limited, true),
            }
            if let Some(user) = run_as {
                user.set_on(command);
            }
        };
        match &self.launch {
            Launch::Native {
                runner,
                runner_args,
            } => {
                let mut command = Command::new(runner);
                command
                    .args(runner_args)
                    .arg("--library")
                    .arg(library)
                    .args(common)
                    // A result over it is then the tool's error, not an
                    // answer the host ends the runner for.
                    .arg("--max-response-bytes")
                    .arg(self.limits.max_response_bytes.to_string());
                if let Some(fd) = library_fd {
                    command.arg("--library-fd").arg(fd.to_string());
                    spawn::pass_fd(&mut command, fd);
                }
                confine_env(&mut command);
                Child::spawn(command, None, &opts, self.limits.init_timeout, &mut claim)
            }
            Launch::Python {
                interpreter,
                plugin_dir,
                entry,
                installed,
                sources,
            } => {
                let mut argv = python_runner_args(plugin_dir, entry, *installed);
                let sources = sources.as_deref();
                argv.extend(common);
                // A result over the host's limit is then a tool error, not
                // an answer the host kills the runner for.
                argv.extend([
                    "--max-response-bytes".into(),
                    self.limits.max_response_bytes.to_string().into(),
                    // The host's bound on a result's values: the runner
                    // counts them as it converts, and refuses a result
                    // past it before encoding it.
                    "--max-result-values".into(),
                    crate::json_text::max_result_values().to_string().into(),
                ]);
                if crate::plugin_log::debug_lines_logged() {
                    argv.extend(["--log-level".into(), "debug".into()]);
                }
                // The zygote's wait, when it did not fork within the start's
                // limit: the runner started on its own then has a limit of
                // its own, and a reason that said one limit for a start
                // that took both misled.
                let mut zygote_waited = None;
                let tried = std::time::Instant::now();
                if zygote::enabled() {
                    let key =
                        zygote::ZygoteKey::new(interpreter, &self.limits, run_as, plan.is_some());
                    let env = plan.as_ref().map(|plan| &plan.env);
                    match zygote::zygote_for(&key).map(|z| {
                        Child::fork(
                            &z,
                            &argv,
                            (env, sources),
                            &opts,
                            self.limits.init_timeout,
                            &mut claim,
                        )
                    }) {
                        Ok(Err(SpawnError::Start(e))) | Err(e) => {
                            if e.kind() == std::io::ErrorKind::TimedOut {
                                zygote_waited = Some(tried.elapsed());
                            }
                            tracing::debug!(
                                plugin = %self.plugin,
                                "no Python zygote ({e}): starting the runner on its own"
                            );
                        }
                        Ok(spawned) => return spawned,
                    }
                }
                // A fork that got as far as its start gave its claim up.
                if claim.is_none() {
                    claim = Some(headroom::check_descriptors().map_err(SpawnError::Start)?);
                }
                // Not on its stdout: what the interpreter's start prints
                // (a `.pth` file, `sitecustomize`) goes to the log.
                let protocol = child::ProtocolPipe::new().map_err(SpawnError::Start)?;
                let mut command = Command::new(interpreter);
                command.args(python_invocation(run_as));
                protocol.pass_to(&mut command);
                command.args(argv);
                if let Some(fd) = sources {
                    // At the same number in the runner (`pass_fd`).
                    command.arg("--sources-fd").arg(fd.as_raw_fd().to_string());
                    spawn::pass_fd(&mut command, fd.as_raw_fd());
                }
                confine_env(&mut command);
                let spawned = Child::spawn(
                    command,
                    Some(protocol),
                    &opts,
                    self.limits.init_timeout,
                    &mut claim,
                );
                match (spawned, zygote_waited) {
                    (Err(SpawnError::TimedOut(None)), Some(waited)) => {
                        Err(SpawnError::TimedOut(Some(format!(
                            "the start of a fresh interpreter, after its zygote had not forked \
                             within {}",
                            forgesyte_errors::fmt_duration(waited)
                        ))))
                    }
                    (spawned, _) => spawned,
                }
            }
        }
    }

    /// What a start was to run: the runner or the interpreter, by path.
    fn what_starts(&self) -> String {
        let what = match self.launch {
            Launch::Native { .. } => "the plugin runner",
            Launch::Python { .. } => "the Python interpreter",
        };
        format!("{what} {}", self.program().display())
    }

    /// The error of a start that failed with `e`: the host's lack of
    /// resources ([`ImportError::HostResources`]), or the start's own
    /// ([`ImportError::NotStarted`], naming the program: it was `cannot
    /// open …/plugin.py: cannot start the Python interpreter …`).
    fn start_failed(&self, e: &std::io::Error) -> ImportError {
        match headroom::host_short(e) {
            Some(detail) => ImportError::HostResources {
                what: self.what_starts(),
                detail,
            },
            None => ImportError::NotStarted {
                detail: self.start_error(e),
            },
        }
    }

    /// The reason of a start that failed with `e`, as text.
    fn start_error(&self, e: &std::io::Error) -> String {
        let what = self.what_starts();
        match (headroom::host_short(e), self.run_as) {
            (Some(short), _) => format!("cannot start {what}: {short}"),
            // What the server's user may run, the runner's may not.
            (None, Some(user)) if e.kind() == std::io::ErrorKind::PermissionDenied => format!(
                "cannot start {what} as the runner user (uid {}, gid {}): {e}; that user must \
                 be able to reach and execute it (and, for Python, read its library), and the \
                 server to switch to that user",
                user.uid, user.gid
            ),
            (None, _) => format!("cannot start {what}: {e}"),
        }
    }

    fn version_mismatch(&self, runner: u32) -> ImportError {
        ImportError::ProtocolMismatch {
            runner: self.program().display().to_string(),
            host: PROTOCOL_VERSION,
            runner_version: runner,
        }
    }

    fn handshake_timeout(&self, stuck_at: Option<String>) -> TimeoutError {
        let mut timeout =
            crate::manifest::Limits::init_timed_out("handshake", self.limits.init_timeout);
        timeout.stuck_at = stuck_at;
        timeout
    }
}

/// The refusal of a runner whose hello says it is not wholly confined
/// (`why`), when confinement is required.
fn came_back_unconfined(why: &str) -> ImportError {
    ImportError::NotConfined {
        detail: format!("the plugin's runner came back unconfined: {why}"),
    }
}

/// Starts the Python zygote that the runners of `interpreter` under
/// `limits` (run as `run_as`, `confined` or not) will be forked from,
/// unless it runs already or zygotes are off: for a load pass to call
/// before its dependency and integrity checks, so that the zygote's
/// interpreter start (the longest part of a Python plugin's start-up)
/// overlaps them. A zygote that cannot
/// start is only logged: the runner's own spawn tries again, and reports.
pub(crate) fn prestart_python_zygote(
    interpreter: &Path,
    limits: &ProcessLimits,
    run_as: Option<crate::sandbox::RunAs>,
    confined: bool,
) {
    if !zygote::enabled() {
        return;
    }
    let key = zygote::ZygoteKey::new(interpreter, limits, run_as, confined);
    if let Err(e) = zygote::zygote_for(&key) {
        tracing::debug!(
            interpreter = %interpreter.display(),
            "cannot start a Python zygote ahead of its runners: {e}"
        );
    }
}

/// A connected pair of Unix sockets of sequenced packets, close-on-exec:
/// the host's end and the other process's (a runner's shared-memory
/// socket, a zygote's control socket).
pub(crate) fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// How the interpreter starts the runner: from the cache of this user's, or
/// from source for a runner that runs as another user (who cannot read it).
pub(crate) fn python_invocation(run_as: Option<crate::sandbox::RunAs>) -> [OsString; 3] {
    match run_as {
        Some(_) => crate::python::runner_source_invocation(),
        None => crate::python::runner_invocation(),
    }
}

impl Importer for ProcessImporter {
    fn stop_starting(&self) {
        if let Some(runners) = &self.runners {
            runners.stop_starting_of(&self.plugin, "let go by the host while it restarted");
        }
    }

    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        if let Launch::Native { .. } = self.launch {
            if !path.is_file() {
                return Err(ImportError::LibraryNotFound {
                    path: path.to_path_buf(),
                });
            }
            // The same checks as in-process, before anything runs: a
            // complete ELF shared object with an acceptable build fingerprint.
            crate::native::inspect(path)?;
        }
        let child = self.spawn(path).map_err(|e| match e {
            SpawnError::Start(e) => self.start_failed(&e),
            SpawnError::Import(wire) => (*wire).into_import(path),
            SpawnError::Version { runner } => self.version_mismatch(runner),
            SpawnError::Died(report) => match &report.crash {
                // A runner ends by itself before its hello only when it is
                // not a forgesyte runner (`--runner /bin/true`): said so.
                Some(CrashError {
                    cause: CrashCause::Exit { code: 0 },
                    ..
                }) => ImportError::NotStarted {
                    detail: match self.launch {
                        Launch::Native { .. } => format!(
                            "{} exited with code 0 before it said its hello: is it a forgesyte \
                             runner (--runner)?",
                            self.what_starts()
                        ),
                        // `"python": "/bin/true"`, or a module that ended
                        // the process as it was imported.
                        Launch::Python { .. } => format!(
                            "{} exited with code 0 before the runner said its hello: it is no \
                             Python 3 interpreter (the manifest's \"python\", --python), or the \
                             plugin's module ended the process as it was imported (os._exit(0))",
                            self.what_starts()
                        ),
                    },
                },
                Some(crash) => ImportError::Crashed(crash.clone()),
                None => ImportError::Open {
                    path: path.to_path_buf(),
                    detail: report.reason.clone(),
                },
            },
            SpawnError::TimedOut(stuck_at) => {
                ImportError::TimedOut(self.handshake_timeout(stuck_at))
            }
            SpawnError::Unconfined(why) => came_back_unconfined(&why),
            // Nothing of the plugin's file: "cannot open plugin.py" read as
            // if the file were at fault.
            SpawnError::Stopping => ImportError::NotStarted {
                detail: STOPPING.to_owned(),
            },
        })?;
        Ok(Arc::new(ProcessLibrary {
            importer: self.clone(),
            path: path.to_path_buf(),
            spare: Mutex::new(Some(child)),
        }))
    }
}

/// A library that loaded in a runner; each instance gets its own runner.
#[derive(Debug)]
pub struct ProcessLibrary {
    importer: ProcessImporter,
    path: PathBuf,
    spare: Mutex<Option<Child>>,
}

impl PluginLibrary for ProcessLibrary {
    fn instantiate(&self, config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError> {
        let spare = self.spare.lock().take();
        let child = match spare {
            Some(child) => child,
            None => self.importer.spawn(&self.path).map_err(|e| match e {
                SpawnError::Start(e) => InitError::Failed {
                    message: self.importer.start_error(&e),
                },
                SpawnError::Import(wire) => {
                    let import = (*wire).into_import(&self.path);
                    InitError::Failed {
                        message: match import {
                            // Not the library: the runner refused itself.
                            ImportError::NotConfined { .. } => import.to_string(),
                            other => format!("the library no longer loads: {other}"),
                        },
                    }
                }
                SpawnError::Version { runner } => InitError::Failed {
                    message: self.importer.version_mismatch(runner).to_string(),
                },
                SpawnError::Died(report) => match &report.crash {
                    Some(crash) => InitError::Crashed(crash.clone()),
                    None => InitError::Failed {
                        message: report.reason.clone(),
                    },
                },
                SpawnError::TimedOut(stuck_at) => {
                    InitError::TimedOut(self.importer.handshake_timeout(stuck_at))
                }
                SpawnError::Unconfined(why) => InitError::Failed {
                    message: came_back_unconfined(&why).to_string(),
                },
                SpawnError::Stopping => InitError::Failed {
                    message: STOPPING.to_owned(),
                },
            })?,
        };
        let limits = self.importer.limits;
        if serde_json::from_slice::<serde::de::IgnoredAny>(config).is_err() {
            return Err(InitError::Protocol {
                detail: "the construction config is not JSON".into(),
            });
        }
        let reply = child.request(
            |id| format!(r#"{{"op":"create","id":{id},"config":"#).into_bytes(),
            &[config, b"}"],
            &[],
            limits.init_timeout,
        );
        let tools = match reply {
            Ok(Reply::Answer(Response::Created { tools, .. }, _)) => tools,
            Ok(Reply::Answer(Response::InitFailed { error, .. }, _)) => {
                return Err(error.into_init());
            }
            Ok(Reply::Answer(other, _)) => {
                return Err(InitError::Protocol {
                    detail: format!(
                        "unexpected '{}' answer to construction",
                        forgesyte_protocol::wire::response_kind(&other)
                    ),
                });
            }
            Ok(Reply::Greeting(_)) => {
                return Err(InitError::Protocol {
                    detail: "a second greeting".into(),
                });
            }
            Ok(Reply::Died(report)) | Err(Some(report)) => return Err(init_crash(&report)),
            Ok(Reply::Unreceived(detail)) => {
                return Err(InitError::Failed {
                    message: format!("the host could not take the plugin's answer: {detail}"),
                });
            }
            Err(None) => {
                let timeout = child.kill_timed_out(
                    crate::manifest::Limits::init_timed_out("init", limits.init_timeout),
                    |timeout| InitError::TimedOut(timeout).into(),
                );
                return Err(InitError::TimedOut(timeout));
            }
        };
        crate::host::check_tool_list(&tools)?;
        child.constructed();
        let serial = (!child.hello().can(capability::CONCURRENT_CALLS)).then(|| Mutex::new(()));
        Ok(Box::new(ProcessInstance {
            child,
            tools: Arc::from(tools),
            call_timeout: limits.call_timeout,
            serial,
        }))
    }
}

fn init_crash(report: &crate::host::ExitReport) -> InitError {
    match &report.crash {
        Some(crash) => InitError::Crashed(crash.clone()),
        None => InitError::Failed {
            message: report.reason.clone(),
        },
    }
}

/// Why no runner started: the host is stopping.
const STOPPING: &str = "not loaded: the host is stopping (no runner starts)";

#[cfg(test)]
mod tests {
    use super::child::KillReason;
    use super::*;
    use forgesyte_errors::ToolError;
    use std::time::Instant;

    use crate::CallContext;
    use transport::ATOMIC_FRAME;

    #[test]
    fn a_stopping_host_starts_no_runner_and_says_so() {
        let runners = Arc::new(Runners::default());
        runners.close();
        // A runner that does not exist: were it started, the error would
        // be that it cannot be.
        let importer = ProcessImporter::new(
            "/nonexistent/forgesyte-runner",
            "p",
            ProcessLimits::default(),
        )
        .counted_in(runners);
        assert!(matches!(
            importer.launch(Path::new("/nonexistent/lib.so")),
            Err(SpawnError::Stopping)
        ));
    }

    #[test]
    fn a_manifest_may_lower_the_hosts_answer_limit_never_raise_it() {
        let host = ProcessLimits {
            max_response_bytes: 64 * MIB,
            ..ProcessLimits::default()
        };
        let asking = |mb| Limits {
            max_response_mb: Some(mb),
            ..Limits::default()
        };
        assert_eq!(host.with_manifest(&asking(2)).max_response_bytes, 2 * MIB);
        assert_eq!(host.response_above_host(&asking(2)), None);
        assert_eq!(host.with_manifest(&asking(64)).max_response_bytes, 64 * MIB);
        assert_eq!(
            host.with_manifest(&asking(4096)).max_response_bytes,
            64 * MIB
        );
        assert_eq!(host.response_above_host(&asking(4096)), Some(4096));
        let none = Limits::default();
        assert_eq!(host.with_manifest(&none).max_response_bytes, 64 * MIB);
        assert_eq!(host.response_above_host(&none), None);
    }

    /// A runner that takes one call at a time (no `concurrent_calls`):
    /// `sleep` sleeps `{"ms": N}` and answers with its pid.
    const SERIAL_RUNNER: &str = r#"
import json, os, struct, sys, time
inp, out = sys.stdin.buffer, sys.stdout.buffer
def send(message):
    header = json.dumps(message).encode()
    body = struct.pack("<II", len(header), 0) + header
    out.write(struct.pack("<I", len(body)) + body)
    out.flush()
def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data
send({"type": "hello", "protocol": 2, "runtime": "serial", "runtime_version": "1",
      "pid": os.getpid(), "capabilities": ["attachments"] + sys.argv[1:]})
while True:
    (length,) = struct.unpack("<I", read_exact(4))
    body = read_exact(length)
    header_len, count = struct.unpack_from("<II", body)
    at = 8 + 4 * count
    request = json.loads(body[at:at + header_len])
    if request["op"] == "create":
        send({"type": "created", "id": request["id"], "tools": [{"id": "sleep"}]})
    else:
        time.sleep(request["args"].get("ms", 0) / 1000)
        send({"type": "result", "id": request["id"], "result": {"pid": os.getpid()}})
"#;

    fn serial_instance(call_timeout: Duration) -> Box<dyn PluginInstance> {
        fake_runner_instance(call_timeout, &[])
    }

    /// The runner above, announcing `capabilities` besides `attachments`.
    fn fake_runner_instance(
        call_timeout: Duration,
        capabilities: &[&str],
    ) -> Box<dyn PluginInstance> {
        let limits = ProcessLimits {
            init_timeout: Duration::from_secs(10),
            call_timeout,
            memory_limit_mib: 0,
            max_response_bytes: MIB,
        };
        let mut command = Command::new("python3");
        command.arg("-c").arg(SERIAL_RUNNER).args(capabilities);
        let child = Child::spawn(
            command,
            None,
            &SpawnOptions {
                plugin: "serial",
                memory_limit_mib: 0,
                max_response_bytes: MIB,
                runners: None,
                stack_signal: None,
            },
            limits.init_timeout,
            &mut None,
        )
        .expect("python3 runs the serial runner");
        let library = ProcessLibrary {
            importer: ProcessImporter::new("python3", "serial", limits),
            path: PathBuf::from("unused"),
            spare: Mutex::new(Some(child)),
        };
        library.instantiate(b"{}").expect("created")
    }

    fn sleep(instance: &dyn PluginInstance, ms: u64) -> Result<serde_json::Value, ToolError> {
        let args = format!(r#"{{"ms":{ms}}}"#);
        instance
            .call("sleep", args.as_bytes())
            .map(|bytes| serde_json::from_slice(&bytes).expect("the fake answers JSON"))
    }

    #[test]
    fn a_call_queued_past_its_timeout_fails_alone_and_the_runner_lives_on() {
        let timeout = Duration::from_millis(2000);
        let instance: Arc<dyn PluginInstance> = Arc::from(serial_instance(timeout));
        let pid = instance.pid();
        // Two calls of 1.4 s each, one after the other: the second ends at
        // 2.8 s, both within their own timeout. A third call queued at
        // 0.2 s has waited its 2 s at 2.2 s, while the second still runs.
        let spawn = |ms: u64| {
            let instance = Arc::clone(&instance);
            std::thread::spawn(move || sleep(&*instance, ms))
        };
        let first = spawn(1400);
        std::thread::sleep(Duration::from_millis(100));
        let second = spawn(1400);
        std::thread::sleep(Duration::from_millis(100));
        let queued_at = Instant::now();
        let third = sleep(&*instance, 0);
        let waited = queued_at.elapsed();
        assert_eq!(third, Err(ToolError::QueueTimedOut { after: timeout }));
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(1000),
            "{waited:?}"
        );
        // The runner was not killed: the calls ahead finish, and the
        // next call runs in the same process.
        let answer = serde_json::json!({"pid": pid});
        assert_eq!(first.join().expect("first"), Ok(answer.clone()));
        assert_eq!(second.join().expect("second"), Ok(answer.clone()));
        assert_eq!(sleep(&*instance, 0), Ok(answer));
    }

    #[tokio::test]
    async fn an_awaited_call_answers_or_kills_its_runner_past_its_timeout() {
        let context = CallContext::default();
        let serial = serial_instance(Duration::from_secs(5));
        assert!(
            !serial.awaitable("sleep", b"{}", &context),
            "one call at a time"
        );
        let timeout = Duration::from_millis(300);
        let instance: Arc<dyn PluginInstance> = Arc::from(fake_runner_instance(
            timeout,
            &[capability::CONCURRENT_CALLS],
        ));
        assert!(instance.awaitable("sleep", br#"{"ms":0}"#, &context));
        let spaces = vec![b' '; ATOMIC_FRAME];
        assert!(!instance.awaitable("sleep", &spaces, &context), "too large");
        let call = |args: &[u8]| Arc::clone(&instance).call_async("sleep", args.to_vec(), &context);
        let output = call(br#"{"ms":0}"#).await.unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&output.json).unwrap();
        assert_eq!(answer, serde_json::json!({"pid": instance.pid()}));
        assert!(matches!(
            call(b"{").await,
            Err(ToolError::InvalidArgs { .. })
        ));
        // Past its timeout: the runner is killed, and dead when the call
        // returns.
        let started = Instant::now();
        assert_eq!(
            call(br#"{"ms":5000}"#).await,
            Err(ToolError::TimedOut { after: timeout })
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(instance.wait_stopped(Duration::ZERO), "not dead yet");
        // Reaped, its number may be another process's by now: none.
        assert_eq!(instance.pid(), None);
        // A call to the dead runner gets its end.
        let after = call(br#"{"ms":0}"#).await;
        assert!(
            matches!(&after, Err(ToolError::Crashed(c)) if c.to_string().contains("timed out after 300 ms")),
            "{after:?}"
        );
    }

    /// The fake runner, taking several calls at once, started for `plugin`.
    fn concurrent_child(plugin: &'static str) -> Child {
        let mut command = Command::new("python3");
        command
            .arg("-c")
            .arg(SERIAL_RUNNER)
            .arg(capability::CONCURRENT_CALLS);
        let options = SpawnOptions {
            plugin,
            memory_limit_mib: 0,
            max_response_bytes: MIB,
            runners: None,
            stack_signal: None,
        };
        Child::spawn(command, None, &options, Duration::from_secs(10), &mut None).unwrap()
    }

    /// A call that finds its runner condemned (its kill decided: the host
    /// waits for its stacks after another call's timeout) is not sent: it
    /// fails at once as stopped, not as the runner's crash, and the runner
    /// got nothing of it.
    #[test]
    fn a_call_to_a_condemned_runner_is_not_sent() {
        let child = concurrent_child("condemned");
        let head =
            |id: u64| format!(r#"{{"op":"call","id":{id},"tool":"sleep","args":"#).into_bytes();
        let tail: &[&[u8]] = &[br#"{"ms":0}"#, b"}"];
        let answered = |reply: Result<Reply, Option<Arc<crate::host::ExitReport>>>| {
            matches!(reply, Ok(Reply::Answer(Response::Result { .. }, _)))
        };
        assert!(answered(child.request(
            head,
            tail,
            &[],
            Duration::from_secs(5)
        )));
        *child.shared.kill_reason.lock() = Some(KillReason {
            provisional: true,
            ..KillReason::host("TimeoutError: timed out after 1 s during tool 'slow'")
        });
        let started = Instant::now();
        match child.request(head, tail, &[], Duration::from_secs(5)) {
            Err(Some(report)) => {
                assert!(report.crash.is_none() && report.unsent, "{report:?}");
                assert!(
                    report.reason.contains("its runner was being ended")
                        && report.reason.contains("timed out after 1 s"),
                    "{}",
                    report.reason
                );
            }
            other => panic!("{:?}", other.map(|_| "a reply")),
        }
        assert!(matches!(
            child.try_send(head, tail),
            super::transport::TrySend::Closed(Some(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
        // Reprieved (a test only): it answers, having seen nothing.
        *child.shared.kill_reason.lock() = None;
        assert!(answered(child.request(
            head,
            tail,
            &[],
            Duration::from_secs(5)
        )));
        child.kill(KillReason::host("the test is over"));
    }

    #[test]
    fn a_plugin_s_runners_still_starting_are_killed_and_no_other() {
        let runners = Arc::new(Runners::default());
        let start = |plugin: &'static str| {
            let mut command = Command::new("python3");
            command.arg("-c").arg(SERIAL_RUNNER);
            let options = SpawnOptions {
                plugin,
                memory_limit_mib: 0,
                max_response_bytes: MIB,
                runners: Some(&runners),
                stack_signal: None,
            };
            Child::spawn(command, None, &options, Duration::from_secs(10), &mut None).unwrap()
        };
        let (ours, other) = (start("ours"), start("other"));
        runners.stop_starting_of("ours", "let go by the test");
        let report = ours.wait_dead(Duration::from_secs(10)).expect("killed");
        assert!(
            report.reason.contains("let go by the test"),
            "{}",
            report.reason
        );
        assert!(
            other.wait_dead(Duration::from_millis(300)).is_none(),
            "another plugin's"
        );
        other.kill(KillReason::host("the test is over"));
    }

    #[test]
    fn a_task_s_kill_does_not_wait_for_a_reaper_holding_the_process() {
        let child = Arc::new(concurrent_child("serial"));
        let reason = || KillReason::host("killed by the test");
        // The reaper's wait for a death holds the process's lock.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let child = Arc::clone(&child);
            std::thread::spawn(move || {
                let _process = child.hold_process();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv_timeout(Duration::from_secs(30));
            })
        };
        held_rx.recv().unwrap();
        let started = Instant::now();
        child.kill_from_task(reason());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(
            child.wait_dead(Duration::from_millis(200)).is_none(),
            "left to the reaper"
        );
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        child.kill_from_task(reason());
        let report = child.wait_dead(Duration::from_secs(10)).expect("killed");
        assert!(
            report.reason.contains("killed by the test"),
            "{}",
            report.reason
        );
    }

    #[test]
    fn an_awaited_call_needs_no_free_thread_to_time_out_and_kill() {
        // Every thread of the blocking pool busy (slow in-process calls):
        // the kill past the timeout and the wait for the death wait for
        // none of them.
        let (runtime, release) = crate::host::starved_runtime();
        let timeout = Duration::from_millis(300);
        let instance: Arc<dyn PluginInstance> = Arc::from(fake_runner_instance(
            timeout,
            &[capability::CONCURRENT_CALLS],
        ));
        let context = CallContext::default();
        let call = |args: &[u8]| Arc::clone(&instance).call_async("sleep", args.to_vec(), &context);
        let started = Instant::now();
        assert_eq!(
            runtime.block_on(call(br#"{"ms":5000}"#)),
            Err(ToolError::TimedOut { after: timeout })
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(instance.wait_stopped(Duration::ZERO), "not dead yet");
        drop(release);
    }
}
