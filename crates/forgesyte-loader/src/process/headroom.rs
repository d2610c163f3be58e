//! What the host keeps of its own resources before it starts a runner, and
//! how it names their lack.
//!
//! Runners hold descriptors in the server (pipes, a socket, a pidfd: about
//! five each). Forty of them under `ulimit -n 128` took every descriptor,
//! and the server then accepted no connection, not even a liveness probe,
//! for as long as it ran. So a runner starts only while the server's
//! lowest free descriptor leaves [`reserve`] descriptors (an eighth of the
//! limit, 16 to 1,024) free for connections, plus the runner's own. The
//! lowest free descriptor is what the kernel gives a new one (`dup`: one
//! system call, not a count of `/proc/self/fd`, which costs a millisecond
//! per thousand descriptors on every start of a 1,000-plugin pass); every
//! descriptor below it is open, so the test never refuses a server that
//! has the room. Starts run at once on several threads (a load wave), and
//! each makes its descriptors only after its check: every start between
//! its check and the moment its descriptors exist (`Child::start` drops
//! it) holds a [`Starting`], and counts its [`PER_RUNNER`] as taken in
//! every other start's check (six checks at once each saw the same free
//! descriptors, and all six took them).
//!
//! A runner that cannot start for want of the host's resources (this
//! refusal, `EMFILE`, `ENFILE`, `EAGAIN` from `fork` under a process
//! limit, `ENOMEM`) is no fault of its plugin's: [`host_short`] names what
//! is short and which limit to raise, and a supervisor's restart that
//! meets it does not spend the plugin's restart budget.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors a runner's start takes in the server, at most: its three
/// pipes, the shared-memory socket, its pidfd, and the spawn's own.
const PER_RUNNER: u64 = 8;

/// Starts between their check and the moment their descriptors exist
/// ([`Starting`]).
static STARTING: AtomicU64 = AtomicU64::new(0);

/// A start's claim on [`PER_RUNNER`] descriptors, from its check until it
/// is dropped (its descriptors are made, or its start failed).
#[derive(Debug)]
#[must_use = "the claim ends when it is dropped"]
pub(crate) struct Starting(&'static AtomicU64);

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A claim counted in `counter`, and the claims it held before.
fn claim(counter: &'static AtomicU64) -> (u64, Starting) {
    (counter.fetch_add(1, Ordering::SeqCst), Starting(counter))
}

/// Descriptors kept free for connections under a limit of `limit`.
pub(crate) fn reserve(limit: u64) -> u64 {
    (limit / 8).clamp(16, 1024)
}

/// The refusal of [`check_descriptors`]: the server's descriptors are
/// close to its limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server is short of file descriptors: {open} of its limit of {limit} are open or being \
     opened, and {reserved} are kept for connections; raise its open-file limit (`ulimit -n`, systemd's \
     `LimitNOFILE=`)"
)]
pub(crate) struct ShortOfDescriptors {
    open: u64,
    limit: u64,
    reserved: u64,
}

/// Whether a runner may start when the lowest free descriptor is
/// `lowest_free` and `others` other starts are between their check and
/// their descriptors, under a soft limit of `limit`.
fn room(lowest_free: u64, others: u64, limit: u64) -> Result<(), ShortOfDescriptors> {
    let reserved = reserve(limit);
    let open = lowest_free.saturating_add(others.saturating_mul(PER_RUNNER));
    if open.saturating_add(reserved + PER_RUNNER) <= limit {
        return Ok(());
    }
    Err(ShortOfDescriptors {
        open,
        limit,
        reserved,
    })
}

/// The start's claim, held until its descriptors are made; `Err`
/// (an [`std::io::Error`] holding a [`ShortOfDescriptors`]) when a
/// runner's start would leave the server fewer free descriptors than its
/// [`reserve`]. No limit, or no descriptor to duplicate (stderr closed),
/// passes: the start itself then says what it meets.
pub(crate) fn check_descriptors() -> std::io::Result<Starting> {
    let (others, starting) = claim(&STARTING);
    let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current else {
        return Ok(starting);
    };
    let stderr = std::io::stderr();
    let lowest_free = match rustix::io::fcntl_dupfd_cloexec(stderr.as_fd(), 0) {
        Ok(fd) => u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap_or(u64::MAX),
        // Not one left.
        Err(rustix::io::Errno::MFILE) => limit,
        Err(_) => return Ok(starting),
    };
    room(lowest_free, others, limit).map_err(std::io::Error::other)?;
    Ok(starting)
}

