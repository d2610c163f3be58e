#!/usr/bin/env python3
"""ForgeSyte Python plugin runner: one plugin, in its own process.

The ForgeSyte host starts this program under the plugin's own interpreter
and speaks the child-process wire protocol, version 2, with it: requests
on stdin, answers on the original stdout, log lines on stderr. The protocol
is specified in ``crates/forgesyte-protocol/PROTOCOL.md``, whose Rust
rendering is ``forgesyte_protocol::wire``; this file is the Python side
of it and mirrors the native runner (``forgesyte_loader::process::runner``):

1. Moves the protocol off fd 1 before anything else: the original stdout is
   duplicated to a private close-on-exec descriptor for frames and fd 1 is
   pointed at stderr, so ``print()`` in plugins (and C code writing to fd 1)
   lands in the log instead of corrupting the protocol. stdin gets the same
   treatment (a private descriptor; fd 0 becomes /dev/null), so a plugin
   that reads stdin cannot steal request bytes.
2. Sets ``RLIMIT_AS`` when given ``--memory-limit-mb N`` (N > 0).
3. Watches its parent every 100 ms; if the host goes, exits 0.
4. Imports the plugin's code and sends ``hello``, or ``import_failed`` and
   exits 0.
5. Reads requests; each one runs on its own thread (answers may come out of
   order: capability ``concurrent_calls``); answers are written whole under
   one lock. Attachments of a ``call`` reach the plugin as ``bytes`` at
   their JSON Pointers; ``bytes`` in a result leave as attachments.
   When the host passes a shared-memory socket (``FORGESYTE_SHM_FD``, or a
   zygote's fourth descriptor), large attachments travel as sealed memory
   files (PROTOCOL.md §3.1) both ways; a tool whose spec says
   ``"zero_copy": True`` gets them as read-only ``memoryview`` objects over
   the mapping instead of ``bytes``.
6. Exits 0 at the end of stdin (after ``on_unload()``, given at most 1.5 s),
   65 when the host breaks the protocol, 64 on a bad command line, 71 when
   the protocol or the memory limit cannot be set up.

Standard library only; Python 3.8 or later.

Command line::

    runner.py --plugin NAME --plugin-dir DIR (--file PATH | --module DOTTED[:CLASS])
              [--class NAME] [--memory-limit-mb N] [--installed]

``--file`` loads a seed-layout plugin (``plugin.py`` in the plugin
directory; ``--library`` is accepted as another spelling of it, and
``--plugin-dir`` then defaults to the file's directory); ``--module``
imports a package module (``forgesyte_ocr.plugin`` or
``forgesyte_ocr.plugin:OCRPlugin``).
"""

import os
import sys

EXIT_USAGE = 64
EXIT_PROTOCOL = 65
EXIT_SETUP = 71
# The interpreter ran out of memory (under the memory limit, as a rule):
# the process is no longer trustworthy, so it ends, and the host reports a
# crash ("exceeded memory limit" when one is set) rather than a tool error.
EXIT_MEMORY = 70

PROTOCOL_VERSION = 2
CAPABILITIES = ["attachments", "concurrent_calls"]
# The largest request frame accepted (the native runner's limit).
MAX_REQUEST_BYTES = 1 << 31
# The largest body a frame can announce (its length is a u32).
MAX_FRAME_BYTES = (1 << 32) - 1
PARENT_POLL_S = 0.1
# How long on_unload() may run at the end of stdin: under the host's 2 s
# between closing stdin and SIGKILL (PROTOCOL.md §8, Stop), so a runner
# whose on_unload() hangs still exits by itself, code 0.
UNLOAD_GRACE_S = 1.5
# How often the watch thread looks whether the reader is still in the same
# call (and so makes another thread the reader), and how many ticks without
# a call it waits before it sleeps (see `Runner.serve`).
HANDOVER_TICK_S = 0.001
HANDOVER_QUIET_TICKS = 100
TRACEBACK_LINES = 10
MIB = 1024 * 1024
# Request bodies up to this size are read into one buffer allocated up
# front; larger ones grow as bytes arrive, so a garbage length does not
# allocate gigabytes before the stream ends.
READ_PREALLOCATE = 64 * MIB
# Request frames up to this size are read in one call.
SMALL_FRAME_BYTES = 64 * 1024

USAGE = (
    "usage: runner.py --plugin NAME --plugin-dir DIR "
    "(--file PATH | --module DOTTED[:CLASS]) [--class NAME] [--memory-limit-mb N]"
)

# The host runs this file's source with ``python -c`` (it ships inside the
# server binary), so there may be no ``__file__``: then frames of the
# runner's own code are named "<string>".
_SELF = os.path.abspath(__file__) if "__file__" in globals() else "<string>"
# How tracebacks may name this file (as started, and absolute).
_SELF_NAMES = frozenset([globals().get("__file__", "<string>"), _SELF])
_plugin_name = "plugin"
# Set by a zygote's child once the kernel will SIGKILL it when the zygote
# dies: then no thread needs to watch the parent.
_PARENT_DEATH_SIGNAL = False
# A zygote's child: (descriptor, threshold) of its shared-memory socket.
_SHM_PASSED = None
# ``0`` in the zygote's environment: no shared network namespace.
SHARED_NETNS_ENV = "FORGESYTE_PYTHON_SHARED_NETNS"
# In a runner its zygote forked: a descriptor of the network namespace the
# zygote made for its confined runners (see ``confine``).
_SHARED_NETNS = None
# In a runner its zygote forked for confinement: (libc, its ``syscall`` set
# up, this kernel's Landlock ABI), made once in the zygote before the fork.
_CONFINE_TOOLS = None
SHM_FD_ENV = "FORGESYTE_SHM_FD"
SHM_THRESHOLD_ENV = "FORGESYTE_SHM_THRESHOLD"
SHM_MAX_PER_FRAME = 64
MEMFD_NAME = "forgesyte-attachment"
# fcntl seals (linux/fcntl.h), for Pythons whose fcntl module lacks them.
_F_ADD_SEALS, _F_GET_SEALS = 1033, 1034
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW, _F_SEAL_WRITE = 1, 2, 4, 8


