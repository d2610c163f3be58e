//! WebSocket streams (`GET /v1/plugins/{name}/tools/{tool}/stream`)
//! through the real binary, with a sync client: answers in frame order and
//! byte-exact in process, isolated and in Python; `latest` drops and counts,
//! `block` never drops; a client that reads no answers does not grow the
//! server; a crash (in process, isolated, a Python runner that exits)
//! closes with 1011 and the plugin restarts; refusals
//! before the upgrade, 1009 for an oversized frame, 1001 at shutdown.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use forgesyte_tests::zoo;
use serde_json::{Value, json};
use tungstenite::handshake::HandshakeError;
use tungstenite::{Message, WebSocket};

use crate::binary::wait_health;
use crate::python::{base64, frame, sha256};
use crate::rescan::{hangup, wait_for};
use crate::support::{Forgesyte, PluginsDir};

type Socket = WebSocket<TcpStream>;

/// Opens a stream, or the status and JSON body of the refusal.
fn try_open(addr: SocketAddr, target: &str) -> Result<Socket, (u16, Value)> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    match tungstenite::client::client(format!("ws://{addr}{target}"), stream) {
        Ok((socket, _)) => Ok(socket),
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("{target}: {e}"),
    }
}

fn open(server: &Forgesyte, target: &str) -> Socket {
    try_open(server.addr, target)
        .unwrap_or_else(|(status, body)| panic!("{target}: {status} {body}"))
}

fn send_frame(socket: &mut Socket, bytes: Vec<u8>) {
    socket.send(Message::Binary(bytes.into())).unwrap();
}

fn send_args(socket: &mut Socket, args: Value) {
    let text = json!({ "args": args }).to_string();
    socket.send(Message::text(text)).unwrap();
}

