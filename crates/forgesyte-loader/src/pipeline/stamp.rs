//! The change stamp of a plugin directory: a cheap fingerprint that a
//! rescan compares to tell a changed plugin from an unchanged one.
//!
//! It hashes the manifest's bytes and, for every file under the directory
//! (a few levels deep, caches and virtual environments skipped), its
//! relative path, size, modification and change time and inode, so a
//! library rebuilt in place, replaced by a rename, or a Python source
//! edited all change it (a `chmod` too: the change time is what catches
//! bytes replaced with their old modification time kept);
//! so does the lock file (`forgesyte.lock`) beside the directory.
//!
//! What a running plugin writes is not its code: the paths its manifest
//! grants it to write (`filesystem.write`, inside its directory) and files
//! and directories that hold runtime output by name (`*.log`, `*.tmp`,
//! `*.pid`, `*.swp`, `logs/`, `tmp/`, `.cache/`) are not stamped, so a
//! plugin that writes beside itself is not reloaded (over and over, under
//! `--watch`) for it.
//!
//! Reads the real filesystem; of a manifest it knows only that grant; nothing
//! of the registry or the loader.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir};

use crate::integrity::LOCK_FILE;
use crate::manifest::MANIFEST_FILE;

/// How deep under the plugin directory files are stamped.
const MAX_DEPTH: usize = 6;
/// At most this many entries are stamped (a huge tree is not a plugin's code).
const MAX_ENTRIES: usize = 5_000;
/// How a directory is opened to be listed (links followed, as `read_dir`
/// does).
const OPEN_DIRECTORY: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);
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
/// Directories of runtime output by name: only the code in them (see
/// [`is_code`]) is stamped.
const RUNTIME_DIRS: [&str; 3] = [".cache", "logs", "tmp"];
/// Endings of files of runtime output, never stamped.
const RUNTIME_ENDINGS: [&str; 4] = [".log", ".tmp", ".pid", ".swp"];

/// Whether a file of this name is never stamped, wherever it is: bytecode,
/// or runtime output by its ending.
fn unstamped_file(name: &str) -> bool {
    name.ends_with(".pyc") || RUNTIME_ENDINGS.iter().any(|e| name.ends_with(e))
}

/// Whether a file of this name is code a plugin loads: Python sources and
/// extension modules, shared libraries (versioned ones too).
fn is_code(name: &str) -> bool {
    name.ends_with(".py")
        || name.ends_with(".pyd")
        || name.ends_with(".so")
        || name.contains(".so.")
}

/// Whether `path` (relative to a plugins directory) is what running plugins
/// write by name, and no code: bytecode, a file of a runtime ending, or
/// one under a directory of runtime output that is not code. A change
/// there changes no plugin's stamp, so `--watch` need not rescan for it.
/// (Caches and build output are the watch's own business: a library
/// rebuilt under `target/` and found on `--lib-path` is reloaded.)
pub fn runtime_output(path: &Path) -> bool {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
        return false;
    };
    if unstamped_file(&name) {
        return true;
    }
    let under = |dirs: &[&str]| {
        path.parent().is_some_and(|parent| {
            parent.components().any(|c| match c {
                std::path::Component::Normal(part) => dirs.iter().any(|d| part == *d),
                _ => false,
            })
        })
    };
    under(&RUNTIME_DIRS) && !is_code(&name)
}

/// Whether a file at `path` is what a plugin loads or is checked by,
/// whoever wrote it: its manifest, the lock file, its signature's list and
/// signature, code (`is_code`: Python sources and extension modules,
/// shared libraries). `serve --watch` never takes a change of one for a
/// plugin's own output.
pub fn loaded_by_plugins(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|name| {
            [
                MANIFEST_FILE,
                LOCK_FILE,
                crate::signature::LIST_FILE,
                crate::signature::SIG_FILE,
            ]
            .contains(&name.as_ref())
                || is_code(&name)
        })
}

/// The stamp of `dir`, whose manifest is read if it is a regular file of
/// at most `max_manifest` bytes (else its size, time and inode in the
/// walk stand for it); `None` when it cannot be read at all.
pub(super) fn stamp(dir: &Path, max_manifest: u64) -> Option<u64> {
    let manifest = read_regular(&dir.join(MANIFEST_FILE), max_manifest);
    let lock = dir.parent().and_then(lock_beside);
    stamp_with(dir, manifest.as_deref(), lock.as_deref())
}

