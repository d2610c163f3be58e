//! A runtime-neutral conformance suite for plugin runners: executables that
//! host one plugin and speak the wire protocol
//! ([`forgesyte_protocol::wire`], version [`PROTOCOL_VERSION`]) on their
//! stdin and stdout, whatever language they are written in.
//!
//! Describe how to start a runner in a [`RunnerUnderTest`] (its plugin must
//! have an echo tool that returns its arguments, like the fixture `good`
//! plugin's `echo`) and run [`check_all`], or one `check_*` function per
//! test for sharper failure messages. Each check starts its own runner
//! process, talks to it with hard timeouts (no read or write can block it
//! forever), kills the process when it ends, and panics with a message
//! naming the check, the deviation, the runner's exit status and the tail of
//! its stderr.
//!
//! The checks: [`check_handshake`], [`check_construct`], [`check_tools`],
//! [`check_call`], [`check_attachments`], [`check_oversized_frame`],
//! [`check_garbage`], [`check_early_exit`] and [`check_shared_memory`]
//! (in `conformance/shared_memory.rs`).

// Test-support code: a check reports a deviation by panicking, as an
// assertion does, and `expect` documents invariants of the suite itself.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use forgesyte_protocol::wire::{
    self, Frame, Greeting, PROTOCOL_ENV, PROTOCOL_VERSION, attach, capability,
};
use serde_json::{Value, json};

mod shared_memory;
pub use self::shared_memory::check_shared_memory;

/// How long a runner may take to send a frame the suite waits for (the
/// hello included).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a runner may take to exit once it must.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest frame body the suite reads from a runner.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// How much of the runner's stderr a failure message shows.
const STDERR_TAIL: usize = 4096;

/// The id of every check's `create` request (not 1, so that a runner that
/// answers a constant is caught).
const CREATE_ID: u64 = 7;

/// A tool id no plugin has.
const NO_SUCH_TOOL: &str = "conformance-no-such-tool";

/// How to start a runner for a plugin, and what that plugin offers.
#[derive(Debug, Clone)]
pub struct RunnerUnderTest {
    /// The runner's executable.
    pub program: PathBuf,
    /// Its arguments (e.g. `--library PATH --memory-limit-mb 0 --plugin NAME`
    /// for the native runner).
    pub args: Vec<OsString>,
    /// Extra environment variables (the suite sets [`PROTOCOL_ENV`] itself,
    /// as the host does).
    pub envs: Vec<(OsString, OsString)>,
    /// The plugin's manifest, as sent in `create`'s config.
    pub manifest: Value,
    /// The plugin's directory, as sent in `create`'s config.
    pub plugin_dir: PathBuf,
    /// A tool that returns its arguments unchanged (attachments included).
    pub echo_tool: String,
    /// A tool that takes `{"ms": N}` and returns after N milliseconds, if
    /// the plugin has one: it lets the suite check that announced
    /// concurrency is real and that a runner exits with a call in flight.
    pub sleep_tool: Option<String>,
}

impl RunnerUnderTest {
    /// The config of a `create`: `{"manifest", "plugin_dir", "models"}`.
    pub fn config(&self) -> Value {
        json!({
            "manifest": self.manifest,
            "plugin_dir": self.plugin_dir.display().to_string(),
            "models": {},
        })
    }
}

/// Runs every check, in the order of this module's documentation.
pub fn check_all(r: &RunnerUnderTest) {
    check_handshake(r);
    check_construct(r);
    check_tools(r);
    check_call(r);
    check_attachments(r);
    check_oversized_frame(r);
    check_garbage(r);
    check_early_exit(r);
    check_shared_memory(r);
}

