"""Serving a plugin: requests read and run leader/followers style (see
``Runner.serve``), the instance constructed on ``create``, each call
dispatched to ``run_tool`` or the tool's handler and its result answered."""

import base64
import errno
import os
import threading
import time
import traceback
import types

from . import api
from .base import (EXIT_CHANNEL, EXIT_MEMORY, EXIT_PROTOCOL, MIB, diag, exit_now,
                   out_of_memory, out_of_memory_unless_raised)
from .errors import exception_line, fitted, python_error, wire_error, with_sandbox_hint
from .loading import check_name, find_class
from .results import PointerError, ResultError, max_result_values, place, to_wire, unencodable_error
from .tools import (collect_tools, resolve_handler, takes_up_the_contract, unencodable_spec)
from .wire import MAX_ATTACHMENTS, MAX_FRAME_BYTES, ProtocolError, Shared, encode, frame_size, parse_request

# How long on_unload() may run at the end of stdin: under the host's 2 s
# between closing stdin and SIGKILL (PROTOCOL.md §8, Stop), so a runner
# whose on_unload() hangs still exits by itself, code 0.
UNLOAD_GRACE_S = 1.5
# How often the watch thread looks whether the reader is still in the same
# call (and so makes another thread the reader), and how many ticks without
# a call it waits before it sleeps (see `Runner.serve`).
HANDOVER_TICK_S = 0.001
HANDOVER_QUIET_TICKS = 100
# The traceback of a result that could not be sent: the tool returned, so
# no line of the plugin's is to blame, but its author reads the host's log
# of it as of an exception the tool raised (the answer never holds it).
NOT_SENT = ["(the tool returned; its result could not be sent)"]

_MISSING = object()

# How a handler takes its arguments, by (function, kind of callable,
# argument names): True as keywords, False as the one dict, None neither
# (see `bind_and_call`). Working it out with `inspect` costs more than a quick
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
    # its error (the handler must not run again with another shape). The
    # dict as the one argument only when no argument names a parameter:
    # ``detect(self, image, threshold=0.5)`` called with a threshold and no
    # image is missing its image, not handed the dict as one.
    parameters = list(signature.parameters.values())
    if (len(parameters) == 1 and parameters[0].name == "args"
            and parameters[0].kind in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD)):
        # ``def detect(self, args)``: the dict, whole, even when a client
        # names an argument ``args`` (bound as a keyword it took that
        # argument's value in place of the dict).
        return False
    shapes = [(True, (), args)]
    if not any(name in signature.parameters for name in args):
        shapes.append((False, (args,), {}))
    for keywords, shape_args, shape_kwargs in shapes:
        try:
            signature.bind(*shape_args, **shape_kwargs)
        except TypeError:
            continue
        return keywords
    return None


def bind_and_call(fn, args):
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


# The runner's one event loop, for every coroutine a plugin returns (an
# ``async def`` tool, handler or hook): started on a thread of its own by
# the first. One loop, not ``asyncio.run`` per call: what ``on_load()``
# made (an ``asyncio.Lock``, a client session) is bound to the loop it was
# made on, and every later call must run there to use it (each call on a
# fresh loop raised "bound to a different event loop", or deadlocked).
_LOOP = None
_LOOP_LOCK = threading.Lock()


