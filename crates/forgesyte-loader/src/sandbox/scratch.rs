//! The user runners run as ([`RunAs`], `--runner-user`) and the private
//! scratch directory each plugin's runner may write ([`scratch_dir`]),
//! made in the shared temporary directory without following a link.

use std::path::{Path, PathBuf};

/// The unprivileged user runners run as (`--runner-user`), when the server
/// runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunAs {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id (its only group: supplementary groups are
    /// dropped).
    pub gid: u32,
}

impl RunAs {
    /// Makes `command` start as this user and group. (The standard library
    /// drops the supplementary groups too when a root process changes its
    /// user.)
    pub(crate) fn set_on(self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        command.uid(self.uid).gid(self.gid);
    }
}

/// The scratch directory of `plugin`: `DIR/forgesyte-scratch-UID/PLUGIN`
/// under the system's temporary directory, created private (0700) and owned
/// by the user its runner runs as (`owner`, else this process's user). The
/// plugin's name is made safe as one path component.
///
/// # Errors
///
/// When it cannot be created, or is not a private directory of that user's.
pub fn scratch_dir(plugin: &str, owner: Option<RunAs>) -> std::io::Result<PathBuf> {
    scratch_dir_in(&std::env::temp_dir(), plugin, owner)
}

/// Where the scratch directories of the runners of user `uid` are under
/// `tmp`, and the name of `plugin`'s there (made safe as one path
/// component).
fn scratch_path(tmp: &Path, plugin: &str, uid: u32) -> (PathBuf, String) {
    let name: String = plugin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() || name.chars().all(|c| c == '.') {
        "_".to_owned()
    } else {
        name
    };
    (tmp.join(format!("forgesyte-scratch-{uid}")), name)
}

/// Removes the scratch directory of `plugin` (of a plugin retired: what
/// its runner left there is not handed to the next plugin of its name, and
/// `/tmp` does not grow with every name a plugin ever had). Nothing there
/// is no error.
///
/// # Errors
///
/// When it cannot be removed.
pub fn remove_scratch_dir(plugin: &str, owner: Option<RunAs>) -> std::io::Result<()> {
    remove_scratch_dir_in(&std::env::temp_dir(), plugin, owner)
}

/// [`remove_scratch_dir`] under `tmp`. The runners' directory is opened
/// without following a link, and checked as when it was made; the removal
/// goes through that handle, so a link the runner's user put in `tmp` in
/// its place leads nowhere, and follows no link below it, at any depth
/// (`remove_tree`: no recursion).
pub(super) fn remove_scratch_dir_in(
    tmp: &Path,
    plugin: &str,
    owner: Option<RunAs>,
) -> std::io::Result<()> {
    use rustix::fs::{CWD, Mode, OFlags};
    let me = rustix::process::geteuid().as_raw();
    let uid = owner.map_or(me, |o| o.uid);
    let (root, name) = scratch_path(tmp, plugin, uid);
    let root_fd = match rustix::fs::openat(
        CWD,
        &root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&root_fd)?;
    if stat.st_uid != me && stat.st_uid != uid {
        return Err(std::io::Error::other(format!(
            "{} belongs to another user (uid {})",
            root.display(),
            stat.st_uid
        )));
    }
    // A made-safe name holds no NUL.
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    super::remove_tree::remove_tree_at(std::os::fd::AsFd::as_fd(&root_fd), &name)
}

/// [`scratch_dir`] under `tmp`.
///
/// The temporary directory is everyone's: another local user may have made
/// either level first, or put a symbolic link there. So each level is
/// opened without following links, must be a directory owned by this
/// process's user or the runner's, and gets its owner and mode through its
/// handle, never by path (a `chown` by path followed a planted link: a
/// server running as root handed the link's target, `/etc`, to the runner).
pub(super) fn scratch_dir_in(
    tmp: &Path,
    plugin: &str,
    owner: Option<RunAs>,
) -> std::io::Result<PathBuf> {
    use rustix::fs::{CWD, Mode, OFlags};
    let me = rustix::process::geteuid().as_raw();
    let uid = owner.map_or(me, |o| o.uid);
    let (root, name) = scratch_path(tmp, plugin, uid);
    let dir = root.join(&name);
    // One level: made if missing, opened without following a link, checked
    // and handed to the runner's user through the handle.
    let level = |at: std::os::fd::BorrowedFd<'_>,
                 component: &Path,
                 shown: &Path|
     -> std::io::Result<rustix::fd::OwnedFd> {
        match rustix::fs::mkdirat(at, component, Mode::RWXU) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(
            at,
            component,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            // What opening it meets, not what it is: said as it is.
            rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP => std::io::Error::other(format!(
                "{} is not a directory ({e}); a link there is not followed",
                shown.display()
            )),
            other => std::io::Error::other(format!("cannot open {}: {other}", shown.display())),
        })?;
        let stat = rustix::fs::fstat(&fd)?;
        if stat.st_uid != me && stat.st_uid != uid {
            return Err(std::io::Error::other(format!(
                "{} belongs to another user (uid {}); remove it",
                shown.display(),
                stat.st_uid
            )));
        }
        if stat.st_uid != uid {
            let gid = owner.map(|o| rustix::fs::Gid::from_raw(o.gid));
            rustix::fs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), gid)?;
        }
        rustix::fs::fchmod(&fd, Mode::RWXU)?;
        Ok(fd)
    };
    use std::os::fd::AsFd;
    let root_fd = level(CWD, &root, &root)?;
    level(root_fd.as_fd(), Path::new(&name), &dir)?;
    Ok(dir)
}
