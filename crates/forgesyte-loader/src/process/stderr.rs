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
        loop {
            line.clear();
            match reader
                .by_ref()
                .take(MAX_LINE_BYTES)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end();
                    if text.is_empty() {
                        continue;
                    }
                    let (tags, text) = forgesyte_protocol::wire::LogTags::split(text);
                    if text.is_empty() {
                        continue;
                    }
                    log_stderr_line(&self.plugin, self.pid, tags, text);
                    let mut tail = self.tail.lock();
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(text.to_owned());
                }
            }
        }
        *self.done.lock() = true;
        self.closed.notify_all();
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
    tags: Option<forgesyte_protocol::wire::LogTags>,
    text: &str,
) {
    const TARGET: &str = "forgesyte_loader::plugin_stderr";
    let tags = tags.unwrap_or_default();
    let request_id = tags.request_id.as_deref();
    let trace_id = tags.trace_id.as_deref();
    match stderr_level(text) {
        (tracing::Level::ERROR, line) => {
            tracing::error!(target: TARGET, plugin, pid, request_id, trace_id, "{line}")
        }
        (tracing::Level::WARN, line) => {
            tracing::warn!(target: TARGET, plugin, pid, request_id, trace_id, "{line}")
        }
        (tracing::Level::DEBUG, line) => {
            tracing::debug!(target: TARGET, plugin, pid, request_id, trace_id, "{line}")
        }
        (_, line) => tracing::info!(target: TARGET, plugin, pid, request_id, trace_id, "{line}"),
    }
}

#[cfg(test)]
mod tests {
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
