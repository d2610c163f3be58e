//! The [`Loader`] itself: its state, constructors, accessors and the
//! retirement of isolated plugins when it lets them go.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_deps::{DependencyChecker, FileSystem, RealFs};
use forgesyte_registry::Registry;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;

use super::config::LoaderConfig;
use super::pass_cache::PassCache;
use crate::entry_points::EntryPoint;
use crate::handle::PluginHandle;
use crate::host::{Importer, PluginInstance};
use crate::manifest::{Isolation, Manifest, Runtime};
use crate::native::NativeImporter;
use crate::supervise::{Clock, ShutdownFlag, SystemClock};

/// What the loader keeps per registered plugin.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) dir: PathBuf,
    pub(super) raw: Option<Arc<Value>>,
    pub(super) optional: bool,
    pub(super) handle: Option<PluginHandle>,
    /// The tool ids of its last instance, kept while it has none (a
    /// reload between the old instance and the new one, or after it, when
    /// the new one failed); cleared when it has one again.
    pub(super) last_tools: Option<Arc<[String]>>,
    /// The manifest's runtime and declared isolation, when it was valid.
    pub(super) placement: Option<(Runtime, Option<Isolation>)>,
    /// Whether the manifest, when it was valid, requires a GPU, and the
    /// plugins its `plugin:` dependencies name: what `--no-gpu` readiness
    /// walks ([`needs_a_gpu`]).
    pub(super) requires_gpu: bool,
    /// Its manifest's `plugin:` dependencies (name and version
    /// requirement).
    pub(super) plugin_deps: Vec<forgesyte_deps::Dependency>,
}

impl Entry {
    /// A just-registered plugin's entry: no instance yet, and what its
    /// manifest says when it was valid.
    pub(super) fn registered<E>(
        dir: PathBuf,
        raw: Option<Arc<Value>>,
        optional: bool,
        manifest: &Result<Manifest, E>,
    ) -> Entry {
        let mut entry = Entry {
            dir,
            raw,
            optional,
            handle: None,
            last_tools: None,
            placement: None,
            requires_gpu: false,
            plugin_deps: Vec::new(),
        };
        entry.describe(manifest.as_ref().ok());
        entry
    }

    /// Takes what the loader keeps of `manifest` (`None`: not valid).
    pub(super) fn describe(&mut self, manifest: Option<&Manifest>) {
        self.placement = manifest.map(|m| (m.runtime, m.declared_isolation));
        self.requires_gpu =
            manifest.is_some_and(|m| m.requirements.gpu != forgesyte_deps::GpuRequirement::None);
        self.plugin_deps = manifest
            .into_iter()
            .flat_map(|m| &m.requirements.dependencies)
            .filter(|d| matches!(d, forgesyte_deps::Dependency::Plugin { .. }))
            .cloned()
            .collect();
    }

    /// The names of the plugins its `plugin:` dependencies name.
    pub(super) fn plugin_dep_names(&self) -> impl Iterator<Item = &str> {
        self.plugin_deps.iter().filter_map(plugin_dep_name)
    }
}

/// The plugin a `plugin:` dependency names (`None` for another kind).
pub(super) fn plugin_dep_name(dep: &forgesyte_deps::Dependency) -> Option<&str> {
    match dep {
        forgesyte_deps::Dependency::Plugin { name, .. } => Some(name),
        _ => None,
    }
}

/// Whether the plugin of `entry` requires a GPU, itself or through the
/// plugins its `plugin:` dependencies name (directly or through others; a
/// cycle is walked once).
fn needs_a_gpu(entries: &BTreeMap<String, Entry>, entry: &Entry) -> bool {
    let mut seen = std::collections::BTreeSet::new();
    let mut next = vec![entry];
    while let Some(entry) = next.pop() {
        if entry.requires_gpu {
            return true;
        }
        next.extend(
            entry
                .plugin_dep_names()
                .filter(|name| seen.insert(*name))
                .filter_map(|name| entries.get(name)),
        );
    }
    false
}

