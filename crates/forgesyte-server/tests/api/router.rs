//! The real router over fake plugins, driven with `oneshot`.

use forgesyte_server::ServerConfig;
use serde_json::{Value, json};

use crate::support::{
    FAKE_PLUGINS, FakeHost, assert_health_answer, fake_host, get, hostile_segments, run, send,
};

fn host() -> FakeHost {
    fake_host(ServerConfig::default())
}

/// Every field of the SPEC §5 status object.
const STATUS_FIELDS: &[&str] = &[
    "name",
    "state",
    "description",
    "reason",
    "version",
    "uptime_seconds",
    "last_used",
    "success_count",
    "error_count",
    "last_execution_time_ms",
    "avg_execution_time_ms",
];

fn assert_status_object(status: &Value) {
    let obj = status
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {status}"));
    for field in STATUS_FIELDS {
        assert!(obj.contains_key(*field), "missing {field} in {status}");
    }
}

// ------------------------------------------------- health API GREEN suite

#[tokio::test]
async fn list_returns_a_sorted_array_of_every_plugin_with_state_and_metrics() {
    let host = host();
    let reply = get(&host.app, "/v1/plugins").await;
    assert_eq!(reply.status, 200);
    let list = reply.json();
    let list = list.as_array().expect("an array");
    let got: Vec<(&str, &str)> = list
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(got, FAKE_PLUGINS);
    for status in list {
        assert_status_object(status);
        assert_eq!(status["success_count"], 0);
        assert_eq!(status["error_count"], 0);
        assert!(status["uptime_seconds"].as_f64().unwrap() >= 0.0);
    }
}

#[tokio::test]
async fn list_reflects_every_change_at_once_and_uptime_moves_on() {
    let host = host();
    let first = get(&host.app, "/v1/plugins").await.json();
    // A tool call is a registry change: the next list shows it, cache or not.
    assert_eq!(
        run(&host.app, "good", "echo", r#"{"args": {}}"#)
            .await
            .status,
        200
    );
    let second = get(&host.app, "/v1/plugins").await.json();
    let good = |list: &Value| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "good")
            .cloned()
            .unwrap()
    };
    assert_eq!(good(&first)["success_count"], 0);
    assert_eq!(good(&second)["success_count"], 1);
    host.state
        .registry()
        .mark_failed("other", "changed by hand")
        .unwrap();
    let third = get(&host.app, "/v1/plugins").await.json();
    let other = third
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "other")
        .unwrap();
    assert_eq!(other["state"], "FAILED");
    assert_eq!(other["reason"], "changed by hand");
    // Without changes the uptime still advances (the cache lives < 0.1 s).
    let before = good(&third)["uptime_seconds"].as_f64().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let later = get(&host.app, "/v1/plugins").await.json();
    let after = good(&later)["uptime_seconds"].as_f64().unwrap();
    assert!(after >= before + 0.1, "{before} -> {after}");
}

#[tokio::test]
async fn list_with_a_trailing_slash_is_the_same_answer_without_redirect() {
    let host = host();
    let plain = get(&host.app, "/v1/plugins").await.json();
    let slash = get(&host.app, "/v1/plugins/").await;
    assert_eq!(slash.status, 200);
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&slash.json()), names(&plain));
}

#[tokio::test]
async fn failed_plugin_health_is_200_with_state_and_reason() {
    let host = host();
    let reply = get(&host.app, "/v1/plugins/bad-init/health").await;
    assert_eq!(reply.status, 200);
    let status = reply.json();
    assert_status_object(&status);
    assert_eq!(status["state"], "FAILED");
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.starts_with("InitError:"), "{reason}");
    assert!(reason.contains("model weights missing"), "{reason}");
    assert_eq!(status["version"], "0.1.0");

    let abi = get(&host.app, "/v1/plugins/wrong-abi/health").await.json();
    assert_eq!(abi["state"], "FAILED");
    assert!(
        abi["reason"].as_str().unwrap().starts_with("ImportError:"),
        "{abi}"
    );

    let manifest = get(&host.app, "/v1/plugins/broken-json/health")
        .await
        .json();
    assert_eq!(manifest["state"], "FAILED");
    assert!(
        manifest["reason"].as_str().unwrap().contains("manifest"),
        "{manifest}"
    );
}

