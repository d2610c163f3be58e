"""Confinement (``--confine PLAN``): the host's sandbox applied to this
process before any plugin code runs, the same policy as the native
runner's (``forgesyte_loader::sandbox``): the environment replaced, no
network, Landlock rules, capabilities dropped, not dumpable, a seccomp
filter. Each part is reported as enforced or "unconfined: why", never
silently skipped."""

import errno
import os
import struct
import sys

# Landlock (``linux/landlock.h``): system call numbers (the same on every
# architecture Linux gives them to), and access rights.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1, 2, 4, 8
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000


def _fs_rights(abi):
    """Every filesystem right the kernel's Landlock ABI knows."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= 1 << 13  # REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def _runtime_paths():
    """What this interpreter reads to run: its installation, its
    virtualenv, every directory on ``sys.path`` (site-packages) and those
    its editable installs map packages to (``_editable_paths``)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p)
    paths.update(_editable_paths())
    return sorted(p for p in paths if os.path.isabs(p))


def _editable_paths():
    """The directories setuptools' editable installs (``pip install -e``
    of a flat layout) map their packages to, which are on no ``sys.path``:
    the install's ``.pth`` file, read at the interpreter's start (before
    any plugin code), imports a finder module ``__editable___NAME_finder``
    whose ``MAPPING`` names each package's directory and ``NAMESPACES``
    each namespace package's."""
    found = []
    for name, module in list(sys.modules.items()):
        if not (name.startswith("__editable___") and name.endswith("_finder")):
            continue
        mapping = getattr(module, "MAPPING", None)
        if isinstance(mapping, dict):
            found.extend(p for p in mapping.values() if isinstance(p, str))
        namespaces = getattr(module, "NAMESPACES", None)
        if isinstance(namespaces, dict):
            for dirs in namespaces.values():
                if isinstance(dirs, (list, tuple)):
                    found.extend(p for p in dirs if isinstance(p, str))
    return found


def _landlock_abi(libc):
    """(``libc.syscall`` set up to return a long, this kernel's Landlock ABI
    version: when it has no Landlock, minus the error number that said so,
    kept here since the calls after it overwrite ``errno``)."""
    import ctypes

    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                  ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return syscall, (abi if abi >= 1 else -(ctypes.get_errno() or 1))


def confine_tools(libc):
    """What ``confine`` calls through: ``(libc, syscall, Landlock ABI)``."""
    syscall, abi = _landlock_abi(libc)
    return libc, syscall, abi


# The parts every confined runner reports (the native runner's
# ``sandbox::REPORTED_PARTS``); a runner that leaves one out ignored that
# part of its plan.
REPORTED_PARTS = ("env", "network", "filesystem", "capabilities", "memory", "syscalls")


def unconfined(report):
    """What of a confinement ``report`` (the hello's ``confinement``) is
    not enforced, in one line ("part: unconfined: why; ...", a part of
    ``REPORTED_PARTS`` left out: "part: not reported"), in the order of
    the lines; or None when every part is. No report at all is unconfined
    as a whole. The native runner's rule (``sandbox::unconfined``)."""
    if report is None:
        return "it reported no confinement"
    parts = ["%s: %s" % (part, value) for part, value in report.items()
             if str(value).startswith("unconfined")]
    parts += ["%s: not reported" % part for part in REPORTED_PARTS if part not in report]
    return "; ".join(sorted(parts)) if parts else None


