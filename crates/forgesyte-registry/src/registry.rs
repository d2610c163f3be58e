//! The [`Registry`] handle and its point-in-time [`Snapshot`]s.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use forgesyte_errors::{LoadError, PluginError};
use parking_lot::Mutex;

use crate::observe::Observers;
use crate::status::{Entry, rfc3339};
use crate::{
    Change, ChangeKind, ExitInfo, JournalEntry, Observer, PluginInfo, PluginLifecycleState,
    PluginStatus, RegistryError, Transition,
};

/// One plugin's published, immutable entry; a write replaces it whole.
type Slot = ArcSwap<Entry>;

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
        let observers = self.shared.write.lock();
        let current = self.shared.current.load_full();
        if current.plugins.contains_key(name) || current.retiring.contains_key(name) {
            return Err(RegistryError::AlreadyRegistered {
                name: name.to_owned(),
            });
        }
        let mut plugins = current.plugins.clone();
        let entry = Entry::new(info, Utc::now());
        plugins.insert(Arc::from(name), Arc::new(ArcSwap::from_pointee(entry)));
        self.shared.current.store(Arc::new(Inner {
            plugins,
            retiring: current.retiring.clone(),
        }));
        let generation = self.shared.generation.fetch_add(1, Ordering::Release) + 1;
        if !observers.is_empty() {
            observers.tell(&Change {
                plugin: name,
                kind: ChangeKind::Registered,
                from: None,
                to: PluginLifecycleState::Loaded,
                reason: None,
                restart_count: 0,
                exit: None,
                generation,
            });
        }
        Ok(())
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

    /// `LOADED -> INITIALIZED`: the plugin's instance was created.
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
    /// one out moves `RUNNING` back to `INITIALIZED`. A plugin that went
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
            entry.in_flight -= 1;
            if entry.in_flight == 0 && entry.state == PluginLifecycleState::Running {
                entry.move_to(PluginLifecycleState::Initialized, None, now);
            }
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
            entry.in_flight -= 1;
            if entry.in_flight == 0 && entry.state == PluginLifecycleState::Running {
                entry.move_to(PluginLifecycleState::Initialized, None, now);
            }
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

    /// Explicit reload or restart: back to `LOADED`, reason cleared, metrics
    /// and history kept; `info`, when given, replaces the registered info.
    /// Legal from `INITIALIZED`, `FAILED` and `UNAVAILABLE`; on a plugin
    /// already `LOADED` it only replaces the info.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from `RUNNING`.
    pub fn mark_loaded(&self, name: &str, info: Option<PluginInfo>) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            if entry.state != PluginLifecycleState::Loaded {
                let next = entry.state.transition(PluginLifecycleState::Loaded)?;
                entry.move_to(next, None, now);
            }
            if let Some(info) = info {
                entry.info = Arc::new(info);
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
        let reason: Arc<str> = Arc::from(reason.into());
        self.write(name, true, true, |entry, now| {
            let target = PluginLifecycleState::Failed;
            if entry.state != target {
                let next = entry.state.transition(target)?;
                entry.move_to(next, Some(Arc::clone(&reason)), now);
            } else {
                entry.reason = Some(Arc::clone(&reason));
            }
            entry.last_exit_reason = exit.description.map(Arc::from);
            entry.next_retry_at = None;
            entry.journal_push(JournalEntry {
                at: rfc3339(now),
                state: target,
                reason: Some(reason.to_string()),
                exit_signal: exit.signal,
                exit_code: exit.code,
                stderr_tail: exit.stderr_tail,
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
        let confinement = confinement.map(Arc::new);
        self.update(name, |entry, _now| {
            entry.confinement = confinement.clone();
            Ok(())
        })
    }

    /// A supervisor restart begins: `FAILED -> LOADED`, reason cleared,
    /// `restart_count + 1`, `next_retry_at` cleared, and a journal entry.
    /// Only legal from `FAILED` (a plugin reloaded or retired meanwhile is
    /// left alone).
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], or [`RegistryError::IllegalTransition`]
    /// from any state but `FAILED`.
    pub fn mark_restarting(&self, name: &str) -> Result<(), RegistryError> {
        self.update(name, |entry, now| {
            if entry.state != PluginLifecycleState::Failed {
                return Err(RegistryError::IllegalTransition {
                    from: entry.state,
                    to: PluginLifecycleState::Loaded,
                });
            }
            entry.move_to(PluginLifecycleState::Loaded, None, now);
            entry.restart_count = entry.restart_count.saturating_add(1);
            entry.next_retry_at = None;
            let count = entry.restart_count;
            entry.journal_push(JournalEntry {
                at: rfc3339(now),
                state: PluginLifecycleState::Loaded,
                reason: Some(format!("restart {count}")),
                exit_signal: None,
                exit_code: None,
                stderr_tail: Vec::new(),
            });
            Ok(())
        })
    }

    /// The plugin's failure journal (at most [`JOURNAL_LEN`](crate::JOURNAL_LEN)
    /// entries), oldest first.
    pub fn journal(&self, name: &str) -> Option<Vec<JournalEntry>> {
        self.with_entry(name, |_, entry| entry.journal.iter().cloned().collect())
    }

    /// The status of one plugin, `None` when it is not registered.
    pub fn get_status(&self, name: &str) -> Option<PluginStatus> {
        let now = Instant::now();
        self.with_entry(name, |key, entry| entry.status(key, now))
    }

    /// One plugin's status and failure journal, read from one entry (they
    /// agree), `None` when it is not registered.
    pub fn status_with_journal(&self, name: &str) -> Option<(PluginStatus, Vec<JournalEntry>)> {
        let now = Instant::now();
        self.with_entry(name, |key, entry| {
            (
                entry.status(key, now),
                entry.journal.iter().cloned().collect(),
            )
        })
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
    /// write); taking it costs one `Arc` clone per plugin and no lock.
    pub fn snapshot(&self) -> Snapshot {
        let generation = self.generation();
        let current = self.shared.current.load();
        let plugins = current
            .plugins
            .iter()
            .map(|(key, slot)| (Arc::clone(key), slot.load_full()))
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

    /// Reads one plugin's current entry without taking any lock.
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
        let reason: Arc<str> = Arc::from(reason);
        self.update(name, |entry, now| {
            let changed = entry.state != target || entry.reason.as_deref() != Some(&*reason);
            if entry.state == target {
                entry.reason = Some(Arc::clone(&reason));
            } else {
                let next = entry.state.transition(target)?;
                entry.move_to(next, Some(Arc::clone(&reason)), now);
            }
            if changed {
                entry.journal_push(JournalEntry {
                    at: rfc3339(now),
                    state: target,
                    reason: Some(reason.to_string()),
                    exit_signal: None,
                    exit_code: None,
                    stderr_tail: details,
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
        let before = slot.load_full();
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
            if let Some(kind) = kind {
                observers.tell(&Change {
                    plugin: key,
                    kind,
                    from: Some(before.state),
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

/// Finishes a tool call when dropped; see [`Registry::begin_call`].
#[must_use = "dropping the guard finishes the call at once"]
#[derive(Debug)]
pub struct CallGuard {
    registry: Registry,
    name: String,
    ended: bool,
}

impl CallGuard {
    /// The plugin this call runs on.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts the call as a success and finishes it (one write).
    pub fn succeeded(mut self, elapsed: Duration) {
        self.ended = self.registry.end_call(&self.name, elapsed, true).is_ok();
    }

    /// Counts the call as an error and finishes it (one write).
    pub fn failed(mut self, elapsed: Duration) {
        self.ended = self.registry.end_call(&self.name, elapsed, false).is_ok();
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.ended {
            // Fails only if someone else already called `finish` for this
            // call; nothing useful to do about that in a destructor.
            let _ = self.registry.finish(&self.name);
        }
    }
}

/// An immutable view of every plugin, sorted by name. Cloning is one `Arc`
/// clone.
#[derive(Clone)]
pub struct Snapshot {
    generation: u64,
    plugins: Arc<Vec<(Arc<str>, Arc<Entry>)>>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("plugins", &self.plugins.len())
            .finish()
    }
}

impl Snapshot {
    /// The registry's generation when this snapshot was taken.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn entry(&self, name: &str) -> Option<&(Arc<str>, Arc<Entry>)> {
        self.plugins
            .binary_search_by(|(key, _)| (**key).cmp(name))
            .ok()
            .and_then(|i| self.plugins.get(i))
    }

    /// One plugin's status (uptime measured now).
    pub fn get(&self, name: &str) -> Option<PluginStatus> {
        let now = Instant::now();
        self.entry(name).map(|(key, entry)| entry.status(key, now))
    }

    /// One plugin's state.
    pub fn state(&self, name: &str) -> Option<PluginLifecycleState> {
        self.entry(name).map(|(_, entry)| entry.state)
    }

    /// One plugin's registered info.
    pub fn info(&self, name: &str) -> Option<PluginInfo> {
        self.entry(name)
            .map(|(_, entry)| PluginInfo::clone(&entry.info))
    }

    /// One plugin's transition history, oldest first.
    pub fn history(&self, name: &str) -> Option<Vec<Transition>> {
        self.entry(name)
            .map(|(_, entry)| entry.history.iter().cloned().collect())
    }

    /// One plugin's failure journal, oldest first.
    pub fn journal(&self, name: &str) -> Option<Vec<JournalEntry>> {
        self.entry(name)
            .map(|(_, entry)| entry.journal.iter().cloned().collect())
    }

    /// Every plugin's status, sorted by name (uptimes measured at one instant).
    pub fn statuses(&self) -> Vec<PluginStatus> {
        let now = Instant::now();
        self.plugins
            .iter()
            .map(|(key, entry)| entry.status(key, now))
            .collect()
    }

    /// Every registered name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.plugins
            .iter()
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// Names of the plugins that can take tool calls, sorted.
    pub fn available(&self) -> Vec<String> {
        self.plugins
            .iter()
            .filter(|(_, entry)| entry.state.is_available())
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// Whether a plugin of that name is in this snapshot.
    pub fn contains(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }

    /// Number of plugins.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether there are no plugins.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::time::Duration;

    use chrono::DateTime;
    use forgesyte_errors::{DependencyError, InitError, LoadError, PluginError};

    use super::Registry;
    use crate::PluginLifecycleState::{Failed, Initialized, Loaded, Running, Unavailable};
    use crate::{HISTORY_LEN, PluginInfo, PluginLifecycleState, RegistryError};

    fn info(description: &str, version: &str) -> PluginInfo {
        PluginInfo {
            description: Some(description.to_owned()),
            version: Some(version.to_owned()),
            source: Some(PathBuf::from("/plugins/x")),
        }
    }

    /// A registry holding `name`, brought to `state` through legal moves.
    fn registry_with(name: &str, state: PluginLifecycleState) -> Registry {
        let registry = Registry::new();
        registry.register(name, PluginInfo::default()).unwrap();
        match state {
            Loaded => {}
            Initialized => registry.mark_initialized(name).unwrap(),
            Running => {
                registry.mark_initialized(name).unwrap();
                registry.mark_running(name).unwrap();
            }
            Failed => registry.mark_failed(name, "InitError: boom").unwrap(),
            Unavailable => registry
                .mark_unavailable(name, "Missing dependencies: libfoo")
                .unwrap(),
        }
        assert_eq!(registry.get_state(name), Some(state));
        registry
    }

    fn is_rfc3339_utc(text: &str) -> bool {
        DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z')
    }

    #[test]
    fn register_starts_loaded_with_info_and_zero_metrics() {
        let registry = Registry::new();
        assert!(registry.is_empty());
        registry
            .register("ocr", info("reads text", "1.2.0"))
            .unwrap();
        let status = registry.get_status("ocr").unwrap();
        assert_eq!(status.name, "ocr");
        assert_eq!(status.state, Loaded);
        assert_eq!(status.description.as_deref(), Some("reads text"));
        assert_eq!(status.version.as_deref(), Some("1.2.0"));
        assert_eq!(status.reason, None);
        assert_eq!(status.last_used, None);
        assert_eq!((status.success_count, status.error_count), (0, 0));
        assert_eq!(status.last_execution_time_ms, None);
        assert_eq!(status.avg_execution_time_ms, None);
        assert_eq!(status.in_flight, 0);
        assert!(status.uptime_seconds.is_some_and(|s| s >= 0.0));
        assert_eq!(registry.len(), 1);
        assert!(registry.contains("ocr"));
        assert_eq!(
            registry.info("ocr").unwrap().source,
            Some(PathBuf::from("/plugins/x"))
        );
        assert!(!registry.is_available("ocr"));
    }

    #[test]
    fn duplicate_register_is_an_error_and_keeps_the_first() {
        let registry = Registry::new();
        registry.register("ocr", info("first", "1")).unwrap();
        registry.mark_failed("ocr", "ImportError: x").unwrap();
        let generation = registry.generation();
        let error = registry.register("ocr", info("second", "2")).unwrap_err();
        assert_eq!(
            error,
            RegistryError::AlreadyRegistered { name: "ocr".into() }
        );
        let status = registry.get_status("ocr").unwrap();
        assert_eq!(status.description.as_deref(), Some("first"));
        assert_eq!(status.state, Failed);
        assert_eq!(status.reason.as_deref(), Some("ImportError: x"));
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.generation(), generation, "refused write published");
    }

    #[test]
    fn unknown_names_are_not_found_everywhere() {
        let registry = Registry::new();
        let not_found = || RegistryError::NotFound {
            name: "nope".into(),
        };
        assert_eq!(registry.mark_initialized("nope"), Err(not_found()));
        assert_eq!(registry.mark_running("nope"), Err(not_found()));
        assert_eq!(registry.finish("nope"), Err(not_found()));
        assert_eq!(registry.mark_failed("nope", "r"), Err(not_found()));
        assert_eq!(registry.mark_unavailable("nope", "r"), Err(not_found()));
        assert_eq!(registry.mark_loaded("nope", None), Err(not_found()));
        assert_eq!(
            registry.record_success("nope", Duration::ZERO),
            Err(not_found())
        );
        assert_eq!(
            registry.record_error("nope", Duration::ZERO),
            Err(not_found())
        );
        assert!(registry.begin_call("nope").is_err());
        assert_eq!(registry.get_status("nope"), None);
        assert_eq!(registry.get_state("nope"), None);
        assert_eq!(registry.history("nope"), None);
        assert!(!registry.is_available("nope"));
        assert_eq!(registry.generation(), 0);
    }

    #[test]
    fn mark_initialized_only_from_loaded() {
        let registry = registry_with("p", Loaded);
        registry.mark_initialized("p").unwrap();
        assert_eq!(registry.get_state("p"), Some(Initialized));
        assert!(registry.is_available("p"));
        for state in [Initialized, Running, Failed, Unavailable] {
            let registry = registry_with("p", state);
            assert_eq!(
                registry.mark_initialized("p"),
                Err(RegistryError::IllegalTransition {
                    from: state,
                    to: Initialized
                })
            );
            assert_eq!(registry.get_state("p"), Some(state));
        }
    }

    #[test]
    fn running_counts_calls_in_flight_and_last_one_out_goes_back() {
        let registry = registry_with("p", Initialized);
        registry.mark_running("p").unwrap();
        registry.mark_running("p").unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.in_flight), (Running, 2));
        assert!(status.last_used.as_deref().is_some_and(is_rfc3339_utc));
        registry.finish("p").unwrap();
        assert_eq!(registry.get_state("p"), Some(Running));
        registry.finish("p").unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.in_flight), (Initialized, 0));
        assert_eq!(
            registry.finish("p"),
            Err(RegistryError::NothingInFlight { name: "p".into() })
        );
    }

    #[test]
    fn mark_running_refuses_unavailable_states() {
        for state in [Loaded, Failed, Unavailable] {
            let registry = registry_with("p", state);
            assert_eq!(
                registry.mark_running("p"),
                Err(RegistryError::NotAvailable {
                    name: "p".into(),
                    state
                })
            );
            assert_eq!(registry.get_status("p").unwrap().in_flight, 0);
        }
    }

    #[test]
    fn failure_while_running_sticks_through_finish() {
        let registry = registry_with("p", Running);
        registry
            .mark_failed("p", "CrashError: killed by signal SIGSEGV (11)")
            .unwrap();
        assert!(!registry.is_available("p"));
        registry.finish("p").unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.in_flight), (Failed, 0));
        assert_eq!(
            status.reason.as_deref(),
            Some("CrashError: killed by signal SIGSEGV (11)")
        );
    }

    #[test]
    fn mark_failed_is_legal_from_every_state_but_unavailable() {
        for state in [Loaded, Initialized, Running] {
            let registry = registry_with("p", state);
            registry.mark_failed("p", "ImportError: gone").unwrap();
            let status = registry.get_status("p").unwrap();
            assert_eq!(status.state, Failed);
            assert_eq!(status.reason.as_deref(), Some("ImportError: gone"));
        }
        let registry = registry_with("p", Unavailable);
        assert_eq!(
            registry.mark_failed("p", "x"),
            Err(RegistryError::IllegalTransition {
                from: Unavailable,
                to: Failed
            })
        );
        assert_eq!(
            registry.get_status("p").unwrap().reason.as_deref(),
            Some("Missing dependencies: libfoo")
        );
    }

    #[test]
    fn mark_failed_again_replaces_the_reason_without_a_transition() {
        let registry = registry_with("p", Failed);
        let transitions = registry.history("p").unwrap().len();
        registry.mark_failed("p", "InitError: second").unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!(status.state, Failed);
        assert_eq!(status.reason.as_deref(), Some("InitError: second"));
        assert_eq!(registry.history("p").unwrap().len(), transitions);
    }

    #[test]
    fn mark_unavailable_from_loaded_and_initialized_only() {
        for state in [Loaded, Initialized, Unavailable] {
            let registry = registry_with("p", state);
            registry
                .mark_unavailable("p", "Missing dependencies: GPU (CUDA driver not found)")
                .unwrap();
            let status = registry.get_status("p").unwrap();
            assert_eq!(status.state, Unavailable);
            assert!(status.reason.as_deref().is_some_and(|r| r.contains("GPU")));
        }
        for state in [Running, Failed] {
            let registry = registry_with("p", state);
            assert_eq!(
                registry.mark_unavailable("p", "x"),
                Err(RegistryError::IllegalTransition {
                    from: state,
                    to: Unavailable
                })
            );
        }
    }

    #[test]
    fn mark_error_routes_dependency_errors_to_unavailable() {
        let registry = registry_with("dep", Loaded);
        let missing = PluginError::from(LoadError::from(DependencyError::new(
            vec!["lib:foo".into(), "bin:bar".into()],
            None,
        )));
        registry.mark_error("dep", &missing).unwrap();
        let status = registry.get_status("dep").unwrap();
        assert_eq!(status.state, Unavailable);
        assert_eq!(
            status.reason.as_deref(),
            Some("Missing dependencies: lib:foo, bin:bar")
        );

        let registry = registry_with("init", Loaded);
        let init = PluginError::from(LoadError::from(InitError::Failed {
            message: "no model".into(),
        }));
        registry.mark_error("init", &init).unwrap();
        let status = registry.get_status("init").unwrap();
        assert_eq!(status.state, Failed);
        assert_eq!(status.reason.as_deref(), Some("InitError: no model"));
    }

    #[test]
    fn mark_loaded_reloads_clears_reason_keeps_metrics() {
        let registry = registry_with("p", Initialized);
        registry.mark_running("p").unwrap();
        registry
            .record_success("p", Duration::from_millis(5))
            .unwrap();
        registry
            .record_error("p", Duration::from_millis(7))
            .unwrap();
        registry.finish("p").unwrap();
        registry
            .mark_failed("p", "CrashError: exited with code 3")
            .unwrap();

        registry
            .mark_loaded("p", Some(info("reloaded", "2.0.0")))
            .unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!(status.state, Loaded);
        assert_eq!(status.reason, None);
        assert_eq!((status.success_count, status.error_count), (1, 1));
        assert_eq!(status.avg_execution_time_ms, Some(6.0));
        assert_eq!(status.version.as_deref(), Some("2.0.0"));

        // LOADED again: only the info changes; keeping info when None.
        registry.mark_loaded("p", None).unwrap();
        assert_eq!(
            registry.get_status("p").unwrap().version.as_deref(),
            Some("2.0.0")
        );

        for state in [Initialized, Unavailable] {
            let registry = registry_with("q", state);
            registry.mark_loaded("q", None).unwrap();
            assert_eq!(registry.get_state("q"), Some(Loaded));
        }
        let registry = registry_with("r", Running);
        assert_eq!(
            registry.mark_loaded("r", None),
            Err(RegistryError::IllegalTransition {
                from: Running,
                to: Loaded
            })
        );
    }

    #[test]
    fn record_success_and_error_count_and_time_without_changing_state() {
        let registry = registry_with("p", Initialized);
        registry
            .record_success("p", Duration::from_millis(10))
            .unwrap();
        registry
            .record_error("p", Duration::from_micros(2500))
            .unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!(status.state, Initialized);
        assert_eq!((status.success_count, status.error_count), (1, 1));
        assert_eq!(status.last_execution_time_ms, Some(2.5));
        assert_eq!(status.avg_execution_time_ms, Some(6.25));
        assert!(status.last_used.as_deref().is_some_and(is_rfc3339_utc));

        // Counting is allowed whatever the state: a call can end after a fault.
        registry.mark_failed("p", "TimeoutError: x").unwrap();
        registry
            .record_error("p", Duration::from_millis(1))
            .unwrap();
        assert_eq!(registry.get_status("p").unwrap().error_count, 2);
    }

    #[test]
    fn average_is_the_mean_of_the_last_ten_calls() {
        let registry = registry_with("p", Initialized);
        for ms in 1..=15u64 {
            let elapsed = Duration::from_millis(ms * 10);
            if ms % 3 == 0 {
                registry.record_error("p", elapsed).unwrap();
            } else {
                registry.record_success("p", elapsed).unwrap();
            }
        }
        let status = registry.get_status("p").unwrap();
        // Last ten: 60..=150 ms, mean 105 ms.
        assert_eq!(status.avg_execution_time_ms, Some(105.0));
        assert_eq!(status.last_execution_time_ms, Some(150.0));
        assert_eq!((status.success_count, status.error_count), (10, 5));
    }

    #[test]
    fn last_used_is_rfc3339_utc_and_does_not_go_back() {
        let registry = registry_with("p", Initialized);
        registry.record_success("p", Duration::ZERO).unwrap();
        let first = registry.get_status("p").unwrap().last_used.unwrap();
        registry.mark_running("p").unwrap();
        let second = registry.get_status("p").unwrap().last_used.unwrap();
        assert!(is_rfc3339_utc(&first), "{first}");
        let parse = |s: &str| DateTime::parse_from_rfc3339(s).unwrap();
        assert!(parse(&second) >= parse(&first));
    }

    #[test]
    fn status_json_has_every_spec_key_with_null_where_unknown() {
        let registry = registry_with("p", Loaded);
        let json = serde_json::to_value(registry.get_status("p").unwrap()).unwrap();
        let object = json.as_object().unwrap();
        let spec_keys = [
            "name",
            "state",
            "description",
            "reason",
            "version",
            "uptime_seconds",
            "last_used",
            "success_count",
            "error_count",
            "last_execution_time_ms",
            "avg_execution_time_ms",
        ];
        for key in spec_keys {
            assert!(object.contains_key(key), "missing key {key}");
        }
        let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
        let extra: Vec<_> = keys.difference(&spec_keys.into()).copied().collect();
        assert_eq!(
            extra,
            [
                "confinement",
                "in_flight",
                "last_exit_reason",
                "next_retry_at",
                "restart_count",
                "signature"
            ]
        );
        for key in [
            "description",
            "reason",
            "version",
            "last_exit_reason",
            "signature",
            "next_retry_at",
            "confinement",
            "last_used",
            "last_execution_time_ms",
            "avg_execution_time_ms",
        ] {
            assert!(object[key].is_null(), "{key} should be null: {json}");
        }
        assert_eq!(object["state"], "LOADED");
        assert_eq!(object["success_count"], 0);
        assert!(object["uptime_seconds"].is_f64());

        let round_trip: crate::PluginStatus = serde_json::from_value(json).unwrap();
        assert_eq!(round_trip.name, "p");
    }

    #[test]
    fn status_json_reason_is_kept_verbatim() {
        let registry = registry_with("p", Loaded);
        let reason = "ImportError: cannot open /p/libx.so: \"bad\" ✗ ELF";
        registry.mark_failed("p", reason).unwrap();
        let json = serde_json::to_value(registry.get_status("p").unwrap()).unwrap();
        assert_eq!(json["state"], "FAILED");
        assert_eq!(json["reason"], reason);
    }

    #[test]
    fn lists_are_sorted_and_availability_follows_state() {
        let registry = Registry::new();
        for name in ["zeta", "alpha", "Mid", "beta", "gamma"] {
            registry.register(name, PluginInfo::default()).unwrap();
        }
        registry.mark_initialized("zeta").unwrap();
        registry.mark_initialized("beta").unwrap();
        registry.mark_running("beta").unwrap();
        registry.mark_failed("alpha", "ImportError: x").unwrap();
        registry
            .mark_unavailable("gamma", "Missing dependencies: y")
            .unwrap();

        let names: Vec<_> = registry.list_all().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["Mid", "alpha", "beta", "gamma", "zeta"]);
        assert_eq!(registry.list_available(), ["beta", "zeta"]);
        for status in registry.list_all() {
            assert_eq!(
                registry.is_available(&status.name),
                status.state.is_available()
            );
        }
    }

    #[test]
    fn history_records_transitions_oldest_first_and_keeps_the_last_sixteen() {
        let registry = registry_with("p", Loaded);
        registry.mark_initialized("p").unwrap();
        registry.mark_running("p").unwrap();
        registry.mark_running("p").unwrap(); // not a transition
        registry.mark_failed("p", "CrashError: x").unwrap();
        let history = registry.history("p").unwrap();
        let moves: Vec<_> = history.iter().map(|t| (t.from, t.to)).collect();
        // The INITIALIZED -> RUNNING move of a tool call is not history.
        assert_eq!(
            moves,
            [
                (None, Loaded),
                (Some(Loaded), Initialized),
                (Some(Running), Failed),
            ]
        );
        assert_eq!(history[2].reason.as_deref(), Some("CrashError: x"));
        assert!(history.iter().all(|t| is_rfc3339_utc(&t.at)));

        for _ in 0..20 {
            registry.mark_loaded("p", None).unwrap();
            registry.mark_failed("p", "again").unwrap();
        }
        let history = registry.history("p").unwrap();
        assert_eq!(history.len(), HISTORY_LEN);
        assert_eq!(history.last().map(|t| t.to), Some(Failed));
        assert_eq!(history.first().map(|t| t.from), Some(Some(Failed)));
    }

    #[test]
    fn end_call_counts_and_finishes_in_one_write() {
        let registry = registry_with("p", Initialized);
        registry.mark_running("p").unwrap();
        registry.mark_running("p").unwrap();
        let generation = registry.generation();
        registry
            .end_call("p", Duration::from_millis(4), true)
            .unwrap();
        assert_eq!(registry.generation(), generation + 1);
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.in_flight), (Running, 1));
        registry
            .end_call("p", Duration::from_millis(2), false)
            .unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.in_flight), (Initialized, 0));
        assert_eq!((status.success_count, status.error_count), (1, 1));
        assert_eq!(status.avg_execution_time_ms, Some(3.0));
        // Nothing in flight: refused, nothing counted.
        assert!(matches!(
            registry.end_call("p", Duration::from_millis(1), true),
            Err(RegistryError::NothingInFlight { .. })
        ));
        assert_eq!(registry.get_status("p").unwrap().success_count, 1);
    }

    #[test]
    fn snapshots_are_frozen_and_generation_counts_writes() {
        let registry = registry_with("p", Loaded);
        let before = registry.snapshot();
        assert_eq!(before.generation(), 1);
        registry.mark_initialized("p").unwrap();
        registry.register("q", PluginInfo::default()).unwrap();
        assert_eq!(registry.generation(), 3);
        assert_eq!(before.state("p"), Some(Loaded));
        assert_eq!(before.len(), 1);
        assert!(!before.contains("q"));
        let after = registry.snapshot();
        assert_eq!(after.names(), ["p", "q"]);
        assert_eq!(after.available(), ["p"]);
        assert_eq!(after.statuses().len(), 2);
        assert_eq!(after.get("p").map(|s| s.state), Some(Initialized));
        assert!(after.info("q").is_some());
        assert!(after.history("q").is_some());
        // A refused write publishes nothing.
        assert!(registry.mark_running("q").is_err());
        assert_eq!(registry.generation(), 3);
    }

    #[test]
    fn clones_share_one_registry() {
        let registry = Registry::new();
        let clone = registry.clone();
        clone.register("p", PluginInfo::default()).unwrap();
        assert!(registry.contains("p"));
        assert!(format!("{registry:?}").contains("plugins: 1"));
    }

    #[test]
    fn call_guard_finishes_on_drop_and_records_outcomes() {
        let registry = registry_with("p", Initialized);
        {
            let call = registry.begin_call("p").unwrap();
            assert_eq!(call.name(), "p");
            assert_eq!(registry.get_state("p"), Some(Running));
            call.succeeded(Duration::from_millis(4));
        }
        let guard = registry.begin_call("p").unwrap();
        guard.failed(Duration::from_millis(6));
        {
            let _dropped = registry.begin_call("p").unwrap();
        }
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.in_flight), (Initialized, 0));
        assert_eq!((status.success_count, status.error_count), (1, 1));
        assert_eq!(status.avg_execution_time_ms, Some(5.0));
    }

    #[test]
    fn crash_restart_and_journal() {
        let registry = registry_with("p", Initialized);
        registry.mark_running("p").unwrap();
        let exit = crate::ExitInfo {
            description: Some("killed by signal SIGSEGV (11)".into()),
            signal: Some("SIGSEGV".into()),
            code: None,
            stderr_tail: vec!["last words".into()],
        };
        registry
            .mark_crashed("p", "CrashError: killed by signal SIGSEGV (11)", exit)
            .unwrap();
        let at = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
        registry.set_next_retry("p", Some(at)).unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!(status.state, Failed);
        assert_eq!(
            status.last_exit_reason.as_deref(),
            Some("killed by signal SIGSEGV (11)")
        );
        assert_eq!(
            status.next_retry_at.as_deref(),
            Some("1970-01-02T00:00:00.000Z")
        );
        assert_eq!(status.restart_count, 0);

        registry.mark_restarting("p").unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!((status.state, status.restart_count), (Loaded, 1));
        assert_eq!(status.next_retry_at, None);
        assert_eq!(status.reason, None);
        // The exit reason outlives the restart.
        assert!(status.last_exit_reason.is_some());
        // Only from FAILED.
        assert_eq!(
            registry.mark_restarting("p"),
            Err(RegistryError::IllegalTransition {
                from: Loaded,
                to: Loaded
            })
        );

        registry.mark_failed("p", "InitError: boom").unwrap();
        // Same reason again: no new journal entry.
        registry.mark_failed("p", "InitError: boom").unwrap();
        let journal = registry.journal("p").unwrap();
        let summary: Vec<_> = journal
            .iter()
            .map(|j| (j.state, j.reason.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    Failed,
                    "CrashError: killed by signal SIGSEGV (11)".to_owned()
                ),
                (Loaded, "restart 1".to_owned()),
                (Failed, "InitError: boom".to_owned()),
            ]
        );
        assert_eq!(journal[0].exit_signal.as_deref(), Some("SIGSEGV"));
        assert_eq!(journal[0].stderr_tail, ["last words"]);
        assert!(journal.iter().all(|j| is_rfc3339_utc(&j.at)));

        for i in 0..30 {
            registry
                .mark_crashed("p", format!("x{i}"), crate::ExitInfo::default())
                .unwrap();
        }
        let journal = registry.journal("p").unwrap();
        assert_eq!(journal.len(), crate::JOURNAL_LEN);
        assert_eq!(journal.last().unwrap().reason.as_deref(), Some("x29"));
        assert_eq!(registry.journal("nope"), None);

        let registry = registry_with("u", Unavailable);
        assert!(
            registry
                .mark_crashed("u", "x", crate::ExitInfo::default())
                .is_err()
        );
        assert_eq!(registry.journal("u").unwrap().len(), 1);
    }

    #[test]
    fn uptime_does_not_go_backwards() {
        let registry = registry_with("p", Loaded);
        let first = registry.get_status("p").unwrap().uptime_seconds.unwrap();
        let second = registry.get_status("p").unwrap().uptime_seconds.unwrap();
        assert!(second >= first && first >= 0.0);
    }
}
