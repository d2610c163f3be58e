//! Python zygotes: one pre-started interpreter per (interpreter, memory
//! set-up) that forks a runner per plugin, so N Python plugins cost one
//! interpreter start-up and the runner's imports once, not N times in
//! series on the machine's cores.
//!
//! The zygote is the Python runner itself (`runner --zygote`, `python/runner/zygote.py`), started
//! like any runner (own process group, `SIGKILL` when the server dies). Its
//! stdin is a `SOCK_SEQPACKET` socket to the host: the host sends a spawn
//! request with the runner's arguments and three descriptors (the runner's
//! stdin, stdout and stderr pipes, by `SCM_RIGHTS`), and a fourth, its
//! shared-memory socket, when shared memory is on; the zygote forks, and
//! the child becomes exactly the runner those arguments describe. The
//! message format is in `python/runner/zygote.py` (`_Zygote`).
//!
//! A forked runner is the zygote's child, not the host's, so the host cannot
//! `waitpid` it: the zygote reports each exit status *without reaping the
//! child* (`waitid(WNOWAIT)`), the host records it, kills what is left of the
//! runner's process group, and only then tells the zygote to reap. Until
//! then the pid and the group stay reserved, so a signal from the host
//! never reaches a recycled pid. When the zygote itself dies, its runners
//! get `SIGKILL` (their parent-death signal) and every one still running
//! is reported as ended with the zygote; the next spawn starts a new zygote.
//!
//! This module knows processes and sockets, not the wire protocol the
//! runners speak: that stays [`super::transport`]'s.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::net::{RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::Deserialize;
use serde_json::json;

use super::spawn::spawn_supervised;

/// The environment variable that turns the zygote off (`0`): every Python
/// runner is then a fresh interpreter of its own.
pub const ZYGOTE_ENV: &str = "FORGESYTE_PYTHON_ZYGOTE";

/// `0` in the server's environment: a zygote makes no network namespace
/// for its confined runners to share (each makes one of its own). The
/// zygote reads it (`python/runner/zygote.py`).
const SHARED_NETNS_ENV: &str = "FORGESYTE_PYTHON_SHARED_NETNS";

/// The most descriptors a spawn message carries: stdin, stdout, stderr, the
/// shared-memory socket, the checked sources' and the environment's memory
/// files (`zygote.py` receives as many).
const MAX_SPAWN_FDS: usize = 6;

/// Largest control message the zygote sends (it accepts 1 MiB).
const MESSAGE_BYTES: usize = 64 * 1024;

/// Whether Python runners are forked by a zygote (the default): not when
/// [`ZYGOTE_ENV`] says `0`, `f`, `false`, `n`, `no` or `off` (as clap reads
/// the other boolean variables).
pub(crate) fn enabled() -> bool {
    enabled_by(std::env::var_os(ZYGOTE_ENV).as_deref())
}

fn enabled_by(value: Option<&std::ffi::OsStr>) -> bool {
    let off = |v: &std::ffi::OsStr| {
        let v = v.to_string_lossy();
        ["0", "f", "false", "n", "no", "off"]
            .iter()
            .any(|no| v.trim().eq_ignore_ascii_case(no))
    };
    !value.is_some_and(off)
}

/// How a zygote is set up: its runners inherit it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ZygoteKey {
    /// The interpreter.
    pub(crate) interpreter: PathBuf,
    /// `MALLOC_ARENA_MAX=2` (runners under a memory limit): glibc reads it
    /// once, at the interpreter's start.
    pub(crate) few_arenas: bool,
    /// The user it (and so every runner it forks) runs as.
    pub(crate) run_as: Option<crate::sandbox::RunAs>,
    /// Its runners are confined: it starts with the variables every runner
    /// keeps, not the server's whole environment (a runner could read the
    /// block it was started with), and makes itself not dumpable.
    pub(crate) confined: bool,
}

impl ZygoteKey {
    /// The zygote that forks the runners of `interpreter` under `limits`.
    pub(crate) fn new(
        interpreter: &std::path::Path,
        limits: &super::ProcessLimits,
        run_as: Option<crate::sandbox::RunAs>,
        confined: bool,
    ) -> Self {
        ZygoteKey {
            interpreter: interpreter.to_path_buf(),
            few_arenas: limits.memory_limit_mib > 0,
            run_as,
            confined,
        }
    }
}

/// How many zygotes of one key may end in a row before they forked (one
/// that cannot set itself up: no `ctypes`, a refused `prctl`, a broken
/// interpreter) before that key's runners are started on their own,
/// without asking for another: each costs a spawn an interpreter's start.
const UNFORKED_ENDS: u32 = 3;