/// Loads plugin directories into a [`Registry`] and owns the live instances.
#[derive(Debug)]
pub struct Loader {
    pub(super) registry: Registry,
    pub(super) checker: Arc<DependencyChecker>,
    pub(super) fs: Arc<dyn FileSystem>,
    pub(super) importer: Arc<dyn Importer>,
    pub(super) config: LoaderConfig,
    pub(super) entries: RwLock<BTreeMap<String, Entry>>,
    /// The directory of the last `load_all`, where `reload_all` looks for
    /// new plugins.
    pub(super) plugins_dir: RwLock<Option<PathBuf>>,
    /// The entry point each plugin loaded from one was registered from, by
    /// registry key.
    pub(super) entry_points: RwLock<BTreeMap<String, EntryPoint>>,
    /// Why the last entry-point discovery failed, if it did.
    pub(super) entry_points_error: RwLock<Option<String>>,
    /// Time for the supervisors of isolated plugins.
    pub(super) clock: Arc<dyn Clock>,
    /// Set by [`shutdown`](Loader::shutdown); shared with every supervisor.
    pub(super) shutdown: ShutdownFlag,
    /// Each plugin directory's change stamp as of the last pass, by
    /// registry key (see `rescan`).
    pub(super) stamps: RwLock<BTreeMap<String, Option<u64>>>,
    /// Change stamps taken this load or rescan before a plugin directory's
    /// files were read (by directory), for [`restamp`](Self::restamp): a
    /// file changed while its plugin loaded then still differs from the
    /// stamp the next rescan compares with.
    pub(super) fresh_stamps: Mutex<HashMap<PathBuf, Option<u64>>>,
    /// What the current pass looks up once (canonical parents, lock files).
    pub(super) pass: PassCache,
    /// Checked library bytes waiting for their load (`verified.rs`).
    pub(super) checked_bytes: Arc<super::verified::ByteBudget>,
    /// The keys signatures are checked against: the configured ones, read
    /// again from their directory by every rescan (`rescan.rs`).
    pub(super) trusted_keys: RwLock<crate::signature::TrustedKeys>,
    /// Isolated instances a reload or rescan let go whose processes may
    /// still be stopping: [`drop_instances`](Self::drop_instances) waits
    /// for them too. Pruned of ended ones at every addition.
    pub(super) stopping: Mutex<Vec<Arc<dyn PluginInstance>>>,
    /// In-process instances a reload or rescan let go whose destructors
    /// ran past [`DESTRUCTOR_WAIT`]: what each tells when it is done;
    /// [`drop_instances`](Self::drop_instances) waits for them too, so a
    /// stop does not cut a destructor off (a flush, a join). Pruned of
    /// ended ones at every addition.
    pub(super) unloading: Mutex<Vec<std::sync::mpsc::Receiver<()>>>,
    /// Every runner this loader's plugins started that has not ended (in a
    /// load pass, a reload, a restart, serving or stopping): what
    /// [`drop_instances`](Self::drop_instances) ends last.
    pub(super) runners: Arc<crate::process::Runners>,
    /// In-process plugins whose constructor a pass gave up on and that has
    /// not returned, by registry key: such a plugin is not constructed
    /// again until it does (each reload left one more thread behind).
    pub(super) stuck: Mutex<BTreeMap<String, super::construction::Stuck>>,
    /// Libraries found on `--lib-path` (outside their plugin's directory,
    /// so outside its change stamp), by plugin: the path and the file's
    /// identity when it was resolved. A rescan or a reload by name that
    /// finds the file changed loads the plugin again (a rebuild was never
    /// picked up without a restart).
    pub(super) outside_libraries: Mutex<BTreeMap<String, (PathBuf, Option<FileIdentity>)>>,
    /// Plugins whose last load failed for want of the host's own
    /// resources, with the reason recorded then (`host_short.rs`): tried
    /// again by [`retry_host_short`](Self::retry_host_short).
    pub(super) host_short: Mutex<BTreeMap<String, String>>,
    /// The plugins (and a hash of their manifests) whose unused manifest
    /// fields were said at WARN (`instantiate::say_manifest_notes`).
    pub(super) manifest_noted: Mutex<std::collections::HashSet<(String, u64)>>,
    /// Each plugin's manifest notes of its latest load
    /// ([`Loader::manifest_notes`]), for `check` to print.
    pub(super) manifest_notes: Mutex<HashMap<String, Vec<String>>>,
    /// In-process plugins' libraries opened by path for a construction
    /// that has not succeeded (yet), by plugin: a retry of one that failed,
    /// its file unchanged, is constructed again from that mapping
    /// (`instantiate.rs`), not from one more copy of it (each retry of a
    /// FAILED plugin mapped another, about 1 MB, for good).
    pub(super) failed_libraries: Mutex<HashMap<String, FailedLibrary>>,
}

/// See [`Loader::failed_libraries`].
#[derive(Debug)]
pub(super) struct FailedLibrary {
    /// Where it was opened from, and that file's identity then.
    pub(super) path: PathBuf,
    pub(super) file: Option<FileIdentity>,
    pub(super) library: Arc<dyn crate::host::PluginLibrary>,
}

