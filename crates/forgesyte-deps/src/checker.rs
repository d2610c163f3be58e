//! The dependency checker: requirements in, a report naming every missing
//! item out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use forgesyte_errors::DependencyError;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::cuda::CudaProbe;
use crate::env::{EnvProbe, ProcessEnv};
use crate::exec::{ExecutableProbe, SystemPath};
use crate::fs::{FileSystem, RealFs};
use crate::gpu::{self, GpuProbe, GpuReport};
use crate::libs::{LibraryProbe, SystemLibraries};
use crate::python::{PythonAnswer, PythonProbe, SystemPython};
use crate::requirements::{Dependency, GpuRequirement, Requirements};

/// The plugins a `plugin:NAME@REQ` dependency may name, by name: each
/// one's version as semver, or why it has none (`Err(None)`: no version;
/// `Err(Some(text))`: a version that is not semver, which no requirement
/// matches, not even `>=0.0.0`).
pub type KnownPlugins = BTreeMap<String, Result<semver::Version, Option<String>>>;

/// Why a `plugin:` dependency is not met by the available plugins `known`
/// (the item its reason names: `plugin:a@^2 (found 1.0.0)`), or `None`
/// when it is met (or `dep` is of another kind).
pub fn unmet_plugin_dependency(dep: &Dependency, known: &KnownPlugins) -> Option<String> {
    let Dependency::Plugin { name, req } = dep else {
        return None;
    };
    match (known.get(name), req) {
        (None, _) => Some(dep.to_string()),
        // `*` asks for the plugin in any version, or none.
        (Some(_), Some(req)) if req.comparators.is_empty() => None,
        (Some(Ok(version)), Some(req)) if !req.matches(version) => {
            Some(format!("{dep} (found {version})"))
        }
        (Some(Err(None)), Some(_)) => Some(format!("{dep} (it has no version)")),
        (Some(Err(Some(text))), Some(_)) => {
            Some(format!("{dep} (its version {:?} is not semver)", text))
        }
        (Some(_), _) => None,
    }
}

/// Interpreters a load pass's prefetch asks at once.
const PREFETCH_AT_ONCE: usize = 8;

/// The most bytes of package names one interpreter run is asked about (its
/// arguments): a pass with more asks in several runs.
const MAX_ASKED_BYTES: usize = 64 * 1024;

/// The answer to "may this plugin load?" (the seed's dict).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DependencyReport {
    /// True exactly when `missing` is empty.
    pub available: bool,
    /// `Missing dependencies: a, b` (plus the GPU sentence when the GPU is
    /// missing); `None` when available.
    pub reason: Option<String>,
    /// Every missing item: dependencies in manifest order, then `gpu`, then
    /// models (`NAME (path: /resolved/path)`) in manifest order.
    pub missing: Vec<String>,
}

impl DependencyReport {
    /// A report of nothing missing.
    pub fn ok() -> Self {
        DependencyReport {
            available: true,
            reason: None,
            missing: Vec::new(),
        }
    }

    /// The error to record when something is missing, `None` when available.
    pub fn into_error(self) -> Option<DependencyError> {
        if self.available && self.missing.is_empty() {
            return None;
        }
        Some(match self.reason {
            Some(reason) => DependencyError {
                missing: self.missing,
                reason,
            },
            None => DependencyError::new(self.missing, None),
        })
    }
}

/// Checks a plugin's [`Requirements`] against the world, through the seams.
///
/// Results are cached per item (library, executable, variable, model path,
/// Python package per interpreter, the GPU report) until
/// [`clear_cache`](Self::clear_cache), which the loader calls at the start of
/// each load pass. (The real GPU probe, [`crate::CudaProbe`], answers from
/// its first probe for the whole process: a driver that comes up later is
/// seen after a restart.) The checker is `Send + Sync`; no lock is held while a
/// probe runs.
///
/// Python packages cost one interpreter run per interpreter per pass when
/// the loader first hands every pending plugin's packages to
/// [`prefetch_python`](Self::prefetch_python) (or
/// [`prefetch_python_for`](Self::prefetch_python_for), or
/// [`python_prefetch`](Self::python_prefetch) to run them beside the
/// checks: a check that needs an interpreter's answer waits for that
/// interpreter's run, and a check that needs none waits for nothing); a
/// package `check` finds uncached and not being asked is asked for on its
/// own.
#[derive(Debug)]
pub struct DependencyChecker {
    fs: Arc<dyn FileSystem>,
    gpu: Arc<dyn GpuProbe>,
    libraries: Arc<dyn LibraryProbe>,
    executables: Arc<dyn ExecutableProbe>,
    env: Arc<dyn EnvProbe>,
    python: Arc<dyn PythonProbe>,
    cache: Mutex<PassCache>,
    /// Signalled when an interpreter of `PassCache::python_asking` has
    /// answered (or failed to).
    python_answered: Condvar,
}

#[derive(Debug, Default)]
struct PassCache {
    found: HashMap<Probe, bool>,
    /// The Python probe's answers: (interpreter, query) → answer.
    python: HashMap<(PathBuf, String), PythonAnswer>,
    gpu: Option<GpuReport>,
    /// Interpreters that could not answer this pass, with why.
    python_errors: HashMap<PathBuf, String>,
    /// Interpreters a [`PythonPrefetch`] of this pass will ask, or is
    /// asking: a check of their packages waits for that run rather than
    /// starting one of its own.
    python_asking: HashSet<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Probe {
    Lib(String),
    Bin(String),
    Env(String),
    Path(PathBuf),
}

impl DependencyChecker {
    /// A checker on the real world: `std::fs`, CUDA, the library search
    /// (looking in `extra_library_paths` first), `PATH` and the process
    /// environment.
    pub fn system(extra_library_paths: Vec<PathBuf>) -> Self {
        DependencyChecker::builder()
            .library_paths(extra_library_paths)
            .build()
    }

    /// A builder; every seam left unset gets its real implementation.
    pub fn builder() -> DependencyCheckerBuilder {
        DependencyCheckerBuilder::default()
    }

    /// A checker on an empty fake world: no files, no GPU, no libraries, no
    /// executables, no variables (see [`crate::fake::FakeWorld`] to fill one).
    #[cfg(any(test, feature = "testing"))]
    pub fn fake() -> Self {
        crate::fake::FakeWorld::new().checker()
    }