def confine(plan, shared=None, tools=None, given_env=None, forked=False):
    """Applies the host's sandbox ``plan`` to this process, before any
    plugin code runs: the environment reduced to the variables
    ``plan["env"]`` names (their values ``given_env``'s, from a zygote's
    spawn, else this process's own, as the host started it), no
    network unless ``plan["network"]``, and Landlock rules that
    allow reading ``plan["read"]`` (and what the interpreter itself needs),
    writing ``plan["write"]``, and using the devices ``plan["devices"]``;
    last, a seccomp filter (``_seccomp``) refuses what those leave open.
    Returns what was applied (the hello's ``confinement``): each part either
    enforced or "unconfined: why", never silently skipped.

    No network means an empty network namespace: the one its zygote made
    for all its runners (``shared``, a descriptor this call closes, joined
    with ``setns``, far cheaper than making one) when Landlock can scope
    abstract Unix sockets and signals to this runner (ABI >= 6), so runners
    sharing it still cannot reach one another; else one of its own
    (``unshare``). ``tools``: what ``confine_tools`` made in the zygote,
    else made here."""
    import ctypes

    # Landlock, the seccomp filter, the capabilities and the namespaces
    # hold for this thread and those it starts after, not for one already
    # running (a ``.pth`` file, ``sitecustomize`` or an at-fork hook may
    # have started one): it would run outside the sandbox. Refused.
    others = len(os.listdir("/proc/self/task")) - 1
    if others > 0:
        raise RuntimeError(
            "%d other thread(s) run already (started by a .pth file, sitecustomize or an "
            "at-fork hook?), and would run outside the sandbox" % others)
    if tools is None:
        tools = confine_tools(ctypes.CDLL(None, use_errno=True))
    libc, syscall, abi = tools
    family = kin(forked)
    report = {}
    env = plan.get("env")
    if isinstance(env, (list, dict)):
        if isinstance(env, dict):  # a plan that carries the values themselves
            source = env
        else:
            source = given_env if isinstance(given_env, dict) else dict(os.environ)
        values = {str(k): str(source[k]) for k in env if k in source}
        # Not ``os.environ.clear()``: its ``popitem`` lists the environment
        # again for every variable (0.6 ms for 40 of them, 0.1 ms so).
        for key in list(os.environ):
            del os.environ[key]
        os.environ.update(values)
        report["env"] = "scrubbed"
    network = bool(plan.get("network"))
    try:
        if network:
            report["network"] = "allowed"
        elif shared is not None and abi >= 6 and libc.setns(ctypes.c_int(shared), ctypes.c_int(CLONE_NEWNET)) == 0:
            # Its loopback stays down: no runner may bring it up (and so
            # reach the others over UDP, which Landlock does not rule).
            _drop_capability(libc, _CAP_NET_ADMIN)
            report["network"] = NETWORK_SHARED
        elif libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0:
            report["network"] = "isolated: a network namespace of its own"
        else:
            report["network"] = "unconfined: no network namespace (%s)" % os.strerror(ctypes.get_errno())
    finally:
        if shared is not None:
            os.close(shared)
    report["filesystem"] = _landlock(libc, syscall, abi, plan, network, report)
    report["capabilities"] = _drop_all_capabilities(libc)
    report["memory"] = _not_dumpable(libc)
    report["syscalls"] = _seccomp(libc, network, kin_of=family)
    if not network and report["network"].startswith("unconfined") \
            and not report["syscalls"].startswith("unconfined"):
        # Landlock's TCP rights alone are no isolation (TCP Fast Open's
        # ``sendto``, a ``listen`` without ``bind``, UDP): no socket is.
        report["network"] = NETWORK_NO_SOCKETS
    return report


# What the hello's ``network`` says of a runner without the network that
# could not make a network namespace but whose seccomp filter refuses every
# new socket (the native runner's ``sandbox::NETWORK_NO_SOCKETS``).
NETWORK_NO_SOCKETS = ("isolated: no network namespace (it may not make one), "
                      "and no new socket (the seccomp filter)")


# What the hello says of a runner that made itself not dumpable (the native
# runner says the same).
MEMORY_PRIVATE = ("not dumpable: its /proc files (its memory, its open files) are root's, "
                  "closed to the other processes of a runner user that is not root")
_PR_SET_DUMPABLE = 4


