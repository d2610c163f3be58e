//! Errors of a single tool call, as the host sees them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{CrashError, fmt_duration};

/// A [`serde_json::Error`] that can be cloned and compared, so that
/// [`ToolError`] stays `Clone + Eq` while keeping the parser's error as a
/// typed [`source`](std::error::Error::source).
///
/// Clones share one error. Two `JsonError`s are equal when they say the
/// same thing: same [`category`](serde_json::Error::classify), line, column
/// and message.
#[derive(Debug, Clone)]
pub struct JsonError(Arc<serde_json::Error>);

impl JsonError {
    /// The parser's error.
    pub fn get(&self) -> &serde_json::Error {
        &self.0
    }
}

impl From<serde_json::Error> for JsonError {
    fn from(e: serde_json::Error) -> Self {
        JsonError(Arc::new(e))
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for JsonError {
    /// The wrapped [`serde_json::Error`] (downcast it to read line, column
    /// and category).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl PartialEq for JsonError {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.get(), other.get());
        a.classify() == b.classify()
            && a.line() == b.line()
            && a.column() == b.column()
            && a.to_string() == b.to_string()
    }
}

impl Eq for JsonError {}

/// A tool call did not produce a result.
///
/// The variants split into the two classes of SPEC §4: an error the tool
/// *returned* (bad input: [`ToolError::Failed`], [`ToolError::InvalidArgs`])
/// leaves the plugin's state alone, while a *fault*
/// ([`ToolError::Panicked`], [`ToolError::Protocol`],
/// [`ToolError::InvalidJson`], and for a plugin in
/// its own process [`ToolError::Crashed`] and [`ToolError::TimedOut`])
/// marks it FAILED. [`ToolError::QueueTimedOut`] and [`ToolError::Stopped`]
/// are neither: the call never reached the plugin, or the host itself
/// ended its process. Use [`ToolError::is_fault`] rather than
/// matching.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ToolError {
    /// The plugin has no tool of that name.
    #[error("plugin '{plugin}' has no tool '{tool}'")]
    UnknownTool {
        /// The plugin.
        plugin: String,
        /// The requested tool.
        tool: String,
    },
    /// The arguments were rejected before or by the tool as malformed.
    ///
    /// Text: the tool's own words, or the host's argument check.
    #[error("invalid arguments: {message}")]
    InvalidArgs {
        /// What is wrong with them.
        message: String,
    },
    /// The tool ran and returned an error.
    ///
    /// Text: the plugin's message crossed the C ABI or the runner's pipe,
    /// or the host's finding about a result the tool returned
    /// (`ResultTooDeep`).
    #[error("{message}")]
    Failed {
        /// The plugin's own error class, if it gave one.
        error_type: Option<String>,
        /// The plugin's own message.
        message: String,
        /// The last lines of its traceback, for people (a Python plugin's
        /// exception); empty otherwise.
        traceback: Vec<String>,
    },
    /// The tool panicked (caught at the ABI boundary).
    ///
    /// Text: the panic payload as the plugin's side rendered it.
    #[error("tool panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The plugin answered with something the host cannot understand.
    ///
    /// The host's own finding, as text (it is also what an isolated
    /// plugin's protocol errors arrive as). When the cause is a JSON parse
    /// error in this process, [`ToolError::InvalidJson`] keeps it typed and
    /// reads the same.
    #[error("invalid answer from plugin: {detail}")]
    Protocol {
        /// What is wrong.
        detail: String,
    },
    /// The plugin answered with bytes that are not the JSON the host
    /// expects (e.g. a tool's result). A fault, of kind `ProtocolError`, that
    /// reads exactly as [`ToolError::Protocol`] with
    /// `"{what} is not valid JSON: {source}"` as its detail; the
    /// [`JsonError`] (and through it the [`serde_json::Error`]) is the
    /// [`source`](std::error::Error::source).
    #[error("invalid answer from plugin: {what} is not valid JSON: {source}")]
    InvalidJson {
        /// What was being read (`"result"`).
        what: String,
        /// The parser's error.
        #[source]
        source: JsonError,
    },
    /// The plugin's process died (or was killed) while the call was in
    /// flight (one the host let go that exited with 0, or that the host
    /// killed, is [`ToolError::Stopped`]). The [`CrashError`] is the
    /// [`source`](std::error::Error::source).
    #[error("{0}")]
    Crashed(#[source] CrashError),
    /// The call ran past its time limit and the plugin's process was killed.
    #[error("timed out after {} (the plugin process was killed)", fmt_duration(*after))]
    TimedOut {
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The call waited its whole time limit for its turn behind the
    /// plugin's calls in progress (its runner takes one call at a time) and
    /// was never sent. Not a fault: the plugin never saw this call, so its
    /// process is left alone (the call it waited for has a deadline of its
    /// own).
    #[error(
        "timed out after {} waiting for the plugin's call in progress (it takes one call at a time); the call never reached the plugin",
        fmt_duration(*after)
    )]
    QueueTimedOut {
        /// The limit that was exceeded, waiting.
        after: Duration,
    },
    /// The host stopped the plugin's process while the call was in flight,
    /// or the call never reached the plugin (a reload or rescan let that
    /// instance go, the host was ending its process, or the server
    /// stopped): not a fault of the plugin; the call's result is lost, and
    /// one that never `reached` the plugin can be sent again as it is.
    #[error("{}", stopped_message(reason, *reached))]
    Stopped {
        /// How the process ended, or why the call never reached it.
        reason: String,
        /// Whether the call reached the plugin (`false`: no plugin code
        /// ran for it).
        reached: bool,
    },
    /// The plugin answered, but the host could not take the answer for want
    /// of its own resources (out of file descriptors: the kernel dropped
    /// the shared attachments the runner sent). Not a fault of the plugin,
    /// whose process serves on; the call's result is lost.
    #[error("the host could not take the plugin's answer: {detail}")]
    HostResources {
        /// What was short.
        detail: String,
    },
    /// The plugin's runner could not start a thread for the call (its
    /// process out of threads: a cgroup's `pids.max`, its memory limit):
    /// no plugin code ran for it. Not the plugin's error, and not
    /// counted; sent again later, it may run.
    #[error("the plugin's runner could not start a thread for the call: {detail}")]
    RunnerOverloaded {
        /// What the runner said.
        detail: String,
    },
}

