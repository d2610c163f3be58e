//! `GET /metrics` scraped by a real Prometheus server (Debian's
//! `prometheus` package; `.ci/run` installs it): a running `forgesyte
//! serve` with a healthy, an isolated and a failed plugin takes a known set
//! of tool calls, Prometheus scrapes it every second, and PromQL through
//! Prometheus's HTTP API must see exactly those call counts and states.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forgesyte_tests::zoo;
use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir, http};

/// The `prometheus` executable on `PATH`, if installed.
fn prometheus_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|candidate| candidate.is_file())
    })
}

/// A free loopback port (bound and released: Prometheus takes it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Prometheus scraping one target; killed when dropped, also
/// when the test fails.
struct Prometheus {
    _child: crate::support::Reaped,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: forgesyte\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // The port is free when chosen, not necessarily when Prometheus
        // binds it (another test's server may take it in between): a
        // Prometheus that exits before it is ready is started again on
        // another port.
        for attempt in 1..=3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let mut child = crate::support::Reaped(
                Command::new(binary)
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        dir.path().join(format!("data-{attempt}")).display()
                    ))
                    .arg(format!("--web.listen-address={addr}"))
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            let running = |child: &mut crate::support::Reaped| matches!(child.try_wait(), Ok(None));
            let deadline = Instant::now() + Duration::from_secs(60);
            // Ready, and what answered is this Prometheus (it still runs).
            let ready = loop {
                if !running(&mut child) {
                    break false;
                }
                if crate::support::try_http(addr, "GET", "/-/ready", b"")
                    .is_ok_and(|r| r.status == 200)
                {
                    break running(&mut child);
                }
                assert!(
                    Instant::now() < deadline,
                    "Prometheus: not ready after 60 s; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            if ready {
                return Prometheus {
                    _child: child,
                    addr,
                    log,
                    _dir: dir,
                };
            }
            eprintln!(
                "Prometheus exited before it was ready on {addr} (attempt {attempt}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("Prometheus did not start in 3 attempts (see the logs above)");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ok` for up to a minute; fails with Prometheus's log.
    fn wait_until(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "Prometheus: not {what} after 60 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The instant vector of `promql`, as `(labels, value)` pairs.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let reply = http(
            self.addr,
            "GET",
            &format!("/api/v1/query?query={encoded}"),
            b"",
        );
        assert_eq!(reply.status, 200, "{promql}: {}", reply.text());
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sample| {
                let value = sample["value"][1].as_str().unwrap().parse().unwrap();
                (sample["metric"].clone(), value)
            })
            .collect()
    }

    /// The one value of `promql`; fails when it has none or several.
    fn value(&self, promql: &str) -> f64 {
        let samples = self.query(promql);
        assert_eq!(samples.len(), 1, "{promql}: {samples:?}");
        samples[0].1
    }
}

