//! A runner's stderr: every line to the host's log, tagged with the plugin
//! (at the level a Python `logging` record gave it, with the call's
//! request and trace ids when the runner tagged the line), and the last
//! lines kept for its crash report. The thread that reads it holds only
//! this: a process the plugin started may keep stderr open long after the
//! runner died, and must not keep the runner's connection alive with it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use crate::plugin_log::{
    Budget, LOG_BYTES_PER_SEC, LOG_RECORD_BYTES, Verdict, log_plugin_line, stderr_level,
};

use parking_lot::{Condvar, Mutex};

/// Lines of stderr kept for crash reports.
pub(crate) const STDERR_TAIL_LINES: usize = 20;
/// Longest stderr line kept whole (longer ones are split).
const MAX_LINE_BYTES: u64 = 4096;

/// Most lines a stack dump keeps ([`StderrLog::watch_stacks`]).
const MAX_STACK_LINES: usize = 400;

/// One runner's stderr, as its reading thread keeps it.
#[derive(Debug)]
pub(crate) struct StderrLog {
    plugin: String,
    pid: u32,
    tail: Mutex<VecDeque<String>>,
    done: Mutex<bool>,
    closed: Condvar,
    /// The lines written since [`Self::watch_stacks`], while watched.
    stacks: Mutex<Option<StackWatch>>,
}

/// The stack dump a runner was asked for, as its lines come.
#[derive(Debug)]
struct StackWatch {
    lines: Vec<String>,
    /// A thread's stack has begun.
    begun: bool,
    /// When the last line came.
    last: Instant,
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
                    // kill: kept whole, and logged at WARN, whatever level
                    // the plugin's lines have.
                    let level = match &mut *self.stacks.lock() {
                        Some(watch) => {
                            watch.begun |= super::stacks::is_stack_header(text);
                            watch.last = Instant::now();
                            if watch.lines.len() < MAX_STACK_LINES {
                                watch.lines.push(text.to_owned());
                            }
                            level.min(tracing::Level::WARN)
                        }
                        None => level,
                    };
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
                    let mut tail = self.tail.lock();
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(text.to_owned());
                }
            }
        }
        self.report_dropped(budget.take_dropped());
        *self.done.lock() = true;
        self.closed.notify_all();
    }

    /// Logs how much of its stderr was left out, if any.
    fn report_dropped(&self, dropped: Option<(u64, u64)>) {
        if let Some((lines, bytes)) = dropped {
            tracing::warn!(plugin = %self.plugin, pid = self.pid, lines, bytes, "Plugin {}: {lines} lines of its stderr were left out of the log ({bytes} bytes, counting {LOG_RECORD_BYTES} a record)", self.plugin);
        }
    }

    /// Keeps the lines written from now on, for [`Self::stacks`].
    pub(crate) fn watch_stacks(&self) {
        *self.stacks.lock() = Some(StackWatch {
            lines: Vec::new(),
            begun: false,
            last: Instant::now(),
        });
    }

    /// The lines written since [`Self::watch_stacks`] once the dump is
    /// over: a stack has begun and no line came for `quiet`, or stderr has
    /// ended. `None` while it may go on.
    pub(crate) fn stacks(&self, quiet: Duration) -> Option<Vec<String>> {
        let mut watch = self.stacks.lock();
        let over = watch
            .as_ref()
            .is_none_or(|w| w.begun && w.last.elapsed() >= quiet)
            || *self.done.lock();
        if over {
            return Some(watch.take().map(|w| w.lines).unwrap_or_default());
        }
        None
    }

    /// The lines written since [`Self::watch_stacks`], however far the dump
    /// got, and the watch ended.
    pub(crate) fn take_stacks(&self) -> Vec<String> {
        self.stacks
            .lock()
            .take()
            .map(|w| w.lines)
            .unwrap_or_default()
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
