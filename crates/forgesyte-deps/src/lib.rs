//! Dependency checking for the ForgeSyte plugin host, and the seams through
//! which the host looks at the outside world.
//!
//! # Who this is for
//!
//! The loader asks this crate, before it opens a plugin library, whether
//! everything the plugin's `manifest.json` asks for is there (SPEC §3:
//! `dependencies`, `requires_gpu`, `models`). The server shows the GPU probe's
//! result. Any Rust program can use the checker on its own.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::path::Path;
//! use forgesyte_deps::{DependencyChecker, Requirements};
//!
//! let manifest = serde_json::json!({ "dependencies": ["bin:sh", "env:PATH"] });
//! let req = Requirements::from_manifest(&manifest)?;
//! let report = DependencyChecker::system(vec![])
//!     .check(&req, Path::new("/srv/plugins/ocr"), &BTreeMap::new());
//! assert_eq!(report.available, report.missing.is_empty());
//! # Ok::<(), forgesyte_errors::ManifestError>(())
//! ```
//!
//! # Python packages
//!
//! A Python plugin's bare dependency names are Python packages (the seed's
//! meaning): parse its manifest with [`Requirements::from_manifest_as`] and
//! [`BareDependency::Py`]; `py:NAME` means the same in any manifest. The
//! loader sets [`Requirements::python`] to the interpreter it resolved for
//! the plugin, and once per load pass (after
//! [`clear_cache`](DependencyChecker::clear_cache)) hands every pending
//! plugin's requirements to [`DependencyChecker::python_prefetch`] and runs
//! the plan beside its checks: one interpreter run per interpreter answers
//! them all, and a check that needs an answer waits for its interpreter's
//! run ([`DependencyChecker::prefetch_python_for`] does both and returns
//! when every interpreter has answered).
//!
//! ```
//! # #[cfg(feature = "testing")] {
//! use std::collections::BTreeMap;
//! use std::path::Path;
//! use forgesyte_deps::fake::FakeWorld;
//! use forgesyte_deps::{BareDependency, Requirements};
//!
//! let world = FakeWorld::new();
//! world.python.add("/venv/bin/python", &["json"]);
//! let manifest = serde_json::json!({ "dependencies": ["torch", "numpy", "json"] });
//! let mut req = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
//! req.python = Some("/venv/bin/python".into());
//! let checker = world.checker();
//! checker.prefetch_python_for([&req]);
//! let report = checker.check(&req, Path::new("/plugins/ocr"), &BTreeMap::new());
//! assert_eq!(report.reason.as_deref(), Some("Missing dependencies: torch, numpy"));
//! assert_eq!(world.python.calls(), 1);
//! # }
//! ```
//!
//! # Seams: real and fake
//!
//! Everything outside the process is reached through a trait object
//! (`Arc<dyn Trait>`, each `Send + Sync + Debug`):
//!
//! | seam | real | fake (feature `testing`) |
//! |---|---|---|
//! | [`FileSystem`] (exists, metadata, bounded read, sorted listing, canonicalize) | [`RealFs`] | `fake::FakeFs`, an in-memory tree with symlinks and injected errors |
//! | [`GpuProbe`] | [`CudaProbe`] (`cudarc`, driver loaded at run time) | `fake::FakeGpu` |
//! | [`LibraryProbe`] | [`SystemLibraries`] | `fake::FakeLibraries` |
//! | [`ExecutableProbe`] | [`SystemPath`] | `fake::FakeExecutables` |
//! | [`EnvProbe`] | [`ProcessEnv`] | `fake::FakeEnv` |
//! | [`PythonProbe`] (which packages an interpreter could import, without importing them) | [`SystemPython`] (one `INTERPRETER -c` run for many packages, 10 s timeout) | `fake::FakePython`, interpreters with package sets, a run counter and injected failures |
//!
//! The fakes are cheap handles: clones share one world, so a test can keep
//! one, hand another to the checker, and change the world between passes.
//! They can inject failures, so failure paths are as easy to test as the
//! happy path. Enable them from another crate with
//! `forgesyte-deps = { workspace = true, features = ["testing"] }` in
//! `[dev-dependencies]`.
//!
//! # Guarantees
//!
//! - The checker reports **every** missing item in a stable order:
//!   dependencies in manifest order, then `gpu`, then models in manifest
//!   order; the reason is the seed's `Missing dependencies: a, b` line, with
//!   a GPU sentence containing `GPU` and `CUDA` when the GPU is missing.
//! - It never dlopens a library when a file search answers: extra paths,
//!   `LD_LIBRARY_PATH`, the `ld.so` cache and the standard directories are
//!   searched first; `dlopen(RTLD_LAZY | RTLD_LOCAL)` is the last resort.
//! - It never panics on a machine without CUDA: the GPU probe checks for the
//!   driver library first and runs under `catch_unwind`.
//! - It never imports a Python package to check it: the plugin's
//!   interpreter looks the top-level package up with
//!   `importlib.util.find_spec`. A load pass that hands its plugins' packages
//!   to [`DependencyChecker::prefetch_python_for`] costs one interpreter run
//!   per interpreter, not one per package; a hung interpreter is killed
//!   after 10 s.
//! - Results are cached for one load pass; [`DependencyChecker::clear_cache`]
//!   starts the next. The real GPU probe's, once for the process.
//!
//! # What this crate must not know
//!
//! It knows nothing of the registry, the loader, plugin code or HTTP: it
//! answers "is this there?" and nothing else.

mod checker;
mod cuda;
mod dlopen;
mod env;
mod exec;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
mod fs;
mod gpu;
mod libs;
mod limits;
mod python;
mod requirements;

pub use checker::{
    DependencyChecker, DependencyCheckerBuilder, DependencyReport, KnownPlugins, PythonPrefetch,
    unmet_plugin_dependency,
};
pub use cuda::{CudaProbe, cuda_driver_library_present, probe_here};
pub use env::{
    ADMIN_TOKEN_VARIABLE, EnvProbe, KEY_PASSWORD_VARIABLE, ProcessEnv, WITHHELD_VARIABLES,
};
pub use exec::{ExecutableProbe, SystemPath};
pub use fs::{DirEntry, FileSystem, FsMetadata, RealFs, open_regular};
pub use gpu::{GpuDevice, GpuProbe, GpuReport, NoGpu};
pub use libs::{LibraryProbe, SystemLibraries, dlopen_first};
pub use limits::{
    die_with_parent_thread, open_file_limit_after_raise, raise_open_file_limit,
    restore_open_file_limit,
};
pub use python::{
    ANSWER_MARKER, MIN_PYTHON, PythonAnswer, PythonProbe, SystemPython, python_version_gate,
    run_python, run_python_as, script_answer,
};
pub use requirements::{
    BareDependency, Dependency, GpuRequirement, PyVersionReq, Requirements, json_type_name,
};
