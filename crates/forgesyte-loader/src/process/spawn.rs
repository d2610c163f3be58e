//! How the host starts a child process (a runner, or a Python zygote):
//! the OS hygiene every one gets, whatever it runs.
//!
//! - Descriptors the server inherited are closed on exec
//!   ([`close_inherited_on_exec`], once at start); a descriptor meant for
//!   a child is passed at its number ([`pass_fd`]).
//! - Each child leads its own process group, runs with `no_new_privs`, and
//!   gets `SIGKILL` when the server ends: forked from one long-lived
//!   thread ([`spawn_supervised`]), because the parent-death signal follows
//!   the thread that forked.
//!
//! - A child gets back the open-file limit the server started with, when
//!   the server raised its own (`forgesyte_deps::raise_open_file_limit`).
//! - Every runner and zygote starts with the protocol's version in its
//!   environment, and few malloc arenas under a memory limit
//!   ([`runner_env`]); under a memory limit, the numeric libraries' thread
//!   counts where nobody set them ([`thread_caps`], [`cap_threads`]).
//!
//! What a runner does once started (its pipes, its death) is `child`'s.

use std::process::{Command, Stdio};

use forgesyte_protocol::wire::{PROTOCOL_ENV, PROTOCOL_VERSION};

/// Marks close-on-exec every descriptor above 2 that this process holds:
/// at a server's start, those it inherited (a supervisor's socket, a
/// shell's open file), which no runner, zygote or other child it starts
/// may get (Landlock rules paths, not descriptors already open). Returns
/// how many it marked. Call it first thing, before any other thread or any
/// descriptor meant for a child exists.
///
/// # Errors
///
/// When `/proc/self/fd` cannot be listed or a descriptor's flags cannot be
/// set.
#[allow(unsafe_code)]
pub fn close_inherited_on_exec() -> std::io::Result<usize> {
    use rustix::fs::{CWD, Dir, Mode, OFlags, openat};
    use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
    use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
    let listing = openat(
        CWD,
        "/proc/self/fd",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let own = listing.as_raw_fd();
    let mut dir = Dir::new(listing)?;
    let mut marked = 0;
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .ok()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd <= 2 || fd == own {
            continue;
        }
        // SAFETY: `fd` was listed open just now, and nothing closes it
        // meanwhile: the caller runs this before any other thread exists.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = fcntl_getfd(fd)?;
        if !flags.contains(FdFlags::CLOEXEC) {
            fcntl_setfd(fd, flags | FdFlags::CLOEXEC)?;
            marked += 1;
        }
    }
    Ok(marked)
}

/// Has `command`'s process inherit the descriptor `fd` at its number (it
/// is closed on exec otherwise). The caller keeps `fd` open until the
/// spawn has returned.
#[allow(unsafe_code)]
pub(crate) fn pass_fd(command: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec in the child, where
    // only async-signal-safe work is allowed: `fcntl` is a plain system
    // call on a descriptor the child inherited (open in the parent until
    // the spawn returns, as the caller promises), and errors are not built
    // by allocation.
    unsafe {
        command.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
}

/// Starts a runner command: its stdio piped, as [`spawn_supervised`].
pub(crate) fn spawn_runner(mut command: Command) -> std::io::Result<std::process::Child> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_supervised(command)
}

/// Starts a runner command whose protocol is on a pipe of its own
/// (`child::ProtocolPipe`): its stdin piped, its stdout and stderr one
/// pipe, the log, whose reading end comes back; as [`spawn_supervised`].
pub(crate) fn spawn_runner_logging_stdout(
    mut command: Command,
) -> std::io::Result<(std::process::Child, std::io::PipeReader)> {
    let (log, log_w) = std::io::pipe()?;
    command
        .stdin(Stdio::piped())
        .stdout(log_w.try_clone()?)
        .stderr(log_w);
    // The command, with the log's writing ends, is dropped once spawned.
    let child = spawn_supervised(command)?;
    Ok((child, log))
}

