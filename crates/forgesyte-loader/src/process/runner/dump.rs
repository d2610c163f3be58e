//! A native runner's stacks, for the host before a timeout's kill (the
//! hello's `stack_signal`, [`STACK_SIGNAL`]): where each thread that runs a
//! request is, written to stderr in the shape the host's `process::stacks`
//! reads.
//!
//! On the thread the kernel picks for the host's signal (one from another
//! process: the runner's own, and a plugin's `raise`, are not asked for a
//! dump), the handler only writes a byte to a pipe, which the runner's dump
//! thread reads. That
//! thread sends the signal again to each thread running a request
//! (`tgkill`), marked as asked: on such a thread the handler walks the
//! thread's own stack (`_Unwind_Backtrace`, which reads the stack and the
//! unwind tables and allocates nothing) into the thread's [`Slot`]. The dump
//! thread then names each address (`dladdr`; in the plugin's library, from
//! its own symbol table, read with `object`, Rust names demangled) and
//! writes the dump at once:
//!
//! ```text
//! Native thread 4242, request 7 (most recent call first):
//!   at clock_nanosleep (/lib/x86_64-linux-gnu/libc.so.6)
//!   at std::thread::sleep (/plugins/slow/libslow.so) [plugin]
//!   at slow::Plugin::spin (/plugins/slow/libslow.so) [plugin]
//! ```
//!
//! The walk is not async-signal-safe in one respect: the unwinder looks a
//! library's unwind table up under the dynamic loader's lock, so a thread
//! stopped while it held that lock (inside `dlopen`) would wait in the
//! handler. The host kills the runner when its wait for the dump ends, as
//! it does without one. The whole module is the runner's boundary with the
//! OS (signals, the unwinder, the dynamic loader): hence its `unsafe`.

#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The signal the host sends for a dump (the hello's `stack_signal`; the
/// Python runner's too).
pub(super) const STACK_SIGNAL: c_int = libc::SIGUSR2;
/// How many threads may run requests and be dumped at once (more run, but
/// are not in the dump).
const SLOTS: usize = 64;
/// The deepest stack kept, from the innermost frame (the handler's own
/// frames among them).
const FRAMES: usize = 64;
/// How long the dump thread waits for the threads it asked.
const CAPTURE_WAIT: Duration = Duration::from_millis(100);
/// A slot's depth while its thread has not walked its stack.
const NOT_YET: usize = usize::MAX;

/// A thread that runs a request, and what its walk found.
struct Slot {
    /// Its thread id; 0: a free slot.
    tid: AtomicI32,
    /// The request it runs.
    request: AtomicU64,
    /// The thread the dump thread asked for its stack (0: none): a slot
    /// left and taken again meanwhile is not walked for the one asked.
    asked: AtomicI32,
    /// The program counter the signal interrupted.
    pc: AtomicUsize,
    /// How many of `frames` the walk filled; [`NOT_YET`] before.
    depth: AtomicUsize,
    frames: [AtomicUsize; FRAMES],
}

impl Slot {
    const fn new() -> Self {
        Self {
            tid: AtomicI32::new(0),
            request: AtomicU64::new(0),
            asked: AtomicI32::new(0),
            pc: AtomicUsize::new(0),
            depth: AtomicUsize::new(NOT_YET),
            frames: [const { AtomicUsize::new(0) }; FRAMES],
        }
    }
}

static BUSY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// The pipe's write end, for the handler; -1 before [`start`].
static REQUESTS: AtomicI32 = AtomicI32::new(-1);
/// The plugin's library, once opened ([`know_library`]).
static LIBRARY: OnceLock<Library> = OnceLock::new();

fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// The slot of the thread running a request, held while it runs.
pub(super) struct Busy(Option<&'static Slot>);

impl Busy {
    /// Marks this thread as running `request` (nothing when every slot is
    /// taken: it is then left out of a dump).
    pub(super) fn enter(request: u64) -> Self {
        thread_local! {
            // A call's thread is a long-lived worker: its id once.
            static TID: i32 = gettid();
        }
        let tid = TID.with(|tid| *tid);
        let slot = BUSY.iter().find(|slot| {
            slot.tid
                .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(slot) = slot {
            slot.request.store(request, Ordering::Release);
        }
        Busy(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.asked.store(0, Ordering::Release);
            slot.tid.store(0, Ordering::Release);
        }
    }
}

/// Installs the handler and starts the dump thread; the signal the hello
/// announces, or `None` (said on stderr) when either could not be.
/// Called after the runner confined itself (before, no thread may start).
pub(super) fn start(plugin: &str) -> Option<i32> {
    match set_up() {
        Ok(()) => Some(STACK_SIGNAL),
        Err((what, e)) => {
            eprintln!("forgesyte-runner[{plugin}]: no stack dumps ({what}: {e})");
            None
        }
    }
}

/// [`start`]'s work; what failed, and how.
fn set_up() -> Result<(), (&'static str, std::io::Error)> {
    let (reader, writer) = std::io::pipe().map_err(|e| ("a pipe", e))?;
    // A full pipe (dumps asked faster than written) drops the request
    // rather than block the handler.
    rustix::io::ioctl_fionbio(&writer, true).map_err(|e| ("a pipe", e.into()))?;
    std::thread::Builder::new()
        .name("forgesyte-stacks".into())
        .stack_size(256 * 1024)
        .spawn(move || serve(reader))
        .map_err(|e| ("a thread", e))?;
    REQUESTS.store(
        std::os::fd::IntoRawFd::into_raw_fd(std::os::fd::OwnedFd::from(writer)),
        Ordering::Release,
    );
    // `on_signal` makes only async-signal-safe calls, and the walk.
    let handler =
        on_signal as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as libc::sighandler_t;
    super::set_handler(STACK_SIGNAL, handler, libc::SA_SIGINFO | libc::SA_RESTART)
        .map_err(|e| ("sigaction", e))
}

/// The plugin's library as a dump names its frames.
struct Library {
    /// Where the dynamic loader mapped it.
    base: usize,
    /// Its path, as the dump shows it.
    shown: PathBuf,
    /// Where its bytes are read (its path, or the memory file of its
    /// checked bytes), for its symbols at the first dump.
    bytes_at: PathBuf,
    symbols: OnceLock<Vec<(u64, u64, String)>>,
}

impl Library {
    /// Its functions by address, read at the first call.
    fn symbols(&self) -> &[(u64, u64, String)] {
        self.symbols.get_or_init(|| read_symbols(&self.bytes_at))
    }
}

/// Tells the dumps which library is the plugin's: `inside` is an address
/// in it (its vtable); `shown` its path, `bytes_at` where its bytes can be
/// read.
pub(super) fn know_library(inside: usize, shown: PathBuf, bytes_at: PathBuf) {
    let Some(Located { base, .. }) = locate(inside) else {
        return;
    };
    let _ = LIBRARY.set(Library {
        base,
        shown,
        bytes_at,
        symbols: OnceLock::new(),
    });
}

/// The handler: on a thread the dump thread asked, its stack walked into
/// its slot; a signal from another process (the host's), a request for a
/// dump on the pipe; any other (a late `tgkill` of a thread that left its
/// slot, a plugin's own `raise`), nothing. Only async-signal-safe calls
/// (atomics, `gettid`, `getpid`, `write`), and the walk, which is not one:
/// `_Unwind_Backtrace` finds each frame's unwind table through
/// `dl_iterate_phdr`, which takes the dynamic loader's lock, so a thread
/// interrupted while it holds that lock (inside `dlopen`) would wait in
/// this handler for good. The dump thread waits for a walk at most
/// `CAPTURE_WAIT` and then reports that thread's stack missing; a dump is
/// taken before a timeout's kill, which ends such a thread with the rest.
extern "C" fn on_signal(_signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: this thread's errno, restored before the handler returns.
    let saved = unsafe { *libc::__errno_location() };
    let tid = gettid();
    let asked = BUSY.iter().find(|slot| {
        slot.asked
            .compare_exchange(tid, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    });
    // SAFETY: the kernel passes a `siginfo_t` to an `SA_SIGINFO` handler,
    // alive while it runs; `si_pid` is the sender's for a signal sent by
    // `kill` or `tgkill`.
    let sender = (!info.is_null()).then(|| unsafe { (*info).si_pid() });
    let own = rustix::process::getpid().as_raw_nonzero().get();
    if let Some(slot) = asked {
        walk(slot, context);
    } else if sender.is_some_and(|sender| sender != own) {
        let fd = REQUESTS.load(Ordering::Acquire);
        if fd >= 0 {
            // SAFETY: `write` of one byte from a static to the pipe's
            // write end, which stays open as long as the dump thread
            // reads it (it sets -1 when it stops).
            unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// The program counter the signal interrupted, from the handler's context.
fn interrupted_at(context: *mut c_void) -> usize {
    if context.is_null() {
        return 0;
    }
    let context = context.cast::<libc::ucontext_t>();
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the kernel passes a `ucontext_t` to an `SA_SIGINFO`
        // handler; it lives while the handler runs.
        let rip = unsafe { (*context).uc_mcontext.gregs[libc::REG_RIP as usize] };
        usize::try_from(rip).unwrap_or(0)
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as above.
        let pc = unsafe { (*context).uc_mcontext.pc };
        usize::try_from(pc).unwrap_or(0)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = context;
        0
    }
}

/// The unwinder's context, opaque.
#[repr(C)]
struct UnwindContext {
    _opaque: [u8; 0],
}

/// `_URC_NO_REASON`: go on.
const UNWIND_ON: c_int = 0;
/// `_URC_END_OF_STACK`: stop.
const UNWIND_STOP: c_int = 5;

// The unwinder of the platform's C runtime (libgcc's), which Rust's
// standard library links for its own unwinding.
// SAFETY: the declarations are the Itanium C++ ABI's (`unwind.h`):
// `_Unwind_Reason_Code _Unwind_Backtrace(_Unwind_Trace_Fn, void *)`, whose
// callback takes the context and that argument and returns a reason code
// (`c_int`), and `_Unwind_Ptr _Unwind_GetIP(struct _Unwind_Context *)`
// (`uintptr_t`); `UnwindContext` is opaque here, only passed back.
unsafe extern "C" {
    fn _Unwind_Backtrace(
        trace: extern "C" fn(*mut UnwindContext, *mut c_void) -> c_int,
        argument: *mut c_void,
    ) -> c_int;
    fn _Unwind_GetIP(context: *mut UnwindContext) -> usize;
}

/// A walk in progress: its slot, how many frames it filled.
struct Walk {
    slot: &'static Slot,
    depth: usize,
}

/// Walks this thread's stack into `slot` (from the handler).
fn walk(slot: &'static Slot, context: *mut c_void) {
    slot.pc.store(interrupted_at(context), Ordering::Relaxed);
    let mut walk = Walk { slot, depth: 0 };
    // SAFETY: `step` is called with the unwinder's context and `walk`,
    // which lives until `_Unwind_Backtrace` returns.
    unsafe { _Unwind_Backtrace(step, (&raw mut walk).cast()) };
    slot.depth.store(walk.depth, Ordering::Release);
}

extern "C" fn step(context: *mut UnwindContext, argument: *mut c_void) -> c_int {
    // SAFETY: `argument` is the `Walk` that `walk` passed, alive and not
    // otherwise borrowed while the unwinder runs.
    let walk = unsafe { &mut *argument.cast::<Walk>() };
    if walk.depth == FRAMES {
        return UNWIND_STOP;
    }
    // SAFETY: the unwinder's own context, for the frame it is at.
    let ip = unsafe { _Unwind_GetIP(context) };
    walk.slot.frames[walk.depth].store(ip, Ordering::Relaxed);
    walk.depth += 1;
    UNWIND_ON
}

/// The dump thread: one dump per request read from the pipe (requests that
/// came meanwhile are read with it and answered by it).
fn serve(reader: std::io::PipeReader) {
    // Never closed: the pipe ends (EOF, an error) only when plugin code
    // closed descriptors it had not opened, this one or the writer, and
    // closing a closed one is an abort in debug builds (std's I/O-safety
    // check). The runner then ends on its protocol's EBADF.
    let mut reader = std::mem::ManuallyDrop::new(reader);
    let mut buf = [0u8; 64];
    // Once this thread is gone, the handler writes no more requests: the
    // writer's number may be another file's by then.
    let stop = || REQUESTS.store(-1, Ordering::Release);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return stop(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return stop(),
        }
        let dump = dump();
        if !dump.is_empty() {
            let _ = std::io::stderr().lock().write_all(dump.as_bytes());
        }
    }
}

/// Asks every thread running a request for its stack, and writes what
/// came within [`CAPTURE_WAIT`].
fn dump() -> String {
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let mut asked = Vec::new();
    for slot in &BUSY {
        let tid = slot.tid.load(Ordering::Acquire);
        if tid == 0 {
            continue;
        }
        slot.depth.store(NOT_YET, Ordering::Release);
        slot.asked.store(tid, Ordering::Release);
        // SAFETY: `tgkill` with integers: this process, one of its threads.
        let sent = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, STACK_SIGNAL) } == 0;
        if sent {
            asked.push((slot, tid));
        } else {
            slot.asked.store(0, Ordering::Release);
        }
    }
    // The plugin's symbols (read at the first dump) while the threads
    // walk their stacks.
    if !asked.is_empty()
        && let Some(library) = LIBRARY.get()
    {
        library.symbols();
    }
    let deadline = Instant::now() + CAPTURE_WAIT;
    while asked
        .iter()
        .any(|(slot, _)| slot.depth.load(Ordering::Acquire) == NOT_YET)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut out = String::new();
    for (slot, tid) in asked {
        let depth = slot.depth.load(Ordering::Acquire);
        if depth == NOT_YET || slot.tid.load(Ordering::Acquire) != tid {
            continue;
        }
        let frames: Vec<usize> = slot.frames[..depth.min(FRAMES)]
            .iter()
            .map(|frame| frame.load(Ordering::Relaxed))
            .collect();
        let pc = slot.pc.load(Ordering::Relaxed);
        // The walk starts in the handler: the interrupted frame on, or that
        // frame alone when the walk did not get past the signal's.
        let interrupted = match frames.iter().position(|&ip| ip == pc) {
            Some(at) => frames[at..].to_vec(),
            None => vec![pc],
        };
        let _ = writeln!(
            out,
            "Native thread {tid}, request {} (most recent call first):",
            slot.request.load(Ordering::Relaxed)
        );
        for (i, &ip) in interrupted.iter().enumerate() {
            let _ = writeln!(out, "  at {}", describe(ip, i == 0));
        }
    }
    out
}

/// Where an address lies (`dladdr`).
struct Located {
    /// The file mapped there.
    file: String,
    /// Where the dynamic loader mapped it.
    base: usize,
    /// The nearest exported symbol at or before the address, and where it
    /// starts.
    exported: Option<(String, usize)>,
}

/// Where `address` lies, or `None` outside every loaded file.
fn locate(address: usize) -> Option<Located> {
    // SAFETY: an all-zero `Dl_info` is valid (null pointers).
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `dladdr` only reads the loader's tables and fills `info`.
    if unsafe { libc::dladdr(address as *const c_void, &mut info) } == 0 {
        return None;
    }
    let text = |ptr: *const libc::c_char| -> Option<String> {
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `dladdr` fills names with null or with NUL-terminated
        // strings of the loader's, alive while the library is loaded
        // (never unloaded in a runner).
        let name = unsafe { CStr::from_ptr(ptr) };
        Some(name.to_string_lossy().into_owned())
    };
    Some(Located {
        file: text(info.dli_fname).unwrap_or_else(|| "?".to_owned()),
        base: info.dli_fbase as usize,
        exported: text(info.dli_sname).map(|name| (name, info.dli_saddr as usize)),
    })
}

/// `ip` in words: its function and file, ` [plugin]` when it is the
/// plugin's library. `innermost`: the interrupted frame (any other's
/// address is where its call returns to, one past the call).
fn describe(ip: usize, innermost: bool) -> String {
    let at = if innermost { ip } else { ip.wrapping_sub(1) };
    let Some(Located {
        file,
        base,
        exported,
    }) = locate(at)
    else {
        return format!("{ip:#x}");
    };
    let offset = at.wrapping_sub(base);
    if let Some(library) = LIBRARY.get().filter(|library| library.base == base) {
        let name = function_at(library.symbols(), offset as u64)
            .map_or_else(|| format!("{offset:#x}"), demangled);
        return format!("{name} ({}) [plugin]", library.shown.display());
    }
    // The runner's own executable has no name in `dladdr`'s answer.
    let file = if file.is_empty() {
        "the runner".to_owned()
    } else {
        file
    };
    let name = match exported {
        Some((name, start)) => {
            let past = at.wrapping_sub(start);
            if past == 0 {
                demangled(&name)
            } else {
                format!("{}+{past:#x}", demangled(&name))
            }
        }
        None => format!("{offset:#x}"),
    };
    format!("{name} ({file})")
}

/// The function of `symbols` (by address) that holds `offset`: the nearest
/// at or below it, if its size reaches it (or it has none).
fn function_at(symbols: &[(u64, u64, String)], offset: u64) -> Option<&str> {
    let below = symbols.partition_point(|(start, _, _)| *start <= offset);
    let (start, size, name) = symbols.get(below.checked_sub(1)?)?;
    (*size == 0 || offset - start < *size).then_some(name.as_str())
}

/// The largest library whose symbols a dump reads.
const MAX_LIBRARY_BYTES: u64 = 512 << 20;

/// The bytes of the file at `path`, if it is at most [`MAX_LIBRARY_BYTES`]
/// and the memory for them can be had: under the runner's memory limit a
/// failed allocation must not abort the dump (the runner with it).
fn read_library(path: &std::path::Path) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len > MAX_LIBRARY_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(usize::try_from(len).ok()?).ok()?;
    // No more than its size said (a descriptor replaced by a pipe).
    file.take(len).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The functions of the library whose bytes are at `path`, by address
/// (its symbol table, else its dynamic one); none when it cannot be read.
fn read_symbols(path: &std::path::Path) -> Vec<(u64, u64, String)> {
    use object::{Object as _, ObjectSymbol as _, SymbolKind};
    let Some(bytes) = read_library(path) else {
        return Vec::new();
    };
    let Ok(file) = object::File::parse(&*bytes) else {
        return Vec::new();
    };
    let mut symbols: Vec<(u64, u64, String)> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|symbol| symbol.kind() == SymbolKind::Text && symbol.address() != 0)
        .filter_map(|symbol| {
            let name = symbol.name().ok()?;
            Some((symbol.address(), symbol.size(), name.to_owned()))
        })
        .collect();
    // By address, the largest first at one address (an alias of size 0
    // beside the function's own symbol): the one kept.
    symbols.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    symbols.dedup_by_key(|(start, _, _)| *start);
    symbols
}

/// A symbol's name as written in source (Rust's demangled, without its
/// hash; any other as it is).
fn demangled(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(name) => format!("{name:#}"),
        Err(_) => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_names_lose_their_hash_and_others_stay() {
        assert_eq!(
            demangled("_ZN4core6option15Option$LT$T$GT$6unwrap17h0123456789abcdefE"),
            "core::option::Option<T>::unwrap"
        );
        assert_eq!(demangled("clock_nanosleep"), "clock_nanosleep");
    }

    #[test]
    fn an_offset_is_named_by_the_function_that_holds_it() {
        let symbols = vec![
            (0x100, 0x20, "a".to_owned()),
            (0x200, 0, "b".to_owned()),
            (0x300, 0x10, "c".to_owned()),
        ];
        assert_eq!(function_at(&symbols, 0x100), Some("a"));
        assert_eq!(function_at(&symbols, 0x11f), Some("a"));
        // Past its size, before the next: no name (not a distant one).
        assert_eq!(function_at(&symbols, 0x120), None);
        // A symbol of no size holds what follows it, up to the next.
        assert_eq!(function_at(&symbols, 0x2ff), Some("b"));
        assert_eq!(function_at(&symbols, 0x305), Some("c"));
        assert_eq!(function_at(&symbols, 0x50), None);
        assert_eq!(function_at(&[], 0x50), None);
    }

    #[test]
    fn a_library_s_functions_are_read_from_its_symbol_table() {
        // This test's own executable: its functions, this one among them.
        let Ok(exe) = std::env::current_exe() else {
            panic!("no executable path");
        };
        let symbols = read_symbols(&exe);
        assert!(
            symbols
                .iter()
                .any(|(_, _, name)| demangled(name).ends_with("read_symbols")),
            "{} symbols, none is read_symbols",
            symbols.len()
        );
        assert!(read_symbols(std::path::Path::new("/nonexistent")).is_empty());
    }
}
