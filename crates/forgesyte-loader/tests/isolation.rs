//! Process isolation with real runner processes and the `faulty` fixture.
//!
//! Every test builds its own plugins directory (manifests only; the library
//! is found through `lib_paths`), uses small timeouts and backoffs, and
//! waits with deadlines, so the suite stays bounded on two cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forgesyte_deps::DependencyChecker;
use forgesyte_errors::ToolError;
use forgesyte_loader::{
    CallError, Isolation, Loader, LoaderConfig, ProcessLimits, SupervisionPolicy,
};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use forgesyte_tests::zoo;
use serde_json::{Value, json};

const RUNNER: &str = env!("CARGO_BIN_EXE_forgesyte-runner");
const LIBRARY: &str = "libfixture_faulty.so";

/// A plugins directory of `faulty` manifests and a loader over it.
struct Setup {
    dir: tempfile::TempDir,
    registry: Registry,
    config: LoaderConfig,
}

impl Setup {
    fn new() -> Self {
        let lib_dir = Path::new(zoo::FAULTY_LIBRARY)
            .parent()
            .expect("library dir")
            .to_path_buf();
        Setup {
            dir: tempfile::tempdir().unwrap(),
            registry: Registry::new(),
            config: LoaderConfig {
                lib_paths: vec![lib_dir],
                runner: Some(RUNNER.into()),
                process: ProcessLimits {
                    init_timeout: Duration::from_secs(5),
                    call_timeout: Duration::from_secs(2),
                    memory_limit_mib: 256,
                    max_response_bytes: 1024 * 1024,
                },
                supervision: SupervisionPolicy {
                    max_restarts: 0,
                    ..SupervisionPolicy::default()
                },
                ..LoaderConfig::default()
            },
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds plugin `name`: the faulty library, isolated unless `extra` says
    /// otherwise, with `extra` merged into the manifest.
    fn plugin(&self, name: &str, extra: Value) -> &Self {
        let mut manifest = json!({
            "name": name,
            "version": "1.0.0",
            "entrypoint": LIBRARY,
            "isolation": "process",
        });
        if let (Some(m), Some(extra)) = (manifest.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
        let dir = self.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        self
    }

    fn loader(&self) -> Loader {
        let checker = Arc::new(DependencyChecker::system(Vec::new()));
        let loader = Loader::new(self.registry.clone(), checker, self.config.clone());
        loader.load_all(self.path());
        loader
    }
}

/// Asserts `name`'s state and that its reason contains each of `parts`.
fn check(registry: &Registry, name: &str, state: S, parts: &[&str]) -> String {
    let status = registry
        .get_status(name)
        .unwrap_or_else(|| panic!("{name} missing from {:#?}", registry.list_all()));
    let reason = status.reason.clone().unwrap_or_default();
    assert_eq!(status.state, state, "{name}: {status:#?}");
    for part in parts {
        assert!(reason.contains(part), "{name}: {reason:?} lacks {part:?}");
    }
    reason
}

/// Waits until `name` is in `state` (panics after `within`).
fn wait_for(registry: &Registry, name: &str, state: S, within: Duration) -> Duration {
    let started = Instant::now();
    while registry.get_state(name) != Some(state) {
        assert!(
            started.elapsed() < within,
            "{name} not {state} after {within:?}: {:#?}",
            registry.get_status(name)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

fn call(loader: &Loader, name: &str, tool: &str, args: Value) -> Result<Value, CallError> {
    loader
        .handle(name)
        .unwrap_or_else(|| panic!("{name} has no handle"))
        .call(tool, &args)
}

#[test]
fn every_fault_at_construction_fails_only_that_plugin() {
    let s = Setup::new();
    for fault in ["segv", "abort", "overflow", "exit3", "panic", "error"] {
        s.plugin(
            &format!("init-{fault}"),
            json!({"config": {"fault_at_init": fault}}),
        );
    }
    s.plugin(
        "init-hang",
        json!({"config": {"fault_at_init": "hang"}, "limits": {"init_timeout_s": 0.5}}),
    );
    s.plugin(
        "init-oom",
        json!({"config": {"fault_at_init": "oom"}, "limits": {"memory_mb": 128}}),
    );
    s.plugin("healthy", json!({}));
    s.plugin("in-host", json!({"isolation": "in-process"}));
    let loader = s.loader();
    let r = &s.registry;
    let died = "InitError: plugin process died during construction: ";
    check(
        r,
        "init-segv",
        S::Failed,
        &[
            died,
            "killed by signal SIGSEGV (11)",
            "faulty: constructor about to segv",
        ],
    );
    check(
        r,
        "init-abort",
        S::Failed,
        &[died, "killed by signal SIGABRT (6)"],
    );
    check(
        r,
        "init-overflow",
        S::Failed,
        &[died, "SIGABRT", "overflowed its stack"],
    );
    check(r, "init-exit3", S::Failed, &[died, "exited with code 3"]);
    check(
        r,
        "init-oom",
        S::Failed,
        &[
            died,
            "exceeded memory limit 128 MiB",
            "memory allocation of",
        ],
    );
    check(
        r,
        "init-hang",
        S::Failed,
        &[
            "InitError: timed out after 500 ms during init, stuck at \
             fixture_faulty::do_fault (",
            "/libfixture_faulty.so), in ",
            "; the limit is the manifest's limits.init_timeout_s, else the server's \
             --init-timeout",
        ],
    );
    check(
        r,
        "init-panic",
        S::Failed,
        &["InitError: plugin panicked during construction: fixture tool panic"],
    );
    check(
        r,
        "init-error",
        S::Failed,
        &["InitError: fixture init failed on request"],
    );
    check(r, "healthy", S::Initialized, &[]);
    check(r, "in-host", S::Initialized, &[]);
    // The journal keeps how the runner died.
    let entry = r.journal("init-segv").unwrap().pop().unwrap();
    assert_eq!(entry.exit_signal.as_deref(), Some("SIGSEGV"));
    assert!(
        entry
            .stderr_tail
            .iter()
            .any(|l| l.contains("about to segv")),
        "{entry:?}"
    );
    assert_eq!(
        r.journal("init-exit3").unwrap().pop().unwrap().exit_code,
        Some(3)
    );
    assert_eq!(
        r.get_status("init-abort")
            .unwrap()
            .last_exit_reason
            .as_deref(),
        Some("killed by signal SIGABRT (6)")
    );

    let healthy = loader.handle("healthy").unwrap();
    assert_eq!(healthy.isolation(), Isolation::Process);
    let pid = healthy.pid().expect("an isolated plugin has a pid");
    assert_ne!(pid, std::process::id());
    assert_eq!(healthy.call("pid", &json!({})).unwrap(), json!(pid));
    let in_host = loader.handle("in-host").unwrap();
    assert_eq!(
        (in_host.isolation(), in_host.pid()),
        (Isolation::InProcess, None)
    );
    assert_eq!(
        in_host.call("pid", &json!({})).unwrap(),
        json!(std::process::id())
    );
}

#[test]
fn every_fault_at_tool_time_gives_its_reason() {
    let s = Setup::new();
    let faults = [
        "segv",
        "abort",
        "panic_abort",
        "overflow",
        "exit3",
        "closeall",
        "corrupt",
        "panic",
        "stdout_spam",
    ];
    for fault in faults {
        s.plugin(&format!("t-{fault}"), json!({}));
    }
    s.plugin("t-hang", json!({"limits": {"call_timeout_s": 0.3}}));
    s.plugin("t-stop", json!({"limits": {"call_timeout_s": 0.3}}));
    s.plugin("t-oom", json!({"limits": {"memory_mb": 128}}));
    s.plugin("t-huge", json!({"limits": {"max_response_mb": 1}}));
    s.plugin("t-stdin_read", json!({"limits": {"call_timeout_s": 1}}));
    for n in 0..2 {
        s.plugin(&format!("t-reopen-{n}"), json!({}));
    }
    s.plugin("bystander", json!({}));
    s.plugin("in-host", json!({"isolation": "in-process"}));
    let loader = s.loader();
    let r = &s.registry;
    for name in ["bystander", "in-host"] {
        call(&loader, name, "ok", json!({})).unwrap();
    }

    let crash = |name: &str, tool: &str| match call(&loader, name, tool, json!({})) {
        Err(CallError::Tool(e)) => {
            assert!(e.is_fault(), "{name}: {e:?}");
            e
        }
        other => panic!("{name}: expected a fault, got {other:?}"),
    };
    for (fault, parts) in [
        (
            "segv",
            &[
                "CrashError: killed by signal SIGSEGV (11)",
                "faulty: tool about to segv",
            ][..],
        ),
        ("abort", &["CrashError: killed by signal SIGABRT (6)"]),
        (
            "panic_abort",
            &[
                "CrashError: killed by signal SIGABRT (6)",
                "fixture panic under panic=abort",
            ],
        ),
        (
            "overflow",
            &[
                "CrashError: killed by signal SIGABRT (6)",
                "overflowed its stack",
            ],
        ),
        ("exit3", &["CrashError: exited with code 3"]),
        // Its descriptors to the host closed by the plugin: said by the
        // runner's exit code (its stderr went with them).
        (
            "closeall",
            &[
                "CrashError: exited with code 74: the runner's own connection to the host was \
               closed from inside the process",
            ],
        ),
        (
            "oom",
            &[
                "CrashError: exceeded memory limit 128 MiB",
                "memory allocation of",
            ],
        ),
        // Checked further below: either side may see the garbage first.
        ("corrupt", &["CrashError: "]),
    ] {
        let name = format!("t-{fault}");
        let error = crash(&name, fault);
        assert!(matches!(error, ToolError::Crashed(_)), "{name}: {error:?}");
        assert_eq!(error.kind(), "CrashError");
        let reason = check(r, &name, S::Failed, parts);
        if fault == "corrupt" {
            // The fixture writes garbage into every pipe it can open: the
            // answer pipe, and the runner's own (private) request pipe.
            // Whichever side reads it first reports the broken protocol:
            // the host (an answer frame over the limit) or the runner
            // (exit 65, a request frame it cannot hold).
            assert!(
                reason.contains(
                    "CrashError: protocol violation: answer frame of 1651663207 bytes exceeds the limit of 1 MiB"
                ) || (reason.contains(
                    "CrashError: exited with code 65; stderr: faulty: tool about to corrupt"
                ) && reason.contains("broken stream: cannot allocate 1651663207 bytes for a frame")),
                "{name}: {reason}"
            );
        }
        let status = r.get_status(&name).unwrap();
        assert_eq!((status.success_count, status.error_count), (0, 1), "{name}");
        assert!(status.last_exit_reason.is_some(), "{name}: {status:?}");
        assert_eq!(status.next_retry_at, None, "{name}: restarts are off");
        let journal = r.journal(&name).unwrap();
        let last = journal.last().unwrap();
        assert_eq!(last.reason.as_deref(), Some(reason.as_str()));
        assert!(!last.stderr_tail.is_empty(), "{name}: {last:?}");
        // Not runnable now, with the reason.
        match call(&loader, &name, "ok", json!({})) {
            Err(CallError::NotRunnable {
                state,
                reason: Some(why),
                ..
            }) => {
                assert_eq!(state, Some(S::Failed));
                assert_eq!(why, reason);
            }
            other => panic!("{name}: expected NotRunnable, got {other:?}"),
        }
    }
    // A result over the answer limit is the tool's error, refused by the
    // runner before it is sent: no fault, no restart used up (the host
    // ended the runner for the frame, and six such calls left the plugin
    // FAILED for good).
    match call(&loader, "t-huge", "huge", json!({})) {
        Err(CallError::Tool(ToolError::Failed {
            error_type,
            message,
            ..
        })) => {
            assert_eq!(error_type.as_deref(), Some("ResultTooLarge"), "{message}");
            assert!(
                message.contains("exceeds the limit of 1048576 bytes on an answer"),
                "{message}"
            );
        }
        other => panic!("t-huge: expected ResultTooLarge, got {other:?}"),
    }
    let status = r.get_status("t-huge").unwrap();
    assert_eq!(status.state, S::Initialized, "{status:?}");
    assert_eq!(status.error_count, 1, "{status:?}");
    call(&loader, "t-huge", "ok", json!({})).unwrap();
    let journal = r.journal("t-segv").unwrap();
    assert_eq!(
        journal.last().unwrap().exit_signal.as_deref(),
        Some("SIGSEGV")
    );
    assert_eq!(
        r.journal("t-exit3").unwrap().last().unwrap().exit_code,
        Some(3)
    );
    assert_eq!(
        r.journal("t-closeall").unwrap().last().unwrap().exit_code,
        Some(74)
    );
    // Closed, then other files in the protocol's place (as a daemon opens
    // /dev/null): the same, never "exited with code 0". The runner's
    // reader, blocked on the old request pipe, learns of it when the host
    // closes that pipe, also when the caller was preempted holding the
    // pipe's writer just after its request (then the caller closes it as
    // it lets go: one plugin in about twelve here said "kept running"
    // before that). The runner must then end within the host's 0.3 s
    // grace: on a starved machine a second plugin may try, once.
    for n in 0..2 {
        let name = format!("t-reopen-{n}");
        let error = match call(&loader, &name, "closeall", json!({"reopen": true})) {
            Err(CallError::Tool(e)) => e,
            other => panic!("{name}: expected a fault, got {other:?}"),
        };
        assert!(matches!(error, ToolError::Crashed(_)), "{error:?}");
        let reason = check(r, &name, S::Failed, &["CrashError: "]);
        if reason.contains("CrashError: exited with code 74: the runner's own connection") {
            break;
        }
        assert!(
            n == 0 && reason.contains("closed its end of the protocol but kept running"),
            "{name}: {reason}"
        );
    }

    // A runner stopped by a signal (its own) times out, and its reason says
    // it was stopped, not a place no dump could give.
    let error = crash("t-stop", "stop");
    assert!(matches!(error, ToolError::TimedOut { .. }), "{error:?}");
    check(
        r,
        "t-stop",
        S::Failed,
        &[
            "TimeoutError: timed out after 300 ms during tool 'stop', stuck at a stop: the \
             process was stopped by a signal (SIGSTOP, SIGTSTP …) and ran no code;",
        ],
    );

    // A call past its timeout: the process is killed, the call says so.
    let started = Instant::now();
    let error = crash("t-hang", "hang");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        error,
        ToolError::TimedOut {
            after: Duration::from_millis(300)
        }
    );
    assert_eq!(error.kind(), "TimeoutError");
    check(
        r,
        "t-hang",
        S::Failed,
        &[
            "TimeoutError: timed out after 300 ms during tool 'hang', stuck at ",
            // Its own function (not the standard library's sleep, compiled
            // into its library), then where it waits.
            "fixture_faulty::do_fault (",
            "/libfixture_faulty.so), in ",
            "; the limit is the manifest's limits.call_timeout_s, else the server's \
             --call-timeout",
        ],
    );
    assert_eq!(
        r.journal("t-hang")
            .unwrap()
            .last()
            .unwrap()
            .exit_signal
            .as_deref(),
        Some("SIGKILL")
    );

    // A caught panic in a live process: the process is killed anyway, so
    // the plugin restarts clean.
    let error = crash("t-panic", "panic");
    assert!(matches!(error, ToolError::Panicked { .. }), "{error:?}");
    check(
        r,
        "t-panic",
        S::Failed,
        &["ToolPanic: tool panicked: fixture tool panic"],
    );

    // Printing to stdout cannot corrupt the protocol.
    let spam = call(&loader, "t-stdout_spam", "stdout_spam", json!({})).unwrap();
    assert_eq!(spam, json!({"spammed": 2000}));
    assert_eq!(
        call(&loader, "t-stdout_spam", "echo", json!([1])).unwrap(),
        json!([1])
    );
    check(r, "t-stdout_spam", S::Initialized, &[]);

    // Reading stdin cannot steal requests: the plugin's stdin is /dev/null.
    assert_eq!(
        call(&loader, "t-stdin_read", "stdin_read", json!({})).unwrap(),
        json!({"read": 0})
    );
    assert_eq!(
        call(&loader, "t-stdin_read", "echo", json!([1])).unwrap(),
        json!([1])
    );
    check(r, "t-stdin_read", S::Initialized, &[]);

    // Bystanders were never touched.
    for name in ["bystander", "in-host"] {
        call(&loader, name, "ok", json!({})).unwrap();
        let status = r.get_status(name).unwrap();
        assert_eq!(
            (status.state, status.success_count, status.error_count),
            (S::Initialized, 2, 0)
        );
    }
}

#[test]
fn giving_up_on_an_isolated_call_that_returned_meanwhile_kills_nothing() {
    let s = Setup::new();
    s.plugin("busy", json!({}));
    let loader = s.loader();
    let handle = loader.handle("busy").unwrap();
    let pid = handle.pid().unwrap();
    let ticket = forgesyte_loader::CallTicket::new();
    let context = forgesyte_loader::CallContext::default();
    let out = handle
        .call_ticketed("pid", &json!({}), &[], &context, &ticket)
        .unwrap();
    assert_eq!(out.result, json!(pid));
    // The caller's timer fires just after the call returned: the call
    // stands and its runner lives on.
    assert_eq!(
        handle.fail_timeout("pid", Duration::from_secs(2), &ticket),
        None
    );
    assert_eq!(handle.call("pid", &json!({})).unwrap(), json!(pid));
    check(&s.registry, "busy", S::Initialized, &[]);
}

#[test]
fn restarts_follow_the_backoff_and_stop_after_max() {
    let mut s = Setup::new();
    s.config.supervision = SupervisionPolicy {
        // Long enough that the FAILED state, read right after each crash,
        // is still there on a loaded machine.
        backoff_base: Duration::from_millis(500),
        backoff_cap: Duration::from_millis(1500),
        healthy_reset: Duration::from_secs(60),
        max_restarts: 3,
        window: Duration::from_secs(60),
    };
    s.plugin("flaky", json!({}));
    let loader = s.loader();
    let r = &s.registry;
    let handle = loader.handle("flaky").unwrap();
    let mut pid = handle.pid().unwrap();

    // Crash 1 by a tool, crash 2 by a kill between calls, crash 3 by a tool.
    for (round, expected_ms) in [(1u64, 500u64), (2, 1000), (3, 1500)] {
        if round == 2 {
            kill(pid);
            wait_for(r, "flaky", S::Failed, Duration::from_secs(2));
            check(
                r,
                "flaky",
                S::Failed,
                &["CrashError: killed by signal SIGKILL (9)"],
            );
        } else {
            assert!(matches!(
                handle.call("segv", &json!({})),
                Err(CallError::Tool(ToolError::Crashed(_)))
            ));
        }
        let failed_at = Instant::now();
        let status = r.get_status("flaky").unwrap();
        assert_eq!(status.state, S::Failed, "round {round}: {status:?}");
        assert!(status.next_retry_at.is_some(), "round {round}: {status:?}");
        assert!(matches!(
            handle.call("ok", &json!({})),
            Err(CallError::NotRunnable { .. })
        ));
        wait_for(r, "flaky", S::Initialized, Duration::from_secs(10));
        let waited = failed_at.elapsed();
        // Timed from when this thread saw the crash, which a loaded
        // machine delays: half a step of slack (the steps are 500 ms
        // apart, and no backoff is 0).
        assert!(
            waited >= Duration::from_millis(expected_ms - 250),
            "round {round}: restarted after {waited:?}, expected at least {expected_ms} ms"
        );
        let status = r.get_status("flaky").unwrap();
        assert_eq!(status.restart_count, round);
        assert_eq!(status.next_retry_at, None);
        assert_eq!(status.reason, None);
        assert!(status.last_exit_reason.is_some());
        let new_pid = handle.pid().unwrap();
        assert_ne!(new_pid, pid, "round {round}: same process");
        pid = new_pid;
        // The same handle routes to the new instance.
        assert_eq!(handle.call("pid", &json!({})).unwrap(), json!(pid));
    }

    // A fourth crash is past the budget: FAILED for good.
    assert!(handle.call("abort", &json!({})).is_err());
    check(
        r,
        "flaky",
        S::Failed,
        &["SIGABRT", "not restarted: 3 restarts within 60 s"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let status = r.get_status("flaky").unwrap();
    assert_eq!(
        (status.state, status.restart_count, status.next_retry_at),
        (S::Failed, 3, None)
    );
    let journal: Vec<_> = r
        .journal("flaky")
        .unwrap()
        .into_iter()
        .map(|j| (j.state, j.exit_signal))
        .collect();
    assert_eq!(
        journal,
        [
            (S::Failed, Some("SIGSEGV".into())),
            (S::Loaded, None),
            (S::Failed, Some("SIGKILL".into())),
            (S::Loaded, None),
            (S::Failed, Some("SIGSEGV".into())),
            (S::Loaded, None),
            (S::Failed, Some("SIGABRT".into())),
        ]
    );

    // An explicit reload starts it again.
    let outcome = loader.reload("flaky").unwrap();
    assert_eq!(outcome.state, S::Initialized, "{outcome:?}");
    call(&loader, "flaky", "ok", json!({})).unwrap();
}

/// A result no answer frame can hold (more binary results than a frame
/// carries) is the tool's `ResultTooLarge` error, as from a Python runner:
/// the runner keeps serving and the plugin stays INITIALIZED.
#[test]
fn a_result_no_frame_can_hold_is_a_tool_error() {
    let s = Setup::new();
    s.plugin("many", json!({}));
    let loader = s.loader();
    let pid = loader.handle("many").unwrap().pid().unwrap();
    match call(&loader, "many", "many_binary", json!({"n": 65_537})) {
        Err(CallError::Tool(e)) => {
            assert!(!e.is_fault(), "{e:?}");
            let text = format!("{e:?}");
            assert!(
                text.contains("ResultTooLarge") && text.contains("65537 attachments"),
                "{text}"
            );
        }
        other => panic!("expected a tool error, got {other:?}"),
    }
    assert_eq!(
        call(&loader, "many", "many_binary", json!({"n": 2})).unwrap(),
        json!(["", ""])
    );
    assert_eq!(loader.handle("many").unwrap().pid(), Some(pid));
    check(&s.registry, "many", S::Initialized, &[]);
}

#[test]
fn several_calls_in_flight_share_one_process() {
    let s = Setup::new();
    s.plugin("busy", json!({}));
    let loader = s.loader();
    let handle = loader.handle("busy").unwrap();
    let pid = handle.pid().unwrap();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            let handle = handle.clone();
            scope.spawn(move || {
                let slept = handle.call("sleep", &json!({"ms": 300})).unwrap();
                assert_eq!(slept, json!({"slept_ms": 300}));
                assert_eq!(handle.call("pid", &json!({})).unwrap(), json!(pid));
            });
        }
    });
    // Eight 300 ms calls one after the other would take 2.4 s.
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "calls ran one at a time: {took:?}"
    );
    let status = s.registry.get_status("busy").unwrap();
    assert_eq!(
        (status.success_count, status.in_flight, status.state),
        (16, 0, S::Initialized)
    );
}

#[test]
fn chaos_kills_under_traffic_reconcile() {
    let mut s = Setup::new();
    s.config.supervision = SupervisionPolicy {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(80),
        healthy_reset: Duration::from_secs(60),
        max_restarts: 1000,
        window: Duration::from_secs(60),
    };
    let names = ["chaos-a", "chaos-b", "chaos-c"];
    // 3 s: a loaded machine's 5 ms call does not reach it.
    for name in names {
        s.plugin(name, json!({"limits": {"call_timeout_s": 3}}));
    }
    let loader = s.loader();
    let r = &s.registry;
    let handles: Vec<_> = names.iter().map(|n| loader.handle(n).unwrap()).collect();

    #[derive(Default)]
    struct Counts {
        ok: AtomicU64,
        tool_errors: AtomicU64,
        not_runnable: AtomicU64,
        calls: AtomicU64,
    }
    let counts: Vec<Counts> = names.iter().map(|_| Counts::default()).collect();
    let stop = AtomicBool::new(false);
    let kills = AtomicU64::new(0);
    let limit = Duration::from_secs(3) + Duration::from_millis(800);
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            let (handles, counts, stop) = (&handles, &counts, &stop);
            scope.spawn(move || {
                let mut i = worker;
                while !stop.load(Ordering::SeqCst) {
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let which = (i >> 33) as usize % handles.len();
                    let (tool, args) = if i % 3 == 0 {
                        ("sleep", json!({"ms": 5}))
                    } else {
                        ("ok", json!({}))
                    };
                    let started = Instant::now();
                    let result = handles[which].call(tool, &args);
                    let took = started.elapsed();
                    assert!(took < limit, "a call took {took:?}: {result:?}");
                    let c = &counts[which];
                    c.calls.fetch_add(1, Ordering::SeqCst);
                    match result {
                        Ok(_) => c.ok.fetch_add(1, Ordering::SeqCst),
                        Err(CallError::Tool(e)) => {
                            assert!(
                                matches!(e, ToolError::Crashed(_)),
                                "only crashes expected: {e:?}"
                            );
                            c.tool_errors.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(CallError::NotRunnable { .. }) => {
                            c.not_runnable.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(other) => panic!("unexpected {other:?}"),
                    };
                }
            });
        }
        let (handles, stop, kills, names) = (&handles, &stop, &kills, &names);
        scope.spawn(move || {
            let mut i = 7u64;
            let started = Instant::now();
            // At least 1.5 s, and until 10 restarts (a kill that finds a
            // runner restarting hits a dead pid and restarts nothing; a
            // loaded machine restarts slower), at most 20 s.
            let restarts = || -> u64 {
                names
                    .iter()
                    .filter_map(|name| r.get_status(name))
                    .map(|status| status.restart_count)
                    .sum()
            };
            while started.elapsed() < Duration::from_millis(1500)
                || (restarts() < 10 && started.elapsed() < Duration::from_secs(20))
            {
                std::thread::sleep(Duration::from_millis(60));
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let handle = &handles[(i >> 33) as usize % handles.len()];
                if let Some(pid) = handle.pid() {
                    kill(pid);
                    kills.fetch_add(1, Ordering::SeqCst);
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
    });
    assert!(kills.load(Ordering::SeqCst) >= 10);
    let mut restarts = 0;
    for (name, c) in names.iter().zip(&counts) {
        wait_for(r, name, S::Initialized, Duration::from_secs(3));
        let status = r.get_status(name).unwrap();
        let (ok, errors, not_runnable, calls) = (
            c.ok.load(Ordering::SeqCst),
            c.tool_errors.load(Ordering::SeqCst),
            c.not_runnable.load(Ordering::SeqCst),
            c.calls.load(Ordering::SeqCst),
        );
        assert_eq!(ok + errors + not_runnable, calls, "{name}");
        assert!(ok > 0, "{name}: no call succeeded");
        assert_eq!(status.success_count, ok, "{name}: {status:?}");
        assert_eq!(status.error_count, errors, "{name}: {status:?}");
        assert_eq!(status.in_flight, 0, "{name}");
        restarts += status.restart_count;
        call(&loader, name, "ok", json!({})).unwrap();
    }
    assert!(restarts >= 10, "only {restarts} restarts");
}

#[test]
fn reload_restarts_isolated_and_retries_failed_in_process() {
    let s = Setup::new();
    s.plugin("iso", json!({}));
    s.plugin("kept", json!({"isolation": "in-process"}));
    s.plugin(
        "retry",
        json!({"isolation": "in-process", "config": {"fault_at_init": "error"}}),
    );
    let loader = s.loader();
    let r = &s.registry;
    check(
        r,
        "retry",
        S::Failed,
        &["InitError: fixture init failed on request"],
    );
    call(&loader, "kept", "ok", json!({})).unwrap();
    let old_pid = loader.handle("iso").unwrap().pid().unwrap();

    let outcome = loader.reload("iso").unwrap();
    assert_eq!(outcome.state, S::Initialized, "{outcome:?}");
    let new_pid = loader.handle("iso").unwrap().pid().unwrap();
    assert_ne!(old_pid, new_pid);
    wait_gone(old_pid);

    // An available in-process plugin is kept as it is, while its
    // directory is unchanged; edited, it is loaded again, its manifest
    // read again.
    let outcome = loader.reload("kept").unwrap();
    assert_eq!(outcome.state, S::Initialized);
    assert_eq!(r.get_status("kept").unwrap().success_count, 1);
    s.plugin(
        "kept",
        json!({"isolation": "in-process", "description": "edited by name"}),
    );
    let outcome = loader.reload("kept").unwrap();
    assert_eq!(outcome.state, S::Initialized);
    let status = r.get_status("kept").unwrap();
    assert_eq!(status.description.as_deref(), Some("edited by name"));
    call(&loader, "kept", "ok", json!({})).unwrap();

    // A failed one is retried with its new manifest.
    s.plugin("retry", json!({"isolation": "in-process"}));
    assert!(loader.reload("nope").is_none());
    assert_eq!(loader.reload("retry").unwrap().state, S::Initialized);
    call(&loader, "retry", "ok", json!({})).unwrap();

    // reload_all sees every plugin, and plugins that appeared since.
    s.plugin("newcomer", json!({}));
    // An available in-process plugin edited on disk: reload_all loads it
    // again too, as a reload by name does.
    s.plugin(
        "kept",
        json!({"isolation": "in-process", "description": "edited"}),
    );
    let report = loader.reload_all();
    let names: Vec<_> = report.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["iso", "kept", "newcomer", "retry"]);
    assert_eq!(report.loaded(), 4, "{report:#?}");
    call(&loader, "newcomer", "ok", json!({})).unwrap();
    assert_eq!(
        r.get_status("kept").unwrap().description.as_deref(),
        Some("edited")
    );
    // What reload_all loaded is the next rescan's baseline: nothing it
    // loaded is reloaded again.
    let rescan = loader.rescan();
    let unchanged: Vec<_> = rescan.unchanged.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        unchanged,
        ["iso", "kept", "newcomer", "retry"],
        "{rescan:#?}"
    );
    assert!(rescan.changed.is_empty(), "{rescan:#?}");

    // Dropping the loader stops its plugins' processes.
    let pids: Vec<u32> = ["iso", "newcomer"]
        .iter()
        .map(|n| loader.handle(n).unwrap().pid().unwrap())
        .collect();
    drop(loader);
    for pid in pids {
        wait_gone(pid);
    }
}

#[test]
fn preflight_stops_a_crashing_constructor_before_the_host_opens_it() {
    let registry = Registry::new();
    let config = LoaderConfig {
        runner: Some(RUNNER.into()),
        ..LoaderConfig::default()
    };
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(registry.clone(), checker, config);
    let outcome = loader.load_from_path(zoo::PREFLIGHT_SEGV.as_ref());
    assert_eq!(outcome.state, S::Failed);
    check(
        &registry,
        zoo::PREFLIGHT_SEGV_NAME,
        S::Failed,
        &["InitError: plugin process died during construction: killed by signal SIGSEGV (11)"],
    );

    // The loader-wide flag preflights a healthy plugin, then loads it here.
    let s = Setup::new();
    s.plugin("fine", json!({"isolation": "in-process"}));
    let mut config = s.config.clone();
    config.preflight = true;
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(s.registry.clone(), checker, config);
    loader.load_all(s.path());
    check(&s.registry, "fine", S::Initialized, &[]);
    assert_eq!(loader.handle("fine").unwrap().pid(), None);
}

#[test]
fn the_zoo_fault_fixtures_fail_as_documented() {
    let registry = Registry::new();
    let config = LoaderConfig {
        runner: Some(RUNNER.into()),
        ..LoaderConfig::default()
    };
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    let loader = Loader::new(registry.clone(), checker, config);
    let report = loader.load_all(zoo::FAULTS_DIR.as_ref());
    assert_eq!(report.plugins.len(), zoo::FAULTS.len());
    check(&registry, zoo::FAULTY_NAME, S::Initialized, &[]);
    check(&registry, zoo::INIT_SEGV_NAME, S::Failed, &["SIGSEGV"]);
    check(&registry, zoo::INIT_ABORT_NAME, S::Failed, &["SIGABRT"]);
    check(
        &registry,
        zoo::INIT_OVERFLOW_NAME,
        S::Failed,
        &["overflowed its stack"],
    );
    check(
        &registry,
        zoo::INIT_EXIT3_NAME,
        S::Failed,
        &["exited with code 3"],
    );
    check(
        &registry,
        zoo::INIT_HANG_NAME,
        S::Failed,
        &["timed out after 1 s during init"],
    );
    check(
        &registry,
        zoo::INIT_OOM_NAME,
        S::Failed,
        &["exceeded memory limit 256 MiB"],
    );
    check(
        &registry,
        zoo::INIT_PANIC_NAME,
        S::Failed,
        &["panicked during construction"],
    );
    check(&registry, zoo::PREFLIGHT_SEGV_NAME, S::Failed, &["SIGSEGV"]);
    let faulty = loader.handle(zoo::FAULTY_NAME).unwrap();
    assert_eq!(faulty.call_timeout(), Some(Duration::from_secs(2)));
}

#[test]
fn misbehaving_runners_are_reported_precisely() {
    let s = Setup::new();
    s.plugin("p", json!({}));
    let scripts = tempfile::tempdir().unwrap();
    // The silent runner gets 300 ms; the others 2 s, so that what they do
    // is seen before the handshake times out.
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "silent",
            "exec sleep 10",
            &[
                "ImportError: timed out after 300 ms during handshake",
                "limits.init_timeout_s, else the server's --init-timeout",
            ],
        ),
        (
            "closer",
            "exec 1>&-\nexec sleep 10",
            &[
                "ImportError: plugin process died while loading the plugin: protocol violation: closed its end of the protocol but kept running",
            ],
        ),
        (
            "garbage",
            "printf 'garbage!'\nexec sleep 10",
            &[
                "ImportError: plugin process died while loading the plugin: protocol violation: answer frame of 1651663207 bytes exceeds the limit of 1 MiB",
            ],
        ),
        (
            // A runner of protocol version 1 (a length and bare JSON, no
            // version field): refused by name, never a hang or "garbage".
            "old",
            "python3 -c 'import struct, sys, time\n\
             b = b\"{\\\"type\\\":\\\"hello\\\",\\\"abi_version\\\":1,\\\"pid\\\":1}\"\n\
             sys.stdout.buffer.write(struct.pack(\"<I\", len(b)) + b)\n\
             sys.stdout.flush()\n\
             time.sleep(10)'",
            &[
                "ImportError: the plugin runner ",
                " speaks protocol version 1, this host speaks version 2",
            ],
        ),
        (
            "quitter",
            "echo 'runner giving up' >&2\nexit 7",
            &[
                "ImportError: plugin process died while loading the plugin: exited with code 7; stderr: runner giving up",
            ],
        ),
    ];
    for (name, body, parts) in cases {
        let script = scripts.path().join(name);
        write_script(&script, body);
        let registry = Registry::new();
        let mut config = s.config.clone();
        config.runner = Some(script);
        config.process.init_timeout = if name == "silent" {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        };
        let checker = Arc::new(DependencyChecker::system(Vec::new()));
        let loader = Loader::new(registry.clone(), checker, config);
        let started = Instant::now();
        loader.load_all(s.path());
        assert!(started.elapsed() < Duration::from_secs(3), "{name}");
        check(&registry, "p", S::Failed, parts);
    }
    let registry = Registry::new();
    let mut config = s.config.clone();
    config.runner = Some(PathBuf::from("/definitely/not/a/runner"));
    let checker = Arc::new(DependencyChecker::system(Vec::new()));
    Loader::new(registry.clone(), checker, config).load_all(s.path());
    // The program is named, not the plugin's library (it was `cannot open
    // …/libp.so: cannot start the plugin runner …`).
    let reason = check(
        &registry,
        "p",
        S::Failed,
        &["ImportError: cannot start the plugin runner /definitely/not/a/runner"],
    );
    assert!(!reason.contains("cannot open"), "{reason}");
}

#[test]
fn a_host_binary_can_be_its_own_runner_behind_a_subcommand() {
    let mut s = Setup::new();
    s.plugin("sub", json!({}));
    let scripts = tempfile::tempdir().unwrap();
    let host = scripts.path().join("host");
    // A stand-in for `forgesyte __runner --library ...`.
    write_script(
        &host,
        &format!("[ \"$1\" = __runner ] || exit 99\nshift\nexec {RUNNER} \"$@\""),
    );
    s.config.runner = Some(host);
    s.config.runner_args = vec!["__runner".into()];
    let loader = s.loader();
    check(&s.registry, "sub", S::Initialized, &[]);
    call(&loader, "sub", "ok", json!({})).unwrap();
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// SIGKILL to a runner this test's loader started.
fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a valid pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

/// Waits until process `pid` is gone (reaped).
fn wait_gone(pid: u32) {
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "process {pid} still alive"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// With one load thread (one core), a wave that mixes a runner taking its
/// time to construct and an in-process plugin still checks, opens and
/// publishes the in-process one at once: the runner's wait held the only
/// pool worker, and the in-process plugin's check queued behind it.
#[test]
fn with_one_load_thread_a_slow_runner_holds_up_no_in_process_plugin() {
    let mut s = Setup::new();
    s.config.threads = 1;
    s.plugin(
        "a-slow",
        json!({"config": {"fault_at_init": "hang"}, "limits": {"init_timeout_s": 3}}),
    );
    s.plugin("b-in-host", json!({"isolation": "in-process"}));
    let registry = s.registry.clone();
    let config = s.config.clone();
    let path = s.path().to_path_buf();
    let pass = std::thread::spawn(move || {
        let checker = Arc::new(DependencyChecker::system(Vec::new()));
        let loader = Loader::new(registry, checker, config);
        loader.load_all(&path);
        loader
    });
    let took = wait_for(
        &s.registry,
        "b-in-host",
        S::Initialized,
        Duration::from_secs(10),
    );
    assert!(took < Duration::from_millis(2_500), "{took:?}");
    assert_eq!(s.registry.get_state("a-slow"), Some(S::Loaded));
    let loader = pass.join().unwrap();
    check(&s.registry, "a-slow", S::Failed, &["timed out after 3 s"]);
    drop(loader);
}