def _diag(text):
    """A diagnostic line of the runner's own on stderr (fd 2)."""
    line = "forgesyte-python-runner[%s]: %s\n" % (_plugin_name, text)
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _exit(code):
    """Ends the process now: no interpreter shutdown, so threads that a
    plugin started (daemon or not) cannot keep it alive."""
    for stream in (sys.stdout, sys.__stdout__, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _out_of_memory(error, where, *args):
    """Ends the runner as out of memory (``EXIT_MEMORY``): the host records
    a crash that names the memory limit, whether the plugin ran out while
    it was imported, constructed or called. The traceback goes first, and
    with it the plugin's frames and what they hold, so the diagnostic
    (``where % args``, then the error's own message) has memory to be
    written in; the exit happens even if it has not."""
    try:
        error.__traceback__ = None
        detail = str(error)
        _diag("MemoryError: out of memory %s%s" % (where % args, ": " + detail if detail else ""))
    except BaseException:
        pass
    finally:
        _exit(EXIT_MEMORY)


def _check_name(instance, served):
    """ForgeSyte's ``BasePlugin`` carries a ``name`` (a class or an instance
    attribute), under which ForgeSyte's server registered the plugin. This
    host names a plugin before any of its code runs (``served``: its
    manifest's ``id``, else its ``name``, else its entry point's or
    directory's), so a ``name`` that says otherwise is logged for the author
    to make the two agree."""
    try:
        declared = getattr(instance, "name", None)
    except Exception:  # a property of the plugin's own that raises
        return
    if isinstance(declared, str) and declared and isinstance(served, str) and declared != served:
        _diag("the plugin's name attribute says %r, but it is served as %r "
              "(its manifest's id or name, else its entry point's or directory's)" % (declared, served))


def _take_stdio():
    """Moves the protocol off fds 0 and 1: returns the private (in, out)
    descriptors, both close-on-exec. fd 1 becomes a copy of stderr, fd 0
    reads /dev/null."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    out = os.dup(1)
    os.set_inheritable(out, False)
    os.dup2(2, 1)
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


# Step 1, before anything else runs (imported as a module, e.g. by tests,
# the file leaves the process's descriptors alone).
_PROTO_FDS = None
# ``--zygote``: this process forks runners instead of being one (see
# `zygote_main`); its descriptors are the zygote's own.
_ZYGOTE = __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]
if __name__ == "__main__" and not _ZYGOTE:
    try:
        _PROTO_FDS = _take_stdio()
    except Exception as e:  # only with broken descriptors
        _diag("cannot set up the protocol pipe: %s" % e)
        _exit(EXIT_SETUP)


# Only what every runner needs: a zygote imports these once for all its
# runners, but a runner started on its own pays for each (``inspect`` and
# ``dataclasses`` are imported where they are used, by the few plugins that
# need them).
import base64  # noqa: E402
import contextvars  # noqa: E402
import fcntl  # noqa: E402
import importlib  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

# The frame's fixed parts (PROTOCOL.md §2): the length, then the header's
# length and the attachment count.
_U32 = struct.Struct("<I")
_FRAME_TABLE = struct.Struct("<II")
_FRAME_HEAD = struct.Struct("<III")


class UsageError(Exception):
    pass


class ProtocolError(Exception):
    """The host broke the protocol: the runner exits 65."""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class Args(object):
    def __init__(self):
        self.plugin = "plugin"
        self.plugin_dir = None
        self.file = None
        self.module = None
        self.class_name = None
        self.memory_limit_mb = 0
        # The sandbox the host asks for (``--confine JSON``), None: none.
        self.confine = None
        # An installed package is importable already: its directory must not
        # go first on sys.path, where its files would shadow the standard
        # library (a package's own ``statistics.py``, say).
        self.installed = False


def parse_args(argv):
    args = Args()
    it = iter(argv)
    module_class = None
    for arg in it:

        def value(flag=arg):
            try:
                return next(it)
            except StopIteration:
                raise UsageError("%s needs a value" % flag)

        if arg == "--plugin":
            args.plugin = value()
        elif arg == "--plugin-dir":
            args.plugin_dir = value()
        elif arg in ("--file", "--library"):
            if args.file is not None:
                raise UsageError("--file given twice")
            args.file = value()
        elif arg == "--module":
            if args.module is not None:
                raise UsageError("--module given twice")
            spec = value()
            dotted, sep, cls = spec.partition(":")
            if not dotted or (sep and not cls) or not all(
                part.isidentifier() for part in dotted.split(".")
            ) or (cls and not cls.isidentifier()):
                raise UsageError("--module: not a DOTTED[:CLASS] name: %r" % spec)
            args.module = dotted
            module_class = cls or None
        elif arg == "--class":
            cls = value()
            if not cls.isidentifier():
                raise UsageError("--class: not a class name: %r" % cls)
            args.class_name = cls
        elif arg == "--installed":
            args.installed = True
        elif arg == "--memory-limit-mb":
            v = value()
            if not (v.isascii() and v.isdigit()):
                raise UsageError("--memory-limit-mb: not a number: %r" % v)
            args.memory_limit_mb = int(v)
        elif arg == "--confine":
            try:
                confine = json.loads(value())
            except ValueError as e:
                raise UsageError("--confine: not JSON: %s" % e)
            if not isinstance(confine, dict):
                raise UsageError("--confine: not a JSON object")
            args.confine = confine
        else:
            raise UsageError("unexpected argument %r" % arg)
    if (args.file is None) == (args.module is None):
        raise UsageError("give exactly one of --file PATH and --module DOTTED[:CLASS]")
    if module_class is not None:
        if args.class_name is not None and args.class_name != module_class:
            raise UsageError("the class is given twice: %s and %s" % (module_class, args.class_name))
        args.class_name = module_class
    if args.file is not None:
        if args.plugin_dir is None:
            args.plugin_dir = os.path.dirname(os.path.abspath(args.file))
        args.file = os.path.join(args.plugin_dir, args.file)
    return args


# ---------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------


# The stack of each thread the runner starts (calls in progress).
THREAD_STACK_BYTES = 4 * MIB


def limit_memory(mib):
    """Caps the address space (soft and hard) at ``mib`` MiB."""
    import resource

    limit = mib * MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def watch_parent():
    """The fallback to the parent-death signal: ends the process when its
    parent is no longer the one it started with."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                _diag("the host is gone; exiting")
                _exit(0)

    threading.Thread(target=loop, name="forgesyte-parent-watch", daemon=True).start()


# ---------------------------------------------------------------------------
# The call's context
# ---------------------------------------------------------------------------


class CallContext(object):
    """Who a tool call is for (PROTOCOL.md §5.4, ``context``): the HTTP
    request's id and its W3C ``traceparent`` (with its ``trace_id``), each
    ``None`` when the host sent none."""

    __slots__ = ("request_id", "traceparent", "trace_id")

    def __init__(self, request_id=None, traceparent=None):
        self.request_id = request_id
        self.traceparent = traceparent
        # The host sends only valid ones: 00-<32 hex>-<16 hex>-<2 hex>.
        self.trace_id = traceparent[3:35] if traceparent else None

    def __repr__(self):
        return "CallContext(request_id=%r, traceparent=%r)" % (self.request_id, self.traceparent)


# Set for the duration of each call on the thread that runs it; asyncio
# tasks of the call inherit it, and so do threads started with
# ``contextvars.copy_context().run``.
_CALL = contextvars.ContextVar("forgesyte_call", default=None)


def current_call():
    """The context of the tool call this code runs in (a ``CallContext``),
    or ``None`` outside a call or when the host sent none. Plugins use it
    as ``from forgesyte_runner import current_call``."""
    return _CALL.get()


# The manifest's models, name -> absolute path, as the host resolved and
# checked them: set from the create message, before the plugin is
# constructed.
_MODELS = {}


def models():
    """The plugin's models: its manifest's ``models``, each path resolved
    against the plugin directory and checked to exist by the host before
    the plugin was constructed (a dict, name -> absolute path; a copy).
    Plugins use it as ``from forgesyte_runner import models``, in
    ``__init__`` as in a tool."""
    return dict(_MODELS)


def _call_context(message):
    """The ``CallContext`` of a call message, or ``None``."""
    context = message.get("context")
    if context is None:
        return None
    request_id = context.get("request_id")
    traceparent = context.get("traceparent")
    if request_id is None and traceparent is None:
        return None
    return CallContext(request_id, traceparent)


def _install_api():
    """Makes ``import forgesyte_runner`` work in plugin code (before the
    plugin's import): the runner's API for plugins, whichever way the
    runner itself was started."""
    api = types.ModuleType("forgesyte_runner")
    api.__doc__ = "What the ForgeSyte Python runner offers plugins."
    api.CallContext = CallContext
    api.current_call = current_call
    api.models = models
    sys.modules["forgesyte_runner"] = api


LOG_TAG_PREFIX = "@call "


class _CallFilter(logging.Filter):
    """Puts the call's ``request_id`` and ``trace_id`` on each record made
    during a call (``None`` outside one), unless the record has them."""

    def filter(self, record):
        call = _CALL.get()
        if not hasattr(record, "request_id"):
            record.request_id = call.request_id if call is not None else None
        if not hasattr(record, "trace_id"):
            record.trace_id = call.trace_id if call is not None else None
        return True


class _StderrHandler(logging.Handler):
    """Each record as one stderr line ``LEVEL name: message``; the host logs
    stderr lines tagged with the plugin's name. Line breaks inside a record
    (tracebacks) are folded into `` | ``. A record made during a call
    starts with the call's tags, ``@call {"request_id": ..., "trace_id":
    ...} `` (PROTOCOL.md §8), which the host logs as fields."""

    def __init__(self):
        logging.Handler.__init__(self)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.addFilter(_CallFilter())

    def emit(self, record):
        try:
            text = self.format(record)
            lines = [l.rstrip() for l in text.splitlines() if l.strip()]
            line = " | ".join(lines) + "\n"
            tags = {}
            for key in ("request_id", "trace_id"):
                value = getattr(record, key, None)
                if isinstance(value, str):
                    tags[key] = value
            if tags:
                line = LOG_TAG_PREFIX + json.dumps(tags, separators=(",", ":")) + " " + line
            data = line.encode("utf-8", "backslashreplace")
            view = memoryview(data)
            while view:
                view = view[os.write(2, view):]
        except Exception:
            self.handleError(record)


def setup_logging():
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_StderrHandler())
    root.setLevel(logging.INFO)


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------


class Shared(object):
    """One attachment that came through shared memory: a sealed memory file
    (PROTOCOL.md §3.1), its descriptor held until ``take``.

    ``bytes`` (the default) are read straight from the file (``os.pread``:
    one copy, and no mapping whose pages fault in one by one, measured
    cheaper than copying out of a mapping); a ``zero_copy`` tool gets a
    read-only mapping. Either way the descriptor is closed by ``take`` (or
    when the attachment is dropped untaken)."""

    __slots__ = ("fd", "size")

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size

    def __len__(self):
        return self.size

    def close(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()

    def take(self, zero_copy):
        """The plugin's value: a read-only ``memoryview`` over a mapping
        (kept mapped while referenced), or ``bytes`` (a copy)."""
        import mmap
        try:
            if self.size == 0:
                return b""
            if not zero_copy:
                data = os.pread(self.fd, self.size, 0)
                if len(data) == self.size:
                    return data
            try:  # 3.13+: the mapping keeps no copy of the descriptor
                mapping = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ, trackfd=False)
            except TypeError:
                mapping = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
            if zero_copy:
                return memoryview(mapping)
            data = mapping[:]
            mapping.close()
            return data
        finally:
            self.close()


def _shm_socket():
    """The shared-memory socket the host passed, and the threshold: (socket,
    threshold) or None. Marked close-on-exec: a plugin's subprocesses do
    not inherit it."""
    if _SHM_PASSED is not None:
        fd, threshold = _SHM_PASSED
    else:
        raw = os.environ.pop(SHM_FD_ENV, None)
        threshold = os.environ.pop(SHM_THRESHOLD_ENV, "65536")
        if raw is None:
            return None
        fd = int(raw)
        threshold = int(threshold)
    if fd <= 2 or threshold <= 0:
        return None
    # The C module, not ``socket``: its enums and wrappers cost about 5 ms
    # to import, in the zygote's start or in every runner, for a type that
    # adds nothing this file uses.
    import _socket

    os.set_inheritable(fd, False)
    return _socket.socket(fileno=fd), threshold