    /// Checks every requirement and names every missing item.
    ///
    /// Relative model paths are resolved against `plugin_dir` (never the
    /// working directory); `plugin:` dependencies are checked against
    /// `known_plugins` (name → version); `py:` dependencies against
    /// `req.python` (missing, as `NAME (python interpreter WANTED)` when
    /// it is `None` and `req.python_wanted` says which was looked for, else
    /// `NAME (no Python interpreter)`; as `NAME (cannot ask INTERPRETER:
    /// WHY)` when the interpreter could not answer this pass).
    pub fn check(
        &self,
        req: &Requirements,
        plugin_dir: &Path,
        known_plugins: &KnownPlugins,
    ) -> DependencyReport {
        let mut missing = Vec::new();
        let mut packages_seen = HashSet::new();
        for dep in &req.dependencies {
            if let Dependency::Py {
                package, version, ..
            } = dep
            {
                // `torch` and `py:torch` are one requirement: name it once
                // (`torch>=2` and `torch<3` are two).
                if !packages_seen.insert((package.as_str(), version.as_ref())) {
                    continue;
                }
            }
            if let Some(item) = self.check_dependency(dep, req, known_plugins) {
                missing.push(item);
            }
        }
        // Probe the GPU only when asked: initialising CUDA is not free.
        let gpu_detail = match req.gpu {
            GpuRequirement::None => None,
            _ => gpu::unmet(&req.gpu, &self.gpu_report()),
        };
        if gpu_detail.is_some() {
            missing.push("gpu".to_string());
        }
        for (name, path) in &req.models {
            let resolved = Self::resolve_model_path(plugin_dir, path);
            let fs = &self.fs;
            if !self.cached(Probe::Path(resolved.clone()), || fs.exists(&resolved)) {
                missing.push(format!("{name} (path: {})", resolved.display()));
            }
        }
        let mut seen = HashSet::new();
        missing.retain(|item| seen.insert(item.clone()));
        if missing.is_empty() {
            return DependencyReport::ok();
        }
        tracing::debug!(?missing, "dependencies missing");
        let err = DependencyError::new(missing, gpu_detail);
        DependencyReport {
            available: false,
            reason: Some(err.reason),
            missing: err.missing,
        }
    }

    /// The GPU probe's report (cached for the pass), for the server to show.
    pub fn gpu_report(&self) -> GpuReport {
        if let Some(report) = &self.cache.lock().gpu {
            return report.clone();
        }
        let report = self.gpu.probe();
        self.cache.lock().gpu = Some(report.clone());
        report
    }

    /// Asks `interpreter` about every one of `packages` not yet answered this
    /// pass, in one run (duplicates asked once), and caches the answers for
    /// the pass. When the interpreter cannot answer, nothing is cached but
    /// the error is remembered for the pass: later checks of its packages
    /// report it without asking again, and later prefetches for it do
    /// nothing.
    pub fn prefetch_python(&self, interpreter: &Path, packages: impl IntoIterator<Item = String>) {
        let pending: Vec<String> = {
            let cache = self.cache.lock();
            if cache.python_errors.contains_key(interpreter) {
                return;
            }
            let mut seen = HashSet::new();
            packages
                .into_iter()
                .filter(|p| {
                    !cache
                        .python
                        .contains_key(&(interpreter.to_path_buf(), p.clone()))
                })
                .filter(|p| seen.insert(p.clone()))
                .collect()
        };
        // Runs of at most `MAX_ASKED_BYTES` of names: the names are the
        // run's arguments, which the kernel bounds (`E2BIG`).
        let mut batch = Vec::new();
        let mut bytes = 0;
        for package in pending {
            // Each argument costs its bytes and its terminating NUL.
            let cost = package.len() + 1;
            if bytes + cost > MAX_ASKED_BYTES && !batch.is_empty() {
                if self
                    .ask_python(interpreter, std::mem::take(&mut batch))
                    .is_err()
                {
                    return;
                }
                bytes = 0;
            }
            bytes += cost;
            batch.push(package);
        }
        if !batch.is_empty() {
            let _ = self.ask_python(interpreter, batch);
        }
    }

    /// [`prefetch_python`](Self::prefetch_python) for a load pass's pending
    /// plugins: their packages grouped by [`Requirements::python`], one
    /// interpreter run per interpreter, up to eight interpreters at once.
    /// Plugins without an interpreter are skipped. Returns when every
    /// interpreter has answered or failed to.
    pub fn prefetch_python_for<'a>(
        &self,
        requirements: impl IntoIterator<Item = &'a Requirements>,
    ) {
        self.python_prefetch(requirements).run();
    }

