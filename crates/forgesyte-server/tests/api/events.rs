//! `GET /v1/events`: the event stream through the real router over fake
//! plugins (state changes and reload results as they happen, resuming with
//! `Last-Event-ID`, `reset` once the asked id fell out of the buffer), and
//! through the real binary (the load pass's events replayed over TCP, a
//! plugin fault, and a shutdown that an open stream does not hold up).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use forgesyte_loader::fake::FakeBehavior;
use forgesyte_server::ServerConfig;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{Forgesyte, PluginsDir, TOKEN, fake_host, http, world};

/// One parsed Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// Splits SSE text into events once each is complete (comments and
/// `retry:` lines skipped); what is left is kept for the next chunk.
fn parse_events(buffer: &mut String) -> Vec<Sse> {
    let mut out = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let block: String = buffer.drain(..end + 2).collect();
        let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().unwrap());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        if !data.is_empty() {
            out.push(Sse {
                id,
                event,
                data: serde_json::from_str(&data).unwrap(),
            });
        }
    }
    out
}

/// An open event stream through the router.
struct Stream {
    body: axum::body::BodyDataStream,
    buffer: String,
    queue: std::collections::VecDeque<Sse>,
}

impl Stream {
    async fn open(app: &Router, last_event_id: Option<&str>) -> Stream {
        let mut request = Request::builder().uri("/v1/events");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Stream {
            body: response.into_body().into_data_stream(),
            buffer: String::new(),
            queue: Default::default(),
        }
    }

    /// The next event (bounded wait).
    async fn next(&mut self) -> Sse {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("no event within 10 s")
                .expect("stream ended")
                .unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            self.queue.extend(parse_events(&mut self.buffer));
        }
    }
}

