//! A plugin's log lines, wherever they come from: a runner's stderr
//! (`process::stderr` reads it) or, in process, the SDK's `log()`. Both go
//! to the host's log the same way (`log_plugin_line`: target
//! `forgesyte_loader::plugin_stderr`, the plugin's name, the call's
//! `request_id` and `trace_id`, the line's level), within the same budget
//! (`Budget`: 64 KiB/s with 1 MiB bursts per runner or library) and cut
//! at `MAX_LINE_BYTES`.
//!
//! In process, a library built with the SDK is handed the host's
//! `LogLineFn` and a context of its own (`LibraryLog`, through
//! `abi::LOG_SINK_SYMBOL`) when it is opened; a line names the plugin this
//! thread runs (a call or a construction, `as_plugin`), else the plugin
//! the library was constructed for (a thread the plugin started, its
//! `Drop`). Only a host opts in ([`route_in_process_logs`]): a runner
//! process keeps writing to stderr, its host's channel.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forgesyte_protocol::abi::LogLineFn;
use forgesyte_protocol::wire::LogTags;
use parking_lot::Mutex;

/// Longest plugin log line logged whole (a longer one is cut into pieces
/// of this size, each its own record).
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// How fast a runner's stderr reaches the host's log, on average (bytes a
/// second), and the burst it may write at once: past them its lines are
/// still read (and kept for the crash report's tail) but not logged, and
/// the log says how many were left out. Without a bound a plugin writing
/// 200 MB to stderr wrote 200 MB into the server's log.
pub(crate) const LOG_BYTES_PER_SEC: f64 = 64.0 * 1024.0;
const LOG_BURST_BYTES: f64 = 1024.0 * 1024.0;
/// What one log record costs besides its line (time, target, plugin, pid):
/// a plugin writing one-byte lines must not get a million records a
/// second out of the budget.
pub(crate) const LOG_RECORD_BYTES: usize = 128;

/// While a runner's lines are being left out, how often the log says how
/// many (and once more when its stderr slows down or ends).
const DROPPED_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The log budget of one runner's stderr or one in-process library's
/// `log` lines (a token bucket of bytes).
#[derive(Debug)]
pub(crate) struct Budget {
    tokens: f64,
    at: Instant,
    /// Lines and bytes left out since the last report of them.
    dropped: (u64, u64),
    /// Since when lines are being left out (until the bucket is full
    /// again), and when that was last reported.
    dropping: Option<Instant>,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Log it; say first how many lines were left out, when that is due.
    Log(Option<(u64, u64)>),
    /// Leave it out; `true` for the first line left out in a while (the log
    /// says that lines are being left out).
    Drop(bool),
}

impl Budget {
    pub(crate) fn new(now: Instant) -> Budget {
        Budget {
            tokens: LOG_BURST_BYTES,
            at: now,
            dropped: (0, 0),
            dropping: None,
        }
    }

    /// What to do with a line of `bytes` at `now`. Leaving lines out starts
    /// with one notice and ends when the bucket has filled again (the
    /// plugin slowed down); between, what was left out is reported at most
    /// every [`DROPPED_REPORT_EVERY`]: a plugin writing just above the rate
    /// got two warnings for every line of its own that passed.
    pub(crate) fn admit(&mut self, bytes: usize, now: Instant) -> Verdict {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * LOG_BYTES_PER_SEC;
        self.tokens = (self.tokens + earned).min(LOG_BURST_BYTES);
        self.at = now;
        #[allow(clippy::cast_precision_loss)] // a line is at most 4 KiB
        let cost = bytes as f64;
        if self.tokens < cost {
            self.dropped.0 += 1;
            self.dropped.1 += bytes as u64;
            let first = self.dropping.is_none();
            if first {
                self.dropping = Some(now);
            }
            return Verdict::Drop(first);
        }
        let ended = self.dropping.is_some() && self.tokens >= LOG_BURST_BYTES;
        self.tokens -= cost;
        let due = self
            .dropping
            .is_some_and(|since| now.saturating_duration_since(since) >= DROPPED_REPORT_EVERY);
        if ended {
            self.dropping = None;
        } else if due {
            self.dropping = Some(now);
        }
        Verdict::Log(if ended || due {
            self.take_dropped()
        } else {
            None
        })
    }

    /// The lines and bytes left out since the last report, if any.
    pub(crate) fn take_dropped(&mut self) -> Option<(u64, u64)> {
        let dropped = std::mem::take(&mut self.dropped);
        (dropped.0 > 0).then_some(dropped)
    }
}

