//! A server that cannot be starved through one plugin: clients that hang up
//! do not free their call's slot before the plugin returns (so a plugin's
//! calls in progress stay within `--max-calls-per-plugin`), and a call that
//! found no free thread to run it within its time limit answers 503 without
//! touching its plugin (the limit counts from the call's start); and the
//! request bodies clients can make the server hold are bounded, in size
//! and in how long a slow client may hold them.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Forgesyte, PluginsDir, Reply, http, http_with};

/// Sends a call of `plugin`'s tool `sleep`; the answer is never read.
fn send_call(server: &Forgesyte, plugin: &str, body: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let request = format!(
        "POST /v1/plugins/{plugin}/tools/sleep/run HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

/// The answer on `stream` so far, if any has come (without waiting).
fn answered(stream: &TcpStream) -> Option<String> {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let read = stream.peek(&mut buf);
    stream.set_nonblocking(false).unwrap();
    match read {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// Sends a tool call and hangs up at once, without reading the answer.
fn abandoned_call(server: &Forgesyte, plugin: &str, body: &str) {
    drop(send_call(server, plugin, body));
}

/// `count` calls of `plugin`'s tool `sleep` with `body`, each on a thread
/// of its own, all at once.
fn calls_at_once(
    server: &Forgesyte,
    plugin: &str,
    body: &'static str,
    count: usize,
) -> Vec<std::thread::JoinHandle<Reply>> {
    (0..count)
        .map(|_| {
            let addr = server.addr;
            let target = format!("/v1/plugins/{plugin}/tools/sleep/run");
            std::thread::spawn(move || http(addr, "POST", &target, body.as_bytes()))
        })
        .collect()
}

fn in_flight(server: &Forgesyte, plugin: &str) -> u64 {
    let health = server.get(&format!("/v1/plugins/{plugin}/health")).json();
    health["in_flight"].as_u64().unwrap_or_default()
}

/// Waits at most `limit` for `plugin` to have `calls` calls running.
fn wait_in_flight(server: &Forgesyte, plugin: &str, calls: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while in_flight(server, plugin) < calls {
        assert!(
            Instant::now() < deadline,
            "{plugin} never had {calls} calls running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn calls_whose_clients_hung_up_keep_their_slot_until_the_plugin_returns() {
    let dir = PluginsDir::new();
    dir.good("slow", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--max-calls-per-plugin", "3"]);
    server.wait_loaded();
    // Calls long enough to outlast the test: the slots they hold stay held.
    let body = r#"{"args": {"ms": 6000}}"#;
    // The limit's worth of calls running (a call whose client hangs up
    // before it started is cancelled), then their clients hang up, and
    // nine more calls come whose clients hang up at once.
    let running: Vec<TcpStream> = (0..3).map(|_| send_call(&server, "slow", body)).collect();
    wait_in_flight(&server, "slow", 3, Duration::from_secs(5));
    drop(running);
    for _ in 0..9 {
        abandoned_call(&server, "slow", body);
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_millis(800);
    let mut most = 0;
    while Instant::now() < deadline {
        most = most.max(in_flight(&server, "slow"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        most <= 3,
        "{most} calls of the plugin in progress, its limit is 3"
    );
    // Its slots are taken by the calls still running, though their clients
    // are gone: a new call is refused.
    let refused = server.run("slow", "sleep", body);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error_type"], "TooManyCalls");
}

#[test]
fn a_call_that_finds_no_free_thread_answers_503_and_leaves_its_plugin_alone() {
    // One blocking thread, so the per-core lanes and it are all busy with
    // the slow plugin's calls (20 s each, within their 30 s limit); the quick plugin's
    // call (1 s limit) waits for a thread past its limit. Calls to plugins
    // in runner processes need none and are answered.
    let dir = PluginsDir::new();
    dir.good("slow", json!({"limits": {"call_timeout_s": 30}}));
    dir.good("quick", json!({}));
    // Calls to runner processes take no thread: awaited by their request.
    dir.good("isolated", json!({"isolation": "process"}));
    dir.python("py", "echo");
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str(), "--call-timeout", "1"],
        &[("FORGESYTE_BLOCKING_THREADS", "1")],
    );
    server.wait_loaded();
    let lanes = std::thread::available_parallelism().map_or(1, usize::from);
    // Long enough that the last to start (the blocking thread may still be
    // ending the load pass on a loaded machine) finds the first still busy.
    // Their answers are never read: a call that waits for the one blocking
    // thread behind another answers only after the client's read timeout.
    let body = r#"{"args": {"ms": 20000}}"#;
    let mut busy: Vec<TcpStream> = (0..=lanes)
        .map(|_| send_call(&server, "slow", body))
        .collect();
    // Every thread busy: the lanes and the one blocking thread. Under load a
    // lane can wake later than the 2 ms after which a queued call goes to
    // the blocking pool: the call then waits for its one thread while the
    // lane idles. Another call, every 200 ms, gives the idle lane one more
    // chance.
    let deadline = Instant::now() + Duration::from_secs(60);
    while in_flight(&server, "slow") < (lanes + 1) as u64 {
        assert!(
            Instant::now() < deadline,
            "slow never had {} calls running",
            lanes + 1
        );
        std::thread::sleep(Duration::from_millis(200));
        if in_flight(&server, "slow") < (lanes + 1) as u64 {
            busy.push(send_call(&server, "slow", body));
        }
    }
    let reply = server.run("quick", "sleep", r#"{"args": {"ms": 1}}"#);
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error_type"], "ServerBusy", "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    let health = server.get("/v1/plugins/quick/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    for runner in ["isolated", "py"] {
        let reply = server.run(runner, "echo", r#"{"args": {"x": 1}}"#);
        assert_eq!(reply.status, 200, "{runner}: {}", reply.text());
    }
    // Their clients hang up: the calls still waiting for a thread are
    // cancelled, the running ones run out.
    drop(busy);
    let deadline = Instant::now() + Duration::from_secs(60);
    while in_flight(&server, "slow") > 0 {
        assert!(Instant::now() < deadline, "slow's calls never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Threads free again: the quick plugin answers.
    let reply = server.run("quick", "sleep", r#"{"args": {"ms": 1}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn a_python_plugin_runs_its_whole_call_limit_at_once() {
    // A thread per call in progress in the runner: 64 of them (the default
    // limit) fit its memory limit's address space.
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let calls = calls_at_once(&server, "echo", r#"{"args": {"ms": 1500}}"#, 64);
    let statuses: Vec<(u16, String)> = calls
        .into_iter()
        .map(|c| {
            let reply = c.join().unwrap();
            (reply.status, reply.text())
        })
        .collect();
    let failed: Vec<_> = statuses.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of 64 failed: {:?}",
        failed.len(),
        failed.first()
    );
}

#[test]
fn an_in_process_call_past_its_limit_fails_its_plugin_even_when_its_client_hung_up() {
    let dir = PluginsDir::new();
    dir.good("stuck", json!({}));
    // 3 s: the call must still be seen in flight before its limit takes
    // it out.
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--call-timeout", "3"]);
    server.wait_loaded();
    // The call starts (a call whose client hangs up before it started never
    // runs), then its client hangs up.
    let stream = send_call(&server, "stuck", r#"{"args": {"ms": 8000}}"#);
    wait_in_flight(&server, "stuck", 1, Duration::from_secs(10));
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = server.get("/v1/plugins/stuck/health").json();
        if health["state"] == "FAILED" {
            let reason = health["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("timed out"), "{health}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after its time limit: {health}",
            health["state"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The request bodies of calls in progress cannot make the server hold
/// memory without bound: room is taken from `--body-memory` as a body's
/// bytes arrive (a length announced and never sent holds none); past it a
/// call answers 503 `ServerBusy` at once, and room comes back with the
/// bytes.
#[test]
fn request_bodies_fill_a_bounded_room() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--body-limit",
        "1048576",
        "--body-memory",
        "2097152",
    ]);
    server.wait_loaded();
    // Sends a call's head announcing `len` bytes, then `sent` of them.
    let partial = |len: usize, sent: usize| {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        let head = format!(
            "POST /v1/plugins/alpha/tools/echo/run HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&vec![b' '; sent]).unwrap();
        stream
    };
    let call = |bytes: usize| {
        let body = format!(r#"{{"args": {{"x": "{}"}}}}"#, "a".repeat(bytes));
        http(
            server.addr,
            "POST",
            "/v1/plugins/alpha/tools/echo/run",
            body.as_bytes(),
        )
    };
    // Lengths alone hold nothing.
    let announced: Vec<TcpStream> = (0..8).map(|_| partial(1 << 20, 0)).collect();
    assert_eq!(call(60 << 10).status, 200);
    // Two bodies of 1000 KiB received so far leave 48 KiB: a 60 KiB call
    // finds no room once the server has read what was sent. (A call that
    // overlaps their reading may take room first and have one of them
    // refused instead: then they are sent again.)
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..10 {
        held = vec![partial(1 << 20, 1000 << 10), partial(1 << 20, 1000 << 10)];
        std::thread::sleep(Duration::from_millis(500));
        let reply = call(60 << 10);
        if reply.status != 200 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("no call was refused");
    assert_eq!(refused.status, 503, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error_type"], "ServerBusy", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("the 2 MiB set aside"),
        "{body}"
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    // A small call still fits, and health is not a tool call.
    assert_eq!(call(10).status, 200);
    assert_eq!(http(server.addr, "GET", "/v1/health", b"").status, 200);
    // Their requests end: the room comes back.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        let reply = call(60 << 10);
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(served.status, 200, "{}", served.text());
    // A length over the limit is refused before any of it is read.
    let mut over = partial(2 << 20, 0);
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut over, &mut answer).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    drop(announced);
}

/// Clients that send most of a large body and then trickle the rest, each
/// byte well within the body read timeout, no longer hold the bodies' room
/// for as long as they like: each is answered 408 once it falls behind
/// `--body-min-rate`, and the room is free again for other calls.
#[test]
fn bodies_trickled_below_the_minimum_rate_give_their_room_back() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--body-limit",
        "1048576",
        "--body-memory",
        "2097152",
        "--body-read-timeout",
        "1",
        // 1000 KiB earn about 0.1 s beyond the 1 s grace.
        "--body-min-rate",
        "10000000",
    ]);
    server.wait_loaded();
    let started = Instant::now();
    let trickled: Vec<_> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            stream
                .write_all(
                    b"POST /v1/plugins/alpha/tools/echo/run HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                      Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n",
                )
                .unwrap();
            stream.write_all(&vec![b' '; 1000 << 10]).unwrap();
            let mut writer = stream.try_clone().unwrap();
            // A byte every 300 ms (the read timeout is 1 s) until the
            // server answers and closes.
            std::thread::spawn(move || {
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(300));
                    if writer.write_all(b" ").is_err() {
                        return;
                    }
                }
            });
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut answer = String::new();
                std::io::Read::read_to_string(&mut stream, &mut answer).unwrap_or_default();
                (answer, started.elapsed())
            })
        })
        .collect();
    for reader in trickled {
        let (answer, elapsed) = reader.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("BodyTimeout"), "{answer}");
        assert!(answer.contains("minimum rate"), "{answer}");
        // The whole body at that pace would take 75 s.
        assert!(
            elapsed < Duration::from_secs(10),
            "answered after {elapsed:?}"
        );
    }
    // Their room is back: a call of 60 KiB (which two held bodies of
    // 1000 KiB leave no room for) is served.
    let body = format!(r#"{{"args": {{"x": "{}"}}}}"#, "a".repeat(60 << 10));
    let reply = http(
        server.addr,
        "POST",
        "/v1/plugins/alpha/tools/echo/run",
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn a_queued_call_whose_client_hung_up_never_runs_and_is_counted_rejected() {
    // Every call thread busy (the per-core lanes and one blocking thread):
    // one more call waits in the queue, and its client hangs up. When a
    // thread frees, it finds the call cancelled: the call never runs, and
    // its watch (gone on in a task of its own) counts it as rejected. It
    // used to wait for the start signal again after its end, a panic.
    let dir = PluginsDir::new();
    dir.good("slow", json!({}));
    let lanes = std::thread::available_parallelism().map_or(1, usize::from);
    // One slot more than the busy calls: the queued call takes the last.
    let max_calls = (lanes + 2).to_string();
    let server = Forgesyte::start_with_env(
        &[
            "--plugins",
            dir.path_str(),
            "--max-calls-per-plugin",
            &max_calls,
        ],
        &[("FORGESYTE_BLOCKING_THREADS", "1")],
    );
    server.wait_loaded();
    // Long enough for a few tries at queueing on a loaded machine (the
    // loop below tries for up to 10 s).
    let busy: Vec<TcpStream> = (0..=lanes)
        .map(|_| send_call(&server, "slow", r#"{"args": {"ms": 12000}}"#))
        .collect();
    wait_in_flight(&server, "slow", lanes as u64 + 1, Duration::from_secs(10));
    // The client hangs up only once its call holds its slot, so queued
    // (taking the slot and queueing happen in one step): a hang-up the
    // server reads with the request drops the request before its handler
    // runs, and nothing is counted (the test's flake on a loaded machine).
    // A probe finds the slots full (503, itself counted rejected) or one
    // free (a bad body answered before the call would run). A call that
    // came while a probe held that slot is refused too: it is sent again.
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let queued = 'queued: loop {
        assert!(
            Instant::now() < deadline,
            "no call queued; log:\n{}",
            server.log()
        );
        let call = send_call(&server, "slow", r#"{"args": {"ms": 1}}"#);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            if let Some(answer) = answered(&call) {
                assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
                refused += 1;
                break;
            }
            let probe = http_with(
                server.addr,
                "POST",
                "/v1/plugins/slow/tools/sleep/run",
                &[("Content-Type", "application/octet-stream")],
                b"x",
            );
            if probe.status == 503 && probe.text().contains("TooManyCalls") {
                break 'queued call;
            }
        }
    };
    assert_eq!(
        in_flight(&server, "slow"),
        lanes as u64 + 1,
        "the busy calls ended too soon"
    );
    assert_eq!(answered(&queued), None, "the queued call was answered");
    drop(queued);
    // Besides the hung-up call: the probe that found the slots full, and
    // the calls refused for a probe's slot.
    let rejected = format!(
        "forgesyte_tool_calls_total{{plugin=\"slow\",tool=\"sleep\",outcome=\"rejected\"}} {}",
        refused + 2
    );
    crate::rescan::wait_for(
        "the hung-up call counted rejected (besides the probe)",
        Duration::from_secs(30),
        &server,
        || {
            server
                .get("/metrics")
                .text()
                .contains(&rejected)
                .then_some(())
        },
    );
    let metrics = server.get("/metrics").text();
    assert!(
        !metrics.contains("outcome=\"internal\""),
        "a call that never ran counted as an internal error:\n{metrics}"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    // The busy calls all ran; the hung-up one is not among them.
    crate::rescan::wait_for(
        "the busy calls to end",
        Duration::from_secs(30),
        &server,
        || {
            let health = server.get("/v1/plugins/slow/health").json();
            (health["in_flight"] == 0).then_some(health)
        },
    );
    let health = server.get("/v1/plugins/slow/health").json();
    assert_eq!(health["success_count"], lanes + 1, "{health}");
    drop(busy);
}

#[test]
fn json_arguments_of_more_values_than_a_body_may_hold_are_refused_before_parsing() {
    // Parsed, `[0,0,…]` takes some sixty times its text: a 32 MiB body of
    // it made well over a GiB the body budget never counted. The body
    // limit bounds the values too (1 MiB: 8,192 of them).
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--body-limit", "1048576"]);
    server.wait_loaded();
    let many = format!(r#"{{"args": {{"a": [{}0]}}}}"#, "0,".repeat(10_000));
    let refused = http(
        server.addr,
        "POST",
        "/v1/plugins/alpha/tools/echo/run",
        many.as_bytes(),
    );
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.json()["error_type"], "PayloadTooLarge");
    // Refused before the call, and counted all the same (it used to be
    // seen only in the route's 4xx).
    let metrics = server.get("/metrics").text();
    let line = r#"forgesyte_tool_calls_total{plugin="alpha",tool="echo",outcome="bad_request"} 1"#;
    assert!(metrics.contains(line), "no {line} in\n{metrics}");
    assert!(
        refused.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("10003 values"),
        "{}",
        refused.text()
    );
    // Within the bound, and a long string (one value) of the same size: run.
    let fewer = format!(r#"{{"args": {{"a": [{}0]}}}}"#, "0,".repeat(8_000));
    let ran = http(
        server.addr,
        "POST",
        "/v1/plugins/alpha/tools/echo/run",
        fewer.as_bytes(),
    );
    assert_eq!(ran.status, 200, "{}", ran.text());
    let text = format!(r#"{{"args": {{"a": "{}"}}}}"#, "0,".repeat(10_000));
    let ran = http(
        server.addr,
        "POST",
        "/v1/plugins/alpha/tools/echo/run",
        text.as_bytes(),
    );
    assert_eq!(ran.status, 200, "{}", ran.text());
    let health = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(health["success_count"], 2, "{health}");
}

/// A call refused whatever its body holds is answered before its body is
/// read: an unknown plugin or tool (404), and a plugin at its limit of calls
/// in progress (503 `TooManyCalls`) answer a client that sent only the
/// head (and a long body to come) at once, not after the body read timeout.
#[test]
fn calls_refused_whatever_their_body_answer_before_the_body_is_read() {
    let dir = PluginsDir::new();
    dir.good("slow", json!({}));
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--max-calls-per-plugin",
        "1",
        "--body-read-timeout",
        "30",
    ]);
    server.wait_loaded();
    let busy = send_call(&server, "slow", r#"{"args": {"ms": 8000}}"#);
    wait_in_flight(&server, "slow", 1, Duration::from_secs(5));
    for (plugin, tool, status, error_type) in [
        ("nobody", "sleep", 404, "PluginNotFound"),
        ("slow", "nothing", 404, "UnknownTool"),
        ("slow", "sleep", 503, "TooManyCalls"),
    ] {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /v1/plugins/{plugin}/tools/{tool}/run HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{{\"args\": "
        );
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains(error_type) {
            match std::io::Read::read(&mut stream, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")) && answer.contains(error_type),
            "{plugin}/{tool}: {answer}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{plugin}/{tool}: answered after {:?}",
            started.elapsed()
        );
    }
    drop(busy);
}

/// The answer on `stream` of a request sent on it: its status line and its
/// body (read by its `Content-Length`).
fn read_answer(stream: &mut TcpStream) -> (String, Vec<u8>) {
    use std::io::Read as _;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or_else(|| panic!("no length in {head}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (head.lines().next().unwrap_or_default().to_owned(), body)
}

/// The run target of `alpha`'s `echo_bytes` (its binary `data` back).
const ECHO_BYTES: &str = "/v1/plugins/alpha/tools/echo_bytes/run";

/// Headers of an `echo_bytes` call sent and answered as raw bytes.
const RAW: [(&str, &str); 2] = [
    ("content-type", "application/octet-stream"),
    ("accept", "application/octet-stream"),
];

const MIB: usize = 1 << 20;

/// A server with plugin `alpha` whose answers share 40 MiB
/// (`--answer-memory`; `--max-response` 16 MiB, as the budget is never
/// less than one answer at it), bodies up to 32 MiB, and `extra` options.
fn alpha_with_40_mib_for_answers(extra: &[&str]) -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let (body_limit, memory, max_response) = (
        (32 * MIB).to_string(),
        (40 * MIB).to_string(),
        (16 * MIB).to_string(),
    );
    let mut args = vec![
        "--plugins",
        dir.path_str(),
        "--body-limit",
        &body_limit,
        "--answer-memory",
        &memory,
        "--max-response",
        &max_response,
    ];
    args.extend_from_slice(extra);
    let server = Forgesyte::start(&args);
    server.wait_loaded();
    (dir, server)
}

/// Sends `data` to `echo_bytes` for a raw answer, and waits until the
/// answer's head has come: the call ran, its answer holds its room, and
/// nothing of it is read yet.
fn echo_bytes_unread(server: &Forgesyte, data: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST {ECHO_BYTES} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n\
         Accept: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered(&stream).is_none() {
        assert!(Instant::now() < deadline, "the unread call never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(answered(&stream).unwrap().starts_with("HTTP/1.1 200"));
    stream
}

/// Calls `echo_bytes` with `data` for a raw answer until one is 200 or
/// `within` has passed (the room held by another answer coming back);
/// the last reply.
fn echo_bytes_once_room_is_back(server: &Forgesyte, data: &[u8], within: Duration) -> Reply {
    let started = Instant::now();
    loop {
        let reply = http_with(server.addr, "POST", ECHO_BYTES, &RAW, data);
        if reply.status == 200 || started.elapsed() > within {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The answers of calls cannot make the server hold memory without bound
/// either: an answer takes room from `--answer-memory` when it is ready and
/// gives it back once its client has read it all. Past it a call answers
/// 503 `ServerBusy` (the tool ran; its answer is dropped), and an answer
/// larger than all of it 422 `AnswerTooLarge`.
#[test]
fn answers_waiting_for_their_clients_fill_a_bounded_room() {
    let (_dir, server) = alpha_with_40_mib_for_answers(&[]);
    let data = vec![7u8; 24 * MIB];
    // A client that reads none of its 24 MiB answer: the kernel's buffers
    // take a few MiB of it, the server holds the rest, and the room of all.
    let mut slow = echo_bytes_unread(&server, &data);
    let busy = http_with(server.addr, "POST", ECHO_BYTES, &RAW, &data);
    assert_eq!(busy.status, 503, "{}", busy.text());
    let body = busy.json();
    assert_eq!(body["error_type"], "ServerBusy", "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("ran, but the answers waiting to be sent fill the 40 MiB"),
        "{body}"
    );
    assert_eq!(busy.header("retry-after"), Some("1"));
    // Smaller answers still fit beside it.
    let small = http_with(server.addr, "POST", ECHO_BYTES, &RAW, &data[..MIB]);
    assert_eq!((small.status, small.body.len()), (200, MIB));
    // The slow client reads its answer, byte-exact: the room comes back.
    let (status, answer) = read_answer(&mut slow);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(answer == data, "the slow client's answer differs");
    let served = echo_bytes_once_room_is_back(&server, &data, Duration::from_secs(20));
    assert_eq!(served.status, 200, "{}", served.text());
    assert!(served.body == data);
    // 30 MiB are 40 MiB as base64 in JSON: more than all the room.
    let json_answer = [
        ("content-type", "application/octet-stream"),
        ("accept", "application/json"),
    ];
    let large = vec![1u8; 30 * MIB];
    let large = http_with(server.addr, "POST", ECHO_BYTES, &json_answer, &large);
    assert_eq!(large.status, 422, "{}", large.text());
    let body = large.json();
    assert_eq!(body["error_type"], "AnswerTooLarge", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("--answer-memory"),
        "{body}"
    );
    // Every call ran: the plugin is counted as it was, and the dropped
    // answers by why.
    let health = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(health["success_count"], 5, "{health}");
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    let metrics = server.get("/metrics").text();
    for line in [
        r#"forgesyte_answers_dropped_total{reason="no_room"} 1"#,
        r#"forgesyte_answers_dropped_total{reason="too_large"} 1"#,
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
}

/// A client that keeps reading its answer, but slower than
/// `--answer-min-rate`, does not hold the answer's room for as long as it
/// likes: once the idle timeout's grace (plus a second per rate's worth of
/// bytes it read) is over, its connection is closed and the room comes
/// back. (Reading 1 MiB a second, often enough that no write ever stalls
/// for the idle timeout, it held a 24 MiB answer's room for about 20 s.)
#[test]
fn a_client_that_reads_its_answer_too_slowly_is_let_go() {
    let min_rate = (4 * MIB).to_string();
    let (_dir, server) =
        alpha_with_40_mib_for_answers(&["--idle-timeout", "3", "--answer-min-rate", &min_rate]);
    let data = vec![7u8; 24 * MIB];
    let mut slow = echo_bytes_unread(&server, &data);
    // 1 MiB a second, until the room came back; then what the server
    // wrote before it let go, at once.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = std::thread::spawn({
        let done = std::sync::Arc::clone(&done);
        move || {
            use std::io::Read as _;
            slow.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let (mut read, mut this_second) = (0usize, 0usize);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                match slow.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => (read, this_second) = (read + n, this_second + n),
                }
                if this_second >= MIB && !done.load(std::sync::atomic::Ordering::Relaxed) {
                    this_second = 0;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            (read, started.elapsed())
        }
    });
    let busy = http_with(server.addr, "POST", ECHO_BYTES, &RAW, &data);
    assert_eq!(
        busy.status,
        503,
        "the slow answer holds its room: {}",
        busy.text()
    );
    let started = Instant::now();
    let served = echo_bytes_once_room_is_back(&server, &data, Duration::from_secs(30));
    let came_back = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(served.status, 200, "{}", served.text());
    assert!(served.body == data);
    assert!(
        came_back < Duration::from_secs(12),
        "the room came back only after {came_back:?}"
    );
    let (read, took) = trickle.join().unwrap();
    assert!(
        read < data.len(),
        "the slow client read all {read} bytes in {took:?}: never let go"
    );
}

/// In-process calls past their time limit keep their slots while they run
/// on (they cannot be stopped), though the plugin, reloaded, shows no call
/// in flight: the refusal says so, and what to do, rather than only "2
/// tool calls in progress" of a plugin that looks idle.
#[test]
fn a_refusal_names_the_calls_that_ran_past_their_limit() {
    let dir = PluginsDir::new();
    dir.good("slow", json!({}));
    let token = "a-long-enough-admin-token-for-slots";
    let server = Forgesyte::start_with_env(
        &[
            "--plugins",
            dir.path_str(),
            "--max-calls-per-plugin",
            "2",
            "--call-timeout",
            "1",
        ],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr;
            std::thread::spawn(move || {
                http(
                    addr,
                    "POST",
                    "/v1/plugins/slow/tools/sleep/run",
                    br#"{"args": {"ms": 30000}}"#,
                )
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.join().unwrap().status, 504);
    }
    let reload = crate::support::admin_post(server.addr, "/v1/plugins/slow/reload", token);
    assert_eq!(reload.status, 200, "{}", reload.text());
    let health = server.get("/v1/plugins/slow/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    let refused = server.run("slow", "echo", r#"{"args": {}}"#);
    assert_eq!(refused.status, 503, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error_type"], "TooManyCalls", "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("2 of them passed their time limit and still run in the plugin's code")
            && detail.contains("\"isolation\": \"process\""),
        "{detail}"
    );
}
