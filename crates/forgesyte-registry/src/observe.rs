//! Observers: a hook told of every change of a plugin's lifecycle that a
//! person watching the host cares about (registration, a state change, a
//! new reason, a recorded crash, a supervisor restart).
//!
//! This module owns the [`Observer`] trait and the [`Change`] it is handed.
//! It must not know who listens: no channel, no HTTP, no event format. The
//! server turns changes into its event stream; an embedder may log them or
//! count them.
//!
//! Observers run **inside the registry's write**, under its one write lock,
//! so they see changes in exactly the order they were published and
//! [`Change::generation`] grows from one change to the next. In return an
//! observer must be quick (copy what it needs and return), must never block
//! on anything slow, and must never write to the registry (that would wait
//! for the lock it runs under). Reading the registry from an observer is
//! fine: readers never take the lock.

use std::fmt;

use crate::PluginLifecycleState;

/// What kind of change a [`Change`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChangeKind {
    /// The plugin was registered (`from` is `None`, `to` is `LOADED`).
    Registered,
    /// The state changed (`from` differs from `to`). This includes the
    /// frequent `INITIALIZED ⇄ RUNNING` moves of tool calls; an observer
    /// that only wants lifecycle moves skips them
    /// ([`Change::is_call_bookkeeping`]).
    State,
    /// The state stayed, its reason changed (a new reason while `FAILED` or
    /// `UNAVAILABLE`).
    Reason,
    /// The plugin's process ended and it is `FAILED`
    /// ([`Registry::mark_crashed`](crate::Registry::mark_crashed));
    /// [`Change::exit`] says how.
    Crashed,
    /// A supervisor restart began (`FAILED -> LOADED`,
    /// [`Change::restart_count`] raised).
    Restarting,
}

impl ChangeKind {
    /// A stable lower-case name: `registered`, `state`, `reason`,
    /// `crashed`, `restarting`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Registered => "registered",
            ChangeKind::State => "state",
            ChangeKind::Reason => "reason",
            ChangeKind::Crashed => "crashed",
            ChangeKind::Restarting => "restarting",
        }
    }
}

/// One published change of one plugin, borrowed from the registry's write.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Change<'a> {
    /// The plugin's registry key.
    pub plugin: &'a str,
    /// What changed.
    pub kind: ChangeKind,
    /// The state before the write; `None` for a registration.
    pub from: Option<PluginLifecycleState>,
    /// The state after the write.
    pub to: PluginLifecycleState,
    /// The reason after the write (`None` when the plugin has none).
    pub reason: Option<&'a str>,
    /// How many times the supervisor restarted the plugin so far.
    pub restart_count: u64,
    /// How its process last ended (`killed by signal SIGSEGV (11)`), when a
    /// crash was recorded.
    pub exit: Option<&'a str>,
    /// The registry's generation after this write.
    pub generation: u64,
}

impl Change<'_> {
    /// Whether this is a tool call's `INITIALIZED ⇄ RUNNING` move, which
    /// happens twice per call and is no lifecycle news.
    pub fn is_call_bookkeeping(&self) -> bool {
        use PluginLifecycleState::{Initialized, Running};
        self.kind == ChangeKind::State
            && matches!(
                (self.from, self.to),
                (Some(Initialized), Running) | (Some(Running), Initialized)
            )
    }
}

/// Told of every [`Change`] the registry publishes; see the module
/// documentation for what an observer may and may not do.
pub trait Observer: Send + Sync {
    /// Called once per change, under the registry's write lock.
    fn observe(&self, change: &Change<'_>);
}

impl<F> Observer for F
where
    F: Fn(&Change<'_>) + Send + Sync,
{
    fn observe(&self, change: &Change<'_>) {
        self(change);
    }
}

/// The registry's observers; kept beside its write lock.
#[derive(Default)]
pub(crate) struct Observers(Vec<std::sync::Arc<dyn Observer>>);

impl Observers {
    pub(crate) fn push(&mut self, observer: std::sync::Arc<dyn Observer>) {
        self.0.push(observer);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn tell(&self, change: &Change<'_>) {
        for observer in &self.0 {
            observer.observe(change);
        }
    }
}

impl fmt::Debug for Observers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} observer(s)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::{ExitInfo, PluginInfo, PluginLifecycleState as S, Registry};

    use super::*;

    /// A registry whose observer writes each change as one line.
    fn observed() -> (Registry, Arc<Mutex<Vec<String>>>) {
        let registry = Registry::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let reader = registry.clone();
        registry.add_observer(Arc::new(move |change: &Change<'_>| {
            // Reading the registry from an observer must not deadlock, and
            // it already sees the change.
            assert_eq!(reader.get_state(change.plugin), Some(change.to));
            assert_eq!(reader.generation(), change.generation);
            sink.lock().unwrap().push(format!(
                "{} {} {:?}->{} {:?} r{} {:?}{}",
                change.plugin,
                change.kind.as_str(),
                change.from.map(S::as_str),
                change.to.as_str(),
                change.reason,
                change.restart_count,
                change.exit,
                if change.is_call_bookkeeping() {
                    " call"
                } else {
                    ""
                },
            ));
        }));
        (registry, seen)
    }

