//! Where a runner's plugin code is stuck, before a timeout's kill: the
//! runner asked ([`stuck_at`], [`ask_for_stacks`]: the signal, the
//! provisional reason, the wait on [`StderrLog`](super::stderr::StderrLog)'s
//! watch), and the dump read ([`read_stuck_at`]). The dump is the stacks
//! its threads wrote to stderr when the host sent the hello's `stack_signal` (Python's
//! `faulthandler`: a header per thread, then its frames, most recent
//! first):
//!
//! ```text
//! Current thread 0x00007f3c8a9b4740 (most recent call first):
//!   File "/usr/lib/python3.11/threading.py", line 324 in wait
//!   File "/plugins/slow/plugin.py", line 8 in __init__
//!   File "/root/.cache/forgesyte/python/forgesyte_runner_0123/serve.py", line 90 in create
//! ```
//!
//! A native runner's dump (`runner/dump.rs`) has a header per thread
//! running a request (`Native thread TID, request ID (most recent call
//! first):`), then its frames, `  at FUNCTION (FILE)`, those of the
//! plugin's library marked ` [plugin]`.
//!
//! The thread that matters is the one the runner called the plugin on:
//! its frames go from the runner's own files into the plugin's. Its first
//! frame past the runner's, the import system's (a module stuck as it is
//! imported) and the standard library's (the runner's event loop, its own
//! start) is the plugin's entry (`__init__`, the tool, `<module>`); its
//! innermost frame is where it waits, when that is elsewhere. When more
//! than one thread is in the plugin's code (calls in flight together), the
//! dump cannot tell which is the call that timed out, and says nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_errors::{PluginError, TimeoutError};

use super::child::{Child, KillReason, Shared, kill, kill_locked};
use super::stderr::STACKS_WAIT;
use crate::python::is_runner_file;

/// Whether process `pid` has a handler for `signal` (its `/proc` status's
/// `SigCgt` mask): a runner not yet at the point where it sets one (an
/// interpreter still starting) would be ended by the signal, its death
/// then read as the signal's rather than the timeout's.
pub(crate) fn catches(pid: u32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|status| caught_in(&status, signal))
}

/// What a timeout's reason says of a runner found stopped (`SIGSTOP`,
/// `SIGTSTP`: its own code may have sent one to itself or its group), in
/// place of where its code was: stopped, it runs no code and dumps none.
pub(crate) const STOPPED: &str =
    "a stop: the process was stopped by a signal (SIGSTOP, SIGTSTP …) and ran no code";

/// Whether process `pid` is stopped by a signal (or a tracer).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| stopped_in(&status))
}

/// Whether a `/proc/PID/status` text's `State` is stopped (`T`, or `t`:
/// stopped by a tracer).
fn stopped_in(status: &str) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("State:"))
        .is_some_and(|state| matches!(state.trim_start().chars().next(), Some('T' | 't')))
}

/// Whether a `/proc/PID/status` text's `SigCgt` mask holds `signal`.
fn caught_in(status: &str, signal: i32) -> bool {
    let Some(bit) = u32::try_from(signal).ok().and_then(|s| s.checked_sub(1)) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| bit < 64 && mask & (1 << bit) != 0)
}

/// Whether `line` starts one thread's stack in a `faulthandler` dump
/// (`Thread 0x… (most recent call first):`, `Current thread 0x… (…):`, or
/// `Stack (most recent call first):` for a dump of one thread), wherever
/// in the line: the dump may begin after an unended line the plugin wrote
/// (a progress bar's `\r`).
pub(crate) fn is_stack_header(line: &str) -> bool {
    line.ends_with("(most recent call first):")
        && (line.contains("Thread 0x")
            || line.contains("Current thread 0x")
            || line.ends_with("Stack (most recent call first):")
            || is_native_header(line))
}

/// Whether `line` starts one thread's stack in a native runner's dump.
fn is_native_header(line: &str) -> bool {
    line.contains("Native thread ") && line.ends_with("(most recent call first):")
}

/// The mark of a native frame in the plugin's library.
const PLUGIN_FRAME: &str = " [plugin]";

