"""What every part of the runner shares: its exit codes, its diagnostics
on stderr, how it ends, and where its own code lives. Knows nothing of the
protocol, of plugins or of the zygote."""

import os
import sys

EXIT_USAGE = 64
EXIT_PROTOCOL = 65
EXIT_SETUP = 71
# The interpreter ran out of memory (under the memory limit, as a rule):
# the process is no longer trustworthy, so it ends, and the host reports a
# crash ("exceeded memory limit" when one is set) rather than a tool error.
EXIT_MEMORY = 70
# The runner's own descriptors to the host were closed, or other files put
# under their numbers, from inside the process (a plugin that closed
# descriptors it had not opened). Its stderr is as a rule closed with
# them, so the code is all it can say.
EXIT_CHANNEL = 74

MIB = 1024 * 1024

# The runner package's directory when it was imported from files (the
# host's cache, or the source tree under test); None when the host ran it
# from source (``python -c``), its modules then named
# ``<forgesyte_runner/NAME.py>``.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else None
# The same as its code objects name it: as the ``sys.path`` entry was
# written (``/a//b``, ``..``), which ``abspath`` does not keep.
_PACKAGE_DIRS = tuple(sorted(
    {os.path.dirname(__file__), PACKAGE_DIR}) if PACKAGE_DIR is not None else ())
SOURCE_PREFIX = "<forgesyte_runner/"

# The plugin's name, as diagnostics show it (set once the command line is
# read).
plugin_name = "plugin"


def is_runner_file(filename):
    """Whether a traceback frame's file is one of the runner's own."""
    if filename.startswith(SOURCE_PREFIX):
        return True
    return any(filename.startswith(d + os.sep) for d in _PACKAGE_DIRS if d)