/// The stamp of one file (its path, size, modification and change time,
/// inode), for a plugin that is one file in a directory it shares with
/// others (an installed top-level module in `site-packages`): `None` when
/// it cannot be looked at; a fixed stamp when there is no file (a module
/// not found: nothing of it on disk to change).
pub(super) fn stamp_file(path: Option<&Path>) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    if let Some(path) = path {
        let st = rustix::fs::stat(path).ok()?;
        (
            path,
            st.st_size,
            st.st_mtime,
            st.st_mtime_nsec,
            st.st_ctime,
            st.st_ctime_nsec,
        )
            .hash(&mut hasher);
        st.st_ino.hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// The bytes of the lock file (`forgesyte.lock`) in `parent`, which pins
/// the plugin directories beside it; `None` when it cannot be read (or is
/// no regular file of at most the lock file's limit).
pub(super) fn lock_beside(parent: &Path) -> Option<Vec<u8>> {
    read_regular(&parent.join(LOCK_FILE), crate::integrity::MAX_LOCK_BYTES)
}

/// The bytes of `path` if it is a regular file of at most `limit` bytes:
/// a manifest linked to `/dev/zero` was read without end (the server's
/// memory with it), a FIFO waited for a writer.
fn read_regular(path: &Path, limit: u64) -> Option<Vec<u8>> {
    use forgesyte_deps::FileSystem as _;
    let bytes = forgesyte_deps::RealFs.read(path, limit).ok()?;
    (bytes.len() as u64 <= limit).then_some(bytes)
}

/// [`stamp`] of `dir` whose manifest bytes and lock file (of the
/// directory that holds `dir`, [`lock_beside`]) were read already (`None`:
/// none that can be read). A load pass reads the lock file once.
pub(super) fn stamp_with(dir: &Path, manifest: Option<&[u8]>, lock: Option<&[u8]>) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    manifest.hash(&mut hasher);
    // The lock file beside the plugin directory pins it too.
    lock.hash(&mut hasher);
    let mut budget = MAX_ENTRIES;
    let granted = manifest.map(|m| write_grants(dir, m)).unwrap_or_default();
    let opened = rustix::fs::open(dir, OPEN_DIRECTORY, Mode::empty()).ok()?;
    let walk = Walk {
        granted: &granted,
        depth: 0,
        code_only: false,
    };
    walk.run(&opened, "", &mut budget, &mut hasher).ok()?;
    Some(hasher.finish())
}