def _sealed(data):
    """A sealed, close-on-exec memory file holding ``data``."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SEAL | _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _with_shm_field(header, indices):
    field = ('"shm":[%s],' % ",".join(str(i) for i in indices)).encode("ascii")
    return header[:1] + field + header[1:]


class Wire(object):
    """The private protocol descriptors: frames in, frames out (whole,
    under one lock); with ``shm`` (socket, threshold), large attachments
    through shared memory."""

    def __init__(self, fd_in, fd_out, shm=None):
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.lock = threading.Lock()
        self.shm = shm
        # Buffered: a small request (prefix and body) is one read(2).
        self._in = open(fd_in, "rb", buffering=1 << 16, closefd=False)

    # -- reading --------------------------------------------------------

    def _read_into(self, view):
        """Fills ``view``; returns the number of bytes read (fewer only at
        the end of the stream)."""
        got = 0
        total = len(view)
        while got < total:
            n = self._in.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def read_frame(self):
        """One request frame as (header bytes, [attachment bytes]), or None
        at a clean end of stream. Raises ProtocolError."""
        # A buffered read returns short only at the end of the stream.
        prefix = self._in.read(4)
        if not prefix:
            return None
        if len(prefix) < 4:
            raise ProtocolError("broken stream: the stream ended inside a frame's length")
        (length,) = _U32.unpack(prefix)
        if length > MAX_REQUEST_BYTES:
            raise ProtocolError(
                "a frame of %d bytes exceeds the limit of %d bytes" % (length, MAX_REQUEST_BYTES)
            )
        body = self._read_body(length)
        header, attachments = split_body(body)
        if b'"shm"' in header:
            self._receive_shared(header, attachments)
        return header, attachments

    def _receive_shared(self, header, attachments):
        """Replaces the shared attachments the header names by their
        mappings; their descriptors were sent before the frame."""
        import _socket as socket  # see _shm_socket
        try:
            indices = json.loads(header.decode("utf-8")).get("shm", [])
        except (UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ProtocolError("malformed request: %s" % e)
        if not indices:
            return
        if self.shm is None:
            raise ProtocolError("malformed frame: shared attachments, but no shared memory was offered")
        if (not isinstance(indices, list) or len(indices) > SHM_MAX_PER_FRAME
                or not all(type(i) is int and 0 <= i < len(attachments) for i in indices)
                or any(a >= b for a, b in zip(indices, indices[1:]))):
            raise ProtocolError("malformed frame: bad 'shm' indices %r" % (indices,))
        fd_size = struct.calcsize("i")
        try:
            data, ancdata, flags, _ = self.shm[0].recvmsg(
                4, socket.CMSG_SPACE(SHM_MAX_PER_FRAME * fd_size),
                socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            raise ProtocolError("malformed frame: shared attachments whose descriptors did not come first")
        except OSError as e:
            raise ProtocolError("broken stream: the shared-memory socket: %s" % e)
        fds = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fd_size
                fds.extend(struct.unpack("%di" % (usable // fd_size), payload[:usable]))
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != len(indices) \
                    or data != struct.pack("<I", len(indices)):
                raise ProtocolError("malformed frame: %d shared attachments announced, %d descriptors came"
                                    % (len(indices), len(fds)))
            for i, fd in zip(indices, fds):
                if len(attachments[i]):
                    raise ProtocolError("malformed frame: shared attachment %d also has bytes in the frame" % i)
                seals = fcntl.fcntl(fd, _F_GET_SEALS)
                need = _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE
                if seals & need != need:
                    raise ProtocolError("malformed frame: a shared attachment is not sealed")
                size = os.fstat(fd).st_size
                if size == 0:
                    attachments[i] = b""
                else:
                    # The descriptor is the attachment's now: it closes it.
                    attachments[i] = Shared(fd, size)
                    fds[fds.index(fd)] = -1
        except OSError as e:
            raise ProtocolError("malformed frame: a shared attachment: %s" % e)
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _read_body(self, length):
        if length <= SMALL_FRAME_BYTES:
            # The common request: one read, from the buffer.
            body = self._in.read(length)
            if len(body) == length:
                return body
        else:
            try:
                body = bytearray(min(length, READ_PREALLOCATE))
                filled = 0
                while True:
                    filled += self._read_into(memoryview(body)[filled:])
                    if filled == length:
                        return body
                    if filled < len(body):
                        break  # the stream ended
                    body.extend(bytes(min(length, 2 * len(body)) - len(body)))
            except MemoryError:
                # As the native runner: a frame that cannot be held ends the
                # stream (exit 65), whatever the memory limit.
                raise ProtocolError("broken stream: cannot allocate %d bytes for a frame" % length)
        raise ProtocolError("broken stream: the stream ended inside a %d-byte frame" % length)

    # -- writing --------------------------------------------------------

    def _write_all(self, data):
        written = os.write(self.fd_out, data)
        if written == len(data):
            return
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(self.fd_out, view):]

    def _share(self, header, attachments):
        """(header, attachments, descriptors) with the attachments at or
        above the threshold in sealed memory files (best effort: one that
        cannot be made stays inline)."""
        if self.shm is None or not attachments:
            return header, attachments, []
        threshold = self.shm[1]
        indices, fds = [], []
        attachments = list(attachments)
        for i, data in enumerate(attachments):
            if len(fds) == SHM_MAX_PER_FRAME:
                break
            if len(data) == 0 or len(data) < threshold:
                continue
            try:
                fds.append(_sealed(data))
            except (OSError, AttributeError, ValueError, TypeError):
                continue
            indices.append(i)
            attachments[i] = b""
        if not fds:
            return header, attachments, []
        return _with_shm_field(header, indices), attachments, fds

    def send_frame(self, header, attachments=()):
        if not attachments:
            # The common answer: prefix and header in one write, without
            # the shared-memory path (measured: a tenth of a no-op call).
            data = _FRAME_HEAD.pack(8 + len(header), len(header), 0) + header
            with self.lock:
                try:
                    self._write_all(data)
                except OSError:
                    _exit(0)  # as below
            return
        plain = (header, attachments)
        header, attachments, fds = self._share(header, attachments)
        try:
            self._send_frame(header, attachments, fds, plain)
        finally:
            for fd in fds:
                os.close(fd)

    def _send_frame(self, header, attachments, fds, plain):
        with self.lock:
            if fds:
                import _socket as socket  # see _shm_socket

                try:
                    self.shm[0].sendmsg(
                        [struct.pack("<I", len(fds))],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))],
                        socket.MSG_DONTWAIT)
                except OSError:
                    header, attachments = plain  # it all goes inline
                # The runner keeps no copy once they are sent (or not).
                while fds:
                    os.close(fds.pop())
            sizes = [len(a) for a in attachments]
            total = 8 + 4 * len(sizes) + len(header) + sum(sizes)
            prefix = struct.pack("<III%dI" % len(sizes), total, len(header), len(sizes), *sizes)
            try:
                self._write_all(prefix + header)
                for attachment in attachments:
                    self._write_all(attachment)
            except OSError:
                # The host stopped reading: there is nobody left to serve.
                _exit(0)


def frame_size(header, attachments):
    return 8 + 4 * len(attachments) + len(header) + sum(len(a) for a in attachments)


def split_body(body):
    """Splits a frame body per the consistency rule (PROTOCOL.md §2)."""
    n = len(body)
    if n < 8:
        raise ProtocolError("malformed frame: a frame body of %d bytes has no header" % n)
    header_len, count = _FRAME_TABLE.unpack_from(body, 0)
    if count == 0 and 8 + header_len == n:
        return bytes(body[8:]), []
    table_end = 8 + 4 * count
    if table_end > n:
        raise ProtocolError(
            "malformed frame: %d attachments announced in a frame body of %d bytes" % (count, n)
        )
    sizes = struct.unpack_from("<%dI" % count, body, 8) if count else ()
    at = table_end + header_len
    end = at + sum(sizes)
    if end != n:
        raise ProtocolError(
            "malformed frame: the frame's parts add up to %d bytes, its body holds %d" % (end, n)
        )
    view = memoryview(body)
    header = bytes(view[table_end:at])
    attachments = []
    for size in sizes:
        attachments.append(bytes(view[at:at + size]))
        at += size
    return header, attachments


# `json.dumps` with these arguments makes an encoder per call.
_JSON_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def encode(message):
    """A message's JSON header bytes. Raises ValueError (NaN and the like)
    or UnicodeEncodeError (lone surrogates)."""
    return _JSON_ENCODE(message).encode("utf-8")


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

_MISSING = object()
_STR_OR_NONE = (str, type(None))


def parse_request(header):
    """The request in a frame header, checked like the host's envelope
    (``message.rs``): ``op``, ``id`` and the fields of the op."""
    try:
        message = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("malformed request: %s" % e)
    if not isinstance(message, dict):
        raise ProtocolError("malformed request: the header is not a JSON object")
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError("malformed request: no 'op'")
    rid = message.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < (1 << 64):
        raise ProtocolError("malformed request: 'id' is not an unsigned 64-bit integer")
    if op == "create":
        if message.get("config") is None:
            raise ProtocolError("malformed request: 'create' needs 'config'")
    elif op == "call":
        if not isinstance(message.get("tool"), str):
            raise ProtocolError("malformed request: 'call' needs 'tool'")
        # ``args`` is any JSON (PROTOCOL.md), ``null`` included.
        if "args" not in message:
            raise ProtocolError("malformed request: 'call' needs 'args'")
        pointers = message.get("attachments", [])
        if not isinstance(pointers, list) or not all(isinstance(p, str) for p in pointers):
            raise ProtocolError("malformed request: 'attachments' is not a list of strings")
        context = message.get("context")
        if context is not None and not (
                isinstance(context, dict)
                and isinstance(context.get("request_id"), _STR_OR_NONE)
                and isinstance(context.get("traceparent"), _STR_OR_NONE)):
            raise ProtocolError("malformed request: 'context' is not an object of strings")
    else:
        raise ProtocolError("malformed request: unknown op %r" % op)
    return message


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _clean(text):
    """Text that encodes as UTF-8 (lone surrogates replaced)."""
    text = text if isinstance(text, str) else str(text)
    return text.encode("utf-8", "replace").decode("utf-8")


def _exception_message(exc):
    try:
        return str(exc)
    except Exception:
        return "<unprintable %s>" % exc.__class__.__name__


def traceback_lines(exc):
    """The last lines of ``exc``'s traceback, without the runner's frames
    or importlib's."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename not in _SELF_NAMES and not f.filename.startswith("<frozen importlib")
    ]
    lines = ["Traceback (most recent call last):"]
    for chunk in traceback.format_list(frames):
        lines.extend(chunk.rstrip("\n").splitlines())
    for chunk in traceback.format_exception_only(type(exc), exc):
        lines.extend(chunk.rstrip("\n").splitlines())
    return [_clean(l) for l in lines[-TRACEBACK_LINES:]]


