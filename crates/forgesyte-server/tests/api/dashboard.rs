//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver's WebDriver HTTP API, loads `GET /` from the binary serving
//! a healthy, a failed and an unavailable plugin; the test checks each
//! rendered badge, the try-it form, and that a plugin's fault appears on
//! the page without a reload; it saves a screenshot as
//! `target/dashboard.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). Without them the test says so and passes, unless `CI` is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A running chromedriver with one browser session; both are killed when
/// dropped (the session ended, then chromedriver's whole process group,
/// which holds the browser).
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        use std::os::unix::process::CommandExt;
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = webdriver(addr, "GET", "/status", &Value::Null)
                .is_ok_and(|(_, status)| status["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1100",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser.call(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, value) = webdriver(self.addr, method, path, &body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(status, 200, "{method} {path}: {value}");
        value["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn navigate(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page; its return value.
    fn script(&self, script: &str, args: Value) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// The text of the first element matching `css`, `None` if none.
    fn text(&self, css: &str) -> Option<String> {
        let (status, found) = webdriver(
            self.addr,
            "POST",
            &format!("/session/{}/element", self.session),
            &json!({"using": "css selector", "value": css}),
        )
        .ok()?;
        if status != 200 {
            return None;
        }
        let element = found["value"]
            .as_object()?
            .values()
            .next()?
            .as_str()?
            .to_owned();
        // The page may redraw the element between the two commands: a
        // stale element (404) reads as "not there yet", like a missing one.
        let (status, text) = webdriver(
            self.addr,
            "GET",
            &format!("/session/{}/element/{element}/text", self.session),
            &Value::Null,
        )
        .ok()?;
        if status == 404 && text["value"]["error"] == "stale element reference" {
            return None;
        }
        assert_eq!(status, 200, "GET element text: {text}");
        text["value"].as_str().map(str::to_owned)
    }

    /// Waits (bounded) until the text of `css` satisfies `ok`; that text.
    fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = self.text(css);
            if let Some(text) = text.as_deref().filter(|t| ok(t)) {
                return text.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{css}` is {text:?} after 15 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self) -> Vec<u8> {
        let png = self.session_call("GET", "/screenshot", Value::Null);
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = webdriver(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &Value::Null,
            );
        }
        // chromedriver leads its process group; the browser is in it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One request to chromedriver: status and JSON body. chromedriver keeps
/// connections open whatever the request says, so the answer is read by
/// its `Content-Length`, not to the connection's end.
fn webdriver(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &Value,
) -> std::io::Result<(u16, Value)> {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut answer = vec![0; length];
    reader.read_exact(&mut answer)?;
    let value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    Ok((status, value))
}

/// Whether the browser is installed; without it the test passes only when
/// `CI` is unset.
fn browser_installed() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !std::path::Path::new(path).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "the dashboard browser test needs {} (Debian packages chromium and chromium-driver; .ci/run installs them)",
        missing.join(" and ")
    );
    assert!(std::env::var_os("CI").is_none(), "CI is set, but {why}");
    crate::support::say_skipped(&why);
    false
}

fn badge(name: &str) -> String {
    format!("tr[data-plugin='{name}'] .badge")
}

#[test]
fn the_dashboard_shows_states_and_follows_changes_live() {
    if !browser_installed() {
        return;
    }
    let plugins = PluginsDir::new();
    plugins
        .good("healthy", json!({}))
        .good("victim", json!({}))
        .good("broken", json!({"entrypoint": "libforgesyte-nowhere.so"}))
        .good(
            "needs-lib",
            json!({"dependencies": ["lib:libforgesyte-absent.so.1"]}),
        );
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let browser = Browser::start();
    browser.navigate(&format!("http://{}/", server.addr));

    // Every plugin's state as a badge, with its reason.
    for (name, state) in [
        ("healthy", "INITIALIZED"),
        ("victim", "INITIALIZED"),
        ("broken", "FAILED"),
        ("needs-lib", "UNAVAILABLE"),
    ] {
        browser.wait_text(&badge(name), name, |t| t == state);
    }
    let reason = browser
        .text("tr[data-plugin='broken'] .reason")
        .unwrap_or_default();
    assert!(reason.starts_with("ImportError: "), "{reason}");
    assert!(reason.contains("libforgesyte-nowhere.so"), "{reason}");
    let reason = browser
        .text("tr[data-plugin='needs-lib'] .reason")
        .unwrap_or_default();
    assert!(
        reason.starts_with("Missing dependencies: ") && reason.contains("libforgesyte-absent.so.1"),
        "{reason}"
    );
    browser.wait_text("tr[data-plugin='healthy'] .runtime", "runtime", |t| {
        t == "native"
    });
    browser.wait_text("tr[data-plugin='healthy'] .isolation", "isolation", |t| {
        t == "in-process"
    });
    browser.wait_text("#conn", "the event stream", |t| t == "live");
    browser.wait_text("[data-count='FAILED'] b", "the FAILED count", |t| t == "1");

    // The state filter hides the others.
    let shown = browser.script(
        "const f = document.getElementById('filter'); f.value = 'FAILED'; \
         f.dispatchEvent(new Event('change')); \
         return [...document.querySelectorAll('tr.plugin')].filter(r => !r.hidden).map(r => r.dataset.plugin);",
        json!([]),
    );
    assert_eq!(shown, json!(["broken"]));
    browser.script(
        "const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('change'));",
        json!([]),
    );

    // A plugin's row opens its tools; the try-it form runs one.
    browser.script(
        "document.querySelector(\"tr[data-plugin='healthy'] button.open\").click();",
        json!([]),
    );
    browser.wait_text(
        "tr[data-details='healthy'] .tool[data-tool='echo'] h3",
        "the tools",
        |t| t.contains("echo"),
    );
    browser.script(
        "const tool = document.querySelector(\"tr[data-details='healthy'] .tool[data-tool='echo']\"); \
         tool.querySelector('textarea').value = '{\"greeting\": \"hi\"}'; \
         tool.querySelector('button.run').click();",
        json!([]),
    );
    let result = browser.wait_text(
        "tr[data-details='healthy'] .tool[data-tool='echo'] pre.result",
        "the tool's answer",
        |t| t.starts_with("200"),
    );
    assert!(result.contains("\"greeting\": \"hi\""), "{result}");

    // Calls over two polls draw the latency chart.
    for _ in 0..2 {
        for _ in 0..5 {
            assert_eq!(server.run("healthy", "echo", r#"{"args": {}}"#).status, 200);
        }
        std::thread::sleep(Duration::from_millis(2300));
    }

    // A fault appears without navigation: the page object survives. It is
    // a run from the try-it form, whose answer stays in view: the fault's
    // event comes before the answer, and the card it was sent from is
    // kept, not rebuilt (the answer went to a card no longer on the page).
    browser.script("window.__sameDocument = 42;", json!([]));
    browser.script(
        "document.querySelector(\"tr[data-plugin='victim'] button.open\").click();",
        json!([]),
    );
    let panic_card = "tr[data-details='victim'] .tool[data-tool='panic']";
    browser.wait_text(&format!("{panic_card} h3"), "the victim's tools", |t| {
        t.contains("panic")
    });
    browser.script(
        &format!("document.querySelector(\"{panic_card} button.run\").click();"),
        json!([]),
    );
    let answer = browser.wait_text(
        &format!("{panic_card} pre.result"),
        "the fault's answer in the form",
        |t| t.starts_with("502"),
    );
    assert!(answer.contains("ToolPanic"), "{answer}");
    browser.wait_text(&badge("victim"), "the fault", |t| t == "FAILED");
    browser.wait_text("tr[data-plugin='victim'] .reason", "its reason", |t| {
        t.starts_with("ToolPanic")
    });
    browser.wait_text("#journal-rows", "the journal", |t| t.contains("victim"));
    browser.wait_text("[data-count='FAILED'] b", "the FAILED count", |t| t == "2");
    assert_eq!(
        browser.script("return window.__sameDocument;", json!([])),
        json!(42),
        "the page was reloaded"
    );
    let events = browser.text("#events").unwrap_or_default();
    // The fault lands while its call is in flight.
    assert!(
        events.contains("victim: RUNNING → FAILED (ToolPanic"),
        "{events}"
    );
    let chart_lines = browser.script(
        "return document.querySelectorAll('#latency polyline').length;",
        json!([]),
    );
    assert!(chart_lines.as_u64() >= Some(1), "no latency line");

    // Closed again, so the screenshot shows every row.
    browser.script(
        "document.querySelector(\"tr[data-plugin='healthy'] button.open\").click();",
        json!([]),
    );
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard.png");
    std::fs::write(&target, &png).unwrap();
    eprintln!("screenshot: {}", target.display());
}

#[tokio::test]
async fn the_page_is_served_at_root_and_ui_with_a_same_origin_policy() {
    let host = crate::support::fake_host(forgesyte_server::ServerConfig::default());
    let root = crate::support::get(&host.app, "/").await;
    let ui = crate::support::get(&host.app, "/ui").await;
    for reply in [&root, &ui] {
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let policy = reply.header("content-security-policy").unwrap_or_default();
        assert!(
            policy.starts_with("default-src 'none'; connect-src 'self'"),
            "{policy}"
        );
        assert!(reply.text().contains("new EventSource('/v1/events')"));
    }
    assert_eq!(root.body, ui.body);
    // The icon every browser asks for beside the page: none, and no 404.
    let icon = crate::support::get(&host.app, "/favicon.ico").await;
    assert_eq!(icon.status, 204);
    assert!(icon.body.is_empty());
    assert_eq!(icon.header("cache-control"), Some("public, max-age=86400"));
}
