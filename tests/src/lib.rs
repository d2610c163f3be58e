//! Workspace-level tests live in `tests/`; this library holds what other
//! crates' tests share: the fixture zoo and the runner conformance suite.

pub mod conformance;

/// The fixture zoo: plugin directories built by `build.rs` (see
/// `tests/fixtures/`), one per way a plugin can load or fail.
pub mod zoo {
    include!(concat!(env!("OUT_DIR"), "/zoo.rs"));
}