/// What tells one version of a file from the next: device, inode, size,
/// modification and change times (a rebuild in place or by a rename
/// changes one of them).
pub(super) type FileIdentity = (u64, u64, u64, i64, i64, i64, i64);

/// The [`FileIdentity`] of `path` (links followed); `None` when it cannot
/// be read.
pub(super) fn file_identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// A manifest that was read and validated, waiting to be loaded.
pub(super) struct Pending {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) manifest: Manifest,
    pub(super) started: Instant,
}

impl Loader {
    /// A loader over the real filesystem and real libraries.
    pub fn new(registry: Registry, checker: Arc<DependencyChecker>, config: LoaderConfig) -> Self {
        Self::with_seams(
            registry,
            checker,
            Arc::new(RealFs),
            Arc::new(NativeImporter),
            config,
        )
    }

    /// A loader over the given filesystem and importer (fakes in tests).
    pub fn with_seams(
        registry: Registry,
        checker: Arc<DependencyChecker>,
        fs: Arc<dyn FileSystem>,
        importer: Arc<dyn Importer>,
        config: LoaderConfig,
    ) -> Self {
        Loader {
            registry,
            checker,
            fs,
            importer,
            trusted_keys: RwLock::new(config.trusted_keys.clone()),
            config,
            entries: RwLock::new(BTreeMap::new()),
            plugins_dir: RwLock::new(None),
            entry_points: RwLock::new(BTreeMap::new()),
            entry_points_error: RwLock::new(None),
            clock: Arc::new(SystemClock),
            shutdown: ShutdownFlag::default(),
            runners: Arc::default(),
            stuck: Mutex::default(),
            stamps: RwLock::new(BTreeMap::new()),
            fresh_stamps: Mutex::new(HashMap::new()),
            pass: PassCache::default(),
            checked_bytes: Arc::default(),
            stopping: Mutex::new(Vec::new()),
            unloading: Mutex::default(),
            outside_libraries: Mutex::default(),
            host_short: Mutex::default(),
            manifest_noted: Mutex::default(),
            manifest_notes: Mutex::default(),
            failed_libraries: Mutex::default(),
        }
    }

    /// The registry this loader records into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The dependency checker (for its GPU report).
    pub fn checker(&self) -> &DependencyChecker {
        &self.checker
    }

    /// A handle on the loaded instance of `name`, if it was instantiated.
    pub fn handle(&self, name: &str) -> Option<PluginHandle> {
        self.entries.read().get(name)?.handle.clone()
    }

    /// Whether `tool` is a tool of `name`'s live instance: `Some(true)` or
    /// `Some(false)`. While it has none (a reload in progress, or one that
    /// failed), `Some(true)` when its last instance offered it, else `None`
    /// (ask its manifest); `None` too when it is not registered.
    pub fn offers_tool(&self, name: &str, tool: &str) -> Option<bool> {
        let entries = self.entries.read();
        let entry = entries.get(name)?;
        match &entry.handle {
            Some(handle) => Some(handle.has_tool(tool)),
            None => entry
                .last_tools
                .as_deref()?
                .iter()
                .any(|t| t == tool)
                .then_some(true),
        }
    }

    /// What runs `name` and where, from its manifest and the loader's
    /// default isolation: Python plugins always in a process of their
    /// own; `None` when it is not registered or its manifest was invalid.
    pub fn placement(&self, name: &str) -> Option<(Runtime, Isolation)> {
        let (runtime, declared) = self.entries.read().get(name)?.placement?;
        let isolation = match runtime {
            Runtime::Python => Isolation::Process,
            Runtime::Native => declared.unwrap_or(self.config.default_isolation),
        };
        Some((runtime, isolation))
    }

    /// The manifest of `name` as read (unknown fields kept), if it was valid JSON.
    pub fn manifest(&self, name: &str) -> Option<Arc<Value>> {
        self.entries.read().get(name)?.raw.clone()
    }

    /// The directory `name` was loaded from.
    pub fn plugin_dir(&self, name: &str) -> Option<PathBuf> {
        Some(self.entries.read().get(name)?.dir.clone())
    }

    /// The plugin registered from a plugin directory named `dir_name`
    /// under another name (its manifest's), if one is: what a 404 for the
    /// directory's name points to.
    pub fn plugin_of_directory(&self, dir_name: &str) -> Option<String> {
        self.entries
            .read()
            .iter()
            .find(|(name, e)| {
                name.as_str() != dir_name
                    && e.dir.file_name() == Some(std::ffi::OsStr::new(dir_name))
            })
            .map(|(name, _)| name.clone())
    }