/// The next message; a blocking read with a timeout that a signal
/// interrupted is tried again (`EINTR`, seen on a loaded CI machine: unlike
/// std's `read_exact`, tungstenite hands it up).
fn read_message(socket: &mut Socket) -> tungstenite::Result<Message> {
    loop {
        match socket.read() {
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// The next answer (a JSON text message).
fn answer(socket: &mut Socket) -> Value {
    loop {
        match read_message(socket).unwrap() {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected an answer, got {other:?}"),
        }
    }
}

/// The code and reason of the server's close message (answers before it
/// are skipped).
fn close_of(socket: &mut Socket) -> (u16, String) {
    loop {
        match read_message(socket) {
            Ok(Message::Close(Some(frame))) => {
                return (frame.code.into(), frame.reason.to_string());
            }
            Ok(Message::Close(None)) => panic!("closed without a code"),
            Ok(_) => {}
            Err(e) => panic!("no close message: {e}"),
        }
    }
}

/// A stream opened once the server has room for it (503 until then), for
/// at most 15 s.
fn open_when_room(server: &Forgesyte, target: &str) -> Socket {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match try_open(server.addr, target) {
            Ok(socket) => return socket,
            Err((503, _)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((status, body)) => panic!("{status} {body}; log:\n{}", server.log()),
        }
    }
}

/// Answers until the one of frame `last`, in arrival order.
fn answers_until(socket: &mut Socket, last: u64) -> Vec<Value> {
    let mut answers = Vec::new();
    loop {
        let answer = answer(socket);
        let seq = answer["seq"].as_u64();
        answers.push(answer);
        if seq == Some(last) {
            return answers;
        }
    }
}

fn target(plugin: &str, tool: &str, query: &str) -> String {
    format!("/v1/plugins/{plugin}/tools/{tool}/stream{query}")
}

const FRAMES: usize = 100;

/// Frames sent ahead of the answers read.
const WINDOW: usize = 8;

#[test]
fn frames_are_answered_in_order_and_byte_exact_in_process_isolated_and_in_python() {
    let dir = PluginsDir::new();
    dir.good("native-in", json!({}));
    dir.good("native-iso", json!({"isolation": "process"}));
    dir.python("py", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    // Distinct sizes (7919 is prime to 70,000), the first one empty.
    let sizes: Vec<usize> = (0..FRAMES).map(|i| i * 7919 % 70_000).collect();
    for (plugin, tool) in [
        ("native-in", "frame"),
        ("native-iso", "frame"),
        ("py", "checksum"),
    ] {
        let mut socket = open(&server, &target(plugin, tool, "?policy=block&queue=8"));
        let mut answers = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            send_frame(&mut socket, frame(size));
            if i + 1 - answers.len() > WINDOW {
                answers.push(answer(&mut socket));
            }
        }
        while answers.len() < FRAMES {
            answers.push(answer(&mut socket));
        }
        for (i, answer) in answers.iter().enumerate() {
            assert_eq!(answer["seq"], i, "{plugin}: {answer}");
            assert_eq!(answer["ok"], true, "{plugin}: {answer}");
            assert_eq!(answer["dropped"], 0, "{plugin}: {answer}");
            assert!(
                answer["processing_time_ms"]
                    .as_f64()
                    .is_some_and(|ms| ms >= 0.0),
                "{answer}"
            );
            let data = frame(sizes[i]);
            let expected = if tool == "checksum" {
                json!({"len": sizes[i], "sha256": sha256(&data)})
            } else {
                json!({"data": base64(&data), "ms": 0})
            };
            assert_eq!(answer["result"], expected, "{plugin} frame {i}");
        }
        socket.close(None).unwrap();
        // The close handshake completes.
        while read_message(&mut socket).is_ok() {}
        // Every frame was a tool call, counted like one of the run route.
        let health = server.get(&format!("/v1/plugins/{plugin}/health")).json();
        assert_eq!(health["success_count"], FRAMES, "{health}");
        let metrics = server.get("/metrics").text();
        let line = format!(
            "forgesyte_tool_calls_total{{plugin=\"{plugin}\",tool=\"{tool}\",outcome=\"ok\"}} {FRAMES}"
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
        // And its bytes: each frame in, each answer out.
        let counted = |name: &str| -> u64 {
            let prefix = format!("forgesyte_{name}_bytes_total{{plugin=\"{plugin}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
        };
        assert_eq!(counted("tool_request"), sizes.iter().sum::<usize>() as u64);
        assert!(counted("tool_response") >= FRAMES as u64 * 20, "{metrics}");
    }
}

#[test]
fn latest_drops_frames_behind_a_slow_tool_and_counts_each_while_block_drops_none() {
    let dir = PluginsDir::new();
    dir.good("slow", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();

    // latest (the default): frames sent while one is in the plugin replace
    // each other; the last one is always answered.
    const SENT: u64 = 50;
    let mut socket = open(&server, &target("slow", "frame", ""));
    send_args(&mut socket, json!({"ms": 40}));
    for seq in 0..SENT {
        send_frame(&mut socket, frame(1000 + seq as usize));
    }
    let answers = answers_until(&mut socket, SENT - 1);
    let mut previous: Option<(u64, u64)> = None;
    for answer in &answers {
        let seq = answer["seq"].as_u64().unwrap();
        let dropped = answer["dropped"].as_u64().unwrap();
        if let Some((seq_before, dropped_before)) = previous {
            assert!(seq > seq_before, "seqs increase: {answers:?}");
            assert!(dropped >= dropped_before, "dropped never goes down");
        }
        previous = Some((seq, dropped));
        assert_eq!(answer["ok"], true, "{answer}");
        let data = frame(1000 + seq as usize);
        assert_eq!(answer["result"], json!({"data": base64(&data), "ms": 40}));
    }
    let dropped = answers.last().unwrap()["dropped"].as_u64().unwrap();
    assert_eq!(
        answers.len() as u64 + dropped,
        SENT,
        "sent = answered + dropped"
    );
    assert!(
        dropped > 0,
        "a 40 ms tool keeps up with nothing: {answers:?}"
    );
    assert_eq!(answers[0]["seq"], 0, "the first frame goes straight in");

    // block: every frame is answered, in order; nothing is dropped.
    let mut socket = open(&server, &target("slow", "frame", "?policy=block&queue=2"));
    send_args(&mut socket, json!({"ms": 10}));
    for seq in 0..30 {
        send_frame(&mut socket, frame(1000 + seq));
    }
    for seq in 0..30usize {
        let answer = answer(&mut socket);
        assert_eq!(
            (answer["seq"].as_u64(), answer["dropped"].as_u64()),
            (Some(seq as u64), Some(0))
        );
        let data = frame(1000 + seq);
        assert_eq!(answer["result"]["data"], base64(&data));
    }
}

/// The resident set size of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn a_client_that_reads_no_answers_never_grows_the_server() {
    const MIB: u64 = 1 << 20;
    let dir = PluginsDir::new();
    dir.good("frames", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let mut socket = open(&server, &target("frames", "frame", ""));
    send_args(&mut socket, json!({"ms": 5}));
    let chunk = frame(MIB as usize);
    // Warm up: the buffers a 1 MiB frame needs exist; answers pile up
    // unread in the socket.
    for _ in 0..16 {
        send_frame(&mut socket, chunk.clone());
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = rss(server.pid());
    const SENT_MIB: u64 = 200;
    for _ in 0..SENT_MIB {
        send_frame(&mut socket, chunk.clone());
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss(server.pid());
    eprintln!(
        "server RSS {} MiB before and {} MiB after {SENT_MIB} MiB of frames",
        before / MIB,
        after / MIB
    );
    assert!(
        after < before + 64 * MIB,
        "{SENT_MIB} MiB of frames to a client that reads nothing grew the server from {} to {} MiB",
        before / MIB,
        after / MIB
    );
    // Nothing was lost track of: the last frame is answered, and every
    // frame is answered or counted as dropped.
    let last = 16 + SENT_MIB - 1;
    let answers = answers_until(&mut socket, last);
    let dropped = answers.last().unwrap()["dropped"].as_u64().unwrap();
    assert_eq!(answers.len() as u64 + dropped, last + 1);
    assert!(dropped > 0);
}

#[test]
fn a_crash_mid_stream_closes_with_1011_and_the_plugin_restarts() {
    let dir = PluginsDir::new();
    dir.good("iso", json!({"isolation": "process"}))
        .good("inproc", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    // In process a panic is caught: 1011 too, and the plugin is FAILED.
    let mut socket = open(&server, &target("inproc", "frame", ""));
    send_args(&mut socket, json!({"panic": true}));
    send_frame(&mut socket, frame(10));
    assert_eq!(answer(&mut socket)["error_type"], "ToolPanic");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1011, "{reason}");
    let health = server.get("/v1/plugins/inproc/health").json();
    assert_eq!(health["state"], "FAILED", "{health}");

    // Isolated: the runner is restarted and streams again.
    let mut socket = open(&server, &target("iso", "frame", ""));
    send_frame(&mut socket, frame(10));
    assert_eq!(answer(&mut socket)["ok"], true);
    send_args(&mut socket, json!({"panic": true}));
    send_frame(&mut socket, frame(10));
    let failed = answer(&mut socket);
    assert_eq!(
        (failed["seq"].as_u64(), failed["ok"].as_bool()),
        (Some(1), Some(false)),
        "{failed}"
    );
    assert_eq!(failed["error_type"], "ToolPanic", "{failed}");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("ToolPanic"), "{reason}");
    assert!(reason.len() <= 123, "{reason}");

    let health = wait_health(&server, "iso", 20, |h| {
        h["state"] == "INITIALIZED" && h["restart_count"].as_u64() >= Some(1)
    });
    assert_eq!(health["restart_count"], 1, "{health}");
    let mut socket = open(&server, &target("iso", "frame", ""));
    send_frame(&mut socket, frame(5));
    let again = answer(&mut socket);
    assert_eq!(
        (again["seq"].as_u64(), again["ok"].as_bool()),
        (Some(0), Some(true)),
        "{again}"
    );
}

/// A rescan that removes the plugin closes its open stream at the next
/// frame, with 1001 and a reason naming the removal (it used to answer
/// every later frame with an error and stay open).
#[test]
fn a_stream_of_a_plugin_a_rescan_removed_closes_with_1001() {
    let dir = PluginsDir::new();
    dir.good("gone", json!({})).good("kept", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let mut socket = open(&server, &target("gone", "frame", ""));
    send_frame(&mut socket, frame(4));
    assert_eq!(answer(&mut socket)["ok"], true);

    std::fs::remove_dir_all(dir.path().join("gone")).unwrap();
    hangup(&server);
    wait_for("gone removed", Duration::from_secs(20), &server, || {
        (server.get("/v1/plugins/gone/health").status == 404).then_some(())
    });
    send_frame(&mut socket, frame(4));
    let last = answer(&mut socket);
    assert_eq!(last["error_type"], "PluginNotFound", "{last}");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1001, "{reason}");
    assert!(
        reason.starts_with("plugin removed: PluginNotFound: Plugin 'gone' not found"),
        "{reason}"
    );
    // The other plugin streams on.
    let mut socket = open(&server, &target("kept", "frame", ""));
    send_frame(&mut socket, frame(4));
    assert_eq!(answer(&mut socket)["ok"], true);
}

/// A reload that leaves the tool without exactly one binary argument closes
/// its open stream at the next frame with 1001 (every later frame would be
/// refused: it answered each so and stayed open).
#[test]
fn a_stream_whose_tool_a_reload_made_unstreamable_closes_with_1001() {
    let dir = PluginsDir::new();
    let tools = |data: Value| {
        json!({"tools": [{"id": "frame", "description": "Takes a frame.",
            "input_schema": {"type": "object", "properties": {"data": data}}}]})
    };
    dir.python("mt", "manifest_tools")
        .manifest_fields("mt", tools(json!({"type": "string", "format": "binary"})));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let mut socket = open(&server, &target("mt", "frame", ""));
    send_frame(&mut socket, frame(4));
    assert_eq!(answer(&mut socket)["ok"], true);

    dir.manifest_fields("mt", tools(json!({"type": "string"})));
    hangup(&server);
    wait_for("mt reloaded", Duration::from_secs(20), &server, || {
        let listed = server.get("/v1/plugins/mt/tools").json();
        (listed.to_string().contains("\"frame\"") && !listed.to_string().contains("binary"))
            .then_some(())
    });
    send_frame(&mut socket, frame(4));
    let refused = answer(&mut socket);
    assert_eq!(refused["error_type"], "InvalidBody", "{refused}");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1001, "{reason}");
    assert!(
        reason.starts_with("tool no longer streamable: it declares 0 binary arguments"),
        "{reason}"
    );
}

#[test]
fn a_python_runner_that_exits_mid_stream_closes_it_with_1011_and_restarts() {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let mut socket = open(&server, &target("py", "checksum", ""));
    send_frame(&mut socket, frame(100));
    let first = answer(&mut socket);
    assert_eq!(first["result"]["len"], 100, "{first}");
    // The runner's process exits in the middle of the second frame.
    send_args(&mut socket, json!({"exit": true}));
    send_frame(&mut socket, frame(100_000));
    let failed = answer(&mut socket);
    assert_eq!(
        (failed["seq"].as_u64(), failed["ok"].as_bool()),
        (Some(1), Some(false)),
        "{failed}"
    );
    assert_eq!(failed["error_type"], "CrashError", "{failed}");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("CrashError"), "{reason}");

    wait_health(&server, "py", 30, |h| {
        h["state"] == "INITIALIZED" && h["restart_count"].as_u64() >= Some(1)
    });
    let mut socket = open(&server, &target("py", "checksum", ""));
    let bytes = frame(70_000);
    let digest = sha256(&bytes);
    send_frame(&mut socket, bytes);
    let again = answer(&mut socket);
    assert_eq!(again["seq"], 0, "{again}");
    assert_eq!(again["result"]["sha256"], json!(digest), "{again}");
}

#[test]
fn refusals_before_the_upgrade_then_bad_text_oversized_frames_and_shutdown() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({})).zoo(zoo::ERR_INIT);
    let mut server = Forgesyte::start(&["--plugins", dir.path_str(), "--body-limit", "4096"]);
    server.wait_loaded();

    // Refused before the upgrade, with the run route's bodies.
    for (plugin, tool, query, status, error_type) in [
        ("nope", "frame", "", 404, Some("PluginNotFound")),
        ("alpha", "nope", "", 404, Some("UnknownTool")),
        ("alpha", "echo", "", 422, Some("NotStreamable")),
        (
            zoo::ERR_INIT_NAME,
            "frame",
            "",
            503,
            Some("PluginNotRunnable"),
        ),
        ("alpha", "frame", "?policy=sometimes", 400, None),
        ("alpha", "frame", "?policy=block&queue=65", 400, None),
        ("alpha", "frame", "?size=2", 400, None),
    ] {
        let target = target(plugin, tool, query);
        let Err((got, body)) = try_open(server.addr, &target) else {
            panic!("{target} was upgraded");
        };
        assert_eq!(got, status, "{target}: {body}");
        match error_type {
            Some(kind) => assert_eq!(body["error_type"], kind, "{target}: {body}"),
            None => assert!(body["detail"].is_string(), "{target}: {body}"),
        }
    }
    // A key that is not 16 bytes in base64 is refused (RFC 6455 §4.2.1).
    let bad_key = crate::support::http_with(
        server.addr,
        "GET",
        &target("alpha", "frame", ""),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "not-a-key"),
        ],
        b"",
    );
    assert_eq!(bad_key.status, 400, "{}", bad_key.text());
    assert!(
        bad_key.text().contains("Sec-WebSocket-Key"),
        "{}",
        bad_key.text()
    );
    // Each of the key and the version at most once (RFC 6455 §11.3.1,
    // §11.3.5): a second key was ignored, the accept made of the first.
    for (name, second) in [
        ("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ("Sec-WebSocket-Version", "8"),
    ] {
        let twice = crate::support::http_with(
            server.addr,
            "GET",
            &target("alpha", "frame", ""),
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                (name, second),
            ],
            b"",
        );
        assert_eq!(twice.status, 400, "{name}: {}", twice.text());
        assert!(
            twice.text().contains(&format!("more than one {name}")),
            "{}",
            twice.text()
        );
    }
    // HEAD answers as GET without the upgrade does (400), never a 405
    // without `Allow`; a plain GET is the reference.
    let get =
        crate::support::http_with(server.addr, "GET", &target("alpha", "frame", ""), &[], b"");
    let head =
        crate::support::http_with(server.addr, "HEAD", &target("alpha", "frame", ""), &[], b"");
    assert_eq!((get.status, head.status), (400, 400), "{}", get.text());
    // An upgrade request with a body is refused: the body would be read
    // as the stream's first frames, or leave the stream deaf.
    let with_body = crate::support::http_with(
        server.addr,
        "GET",
        &target("alpha", "frame", ""),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"hello",
    );
    assert_eq!(with_body.status, 400, "{}", with_body.text());
    assert!(with_body.text().contains("no body"), "{}", with_body.text());
    {
        use std::io::{Read as _, Write as _};
        let mut raw = TcpStream::connect(server.addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            target("alpha", "frame", ""),
            server.addr
        );
        raw.write_all(request.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        raw.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 400", "{}", String::from_utf8_lossy(&head));
    }
    // Another version is answered 426 with the one the server speaks
    // (RFC 6455 §4.2.2).
    let old_version = crate::support::http_with(
        server.addr,
        "GET",
        &target("alpha", "frame", ""),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "8"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    );
    assert_eq!(old_version.status, 426, "{}", old_version.text());
    assert_eq!(
        old_version.header("sec-websocket-version"),
        Some("13"),
        "{:?}",
        old_version.headers
    );
    // A plain GET (no upgrade) is refused too, in JSON.
    let plain = server.get(&target("alpha", "frame", ""));
    assert_eq!(plain.status, 400, "{}", plain.text());
    assert!(plain.json()["detail"].is_string(), "{}", plain.text());

    // A malformed text message is answered without a seq, with the run
    // route's error type for such a body; the stream goes on.
    let mut socket = open(&server, &target("alpha", "frame", ""));
    for (text, error_type) in [("not json", "MalformedBody"), ("[1]", "InvalidBody")] {
        socket.send(Message::text(text)).unwrap();
        let refused = answer(&mut socket);
        assert_eq!(
            (refused["ok"].as_bool(), refused["error_type"].as_str()),
            (Some(false), Some(error_type)),
            "{refused}"
        );
        assert!(refused.get("seq").is_none(), "{refused}");
    }
    send_frame(&mut socket, frame(100));
    let ok = answer(&mut socket);
    assert_eq!(
        (ok["seq"].as_u64(), ok["ok"].as_bool()),
        (Some(0), Some(true)),
        "{ok}"
    );
    // A frame over the body limit closes the stream with 1009.
    send_frame(&mut socket, frame(5000));
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1009, "{reason}");
    // A 64-bit length with its most significant bit set is no length
    // (RFC 6455 §5.2): 1002, not 1009; so is a frame the client did not
    // mask. Written by hand (no client sends either): a masked binary
    // frame's header and its mask; an unmasked frame of one byte.
    let mut top_bit = vec![0x82, 0x80 | 127];
    top_bit.extend_from_slice(&(1u64 << 63 | 16).to_be_bytes());
    top_bit.extend_from_slice(&[1, 2, 3, 4]);
    let mut cases = vec![(vec![0x82, 0x01, 0x00], "protocol error")];
    // On 32-bit targets the WebSocket layer cuts the length to its low
    // bits before it looks at it: a frame of 16 bytes there.
    if cfg!(target_pointer_width = "64") {
        cases.push((top_bit, "most significant bit"));
    }
    for (bytes, said) in cases {
        let mut socket = open(&server, &target("alpha", "frame", ""));
        std::io::Write::write_all(socket.get_mut(), &bytes).unwrap();
        let (code, reason) = close_of(&mut socket);
        assert_eq!(code, 1002, "{said}: {reason}");
        assert!(reason.contains(said), "{reason}");
    }

    // A text message that is not UTF-8 closes it with 1007, and so does a
    // close frame whose reason is not (said as such); a reserved opcode
    // with 1002 (not a dropped connection).
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tungstenite::protocol::frame::{Frame, FrameHeader};
    for (opcode, payload, expected, said) in [
        (
            OpCode::Data(Data::Text),
            &[0xff, 0xfe][..],
            1007,
            "a text message",
        ),
        (
            OpCode::Control(Control::Close),
            &[0x03, 0xe8, 0xff][..],
            1007,
            "a close frame's reason",
        ),
        (OpCode::Data(Data::Reserved(3)), &[0xff, 0xfe][..], 1002, ""),
    ] {
        let mut socket = open(&server, &target("alpha", "frame", ""));
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let bad = Frame::from_payload(header, payload.to_vec().into());
        socket.send(Message::Frame(bad)).unwrap();
        let (code, reason) = close_of(&mut socket);
        assert_eq!(code, expected, "{opcode:?}: {reason}");
        assert!(reason.contains(said), "{opcode:?}: {reason}");
    }

    // A shutdown closes open streams with 1001, and the server exits 0;
    // a frame in its call then (2.5 s) is answered first, within the
    // shutdown's grace, as a run route's request is (it was dropped after
    // a second, unanswered).
    let mut socket = open(&server, &target("alpha", "frame", ""));
    send_frame(&mut socket, frame(1));
    assert_eq!(answer(&mut socket)["ok"], true);
    send_args(&mut socket, json!({"ms": 2500}));
    send_frame(&mut socket, frame(1));
    std::thread::sleep(Duration::from_millis(300));
    let status = server.terminate();
    assert!(status.success(), "{status:?}; log:\n{}", server.log());
    let last = answer(&mut socket);
    assert_eq!(
        (last["seq"].as_u64(), &last["ok"]),
        (Some(1), &json!(true)),
        "{last}"
    );
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1001, "{reason}");
}

