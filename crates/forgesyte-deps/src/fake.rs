//! Fakes of every seam, for tests in this crate and in others (feature
//! `testing`).
//!
//! Each fake is a cheap handle: clones share one world, and every mutator
//! takes `&self` and returns another handle, so both styles work:
//!
//! ```
//! # #[cfg(feature = "testing")] {
//! use forgesyte_deps::fake::{FakeFs, FakeLibraries};
//! let fs = FakeFs::new()
//!     .add_file("/plugins/ocr/manifest.json", r#"{"name": "ocr"}"#)
//!     .add_symlink("/plugins/ocr/lib.so", "/elsewhere/lib.so");
//! let libs = FakeLibraries::with(&["c"]);
//! libs.add("z"); // later, through any clone
//! # }
//! ```
//!
//! Paths in [`FakeFs`] are absolute; a relative path is taken from `/`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::checker::DependencyChecker;
use crate::env::EnvProbe;
use crate::exec::ExecutableProbe;
use crate::fs::{DirEntry, FileSystem, FsMetadata};
use crate::gpu::{GpuDevice, GpuProbe, GpuReport};
use crate::libs::LibraryProbe;
use crate::python::{PythonAnswer, PythonProbe};

/// How many symbolic links one resolution may follow (Linux's limit).
const MAX_LINKS: usize = 40;

/// One fake world: every seam, empty to start with, and a checker on it.
#[derive(Debug, Clone)]
pub struct FakeWorld {
    /// The filesystem.
    pub fs: FakeFs,
    /// The GPU (none at first).
    pub gpu: FakeGpu,
    /// The shared libraries.
    pub libraries: FakeLibraries,
    /// The executables on `PATH`.
    pub executables: FakeExecutables,
    /// The environment.
    pub env: FakeEnv,
    /// The Python interpreters and their packages (none at first).
    pub python: FakePython,
}

impl FakeWorld {
    /// An empty world with no GPU (reason: `no GPU in this fake world (CUDA absent)`).
    pub fn new() -> Self {
        FakeWorld {
            fs: FakeFs::new(),
            gpu: FakeGpu::none("no GPU in this fake world (CUDA absent)"),
            libraries: FakeLibraries::new(),
            executables: FakeExecutables::new(),
            env: FakeEnv::new(),
            python: FakePython::new(),
        }
    }

    /// A checker that sees this world (and its later changes, after
    /// [`DependencyChecker::clear_cache`]).
    pub fn checker(&self) -> DependencyChecker {
        DependencyChecker::builder()
            .fs(Arc::new(self.fs.clone()))
            .gpu(Arc::new(self.gpu.clone()))
            .libraries(Arc::new(self.libraries.clone()))
            .executables(Arc::new(self.executables.clone()))
            .env(Arc::new(self.env.clone()))
            .python(Arc::new(self.python.clone()))
            .build()
    }
}

impl Default for FakeWorld {
    fn default() -> Self {
        FakeWorld::new()
    }
}

// ---------------------------------------------------------------- filesystem

#[derive(Debug, Clone)]
enum Node {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
}

#[derive(Debug, Default)]
struct FsState {
    nodes: BTreeMap<PathBuf, Node>,
    failures: BTreeMap<PathBuf, Injected>,
}

/// A failure injected on a path of a [`FakeFs`].
#[derive(Debug, Clone, Copy)]
enum Injected {
    /// An error of this kind.
    Kind(io::ErrorKind),
    /// The OS error of this number.
    Os(i32),
}

/// An in-memory filesystem tree with files, directories, symbolic links and
/// injected errors. `/` always exists.
#[derive(Debug, Clone, Default)]
pub struct FakeFs {
    state: Arc<Mutex<FsState>>,
}

impl FakeFs {
    /// An empty tree (only `/`).
    pub fn new() -> Self {
        FakeFs::default()
    }