/// What of the host's is short when a runner's start failed with `e`, and
/// which limit to raise; `None` when `e` is no lack of the host's.
pub(crate) fn host_short(e: &std::io::Error) -> Option<String> {
    if let Some(short) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ShortOfDescriptors>())
    {
        return Some(short.to_string());
    }
    use rustix::process::Resource;
    let limit = |resource| {
        rustix::process::getrlimit(resource)
            .current
            .map_or_else(|| "unlimited".to_owned(), |n| n.to_string())
    };
    match rustix::io::Errno::from_io_error(e)? {
        rustix::io::Errno::MFILE => Some(format!(
            "the server is out of file descriptors (its limit: {}); raise its open-file limit \
             (`ulimit -n`, systemd's `LimitNOFILE=`)",
            limit(Resource::Nofile)
        )),
        rustix::io::Errno::NFILE => Some(
            "the system's table of open files is full (`fs.file-max`); close files elsewhere or \
             raise it"
                .to_owned(),
        ),
        rustix::io::Errno::AGAIN => Some(format!(
            "no new process may be started: the server's user (or the runner user) reached \
             its process limit (the server's `ulimit -u`: {}) or the system its own \
             (`kernel.pid_max`, a cgroup's `pids.max`)",
            limit(Resource::Nproc)
        )),
        rustix::io::Errno::NOMEM => {
            Some("the server is out of memory to start a process".to_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_starts_only_while_the_reserve_stays_free() {
        assert_eq!(reserve(128), 16);
        assert_eq!(reserve(64), 16);
        assert_eq!(reserve(4096), 512);
        assert_eq!(reserve(1 << 20), 1024);
        // 128: 16 kept, 8 for the runner.
        assert!(room(104, 0, 128).is_ok());
        let short = room(105, 0, 128).unwrap_err();
        assert_eq!(
            short.to_string(),
            "the server is short of file descriptors: 105 of its limit of 128 are open or being \
             opened, and 16 are kept for connections; raise its open-file limit (`ulimit -n`, \
             systemd's `LimitNOFILE=`)"
        );
        assert!(room(128, 0, 128).is_err());
        assert!(room(u64::MAX, 0, 128).is_err());
        assert!(room(3, u64::MAX, 128).is_err());
        assert!(
            room(3, 0, 20).is_err(),
            "a limit under the reserve starts none"
        );
        // Two other starts on their way: 16 more taken.
        assert!(room(88, 2, 128).is_ok());
        assert!(room(89, 2, 128).is_err());
    }

    #[test]
    fn the_host_s_shortages_are_named_and_nothing_else() {
        let refused = std::io::Error::other(room(200, 0, 128).unwrap_err());
        assert!(
            host_short(&refused).is_some_and(|s| s.contains("short of file descriptors")),
            "{refused}"
        );
        let emfile = std::io::Error::from_raw_os_error(libc_errno(rustix::io::Errno::MFILE));
        assert!(host_short(&emfile).is_some_and(|s| s.contains("`ulimit -n`")));
        let eagain = std::io::Error::from_raw_os_error(libc_errno(rustix::io::Errno::AGAIN));
        assert!(host_short(&eagain).is_some_and(|s| s.contains("`ulimit -u`")));
        let enfile = std::io::Error::from_raw_os_error(libc_errno(rustix::io::Errno::NFILE));
        assert!(host_short(&enfile).is_some_and(|s| s.contains("fs.file-max")));
        for other in [
            std::io::Error::from_raw_os_error(libc_errno(rustix::io::Errno::NOENT)),
            std::io::Error::from_raw_os_error(libc_errno(rustix::io::Errno::ACCESS)),
            std::io::Error::other("something else"),
        ] {
            assert_eq!(host_short(&other), None, "{other}");
        }
    }

    fn libc_errno(errno: rustix::io::Errno) -> i32 {
        errno.raw_os_error()
    }

    #[test]
    fn this_test_process_has_room() {
        drop(check_descriptors().unwrap());
    }

    #[test]
    fn a_claim_counts_until_it_is_dropped() {
        // A counter of this test's own: other tests start runners.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (before, first) = claim(&COUNTER);
        let (between, second) = claim(&COUNTER);
        assert_eq!((before, between), (0, 1));
        drop(first);
        assert_eq!(COUNTER.load(Ordering::SeqCst), 1);
        drop(second);
        assert_eq!(COUNTER.load(Ordering::SeqCst), 0);
    }
}
