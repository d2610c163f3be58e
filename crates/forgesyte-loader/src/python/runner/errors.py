"""Errors as the wire carries them (PROTOCOL.md §6, ``WireError``): a
Python exception with the last lines of its traceback (the runner's own
frames left out), or a kind and a message."""

import errno
import traceback

from .base import is_runner_file

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


def python_error(exc, kind="Python"):
    """A WireError for a Python exception."""
    error = {
        "kind": kind,
        "error_type": clean_capped(exc.__class__.__name__, MAX_TYPE_CHARS),
        "message": clean_capped(exception_message(exc)),
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
    "System V IPC, io_uring, a signal to every process, another process group "
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


def with_filter_hint(error, exc, filtered):
    """``error`` (a WireError of ``exc``), its message followed by
    ``FILTERED_HINT`` when the runner is ``filtered`` and ``exc`` looks
    like one of the filter's refusals."""
    if filtered and filtered_by_seccomp(exc):
        error["message"] = "%s (%s)" % (error["message"], FILTERED_HINT)
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
