//! How a runner process ended, in words: signal names, exit codes, and the
//! memory-limit heuristic.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use forgesyte_errors::CrashCause;

/// Lines of a dying process's stderr that say an allocation failed: Rust's
/// default allocation-error hook (`memory allocation of N bytes failed`),
/// C++'s `std::bad_alloc`, the usual C wording, and Python's.
const ALLOCATION_FAILURE_MARKERS: &[&str] = &[
    "memory allocation of",
    "std::bad_alloc",
    "out of memory",
    "Cannot allocate memory",
    "MemoryError",
    // OpenBLAS, which then exits with code 1 (its threads' buffers, under
    // an address-space limit).
    OPENBLAS_GAVE_UP,
];

/// What OpenBLAS prints before it exits with code 1 when its buffers cannot
/// be allocated.
const OPENBLAS_GAVE_UP: &str = "OpenBLAS error: Memory allocation still failed";

/// How many of the last stderr lines may carry the allocation failure.
const ALLOCATION_FAILURE_LINES: usize = 3;

/// The Python runner's exit code for a `MemoryError` (`EXIT_MEMORY` in
/// `python/runner/base.py`).
const PYTHON_EXIT_MEMORY: i32 = 70;

/// What the Python runner's own memory line holds (`out_of_memory` in
/// `python/runner/base.py`): only such a line's stated limit is read.
const PYTHON_MEMORY_LINE: &str = "MemoryError: out of memory ";

/// The Python runner's exit code when it could not set itself up
/// (`EXIT_SETUP`): under a memory limit too low for the interpreter, a
/// `MemoryError` there ends it so.
const PYTHON_EXIT_SETUP: i32 = 71;

/// Both runners' exit code when their descriptors to the host were closed
/// from inside the process (`EXIT_CHANNEL` in `python/runner/base.py`,
/// [`super::runner::EXIT_CHANNEL`]).
const EXIT_CHANNEL: i32 = super::runner::EXIT_CHANNEL as i32;

/// The conventional name of signal `number` on Linux (`SIGSEGV`), or
/// `SIG<number>` for one without a name.
pub(crate) fn signal_name(number: i32) -> String {
    let name = match number {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        16 => "SIGSTKFLT",
        17 => "SIGCHLD",
        18 => "SIGCONT",
        19 => "SIGSTOP",
        20 => "SIGTSTP",
        21 => "SIGTTIN",
        22 => "SIGTTOU",
        23 => "SIGURG",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        26 => "SIGVTALRM",
        27 => "SIGPROF",
        28 => "SIGWINCH",
        29 => "SIGIO",
        30 => "SIGPWR",
        31 => "SIGSYS",
        _ => return format!("SIG{number}"),
    };
    name.to_owned()
}

/// Why a process that the host did not kill on purpose ended.
///
/// With a memory limit set, an abort, a kill or the Python runner's
/// memory exit code whose last stderr lines carry an allocation-failure
/// message is reported as
/// [`CrashCause::MemoryLimit`]: under `RLIMIT_AS` an allocation fails
/// (instead of the kernel's OOM killer stepping in) and Rust's default
/// handler prints that message and aborts. This is a heuristic: a plugin
/// that catches the failure and dies some other way is reported by its
/// signal or exit code.
pub(crate) fn classify(status: ExitStatus, memory_limit_mib: u64, stderr: &[String]) -> CrashCause {
    // How a failed allocation ends a process: an abort (Rust's handler,
    // C++'s `std::terminate`), the kernel's kill, or the Python runner's
    // own exit code for a `MemoryError`; and the
    // message is among its last lines, not anywhere in the tail (a plugin
    // may log "CUDA out of memory, retrying" and crash later for another
    // reason).
    let openblas_gave_up = status.code() == Some(1)
        && stderr
            .iter()
            .rev()
            .take(ALLOCATION_FAILURE_LINES)
            .any(|line| line.contains(OPENBLAS_GAVE_UP));
    let ends_like_it = matches!(status.signal(), Some(libc::SIGABRT | libc::SIGKILL))
        || matches!(status.code(), Some(PYTHON_EXIT_MEMORY | PYTHON_EXIT_SETUP))
        || openblas_gave_up;
    let said_so = stderr
        .iter()
        .rev()
        .take(ALLOCATION_FAILURE_LINES)
        .any(|line| ALLOCATION_FAILURE_MARKERS.iter().any(|m| line.contains(m)));
    // The limit the Python runner says was in force: a plugin may have
    // lowered the host's, or set one where the host set none.
    let stated = stderr
        .iter()
        .rev()
        .take(ALLOCATION_FAILURE_LINES)
        .filter(|line| line.contains(PYTHON_MEMORY_LINE))
        .find_map(|line| stated_limit_mib(line));
    let limit_mib = stated.unwrap_or(memory_limit_mib);
    if limit_mib > 0 && ends_like_it && said_so {
        return CrashCause::MemoryLimit { limit_mib };
    }
    match (status.signal(), status.code()) {
        (Some(number), _) => CrashCause::Signal {
            name: signal_name(number),
            number,
        },
        (None, Some(EXIT_CHANNEL)) => CrashCause::ChannelClosed { code: EXIT_CHANNEL },
        (None, Some(code)) => CrashCause::Exit { code },
        (None, None) => CrashCause::Protocol {
            detail: format!("ended without an exit code or signal ({status})"),
        },
    }
}