/// At a shutdown an idle stream is closed with 1001 at once, in process
/// and isolated: it does not wait for a call in flight on another stream,
/// which is answered first and then closed the same way.
#[test]
fn at_shutdown_an_idle_stream_closes_at_once_beside_a_busy_one() {
    for isolation in ["in-process", "process"] {
        let dir = PluginsDir::new();
        dir.good("alpha", json!({ "isolation": isolation }));
        let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
        server.wait_loaded();
        let mut busy = open(&server, &target("alpha", "frame", ""));
        let mut idle = open(&server, &target("alpha", "frame", ""));
        send_args(&mut busy, json!({"ms": 4000}));
        send_frame(&mut busy, frame(1));
        std::thread::sleep(Duration::from_millis(300));
        crate::support::signal(&server.pid().to_string(), "-TERM");
        let asked = std::time::Instant::now();
        let (code, reason) = close_of(&mut idle);
        let took = asked.elapsed();
        assert_eq!(code, 1001, "{isolation}: {reason}");
        assert!(
            took < Duration::from_millis(2500),
            "{isolation}: the idle stream closed {took:?} after SIGTERM, behind the busy one's call; log:\n{}",
            server.log()
        );
        let last = answer(&mut busy);
        assert_eq!(last["ok"], true, "{isolation}: {last}");
        let (code, reason) = close_of(&mut busy);
        assert_eq!(code, 1001, "{isolation}: {reason}");
        let status = server.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "{isolation}: {status:?}; log:\n{}",
            server.log()
        );
    }
}