def python_error(exc, kind="Python"):
    """A WireError for a Python exception."""
    error = {
        "kind": kind,
        "error_type": exc.__class__.__name__,
        "message": _clean(_exception_message(exc)),
        "traceback": traceback_lines(exc),
    }
    if isinstance(exc, ImportError) and getattr(exc, "name", None):
        error["name"] = _clean(exc.name)
    return error


def wire_error(kind, message, **fields):
    error = {"kind": kind, "message": _clean(message)}
    for key, value in fields.items():
        if value is not None:
            error[key] = _clean(value) if isinstance(value, str) else value
    return error


# ---------------------------------------------------------------------------
# JSON Pointers (RFC 6901), as forgesyte_protocol::wire::attach::place
# ---------------------------------------------------------------------------


class PointerError(Exception):
    def __init__(self, pointer, detail):
        Exception.__init__(self, "attachment pointer %s: %s" % (json.dumps(pointer), detail))


def _unescape(token):
    return token.replace("~1", "/").replace("~0", "~")


def _escape(key):
    return key.replace("~", "~0").replace("/", "~1")


# An array index of more digits names no element of any list.
_MAX_INDEX_DIGITS = 18


def _resolve(root, pointer):
    """The value at ``pointer`` (serde_json's ``pointer_mut``), or _MISSING."""
    if pointer == "":
        return root
    if not pointer.startswith("/"):
        return _MISSING
    target = root
    for token in pointer.split("/")[1:]:
        token = _unescape(token)
        if isinstance(target, dict):
            target = target.get(token, _MISSING)
        elif isinstance(target, list):
            if token.startswith("+") or (token.startswith("0") and len(token) != 1):
                return _MISSING
            # More digits than any list has elements (and than ``int``
            # converts): no element.
            if (not token.isdigit() or not token.isascii() or len(token) > _MAX_INDEX_DIGITS
                    or int(token) >= len(target)):
                return _MISSING
            target = target[int(token)]
        else:
            return _MISSING
        if target is _MISSING:
            return _MISSING
    return target


def place(root, pointer, value):
    """Puts ``value`` at ``pointer`` in ``root`` and returns the new root:
    the empty pointer replaces the root; otherwise the parent must exist and
    be an object (key inserted or replaced) or an array (an existing index
    replaced)."""
    if pointer == "":
        return value
    if "/" not in pointer:
        raise PointerError(pointer, "does not start with '/'")
    parent_pointer, last = pointer.rsplit("/", 1)
    key = _unescape(last)
    parent = _resolve(root, parent_pointer)
    if isinstance(parent, dict):
        parent[key] = value
    elif isinstance(parent, list):
        # RFC 6901: an index is "0" or digits without a leading zero.
        canonical = key == "0" or (
            key != "" and not key.startswith("0") and key.isascii() and key.isdigit()
            and len(key) <= _MAX_INDEX_DIGITS
        )
        if not canonical or int(key) >= len(parent):
            raise PointerError(pointer, "names no element of its array")
        parent[int(key)] = value
    elif parent is _MISSING:
        raise PointerError(pointer, "its parent does not exist")
    else:
        raise PointerError(pointer, "its parent is neither an object nor an array")
    return root


# ---------------------------------------------------------------------------
# Results: Python values to JSON plus attachments
# ---------------------------------------------------------------------------


class ResultError(Exception):
    def __init__(self, error_type, message):
        Exception.__init__(self, message)
        self.error_type = error_type


def _where(path):
    return " (at %s)" % path if path else ""


def _json_key(key, path):
    if isinstance(key, str):
        return key
    # Like json.dumps: scalar keys become their JSON text.
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return json.dumps(key)
    raise ResultError(
        "TypeError",
        "tool result has a dict key of type %s, not a string%s" % (type(key).__name__, _where(path)),
    )


def _pydantic_leaf(value):
    """pydantic's own JSON form of a field value, for values inside a
    pydantic model (datetimes, enums, UUIDs, ...)."""
    try:
        import pydantic_core

        return pydantic_core.to_jsonable_python(value)
    except ImportError:
        pass
    from pydantic.json import pydantic_encoder  # pydantic v1

    return pydantic_encoder(value)


def to_wire(value):
    """Converts a tool's result to (JSON value, [(pointer, bytes)]): bytes
    anywhere are taken out as attachments (``null`` stays in their place).
    Raises ResultError."""
    blobs = []

    def convert(x, path, in_model):
        if x is None or isinstance(x, (str, bool, int)):
            return x
        if isinstance(x, float):
            if not math.isfinite(x):
                raise ResultError(
                    "ValueError",
                    "tool result contains the non-finite number %r, which JSON cannot carry%s"
                    % (x, _where(path)),
                )
            return x
        if isinstance(x, (bytes, bytearray, memoryview)):
            blobs.append((path, x if type(x) is bytes else bytes(x)))
            return None
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                key = _json_key(k, path)
                out[key] = convert(v, path + "/" + _escape(key), in_model)
            return out
        if isinstance(x, (list, tuple)):
            return [convert(v, "%s/%d" % (path, i), in_model) for i, v in enumerate(x)]
        kind = type(x)
        # pydantic v2 models: python-mode dump keeps bytes as bytes (they
        # become attachments); other field values go through pydantic.
        if callable(getattr(kind, "model_dump", None)) and hasattr(kind, "model_fields"):
            return convert(x.model_dump(), path, True)
        # pydantic v1 models.
        if hasattr(kind, "__fields__") and callable(getattr(x, "dict", None)):
            return convert(x.dict(), path, True)
        if hasattr(kind, "__dataclass_fields__"):
            import dataclasses  # loaded already: the plugin made the class

            return convert(dataclasses.asdict(x), path, in_model)
        # numpy scalars and arrays, without importing numpy.
        if kind.__module__ == "numpy" and callable(getattr(x, "tolist", None)):
            return convert(x.tolist(), path, in_model)
        if in_model:
            try:
                leaf = _pydantic_leaf(x)
            except Exception:
                leaf = x
            if leaf is not x and type(leaf) is not kind:
                return convert(leaf, path, False)
        raise ResultError(
            "TypeError",
            "tool result of type %s is not JSON-serialisable%s" % (kind.__name__, _where(path)),
        )

    try:
        converted = convert(value, "", False)
    except RecursionError:
        raise ResultError("RecursionError", "tool result is nested too deeply (or contains itself)")
    return converted, blobs


# ---------------------------------------------------------------------------
# Tool specs
# ---------------------------------------------------------------------------

ANY_OBJECT = {"type": "object"}
_SCHEMA_KEYWORDS = frozenset(
    """$schema $ref $id $defs definitions type properties patternProperties
    additionalProperties required items prefixItems enum const anyOf oneOf allOf
    not if then else format contentEncoding contentMediaType minimum maximum
    minLength maxLength pattern minItems maxItems default examples title
    description""".split()
)


def _looks_like_schema(d):
    t = d.get("type")
    if isinstance(t, (str, list)):
        return True
    for key, value in d.items():
        if key in _SCHEMA_KEYWORDS and key != "type" and not isinstance(value, dict):
            return True
        if key in ("properties", "patternProperties", "$defs", "definitions", "items",
                   "additionalProperties", "not", "if", "then", "else"):
            return True
    return False


def normalize_schema(schema):
    """A JSON Schema for a tool's inputs or outputs. ForgeSyte plugins and
    manifests also write a bare property map (``{"image_base64": "string"}``
    or ``{"frame_base64": {"type": "string"}}``) or a list of input names;
    those become ``{"type": "object", "properties": {...}}``."""
    if schema is None:
        return dict(ANY_OBJECT)
    if isinstance(schema, type):
        # A pydantic model class given as the schema.
        for method in ("model_json_schema", "schema"):
            if callable(getattr(schema, method, None)):
                return getattr(schema, method)()
        return dict(ANY_OBJECT)
    if isinstance(schema, (list, tuple)):
        names = [n for n in schema if isinstance(n, str)]
        if not names:
            return dict(ANY_OBJECT)
        return {"type": "object", "properties": dict((n, {}) for n in names)}
    if isinstance(schema, dict):
        if not schema or _looks_like_schema(schema):
            return schema
        if all(isinstance(v, (dict, str)) for v in schema.values()) and all(
            isinstance(k, str) for k in schema
        ):
            props = {}
            for name, spec in schema.items():
                props[name] = {"type": spec} if isinstance(spec, str) else spec
            return {"type": "object", "properties": props}
        return schema
    return schema