/// The level a runner gave a line: the Python runner writes each `logging`
/// record as `LEVEL logger: message`; a plugin that replaced the runner's
/// handler (`logging.basicConfig(force=True)`) writes them as
/// `LEVEL:logger:message`, the standard library's default format, whose
/// errors were logged at INFO; a plugin that prints `ERROR: message` loses
/// the space after the colon too. Any other line is `INFO`.
pub(crate) fn stderr_level(text: &str) -> (tracing::Level, &str) {
    let levels = [
        ("CRITICAL", tracing::Level::ERROR),
        ("ERROR", tracing::Level::ERROR),
        ("WARNING", tracing::Level::WARN),
        ("INFO", tracing::Level::INFO),
        ("DEBUG", tracing::Level::DEBUG),
    ];
    levels
        .iter()
        .find_map(|(name, level)| {
            let rest = text.strip_prefix(name)?;
            rest.strip_prefix(' ')
                .or_else(|| {
                    rest.strip_prefix(':')
                        .map(|rest| rest.strip_prefix(' ').unwrap_or(rest))
                })
                .map(|rest| (*level, rest))
        })
        .unwrap_or((tracing::Level::INFO, text))
}

/// The target of plugins' own lines in the server's log.
const TARGET: &str = "forgesyte_loader::plugin_stderr";

/// Whether the server's log takes plugins' DEBUG lines (`RUST_LOG=debug`,
/// or `forgesyte_loader::plugin_stderr=debug`): a Python runner started
/// then writes its `logging` records from DEBUG up, not from INFO.
pub(crate) fn debug_lines_logged() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// Logs one line of a plugin (a runner's stderr line, or an in-process
/// plugin's `log` line), tagged with the plugin and its runner's `pid`
/// when known, at the level the line carries, with the `request_id` and
/// `trace_id` of the call it was made in when the line was tagged (`tags`,
/// taken off the line, `PROTOCOL.md` §8; the plugin's word: a plugin could
/// write such a tag itself).
pub(crate) fn log_plugin_line(
    plugin: Option<&str>,
    pid: Option<u32>,
    tags: &forgesyte_protocol::wire::LogTags,
    level: tracing::Level,
    line: &str,
) {
    let request_id = tags.request_id.as_deref();
    let trace_id = tags.trace_id.as_deref();
    let line = &*not_a_host_marker(line);
    match level {
        tracing::Level::ERROR => {
            tracing::error!(target: TARGET, plugin, pid, request_id, trace_id, "{line}")
        }
        tracing::Level::WARN => {
            tracing::warn!(target: TARGET, plugin, pid, request_id, trace_id, "{line}")
        }
        tracing::Level::DEBUG => {
            tracing::debug!(target: TARGET, plugin, pid, request_id, trace_id, "{line}")
        }
        _ => tracing::info!(target: TARGET, plugin, pid, request_id, trace_id, "{line}"),
    }
}

/// The host's own markers, which begin the lines operators and alerts look
/// for (`✓ Loaded plugin: …`, `✗ Plugin FAILED: …`, `⊘ Plugin UNAVAILABLE:
/// …`, the Python original's).
const HOST_MARKERS: [char; 3] = ['✓', '✗', '⊘'];

/// `line`, marked as the plugin's when it begins with one of the host's
/// markers: a plugin printing `✗ Plugin FAILED: other` read as the host's
/// word on another plugin to whoever looked for the marker.
fn not_a_host_marker(line: &str) -> std::borrow::Cow<'_, str> {
    if line.trim_start().starts_with(HOST_MARKERS) {
        std::borrow::Cow::Owned(format!("(the plugin's output) {line}"))
    } else {
        std::borrow::Cow::Borrowed(line)
    }
}

/// Whether libraries opened from now on are handed the host's log.
static ROUTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The plugin this thread runs (empty: none).
    static PLUGIN: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Has every in-process library opened from now on write its SDK log lines
/// to the host's log (the server calls it at start).
pub fn route_in_process_logs() {
    ROUTED.store(true, Ordering::Relaxed);
}

/// Whether libraries opened now are handed the host's log.
pub(crate) fn routed() -> bool {
    ROUTED.load(Ordering::Relaxed)
}

/// The log of one opened in-process library: the plugin it was
/// constructed for, and its budget. Made once per opened library and never
/// freed, as the library is never unmapped (`RTLD_NODELETE`): its threads
/// may log at any time.
#[derive(Debug)]
pub(crate) struct LibraryLog {
    plugin: Mutex<String>,
    budget: Mutex<Budget>,
}

