"""Tests of the ForgeSyte Python plugin runner (the package ``runner``), standard library
only. Each test starts the runner as the host does (pipes on stdin, stdout
and stderr) and speaks protocol version 2 with it.

Run from this directory::

    python3 -m unittest -v

FORGESYTE_TEST_PYTHON names another interpreter to run the runner under
(e.g. a Python 3.8); the tests themselves need Python 3.8 or later.
"""

import base64
import json
import collections
import errno
import os
import platform
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
# The interpreter's arguments that start the runner package of this
# directory as the host starts its cached copy: imported, then ``start``.
RUNNER = [
    "-c",
    "import sys; sys.path.insert(0, %r); import runner as r; del sys.path[0]; "
    "r.start(sys.argv[1:])" % HERE,
]
REPO = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "python")
PYTHON = os.environ.get("FORGESYTE_TEST_PYTHON", sys.executable)
TIMEOUT = 10.0

# The host's code that runs the runner from its sources (``-c``, for
# runners of another user), in a file: set by the Rust test that runs these.
SOURCE_CODE_FILE = os.environ.get("FORGESYTE_TEST_RUNNER_SOURCE")

sys.path.insert(0, HERE)
# Importing the package touches no descriptors (``start`` does).
from runner import api, base, errors, loading, results, serve, tools, wire  # noqa: E402


def frame(header, attachments=()):
    """One frame: len, header_len, count, sizes, header, attachments."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode("utf-8")
    sizes = [len(a) for a in attachments]
    body = struct.pack("<II%dI" % len(sizes), len(header), len(sizes), *sizes)
    body += header + b"".join(attachments)
    return struct.pack("<I", len(body)) + body


def read_exact(stream, n):
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def fixture(name):
    return os.path.join(FIXTURES, name)


def interpreter_has(module):
    probe = subprocess.run([PYTHON, "-c", "import " + module],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


class Proc(object):
    """A runner process and a tiny protocol client for it."""

    def __init__(self, test, name=None, args=None, env=None, stdin=subprocess.PIPE, runner=None,
                 python=None, pass_fds=()):
        if args is None:
            d = fixture(name)
            args = ["--plugin", name, "--plugin-dir", d, "--file", os.path.join(d, "plugin.py")]
        full_env = dict(os.environ)
        full_env["FORGESYTE_PROTOCOL"] = "2"
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [python or PYTHON] + (runner or RUNNER) + list(args),
            pass_fds=pass_fds,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        test.addCleanup(self.kill)
        self.frames = queue.Queue()
        self.stderr_chunks = []
        self.next_id = 1
        threading.Thread(target=self._read_frames, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_frames(self):
        out = self.proc.stdout
        while True:
            prefix = read_exact(out, 4)
            if prefix is None:
                self.frames.put(None)
                return
            (length,) = struct.unpack("<I", prefix)
            body = read_exact(out, length)
            if body is None:
                self.frames.put(("broken", None))
                return
            header_len, count = struct.unpack_from("<II", body, 0)
            sizes = struct.unpack_from("<%dI" % count, body, 8)
            at = 8 + 4 * count
            header = json.loads(body[at:at + header_len].decode("utf-8"))
            at += header_len
            attachments = []
            for size in sizes:
                attachments.append(body[at:at + size])
                at += size
            assert at == len(body), "inconsistent frame from the runner"
            self.frames.put((header, attachments))

    def _read_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_chunks.append(line)

    @property
    def stderr(self):
        return b"".join(self.stderr_chunks).decode("utf-8", "replace")

    def stderr_with(self, *texts, timeout=TIMEOUT):
        """Its stderr once every one of ``texts`` is in it, or once
        ``timeout`` has passed: the reader thread takes lines as they come,
        and a fixed wait before reading it failed on a loaded machine."""
        deadline = time.monotonic() + timeout
        while not all(t in self.stderr for t in texts) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.stderr

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream:
                    stream.close()
            except Exception:
                pass

    def write(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, header, attachments=()):
        self.write(frame(header, attachments))

    def recv(self, timeout=TIMEOUT):
        item = self.frames.get(timeout=timeout)
        if item is None:
            raise EOFError("the runner closed its stdout; stderr:\n" + self.stderr)
        return item

    def recv_header(self, timeout=TIMEOUT):
        return self.recv(timeout)[0]

    def hello(self):
        header = self.recv_header()
        assert header["type"] == "hello", header
        return header

    def create(self, manifest=None, plugin_dir=None):
        rid = self.next_id
        self.next_id += 1
        self.send({"op": "create", "id": rid, "config": {
            "manifest": manifest or {"name": "test"},
            "plugin_dir": plugin_dir or FIXTURES,
            "models": {},
        }})
        return self.recv_header()

    def start(self, manifest=None):
        self.hello()
        created = self.create(manifest)
        assert created["type"] == "created", created
        return created

    def call(self, tool, args=None, attachments=(), pointers=None, rid=None):
        """Sends a call; returns its id."""
        if rid is None:
            rid = self.next_id
            self.next_id += 1
        message = {"op": "call", "id": rid, "tool": tool, "args": {} if args is None else args}
        if pointers is not None:
            message["attachments"] = pointers
        self.send(message, attachments)
        return rid

    def run(self, tool, args=None, attachments=(), pointers=None):
        rid = self.call(tool, args, attachments, pointers)
        header, blobs = self.recv()
        assert header["id"] == rid, header
        return header, blobs

    def close_stdin(self):
        self.proc.stdin.close()

    def wait(self, timeout=TIMEOUT):
        """The exit code, once the stderr the runner wrote is read (on a
        loaded machine the reader thread may lag behind the exit; bounded,
        as a child of the runner may hold stderr open)."""
        code = self.proc.wait(timeout)
        self._stderr_reader.join(2.0)
        return code


class RunnerTestCase(unittest.TestCase):
    def start(self, name, **kw):
        p = Proc(self, name, **kw)
        return p

    def source_plugin(self, source):
        """A runner of a plugin.py holding ``source``, its hello read."""
        p = self.source_runner(source)
        p.hello()
        return p

    def construction_error(self, source):
        """The error of constructing the plugin of a plugin.py holding
        ``source``, which must fail (``init_failed``)."""
        header = self.source_plugin(source).create()
        self.assertEqual(header["type"], "init_failed", header)
        return header["error"]

    def source_runner(self, source, others=None, env=None):
        """A runner of a plugin.py holding ``source`` in a directory of its
        own, beside ``others`` (file name -> text), nothing read yet."""
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        for name, text in dict(others or {}, **{"plugin.py": source}).items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        return Proc(self, env=env, args=["--plugin", "s", "--plugin-dir", d, "--file", "plugin.py"])


class HandshakeTests(RunnerTestCase):
    def test_hello_fields(self):
        p = self.start("echo")
        hello = p.hello()
        self.assertEqual(hello["type"], "hello")
        self.assertEqual(hello["protocol"], 2)
        self.assertEqual(hello["runtime"], "python")
        if PYTHON == sys.executable:
            self.assertEqual(hello["runtime_version"], platform.python_version())
        self.assertRegex(hello["runtime_version"], r"^\d+\.\d+\.\d+")
        self.assertEqual(hello["pid"], p.proc.pid)
        self.assertEqual(hello["capabilities"], ["attachments", "concurrent_calls"])
        self.assertEqual(hello["stack_signal"], int(signal.SIGUSR2))
        self.assertNotIn("id", hello)

    def test_the_stack_signal_writes_where_a_call_is_and_the_runner_goes_on(self):
        p = self.source_plugin(
            "import threading\n"
            "class Plugin:\n"
            "    tools = {'wait': {'handler': 'wait'}, 'ok': {'handler': 'ok'}}\n"
            "    gate = threading.Event()\n"
            "    def wait(self, args):\n"
            "        self.gate.wait()\n"
            "        return {'waited': True}\n"
            "    def ok(self, args):\n"
            "        Plugin.gate.set()\n"
            "        return {'ok': True}\n"
        )
        created = p.create()
        self.assertEqual(created["type"], "created", created)
        waiting = p.call("wait")
        # Generous: on a machine loaded by the other tests, the call's
        # thread may take seconds to reach the plugin.
        deadline = time.monotonic() + 3 * TIMEOUT
        dumped = ""
        # Until a dump shows the plugin's own frame: one taken before the
        # call reached it shows threading's "in wait" (the runner starting
        # a thread), on a loaded machine.
        in_plugin = re.compile(r'File ".*plugin\.py", line 6 in wait')
        while not in_plugin.search(dumped):
            self.assertLess(time.monotonic(), deadline, p.stderr)
            os.kill(p.proc.pid, signal.SIGUSR2)
            time.sleep(0.1)
            dumped = p.stderr
        self.assertIn("(most recent call first):", dumped)
        # Still serving: the waiting call answers once released.
        header, _ = p.run("ok")
        self.assertEqual(header["result"], {"ok": True})
        header, _ = p.recv()
        self.assertEqual((header["id"], header["result"]), (waiting, {"waited": True}))

    def test_create_lists_the_echo_tools(self):
        p = self.start("echo")
        p.hello()
        created = p.create()
        self.assertEqual(created["type"], "created")
        self.assertEqual(created["id"], 1)
        tools = {t["id"]: t for t in created["tools"]}
        self.assertEqual(sorted(tools), ["binary", "bytes", "checksum", "echo", "echo_bytes", "fail",
                                         "maybe_bytes", "noop_bytes", "sleep", "typed"])
        for spec in tools.values():
            self.assertEqual(set(spec), {"id", "title", "description", "input_schema", "output_schema"})
            self.assertEqual(spec["title"], spec["id"])
        self.assertEqual(tools["echo"]["description"], "Returns its arguments unchanged.")
        self.assertEqual(tools["echo"]["input_schema"], {"type": "object"})
        self.assertEqual(
            tools["binary"]["input_schema"]["properties"]["data"],
            {"type": "string", "format": "binary"},
        )

    def test_a_second_create_is_refused(self):
        p = self.start("echo")
        p.start()
        again = p.create()
        self.assertEqual(again["type"], "init_failed")
        self.assertEqual(again["id"], 2)
        self.assertEqual(again["error"]["kind"], "Protocol")

    def test_a_config_that_is_not_an_object_fails_construction(self):
        # PROTOCOL.md §5.1: ``config`` is an object. A present ``null`` is a
        # payload, not a missing field (``message.rs``), and the native
        # runner answers it, as any config that is not an object, with
        # ``init_failed`` of kind ``Protocol``; so does this runner, and
        # constructs nothing.
        for config in (None, 5, "x", [1]):
            p = self.start("echo")
            p.hello()
            p.send({"op": "create", "id": 1, "config": config})
            refused = p.recv_header()
            self.assertEqual(refused["type"], "init_failed", config)
            self.assertEqual(refused["error"]["kind"], "Protocol", config)
            self.assertIn("'config' is not an object", refused["error"]["message"])
            # Nothing was constructed: a call is refused, a proper create
            # still constructs.
            header, _ = p.run("echo", {"x": 1})
            self.assertEqual(header["error"]["kind"], "Protocol", header)
            self.assertEqual(p.create()["type"], "created")

    def test_a_call_before_create_is_a_protocol_error(self):
        p = self.start("echo")
        p.hello()
        header, _ = p.run("echo", {"x": 1})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["kind"], "Protocol")


class PackageTests(unittest.TestCase):
    def test_importing_the_package_imports_every_module(self):
        # The host serves the modules' sources, or writes their bytecode,
        # while the package is imported, and only then.
        modules = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "runner"))
                         if f.endswith(".py") and f != "__init__.py")
        code = ("import json, sys; sys.path.insert(0, %r); import runner; "
                "print(json.dumps(sorted(m[7:] for m in sys.modules if m.startswith('runner.'))))"
                % HERE)
        out = subprocess.run([PYTHON, "-c", code], stdout=subprocess.PIPE, check=True,
                             timeout=TIMEOUT).stdout
        self.assertEqual(json.loads(out), modules)
        self.assertGreater(len(modules), 5)


    def test_a_protocol_fd_first_on_the_line_is_taken_off_it(self):
        import runner
        self.assertEqual(runner._protocol_fd(["--protocol-fd", "7", "--plugin", "x"]),
                         (["--plugin", "x"], 7))
        # Only first: elsewhere it is an argument like any other.
        self.assertEqual(runner._protocol_fd(["--plugin", "--protocol-fd", "7"]),
                         (["--plugin", "--protocol-fd", "7"], None))
        self.assertEqual(runner._protocol_fd(["--protocol-fd"]), (["--protocol-fd"], None))

    def test_a_runner_given_a_protocol_fd_answers_there_not_on_stdout(self):
        # As the host starts a runner itself: start-up output on fd 1 (the
        # log) before the runner runs, the protocol on a pipe of its own.
        r, w = os.pipe()
        code = "import os; os.write(1, b'chatter\\n'); " + RUNNER[1]
        proc = subprocess.Popen(
            [PYTHON, "-su", "-c", code, "--protocol-fd", str(w), "--plugin", "echo",
             "--plugin-dir", fixture("echo"), "--file", os.path.join(fixture("echo"), "plugin.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(w,), env=dict(os.environ, FORGESYTE_PROTOCOL="2"))
        os.close(w)
        try:
            with os.fdopen(r, "rb") as answers:
                (n,) = struct.unpack("<I", read_exact(answers, 4))
                body = read_exact(answers, n)
            header_len, count = struct.unpack("<II", body[:8])
            hello = json.loads(body[8 + 4 * count:8 + 4 * count + header_len])
            self.assertEqual(hello.get("type"), "hello", hello)
        finally:
            proc.stdin.close()
            log = proc.stdout.read()
            proc.stdout.close()
            proc.wait(TIMEOUT)
        self.assertIn(b"chatter", log)

def in_a_forked_child(test, work):
    """What ``work()`` returns (JSON), run in a forked child: what it does
    to its process (a filter, a Landlock domain) stays there. The child
    failing fails ``test``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            with os.fdopen(w, "wb") as out:
                out.write(json.dumps(work()).encode("utf-8"))
            code = 0
        except BaseException:
            traceback.print_exc()  # the parent's failure says only that it failed
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    test.assertEqual(status, 0, "the child failed")
    return json.loads(data.decode("utf-8"))


class ResultKeyTests(unittest.TestCase):
    def test_keys_json_writes_alike_are_a_result_error_not_a_lost_value(self):
        from runner.results import ResultError, to_wire

        self.assertEqual(to_wire({1: "a", "2": b"b"}), ({"1": "a", "2": None}, [("/2", b"b")]))
        for twice in ({1: b"one", "1": b"uno"}, {"x": {True: 1, "true": 2}}):
            with self.assertRaisesRegex(ResultError, "twice"):
                to_wire(twice)

    @unittest.skipUnless(interpreter_has("pydantic"), "pydantic is not installed")
    @unittest.skipIf(sys.version_info < (3, 9), "typing.Annotated needs Python 3.9")
    def test_a_model_s_json_only_serialiser_is_used_and_its_bytes_stay_binary(self):
        from typing import Annotated

        import pydantic

        from runner.results import ResultError, to_wire

        class Thing:
            def __init__(self, v):
                self.v = v

        class Inner(pydantic.BaseModel):
            data: bytes
            n: int

        class Out(pydantic.BaseModel):
            model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
            t: Annotated[Thing, pydantic.PlainSerializer(lambda t: {"v": t.v}, when_used="json")]
            img: bytes
            m: dict
            inner: Inner

        # Bytes that are not UTF-8 (an image), which JSON mode refuses, in a
        # field, a dict and a nested model.
        out = Out(t=Thing(3), img=b"\x89PNG\xff", m={"x": b"\xfe", "k": 2},
                  inner=Inner(data=b"\xfb", n=2))
        value, blobs = to_wire({"out": out})
        self.assertEqual(value, {"out": {
            "t": {"v": 3}, "img": None, "m": {"x": None, "k": 2}, "inner": {"data": None, "n": 2}}})
        self.assertEqual(sorted(blobs), sorted([
            ("/out/img", b"\x89PNG\xff"), ("/out/m/x", b"\xfe"), ("/out/inner/data", b"\xfb")]))

        # Not where bytes sit in a list, under a key that is no string, or
        # where JSON mode gives another shape: the first error stands.
        class Listed(pydantic.BaseModel):
            model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
            t: Annotated[Thing, pydantic.PlainSerializer(lambda t: {"v": t.v}, when_used="json")]
            frames: list

        for frames in ([b"\xff"] * 5000, [{"all": {1: b"x"}}], [{"__all__": b"x", "keep": 1}]):
            with self.assertRaisesRegex(ResultError, "type Thing is not JSON-serialisable"):
                to_wire(Listed(t=Thing(1), frames=frames))
        for m in ({"__all__": b"\xff", "keep": 5}, {1: b"\xff"}):
            with self.assertRaisesRegex(ResultError, "type Thing is not JSON-serialisable"):
                to_wire(Out(t=Thing(1), img=b"", m=m, inner=Inner(data=b"", n=1)))

        class Wrapped(Out):
            @pydantic.model_serializer(mode="wrap")
            def wrap(self, handler, info):
                data = handler(self)
                return {"wrapped": data} if info.mode == "json" else data

        with self.assertRaisesRegex(ResultError, "type Thing is not JSON-serialisable"):
            to_wire(Wrapped(t=Thing(3), img=b"\xff", m={}, inner=Inner(data=b"", n=1)))

        class Opaque(pydantic.BaseModel):
            model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
            t: Thing

        with self.assertRaisesRegex(ResultError, "type Thing is not JSON-serialisable"):
            to_wire(Opaque(t=Thing(1)))

    def test_a_converted_result_leaves_no_cycle_holding_its_bytes(self):
        # A result's bytes go with the last reference to them, not at the
        # garbage collector's next run: a runner returning large frames
        # ran out of memory in tens of calls while a closure's cell held
        # the list of them.
        from runner.results import to_wire

        value, blobs = to_wire({"mask": bytearray(1024), "boxes": [{"score": 1.0, "crop": bytes(8)}]})
        self.assertEqual(len(blobs), 2)
        # The variable and getrefcount's own argument: nothing else.
        self.assertEqual(sys.getrefcount(blobs), 2, "something still holds the list of bytes")

    def test_an_integer_beyond_a_float_s_range_is_a_result_error(self):
        from runner.results import ResultError, to_wire

        # Up to a float's range the host reads it (as a float past 64 bits).
        self.assertEqual(to_wire({"n": 10 ** 308, "b": True}), ({"n": 10 ** 308, "b": True}, []))
        for big in (10 ** 309, -(10 ** 309), 10 ** 5000):
            with self.assertRaisesRegex(ResultError, r"integer of \d+ bits, beyond .* \(at /n\)"):
                to_wire({"n": big})


    def test_a_result_of_more_values_than_an_answer_holds_is_refused_before_it_is_converted(self):
        import itertools
        import time
        from runner.results import ResultError, max_result_values, to_wire

        self.assertEqual(max_result_values(64 << 20), 2 * 1024 * 1024)
        self.assertEqual(max_result_values(1024), 1 << 16)
        # Counted as the host counts JSON text: one, and one per "," and
        # ":". Exactly the bound is converted; one value more is refused,
        # in any shape, and the place it was found is named.
        self.assertEqual(len(to_wire([0] * 100, max_values=100)[0]), 100)
        self.assertRaises(ResultError, to_wire, [0] * 101, max_values=100)
        points = [[i, i] for i in range(33)]  # 1 + 32 + 33 commas: 66
        self.assertEqual(len(to_wire(points, max_values=66)[0]), 33)
        self.assertRaises(ResultError, to_wire, points, max_values=65)
        # {"a":[..50],"b":{..24 members}}: 1 + 1 + 2 + 49 + 47
        nested = {"a": [0] * 50, "b": {str(i): i for i in range(24)}}
        self.assertEqual(len(to_wire(nested, max_values=100)[0]), 2)
        with self.assertRaisesRegex(ResultError, r"more than 99 JSON values.*\(at /b\)"):
            to_wire(nested, max_values=99)
        # {"e":[],"o":{}}: 1 + 1 + 2
        self.assertEqual(to_wire({"e": [], "o": {}}, max_values=4)[0], {"e": [], "o": {}})
        self.assertRaises(ResultError, to_wire, {"e": [], "o": {}}, max_values=3)
        # Forty million values, and a hundred million shared ones (a few KB
        # in Python), are refused at once, not after minutes of encoding.
        row = [0] * 1000
        shared = [[row] * 1000] * 100
        started = time.monotonic()
        for huge in ([0] * 40000000, shared):
            with self.assertRaises(ResultError) as refused:
                to_wire({"v": huge}, max_values=max_result_values(64 << 20))
            self.assertEqual(refused.exception.error_type, "ResultTooLarge")
        self.assertLess(time.monotonic() - started, 20)

        # A list whose __iter__ never ends is read as json reads it: its
        # elements.
        class Endless(list):
            def __iter__(self):
                return itertools.count()

        self.assertEqual(to_wire(Endless([1, 2]), max_values=10)[0], [1, 2])


class BinaryPropertiesTests(unittest.TestCase):
    def test_bytes_and_optional_bytes_are_binary(self):
        from runner.tools import binary_properties
        schema = {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"},
            "mask": {"type": "string", "contentEncoding": "base64"},
            "name": {"type": "string"},
            # pydantic's Optional[bytes] and bytes | None.
            "thumb": {"anyOf": [{"type": "string", "format": "binary"}, {"type": "null"}]},
            "alt": {"oneOf": [{"type": "null"}, {"type": "string", "contentEncoding": "base64"}]},
            # Bytes or text is not bytes.
            "either": {"anyOf": [{"type": "string", "format": "binary"}, {"type": "string"}]},
            "none": {"anyOf": [{"type": "null"}]},
        }}
        self.assertEqual(sorted(binary_properties(schema)), ["alt", "image", "mask", "thumb"])
        self.assertEqual(binary_properties({"type": "object"}), [])


class TracebackTests(RunnerTestCase):
    def test_the_runners_frames_are_left_out_under_a_path_written_unnormalised(self):
        # The cache directory as the environment spells it (``/a/./b``):
        # the code objects keep that spelling.
        runner = ["-c", RUNNER[1].replace(repr(HERE), repr(HERE + "/."))]
        self.assertNotEqual(runner, RUNNER)
        p = self.start("echo", runner=runner)
        p.start()
        header, _ = p.run("fail")
        lines = header["error"]["traceback"]
        self.assertTrue(any("plugin.py" in line for line in lines), lines)
        self.assertFalse(any("/runner/" in line for line in lines), lines)


