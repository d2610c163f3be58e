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
//! [`claim`] says whether a library may be opened by its path: only when
//! neither its name nor its file was mapped before. Otherwise it is loaded
//! from a memory file of its bytes (a new name and a new file), even when
//! the file is unchanged: a plugin retried after a failure gets fresh code
//! and statics, not the state (a lock held by a thread still stuck in it, a
//! poisoned `Once`) that made it fail. [`Unmapped::mapped`] records a name
//! and a file once `dlopen` mapped them; the claim holds the record's lock
//! until then, so two loads of one name or file at once cannot both take
//! the path. [`unclaimed_fd_path`] gives a memory file a `/proc/self/fd/N`
//! name that no mapped object has.
//!
//! Knows paths, file metadata and the dynamic loader; nothing of plugins.

use std::collections::HashSet;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use libloading::os::unix::{Library, RTLD_NOW};
use parking_lot::{Mutex, MutexGuard};

/// The names given to `dlopen` and the files (device, inode) mapped.
#[derive(Debug, Default)]
struct Mapped {
    names: HashSet<PathBuf>,
    files: HashSet<(u64, u64)>,
}

static MAPPED: LazyLock<Mutex<Mapped>> = LazyLock::new(Mutex::default);

/// How to open a library file.
#[derive(Debug)]
pub(super) enum Claim {
    /// `dlopen` its path: neither the name nor the file is mapped.
    /// [`Unmapped::mapped`] records them once the dynamic loader has mapped
    /// them; until it is dropped no other library can be claimed.
    Path(Unmapped),
    /// Load its bytes from a memory file: the name or the file was mapped.
    Copy,
}

/// A library about to be mapped by its name, holding the record's lock.
pub(super) struct Unmapped {
    name: PathBuf,
    file: (u64, u64),
    mapped: MutexGuard<'static, Mapped>,
}

impl std::fmt::Debug for Unmapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmapped")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Unmapped {
    /// Records that the dynamic loader has mapped it (and keeps it mapped,
    /// even if it is refused afterwards). A library that was never mapped
    /// is not recorded: its file may be deleted, and its inode number
    /// given to another file.
    pub(super) fn mapped(mut self) {
        self.mapped.files.insert(self.file);
        let name = std::mem::take(&mut self.name);
        self.mapped.names.insert(name);
    }
}

/// Whether the library at `name`, whose open file's metadata is `meta`,
/// may be opened by its path.
pub(super) fn claim(name: &Path, meta: &std::fs::Metadata) -> Claim {
    let file = (meta.dev(), meta.ino());
    let mapped = MAPPED.lock();
    if mapped.names.contains(name) || mapped.files.contains(&file) {
        return Claim::Copy;
    }
    Claim::Path(Unmapped {
        name: name.to_path_buf(),
        file,
        mapped,
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
        if unsafe { Library::open(Some(&load), RTLD_NOW | libc::RTLD_NOLOAD) }.is_err() {
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
    fn a_name_or_a_file_mapped_before_is_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libx.so");
        std::fs::write(&lib, b"version one").unwrap();
        let meta = || std::fs::metadata(&lib).unwrap();
        let Claim::Path(unmapped) = claim(&lib, &meta()) else {
            panic!("new name, new file");
        };
        // Not recorded before it is mapped (the file may go, its inode
        // number to another one).
        drop(unmapped);
        let Claim::Path(unmapped) = claim(&lib, &meta()) else {
            panic!("not recorded before it is mapped");
        };
        unmapped.mapped();
        assert!(
            matches!(claim(&lib, &meta()), Claim::Copy),
            "the same, again"
        );
        // The same file under another name: a hard link.
        let link = tmp.path().join("liby.so");
        std::fs::hard_link(&lib, &link).unwrap();
        let link_meta = std::fs::metadata(&link).unwrap();
        assert!(
            matches!(claim(&link, &link_meta), Claim::Copy),
            "a file mapped already"
        );
        // The name with a new file: replaced by rename.
        let new = tmp.path().join("libx.so.new");
        std::fs::write(&new, b"version two").unwrap();
        std::fs::rename(&new, &lib).unwrap();
        assert!(
            matches!(claim(&lib, &meta()), Claim::Copy),
            "a name mapped already"
        );
        // A third file under a new name is its own.
        let other = tmp.path().join("libz.so");
        std::fs::write(&other, b"other").unwrap();
        let other_meta = std::fs::metadata(&other).unwrap();
        assert!(matches!(claim(&other, &other_meta), Claim::Path(_)));
    }
}
