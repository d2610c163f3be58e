//! The benchmark's smoke path, end to end: `forgesyte-bench --smoke` with a
//! few plugins and about a second of load. It checks that every figure is
//! measured and every request answered; it never asserts on speed.

use std::process::Command;

/// Every figure the report must carry, in table order.
const FIGURES: &[&str] = &[
    "load",
    "startup",
    "list_rps",
    "list_p99",
    "health_rps",
    "health_p99",
    "tool_rps",
    "call_overhead",
    "memory",
    "mixed",
];

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
    assert_eq!(ids, FIGURES, "{report:#}");
    for figure in figures {
        let measured = figure["measured"].as_f64();
        assert!(
            measured.is_some_and(|m| m.is_finite() && m > 0.0),
            "figure {} has no measurement: {figure}",
            figure["id"]
        );
        if let Some(baseline) = figure["baseline"].as_f64() {
            assert!(baseline.is_finite() && baseline > 0.0, "{figure}");
        }
    }

    // No request failed, every plugin loaded, counts reconciled.
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.len() >= 9, "{checks:#?}");
    for check in checks {
        assert_eq!(check["ok"], true, "check failed: {check}");
    }
    let mixed = &figures[FIGURES.len() - 1];
    assert_eq!(mixed["pass"], true, "{mixed}");
    for label in ["read", "noop", "fail", "panic"] {
        let counts = &mixed["runs"]["result"]["labels"][label];
        assert!(counts["sent"].as_u64().unwrap() > 0, "{label}: {counts}");
        assert_eq!(counts["sent"], counts["answered"], "{label}: {counts}");
    }

    // The table a person reads names every figure.
    for title in ["load", "GET /v1/plugins", "PluginHandle::call", "mixed run"] {
        assert!(stdout.contains(title), "{title} missing from:\n{stdout}");
    }
}