    /// The entry point `name` was loaded from, when it is an installed
    /// Python plugin ([`LoaderConfig::python_entry_points`]).
    pub fn entry_point(&self, name: &str) -> Option<EntryPoint> {
        self.entry_points.read().get(name).cloned()
    }

    /// Why the last pass could not list the installed Python plugins (the
    /// interpreter is missing, failed, timed out or answered nonsense), if
    /// it could not; `None` when it could or was not asked to. There is no
    /// plugin to record this on, so it is logged as a warning and kept
    /// here (`forgesyte check` prints it).
    pub fn entry_points_error(&self) -> Option<String> {
        self.entry_points_error.read().clone()
    }

    /// Whether the plugins directory `dir` is allowed to be missing, and
    /// is: the default one, when the installed plugins are loaded
    /// ([`LoaderConfig::plugins_dir_optional`](super::LoaderConfig::plugins_dir_optional)).
    /// A pass or rescan that found it so did not fail.
    pub fn plugins_dir_missing_as_allowed(&self, dir: &Path) -> bool {
        self.config.plugins_dir_optional && !self.fs.exists(dir)
    }

    /// Whether `name` does not count for readiness: its manifest marks it
    /// optional, or, on a host that runs no GPU plugins
    /// ([`LoaderConfig::no_gpu`](super::LoaderConfig::no_gpu)), it requires
    /// a GPU itself or through its `plugin:` dependencies.
    pub fn is_optional(&self, name: &str) -> bool {
        let entries = self.entries.read();
        let Some(entry) = entries.get(name) else {
            return false;
        };
        entry.optional || (self.config.no_gpu && needs_a_gpu(&entries, entry))
    }

    /// The host is shutting down: from now on an isolated plugin whose
    /// process ends is recorded (FAILED, `not restarted: the host is
    /// shutting down`) but never restarted, restarts already waiting are
    /// dropped, no runner starts, and the runners still constructing their
    /// plugin (a load pass, a reload or a restart in progress) are killed,
    /// so that a hung construction does not hold the stop for its time
    /// limit. Plugins constructed keep serving calls until
    /// [`drop_instances`](Self::drop_instances). Cannot be undone.
    pub fn shutdown(&self) {
        self.shutdown.set();
        self.runners.stop_starting();
        for entry in self.entries.read().values() {
            if let Some(handle) = &entry.handle {
                handle.stop_restarts();
            }
        }
        tracing::info!("Loader shutting down: isolated plugins are no longer restarted");
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_set()
    }

    /// Drops every instance handle the loader holds (libraries stay mapped;
    /// isolated plugins' processes are stopped), and waits, at most
    /// `timeout` in all ([`crate::RUNNER_STOP_WAIT`] covers every grace,
    /// and a second more for the runners killed at its end),
    /// until those processes have ended and their process groups are
    /// killed: a host that exited first would leave what the plugins
    /// started running (a runner's group is killed by its host). One still
    /// running then is killed, with its group. Runners that were still
    /// starting (a load pass, a reload or a restart in progress) are killed
    /// at the end, with their groups, and none starts from the call on.
    /// In-process plugins' instances are dropped (their destructors run) on
    /// a thread of their own once every runner was asked to stop, waited
    /// for within `timeout` too: one whose destructor blocks holds neither
    /// the loader's map nor the runners' stop. Whether all of them ended
    /// in time.
    pub fn drop_instances(&self, timeout: Duration) -> bool {
        self.runners.close();
        let deadline = Instant::now() + timeout;
        // Taken out under the map's lock, dropped outside it.
        let handles: Vec<PluginHandle> = self
            .entries
            .write()
            .values_mut()
            .filter_map(|entry| entry.handle.take())
            .collect();
        let (isolated, in_process): (Vec<_>, Vec<_>) = handles
            .into_iter()
            .partition(|handle| handle.isolation() == Isolation::Process);
        let mut retired: Vec<_> = isolated.into_iter().map(|handle| handle.retire()).collect();
        retired.append(&mut self.stopping.lock());
        let unloaded = (!in_process.is_empty())
            .then(|| drop_on_a_thread(in_process))
            .flatten();
        let mut all = true;
        for instance in &retired {
            if !instance.wait_stopped(deadline.saturating_duration_since(Instant::now())) {
                all = false;
                instance.kill("not ended in time as the host stops");
            }
        }
        // And the destructors of instances a reload or a removal let go
        // that ran past their wait.
        let mut unloading: Vec<_> = std::mem::take(&mut *self.unloading.lock());
        unloading.extend(unloaded);
        let late = unloading
            .iter()
            .filter(|done| {
                done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .is_err()
            })
            .count();
        if late > 0 {
            tracing::warn!("In-process plugins' destructors did not end in time as the host stops");
            all = false;
        }
        // What no handle holds: runners still constructing their plugin,
        // and those let go that the lists above missed. (A killed runner's
        // end is processed within moments: a second is left for it.)
        let last = deadline.max(Instant::now() + Duration::from_secs(1));
        self.runners.end_all(last) && all
    }
}