    #[test]
    fn every_lifecycle_change_is_told_in_order() {
        let (registry, seen) = observed();
        registry.register("p", PluginInfo::default()).unwrap();
        registry.mark_initialized("p").unwrap();
        registry.mark_running("p").unwrap();
        registry
            .end_call("p", Duration::from_millis(1), true)
            .unwrap();
        registry
            .mark_crashed(
                "p",
                "CrashError: killed",
                ExitInfo {
                    description: Some("killed by signal SIGSEGV (11)".into()),
                    ..ExitInfo::default()
                },
            )
            .unwrap();
        registry.set_next_retry("p", None).unwrap(); // no news
        registry.mark_failed("p", "CrashError: killed").unwrap(); // same reason: no news
        registry.mark_failed("p", "ToolPanic: other").unwrap();
        registry.mark_restarting("p").unwrap();
        registry
            .mark_unavailable("p", "Missing dependencies: x")
            .unwrap();
        // A refused write tells nothing.
        assert!(registry.mark_initialized("p").is_err());
        registry.mark_loaded("p", None).unwrap();
        let lines = seen.lock().unwrap().clone();
        assert_eq!(
            lines,
            [
                "p registered None->LOADED None r0 None",
                "p state Some(\"LOADED\")->INITIALIZED None r0 None",
                "p state Some(\"INITIALIZED\")->RUNNING None r0 None call",
                "p state Some(\"RUNNING\")->INITIALIZED None r0 None call",
                "p crashed Some(\"INITIALIZED\")->FAILED Some(\"CrashError: killed\") r0 Some(\"killed by signal SIGSEGV (11)\")",
                "p reason Some(\"FAILED\")->FAILED Some(\"ToolPanic: other\") r0 Some(\"killed by signal SIGSEGV (11)\")",
                "p restarting Some(\"FAILED\")->LOADED Some(\"being restarted: its process is started again; its calls answer 503 until it is ready\") r1 Some(\"killed by signal SIGSEGV (11)\")",
                "p state Some(\"LOADED\")->UNAVAILABLE Some(\"Missing dependencies: x\") r1 Some(\"killed by signal SIGSEGV (11)\")",
                "p state Some(\"UNAVAILABLE\")->LOADED None r1 Some(\"killed by signal SIGSEGV (11)\")",
            ]
        );
    }

    /// A call's end that takes a plugin a reload let go on to LOADED is told
    /// as the state machine's move, INITIALIZED -> LOADED (it was told
    /// RUNNING -> LOADED, which is none).
    #[test]
    fn a_call_end_that_loads_a_plugin_let_go_is_told_as_a_legal_move() {
        let (registry, seen) = observed();
        registry.register("q", PluginInfo::default()).unwrap();
        registry.mark_initialized("q").unwrap();
        registry.mark_running("q").unwrap();
        registry
            .mark_loaded_when_idle("q", "being reloaded")
            .unwrap();
        registry.finish("q").unwrap();
        let lines = seen.lock().unwrap().clone();
        assert_eq!(
            lines[3..],
            [
                "q reason Some(\"RUNNING\")->RUNNING Some(\"being reloaded\") r0 None",
                "q state Some(\"INITIALIZED\")->LOADED Some(\"being reloaded\") r0 None",
            ]
        );
    }

    #[test]
    fn generations_grow_across_threads() {
        let registry = Registry::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        registry.add_observer(Arc::new(move |change: &Change<'_>| {
            sink.lock().unwrap().push(change.generation);
        }));
        for i in 0..4 {
            registry
                .register(&format!("p{i}"), PluginInfo::default())
                .unwrap();
            registry.mark_initialized(&format!("p{i}")).unwrap();
        }
        std::thread::scope(|scope| {
            for i in 0..4 {
                let registry = &registry;
                scope.spawn(move || {
                    for _ in 0..50 {
                        registry.mark_running(&format!("p{i}")).unwrap();
                        registry
                            .end_call(&format!("p{i}"), Duration::ZERO, true)
                            .unwrap();
                    }
                });
            }
        });
        let generations = seen.lock().unwrap().clone();
        assert_eq!(generations.len(), 8 + 4 * 50 * 2);
        assert!(
            generations.windows(2).all(|w| w[0] < w[1]),
            "told out of order"
        );
    }
}
