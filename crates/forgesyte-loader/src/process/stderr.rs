//! A runner's stderr: every line to the host's log, tagged with the plugin
//! (at the level a Python `logging` record gave it, with the call's
//! request and trace ids when the runner tagged the line), and the last
//! lines kept for its crash report. The thread that reads it holds only
//! this: a process the plugin started may keep stderr open long after the
//! runner died, and must not keep the runner's connection alive with it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Lines of stderr kept for crash reports.
pub(crate) const STDERR_TAIL_LINES: usize = 20;
/// Longest stderr line kept whole (longer ones are split).
const MAX_LINE_BYTES: u64 = 4096;

/// How fast a runner's stderr reaches the host's log, on average (bytes a
/// second), and the burst it may write at once: past them its lines are
/// still read (and kept for the crash report's tail) but not logged, and
/// the log says how many were left out. Without a bound a plugin writing
/// 200 MB to stderr wrote 200 MB into the server's log.
const LOG_BYTES_PER_SEC: f64 = 64.0 * 1024.0;
const LOG_BURST_BYTES: f64 = 1024.0 * 1024.0;
/// What one log record costs besides its line (time, target, plugin, pid):
/// a plugin writing one-byte lines must not get a million records a
/// second out of the budget.
const LOG_RECORD_BYTES: usize = 128;

/// While a runner's lines are being left out, how often the log says how
/// many (and once more when its stderr slows down or ends).
const DROPPED_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The stderr log budget of one runner (a token bucket of bytes).
#[derive(Debug)]
struct Budget {
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
enum Verdict {
    /// Log it; say first how many lines were left out, when that is due.
    Log(Option<(u64, u64)>),
    /// Leave it out; `true` for the first line left out in a while (the log
    /// says that lines are being left out).
    Drop(bool),
}

impl Budget {
    fn new(now: Instant) -> Budget {
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
    fn admit(&mut self, bytes: usize, now: Instant) -> Verdict {
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
    fn take_dropped(&mut self) -> Option<(u64, u64)> {
        let dropped = std::mem::take(&mut self.dropped);
        (dropped.0 > 0).then_some(dropped)
    }
}

/// One runner's stderr, as its reading thread keeps it.
#[derive(Debug)]
pub(crate) struct StderrLog {
    plugin: String,
    pid: u32,
    tail: Mutex<VecDeque<String>>,
    done: Mutex<bool>,
    closed: Condvar,
}

impl StderrLog {
    pub(crate) fn new(plugin: &str, pid: u32) -> StderrLog {
        StderrLog {
            plugin: plugin.to_owned(),
            pid,
            tail: Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)),
            done: Mutex::new(false),
            closed: Condvar::new(),
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
                    // The line as written (its tags included, which the
                    // record logs too) and what each record adds.
                    match budget.admit(line.len() + LOG_RECORD_BYTES, Instant::now()) {
                        Verdict::Log(dropped) => {
                            self.report_dropped(dropped);
                            log_stderr_line(&self.plugin, self.pid, &tags, level, text);
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

/// The level a runner gave a line: the Python runner writes each `logging`
/// record as `LEVEL logger: message`; any other line is `INFO`.
fn stderr_level(text: &str) -> (tracing::Level, &str) {
    let levels = [
        ("CRITICAL ", tracing::Level::ERROR),
        ("ERROR ", tracing::Level::ERROR),
        ("WARNING ", tracing::Level::WARN),
        ("INFO ", tracing::Level::INFO),
        ("DEBUG ", tracing::Level::DEBUG),
    ];
    levels
        .iter()
        .find_map(|(prefix, level)| text.strip_prefix(prefix).map(|rest| (*level, rest)))
        .unwrap_or((tracing::Level::INFO, text))
}

/// Logs one stderr line of a plugin's runner, tagged with the plugin, at
/// the level the line carries, with the `request_id` and `trace_id` of the
/// call it was made in when the runner tagged it (`tags`, taken off the
/// line, `PROTOCOL.md` §8; the runner's word: a plugin could write such a
/// tag itself).
fn log_stderr_line(
    plugin: &str,
    pid: u32,
    tags: &forgesyte_protocol::wire::LogTags,
    level: tracing::Level,
    line: &str,
) {
    const TARGET: &str = "forgesyte_loader::plugin_stderr";
    let request_id = tags.request_id.as_deref();
    let trace_id = tags.trace_id.as_deref();
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

#[cfg(test)]
mod tests {
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
    }
}