/// How long a reload or a removal waits for the destructor of an
/// in-process instance it let go before it goes on: as long as a Python
/// runner gives its plugin's `on_unload` (`UNLOAD_GRACE_S`).
pub const DESTRUCTOR_WAIT: Duration = Duration::from_millis(1500);

/// Drops `value` (plugin instances, or what holds them: their destructors
/// run) on a thread of its own; what tells when that is done (`None`:
/// dropped here, when no thread could be started). The loader's reloads,
/// removals and stop use it, and so does a native runner at its stop.
pub(crate) fn drop_on_a_thread<T: Send + 'static>(
    value: T,
) -> Option<std::sync::mpsc::Receiver<()>> {
    let (done, dropped) = std::sync::mpsc::channel();
    // Not started: the closure, and `value` with it, is dropped here.
    let started = std::thread::Builder::new()
        .name("forgesyte-unload".into())
        .spawn(move || {
            drop(value);
            let _ = done.send(());
        });
    match started {
        Ok(_) => Some(dropped),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a thread to unload in-process plugins: unloading them here");
            None
        }
    }
}

impl Loader {
    /// Drops the handles of each plugin's in-process instance of `let_go`
    /// (name, handles), let go by a reload or a removal, each on a thread
    /// of its own, all at once, and waits at most [`DESTRUCTOR_WAIT`] for
    /// them together: an instance's destructor runs where its last handle
    /// drops, and one that blocked (a `Drop` joining a thread, flushing
    /// slowly) held the whole reload or rescan, every plugin after it, and
    /// the next pass (several such, one wait after another). One not done
    /// in time runs on by itself, and the host's stop waits for it
    /// ([`drop_instances`](Self::drop_instances)). (A handle held
    /// elsewhere, by a call past its time limit, drops its instance there.)
    pub(super) fn drop_let_go(&self, let_go: Vec<(String, Vec<PluginHandle>)>) {
        let dropping: Vec<_> = let_go
            .into_iter()
            .filter_map(|(name, handles)| Some((name, drop_on_a_thread(handles)?)))
            .collect();
        let deadline = Instant::now() + DESTRUCTOR_WAIT;
        let mut late = Vec::new();
        for (name, dropped) in dropping {
            let left = deadline.saturating_duration_since(Instant::now());
            if dropped.recv_timeout(left).is_ok() {
                continue;
            }
            tracing::warn!(plugin = %name, "Plugin {name}: the destructor of its old instance had not returned after {} s; going on without it (it runs on by itself, and the server's stop waits for it)", DESTRUCTOR_WAIT.as_secs_f64());
            late.push(dropped);
        }
        if late.is_empty() {
            return;
        }
        let mut unloading = self.unloading.lock();
        unloading
            .retain(|done| matches!(done.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)));
        unloading.extend(late);
    }
}

impl Drop for Loader {
    /// Stops the processes of isolated plugins (their handles stop working).
    fn drop(&mut self) {
        for entry in self.entries.get_mut().values() {
            if let Some(handle) = &entry.handle {
                retire_isolated(handle);
            }
        }
    }
}

impl Loader {
    /// Whether the library plugin `name` was last loaded from, found on
    /// `--lib-path`, is another file (or the same file changed) now.
    pub(super) fn outside_library_changed(&self, name: &str) -> bool {
        let outside = self.outside_libraries.lock();
        outside
            .get(name)
            .is_some_and(|(path, loaded)| file_identity(path) != *loaded)
    }

    /// Lets `handle` go (see [`PluginHandle::retire`]); an isolated
    /// instance is kept until its process has ended, so that a stopping
    /// host waits for it. Returns that instance (`None` in process), for a
    /// caller that must wait for its end.
    pub(super) fn retire(&self, handle: &PluginHandle) -> Option<Arc<dyn PluginInstance>> {
        let last = handle.retire();
        if handle.isolation() == Isolation::Process {
            let mut stopping = self.stopping.lock();
            stopping.retain(|instance| !instance.wait_stopped(Duration::ZERO));
            stopping.push(Arc::clone(&last));
            return Some(last);
        }
        None
    }
}

fn retire_isolated(handle: &PluginHandle) {
    if handle.isolation() == Isolation::Process {
        handle.retire();
    }
}
