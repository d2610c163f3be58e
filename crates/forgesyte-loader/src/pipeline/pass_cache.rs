//! What one load pass looks up once instead of once per plugin: the
//! canonical path of each directory that holds plugin directories, and the
//! lock file (`forgesyte.lock`) of that directory, absent or read.
//!
//! Cleared at the start of every pass (with the dependency checker's
//! cache), so a pass sees the files as they were when it began; nothing is
//! kept from one pass to the next. Knows paths, the [`FileSystem`] seam and
//! the lock file's reader; nothing of plugins, manifests or the registry.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use forgesyte_deps::FileSystem;
use forgesyte_errors::IntegrityError;
use parking_lot::Mutex;

use crate::integrity::{self, Lock};

/// The per-pass look-ups (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct PassCache {
    /// Canonical paths resolved this pass, by the path as given (`None`:
    /// not resolvable).
    parents: Mutex<HashMap<PathBuf, Option<PathBuf>>>,
    /// The lock file of a parent directory: `None` when it has none.
    locks: Mutex<HashMap<PathBuf, Option<Arc<Lock>>>>,
}

impl PassCache {
    /// Forgets everything (a new pass begins).
    pub(super) fn clear(&self) {
        self.parents.lock().clear();
        self.locks.lock().clear();
    }

    /// The canonical path of `path`, as [`FileSystem::canonicalize`] gives
    /// it, each directory resolved once per pass: when `path`'s last
    /// component is a plain name and `path` itself is not a symbolic link,
    /// it is its parent's canonical path (resolved the same way, and kept)
    /// joined with that name: one `lstat` per new component instead of a
    /// look-up per component of the whole path. A link, `..`, or a root is
    /// resolved by [`FileSystem::canonicalize`].
    ///
    /// # Errors
    ///
    /// When `path` does not exist or cannot be resolved.
    pub(super) fn canonicalize(&self, fs: &dyn FileSystem, path: &Path) -> io::Result<PathBuf> {
        if let Some(known) = self.parents.lock().get(path) {
            return known
                .clone()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not resolvable"));
        }
        let resolved = self.resolve(fs, path);
        self.parents
            .lock()
            .insert(path.to_path_buf(), resolved.as_ref().ok().cloned());
        resolved
    }

    fn resolve(&self, fs: &dyn FileSystem, path: &Path) -> io::Result<PathBuf> {
        let (Some(parent), Some(Component::Normal(name))) =
            (path.parent(), path.components().next_back())
        else {
            return fs.canonicalize(path);
        };
        if parent.as_os_str().is_empty() || parent.parent().is_none() {
            return fs.canonicalize(path);
        }
        if fs.is_symlink(path)? {
            return fs.canonicalize(path);
        }
        Ok(self.canonicalize(fs, parent)?.join(name))
    }

    /// The lock file of `dir` ([`integrity::read_lock`]), read once per
    /// pass; an unreadable or invalid one is not kept (each plugin reports
    /// it).
    ///
    /// # Errors
    ///
    /// As [`integrity::read_lock`].
    pub(super) fn lock(
        &self,
        fs: &dyn FileSystem,
        dir: &Path,
    ) -> Result<Option<Arc<Lock>>, IntegrityError> {
        if let Some(known) = self.locks.lock().get(dir) {
            return Ok(known.clone());
        }
        let read = integrity::read_lock(fs, dir)?.map(Arc::new);
        if let Some(lock) = &read {
            warn_of_pins_without_a_directory(fs, dir, lock);
        }
        self.locks.lock().insert(dir.to_path_buf(), read.clone());
        Ok(read)
    }
}

/// Says (WARN, once a pass) which directories `dir`'s lock pins that are
/// not there: a plugin directory renamed or removed since `forgesyte lock`
/// left its pin behind, and a plugin renamed so loads unpinned (pins are
/// keyed by directory name), which nothing said.
fn warn_of_pins_without_a_directory(fs: &dyn FileSystem, dir: &Path, lock: &Lock) {
    let gone: Vec<&str> = lock
        .plugins
        .keys()
        .filter(|name| !fs.metadata(&dir.join(name)).is_ok_and(|m| m.is_dir))
        .map(String::as_str)
        .collect();
    if !gone.is_empty() {
        tracing::warn!(
            lock = %dir.join(integrity::LOCK_FILE).display(),
            "{} pins plugin directories that are not there: {}; a plugin directory renamed \
             since it was locked loads unpinned: run `forgesyte lock` again",
            integrity::LOCK_FILE,
            gone.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgesyte_deps::RealFs;

    #[test]
    fn canonical_paths_match_the_full_resolution_through_links_too() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("real/plugin")).expect("dirs");
        std::fs::write(root.join("real/plugin/lib.so"), b"x").expect("file");
        std::os::unix::fs::symlink(root.join("real"), root.join("via")).expect("link");
        std::os::unix::fs::symlink(root.join("real/plugin"), root.join("real/linked"))
            .expect("link");
        let cache = PassCache::default();
        for path in [
            root.join("real/plugin"),
            root.join("via/plugin"),
            root.join("via/plugin/lib.so"),
            root.join("real/linked"),
            root.join("real/linked/lib.so"),
            root.join("via/plugin/../plugin/lib.so"),
        ] {
            // Twice: the second answer comes from the cached parent.
            for _ in 0..2 {
                assert_eq!(
                    cache.canonicalize(&RealFs, &path).expect("resolves"),
                    std::fs::canonicalize(&path).expect("resolves"),
                    "{}",
                    path.display()
                );
            }
        }
        assert!(
            cache
                .canonicalize(&RealFs, &root.join("real/gone"))
                .is_err()
        );
    }

    #[test]
    fn the_lock_file_is_read_once_per_pass() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = PassCache::default();
        assert!(cache.lock(&RealFs, tmp.path()).expect("absent").is_none());
        let path = tmp.path().join(integrity::LOCK_FILE);
        std::fs::write(&path, br#"{"version": 1, "plugins": {}}"#).expect("write");
        // Still absent for this pass; seen after a clear.
        assert!(cache.lock(&RealFs, tmp.path()).expect("cached").is_none());
        cache.clear();
        assert!(cache.lock(&RealFs, tmp.path()).expect("read").is_some());
        // A bad one is an error, every time (not kept).
        std::fs::write(&path, b"{").expect("write");
        cache.clear();
        assert!(cache.lock(&RealFs, tmp.path()).is_err());
        assert!(cache.lock(&RealFs, tmp.path()).is_err());
    }
}