def _manifest_tools(manifest):
    """The manifest's tools as (id, dict) pairs: a list of dicts with
    ``id`` or ``name``, or a dict id -> dict."""
    if not isinstance(manifest, dict):
        return []
    tools = manifest.get("tools")
    out = []
    if isinstance(tools, dict):
        for tid, meta in tools.items():
            if isinstance(tid, str):
                out.append((tid, meta if isinstance(meta, dict) else {}))
    elif isinstance(tools, list):
        for meta in tools:
            if isinstance(meta, dict):
                tid = meta.get("id", meta.get("name"))
                if isinstance(tid, str):
                    out.append((tid, meta))
            elif isinstance(meta, str):
                out.append((meta, {}))
    return out


def _instance_tools(raw):
    """``instance.tools`` as (id, dict) pairs. ForgeSyte's BasePlugin shape
    is a dict tool name -> {"handler", "description", "input_schema",
    "output_schema"}; a list of dicts with ``id``/``name`` is accepted too."""
    out = []
    if isinstance(raw, dict):
        for tid, meta in raw.items():
            if not isinstance(tid, str):
                raise TypeError("tool names must be strings, not %s" % type(tid).__name__)
            if callable(meta) and not isinstance(meta, dict):
                meta = {"handler": meta}
            if not isinstance(meta, dict):
                raise TypeError("tool %r must be described by a dict, not %s" % (tid, type(meta).__name__))
            out.append((tid, meta))
    elif isinstance(raw, (list, tuple)):
        for meta in raw:
            if isinstance(meta, str):
                out.append((meta, {}))
                continue
            if not isinstance(meta, dict):
                raise TypeError("each tool must be a dict, not %s" % type(meta).__name__)
            tid = meta.get("id", meta.get("name"))
            if not isinstance(tid, str):
                raise TypeError("a tool in the list has no string 'id' or 'name'")
            out.append((tid, meta))
    else:
        raise TypeError("the plugin's 'tools' must be a dict or a list, not %s" % type(raw).__name__)
    return out


def _first(*values):
    for value in values:
        if value is not None:
            return value
    return None


def collect_tools(instance, manifest):
    """The instance's tools: (specs for ``created``, id -> dispatch info).

    From the live instance's ``tools`` when it has any; otherwise (no
    ``tools``, or an empty one, e.g. a plugin with only ``run_tool``) from
    the manifest's ``tools``. A manifest entry with the same id fills in
    what the instance's entry lacks (e.g. a ``title``)."""
    raw = getattr(instance, "tools", None)
    from_manifest = _manifest_tools(manifest)
    entries = _instance_tools(raw) if raw else from_manifest
    by_id = dict(from_manifest)
    specs = []
    table = {}
    for tid, meta in entries:
        if tid in table:
            _diag("tool %r is listed twice; the first one counts" % tid)
            continue
        extra = by_id.get(tid, {})
        title = _first(meta.get("title"), extra.get("title"), tid)
        description = _first(meta.get("description"), extra.get("description"), "")
        inputs = normalize_schema(
            _first(meta.get("input_schema"), meta.get("inputs"),
                   extra.get("input_schema"), extra.get("inputs"))
        )
        outputs = normalize_schema(
            _first(meta.get("output_schema"), meta.get("outputs"),
                   extra.get("output_schema"), extra.get("outputs"))
        )
        spec = {
            "id": tid,
            "title": title if isinstance(title, str) else str(title),
            "description": description if isinstance(description, str) else str(description),
            "input_schema": inputs,
            "output_schema": outputs,
        }
        converted, blobs = to_wire(spec)
        if blobs:
            raise TypeError("the spec of tool %r contains bytes" % tid)
        specs.append(converted)
        table[tid] = {"handler": meta.get("handler"), "binary": binary_properties(inputs),
                      "zero_copy": meta.get("zero_copy") is True}
    return specs, table


def binary_properties(schema):
    """Top-level properties the input schema declares binary."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return []
    return [
        name
        for name, spec in props.items()
        if isinstance(spec, dict)
        and (spec.get("format") == "binary" or spec.get("contentEncoding") == "base64")
    ]


# ---------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------


def _sanitize(name):
    return re.sub(r"\W", "_", name) or "plugin"


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Loads a module of the plugin's directory from its source: never from
    bytecode in ``__pycache__``, which signatures and integrity pins do not
    cover and which Python runs in the source's place when its header
    matches the source's time and size; and writes none there."""

    def path_stats(self, path):
        # ``SourceLoader.get_code`` reads (and later writes) bytecode only
        # when it knows the source's time.
        raise OSError("a plugin's bytecode is never read")


class _SourceOnlyFinder(object):
    """Finds modules as ``PathFinder`` does (it stands just before it on
    ``sys.meta_path``), and makes those found under ``root`` (the plugin's
    directory, or its installed package's) load from their sources through
    :class:`_SourceOnlyLoader`. A module there that is bytecode without a
    source is refused. Modules elsewhere (the standard library, the
    plugin's dependencies) load as Python loads them."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        machinery = importlib.machinery
        spec = machinery.PathFinder.find_spec(name, path, target)
        origin = getattr(spec, "origin", None)
        if not isinstance(origin, str):
            return spec  # not found, or a namespace package
        where = os.path.abspath(origin)
        if not where.startswith(self.root + os.sep):
            return spec
        if isinstance(spec.loader, machinery.SourcelessFileLoader):
            raise ImportError(
                "%s is bytecode without its source (%s): a plugin's bytecode never runs, "
                "since pins and signatures cover sources only" % (name, _clean(origin)),
                name=name, path=origin)
        if isinstance(spec.loader, machinery.SourceFileLoader):
            spec.loader = _SourceOnlyLoader(name, origin)
        return spec  # an extension module: covered by pins and signatures


def _source_only_under(root):
    """Modules found under ``root`` (the plugin directory or installed
    package, subpackages included) load from sources and extension modules
    only, never from bytecode: see :class:`_SourceOnlyFinder`."""
    finder = _SourceOnlyFinder(root)
    path_finder = importlib.machinery.PathFinder
    at = sys.meta_path.index(path_finder) if path_finder in sys.meta_path else 0
    sys.meta_path.insert(at, finder)


def import_plugin(args):
    """Imports the plugin's code: the module, or a WireError dict."""
    here = os.path.dirname(_SELF)
    if sys.path and (not sys.path[0] or os.path.abspath(sys.path[0]) == here):
        # Neither the runner's own directory nor, under ``-c``, the working
        # directory ("") may shadow plugin modules.
        del sys.path[0]
    if args.plugin_dir:
        root = os.path.abspath(args.plugin_dir)
        _source_only_under(root)
        if not args.installed:
            sys.path.insert(0, root)
    if args.file is not None:
        path = args.file
        if not os.path.isfile(path):
            return wire_error(
                "Python",
                "%s not found in %s" % (os.path.basename(path), args.plugin_dir),
                error_type="ImportError",
                path=path,
            )
        name = "plugin_" + _sanitize(args.plugin)
        try:
            spec = importlib.util.spec_from_file_location(
                name, path, loader=_SourceOnlyLoader(name, path))
            if spec is None or spec.loader is None:
                return wire_error("Python", "cannot load %s as Python" % path,
                                  error_type="ImportError", path=path)
            module = importlib.util.module_from_spec(spec)
            # Registered first: dataclasses, pydantic and pickling look
            # classes' modules up by name.
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        except MemoryError as e:
            _out_of_memory(e, "importing the plugin")
        except BaseException as e:  # SystemExit too: the plugin fails, not the runner
            sys.modules.pop(name, None)
            error = python_error(e)
            error["path"] = _clean(_syntax_error_file(e) or path)
            return error
    try:
        return importlib.import_module(args.module)
    except MemoryError as e:
        _out_of_memory(e, "importing the plugin")
    except BaseException as e:
        error = python_error(e)
        if _syntax_error_file(e):
            error["path"] = _clean(_syntax_error_file(e))
        return error


def _syntax_error_file(exc):
    if isinstance(exc, SyntaxError) and isinstance(getattr(exc, "filename", None), str):
        return exc.filename
    return None


def _plugin_shaped(cls):
    if isinstance(getattr(cls, "tools", None), (dict, list)):
        return True
    if callable(getattr(cls, "run_tool", None)):
        return True
    return any("tools" in getattr(k, "__annotations__", {}) for k in cls.__mro__)


def find_class(module, class_name):
    """The plugin class, or a WireError dict."""
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None:
            return wire_error(
                "Python", "No '%s' class found in module" % class_name, error_type="AttributeError"
            )
        return cls
    cls = getattr(module, "Plugin", None)
    if cls is not None:
        return cls
    # Fallback: ForgeSyte BasePlugin subclasses are often named after the
    # plugin (OCRPlugin, YoloTrackerPlugin, ...) rather than `Plugin`. When
    # the module has no `Plugin`, take its one plugin-shaped class: a class
    # with a `tools` attribute (dict or list, possibly only annotated, as on
    # BasePlugin) or a `run_tool` method, not abstract, and not a base
    # class of another such class (so the local `class BasePlugin` stub that
    # published plugins define when the server's `app.plugins.base` is
    # missing is skipped). Classes defined in the module count first; when
    # there are none, classes it imports.
    values = [v for v in vars(module).values() if isinstance(v, type)]
    own = [v for v in values if v.__module__ == module.__name__]
    for group in (own, values):
        found = [c for c in group if _plugin_shaped(c) and not getattr(c, "__abstractmethods__", None)]
        found = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
        found = [c for c in found if c.__name__ != "BasePlugin"]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            break
    return wire_error(
        "Python", "No 'Plugin' class found in module", error_type="AttributeError"
    )