impl LibraryLog {
    /// The host's log function and a new library's context for it (never
    /// freed), for a library that takes them.
    pub(crate) fn for_new_library() -> (LogLineFn, &'static LibraryLog) {
        let log: &'static LibraryLog = Box::leak(Box::new(LibraryLog {
            plugin: Mutex::new(String::new()),
            budget: Mutex::new(Budget::new(Instant::now())),
        }));
        (host_log_line as LogLineFn, log)
    }

    /// The context pointer the library is handed.
    pub(crate) fn as_context(&'static self) -> *const c_void {
        std::ptr::from_ref(self).cast()
    }

    /// Names the plugin the library is constructed for (the last one, when
    /// one library file serves several).
    pub(crate) fn constructed_for(&self, plugin: &str) {
        let mut name = self.plugin.lock();
        name.clear();
        name.push_str(plugin);
    }

    /// Logs `text` (a line the library wrote, perhaps tagged) within the
    /// library's budget, for the plugin this thread runs, else the one the
    /// library was constructed for.
    fn log(&self, text: &str) {
        let plugin = PLUGIN
            .try_with(|p| p.borrow().clone())
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| self.plugin.lock().clone());
        let plugin = (!plugin.is_empty()).then_some(plugin.as_str());
        let (tags, line) = LogTags::split(text);
        let (level, line) = stderr_level(line);
        let tags = tags.unwrap_or_default();
        // Each piece is a record, charged as the stderr reader charges one
        // (a line longer than the burst still has its first pieces logged).
        for piece in pieces(line) {
            let verdict = self
                .budget
                .lock()
                .admit(piece.len() + LOG_RECORD_BYTES, Instant::now());
            match verdict {
                Verdict::Log(dropped) => {
                    if let Some((lines, bytes)) = dropped {
                        tracing::warn!(
                            plugin,
                            lines,
                            bytes,
                            "Plugin {}: {lines} of its log records were left out of the log (pieces of at most 4 KiB of its lines; {bytes} bytes, counting {LOG_RECORD_BYTES} a record)",
                            plugin.unwrap_or("?")
                        );
                    }
                    log_plugin_line(plugin, None, &tags, level, piece);
                }
                Verdict::Drop(true) => {
                    tracing::warn!(
                        plugin,
                        "Plugin {} logs faster than the log takes ({} KiB/s): its lines are left out of the log until it slows down",
                        plugin.unwrap_or("?"),
                        LOG_BYTES_PER_SEC / 1024.0
                    );
                }
                Verdict::Drop(false) => {}
            }
        }
    }
}

/// `line` in pieces of at most [`MAX_LINE_BYTES`] (at character
/// boundaries); none for an empty line.
fn pieces(line: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let mut end = rest.len().min(MAX_LINE_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        pieces.push(&rest[..end]);
        rest = &rest[end..];
    }
    pieces
}

/// Runs `f` as plugin `name` on this thread: its log lines name it.
pub(crate) fn as_plugin<R>(name: &str, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = PLUGIN.try_with(|p| p.borrow_mut().clear());
        }
    }
    let _ = PLUGIN.try_with(|p| {
        let mut p = p.borrow_mut();
        p.clear();
        p.push_str(name);
    });
    let _reset = Reset;
    f()
}

