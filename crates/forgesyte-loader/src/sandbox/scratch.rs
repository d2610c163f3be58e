//! The user runners run as ([`RunAs`], `--runner-user`) and the private
//! scratch directory each plugin's runner may write ([`scratch_dir`]),
//! made in the shared temporary directory without following a link, and
//! claimed by one server at a time.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::remove_tree::identity;

/// The most servers of one user that hold a scratch directory of one
/// plugin name at once (`NAME`, then `NAME~2` … `NAME~64`).
const MAX_CLAIMS: usize = 64;

/// A scratch directory this process holds: its name in the runners'
/// directory, and the handle of the directory itself that claims it (an
/// exclusive `flock` on it, let go with the process: no server of the
/// same user takes it while this one has the plugin loaded; no lock file
/// beside it, which a cleaner of old files in `/tmp` could remove while
/// held). `~` is no character of a plugin's made-safe name, so `NAME~2`
/// cannot be another plugin's.
struct Claim {
    dir: String,
    held: OwnedFd,
}

/// The claims of this process, by runners' directory and plugin name.
static CLAIMS: Mutex<BTreeMap<(PathBuf, String), Claim>> = Mutex::new(BTreeMap::new());

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

/// Where [`scratch_dir`] puts the directory of `plugin` when no other
/// server of the same user holds that name (the first claim): nothing is
/// made or claimed.
pub fn first_scratch_dir(plugin: &str, owner: Option<RunAs>) -> PathBuf {
    let uid = owner.map_or_else(|| rustix::process::geteuid().as_raw(), |o| o.uid);
    let (root, name) = scratch_path(&std::env::temp_dir(), plugin, uid);
    root.join(name)
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

/// Removes the scratch directory of `plugin` that this process holds (of a
/// plugin retired: what its runner left there is not handed to the next
/// plugin of its name, and `/tmp` does not grow with every name a plugin
/// ever had), and lets it go. None held (the plugin never ran a confined
/// runner here; another server's directory of that name is not touched):
/// nothing to do.
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
    use rustix::fs::CWD;
    let me = rustix::process::geteuid().as_raw();
    let uid = owner.map_or(me, |o| o.uid);
    let (root, name) = scratch_path(tmp, plugin, uid);
    // Let go once removed (or not: the error is said, and the directory is
    // no longer this server's to keep).
    let Some(claim) = CLAIMS.lock().remove(&(root.clone(), name)) else {
        return Ok(());
    };
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
    let dir = std::ffi::CString::new(claim.dir.as_str()).map_err(std::io::Error::other)?;
    super::remove_tree::remove_tree_at(root_fd.as_fd(), &dir)?;
    // Let go once gone: a server that opened it meanwhile finds, once it
    // holds it, that the name no longer leads to it.
    drop(claim);
    Ok(())
}

/// Locks directory `name` of the runners' directory `root`, made and
/// checked by `open` (its handle), without waiting: `None` when another
/// process holds it.
fn try_claim(
    root: BorrowedFd<'_>,
    name: &str,
    open: impl Fn() -> std::io::Result<OwnedFd>,
) -> std::io::Result<Option<OwnedFd>> {
    loop {
        let fd = open()?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        // Still the directory of that name: a server that let go of it
        // removed it first.
        match rustix::fs::statat(root, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if (now.st_dev, now.st_ino) == identity(fd.as_fd())? => return Ok(Some(fd)),
            Ok(_) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// [`scratch_dir`] under `tmp`.
///
/// The directory is claimed for this process (a lock on the directory,
/// held until [`remove_scratch_dir`] or the process's end): another server of
/// the same user, holding `NAME` already, makes this one take `NAME~2`
/// (then `~3` …), so that two servers' plugins of one name never share, or
/// remove, one directory. Once claimed, the same directory again.
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
    use rustix::fs::CWD;
    let me = rustix::process::geteuid().as_raw();
    let uid = owner.map_or(me, |o| o.uid);
    let (root, name) = scratch_path(tmp, plugin, uid);
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
    let root_fd = level(CWD, &root, &root)?;
    let mut claims = CLAIMS.lock();
    let key = (root.clone(), name);
    if let Some(claim) = claims.get(&key) {
        let dir = root.join(&claim.dir);
        let now = level(root_fd.as_fd(), Path::new(&claim.dir), &dir)?;
        // Still the directory held (not one made again after something
        // removed it: that one is claimed anew, below).
        if identity(now.as_fd())? == identity(claim.held.as_fd())? {
            return Ok(dir);
        }
        claims.remove(&key);
    }
    for n in 1..=MAX_CLAIMS {
        let candidate = if n == 1 {
            key.1.clone()
        } else {
            format!("{}~{n}", key.1)
        };
        let dir = root.join(&candidate);
        let open = || level(root_fd.as_fd(), Path::new(&candidate), &dir);
        let Some(held) = try_claim(root_fd.as_fd(), &candidate, open)? else {
            continue;
        };
        claims.insert(
            key,
            Claim {
                dir: candidate,
                held,
            },
        );
        return Ok(dir);
    }
    Err(std::io::Error::other(format!(
        "{MAX_CLAIMS} servers hold scratch directories of plugin {} in {}",
        key.1,
        root.display()
    )))
}
