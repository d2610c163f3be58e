//! Python plugins with the real `python3` and the host's Python runner: the
//! seed's GREEN checklist (import, init, GPU and package failures), calls
//! and tool errors, a fault zoo at construction and at call time, and the
//! runner conformance suite.
//!
//! Python 3 is on every machine this project builds on; a machine without
//! `python3` on `PATH` fails these tests with that reason (never a silent
//! pass).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_deps::DependencyChecker;
use forgesyte_deps::fake::FakeGpu;
use forgesyte_errors::ToolError;
use forgesyte_loader::{CallError, Loader, LoaderConfig, ProcessLimits, SupervisionPolicy};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use forgesyte_tests::conformance::{self, RunnerUnderTest};
use serde_json::{Value, json};

use crate::test_venv::venv_python;

/// `tests/fixtures/python` of the workspace.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/python")
}

/// Fails (never skips) when `python3` is missing (shared by every test of
/// Python plugins in this binary).
pub(crate) fn require_python() {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|dir| dir.join("python3").is_file());
    assert!(
        found,
        "python3 is not on PATH: these tests need a Python 3 interpreter"
    );
}

/// Copies fixture `name` into `root` as `as_name`.
fn copy_fixture(root: &Path, name: &str, as_name: &str) -> PathBuf {
    let from = fixtures().join(name);
    let to = root.join(as_name);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    to
}

/// Writes `manifest` (with `name` set) into `root/name/manifest.json`.
fn write_manifest(root: &Path, name: &str, mut manifest: Value) {
    manifest["name"] = json!(name);
    std::fs::write(root.join(name).join("manifest.json"), manifest.to_string()).unwrap();
}

fn loader(root: &Path, registry: &Registry) -> Loader {
    loader_with_python(root, registry, None)
}

/// [`loader`] with `python` as the operator's interpreter (`--python`).
fn loader_with_python(root: &Path, registry: &Registry, python: Option<PathBuf>) -> Loader {
    loader_with(root, registry, test_config(python))
}

/// A loader of `config` that has loaded every plugin under `root`.
fn loader_with(root: &Path, registry: &Registry, config: LoaderConfig) -> Loader {
    require_python();
    let checker = DependencyChecker::builder()
        .gpu(Arc::new(FakeGpu::none(
            "no GPU on this test machine (CUDA absent)",
        )))
        .build();
    let loader = Loader::new(registry.clone(), Arc::new(checker), config);
    loader.load_all(root);
    loader
}

/// The tests' limits and supervision, `python` the operator's interpreter.
fn test_config(python: Option<PathBuf>) -> LoaderConfig {
    LoaderConfig {
        process: ProcessLimits {
            init_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(5),
            memory_limit_mib: 0,
            max_response_bytes: 16 * 1024 * 1024,
        },
        supervision: SupervisionPolicy {
            max_restarts: 0,
            ..SupervisionPolicy::default()
        },
        python,
        ..LoaderConfig::default()
    }
}

fn check(registry: &Registry, name: &str, state: S, reason: Option<&str>) {
    let status = registry
        .get_status(name)
        .unwrap_or_else(|| panic!("{name} missing: {:#?}", registry.list_all()));
    assert_eq!(status.state, state, "{name}: {status:#?}");
    if let Some(reason) = reason {
        let got = status.reason.unwrap_or_default();
        assert!(got.contains(reason), "{name}: {got:?} lacks {reason:?}");
    }
}

fn call(loader: &Loader, name: &str, tool: &str, args: Value) -> Result<Value, CallError> {
    loader
        .handle(name)
        .unwrap_or_else(|| panic!("{name} has no handle"))
        .call(tool, &args)
}

#[test]
fn the_seeds_green_checklist_with_real_plugin_py_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in [
        "broken_plugin",
        "bad_init",
        "no_class",
        "missing_dep",
        "echo",
    ] {
        copy_fixture(root, name, name);
    }
    copy_fixture(root, "echo", "gpu_plugin");
    write_manifest(root, "gpu_plugin", json!({"requires_gpu": true}));
    copy_fixture(root, "echo", "one_missing");
    write_manifest(
        root,
        "one_missing",
        json!({"dependencies": ["forgesyte_missing_torch", "json"]}),
    );
    copy_fixture(root, "echo", "all_missing");
    write_manifest(
        root,
        "all_missing",
        json!({"dependencies": ["forgesyte_missing_torch", "json", "py:forgesyte_missing_numpy", "os.path"]}),
    );
    std::fs::create_dir_all(root.join("no_file")).unwrap();
    write_manifest(root, "no_file", json!({"runtime": "python"}));
    // A `plugin.py` that is there, but a link leading nowhere.
    for (name, target) in [("link_loop", "plugin.py"), ("link_dangling", "gone.py")] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        write_manifest(root, name, json!({"runtime": "python"}));
        std::os::unix::fs::symlink(target, root.join(name).join("plugin.py")).unwrap();
    }
    let registry = Registry::new();
    let _loader = loader(root, &registry);
    check(
        &registry,
        "broken_plugin",
        S::Failed,
        Some("ImportError: SyntaxError: "),
    );
    check(&registry, "broken_plugin", S::Failed, Some("line "));
    check(
        &registry,
        "bad_init",
        S::Failed,
        Some("InitError: ValueError: no weights"),
    );
    check(
        &registry,
        "no_class",
        S::Failed,
        Some("InitError: AttributeError: No 'Plugin' class found in module"),
    );
    check(
        &registry,
        "missing_dep",
        S::Failed,
        Some("ImportError: ModuleNotFoundError: No module named 'forgesyte_nonexistent_pkg'"),
    );
    check(&registry, "no_file", S::Failed, None);
    let reason = registry.get_status("no_file").unwrap().reason.unwrap();
    assert!(
        reason.starts_with("ImportError: ImportError: plugin.py not found in ")
            && reason.ends_with("no_file"),
        "{reason}"
    );
    for name in ["link_loop", "link_dangling"] {
        check(
            &registry,
            name,
            S::Failed,
            Some("is a link that cannot be followed: "),
        );
    }
    check(&registry, "gpu_plugin", S::Unavailable, Some("GPU"));
    check(&registry, "gpu_plugin", S::Unavailable, Some("CUDA"));
    check(
        &registry,
        "one_missing",
        S::Unavailable,
        Some("Missing dependencies: forgesyte_missing_torch"),
    );
    check(
        &registry,
        "all_missing",
        S::Unavailable,
        Some("Missing dependencies: forgesyte_missing_torch, py:forgesyte_missing_numpy"),
    );
    check(&registry, "echo", S::Initialized, None);
    // The failure journal keeps the traceback's last lines.
    let (_, journal) = registry.status_with_journal("bad_init").unwrap();
    let entry = journal.last().unwrap();
    assert!(
        entry.stderr_tail.iter().any(|l| l.contains("no weights")),
        "{entry:#?}"
    );
    assert!(
        entry.stderr_tail.iter().any(|l| l.contains("plugin.py")),
        "{entry:#?}"
    );
}