class SourceModeTests(RunnerTestCase):
    """The runner started as the host starts it for a runner user: from
    the sources its code carries, the package's modules named
    ``<forgesyte_runner/NAME.py>``."""

    def setUp(self):
        if not SOURCE_CODE_FILE:
            self.skipTest("FORGESYTE_TEST_RUNNER_SOURCE is not set (`cargo test` sets it)")
        with open(SOURCE_CODE_FILE, encoding="utf-8") as f:
            self.runner = ["-c", f.read()]

    def test_it_serves_and_leaves_its_frames_out_of_tracebacks(self):
        p = self.start("echo", runner=self.runner)
        self.assertEqual(p.hello()["runtime"], "python")
        self.assertEqual(p.create()["type"], "created")
        header, _ = p.run("echo", {"x": 1})
        self.assertEqual(header["result"], {"x": 1})
        header, _ = p.run("fail")
        lines = header["error"]["traceback"]
        self.assertEqual(lines[-1], "ValueError: bad input")
        self.assertTrue(any("plugin.py" in line for line in lines), lines)
        self.assertFalse(any("forgesyte_runner" in line for line in lines), lines)

    def test_plugins_import_the_runners_api(self):
        p = self.start("traced", runner=self.runner)
        p.start()
        header, _ = p.run("whoami", {"say": "hi"})
        self.assertEqual(header["type"], "result", header)
        self.assertEqual(header["result"]["request_id"], None)


class CallTests(RunnerTestCase):
    def setUp(self):
        self.p = self.start("echo")
        self.p.start()

    def test_echo_round_trips_unicode(self):
        args = {
            "text": "h\u00e9llo \u4e16\u754c \U0001F680 \"quoted\" \\ \n",
            "list": [1, 2.5, None, True, False, -7],
            "nested": {"a/b": "~", "empty": {}, "": []},
        }
        header, blobs = self.p.run("echo", args)
        self.assertEqual(header["type"], "result")
        self.assertEqual(header["result"], args)
        self.assertNotIn("attachments", header)
        self.assertEqual(blobs, [])

    def test_null_args_are_arguments(self):
        # ``args`` is any JSON: a present null is passed on (as the native
        # runner's decoder does), never a malformed request.
        rid = self.p.next_id
        self.p.next_id += 1
        self.p.send({"op": "call", "id": rid, "tool": "echo", "args": None})
        header, _ = self.p.recv()
        self.assertEqual(header["id"], rid)
        self.assertEqual(header["type"], "result")
        self.assertIsNone(header["result"])

    def test_concurrent_calls_are_answered_by_id(self):
        slow = self.p.call("sleep", {"ms": 800})
        fast = self.p.call("sleep", {"ms": 50})
        echo = self.p.call("echo", {"n": 1})
        started = time.monotonic()
        answers = [self.p.recv_header() for _ in range(3)]
        elapsed = time.monotonic() - started
        self.assertEqual([a["id"] for a in answers][-1], slow)
        self.assertEqual({a["id"] for a in answers}, {slow, fast, echo})
        by_id = {a["id"]: a for a in answers}
        self.assertEqual(by_id[slow]["result"], {"slept_ms": 800})
        self.assertEqual(by_id[fast]["result"], {"slept_ms": 50})
        self.assertEqual(by_id[echo]["result"], {"n": 1})
        self.assertLess(elapsed, 3.0)  # serial would still be ~0.85 s: the order is the proof

    def test_many_concurrent_calls(self):
        ids = [self.p.call("sleep", {"ms": 300}) for _ in range(20)]
        started = time.monotonic()
        answers = [self.p.recv_header() for _ in ids]
        self.assertEqual(sorted(a["id"] for a in answers), ids)
        self.assertLess(time.monotonic() - started, 4.0)  # serial: 6 s

    def test_a_slow_call_after_a_quiet_spell_still_lets_the_next_through(self):
        # The watch sleeps after a quiet spell; the next call wakes it.
        self.p.run("echo", {"n": 0})
        time.sleep(0.4)
        slow = self.p.call("sleep", {"ms": 800})
        echo = self.p.call("echo", {"n": 1})
        answers = [self.p.recv_header() for _ in range(2)]
        self.assertEqual([a["id"] for a in answers], [echo, slow])

    def test_quick_calls_run_on_the_thread_that_read_them(self):
        # No thread hand-off per call: one after another, quick calls run
        # on the reader. A hand-off before every call (the old runner) puts
        # no two calls in a row on the same thread; a loaded machine may
        # stretch a quick call over two ticks and pass the reading on,
        # hence the margin.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "plugin.py")
        with open(path, "w") as f:
            f.write("import threading\n"
                    "class Plugin:\n"
                    "    tools = {'who': {'description': 'the thread'}}\n"
                    "    def run_tool(self, tool, args):\n"
                    "        return threading.get_ident()\n")
        p = Proc(self, args=["--plugin", "who", "--plugin-dir", d, "--file", path])
        p.start()
        threads = [p.run("who")[0]["result"] for _ in range(300)]
        same = sum(1 for a, b in zip(threads, threads[1:]) if a == b)
        self.assertGreaterEqual(same, 100, collections.Counter(threads))

    def test_an_attachment_reaches_the_plugin_as_bytes_and_comes_back(self):
        data = bytes(range(256)) * 3
        header, blobs = self.p.run("echo", {"data": None, "keep": 1}, [data], ["/data"])
        self.assertEqual(header["type"], "result")
        self.assertEqual(header["result"], {"data": None, "keep": 1})
        self.assertEqual(header["attachments"], ["/data"])
        self.assertEqual(blobs, [data])

    def test_attachments_in_arrays_and_escaped_keys(self):
        header, blobs = self.p.run(
            "echo", {"list": [0, 1], "a/b": {}}, [b"x", b"y", b""], ["/list/1", "/a~1b/c~0d", "/new"]
        )
        self.assertEqual(header["result"], {"list": [0, None], "a/b": {"c~d": None}, "new": None})
        self.assertEqual(header["attachments"], ["/list/1", "/a~1b/c~0d", "/new"])
        self.assertEqual(blobs, [b"x", b"y", b""])

    def test_bad_pointers_and_count_mismatches_are_invalid_args(self):
        cases = [
            ({"a": 1}, [b"x"], ["nope"]),
            ({"a": 1}, [b"x"], ["/missing/x"]),
            ({"l": [0]}, [b"x"], ["/l/5"]),
            ({"a": 1}, [b"x"], ["/a/x"]),
            ({"a": 1}, [b"x", b"y"], ["/a"]),
            ({"a": 1}, [], ["/a"]),
        ]
        for args, blobs, pointers in cases:
            header, _ = self.p.run("echo", args, blobs, pointers)
            self.assertEqual(header["type"], "tool_failed", (args, pointers))
            self.assertEqual(header["error"]["kind"], "InvalidArgs", (args, pointers))

    def test_the_binary_tool_gets_bytes_from_base64(self):
        header, _ = self.p.run("binary", {"data": base64.b64encode(b"\x00\x01\xff").decode()})
        self.assertEqual(header["result"], {"len": 3, "type": "bytes"})
        header, _ = self.p.run("binary", {"data": None}, [b"12345"], ["/data"])
        self.assertEqual(header["result"], {"len": 5, "type": "bytes"})
        header, _ = self.p.run("binary", {"data": "not base64!"})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["kind"], "InvalidArgs")
        self.assertIn("data", header["error"]["message"])

    def test_the_bytes_tool_returns_an_attachment(self):
        header, blobs = self.p.run("bytes")
        self.assertEqual(header, {"type": "result", "id": header["id"],
                                  "result": {"data": None, "n": 3}, "attachments": ["/data"]})
        self.assertEqual(blobs, [b"\x00\x01\xff"])

    def test_a_raising_tool_is_a_failed_tool_error(self):
        header, _ = self.p.run("fail")
        self.assertEqual(header["type"], "tool_failed")
        error = header["error"]
        self.assertEqual(error["kind"], "Failed")
        self.assertEqual(error["error_type"], "ValueError")
        self.assertEqual(error["message"], "bad input")
        self.assertEqual(error["traceback"][-1], "ValueError: bad input")
        self.assertLessEqual(len(error["traceback"]), 10)
        # The plugin's frame is there; the runner's own are not.
        self.assertTrue(any("plugin.py" in line for line in error["traceback"]), error["traceback"])
        package = os.path.join(HERE, "runner")
        self.assertFalse(any(package in line for line in error["traceback"]), error["traceback"])
        # The plugin stays healthy.
        header, _ = self.p.run("echo", {"still": "alive"})
        self.assertEqual(header["result"], {"still": "alive"})

    def test_an_unknown_tool(self):
        header, _ = self.p.run("nope", {})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["kind"], "UnknownTool")
        self.assertEqual(header["error"]["name"], "nope")

    def test_print_does_not_corrupt_the_protocol(self):
        header, blobs = self.p.run("bytes")
        self.assertEqual(header["type"], "result")
        header, _ = self.p.run("echo", {"x": "y"})
        self.assertEqual(header["result"], {"x": "y"})
        deadline = time.monotonic() + 5
        while "print() in a tool" not in self.p.stderr and time.monotonic() < deadline:
            time.sleep(0.02)
        err = self.p.stderr
        self.assertIn("echo: print() in __init__ goes to the log", err)
        self.assertIn("echo: a raw write to fd 1 goes to the log", err)
        self.assertIn("echo: print() in a tool goes to the log", err)


