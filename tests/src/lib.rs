//! Workspace-level tests live in `tests/`; this library is empty.

/// The fixture zoo: plugin directories built by `build.rs` (see
/// `tests/fixtures/`), one per way a plugin can load or fail.
pub mod zoo {
    include!(concat!(env!("OUT_DIR"), "/zoo.rs"));
}
