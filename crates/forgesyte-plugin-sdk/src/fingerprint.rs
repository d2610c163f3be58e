//! The build fingerprint every plugin library carries in its ELF section
//! `.forgesyte_abi`: the record format is defined in
//! `forgesyte_protocol::fingerprint` (re-exported here); this module holds
//! this SDK's own [`RECORD`], which [`crate::export_plugin!`] places in the
//! section of every plugin library built with it.

pub use forgesyte_protocol::fingerprint::*;

use crate::abi::ABI_VERSION;

/// This build's record: ABI version, this SDK's version, the compiler and
/// the target.
pub const RECORD: Record = build_record(
    ABI_VERSION,
    env!("CARGO_PKG_VERSION"),
    BUILD_RUSTC_VERSION,
    BUILD_TARGET,
);

/// Reads the record once, so that the linker keeps the section of the
/// `static` that holds it; called by the entry that
/// [`crate::export_plugin!`] generates.
#[doc(hidden)]
#[inline(always)]
#[allow(unsafe_code)]
pub fn __retain(record: &'static Record) {
    // A volatile read cannot be optimised away, so the entry function keeps
    // a relocation to the record and `--gc-sections` keeps its section.
    // SAFETY: `record` is a valid, aligned reference to initialised bytes.
    let _ = unsafe { std::ptr::read_volatile(record.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_sdks_record_parses_to_its_build() {
        let fp = Fingerprint::parse(&RECORD).unwrap();
        assert_eq!(fp.abi_version, ABI_VERSION);
        assert_eq!(fp.sdk_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(fp.target, BUILD_TARGET);
        assert_eq!(fp, Fingerprint::current());
    }
}
