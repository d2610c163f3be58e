//! Binary payloads end to end through the real binary (ABI 3): binary
//! arguments by JSON base64, `multipart/form-data` and
//! `application/octet-stream`, of sizes 0 to the body limit, to a native
//! ABI-3 plugin in process and isolated, to a Python plugin and to an
//! ABI-1 library; binary results answered as base64 in JSON,
//! `multipart/mixed` or raw bytes by `Accept`, byte-exact, from each
//! runtime.

use forgesyte_tests::zoo;
use serde_json::{Value, json};

use crate::python::{base64, multipart};
use crate::support::{Forgesyte, PluginsDir, Reply, http_with};

/// The body limit the server runs with: small, so that a body of exactly
/// the limit is quick in a debug build.
const LIMIT: usize = 2 * 1024 * 1024;

/// `len` bytes of a deterministic pseudo-random sequence.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The plugins with the tools `echo_bytes` and `noop_bytes`: `v3` (the
/// good library in process), `v3-iso` (isolated) and `py` (the Python
/// fixture `echo`).
const ECHOES: [&str; 3] = ["v3", "v3-iso", "py"];

/// The plugins of [`ECHOES`] and the zoo's ABI-1 library, on a server with
/// the body limit [`LIMIT`].
fn server() -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.good("v3", json!({}))
        .good("v3-iso", json!({"isolation": "process"}))
        .python("py", "echo")
        .zoo(zoo::ABI_V1);
    let limit = LIMIT.to_string();
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--body-limit", &limit]);
    let health = server.wait_loaded();
    assert_eq!(health["plugins_loaded"], 4, "{health}");
    (dir, server)
}

/// The three bodies that carry `data` as the binary argument `data`, each
/// at most `limit` bytes: its largest `data` per body is what fits.
fn bodies(data: &[u8]) -> Vec<(&'static str, String, Vec<u8>)> {
    let (multipart_type, multipart_body) = multipart(&json!({}), data);
    vec![
        (
            "json",
            "application/json".to_owned(),
            json!({"args": {"data": base64(data)}})
                .to_string()
                .into_bytes(),
        ),
        ("multipart", multipart_type, multipart_body),
        (
            "octet-stream",
            "application/octet-stream".to_owned(),
            data.to_vec(),
        ),
    ]
}

fn post(server: &Forgesyte, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    http_with(server.addr, "POST", target, headers, body)
}

/// The sizes to send through `body`: 0, 1, 64 KiB, 1 MiB and the largest
/// that fits the body limit in that form.
fn sizes(body: &str) -> [usize; 5] {
    let largest = match body {
        // `{"args":{"data":"…"}}`: 21 bytes around the base64.
        "json" => (LIMIT - 21) / 4 * 3,
        // The multipart envelope of `python::multipart` with `{}` args.
        "multipart" => LIMIT - 300,
        _ => LIMIT,
    };
    [0, 1, 64 * 1024, 1024 * 1024, largest]
}

#[test]
fn binary_arguments_and_results_round_trip_byte_exact_through_every_body() {
    let (_dir, server) = server();
    for form in ["json", "multipart", "octet-stream"] {
        for (i, size) in sizes(form).into_iter().enumerate() {
            let data = payload(size, i as u64 + 11);
            let (_, content_type, body) = bodies(&data)
                .into_iter()
                .find(|(name, _, _)| *name == form)
                .unwrap();
            assert!(body.len() <= LIMIT, "{form} {size}: {} bytes", body.len());
            let expected = base64(&data);
            let headers = [("Content-Type", content_type.as_str())];
            for plugin in ECHOES {
                let target = format!("/v1/plugins/{plugin}/tools/echo_bytes/run");
                let reply = post(&server, &target, &headers, &body);
                assert_eq!(
                    reply.status,
                    200,
                    "{plugin} {form} {size}: {}",
                    reply.text()
                );
                let answer = reply.json();
                assert!(
                    answer["result"] == json!({"data": expected}),
                    "{plugin} {form} {size}: the echo differs"
                );
                let target = format!("/v1/plugins/{plugin}/tools/noop_bytes/run");
                let reply = post(&server, &target, &headers, &body);
                assert_eq!(
                    reply.json()["result"],
                    json!({"len": size}),
                    "{plugin} {form}"
                );
            }
            // ABI 1: the library receives (and echoes) base64.
            let target = format!("/v1/plugins/{}/tools/echo/run", zoo::ABI_V1_NAME);
            let reply = post(&server, &target, &headers, &body);
            assert_eq!(reply.status, 200, "abi-v1 {form} {size}: {}", reply.text());
            assert!(
                reply.json()["result"]["data"] == json!(expected),
                "abi-v1 {form} {size}: the echo differs"
            );
        }
    }
    // One byte past the limit is refused by its stated length, before any
    // of it is read or any plugin runs. (Only the head is sent: the server
    // answers and closes without reading a body, and a client still
    // writing one may see its write fail, "broken pipe" on a loaded
    // machine, before it reads the answer.)
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /v1/plugins/v3/tools/noop_bytes/run HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        LIMIT + 1
    );
    std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("PayloadTooLarge"), "{answer}");
}