/// How many processes the kernel's OOM killer has killed on this machine
/// since it started (`oom_kill` in `/proc/vmstat`, Linux 4.13 and later),
/// if it says.
pub(crate) fn oom_kills() -> Option<u64> {
    oom_kills_in(&std::fs::read_to_string("/proc/vmstat").ok()?)
}

fn oom_kills_in(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// `cause` for a process the host did not kill, whose machine counted
/// `before` OOM kills at its start and `after` at its end: a `SIGKILL`
/// while the count rose is most likely the OOM killer's
/// ([`CrashCause::OomKilled`]); it said only `killed by signal SIGKILL`.
pub(crate) fn with_oom_kills(
    cause: CrashCause,
    before: Option<u64>,
    after: Option<u64>,
) -> CrashCause {
    match (cause, before, after) {
        (
            CrashCause::Signal {
                number: libc::SIGKILL,
                ..
            },
            Some(before),
            Some(after),
        ) if after > before => CrashCause::OomKilled {
            kills: after - before,
        },
        (cause, _, _) => cause,
    }
}

/// The address-space limit at the end of the Python runner's memory line
/// (`... [address-space limit 64 MiB]`, `LIMIT_NOTE` in
/// `python/runner/base.py`): the one in force when it ran out.
fn stated_limit_mib(line: &str) -> Option<u64> {
    let (_, rest) = line.trim_end().rsplit_once(" [address-space limit ")?;
    let digits = rest.strip_suffix(" MiB]")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&mib| mib > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenBLAS's own give-up under the limit (it exits with code 1) is
    /// the memory limit's; code 1 without it is an exit.
    #[test]
    fn openblas_giving_up_under_the_limit_is_the_memory_limit() {
        let said = vec![
            "OpenBLAS error: Memory allocation still failed after 10 retries, giving up."
                .to_owned(),
        ];
        assert_eq!(
            classify(exited(1), 512, &said),
            CrashCause::MemoryLimit { limit_mib: 512 }
        );
        assert_eq!(classify(exited(1), 512, &[]), CrashCause::Exit { code: 1 });
        assert_eq!(classify(exited(1), 0, &said), CrashCause::Exit { code: 1 });
    }

    /// A SIGKILL the host did not send, while the machine's OOM kill count
    /// rose, is said to be the OOM killer's; another signal, or no rise,
    /// or no count, stays what it was.
    #[test]
    fn a_sigkill_while_the_oom_killer_killed_is_said_to_be_its() {
        let vmstat = "pgfault 12\noom_kill 7\npgmajfault 3\n";
        assert_eq!(oom_kills_in(vmstat), Some(7));
        assert_eq!(oom_kills_in("pgfault 12\n"), None);
        let killed = || classify(signalled(libc::SIGKILL), 0, &[]);
        let said = with_oom_kills(killed(), Some(7), Some(8));
        assert_eq!(said, CrashCause::OomKilled { kills: 1 });
        assert!(
            said.to_string().starts_with(
                "killed by signal SIGKILL (9), most likely by the kernel's OOM killer: the \
                 machine or its memory cgroup ran out of memory (1 OOM kill(s)"
            ),
            "{said}"
        );
        assert_eq!(with_oom_kills(killed(), Some(7), Some(7)), killed());
        assert_eq!(with_oom_kills(killed(), None, Some(8)), killed());
        let segv = classify(signalled(libc::SIGSEGV), 0, &[]);
        assert_eq!(with_oom_kills(segv.clone(), Some(7), Some(9)), segv);
    }

    fn signalled(n: i32) -> ExitStatus {
        ExitStatus::from_raw(n)
    }

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn signals_have_their_names() {
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(40), "SIG40");
        assert_eq!(
            classify(signalled(11), 0, &[]),
            CrashCause::Signal {
                name: "SIGSEGV".into(),
                number: 11
            }
        );
        assert_eq!(classify(exited(3), 512, &[]), CrashCause::Exit { code: 3 });
    }

    #[test]
    fn allocation_failure_under_a_limit_is_the_memory_limit() {
        let tail = vec!["memory allocation of 1048576 bytes failed".to_owned()];
        assert_eq!(
            classify(signalled(6), 128, &tail),
            CrashCause::MemoryLimit { limit_mib: 128 }
        );
        // Without a limit it is only what it is.
        assert_eq!(
            classify(signalled(6), 0, &tail),
            CrashCause::Signal {
                name: "SIGABRT".into(),
                number: 6
            }
        );
        // A clean exit is never a memory fault.
        assert_eq!(
            classify(exited(0), 128, &tail),
            CrashCause::Exit { code: 0 }
        );
        // The Python runner's MemoryError exit, the code its base module
        // exits with.
        let (_, base) = crate::python::RUNNER_MODULES
            .iter()
            .find(|(file, _)| *file == "base.py")
            .expect("the runner's base module");
        assert!(base.contains(&format!("\nEXIT_MEMORY = {PYTHON_EXIT_MEMORY}\n")));
        assert!(base.contains(&format!("\nEXIT_SETUP = {PYTHON_EXIT_SETUP}\n")));
        assert!(base.contains(&format!("\nEXIT_CHANNEL = {EXIT_CHANNEL}\n")));
        assert!(
            classify(exited(EXIT_CHANNEL), 0, &[])
                .to_string()
                .contains("closed from inside the process")
        );
        // Its setup failing for want of memory (a limit too low for the
        // interpreter).
        let setup =
            vec!["forgesyte-python-runner[p]: cannot confine the runner: MemoryError: ".to_owned()];
        assert_eq!(
            classify(exited(71), 16, &setup),
            CrashCause::MemoryLimit { limit_mib: 16 }
        );
        let python = vec!["MemoryError: out of memory in tool 'grow'".to_owned()];
        assert_eq!(
            classify(exited(70), 128, &python),
            CrashCause::MemoryLimit { limit_mib: 128 }
        );
        // A crash of another kind, or a message long before the end, is
        // what it is.
        let logged = vec![
            "CUDA out of memory, retrying on the CPU".to_owned(),
            "step 1".to_owned(),
            "step 2".to_owned(),
            "step 3".to_owned(),
        ];
        assert_eq!(
            classify(signalled(11), 128, &tail),
            CrashCause::Signal {
                name: "SIGSEGV".into(),
                number: 11
            }
        );
        assert_eq!(
            classify(exited(3), 128, &python),
            CrashCause::Exit { code: 3 }
        );
        assert_eq!(
            classify(signalled(6), 128, &logged),
            CrashCause::Signal {
                name: "SIGABRT".into(),
                number: 6
            }
        );
    }

    /// The Python runner names the limit in force when it ran out: one the
    /// plugin lowered itself, or set where the host set none, is the one
    /// reported. Its note is the runner's own (`LIMIT_NOTE`), at the end
    /// of the line.
    #[test]
    fn the_limit_the_runner_states_is_the_one_reported() {
        let (_, base) = crate::python::RUNNER_MODULES
            .iter()
            .find(|(file, _)| *file == "base.py")
            .expect("the runner's base module");
        assert!(base.contains("\nLIMIT_NOTE = \" [address-space limit %d MiB]\"\n"));
        assert!(base.contains(&format!("\"{PYTHON_MEMORY_LINE}%s%s%s\"")));
        // A line of the plugin's own is no statement of the runner's.
        let plugin_said = vec![
            "[address-space limit 1 MiB]".to_owned(),
            "forgesyte-python-runner[p]: MemoryError: out of memory in tool 'grow'".to_owned(),
        ];
        assert_eq!(
            classify(exited(70), 512, &plugin_said),
            CrashCause::MemoryLimit { limit_mib: 512 }
        );
        let line = |tail: &str| {
            vec![format!(
                "forgesyte-python-runner[p]: MemoryError: out of memory in tool 'grow'{tail}"
            )]
        };
        let lowered = line(" [address-space limit 64 MiB]");
        assert_eq!(
            classify(exited(70), 512, &lowered),
            CrashCause::MemoryLimit { limit_mib: 64 }
        );
        assert_eq!(
            classify(exited(70), 0, &lowered),
            CrashCause::MemoryLimit { limit_mib: 64 }
        );
        // Without the note, or with a note that is not one, the host's.
        for tail in [
            "",
            " [address-space limit 64 MiB] and more",
            " [address-space limit  MiB]",
            " [address-space limit -3 MiB]",
            " [address-space limit 0 MiB]",
            " [address-space limit 99999999999999999999999 MiB]",
        ] {
            assert_eq!(
                classify(exited(70), 512, &line(tail)),
                CrashCause::MemoryLimit { limit_mib: 512 },
                "{tail:?}"
            );
        }
        assert_eq!(
            classify(exited(70), 0, &line("")),
            CrashCause::Exit { code: 70 }
        );
    }
}
