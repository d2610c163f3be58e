//! New file identities for in-process libraries opened again (a rescan
//! found a changed library of a plugin that runs in the host).
//!
//! Libraries are never unloaded, and the dynamic loader hands back the
//! library it already mapped when asked for the same path again. So the
//! second and later opens of a path go through a private copy: the file is
//! copied to `<temp>/forgesyte-<pid>-libs/<sha256 prefix>-<file name>` and
//! that copy is opened, a new file identity; the old mapping stays (its
//! memory is held until the process exits). The copies' directory is
//! removed when the [`Identities`] is dropped (mapped copies stay valid).
//!
//! Knows files and digests only: nothing of plugins, manifests or the
//! registry.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// The in-process library paths opened so far, and where copies go.
#[derive(Debug)]
pub(crate) struct Identities {
    opened: Mutex<BTreeSet<PathBuf>>,
    dir: PathBuf,
}

impl Default for Identities {
    fn default() -> Self {
        Identities {
            opened: Mutex::new(BTreeSet::new()),
            dir: std::env::temp_dir().join(format!("forgesyte-{}-libs", std::process::id())),
        }
    }
}

impl Identities {
    /// The path to open for the library at `path` (whose canonical path,
    /// [`canonical_key`], is `canonical`): `path` itself until it
    /// was [`opened_as`](Self::opened_as), a fresh private copy of it afterwards
    /// (`path` itself when there is no file to copy: the open reports it).
    ///
    /// # Errors
    ///
    /// When the copy cannot be made.
    pub(crate) fn path_to_open_as(&self, path: &Path, canonical: &Path) -> io::Result<PathBuf> {
        if !self.opened.lock().contains(canonical) {
            return Ok(path.to_path_buf());
        }
        match self.copy(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path.to_path_buf()),
            other => other,
        }
    }

    /// Records that the library whose canonical path is `canonical` was
    /// opened (and so stays mapped).
    pub(crate) fn opened_as(&self, canonical: PathBuf) {
        self.opened.lock().insert(canonical);
    }

    /// Copies `path` under the copies' directory, named by its content.
    fn copy(&self, path: &Path) -> io::Result<PathBuf> {
        let bytes = std::fs::read(path)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let file_name = path
            .file_name()
            .map_or_else(|| "lib.so".into(), |n| n.to_string_lossy().into_owned());
        create_private_dir(&self.dir)?;
        let target = self.dir.join(format!("{}-{file_name}", &digest[..16]));
        if !target.exists() {
            // Written beside, then renamed: an open never sees half a file.
            let partial = self
                .dir
                .join(format!(".{}-{file_name}.partial", &digest[..16]));
            std::fs::write(&partial, &bytes)?;
            std::fs::rename(&partial, &target)?;
        }
        tracing::info!(library = %path.display(), copy = %target.display(), "In-process library opened again under a new file identity: {}", target.display());
        Ok(target)
    }
}

impl Drop for Identities {
    fn drop(&mut self) {
        // Mapped copies stay valid after their files are unlinked.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The key a library is known by: its canonical path, else the path as
/// given.
pub(crate) fn canonical_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::{Identities, canonical_key};

    #[test]
    fn the_first_open_is_the_path_itself_later_ones_fresh_copies_by_content() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libx.so");
        std::fs::write(&lib, b"version one").unwrap();
        let ids = Identities {
            opened: Default::default(),
            dir: tmp.path().join("copies"),
        };
        assert_eq!(
            ids.path_to_open_as(&lib, &canonical_key(&lib)).unwrap(),
            lib
        );
        assert_eq!(
            ids.path_to_open_as(&lib, &canonical_key(&lib)).unwrap(),
            lib,
            "not opened yet"
        );
        ids.opened_as(canonical_key(&lib));
        let again = ids.path_to_open_as(&lib, &canonical_key(&lib)).unwrap();
        assert_ne!(again, lib);
        assert!(again.starts_with(tmp.path().join("copies")));
        assert_eq!(std::fs::read(&again).unwrap(), b"version one");
        std::fs::write(&lib, b"version two").unwrap();
        let third = ids.path_to_open_as(&lib, &canonical_key(&lib)).unwrap();
        assert_ne!(third, again, "new content, new identity");
        assert_eq!(std::fs::read(&third).unwrap(), b"version two");
        let missing = tmp.path().join("libgone.so");
        ids.opened_as(canonical_key(&missing));
        assert_eq!(
            ids.path_to_open_as(&missing, &canonical_key(&missing))
                .unwrap(),
            missing
        );
        drop(ids);
        assert!(!tmp.path().join("copies").exists());
    }
}