/// At a shutdown a stream whose client never replies to the 1001 close
/// (it reads nothing) holds the stop about a second, not the five a
/// closed stream otherwise waits for its client's reply.
#[test]
fn a_client_that_never_replies_to_the_shutdown_close_holds_the_stop_a_second() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let socket = open(&server, &target("alpha", "frame", ""));
    let asked = std::time::Instant::now();
    crate::support::signal(&server.pid().to_string(), "-TERM");
    let status = server.wait_exit(Duration::from_secs(20));
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}; log:\n{}", server.log());
    assert!(
        took < Duration::from_millis(3500),
        "the stop took {took:?} for a client that never replied; log:\n{}",
        server.log()
    );
    drop(socket);
}

/// A frame of an isolated plugin still in its call when the shutdown grace
/// ends is cut off: its stream gets the frame's error (503's "send it
/// again") and then the 1001 close, not a connection dropped mid-call.
#[test]
fn a_frame_the_shutdown_grace_cuts_off_gets_its_error_then_1001() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({ "isolation": "process" }));
    let mut server = Forgesyte::start(&["--plugins", dir.path_str(), "--shutdown-grace", "1"]);
    server.wait_loaded();
    let mut socket = open(&server, &target("alpha", "frame", ""));
    send_args(&mut socket, json!({"ms": 20_000}));
    send_frame(&mut socket, frame(1));
    std::thread::sleep(Duration::from_millis(300));
    crate::support::signal(&server.pid().to_string(), "-TERM");
    let last = answer(&mut socket);
    assert_eq!(last["ok"], false, "{last}");
    assert!(last.to_string().contains("send it again"), "{last}");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1001, "{reason}");
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}; log:\n{}", server.log());
}

/// A server of `alpha` whose bodies and frames may be 4 KiB (the directory
/// first: the server is dropped before it).
fn alpha_with_a_4_kib_body_limit() -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--body-limit", "4096"]);
    server.wait_loaded();
    (dir, server)
}

/// A client sending a message far over the body limit writes all of it and
/// then reads the 1009 close: the server reads the rest of the message and
/// drops it (its WebSocket layer gave up on the stream at the message's
/// head). Dropping the connection with the rest unread had the kernel
/// answer with a reset: the client's write failed, and the close was lost.
#[test]
fn a_message_far_over_the_limit_is_read_to_its_end_and_answered_1009() {
    let (_dir, server) = alpha_with_a_4_kib_body_limit();
    // More than the connection's socket buffers hold on loopback.
    let big = vec![7u8; 32 << 20];
    for message in [
        Message::Binary(big.clone().into()),
        Message::text(String::from_utf8(big).unwrap()),
    ] {
        let mut socket = open(&server, &target("alpha", "frame", ""));
        socket
            .get_ref()
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let kind = if message.is_binary() {
            "binary"
        } else {
            "text"
        };
        if let Err(e) = socket.send(message) {
            panic!("{kind}: the client could not send its message: {e}");
        }
        let (code, reason) = close_of(&mut socket);
        assert_eq!(code, 1009, "{kind}: {reason}");
    }
}

/// A client that sends what never becomes a message (a message of empty
/// fragments without end) is closed with 1009 once its stream holds more
/// than twice the body limit and the read ahead: one stream cannot fill the
/// body memory so.
#[test]
fn endless_empty_fragments_close_the_stream_with_1009() {
    use std::io::Write as _;
    let (_dir, server) = alpha_with_a_4_kib_body_limit();
    let mut socket = open(&server, &target("alpha", "frame", ""));
    socket
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // An empty first fragment, then 30,000 empty continuations of 6 bytes
    // each (180 KB; twice the limit and the read ahead is 137 KiB).
    let mut bytes = vec![0x02, 0x80, 0, 0, 0, 0];
    for _ in 0..30_000 {
        bytes.extend_from_slice(&[0x00, 0x80, 0, 0, 0, 0]);
    }
    socket.get_mut().write_all(&bytes).unwrap();
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("without finishing a message"), "{reason}");
}

/// A server of `alpha` with room for one connection, whose streams idle
/// out after 1 s (the directory first: the server is dropped before it).
fn one_slot_server() -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--max-connections",
        "1",
        "--stream-idle-timeout",
        "1",
    ]);
    server.wait_loaded();
    (dir, server)
}

/// Another stream gets the one slot (once a stuck stream's is free: it may
/// also still be held by the readiness probe's connection for a moment)
/// and is answered.
fn the_slot_serves_another_stream(server: &Forgesyte, context: &str) {
    let mut next = open_when_room(server, &target("alpha", "echo_bytes", ""));
    send_frame(&mut next, frame(3));
    assert_eq!(answer(&mut next)["ok"], true, "{context}");
}

#[test]
fn a_client_that_stops_reading_is_let_go_at_the_idle_timeout() {
    // Its answers fill the socket; nothing moves for the idle timeout: the
    // stream ends and its slot is free again (it was held until the client
    // went).
    let (_dir, server) = one_slot_server();
    let target = target("alpha", "echo_bytes", "");
    // The first stream waits for room too (the readiness probe's).
    let mut stuck = open_when_room(&server, &target);
    for _ in 0..24 {
        // On a loaded machine the idle timeout can end the stream before
        // the client has sent them all: then a send fails.
        if stuck.send(Message::Binary(frame(1 << 20).into())).is_err() {
            break;
        }
    }
    the_slot_serves_another_stream(&server, &target);
    drop(stuck);
}