# How a handler takes its arguments, by (function, kind of callable,
# argument names):
# True as keywords, False as the one dict, None neither (see
# `_bind_and_call`). Working it out with `inspect` costs more than a quick
# call; the names of a tool's arguments rarely change.
_SHAPES = {}
_SHAPES_MAX = 1024


def _call_shape(fn, args):
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    # Only the binding is tried: a TypeError raised by the handler itself is
    # its error (the handler must not run again with another shape).
    for keywords, shape_args, shape_kwargs in ((True, (), args), (False, (args,), {})):
        try:
            signature.bind(*shape_args, **shape_kwargs)
        except TypeError:
            continue
        return keywords
    return None


def _bind_and_call(fn, args):
    """Calls a tool handler the way ForgeSyte plugins write them: with the
    arguments as keywords (``def detect(self, frame_base64, device="cpu")``)
    when they bind so, else with the args dict as the one positional
    argument (``def detect(self, args)``)."""
    if not isinstance(args, dict):
        return fn(args)
    func = getattr(fn, "__func__", fn)
    # Only functions and methods of functions are remembered: they hash by
    # identity (a callable object's own __hash__ may do anything), and the
    # kind of `fn` tells a method from its function (a classmethod object
    # has a `__func__` too, and another signature).
    kind = type(fn)
    cached = type(func) is types.FunctionType and kind in (types.FunctionType, types.MethodType)
    key = (func, kind, frozenset(args)) if cached else None
    shape = _SHAPES.get(key, _MISSING) if key is not None else _MISSING
    if shape is _MISSING:
        shape = _call_shape(fn, args)
        if key is not None and len(_SHAPES) < _SHAPES_MAX:
            _SHAPES[key] = shape
    if shape is False:
        return fn(args)
    return fn(**args)  # None: the call's own TypeError says what is wrong


def _await(result):
    if isinstance(result, types.CoroutineType):
        import asyncio

        return asyncio.run(result)
    return result


class Runner(object):
    def __init__(self, args, wire, module):
        self.args = args
        self.wire = wire
        self.module = module
        self.instance = None
        self.tools = {}
        self.max_response = MAX_FRAME_BYTES
        self.create_lock = threading.Lock()
        # Long-lived threads take turns reading requests (see `serve`): a
        # new thread per call, or a hand-off per call, cost more than the
        # call itself.
        # Idle threads, each waiting on a lock of its own (held; released
        # to make that thread the reader). A plain lock is a C object: a
        # Semaphore's Python-level Condition cost more than a no-op call.
        self.pool_lock = threading.Lock()
        self.idle = []
        # Under `pool_lock`: the number of the call the reader is running
        # itself (0: none), the last number given, and what the watch saw
        # at its previous tick.
        self.inline = 0
        self.calls = 0
        self.watch_seen = 0
        # The watch thread (started with the first call) and, while it
        # sleeps through a quiet spell, the held lock that wakes it.
        self.watching = False
        self.watch_asleep = False
        self.watch_wake = threading.Lock()
        self.watch_wake.acquire()

    # -- answers --------------------------------------------------------

    def answer(self, message, attachments=()):
        try:
            header = encode(message)
        except (ValueError, UnicodeEncodeError) as e:
            _diag("cannot encode an answer: %s" % e)
            _exit(EXIT_PROTOCOL)
        self.wire.send_frame(header, attachments)

    def tool_failed(self, rid, error):
        self.answer({"type": "tool_failed", "id": rid, "error": error})

    def init_failed(self, rid, error):
        self.answer({"type": "init_failed", "id": rid, "error": error})

    # -- serving --------------------------------------------------------

    def serve(self):
        """Serves requests until stdin ends, leader/followers style: the
        thread that reads a request runs it itself, so a call waits for
        no thread hand-off. The reading passes on only when a call runs
        long: a watch thread, ticking every ``HANDOVER_TICK_S`` while calls
        come, makes an idle thread (or a new one) the reader when it finds
        the reader still in the call it saw at its previous tick. So a slow
        call holds the next request back at most two ticks, and a quick
        call wakes no other thread (waking one cost more than the call
        itself). Threads that finish wait, idle, for their turn to read:
        the pool grows to the peak number of calls in flight (a tool that
        never returns keeps its thread) and never refuses a call. The
        watch sleeps after ``HANDOVER_QUIET_TICKS`` ticks without a call,
        and the next call wakes it."""
        self.lead()

    def lead(self, turn=None):
        """Reads and runs requests; between its turns to read, waits on
        ``turn`` (a held lock that the watch releases). A thread the watch
        started comes with its turn not yet given."""
        if turn is None:
            turn = threading.Lock()
        turn.acquire()
        while True:
            try:
                frame = self.wire.read_frame()
                if frame is None:
                    self.shutdown()
                header, attachments = frame
                request = parse_request(header)
            except ProtocolError as e:
                _diag("reading stdin: %s" % e)
                _exit(EXIT_PROTOCOL)
            except MemoryError:
                # As in a tool: out of memory, the process is not to be
                # trusted any more.
                _diag("MemoryError: out of memory reading a request")
                _exit(EXIT_MEMORY)
            except BaseException as e:
                # Anything else (an OSError on the pipe, a RecursionError
                # from a deeply nested header, a bug of the runner's own)
                # would end this thread silently and leave no reader: the
                # host would wait for its timeout. End the process instead.
                _diag("reading stdin: %s: %s" % (type(e).__name__, e))
                _exit(EXIT_PROTOCOL)
            if request["op"] == "create":
                # Nothing else comes until the instance exists (the host
                # waits for `created`): construct on this thread, and start
                # the watch with the first call, not at start-up.
                self.handle(request, attachments)
                continue
            try:
                number = self.begin_inline()
            except RuntimeError as e:
                # No watch, so no thread would ever read next: this one
                # answers the request with the error and goes on reading.
                detail = "the runner cannot start a thread: %s" % e
                # Not the plugin's fault: the call fails, the process stays.
                self.tool_failed(request["id"], wire_error("Failed", detail, error_type="RunnerOverloaded"))
                continue
            self.handle(request, attachments)
            # An idle thread holds nothing of its last request: its
            # attachments (a mapping of shared memory, or megabytes of
            # bytes) go now, not when this thread reads again.
            del frame, header, attachments, request
            with self.pool_lock:
                still_reader = self.inline == number
                if still_reader:
                    self.inline = 0
                else:
                    # Another thread reads now: wait for a turn (the most
                    # recent idle thread goes first: its stack is warm).
                    self.idle.append(turn)
            if not still_reader:
                turn.acquire()

    def begin_inline(self):
        """Numbers the call the reader is about to run itself, and makes
        sure the watch is ticking. Raises RuntimeError when the watch
        thread cannot be started."""
        if not self.watching:
            threading.Thread(target=self.watch, name="forgesyte-watch", daemon=True).start()
            self.watching = True
        with self.pool_lock:
            self.calls += 1
            number = self.inline = self.calls
            wake, self.watch_asleep = self.watch_asleep, False
        if wake:
            self.watch_wake.release()
        return number

    def watch(self):
        """The watch thread: see `serve`."""
        quiet = 0
        failed_for = 0
        while True:
            time.sleep(HANDOVER_TICK_S)
            with self.pool_lock:
                current = self.inline
                # The reader still in the call of the last tick?
                stuck = current != 0 and current == self.watch_seen
                if stuck and self.idle:
                    self.inline = 0
                    self.idle.pop().release()
                    stuck = False
                self.watch_seen = current
                quiet = 0 if current else quiet + 1
                sleep = quiet >= HANDOVER_QUIET_TICKS
                if sleep:
                    self.watch_asleep = True
            if stuck:
                self.start_reader(current, failed_for != current)
                failed_for = current
            if sleep:
                self.watch_wake.acquire()
                quiet = 0

    def start_reader(self, stuck, tell):
        """Starts a thread to read while the reader runs call ``stuck``;
        if that call ended meanwhile, the new thread waits, idle. When no
        thread can be started, the reader reads again once its call ends
        (the next tick tries again; ``tell``: say so on stderr)."""
        turn = threading.Lock()
        turn.acquire()
        try:
            threading.Thread(target=self.lead, args=(turn,), name="forgesyte-worker", daemon=True).start()
        except RuntimeError as e:
            if tell:
                _diag("cannot start a thread to read the next request: %s" % e)
            return
        with self.pool_lock:
            if self.inline == stuck:
                self.inline = 0
                turn.release()
            else:
                self.idle.append(turn)

    def handle(self, request, attachments):
        rid = request["id"]
        try:
            if request["op"] == "create":
                self.create(rid, request["config"])
            else:
                token = _CALL.set(_call_context(request))
                try:
                    self.call(rid, request["tool"], request["args"],
                              request.get("attachments", []), attachments)
                finally:
                    _CALL.reset(token)
        except BaseException as e:  # a bug of the runner's own
            _diag("internal error: %s" % "".join(traceback.format_exception(type(e), e, e.__traceback__)))
            error = wire_error("Protocol", "python runner: %s: %s" % (type(e).__name__, e))
            if request["op"] == "create":
                self.init_failed(rid, error)
            else:
                self.tool_failed(rid, error)

    def shutdown(self):
        """End of stdin: the host let this runner go."""
        instance = self.instance
        hook = getattr(instance, "on_unload", None) if instance is not None else None
        if callable(hook):

            def unload():
                try:
                    hook()
                except BaseException as e:
                    _diag("on_unload() failed: %s: %s" % (type(e).__name__, e))

            t = threading.Thread(target=unload, name="forgesyte-unload", daemon=True)
            t.start()
            t.join(UNLOAD_GRACE_S)
            if t.is_alive():
                _diag("on_unload() still running after %g s; exiting anyway" % UNLOAD_GRACE_S)
        _exit(0)

    # -- create ---------------------------------------------------------

    def create(self, rid, config):
        with self.create_lock:
            if self.instance is not None:
                self.init_failed(rid, wire_error("Protocol", "this runner already holds an instance"))
                return
            cls = find_class(self.module, self.args.class_name)
            if isinstance(cls, dict):
                self.init_failed(rid, cls)
                return
            manifest = config.get("manifest") if isinstance(config, dict) else None
            given = config.get("models") if isinstance(config, dict) else None
            _MODELS.clear()
            if isinstance(given, dict):
                _MODELS.update((str(k), v) for k, v in given.items() if isinstance(v, str))
            try:
                instance = cls()  # the seed's contract: no arguments
                for hook in ("validate", "on_load"):
                    method = getattr(instance, hook, None)
                    if callable(method):
                        _await(method())
                specs, table = collect_tools(instance, manifest)
                # Encoded here: a spec that cannot be (text that is not
                # valid Unicode) fails construction, not the runner.
                encode({"tools": specs})
                _check_name(instance, self.args.plugin)
            except MemoryError as e:
                _out_of_memory(e, "constructing the plugin")
            except BaseException as e:
                self.init_failed(rid, python_error(e))
                return
            # The host kills a runner whose answer frame is over the
            # manifest's limit; a result that big fails as a tool error
            # instead. (Without the field the host's own default applies,
            # which this runner does not know: only the u32 cap is checked.)
            limits = manifest.get("limits") if isinstance(manifest, dict) else None
            mb = limits.get("max_response_mb") if isinstance(limits, dict) else None
            if isinstance(mb, int) and not isinstance(mb, bool) and mb > 0:
                self.max_response = min(mb * MIB, MAX_FRAME_BYTES)
            self.tools = table
            self.instance = instance
        self.answer({"type": "created", "id": rid, "tools": specs})

    # -- call -----------------------------------------------------------

    def call(self, rid, tool, args, pointers, attachments):
        instance = self.instance
        if instance is None:
            self.tool_failed(rid, wire_error("Protocol", "no instance: the plugin was never constructed"))
            return
        entry = self.tools.get(tool)
        if entry is None:
            self.tool_failed(rid, wire_error(
                "UnknownTool", "no tool '%s' in plugin '%s'" % (tool, self.args.plugin), name=tool))
            return
        if len(pointers) != len(attachments):
            self.tool_failed(rid, wire_error(
                "InvalidArgs", "%d attachment places for %d attachments" % (len(pointers), len(attachments))))
            return
        zero_copy = entry.get("zero_copy", False)
        try:
            for pointer, data in zip(pointers, attachments):
                if isinstance(data, Shared):
                    data = data.take(zero_copy)
                args = place(args, pointer, data)
        except PointerError as e:
            self.tool_failed(rid, wire_error("InvalidArgs", str(e)))
            return
        if isinstance(args, dict):
            for name in entry["binary"]:
                value = args.get(name)
                if isinstance(value, str):
                    try:
                        args[name] = base64.b64decode(value.encode("ascii"), validate=True)
                    except (ValueError, UnicodeEncodeError) as e:
                        self.tool_failed(rid, wire_error(
                            "InvalidArgs", "argument '%s' is not valid base64: %s" % (name, e)))
                        return
        try:
            result = _await(self.dispatch(instance, tool, entry, args))
        except MemoryError as e:
            _out_of_memory(e, "in tool '%s'", tool)
        except BaseException as e:
            # The tool's own failure (SystemExit from sys.exit() included:
            # it only ends this thread): an error, the plugin stays healthy.
            self.tool_failed(rid, python_error(e, kind="Failed"))
            return
        self.send_result(rid, result)

    def dispatch(self, instance, tool, entry, args):
        run_tool = getattr(instance, "run_tool", None)
        if callable(run_tool):
            return run_tool(tool, args)
        handler = entry.get("handler")
        if isinstance(handler, str):
            handler = getattr(instance, handler)
        elif handler is None:
            handler = getattr(instance, tool, None)
            if not callable(handler):
                raise AttributeError("tool '%s' has no handler and the plugin no run_tool()" % tool)
        return _bind_and_call(handler, args)

    def send_result(self, rid, result):
        try:
            value, blobs = to_wire(result)
            message = {"type": "result", "id": rid, "result": value}
            if blobs:
                message["attachments"] = [pointer for pointer, _ in blobs]
            header = encode(message)
        except ResultError as e:
            self.tool_failed(rid, wire_error("Failed", str(e), error_type=e.error_type))
            return
        except UnicodeEncodeError as e:
            self.tool_failed(rid, wire_error(
                "Failed", "tool result is not valid Unicode: %s" % e, error_type="UnicodeEncodeError"))
            return
        except Exception as e:  # e.g. a model_dump() that raises
            self.tool_failed(rid, python_error(e, kind="Failed"))
            return
        data = [b for _, b in blobs]
        size = frame_size(header, data)
        if size > self.max_response:
            self.tool_failed(rid, wire_error(
                "Failed",
                "the result frame of %d bytes exceeds the limit of %d bytes" % (size, self.max_response),
                error_type="ResultTooLarge"))
            return
        self.wire.send_frame(header, data)