def diag(text, warning=False):
    """A diagnostic line of the runner's own on stderr (fd 2); with
    ``warning``, one the server logs at WARN (as a ``logging`` record's
    ``WARNING `` prefix says), else at INFO."""
    line = "%sforgesyte-python-runner[%s]: %s\n" % ("WARNING " if warning else "", plugin_name, text)
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def exit_now(code):
    """Ends the process now: no interpreter shutdown, so threads that a
    plugin started (daemon or not) cannot keep it alive."""
    for stream in (sys.stdout, sys.__stdout__, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def out_of_memory(error, where, *args):
    """Ends the runner as out of memory (``EXIT_MEMORY``): the host records
    a crash that names the memory limit, whether the plugin ran out while
    it was imported, constructed or called. The traceback goes first, and
    with it the plugin's frames and what they hold, so the diagnostic
    (``where % args``, then the error's own message) has memory to be
    written in; the exit happens even if it has not."""
    try:
        error.__traceback__ = None
        detail = str(error)
        diag("MemoryError: out of memory %s%s%s" % (where % args, ": " + detail if detail else "", _limit_note()))
    except BaseException:
        pass
    finally:
        exit_now(EXIT_MEMORY)


# How the memory line names the address-space limit in force; the host
# reads it back (``process/exit.rs``, ``stated_limit_mib``).
LIMIT_NOTE = " [address-space limit %d MiB]"


def _limit_note():
    """``LIMIT_NOTE`` with the address-space limit in force, for the host
    to name the one the process ran into: the host's, or a lower one the
    plugin set itself. Empty without a limit, or when ``resource`` was
    never imported (nothing set a limit then; importing it now could fail
    for want of memory)."""
    resource = sys.modules.get("resource")
    if resource is None:
        return ""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY or soft < MIB:
        return ""
    return LIMIT_NOTE % (soft // MIB)


def raised_by_a_statement(error):
    """Whether ``error`` came from a ``raise`` statement with a message
    (``raise MemoryError("frame too large")``, a plugin's refusal) rather
    than from an allocation that failed (the interpreter's or a C
    extension's, numpy's ``_ArrayMemoryError`` among them, raised inside a
    call): the innermost frame of its traceback stopped at a
    ``RAISE_VARARGS`` instruction. An allocation all the same: one without
    a message (``raise MemoryError``, or the interpreter's own, failing to
    make the exception a ``raise`` names by its class), one whose cause or
    context is an allocation (``raise MemoryError("...") from e``), and one
    a bare ``raise`` re-raises (the allocation's frame stays innermost).
    Anything that cannot be told (no traceback, ``opcode`` not importable
    with no memory left) is an allocation."""
    try:
        if not error.args or not _at_a_raise(error):
            return False
        # Every exception it was raised from or while handling, both links.
        seen, waiting = {id(error)}, [error.__cause__, error.__context__]
        while waiting:
            chained = waiting.pop()
            if chained is None or id(chained) in seen:
                continue
            seen.add(id(chained))
            if isinstance(chained, MemoryError) and not (chained.args and _at_a_raise(chained)):
                return False
            waiting += [chained.__cause__, chained.__context__]
        return True
    except BaseException:
        return False


def innermost_traceback(error):
    """The innermost entry of ``error``'s traceback (where it was raised),
    or None when it has none."""
    tb = error.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _at_a_raise(error):
    """Whether the innermost frame of ``error``'s traceback stopped at a
    ``RAISE_VARARGS`` instruction (raises what cannot be told)."""
    tb = innermost_traceback(error)
    if tb is None:
        return False
    import opcode

    return tb.tb_frame.f_code.co_code[tb.tb_lasti] == opcode.opmap["RAISE_VARARGS"]


def out_of_memory_unless_raised(error, where, *args):
    """``out_of_memory`` for a ``MemoryError`` that plugin code let
    through, unless a ``raise`` statement made it: that one returns, and the
    caller reports it as the plugin's exception like any other."""
    if isinstance(error, MemoryError) and not raised_by_a_statement(error):
        out_of_memory(error, where, *args)


def take_stdio(out=None):
    """Moves the protocol off fds 0 and 1: returns the private (in, out)
    descriptors, both close-on-exec. fd 1 becomes a copy of stderr, fd 0
    reads /dev/null. ``out``: the descriptor the protocol is written to
    when it is not fd 1 (a runner the host started itself writes it to a
    descriptor of its own, so that what the interpreter's start-up prints
    cannot reach it)."""
    if out is None:
        out = os.dup(1)
    os.set_inheritable(out, False)
    os.dup2(2, 1)
    # Flushed once fd 1 is the log: what start-up code (a ``.pth`` file,
    # ``sitecustomize``) left buffered goes there, not into the protocol.
    try:
        sys.stdout.flush()
    except Exception:
        pass
    inp = os.dup(0)
    os.set_inheritable(inp, False)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    # Language-level stdout is rebound to the log; stderr flushes per line
    # (Python < 3.9 buffers a non-interactive stderr).
    sys.stdout = sys.stderr
    try:
        sys.stderr.reconfigure(line_buffering=True)
    except Exception:
        pass
    return inp, out


class Handover(object):
    """What a runner starts with besides its command line: its protocol
    descriptors (in, out) and, in a runner its zygote forked, what the
    zygote prepared for it."""

    __slots__ = ("proto_fds", "parent_death_signal", "shm", "netns", "confine_tools", "env",
                 "forked")

    def __init__(self, proto_fds, parent_death_signal=False, shm=None, netns=None,
                 confine_tools=None, env=None, forked=False):
        self.proto_fds = proto_fds
        # Whether a zygote forked this runner (its parent is the zygote,
        # the zygote's the server).
        self.forked = forked
        # The kernel SIGKILLs this process when the zygote dies: then no
        # thread needs to watch the parent.
        self.parent_death_signal = parent_death_signal
        # (descriptor, threshold) of the shared-memory socket the zygote
        # passed; None: from the environment, if any.
        self.shm = shm
        # A descriptor of the network namespace the zygote made for its
        # confined runners (see ``confine.confine``), or None.
        self.netns = netns
        # (libc, its ``syscall`` set up, this kernel's Landlock ABI), made
        # once in the zygote before the fork, or None.
        self.confine_tools = confine_tools
        # The values of the confined environment (name -> value) that the
        # zygote's spawn passed; None: this process's own environment.
        self.env = env
