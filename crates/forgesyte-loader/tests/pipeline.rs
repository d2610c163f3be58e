//! The load pipeline over the fake filesystem and the fake importer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forgesyte_deps::fake::{FakeFs, FakeWorld};
use forgesyte_deps::{DirEntry, FileSystem, FsMetadata};
use forgesyte_errors::ImportError;
use forgesyte_loader::fake::{FakeBehavior, FakeImporter};
use forgesyte_loader::{CallError, Importer, Loader, LoaderConfig, PluginLibrary};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use proptest::prelude::*;
use serde_json::json;

/// A fake world with a plugins directory, and the loader over it (also
/// used by `rescan`).
pub(crate) struct Setup {
    pub(crate) world: FakeWorld,
    importer: Arc<FakeImporter>,
    pub(crate) registry: Registry,
}

impl Setup {
    pub(crate) fn new() -> Self {
        let world = FakeWorld::new();
        world.fs.add_dir("/plugins");
        Setup {
            world,
            importer: Arc::new(FakeImporter::new()),
            registry: Registry::new(),
        }
    }

    /// A plugin directory with `manifest` and a library file `libNAME.so`
    /// whose import does `behavior`.
    pub(crate) fn plugin(&self, dir: &str, manifest: &str, behavior: FakeBehavior) -> &Self {
        let lib = format!("/plugins/{dir}/lib.so");
        self.world
            .fs
            .add_file(format!("/plugins/{dir}/manifest.json"), manifest)
            .add_file(&lib, "ELF");
        self.importer.set(lib, behavior);
        self
    }

    /// What importing `dir`'s library does from now on.
    pub(crate) fn behave(&self, dir: &str, behavior: FakeBehavior) {
        self.importer
            .set(format!("/plugins/{dir}/lib.so"), behavior);
    }

    fn loader(&self) -> Loader {
        self.loader_with(LoaderConfig::default())
    }

    fn loader_with(&self, config: LoaderConfig) -> Loader {
        Loader::with_seams(
            self.registry.clone(),
            Arc::new(self.world.checker()),
            Arc::new(self.world.fs.clone()),
            self.importer.clone(),
            config,
        )
    }

    pub(crate) fn load(&self) -> Loader {
        let loader = self.loader();
        loader.load_all("/plugins".as_ref());
        loader
    }

    /// Asserts the final state of `name` and that its reason contains every
    /// one of `reason_parts`.
    pub(crate) fn check(&self, name: &str, state: S, reason_parts: &[&str]) {
        let status = self
            .registry
            .get_status(name)
            .unwrap_or_else(|| panic!("{name} not registered: {:?}", self.registry.list_all()));
        assert_eq!(status.state, state, "{name}: {status:?}");
        let reason = status.reason.unwrap_or_default();
        for part in reason_parts {
            assert!(
                reason.contains(part),
                "{name}: reason {reason:?} lacks {part:?}"
            );
        }
        if state.is_available() {
            assert!(self.registry.is_available(name));
        }
    }
}

pub(crate) fn manifest(name: &str, extra: serde_json::Value) -> String {
    let mut m = json!({"name": name, "version": "1.2.3", "entrypoint": "lib.so"});
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(extra.clone());
    }
    m.to_string()
}

