//! Unit tests of [`super::Registry`]: transitions, calls, snapshots,
//! journals and the status object.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use chrono::DateTime;
use forgesyte_errors::{DependencyError, InitError, LoadError, PluginError};

use super::Registry;
use crate::PluginLifecycleState::{Failed, Initialized, Loaded, Running, Unavailable};
use crate::{HISTORY_LEN, PluginInfo, PluginLifecycleState, RegistryError};

fn info(description: &str, version: &str) -> PluginInfo {
    PluginInfo {
        description: Some(description.to_owned()),
        version: Some(version.to_owned()),
        source: Some(PathBuf::from("/plugins/x")),
    }
}

/// A registry holding `name`, brought to `state` through legal moves.
fn registry_with(name: &str, state: PluginLifecycleState) -> Registry {
    let registry = Registry::new();
    registry.register(name, PluginInfo::default()).unwrap();
    match state {
        Loaded => {}
        Initialized => registry.mark_initialized(name).unwrap(),
        Running => {
            registry.mark_initialized(name).unwrap();
            registry.mark_running(name).unwrap();
        }
        Failed => registry.mark_failed(name, "InitError: boom").unwrap(),
        Unavailable => registry
            .mark_unavailable(name, "Missing dependencies: libfoo")
            .unwrap(),
    }
    assert_eq!(registry.get_state(name), Some(state));
    registry
}

fn is_rfc3339_utc(text: &str) -> bool {
    DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z')
}

#[test]
fn register_starts_loaded_with_info_and_zero_metrics() {
    let registry = Registry::new();
    assert!(registry.is_empty());
    registry
        .register("ocr", info("reads text", "1.2.0"))
        .unwrap();
    let status = registry.get_status("ocr").unwrap();
    assert_eq!(status.name, "ocr");
    assert_eq!(status.state, Loaded);
    assert_eq!(status.description.as_deref(), Some("reads text"));
    assert_eq!(status.version.as_deref(), Some("1.2.0"));
    assert_eq!(status.reason, None);
    assert_eq!(status.last_used, None);
    assert_eq!((status.success_count, status.error_count), (0, 0));
    assert_eq!(status.last_execution_time_ms, None);
    assert_eq!(status.avg_execution_time_ms, None);
    assert_eq!(status.in_flight, 0);
    assert!(status.uptime_seconds.is_some_and(|s| s >= 0.0));
    assert_eq!(registry.len(), 1);
    assert!(registry.contains("ocr"));
    assert_eq!(
        registry.info("ocr").unwrap().source,
        Some(PathBuf::from("/plugins/x"))
    );
    assert!(!registry.is_available("ocr"));
}

#[test]
fn duplicate_register_is_an_error_and_keeps_the_first() {
    let registry = Registry::new();
    registry.register("ocr", info("first", "1")).unwrap();
    registry.mark_failed("ocr", "ImportError: x").unwrap();
    let generation = registry.generation();
    let error = registry.register("ocr", info("second", "2")).unwrap_err();
    assert_eq!(
        error,
        RegistryError::AlreadyRegistered { name: "ocr".into() }
    );
    let status = registry.get_status("ocr").unwrap();
    assert_eq!(status.description.as_deref(), Some("first"));
    assert_eq!(status.state, Failed);
    assert_eq!(status.reason.as_deref(), Some("ImportError: x"));
    assert_eq!(registry.len(), 1);
    assert_eq!(registry.generation(), generation, "refused write published");
}

#[test]
fn unknown_names_are_not_found_everywhere() {
    let registry = Registry::new();
    let not_found = || RegistryError::NotFound {
        name: "nope".into(),
    };
    assert_eq!(registry.mark_initialized("nope"), Err(not_found()));
    assert_eq!(registry.mark_running("nope"), Err(not_found()));
    assert_eq!(registry.finish("nope"), Err(not_found()));
    assert_eq!(registry.mark_failed("nope", "r"), Err(not_found()));
    assert_eq!(registry.mark_unavailable("nope", "r"), Err(not_found()));
    assert_eq!(registry.mark_loaded("nope", None), Err(not_found()));
    assert_eq!(
        registry.record_success("nope", Duration::ZERO),
        Err(not_found())
    );
    assert_eq!(
        registry.record_error("nope", Duration::ZERO),
        Err(not_found())
    );
    assert!(registry.begin_call("nope").is_err());
    assert_eq!(registry.get_status("nope"), None);
    assert_eq!(registry.get_state("nope"), None);
    assert_eq!(registry.history("nope"), None);
    assert!(!registry.is_available("nope"));
    assert_eq!(registry.generation(), 0);
}