def _event_loop():
    """The runner's event loop, started on its thread by the first caller;
    None when no thread can be had (memory): the caller then runs its
    coroutine on a loop of its own."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            import asyncio

            loop = asyncio.new_event_loop()
            try:
                threading.Thread(target=_run_loop, args=(loop,), name="forgesyte-asyncio",
                                 daemon=True).start()
            except RuntimeError:
                loop.close()
                return None
            _LOOP = loop
        return _LOOP


def _run_loop(loop):
    """Runs ``loop`` for the runner's life, or every coroutine call after
    it stopped would wait for ever. ``SystemExit`` and ``KeyboardInterrupt``
    raised in a task a plugin started (``gather``, ``wait_for``,
    ``create_task``) leave ``run_forever`` after the task took them (the
    coroutines awaiting it get them), and a plugin may call
    ``loop.stop()``: the loop is run again. A loop the plugin closed is
    forgotten: the next coroutine starts another."""
    global _LOOP
    said = False  # a plugin that stops the loop over and over is said once
    while not loop.is_closed():
        try:
            loop.run_forever()
            if not said:
                said = True
                diag("the plugin stopped the event loop; it runs on (said once)")
        except (SystemExit, KeyboardInterrupt) as e:
            diag("a task of the plugin raised %s out of the event loop; it runs on"
                 % type(e).__name__)
        except Exception as e:  # closed between two runs
            if not loop.is_closed():
                diag("the event loop failed (%s: %s); it runs on" % (type(e).__name__, e))
    with _LOOP_LOCK:
        if _LOOP is loop:
            _LOOP = None


def _forget_loop_in_child():
    # A process the plugin forks has the loop but not its thread.
    global _LOOP, _LOOP_LOCK
    _LOOP, _LOOP_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_loop_in_child)


async def _in_call(coroutine, call):
    # A task starts from its loop thread's context: the call's context is
    # set again in the task's own, so its log records and
    # ``current_call()`` (and the tasks it starts) see the call.
    import asyncio

    api.CALL.set(call)
    try:
        return False, await coroutine
    except (SystemExit, KeyboardInterrupt, asyncio.CancelledError) as e:
        # Out of a task these two stop the loop itself: the caller raises
        # them instead (``sys.exit()`` in a tool is that tool's error). A
        # ``CancelledError`` would cancel the future the caller waits on,
        # which raises one of its own, its message lost.
        return True, e


def await_result(result):
    """``result``, or what it returns when it is a coroutine, run to its
    end on the runner's event loop (``_event_loop``) while this thread
    waits; its exception is raised here. A coroutine that returns another
    (an ``async def`` tool returning one it did not await) has that one
    run too, as a sync tool's returned coroutine is."""
    while isinstance(result, types.CoroutineType):
        import asyncio

        loop = _event_loop()
        if loop is None:
            result = asyncio.run(result)
            continue
        future = asyncio.run_coroutine_threadsafe(_in_call(result, api.CALL.get()), loop)
        escaped, value = future.result()
        if escaped:
            raise value
        result = value
    return result


def hooks_of(instance, contract):
    """The lifecycle hooks that are called for ``instance``: ForgeSyte's
    (``validate``, ``on_load``, ``on_unload``) when it takes up the
    contract (``contract``: :func:`takes_up_the_contract`); none for a seed
    plugin, which the seed only constructed (a method of its own of such a
    name, ``validate(self, image)``, is left alone: an INFO line says so)."""
    if contract:
        return ("validate", "on_load", "on_unload")
    own = [hook for hook in ("validate", "on_load", "on_unload")
           if callable(getattr(type(instance), hook, None))]
    if own:
        diag("%s not called: the plugin does not take up ForgeSyte's contract (no run_tool(), no "
             "BasePlugin, no tools naming a handler), and the seed's plugins are only "
             "constructed" % ", ".join(hook + "()" for hook in own))
    return ()


def _config_refused(config):
    """The answer to a ``create`` whose ``config`` is no object (PROTOCOL.md
    §5.1): ``init_failed`` of kind ``Protocol``, as the native runner
    answers it (its SDK cannot read such a config), rather than a plugin
    constructed as if the host had sent ``{}``. A present ``null`` is such
    a config, not a missing field (that one exits 65)."""
    kind = "null" if config is None else {bool: "a boolean", str: "a string", list: "an array"}.get(
        type(config), "a number")
    return wire_error("Protocol", "'config' is not an object but %s" % kind)