def _not_dumpable(libc):
    """Makes this process not dumpable: its ``/proc/PID`` files belong to
    root, so the other processes of a runner user that is not root cannot
    open its memory, its descriptors (the memory files that carry frames)
    or its environment there, whatever Landlock can or cannot rule. No core
    dump is written when it crashes."""
    import ctypes

    if libc.prctl(ctypes.c_int(_PR_SET_DUMPABLE), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        return "unconfined: cannot make it not dumpable (%s)" % os.strerror(ctypes.get_errno())
    return MEMORY_PRIVATE


# What the hello says of a runner filtered by ``_seccomp`` (as the native
# runner says: ``sandbox::seccomp::SYSCALLS_*``): without the network, and
# with it.
SYSCALLS_NO_SOCKETS = ("filtered: no new socket (Unix pairs of streams or packets only), no System V IPC, "
                       "no POSIX message queue, no io_uring, no keyring, no new session or process "
                       "group, no new namespace, no truncate() by path, no other process's limits, "
                       "no scheduling of its parents, no signal to every process, another process "
                       "group or its parents")
SYSCALLS_IPC = ("filtered: no System V IPC, no POSIX message queue, no io_uring, no keyring, no new "
                "session or process group, no new namespace, no truncate() by path, no other "
                "process's limits, no scheduling of its parents, no signal to every process, another "
                "process group or its parents")
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
# Classic BPF (``linux/filter.h``): the few instructions the filter uses.
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K, _BPF_AND_K = 0x20, 0x15, 0x35, 0x06, 0x54
_BPF_JSET_K = 0x45
# The sign bit of a process number (the low half of the argument).
_NEGATIVE = 0x80000000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_EACCES = 0x00050000 | 13  # SECCOMP_RET_ERRNO | EACCES
# clone3's answer: ENOSYS, so that glibc falls back to clone, whose flags a
# filter can read (clone3's are behind a pointer).
_SECCOMP_RET_ENOSYS = 0x00050000 | 38
_CLONE_PARENT = 0x8000
# ``clone``'s flags that are refused: ``CLONE_PARENT`` and every
# namespace's (``CLONE_NEWNS``, ``_NEWCGROUP``, ``_NEWUTS``, ``_NEWIPC``,
# ``_NEWUSER``, ``_NEWPID``, ``_NEWNET``).
_CLONE_DENIED = _CLONE_PARENT | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 \
    | 0x20000000 | 0x40000000
_CLONE3 = 435  # the same number on both machines
# A socket's type (its low bits; the rest are flags): the pairs allowed.
_SOCK_TYPE_MASK, _SOCK_STREAM, _SOCK_SEQPACKET = 0xF, 1, 5
_AF_UNIX = 1
_X32_SYSCALL_BIT = 0x40000000
# io_uring (``io_uring_setup``, ``_enter``, ``_register``: the same numbers
# on both machines): its operations (a socket among them) pass no filter.
_IO_URING = (425, 426, 427)
# Per machine (``os.uname().machine``): its AUDIT_ARCH, whether it has x32
# calls to refuse, the calls it refuses whatever they are given (System V
# IPC, POSIX message queues, io_uring, then ``setpgid``, ``setsid`` and
# ``unshare``: a process that leaves its runner's group outlives the
# runner's end; ``truncate``; ``pidfd_send_signal``, 424 on both; the
# keyrings' ``add_key``, ``request_key``, ``keyctl``), its ``socket``, its
# ``socketpair`` and its ``clone`` call, its ``kill``, ``fcntl``, ``ioctl``
# and ``prlimit64``, and the calls whose first argument names the process
# (or a thread of it) they signal or schedule: ``tkill``, ``tgkill``,
# ``rt_sigqueueinfo``, ``rt_tgsigqueueinfo``, ``pidfd_open`` (434 on both),
# ``sched_setparam``, ``sched_setscheduler``, ``sched_setaffinity`` and
# ``sched_setattr``.
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, True, (29, 30, 31, 64, 65, 66, 67, 68, 69, 70, 71, 220,
                                  240, 241, 242, 243, 244, 245) + _IO_URING + (109, 112, 272)
               + (76, 424) + (248, 249, 250),
               41, 53, 56, (62, 72, 16, 302), (200, 234, 129, 297, 434, 142, 144, 203, 314)),
    "aarch64": (0xC00000B7, False, tuple(range(180, 198)) + _IO_URING + (154, 157, 97) + (45, 424)
                + (217, 218, 219), 198,
                199, 220, (129, 25, 29, 261), (130, 131, 138, 240, 434, 118, 119, 122, 274)),
}
# ``fcntl``'s commands that make a process or group a descriptor's owner,
# whom the kernel signals when it is ready (``F_SETOWN``, checked as
# ``kill``; ``F_SETOWN_EX``, its owner behind a pointer, refused), and
# ``ioctl``'s (``FIOSETOWN``, ``SIOCSPGRP``: refused).
_F_SETOWN, _F_SETOWN_EX = 8, 15
_IOCTLS_SETOWN = (0x8901, 0x8902)
_SECCOMP_ARCHES["arm64"] = _SECCOMP_ARCHES["aarch64"]


