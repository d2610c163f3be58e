//! 32 readers of `/v1/plugins` while tool calls succeed, fail and panic on
//! other plugins, against the real binary. Bounded in time; a deadlock
//! fails the test instead of hanging it.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forgesyte_tests::zoo;
use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir, http};

const READERS: usize = 32;
const READ_TIME: Duration = Duration::from_millis(1500);
const MAX_READS_PER_READER: usize = 400;
const ECHO_CALLS: u64 = 40;
const FAIL_CALLS: u64 = 40;
const PANIC_CALLS: u64 = 10;

enum Done {
    Reader {
        reads: usize,
    },
    Writer {
        name: &'static str,
        statuses: Vec<u16>,
    },
}

#[test]
fn readers_see_consistent_snapshots_while_tools_run() {
    let dir = PluginsDir::new();
    dir.good("echoer", json!({}))
        .good("failer", json!({}))
        .good("panicker", json!({}))
        .zoo(zoo::ERR_INIT)
        .zoo(zoo::NEEDS_GPU);
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let addr = server.addr;
    let expected: Vec<String> = [
        zoo::ERR_INIT_NAME,
        "echoer",
        "failer",
        zoo::NEEDS_GPU_NAME,
        "panicker",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<BTreeSet<_>>()
    .into_iter()
    .collect();

    let (tx, rx) = mpsc::channel::<Result<Done, String>>();
    let started = Instant::now();
    for _ in 0..READERS {
        let tx = tx.clone();
        let expected = expected.clone();
        std::thread::spawn(move || {
            let mut reads = 0;
            let result = (|| {
                while started.elapsed() < READ_TIME && reads < MAX_READS_PER_READER {
                    let reply = http(addr, "GET", "/v1/plugins", b"");
                    if reply.status != 200 {
                        return Err(format!("status {}: {}", reply.status, reply.text()));
                    }
                    let list: Value = serde_json::from_slice(&reply.body)
                        .map_err(|e| format!("not JSON ({e}): {}", reply.text()))?;
                    let names: Vec<String> = list
                        .as_array()
                        .ok_or("not an array")?
                        .iter()
                        .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
                        .collect();
                    if names != expected {
                        return Err(format!("inconsistent snapshot: {names:?}"));
                    }
                    for p in list.as_array().into_iter().flatten() {
                        let (ok, err) = (&p["success_count"], &p["error_count"]);
                        if !ok.is_u64() || !err.is_u64() || !p["state"].is_string() {
                            return Err(format!("broken status object: {p}"));
                        }
                    }
                    reads += 1;
                }
                Ok(Done::Reader { reads })
            })();
            let _ = tx.send(result);
        });
    }
    for (name, tool, calls) in [
        ("echoer", "echo", ECHO_CALLS),
        ("failer", "fail", FAIL_CALLS),
        ("panicker", "panic", PANIC_CALLS),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let statuses = (0..calls)
                .map(|i| {
                    let body = format!(r#"{{"args": {{"i": {i}}}}}"#);
                    let target = format!("/v1/plugins/{name}/tools/{tool}/run");
                    http(addr, "POST", &target, body.as_bytes()).status
                })
                .collect();
            let _ = tx.send(Ok(Done::Writer { name, statuses }));
        });
    }
    drop(tx);

    // Collect, bounded: a deadlock or a stuck request fails here.
    let deadline = started + Duration::from_secs(60);
    let mut total_reads = 0;
    let mut writers = Vec::new();
    for _ in 0..READERS + 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(Done::Reader { reads })) => total_reads += reads,
            Ok(Ok(Done::Writer { name, statuses })) => writers.push((name, statuses)),
            Ok(Err(e)) => panic!("a reader failed: {e}"),
            Err(e) => panic!("threads did not finish in time ({e}): deadlock?"),
        }
    }
    assert!(total_reads >= READERS, "only {total_reads} reads");
    writers.sort_by_key(|(name, _)| *name);
    for (name, statuses) in &writers {
        match *name {
            "echoer" => assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}"),
            "failer" => assert!(statuses.iter().all(|s| *s == 422), "{statuses:?}"),
            "panicker" => {
                assert_eq!(statuses[0], 502, "{statuses:?}");
                assert!(statuses[1..].iter().all(|s| *s == 503), "{statuses:?}");
            }
            other => panic!("unexpected writer {other}"),
        }
    }

    // Final counts equal the calls made.
    let status = |name: &str| server.get(&format!("/v1/plugins/{name}/health")).json();
    let echoer = status("echoer");
    assert_eq!(echoer["success_count"], ECHO_CALLS);
    assert_eq!(echoer["error_count"], 0);
    assert_eq!(echoer["state"], "INITIALIZED");
    assert_eq!(echoer["in_flight"], 0);
    let failer = status("failer");
    assert_eq!(failer["success_count"], 0);
    assert_eq!(failer["error_count"], FAIL_CALLS);
    assert_eq!(failer["state"], "INITIALIZED");
    let panicker = status("panicker");
    assert_eq!(panicker["error_count"], 1, "only the panicking call ran");
    assert_eq!(panicker["state"], "FAILED");
}
