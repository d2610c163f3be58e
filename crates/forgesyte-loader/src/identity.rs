//! Which in-process libraries were opened already (a rescan found a
//! changed library of a plugin that runs in the host).
//!
//! Libraries are never unloaded, and the dynamic loader hands back the
//! library it already mapped when asked for the same path again. So the
//! second and later opens of a library are of its bytes, copied into a
//! sealed memory file (`NativeImporter::open_bytes`), a new file identity;
//! the old mapping stays (its memory is held until the process exits).
//! Nothing is written to disk, so nothing is left behind when the process
//! is killed (the memory file lives as long as its mapping).
//!
//! Knows paths only: nothing of plugins, manifests or the registry.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// The in-process library paths opened so far, by canonical path.
#[derive(Debug, Default)]
pub(crate) struct Identities {
    opened: Mutex<BTreeSet<PathBuf>>,
}

impl Identities {
    /// Whether the library whose canonical path ([`canonical_key`]) is
    /// `canonical` was opened before, so that opening it again needs a new
    /// file identity.
    pub(crate) fn was_opened(&self, canonical: &Path) -> bool {
        self.opened.lock().contains(canonical)
    }

    /// Records that the library whose canonical path is `canonical` was
    /// opened (and so stays mapped).
    pub(crate) fn opened_as(&self, canonical: PathBuf) {
        self.opened.lock().insert(canonical);
    }
}

/// The key a library is known by: its canonical path, else the path as
/// given.
pub(crate) fn canonical_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::{Identities, canonical_key};

    #[test]
    fn a_library_is_known_by_its_canonical_path_once_opened() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libx.so");
        std::fs::write(&lib, b"version one").unwrap();
        let link = tmp.path().join("liby.so");
        std::os::unix::fs::symlink(&lib, &link).unwrap();
        let ids = Identities::default();
        assert!(!ids.was_opened(&canonical_key(&lib)));
        ids.opened_as(canonical_key(&lib));
        assert!(ids.was_opened(&canonical_key(&lib)));
        assert!(ids.was_opened(&canonical_key(&link)), "the same file");
        let missing = tmp.path().join("libgone.so");
        assert_eq!(canonical_key(&missing), missing);
        assert!(!ids.was_opened(&missing));
    }
}
