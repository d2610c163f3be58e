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
//! - Results are cached for one load pass; [`DependencyChecker::clear_cache`]
//!   starts the next.
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
mod requirements;

pub use checker::{DependencyChecker, DependencyCheckerBuilder, DependencyReport};
pub use cuda::{CudaProbe, cuda_driver_library_present};
pub use env::{EnvProbe, ProcessEnv};
pub use exec::{ExecutableProbe, SystemPath};
pub use fs::{DirEntry, FileSystem, FsMetadata, RealFs};
pub use gpu::{GpuDevice, GpuProbe, GpuReport};
pub use libs::{LibraryProbe, SystemLibraries};
pub use requirements::{Dependency, GpuRequirement, Requirements, json_type_name};
