//! Plugin lifecycle states, per-plugin status and metrics, and the
//! thread-safe [`Registry`] handle of the ForgeSyte plugin host.
//!
//! This crate is for the code that *hosts* plugins: the loader writes states
//! into the registry as it loads, its plugin handle brackets every tool call
//! with [`Registry::mark_running`] and [`Registry::end_call`] (or
//! [`Registry::finish`] when the call never reached the plugin), its
//! supervisor records crashes and restarts, and the server reads snapshots
//! to answer the health endpoints. Plugin authors do not need it.
//!
//! # What this crate must not know
//!
//! **The registry never calls plugin code and never touches the filesystem.**
//! It does not load, probe, resolve or serve; it knows nothing of manifests,
//! libraries, processes or HTTP. It is plain bookkeeping that the loader and
//! the server drive, so no lock is ever held while plugin code runs.
//!
//! # The state machine (SPEC §4)
//!
//! ```text
//!  register ──► LOADED ──mark_initialized──► INITIALIZED ──mark_running──► RUNNING
//!                 ▲                            │     ▲                         │
//!                 │                            │     └──end_call/finish (last)─┘
//!                 │                            │
//!                 │   mark_failed/crashed from LOADED, INITIALIZED, RUNNING ──► FAILED ───┐
//!                 │   mark_unavailable    from LOADED, INITIALIZED ───► UNAVAILABLE ──────┤
//!                 │                                                                       │
//!                 ├──── mark_loaded (explicit reload; also from INITIALIZED) ◄────────────┤
//!                 └──── mark_restarting (supervisor restart; only from FAILED) ◄──────────┘
//! ```
//!
//! | from          | legal next states                                 |
//! |---------------|---------------------------------------------------|
//! | `LOADED`      | `INITIALIZED`, `FAILED`, `UNAVAILABLE`            |
//! | `INITIALIZED` | `RUNNING`, `FAILED`, `UNAVAILABLE`, `LOADED`      |
//! | `RUNNING`     | `INITIALIZED`, `FAILED`                           |
//! | `FAILED`      | `LOADED`                                          |
//! | `UNAVAILABLE` | `LOADED`                                          |
//!
//! [`PluginLifecycleState::transition`] is the one function that decides
//! this; every registry write goes through it or through a stricter check.
//! A same-state move is not a transition: a second call while `RUNNING` only
//! raises the in-flight count, and `mark_failed` on a `FAILED` plugin only
//! replaces the reason. `FAILED` and `UNAVAILABLE` are terminal until an
//! explicit [`Registry::mark_loaded`] (or, for `FAILED`, a supervisor's
//! [`Registry::mark_restarting`]). A tool that *returns* an error is counted
//! by `end_call(.., succeeded: false)` and changes no state; deciding that a
//! panic, crash or timeout is a fault (and calling
//! [`Registry::mark_failed`]) is the caller's job.
//!
//! # What the host calls
//!
//! | who | writes |
//! |---|---|
//! | loader, load pass and reload | [`register`](Registry::register), [`mark_initialized`](Registry::mark_initialized), [`mark_failed`](Registry::mark_failed) (or [`mark_failed_with_details`](Registry::mark_failed_with_details) with a Python traceback), [`mark_unavailable`](Registry::mark_unavailable), [`mark_crashed`](Registry::mark_crashed), [`mark_loaded`](Registry::mark_loaded) |
//! | loader, each tool call | [`mark_running`](Registry::mark_running), then [`end_call`](Registry::end_call) (one write that counts and finishes), or [`finish`](Registry::finish) if the call never ran; [`mark_failed`](Registry::mark_failed) on a fault |
//! | loader, supervisor | [`mark_crashed`](Registry::mark_crashed), [`set_next_retry`](Registry::set_next_retry), [`mark_restarting`](Registry::mark_restarting), [`mark_initialized`](Registry::mark_initialized) |
//!
//! [`Registry::begin_call`] (a drop guard over `mark_running` / `end_call`),
//! [`Registry::record_success`], [`Registry::record_error`] and
//! [`Registry::mark_error`] are conveniences for embedders and tests; the
//! host itself does not use them. The property tests drive every write in
//! the table above against a reference model.
//!
//! # Supervision bookkeeping
//!
//! For plugins that run in their own process, the loader's supervisor
//! records how the process ended ([`Registry::mark_crashed`]: `FAILED`, a
//! journal entry with the signal or exit code and the stderr tail, and
//! `last_exit_reason`), when it will retry ([`Registry::set_next_retry`])
//! and each restart ([`Registry::mark_restarting`]: `FAILED -> LOADED`,
//! `restart_count + 1`). Every move into `FAILED` or `UNAVAILABLE` (or a new
//! reason while there) also lands in the per-plugin failure journal
//! ([`Registry::journal`], the last [`JOURNAL_LEN`] entries).
//!
//! # Observers
//!
//! [`Registry::add_observer`] hooks an [`Observer`] that is told of every
//! registration, state change, new reason, recorded crash and supervisor
//! restart as a [`Change`] (plugin, old and new state, reason, restart
//! count, exit, generation), in publication order, from inside the write.
//! The registry knows nothing of who listens; the server builds its event
//! stream (`GET /v1/events`) on it.
//!
//! # Snapshots: readers never wait on a writer's work
//!
//! Each plugin's entry is immutable and published in its own slot (a
//! read-write lock around an `Arc`, held for one `Arc` clone or one
//! pointer swap, never while anything is built or dropped); the sorted map
//! from names to slots is behind an [`arc_swap::ArcSwap`] and replaced only
//! when a plugin is registered. A reader never takes the write lock; at
//! most it waits on a slot for a write's pointer swap, never for its work.
//! [`Registry::snapshot`]
//! collects every plugin's current entry (one `Arc` clone each) into an
//! immutable [`Snapshot`]: later writes do not change it, and each plugin in
//! it is whole (all its fields come from one write).
//!
//! Writers serialise on exactly one mutex (and take a slot's lock inside
//! it only to swap its pointer, so there is one lock order). A write clones the affected entry (cheap: its big parts sit
//! behind `Arc`), edits the clone and stores it in that plugin's slot, so
//! its cost does not grow with the number of plugins (a tool call's
//! bookkeeping on a host with 1,000 plugins costs what it costs with one);
//! then the generation is bumped. A refused write publishes nothing.
//! [`Registry::generation`] lets the server cache serialised bodies; only
//! `uptime_seconds` changes without a new generation, because it is measured
//! from an [`std::time::Instant`] when a status is read.
//!
//! # No fakes needed
//!
//! Unlike `forgesyte-deps`, this crate has no seam to the outside world: no
//! filesystem, no probe, no plugin code. Its only outside inputs are the
//! monotonic clock (uptime) and the wall clock (`last_used` and history
//! timestamps), and tests check their *shape* (RFC 3339, non-negative,
//! non-decreasing), never exact values or durations. So tests drive the real
//! [`Registry`] directly, from several threads, with no test double and no
//! timing assertions.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use forgesyte_registry::{PluginInfo, PluginLifecycleState, Registry};
//!
//! let registry = Registry::new();
//! registry.register("ocr", PluginInfo::default())?;
//! registry.mark_initialized("ocr")?;
//!
//! registry.mark_running("ocr")?; // RUNNING, in_flight 1
//! assert_eq!(registry.get_state("ocr"), Some(PluginLifecycleState::Running));
//! registry.end_call("ocr", Duration::from_millis(12), true)?; // counted and finished
//!
//! let status = registry.get_status("ocr").ok_or("missing")?;
//! assert_eq!(status.state, PluginLifecycleState::Initialized);
//! assert_eq!(status.success_count, 1);
//! assert_eq!(registry.list_available(), ["ocr"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod observe;
mod registry;
mod state;
mod status;

pub use error::RegistryError;
pub use observe::{Change, ChangeKind, Observer};
pub use registry::{CallGuard, RESTARTING, Registry, Snapshot};
pub use state::{ParseStateError, PluginLifecycleState};
pub use status::{
    AVERAGE_WINDOW, ExitInfo, HISTORY_LEN, HISTORY_REASON_CHARS, JOURNAL_LEN, JOURNAL_PAST_CHARS,
    JournalEntry, MAX_REASON_CHARS, PluginInfo, PluginStatus, SignatureInfo, SignatureState,
    Transition,
};
