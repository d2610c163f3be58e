//! The load pipeline (seed §3): discover → manifest → register → dependencies
//! → import → instantiate → INITIALIZED, with every failure recorded.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_deps::{Dependency, DependencyChecker, FileSystem, RealFs};
use forgesyte_errors::{DependencyError, ImportError, InitError, ManifestError, PluginError};
use forgesyte_registry::PluginLifecycleState as State;
use forgesyte_registry::{PluginInfo, PluginLifecycleState, Registry};
use parking_lot::RwLock;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::handle::PluginHandle;
use crate::host::Importer;
use crate::manifest::{self, Isolation, MANIFEST_FILE, Manifest};
use crate::native::NativeImporter;
use crate::process::{self, ProcessImporter, ProcessLimits};
use crate::supervise::{Restart, SupervisionPolicy, Supervisor};

/// How long a reload waits for calls in flight on a plugin to end.
const RELOAD_IDLE_WAIT: Duration = Duration::from_secs(5);

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Directories searched for a plugin library named by a bare file name
    /// when it is not in the plugin's own directory.
    pub lib_paths: Vec<PathBuf>,
    /// Cap on `manifest.json` size.
    pub max_manifest_bytes: u64,
    /// Worker threads for a load pass (at least 1).
    pub threads: usize,
    /// Where a plugin runs when its manifest has no `isolation`
    /// (default in-process).
    pub default_isolation: Isolation,
    /// The runner binary for isolated plugins and preflight; `None`:
    /// [`process::find_runner`] (`forgesyte-runner` next to the executable,
    /// else on `PATH`). A host binary that serves [`process::runner_main`]
    /// itself can name its own path.
    pub runner: Option<PathBuf>,
    /// Arguments put before the runner's own, e.g. `["__runner"]` when
    /// [`runner`](Self::runner) is the host binary itself serving
    /// [`process::runner_main`] behind a hidden subcommand.
    pub runner_args: Vec<std::ffi::OsString>,
    /// Limits of isolated plugins; a manifest's `limits` override them.
    pub process: ProcessLimits,
    /// When and how often crashed isolated plugins are restarted.
    pub supervision: SupervisionPolicy,
    /// Construct every in-process plugin once in a throw-away runner before
    /// loading it (a manifest's `"preflight": true` asks the same for one
    /// plugin): a constructor that crashes leaves the plugin FAILED instead
    /// of taking the host down.
    pub preflight: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            lib_paths: Vec::new(),
            max_manifest_bytes: manifest::DEFAULT_MAX_MANIFEST_BYTES,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            default_isolation: Isolation::InProcess,
            runner: None,
            runner_args: Vec::new(),
            process: ProcessLimits::default(),
            supervision: SupervisionPolicy::default(),
            preflight: false,
        }
    }
}

/// The outcome of loading one plugin directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginLoadOutcome {
    /// Registry key.
    pub name: String,
    /// The plugin directory.
    pub dir: PathBuf,
    /// State after the pass.
    pub state: PluginLifecycleState,
    /// Why it is not available, if it is not.
    pub reason: Option<String>,
    /// Time spent on this plugin (manifest to final state), in milliseconds.
    pub elapsed_ms: f64,
}

/// The outcome of a load pass, sorted by plugin name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// One entry per plugin directory with a manifest.
    pub plugins: Vec<PluginLoadOutcome>,
    /// Wall time of the whole pass, in milliseconds.
    pub elapsed_ms: f64,
}

impl LoadReport {
    fn count(&self, state: PluginLifecycleState) -> usize {
        self.plugins.iter().filter(|p| p.state == state).count()
    }
    /// Plugins that ended INITIALIZED.
    pub fn loaded(&self) -> usize {
        self.plugins
            .iter()
            .filter(|p| p.state.is_available())
            .count()
    }
    /// Plugins that ended FAILED.
    pub fn failed(&self) -> usize {
        self.count(PluginLifecycleState::Failed)
    }
    /// Plugins that ended UNAVAILABLE.
    pub fn unavailable(&self) -> usize {
        self.count(PluginLifecycleState::Unavailable)
    }

