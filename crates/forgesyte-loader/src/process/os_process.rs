//! A runner's operating-system process, whoever forked it: the host
//! itself (a [`std::process::Child`]) or a Python zygote
//! ([`ForkedChild`], whose exit status the zygote reports).
//!
//! Either way a runner leads its own process group, and the group goes with
//! it: a runner that ends (or is killed) takes the processes a plugin
//! started. The group is signalled only while the runner is not reaped, so
//! the signal never reaches a recycled pid or group: a runner the host
//! reaped keeps its exit status here, and its pid is not asked about again.

use std::io;
use std::process::ExitStatus;

use super::zygote::{ForkedChild, kill_group};

/// A runner process.
#[derive(Debug)]
pub(crate) enum OsProcess {
    /// Forked by the host, and its exit status once the host reaped it.
    /// Its pid is asked about only before: once reaped, the pid may be
    /// another child's (a later runner's), whose group must not be
    /// signalled.
    Direct(std::process::Child, Option<ExitStatus>),
    /// Forked by a Python zygote.
    Forked(ForkedChild),
}

impl OsProcess {
    /// A runner the host started.
    pub(crate) fn direct(child: std::process::Child) -> OsProcess {
        OsProcess::Direct(child, None)
    }

    pub(crate) fn id(&self) -> u32 {
        match self {
            OsProcess::Direct(child, _) => child.id(),
            OsProcess::Forked(child) => child.id(),
        }
    }

    /// The exit status if the runner has ended (what is left of its group
    /// is killed before it is reaped); `Ok(None)` while it runs.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self {
            OsProcess::Direct(_, Some(status)) => Ok(Some(*status)),
            // Reaped only once seen ended and its group killed: a runner
            // that ends between a look and a reap is not reaped with its
            // group left running (the next look kills the group first).
            OsProcess::Direct(child, reaped) => {
                let status = match direct_state(child.id()) {
                    Ended::No => return Ok(None),
                    Ended::NotReaped => {
                        kill_group(child.id());
                        child.try_wait()?
                    }
                    Ended::Reaped => child.try_wait()?,
                };
                *reaped = status;
                Ok(status)
            }
            OsProcess::Forked(child) => child.try_wait(),
        }
    }

    /// Waits for the runner to end.
    pub(crate) fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            OsProcess::Direct(_, Some(status)) => Ok(*status),
            OsProcess::Direct(child, reaped) => {
                let status = child.wait()?;
                *reaped = Some(status);
                Ok(status)
            }
            OsProcess::Forked(child) => child.wait(),
        }
    }

    /// Whether the runner is still running (neither ended nor reaped). A
    /// forked runner whose exit the zygote has not reported yet (a busy
    /// zygote may take a while) has ended when it is a zombie: its zygote
    /// reaps it only once the host has recorded the report.
    pub(crate) fn is_running(&self) -> bool {
        match self {
            OsProcess::Direct(_, Some(_)) => false,
            OsProcess::Direct(child, None) => matches!(direct_state(child.id()), Ended::No),
            OsProcess::Forked(child) => {
                matches!(child.try_wait(), Ok(None)) && !forked_has_ended(child.id())
            }
        }
    }

    /// `signal` to the runner alone (not its group) while it runs; whether
    /// it was sent. Only a named signal (`SIGUSR2`, ...) is sent.
    pub(crate) fn signal(&self, signal: i32) -> bool {
        use rustix::process::{Pid, Signal, kill_process};
        let (Some(signal), Some(pid)) = (
            Signal::from_named_raw(signal),
            i32::try_from(self.id()).ok().and_then(Pid::from_raw),
        ) else {
            return false;
        };
        self.is_running() && kill_process(pid, signal).is_ok()
    }

    /// `SIGKILL` to the runner and its process group, unless it has been
    /// reaped (or, forked by a zygote, reported ended).
    pub(crate) fn kill(&mut self) {
        match self {
            OsProcess::Direct(_, Some(_)) => {}
            OsProcess::Direct(child, None) => {
                if !matches!(direct_state(child.id()), Ended::Reaped) {
                    kill_group(child.id());
                }
            }
            OsProcess::Forked(child) => child.kill(),
        }
    }
}

enum Ended {
    No,
    /// A zombie: its pid and group are still reserved.
    NotReaped,
    Reaped,
}

/// Where a child of the host stands, without reaping it.
fn direct_state(pid: u32) -> Ended {
    use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ended::Reaped;
    };
    match waitid(
        WaitId::Pid(pid),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
    ) {
        Ok(None) => Ended::No,
        Ok(Some(_)) => Ended::NotReaped,
        // ECHILD: reaped already.
        Err(_) => Ended::Reaped,
    }
}

/// Whether process `pid`, a zygote's runner whose exit is not reported yet
/// (so not reaped: its pid is still its own), has ended: a zombie, or gone.
/// When `/proc` does not show it (gone, or hidden by `hidepid`), whether any
/// process still has the pid (`kill(pid, 0)`); when `/proc` cannot be
/// read, the zygote's report alone decides: not ended.
pub(super) fn forked_has_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        // Not there, or hidden (`hidepid`): gone only when no process has
        // the pid (a zombie's is still its own until it is reaped).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .is_none_or(|pid| {
                rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH)
            }),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::forked_has_ended;

    #[test]
    fn a_zombie_or_a_gone_process_has_ended_a_running_one_has_not() {
        let mut running = std::process::Command::new("sleep");
        running.arg("30");
        // Killed when this test's thread ends, however it ends.
        forgesyte_deps::die_with_parent_thread(&mut running);
        let mut running = running.spawn().unwrap();
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        assert!(!forked_has_ended(running.id()));
        // Not reaped: a zombie until `wait`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !forked_has_ended(zombie.id()) {
            assert!(std::time::Instant::now() < deadline, "never a zombie");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = zombie.wait();
        assert!(forked_has_ended(zombie.id()), "reaped: gone");
        let _ = running.kill();
        let _ = running.wait();
    }
}
