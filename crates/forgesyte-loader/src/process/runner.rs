//! The child side: what `forgesyte-runner` (or a host's hidden runner
//! subcommand) does.
//!
//! 1. Moves the protocol off fds 0 and 1: the original stdin and stdout are
//!    duplicated to private close-on-exec descriptors for requests and
//!    frames, fd 0 is pointed at `/dev/null` and fd 1 at stderr, so a
//!    plugin that reads stdin gets end-of-file instead of stealing
//!    requests, and whatever it prints lands in the log instead of
//!    corrupting the protocol.
//! 2. Sets its own address-space limit (`RLIMIT_AS`) when asked to.
//! 3. Watches its parent: if the host goes (and its parent-death signal
//!    did not end this process), the runner exits within
//!    [`PARENT_POLL`].
//! 4. Loads the library through [`NativeLibrary`] (the same checks as
//!    in-process) and sends the hello (protocol version, runtime `native`,
//!    capabilities, the signal that asks for its stacks: [`dump`]), or the
//!    import error.
//! 5. Reads requests on the original stdin; each runs on a thread of its
//!    own (an idle one of earlier requests, else a new one:
//!    [`super::workers`]), so several calls can be in flight (the SDK
//!    requires `Send + Sync` plugins). Answers are written whole under one
//!    lock. Attachments of a call reach an ABI-3 library as slices of the
//!    request frame (ABI 1: as base64 strings in the arguments), and the
//!    library's binary results leave as the answer's attachments.
//! 6. Exits as soon as that stream ends: the host has gone or let it go. It never
//!    unloads the library or destroys the instance; the process ending is
//!    the cleanup. A frame over [`MAX_REQUEST_BYTES`] or one that is not
//!    the protocol ends it with [`EXIT_PROTOCOL`].
//!
//! Shared memory (`PROTOCOL.md` §3.1): when the host passes a
//! shared-memory socket ([`SHM_FD_ENV`]), the runner marks it close-on-exec,
//! announces `shared_memory`, maps the attachments the host shares, and
//! shares its own answer attachments at or above the threshold.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use std::time::Duration;

use forgesyte_errors::{ImportError, InitError, ToolError};
use forgesyte_protocol::wire::shm::{
    self as shm, DEFAULT_SHM_THRESHOLD, Outgoing, SHM_FD_ENV, SHM_THRESHOLD_ENV,
};
use forgesyte_protocol::wire::{
    Frame, FrameError, Hello, PROTOCOL_VERSION, Request, Response, WireError, capability,
    read_frame, write_frame,
};
use serde_json::value::RawValue;

use super::wire_error::WireErrorExt;
use super::workers::Workers;

mod dump;
use crate::host::{PluginInstance, PluginLibrary};
use crate::native::NativeLibrary;

/// Exit code for a bad command line.
const EXIT_USAGE: u8 = 64;
/// Exit code for a broken protocol (the host sent garbage).
pub(crate) const EXIT_PROTOCOL: u8 = 65;
/// How often the runner checks that its parent is still the host.
const PARENT_POLL: Duration = Duration::from_millis(100);
/// Exit code when the protocol could not be set up.
const EXIT_SETUP: u8 = 71;
/// Exit code when the runner's own descriptors to the host were closed,
/// or replaced by other files, from inside the process (plugin code that
/// closed descriptors it had not opened); the host reports it as such
/// (`super::exit::classify`). The Python runner's `EXIT_CHANNEL` too.
pub(crate) const EXIT_CHANNEL: u8 = 74;

/// A file's device and inode: which file a descriptor number names.
type FileId = (u64, u64);

/// The runner's process id and its protocol's descriptors as it set them
/// up: (number, which file).
static CHANNEL: OnceLock<(u32, Vec<(RawFd, FileId)>)> = OnceLock::new();

