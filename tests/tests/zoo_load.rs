//! The real loader over the real fixture zoo: every fixture ends in the right
//! state with a reason that says what is wrong, in one pass, and the good
//! plugins are callable through the real C ABI.

use std::sync::Arc;

use forgesyte_deps::DependencyChecker;
use forgesyte_loader::{CallError, Loader, LoaderConfig};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use forgesyte_tests::zoo;
use serde_json::json;

pub(crate) fn load_zoo() -> (Loader, Registry) {
    let registry = Registry::new();
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(registry.clone(), checker, LoaderConfig::default());
    let report = loader.load_all(zoo::ZOO_DIR.as_ref());
    assert_eq!(report.plugins.len(), zoo::ALL.len(), "{report:#?}");
    (loader, registry)
}

/// Asserts `name`'s state and that its reason contains each of `parts`.
fn check(registry: &Registry, name: &str, state: S, parts: &[&str]) {
    let status = registry
        .get_status(name)
        .unwrap_or_else(|| panic!("{name} missing from {:#?}", registry.list_all()));
    assert_eq!(status.state, state, "{name}: {status:?}");
    let reason = status.reason.unwrap_or_default();
    for part in parts {
        assert!(reason.contains(part), "{name}: {reason:?} lacks {part:?}");
    }
}

#[test]
fn every_fixture_ends_in_its_state_with_an_actionable_reason() {
    let (_loader, r) = load_zoo();
    check(&r, zoo::GOOD_NAME, S::Initialized, &[]);
    check(
        &r,
        zoo::PANIC_INIT_NAME,
        S::Failed,
        &["InitError: ", "panicked", "fixture constructor panic"],
    );
    check(
        &r,
        zoo::ERR_INIT_NAME,
        S::Failed,
        &["InitError: fixture init failed: missing weights"],
    );
    check(
        &r,
        zoo::WRONG_ABI_NAME,
        S::Failed,
        &[
            "ImportError: ABI version mismatch",
            "host speaks 3",
            "speaks 999",
        ],
    );
    // ABI 1 is still served.
    check(&r, zoo::ABI_V1_NAME, S::Initialized, &[]);
    check(
        &r,
        zoo::NO_ENTRY_NAME,
        S::Failed,
        &["ImportError: entry symbol 'forgesyte_plugin_entry' not found"],
    );
    check(
        &r,
        zoo::NOT_A_LIBRARY_NAME,
        S::Failed,
        &["ImportError: not a shared library", "not_a_library"],
    );
    check(
        &r,
        zoo::TRUNCATED_NAME,
        S::Failed,
        &["ImportError: not a shared library", "truncated"],
    );
    check(
        &r,
        zoo::UNDEFINED_SYMBOL_NAME,
        S::Failed,
        &[
            "ImportError: unresolved symbol",
            "forgesyte_fixture_missing_symbol",
        ],
    );
    check(
        &r,
        zoo::MISSING_LIB_NAME,
        S::Unavailable,
        &["Missing dependencies: lib:definitely_missing_xyz"],
    );
    // No test machine has a GPU: the real probe says so.
    if !DependencyChecker::system(Vec::new()).gpu_report().available {
        check(
            &r,
            zoo::NEEDS_GPU_NAME,
            S::Unavailable,
            &["Missing dependencies: gpu", "GPU", "CUDA"],
        );
    }
    check(
        &r,
        zoo::MISSING_MODEL_NAME,
        S::Unavailable,
        &[
            "Missing dependencies: weights (path: ",
            "missing_model/weights/model.bin",
        ],
    );
    check(&r, zoo::CHAIN_A_NAME, S::Initialized, &[]);
    check(&r, zoo::CHAIN_B_NAME, S::Initialized, &[]);
    check(&r, zoo::CHAIN_C_NAME, S::Initialized, &[]);
    check(
        &r,
        zoo::CYCLE_X_NAME,
        S::Unavailable,
        &["dependency cycle: cycle-x -> cycle-y -> cycle-x"],
    );
    check(
        &r,
        zoo::CYCLE_Y_NAME,
        S::Unavailable,
        &["dependency cycle: cycle-y -> cycle-x -> cycle-y"],
    );
    // Two plugins named "duplicate": the first (sorted by directory) keeps
    // the name, the second is registered under its directory and FAILED.
    check(&r, zoo::DUP_A_NAME, S::Initialized, &[]);
    check(
        &r,
        "dup_b",
        S::Failed,
        &["duplicate plugin name 'duplicate'", "dup_a"],
    );
}

