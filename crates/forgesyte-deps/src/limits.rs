//! The open-file limit (`RLIMIT_NOFILE`) of the host and of the children it
//! starts: the host raises its own soft limit to the hard one (it serves
//! connections), and every child it starts gets the limit it started with
//! back (plugin code runs with what the operator set). Here, below the
//! loader, so that the dependency check's and the discovery's interpreters
//! get it back as the loader's runners do. And the parent-death signal of
//! a child, for the same children: the loader's runners and zygotes, the
//! probes' children.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft open-file limit this process started with, when
/// [`raise_open_file_limit`] raised it (`u64::MAX`: never raised): every
/// child gets it back.
static INHERITED_NOFILE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Raises this process's soft open-file limit (`RLIMIT_NOFILE`) to its
/// hard limit, as servers do (a container runtime's soft 1,024 would cap
/// the connections a server takes at 512): returns the limit before and
/// after, `None` when there is nothing to raise (already at the hard
/// limit, or the hard limit is unlimited). Every child the host starts
/// afterwards ([`restore_open_file_limit`]: the loader's runners and
/// zygotes, the interpreters of the dependency check and the entry-point
/// discovery) gets the limit it started with back, so plugin
/// code runs with what the operator set. Call it once, at start.
///
/// # Errors
///
/// When `setrlimit` refuses.
pub fn raise_open_file_limit() -> std::io::Result<Option<(u64, u64)>> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return Ok(None);
    };
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )?;
    INHERITED_NOFILE.store(soft, Ordering::Relaxed);
    Ok(Some((soft, hard)))
}

/// The open-file limit this process has once [`raise_open_file_limit`]
/// has run: the hard limit when the soft one is lower, else the soft one
/// (`None`: unlimited).
pub fn open_file_limit_after_raise() -> Option<u64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) => Some(soft.max(hard)),
        (soft, _) => soft,
    }
}

/// Makes `command`'s process get `SIGKILL` when the *thread* that starts
/// it ends (the kernel's parent-death signal follows the thread that
/// forked); a child whose parent is already gone by then exits at once.
/// A caller that returns before the child ends forks from a long-lived
/// thread (the loader's spawner); one that waits for the child (a probe)
/// is that thread itself.
#[allow(unsafe_code)]
pub fn die_with_parent_thread(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs between fork and exec in the child, where
    // only async-signal-safe work is allowed: `prctl` and `getppid` are
    // plain system calls, and the error is built without allocating.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(3 /* ESRCH */));
            }
            Ok(())
        });
    }
}

/// Gives `command`'s process the soft open-file limit this process started
/// with, when [`raise_open_file_limit`] raised it (nothing otherwise).
#[allow(unsafe_code)]
pub fn restore_open_file_limit(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let soft = INHERITED_NOFILE.load(Ordering::Relaxed);
    if soft == u64::MAX {
        return;
    }
    // SAFETY: the closure runs between fork and exec in the child, where
    // only async-signal-safe work is allowed: `getrlimit` and `setrlimit`
    // are plain system calls, and the error is returned without
    // allocating.
    unsafe {
        command.pre_exec(move || {
            use rustix::process::{Resource, getrlimit, setrlimit};
            let mut limit = getrlimit(Resource::Nofile);
            limit.current = Some(soft);
            setrlimit(Resource::Nofile, limit)?;
            Ok(())
        });
    }
}
