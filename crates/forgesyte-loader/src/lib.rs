//! The ForgeSyte plugin loader (seed §3): turns plugin directories into
//! registry entries and live plugin instances.
//!
//! For each directory under the plugins directory that holds a
//! `manifest.json`, a load pass:
//!
//! 1. reads and validates the manifest ([`Manifest`]; size-capped, unknown
//!    fields kept) — a bad one is FAILED with `ManifestError: …`;
//! 2. registers the plugin (LOADED) — a second plugin claiming a taken name
//!    is registered under a key derived from its directory and FAILED, so
//!    neither overwrites the other;
//! 3. checks its dependencies, `plugin:` ones in dependency order (waves of a
//!    topological sort; a cycle is named) — UNAVAILABLE with
//!    `Missing dependencies: …`;
//! 4. opens its library through an [`Importer`] — FAILED with `ImportError: …`;
//! 5. constructs the instance — FAILED with `InitError: …`;
//! 6. marks it INITIALIZED and keeps a [`PluginHandle`] for tool calls.
//!
//! Manifests are read, and plugins of one dependency wave constructed, on
//! all cores; registration, state changes and log lines happen in sorted
//! order, so results are deterministic.
//!
//! This crate is the only one that calls plugin code (through [`native`],
//! [`process`] or an injected [`Importer`]). It knows nothing about HTTP. It
//! never unloads a library. Its calls block their thread, but for one:
//! [`PluginHandle::call_ticketed_async`], which awaits a runner's answer
//! inside a tokio runtime (the only use of tokio here).
//!
//! # Process isolation
//!
//! A plugin whose manifest says `"isolation": "process"` (or every plugin,
//! with [`LoaderConfig::default_isolation`]) runs the same library in its own
//! `forgesyte-runner` child ([`process`]): a segfault, abort, stack overflow,
//! `exit`, hang, memory blow-up or broken protocol becomes a precise reason
//! (`CrashError: killed by signal SIGSEGV (11); stderr: ...`) on that plugin
//! only. Its [`PluginHandle`] supervises it: FAILED with the reason, then
//! restarted with exponential backoff ([`SupervisionPolicy`]), within limits
//! ([`ProcessLimits`]). [`LoaderConfig::preflight`] constructs in-process
//! plugins once in a runner first; [`Loader::reload`] and
//! [`Loader::reload_all`] restart isolated plugins and retry failed ones.
//! The whole story, with the limits table and the reasons, is in the
//! crate's `ISOLATION.md`.
//!
//! # Installed Python plugins
//!
//! With [`LoaderConfig::python_entry_points`], a pass also loads the Python
//! packages installed for the configured interpreter that declare an entry
//! point in the group `forgesyte.plugins` ([`entry_points`]): one plugin
//! per entry point, its directory the module's directory, its manifest the
//! `manifest.json` shipped there (else one made of the entry point).
//! They are registered after the plugin directories; a name that is taken
//! makes the later plugin FAILED (never an overwrite). When the interpreter
//! cannot list them, the pass goes on without them and says why
//! ([`Loader::entry_points_error`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use forgesyte_deps::DependencyChecker;
//! use forgesyte_loader::{Loader, LoaderConfig};
//! use forgesyte_registry::Registry;
//!
//! let registry = Registry::new();
//! let checker = Arc::new(DependencyChecker::system(Vec::new()));
//! let loader = Loader::new(registry.clone(), checker, LoaderConfig::default());
//! let report = loader.load_all("plugins".as_ref());
//! println!("{} loaded, {} failed", report.loaded(), report.failed());
//! if let Some(ocr) = loader.handle("ocr") {
//!     let result = ocr.call("analyze", &serde_json::json!({}));
//!     println!("{result:?}");
//! }
//! ```

pub mod entry_points;
mod handle;
mod host;
pub mod integrity;
pub mod json_text;
pub mod manifest;
pub mod native;
mod pipeline;
pub mod plugin_log;
pub mod process;
pub mod python;
pub mod sandbox;
pub mod signature;
mod slot;
mod supervise;

pub mod fake;

pub use entry_points::EntryPoint;
/// Who a tool call is for (request id, W3C `traceparent`), passed to a
/// plugin in a runner with the call: see [`PluginHandle::call_in`].
pub use forgesyte_protocol::wire::{CallContext, fit_request_id};
pub use handle::{Awaitable, CallError, CallTicket, PluginHandle, ToolOutput};
pub use host::{
    AsyncCall, AsyncKill, CallOutput, ExitCallback, ExitReport, Importer, PluginInstance,
    PluginLibrary, ToolInfo,
};
pub use manifest::{Isolation, Limits, Manifest, PythonEntry, Runtime};
pub use pipeline::{
    DESTRUCTOR_WAIT, LoadReport, Loader, LoaderConfig, PluginLoadOutcome, RELOADING, ReloadRefused,
    RescanReport, RetiredPlugin, Retry, loaded_by_plugins, runtime_output,
};
pub use process::{ProcessImporter, ProcessLimits, RUNNER_STOP_WAIT};
pub use supervise::SupervisionPolicy;