    /// Adds (or replaces) a file, creating its parent directories.
    pub fn add_file(&self, path: impl AsRef<Path>, bytes: impl Into<Vec<u8>>) -> Self {
        self.insert(path.as_ref(), Node::File(bytes.into()))
    }

    /// Adds a directory and its parents.
    pub fn add_dir(&self, path: impl AsRef<Path>) -> Self {
        self.insert(path.as_ref(), Node::Dir)
    }

    /// Adds a symbolic link at `path` pointing to `target` (absolute, or
    /// relative to the link's directory; it need not exist).
    pub fn add_symlink(&self, path: impl AsRef<Path>, target: impl AsRef<Path>) -> Self {
        self.insert(path.as_ref(), Node::Symlink(target.as_ref().to_path_buf()))
    }

    /// Removes the entry at `path` and everything beneath it.
    pub fn remove(&self, path: impl AsRef<Path>) -> Self {
        let key = lexical(path.as_ref());
        self.state
            .lock()
            .nodes
            .retain(|p, _| !(p == &key || p.starts_with(&key)));
        self.clone()
    }

    /// Makes every operation on `path` (as given, or as it resolves) fail
    /// with `kind`; `exists` answers false.
    pub fn fail(&self, path: impl AsRef<Path>, kind: io::ErrorKind) -> Self {
        self.state
            .lock()
            .failures
            .insert(lexical(path.as_ref()), Injected::Kind(kind));
        self.clone()
    }

    /// Makes every operation on `path` fail with the OS error `errno`
    /// (`EMFILE`: the process is out of descriptors).
    pub fn fail_os(&self, path: impl AsRef<Path>, errno: i32) -> Self {
        self.state
            .lock()
            .failures
            .insert(lexical(path.as_ref()), Injected::Os(errno));
        self.clone()
    }

    /// Removes an injected failure.
    pub fn heal(&self, path: impl AsRef<Path>) -> Self {
        self.state.lock().failures.remove(&lexical(path.as_ref()));
        self.clone()
    }

    fn insert(&self, path: &Path, node: Node) -> Self {
        let key = lexical(path);
        let mut state = self.state.lock();
        for ancestor in key.ancestors().skip(1) {
            if ancestor.parent().is_some() {
                state
                    .nodes
                    .entry(ancestor.to_path_buf())
                    .or_insert(Node::Dir);
            }
        }
        if key.parent().is_some() {
            state.nodes.insert(key, node);
        }
        drop(state);
        self.clone()
    }

    /// Resolves `path` to the key of an existing node (or `/`), following
    /// links (the last one only when `follow_last`), applying injected
    /// failures to the path as given and as resolved.
    fn resolve(state: &FsState, path: &Path, follow_last: bool) -> io::Result<PathBuf> {
        Self::injected(state, &lexical(path))?;
        let resolved = Self::walk(state, path, follow_last)?;
        Self::injected(state, &resolved)?;
        Ok(resolved)
    }

    fn injected(state: &FsState, key: &Path) -> io::Result<()> {
        match state.failures.get(key) {
            Some(Injected::Kind(kind)) => Err(io::Error::new(
                *kind,
                format!("injected failure on {}", key.display()),
            )),
            Some(Injected::Os(errno)) => Err(io::Error::from_raw_os_error(*errno)),
            None => Ok(()),
        }
    }