class Runner(object):
    def __init__(self, args, wire, module):
        self.args = args
        self.wire = wire
        self.module = module
        self.instance = None
        self.tools = {}
        self.hooks = ()
        # The host's limit on an answer (``--max-response-bytes``: the
        # manifest's ``limits.max_response_mb`` or the host's default),
        # frame and shared attachments together: a result over it fails as
        # a tool error here rather than the host killing the runner for it.
        given = getattr(args, "max_response_bytes", 0)
        self.max_response = min(given or MAX_FRAME_BYTES, MAX_FRAME_BYTES)
        self.max_response_given = bool(given)
        # The most values a result may hold: the host's own figure
        # (``--max-result-values``, from the server's --max-response,
        # which a manifest's limit does not lower), else worked out as the
        # host does.
        self.max_values_given = getattr(args, "max_result_values", 0)
        self.create_lock = threading.Lock()
        # What confines it (the hello's report, set by ``main`` once
        # confined; None: nothing): errors its sandbox may have caused say
        # so, and how to widen it.
        self.confinement = None
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
            diag("cannot encode an answer: %s" % e)
            exit_now(EXIT_PROTOCOL)
        self.wire.send_frame(header, attachments)

    def tool_failed(self, rid, error):
        self.failed("tool_failed", rid, error)

    def init_failed(self, rid, error):
        self.failed("init_failed", rid, error)

    def failed(self, kind, rid, error):
        """An error answer, cut to fit the answer limit (the host ends a
        runner whose answer is over it)."""
        message = {"type": kind, "id": rid, "error": error}
        try:
            header = encode(message)
        except (ValueError, UnicodeEncodeError):
            header = None  # answer() says why it cannot be sent
        if header is not None and len(header) <= self.max_response - 1024:
            # Encoded once: the answer as it is.
            self.wire.send_frame(header, ())
            return
        if header is not None:
            message["error"] = fitted(error)
        self.answer(message)

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
                if frame is not None:
                    header, attachments = frame
                    request = parse_request(header)
            except ProtocolError as e:
                diag("reading stdin: %s" % e)
                exit_now(self.wire.exit_code(EXIT_PROTOCOL))
            except MemoryError:
                # As in a tool: out of memory, the process is not to be
                # trusted any more.
                diag("MemoryError: out of memory reading a request")
                exit_now(EXIT_MEMORY)
            except BaseException as e:
                # Anything else (an OSError on the pipe, a RecursionError
                # from a deeply nested header, a bug of the runner's own)
                # would end this thread silently and leave no reader: the
                # host would wait for its timeout. End the process instead.
                diag("reading stdin: %s: %s" % (type(e).__name__, e))
                exit_now(self.wire.exit_code(EXIT_PROTOCOL))
            if frame is None:
                # The end of the stream: the host's, unless plugin code
                # closed or replaced the request descriptor.
                if self.wire.channel_closed():
                    exit_now(EXIT_CHANNEL)
                self.shutdown()
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
                diag("cannot start a thread to read the next request: %s" % e)
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
                token = api.CALL.set(api.call_context(request))
                try:
                    self.call(rid, request["tool"], request["args"],
                              request.get("attachments", []), attachments)
                finally:
                    api.CALL.reset(token)
        except BaseException as e:  # a bug of the runner's own
            try:
                told = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            except BaseException:  # an error whose traceback cannot be formatted
                told = exception_line(e)
            diag("internal error: %s" % told)
            error = wire_error("Protocol", "python runner: %s" % exception_line(e))
            if request["op"] == "create":
                self.init_failed(rid, error)
            else:
                self.tool_failed(rid, error)

    def shutdown(self):
        """End of stdin: the host let this runner go."""
        instance = self.instance
        hook = (getattr(instance, "on_unload", None)
                if instance is not None and "on_unload" in self.hooks else None)
        if callable(hook):

            def unload():
                try:
                    await_result(hook())
                except BaseException as e:
                    diag("on_unload() failed: %s: %s" % (type(e).__name__, e), warning=True)

            try:
                t = threading.Thread(target=unload, name="forgesyte-unload", daemon=True)
                t.start()
            except BaseException as e:  # no thread to be had (memory): here, then
                diag("on_unload() runs on the reader (no thread: %s: %s)" % (type(e).__name__, e))
                unload()  # the host's kill bounds it
            else:
                t.join(UNLOAD_GRACE_S)
                if t.is_alive():
                    diag("on_unload() still running after %g s; exiting anyway" % UNLOAD_GRACE_S, warning=True)
        exit_now(0)

    # -- create ---------------------------------------------------------

    def create(self, rid, config):
        with self.create_lock:
            if self.instance is not None:
                self.init_failed(rid, wire_error("Protocol", "this runner already holds an instance"))
                return
            if not isinstance(config, dict):
                self.init_failed(rid, _config_refused(config))
                return
            manifest = config.get("manifest")
            api.set_models(config.get("models"))
            try:
                # Plugin code may run here too: a module's ``__getattr__``, a
                # metaclass's attribute look-ups.
                cls = find_class(self.module, self.args.class_name)
                if isinstance(cls, dict):
                    self.init_failed(rid, cls)
                    return
                instance = cls()  # the seed's contract: no arguments
                contract = takes_up_the_contract(instance)
                hooks = hooks_of(instance, contract)
                for hook in ("validate", "on_load"):
                    method = getattr(instance, hook, None) if hook in hooks else None
                    if callable(method):
                        await_result(method())
                specs, table = collect_tools(instance, manifest, contract)
                if not specs:
                    # Loaded and ready, yet nothing can be called (a class
                    # of an older plugin API, ``analyze(image_bytes,
                    # options)``): said, not left to be found out; a
                    # warning when the plugin takes up ForgeSyte's contract
                    # (the seed's plugins have no tools: a note).
                    diag("the plugin offers no tools: neither its instance's `tools` nor its "
                         "manifest's list one, so nothing of it can be called (a ForgeSyte "
                         "plugin lists its tools in a `tools` dict, tool name -> {\"handler\": "
                         "..., \"description\", \"input_schema\", \"output_schema\"}, and may "
                         "dispatch them in run_tool(tool_name, args))",
                         warning=contract)
                # Encoded here: a spec that cannot be (text that is not
                # valid Unicode) fails construction, not the runner, its
                # text named where it is.
                try:
                    encode({"tools": specs})
                except UnicodeEncodeError:
                    located = unencodable_spec(specs)
                    if located is None:
                        raise
                    raise located from None
                check_name(instance, self.args.plugin)
            except BaseException as e:
                out_of_memory_unless_raised(e, "constructing the plugin")
                self.init_failed(rid, with_sandbox_hint(python_error(e), e, self.confinement))
                return
            if not self.max_response_given:
                # Started without the host's limit (by hand, by a test):
                # the manifest's, when it gives one.
                limits = manifest.get("limits") if isinstance(manifest, dict) else None
                mb = limits.get("max_response_mb") if isinstance(limits, dict) else None
                if isinstance(mb, int) and not isinstance(mb, bool) and mb > 0:
                    self.max_response = min(mb * MIB, MAX_FRAME_BYTES)
            self.tools = table
            self.hooks = hooks
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
        except PointerError as e:
            self.tool_failed(rid, wire_error("InvalidArgs", str(e)))
            return
        except MemoryError as e:
            out_of_memory(e, "taking the arguments of tool '%s'", tool)
        except OSError as e:
            if e.errno != errno.ENOMEM:
                raise
            out_of_memory(e, "mapping the arguments of tool '%s'", tool)
        try:
            result = await_result(self.dispatch(instance, tool, entry, args))
        except BaseException as e:
            # The tool's own failure (SystemExit from sys.exit() included:
            # it only ends this thread; a MemoryError its code raised): an
            # error, the plugin stays healthy. A failed allocation ends the
            # runner.
            out_of_memory_unless_raised(e, "in tool '%s'", tool)
            self.tool_failed(rid, with_sandbox_hint(python_error(e, kind="Failed"), e, self.confinement))
            return
        self.send_result(rid, result)

    def dispatch(self, instance, tool, entry, args):
        run_tool = getattr(instance, "run_tool", None)
        if callable(run_tool):
            return run_tool(tool, args)
        return bind_and_call(resolve_handler(instance, tool, entry.get("handler")), args)

    def send_result(self, rid, result):
        value = None  # unset when the conversion itself raised
        try:
            value, blobs = to_wire(result, self.max_values_given or max_result_values(self.max_response))
            message = {"type": "result", "id": rid, "result": value}
            if blobs:
                message["attachments"] = [pointer for pointer, _ in blobs]
            header = encode(message)
        except ResultError as e:
            self.tool_failed(rid, wire_error("Failed", str(e), error_type=e.error_type,
                                             traceback=NOT_SENT))
            return
        except UnicodeEncodeError as e:
            located = unencodable_error(value) if value is not None else None
            self.tool_failed(rid, wire_error(
                "Failed", str(located) if located else "tool result is not valid Unicode: %s" % e,
                error_type="UnicodeEncodeError", traceback=NOT_SENT))
            return
        except BaseException as e:  # e.g. a model_dump() that raises, or calls sys.exit()
            out_of_memory_unless_raised(e, "encoding the result of a tool")
            error = python_error(e, kind="Failed")
            # Not to be taken for the tool's own: its return value's code
            # (a dict's items(), a model's dump) raised as it was read.
            error["message"] += " (raised while the tool's result was converted to JSON)"
            self.tool_failed(rid, error)
            return
        data = [b for _, b in blobs]
        if len(data) > MAX_ATTACHMENTS:
            self.tool_failed(rid, wire_error(
                "Failed",
                "the result holds %d bytes values; at most %d fit in one answer"
                % (len(data), MAX_ATTACHMENTS),
                error_type="ResultTooLarge", traceback=NOT_SENT))
            return
        # With the shared-memory field its header may get: the host counts
        # the frame as sent.
        size = frame_size(header, data) + self.wire.shm_field_size(data)
        if size > self.max_response:
            self.tool_failed(rid, wire_error(
                "Failed",
                "the result, %d bytes as sent to the host (its JSON, its bytes values and their "
                "framing), exceeds the limit of %d bytes on an answer (the manifest's "
                "limits.max_response_mb, else the server's --max-response)" % (size, self.max_response),
                error_type="ResultTooLarge", traceback=NOT_SENT))
            return
        self.wire.send_frame(header, data)