#[test]
fn prometheus_sees_the_calls_and_states() {
    let Some(binary) = prometheus_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but `prometheus` is not installed (Debian package `prometheus`; .ci/run installs it)"
        );
        crate::support::say_skipped("`prometheus` is not installed (apt-get install prometheus)");
        return;
    };
    let plugins = PluginsDir::new();
    plugins
        .good("alpha", json!({}))
        .good("iso", json!({"isolation": "process"}))
        .zoo(zoo::ERR_INIT);
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();

    // The calls: 5 ok and 2 tool errors on alpha, 3 ok on iso, 4 refused
    // by the failed err-init.
    for i in 0..5 {
        let reply = server.run("alpha", "echo", &format!(r#"{{"args": {{"i": {i}}}}}"#));
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    for _ in 0..2 {
        assert_eq!(server.run("alpha", "fail", "{}").status, 422);
    }
    for _ in 0..3 {
        let reply = server.run("iso", "echo", "{}");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    for _ in 0..4 {
        assert_eq!(server.run(zoo::ERR_INIT_NAME, "echo", "{}").status, 503);
    }
    // A path that matches no route must not become a label value.
    assert_eq!(server.get("/no/such/path/4711").status, 404);

    let own = server.get("/metrics");
    assert_eq!(own.status, 200);
    assert!(
        own.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        own.headers
    );
    let text = own.text();
    assert!(text.ends_with("# EOF\n"), "{text}");
    // (The path itself: its number alone may be digits of a value, such
    // as a duration's sum `0.001947112`.)
    assert!(
        !text.contains("no/such/path"),
        "a raw path became a label:\n{text}"
    );

    // The Prometheus text format for a client that asks for it, which
    // promtool (of the same Debian package) reads and lints clean.
    let plain = crate::support::http_with(
        server.addr,
        "GET",
        "/metrics",
        &[("accept", "text/plain; version=0.0.4")],
        b"",
    );
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(plain.header("vary"), Some("accept"));
    let plain = plain.text();
    assert!(!plain.contains("# EOF"), "{plain}");
    assert!(
        plain.contains("# TYPE forgesyte_tool_calls_total counter\n")
            && plain.contains(
                "forgesyte_tool_calls_total{plugin=\"alpha\",tool=\"echo\",outcome=\"ok\"} 5\n"
            ),
        "{plain}"
    );
    let promtool = binary.with_file_name("promtool");
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (Debian package `prometheus`)", promtool.display()));
    {
        use std::io::Write as _;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(plain.as_bytes())
            .unwrap();
    }
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {checked:?}\n{plain}"
    );

    let prometheus = Prometheus::start(&binary, server.addr);
    prometheus.wait_until("two successful scrapes", || {
        prometheus
            .query(r#"sum_over_time(up{job="forgesyte"}[5m])"#)
            .first()
            .is_some_and(|(_, scrapes)| *scrapes >= 2.0)
    });

    let calls = |plugin: &str, tool: &str, outcome: &str| {
        prometheus.value(&format!(
            r#"forgesyte_tool_calls_total{{plugin="{plugin}",tool="{tool}",outcome="{outcome}"}}"#
        ))
    };
    assert_eq!(calls("alpha", "echo", "ok"), 5.0);
    assert_eq!(calls("alpha", "fail", "tool_error"), 2.0);
    assert_eq!(calls("iso", "echo", "ok"), 3.0);
    // err-init declares no tools and has no instance: the tool is unknown.
    assert_eq!(calls(zoo::ERR_INIT_NAME, "_unknown", "not_runnable"), 4.0);
    assert_eq!(
        prometheus.value("sum(forgesyte_tool_calls_total)"),
        14.0,
        "{:?}",
        prometheus.query("forgesyte_tool_calls_total")
    );
    // Latency: one observation per call whose plugin code ran.
    assert_eq!(
        prometheus
            .value(r#"forgesyte_tool_call_duration_seconds_count{plugin="alpha",tool="echo"}"#),
        5.0
    );

    let state = |plugin: &str, state: &str| {
        prometheus.value(&format!(
            r#"forgesyte_plugin_state{{plugin="{plugin}",state="{state}"}}"#
        ))
    };
    assert_eq!(state("alpha", "INITIALIZED"), 1.0);
    assert_eq!(state("alpha", "FAILED"), 0.0);
    assert_eq!(state("iso", "INITIALIZED"), 1.0);
    assert_eq!(state(zoo::ERR_INIT_NAME, "FAILED"), 1.0);
    assert_eq!(
        prometheus.value(r#"sum by (plugin) (forgesyte_plugin_state{plugin="alpha"})"#),
        1.0,
        "exactly one state per plugin"
    );

    // The isolated plugin's runner is measured from /proc.
    let rss = prometheus.value(r#"forgesyte_plugin_process_resident_memory_bytes{plugin="iso"}"#);
    assert!(rss > 100_000.0, "runner RSS {rss}");
    assert!(
        prometheus
            .query(r#"forgesyte_plugin_process_resident_memory_bytes{plugin="alpha"}"#)
            .is_empty(),
        "an in-process plugin has no process of its own"
    );

    // Routes by template, never by path; the load pass; build info.
    assert_eq!(
        prometheus.value(
            r#"sum(forgesyte_http_requests_total{route="/v1/plugins/{name}/tools/{tool}/run",status="2xx"})"#
        ),
        8.0
    );
    assert_eq!(
        prometheus.value(r#"forgesyte_http_requests_total{route="_unmatched",status="4xx"}"#),
        1.0
    );
    assert_eq!(
        prometheus.value(r#"forgesyte_load_pass_plugins{outcome="failed"}"#),
        1.0
    );
    assert_eq!(
        prometheus.value(r#"forgesyte_load_pass_plugins{outcome="loaded"}"#),
        2.0
    );
    assert_eq!(prometheus.value("forgesyte_load_passes_total"), 1.0);
    let build = prometheus.query("forgesyte_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].0["version"], forgesyte_server::VERSION);
}

/// A call whose client hung up before its answer is counted all the same,
/// once it ends, and so are the bytes of its body (the metrics agreed with
/// the registry only for calls whose client waited).
#[test]
fn a_call_whose_client_hung_up_is_counted() {
    use std::io::Write as _;
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    // Long enough for the poll below to see it in flight on a loaded
    // machine.
    let body = r#"{"args": {"ms": 2000}}"#;
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    let request = format!(
        "POST /v1/plugins/alpha/tools/sleep/run HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    // Hung up once the call runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(server.addr, "GET", "/v1/plugins/alpha/health", b"").json()["in_flight"] != 1 {
        assert!(Instant::now() < deadline, "the call never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stream);
    let expected = r#"forgesyte_tool_calls_total{plugin="alpha",tool="sleep",outcome="ok"} 1"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http(server.addr, "GET", "/metrics", b"").text();
        if text.lines().any(|l| l == expected) {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let health = http(server.addr, "GET", "/v1/plugins/alpha/health", b"").json();
    assert_eq!(health["success_count"], 1, "{health}");
    // Its body was read, and is counted (it was not: the count came at
    // the answer, which the handler never reached).
    let text = http(server.addr, "GET", "/metrics", b"").text();
    let bytes = format!(
        r#"forgesyte_tool_request_bytes_total{{plugin="alpha"}} {}"#,
        body.len()
    );
    assert!(text.lines().any(|l| l == bytes), "{bytes} not in\n{text}");
}