    /// The runs of [`prefetch_python_for`](Self::prefetch_python_for),
    /// planned but not started: from now on, until the plan has run (or is
    /// dropped), a check of a package of one of its interpreters waits for
    /// that interpreter's run instead of starting one. The loader runs the
    /// plan on a thread of its own beside the pass's checks, so a plugin
    /// that needs no Python package (or another interpreter's) does not
    /// wait for a slow or hung interpreter.
    pub fn python_prefetch<'a>(
        &self,
        requirements: impl IntoIterator<Item = &'a Requirements>,
    ) -> PythonPrefetch<'_> {
        let mut by_interpreter: BTreeMap<&Path, (usize, Vec<String>)> = BTreeMap::new();
        for req in requirements {
            if let Some(interpreter) = req.python.as_deref() {
                let queries: Vec<String> = req.python_queries().collect();
                if queries.is_empty() {
                    continue;
                }
                let (plugins, packages) = by_interpreter.entry(interpreter).or_default();
                *plugins += 1;
                packages.extend(queries);
            }
        }
        // The interpreter most plugins share first (the operator's, as a
        // rule): a few hung ones of single plugins then hold up nobody
        // else's answer.
        let mut asks: Vec<(usize, PathBuf, Vec<String>)> = by_interpreter
            .into_iter()
            .map(|(interpreter, (plugins, packages))| {
                (plugins, interpreter.to_path_buf(), packages)
            })
            .collect();
        asks.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let asks: Vec<(PathBuf, Vec<String>)> = asks
            .into_iter()
            .map(|(_, interpreter, packages)| (interpreter, packages))
            .collect();
        self.cache
            .lock()
            .python_asking
            .extend(asks.iter().map(|(interpreter, _)| interpreter.clone()));
        PythonPrefetch {
            checker: self,
            asks,
        }
    }

    /// `interpreter` has answered (or failed to) its planned run: checks
    /// waiting for it go on.
    fn done_asking(&self, interpreter: &Path) {
        if self.cache.lock().python_asking.remove(interpreter) {
            self.python_answered.notify_all();
        }
    }

    /// Forgets every cached answer: the start of a new load pass.
    pub fn clear_cache(&self) {
        {
            let mut cache = self.cache.lock();
            // Runs still planned stay so (their checks wait for them, and
            // their end wakes those checks): only a pass that overlaps
            // another sees them.
            let asking = std::mem::take(&mut cache.python_asking);
            *cache = PassCache {
                python_asking: asking,
                ..PassCache::default()
            };
        }
        self.python_answered.notify_all();
        self.libraries.refresh();
    }

    /// Where a model path points: absolute paths as they are, relative ones
    /// joined to `plugin_dir` (with `.` components dropped).
    pub fn resolve_model_path(plugin_dir: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        let rest: PathBuf = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        if rest.as_os_str().is_empty() {
            plugin_dir.to_path_buf()
        } else {
            plugin_dir.join(rest)
        }
    }

    /// The filesystem seam this checker uses (the loader shares it).
    pub fn filesystem(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }

    /// The library seam this checker uses (the loader shares it).
    pub fn library_probe(&self) -> &Arc<dyn LibraryProbe> {
        &self.libraries
    }

    fn check_dependency(
        &self,
        dep: &Dependency,
        req: &Requirements,
        known_plugins: &KnownPlugins,
    ) -> Option<String> {
        let present = match dep {
            Dependency::Lib(name) => self.cached(Probe::Lib(name.clone()), || {
                self.libraries.find(name).is_some()
            }),
            Dependency::Bin(name) => self.cached(Probe::Bin(name.clone()), || {
                self.executables.find(name).is_some()
            }),
            Dependency::Env(name) if crate::env::WITHHELD_VARIABLES.contains(&name.as_str()) => {
                return Some(format!(
                    "{dep} (the server's own secret: taken out of its environment as it \
                     starts, never passed to a plugin)"
                ));
            }
            Dependency::Env(name) => {
                self.cached(Probe::Env(name.clone()), || self.env.var(name).is_some())
            }
            Dependency::Py { version, .. } => {
                let Some(interpreter) = req.python.as_deref() else {
                    return Some(match &req.python_wanted {
                        Some(wanted) => format!("{dep} (python interpreter {wanted})"),
                        None => format!("{dep} (no Python interpreter)"),
                    });
                };
                let query = dep.python_query().unwrap_or_default();
                match (self.python_package(interpreter, &query), version) {
                    (Ok(PythonAnswer::Found), None) => true,
                    (Ok(PythonAnswer::Found), Some(_)) => {
                        return Some(format!(
                            "{dep} (a module of that name is found, but no installed \
                             distribution is named so: write the name pip installs it under)"
                        ));
                    }
                    (Ok(PythonAnswer::Version(installed)), Some(version)) => {
                        return match version.matches(&installed) {
                            Ok(true) => None,
                            Ok(false) => Some(format!("{dep} ({installed} installed)")),
                            Err(why) => Some(format!("{dep} ({why})")),
                        };
                    }
                    (Ok(PythonAnswer::Version(_)), None) => true,
                    (Ok(PythonAnswer::Missing), _) => false,
                    (Err(why), _) => {
                        let who = interpreter.display().to_string();
                        // The probe's message begins with the interpreter; say it once.
                        let why = why
                            .strip_prefix(&who)
                            .and_then(|rest| rest.strip_prefix(": "))
                            .unwrap_or(&why);
                        return Some(format!("{dep} (cannot ask {who}: {why})"));
                    }
                }
            }
            Dependency::Plugin { .. } => return unmet_plugin_dependency(dep, known_plugins),
        };
        (!present).then(|| dep.to_string())
    }

    /// Whether `interpreter` has `package`: from the pass cache, from the
    /// error remembered for the interpreter, or (a package nobody
    /// prefetched) one run for this package alone.
    fn python_package(&self, interpreter: &Path, query: &str) -> Result<PythonAnswer, String> {
        {
            let mut cache = self.cache.lock();
            let key = (interpreter.to_path_buf(), query.to_string());
            loop {
                if let Some(found) = cache.python.get(&key) {
                    return Ok(found.clone());
                }
                if let Some(err) = cache.python_errors.get(interpreter) {
                    return Err(err.clone());
                }
                // A planned run will answer it: waits for that run (which
                // its interpreter's time limit bounds) rather than
                // starting another.
                if !cache.python_asking.contains(interpreter) {
                    break;
                }
                self.python_answered.wait(&mut cache);
            }
        }
        let found = self.ask_python(interpreter, vec![query.to_string()])?;
        Ok(found.into_iter().next().unwrap_or(PythonAnswer::Missing))
    }

    /// One run of the Python probe (no lock held); answers are cached, an
    /// error is remembered for the interpreter for the pass.
    fn ask_python(
        &self,
        interpreter: &Path,
        packages: Vec<String>,
    ) -> Result<Vec<PythonAnswer>, String> {
        let answer = match self.python.find(interpreter, &packages) {
            Ok(found) if found.len() == packages.len() => Ok(found),
            Ok(found) => Err(format!(
                "{}: answered {} results for {} packages",
                interpreter.display(),
                found.len(),
                packages.len()
            )),
            Err(e) => Err(e),
        };
        let mut cache = self.cache.lock();
        match &answer {
            Ok(found) => {
                for (package, found) in packages.into_iter().zip(found) {
                    cache
                        .python
                        .insert((interpreter.to_path_buf(), package), found.clone());
                }
            }
            Err(e) => {
                tracing::warn!(interpreter = %interpreter.display(), error = %e, "python interpreter could not answer");
                cache
                    .python_errors
                    .insert(interpreter.to_path_buf(), e.clone());
            }
        }
        answer
    }

    /// Answers from the pass cache, or probes (without holding the lock)
    /// and remembers.
    fn cached(&self, key: Probe, probe: impl FnOnce() -> bool) -> bool {
        if let Some(found) = self.cache.lock().found.get(&key) {
            return *found;
        }
        let found = probe();
        self.cache.lock().found.insert(key, found);
        found
    }
}

