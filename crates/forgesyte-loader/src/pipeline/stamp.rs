//! The change stamp of a plugin directory: a cheap fingerprint that a
//! rescan compares to tell a changed plugin from an unchanged one.
//!
//! It hashes the manifest's bytes and, for every file under the directory
//! (a few levels deep, caches and virtual environments skipped), its
//! relative path, size, modification time and inode, so a library rebuilt
//! in place, replaced by a rename, or a Python source edited all change it;
//! so does the lock file (`forgesyte.lock`) beside the directory.
//! Reads the real filesystem; knows nothing of manifests' meaning, the
//! registry or the loader.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;

use crate::integrity::LOCK_FILE;
use crate::manifest::MANIFEST_FILE;

/// How deep under the plugin directory files are stamped.
const MAX_DEPTH: usize = 6;
/// At most this many entries are stamped (a huge tree is not a plugin's code).
const MAX_ENTRIES: usize = 5_000;
/// Directories never stamped: caches, environments, build output.
const SKIPPED: [&str; 7] = [
    "__pycache__",
    ".venv",
    "venv",
    "node_modules",
    "target",
    ".git",
    ".pytest_cache",
];

/// The stamp of `dir`; `None` when it cannot be read at all.
pub(super) fn stamp(dir: &Path) -> Option<u64> {
    let manifest = std::fs::read(dir.join(MANIFEST_FILE)).ok();
    stamp_with(dir, manifest.as_deref())
}

/// [`stamp`] of `dir` whose manifest bytes were read already (`None`: it
/// has none that can be read).
pub(super) fn stamp_with(dir: &Path, manifest: Option<&[u8]>) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    manifest.hash(&mut hasher);
    // The lock file beside the plugin directory pins it too.
    let lock = dir
        .parent()
        .and_then(|parent| std::fs::read(parent.join(LOCK_FILE)).ok());
    lock.hash(&mut hasher);
    let mut budget = MAX_ENTRIES;
    walk(dir, "", 0, &mut budget, &mut hasher).ok()?;
    Some(hasher.finish())
}

fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    budget: &mut usize,
    hasher: &mut DefaultHasher,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        if *budget == 0 {
            return Ok(());
        }
        *budget -= 1;
        let name = entry.file_name().to_string_lossy().into_owned();
        if SKIPPED.contains(&name.as_str()) || name.ends_with(".pyc") {
            continue;
        }
        let rel = format!("{prefix}{name}");
        // Follows links: a library that is a link to a rebuilt file changes.
        // Anything else is looked up in its directory (no walk of the path).
        let meta = match entry.file_type() {
            Ok(kind) if !kind.is_symlink() => entry.metadata(),
            _ => std::fs::metadata(entry.path()),
        };
        let Ok(meta) = meta else {
            rel.hash(hasher);
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(&entry.path(), &format!("{rel}/"), depth + 1, budget, hasher)?;
            }
            continue;
        }
        rel.hash(hasher);
        meta.len().hash(hasher);
        meta.modified().ok().hash(hasher);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), meta.dev(), meta.ctime(), meta.ctime_nsec()).hash(hasher);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stamp;

    #[test]
    fn a_changed_manifest_source_or_replaced_file_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("manifest.json"), b"{\"name\": \"a\"}").unwrap();
        std::fs::write(root.join("plugin.py"), b"x = 1\n").unwrap();
        let first = stamp(root).unwrap();
        assert_eq!(stamp(root), Some(first), "stable when nothing changes");
        // A cache write is not a change.
        std::fs::create_dir(root.join("__pycache__")).unwrap();
        std::fs::write(root.join("__pycache__/plugin.cpython-311.pyc"), b"..").unwrap();
        assert_eq!(stamp(root), Some(first));
        // Same size, new content through a rename: a new inode.
        std::fs::write(root.join("plugin.py.new"), b"x = 2\n").unwrap();
        std::fs::rename(root.join("plugin.py.new"), root.join("plugin.py")).unwrap();
        let second = stamp(root).unwrap();
        assert_ne!(second, first);
        std::fs::write(root.join("manifest.json"), b"{\"name\": \"b\"}").unwrap();
        assert_ne!(stamp(root), Some(second));
        assert_eq!(stamp(&root.join("missing")), None);
    }
}