/// Starts a command in a process group of its own, with `SIGKILL` as its
/// parent-death signal. The fork happens on one long-lived thread, because
/// the parent-death signal fires when the *thread* that forked ends, and
/// callers may be short-lived pool threads. (Without that thread, the
/// command is started here, without the signal: the runners' own parent
/// watch still ends them with the server.)
pub(crate) fn spawn_supervised(mut command: Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc::{Sender, channel};
    use std::sync::{Mutex as StdMutex, OnceLock};

    type Job = (Command, Sender<std::io::Result<std::process::Child>>);
    static SPAWNER: OnceLock<StdMutex<Sender<Job>>> = OnceLock::new();

    command.process_group(0);
    set_no_new_privs(&mut command);
    forgesyte_deps::restore_open_file_limit(&mut command);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let started = std::thread::Builder::new()
            .name("forgesyte-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    forgesyte_deps::die_with_parent_thread(&mut command);
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!("cannot start the runner spawner thread: {e}");
        }
        StdMutex::new(tx)
    });
    let (reply_tx, reply_rx) = channel();
    let sent = spawner
        .lock()
        .map_err(|_| std::io::Error::other("the runner spawner is broken"))?
        .send((command, reply_tx));
    match sent {
        Ok(()) => reply_rx
            .recv()
            .map_err(|_| std::io::Error::other("the runner spawner is gone"))?,
        // No spawner thread: fork here, without the parent-death signal
        // (it would fire when this thread ends).
        Err(std::sync::mpsc::SendError((mut command, _))) => command.spawn(),
    }
}

/// Sets `no_new_privs` in the child before it runs anything: neither the
/// runner nor anything it (or a plugin) executes can gain privileges
/// through set-uid binaries or file capabilities. Inherited across fork and
/// exec, so it holds for a zygote's runners too.
#[allow(unsafe_code)]
fn set_no_new_privs(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec in the child, where
    // only async-signal-safe work is allowed: `prctl` is a plain system
    // call, and its error is returned without allocating.
    unsafe {
        command.pre_exec(|| {
            rustix::thread::set_no_new_privs(true)?;
            Ok(())
        });
    }
}

/// The environment variables every runner (and every zygote) is started
/// with: the protocol version, and under a memory limit (`limited`) few
/// malloc arenas (glibc reserves 64 MiB of address space per arena, one
/// per thread up to 8 per core: under `RLIMIT_AS` that, not the plugin,
/// would exhaust the limit; glibc reads it once, at the process's start).
pub(crate) fn runner_env(limited: bool) -> Vec<(&'static str, String)> {
    let mut env = vec![(PROTOCOL_ENV, PROTOCOL_VERSION.to_string())];
    if limited {
        env.push(("MALLOC_ARENA_MAX", "2".to_owned()));
    }
    env
}

/// The variables that set how many threads a plugin's numeric libraries
/// start: OpenBLAS (numpy's, SciPy's, OpenCV's), OpenMP runtimes (PyTorch
/// on the CPU, OpenMP builds of OpenBLAS), MKL.
pub(crate) const THREAD_VARS: [&str; 3] =
    ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"];

/// The most threads [`thread_caps`] gives each of [`THREAD_VARS`].
pub(crate) const LIMITED_THREADS: usize = 4;

/// Under a memory limit (`limited`), each of [`THREAD_VARS`] with one
/// thread per core, at most [`LIMITED_THREADS`]: for a runner to start
/// with where the variable is not set for it already (its manifest's `env`
/// grant, the server's own environment when the runner inherits it, or
/// the plugin's own code before it imports the library: all of those
/// win). OpenBLAS starts one thread per core at import and reserves about
/// 40 MiB of address space for each: on a machine of 16 cores `import
/// numpy` alone went past the default limit of 512 MiB (`RLIMIT_AS`).
pub(crate) fn thread_caps(limited: bool) -> Vec<(&'static str, String)> {
    if !limited {
        return Vec::new();
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = cores.min(LIMITED_THREADS).to_string();
    THREAD_VARS
        .iter()
        .map(|var| (*var, threads.clone()))
        .collect()
}

/// Sets [`thread_caps`] on `command`, each only where it is not set on
/// `command` already (a confined runner's environment holds its plan's,
/// which has them or its manifest's grant) and, when `inherits`, not in
/// the server's own environment, which the process then keeps.
pub(crate) fn cap_threads(command: &mut Command, limited: bool, inherits: bool) {
    for (var, threads) in thread_caps(limited) {
        let set = command.get_envs().any(|(name, _)| name == var)
            || (inherits && std::env::var_os(var).is_some());
        if !set {
            command.env(var, threads);
        }
    }
}