#[test]
fn an_entrypoint_of_a_file_and_a_class_runs_that_class() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path(), "named_class", "named_class");
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    check(&registry, "named_class", S::Initialized, None);
    assert_eq!(
        call(&loader, "named_class", "which", json!({})).unwrap(),
        json!({"class": "Chosen"})
    );
}

/// A package installed into the interpreter's site directory after its
/// zygote started (an editable install: a `.pth` file naming a project's
/// directory, which an interpreter reads only at its start) is importable
/// by the plugins loaded after it: that zygote is replaced for later
/// runners, and the runner it forked before serves on.
#[test]
fn a_pth_file_installed_after_the_zygote_started_reaches_later_plugins() {
    require_python();
    let tmp = tempfile::tempdir().unwrap();
    let venv = tmp.path().join("venv");
    let made = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(made.success(), "python3 -m venv: {made}");
    let root = tmp.path().join("plugins");
    copy_fixture(&root, "echo", "first");
    write_manifest(
        &root,
        "first",
        json!({"version": "1.0.0", "runtime": "python"}),
    );
    let registry = Registry::new();
    let loader = loader_with_python(&root, &registry, Some(venv.join("bin/python")));
    check(&registry, "first", S::Initialized, None);
    let project = tmp.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("late_mod.py"), "VALUE = 7\n").unwrap();
    let lib = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let site = lib.path().join("site-packages");
    std::fs::write(
        site.join("__editable__.late-1.0.pth"),
        format!("{}\n", project.display()),
    )
    .unwrap();
    let second = root.join("second");
    std::fs::create_dir_all(&second).unwrap();
    std::fs::write(
        second.join("plugin.py"),
        "import late_mod\n\n\nclass Plugin:\n    name = 'second'\n    tools = {'value': {'handler': 'value', \
         'description': 'late_mod.VALUE', 'input_schema': {}, 'output_schema': {}}}\n\n    \
         def value(self, args):\n        return {'value': late_mod.VALUE}\n",
    )
    .unwrap();
    write_manifest(&root, "second", json!({"version": "1.0.0"}));
    loader.rescan();
    check(&registry, "second", S::Initialized, None);
    assert_eq!(
        call(&loader, "second", "value", json!({})).unwrap(),
        json!({"value": 7})
    );
    assert_eq!(
        call(&loader, "first", "echo", json!({"x": 1})).unwrap(),
        json!({"x": 1})
    );
}

/// A `plugin.py` that links out of its plugin directory is refused before
/// anything runs, as a native library's link is; one that links inside it
/// loads.
#[test]
fn a_plugin_py_linked_out_of_its_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let escape = copy_fixture(&plugins, "echo", "escape");
    let inside = copy_fixture(&plugins, "echo", "inside");
    let elsewhere = copy_fixture(dir.path(), "echo", "elsewhere");
    std::fs::remove_file(escape.join("plugin.py")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("plugin.py"), escape.join("plugin.py")).unwrap();
    std::fs::rename(inside.join("plugin.py"), inside.join("real.py")).unwrap();
    std::os::unix::fs::symlink("real.py", inside.join("plugin.py")).unwrap();
    let echo: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("echo/manifest.json")).unwrap())
            .unwrap();
    write_manifest(&plugins, "escape", echo.clone());
    write_manifest(&plugins, "inside", echo);
    let registry = Registry::new();
    let _loader = loader(&plugins, &registry);
    check(
        &registry,
        "escape",
        S::Failed,
        Some(
            "ManifestError: field 'entrypoint' points outside the plugin directory: plugin.py -> ",
        ),
    );
    check(&registry, "inside", S::Initialized, None);
}

/// An entrypoint may name an attribute path after the colon
/// (`module:Outer.Plugin`), as Python's entry points may.
#[test]
fn an_entrypoint_of_a_module_and_an_attribute_path_runs_that_class() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("nested");
    std::fs::create_dir_all(&plugin).unwrap();
    std::fs::write(
        plugin.join("nested_mod.py"),
        "class Outer:\n    class Plugin:\n        tools = {}\n\n        \
         def run_tool(self, tool_name, args):\n            return {\"class\": \"Outer.Plugin\"}\n",
    )
    .unwrap();
    write_manifest(
        dir.path(),
        "nested",
        json!({"version": "1.0.0", "runtime": "python", "entrypoint": "nested_mod:Outer.Plugin",
               "tools": [{"id": "which", "description": "Which class ran.",
                          "input_schema": {"type": "object"}}]}),
    );
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    check(&registry, "nested", S::Initialized, None);
    assert_eq!(
        call(&loader, "nested", "which", json!({})).unwrap(),
        json!({"class": "Outer.Plugin"})
    );
}

/// The published OCR plugin's sources, served as a plugin directory: the
/// directory is its package (`fs_ns_pkg`, the top of the entrypoint) and
/// holds no `__init__.py` (an implicit namespace package), its modules
/// importing each other by the package's name. It failed with
/// `No module named 'fs_ns_pkg'`: only a package with `__init__.py` was
/// imported from its own directory.
#[test]
fn a_namespace_package_directory_is_served_from_its_sources() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("fs_ns_pkg");
    std::fs::create_dir_all(&plugin).unwrap();
    std::fs::write(plugin.join("engine.py"), "def read(n):\n    return n * 2\n").unwrap();
    std::fs::write(
        plugin.join("plugin.py"),
        "from fs_ns_pkg.engine import read\n\nclass Plugin:\n    name = \"ns-ocr\"\n    \
         tools = {\"read\": {\"handler\": \"read\", \"description\": \"Reads.\"}}\n\n    \
         def read(self, n=0):\n        return {\"n\": read(n)}\n\n    \
         def run_tool(self, tool_name, args):\n        return getattr(self, tool_name)(**args)\n",
    )
    .unwrap();
    std::fs::write(
        plugin.join("manifest.json"),
        json!({"name": "ns-ocr", "version": "1.0.0", "entrypoint": "fs_ns_pkg.plugin",
               "tools": [{"id": "read", "description": "Reads."}]})
        .to_string(),
    )
    .unwrap();
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    check(&registry, "ns-ocr", S::Initialized, None);
    assert_eq!(
        call(&loader, "ns-ocr", "read", json!({"n": 21})).unwrap(),
        json!({"n": 42})
    );
}

/// An interpreter the host cannot start (not executable) is named in the
/// reason, not the plugin's file (it was `ImportError: cannot open
/// …/plugin.py: cannot start the Python interpreter …`).
#[test]
fn an_interpreter_that_cannot_start_is_named_not_the_plugin_file() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = copy_fixture(dir.path(), "echo", "noexec");
    std::fs::write(plugin.join("py"), "#!/bin/sh\nexit 0\n").unwrap();
    write_manifest(
        dir.path(),
        "noexec",
        json!({"version": "1.0.0", "runtime": "python", "python": "py"}),
    );
    let registry = Registry::new();
    let _loader = loader(dir.path(), &registry);
    let status = registry.get_status("noexec").unwrap();
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.starts_with("ImportError: cannot start the Python interpreter ")
            && reason.contains("Permission denied"),
        "{:?}: {reason}",
        status.state
    );
    assert!(!reason.contains("plugin.py"), "{reason}");
}