#[test]
fn a_client_that_sends_but_never_reads_is_let_go_at_the_idle_timeout() {
    // Two waits of the stream's reader end at the idle timeout too: room in
    // the queue under `block` (the worker cannot hand its answer to a
    // client that reads nothing), and room for the answers to malformed
    // text messages; and so does the writer's wait for the client to take
    // an answer. Each held the stream, and its slot, for good.
    let (_dir, server) = one_slot_server();
    let floods = [
        (
            target("alpha", "echo_bytes", "?policy=block&queue=1"),
            Message::Binary(frame(1 << 20).into()),
        ),
        (
            target("alpha", "echo_bytes", ""),
            Message::text("{not json"),
        ),
        // Under `latest` frames never wait: the reader reads on, and the
        // writer's wait for the client to take an answer is what ends.
        (
            target("alpha", "echo_bytes", ""),
            Message::Binary(frame(1 << 20).into()),
        ),
    ];
    for (flooded, message) in floods {
        let mut stuck = open_when_room(&server, &flooded);
        // Sends until the server lets the connection go (a send fails).
        let flood = std::thread::spawn(move || {
            for _ in 0..1_000_000 {
                if stuck.send(message.clone()).is_err() {
                    return;
                }
            }
        });
        the_slot_serves_another_stream(&server, &flooded);
        flood.join().unwrap();
    }
}

#[test]
fn streams_beyond_the_cap_are_refused_until_one_closes() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--max-connections", "2"]);
    server.wait_loaded();
    let target = target("alpha", "frame", "");
    let mut open_streams: Vec<Socket> = (0..2).map(|_| open(&server, &target)).collect();
    for socket in &mut open_streams {
        send_frame(socket, frame(3));
        assert_eq!(answer(socket)["ok"], true);
    }
    // The upgraded connections left the connection cap; the streams' cap
    // refuses a third.
    let Err((status, body)) = try_open(server.addr, &target) else {
        panic!("a third stream was opened");
    };
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("streams"),
        "{body}"
    );
    // One closes: room for another (its close ends the session shortly).
    let mut first = open_streams.remove(0);
    first.close(None).unwrap();
    while read_message(&mut first).is_ok() {}
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut third = loop {
        match try_open(server.addr, &target) {
            Ok(socket) => break socket,
            Err((503, _)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((status, body)) => panic!("{status} {body}"),
        }
    };
    send_frame(&mut third, frame(4));
    assert_eq!(answer(&mut third)["seq"], 0);
}

#[test]
fn an_idle_stream_is_closed_with_1000_and_a_busy_one_stays_open() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    dir.good("slow", json!({}));
    // 2 s: a loaded machine's stall between two frames 0.4 s apart must
    // not pass for idleness.
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--stream-idle-timeout", "2"]);
    server.wait_loaded();

    // Nothing sent, nothing answered: closed after about two seconds.
    let started = std::time::Instant::now();
    let mut idle = open(&server, &target("alpha", "frame", ""));
    let (code, reason) = close_of(&mut idle);
    let waited = started.elapsed();
    assert_eq!(code, 1000, "{reason}");
    assert!(reason.starts_with("idle"), "{reason}");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(12),
        "closed after {waited:?}"
    );

    // Pings are no activity: a client that only pings (as one holding a
    // half-sent message would) is closed all the same.
    let started = std::time::Instant::now();
    let mut pinging = open(&server, &target("alpha", "frame", ""));
    let closed = loop {
        if pinging.send(Message::Ping(vec![1; 8].into())).is_err() {
            break None;
        }
        match read_message(&mut pinging) {
            Ok(Message::Close(frame)) => {
                break frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            Ok(_) => {}
            Err(_) => break None,
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "pings kept the stream open"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let (code, reason) = closed.expect("a close frame");
    assert_eq!(code, 1000, "{reason}");
    assert!(reason.starts_with("idle"), "{reason}");

    // A frame every 0.4 s for 4.8 s keeps a stream open; so does a frame
    // in the plugin for longer than the timeout (its stream waits on it).
    let mut slow = open(&server, &target("slow", "frame", ""));
    send_args(&mut slow, json!({"ms": 3600}));
    send_frame(&mut slow, frame(5));
    let mut busy = open(&server, &target("alpha", "frame", ""));
    for n in 0..12 {
        send_frame(&mut busy, frame(10 + n));
        assert_eq!(answer(&mut busy)["ok"], true);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(answer(&mut slow)["ok"], true, "answered after 3.6 s");
    send_frame(&mut busy, frame(20));
    assert_eq!(answer(&mut busy)["ok"], true, "still open after 4.8 s");
    // The slow one, answered and then left alone, is closed in turn.
    assert_eq!(close_of(&mut slow).0, 1000);
}

/// A server with plugin `alpha` whose bodies and frames share 1 MiB in all
/// (`--body-memory`), and may each be 1 MiB (`--body-limit`).
fn alpha_with_one_mib_of_body_memory() -> (PluginsDir, Forgesyte) {
    alpha_with_body_memory(1 << 20)
}

/// A server with plugin `alpha` whose bodies and frames share `bytes` in
/// all (`--body-memory`), and may each be as large (`--body-limit`).
/// Below 128 KiB a message leaves nothing of its own in the stream's read
/// buffer (which keeps room for the largest message beyond that).
fn alpha_with_body_memory(bytes: usize) -> (PluginsDir, Forgesyte) {
    alpha_with_bodies_of(bytes, bytes)
}

/// A server with plugin `alpha` whose bodies and frames may each be
/// `limit` bytes (`--body-limit`), sharing `memory` in all
/// (`--body-memory`).
fn alpha_with_bodies_of(limit: usize, memory: usize) -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let (limit, memory) = (limit.to_string(), memory.to_string());
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--body-limit",
        &limit,
        "--body-memory",
        &memory,
    ]);
    server.wait_loaded();
    (dir, server)
}

#[test]
fn stream_frames_share_the_body_memory_and_one_without_room_is_answered_busy() {
    let (_dir, server) = alpha_with_one_mib_of_body_memory();
    let mut socket = open(&server, &target("alpha", "frame", "?policy=block&queue=4"));
    // The first frame holds 600 KiB of the 1 MiB while its call lasts: the
    // next two find no room, and are answered at their turn without a call.
    send_args(&mut socket, json!({"ms": 1500}));
    for _ in 0..3 {
        send_frame(&mut socket, frame(600 << 10));
    }
    let answers = answers_until(&mut socket, 2);
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    for busy in &answers[1..] {
        assert_eq!(busy["ok"], false, "{busy}");
        assert_eq!(busy["error_type"], "ServerBusy", "{busy}");
        assert_eq!(busy["dropped"], 0, "{busy}");
    }
    // The room came back with the call: the next frame runs.
    send_args(&mut socket, json!({}));
    send_frame(&mut socket, frame(600 << 10));
    let next = answer(&mut socket);
    assert_eq!(
        (next["seq"].as_u64(), &next["ok"]),
        (Some(3), &json!(true)),
        "{next}"
    );
    let health = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(
        health["success_count"], 2,
        "busy frames are no calls: {health}"
    );
    // Counted as refused calls, as the run route's are.
    let metrics = server.get("/metrics").text();
    let line = r#"forgesyte_tool_calls_total{plugin="alpha",tool="frame",outcome="rejected"} 2"#;
    assert!(metrics.contains(line), "no {line} in\n{metrics}");
}

/// The head of a binary frame of `len` bytes from a client (masked, with
/// a zero key: the payload goes as it is).
fn frame_head(len: u64) -> Vec<u8> {
    fragment_head(len, true)
}

/// A client's ping (masked, empty).
const PING: [u8; 6] = [0x89, 0x80, 0, 0, 0, 0];