#[test]
fn good_plugin_is_initialized_and_callable() {
    let s = Setup::new();
    s.plugin("ocr", &manifest("ocr", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("ocr", S::Initialized, &[]);
    let status = s.registry.get_status("ocr").unwrap();
    assert_eq!(status.version.as_deref(), Some("1.2.3"));

    let handle = loader.handle("ocr").unwrap();
    assert_eq!(
        handle.call("echo", &json!({"x": 1})).unwrap(),
        json!({"x": 1})
    );
    let status = s.registry.get_status("ocr").unwrap();
    assert_eq!((status.success_count, status.error_count), (1, 0));
    assert!(status.last_used.is_some());
}

/// A hidden directory (`.echo-old`, a backup copy) is no plugin: a load
/// pass, a rescan and `lock` leave it out. (Sorted first, a stale copy
/// took its plugin's name, and the real one was FAILED as a duplicate.)
#[test]
fn hidden_directories_are_no_plugins() {
    let s = Setup::new();
    s.plugin("echo", &manifest("echo", json!({})), FakeBehavior::Good)
        .plugin(
            ".echo-old",
            &manifest("echo", json!({"version": "0.9.0"})),
            FakeBehavior::Good,
        );
    let loader = s.load();
    s.check("echo", S::Initialized, &[]);
    let status = s.registry.get_status("echo").unwrap();
    assert_eq!(status.version.as_deref(), Some("1.2.3"));
    assert_eq!(
        s.registry.list_all().len(),
        1,
        "{:?}",
        s.registry.list_all()
    );
    assert_eq!(loader.discover("/plugins".as_ref()).len(), 1);
    let report = loader.rescan();
    assert!(report.added.is_empty(), "{report:?}");
    let locked = forgesyte_loader::integrity::lock_dir(&s.world.fs, "/plugins".as_ref()).unwrap();
    let names: Vec<&String> = locked.lock.plugins.keys().collect();
    assert_eq!(names, ["echo"]);
    assert!(locked.skipped.is_empty(), "{:?}", locked.skipped);
}

#[test]
fn tool_error_counts_and_panic_fails_the_plugin() {
    let s = Setup::new();
    s.plugin("ocr", &manifest("ocr", json!({})), FakeBehavior::Good);
    let loader = s.load();
    let handle = loader.handle("ocr").unwrap();

    let err = handle.call("fail", &json!({})).unwrap_err();
    assert!(
        matches!(err, CallError::Tool(ref e) if !e.is_fault()),
        "{err}"
    );
    s.check("ocr", S::Initialized, &[]);

    let err = handle.call("nope", &json!({})).unwrap_err();
    assert_eq!(err.to_string(), "plugin 'ocr' has no tool 'nope'");

    let err = handle.call("panic", &json!({})).unwrap_err();
    assert!(
        matches!(err, CallError::Tool(ref e) if e.is_fault()),
        "{err}"
    );
    s.check("ocr", S::Failed, &["ToolPanic", "fake panic"]);

    let err = handle.call("echo", &json!({})).unwrap_err();
    assert!(matches!(err, CallError::NotRunnable { .. }), "{err}");
    let status = s.registry.get_status("ocr").unwrap();
    assert_eq!((status.success_count, status.error_count), (0, 2));
}

#[test]
fn import_and_init_failures_keep_their_reasons() {
    let s = Setup::new();
    s.plugin("abi", &manifest("abi", json!({})), FakeBehavior::WrongAbi)
        .plugin(
            "noentry",
            &manifest("noentry", json!({})),
            FakeBehavior::NoEntry,
        )
        .plugin(
            "initerr",
            &manifest("initerr", json!({})),
            FakeBehavior::InitError("weights corrupt".into()),
        )
        .plugin(
            "initpanic",
            &manifest("initpanic", json!({})),
            FakeBehavior::InitPanic("boom".into()),
        );
    s.world
        .fs
        .add_file("/plugins/nolib/manifest.json", manifest("nolib", json!({})));
    let loader = s.load();
    s.check(
        "abi",
        S::Failed,
        &["ImportError: ", "ABI version mismatch", "999"],
    );
    s.check(
        "noentry",
        S::Failed,
        &["ImportError: ", "forgesyte_plugin_entry"],
    );
    s.check("initerr", S::Failed, &["InitError: weights corrupt"]);
    s.check("initpanic", S::Failed, &["InitError: ", "panicked", "boom"]);
    s.check(
        "nolib",
        S::Failed,
        &["ImportError: library not found", "/plugins/nolib/lib.so"],
    );
    assert!(loader.handle("abi").is_none());
}

/// An in-process constructor that does not return within its limit is
/// its plugin's failure; the rest of the pass loads and the pass ends (it
/// held every other plugin of the pass, and the server never got ready).
#[test]
fn a_constructor_that_never_returns_fails_its_plugin_alone() {
    let s = Setup::new();
    let limited = |name: &str, s: f64| manifest(name, json!({"limits": {"init_timeout_s": s}}));
    s.plugin(
        "hangs",
        &limited("hangs", 0.3),
        FakeBehavior::InitSlow(Duration::from_secs(3600)),
    )
    .plugin(
        "slow",
        // Its own 2 s: 50 ms within 0.3 s is not sure on a loaded machine.
        &limited("slow", 2.0),
        FakeBehavior::InitSlow(Duration::from_millis(50)),
    )
    .plugin("good", &manifest("good", json!({})), FakeBehavior::Good)
    .plugin(
        "also-good",
        &manifest("also-good", json!({})),
        FakeBehavior::Good,
    );
    let started = std::time::Instant::now();
    let loader = s.load();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    s.check(
        "hangs",
        S::Failed,
        &[
            "InitError: timed out after 300 ms during construction in process",
            "limits.init_timeout_s, else the server's --init-timeout",
        ],
    );
    assert!(loader.handle("hangs").is_none());
    for name in ["slow", "good", "also-good"] {
        s.check(name, S::Initialized, &[]);
    }
    // Reloaded while its constructor still runs: not constructed again
    // (each reload left one more thread behind), said at once (not after
    // the constructor's hour; 2 s for a loaded machine).
    let started = std::time::Instant::now();
    loader.reload("hangs");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    s.check(
        "hangs",
        S::Failed,
        &[
            "InitError: its constructor of an earlier load",
            "has not returned",
        ],
    );
    // A slow constructor reloaded after it returned is constructed again.
    loader.reload("slow");
    s.check("slow", S::Initialized, &[]);
}

/// Constructions queued behind ones that hang get threads of their own
/// after a short wait, not after the hung ones' limits, and are never
/// given up on for waiting: a pass of 20 hung constructors (more than run
/// at once) takes about one limit, not one per hung plugin, and the
/// healthy plugins queued behind them load.
#[test]
fn hung_constructors_are_waited_for_together() {
    let s = Setup::new();
    let limited = |name: &str| manifest(name, json!({"limits": {"init_timeout_s": 1}}));
    let hung: Vec<String> = (0..20).map(|i| format!("h{i:02}")).collect();
    for name in &hung {
        s.plugin(
            name,
            &limited(name),
            FakeBehavior::InitSlow(Duration::from_secs(3600)),
        );
    }
    for name in ["z1", "z2", "z3"] {
        s.plugin(name, &limited(name), FakeBehavior::Good);
    }
    let started = std::time::Instant::now();
    let _loader = s.load();
    let took = started.elapsed();
    for name in &hung {
        s.check(
            name,
            S::Failed,
            &["timed out after 1 s during construction in process"],
        );
    }
    for name in ["z1", "z2", "z3"] {
        s.check(name, S::Initialized, &[]);
    }
    assert!(
        took < Duration::from_secs(5),
        "{took:?}: one limit after another"
    );
}

#[test]
fn bad_manifests_fail_with_the_problem_named() {
    let s = Setup::new();
    let fs = &s.world.fs;
    fs.add_file(
        "/plugins/badjson/manifest.json",
        "{\"name\": \"x\",\n  oops}",
    )
    .add_file("/plugins/empty/manifest.json", "")
    .add_file(
        "/plugins/types/manifest.json",
        r#"{"name": "types", "version": []}"#,
    )
    .add_file("/plugins/badname/manifest.json", r#"{"name": "../../etc"}"#)
    .add_file(
        "/plugins/dotdot/manifest.json",
        r#"{"name": "dotdot", "entrypoint": "../other/lib.so"}"#,
    )
    .add_file("/plugins/huge/manifest.json", vec![b' '; 4096])
    .add_file(
        "/plugins/deps/manifest.json",
        r#"{"name": "deps", "dependencies": ["foo:bar"]}"#,
    );
    let config = LoaderConfig {
        max_manifest_bytes: 1024,
        ..LoaderConfig::default()
    };
    let loader = s.loader_with(config);
    let report = loader.load_all("/plugins".as_ref());
    assert_eq!(report.plugins.len(), 7);
    assert_eq!(report.failed(), 7);
    s.check(
        "badjson",
        S::Failed,
        &["ManifestError: invalid JSON", "line 2, column 3"],
    );
    s.check("empty", S::Failed, &["ManifestError: ", "is empty"]);
    s.check(
        "types",
        S::Failed,
        &["field 'version'", "expected a string"],
    );
    s.check("badname", S::Failed, &["invalid plugin name", "../../etc"]);
    s.check(
        "dotdot",
        S::Failed,
        &["'entrypoint' points outside", "../other/lib.so"],
    );
    s.check("huge", S::Failed, &["4096 bytes", "1024-byte limit"]);
    s.check("deps", S::Failed, &["dependencies[0]"]);
}

#[test]
fn the_manifest_size_cap_is_checked_at_its_boundary_before_parsing() {
    // A manifest of exactly the cap loads; one byte more is refused by size
    // before it is parsed (its text is valid JSON: only its size is wrong).
    let s = Setup::new();
    let text = manifest("atcap", json!({}));
    let cap = text.len() + 8;
    let at_cap = format!("{text}{}", " ".repeat(cap - text.len()));
    let over = manifest("over", json!({}));
    let over = format!("{over}{}", " ".repeat(cap + 1 - over.len()));
    assert_eq!((at_cap.len(), over.len()), (cap, cap + 1));
    s.plugin("atcap", &at_cap, FakeBehavior::Good)
        .plugin("over", &over, FakeBehavior::Good);
    let config = LoaderConfig {
        max_manifest_bytes: cap as u64,
        ..LoaderConfig::default()
    };
    s.loader_with(config).load_all("/plugins".as_ref());
    s.check("atcap", S::Initialized, &[]);
    s.check(
        "over",
        S::Failed,
        &[
            "ManifestError: ",
            &format!("{} bytes", cap + 1),
            &format!("{cap}-byte limit"),
        ],
    );
}

#[test]
fn a_50_mb_manifest_on_disk_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("huge");
    std::fs::create_dir(&plugin).unwrap();
    // A sparse 50 MB file: cheap to make, expensive to parse if the cap failed.
    let file = std::fs::File::create(plugin.join("manifest.json")).unwrap();
    file.set_len(50 * 1024 * 1024).unwrap();
    std::fs::write(dir.path().join("small.json"), "{}").unwrap();
    let registry = Registry::new();
    let loader = Loader::new(
        registry.clone(),
        Arc::new(forgesyte_deps::DependencyChecker::system(Vec::new())),
        LoaderConfig::default(),
    );
    let report = loader.load_all(dir.path());
    assert_eq!(report.plugins.len(), 1);
    let status = registry.get_status("huge").unwrap();
    assert_eq!(status.state, S::Failed);
    let reason = status.reason.unwrap();
    assert!(
        reason.starts_with("ManifestError: manifest ")
            && reason.contains("is 52428800 bytes, larger than the 1048576-byte limit"),
        "{reason}"
    );
}

/// What is not a regular file where a manifest or a library is expected
/// (a FIFO, whose open waited for a writer and hung the pass; a link to
/// `/dev/zero`, read without end by the change stamp) fails its plugin,
/// and the pass, and a rescan, end.
#[test]
fn a_fifo_or_a_device_for_a_manifest_or_a_library_fails_its_plugin_and_nothing_waits() {
    fn fifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    for name in ["fifo", "zero", "fifolib"] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
    }
    fifo(&dir.path().join("fifo").join("manifest.json"));
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero").join("manifest.json")).unwrap();
    std::fs::write(
        dir.path().join("fifolib").join("manifest.json"),
        manifest("fifolib", json!({"entrypoint": "libfifo.so"})),
    )
    .unwrap();
    fifo(&dir.path().join("fifolib").join("libfifo.so"));
    let registry = Registry::new();
    let loader = Arc::new(Loader::new(
        registry.clone(),
        Arc::new(forgesyte_deps::DependencyChecker::system(Vec::new())),
        LoaderConfig::default(),
    ));
    let (done, ended) = std::sync::mpsc::channel();
    {
        let (loader, root) = (Arc::clone(&loader), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let loaded = loader.load_all(&root).plugins.len();
            let rescanned = loader.rescan().plugins().plugins.len();
            let _ = done.send((loaded, rescanned));
        });
    }
    let (loaded, rescanned) = ended
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the load pass or the rescan hung");
    assert_eq!((loaded, rescanned), (3, 3));
    // (`/dev/zero` is refused as a link out of the plugin directory by the
    // load, and as no regular file by the rescan's change stamp, which
    // read it without end.)
    for (name, why) in [
        ("fifo", "not a regular file"),
        ("zero", "links out of the plugin directory"),
    ] {
        let status = registry.get_status(name).unwrap();
        assert_eq!(status.state, S::Failed, "{name}");
        let reason = status.reason.unwrap_or_default();
        assert!(reason.contains(why), "{name}: {reason}");
    }
    let status = registry.get_status("fifolib").unwrap();
    assert_eq!(status.state, S::Failed);
    // Named, and said to be no regular file (it read "library not found").
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("libfifo.so") && reason.contains("not a regular file"),
        "{reason}"
    );
}

