//! The admin reload routes through the real router over fake plugins: the
//! token matrix, unknown plugins, and plugins fixed between passes (the
//! fake world changes, then a reload picks the change up). Also the
//! failure journal on the health route.

use forgesyte_loader::fake::FakeBehavior;
use serde_json::{Value, json};

use crate::support::{TOKEN, get, run, world};

#[tokio::test]
async fn reload_is_disabled_without_an_admin_token() {
    let w = world(None);
    for uri in ["/v1/plugins/good/reload", "/v1/plugins/reload"] {
        for auth in [None, Some("Bearer anything")] {
            let reply = w.post(uri, auth).await;
            assert_eq!(reply.status, 403, "{uri}: {}", reply.text());
            assert!(
                reply
                    .detail()
                    .starts_with("Reload is disabled: set FORGESYTE_ADMIN_TOKEN"),
                "{}",
                reply.text()
            );
        }
    }
}

#[tokio::test]
async fn the_reload_auth_matrix() {
    let w = world(Some(TOKEN));
    for uri in ["/v1/plugins/good/reload", "/v1/plugins/reload"] {
        // Missing or malformed: 401 with the scheme to use.
        for auth in [
            None,
            Some("Basic dXNlcjpwYXNz"),
            Some("Bearer"),
            Some(TOKEN),
        ] {
            let reply = w.post(uri, auth).await;
            assert_eq!(reply.status, 401, "{uri} {auth:?}: {}", reply.text());
            assert!(
                reply
                    .header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{:?}",
                reply.headers
            );
            assert!(!reply.detail().is_empty());
        }
        // Wrong token: 403.
        for wrong in [
            "Bearer nope",
            &format!("Bearer {TOKEN}x"),
            &format!("Bearer {}", &TOKEN[1..]),
        ] {
            let reply = w.post(uri, Some(wrong)).await;
            assert_eq!(reply.status, 403, "{uri} {wrong}: {}", reply.text());
            assert_eq!(reply.detail(), "Invalid admin token");
        }
        // Right token: 200 (scheme case-insensitive).
        let reply = w.post(uri, Some(&format!("bearer {TOKEN}"))).await;
        assert_eq!(reply.status, 200, "{uri}: {}", reply.text());
    }
    // GET is not how to reload.
    let reply = get(&w.app, "/v1/plugins/reload").await;
    assert_eq!(reply.status, 405, "{}", reply.text());
}