#[test]
fn mark_initialized_only_from_loaded() {
    let registry = registry_with("p", Loaded);
    registry.mark_initialized("p").unwrap();
    assert_eq!(registry.get_state("p"), Some(Initialized));
    assert!(registry.is_available("p"));
    for state in [Initialized, Running, Failed, Unavailable] {
        let registry = registry_with("p", state);
        assert_eq!(
            registry.mark_initialized("p"),
            Err(RegistryError::IllegalTransition {
                from: state,
                to: Initialized
            })
        );
        assert_eq!(registry.get_state("p"), Some(state));
    }
}

#[test]
fn running_counts_calls_in_flight_and_last_one_out_goes_back() {
    let registry = registry_with("p", Initialized);
    registry.mark_running("p").unwrap();
    registry.mark_running("p").unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Running, 2));
    assert!(status.last_used.as_deref().is_some_and(is_rfc3339_utc));
    registry.finish("p").unwrap();
    assert_eq!(registry.get_state("p"), Some(Running));
    registry.finish("p").unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Initialized, 0));
    assert_eq!(
        registry.finish("p"),
        Err(RegistryError::NothingInFlight { name: "p".into() })
    );
}

#[test]
fn mark_running_refuses_unavailable_states() {
    for state in [Loaded, Failed, Unavailable] {
        let registry = registry_with("p", state);
        assert_eq!(
            registry.mark_running("p"),
            Err(RegistryError::NotAvailable {
                name: "p".into(),
                state
            })
        );
        assert_eq!(registry.get_status("p").unwrap().in_flight, 0);
    }
}

#[test]
fn failure_while_running_sticks_through_finish() {
    let registry = registry_with("p", Running);
    registry
        .mark_failed("p", "CrashError: killed by signal SIGSEGV (11)")
        .unwrap();
    assert!(!registry.is_available("p"));
    registry.finish("p").unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Failed, 0));
    assert_eq!(
        status.reason.as_deref(),
        Some("CrashError: killed by signal SIGSEGV (11)")
    );
}

#[test]
fn mark_failed_is_legal_from_every_state_but_unavailable() {
    for state in [Loaded, Initialized, Running] {
        let registry = registry_with("p", state);
        registry.mark_failed("p", "ImportError: gone").unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!(status.state, Failed);
        assert_eq!(status.reason.as_deref(), Some("ImportError: gone"));
    }
    let registry = registry_with("p", Unavailable);
    assert_eq!(
        registry.mark_failed("p", "x"),
        Err(RegistryError::IllegalTransition {
            from: Unavailable,
            to: Failed
        })
    );
    assert_eq!(
        registry.get_status("p").unwrap().reason.as_deref(),
        Some("Missing dependencies: libfoo")
    );
}

#[test]
fn mark_failed_again_replaces_the_reason_without_a_transition() {
    let registry = registry_with("p", Failed);
    let transitions = registry.history("p").unwrap().len();
    registry.mark_failed("p", "InitError: second").unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, Failed);
    assert_eq!(status.reason.as_deref(), Some("InitError: second"));
    assert_eq!(registry.history("p").unwrap().len(), transitions);
}

#[test]
fn mark_unavailable_from_loaded_and_initialized_only() {
    for state in [Loaded, Initialized, Unavailable] {
        let registry = registry_with("p", state);
        registry
            .mark_unavailable("p", "Missing dependencies: GPU (CUDA driver not found)")
            .unwrap();
        let status = registry.get_status("p").unwrap();
        assert_eq!(status.state, Unavailable);
        assert!(status.reason.as_deref().is_some_and(|r| r.contains("GPU")));
    }
    for state in [Running, Failed] {
        let registry = registry_with("p", state);
        assert_eq!(
            registry.mark_unavailable("p", "x"),
            Err(RegistryError::IllegalTransition {
                from: state,
                to: Unavailable
            })
        );
    }
}

#[test]
fn mark_error_routes_dependency_errors_to_unavailable() {
    let registry = registry_with("dep", Loaded);
    let missing = PluginError::from(LoadError::from(DependencyError::new(
        vec!["lib:foo".into(), "bin:bar".into()],
        None,
    )));
    registry.mark_error("dep", &missing).unwrap();
    let status = registry.get_status("dep").unwrap();
    assert_eq!(status.state, Unavailable);
    assert_eq!(
        status.reason.as_deref(),
        Some("Missing dependencies: lib:foo, bin:bar")
    );

    let registry = registry_with("init", Loaded);
    let init = PluginError::from(LoadError::from(InitError::Failed {
        message: "no model".into(),
    }));
    registry.mark_error("init", &init).unwrap();
    let status = registry.get_status("init").unwrap();
    assert_eq!(status.state, Failed);
    assert_eq!(status.reason.as_deref(), Some("InitError: no model"));
}