class ContextTests(RunnerTestCase):
    """A call's ``context`` (PROTOCOL.md §5.4) reaches the plugin through
    ``forgesyte_runner.current_call`` and tags its log lines (§8)."""

    TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def setUp(self):
        self.p = self.start("traced")
        self.p.start()

    def whoami(self, say, context=None):
        rid = self.p.next_id
        self.p.next_id += 1
        message = {"op": "call", "id": rid, "tool": "whoami", "args": {"say": say}}
        if context is not None:
            message["context"] = context
        self.p.send(message)
        header = self.p.recv_header()
        self.assertEqual((header["id"], header["type"]), (rid, "result"), header)
        return header["result"]

    def log_line(self, say):
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            for line in self.p.stderr.splitlines():
                if line.endswith("whoami says " + say):
                    return line
            time.sleep(0.01)
        self.fail("no log line for %s in:\n%s" % (say, self.p.stderr))

    def test_the_plugin_sees_the_context_and_its_log_lines_carry_it(self):
        seen = self.whoami("one", {"request_id": "abc-123", "traceparent": self.TRACEPARENT})
        expected = {"request_id": "abc-123", "traceparent": self.TRACEPARENT,
                    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
        self.assertEqual(seen["in_task"], expected)
        self.assertEqual(seen["in_thread"], expected)
        del seen["in_task"], seen["in_thread"]
        self.assertEqual(seen, expected)
        line = self.log_line("one")
        prefix = '@call {"request_id":"abc-123","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"} '
        self.assertEqual(line, prefix + "WARNING traced: whoami says one")

    def test_without_a_context_nothing_is_seen_or_tagged(self):
        seen = self.whoami("two")
        nothing = {"request_id": None, "traceparent": None, "trace_id": None}
        self.assertEqual(seen, dict(nothing, in_task=nothing, in_thread=nothing))
        self.assertEqual(self.log_line("two"), "WARNING traced: whoami says two")
        # A request id alone; the context ends with its call.
        seen = self.whoami("three", {"request_id": 'a "quoted" id'})
        self.assertEqual(seen["request_id"], 'a "quoted" id')
        self.assertIsNone(seen["trace_id"])
        self.assertEqual(self.log_line("three"),
                         '@call {"request_id":"a \\"quoted\\" id"} WARNING traced: whoami says three')
        self.assertEqual(self.whoami("four")["request_id"], None)

    def test_a_context_that_is_not_an_object_of_strings_exits_65(self):
        self.p.send({"op": "call", "id": 9, "tool": "whoami", "args": {}, "context": {"request_id": 7}})
        self.assertEqual(self.p.wait(), 65)


class AsyncPluginTests(RunnerTestCase):
    """Coroutines of a plugin (``async def`` hooks and tools) all run on
    the runner's one event loop: what ``on_load()`` made there serves every
    later call. Each call on a fresh loop (``asyncio.run``) used to fail
    concurrent calls with "bound to a different event loop", or deadlock
    them until the host's timeout."""

    SOURCE = (
        "import asyncio, sys\n"
        "from forgesyte_runner import current_call\n"
        "class Plugin:\n"
        "    tools = {'locked': {'description': 'under the lock'},\n"
        "             'leave': {'description': 'sys.exit'},\n"
        "             'leave_in_task': {'description': 'sys.exit in a task it awaits'},\n"
        "             'leave_behind': {'description': 'sys.exit in a task it leaves'},\n"
        "             'stop': {'description': 'stops the event loop'},\n"
        "             'cancelled': {'description': 'raises CancelledError'}}\n"
        "    async def on_load(self):\n"
        "        self.lock = asyncio.Lock()\n"
        "        self.inside = 0\n"
        "    async def run_tool(self, tool, args):\n"
        "        if tool == 'leave':\n"
        "            sys.exit(3)\n"
        "        async def leave(code):\n"
        "            sys.exit(code)\n"
        "        if tool == 'leave_in_task':\n"
        "            await asyncio.gather(leave(4))\n"
        "        if tool == 'leave_behind':\n"
        "            asyncio.ensure_future(leave(5))\n"
        "            return 'left'\n"
        "        if tool == 'cancelled':\n"
        "            raise asyncio.CancelledError('no more frames')\n"
        "        if tool == 'stop':\n"
        "            asyncio.get_running_loop().stop()\n"
        "            return 'stopped'\n"
        "        async with self.lock:\n"
        "            self.inside += 1\n"
        "            alone = self.inside == 1\n"
        "            await asyncio.sleep(0.005)\n"
        "            self.inside -= 1\n"
        "        call = current_call()\n"
        "        return {'alone': alone, 'request_id': call.request_id if call else None}\n"
    )

    def setUp(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "plugin.py")
        with open(path, "w") as f:
            f.write(self.SOURCE)
        self.p = Proc(self, args=["--plugin", "asyncish", "--plugin-dir", d, "--file", path])
        self.p.start()

    def test_concurrent_calls_share_what_on_load_made_and_see_their_context(self):
        ids = []
        for n in range(20):
            rid = self.p.next_id
            self.p.next_id += 1
            self.p.send({"op": "call", "id": rid, "tool": "locked", "args": {},
                         "context": {"request_id": "req-%d" % n}})
            ids.append(rid)
        answers = {}
        for _ in ids:
            header = self.p.recv_header()
            answers[header["id"]] = header
        for n, rid in enumerate(ids):
            self.assertEqual(answers[rid].get("result"), {"alone": True, "request_id": "req-%d" % n},
                             answers[rid])

    def test_sys_exit_in_a_coroutine_is_its_error_and_the_loop_goes_on(self):
        # In the call's coroutine, or in a task it awaits: the call's error.
        # In a task it started and left: its call answered. A SystemExit
        # out of a task, or a plugin's loop.stop(), left the loop's thread
        # (and so every later coroutine call waited for ever).
        for tool, answer in [("leave", ("SystemExit", "3")), ("leave_in_task", ("SystemExit", "4")),
                             ("leave_behind", "left"), ("stop", "stopped"), ("stop", "stopped"),
                             # Its message kept (the future it crossed was
                             # cancelled, without one).
                             ("cancelled", ("CancelledError", "no more frames"))]:
            header, _ = self.p.run(tool)
            if isinstance(answer, tuple):
                self.assertEqual(header["type"], "tool_failed", header)
                self.assertEqual((header["error"]["error_type"], header["error"]["message"]), answer)
            else:
                self.assertEqual(header.get("result"), answer, header)
            header, _ = self.p.run("locked")
            self.assertEqual(header.get("result"), {"alone": True, "request_id": None}, (tool, header))
        # Said once, however often a plugin stops the loop.
        self.p.close_stdin()
        self.assertEqual(self.p.wait(), 0)
        self.assertEqual(self.p.stderr.count("the plugin stopped the event loop"), 1, self.p.stderr)


class EventLoopUnitTests(unittest.TestCase):
    def test_a_coroutine_returned_by_a_coroutine_is_run_too(self):
        # An ``async def`` tool that returns one it did not await: run, as
        # a sync tool's returned coroutine is (it was a 422 TypeError).
        async def seven():
            return 7

        async def forgot():
            return seven()

        self.assertEqual(serve.await_result(forgot()), 7)

    def test_a_forked_child_runs_coroutines_on_a_loop_of_its_own(self):
        async def seven():
            return 7

        self.assertEqual(serve.await_result(seven()), 7)  # the loop's thread runs
        pid = os.fork()
        if pid == 0:
            # The child has the loop but not its thread: without its own,
            # this waits for ever (the alarm ends it, code 2).
            import signal
            signal.alarm(5)
            try:
                os._exit(0 if serve.await_result(seven()) == 7 else 1)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        self.assertTrue(os.WIFEXITED(status), status)  # not killed by the alarm
        self.assertEqual(os.WEXITSTATUS(status), 0)


class LifecycleTests(RunnerTestCase):
    def test_closing_stdin_exits_0_promptly_after_on_unload(self):
        p = self.start("echo")
        p.start()
        started = time.monotonic()
        p.close_stdin()
        self.assertEqual(p.wait(3), 0)
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("echo: on_unload", p.stderr_with("echo: on_unload"))

    def test_closing_stdin_before_create_exits_0(self):
        p = self.start("echo")
        p.hello()
        p.close_stdin()
        self.assertEqual(p.wait(3), 0)

    def test_a_hanging_on_unload_is_bounded(self):
        p = self.start("echo", env={"ECHO_UNLOAD_SLEEP_S": "30"})
        p.start()
        started = time.monotonic()
        p.close_stdin()
        self.assertEqual(p.wait(5), 0)
        self.assertLess(time.monotonic() - started, 3.5)
        # At WARN in the server's log (its `WARNING ` prefix).
        said = "WARNING forgesyte-python-runner[echo]: on_unload() still running after"
        self.assertIn(said, p.stderr_with(said))

    def test_a_raising_on_unload_is_a_warning(self):
        p = self.source_plugin("class Plugin:\n"
                               "    def run_tool(self, name, args):\n"
                               "        return {}\n"
                               "    def on_unload(self):\n"
                               "        raise RuntimeError('weights locked')\n")
        self.assertEqual(p.create()["type"], "created")
        p.close_stdin()
        self.assertEqual(p.wait(5), 0)
        said = "WARNING forgesyte-python-runner[s]: on_unload() failed: RuntimeError: weights locked"
        self.assertIn(said, p.stderr_with(said))

    def test_calls_in_flight_do_not_hold_the_exit(self):
        p = self.start("echo")
        p.start()
        p.call("sleep", {"ms": 20000})
        time.sleep(0.2)
        started = time.monotonic()
        p.close_stdin()
        self.assertEqual(p.wait(5), 0)
        self.assertLess(time.monotonic() - started, 3)

    def test_the_runner_exits_when_its_parent_dies(self):
        # An intermediate process starts the runner, and exits once the test
        # has seen the hello; the test keeps the runner's stdin open, so only
        # the parent watch can end the runner.
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        d = fixture("echo")
        script = (
            "import subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdin=%d, stdout=%d, stderr=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
            "sys.stdin.read()\n" % (r_in, w_out)
        )
        middle = subprocess.Popen(
            [sys.executable, "-c", script, PYTHON] + RUNNER + ["--plugin", "echo",
             "--plugin-dir", d, "--file", os.path.join(d, "plugin.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(r_in, w_out),
        )
        self.addCleanup(middle.wait, TIMEOUT)
        self.addCleanup(middle.stdout.close)
        self.addCleanup(_kill_quietly, middle.pid)
        os.close(r_in)
        os.close(w_out)
        self.addCleanup(os.close, w_in)
        pid = int(middle.stdout.readline().decode().strip())
        self.addCleanup(_kill_quietly, pid)
        out = os.fdopen(r_out, "rb")
        self.addCleanup(out.close)
        prefix = read_exact(out, 4)  # the hello
        self.assertIsNotNone(prefix)
        read_exact(out, struct.unpack("<I", prefix)[0])
        middle.stdin.close()
        self.assertEqual(middle.wait(TIMEOUT), 0)
        # The runner's stdout ends when it dies (the protocol fd is
        # close-on-exec and nobody else holds it).
        result = {}

        def drain():
            result["rest"] = out.read()

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        t.join(2)
        if t.is_alive():
            self.fail("the orphaned runner did not exit")
        self.assertEqual(result["rest"], b"")

    def test_children_do_not_inherit_the_protocol_pipe(self):
        p = self.start("handlers")
        p.start()
        header, _ = p.run("spawn", {"seconds": 30})
        child = header["result"]["pid"]
        self.addCleanup(lambda: _kill_quietly(child))
        p.close_stdin()
        self.assertEqual(p.wait(5), 0)
        # The runner's stdout ends although its child lives on.
        self.assertIsNone(p.frames.get(timeout=3))


def _kill_quietly(pid):
    try:
        os.kill(pid, 9)
    except OSError:
        pass


class ImportAndInitFailureTests(RunnerTestCase):
    def test_a_syntax_error(self):
        p = self.start("broken_plugin")
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        error = header["error"]
        self.assertEqual(error["kind"], "Python")
        self.assertEqual(error["error_type"], "SyntaxError")
        self.assertIn("line 3", error["message"])
        self.assertIn("plugin.py", error["message"])
        self.assertTrue(error["path"].endswith("plugin.py"))
        self.assertLessEqual(len(error["traceback"]), 10)
        self.assertEqual(p.wait(5), 0)

    def test_a_missing_dependency(self):
        p = self.start("missing_dep")
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        error = header["error"]
        self.assertEqual(error["kind"], "Python")
        self.assertEqual(error["error_type"], "ModuleNotFoundError")
        self.assertEqual(error["name"], "forgesyte_nonexistent_pkg")
        self.assertEqual(error["message"], "No module named 'forgesyte_nonexistent_pkg'")
        self.assertEqual(p.wait(5), 0)

    def test_modules_beside_plugin_py_shadow_no_standard_module(self):
        # A helper named like a standard module (constants in platform.py,
        # colorsys.py) replaced it for every importer (uuid, numpy), and the
        # plugin failed to import; the Python original imports plugin.py by
        # its path. Its own modules stay importable, and come before those
        # of PYTHONPATH. (colorsys: a module the runner does not import.)
        elsewhere = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, elsewhere)
        with open(os.path.join(elsewhere, "helpers.py"), "w") as f:
            f.write("def double(n):\n    return -1\n")
        p = self.source_runner(
            "import sys\n"
            "assert 'colorsys' not in sys.modules\n"
            "import colorsys, uuid\n"
            "import helpers\n"
            "class Plugin:\n"
            "    tools = {'which': {'handler': 'which'}}\n"
            "    def which(self, args):\n"
            "        return {'colorsys': hasattr(colorsys, 'rgb_to_hsv'), 'uuid': len(str(uuid.uuid4())),\n"
            "                'helper': helpers.double(21)}\n",
            others={"platform.py": "SUPPORTED = ['png']\n", "colorsys.py": "SEED = 4\n",
                    "helpers.py": "def double(n):\n    return 2 * n\n"},
            env={"PYTHONPATH": elsewhere})
        p.hello()
        created = p.create()
        self.assertEqual(created["type"], "created", created)
        header, _ = p.run("which")
        self.assertEqual(header.get("result"), {"colorsys": True, "uuid": 36, "helper": 42}, header)

    def test_a_module_named_like_a_standard_one_is_the_plugin_s_when_its_entrypoint_names_it(self):
        # "entrypoint": "email.plugin" with its own email/ package (or
        # "code:Plugin" with code.py): the manifest names the plugin's own
        # module, which is imported as before; a helper package of that
        # kind beside plugin.py is passed over, and the error says so.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        os.mkdir(os.path.join(d, "email"))
        with open(os.path.join(d, "email", "__init__.py"), "w") as f:
            f.write("")
        with open(os.path.join(d, "email", "plugin.py"), "w") as f:
            f.write("class Plugin:\n    tools = {'who': {'handler': 'who'}}\n"
                    "    def who(self, args):\n        return {'me': __name__}\n")
        p = Proc(self, args=["--plugin", "mail", "--plugin-dir", d, "--module", "email.plugin"])
        p.start()
        header, _ = p.run("who", {})
        self.assertEqual(header.get("result"), {"me": "email.plugin"}, (header, p.stderr))
        for source, others in (
                ("from email.helpers import f\n", {"email/__init__.py": "", "email/helpers.py": "f = 1\n"}),
                ("from token import API_KEY\n", {"token.py": "API_KEY = 'k'\n"})):
            e = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, e)
            for name, text in dict(others, **{"plugin.py": source}).items():
                os.makedirs(os.path.dirname(os.path.join(e, name)), exist_ok=True)
                with open(os.path.join(e, name), "w") as f:
                    f.write(text)
            p = Proc(self, args=["--plugin", "s", "--plugin-dir", e, "--file", os.path.join(e, "plugin.py")])
            header = p.recv_header()
            self.assertEqual(header["type"], "import_failed", header)
            self.assertIn("is passed over for the standard library's", header["error"]["message"], header)

    def test_a_plugin_without_tools_is_created_and_says_nothing_can_be_called(self):
        # An older plugin API's class (``analyze(image_bytes, options)``):
        # ready with no tools, and a warning says why nothing can be called.
        p = self.source_plugin(
            "class Plugin:\n"
            "    def analyze(self, image_bytes, options):\n"
            "        return {}\n")
        created = p.create()
        self.assertEqual(created["type"], "created", created)
        self.assertEqual(created["tools"], [])
        p.close_stdin()
        self.assertEqual(p.wait(), 0)
        # A seed plugin (no run_tool, no BasePlugin) has none by design:
        # a note, not a warning.
        self.assertIn("\nforgesyte-python-runner[s]: the plugin offers no tools", "\n" + p.stderr)
        self.assertNotIn("WARNING forgesyte-python-runner[s]: the plugin offers no tools", p.stderr)
        # One of ForgeSyte's contract that serves none: a warning.
        p = self.source_plugin(
            "class BasePlugin:\n    pass\n"
            "class Plugin(BasePlugin):\n"
            "    tools = {}\n")
        created = p.create()
        self.assertEqual(created["tools"], [], created)
        p.close_stdin()
        self.assertEqual(p.wait(), 0)
        self.assertIn("WARNING forgesyte-python-runner[s]: the plugin offers no tools", p.stderr)

    def test_a_relative_import_in_plugin_py_says_how_to_import(self):
        p = self.source_runner("from .helpers import shout\n",
                               others={"helpers.py": "def shout(s):\n    return s.upper()\n"})
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        message = header["error"]["message"]
        self.assertIn("attempted relative import with no known parent package", message)
        self.assertIn("import a module beside it as `import helpers`", message)

    def test_a_package_only_in_the_user_site_says_so(self):
        base = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, base)
        env = {"PYTHONUSERBASE": base}
        site_dir = subprocess.run(
            [PYTHON, "-c", "import site; print(site.getusersitepackages())"],
            env=dict(os.environ, **env), capture_output=True, text=True, check=True).stdout.strip()
        os.makedirs(os.path.join(site_dir, "forgesyte_user_only_pkg"))
        with open(os.path.join(site_dir, "forgesyte_user_only_pkg", "__init__.py"), "w") as f:
            f.write("")
        # The host starts runners with -s: no user site on sys.path.
        p = self.source_runner("import forgesyte_user_only_pkg\n",
                               env=dict(env, PYTHONNOUSERSITE="1"))
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        message = header["error"]["message"]
        self.assertIn("No module named 'forgesyte_user_only_pkg'", message)
        self.assertIn("is installed in the user site-packages (%s)" % site_dir, message)

    def test_two_plugin_shaped_classes_and_no_plugin_are_named(self):
        p = self.source_plugin(
            "class Helper:\n"
            "    def run_tool(self, tool_name, args):\n"
            "        return {}\n"
            "class MyPlugin:\n"
            "    def run_tool(self, tool_name, args):\n"
            "        return {}\n")
        header = p.create({"name": "s"})
        self.assertEqual(header["type"], "init_failed", header)
        self.assertIn("2 plugin-shaped classes (Helper, MyPlugin)", header["error"]["message"])
        self.assertIn('"plugin:CLASS" for plugin.py', header["error"]["message"])

    def test_a_missing_plugin_file(self):
        d = fixture("echo")
        p = Proc(self, args=["--plugin", "x", "--plugin-dir", d, "--file", os.path.join(d, "nope.py")])
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        self.assertEqual(header["error"]["kind"], "Python")
        self.assertEqual(header["error"]["message"], "nope.py not found in %s" % d)
        self.assertEqual(p.wait(5), 0)

    def test_a_plugin_file_that_is_a_fifo_is_said_to_be_one_without_waiting(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        os.mkfifo(os.path.join(d, "plugin.py"))
        p = Proc(self, args=["--plugin", "x", "--plugin-dir", d, "--file", os.path.join(d, "plugin.py")])
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        self.assertEqual(header["error"]["message"], "plugin.py is not a regular file in %s" % d)
        self.assertEqual(p.wait(5), 0)

    def test_a_missing_module(self):
        p = Proc(self, args=["--plugin", "x", "--plugin-dir", FIXTURES, "--module", "no_such_pkg.plugin"])
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        self.assertEqual(header["error"]["error_type"], "ModuleNotFoundError")
        self.assertEqual(header["error"]["name"], "no_such_pkg")
        self.assertEqual(p.wait(5), 0)

    def test_a_tool_spec_that_is_not_valid_unicode_fails_construction(self):
        # A description made from a file name that is not UTF-8: the
        # runner answers init_failed instead of dying on the answer.
        p = self.source_plugin("import os\n"
                               "class Plugin:\n"
                               "    def __init__(self):\n"
                               "        self.tools = {'t': {'handler': self.t,\n"
                               "                      'description': os.fsdecode(b'model-\\xe9.bin')}}\n"
                               "    def t(self, **kw):\n"
                               "        return {}\n")
        header = p.create()
        self.assertEqual(header["type"], "init_failed", header)
        self.assertEqual(header["error"]["error_type"], "UnicodeEncodeError", header)
        # Named where it is: the tool, the field and the character.
        self.assertEqual(header["error"]["message"],
                         "the spec of tool 't' cannot be sent as JSON: value holds text that is "
                         "not valid Unicode: '\\udce9' at character 6 is a lone surrogate "
                         "(at /description)", header)

    def test_a_result_that_is_not_valid_unicode_names_the_place(self):
        p = self.source_plugin("class Plugin:\n"
                               "    tools = {'t': {'handler': 't'}}\n"
                               "    def t(self, **kw):\n"
                               "        return {'a': ['ok', {'b': 'x\\udfff'}]}\n")
        self.assertEqual(p.create()["type"], "created")
        header, _ = p.run("t")
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["error_type"], "UnicodeEncodeError", header)
        self.assertEqual(header["error"]["message"],
                         "tool result holds text that is not valid Unicode: '\\udfff' at "
                         "character 1 is a lone surrogate (at /a/1/b)", header)
        # Raised while the result is converted (a model's own dump): the
        # tool's error too, not the runner's.
        p = self.source_plugin("class Model:\n"
                               "    model_fields = {}\n"
                               "    def model_dump(self):\n"
                               "        '\\ud800'.encode('utf-8')\n"
                               "class Plugin:\n"
                               "    tools = {'t': {'handler': 't'}}\n"
                               "    def t(self, **kw):\n"
                               "        return Model()\n")
        self.assertEqual(p.create()["type"], "created")
        header, _ = p.run("t")
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["error_type"], "UnicodeEncodeError", header)
        self.assertIn("tool result is not valid Unicode", header["error"]["message"], header)

    def test_an_error_raised_reading_a_result_says_so(self):
        p = self.source_plugin("class Odd(dict):\n"
                               "    def items(self):\n"
                               "        raise RuntimeError('items boom')\n"
                               "class Plugin:\n"
                               "    tools = {'t': {'handler': 't'}}\n"
                               "    def t(self, **kw):\n"
                               "        return Odd(a=1)\n")
        self.assertEqual(p.create()["type"], "created")
        header, _ = p.run("t")
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["error_type"], "RuntimeError", header)
        self.assertEqual(header["error"]["message"],
                         "items boom (raised while the tool's result was converted to JSON)", header)

    def test_a_tool_name_no_client_can_call_fails_construction(self):
        # The host refuses these names (ToolSpec's id): said as the
        # plugin's error, not as a protocol violation of the runner's.
        for name, message in [
            ("", "tool name '' cannot be served: no URL path segment can carry it"),
            (".", "tool name '.' cannot be served: no URL path segment can carry it"),
            ("..", "tool name '..' cannot be served: no URL path segment can carry it"),
            ("a\nb", "tool name 'a\\nb' holds a control character"),
            ("a\x85b", "tool name 'a\\x85b' holds a control character"),
        ]:
            p = self.source_plugin("class Plugin:\n"
                                   "    tools = {%r: {'handler': 'ok'}, 'fine': {'handler': 'ok'}}\n"
                                   "    def ok(self, **kw):\n"
                                   "        return {}\n" % name)
            header = p.create()
            self.assertEqual(header["type"], "init_failed", header)
            self.assertEqual(header["error"]["error_type"], "ValueError", header)
            self.assertEqual(header["error"]["message"], message, header)
        # What the host takes is taken: a slash, a space, a character
        # beyond the control ones.
        p = self.source_plugin("class Plugin:\n"
                               "    tools = {'a/b': {'handler': 'ok'}, ' ': {'handler': 'ok'},\n"
                               "             'a\\xa0b': {'handler': 'ok'}}\n"
                               "    def ok(self, **kw):\n"
                               "        return {}\n")
        header = p.create()
        self.assertEqual(header["type"], "created", header)
        self.assertEqual([t["id"] for t in header["tools"]], ["a/b", " ", "a\xa0b"])

    def test_a_tool_spec_that_is_no_json_says_so(self):
        p = self.source_plugin("class Plugin:\n"
                               "    def __init__(self):\n"
                               "        self.tools = {'ok': {'handler': self.ok, 'input_schema': {1, 2}}}\n"
                               "    def ok(self, **kw):\n"
                               "        return {}\n")
        header = p.create()
        self.assertEqual(header["type"], "init_failed", header)
        self.assertEqual(header["error"]["error_type"], "TypeError", header)
        self.assertEqual(header["error"]["message"],
                         "the spec of tool 'ok' cannot be sent as JSON: value of type set is not "
                         "JSON-serialisable (at /input_schema)", header)
        # Of the kind a result's would be, its cause not chained on.
        p = self.source_plugin("class Plugin:\n"
                               "    def __init__(self):\n"
                               "        self.tools = {'ok': {'handler': self.ok,\n"
                               "                             'input_schema': {'x': float('nan')}}}\n"
                               "    def ok(self, **kw):\n"
                               "        return {}\n")
        header = p.create()
        self.assertEqual(header["error"]["error_type"], "ValueError", header)
        self.assertEqual(header["error"]["message"],
                         "the spec of tool 'ok' cannot be sent as JSON: value contains the "
                         "non-finite number nan, which JSON cannot carry (at /input_schema/x)", header)
        self.assertNotIn("During handling", "\n".join(header["error"]["traceback"]), header)

    def test_a_handler_with_nothing_to_call_fails_construction(self):
        # As ForgeSyte's BasePlugin refuses it: at construction, naming
        # the tool, not at every call.
        cases = [
            ("    tools = {'t': {'handler': 'no_such_method'}}\n",
             "AttributeError",
             "the handler of tool 't' names 'no_such_method', which is no method of Plugin"),
            ("    tools = {'t': {'handler': 'label'}}\n    label = 'not callable'\n",
             "AttributeError",
             "the handler of tool 't' names 'label', which is no method of Plugin"),
            ("    tools = {'t': {'handler': 42}}\n",
             "TypeError",
             "the handler of tool 't' must be callable or a method's name, not int"),
            # A table that names no handler, of a plugin of ForgeSyte's
            # contract (a seed plugin's is its own: the next test).
            ("    tools = {'t': {'description': 'no handler'}}\n"
             "    def validate(self):\n        pass\n"
             "class Plugin(Plugin):\n    pass\nPlugin.__mro__[1].__name__ = 'BasePlugin'\n",
             "AttributeError",
             "tool 't' has no handler and the plugin no run_tool()"),
        ]
        for body, error_type, message in cases:
            p = self.source_plugin("class Plugin:\n" + body)
            header = p.create()
            self.assertEqual(header["type"], "init_failed", header)
            self.assertEqual(header["error"]["error_type"], error_type, header)
            self.assertEqual(header["error"]["message"], message, header)
            # Raised by the runner, of no frame of the plugin's: the
            # error's line alone, no heading over no frames.
            self.assertEqual(header["error"]["traceback"],
                             ["%s: %s" % (error_type, message)], header)

    def test_a_seed_plugins_own_tools_and_hooks_are_left_alone(self):
        # The seed constructs `Plugin()` and nothing else: a plain class's
        # `tools` that is no tool table, and its methods named like
        # ForgeSyte's hooks (never called for it, decorated or not, whatever
        # they take), keep it loading (without tools); so does a
        # `__getattr__` that raises what no look-up expects.
        for body in [
            "    tools = ['a', 'b']\n",
            "    tools = 'ocr'\n",
            "    tools = {'ocr': {'description': 'x'}}\n",
            "    tools = {1: {'description': 'x'}}\n",
            "    @property\n    def tools(self):\n        raise RuntimeError('not yet')\n",
            "    def validate(self, strict):\n        raise RuntimeError('called')\n"
            "    def on_load(self, app):\n        raise RuntimeError('called')\n",
            "    import functools\n"
            "    @functools.lru_cache(maxsize=None)\n"
            "    def validate(self, image=None):\n        raise RuntimeError('called')\n"
            "    def on_load(self):\n        raise RuntimeError('called')\n",
            "    def __getattr__(self, key):\n        return {}[key]\n",
        ]:
            p = self.source_plugin("class Plugin:\n" + body)
            header = p.create()
            self.assertEqual(header["type"], "created", (body, header))
            self.assertEqual(header["tools"], [], (body, header))
            if "validate" in body:
                self.assertIn("validate(), on_load() not called: the plugin does not take up "
                              "ForgeSyte's contract", p.stderr_with("not called"))
            elif "__getattr__" not in body:
                self.assertIn("WARNING forgesyte-python-runner[s]: the plugin's `tools` is no tool "
                              "table (", p.stderr_with("is no tool table"))
        # A table one of whose tools names a handler (a method of its name)
        # is a tool table: what is wrong in it fails construction.
        error = self.construction_error(
            "class Plugin:\n"
            "    tools = {'detect': {'description': 'd'}, 'typo': {}}\n"
            "    def detect(self, **kw):\n        return {}\n")
        self.assertEqual(error["message"],
                         "tool 'typo' has no handler and the plugin no run_tool()", error)
        # A seed class's own on_unload(reason) is not called at the end.
        p = self.source_plugin("class Plugin:\n"
                               "    def on_unload(self, reason):\n"
                               "        raise RuntimeError('called')\n")
        self.assertEqual(p.create()["type"], "created")
        p.close_stdin()
        self.assertEqual(p.wait(), 0)
        self.assertIn("on_unload() not called: the plugin does not take up", p.stderr)
        self.assertNotIn("on_unload() failed", p.stderr)
        # With run_tool() (ForgeSyte's contract) the same table fails, and
        # hooks are called: one that needs an argument fails construction.
        error = self.construction_error(
            "class Plugin:\n"
            "    def run_tool(self, name, args):\n        return {}\n"
            "    def on_load(self, model_path):\n        pass\n")
        self.assertEqual(error["error_type"], "TypeError", error)
        error = self.construction_error(
            "class Plugin:\n    tools = 'ocr'\n"
            "    def run_tool(self, name, args):\n        return {}\n")
        self.assertEqual(error["message"],
                         "the plugin's 'tools' must be a dict or a list, not str", error)
        error = self.construction_error(
            "class BasePlugin:\n    pass\n"
            "class Plugin(BasePlugin):\n"
            "    def on_load(self, verbose=False):\n"
            "        raise RuntimeError('on_load ran')\n")
        self.assertEqual(error["message"], "on_load ran", error)

    def test_handlers_of_the_class_body_are_bound_as_the_class_binds_them(self):
        p = self.source_plugin(
            "class Plugin:\n"
            "    unit = 'px'\n"
            "    @classmethod\n"
            "    def measure(cls, n=0):\n"
            "        return {'n': n, 'unit': cls.unit}\n"
            "    @staticmethod\n"
            "    def double(n=0):\n"
            "        return {'n': 2 * n}\n"
            "    tools = {'measure': {'handler': measure}, 'double': {'handler': double},\n"
            "             'by_name': {'handler': 'measure'}}\n")
        header = p.create()
        self.assertEqual(header["type"], "created", header)
        header, _ = p.run("measure", {"n": 3})
        self.assertEqual(header.get("result"), {"n": 3, "unit": "px"}, header)
        header, _ = p.run("double", {"n": 3})
        self.assertEqual(header.get("result"), {"n": 6}, header)
        header, _ = p.run("by_name", {"n": 1})
        self.assertEqual(header.get("result"), {"n": 1, "unit": "px"}, header)

    def test_a_tool_only_the_manifest_lists_without_a_method_fails_its_calls_only(self):
        p = self.source_plugin(
            "class Plugin:\n"
            "    def detect(self, n=0):\n"
            "        return {'n': n}\n")
        header = p.create({"name": "s", "tools": [{"id": "detect"}, {"id": "classify"}]})
        self.assertEqual(header["type"], "created", header)
        header, _ = p.run("detect", {"n": 2})
        self.assertEqual(header.get("result"), {"n": 2}, header)
        header, _ = p.run("classify", {})
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["error_type"], "AttributeError", header)
        said = "WARNING forgesyte-python-runner[s]: tool 'classify' has no handler"
        self.assertIn(said, p.stderr_with(said))

    def test_a_tool_only_the_manifest_lists_beside_the_plugins_own_is_said(self):
        p = self.source_plugin(
            "class Plugin:\n"
            "    def __init__(self):\n"
            "        self.tools = {'detect': {'handler': self.detect}}\n"
            "    def detect(self):\n"
            "        return {}\n")
        header = p.create({"name": "s", "tools": [{"id": "detect"}, {"id": "goodbye"}]})
        self.assertEqual([t["id"] for t in header["tools"]], ["detect"], header)
        header, _ = p.run("goodbye", {})
        self.assertEqual(header["error"]["kind"], "UnknownTool", header)
        said = ("WARNING forgesyte-python-runner[s]: tool 'goodbye' is listed in "
                "manifest.json but not in the plugin's tools: it is not served")
        self.assertIn(said, p.stderr_with(said))

    def test_a_broken_handler_of_a_plugin_with_run_tool_is_said(self):
        p = self.source_plugin(
            "class Plugin:\n"
            "    def __init__(self):\n"
            "        self.tools = {'hello': {'handler': 'helo'}, 'ok': {'handler': self.ok}}\n"
            "    def ok(self, args):\n"
            "        return {}\n"
            "    def run_tool(self, tool_name, args):\n"
            "        return {'ran': tool_name}\n")
        header = p.create({"name": "s"})
        self.assertEqual(header["type"], "created", header)
        header, _ = p.run("hello", {})
        self.assertEqual(header.get("result"), {"ran": "hello"}, header)
        err = p.stderr_with("'helo'", "(run_tool dispatches it: its calls may fail)")
        self.assertIn("WARNING forgesyte-python-runner[s]: ", err)
        self.assertIn("'helo'", err)
        self.assertIn("(run_tool dispatches it: its calls may fail)", err)
        self.assertNotIn("tool 'ok'", p.stderr)

    def test_a_handler_by_name_is_looked_up_at_each_call(self):
        # A plugin may rebind a method (a model switched after warm-up).
        p = self.source_plugin(
            "class Plugin:\n"
            "    tools = {'t': {'handler': 'detect'}, 'switch': {'handler': 'switch'}}\n"
            "    def detect(self):\n"
            "        return {'model': 'small'}\n"
            "    def switch(self):\n"
            "        self.detect = lambda: {'model': 'large'}\n"
            "        return {}\n")
        self.assertEqual(p.create()["type"], "created")
        self.assertEqual(p.run("t", {})[0].get("result"), {"model": "small"})
        p.run("switch", {})
        self.assertEqual(p.run("t", {})[0].get("result"), {"model": "large"})

    def test_bare_class_body_methods_as_tools(self):
        p = self.source_plugin(
            "class Plugin:\n"
            "    @classmethod\n"
            "    def kind(cls):\n"
            "        return {'cls': cls.__name__}\n"
            "    @staticmethod\n"
            "    def one():\n"
            "        return {'one': 1}\n"
            "    tools = {'kind': kind, 'one': one}\n")
        self.assertEqual(p.create()["type"], "created")
        self.assertEqual(p.run("kind", {})[0].get("result"), {"cls": "Plugin"})
        self.assertEqual(p.run("one", {})[0].get("result"), {"one": 1})

    def test_with_run_tool_the_handlers_are_the_plugins_own_business(self):
        p = self.source_plugin(
            "class Plugin:\n"
            "    tools = {'t': {'handler': 'no_such_method'}}\n"
            "    def run_tool(self, name, args):\n"
            "        return {'ran': name}\n")
        header = p.create()
        self.assertEqual(header["type"], "created", header)
        header, _ = p.run("t", {})
        self.assertEqual(header.get("result"), {"ran": "t"}, header)

    def test_a_failing_constructor(self):
        p = self.start("bad_init")
        p.hello()
        header = p.create()
        self.assertEqual(header["type"], "init_failed")
        self.assertEqual(header["id"], 1)
        error = header["error"]
        self.assertEqual(error["kind"], "Python")
        self.assertEqual(error["error_type"], "ValueError")
        self.assertEqual(error["message"], "no weights")
        self.assertEqual(error["traceback"][-1], "ValueError: no weights")

    def test_a_module_without_a_plugin_class(self):
        p = self.start("no_class")
        p.hello()
        header = p.create()
        self.assertEqual(header["type"], "init_failed")
        self.assertEqual(header["error"], {
            "kind": "Python",
            "error_type": "AttributeError",
            "message": "No 'Plugin' class found in module",
        })

    def test_a_named_class_that_is_missing(self):
        d = fixture("echo")
        p = Proc(self, args=["--plugin", "echo", "--plugin-dir", d, "--file",
                             os.path.join(d, "plugin.py"), "--class", "Nope"])
        p.hello()
        header = p.create()
        self.assertEqual(header["type"], "init_failed")
        self.assertEqual(header["error"]["message"], "No 'Nope' class found in module")


