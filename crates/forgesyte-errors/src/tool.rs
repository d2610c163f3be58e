//! Errors of a single tool call, as the host sees them.

use std::time::Duration;

use crate::{CrashError, fmt_duration};

/// A tool call did not produce a result.
///
/// The variants split into the two classes of SPEC §4: an error the tool
/// *returned* (bad input: [`ToolError::Failed`], [`ToolError::InvalidArgs`])
/// leaves the plugin's state alone, while a *fault*
/// ([`ToolError::Panicked`], [`ToolError::Protocol`], and for a plugin in
/// its own process [`ToolError::Crashed`] and [`ToolError::TimedOut`])
/// marks it FAILED. Use
/// [`ToolError::is_fault`] rather than matching.
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
    #[error("invalid arguments: {message}")]
    InvalidArgs {
        /// What is wrong with them.
        message: String,
    },
    /// The tool ran and returned an error.
    #[error("{message}")]
    Failed {
        /// The plugin's own error class, if it gave one.
        error_type: Option<String>,
        /// The plugin's own message.
        message: String,
    },
    /// The tool panicked (caught at the ABI boundary).
    #[error("tool panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The plugin answered with something the host cannot understand.
    #[error("invalid answer from plugin: {detail}")]
    Protocol {
        /// What is wrong.
        detail: String,
    },
    /// The plugin's process died (or was killed) while the call was in
    /// flight.
    #[error("{0}")]
    Crashed(CrashError),
    /// The call ran past its time limit and the plugin's process was killed.
    #[error("timed out after {} (the plugin process was killed)", fmt_duration(*after))]
    TimedOut {
        /// The limit that was exceeded.
        after: Duration,
    },
}

impl ToolError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        match self {
            ToolError::UnknownTool { .. } => "UnknownTool",
            ToolError::InvalidArgs { .. } => "InvalidArgs",
            ToolError::Failed { .. } => "ToolError",
            ToolError::Panicked { .. } => "ToolPanic",
            ToolError::Protocol { .. } => "ProtocolError",
            ToolError::Crashed(_) => "CrashError",
            ToolError::TimedOut { .. } => "TimeoutError",
        }
    }

    /// Whether this is a fault (the plugin is broken) rather than an error
    /// the tool returned on purpose.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            ToolError::Panicked { .. }
                | ToolError::Protocol { .. }
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
                message: "bad input".into()
            }
            .is_fault()
        );
        assert_eq!(
            ToolError::Failed {
                error_type: None,
                message: "bad input".into()
            }
            .kind(),
            "ToolError"
        );
    }
}