#[test]
fn mark_loaded_reloads_clears_reason_keeps_metrics() {
    let registry = registry_with("p", Initialized);
    registry.mark_running("p").unwrap();
    registry
        .record_success("p", Duration::from_millis(5))
        .unwrap();
    registry
        .record_error("p", Duration::from_millis(7))
        .unwrap();
    registry.finish("p").unwrap();
    registry
        .mark_failed("p", "CrashError: exited with code 3")
        .unwrap();

    registry
        .mark_loaded("p", Some(info("reloaded", "2.0.0")))
        .unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, Loaded);
    assert_eq!(status.reason, None);
    assert_eq!((status.success_count, status.error_count), (1, 1));
    assert_eq!(status.avg_execution_time_ms, Some(6.0));
    assert_eq!(status.version.as_deref(), Some("2.0.0"));

    // LOADED again: only the info changes; keeping info when None.
    registry.mark_loaded("p", None).unwrap();
    assert_eq!(
        registry.get_status("p").unwrap().version.as_deref(),
        Some("2.0.0")
    );

    // A reload's reason, shown while LOADED; kept by a plain mark_loaded,
    // cleared by INITIALIZED.
    let reloading = "being reloaded: calls answer 503";
    registry
        .mark_loaded_because("p", None, Some(reloading))
        .unwrap();
    assert_eq!(
        registry.get_status("p").unwrap().reason.as_deref(),
        Some(reloading)
    );
    registry.mark_loaded("p", None).unwrap();
    assert_eq!(
        registry.get_status("p").unwrap().reason.as_deref(),
        Some(reloading)
    );
    registry.mark_initialized("p").unwrap();
    assert_eq!(registry.get_status("p").unwrap().reason, None);
    let failed = registry_with("f", Initialized);
    failed.mark_failed("f", "CrashError").unwrap();
    failed
        .mark_loaded_because("f", None, Some(reloading))
        .unwrap();
    let status = failed.get_status("f").unwrap();
    assert_eq!(
        (status.state, status.reason.as_deref()),
        (Loaded, Some(reloading))
    );

    for state in [Initialized, Unavailable] {
        let registry = registry_with("q", state);
        registry.mark_loaded("q", None).unwrap();
        assert_eq!(registry.get_state("q"), Some(Loaded));
    }
    let registry = registry_with("r", Running);
    assert_eq!(
        registry.mark_loaded("r", None),
        Err(RegistryError::IllegalTransition {
            from: Running,
            to: Loaded
        })
    );
}

#[test]
fn record_success_and_error_count_and_time_without_changing_state() {
    let registry = registry_with("p", Initialized);
    registry
        .record_success("p", Duration::from_millis(10))
        .unwrap();
    registry
        .record_error("p", Duration::from_micros(2500))
        .unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, Initialized);
    assert_eq!((status.success_count, status.error_count), (1, 1));
    assert_eq!(status.last_execution_time_ms, Some(2.5));
    assert_eq!(status.avg_execution_time_ms, Some(6.25));
    assert!(status.last_used.as_deref().is_some_and(is_rfc3339_utc));

    // Counting is allowed whatever the state: a call can end after a fault.
    registry.mark_failed("p", "TimeoutError: x").unwrap();
    registry
        .record_error("p", Duration::from_millis(1))
        .unwrap();
    assert_eq!(registry.get_status("p").unwrap().error_count, 2);
}

#[test]
fn average_is_the_mean_of_the_last_ten_calls() {
    let registry = registry_with("p", Initialized);
    for ms in 1..=15u64 {
        let elapsed = Duration::from_millis(ms * 10);
        if ms % 3 == 0 {
            registry.record_error("p", elapsed).unwrap();
        } else {
            registry.record_success("p", elapsed).unwrap();
        }
    }
    let status = registry.get_status("p").unwrap();
    // Last ten: 60..=150 ms, mean 105 ms.
    assert_eq!(status.avg_execution_time_ms, Some(105.0));
    assert_eq!(status.last_execution_time_ms, Some(150.0));
    assert_eq!((status.success_count, status.error_count), (10, 5));
}

#[test]
fn last_used_is_rfc3339_utc_and_does_not_go_back() {
    let registry = registry_with("p", Initialized);
    registry.record_success("p", Duration::ZERO).unwrap();
    let first = registry.get_status("p").unwrap().last_used.unwrap();
    registry.mark_running("p").unwrap();
    let second = registry.get_status("p").unwrap().last_used.unwrap();
    assert!(is_rfc3339_utc(&first), "{first}");
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).unwrap();
    assert!(parse(&second) >= parse(&first));
}

