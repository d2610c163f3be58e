//! `GET /livez` and `GET /readyz` through the real router over fake
//! plugins (the load pass itself, before and after, is in `startup`).

use forgesyte_loader::fake::FakeBehavior;
use forgesyte_server::ServerConfig;
use serde_json::{Value, json};

use crate::support::{TOKEN, fake_host, get, world};

fn check<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks in {body}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {body}"))
}

#[tokio::test]
async fn livez_is_ok_whatever_the_plugins_do() {
    // Half of these plugins are FAILED or UNAVAILABLE.
    let host = fake_host(ServerConfig::default());
    let reply = get(&host.app, "/livez").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"status": "ok"}));
    let reply = get(&host.app, "/livez?verbose").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn readyz_is_503_while_a_required_plugin_is_not_available() {
    let w = world(Some(TOKEN));
    let reply = get(&w.app, "/readyz").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["status"], "not ready");
    assert_eq!(
        body["detail"], "Not ready: plugin:fixme, plugin:needs-lib",
        "{body}"
    );
    assert_eq!(body.get("checks"), None, "checks only with ?verbose");

    let body = get(&w.app, "/readyz?verbose").await.json();
    let names: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "load-pass",
            "plugin:fixme",
            "plugin:good",
            "plugin:needs-lib"
        ]
    );
    assert_eq!(
        check(&body, "load-pass"),
        &json!({"name": "load-pass", "ok": true, "detail": "finished"})
    );
    assert_eq!(check(&body, "plugin:good")["ok"], true);
    assert_eq!(check(&body, "plugin:good")["detail"], "INITIALIZED");
    let fixme = check(&body, "plugin:fixme");
    assert_eq!(fixme["ok"], false);
    let detail = fixme["detail"].as_str().unwrap();
    assert!(detail.starts_with("FAILED: InitError: "), "{detail}");
    assert!(detail.contains("model weights missing"), "{detail}");
    let needs_lib = check(&body, "plugin:needs-lib")["detail"].as_str().unwrap();
    assert!(
        needs_lib.starts_with("UNAVAILABLE: Missing dependencies: "),
        "{needs_lib}"
    );
    // `?verbose=0` is not verbose.
    let body = get(&w.app, "/readyz?verbose=0").await.json();
    assert_eq!(body.get("checks"), None);
}

#[tokio::test]
async fn optional_plugins_never_block_readiness() {
    let w = world(Some(TOKEN));
    assert_eq!(get(&w.app, "/readyz").await.status, 503);
    // Both broken plugins become optional (still broken); the manifests
    // are read again by a reload.
    w.put(
        "fixme",
        json!({"name": "fixme", "optional": true}),
        FakeBehavior::InitError("model weights missing".into()),
    );
    w.put(
        "needs-lib",
        json!({"name": "needs-lib", "optional": true, "dependencies": ["lib:libfixed.so.1"]}),
        FakeBehavior::Good,
    );
    let reply = w.admin("/v1/plugins/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(w.health("fixme").await["state"], "FAILED");

    let reply = get(&w.app, "/readyz?verbose").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body.get("detail"), None);
    let fixme = check(&body, "plugin:fixme");
    assert_eq!(fixme["ok"], true);
    assert!(
        fixme["detail"]
            .as_str()
            .unwrap()
            .ends_with("(optional: does not block readiness)"),
        "{fixme}"
    );
    // The plain probe (counted, no check written out) says the same.
    let reply = get(&w.app, "/readyz").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"status": "ok"}));
    // The server health agrees: every required plugin is available, and
    // it counts what the checks list.
    let health = get(&w.app, "/v1/health").await.json();
    assert_eq!(health["status"], "ok");
    let checks = body["checks"].as_array().unwrap();
    let available = checks
        .iter()
        .filter(|c| c["detail"] == "INITIALIZED")
        .count();
    assert_eq!(health["plugins_loaded"], available, "{health}");
    assert_eq!(health["plugins_total"], checks.len() - 1, "{health}");
    assert!(available < checks.len() - 1, "a broken plugin is counted");
}

#[tokio::test]
async fn a_reload_that_fixes_the_last_required_plugin_makes_the_server_ready() {
    let w = world(Some(TOKEN));
    w.fake.libraries.add("libfixed.so.1");
    w.put(
        "fixme",
        json!({"name": "fixme", "version": "1.0.1"}),
        FakeBehavior::Good,
    );
    assert_eq!(get(&w.app, "/readyz").await.status, 503);
    assert_eq!(w.admin("/v1/plugins/fixme/reload").await.status, 200);
    let body = get(&w.app, "/readyz").await.json();
    assert_eq!(body["detail"], "Not ready: plugin:needs-lib");
    assert_eq!(w.admin("/v1/plugins/needs-lib/reload").await.status, 200);
    let reply = get(&w.app, "/readyz").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"status": "ok"}));
}