/// The planned interpreter runs of a load pass
/// ([`DependencyChecker::python_prefetch`]): [`run`](Self::run) asks them,
/// up to eight interpreters at once. Dropped without running (or with runs
/// left when a run panicked), it lets the checks that wait for its
/// interpreters go on, to ask on their own.
#[derive(Debug)]
#[must_use = "the checks of its interpreters wait until it runs or is dropped"]
pub struct PythonPrefetch<'a> {
    checker: &'a DependencyChecker,
    /// (interpreter, the packages asked of it), the first asked first.
    asks: Vec<(PathBuf, Vec<String>)>,
}

impl PythonPrefetch<'_> {
    /// Runs `beside` (a load pass's checks) while [`run`](Self::run) runs
    /// on a thread of its own, and returns what `beside` returns once both
    /// have ended. A plan with no run starts no thread; when no thread can
    /// start, the plan runs first, on this one (dropped unrun, each check
    /// would ask its packages one run at a time).
    pub fn run_beside<R>(self, beside: impl FnOnce() -> R) -> R {
        if self.asks.is_empty() {
            return beside();
        }
        let plan = Mutex::new(Some(self));
        let run = || {
            if let Some(prefetch) = plan.lock().take() {
                prefetch.run();
            }
        };
        std::thread::scope(|scope| {
            let asking = std::thread::Builder::new()
                .name("forgesyte-pyask".into())
                .spawn_scoped(scope, run);
            if let Err(e) = &asking {
                tracing::warn!(error = %e, "cannot start a thread for the Python package checks: they run first");
                run();
            }
            let result = beside();
            if let Ok(Err(_)) = asking.map(std::thread::ScopedJoinHandle::join) {
                tracing::warn!(
                    "the Python package checks panicked: each plugin's check asked again"
                );
            }
            result
        })
    }

    /// Asks every planned interpreter, each as soon as one of up to
    /// eight threads is free (a hung interpreter holds one
    /// thread for its time limit, not a batch of others); returns when all
    /// have answered or failed to.
    pub fn run(self) {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            while let Some((interpreter, packages)) = self
                .asks
                .get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                // Done even if the run panics: no check waits for it then.
                let _done = Done(self.checker, interpreter);
                self.checker
                    .prefetch_python(interpreter, packages.iter().cloned());
            }
        };
        let helpers = self.asks.len().clamp(1, PREFETCH_AT_ONCE) - 1;
        std::thread::scope(|scope| {
            // A thread that cannot start leaves its share to the others.
            let started: Vec<_> = (0..helpers)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("forgesyte-pyask".into())
                        .spawn_scoped(scope, work)
                        .ok()
                })
                .collect();
            work();
            for thread in started {
                if thread.join().is_err() {
                    tracing::warn!(
                        "a Python package check panicked: its packages are asked again by each plugin's check"
                    );
                }
            }
        });
    }
}

impl Drop for PythonPrefetch<'_> {
    fn drop(&mut self) {
        for (interpreter, _) in &self.asks {
            self.checker.done_asking(interpreter);
        }
    }
}

/// Marks an interpreter's planned run done when dropped.
struct Done<'a>(&'a DependencyChecker, &'a Path);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.done_asking(self.1);
    }
}

/// Builds a [`DependencyChecker`]; seams left unset are the real ones.
#[derive(Debug, Default)]
pub struct DependencyCheckerBuilder {
    fs: Option<Arc<dyn FileSystem>>,
    gpu: Option<Arc<dyn GpuProbe>>,
    libraries: Option<Arc<dyn LibraryProbe>>,
    executables: Option<Arc<dyn ExecutableProbe>>,
    env: Option<Arc<dyn EnvProbe>>,
    python: Option<Arc<dyn PythonProbe>>,
    library_paths: Vec<PathBuf>,
}

impl DependencyCheckerBuilder {
    /// The filesystem (default [`RealFs`]).
    pub fn fs(mut self, fs: Arc<dyn FileSystem>) -> Self {
        self.fs = Some(fs);
        self
    }

    /// The GPU probe (default [`CudaProbe`]).
    pub fn gpu(mut self, gpu: Arc<dyn GpuProbe>) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// The library probe (default [`SystemLibraries`] over
    /// [`library_paths`](Self::library_paths)).
    pub fn libraries(mut self, libraries: Arc<dyn LibraryProbe>) -> Self {
        self.libraries = Some(libraries);
        self
    }

    /// The executable probe (default [`SystemPath`]).
    pub fn executables(mut self, executables: Arc<dyn ExecutableProbe>) -> Self {
        self.executables = Some(executables);
        self
    }

    /// The environment probe (default [`ProcessEnv`]).
    pub fn env(mut self, env: Arc<dyn EnvProbe>) -> Self {
        self.env = Some(env);
        self
    }

    /// The Python-package probe (default [`SystemPython`]).
    pub fn python(mut self, python: Arc<dyn PythonProbe>) -> Self {
        self.python = Some(python);
        self
    }

    /// Extra directories for the default library probe, searched first
    /// (ignored when [`libraries`](Self::libraries) is set).
    pub fn library_paths(mut self, paths: Vec<PathBuf>) -> Self {
        self.library_paths = paths;
        self
    }

