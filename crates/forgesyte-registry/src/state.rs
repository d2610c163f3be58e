//! The five lifecycle states of SPEC §4 and the one transition function.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::RegistryError;

/// Where a plugin is in its life (SPEC §4). Serialised as the upper-case
/// name (`"LOADED"`, `"INITIALIZED"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PluginLifecycleState {
    /// Manifest read and registered; no instance yet.
    Loaded,
    /// Instance created; ready for tool calls, none in flight.
    Initialized,
    /// At least one tool call in flight.
    Running,
    /// Import, init or a run-time fault; terminal until an explicit reload or
    /// restart.
    Failed,
    /// A dependency is missing; terminal until an explicit reload.
    Unavailable,
}

impl PluginLifecycleState {
    /// Every state, in declaration order.
    pub const ALL: [PluginLifecycleState; 5] = [
        PluginLifecycleState::Loaded,
        PluginLifecycleState::Initialized,
        PluginLifecycleState::Running,
        PluginLifecycleState::Failed,
        PluginLifecycleState::Unavailable,
    ];

    /// Whether `self -> next` is a legal transition.
    ///
    /// A same-state move is never a transition (a second call while
    /// `RUNNING` only changes the in-flight count), so `s.can_transition_to(s)`
    /// is `false` for every `s`.
    pub fn can_transition_to(self, next: Self) -> bool {
        use PluginLifecycleState::{Failed, Initialized, Loaded, Running, Unavailable};
        matches!(
            (self, next),
            (Loaded, Initialized | Failed | Unavailable)
                | (Initialized, Running | Failed | Unavailable | Loaded)
                | (Running, Initialized | Failed)
                | (Failed | Unavailable, Loaded)
        )
    }

    /// Moves to `next` when the move is legal.
    ///
    /// # Errors
    ///
    /// [`RegistryError::IllegalTransition`] when `self -> next` is not a legal
    /// transition (same-state moves included).
    pub fn transition(self, next: Self) -> Result<Self, RegistryError> {
        if self.can_transition_to(next) {
            Ok(next)
        } else {
            Err(RegistryError::IllegalTransition {
                from: self,
                to: next,
            })
        }
    }

    /// Whether a plugin in this state can take tool calls
    /// (`INITIALIZED` or `RUNNING`).
    pub fn is_available(self) -> bool {
        matches!(
            self,
            PluginLifecycleState::Initialized | PluginLifecycleState::Running
        )
    }

    /// Whether the state only ends by an explicit reload or restart
    /// (`FAILED` or `UNAVAILABLE`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PluginLifecycleState::Failed | PluginLifecycleState::Unavailable
        )
    }

    /// The upper-case name used on the wire (`"LOADED"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PluginLifecycleState::Loaded => "LOADED",
            PluginLifecycleState::Initialized => "INITIALIZED",
            PluginLifecycleState::Running => "RUNNING",
            PluginLifecycleState::Failed => "FAILED",
            PluginLifecycleState::Unavailable => "UNAVAILABLE",
        }
    }
}

impl fmt::Display for PluginLifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of the five upper-case state names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown plugin state {text:?}: expected LOADED, INITIALIZED, RUNNING, FAILED or UNAVAILABLE"
)]
pub struct ParseStateError {
    /// The text that was given.
    pub text: String,
}

impl FromStr for PluginLifecycleState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PluginLifecycleState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError { text: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::PluginLifecycleState::{self, Failed, Initialized, Loaded, Running, Unavailable};
    use crate::RegistryError;

    #[test]
    fn legal_moves_are_exactly_the_spec_table() {
        let legal = [
            (Loaded, Initialized),
            (Loaded, Failed),
            (Loaded, Unavailable),
            (Initialized, Running),
            (Initialized, Failed),
            (Initialized, Unavailable),
            (Initialized, Loaded),
            (Running, Initialized),
            (Running, Failed),
            (Failed, Loaded),
            (Unavailable, Loaded),
        ];
        for from in PluginLifecycleState::ALL {
            for to in PluginLifecycleState::ALL {
                let expected = legal.contains(&(from, to));
                assert_eq!(from.can_transition_to(to), expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn transition_returns_next_or_typed_error() {
        assert_eq!(Loaded.transition(Initialized).ok(), Some(Initialized));
        match Loaded.transition(Running) {
            Err(RegistryError::IllegalTransition { from, to }) => {
                assert_eq!((from, to), (Loaded, Running));
            }
            other => panic!("expected IllegalTransition, got {other:?}"),
        }
        assert!(Running.transition(Running).is_err());
    }

    #[test]
    fn availability_and_terminal_states() {
        let available: Vec<_> = PluginLifecycleState::ALL
            .into_iter()
            .filter(|s| s.is_available())
            .collect();
        assert_eq!(available, [Initialized, Running]);
        let terminal: Vec<_> = PluginLifecycleState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, [Failed, Unavailable]);
    }

    #[test]
    fn names_round_trip_through_serde_display_and_from_str() {
        for state in PluginLifecycleState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(
                serde_json::from_str::<PluginLifecycleState>(&json).unwrap(),
                state
            );
            assert_eq!(state.to_string(), state.as_str());
            assert_eq!(
                state.as_str().parse::<PluginLifecycleState>().unwrap(),
                state
            );
        }
        assert_eq!(Unavailable.as_str(), "UNAVAILABLE");
        assert!("loaded".parse::<PluginLifecycleState>().is_err());
    }
}