class ProtocolViolationTests(RunnerTestCase):
    def expect_exit(self, data, code=65, keep_open=False):
        p = self.start("echo")
        p.hello()
        p.write(data)
        if not keep_open:
            p.close_stdin()
        self.assertEqual(p.wait(5), code, p.stderr)
        return p

    def test_garbage_exits_65(self):
        self.expect_exit(b"\x05\x00\x00\x00hello")

    def test_a_header_that_is_not_json_exits_65(self):
        self.expect_exit(frame(b"not json"))

    def test_a_header_that_is_not_an_object_exits_65(self):
        self.expect_exit(frame(b"[1, 2]"))

    def test_an_unknown_op_exits_65(self):
        self.expect_exit(frame({"op": "frobnicate", "id": 1}))

    def test_missing_fields_exit_65(self):
        for header in ({"op": "call", "id": 1, "args": {}},
                       {"op": "create"},
                       {"op": "create", "id": 1},
                       {"id": 1},
                       {"op": "call", "id": 1, "tool": "echo"},
                       {"op": "call", "id": -1, "tool": "echo", "args": {}},
                       {"op": "call", "id": 1, "tool": "echo", "args": {}, "attachments": "/x"}):
            self.expect_exit(frame(header))

    def test_inconsistent_sizes_exit_65(self):
        good = frame({"op": "call", "id": 1, "tool": "echo", "args": {}})
        body = bytearray(good[4:])
        struct.pack_into("<I", body, 0, len(body))  # header_len too large
        self.expect_exit(struct.pack("<I", len(body)) + bytes(body))
        # A size table that does not fit.
        self.expect_exit(struct.pack("<III", 8, 0, 1000))
        # Trailing bytes.
        body = good[4:] + b"x"
        self.expect_exit(struct.pack("<I", len(body)) + body)

    def test_the_stream_ending_inside_a_frame_exits_65(self):
        good = frame({"op": "call", "id": 1, "tool": "echo", "args": {}})
        self.expect_exit(good[:10])
        self.expect_exit(good[:2])

    def test_an_oversized_frame_exits_65_without_reading_its_body(self):
        # stdin stays open: the runner must not wait for the body.
        p = self.expect_exit(struct.pack("<I", (1 << 31) + 1), keep_open=True)
        self.assertIn("exceeds the limit", p.stderr)

    def test_an_unexpected_exception_while_reading_on_a_worker_thread_exits_65(self):
        # json.loads raises RecursionError (not a ValueError) on a deeply
        # nested header. After a first request the reader is a worker
        # thread, whose death would leave the runner with no reader.
        p = self.start("echo")
        p.start()
        p.write(frame(b"[" * 100000))
        self.assertEqual(p.wait(5), 65, p.stderr)
        self.assertIn("RecursionError", p.stderr)


class UsageTests(RunnerTestCase):
    def exit_code(self, args):
        proc = subprocess.run([PYTHON] + RUNNER + args, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
        return proc.returncode, proc.stdout, proc.stderr.decode()

    def test_bad_command_lines_exit_64(self):
        d = fixture("echo")
        plugin = os.path.join(d, "plugin.py")
        for args in ([],
                     ["--plugin", "x"],
                     ["--file", plugin, "--module", "a.b"],
                     ["--file", plugin, "--memory-limit-mb", "lots"],
                     ["--file", plugin, "--memory-limit-mb", "-5"],
                     ["--file", plugin, "--frobnicate"],
                     ["--file"],
                     ["--module", "a.b:"],
                     ["--module", "a..b"],
                     ["--module", "a.b:C", "--class", "D"]):
            code, out, err = self.exit_code(args)
            self.assertEqual(code, 64, args)
            self.assertEqual(out, b"", args)  # nothing on the protocol
            self.assertIn("usage:", err)

    def test_a_memory_limit_that_cannot_be_set_exits_71(self):
        d = fixture("echo")
        code, out, err = self.exit_code(
            ["--plugin", "echo", "--file", os.path.join(d, "plugin.py"),
             "--memory-limit-mb", str(1 << 60)])
        self.assertEqual(code, 71, err)
        self.assertIn("memory limit", err)

    def test_library_is_another_spelling_of_file(self):
        d = fixture("echo")
        p = Proc(self, args=["--library", os.path.join(d, "plugin.py"),
                             "--memory-limit-mb", "0", "--plugin", "echo"])
        p.start()
        header, _ = p.run("echo", {"a": 1})
        self.assertEqual(header["result"], {"a": 1})


class BasePluginShapeTests(RunnerTestCase):
    def setUp(self):
        self.p = self.start("handlers")
        self.created = self.p.start()

    def test_the_plugin_shaped_class_is_found_and_its_tools_listed(self):
        tools = {t["id"]: t for t in self.created["tools"]}
        self.assertIn("shout", tools)
        self.assertEqual(tools["add"]["title"], "Add numbers")
        self.assertEqual(tools["add"]["input_schema"], {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        })
        self.assertEqual(tools["add"]["output_schema"], {
            "type": "object", "properties": {"sum": {"type": "integer"}}})
        header, _ = self.p.run("loaded")
        # on_load() ran; the server's app.plugins.base was not provided.
        self.assertEqual(header["result"], {"loaded": True, "app_available": False})

    def test_handlers_are_called_as_forgesyte_calls_them(self):
        header, _ = self.p.run("shout", {"text": "hi", "times": 2})
        self.assertEqual(header["result"], {"text": "HI HI "})
        header, _ = self.p.run("add", {"a": 2, "b": 3})
        self.assertEqual(header["result"], {"sum": 5})
        header, _ = self.p.run("keys", {"z": 1, "a": 2})
        self.assertEqual(header["result"], {"keys": ["a", "z"]})
        header, _ = self.p.run("later", {"value": [1]})
        self.assertEqual(header["result"], {"value": [1]})
        # A function of the class's body as the handler is called as the
        # instance's method.
        header, _ = self.p.run("double", {"n": 4})
        self.assertEqual(header["result"], {"n": 8})
        header, _ = self.p.run("add", {"a": 2, "c": 3})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["kind"], "Failed")
        self.assertEqual(header["error"]["error_type"], "TypeError")
        # The shape each handler takes is remembered by argument names:
        # the same names again, and other names for the same handler.
        header, _ = self.p.run("add", {"a": 4, "b": 5})
        self.assertEqual(header["result"], {"sum": 9})
        header, _ = self.p.run("keys", {"b": 1})
        self.assertEqual(header["result"], {"keys": ["b"]})
        header, _ = self.p.run("shout", {"text": "yo"})
        self.assertEqual(header["result"], {"text": "YO "})

    def test_a_name_attribute_unlike_the_served_name_is_logged(self):
        # Served as "test" (the host's --plugin); its class says "handlers".
        d = fixture("handlers")
        other = Proc(self, args=["--plugin", "test", "--plugin-dir", d, "--file", os.path.join(d, "plugin.py")])
        other.start()
        said = "the plugin's name attribute says 'handlers', but it is served as 'test'"
        deadline = time.monotonic() + 5
        while said not in other.stderr and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertIn(said, other.stderr)
        # setUp's runner is served as "handlers", as its class says.
        header, _ = self.p.run("add", {"a": 1, "b": 1})
        self.assertEqual(header["result"], {"sum": 2})
        self.assertNotIn("name attribute", self.p.stderr)

    def test_content_encoding_base64_is_decoded(self):
        header, _ = self.p.run("size", {"image": base64.b64encode(b"abcd").decode()})
        self.assertEqual(header["result"], {"size": 4, "type": "bytes"})

    def test_results_are_converted(self):
        header, blobs = self.p.run("convert", {"kind": "shapes"})
        self.assertEqual(header["type"], "result", header)
        self.assertEqual(header["result"], {
            "tuple": [1, 2],
            "int_keys": {"1": "one", "2": "two"},
            "box": {"label": "a", "corners": [0, 0, 2, 2], "mask": None},
            "a/b~c": [None, "x"],
            "bytearray": None,
        })
        self.assertEqual(header["attachments"], ["/box/mask", "/a~1b~0c/0", "/bytearray"])
        self.assertEqual(blobs, [b"\x01\x02", b"\xff", b"ba"])
        header, blobs = self.p.run("convert", {"kind": "root_bytes"})
        self.assertEqual((header["result"], header["attachments"], blobs), (None, [""], [b"\x00raw"]))

    def test_unserialisable_results_fail(self):
        header, _ = self.p.run("convert", {"kind": "set"})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["kind"], "Failed")
        self.assertEqual(header["error"]["error_type"], "TypeError")
        self.assertEqual(header["error"]["message"],
                         "tool result of type set is not JSON-serialisable (at /items)")
        header, _ = self.p.run("convert", {"kind": "other"})
        self.assertEqual(header["error"]["message"], "tool result of type Weird is not JSON-serialisable")
        header, _ = self.p.run("convert", {"kind": "nan"})
        self.assertEqual(header["error"]["error_type"], "ValueError")

    def test_sys_exit_in_a_tool_is_a_tool_error(self):
        header, _ = self.p.run("convert", {"kind": "exit"})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["error_type"], "SystemExit")
        self.assertEqual(header["error"]["message"], "3")
        header, _ = self.p.run("add", {"a": 1})
        self.assertEqual(header["result"], {"sum": 1})

    def test_sys_exit_while_converting_a_result_is_a_tool_error(self):
        header, _ = self.p.run("convert", {"kind": "exit_in_dump"})
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["error_type"], "SystemExit")
        self.assertEqual(header["error"]["message"], "4 (raised while the tool's result was converted to JSON)")
        header, _ = self.p.run("add", {"a": 2})
        self.assertEqual(header["result"], {"sum": 2})

    def test_results_the_host_cannot_read_are_tool_errors(self):
        """Each of these ended the runner (a protocol fault, or out of
        memory), which made the plugin FAILED; each is the call's error."""
        header, _ = self.p.run("convert", {"kind": "deep", "depth": 127})
        self.assertEqual(header["type"], "result", header)
        for kind, depth in (("deep", 128), ("holds_itself", 0)):
            header, _ = self.p.run("convert", {"kind": kind, "depth": depth})
            self.assertEqual(header["type"], "tool_failed", header)
            self.assertEqual(header["error"]["error_type"], "ResultTooDeep", header)
            self.assertIn("128 or more levels deep", header["error"]["message"])
            # For the host's log (the answer never holds a traceback).
            self.assertEqual(header["error"]["traceback"], serve.NOT_SENT, header)
        header, _ = self.p.run("convert", {"kind": "many_bytes"})
        self.assertEqual(header["error"]["error_type"], "ResultTooLarge", header)
        self.assertIn("70000 bytes values; at most 65536", header["error"]["message"])
        self.assertEqual(header["error"]["traceback"], serve.NOT_SENT, header)
        header, _ = self.p.run("convert", {"kind": "unprintable_exit"})
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["message"], "<unprintable Unprintable>")
        header, _ = self.p.run("add", {"a": 3})
        self.assertEqual(header["result"], {"sum": 3})

    def test_an_error_over_the_answer_limit_is_cut_to_fit(self):
        p = self.start("handlers")
        p.start({"name": "handlers", "limits": {"max_response_mb": 1}})
        header, _ = p.run("convert", {"kind": "huge_error"})
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["error_type"], "ValueError")
        self.assertEqual(header["error"]["traceback"], [])
        self.assertIn("characters cut)", header["error"]["message"])
        header, _ = p.run("add", {"a": 4})
        self.assertEqual(header["result"], {"sum": 4})

    def test_dataclass_fields_are_converted_in_place_not_deep_copied(self):
        header, _ = self.p.run("convert", {"kind": "dataclass_view"})
        self.assertEqual(header["type"], "result", header)
        self.assertEqual(header["result"], {"label": "v", "corners": [None], "mask": None})

    def _check_reading(self, kind):
        """The handlers fixture's pydantic ``Reading`` of ``kind``: the date
        in pydantic's JSON form, its bytes field an attachment."""
        header, blobs = self.p.run("convert", {"kind": kind})
        self.assertEqual(header["type"], "result", header)
        self.assertEqual(header["result"], {"when": "2024-01-02", "raw": None, "values": [1, 2]})
        self.assertEqual(header["attachments"], ["/raw"])
        self.assertEqual(blobs, [b"\x00\x01"])

    @unittest.skipUnless(interpreter_has("pydantic"), "pydantic is not installed")
    def test_pydantic_models(self):
        self._check_reading("pydantic")

    @unittest.skipUnless(interpreter_has("pydantic"), "pydantic is not installed")
    def test_pydantic_v1_models(self):
        # `.dict()`: pydantic 1, or pydantic 2's `pydantic.v1`.
        self._check_reading("pydantic_v1")


@unittest.skipUnless(interpreter_has("numpy"), "numpy is not installed")
class NumpyResultTests(RunnerTestCase):
    """numpy results (fixture ``numpy_results``): ``.tolist()`` without the
    runner importing numpy. Run by the loader's tests under the test
    virtualenv (``target/test-venv``), where numpy and pydantic are
    installed."""

    def setUp(self):
        self.p = self.start("numpy_results")
        self.p.start()

    def result(self, kind):
        header, blobs = self.p.run("convert", {"kind": kind})
        self.assertEqual(header["type"], "result", header)
        self.assertEqual(blobs, [])
        self.assertNotIn("attachments", header)
        return header["result"]

    def failure(self, kind):
        header, _ = self.p.run("convert", {"kind": kind})
        self.assertEqual(header["type"], "tool_failed", header)
        self.assertEqual(header["error"]["kind"], "Failed")
        return header["error"]

    def test_scalars(self):
        self.assertEqual(self.result("int64"), -(2 ** 40))
        value = self.result("float32")
        self.assertEqual((value, type(value)), (1.5, float))
        value = self.result("bool")
        self.assertIs(value, True)

    def test_a_2d_array_is_nested_lists(self):
        self.assertEqual(self.result("matrix"), [[0, 1, 2], [3, 4, 5]])

    def test_numpy_values_nested_in_dicts_and_lists(self):
        self.assertEqual(self.result("nested"), {
            "count": 3,
            "scores": [0.5, 0.25, 255],
            "flags": [True, False],
            "inner": {"empty": [], "grid": [[[1, 0], [0, 1]]]},
        })

    @unittest.skipUnless(interpreter_has("pydantic"), "pydantic is not installed")
    def test_numpy_fields_of_a_pydantic_model(self):
        # model_dump() keeps the fields' numpy values; each becomes
        # .tolist() (pydantic's own JSON mode cannot serialise ndarray).
        self.assertEqual(self.result("model"), {"label": "cat", "box": [[0, 1], [2, 3]], "score": 0.75})

    def test_nan_in_an_array_is_a_tool_error_naming_where(self):
        error = self.failure("nan")
        self.assertEqual(error["error_type"], "ValueError")
        self.assertEqual(
            error["message"],
            "tool result contains the non-finite number nan, which JSON cannot carry (at /values/1)")
        # The runner is still serving.
        self.assertEqual(self.result("int64"), -(2 ** 40))

    def test_a_nan_scalar_is_a_tool_error(self):
        error = self.failure("nan_scalar")
        self.assertEqual(error["error_type"], "ValueError")
        self.assertIn("non-finite number", error["message"])
        self.assertIn("nan", error["message"])
        self.assertTrue(error["message"].endswith("(at /x)"), error["message"])

    def test_a_complex_number_is_a_tool_error_naming_the_type(self):
        error = self.failure("complex")
        self.assertEqual(error["error_type"], "TypeError")
        self.assertEqual(error["message"], "tool result of type complex is not JSON-serialisable (at /z)")

    def test_numpy_types_in_a_computed_result(self):
        header, _ = self.p.run("mean", {"values": [1, 2, 4.5]})
        self.assertEqual(header["result"], {"values": [1.0, 2.0, 4.5], "mean": 2.5, "count": 3})


class ModuleModeTests(RunnerTestCase):
    def test_module_with_a_class(self):
        p = Proc(self, args=["--plugin", "handlers", "--plugin-dir", fixture("handlers"),
                             "--module", "plugin:HandlerPlugin"])
        p.start()
        header, _ = p.run("add", {"a": 40, "b": 2})
        self.assertEqual(header["result"], {"sum": 42})

    def test_a_plugin_directory_that_is_its_package(self):
        # The published layout served from its sources: the directory is
        # the package (``__init__.py``, relative imports), the entrypoint
        # a module of it.
        d = os.path.join(tempfile.mkdtemp(), "fs_pkg_demo")
        self.addCleanup(shutil.rmtree, os.path.dirname(d))
        os.mkdir(d)
        with open(os.path.join(d, "__init__.py"), "w") as f:
            f.write("LOADED_AS = __name__\n")
        with open(os.path.join(d, "helpers.py"), "w") as f:
            f.write("def double(x):\n    return 2 * x\n")
        with open(os.path.join(d, "plugin.py"), "w") as f:
            f.write("from . import LOADED_AS\nfrom .helpers import double\n"
                    "class Plugin:\n"
                    "    tools = {'twice': {'handler': 'twice'}}\n"
                    "    def twice(self, n=0):\n"
                    "        return {'n': double(n), 'package': LOADED_AS}\n"
                    "    def run_tool(self, name, args):\n"
                    "        return getattr(self, name)(**args)\n")
        p = Proc(self, args=["--plugin", "demo", "--plugin-dir", d,
                             "--module", "fs_pkg_demo.plugin"])
        p.start()
        header, _ = p.run("twice", {"n": 21})
        self.assertEqual(header["result"], {"n": 42, "package": "fs_pkg_demo"}, header)

    def test_a_plugin_directory_that_is_its_namespace_package(self):
        # The published OCR plugin's sources: no ``__init__.py`` (PEP 420),
        # its modules importing each other by the package's name. Its
        # parent is not on sys.path: only the directory, as the package.
        d = os.path.join(tempfile.mkdtemp(), "fs_ns_demo")
        self.addCleanup(shutil.rmtree, os.path.dirname(d))
        os.mkdir(d)
        with open(os.path.join(d, "helpers.py"), "w") as f:
            f.write("def double(x):\n    return 2 * x\n")
        with open(os.path.join(d, "plugin.py"), "w") as f:
            f.write("from fs_ns_demo.helpers import double\n"
                    "import fs_ns_demo\n"
                    "class Plugin:\n"
                    "    tools = {'twice': {'handler': 'twice'}}\n"
                    "    def twice(self, n=0):\n"
                    "        return {'n': double(n), 'path': list(fs_ns_demo.__path__)}\n"
                    "    def run_tool(self, name, args):\n"
                    "        return getattr(self, name)(**args)\n")
        p = Proc(self, args=["--plugin", "demo", "--plugin-dir", d,
                             "--module", "fs_ns_demo.plugin"])
        p.start()
        header, _ = p.run("twice", {"n": 21})
        self.assertEqual(header["result"]["n"], 42, header)
        self.assertEqual([os.path.realpath(x) for x in header["result"]["path"]],
                         [os.path.realpath(d)], header)

    def test_a_checkout_named_as_its_package_still_imports_the_package_inside(self):
        # ``nsrepo/`` holding ``nsrepo/plugin.py`` (with or without its
        # ``__init__.py``): on sys.path it holds the package, and the
        # directory is not taken for a namespace package of its own name.
        for with_init in (True, False):
            d = os.path.join(tempfile.mkdtemp(), "fs_checkout")
            self.addCleanup(shutil.rmtree, os.path.dirname(d))
            os.makedirs(os.path.join(d, "fs_checkout"))
            if with_init:
                open(os.path.join(d, "fs_checkout", "__init__.py"), "w").close()
            with open(os.path.join(d, "fs_checkout", "plugin.py"), "w") as f:
                f.write("class Plugin:\n"
                        "    tools = {'ok': {'handler': 'ok'}}\n"
                        "    def ok(self):\n"
                        "        return {'ok': True}\n"
                        "    def run_tool(self, name, args):\n"
                        "        return getattr(self, name)(**args)\n")
            p = Proc(self, args=["--plugin", "demo", "--plugin-dir", d,
                                 "--module", "fs_checkout.plugin"])
            p.start()
            header, _ = p.run("ok", {})
            self.assertEqual(header["result"], {"ok": True}, (with_init, header))

    def test_module_with_class_flag(self):
        p = Proc(self, args=["--plugin", "echo", "--plugin-dir", fixture("echo"),
                             "--module", "plugin", "--class", "Plugin"])
        p.start()
        header, _ = p.run("echo", {"a": "b"})
        self.assertEqual(header["result"], {"a": "b"})


