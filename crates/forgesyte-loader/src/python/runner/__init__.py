"""ForgeSyte Python plugin runner: one plugin, in its own process.

The ForgeSyte host starts this program under the plugin's own interpreter
and speaks the child-process wire protocol, version 2, with it: requests
on stdin, answers on the original stdout, log lines on stderr. The protocol
is specified in ``crates/forgesyte-protocol/PROTOCOL.md``, whose Rust
rendering is ``forgesyte_protocol::wire``; this package is the Python side
of it and mirrors the native runner (``forgesyte_loader::process::runner``):

1. Moves the protocol off fd 1 before anything else runs (once the runner's
   own modules are imported, which write nothing): the original stdout is
   duplicated to a private close-on-exec descriptor for frames and fd 1 is
   pointed at stderr, so ``print()`` in plugins (and C code writing to fd 1)
   lands in the log instead of corrupting the protocol. stdin gets the same
   treatment (a private descriptor; fd 0 becomes /dev/null), so a plugin
   that reads stdin cannot steal request bytes. A runner the host starts
   itself gets ``--protocol-fd N`` first on its command line: its frames go
   to descriptor N, and its fd 1 is its stderr from the start, so what the
   interpreter's own start prints (a ``.pth`` file, ``sitecustomize``)
   reaches the log too.
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

    runner [--protocol-fd N] --plugin NAME --plugin-dir DIR
           (--file PATH | --module DOTTED[:CLASS]) [--class NAME]
           [--memory-limit-mb N] [--max-response-bytes N] [--max-result-values N] [--sources-fd N]
           [--installed] [--confine PLAN] [--log-level LEVEL]
    runner --zygote

``--file`` loads a seed-layout plugin (``plugin.py`` in the plugin
directory; ``--library`` is accepted as another spelling of it, and
``--plugin-dir`` then defaults to the file's directory); ``--module``
imports a package module (``forgesyte_ocr.plugin`` or
``forgesyte_ocr.plugin:OCRPlugin``).

The package's modules, each one concern (only this one imports the
zygote)::

    base      exit codes, diagnostics, how the process ends, the hand-over
    args      the command line
    main      one runner's set-up and life: the hello, then ``serve``
    serve     reading requests, constructing, calling, answering
    wire      frames, attachments, shared memory, request envelopes
    errors    exceptions as WireErrors, tracebacks without the runner's frames
    results   attachments placed in arguments; results to JSON + attachments
    tools     the plugin's tool list and schemas
    loading   importing the plugin's code, finding its class
    api       ``import forgesyte_runner``; logging records on stderr
    confine   the sandbox: environment, network, Landlock, capabilities,
              not dumpable, a seccomp filter
    zygote    the pre-started interpreter that forks runners

The host imports this package from its private cache of these files, or,
for a runner that runs as another user, from their sources handed over on
the command line (``forgesyte_loader::python``), and calls ``start``.
Importing the package imports every module (no module imports another
inside a function): the host writes their bytecode, or serves their
sources, during that import only.
"""

from .base import EXIT_SETUP, Handover, diag, exit_now, take_stdio
from .main import main
from .zygote import zygote_main


def start(argv):
    """The program: ``--zygote`` makes this process a zygote; anything else
    is a runner's command line. Called by the host's bootstrap right after
    the import, before anything else touches the process's descriptors."""
    if argv[:1] == ["--zygote"]:
        zygote_main(confined=argv[1:2] == ["--confined"])
        return
    try:
        argv, out = _protocol_fd(argv)
        proto_fds = take_stdio(out)
    except Exception as e:  # only with broken descriptors
        diag("cannot set up the protocol pipe: %s" % e)
        exit_now(EXIT_SETUP)
    main(argv, Handover(proto_fds))


# ``--protocol-fd N`` first on a runner's command line: the descriptor the
# host reads the protocol from, given to a runner it starts itself (not to
# one a zygote forks: that one's start-up is over before its fd 1 is the
# protocol). The interpreter's own start (a ``.pth`` file, a
# ``sitecustomize`` that prints) writes to fd 1, the log.
PROTOCOL_FD = "--protocol-fd"


def _protocol_fd(argv):
    """``argv`` without a leading ``--protocol-fd N``, and N (or None)."""
    if argv[:1] == [PROTOCOL_FD] and len(argv) > 1:
        return argv[2:], int(argv[1])
    return argv, None
