//! Python plugins through the real binary: the seed's fixtures served side
//! by side with native plugins, tool errors as 422, and binary arguments
//! through JSON base64, `multipart/form-data` and
//! `application/octet-stream`, byte-exact, for Python, native in-process
//! and native isolated plugins; the fault zoo's crashes answered and the
//! plugin restarted by its supervisor.

use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir, http_with, plugin_named};

pub(crate) fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `multipart/form-data` with an `args` part and one file part `data`.
pub(crate) fn multipart(args: &Value, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = "forgesyte-test-boundary-7f3a";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"args\"\r\n\r\n{args}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"frame.bin\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, bytes).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Bytes that are not text: every byte value, in a pattern of `n` bytes.
pub(crate) fn frame(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn python_plugins_serve_beside_native_ones_with_the_seeds_reasons() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    dir.python("broken_plugin", "broken_plugin");
    dir.python("bad_init", "bad_init");
    dir.good("native", json!({}));
    for (name, extra) in [
        ("gpu_plugin", json!({"requires_gpu": true})),
        (
            "one_missing",
            json!({"dependencies": ["forgesyte_missing_torch", "json"]}),
        ),
        (
            "all_missing",
            json!({"dependencies": ["forgesyte_missing_torch", "json", "py:forgesyte_missing_numpy"]}),
        ),
    ] {
        dir.python(name, "echo").manifest_fields(name, extra);
    }
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    // The health route shows each plugin's state and the seed's reason.
    let gpu_here = std::path::Path::new("/dev/nvidiactl").exists();
    for (name, state, reason) in [
        ("echo", "INITIALIZED", None),
        (
            "broken_plugin",
            "FAILED",
            Some("ImportError: SyntaxError: "),
        ),
        (
            "bad_init",
            "FAILED",
            Some("InitError: ValueError: no weights"),
        ),
        ("gpu_plugin", "UNAVAILABLE", Some("GPU")),
        (
            "one_missing",
            "UNAVAILABLE",
            Some("Missing dependencies: forgesyte_missing_torch"),
        ),
        (
            "all_missing",
            "UNAVAILABLE",
            Some("Missing dependencies: forgesyte_missing_torch, py:forgesyte_missing_numpy"),
        ),
    ] {
        let reply = server.get(&format!("/v1/plugins/{name}/health"));
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        let health = reply.json();
        if name == "gpu_plugin" && gpu_here {
            eprintln!("this machine has a GPU: gpu_plugin's state is not checked");
            continue;
        }
        assert_eq!(health["state"], state, "{name}: {health}");
        match reason {
            Some(reason) => assert!(
                health["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(reason)),
                "{name}: {health}"
            ),
            None => assert_eq!(health["reason"], Value::Null, "{name}: {health}"),
        }
    }
    assert_eq!(
        server.get("/v1/plugins/one_missing/health").json()["reason"],
        "Missing dependencies: forgesyte_missing_torch"
    );
    let list = server.get("/v1/plugins").json();
    let state = |name: &str| plugin_named(&list, name);
    assert_eq!(state("echo")["state"], "INITIALIZED");
    assert_eq!(state("native")["state"], "INITIALIZED");
    assert_eq!(state("broken_plugin")["state"], "FAILED");
    assert!(
        state("broken_plugin")["reason"]
            .as_str()
            .unwrap()
            .starts_with("ImportError: SyntaxError: "),
        "{list}"
    );
    assert_eq!(
        state("bad_init")["reason"],
        "InitError: ValueError: no weights"
    );
    let tools = server.get("/v1/plugins/echo/tools").json();
    assert!(tools.to_string().contains("checksum"), "{tools}");
    let reply = server.run("echo", "echo", r#"{"args": {"text": "héllo"}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["result"], json!({"text": "héllo"}));
    // An exception is a tool error: 422 with the exception's class.
    let reply = server.run("echo", "fail", "{}");
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.json()["error_type"], "ValueError");
    // `detail` is the exception's message, as the seed's server answered.
    assert_eq!(reply.json()["detail"], "bad input", "{}", reply.text());
    assert_eq!(
        server.get("/v1/plugins/echo/health").json()["state"],
        "INITIALIZED"
    );
    // Its traceback is the author's: in the log, at WARN the first time in
    // a minute, then at debug level; never in the answer.
    assert!(!reply.text().contains("plugin.py"), "{}", reply.text());
    let again = server.run("echo", "fail", "{}");
    assert_eq!(again.status, 422, "{}", again.text());
    let log = server.log();
    let raised: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Tool fail of plugin echo raised ValueError: bad input"))
        .collect();
    assert_eq!(raised.len(), 1, "{log}");
    assert!(
        raised[0].contains("WARN")
            && raised[0].contains("plugin.py\\\", line ")
            && raised[0].contains(", in fail"),
        "{log}"
    );
}

/// A result the runner cannot send (a set, not JSON) is the tool's error,
/// logged for its author as a raised exception is, at WARN the first time
/// in a minute: the tool returned, so the log says so, not a line of it.
#[test]
fn a_result_that_cannot_be_sent_is_logged_for_the_plugins_author() {
    let dir = PluginsDir::new();
    dir.python("handlers", "handlers");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let reply = server.run("handlers", "convert", r#"{"args": {"kind": "set"}}"#);
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.json()["error_type"], "TypeError", "{}", reply.text());
    assert!(
        !reply.text().contains("could not be sent"),
        "{}",
        reply.text()
    );
    let log = server.log();
    let logged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Tool convert of plugin handlers raised TypeError: tool result"))
        .collect();
    assert_eq!(logged.len(), 1, "{log}");
    assert!(
        logged[0].contains("WARN")
            && logged[0].contains("(the tool returned; its result could not be sent)"),
        "{log}"
    );
}

#[test]
fn binary_arguments_arrive_byte_exact_through_every_body_and_runtime() {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    dir.good("native-in", json!({}));
    dir.good("native-iso", json!({"isolation": "process"}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    for size in [0usize, 1, 100_000, 3_000_000] {
        let data = frame(size);
        let digest = sha256(&data);
        // Python: JSON base64, multipart and octet-stream reach the plugin
        // as the same bytes.
        let target = "/v1/plugins/py/tools/checksum/run";
        let json_body = json!({"args": {"data": base64(&data)}}).to_string();
        let (multipart_type, multipart_body) = multipart(&json!({}), &data);
        for (what, content_type, body) in [
            ("json", "application/json", json_body.into_bytes()),
            ("multipart", multipart_type.as_str(), multipart_body),
            ("octet-stream", "application/octet-stream", data.clone()),
        ] {
            let reply = http_with(
                server.addr,
                "POST",
                target,
                &[("Content-Type", content_type)],
                &body,
            );
            assert_eq!(reply.status, 200, "{what} {size}: {}", reply.text());
            assert_eq!(
                reply.json()["result"],
                json!({"len": size, "sha256": digest}),
                "{what} {size}"
            );
        }
        // Every runtime echoes multipart bytes back as base64 in JSON.
        for plugin in ["py", "native-in", "native-iso"] {
            let (content_type, body) = multipart(&json!({"tag": plugin}), &data);
            let reply = http_with(
                server.addr,
                "POST",
                &format!("/v1/plugins/{plugin}/tools/echo/run"),
                &[("Content-Type", &content_type)],
                &body,
            );
            assert_eq!(reply.status, 200, "{plugin} {size}: {}", reply.text());
            let result = &reply.json()["result"];
            assert_eq!(result["tag"], plugin);
            assert_eq!(result["data"], base64(&data), "{plugin} {size}");
        }
    }
    // pydantic's Optional[bytes] (`anyOf` bytes or null) is a binary
    // argument too: bytes from base64, from an octet-stream body, and null
    // when not given.
    for (content_type, body, expected) in [
        (
            "application/json",
            br#"{"args": {"data": "AAECAw=="}}"#.to_vec(),
            json!({"len": 4, "type": "bytes"}),
        ),
        (
            "application/octet-stream",
            b"\x00\x01\x02".to_vec(),
            json!({"len": 3, "type": "bytes"}),
        ),
        (
            "application/json",
            br#"{"args": {"data": null}}"#.to_vec(),
            json!({"len": null, "type": "NoneType"}),
        ),
    ] {
        let reply = http_with(
            server.addr,
            "POST",
            "/v1/plugins/py/tools/maybe_bytes/run",
            &[("Content-Type", content_type)],
            &body,
        );
        assert_eq!(reply.status, 200, "{content_type}: {}", reply.text());
        assert_eq!(reply.json()["result"], expected, "{content_type}");
    }
    // An octet-stream body needs exactly one declared binary argument.
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/plugins/py/tools/echo/run",
        &[("Content-Type", "application/octet-stream")],
        b"abc",
    );
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error_type"],
        "InvalidBody",
        "{}",
        reply.text()
    );
    // The detail says what is wrong with this body, not with a JSON one.
    assert_eq!(
        reply.json()["detail"],
        "Request body does not fit tool 'echo' of plugin 'py': the tool declares no binary argument: send JSON",
    );
    // Invalid base64 for a declared binary argument is the client's error,
    // and the host's: the tool never saw it.
    let reply = server.run("py", "checksum", r#"{"args": {"data": "not base64!"}}"#);
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error_type"],
        "InvalidArgs",
        "{}",
        reply.text()
    );
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        detail.starts_with(
            "Argument 'data' of tool 'checksum' of plugin 'py' is binary and its text is not valid base64: "
        ),
        "{detail}"
    );
    // So is a binary argument sent as JSON other than text, in the body
    // or in a multipart body's `args`: the tool never saw it, and it is not
    // the plugin's error.
    let errors_before = server.get("/v1/plugins/py/health").json()["error_count"].clone();
    let reply = server.run("py", "checksum", r#"{"args": {"data": {"x": 1}}}"#);
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error_type"],
        "InvalidArgs",
        "{}",
        reply.text()
    );
    assert!(
        reply.json()["detail"].as_str().is_some_and(|d| d.starts_with(
            "Argument 'data' of tool 'checksum' of plugin 'py' is binary, and was sent as an object in JSON"
        )),
        "{}",
        reply.text()
    );
    let reply = server.run("py", "checksum", r#"{"args": {"data": 12345}}"#);
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        reply.text().contains("sent as a number"),
        "{}",
        reply.text()
    );
    assert_eq!(
        server.get("/v1/plugins/py/health").json()["error_count"],
        errors_before
    );
    // A multipart body of the wrong shape says so.
    let (content_type, body) = multipart(&json!({"data": "x"}), b"abc");
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/plugins/py/tools/checksum/run",
        &[("Content-Type", &content_type)],
        &body,
    );
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error_type"],
        "InvalidBody",
        "{}",
        reply.text()
    );
    assert_eq!(
        reply.json()["detail"],
        "Multipart request body is invalid: argument 'data' is given both as a part and in 'args'",
    );
    // `null` in `args` is no value: the part is the argument.
    let (content_type, body) = multipart(&json!({"data": null}), b"abc");
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/plugins/py/tools/checksum/run",
        &[("Content-Type", &content_type)],
        &body,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["result"]["len"], 3, "{}", reply.text());
    // A compressed body is refused, not handed on compressed.
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/plugins/py/tools/checksum/run",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "gzip"),
        ],
        b"\x1f\x8b\x08\x00",
    );
    assert_eq!(reply.status, 400, "{}", reply.text());
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        detail.contains("Content-Encoding \"gzip\" is not supported"),
        "{detail}"
    );
    // A body that cannot be read says what broke, not only that reading it
    // failed: a chunk size that is no number, a chunk longer than it said,
    // a body cut short.
    for (framing, said) in [
        (
            "Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
            "chunk size",
        ),
        (
            "Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
            "chunk body",
        ),
        ("Content-Length: 100\r\n\r\nabc", "end of file"),
    ] {
        use std::io::{Read as _, Write as _};
        let mut socket = std::net::TcpStream::connect(server.addr).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        write!(
            socket,
            "POST /v1/plugins/py/tools/checksum/run HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/octet-stream\r\n{framing}"
        )
        .unwrap();
        socket.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing:?}: {answer}");
        assert!(
            answer.contains("error reading a body from connection: ") && answer.contains(said),
            "{framing:?}: {answer}"
        );
    }
}