/// The zygotes of each key, and how many of each ended before they forked.
#[derive(Default)]
struct Zygotes {
    live: HashMap<ZygoteKey, Arc<Zygote>>,
    unforked_ends: HashMap<ZygoteKey, u32>,
}

/// This process's zygotes.
fn zygotes() -> &'static Mutex<Zygotes> {
    static ZYGOTES: OnceLock<Mutex<Zygotes>> = OnceLock::new();
    ZYGOTES.get_or_init(Default::default)
}

/// How long [`end_zygotes`] waits for a killed zygote to be reapable.
const ZYGOTE_REAP_WAIT: Duration = Duration::from_secs(1);

/// For the host's end, once every runner has ended (a runner dies with
/// its zygote): kills the process group of every zygote it started (each
/// leads one), and reaps each (for up to a second). A zygote
/// ends by itself when the host goes, but an interpreter that is a wrapper
/// script (`python3 "$@"`, no `exec`) left what it started running,
/// orphaned; and one left unreaped is a zombie for whatever adopts it, which
/// may reap slowly (a container's first process: one per server restart
/// piled up). A zygote asked for later starts anew.
pub fn end_zygotes() {
    let live: Vec<Arc<Zygote>> = zygotes().lock().live.drain().map(|(_, z)| z).collect();
    for zygote in live {
        // Under the lock its reader reaps it with: not reaped, its pid
        // (and group id) is still its own.
        let mut process = zygote.process.lock();
        if matches!(process.try_wait(), Ok(None)) {
            kill_group(zygote.pid);
            let until = Instant::now() + ZYGOTE_REAP_WAIT;
            while matches!(process.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The zygote of `key`, started if there is none or the last one died
/// (unless [`UNFORKED_ENDS`] of them ended before they forked).
pub(crate) fn zygote_for(key: &ZygoteKey) -> io::Result<Arc<Zygote>> {
    let mut zygotes = zygotes().lock();
    let Zygotes {
        live,
        unforked_ends,
    } = &mut *zygotes;
    if let Some(zygote) = live.get(key) {
        if zygote.forked.load(std::sync::atomic::Ordering::Acquire) {
            // Only ends one after another count.
            unforked_ends.remove(key);
        }
        if !zygote.is_unusable() {
            match zygote.changed_site_dir() {
                None => return Ok(Arc::clone(zygote)),
                Some(dir) => zygote.retire(&dir),
            }
        }
        if let Some(why) = zygote.ended_unforked() {
            let ends = unforked_ends.entry(key.clone()).or_insert(0);
            *ends += 1;
            if *ends == UNFORKED_ENDS {
                tracing::warn!(
                    interpreter = %key.interpreter.display(),
                    "{UNFORKED_ENDS} Python zygotes ended before they forked (the last: {why}); \
                     the runners of this interpreter start on their own"
                );
            }
        }
        live.remove(key);
    }
    if let Some(&ends) = unforked_ends.get(key)
        && ends >= UNFORKED_ENDS
    {
        return Err(io::Error::other(format!(
            "{ends} Python zygotes of this interpreter ended before they forked"
        )));
    }
    let zygote = Zygote::start(key)?;
    live.insert(key.clone(), Arc::clone(&zygote));
    Ok(zygote)
}

/// An exit status the zygote reported (or why none will come).
type Status = Result<ExitStatus, String>;

/// Where the zygote's report of one runner's exit lands.
#[derive(Debug, Default)]
struct ExitSlot {
    status: Mutex<Option<Status>>,
    ended: Condvar,
}

impl ExitSlot {
    fn set(&self, status: Status) {
        let mut slot = self.status.lock();
        if slot.is_none() {
            *slot = Some(status);
        }
        self.ended.notify_all();
    }
}

/// What a spawning thread is told: the runner's pid and its exit slot, or
/// why there is none.
type Spawned = Result<(u32, Arc<ExitSlot>), String>;

/// Kills and reaps the process of this pid when dropped armed (`Some`).
struct KillOnError(Option<u32>);

impl Drop for KillOnError {
    fn drop(&mut self) {
        if let Some(pid) = self
            .0
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
}

#[derive(Default)]
struct State {
    dead: Option<String>,
    next_id: u64,
    spawning: HashMap<u64, SyncSender<Spawned>>,
    children: HashMap<u32, Arc<ExitSlot>>,
}

/// One running zygote.
pub(crate) struct Zygote {
    pid: u32,
    interpreter: PathBuf,
    control: Mutex<OwnedFd>,
    /// Pids the zygote may reap, for the reap writer thread: the reader
    /// thread never waits to write. (While the zygote sends a burst of exit
    /// reports it reads nothing; a reader that waited to send `reap` then
    /// waited on a zygote waiting on it, from about 560 exits at once.)
    reaps: std::sync::mpsc::Sender<u32>,
    state: Mutex<State>,
    /// A spawn found it not forking within [`FORK_TIMEOUT`] (stopped,
    /// stuck), or a site directory of its changed ([`Zygote::retire`]):
    /// later runners get a new zygote; its own runners stay.
    wedged: std::sync::atomic::AtomicBool,
    /// It has forked a runner: its interpreter is up, and [`FORK_TIMEOUT`]
    /// applies to its spawns (the first waits the spawn's own time limit,
    /// its interpreter's start-up included).
    forked: std::sync::atomic::AtomicBool,
    /// Kept so the process is reaped when the zygote ends.
    process: Mutex<std::process::Child>,
    /// Its site directories as they were at its start (its first message):
    /// their `.pth` files, an editable install's import hook among them,
    /// are read only at an interpreter's start.
    site: Mutex<Vec<(PathBuf, Option<i64>)>>,
    /// When the host started it (ns since the epoch): a directory changed
    /// since then, before its report, is changed too (its `.pth` files may
    /// have been read before the change).
    started_ns: i64,
}

/// How long a spawn waits for the zygote to take its request and fork,
/// whatever the runner's own start-up time, per spawn waiting before it
/// (the zygote forks one at a time): a healthy zygote forks in
/// milliseconds, and one that does not is wedged (see [`Zygote::wedged`]).
pub(crate) const FORK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a runner that has ended may wait for its zygote to report its
/// exit status before it is taken as ended without one.
pub(crate) const UNREPORTED_EXIT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for Zygote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote")
            .field("pid", &self.pid)
            .field("interpreter", &self.interpreter)
            .finish_non_exhaustive()
    }
}

/// What the zygote says (see `python/runner/zygote.py`).
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Said {
    Spawned {
        id: u64,
        pid: u32,
    },
    SpawnFailed {
        id: u64,
        error: String,
    },
    Exit {
        pid: u32,
        status: i32,
    },
    /// Its site directories and their modification times (ns; `None`:
    /// absent) when it started.
    Site {
        dirs: Vec<(PathBuf, Option<i64>)>,
    },
}

impl Zygote {
    fn start(key: &ZygoteKey) -> io::Result<Arc<Zygote>> {
        let (ours, theirs) = super::seqpacket_pair()?;
        let mut command = Command::new(&key.interpreter);
        if let Some(user) = key.run_as {
            user.set_on(&mut command);
        }
        command
            .args(super::python_invocation(key.run_as))
            .arg("--zygote");
        if key.confined {
            command
                .arg("--confined")
                .env_clear()
                .envs(crate::sandbox::runtime_env());
            if let Some(value) = std::env::var_os(SHARED_NETNS_ENV) {
                command.env(SHARED_NETNS_ENV, value);
            }
        }
        // Its runners keep its thread counts unless confined (their plan's
        // environment replaces it).
        super::spawn::cap_threads(&mut command, key.few_arenas, !key.confined);
        command
            .envs(super::spawn::runner_env(key.few_arenas))
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .unwrap_or(i64::MAX);
        let mut process = spawn_supervised(command)?;
        // Until it is set up, a failure (no thread to be had) kills and
        // reaps the zygote: dropped, it was left a zombie.
        let mut unfinished = KillOnError(Some(process.id()));
        let stderr = process.stderr.take();
        let reader = ours.try_clone()?;
        let zygote = Zygote::assemble(key.interpreter.clone(), ours, process, started_ns)?;
        tracing::debug!(
            pid = zygote.pid,
            interpreter = %key.interpreter.display(),
            "started a Python zygote"
        );
        if let Some(stderr) = stderr {
            let pid = zygote.pid;
            std::thread::Builder::new()
                .name(format!("forgesyte-zygote-stderr-{pid}"))
                // As a runner's: lines cut at 4 KiB, a rate budget, each
                // at its level (a line without an end grew the host's
                // memory, and a looping zygote flooded the log).
                .spawn(move || super::stderr::StderrLog::new("python-zygote", pid).read(stderr))?;
        }
        let for_reader = Arc::clone(&zygote);
        std::thread::Builder::new()
            .name(format!("forgesyte-zygote-{}", zygote.pid))
            .spawn(move || for_reader.read(reader))?;
        unfinished.0 = None;
        Ok(zygote)
    }

    /// The zygote of `process`, whose control socket is `control`, with
    /// its reap writer thread (the reader thread is the caller's).
    fn assemble(
        interpreter: PathBuf,
        control: OwnedFd,
        process: std::process::Child,
        started_ns: i64,
    ) -> io::Result<Arc<Zygote>> {
        let pid = process.id();
        let (reaps, to_reap) = std::sync::mpsc::channel::<u32>();
        let writer = control.try_clone()?;
        std::thread::Builder::new()
            .name(format!("forgesyte-zygote-reap-{pid}"))
            .spawn(move || {
                // Ends with the zygote (its `Sender` dropped) or its socket.
                for child in to_reap {
                    let reap = json!({"op": "reap", "pid": child}).to_string();
                    if send_on(&writer, reap.as_bytes(), &[], None).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Arc::new(Zygote {
            pid,
            interpreter,
            control: Mutex::new(control),
            reaps,
            state: Mutex::new(State::default()),
            wedged: std::sync::atomic::AtomicBool::new(false),
            forked: std::sync::atomic::AtomicBool::new(false),
            process: Mutex::new(process),
            site: Mutex::new(Vec::new()),
            started_ns,
        }))
    }

    fn is_dead(&self) -> bool {
        self.state.lock().dead.is_some()
    }

    /// Why it ended, when it did before it ever forked, of itself (not one
    /// the host gave up: its first spawn's time limit may be shorter than
    /// its interpreter's start on a loaded machine).
    fn ended_unforked(&self) -> Option<String> {
        if self.forked.load(std::sync::atomic::Ordering::Acquire)
            || self.wedged.load(std::sync::atomic::Ordering::Acquire)
        {
            return None;
        }
        self.state.lock().dead.clone()
    }

    /// Whether a later runner needs another zygote: this one ended, or
    /// did not fork in time.
    fn is_unusable(&self) -> bool {
        self.wedged.load(std::sync::atomic::Ordering::Acquire) || self.is_dead()
    }

    /// The first of its site directories that changed since it started (a
    /// package installed or removed there), if one did: one `stat` each. A
    /// directory changed while it started (its report's time at or after
    /// the start) counts: its `.pth` files may have been read before. (A
    /// `.pth` file rewritten in place changes no directory: not seen.)
    fn changed_site_dir(&self) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let site = self.site.lock();
        site.iter()
            .find(|(dir, then)| {
                let now = std::fs::metadata(dir).ok().map(|meta| {
                    meta.mtime()
                        .saturating_mul(1_000_000_000)
                        .saturating_add(meta.mtime_nsec())
                });
                now != *then || then.is_some_and(|t| t >= self.started_ns)
            })
            .map(|(dir, _)| dir.clone())
    }

    /// Retires it for a change of its site directory `dir`: later runners
    /// get a new zygote, which reads the directory's `.pth` files as they
    /// are now; its own runners stay (see [`Zygote::wedged`]).
    fn retire(&self, dir: &std::path::Path) {
        if !self.wedged.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::info!(
                pid = self.pid,
                "the Python zygote's site directory {} changed since it started (a package \
                 installed or removed there); later runners get a new one",
                dir.display()
            );
        }
        self.let_go_if_idle();
    }

    /// Marks it wedged (see [`Zygote::wedged`]); `why` completes "the
    /// Python zygote …" in the warning.
    fn wedge(&self, why: &str) {
        if !self.wedged.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::warn!(
                pid = self.pid,
                "the Python zygote {why}; later runners get a new one"
            );
        }
        self.let_go_if_idle();
    }

    /// Runner `pid` ended and the zygote did not say how: it is no longer
    /// the zygote's (which, stopped or stuck, is wedged, and let go once it
    /// has no runner left).
    fn lost_report(&self, pid: u32) {
        self.state.lock().children.remove(&pid);
        self.wedge(&format!(
            "did not report the end of runner {pid} within {} s",
            UNREPORTED_EXIT.as_secs()
        ));
    }

    /// A wedged zygote with no runner left and no spawn waiting is let go:
    /// its control socket is shut down, so it exits once it reads again,
    /// and the threads that serve it end. (Its runners, while it has any,
    /// need it: they die with it.)
    fn let_go_if_idle(&self) {
        if !self.wedged.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let idle = {
            let state = self.state.lock();
            state.children.is_empty() && state.spawning.is_empty()
        };
        if idle && let Some(control) = self.control.try_lock() {
            let _ = rustix::net::shutdown(&*control, rustix::net::Shutdown::Both);
        }
    }

    /// Forks a runner with arguments `argv` and the given stdio (the
    /// runner's ends of its pipes) and, with `shm`, its end of a
    /// shared-memory socket and the threshold, and with `env`, the values
    /// of its confined environment; waits at most `timeout` for its pid.
    ///
    /// The values go in a sealed memory file that only the forked runner
    /// reads: the zygote's memory, which every later runner starts from,
    /// never holds them.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        argv: &[OsString],
        stdio: [OwnedFd; 3],
        shm: Option<(OwnedFd, u64)>,
        (env, sources): (
            Option<&std::collections::BTreeMap<String, String>>,
            Option<&OwnedFd>,
        ),
        timeout: Duration,
    ) -> io::Result<ForkedChild> {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                a.to_str().map(str::to_owned).ok_or_else(|| {
                    io::Error::other(format!(
                        "a runner argument is not UTF-8: {}",
                        String::from_utf8_lossy(a.as_bytes())
                    ))
                })
            })
            .collect::<io::Result<_>>()?;
        // Everything that can fail is done before the spawn is counted as
        // one in progress: one left counted would keep a wedged zygote from being
        // let go, and loosen every later spawn's fork timeout.
        let mut message = json!({"op": "spawn", "argv": argv});
        let mut fds: Vec<OwnedFd> = stdio.into();
        if let Some((socket, threshold)) = shm {
            message["shm_threshold"] = json!(threshold);
            fds.push(socket);
        }
        // The checked sources' memory file (a copy of its descriptor),
        // then the environment's: the zygote takes them from the end.
        if let Some(sources) = sources {
            message["sources_fd"] = json!(true);
            fds.push(sources.try_clone()?);
        }
        if let Some(env) = env {
            let values = serde_json::to_vec(env).map_err(io::Error::other)?;
            message["env_fd"] = json!(true);
            fds.push(forgesyte_protocol::wire::shm::sealed(&values)?);
        }
        let (tx, rx) = sync_channel(1);
        let (id, ahead) = {
            let mut state = self.state.lock();
            if let Some(why) = &state.dead {
                return Err(io::Error::other(why.clone()));
            }
            state.next_id += 1;
            let id = state.next_id;
            let ahead = state.spawning.len();
            state.spawning.insert(id, tx);
            (id, ahead)
        };
        message["id"] = json!(id);
        let message = message.to_string();
        // The fork, the request's send included, within `FORK_TIMEOUT` for
        // it and for each spawn ahead of it (the zygote forks one at a
        // time), or the spawn's own, shorter, limit: a zygote that reads
        // nothing (stopped, or stuck) fails the spawn, and is not asked
        // again.
        let timeout = if self.forked.load(std::sync::atomic::Ordering::Acquire) {
            let turns = u32::try_from(ahead).unwrap_or(u32::MAX).saturating_add(1);
            timeout.min(FORK_TIMEOUT.saturating_mul(turns))
        } else {
            timeout
        };
        let deadline = Instant::now() + timeout;
        if let Err(e) = self.send(message.as_bytes(), &fds, deadline) {
            self.state.lock().spawning.remove(&id);
            if e.kind() == io::ErrorKind::TimedOut {
                self.wedge(&format!("took no request within {timeout:?}"));
            }
            return Err(e);
        }
        // The runner holds its ends now; the host's copies close here, so
        // the host sees the end of the runner's output when it ends.
        drop(fds);
        let answer = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        self.state.lock().spawning.remove(&id);
        // The exit slot comes with the pid: the runner may have ended, and
        // the reader taken its slot out of `children`, before this thread
        // woke (a lookup there then found the runner lost with its zygote).
        let (pid, slot) = match answer {
            Ok(Ok(spawned)) => spawned,
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => {
                self.wedge(&format!("did not fork within {timeout:?}"));
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the Python zygote (pid {}) did not fork within {timeout:?}",
                        self.pid
                    ),
                ));
            }
        };
        Ok(ForkedChild {
            pid,
            slot,
            zygote: Arc::clone(self),
        })
    }

    fn send(&self, message: &[u8], fds: &[OwnedFd], deadline: Instant) -> io::Result<()> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the Python zygote (pid {}) took no request for the spawn's whole time limit",
                    self.pid
                ),
            )
        };
        let socket = self
            .control
            .try_lock_until(deadline)
            .ok_or_else(timed_out)?;
        match send_on(&socket, message, fds, Some(deadline)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(timed_out()),
            other => other,
        }
    }

    /// The reader thread: spawn answers to their waiters, exit statuses to
    /// their runners; at the end, every runner still running is reported
    /// ended with the zygote.
    fn read(&self, socket: OwnedFd) {
        let mut buffer = vec![0u8; MESSAGE_BYTES];
        let why = loop {
            let n = match rustix::net::recv(&socket, &mut buffer[..], RecvFlags::empty()) {
                Ok((_, 0)) => break format!("its Python zygote (pid {}) exited", self.pid),
                Ok((_, n)) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    break format!("its Python zygote's (pid {}) socket failed: {e}", self.pid);
                }
            };
            match serde_json::from_slice::<Said>(&buffer[..n.min(buffer.len())]) {
                Ok(said) => self.handle(said),
                Err(e) => {
                    break format!(
                        "its Python zygote (pid {}) said something unreadable: {e}",
                        self.pid
                    );
                }
            }
        };
        // Its runners get SIGKILL as it goes (their parent-death signal).
        let why = format!("{why}, and its runners with it");
        let (spawning, children) = {
            let mut state = self.state.lock();
            state.dead = Some(why.clone());
            (
                std::mem::take(&mut state.spawning),
                std::mem::take(&mut state.children),
            )
        };
        // What the runners started goes too: each runner leads a process
        // group, which outlives it while a process it started lives (and
        // its id is given to no new process meanwhile). The runners' own
        // pids are not signalled: once the zygote is gone, whoever reaps
        // them may free their pids.
        for &pid in children.keys() {
            kill_only_group(pid);
        }
        // And what the zygote started itself, in its own group (it leads
        // one): an interpreter that is a wrapper script left its children
        // behind, orphaned, when only its pid was killed.
        kill_group(self.pid);
        let _ = self.process.lock().wait();
        tracing::debug!(pid = self.pid, "{why}");
        for (_, tx) in spawning {
            let _ = tx.send(Err(why.clone()));
        }
        for (_, slot) in children {
            slot.set(Err(why.clone()));
        }
    }

    fn handle(&self, said: Said) {
        match said {
            Said::Spawned { id, pid } => {
                // No pid of a process the zygote could not have forked:
                // the host signals the pids it records (1 would mean every
                // process).
                if pid <= 1 || pid == std::process::id() || pid == self.pid {
                    if let Some(tx) = self.state.lock().spawning.remove(&id) {
                        let _ = tx.send(Err(format!(
                            "the Python zygote named pid {pid} as its new runner's"
                        )));
                    }
                    return;
                }
                self.forked
                    .store(true, std::sync::atomic::Ordering::Release);
                let mut state = self.state.lock();
                let slot = Arc::new(ExitSlot::default());
                state.children.insert(pid, Arc::clone(&slot));
                match state.spawning.remove(&id) {
                    Some(tx) => {
                        let _ = tx.send(Ok((pid, slot)));
                    }
                    // Forked after its spawn gave up (its time limit): no
                    // one would ever own or stop it. Killed, while unreaped
                    // (its exit, to come, is handled as any runner's).
                    None => kill_group(pid),
                }
            }
            Said::SpawnFailed { id, error } => {
                if let Some(tx) = self.state.lock().spawning.remove(&id) {
                    let _ = tx.send(Err(format!("the Python zygote could not fork: {error}")));
                }
            }
            Said::Site { dirs } => *self.site.lock() = dirs,
            Said::Exit { pid, status } => {
                // Only a runner of this zygote that the host has not seen
                // end (a pid it does not know, or knows ended and reaped,
                // may be anyone's by now): nothing is signalled otherwise.
                let Some(slot) = self.state.lock().children.remove(&pid) else {
                    return;
                };
                // What is left of its group goes first (the pid is not
                // reaped yet, so it is still this runner's), then the end
                // is recorded (whoever waits for it finds the group
                // killed; no signal goes to the pid after this), then the
                // zygote may reap it and free the pid.
                kill_group(pid);
                slot.set(Ok(ExitStatus::from_raw(status)));
                // Gone only with the zygote, which reaps nothing then.
                let _ = self.reaps.send(pid);
                self.let_go_if_idle();
            }
        }
    }
}