def _seccomp_program(machine, network, group=0, elders=(0, 0)):
    """The filter's program for ``machine``, a list of ``(code, jt, jf, k)``
    (``struct sock_filter``), or None for a machine it has none for;
    ``network``: whether the plan keeps the network (then ``socket()`` is
    not filtered); ``group``: the runner's process group, ``elders``: its
    parent and, under a zygote, the zygote's parent, the server (``kin``;
    0: none, not filtered).
    Instruction for instruction the native runner's
    (``sandbox::seccomp::program``):

    - load the architecture (seccomp_data offset 4); not this machine's: deny
    - load the call's number (offset 0); on x86_64 an x32 call: deny
    - ``clone3``: ENOSYS (the return before the deny); ``clone`` whose
      flags (args[0]'s low half) hold ``CLONE_PARENT`` or a ``CLONE_NEW*``
      flag (``_CLONE_DENIED``): deny, any other ``clone``: allow
    - ``kill``: its first argument to the check of process numbers (-1,
      every process; an elder; a negative number, a group, other than
      ``-group``: deny; else allow); ``fcntl``: ``F_SETOWN_EX`` deny,
      ``F_SETOWN`` its third argument to that check, any other command
      allow; ``ioctl``: ``FIOSETOWN`` and ``SIOCSPGRP`` deny, else allow;
      ``tkill``, ``tgkill``, ``rt_sigqueueinfo``, ``rt_tgsigqueueinfo``
      and ``pidfd_open``: to the check of the elders
    - each System V IPC, POSIX message-queue and io_uring call, ``setsid``,
      ``setpgid``, ``unshare`` (all of it: a runner makes no namespace after
      its filter), ``truncate`` (by path; Landlock rules it only from
      ABI 3) and ``pidfd_send_signal`` (its target a descriptor, which
      ``/proc/PID`` opens too): deny
    - without the network, ``socketpair`` of another family than
      ``AF_UNIX`` (args[0]), or whose type (args[1]'s low half,
      offset 24, its flags masked off) is not ``SOCK_STREAM`` or
      ``SOCK_SEQPACKET``: deny (a datagram pair's socket can be
      disconnected, bound to a path and sent to any socket that has one:
      a Unix socket in all but name); ``socket``, of any family: deny (no
      Unix, netlink or vsock socket, and no IP one: outside a network
      namespace Landlock's TCP rights leave TCP Fast Open's ``sendto``,
      a ``listen`` without ``bind`` and all of UDP open)
    - anything else: allow; then the check of the elders (args[0] names
      one: deny, else allow) and that of process numbers; deny is
      ``EACCES``, the program's last instruction."""
    arch = _SECCOMP_ARCHES.get(machine)
    if arch is None:
        return None
    audit_arch, x32, ipc, socket, socketpair, clone, (kill, fcntl, ioctl, prlimit), named = arch
    known = [pid for pid in elders if pid]
    deny = None  # a jump to the deny, resolved below
    enosys = ()  # a jump to the ENOSYS return, resolved below
    to_elders = object()  # a jump to the check of the elders, resolved below
    to_pids = object()  # a jump to the check of process numbers, resolved below
    p = [(_BPF_LD_W_ABS, 0, 0, 4), (_BPF_JEQ_K, 0, deny, audit_arch), (_BPF_LD_W_ABS, 0, 0, 0)]
    if x32:
        p.append((_BPF_JGE_K, deny, 0, _X32_SYSCALL_BIT))
    p += [(_BPF_JEQ_K, enosys, 0, _CLONE3),
          (_BPF_JEQ_K, 0, 4, clone),  # clone(): its flags, else on
          (_BPF_LD_W_ABS, 0, 0, 16),
          (_BPF_AND_K, 0, 0, _CLONE_DENIED),
          (_BPF_JEQ_K, 0, deny, 0),
          (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)]
    # prlimit64(): of itself only (0, or its own process id, its group's).
    p += [(_BPF_JEQ_K, 0, 4, prlimit),
          (_BPF_LD_W_ABS, 0, 0, 16),
          (_BPF_JEQ_K, 1, 0, 0),
          (_BPF_JEQ_K, 0, deny, group & 0xFFFFFFFF),
          (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)]
    # (A ``jeq`` whose two branches go to one place jumps whatever.)
    p += [(_BPF_JEQ_K, 0, 2, kill),  # kill(): its process number checked
          (_BPF_LD_W_ABS, 0, 0, 16),
          (_BPF_JEQ_K, to_pids, to_pids, 0),
          (_BPF_JEQ_K, 0, 6, fcntl),  # fcntl(): F_SETOWN's owner checked
          (_BPF_LD_W_ABS, 0, 0, 24),
          (_BPF_JEQ_K, deny, 0, _F_SETOWN_EX),
          (_BPF_JEQ_K, 0, 2, _F_SETOWN),
          (_BPF_LD_W_ABS, 0, 0, 32),
          (_BPF_JEQ_K, to_pids, to_pids, 0),
          (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
          (_BPF_JEQ_K, 0, 4, ioctl),  # ioctl(): no owner set
          (_BPF_LD_W_ABS, 0, 0, 24)]
    p.extend((_BPF_JEQ_K, deny, 0, request) for request in _IOCTLS_SETOWN)
    p.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    p.extend((_BPF_JEQ_K, to_elders, 0, nr) for nr in named)
    p.extend((_BPF_JEQ_K, deny, 0, nr) for nr in sorted(ipc))
    if not network:
        p += [(_BPF_JEQ_K, 0, 7, socketpair),  # socketpair(): Unix, its type, else on
              (_BPF_LD_W_ABS, 0, 0, 16),
              (_BPF_JEQ_K, 0, deny, _AF_UNIX),
              (_BPF_LD_W_ABS, 0, 0, 24),
              (_BPF_AND_K, 0, 0, _SOCK_TYPE_MASK),
              (_BPF_JEQ_K, 1, 0, _SOCK_STREAM),
              (_BPF_JEQ_K, 0, deny, _SOCK_SEQPACKET),
              (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
              (_BPF_JEQ_K, deny, 0, socket)]  # socket(): none, of any family
    p.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    elders_at = len(p)  # the check of the elders
    p.append((_BPF_LD_W_ABS, 0, 0, 16))
    p.extend((_BPF_JEQ_K, deny, 0, pid) for pid in known)
    p.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    pids_at = len(p)  # the check of a process number (loaded)
    p.append((_BPF_JEQ_K, deny, 0, 0xFFFFFFFF))
    p.extend((_BPF_JEQ_K, deny, 0, pid) for pid in known)
    p += [(_BPF_JEQ_K, 1, 0, -group & 0xFFFFFFFF),
          (_BPF_JSET_K, deny, 0, _NEGATIVE),
          (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
          (_BPF_RET_K, 0, 0, _SECCOMP_RET_ENOSYS),
          (_BPF_RET_K, 0, 0, _SECCOMP_RET_EACCES)]
    last = len(p) - 1

    def to(i, offset):
        if offset is deny:
            return last - i - 1
        if offset is enosys:
            return last - i - 2
        if offset is to_elders:
            return elders_at - i - 1
        if offset is to_pids:
            return pids_at - i - 1
        return offset

    return [(code, to(i, jt), to(i, jf), k) for i, (code, jt, jf, k) in enumerate(p)]


def kin(forked):
    """This process's group, and its elders for the filter's signal rules:
    its parent, and, when a zygote forked it (``forked``), the zygote's
    parent, the server (0 for one not known; a runner the server started
    has no elder but the server). Read before Landlock closes other
    processes' ``/proc`` files."""
    parent = os.getppid()
    if not forked:
        return os.getpgrp(), (parent, 0)
    try:
        with open("/proc/%d/stat" % parent, "rb") as f:
            # "PID (NAME) STATE PPID ...": a name may hold ")" and spaces.
            grandparent = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        grandparent = 0
    return os.getpgrp(), (parent, grandparent)


def _seccomp(libc, network, machine=None, kin_of=(0, (0, 0))):
    """Installs the seccomp filter (``_seccomp_program``) on this thread,
    and so on the threads and processes it starts later (``confine`` runs
    before the runner starts any), after ``no_new_privs``, which a filter
    needs without ``CAP_SYS_ADMIN``. It refuses, with ``EACCES``, what
    Landlock and the network namespace do not rule: System V IPC and POSIX
    message queues (no files), io_uring (whose operations, a socket among
    them, pass no filter), a new session or process group (``setsid``,
    ``setpgid``: a process out of its runner's group would outlive the
    runner; the runner leads its group before it confines itself),
    ``clone`` with ``CLONE_PARENT`` (a child of the runner's parent, which
    never reaps it), a new namespace (``unshare``, ``clone`` with a
    ``CLONE_NEW*`` flag: in a user namespace of its own a forked child held
    every capability), ``clone3`` with ENOSYS (glibc then uses ``clone``), and,
    without the network, new Unix sockets
    (Landlock rules no ``connect()`` to one that has a path: a root runner
    would reach ``/run/docker.sock``) and netlink ones (between runners of
    a zygote's shared namespace); ``socketpair()`` of streams and sequenced
    packets stays allowed (not of datagrams), and so do the sockets the
    runner was handed. Returns what the hello's ``syscalls``
    says."""
    import ctypes

    if machine is None:
        machine = os.uname().machine
        # A 32-bit interpreter on a 64-bit kernel: another architecture's
        # calls, which a 64-bit program would refuse all of.
        if struct.calcsize("P") != 8:
            machine += " (a 32-bit interpreter)"
    group, elders = kin_of
    program = _seccomp_program(machine, network, group, elders)
    if program is None:
        return "unconfined: no seccomp filter for this architecture (%s)" % machine
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    filters = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}:
    # native alignment pads the pointer as C does.
    fprog = ctypes.create_string_buffer(
        struct.pack("@HP", len(program), ctypes.addressof(filters)), struct.calcsize("@HP"))
    if libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0 \
            or libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), fprog,
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        return "unconfined: no seccomp filter (%s)" % os.strerror(ctypes.get_errno())
    # ``filters`` lived until here, past the call: the kernel has its copy.
    del filters
    return SYSCALLS_IPC if network else SYSCALLS_NO_SOCKETS


_CAP_NET_ADMIN = 12
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_capability(libc, cap):
    """Drops capability ``cap`` from this process's bounding, effective,
    permitted and inheritable sets (nothing to do when it has none)."""
    import ctypes

    libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(24)
    if libc.capget(header, data) != 0:
        return
    sets = list(struct.unpack("=6I", data.raw))
    word, bit = divmod(cap, 32)
    for i in range(3):
        sets[word * 3 + i] &= ~(1 << bit) & 0xFFFFFFFF
    libc.capset(header, ctypes.create_string_buffer(struct.pack("=6I", *sets), 24))


_CAP_SETPCAP = 8
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# What the hello says of a runner that dropped its capabilities, or held
# none (as the native runner says: ``sandbox::CAPABILITIES_*``).
CAPABILITIES_DROPPED = "dropped: all of them (a root runner keeps uid 0, not root's privileges)"
CAPABILITIES_NONE = "none held"


def _drop_all_capabilities(libc):
    """Drops every capability of this process, last step of confinement
    (the network namespace needed ``CAP_SYS_ADMIN``): the bounding set
    (while ``CAP_SETPCAP`` allows it), the ambient set, then the effective,
    permitted and inheritable sets. A root runner without ``--runner-user``
    keeps uid 0 but not root's privileges (kernel modules, ``setns``
    through ``/proc``, ptrace, mounts, other users' files)."""
    import ctypes

    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(24)
    if libc.capget(header, data) != 0:
        return "unconfined: cannot read them (%s)" % os.strerror(ctypes.get_errno())
    sets = struct.unpack("=6I", data.raw)
    held = any(sets)
    if sets[0] & (1 << _CAP_SETPCAP):  # effective, first word
        for cap in range(64):  # up to the first the kernel does not know
            if libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
                if ctypes.get_errno() == errno.EINVAL:
                    break
                return "unconfined: cannot drop them from the bounding set (%s)" % os.strerror(ctypes.get_errno())
    # No ambient set before Linux 4.3: nothing to clear there.
    libc.prctl(ctypes.c_int(_PR_CAP_AMBIENT), ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL),
               ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if libc.capset(header, ctypes.create_string_buffer(24)) != 0:
        return "unconfined: cannot drop them (%s)" % os.strerror(ctypes.get_errno())
    return CAPABILITIES_DROPPED if held else CAPABILITIES_NONE


# What the hello says of a runner in its zygote's shared network namespace.
NETWORK_SHARED = ("isolated: an empty network namespace shared with its zygote's other runners, "
                  "which Landlock scopes keep it from reaching")
# Landlock scopes (ABI 6): abstract Unix sockets and signals stay inside
# the runner's own Landlock domain.
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2
_SCOPES = "abstract Unix sockets and signals: its own processes only"


_SYS_OPENAT2 = 437  # the same number on every architecture
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100


def _open_path(syscall, path, strict):
    """An ``O_PATH`` descriptor of ``path``; ``strict``: without following
    a link anywhere in it (``openat2``, ``RESOLVE_NO_SYMLINKS``), so a plan
    path a plugin turned into a link since the host resolved it (where it
    may write) allows nothing rather than what the link leads to. The
    native runner's ``rules_without_links``."""
    import ctypes

    if not strict:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    how = ctypes.create_string_buffer(
        struct.pack("=QQQ", os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS), 24)
    fd = syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD),
                 ctypes.c_char_p(os.fsencode(path)), how, ctypes.c_size_t(24))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "openat2(%s)" % path)
    return fd