/// The first frame is a well-formed hello: checked byte by byte (length,
/// `header_len`, `count` of 0, a JSON header), then field by field
/// (`protocol` is [`PROTOCOL_VERSION`], non-empty `runtime` and
/// `runtime_version`, `pid` is the process's, `capabilities` a list of
/// strings), then through the host's own decoder
/// ([`wire::greeting`]). After it the runner waits, silent, for requests.
pub fn check_handshake(r: &RunnerUnderTest) {
    let mut s = Session::spawn("handshake", r);
    let raw = s.recv_raw("the hello");
    // By hand: len:u32le header_len:u32le count:u32le header.
    let word = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = raw.get(at..at + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(bytes)).ok()
    };
    let len = word(0).expect("the reader keeps the length");
    if len != raw.len() - 4 {
        s.fail(format!(
            "the suite read {} body bytes for a length of {len}",
            raw.len() - 4
        ));
    }
    let legacy = if raw.get(4) == Some(&b'{') {
        " (the body starts with '{': this looks like a protocol version 1 frame, a length \
         and bare JSON)"
    } else {
        ""
    };
    let (Some(header_len), Some(count)) = (word(4), word(8)) else {
        s.fail(format!(
            "the first frame's body is {len} bytes, too short for header_len and count{legacy}"
        ));
    };
    if count != 0 {
        s.fail(format!(
            "the hello frame announces {count} attachments, a hello has none{legacy}"
        ));
    }
    if header_len.checked_add(8) != Some(len) {
        s.fail(format!(
            "the hello frame's parts do not add up: 8 + header_len {header_len} != len \
             {len}{legacy}"
        ));
    }
    let hello: Value = match serde_json::from_slice(&raw[12..]) {
        Ok(hello) => hello,
        Err(e) => s.fail(format!(
            "the hello's header is not JSON ({e}): {}",
            String::from_utf8_lossy(&raw[12..])
        )),
    };
    match hello.get("type").and_then(Value::as_str) {
        Some("hello") => {}
        Some("import_failed") => s.fail(format!(
            "the runner could not load its plugin (check the RunnerUnderTest): {hello}"
        )),
        _ => s.fail(format!("the first frame is not a hello: {hello}")),
    }
    match hello.get("protocol").and_then(Value::as_u64) {
        Some(p) if p == u64::from(PROTOCOL_VERSION) => {}
        Some(p) => s.fail(format!(
            "the runner speaks protocol version {p}, the suite version {PROTOCOL_VERSION}"
        )),
        None => s.fail(format!(
            "the hello has no numeric `protocol` (version 1 runners had none): {hello}"
        )),
    }
    for field in ["runtime", "runtime_version"] {
        if hello
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            s.fail(format!(
                "the hello's `{field}` is not a non-empty string: {hello}"
            ));
        }
    }
    let pid = s.child.id();
    if hello.get("pid").and_then(Value::as_u64) != Some(u64::from(pid)) {
        s.fail(format!(
            "the hello's `pid` is not the runner's process id {pid}: {hello}"
        ));
    }
    let capabilities = hello.get("capabilities").and_then(Value::as_array);
    if !capabilities.is_some_and(|list| list.iter().all(Value::is_string)) {
        s.fail(format!(
            "the hello's `capabilities` is not a list of strings: {hello}"
        ));
    }
    // And as the host reads it.
    match wire::greeting(raw[4..].to_vec()) {
        Ok(Greeting::Hello(h)) if h.pid == pid => {}
        Ok(other) => s.fail(format!("the host's decoder reads {other:?}")),
        Err(e) => s.fail(format!("the host's decoder rejects the hello: {e}")),
    }
    // The runner now waits for requests: no second frame, no exit.
    s.expect_quiet(Duration::from_millis(200), "after the hello");
}

/// `create` with the plugin's config is answered by `created` with the
/// request's id and a list of tools that holds the echo tool.
pub fn check_construct(r: &RunnerUnderTest) {
    let (mut s, _) = Session::start("construct", r);
    s.create(r);
    // The instance serves calls.
    s.echo(r, 8, &json!({"constructed": true}));
}

/// Every tool spec of `created` is an object with a non-empty string `id`
/// (unique among the tools) and object `input_schema` and `output_schema`.
pub fn check_tools(r: &RunnerUnderTest) {
    let (mut s, _) = Session::start("tools", r);
    let tools = s.create(r);
    let mut seen = BTreeSet::new();
    for tool in &tools {
        let Some(id) = tool.get("id").and_then(Value::as_str) else {
            s.fail(format!("a tool spec has no string `id`: {tool}"));
        };
        if id.is_empty() {
            s.fail(format!("a tool spec's `id` is empty: {tool}"));
        }
        if !seen.insert(id.to_owned()) {
            s.fail(format!("two tool specs have the id {id:?}"));
        }
        for field in ["input_schema", "output_schema"] {
            if !tool.get(field).is_some_and(Value::is_object) {
                s.fail(format!(
                    "tool {id:?}: `{field}` is not a JSON object: {tool}"
                ));
            }
        }
    }
}