#[tokio::test]
async fn unavailable_plugin_health_is_200_with_the_missing_items() {
    let host = host();
    let gpu = get(&host.app, "/v1/plugins/needs-gpu/health").await;
    assert_eq!(gpu.status, 200);
    let gpu = gpu.json();
    assert_eq!(gpu["state"], "UNAVAILABLE");
    let reason = gpu["reason"].as_str().unwrap();
    assert!(
        reason.contains("GPU") && reason.contains("CUDA"),
        "{reason}"
    );

    let lib = get(&host.app, "/v1/plugins/needs-lib/health").await.json();
    assert_eq!(lib["state"], "UNAVAILABLE");
    let reason = lib["reason"].as_str().unwrap();
    assert!(reason.starts_with("Missing dependencies:"), "{reason}");
    assert!(reason.contains("nosuchlib"), "{reason}");
}

#[tokio::test]
async fn unknown_plugin_health_is_404_with_detail() {
    let host = host();
    let reply = get(&host.app, "/v1/plugins/nope/health").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json(), json!({"detail": "Plugin 'nope' not found"}));
}

#[tokio::test]
async fn available_plugin_shows_metrics_after_a_success() {
    let host = host();
    let before = get(&host.app, "/v1/plugins/good/health").await.json();
    assert_eq!(before["state"], "INITIALIZED");
    assert_eq!(before["last_used"], Value::Null);
    assert_eq!(before["last_execution_time_ms"], Value::Null);
    assert_eq!(before["reason"], Value::Null);

    let reply = run(&host.app, "good", "echo", r#"{"args": {"x": 1}}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let after = get(&host.app, "/v1/plugins/good/health").await.json();
    assert_status_object(&after);
    assert_eq!(after["state"], "INITIALIZED");
    assert_eq!(after["success_count"], 1);
    assert_eq!(after["error_count"], 0);
    assert!(
        after["last_used"].as_str().unwrap().ends_with('Z'),
        "{after}"
    );
    assert!(after["last_execution_time_ms"].as_f64().unwrap() >= 0.0);
    assert!(after["avg_execution_time_ms"].as_f64().unwrap() >= 0.0);
    // The list shows the same numbers.
    let list = get(&host.app, "/v1/plugins").await.json();
    let good = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "good")
        .unwrap();
    assert_eq!(good["success_count"], 1);
}

#[tokio::test]
async fn health_never_answers_500_for_any_state() {
    let host = host();
    // Drive one plugin into a run-time fault first.
    let _ = run(&host.app, "other", "panic", "{}").await;
    for (name, _) in FAKE_PLUGINS {
        let reply = get(&host.app, &format!("/v1/plugins/{name}/health")).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_status_object(&reply.json());
    }
}

#[tokio::test]
async fn server_health_counts_available_plugins() {
    let host = host();
    let reply = get(&host.app, "/v1/health").await;
    assert_eq!(reply.status, 200);
    let health = reply.json();
    assert_eq!(health["plugins_loaded"], 2);
    assert_eq!(health["plugins_total"], FAKE_PLUGINS.len());
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    host.state.set_loading(true);
    assert_eq!(
        get(&host.app, "/v1/health").await.json()["status"],
        "loading"
    );
}

// ------------------------------------------------------------- manifest

#[tokio::test]
async fn manifest_is_served_as_read_with_unknown_fields() {
    let host = host();
    let reply = get(&host.app, "/v1/plugins/good/manifest").await;
    assert_eq!(reply.status, 200);
    let manifest = reply.json();
    assert_eq!(manifest["name"], "good");
    assert_eq!(manifest["x-extra"], json!({"kept": [1, 2, 3]}));

    let failed = get(&host.app, "/v1/plugins/bad-init/manifest").await;
    assert_eq!(
        failed.status, 200,
        "a failed plugin's manifest is still readable"
    );

    let broken = get(&host.app, "/v1/plugins/broken-json/manifest").await;
    assert_eq!(broken.status, 404);
    assert!(
        broken.detail().contains("no readable manifest"),
        "{}",
        broken.text()
    );

    let unknown = get(&host.app, "/v1/plugins/nope/manifest").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.detail(), "Plugin 'nope' not found");
}

#[tokio::test]
async fn tools_lists_the_loaded_tools_or_says_why_not() {
    let host = host();
    let reply = get(&host.app, "/v1/plugins/good/tools").await;
    assert_eq!(reply.status, 200);
    let ids: Vec<String> = reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["echo", "fail", "panic"]);
    let failed = get(&host.app, "/v1/plugins/bad-init/tools").await;
    assert_eq!(failed.status, 503);
    assert!(failed.detail().contains("FAILED"), "{}", failed.text());
    assert_eq!(get(&host.app, "/v1/plugins/nope/tools").await.status, 404);
}

// ------------------------------------------------------------- tool runs