#[test]
fn status_json_has_every_spec_key_with_null_where_unknown() {
    let registry = registry_with("p", Loaded);
    let json = serde_json::to_value(registry.get_status("p").unwrap()).unwrap();
    let object = json.as_object().unwrap();
    let spec_keys = [
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
    for key in spec_keys {
        assert!(object.contains_key(key), "missing key {key}");
    }
    let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let extra: Vec<_> = keys.difference(&spec_keys.into()).copied().collect();
    assert_eq!(
        extra,
        [
            "confinement",
            "in_flight",
            "last_exit_reason",
            "next_retry_at",
            "restart_count",
            "signature"
        ]
    );
    for key in [
        "description",
        "reason",
        "version",
        "last_exit_reason",
        "signature",
        "next_retry_at",
        "confinement",
        "last_used",
        "last_execution_time_ms",
        "avg_execution_time_ms",
    ] {
        assert!(object[key].is_null(), "{key} should be null: {json}");
    }
    assert_eq!(object["state"], "LOADED");
    assert_eq!(object["success_count"], 0);
    assert!(object["uptime_seconds"].is_f64());

    let round_trip: crate::PluginStatus = serde_json::from_value(json).unwrap();
    assert_eq!(round_trip.name, "p");
}

#[test]
fn status_json_reason_is_kept_verbatim() {
    let registry = registry_with("p", Loaded);
    let reason = "ImportError: cannot open /p/libx.so: \"bad\" ✗ ELF";
    registry.mark_failed("p", reason).unwrap();
    let json = serde_json::to_value(registry.get_status("p").unwrap()).unwrap();
    assert_eq!(json["state"], "FAILED");
    assert_eq!(json["reason"], reason);
}

#[test]
fn lists_are_sorted_and_availability_follows_state() {
    let registry = Registry::new();
    for name in ["zeta", "alpha", "Mid", "beta", "gamma"] {
        registry.register(name, PluginInfo::default()).unwrap();
    }
    registry.mark_initialized("zeta").unwrap();
    registry.mark_initialized("beta").unwrap();
    registry.mark_running("beta").unwrap();
    registry.mark_failed("alpha", "ImportError: x").unwrap();
    registry
        .mark_unavailable("gamma", "Missing dependencies: y")
        .unwrap();

    let names: Vec<_> = registry.list_all().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["Mid", "alpha", "beta", "gamma", "zeta"]);
    assert_eq!(registry.list_available(), ["beta", "zeta"]);
    for status in registry.list_all() {
        assert_eq!(
            registry.is_available(&status.name),
            status.state.is_available()
        );
    }
}

#[test]
fn history_records_transitions_oldest_first_and_keeps_the_last_sixteen() {
    let registry = registry_with("p", Loaded);
    registry.mark_initialized("p").unwrap();
    registry.mark_running("p").unwrap();
    registry.mark_running("p").unwrap(); // not a transition
    registry.mark_failed("p", "CrashError: x").unwrap();
    let history = registry.history("p").unwrap();
    let moves: Vec<_> = history.iter().map(|t| (t.from, t.to)).collect();
    // The INITIALIZED -> RUNNING move of a tool call is not history.
    assert_eq!(
        moves,
        [
            (None, Loaded),
            (Some(Loaded), Initialized),
            (Some(Running), Failed),
        ]
    );
    assert_eq!(history[2].reason.as_deref(), Some("CrashError: x"));
    assert!(history.iter().all(|t| is_rfc3339_utc(&t.at)));

    for _ in 0..20 {
        registry.mark_loaded("p", None).unwrap();
        registry.mark_failed("p", "again").unwrap();
    }
    let history = registry.history("p").unwrap();
    assert_eq!(history.len(), HISTORY_LEN);
    assert_eq!(history.last().map(|t| t.to), Some(Failed));
    assert_eq!(history.first().map(|t| t.from), Some(Some(Failed)));
}

#[test]
fn end_call_counts_and_finishes_in_one_write() {
    let registry = registry_with("p", Initialized);
    registry.mark_running("p").unwrap();
    registry.mark_running("p").unwrap();
    let generation = registry.generation();
    registry
        .end_call("p", Duration::from_millis(4), true)
        .unwrap();
    assert_eq!(registry.generation(), generation + 1);
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Running, 1));
    registry
        .end_call("p", Duration::from_millis(2), false)
        .unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Initialized, 0));
    assert_eq!((status.success_count, status.error_count), (1, 1));
    assert_eq!(status.avg_execution_time_ms, Some(3.0));
    // Nothing in flight: refused, nothing counted.
    assert!(matches!(
        registry.end_call("p", Duration::from_millis(1), true),
        Err(RegistryError::NothingInFlight { .. })
    ));
    assert_eq!(registry.get_status("p").unwrap().success_count, 1);
}