/// The name of a native frame's function (`FUNCTION (FILE)`) with what an
/// impl's name starts with (`<&mut T as core::…>`) taken off.
fn function_path(frame: &str) -> &str {
    let function = frame.trim_start_matches(['<', '&', '*', '[', '(']);
    ["mut ", "const ", "dyn "]
        .iter()
        .fold(function, |f, word| f.strip_prefix(word).unwrap_or(f))
}

/// Whether a native frame is Rust's standard library compiled into the
/// plugin's library, not its own code: a function of its paths, or a
/// method of an impl for a type named by no path (`<&mut F as
/// core::ops::FnMut<A>>`, `<[T] as …>`: a blanket impl; the plugin's
/// types have paths).
fn is_rusts_own(frame: &str) -> bool {
    let function = function_path(frame);
    if frame.starts_with('<')
        && let Some((self_type, _)) = function.split_once(" as ")
        && !self_type.contains("::")
    {
        return true;
    }
    [
        "std::",
        "core::",
        "alloc::",
        "panic_unwind::",
        "compiler_builtins::",
        "std_detect::",
        "__rust",
        "rust_begin_unwind",
    ]
    .iter()
    .any(|prefix| function.starts_with(prefix))
}

/// Whether a native frame is the SDK's glue around the plugin's code (its
/// name holds the plugin's type: `forgesyte_plugin_sdk::…::<my::Plugin>`).
fn is_the_sdks(frame: &str) -> bool {
    function_path(frame).starts_with("forgesyte_plugin_sdk::")
}

/// [`read_stuck_at`] of a native runner's dump: the innermost frame of the
/// plugin's own code (not the standard library's nor the SDK's in its
/// library; else, its code all inlined, the SDK's, then any of its
/// library's), and the innermost frame when that is elsewhere. A thread
/// dumped twice (two dumps within one watch) counts once.
fn read_native_stuck_at(lines: &[String]) -> Option<String> {
    let mut threads: Vec<Vec<&str>> = Vec::new();
    let mut headers: Vec<&str> = Vec::new();
    let mut repeated = false;
    for line in lines {
        if is_native_header(line) {
            repeated = headers.contains(&line.as_str());
            if !repeated {
                headers.push(line);
                threads.push(Vec::new());
            }
        } else if let (false, Some(thread), Some(frame)) = (
            repeated,
            threads.last_mut(),
            line.trim_start().strip_prefix("at "),
        ) {
            thread.push(frame);
        }
    }
    the_one_place(threads.iter().filter_map(|frames| {
        let plugins = || frames.iter().filter_map(|f| f.strip_suffix(PLUGIN_FRAME));
        let entry = plugins()
            .find(|f| !is_rusts_own(f) && !is_the_sdks(f))
            .or_else(|| plugins().find(|f| is_the_sdks(f)))
            .or_else(|| plugins().next())?;
        let innermost = frames[0].strip_suffix(PLUGIN_FRAME).unwrap_or(frames[0]);
        Some(place(entry, innermost))
    }))
}

/// A thread's place: `ENTRY`, or `ENTRY, in INNERMOST` when it waits in
/// code below its entry.
fn place(entry: &str, innermost: &str) -> String {
    if innermost == entry {
        entry.to_owned()
    } else {
        format!("{entry}, in {innermost}")
    }
}

/// The place of the one thread in the plugin's code; `None` for none, or
/// for several (the dump cannot tell which call timed out).
fn the_one_place(mut places: impl Iterator<Item = String>) -> Option<String> {
    let only = places.next()?;
    places.next().is_none().then_some(only)
}

/// One frame line: `  File "PATH", line N in FUNCTION`, as `PATH:N in
/// FUNCTION` with the path, or `None` for any other line.
fn frame(line: &str) -> Option<(&str, String)> {
    let rest = line.trim_start().strip_prefix("File \"")?;
    let (path, rest) = rest.rsplit_once("\", line ")?;
    let (number, function) = rest.split_once(" in ")?;
    number.parse::<u32>().ok()?;
    Some((path, format!("{path}:{number} in {function}")))
}

