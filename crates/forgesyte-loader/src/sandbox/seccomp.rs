//! The seccomp filter of a confined runner: what Landlock and the network
//! namespace do not rule. Landlock governs no `connect()` to a Unix socket
//! that has a path (a root runner would reach `/run/docker.sock`), netlink
//! lets runners of one network namespace (a zygote's) talk to each other,
//! and System V IPC and POSIX message queues are no files; and a process
//! that starts a session or a process group of its own (`setsid`,
//! `setpgid`) is out of reach of the kill of its runner's group, and so
//! outlives the runner. So the filter refuses, with `EACCES`, every System
//! V IPC, message-queue and io_uring call (an io_uring operation, a socket
//! among them, passes no filter), `setsid` and `setpgid` (the runner leads
//! its group before it confines itself), `unshare` and `clone` with a
//! namespace flag (`CLONE_NEWUSER` and the rest: in a user namespace of its
//! own a forked child held every capability, and the kernel code only such
//! a namespace reaches; the runner makes its own namespaces before it
//! installs the filter), `clone` with `CLONE_PARENT` (a
//! child of the runner's parent, the zygote or the server, which never
//! reaps it: a plugin could fill the process table with zombies), with
//! `ENOSYS` `clone3` (its flags are behind a pointer no filter reads;
//! glibc then uses `clone`), and,
//! unless the plan keeps the network, every `socket()`, of any family: no
//! Unix, netlink or vsock socket (vsock is no namespace's), and no IP one
//! either (outside a network namespace, a runner that cannot make one,
//! Landlock's TCP rights leave a connect through TCP Fast Open's
//! `sendto`, a `listen` without `bind` and all of UDP open); and
//! `socketpair()` of datagrams (a datagram pair's socket can be
//! disconnected, bound to a path and sent to any socket that has one: a
//! Unix socket in all but name) or of another family than `AF_UNIX` (a
//! socket of that family is made, its module maybe loaded, before the call
//! fails); Unix pairs of streams and sequenced packets stay allowed; a foreign architecture's calls (x32, a 32-bit
//! `int 0x80`) are refused as a whole.
//!
//! Also refused: the kernel's keyrings (`add_key`, `request_key`,
//! `keyctl`: a root runner's user keyring is every root process's), and
//! `prlimit64` of any process but the runner itself (its own id, its
//! group's, or 0): a root runner set its server's `RLIMIT_CPU` to 1 s and
//! the kernel killed the server. The scheduling calls that name a process
//! (`sched_setparam`, `sched_setscheduler`, `sched_setaffinity`,
//! `sched_setattr`) are checked as the signals below: not an elder.
//!
//! Signals, by number: `kill` of every process (`-1`) or of a process
//! group other than the runner's own, and `kill`, `tkill`, `tgkill`,
//! `rt_sigqueueinfo`, `rt_tgsigqueueinfo` and `pidfd_open` of the runner's
//! parent (its zygote, or the server) or its parent's parent (the server
//! under a zygote), are refused, and `pidfd_send_signal` as a whole (its
//! target is a descriptor, which `/proc/PID` opens too); so is naming such
//! a process or group the owner of a descriptor, whom the kernel signals
//! (`SIGIO`, or any signal `F_SETSIG` picks) when it is ready: `fcntl`'s
//! `F_SETOWN` is checked as `kill` is, `F_SETOWN_EX` and the `ioctl`s
//! `FIOSETOWN` and `SIOCSPGRP` (their target behind a pointer) refused. Landlock ABI 6
//! scopes signals to the runner's own processes; on older kernels this is
//! what stops a plugin from ending its zygote, and with it every Python
//! plugin, or, as root, every process on the machine. It names processes,
//! not threads: a thread of the server other than its first has an id of
//! its own, which `kill` takes too (README, Security).
//!
//! Hand-assembled rather than built with a crate: the Python runner,
//! standard library only, must install the very same program
//! (`runner/confine.py`), and a dozen instructions written out in both
//! places are easier to keep identical than a crate's output.

use std::io;

/// What the hello's `syscalls` says of a runner filtered without network
/// (the Python runner says the same).
pub const SYSCALLS_NO_SOCKETS: &str = "filtered: no new socket (Unix pairs of streams or packets only), no \
     System V IPC, no POSIX message queue, no io_uring, no keyring, no new session or process \
     group, no new namespace, no truncate() by path, no other process's limits, no scheduling of \
     its parents, no signal to every process, another process group or its parents";
