//! Black-box tests: the real `forgesyte` binary over real plugin libraries
//! (the fixture zoo), on an ephemeral loopback port.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use forgesyte_tests::zoo;
use serde_json::{Value, json};

use crate::support::runner_pid;
use crate::support::{
    Forgesyte, PluginsDir, assert_health_answer, forgesyte_command, hostile_segments, http,
    http_with, run_forgesyte,
};

/// `alpha` and `beta` (good), `slow` (good, 0.3 s manifest time limit),
/// and the zoo's constructor failures and missing dependencies.
fn mixed_dir() -> PluginsDir {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({"x-vendor": {"kept": true}}))
        .good("beta", json!({}))
        .good("slow", json!({"limits": {"call_timeout_s": 0.3}}))
        .zoo(zoo::ERR_INIT)
        .zoo(zoo::PANIC_INIT)
        .zoo(zoo::WRONG_ABI)
        .zoo(zoo::MISSING_LIB)
        .zoo(zoo::NEEDS_GPU);
    dir
}

fn states(list: &Value) -> BTreeMap<String, String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expected_states() -> BTreeMap<String, String> {
    [
        ("alpha", "INITIALIZED"),
        ("beta", "INITIALIZED"),
        (zoo::ERR_INIT_NAME, "FAILED"),
        (zoo::MISSING_LIB_NAME, "UNAVAILABLE"),
        (zoo::NEEDS_GPU_NAME, "UNAVAILABLE"),
        (zoo::PANIC_INIT_NAME, "FAILED"),
        ("slow", "INITIALIZED"),
        (zoo::WRONG_ABI_NAME, "FAILED"),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_owned(), s.to_owned()))
    .collect()
}