#[tokio::test]
async fn state_changes_and_reload_results_stream_live() {
    let w = world(Some(TOKEN));
    let mut stream = Stream::open(&w.app, None).await;
    let hello = stream.next().await;
    assert_eq!(hello.event, "hello");
    let start = hello.id.unwrap();
    assert_eq!(hello.data["last_id"], start);

    // Fix `fixme` and reload it: FAILED -> LOADED -> INITIALIZED, then the
    // reload's result.
    w.put(
        "fixme",
        json!({"name": "fixme", "version": "1.0.1"}),
        FakeBehavior::Good,
    );
    let reply = w.admin("/v1/plugins/fixme/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let mut seen = Vec::new();
    loop {
        let event = stream.next().await;
        let done = event.event == "reload";
        seen.push(event);
        if done {
            break;
        }
    }
    let ids: Vec<u64> = seen.iter().map(|e| e.id.unwrap()).collect();
    let expected: Vec<u64> = (start + 1..=start + seen.len() as u64).collect();
    assert_eq!(ids, expected, "ids follow each other: {seen:#?}");
    let moves: Vec<(String, String, String)> = seen
        .iter()
        .filter(|e| e.event == "state")
        .map(|e| {
            (
                e.data["plugin"].as_str().unwrap().to_owned(),
                e.data["from"].as_str().unwrap().to_owned(),
                e.data["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        [
            ("fixme".into(), "FAILED".into(), "LOADED".into()),
            ("fixme".into(), "LOADED".into(), "INITIALIZED".into()),
        ]
    );
    let reload = &seen.last().unwrap().data;
    assert_eq!(reload["trigger"], "admin");
    assert_eq!(reload["plugins"][0]["name"], "fixme");
    assert_eq!(reload["plugins"][0]["state"], "INITIALIZED");
    assert_eq!(reload["loaded"], 1);
    assert!(reload["at_ms"].as_u64().unwrap() > 0);

    // A fault at run time is a state event too; a good call is not.
    let ok = crate::support::run(&w.app, "good", "echo", r#"{"args": {"x": 1}}"#).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    w.put(
        "needs-lib",
        json!({"name": "needs-lib", "dependencies": ["lib:libstill-missing.so.2"]}),
        FakeBehavior::Good,
    );
    let reply = w.admin("/v1/plugins/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut after = Vec::new();
    loop {
        let event = stream.next().await;
        let done = event.event == "reload";
        after.push(event);
        if done {
            break;
        }
    }
    assert!(
        after
            .iter()
            .all(|e| e.data["to"] != "RUNNING" && e.data["from"] != "RUNNING"),
        "tool calls are not events: {after:#?}"
    );
    let unavailable = after
        .iter()
        .find(|e| e.data["plugin"] == "needs-lib" && e.data["to"] == "UNAVAILABLE")
        .unwrap_or_else(|| panic!("no UNAVAILABLE event: {after:#?}"));
    assert!(
        unavailable.data["reason"]
            .as_str()
            .unwrap()
            .contains("libstill-missing.so.2"),
        "{unavailable:?}"
    );
    let all = &after.last().unwrap().data;
    assert_eq!(all["plugins"].as_array().unwrap().len(), 3, "{all}");
}

#[tokio::test]
async fn a_client_resumes_with_last_event_id_or_gets_reset() {
    let host = fake_host(ServerConfig::default());
    let registry = host.state.registry();
    let mut first = Stream::open(&host.app, None).await;
    let hello = first.next().await;
    let start = hello.id.unwrap();
    drop(first);

    // While no one listens: three changes.
    for reason in ["one", "two", "three"] {
        registry
            .mark_failed("bad-init", format!("InitError: {reason}"))
            .unwrap();
    }
    let mut resumed = Stream::open(&host.app, Some(&start.to_string())).await;
    for (n, reason) in ["one", "two", "three"].into_iter().enumerate() {
        let event = resumed.next().await;
        assert_eq!(event.event, "state", "{event:?}");
        assert_eq!(event.id, Some(start + 1 + n as u64));
        assert_eq!(event.data["change"], "reason");
        assert_eq!(event.data["reason"], format!("InitError: {reason}"));
    }
    // Then live, in the same stream.
    registry.mark_failed("bad-init", "InitError: four").unwrap();
    let live = resumed.next().await;
    assert_eq!(live.id, Some(start + 4));
    drop(resumed);

    // Up to date: nothing is replayed, the next live event comes next.
    let mut current = Stream::open(&host.app, Some(&(start + 4).to_string())).await;
    registry.mark_failed("bad-init", "InitError: five").unwrap();
    let next = current.next().await;
    assert_eq!(
        (next.id, next.data["reason"].clone()),
        (Some(start + 5), json!("InitError: five"))
    );
    drop(current);

    // 1,100 changes push the resumed-from id out of the 1,024-event buffer:
    // `reset` first (fetch everything again), at the newest id, then live.
    for i in 0..1100 {
        registry
            .mark_failed("bad-init", format!("InitError: flood {i}"))
            .unwrap();
    }
    let newest = start + 5 + 1100;
    for asked in [
        start.to_string(),
        "0".into(),
        "not-an-id".into(),
        (newest + 7).to_string(),
    ] {
        let mut late = Stream::open(&host.app, Some(&asked)).await;
        let reset = late.next().await;
        assert_eq!(reset.event, "reset", "{asked}: {reset:?}");
        assert_eq!(reset.id, Some(newest), "{asked}");
        assert_eq!(reset.data["last_id"], newest);
    }
    // Still held: the last 1,024 (from newest - 1023 on).
    let mut held = Stream::open(&host.app, Some(&(newest - 1024).to_string())).await;
    let first_held = held.next().await;
    assert_eq!(first_held.id, Some(newest - 1023));
    assert_eq!(first_held.data["reason"], "InitError: flood 76");
}

// ------------------------------------------------------------- the binary

/// Reads SSE events from a TCP connection to the binary.
struct TcpEvents {
    reader: BufReader<TcpStream>,
    buffer: String,
    queue: std::collections::VecDeque<Sse>,
}

impl TcpEvents {
    fn open(server: &Forgesyte) -> (TcpEvents, String) {
        TcpEvents::connect(server, "")
    }

    /// Resuming after event `id`.
    fn open_after(server: &Forgesyte, id: u64) -> (TcpEvents, String) {
        TcpEvents::connect(server, &format!("Last-Event-ID: {id}\r\n"))
    }

    fn connect(server: &Forgesyte, extra: &str) -> (TcpEvents, String) {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stream,
            "GET /v1/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n{extra}\r\n",
            server.addr
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let events = TcpEvents {
            reader,
            buffer: String::new(),
            queue: Default::default(),
        };
        (events, head.to_ascii_lowercase())
    }

    /// The next event; the body is chunked, so chunk-size lines (hex
    /// digits alone) are skipped.
    fn next(&mut self) -> Sse {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "stream ended");
            let text = line.trim_end_matches(['\r', '\n']);
            let chunk_size = !text.is_empty() && text.chars().all(|c| c.is_ascii_hexdigit());
            if chunk_size && !text.contains(':') {
                continue;
            }
            if line.ends_with("\r\n") && text.is_empty() {
                continue; // the CRLF that ends a chunk
            }
            self.buffer.push_str(text);
            self.buffer.push('\n');
            self.queue.extend(parse_events(&mut self.buffer));
        }
    }
}

#[test]
fn the_binary_streams_a_fault_and_shuts_down_with_a_stream_open() {
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    // Short connection timeouts: a quiet stream outlives them.
    let mut server = Forgesyte::start(&[
        "--plugins",
        plugins.path_str(),
        "--idle-timeout",
        "1",
        "--header-read-timeout",
        "1",
    ]);
    server.wait_loaded();
    let (mut events, head) = TcpEvents::open(&server);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-cache"), "{head}");
    let hello = events.next();
    assert_eq!(hello.event, "hello");

    // The whole history since start-up is still held (a handful of events):
    // the oldest resumable id is the one before the first event; one older
    // gets `reset`.
    let last = hello.id.unwrap();
    let mut from = last;
    let history = loop {
        let (mut probe, _) = TcpEvents::open_after(&server, from - 1);
        let first = probe.next();
        if first.event == "reset" {
            let (mut all, _) = TcpEvents::open_after(&server, from);
            break (from..last).map(|_| all.next()).collect::<Vec<_>>();
        }
        from -= 1;
        assert!(last - from < 50, "no reset after 50 ids back");
    };
    let summary: Vec<String> = history
        .iter()
        .map(|e| match e.event.as_str() {
            "load" => format!("load {}", e.data["phase"].as_str().unwrap()),
            kind => format!("{kind} {}", e.data["to"].as_str().unwrap()),
        })
        .filter(|line| line != "load progress")
        .collect();
    assert_eq!(
        summary,
        [
            "load started",
            "state LOADED",
            "state INITIALIZED",
            "load finished"
        ],
        "{history:#?}"
    );
    let finished = &history.last().unwrap().data;
    assert_eq!(
        (finished["loaded"].as_u64(), finished["failed"].as_u64()),
        (Some(1), Some(0))
    );

    // A panicking tool makes the plugin FAILED: that is an event, on a
    // stream that was quiet for longer than the connection timeouts.
    std::thread::sleep(Duration::from_millis(2500));
    let reply = server.run("alpha", "panic", "{}");
    assert_eq!(reply.status, 502, "{}", reply.text());
    let event = events.next();
    assert_eq!(event.event, "state");
    assert_eq!(
        (&event.data["plugin"], &event.data["to"]),
        (&json!("alpha"), &json!("FAILED"))
    );
    assert!(
        event.data["reason"]
            .as_str()
            .unwrap()
            .starts_with("ToolPanic")
    );
    let health = http(server.addr, "GET", "/v1/plugins/alpha/health", b"").json();
    assert_eq!(health["runtime"], "native");
    assert_eq!(health["isolation"], "in-process");

    // The open stream does not hold the drain for the shutdown grace.
    let stopped = Instant::now();
    assert!(server.terminate().success());
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "shutdown took {:?} with a stream open",
        stopped.elapsed()
    );
}