#[tokio::test]
async fn tool_success_answers_the_result() {
    let host = host();
    let reply = run(
        &host.app,
        "good",
        "echo",
        r#"{"args": {"text": "hi", "n": [1, 2]}}"#,
    )
    .await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["ok"], true);
    assert_eq!(body["plugin_id"], "good");
    assert_eq!(body["tool_name"], "echo");
    assert_eq!(body["result"], json!({"text": "hi", "n": [1, 2]}));
    assert!(body["processing_time_ms"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn an_empty_body_or_no_args_means_empty_args() {
    let host = host();
    for body in ["", "{}", r#"{"args": {}}"#] {
        let reply = run(&host.app, "good", "echo", body).await;
        assert_eq!(reply.status, 200, "{body:?}: {}", reply.text());
        assert_eq!(reply.json()["result"], json!({}));
    }
}

#[tokio::test]
async fn tool_error_is_422_and_counted_without_changing_state() {
    let host = host();
    let reply = run(&host.app, "good", "fail", "{}").await;
    assert_eq!(reply.status, 422);
    let body = reply.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error"], "fake failure");
    assert_eq!(body["error_type"], "InvalidInput");
    assert!(
        body["detail"].as_str().unwrap().contains("fake failure"),
        "{body}"
    );
    let health = get(&host.app, "/v1/plugins/good/health").await.json();
    assert_eq!(health["state"], "INITIALIZED");
    assert_eq!(health["error_count"], 1);
    // Still runnable.
    assert_eq!(run(&host.app, "good", "echo", "{}").await.status, 200);
}

#[tokio::test]
async fn tool_panic_is_502_then_503_and_the_plugin_is_failed() {
    let host = host();
    let first = run(&host.app, "good", "panic", "{}").await;
    assert_eq!(first.status, 502);
    let body = first.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error_type"], "ToolPanic");
    assert!(
        body["error"].as_str().unwrap().contains("fake panic"),
        "{body}"
    );

    let health = get(&host.app, "/v1/plugins/good/health").await.json();
    assert_eq!(health["state"], "FAILED");
    assert!(
        health["reason"].as_str().unwrap().contains("fake panic"),
        "{health}"
    );
    assert_eq!(health["error_count"], 1);

    for tool in ["echo", "panic"] {
        let again = run(&host.app, "good", tool, "{}").await;
        assert_eq!(again.status, 503, "{tool}: {}", again.text());
        let body = again.json();
        assert_eq!(body["error_type"], "PluginNotRunnable");
        assert_eq!(body["state"], "FAILED");
        assert!(
            body["reason"].as_str().unwrap().contains("fake panic"),
            "{body}"
        );
    }
    // The other plugin is untouched.
    assert_eq!(run(&host.app, "other", "echo", "{}").await.status, 200);
}

#[tokio::test]
async fn unknown_plugin_or_tool_is_404() {
    let host = host();
    let plugin = run(&host.app, "nope", "echo", "{}").await;
    assert_eq!(plugin.status, 404);
    let body = plugin.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error_type"], "PluginNotFound");
    assert_eq!(body["detail"], "Plugin 'nope' not found");

    let tool = run(&host.app, "good", "nope", "{}").await;
    assert_eq!(tool.status, 404);
    let body = tool.json();
    assert_eq!(body["error_type"], "UnknownTool");
    assert_eq!(body["tool_name"], "nope");
    let health = get(&host.app, "/v1/plugins/good/health").await.json();
    assert_eq!(
        health["error_count"], 0,
        "an unknown tool is not a tool error"
    );
}

#[tokio::test]
async fn plugins_that_did_not_load_are_503_with_state_and_reason() {
    let host = host();
    for (name, state, prefix) in [
        ("bad-init", "FAILED", "InitError:"),
        ("needs-lib", "UNAVAILABLE", "Missing dependencies:"),
        ("broken-json", "FAILED", ""),
    ] {
        let reply = run(&host.app, name, "echo", "{}").await;
        assert_eq!(reply.status, 503, "{name}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["ok"], false);
        assert_eq!(body["state"], state, "{body}");
        assert!(
            body["reason"].as_str().unwrap().starts_with(prefix),
            "{body}"
        );
    }
}

#[tokio::test]
async fn malformed_bodies_are_400_and_wrong_shapes_422() {
    let host = host();
    for body in ["{", "not json", "{\"args\": {}", "\u{0}"] {
        let reply = run(&host.app, "good", "echo", body).await;
        assert_eq!(reply.status, 400, "{body:?}: {}", reply.text());
        let json = reply.json();
        assert_eq!(json["ok"], false);
        assert_eq!(json["error_type"], "MalformedBody");
        assert!(json["detail"].is_string());
    }
    for body in [
        "[]",
        "\"args\"",
        "null",
        r#"{"args": [1]}"#,
        r#"{"args": "x"}"#,
        r#"{"args": {}, "extra": 1}"#,
    ] {
        let reply = run(&host.app, "good", "echo", body).await;
        assert_eq!(reply.status, 422, "{body:?}: {}", reply.text());
        assert_eq!(reply.json()["error_type"], "InvalidBody");
    }
    let health = get(&host.app, "/v1/plugins/good/health").await.json();
    assert_eq!(
        health["error_count"], 0,
        "rejected bodies never reach the plugin"
    );
}

#[tokio::test]
async fn a_body_without_json_content_type_is_still_read() {
    let host = host();
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/plugins/good/tools/echo/run")
        .header("content-type", "text/plain")
        .body(axum::body::Body::from(r#"{"args": {"a": 1}}"#))
        .unwrap();
    let response = tower::ServiceExt::oneshot(host.app.clone(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn oversized_body_is_413_in_the_failure_shape() {
    let mut config = ServerConfig::default();
    config.body_limit = 1024;
    let host = fake_host(config);
    let big = format!(r#"{{"args": {{"blob": "{}"}}}}"#, "x".repeat(2048));
    let reply = run(&host.app, "good", "echo", &big).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error_type"], "PayloadTooLarge");
    assert!(body["detail"].as_str().unwrap().contains("1024"), "{body}");
    // Just under the limit passes.
    let small = format!(r#"{{"args": {{"blob": "{}"}}}}"#, "x".repeat(900));
    assert_eq!(run(&host.app, "good", "echo", &small).await.status, 200);
}

// ------------------------------------------------------ routes and methods

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let host = host();
    // `/` is the dashboard.
    for uri in [
        "/ui/x",
        "/nope",
        "/v1",
        "/v1/plugins/good",
        "/v1/plugins/good/health/x",
        "/v2/plugins",
    ] {
        let reply = get(&host.app, uri).await;
        assert_eq!(reply.status, 404, "{uri}");
        assert_eq!(reply.json(), json!({"detail": "Not Found"}), "{uri}");
    }
}

#[tokio::test]
async fn wrong_methods_are_405_json() {
    let host = host();
    for (method, uri) in [
        ("POST", "/v1/plugins"),
        ("DELETE", "/v1/plugins/good/health"),
        ("PUT", "/v1/health"),
        ("GET", "/v1/plugins/good/tools/echo/run"),
    ] {
        let reply = send(&host.app, method, uri, Vec::new()).await;
        assert_eq!(reply.status, 405, "{method} {uri}");
        assert_eq!(
            reply.json(),
            json!({"detail": "Method Not Allowed"}),
            "{method} {uri}"
        );
    }
}

#[tokio::test]
async fn openapi_and_docs_are_served() {
    let host = host();
    let reply = get(&host.app, "/openapi.json").await;
    assert_eq!(reply.status, 200);
    let doc = reply.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["paths"]["/v1/plugins/{name}/health"]["get"].is_object());
    let docs = get(&host.app, "/docs").await;
    assert_eq!(docs.status, 200);
    assert!(
        docs.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(docs.text().contains("/v1/plugins/{name}/tools/{tool}/run"));
    assert_eq!(docs.header("x-content-type-options"), Some("nosniff"));
    assert!(
        docs.header("content-security-policy")
            .is_some_and(|csp| csp.starts_with("default-src 'none'")),
        "{:?}",
        docs.header("content-security-policy")
    );
}

/// The document says what the run and stream routes really answer: any
/// JSON value as a result, a body that may be absent, bytes (not an array
/// of integers) as octet-stream, every content type of a 200, the stream's
/// two shapes of 503 and its queue's range.
#[tokio::test]
async fn the_document_says_what_the_run_and_stream_routes_answer() {
    let host = host();
    let doc = get(&host.app, "/openapi.json").await.json();
    let schemas = &doc["components"]["schemas"];
    let result = &schemas["RunSuccess"]["properties"]["result"];
    assert!(result.get("type").is_none(), "result limited to {result}");
    let run = &doc["paths"]["/v1/plugins/{name}/tools/{tool}/run"]["post"];
    assert_eq!(run["requestBody"]["required"], json!(false), "{run}");
    let binary = json!({"type": "string", "format": "binary"});
    assert_eq!(
        run["requestBody"]["content"]["application/octet-stream"]["schema"],
        binary
    );
    let ok = &run["responses"]["200"]["content"];
    assert_eq!(ok["application/octet-stream"]["schema"], binary);
    assert!(ok["multipart/mixed"].is_object(), "{ok}");
    assert!(ok["application/json"].is_object(), "{ok}");
    // (`allOf`: the not-runnable fields are flattened into it.)
    let error_type = schemas["RunFailure"]["allOf"][1]["properties"]["error_type"]["description"]
        .as_str()
        .unwrap_or_default();
    for class in [
        "CrashError",
        "ServerBusy",
        "TooManyCalls",
        "BodyTimeout",
        "NotAcceptable",
    ] {
        assert!(error_type.contains(class), "{class} missing: {error_type}");
    }
    let stream = &doc["paths"]["/v1/plugins/{name}/tools/{tool}/stream"]["get"];
    assert_eq!(
        stream["responses"]["503"]["content"]["application/json"]["schema"]["oneOf"],
        json!([
            {"$ref": "#/components/schemas/RunFailure"},
            {"$ref": "#/components/schemas/ErrorDetail"}
        ])
    );
    let queue = stream["parameters"]
        .as_array()
        .and_then(|params| params.iter().find(|p| p["name"] == "queue"))
        .unwrap_or_else(|| panic!("no queue parameter: {stream}"));
    assert_eq!(
        (&queue["schema"]["minimum"], &queue["schema"]["maximum"]),
        (&json!(1), &json!(64)),
        "{queue}"
    );
    let metrics = &doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
    assert!(metrics["text/plain"].is_object(), "{metrics}");
}

// ------------------------------------------------------- hostile names

#[tokio::test]
async fn a_thousand_hostile_names_never_get_500_from_health_routes() {
    let host = host();
    let segments = hostile_segments(0x5EED_F0E5, 1000);
    assert_eq!(segments.len(), 1000);
    let mut sent = 0;
    for segment in &segments {
        for route in ["health", "manifest"] {
            let uri = format!("/v1/plugins/{segment}/{route}");
            let Ok(parsed) = uri.parse::<axum::http::Uri>() else {
                panic!("the generator made an invalid URI: {uri}");
            };
            let reply = get(&host.app, &parsed.to_string()).await;
            assert_health_answer(&reply, &uri);
            sent += 1;
        }
    }
    assert_eq!(sent, 2000);
    // A near miss is a 404 naming the decoded name.
    let reply = get(&host.app, "/v1/plugins/good%00/health").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.detail(), "Plugin 'good\u{0}' not found");
    let reply = get(&host.app, "/v1/plugins/%FF/health").await;
    assert_eq!(reply.detail(), "Plugin '\u{FFFD}' not found");
    let long = "a".repeat(10 * 1024);
    let reply = get(&host.app, &format!("/v1/plugins/{long}/health")).await;
    assert_eq!(reply.status, 404);
    assert!(reply.detail().len() < 400, "long names are cut in messages");
}

#[tokio::test]
async fn percent_encoded_names_reach_every_plugin_route() {
    let host = host();
    // `go%6Fd` is `good`, `ec%68o` is `echo`.
    let health = get(&host.app, "/v1/plugins/go%6Fd/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["name"], "good");
    let manifest = get(&host.app, "/v1/plugins/go%6Fd/manifest").await;
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    let tools = get(&host.app, "/v1/plugins/go%6Fd/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    let ran = run(&host.app, "go%6Fd", "ec%68o", "{}").await;
    assert_eq!(ran.status, 200, "{}", ran.text());
    assert_eq!(ran.json()["plugin_id"], "good");
    assert_eq!(ran.json()["tool_name"], "echo");
    // Bytes that are not UTF-8 are no name of anything: 404 in each
    // route's own error shape, never axum's plain-text 400.
    for route in ["health", "manifest", "tools"] {
        let reply = get(&host.app, &format!("/v1/plugins/%FF/{route}")).await;
        assert_eq!(reply.status, 404, "{route}: {}", reply.text());
        assert_eq!(reply.detail(), "Plugin '\u{FFFD}' not found", "{route}");
    }
    let reply = run(&host.app, "good", "%FF%FE", "{}").await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error_type"], "UnknownTool");
    assert_eq!(body["tool_name"], "\u{FFFD}\u{FFFD}");
    let reply = run(&host.app, "%C0", "echo", "{}").await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(reply.json()["error_type"], "PluginNotFound");
    assert_eq!(reply.json()["plugin_id"], "\u{FFFD}");
}