/// Calls: the echo tool returns its arguments under the request's id
/// (non-ASCII text and a 64-bit id included); several calls in flight at
/// once are each answered once, with their own id and result (in order
/// unless the hello announced `concurrent_calls`; with a sleep tool, an
/// announced concurrency is checked to be real); an unknown tool is a
/// `tool_failed` of kind `UnknownTool` with the request's id; a call with
/// a `context` (request id, `traceparent`, a field from a later revision)
/// is answered as one without; the runner serves calls after each.
pub fn check_call(r: &RunnerUnderTest) {
    let (mut s, capabilities) = Session::start("call", r);
    s.create(r);
    s.echo(r, 100, &json!({"text": "héllo", "n": [1, 2, 3]}));

    // Several in flight: all sent before any answer is read.
    let ids: Vec<u64> = (0..8).map(|i| 200 + 3 * i).chain([(1 << 40) + 1]).collect();
    let mut pending = BTreeMap::new();
    for (i, &id) in ids.iter().enumerate() {
        let args = json!({"i": i, "text": format!("call {id}"), "pad": "x".repeat(100 * i)});
        s.call(id, &r.echo_tool, &args, &[], &[]);
        pending.insert(id, args);
    }
    let concurrent = capabilities
        .iter()
        .any(|c| c == capability::CONCURRENT_CALLS);
    for (n, &sent) in ids.iter().enumerate() {
        let reply = s.recv(&format!(
            "answer {} of {} calls in flight",
            n + 1,
            ids.len()
        ));
        let id = reply.id();
        let Some(args) = id.and_then(|id| pending.remove(&id)) else {
            s.fail(format!(
                "an answer's id {id:?} is not that of a call in flight (still waiting for \
                 {:?}): {}",
                pending.keys().collect::<Vec<_>>(),
                reply.header
            ));
        };
        if !concurrent && id != Some(sent) {
            s.fail(format!(
                "without `concurrent_calls` answers come in request order: expected id \
                 {sent}, got {id:?}"
            ));
        }
        s.expect_result(&reply, id.unwrap_or_default(), &args);
    }

    if concurrent && let Some(sleep) = &r.sleep_tool {
        s.call(300, sleep, &json!({"ms": 600}), &[], &[]);
        let args = json!({"overtakes": "the sleep"});
        s.call(301, &r.echo_tool, &args, &[], &[]);
        let first = s.recv("the first answer of a sleep and an echo in flight");
        if first.id() != Some(301) {
            s.fail(format!(
                "the runner announced `concurrent_calls`, yet a quick echo sent after a \
                 600 ms sleep was not answered first: {}",
                first.header
            ));
        }
        s.expect_result(&first, 301, &args);
        let second = s.recv("the answer to the sleep");
        s.expect_kind(&second, "result", 300);
    }

    let args = json!({"with": "a context"});
    s.send(
        &json!({"op": "call", "id": 402, "tool": r.echo_tool, "args": args, "context": {
            "request_id": "abc-123",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "from_a_later_revision": 1,
        }}),
        &[],
    );
    let reply = s.recv("the echo of a call with a context");
    s.expect_result(&reply, 402, &args);

    s.call(400, NO_SUCH_TOOL, &json!({}), &[], &[]);
    let reply = s.recv("the answer to a call of an unknown tool");
    s.expect_kind(&reply, "tool_failed", 400);
    let kind = reply.header.pointer("/error/kind").and_then(Value::as_str);
    if kind != Some("UnknownTool") {
        s.fail(format!(
            "an unknown tool's error has kind {kind:?}, not \"UnknownTool\": {}",
            reply.header
        ));
    }
    s.echo(r, 401, &json!({"still": "alive"}));
}