/// A run of alpha's `frame` tool with `bytes` bytes as its
/// `application/octet-stream` body (the run route, beside the streams).
fn run_frame(server: &Forgesyte, bytes: usize) -> crate::support::Reply {
    crate::support::http_with(
        server.addr,
        "POST",
        "/v1/plugins/alpha/tools/frame/run",
        &[("Content-Type", "application/octet-stream")],
        &frame(bytes),
    )
}

/// [`frame_head`], of the first fragment of a message unless `fin`.
fn fragment_head(len: u64, fin: bool) -> Vec<u8> {
    let mut head = vec![if fin { 0x82 } else { 0x02 }, 0x80 | 127];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&[0; 4]);
    head
}

/// A frame takes room in `--body-memory` from its first byte: a client's
/// half-sent frames hold the budget (a tool call finds none), and a stream
/// whose frame finds no room, in the budget or in the reserve beside it
/// (one body at the limit), is closed with 1013 and what it sends dropped.
/// A frame that arrives whole in the reserve is answered `ServerBusy`.
#[test]
fn a_half_sent_frame_holds_its_room_and_one_without_room_closes_with_1013() {
    use std::io::Write as _;
    let (_dir, server) = alpha_with_one_mib_of_body_memory();
    let stream = target("alpha", "frame", "");
    let half = |socket: &mut Socket| {
        let raw = socket.get_mut();
        raw.write_all(&frame_head(1 << 20)).unwrap();
        raw.write_all(&frame(900 << 10)).unwrap();
    };
    let call = || run_frame(&server, 200 << 10);
    let mut a = open(&server, &stream);
    half(&mut a);
    // Once the server has read them, A's 900 KiB hold the budget's room.
    // Read while a call's body holds 200 KiB of it, the rest of them would
    // take the arrival reserve's room instead, and calls would find the
    // budget free from then on (failed once so on a loaded CI machine): no
    // call until the server has surely read them all (a local socket).
    std::thread::sleep(Duration::from_secs(1));
    wait_for(
        "a call refused for want of room",
        Duration::from_secs(15),
        &server,
        || {
            let answer = call();
            (answer.status == 503 && answer.text().contains("ServerBusy")).then_some(())
        },
    );
    // Two more half-sent frames: one fits in the rest of the budget and the
    // reserve, the other finds no room (whichever the server reads last).
    let mut others = [open(&server, &stream), open(&server, &stream)];
    for socket in &mut others {
        half(socket);
        socket
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
    }
    let mut closed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while closed.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "neither stream was closed; log:\n{}",
            server.log()
        );
        for (i, socket) in others.iter_mut().enumerate() {
            match read_message(socket) {
                Ok(Message::Close(Some(frame))) => {
                    closed.push((i, u16::from(frame.code), frame.reason.to_string()))
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("stream {i}: {other:?}; log:\n{}", server.log()),
            }
        }
    }
    assert_eq!(closed.len(), 1, "{closed:?}");
    let (refused, code, reason) = closed.remove(0);
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("no room"), "{reason}");
    let [first, second] = others;
    let (survivor, gone) = if refused == 0 {
        (second, first)
    } else {
        (first, second)
    };
    // The refused stream holds what it took of the reserve until it ends.
    drop(gone);
    wait_for(
        "the refused stream's end",
        Duration::from_secs(15),
        &server,
        || server.log().contains("Stream closed").then_some(()),
    );
    // A's frame ends: its last bytes come from the reserve, and the frame
    // is answered busy (the budget is full), its stream open.
    a.get_mut()
        .write_all(&frame((1 << 20) - (900 << 10)))
        .unwrap();
    let busy = answer(&mut a);
    assert_eq!(
        (busy["seq"].as_u64(), busy["error_type"].as_str()),
        (Some(0), Some("ServerBusy")),
        "{busy}"
    );
    // The other half-sent frame's stream goes: its room comes back.
    drop(survivor);
    send_frame(&mut a, frame(300 << 10));
    let next = answer(&mut a);
    assert_eq!(
        (next["seq"].as_u64(), &next["ok"]),
        (Some(1), &json!(true)),
        "{next}"
    );
    // A's read buffer keeps what its 1 MiB frame made it (896 KiB past its
    // first 128 KiB) while the stream is open, and that room with it: the
    // call still finds too little. A's end gives it back.
    let kept = call();
    assert_eq!(kept.status, 503, "{}", kept.text());
    drop(a);
    wait_for(
        "a call with room again",
        Duration::from_secs(15),
        &server,
        || (call().status == 200).then_some(()),
    );
}

/// What a stream's read buffer keeps of its largest frame (tungstenite's
/// buffer never shrinks) holds room in `--body-memory` until the stream
/// ends: streams that each received one frame at the limit and stay open
/// hold no more than the budget, and one that finds no room is closed with
/// 1013 (their memory was held outside every budget: 218 MiB
/// for twelve streams of 16 MiB frames).
#[test]
fn what_read_buffers_keep_of_large_frames_is_bounded_by_the_budget() {
    let (_dir, server) = alpha_with_bodies_of(1 << 20, 2 << 20);
    let mut open_streams = Vec::new();
    let mut closed = None;
    for i in 0..4 {
        let mut socket = open(&server, &target("alpha", "frame", ""));
        send_frame(&mut socket, frame(1 << 20));
        let answer = answer(&mut socket);
        if answer["ok"] == true {
            open_streams.push(socket);
            continue;
        }
        assert_eq!(answer["error_type"], "ServerBusy", "stream {i}: {answer}");
        let (code, reason) = close_of(&mut socket);
        closed = Some((i, code, reason));
        break;
    }
    // 896 KiB kept each: two in the budget; the third frame arrives
    // (partly in the reserve), is answered busy, and then its stream's
    // buffer finds no room.
    let Some((i, code, reason)) = closed else {
        panic!("four streams kept 1 MiB frames' buffers in 2 MiB");
    };
    assert_eq!((i, code), (2, 1013), "{reason}");
    assert!(reason.contains("no room"), "{reason}");
    // Their end gives the room back.
    drop(open_streams);
    wait_for(
        "a call with room again",
        Duration::from_secs(15),
        &server,
        || (run_frame(&server, 1 << 20).status == 200).then_some(()),
    );
}

/// What a stream's read buffer keeps of a large frame holds its room from
/// when that frame is done, even while a later frame is still in use:
/// streams that each kept a small frame in use after a large one held
/// their buffers charged to nothing (588 MiB in a budget of 64 MiB for
/// twenty streams of 30 MB frames), and none was closed. The third stream
/// here finds no room: its frame is answered busy, then 1013.
#[test]
fn a_buffer_kept_while_a_later_frame_is_in_use_takes_its_room_at_once() {
    let (_dir, server) = alpha_with_bodies_of(1 << 20, 2 << 20);
    let query = "?policy=block&queue=4";
    let mut open_streams = Vec::new();
    let mut closed = None;
    for i in 0..4 {
        let mut socket = open(&server, &target("alpha", "frame", query));
        // The large frame waits behind a short call, and a long one waits
        // behind it: when it is done, a frame is still in use.
        send_args(&mut socket, json!({"ms": 300}));
        send_frame(&mut socket, frame(16));
        send_args(&mut socket, json!({}));
        send_frame(&mut socket, frame(1 << 20));
        send_args(&mut socket, json!({"ms": 6000}));
        send_frame(&mut socket, frame(16));
        // The large frame's answer; a stream closed meanwhile may discard
        // the first one's (its call was in flight).
        let large = loop {
            match read_message(&mut socket) {
                Ok(Message::Text(text)) => {
                    let answer: Value = serde_json::from_str(text.as_str()).unwrap();
                    if answer["seq"] == 1 {
                        break Some(answer);
                    }
                    assert_eq!(answer["ok"], true, "stream {i}: {answer}");
                }
                Ok(Message::Close(Some(frame))) => {
                    closed = Some((i, u16::from(frame.code), frame.reason.to_string()));
                    break None;
                }
                other => panic!("stream {i}: {other:?}"),
            }
        };
        let Some(large) = large else { break };
        if large["ok"] == true {
            open_streams.push(socket);
            continue;
        }
        assert_eq!(large["error_type"], "ServerBusy", "stream {i}: {large}");
        let (code, reason) = close_of(&mut socket);
        closed = Some((i, code, reason));
        break;
    }
    // 896 KiB kept each (the small frames in use notwithstanding): two in
    // the budget; the third stream's buffer finds no room.
    let Some((i, code, reason)) = closed else {
        panic!(
            "four streams kept 1 MiB frames' buffers in 2 MiB; log:\n{}",
            server.log()
        );
    };
    assert_eq!((i, code), (2, 1013), "{reason}");
    assert!(reason.contains("no room"), "{reason}");
}

