//! A runner's stderr: every line to the host's log, tagged with the plugin
//! (at the level a Python `logging` record gave it, with the call's
//! request and trace ids when the runner tagged the line), and the last
//! lines kept for its crash report. The thread that reads it holds only
//! this: a process the plugin started may keep stderr open long after the
//! runner died, and must not keep the runner's connection alive with it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::plugin_log::{
    Budget, LOG_BYTES_PER_SEC, LOG_RECORD_BYTES, Verdict, log_plugin_line, stderr_level,
};

use parking_lot::{Condvar, Mutex};

/// Lines of stderr kept for crash reports.
pub(crate) const STDERR_TAIL_LINES: usize = 20;

/// Runners' stderr is kept out of crash reports ([`set_stderr_withheld`]).
static WITHHELD: AtomicBool = AtomicBool::new(false);

/// Keeps what runners write to stderr out of the crash reports of the
/// runners that end from now on (`serve --withhold-stderr`): a report's
/// stderr tail, and so the plugin's reason and failure journal, then say
/// only how many lines there were, and the host's log has them (at WARN,
/// as the runner ends). A plugin that prints its callers' data
/// would otherwise show it to every client of the routes that show
/// reasons.
pub fn set_stderr_withheld(withheld: bool) {
    WITHHELD.store(withheld, Ordering::Relaxed);
}

/// Whether runners' stderr is kept out of crash reports
/// ([`set_stderr_withheld`]).
pub fn stderr_withheld() -> bool {
    WITHHELD.load(Ordering::Relaxed)
}

/// What a crash report says of `lines` withheld stderr lines.
fn withheld_note(lines: usize) -> String {
    let lines = if lines == 1 {
        "1 line".to_owned()
    } else {
        format!("{lines} lines")
    };
    format!("{lines} withheld from the API (the server log has them)")
}
/// Longest stderr line kept whole (longer ones are split).
const MAX_LINE_BYTES: u64 = 4096;

/// Most lines a stack dump keeps ([`StderrLog::watch_stacks`]).
const MAX_STACK_LINES: usize = 2000;
/// How long the host waits for a runner's stacks before a timeout's kill.
pub(crate) const STACKS_WAIT: Duration = Duration::from_millis(300);
/// A stack dump is over when no line came for this long.
const STACKS_QUIET: Duration = Duration::from_millis(50);

/// One runner's stderr, as its reading thread keeps it.
#[derive(Debug)]
pub(crate) struct StderrLog {
    plugin: String,
    pid: u32,
    tail: Mutex<VecDeque<String>>,
    done: Mutex<bool>,
    closed: Condvar,
    /// The stack dump last asked for ([`Self::watch_stacks`]).
    stacks: Mutex<Option<StackWatch>>,
}

/// A stack dump the host asked a runner for, as its lines come.
#[derive(Debug)]
struct StackWatch {
    /// When it was asked for.
    asked: Instant,
    /// Its lines, from the header of its first stack on.
    lines: Vec<String>,
    /// When its last line came (once logged); `None` before its first
    /// header.
    last: Option<Instant>,
    /// It went on past the wait or the cap, or stderr ended in it: what
    /// was kept may be only part of it.
    cut: bool,
    /// More of stderr was read already, not yet handled, after its last
    /// line: the quiet does not count while the reader is behind.
    pending: bool,
}

impl StackWatch {
    /// Begun, and no line came for [`STACKS_QUIET`].
    fn quiet(&self) -> bool {
        !self.pending && self.last.is_some_and(|last| last.elapsed() >= STACKS_QUIET)
    }

    /// Nothing more is to be kept: quiet, cut, or asked for
    /// [`STACKS_WAIT`] ago.
    fn over(&self) -> bool {
        self.quiet() || self.cut || self.asked.elapsed() >= STACKS_WAIT
    }
}

/// What a line of stderr is to a stack dump being watched.
enum DumpLine {
    /// Not the dump's: the plugin's own.
    Plain,
    /// The dump's: kept, logged at WARN past the budget, not in the tail.
    Kept,
    /// The dump's, past the wait or the cap: not kept, logged within the
    /// budget, not in the tail either (it names the plugin's files).
    Overflow,
}

