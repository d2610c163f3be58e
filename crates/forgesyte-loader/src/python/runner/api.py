"""What the runner offers plugin code: the call's context and the
plugin's models (``import forgesyte_runner``), and Python ``logging``
records on stderr in the form the host logs (PROTOCOL.md §8)."""

import contextvars
import json
import logging
import os
import sys
import types

from . import errors

# Taken before any plugin code runs (see wire._JSON_DECODE).
_json_dumps = json.dumps


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
CALL = contextvars.ContextVar("forgesyte_call", default=None)


def current_call():
    """The context of the tool call this code runs in (a ``CallContext``),
    or ``None`` outside a call or when the host sent none. Plugins use it
    as ``from forgesyte_runner import current_call``."""
    return CALL.get()


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


def set_models(given):
    """Sets what ``models()`` answers from the create message's ``models``
    (name -> path; anything else is ignored)."""
    _MODELS.clear()
    if isinstance(given, dict):
        _MODELS.update((str(k), v) for k, v in given.items() if isinstance(v, str))


def call_context(message):
    """The ``CallContext`` of a call message, or ``None``."""
    context = message.get("context")
    if context is None:
        return None
    request_id = context.get("request_id")
    traceparent = context.get("traceparent")
    if request_id is None and traceparent is None:
        return None
    return CallContext(request_id, traceparent)


def install_api():
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
        call = CALL.get()
        if not hasattr(record, "request_id"):
            record.request_id = call.request_id if call is not None else None
        if not hasattr(record, "trace_id"):
            record.trace_id = call.trace_id if call is not None else None
        return True


def _standard_level(levelno):
    """The name of the standard ``logging`` level at or below ``levelno``."""
    for floor, name in ((50, "CRITICAL"), (40, "ERROR"), (30, "WARNING"), (20, "INFO")):
        if isinstance(levelno, int) and levelno >= floor:
            return name
    return "DEBUG"


class _Formatter(logging.Formatter):
    # The standard formatter, but for an exception whose message is over
    # ``MAX_LOG_CHARS`` (``log.exception(...)`` of an error that holds a
    # whole input): its traceback's last lines, each cut before it is
    # copied, as a tool's error carries them, not the whole traceback
    # formatted (copies of a message of 100 MB failed under the memory
    # limit, and the record was lost).

    def formatException(self, ei):
        exc = ei[1] if ei else None
        if exc is not None and len(errors.exception_message(exc)) > MAX_LOG_CHARS:
            return "\n".join(errors.traceback_lines(exc))
        return logging.Formatter.formatException(self, ei)


class _StderrHandler(logging.Handler):
    """Each record as one stderr line ``LEVEL name: message``; the host logs
    stderr lines tagged with the plugin's name. Line breaks inside a record
    (tracebacks) are folded into `` | ``. A record made during a call
    starts with the call's tags, ``@call {"request_id": ..., "trace_id":
    ...} `` (PROTOCOL.md §8), which the host logs as fields."""

    def __init__(self):
        logging.Handler.__init__(self)
        self.setFormatter(_Formatter("%(forgesyte_level)s %(name)s: %(message)s"))
        self.addFilter(_CallFilter())

    def emit(self, record):
        try:
            # The standard level at or below the record's: the host knows
            # those five (a custom ``NOTICE`` at 25 is INFO, ``Level 35``
            # WARNING).
            record.forgesyte_level = _standard_level(record.levelno)
            try:
                text = self.format(_cut(record))
            except Exception as e:  # a %-format that does not fit its args, a __str__ that raises
                text = "%s %s: %s" % (record.forgesyte_level, record.name, _unformattable(record, e))
            lines = [l.rstrip() for l in text.splitlines() if l.strip()]
            line = " | ".join(lines) + "\n"
            tags = {}
            call = CALL.get()
            for key in ("request_id", "trace_id"):
                value = getattr(record, key, None)
                if not isinstance(value, str):
                    # An ``extra`` of another type does not hide the call's.
                    value = getattr(call, key, None) if call is not None else None
                if isinstance(value, str):
                    tags[key] = value
            if tags:
                line = LOG_TAG_PREFIX + _json_dumps(tags, separators=(",", ":")) + " " + line
            data = line.encode("utf-8", "backslashreplace")
            view = memoryview(data)
            while view:
                view = view[os.write(2, view):]
        except Exception:
            self.handleError(record)


# The most characters of a record's message written (the host keeps 4 KiB
# of a stderr line).
MAX_LOG_CHARS = 16 * 1024


def _cut(record):
    # ``record``, or a copy of it whose message is cut to
    # ``MAX_LOG_CHARS``, saying so: a message of 150 MB formatted whole,
    # split and encoded failed under the runner's memory limit, and the
    # record was lost (``--- Logging error ---``).
    message = record.getMessage()
    if len(message) <= MAX_LOG_CHARS:
        return record
    fields = dict(record.__dict__)
    fields["msg"] = "%s… (%d characters cut)" % (message[:MAX_LOG_CHARS], len(message) - MAX_LOG_CHARS)
    fields["args"] = None
    return logging.makeLogRecord(fields)


def _unformattable(record, error):
    """What a record whose message cannot be made says instead: one line at
    its level, with its call's tags (``logging`` printed a traceback of some
    40 untagged lines, the level lost)."""

    def shown(value, how=repr):
        try:
            return how(value)
        except Exception:
            return "<unprintable %s>" % type(value).__name__

    return "<message %s with arguments %s cannot be formatted: %s: %s>" % (
        shown(record.msg), shown(record.args), type(error).__name__, shown(error, str))


def setup_logging(level="info"):
    """Records from ``level`` up (a name of ``args.LOG_LEVELS``) reach the
    host, one line each on stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_StderrHandler())
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
