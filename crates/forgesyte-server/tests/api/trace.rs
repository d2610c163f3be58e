//! Request ids and W3C `traceparent`s reach the plugins with their calls:
//! a Python plugin sees them (`forgesyte_runner.current_call`) and its log
//! lines of the call carry them in the server's log (`--log-format json`);
//! an invalid `traceparent` is not passed on; a native plugin, in process
//! and isolated, sees them through the SDK's `current_call()` and an
//! isolated one's `log` lines carry them; the host's own lines logged
//! during an in-process call carry the request's id.

use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir, Reply, http_with};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn run_with(
    server: &Forgesyte,
    plugin: &str,
    tool: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    http_with(
        server.addr,
        "POST",
        &format!("/v1/plugins/{plugin}/tools/{tool}/run"),
        headers,
        body.as_bytes(),
    )
}

/// The server's JSON log line whose message satisfies `matches`, waited
/// for (a runner's stderr line is logged by another thread than the
/// answer).
fn log_line(server: &Forgesyte, matches: impl Fn(&str) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(line) = logged(server, &matches) {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no such line in:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The server's JSON log line whose message satisfies `matches`, if it is
/// in the log now.
fn logged(server: &Forgesyte, matches: impl Fn(&str) -> bool) -> Option<Value> {
    // An in-process plugin's panic message is the only line not JSON.
    server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"].as_str().is_some_and(&matches))
}

/// A Python plugin's DEBUG records reach the server's log when it takes
/// plugins' DEBUG lines (`RUST_LOG=…,forgesyte_loader::plugin_stderr=debug`),
/// at DEBUG (its runner's root logger was at INFO whatever the filter);
/// under the default filter none is logged.
#[test]
fn a_python_plugins_debug_records_follow_the_servers_log_filter() {
    for (filter, debug_logged) in [
        ("info", false),
        ("info,forgesyte_loader::plugin_stderr=debug", true),
    ] {
        let dir = PluginsDir::new();
        dir.python("traced", "traced");
        let server = Forgesyte::start_with_env(
            &["--plugins", dir.path_str()],
            &[("FORGESYTE_LOG_FORMAT", "json"), ("RUST_LOG", filter)],
        );
        server.wait_loaded();
        let reply = run_with(
            &server,
            "traced",
            "whoami",
            r#"{"args": {"say": "hi"}}"#,
            &[],
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        // Written after the DEBUG record, on the same pipe.
        log_line(&server, |m| m.ends_with("whoami says hi"));
        match logged(&server, |m| m.ends_with("whoami debug hi")) {
            Some(line) if debug_logged => assert_eq!(line["level"], "DEBUG", "{line}"),
            None if !debug_logged => {}
            other => panic!("{filter}: {other:?}"),
        }
    }
}

#[test]
fn a_python_plugin_sees_the_request_id_and_traceparent_and_logs_with_them() {
    let dir = PluginsDir::new();
    dir.python("traced", "traced");
    dir.good("native", json!({}));
    dir.good("isolated", json!({"isolation": "process"}));
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_LOG_FORMAT", "json")],
    );
    server.wait_loaded();

    let reply = run_with(
        &server,
        "traced",
        "whoami",
        r#"{"args": {"say": "first"}}"#,
        &[("x-request-id", "abc-123"), ("traceparent", TRACEPARENT)],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    let seen = &reply.json()["result"];
    let expected =
        json!({"request_id": "abc-123", "traceparent": TRACEPARENT, "trace_id": TRACE_ID});
    for view in [&seen["in_task"], &seen["in_thread"]] {
        assert_eq!(view, &expected, "{seen}");
    }
    assert_eq!(seen["request_id"], "abc-123", "{seen}");
    assert_eq!(seen["traceparent"], TRACEPARENT, "{seen}");
    let line = log_line(&server, |m| m.ends_with("whoami says first"));
    assert_eq!(line["fields"]["request_id"], "abc-123", "{line}");
    assert_eq!(line["fields"]["trace_id"], TRACE_ID, "{line}");
    assert_eq!(line["fields"]["plugin"], "traced", "{line}");
    assert_eq!(
        line["fields"]["message"], "traced: whoami says first",
        "{line}"
    );
    assert_eq!(line["level"], "WARN", "{line}");

    // A record longer than a stderr line is kept whole (4 KiB) is logged in
    // pieces, each with the record's level and call.
    let long = format!("{}-end-of-long", "x".repeat(6000));
    let reply = run_with(
        &server,
        "traced",
        "whoami",
        &json!({"args": {"say": long}}).to_string(),
        &[("x-request-id", "abc-long")],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let last = log_line(&server, |m| m.ends_with("-end-of-long"));
    assert_eq!(
        (&last["level"], &last["fields"]["request_id"]),
        (&json!("WARN"), &json!("abc-long")),
        "{last}"
    );

    // An invalid traceparent is ignored: the id alone goes on.
    let reply = run_with(
        &server,
        "traced",
        "whoami",
        r#"{"args": {"say": "second"}}"#,
        &[
            ("x-request-id", "abc-456"),
            (
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = &reply.json()["result"];
    assert_eq!(seen["request_id"], "abc-456", "{seen}");
    assert_eq!(seen["traceparent"], Value::Null, "{seen}");
    let line = log_line(&server, |m| m.ends_with("whoami says second"));
    assert_eq!(line["fields"]["request_id"], "abc-456", "{line}");
    assert!(line["fields"].get("trace_id").is_none(), "{line}");

    // Without headers the plugin gets the id the server made and answered.
    let reply = run_with(
        &server,
        "traced",
        "whoami",
        r#"{"args": {"say": "third"}}"#,
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let made = reply
        .header("x-request-id")
        .expect("an x-request-id")
        .to_owned();
    assert_eq!(reply.json()["result"]["request_id"], made.as_str());
    let line = log_line(&server, |m| m.ends_with("whoami says third"));
    assert_eq!(line["fields"]["request_id"], made.as_str(), "{line}");

    // A native runner takes the context with the call (and cannot pass it
    // on: the C ABI has no place for it); the call is served as usual.
    let reply = run_with(
        &server,
        "isolated",
        "echo",
        r#"{"args": {"x": 1}}"#,
        &[("x-request-id", "abc-321"), ("traceparent", TRACEPARENT)],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["result"], json!({"x": 1}));
    assert_eq!(reply.header("x-request-id"), Some("abc-321"));

    // In-process, the host's lines logged during the call (here: the plugin
    // marked FAILED after its tool panicked) carry the request's id.
    let reply = run_with(
        &server,
        "native",
        "panic",
        "{}",
        &[("x-request-id", "abc-789")],
    );
    assert_eq!(reply.status, 502, "{}", reply.text());
    let line = log_line(&server, |m| m.starts_with("✗ Plugin FAILED: native"));
    assert_eq!(line["span"]["request_id"], "abc-789", "{line}");
}

#[test]
fn a_native_plugin_sees_the_request_id_and_traceparent_in_process_and_isolated() {
    let dir = PluginsDir::new();
    // The `faulty` fixture's `context` tool: what the SDK's `current_call()`
    // sees (it also logs through the SDK's `log`).
    let faulty = forgesyte_tests::zoo::FAULTY_LIBRARY;
    dir.library("native", faulty, json!({"isolation": "in-process"}))
        .library("isolated", faulty, json!({"isolation": "process"}));
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str(), "--log-format", "json"],
        &[("RUST_LOG", "info")],
    );
    server.wait_loaded();
    for plugin in ["native", "isolated"] {
        let id = format!("req-{plugin}");
        let reply = run_with(
            &server,
            plugin,
            "context",
            r#"{"args": {}}"#,
            &[("x-request-id", &id), ("traceparent", TRACEPARENT)],
        );
        assert_eq!(reply.status, 200, "{plugin}: {}", reply.text());
        let result = &reply.json()["result"];
        assert_eq!(result["request_id"], id.as_str(), "{plugin}: {result}");
        assert_eq!(result["trace_id"], TRACE_ID, "{plugin}: {result}");
        // Without headers the server's own id still arrives; no trace.
        let reply = run_with(&server, plugin, "context", r#"{"args": {}}"#, &[]);
        let result = &reply.json()["result"];
        let made = reply.header("x-request-id").unwrap_or_default().to_owned();
        assert_eq!(result["request_id"], made.as_str(), "{plugin}: {result}");
        assert_eq!(result["trace_id"], Value::Null, "{plugin}: {result}");
    }
    // Each plugin's line through the SDK's `log` is a record of the log
    // with the call's fields and the plugin's name: the isolated one's
    // through its runner's stderr, the in-process one's through the log
    // function the host handed its library (it was a bare text line on the
    // server's stderr, in the middle of the JSON records).
    for plugin in ["native", "isolated"] {
        let id = format!("req-{plugin}");
        let line = log_line(&server, |m| m.contains("the context tool ran"));
        let line = if line["fields"]["request_id"] == id.as_str() {
            line
        } else {
            let log = server.log();
            log.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| {
                    l["fields"]["request_id"] == id.as_str()
                        && l["fields"]["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("the context tool ran"))
                })
                .unwrap_or_else(|| panic!("no line of {plugin} in:\n{log}"))
        };
        assert_eq!(line["fields"]["trace_id"], TRACE_ID, "{line}");
        assert_eq!(line["fields"]["plugin"], plugin, "{line}");
        assert_eq!(line["target"], "forgesyte_loader::plugin_stderr", "{line}");
    }
    let log = server.log();
    for text in log.lines().filter(|l| l.contains("the context tool ran")) {
        assert!(
            serde_json::from_str::<Value>(text).is_ok(),
            "not a JSON record: {text}"
        );
    }
    // In process, a line from a thread the plugin started still names it
    // (the library's plugin), and a long WARNING line keeps its level and
    // is cut into records of at most 4 KiB, as a runner's stderr is.
    let reply = run_with(&server, "native", "log_more", r#"{"args": {}}"#, &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let line = log_line(&server, |m| m.contains("from a thread of its own"));
    assert_eq!(line["fields"]["plugin"], "native", "{line}");
    let _ = log_line(&server, |m| m.starts_with("faulty: long x"));
    let log = server.log();
    let long: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["fields"]["plugin"] == "native"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("faulty: long x") || m.starts_with("xxxx"))
        })
        .collect();
    assert_eq!(long.len(), 3, "{long:#?}");
    for record in &long {
        assert_eq!(record["level"], "WARN", "{record}");
        assert!(
            record["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .len()
                <= 4096
        );
    }
}
