"""The zygote (``--zygote``): a pre-started interpreter that forks one
runner per request, so the interpreter's start and the runner's imports
are paid once per interpreter, not once per plugin. Its messages are
described on ``_Zygote``; the host's side is
``forgesyte_loader::process::zygote``."""

import json
import os
import struct
import sys

from . import base
from .base import EXIT_PROTOCOL, EXIT_SETUP, Handover, diag, exit_now, take_stdio
from .confine import CLONE_NEWNET, confine_tools
from .main import main

# ``0`` (or ``false``, ``no``, ``off``) in the zygote's environment: no
# shared network namespace.
SHARED_NETNS_ENV = "FORGESYTE_PYTHON_SHARED_NETNS"


def _says_off(value):
    """Whether a boolean variable's value turns its feature off, as every
    FORGESYTE_* boolean reads it: ``0``, ``f``, ``false``, ``n``, ``no`` or
    ``off``, in any case (``false`` left the namespace shared)."""
    return value is not None and value.strip().lower() in ("0", "f", "false", "n", "no", "off")


def _site_dirs():
    """The site directories this interpreter read ``.pth`` files from at its
    start, each with its modification time in nanoseconds (``None``: absent),
    as ``[path, mtime]`` pairs; a path that is not UTF-8 is left out (the
    host reads JSON)."""
    try:
        import site

        dirs = site.getsitepackages()
    except Exception:  # a site module without it (an embedded build)
        return []
    found = []
    for d in dirs:
        try:
            d.encode("utf-8")
        except UnicodeError:
            continue
        try:
            found.append([d, os.stat(d).st_mtime_ns])
        except OSError:
            found.append([d, None])
    return found


# The zygote's control messages (one JSON object per SEQPACKET message) are
# at most this big.
ZYGOTE_MESSAGE_BYTES = 1 << 20
# The most descriptors a spawn carries: stdin, stdout, stderr, the
# shared-memory socket, the checked sources' and the confined environment's
# memory files (the host's ``MAX_SPAWN_FDS``).
MAX_SPAWN_FDS = 6
# ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, ``prctl(PR_SET_NAME, ...)``,
# ``prctl(PR_SET_DUMPABLE, ...)``.
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_DUMPABLE = 4