/// Sends one control message (with `fds`) on `socket`, waiting for room
/// until `deadline` (`WouldBlock` then), or for good with none. A SEQPACKET
/// message goes whole, so two threads may send on one socket.
fn send_on(
    socket: &OwnedFd,
    message: &[u8],
    fds: &[OwnedFd],
    deadline: Option<Instant>,
) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SPAWN_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        match rustix::net::sendmsg(
            socket,
            &[IoSlice::new(message)],
            &mut control,
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        ) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
        // No room: wait until there is, or the deadline.
        let left = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Some(Timespec::try_from(left).unwrap_or(Timespec {
                    tv_sec: i64::MAX,
                    tv_nsec: 0,
                }))
            }
        };
        let mut fds = [PollFd::new(socket, PollFlags::OUT)];
        match poll(&mut fds, left.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// `SIGKILL` to process group `pid` and to process `pid`.
pub(crate) fn kill_group(pid: u32) {
    if let Some(pid) = kill_only_group(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// `SIGKILL` to process group `pid`; the pid, when it is one.
fn kill_only_group(pid: u32) -> Option<rustix::process::Pid> {
    // Never init's (`kill(-1)` is every process) nor the host's own.
    if pid <= 1 || pid == std::process::id() {
        return None;
    }
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)?;
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    Some(pid)
}

/// A runner a zygote forked.
#[derive(Debug)]
pub(crate) struct ForkedChild {
    pid: u32,
    slot: Arc<ExitSlot>,
    /// The zygote lives as long as its runners do.
    #[allow(dead_code)]
    zygote: Arc<Zygote>,
}

impl ForkedChild {
    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// The runner's exit status, if it has ended.
    pub(crate) fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        match &*self.slot.status.lock() {
            None => Ok(None),
            Some(Ok(status)) => Ok(Some(*status)),
            Some(Err(why)) => Err(io::Error::other(why.clone())),
        }
    }

    /// Waits for the runner to end: for its zygote's report, or, when the
    /// runner has ended (a zombie, or gone) and its zygote has not said so
    /// for [`UNREPORTED_EXIT`] (a zygote stopped or stuck), without its
    /// status: a runner's end is never waited for longer than that.
    pub(crate) fn wait(&self) -> io::Result<ExitStatus> {
        let mut status = self.slot.status.lock();
        let mut ended_since: Option<Instant> = None;
        loop {
            match &*status {
                None => {
                    let _ = self.slot.ended.wait_for(&mut status, UNREPORTED_EXIT / 4);
                    if status.is_some() {
                        continue;
                    }
                    if !super::os_process::forked_has_ended(self.pid) {
                        ended_since = None;
                        continue;
                    }
                    let since = *ended_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNREPORTED_EXIT {
                        let why = format!(
                            "it ended, and its Python zygote (pid {}) did not report how",
                            self.zygote.pid
                        );
                        // Recorded ended, and what is left of its group
                        // killed, while its pid is still the runner's (an
                        // unreaped zombie): the zygote given up below may
                        // be killed, the runner reaped by another and its
                        // pid reused, and nothing signals it after this.
                        kill_only_group(self.pid);
                        *status = Some(Err(why.clone()));
                        self.slot.ended.notify_all();
                        // The slot's lock is held under no other.
                        drop(status);
                        self.zygote.lost_report(self.pid);
                        return Err(io::Error::other(why));
                    }
                }
                Some(Ok(s)) => return Ok(*s),
                Some(Err(why)) => return Err(io::Error::other(why.clone())),
            }
        }
    }

    /// Kills the runner and its process group if it has not ended. (The exit is recorded under the same lock
    /// before the zygote may reap, so no signal reaches a recycled pid.)
    pub(crate) fn kill(&self) {
        let status = self.slot.status.lock();
        if status.is_none() {
            kill_group(self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sleep 30`, a stand-in for a zygote or a runner, killed when the
    /// test's thread ends however it ends (a failed assertion left it
    /// running for its 30 s).
    fn sleeper() -> std::process::Child {
        let mut command = Command::new("sleep");
        command.arg("30");
        forgesyte_deps::die_with_parent_thread(&mut command);
        command.spawn().unwrap()
    }

    #[test]
    fn the_zygote_is_off_by_any_word_for_no() {
        use std::ffi::OsStr;
        assert!(enabled_by(None));
        for on in ["1", "yes", "true", "", "abc"] {
            assert!(enabled_by(Some(OsStr::new(on))), "{on:?}");
        }
        for off in ["0", "false", "No", "OFF", " off ", "n", "F"] {
            assert!(!enabled_by(Some(OsStr::new(off))), "{off:?}");
        }
    }

    /// A zygote that ends before it forks (one that cannot set itself up)
    /// is started again [`UNFORKED_ENDS`] times at most: then its key's
    /// runners start on their own, not each after another zygote's start.
    #[test]
    fn zygotes_that_end_before_they_fork_are_not_started_for_ever() {
        let key = ZygoteKey {
            interpreter: PathBuf::from("/bin/false"),
            few_arenas: false,
            run_as: None,
            confined: false,
        };
        let mut started = 0;
        let refused = loop {
            match zygote_for(&key) {
                Ok(zygote) => {
                    started += 1;
                    assert!(started <= UNFORKED_ENDS, "started {started} zygotes");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !zygote.is_dead() {
                        assert!(Instant::now() < deadline, "/bin/false lives on");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Err(e) => break e.to_string(),
            }
        };
        assert_eq!(started, UNFORKED_ENDS);
        assert!(refused.contains("ended before they forked"), "{refused}");
        // And for good.
        assert!(zygote_for(&key).is_err());
    }

    /// A spawn through a zygote that reads nothing fails within the spawn's
    /// time limit, its request included (the send waited for good).
    #[test]
    fn a_spawn_through_a_zygote_that_reads_nothing_fails_in_time() {
        let (ours, _theirs) = crate::process::seqpacket_pair().unwrap();
        while rustix::net::send(&ours, b"{}", SendFlags::DONTWAIT).is_ok() {}
        let process = sleeper();
        let zygote = Zygote::assemble(PathBuf::from("python3"), ours, process, 0).unwrap();
        let stdio = [(); 3].map(|()| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawner = Arc::clone(&zygote);
        std::thread::spawn(move || {
            let spawned = spawner.spawn(
                &["x".into()],
                stdio,
                None,
                (None, None),
                Duration::from_millis(300),
            );
            let _ = done_tx.send(spawned.map(|child| child.id()));
        });
        // On a thread: a spawn that waits for good fails this test, not hangs it.
        let spawned = done_rx.recv_timeout(Duration::from_secs(3));
        let Ok(Err(err)) = spawned else {
            panic!("the spawn did not fail within its time limit: {spawned:?}");
        };
        assert!(err.to_string().contains("took no request"), "{err}");
        let _ = zygote.process.lock().kill();
        let _ = zygote.process.lock().wait();
    }

    /// The host signals only pids it knows are this zygote's unreaped
    /// runners: not one named in an exit it does not know (perhaps reaped,
    /// and anyone's by now), never 1 (`kill(-1)`: every process) or its own;
    /// and a runner forked after its spawn gave up is killed, not left
    /// running with no owner.
    #[test]
    fn only_the_zygote_s_own_unreaped_runners_are_signalled() {
        let (ours, _theirs) = crate::process::seqpacket_pair().unwrap();
        let process = sleeper();
        let zygote = Zygote::assemble(PathBuf::from("python3"), ours, process, 0).unwrap();
        let mut stranger = sleeper();
        zygote.handle(Said::Exit {
            pid: stranger.id(),
            status: 0,
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            matches!(stranger.try_wait(), Ok(None)),
            "a process not the zygote's was killed"
        );
        // A spawn told pid 1 fails, and nothing records it.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        zygote.state.lock().spawning.insert(7, tx);
        zygote.handle(Said::Spawned { id: 7, pid: 1 });
        assert!(matches!(rx.try_recv(), Ok(Err(e)) if e.contains("pid 1")));
        assert!(!zygote.state.lock().children.contains_key(&1));
        // Forked after its spawn gave up: killed.
        let mut late = sleeper();
        zygote.handle(Said::Spawned {
            id: 8,
            pid: late.id(),
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(late.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !matches!(late.try_wait(), Ok(None)),
            "the late runner lives on"
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
        let _ = zygote.process.lock().kill();
        let _ = zygote.process.lock().wait();
    }

    /// The reader thread handles exit reports while nobody reads the
    /// zygote's end of the socket and its queue is full: it never waits to
    /// write, and every reap is sent once the zygote reads again.
    #[test]
    fn exit_reports_are_handled_while_the_zygote_reads_nothing() {
        let (ours, theirs) = crate::process::seqpacket_pair().unwrap();
        // Its queue full: no more room for a message from the host.
        let mut queued = 0;
        while rustix::net::send(&ours, b"{}", SendFlags::DONTWAIT).is_ok() {
            queued += 1;
        }
        assert!(queued > 0);
        // Stand-ins for the zygote and its runners: children of this
        // process, not reaped until the end, so their pids stay theirs.
        let process = sleeper();
        let mut runners: Vec<std::process::Child> = (0..20)
            .map(|_| Command::new("true").spawn().unwrap())
            .collect();
        let zygote = Zygote::assemble(PathBuf::from("python3"), ours, process, 0).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let handler = Arc::clone(&zygote);
        let pids: Vec<u32> = runners.iter().map(std::process::Child::id).collect();
        std::thread::spawn(move || {
            for &pid in &pids {
                handler.state.lock().children.insert(pid, Arc::default());
                handler.handle(Said::Exit { pid, status: 0 });
            }
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the reader waited on a zygote that reads nothing"
        );
        // The zygote reads again: what was queued, then one reap per exit.
        let mut buffer = [0u8; 256];
        let mut reaped = Vec::new();
        while reaped.len() < runners.len() {
            let (_, n) = rustix::net::recv(&theirs, &mut buffer, RecvFlags::empty()).unwrap();
            let message: serde_json::Value = match serde_json::from_slice(&buffer[..n]) {
                Ok(message) => message,
                Err(e) => panic!("{e}: {:?}", String::from_utf8_lossy(&buffer[..n])),
            };
            if message["op"] == "reap" {
                reaped.push(message["pid"].as_u64().unwrap());
            }
        }
        let expected: Vec<u64> = runners.iter().map(|r| u64::from(r.id())).collect();
        assert_eq!(reaped, expected);
        for runner in &mut runners {
            let _ = runner.wait();
        }
        let _ = zygote.process.lock().kill();
        let _ = zygote.process.lock().wait();
    }
}