#[tokio::test]
async fn reloading_an_unknown_plugin_is_404_but_only_once_authorized() {
    let w = world(Some(TOKEN));
    let reply = w.admin("/v1/plugins/nope/reload").await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(reply.detail(), "Plugin 'nope' not found");
    // Without credentials, nothing is told about which plugins exist.
    let reply = w.post("/v1/plugins/nope/reload", None).await;
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn a_failed_plugin_fixed_meanwhile_is_initialized_by_its_reload() {
    let w = world(Some(TOKEN));
    let before = w.health("fixme").await;
    assert_eq!(before["state"], "FAILED");
    assert!(
        before["reason"]
            .as_str()
            .unwrap()
            .contains("model weights missing")
    );
    // The failure is in the journal served with the health.
    let journal = before["journal"].as_array().unwrap();
    assert_eq!(journal.len(), 1, "{before}");
    assert_eq!(journal[0]["state"], "FAILED");
    assert!(
        journal[0]["reason"]
            .as_str()
            .unwrap()
            .contains("model weights missing")
    );

    // A reload before the fix fails the same way, and says so.
    let reply = w.admin("/v1/plugins/fixme/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["state"], "FAILED");

    // Fixed on disk: the weights arrive, and the manifest gets a new version.
    w.put(
        "fixme",
        json!({"name": "fixme", "version": "1.0.1"}),
        FakeBehavior::Good,
    );
    let reply = w.admin("/v1/plugins/fixme/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let outcome = reply.json();
    assert_eq!(outcome["name"], "fixme");
    assert_eq!(outcome["state"], "INITIALIZED", "{outcome}");
    assert_eq!(outcome["reason"], Value::Null);
    assert_eq!(outcome["dir"], "/plugins/fixme");
    assert!(outcome["elapsed_ms"].as_f64().unwrap() >= 0.0);

    let after = w.health("fixme").await;
    assert_eq!(after["state"], "INITIALIZED");
    assert_eq!(after["version"], "1.0.1", "the manifest was read again");
    assert_eq!(after["reason"], Value::Null);
    let reply = run(&w.app, "fixme", "echo", r#"{"args": {"x": 1}}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["result"], json!({"x": 1}));
    // The other plugins were left alone.
    assert_eq!(w.health("good").await["state"], "INITIALIZED");
    assert_eq!(w.health("needs-lib").await["state"], "UNAVAILABLE");
}

#[tokio::test]
async fn reload_all_retries_unavailable_plugins_and_finds_new_ones() {
    let w = world(Some(TOKEN));
    assert_eq!(w.health("needs-lib").await["state"], "UNAVAILABLE");
    w.fake.libraries.add("libfixed.so.1");
    w.put(
        "newcomer",
        json!({"name": "newcomer", "version": "0.1.0"}),
        FakeBehavior::Good,
    );
    let reply = w.admin("/v1/plugins/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    let states: Vec<(&str, &str)> = report["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("fixme", "FAILED"),
            ("good", "INITIALIZED"),
            ("needs-lib", "INITIALIZED"),
            ("newcomer", "INITIALIZED"),
        ],
        "{report}"
    );
    assert_eq!(report["loaded"], 3);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["unavailable"], 0);
    assert_eq!(w.health("newcomer").await["state"], "INITIALIZED");
    let list = get(&w.app, "/v1/plugins").await.json();
    assert_eq!(list.as_array().unwrap().len(), 4);
}

/// Over real TCP: each admin action is logged with the caller's address,
/// and an address that keeps guessing tokens is locked out (429 with
/// `Retry-After`), its next attempt not even checked, the right token
/// included.
#[test]
fn admin_actions_name_the_caller_and_guessing_is_locked_out() {
    use crate::support::{Forgesyte, PluginsDir, try_http_with};
    let dir = PluginsDir::new();
    dir.good("alpha", serde_json::json!({}));
    let token = "a-long-enough-admin-token";
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    let reload = |bearer: &str| {
        let header = format!("Bearer {bearer}");
        try_http_with(
            server.addr,
            "POST",
            "/v1/plugins/alpha/reload",
            &[("authorization", header.as_str())],
            b"",
        )
        .unwrap()
    };
    assert_eq!(reload(token).status, 200);
    for attempt in 0..5 {
        let reply = reload("a-guess");
        assert_eq!(reply.status, 403, "attempt {attempt}: {}", reply.text());
    }
    let locked = reload(token);
    assert_eq!(locked.status, 429, "{}", locked.text());
    let retry: u64 = locked
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    let log = server.log();
    assert!(
        log.contains("Admin: reload of plugin alpha requested by 127.0.0.1:"),
        "{log}"
    );
    assert!(
        log.contains("Admin: request from 127.0.0.1:") && log.contains("Invalid admin token"),
        "{log}"
    );
    // Six refusals, two warnings: the first wrong token and the one that
    // locked the client out (a client can send them in a loop).
    assert_eq!(log.matches("Admin: request from").count(), 2, "{log}");
    assert!(!log.contains("admin route refused"), "{log}");
}

/// Every answer carries an `x-request-id` (the client's, kept, or a new
/// UUID); with `FORGESYTE_LOG_FORMAT=json` every log line is one JSON
/// object, and the lines logged while serving a request carry its id.
#[test]
fn json_logs_carry_each_requests_id() {
    use crate::support::{Forgesyte, PluginsDir, try_http_with};
    let dir = PluginsDir::new();
    dir.good("alpha", serde_json::json!({}));
    let token = "a-long-enough-admin-token";
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[
            ("FORGESYTE_ADMIN_TOKEN", token),
            ("FORGESYTE_LOG_FORMAT", "json"),
        ],
    );
    server.wait_loaded();
    let generated = server.get("/v1/health");
    let id = generated.header("x-request-id").expect("an x-request-id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "32 hex digits: {id}"
    );
    let next = server.get("/v1/health");
    assert_ne!(next.header("x-request-id"), Some(id), "ids are unique");
    let bearer = format!("Bearer {token}");
    let reply = try_http_with(
        server.addr,
        "POST",
        "/v1/plugins/alpha/reload",
        &[
            ("authorization", bearer.as_str()),
            ("x-request-id", "trace-me-42"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-request-id"), Some("trace-me-42"));
    // One that could forge a log line's fields is replaced.
    let forged = try_http_with(
        server.addr,
        "GET",
        "/v1/health",
        &[("x-request-id", "zz1 plugin=forged")],
        b"",
    )
    .unwrap();
    let id = forged.header("x-request-id").expect("an x-request-id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "a new id: {id}"
    );
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let reload = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Admin: reload of plugin alpha"))
        })
        .unwrap_or_else(|| panic!("no reload line:\n{log}"));
    assert_eq!(reload["span"]["request_id"], "trace-me-42", "{reload}");
    assert_eq!(reload["level"], "INFO", "{reload}");
}
