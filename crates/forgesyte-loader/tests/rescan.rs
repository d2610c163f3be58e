//! `Loader::rescan` over the fake world: a removed plugin is retired after
//! its call in flight, a new one is added, an unchanged failed one retried,
//! and an unreadable plugins directory retires nothing; a call through a
//! handle a reload replaced, and one that panics after it timed out.

use std::time::{Duration, Instant};

use forgesyte_loader::fake::FakeBehavior;
use forgesyte_registry::{PluginLifecycleState as S, RegistryError};
use serde_json::json;

use crate::pipeline::{Setup, manifest};

#[test]
fn a_removed_plugin_is_retired_after_its_call_in_flight_and_a_new_one_added() {
    let s = Setup::new();
    s.plugin("alpha", &manifest("alpha", json!({})), FakeBehavior::Good)
        .plugin("beta", &manifest("beta", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("beta", S::Initialized, &[]);
    let in_flight = s.registry.begin_call("beta").unwrap();

    s.world.fs.remove("/plugins/beta");
    s.plugin("gamma", &manifest("gamma", json!({})), FakeBehavior::Good);
    let report = std::thread::scope(|scope| {
        let rescan = scope.spawn(|| loader.rescan());
        // Gone from every read at once, while the rescan waits for the call.
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.registry.get_status("beta").is_some() {
            assert!(Instant::now() < deadline, "beta never left the registry");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            matches!(
                s.registry.mark_running("beta"),
                Err(RegistryError::NotFound { .. })
            ),
            "a retiring plugin took a new call"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !rescan.is_finished(),
            "the rescan did not wait for the call"
        );
        drop(in_flight);
        rescan.join().unwrap()
    });
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(report.removed[0].name, "beta");
    assert_eq!(report.removed[0].calls_in_flight, 1);
    assert_eq!(report.removed[0].calls_cut_off, 0);
    let added: Vec<&str> = report.added.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(added, ["gamma"]);
    let unchanged: Vec<&str> = report.unchanged.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(unchanged, ["alpha"]);
    assert!(loader.handle("beta").is_none());
    assert_eq!(s.registry.retiring_in_flight("beta"), None, "not forgotten");
    s.check("gamma", S::Initialized, &[]);
    let names: Vec<String> = s.registry.list_all().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["alpha", "gamma"]);
}

/// A removed in-process plugin whose destructor blocks (here 5 s) holds
/// the rescan no longer than `DESTRUCTOR_WAIT`: its instance is dropped on a
/// thread of its own, not on the rescan's; the host's stop waits for it.
#[test]
fn a_removed_plugin_whose_destructor_blocks_holds_the_rescan_no_longer_than_its_wait() {
    let s = Setup::new();
    s.plugin(
        "slow",
        &manifest("slow", json!({})),
        FakeBehavior::DropSlow(Duration::from_secs(5)),
    )
    .plugin("quick", &manifest("quick", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("slow", S::Initialized, &[]);
    s.world.fs.remove("/plugins/slow");
    let started = Instant::now();
    let report = loader.rescan();
    let took = started.elapsed();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(
        took < forgesyte_loader::DESTRUCTOR_WAIT + Duration::from_secs(2),
        "{took:?}"
    );
    assert!(loader.handle("slow").is_none());
    s.check("quick", S::Initialized, &[]);
    // The host's stop waits for the destructor that ran past its wait (it
    // was lost: a stop right after cut it off).
    let stop = Instant::now();
    assert!(loader.drop_instances(Duration::from_secs(10)));
    let waited = stop.elapsed();
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
}

/// Several removed in-process plugins whose destructors block are let go
/// side by side: the rescan waits `DESTRUCTOR_WAIT` once, not once per
/// plugin, and reports them in order.
#[test]
fn removed_plugins_whose_destructors_block_are_waited_for_together() {
    let s = Setup::new();
    for name in ["slow-a", "slow-b", "slow-c"] {
        s.plugin(
            name,
            &manifest(name, json!({})),
            FakeBehavior::DropSlow(Duration::from_secs(5)),
        );
    }
    let loader = s.load();
    for name in ["slow-a", "slow-b", "slow-c"] {
        s.check(name, S::Initialized, &[]);
        s.world.fs.remove(format!("/plugins/{name}"));
    }
    let started = Instant::now();
    let report = loader.rescan();
    let took = started.elapsed();
    let removed: Vec<&str> = report.removed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(removed, ["slow-a", "slow-b", "slow-c"], "{report:?}");
    assert!(
        took < forgesyte_loader::DESTRUCTOR_WAIT + Duration::from_millis(1200),
        "{took:?}"
    );
    assert!(loader.drop_instances(Duration::from_secs(10)));
}

#[test]
fn an_unreadable_plugins_directory_retires_nothing_and_failed_plugins_are_retried() {
    let s = Setup::new();
    s.plugin("alpha", &manifest("alpha", json!({})), FakeBehavior::Good)
        .plugin(
            "broken",
            &manifest("broken", json!({})),
            FakeBehavior::InitError("boom".into()),
        );
    let loader = s.load();
    s.check("broken", S::Failed, &[]);
    s.world
        .fs
        .fail("/plugins", std::io::ErrorKind::PermissionDenied);
    let report = loader.rescan();
    assert!(report.removed.is_empty(), "{report:?}");
    // Said so: the server's readiness does not take it for a whole pass.
    assert!(report.unlisted, "{report:?}");
    let retried: Vec<&str> = report.retried.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(retried, ["broken"]);
    s.check("alpha", S::Initialized, &[]);
    assert!(loader.handle("alpha").is_some());
    s.world.fs.heal("/plugins");
    assert!(!loader.rescan().unlisted);
}

/// A plugin UNAVAILABLE for want of a `plugin:` dependency is available
/// after the rescan that adds that dependency (it was retried before the
/// added plugin loaded, and stayed UNAVAILABLE until another rescan).
#[test]
fn a_rescan_that_adds_a_dependency_makes_its_dependent_available() {
    let (s, loader) = a_dependent_whose_dependency_then_appears();
    let report = loader.rescan();
    s.check("base", S::Initialized, &[]);
    s.check("app", S::Initialized, &[]);
    let retried: Vec<(&str, S)> = report
        .retried
        .iter()
        .map(|o| (o.name.as_str(), o.state))
        .collect();
    assert_eq!(retried, [("app", S::Initialized)], "{report:?}");
}

/// A plugin registered under its directory's name (a duplicate of another
/// plugin's name) takes its name at the rescan that finds it free: the
/// side-by-side upgrade (`ocr-v2` beside `ocr`, then `ocr` removed).
#[test]
fn a_duplicate_takes_its_name_when_a_rescan_finds_it_free() {
    let s = Setup::new();
    s.plugin("ocr", &manifest("ocr", json!({})), FakeBehavior::Good)
        .plugin("ocr-v2", &manifest("ocr", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("ocr", S::Initialized, &[]);
    s.check("ocr-v2", S::Failed, &["duplicate plugin name 'ocr'"]);
    s.world.fs.remove("/plugins/ocr");
    let report = loader.rescan();
    let removed: Vec<&str> = report.removed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(removed, ["ocr", "ocr-v2"], "{report:?}");
    let added: Vec<&str> = report.added.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(added, ["ocr"], "{report:?}");
    s.check("ocr", S::Initialized, &[]);
    assert!(s.registry.get_status("ocr-v2").is_none());
    assert_eq!(
        loader.plugin_dir("ocr"),
        Some(std::path::PathBuf::from("/plugins/ocr-v2"))
    );
}

#[test]
fn a_handle_taken_before_a_reload_runs_nothing_of_the_old_instance() {
    let s = Setup::new();
    s.plugin("alpha", &manifest("alpha", json!({})), FakeBehavior::Good);
    let loader = s.load();
    let old = loader.handle("alpha").unwrap();
    // A fault fails it; a reload then retires this instance for a new one.
    assert!(old.call("panic", &json!({})).is_err());
    s.check("alpha", S::Failed, &[]);
    assert!(loader.reload("alpha").is_some());
    s.check("alpha", S::Initialized, &[]);
    let counts = |s: &Setup| {
        let status = s.registry.get_status("alpha").unwrap();
        (status.success_count, status.error_count, status.in_flight)
    };
    let before = counts(&s);
    // A call that took the handle before the reload (queued, say) is
    // refused: it would run the retired instance under the new one's name.
    match old.call("echo", &json!({"x": 1})) {
        Err(forgesyte_loader::CallError::Interrupted { reason, state, .. }) => {
            assert!(reason.contains("reloaded"), "{reason}");
            assert_eq!(state, Some(S::Initialized), "the new instance's state");
        }
        other => panic!("the retired instance ran: {other:?}"),
    }
    assert_eq!(counts(&s), before, "counted on the new instance");
    let new = loader.handle("alpha").unwrap();
    assert_eq!(new.call("echo", &json!({"x": 1})).unwrap(), json!({"x": 1}));
}

#[test]
fn a_call_timed_out_that_panics_later_changes_neither_reason_nor_counts() {
    let s = Setup::new();
    s.plugin("alpha", &manifest("alpha", json!({})), FakeBehavior::Good);
    let loader = s.load();
    let handle = loader.handle("alpha").unwrap();
    let ticket = forgesyte_loader::CallTicket::new();
    let context = forgesyte_loader::CallContext::default();
    std::thread::scope(|scope| {
        let call = scope.spawn(|| {
            handle.call_ticketed("panic", &json!({"after_ms": 2000}), &[], &context, &ticket)
        });
        // Given up on once it runs (whatever the machine's load).
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.registry.get_status("alpha").unwrap().in_flight == 0 {
            assert!(Instant::now() < deadline, "the call never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Past its ticket's start, just after the mark (a call given up on
        // before it is not the plugin's).
        std::thread::sleep(Duration::from_millis(50));
        let reason = handle
            .fail_timeout("panic", Duration::from_millis(50), &ticket)
            .expect("the call was still running");
        assert!(call.join().unwrap().is_err());
        let status = s.registry.get_status("alpha").unwrap();
        assert_eq!(status.state, S::Failed);
        assert_eq!(status.reason.as_deref(), Some(reason.as_str()), "replaced");
        assert_eq!((status.error_count, status.in_flight), (1, 0));
    });
}

/// A rescan for a file change (`Retry::Unavailable`, what `--watch` asks)
/// tries UNAVAILABLE plugins again but leaves an unchanged FAILED one as
/// it is (its restart budget spent stays spent); an operator's rescan
/// retries both.
#[test]
fn a_rescan_for_a_file_change_retries_no_failed_plugin() {
    use forgesyte_loader::Retry;
    let s = Setup::new();
    s.plugin(
        "broken",
        &manifest("broken", json!({})),
        FakeBehavior::InitError("boom".into()),
    )
    .plugin(
        "waiting",
        &manifest("waiting", json!({"dependencies": ["plugin:base"]})),
        FakeBehavior::Good,
    );
    let loader = s.load();
    s.check("broken", S::Failed, &[]);
    s.check("waiting", S::Unavailable, &["plugin:base"]);
    let names = |outcomes: &[forgesyte_loader::PluginLoadOutcome]| -> Vec<String> {
        outcomes.iter().map(|o| o.name.clone()).collect()
    };
    let report = loader.rescan_retrying(Retry::Unavailable);
    assert_eq!(names(&report.retried), ["waiting"], "{report:?}");
    assert_eq!(names(&report.unchanged), ["broken"], "{report:?}");
    s.check("broken", S::Failed, &[]);
    let report = loader.rescan();
    assert_eq!(names(&report.retried), ["broken", "waiting"], "{report:?}");
}

/// A plugin whose crash could not be restarted for want of a thread (its
/// supervisor's restart thread could not start: the host out of processes)
/// is listed with those the host was short for, and loaded again by
/// [`Loader::retry_host_short`]: it stayed FAILED for good once threads
/// were back.
#[test]
fn a_crash_not_restarted_for_want_of_a_thread_is_retried_as_the_hosts_shortage() {
    let s = Setup::new();
    s.plugin("alpha", &manifest("alpha", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("alpha", S::Initialized, &[]);
    s.registry
        .mark_failed(
            "alpha",
            "CrashError: killed by signal SIGKILL (9); not restarted: cannot start the restart \
             thread (Resource temporarily unavailable (os error 11))",
        )
        .unwrap();
    assert_eq!(loader.host_short_plugins(), ["alpha"]);
    let outcomes = loader.retry_host_short();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    s.check("alpha", S::Initialized, &[]);
    assert!(loader.host_short_plugins().is_empty());
}

/// A plugin the host could not start for want of its own resources is
/// listed for [`Loader::retry_host_short`], which loads it again once the
/// resources are back; one that failed for its own reason is not, nor one
/// whose reason moved on since.
#[test]
fn plugins_the_host_was_too_short_to_start_are_retried_until_they_load() {
    let s = Setup::new();
    let short = || FakeBehavior::HostShort("the server is out of file descriptors".into());
    s.plugin("alpha", &manifest("alpha", json!({})), short())
        .plugin("beta", &manifest("beta", json!({})), short())
        .plugin(
            "broken",
            &manifest("broken", json!({})),
            FakeBehavior::InitError("boom".into()),
        );
    let loader = s.load();
    s.check(
        "alpha",
        S::Failed,
        &["ImportError: cannot start", "out of file descriptors"],
    );
    s.check("broken", S::Failed, &["boom"]);
    assert_eq!(loader.host_short_plugins(), ["alpha", "beta"]);

    // Still short: tried, and still listed.
    let outcomes = loader.retry_host_short();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(loader.host_short_plugins(), ["alpha", "beta"]);

    // beta now fails for its own reason: dropped from the list.
    s.behave("alpha", FakeBehavior::Good);
    s.behave("beta", FakeBehavior::InitError("its own".into()));
    let outcomes = loader.retry_host_short();
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    s.check("alpha", S::Initialized, &[]);
    s.check("beta", S::Failed, &["its own"]);
    assert!(loader.host_short_plugins().is_empty());
    assert!(loader.retry_host_short().is_empty());

    // Short at its reload, then loaded by a rescan meanwhile: its entry
    // goes with its reason.
    s.behave("beta", short());
    loader.reload("beta");
    assert_eq!(loader.host_short_plugins(), ["beta"]);
    s.behave("beta", FakeBehavior::Good);
    loader.rescan();
    s.check("beta", S::Initialized, &[]);
    assert!(loader.host_short_plugins().is_empty());
}

/// A plugin the host was short for whose directory is then removed: the
/// retry loads it, and it fails for its missing manifest, off the list (a
/// reload by name that keeps a serving plugin whose files are gone kept
/// this one too, and the server retried it every minute for good).
#[test]
fn a_short_plugin_whose_directory_is_gone_leaves_the_retry_list() {
    let s = Setup::new();
    let short = FakeBehavior::HostShort("the server is out of file descriptors".into());
    s.plugin("beta", &manifest("beta", json!({})), short);
    let loader = s.load();
    assert_eq!(loader.host_short_plugins(), ["beta"]);
    s.world.fs.remove("/plugins/beta");
    let outcomes = loader.retry_host_short();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    s.check("beta", S::Failed, &["manifest not found"]);
    assert!(loader.host_short_plugins().is_empty());
}

/// A shortage recorded while the retry task reads the list is not lost:
/// the entry and the reason it is checked against are recorded together.
/// (The list, read between the two, dropped the entry as moved on, and
/// the server never tried that plugin again.)
#[test]
fn a_shortage_recorded_while_the_list_is_read_stays_listed() {
    let s = Setup::new();
    let short = || FakeBehavior::HostShort("the server is out of file descriptors".into());
    let loader = s.load();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = loader.host_short_plugins();
            }
        });
        // Each a new plugin, LOADED without a reason until it fails (as in
        // the load pass CI caught), not one being reloaded (kept listed).
        for i in 0..100 {
            let name = format!("p{i:03}");
            s.plugin(&name, &manifest(&name, json!({})), short());
            loader.rescan();
            if !loader.host_short_plugins().contains(&name) {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!("{name} dropped from the list");
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// A listed plugin that a rescan (or a reload) is loading again stays on
/// the list meanwhile: read then (the retry task, woken by another's
/// failure), it was dropped, and its next shortage was logged as a new
/// failure (an ERROR at every operator rescan) with its backoff reset.
#[test]
fn a_listed_plugin_being_reloaded_stays_listed() {
    use std::sync::{Arc, Mutex};
    let s = Setup::new();
    let short = |open: u32| {
        FakeBehavior::HostShort(format!(
            "the server is out of file descriptors ({open} open)"
        ))
    };
    s.plugin("alpha", &manifest("alpha", json!({})), short(10))
        .plugin("beta", &manifest("beta", json!({})), short(10));
    let loader = Arc::new(s.load());
    assert_eq!(loader.host_short_plugins(), ["alpha", "beta"]);
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let (weak, into) = (Arc::downgrade(&loader), Arc::clone(&seen));
    s.registry
        .add_observer(Arc::new(move |change: &forgesyte_registry::Change<'_>| {
            if change.plugin == "beta"
                && change.to == S::Loaded
                && let Some(loader) = weak.upgrade()
            {
                into.lock().unwrap().push(loader.host_short_plugins());
            }
        }));
    s.behave("beta", short(11));
    loader.reload("beta");
    assert_eq!(*seen.lock().unwrap(), [["alpha", "beta"]]);
    assert_eq!(loader.host_short_plugins(), ["alpha", "beta"]);
}

/// A manifest that could not be read for want of descriptors: the plugin
/// is FAILED under its directory's name and listed for a retry, which,
/// once the manifest reads and names another plugin, loads it under that
/// name (a reload by the directory's name refused it as renamed).
#[test]
fn a_manifest_the_host_could_not_read_is_retried_under_its_own_name() {
    let s = Setup::new();
    s.plugin("echo-1.2", &manifest("echo", json!({})), FakeBehavior::Good);
    let emfile = 24;
    s.world
        .fs
        .fail_os("/plugins/echo-1.2/manifest.json", emfile);
    let loader = s.load();
    s.check(
        "echo-1.2",
        S::Failed,
        &["ManifestError: cannot read manifest"],
    );
    assert_eq!(loader.host_short_plugins(), ["echo-1.2"]);
    s.world.fs.heal("/plugins/echo-1.2/manifest.json");
    let outcomes = loader.retry_host_short();
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["echo"], "{outcomes:?}");
    s.check("echo", S::Initialized, &[]);
    assert!(s.registry.get_status("echo-1.2").is_none());
    assert!(loader.host_short_plugins().is_empty());
    // Stamped as loaded: the next rescan leaves it alone.
    let report = loader.rescan();
    let unchanged: Vec<&str> = report.unchanged.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(unchanged, ["echo"], "{report:?}");
}

/// `reload_all` loads the directories that appeared after reloading the
/// registered plugins: a plugin UNAVAILABLE over a `plugin:` dependency
/// that appeared is then loaded again (it stayed UNAVAILABLE); one whose
/// dependency went away is UNAVAILABLE naming it.
#[test]
fn reload_all_settles_the_dependents_of_what_it_added() {
    let (s, loader) = a_dependent_whose_dependency_then_appears();
    let report = loader.reload_all();
    s.check("base", S::Initialized, &[]);
    s.check("app", S::Initialized, &[]);
    let app: Vec<S> = report
        .plugins
        .iter()
        .filter(|o| o.name == "app")
        .map(|o| o.state)
        .collect();
    assert_eq!(app, [S::Initialized], "{report:?}");

    s.world.fs.remove("/plugins/base");
    let report = loader.rescan();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    s.check(
        "app",
        S::Unavailable,
        &["Missing dependencies: plugin:base"],
    );
    assert!(loader.handle("app").is_none(), "its instance was let go");
}

/// A dependent UNAVAILABLE because its dependency's version does not meet
/// its requirement is not loaded again at every reload of another plugin
/// (its dependency is available, but the requirement is still unmet).
#[test]
fn a_dependent_over_an_unmet_version_is_not_reloaded_by_others_reloads() {
    let s = Setup::new();
    s.plugin("base", &manifest("base", json!({})), FakeBehavior::Good)
        .plugin(
            "app",
            &manifest("app", json!({"dependencies": ["plugin:base@^2"]})),
            FakeBehavior::Good,
        )
        .plugin("other", &manifest("other", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("app", S::Unavailable, &["plugin:base@^2 (found 1.2.3)"]);
    let outcomes = loader.reload_with_others("other").unwrap();
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["other"], "{outcomes:?}");
    let report = loader.rescan();
    assert!(
        report.retried.iter().filter(|o| o.name == "app").count() <= 1,
        "{report:?}"
    );
    s.check("app", S::Unavailable, &["plugin:base@^2 (found 1.2.3)"]);
}

/// `app`, loaded UNAVAILABLE for want of `plugin:base`; then `base`'s
/// directory appears (not loaded yet).
fn a_dependent_whose_dependency_then_appears() -> (Setup, forgesyte_loader::Loader) {
    let s = Setup::new();
    s.plugin(
        "app",
        &manifest("app", json!({"dependencies": ["plugin:base"]})),
        FakeBehavior::Good,
    );
    let loader = s.load();
    s.check("app", S::Unavailable, &["plugin:base"]);
    s.plugin("base", &manifest("base", json!({})), FakeBehavior::Good);
    (s, loader)
}

/// A reload by name of a dependency that stays unusable to its
/// dependents (FAILED for another reason) loads those UNAVAILABLE over it
/// again, through a chain: they quoted what it was until the next rescan.
#[test]
fn a_reload_by_name_refreshes_what_its_unavailable_dependents_say() {
    let s = Setup::new();
    s.plugin(
        "base",
        &manifest("base", json!({})),
        FakeBehavior::InitError("weights.bin is missing".into()),
    )
    .plugin(
        "app",
        &manifest("app", json!({"dependencies": ["plugin:base"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "top",
        &manifest("top", json!({"dependencies": ["plugin:app"]})),
        FakeBehavior::Good,
    )
    .plugin("other", &manifest("other", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("app", S::Unavailable, &["weights.bin is missing"]);
    s.check("top", S::Unavailable, &["weights.bin is missing"]);
    s.behave(
        "base",
        FakeBehavior::InitError("config.yaml is missing".into()),
    );
    let outcomes = loader.reload_with_others("base").unwrap();
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["base", "app", "top"], "{outcomes:?}");
    s.check("base", S::Failed, &["config.yaml is missing"]);
    for dependent in ["app", "top"] {
        s.check(dependent, S::Unavailable, &["config.yaml is missing"]);
        let reason = s.registry.get_status(dependent).unwrap().reason.unwrap();
        assert!(!reason.contains("weights.bin"), "{reason}");
    }
}