/// One log line of an in-process plugin (see the module documentation):
/// the FFI boundary a plugin calls, as `abi::LogLineFn`.
///
/// # Safety
///
/// `context` is a [`LibraryLog::as_context`] pointer (or null); `line` is
/// null, or valid for reads of `len` bytes.
#[allow(unsafe_code)]
unsafe extern "C" fn host_log_line(context: *const c_void, line: *const u8, len: usize) {
    if context.is_null() || line.is_null() || len > isize::MAX as usize {
        return;
    }
    // SAFETY: the host handed this library `context`, a `&'static
    // LibraryLog` never freed (`for_new_library`); the SDK hands it back
    // unchanged.
    let log = unsafe { &*context.cast::<LibraryLog>() };
    // SAFETY: the plugin's contract (`abi::LogLineFn`): `len` readable
    // bytes at `line`, not null and within `isize::MAX` (checked above),
    // live for this call.
    let bytes = unsafe { std::slice::from_raw_parts(line, len) };
    // No unwinding into the plugin's frames.
    // (A panic leaves nothing half-done: the locks are parking_lot's.)
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        log.log(&String::from_utf8_lossy(bytes));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_line_never_begins_with_a_host_marker() {
        assert_eq!(
            not_a_host_marker("✗ Plugin FAILED: good"),
            "(the plugin's output) ✗ Plugin FAILED: good"
        );
        assert_eq!(
            not_a_host_marker("  ✓ Loaded plugin: x (1)"),
            "(the plugin's output)   ✓ Loaded plugin: x (1)"
        );
        assert!(matches!(
            not_a_host_marker("model loaded ✓"),
            std::borrow::Cow::Borrowed("model loaded ✓")
        ));
    }

    #[test]
    fn the_plugin_is_named_while_it_runs_and_only_then() {
        let current = || PLUGIN.with(|p| p.borrow().clone());
        assert_eq!(current(), "");
        let inside = as_plugin("ocr", current);
        assert_eq!(inside, "ocr");
        assert_eq!(current(), "");
        // Reset on unwind too.
        let _ = std::panic::catch_unwind(|| as_plugin("boom", || panic!("x")));
        assert_eq!(current(), "");
    }

    #[test]
    fn a_long_line_is_cut_at_character_boundaries() {
        assert!(pieces("").is_empty());
        assert_eq!(pieces("short"), ["short"]);
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = pieces(&long);
        assert_eq!(cut.len(), 2);
        assert!(cut.iter().all(|p| p.len() <= MAX_LINE_BYTES));
        assert_eq!(cut.concat(), long);
    }
    #[test]
    fn stderr_reaches_the_log_within_its_budget_and_what_is_left_out_is_counted() {
        use super::{Budget, DROPPED_REPORT_EVERY, LOG_BURST_BYTES, LOG_BYTES_PER_SEC, Verdict};
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let mut budget = Budget::new(start);
        // The burst passes whole, then nothing more at the same instant:
        // one notice, at the first line left out.
        let line = 4096;
        let burst = (LOG_BURST_BYTES as usize) / line;
        assert!((0..burst).all(|_| budget.admit(line, start) == Verdict::Log(None)));
        assert_eq!(budget.admit(line, start), Verdict::Drop(true));
        assert_eq!(budget.admit(10, start), Verdict::Drop(false));
        // A second later, a second's worth passes again, with no report:
        // still writing faster than the log takes, lines alternate between
        // passing and left out without a warning for each.
        let later = start + Duration::from_secs(1);
        let per_second = (LOG_BYTES_PER_SEC as usize) / line;
        assert!((0..per_second).all(|_| budget.admit(line, later) == Verdict::Log(None)));
        assert_eq!(budget.admit(line, later), Verdict::Drop(false));
        // The count comes every DROPPED_REPORT_EVERY while it goes on...
        let report = start + DROPPED_REPORT_EVERY;
        assert_eq!(budget.admit(line, report), Verdict::Log(Some((3, 8202))));
        assert_eq!(budget.admit(10, report), Verdict::Log(None));
        // ... and once the plugin slowed down (the bucket full again),
        // leaving lines out starts with a notice again.
        let much_later = report + Duration::from_secs(3600);
        assert_eq!(budget.admit(line, much_later), Verdict::Log(None));
        assert!((1..burst).all(|_| budget.admit(line, much_later) == Verdict::Log(None)));
        assert_eq!(budget.admit(line, much_later), Verdict::Drop(true));
        assert_eq!(budget.take_dropped(), Some((1, 4096)));
    }

    #[test]
    fn python_logging_lines_keep_their_level() {
        use super::stderr_level;
        use tracing::Level;
        assert_eq!(
            stderr_level("WARNING ocr: low confidence"),
            (Level::WARN, "ocr: low confidence")
        );
        assert_eq!(stderr_level("CRITICAL x: y"), (Level::ERROR, "x: y"));
        assert_eq!(stderr_level("DEBUG x: y"), (Level::DEBUG, "x: y"));
        assert_eq!(
            stderr_level("thread 'main' panicked"),
            (Level::INFO, "thread 'main' panicked")
        );
        assert_eq!(stderr_level("WARNINGS"), (Level::INFO, "WARNINGS"));
        // The standard library's default format, under a handler of the
        // plugin's own.
        assert_eq!(
            stderr_level("ERROR:ocr.model:no weights"),
            (Level::ERROR, "ocr.model:no weights")
        );
        assert_eq!(
            stderr_level("WARNING:root:slow"),
            (Level::WARN, "root:slow")
        );
        assert_eq!(stderr_level("ERRORS: 3"), (Level::INFO, "ERRORS: 3"));
        // A plugin's own `print("ERROR: ...", file=sys.stderr)`.
        assert_eq!(
            stderr_level("ERROR: printed by hand"),
            (Level::ERROR, "printed by hand")
        );
    }
}