class _Zygote(object):
    """A pre-started interpreter that forks one runner per request
    (``python -c RUNNER --zygote``): the interpreter's start and the runner's
    imports are paid once per interpreter, not once per plugin.

    Its stdin is a SEQPACKET Unix socket to the host. Messages, one JSON
    object each:

    - host → zygote ``{"op": "spawn", "id": N, "argv": [...]}``
      with three descriptors (SCM_RIGHTS): the runner's stdin, stdout and
      stderr; with ``"shm_threshold": T`` a fourth, the runner's
      shared-memory socket, which stays on its own number in the child
      (close-on-exec). The zygote forks; the child puts them on fds 0, 1 and 2, leads
      a process group of its own, gets ``SIGKILL`` when the zygote dies, and
      runs ``main.main(argv, ...)`` exactly as a runner started with those arguments
      (its process name, as ``ps`` shows it, is the plugin's name).
    - zygote → host ``{"op": "spawned", "id": N, "pid": P}`` or
      ``{"op": "spawn_failed", "id": N, "error": "..."}``.
    - zygote → host ``{"op": "exit", "pid": P, "status": S}`` when a child
      ends (S: the raw wait status, as ``waitpid`` gives it). The child is
      not reaped yet, so its pid (and process group) cannot be reused while
      the host may still signal it.
    - host → zygote ``{"op": "reap", "pid": P}``: the host has recorded the
      death; the zygote reaps the child.
    - zygote → host, first, ``{"op": "site", "dirs": [[PATH, MTIME_NS or
      null], ...]}``: its site directories as they were when it started
      (see ``_site_dirs``); the host starts a new zygote for later runners
      once one of them has changed.

    The zygote forks from its one thread, before any plugin code ran in it
    (and so before CUDA could be touched), and exits at the end of its
    stdin. It never imports plugin code itself."""

    def __init__(self):
        import select
        import signal
        import _socket as socket  # see wire.shm_socket

        # What a runner imports after the fork is imported here once:
        # ``resource`` for the memory limit (an extension module, about
        # 1 ms to find and open in every runner otherwise).
        import resource  # noqa: F401

        self.select = select
        self.signal = signal
        self.socket = socket
        # The control socket moves off fd 0 (children put their stdin there).
        ctl_fd = os.dup(0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        self.ctl = socket.socket(fileno=ctl_fd)
        self.pid = os.getpid()
        self.children = set()  # forked, not reaped
        self.netns = None  # the runners' shared network namespace (a fd)
        self.confine_tools = None  # for the confined runners: see base.Handover
        self.netns_tried = False
        self.reported = set()  # their exits told to the host
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        try:
            import ctypes

            self.libc = ctypes.CDLL(None, use_errno=True)
        except Exception as e:  # no ctypes: the runner's parent watch remains
            diag("zygote: no parent-death signal for runners: %s" % e)
            self.libc = None

    def send(self, message):
        try:
            self.ctl.send(json.dumps(message).encode("utf-8"))
        except OSError:
            exit_now(0)  # the host is gone

    def serve(self):
        import gc

        # The host replaces a zygote whose site directories changed (a
        # package installed or removed since its start): their ``.pth``
        # files, which an editable install's import hook lives in, are read
        # only at an interpreter's start.
        self.send({"op": "site", "dirs": _site_dirs()})
        # What is loaded now is shared by every runner: the collector
        # leaves it alone, so the pages stay shared after fork.
        gc.freeze()
        ctl = self.ctl.fileno()
        while True:
            try:
                ready, _, _ = self.select.select([ctl, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            self.report_exits()
            if ctl in ready:
                self.receive()

    def receive(self):
        socket = self.socket
        fd_size = struct.calcsize("i")
        try:
            data, ancdata, flags, _ = self.ctl.recvmsg(
                ZYGOTE_MESSAGE_BYTES, socket.CMSG_SPACE(MAX_SPAWN_FDS * fd_size))
        except InterruptedError:
            return
        except OSError as e:
            diag("zygote: reading the control socket: %s" % e)
            exit_now(0)
        fds = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fd_size
                fds.extend(struct.unpack("%di" % (usable // fd_size), payload[:usable]))
        for fd in fds:
            os.set_inheritable(fd, False)
        if not data:
            for fd in fds:
                os.close(fd)
            exit_now(0)  # the host closed its end
        try:
            message = json.loads(data.decode("utf-8"))
            op = message.get("op")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("a truncated message")
            if op == "reap":
                self.reap(int(message["pid"]))
            elif op == "spawn":
                self.spawn(message, fds)
            else:
                raise ValueError("unknown op %r" % (op,))
        # (Any error of the message's: a number too large for an int, JSON
        # nested past the recursion limit, ...)
        except Exception as e:
            diag("zygote: a bad control message: %s: %s" % (type(e).__name__, e))
            exit_now(EXIT_PROTOCOL)
        finally:
            # The runner has its copies (or there is none): a copy left
            # here would keep its pipes open after it dies.
            for fd in fds:
                os.close(fd)

    def spawn(self, message, fds):
        rid = message["id"]
        argv = [str(a) for a in message["argv"]]
        threshold = message.get("shm_threshold")
        env_fd = bool(message.get("env_fd"))
        sources_fd = bool(message.get("sources_fd"))
        expected = 3 + (threshold is not None) + env_fd + sources_fd
        if len(fds) != expected:
            self.send({"op": "spawn_failed", "id": rid,
                       "error": "%d descriptors came with the request, %d expected" % (len(fds), expected)})
            return
        if not self.netns_tried and "--confine" in argv:
            self.netns_tried = True
            if self.libc is not None:
                # Made once here, not once per runner after the fork.
                self.confine_tools = confine_tools(self.libc)
            self.netns = self.shared_netns()
        try:
            pid = os.fork()
        except OSError as e:
            self.send({"op": "spawn_failed", "id": rid, "error": "fork: %s" % e})
            return
        if pid == 0:
            self.become_runner(argv, fds, threshold, env_fd, sources_fd)  # never returns
        try:
            # Both sides set the group, so no signal to it can come first.
            os.setpgid(pid, pid)
        except OSError:
            pass  # it exec'd or died already; the child set it itself
        self.children.add(pid)
        self.send({"op": "spawned", "id": rid, "pid": pid})

    def shared_netns(self):
        """An empty network namespace for the confined runners to join
        (``setns`` costs a fraction of making one each), made once: the
        zygote unshares into a new one, keeps a descriptor of it, and goes
        back to its own. None where the kernel's Landlock cannot scope
        runners apart (ABI < 6), the zygote may not make one (no
        CAP_SYS_ADMIN) or ``FORGESYTE_PYTHON_SHARED_NETNS=0``: each runner
        then makes one of its own."""
        import ctypes

        libc = self.libc
        if libc is None or self.confine_tools is None or _says_off(os.environ.get(SHARED_NETNS_ENV)):
            return None
        _, _, abi = self.confine_tools
        if abi < 6:
            return None
        try:
            own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if libc.unshare(ctypes.c_int(CLONE_NEWNET)) != 0:
                return None
            try:
                shared = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                if libc.setns(ctypes.c_int(own), ctypes.c_int(CLONE_NEWNET)) != 0:
                    # Not back in the host's namespace: runners that were
                    # given the network would not have it.
                    diag("zygote: cannot go back to its network namespace: %s"
                          % os.strerror(ctypes.get_errno()))
                    exit_now(EXIT_SETUP)
            return shared
        except OSError:
            return None
        finally:
            os.close(own)

    def become_runner(self, argv, fds, shm_threshold=None, env_fd=False, sources_fd=False):
        handover = Handover(None, netns=self.netns, confine_tools=self.confine_tools, forked=True)
        try:
            self.signal.set_wakeup_fd(-1)
            self.signal.signal(self.signal.SIGCHLD, self.signal.SIG_DFL)
            self.ctl.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            os.setpgid(0, 0)
            if self.libc is not None:
                handover.parent_death_signal = self.libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) == 0
                # ``ps``/``top`` show the plugin's name, not the zygote's
                # command line (which every forked runner shares).
                if "--plugin" in argv[:-1]:
                    name = argv[argv.index("--plugin") + 1].encode("utf-8", "replace")[:15]
                    self.libc.prctl(_PR_SET_NAME, name, 0, 0, 0)
            if os.getppid() != self.pid:
                os._exit(0)  # the zygote died already
            if env_fd:
                # The values of its confined environment: read here, in the
                # runner only (the zygote never reads them).
                fd = fds.pop()
                with os.fdopen(fd, "rb") as f:
                    f.seek(0)  # the host wrote it: its offset is at the end
                    handover.env = json.loads(f.read(ZYGOTE_MESSAGE_BYTES).decode("utf-8"))
            if sources_fd:
                # The checked sources' memory file stays where it is (above
                # 2); the runner reads it as a runner started on its own does.
                argv = argv + ["--sources-fd", str(fds.pop())]
            if len(fds) == 4:
                # The shared-memory socket stays where it is (above 2).
                handover.shm = (fds.pop(), int(shm_threshold))
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            sys.argv[1:] = argv
            handover.proto_fds = take_stdio()
        except BaseException as e:
            diag("zygote: cannot set up a runner: %s" % e)
            os._exit(EXIT_SETUP)
        try:
            main(argv, handover)
        except SystemExit as e:
            exit_now(e.code if isinstance(e.code, int) else 1)
        except BaseException as e:
            diag("runner: %s: %s" % (type(e).__name__, e))
            exit_now(EXIT_SETUP)
        exit_now(0)

    def report_exits(self):
        for pid in list(self.children - self.reported):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                self.children.discard(pid)
                continue
            if info is None or info.si_pid == 0:
                continue
            if info.si_code == os.CLD_EXITED:
                status = (info.si_status & 0xFF) << 8
            elif info.si_code == os.CLD_DUMPED:
                status = info.si_status | 0x80
            else:
                status = info.si_status
            self.reported.add(pid)
            self.send({"op": "exit", "pid": pid, "status": status})

    def reap(self, pid):
        if pid in self.children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.children.discard(pid)
            self.reported.discard(pid)


def zygote_main(confined=False):
    """The zygote; ``confined``: of confined runners (the host started it
    with their runtime's variables only)."""
    base.plugin_name = "zygote"
    try:
        zygote = _Zygote()
    except Exception as e:
        diag("cannot set up: %s" % e)
        exit_now(EXIT_SETUP)
    if confined:
        # Not dumpable: its memory (what every later runner starts from)
        # and its /proc files are root's, closed to the runners of a user
        # that is not root, whether or not Landlock rules them. A zygote
        # that cannot be does not serve.
        if zygote.libc is None:
            diag("cannot make itself not dumpable: no ctypes")
            exit_now(EXIT_SETUP)
        import ctypes

        if zygote.libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            diag("cannot make itself not dumpable: %s" % os.strerror(ctypes.get_errno()))
            exit_now(EXIT_SETUP)
    zygote.serve()