/// An interpreter that is no Python (`"python": "/bin/true"`): it exits
/// 0 before the runner's hello, and the reason says what that means (it
/// was `plugin process died while loading the plugin: exited with code 0`).
#[test]
fn an_interpreter_that_is_no_python_is_said_to_be_none() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let plugin = copy_fixture(dir.path(), "echo", "nopython");
    let py = plugin.join("py");
    std::fs::write(&py, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_manifest(
        dir.path(),
        "nopython",
        json!({"version": "1.0.0", "runtime": "python", "python": "py"}),
    );
    let registry = Registry::new();
    let _loader = loader(dir.path(), &registry);
    let status = registry.get_status("nopython").unwrap();
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains(
            "exited with code 0 before the runner said its hello: it is no Python 3 interpreter"
        ),
        "{:?}: {reason}",
        status.state
    );
}

/// An interpreter that logs when each of its runs starts (`zygote` or
/// `check`) and when a package check ends (`checked`), taking half a
/// second over the check; written to `path`.
fn write_logging_interpreter(path: &Path) {
    std::fs::write(
        path,
        r#"#!/bin/sh
log="$0.log"
for a in "$@"; do
  if [ "$a" = --zygote ]; then echo "zygote $(date +%s%N)" >> "$log"; exec python3 "$@"; fi
done
echo "check $(date +%s%N)" >> "$log"
sleep 0.5
python3 "$@"; rc=$?
echo "checked $(date +%s%N)" >> "$log"
exit $rc
"#,
    )
    .unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// When (in ns) the logging interpreter at `path` logged `what` first.
fn logged_at(path: &Path, what: &str) -> u128 {
    let log = std::fs::read_to_string(format!("{}.log", path.display())).unwrap();
    log.lines()
        .find_map(|line| line.strip_prefix(what)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {what:?} run in {log:?}"))
}

/// The operator's interpreter's zygote starts while the pass still checks
/// the plugin's Python packages (an interpreter run of its own), not
/// after; an interpreter the manifest names (the plugin's own file, which
/// no signature covers) only once the plugin passed its checks.
#[test]
fn the_operators_zygote_starts_while_the_package_check_runs() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let plugin = copy_fixture(&plugins, "echo", "echo");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(plugin.join("manifest.json")).unwrap()).unwrap();
    manifest["dependencies"] = json!(["json"]);
    write_manifest(&plugins, "echo", manifest.clone());
    let operators = dir.path().join("python-of-the-operator");
    write_logging_interpreter(&operators);
    let registry = Registry::new();
    let _loader = loader_with_python(&plugins, &registry, Some(operators.clone()));
    check(&registry, "echo", S::Initialized, None);
    assert!(
        logged_at(&operators, "zygote") < logged_at(&operators, "checked"),
        "the zygote started only after the package check ended"
    );

    // The plugin's own interpreter.
    let plugins = dir.path().join("own");
    let plugin = copy_fixture(&plugins, "echo", "echo");
    manifest["python"] = json!("slowpy");
    write_manifest(&plugins, "echo", manifest);
    let own = plugin.join("slowpy");
    write_logging_interpreter(&own);
    let registry = Registry::new();
    let _loader = loader(&plugins, &registry);
    check(&registry, "echo", S::Initialized, None);
    assert!(
        logged_at(&own, "zygote") > logged_at(&own, "checked"),
        "the plugin's own interpreter ran as a zygote before its checks"
    );
}