/// A manifest linked out of its plugin's directory is not read (the
/// server would read, and serve as the plugin's manifest, any JSON file it
/// can); one linked inside it is.
#[test]
fn a_manifest_linked_out_of_its_directory_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("config.json");
    std::fs::write(&secret, r#"{"name": "leak", "token": "s3cret"}"#).unwrap();
    for name in ["leak", "inner"] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
    }
    std::os::unix::fs::symlink(&secret, dir.path().join("leak").join("manifest.json")).unwrap();
    std::fs::write(
        dir.path().join("inner").join("real.json"),
        manifest("inner", json!({})),
    )
    .unwrap();
    std::os::unix::fs::symlink("real.json", dir.path().join("inner").join("manifest.json"))
        .unwrap();
    // Links that lead nowhere: not "out of the directory", but what they are.
    for (name, target) in [("dangling", "nowhere.json"), ("looping", "manifest.json")] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        std::os::unix::fs::symlink(target, dir.path().join(name).join("manifest.json")).unwrap();
    }
    let registry = Registry::new();
    let loader = Loader::new(
        registry.clone(),
        Arc::new(forgesyte_deps::DependencyChecker::system(Vec::new())),
        LoaderConfig::default(),
    );
    loader.load_all(dir.path());
    for (name, why) in [
        ("dangling", "No such file or directory"),
        ("looping", "Too many levels of symbolic links"),
    ] {
        let status = registry.get_status(name).unwrap();
        assert_eq!(status.state, S::Failed, "{name}");
        let reason = status.reason.unwrap_or_default();
        assert!(
            reason.contains("a link that cannot be followed") && reason.contains(why),
            "{name}: {reason}"
        );
    }
    let status = registry.get_status("leak").unwrap();
    assert_eq!(status.state, S::Failed);
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("links out of the plugin directory"),
        "{reason}"
    );
    assert!(
        !reason.contains("config.json"),
        "the target is named: {reason}"
    );
    let served = loader
        .manifest("leak")
        .map(|m| m.to_string())
        .unwrap_or_default();
    assert!(!served.contains("s3cret"), "{served}");
    let inner = registry
        .get_status("inner")
        .unwrap()
        .reason
        .unwrap_or_default();
    assert!(!inner.contains("links out"), "{inner}");
    assert!(loader.manifest("inner").is_some());
}

#[test]
fn symlinked_library_outside_the_plugin_dir_is_rejected() {
    let s = Setup::new();
    s.world
        .fs
        .add_file(
            "/plugins/sneaky/manifest.json",
            manifest("sneaky", json!({})),
        )
        .add_file("/elsewhere/lib.so", "ELF")
        .add_symlink("/plugins/sneaky/lib.so", "/elsewhere/lib.so");
    s.importer.set("/plugins/sneaky/lib.so", FakeBehavior::Good);
    s.load();
    s.check(
        "sneaky",
        S::Failed,
        &["points outside", "/elsewhere/lib.so"],
    );
}

#[test]
fn bare_library_names_are_found_on_the_lib_path() {
    let s = Setup::new();
    s.world
        .fs
        .add_file(
            "/plugins/ocr/manifest.json",
            r#"{"name": "ocr", "entrypoint": "libocr.so"}"#,
        )
        .add_file("/build/libocr.so", "ELF");
    s.importer.set("/build/libocr.so", FakeBehavior::Good);
    let loader = s.loader_with(LoaderConfig {
        lib_paths: vec!["/build".into()],
        ..LoaderConfig::default()
    });
    loader.load_all("/plugins".as_ref());
    s.check("ocr", S::Initialized, &[]);
}

/// A bare library name found nowhere: the reason names the plugin's
/// directory and every `--lib-path` directory looked in, marking one that
/// does not exist.
#[test]
fn a_library_found_nowhere_names_where_it_was_looked_for() {
    let s = Setup::new();
    s.world.fs.add_file(
        "/plugins/ocr/manifest.json",
        r#"{"name": "ocr", "entrypoint": "libocr.so"}"#,
    );
    s.world.fs.add_dir("/build");
    let loader = s.loader_with(LoaderConfig {
        lib_paths: vec!["/build".into(), "/nowhere".into()],
        ..LoaderConfig::default()
    });
    loader.load_all("/plugins".as_ref());
    s.check(
        "ocr",
        S::Failed,
        &[
            "ImportError: library not found: /plugins/ocr/libocr.so",
            "nor in the --lib-path directories /build, /nowhere (missing)",
        ],
    );
    // No --lib-path at all: said, with how a library built elsewhere is
    // found.
    let s = Setup::new();
    s.world.fs.add_file(
        "/plugins/ocr/manifest.json",
        r#"{"name": "ocr", "entrypoint": "libocr.so"}"#,
    );
    let loader = s.loader_with(LoaderConfig::default());
    loader.load_all("/plugins".as_ref());
    s.check(
        "ocr",
        S::Failed,
        &[
            "ImportError: library not found: /plugins/ocr/libocr.so, and no --lib-path was given",
            "is found with --lib-path DIR",
        ],
    );
    // One bare word with a Python file of that name beside it: the
    // reason says what the manifest of a Python plugin says (it was only
    // "library not found: …/main").
    let s = Setup::new();
    s.world
        .fs
        .add_file(
            "/plugins/py/manifest.json",
            r#"{"name": "py", "entrypoint": "main"}"#,
        )
        .add_file("/plugins/py/main.py", "class Plugin: pass\n");
    let loader = s.loader_with(LoaderConfig::default());
    loader.load_all("/plugins".as_ref());
    s.check(
        "py",
        S::Failed,
        &[
            "ImportError: library not found: /plugins/py/main",
            "main.py is there: a Python plugin's manifest names its file (\"entrypoint\": \"main.py\") or says \"runtime\": \"python\"",
        ],
    );
    // A manifest naming neither a runtime nor an entrypoint, beside no
    // plugin.py: the seed's layout with its code missing gets the seed's
    // reason first (it was only the library's), then the library's; its
    // bare dependency (a Python package to the seed) is not read as a
    // missing library first (it was UNAVAILABLE over `lib:numpy`).
    let s = Setup::new();
    s.world.fs.add_file(
        "/plugins/seedling/manifest.json",
        r#"{"name": "seedling", "version": "1.0.0", "dependencies": ["numpy"]}"#,
    );
    let loader = s.loader_with(LoaderConfig::default());
    loader.load_all("/plugins".as_ref());
    s.check(
        "seedling",
        S::Failed,
        &[
            "ImportError: ImportError: plugin.py not found in /plugins/seedling (nor a native \
             plugin's library not found: /plugins/seedling/libseedling.so, and no --lib-path was \
             given",
        ],
    );
}

/// A refused manifest's plugin shows the version its text gives (a
/// number's text too), else "unknown", as a valid one does (SPEC §3): it
/// showed `null`.
#[test]
fn a_refused_manifest_shows_its_version_or_unknown() {
    let s = Setup::new();
    for (name, version) in [
        ("none", json!(null)),
        ("text", json!("1.2")),
        ("number", json!(2)),
    ] {
        s.world.fs.add_file(
            format!("/plugins/{name}/manifest.json"),
            json!({"name": name, "version": version, "isolation": "vm"}).to_string(),
        );
    }
    let loader = s.loader_with(LoaderConfig::default());
    loader.load_all("/plugins".as_ref());
    for (name, shown) in [("none", "unknown"), ("text", "1.2"), ("number", "2")] {
        s.check(name, S::Failed, &["ManifestError: "]);
        let status = s.registry.get_status(name).unwrap();
        assert_eq!(status.version.as_deref(), Some(shown), "{name}");
    }
}