/// Attachments, when the hello announced `attachments`: the echo of a call
/// whose attachments go to `/data` (64 KiB of every byte value) and to
/// nested places (an object member, an array element, an empty attachment)
/// is, once the result's own attachments are put at their places as base64
/// strings (as the host does for JSON answers), the arguments with base64
/// strings there.
pub fn check_attachments(r: &RunnerUnderTest) {
    let (mut s, capabilities) = Session::start("attachments", r);
    if !capabilities.iter().any(|c| c == capability::ATTACHMENTS) {
        return;
    }
    s.create(r);
    let b64 = |bytes: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));

    let blob: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    s.call(
        500,
        &r.echo_tool,
        &json!({"data": null}),
        &["/data"],
        &[&blob],
    );
    let reply = s.recv("the echo of a 64 KiB attachment");
    s.expect_kind(&reply, "result", 500);
    let result = s.normalised_result(&reply);
    if result != json!({"data": b64(&blob)}) {
        let data = result.get("data").and_then(Value::as_str).unwrap_or("");
        s.fail(format!(
            "the echo of a 64 KiB attachment at /data is not that attachment in base64: \
             {} base64 characters returned (expected {}), first 64: {:?}; whole result \
             starts {:.200}",
            data.len(),
            b64(&blob).as_str().map_or(0, str::len),
            data.get(..64.min(data.len())).unwrap_or(""),
            result.to_string()
        ));
    }

    let small = b"\x00\xffconformance\n";
    let args = json!({"a": {"b": null}, "list": [null, 1], "keep": "x"});
    s.call(
        501,
        &r.echo_tool,
        &args,
        &["/a/b", "/list/0"],
        &[small, b""],
    );
    let reply = s.recv("the echo of two attachments at nested places");
    s.expect_kind(&reply, "result", 501);
    let result = s.normalised_result(&reply);
    let expected = json!({"a": {"b": b64(small)}, "list": [b64(b""), 1], "keep": "x"});
    if result != expected {
        s.fail(format!(
            "the echo of attachments at /a/b and /list/0 is {result}, expected {expected}"
        ));
    }
}

/// A frame announcing `0xFFFF_FFFF` bytes (and nothing after it, the pipe
/// left open) makes the runner exit with a non-zero code within
/// [`EXIT_TIMEOUT`], without answering and without waiting for the body.
pub fn check_oversized_frame(r: &RunnerUnderTest) {
    let (mut s, _) = Session::start("oversized frame", r);
    s.write(u32::MAX.to_le_bytes().to_vec());
    s.expect_failure_exit("after a frame header announcing 4 GiB - 1 bytes");
}

/// Garbage makes the runner exit with a non-zero code within
/// [`EXIT_TIMEOUT`], without answering: a 64-byte frame whose parts do not
/// add up, a frame whose header is not JSON, and a JSON header with an
/// unknown `op` (each to a fresh runner).
pub fn check_garbage(r: &RunnerUnderTest) {
    // len 60, header_len 1000, count 0, then 52 bytes: 8 + 1000 != 60.
    let mut inconsistent = Vec::with_capacity(64);
    inconsistent.extend_from_slice(&60u32.to_le_bytes());
    inconsistent.extend_from_slice(&1000u32.to_le_bytes());
    inconsistent.extend_from_slice(&0u32.to_le_bytes());
    inconsistent.extend(b"garbage! ".iter().cycle().take(52));
    assert_eq!(inconsistent.len(), 64, "the suite's garbage frame");
    let cases = [
        ("a 64-byte frame whose parts do not add up", inconsistent),
        (
            "a frame whose header is not JSON",
            encode_frame(b"this is not JSON", &[]),
        ),
        (
            "a request with an unknown op",
            encode_frame(br#"{"op":"frobnicate","id":9}"#, &[]),
        ),
    ];
    for (what, bytes) in cases {
        let (mut s, _) = Session::start("garbage", r);
        s.write(bytes);
        s.expect_failure_exit(&format!("after {what}"));
    }
}

/// Once its stdin ends the runner exits within [`EXIT_TIMEOUT`]: with code
/// 0 when idle (right after the hello, and after construction), with any
/// code while a slow call is in flight (with a sleep tool).
pub fn check_early_exit(r: &RunnerUnderTest) {
    for constructed in [false, true] {
        let (mut s, _) = Session::start("early exit", r);
        let when = if constructed {
            s.create(r);
            "after construction"
        } else {
            "right after the hello"
        };
        s.close_stdin();
        let status = s.wait_exit(false, &format!("with stdin closed {when}"));
        if status.code() != Some(0) {
            s.fail(format!(
                "with stdin closed {when}, the runner exited with {status}, not code 0"
            ));
        }
    }
    if let Some(sleep) = &r.sleep_tool {
        let (mut s, _) = Session::start("early exit", r);
        s.create(r);
        s.call(600, sleep, &json!({"ms": 20_000}), &[], &[]);
        // Let the call start; it cannot be observed otherwise.
        thread::sleep(Duration::from_millis(100));
        s.close_stdin();
        s.wait_exit(true, "with stdin closed while a 20 s call is in flight");
    }
}

/// A frame, by hand: `len header_len count size… header attachment…`.
fn encode_frame(header: &[u8], attachments: &[&[u8]]) -> Vec<u8> {
    let word = |n: usize| {
        u32::try_from(n)
            .expect("the suite's frames are small")
            .to_le_bytes()
    };
    let body = 8
        + 4 * attachments.len()
        + header.len()
        + attachments.iter().map(|a| a.len()).sum::<usize>();
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&word(body));
    out.extend_from_slice(&word(header.len()));
    out.extend_from_slice(&word(attachments.len()));
    for a in attachments {
        out.extend_from_slice(&word(a.len()));
    }
    out.extend_from_slice(header);
    for a in attachments {
        out.extend_from_slice(a);
    }
    out
}