/// The paths, relative to `dir` and without a trailing `/`, that the
/// manifest (its bytes) grants the plugin to write inside its directory.
/// Only a manifest that names `write` at all is parsed: the others (most)
/// cost no parse.
fn write_grants(dir: &Path, manifest: &[u8]) -> Vec<String> {
    if !manifest.windows(7).any(|w| w == b"\"write\"") {
        return Vec::new();
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(manifest) else {
        return Vec::new();
    };
    let Ok(spec) = crate::sandbox::parse_spec(&fields) else {
        return Vec::new();
    };
    spec.write
        .iter()
        .filter_map(|grant| {
            let path = dir.join(grant);
            let inside = path.strip_prefix(dir).ok()?;
            let rel: Vec<String> = inside
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            // `..` would leave the directory: such a grant is not inside.
            let escapes = inside
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
            (!rel.is_empty() && !escapes).then(|| rel.join("/"))
        })
        .collect()
}

/// Whether `rel` (a path relative to the plugin directory) is one of
/// `granted` or lies under one.
fn is_granted(rel: &str, granted: &[String]) -> bool {
    granted.iter().any(|g| {
        rel.strip_prefix(g.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Where a walk is: the plugin's write grants, how deep, and whether only
/// code is stamped here (under runtime output or a write grant: what the
/// plugin writes there is no change, its code there still is).
#[derive(Clone, Copy)]
struct Walk<'a> {
    granted: &'a [String],
    depth: usize,
    code_only: bool,
}

impl Walk<'_> {
    /// Hashes the entries under the open directory `dir`, in name order.
    ///
    /// Lists with `getdents64` into a buffer on the stack: `std::fs::read_dir`
    /// allocates 32 KiB per directory, and with a stamp per plugin on the
    /// pass's threads those buffers made about 700 of a 1,000-plugin pass's
    /// heap growths (BENCHMARKS.md, "Stop 24"); entries are looked up relative
    /// to the directory's descriptor, not by their whole path.
    fn run(
        self,
        dir: &OwnedFd,
        prefix: &str,
        budget: &mut usize,
        hasher: &mut DefaultHasher,
    ) -> std::io::Result<()> {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut listing = RawDir::new(dir, &mut buf);
        let mut entries: Vec<(Vec<u8>, FileType)> = Vec::new();
        while let Some(entry) = listing.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                entries.push((name.to_vec(), entry.file_type()));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (raw_name, kind) in entries {
            let name = String::from_utf8_lossy(&raw_name);
            // Skipped before they count: a large cache or environment must
            // not use up the budget of the files that matter.
            if SKIPPED.contains(&&*name) || unstamped_file(&name) {
                continue;
            }
            let rel = format!("{prefix}{name}");
            // Under runtime output or a write grant, only code counts.
            let code_only =
                self.code_only || RUNTIME_DIRS.contains(&&*name) || is_granted(&rel, self.granted);
            // Follows links: a library that is a link to a rebuilt file
            // changes. Anything else is looked up without following.
            let follow = matches!(kind, FileType::Symlink | FileType::Unknown);
            let flags = if follow {
                AtFlags::empty()
            } else {
                AtFlags::SYMLINK_NOFOLLOW
            };
            let meta = rustix::fs::statat(dir, raw_name.as_slice(), flags).ok();
            let is_dir = meta
                .as_ref()
                .is_some_and(|m| FileType::from_raw_mode(m.st_mode) == FileType::Directory);
            if code_only && !is_dir && !is_code(&name) {
                continue;
            }
            if *budget == 0 {
                return Ok(());
            }
            *budget -= 1;
            let Some(meta) = meta else {
                rel.hash(hasher);
                continue;
            };
            if is_dir {
                if self.depth < MAX_DEPTH {
                    // A subdirectory that cannot be read counts as such: the
                    // rest of the plugin is still stamped (one unreadable
                    // directory made the whole stamp None, which never
                    // changes). A directory under runtime output counts by
                    // its code only: its own times change with every file
                    // written in it.
                    let inner = Walk {
                        depth: self.depth + 1,
                        code_only,
                        ..self
                    };
                    let walked =
                        rustix::fs::openat(dir, raw_name.as_slice(), OPEN_DIRECTORY, Mode::empty())
                            .map_err(std::io::Error::from)
                            .and_then(|sub| inner.run(&sub, &format!("{rel}/"), budget, hasher));
                    if let Err(e) = walked {
                        (&rel, "unreadable", e.raw_os_error()).hash(hasher);
                    }
                }
                continue;
            }
            rel.hash(hasher);
            (
                meta.st_size,
                meta.st_mtime,
                meta.st_mtime_nsec,
                meta.st_ino,
                meta.st_dev,
                meta.st_ctime,
                meta.st_ctime_nsec,
            )
                .hash(hasher);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::stamp;
    use std::path::Path;

    #[test]
    fn a_changed_manifest_source_or_replaced_file_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("manifest.json"), b"{\"name\": \"a\"}").unwrap();
        std::fs::write(root.join("plugin.py"), b"x = 1\n").unwrap();
        let first = stamp(root, 1 << 20).unwrap();
        assert_eq!(
            stamp(root, 1 << 20),
            Some(first),
            "stable when nothing changes"
        );
        // A cache write is not a change.
        std::fs::create_dir(root.join("__pycache__")).unwrap();
        std::fs::write(root.join("__pycache__/plugin.cpython-311.pyc"), b"..").unwrap();
        assert_eq!(stamp(root, 1 << 20), Some(first));
        // Same size, new content through a rename: a new inode.
        std::fs::write(root.join("plugin.py.new"), b"x = 2\n").unwrap();
        std::fs::rename(root.join("plugin.py.new"), root.join("plugin.py")).unwrap();
        let second = stamp(root, 1 << 20).unwrap();
        assert_ne!(second, first);
        std::fs::write(root.join("manifest.json"), b"{\"name\": \"b\"}").unwrap();
        assert_ne!(stamp(root, 1 << 20), Some(second));
        assert_eq!(stamp(&root.join("missing"), 1 << 20), None);
    }

    /// What a running plugin writes beside itself (its manifest's write
    /// grants inside its directory, logs and temporary files by name) does
    /// not change its stamp; its code beside them still does.
    #[test]
    fn what_a_plugin_writes_beside_itself_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("manifest.json"),
            br#"{"name": "a", "filesystem": {"write": ["./cache/", "out.json", "../elsewhere"]}}"#,
        )
        .unwrap();
        std::fs::write(root.join("plugin.py"), b"x = 1\n").unwrap();
        let first = stamp(root, 1 << 20).unwrap();
        std::fs::create_dir(root.join("cache")).unwrap();
        std::fs::write(root.join("cache/weights.bin"), b"w").unwrap();
        std::fs::write(root.join("out.json"), b"{}").unwrap();
        std::fs::write(root.join("run.log"), b"line\n").unwrap();
        std::fs::write(root.join("job.tmp"), b"").unwrap();
        std::fs::create_dir(root.join("logs")).unwrap();
        std::fs::write(root.join("logs/today.txt"), b"line\n").unwrap();
        assert_eq!(stamp(root, 1 << 20), Some(first));
        // Not a grant: a file whose name only starts like one.
        std::fs::write(root.join("out.json.bak"), b"{}").unwrap();
        let second = stamp(root, 1 << 20).unwrap();
        assert_ne!(second, first);
        std::fs::write(root.join("plugin.py"), b"x = 22\n").unwrap();
        let third = stamp(root, 1 << 20).unwrap();
        assert_ne!(third, second);
        // Code under runtime output or a write grant still counts: a
        // package named `logs`, a module planted in the grant.
        std::fs::write(root.join("logs/__init__.py"), b"").unwrap();
        let fourth = stamp(root, 1 << 20).unwrap();
        assert_ne!(fourth, third);
        std::fs::write(root.join("cache/evil.py"), b"import os\n").unwrap();
        let fifth = stamp(root, 1 << 20).unwrap();
        assert_ne!(fifth, fourth);
        std::fs::write(root.join("cache/libx.so.1"), b"\x7fELF").unwrap();
        assert_ne!(stamp(root, 1 << 20), Some(fifth));
        // What the watch leaves out is what the stamp does.
        for written in [
            "run.log",
            "logs/today.txt",
            "a/tmp/x.bin",
            ".cache/h/w",
            "m.pyc",
        ] {
            assert!(super::runtime_output(Path::new(written)), "{written}");
        }
        for code in [
            "plugin.py",
            "logs/__init__.py",
            "tmp/lib.so",
            "manifest.json",
            "data.bin",
        ] {
            assert!(!super::runtime_output(Path::new(code)), "{code}");
        }
        // What a plugin loads, whoever wrote it; not what it may write.
        for loaded in [
            "plugin.py",
            "a/lib.so.1",
            "manifest.json",
            "forgesyte.lock",
            "forgesyte.sig.list",
            "forgesyte.sig.list.minisig",
        ] {
            assert!(super::loaded_by_plugins(Path::new(loaded)), "{loaded}");
        }
        for written in ["state.json", "data.bin", "manifest.json.bak"] {
            assert!(!super::loaded_by_plugins(Path::new(written)), "{written}");
        }
        assert_eq!(
            super::write_grants(
                root,
                br#"{"filesystem": {"write": ["/abs/out", "a/../b"]}}"#
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn skipped_entries_do_not_use_up_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("manifest.json"), b"{}").unwrap();
        // More compiled files than the budget, all sorted before the source.
        for i in 0..=super::MAX_ENTRIES {
            std::fs::write(root.join(format!("a{i:05}.pyc")), b"").unwrap();
        }
        std::fs::write(root.join("z.py"), b"x = 1\n").unwrap();
        let first = stamp(root, 1 << 20).unwrap();
        std::fs::write(root.join("z.py"), b"x = 22\n").unwrap();
        assert_ne!(stamp(root, 1 << 20), Some(first), "the source is stamped");
    }

    #[test]
    fn files_in_subdirectories_and_behind_links_are_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.join("manifest.json"), b"{}").unwrap();
        std::fs::create_dir(root.join("pkg")).unwrap();
        std::fs::write(root.join("pkg/mod.py"), b"a = 1\n").unwrap();
        std::fs::write(outside.path().join("lib.so"), b"build 1").unwrap();
        std::os::unix::fs::symlink(outside.path().join("lib.so"), root.join("lib.so")).unwrap();
        let first = stamp(root, 1 << 20).unwrap();
        // A library rebuilt behind its link (the link itself unchanged).
        std::fs::write(outside.path().join("lib.so"), b"build 22").unwrap();
        let second = stamp(root, 1 << 20).unwrap();
        assert_ne!(second, first, "the link's target is stamped");
        // A source two levels down.
        std::fs::write(root.join("pkg/mod.py"), b"a = 22\n").unwrap();
        assert_ne!(
            stamp(root, 1 << 20),
            Some(second),
            "a subdirectory's file is stamped"
        );
    }
}
