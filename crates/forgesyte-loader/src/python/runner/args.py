"""The runner's command line (see the package's docstring)."""

import json
import os

USAGE = (
    "usage: runner --plugin NAME --plugin-dir DIR "
    "(--file PATH | --module DOTTED[:CLASS]) [--class NAME] [--memory-limit-mb N] "
    "[--max-response-bytes N] [--max-result-values N] [--sources-fd N] [--log-level LEVEL]"
)

# The levels ``--log-level`` takes: the lowest a ``logging`` record reaches
# the host at (the host asks for ``debug`` when its log takes plugins'
# DEBUG lines).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    pass


class Args(object):
    def __init__(self):
        self.plugin = "plugin"
        self.plugin_dir = None
        self.file = None
        self.module = None
        self.class_name = None
        self.memory_limit_mb = 0
        # The most bytes an answer may have (0: the protocol's own cap).
        self.max_response_bytes = 0
        self.max_result_values = 0
        # The sandbox the host asks for (``--confine JSON``), None: none.
        self.confine = None
        # An installed package is importable already: its directory must not
        # go first on sys.path, where its files would shadow the standard
        # library (a package's own ``statistics.py``, say).
        self.installed = False
        # A signed or pinned plugin's checked sources (``--sources-fd N``: a
        # memory file of JSON, relative path -> SHA-256), None: not checked.
        self.sources = None
        # The root logger's level (``--log-level``).
        self.log_level = "info"


def _dotted(name):
    """Whether ``name`` is identifiers joined by dots: a module path, or an
    attribute path (``Outer.Plugin``, as an entry point may name one)."""
    return all(part.isidentifier() for part in name.split("."))


def _read_sources(fd_text):
    """The checked sources in memory file ``fd_text`` (a descriptor
    number): a JSON object of relative path -> SHA-256. Read from offset 0
    whatever its offset (the descriptor is shared with the host and the
    plugin's earlier runners); closed after."""
    if not (fd_text.isascii() and fd_text.isdigit()):
        raise UsageError("--sources-fd: not a descriptor number: %r" % fd_text)
    fd = int(fd_text)
    try:
        chunks, offset = [], 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        os.close(fd)
        sources = json.loads(b"".join(chunks).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError("--sources-fd: cannot read the checked sources: %s" % e)
    if not isinstance(sources, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sources.items()):
        raise UsageError("--sources-fd: not a JSON object of strings")
    return sources


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
            if not dotted or (sep and not cls) or not _dotted(dotted) or (cls and not _dotted(cls)):
                raise UsageError("--module: not a DOTTED[:CLASS] name: %r" % spec)
            args.module = dotted
            module_class = cls or None
        elif arg == "--class":
            cls = value()
            if not _dotted(cls):
                raise UsageError("--class: not a class name: %r" % cls)
            args.class_name = cls
        elif arg == "--installed":
            args.installed = True
        elif arg in ("--memory-limit-mb", "--max-response-bytes", "--max-result-values"):
            v = value()
            if not (v.isascii() and v.isdigit()):
                raise UsageError("%s: not a number: %r" % (arg, v))
            setattr(args, arg[2:].replace("-", "_"), int(v))
        elif arg == "--confine":
            try:
                confine = json.loads(value())
            except ValueError as e:
                raise UsageError("--confine: not JSON: %s" % e)
            if not isinstance(confine, dict):
                raise UsageError("--confine: not a JSON object")
            args.confine = confine
        elif arg == "--sources-fd":
            args.sources = _read_sources(value())
        elif arg == "--log-level":
            level = value()
            if level not in LOG_LEVELS:
                raise UsageError("--log-level: not one of %s: %r" % (", ".join(LOG_LEVELS), level))
            args.log_level = level
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
            args.file = os.path.abspath(args.file)
            args.plugin_dir = os.path.dirname(args.file)
        else:
            args.file = os.path.join(args.plugin_dir, args.file)
    return args