/// A ping between the fragments of a message does not give back the room
/// of what came of it so far: the WebSocket layer still holds it.
#[test]
fn a_ping_between_fragments_keeps_the_room_of_the_message_so_far() {
    use std::io::Write as _;
    let (_dir, server) = alpha_with_one_mib_of_body_memory();
    let mut socket = open(&server, &target("alpha", "frame", ""));
    let raw = socket.get_mut();
    raw.write_all(&fragment_head(900 << 10, false)).unwrap();
    raw.write_all(&frame(900 << 10)).unwrap();
    raw.write_all(&PING).unwrap();
    let call = || run_frame(&server, 200 << 10);
    // The pong says the ping was read, after the fragment.
    assert!(matches!(read_message(&mut socket), Ok(Message::Pong(_))));
    let answer = call();
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(answer.text().contains("ServerBusy"), "{}", answer.text());
}

/// Pongs a client sends unasked take no room once read (the WebSocket
/// layer drops them): 1.5 MiB of them leave a 1 MiB budget free.
#[test]
fn unasked_pongs_take_no_room() {
    use std::io::Write as _;
    let (_dir, server) = alpha_with_one_mib_of_body_memory();
    let mut socket = open(&server, &target("alpha", "frame", ""));
    let mut pong = vec![0x8A, 0x80 | 125, 0, 0, 0, 0];
    pong.extend_from_slice(&[b'p'; 125]);
    let pongs: Vec<u8> = pong.repeat((3 << 19) / 131);
    socket.get_mut().write_all(&pongs).unwrap();
    // The pong to a ping after them says every pong before it was read.
    socket.get_mut().write_all(&PING).unwrap();
    assert!(matches!(read_message(&mut socket), Ok(Message::Pong(_))));
    let call = run_frame(&server, 900 << 10);
    assert_eq!(call.status, 200, "{}", call.text());
}

/// A text message's arguments take room for what they hold parsed, not for
/// their text: 6,000 numbers are 12 KB of text and some 750 KiB parsed, so
/// with them in force a 400 KiB frame finds no room in 1 MiB.
#[test]
fn stream_arguments_take_room_for_what_they_hold_parsed() {
    // Bodies of 256 KiB, 256 KiB in all.
    let (_dir, server) = alpha_with_body_memory(256 << 10);
    let mut socket = open(&server, &target("alpha", "frame", ""));
    // 1,500 values hold 190 KiB parsed: a frame of 100 KiB finds no room.
    send_args(&mut socket, json!({"a": vec![0; 1_500]}));
    send_frame(&mut socket, frame(100 << 10));
    let busy = answer(&mut socket);
    assert_eq!(
        (&busy["ok"], &busy["error_type"]),
        (&json!(false), &json!("ServerBusy")),
        "{}",
        busy["detail"]
    );
    // More values than a body may hold is too large, not busy: no retry
    // would help (the arguments in force stay).
    // (At least 4,096 values may be sent, whatever the body limit.)
    send_args(&mut socket, json!({"a": vec![0; 5_000]}));
    let refused = answer(&mut socket);
    assert_eq!(refused["error_type"], "PayloadTooLarge", "{refused}");
    // Replaced by small ones, their room is back.
    send_args(&mut socket, json!({}));
    send_frame(&mut socket, frame(100 << 10));
    let next = answer(&mut socket);
    assert_eq!(next["ok"], true, "{}", next["detail"]);
    // Arguments of 140 KiB replaced by others of 140 KiB: the new ones
    // take the old ones' room (256 KiB holds no two), and a frame of 75
    // KiB still fits beside them (and the 13 KiB the read buffer keeps of
    // a message past 128 KiB).
    let big = "x".repeat(140 << 10);
    send_args(&mut socket, json!({"s": big}));
    send_args(&mut socket, json!({"s": big}));
    send_frame(&mut socket, frame(75 << 10));
    let next = answer(&mut socket);
    assert_eq!(
        (&next["seq"], &next["ok"]),
        (&json!(2), &json!(true)),
        "{}",
        next["detail"]
    );
}

/// Under `latest`, the waiting frame a newer one replaces gives its room
/// back before the newer one takes its own: with room for two frames, one
/// running and one waiting, a third replaces the second and runs.
#[test]
fn under_latest_a_replaced_frame_gives_its_room_to_the_newer_one() {
    let (_dir, server) = alpha_with_one_mib_of_body_memory();
    let mut socket = open(&server, &target("alpha", "frame", ""));
    send_args(&mut socket, json!({"ms": 1000}));
    for _ in 0..3 {
        send_frame(&mut socket, frame(400 << 10));
    }
    let answers = answers_until(&mut socket, 2);
    let seen: Vec<_> = answers
        .iter()
        .map(|a| (a["seq"].as_u64(), a["ok"].as_bool(), a["dropped"].as_u64()))
        .collect();
    // (Frame 1 was dropped while frame 0 ran: both answers count it.)
    assert_eq!(
        seen,
        [
            (Some(0), Some(true), Some(1)),
            (Some(2), Some(true), Some(1))
        ],
        "{:?}",
        answers.iter().map(|a| &a["error_type"]).collect::<Vec<_>>()
    );
}

/// A text message's arguments take room in `--body-memory` for as long
/// as a frame that uses them waits or runs (each frame waiting under
/// `block` may hold arguments of its own): one that finds no room is
/// answered `ServerBusy`, and the room comes back with the frames.
#[test]
fn stream_arguments_take_room_while_frames_use_them() {
    // Bodies of 256 KiB, 256 KiB in all; messages under 128 KiB, of which
    // the read buffer keeps nothing.
    let (_dir, server) = alpha_with_body_memory(256 << 10);
    let mut socket = open(&server, &target("alpha", "frame", "?policy=block&queue=4"));
    let pad = |c: &str| c.repeat(100 << 10);
    // 100 KiB of arguments held by the running frame, 100 KiB by the
    // waiting one: the third 100 KiB finds no room.
    send_args(&mut socket, json!({"ms": 1500, "pad": pad("x")}));
    send_frame(&mut socket, frame(5));
    send_args(&mut socket, json!({"ms": 0, "pad": pad("y")}));
    send_frame(&mut socket, frame(5));
    send_args(&mut socket, json!({"ms": 0, "pad": pad("z")}));
    let refused = answer(&mut socket);
    assert_eq!(
        (refused["ok"].as_bool(), refused["error_type"].as_str()),
        (Some(false), Some("ServerBusy")),
        "{refused}"
    );
    assert!(refused.get("seq").is_none(), "{refused}");
    for seq in 0..2 {
        let done = answer(&mut socket);
        assert_eq!(
            (done["seq"].as_u64(), &done["ok"]),
            (Some(seq), &json!(true)),
            "{done}"
        );
    }
    // Both frames answered: their arguments' room is back.
    send_args(&mut socket, json!({"ms": 0, "pad": pad("w")}));
    send_frame(&mut socket, frame(5));
    let next = answer(&mut socket);
    assert_eq!(
        (next["seq"].as_u64(), &next["ok"]),
        (Some(2), &json!(true)),
        "{next}"
    );
}

