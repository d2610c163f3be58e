"""Errors as the wire carries them (PROTOCOL.md §6, ``WireError``): a
Python exception with the last lines of its traceback (the runner's own
frames left out), or a kind and a message."""

import errno
import os
import traceback

from .base import innermost_traceback, is_runner_file

TRACEBACK_LINES = 10
# The most characters of an error's message, and of each traceback line,
# carried: an exception with a huge message (a whole input in it) made an
# error frame over the host's frame limit, and the host then killed the
# runner instead of reporting the tool's error.
MAX_ERROR_CHARS = 64 * 1024
# The most characters of an exception's class name carried (``error_type``
# is a name, shown beside the message; one of 100,000 characters was
# carried as 64 KiB).
MAX_TYPE_CHARS = 256


def clean(text):
    """Text that encodes as UTF-8 (lone surrogates replaced)."""
    text = text if isinstance(text, str) else str(text)
    return text.encode("utf-8", "replace").decode("utf-8")


def capped(text, limit=MAX_ERROR_CHARS):
    """``text`` cut to ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    return "%s… (%d characters cut)" % (text[:limit], len(text) - limit)


def clean_capped(text, limit=MAX_ERROR_CHARS):
    # ``capped(clean(text), limit)``, cut before it is encoded or copied:
    # a message of 100 MB (a whole input in it, ``"not a PNG: %r" % data``)
    # encoded whole failed with a ``MemoryError`` under the runner's memory
    # limit, and the tool's error became the runner's.
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return clean(text)
    return "%s… (%d characters cut)" % (clean(text[:limit]), len(text) - limit)


def exception_message(exc):
    """``str(exc)``, or ``<unprintable Class>`` when that raises."""
    try:
        return str(exc)
    except BaseException:  # even SystemExit from a plugin's __str__
        return "<unprintable %s>" % exc.__class__.__name__


def traceback_lines(exc):
    """The last lines of ``exc``'s traceback, without the runner's frames
    or importlib's; the exception's lines alone when none is left (an
    error the runner raised about the plugin: a heading over no frames
    read as a traceback cut short)."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not is_runner_file(f.filename) and not f.filename.startswith("<frozen importlib")
    ]
    lines = ["Traceback (most recent call last):"] if frames else []
    for chunk in traceback.format_list(frames):
        lines.extend(chunk.rstrip("\n").splitlines())
    lines = [clean_capped(l) for l in lines[-TRACEBACK_LINES:]]
    message = exception_message(exc)
    if len(message) <= MAX_ERROR_CHARS:
        told = []
        for chunk in traceback.format_exception_only(type(exc), exc):
            told.extend(chunk.rstrip("\n").splitlines())
        told = [clean_capped(l) for l in told[-TRACEBACK_LINES:]]
    else:
        # Not formatted whole: its copies (a line for each of its lines,
        # each encoded) of a message of 100 MB failed under a memory limit.
        # Its last lines alone, as the standard library would end them.
        told, whole = _last_lines(message, TRACEBACK_LINES)
        if whole:
            told[0] = "%s: %s" % (clean_capped(_class_name(exc), MAX_TYPE_CHARS), told[0])
    return (lines + told)[-TRACEBACK_LINES:]


def _class_name(exc):
    # ``exc``'s class as a traceback names it: ``module.Qualified`` (the
    # module left out for built-ins).
    kind = type(exc)
    name = getattr(kind, "__qualname__", kind.__name__)
    module = getattr(kind, "__module__", None)
    if module in ("__main__", "builtins"):
        return name
    return "%s.%s" % (module if isinstance(module, str) else "<unknown>", name)


def _last_lines(text, count):
    # The last ``count`` lines of ``text`` (newlines at its end left out),
    # each cut to ``MAX_ERROR_CHARS`` as ``clean_capped`` cuts, and whether
    # the first of them is its first: only those lines' kept characters are
    # copied.
    end = len(text)
    while end and text[end - 1] == "\n":
        end -= 1
    lines = []
    while len(lines) < count:
        start = text.rfind("\n", 0, end) + 1
        # A "\r\n" line ends as `splitlines` ends it.
        stop = end - 1 if end > start and text[end - 1] == "\r" else end
        length = stop - start
        if length <= MAX_ERROR_CHARS:
            lines.append(clean(text[start:stop]))
        else:
            lines.append("%s… (%d characters cut)"
                         % (clean(text[start:start + MAX_ERROR_CHARS]), length - MAX_ERROR_CHARS))
        if start == 0:
            lines.reverse()
            return lines, True
        end = start - 1
    lines.reverse()
    return lines, False


