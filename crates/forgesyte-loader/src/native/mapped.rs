//! What the dynamic loader of this process has mapped, so that a library
//! is never answered with another one.
//!
//! glibc's `dlopen` first compares the path it is given with the names of
//! the objects it has mapped, then the opened file's device and inode with
//! theirs, and returns the object it finds either way, without reading the
//! file. Libraries are opened with `RTLD_NODELETE` and never unmapped, so
//! once a name or a file was mapped, a `dlopen` of that name (a link
//! retargeted to a new build, a file replaced by rename, a library that
//! failed its checks after it was mapped and was then fixed) or of that
//! file under another name (a hard link, a second path) would run the code
//! mapped first.
//!
//! [`claim`] records every name and file this process maps by path and says
//! when one is taken: the library is then loaded from a memory file of its
//! bytes (a new name and a new file). A name asked for again with the same
//! file, unchanged, maps nothing new: the dynamic loader's answer is that
//! very file's code, so an unchanged library retried or reloaded costs no
//! memory. [`unclaimed_fd_path`] gives a memory file a `/proc/self/fd/N`
//! name that no mapped object has.
//!
//! Knows paths, file metadata and the dynamic loader; nothing of plugins.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use libloading::os::unix::{Library, RTLD_NOW};
use parking_lot::Mutex;

/// `RTLD_NOLOAD` (glibc and musl): only look for an object already mapped.
const RTLD_NOLOAD: i32 = 0x4;

/// A file as it was when it was mapped: which file, and its size and
/// change time (a file rewritten in place is another version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Self {
        Version {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// The names given to `dlopen` and the files (device, inode) mapped.
#[derive(Debug, Default)]
struct Mapped {
    names: HashMap<PathBuf, Version>,
    files: HashSet<(u64, u64)>,
}

static MAPPED: LazyLock<Mutex<Mapped>> = LazyLock::new(Mutex::default);

/// How to open a library file.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// `dlopen` its path: the name and the file are not mapped, or the name
    /// maps this very file, unchanged. [`Unmapped::mapped`] records it once
    /// the dynamic loader has mapped it.
    Path(Unmapped),
    /// Load its bytes from a memory file: the name maps another file or
    /// another version of it, or the file is mapped under another name.
    Copy,
}

/// A library about to be mapped by its name.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Unmapped {
    name: PathBuf,
    version: Version,
}

impl Unmapped {
    /// Records that the dynamic loader has mapped it (and keeps it mapped:
    /// even if it is refused afterwards). A library that was never mapped
    /// is not recorded: its file may be deleted, and its inode number
    /// given to another file.
    pub(super) fn mapped(self) {
        let mut mapped = MAPPED.lock();
        mapped.files.insert((self.version.dev, self.version.ino));
        mapped.names.insert(self.name, self.version);
    }
}

/// Whether the library at `name`, whose open file's metadata is `meta`,
/// may be opened by its path. (Two loads of one new name or file at once
/// both may: the dynamic loader then maps it once for both.)
pub(super) fn claim(name: &Path, meta: &std::fs::Metadata) -> Claim {
    let version = Version::of(meta);
    let mapped = MAPPED.lock();
    match mapped.names.get(name) {
        Some(known) if *known == version => {}
        Some(_) => return Claim::Copy,
        None if mapped.files.contains(&(version.dev, version.ino)) => return Claim::Copy,
        None => {}
    }
    Claim::Path(Unmapped {
        name: name.to_path_buf(),
        version,
    })
}

/// A descriptor of the file of `fd` and its `/proc/self/fd/N` path, with
/// an `N` that names no object the dynamic loader has mapped.
///
/// A memory file that got the number of an earlier one (closed since, its
/// library still mapped) would be answered with the earlier library. A
/// taken number is skipped: its descriptor stays open while a higher one is
/// tried, so the kernel cannot hand it out again.
pub(super) fn unclaimed_fd_path(fd: OwnedFd) -> std::io::Result<(OwnedFd, PathBuf)> {
    let mut skipped = Vec::new();
    let mut fd = fd;
    loop {
        let load = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        // SAFETY: with RTLD_NOLOAD nothing is opened or run: the handle of
        // an object already mapped (its count raised, lowered again when the
        // handle drops) or an error.
        if unsafe { Library::open(Some(&load), RTLD_NOW | RTLD_NOLOAD) }.is_err() {
            return Ok((fd, load));
        }
        let next = rustix::io::fcntl_dupfd_cloexec(&fd, fd.as_raw_fd() + 1)?;
        skipped.push(std::mem::replace(&mut fd, next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_or_a_file_mapped_before_is_copied_unless_it_is_the_same_version() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libx.so");
        std::fs::write(&lib, b"version one").unwrap();
        let meta = || std::fs::metadata(&lib).unwrap();
        let Claim::Path(unmapped) = claim(&lib, &meta()) else {
            panic!("new name, new file");
        };
        assert!(
            matches!(claim(&lib, &meta()), Claim::Path(_)),
            "not recorded before it is mapped"
        );
        unmapped.mapped();
        assert!(
            matches!(claim(&lib, &meta()), Claim::Path(_)),
            "the same, unchanged"
        );
        // The same file under another name: a hard link.
        let link = tmp.path().join("liby.so");
        std::fs::hard_link(&lib, &link).unwrap();
        let link_meta = std::fs::metadata(&link).unwrap();
        assert_eq!(
            claim(&link, &link_meta),
            Claim::Copy,
            "a file mapped already"
        );
        // The name with a new file: replaced by rename.
        let new = tmp.path().join("libx.so.new");
        std::fs::write(&new, b"version two").unwrap();
        std::fs::rename(&new, &lib).unwrap();
        assert_eq!(claim(&lib, &meta()), Claim::Copy, "a name mapped already");
        // A third file under a new name is its own.
        let other = tmp.path().join("libz.so");
        std::fs::write(&other, b"other").unwrap();
        let other_meta = std::fs::metadata(&other).unwrap();
        assert!(matches!(claim(&other, &other_meta), Claim::Path(_)));
    }
}