#[test]
fn snapshots_are_frozen_and_generation_counts_writes() {
    let registry = registry_with("p", Loaded);
    let before = registry.snapshot();
    assert_eq!(before.generation(), 1);
    registry.mark_initialized("p").unwrap();
    registry.register("q", PluginInfo::default()).unwrap();
    assert_eq!(registry.generation(), 3);
    assert_eq!(before.state("p"), Some(Loaded));
    assert_eq!(before.len(), 1);
    assert!(!before.contains("q"));
    let after = registry.snapshot();
    assert_eq!(after.names(), ["p", "q"]);
    assert_eq!(after.available(), ["p"]);
    assert_eq!(after.statuses().len(), 2);
    assert_eq!(after.get("p").map(|s| s.state), Some(Initialized));
    assert!(after.info("q").is_some());
    assert!(after.history("q").is_some());
    // A refused write publishes nothing.
    assert!(registry.mark_running("q").is_err());
    assert_eq!(registry.generation(), 3);
}

#[test]
fn clones_share_one_registry() {
    let registry = Registry::new();
    let clone = registry.clone();
    clone.register("p", PluginInfo::default()).unwrap();
    assert!(registry.contains("p"));
    assert!(format!("{registry:?}").contains("plugins: 1"));
}

#[test]
fn call_guard_finishes_on_drop_and_records_outcomes() {
    let registry = registry_with("p", Initialized);
    {
        let call = registry.begin_call("p").unwrap();
        assert_eq!(call.name(), "p");
        assert_eq!(registry.get_state("p"), Some(Running));
        call.succeeded(Duration::from_millis(4));
    }
    let guard = registry.begin_call("p").unwrap();
    guard.failed(Duration::from_millis(6));
    {
        let _dropped = registry.begin_call("p").unwrap();
    }
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Initialized, 0));
    assert_eq!((status.success_count, status.error_count), (1, 1));
    assert_eq!(status.avg_execution_time_ms, Some(5.0));
}

#[test]
fn crash_restart_and_journal() {
    let registry = registry_with("p", Initialized);
    registry.mark_running("p").unwrap();
    let exit = crate::ExitInfo {
        description: Some("killed by signal SIGSEGV (11)".into()),
        signal: Some("SIGSEGV".into()),
        code: None,
        stderr_tail: vec!["last words".into()],
    };
    registry
        .mark_crashed("p", "CrashError: killed by signal SIGSEGV (11)", exit)
        .unwrap();
    let at = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
    registry.set_next_retry("p", Some(at)).unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, Failed);
    assert_eq!(
        status.last_exit_reason.as_deref(),
        Some("killed by signal SIGSEGV (11)")
    );
    assert_eq!(
        status.next_retry_at.as_deref(),
        Some("1970-01-02T00:00:00.000Z")
    );
    assert_eq!(status.restart_count, 0);
    // Long due: zero left; one a minute ahead: at most a minute.
    assert_eq!(registry.restart_in("p"), Some(Duration::ZERO));
    let ahead = std::time::SystemTime::now() + Duration::from_secs(60);
    registry.set_next_retry("p", Some(ahead)).unwrap();
    let left = registry.restart_in("p").unwrap();
    assert!(
        left > Duration::from_secs(58) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    registry.set_next_retry("p", Some(at)).unwrap();
    assert_eq!(registry.restart_in("nobody"), None);

    // A reload in place of the pending restart clears its time too.
    let reloaded = registry_with("q", Initialized);
    reloaded.mark_failed("q", "CrashError").unwrap();
    reloaded.set_next_retry("q", Some(at)).unwrap();
    reloaded.mark_loaded("q", None).unwrap();
    assert_eq!(reloaded.get_status("q").unwrap().next_retry_at, None);

    registry.mark_restarting("p").unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.restart_count), (Loaded, 1));
    assert_eq!(status.next_retry_at, None);
    assert_eq!(status.reason.as_deref(), Some(crate::registry::RESTARTING));
    // The exit reason outlives the restart.
    assert!(status.last_exit_reason.is_some());
    // Only from FAILED.
    assert_eq!(
        registry.mark_restarting("p"),
        Err(RegistryError::IllegalTransition {
            from: Loaded,
            to: Loaded
        })
    );

    // A plugin being retired is not restarted: its supervisor's timer may
    // fire while a rescan lets it go (and its directory may hold another
    // plugin by then).
    let retiring = registry_with("r", Initialized);
    retiring.mark_failed("r", "CrashError: exited").unwrap();
    retiring.retire("r").unwrap();
    assert!(
        matches!(
            retiring.mark_restarting("r"),
            Err(RegistryError::NotFound { .. })
        ),
        "{:?}",
        retiring.mark_restarting("r")
    );

    registry.mark_failed("p", "InitError: boom").unwrap();
    // Same reason again: no new journal entry.
    registry.mark_failed("p", "InitError: boom").unwrap();
    let journal = registry.journal("p").unwrap();
    let summary: Vec<_> = journal
        .iter()
        .map(|j| (j.state, j.reason.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                Failed,
                "CrashError: killed by signal SIGSEGV (11)".to_owned()
            ),
            (Loaded, "restart 1".to_owned()),
            (Failed, "InitError: boom".to_owned()),
        ]
    );
    assert_eq!(journal[0].exit_signal.as_deref(), Some("SIGSEGV"));
    assert_eq!(journal[0].stderr_tail, ["last words"]);
    assert!(journal.iter().all(|j| is_rfc3339_utc(&j.at)));

    for i in 0..30 {
        registry
            .mark_crashed("p", format!("x{i}"), crate::ExitInfo::default())
            .unwrap();
    }
    let journal = registry.journal("p").unwrap();
    assert_eq!(journal.len(), crate::JOURNAL_LEN);
    assert_eq!(journal.last().unwrap().reason.as_deref(), Some("x29"));
    assert_eq!(registry.journal("nope"), None);

    let registry = registry_with("u", Unavailable);
    assert!(
        registry
            .mark_crashed("u", "x", crate::ExitInfo::default())
            .is_err()
    );
    assert_eq!(registry.journal("u").unwrap().len(), 1);
}