/// What the stdout reader thread saw.
enum Event {
    /// One whole frame: the length prefix and the body.
    Frame(Vec<u8>),
    /// The stream ended between frames.
    End,
    /// The stream broke, ended inside a frame, or announced an absurd frame.
    Broken(String),
}

/// One decoded answer.
struct Reply {
    /// The JSON header.
    header: Value,
    /// The attachments, in order.
    attachments: Vec<Vec<u8>>,
}

impl Reply {
    fn id(&self) -> Option<u64> {
        self.header.get("id").and_then(Value::as_u64)
    }

    fn kind(&self) -> &str {
        self.header
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// One runner process under a check: its stdin fed by a writer thread, its
/// stdout read frame by frame by a reader thread, its stderr kept. Killed
/// when dropped (a check's end, or its panic).
struct Session {
    check: &'static str,
    program: PathBuf,
    child: Child,
    /// Bytes to write; dropping it closes the runner's stdin (once what is
    /// queued is written).
    writer: Option<Sender<Vec<u8>>>,
    write_error: Arc<Mutex<Option<String>>>,
    events: Receiver<Event>,
    /// Whether the reader has reported the end of stdout.
    ended: bool,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Session {
    /// Starts the runner.
    fn spawn(check: &'static str, r: &RunnerUnderTest) -> Session {
        Session::spawn_with(check, r, |_| {})
    }

    /// [`Session::spawn`] with `more` done to the command first.
    fn spawn_with(
        check: &'static str,
        r: &RunnerUnderTest,
        more: impl FnOnce(&mut Command),
    ) -> Session {
        let mut command = Command::new(&r.program);
        more(&mut command);
        command
            .args(&r.args)
            .env(PROTOCOL_ENV, PROTOCOL_VERSION.to_string())
            .envs(r.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "conformance check `{check}`: cannot start the runner {}: {e}",
                r.program.display()
            )
        });
        let (stdin, stdout, stderr_pipe) = (
            child.stdin.take().expect("stdin is piped"),
            child.stdout.take().expect("stdout is piped"),
            child.stderr.take().expect("stderr is piped"),
        );
        let (writer, to_write) = mpsc::channel();
        let write_error = Arc::new(Mutex::new(None));
        let errors = Arc::clone(&write_error);
        thread::spawn(move || write_frames(stdin, &to_write, &errors));
        let (events_tx, events) = mpsc::channel();
        thread::spawn(move || read_frames(stdout, &events_tx));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&stderr);
        thread::spawn(move || keep_tail(stderr_pipe, &kept));
        Session {
            check,
            program: r.program.clone(),
            child,
            writer: Some(writer),
            write_error,
            events,
            ended: false,
            stderr,
        }
    }