/// A plugin whose interpreter takes its time to answer the package check
/// holds up no other plugin: the pass asks the interpreters beside its
/// waves, and a plugin that needs no package (or another interpreter's)
/// is INITIALIZED while that check still runs (the pass asked every
/// interpreter first: one hung interpreter kept every plugin LOADED for
/// its whole time limit).
#[test]
fn a_slow_package_check_holds_up_no_other_plugin() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path(), "echo", "echo");
    let slow = copy_fixture(dir.path(), "echo", "slowcheck");
    write_manifest(
        dir.path(),
        "slowcheck",
        json!({"version": "1.0.0", "runtime": "python", "python": "slowpy", "dependencies": ["json"]}),
    );
    std::fs::write(
        slow.join("slowpy"),
        r#"#!/bin/sh
for a in "$@"; do [ "$a" = --zygote ] && exec python3 "$@"; done
sleep 6
exec python3 "$@"
"#,
    )
    .unwrap();
    std::fs::set_permissions(
        slow.join("slowpy"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let registry = Registry::new();
    let checker = DependencyChecker::builder()
        .gpu(Arc::new(FakeGpu::none("no GPU here")))
        .build();
    let loader = Loader::new(registry.clone(), Arc::new(checker), test_config(None));
    let initialized = |name: &str| {
        registry
            .get_status(name)
            .is_some_and(|s| s.state == S::Initialized)
    };
    let (echo_ready, pass_ended) = std::thread::scope(|scope| {
        let started = Instant::now();
        let pass = scope.spawn(|| loader.load_all(dir.path()));
        let mut echo_ready = None;
        while !pass.is_finished() {
            if echo_ready.is_none() && initialized("echo") {
                echo_ready = Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        pass.join().unwrap();
        (echo_ready, started.elapsed())
    });
    check(&registry, "echo", S::Initialized, None);
    check(&registry, "slowcheck", S::Initialized, None);
    let echo_ready = echo_ready.expect("echo was INITIALIZED only when the pass ended");
    assert!(
        pass_ended >= Duration::from_secs(6) && echo_ready + Duration::from_secs(3) < pass_ended,
        "echo INITIALIZED at {echo_ready:?}, the pass (the slow check: 6 s) ended at {pass_ended:?}"
    );
}

/// An interpreter whose own start hangs (a `.pth` file, `sitecustomize`):
/// its zygote does not fork within the start's limit, the runner started
/// on its own after it hangs as long, and the reason says both waits (it
/// said one limit for a start that took two).
#[test]
fn an_interpreter_that_hangs_at_its_start_is_said_to_have_had_two_tries() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let plugin = copy_fixture(dir.path(), "echo", "hangs");
    write_manifest(
        dir.path(),
        "hangs",
        json!({"version": "1.0.0", "runtime": "python", "python": "py"}),
    );
    std::fs::write(plugin.join("py"), "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(
        plugin.join("py"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut config = test_config(None);
    config.process.init_timeout = Duration::from_secs(2);
    let registry = Registry::new();
    let _loader = loader_with(dir.path(), &registry, config);
    check(
        &registry,
        "hangs",
        S::Failed,
        Some(
            "timed out after 2 s during handshake, stuck at the start of a fresh interpreter, \
             after its zygote had not forked within 2",
        ),
    );
}

#[test]
fn calls_tools_of_the_live_instance_and_tool_errors_leave_it_healthy() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path(), "echo", "echo");
    copy_fixture(dir.path(), "handlers", "handlers");
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    check(&registry, "echo", S::Initialized, None);
    let handle = loader.handle("echo").unwrap();
    let tools = handle.tools();
    let ids: Vec<&str> = tools.iter().map(|t| t.id.as_str()).collect();
    for tool in ["echo", "sleep", "fail", "bytes", "binary"] {
        assert!(ids.contains(&tool), "{ids:?}");
    }
    let binary = tools.iter().find(|t| t.id == "binary").unwrap();
    assert_eq!(
        binary.input_schema["properties"]["data"]["format"],
        "binary"
    );
    let args = json!({"text": "héllo", "n": [1, 2, 3], "nested": {"ok": true}});
    assert_eq!(call(&loader, "echo", "echo", args.clone()).unwrap(), args);
    // A base64 string where the schema declares bytes arrives as bytes.
    assert_eq!(
        call(&loader, "echo", "binary", json!({"data": "AAEC/w=="})).unwrap(),
        json!({"len": 4, "type": "bytes"})
    );
    // Bytes in a result come back as base64 in the JSON.
    assert_eq!(
        call(&loader, "echo", "bytes", json!({})).unwrap(),
        json!({"data": "AAH/", "n": 3})
    );
    // An exception is a tool error: counted, the plugin stays healthy.
    match call(&loader, "echo", "fail", json!({})) {
        Err(CallError::Tool(ToolError::Failed {
            error_type,
            message,
            ..
        })) => {
            assert_eq!(error_type.as_deref(), Some("ValueError"));
            assert_eq!(message, "bad input");
        }
        other => panic!("{other:?}"),
    }
    let status = registry.get_status("echo").unwrap();
    assert_eq!(status.state, S::Initialized);
    assert_eq!((status.success_count, status.error_count), (3, 1));
    // ForgeSyte's BasePlugin shape without run_tool: called through handlers.
    check(&registry, "handlers", S::Initialized, None);
    let tools = loader.handle("handlers").unwrap().tools().to_vec();
    assert!(!tools.is_empty());
}

/// A runner that lives on but stops reading its requests (its plugin put a
/// pipe of its own in place of the request pipe): the next call finds the
/// pipe closed, and the runner is killed as a protocol fault, its plugin
/// FAILED with why, not left INITIALIZED to time out every later call.
#[test]
fn a_runner_that_stops_reading_its_requests_is_killed_as_a_protocol_fault() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_fixture(root, "faulty", "faulty");
    let registry = Registry::new();
    let loader = loader(root, &registry);
    check(&registry, "faulty", S::Initialized, None);
    let pid = loader.handle("faulty").and_then(|h| h.pid()).unwrap();
    let replaced = call(&loader, "faulty", "deaf", json!({})).unwrap();
    assert!(
        replaced["replaced"]
            .as_array()
            .is_some_and(|fds| !fds.is_empty()),
        "{replaced}"
    );
    // The request that was waiting when the pipe was replaced is read
    // still; the one after finds no reader.
    let mut failed = None;
    for _ in 0..3 {
        let started = Instant::now();
        if let Err(e) = call(&loader, "faulty", "ok", json!({})) {
            failed = Some((e, started.elapsed()));
            break;
        }
    }
    let Some((_, took)) = failed else {
        panic!("every call answered");
    };
    // Within the call's limit (the fixture's 2 s) and the kill: it waited
    // 5 s for a death that was not coming, whatever the limit.
    assert!(
        took < Duration::from_millis(4500),
        "answered after {took:?}"
    );
    check(
        &registry,
        "faulty",
        S::Failed,
        Some("stopped reading its requests"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "runner {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn python_faults_are_that_plugins_state_never_the_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_fixture(root, "faulty", "faulty");
    copy_fixture(root, "echo", "bystander");
    write_manifest(root, "bystander", json!({"runtime": "python"}));
    for fault in [
        "segfault", "exit", "hang", "raise", "sysexit", "blowup", "refuse", "spam", "close",
        "closeall", "thread", "invalid",
    ] {
        let name = format!("init-{fault}");
        copy_fixture(root, "faulty", &name);
        // 10 MB of output beside nine other runners: time to spare on a
        // loaded machine. The hang needs a short limit.
        let timeout = if fault == "hang" { 2 } else { 20 };
        write_manifest(
            root,
            &name,
            json!({"runtime": "python", "limits": {"init_timeout_s": timeout, "memory_mb": 256}}),
        );
    }
    copy_fixture(root, "faulty", "import-blowup");
    write_manifest(
        root,
        "import-blowup",
        json!({"runtime": "python", "limits": {"memory_mb": 256}}),
    );
    copy_fixture(root, "faulty", "import-hang");
    write_manifest(
        root,
        "import-hang",
        json!({"runtime": "python", "limits": {"init_timeout_s": 2}}),
    );
    let registry = Registry::new();
    let loader = loader(root, &registry);
    for (plugin, reason) in [
        ("init-sysexit", "InitError: SystemExit: 4"),
        // A MemoryError the constructor raised itself is its exception,
        // not the memory limit's.
        (
            "init-refuse",
            "InitError: MemoryError: frame too large for this model",
        ),
        (
            "init-blowup",
            "InitError: plugin process died during construction: exceeded memory limit 256 MiB",
        ),
        (
            "import-blowup",
            "ImportError: plugin process died while loading the plugin: exceeded memory limit 256 MiB",
        ),
        // `validate()` raising after construction (ForgeSyte's BasePlugin).
        (
            "init-invalid",
            "InitError: ValueError: tool 'ok' has no input schema",
        ),
        // Its descriptors to the host closed by the plugin: the runner
        // can say so by its exit code alone (its stderr went with them).
        (
            "init-closeall",
            "InitError: plugin process died during construction: exited with code 74: the \
             runner's own connection to the host was closed from inside the process",
        ),
    ] {
        check(&registry, plugin, S::Failed, Some(reason));
    }
    // Output on stdout, closed descriptors 0 and 1, a thread left running:
    // none of them harms the protocol, in the constructor as in a tool.
    for plugin in ["init-spam", "init-close", "init-thread"] {
        check(&registry, plugin, S::Initialized, None);
        assert_eq!(
            call(&loader, plugin, "ok", json!({})).unwrap(),
            json!({"ok": true}),
            "{plugin}"
        );
    }
    check(&registry, "init-segfault", S::Failed, Some("SIGSEGV"));
    check(
        &registry,
        "init-exit",
        S::Failed,
        Some("exited with code 3"),
    );
    check(
        &registry,
        "init-hang",
        S::Failed,
        Some("timed out after 2 s"),
    );
    // Where the constructor was stuck, read from the runner's stacks (no
    // line numbers: the fixture may change).
    for part in [
        "during init, stuck at ",
        "/init-hang/plugin.py:",
        " in __init__, in ",
    ] {
        check(&registry, "init-hang", S::Failed, Some(part));
    }
    // And where a module was stuck as it was imported, before any hello.
    for part in [
        "ImportError: timed out after 2 s during handshake, stuck at ",
        "/import-hang/plugin.py:",
        " in <module>, in ",
        "threading.py:",
    ] {
        check(&registry, "import-hang", S::Failed, Some(part));
    }
    check(
        &registry,
        "init-raise",
        S::Failed,
        Some("InitError: RuntimeError: constructor refused"),
    );
    check(&registry, "faulty", S::Initialized, None);
    // Output on stdout never corrupts the protocol.
    assert_eq!(
        call(&loader, "faulty", "spam", json!({})).unwrap(),
        json!({"spammed": true})
    );
    // sys.exit() in a tool is that call's error.
    match call(&loader, "faulty", "sysexit", json!({})) {
        Err(CallError::Tool(ToolError::Failed { error_type, .. })) => {
            assert_eq!(error_type.as_deref(), Some("SystemExit"));
        }
        other => panic!("{other:?}"),
    }
    // So is a MemoryError the tool raised itself (a refusal, not a failed
    // allocation: the runner lives on).
    let pid = loader.handle("faulty").and_then(|h| h.pid());
    match call(&loader, "faulty", "refuse", json!({})) {
        Err(CallError::Tool(ToolError::Failed {
            error_type,
            message,
            ..
        })) => {
            assert_eq!(error_type.as_deref(), Some("MemoryError"));
            assert_eq!(message, "frame too large for this model");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(loader.handle("faulty").and_then(|h| h.pid()), pid);
    // A result that is not JSON names the type.
    match call(&loader, "faulty", "unknown", json!({})) {
        Err(CallError::Tool(ToolError::Failed { message, .. })) => {
            assert!(message.contains("object"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    check(&registry, "faulty", S::Initialized, None);
    // The protocol is not on fds 0 and 1: a plugin closing them breaks
    // nothing.
    assert_eq!(
        call(&loader, "faulty", "close", json!({})).unwrap(),
        json!({"closed": true})
    );
    assert_eq!(
        call(&loader, "faulty", "ok", json!({})).unwrap(),
        json!({"ok": true})
    );
    // A thread that keeps running does not stop the answer.
    assert_eq!(
        call(&loader, "faulty", "thread", json!({})).unwrap(),
        json!({"started": true})
    );
    // Faults: each leaves the plugin FAILED with the precise reason.
    let started = Instant::now();
    assert!(call(&loader, "faulty", "hang", json!({})).is_err());
    assert!(started.elapsed() < Duration::from_secs(20));
    check(
        &registry,
        "faulty",
        S::Failed,
        Some("timed out after 2 s during tool 'hang'"),
    );
    for part in [
        ", stuck at ",
        "/faulty/plugin.py:",
        " in run_tool, in ",
        " in _fault;",
    ] {
        check(&registry, "faulty", S::Failed, Some(part));
    }
    check(&registry, "bystander", S::Initialized, None);
    assert_eq!(
        call(&loader, "bystander", "echo", json!({"still": "here"})).unwrap(),
        json!({"still": "here"})
    );
}

/// A plugin that takes SIGUSR2 over (here: to exit at once) is still
/// killed for its timeout when the host asks its runner where it was
/// stuck: the death is the timeout's, not a crash (crashes count towards
/// the restart limit, timeouts do not).
#[test]
fn a_plugin_that_dies_of_the_stack_signal_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path(), "faulty", "usr2-exit");
    write_manifest(
        dir.path(),
        "usr2-exit",
        json!({"runtime": "python", "limits": {"call_timeout_s": 1}}),
    );
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    check(&registry, "usr2-exit", S::Initialized, None);
    assert!(call(&loader, "usr2-exit", "hang", json!({})).is_err());
    check(
        &registry,
        "usr2-exit",
        S::Failed,
        Some("TimeoutError: timed out after 1 s during tool 'hang'"),
    );
}

/// A tool that closes every descriptor of its runner, and one that then
/// opens files in their place (as a daemon opens `/dev/null`), also after
/// 50 ms, when another thread of the runner already waits on the old
/// request pipe (only the host's closing it wakes that one): each ends
/// the call as a crash saying so, exit code 74, never "exited with code
/// 0" or "closed its end of the protocol".
#[test]
fn a_python_tool_that_closes_its_runners_descriptors_is_said_so() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["closer", "reopener", "slow-reopener"] {
        copy_fixture(dir.path(), "faulty", name);
        write_manifest(dir.path(), name, json!({"runtime": "python"}));
    }
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    for (name, args) in [
        ("closer", json!({})),
        ("reopener", json!({"reopen": true})),
        ("slow-reopener", json!({"reopen": true, "after_s": 0.05})),
    ] {
        check(&registry, name, S::Initialized, None);
        match call(&loader, name, "closeall", args) {
            Err(CallError::Tool(e)) => assert!(e.is_fault(), "{name}: {e:?}"),
            other => panic!("{name}: expected a fault, got {other:?}"),
        }
        check(
            &registry,
            name,
            S::Failed,
            Some(
                "CrashError: exited with code 74: the runner's own connection to the host was \
                 closed from inside the process",
            ),
        );
        assert_eq!(
            registry.journal(name).unwrap().last().unwrap().exit_code,
            Some(74),
            "{name}"
        );
    }
}

/// A timed-out call dropped by its caller while the host waits for the
/// runner's stacks still kills the runner (found by review: the runner ran
/// on, and the timeout recorded before the signal would have been the
/// reason of its next death, whatever that was). The plugin's own handler
/// of the signal writes no stacks, so the wait lasts its 0.3 s, and marks
/// when it ran, so the call is dropped inside it. (On a machine starved
/// past the wait, the call ends first, its kill made as usual: the test
/// then checks the same end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_dropped_as_its_stacks_are_awaited_still_kills_its_runner() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = copy_fixture(dir.path(), "faulty", "usr2-mute");
    write_manifest(
        dir.path(),
        "usr2-mute",
        json!({"runtime": "python", "limits": {"call_timeout_s": 1}}),
    );
    let registry = Registry::new();
    // Unconfined: the plugin writes its mark beside itself.
    let loader = {
        let (root, registry) = (dir.path().to_owned(), registry.clone());
        let config = LoaderConfig {
            confine: false,
            ..test_config(None)
        };
        tokio::task::spawn_blocking(move || loader_with(&root, &registry, config))
            .await
            .unwrap()
    };
    check(&registry, "usr2-mute", S::Initialized, None);
    let handle = loader.handle("usr2-mute").unwrap();
    let pid = handle.pid().unwrap();
    let context = forgesyte_loader::CallContext::default();
    let awaited = handle
        .awaitable("hang", &json!({}), &context)
        .expect("a Python runner's call is awaited");
    let ticket = forgesyte_loader::CallTicket::default();
    let seen = plugin.join("usr2-seen");
    tokio::select! {
        _ = handle.call_ticketed_async("hang", awaited, &context, &ticket) => {}
        () = async {
            while !seen.exists() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } => {}
    }
    // Killed, and recorded FAILED for its timeout (its death processed;
    // not restarted: the tests' supervision restarts nothing).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = registry.get_status("usr2-mute").unwrap();
        if status.state == S::Failed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runner {pid} not killed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check(
        &registry,
        "usr2-mute",
        S::Failed,
        Some("TimeoutError: timed out after 1 s during tool 'hang'"),
    );
}

#[test]
fn python_crashes_at_call_time_are_precise() {
    let cases = [
        ("segfault", "SIGSEGV"),
        ("exit", "exited with code 3"),
        ("blowup", "exceeded memory limit 256 MiB"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (tool, _) in cases {
        copy_fixture(dir.path(), "faulty", tool);
        write_manifest(
            dir.path(),
            tool,
            json!({"runtime": "python", "limits": {"memory_mb": 256, "max_response_mb": 16}}),
        );
    }
    copy_fixture(dir.path(), "faulty", "huge");
    write_manifest(
        dir.path(),
        "huge",
        json!({"runtime": "python", "limits": {"max_response_mb": 16}}),
    );
    copy_fixture(dir.path(), "faulty", "shout");
    write_manifest(
        dir.path(),
        "shout",
        json!({"runtime": "python", "limits": {"memory_mb": 256}}),
    );
    // Without the field, the host's default (64 MiB), which the host
    // tells the runner.
    copy_fixture(dir.path(), "faulty", "huge-default");
    write_manifest(dir.path(), "huge-default", json!({"runtime": "python"}));
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    // A result over the answer limit is refused by the runner before it is
    // sent: a tool error, the plugin stays healthy (over the host's default
    // it was an answer the host killed the runner for).
    for (plugin, mb) in [("huge", 40), ("huge-default", 70)] {
        match call(&loader, plugin, "huge", json!({ "mb": mb })) {
            Err(CallError::Tool(ToolError::Failed {
                error_type,
                message,
                ..
            })) => {
                assert_eq!(
                    error_type.as_deref(),
                    Some("ResultTooLarge"),
                    "{plugin}: {message}"
                );
            }
            other => panic!("{plugin}: {other:?}"),
        }
        check(&registry, plugin, S::Initialized, None);
    }
    // An exception whose message is a whole 100 MB input, under a 256 MiB
    // limit: the tool's error, cut, and the plugin stays healthy (the
    // message was encoded whole before it was cut, and the copies' failed
    // allocation made it the runner's error: FAILED).
    match call(&loader, "shout", "shout", json!({"mb": 100})) {
        Err(CallError::Tool(ToolError::Failed {
            error_type,
            message,
            ..
        })) => {
            assert_eq!(error_type.as_deref(), Some("ValueError"), "{message:.200}");
            assert!(
                message.ends_with(&format!(
                    "({} characters cut)",
                    100 * 1024 * 1024 - 64 * 1024
                )),
                "{}",
                &message[message.len().saturating_sub(100)..]
            );
        }
        other => panic!("shout: {other:?}"),
    }
    check(&registry, "shout", S::Initialized, None);
    for (tool, reason) in cases {
        check(&registry, tool, S::Initialized, None);
        let outcome = call(&loader, tool, tool, json!({"mb": 40}));
        assert!(
            matches!(outcome, Err(CallError::Tool(ref e)) if e.is_fault()),
            "{tool}: {outcome:?}"
        );
        check(&registry, tool, S::Failed, Some(reason));
    }
}

/// The Python runner, hosting the `echo` fixture, through the conformance
/// suite the native runner passes; started from its sources, as for a
/// runner user (the host's other tests start it from the cache).
fn python_runner() -> RunnerUnderTest {
    require_python();
    let dir = fixtures().join("echo");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    RunnerUnderTest {
        program: "python3".into(),
        args: forgesyte_loader::python::runner_source_invocation()
            .into_iter()
            .chain([
                "--plugin-dir".into(),
                dir.clone().into(),
                "--file".into(),
                dir.join("plugin.py").into(),
                "--plugin".into(),
                "conformance".into(),
                "--memory-limit-mb".into(),
                "0".into(),
            ])
            .collect(),
        envs: Vec::new(),
        manifest,
        plugin_dir: dir,
        echo_tool: "echo".into(),
        sleep_tool: Some("sleep".into()),
    }
}

#[test]
fn the_python_runner_passes_the_conformance_suite() {
    conformance::check_all(&python_runner());
}

/// The example Python plugins' own tests (`examples/plugins/py-*/test_plugin.py`).
#[test]
fn the_example_python_plugins_own_tests_pass() {
    require_python();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/plugins");
    for example in ["py-image-stats", "py-forgesyte-packaged"] {
        let output = std::process::Command::new("python3")
            .args(["-m", "unittest", "-q", "test_plugin"])
            .current_dir(examples.join(example))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .expect("run python3 -m unittest");
        assert!(
            output.status.success(),
            "{example}/test_plugin.py failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Runs the Python runner's own unit tests (`src/python/test_runner.py`)
/// with `python`, verbosely; returns unittest's report (its stderr), after
/// checking that every test passed.
fn run_runner_tests(python: &Path) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/python");
    // The code the host runs the runner with from its sources, for
    // `SourceModeTests`.
    let source = tempfile::NamedTempFile::new().unwrap();
    let [_, _, code] = forgesyte_loader::python::runner_source_invocation();
    std::fs::write(source.path(), code.as_encoded_bytes()).unwrap();
    let output = std::process::Command::new(python)
        .args(["-m", "unittest", "-v", "test_runner"])
        .current_dir(&dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("FORGESYTE_TEST_RUNNER_SOURCE", source.path())
        // The runner processes of the tests are `python` too.
        .env_remove("FORGESYTE_TEST_PYTHON")
        .output()
        .expect("run python -m unittest");
    let report = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "test_runner.py under {} failed:\n{report}",
        python.display()
    );
    report
}

/// The reasons of the skipped tests in a verbose unittest report.
fn skip_reasons(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter_map(|line| line.split_once(" ... skipped ").map(|(_, why)| why))
        .collect()
}

/// What `NumpyResultTests` says when numpy is missing, and the pydantic
/// tests when pydantic is: both run under the test virtualenv (the next
/// test), so `python3` need not have them.
const NO_NUMPY: &str = "'numpy is not installed'";
const NO_PYDANTIC: &str = "'pydantic is not installed'";

/// Checks the skips of a verbose unittest `report` run under `label`:
/// those `expected` allows are said on stderr (libtest captures
/// `println!` of a passing test); any other is printed, and in CI it is a
/// failure. Counted from unittest's summary too (`OK (skipped=N)`), so a
/// skip line the parse missed counts.
fn check_skips(label: &str, report: &str, expected: impl Fn(&str) -> bool) {
    use std::io::Write as _;
    let reasons = skip_reasons(report);
    let allowed = reasons.iter().filter(|&&why| expected(why)).count();
    if allowed > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "test_runner.py under {label}: {allowed} tests skipped as expected (numpy, pydantic: they run under the test virtualenv)"
        );
    }
    let total: usize = report
        .rsplit_once("skipped=")
        .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let others: Vec<&str> = reasons.into_iter().filter(|&why| !expected(why)).collect();
    if total > allowed || !others.is_empty() {
        println!("test_runner.py under {label} skipped tests: {others:?}\n{report}");
        assert!(
            std::env::var_os("CI").is_none(),
            "tests were skipped in CI under {label}: {others:?}\n{report}"
        );
    }
}

/// The Python runner's own unit tests (`src/python/test_runner.py`,
/// standard library `unittest`) under `python3`: pointer placement,
/// framing, schema normalisation, result conversion, every error kind.
/// numpy and pydantic are not expected for `python3`: their tests run
/// under the test virtualenv (the next test but one).
#[test]
fn the_python_runners_own_tests_pass() {
    require_python();
    let report = run_runner_tests(Path::new("python3"));
    check_skips("python3", &report, |why| {
        why == NO_NUMPY || why == NO_PYDANTIC
    });
}

/// The Python minor versions [`other_interpreters`] looks for besides
/// `python3`'s own: the README promises 3.8 and newer (the upper end only
/// bounds the search).
const SUPPORTED_MINORS: std::ops::RangeInclusive<u32> = 8..=30;

/// Interpreters of the supported versions other than `python3`'s: each
/// `python3.N` on `PATH` that starts, else the newest `3.N.P` (digits
/// only: no free-threaded `t` build) under pyenv's versions directory
/// (`$PYENV_ROOT`, else `~/.pyenv`), as (version, path); and the versions
/// up to the newest found that were not.
fn other_interpreters() -> (Vec<(String, PathBuf)>, Vec<String>) {
    let version_of = |python: &Path| -> Option<String> {
        let out = std::process::Command::new(python)
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let own = version_of(Path::new("python3"));
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .map(|root| root.join("versions"));
    let installed: Vec<String> = pyenv
        .as_ref()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    let (mut found, mut missing) = (Vec::new(), Vec::new());
    for minor in SUPPORTED_MINORS {
        let version = format!("3.{minor}");
        if own.as_deref() == Some(&*version) {
            continue;
        }
        // pyenv's `3.N.P` directories, the newest patch first.
        let mut patches: Vec<(u32, &String)> = installed
            .iter()
            .filter_map(|name| {
                let patch = name.strip_prefix(&version)?.strip_prefix('.')?;
                Some((patch.parse().ok()?, name))
            })
            .collect();
        patches.sort();
        let candidates = std::iter::once(PathBuf::from(format!("python{version}"))).chain(
            patches.iter().rev().filter_map(|(_, name)| {
                pyenv.as_ref().map(|dir| dir.join(name).join("bin/python3"))
            }),
        );
        match candidates
            .into_iter()
            .find(|p| version_of(p).as_deref() == Some(&*version))
        {
            Some(python) => found.push((version, python)),
            None => missing.push(version),
        }
    }
    // Versions past the newest here (python3's included) are most likely
    // not released yet: not said as missing.
    let minor = |v: &str| v.strip_prefix("3.").and_then(|m| m.parse::<u32>().ok());
    let newest = found
        .iter()
        .map(|(v, _)| v.as_str())
        .chain(own.as_deref())
        .filter_map(minor)
        .max();
    missing.retain(|v| minor(v) < newest);
    (found, missing)
}

/// The runner's own tests under every other supported Python version this
/// machine has (the runner is one source for 3.8 to the newest), one
/// version after another (each suite starts runners of its own): each
/// passes; a skip beyond numpy's, pydantic's and (3.8) `typing.Annotated`'s
/// is printed, and fails in CI ([`check_skips`], as for `python3`). Which
/// versions ran, and which were not found, is said on stderr; the test
/// cannot install them.
#[test]
fn the_python_runners_own_tests_pass_under_every_python_version_found() {
    require_python();
    let (found, missing) = other_interpreters();
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "test_runner.py under other Python versions: run under {:?}; not found on PATH or under pyenv: {missing:?}",
        found.iter().map(|(v, _)| v).collect::<Vec<_>>()
    );
    for (version, python) in &found {
        let report = run_runner_tests(python);
        check_skips(&format!("Python {version}"), &report, |why| {
            why == NO_NUMPY
                || why == NO_PYDANTIC
                || (version == "3.8" && why == "'typing.Annotated needs Python 3.9'")
        });
    }
}

/// The same tests under the test virtualenv's interpreter (numpy and
/// pydantic installed): none may be skipped, and the numpy ones ran.
#[test]
fn the_python_runners_own_tests_pass_under_the_test_virtualenv() {
    let Some(python) = venv_python("the_python_runners_own_tests_pass_under_the_test_virtualenv")
    else {
        return;
    };
    let report = run_runner_tests(&python);
    assert!(
        !report.contains("skipped"),
        "tests were skipped under {}:\n{report}",
        python.display()
    );
    for test in [
        "test_scalars",
        "test_a_2d_array_is_nested_lists",
        "test_numpy_fields_of_a_pydantic_model",
        "test_nan_in_an_array_is_a_tool_error_naming_where",
        "test_pydantic_models",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(test) && l.ends_with(" ... ok")),
            "{test} did not run and pass:\n{report}"
        );
    }
}

/// A plugin returning numpy values, loaded and called through the loader
/// with the test virtualenv's interpreter as its manifest's `python`.
#[test]
fn numpy_results_through_the_loader() {
    let Some(python) = venv_python("numpy_results_through_the_loader") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path(), "numpy_results", "numpy_results");
    write_manifest(
        dir.path(),
        "numpy_results",
        json!({
            "version": "1.0.0",
            "runtime": "python",
            "python": python,
            "dependencies": ["numpy", "pydantic"],
        }),
    );
    let registry = Registry::new();
    let loader = loader(dir.path(), &registry);
    check(&registry, "numpy_results", S::Initialized, None);
    // A float32 array, its float32 mean and an int64 count.
    assert_eq!(
        call(
            &loader,
            "numpy_results",
            "mean",
            json!({"values": [1, 2, 4.5]})
        )
        .unwrap(),
        json!({"values": [1.0, 2.0, 4.5], "mean": 2.5, "count": 3})
    );
    assert_eq!(
        call(
            &loader,
            "numpy_results",
            "convert",
            json!({"kind": "matrix"})
        )
        .unwrap(),
        json!([[0, 1, 2], [3, 4, 5]])
    );
    assert_eq!(
        call(
            &loader,
            "numpy_results",
            "convert",
            json!({"kind": "model"})
        )
        .unwrap(),
        json!({"label": "cat", "box": [[0, 1], [2, 3]], "score": 0.75})
    );
    // The mean of nothing is NaN, which JSON cannot carry: a tool error
    // saying where, the plugin stays healthy.
    match call(&loader, "numpy_results", "mean", json!({"values": []})) {
        Err(CallError::Tool(ToolError::Failed {
            error_type,
            message,
            ..
        })) => {
            assert_eq!(error_type.as_deref(), Some("ValueError"), "{message}");
            assert!(message.contains("non-finite number"), "{message}");
            assert!(message.ends_with("(at /mean)"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let status = registry.get_status("numpy_results").unwrap();
    assert_eq!(status.state, S::Initialized, "{status:#?}");
    assert_eq!((status.success_count, status.error_count), (3, 1));
}

/// `models` for Python plugins as for native ones: a missing model file
/// makes the plugin UNAVAILABLE, naming it; a present one reaches the
/// plugin's constructor resolved, through `forgesyte_runner.models()`.
#[test]
fn a_python_plugin_gets_its_checked_models() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_fixture(root, "models", "models");
    copy_fixture(root, "models", "no_model");
    std::fs::remove_file(root.join("no_model").join("model.txt")).unwrap();
    write_manifest(
        root,
        "no_model",
        json!({"runtime": "python", "models": {"weights": "model.txt"}}),
    );
    let registry = Registry::new();
    let loader = loader(root, &registry);
    check(
        &registry,
        "no_model",
        S::Unavailable,
        Some("Missing dependencies: weights (path: "),
    );
    check(&registry, "no_model", S::Unavailable, Some("model.txt)"));
    check(&registry, "models", S::Initialized, None);
    let got = call(&loader, "models", "weights", json!({})).unwrap();
    assert_eq!(got["text"], "weights of the test model\n", "{got}");
    let path = got["path"].as_str().unwrap();
    assert!(
        Path::new(path).is_absolute() && path.ends_with("models/model.txt"),
        "{got}"
    );
    assert_eq!(got["models"], json!({"weights": path}));
}

/// A plugin that declares `requires_gpu` runs without the host's
/// address-space limit unless its manifest sets one (a GPU driver reserves
/// far more address space than it uses: 512 MiB failed every torch
/// plugin); the others get the host's (`--memory-limit`).
#[test]
fn a_gpu_plugin_has_no_address_space_limit_unless_its_manifest_sets_one() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (name, fields) in [
        ("plain", json!({})),
        ("gpu", json!({"requires_gpu": true})),
        (
            "gpu-capped",
            json!({"requires_gpu": true, "limits": {"memory_mb": 400}}),
        ),
    ] {
        copy_fixture(root, "snoop", name);
        let mut manifest = json!({"version": "1.0.0", "runtime": "python"});
        for (key, value) in fields.as_object().unwrap() {
            manifest[key] = value.clone();
        }
        write_manifest(root, name, manifest);
    }
    let device = forgesyte_deps::GpuDevice {
        ordinal: 0,
        name: "Fake H200".into(),
        total_memory_mb: 141_312,
        compute_capability: (9, 0),
    };
    let checker = DependencyChecker::builder()
        .gpu(Arc::new(FakeGpu::with_devices(vec![device])))
        .build();
    let config = LoaderConfig {
        process: ProcessLimits {
            memory_limit_mib: 300,
            ..ProcessLimits::default()
        },
        ..LoaderConfig::default()
    };
    let registry = Registry::new();
    let loader = Loader::new(registry.clone(), Arc::new(checker), config);
    loader.load_all(root);
    for (name, mib) in [
        ("plain", json!(300)),
        ("gpu", Value::Null),
        ("gpu-capped", json!(400)),
    ] {
        check(&registry, name, S::Initialized, None);
        let got = call(&loader, name, "address_space", json!({})).unwrap();
        assert_eq!(got["mib"], mib, "{name}: {got}");
    }
}

/// A package only in the user site directory (`pip install --user`,
/// `PYTHONUSERBASE`) is missing for the dependency check as for the
/// runner, which never sees it: the plugin is UNAVAILABLE naming it, not
/// passed by the check and then FAILED by its import (or loaded only where
/// the runner is not confined).
#[test]
fn a_package_in_the_user_site_only_is_missing_for_the_check_and_the_runner_alike() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("userbase");
    let python = dir.path().join("python");
    std::fs::write(
        &python,
        format!(
            "#!/bin/sh\nPYTHONUSERBASE={} exec python3 \"$@\"\n",
            base.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let site = std::process::Command::new(&python)
        .args(["-c", "import site; print(site.getusersitepackages())"])
        .output()
        .unwrap();
    let site = PathBuf::from(String::from_utf8(site.stdout).unwrap().trim());
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("ubdep.py"), "VALUE = 1\n").unwrap();
    // Without -s the interpreter does see it (else this test shows nothing).
    let seen = std::process::Command::new(&python)
        .args(["-c", "import ubdep"])
        .status()
        .unwrap();
    assert!(
        seen.success(),
        "python3 does not use its user site directory (a virtualenv's interpreter?): this test \
         needs one that does"
    );
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(plugins.join("ub")).unwrap();
    std::fs::write(
        plugins.join("ub/plugin.py"),
        "import ubdep\n\nclass Plugin:\n    name = 'ub'\n    tools = {}\n",
    )
    .unwrap();
    std::fs::write(
        plugins.join("ub/manifest.json"),
        json!({"name": "ub", "version": "1.0.0", "dependencies": ["ubdep"]}).to_string(),
    )
    .unwrap();
    let registry = Registry::new();
    let _loader = loader_with_python(&plugins, &registry, Some(python));
    check(
        &registry,
        "ub",
        S::Unavailable,
        Some("Missing dependencies: ubdep"),
    );
}

/// The tools served after a restart are the restarted instance's: a
/// plugin whose constructor lists other tools the second time it runs (it
/// marks its first start in its home, the runner's scratch directory) is
/// listed and called with its new list. The first list used to stay: a
/// listed tool answered "not found", an offered one was refused.
#[test]
fn a_restarted_instances_tools_are_the_ones_served() {
    require_python();
    let root = tempfile::tempdir().unwrap();
    // A name of its own: the scratch directory is kept by name.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("shifty-{}-{nanos}", std::process::id());
    let dir = root.path().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.py"),
        r#"import os


class Plugin:
    def __init__(self):
        marker = os.path.join(os.path.expanduser("~"), "started-before")
        again = os.path.exists(marker)
        open(marker, "w").close()
        self.tools = {
            "boom": {"handler": self.boom},
            ("second" if again else "first"): {"handler": self.hello},
        }

    def hello(self, args):
        return {"hello": True}

    def boom(self, args):
        os._exit(3)

    def run_tool(self, tool_name, args):
        return self.tools[tool_name]["handler"](args)
"#,
    )
    .unwrap();
    write_manifest(root.path(), &name, json!({"version": "1.0.0"}));
    let registry = Registry::new();
    let checker = DependencyChecker::builder()
        .gpu(Arc::new(FakeGpu::none("no GPU")))
        .build();
    let config = LoaderConfig {
        supervision: SupervisionPolicy {
            max_restarts: 3,
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(10),
            ..SupervisionPolicy::default()
        },
        ..LoaderConfig::default()
    };
    let loader = Loader::new(registry.clone(), Arc::new(checker), config);
    loader.load_all(root.path());
    check(&registry, &name, S::Initialized, None);
    let handle = loader.handle(&name).unwrap();
    let ids = |handle: &forgesyte_loader::PluginHandle| -> Vec<String> {
        handle.tools().iter().map(|t| t.id.clone()).collect()
    };
    assert_eq!(ids(&handle), ["boom", "first"]);
    assert_eq!(
        call(&loader, &name, "first", json!({})).unwrap(),
        json!({"hello": true})
    );
    assert!(call(&loader, &name, "boom", json!({})).is_err());
    let deadline = Instant::now() + Duration::from_secs(20);
    while registry
        .get_status(&name)
        .is_none_or(|s| s.restart_count < 1 || s.state != S::Initialized)
    {
        assert!(
            Instant::now() < deadline,
            "not restarted: {:?}",
            registry.get_status(&name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ids(&handle), ["boom", "second"]);
    assert_eq!(
        call(&loader, &name, "second", json!({})).unwrap(),
        json!({"hello": true})
    );
    match call(&loader, &name, "first", json!({})) {
        Err(CallError::Tool(ToolError::UnknownTool { tool, .. })) => assert_eq!(tool, "first"),
        other => panic!("{other:?}"),
    }
}
