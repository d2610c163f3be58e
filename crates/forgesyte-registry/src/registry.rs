//! The [`Registry`] handle: every plugin's entry, its writes (each one
//! entry replaced whole, observers told after) and reads. Its
//! point-in-time [`Snapshot`]s are in `snapshot.rs`, a call in progress
//! ([`CallGuard`]) in `call.rs`, registering many plugins in one write in
//! `batch.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use forgesyte_errors::{LoadError, PluginError};
use parking_lot::{Mutex, RwLock};

use crate::observe::Observers;
use crate::status::{Entry, Recorded, rfc3339};
use crate::{
    Change, ChangeKind, ExitInfo, JournalEntry, Observer, PluginInfo, PluginLifecycleState,
    PluginStatus, RegistryError, Transition,
};

/// One plugin's published, immutable entry; a write replaces it whole.
///
/// A lock around an `Arc`, not an `ArcSwap`: an `ArcSwap`'s store pays the
/// debts of every thread that ever loaded from one (it walks a node per
/// thread, dozens with tokio's blocking pool), which was 3% of the server's
/// CPU under no-op tool calls (two stores per call). Here a read holds the
/// lock for one `Arc` clone, a write for one pointer swap; an entry is
/// dropped outside it.
#[derive(Debug)]
pub(super) struct Slot(RwLock<Arc<Entry>>);

impl Slot {
    pub(super) fn new(entry: Entry) -> Self {
        Slot(RwLock::new(Arc::new(entry)))
    }

    /// The entry as it is now.
    fn load(&self) -> Arc<Entry> {
        Arc::clone(&self.0.read())
    }

    /// Publishes `entry`; the one it replaces is dropped after the lock.
    fn store(&self, entry: Arc<Entry>) {
        let replaced = std::mem::replace(&mut *self.0.write(), entry);
        drop(replaced);
    }
}

/// The set of registered plugins. Replaced only when a plugin is
/// registered; a write to one plugin replaces that plugin's [`Slot`] only,
/// so its cost does not grow with the number of plugins.
#[derive(Debug, Default)]
struct Inner {
    plugins: BTreeMap<Arc<str>, Arc<Slot>>,
    /// Plugins being retired ([`Registry::retire`]): invisible to every
    /// read and refused new calls, but the calls in flight still end here.
    retiring: BTreeMap<Arc<str>, Arc<Slot>>,
}

/// What every clone of a [`Registry`] shares.
#[derive(Debug)]
struct Shared {
    /// The one write lock, guarding the observers told of each write. Held
    /// only while an entry is cloned, changed and published and the
    /// observers are told; never while anything slow runs.
    write: Mutex<Observers>,
    /// The registered plugins; readers load it without taking `write`.
    current: ArcSwap<Inner>,
    /// Bumped after every successful write.
    generation: AtomicU64,
}

/// Thread-safe handle to the plugin lifecycle registry.
///
/// Cloning is cheap and every clone sees the same plugins. There is no
/// global instance: whoever builds the host creates one and hands it down.
///
/// Reads ([`get_status`](Registry::get_status), [`list_all`](Registry::list_all),
/// [`snapshot`](Registry::snapshot), ...) never take the write lock. Writes
/// serialise on one mutex, clone the affected entry, and publish a new
/// snapshot. A refused write changes nothing and publishes nothing.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("generation", &self.generation())
            .field("plugins", &self.len())
            .finish()
    }
}