    /// Walks `path` component by component from `/`, resolving `..` after
    /// the links before it (as the kernel does), following at most
    /// [`MAX_LINKS`] links.
    fn walk(state: &FsState, path: &Path, follow_last: bool) -> io::Result<PathBuf> {
        let mut pending: VecDeque<OsString> = path
            .components()
            .map(|c| c.as_os_str().to_os_string())
            .collect();
        let mut cur = PathBuf::from("/");
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            match Path::new(&part).components().next() {
                Some(Component::RootDir | Component::Prefix(_)) => {
                    cur = PathBuf::from("/");
                    continue;
                }
                Some(Component::ParentDir) => {
                    cur.pop();
                    continue;
                }
                Some(Component::Normal(_)) => {}
                Some(Component::CurDir) | None => continue,
            }
            let next = cur.join(&part);
            match state.nodes.get(&next) {
                None => return Err(not_found(path)),
                Some(Node::Dir) => cur = next,
                Some(Node::File(_)) => {
                    if !pending.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::NotADirectory,
                            format!("not a directory: {}", next.display()),
                        ));
                    }
                    cur = next;
                }
                Some(Node::Symlink(target)) => {
                    if pending.is_empty() && !follow_last {
                        cur = next;
                        continue;
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(io::Error::other(format!(
                            "too many levels of symbolic links: {}",
                            path.display()
                        )));
                    }
                    // A relative target continues from the link's directory
                    // (`cur`); an absolute one starts with its own `/`.
                    let mut parts: VecDeque<OsString> = target
                        .components()
                        .map(|c| c.as_os_str().to_os_string())
                        .collect();
                    parts.extend(pending.drain(..));
                    pending = parts;
                }
            }
        }
        Ok(cur)
    }

    fn node(state: &FsState, key: &Path) -> Option<Node> {
        if key == Path::new("/") {
            return Some(Node::Dir);
        }
        state.nodes.get(key).cloned()
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no such file or directory: {}", path.display()),
    )
}

/// The absolute path with `.` dropped and `..` applied lexically (for keys).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out = PathBuf::from("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

fn meta_of(node: &Node, is_symlink: bool) -> FsMetadata {
    match node {
        Node::File(bytes) => FsMetadata {
            len: bytes.len() as u64,
            is_dir: false,
            is_file: true,
            is_symlink,
        },
        Node::Dir => FsMetadata {
            len: 0,
            is_dir: true,
            is_file: false,
            is_symlink,
        },
        Node::Symlink(_) => FsMetadata {
            is_symlink: true,
            ..FsMetadata::default()
        },
    }
}

impl FileSystem for FakeFs {
    fn exists(&self, path: &Path) -> bool {
        let state = self.state.lock();
        Self::resolve(&state, path, true).is_ok()
    }

    fn metadata(&self, path: &Path) -> io::Result<FsMetadata> {
        let state = self.state.lock();
        let own = Self::resolve(&state, path, false)?;
        match Self::node(&state, &own) {
            Some(Node::Symlink(_)) => match Self::resolve(&state, path, true) {
                Ok(target) => Ok(Self::node(&state, &target)
                    .map(|n| meta_of(&n, true))
                    .unwrap_or_else(|| meta_of(&Node::Symlink(PathBuf::new()), true))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Ok(meta_of(&Node::Symlink(PathBuf::new()), true))
                }
                Err(e) => Err(e),
            },
            Some(node) => Ok(meta_of(&node, false)),
            None => Err(not_found(path)),
        }
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let state = self.state.lock();
        let key = Self::resolve(&state, path, true)?;
        match Self::node(&state, &key) {
            Some(Node::File(bytes)) => {
                let n = usize::try_from(limit.saturating_add(1))
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                Ok(bytes[..n].to_vec())
            }
            Some(_) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("is a directory: {}", path.display()),
            )),
            None => Err(not_found(path)),
        }
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let state = self.state.lock();
        let key = Self::resolve(&state, path, true)?;
        match Self::node(&state, &key) {
            Some(Node::Dir) => {}
            Some(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("not a directory: {}", path.display()),
                ));
            }
            None => return Err(not_found(path)),
        }
        let mut entries: Vec<DirEntry> = state
            .nodes
            .keys()
            .filter(|p| p.parent() == Some(key.as_path()))
            .filter_map(|p| {
                let name = p.file_name()?.to_os_string();
                let child = path.join(&name);
                let is_dir = Self::resolve(&state, &child, true)
                    .ok()
                    .and_then(|k| Self::node(&state, &k))
                    .is_some_and(|n| matches!(n, Node::Dir));
                Some(DirEntry {
                    name,
                    path: child,
                    is_dir,
                })
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        let state = self.state.lock();
        Self::resolve(&state, path, true)
    }
}