    /// The checker.
    pub fn build(self) -> DependencyChecker {
        let library_paths = self.library_paths;
        DependencyChecker {
            fs: self.fs.unwrap_or_else(|| Arc::new(RealFs)),
            gpu: self.gpu.unwrap_or_else(|| Arc::new(CudaProbe::new())),
            libraries: self
                .libraries
                .unwrap_or_else(|| Arc::new(SystemLibraries::new(library_paths))),
            executables: self.executables.unwrap_or_else(|| Arc::new(SystemPath)),
            env: self.env.unwrap_or_else(|| Arc::new(ProcessEnv)),
            python: self.python.unwrap_or_else(|| Arc::new(SystemPython::new())),
            cache: Mutex::new(PassCache::default()),
            python_answered: Condvar::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{
        FakeEnv, FakeExecutables, FakeFs, FakeGpu, FakeLibraries, FakePython, FakeWorld,
    };
    use crate::gpu::GpuDevice;
    use crate::requirements::BareDependency;
    use serde_json::json;

    const DIR: &str = "/plugins/ocr";

    fn req(manifest: serde_json::Value) -> Requirements {
        Requirements::from_manifest(&manifest).unwrap()
    }

    /// Checks `manifest` in `world` and compares the missing list.
    fn check(world: &FakeWorld, manifest: serde_json::Value, missing: &[&str]) -> DependencyReport {
        let report = world
            .checker()
            .check(&req(manifest), Path::new(DIR), &BTreeMap::new());
        assert_eq!(report.missing, missing);
        assert_eq!(report.available, missing.is_empty());
        assert_eq!(report.reason.is_none(), missing.is_empty());
        if let Some(reason) = &report.reason {
            assert!(reason.starts_with("Missing dependencies: "), "{reason}");
            for item in missing {
                assert!(reason.contains(item), "{reason:?} lacks {item:?}");
            }
        }
        report
    }

    #[test]
    fn nothing_required_is_available_and_probes_no_gpu() {
        let world = FakeWorld::new();
        check(&world, json!({"requires_gpu": false}), &[]);
        assert_eq!(world.gpu.probes(), 0);
    }

    #[test]
    fn a_variable_the_server_withholds_is_missing_and_says_why() {
        let world = FakeWorld::new();
        // Set here (as it is for the server until it takes it out of its
        // environment): a plugin never sees it all the same.
        world.env.set("FORGESYTE_ADMIN_TOKEN", "secret");
        world.env.set("FORGESYTE_KEY_PASSWORD", "pw");
        world.env.set("FORGESYTE_OTHER", "x");
        let report = check(
            &world,
            json!({"dependencies": ["env:FORGESYTE_ADMIN_TOKEN", "env:FORGESYTE_KEY_PASSWORD", "env:FORGESYTE_OTHER"]}),
            &[
                "env:FORGESYTE_ADMIN_TOKEN (the server's own secret: taken out of its environment \
                 as it starts, never passed to a plugin)",
                "env:FORGESYTE_KEY_PASSWORD (the server's own secret: taken out of its environment \
                 as it starts, never passed to a plugin)",
            ],
        );
        assert!(!report.available);
    }

    #[test]
    fn checker_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<DependencyChecker>();
        assert_send_sync::<DependencyReport>();
    }

    #[test]
    fn every_missing_item_in_order() {
        let world = FakeWorld::new();
        world.libraries.add("z");
        world.env.set("HOME", "/root");
        world.fs.add_file("/plugins/ocr/models/ok.bin", b"w");
        let report = check(
            &world,
            json!({
                "dependencies": ["lib:z", "lib:foo", "bin:ffmpeg", "env:HOME", "env:API_KEY"],
                "requires_gpu": true,
                "models": {"ok": "models/ok.bin", "det": "models/det.onnx", "abs": "/srv/m.bin"}
            }),
            &[
                "lib:foo",
                "bin:ffmpeg",
                "env:API_KEY",
                "gpu",
                "det (path: /plugins/ocr/models/det.onnx)",
                "abs (path: /srv/m.bin)",
            ],
        );
        let reason = report.reason.unwrap();
        assert!(
            reason.contains("GPU") && reason.contains("CUDA"),
            "{reason}"
        );
        assert!(reason.starts_with(
            "Missing dependencies: lib:foo, bin:ffmpeg, env:API_KEY, gpu, det (path: /plugins/ocr/models/det.onnx), abs (path: /srv/m.bin); "
        ));
    }

    #[test]
    fn plugin_dependencies_use_semver() {
        let checker = DependencyChecker::fake();
        let known = BTreeMap::from([
            ("base".to_string(), Ok(semver::Version::new(1, 4, 0))),
            ("odd".to_string(), Err(Some("v1.2".to_string()))),
            ("bare".to_string(), Err(None)),
        ]);
        let r = req(json!({"dependencies": [
            "plugin:base", "plugin:base@^1.2", "plugin:base@^2", "plugin:other@1",
            "plugin:odd", "plugin:odd@^1", "plugin:bare", "plugin:bare@>=0.0.0",
            "plugin:odd@*", "plugin:bare@*", "plugin:other@*"
        ]}));
        let report = checker.check(&r, Path::new(DIR), &known);
        assert_eq!(
            report.missing,
            [
                "plugin:base@^2 (found 1.4.0)",
                "plugin:other@^1",
                "plugin:odd@^1 (its version \"v1.2\" is not semver)",
                "plugin:bare@>=0.0.0 (it has no version)",
                "plugin:other@*"
            ]
        );
    }

    #[test]
    fn duplicates_are_named_once() {
        check(
            &FakeWorld::new(),
            json!({"dependencies": ["lib:foo", "foo", "lib:foo"]}),
            &["lib:foo"],
        );
    }

    #[test]
    fn gpu_specs_use_the_report() {
        let world = FakeWorld::new();
        world.gpu.set_devices(vec![GpuDevice {
            ordinal: 0,
            name: "T4".into(),
            total_memory_mb: 15 * 1024,
            compute_capability: (7, 5),
        }]);
        check(&world, json!({"requires_gpu": true}), &[]);
        let report = check(
            &world,
            json!({"requires_gpu": {"min_memory_mb": 16384, "min_compute_capability": "8.0"}}),
            &["gpu"],
        );
        let reason = report.reason.unwrap();
        assert!(
            reason.contains("15 GiB < 16 GiB") && reason.contains("compute 7.5 < 8.0"),
            "{reason}"
        );
        check(
            &world,
            json!({"requires_gpu": {"min_devices": 2}}),
            &["gpu"],
        );
    }

    #[test]
    fn answers_are_cached_until_cleared() {
        let world = FakeWorld::new();
        let checker = world.checker();
        let r = req(
            json!({"dependencies": ["lib:foo", "bin:ffmpeg", "env:KEY"], "requires_gpu": true, "models": {"m": "m.bin"}}),
        );
        let first = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(first.missing.len(), 5);
        world.libraries.add("foo");
        world.executables.add("ffmpeg");
        world.env.set("KEY", "v");
        world.gpu.set_devices(vec![GpuDevice {
            ordinal: 0,
            name: "A100".into(),
            total_memory_mb: 40 * 1024,
            compute_capability: (8, 0),
        }]);
        world.fs.add_file("/plugins/ocr/m.bin", b"");
        let again = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(again, first, "same pass: answered from the cache");
        assert_eq!(world.libraries.lookups(), 1);
        assert_eq!(world.gpu.probes(), 1);
        checker.clear_cache();
        let next = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(next, DependencyReport::ok());
        assert_eq!(world.libraries.lookups(), 2);
        assert_eq!(world.libraries.refreshes(), 1);
    }

    #[test]
    fn model_errors_count_as_missing() {
        let world = FakeWorld::new();
        world.fs.add_file("/plugins/ocr/m.bin", b"");
        world
            .fs
            .fail("/plugins/ocr/m.bin", std::io::ErrorKind::PermissionDenied);
        check(
            &world,
            json!({"models": {"m": "./m.bin"}}),
            &["m (path: /plugins/ocr/m.bin)"],
        );
    }

    #[test]
    fn resolve_model_path_never_uses_cwd() {
        let dir = Path::new("/p/x");
        assert_eq!(
            DependencyChecker::resolve_model_path(dir, Path::new("a/b.bin")),
            PathBuf::from("/p/x/a/b.bin")
        );
        assert_eq!(
            DependencyChecker::resolve_model_path(dir, Path::new("./a/./b.bin")),
            PathBuf::from("/p/x/a/b.bin")
        );
        assert_eq!(
            DependencyChecker::resolve_model_path(dir, Path::new("/abs/m")),
            PathBuf::from("/abs/m")
        );
        assert_eq!(
            DependencyChecker::resolve_model_path(dir, Path::new(".")),
            PathBuf::from("/p/x")
        );
        assert_eq!(
            DependencyChecker::resolve_model_path(dir, Path::new("../shared/m")),
            PathBuf::from("/p/x/../shared/m")
        );
    }

    #[test]
    fn into_error_carries_the_reason() {
        assert!(DependencyReport::ok().into_error().is_none());
        let world = FakeWorld::new();
        let report = check(
            &world,
            json!({"dependencies": ["lib:a", "bin:b"]}),
            &["lib:a", "bin:b"],
        );
        let err = report.clone().into_error().unwrap();
        assert_eq!(err.missing, report.missing);
        assert_eq!(err.to_string(), "Missing dependencies: lib:a, bin:b");
        let bare = DependencyReport {
            available: false,
            reason: None,
            missing: vec!["x".into()],
        };
        assert_eq!(bare.into_error().unwrap().reason, "Missing dependencies: x");
    }

    #[test]
    fn builder_takes_each_seam() {
        let checker = DependencyChecker::builder()
            .fs(Arc::new(FakeFs::new().add_file("/m", b"")))
            .gpu(Arc::new(FakeGpu::none("no GPU here (CUDA absent)")))
            .libraries(Arc::new(FakeLibraries::with(&["c"])))
            .executables(Arc::new(FakeExecutables::with(&["sh"])))
            .env(Arc::new(FakeEnv::with(&[("PATH", "/bin")])))
            .python(Arc::new(FakePython::new().add("/py", &["numpy"])))
            .build();
        let r = Requirements {
            dependencies: vec![
                Dependency::Lib("c".into()),
                Dependency::Bin("sh".into()),
                Dependency::Env("PATH".into()),
                Dependency::Py {
                    package: "numpy".into(),
                    bare: false,
                    version: None,
                },
            ],
            gpu: GpuRequirement::None,
            models: vec![("m".into(), "/m".into())],
            python: Some("/py".into()),
            python_wanted: None,
        };
        assert_eq!(
            checker.check(&r, Path::new("/"), &BTreeMap::new()),
            DependencyReport::ok()
        );
        assert_eq!(
            checker.gpu_report().reason.as_deref(),
            Some("no GPU here (CUDA absent)")
        );
    }

    const PY: &str = "/venv/bin/python";

    fn py_req(manifest: serde_json::Value, python: Option<&str>) -> Requirements {
        let mut r = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
        r.python = python.map(PathBuf::from);
        r
    }

    #[test]
    fn python_packages_missing_in_manifest_order() {
        let world = FakeWorld::new();
        world.python.add(PY, &["json"]);
        let r = py_req(
            json!({"dependencies": ["torch", "numpy", "json"]}),
            Some(PY),
        );
        let report = world.checker().check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(report.missing, ["torch", "numpy"]);
        assert_eq!(
            report.reason.as_deref(),
            Some("Missing dependencies: torch, numpy")
        );
        // Unprefetched: one run per package (the fallback).
        assert_eq!(world.python.calls(), 3);
    }

    #[test]
    fn python_versions_checked_in_the_same_run() {
        let world = FakeWorld::new();
        world
            .python
            .add_version(PY, "numpy", "1.26.4")
            .add_version(PY, "odd", "not-a-version")
            .add(PY, &["cv2"]);
        let checker = world.checker();
        let r = py_req(
            json!({"dependencies": [
                "numpy>=1.24, <2", "numpy>=2", "py:numpy>=2", "numpy", "cv2>=4", "odd>=1", "torch==2.*"
            ]}),
            Some(PY),
        );
        checker.prefetch_python(Path::new(PY), r.python_queries());
        assert_eq!(world.python.calls(), 1, "one run asks names and versions");
        let report = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(world.python.calls(), 1);
        // `py:numpy>=2` is `numpy>=2`, named once; a module with no
        // distribution of that name (`cv2`) has no version to check.
        assert_eq!(report.missing.len(), 4, "{:?}", report.missing);
        assert_eq!(
            report.missing[..2],
            [
                "numpy>=2 (1.26.4 installed)",
                "cv2>=4 (a module of that name is found, but no installed distribution is named \
                 so: write the name pip installs it under)"
            ]
        );
        assert!(
            report.missing[2].starts_with(
                "odd>=1 (installed version \"not-a-version\" is not a PEP 440 version: "
            ),
            "{:?}",
            report.missing
        );
        assert_eq!(report.missing[3], "torch==2.*");
    }

    #[test]
    fn prefetch_then_check_costs_one_run() {
        let world = FakeWorld::new();
        world.python.add(PY, &["numpy", "torch"]);
        let checker = world.checker();
        let r = py_req(
            json!({"dependencies": ["torch.cuda", "py:numpy", "lib:c", "cv2", "numpy", "torch.cuda"]}),
            Some(PY),
        );
        checker.prefetch_python(Path::new(PY), r.python_queries());
        assert_eq!(world.python.calls(), 1);
        assert_eq!(
            world.python.asked()[0].1,
            ["torch.cuda", "numpy", "cv2"],
            "duplicates asked once"
        );
        let report = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(
            report.missing,
            ["lib:c", "cv2"],
            "numpy and py:numpy named once"
        );
        // Already answered: prefetching again asks nothing.
        checker.prefetch_python(Path::new(PY), ["numpy".to_string(), "cv2".to_string()]);
        assert_eq!(world.python.calls(), 1);
        // A new pass asks again.
        checker.clear_cache();
        checker.prefetch_python_for([&r]);
        assert_eq!(world.python.calls(), 2);
        checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(world.python.calls(), 2);
    }

    /// Many packages are asked in several runs, each of at most
    /// `MAX_ASKED_BYTES` of names (the kernel bounds a run's arguments),
    /// every one answered once.
    #[test]
    fn a_pass_of_many_packages_asks_in_runs_of_bounded_arguments() {
        let world = FakeWorld::new();
        world.python.add(PY, &["numpy"]);
        let checker = world.checker();
        let names: Vec<String> = (0..3000).map(|i| format!("{:0>60}", i)).collect();
        checker.prefetch_python(Path::new(PY), names.clone());
        let asked = world.python.asked();
        assert!(asked.len() >= 3, "{} runs", asked.len());
        for (_, run) in &asked {
            let bytes: usize = run.iter().map(|n| n.len() + 1).sum();
            assert!(bytes <= MAX_ASKED_BYTES, "a run of {bytes} bytes of names");
        }
        let all: Vec<String> = asked.into_iter().flat_map(|(_, run)| run).collect();
        assert_eq!(all, names);
    }

    /// A check beside a planned prefetch: one that needs the planned
    /// interpreter waits for its run (no second run), one that needs no
    /// package, or another interpreter, does not wait for it.
    #[test]
    fn a_check_waits_for_its_own_interpreter_only() {
        let world = FakeWorld::new();
        let delay = std::time::Duration::from_millis(600);
        world.python.add(PY, &["numpy"]).slow(PY, delay);
        world.python.add("/other/bin/python", &["cv2"]);
        let slow = py_req(json!({"dependencies": ["numpy"]}), Some(PY));
        let other = py_req(json!({"dependencies": ["cv2"]}), Some("/other/bin/python"));
        let none = py_req(json!({"dependencies": []}), Some(PY));
        let checker = world.checker();
        let check = |r: &Requirements| checker.check(r, Path::new(DIR), &BTreeMap::new());
        let plan = checker.python_prefetch([&slow]);
        std::thread::scope(|scope| {
            let started = std::time::Instant::now();
            let waiting = scope.spawn(move || (check(&slow), started.elapsed()));
            // Not yet run: the waiting check has not asked on its own.
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert_eq!(world.python.calls(), 0, "a check asked beside the plan");
            assert!(
                !waiting.is_finished(),
                "a check did not wait for the planned run"
            );
            // The others go on while it waits.
            let quick = std::time::Instant::now();
            assert!(check(&none).available);
            assert!(check(&other).available);
            assert!(quick.elapsed() < delay / 2, "{:?}", quick.elapsed());
            assert_eq!(world.python.calls(), 1, "the other interpreter's own run");
            plan.run();
            let (report, waited) = waiting.join().unwrap();
            assert!(report.available, "{report:?}");
            assert!(
                waited >= delay,
                "answered before its interpreter: {waited:?}"
            );
        });
        assert_eq!(world.python.calls(), 2, "one run per interpreter");
    }

    /// A new pass's `clear_cache` while a check waits for a planned run:
    /// the run still counts as planned, and its end answers the check.
    #[test]
    fn a_check_waiting_for_a_planned_run_outlives_a_cache_clear() {
        let world = FakeWorld::new();
        world.python.add(PY, &["numpy"]);
        let r = py_req(json!({"dependencies": ["numpy"]}), Some(PY));
        let checker = world.checker();
        let plan = checker.python_prefetch([&r]);
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| checker.check(&r, Path::new(DIR), &BTreeMap::new()));
            std::thread::sleep(std::time::Duration::from_millis(50));
            checker.clear_cache();
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiting.is_finished(), "it asked beside the plan");
            plan.run();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !waiting.is_finished() {
                if std::time::Instant::now() > deadline {
                    // Let it go (it asks on its own), then fail.
                    checker.cache.lock().python_asking.clear();
                    checker.python_answered.notify_all();
                    panic!("the check still waits after its run ended");
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(waiting.join().unwrap().available);
        });
        assert_eq!(world.python.calls(), 1);
    }

    /// A plan dropped without running lets the checks waiting for it ask
    /// on their own.
    #[test]
    fn a_plan_dropped_unrun_lets_its_checks_ask() {
        let world = FakeWorld::new();
        world.python.add(PY, &["numpy"]);
        let r = py_req(json!({"dependencies": ["numpy", "torch"]}), Some(PY));
        let checker = world.checker();
        let plan = checker.python_prefetch([&r]);
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| checker.check(&r, Path::new(DIR), &BTreeMap::new()));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiting.is_finished());
            drop(plan);
            assert_eq!(waiting.join().unwrap().missing, ["torch"]);
        });
        assert_eq!(world.python.calls(), 2, "each package on its own");
    }

    /// Nine interpreters, two of them hung for a while: the others are
    /// asked while they hang (no batch waits for its slowest), the shared
    /// interpreter first.
    #[test]
    fn a_hung_interpreter_holds_up_no_batch() {
        let world = FakeWorld::new();
        let hang = std::time::Duration::from_millis(800);
        let mut reqs = Vec::new();
        for i in 0..9 {
            let py = format!("/venv{i}/bin/python");
            world.python.add(&py, &["numpy"]);
            if i < 2 {
                world.python.slow(&py, hang);
            }
            reqs.push(py_req(json!({"dependencies": ["numpy"]}), Some(&py)));
        }
        // Three plugins share the last interpreter.
        let shared = reqs[8].clone();
        reqs.extend([shared.clone(), shared.clone()]);
        let checker = world.checker();
        let plan = checker.python_prefetch(&reqs);
        assert_eq!(
            plan.asks[0].0,
            Path::new("/venv8/bin/python"),
            "{:?}",
            plan.asks
        );
        std::thread::scope(|scope| {
            scope.spawn(|| plan.run());
            let started = std::time::Instant::now();
            for r in &reqs[2..] {
                assert!(checker.check(r, Path::new(DIR), &BTreeMap::new()).available);
            }
            assert!(
                started.elapsed() < hang / 2,
                "waited for the hung ones: {:?}",
                started.elapsed()
            );
        });
        assert_eq!(world.python.calls(), 9);
    }

    /// Each plugin's own virtualenv: their interpreters are asked at once,
    /// so slow ones cost the pass one wait, not one each.
    #[test]
    fn interpreters_are_asked_at_once() {
        let world = FakeWorld::new();
        let delay = std::time::Duration::from_millis(400);
        let reqs: Vec<Requirements> = (0..3)
            .map(|i| {
                let py = format!("/venv{i}/bin/python");
                world.python.add(&py, &["numpy"]).slow(&py, delay);
                py_req(json!({"dependencies": ["numpy"]}), Some(&py))
            })
            .collect();
        let checker = world.checker();
        let started = std::time::Instant::now();
        checker.prefetch_python_for(&reqs);
        let took = started.elapsed();
        assert_eq!(world.python.calls(), 3);
        assert!(took < delay * 5 / 2, "asked one after another: {took:?}");
        for r in &reqs {
            assert!(
                checker
                    .check(r, Path::new(DIR), &BTreeMap::new())
                    .missing
                    .is_empty()
            );
        }
        assert_eq!(world.python.calls(), 3, "answered from the prefetch");
    }

    #[test]
    fn no_interpreter_means_missing() {
        let world = FakeWorld::new();
        let r = py_req(json!({"dependencies": ["torch", "py:numpy"]}), None);
        check_req(
            &world,
            &r,
            &[
                "torch (no Python interpreter)",
                "py:numpy (no Python interpreter)",
            ],
        );
        assert_eq!(world.python.calls(), 0);
        // Nothing to prefetch either.
        world.checker().prefetch_python_for([&r]);
        assert_eq!(world.python.calls(), 0);
        // The interpreter the loader looked for, when it says.
        let mut r = r;
        r.python_wanted = Some("/nonexistent/py".into());
        check_req(
            &world,
            &r,
            &[
                "torch (python interpreter /nonexistent/py)",
                "py:numpy (python interpreter /nonexistent/py)",
            ],
        );
    }

    #[test]
    fn a_failing_interpreter_is_asked_once_per_pass_and_named() {
        let world = FakeWorld::new();
        world
            .python
            .add(PY, &["numpy"])
            .fail(PY, "timed out after 10s");
        let checker = world.checker();
        let r = py_req(
            json!({"dependencies": ["numpy", "py:torch", "env:X"]}),
            Some(PY),
        );
        checker.prefetch_python_for([&r, &r]);
        assert_eq!(world.python.calls(), 1);
        let report = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(
            report.missing,
            [
                "numpy (cannot ask /venv/bin/python: timed out after 10s)",
                "py:torch (cannot ask /venv/bin/python: timed out after 10s)",
                "env:X"
            ]
        );
        checker.prefetch_python(Path::new(PY), ["numpy".to_string()]);
        assert_eq!(
            world.python.calls(),
            1,
            "the error is remembered for the pass"
        );
        world.python.heal(PY);
        checker.clear_cache();
        let report = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(report.missing, ["py:torch", "env:X"]);
    }

    #[test]
    fn a_failing_fallback_is_remembered_too() {
        let world = FakeWorld::new();
        let r = py_req(json!({"dependencies": ["a", "b"]}), Some("/nowhere/python"));
        check_req(
            &world,
            &r,
            &[
                "a (cannot ask /nowhere/python: no such interpreter in this fake world)",
                "b (cannot ask /nowhere/python: no such interpreter in this fake world)",
            ],
        );
        assert_eq!(world.python.calls(), 1);
    }

    /// A probe whose message does not name the interpreter, and that
    /// answers the wrong number of results for another.
    #[derive(Debug)]
    struct OddProbe;

    impl PythonProbe for OddProbe {
        fn find(&self, interpreter: &Path, _: &[String]) -> Result<Vec<PythonAnswer>, String> {
            if interpreter == Path::new("/short") {
                Ok(vec![PythonAnswer::Found])
            } else {
                Err("boom".into())
            }
        }
    }

    #[test]
    fn odd_probe_answers_are_errors() {
        let checker = DependencyChecker::builder()
            .python(Arc::new(OddProbe))
            .build();
        let r = py_req(json!({"dependencies": ["a", "b"]}), Some("/short"));
        checker.prefetch_python_for([&r]);
        let report = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(
            report.missing,
            [
                "a (cannot ask /short: answered 1 results for 2 packages)",
                "b (cannot ask /short: answered 1 results for 2 packages)"
            ]
        );
        let r = py_req(json!({"dependencies": ["a"]}), Some("/other"));
        let report = checker.check(&r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(report.missing, ["a (cannot ask /other: boom)"]);
    }

    fn check_req(world: &FakeWorld, r: &Requirements, missing: &[&str]) {
        let report = world.checker().check(r, Path::new(DIR), &BTreeMap::new());
        assert_eq!(report.missing, missing);
    }

    #[test]
    fn report_serialises_like_the_seed_dict() {
        let v = serde_json::to_value(DependencyReport::ok()).unwrap();
        assert_eq!(v, json!({"available": true, "reason": null, "missing": []}));
    }
}