#[test]
fn discovery_is_sorted_and_skips_dirs_without_manifest() {
    let s = Setup::new();
    s.plugin("b", &manifest("b", json!({})), FakeBehavior::Good)
        .plugin("a", &manifest("a", json!({})), FakeBehavior::Good);
    s.world
        .fs
        .add_dir("/plugins/not-a-plugin")
        .add_file("/plugins/stray.txt", "x");
    let loader = s.loader();
    let dirs = loader.discover("/plugins".as_ref());
    assert_eq!(
        dirs,
        vec![std::path::PathBuf::from("/plugins/a"), "/plugins/b".into()]
    );
    let report = loader.load_all("/plugins".as_ref());
    let names: Vec<_> = report.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    // A full pass reads every subdirectory's manifest and leaves out those
    // without one: nothing of them registered or stamped for a rescan.
    assert_eq!(s.registry.len(), 2);
    assert!(s.registry.get_status("not-a-plugin").is_none());
    let rescan = loader.rescan();
    assert!(
        rescan.added.is_empty() && rescan.changed.is_empty() && rescan.removed.is_empty(),
        "{rescan:?}"
    );
    // Once it has a manifest it is a plugin like any other.
    s.plugin(
        "not-a-plugin",
        &manifest("late", json!({})),
        FakeBehavior::Good,
    );
    let rescan = loader.rescan();
    let added: Vec<_> = rescan.added.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(added, ["late"], "{rescan:?}");
    s.check("late", S::Initialized, &[]);
}

#[test]
fn missing_plugins_dir_is_an_empty_report() {
    let s = Setup::new();
    let report = s.loader().load_all("/does/not/exist".as_ref());
    assert!(report.plugins.is_empty());
    assert!(s.registry.is_empty());
}

#[test]
fn duplicate_names_never_overwrite() {
    let s = Setup::new();
    s.plugin(
        "dup_a",
        &manifest("duplicate", json!({})),
        FakeBehavior::Good,
    )
    .plugin(
        "dup_b",
        &manifest("duplicate", json!({"version": "9.9.9"})),
        FakeBehavior::Good,
    );
    let loader = s.load();
    s.check("duplicate", S::Initialized, &[]);
    assert_eq!(
        s.registry
            .get_status("duplicate")
            .unwrap()
            .version
            .as_deref(),
        Some("1.2.3")
    );
    s.check(
        "dup_b",
        S::Failed,
        &["duplicate plugin name 'duplicate'", "/plugins/dup_a"],
    );
    assert_eq!(
        loader.plugin_dir("duplicate").unwrap(),
        std::path::PathBuf::from("/plugins/dup_a")
    );
}

