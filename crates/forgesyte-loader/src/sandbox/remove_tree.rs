//! Removing a directory tree a plugin wrote (its scratch directory) without
//! recursion and without following a link.
//!
//! Hand-written rather than `std::fs::remove_dir_all`: the standard
//! library's removal recurses once per level, and a plugin can nest
//! directories far deeper than a thread's stack holds frames (20,000
//! levels, each made relative to the last, overflowed the stack of the
//! server thread that retired the plugin, and the server aborted). Here the
//! depth costs heap, not stack: one directory is open at a time, the way
//! down is remembered as (device, inode) pairs and names, and the way up is
//! `..`, checked against what was remembered.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

/// One directory on the way down: which it is, its name in the one above,
/// and the directories in it still to remove.
struct Level {
    id: (u64, u64),
    name: CString,
    subdirs: Vec<CString>,
}

/// Removes `name` in directory `parent`, and everything in it when it is a
/// directory, following no link (a link is removed, not what it leads
/// to). Nothing there is no error.
///
/// # Errors
///
/// When an entry cannot be removed, or a directory on the way up is not the
/// one that was gone down through (the tree was moved meanwhile): the
/// removal stops there.
pub(super) fn remove_tree_at(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let top = match open_dir(parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        // A link or a file in its place: that goes.
        Err(Errno::NOTDIR | Errno::LOOP) => return unlink(parent, name, AtFlags::empty()),
        Err(e) => return Err(e.into()),
    };
    let mut levels = vec![list(&top, name.to_owned())?];
    let mut current = top;
    while let Some(level) = levels.last_mut() {
        if let Some(child) = level.subdirs.pop() {
            let fd = match open_dir(current.as_fd(), &child) {
                Ok(fd) => fd,
                // Gone meanwhile: nothing to do.
                Err(Errno::NOENT) => continue,
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    unlink(current.as_fd(), &child, AtFlags::empty())?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            levels.push(list(&fd, child)?);
            current = fd;
            continue;
        }
        // Empty now: it goes, from the directory above it.
        let Some(done) = levels.pop() else { break };
        let Some(above) = levels.last() else {
            drop(current);
            return unlink(parent, &done.name, AtFlags::REMOVEDIR);
        };
        let up = rustix::fs::openat(
            &current,
            c"..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if identity(&up)? != above.id {
            return Err(io::Error::other(
                "a directory was moved while its tree was removed; the rest is left",
            ));
        }
        unlink(up.as_fd(), &done.name, AtFlags::REMOVEDIR)?;
        current = up;
    }
    Ok(())
}

/// Opens directory `name` in `at` without following a link, and makes it
/// the owner's to change (a plugin may have taken its own write or search
/// permission away; as root that does not matter, as its owner it does).
fn open_dir(at: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(at, name, flags, Mode::empty()) {
        Err(Errno::ACCESS) => {
            // Its mode through a handle that names the directory itself (a
            // path handle, opened without following a link), never by
            // name: a link put in its place meanwhile would be followed.
            let handle = rustix::fs::openat(
                at,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let through = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&handle));
            rustix::fs::chmod(through.as_str(), Mode::RWXU)?;
            rustix::fs::openat(&handle, c".", flags, Mode::empty())?
        }
        other => other?,
    };
    // Best effort: refused when it is not this process's (and then not
    // needed: a root server).
    let _ = rustix::fs::fchmod(&fd, Mode::RWXU);
    Ok(fd)
}

/// Removes what `dir` holds but its directories, and lists those.
fn list(dir: &OwnedFd, name: CString) -> io::Result<Level> {
    let mut subdirs = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let child = entry.file_name();
        if child == c"." || child == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(dir, child, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            _ => false,
        };
        if is_dir {
            subdirs.push(child.to_owned());
        } else {
            unlink(dir.as_fd(), child, AtFlags::empty())?;
        }
    }
    Ok(Level {
        id: identity(dir)?,
        name,
        subdirs,
    })
}

/// `unlinkat`; an entry already gone is no error.
fn unlink(at: BorrowedFd<'_>, name: &CStr, flags: AtFlags) -> io::Result<()> {
    match rustix::fs::unlinkat(at, name, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The device and inode of `fd`'s file (also what claims a scratch
/// directory checks, `sandbox/scratch.rs`).
pub(super) fn identity(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `depth` directories named `d` under `root`, each made
    /// relative to the last (as a plugin can: no path grows long).
    fn nest(root: &std::path::Path, depth: usize) {
        let mut fd =
            rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..depth {
            rustix::fs::mkdirat(&fd, c"d", Mode::RWXU).unwrap();
            fd = rustix::fs::openat(&fd, c"d", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .unwrap();
            rustix::fs::openat(
                &fd,
                c"f",
                OFlags::WRONLY | OFlags::CREATE,
                Mode::RUSR | Mode::WUSR,
            )
            .unwrap();
        }
    }

    fn parent_of(tmp: &tempfile::TempDir) -> OwnedFd {
        rustix::fs::open(
            tmp.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap()
    }

    /// Deeper than a small stack holds frames of a recursive removal (the
    /// standard library's overflowed a 2 MiB thread stack at 20,000 levels;
    /// this thread has 64 KiB for 30,000).
    #[test]
    fn a_tree_deeper_than_a_stack_holds_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("scratch");
        std::fs::create_dir(&top).unwrap();
        nest(&top, 30_000);
        let parent = parent_of(&tmp);
        let removed = std::thread::scope(|s| {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn_scoped(s, || remove_tree_at(parent.as_fd(), c"scratch"))
                .unwrap()
                .join()
                .unwrap()
        });
        removed.unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
    }

    #[test]
    fn wide_trees_files_links_and_closed_directories_go_and_no_link_is_followed() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "keep").unwrap();
        let top = tmp.path().join("scratch");
        for i in 0..50 {
            let dir = top.join(format!("a{i}/b/c"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("x"), "x").unwrap();
        }
        symlink(&outside, top.join("a0/link")).unwrap();
        symlink(outside.join("keep"), top.join("a1/b/file-link")).unwrap();
        // A directory its plugin closed to itself, one it may not write.
        std::fs::set_permissions(top.join("a2/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(top.join("a3/b"), std::fs::Permissions::from_mode(0o500)).unwrap();
        let parent = parent_of(&tmp);
        remove_tree_at(parent.as_fd(), c"scratch").unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
        // Nothing there: no error. A link in the tree's place: the link
        // goes, not what it leads to.
        remove_tree_at(parent.as_fd(), c"scratch").unwrap();
        symlink(&outside, &top).unwrap();
        remove_tree_at(parent.as_fd(), c"scratch").unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
        assert!(outside.join("keep").exists());
    }
}