// ---------------------------------------------------------------- GPU

/// A GPU probe that answers a fixed (changeable) report and counts probes.
#[derive(Debug, Clone)]
pub struct FakeGpu {
    report: Arc<Mutex<GpuReport>>,
    probes: Arc<AtomicUsize>,
}

impl FakeGpu {
    /// No GPU, for `reason`.
    pub fn none(reason: impl Into<String>) -> Self {
        FakeGpu::with_report(GpuReport::unavailable(reason))
    }

    /// These devices under driver `12.8` (none: unavailable).
    pub fn with_devices(devices: Vec<GpuDevice>) -> Self {
        FakeGpu::with_report(GpuReport::with_devices(Some("12.8".into()), devices))
    }

    /// Exactly this report.
    pub fn with_report(report: GpuReport) -> Self {
        FakeGpu {
            report: Arc::new(Mutex::new(report)),
            probes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Replaces the devices (driver `12.8`).
    pub fn set_devices(&self, devices: Vec<GpuDevice>) -> Self {
        self.set_report(GpuReport::with_devices(Some("12.8".into()), devices))
    }

    /// Replaces the report.
    pub fn set_report(&self, report: GpuReport) -> Self {
        *self.report.lock() = report;
        self.clone()
    }

    /// How many times [`GpuProbe::probe`] was called.
    pub fn probes(&self) -> usize {
        self.probes.load(Ordering::Relaxed)
    }
}

impl GpuProbe for FakeGpu {
    fn probe(&self) -> GpuReport {
        self.probes.fetch_add(1, Ordering::Relaxed);
        self.report.lock().clone()
    }
}

// ---------------------------------------------------------------- names

/// A set of names with lookup and refresh counters.
#[derive(Debug, Clone, Default)]
struct NameSet {
    names: Arc<Mutex<BTreeSet<String>>>,
    lookups: Arc<AtomicUsize>,
    refreshes: Arc<AtomicUsize>,
}

impl NameSet {
    fn with(names: &[&str]) -> Self {
        let set = NameSet::default();
        set.names.lock().extend(names.iter().map(|n| n.to_string()));
        set
    }

    fn find(&self, name: &str, dir: &str) -> Option<PathBuf> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.names
            .lock()
            .contains(name)
            .then(|| Path::new(dir).join(name))
    }
}

/// Shared libraries by exact name (`"c"` and `"libc.so.6"` are different
/// names), found at `/fake/lib/NAME`.
#[derive(Debug, Clone, Default)]
pub struct FakeLibraries {
    set: NameSet,
}

impl FakeLibraries {
    /// No library.
    pub fn new() -> Self {
        FakeLibraries::default()
    }

    /// These libraries.
    pub fn with(names: &[&str]) -> Self {
        FakeLibraries {
            set: NameSet::with(names),
        }
    }

    /// Installs a library.
    pub fn add(&self, name: &str) -> Self {
        self.set.names.lock().insert(name.to_string());
        self.clone()
    }

    /// Uninstalls a library.
    pub fn remove(&self, name: &str) -> Self {
        self.set.names.lock().remove(name);
        self.clone()
    }

    /// How many lookups reached this probe.
    pub fn lookups(&self) -> usize {
        self.set.lookups.load(Ordering::Relaxed)
    }

    /// How many times [`LibraryProbe::refresh`] was called.
    pub fn refreshes(&self) -> usize {
        self.set.refreshes.load(Ordering::Relaxed)
    }
}

impl LibraryProbe for FakeLibraries {
    fn find(&self, name: &str) -> Option<PathBuf> {
        self.set.find(name, "/fake/lib")
    }