#[test]
fn serve_lists_checks_health_and_runs_tools_over_http() {
    let dir = mixed_dir();
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    let health = server.wait_loaded();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["plugins_loaded"], 3);

    // List: every plugin, sorted, failed and unavailable ones included.
    let list = server.get("/v1/plugins");
    assert_eq!(list.status, 200);
    let list = list.json();
    assert_eq!(states(&list), expected_states());
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    assert_eq!(
        states(&server.get("/v1/plugins/").json()),
        expected_states()
    );

    // Health of each kind.
    let alpha = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(alpha["state"], "INITIALIZED");
    assert_eq!(alpha["version"], "1.0.0");
    let err_init = server
        .get(&format!("/v1/plugins/{}/health", zoo::ERR_INIT_NAME))
        .json();
    assert!(
        err_init["reason"]
            .as_str()
            .unwrap()
            .starts_with("InitError:"),
        "{err_init}"
    );
    let panic_init = server
        .get(&format!("/v1/plugins/{}/health", zoo::PANIC_INIT_NAME))
        .json();
    assert!(
        panic_init["reason"]
            .as_str()
            .unwrap()
            .contains("fixture constructor panic"),
        "{panic_init}"
    );
    let abi = server
        .get(&format!("/v1/plugins/{}/health", zoo::WRONG_ABI_NAME))
        .json();
    assert!(
        abi["reason"].as_str().unwrap().starts_with("ImportError:"),
        "{abi}"
    );
    let gpu = server
        .get(&format!("/v1/plugins/{}/health", zoo::NEEDS_GPU_NAME))
        .json();
    let reason = gpu["reason"].as_str().unwrap();
    assert!(
        reason.contains("GPU") && reason.contains("CUDA"),
        "{reason}"
    );
    let unknown = server.get("/v1/plugins/nope/health");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json(), json!({"detail": "Plugin 'nope' not found"}));

    // Manifest, unknown fields kept.
    let manifest = server.get("/v1/plugins/alpha/manifest");
    assert_eq!(manifest.status, 200);
    assert_eq!(manifest.json()["x-vendor"], json!({"kept": true}));

    // Tool success, then metrics.
    let ok = server.run("alpha", "echo", r#"{"args": {"hello": "world"}}"#);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let body = ok.json();
    assert_eq!(body["ok"], true);
    assert_eq!(body["result"], json!({"hello": "world"}));
    assert_eq!(body["plugin_id"], "alpha");
    assert_eq!(body["tool_name"], "echo");
    let alpha = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(alpha["success_count"], 1);
    assert!(alpha["last_used"].is_string());

    // Tool error: 422, counted, state unchanged.
    let fail = server.run("alpha", "fail", "{}");
    assert_eq!(fail.status, 422, "{}", fail.text());
    let body = fail.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error_type"], "FixtureError");
    assert_eq!(body["error"], "fixture tool failed");
    let alpha = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(
        (alpha["state"].as_str(), alpha["error_count"].as_u64()),
        (Some("INITIALIZED"), Some(1))
    );

    // Tool panic: 502, then 503 with state and reason.
    let panic = server.run("beta", "panic", "{}");
    assert_eq!(panic.status, 502, "{}", panic.text());
    assert_eq!(panic.json()["error_type"], "ToolPanic");
    // The panic is one line of the plugin's in the server's log, not the
    // plugin's standard library's block on the server's stderr.
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("beta")
            && l.contains("panicked at")
            && l.contains("fixture tool panic")),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.starts_with("thread '")), "{log}");
    let again = server.run("beta", "echo", "{}");
    assert_eq!(again.status, 503, "{}", again.text());
    let body = again.json();
    assert_eq!(body["state"], "FAILED");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("fixture tool panic"),
        "{body}"
    );

    // Not loaded: 503; unknown plugin or tool: 404.
    let failed = server.run(zoo::ERR_INIT_NAME, "echo", "{}");
    assert_eq!(failed.status, 503);
    assert_eq!(failed.json()["state"], "FAILED");
    assert_eq!(server.run("nope", "echo", "{}").status, 404);
    let tool = server.run("alpha", "nope", "{}");
    assert_eq!(tool.status, 404);
    assert_eq!(tool.json()["error_type"], "UnknownTool");

    // Malformed bodies.
    let syntax = server.run("alpha", "echo", "{\"args\": ");
    assert_eq!(syntax.status, 400, "{}", syntax.text());
    assert_eq!(syntax.json()["error_type"], "MalformedBody");
    let shape = server.run("alpha", "echo", r#"{"args": [1, 2]}"#);
    assert_eq!(shape.status, 422, "{}", shape.text());
    assert_eq!(shape.json()["error_type"], "InvalidBody");
    // A tool that rejects its arguments: 422.
    let args = server.run("alpha", "sleep", r#"{"args": {"ms": "soon"}}"#);
    assert_eq!(args.status, 422, "{}", args.text());

    // Unknown route and wrong method: JSON.
    let route = server.get("/v1/nothing/here");
    assert_eq!(route.status, 404);
    assert_eq!(route.json(), json!({"detail": "Not Found"}));
    let method = http(server.addr, "DELETE", "/v1/plugins", b"");
    assert_eq!(method.status, 405);
    assert_eq!(method.json(), json!({"detail": "Method Not Allowed"}));

    // OpenAPI and docs.
    assert_eq!(
        server.get("/openapi.json").json()["info"]["title"],
        "ForgeSyte plugin host"
    );
    assert!(server.get("/docs").text().contains("<h1>"));

    // The log carries the seed's markers and the one-line summary.
    let log = server.log();
    assert!(log.contains("✓ Loaded plugin: alpha (1.0.0)"), "{log}");
    assert!(
        log.contains(&format!("✗ Plugin FAILED: {}", zoo::ERR_INIT_NAME)),
        "{log}"
    );
    assert!(
        log.contains(&format!("⊘ Plugin UNAVAILABLE: {}", zoo::NEEDS_GPU_NAME)),
        "{log}"
    );
    assert!(
        log.contains("Plugins ready: 3 loaded, 3 failed, 2 unavailable"),
        "{log}"
    );
}

#[test]
fn timeouts_answer_504_and_fail_the_plugin() {
    let dir = PluginsDir::new();
    // Limits a loaded machine's 1 ms call never reaches.
    dir.good("slow", json!({"limits": {"call_timeout_s": 1.2}}))
        .good("sleepy", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--call-timeout", "1.5"]);
    server.wait_loaded();

    // Fast enough: fine.
    let quick = server.run("slow", "sleep", r#"{"args": {"ms": 1}}"#);
    assert_eq!(quick.status, 200, "{}", quick.text());
    assert_eq!(quick.json()["result"], json!({"slept_ms": 1}));

    // The manifest's 1.2 s limit.
    let started = Instant::now();
    let reply = server.run("slow", "sleep", r#"{"args": {"ms": 5000}}"#);
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        took < Duration::from_millis(4000),
        "answered after {took:?}"
    );
    let body = reply.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error_type"], "Timeout");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("time limit of 1.2 s"),
        "{body}"
    );
    let health = server.get("/v1/plugins/slow/health").json();
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(health["reason"].is_string());
    // The call given up on is counted at once (an error) and no longer in
    // flight, though its thread sleeps on; its return later records nothing.
    let counts = |h: &serde_json::Value| {
        (
            h["in_flight"].clone(),
            h["success_count"].clone(),
            h["error_count"].clone(),
        )
    };
    assert_eq!(counts(&health), (json!(0), json!(1), json!(1)), "{health}");
    assert_eq!(server.run("slow", "echo", "{}").status, 503);

    // The server's --call-timeout (1.5 s) when the manifest sets none.
    let reply = server.run("sleepy", "sleep", r#"{"args": {"ms": 5000}}"#);
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("time limit of 1.5 s")
    );

    // Health still answers while the abandoned calls sleep on.
    assert_eq!(server.get("/v1/health").status, 200);
    // Once the abandoned call's thread has returned: the same counts.
    std::thread::sleep(Duration::from_millis(5200).saturating_sub(started.elapsed()));
    let health = server.get("/v1/plugins/slow/health").json();
    assert_eq!(counts(&health), (json!(0), json!(1), json!(1)), "{health}");
}

/// A plugin directory whose manifest names its plugin otherwise: a 404
/// for the directory's name says which plugin it holds (an author calls
/// the directory's name, and got only "not found").
#[test]
fn a_404_for_a_directory_s_name_names_the_plugin_it_holds() {
    let dir = PluginsDir::new();
    dir.good("hello-dir", json!({"name": "hello_named"}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let said = "Plugin 'hello-dir' not found; the plugin directory of that name holds plugin 'hello_named' (the name it is registered under)";
    let health = server.get("/v1/plugins/hello-dir/health");
    assert_eq!(health.status, 404, "{}", health.text());
    assert_eq!(health.json()["detail"], said);
    let run = server.run("hello-dir", "echo", "{}");
    assert_eq!(run.status, 404, "{}", run.text());
    assert_eq!(run.json()["detail"], said, "{}", run.text());
    assert_eq!(server.run("hello_named", "echo", "{}").status, 200);
    // A name no directory has: as before.
    let other = server.get("/v1/plugins/nothing/health");
    assert_eq!(other.json()["detail"], "Plugin 'nothing' not found");
}

#[test]
fn oversized_body_is_413_with_a_small_body_limit() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--body-limit", "1024"]);
    server.wait_loaded();
    let big = format!(r#"{{"args": {{"blob": "{}"}}}}"#, "x".repeat(4000));
    let reply = server.run("alpha", "echo", &big);
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.json()["error_type"], "PayloadTooLarge");
    let small = format!(r#"{{"args": {{"blob": "{}"}}}}"#, "x".repeat(500));
    assert_eq!(server.run("alpha", "echo", &small).status, 200);
}

#[test]
fn a_thousand_hostile_paths_never_get_500_over_the_wire() {
    let dir = PluginsDir::new();
    dir.good("good", json!({})).zoo(zoo::ERR_INIT);
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let segments = hostile_segments(0xF0E5_5EED, 1000);
    for segment in &segments {
        let target = format!("/v1/plugins/{segment}/health");
        let reply = http(server.addr, "GET", &target, b"");
        assert_health_answer(&reply, &target);
    }
    // Raw `..` segments reach the router unnormalised.
    for target in [
        "/v1/plugins/../health",
        "/v1/plugins/./health",
        "/v1/plugins/%2e%2e/health",
    ] {
        let reply = http(server.addr, "GET", target, b"");
        assert_eq!(reply.status, 404, "{target}");
        assert!(reply.json()["detail"].is_string());
    }
    assert_eq!(server.get("/v1/plugins/good/health").status, 200);
}

#[test]
fn sigterm_shuts_down_gracefully_with_exit_0() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    assert_eq!(server.run("alpha", "echo", "{}").status, 200);
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    let log = server.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("Plugin instances dropped"), "{log}");
}

#[test]
fn sigterm_waits_for_an_in_flight_call() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let addr = server.addr;
    let call = std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/v1/plugins/alpha/tools/sleep/run",
            br#"{"args": {"ms": 700}}"#,
        )
    });
    // Wait until the call is in flight, then ask the server to stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.get("/v1/plugins/alpha/health").json()["in_flight"] != 1 {
        assert!(Instant::now() < deadline, "the call never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    let reply = call.join().unwrap();
    assert_eq!(
        reply.status,
        200,
        "the in-flight call finished: {}",
        reply.text()
    );
    assert_eq!(reply.json()["result"], json!({"slept_ms": 700}));
}

