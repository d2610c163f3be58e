//! The registry's one error enum.

use crate::PluginLifecycleState;

/// Why a registry operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No plugin of that name is registered.
    #[error("plugin '{name}' not found")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// A plugin of that name is already registered; the first one is kept.
    #[error("plugin '{name}' is already registered")]
    AlreadyRegistered {
        /// The duplicate name.
        name: String,
    },
    /// The lifecycle does not allow this move (SPEC §4).
    #[error("illegal lifecycle transition {from} -> {to}")]
    IllegalTransition {
        /// The state the plugin is in.
        from: PluginLifecycleState,
        /// The state that was asked for.
        to: PluginLifecycleState,
    },
    /// The plugin cannot take tool calls in its current state.
    #[error("plugin '{name}' is not available (state {state})")]
    NotAvailable {
        /// The plugin.
        name: String,
        /// Its current state.
        state: PluginLifecycleState,
    },
    /// `finish` was called with no tool call in flight.
    #[error("plugin '{name}' has no tool call in flight")]
    NothingInFlight {
        /// The plugin.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::RegistryError;
    use crate::PluginLifecycleState;

    #[test]
    fn messages_are_one_readable_line() {
        let cases = [
            (
                RegistryError::NotFound { name: "ocr".into() },
                "plugin 'ocr' not found",
            ),
            (
                RegistryError::AlreadyRegistered { name: "ocr".into() },
                "plugin 'ocr' is already registered",
            ),
            (
                RegistryError::IllegalTransition {
                    from: PluginLifecycleState::Loaded,
                    to: PluginLifecycleState::Running,
                },
                "illegal lifecycle transition LOADED -> RUNNING",
            ),
            (
                RegistryError::NotAvailable {
                    name: "ocr".into(),
                    state: PluginLifecycleState::Failed,
                },
                "plugin 'ocr' is not available (state FAILED)",
            ),
            (
                RegistryError::NothingInFlight { name: "ocr".into() },
                "plugin 'ocr' has no tool call in flight",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }
}