/// The reason of a plugin `LOADED` while its supervisor starts it again
/// ([`Registry::mark_restarting`]).
pub const RESTARTING: &str =
    "being restarted: its process is started again; its calls answer 503 until it is ready";

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            shared: Arc::new(Shared {
                write: Mutex::new(Observers::default()),
                current: ArcSwap::from_pointee(Inner::default()),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Adds an observer, told of every later change (registration, state,
    /// reason, crash, restart) under the write lock, in publication order;
    /// see [`Observer`] for what it may do. Observers cannot be removed;
    /// they live as long as the registry.
    pub fn add_observer(&self, observer: Arc<dyn Observer>) {
        self.shared.write.lock().push(observer);
    }

    /// Registers a plugin in state `LOADED`.
    ///
    /// # Errors
    ///
    /// [`RegistryError::AlreadyRegistered`] when the name is taken; the
    /// registered plugin is left exactly as it was.
    pub fn register(&self, name: &str, info: PluginInfo) -> Result<(), RegistryError> {
        if self.register_all(&[(name.to_owned(), info)]) == 1 {
            Ok(())
        } else {
            Err(RegistryError::AlreadyRegistered {
                name: name.to_owned(),
            })
        }
    }

    /// Starts retiring a plugin (its directory was removed): from now on it
    /// is absent from every read (`get_status` is `None`, lists leave it
    /// out) and [`mark_running`](Registry::mark_running) refuses it with
    /// [`RegistryError::NotFound`], while the calls already in flight still
    /// end on it ([`end_call`](Registry::end_call), [`finish`](Registry::finish)).
    /// [`retiring_in_flight`](Registry::retiring_in_flight) counts them;
    /// [`forget`](Registry::forget) ends the retirement. The name cannot be
    /// registered again until then.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`] when no plugin of that name is registered.
    pub fn retire(&self, name: &str) -> Result<(), RegistryError> {
        let _write = self.shared.write.lock();
        let current = self.shared.current.load_full();
        let mut plugins = current.plugins.clone();
        let Some((key, slot)) = plugins.remove_entry(name) else {
            return Err(RegistryError::NotFound {
                name: name.to_owned(),
            });
        };
        let mut retiring = current.retiring.clone();
        retiring.insert(key, slot);
        self.shared
            .current
            .store(Arc::new(Inner { plugins, retiring }));
        self.shared.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Calls still in flight on a plugin being retired; `None` when `name`
    /// is not being retired.
    pub fn retiring_in_flight(&self, name: &str) -> Option<u32> {
        let current = self.shared.current.load();
        Some(current.retiring.get(name)?.load().in_flight)
    }

    /// Ends the retirement of `name`: it is gone for good, and the name can
    /// be registered again. Returns whether it was being retired.
    pub fn forget(&self, name: &str) -> bool {
        let _write = self.shared.write.lock();
        let current = self.shared.current.load_full();
        if !current.retiring.contains_key(name) {
            return false;
        }
        let mut retiring = current.retiring.clone();
        retiring.remove(name);
        self.shared.current.store(Arc::new(Inner {
            plugins: current.plugins.clone(),
            retiring,
        }));
        self.shared.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// `LOADED -> INITIALIZED`: the plugin's instance was created (then
    /// `RUNNING` when calls counted before a restart are still in flight:
    /// the last to end moves it back).
    ///
    /// Only legal from `LOADED`. (`RUNNING -> INITIALIZED` is legal in the
    /// state machine but happens only when the last call in flight ends,
    /// through [`end_call`](Registry::end_call) or
    /// [`finish`](Registry::finish).)
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from any state but `LOADED`.
    pub fn mark_initialized(&self, name: &str) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            if entry.state != PluginLifecycleState::Loaded {
                return Err(RegistryError::IllegalTransition {
                    from: entry.state,
                    to: PluginLifecycleState::Initialized,
                });
            }
            entry.move_to(PluginLifecycleState::Initialized, None, now);
            // A call counted before a crash may still be on its way out
            // (or, stalled before it reached the runner, about to run on
            // the new one): the state says so until the last one ends.
            if entry.in_flight > 0 {
                entry.move_to(PluginLifecycleState::Running, None, now);
            }
            Ok(())
        })
    }

    /// A tool call starts: `in_flight += 1`, state `RUNNING`, `last_used`
    /// set. Pair every successful call with one
    /// [`end_call`](Registry::end_call) (or, when the call never reached the
    /// plugin, one [`finish`](Registry::finish)); this is what the host's
    /// call path does.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::NotAvailable`] when
    /// the plugin is neither `INITIALIZED` nor `RUNNING`.
    pub fn mark_running(&self, name: &str) -> Result<(), RegistryError> {
        self.write(name, false, false, |entry, now| {
            if !entry.state.is_available() {
                return Err(RegistryError::NotAvailable {
                    name: name.to_owned(),
                    state: entry.state,
                });
            }
            entry.in_flight = entry.in_flight.saturating_add(1);
            entry.last_used = Some(now);
            if entry.state == PluginLifecycleState::Initialized {
                entry.move_to(PluginLifecycleState::Running, None, now);
            }
            Ok(())
        })
    }

    /// A tool call ended without being counted: `in_flight -= 1`; the last
    /// one out moves `RUNNING` back to `INITIALIZED` (and on to `LOADED`
    /// after [`mark_loaded_when_idle`](Registry::mark_loaded_when_idle)). A plugin that went
    /// `FAILED` (or anything else) meanwhile keeps its state. The host uses
    /// it for a call that never reached the plugin; a call that ran ends
    /// with [`end_call`](Registry::end_call).
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::NothingInFlight`]
    /// when no call is in flight.
    pub fn finish(&self, name: &str) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            if entry.in_flight == 0 {
                return Err(RegistryError::NothingInFlight {
                    name: name.to_owned(),
                });
            }
            entry.call_ended(now);
            Ok(())
        })
    }

    /// A tool call ended: counts it as a success or an error with its
    /// duration and then [`finish`](Registry::finish)es it, in one write (a
    /// tool call's bookkeeping is two writes: this and
    /// [`mark_running`](Registry::mark_running)).
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::NothingInFlight`]
    /// (then nothing is recorded).
    pub fn end_call(
        &self,
        name: &str,
        elapsed: Duration,
        succeeded: bool,
    ) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            if entry.in_flight == 0 {
                return Err(RegistryError::NothingInFlight {
                    name: name.to_owned(),
                });
            }
            if succeeded {
                entry.success_count = entry.success_count.saturating_add(1);
            } else {
                entry.error_count = entry.error_count.saturating_add(1);
            }
            entry.record_time(elapsed, now);
            entry.call_ended(now);
            Ok(())
        })
    }

    /// Moves to `FAILED` with `reason` (kept verbatim). Legal from `LOADED`,
    /// `INITIALIZED` and `RUNNING`; on a plugin already `FAILED` it replaces
    /// the reason. Calls still in flight stay counted until they finish.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from `UNAVAILABLE`.
    pub fn mark_failed(&self, name: &str, reason: impl Into<String>) -> Result<(), RegistryError> {
        self.mark_terminal(
            name,
            PluginLifecycleState::Failed,
            reason.into(),
            Vec::new(),
        )
    }

    /// [`mark_failed`](Self::mark_failed), with lines for people kept in the
    /// failure journal entry (its `stderr_tail`): a Python plugin's
    /// traceback when its import or constructor raised.
    ///
    /// # Errors
    ///
    /// As [`mark_failed`](Self::mark_failed).
    pub fn mark_failed_with_details(
        &self,
        name: &str,
        reason: impl Into<String>,
        details: Vec<String>,
    ) -> Result<(), RegistryError> {
        self.mark_terminal(name, PluginLifecycleState::Failed, reason.into(), details)
    }

    /// Moves to `UNAVAILABLE` with `reason` (kept verbatim). Legal from
    /// `LOADED` and `INITIALIZED`; on a plugin already `UNAVAILABLE` it
    /// replaces the reason.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from `RUNNING` or `FAILED`.
    pub fn mark_unavailable(
        &self,
        name: &str,
        reason: impl Into<String>,
    ) -> Result<(), RegistryError> {
        self.mark_terminal(
            name,
            PluginLifecycleState::Unavailable,
            reason.into(),
            Vec::new(),
        )
    }

    /// Records a load or run-time error: a dependency error makes the plugin
    /// `UNAVAILABLE`, anything else `FAILED`; the reason is
    /// [`PluginError::reason`] (`ImportError: ...`, `Missing dependencies: ...`).
    ///
    /// A convenience for embedders and tests: the host's loader makes the
    /// same decision itself and calls [`mark_unavailable`](Registry::mark_unavailable),
    /// [`mark_failed`](Registry::mark_failed) or
    /// [`mark_crashed`](Registry::mark_crashed).
    ///
    /// # Errors
    ///
    /// As [`mark_failed`](Registry::mark_failed) and
    /// [`mark_unavailable`](Registry::mark_unavailable).
    pub fn mark_error(&self, name: &str, error: &PluginError) -> Result<(), RegistryError> {
        match error {
            PluginError::Load(LoadError::Dependency(_)) => {
                self.mark_unavailable(name, error.reason())
            }
            _ => self.mark_failed(name, error.reason()),
        }
    }

    /// Explicit reload or restart: back to `LOADED`, reason and any pending
    /// retry time cleared (the reload replaces that restart), metrics and
    /// history kept; `info`, when given, replaces the registered info.
    /// Legal from `INITIALIZED`, `FAILED` and `UNAVAILABLE`; on a plugin
    /// already `LOADED` it only replaces the info.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from `RUNNING`.
    pub fn mark_loaded(&self, name: &str, info: Option<PluginInfo>) -> Result<(), RegistryError> {
        self.mark_loaded_because(name, info, None)
    }

    /// [`mark_loaded`](Registry::mark_loaded) with the `reason` the plugin
    /// shows while `LOADED` (a reload in progress: why it answers no
    /// calls); a `Some` reason replaces the reason of a plugin already
    /// `LOADED`, `None` keeps it.
    ///
    /// # Errors
    ///
    /// As [`mark_loaded`](Registry::mark_loaded).
    pub fn mark_loaded_because(
        &self,
        name: &str,
        info: Option<PluginInfo>,
        reason: Option<&str>,
    ) -> Result<(), RegistryError> {
        let reason: Option<Arc<str>> = reason.map(bounded);
        self.update(name, |entry, now| {
            entry.load_because(reason.clone(), now)?;
            if let Some(info) = info {
                entry.info = Arc::new(info);
            }
            Ok(())
        })
    }

    /// [`mark_loaded_because`](Registry::mark_loaded_because) `reason` for
    /// a plugin whose instance a reload let go: at once when no call is in
    /// flight; else, when it is `RUNNING`, once the last call in flight
    /// ends (`RUNNING -> INITIALIZED -> LOADED` in that one write), showing
    /// `reason` meanwhile. Without this, the calls' end left it
    /// `INITIALIZED` with no instance (available to every list and probe,
    /// every call answered 503) until the reload came back to it. Another
    /// state with calls in flight (`FAILED`) is kept.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or as
    /// [`mark_loaded_because`](Registry::mark_loaded_because) when no call
    /// is in flight.
    pub fn mark_loaded_when_idle(&self, name: &str, reason: &str) -> Result<(), RegistryError> {
        let reason = bounded(reason);
        self.update(name, |entry, now| {
            if entry.state == PluginLifecycleState::Loaded || entry.in_flight == 0 {
                entry.load_because(Some(Arc::clone(&reason)), now)?;
            } else if entry.state == PluginLifecycleState::Running {
                entry.reason = Some(Arc::clone(&reason));
                entry.loaded_when_idle = Some(Arc::clone(&reason));
            }
            Ok(())
        })
    }

    /// Counts a successful tool call of the given duration. Does not change
    /// the state; allowed in any state (a call may end after a fault).
    ///
    /// Not used by the host, which counts with
    /// [`end_call`](Registry::end_call); kept for embedders and tests.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`].
    pub fn record_success(&self, name: &str, elapsed: Duration) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            entry.success_count = entry.success_count.saturating_add(1);
            entry.record_time(elapsed, now);
            Ok(())
        })
    }

    /// Counts a tool call that returned an error (or faulted) after the given
    /// duration. Does not change the state: marking a fault `FAILED` is the
    /// caller's separate decision.
    ///
    /// Not used by the host, which counts with
    /// [`end_call`](Registry::end_call); kept for embedders and tests.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`].
    pub fn record_error(&self, name: &str, elapsed: Duration) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            entry.error_count = entry.error_count.saturating_add(1);
            entry.record_time(elapsed, now);
            Ok(())
        })
    }

    /// Starts a tool call ([`mark_running`](Registry::mark_running)) and
    /// returns a guard that ends it with [`end_call`](Registry::end_call)
    /// ([`CallGuard::succeeded`] / [`CallGuard::failed`]) or, when dropped
    /// unused, with [`finish`](Registry::finish), so an early return or a
    /// caught panic cannot leak an in-flight count.
    ///
    /// A convenience for embedders and tests: the host's own call path
    /// calls `mark_running` and `end_call` directly.
    ///
    /// # Errors
    ///
    /// As [`mark_running`](Registry::mark_running).
    pub fn begin_call(&self, name: &str) -> Result<CallGuard, RegistryError> {
        self.mark_running(name)?;
        Ok(CallGuard {
            registry: self.clone(),
            name: name.to_owned(),
            ended: false,
        })
    }

    /// The plugin's process ended (crashed, was killed, or broke its
    /// protocol): moves to `FAILED` with `reason` (kept verbatim), records
    /// `exit.description` as `last_exit_reason`, clears `next_retry_at` and
    /// appends a journal entry with the signal or exit code and the stderr
    /// tail. Legal from `LOADED`, `INITIALIZED`, `RUNNING` and `FAILED`
    /// (where it replaces the reason).
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from `UNAVAILABLE`.
    pub fn mark_crashed(
        &self,
        name: &str,
        reason: impl Into<String>,
        exit: ExitInfo,
    ) -> Result<(), RegistryError> {
        self.mark_crashed_until(name, reason, exit, None)
    }

    /// [`mark_crashed`](Self::mark_crashed), with the time its restart is
    /// scheduled for (`next_retry_at`) set in the same write: an observer
    /// told of the crash reads the plugin as FAILED with its retry time,
    /// never as FAILED for good first.
    ///
    /// # Errors
    ///
    /// As [`mark_crashed`](Self::mark_crashed).
    pub fn mark_crashed_until(
        &self,
        name: &str,
        reason: impl Into<String>,
        exit: ExitInfo,
        next_retry: Option<std::time::SystemTime>,
    ) -> Result<(), RegistryError> {
        let reason = bounded(&reason.into());
        self.write(name, true, true, |entry, now| {
            let target = PluginLifecycleState::Failed;
            if entry.state != target {
                let next = entry.state.transition(target)?;
                entry.move_to(next, Some(Arc::clone(&reason)), now);
            } else {
                entry.reason = Some(Arc::clone(&reason));
            }
            // How its process last ended, kept when this failure says
            // nothing of one (a restart whose constructor raised).
            if let Some(description) = exit.description {
                entry.last_exit_reason = Some(bounded(&description));
            }
            entry.next_retry_at = next_retry.map(DateTime::<Utc>::from);
            entry.journal_push(Recorded {
                at: rfc3339(now),
                state: target,
                reason: Some(Arc::clone(&reason)),
                exit_signal: exit.signal,
                exit_code: exit.code,
                stderr_tail: Arc::new(exit.stderr_tail),
            });
            Ok(())
        })
    }

    /// Records what the loader found of the plugin's signature (`None`:
    /// not checked). Changes no state.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`].
    pub fn set_signature(
        &self,
        name: &str,
        signature: Option<crate::SignatureInfo>,
    ) -> Result<(), RegistryError> {
        let signature = signature.map(Arc::new);
        self.update(name, |entry, _| {
            entry.signature = signature;
            Ok(())
        })
    }

    /// Sets (or, with `None`, clears) when the supervisor will next try to
    /// restart the plugin. Changes no state.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`].
    pub fn set_next_retry(
        &self,
        name: &str,
        at: Option<std::time::SystemTime>,
    ) -> Result<(), RegistryError> {
        self.update(name, |entry, _now| {
            entry.next_retry_at = at.map(DateTime::<Utc>::from);
            Ok(())
        })
    }

    /// Records the sandbox its runner reported (`None`: unconfined).
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`].
    pub fn set_confinement(
        &self,
        name: &str,
        confinement: Option<BTreeMap<String, String>>,
    ) -> Result<(), RegistryError> {
        // What it already is (an in-process plugin has none): no write, so
        // no new entry and no generation (a load pass sets it per plugin).
        if self.with_entry(name, |_, entry| {
            entry.confinement.as_deref() == confinement.as_ref()
        }) == Some(true)
        {
            return Ok(());
        }
        let confinement = confinement.map(Arc::new);
        self.update(name, |entry, _now| {
            entry.confinement = confinement.clone();
            Ok(())
        })
    }

    /// A supervisor restart begins: `FAILED -> LOADED`, the reason
    /// [`RESTARTING`],
    /// `restart_count + 1`, `next_retry_at` cleared, and a journal entry.
    /// Only legal from `FAILED` (a plugin reloaded meanwhile is left
    /// alone), and never for a plugin being retired: its supervisor's
    /// timer, firing while a rescan lets it go, would start a runner from
    /// a directory that may hold another plugin by then.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`] (also while it is being retired), or
    /// [`RegistryError::IllegalTransition`] from any state but `FAILED`.
    pub fn mark_restarting(&self, name: &str) -> Result<(), RegistryError> {
        self.write(name, false, false, |entry, now| {
            if entry.state != PluginLifecycleState::Failed {
                return Err(RegistryError::IllegalTransition {
                    from: entry.state,
                    to: PluginLifecycleState::Loaded,
                });
            }
            // Why it answers no calls meanwhile (it was null: LOADED with
            // no reason while its process started again).
            entry.move_to(
                PluginLifecycleState::Loaded,
                Some(Arc::from(RESTARTING)),
                now,
            );
            entry.restart_count = entry.restart_count.saturating_add(1);
            entry.next_retry_at = None;
            let count = entry.restart_count;
            entry.journal_push(Recorded {
                at: rfc3339(now),
                state: PluginLifecycleState::Loaded,
                reason: Some(Arc::from(format!("restart {count}"))),
                exit_signal: None,
                exit_code: None,
                stderr_tail: Arc::default(),
            });
            Ok(())
        })
    }

    /// The plugin's failure journal (at most [`JOURNAL_LEN`](crate::JOURNAL_LEN)
    /// entries), oldest first.
    pub fn journal(&self, name: &str) -> Option<Vec<JournalEntry>> {
        self.with_entry(name, |_, entry| {
            entry.journal.iter().map(Recorded::to_entry).collect()
        })
    }

    /// The status of one plugin, `None` when it is not registered.
    pub fn get_status(&self, name: &str) -> Option<PluginStatus> {
        let now = Instant::now();
        self.with_entry(name, |key, entry| entry.status(key, now))
    }

    /// How long until the plugin's scheduled restart (zero when it is
    /// due), `None` when none is scheduled or it is not registered.
    pub fn restart_in(&self, name: &str) -> Option<std::time::Duration> {
        let at = self.with_entry(name, |_, entry| entry.next_retry_at)??;
        Some((at - Utc::now()).to_std().unwrap_or_default())
    }

    /// One plugin's status and failure journal, read from one entry (they
    /// agree), `None` when it is not registered.
    pub fn status_with_journal(&self, name: &str) -> Option<(PluginStatus, Vec<JournalEntry>)> {
        let now = Instant::now();
        self.with_entry(name, |key, entry| {
            (
                entry.status(key, now),
                entry.journal.iter().map(Recorded::to_entry).collect(),
            )
        })
    }

    /// The state and reason of one plugin (without building its whole
    /// status), `None` when it is not registered.
    pub fn state_and_reason(&self, name: &str) -> Option<(PluginLifecycleState, Option<String>)> {
        self.with_entry(name, |_, entry| {
            (entry.state, entry.reason.as_deref().map(str::to_owned))
        })
    }

    /// Calls `f` with every registered plugin's name and state, in name
    /// order, without a snapshot: no allocation, and no lock but each
    /// entry's read lock for an `Arc` clone. Each entry is
    /// read as it is when its turn comes, so two plugins may be read a
    /// write apart: for counts (the server's health), not for a view that
    /// must hold together (use [`snapshot`](Self::snapshot)).
    pub fn for_each_state(&self, mut f: impl FnMut(&str, PluginLifecycleState)) {
        let current = self.shared.current.load();
        for (name, slot) in &current.plugins {
            f(name, slot.load().state);
        }
    }

    /// The tool calls in flight on one plugin, `None` when it is not
    /// registered.
    pub fn in_flight(&self, name: &str) -> Option<u32> {
        self.with_entry(name, |_, entry| entry.in_flight)
    }

    /// The state of one plugin, `None` when it is not registered.
    pub fn get_state(&self, name: &str) -> Option<PluginLifecycleState> {
        self.with_entry(name, |_, entry| entry.state)
    }

    /// The info a plugin was registered (or last reloaded) with.
    pub fn info(&self, name: &str) -> Option<PluginInfo> {
        self.with_entry(name, |_, entry| PluginInfo::clone(&entry.info))
    }

    /// Whether the plugin is registered and can take tool calls.
    pub fn is_available(&self, name: &str) -> bool {
        self.get_state(name)
            .is_some_and(PluginLifecycleState::is_available)
    }

    /// Whether a plugin of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.shared.current.load().plugins.contains_key(name)
    }

    /// Every plugin's status, sorted by name, failed and unavailable ones
    /// included.
    pub fn list_all(&self) -> Vec<PluginStatus> {
        self.snapshot().statuses()
    }

    /// Names of the plugins that can take tool calls, sorted.
    pub fn list_available(&self) -> Vec<String> {
        self.snapshot().available()
    }

    /// The plugin's last transitions (at most [`HISTORY_LEN`](crate::HISTORY_LEN)),
    /// oldest first; the first one ever is its registration (`from: None`).
    pub fn history(&self, name: &str) -> Option<Vec<Transition>> {
        self.with_entry(name, |_, entry| entry.history.iter().cloned().collect())
    }

    /// Number of registered plugins.
    pub fn len(&self) -> usize {
        self.shared.current.load().plugins.len()
    }

    /// Whether no plugin is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A point-in-time view of every plugin; later writes do not change it.
    /// Each plugin's entry is read whole (its fields all come from one
    /// write); taking it costs one `Arc` clone per plugin (under that
    /// entry's read lock, never the write lock).
    pub fn snapshot(&self) -> Snapshot {
        let generation = self.generation();
        let current = self.shared.current.load();
        let plugins = current
            .plugins
            .iter()
            .map(|(key, slot)| (Arc::clone(key), slot.load()))
            .collect();
        Snapshot {
            generation,
            plugins: Arc::new(plugins),
        }
    }

    /// Counter bumped by every successful write. Equal generations mean equal
    /// data, except `uptime_seconds`, which is measured when read.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Reads one plugin's current entry (an `Arc` clone under its read
    /// lock; never the write lock).
    fn with_entry<T>(&self, name: &str, read: impl FnOnce(&str, &Entry) -> T) -> Option<T> {
        let current = self.shared.current.load();
        let (key, slot) = current.plugins.get_key_value(name)?;
        let entry = slot.load();
        Some(read(key, &entry))
    }

    fn mark_terminal(
        &self,
        name: &str,
        target: PluginLifecycleState,
        reason: String,
        details: Vec<String>,
    ) -> Result<(), RegistryError> {
        let reason = bounded(&reason);
        self.update(name, |entry, now| {
            let changed = entry.state != target || entry.reason.as_deref() != Some(&*reason);
            if entry.state == target {
                entry.reason = Some(Arc::clone(&reason));
            } else {
                let next = entry.state.transition(target)?;
                entry.move_to(next, Some(Arc::clone(&reason)), now);
            }
            if changed {
                entry.journal_push(Recorded {
                    at: rfc3339(now),
                    state: target,
                    reason: Some(Arc::clone(&reason)),
                    exit_signal: None,
                    exit_code: None,
                    stderr_tail: Arc::new(details),
                });
            }
            Ok(())
        })
    }

    /// The one write path for an existing plugin: under the write lock,
    /// clone its entry, let `change` edit the clone, and publish it in the
    /// plugin's slot when `change` succeeds. No other plugin is touched.
    ///
    /// A plugin being retired is found too (its calls in flight end on it).
    fn update(
        &self,
        name: &str,
        change: impl FnOnce(&mut Entry, DateTime<Utc>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        self.write(name, true, false, change)
    }

    /// [`update`](Self::update), finding plugins being retired only when
    /// `retiring` says so; then the observers are told what changed
    /// (`crashed`: the write records a process's end).
    fn write(
        &self,
        name: &str,
        retiring: bool,
        crashed: bool,
        change: impl FnOnce(&mut Entry, DateTime<Utc>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let observers = self.shared.write.lock();
        let current = self.shared.current.load();
        let found = current.plugins.get_key_value(name).or_else(|| {
            retiring
                .then(|| current.retiring.get_key_value(name))
                .flatten()
        });
        let Some((key, slot)) = found else {
            return Err(RegistryError::NotFound {
                name: name.to_owned(),
            });
        };
        let before = slot.load();
        let mut changed = Entry::clone(&before);
        change(&mut changed, Utc::now())?;
        let after = Arc::new(changed);
        slot.store(Arc::clone(&after));
        let generation = self.shared.generation.fetch_add(1, Ordering::Release) + 1;
        if !observers.is_empty() {
            let kind = if after.restart_count > before.restart_count {
                Some(ChangeKind::Restarting)
            } else if crashed {
                Some(ChangeKind::Crashed)
            } else if after.state != before.state {
                Some(ChangeKind::State)
            } else if after.reason != before.reason {
                Some(ChangeKind::Reason)
            } else {
                None
            };
            // The last move the history recorded, when this write recorded
            // one: a call's end that also took the plugin on to LOADED
            // (`Entry::call_ended`) moved RUNNING -> INITIALIZED -> LOADED,
            // and RUNNING -> LOADED is no move of the state machine.
            let from = if Arc::ptr_eq(&before.history, &after.history) {
                before.state
            } else {
                after
                    .history
                    .back()
                    .and_then(|t| t.from)
                    .unwrap_or(before.state)
            };
            if let Some(kind) = kind {
                observers.tell(&Change {
                    plugin: key,
                    kind,
                    from: Some(from),
                    to: after.state,
                    reason: after.reason.as_deref(),
                    restart_count: after.restart_count,
                    exit: after.last_exit_reason.as_deref(),
                    generation,
                });
            }
        }
        Ok(())
    }
}

mod batch;
mod call;
mod snapshot;

pub use call::CallGuard;
pub use snapshot::Snapshot;

#[cfg(test)]
mod tests;

/// `reason` as stored: at most [`crate::MAX_REASON_CHARS`] characters
/// (with `…` when cut). A reason quotes what a plugin said (a panic's
/// message, a runner's error), and every list and health answer, event and
/// log line carries it: a plugin's 30 MB message made each `GET
/// /v1/plugins` answer 60 MB.
fn bounded(reason: &str) -> Arc<str> {
    Arc::from(&*forgesyte_errors::within(reason, crate::MAX_REASON_CHARS))
}
