//! The loader's one integration-test binary.
//!
//! - `pipeline`: the load pipeline over the fake filesystem and importer.
//! - `isolation`: real plugins in real runner processes (this crate's
//!   `forgesyte-runner` binary and the fixture zoo's `faulty` library): every
//!   fault at construction and at tool time, supervision, concurrency,
//!   chaos, reload and preflight.
//! - `shutdown`: `Loader::shutdown` stops restarts of isolated plugins.
//! - `signature`: signed plugins at load; files swapped between the
//!   signature check and the load.
//! - `python`: Python plugins with the real interpreter and the host's
//!   Python runner (GREEN checklist, calls, faults, conformance; numpy and
//!   pydantic results under the test virtualenv).
//! - `test_venv`: that virtualenv, `target/test-venv` (numpy, pydantic),
//!   made once by the tests that need it.
//! - `entry_points`: installed Python plugins (entry points of group
//!   `forgesyte.plugins`) from a throw-away site directory, with the real
//!   interpreter.
//! - `conformance`: the runner conformance suite of `forgesyte-tests`
//!   against `forgesyte-runner` (the `good` fixture), and the suite's own
//!   rejection of runners that do not speak the protocol.
//! - `shm`: attachments through shared memory with the native and Python
//!   runners: round trips, crashes, no memory file left behind.

// Test helpers outside `#[test]` functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod entry_points;
mod isolation;
mod pipeline;
mod python;
mod rescan;
mod shm;
mod shutdown;
mod signature;
mod test_venv;