class BytecodeTests(RunnerTestCase):
    """A plugin directory's modules run from their sources: bytecode planted
    in ``__pycache__`` (not covered by signatures or pins), with a header
    that matches its source's time and size, never runs; none is written."""

    def plant(self, path, source, planted):
        """Writes ``source`` to ``path`` with bytecode compiled from
        ``planted`` (as long) cached for it, header and all matching."""
        import py_compile
        self.assertEqual(len(source), len(planted))
        with open(path, "w") as f:
            f.write(planted)
        os.utime(path, (1700000000, 1700000000))
        py_compile.compile(path, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        with open(path, "w") as f:
            f.write(source)
        os.utime(path, (1700000000, 1700000000))

    def sourceless(self, d, name):
        """Bytecode of module ``name`` beside where its source was (not in
        ``__pycache__``: where Python loads it from), the source gone."""
        import py_compile
        source = os.path.join(d, name + ".py")
        with open(source, "w") as f:
            f.write("X = 1\n")
        py_compile.compile(source, cfile=os.path.join(d, name + ".pyc"), doraise=True)
        os.remove(source)

    def test_planted_bytecode_never_runs(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.plant(os.path.join(d, "helper.py"), 'WHO = "source"\n', 'WHO = "plants"\n')
        plugin = (
            "import helper\n"
            "class Plugin:\n"
            "    tools = {'who': {'handler': 'who'}}\n"
            "    def who(self, args):\n"
            "        return {'helper': helper.WHO, 'me': ME}\n"
            "ME = 'source!'\n"
        )
        self.plant(os.path.join(d, "plugin.py"), plugin, plugin.replace("'source!'", "'planted'"))
        cached = os.listdir(os.path.join(d, "__pycache__"))
        self.assertEqual(len(cached), 2, cached)
        for mode in (["--file", os.path.join(d, "plugin.py")], ["--module", "plugin"]):
            p = Proc(self, args=["--plugin", "planted", "--plugin-dir", d] + mode,
                     env={"PYTHONDONTWRITEBYTECODE": ""})
            p.start()
            header, _ = p.run("who", {})
            self.assertEqual(header["result"], {"helper": "source", "me": "source!"}, mode)
        self.assertEqual(sorted(os.listdir(os.path.join(d, "__pycache__"))), sorted(cached))

    def test_a_virtual_environment_in_the_plugin_is_the_interpreter_s_installation(self):
        # The manifest's "python": ".venv/bin/python": the modules of that
        # virtual environment load as installed packages do, bytecode
        # included (compiled from source at every start, a plugin importing
        # sympy loaded six times slower); the plugin's own files still run
        # from their sources.
        import hashlib
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        venv = os.path.join(d, ".venv")
        subprocess.run([PYTHON, "-m", "venv", "--without-pip", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        self.assertTrue(site.startswith(venv + os.sep), site)
        self.plant(os.path.join(site, "venvdep.py"), 'DEP = "source"\n', 'DEP = "cached"\n')
        self.plant(os.path.join(d, "helper.py"), 'WHO = "source"\n', 'WHO = "plants"\n')
        plugin = (
            "import helper, venvdep\n"
            "class Plugin:\n"
            "    tools = {'who': {'handler': 'who'}}\n"
            "    def who(self, args):\n"
            "        return {'helper': helper.WHO, 'dep': venvdep.DEP}\n"
        )
        with open(os.path.join(d, "plugin.py"), "w") as f:
            f.write(plugin)
        sources = {}
        for name in ("plugin.py", "helper.py"):
            with open(os.path.join(d, name), "rb") as f:
                sources[name] = hashlib.sha256(f.read()).hexdigest()
        fd = os.memfd_create("sources")
        self.addCleanup(os.close, fd)
        os.write(fd, json.dumps(sources).encode())
        p = Proc(self, args=["--plugin", "venv", "--plugin-dir", d, "--file", os.path.join(d, "plugin.py")],
                 env={"PYTHONDONTWRITEBYTECODE": ""}, python=python)
        p.start()
        header, _ = p.run("who", {})
        self.assertEqual(header.get("result"), {"helper": "source", "dep": "cached"}, (header, p.stderr))
        # Signed or pinned: no signature covers the virtual environment, so
        # nothing of it is imported, and the error says why and what to do.
        p = Proc(self, args=["--plugin", "venv", "--plugin-dir", d, "--file", os.path.join(d, "plugin.py"),
                             "--sources-fd", str(fd)],
                 env={"PYTHONDONTWRITEBYTECODE": ""}, python=python, pass_fds=(fd,))
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed", header)
        message = header["error"]["message"]
        self.assertIn("is in the virtual environment .venv inside the plugin's directory", message)
        self.assertIn("give a signed or pinned plugin an interpreter outside its directory", message)

    def test_planted_bytecode_of_an_installed_package_never_runs(self):
        # An entry-point package: importable from sys.path (PYTHONPATH
        # here), its directory the plugin's. Its __init__, the plugin
        # module and a helper all have matching planted bytecode; a
        # module outside the package (a dependency) still loads as Python
        # loads it, bytecode included.
        site = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, site)
        pkg = os.path.join(site, "planted_pkg")
        os.mkdir(pkg)
        self.plant(os.path.join(pkg, "__init__.py"), 'INIT = "source"\n', 'INIT = "plants"\n')
        self.plant(os.path.join(pkg, "helper.py"), 'WHO = "source"\n', 'WHO = "plants"\n')
        self.plant(os.path.join(site, "dep.py"), 'DEP = "source"\n', 'DEP = "cached"\n')
        plugin = (
            "import dep\n"
            "from planted_pkg import INIT, helper\n"
            "class Plugin:\n"
            "    tools = {'who': {'handler': 'who'}}\n"
            "    def who(self, args):\n"
            "        return {'init': INIT, 'helper': helper.WHO, 'me': ME, 'dep': dep.DEP}\n"
            "ME = 'source!'\n"
        )
        self.plant(os.path.join(pkg, "plugin.py"), plugin, plugin.replace("'source!'", "'planted'"))
        cached = os.listdir(os.path.join(pkg, "__pycache__"))
        self.assertEqual(len(cached), 3, cached)
        p = Proc(self, args=["--plugin", "planted", "--plugin-dir", pkg,
                             "--module", "planted_pkg.plugin", "--installed"],
                 env={"PYTHONDONTWRITEBYTECODE": "", "PYTHONPATH": site})
        p.start()
        header, _ = p.run("who", {})
        self.assertEqual(header["result"],
                         {"init": "source", "helper": "source", "me": "source!", "dep": "cached"})
        self.assertEqual(sorted(os.listdir(os.path.join(pkg, "__pycache__"))), sorted(cached))

    def test_planted_bytecode_of_a_file_loaded_by_path_never_runs(self):
        # importlib's own loaders, which the plugin gets from
        # spec_from_file_location: no finder of the runner sees them.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.plant(os.path.join(d, "helper.py"), 'WHO = "source"\n', 'WHO = "plants"\n')
        self.sourceless(d, "gone")
        with open(os.path.join(d, "plugin.py"), "w") as f:
            f.write(
                "import importlib.util, os\n"
                "HERE = os.path.dirname(os.path.abspath(__file__))\n"
                "def load(name, file):\n"
                "    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))\n"
                "    module = importlib.util.module_from_spec(spec)\n"
                "    spec.loader.exec_module(module)\n"
                "    return module\n"
                "class Plugin:\n"
                "    tools = {'who': {'handler': 'who'}}\n"
                "    def who(self, args):\n"
                "        try:\n"
                "            load('gone', 'gone.pyc')\n"
                "            gone = 'ran'\n"
                "        except ImportError as e:\n"
                "            gone = str(e)\n"
                "        return {'helper': load('by_path', 'helper.py').WHO, 'gone': gone}\n")
        cached = sorted(os.listdir(os.path.join(d, "__pycache__")))
        p = Proc(self, args=["--plugin", "by-path", "--plugin-dir", d,
                             "--file", os.path.join(d, "plugin.py")],
                 env={"PYTHONDONTWRITEBYTECODE": ""})
        p.start()
        header, _ = p.run("who", {})
        self.assertEqual(header["result"]["helper"], "source")
        self.assertIn("bytecode without its source", header["result"]["gone"])
        self.assertEqual(sorted(os.listdir(os.path.join(d, "__pycache__"))), cached)

    def test_a_linked_plugin_loading_its_files_by_their_resolved_path_runs_no_bytecode(self):
        # The plugins directory reached through a link, and a plugin that
        # names its files by os.path.realpath(__file__) (a common idiom):
        # they are still its tree's files.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        real = os.path.join(d, "real")
        os.mkdir(real)
        link = os.path.join(d, "link")
        os.symlink(real, link)
        self.plant(os.path.join(real, "helper.py"), 'WHO = "source"\n', 'WHO = "plants"\n')
        with open(os.path.join(real, "plugin.py"), "w") as f:
            f.write(
                "import importlib.util, os\n"
                "HERE = os.path.dirname(os.path.realpath(__file__))\n"
                "class Plugin:\n"
                "    tools = {'who': {'handler': 'who'}}\n"
                "    def who(self, args):\n"
                "        spec = importlib.util.spec_from_file_location(\n"
                "            'by_real', os.path.join(HERE, 'helper.py'))\n"
                "        module = importlib.util.module_from_spec(spec)\n"
                "        spec.loader.exec_module(module)\n"
                "        return {'helper': module.WHO}\n")
        p = Proc(self, args=["--plugin", "linked", "--plugin-dir", link,
                             "--file", os.path.join(link, "plugin.py")],
                 env={"PYTHONDONTWRITEBYTECODE": ""})
        p.start()
        header, _ = p.run("who", {})
        self.assertEqual(header["result"]["helper"], "source")

    def test_a_module_that_is_only_bytecode_is_refused(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.sourceless(d, "lonely")
        with open(os.path.join(d, "plugin.py"), "w") as f:
            f.write("import lonely\nclass Plugin:\n    tools = {}\n")
        p = Proc(self, args=["--plugin", "lonely", "--plugin-dir", d,
                             "--file", os.path.join(d, "plugin.py")])
        header = p.recv_header()
        self.assertEqual(header["type"], "import_failed")
        self.assertEqual(header["error"]["error_type"], "ImportError")
        self.assertIn("lonely is bytecode without its source", header["error"]["message"])
        self.assertEqual(p.wait(5), 0)


class ManifestToolsTests(RunnerTestCase):
    def test_tools_come_from_the_manifest_when_the_plugin_has_none(self):
        with open(os.path.join(fixture("manifest_tools"), "manifest.json")) as f:
            manifest = json.load(f)
        p = self.start("manifest_tools")
        created = p.start(manifest)
        self.assertEqual(created["tools"], [
            {
                "id": "analyze",
                "title": "Extract Text",
                "description": "Pretends to read text in an image.",
                "input_schema": {"type": "object", "properties": {
                    "image_base64": {"type": "string"}, "language": {"type": "string"}}},
                "output_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
            },
            {
                "id": "describe",
                "title": "describe",
                "description": "Says which tool ran.",
                "input_schema": {"type": "object"},
                "output_schema": {"type": "object"},
            },
        ])
        header, _ = p.run("analyze", {"image_base64": "AAE="})
        self.assertEqual(header["result"], {"tool": "analyze", "args": {"image_base64": "AAE="}})
        header, _ = p.run("nope")
        self.assertEqual(header["error"]["kind"], "UnknownTool")

    def test_a_plugin_without_tools_or_manifest_tools_has_none(self):
        p = self.start("manifest_tools")
        created = p.start({"name": "manifest_tools"})
        self.assertEqual(created["tools"], [])


class MemoryLimitTests(RunnerTestCase):
    def test_running_out_of_memory_in_a_tool_ends_the_runner(self):
        # A MemoryError leaves the interpreter untrustworthy: the runner
        # exits with EXIT_MEMORY and says so on stderr, and the host reports
        # the crash (as "exceeded memory limit" under a limit).
        d = fixture("handlers")
        p = Proc(self, args=["--plugin", "handlers", "--plugin-dir", d, "--file",
                             os.path.join(d, "plugin.py"), "--memory-limit-mb", "512"])
        p.start()
        header, _ = p.run("alloc", {"mb": 16})
        self.assertEqual(header["result"], {"allocated_mb": 16})
        with self.assertRaises(EOFError):
            p.run("alloc", {"mb": 2048})
        self.assertEqual(p.wait(), 70)
        # Read once the runner has exited: the end of its stdout can come
        # before its last stderr line is read.
        self.assertIn("MemoryError: out of memory in tool 'alloc'", p.stderr)

    def test_a_memory_error_the_plugin_raises_itself_is_its_error(self):
        # Under a limit, at call time: a tool error with the plugin's
        # message, and the runner answers the next call.
        d = fixture("faulty")
        p = Proc(self, args=["--plugin", "faulty", "--plugin-dir", d, "--file",
                             os.path.join(d, "plugin.py"), "--memory-limit-mb", "512"])
        p.start()
        header, _ = p.run("refuse", {})
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["error_type"], "MemoryError")
        self.assertEqual(header["error"]["message"], "frame too large for this model")
        header, _ = p.run("ok", {})
        self.assertEqual(header["result"], {"ok": True})

    def test_a_raise_statement_is_told_from_a_failed_allocation(self):
        def refuse():
            raise MemoryError("explicit")

        # Sizes no address space holds, 32-bit or 64-bit.
        def allocate():
            return bytearray(sys.maxsize)

        def repeat():
            return [0] * sys.maxsize

        def reraise():
            try:
                allocate()
            except MemoryError:
                raise

        def wrap():
            try:
                allocate()
            except MemoryError as e:
                raise MemoryError("wrapped") from e

        class Own(MemoryError):
            pass

        def subclass():
            raise Own("own")

        def bare():
            raise MemoryError

        def nested():
            # Its own, in the handling of its own: still its own.
            try:
                refuse()
            except MemoryError:
                raise MemoryError("again")

        def caused_otherwise():
            # Raised from another error while handling a failed allocation.
            try:
                allocate()
            except MemoryError:
                raise MemoryError("x") from ValueError("y")

        cases = [(refuse, True), (allocate, False), (repeat, False), (reraise, False),
                 (wrap, False), (subclass, True), (bare, False), (nested, True),
                 (caused_otherwise, False)]
        for function, expected in cases:
            try:
                function()
            except MemoryError as e:
                self.assertEqual(base.raised_by_a_statement(e), expected, function.__name__)
            else:
                self.fail("%s raised nothing" % function.__name__)
        self.assertFalse(base.raised_by_a_statement(MemoryError()))

    def test_results_over_the_manifest_limit_fail_as_tool_errors(self):
        p = self.start("echo")
        p.start({"name": "echo", "limits": {"max_response_mb": 1}})
        header, _ = p.run("echo", {"data": None}, [b"x" * (2 * 1024 * 1024)], ["/data"])
        self.assertEqual(header["type"], "tool_failed")
        self.assertEqual(header["error"]["error_type"], "ResultTooLarge")
        header, blobs = p.run("echo", {"data": None}, [b"x" * 1000], ["/data"])
        self.assertEqual(blobs, [b"x" * 1000])


class UnitTests(unittest.TestCase):
    """Pure functions of the runner's modules, imported in this process."""

    def test_errors_the_sandbox_may_cause_say_so_and_how_to_widen_it(self):
        import socket
        import urllib.error

        from runner.errors import (ENV_HINT, FILESYSTEM_HINT, FILTERED_HINT, NETWORK_HINT,
                                   SHM_HINT, python_error, with_sandbox_hint)

        confined = {"env": "scrubbed", "network": "isolated: a network namespace of its own",
                    "filesystem": "confined: Landlock ABI 7",
                    "syscalls": "filtered: no new socket (Unix pairs of streams or packets only)"}

        def message(exc, confinement=confined):
            return with_sandbox_hint(python_error(exc, kind="Failed"), exc, confinement)["message"]

        def raised(f):
            try:
                f()
            except BaseException as e:
                return e
            raise AssertionError("nothing raised")

        # The seccomp filter's refusals.
        refused = PermissionError(errno.EACCES, "Permission denied")
        self.assertEqual(message(refused), "[Errno 13] Permission denied (%s)" % FILTERED_HINT)
        preexec = subprocess.SubprocessError("Exception occurred in preexec_fn.")
        self.assertTrue(message(preexec).endswith("(%s)" % FILTERED_HINT))
        # Landlock's: a path.
        named = PermissionError(errno.EACCES, "Permission denied", "/srv/token")
        self.assertTrue(message(named).endswith("(%s)" % FILESYSTEM_HINT), message(named))
        # POSIX shared memory (a shm_open name, not a path) and semaphores
        # (SemLock's error names no file): /dev/shm, not the filter.
        segment = PermissionError(errno.EACCES, "Permission denied", "/psm_1e0c9c41")
        self.assertTrue(message(segment).endswith("(%s)" % SHM_HINT), message(segment))
        semaphore = {}
        exec(compile("def lock():\n    raise PermissionError(13, 'Permission denied')\n",
                     "/usr/lib/python3/multiprocessing/synchronize.py", "exec"), semaphore)
        semlock = raised(semaphore["lock"])
        self.assertTrue(message(semlock).endswith("(%s)" % SHM_HINT), message(semlock))
        # The network: a socket refused under a URLError, a lookup or a
        # route that fails.
        wrapped = urllib.error.URLError(PermissionError(errno.EACCES, "Permission denied"))
        self.assertTrue(message(wrapped).endswith("(%s)" % NETWORK_HINT), message(wrapped))
        lookup = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        self.assertTrue(message(lookup).endswith("(%s)" % NETWORK_HINT))
        unreachable = OSError(errno.ENETUNREACH, "Network is unreachable")
        self.assertTrue(message(unreachable).endswith("(%s)" % NETWORK_HINT))
        # A variable the scrubbed environment lacks; another KeyError is
        # the plugin's own.
        missing = raised(lambda: os.environ["FORGESYTE_TEST_SURELY_UNSET_VARIABLE"])
        self.assertTrue(message(missing).endswith("(%s)" % ENV_HINT), message(missing))
        own = raised(lambda: {}["FORGESYTE_TEST_SURELY_UNSET_VARIABLE"])
        self.assertNotIn(ENV_HINT, message(own))
        # Not confined, or that part not enforced; another errno; another
        # error: as they are.
        for exc in (refused, named, wrapped, lookup, missing):
            self.assertNotIn(" (a confined runner", message(exc, None))
        allowed = dict(confined, network="allowed", env="unconfined: asked")
        for exc in (lookup, unreachable, missing):
            self.assertNotIn(" (a confined runner", message(exc, allowed))
        self.assertNotIn(FILTERED_HINT, message(PermissionError(errno.EPERM, "Operation not permitted")))
        self.assertNotIn(FILTERED_HINT, message(subprocess.SubprocessError("other")))
        self.assertNotIn(FILTERED_HINT, message(ValueError("Exception occurred in preexec_fn.")))

    def test_unconfined_names_every_part_not_enforced(self):
        # The cases the native runner's rule is tested with too
        # (sandbox.rs): both runners refuse by one rule.
        from runner.confine import unconfined

        with open(os.path.join(REPO, "tests", "fixtures", "unconfined.json")) as f:
            cases = json.load(f)
        self.assertGreaterEqual(len(cases), 5)
        for case in cases:
            self.assertEqual(unconfined(case["report"]), case["unconfined"], case)

    def test_an_entry_point_may_name_an_attribute_path(self):
        import types

        module = types.ModuleType("pkg.plugin")

        class Outer:
            class Plugin:
                pass

        module.Outer = Outer
        self.assertIs(loading.find_class(module, "Outer.Plugin"), Outer.Plugin)
        missing = loading.find_class(module, "Outer.Nope")
        self.assertEqual(missing["error_type"], "AttributeError", missing)
        self.assertIn("No 'Outer.Nope' class found", missing["message"], missing)

    def test_handler_shapes_are_remembered_per_kind_of_callable(self):
        # A classmethod object and the method made from it share their
        # function but not their signature: what one binds as must not be
        # remembered for the other.
        class Plugin:
            @classmethod
            def detect(cls, args):
                return {"got": args}

        bind = serve.bind_and_call
        raw = Plugin.__dict__["detect"]
        for _ in range(2):
            with self.assertRaises(TypeError):
                bind(raw, {"x": 1})  # a classmethod object is not callable
            self.assertEqual(bind(Plugin.detect, {"x": 1}), {"got": {"x": 1}})

        def keywords(x, y=0):
            return ("keywords", x, y)

        def one(args):
            return ("dict", args)

        for _ in range(2):
            self.assertEqual(bind(keywords, {"x": 1}), ("keywords", 1, 0))
            self.assertEqual(bind(one, {"x": 1}), ("dict", {"x": 1}))
            # Other names, other shape: `keywords` takes the dict as `x`.
            self.assertEqual(bind(keywords, {"z": 1}), ("keywords", {"z": 1}, 0))
            # A lone `args` takes the dict whole, even when an argument is
            # named `args` (and with others beside it).
            self.assertEqual(bind(one, {"args": {"y": 1}}), ("dict", {"args": {"y": 1}}))
            self.assertEqual(bind(one, {"args": 1, "x": 2}), ("dict", {"args": 1, "x": 2}))
            self.assertEqual(bind(Plugin.detect, {"args": 5}), {"got": {"args": 5}})

    def test_a_handler_whose_own_body_raises_type_error_runs_once(self):
        calls = []

        def detect(image):
            calls.append(image)
            raise TypeError("the tool's own bug")

        def star(**kwargs):
            calls.append(kwargs)
            raise TypeError("the tool's own bug")

        def whole(args):
            calls.append(args)
            raise TypeError("the tool's own bug")

        for fn in (detect, star, whole):
            del calls[:]
            with self.assertRaises(TypeError):
                serve.bind_and_call(fn, {"image": 1})
            self.assertEqual(len(calls), 1, (fn.__name__, calls))

    def test_a_missing_argument_is_named_not_filled_with_the_dict(self):
        def detect(image, threshold=0.5):
            return (image, threshold)

        for _ in range(2):  # the shape is remembered
            with self.assertRaises(TypeError) as raised:
                serve.bind_and_call(detect, {"threshold": 0.7})
            self.assertIn("image", str(raised.exception))
        self.assertEqual(serve.bind_and_call(detect, {"image": 1, "threshold": 0.7}), (1, 0.7))

    def test_huge_error_messages_and_traceback_lines_are_cut(self):
        try:
            raise ValueError("x" * (3 * errors.MAX_ERROR_CHARS))
        except ValueError as e:
            error = errors.python_error(e)
        self.assertLess(len(error["message"]), errors.MAX_ERROR_CHARS + 100)
        self.assertTrue(error["message"].endswith("(%d characters cut)" % (2 * errors.MAX_ERROR_CHARS)))
        for line in error["traceback"]:
            self.assertLess(len(line), errors.MAX_ERROR_CHARS + 100)
        short = errors.python_error(ValueError("short"))
        self.assertEqual(short["message"], "short")
        # A class name is a name: cut much shorter.
        named = type("E" * 100000, (Exception,), {})
        long_type = errors.python_error(named("m"))["error_type"]
        self.assertTrue(long_type.startswith("E" * errors.MAX_TYPE_CHARS), long_type[:10])
        self.assertTrue(long_type.endswith("(%d characters cut)" % (100000 - errors.MAX_TYPE_CHARS)))

    def test_a_plugin_that_replaces_json_functions_changes_nothing_of_the_runners(self):
        # As a plugin may do at its import (a faster library's functions in
        # their place): the runner took its own before any plugin code ran.
        loads, dumps, decoder = json.loads, json.dumps, json.JSONDecoder
        json.loads = lambda *a, **k: {}
        json.dumps = lambda *a, **k: b"not text"
        json.JSONDecoder = lambda *a, **k: None
        try:
            request = wire.parse_request(b'{"op":"call","id":3,"tool":"x","args":{"k":1}}')
            value, _ = results.to_wire({1: "a"})
        finally:
            json.loads, json.dumps, json.JSONDecoder = loads, dumps, decoder
        self.assertEqual((request["op"], request["args"]), ("call", {"k": 1}))
        self.assertEqual(value, {"1": "a"})

    def test_a_huge_error_message_is_cut_before_it_is_copied(self):
        import tracemalloc

        class Huge(Exception):
            pass

        message = "\u00e9" * (16 * 1024 * 1024)
        try:
            raise Huge(message)
        except Huge as e:
            exc = e
        tracemalloc.start()
        try:
            error = errors.python_error(exc)
            told = errors.wire_error("Failed", message, path=message)
            line = errors.exception_line(exc)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Copies of the message (its encoding, a formatted line) would be
        # 16 MiB or more each.
        self.assertLess(peak, 2 * 1024 * 1024, "a copy of the whole message was made")
        cut = "(%d characters cut)" % (len(message) - errors.MAX_ERROR_CHARS)
        self.assertTrue(error["message"].endswith(cut), error["message"][-60:])
        self.assertTrue(told["message"].endswith(cut))
        self.assertTrue(told["path"].endswith(cut))
        self.assertTrue(line.startswith("Huge: \u00e9"), line[:20])
        # The traceback's last line names the class as the standard
        # library does (module and qualified name), the message cut.
        self.assertRegex(error["traceback"][-1], r"^test_runner\.\S*<locals>\.Huge: \u00e9+… \(%d characters cut\)$"
                         % (len(message) - errors.MAX_ERROR_CHARS))
        self.assertEqual(error["traceback"][0], "Traceback (most recent call last):")
        # A message of many lines: its last lines, as the standard library
        # would end the traceback, cut each; the class is not among them.
        many = "\n".join(["a" * 10] + ["b" * (errors.MAX_ERROR_CHARS + 5)] * 12) + "\n\n"
        lines = errors.python_error(ValueError(many))["traceback"]
        self.assertEqual(len(lines), errors.TRACEBACK_LINES)
        self.assertEqual(lines, ["b" * errors.MAX_ERROR_CHARS + "… (5 characters cut)"] * 10)
        few = "a" * errors.MAX_ERROR_CHARS + "\nlast"
        self.assertEqual(errors.python_error(ValueError(few))["traceback"],
                         ["ValueError: " + "a" * errors.MAX_ERROR_CHARS, "last"])
        crlf = "a" * errors.MAX_ERROR_CHARS + "\r\nlast\r\n"
        self.assertEqual(errors.python_error(ValueError(crlf))["traceback"],
                         ["ValueError: " + "a" * errors.MAX_ERROR_CHARS, "last"])

    def test_a_checked_plugins_loader_checks_its_sources_not_its_data_files(self):
        import hashlib
        import tempfile

        with tempfile.TemporaryDirectory() as root:
            source = os.path.join(root, "plugin.py")
            data = os.path.join(root, "model.json")
            with open(source, "wb") as f:
                f.write(b"X = 1\n")
            with open(data, "wb") as f:
                f.write(b"{}")
            checked = loading._Checked(root, {"plugin.py": hashlib.sha256(b"X = 1\n").hexdigest()})
            loader = loading._SourceOnlyLoader("plugin_x", source, checked)
            self.assertEqual(loader.get_data(source), b"X = 1\n")
            # pkgutil.get_data(__name__, "model.json") reads through it.
            self.assertEqual(loader.get_data(data), b"{}")
            with open(source, "wb") as f:
                f.write(b"X = 2\n")
            with self.assertRaises(ImportError):
                loader.get_data(source)

    def test_an_error_whose_traceback_cannot_be_formatted_is_still_told(self):
        # The standard library's formatting raises TypeError for a
        # SyntaxError whose offset is a string: the runner's thread died of
        # it, and with it the call (or the whole runner).
        try:
            raise SyntaxError("bad", ("f.py", 1, "x", "yy"))
        except SyntaxError as e:
            error = errors.python_error(e)
        self.assertEqual(error["error_type"], "SyntaxError")
        self.assertEqual(error["traceback"], ["SyntaxError: bad (f.py, line 1)"])

    def runner_with(self, instance=None, tools=None):
        """A Runner over no wire, with exit_now, diag and out_of_memory of
        `serve` replaced (restored at the test's end): each raises
        ``Exited(what)``, what a diagnostic says goes to ``self.said``."""

        class Exited(Exception):
            pass

        self.Exited = Exited
        self.said = []

        def exit_now(code):
            raise Exited(code)

        def out_of_memory(error, where, *args):
            raise Exited(where % args)

        saved = serve.exit_now, serve.diag, serve.out_of_memory
        serve.exit_now, serve.diag, serve.out_of_memory = exit_now, self.said.append, out_of_memory
        self.addCleanup(lambda: setattr(serve, "exit_now", saved[0]))
        self.addCleanup(lambda: setattr(serve, "diag", saved[1]))
        self.addCleanup(lambda: setattr(serve, "out_of_memory", saved[2]))
        runner = serve.Runner(None, None, None)
        runner.instance = instance
        runner.tools = tools or {}
        runner.hooks = (serve.hooks_of(instance, serve.takes_up_the_contract(instance))
                        if instance is not None else ())
        return runner

    def test_an_async_on_unload_is_awaited_and_runs_without_a_thread_too(self):
        ran = []

        class Plugin(object):
            async def on_unload(self):
                ran.append("unloaded")

            def run_tool(self, name, args):
                return {}

        for thread_fails in (False, True):
            del ran[:]
            runner = self.runner_with(Plugin())
            saved = serve.threading.Thread
            if thread_fails:
                class NoThread(saved):
                    def start(self):
                        raise RuntimeError("can't start new thread")

                serve.threading.Thread = NoThread
            try:
                with self.assertRaises(self.Exited) as ended:
                    runner.shutdown()
            finally:
                serve.threading.Thread = saved
            self.assertEqual(ended.exception.args[0], 0)
            self.assertEqual(ran, ["unloaded"], thread_fails)

    def test_running_out_of_memory_taking_arguments_ends_as_out_of_memory(self):
        runner = self.runner_with(object(), {"t": {"binary": [], "zero_copy": False}})
        saved = serve.place

        def place(args, pointer, data):
            raise MemoryError()

        serve.place = place
        try:
            with self.assertRaises(self.Exited) as ended:
                runner.call(1, "t", {"data": None}, ["/data"], [b"x"])
        finally:
            serve.place = saved
        self.assertEqual(ended.exception.args[0], "taking the arguments of tool 't'")

    def test_a_relative_file_without_a_plugin_dir_is_found_once(self):
        from runner.args import parse_args

        args = parse_args(["--file", os.path.join("sub", "plugin.py")])
        self.assertEqual(args.file, os.path.abspath(os.path.join("sub", "plugin.py")))
        self.assertEqual(args.plugin_dir, os.path.abspath("sub"))
        args = parse_args(["--file", "plugin.py", "--plugin-dir", "/plugins/p"])
        self.assertEqual((args.file, args.plugin_dir), ("/plugins/p/plugin.py", "/plugins/p"))

    def test_the_log_level_is_the_hosts_choice_among_the_standard_ones(self):
        import logging

        from runner import api
        from runner.args import UsageError, parse_args

        self.assertEqual(parse_args(["--file", "/p/plugin.py"]).log_level, "info")
        self.assertEqual(parse_args(["--file", "/p/plugin.py", "--log-level", "debug"]).log_level, "debug")
        for bad in ("DEBUG", "trace", ""):
            with self.assertRaises(UsageError):
                parse_args(["--file", "/p/plugin.py", "--log-level", bad])
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        try:
            api.setup_logging("debug")
            self.assertEqual(root.level, logging.DEBUG)
            api.setup_logging()
            self.assertEqual(root.level, logging.INFO)
        finally:
            root.handlers[:] = saved[1]
            root.setLevel(saved[0])

    def test_checked_sources_come_in_a_memory_file_of_json_digests(self):
        from runner.args import UsageError, parse_args

        def memory_file(data):
            fd = os.memfd_create("sources")
            os.write(fd, data)  # its offset is at the end, as the host leaves it
            return str(fd)

        args = parse_args(["--file", "/p/plugin.py", "--sources-fd",
                           memory_file(b'{"plugin.py": "ab"}')])
        self.assertEqual(args.sources, {"plugin.py": "ab"})
        self.assertIsNone(parse_args(["--file", "/p/plugin.py"]).sources)
        for bad in (b"[1]", b'{"plugin.py": 1}', b"{"):
            with self.assertRaises(UsageError):
                parse_args(["--file", "/p/plugin.py", "--sources-fd", memory_file(bad)])
        with self.assertRaises(UsageError):
            parse_args(["--file", "/p/plugin.py", "--sources-fd", "x"])

    def test_a_checked_module_must_be_the_checked_bytes(self):
        import hashlib

        from runner.loading import _Checked

        checked = _Checked("/p", {"pkg/m.py": hashlib.sha256(b"x = 1\n").hexdigest()})
        checked.check("/p/pkg/m.py", b"x = 1\n")
        with self.assertRaisesRegex(ImportError, "pkg/m.py changed since"):
            checked.check("/p/pkg/m.py", b"x = 2\n")
        with self.assertRaisesRegex(ImportError, "other.py is not among.*appeared after"):
            checked.check("/p/other.py", b"")
        # What is never listed: said so, not "appeared after".
        for rel in (".vendor/v.py", "pkg/.hidden.py", "__pycache__/m.py", "tool", "m.pyc",
                    "lib.so.x"):
            with self.assertRaisesRegex(ImportError, r"covers only \*\.py files"):
                checked.check("/p/" + rel, b"")
        for rel in ("a.py", "pkg/b.so", "c.so.1.2"):
            with self.assertRaisesRegex(ImportError, "appeared after"):
                checked.check("/p/" + rel, b"")

    def test_a_checked_tree_is_checked_by_any_name_and_runs_no_zip(self):
        import hashlib
        import tempfile
        import zipfile

        from runner.loading import _Checked, _SourceOnlyFinder, _SourceOnlyLoader

        with tempfile.TemporaryDirectory() as tmp:
            real = os.path.join(tmp, "real", "plugin")
            os.makedirs(real)
            os.symlink(os.path.join(tmp, "real"), os.path.join(tmp, "link"))
            root = os.path.join(tmp, "link", "plugin")
            with open(os.path.join(real, "helper_x.py"), "w") as f:
                f.write("WHO = 'swapped'\n")
            with zipfile.ZipFile(os.path.join(real, "vendor.zip"), "w") as z:
                z.writestr("zipped_x.py", "WHO = 'zip'\n")
            checked = _Checked(root, {"helper_x.py": hashlib.sha256(b"WHO = 'checked'\n").hexdigest()})
            finder = _SourceOnlyFinder(root, checked)
            # Found under the resolved name of the plugin's directory: still
            # checked, and refused (its bytes changed).
            spec = finder.find_spec("helper_x", [real])
            self.assertIsInstance(spec.loader, _SourceOnlyLoader)
            with self.assertRaisesRegex(ImportError, "helper_x.py changed since"):
                spec.loader.get_data(spec.origin)
            # A zip archive of the tree: no checked bytes, not imported.
            with self.assertRaisesRegex(ImportError, "does not cover"):
                finder.find_spec("zipped_x", [os.path.join(root, "vendor.zip")])

    def test_an_installed_single_file_module_refuses_bytecode_of_its_file_alone(self):
        # Its directory is site-packages: every other package there keeps
        # its bytecode (each import of a dependency was compiled from source).
        from runner.loading import _single_module_file, _SourceOnlyFinder, _SourceOnlyLoader

        with tempfile.TemporaryDirectory() as site:
            for name in ("solo_x.py", "dep_x.py"):
                with open(os.path.join(site, name), "w") as f:
                    f.write("WHO = %r\n" % name)
            os.makedirs(os.path.join(site, "pkg_x"))
            open(os.path.join(site, "pkg_x", "__init__.py"), "w").close()
            only = _single_module_file(site, "solo_x")
            self.assertEqual(only, os.path.join(site, "solo_x.py"))
            for module in ("pkg_x", "pkg_x.mod", "missing_x", None):
                self.assertIsNone(_single_module_file(site, module), module)
            finder = _SourceOnlyFinder(site, None, None, only)
            self.assertTrue(finder.covers(os.path.join(site, "solo_x.py")))
            self.assertFalse(finder.covers(os.path.join(site, "dep_x.py")))
            self.assertFalse(finder.covers(os.path.join(site, "pkg_x", "__init__.py")))
            self.assertIsInstance(finder.find_spec("solo_x", [site]).loader, _SourceOnlyLoader)
            self.assertNotIsInstance(finder.find_spec("dep_x", [site]).loader, _SourceOnlyLoader)

    def test_a_checked_file_loaded_by_path_must_be_the_checked_bytes(self):
        # In a process of its own: the guard changes importlib's classes
        # for good, once.
        code = (
            "import hashlib, importlib.util, os, sys\n"
            "sys.path.insert(0, %r)\n"
            "from runner.loading import _Checked, _SourceOnlyFinder, _guard_loaders\n"
            "root = sys.argv[1]\n"
            "ok = hashlib.sha256(b'WHO = 1\\n').hexdigest()\n"
            "finder = _SourceOnlyFinder(root, _Checked(root, {'same.py': ok, 'changed.py': ok}))\n"
            "_guard_loaders(finder)\n"
            "for name in ('same', 'changed', 'added', 'outside'):\n"
            "    where = sys.argv[2] if name == 'outside' else root\n"
            "    spec = importlib.util.spec_from_file_location(name, os.path.join(where, name + '.py'))\n"
            "    module = importlib.util.module_from_spec(spec)\n"
            "    try:\n"
            "        spec.loader.exec_module(module)\n"
            "        print(name, 'ran', module.WHO)\n"
            "    except ImportError as e:\n"
            "        print(name, 'refused', e)\n"
            "import py_compile\n"
            "py_compile.compile(os.path.join(root, 'same.py'), doraise=True)\n"
            "print('compiled')\n" % HERE)
        with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as other:
            for where, name, text in ((root, "same", "WHO = 1\n"), (root, "changed", "WHO = 2\n"),
                                      (root, "added", "WHO = 3\n"), (other, "outside", "WHO = 4\n")):
                with open(os.path.join(where, name + ".py"), "w") as f:
                    f.write(text)
            out = subprocess.run([PYTHON, "-c", code, root, other], capture_output=True,
                                 text=True, timeout=60)
            lines = out.stdout.splitlines()
            self.assertEqual(len(lines), 5, out)
            # The plugin may still compile its own files.
            self.assertEqual(lines[4], "compiled")
            self.assertEqual(lines[0], "same ran 1")
            self.assertTrue(lines[1].startswith("changed refused changed.py changed since"), lines)
            self.assertTrue(lines[2].startswith("added refused added.py is not among"), lines)
            self.assertEqual(lines[3], "outside ran 4")

    def test_a_checked_extension_module_is_hashed_before_it_loads(self):
        # Found by name (the finder) or loaded by path: its file is hashed
        # before the dynamic loader opens it. The files are no libraries:
        # one with its checked bytes fails in the dynamic loader, a changed
        # one in the check, before.
        code = (
            "import hashlib, importlib, importlib.util, os, sys\n"
            "sys.path.insert(0, %r)\n"
            "from runner.loading import _Checked, _source_only_under\n"
            "root = sys.argv[1]\n"
            "ok = hashlib.sha256(b'no library').hexdigest()\n"
            "_source_only_under(root, _Checked(root, {'ext_same.so': ok, 'ext_changed.so': ok}))\n"
            "sys.path.insert(0, root)\n"
            "for name in ('ext_same', 'ext_changed'):\n"
            "    for how in ('name', 'path'):\n"
            "        try:\n"
            "            if how == 'name':\n"
            "                importlib.import_module(name)\n"
            "            else:\n"
            "                spec = importlib.util.spec_from_file_location(\n"
            "                    name + '_', os.path.join(root, name + '.so'))\n"
            "                importlib.util.module_from_spec(spec)\n"
            "            print(name, how, 'loaded')\n"
            "        except ImportError as e:\n"
            "            print(name, how, 'refused', e)\n" % HERE)
        with tempfile.TemporaryDirectory() as root:
            for name, data in (("ext_same", b"no library"), ("ext_changed", b"changed")):
                with open(os.path.join(root, name + ".so"), "wb") as f:
                    f.write(data)
            out = subprocess.run([PYTHON, "-c", code, root], capture_output=True,
                                 text=True, timeout=60)
            lines = out.stdout.splitlines()
            self.assertEqual(len(lines), 4, out)
            for line in lines[:2]:
                self.assertTrue(line.startswith("ext_same "), lines)
                self.assertIn(" refused ", line)
                self.assertNotIn("changed since", line)
            for line in lines[2:]:
                self.assertIn("refused ext_changed.so changed since", line)

    def test_a_library_that_cannot_be_mapped_under_the_limit_names_the_limit(self):
        import resource

        from runner import errors

        message = "libopenblas.so: failed to map segment from shared object"
        saved = resource.getrlimit
        try:
            resource.getrlimit = lambda which: (256 << 20, resource.RLIM_INFINITY)
            said = errors.python_error(ImportError(message))["message"]
            self.assertTrue(said.startswith(message + " (a shared library could not be mapped within "
                                            "the runner's address-space limit of 256 MiB: raise the "
                                            "manifest's limits.memory_mb"), said)
            self.assertEqual(errors.python_error(ImportError("No module named x"))["message"],
                             "No module named x")
            cv = "OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 192000000 bytes"
            said = errors.python_error(RuntimeError(cv))["message"]
            self.assertTrue(said.startswith(cv + " (an allocation failed within the runner's "
                                            "address-space limit of 256 MiB"), said)
            resource.getrlimit = lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            self.assertEqual(errors.python_error(ImportError(message))["message"], message)
        finally:
            resource.getrlimit = saved

    def test_the_directories_editable_installs_map_packages_to_are_readable(self):
        import types

        from runner import confine

        finder = types.ModuleType("__editable___mylib_0_1_0_finder")
        finder.MAPPING = {"mylib": "/srv/projects/mylib/mylib", "bad": 3}
        finder.NAMESPACES = {"ns": ["/srv/projects/ns/ns"]}
        other = types.ModuleType("not_an_editable_finder")
        other.MAPPING = {"x": "/srv/elsewhere"}
        saved = dict(sys.modules)
        sys.modules[finder.__name__] = finder
        sys.modules[other.__name__] = other
        try:
            paths = confine._runtime_paths()
        finally:
            sys.modules.clear()
            sys.modules.update(saved)
        self.assertIn("/srv/projects/mylib/mylib", paths)
        self.assertIn("/srv/projects/ns/ns", paths)
        self.assertNotIn("/srv/elsewhere", paths)
        self.assertNotIn("/srv/projects/mylib/mylib", confine._runtime_paths())

    def test_no_landlock_names_the_error_of_its_probe_not_a_later_one(self):
        import errno as errno_codes

        from runner import confine

        # What the probe kept (minus ENOSYS), whatever failed since.
        said = confine._landlock(None, None, -errno_codes.ENOSYS, {}, False, {})
        self.assertEqual(said, "unconfined: this kernel has no Landlock (%s)"
                         % os.strerror(errno_codes.ENOSYS))

    def test_a_plan_path_left_out_for_another_reason_than_absence_is_reported(self):
        import ctypes
        import errno as errno_codes
        import tempfile

        from runner import confine

        self.assertEqual(confine._unreachable("/srv/m", errno_codes.EPERM),
                         "/srv/m: %s (os error %d)" % (os.strerror(errno_codes.EPERM),
                                                        errno_codes.EPERM))
        libc = ctypes.CDLL(None, use_errno=True)
        syscall, abi = confine._landlock_abi(libc)
        if abi < 1:
            reason = "no Landlock on this kernel: the rules are not built"
            if os.environ.get("CI"):
                self.fail(reason)
            self.skipTest(reason)
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        real = os.path.join(root, "real")
        os.mkdir(real)
        link = os.path.join(root, "link")
        os.symlink(real, link)
        plan = {"read": [real, link, os.path.join(root, "missing"), os.path.join(real, "x", "y")]}
        def confined():
            report = {}
            return [confine._landlock(libc, syscall, abi, plan, True, report), report]

        said, report = in_a_forked_child(self, confined)
        self.assertTrue(said.startswith("confined: Landlock"), said)
        # The link is named; what is not there is not.
        self.assertEqual(report.get("unreachable"),
                         "%s: a link now, which is not followed" % link, report)

    def test_an_array_index_too_long_for_int_names_no_element(self):
        for pointer in ("/a/" + "1" * 5000, "/a/" + "1" * 5000 + "/x", "/a/" + "9" * 19):
            with self.assertRaises(results.PointerError, msg=pointer[:10]):
                results.place({"a": []}, pointer, b"")

    def lead_with_a_wire_that_raises(self, exc, closed=False):
        """Runs Runner.lead() over a wire whose read_frame raises ``exc``
        (returns None, the end of the stream, when ``exc`` is None), and
        whose descriptors plugin code closed, if ``closed``; returns (exit
        code, diagnostics)."""

        class Exited(Exception):
            pass

        class Wire(wire.Wire):
            def __init__(self):
                pass

            def read_frame(self):
                if exc is None:
                    return None
                raise exc

            def channel_closed(self):
                return closed

        diagnostics = []

        def fake_exit(code):
            raise Exited(code)

        saved = serve.exit_now, serve.diag
        serve.exit_now, serve.diag = fake_exit, diagnostics.append
        try:
            with self.assertRaises(Exited) as ended:
                serve.Runner(None, Wire(), None).lead()
        finally:
            serve.exit_now, serve.diag = saved
        return ended.exception.args[0], diagnostics

    def test_running_out_of_memory_reading_a_request_exits_70(self):
        code, diagnostics = self.lead_with_a_wire_that_raises(MemoryError())
        self.assertEqual(code, base.EXIT_MEMORY)
        self.assertEqual(len(diagnostics), 1, diagnostics)
        self.assertIn("MemoryError", diagnostics[0])

    def test_any_other_exception_reading_a_request_exits_65(self):
        for exc in (OSError(5, "Input/output error"), KeyError("x"), RuntimeError("bug")):
            code, diagnostics = self.lead_with_a_wire_that_raises(exc)
            self.assertEqual(code, base.EXIT_PROTOCOL, exc)
            self.assertEqual(len(diagnostics), 1, diagnostics)
            self.assertIn(type(exc).__name__, diagnostics[0])

    def test_a_read_that_fails_on_descriptors_plugin_code_closed_exits_74(self):
        for exc in (OSError(errno.EBADF, "Bad file descriptor"), wire.ProtocolError("garbage")):
            code, _ = self.lead_with_a_wire_that_raises(exc, closed=True)
            self.assertEqual(code, base.EXIT_CHANNEL, exc)

    def test_the_end_of_the_stream_is_the_hosts_unless_plugin_code_closed_it(self):
        code, _ = self.lead_with_a_wire_that_raises(None, closed=True)
        self.assertEqual(code, base.EXIT_CHANNEL)
        code, _ = self.lead_with_a_wire_that_raises(None, closed=False)
        self.assertEqual(code, 0)

    def test_a_wire_knows_when_its_descriptors_were_closed_or_replaced(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        probe = wire.Wire(r, w)
        self.assertFalse(probe.channel_closed())
        self.assertEqual(probe.exit_code(0), 0)
        # Another file under the same number: replaced, not the protocol.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, w)
        os.close(null)
        self.assertTrue(probe.channel_closed())
        self.assertEqual(probe.exit_code(0), base.EXIT_CHANNEL)
        # Closed.
        os.close(w)
        self.assertTrue(probe.channel_closed())
        # Not in a child the plugin forked (its descriptors are on
        # /dev/null on purpose).
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not probe.channel_closed() else 1)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.WEXITSTATUS(status), 0)

    def test_place_matches_the_rust_rules(self):
        place = results.place
        v = {"image": None, "list": [0, 1], "a/b": {}}
        v = place(v, "/image", "AAE=")
        v = place(v, "/list/1", "x")
        v = place(v, "/a~1b/c~0d", 1)
        self.assertEqual(v, {"image": "AAE=", "list": [0, "x"], "a/b": {"c~d": 1}})
        self.assertEqual(place(v, "", "all"), "all")
        for pointer in ["image", "/missing/x", "/list/5", "/list/x", "/n/x", "/list/00", "/list/+0", "/list/-"]:
            with self.assertRaises(results.PointerError, msg=pointer):
                place({"list": [0], "n": 1}, pointer, None)

    def _logged(self, code):
        """The stderr lines of ``code`` run in a fresh interpreter (the
        runner's logging set up there); it prints nothing on stdout."""
        proc = subprocess.run([PYTHON, "-c", code], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT)
        self.assertEqual(proc.stdout, b"")
        return proc.stderr.decode().splitlines()

    def test_log_records_are_one_stderr_line(self):
        code = (
            "import logging\n"
            "from runner import api\n"
            "api.setup_logging()\n"
            "logging.getLogger('ocr.engine').info('loaded %s', 'eng')\n"
            "logging.getLogger('x').debug('hidden')\n"
            "try:\n"
            "    1 / 0\n"
            "except ZeroDivisionError:\n"
            "    logging.getLogger('x').exception('two\\nlines')\n"
        )
        lines = self._logged(code)
        self.assertEqual(lines[0], "INFO ocr.engine: loaded eng")
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[1].startswith("ERROR x: two | lines | Traceback"), lines[1])
        self.assertTrue(lines[1].endswith("ZeroDivisionError: division by zero"), lines[1])

    # The size of the message `_huge_under_a_limit` makes.
    HUGE = 64 * 1024 * 1024

    @classmethod
    def _huge_under_a_limit(cls, char):
        """Code that sets up the runner's logging, makes ``m``, ``HUGE``
        characters ``char``, then limits the address space to room for one
        more of its size: not for the copies that formatting, splitting and
        encoding it whole made."""
        return (
            "import logging, resource\n"
            "from runner import api\n"
            "api.setup_logging()\n"
            "m = %r * %d\n"
            "vm = [l for l in open('/proc/self/status') if l.startswith('VmSize')][0]\n"
            "room = int(vm.split()[1]) * 1024 + 2 * len(m)\n"
            "resource.setrlimit(resource.RLIMIT_AS, (room, room))\n" % (char, cls.HUGE))

    def test_a_huge_record_is_cut_not_lost_under_a_memory_limit(self):
        code = self._huge_under_a_limit("y") + (
            "logging.getLogger('p').warning(m)\n"
            "logging.getLogger('p').warning('after %s', 'it')\n"
        )
        lines = self._logged(code)
        self.assertEqual(len(lines), 2, [l[:80] for l in lines])
        self.assertEqual(lines[0], "WARNING p: " + "y" * api.MAX_LOG_CHARS
                         + "… (%d characters cut)" % (self.HUGE - api.MAX_LOG_CHARS))
        self.assertEqual(lines[1], "WARNING p: after it")

    def test_a_logged_exception_with_a_huge_message_is_cut_not_lost(self):
        code = self._huge_under_a_limit("z") + (
            "try:\n"
            "    raise ValueError(m)\n"
            "except ValueError:\n"
            "    logging.getLogger('p').exception('failed')\n"
            "logging.getLogger('p').warning('after')\n"
        )
        lines = self._logged(code)
        self.assertEqual(len(lines), 2, [l[:80] for l in lines])
        self.assertTrue(lines[0].startswith("ERROR p: failed | Traceback (most recent call last): | "),
                        lines[0][:120])
        self.assertTrue(lines[0].endswith("ValueError: " + "z" * errors.MAX_ERROR_CHARS
                                          + "… (%d characters cut)" % (self.HUGE - errors.MAX_ERROR_CHARS)),
                        lines[0][-80:])
        self.assertEqual(lines[1], "WARNING p: after")

    def test_a_custom_level_is_written_as_the_standard_level_below_it(self):
        code = (
            "import logging\n"
            "from runner import api\n"
            "api.setup_logging()\n"
            "logging.addLevelName(25, 'NOTICE')\n"
            "log = logging.getLogger('p')\n"
            "log.log(25, 'noted')\n"
            "log.log(35, 'odd')\n"
            "log.log(45, 'worse')\n"
            "log.log(60, 'worst')\n"
        )
        self.assertEqual(self._logged(code), [
            "INFO p: noted", "WARNING p: odd", "ERROR p: worse", "CRITICAL p: worst"])

    def test_a_record_that_cannot_be_formatted_is_one_line_at_its_level_with_the_calls_tags(self):
        code = (
            "import logging\n"
            "from runner import api\n"
            "api.setup_logging()\n"
            "api.CALL.set(api.CallContext('req-1', None))\n"
            "log = logging.getLogger('p')\n"
            "log.warning('bad %d', 's')\n"
            "class Loud:\n"
            "    def __str__(self): raise ValueError('no')\n"
            "    def __repr__(self): raise ValueError('no')\n"
            "log.error(Loud())\n"
            "log.info('odd extra', extra={'request_id': 5})\n"
        )
        lines = self._logged(code)
        tag = '@call {"request_id":"req-1"} '
        # The interpreter's own words for the bad format (Python 3.10
        # says "a real number", older ones "a number").
        why = subprocess.run(
            [PYTHON, "-c", "try:\n    'bad %d' % ('s',)\nexcept TypeError as e:\n    print(e)"],
            stdout=subprocess.PIPE, check=True, timeout=TIMEOUT).stdout.decode().strip()
        self.assertIn("%d format", why)
        self.assertEqual(len(lines), 3, lines)
        self.assertEqual(lines[0], tag + "WARNING p: <message 'bad %d' with arguments ('s',) cannot "
                         "be formatted: TypeError: " + why + ">")
        self.assertEqual(lines[1], tag + "ERROR p: <message <unprintable Loud> with arguments () "
                         "cannot be formatted: ValueError: no>")
        self.assertEqual(lines[2], tag + "INFO p: odd extra")

    def test_split_body(self):
        body = frame({"a": 1}, [b"xy", b""])[4:]
        header, attachments = wire.split_body(bytearray(body))
        self.assertEqual(header, b'{"a": 1}')
        self.assertEqual(attachments, [b"xy", b""])
        # The protocol document's example.
        example = frame(b'{"op":"call","id":2,"tool":"ocr","args":{"image":null},"attachments":["/image"]}',
                        [b"\x89PNG"])
        self.assertEqual(example[:16], bytes.fromhex("60000000500000000100000004000000"))

    def test_a_frame_of_more_than_max_attachments_is_malformed(self):
        # PROTOCOL.md §2: at most 65,536 attachments (``MAX_ATTACHMENTS``);
        # a frame of more empty ones is malformed, as the Rust reader says.
        most = frame(b"{}", [b""] * wire.MAX_ATTACHMENTS)[4:]
        self.assertEqual(len(wire.split_body(most)[1]), wire.MAX_ATTACHMENTS)
        with self.assertRaises(wire.ProtocolError) as refused:
            wire.split_body(frame(b"{}", [b""] * (wire.MAX_ATTACHMENTS + 1))[4:])
        self.assertIn("at most 65536", str(refused.exception))
        # A table that does not fit is said as before, whatever its count.
        with self.assertRaises(wire.ProtocolError) as refused:
            wire.split_body(struct.pack("<II", 0, wire.MAX_ATTACHMENTS + 1))
        self.assertIn("in a frame body of 8 bytes", str(refused.exception))

    def test_normalize_schema(self):
        n = tools.normalize_schema
        self.assertEqual(n(None), {"type": "object"})
        self.assertEqual(n({"type": "object", "properties": {}}), {"type": "object", "properties": {}})
        self.assertEqual(n({"frame_base64": {"type": "string"}}),
                         {"type": "object", "properties": {"frame_base64": {"type": "string"}}})
        self.assertEqual(n({"image_base64": "string"}),
                         {"type": "object", "properties": {"image_base64": {"type": "string"}}})
        self.assertEqual(n(["image"]), {"type": "object", "properties": {"image": {}}})
        self.assertEqual(n([]), {"type": "object"})
        self.assertEqual(n({"description": "x"}), {"description": "x"})
        # A property map may name a property after a schema keyword.
        self.assertEqual(n({"image_base64": "string", "format": "string"}),
                         {"type": "object", "properties": {"image_base64": {"type": "string"},
                                                           "format": {"type": "string"}}})
        schema = {"properties": {"a": {}}, "required": ["a"]}
        self.assertEqual(n(schema), schema)
        # ForgeSyte's "bytes" in a property map is a binary property, and
        # binary_properties finds it.
        moderation = n({"image_bytes": {"type": "bytes"},
                        "options": {"type": "object", "optional": True}, "raw": "bytes"})
        self.assertEqual(moderation, {"type": "object", "properties": {
            "image_bytes": {"type": "string", "format": "binary"},
            "options": {"type": "object", "optional": True},
            "raw": {"type": "string", "format": "binary"}}})
        self.assertEqual(tools.binary_properties(moderation), ["image_bytes", "raw"])

    def test_normalize_schema_makes_bytes_binary_in_a_full_schema_s_own_properties(self):
        n = tools.normalize_schema
        schema = {"type": "object", "required": ["img"], "properties": {
            "img": {"type": "bytes", "description": "the image"},
            "mask": {"type": ["bytes", "null"]},
            "nested": {"type": "object", "properties": {"raw": {"type": "bytes"}}},
            "name": {"type": "string"}}}
        original = json.loads(json.dumps(schema))
        normalized = n(schema)
        self.assertEqual(normalized, {"type": "object", "required": ["img"], "properties": {
            "img": {"type": "string", "format": "binary", "description": "the image"},
            # Only "bytes" exactly, and only the top-level properties.
            "mask": {"type": ["bytes", "null"]},
            "nested": {"type": "object", "properties": {"raw": {"type": "bytes"}}},
            "name": {"type": "string"}}})
        self.assertEqual(tools.binary_properties(normalized), ["img"])
        # The plugin's own dict is not touched.
        self.assertEqual(schema, original)
        # Without "bytes" the schema is the plugin's, as it was.
        plain = {"type": "object", "properties": {"a": {"type": "string"}}}
        self.assertIs(n(plain), plain)
        # A schema of keywords only (no "type") is a full schema too.
        self.assertEqual(n({"properties": {"a": {"type": "bytes"}}}),
                         {"properties": {"a": {"type": "string", "format": "binary"}}})



# The machines the runner has a seccomp filter for (``confine._seccomp``);
# elsewhere the tests that install it are skipped.
MACHINE = os.uname().machine if hasattr(os, "uname") else platform.machine()
SECCOMP_HERE = sys.platform.startswith("linux") and MACHINE in ("x86_64", "aarch64", "arm64")
NO_SECCOMP_HERE = "no seccomp filter on this machine (%s, %s)" % (sys.platform, MACHINE)
if not SECCOMP_HERE:
    print("SeccompTests: the filter's own tests are skipped: " + NO_SECCOMP_HERE, file=sys.stderr)


def run_bpf(program, arch, nr, arg0, arg1=0, arg2=0):
    """What a classic BPF ``program`` (``(code, jt, jf, k)`` tuples) returns
    for a call, run as the kernel would (the few opcodes the filter uses)."""
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = {0: nr, 4: arch, 16: arg0, 24: arg1, 32: arg2}[k]
        elif code == 0x54:  # and k
            acc &= k
        elif code == 0x06:  # ret k
            return k
        elif code in (0x15, 0x35, 0x45):  # jeq k, jge k, jset k
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: acc & k != 0}[code]
            pc += jt if taken else jf
        else:
            raise AssertionError("opcode %#x" % code)