def _traceback_or_line(exc):
    """``traceback_lines(exc)``, or one line when the traceback cannot be
    formatted (the standard library raises for a SyntaxError whose
    details are not what it expects, an offset given as a string): the
    error is still told, never a second one raised."""
    try:
        return traceback_lines(exc)
    except BaseException:
        return [exception_line(exc)]


def exception_line(exc):
    # ``Class: message``, each cut first.
    return "%s: %s" % (clean_capped(exc.__class__.__name__, MAX_TYPE_CHARS),
                       clean_capped(exception_message(exc)))


def address_space_hint(message):
    """What to say after ``message`` when it is a shared library that could
    not be mapped (``dlopen``'s ENOMEM: it read as a broken wheel), or
    OpenCV's failed allocation (a ``cv2.error``, a tool error that never
    named the limit), under an address-space limit. None otherwise."""
    if "failed to map segment from shared object" in message:
        what = "a shared library could not be mapped"
    elif "(-4:Insufficient memory)" in message:  # OpenCV's cv2.error
        what = "an allocation failed"
    else:
        return None
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except Exception:  # no resource module, no such limit
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return ("%s within the runner's address-space limit of %d MiB: "
            "raise the manifest's limits.memory_mb, else the server's --memory-limit; libraries such as "
            "OpenBLAS reserve address space for each of their threads" % (what, soft >> 20))


def python_error(exc, kind="Python"):
    """A WireError for a Python exception."""
    message = exception_message(exc)
    hint = address_space_hint(message)
    if hint is not None:
        message = "%s (%s)" % (message, hint)
    error = {
        "kind": kind,
        "error_type": clean_capped(exc.__class__.__name__, MAX_TYPE_CHARS),
        "message": clean_capped(message),
        "traceback": _traceback_or_line(exc),
    }
    if isinstance(exc, ImportError) and getattr(exc, "name", None):
        error["name"] = clean_capped(exc.name)
    return error


# Said after the message of an error that a confined runner's seccomp
# filter may have caused (``confine._seccomp``: it refuses with EACCES, and
# no path comes with such an error, as one would from Landlock).
FILTERED_HINT = (
    "a confined runner refuses a new session or process group "
    "(subprocess's start_new_session, process_group, preexec_fn=os.setpgrp), "
    "System V IPC, io_uring, keyrings, a new namespace (unshare, a sandbox of its own such "
    "as Chromium's), another process's limits (resource.prlimit), a signal to every "
    "process, another process group "
    "or its parents and, without the network, new Unix sockets: see the README, "
    "\"Confined runners\"")


def filtered_by_seccomp(exc):
    """Whether ``exc`` looks like a call the seccomp filter refused: a
    ``PermissionError`` (EACCES) that names no file, or ``subprocess``'s
    report of a ``preexec_fn`` that raised (``os.setpgrp`` refused in the
    child)."""
    if isinstance(exc, PermissionError):
        return exc.errno == errno.EACCES and exc.filename is None
    return (type(exc).__module__ == "subprocess" and type(exc).__name__ == "SubprocessError"
            and "preexec_fn" in exception_message(exc))


# Said after the message of an error that a confined runner's file rules
# may have caused (Landlock refuses with EACCES, and the error names the
# path).
FILESYSTEM_HINT = (
    "a confined runner reads only its plugin's files, its interpreter's, its "
    "dependencies' and its models, and writes only to its scratch directory "
    "($TMPDIR, $HOME): the manifest's \"filesystem\": {\"read\": [...], \"write\": "
    "[...]} widens it (for a signed plugin, or with --sandbox-widening allow), "
    "--confine off turns it off: see the README, \"Confined runners\"")
# Said after the message of a connection or name lookup that failed in a
# runner without the network.
NETWORK_HINT = (
    "a confined runner has no network: the manifest's \"network\": true gives it "
    "one (for a signed plugin, or with --sandbox-widening allow), --confine off "
    "turns it off: see the README, \"Confined runners\"")
# Said after the message of a variable the runner's scrubbed environment
# does not hold.
ENV_HINT = (
    "a confined runner's environment holds only the variables every runner "
    "keeps and those its manifest's \"env\" names (for a signed plugin, or with "
    "--sandbox-widening allow): see the README, \"Confined runners\"")


# Said after the message of a POSIX shared memory segment or semaphore
# that a confined runner may not create (they are files in /dev/shm:
# multiprocessing's shared_memory, Lock, Queue, Pool).
SHM_HINT = (
    "POSIX shared memory and semaphores (multiprocessing's shared_memory, Lock, Queue, "
    "Pool) are files in /dev/shm, which a confined runner may not create: the manifest's "
    "\"filesystem\": {\"write\": [\"/dev/shm\"]} allows it (for a signed plugin, or with "
    "--sandbox-widening allow); threads need none of it: see the README, \"Confined runners\"")