#[test]
fn a_ping_flood_closes_the_stream_with_1008_and_a_keep_alive_does_not() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    // A keep-alive's few pings: answered, and the stream goes on.
    let mut calm = open(&server, &target("alpha", "frame", ""));
    for _ in 0..3 {
        calm.send(Message::Ping(vec![1; 8].into())).unwrap();
    }
    send_frame(&mut calm, frame(5));
    assert_eq!(answer(&mut calm)["ok"], true);
    // A client that pings without pause (and reads nothing: each pong
    // waited in the server's write buffer) is closed.
    let mut flood = open(&server, &target("alpha", "frame", ""));
    for _ in 0..200 {
        if flood.send(Message::Ping(vec![7; 125].into())).is_err() {
            break;
        }
    }
    // What the client sent after its limit, here a frame larger than the
    // kernel's socket buffers, is read to the end and dropped (a lingering
    // close): a connection closed with bytes unread is reset, and a close
    // frame not yet delivered was lost with it ("connection reset" instead
    // of 1008, seen on a loaded machine).
    flood
        .send(Message::Binary(frame(16 << 20).into()))
        .expect("the server read what the client sent after its close");
    let (code, reason) = close_of(&mut flood);
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("pings in a second"), "{reason}");
    send_frame(&mut calm, frame(6));
    assert_eq!(
        answer(&mut calm)["ok"],
        true,
        "the other stream is untouched"
    );
}

/// A stream whose plugin another client's call made FAILED for good (an
/// in-process plugin's panic through the run route) closes with 1011 at
/// its next frame, after that frame's answer: no later frame could be
/// answered. It stayed open, answering every frame `PluginNotRunnable`.
#[test]
fn a_stream_whose_plugin_another_call_failed_closes_with_1011() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let mut socket = open(&server, &target("alpha", "frame", ""));
    send_frame(&mut socket, frame(10));
    assert_eq!(answer(&mut socket)["ok"], true);
    let panic = server.run("alpha", "panic", "{}");
    assert_eq!(panic.status, 502, "{}", panic.text());
    send_frame(&mut socket, frame(10));
    let refused = answer(&mut socket);
    assert_eq!(refused["error_type"], "PluginNotRunnable", "{refused}");
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("FAILED and not restarted"), "{reason}");
}

/// An answer larger than a stream may send is that frame's
/// `AnswerTooLarge`, and the stream goes on: it was closed 1011, which
/// blames the plugin, with that frame and the next unanswered, uncounted.
#[test]
fn an_answer_larger_than_a_stream_may_send_is_answered_too_large() {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    // Frames of at most 1 MiB: answers of at most 4 MiB.
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--body-limit", "1048576"]);
    server.wait_loaded();
    let mut socket = open(&server, &target("py", "checksum", ""));
    send_args(&mut socket, json!({"pad": 3 << 20}));
    send_frame(&mut socket, frame(10));
    assert_eq!(answer(&mut socket)["ok"], true, "3 MiB fit");
    send_args(&mut socket, json!({"pad": 5 << 20}));
    send_frame(&mut socket, frame(10));
    let too_big = answer(&mut socket);
    assert_eq!(too_big["ok"], false, "{too_big}");
    assert_eq!(too_big["seq"], 1, "{too_big}");
    assert_eq!(too_big["error_type"], "AnswerTooLarge", "{too_big}");
    let detail = too_big["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("larger than a stream's answers"),
        "{detail}"
    );
    send_args(&mut socket, json!({"pad": 0}));
    send_frame(&mut socket, frame(10));
    let next = answer(&mut socket);
    assert_eq!(
        (next["seq"].clone(), next["ok"].clone()),
        (json!(2), json!(true)),
        "{next}"
    );
}

/// A client that reads slowly still gets the close after its answers: its
/// socket takes 64 KiB at a time, and it reads an answer (3 MiB each) every
/// 1.5 s; the plugin crashes while answers wait for it, and the crash's
/// answer and the 1011 close come after them (the close once waited a
/// second for room among the answers, and was lost).
#[test]
fn a_slow_reader_gets_the_close_after_its_answers() {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let stream = TcpStream::connect(server.addr).unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&stream, 64 << 10).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let target = target("py", "checksum", "?policy=block&queue=8");
    let (mut socket, _) =
        tungstenite::client::client(format!("ws://{}{target}", server.addr), stream).unwrap();
    send_args(&mut socket, json!({"pad": 3 << 20}));
    for n in 0..4 {
        send_frame(&mut socket, frame(10 + n));
    }
    send_args(&mut socket, json!({"exit": true}));
    send_frame(&mut socket, frame(20));
    let mut answers = Vec::new();
    let close = loop {
        std::thread::sleep(Duration::from_millis(1500));
        match read_message(&mut socket) {
            Ok(Message::Text(text)) => {
                let a: Value = serde_json::from_str(text.as_str()).unwrap();
                answers.push((a["seq"].as_u64(), a["ok"].as_bool()));
            }
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("no close after {answers:?}: {e}"),
        }
        assert!(answers.len() <= 5, "{answers:?}");
    };
    assert_eq!(
        answers,
        [
            (Some(0), Some(true)),
            (Some(1), Some(true)),
            (Some(2), Some(true)),
            (Some(3), Some(true)),
            (Some(4), Some(false)),
        ]
    );
    let close = close.expect("a close frame with its code");
    assert_eq!(u16::from(close.code), 1011, "{}", close.reason);
}

/// A stream's answers hold room in `--answer-memory` until they are
/// written: while a client that reads nothing holds one, another stream's
/// answer finds no room and its frame is answered `ServerBusy` (its call
/// ran); once the first client has read its answer, the room is back.
#[test]
fn stream_answers_hold_the_answer_memory_until_they_are_written() {
    const MIB: usize = 1 << 20;
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let eight = (8 * MIB).to_string();
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--body-limit",
        &eight,
        "--max-response",
        &eight,
        "--answer-memory",
        &eight,
    ]);
    server.wait_loaded();
    // 5 MiB come back as about 6.7 MiB of base64: one such answer fits.
    let data = frame(5 * MIB);
    let mut slow = open(&server, &target("alpha", "frame", ""));
    send_frame(&mut slow, data.clone());
    // Its call ran (the answer is encoded and takes its room right after).
    crate::rescan::wait_for(
        "the first frame's call",
        Duration::from_secs(20),
        &server,
        || {
            let health = server.get("/v1/plugins/alpha/health").json();
            (health["success_count"].as_u64() >= Some(1)).then_some(())
        },
    );
    // Until the first answer holds its room (encoding it is slow in a
    // debug build), another's may still find room, and is read at once.
    let mut other = open(&server, &target("alpha", "frame", ""));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let busy = loop {
        send_frame(&mut other, data.clone());
        let reply = answer(&mut other);
        if reply["ok"] != true || std::time::Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        (&busy["ok"], &busy["error_type"]),
        (&json!(false), &json!("ServerBusy")),
        "{busy}"
    );
    let detail = busy["detail"].as_str().unwrap();
    assert!(detail.contains("answers waiting to be sent"), "{busy}");
    // The slow client reads its answer, byte-exact; then the room is back.
    let first = answer(&mut slow);
    assert_eq!(first["ok"], true);
    assert!(
        first["result"]["data"] == base64(&data),
        "the answer differs"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        send_frame(&mut other, data.clone());
        let next = answer(&mut other);
        if next["ok"] == true {
            assert!(next["result"]["data"] == base64(&data));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{next}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let health = server.get("/v1/plugins/alpha/health").json();
    assert!(
        health["success_count"].as_u64() >= Some(3),
        "the busy frame's call ran too: {health}"
    );
}