class SeccompTests(unittest.TestCase):
    """The seccomp filter of a confined runner (``confine._seccomp``): the
    program it installs, the same as the native runner's
    (``sandbox::seccomp``), and what a process it filters can no longer do.
    What the kernel enforces is tried in a forked child: a filter cannot be
    taken off again."""

    ALLOW, DENY = 0x7FFF0000, 0x00050000 | 13

    def test_the_program_is_the_native_runners_instruction_for_instruction(self):
        from runner.confine import _seccomp_program

        ld, jeq, jge, ret, and_, jset = 0x20, 0x15, 0x35, 0x06, 0x54, 0x45
        enosys = 0x00050000 | 38
        io_uring = (425, 426, 427)
        # System V IPC, message queues, truncate (76), setpgid and setsid
        # (109, 112), keyrings (248-250), unshare (272), io_uring,
        # pidfd_send_signal (424).
        ipc = (29, 30, 31, 64, 65, 66, 67, 68, 69, 70, 71, 76, 109, 112, 220, 240, 241, 242, 243,
               244, 245, 248, 249, 250, 272, 424) + io_uring

        def program(audit_arch, x32, calls, clone, sockets, signals, named, group=0, elders=()):
            """Every jump to the deny (the last instruction), to the ENOSYS
            return (the one before), to the check of process numbers (the
            ``4 + len(elders)`` before that) or to the check of the elders
            (the ``2 + len(elders)`` before that one) counted from the one
            after it."""
            kill, fcntl, ioctl, prlimit = signals
            tail = (2 + len(elders)) + (4 + len(elders)) + 2
            n = (3 + x32 + 6 + 5 + 3 + 7 + 5 + len(named) + len(calls) + (9 if sockets else 0) + 1
                 + tail)
            deny = lambda i: n - 1 - i - 1  # noqa: E731
            pids = n - 2 - (4 + len(elders))
            check = pids - (2 + len(elders))
            to = lambda target, i: target - i - 1  # noqa: E731
            p = [(ld, 0, 0, 4), (jeq, 0, deny(1), audit_arch), (ld, 0, 0, 0)]
            if x32:
                p.append((jge, deny(3), 0, 0x40000000))
            i = len(p)
            p += [(jeq, deny(i) - 1, 0, 435), (jeq, 0, 4, clone), (ld, 0, 0, 16),
                  (and_, 0, 0, 0x7E028000), (jeq, 0, deny(i + 4), 0), (ret, 0, 0, self.ALLOW)]
            # prlimit64(): its own process only (0, or its group's id).
            i = len(p)
            p += [(jeq, 0, 4, prlimit), (ld, 0, 0, 16), (jeq, 1, 0, 0),
                  (jeq, 0, deny(i + 3), group), (ret, 0, 0, self.ALLOW)]
            # kill(): its first argument to the check of process numbers;
            # fcntl(): F_SETOWN_EX (15) no, F_SETOWN (8) its third argument
            # to that check; ioctl(): FIOSETOWN, SIOCSPGRP no.
            i = len(p)
            p += [(jeq, 0, 2, kill), (ld, 0, 0, 16), (jeq, to(pids, i + 2), to(pids, i + 2), 0),
                  (jeq, 0, 6, fcntl), (ld, 0, 0, 24), (jeq, deny(i + 5), 0, 15), (jeq, 0, 2, 8),
                  (ld, 0, 0, 32), (jeq, to(pids, i + 8), to(pids, i + 8), 0),
                  (ret, 0, 0, self.ALLOW),
                  (jeq, 0, 4, ioctl), (ld, 0, 0, 24), (jeq, deny(i + 12), 0, 0x8901),
                  (jeq, deny(i + 13), 0, 0x8902), (ret, 0, 0, self.ALLOW)]
            p += [(jeq, to(check, len(p) + j), 0, nr) for j, nr in enumerate(named)]
            p += [(jeq, deny(len(p) + j), 0, nr) for j, nr in enumerate(calls)]
            if sockets:
                socketpair, socket = sockets
                # socketpair() of Unix sockets (the family, args[0]), of a
                # stream or sequenced packets (the type's flags masked off);
                # no socket() at all.
                i = len(p)
                p += [(jeq, 0, 7, socketpair), (ld, 0, 0, 16), (jeq, 0, deny(i + 2), 1),
                      (ld, 0, 0, 24), (and_, 0, 0, 0xF), (jeq, 1, 0, 1),
                      (jeq, 0, deny(i + 6), 5), (ret, 0, 0, self.ALLOW),
                      (jeq, deny(i + 8), 0, socket)]
            p.append((ret, 0, 0, self.ALLOW))
            # The check of the elders (args[0]).
            self.assertEqual(len(p), check)
            p.append((ld, 0, 0, 16))
            p += [(jeq, deny(len(p) + j), 0, pid) for j, pid in enumerate(elders)]
            p.append((ret, 0, 0, self.ALLOW))
            # The check of process numbers: -1, an elder, another group.
            self.assertEqual(len(p), pids)
            p.append((jeq, deny(len(p)), 0, 0xFFFFFFFF))
            p += [(jeq, deny(len(p) + j), 0, pid) for j, pid in enumerate(elders)]
            p += [(jeq, 1, 0, -group & 0xFFFFFFFF), (jset, deny(len(p) + 1), 0, 0x80000000),
                  (ret, 0, 0, self.ALLOW)]
            p += [(ret, 0, 0, enosys), (ret, 0, 0, self.DENY)]
            self.assertEqual(len(p), n)
            return p

        x86_64 = ((62, 72, 16, 302), (200, 234, 129, 297, 434, 142, 144, 203, 314))
        self.assertEqual(_seccomp_program("x86_64", False),
                         program(0xC000003E, True, ipc, 56, (53, 41), *x86_64))
        # With the network: no socket part.
        self.assertEqual(_seccomp_program("x86_64", True),
                         program(0xC000003E, True, ipc, 56, None, *x86_64))
        # With a group and elders (0: one not known, left out).
        self.assertEqual(_seccomp_program("x86_64", False, 4321, (1234, 0)),
                         program(0xC000003E, True, ipc, 56, (53, 41), *x86_64, group=4321,
                                 elders=(1234,)))
        self.assertEqual(_seccomp_program("x86_64", True, 4321, (1234, 99)),
                         program(0xC000003E, True, ipc, 56, None, *x86_64, group=4321,
                                 elders=(1234, 99)))
        # aarch64: no x32; its own numbers (truncate, unshare, setpgid,
        # setsid first).
        aarch64 = (45, 97, 154, 157) + tuple(range(180, 198)) + (217, 218, 219, 424) + io_uring
        signals = ((129, 25, 29, 261), (130, 131, 138, 240, 434, 118, 119, 122, 274))
        expected = program(0xC00000B7, False, aarch64, 220, (199, 198), *signals)
        self.assertEqual(_seccomp_program("aarch64", False), expected)
        self.assertEqual(_seccomp_program("arm64", False), expected)
        self.assertIsNone(_seccomp_program("riscv64", False))
        # Two places in step: the x86_64 program without the network and
        # no elders known, as the native runner builds it, is 86
        # instructions.
        self.assertEqual(len(_seccomp_program("x86_64", False)), 86)

    def test_the_program_refuses_exactly_what_it_says(self):
        from runner.confine import _seccomp_program

        machines = {
            # AUDIT_ARCH, IPC calls, socket, read, socketpair
            "x86_64": (0xC000003E, [29, 30, 31, 64, 65, 66, 67, 68, 69, 70, 71, 76, 109, 112, 220]
                       + list(range(240, 246)) + [248, 249, 250, 272, 424, 425, 426, 427], 41, 0,
                       53),
            "aarch64": (0xC00000B7, [45, 97, 154, 157] + list(range(180, 198))
                        + [217, 218, 219, 424, 425, 426, 427], 198, 63, 199),
        }
        signals = {"x86_64": ((62, 72, 16, 302), (200, 234, 129, 297, 434, 142, 144, 203, 314)),
                   "aarch64": ((129, 25, 29, 261), (130, 131, 138, 240, 434, 118, 119, 122, 274))}
        for machine, (arch, ipc, socket_nr, read_nr, socketpair_nr) in machines.items():
            for network in (False, True):
                p = _seccomp_program(machine, network, 4321, (1234, 99))
                where = (machine, network)
                # kill() of every process, an elder or another group: no;
                # of its own group, of its own (0) or another process: yes.
                (kill, fcntl, ioctl, prlimit), named = signals[machine]
                # prlimit64() of itself (0, or its group's id): yes; of any
                # other process, its elders': no.
                for target, allowed in ((0, True), (4321, True), (1234, False), (99, False),
                                        (5555, False)):
                    said = run_bpf(p, arch, prlimit, target)
                    self.assertEqual(said, self.ALLOW if allowed else self.DENY, (where, target))
                for target, allowed in ((-1, False), (1234, False), (99, False), (-4322, False),
                                        (-4321, True), (0, True), (4321, True), (5555, True)):
                    said = run_bpf(p, arch, kill, target & 0xFFFFFFFF)
                    self.assertEqual(said, self.ALLOW if allowed else self.DENY, (where, target))
                # A descriptor's owner: F_SETOWN (8) as kill(); F_SETOWN_EX
                # (15), FIOSETOWN, SIOCSPGRP: no; other commands: yes.
                for owner, allowed in ((1234, False), (-1, False), (-4322, False), (-4321, True),
                                       (5555, True), (0, True)):
                    said = run_bpf(p, arch, fcntl, 7, 8, owner & 0xFFFFFFFF)
                    self.assertEqual(said, self.ALLOW if allowed else self.DENY, (where, owner))
                self.assertEqual(run_bpf(p, arch, fcntl, 7, 15, 5555), self.DENY, where)
                self.assertEqual(run_bpf(p, arch, fcntl, 7, 3, 1234), self.ALLOW, where)
                for request, allowed in ((0x8901, False), (0x8902, False), (0x5401, True)):
                    said = run_bpf(p, arch, ioctl, 7, request)
                    self.assertEqual(said, self.ALLOW if allowed else self.DENY, (where, request))
                # The calls that name one process or a thread of it: not an
                # elder.
                for nr in named:
                    for target, allowed in ((1234, False), (99, False), (5555, True)):
                        said = run_bpf(p, arch, nr, target)
                        self.assertEqual(said, self.ALLOW if allowed else self.DENY,
                                         (where, nr, target))
                for nr in ipc:
                    self.assertEqual(run_bpf(p, arch, nr, 0), self.DENY, (where, nr))
                for nr in (read_nr, socketpair_nr, 0, 400):
                    self.assertEqual(run_bpf(p, arch, nr, 1, 1), self.ALLOW, (where, nr))
                # socketpair(AF_UNIX, type | SOCK_CLOEXEC): streams and
                # sequenced packets always, datagrams (raw is one) with the
                # network only.
                for kind, allowed in ((1, True), (5, True), (2, network), (3, network)):
                    said = run_bpf(p, arch, socketpair_nr, 1, kind | 0o2000000)
                    self.assertEqual(said, self.ALLOW if allowed else self.DENY, (where, kind))
                # Pairs of another family (AF_INET, AF_INET6, AF_TIPC,
                # AF_NETLINK): with the network only.
                for domain in (2, 10, 30, 16):
                    said = run_bpf(p, arch, socketpair_nr, domain, 1)
                    self.assertEqual(said, self.ALLOW if network else self.DENY, (where, domain))
                sockets = self.ALLOW if network else self.DENY
                self.assertEqual(run_bpf(p, arch, socket_nr, 2, 1), sockets, where)  # AF_INET
                self.assertEqual(run_bpf(p, arch, socket_nr, 10, 2), sockets, where)  # AF_INET6
                self.assertEqual(run_bpf(p, arch, socket_nr, 1), sockets, where)  # AF_UNIX
                self.assertEqual(run_bpf(p, arch, socket_nr, 16), sockets, where)  # AF_NETLINK
                self.assertEqual(run_bpf(p, arch, socket_nr, 40), sockets, where)  # AF_VSOCK
                # Every IP socket (TCP, UDP, MPTCP (262), SCTP (132, or
                # sequenced packets of protocol 0), DCCP (type 6), ping
                # (ICMP, 1)) with the network only; type flags ignored.
                flags = 0o2000000 | 0o4000
                for domain, kind, protocol in ((2, 1, 6), (10, 1 | flags, 0), (2, 2, 17),
                                               (10, 2 | flags, 0), (2, 1, 262), (10, 1, 262),
                                               (2, 1, 132), (2, 5, 0), (2, 6, 0), (2, 2, 1),
                                               (2, 1, 17), (2, 2, 6)):
                    said = run_bpf(p, arch, socket_nr, domain, kind, protocol)
                    self.assertEqual(said, sockets, (where, domain, kind, protocol))
                # clone3: ENOSYS; clone: refused with CLONE_PARENT or a
                # namespace flag (NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
                # NEWUSER, NEWPID, NEWNET) only.
                clone_nr = {"x86_64": 56, "aarch64": 220}[machine]
                self.assertEqual(run_bpf(p, arch, 435, 0), 0x00050000 | 38, where)
                self.assertEqual(run_bpf(p, arch, clone_nr, 0x8000 | 17), self.DENY, where)
                for namespace in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                                  0x20000000, 0x40000000):
                    said = run_bpf(p, arch, clone_nr, namespace | 17)
                    self.assertEqual(said, self.DENY, (where, namespace))
                self.assertEqual(run_bpf(p, arch, clone_nr, 17), self.ALLOW, where)
                self.assertEqual(run_bpf(p, arch, clone_nr, 0x3d0f00), self.ALLOW, where)
                # Another architecture's calls (i386's), whatever they are.
                self.assertEqual(run_bpf(p, 0x40000003, read_nr, 0), self.DENY, where)
                x32 = self.DENY if machine == "x86_64" else self.ALLOW
                self.assertEqual(run_bpf(p, arch, 0x40000000 | read_nr, 0), x32, where)

    def test_no_filter_for_another_architecture_is_said(self):
        from runner.confine import _seccomp

        self.assertEqual(_seccomp(None, False, "riscv64"),
                         "unconfined: no seccomp filter for this architecture (riscv64)")

    def filtered(self, install, network):
        """In a forked child: ``install()`` (what it returns is ``said``),
        then each check; returns what the child reported, a check's
        outcome "ok" or [exception type, errno]."""
        import ctypes
        import errno
        import socket

        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long

        def shmget():
            shm = libc.shmget(ctypes.c_int(0), ctypes.c_size_t(4096), ctypes.c_int(0o600))
            if shm < 0:
                raise OSError(ctypes.get_errno(), "shmget")
            libc.shmctl(ctypes.c_int(shm), ctypes.c_int(0), None)  # IPC_RMID: not left behind

        def mq_open():
            nr = {"x86_64": 240}.get(MACHINE, 180)
            name = ctypes.create_string_buffer(b"/forgesyte-test-none")
            if syscall(ctypes.c_long(nr), name, ctypes.c_int(os.O_RDONLY), ctypes.c_int(0), None) < 0:
                error = ctypes.get_errno()
                if error != errno.ENOENT:  # none there: not refused
                    raise OSError(error, "mq_open")

        def io_uring_setup():
            # Null parameters: EFAULT where io_uring may be set up.
            if syscall(ctypes.c_long(425), ctypes.c_uint(1), None) < 0:
                error = ctypes.get_errno()
                if error not in (errno.EFAULT, errno.ENOSYS):  # not refused
                    raise OSError(error, "io_uring_setup")

        def clone3():
            # Null arguments: EFAULT where clone3 is let through.
            if syscall(ctypes.c_long(435), None, ctypes.c_size_t(0)) < 0:
                error = ctypes.get_errno()
                if error != errno.EFAULT:
                    raise OSError(error, "clone3")

        def owned_by(owner):
            import fcntl

            r, w = os.pipe()
            try:
                fcntl.fcntl(r, fcntl.F_SETOWN, owner)
            finally:
                os.close(r)
                os.close(w)

        def unshare_user():
            # A user namespace of its own: every capability in it.
            if libc.unshare(ctypes.c_int(0x10000000)) != 0:
                raise OSError(ctypes.get_errno(), "unshare")

        def x32_getpid():
            if syscall(ctypes.c_long(0x40000000 | 39)) < 0:
                error = ctypes.get_errno()
                if error != errno.ENOSYS:  # no x32 in this kernel: not refused
                    raise OSError(error, "x32 getpid")

        checks = [
            ("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
            ("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()),
            ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
            # MPTCP, which Landlock's TCP rights do not rule.
            ("mptcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()),
            ("socketpair", lambda: [s.close() for s in socket.socketpair()]),
            ("dgram_pair", lambda: [s.close() for s in socket.socketpair(
                socket.AF_UNIX, socket.SOCK_DGRAM)]),
            ("shmget", shmget),
            ("mq_open", mq_open),
            ("io_uring", io_uring_setup),
            # The forked child leads no group: unfiltered, both succeed.
            ("setsid", os.setsid),
            ("setpgid", lambda: os.setpgid(0, 0)),
            ("clone3", clone3),
            ("unshare_user", unshare_user),
            # Another process's limits (its parent's): what killed a server.
            ("prlimit_parent", lambda: __import__("resource").prlimit(
                os.getppid(), __import__("resource").RLIMIT_NOFILE)),
            # Signal 0 only asks. Every process, a group that is not its
            # own: refused whoever the runner's kin are; its own group: no.
            ("kill_all", lambda: os.kill(-1, 0)),
            ("kill_group", lambda: os.kill(-(os.getppid() + 77777), 0)),
            ("kill_own_group", lambda: os.kill(-os.getpgrp(), 0)),
            # Its parent: refused when the filter knows its kin (confine).
            ("kill_parent", lambda: os.kill(os.getppid(), 0)),
            # A descriptor's owner, signalled when it is ready: every
            # process's group (-1) never, its parent as ``kill``.
            ("setown_all", lambda: owned_by(-1)),
            ("setown_parent", lambda: owned_by(os.getppid())),
        ]
        if MACHINE == "x86_64":
            checks.append(("x32", x32_getpid))
        def work():
            said = {"said": install(libc, network)}
            for name, check in checks:
                try:
                    check()
                    said[name] = "ok"
                except OSError as e:
                    said[name] = [type(e).__name__, e.errno]
            return said

        return in_a_forked_child(self, work)

    @unittest.skipUnless(SECCOMP_HERE, NO_SECCOMP_HERE)
    def test_without_the_network_no_unix_or_netlink_socket_no_ipc_no_new_group(self):
        # ``_seccomp`` alone knows no kin: no group of its own, no parent
        # (``confine`` tells it both: the test below).
        from runner import confine

        refused = ["PermissionError", 13]
        said = self.filtered(confine._seccomp, False)
        self.assertEqual(said.pop("said"), confine.SYSCALLS_NO_SOCKETS)
        self.assertEqual(said, dict({"unix": refused, "netlink": refused, "udp": refused,
                                     "mptcp": refused, "socketpair": "ok", "dgram_pair": refused,
                                     "shmget": refused, "mq_open": refused,
                                     "io_uring": refused, "setsid": refused, "setpgid": refused,
                                     "clone3": ["OSError", 38], "unshare_user": refused,
                                     "prlimit_parent": refused,
                                     "kill_all": refused,
                                     "kill_group": refused, "kill_own_group": refused,
                                     "kill_parent": "ok", "setown_all": refused,
                                     "setown_parent": "ok"},
                                    **({"x32": refused} if MACHINE == "x86_64" else {})))

    @unittest.skipUnless(SECCOMP_HERE, NO_SECCOMP_HERE)
    def test_with_the_network_sockets_are_made_and_ipc_still_refused(self):
        from runner import confine

        refused = ["PermissionError", 13]
        said = self.filtered(confine._seccomp, True)
        self.assertEqual(said.pop("said"), confine.SYSCALLS_IPC)
        # Made where the kernel has MPTCP, never refused by the filter.
        self.assertNotEqual(said.pop("mptcp"), refused)
        self.assertEqual(said, dict({"unix": "ok", "netlink": "ok", "udp": "ok",
                                     "socketpair": "ok", "dgram_pair": "ok",
                                     "shmget": refused, "mq_open": refused,
                                     "io_uring": refused, "setsid": refused, "setpgid": refused,
                                     "clone3": ["OSError", 38], "unshare_user": refused,
                                     "prlimit_parent": refused,
                                     "kill_all": refused,
                                     "kill_group": refused, "kill_own_group": refused,
                                     "kill_parent": "ok", "setown_all": refused,
                                     "setown_parent": "ok"},
                                    **({"x32": refused} if MACHINE == "x86_64" else {})))

    @unittest.skipUnless(SECCOMP_HERE, NO_SECCOMP_HERE)
    def test_confine_installs_it_last_and_reports_it(self):
        from runner import confine

        def confined(libc, network):  # its own libc, as a runner started alone
            return confine.confine({"network": network, "env": [], "read": [], "write": []})

        said = self.filtered(confined, False)
        report = said.pop("said")
        self.assertEqual(report["syscalls"], confine.SYSCALLS_NO_SOCKETS, report)
        self.assertEqual(list(report)[-1], "syscalls", report)
        self.assertEqual(said["unix"], ["PermissionError", 13])
        self.assertEqual(said["shmget"], ["PermissionError", 13])
        # Its kin known: its parent may not be signalled, nor made the
        # owner of a descriptor.
        self.assertEqual(said["kill_parent"], ["PermissionError", 13])
        self.assertEqual(said["setown_parent"], ["PermissionError", 13])
        self.assertEqual(said["kill_own_group"], "ok")

    def test_the_shared_namespace_is_turned_off_by_every_boolean_word(self):
        # As every FORGESYTE_* boolean: `false` left the namespace shared.
        from runner import zygote
        for off in ("0", "false", "FALSE", "no", "off", " Off ", "n", "F"):
            self.assertTrue(zygote._says_off(off), off)
        for on in (None, "", "1", "true", "yes", "on", "shared"):
            self.assertFalse(zygote._says_off(on), on)

    def test_a_zygote_ends_with_the_protocol_code_at_any_bad_control_message(self):
        import socket

        code = "import sys; sys.path.insert(0, %r); import runner as r; r.start(['--zygote'])" % HERE
        for message in (b'{"op":"reap","pid":"x"}', b'{"op":"reap","pid":1e400}', b"[" * 200000):
            ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.addCleanup(ours.close)
            proc = subprocess.Popen([PYTHON, "-c", code], stdin=its, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            its.close()
            ours.send(message)
            try:
                _, err = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                self.fail("the zygote serves on after %r" % message[:40])
            self.assertEqual(proc.returncode, base.EXIT_PROTOCOL, (message[:40], err[-300:]))
            self.assertIn(b"a bad control message", err)

    def test_a_zygote_first_says_its_site_directories_as_they_were_at_its_start(self):
        import site
        import socket

        ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(ours.close)
        code = "import sys; sys.path.insert(0, %r); import runner as r; r.start(['--zygote'])" % HERE
        proc = subprocess.Popen([PYTHON, "-c", code], stdin=its, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        its.close()
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        ours.settimeout(TIMEOUT)
        said = json.loads(ours.recv(1 << 20).decode("utf-8"))
        expected = []
        for d in site.getsitepackages():
            try:
                expected.append([d, os.stat(d).st_mtime_ns])
            except OSError:
                expected.append([d, None])
        self.assertEqual(said, {"op": "site", "dirs": expected})
        self.assertTrue(expected, "this interpreter has no site directory to report")

    def test_a_confined_zygote_that_cannot_be_made_not_dumpable_does_not_serve(self):
        import socket

        # No ctypes, so no prctl: it says so and exits 71 (EXIT_SETUP)
        # rather than serve runners from a dumpable zygote.
        ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(ours.close)
        code = ("import sys; sys.modules['ctypes'] = None; sys.path.insert(0, %r); "
                "import runner as r; r.start(['--zygote', '--confined'])" % HERE)
        proc = subprocess.Popen([PYTHON, "-c", code], stdin=its, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        its.close()
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.fail("the zygote serves")
        self.assertEqual(proc.returncode, base.EXIT_SETUP, err)
        self.assertIn(b"cannot make itself not dumpable: no ctypes", err)


class SharedMemoryTests(unittest.TestCase):
    """The Wire's shared memory (PROTOCOL.md §3.1), between two Wires over
    pipes and a SEQPACKET socket pair: large attachments travel as sealed
    memory files, small ones inline, and nothing stays open."""

    def wires(self, threshold):
        import socket
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        sender = wire.Wire(os.open(os.devnull, os.O_RDONLY), w, (a, threshold))
        receiver = wire.Wire(r, os.open(os.devnull, os.O_WRONLY), (b, threshold))
        return sender, receiver

    def memfds(self):
        names = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.append(os.readlink("/proc/self/fd/" + fd))
            except OSError:
                pass
        return sum(1 for n in names if wire.MEMFD_NAME in n)

    def test_large_attachments_are_shared_and_small_ones_inline(self):
        sender, receiver = self.wires(1000)
        big = bytes(range(256)) * 40
        sender.send_frame(b'{"op":"call","id":1}', [b"small", big, b""])
        header, attachments = receiver.read_frame()
        self.assertEqual(json.loads(header)["shm"], [1])
        self.assertEqual(attachments[0], b"small")
        self.assertIsInstance(attachments[1], wire.Shared)
        self.assertEqual(attachments[2], b"")
        view = attachments[1].take(True)
        self.assertIsInstance(view, memoryview)
        self.assertEqual(bytes(view), big)
        self.assertTrue(view.readonly)
        # The mapping (and the descriptor Python's mmap keeps with it
        # before 3.13) lives as long as the view: then nothing is open.
        del view, attachments
        import gc
        gc.collect()
        self.assertEqual(self.memfds(), 0, "a memory file is still open")
        # The default: bytes, and the mapping goes.
        sender.send_frame(b'{"op":"call","id":2}', [big])
        _, attachments = receiver.read_frame()
        self.assertEqual(attachments[0].take(False), big)
        self.assertEqual(self.memfds(), 0, "the copy did not close the descriptor")
        # An attachment dropped untaken (the call failed first) closes its
        # descriptor too.
        sender.send_frame(b'{"op":"call","id":3}', [big])
        _, attachments = receiver.read_frame()
        self.assertEqual(self.memfds(), 1)
        del attachments
        gc.collect()
        self.assertEqual(self.memfds(), 0, "an untaken attachment kept its descriptor")

    def test_files_made_for_a_frame_are_closed_when_a_later_one_fails(self):
        sender, _receiver = self.wires(1000)
        big = b"x" * 2000
        real_sealed = wire._sealed
        made = []

        def sealed_then_out_of_memory(data):
            if made:
                raise MemoryError()
            made.append(real_sealed(data))
            return made[-1]

        wire._sealed = sealed_then_out_of_memory
        try:
            with self.assertRaises(MemoryError):
                sender._share(b'{"op":"call","id":1}', [big, big])
        finally:
            wire._sealed = real_sealed
        self.assertEqual(len(made), 1)
        self.assertEqual(self.memfds(), 0, "the first file was left open")

    def test_a_result_file_never_takes_a_closed_stdout_or_stderr(self):
        """A plugin that closed fd 1 and writes to it from a thread: the
        result's memory file is not made there, and what such a write put
        in the file before it moved is gone."""
        saved = os.dup(1)
        real_create = os.memfd_create

        def create_then_plugin_writes(*args):
            fd = real_create(*args)
            if fd <= 2:
                os.write(fd, b"CWRITE 221\n")  # the plugin's thread, just then
            return fd

        try:
            os.close(1)
            os.memfd_create = create_then_plugin_writes
            try:
                fd = wire._sealed(b"result bytes")
            finally:
                os.memfd_create = real_create
            low = os.open(os.devnull, os.O_WRONLY)  # fd 1 is free again
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        os.close(low)
        try:
            self.assertGreater(fd, 2)
            self.assertEqual(low, 1, "the file's first descriptor was left open")
            self.assertEqual(os.pread(fd, 100, 0), b"result bytes")
        finally:
            os.close(fd)

    def send_fds(self, sender, fds):
        """The descriptor message of a frame (§3.1), sent by hand."""
        import socket
        sender.shm[0].sendmsg([struct.pack("<I", len(fds))],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))])

    def sealed_file(self, data, flags=0):
        import fcntl
        fd = os.memfd_create("forgesyte-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
        self.addCleanup(os.close, fd)
        os.ftruncate(fd, len(data))
        if data:  # (hugetlbfs has no write)
            os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, wire._F_ADD_SEALS, wire._F_SEAL_SEAL | wire._F_SEAL_SHRINK
                    | wire._F_SEAL_GROW | wire._F_SEAL_WRITE)
        return fd

    def test_a_memory_file_not_of_tmpfs_is_refused(self):
        # PROTOCOL.md §3.1: "a file not of `tmpfs` (a huge-page memory file
        # would be mapped in whole huge pages)" is a malformed frame. The
        # runner knows tmpfs as the device of its own memory files.
        sender, receiver = self.wires(1000)
        real = wire._memory_files_device
        wire._memory_files_device = lambda: real() + 1  # another device
        try:
            self.send_fds(sender, [self.sealed_file(b"bytes")])
            os.write(sender.fd_out, frame(b'{"shm":[0]}', [b""]))
            with self.assertRaises(wire.ProtocolError) as refused:
                receiver.read_frame()
        finally:
            wire._memory_files_device = real
        self.assertIn("not a memory file of tmpfs", str(refused.exception))
        # The real device: an ordinary memory file, sealed, is on it.
        self.assertEqual(os.fstat(self.sealed_file(b"x")).st_dev, wire._memory_files_device())
        # A real huge-page one (hugetlbfs), where this kernel makes them
        # (the refusal itself is proven above either way; not a skip, which
        # CI counts as a failure).
        try:
            huge = self.sealed_file(b"", os.MFD_HUGETLB)
        except OSError:
            return
        self.send_fds(sender, [huge])
        os.write(sender.fd_out, frame(b'{"shm":[0]}', [b""]))
        with self.assertRaises(wire.ProtocolError) as refused:
            receiver.read_frame()
        self.assertIn("not a memory file of tmpfs", str(refused.exception))

    def test_an_escaped_shm_key_is_the_same_key(self):
        # A JSON parser reads "\u0073hm" as "shm" (the host's does): its
        # descriptors are this frame's, not the next one's (the Rust
        # reader's ``shared_indices``).
        sender, receiver = self.wires(1000)
        self.send_fds(sender, [self.sealed_file(b"shared bytes")])
        os.write(sender.fd_out, frame(b'{"\\u0073hm":[0],"op":"call"}', [b""]))
        _, attachments = receiver.read_frame()
        self.assertIsInstance(attachments[0], wire.Shared)
        self.assertEqual(attachments[0].take(False), b"shared bytes")
        # "shm" in a value is no field, and needs no descriptors.
        os.write(sender.fd_out, frame(b'{"a":"\\"shm\\"","b":"\\u0041"}', [b""]))
        self.assertEqual(receiver.read_frame()[1], [b""])
        # A field that is not a list of indices is refused, null and 0 too
        # (as the Rust reader refuses them), spelled either way.
        for header in (b'{"shm":null}', b'{"shm":0}', b'{"shm":"x"}', b'{"\\u0073hm":{}}'):
            os.write(sender.fd_out, frame(header, [b""]))
            with self.assertRaises(wire.ProtocolError, msg=header):
                receiver.read_frame()
        # Named twice, spelled either way: which one counts? Refused (the
        # host's parser refuses a field given twice).
        with self.assertRaises(wire.ProtocolError) as refused:
            wire.shared_indices(b'{"shm":[0],"\\u0073hm":[]}')
        self.assertIn("appears twice", str(refused.exception))
        # A key twice inside the arguments is theirs, not the header's.
        self.assertEqual(wire.shared_indices(b'{"shm":[0],"args":{"a":1,"a":2}}'), [0])
        # An escape that cannot spell s, h or m costs no parse (this one,
        # not JSON, would be refused if it were parsed).
        self.assertEqual(wire.shared_indices(b'{"a":"\\u00e9", "b": '), [])

    def test_a_shm_field_without_descriptors_is_a_protocol_error(self):
        sender, receiver = self.wires(1000)
        os.write(sender.fd_out, frame(b'{"shm":[0]}', [b""]))
        with self.assertRaises(wire.ProtocolError):
            receiver.read_frame()
        # Not offered: any `shm` field is refused.
        receiver.shm = None
        os.write(sender.fd_out, frame(b'{"shm":[0]}', [b""]))
        with self.assertRaises(wire.ProtocolError) as refused:
            receiver.read_frame()
        self.assertIn("no shared memory was offered", str(refused.exception))


if __name__ == "__main__":
    unittest.main()
