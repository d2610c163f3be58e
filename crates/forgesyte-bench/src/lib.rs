//! The ForgeSyte benchmark: speed as a measured property of the plugin host,
//! each figure side by side with a baseline measured in the same run.
//!
//! # Who this is for
//!
//! People who change the host and want to know what it costs, and CI, which
//! runs the [`Mode::Smoke`] path to check that the benchmark still works
//! (never as a timed test). Run it from the workspace root:
//!
//! ```text
//! cargo run --release -p forgesyte-bench            # full run, about 5 minutes
//! cargo run --release -p forgesyte-bench -- --quick # about a minute and a half
//! ```
//!
//! It builds the release `forgesyte` binary and the bench plugin
//! (`plugin/`, tools `noop`, `fail`, `panic`), lays out plugin trees, starts
//! the real server and a baseline axum server answering the same bytes (on
//! loopback, separate processes), drives them with its own load generator
//! (tokio + hyper, keep-alive connections, latency histograms), prints a
//! table of figure, measured, baseline, ratio, target and pass, and writes
//! the raw runs as JSON (`target/bench/results.json`). See `BENCHMARKS.md`
//! at the workspace root for the figures and what limits each one.
//!
//! The Python figures run Python bench plugins (`plugin.py`, tool `noop`,
//! written by the run) in the host's Python runner, against a FastAPI +
//! uvicorn reference server shaped like the Python original (installed by
//! the run into `target/bench-venv`; "not measured", with the reason, when
//! that fails, and never installed in smoke mode) and against one
//! interpreter importing the same plugins.
//!
//! Measurements that must start from a fresh process (the dynamic loader
//! never forgets a library) run in helper processes: the benchmark's own
//! executable with a hidden subcommand ([`helpers`]).
//!
//! # What this crate must not know
//!
//! Nothing of the host's internals beyond its public API: it drives the
//! server over HTTP, the loader through [`forgesyte_loader::PluginHandle`],
//! and plugins through their C ABI symbol only. No other crate depends on
//! it.

mod artifacts;
mod config;
mod dl;
pub mod helpers;
mod http;
mod payload;
mod proc;
mod python;
mod report;
mod run;
mod stream;
mod tree;

pub use artifacts::{build_plugin, build_server, plugin_manifest, target_dir, workspace_root};
pub use config::{Mode, Options, Part, Program};
pub use python::{lay_out as lay_out_python_plugins, python_plugin_name};
pub use report::{Check, Figure, Machine, Report, Target};
pub use run::run;
pub use tree::{generate as lay_out_plugins, plugin_name};