/// A duplicate's fallback key is never a name another valid manifest of
/// the pass asks for: `ocr`'s directory holds a second `dup`, and
/// `victim`'s manifest asks for `ocr`, later in the pass.
#[test]
fn a_duplicate_never_takes_a_name_a_later_plugin_asks_for() {
    let s = Setup::new();
    s.plugin("a1", &manifest("dup", json!({})), FakeBehavior::Good)
        .plugin("ocr", &manifest("dup", json!({})), FakeBehavior::Good)
        .plugin("victim", &manifest("ocr", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("ocr", S::Initialized, &[]);
    assert_eq!(
        loader.plugin_dir("ocr").unwrap(),
        std::path::PathBuf::from("/plugins/victim")
    );
    s.check(
        "ocr~duplicate",
        S::Failed,
        &["duplicate plugin name 'dup'", "/plugins/a1"],
    );
}

/// A broken manifest that claims a valid plugin's name does not take it,
/// whatever the order of their directories: the valid plugin loads under
/// its name, and the broken one is FAILED under its directory's name with
/// its own error (not as a duplicate).
#[test]
fn a_broken_manifest_never_takes_a_valid_plugins_name() {
    let s = Setup::new();
    s.plugin(
        "a_broken",
        r#"{"name": "target", "version": []}"#,
        FakeBehavior::Good,
    )
    .plugin(
        "b_target",
        &manifest("target", json!({})),
        FakeBehavior::Good,
    )
    .plugin(
        "c_broken",
        r#"{"name": "target", "version": {}}"#,
        FakeBehavior::Good,
    );
    s.load();
    s.check("target", S::Initialized, &[]);
    for broken in ["a_broken", "c_broken"] {
        s.check(
            broken,
            S::Failed,
            &["ManifestError", "invalid field 'version'"],
        );
    }
}

#[test]
fn missing_dependencies_are_all_named() {
    let s = Setup::new();
    s.plugin(
        "needy",
        &manifest(
            "needy",
            json!({
                "dependencies": ["lib:definitely_missing_xyz", "bin:sh", "env:API_KEY"],
                "requires_gpu": true,
                "models": {"weights": "weights/model.bin"}
            }),
        ),
        FakeBehavior::Good,
    );
    s.world.executables.add("sh");
    s.load();
    s.check(
        "needy",
        S::Unavailable,
        &[
            "Missing dependencies: lib:definitely_missing_xyz, env:API_KEY, gpu",
            "weights (path: /plugins/needy/weights/model.bin)",
            "GPU",
            "CUDA",
        ],
    );
}

/// A missing item whose name holds "; " (the separator of the GPU detail)
/// is named once, and the GPU detail still follows the list.
#[test]
fn an_item_named_with_a_semicolon_is_named_once() {
    let s = Setup::new();
    s.plugin(
        "odd",
        &manifest(
            "odd",
            json!({"requires_gpu": true, "models": {"det; v2": "m.onnx"}}),
        ),
        FakeBehavior::Good,
    );
    s.load();
    let reason = s.registry.get_status("odd").unwrap().reason.unwrap();
    assert_eq!(reason.matches("det; v2").count(), 1, "{reason}");
    assert_eq!(reason.matches("(path: ").count(), 1, "{reason}");
    assert!(
        reason.contains("GPU") && reason.contains("CUDA"),
        "{reason}"
    );
}

#[test]
fn plugin_dependencies_load_in_order_and_name_the_chain() {
    let s = Setup::new();
    // Directory order is the reverse of dependency order.
    s.plugin(
        "a_top",
        &manifest("top", json!({"dependencies": ["plugin:mid@^1"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "b_mid",
        &manifest("mid", json!({"dependencies": ["plugin:base"]})),
        FakeBehavior::Good,
    )
    .plugin("c_base", &manifest("base", json!({})), FakeBehavior::Good)
    .plugin(
        "d_old",
        &manifest("old", json!({"dependencies": ["plugin:base@^2"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "e_broken",
        &manifest("broken", json!({})),
        FakeBehavior::WrongAbi,
    )
    .plugin(
        "f_user",
        &manifest("user", json!({"dependencies": ["plugin:broken"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "g_x",
        &manifest("x", json!({"dependencies": ["plugin:base", "plugin:y"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "h_y",
        &manifest("y", json!({"dependencies": ["plugin:x"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "i_behind",
        &manifest("behind", json!({"dependencies": ["plugin:x"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "j_ghost",
        &manifest("ghostly", json!({"dependencies": ["plugin:ghost"]})),
        FakeBehavior::Good,
    );
    s.load();
    s.check("base", S::Initialized, &[]);
    s.check("mid", S::Initialized, &[]);
    s.check("top", S::Initialized, &[]);
    s.check("old", S::Unavailable, &["plugin:base@^2", "1.2.3"]);
    s.check(
        "user",
        S::Unavailable,
        &["plugin:broken (broken is FAILED: ImportError"],
    );
    // The dependency on the cycle is named, not the first (loaded) one.
    s.check(
        "x",
        S::Unavailable,
        &["plugin:y (dependency cycle: x -> y -> x)"],
    );
    s.check("y", S::Unavailable, &["dependency cycle", "y -> x -> y"]);
    s.check(
        "behind",
        S::Unavailable,
        &["plugin:x (dependency cycle: behind -> [x -> y -> x])"],
    );
    s.check(
        "ghostly",
        S::Unavailable,
        &["Missing dependencies: plugin:ghost"],
    );
}

/// A plugin in a dependency cycle names everything else it misses too
/// (the cycle alone hid a missing library and another missing plugin),
/// and a plugin that needs itself is a cycle of one.
#[test]
fn a_cycle_does_not_hide_the_other_missing_dependencies() {
    let s = Setup::new();
    s.plugin(
        "a_x",
        &manifest(
            "x",
            json!({"dependencies": ["plugin:y", "lib:nothere_zz", "plugin:ghost"]}),
        ),
        FakeBehavior::Good,
    )
    .plugin(
        "b_y",
        &manifest("y", json!({"dependencies": ["plugin:x"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "c_v",
        &manifest("v", json!({"dependencies": ["lib:nothere_zz", "plugin:v"]})),
        FakeBehavior::Good,
    );
    s.load();
    s.check(
        "x",
        S::Unavailable,
        &[
            "Missing dependencies: plugin:y (dependency cycle: x -> y -> x), lib:nothere_zz, \
           plugin:ghost",
        ],
    );
    s.check(
        "v",
        S::Unavailable,
        &["Missing dependencies: lib:nothere_zz, plugin:v (dependency cycle: v -> v)"],
    );
}

/// A plugin waiting for its dependencies' wave (a slow constructor in
/// it) says so while LOADED: it read `null`, whatever had happened to its
/// dependency already.
#[test]
fn a_plugin_waiting_for_its_dependencies_says_so() {
    let s = Setup::new();
    s.plugin(
        "base",
        &manifest("base", json!({})),
        FakeBehavior::InitSlow(Duration::from_millis(600)),
    )
    .plugin(
        "app",
        &manifest("app", json!({"dependencies": ["plugin:base"]})),
        FakeBehavior::Good,
    );
    let seen = std::thread::scope(|scope| {
        let loading = scope.spawn(|| s.load());
        let mut seen = None;
        while !loading.is_finished() {
            if let Some(status) = s.registry.get_status("app")
                && status.state == S::Loaded
                && status.reason.is_some()
            {
                seen = status.reason;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = loading.join();
        seen
    });
    assert_eq!(
        seen.as_deref(),
        Some("waiting for its dependencies to be loaded first: plugin:base")
    );
    s.check("app", S::Initialized, &[]);
    assert_eq!(s.registry.get_status("app").unwrap().reason, None);
}

/// A `plugin:` dependency that names no plugin says what may have been
/// meant: the name in other letters, or the plugin a directory of that
/// name holds.
#[test]
fn a_missing_plugin_dependency_says_what_may_have_been_meant() {
    let s = Setup::new();
    s.plugin("base", &manifest("base", json!({})), FakeBehavior::Good)
        .plugin("zeta", &manifest("beta", json!({})), FakeBehavior::Good)
        .plugin(
            "user",
            &manifest(
                "user",
                json!({"dependencies": ["plugin:BASE@^1", "plugin:zeta", "plugin:ghost"]}),
            ),
            FakeBehavior::Good,
        );
    s.load();
    s.check(
        "user",
        S::Unavailable,
        &[
            "plugin:BASE@^1 (no plugin is named so: did you mean 'base'?)",
            "plugin:zeta (no plugin is named so; the plugin directory zeta holds plugin 'beta')",
            "plugin:ghost",
        ],
    );
    let reason = s.registry.get_status("user").unwrap().reason.unwrap();
    assert!(reason.ends_with("plugin:ghost"), "{reason}");
}

/// A plugin on two cycles names each with its own, its requirement kept:
/// one was named, the other quoted as `LOADED: no reason recorded` (it
/// was not judged yet).
#[test]
fn a_plugin_on_two_cycles_names_both() {
    let s = Setup::new();
    s.plugin(
        "u1",
        &manifest("u1", json!({"dependencies": ["plugin:u2", "plugin:u3@^1"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "u2",
        &manifest("u2", json!({"dependencies": ["plugin:u1"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "u3",
        &manifest("u3", json!({"dependencies": ["plugin:u1"]})),
        FakeBehavior::Good,
    );
    s.load();
    s.check(
        "u1",
        S::Unavailable,
        &[
            "Missing dependencies: plugin:u2 (dependency cycle: u1 -> u2 -> u1), \
             plugin:u3@^1 (dependency cycle: u1 -> u3 -> u1)",
        ],
    );
    s.check(
        "u3",
        S::Unavailable,
        &["plugin:u1 (dependency cycle: u3 -> u1 -> u3)"],
    );
    let reason = s.registry.get_status("u1").unwrap().reason.unwrap();
    assert!(!reason.contains("LOADED"), "{reason}");
}

/// A dependent quotes its dependency's reason shortened: in a diamond of
/// dependencies (each layer needs both plugins of the layer below) whole
/// reasons doubled at every layer, to megabytes at 18 layers.
#[test]
fn reasons_quoted_down_a_diamond_of_dependencies_stay_short() {
    let s = Setup::new();
    const LAYERS: usize = 16;
    for layer in 0..LAYERS {
        for side in ["a", "b"] {
            let deps = if layer == 0 {
                json!(["plugin:nothere"])
            } else {
                json!([
                    format!("plugin:l{}a", layer - 1),
                    format!("plugin:l{}b", layer - 1)
                ])
            };
            let name = format!("l{layer}{side}");
            s.plugin(
                &format!("d{layer:02}{side}"),
                &manifest(&name, json!({ "dependencies": deps })),
                FakeBehavior::Good,
            );
        }
    }
    s.load();
    let top = format!("l{}a", LAYERS - 1);
    s.check(
        &top,
        S::Unavailable,
        &["plugin:l14a (l14a is UNAVAILABLE: "],
    );
    let reason = s.registry.get_status(&top).unwrap().reason.unwrap();
    assert!(reason.len() < 1_000, "{} bytes: {reason}", reason.len());
    s.check("l1a", S::Unavailable, &["plugin:nothere"]);
}

#[test]
fn load_from_path_loads_one_directory() {
    let s = Setup::new();
    s.plugin("one", &manifest("one", json!({})), FakeBehavior::Good);
    let outcome = s.loader().load_from_path("/plugins/one".as_ref());
    assert_eq!(outcome.name, "one");
    assert_eq!(outcome.state, S::Initialized);
    let missing = s.loader().load_from_path("/plugins/none".as_ref());
    assert_eq!(missing.state, S::Failed);
}

/// A native plugin's `py:` dependency names the interpreter it was to be
/// asked of when there is none (the fake file system has no `python3`).
#[test]
fn a_native_plugins_py_dependency_names_the_missing_interpreter() {
    let s = Setup::new();
    s.plugin(
        "native_py",
        &manifest("native-py", json!({"dependencies": ["py:numpy"]})),
        FakeBehavior::Good,
    );
    let loader = s.loader_with(LoaderConfig {
        python: Some("/nonexistent/py".into()),
        ..LoaderConfig::default()
    });
    loader.load_all("/plugins".as_ref());
    s.check(
        "native-py",
        S::Unavailable,
        &["Missing dependencies: py:numpy (python interpreter /nonexistent/py)"],
    );
}

/// On a host that runs no GPU plugins, a plugin that requires a GPU does
/// not count for readiness, nor does one that needs such a plugin through
/// its `plugin:` dependencies (directly or through another); any other
/// plugin that is not available still counts.
#[test]
fn no_gpu_leaves_gpu_plugins_and_their_dependents_out_of_readiness() {
    for no_gpu in [true, false] {
        let s = Setup::new();
        s.plugin(
            "a_gpu",
            &manifest("gpu", json!({"requires_gpu": {"min_memory_mb": 1024}})),
            FakeBehavior::Good,
        )
        .plugin(
            "b_uses",
            &manifest("uses", json!({"dependencies": ["plugin:gpu@^1"]})),
            FakeBehavior::Good,
        )
        .plugin(
            "c_far",
            &manifest("far", json!({"dependencies": ["plugin:uses"]})),
            FakeBehavior::Good,
        )
        .plugin(
            "d_other",
            &manifest(
                "other",
                json!({"dependencies": ["lib:definitely_missing_xyz"]}),
            ),
            FakeBehavior::Good,
        );
        let loader = s.loader_with(LoaderConfig {
            no_gpu,
            ..LoaderConfig::default()
        });
        loader.load_all("/plugins".as_ref());
        for name in ["gpu", "uses", "far"] {
            s.check(name, S::Unavailable, &[]);
            assert_eq!(loader.is_optional(name), no_gpu, "{name}, no_gpu {no_gpu}");
        }
        s.check("other", S::Unavailable, &["definitely_missing_xyz"]);
        assert!(!loader.is_optional("other"));
    }
}

/// A plugin whose manifest has no version (shown as the seed's
/// "unknown") satisfies `plugin:NAME@*` and is said to have no version by
/// any other requirement.
#[test]
fn a_plugin_without_a_version_satisfies_only_the_star_requirement() {
    let s = Setup::new();
    s.plugin(
        "a_bare",
        &manifest("bare", json!({"version": null})),
        FakeBehavior::Good,
    )
    .plugin(
        "b_any",
        &manifest("any", json!({"dependencies": ["plugin:bare@*"]})),
        FakeBehavior::Good,
    )
    .plugin(
        "c_some",
        &manifest("some", json!({"dependencies": ["plugin:bare@>=0.0.0"]})),
        FakeBehavior::Good,
    );
    s.load();
    s.check("bare", S::Initialized, &[]);
    s.check("any", S::Initialized, &[]);
    s.check(
        "some",
        S::Unavailable,
        &["plugin:bare@>=0.0.0 (it has no version)"],
    );
}

#[test]
fn manifest_is_kept_with_unknown_fields() {
    let s = Setup::new();
    s.plugin(
        "m",
        &manifest("m", json!({"colour": "blue"})),
        FakeBehavior::Good,
    );
    s.world.fs.add_file(
        "/plugins/bad/manifest.json",
        r#"{"name": "bad", "version": 5, "isolation": 3}"#,
    );
    let loader = s.load();
    assert_eq!(loader.manifest("m").unwrap()["colour"], "blue");
    // A manifest that parses as JSON but fails validation is still served.
    assert_eq!(loader.manifest("bad").unwrap()["isolation"], 3);
    s.check("bad", S::Failed, &["isolation"]);
}

// ------------------------------------------------------------------- panics

/// An importer that panics while opening one library and hands every other
/// path to the fake importer.
#[derive(Debug)]
struct PanickingImporter {
    inner: Arc<FakeImporter>,
    panics_on: PathBuf,
}

impl Importer for PanickingImporter {
    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        if path == self.panics_on {
            panic!("importer blew up on {}", path.display());
        }
        self.inner.open(path)
    }
}

/// An importer that records the thread of every open and hands it to the
/// fake importer.
#[derive(Debug)]
struct ThreadRecordingImporter {
    inner: Arc<FakeImporter>,
    threads: parking_lot::Mutex<Vec<std::thread::ThreadId>>,
}

impl Importer for ThreadRecordingImporter {
    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        self.threads.lock().push(std::thread::current().id());
        self.inner.open(path)
    }
}

#[test]
fn in_process_libraries_are_opened_on_the_passes_own_thread_one_at_a_time() {
    for threads in [1, 2, 4] {
        let s = Setup::new();
        for i in 0..24 {
            let name = format!("p{i:02}");
            // Half pinned: their checked bytes wait for the opening thread.
            let pin = if i % 2 == 0 {
                json!({"sha256": ELF_SHA256})
            } else {
                json!({})
            };
            s.plugin(&name, &manifest(&name, pin), FakeBehavior::Good);
        }
        let importer = Arc::new(ThreadRecordingImporter {
            inner: s.importer.clone(),
            threads: parking_lot::Mutex::new(Vec::new()),
        });
        let loader = Loader::with_seams(
            s.registry.clone(),
            Arc::new(s.world.checker()),
            Arc::new(s.world.fs.clone()),
            importer.clone(),
            LoaderConfig {
                threads,
                ..LoaderConfig::default()
            },
        );
        let report = loader.load_all("/plugins".as_ref());
        assert_eq!(report.loaded(), 24, "threads {threads}: {report:?}");
        let opened = importer.threads.lock().clone();
        assert_eq!(opened.len(), 24, "threads {threads}");
        assert!(
            opened.iter().all(|t| *t == std::thread::current().id()),
            "threads {threads}: every open on the thread that runs the pass: {opened:?}"
        );
    }
}

/// A filesystem that panics while reading one file and hands everything
/// else to the fake filesystem.
#[derive(Debug)]
struct PanickingFs {
    inner: FakeFs,
    panics_on: PathBuf,
}

impl FileSystem for PanickingFs {
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn metadata(&self, path: &Path) -> std::io::Result<FsMetadata> {
        self.inner.metadata(path)
    }
    fn read(&self, path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
        if path == self.panics_on {
            panic!("filesystem blew up on {}", path.display());
        }
        self.inner.read(path, limit)
    }
    fn read_dir(&self, path: &Path) -> std::io::Result<Vec<DirEntry>> {
        self.inner.read_dir(path)
    }
    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf> {
        self.inner.canonicalize(path)
    }
}

/// Six plugins of different fates; `c_boom`'s library panics the importer
/// when the seams of [`mixed_fates_loader`] are used.
fn mixed_fates() -> Setup {
    let s = Setup::new();
    s.plugin("a_good", &manifest("a_good", json!({})), FakeBehavior::Good)
        .plugin(
            "b_initerr",
            &manifest("b_initerr", json!({})),
            FakeBehavior::InitError("b broke".into()),
        )
        .plugin("c_boom", &manifest("c_boom", json!({})), FakeBehavior::Good)
        .plugin("d_good", &manifest("d_good", json!({})), FakeBehavior::Good)
        .plugin(
            "e_abi",
            &manifest("e_abi", json!({})),
            FakeBehavior::WrongAbi,
        )
        .plugin("f_good", &manifest("f_good", json!({})), FakeBehavior::Good)
        .plugin(
            "g_user",
            &manifest("g_user", json!({"dependencies": ["plugin:c_boom"]})),
            FakeBehavior::Good,
        );
    s
}

/// Checks the fates of [`mixed_fates`] except `c_boom`'s.
fn check_mixed_fates(s: &Setup, loader: &Loader, threads: usize) {
    for good in ["a_good", "d_good", "f_good"] {
        s.check(good, S::Initialized, &[]);
        let handle = loader
            .handle(good)
            .unwrap_or_else(|| panic!("threads {threads}: no handle for {good}"));
        assert_eq!(handle.name(), good);
        assert_eq!(handle.call("echo", &json!({})).unwrap(), json!({}));
    }
    s.check("b_initerr", S::Failed, &["InitError: b broke"]);
    s.check(
        "e_abi",
        S::Failed,
        &["ImportError: ", "ABI version mismatch"],
    );
    assert!(loader.handle("b_initerr").is_none());
}

#[test]
fn a_panic_while_instantiating_fails_exactly_that_plugin() {
    for threads in [1, 2, 3, 8] {
        let s = mixed_fates();
        let importer = Arc::new(PanickingImporter {
            inner: s.importer.clone(),
            panics_on: PathBuf::from("/plugins/c_boom/lib.so"),
        });
        let loader = Loader::with_seams(
            s.registry.clone(),
            Arc::new(s.world.checker()),
            Arc::new(s.world.fs.clone()),
            importer,
            LoaderConfig {
                threads,
                ..LoaderConfig::default()
            },
        );
        let report = loader.load_all("/plugins".as_ref());
        s.check(
            "c_boom",
            S::Failed,
            &["importer blew up on /plugins/c_boom/lib.so"],
        );
        assert!(loader.handle("c_boom").is_none(), "threads {threads}");
        check_mixed_fates(&s, &loader, threads);
        s.check(
            "g_user",
            S::Unavailable,
            &["plugin:c_boom (c_boom is FAILED"],
        );
        // The report says the same as the registry, plugin by plugin.
        assert_eq!(report.plugins.len(), 7, "threads {threads}");
        for p in &report.plugins {
            let status = s.registry.get_status(&p.name).unwrap();
            assert_eq!((p.state, &p.reason), (status.state, &status.reason));
        }
        assert_eq!(
            (report.loaded(), report.failed()),
            (3, 3),
            "threads {threads}"
        );
    }
}

#[test]
fn a_panic_while_reading_a_manifest_fails_exactly_that_plugin() {
    for threads in [1, 2, 3, 8] {
        let s = mixed_fates();
        let fs = Arc::new(PanickingFs {
            inner: s.world.fs.clone(),
            panics_on: PathBuf::from("/plugins/c_boom/manifest.json"),
        });
        let loader = Loader::with_seams(
            s.registry.clone(),
            Arc::new(s.world.checker()),
            fs,
            s.importer.clone(),
            LoaderConfig {
                threads,
                ..LoaderConfig::default()
            },
        );
        let report = loader.load_all("/plugins".as_ref());
        s.check(
            "c_boom",
            S::Failed,
            &[
                "ManifestError: ",
                "filesystem blew up on /plugins/c_boom/manifest.json",
            ],
        );
        check_mixed_fates(&s, &loader, threads);
        assert_eq!(report.plugins.len(), 7, "threads {threads}");
        assert_eq!(
            report
                .plugins
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            [
                "a_good",
                "b_initerr",
                "c_boom",
                "d_good",
                "e_abi",
                "f_good",
                "g_user"
            ]
        );
    }
}

// ---------------------------------------------------------------- properties

#[derive(Debug, Clone)]
enum Spec {
    Good(String),
    Broken(FakeBehavior, String),
    Garbage(Vec<u8>),
    NoManifest,
    DependsOn(String, String),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-d]{1,2}".prop_map(String::from),
        "[A-Za-z0-9][A-Za-z0-9._-]{0,8}",
        Just("../x".to_owned()),
        Just("é".to_owned()),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        name().prop_map(Spec::Good),
        (
            prop_oneof![
                Just(FakeBehavior::WrongAbi),
                Just(FakeBehavior::NoEntry),
                Just(FakeBehavior::InitError("e".into())),
                Just(FakeBehavior::InitPanic("p".into())),
            ],
            name()
        )
            .prop_map(|(b, n)| Spec::Broken(b, n)),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Spec::Garbage),
        Just(Spec::NoManifest),
        (name(), name()).prop_map(|(a, b)| Spec::DependsOn(a, b)),
    ]
}

fn build(specs: &[Spec]) -> (Setup, usize) {
    let s = Setup::new();
    let mut with_manifest = 0;
    for (i, spec) in specs.iter().enumerate() {
        let dir = format!("p{i:02}");
        match spec {
            Spec::Good(n) => {
                s.plugin(&dir, &manifest(n, json!({})), FakeBehavior::Good);
            }
            Spec::Broken(b, n) => {
                s.plugin(&dir, &manifest(n, json!({})), b.clone());
            }
            Spec::Garbage(bytes) => {
                s.world
                    .fs
                    .add_file(format!("/plugins/{dir}/manifest.json"), bytes.clone());
            }
            Spec::NoManifest => {
                s.world.fs.add_dir(format!("/plugins/{dir}"));
                continue;
            }
            Spec::DependsOn(n, d) => {
                s.plugin(
                    &dir,
                    &manifest(n, json!({"dependencies": [format!("plugin:{d}")]})),
                    FakeBehavior::Good,
                );
            }
        }
        with_manifest += 1;
    }
    (s, with_manifest)
}

type Outcome = BTreeMap<String, (S, Option<String>)>;

fn outcome(registry: &Registry) -> Outcome {
    registry
        .list_all()
        .into_iter()
        .map(|s| (s.name, (s.state, s.reason)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_manifest_gets_exactly_one_entry(specs in proptest::collection::vec(spec(), 0..12)) {
        let (s, with_manifest) = build(&specs);
        let loader = s.loader();
        let report = loader.load_all("/plugins".as_ref());
        prop_assert_eq!(report.plugins.len(), with_manifest);
        prop_assert_eq!(s.registry.len(), with_manifest);
        let registry = outcome(&s.registry);
        for p in &report.plugins {
            let (state, reason) = &registry[&p.name];
            prop_assert_eq!(*state, p.state);
            prop_assert_eq!(reason, &p.reason);
            // Nothing stays LOADED after a pass, and only available plugins lack a reason.
            prop_assert_ne!(p.state, S::Loaded);
            prop_assert_eq!(p.state.is_available(), p.reason.is_none());
            prop_assert_eq!(loader.handle(&p.name).is_some(), p.state.is_available());
        }

        // Loading the same tree into a fresh registry gives identical results.
        let again = Setup { registry: Registry::new(), ..s };
        again.loader().load_all("/plugins".as_ref());
        prop_assert_eq!(outcome(&again.registry), registry);
    }
}

/// Python plugins' packages cost one interpreter round trip per interpreter
/// per load pass, and a missing interpreter is named.
/// A Python plugin without its `plugin.py` is FAILED with the seed's
/// reason, its directory as the plugins directory was given, and no runner
/// is started to find that out (the runner named the absolute path).
#[test]
fn a_missing_plugin_py_is_named_without_starting_a_runner() {
    let s = Setup::new();
    s.world.fs.add_file("/opt/py/bin/python", "");
    s.world.fs.add_file(
        "/plugins/nofile/manifest.json",
        json!({"name": "nofile", "runtime": "python", "python": "/opt/py/bin/python"}).to_string(),
    );
    let _loader = s.load();
    let status = s.registry.get_status("nofile").unwrap();
    assert_eq!(status.state, S::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("ImportError: ImportError: plugin.py not found in /plugins/nofile")
    );
}

/// A Python plugin whose interpreter is missing names every other missing
/// item too (libraries, models): it named the interpreter alone, and the
/// rest one fix later. Its packages, which only the interpreter can be
/// asked of, are not named.
#[test]
fn a_missing_interpreter_is_named_with_everything_else_missing() {
    let s = Setup::new();
    s.world
        .fs
        .add_file(
            "/plugins/n/manifest.json",
            json!({
                "name": "n",
                "python": ".venv/bin/python",
                "dependencies": ["torch", "lib:nothere_zz"],
                "models": {"w": "w.bin"}
            })
            .to_string(),
        )
        .add_file("/plugins/n/plugin.py", "class Plugin: pass");
    let _loader = s.load();
    let reason = s.registry.get_status("n").unwrap().reason.unwrap();
    assert_eq!(
        reason,
        "Missing dependencies: python interpreter /plugins/n/.venv/bin/python, lib:nothere_zz, \
         w (path: /plugins/n/w.bin)"
    );
    assert_eq!(s.registry.get_state("n"), Some(S::Unavailable));
}

#[test]
fn python_packages_are_asked_once_per_interpreter_per_pass() {
    let s = Setup::new();
    s.world.fs.add_file("/opt/py/bin/python", "");
    s.world.fs.add_file("/opt/other/bin/python", "");
    s.world.python.add("/opt/py/bin/python", &["json"]);
    s.world.python.add("/opt/other/bin/python", &["json"]);
    for (dir, python, deps) in [
        ("a", "/opt/py/bin/python", json!(["torch", "json"])),
        ("b", "/opt/py/bin/python", json!(["numpy", "torch"])),
        ("c", "/opt/other/bin/python", json!(["cv2"])),
        ("d", "/nowhere/python", json!([])),
    ] {
        s.world
            .fs
            .add_file(
                format!("/plugins/{dir}/manifest.json"),
                json!({"name": dir, "python": python, "dependencies": deps}).to_string(),
            )
            .add_file(format!("/plugins/{dir}/plugin.py"), "class Plugin: pass");
    }
    let _loader = s.load();
    let reason = |name: &str| s.registry.get_status(name).unwrap().reason.unwrap();
    assert_eq!(reason("a"), "Missing dependencies: torch");
    assert_eq!(reason("b"), "Missing dependencies: numpy, torch");
    assert_eq!(reason("c"), "Missing dependencies: cv2");
    assert_eq!(
        reason("d"),
        "Missing dependencies: python interpreter /nowhere/python"
    );
    assert_eq!(s.world.python.calls(), 2, "{:?}", s.world.python.asked());
    for name in ["a", "b", "c", "d"] {
        assert_eq!(s.registry.get_state(name), Some(S::Unavailable));
    }
}

/// The SHA-256 of the fake library file's bytes, `ELF`.
const ELF_SHA256: &str = "706abe3c90152075e656b661079730facf323f3ebccda7547ee1935c90845a09";

#[test]
fn a_manifest_pin_is_checked_before_the_library_is_opened() {
    assert_eq!(forgesyte_loader::integrity::sha256_hex(b"ELF"), ELF_SHA256);
    let s = Setup::new();
    let wrong = "9b1c".repeat(16);
    s.plugin(
        "pinned",
        &manifest("pinned", json!({"sha256": ELF_SHA256.to_uppercase()})),
        FakeBehavior::Good,
    )
    // Opening it would fail with an InitError: the IntegrityError proves it
    // was never opened.
    .plugin(
        "tampered",
        &manifest("tampered", json!({"sha256": wrong})),
        FakeBehavior::InitPanic("the plugin ran".into()),
    )
    .plugin(
        "malformed",
        &manifest("malformed", json!({"sha256": "3f2a"})),
        FakeBehavior::Good,
    );
    s.load();
    s.check("pinned", S::Initialized, &[]);
    s.check(
        "tampered",
        S::Failed,
        &[&format!(
            "IntegrityError: sha256 of lib.so is {ELF_SHA256}, the manifest pins {wrong}"
        )],
    );
    s.check(
        "malformed",
        S::Failed,
        &["ManifestError: invalid field 'sha256'", "\"3f2a\""],
    );
}

#[test]
fn the_lock_file_pins_plugins_by_directory_and_both_pins_must_match() {
    let s = Setup::new();
    let other = "ab".repeat(32);
    s.plugin("a", &manifest("a", json!({})), FakeBehavior::Good)
        .plugin(
            "b",
            &manifest("b", json!({})),
            FakeBehavior::InitPanic("the plugin ran".into()),
        )
        .plugin(
            "c",
            &manifest("c", json!({"sha256": ELF_SHA256})),
            FakeBehavior::InitPanic("the plugin ran".into()),
        )
        .plugin(
            "unlisted",
            &manifest("unlisted", json!({})),
            FakeBehavior::Good,
        );
    let lock = json!({"version": 1, "plugins": {
        "a": {"sha256": ELF_SHA256, "of": "lib.so"},
        "b": {"sha256": other},
        "c": {"sha256": other},
    }});
    s.world
        .fs
        .add_file("/plugins/forgesyte.lock", lock.to_string());
    s.load();
    s.check("a", S::Initialized, &[]);
    s.check("unlisted", S::Initialized, &[]);
    let expected = format!(
        "IntegrityError: sha256 of lib.so is {ELF_SHA256}, the lock file /plugins/forgesyte.lock pins {other}"
    );
    s.check("b", S::Failed, &[&expected]);
    // The manifest's pin matches, the lock file's does not: refused.
    s.check("c", S::Failed, &[&expected]);
}

#[test]
fn an_invalid_lock_file_refuses_every_plugin_of_its_directory() {
    let s = Setup::new();
    s.plugin("a", &manifest("a", json!({})), FakeBehavior::Good);
    s.world.fs.add_file("/plugins/forgesyte.lock", "{not json");
    s.load();
    s.check(
        "a",
        S::Failed,
        &["IntegrityError: lock file /plugins/forgesyte.lock is invalid: "],
    );
}

/// At the host's stop, an in-process plugin whose destructor blocks (here
/// 5 s) holds the stop no longer than its time limit: destructors run on a
/// thread of their own, after every runner was asked to stop; they ran
/// inline, under the loader's map, one plugin after another.
#[test]
fn a_destructor_that_blocks_holds_the_stop_no_longer_than_its_limit() {
    let s = Setup::new();
    s.plugin(
        "slow",
        &manifest("slow", json!({})),
        FakeBehavior::DropSlow(std::time::Duration::from_secs(5)),
    )
    .plugin("quick", &manifest("quick", json!({})), FakeBehavior::Good);
    let loader = s.load();
    s.check("slow", S::Initialized, &[]);
    let started = std::time::Instant::now();
    let all = loader.drop_instances(std::time::Duration::from_millis(500));
    let took = started.elapsed();
    assert!(!all, "a destructor still running is not an end in time");
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
}

/// A reload of an in-process plugin whose destructor blocks (here 5 s)
/// waits for it no longer than [`DESTRUCTOR_WAIT`]: the
/// old instance is dropped on a thread of its own. It ran on the reload's
/// thread, and held the reload, every plugin after it and the next pass
/// for as long as it blocked.
///
/// [`DESTRUCTOR_WAIT`]: forgesyte_loader::DESTRUCTOR_WAIT
#[test]
fn a_destructor_that_blocks_holds_a_reload_no_longer_than_its_wait() {
    let s = Setup::new();
    s.plugin(
        "slow",
        &manifest("slow", json!({})),
        FakeBehavior::DropSlow(std::time::Duration::from_secs(5)),
    );
    let loader = s.load();
    // Failed by a fault: a reload replaces its instance.
    let handle = loader.handle("slow").unwrap();
    assert!(handle.call("panic", &json!({})).is_err());
    drop(handle);
    s.check("slow", S::Failed, &[]);
    let started = std::time::Instant::now();
    assert!(loader.reload("slow").is_some());
    let took = started.elapsed();
    assert!(
        took < forgesyte_loader::DESTRUCTOR_WAIT + std::time::Duration::from_secs(2),
        "{took:?}"
    );
    s.check("slow", S::Initialized, &[]);
    let new = loader.handle("slow").unwrap();
    assert_eq!(new.call("echo", &json!({"x": 1})).unwrap(), json!({"x": 1}));
    drop(new);
    // The new instance's destructor blocks too: left to its thread.
    loader.drop_instances(std::time::Duration::ZERO);
}

#[test]
fn each_library_opened_by_path_is_prepared_before_it_is_opened() {
    let s = Setup::new();
    s.plugin("a", &manifest("a", json!({})), FakeBehavior::Good)
        .plugin("b", &manifest("b", json!({})), FakeBehavior::Good)
        // Its checked bytes are loaded, not its file: nothing to prepare.
        .plugin(
            "pinned",
            &manifest("pinned", json!({"sha256": ELF_SHA256})),
            FakeBehavior::Good,
        )
        // Its dependency check fails: it is never opened, nor prepared.
        .plugin(
            "needs",
            &manifest("needs", json!({"dependencies": ["lib:nowhere"]})),
            FakeBehavior::Good,
        );
    s.load();
    s.check("needs", S::Unavailable, &["lib:nowhere"]);
    let log = s.importer.log();
    for name in ["a", "b"] {
        let lib = std::path::PathBuf::from(format!("/plugins/{name}/lib.so"));
        let at = |what: &str| log.iter().position(|(w, p)| *w == what && *p == lib);
        let (Some(prepared), Some(opened)) = (at("prepare"), at("open")) else {
            panic!("{name}: {log:?}");
        };
        assert!(prepared < opened, "{name}: {log:?}");
    }
    for name in ["pinned", "needs"] {
        let lib = std::path::PathBuf::from(format!("/plugins/{name}/lib.so"));
        assert!(
            !log.iter().any(|(w, p)| *w == "prepare" && *p == lib),
            "{name}: {log:?}"
        );
    }
}

/// A manifest broken in another field still says which version (and
/// description) is broken: both are shown with the FAILED plugin.
#[test]
fn a_broken_manifest_keeps_its_version_and_description() {
    let s = Setup::new();
    s.plugin(
        "broken",
        r#"{"name": "broken", "version": "2.3.1", "description": "the OCR", "isolation": "nowhere"}"#,
        FakeBehavior::Good,
    );
    let loader = s.load();
    s.check("broken", S::Failed, &["ManifestError", "isolation"]);
    let status = s.registry.get_status("broken").unwrap();
    assert_eq!(status.version.as_deref(), Some("2.3.1"));
    assert_eq!(status.description.as_deref(), Some("the OCR"));
    // Broken again, as a new version: a reload shows the new one.
    s.plugin(
        "broken",
        r#"{"name": "broken", "version": "3.0.0", "isolation": "elsewhere"}"#,
        FakeBehavior::Good,
    );
    loader.reload("broken").unwrap();
    let status = s.registry.get_status("broken").unwrap();
    assert_eq!(status.version.as_deref(), Some("3.0.0"));
    assert_eq!(status.description, None);
}