def _posix_ipc(exc, e):
    """Whether ``e`` (an ``OSError`` in ``exc``'s chain) is the refusal of
    a POSIX shared memory segment (``shm_open`` names ``/psm_…``, ``/mp-…``)
    or of a semaphore (``multiprocessing.synchronize``'s ``SemLock``, whose
    error names no file)."""
    name = e.filename
    if isinstance(name, str) and name.startswith(("/psm_", "/mp-")) and "/" not in name[1:]:
        return True
    code = _innermost(exc)
    return (code is not None and name is None
            and os.path.basename(code.co_filename) == "synchronize.py")


def _enforced(confinement, part):
    """Whether part ``part`` of a confinement report is enforced."""
    value = confinement.get(part) if confinement else None
    return isinstance(value, str) and not value.startswith(("unconfined", "allowed"))


def _causes(exc):
    """``exc``, then what it wraps (``URLError.reason``, its cause or
    context), a few links deep."""
    seen = []
    while isinstance(exc, BaseException) and len(seen) < 8 and all(exc is not e for e in seen):
        seen.append(exc)
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else (exc.__cause__ or exc.__context__)
    return seen


def _innermost(exc):
    """The code of the innermost frame of ``exc``'s traceback, or None."""
    tb = innermost_traceback(exc)
    return None if tb is None else tb.tb_frame.f_code


def _from_the_environment(exc):
    """Whether ``exc`` is a ``KeyError`` that ``os.environ[...]`` raised (the
    innermost frame of its traceback is ``os``'s mapping's)."""
    code = _innermost(exc) if isinstance(exc, KeyError) else None
    # ``<frozen os>``: the module is frozen into the interpreter (3.11+).
    return (code is not None and code.co_name == "__getitem__"
            and (code.co_filename == "<frozen os>" or os.path.basename(code.co_filename) == "os.py"))


def _from_a_socket(exc):
    """Whether the innermost frame of ``exc``'s traceback is ``socket``'s."""
    code = _innermost(exc)
    return code is not None and os.path.basename(code.co_filename) == "socket.py"


def sandbox_hint(exc, confinement):
    """What a confined runner's sandbox (``confinement``: the hello's
    report, None when not confined) may have had to do with ``exc``, said
    after its message; None when nothing. A refusal reads as the system
    call's error alone (``PermissionError: [Errno 13] Permission denied:
    '/srv/token'``, ``KeyError: 'API_KEY'``), which does not say that the
    sandbox refused it, nor how to widen it."""
    if not confinement:
        return None
    if _enforced(confinement, "env") and _from_the_environment(exc):
        return ENV_HINT
    for e in _causes(exc):
        if not isinstance(e, OSError):
            continue
        if e.errno == errno.EACCES and _enforced(confinement, "filesystem") and _posix_ipc(exc, e):
            return SHM_HINT
        if e.errno == errno.EACCES and e.filename is not None and _enforced(confinement, "filesystem"):
            return FILESYSTEM_HINT
        if _enforced(confinement, "network") and (
                e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
                or type(e).__name__ == "gaierror"
                or (e.errno == errno.EACCES and e.filename is None and _enforced(confinement, "syscalls")
                    and (exc is not e or _from_a_socket(e)))):
            # A socket refused (by the filter, under a URLError or a
            # requests error), or a network namespace without routes.
            return NETWORK_HINT
    if _enforced(confinement, "syscalls") and filtered_by_seccomp(exc):
        return FILTERED_HINT
    return None


def with_sandbox_hint(error, exc, confinement):
    """``error`` (a WireError of ``exc``), its message followed by
    :func:`sandbox_hint`'s, when there is one."""
    hint = sandbox_hint(exc, confinement)
    if hint is not None:
        error["message"] = "%s (%s)" % (error["message"], hint)
    return error


# What an error keeps of its message when the whole error does not fit in
# the answer limit: characters, each at most 6 bytes encoded.
FITTED_CHARS = 16 * 1024


def fitted(error):
    """``error`` (a WireError) whose answer is over the answer limit, made
    to fit: without its traceback, its message and names cut to
    ``FITTED_CHARS``. (A message of 64 Ki characters of 4 bytes each and
    ten traceback lines as long made a 2.9 MB error answer, over a 1 MiB
    limit, and the host killed the runner for it.)"""
    error = dict(error, traceback=[])
    for key in ("message", "error_type", "name"):
        value = error.get(key)
        if isinstance(value, str):
            error[key] = capped(value, FITTED_CHARS)
    return error


def wire_error(kind, message, **fields):
    error = {"kind": kind, "message": clean_capped(message)}
    for key, value in fields.items():
        if value is not None:
            error[key] = clean_capped(value) if isinstance(value, str) else value
    return error