#[test]
fn uptime_does_not_go_backwards() {
    let registry = registry_with("p", Loaded);
    let first = registry.get_status("p").unwrap().uptime_seconds.unwrap();
    let second = registry.get_status("p").unwrap().uptime_seconds.unwrap();
    assert!(second >= first && first >= 0.0);
}

#[test]
fn state_and_reason_read_one_entry_and_an_unchanged_confinement_writes_nothing() {
    let registry = registry_with("p", Initialized);
    assert_eq!(registry.state_and_reason("p"), Some((Initialized, None)));
    assert_eq!(registry.state_and_reason("nope"), None);
    registry.mark_failed("p", "ToolPanic: boom").unwrap();
    assert_eq!(
        registry.state_and_reason("p"),
        Some((Failed, Some("ToolPanic: boom".to_owned())))
    );
    // None over none, and the same map twice: no write (no new generation).
    let generation = registry.generation();
    registry.set_confinement("p", None).unwrap();
    assert_eq!(registry.generation(), generation);
    let landlock: std::collections::BTreeMap<String, String> =
        [("landlock".to_owned(), "enforced".to_owned())].into();
    registry
        .set_confinement("p", Some(landlock.clone()))
        .unwrap();
    assert_eq!(registry.generation(), generation + 1);
    registry.set_confinement("p", Some(landlock)).unwrap();
    assert_eq!(registry.generation(), generation + 1);
    assert!(registry.get_status("p").unwrap().confinement.is_some());
    assert!(matches!(
        registry.set_confinement("nope", None),
        Err(RegistryError::NotFound { .. })
    ));
}

#[test]
fn for_each_state_visits_every_plugin_in_name_order_with_its_state() {
    let registry = Registry::new();
    for name in ["ocr", "detect", "yolo"] {
        registry.register(name, PluginInfo::default()).unwrap();
    }
    registry.mark_initialized("detect").unwrap();
    registry.mark_failed("yolo", "InitError: boom").unwrap();
    let mut seen = Vec::new();
    registry.for_each_state(|name, state| seen.push((name.to_owned(), state)));
    assert_eq!(
        seen,
        [
            ("detect".to_owned(), Initialized),
            ("ocr".to_owned(), Loaded),
            ("yolo".to_owned(), Failed),
        ]
    );
    // The same as a snapshot says.
    let snapshot = registry.snapshot();
    for (name, state) in &seen {
        assert_eq!(snapshot.state(name), Some(*state));
    }
}

/// A call counted before a crash that is still in flight when the restart
/// ends: the restarted plugin shows `RUNNING`, not an idle `INITIALIZED`,
/// until that call ends.
#[test]
fn a_restart_that_ends_with_a_call_in_flight_is_running() {
    let registry = registry_with("p", Initialized);
    // A crash, then the supervisor's restart up to the new instance.
    let crash_and_restart = || {
        registry
            .mark_crashed(
                "p",
                "CrashError: exited with code 3",
                crate::ExitInfo::default(),
            )
            .unwrap();
        registry.mark_restarting("p").unwrap();
        registry.mark_initialized("p").unwrap();
    };
    registry.mark_running("p").unwrap();
    crash_and_restart();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Running, 1));
    registry
        .end_call("p", Duration::from_millis(1), false)
        .unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.state, status.in_flight), (Initialized, 0));
    // With none in flight, a restart ends INITIALIZED as before.
    crash_and_restart();
    assert_eq!(registry.get_state("p"), Some(Initialized));
}