    fn refresh(&self) {
        self.set.refreshes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Executables by name, found at `/fake/bin/NAME`.
#[derive(Debug, Clone, Default)]
pub struct FakeExecutables {
    set: NameSet,
}

impl FakeExecutables {
    /// No executable.
    pub fn new() -> Self {
        FakeExecutables::default()
    }

    /// These executables.
    pub fn with(names: &[&str]) -> Self {
        FakeExecutables {
            set: NameSet::with(names),
        }
    }

    /// Installs an executable.
    pub fn add(&self, name: &str) -> Self {
        self.set.names.lock().insert(name.to_string());
        self.clone()
    }

    /// Uninstalls an executable.
    pub fn remove(&self, name: &str) -> Self {
        self.set.names.lock().remove(name);
        self.clone()
    }

    /// How many lookups reached this probe.
    pub fn lookups(&self) -> usize {
        self.set.lookups.load(Ordering::Relaxed)
    }
}

impl ExecutableProbe for FakeExecutables {
    fn find(&self, name: &str) -> Option<PathBuf> {
        self.set.find(name, "/fake/bin")
    }
}

/// An environment of variables.
#[derive(Debug, Clone, Default)]
pub struct FakeEnv {
    vars: Arc<Mutex<BTreeMap<String, String>>>,
}

impl FakeEnv {
    /// No variable.
    pub fn new() -> Self {
        FakeEnv::default()
    }

    /// These `(name, value)` pairs.
    pub fn with(vars: &[(&str, &str)]) -> Self {
        let env = FakeEnv::new();
        for (k, v) in vars {
            env.set(k, v);
        }
        env
    }

    /// Sets a variable.
    pub fn set(&self, name: &str, value: &str) -> Self {
        self.vars.lock().insert(name.to_string(), value.to_string());
        self.clone()
    }

    /// Unsets a variable.
    pub fn unset(&self, name: &str) -> Self {
        self.vars.lock().remove(name);
        self.clone()
    }
}

impl EnvProbe for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.lock().get(name).cloned()
    }
}

// ---------------------------------------------------------------- Python

#[derive(Debug, Default)]
struct PythonState {
    /// Interpreter → the top-level packages it has.
    packages: BTreeMap<PathBuf, BTreeSet<String>>,
    /// Interpreter → the injected failure.
    failures: BTreeMap<PathBuf, String>,
    /// Every question asked, in order.
    asked: Vec<(PathBuf, Vec<String>)>,
    /// Interpreter → how long each run takes.
    delays: BTreeMap<PathBuf, std::time::Duration>,
    /// (Interpreter, package) → its installed version.
    versions: BTreeMap<(PathBuf, String), String>,
}

/// Python interpreters by path, each with a set of packages, counting the
/// runs ([`calls`](Self::calls)) the way the real probe would cost them.
///
/// Like the real probe, a dotted name is answered by its top-level package
/// (`torch.cuda` is found when `torch` was added). An interpreter never
/// added answers `Err` (`PATH: no such interpreter in this fake world`); an
/// injected failure answers `Err` (`PATH: MESSAGE`).
#[derive(Debug, Clone, Default)]
pub struct FakePython {
    state: Arc<Mutex<PythonState>>,
    calls: Arc<AtomicUsize>,
}

impl FakePython {
    /// No interpreter.
    pub fn new() -> Self {
        FakePython::default()
    }

    /// Adds `interpreter` (when new) and installs `packages` in it
    /// (top-level names: `torch`, `numpy`); `&[]` adds an empty interpreter.
    pub fn add(&self, interpreter: impl AsRef<Path>, packages: &[&str]) -> Self {
        self.state
            .lock()
            .packages
            .entry(interpreter.as_ref().to_path_buf())
            .or_default()
            .extend(packages.iter().map(|p| p.to_string()));
        self.clone()
    }

