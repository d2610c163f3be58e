//! A runner's protocol output read with an eye on the runner itself
//! ([`WatchedPipe`]): once the runner has ended, the pipe is read for
//! [`EXIT_GRACE`] more at most, whatever holds it open.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::time::Instant;

use super::child::EXIT_GRACE;

/// A runner's protocol output, read until it ends, or until
/// [`EXIT_GRACE`] after the runner itself ended (its pidfd says so): a
/// process the plugin started outside the runner's group (`setsid` after a
/// `dup` of the pipe) may hold the pipe open for ever, and then the death
/// of the runner (a time-out's kill) was never processed: the plugin stayed
/// INITIALIZED and every call waited out its time. Without a pidfd
/// (`pidfd_open` refused) it reads as a plain pipe.
pub(super) struct WatchedPipe<R> {
    pipe: R,
    pidfd: Option<OwnedFd>,
    ended_at: Option<Instant>,
}

impl<R: Read + std::os::fd::AsFd> WatchedPipe<R> {
    pub(super) fn new(pipe: R, pid: u32) -> Self {
        let pidfd =
            rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)).and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            });
        WatchedPipe {
            pipe,
            pidfd,
            ended_at: None,
        }
    }
}

impl<R: Read + std::os::fd::AsFd> Read for WatchedPipe<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let Some(pidfd) = &self.pidfd else {
            return self.pipe.read(buf);
        };
        loop {
            let left = match self.ended_at {
                Some(at) => {
                    let left = EXIT_GRACE.saturating_sub(at.elapsed());
                    if left.is_zero() {
                        return Err(std::io::Error::other(
                            "the plugin process ended, but a process it started keeps its \
                             protocol pipe open",
                        ));
                    }
                    Some(Timespec::try_from(left).unwrap_or(Timespec {
                        tv_sec: 0,
                        tv_nsec: 1_000_000,
                    }))
                }
                None => None,
            };
            let mut fds = [
                PollFd::new(&self.pipe, PollFlags::IN),
                PollFd::new(pidfd, PollFlags::IN),
            ];
            let watched = if self.ended_at.is_some() { 1 } else { 2 };
            match poll(&mut fds[..watched], left.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if !fds[0].revents().is_empty() {
                return self.pipe.read(buf);
            }
            if watched == 2 && !fds[1].revents().is_empty() {
                self.ended_at = Some(Instant::now());
            }
        }
    }
}