def _unreachable(path, code):
    """How the hello's ``unreachable`` names a plan path the runner could
    not open (the native runner's ``unreachable_path``)."""
    if code == errno.ELOOP:
        why = "a link now, which is not followed"
    else:
        why = "%s (os error %d)" % (os.strerror(code), code)
    return "%s: %s" % (path, why)


def _landlock(libc, syscall, abi, plan, network, report):
    import ctypes
    import stat

    if abi < 1:
        return "unconfined: this kernel has no Landlock (%s)" % os.strerror(-abi)
    fs_all = _fs_rights(abi)
    net = 0 if network or abi < 4 else _NET_BIND_TCP | _NET_CONNECT_TCP
    if abi >= 6:
        attr = struct.pack("=QQQ", fs_all, net, _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs_all, net)
    else:
        attr = struct.pack("=Q", fs_all)
    attr_buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), attr_buf,
                      ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        failed = os.strerror(ctypes.get_errno())
        if report.get("network") == NETWORK_SHARED:
            # Unscoped, it may not stay with the others.
            if libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0:
                report["network"] = "isolated: a network namespace of its own"
            else:
                report["network"] = "unconfined: in a network namespace shared with other runners, unscoped"
        return "unconfined: cannot create a Landlock ruleset (%s)" % failed
    file_only = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    device = _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
    # The plan's paths (the host resolved them: no link in them) are
    # opened without following links, the interpreter's own following them.
    rules = [(p, read, True) for p in plan.get("read") or []]
    rules += [(p, read, False) for p in _runtime_paths()]
    rules += [(p, fs_all, True) for p in plan.get("write") or []]
    rules += [(p, device, True) for p in plan.get("devices") or []]
    left_out = []
    try:
        for path, access, strict in rules:
            try:
                fd = _open_path(syscall, str(path), strict)
            except OSError as e:
                # Not there: nothing to allow. Otherwise (a link now, a
                # container refusing openat2) the health says why, for the
                # plan's paths (as the native runner; the interpreter's
                # own are not the plugin's to fix).
                if strict and e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    left_out.append(_unreachable(path, e.errno))
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= file_only
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs_all, fd), 12)
                if syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                           ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), "landlock_add_rule(%s): %s"
                                  % (path, os.strerror(ctypes.get_errno())))
            finally:
                os.close(fd)
        libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))
        if syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self: %s" % os.strerror(ctypes.get_errno()))
    finally:
        os.close(ruleset)
    if left_out:
        report["unreachable"] = "; ".join(left_out)
    if abi >= 6:
        report["scopes"] = _SCOPES
    return "confined: Landlock ABI %d" % abi