    /// Installs `package` at `version` in `interpreter` (added when new):
    /// found as a package, and its version answers a `=NAME` query.
    pub fn add_version(&self, interpreter: impl AsRef<Path>, package: &str, version: &str) -> Self {
        self.add(&interpreter, &[package]);
        self.state.lock().versions.insert(
            (interpreter.as_ref().to_path_buf(), package.to_owned()),
            version.to_owned(),
        );
        self.clone()
    }

    /// Uninstalls a package from `interpreter`.
    pub fn remove(&self, interpreter: impl AsRef<Path>, package: &str) -> Self {
        if let Some(set) = self.state.lock().packages.get_mut(interpreter.as_ref()) {
            set.remove(package);
        }
        self.clone()
    }

    /// Makes every run of `interpreter` fail with `message`.
    pub fn fail(&self, interpreter: impl AsRef<Path>, message: impl Into<String>) -> Self {
        self.state
            .lock()
            .failures
            .insert(interpreter.as_ref().to_path_buf(), message.into());
        self.clone()
    }

    /// Makes every run of `interpreter` take `delay` first (a slow start,
    /// a hung one up to its time limit).
    pub fn slow(&self, interpreter: impl AsRef<Path>, delay: std::time::Duration) -> Self {
        self.state
            .lock()
            .delays
            .insert(interpreter.as_ref().to_path_buf(), delay);
        self.clone()
    }

    /// Removes an injected failure.
    pub fn heal(&self, interpreter: impl AsRef<Path>) -> Self {
        self.state.lock().failures.remove(interpreter.as_ref());
        self.clone()
    }