/// A server of the Python `echo` fixture as `py`, loaded, with
/// `--max-response` `limit`; its plugins directory lives as long as the
/// first.
/// A `multipart/form-data` body of `parts`: (field name, file name, bytes).
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "forgesyte-form-boundary-51c2";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        let file = file
            .map(|f| format!("; filename=\"{f}\""))
            .unwrap_or_default();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Plain form fields (`curl -F threshold=3`) and files named like an
/// argument the tool declares, and not binary, reach the plugin as that
/// argument's type; binary and undeclared ones stay bytes; a field that
/// cannot be its type is the client's error, which the plugin never sees.
#[test]
fn form_fields_reach_a_plugin_as_their_declared_type() {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let target = "/v1/plugins/py/tools/typed/run";
    let (content_type, body) = form(&[
        ("threshold", None, b"3"),
        ("label", Some("label.txt"), b"42"),
        ("opts", None, br#"{"k": [1, 2]}"#),
        ("data", Some("frame.bin"), b"\x00\xff\x01"),
        ("extra", None, b"7"),
    ]);
    let reply = http_with(
        server.addr,
        "POST",
        target,
        &[("Content-Type", &content_type)],
        &body,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["result"],
        json!({
            "threshold": ["int", 3],
            "label": ["str", "42"],
            "opts": ["dict", {"k": [1, 2]}],
            "data": ["bytes", 3],
            "extra": ["bytes", 1]
        })
    );
    let errors_before = server.get("/v1/plugins/py/health").json()["error_count"].clone();
    let (content_type, body) = form(&[("threshold", None, b"lots")]);
    let reply = http_with(
        server.addr,
        "POST",
        target,
        &[("Content-Type", &content_type)],
        &body,
    );
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error_type"],
        "InvalidBody",
        "{}",
        reply.text()
    );
    assert_eq!(
        reply.json()["detail"],
        "Multipart request body is invalid: the part 'threshold' is a form field for argument \
         'threshold' (the tool's input schema declares it integer), and its text is not JSON: \
         expected value at line 1 column 1"
    );
    assert_eq!(
        server.get("/v1/plugins/py/health").json()["error_count"],
        errors_before
    );
}