/// A large `application/octet-stream` frame for a plugin in a child
/// process is received straight into a spare memory file, which its runner
/// then gets (no copy into a new one), and comes back byte-exact; one for
/// an in-process plugin is received into memory. The first frame of a
/// size finds no spare ready (one is made for the next), so frames are
/// sent until the server's log shows the file path taken for each runner.
#[test]
fn octet_stream_frames_for_runners_go_into_the_memory_file_they_get_byte_exact() {
    let dir = PluginsDir::new();
    dir.good("v3", json!({}))
        .good("v3-iso", json!({"isolation": "process"}))
        .python("py", "echo");
    let limit = LIMIT.to_string();
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str(), "--body-limit", &limit],
        &[("RUST_LOG", "info,forgesyte_server::body=debug")],
    );
    server.wait_loaded();
    let into_file = |server: &Forgesyte| {
        server
            .log()
            .matches("a body received into a memory file")
            .count()
    };
    let headers = [("Content-Type", "application/octet-stream")];
    let send = |plugin: &str, seed: u64| {
        let data = payload(LIMIT, seed);
        let target = format!("/v1/plugins/{plugin}/tools/echo_bytes/run");
        let reply = post(&server, &target, &headers, &data);
        assert_eq!(reply.status, 200, "{plugin}: {}", reply.text());
        assert!(
            reply.json()["result"] == json!({"data": base64(&data)}),
            "{plugin} {seed}: the echo differs"
        );
    };
    for plugin in ["v3-iso", "py"] {
        let before = into_file(&server);
        let mut seed = 100;
        while into_file(&server) == before {
            assert!(
                seed < 140,
                "{plugin}: no frame was received into a memory file"
            );
            send(plugin, seed);
            seed += 1;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Every later one byte-exact too, whichever way it came.
        for seed in 200..204 {
            send(plugin, seed);
        }
    }
    let before = into_file(&server);
    for seed in 300..304 {
        send("v3", seed);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(into_file(&server), before, "an in-process plugin's frame");
}

/// Under a file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) below a
/// frame's size, the memory file the server writes the frame into refuses
/// it, and the frame goes through the pipe: byte-exact, the server up.
/// (`SIGXFSZ`'s default action ended the server at the first such upload.)
#[test]
fn a_file_size_limit_below_a_frame_sends_it_through_the_pipe() {
    use rustix::process::{Pid, Resource, Rlimit, prlimit};
    let dir = PluginsDir::new();
    dir.good("v3-iso", json!({"isolation": "process"}))
        .python("py", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let pid = Pid::from_raw(i32::try_from(server.pid()).unwrap()).unwrap();
    let before = prlimit(
        Some(pid),
        Resource::Fsize,
        Rlimit {
            current: Some(1 << 20),
            maximum: None,
        },
    )
    .unwrap();
    let headers = [("Content-Type", "application/octet-stream")];
    for plugin in ["v3-iso", "py"] {
        let data = payload(3 << 20, 7);
        let target = format!("/v1/plugins/{plugin}/tools/echo_bytes/run");
        let reply = post(&server, &target, &headers, &data);
        assert_eq!(reply.status, 200, "{plugin}: {}", reply.text());
        assert!(
            reply.json()["result"] == json!({"data": base64(&data)}),
            "{plugin}: the echo differs"
        );
    }
    prlimit(Some(pid), Resource::Fsize, before).unwrap();
    assert_eq!(server.get("/livez").status, 200);
}

/// A part's headers (lower-case names) and bytes.
type MixedPart = (Vec<(String, String)>, Vec<u8>);

/// The parts of a `multipart/mixed` answer.
fn mixed_parts(reply: &Reply) -> Vec<MixedPart> {
    let content_type = reply.header("content-type").unwrap();
    let boundary = content_type
        .strip_prefix("multipart/mixed; boundary=")
        .unwrap_or_else(|| panic!("{content_type}"));
    let delimiter = format!("--{boundary}");
    let body = &reply.body;
    let find = |from: usize, needle: &[u8]| {
        body[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|at| at + from)
    };
    let mut parts = Vec::new();
    let mut at = find(0, delimiter.as_bytes()).unwrap() + delimiter.len();
    while body[at..].starts_with(b"\r\n") {
        let head_end = find(at, b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&body[at + 2..head_end]).unwrap();
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let next = find(head_end, format!("\r\n{delimiter}").as_bytes()).unwrap();
        parts.push((headers, body[head_end + 4..next].to_vec()));
        at = next + 2 + delimiter.len();
    }
    assert!(body[at..].starts_with(b"--"), "the closing delimiter");
    parts
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn binary_results_answer_as_json_multipart_or_raw_bytes_by_accept() {
    let (_dir, server) = server();
    let data = payload(1024 * 1024 + 3, 5);
    let octets = [("Content-Type", "application/octet-stream")];
    for plugin in ECHOES {
        let echo = format!("/v1/plugins/{plugin}/tools/echo_bytes/run");
        // Raw bytes: the one binary result, the rest in headers.
        let accept = [octets[0], ("Accept", "application/octet-stream")];
        let reply = post(&server, &echo, &accept, &data);
        assert_eq!(reply.status, 200, "{plugin}: {}", reply.text());
        assert_eq!(
            reply.header("content-type"),
            Some("application/octet-stream")
        );
        // A plugin's bytes are never sniffed into a page.
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert!(reply.body == data, "{plugin}: the raw bytes differ");
        assert_eq!(reply.header("x-forgesyte-pointer"), Some("/data"));
        let answer: Value =
            serde_json::from_str(reply.header("x-forgesyte-result").unwrap()).unwrap();
        assert_eq!(answer["ok"], true);
        assert_eq!(answer["result"], json!({"data": null}));
        // The same number, as the same text: both are the shortest text of
        // one f64. (Compared as text: serde_json's default float parser may
        // land one unit in the last place off, 5.551504 read back as
        // 5.5515039999999996.)
        let time = reply.header("x-forgesyte-processing-time-ms").unwrap();
        assert!(time.parse::<f64>().is_ok_and(|t| t >= 0.0), "{time}");
        let result = reply.header("x-forgesyte-result").unwrap();
        assert!(
            result.contains(&format!("\"processing_time_ms\":{time}")),
            "{time} in the header, {result}"
        );

        // multipart/mixed: the JSON first, then the bytes named by pointer.
        let accept = [octets[0], ("Accept", "multipart/mixed")];
        let reply = post(&server, &echo, &accept, &data);
        assert_eq!(reply.status, 200, "{plugin}: {}", reply.text());
        let parts = mixed_parts(&reply);
        assert_eq!(parts.len(), 2, "{plugin}");
        assert_eq!(
            header(&parts[0].0, "content-type"),
            Some("application/json")
        );
        let answer: Value = serde_json::from_slice(&parts[0].1).unwrap();
        assert_eq!(answer["result"], json!({"data": null}));
        assert_eq!(answer["tool_name"], "echo_bytes");
        assert_eq!(
            header(&parts[1].0, "content-disposition"),
            Some("attachment; name=\"/data\"")
        );
        assert!(parts[1].1 == data, "{plugin}: the multipart bytes differ");
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str())
        );

        // Raw bytes of a result without a binary result: 406, unless the
        // client accepts something else too.
        let noop = format!("/v1/plugins/{plugin}/tools/noop_bytes/run");
        let accept = [octets[0], ("Accept", "application/octet-stream")];
        let reply = post(&server, &noop, &accept, &data);
        assert_eq!(reply.status, 406, "{plugin}: {}", reply.text());
        let failure = reply.json();
        assert_eq!(failure["ok"], false);
        assert_eq!(failure["error_type"], "NotAcceptable");
        assert!(
            failure["detail"]
                .as_str()
                .unwrap()
                .contains("0 binary results"),
            "{failure}"
        );
        let accept = [
            octets[0],
            ("Accept", "application/octet-stream, application/json;q=0.5"),
        ];
        let reply = post(&server, &noop, &accept, &data);
        assert_eq!(reply.status, 200, "{plugin}: {}", reply.text());
        assert_eq!(reply.json()["result"], json!({"len": data.len()}));
        // multipart/mixed without binary results: the JSON alone.
        let accept = [octets[0], ("Accept", "multipart/mixed")];
        let parts = mixed_parts(&post(&server, &noop, &accept, &data));
        assert_eq!(parts.len(), 1);
    }
    // An ABI-1 library's answer is JSON only: no part beyond the JSON.
    let target = format!("/v1/plugins/{}/tools/echo/run", zoo::ABI_V1_NAME);
    let accept = [octets[0], ("Accept", "multipart/mixed")];
    let parts = mixed_parts(&post(&server, &target, &accept, b"\x00\x01"));
    assert_eq!(parts.len(), 1);
    let answer: Value = serde_json::from_slice(&parts[0].1).unwrap();
    assert_eq!(answer["result"]["data"], "AAE=");
}