/// `mark_crashed_until` writes the crash and its restart's time in one
/// write: an observer told of the crash reads the retry time already.
#[test]
fn a_crash_and_its_retry_time_are_one_write() {
    let registry = registry_with("p", Initialized);
    let at = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = registry.clone();
    let record = std::sync::Arc::clone(&seen);
    registry.add_observer(std::sync::Arc::new(move |change: &crate::Change<'_>| {
        if change.kind == crate::ChangeKind::Crashed {
            // What the observer reads of the plugin as it is told.
            let status = reader.get_status(change.plugin);
            record
                .lock()
                .unwrap()
                .push(status.map(|s| (s.state, s.next_retry_at)));
        }
    }));
    registry
        .mark_crashed_until("p", "CrashError", crate::ExitInfo::default(), Some(at))
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [Some((Failed, Some("1970-01-02T00:00:00.000Z".to_owned())))]
    );
}

/// A reload that lets the instance go while calls run: the plugin shows
/// the reload's reason while they run and is LOADED as the last one ends
/// (it went back to INITIALIZED, with no instance); at once when none
/// runs; another move meanwhile (a fault: FAILED) drops the pending move.
#[test]
fn a_plugin_let_go_while_calls_run_is_loaded_when_the_last_one_ends() {
    let reloading = "being reloaded: calls answer 503";
    let registry = registry_with("p", Running);
    registry.mark_running("p").unwrap();
    registry.mark_loaded_when_idle("p", reloading).unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!(
        (status.state, status.reason.as_deref(), status.in_flight),
        (Running, Some(reloading), 2)
    );
    registry.finish("p").unwrap();
    assert_eq!(registry.get_state("p"), Some(Running));
    registry
        .end_call("p", Duration::from_millis(3), true)
        .unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!(
        (status.state, status.reason.as_deref(), status.success_count),
        (Loaded, Some(reloading), 1)
    );
    let history = registry.history("p").unwrap();
    assert_eq!(
        history.last().map(|t| (t.from, t.to)),
        Some((Some(Initialized), Loaded))
    );
    // The new instance: INITIALIZED, the reason gone.
    registry.mark_initialized("p").unwrap();
    assert_eq!(registry.get_status("p").unwrap().reason, None);

    let idle = registry_with("i", Initialized);
    idle.mark_loaded_when_idle("i", reloading).unwrap();
    assert_eq!(
        idle.state_and_reason("i"),
        Some((Loaded, Some(reloading.into())))
    );

    let faulted = registry_with("f", Running);
    faulted.mark_loaded_when_idle("f", reloading).unwrap();
    faulted.mark_failed("f", "CrashError: boom").unwrap();
    faulted.finish("f").unwrap();
    assert_eq!(faulted.get_state("f"), Some(Failed));
    // Later calls of a new instance end as calls do.
    let failed = registry_with("g", Running);
    failed.mark_loaded_when_idle("g", reloading).unwrap();
    failed.mark_failed("g", "CrashError: boom").unwrap();
    failed.finish("g").unwrap();
    failed.mark_loaded("g", None).unwrap();
    failed.mark_initialized("g").unwrap();
    failed.mark_running("g").unwrap();
    failed.finish("g").unwrap();
    assert_eq!(failed.get_state("g"), Some(Initialized));
}

/// A history entry keeps the first [`crate::HISTORY_REASON_CHARS`]
/// characters of a long reason; the status keeps it whole.
#[test]
fn history_entries_keep_a_long_reason_cut() {
    let registry = registry_with("p", Initialized);
    let long = "é".repeat(70_000);
    registry.mark_failed("p", long.clone()).unwrap();
    assert_eq!(registry.get_status("p").unwrap().reason, Some(long));
    let kept = registry.history("p").unwrap().last().cloned().unwrap();
    let reason = kept.reason.unwrap();
    assert_eq!(reason.chars().count(), crate::HISTORY_REASON_CHARS + 1);
    assert!(reason.ends_with('…'), "{reason:.10}");
}