def main(argv):
    global _plugin_name
    fd_in, fd_out = _PROTO_FDS
    try:
        args = parse_args(argv)
    except UsageError as e:
        _diag("%s\n%s" % (e, USAGE))
        _exit(EXIT_USAGE)
    _plugin_name = args.plugin
    # Before confinement may replace the environment.
    try:
        shm = _shm_socket()
    except (OSError, ValueError) as e:
        _diag("cannot take the shared-memory socket: %s" % e)
        _exit(EXIT_SETUP)
    # A thread per call in progress: at the default 8 MiB of stack each,
    # the memory limit's address space ran out at about 50 of them, below
    # the host's calls-per-plugin limit (64 take 256 MiB at 4 MiB). Not less:
    # at 2 MiB some deep recursions through C (``sorted(key=...)`` calling
    # itself) crash the interpreter before Python raises RecursionError.
    try:
        threading.stack_size(THREAD_STACK_BYTES)
    except (ValueError, RuntimeError) as e:
        _diag("cannot set the threads' stack size: %s" % e)
    if args.memory_limit_mb > 0:
        try:
            limit_memory(args.memory_limit_mb)
        except Exception as e:
            _diag("cannot set the memory limit of %d MiB: %s" % (args.memory_limit_mb, e))
            _exit(EXIT_SETUP)
    # Before any thread starts: Landlock and the network namespace hold for
    # the thread that asks and the threads it starts after.
    confinement = None
    if args.confine is not None:
        try:
            confinement = confine(args.confine)
        except Exception as e:
            _diag("cannot confine the runner: %s: %s" % (type(e).__name__, e))
            _exit(EXIT_SETUP)
    if not _PARENT_DEATH_SIGNAL:
        watch_parent()
    setup_logging()
    _install_api()
    wire = Wire(fd_in, fd_out, shm)
    module = import_plugin(args)
    runner = Runner(args, wire, None)
    if isinstance(module, dict):
        _diag("import failed: %s: %s" % (module.get("error_type", module["kind"]), module["message"]))
        runner.answer({"type": "import_failed", "error": module})
        _exit(0)
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
    runner.answer(hello)
    runner.serve()


# ---------------------------------------------------------------------------
# Confinement
# ---------------------------------------------------------------------------

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
_CLONE_NEWNET = 0x40000000


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
    virtualenv and every directory on ``sys.path`` (site-packages)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p)
    return sorted(p for p in paths if os.path.isabs(p))


def _landlock_abi(libc):
    """(``libc.syscall`` set up to return a long, this kernel's Landlock ABI
    version: below 1 when it has no Landlock)."""
    import ctypes

    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                  ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return syscall, abi


def _confine_tools(libc):
    """What ``confine`` calls through: ``(libc, syscall, Landlock ABI)``."""
    syscall, abi = _landlock_abi(libc)
    return libc, syscall, abi