/// A plugins directory that cannot be listed (a mount gone wrong): the
/// server serves, but says it is `degraded` and not ready (it was ready,
/// serving nothing, and went into rotation so), naming why.
#[test]
fn a_missing_plugins_directory_still_serves_and_is_not_ready() {
    // (Health while plugins are still loading: `startup` tests, in-process.)
    let server = Forgesyte::start(&["--plugins", "/nonexistent/forgesyte-plugins"]);
    let health = server.wait_loaded();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["plugins_total"], 0);
    assert_eq!(server.get("/v1/plugins").json(), json!([]));
    let ready = server.get("/readyz?verbose");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(
        ready
            .text()
            .contains("could not list the plugins directory"),
        "{}",
        ready.text()
    );
    assert_eq!(server.get("/livez").status, 200);
}

#[test]
fn environment_variables_configure_serve() {
    let dir = PluginsDir::new();
    dir.good("envplugin", json!({}));
    let logdir = tempfile::tempdir().unwrap();
    let mut child = forgesyte_command()
        .arg("serve")
        .env("FORGESYTE_PLUGINS_DIR", dir.path())
        .env("FORGESYTE_BIND", "127.0.0.1:0")
        .env("FORGESYTE_BODY_LIMIT", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(logdir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut child);
    let addr = crate::support::listening_addr(guard.0.stdout.take().unwrap())
        .unwrap_or_else(|line| panic!("{line:?}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(addr, "GET", "/v1/health", b"").json()["status"] == "loading" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = http(addr, "GET", "/v1/plugins", b"").json();
    assert_eq!(list[0]["name"], "envplugin");
    let big = format!(r#"{{"args": {{"blob": "{}"}}}}"#, "x".repeat(200));
    let reply = http(
        addr,
        "POST",
        "/v1/plugins/envplugin/tools/echo/run",
        big.as_bytes(),
    );
    assert_eq!(reply.status, 413);
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ------------------------------------------------------ admin and probes

#[test]
fn serve_with_an_admin_token_reloads_and_probes_over_http() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({})).zoo(zoo::ERR_INIT).good(
        "extra",
        json!({"optional": true, "dependencies": ["env:FORGESYTE_TEST_NEVER_SET"]}),
    );
    let token = "a-long-admin-token-for-the-test";
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    assert!(
        server.log().contains("Admin routes enabled"),
        "{}",
        server.log()
    );
    assert_eq!(server.get("/livez").json(), json!({"status": "ok"}));
    // The zoo's constructor failure is required: not ready; the optional
    // plugin missing its variable does not count.
    let ready = server.get("/readyz?verbose");
    assert_eq!(ready.status, 503, "{}", ready.text());
    let ready = ready.json();
    assert_eq!(
        ready["detail"],
        format!("Not ready: plugin:{}", zoo::ERR_INIT_NAME)
    );
    // Not ready is an answer, not a failure of the server: no ERROR line
    // for it (tower-http logs every 5xx as "response failed" at ERROR by
    // default). The health answer after it is logged after it too.
    assert_eq!(server.get("/livez").status, 200);
    let log = server.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains("response failed")),
        "{log}"
    );
    assert_eq!(
        server.get("/v1/plugins/extra/health").json()["state"],
        "UNAVAILABLE"
    );

    let post = |target: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http_with(server.addr, "POST", target, &headers, b"")
    };
    assert_eq!(post("/v1/plugins/alpha/reload", None).status, 401);
    assert_eq!(
        post("/v1/plugins/alpha/reload", Some("Bearer wrong")).status,
        403
    );
    let bearer = format!("Bearer {token}");
    let reply = post("/v1/plugins/alpha/reload", Some(&bearer));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["state"], "INITIALIZED");
    let reply = post("/v1/plugins/reload", Some(&bearer));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert_eq!(report["plugins"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(report["failed"], 1);
    // Still callable after the reloads.
    assert_eq!(
        server.run("alpha", "echo", r#"{"args": {"k": 1}}"#).status,
        200
    );
    let health = server
        .get(&format!("/v1/plugins/{}/health", zoo::ERR_INIT_NAME))
        .json();
    assert!(
        !health["journal"].as_array().unwrap().is_empty(),
        "{health}"
    );
}

#[test]
fn serve_without_a_token_has_reload_disabled() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/plugins/reload",
        &[("Authorization", "Bearer anything")],
        b"",
    );
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(
        reply.detail().starts_with("Reload is disabled"),
        "{}",
        reply.text()
    );
    assert_eq!(server.get("/readyz").status, 200);
}