/// Whether `path` is Python's own: the import system and frozen modules
/// (`<frozen importlib._bootstrap>`, `<frozen runpy>`), or the standard
/// library (`…/lib/python3.11/threading.py`, but not what is installed
/// under its `site-packages` or `dist-packages`).
fn is_pythons_own(path: &str) -> bool {
    path.starts_with("<frozen ")
        || ((path.contains("/lib/python3") || path.contains("/lib64/python3"))
            && !path.contains("-packages/"))
}

/// Where the plugin's code is stuck, from a whole dump's lines: `ENTRY`
/// (the plugin's frame the runner called), or `ENTRY, in INNERMOST` when
/// it waits in code below it (a library, the standard library). `None`
/// when no thread, or more than one, is in code the runner called, or when
/// a thread's stack was cut (`faulthandler` writes 100 frames, then
/// `...`): its thread could be the one.
pub(crate) fn read_stuck_at(lines: &[String]) -> Option<String> {
    if lines.iter().any(|line| is_native_header(line)) {
        return read_native_stuck_at(lines);
    }
    if lines.iter().any(|line| line.trim() == "...") {
        return None;
    }
    let mut threads: Vec<Vec<(&str, String)>> = Vec::new();
    for line in lines {
        if is_stack_header(line) {
            threads.push(Vec::new());
        } else if let (Some(thread), Some(frame)) = (threads.last_mut(), frame(line)) {
            thread.push(frame);
        }
    }
    the_one_place(threads.iter().filter_map(|frames| {
        // Outermost first: past what started the thread, the runner's
        // frames, then (through Python's own, for a module's code or the
        // runner's event loop) the plugin's frame the runner called.
        let mut outer_first = frames.iter().rev().map(|(path, at)| (*path, at));
        outer_first.find(|(path, _)| is_runner_file(path))?;
        let (_, entry) =
            outer_first.find(|(path, _)| !is_runner_file(path) && !is_pythons_own(path))?;
        Some(place(entry, &frames[0].1))
    }))
}

// Asking a runner for its stacks, before a timeout's kill.

/// Kills the runner for its `reason` when dropped with one
/// ([`Child::kill_timed_out_awaited`](super::child::Child::kill_timed_out_awaited)
/// dropped as it waits).
struct KillOnDrop {
    shared: Arc<Shared>,
    reason: Option<KillReason>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(reason) = self.reason.take() else {
            return;
        };
        // Not waited for here (a task may be dropping it): the process's
        // lock, when another holds it a while, is waited for on a thread
        // (only the reaper of a death already asked for holds it longer).
        if let Some(mut process) = self.shared.process.try_lock() {
            kill_locked(&self.shared, &mut process, reason);
            return;
        }
        let shared = Arc::clone(&self.shared);
        let killer = std::thread::Builder::new()
            .name("forgesyte-kill".into())
            .spawn(move || kill(&shared, reason));
        if let Err(e) = killer {
            tracing::warn!(plugin = %self.shared.plugin, "cannot start a thread to kill a timed-out runner: {e}");
        }
    }
}

/// The kill reason of a timeout whose plugin was `stuck_at`, and the
/// timeout with it: the registry's reason says where, the crash report
/// (which other calls' clients read) says `plain`.
fn located_timeout(
    mut timeout: TimeoutError,
    stuck_at: Option<String>,
    plain: String,
    as_error: fn(TimeoutError) -> PluginError,
) -> (KillReason, TimeoutError) {
    timeout.stuck_at = stuck_at;
    let located = as_error(timeout.clone()).reason();
    (KillReason::timed_out(plain, located), timeout)
}

/// Where the plugin's code is stuck (`PATH:LINE in FUNCTION`), for a
/// timeout's reason: a runner with a stack signal (its hello's, or the
/// host's Python runner's before its hello) is sent it, and the dump read
/// from its stderr for [`STACKS_WAIT`] at most. `provisional` is the kill's
/// reason should the runner die of the signal.
pub(super) fn stuck_at(
    shared: &Shared,
    signal: Option<i32>,
    provisional: KillReason,
) -> Option<String> {
    located(shared, signal, provisional, super::stderr_withheld())
}