fn echo_answering_at_most(limit: usize) -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--max-response",
        &limit.to_string(),
    ]);
    server.wait_loaded();
    (dir, server)
}

/// A binary result just under `--max-response` through shared memory: the
/// runner counts the header's `shm` field as the host does, so each size
/// is answered in full or refused as too large (422 `ResultTooLarge`),
/// never a protocol fault that fails the plugin.
#[test]
fn a_shared_result_at_the_response_limit_is_whole_or_too_large_never_a_fault() {
    const LIMIT: usize = 1 << 20;
    let (_dir, server) = echo_answering_at_most(LIMIT);
    let replies = (LIMIT - 160..=LIMIT).step_by(3).map(|size| {
        let reply = http_with(
            server.addr,
            "POST",
            "/v1/plugins/py/tools/echo_bytes/run",
            &[("Content-Type", "application/octet-stream")],
            &frame(size),
        );
        (size, reply)
    });
    crate::support::assert_whole_or_too_large(&server, "py", replies);
}

/// A JSON result of more values than the answer limit allows (one per 32
/// bytes of `--max-response`, at least 64 Ki) is the tool's error (422
/// `ResultTooLarge`), refused before the host parses it (the Python runner
/// counts them itself, before encoding them): 100,000 zeros are 200 KB of
/// text, and would be some 10 MB parsed. The plugin stays INITIALIZED, and
/// a result within the bound is answered.
#[test]
fn a_result_of_too_many_values_is_refused_before_it_is_parsed() {
    const LIMIT: usize = 1 << 20;
    let (_dir, server) = echo_answering_at_most(LIMIT);
    let zeros = |n: usize| format!(r#"{{"args": {{"z": [{}0]}}}}"#, "0,".repeat(n - 1));
    let reply = server.run("py", "echo", &zeros(100_000));
    let text = reply.text();
    assert_eq!(reply.status, 422, "{}", &text[..text.len().min(300)]);
    let failure = reply.json();
    assert_eq!(failure["error_type"], "ResultTooLarge", "{failure}");
    assert!(
        failure["detail"].as_str().is_some_and(
            |d| d.contains("more than 65536 JSON values, more than an answer may hold")
        ),
        "{failure}"
    );
    let reply = server.run("py", "echo", &zeros(60_000));
    let text = reply.text();
    assert_eq!(reply.status, 200, "{}", &text[..text.len().min(300)]);
    let health = server.get("/v1/plugins/py/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    assert_eq!(health["error_count"], 1, "{health}");
}

/// `--shm-threshold` moves attachments between the pipe and shared memory
/// (0: always the pipe; 1: every non-empty one shared; the default in
/// between), never changes a byte: sizes around the default threshold,
/// both ways through the Python runner, and to an isolated native plugin.
#[test]
fn the_shm_threshold_changes_the_path_never_the_bytes() {
    let dir = PluginsDir::new();
    dir.python("py", "echo");
    dir.good("native-iso", json!({"isolation": "process"}));
    for threshold in ["0", "1", "65536"] {
        let server = Forgesyte::start(&["--plugins", dir.path_str(), "--shm-threshold", threshold]);
        server.wait_loaded();
        for size in [0usize, 1, 65_535, 65_536, 65_537, 1 << 20] {
            let data = frame(size);
            let reply = http_with(
                server.addr,
                "POST",
                "/v1/plugins/py/tools/checksum/run",
                &[("Content-Type", "application/octet-stream")],
                &data,
            );
            assert_eq!(reply.status, 200, "{threshold}/{size}: {}", reply.text());
            assert_eq!(
                reply.json()["result"],
                json!({"len": size, "sha256": sha256(&data)}),
                "{threshold}/{size}"
            );
            for plugin in ["py", "native-iso"] {
                let (content_type, body) = multipart(&json!({}), &data);
                let reply = http_with(
                    server.addr,
                    "POST",
                    &format!("/v1/plugins/{plugin}/tools/echo/run"),
                    &[("Content-Type", &content_type)],
                    &body,
                );
                assert_eq!(reply.status, 200, "{plugin} {threshold}/{size}");
                assert_eq!(
                    reply.json()["result"]["data"],
                    base64(&data),
                    "{plugin} {threshold}/{size}"
                );
            }
        }
    }
}

/// `--call-timeout` is the limit of a plugin in a runner too (a Python or
/// isolated plugin's process ran on to the loader's own 60 s): a call past
/// it is a 504, its runner killed, and the plugin restarts.
#[test]
fn the_call_timeout_holds_for_plugins_in_runners() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    dir.good("iso", serde_json::json!({"isolation": "process"}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--call-timeout", "1"]);
    server.wait_loaded();
    for plugin in ["echo", "iso"] {
        let started = std::time::Instant::now();
        let reply = server.run(plugin, "sleep", r#"{"args": {"ms": 8000}}"#);
        assert_eq!(reply.status, 504, "{plugin}: {}", reply.text());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(6),
            "{plugin}: answered after {:?}",
            started.elapsed()
        );
    }
}

/// A call that was running when its runner was killed for another call's
/// time limit did not fault: it is told so (503 `PluginNotRunnable`, the
/// kill's reason, `Retry-After` until the restart), not counted among the
/// plugin's errors; the call that timed out is the one 504 and one error.
#[test]
fn a_call_cut_off_by_another_calls_timeout_is_told_to_send_it_again() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    // The slow call's limit (2 s, then up to 310 ms for its stacks before
    // the kill) passes a second after the other call starts, whose own
    // limit is a second further.
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--call-timeout", "2"]);
    server.wait_loaded();
    let addr = server.addr;
    let slow = std::thread::spawn(move || {
        http_with(
            addr,
            "POST",
            "/v1/plugins/echo/tools/sleep/run",
            &[("Content-Type", "application/json")],
            br#"{"args": {"ms": 8000}}"#,
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let cut_off = server.run("echo", "sleep", r#"{"args": {"ms": 5000}}"#);
    let slow = slow.join().unwrap();
    assert_eq!(slow.status, 504, "{}", slow.text());
    assert_eq!(cut_off.status, 503, "{}", cut_off.text());
    let failure = cut_off.json();
    assert_eq!(failure["error_type"], "PluginNotRunnable", "{failure}");
    let detail = failure["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("the host killed the plugin's process before this call's answer came, not for this call (TimeoutError: timed out after 2 s during tool 'sleep';")
            && detail.contains("send it again"),
        "{detail}"
    );
    assert!(cut_off.header("retry-after").is_some(), "{failure}");
    let health = server.get("/v1/plugins/echo/health").json();
    assert_eq!(health["error_count"], 1, "{health}");
}

/// The fault zoo's crashes, over HTTP, each followed by the supervisor's
/// restart (1 s backoff, as configured by default): a segfault in the
/// interpreter, a hang past the call timeout, a memory blow-up past the
/// memory limit. Each plugin answers the fault (502, 504, 502), is FAILED
/// with the precise reason, comes back INITIALIZED with `restart_count` 1,
/// and answers again; the bystander never notices.
#[test]
fn python_faults_are_answered_then_the_plugin_restarts() {
    let dir = PluginsDir::new();
    dir.python("bystander", "echo");
    for (name, limits) in [
        ("seg", json!({})),
        ("hang", json!({"call_timeout_s": 1})),
        ("stop", json!({"call_timeout_s": 1})),
        ("blowup", json!({"memory_mb": 256})),
        ("lowered", json!({"memory_mb": 256})),
        ("unlimited", json!({"memory_mb": 0})),
    ] {
        dir.python(name, "faulty")
            .manifest_fields(name, json!({ "limits": limits }));
    }
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    // The limit named is the one in force: one the plugin lowered itself,
    // or set where the host set none, not the manifest's.
    for (name, tool, args, status, reason) in [
        ("seg", "segfault", "{}", 502, "SIGSEGV"),
        (
            "hang",
            "hang",
            "{}",
            504,
            "timed out after 1 s during tool 'hang'",
        ),
        // Stopped by its own SIGSTOP: the reason says so, not a place no
        // dump could give (it said nothing, on the server's path).
        (
            "stop",
            "stop",
            "{}",
            504,
            "timed out after 1 s during tool 'stop', stuck at a stop: the process was stopped \
             by a signal (SIGSTOP, SIGTSTP …) and ran no code",
        ),
        (
            "blowup",
            "blowup",
            "{}",
            502,
            "exceeded memory limit 256 MiB",
        ),
        (
            "lowered",
            "blowup",
            r#"{"args": {"limit_mb": 200}}"#,
            502,
            "exceeded memory limit 200 MiB",
        ),
        (
            "unlimited",
            "blowup",
            r#"{"args": {"limit_mb": 300}}"#,
            502,
            "exceeded memory limit 300 MiB",
        ),
    ] {
        let reply = server.run(name, tool, args);
        assert_eq!(reply.status, status, "{name}: {}", reply.text());
        let health = server.get(&format!("/v1/plugins/{name}/health")).json();
        assert_eq!(health["state"], "FAILED", "{name}: {health}");
        assert!(
            health["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason)),
            "{name}: {health}"
        );
        if name == "hang" {
            // Where the tool was stuck: in its health, not in the answer
            // the client got (the author's files are not the client's).
            assert!(!reply.text().contains("plugin.py"), "{}", reply.text());
            assert!(
                health["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(", stuck at ") && r.contains("plugin.py:")),
                "{health}"
            );
        }
        let reply = server.run("bystander", "echo", r#"{"args": {"still": "here"}}"#);
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    for name in ["seg", "hang", "stop", "blowup", "lowered", "unlimited"] {
        let health = crate::binary::wait_health(&server, name, 20, |h| {
            h["state"] == "INITIALIZED" && h["restart_count"].as_u64() >= Some(1)
        });
        assert_eq!(health["restart_count"], 1, "{name}: {health}");
        assert!(
            health["last_exit_reason"].as_str().is_some(),
            "{name}: {health}"
        );
        let reply = server.run(name, "ok", "{}");
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_eq!(reply.json()["result"], json!({"ok": true}));
    }
}

/// `--withhold-stderr`: what a crashed runner last wrote to stderr (here a
/// caller's secret) reaches the server's log, never an answer: the
/// plugin's reason, its failure journal and the list say how many lines
/// were withheld. Without it (the control) they quote
/// the line; the answer to the call that crashed never does.
#[test]
fn withheld_stderr_reaches_the_log_and_no_answer() {
    const SECRET: &str = "ALICE-SECRET-42";
    let dir = PluginsDir::new();
    dir.python("leaky", "faulty");
    dir.python("hang", "faulty")
        .manifest_fields("hang", json!({ "limits": {"call_timeout_s": 1} }));
    for withhold in [false, true] {
        let mut args = vec!["--plugins", dir.path_str()];
        if withhold {
            args.push("--withhold-stderr");
        }
        let server = Forgesyte::start(&args);
        server.wait_loaded();
        let reply = server.run(
            "leaky",
            "leak",
            &format!(r#"{{"args": {{"secret": "{SECRET}"}}}}"#),
        );
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert!(!reply.text().contains(SECRET), "{}", reply.text());
        // Where the lines are: the journal too, unless withheld.
        assert_eq!(
            reply.text().contains("failure journal"),
            !withhold,
            "{}",
            reply.text()
        );
        let health = crate::binary::wait_health(&server, "leaky", 10, |h| {
            h["journal"].as_array().is_some_and(|j| !j.is_empty())
        });
        let shown = format!("{health}\n{}", server.get("/v1/plugins").text());
        let crash = &health["journal"][0];
        assert_eq!(crash["state"], "FAILED", "{health}");
        let reason = crash["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("exited with code 3"), "{health}");
        if withhold {
            assert!(!shown.contains(SECRET), "withheld, yet shown: {shown}");
            // The fixture's earlier lines count too (the tail keeps 20).
            let note = " withheld from the API (the server log has them)";
            assert!(
                reason.contains("; stderr: ") && reason.ends_with(note),
                "{health}"
            );
            let tail = crash["stderr_tail"].as_array().cloned().unwrap_or_default();
            assert!(
                tail.len() == 1 && tail[0].as_str().is_some_and(|t| t.ends_with(note)),
                "{health}"
            );
            let log = server.log();
            let withheld = log
                .lines()
                .find(|l| l.contains("its last stderr lines, withheld from the API: "));
            assert!(
                withheld.is_some_and(|l| l.contains(&format!("debug: got {SECRET}"))),
                "{log}"
            );
        } else {
            assert!(reason.contains(&format!("debug: got {SECRET}")), "{health}");
        }
        // Where a timed-out tool was stuck is read from its stack dump on
        // stderr: in the reason, or only in the log.
        let reply = server.run("hang", "hang", "{}");
        assert_eq!(reply.status, 504, "{}", reply.text());
        let health = server.get("/v1/plugins/hang/health").json();
        let reason = health["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("timed out after 1 s"), "{health}");
        assert_eq!(reason.contains(", stuck at "), !withhold, "{health}");
        if withhold {
            let log = server.log();
            assert!(
                log.lines()
                    .any(|l| l.contains("plugin hang timed out stuck at ")
                        && l.contains("plugin.py:")),
                "{log}"
            );
        }
    }
}

/// The runners' limits for manifests that set none are the operator's:
/// `--init-timeout` (a constructor that hangs is FAILED after it, not after
/// 5 s) and `--memory-limit` (the runner's address space); a manifest's
/// own `limits` still win.
#[test]
fn the_operator_sets_the_runners_init_timeout_and_memory_limit() {
    let dir = PluginsDir::new();
    // The fixture's own limits (10 s to construct) are dropped.
    dir.python("init-hang", "faulty")
        .manifest_fields("init-hang", json!({"limits": {}}));
    dir.python("snoop", "snoop");
    dir.python("capped", "snoop")
        .manifest_fields("capped", json!({"limits": {"memory_mb": 400}}));
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        // Not 1 s: the others' starts (the zygote's, on a loaded machine)
        // must fit in it too. Still not the 5 s default.
        "--init-timeout",
        "3",
        "--memory-limit",
        "300",
    ]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/init-hang/health").json();
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|r| r.contains("timed out after 3 s")),
        "{health}"
    );
    for (name, mib) in [("snoop", 300), ("capped", 400)] {
        let reply = server.run(name, "address_space", "{}");
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_eq!(
            reply.json()["result"]["mib"],
            mib,
            "{name}: {}",
            reply.text()
        );
    }
}

/// Waits until plugin `name` is INITIALIZED, for at most 15 s (the others
/// of its wave hang for longer).
fn wait_initialized_within_15_s(server: &Forgesyte, name: &str) {
    wait_state_within_15_s(server, name, "INITIALIZED");
}

/// Waits until plugin `name` is in `state`, for at most 15 s (the others
/// of its wave hang for longer); its health then.
fn wait_state_within_15_s(server: &Forgesyte, name: &str, state: &str) -> Value {
    let since = std::time::Instant::now();
    loop {
        let health = server.get(&format!("/v1/plugins/{name}/health")).json();
        if health["state"] == state {
            return health;
        }
        assert!(
            since.elapsed() < std::time::Duration::from_secs(15),
            "{name} still not {state} while others of its wave construct: {health}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A wave with two constructors that hang, a runner's (`aaa-hang`, named
/// so to sort first; the fixture hangs in a directory named `init-hang`)
/// and an in-process one (`a-hangs`), with these init timeouts, and a
/// good plugin (`fine`) after them.
fn a_wave_with_two_hung_constructors(runner_limit_s: u64, in_process_limit_s: u64) -> PluginsDir {
    let dir = PluginsDir::new();
    dir.python("init-hang", "faulty")
        .manifest_fields(
            "init-hang",
            json!({"name": "aaa-hang", "limits": {"init_timeout_s": runner_limit_s}}),
        )
        .library(
            "a-hangs",
            forgesyte_tests::zoo::FAULTY_LIBRARY,
            json!({"isolation": "in-process", "config": {"fault_at_init": "hang"},
                   "limits": {"init_timeout_s": in_process_limit_s}}),
        )
        .good("fine", json!({}));
    dir
}

/// A plugin whose runner is constructed serves while another of its load
/// wave still constructs: it was LOADED (503) until the slowest of the
/// wave ended, a hung constructor's whole init timeout, at start and on
/// every rescan that retried the hung one.
#[test]
fn a_constructed_plugin_serves_while_another_of_its_wave_still_constructs() {
    let dir = PluginsDir::new();
    dir.python("init-hang", "faulty")
        .manifest_fields("init-hang", json!({"limits": {"init_timeout_s": 20}}));
    dir.python("snoop", "snoop");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    wait_initialized_within_15_s(&server, "snoop");
    let hang = server.get("/v1/plugins/init-hang/health").json();
    assert_eq!(hang["state"], "LOADED", "{hang}");
    let reply = server.run("snoop", "address_space", "{}");
    assert_eq!(reply.status, 200, "{}", reply.text());
    drop(server);
    // A rescan of both: each outcome's time is its own, not the wave's.
    dir.manifest_fields("init-hang", json!({"limits": {"init_timeout_s": 6}}));
    let token = "python-reload-token-0123456789";
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    // snoop changed, init-hang retried: one wave.
    let plugin = dir.path().join("snoop").join("plugin.py");
    let source = std::fs::read_to_string(&plugin).unwrap();
    std::fs::write(&plugin, format!("{source}\n# changed\n")).unwrap();
    let reload = crate::support::admin_post(server.addr, "/v1/plugins/reload", token);
    assert_eq!(reload.status, 200, "{}", reload.text());
    let report = reload.json();
    let elapsed = |name: &str| {
        report["plugins"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == name))
            .and_then(|p| p["elapsed_ms"].as_f64())
            .unwrap_or_else(|| panic!("{name}: {report}"))
    };
    // snoop's own start is what a loaded machine stretches; the wave's
    // time would be init-hang's 6 s.
    assert!(elapsed("init-hang") >= 6000.0, "{report}");
    assert!(elapsed("snoop") < 4500.0, "{report}");
}

/// The same for in-process plugins: one constructed serves while an
/// in-process constructor of its wave hangs, and while a runner of its
/// wave still constructs (the pass's own thread waits for runners' starts
/// before it waits for constructions). Both sort before it: the runner
/// held the only worker of a 2-core host, and the hung constructor the
/// only construction thread.
#[test]
fn an_in_process_plugin_serves_while_others_of_its_wave_still_construct() {
    let dir = a_wave_with_two_hung_constructors(20, 20);
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    wait_initialized_within_15_s(&server, "fine");
    for name in ["aaa-hang", "a-hangs"] {
        let health = server.get(&format!("/v1/plugins/{name}/health")).json();
        assert_eq!(health["state"], "LOADED", "{health}");
    }
    let reply = server.run("fine", "echo", r#"{"args": {"x": 1}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// An in-process constructor that hangs is FAILED at its time limit while
/// a runner of its wave still constructs: the pass's own thread, waiting
/// for the runners' starts, watches the constructions too (it gave up on
/// them only once every runner had started).
#[test]
fn a_hung_in_process_constructor_fails_at_its_limit_while_a_runner_still_constructs() {
    let dir = a_wave_with_two_hung_constructors(30, 1);
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    wait_initialized_within_15_s(&server, "fine");
    let failed = wait_state_within_15_s(&server, "a-hangs", "FAILED");
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("timed out after 1 s during construction in process"),
        "{failed}"
    );
    // The runner is still in its 30 s construction.
    let runner = server.get("/v1/plugins/aaa-hang/health").json();
    assert_eq!(runner["state"], "LOADED", "{runner}");
}

/// A result nested deeper than the host reads (200 lists, serde_json reads
/// 128) is that call's tool error, `ResultTooDeep`: the plugin is not
/// broken, and nothing restarts (it was a protocol fault: the plugin
/// FAILED, its runner killed with its other calls).
#[test]
fn a_result_nested_too_deep_is_a_tool_error_not_a_fault() {
    let dir = PluginsDir::new();
    dir.python("deep", "faulty");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let reply = server.run("deep", "deep", r#"{"args": {"n": 200}}"#);
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error_type"],
        "ResultTooDeep",
        "{}",
        reply.text()
    );
    let health = server.get("/v1/plugins/deep/health").json();
    assert_eq!(
        (
            &health["state"],
            &health["restart_count"],
            &health["error_count"]
        ),
        (&json!("INITIALIZED"), &json!(0), &json!(1)),
        "{health}"
    );
    let reply = server.run("deep", "deep", r#"{"args": {"n": 100}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut depth = 0;
    let mut value = &reply.json()["result"]["d"];
    while let Some([inner]) = value.as_array().map(Vec::as_slice) {
        depth += 1;
        value = inner;
    }
    assert_eq!(depth, 100, "{}", reply.text());
}

/// Numbers cross the host as Python's json reads them: a float as the
/// nearest double (no ulp lost on the way in or out: serde_json's
/// `float_roundtrip`), an integer exactly within 64 bits. An integer past a
/// float's range (`10 ** 400`), which the host cannot read, is that call's
/// tool error (422 `ValueError`), not a protocol fault that restarts the
/// plugin; one in range is answered (as a float past 64 bits).
#[test]
fn numbers_cross_as_python_reads_them_and_one_the_host_cannot_read_is_a_tool_error() {
    let dir = PluginsDir::new();
    dir.python("big", "faulty");
    dir.python("echo", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let args = r#"{"a":90.28571428571429,"b":0.30000000000000004,"c":5e-324,"d":18446744073709551615,"e":-9223372036854775808,"f":1.7976931348623157e+308}"#;
    let reply = server.run("echo", "echo", &format!(r#"{{"args": {args}}}"#));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.text().contains(&format!(r#""result":{args}"#)),
        "{}",
        reply.text()
    );
    let reply = server.run("big", "bignum", r#"{"args": {"e": 400}}"#);
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.json()["error_type"], "ValueError", "{}", reply.text());
    let health = server.get("/v1/plugins/big/health").json();
    assert_eq!(
        (&health["state"], &health["restart_count"]),
        (&json!("INITIALIZED"), &json!(0)),
        "{health}"
    );
    let reply = server.run("big", "bignum", r#"{"args": {"e": 300}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["result"]["n"],
        json!(1e300),
        "{}",
        reply.text()
    );
}

/// The admin token of the servers [`serving_a_call`] starts.
const ADMIN_TOKEN: &str = "a-long-enough-admin-token";

/// A server over `dir` (admin token [`ADMIN_TOKEN`]) with a call of `tool`
/// of `plugin` (`body`) in flight on a thread of its own.
fn serving_a_call(
    dir: &PluginsDir,
    plugin: &str,
    tool: &str,
    body: &'static str,
) -> (Forgesyte, std::thread::JoinHandle<crate::support::Reply>) {
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    server.wait_loaded();
    let addr = server.addr;
    let target = format!("/v1/plugins/{plugin}/tools/{tool}/run");
    let call = std::thread::spawn(move || {
        http_with(
            addr,
            "POST",
            &target,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    });
    let health = format!("/v1/plugins/{plugin}/health");
    crate::rescan::wait_for(
        "the call in flight",
        std::time::Duration::from_secs(10),
        &server,
        || (server.get(&health).json()["in_flight"] == 1).then_some(()),
    );
    (server, call)
}

/// Calls `tool` of `plugin` with `body` on a thread of its own, reloads the
/// plugin once the call is in flight, and returns the call's answer; the
/// plugin is INITIALIZED after, never restarted.
fn reloaded_during_a_call(
    dir: &PluginsDir,
    plugin: &str,
    tool: &str,
    body: &'static str,
) -> (crate::support::Reply, Value) {
    let (server, call) = serving_a_call(dir, plugin, tool, body);
    let reload = crate::support::admin_post(
        server.addr,
        &format!("/v1/plugins/{plugin}/reload"),
        ADMIN_TOKEN,
    );
    assert_eq!(reload.status, 200, "{}", reload.text());
    let answer = call.join().unwrap();
    let health = server.get(&format!("/v1/plugins/{plugin}/health")).json();
    assert_eq!(
        (&health["state"], &health["restart_count"]),
        (&json!("INITIALIZED"), &json!(0)),
        "{health}"
    );
    (answer, health)
}

/// A reload that lets a runner go while a call runs on it (its
/// `on_unload` taking 1.5 s): once the call has ended, the plugin is
/// LOADED, being reloaded, until its new instance is up. It showed
/// INITIALIZED without an instance (no reason, `/readyz` ready, every call
/// a 503) until its old runner had ended (from a review).
#[test]
fn a_plugin_whose_calls_end_during_its_reload_shows_loaded() {
    let dir = PluginsDir::new();
    dir.python("slow-unload", "faulty");
    let (server, call) = serving_a_call(&dir, "slow-unload", "ok", r#"{"args": {"after_s": 0.5}}"#);
    let addr = server.addr;
    let health = "/v1/plugins/slow-unload/health";
    let reload = std::thread::spawn(move || {
        crate::support::admin_post(addr, "/v1/plugins/slow-unload/reload", ADMIN_TOKEN)
    });
    // The reload lets the runner go while the call sleeps; the call ends
    // about 1 s before the old runner's unload does.
    let answered = call.join().unwrap();
    let during = server.get(health).json();
    let reloaded = reload.join().unwrap();
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert!(matches!(answered.status, 200 | 503), "{}", answered.text());
    assert_eq!(during["state"], "LOADED", "{during}\n{}", server.log());
    assert!(
        during["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("being reloaded")),
        "{during}"
    );
    assert_eq!(server.get(health).json()["state"], "INITIALIZED");
}

/// A manifest's `workers` (a count of processes other hosts start) is not
/// used here: the log says so at WARN once per plugin and manifest (each
/// reload said it again), and the plugin serves; an edited manifest that
/// still has it is said again.
#[test]
fn a_manifest_s_workers_count_is_said_to_be_unused() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo")
        .manifest_fields("echo", json!({"workers": 3}))
        .python("single", "echo")
        .manifest_fields("single", json!({"workers": 1}));
    let token = "a-long-enough-admin-token";
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    assert_eq!(server.run("echo", "echo", "{}").status, 200);
    for _ in 0..2 {
        let reload = crate::support::admin_post(server.addr, "/v1/plugins/echo/reload", token);
        assert_eq!(reload.status, 200, "{}", reload.text());
    }
    let said = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("\"workers\"") && l.contains("is not used"))
            .map(str::to_owned)
            .collect()
    };
    let log = server.log();
    let once = said(&log);
    assert_eq!(once.len(), 1, "{log}");
    assert!(
        once[0].contains("WARN") && once[0].contains("Plugin echo: its manifest's \"workers\": 3"),
        "{}",
        once[0]
    );
    dir.manifest_fields("echo", json!({"workers": 4}));
    let reload = crate::support::admin_post(server.addr, "/v1/plugins/echo/reload", token);
    assert_eq!(reload.status, 200, "{}", reload.text());
    let again = said(&server.log());
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again[1].contains("\"workers\": 4"), "{}", again[1]);
}

/// A runner that does not end within the host's 2 s after a reload let it
/// go (its `on_unload` holds the interpreter's lock in C) is killed, and
/// the log says so: it vanished without a word. The reload is not held up.
#[test]
fn a_runner_killed_for_outliving_its_stop_is_named_in_the_log() {
    // The place goes to the log whether or not stderr is withheld from
    // the API (no answer carries it).
    for withhold in ["0", "1"] {
        let dir = PluginsDir::new();
        dir.python("stuck-unload", "faulty");
        let token = "a-long-enough-admin-token";
        let server = Forgesyte::start_with_env(
            &["--plugins", dir.path_str()],
            &[
                ("FORGESYTE_ADMIN_TOKEN", token),
                ("FORGESYTE_WITHHOLD_STDERR", withhold),
            ],
        );
        server.wait_loaded();
        let reload =
            crate::support::admin_post(server.addr, "/v1/plugins/stuck-unload/reload", token);
        assert_eq!(reload.status, 200, "{}", reload.text());
        assert_eq!(reload.json()["state"], "INITIALIZED", "{}", reload.text());
        let said =
            "did not exit within 2 s of its input's end (its on_unload still running?); killed";
        crate::rescan::wait_for(
            "the kill logged",
            std::time::Duration::from_secs(15),
            &server,
            || server.log().contains(said).then_some(()),
        );
        let log = server.log();
        let line = log.lines().find(|l| l.contains(said)).unwrap_or_default();
        assert!(
            line.contains("WARN") && line.contains("stuck-unload"),
            "withhold {withhold}: {line}"
        );
        // Where: the runner's stack dump, asked for before the kill.
        assert!(
            line.contains("; killed (stuck at ")
                && line.contains("plugin.py:")
                && line.contains(" in on_unload"),
            "withhold {withhold}: {line}"
        );
        // Not told as a timeout: it was only stopped.
        assert!(
            !log.contains("timed out stuck at"),
            "withhold {withhold}: {log}"
        );
        let ok = server.run("stuck-unload", "ok", "{}");
        assert_eq!(ok.status, 200, "{}", ok.text());
    }
}

/// A call in flight when a reload lets its runner go is told so (503
/// `PluginNotRunnable`, send it again), not answered as a crash that made
/// the plugin FAILED. One that crashes the runner while it is being let
/// go (its `on_unload` takes 1.5 s) is answered as the crash it is.
#[test]
fn a_call_whose_runner_a_reload_lets_go_is_told_so_not_a_crash() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    let (answer, health) =
        reloaded_during_a_call(&dir, "echo", "sleep", r#"{"args": {"ms": 5000}}"#);
    // Not counted: neither the plugin's doing nor its new instance's.
    assert_eq!(health["error_count"], 0, "{health}");
    assert_eq!(answer.status, 503, "{}", answer.text());
    // Sent again, it reaches the new instance: when, the header says.
    assert_eq!(answer.header("retry-after"), Some("1"), "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["error_type"], "PluginNotRunnable", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("stopped the plugin's process")),
        "{body}"
    );
    // It says what happened, and the plugin's state as the call ended (the
    // old instance's, or the new one's being built): not that a RUNNING
    // plugin "cannot run tools".
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish") && !e.contains("cannot run tools")),
        "{body}"
    );
    assert!(
        matches!(
            body["state"].as_str(),
            Some("INITIALIZED" | "RUNNING" | "LOADED")
        ),
        "{body}"
    );
    let dir = PluginsDir::new();
    dir.python("slow-unload", "faulty");
    let (crash, _) =
        // 1 s: the reload must begin before the crash, and the crash come
        // within the 1.5 s unload.
        reloaded_during_a_call(&dir, "slow-unload", "exit", r#"{"args": {"after_s": 1.0}}"#);
    assert_eq!(crash.status, 502, "{}", crash.text());
    assert_eq!(crash.json()["error_type"], "CrashError", "{}", crash.text());
    assert!(
        crash.text().contains("exited with code 3"),
        "{}",
        crash.text()
    );
}

/// Modules in the server's working directory are never imported in place
/// of the standard library's by the host's Python (the zygote, the
/// runners, the dependency check, the entry-point discovery): `-c` put the
/// working directory first on `sys.path`, and a `contextvars.py` there ran
/// in the zygote, unconfined, before any plugin was checked (from a
/// review).
#[test]
fn the_working_directory_shadows_no_module_of_the_hosts_python() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo")
        .manifest_fields("echo", json!({"dependencies": ["json"]}));
    let cwd = tempfile::tempdir().unwrap();
    let marker = cwd.path().join("shadow-ran");
    for module in ["contextvars", "json", "importlib_metadata", "base64"] {
        std::fs::write(
            cwd.path().join(format!("{module}.py")),
            format!(
                "open({:?}, 'a').write('{module}\\n')\nraise ImportError('shadowed')\n",
                marker.display().to_string()
            ),
        )
        .unwrap();
    }
    let output = crate::support::forgesyte_command()
        .current_dir(cwd.path())
        .args(["check", "--python-entry-points", dir.path_str()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        !marker.exists(),
        "{:?}\n{out}",
        std::fs::read_to_string(&marker)
    );
    assert_eq!(output.status.code(), Some(0), "{out}");
}

/// A plugin that lists more tools than the host takes (1,024) is FAILED
/// naming the count, and the server, its health routes and the other
/// plugins carry on: the server kept such a list for as long as the plugin
/// was loaded and served it to any client (250,000 tools took it to
/// 577 MB; sixteen reads at once, to 1.9 GB).
#[test]
fn a_plugin_listing_too_many_tools_is_failed_naming_the_count() {
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    let many = dir.path().join("many");
    std::fs::create_dir_all(&many).unwrap();
    std::fs::write(
        many.join("manifest.json"),
        json!({"name": "many", "version": "1.0.0", "runtime": "python"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        many.join("plugin.py"),
        "class Plugin:\n\
         \x20   def __init__(self):\n\
         \x20       obj = {'type': 'object'}\n\
         \x20       self.tools = {'t%d' % i: {'handler': self.noop, 'description': '',\n\
         \x20                                 'input_schema': obj, 'output_schema': obj}\n\
         \x20                     for i in range(2000)}\n\
         \x20   def noop(self, **args):\n\
         \x20       return {}\n",
    )
    .unwrap();
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/many/health");
    assert_eq!(health.status, 200, "{}", health.text());
    let health = health.json();
    assert_eq!(health["state"], "FAILED", "{health}");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("its tool list names 2000 tools; the host takes at most 1024"),
        "{reason}"
    );
    assert_eq!(
        server.run("echo", "echo", r#"{"args": {"k": 1}}"#).status,
        200
    );
}

/// The seed's debug markers, at its level: its module imported, then its
/// instance made, for a Python plugin (in its runner) and a native one
/// (in process) alike.
#[test]
fn the_seeds_debug_markers_are_logged() {
    let dir = PluginsDir::new();
    dir.python("pyecho", "echo").good("native", json!({}));
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("RUST_LOG", "forgesyte_loader=debug,info")],
    );
    server.wait_loaded();
    let log = server.log();
    for name in ["pyecho", "native"] {
        let imported = log.find(&format!("✓ Imported plugin module: {name}"));
        let made = log.find(&format!("✓ Instantiated plugin: {name}"));
        assert!(
            imported.is_some() && made.is_some() && imported < made,
            "{name}: {log}"
        );
    }
}