    /// The pass's one-line summary in the log (`verb`: "Loaded", "Reloaded").
    fn log_summary(&self, verb: &str, from: Option<&Path>) {
        let from = from
            .map(|dir| format!(" from {}", dir.display()))
            .unwrap_or_default();
        tracing::info!(
            loaded = self.loaded(),
            failed = self.failed(),
            unavailable = self.unavailable(),
            elapsed_ms = self.elapsed_ms,
            "{verb} {} plugins{from} ({} failed, {} unavailable)",
            self.loaded(),
            self.failed(),
            self.unavailable()
        );
    }
}

/// What the loader keeps per registered plugin.
#[derive(Debug, Clone)]
struct Entry {
    dir: PathBuf,
    raw: Option<Arc<Value>>,
    optional: bool,
    handle: Option<PluginHandle>,
}

/// Loads plugin directories into a [`Registry`] and owns the live instances.
#[derive(Debug)]
pub struct Loader {
    registry: Registry,
    checker: Arc<DependencyChecker>,
    fs: Arc<dyn FileSystem>,
    importer: Arc<dyn Importer>,
    config: LoaderConfig,
    entries: RwLock<BTreeMap<String, Entry>>,
    /// The directory of the last `load_all`, where `reload_all` looks for
    /// new plugins.
    plugins_dir: RwLock<Option<PathBuf>>,
}

/// A manifest that could not be validated, and the JSON it held, if any.
struct BadManifest {
    raw: Option<Value>,
    error: ManifestError,
}

/// A manifest that was read and validated, waiting to be loaded.
struct Pending {
    name: String,
    dir: PathBuf,
    manifest: Manifest,
    started: Instant,
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
            config,
            entries: RwLock::new(BTreeMap::new()),
            plugins_dir: RwLock::new(None),
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

    /// The manifest of `name` as read (unknown fields kept), if it was valid JSON.
    pub fn manifest(&self, name: &str) -> Option<Arc<Value>> {
        self.entries.read().get(name)?.raw.clone()
    }

    /// The directory `name` was loaded from.
    pub fn plugin_dir(&self, name: &str) -> Option<PathBuf> {
        Some(self.entries.read().get(name)?.dir.clone())
    }

    /// Whether the manifest of `name` marks it optional.
    pub fn is_optional(&self, name: &str) -> bool {
        self.entries.read().get(name).is_some_and(|e| e.optional)
    }

    /// Drops every instance handle the loader holds (libraries stay mapped;
    /// isolated plugins' processes are stopped).
    pub fn drop_instances(&self) {
        for entry in self.entries.write().values_mut() {
            if let Some(handle) = entry.handle.take() {
                retire_isolated(&handle);
            }
        }
    }

    /// Reloads one plugin (the server's `POST /v1/plugins/{name}/reload`):
    /// re-reads its manifest, re-checks its dependencies, and
    ///
    /// - an isolated plugin: stops its process (calls in flight fail, and
    ///   are waited for) and starts it afresh, whatever its state;
    /// - an in-process plugin that is INITIALIZED or RUNNING: keeps its
    ///   instance as it is (libraries are never unloaded: thread-local
    ///   destructors and code of the plugin may still run after its last
    ///   instance is gone, so `dlclose` is unsound; a new library version
    ///   needs a restart of the host);
    /// - an in-process plugin that is FAILED or UNAVAILABLE: is retried.
    ///
    /// `None` when no plugin of that name is registered.
    pub fn reload(&self, name: &str) -> Option<PluginLoadOutcome> {
        if !self.entries.read().contains_key(name) {
            return None;
        }
        self.reload_names(&[name.to_owned()])
            .plugins
            .into_iter()
            .find(|o| o.name == name)
    }