/// [`ToolError::Stopped`]'s message.
fn stopped_message(reason: &str, reached: bool) -> String {
    if reached {
        format!("the host stopped the plugin's process while the call ran: {reason}")
    } else {
        format!("the call never reached the plugin: {reason}")
    }
}

impl ToolError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        match self {
            ToolError::UnknownTool { .. } => "UnknownTool",
            ToolError::InvalidArgs { .. } => "InvalidArgs",
            ToolError::Failed { .. } => "ToolError",
            ToolError::Panicked { .. } => "ToolPanic",
            ToolError::Protocol { .. } | ToolError::InvalidJson { .. } => "ProtocolError",
            ToolError::Crashed(_) => "CrashError",
            ToolError::TimedOut { .. } => "TimeoutError",
            ToolError::QueueTimedOut { .. } => "QueueTimeout",
            ToolError::Stopped { .. } => "PluginStopped",
            ToolError::HostResources { .. } | ToolError::RunnerOverloaded { .. } => "ServerBusy",
        }
    }

    /// Whether this is a fault (the plugin is broken) rather than an error
    /// the tool returned on purpose.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            ToolError::Panicked { .. }
                | ToolError::Protocol { .. }
                | ToolError::InvalidJson { .. }
                | ToolError::Crashed(_)
                | ToolError::TimedOut { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_told_apart_from_errors() {
        assert!(
            ToolError::Panicked {
                message: "x".into()
            }
            .is_fault()
        );
        assert!(
            !ToolError::Failed {
                error_type: None,
                message: "bad input".into(),
                traceback: Vec::new(),
            }
            .is_fault()
        );
        assert_eq!(
            ToolError::Failed {
                error_type: None,
                message: "bad input".into(),
                traceback: Vec::new(),
            }
            .kind(),
            "ToolError"
        );
    }

    #[test]
    fn a_call_that_timed_out_in_the_queue_is_no_fault() {
        let e = ToolError::QueueTimedOut {
            after: Duration::from_secs(2),
        };
        assert!(!e.is_fault());
        assert_eq!(e.kind(), "QueueTimeout");
        assert_eq!(
            e.to_string(),
            "timed out after 2 s waiting for the plugin's call in progress (it takes one call at a time); the call never reached the plugin"
        );
    }

    #[test]
    fn a_stopped_call_says_whether_it_reached_the_plugin() {
        let stopped = |reached| ToolError::Stopped {
            reason: "its runner was let go by the host".into(),
            reached,
        };
        assert!(!stopped(true).is_fault() && !stopped(false).is_fault());
        assert_eq!(
            stopped(true).to_string(),
            "the host stopped the plugin's process while the call ran: its runner was let go by the host"
        );
        assert_eq!(
            stopped(false).to_string(),
            "the call never reached the plugin: its runner was let go by the host"
        );
    }

    #[test]
    fn an_answer_the_host_could_not_take_is_no_fault() {
        let e = ToolError::HostResources {
            detail: "out of file descriptors".into(),
        };
        assert!(!e.is_fault());
        assert_eq!(e.kind(), "ServerBusy");
    }
}