    /// Starts the runner and reads its hello (checked in detail only by
    /// [`check_handshake`]); returns its capabilities.
    fn start(check: &'static str, r: &RunnerUnderTest) -> (Session, Vec<String>) {
        let mut s = Session::spawn(check, r);
        let hello = s.recv("the hello");
        if hello.kind() != "hello" {
            s.fail(format!("the first frame is not a hello: {}", hello.header));
        }
        let capabilities = hello
            .header
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        (s, capabilities)
    }

    /// Panics with `message` and what is known about the runner.
    #[track_caller]
    fn fail(&mut self, message: impl Display) -> ! {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            Ok(None) => "running".to_owned(),
            Err(e) => format!("unknown ({e})"),
        };
        let write_error = self
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .map(|e| format!("\nwriting to its stdin failed: {e}"))
            .unwrap_or_default();
        let stderr = {
            let kept = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&kept).into_owned()
        };
        panic!(
            "conformance check `{}` failed for the runner {}: {message}\nthe runner: \
             {status}{write_error}\nits stderr (last {STDERR_TAIL} bytes at most):\n{}",
            self.check,
            self.program.display(),
            if stderr.is_empty() {
                "(empty)"
            } else {
                &stderr
            },
        );
    }

    /// Queues bytes for the runner's stdin (never blocks).
    fn write(&mut self, bytes: Vec<u8>) {
        let sent = self.writer.as_ref().is_some_and(|w| w.send(bytes).is_ok());
        if !sent {
            self.fail("the runner's stdin is closed: it cannot be written");
        }
    }

    /// Closes the runner's stdin once what is queued is written.
    fn close_stdin(&mut self) {
        self.writer = None;
    }

    /// Sends one request frame.
    fn send(&mut self, header: &Value, attachments: &[&[u8]]) {
        let header = serde_json::to_vec(header).expect("a JSON value serialises");
        self.write(encode_frame(&header, attachments));
    }

    /// Sends a `call`.
    fn call(&mut self, id: u64, tool: &str, args: &Value, pointers: &[&str], atts: &[&[u8]]) {
        let mut request = json!({"op": "call", "id": id, "tool": tool, "args": args});
        if !pointers.is_empty() {
            request["attachments"] = json!(pointers);
        }
        self.send(&request, atts);
    }

    /// Sends `create` and checks its `created`; returns the tool specs.
    fn create(&mut self, r: &RunnerUnderTest) -> Vec<Value> {
        self.send(
            &json!({"op": "create", "id": CREATE_ID, "config": r.config()}),
            &[],
        );
        let reply = self.recv("the answer to create");
        self.expect_kind(&reply, "created", CREATE_ID);
        let Some(tools) = reply.header.get("tools").and_then(Value::as_array) else {
            self.fail(format!("`created` has no list `tools`: {}", reply.header));
        };
        if tools.is_empty() {
            self.fail("`created` lists no tools");
        }
        let echo = Some(r.echo_tool.as_str());
        if !tools
            .iter()
            .any(|t| t.get("id").and_then(Value::as_str) == echo)
        {
            self.fail(format!(
                "`created` does not list the echo tool {:?}: {}",
                r.echo_tool, reply.header
            ));
        }
        tools.clone()
    }

    /// Calls the echo tool and checks that it answers `args` under `id`.
    fn echo(&mut self, r: &RunnerUnderTest, id: u64, args: &Value) {
        self.call(id, &r.echo_tool, args, &[], &[]);
        let reply = self.recv(&format!("the echo of {args}"));
        self.expect_result(&reply, id, args);
    }

    /// Waits for the next frame, whole (length prefix included).
    fn recv_raw(&mut self, what: &str) -> Vec<u8> {
        let event = if self.ended {
            Err(RecvTimeoutError::Disconnected)
        } else {
            self.events.recv_timeout(ANSWER_TIMEOUT)
        };
        match event {
            Ok(Event::Frame(raw)) => raw,
            Ok(Event::End) | Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                // Let the status in the message be the exit's.
                let _ = self.wait_for_exit(Duration::from_millis(500));
                self.fail(format!("waiting for {what}: the runner closed its stdout"))
            }
            Ok(Event::Broken(detail)) => {
                self.ended = true;
                self.fail(format!("waiting for {what}: {detail}"))
            }
            Err(RecvTimeoutError::Timeout) => self.fail(format!(
                "waiting for {what}: no frame within {ANSWER_TIMEOUT:?}"
            )),
        }
    }

    /// Waits for the next frame and decodes it: a well-formed frame whose
    /// header is a JSON object with a string `type` that the host's decoder
    /// accepts.
    fn recv(&mut self, what: &str) -> Reply {
        let raw = self.recv_raw(what);
        let frame = match Frame::parse(raw[4..].to_vec()) {
            Ok(frame) => frame,
            Err(e) => self.fail(format!("{what}: {e}")),
        };
        let header: Value = match serde_json::from_slice(frame.header()) {
            Ok(header) => header,
            Err(e) => self.fail(format!(
                "{what}: the header is not JSON ({e}): {:.300}",
                String::from_utf8_lossy(frame.header())
            )),
        };
        if !header.get("type").is_some_and(Value::is_string) {
            self.fail(format!("{what}: the header has no string `type`: {header}"));
        }
        if let Err(e) = serde_json::from_slice::<wire::Response>(frame.header()) {
            self.fail(format!("{what}: the host's decoder rejects {header}: {e}"));
        }
        Reply {
            header,
            attachments: frame.attachments().map(<[u8]>::to_vec).collect(),
        }
    }

    /// Checks an answer's `type` and `id`.
    fn expect_kind(&mut self, reply: &Reply, kind: &str, id: u64) {
        if reply.kind() != kind {
            self.fail(format!(
                "expected a `{kind}` for request {id}, got: {}",
                reply.header
            ));
        }
        if reply.id() != Some(id) {
            self.fail(format!(
                "the `{kind}` for request {id} carries the id {:?}: {}",
                reply.header.get("id"),
                reply.header
            ));
        }
    }

    /// Checks that `reply` is the `result` of request `id` and, normalised,
    /// equals `expected`.
    fn expect_result(&mut self, reply: &Reply, id: u64, expected: &Value) {
        self.expect_kind(reply, "result", id);
        let result = self.normalised_result(reply);
        if &result != expected {
            self.fail(format!(
                "the echo of request {id} is {result}, expected {expected}"
            ));
        }
    }

    /// A `result`'s value with its attachments put at their places as
    /// base64 strings (what the host does for JSON answers).
    fn normalised_result(&mut self, reply: &Reply) -> Value {
        let pointers: Vec<String> = match reply.header.get("attachments") {
            None => Vec::new(),
            Some(Value::Array(list)) if list.iter().all(Value::is_string) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(other) => self.fail(format!(
                "a result's `attachments` is not a list of JSON Pointers: {other}"
            )),
        };
        if pointers.len() != reply.attachments.len() {
            self.fail(format!(
                "a result names {} attachment places for {} attachments: {}",
                pointers.len(),
                reply.attachments.len(),
                reply.header
            ));
        }
        let Some(mut result) = reply.header.get("result").cloned() else {
            self.fail(format!("a result has no `result`: {}", reply.header));
        };
        for (pointer, bytes) in pointers.iter().zip(&reply.attachments) {
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            if let Err(e) = attach::place(&mut result, pointer, Value::String(text)) {
                self.fail(format!("a result's attachment cannot be placed: {e}"));
            }
        }
        result
    }

    /// Fails if the runner sends a frame or exits within `quiet`.
    fn expect_quiet(&mut self, quiet: Duration, when: &str) {
        match self.events.recv_timeout(quiet) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Event::Frame(raw)) => self.fail(format!(
                "{when}, the runner sent an unrequested frame: {:.300}",
                String::from_utf8_lossy(raw.get(4..).unwrap_or_default())
            )),
            Ok(Event::End | Event::Broken(_)) | Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                self.fail(format!("{when}, the runner closed its stdout"))
            }
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.fail(format!("{when}, the runner exited ({status})"));
        }
    }

    /// Polls for the runner's exit for up to `within`.
    fn wait_for_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits up to [`EXIT_TIMEOUT`] for the runner to exit; unless
    /// `answers_allowed`, it must not send anything meanwhile.
    fn wait_exit(&mut self, answers_allowed: bool, when: &str) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if !answers_allowed {
                self.expect_no_frame(when, Duration::ZERO);
            }
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => self.fail(format!("{when}: cannot wait for the runner: {e}")),
            }
            if Instant::now() >= deadline {
                self.fail(format!(
                    "{when}: the runner did not exit within {EXIT_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(10));
        };
        if !answers_allowed {
            // What it wrote before it exited may still be in the pipe.
            self.expect_no_frame(when, Duration::from_secs(1));
        }
        status
    }

    /// Fails on any frame (or partial frame) from the runner, waiting up to
    /// `within` for the end of its stdout.
    fn expect_no_frame(&mut self, when: &str, within: Duration) {
        if self.ended {
            return;
        }
        let event = if within.is_zero() {
            self.events.try_recv().map_err(|e| match e {
                TryRecvError::Empty => RecvTimeoutError::Timeout,
                TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.events.recv_timeout(within)
        };
        match event {
            Ok(Event::Frame(raw)) => self.fail(format!(
                "{when}, the runner answered instead of exiting: {:.300}",
                String::from_utf8_lossy(raw.get(4..).unwrap_or_default())
            )),
            Ok(Event::Broken(detail)) => self.fail(format!(
                "{when}, the runner wrote a partial frame: {detail}"
            )),
            Ok(Event::End) | Err(RecvTimeoutError::Disconnected) => self.ended = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }

    /// Waits for an exit with a non-zero code, without an answer.
    fn expect_failure_exit(&mut self, when: &str) {
        let status = self.wait_exit(false, when);
        if status.code().is_none_or(|code| code == 0) {
            self.fail(format!(
                "{when}, the runner exited with {status}: a protocol violation is a \
                 non-zero exit code"
            ));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.writer = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The writer thread: writes what is queued, in order; when the queue's
/// sender is dropped, drops (closes) the runner's stdin.
fn write_frames(mut stdin: ChildStdin, queue: &Receiver<Vec<u8>>, errors: &Mutex<Option<String>>) {
    for bytes in queue {
        if let Err(e) = stdin.write_all(&bytes).and_then(|()| stdin.flush()) {
            *errors.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            return;
        }
    }
}

/// The reader thread: reads frames by hand (`len:u32le` then `len` bytes)
/// and reports each, whole.
fn read_frames(mut stdout: impl Read, events: &Sender<Event>) {
    loop {
        let mut len = [0u8; 4];
        let event = match read_full(&mut stdout, &mut len) {
            Ok(0) => Event::End,
            Ok(4) => {
                let size = u32::from_le_bytes(len) as usize;
                if size > MAX_ANSWER_BYTES {
                    Event::Broken(format!(
                        "a frame announcing {size} bytes (over the suite's limit of \
                         {MAX_ANSWER_BYTES}; its first bytes: {len:02x?} = {:?})",
                        String::from_utf8_lossy(&len)
                    ))
                } else {
                    let mut frame = vec![0u8; 4 + size];
                    frame[..4].copy_from_slice(&len);
                    match read_full(&mut stdout, &mut frame[4..]) {
                        Ok(n) if n == size => Event::Frame(frame),
                        Ok(n) => Event::Broken(format!(
                            "the runner's stdout ended after {n} bytes of a {size}-byte frame"
                        )),
                        Err(e) => Event::Broken(format!("reading the runner's stdout: {e}")),
                    }
                }
            }
            Ok(n) => Event::Broken(format!(
                "the runner's stdout ended after {n} bytes of a frame's length"
            )),
            Err(e) => Event::Broken(format!("reading the runner's stdout: {e}")),
        };
        let last = !matches!(event, Event::Frame(_));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The stderr thread: keeps the last [`STDERR_TAIL`] bytes.
fn keep_tail(mut stderr: impl Read, kept: &Mutex<Vec<u8>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match stderr.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                kept.extend_from_slice(&chunk[..n]);
                let excess = kept.len().saturating_sub(STDERR_TAIL);
                kept.drain(..excess);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