/// [`stuck_at`] for the log alone (a runner killed for outliving its
/// stop): the place is returned even while stderr is withheld, since no
/// answer carries it.
pub(super) fn stuck_at_for_log(
    shared: &Shared,
    signal: Option<i32>,
    provisional: KillReason,
) -> Option<String> {
    located(shared, signal, provisional, false)
}

/// The longest [`stuck_at`] takes: the process's lock, then the dump.
pub(super) const STUCK_AT_MAX: Duration = Duration::from_millis(310);

/// How long [`ask_for_stacks`] waits for the process's lock.
const LOCK_WAIT: Duration = Duration::from_millis(10);

fn located(
    shared: &Shared,
    signal: Option<i32>,
    provisional: KillReason,
    withheld: bool,
) -> Option<String> {
    let deadline = match begin_locating(shared, signal, provisional) {
        Locating::Known(at) => return at,
        Locating::Dumping(deadline) => deadline,
    };
    loop {
        if let Some(at) = stacks_over(shared, deadline, withheld) {
            return at;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where locating a runner's stuck code begins ([`begin_locating`]).
enum Locating {
    /// Known at once: a stopped runner ([`STOPPED`]), or no dump asked for.
    Known(Option<String>),
    /// A dump asked for, to be read until this deadline ([`stacks_over`]).
    Dumping(Instant),
}

/// The first step of locating where a timed-out runner's code is, shared
/// by the blocking and the awaited kill: a runner stopped by a signal runs
/// no code and dumps none (said at once); else its stacks are asked for
/// ([`ask_for_stacks`]).
fn begin_locating(shared: &Shared, signal: Option<i32>, provisional: KillReason) -> Locating {
    if stopped(shared.pid) {
        return Locating::Known(Some(STOPPED.to_owned()));
    }
    match ask_for_stacks(shared, signal, provisional) {
        Some(deadline) => Locating::Dumping(deadline),
        None => Locating::Known(None),
    }
}

/// Sends the runner `signal`, its stderr watched for the dump, unless
/// another caller did a moment ago (its dump is shared), `provisional`
/// recorded first; when to give up waiting for the dump. `None`: none was
/// asked for (no signal, none the runner has a handler for yet, it has
/// ended, or the reaper holds it, dying).
fn ask_for_stacks(
    shared: &Shared,
    signal: Option<i32>,
    provisional: KillReason,
) -> Option<Instant> {
    let signal = signal.filter(|&signal| catches(shared.pid, signal))?;
    let process = shared.process.try_lock_for(LOCK_WAIT)?;
    if !process.is_running() {
        return None;
    }
    shared.kill_reason.lock().get_or_insert(KillReason {
        provisional: true,
        ..provisional
    });
    let (asked, ask) = shared.stderr.watch_stacks();
    if ask && !process.signal(signal) {
        return None;
    }
    Some(asked + STACKS_WAIT)
}

/// Where the dump says the plugin is, once the dump is over or `deadline`
/// has passed (a dump cut short, by the wait or its cap, says nothing);
/// `None` while it may go on. While stderr is withheld (`withheld`:
/// [`super::set_stderr_withheld`]) the place, read from stderr, is only
/// logged, and nothing is said.
fn stacks_over(shared: &Shared, deadline: Instant, withheld: bool) -> Option<Option<String>> {
    let at = match shared.stderr.stacks() {
        Some(dump) => dump.and_then(|lines| read_stuck_at(&lines)),
        None if Instant::now() >= deadline => None,
        None => return None,
    };
    if let Some(place) = &at
        && withheld
    {
        tracing::warn!(
            plugin = %shared.plugin,
            pid = shared.pid,
            "plugin {} timed out stuck at {place} (withheld from the API)",
            shared.plugin
        );
        return Some(None);
    }
    Some(at)
}

impl Child {
    /// Kills the runner for `timeout` (`as_error`: the error it is, for its
    /// reason) once it said where its plugin was stuck ([`stuck_at`]), and
    /// waits for its death ([`Self::kill_and_wait`]); returns the timeout,
    /// its `stuck_at` filled when known.
    pub(crate) fn kill_timed_out(
        &self,
        timeout: TimeoutError,
        as_error: fn(TimeoutError) -> PluginError,
    ) -> TimeoutError {
        let plain = as_error(timeout.clone()).reason();
        let stuck_at = stuck_at(
            &self.shared,
            self.hello.stack_signal,
            KillReason::host(&plain),
        );
        let (reason, located) = located_timeout(timeout, stuck_at, plain, as_error);
        self.kill_and_wait(reason);
        located
    }

    /// [`Self::kill_timed_out`] for a task ([`Self::kill_and_await`]). It
    /// must be polled inside a tokio runtime whose timers are enabled.
    /// Dropped while it waits for the stacks, it kills the runner all the
    /// same (for the plain timeout): the timeout has passed, and the
    /// provisional reason recorded must not outlive its runner's kill.
    pub(crate) async fn kill_timed_out_awaited(
        &self,
        timeout: TimeoutError,
        as_error: fn(TimeoutError) -> PluginError,
    ) -> TimeoutError {
        let plain = as_error(timeout.clone()).reason();
        let mut unkilled = KillOnDrop {
            shared: Arc::clone(&self.shared),
            reason: Some(KillReason::host(&plain)),
        };
        let provisional = KillReason::host(&plain);
        let stuck_at = match begin_locating(&self.shared, self.hello.stack_signal, provisional) {
            Locating::Known(at) => at,
            Locating::Dumping(deadline) => loop {
                if let Some(at) = stacks_over(&self.shared, deadline, super::stderr_withheld()) {
                    break at;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
        };
        let (reason, located) = located_timeout(timeout, stuck_at, plain, as_error);
        // Killed at the first poll, before any await.
        unkilled.reason = None;
        self.kill_and_await(reason).await;
        located
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_state_is_read_from_the_status() {
        assert!(stopped_in("Name:\tr\nState:\tT (stopped)\nPid:\t4\n"));
        assert!(stopped_in("State:\tt (tracing stop)\n"));
        assert!(!stopped_in("State:\tS (sleeping)\n"));
        assert!(!stopped_in("State:\tR (running)\n"));
        assert!(!stopped_in(""));
        assert!(!stopped(u32::MAX), "no such process");
    }

    #[test]
    fn the_longest_wait_for_a_dump_covers_the_lock_and_the_dump() {
        assert!(STUCK_AT_MAX >= LOCK_WAIT + STACKS_WAIT);
    }

    /// The registry hears where a timed-out plugin was stuck; the crash
    /// report, which other calls' clients read, does not.
    #[test]
    fn a_timeouts_location_goes_to_the_registry_alone() {
        let timeout = crate::manifest::Limits::call_timed_out("t", Duration::from_secs(1));
        let plain = PluginError::Timeout(timeout.clone()).reason();
        let (reason, located) = located_timeout(
            timeout,
            Some("/p/plugin.py:3 in t".into()),
            plain.clone(),
            PluginError::Timeout,
        );
        assert_eq!(located.stuck_at.as_deref(), Some("/p/plugin.py:3 in t"));
        let registry = reason.registry_reason.unwrap_or_default();
        assert!(
            registry.contains(", stuck at /p/plugin.py:3 in t;"),
            "{registry}"
        );
        assert!(!plain.contains("stuck at"), "{plain}");
        assert!(
            matches!(&reason.cause, forgesyte_errors::CrashCause::Killed { reason } if *reason == plain),
            "{:?}",
            reason.cause
        );
        assert!(!reason.provisional);
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const RUNNER: &str = "/root/.cache/forgesyte/python/forgesyte_runner_00ff00ff00ff00ff/serve.py";

    #[test]
    fn a_native_dump_names_the_plugins_own_innermost_function() {
        let dump = lines(
            "Native thread 42, request 7 (most recent call first):\n\
             \x20 at clock_nanosleep (/lib/x86_64-linux-gnu/libc.so.6)\n\
             \x20 at std::thread::sleep (/p/libslow.so) [plugin]\n\
             \x20 at slow::spin (/p/libslow.so) [plugin]\n\
             \x20 at forgesyte_plugin_sdk::ffi::call (/p/libslow.so) [plugin]\n\
             \x20 at forgesyte::runner::handle+0x40 (/usr/bin/forgesyte)\n",
        );
        assert!(is_stack_header(&dump[0]));
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some(
                "slow::spin (/p/libslow.so), in clock_nanosleep (/lib/x86_64-linux-gnu/libc.so.6)"
            )
        );
        // Spinning in its own code: that frame alone.
        let spinning = lines(
            "Native thread 42, request 7 (most recent call first):\n\
             \x20 at slow::spin (/p/libslow.so) [plugin]\n\
             \x20 at forgesyte::runner::handle (/usr/bin/forgesyte)\n",
        );
        assert_eq!(
            read_stuck_at(&spinning).as_deref(),
            Some("slow::spin (/p/libslow.so)")
        );
        // Two threads in the plugin's code, or none: nothing said; one
        // thread dumped twice is one.
        let other = spinning.join("\n").replace("thread 42", "thread 43");
        let two = lines(&format!("{}\n{other}", spinning.join("\n")));
        assert_eq!(read_stuck_at(&two), None);
        let twice = lines(&format!("{}\n{}", spinning.join("\n"), spinning.join("\n")));
        assert_eq!(
            read_stuck_at(&twice).as_deref(),
            Some("slow::spin (/p/libslow.so)")
        );
        // A method of its own type's impl of a standard trait is its own.
        assert!(!is_rusts_own(
            "<slow::Slow as core::ops::Drop>::drop (/p/libslow.so)"
        ));
        assert!(is_rusts_own(
            "<[T] as core::fmt::Debug>::fmt (/p/libslow.so)"
        ));
        assert!(is_rusts_own("alloc::vec::Vec<T>::push (/p/libslow.so)"));
        // Its code all inlined into the SDK's glue: that frame, which names
        // its type (an impl of the standard library's is not its code).
        let inlined = lines(
            "Native thread 42, request 7 (most recent call first):\n\
             \x20 at <&mut T as core::ops::FnMut<A>>::call_mut (/p/libslow.so) [plugin]\n\
             \x20 at forgesyte_plugin_sdk::abi::call::<slow::Slow> (/p/libslow.so) [plugin]\n",
        );
        assert_eq!(
            read_stuck_at(&inlined).as_deref(),
            Some(
                "forgesyte_plugin_sdk::abi::call::<slow::Slow> (/p/libslow.so), in \
                 <&mut T as core::ops::FnMut<A>>::call_mut (/p/libslow.so)"
            )
        );
        let none = lines(
            "Native thread 42, request 7 (most recent call first):\n\
             \x20 at read (/lib/x86_64-linux-gnu/libc.so.6)\n",
        );
        assert_eq!(read_stuck_at(&none), None);
    }

    #[test]
    fn the_one_thread_in_the_plugins_code_says_where_it_is() {
        let dump = lines(&format!(
            "Thread 0x00007f0000000002 (most recent call first):\n\
             \x20 File \"{RUNNER}\", line 40 in _idle\n\
             \x20 File \"/usr/lib/python3.11/threading.py\", line 975 in run\n\
             \n\
             Thread 0x00007f0000000003 (most recent call first):\n\
             \x20 File \"/usr/lib/python3.11/threading.py\", line 324 in wait\n\
             \x20 File \"/plugins/slow/helper.py\", line 3 in block\n\
             \x20 File \"/plugins/slow/plugin.py\", line 12 in slow\n\
             \x20 File \"{RUNNER}\", line 90 in call\n\
             \x20 File \"{RUNNER}\", line 70 in serve\n\
             \n\
             Current thread 0x00007f0000000001 (most recent call first):\n\
             \x20 File \"/plugins/slow/plugin.py\", line 30 in ticker\n\
             \x20 File \"/usr/lib/python3.11/threading.py\", line 975 in run\n"
        ));
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some(
                "/plugins/slow/plugin.py:12 in slow, in \
                 /usr/lib/python3.11/threading.py:324 in wait"
            )
        );
    }

    #[test]
    fn two_threads_in_the_plugins_code_say_nothing() {
        let call = |function: &str| {
            format!(
                "Thread 0x1 (most recent call first):\n\
                 \x20 File \"/p/plugin.py\", line 5 in {function}\n\
                 \x20 File \"{RUNNER}\", line 90 in call\n"
            )
        };
        let dump = lines(&format!("{}{}", call("a"), call("b")));
        assert_eq!(read_stuck_at(&dump), None);
        assert_eq!(
            read_stuck_at(&lines(&call("a"))).as_deref(),
            Some("/p/plugin.py:5 in a")
        );
    }

    #[test]
    fn pythons_own_code_the_runner_runs_is_not_the_plugins() {
        // The runner's event loop (an async tool ran once), waiting, beside
        // the call that is stuck; and a runner still starting (confining
        // itself) with nothing of the plugin's.
        let dump = lines(&format!(
            "Thread 0x2 (most recent call first):\n\
             \x20 File \"/usr/lib/python3.11/selectors.py\", line 468 in select\n\
             \x20 File \"/usr/lib/python3.11/asyncio/base_events.py\", line 607 in run_forever\n\
             \x20 File \"{RUNNER}\", line 120 in _run_loop\n\
             \x20 File \"/usr/lib/python3.11/threading.py\", line 975 in run\n\
             Current thread 0x1 (most recent call first):\n\
             \x20 File \"/p/plugin.py\", line 9 in hang\n\
             \x20 File \"{RUNNER}\", line 90 in call\n"
        ));
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some("/p/plugin.py:9 in hang")
        );
        let starting = lines(&format!(
            "Current thread 0x1 (most recent call first):\n\
             \x20 File \"/usr/lib/python3.11/ctypes/__init__.py\", line 439 in <module>\n\
             \x20 File \"<frozen importlib._bootstrap>\", line 241 in _call_with_frames_removed\n\
             \x20 File \"{RUNNER}\", line 30 in confine\n"
        ));
        assert_eq!(read_stuck_at(&starting), None);
        // What a virtualenv installed is the plugin's side.
        assert!(!is_pythons_own(
            "/v/lib/python3.11/site-packages/torch/__init__.py"
        ));
        assert!(is_pythons_own("<frozen runpy>"));
    }

    #[test]
    fn a_stack_cut_short_or_a_header_after_a_progress_bar() {
        let deep = lines(&format!(
            "Thread 0x2 (most recent call first):\n\
             \x20 File \"/p/plugin.py\", line 3 in deep\n\
             \x20 ...\n\
             Current thread 0x1 (most recent call first):\n\
             \x20 File \"/p/plugin.py\", line 9 in hang\n\
             \x20 File \"{RUNNER}\", line 90 in call\n"
        ));
        assert_eq!(read_stuck_at(&deep), None);
        let after_a_bar = lines(&format!(
            " 45%|####      | 45/100\rCurrent thread 0x1 (most recent call first):\n\
             \x20 File \"/p/plugin.py\", line 9 in hang\n\
             \x20 File \"{RUNNER}\", line 90 in call\n"
        ));
        assert_eq!(
            read_stuck_at(&after_a_bar).as_deref(),
            Some("/p/plugin.py:9 in hang")
        );
        assert!(is_pythons_own(
            "/usr/lib64/python3.12/asyncio/base_events.py"
        ));
    }

    #[test]
    fn a_plugin_frame_innermost_is_said_once() {
        let dump = lines(
            "Stack (most recent call first):\n\
             \x20 File \"/p/plugin.py\", line 8 in __init__\n\
             \x20 File \"<forgesyte_runner/loading.py>\", line 100 in construct\n",
        );
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some("/p/plugin.py:8 in __init__")
        );
    }

    #[test]
    fn a_module_stuck_as_it_is_imported_is_its_own_entry() {
        let dump = lines(
            "Current thread 0x1 (most recent call first):\n\
             \x20 File \"/usr/lib/python3.11/socket.py\", line 5 in connect\n\
             \x20 File \"/p/plugin.py\", line 3 in <module>\n\
             \x20 File \"<frozen importlib._bootstrap>\", line 241 in _call_with_frames_removed\n\
             \x20 File \"<frozen importlib._bootstrap_external>\", line 940 in exec_module\n\
             \x20 File \"<forgesyte_runner/loading.py>\", line 50 in import_plugin\n",
        );
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some("/p/plugin.py:3 in <module>, in /usr/lib/python3.11/socket.py:5 in connect")
        );
        // A module the plugin imports lazily, stuck: the plugin's frame
        // stays the entry.
        let dump = lines(
            "Current thread 0x1 (most recent call first):\n\
             \x20 File \"/venv/heavy/__init__.py\", line 9 in <module>\n\
             \x20 File \"<frozen importlib._bootstrap>\", line 241 in _call_with_frames_removed\n\
             \x20 File \"/p/plugin.py\", line 12 in __init__\n\
             \x20 File \"<forgesyte_runner/loading.py>\", line 80 in construct\n",
        );
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some("/p/plugin.py:12 in __init__, in /venv/heavy/__init__.py:9 in <module>")
        );
    }

    #[test]
    fn a_plugin_stuck_in_the_runners_own_code_names_both() {
        let dump = lines(&format!(
            "Current thread 0x1 (most recent call first):\n\
             \x20 File \"<forgesyte_runner/api.py>\", line 30 in emit\n\
             \x20 File \"/p/plugin.py\", line 7 in tool\n\
             \x20 File \"{RUNNER}\", line 90 in call\n"
        ));
        assert_eq!(
            read_stuck_at(&dump).as_deref(),
            Some("/p/plugin.py:7 in tool, in <forgesyte_runner/api.py>:30 in emit")
        );
    }

    #[test]
    fn no_dump_or_only_the_runner_says_nothing() {
        assert_eq!(read_stuck_at(&[]), None);
        assert_eq!(read_stuck_at(&lines("some line\nTraceback:\n")), None);
        let idle = lines(&format!(
            "Current thread 0x1 (most recent call first):\n  File \"{RUNNER}\", line 40 in _idle\n"
        ));
        assert_eq!(read_stuck_at(&idle), None);
        // Frames with no header first are not a thread's.
        let headless = lines(&format!(
            "  File \"/p/plugin.py\", line 8 in x\n  File \"{RUNNER}\", line 40 in call\n"
        ));
        assert_eq!(read_stuck_at(&headless), None);
    }

    #[test]
    fn a_handler_is_read_from_the_caught_mask() {
        let status = "Name:\tpython3\nSigIgn:\t0000000001001000\nSigCgt:\t0000000180000802\n";
        assert!(caught_in(status, 12), "SIGUSR2 is bit 11");
        assert!(caught_in(status, 2));
        assert!(!caught_in(status, 10));
        assert!(!caught_in(status, 0));
        assert!(!caught_in("SigCgt:\tzz\n", 12));
        assert!(!caught_in("Name:\tx\n", 12));
        // This test's own process catches no SIGUSR2.
        assert!(!catches(std::process::id(), libc::SIGUSR2));
    }

    #[test]
    fn frames_and_runner_files_are_read_exactly() {
        assert_eq!(
            frame("  File \"/a b/p.py\", line 7 in f").map(|f| f.1),
            Some("/a b/p.py:7 in f".to_owned())
        );
        assert_eq!(frame("  File \"/p.py\", line x in f"), None);
        assert_eq!(frame("File"), None);
        assert!(is_runner_file(RUNNER));
        assert!(is_runner_file("<forgesyte_runner/tools.py>"));
        assert!(!is_runner_file("/plugins/forgesyte_runner.py"));
        assert!(!is_runner_file("/plugins/my_forgesyte_runner_x/p.py"));
        assert!(!is_runner_file("/plugins/forgesyte_runner_x/plugin.py"));
        assert!(!is_runner_file(
            "/p/forgesyte_runner_00ff00ff00ff00fg/plugin.py"
        ));
        assert!(is_stack_header(
            "Current thread 0x1 (most recent call first):"
        ));
        assert!(!is_stack_header("Traceback (most recent call last):"));
    }
}