/// A plugin that fails alike again and again keeps one copy of the reason
/// in its journal's newest entry, shared with its status, and one cut copy
/// in the older ones (it kept one whole copy per entry: up to 20 of a
/// reason of up to 64 KiB); the journal reads the same.
#[test]
fn journal_entries_of_one_reason_share_it() {
    use std::sync::Arc;
    let registry = registry_with("p", Initialized);
    let long = "r".repeat(60_000);
    let tail = vec![
        "Traceback (most recent call last):".to_owned(),
        long.clone(),
    ];
    for _ in 0..3 {
        registry
            .mark_failed_with_details("p", long.clone(), tail.clone())
            .unwrap();
        registry.mark_loaded("p", None).unwrap();
    }
    registry
        .mark_failed_with_details("p", long.clone(), tail.clone())
        .unwrap();
    let newest_is_the_status = registry
        .with_entry("p", |_, entry| {
            let newest = entry.journal.back().and_then(|e| e.reason.as_ref());
            matches!((newest, &entry.reason), (Some(n), Some(s)) if Arc::ptr_eq(n, s))
        })
        .unwrap();
    assert!(
        newest_is_the_status,
        "the status and the newest entry share"
    );
    let journal = registry.journal("p").unwrap();
    assert_eq!(journal[3].reason.as_deref(), Some(long.as_str()));
    assert_eq!(journal[3].stderr_tail, tail);
    registry.mark_loaded("p", None).unwrap();
    registry.mark_failed("p", "another reason").unwrap();

    let cut = forgesyte_errors::shorten(&long, crate::JOURNAL_PAST_CHARS);
    let journal = registry.journal("p").unwrap();
    let reasons: Vec<Option<&str>> = journal.iter().map(|e| e.reason.as_deref()).collect();
    assert_eq!(
        reasons,
        [
            Some(cut.as_str()),
            Some(cut.as_str()),
            Some(cut.as_str()),
            Some(cut.as_str()),
            Some("another reason")
        ]
    );
    assert_eq!(
        journal[2].stderr_tail,
        ["Traceback (most recent call last):".to_owned(), cut.clone()]
    );
    let shared = registry
        .with_entry("p", |_, entry| {
            let kept: Vec<_> = entry
                .journal
                .iter()
                .filter_map(|e| e.reason.clone())
                .collect();
            let tails: Vec<_> = entry
                .journal
                .iter()
                .map(|e| e.stderr_tail.clone())
                .collect();
            kept[..4].iter().all(|r| Arc::ptr_eq(r, &kept[0]))
                && !Arc::ptr_eq(&kept[4], &kept[0])
                && tails[..4].iter().all(|t| Arc::ptr_eq(t, &tails[0]))
        })
        .unwrap();
    assert!(shared, "one copy of the repeated reason");
}

/// Twenty failures that each give a different long reason keep it whole
/// in the newest entry only.
#[test]
fn older_journal_entries_keep_a_cut_reason() {
    let registry = registry_with("p", Initialized);
    for n in 0..crate::JOURNAL_LEN {
        let reason = format!("{n} {}", "x".repeat(60_000));
        registry.mark_failed("p", reason).unwrap();
        registry.mark_loaded("p", None).unwrap();
    }
    let journal = registry.journal("p").unwrap();
    assert_eq!(journal.len(), crate::JOURNAL_LEN);
    let (newest, older) = journal.split_last().unwrap();
    assert_eq!(newest.reason.as_deref().map(str::len), Some(60_003));
    for (n, entry) in older.iter().enumerate() {
        let reason = entry.reason.as_deref().unwrap_or_default();
        assert_eq!(reason.chars().count(), crate::JOURNAL_PAST_CHARS + 1, "{n}");
        assert!(reason.starts_with(&format!("{n} x")), "{n}: {reason:.8}");
        assert!(reason.ends_with('…'), "{n}");
    }
}

/// A reason quotes what a plugin said: whatever its length, the registry
/// keeps at most `MAX_REASON_CHARS` of it (a 30 MB panic message was every
/// list's answer), by every way a reason is set, the last exit reason too.
#[test]
fn reasons_are_bounded_whatever_the_plugin_said() {
    let max = crate::MAX_REASON_CHARS;
    let huge = "é".repeat(max + 10);
    let cut = |text: Option<String>| {
        let text = text.unwrap();
        assert_eq!(text.chars().count(), max + 1, "{}", &text[..20]);
        assert!(text.ends_with('…'));
    };
    let registry = registry_with("p", Initialized);
    registry.mark_failed("p", huge.as_str()).unwrap();
    cut(registry.get_status("p").unwrap().reason);
    let registry = registry_with("u", Initialized);
    registry.mark_unavailable("u", huge.as_str()).unwrap();
    cut(registry.get_status("u").unwrap().reason);
    let registry = registry_with("c", Initialized);
    let exit = crate::ExitInfo {
        description: Some(huge.clone()),
        ..crate::ExitInfo::default()
    };
    registry.mark_crashed("c", huge.as_str(), exit).unwrap();
    let status = registry.get_status("c").unwrap();
    cut(status.reason);
    cut(status.last_exit_reason);
    let registry = registry_with("l", Failed);
    registry
        .mark_loaded_because("l", None, Some(huge.as_str()))
        .unwrap();
    cut(registry.get_status("l").unwrap().reason);
    // One at the bound is kept whole.
    let registry = registry_with("w", Initialized);
    let whole = "x".repeat(max);
    registry.mark_failed("w", whole.as_str()).unwrap();
    assert_eq!(registry.get_status("w").unwrap().reason, Some(whole));
}