/// ... and of one whose plan keeps the network.
pub const SYSCALLS_IPC: &str = "filtered: no System V IPC, no POSIX message queue, no io_uring, \
     no keyring, no new session or process group, no new namespace, no truncate() by path, no \
     other process's limits, no scheduling of its parents, no signal to every process, another \
     process group or its parents";

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// The calls refused whatever they are given, in ascending order: System
/// V IPC, POSIX message queues, io_uring (an io_uring operation, a socket
/// among them, passes no filter), and a new session or process group
/// (`setsid`, `setpgid`: a process that leaves its runner's group outlives
/// the runner's end), and new namespaces (`unshare`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn denied_calls() -> [u32; 29] {
    let mut calls = [
        libc::SYS_shmget,
        libc::SYS_shmat,
        libc::SYS_shmctl,
        libc::SYS_shmdt,
        libc::SYS_semget,
        libc::SYS_semop,
        libc::SYS_semctl,
        libc::SYS_semtimedop,
        libc::SYS_msgget,
        libc::SYS_msgsnd,
        libc::SYS_msgrcv,
        libc::SYS_msgctl,
        libc::SYS_mq_open,
        libc::SYS_mq_unlink,
        libc::SYS_mq_timedsend,
        libc::SYS_mq_timedreceive,
        libc::SYS_mq_notify,
        libc::SYS_mq_getsetattr,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_setsid,
        libc::SYS_setpgid,
        libc::SYS_unshare,
        // The kernel's keyrings: a root runner's user keyring is every
        // root process's, and runners of one user share theirs (a channel
        // and a leak between plugins, as System V IPC is).
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        // By path: Landlock rules it only from ABI 3 (Linux 6.2); before,
        // any file the runner's user may write could be emptied.
        libc::SYS_truncate,
        // Its target is a descriptor (of `pidfd_open`, or `/proc/PID`
        // opened): no filter can tell whose.
        libc::SYS_pidfd_send_signal,
    ]
    .map(|nr| nr as u32);
    calls.sort_unstable();
    calls
}

const DENY: u32 = libc::SECCOMP_RET_ERRNO | libc::EACCES as u32;
/// `clone`'s flags that are refused: `CLONE_PARENT`, and every namespace's.
const CLONE_DENIED: u32 = (libc::CLONE_PARENT
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;
/// `clone3`'s answer: "no such call", so that glibc falls back to `clone`,
/// whose flags a filter can read (`clone3`'s are behind a pointer).
const NO_CLONE3: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
/// A jump marked with this goes to the `NO_CLONE3` return (patched).
const TO_NO_CLONE3: u8 = u8::MAX - 1;
/// A jump marked with this goes to the check of the elders (patched).
const TO_ELDERS: u8 = u8::MAX - 2;
/// A jump marked with this goes to `kill`'s check of a process number in
/// the accumulator (patched).
const TO_PIDS: u8 = u8::MAX - 3;
/// `ioctl`s that make a process or a group a descriptor's owner, whom the
/// kernel signals (`FIOSETOWN`, `SIOCSPGRP`; their argument a pointer).
const IOCTLS_SETOWN: [u32; 2] = [0x8901, 0x8902];
/// The calls whose first argument names the one process (or a thread of
/// it) they signal, open or schedule: refused for an elder (a runner that
/// set its server's scheduler to `SCHED_IDLE` starved it).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const NAMING_ONE: [libc::c_long; 9] = [
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_pidfd_open,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
];
/// `fcntl`'s `F_SETOWN_EX` (the owner behind a pointer; not in `libc`).
const F_SETOWN_EX: u32 = 15;
/// The sign bit of a process number (the low half of the argument).
const NEGATIVE: u32 = 0x8000_0000;

/// Whom a confined runner may not signal by number (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Kin {
    /// The runner's process group (it leads it): the one group it may
    /// signal as a whole.
    pub(crate) group: u32,
    /// Its parent, and its parent's parent where that is the server (a
    /// Python runner a zygote forked); 0: none, not filtered.
    pub(crate) elders: [u32; 2],
}