    /// How many interpreter runs were asked for ([`PythonProbe::find`]
    /// calls), failed ones included.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// Every question asked so far: `(interpreter, packages)` in order.
    pub fn asked(&self) -> Vec<(PathBuf, Vec<String>)> {
        self.state.lock().asked.clone()
    }
}

impl PythonProbe for FakePython {
    fn find(&self, interpreter: &Path, packages: &[String]) -> Result<Vec<PythonAnswer>, String> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let delay = self.state.lock().delays.get(interpreter).copied();
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        let mut state = self.state.lock();
        state
            .asked
            .push((interpreter.to_path_buf(), packages.to_vec()));
        let who = interpreter.display();
        if let Some(message) = state.failures.get(interpreter) {
            return Err(format!("{who}: {message}"));
        }
        let Some(installed) = state.packages.get(interpreter) else {
            return Err(format!("{who}: no such interpreter in this fake world"));
        };
        Ok(packages
            .iter()
            .map(|p| match p.strip_prefix('=') {
                Some(name) if installed.contains(name) => state
                    .versions
                    .get(&(interpreter.to_path_buf(), name.to_owned()))
                    .map_or(PythonAnswer::Found, |v| PythonAnswer::Version(v.clone())),
                Some(_) => PythonAnswer::Missing,
                None if installed.contains(p.split('.').next().unwrap_or(p)) => PythonAnswer::Found,
                None => PythonAnswer::Missing,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> FakeFs {
        FakeFs::new()
            .add_file("/plugins/ocr/manifest.json", r#"{"name":"ocr"}"#)
            .add_file("/plugins/ocr/lib/libocr.so", b"\x7fELF")
            .add_dir("/plugins/empty")
            .add_symlink("/plugins/ocr/escape.so", "/etc/passwd")
            .add_symlink("/plugins/ocr/inside.so", "lib/libocr.so")
            .add_symlink("/plugins/ocr/up", "../empty")
            .add_symlink("/plugins/link", "ocr")
            .add_file("/etc/passwd", "root:x:0:0")
            .add_symlink("/loop/a", "b")
            .add_symlink("/loop/b", "a")
    }

    #[test]
    fn files_dirs_and_bounded_reads() {
        let fs = tree();
        assert!(fs.exists(Path::new("/plugins/ocr/manifest.json")));
        assert!(fs.exists(Path::new("/plugins")));
        assert!(fs.exists(Path::new("/")));
        assert!(!fs.exists(Path::new("/plugins/none")));
        assert_eq!(
            fs.read(Path::new("/plugins/ocr/manifest.json"), 4).unwrap(),
            b"{\"nam"
        );
        assert_eq!(
            fs.read(Path::new("/plugins/ocr/manifest.json"), u64::MAX)
                .unwrap()
                .len(),
            14
        );
        assert_eq!(
            fs.read(Path::new("/plugins/ocr"), 10).unwrap_err().kind(),
            io::ErrorKind::IsADirectory
        );
        assert_eq!(
            fs.read(Path::new("/nope"), 10).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let meta = fs
            .metadata(Path::new("/plugins/ocr/manifest.json"))
            .unwrap();
        assert_eq!(
            meta,
            FsMetadata {
                len: 14,
                is_dir: false,
                is_file: true,
                is_symlink: false
            }
        );
        assert!(fs.metadata(Path::new("/plugins/empty")).unwrap().is_dir);
        assert_eq!(
            fs.read(Path::new("/plugins/ocr/manifest.json/x"), 1)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotADirectory
        );
    }

    #[test]
    fn read_dir_is_sorted_and_follows_links() {
        let fs = tree();
        let entries = fs.read_dir(Path::new("/plugins/ocr")).unwrap();
        let names: Vec<_> = entries
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["escape.so", "inside.so", "lib", "manifest.json", "up"]
        );
        let up = &entries[4];
        assert!(up.is_dir);
        assert_eq!(up.path, PathBuf::from("/plugins/ocr/up"));
        let via_link = fs.read_dir(Path::new("/plugins/link")).unwrap();
        assert_eq!(via_link[0].path, PathBuf::from("/plugins/link/escape.so"));
        assert_eq!(
            fs.read_dir(Path::new("/plugins/ocr/manifest.json"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotADirectory
        );
    }

    #[test]
    fn symlinks_resolve_like_the_kernel() {
        let fs = tree();
        let c = |p: &str| fs.canonicalize(Path::new(p)).map_err(|e| e.kind());
        assert_eq!(
            c("/plugins/ocr/escape.so"),
            Ok(PathBuf::from("/etc/passwd"))
        );
        assert_eq!(
            c("/plugins/ocr/inside.so"),
            Ok(PathBuf::from("/plugins/ocr/lib/libocr.so"))
        );
        assert_eq!(c("/plugins/ocr/up"), Ok(PathBuf::from("/plugins/empty")));
        assert_eq!(
            c("/plugins/link/inside.so"),
            Ok(PathBuf::from("/plugins/ocr/lib/libocr.so"))
        );
        assert_eq!(
            c("/plugins/ocr/../ocr/./manifest.json"),
            Ok(PathBuf::from("/plugins/ocr/manifest.json"))
        );
        assert_eq!(
            c("/plugins/ocr/up/../ocr/manifest.json"),
            Ok(PathBuf::from("/plugins/ocr/manifest.json"))
        );
        assert_eq!(c("plugins/ocr"), Ok(PathBuf::from("/plugins/ocr")));
        assert_eq!(c("/plugins/missing"), Err(io::ErrorKind::NotFound));
        assert!(c("/loop/a").is_err());
        let meta = fs.metadata(Path::new("/plugins/ocr/escape.so")).unwrap();
        assert!(meta.is_symlink && meta.is_file);
        assert_eq!(meta.len, 10);
    }

    #[test]
    fn dangling_links() {
        let fs = FakeFs::new().add_symlink("/a/dangling", "/nowhere");
        assert!(!fs.exists(Path::new("/a/dangling")));
        let meta = fs.metadata(Path::new("/a/dangling")).unwrap();
        assert_eq!(
            meta,
            FsMetadata {
                is_symlink: true,
                ..FsMetadata::default()
            }
        );
        assert_eq!(
            fs.canonicalize(Path::new("/a/dangling"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn injected_failures() {
        let fs = tree().fail(
            "/plugins/ocr/manifest.json",
            io::ErrorKind::PermissionDenied,
        );
        let p = Path::new("/plugins/ocr/manifest.json");
        assert!(!fs.exists(p));
        assert_eq!(
            fs.read(p, 10).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(
            fs.metadata(p).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        // Also through a link that resolves to it.
        let fs = fs.add_symlink("/m", "/plugins/ocr/manifest.json");
        assert_eq!(
            fs.read(Path::new("/m"), 10).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        fs.fail("/plugins", io::ErrorKind::Other);
        assert_eq!(
            fs.read_dir(Path::new("/plugins")).unwrap_err().kind(),
            io::ErrorKind::Other
        );
        fs.heal("/plugins").heal(p);
        assert_eq!(fs.read(p, 100).unwrap(), br#"{"name":"ocr"}"#);
    }

    #[test]
    fn clones_share_the_world_and_remove_works() {
        let fs = FakeFs::new();
        let other = fs.clone();
        other.add_file("/x/y", "1");
        assert!(fs.exists(Path::new("/x/y")));
        fs.remove("/x");
        assert!(!other.exists(Path::new("/x/y")));
        assert!(!other.exists(Path::new("/x")));
    }

    #[test]
    fn name_fakes() {
        let libs = FakeLibraries::with(&["c", "libc.so.6"]);
        assert_eq!(libs.find("c"), Some(PathBuf::from("/fake/lib/c")));
        assert_eq!(libs.find("z"), None);
        libs.add("z").remove("c");
        assert!(libs.find("z").is_some() && libs.find("c").is_none());
        assert_eq!(libs.lookups(), 4);
        let bins = FakeExecutables::with(&["sh"]);
        assert_eq!(bins.find("sh"), Some(PathBuf::from("/fake/bin/sh")));
        let env = FakeEnv::with(&[("PATH", "/bin")]);
        assert_eq!(env.var("PATH").as_deref(), Some("/bin"));
        assert_eq!(env.unset("PATH").var("PATH"), None);
        let gpu = FakeGpu::none("no CUDA");
        assert!(!gpu.probe().available);
        gpu.set_devices(vec![GpuDevice {
            ordinal: 0,
            name: "X".into(),
            total_memory_mb: 1,
            compute_capability: (8, 0),
        }]);
        assert!(gpu.probe().available);
        assert_eq!(gpu.probes(), 2);
    }

    #[test]
    fn python_fake() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let py = FakePython::new().add("/venv/bin/python", &["torch", "numpy"]);
        let venv = Path::new("/venv/bin/python");
        let (yes, no) = (PythonAnswer::Found, PythonAnswer::Missing);
        assert_eq!(
            py.find(venv, &names(&["torch.cuda", "json", "numpy"])),
            Ok(vec![yes.clone(), no.clone(), yes.clone()])
        );
        assert_eq!(py.find(venv, &[]), Ok(vec![]), "nothing to ask: no run");
        assert_eq!(py.calls(), 1);
        let err = py
            .find(Path::new("/usr/bin/python3"), &names(&["x"]))
            .unwrap_err();
        assert_eq!(
            err,
            "/usr/bin/python3: no such interpreter in this fake world"
        );
        py.remove(venv, "torch").fail(venv, "exited with status 1");
        assert_eq!(
            py.find(venv, &names(&["numpy"])),
            Err("/venv/bin/python: exited with status 1".into())
        );
        py.heal(venv);
        assert_eq!(
            py.find(venv, &names(&["torch", "numpy"])),
            Ok(vec![no, yes])
        );
        assert_eq!(py.calls(), 4);
        assert_eq!(
            py.asked()[0],
            (venv.to_path_buf(), names(&["torch.cuda", "json", "numpy"]))
        );
    }
}
