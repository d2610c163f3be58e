//! The benchmark's smoke path, end to end: `forgesyte-bench --smoke` with a
//! few plugins and about a second of load. It checks that every figure is
//! measured and every request answered; it never asserts on speed. The
//! Python figures need `python3` (as the loader's Python tests do) and
//! never the package index: smoke mode does not install the reference
//! server, so its HTTP figure says "not measured" and the host's side runs
//! as a correctness check.

use std::process::Command;

/// Every figure the report must carry, in table order.
const FIGURES: &[&str] = &[
    "load",
    "load_abi",
    "startup",
    "list_rps",
    "list_p99",
    "health_rps",
    "health_p99",
    "tool_rps",
    "metrics_rps",
    "call_overhead",
    "memory",
    "memory_abi",
    "mixed",
    "python_startup",
    "python_http_rps",
    "python_http_p99",
    "python_roundtrip",
];

/// The figures smoke mode measures without their baseline.
const WITHOUT_REFERENCE: &[&str] = &["python_http_rps", "python_http_p99"];

/// The frames and stream figures after [`FIGURES`]: in smoke mode 64 KB
/// only; image-stats is not measured (no release example library), and the
/// stream figures are "not available" on a server without the stream route.
fn frame_figures() -> Vec<String> {
    let mut ids = Vec::new();
    for runtime in ["inproc", "isolated", "python", "pythonview", "imagestats"] {
        for encoding in ["json", "multipart", "octet"] {
            ids.push(format!("frames_{runtime}_{encoding}_64k"));
        }
    }
    for runtime in ["inproc", "isolated", "python", "pythonview", "imagestats"] {
        ids.push(format!("stream_{runtime}"));
    }
    ids
}

#[test]
fn the_smoke_run_measures_every_figure_and_loses_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.json");
    let output = Command::new(env!("CARGO_BIN_EXE_forgesyte-bench"))
        .arg("--smoke")
        .arg("--work-dir")
        .arg(tmp.path().join("work"))
        .arg("--out")
        .arg(&results)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "forgesyte-bench --smoke failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    assert_eq!(report["mode"], "smoke");
    let figures = report["figures"].as_array().unwrap();
    let ids: Vec<&str> = figures.iter().map(|f| f["id"].as_str().unwrap()).collect();
    let frames = frame_figures();
    let expected: Vec<&str> = FIGURES
        .iter()
        .copied()
        .chain(frames.iter().map(String::as_str))
        .collect();
    assert_eq!(ids, expected, "{report:#}");
    for figure in figures {
        let id = figure["id"].as_str().unwrap();
        let reason = figure["not_measured"].as_str().unwrap_or_default();
        if id.starts_with("frames_imagestats") || id == "stream_imagestats" {
            assert_eq!(reason, "smoke mode", "{figure}");
            continue;
        }
        let measured = figure["measured"].as_f64();
        assert!(
            measured.is_some_and(|m| m.is_finite() && m > 0.0),
            "figure {} has no measurement: {figure}",
            figure["id"]
        );
        if let Some(baseline) = figure["baseline"].as_f64() {
            assert!(baseline.is_finite() && baseline > 0.0, "{figure}");
        }
        if WITHOUT_REFERENCE.contains(&id) {
            assert!(reason.contains("smoke mode"), "{figure}");
            assert_eq!(figure["pass"], false, "{figure}");
            assert!(figure["baseline"].is_null(), "{figure}");
        } else {
            assert!(figure["not_measured"].is_null(), "{figure}");
        }
    }
    let figure = |id: &str| figures.iter().find(|f| f["id"] == id).unwrap();

    // No request failed, every plugin loaded, counts reconciled.
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.len() >= 13, "{checks:#?}");
    for check in checks {
        assert_eq!(check["ok"], true, "check failed: {check}");
    }
    // The Python plugin answered over HTTP and through the loader.
    let named = |prefix: &str| {
        checks
            .iter()
            .filter(|c| c["name"].as_str().unwrap().starts_with(prefix))
            .count()
    };
    assert_eq!(named("python http: forgesyte"), 1, "{checks:#?}");
    assert_eq!(named("python http: reference"), 0, "{checks:#?}");
    assert_eq!(named("python startup"), 1, "{checks:#?}");
    assert_eq!(named("python round trip"), 1, "{checks:#?}");
    assert_eq!(named("frames: every request answered"), 1, "{checks:#?}");
    assert_eq!(named("load: the raw-ABI baseline"), 1, "{checks:#?}");
    let python_http = &figure("python_http_rps")["runs"]["forgesyte"][0]["labels"]["python"];
    assert!(python_http["sent"].as_u64().unwrap() > 0, "{python_http}");
    assert_eq!(
        python_http["sent"], python_http["answered"],
        "{python_http}"
    );
    // The start-up figure's context: the interpreter's own start, timed
    // once per repeat.
    let startup = &figure("python_startup")["runs"];
    let alone = startup["interpreter_start_ms"].as_array().unwrap();
    assert_eq!(
        alone.len(),
        startup["server_ms"].as_array().unwrap().len(),
        "{startup}"
    );
    assert!(
        alone.iter().all(|v| v.as_f64().is_some_and(|ms| ms > 0.0)),
        "{startup}"
    );
    let mixed = figure("mixed");
    assert_eq!(mixed["pass"], true, "{mixed}");
    for label in ["read", "noop", "fail", "panic"] {
        let counts = &mixed["runs"]["result"]["labels"][label];
        assert!(counts["sent"].as_u64().unwrap() > 0, "{label}: {counts}");
        assert_eq!(counts["sent"], counts["answered"], "{label}: {counts}");
    }

    // The table a person reads names every figure.
    for title in [
        "load",
        "GET /v1/plugins",
        "PluginHandle::call",
        "mixed run",
        "Python plugins INITIALIZED",
        "POST Python no-op tool call",
        "not measured",
        "frame 64 KB octet-stream → no-op, isolated native",
        "stream of",
    ] {
        assert!(stdout.contains(title), "{title} missing from:\n{stdout}");
    }
}