#[test]
fn an_empty_admin_token_file_stops_the_server_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "\n").unwrap();
    let mut child = forgesyte_command()
        .args(["serve", "--bind", "127.0.0.1:0", "--plugins"])
        .arg(dir.path())
        .arg("--admin-token-file")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started with an empty admin token");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("is empty"), "{err}");
}

// ------------------------------------------- preflight and isolation flags

/// A plugins directory with `crashy`: the `faulty` fixture library whose
/// constructor writes to page zero, its manifest naming no isolation and no
/// preflight; and the good `alpha`.
fn crashy_dir() -> PluginsDir {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let crashy = dir.path().join("crashy");
    std::fs::create_dir_all(&crashy).unwrap();
    let library = std::path::Path::new(zoo::FAULTY_LIBRARY);
    let file = library.file_name().unwrap().to_str().unwrap();
    std::fs::copy(library, crashy.join(file)).unwrap();
    let manifest = json!({"name": "crashy", "entrypoint": file,
                          "config": {"fault_at_init": "segv"}});
    std::fs::write(crashy.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

/// `forgesyte check --json ARGS…` with extra environment, without core
/// dumps: exit code (None when killed by a signal), the parsed array (if
/// any) and stderr.
fn check_json(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Option<Value>, String) {
    let output = std::process::Command::new("sh")
        .args(["-c", "ulimit -c 0; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_forgesyte"))
        .args(["check", "--json"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    (
        output.status.code(),
        serde_json::from_str(&stdout).ok(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_crashy_failed_with_sigsegv(list: &Value) {
    let states = states(list);
    assert_eq!(states["alpha"], "INITIALIZED");
    assert_eq!(states["crashy"], "FAILED");
    let crashy = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "crashy")
        .unwrap();
    let reason = crashy["reason"].as_str().unwrap();
    assert!(reason.starts_with("InitError: "), "{reason}");
    assert!(reason.contains("SIGSEGV"), "{reason}");
    assert!(
        reason.contains("faulty: constructor about to segv"),
        "the plugin's stderr is in the reason: {reason}"
    );
}

/// `check` preflights in-process plugins unless told otherwise: a
/// constructor that crashes is FAILED in its report; the check died with
/// it, with no report at all. `--preflight=off` (or the variable) loads
/// them into the check's own process, as `serve` does by default.
#[test]
fn preflight_flag_and_env_turn_a_crashing_constructor_into_failed() {
    let dir = crashy_dir();
    // The control: in-process and without preflight, the constructor takes
    // the whole process down.
    let (code, _, err) = check_json(&[dir.path_str(), "--preflight=off"], &[]);
    assert_eq!(code, None, "killed by a signal: {err}");
    let (code, _, err) = check_json(&[dir.path_str()], &[("FORGESYTE_PREFLIGHT", "0")]);
    assert_eq!(code, None, "killed by a signal: {err}");

    let (code, list, err) = check_json(&[dir.path_str()], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert_crashy_failed_with_sigsegv(&list.unwrap());
    // A config file's `preflight = false`, as `config --print` writes the
    // default, is serve's: the check still preflights.
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("forgesyte.toml");
    std::fs::write(&file, "preflight = false\n").unwrap();
    let (code, list, err) = check_json(&[dir.path_str(), "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert_crashy_failed_with_sigsegv(&list.unwrap());
    let (code, list, err) = check_json(&[dir.path_str(), "--preflight"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert_crashy_failed_with_sigsegv(&list.unwrap());
    let (code, list, err) = check_json(&[dir.path_str()], &[("FORGESYTE_PREFLIGHT", "1")]);
    assert_eq!(code, Some(1), "{err}");
    assert_crashy_failed_with_sigsegv(&list.unwrap());
    let (code, _, err) = check_json(&[dir.path_str()], &[("FORGESYTE_PREFLIGHT", "perhaps")]);
    assert_eq!(code, Some(2), "a usage error: {err}");
}

#[test]
fn isolation_flag_hosts_plugins_without_a_manifest_choice_in_a_child() {
    let dir = crashy_dir();
    let (code, list, err) = check_json(&[dir.path_str(), "--isolation", "process"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert_crashy_failed_with_sigsegv(&list.unwrap());
    let (code, list, err) = check_json(&[dir.path_str()], &[("FORGESYTE_ISOLATION", "process")]);
    assert_eq!(code, Some(1), "{err}");
    assert_crashy_failed_with_sigsegv(&list.unwrap());

    // The server too: it survives, and the good plugin (isolated as well)
    // answers tool calls from its own process.
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--isolation", "process"]);
    server.wait_loaded();
    let crashy = server.get("/v1/plugins/crashy/health").json();
    assert_eq!(crashy["state"], "FAILED", "{crashy}");
    let run = server.run("alpha", "echo", r#"{"args": {"k": 1}}"#);
    assert_eq!(run.status, 200, "{}", run.text());
    assert_eq!(server.get("/livez").status, 200);
}

/// The runner's limits in the manifest of a plugin that runs in the
/// server's process bind nothing there: the log says so (they were ignored
/// in silence), and says nothing of an isolated plugin's, which they bind.
#[test]
fn runner_limits_of_an_in_process_plugin_are_said_to_bind_nothing() {
    let dir = PluginsDir::new();
    let limits = json!({"limits": {"memory_mb": 64, "max_response_mb": 1}});
    dir.good("inside", limits.clone());
    let mut isolated = limits;
    isolated["isolation"] = json!("process");
    dir.good("outside", isolated);
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    assert_eq!(server.run("inside", "echo", "{}").status, 200);
    let log = server.log();
    let said = |plugin: &str, field: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains(&format!("Plugin {plugin}:"))
                && l.contains(&format!("\"limits.{field}\" is not used"))
        })
    };
    assert!(said("inside", "memory_mb"), "{log}");
    assert!(said("inside", "max_response_mb"), "{log}");
    assert!(!said("outside", "memory_mb"), "{log}");
}

/// An isolated native plugin's destructor (its `Drop`) runs when its
/// runner is stopped, as a Python plugin's `on_unload` does: by a reload,
/// and at the server's stop. (The runner exited without it.)
#[test]
fn an_isolated_native_plugin_s_destructor_runs_at_its_stop() {
    let dir = PluginsDir::new();
    dir.good(
        "alpha",
        json!({"isolation": "process", "config": {"say_on_drop": true}}),
    );
    let token = "a-test-admin-token-of-some-length";
    let mut server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    assert_eq!(server.run("alpha", "echo", "{}").status, 200);
    let dropped = |log: &str| log.lines().filter(|l| l.contains("good: dropped")).count();
    let reload = crate::support::admin_post(server.addr, "/v1/plugins/alpha/reload", token);
    assert_eq!(reload.status, 200, "{}", reload.text());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dropped(&server.log()) < 1 {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.run("alpha", "echo", "{}").status, 200);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(dropped(&server.log()), 2, "{}", server.log());
}

#[test]
fn the_hidden_runner_subcommand_is_the_plugin_runner() {
    let output = forgesyte_command().arg("__runner").output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--library is required"),
        "the runner's own usage: {err}"
    );
    let help = forgesyte_command().arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("__runner"));
}

// ------------------------------------------------------------------ check

fn check(args: &[&str]) -> (i32, String, String) {
    let all: Vec<&str> = std::iter::once("check")
        .chain(args.iter().copied())
        .collect();
    run_forgesyte(&all, &[])
}

#[test]
fn check_exits_0_when_every_plugin_is_available() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}))
        .good("beta", json!({"version": "2.1.0"}));
    let (code, out, err) = check(&[dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "alpha  INITIALIZED  1.0.0");
    assert_eq!(lines[1], "beta   INITIALIZED  2.1.0");
    assert!(
        lines[2].starts_with("2 plugins: 2 loaded, 0 failed, 0 unavailable"),
        "{out}"
    );
}

/// A report that cannot be written (a full disk) is exit code 2, said on
/// stderr: `check --json > report.json` passed with an empty file. (A
/// closed stdout is `/dev/null` by the time `main` runs: the Rust runtime
/// opens it there, and a report to `/dev/null` is written.)
#[test]
fn check_exits_2_when_its_report_cannot_be_written() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    for (json, redirect) in [("", ">/dev/full"), ("--json", ">/dev/full")] {
        let output = std::process::Command::new("sh")
            .args(["-c", &format!("exec \"$0\" check {json} \"$1\" {redirect}")])
            .arg(env!("CARGO_BIN_EXE_forgesyte"))
            .arg(dir.path_str())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{json} {redirect}: {err}");
        assert!(err.contains("cannot write the report"), "{err}");
    }
}

#[test]
fn check_exits_1_when_a_plugin_is_not_available() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}))
        .zoo(zoo::ERR_INIT)
        .zoo(zoo::NEEDS_GPU);
    let (code, out, err) = check(&[dir.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    let err_init = out
        .lines()
        .find(|l| l.starts_with(zoo::ERR_INIT_NAME))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        err_init.contains("FAILED") && err_init.contains("InitError:"),
        "{err_init}"
    );
    let gpu = out
        .lines()
        .find(|l| l.starts_with(zoo::NEEDS_GPU_NAME))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(gpu.contains("UNAVAILABLE") && gpu.contains("GPU"), "{gpu}");
    assert!(
        out.contains("3 plugins: 1 loaded, 1 failed, 1 unavailable"),
        "{out}"
    );
}

/// The GPU probe's child mode prints a report as JSON and nothing else
/// (no GPU here: a report that says why). On a machine that has one,
/// `FORGESYTE_EXPECT_GPU=1` makes the test require that the real probe
/// found it (without it, a probe that finds nothing passes anywhere).
#[test]
fn the_gpu_probe_child_prints_its_report_as_json() {
    let output = forgesyte_command().arg("__probe-gpu").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    assert!(report["available"].is_boolean(), "{report}");
    assert_eq!(
        report["available"],
        !report["devices"].as_array().is_none_or(Vec::is_empty),
        "{report}"
    );
    if std::env::var("FORGESYTE_EXPECT_GPU").is_ok_and(|v| !v.is_empty() && v != "0") {
        assert_eq!(
            report["available"], true,
            "FORGESYTE_EXPECT_GPU is set: {report}"
        );
        let device = &report["devices"][0];
        assert!(
            device["name"].as_str().is_some_and(|n| !n.is_empty())
                && device["total_memory_mb"].as_u64().is_some_and(|m| m > 0),
            "{report}"
        );
    }
}

/// The library probe's child mode answers the first of its arguments the
/// dynamic loader opens, as JSON, or `null`.
#[test]
fn the_library_probe_child_answers_the_first_library_that_opens() {
    let probe = |names: &[&str]| {
        let output = forgesyte_command()
            .arg("__probe-lib")
            .args(names)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    assert_eq!(
        probe(&["libdefinitely_missing_xyz.so", "libc.so.6"]),
        "libc.so.6"
    );
    assert_eq!(
        probe(&["libdefinitely_missing_xyz.so"]),
        serde_json::Value::Null
    );
    // A library that prints as it is opened (and whose destructor would
    // print at exit): the answer stays the answer alone.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("noisy.c"),
        "#include <stdio.h>\n\
         __attribute__((constructor)) static void hi(void) { printf(\"banner\\n\"); }\n\
         __attribute__((destructor)) static void bye(void) { printf(\"bye\\n\"); }\n",
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .current_dir(dir.path())
        .args(["-shared", "-fPIC", "-o", "libnoisy.so", "noisy.c"])
        .status()
        .expect("cc, to build a library");
    assert!(built.success());
    let noisy = dir.path().join("libnoisy.so");
    let noisy = noisy.to_str().unwrap();
    assert_eq!(probe(&[noisy]), noisy);
}

#[test]
fn check_usage_errors_exit_2() {
    let (code, _, err) = check(&["--no-such-flag"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = check(&["/nonexistent/forgesyte-plugins"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // The directory given as another command takes it: said plainly.
    let (code, _, err) = check(&["--plugins", "/tmp"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`check` takes the plugins directory without --plugins: forgesyte check DIR"),
        "{err}"
    );
    let refused_saying = |args: &[&str], said: &str| {
        let output = forgesyte_command().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(said), "{args:?}: {err}");
    };
    refused_saying(
        &["serve", "/nonexistent/p"],
        "forgesyte serve --plugins /nonexistent/p",
    );
    // An on/off switch's value after a space: the switch is named.
    refused_saying(
        &["serve", "--plugins", "/nonexistent/p", "--watch", "off"],
        "--watch takes its value after '=', not a space: --watch=off",
    );
    // A word after it that is no on/off value: the directory hint.
    refused_saying(
        &["serve", "--watch", "/nonexistent/p"],
        "forgesyte serve --plugins /nonexistent/p",
    );
    let output = forgesyte_command().output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "no subcommand is a usage error"
    );
}

#[test]
fn check_json_is_the_array_the_api_lists() {
    let dir = mixed_dir();
    let (code, out, err) = check(&["--json", dir.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    let from_check: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(states(&from_check), expected_states());

    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let from_api = server.get("/v1/plugins").json();
    assert_eq!(states(&from_check), states(&from_api));
    let reasons = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["reason"].clone())
            .collect()
    };
    assert_eq!(reasons(&from_check), reasons(&from_api));
    let keys = |v: &Value| -> Vec<Vec<String>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_object().unwrap().keys().cloned().collect())
            .collect()
    };
    assert_eq!(keys(&from_check), keys(&from_api));
}

// ------------------------------------------------- isolated faults over HTTP

/// Polls `name`'s health until `done` holds (at most `secs`), returning it.
pub(crate) fn wait_health(
    server: &Forgesyte,
    name: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let reply = server.get(&format!("/v1/plugins/{name}/health"));
        assert_eq!(reply.status, 200, "{}", reply.text());
        let health = reply.json();
        if done(&health) {
            return health;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {health}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn isolated_plugin_crash_is_502_then_503_then_restarted_while_others_serve() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    std::os::unix::fs::symlink(zoo::FAULTY, dir.path().join("faulty")).unwrap();
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    assert_eq!(server.run("faulty", "ok", "{}").status, 200);

    // A segfault in a tool: the server survives and says which signal.
    let crash = server.run("faulty", "segv", "{}");
    assert_eq!(crash.status, 502, "{}", crash.text());
    let body = crash.json();
    assert_eq!(body["error_type"], "CrashError", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("SIGSEGV"),
        "{body}"
    );

    // Until it is restarted it is not callable, and health says why.
    let health = server.get("/v1/plugins/faulty/health").json();
    if health["state"] == "FAILED" {
        assert!(
            health["reason"].as_str().unwrap().contains("SIGSEGV"),
            "{health}"
        );
        let refused = server.run("faulty", "ok", "{}");
        assert_eq!(refused.status, 503, "{}", refused.text());
        // Its restart is scheduled (1 s backoff): the 503 says when to
        // try again, where it looked like a plugin FAILED for good. (It
        // may have restarted in between: then no longer FAILED.)
        if refused.json()["state"] == "FAILED" {
            assert_eq!(
                refused.header("retry-after"),
                Some("1"),
                "{}",
                refused.text()
            );
        }
        // So does a stream's upgrade (checked before the request is read
        // as one).
        let refused = server.get("/v1/plugins/faulty/tools/echo_bytes/stream");
        if refused.status == 503 && refused.json()["state"] == "FAILED" {
            assert_eq!(
                refused.header("retry-after"),
                Some("1"),
                "{}",
                refused.text()
            );
        } else {
            // Restarted in between (a request that is no upgrade refused),
            // or restarting (503, another state).
            assert!(
                matches!(refused.status, 400 | 426 | 503),
                "{} {}",
                refused.status,
                refused.text()
            );
        }
    } else {
        // Only a restart (after its 1 s backoff, on a slow machine) may
        // have ended FAILED already: never a crash left unrecorded.
        assert!(
            health["restart_count"].as_u64().is_some_and(|n| n >= 1),
            "{health}"
        );
    }
    // Another plugin is untouched and keeps serving.
    assert_eq!(server.run("alpha", "echo", r#"{"args": {}}"#).status, 200);
    let alpha = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(
        (
            alpha["success_count"].as_u64(),
            alpha["error_count"].as_u64()
        ),
        (Some(1), Some(0))
    );

    // The supervisor restarts it (first backoff: 1 s).
    let health = wait_health(&server, "faulty", 15, |h| h["state"] == "INITIALIZED");
    assert_eq!(health["restart_count"], 1, "{health}");
    assert!(
        health["last_exit_reason"]
            .as_str()
            .unwrap()
            .contains("SIGSEGV"),
        "{health}"
    );
    let journal = health["journal"].as_array().unwrap();
    assert!(
        journal.iter().any(|e| e["exit_signal"] == "SIGSEGV"),
        "{health}"
    );
    assert_eq!(server.run("faulty", "ok", "{}").status, 200);

    // A hang is cut off by the manifest's 2 s call limit: 504, child killed.
    let started = Instant::now();
    let hung = server.run("faulty", "hang", "{}");
    assert_eq!(hung.status, 504, "{}", hung.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(server.get("/livez").status, 200);
}

#[test]
fn chaos_sigkilled_runners_under_traffic_never_hang_or_500_and_counts_reconcile() {
    let dir = PluginsDir::new();
    for name in ["iso-a", "iso-b", "iso-c"] {
        dir.good(
            name,
            json!({"isolation": "process", "limits": {"call_timeout_s": 5}}),
        );
    }
    chaos(&dir, ["iso-a", "iso-b", "iso-c"]);
}

#[test]
fn chaos_sigkilled_python_runners_under_traffic_never_hang_or_500_and_counts_reconcile() {
    let dir = PluginsDir::new();
    for name in ["py-a", "py-b", "py-c"] {
        dir.python(name, "echo");
    }
    chaos(&dir, ["py-a", "py-b", "py-c"]);
}

/// SIGKILLs runners of `plugins` (served from `dir`; each has an `echo`
/// tool) under traffic: no call hangs, health never answers anything but
/// 200, every plugin comes back, and its counts are what clients saw.
fn chaos(dir: &PluginsDir, plugins: [&'static str; 3]) {
    const PLUGINS_LEN: usize = 3;
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let kills = std::sync::atomic::AtomicUsize::new(0);
    // Per plugin: (200s, 502s, 503s) as the clients saw them.
    let seen: BTreeMap<&str, (u64, u64, u64)> = std::thread::scope(|s| {
        let callers: Vec<_> = plugins
            .iter()
            .map(|&name| {
                let (server, stop) = (&server, &stop);
                s.spawn(move || {
                    let mut counts = (0, 0, 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        let reply = server.run(name, "echo", r#"{"args": {"n": 1}}"#);
                        assert!(
                            started.elapsed() < Duration::from_secs(10),
                            "a call hung past its timeout"
                        );
                        match reply.status {
                            200 => counts.0 += 1,
                            502 => counts.1 += 1,
                            503 => counts.2 += 1,
                            other => panic!("{name}: unexpected {other}: {}", reply.text()),
                        }
                    }
                    (name, counts)
                })
            })
            .collect();
        let readers: Vec<_> = (0..4)
            .map(|i| {
                let (server, stop) = (&server, &stop);
                s.spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let target = match i % 2 {
                            0 => "/v1/plugins".to_owned(),
                            _ => format!(
                                "/v1/plugins/{}/health",
                                plugins[reads as usize % PLUGINS_LEN]
                            ),
                        };
                        let reply = server.get(&target);
                        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        // The killer: four SIGKILLs, spread over the plugins.
        for round in 0..4 {
            std::thread::sleep(Duration::from_millis(400));
            let name = plugins[round % PLUGINS_LEN];
            if let Some(pid) = runner_pid(server.pid(), name) {
                let status = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap();
                if status.success() {
                    kills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
        callers.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(
        kills.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "runners not found"
    );

    // Every plugin comes back (supervised restarts) and its counts are
    // exactly what the clients saw: 200s succeeded, 502s (the calls in
    // flight when their process died) are errors, 503s were never run.
    for name in plugins {
        let health = wait_health(&server, name, 20, |h| h["state"] == "INITIALIZED");
        let (ok, crashed, _refused) = seen[name];
        assert_eq!(
            health["success_count"].as_u64(),
            Some(ok),
            "{name}: {health}"
        );
        assert_eq!(
            health["error_count"].as_u64(),
            Some(crashed),
            "{name}: {health}"
        );
        assert_eq!(health["in_flight"], 0, "{name}: {health}");
    }
    let restarts: u64 = plugins
        .iter()
        .map(|name| {
            server.get(&format!("/v1/plugins/{name}/health")).json()["restart_count"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        restarts,
        kills.load(std::sync::atomic::Ordering::Relaxed) as u64
    );
}

/// The host's own bound on a result's values (one per 32 bytes of
/// `--max-response`, at least 64 Ki): a native plugin, which counts
/// nothing itself, echoing 100,000 zeros is the tool's 422
/// `ResultTooLarge`, refused before the host parses the result; 60,000
/// are answered, and the plugin stays INITIALIZED.
#[test]
fn a_native_result_of_too_many_values_is_refused_by_the_host() {
    let dir = PluginsDir::new();
    dir.good("alpha", json!({}));
    let limit = (1usize << 20).to_string();
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--max-response", &limit]);
    server.wait_loaded();
    let zeros = |n: usize| format!(r#"{{"args": {{"z": [{}0]}}}}"#, "0,".repeat(n - 1));
    let reply = server.run("alpha", "echo", &zeros(100_000));
    assert_eq!(reply.status, 422, "{:.300}", reply.text());
    let failure = reply.json();
    assert_eq!(failure["error_type"], "ResultTooLarge", "{failure}");
    assert!(
        failure["detail"]
            .as_str()
            .is_some_and(|d| d.contains("more than the 65536 an answer may hold")),
        "{failure}"
    );
    let reply = server.run("alpha", "echo", &zeros(60_000));
    assert_eq!(reply.status, 200, "{:.300}", reply.text());
    let health = server.get("/v1/plugins/alpha/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
}

/// An isolated native plugin's result just under `--max-response`: the
/// runner counts the answer as the host does, so each size is answered in
/// full or refused as too large (422 `ResultTooLarge`, the plugin still
/// INITIALIZED, no restart), never a protocol fault that kills the runner
/// (six of which left the plugin FAILED for good).
#[test]
fn an_isolated_result_at_the_response_limit_is_whole_or_too_large_never_a_fault() {
    const LIMIT: usize = 1 << 20;
    let dir = PluginsDir::new();
    dir.good("alpha", json!({"isolation": "process"}));
    let limit = LIMIT.to_string();
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--max-response", &limit]);
    server.wait_loaded();
    let replies = (LIMIT - 120..=LIMIT - 20).step_by(4).map(|size| {
        let body = format!(r#"{{"args": {{"s": "{}"}}}}"#, "x".repeat(size));
        (size, server.run("alpha", "echo", &body))
    });
    crate::support::assert_whole_or_too_large(&server, "alpha", replies);
}
