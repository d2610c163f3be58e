//! The ForgeSyte server: the HTTP API (SPEC §5), the tool runner, the
//! `forgesyte` command line (`serve`, `check`; SPEC §7) and the startup
//! wiring (seed §4) of the ForgeSyte plugin host.
//!
//! # Who this is for
//!
//! Operators run the `forgesyte` binary built from this crate. Rust code
//! that wants to embed the host (or test it) uses the library: [`app`] builds
//! the [`axum::Router`] over an [`AppState`], [`Server`] binds, loads and
//! serves, [`check`] loads a directory without serving.
//!
//! ```no_run
//! use forgesyte_server::{Server, ServerConfig, shutdown_signal};
//!
//! # async fn run() -> Result<(), forgesyte_server::ServeError> {
//! let mut config = ServerConfig::default();
//! config.bind = "127.0.0.1:0".into();
//! config.plugins_dir = "plugins".into();
//! let server = Server::bind(config).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(shutdown_signal()).await
//! # }
//! ```
//!
//! # Startup (seed §4)
//!
//! [`Server::bind`] binds the listener first; [`Server::run`] then starts the
//! load pass on a blocking thread and serves at once, so the health
//! endpoints answer while slow plugins are still loading (they show
//! `LOADED`). Load errors of any kind never stop the server. On the shutdown
//! signal the server stops accepting, waits for in-flight requests up to
//! [`ServerConfig::shutdown_grace`], drops the plugin instances and returns.
//!
//! # Connections
//!
//! A client has [`ServerConfig::header_read_timeout`] to send a request's
//! headers (from the connection's opening, or from a later request's first
//! byte), and an idle keep-alive connection is closed after
//! [`ServerConfig::idle_timeout`]. At most [`ServerConfig::max_connections`]
//! connections are served at once (never more than half the soft
//! file-descriptor limit); a few more are served the probes only, every
//! other route answering 503 with `Retry-After`, and beyond those a new
//! connection is closed at once. Running out of file descriptors never stops
//! the accept loop.
//!
//! # Tool calls
//!
//! A tool call runs on the call pool (one hot thread per core, tokio's
//! blocking pool for calls that would wait behind a slow one), never on the
//! async runtime, under a per-call time limit: the manifest's
//! `limits.call_timeout_s`, else [`ServerConfig::call_timeout`]. A call that
//! runs past it answers 504 and its plugin becomes FAILED: an in-process
//! plugin's thread cannot be stopped, so the host stops trusting the plugin
//! (the thread finishes, or not, in the background). At most
//! [`ServerConfig::max_calls_per_plugin`] calls of one plugin are in
//! progress (waiting or running); beyond it a call answers 503
//! (`TooManyCalls`) with `Retry-After`, so a flood of calls to one slow
//! plugin leaves the others and the health routes answering.
//!
//! # Probes and admin routes
//!
//! `GET /livez` answers while the process serves; `GET /readyz` once the
//! startup load pass has finished and every plugin not marked `optional` is
//! available (`?verbose` lists the checks). `POST /v1/plugins/{name}/reload`
//! and `POST /v1/plugins/reload` need `Authorization: Bearer` with the
//! [`AdminToken`] of [`ServerConfig::admin_token`] (compared in constant
//! time) and are disabled without one; they run the loader's reload (one
//! plugin) or rescan (every plugin) on the blocking pool, one at a time.
//! `SIGHUP` and [`ServerConfig::watch`] run the same rescan.
//!
//! # What this crate must not know
//!
//! **Only this crate knows HTTP, and it never calls plugin code directly**:
//! every call goes through [`forgesyte_loader::PluginHandle`], which records
//! the outcome in the registry. The server does not parse manifests, probe
//! dependencies or decide lifecycle transitions; it reads the
//! [`forgesyte_registry::Registry`] (lock-free snapshots) and maps outcomes
//! to status codes in exactly one place ([`ApiError`]).

/// `eprintln!` that never panics: a line that cannot be written (stderr's
/// pipe closed) is lost, and the command keeps the exit code it chose
/// (`eprintln!` panicked: exit code 101). For the `forgesyte` binary's own
/// lines.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that never panics: [`say!`]'s counterpart on stdout, for
/// what a command reports as done (`keygen`, `sign`). A closed stdout
/// loses the line, and the command keeps its exit code.
#[macro_export]
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod accept;
mod admin;
mod answer;
mod api;
mod arg_schema;
mod base64_arg;
mod body;
mod body_pace;
mod budget;
mod check;
mod config;
mod conn;
pub mod controls;
mod docs;
mod error;
mod events;
mod extract;
mod form;
mod host_retry;
mod metrics;
mod origin;
mod pool;
mod probes;
mod reload;
mod rescan;
mod respond;
mod router;
mod server;
pub mod signing;
mod slots;
mod state;
mod stream;
mod throttle;
mod tools;
mod ui;
mod unread;
mod watch;
mod wire;

pub use admin::AdminToken;
pub use api::{HealthResponse, PluginHealth};
pub use body::RunRequest;
pub use budget::applied_memory;
pub use check::{CheckError, CheckReport, check, stray_manifest};
pub use config::{
    DEFAULT_ANSWER_MIN_RATE, DEFAULT_BIND, DEFAULT_BODY_LIMIT, DEFAULT_BODY_MIN_RATE,
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_CALL_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_INIT_TIMEOUT, DEFAULT_ISOLATION, DEFAULT_MAX_CALLS_PER_PLUGIN,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_RESPONSE, DEFAULT_MEMORY_LIMIT_MIB, DEFAULT_PLUGINS_DIR,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_STREAM_IDLE_TIMEOUT, ServerConfig, parse_switch,
};
pub use error::{ApiError, ErrorDetail, NotRunnable, RunError, RunFailure};
pub use probes::{LiveResponse, ReadyCheck, ReadyResponse};
pub use reload::{ReloadOutcome, ReloadReport, RemovedPlugin};
pub use router::{app, openapi};
pub use server::{
    GPU_PROBE_SUBCOMMAND, LIB_PROBE_SUBCOMMAND, ServeError, Server, applied_max_connections,
    build_loader, build_loader_from, serve, shutdown_signal,
};
pub use state::AppState;
pub use tools::RunSuccess;
pub use wire::{JournalEntryJson, PluginStateJson, PluginStatusJson, ToolInfoJson};

/// The server's version, as reported by `GET /v1/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