    /// Reloads every registered plugin as [`reload`](Self::reload) does, in
    /// dependency order, and loads plugin directories that appeared under
    /// the directory of the last [`load_all`](Self::load_all).
    pub fn reload_all(&self) -> LoadReport {
        let started = Instant::now();
        let names: Vec<String> = self.entries.read().keys().cloned().collect();
        let mut report = self.reload_names(&names);
        let plugins_dir = self.plugins_dir.read().clone();
        if let Some(plugins_dir) = plugins_dir {
            let known: BTreeSet<PathBuf> = self
                .entries
                .read()
                .values()
                .map(|e| e.dir.clone())
                .collect();
            let new: Vec<PathBuf> = self
                .discover(&plugins_dir)
                .into_iter()
                .filter(|dir| !known.contains(dir))
                .collect();
            if !new.is_empty() {
                report.plugins.extend(self.load_dirs(&new).plugins);
                report.plugins.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        report.elapsed_ms = ms(started.elapsed());
        report.log_summary("Reloaded", None);
        report
    }

    /// One reload pass over registered plugins.
    fn reload_names(&self, names: &[String]) -> LoadReport {
        self.checker.clear_cache();
        let mut outcomes: BTreeMap<String, PluginLoadOutcome> = BTreeMap::new();
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        for name in names {
            let started = Instant::now();
            let Some(entry) = self.entries.read().get(name).cloned() else {
                continue;
            };
            if let Some(handle) = &entry.handle {
                if handle.isolation() == Isolation::InProcess && self.registry.is_available(name) {
                    tracing::info!(plugin = %name, "Plugin {name} kept as it is: in-process libraries are never unloaded");
                    self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                    continue;
                }
                handle.retire();
            }
            if let Some(e) = self.entries.write().get_mut(name) {
                e.handle = None;
            }
            self.wait_idle(name);
            let manifest = self
                .read_manifest(&entry.dir)
                .and_then(|m| self.check_reload_name(name, m));
            match manifest {
                Ok(m) => {
                    let info = PluginInfo {
                        description: m.description.clone(),
                        version: Some(m.version.clone()),
                        source: Some(entry.dir.clone()),
                    };
                    if let Err(e) = self.registry.mark_loaded(name, Some(info)) {
                        tracing::warn!(plugin = %name, error = %e, "Plugin {name} not reloaded: {e}");
                        self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                        continue;
                    }
                    if let Some(e) = self.entries.write().get_mut(name) {
                        e.raw = Some(Arc::clone(&m.raw));
                        e.optional = m.optional;
                    }
                    pending.insert(
                        name.clone(),
                        Pending {
                            name: name.clone(),
                            dir: entry.dir.clone(),
                            manifest: m,
                            started,
                        },
                    );
                }
                Err(bad) => {
                    let BadManifest { raw, error } = *bad;
                    let _ = self.registry.mark_loaded(name, None);
                    if let Some(e) = self.entries.write().get_mut(name) {
                        e.raw = raw.map(Arc::new);
                        e.optional = false;
                    }
                    self.record_failure(name, &PluginError::from(error));
                    self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                }
            }
        }
        self.run_waves(&pending, &mut outcomes);
        LoadReport {
            plugins: outcomes.into_values().collect(),
            elapsed_ms: 0.0,
        }
    }

    /// A reloaded manifest must still name the plugin it was registered as.
    fn check_reload_name(&self, key: &str, m: Manifest) -> Result<Manifest, Box<BadManifest>> {
        if m.name == key {
            return Ok(m);
        }
        let raw = Some(Value::clone(&m.raw));
        let error = if self.registry.contains(&m.name) {
            ManifestError::DuplicateName {
                existing: self
                    .plugin_dir(&m.name)
                    .unwrap_or_else(|| PathBuf::from("(registered earlier)")),
                name: m.name,
            }
        } else {
            ManifestError::InvalidField {
                field: "name".into(),
                message: format!(
                    "changed from '{key}' to '{}' since the plugin was registered; a renamed \
                     plugin needs a restart of the host",
                    m.name
                ),
            }
        };
        Err(bad(raw, error))
    }

    /// Waits (bounded) until no call is in flight on `name`.
    fn wait_idle(&self, name: &str) {
        let deadline = Instant::now() + RELOAD_IDLE_WAIT;
        while self.registry.get_state(name) == Some(State::Running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Plugin directories under `plugins_dir`: sorted, only those with a manifest.
    pub fn discover(&self, plugins_dir: &Path) -> Vec<PathBuf> {
        let entries = match self.fs.read_dir(plugins_dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %plugins_dir.display(), error = %e, "Plugins directory not readable: {}", plugins_dir.display());
                return Vec::new();
            }
        };
        let mut dirs: Vec<PathBuf> = entries
            .into_iter()
            .filter(|e| e.is_dir && self.fs.exists(&e.path.join(MANIFEST_FILE)))
            .map(|e| e.path)
            .collect();
        dirs.sort();
        dirs
    }

    /// Loads every plugin directory under `plugins_dir` (seed `load_all_from_directory`).
    pub fn load_all(&self, plugins_dir: &Path) -> LoadReport {
        let started = Instant::now();
        *self.plugins_dir.write() = Some(plugins_dir.to_path_buf());
        let dirs = self.discover(plugins_dir);
        let mut report = self.load_dirs(&dirs);
        report.elapsed_ms = ms(started.elapsed());
        report.log_summary("Loaded", Some(plugins_dir));
        report
    }

    /// Loads one plugin directory (seed `load_from_path`).
    pub fn load_from_path(&self, dir: &Path) -> PluginLoadOutcome {
        let report = self.load_dirs(&[dir.to_path_buf()]);
        report
            .plugins
            .into_iter()
            .next()
            .unwrap_or_else(|| PluginLoadOutcome {
                name: manifest::key_from_dir_name(&dir_name(dir)),
                dir: dir.to_path_buf(),
                state: PluginLifecycleState::Failed,
                reason: Some(
                    PluginError::from(ManifestError::NotFound {
                        path: dir.join(MANIFEST_FILE),
                    })
                    .reason(),
                ),
                elapsed_ms: 0.0,
            })
    }

    /// One load pass over `dirs`.
    fn load_dirs(&self, dirs: &[PathBuf]) -> LoadReport {
        self.checker.clear_cache();
        // Phase 1 (parallel): read and validate every manifest.
        let pass_started = Instant::now();
        let parsed = par_map(self.config.threads, dirs, |dir| {
            let started = Instant::now();
            (started, self.read_manifest(dir))
        });
        // Phase 2 (sequential, sorted): register every plugin, so health shows
        // them all as LOADED while the rest of the pass runs.
        let mut outcomes: BTreeMap<String, PluginLoadOutcome> = BTreeMap::new();
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        for (dir, parsed) in parsed {
            let (started, result) =
                parsed.unwrap_or_else(|panic| (pass_started, Err(manifest_panicked(dir, panic))));
            let name = self.register(dir, result, started, &mut pending);
            if let Some(name) = name {
                self.finish_outcome(&name, dir, started, &mut outcomes);
            }
        }
        self.run_waves(&pending, &mut outcomes);
        LoadReport {
            plugins: outcomes.into_values().collect(),
            elapsed_ms: 0.0,
        }
    }

    /// Phase 3 of a pass: dependency order, one wave at a time; each wave in
    /// parallel.
    fn run_waves(
        &self,
        pending: &BTreeMap<String, Pending>,
        outcomes: &mut BTreeMap<String, PluginLoadOutcome>,
    ) {
        let (waves, cyclic) = dependency_waves(pending);
        for wave in waves {
            // A wave depends only on earlier waves, so the plugins available
            // to it are the same for all its members: list them once per wave
            // (listing them per plugin made a pass quadratic in plugins).
            let known = self.known_plugins();
            let members: Vec<&Pending> = wave.iter().filter_map(|n| pending.get(n)).collect();
            let results = par_map(self.config.threads, &members, |p| {
                self.instantiate(p, &known)
            });
            for (p, result) in results {
                let result =
                    result.unwrap_or_else(|message| Err(InitError::Panicked { message }.into()));
                match result {
                    Ok(handle) => self.mark_loaded(p, handle),
                    Err(err) => self.record_failure(&p.name, &err),
                }
                self.finish_outcome(&p.name, &p.dir, p.started, outcomes);
            }
        }
        for (name, cycle) in cyclic {
            if let Some(p) = pending.get(&name) {
                let err = DependencyError::new(
                    vec![format!(
                        "plugin:{} (dependency cycle: {cycle})",
                        first_dep(p)
                    )],
                    None,
                );
                self.record_failure(&name, &err.into());
                self.finish_outcome(&name, &p.dir, p.started, outcomes);
            }
        }
    }

    fn read_manifest(&self, dir: &Path) -> Result<Manifest, Box<BadManifest>> {
        let path = dir.join(MANIFEST_FILE);
        let limit = self.config.max_manifest_bytes;
        let bytes = match self.fs.read(&path, limit) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(None, ManifestError::NotFound { path }));
            }
            Err(source) => return Err(bad(None, ManifestError::Io { path, source })),
        };
        if bytes.len() as u64 > limit {
            let size = self
                .fs
                .metadata(&path)
                .map_or(bytes.len() as u64, |m| m.len);
            return Err(bad(None, ManifestError::TooLarge { path, size, limit }));
        }
        let dir_name = dir_name(dir);
        let raw: Option<Value> = serde_json::from_slice(&bytes).ok();
        manifest::parse(&bytes, &path, &dir_name).map_err(|e| bad(raw, e))
    }

    /// Registers the plugin of `dir` and returns its key when it is already
    /// final (a bad manifest or a duplicate); valid ones go to `pending`.
    fn register(
        &self,
        dir: &Path,
        result: Result<Manifest, Box<BadManifest>>,
        started: Instant,
        pending: &mut BTreeMap<String, Pending>,
    ) -> Option<String> {
        let dir_key = manifest::key_from_dir_name(&dir_name(dir));
        let source = Some(dir.to_path_buf());
        let (wanted, info, raw, optional, outcome) = match result {
            Ok(m) => {
                let info = PluginInfo {
                    description: m.description.clone(),
                    version: Some(m.version.clone()),
                    source,
                };
                (
                    m.name.clone(),
                    info,
                    Some(Arc::clone(&m.raw)),
                    m.optional,
                    Ok(m),
                )
            }
            Err(bad) => {
                let BadManifest { raw, error: err } = *bad;
                let claimed = raw
                    .as_ref()
                    .and_then(manifest::claimed_name)
                    .filter(|n| manifest::is_valid_name(n))
                    .map_or_else(|| dir_key.clone(), str::to_owned);
                let description = raw
                    .as_ref()
                    .and_then(|r| r.get("description"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let info = PluginInfo {
                    description,
                    version: None,
                    source,
                };
                let err = PluginError::from(err);
                (claimed, info, raw.map(Arc::new), false, Err(err))
            }
        };
        let (name, outcome) = match self.claim(&wanted, &dir_key, dir, info) {
            Ok(name) => (name, outcome),
            Err((name, existing)) => (
                name,
                Err(PluginError::from(ManifestError::DuplicateName {
                    name: wanted.clone(),
                    existing,
                })),
            ),
        };
        self.entries.write().insert(
            name.clone(),
            Entry {
                dir: dir.to_path_buf(),
                raw,
                optional,
                handle: None,
            },
        );
        match outcome {
            Ok(manifest) => {
                pending.insert(
                    name.clone(),
                    Pending {
                        name,
                        dir: dir.to_path_buf(),
                        manifest,
                        started,
                    },
                );
                None
            }
            Err(err) => {
                self.record_failure(&name, &err);
                Some(name)
            }
        }
    }

    /// Registers under `wanted`; if that name is taken, registers under a
    /// key derived from the directory instead and returns `Err` with it and
    /// the directory that holds the name.
    fn claim(
        &self,
        wanted: &str,
        dir_key: &str,
        dir: &Path,
        info: PluginInfo,
    ) -> Result<String, (String, PathBuf)> {
        if self.registry.register(wanted, info.clone()).is_ok() {
            return Ok(wanted.to_owned());
        }
        let existing = self
            .plugin_dir(wanted)
            .unwrap_or_else(|| PathBuf::from("(registered earlier)"));
        let mut candidate = if dir_key == wanted {
            format!("{dir_key}.duplicate")
        } else {
            dir_key.to_owned()
        };
        let mut n = 1;
        while self.registry.register(&candidate, info.clone()).is_err() {
            n += 1;
            candidate = format!("{dir_key}.duplicate{n}");
        }
        tracing::error!(
            name = wanted,
            dir = %dir.display(),
            existing = %existing.display(),
            "Duplicate plugin name '{wanted}' in {}: registered as '{candidate}'",
            dir.display()
        );
        Err((candidate, existing))
    }

    /// Dependencies, import and construction of one pending plugin.
    fn instantiate(
        &self,
        p: &Pending,
        known: &BTreeMap<String, semver::Version>,
    ) -> Result<PluginHandle, PluginError> {
        let report = self.checker.check(&p.manifest.requirements, &p.dir, known);
        if let Some(mut err) = report.into_error() {
            self.explain_plugin_deps(&p.manifest, &mut err);
            return Err(err.into());
        }
        let library_path = self.resolve_library(p)?;
        let config = self.instance_config(p);
        let isolation = p
            .manifest
            .declared_isolation
            .unwrap_or(self.config.default_isolation);
        if isolation == Isolation::Process {
            return self.instantiate_isolated(p, library_path, config);
        }
        if self.config.preflight || p.manifest.preflight {
            self.preflight(p, &library_path, &config)?;
        }
        let library = self.importer.open(&library_path)?;
        let instance = library.instantiate(&config)?;
        Ok(PluginHandle::new(
            p.name.clone(),
            self.registry.clone(),
            instance,
            p.manifest.limits.call_timeout,
        ))
    }

    /// The runner binary, or an import error saying none was found.
    fn runner(&self, library: &Path) -> Result<PathBuf, ImportError> {
        self.config
            .runner
            .clone()
            .or_else(process::find_runner)
            .ok_or_else(|| ImportError::Open {
                path: library.to_path_buf(),
                detail: format!(
                    "no plugin runner: {} was not found next to the executable or on PATH",
                    process::RUNNER_NAME
                ),
            })
    }

    /// Starts an isolated plugin in its runner, under supervision.
    fn instantiate_isolated(
        &self,
        p: &Pending,
        library_path: PathBuf,
        config: Vec<u8>,
    ) -> Result<PluginHandle, PluginError> {
        let limits = self.config.process.with_manifest(&p.manifest.limits);
        let importer = Arc::new(
            ProcessImporter::new(self.runner(&library_path)?, p.name.clone(), limits)
                .with_runner_args(self.config.runner_args.clone()),
        );
        let library = importer.open(&library_path)?;
        let instance = library.instantiate(&config)?;
        let supervisor = Supervisor::new(
            Restart {
                importer,
                library: library_path,
                config,
            },
            self.config.supervision,
        );
        Ok(PluginHandle::isolated(
            p.name.clone(),
            self.registry.clone(),
            instance,
            limits.call_timeout,
            supervisor,
        ))
    }

    /// Constructs an in-process plugin once in a throw-away runner (no
    /// memory limit unless the manifest sets one: the host has none either).
    fn preflight(
        &self,
        p: &Pending,
        library_path: &Path,
        config: &[u8],
    ) -> Result<(), PluginError> {
        let mut limits = self.config.process.with_manifest(&p.manifest.limits);
        limits.memory_limit_mib = p.manifest.limits.memory_mb.unwrap_or(0);
        let importer = ProcessImporter::new(self.runner(library_path)?, p.name.clone(), limits)
            .with_runner_args(self.config.runner_args.clone());
        let instance = importer.open(library_path)?.instantiate(config)?;
        drop(instance);
        tracing::info!(plugin = %p.name, "Preflight passed: {}", p.name);
        Ok(())
    }

    /// Versions of the plugins available now, for `plugin:` requirements.
    fn known_plugins(&self) -> BTreeMap<String, semver::Version> {
        self.registry
            .list_all()
            .into_iter()
            .filter(|s| s.state.is_available())
            .map(|s| {
                let version = s
                    .version
                    .as_deref()
                    .and_then(|v| semver::Version::parse(v).ok())
                    .unwrap_or_else(|| semver::Version::new(0, 0, 0));
                (s.name, version)
            })
            .collect()
    }

    /// Names the chain: a missing `plugin:` dependency that is registered but
    /// not available says which state it is in and why.
    fn explain_plugin_deps(&self, manifest: &Manifest, err: &mut DependencyError) {
        for dep in &manifest.requirements.dependencies {
            let Dependency::Plugin { name, .. } = dep else {
                continue;
            };
            let Some(status) = self.registry.get_status(name) else {
                continue;
            };
            if status.state.is_available() {
                continue;
            }
            let prefix = format!("plugin:{name}");
            for item in &mut err.missing {
                if item == &prefix || item.starts_with(&format!("{prefix}@")) {
                    item.push_str(&format!(
                        " ({name} is {}: {})",
                        status.state.as_str(),
                        status.reason.as_deref().unwrap_or("no reason recorded")
                    ));
                }
            }
        }
        let gpu_detail = err
            .reason
            .split_once("; ")
            .map(|(_, detail)| detail.to_owned());
        *err = DependencyError::new(std::mem::take(&mut err.missing), gpu_detail);
    }

    /// Where the plugin's library is: inside its directory (no escape by `..`
    /// or symlink), else on the configured library path.
    fn resolve_library(&self, p: &Pending) -> Result<PathBuf, PluginError> {
        let entry = p
            .manifest
            .entrypoint
            .clone()
            .unwrap_or_else(|| format!("lib{}.so", p.name.replace(['-', '.'], "_")));
        let inside = manifest::join_inside(&p.dir, &entry);
        let bare = !entry.contains('/');
        if self.fs.exists(&inside) || !bare {
            self.check_contained(&p.dir, &inside, &entry)?;
            return Ok(inside);
        }
        for lib_dir in &self.config.lib_paths {
            let candidate = lib_dir.join(&entry);
            if self.fs.exists(&candidate) {
                return Ok(candidate);
            }
        }
        Err(ImportError::LibraryNotFound { path: inside }.into())
    }

    fn check_contained(&self, dir: &Path, path: &Path, entry: &str) -> Result<(), PluginError> {
        let Ok(real) = self.fs.canonicalize(path) else {
            // Missing: the import step reports it precisely.
            return Ok(());
        };
        let root = self
            .fs
            .canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf());
        if real.starts_with(&root) {
            Ok(())
        } else {
            Err(ManifestError::PathEscape {
                field: "entrypoint".into(),
                path: format!("{entry} -> {}", real.display()),
            }
            .into())
        }
    }

    fn instance_config(&self, p: &Pending) -> Vec<u8> {
        let models: BTreeMap<&str, PathBuf> = p
            .manifest
            .requirements
            .models
            .iter()
            .map(|(name, path)| {
                (
                    name.as_str(),
                    DependencyChecker::resolve_model_path(&p.dir, path),
                )
            })
            .collect();
        let config = serde_json::json!({
            "manifest": &*p.manifest.raw,
            "plugin_dir": p.dir,
            "models": models,
        });
        serde_json::to_vec(&config).unwrap_or_default()
    }

    fn mark_loaded(&self, p: &Pending, handle: PluginHandle) {
        if let Some(entry) = self.entries.write().get_mut(&p.name) {
            entry.handle = Some(handle);
        }
        match self.registry.mark_initialized(&p.name) {
            Ok(()) => tracing::info!(
                plugin = %p.name,
                version = %p.manifest.version,
                "✓ Loaded plugin: {} ({})",
                p.name,
                p.manifest.version
            ),
            Err(e) => tracing::error!(plugin = %p.name, error = %e, "registry refused INITIALIZED"),
        }
    }

    /// Records a load failure: UNAVAILABLE for dependencies, FAILED otherwise.
    fn record_failure(&self, name: &str, err: &PluginError) {
        let reason = err.reason();
        if matches!(
            err,
            PluginError::Load(forgesyte_errors::LoadError::Dependency(_))
        ) {
            let _ = self.registry.mark_unavailable(name, reason.clone());
            tracing::warn!(plugin = %name, %reason, "⊘ Plugin UNAVAILABLE: {name}");
        } else {
            let report = crate::supervise::report_of(err);
            if report.crash.is_some() {
                // A runner died: the journal keeps its signal or exit code
                // and stderr tail.
                let exit = crate::supervise::exit_info(&report);
                let _ = self.registry.mark_crashed(name, reason.clone(), exit);
            } else {
                let _ = self.registry.mark_failed(name, reason.clone());
            }
            tracing::error!(plugin = %name, %reason, "✗ Plugin FAILED: {name}");
        }
    }

    fn finish_outcome(
        &self,
        name: &str,
        dir: &Path,
        started: Instant,
        outcomes: &mut BTreeMap<String, PluginLoadOutcome>,
    ) {
        let status = self.registry.get_status(name);
        outcomes.insert(
            name.to_owned(),
            PluginLoadOutcome {
                name: name.to_owned(),
                dir: dir.to_path_buf(),
                state: status
                    .as_ref()
                    .map_or(PluginLifecycleState::Failed, |s| s.state),
                reason: status.and_then(|s| s.reason),
                elapsed_ms: ms(started.elapsed()),
            },
        );
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

fn retire_isolated(handle: &PluginHandle) {
    if handle.isolation() == Isolation::Process {
        handle.retire();
    }
}

fn first_dep(p: &Pending) -> String {
    p.manifest
        .requirements
        .dependencies
        .iter()
        .find_map(|d| match d {
            Dependency::Plugin { name, .. } => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Orders pending plugins into waves: every plugin's in-pass `plugin:`
/// dependencies are in earlier waves. Plugins on or behind a cycle are
/// returned separately with the cycle spelled out (`a -> b -> a`).
fn dependency_waves(
    pending: &BTreeMap<String, Pending>,
) -> (Vec<Vec<String>>, Vec<(String, String)>) {
    let deps: BTreeMap<&str, BTreeSet<&str>> = pending
        .iter()
        .map(|(name, p)| {
            let inner = p
                .manifest
                .requirements
                .dependencies
                .iter()
                .filter_map(|d| match d {
                    Dependency::Plugin { name, .. } if pending.contains_key(name) => {
                        Some(name.as_str())
                    }
                    _ => None,
                })
                .collect();
            (name.as_str(), inner)
        })
        .collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut waves = Vec::new();
    loop {
        let wave: Vec<String> = deps
            .iter()
            .filter(|(name, d)| !done.contains(*name) && d.iter().all(|x| done.contains(x)))
            .map(|(name, _)| (*name).to_owned())
            .collect();
        if wave.is_empty() {
            break;
        }
        done.extend(
            wave.iter()
                .filter_map(|n| deps.get_key_value(n.as_str()).map(|(k, _)| *k)),
        );
        waves.push(wave);
    }
    let cyclic = deps
        .keys()
        .filter(|n| !done.contains(*n))
        .map(|n| ((*n).to_owned(), find_cycle(n, &deps, &done)))
        .collect();
    (waves, cyclic)
}

/// Follows unresolved dependencies from `start` until a node repeats.
fn find_cycle(start: &str, deps: &BTreeMap<&str, BTreeSet<&str>>, done: &BTreeSet<&str>) -> String {
    let mut path: Vec<&str> = vec![start];
    let mut current = start;
    loop {
        let next = deps
            .get(current)
            .and_then(|d| d.iter().find(|x| !done.contains(*x)).copied());
        let Some(next) = next else {
            return path.join(" -> ");
        };
        if let Some(pos) = path.iter().position(|n| *n == next) {
            let mut cycle: Vec<&str> = path[pos..].to_vec();
            cycle.push(next);
            let prefix = &path[..pos];
            return if prefix.is_empty() {
                cycle.join(" -> ")
            } else {
                format!("{} -> [{}]", prefix.join(" -> "), cycle.join(" -> "))
            };
        }
        path.push(next);
        current = next;
    }
}

/// Maps `f` over `items` on a local rayon pool of up to `threads` threads.
///
/// Every result comes back paired with its own input, in input order, so an
/// outcome cannot be attributed to another item. A panic in `f` is caught
/// for that item alone and comes back as `Err` with the panic message; the
/// other items are unaffected.
fn par_map<'a, T: Sync, R: Send>(
    threads: usize,
    items: &'a [T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<(&'a T, Result<R, String>)> {
    let one = |item: &'a T| (item, catch_panic(|| f(item)));
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(one).collect();
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("forgesyte-load-{i}"))
        .build()
    {
        Ok(pool) => pool.install(|| items.par_iter().map(one).collect()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the load threads; loading on one thread");
            items.iter().map(one).collect()
        }
    }
}

/// Runs `f`, turning a panic into its message.
fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // The loader's own state is not borrowed across `f` (locks are taken and
    // released inside it), so nothing is left half-updated by an unwind.
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

/// The message of a panic payload (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned())
}

/// A panic while reading the manifest of `dir`, as a manifest that could not
/// be read.
fn manifest_panicked(dir: &Path, panic: String) -> Box<BadManifest> {
    bad(
        None,
        ManifestError::Io {
            path: dir.join(MANIFEST_FILE),
            source: std::io::Error::other(format!("panicked while reading it: {panic}")),
        },
    )
}

fn bad(raw: Option<Value>, error: ManifestError) -> Box<BadManifest> {
    Box::new(BadManifest { raw, error })
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_each_result_with_its_input_and_catches_panics() {
        let items: Vec<u32> = (0..40).collect();
        for threads in [1, 2, 7] {
            let results = par_map(threads, &items, |&n| {
                match n {
                    3 => panic!("literal"),
                    17 => panic!("formatted {n}"),
                    30 => std::panic::panic_any(5u8),
                    _ => {}
                }
                n * 2
            });
            let inputs: Vec<u32> = results.iter().map(|(n, _)| **n).collect();
            assert_eq!(inputs, items, "threads {threads}");
            for (n, result) in results {
                let expected = match n {
                    3 => Err("literal".to_owned()),
                    17 => Err("formatted 17".to_owned()),
                    30 => Err("panic with a non-string payload".to_owned()),
                    n => Ok(n * 2),
                };
                assert_eq!(result, expected, "threads {threads}, item {n}");
            }
        }
    }
}