impl StderrLog {
    pub(crate) fn new(plugin: &str, pid: u32) -> StderrLog {
        StderrLog {
            plugin: plugin.to_owned(),
            pid,
            tail: Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)),
            done: Mutex::new(false),
            closed: Condvar::new(),
            stacks: Mutex::new(None),
        }
    }

    /// The stderr thread: every line to the log, tagged with the plugin,
    /// and the last [`STDERR_TAIL_LINES`] kept for crash reports.
    pub(crate) fn read(&self, stderr: impl Read) {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        let mut budget = Budget::new(Instant::now());
        // The tags and level of a line cut at MAX_LINE_BYTES: its pieces
        // after the first are logged with them (a long traceback stays one
        // record's level and call).
        let mut cut: Option<(forgesyte_protocol::wire::LogTags, tracing::Level)> = None;
        loop {
            line.clear();
            match reader
                .by_ref()
                .take(MAX_LINE_BYTES)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let whole = line.ends_with(b"\n");
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end();
                    let (tags, level, text) = match cut.take() {
                        Some((tags, level)) => (tags, level, text),
                        None => {
                            let (tags, text) = forgesyte_protocol::wire::LogTags::split(text);
                            let (level, text) = stderr_level(text);
                            (tags.unwrap_or_default(), level, text)
                        }
                    };
                    if !whole {
                        cut = Some((tags.clone(), level));
                    }
                    if text.is_empty() {
                        continue;
                    }
                    // A stack dump the host asked for, before a timeout's
                    // kill: kept for the host, logged at WARN past the
                    // budget (it is bounded, and rare), and left out of the
                    // tail (it names the plugin's files: other calls'
                    // crash reports, which clients read, carry the tail).
                    let dump = self.dump_line(text);
                    if let DumpLine::Kept = dump {
                        log_plugin_line(
                            Some(&self.plugin),
                            Some(self.pid),
                            &tags,
                            tracing::Level::WARN,
                            text,
                        );
                        // Its time once logged, and whether more was read
                        // already: a slow log sink, or this thread kept
                        // off the CPU with lines in hand, is not the dump's
                        // quiet.
                        self.dump_line_logged(!reader.buffer().is_empty());
                        continue;
                    }
                    // The line as written (its tags included, which the
                    // record logs too) and what each record adds.
                    match budget.admit(line.len() + LOG_RECORD_BYTES, Instant::now()) {
                        Verdict::Log(dropped) => {
                            self.report_dropped(dropped);
                            log_plugin_line(Some(&self.plugin), Some(self.pid), &tags, level, text);
                        }
                        Verdict::Drop(true) => {
                            tracing::warn!(plugin = %self.plugin, pid = self.pid, "Plugin {} writes to stderr faster than the log takes ({} KiB/s): its lines are left out of the log until it slows down", self.plugin, LOG_BYTES_PER_SEC / 1024.0);
                        }
                        Verdict::Drop(false) => {}
                    }
                    if let DumpLine::Overflow = dump {
                        continue;
                    }
                    let mut tail = self.tail.lock();
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(text.to_owned());
                }
            }
        }
        self.report_dropped(budget.take_dropped());
        if let Some(watch) = self.stacks.lock().as_mut()
            && watch.last.is_some()
            && !watch.quiet()
        {
            // Ended in the dump (the runner died in it).
            watch.cut = true;
        }
        *self.done.lock() = true;
        self.closed.notify_all();
    }

    /// Logs how much of its stderr was left out, if any.
    fn report_dropped(&self, dropped: Option<(u64, u64)>) {
        if let Some((lines, bytes)) = dropped {
            tracing::warn!(plugin = %self.plugin, pid = self.pid, lines, bytes, "Plugin {}: {lines} lines of its stderr were left out of the log ({bytes} bytes, counting {LOG_RECORD_BYTES} a record)", self.plugin);
        }
    }

    /// What `text` is to the stack dump being watched, kept if it is the
    /// dump's: from its first stack's header until no line came for
    /// [`STACKS_QUIET`]; past the wait or the cap, the dump is cut.
    fn dump_line(&self, text: &str) -> DumpLine {
        let mut watch = self.stacks.lock();
        let Some(watch) = watch.as_mut() else {
            return DumpLine::Plain;
        };
        if watch.quiet() {
            return DumpLine::Plain;
        }
        let late = watch.asked.elapsed() >= STACKS_WAIT;
        if watch.last.is_none() && (late || !super::stacks::is_stack_header(text)) {
            return DumpLine::Plain;
        }
        if watch.cut || late || watch.lines.len() >= MAX_STACK_LINES {
            watch.cut = true;
            watch.last = Some(Instant::now());
            return DumpLine::Overflow;
        }
        watch.lines.push(text.to_owned());
        DumpLine::Kept
    }

    /// Stamps the kept dump line just logged as the dump's last.
    fn dump_line_logged(&self, pending: bool) {
        if let Some(watch) = self.stacks.lock().as_mut() {
            watch.last = Some(Instant::now());
            watch.pending = pending;
        }
    }

    /// Watches for a stack dump: when it was asked for, and whether the
    /// caller is to ask (`false`: another caller asked less than
    /// [`STACKS_WAIT`] ago, and this one shares that dump).
    pub(crate) fn watch_stacks(&self) -> (Instant, bool) {
        let mut watch = self.stacks.lock();
        if let Some(recent) = watch.as_ref().filter(|w| w.asked.elapsed() < STACKS_WAIT) {
            return (recent.asked, false);
        }
        let asked = Instant::now();
        *watch = Some(StackWatch {
            asked,
            lines: Vec::new(),
            last: None,
            cut: false,
            pending: false,
        });
        (asked, true)
    }

    /// The dump once it is over, or stderr has ended: its lines, or
    /// `Some(None)` when it was cut (past the wait or the cap, or stderr
    /// ended in it). `None` while it may go on. Whether it was cut is
    /// decided as its lines come, not when this is asked.
    pub(crate) fn stacks(&self) -> Option<Option<Vec<String>>> {
        let watch = self.stacks.lock();
        let Some(watch) = watch.as_ref() else {
            return Some(Some(Vec::new()));
        };
        if !watch.over() && !*self.done.lock() {
            return None;
        }
        // Begun and not yet quiet when the wait ran out: more of it may be
        // on its way.
        let whole = !watch.cut && (watch.last.is_none() || watch.quiet());
        Some(whole.then(|| watch.lines.clone()))
    }

    /// `tail` (from [`Self::tail_after`]) as the runner's crash report
    /// shows it: as it is, or, while stderr is withheld
    /// ([`set_stderr_withheld`]), one line saying how many lines were
    /// withheld, the lines themselves logged here: at WARN, or at DEBUG for
    /// an `ordinary` end (a runner the host let go or stopped), which no
    /// one is to be alerted of. (Each line was also logged as it came, at
    /// its level, within the log's budget.)
    pub(crate) fn for_report(&self, tail: Vec<String>, ordinary: bool) -> Vec<String> {
        if tail.is_empty() || !stderr_withheld() {
            return tail;
        }
        let said = format!(
            "plugin process {} of {} ended; its last stderr lines, withheld from the API: {}",
            self.pid,
            self.plugin,
            tail.join(" | ")
        );
        // (A level is part of the macro: one line each.)
        if ordinary {
            tracing::debug!(plugin = %self.plugin, pid = self.pid, "{said}");
        } else {
            tracing::warn!(plugin = %self.plugin, pid = self.pid, "{said}");
        }
        vec![withheld_note(tail.len())]
    }

    /// The last lines, once stderr has ended or `grace` has passed (the
    /// last lines, the abort message or the allocation failure, arrive
    /// just as the process dies).
    pub(crate) fn tail_after(&self, grace: Duration) -> Vec<String> {
        let deadline = Instant::now() + grace;
        let mut done = self.done.lock();
        while !*done {
            if self.closed.wait_until(&mut done, deadline).timed_out() {
                break;
            }
        }
        drop(done);
        self.tail.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // (Not `for_report` itself: its switch is the process's, and the
    // other tests' crash reports read it. The API test
    // `withheld_stderr_reaches_the_log_and_no_answer` runs it.)
    #[test]
    fn a_withheld_tail_says_how_many_lines_the_log_has() {
        assert_eq!(
            withheld_note(1),
            "1 line withheld from the API (the server log has them)"
        );
        assert_eq!(
            withheld_note(20),
            "20 lines withheld from the API (the server log has them)"
        );
    }

    /// A dump is kept from its first header on, whatever the plugin wrote
    /// before it (a spamming plugin left no room for it), and stays out of
    /// the tail that crash reports carry (it names the plugin's files).
    #[test]
    fn a_stack_dump_is_kept_apart_from_the_tail() {
        use std::io::Write as _;
        let log = std::sync::Arc::new(StderrLog::new("p", 1));
        let (_, ask) = log.watch_stacks();
        assert!(ask);
        // A second caller a moment later shares the dump.
        assert!(!log.watch_stacks().1);
        let (reader, mut writer) = std::io::pipe().unwrap();
        let reading = {
            let log = std::sync::Arc::clone(&log);
            std::thread::spawn(move || log.read(reader))
        };
        let mut text = "spam\n".repeat(MAX_STACK_LINES + 10);
        text.push_str(
            "Current thread 0x1 (most recent call first):\n  File \"/p/plugin.py\", line 3 in t\n",
        );
        writer.write_all(text.as_bytes()).unwrap();
        // Over once quiet, stderr still open.
        let deadline = Instant::now() + Duration::from_secs(10);
        let dump = loop {
            if let Some(dump) = log.stacks() {
                break dump.expect("the dump is whole");
            }
            assert!(Instant::now() < deadline, "the dump never ended");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            dump,
            [
                "Current thread 0x1 (most recent call first):",
                "  File \"/p/plugin.py\", line 3 in t"
            ]
        );
        // A line after the quiet is the plugin's again.
        writer.write_all(b"after\n").unwrap();
        drop(writer);
        reading.join().unwrap();
        let tail = log.tail_after(Duration::ZERO);
        assert_eq!(tail.len(), STDERR_TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("after"));
        assert!(
            tail[..STDERR_TAIL_LINES - 1]
                .iter()
                .all(|line| line == "spam"),
            "{tail:?}"
        );
    }

    /// A dump stderr ended in (the runner died in it), or past the cap,
    /// was cut: it says nothing, and its lines stay out of the tail.
    #[test]
    fn a_dump_cut_short_is_no_dump() {
        let header = "Current thread 0x1 (most recent call first):\n";
        let log = StderrLog::new("p", 1);
        log.watch_stacks();
        log.read(header.as_bytes());
        assert_eq!(log.stacks(), Some(None));
        let log = StderrLog::new("p", 1);
        log.watch_stacks();
        let frames = "  File \"/p/plugin.py\", line 3 in t\n".repeat(MAX_STACK_LINES + 5);
        log.read(format!("{header}{frames}").as_bytes());
        assert_eq!(log.stacks(), Some(None));
        assert!(log.tail_after(Duration::ZERO).is_empty());
    }

    /// The quiet does not count while lines already read wait to be
    /// handled (the reader kept off the CPU in the middle of a dump).
    #[test]
    fn a_dump_with_lines_in_hand_is_not_quiet() {
        let long_ago = Instant::now()
            .checked_sub(STACKS_QUIET * 2)
            .unwrap_or_else(Instant::now);
        let mut watch = StackWatch {
            asked: long_ago,
            lines: vec!["Current thread 0x1 (most recent call first):".into()],
            last: Some(long_ago),
            cut: false,
            pending: true,
        };
        assert!(!watch.quiet());
        watch.pending = false;
        assert!(watch.quiet());
    }

    /// Unasked, a dump's lines are the plugin's like any others.
    #[test]
    fn without_a_watch_a_dump_is_plain_stderr() {
        let log = StderrLog::new("p", 1);
        log.read(&b"Current thread 0x1 (most recent call first):\n"[..]);
        assert_eq!(log.stacks(), Some(Some(Vec::new())));
        assert_eq!(log.tail_after(Duration::ZERO).len(), 1);
    }
}