def confine(plan):
    """Applies the host's sandbox ``plan`` to this process, before any
    plugin code runs: the environment replaced by ``plan["env"]``, no
    network unless ``plan["network"]``, and Landlock rules that
    allow reading ``plan["read"]`` (and what the interpreter itself needs),
    writing ``plan["write"]``, and using the devices ``plan["devices"]``.
    Returns what was applied (the hello's ``confinement``): each part either
    enforced or "unconfined: why", never silently skipped.

    No network means an empty network namespace: the one its zygote made
    for all its runners (``_SHARED_NETNS``, joined with ``setns``, far
    cheaper than making one) when Landlock can scope abstract Unix sockets
    and signals to this runner (ABI >= 6), so runners sharing it still
    cannot reach one another; else one of its own (``unshare``)."""
    import ctypes

    global _SHARED_NETNS, _CONFINE_TOOLS
    shared, _SHARED_NETNS = _SHARED_NETNS, None
    tools, _CONFINE_TOOLS = _CONFINE_TOOLS, None
    if tools is None:
        tools = _confine_tools(ctypes.CDLL(None, use_errno=True))
    libc, syscall, abi = tools
    report = {}
    env = plan.get("env")
    if isinstance(env, dict):
        # Not ``os.environ.clear()``: its ``popitem`` lists the environment
        # again for every variable (0.6 ms for 40 of them, 0.1 ms so).
        for key in list(os.environ):
            del os.environ[key]
        os.environ.update({str(k): str(v) for k, v in env.items()})
        report["env"] = "scrubbed"
    network = bool(plan.get("network"))
    try:
        if network:
            report["network"] = "allowed"
        elif shared is not None and abi >= 6 and libc.setns(ctypes.c_int(shared), ctypes.c_int(_CLONE_NEWNET)) == 0:
            # Its loopback stays down: no runner may bring it up (and so
            # reach the others over UDP, which Landlock does not rule).
            _drop_capability(libc, _CAP_NET_ADMIN)
            report["network"] = NETWORK_SHARED
        elif libc.unshare(ctypes.c_int(_CLONE_NEWNET)) == 0:
            report["network"] = "isolated: a network namespace of its own"
        else:
            report["network"] = "unconfined: no network namespace (%s)" % os.strerror(ctypes.get_errno())
    finally:
        if shared is not None:
            os.close(shared)
    report["filesystem"] = _landlock(libc, syscall, abi, plan, network, report)
    report["capabilities"] = _drop_all_capabilities(libc)
    report["memory"] = _not_dumpable(libc)
    return report


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
    import errno

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


def _landlock(libc, syscall, abi, plan, network, report):
    import ctypes
    import stat

    if abi < 1:
        return "unconfined: this kernel has no Landlock (%s)" % os.strerror(ctypes.get_errno())
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
        if report.get("network") == NETWORK_SHARED:
            # Unscoped, it may not stay with the others.
            if libc.unshare(ctypes.c_int(_CLONE_NEWNET)) == 0:
                report["network"] = "isolated: a network namespace of its own"
            else:
                report["network"] = "unconfined: in a network namespace shared with other runners, unscoped"
        return "unconfined: cannot create a Landlock ruleset (%s)" % os.strerror(ctypes.get_errno())
    file_only = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    device = _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
    rules = [(p, read) for p in list(plan.get("read") or []) + _runtime_paths()]
    rules += [(p, fs_all) for p in plan.get("write") or []]
    rules += [(p, device) for p in plan.get("devices") or []]
    try:
        for path, access in rules:
            try:
                fd = os.open(str(path), os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not there: nothing to allow
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
    if net and report.get("network", "").startswith("unconfined"):
        report["network"] = "isolated: Landlock denies TCP bind and connect"
    if abi >= 6:
        report["scopes"] = _SCOPES
    return "confined: Landlock ABI %d" % abi


# ---------------------------------------------------------------------------
# The zygote
# ---------------------------------------------------------------------------

# The zygote's control messages (one JSON object per SEQPACKET message) are
# at most this big.
ZYGOTE_MESSAGE_BYTES = 1 << 20
# ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, ``prctl(PR_SET_NAME, ...)``.
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


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
      runs ``main(argv)`` exactly as a runner started with those arguments
      (its process name, as ``ps`` shows it, is the plugin's name).
    - zygote → host ``{"op": "spawned", "id": N, "pid": P}`` or
      ``{"op": "spawn_failed", "id": N, "error": "..."}``.
    - zygote → host ``{"op": "exit", "pid": P, "status": S}`` when a child
      ends (S: the raw wait status, as ``waitpid`` gives it). The child is
      not reaped yet, so its pid (and process group) cannot be reused while
      the host may still signal it.
    - host → zygote ``{"op": "reap", "pid": P}``: the host has recorded the
      death; the zygote reaps the child.

    The zygote forks from its one thread, before any plugin code ran in it
    (and so before CUDA could be touched), and exits at the end of its
    stdin. It never imports plugin code itself."""

    def __init__(self):
        import select
        import signal
        import _socket as socket  # see _shm_socket

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
        self.confine_tools = None  # for the confined runners: see _CONFINE_TOOLS
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
            _diag("zygote: no parent-death signal for runners: %s" % e)
            self.libc = None

    def send(self, message):
        try:
            self.ctl.send(json.dumps(message).encode("utf-8"))
        except OSError:
            _exit(0)  # the host is gone

    def serve(self):
        import gc

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
                ZYGOTE_MESSAGE_BYTES, socket.CMSG_SPACE(4 * fd_size))
        except InterruptedError:
            return
        except OSError as e:
            _diag("zygote: reading the control socket: %s" % e)
            _exit(0)
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
            _exit(0)  # the host closed its end
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
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            _diag("zygote: a bad control message: %s" % e)
            _exit(EXIT_PROTOCOL)
        finally:
            # The runner has its copies (or there is none): a copy left
            # here would keep its pipes open after it dies.
            for fd in fds:
                os.close(fd)

    def spawn(self, message, fds):
        rid = message["id"]
        argv = [str(a) for a in message["argv"]]
        threshold = message.get("shm_threshold")
        expected = 3 if threshold is None else 4
        if len(fds) != expected:
            self.send({"op": "spawn_failed", "id": rid,
                       "error": "%d descriptors came with the request, %d expected" % (len(fds), expected)})
            return
        if not self.netns_tried and "--confine" in argv:
            self.netns_tried = True
            if self.libc is not None:
                # Made once here, not once per runner after the fork.
                self.confine_tools = _confine_tools(self.libc)
            self.netns = self.shared_netns()
        try:
            pid = os.fork()
        except OSError as e:
            self.send({"op": "spawn_failed", "id": rid, "error": "fork: %s" % e})
            return
        if pid == 0:
            self.become_runner(argv, fds, threshold)  # never returns
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
        if libc is None or self.confine_tools is None or os.environ.get(SHARED_NETNS_ENV) == "0":
            return None
        _, _, abi = self.confine_tools
        if abi < 6:
            return None
        try:
            own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if libc.unshare(ctypes.c_int(_CLONE_NEWNET)) != 0:
                return None
            try:
                shared = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                if libc.setns(ctypes.c_int(own), ctypes.c_int(_CLONE_NEWNET)) != 0:
                    # Not back in the host's namespace: runners that were
                    # given the network would not have it.
                    _diag("zygote: cannot go back to its network namespace: %s"
                          % os.strerror(ctypes.get_errno()))
                    _exit(EXIT_SETUP)
            return shared
        except OSError:
            return None
        finally:
            os.close(own)

    def become_runner(self, argv, fds, shm_threshold=None):
        global _PROTO_FDS, _PARENT_DEATH_SIGNAL, _SHM_PASSED, _SHARED_NETNS, _CONFINE_TOOLS
        try:
            if "--confine" in argv:
                _SHARED_NETNS = self.netns
                _CONFINE_TOOLS = self.confine_tools
            elif self.netns is not None:
                os.close(self.netns)
            self.signal.set_wakeup_fd(-1)
            self.signal.signal(self.signal.SIGCHLD, self.signal.SIG_DFL)
            self.ctl.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            os.setpgid(0, 0)
            if self.libc is not None:
                _PARENT_DEATH_SIGNAL = self.libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) == 0
                # ``ps``/``top`` show the plugin's name, not the zygote's
                # command line (which every forked runner shares).
                if "--plugin" in argv[:-1]:
                    name = argv[argv.index("--plugin") + 1].encode("utf-8", "replace")[:15]
                    self.libc.prctl(_PR_SET_NAME, name, 0, 0, 0)
            if os.getppid() != self.pid:
                os._exit(0)  # the zygote died already
            if len(fds) == 4:
                # The shared-memory socket stays where it is (above 2).
                _SHM_PASSED = (fds.pop(), int(shm_threshold))
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            sys.argv[1:] = argv
            _PROTO_FDS = _take_stdio()
        except BaseException as e:
            _diag("zygote: cannot set up a runner: %s" % e)
            os._exit(EXIT_SETUP)
        try:
            main(argv)
        except SystemExit as e:
            _exit(e.code if isinstance(e.code, int) else 1)
        except BaseException as e:
            _diag("runner: %s: %s" % (type(e).__name__, e))
            _exit(EXIT_SETUP)
        _exit(0)

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


def zygote_main():
    global _plugin_name
    _plugin_name = "zygote"
    try:
        zygote = _Zygote()
    except Exception as e:
        _diag("cannot set up: %s" % e)
        _exit(EXIT_SETUP)
    zygote.serve()


def start(argv):
    """The program, whichever way it was started: run as a script (its
    descriptors already moved), or imported as a module from the host's
    cache of this file (compiled once, then loaded from ``__pycache__``;
    see ``forgesyte_loader::python``), which calls ``start`` itself."""
    global _PROTO_FDS
    if argv[:1] == ["--zygote"]:
        zygote_main()
        return
    if _PROTO_FDS is None:
        try:
            _PROTO_FDS = _take_stdio()
        except Exception as e:  # only with broken descriptors
            _diag("cannot set up the protocol pipe: %s" % e)
            _exit(EXIT_SETUP)
    main(argv)


if __name__ == "__main__":
    start(sys.argv[1:])