impl Kin {
    /// This process's, a native runner's: the server started it, its one
    /// elder.
    pub(crate) fn of_this_process() -> Self {
        let raw =
            |pid: rustix::process::Pid| u32::try_from(pid.as_raw_nonzero().get()).unwrap_or(0);
        Kin {
            group: raw(rustix::process::getpgrp()),
            elders: [rustix::process::getppid().map_or(0, raw), 0],
        }
    }

    /// The elders that are known.
    fn known_elders(&self) -> impl Iterator<Item = u32> + '_ {
        self.elders.iter().copied().filter(|&pid| pid != 0)
    }
}

/// A socket's type is its low bits; the rest are flags (`SOCK_CLOEXEC` …).
const SOCK_TYPE_MASK: u32 = 0xF;
const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

fn load(offset: u32) -> libc::sock_filter {
    stmt((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, offset)
}

fn ret(k: u32) -> libc::sock_filter {
    stmt((libc::BPF_RET | libc::BPF_K) as u16, k)
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The program (see the module doc); `network`: whether the plan keeps
/// the network (then sockets are not filtered); `kin`: whom it may not
/// signal.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn program(network: bool, kin: Kin) -> Vec<libc::sock_filter> {
    // seccomp_data: nr at 0, arch at 4, args[0] at 16, args[1] at 24
    // (their low halves on these little-endian machines: a socket's
    // domain and type are ints).
    let mut p = vec![load(4)];
    // A foreign architecture: to the deny at the end (patched below).
    p.push(jump(libc::BPF_JEQ, AUDIT_ARCH, 0, u8::MAX));
    p.push(load(0));
    if cfg!(target_arch = "x86_64") {
        p.push(jump(libc::BPF_JGE, 0x4000_0000, u8::MAX, 0));
    }
    // clone3(): ENOSYS. clone() with CLONE_PARENT (a child whose parent is
    // the runner's parent, the zygote or the server, which never reaps it)
    // or a namespace flag: deny, else allowed.
    p.push(jump(
        libc::BPF_JEQ,
        libc::SYS_clone3 as u32,
        TO_NO_CLONE3,
        0,
    ));
    p.push(jump(libc::BPF_JEQ, libc::SYS_clone as u32, 0, 4));
    p.push(load(16));
    p.push(stmt(
        (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16,
        CLONE_DENIED,
    ));
    p.push(jump(libc::BPF_JEQ, 0, 0, u8::MAX));
    p.push(ret(ALLOW));
    // prlimit64(): of itself only (args[0]: 0, or its own process id, its
    // group's), else deny: a root runner set its server's RLIMIT_CPU to
    // 1 s (the kernel then killed the server) or RLIMIT_NOFILE to 10 (no
    // connection accepted again), and a sibling runner's RLIMIT_CPU.
    p.push(jump(libc::BPF_JEQ, libc::SYS_prlimit64 as u32, 0, 4));
    p.push(load(16));
    p.push(jump(libc::BPF_JEQ, 0, 1, 0));
    p.push(jump(libc::BPF_JEQ, kin.group, 0, u8::MAX));
    p.push(ret(ALLOW));
    // kill(): its first argument to the check of process numbers (not -1,
    // every process; not an elder; not a group, a negative number, other
    // than its own). fcntl(F_SETOWN): its third, the same; F_SETOWN_EX
    // (the owner behind a pointer): deny; any other command: allow.
    // ioctl(FIOSETOWN, SIOCSPGRP): deny, else allow. (A `jeq` whose two
    // branches go to one place is an unconditional jump.) tkill, tgkill,
    // rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_open: to the check of the
    // elders (their first argument names the process, or a thread of it).
    p.push(jump(libc::BPF_JEQ, libc::SYS_kill as u32, 0, 2));
    p.push(load(16));
    p.push(jump(libc::BPF_JEQ, 0, TO_PIDS, TO_PIDS));
    p.push(jump(libc::BPF_JEQ, libc::SYS_fcntl as u32, 0, 6));
    p.push(load(24));
    p.push(jump(libc::BPF_JEQ, F_SETOWN_EX, u8::MAX, 0));
    p.push(jump(libc::BPF_JEQ, libc::F_SETOWN as u32, 0, 2));
    p.push(load(32));
    p.push(jump(libc::BPF_JEQ, 0, TO_PIDS, TO_PIDS));
    p.push(ret(ALLOW));
    p.push(jump(libc::BPF_JEQ, libc::SYS_ioctl as u32, 0, 4));
    p.push(load(24));
    for request in IOCTLS_SETOWN {
        p.push(jump(libc::BPF_JEQ, request, u8::MAX, 0));
    }
    p.push(ret(ALLOW));
    for nr in NAMING_ONE {
        p.push(jump(libc::BPF_JEQ, nr as u32, TO_ELDERS, 0));
    }
    for nr in denied_calls() {
        p.push(jump(libc::BPF_JEQ, nr, u8::MAX, 0));
    }
    if !network {
        // socketpair(): of Unix sockets only (args[0]: any other family's
        // pair is a socket of that family made, and its module maybe
        // loaded, before the call fails), of their type (args[1], flags
        // masked off); else on.
        p.push(jump(libc::BPF_JEQ, libc::SYS_socketpair as u32, 0, 7));
        p.push(load(16));
        p.push(jump(libc::BPF_JEQ, libc::AF_UNIX as u32, 0, u8::MAX));
        p.push(load(24));
        p.push(stmt(
            (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16,
            SOCK_TYPE_MASK,
        ));
        p.push(jump(libc::BPF_JEQ, libc::SOCK_STREAM as u32, 1, 0));
        p.push(jump(libc::BPF_JEQ, libc::SOCK_SEQPACKET as u32, 0, u8::MAX));
        p.push(ret(ALLOW));
        // socket(): none, of any family.
        p.push(jump(libc::BPF_JEQ, libc::SYS_socket as u32, u8::MAX, 0));
    }
    p.push(ret(ALLOW));
    // The check of the elders: args[0] names one, deny; else allow.
    let elders_at = p.len();
    p.push(load(16));
    for elder in kin.known_elders() {
        p.push(jump(libc::BPF_JEQ, elder, u8::MAX, 0));
    }
    p.push(ret(ALLOW));
    // The check of a process number (loaded): -1, an elder, another group:
    // deny; else allow.
    let pids_at = p.len();
    p.push(jump(libc::BPF_JEQ, u32::MAX, u8::MAX, 0));
    for elder in kin.known_elders() {
        p.push(jump(libc::BPF_JEQ, elder, u8::MAX, 0));
    }
    p.push(jump(libc::BPF_JEQ, kin.group.wrapping_neg(), 1, 0));
    p.push(jump(libc::BPF_JSET, NEGATIVE, u8::MAX, 0));
    p.push(ret(ALLOW));
    p.push(ret(NO_CLONE3));
    p.push(ret(DENY));
    // Every jump marked u8::MAX goes to the deny, the last instruction;
    // one marked TO_NO_CLONE3 to the ENOSYS return before it, one marked
    // TO_ELDERS or TO_PIDS to that check.
    let last = p.len() - 1;
    for (i, insn) in p.iter_mut().enumerate() {
        let to = |target: usize| u8::try_from(target.saturating_sub(i + 1)).unwrap_or(u8::MAX);
        for offset in [&mut insn.jt, &mut insn.jf] {
            if *offset == u8::MAX {
                *offset = to(last);
            } else if *offset == TO_NO_CLONE3 {
                *offset = to(last - 1);
            } else if *offset == TO_ELDERS {
                *offset = to(elders_at);
            } else if *offset == TO_PIDS {
                *offset = to(pids_at);
            }
        }
    }
    p
}

/// Installs the filter on this thread (and so on the threads and processes
/// it starts later: the runner installs it before it starts any), after
/// `no_new_privs`, which a filter needs without `CAP_SYS_ADMIN`; `kin`:
/// whom it may not signal. What the hello's `syscalls` says.
pub(crate) fn install(network: bool, kin: Kin) -> String {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        match install_program(&program(network, kin), network) {
            Ok(said) => said.to_owned(),
            Err(e) => format!("unconfined: no seccomp filter ({e})"),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (network, kin);
        format!(
            "unconfined: no seccomp filter for this architecture ({})",
            std::env::consts::ARCH
        )
    }
}

/// [`install`] of a program built already (it allocates nothing: a test
/// runs it in a forked child).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(unsafe_code)]
fn install_program(program: &[libc::sock_filter], network: bool) -> io::Result<&'static str> {
    let len =
        u16::try_from(program.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prctl` with these options takes integers, and for
    // PR_SET_SECCOMP a pointer to `fprog`, which points into `program`;
    // both live until the call returns (the kernel copies the program).
    let failed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &fprog as *const libc::sock_fprog,
                0,
                0,
            ) != 0
    };
    if failed {
        return Err(io::Error::last_os_error());
    }
    Ok(if network {
        SYSCALLS_IPC
    } else {
        SYSCALLS_NO_SOCKETS
    })
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// The kin the programs of these tests are built for.
    const KIN: Kin = Kin {
        group: 4321,
        elders: [1234, 99],
    };

    /// Runs the program over a call as the kernel would (the few opcodes
    /// it uses): what it returns.
    fn run(program: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        run2(program, arch, nr, arg0, 0)
    }

    /// [`run`] with a second argument.
    fn run2(program: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32, arg1: u32) -> u32 {
        run3(program, arch, nr, [arg0, arg1, 0])
    }

    /// [`run`] with three arguments.
    fn run3(program: &[libc::sock_filter], arch: u32, nr: u32, args: [u32; 3]) -> u32 {
        let [arg0, arg1, arg2] = args;
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = program[pc];
            let code = u32::from(insn.code);
            pc += 1;
            if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                acc = match insn.k {
                    0 => nr,
                    4 => arch,
                    16 => arg0,
                    24 => arg1,
                    32 => arg2,
                    other => panic!("load of offset {other}"),
                };
            } else if code == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K {
                acc &= insn.k;
            } else if code == libc::BPF_RET | libc::BPF_K {
                return insn.k;
            } else {
                let taken = match code & !libc::BPF_K {
                    c if c == libc::BPF_JMP | libc::BPF_JEQ => acc == insn.k,
                    c if c == libc::BPF_JMP | libc::BPF_JGE => acc >= insn.k,
                    c if c == libc::BPF_JMP | libc::BPF_JSET => acc & insn.k != 0,
                    c => panic!("opcode {c:#x}"),
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
        }
    }

    #[test]
    fn the_program_refuses_exactly_what_it_says() {
        let socket = libc::SYS_socket as u32;
        let unix = libc::AF_UNIX as u32;
        let netlink = libc::AF_NETLINK as u32;
        let inet = libc::AF_INET as u32;
        for network in [false, true] {
            let p = program(network, KIN);
            for nr in denied_calls() {
                assert_eq!(run(&p, AUDIT_ARCH, nr, 0), DENY, "call {nr}");
            }
            for other in [0, libc::SYS_read as u32, libc::SYS_socketpair as u32, 400] {
                let stream = libc::SOCK_STREAM as u32;
                assert_eq!(
                    run2(&p, AUDIT_ARCH, other, unix, stream),
                    ALLOW,
                    "call {other}"
                );
            }
            let sockets = if network { ALLOW } else { DENY };
            assert_eq!(
                run2(&p, AUDIT_ARCH, socket, inet, libc::SOCK_STREAM as u32),
                sockets
            );
            assert_eq!(run(&p, AUDIT_ARCH, socket, unix), sockets);
            assert_eq!(run(&p, AUDIT_ARCH, socket, netlink), sockets);
            // Every socket, IP ones too (TCP, UDP, MPTCP (262), SCTP (132,
            // or sequenced packets of protocol 0), DCCP (type 6), ping
            // (ICMP, 1), vsock, packet), with the network only.
            let stream = libc::SOCK_STREAM as u32;
            let dgram = libc::SOCK_DGRAM as u32;
            let seqpacket = libc::SOCK_SEQPACKET as u32;
            let flags = (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u32;
            let inet6 = libc::AF_INET6 as u32;
            for (domain, kind, protocol, always) in [
                (inet, stream, 0, false),
                (inet6, stream | flags, 0, false),
                (inet, stream, 6, false),
                (inet6, dgram, 17, false),
                (inet, dgram | flags, 0, false),
                (inet, stream, 262, false),
                (inet6, stream, 262, false),
                (inet, stream, 132, false),
                (inet, seqpacket, 0, false),
                (inet6, seqpacket, 132, false),
                (inet, 6, 0, false),
                (inet, dgram, 1, false),
                (inet, stream, 17, false),
                (inet, dgram, 6, false),
                (libc::AF_VSOCK as u32, stream, 0, false),
                (libc::AF_PACKET as u32, dgram, 0, false),
            ] {
                let said = run3(&p, AUDIT_ARCH, socket, [domain, kind, protocol]);
                let expected = if always || network { ALLOW } else { DENY };
                assert_eq!(said, expected, "socket({domain}, {kind:#x}, {protocol})");
            }
            // socketpair(AF_UNIX, type | SOCK_CLOEXEC): streams and
            // sequenced packets always, datagrams (raw is one) with the
            // network only.
            let pair = libc::SYS_socketpair as u32;
            let cloexec = libc::SOCK_CLOEXEC as u32;
            for (kind, always) in [
                (libc::SOCK_STREAM, true),
                (libc::SOCK_SEQPACKET, true),
                (libc::SOCK_DGRAM, false),
                (libc::SOCK_RAW, false),
            ] {
                let said = run2(&p, AUDIT_ARCH, pair, unix, kind as u32 | cloexec);
                let expected = if always || network { ALLOW } else { DENY };
                assert_eq!(said, expected, "socketpair of type {kind}");
            }
            // Pairs of another family: with the network only (TIPC has
            // stream pairs; an IP family's are made before they fail).
            for domain in [inet, inet6, 30 /* AF_TIPC */, netlink] {
                let said = run2(&p, AUDIT_ARCH, pair, domain, libc::SOCK_STREAM as u32);
                let expected = if network { ALLOW } else { DENY };
                assert_eq!(said, expected, "socketpair of family {domain}");
            }
            // clone3: ENOSYS; clone: refused with CLONE_PARENT or a
            // namespace flag only; unshare: refused.
            let clone = libc::SYS_clone as u32;
            let parent = libc::CLONE_PARENT as u32;
            assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_clone3 as u32, 0), NO_CLONE3);
            assert_eq!(run(&p, AUDIT_ARCH, clone, parent | 17), DENY);
            for namespace in [
                libc::CLONE_NEWNS,
                libc::CLONE_NEWCGROUP,
                libc::CLONE_NEWUTS,
                libc::CLONE_NEWIPC,
                libc::CLONE_NEWUSER,
                libc::CLONE_NEWPID,
                libc::CLONE_NEWNET,
            ] {
                assert_eq!(run(&p, AUDIT_ARCH, clone, namespace as u32 | 17), DENY);
            }
            let unshare = libc::SYS_unshare as u32;
            assert_eq!(
                run(&p, AUDIT_ARCH, unshare, libc::CLONE_NEWUSER as u32),
                DENY
            );
            assert_eq!(run(&p, AUDIT_ARCH, clone, 0x3d0f00), ALLOW); // a thread's
            assert_eq!(run(&p, AUDIT_ARCH, clone, 17), ALLOW); // fork()'s
            // prlimit64(): of itself (0, or its own id, its group's) only.
            let prlimit = libc::SYS_prlimit64 as u32;
            for (target, expected) in [
                (0, ALLOW),
                (4321, ALLOW),
                (1234, DENY),
                (99, DENY),
                (5555, DENY),
            ] {
                assert_eq!(run(&p, AUDIT_ARCH, prlimit, target), expected, "{target}");
            }
            // Signals (args[0]'s low half): kill() of every process, of an
            // elder, of another group: deny; of its own group, of its own
            // (0), of any other process: allow. The calls that name one
            // process or thread: deny for an elder only.
            let kill = libc::SYS_kill as u32;
            for (target, expected) in [
                (u32::MAX, DENY),
                (1234, DENY),
                (99, DENY),
                (4322u32.wrapping_neg(), DENY),
                (4321u32.wrapping_neg(), ALLOW),
                (0, ALLOW),
                (4321, ALLOW),
                (5555, ALLOW),
            ] {
                let said = run(&p, AUDIT_ARCH, kill, target);
                assert_eq!(said, expected, "kill({})", target.cast_signed());
            }
            for nr in NAMING_ONE {
                for (target, expected) in [(1234, DENY), (99, DENY), (5555, ALLOW), (4321, ALLOW)] {
                    let said = run(&p, AUDIT_ARCH, nr as u32, target);
                    assert_eq!(said, expected, "call {nr} of {target}");
                }
            }
            // A descriptor's owner: fcntl(F_SETOWN) as kill(); F_SETOWN_EX,
            // ioctl(FIOSETOWN, SIOCSPGRP): no; other commands: yes.
            let fcntl = libc::SYS_fcntl as u32;
            let setown = libc::F_SETOWN as u32;
            for (owner, expected) in [
                (1234, DENY),
                (u32::MAX, DENY),
                (4322u32.wrapping_neg(), DENY),
                (4321u32.wrapping_neg(), ALLOW),
                (5555, ALLOW),
                (0, ALLOW),
            ] {
                let said = run3(&p, AUDIT_ARCH, fcntl, [7, setown, owner]);
                assert_eq!(said, expected, "F_SETOWN {}", owner.cast_signed());
            }
            assert_eq!(run3(&p, AUDIT_ARCH, fcntl, [7, F_SETOWN_EX, 5555]), DENY);
            assert_eq!(
                run3(&p, AUDIT_ARCH, fcntl, [7, libc::F_GETFL as u32, 1234]),
                ALLOW
            );
            let ioctl = libc::SYS_ioctl as u32;
            for (request, expected) in [(0x8901, DENY), (0x8902, DENY), (0x5401, ALLOW)] {
                assert_eq!(run3(&p, AUDIT_ARCH, ioctl, [7, request, 0]), expected);
            }
            // Elders not known: none filtered, the rest as before.
            let unknown = program(network, Kin::default());
            assert_eq!(run(&unknown, AUDIT_ARCH, kill, u32::MAX), DENY);
            assert_eq!(run(&unknown, AUDIT_ARCH, kill, 0), ALLOW);
            assert_eq!(run(&unknown, AUDIT_ARCH, kill, 5555), ALLOW);
            assert_eq!(
                run(&unknown, AUDIT_ARCH, kill, 5555u32.wrapping_neg()),
                DENY
            );
            assert_eq!(run(&unknown, AUDIT_ARCH, libc::SYS_tkill as u32, 0), ALLOW);
            // Another architecture's calls, whatever they are.
            assert_eq!(run(&p, 0x4000_0003, libc::SYS_read as u32, 0), DENY);
            if cfg!(target_arch = "x86_64") {
                assert_eq!(run(&p, AUDIT_ARCH, 0x4000_0000 | socket, inet), DENY);
            }
        }
    }

    /// The Python runner's program (`confine.py`'s `_seccomp_program`) is
    /// this one, instruction for instruction, with and without network.
    #[test]
    fn the_python_runners_program_is_this_one() {
        let python = std::path::Path::new("python3");
        let runner = concat!(env!("CARGO_MANIFEST_DIR"), "/src/python");
        let code = format!(
            "import json, sys; sys.path.insert(0, {runner:?}); \
             from runner.confine import _seccomp_program as p; \
             print(json.dumps([p({:?}, n, {}, ({}, {})) for n in (False, True)]))",
            std::env::consts::ARCH,
            KIN.group,
            KIN.elders[0],
            KIN.elders[1],
        );
        let out = match std::process::Command::new(python)
            .args(["-c", &code])
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!(
                "{}: {e} (Python 3 is on every machine here)",
                python.display()
            ),
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<Vec<(u16, u8, u8, u32)>> = serde_json::from_slice(&out.stdout).unwrap();
        let ours: Vec<Vec<(u16, u8, u8, u32)>> = [false, true]
            .map(|network| {
                program(network, KIN)
                    .iter()
                    .map(|i| (i.code, i.jt, i.jf, i.k))
                    .collect()
            })
            .into();
        assert_eq!(theirs, ours);
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_filtered_process_cannot_make_sockets_nor_use_system_v_ipc_nor_leave_its_group() {
        // In a child: the filter stays with the process that installs it.
        // The program is built first: the child of a threaded process
        // allocates nothing.
        // The child's kin: its parent (this process); its group is this
        // process's (it does not lead one).
        let kin = Kin {
            group: u32::try_from(rustix::process::getpgrp().as_raw_nonzero().get()).unwrap(),
            elders: [std::process::id(), 0],
        };
        let program = program(false, kin);
        // SAFETY: (a test) the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = (|| {
                if !matches!(install_program(&program, false), Ok(SYSCALLS_NO_SOCKETS)) {
                    return 10;
                }
                // SAFETY: (a test) plain system calls with integer arguments.
                unsafe {
                    let errno = || io::Error::last_os_error().raw_os_error();
                    if libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 11;
                    }
                    if libc::shmget(libc::IPC_PRIVATE, 4096, 0o600) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 12;
                    }
                    // Null parameters: EFAULT where io_uring may be set up.
                    if libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null_mut::<u8>()) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 15;
                    }
                    let mut pair = [0; 2];
                    if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) != 0
                    {
                        return 13;
                    }
                    if libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 16;
                    }
                    // No IP socket either: outside a namespace, Landlock's
                    // TCP rights leave UDP, TCP Fast Open and MPTCP open.
                    if libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 14;
                    }
                    if libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 24;
                    }
                    if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 262) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 21;
                    }
                    if libc::socket(libc::AF_INET, libc::SOCK_SEQPACKET, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 23;
                    }
                    if libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 22;
                    }
                    // A path that is not there: ENOENT if it were let through.
                    if libc::truncate(c"/nonexistent-forgesyte-test".as_ptr(), 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 25;
                    }
                    // Not a group leader: both would succeed unfiltered.
                    if libc::setsid() != -1 || errno() != Some(libc::EACCES) {
                        return 17;
                    }
                    if libc::setpgid(0, 0) != -1 || errno() != Some(libc::EACCES) {
                        return 18;
                    }
                    // Null arguments: EFAULT if it were let through.
                    if libc::syscall(libc::SYS_clone3, std::ptr::null_mut::<u8>(), 0) != -1
                        || errno() != Some(libc::ENOSYS)
                    {
                        return 19;
                    }
                    let flags = libc::c_long::from(libc::CLONE_PARENT | libc::SIGCHLD);
                    if libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 20;
                    }
                    // No namespace of its own: in a user namespace it held
                    // every capability (root succeeds unfiltered).
                    if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != Some(libc::EACCES) {
                        return 40;
                    }
                    let flags = libc::c_long::from(libc::CLONE_NEWUSER | libc::SIGCHLD);
                    match libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) {
                        // Let through: the child leaves at once.
                        0 => libc::_exit(0),
                        -1 if errno() == Some(libc::EACCES) => {}
                        _ => return 41,
                    }
                    // Another process's limits (its parent's; read only):
                    // refused. Its own: allowed.
                    let mut limit = std::mem::zeroed::<libc::rlimit>();
                    if libc::prlimit(
                        libc::getppid(),
                        libc::RLIMIT_NOFILE,
                        std::ptr::null(),
                        &raw mut limit,
                    ) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 42;
                    }
                    if libc::prlimit(0, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut limit) != 0
                    {
                        return 43;
                    }
                    // Signals: not every process, not its parent (nor a
                    // thread of it), not another group; its own group, and
                    // itself, yes (signal 0: only asks).
                    let parent = libc::getppid();
                    let group = libc::getpgrp();
                    for (target, step) in [(-1, 26), (parent, 27), (-(parent + 77_777), 28)] {
                        if libc::kill(target, 0) != -1 || errno() != Some(libc::EACCES) {
                            return step;
                        }
                    }
                    if libc::kill(-group, 0) != 0 || libc::kill(0, 0) != 0 {
                        return 29;
                    }
                    if libc::kill(libc::getpid(), 0) != 0 {
                        return 30;
                    }
                    if libc::syscall(libc::SYS_tgkill, parent, parent, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 31;
                    }
                    if libc::syscall(libc::SYS_pidfd_open, parent, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 32;
                    }
                    // A descriptor that is none: EBADF if it were let through.
                    if libc::syscall(libc::SYS_pidfd_send_signal, -1, 0, 0, 0) != -1
                        || errno() != Some(libc::EACCES)
                    {
                        return 33;
                    }
                    // Its parent, or every process, as a descriptor's
                    // owner (signalled when it is ready): no; itself, yes.
                    let fd = pair[0];
                    for (owner, step) in [(parent, 34), (-1, 35)] {
                        if libc::fcntl(fd, libc::F_SETOWN, owner) != -1
                            || errno() != Some(libc::EACCES)
                        {
                            return step;
                        }
                    }
                    if libc::fcntl(fd, libc::F_SETOWN, libc::getpid()) != 0 {
                        return 36;
                    }
                    if libc::fcntl(fd, libc::F_GETFL) == -1 {
                        return 37;
                    }
                    let mut owner = parent;
                    if libc::ioctl(fd, 0x8901, &mut owner) != -1 || errno() != Some(libc::EACCES) {
                        return 38;
                    }
                }
                0
            })();
            // SAFETY: (a test) ends the child without running the parent's
            // destructors or test harness.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: (a test) waits for the child just forked.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child's step that failed");
    }
}
