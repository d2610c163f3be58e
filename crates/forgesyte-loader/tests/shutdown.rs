//! `Loader::shutdown` with real runner processes: once the host is shutting
//! down, a plugin whose process ends is recorded and never restarted, and a
//! restart that waits is dropped. (The timing of supervision is tested on a
//! fake clock in the crate's `supervise` tests; nothing here waits.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use forgesyte_deps::DependencyChecker;
use forgesyte_errors::ToolError;
use forgesyte_loader::{CallError, Loader, LoaderConfig, ProcessLimits, SupervisionPolicy};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use forgesyte_tests::zoo;
use serde_json::json;

const RUNNER: &str = env!("CARGO_BIN_EXE_forgesyte-runner");

/// Two isolated `faulty` plugins, `early` and `late`, loaded with a backoff
/// long enough that no restart can happen while the test runs.
fn load(dir: &Path, registry: &Registry) -> Loader {
    for name in ["early", "late"] {
        let manifest = json!({
            "name": name,
            "version": "1.0.0",
            "entrypoint": "libfixture_faulty.so",
            "isolation": "process",
        });
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("manifest.json"), manifest.to_string()).unwrap();
    }
    let lib_dir = Path::new(zoo::FAULTY_LIBRARY)
        .parent()
        .unwrap()
        .to_path_buf();
    let config = LoaderConfig {
        lib_paths: vec![lib_dir],
        runner: Some(RUNNER.into()),
        process: ProcessLimits {
            init_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(2),
            memory_limit_mib: 256,
            max_response_bytes: 1024 * 1024,
        },
        supervision: SupervisionPolicy {
            backoff_base: Duration::from_secs(3600),
            backoff_cap: Duration::from_secs(3600),
            ..SupervisionPolicy::default()
        },
        ..LoaderConfig::default()
    };
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(registry.clone(), checker, config);
    let report = loader.load_all(dir);
    assert_eq!(report.loaded(), 2, "{report:?}");
    loader
}

fn segv(loader: &Loader, name: &str) {
    let result = loader.handle(name).unwrap().call("segv", &json!({}));
    assert!(
        matches!(result, Err(CallError::Tool(ToolError::Crashed(_)))),
        "{result:?}"
    );
}

#[test]
fn after_shutdown_a_crash_is_recorded_and_never_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new();
    let loader = load(dir.path(), &registry);

    // Before shutdown: a crash schedules a restart (an hour away).
    segv(&loader, "early");
    let status = registry.get_status("early").unwrap();
    assert_eq!(status.state, S::Failed);
    assert!(status.next_retry_at.is_some(), "{status:?}");

    assert!(!loader.is_shutting_down());
    loader.shutdown();
    assert!(loader.is_shutting_down());

    // The restart that waited is dropped.
    let status = registry.get_status("early").unwrap();
    assert_eq!((status.state, status.next_retry_at), (S::Failed, None));

    // A crash after shutdown is recorded, with its signal, and not restarted
    // (the exit is processed before the call returns).
    segv(&loader, "late");
    let status = registry.get_status("late").unwrap();
    assert_eq!((status.state, status.next_retry_at), (S::Failed, None));
    let reason = status.reason.unwrap_or_default();
    assert!(reason.contains("SIGSEGV"), "{reason}");
    assert!(
        reason.ends_with("; not restarted: the host is shutting down"),
        "{reason}"
    );
    assert_eq!(status.restart_count, 0);

    assert!(loader.drop_instances(Duration::from_secs(5)));
}

/// A shutdown kills the runners still constructing their plugin (here a
/// constructor that hangs, with a 30 s limit), so a load pass or a reload
/// in progress ends at once rather than at its plugin's time limit, which
/// held a stopping server for its whole grace (found by review); no runner
/// starts after it.
#[test]
fn a_shutdown_ends_the_constructions_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = json!({
        "name": "hung",
        "version": "1.0.0",
        "entrypoint": "libfixture_faulty.so",
        "isolation": "process",
        "config": {"fault_at_init": "hang"},
    });
    std::fs::create_dir_all(dir.path().join("hung")).unwrap();
    std::fs::write(
        dir.path().join("hung").join("manifest.json"),
        manifest.to_string(),
    )
    .unwrap();
    let lib_dir = Path::new(zoo::FAULTY_LIBRARY).parent().unwrap();
    let config = LoaderConfig {
        lib_paths: vec![lib_dir.to_path_buf()],
        runner: Some(RUNNER.into()),
        process: ProcessLimits {
            init_timeout: Duration::from_secs(30),
            ..ProcessLimits::default()
        },
        ..LoaderConfig::default()
    };
    let registry = Registry::new();
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(registry.clone(), checker, config);
    std::thread::scope(|scope| {
        let pass = scope.spawn(|| loader.load_all(dir.path()));
        // Its runner started, or about to: either way it ends now.
        std::thread::sleep(Duration::from_millis(500));
        let stopped = std::time::Instant::now();
        loader.shutdown();
        let report = pass.join().unwrap();
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "the pass ended {:?} after the shutdown",
            stopped.elapsed()
        );
        assert_eq!(report.loaded(), 0, "{report:?}");
    });
    let status = registry.get_status("hung").unwrap();
    assert_eq!(status.state, S::Failed, "{status:?}");
    let reason = status.reason.unwrap_or_default();
    assert!(reason.contains("the host is stopping"), "{reason}");
    assert!(loader.drop_instances(Duration::from_secs(5)));
}