#[test]
fn good_plugins_are_callable_through_the_c_abi() {
    let (loader, registry) = load_zoo();
    for name in [
        zoo::GOOD_NAME,
        zoo::CHAIN_A_NAME,
        zoo::CHAIN_B_NAME,
        zoo::CHAIN_C_NAME,
        zoo::DUP_A_NAME,
        zoo::ABI_V1_NAME,
    ] {
        let handle = loader
            .handle(name)
            .unwrap_or_else(|| panic!("{name} has no handle"));
        let args = json!({"plugin": name, "n": [1, 2, 3]});
        assert_eq!(handle.call("echo", &args).unwrap(), args);
        assert_eq!(registry.get_status(name).unwrap().success_count, 1);
    }
}

/// The plugin directory a plugin is handed is absolute, as the SDK says,
/// when the plugins directory was given relative to the working directory
/// (it was handed on as given).
#[test]
fn the_plugin_dir_handed_to_a_plugin_is_absolute() {
    let cwd = std::env::current_dir().unwrap();
    // The zoo spelled from the working directory: up to `/`, then down.
    let up = cwd.components().count() - 1;
    let relative = std::iter::repeat_n("..", up)
        .collect::<std::path::PathBuf>()
        .join(
            std::path::Path::new(zoo::ZOO_DIR)
                .strip_prefix("/")
                .unwrap(),
        );
    assert!(relative.is_relative());
    let registry = Registry::new();
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(registry.clone(), checker, LoaderConfig::default());
    loader.load_all(&relative);
    let good = loader.handle(zoo::GOOD_NAME).unwrap();
    let config = good.call("config", &json!({})).unwrap();
    let dir = config["plugin_dir"].as_str().unwrap();
    assert!(std::path::Path::new(dir).is_absolute(), "{dir}");
    assert!(dir.ends_with("/good"), "{dir}");
}

#[test]
fn tool_error_counts_and_tool_panic_is_a_fault() {
    let (loader, registry) = load_zoo();
    let good = loader.handle(zoo::GOOD_NAME).unwrap();

    let config = good.call("config", &json!({})).unwrap();
    assert_eq!(config["plugin_dir"], zoo::GOOD);
    assert_eq!(config["manifest"]["name"], zoo::GOOD_NAME);

    match good.call("fail", &json!({})) {
        Err(CallError::Tool(e)) => {
            assert!(!e.is_fault());
            assert_eq!(e.to_string(), "fixture tool failed");
        }
        other => panic!("expected a tool error, got {other:?}"),
    }
    check(&registry, zoo::GOOD_NAME, S::Initialized, &[]);

    match good.call("panic", &json!({})) {
        Err(CallError::Tool(e)) => assert!(e.is_fault(), "{e}"),
        other => panic!("expected a fault, got {other:?}"),
    }
    check(
        &registry,
        zoo::GOOD_NAME,
        S::Failed,
        &["ToolPanic: tool panicked: fixture tool panic"],
    );
    let status = registry.get_status(zoo::GOOD_NAME).unwrap();
    assert_eq!((status.success_count, status.error_count), (1, 2));
    assert!(matches!(
        good.call("echo", &json!({})),
        Err(CallError::NotRunnable { .. })
    ));
    // Other plugins are untouched.
    check(&registry, zoo::CHAIN_A_NAME, S::Initialized, &[]);
}

#[test]
fn concurrent_calls_on_one_instance() {
    let (loader, registry) = load_zoo();
    let good = loader.handle(zoo::GOOD_NAME).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let good = good.clone();
            s.spawn(move || {
                for i in 0..50 {
                    let args = json!({"t": t, "i": i});
                    assert_eq!(good.call("echo", &args).unwrap(), args);
                }
            });
        }
    });
    let status = registry.get_status(zoo::GOOD_NAME).unwrap();
    assert_eq!(status.success_count, 200);
    assert_eq!(status.state, S::Initialized);
    assert_eq!(status.in_flight, 0);
}