/// The `fstat` of descriptor number `fd`, or `None` when nothing is open
/// there (no borrow of a number not known to be open).
#[allow(unsafe_code)]
fn stat_of(fd: RawFd) -> Option<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fstat` of a descriptor number (one closed under this
    // process is EBADF, nothing else), writing into a local buffer.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: `fstat` succeeded, so it filled the buffer.
    Some(unsafe { st.assume_init() })
}

/// The device and inode of descriptor `fd`, or `None` when it is not open.
fn identity(fd: RawFd) -> Option<FileId> {
    stat_of(fd).map(|st| (st.st_dev, st.st_ino))
}

/// Whether plugin code closed one of the protocol's descriptors, or put
/// another file in its place (a daemon's "close every descriptor, open
/// /dev/null"). Never in a process the plugin forked, whose descriptors
/// were put on `/dev/null` on purpose (`protect_in_forks`).
fn channel_closed() -> bool {
    CHANNEL.get().is_some_and(|(pid, fds)| {
        *pid == std::process::id() && fds.iter().any(|&(fd, id)| identity(fd) != Some(id))
    })
}

/// Ends the process at once when its stream with the host ended or broke,
/// dropping nothing (with its descriptors closed under it, dropping their
/// owners aborts in debug builds: std's I/O-safety check): with
/// [`EXIT_CHANNEL`] when [`channel_closed`], else `otherwise`.
fn end_on_stream(otherwise: u8) -> ! {
    let code = if channel_closed() {
        // Likely unseen (stderr is as a rule closed with the rest).
        eprintln!(
            "forgesyte-runner: its protocol descriptors were closed or replaced from inside the process"
        );
        EXIT_CHANNEL
    } else {
        otherwise
    };
    std::process::exit(i32::from(code))
}

/// Stack size of the threads that run plugin code: 4 MiB, twice what an
/// in-process plugin gets on the server's blocking pool, and small enough
/// that many calls in flight fit under a memory limit.
const CALL_STACK_BYTES: usize = 4 * 1024 * 1024;

/// The largest request frame the runner accepts (the host caps its bodies
/// far below this).
pub(crate) const MAX_REQUEST_BYTES: u64 = 1 << 31;

/// The runner's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    library: PathBuf,
    /// A descriptor this process inherited holding the library's checked
    /// bytes (a sealed memory file), loaded instead of the file at
    /// `library` (which then only names it).
    library_fd: Option<i32>,
    memory_limit_mib: u64,
    /// The host's limit on an answer (`0`: none known).
    max_response_bytes: u64,
    plugin: String,
    confine: Option<crate::sandbox::Confinement>,
}

/// The number `flag` was given as `v`.
fn number(flag: &str, v: OsString) -> Result<u64, String> {
    v.to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{flag}: not a number: {v:?}"))
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut library = None;
    let mut library_fd = None;
    let mut memory_limit_mib = 0;
    let mut max_response_bytes = 0;
    let mut plugin = String::from("plugin");
    let mut confine = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.to_str() {
            Some("--library") => library = Some(PathBuf::from(value("--library")?)),
            Some("--library-fd") => {
                let v = value("--library-fd")?;
                library_fd = Some(
                    v.to_str()
                        .and_then(|s| s.parse::<i32>().ok())
                        .filter(|fd| *fd > 2)
                        .ok_or_else(|| format!("--library-fd: not a descriptor: {v:?}"))?,
                );
            }
            Some(flag @ "--memory-limit-mb") => memory_limit_mib = number(flag, value(flag)?)?,
            Some(flag @ "--max-response-bytes") => max_response_bytes = number(flag, value(flag)?)?,
            Some("--plugin") => plugin = value("--plugin")?.to_string_lossy().into_owned(),
            Some("--confine") => {
                let v = value("--confine")?;
                confine = Some(
                    serde_json::from_slice(v.as_encoded_bytes())
                        .map_err(|e| format!("--confine: not a sandbox plan: {e}"))?,
                );
            }
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    let library = library.ok_or("--library is required")?;
    Ok(Args {
        library,
        library_fd,
        memory_limit_mib,
        max_response_bytes,
        plugin,
        confine,
    })
}

/// Runs a plugin runner: call this from a binary's `main` with the
/// arguments after the program name (or after a hidden subcommand), and
/// return its exit code.
///
/// Arguments: `--library PATH` (required), `--library-fd N` (the
/// library's checked bytes in an inherited memory file, loaded instead of
/// `PATH`), `--memory-limit-mb N` (0 or
/// absent: no limit), `--plugin NAME` (for messages), `--confine JSON` (a
/// [`crate::sandbox::Confinement`] applied before the library is opened). The process speaks the
/// protocol of [`crate::process`] on its stdin and stdout; it is started by
/// [`crate::process::ProcessImporter`], not by people.
pub fn runner_main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    // First of all, before anything can print or read: the protocol gets
    // its own fds.
    let (requests, out) = match take_stdio() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("forgesyte-runner: cannot set up the protocol pipe: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "forgesyte-runner: {e}\nusage: forgesyte-runner --library PATH \
                 [--memory-limit-mb N] [--max-response-bytes N] [--plugin NAME] \
                 [--confine JSON]"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    MAX_RESPONSE.store(args.max_response_bytes, Ordering::Relaxed);
    let protocol_fds = [requests.as_raw_fd(), out.as_raw_fd()];
    let out = Arc::new(Mutex::new(out));
    let shared_memory = match take_shm_socket() {
        Ok(link) => {
            let offered = link.is_some();
            let _ = SHM.set(link);
            offered
        }
        Err(e) => {
            eprintln!("forgesyte-runner: cannot take the shared-memory socket: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let shm_fd = shm_link().map(|(socket, _)| socket.as_raw_fd());
    // The request and answer streams: a plugin that closed only the
    // shared-memory socket fails its next large attachment (exit 65), and
    // a normal stop after that is still a normal stop (exit 0).
    let _ = CHANNEL.set((
        std::process::id(),
        protocol_fds
            .into_iter()
            .filter_map(|fd| identity(fd).map(|id| (fd, id)))
            .collect(),
    ));
    if let Err(e) = protect_in_forks(protocol_fds.into_iter().chain(shm_fd)) {
        eprintln!(
            "forgesyte-runner[{}]: processes the plugin forks keep the protocol: {e}",
            args.plugin
        );
    }
    if let Err(e) = shrug_off_group_signals() {
        eprintln!(
            "forgesyte-runner[{}]: a signal to its process group may end it: {e}",
            args.plugin
        );
    }
    // Also here: the standalone runner binaries start here, not in the
    // server's `main`.
    if let Err(e) = shrug_off_file_size_signal() {
        eprintln!(
            "forgesyte-runner[{}]: a write past the file-size limit may end it: {e}",
            args.plugin
        );
    }
    if args.memory_limit_mib > 0
        && let Err(e) = limit_memory(args.memory_limit_mib)
    {
        eprintln!(
            "forgesyte-runner[{}]: cannot set the memory limit of {} MiB: {e}",
            args.plugin, args.memory_limit_mib
        );
        return ExitCode::from(EXIT_SETUP);
    }
    // Before any thread starts (Landlock, the seccomp filter, the
    // capabilities and the network namespace hold for this thread and
    // those it starts after, not for a thread already running) and before
    // the plugin's library is opened.
    if args.confine.is_some()
        && let Some(why) = other_threads()
    {
        eprintln!(
            "forgesyte-runner[{}]: cannot confine the runner: {why}",
            args.plugin
        );
        return ExitCode::from(EXIT_SETUP);
    }
    let confinement = args.confine.as_ref().map(crate::sandbox::apply);
    watch_parent();
    let stack_signal = dump::start(&args.plugin);
    let refused = args
        .confine
        .as_ref()
        .filter(|plan| plan.required)
        .and_then(|_| crate::sandbox::unconfined(confinement.as_ref()));
    let opened = match (refused, args.library_fd) {
        // Required and not wholly enforced: the library is not opened.
        (Some(why), _) => Err(ImportError::NotConfined {
            detail: format!("the plugin's runner could not confine itself: {why}"),
        }),
        // Opened anew through `/proc` (which Landlock lets it read): the
        // inherited descriptor itself is never taken over.
        (None, Some(fd)) => match File::open(format!("/proc/self/fd/{fd}")) {
            Ok(file) => {
                close_on_exec(fd);
                NativeLibrary::open_fd(&args.library, file.into())
            }
            Err(e) => Err(ImportError::Open {
                path: args.library.clone(),
                detail: format!("cannot open its checked bytes (descriptor {fd}): {e}"),
            }),
        },
        (None, None) => NativeLibrary::open(&args.library),
    };
    let library = match opened {
        Ok(library) => {
            let bytes_at = args.library_fd.map_or_else(
                || args.library.clone(),
                |fd| PathBuf::from(format!("/proc/self/fd/{fd}")),
            );
            dump::know_library(library.address_inside(), args.library.clone(), bytes_at);
            Arc::new(library)
        }
        Err(e) => {
            send(
                &out,
                &Response::ImportFailed {
                    error: WireError::import(&e),
                },
                &[],
            );
            return ExitCode::SUCCESS;
        }
    };
    send(
        &out,
        &Response::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            runtime: "native".into(),
            runtime_version: format!(
                "ABI {}, SDK {}",
                library.abi_version(),
                library.sdk_version()
            ),
            pid: std::process::id(),
            capabilities: [capability::ATTACHMENTS, capability::CONCURRENT_CALLS]
                .into_iter()
                .chain(shared_memory.then_some(capability::SHARED_MEMORY))
                .map(String::from)
                .collect(),
            confinement,
            stack_signal,
        }),
        &[],
    );
    serve(&args, &library, requests, &out)
}

/// Keeps the inherited descriptor `fd` (`--library-fd`) from the programs
/// the plugin runs.
#[allow(unsafe_code)]
fn close_on_exec(fd: i32) {
    // SAFETY: `fd` was just opened through `/proc/self/fd/{fd}`, so it is
    // open in this process; it is borrowed for this one `fcntl` only, and
    // nothing in this process closes it (no other code knows its number).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC);
}

/// Reads requests until the request stream (the original stdin) ends.
fn serve(
    args: &Args,
    library: &Arc<NativeLibrary>,
    requests: File,
    out: &Arc<Mutex<File>>,
) -> ExitCode {
    let instance: Arc<OnceLock<Box<dyn PluginInstance>>> = Arc::new(OnceLock::new());
    let workers = Workers::new("forgesyte-call", CALL_STACK_BYTES);
    let mut stdin = BufReader::with_capacity(64 * 1024, requests);
    let socket = shm_link().map(|(socket, _)| socket.as_fd());
    loop {
        let mut frame = match read_frame(&mut stdin, MAX_REQUEST_BYTES) {
            Ok(frame) => frame,
            // The host closed our stdin: it is done with us (unless plugin
            // code closed it). Calls still running die with the process;
            // an idle instance is dropped first (its `Drop` runs).
            Err(FrameError::Eof) => {
                if !channel_closed() {
                    unload(&args.plugin, instance);
                }
                end_on_stream(0)
            }
            Err(e) => {
                eprintln!("forgesyte-runner[{}]: reading stdin: {e}", args.plugin);
                end_on_stream(EXIT_PROTOCOL);
            }
        };
        if let Err(e) = shm::receive(&mut frame, socket, MAX_REQUEST_BYTES) {
            eprintln!("forgesyte-runner[{}]: malformed request: {e}", args.plugin);
            end_on_stream(EXIT_PROTOCOL);
        }
        let request: Request = match serde_json::from_slice(frame.header()) {
            Ok(request) => request,
            Err(e) => {
                eprintln!("forgesyte-runner[{}]: malformed request: {e}", args.plugin);
                end_on_stream(EXIT_PROTOCOL);
            }
        };
        let (library, instance, answers) =
            (Arc::clone(library), Arc::clone(&instance), Arc::clone(out));
        let (id, create) = match &request {
            Request::Create { id, .. } => (*id, true),
            Request::Call { id, .. } => (*id, false),
        };
        let ran = workers.run(Box::new(move || {
            let busy = dump::Busy::enter(id);
            let (response, binary) = handle(request, &frame, &library, &instance);
            drop(busy);
            let parts: Vec<&[u8]> = binary.iter().map(|b| &b[..]).collect();
            send(&answers, &response, &parts);
        }));
        if let Err(e) = ran {
            let detail = format!("the runner cannot start a thread: {e}");
            let response = if create {
                Response::InitFailed {
                    id,
                    error: WireError::init(&InitError::Protocol { detail }),
                }
            } else {
                // Not the plugin's fault: the call fails, the process stays.
                Response::ToolFailed {
                    id,
                    error: WireError::tool(&ToolError::Failed {
                        error_type: Some(super::wire_error::RUNNER_OVERLOADED.into()),
                        message: detail,
                        traceback: Vec::new(),
                    }),
                }
            };
            send(out, &response, &[]);
        }
    }
}

/// Drops the plugin's instance (its destructor, `Drop`, runs) at the
/// runner's stop, as a Python runner runs `on_unload`: on a thread of its
/// own, waited for at most [`crate::DESTRUCTOR_WAIT`] (the host kills a
/// runner that has not ended after its stop grace). Only when no call
/// holds it: a call still running keeps it, and it dies with the process
/// (the runner exited without any destructor before).
fn unload(plugin: &str, instance: Arc<OnceLock<Box<dyn PluginInstance>>>) {
    let Ok(instance) = Arc::try_unwrap(instance) else {
        eprintln!(
            "forgesyte-runner[{plugin}]: calls still running at its stop: the plugin's destructor does not run"
        );
        return;
    };
    let Some(instance) = instance.into_inner() else {
        return; // never constructed
    };
    // (No thread to be had: dropped here, bounded by the host's kill.)
    let dropped = crate::pipeline::drop_on_a_thread(instance);
    if dropped.is_some_and(|dropped| dropped.recv_timeout(crate::DESTRUCTOR_WAIT).is_err()) {
        eprintln!(
            "forgesyte-runner[{plugin}]: the plugin's destructor still runs after {} s; exiting anyway",
            crate::DESTRUCTOR_WAIT.as_secs_f64()
        );
    }
}

/// Runs one request against the library or its instance: the answer and
/// its attachments (a tool's binary results).
fn handle(
    request: Request,
    frame: &Frame,
    library: &NativeLibrary,
    instance: &OnceLock<Box<dyn PluginInstance>>,
) -> (Response, Vec<bytes::Bytes>) {
    let response = match request {
        Request::Create { id, config } => {
            if instance.get().is_some() {
                let e = InitError::Protocol {
                    detail: "this runner already holds an instance".into(),
                };
                return (
                    Response::InitFailed {
                        id,
                        error: WireError::init(&e),
                    },
                    Vec::new(),
                );
            }
            match library.instantiate(config.get().as_bytes()) {
                Ok(created) => {
                    let tools = created.tools().to_vec();
                    // Only one create is ever sent; a lost race keeps the first.
                    let _ = instance.set(created);
                    Response::Created { id, tools }
                }
                Err(e) => Response::InitFailed {
                    id,
                    error: WireError::init(&e),
                },
            }
        }
        Request::Call {
            id,
            tool,
            args,
            attachments,
            context,
        } => {
            let Some(instance) = instance.get() else {
                let e = ToolError::Protocol {
                    detail: "no instance: the plugin was never constructed".into(),
                };
                return (
                    Response::ToolFailed {
                        id,
                        error: WireError::tool(&e),
                    },
                    Vec::new(),
                );
            };
            if attachments.len() != frame.attachment_count() {
                let e = ToolError::InvalidArgs {
                    message: format!(
                        "{} attachment places for {} attachments",
                        attachments.len(),
                        frame.attachment_count()
                    ),
                };
                return (
                    Response::ToolFailed {
                        id,
                        error: WireError::tool(&e),
                    },
                    Vec::new(),
                );
            }
            let slices: Vec<(&str, &[u8])> = attachments
                .iter()
                .map(String::as_str)
                .zip(frame.attachments())
                .collect();
            // The plugin reads the context on this thread, through its
            // SDK's `forgesyte_plugin_call_context` when it has one.
            let outcome = instance
                .call_output(
                    &tool,
                    args.get().as_bytes(),
                    &slices,
                    &context.unwrap_or_default(),
                )
                .and_then(|output| {
                    String::from_utf8(output.json)
                        .map_err(|e| e.to_string())
                        .and_then(|text| RawValue::from_string(text).map_err(|e| e.to_string()))
                        .map_err(|detail| ToolError::Protocol {
                            detail: format!("the result is not JSON: {detail}"),
                        })
                        .map(|result| (result, output.binary))
                });
            match outcome {
                Ok((result, binary)) => {
                    let (pointers, bytes) = binary.into_iter().unzip();
                    return (
                        Response::Result {
                            id,
                            result,
                            attachments: pointers,
                        },
                        bytes,
                    );
                }
                Err(e) => Response::ToolFailed {
                    id,
                    error: WireError::tool(&e),
                },
            }
        }
    };
    (response, Vec::new())
}

/// The shared-memory socket and threshold the host passed, once taken.
static SHM: OnceLock<Option<(OwnedFd, u64)>> = OnceLock::new();

/// The host's limit on an answer (`--max-response-bytes`; `0`: none
/// known): a result over it is answered as the tool's `ResultTooLarge`
/// error, where the host would end the runner for the frame (a client's
/// input could so use up the plugin's restarts and leave it FAILED).
static MAX_RESPONSE: AtomicU64 = AtomicU64::new(0);

/// The protocol's descriptors (requests, answers, the shared-memory socket;
/// `-1`: none), which a process forked in this runner gets `/dev/null` in
/// place of ([`protect_in_forks`]).
static PROTOCOL_FDS: [AtomicI32; 3] = [const { AtomicI32::new(-1) }; 3];

/// Makes every process forked in this runner let go of the protocol at
/// once, with or without exec (a plugin's worker process, as Python's
/// `multiprocessing` makes): in the child, each protocol descriptor is
/// `/dev/null`. Else a process the plugin forked keeps the answers open
/// after the runner dies, and the host, which sees a runner's death by
/// their end, waits for the call's time limit instead; and it could read
/// requests or write answers. (The Python runner's `protect_in_forks` does
/// the same.)
#[allow(unsafe_code)]
fn protect_in_forks(fds: impl IntoIterator<Item = RawFd>) -> io::Result<()> {
    for (slot, fd) in PROTOCOL_FDS.iter().zip(fds) {
        slot.store(fd, Ordering::Relaxed);
    }
    // SAFETY: glibc's `pthread_atfork` (as `libc` declares it);
    // `release_protocol` is a plain function that lives as long as the
    // process and does only what a child of a multithreaded fork may
    // (system calls: `open`, `dup3`; no allocation, no lock).
    let rc = unsafe { libc::pthread_atfork(None, None, Some(release_protocol)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// A handler that does nothing for SIGTERM, SIGHUP and SIGINT: the host
/// stops a runner by closing its input and kills it with SIGKILL, and a
/// program the plugin starts may signal its whole process group, which is
/// the runner's (a confined runner's processes cannot leave it: coreutils'
/// `timeout` sends SIGTERM to its group when time runs out). A handler, not
/// `SIG_IGN`: a program the plugin execs starts with the default.
fn shrug_off_group_signals() -> io::Result<()> {
    GROUP_SIGNALS.into_iter().try_for_each(shrug_off)
}

/// A handler that does nothing for `SIGXFSZ`, in the server and its
/// native runners: a write past the file-size limit (`ulimit -f`,
/// systemd's `LimitFSIZE=`) into the memory file of a frame then fails
/// with `EFBIG`, and the frame goes through the pipe instead; the
/// signal's default action ended the server at one upload (CPython
/// ignores it for its own runners). A handler, not `SIG_IGN`: a program
/// the process execs starts with the default.
///
/// # Errors
///
/// When `sigaction` refuses (it cannot, for this signal).
pub fn shrug_off_file_size_signal() -> io::Result<()> {
    shrug_off(libc::SIGXFSZ)
}

/// Gives `signal` the do-nothing handler [`shrug`].
fn shrug_off(signal: libc::c_int) -> io::Result<()> {
    set_handler(signal, shrug_handler(), libc::SA_RESTART)
}

/// Gives `signal` `handler` (a function that lives as long as the process
/// and makes only async-signal-safe calls), with `flags` and an empty mask.
#[allow(unsafe_code)]
fn set_handler(
    signal: libc::c_int,
    handler: libc::sighandler_t,
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a `sigaction` of all zeroes is a valid one (no flags, an
    // empty mask); its handler is set to `handler`, which the caller vouches
    // for.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = flags;
    // SAFETY: `action` is a valid `sigaction` that outlives the call; no
    // old action is asked for.
    if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signals a program may send its whole group that a runner shrugs
/// off.
const GROUP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT];

/// The do-nothing handler of [`shrug_off_group_signals`].
extern "C" fn shrug(_signal: libc::c_int) {}

/// [`shrug`] as `sigaction` holds it.
fn shrug_handler() -> libc::sighandler_t {
    shrug as extern "C" fn(libc::c_int) as libc::sighandler_t
}

/// In a process the plugin forks without exec: the default action back
/// for the signals [`shrug_off_group_signals`] gave a do-nothing handler,
/// where that handler is still in place (a worker pool stops its forked
/// workers with SIGTERM). Only `sigaction`, which a child of a
/// multithreaded fork may call.
#[allow(unsafe_code)]
fn default_group_signals() {
    for signal in GROUP_SIGNALS {
        // SAFETY: all zeroes is a valid `sigaction`; `sigaction` writes the
        // current action into `current`, a live local, and reads `default`,
        // another; both are plain system calls.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &raw mut current) != 0
                || current.sa_sigaction != shrug_handler()
            {
                continue;
            }
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &raw const default, std::ptr::null_mut());
        }
    }
}

/// The child side of [`protect_in_forks`]: `/dev/null` in place of each
/// protocol descriptor (close-on-exec, as they were).
#[allow(unsafe_code)]
unsafe extern "C" fn release_protocol() {
    use std::os::fd::FromRawFd;
    let Ok(null) = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return;
    };
    for slot in &PROTOCOL_FDS {
        let fd = slot.load(Ordering::Relaxed);
        if fd < 0 {
            continue;
        }
        // SAFETY: `fd` is one of the runner's protocol descriptors, open
        // in this child (a fork copies them all). It is replaced in place,
        // `dup3` onto its number, never closed: the `OwnedFd` is a handle
        // for that call only and is never dropped.
        let mut target = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let _ = rustix::io::dup3(&null, &mut target, rustix::io::DupFlags::CLOEXEC);
    }
    default_group_signals();
}

fn shm_link() -> Option<&'static (OwnedFd, u64)> {
    SHM.get().and_then(Option::as_ref)
}

/// Takes the shared-memory socket the host passed ([`SHM_FD_ENV`]), marked
/// close-on-exec so that nothing the plugin starts inherits it; `None`
/// when there is none (or the threshold is 0).
#[allow(unsafe_code)]
fn take_shm_socket() -> io::Result<Option<(OwnedFd, u64)>> {
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var_os(SHM_FD_ENV) else {
        return Ok(None);
    };
    let fd: i32 = fd
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| io::Error::other(format!("{SHM_FD_ENV}: not a descriptor: {fd:?}")))?;
    let threshold = std::env::var(SHM_THRESHOLD_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SHM_THRESHOLD);
    // Only an open socket is taken: a stale number owns nothing.
    let Some(stat) = stat_of(fd) else {
        return Err(io::Error::other(format!(
            "{SHM_FD_ENV}: nothing is open at descriptor {fd}"
        )));
    };
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(io::Error::other(format!(
            "{SHM_FD_ENV}: descriptor {fd} is not a socket"
        )));
    }
    // SAFETY: the descriptor is open (checked above), was passed to this
    // process by the host for this purpose alone, and nothing else in the
    // process owns it: it is taken once, at start-up.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::CLOEXEC)?;
    Ok((threshold > 0).then_some((socket, threshold)))
}

/// Writes one answer; if the host is gone there is nobody to serve.
/// Attachments at or above the threshold go through shared memory when the
/// host offered it. A result no frame can hold (too many binary results,
/// or over 4 GiB in the frame) is answered as the tool's `ResultTooLarge`
/// error, as the Python runner answers it.
fn send(out: &Mutex<File>, response: &Response, attachments: &[&[u8]]) {
    let header = match serde_json::to_vec(response) {
        Ok(header) => header,
        Err(e) => {
            eprintln!("forgesyte-runner: cannot encode an answer: {e}");
            std::process::exit(i32::from(EXIT_PROTOCOL));
        }
    };
    let outgoing = shm_link()
        .map(|(_, threshold)| Outgoing::prepare(attachments, *threshold))
        .unwrap_or_default();
    // What the frame holds: the shared attachments are not in it.
    let (frame_header, inline) = if outgoing.is_empty() {
        (header, attachments.to_vec())
    } else {
        (outgoing.header(&header), outgoing.inline(attachments))
    };
    if let Response::Result { id, .. } = response {
        let refused =
            match forgesyte_protocol::wire::frame_length(frame_header.len() as u64, &inline) {
                Err(e) => Some(format!("the result does not fit in one answer: {e}")),
                Ok(framed) => {
                    // As the host counts it: the frame, and what went through
                    // shared memory beside it.
                    let total: u64 = attachments.iter().map(|a| a.len() as u64).sum();
                    let inline_bytes: u64 = inline.iter().map(|a| a.len() as u64).sum();
                    let size = u64::from(framed).saturating_add(total.saturating_sub(inline_bytes));
                    let limit = MAX_RESPONSE.load(Ordering::Relaxed);
                    (limit > 0 && size > limit).then(|| {
                        format!(
                            "the result, {size} bytes as sent to the host (its JSON, its binary \
                         results and their framing), exceeds the limit of {limit} bytes on an \
                         answer (the manifest's limits.max_response_mb, else the server's \
                         --max-response)"
                        )
                    })
                }
            };
        if let Some(message) = refused {
            let error = WireError::tool(&ToolError::Failed {
                error_type: Some("ResultTooLarge".into()),
                message,
                traceback: Vec::new(),
            });
            return send(out, &Response::ToolFailed { id: *id, error }, &[]);
        }
    }
    let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
    let written = match shm_link() {
        Some((socket, _)) if !outgoing.is_empty() => match outgoing.send(socket.as_fd()) {
            Ok(()) => write_frame(&mut *out, &frame_header, &inline),
            // The descriptors did not go: the frame goes without them,
            // every attachment in it.
            Err(_) => match serde_json::to_vec(response) {
                Ok(header) => write_frame(&mut *out, &header, attachments),
                Err(e) => Err(std::io::Error::other(e)),
            },
        },
        _ => write_frame(&mut *out, &frame_header, &inline),
    };
    // The host stopped reading: nobody is left to serve.
    if written.is_err() {
        end_on_stream(0);
    }
}

/// Why this process is not its calling thread alone, which confining it
/// needs (`None`: it is). Not knowing is a reason too: the confinement's
/// steps succeed whatever other thread runs.
fn other_threads() -> Option<String> {
    match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => {
            let others = tasks.count().saturating_sub(1);
            (others > 0).then(|| {
                format!("{others} other thread(s) run already, and would run outside the sandbox")
            })
        }
        Err(e) => Some(format!("cannot count its threads (/proc/self/task: {e})")),
    }
}

/// The fallback to the parent-death signal: a thread that ends the process
/// when its parent is no longer the one it started with (the host died and
/// the process was re-parented).
fn watch_parent() {
    let parent = rustix::process::getppid();
    let _ = std::thread::Builder::new()
        .name("forgesyte-parent-watch".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            loop {
                std::thread::sleep(PARENT_POLL);
                if rustix::process::getppid() != parent {
                    std::process::exit(0);
                }
            }
        });
}

/// Moves the protocol off fds 0 and 1: returns the requests (the original
/// stdin) and the answers (the original stdout), both on private
/// close-on-exec descriptors; fd 0 then reads `/dev/null` and fd 1 writes
/// to stderr. (The Python runner's `base.take_stdio` does the same.)
fn take_stdio() -> io::Result<(File, File)> {
    let out = take_stdout()?;
    let requests = take_stdin(&File::open("/dev/null")?)?;
    Ok((requests, out))
}

/// Duplicates fd 1 to a private close-on-exec descriptor for the protocol
/// and points fd 1 at stderr.
fn take_stdout() -> io::Result<File> {
    let protocol = rustix::io::dup(io::stdout())?;
    rustix::io::fcntl_setfd(&protocol, rustix::io::FdFlags::CLOEXEC)?;
    rustix::stdio::dup2_stdout(io::stderr())?;
    let mut file = File::from(protocol);
    file.flush()?;
    Ok(file)
}

/// Duplicates fd 0 to a private close-on-exec descriptor for the requests
/// and points fd 0 at `replacement` (`/dev/null`). Nothing may have read
/// from `std::io::stdin()` before: its buffer would keep protocol bytes.
fn take_stdin(replacement: &File) -> io::Result<File> {
    let protocol = rustix::io::dup(io::stdin())?;
    rustix::io::fcntl_setfd(&protocol, rustix::io::FdFlags::CLOEXEC)?;
    rustix::stdio::dup2_stdin(replacement)?;
    Ok(File::from(protocol))
}

/// Caps this process's address space (soft and hard) at `mib` MiB.
fn limit_memory(mib: u64) -> io::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let bytes = mib.saturating_mul(1024 * 1024);
    setrlimit(
        Resource::As,
        Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(OsString::from))
    }

    #[test]
    fn command_line() {
        assert_eq!(
            args(&[
                "--library",
                "/p/l.so",
                "--memory-limit-mb",
                "64",
                "--max-response-bytes",
                "1048576",
                "--plugin",
                "ocr"
            ]),
            Ok(Args {
                library: "/p/l.so".into(),
                library_fd: None,
                memory_limit_mib: 64,
                max_response_bytes: 1 << 20,
                plugin: "ocr".into(),
                confine: None,
            })
        );
        assert!(args(&["--library", "/p/l.so", "--max-response-bytes", "-1"]).is_err());
        let plan = crate::sandbox::Confinement {
            network: true,
            ..Default::default()
        };
        assert_eq!(
            args(&["--library", "/p/l.so", "--confine", &plan.to_arg()]).map(|a| a.confine),
            Ok(Some(plan))
        );
        assert!(args(&["--library", "/p/l.so", "--confine", "[1]"]).is_err());
        assert_eq!(
            args(&["--library", "/p/l.so"]).map(|a| a.memory_limit_mib),
            Ok(0)
        );
        assert!(args(&[]).is_err());
        assert!(args(&["--library"]).is_err());
        assert!(args(&["--library", "x", "--memory-limit-mb", "lots"]).is_err());
        assert!(args(&["--frobnicate"]).is_err());
        assert_eq!(
            args(&["--library", "/p/l.so", "--library-fd", "7"]).map(|a| a.library_fd),
            Ok(Some(7))
        );
        for fd in ["1", "-3", "x"] {
            assert!(args(&["--library", "/p/l.so", "--library-fd", fd]).is_err());
        }
    }
}
