"""One runner's life: set-up (command line, memory limit, confinement,
logging), the plugin's import, the hello, then serving requests
(``serve.Runner``)."""

import os
import sys
import threading
import time

from . import api, base
from .args import USAGE, UsageError, parse_args
from .base import EXIT_SETUP, EXIT_USAGE, MIB, diag, exit_now
from .errors import wire_error
from .confine import confine, unconfined
from .loading import import_plugin
from .serve import Runner
from .wire import Wire, shm_socket

PROTOCOL_VERSION = 2
CAPABILITIES = ["attachments", "concurrent_calls"]
PARENT_POLL_S = 0.1
# The stack of each thread the runner starts (calls in progress).
THREAD_STACK_BYTES = 4 * MIB


def limit_memory(mib):
    """Caps the address space (soft and hard) at ``mib`` MiB."""
    import resource

    limit = mib * MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def protect_in_forks(fds):
    """A process the plugin forks without exec (``os.fork``,
    ``multiprocessing``'s fork start method) gets ``/dev/null`` on the
    protocol's descriptors ``fds``: holding the runner's stdout, it kept the
    host from seeing the runner's death (the end of that pipe) for as long
    as it lived, and writing there, it broke the protocol. (A ``fork`` from
    C without ``exec`` is not seen.)"""

    def after_fork_in_child():
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        for fd in fds:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
        os.close(null)

    os.register_at_fork(after_in_child=after_fork_in_child)


def watch_parent():
    """The fallback to the parent-death signal: ends the process when its
    parent is no longer the one it started with."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                diag("the host is gone; exiting")
                exit_now(0)

    threading.Thread(target=loop, name="forgesyte-parent-watch", daemon=True).start()


def dump_stacks_on_signal():
    """Has ``faulthandler`` write every thread's stack to stderr on
    SIGUSR2, from its C signal handler: it works while a plugin's code is
    stuck in C (a lock, a socket, a C extension's loop) too. The host sends
    it before it kills the runner for a timeout, and reads where the
    plugin's code was. Returns the signal's number, for the hello; None
    when it cannot be set up (the host then says nothing of where)."""
    import faulthandler
    import signal

    try:
        faulthandler.register(signal.SIGUSR2, file=2, all_threads=True, chain=False)
    except (AttributeError, OSError, RuntimeError, ValueError) as e:
        diag("cannot set up the stack dump: %s" % e)
        return None
    return int(signal.SIGUSR2)


def shrug_off_group_signals():
    """A handler that does nothing for SIGTERM, SIGHUP and SIGINT: the
    host stops a runner by closing its input and kills it with SIGKILL, and
    a program a plugin starts may signal its whole process group, which is
    the runner's (a confined runner's processes cannot leave it: coreutils'
    ``timeout`` sends SIGTERM to its group when time runs out). A handler,
    not ``SIG_IGN``: a program the plugin execs starts with the default,
    and a process it forks without exec (``multiprocessing``'s workers,
    which ``terminate()`` stops with SIGTERM) is given the default back."""
    import signal

    signals = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    for sig in signals:
        signal.signal(sig, _shrug)

    def after_fork_in_child():
        for sig in signals:
            try:
                if signal.getsignal(sig) is _shrug:
                    signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # not the main thread: left as it is

    os.register_at_fork(after_in_child=after_fork_in_child)


def _shrug(signum, frame):
    pass


def main(argv, handover):
    """Runs the runner of ``argv`` (its command line) with what
    ``handover`` (a ``base.Handover``) gives it; never returns."""
    fd_in, fd_out = handover.proto_fds
    try:
        args = parse_args(argv)
    except UsageError as e:
        diag("%s\n%s" % (e, USAGE))
        exit_now(EXIT_USAGE)
    base.plugin_name = args.plugin
    # Before confinement may replace the environment.
    try:
        shm = shm_socket(handover.shm)
    except (OSError, ValueError) as e:
        diag("cannot take the shared-memory socket: %s" % e)
        exit_now(EXIT_SETUP)
    # A thread per call in progress: at the default 8 MiB of stack each,
    # the memory limit's address space ran out at about 50 of them, below
    # the host's calls-per-plugin limit (64 take 256 MiB at 4 MiB). Not less:
    # at 2 MiB some deep recursions through C (``sorted(key=...)`` calling
    # itself) crash the interpreter before Python raises RecursionError.
    try:
        threading.stack_size(THREAD_STACK_BYTES)
    except (ValueError, RuntimeError) as e:
        diag("cannot set the threads' stack size: %s" % e)
    stack_signal = dump_stacks_on_signal()
    if args.memory_limit_mb > 0:
        try:
            limit_memory(args.memory_limit_mb)
        except Exception as e:
            diag("cannot set the memory limit of %d MiB: %s" % (args.memory_limit_mb, e))
            exit_now(EXIT_SETUP)
    # Before any thread starts: Landlock and the network namespace hold for
    # the thread that asks and the threads it starts after.
    confinement = None
    if args.confine is not None:
        try:
            confinement = confine(args.confine, handover.netns, handover.confine_tools, handover.env,
                                  handover.forked)
        except Exception as e:
            diag("cannot confine the runner: %s: %s" % (type(e).__name__, e))
            exit_now(EXIT_SETUP)
    elif handover.netns is not None:
        os.close(handover.netns)
    protect_in_forks([fd_in, fd_out] + ([shm[0].fileno()] if shm is not None else []))
    shrug_off_group_signals()
    if not handover.parent_death_signal:
        watch_parent()
    api.setup_logging(args.log_level)
    api.install_api()
    wire = Wire(fd_in, fd_out, shm)
    runner = Runner(args, wire, None)
    runner.confinement = confinement
    why = unconfined(confinement) if args.confine is not None and args.confine.get("required") else None
    if why is not None:
        # Required and not wholly enforced: the plugin is not imported.
        message = "the plugin's runner could not confine itself: %s" % why
        diag("confinement is required: %s" % message)
        runner.answer({"type": "import_failed", "error": wire_error("NotConfined", message)})
        exit_now(0)
    module = import_plugin(args)
    if isinstance(module, dict):
        diag("import failed: %s: %s" % (module.get("error_type", module["kind"]), module["message"]))
        runner.answer({"type": "import_failed", "error": module})
        exit_now(0)
    runner.module = module
    hello = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "runtime": "python",
        "runtime_version": sys.version.split()[0],
        "pid": os.getpid(),
        "capabilities": list(CAPABILITIES) + (["shared_memory"] if shm is not None else []),
    }
    if confinement is not None:
        hello["confinement"] = confinement
    if stack_signal is not None:
        hello["stack_signal"] = stack_signal
    runner.answer(hello)
    runner.serve()
