//! Installed Python plugins (entry points of group `forgesyte.plugins`)
//! with the real `python3`: a throw-away "site" directory of packages with
//! `.dist-info` metadata, put on the interpreter's path by a wrapper script
//! (`PYTHONPATH=SITE exec python3 "$@"`) that is the loader's configured
//! interpreter. No network, nothing installed.
//!
//! A machine without `python3` on `PATH` fails these tests with that
//! reason (never a silent pass).

use crate::python::require_python;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_deps::DependencyChecker;
use forgesyte_deps::fake::FakeGpu;
use forgesyte_loader::entry_points::{self, EntryPoint};
use forgesyte_loader::{Loader, LoaderConfig, ProcessLimits, SupervisionPolicy};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use forgesyte_tests::write_script;
use serde_json::{Value, json};

/// A seed-style plugin: `class Plugin` with a `tools` dict and `run_tool`;
/// `hello` greets with `greeting`.
fn plugin_py(greeting: &str) -> String {
    format!(
        r#"
class Plugin:
    def __init__(self):
        self.tools = {{
            "hello": {{
                "handler": self.hello,
                "description": "Greets `name`.",
                "input_schema": {{"type": "object", "properties": {{"name": {{"type": "string"}}}}}},
                "output_schema": {{"type": "object"}},
            }},
        }}

    def run_tool(self, tool_name, args):
        return self.tools[tool_name]["handler"](args)

    def hello(self, args):
        return {{"message": "{greeting}, %s!" % args.get("name", "world"), "module": __name__}}
"#
    )
}

/// A site directory and the interpreter that sees it.
struct Site {
    _dir: tempfile::TempDir,
    root: PathBuf,
    site: PathBuf,
    python: PathBuf,
    plugins: PathBuf,
}

impl Site {
    fn new() -> Site {
        require_python();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let site = root.join("site");
        let plugins = root.join("plugins");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::create_dir_all(&plugins).unwrap();
        let python = root.join("python");
        write_script(
            &python,
            &format!("PYTHONPATH={} exec python3 \"$@\"", site.display()),
        )
        .unwrap();
        Site {
            _dir: dir,
            root,
            site,
            python,
            plugins,
        }
    }

    /// Package `pkg` (distribution `dist` `version`) with `files` and one
    /// entry point per `(name, value)`.
    fn package(
        &self,
        dist: &str,
        version: &str,
        pkg: &str,
        files: &[(&str, &str)],
        entry_points: &[(&str, &str)],
    ) -> &Site {
        let dir = self.site.join(pkg);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("__init__.py"), "").unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let info = self.site.join(format!("{dist}-{version}.dist-info"));
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("METADATA"),
            format!("Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"),
        )
        .unwrap();
        let mut text = String::from("[forgesyte.plugins]\n");
        for (name, value) in entry_points {
            text.push_str(&format!("{name} = {value}\n"));
        }
        std::fs::write(info.join("entry_points.txt"), text).unwrap();
        self
    }

    /// The four packages of the brief plus one clashing with a directory
    /// plugin, and that directory plugin.
    fn standard(&self) -> &Site {
        self.package(
            "mypkg",
            "1.0",
            "mypkg",
            &[
                ("plugin.py", &plugin_py("Hello")),
                ("weights.bin", "model weights"),
                (
                    "manifest.json",
                    r#"{"name": "mypkg-hello", "version": "2.0.0",
                        "description": "Hello from an installed package",
                        "models": {"weights": "weights.bin"},
                        "x-published": {"kept": true}}"#,
                ),
            ],
            &[("my-plugin", "mypkg.plugin:Plugin")],
        )
        .package(
            "plainpkg",
            "0.3",
            "plainpkg",
            &[("plugin.py", &plugin_py("Hi"))],
            &[("plain", "plainpkg.plugin:Plugin")],
        )
        .package(
            "brokenpkg",
            "1.0",
            "brokenpkg",
            &[(
                "plugin.py",
                "raise ImportError('brokenpkg needs libfoo, which is not installed')\n",
            )],
            &[("broken", "brokenpkg.plugin:Plugin")],
        )
        .package(
            "duppkg",
            "1.0",
            "duppkg",
            &[("plugin.py", &plugin_py("Dup"))],
            &[("mypkg-hello", "duppkg.plugin:Plugin")],
        )
        .package(
            "clashpkg",
            "1.0",
            "clashpkg",
            &[("plugin.py", &plugin_py("Clash"))],
            &[("dirplug", "clashpkg.plugin:Plugin")],
        );
        let dirplug = self.plugins.join("dirplug");
        std::fs::create_dir_all(&dirplug).unwrap();
        std::fs::write(dirplug.join("plugin.py"), plugin_py("Dir")).unwrap();
        std::fs::write(
            dirplug.join("manifest.json"),
            r#"{"name": "dirplug", "version": "1.0.0"}"#,
        )
        .unwrap();
        self
    }

    fn config(&self) -> LoaderConfig {
        LoaderConfig {
            python: Some(self.python.clone()),
            python_entry_points: true,
            threads: 2,
            process: ProcessLimits {
                init_timeout: Duration::from_secs(20),
                call_timeout: Duration::from_secs(10),
                memory_limit_mib: 0,
                max_response_bytes: 16 * 1024 * 1024,
            },
            supervision: SupervisionPolicy {
                max_restarts: 0,
                ..SupervisionPolicy::default()
            },
            ..LoaderConfig::default()
        }
    }

    fn loader(&self, registry: &Registry, config: LoaderConfig) -> Loader {
        let checker = DependencyChecker::builder()
            .gpu(Arc::new(FakeGpu::none("no GPU here (CUDA absent)")))
            .build();
        Loader::new(registry.clone(), Arc::new(checker), config)
    }
}

fn status(registry: &Registry, name: &str) -> (S, String) {
    let status = registry
        .get_status(name)
        .unwrap_or_else(|| panic!("{name} missing: {:#?}", registry.list_all()));
    (status.state, status.reason.unwrap_or_default())
}

fn hello(loader: &Loader, name: &str) -> Value {
    loader
        .handle(name)
        .unwrap_or_else(|| panic!("{name} has no handle"))
        .call("hello", &json!({"name": "ForgeSyte"}))
        .unwrap_or_else(|e| panic!("{name}: hello failed: {e:?}"))
}

#[test]
fn discover_reports_every_entry_point_without_importing_it() {
    let site = Site::new();
    site.standard();
    let marker = site.root.join("imported");
    site.package(
        "markpkg",
        "1.0",
        "markpkg",
        &[(
            "plugin.py",
            &format!("open({:?}, 'w').write('imported')\n", marker.display()),
        )],
        &[("marked", "markpkg.plugin:Plugin")],
    );
    let found = entry_points::discover(&site.python).unwrap();
    assert!(!marker.exists(), "discovery imported a plugin's module");
    let found: Vec<EntryPoint> = found.into_iter().filter(|e| e.name != "marked").collect();
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["broken", "dirplug", "my-plugin", "mypkg-hello", "plain"],
        "sorted by name: {found:#?}"
    );
    let mine: &EntryPoint = found.iter().find(|e| e.name == "my-plugin").unwrap();
    assert_eq!(mine.value, "mypkg.plugin:Plugin");
    assert_eq!(mine.module.as_deref(), Some("mypkg.plugin"));
    assert_eq!(mine.attr.as_deref(), Some("Plugin"));
    assert_eq!(mine.dist.as_deref(), Some("mypkg"));
    assert_eq!(mine.version.as_deref(), Some("1.0"));
    assert_eq!(mine.module_dir.as_deref(), Some(&*site.site.join("mypkg")));
    assert!(mine.has_manifest);
    assert_eq!(mine.error, None);
    let plain = found.iter().find(|e| e.name == "plain").unwrap();
    assert!(!plain.has_manifest);
    // The module that raises at import was located, not imported.
    let broken = found.iter().find(|e| e.name == "broken").unwrap();
    assert_eq!(broken.error, None, "{broken:#?}");
    assert_eq!(
        broken.module_dir.as_deref(),
        Some(&*site.site.join("brokenpkg"))
    );
}

#[test]
fn installed_packages_become_plugins_and_failures_stay_theirs() {
    let site = Site::new();
    // Beside the standard packages, one whose plugin is named like the key
    // a duplicate once took (`NAME.duplicate`): it keeps its name.
    site.standard().package(
        "legitpkg",
        "1.0",
        "legitpkg",
        &[("plugin.py", &plugin_py("Legit"))],
        &[("mypkg-hello.duplicate", "legitpkg.plugin:Plugin")],
    );
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    let report = loader.load_all(&site.plugins);
    assert_eq!(loader.entry_points_error(), None);
    let names: Vec<&str> = report.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "broken",
            "dirplug",
            "dirplug~duplicate",
            "mypkg-hello",
            "mypkg-hello.duplicate",
            "mypkg-hello~duplicate",
            "plain"
        ],
        "{report:#?}"
    );
    assert_eq!(
        hello(&loader, "mypkg-hello.duplicate")["message"],
        "Legit, ForgeSyte!"
    );

    // 1. manifest.json beside the module: its name and version win, the
    //    entry point supplies the code, the module's directory is the
    //    plugin's, unknown fields are kept.
    assert_eq!(
        status(&registry, "mypkg-hello"),
        (S::Initialized, String::new())
    );
    let st = registry.get_status("mypkg-hello").unwrap();
    assert_eq!(st.version.as_deref(), Some("2.0.0"));
    assert_eq!(
        st.description.as_deref(),
        Some("Hello from an installed package")
    );
    assert_eq!(
        loader.plugin_dir("mypkg-hello").unwrap(),
        site.site.join("mypkg")
    );
    let manifest = loader.manifest("mypkg-hello").unwrap();
    assert_eq!(manifest["runtime"], "python");
    assert_eq!(manifest["entrypoint"], "mypkg.plugin:Plugin");
    assert_eq!(manifest["x-published"]["kept"], true);
    assert_eq!(
        loader.entry_point("mypkg-hello").unwrap().name,
        "my-plugin",
        "the entry point is remembered"
    );
    let answer = hello(&loader, "mypkg-hello");
    assert_eq!(answer["message"], "Hello, ForgeSyte!");
    assert_eq!(answer["module"], "mypkg.plugin", "imported as the package");

    // 2. No manifest.json: one made of the entry point (its name, the
    //    distribution's version).
    assert_eq!(status(&registry, "plain"), (S::Initialized, String::new()));
    let st = registry.get_status("plain").unwrap();
    assert_eq!(st.version.as_deref(), Some("0.3"));
    let manifest = loader.manifest("plain").unwrap();
    assert_eq!(manifest["name"], "plain");
    assert_eq!(manifest["version"], "0.3");
    assert_eq!(manifest["runtime"], "python");
    assert_eq!(manifest["entrypoint"], "plainpkg.plugin:Plugin");
    assert_eq!(hello(&loader, "plain")["message"], "Hi, ForgeSyte!");

    // 3. A module that raises ImportError at import: FAILED, the seed's
    //    prefix and the exception's own words.
    let (state, reason) = status(&registry, "broken");
    assert_eq!(state, S::Failed);
    assert!(reason.starts_with("ImportError: "), "{reason}");
    assert!(
        reason.contains("brokenpkg needs libfoo, which is not installed"),
        "{reason}"
    );

    // 4. An entry point named like another plugin's manifest: entry points
    //    register in the order of their names ("my-plugin" before
    //    "mypkg-hello"), so the later one is FAILED under a key of its own,
    //    both sources named; the first is untouched.
    let (state, reason) = status(&registry, "mypkg-hello~duplicate");
    assert_eq!(state, S::Failed);
    for part in [
        "ManifestError: duplicate plugin name 'mypkg-hello'",
        "entry point 'my-plugin' (mypkg.plugin:Plugin) of mypkg 1.0",
        "this plugin is entry point 'mypkg-hello' (duppkg.plugin:Plugin) of duppkg 1.0",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    assert!(loader.handle("mypkg-hello~duplicate").is_none());
    // Reloaded by its key, it says the same: both sources.
    loader.reload("mypkg-hello~duplicate").unwrap();
    let (state, again) = status(&registry, "mypkg-hello~duplicate");
    assert_eq!((state, again), (S::Failed, reason));

    // 5. An entry point named like a directory plugin: the directory wins.
    assert_eq!(
        status(&registry, "dirplug"),
        (S::Initialized, String::new())
    );
    assert_eq!(hello(&loader, "dirplug")["message"], "Dir, ForgeSyte!");
    assert_eq!(
        loader.plugin_dir("dirplug").unwrap(),
        site.plugins.join("dirplug")
    );
    let (state, reason) = status(&registry, "dirplug~duplicate");
    assert_eq!(state, S::Failed);
    assert!(
        reason.contains("duplicate plugin name 'dirplug'"),
        "{reason}"
    );
    assert!(
        reason.contains(&site.plugins.join("dirplug").display().to_string()),
        "{reason}"
    );
    assert!(reason.contains("of clashpkg 1.0"), "{reason}");
    loader.reload("dirplug~duplicate").unwrap();
    assert_eq!(
        status(&registry, "dirplug~duplicate"),
        (S::Failed, reason),
        "reloaded by its key"
    );
}

#[test]
fn entry_points_are_only_read_when_asked_for() {
    let site = Site::new();
    site.standard();
    let registry = Registry::new();
    let config = LoaderConfig {
        python_entry_points: false,
        ..site.config()
    };
    let loader = site.loader(&registry, config);
    let report = loader.load_all(&site.plugins);
    let names: Vec<&str> = report.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["dirplug"]);
    assert_eq!(loader.entry_points_error(), None);
}

#[test]
fn a_discovery_that_fails_is_a_warning_and_the_directories_still_load() {
    let site = Site::new();
    site.standard();
    let registry = Registry::new();
    let config = LoaderConfig {
        python: Some(site.root.join("no-such-python")),
        ..site.config()
    };
    let loader = site.loader(&registry, config);
    let report = loader.load_all(&site.plugins);
    let names: Vec<&str> = report.plugins.iter().map(|p| p.name.as_str()).collect();
    // The directory plugin also needs that interpreter: UNAVAILABLE, naming it.
    assert_eq!(names, ["dirplug"]);
    let error = loader.entry_points_error().expect("the reason is kept");
    assert!(error.contains("no-such-python"), "{error}");
    assert!(error.ends_with(" not found"), "{error}");
    // A directory as the interpreter is said to be no file.
    let config = LoaderConfig {
        python: Some(site.root.clone()),
        ..site.config()
    };
    let loader = site.loader(&Registry::new(), config);
    loader.load_all(&site.plugins);
    assert_eq!(
        loader.entry_points_error(),
        Some(format!(
            "python interpreter {} (not a file)",
            site.root.display()
        ))
    );

    // An interpreter that answers nonsense, and one that hangs.
    let nonsense = site.root.join("nonsense");
    write_script(&nonsense, "echo 'not json'").unwrap();
    let err = entry_points::discover(&nonsense).unwrap_err();
    assert!(err.contains("unexpected output"), "{err}");
    assert!(err.contains("is it one?"), "{err}");
    let failing = site.root.join("failing");
    write_script(&failing, "echo 'Fatal Python error: boom' >&2; exit 3").unwrap();
    let err = entry_points::discover(&failing).unwrap_err();
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("Fatal Python error: boom"), "{err}");
    let hung = site.root.join("hung");
    write_script(&hung, "sleep 30 & wait").unwrap();
    let started = Instant::now();
    let err = entry_points::discover_with_timeout(&hung, Duration::from_millis(300)).unwrap_err();
    assert!(err.contains("timed out after 300ms (killed)"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the run was killed, its group too: {:?}",
        started.elapsed()
    );
}

/// A top-level single-file module shares its directory (`site-packages`)
/// with every other package: its stamp is its file's, not the whole
/// directory's. An unrelated package installed beside it made every
/// rescan reload it ("changed"), and each such plugin walked all of
/// `site-packages` at every pass. An entry point of a huge or malformed
/// value fails alone (a megabyte one lost every installed plugin).
#[test]
fn a_single_file_module_is_stamped_by_its_file_and_odd_values_fail_alone() {
    let site = Site::new();
    std::fs::write(site.site.join("solomod.py"), plugin_py("Solo")).unwrap();
    let info = site.site.join("solo-1.0.dist-info");
    std::fs::create_dir_all(&info).unwrap();
    std::fs::write(
        info.join("METADATA"),
        "Metadata-Version: 2.1\nName: solo\nVersion: 1.0\n",
    )
    .unwrap();
    let huge = format!("{}:Plugin", "m".repeat(2000));
    std::fs::write(
        info.join("entry_points.txt"),
        format!("[forgesyte.plugins]\nsolo = solomod:Plugin\ndots = a..b:C\nhuge = {huge}\n"),
    )
    .unwrap();
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(status(&registry, "solo").0, S::Initialized);
    assert_eq!(hello(&loader, "solo")["message"], "Solo, ForgeSyte!");
    let (state, reason) = status(&registry, "dots");
    assert_eq!(state, S::Failed);
    assert!(reason.contains("is not MODULE[:ATTR]"), "{reason}");
    let failed: Vec<String> = registry
        .list_all()
        .into_iter()
        .filter(|s| {
            s.reason
                .as_deref()
                .is_some_and(|r| r.contains("longer than 1024"))
        })
        .map(|s| s.name)
        .collect();
    assert_eq!(failed.len(), 1, "{:#?}", registry.list_all());

    let names = |list: &[forgesyte_loader::PluginLoadOutcome]| -> Vec<String> {
        list.iter().map(|o| o.name.clone()).collect()
    };
    // An unrelated package installed beside it: not a change of its.
    site.package("otherpkg", "1.0", "otherpkg", &[("x.py", "")], &[]);
    let report = loader.rescan();
    assert!(
        !names(&report.changed).contains(&"solo".to_owned()),
        "{report:#?}"
    );
    assert!(
        names(&report.unchanged).contains(&"solo".to_owned()),
        "{report:#?}"
    );
    // Its own file edited: changed, reloaded with the new code.
    std::fs::write(site.site.join("solomod.py"), plugin_py("Solo again")).unwrap();
    let report = loader.rescan();
    assert!(
        names(&report.changed).contains(&"solo".to_owned()),
        "{report:#?}"
    );
    assert_eq!(hello(&loader, "solo")["message"], "Solo again, ForgeSyte!");
}

#[test]
fn reload_all_loads_entry_points_installed_since() {
    let site = Site::new();
    site.standard();
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert!(registry.get_status("later").is_none());

    site.package(
        "laterpkg",
        "0.1",
        "laterpkg",
        &[("plugin.py", &plugin_py("Later"))],
        &[("later", "laterpkg.plugin:Plugin")],
    );
    // The broken package is fixed in place.
    std::fs::write(site.site.join("brokenpkg/plugin.py"), plugin_py("Fixed")).unwrap();
    let report = loader.reload_all();
    let later = report.plugins.iter().find(|p| p.name == "later");
    assert_eq!(later.map(|p| p.state), Some(S::Initialized), "{report:#?}");
    assert_eq!(hello(&loader, "later")["message"], "Later, ForgeSyte!");
    // Registered ones were reloaded from their entry points, not duplicated.
    assert_eq!(status(&registry, "broken"), (S::Initialized, String::new()));
    assert_eq!(hello(&loader, "broken")["message"], "Fixed, ForgeSyte!");
    assert_eq!(status(&registry, "mypkg-hello").0, S::Initialized);
    assert_eq!(
        hello(&loader, "mypkg-hello")["message"],
        "Hello, ForgeSyte!"
    );
    assert_eq!(status(&registry, "mypkg-hello~duplicate").0, S::Failed);
    assert_eq!(registry.list_all().len(), 7, "{:#?}", registry.list_all());
    // And one plugin alone.
    let one = loader.reload("plain").unwrap();
    assert_eq!(one.state, S::Initialized, "{one:#?}");
}

/// A reload by name asks the interpreter for the entry point again, as a
/// rescan does: a class moved to another module in an upgrade, and a
/// manifest the new version no longer ships, are loaded from what is
/// installed now (it imported the old module, or read the old manifest:
/// FAILED), and the rescan after it finds nothing changed (it restarted
/// the plugin again, its stamp the one of the load before). A package
/// whose directory is gone is refused and left serving, as a plugin whose
/// directory vanished is (it was FAILED `No module named`).
#[test]
fn a_reload_by_name_rediscovers_its_entry_point() {
    let site = Site::new();
    site.package(
        "movepkg",
        "1.0",
        "movepkg",
        &[
            ("plugin.py", &plugin_py("Before")),
            ("manifest.json", r#"{"name": "moving", "version": "1.0.0"}"#),
        ],
        &[("moving", "movepkg.plugin:Plugin")],
    );
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(hello(&loader, "moving")["message"], "Before, ForgeSyte!");

    let package = site.site.join("movepkg");
    std::fs::remove_file(package.join("plugin.py")).unwrap();
    std::fs::remove_file(package.join("manifest.json")).unwrap();
    site.package(
        "movepkg",
        "1.0",
        "movepkg",
        &[("plugin2.py", &plugin_py("After"))],
        &[("moving", "movepkg.plugin2:Plugin")],
    );
    let outcome = loader.reload("moving").unwrap();
    assert_eq!(outcome.state, S::Initialized, "{outcome:#?}");
    assert_eq!(hello(&loader, "moving")["message"], "After, ForgeSyte!");
    assert_eq!(
        loader.entry_point("moving").map(|ep| ep.value),
        Some("movepkg.plugin2:Plugin".to_owned())
    );
    let report = loader.rescan();
    let names = |list: &[forgesyte_loader::PluginLoadOutcome]| -> Vec<String> {
        list.iter().map(|o| o.name.clone()).collect()
    };
    assert_eq!(names(&report.changed), Vec::<String>::new(), "{report:#?}");
    assert_eq!(names(&report.unchanged), ["moving"], "{report:#?}");

    std::fs::rename(&package, site.site.join("movepkg.gone")).unwrap();
    let refused = loader.reload_with_others("moving").unwrap_err();
    assert!(
        matches!(
            refused,
            forgesyte_loader::ReloadRefused::EntryPointGone { .. }
        ),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("left serving"), "{refused}");
    assert_eq!(status(&registry, "moving").0, S::Initialized);
    assert_eq!(hello(&loader, "moving")["message"], "After, ForgeSyte!");
}

/// Two entry points of one package (`pkg.a:Plugin`, `pkg.b:Plugin`, no
/// manifest) share its directory: a reload by name of one, then a rescan
/// with nothing changed since, restarts neither (the change stamps were by
/// directory, and the sibling that did not take the fresh one kept the
/// stamp before the reload: restarted again).
#[test]
fn a_reload_of_one_of_two_entry_points_of_a_package_leaves_both_unchanged() {
    let site = Site::new();
    site.package(
        "twinpkg",
        "1.0",
        "twinpkg",
        &[("a.py", &plugin_py("A")), ("b.py", &plugin_py("B"))],
        &[
            ("twin-a", "twinpkg.a:Plugin"),
            ("twin-b", "twinpkg.b:Plugin"),
        ],
    );
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(hello(&loader, "twin-a")["message"], "A, ForgeSyte!");
    assert_eq!(hello(&loader, "twin-b")["message"], "B, ForgeSyte!");
    std::fs::write(site.site.join("twinpkg/b.py"), plugin_py("B2")).unwrap();
    for name in ["twin-a", "twin-b"] {
        let outcome = loader.reload(name).unwrap();
        assert_eq!(outcome.state, S::Initialized, "{outcome:#?}");
    }
    assert_eq!(hello(&loader, "twin-b")["message"], "B2, ForgeSyte!");
    let report = loader.rescan();
    let names = |list: &[forgesyte_loader::PluginLoadOutcome]| -> Vec<String> {
        list.iter().map(|o| o.name.clone()).collect()
    };
    assert_eq!(names(&report.changed), Vec::<String>::new(), "{report:#?}");
    assert_eq!(
        names(&report.unchanged),
        ["twin-a", "twin-b"],
        "{report:#?}"
    );
}

/// Two distributions declare entry point `ocr`: the second is the
/// duplicate (`ocr~duplicate`, FAILED). Once the first is uninstalled, a
/// rescan gives the second its name (it stayed FAILED for good, told that
/// a rescan would load it under its name).
#[test]
fn an_installed_duplicate_takes_its_name_once_it_is_free() {
    let site = Site::new();
    for dist in ["adist", "bdist"] {
        site.package(
            dist,
            "1.0",
            dist,
            &[("plugin.py", &plugin_py(dist))],
            &[("ocr", &format!("{dist}.plugin:Plugin"))],
        );
    }
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(status(&registry, "ocr"), (S::Initialized, String::new()));
    assert_eq!(status(&registry, "ocr~duplicate").0, S::Failed);
    let holder = hello(&loader, "ocr")["message"]
        .as_str()
        .unwrap()
        .trim_end_matches(", ForgeSyte!")
        .to_owned();
    let other = if holder == "adist" { "bdist" } else { "adist" };
    // `pip uninstall` of the holder.
    std::fs::remove_dir_all(site.site.join(&holder)).unwrap();
    std::fs::remove_dir_all(site.site.join(format!("{holder}-1.0.dist-info"))).unwrap();
    let report = loader.rescan();
    assert_eq!(
        status(&registry, "ocr"),
        (S::Initialized, String::new()),
        "{report:#?}"
    );
    assert_eq!(
        hello(&loader, "ocr")["message"],
        format!("{other}, ForgeSyte!")
    );
    assert!(
        registry.get_status("ocr~duplicate").is_none(),
        "{report:#?}"
    );
}

#[test]
fn the_pre_3_10_api_finds_the_same_entry_points() {
    let site = Site::new();
    site.standard();
    // Python 3.8 and 3.9: `entry_points()` takes no `group`.
    let compat = site.root.join("compat");
    std::fs::create_dir_all(&compat).unwrap();
    std::fs::write(
        compat.join("sitecustomize.py"),
        "import importlib.metadata as m\n\
         _real = m.entry_points\n\
         def entry_points(**params):\n\
         \x20   if params:\n\
         \x20       raise TypeError('entry_points() got an unexpected keyword argument')\n\
         \x20   return _real()\n\
         m.entry_points = entry_points\n",
    )
    .unwrap();
    let old_python = site.root.join("python-old-api");
    write_script(
        &old_python,
        &format!(
            "PYTHONPATH={}:{} exec python3 \"$@\"",
            compat.display(),
            site.site.display()
        ),
    )
    .unwrap();
    let new_api = entry_points::discover(&site.python).unwrap();
    let old_api = entry_points::discover(&old_python).unwrap();
    assert_eq!(old_api, new_api);
    assert_eq!(old_api.len(), 5, "{old_api:#?}");
}

#[test]
fn a_bad_shipped_manifest_or_entry_point_value_fails_that_plugin_alone() {
    let site = Site::new();
    site.package(
        "badjson",
        "1.0",
        "badjson",
        &[
            ("plugin.py", &plugin_py("Bad")),
            ("manifest.json", "{ not json"),
        ],
        &[("bad-json", "badjson.plugin:Plugin")],
    )
    .package(
        "toplevel",
        "1.0",
        "toplevel",
        &[],
        // A top-level module without its class cannot be told from a file.
        &[("top", "toplevel")],
    )
    .package(
        "goodpkg",
        "1.0",
        "goodpkg",
        &[("plugin.py", &plugin_py("Good"))],
        &[("good", "goodpkg.plugin:Plugin")],
    );
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    let (state, reason) = status(&registry, "bad-json");
    assert_eq!(state, S::Failed);
    assert!(
        reason.starts_with("ManifestError: invalid JSON in "),
        "{reason}"
    );
    assert!(reason.contains("badjson/manifest.json"), "{reason}");
    // Its distribution's version, at load and after a reload or rescan
    // (it read `unknown` after one).
    let version = |registry: &Registry| registry.get_status("bad-json").unwrap().version;
    assert_eq!(version(&registry).as_deref(), Some("1.0"));
    loader.reload("bad-json");
    assert_eq!(version(&registry).as_deref(), Some("1.0"), "after a reload");
    loader.rescan();
    assert_eq!(version(&registry).as_deref(), Some("1.0"), "after a rescan");
    let (state, reason) = status(&registry, "top");
    assert_eq!(state, S::Failed);
    assert!(
        reason.contains("invalid field 'entrypoint'") && reason.contains("'module:Plugin'"),
        "{reason}"
    );
    assert_eq!(status(&registry, "good"), (S::Initialized, String::new()));
    assert_eq!(hello(&loader, "good")["message"], "Good, ForgeSyte!");
}

/// Names asked for by valid manifests, installed ones included, are taken
/// first: a broken directory manifest that asks for an installed plugin's
/// name does not take it, nor does a directory duplicate's fallback key
/// (its directory's name) take the name an installed plugin asks for.
#[test]
fn installed_plugins_keep_their_names_from_broken_and_duplicate_directories() {
    let site = Site::new();
    for (name, ep) in [("vispkg", "vision"), ("ocrpkg", "ocr")] {
        site.package(
            name,
            "1.0",
            name,
            &[("plugin.py", &plugin_py("Installed"))],
            &[(ep, &format!("{name}.plugin:Plugin"))],
        );
    }
    let write = |dir: &str, manifest: &str| {
        let dir = site.plugins.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        std::fs::write(dir.join("plugin.py"), plugin_py("Directory")).unwrap();
    };
    write("a_broken", r#"{"name": "vision", "version": []}"#);
    write("b_first", r#"{"name": "dup", "version": "1.0.0"}"#);
    write("ocr", r#"{"name": "dup", "version": "1.0.0"}"#);
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    for installed in ["vision", "ocr"] {
        assert_eq!(
            status(&registry, installed),
            (S::Initialized, String::new()),
            "{installed}"
        );
        assert_eq!(
            hello(&loader, installed)["message"],
            "Installed, ForgeSyte!"
        );
    }
    let (state, reason) = status(&registry, "a_broken");
    assert_eq!(state, S::Failed);
    assert!(reason.contains("invalid field 'version'"), "{reason}");
    let (state, reason) = status(&registry, "ocr~duplicate");
    assert_eq!(state, S::Failed);
    assert!(reason.contains("duplicate plugin name 'dup'"), "{reason}");
}

/// An installed package's files never shadow the standard library: its
/// directory is not put first on the runner's `sys.path`.
#[test]
fn an_installed_packages_files_do_not_shadow_the_standard_library() {
    let site = Site::new();
    let plugin = format!(
        "import statistics\n{}\n    def mean(self, args):\n        return {{\"mean\": statistics.mean([1, 2, 3])}}\n",
        plugin_py("Hi")
    );
    site.package(
        "shadow",
        "1.0",
        "shadowpkg",
        &[
            ("plugin.py", &plugin),
            (
                "statistics.py",
                "raise ImportError('the package shadowed statistics')\n",
            ),
        ],
        &[("shadow", "shadowpkg.plugin:Plugin")],
    );
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    let (state, reason) = status(&registry, "shadow");
    assert_eq!(state, S::Initialized, "{reason}");
    assert_eq!(hello(&loader, "shadow")["message"], "Hi, ForgeSyte!");
}

/// One distribution that cannot be read, or that declares far too many
/// entry points, is an error of its own: every other installed plugin is
/// still discovered and loads.
#[test]
fn a_broken_or_huge_distribution_costs_only_itself() {
    let site = Site::new();
    site.package(
        "goodpkg",
        "1.0",
        "goodpkg",
        &[("plugin.py", &plugin_py("Good"))],
        &[("good", "goodpkg.plugin:Plugin")],
    )
    .package("hugepkg", "1.0", "hugepkg", &[], &[]);
    let many: String = (0..65)
        .map(|i| format!("huge-{i} = hugepkg.plugin:Plugin\n"))
        .collect();
    let info = |dist: &str| site.site.join(format!("{dist}-1.0.dist-info"));
    std::fs::write(
        info("hugepkg").join("entry_points.txt"),
        format!("[forgesyte.plugins]\n{many}"),
    )
    .unwrap();
    // A malformed line in another group, in a package that is no plugin,
    // and in one that declares the group.
    for (dist, group) in [
        ("toolpkg", "[console_scripts]"),
        ("brokenplug", "[forgesyte.plugins]"),
    ] {
        std::fs::create_dir_all(info(dist)).unwrap();
        std::fs::write(
            info(dist).join("METADATA"),
            format!("Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n"),
        )
        .unwrap();
        std::fs::write(
            info(dist).join("entry_points.txt"),
            format!("{group}\nbroken\n"),
        )
        .unwrap();
    }
    let found = entry_points::discover(&site.python).unwrap();
    let named = |name: &str| found.iter().find(|ep| ep.name == name);
    assert!(
        named("good").is_some_and(|ep| ep.error.is_none()),
        "{found:#?}"
    );
    let huge = named("hugepkg").expect("the huge distribution's error");
    assert!(
        huge.error
            .as_deref()
            .is_some_and(|e| e.contains("65 entry points")),
        "{huge:?}"
    );
    let broken = named("brokenplug").expect("the broken plugin distribution's error");
    assert!(
        broken
            .error
            .as_deref()
            .is_some_and(|e| e.contains("cannot be read")),
        "{broken:?}"
    );
    assert!(named("toolpkg").is_none(), "{found:#?}");
    assert_eq!(found.len(), 3, "{found:#?}");
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(status(&registry, "good"), (S::Initialized, String::new()));
    // Each FAILED with the discovery's own reason.
    let (state, reason) = status(&registry, "hugepkg");
    assert_eq!(state, S::Failed);
    assert!(
        reason.starts_with("ManifestError: invalid field 'entry point': distribution hugepkg: it declares 65 entry points"),
        "{reason}"
    );
    let (state, reason) = status(&registry, "brokenplug");
    assert_eq!(state, S::Failed);
    assert!(
        reason.contains("its entry points cannot be read"),
        "{reason}"
    );
}

/// A distribution whose `entry_points.txt` is not UTF-8 but declares the
/// group is FAILED under its own name, not left out.
#[test]
fn a_distribution_whose_entry_points_are_not_utf8_is_failed_not_lost() {
    let site = Site::new();
    site.package(
        "latinpkg",
        "1.0",
        "latinpkg",
        &[("plugin.py", &plugin_py("Hola"))],
        &[],
    );
    std::fs::write(
        site.site
            .join("latinpkg-1.0.dist-info")
            .join("entry_points.txt"),
        b"[forgesyte.plugins]\nlatin\xe9 = latinpkg.plugin:Plugin\n",
    )
    .unwrap();
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    let (state, reason) = status(&registry, "latinpkg");
    assert_eq!(state, S::Failed, "{reason}");
    assert!(
        reason.contains("its entry points cannot be read: UnicodeDecodeError"),
        "{reason}"
    );
}

/// One whose `METADATA` is not UTF-8 (its entry points are fine) is
/// FAILED under its directory's name, saying it is the metadata; one
/// whose `METADATA` is not a file reads, as Python reads it, as none: the
/// plugin loads, its version unknown.
#[test]
fn a_distribution_whose_metadata_cannot_be_read_says_so() {
    let site = Site::new();
    for name in ["latinmeta", "dirmeta"] {
        site.package(
            name,
            "1.0",
            name,
            &[("plugin.py", &plugin_py("Hola"))],
            &[(name, &format!("{name}.plugin:Plugin"))],
        );
    }
    let info = |name: &str| site.site.join(format!("{name}-1.0.dist-info"));
    std::fs::write(
        info("latinmeta").join("METADATA"),
        b"Metadata-Version: 2.1\nName: latinmeta\nSummary: caf\xe9\n",
    )
    .unwrap();
    std::fs::remove_file(info("dirmeta").join("METADATA")).unwrap();
    std::fs::create_dir(info("dirmeta").join("METADATA")).unwrap();
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    let (state, reason) = status(&registry, "latinmeta");
    assert_eq!(state, S::Failed, "{reason}");
    assert!(
        reason.starts_with(
            "ManifestError: invalid field 'entry point': distribution latinmeta: its metadata \
             cannot be read: UnicodeDecodeError"
        ),
        "{reason}"
    );
    assert_eq!(
        status(&registry, "dirmeta"),
        (S::Initialized, String::new())
    );
    assert_eq!(
        registry
            .get_status("dirmeta")
            .and_then(|s| s.version)
            .as_deref(),
        Some("unknown")
    );
}

/// A module under nested namespace packages (no `__init__.py` at any
/// level) is found without importing anything, and its shipped manifest
/// is read; one that only its package's import would find is FAILED with
/// an `ImportError` saying so, never loaded from site-packages with a
/// made-up manifest.
#[test]
fn nested_namespace_modules_are_found_and_unfindable_ones_fail() {
    let site = Site::new();
    let sub = site.site.join("nsroot").join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("plugin.py"), plugin_py("Namespaced")).unwrap();
    std::fs::write(
        sub.join("manifest.json"),
        r#"{"name": "ns-shipped", "version": "7.7.0"}"#,
    )
    .unwrap();
    let dynamic = site.site.join("dynp");
    std::fs::create_dir_all(dynamic.join("_impl")).unwrap();
    std::fs::write(
        dynamic.join("__init__.py"),
        "import os\n__path__ = [os.path.join(os.path.dirname(__file__), '_impl')]\n",
    )
    .unwrap();
    std::fs::write(dynamic.join("_impl").join("plugin.py"), plugin_py("Dyn")).unwrap();
    for (dist, value) in [
        ("nsp", "nsroot.sub.plugin:Plugin"),
        ("dynp", "dynp.plugin:Plugin"),
    ] {
        let info = site.site.join(format!("{dist}-1.0.dist-info"));
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("METADATA"),
            format!("Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n"),
        )
        .unwrap();
        std::fs::write(
            info.join("entry_points.txt"),
            format!("[forgesyte.plugins]\n{dist} = {value}\n"),
        )
        .unwrap();
    }
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    let (state, reason) = status(&registry, "ns-shipped");
    assert_eq!(state, S::Initialized, "{reason}");
    assert_eq!(loader.plugin_dir("ns-shipped"), Some(sub));
    assert_eq!(
        hello(&loader, "ns-shipped")["message"],
        "Namespaced, ForgeSyte!"
    );
    let (state, reason) = status(&registry, "dynp");
    assert_eq!(state, S::Failed, "{reason}");
    assert!(
        reason.starts_with("ImportError: ModuleNotFoundError: No module named 'dynp.plugin'"),
        "{reason}"
    );
    assert!(reason.contains("builds its __path__"), "{reason}");
    assert!(
        reason.ends_with("(declared by entry point 'dynp' (dynp.plugin:Plugin) of dynp 1.0)"),
        "the distribution to reinstall is named: {reason}"
    );
}

/// What the interpreter prints on stdout around the discovery's answer (a
/// `sitecustomize` as it starts, an `atexit` hook as it ends) is not taken
/// for the answer: the discovery and the dependency check still work.
#[test]
fn output_of_the_interpreters_start_and_exit_does_not_break_discovery() {
    let site = Site::new();
    std::fs::write(
        site.site.join("sitecustomize.py"),
        "import atexit, sys\nsys.stdout.write('notice from site\\n')\n\
         atexit.register(lambda: sys.stdout.write('bye [1, 2]'))\n",
    )
    .unwrap();
    site.package(
        "chatpkg",
        "1.0",
        "chatpkg",
        &[
            ("plugin.py", &plugin_py("Chat")),
            (
                "manifest.json",
                r#"{"name": "chat", "version": "1.0.0", "dependencies": ["json", "no_such_pkg_x"]}"#,
            ),
        ],
        &[("chat", "chatpkg.plugin:Plugin")],
    );
    let found = entry_points::discover(&site.python).unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(loader.entry_points_error(), None);
    assert_eq!(
        status(&registry, "chat"),
        (
            S::Unavailable,
            "Missing dependencies: no_such_pkg_x".to_owned()
        )
    );
}

/// A plugin module installed in a zip archive on `sys.path` is found
/// (though not as a file of its own) and loads by name; it has no
/// directory of its own, so no shipped manifest. A distribution whose
/// metadata has no `Name` goes by its directory's name.
#[test]
fn a_zipped_module_loads_and_a_nameless_distribution_is_named() {
    let site = Site::new();
    let zip = site.site.join("zplug.zip");
    let made = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import zipfile\nwith zipfile.ZipFile({:?}, 'w') as z:\n    \
             z.writestr('zpkg/__init__.py', '')\n    z.writestr('zpkg/plug.py', {:?})\n",
            zip.display().to_string(),
            plugin_py("Zipped")
        ))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(
        site.site.join("sitecustomize.py"),
        format!(
            "import sys\nsys.path.append({:?})\n",
            zip.display().to_string()
        ),
    )
    .unwrap();
    for (dir, metadata, entry_points) in [
        (
            "zdist-1.0.dist-info",
            "Metadata-Version: 2.1\nName: zdist\nVersion: 1.0\n",
            "[forgesyte.plugins]\nzplug = zpkg.plug:Plugin\n".to_owned(),
        ),
        (
            "nameless-2.0.dist-info",
            "Metadata-Version: 2.1\nVersion: 2.0\n",
            format!(
                "[forgesyte.plugins]\n{}",
                (0..65)
                    .map(|i| format!("n{i} = nopkg.plugin:Plugin\n"))
                    .collect::<String>()
            ),
        ),
    ] {
        let info = site.site.join(dir);
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(info.join("METADATA"), metadata).unwrap();
        std::fs::write(info.join("entry_points.txt"), entry_points).unwrap();
    }
    let registry = Registry::new();
    let loader = site.loader(&registry, site.config());
    loader.load_all(&site.plugins);
    assert_eq!(loader.entry_points_error(), None);
    let (state, reason) = status(&registry, "zplug");
    assert_eq!(state, S::Initialized, "{reason}");
    assert_eq!(hello(&loader, "zplug")["message"], "Zipped, ForgeSyte!");
    let (state, reason) = status(&registry, "nameless");
    assert_eq!(state, S::Failed, "{reason}");
    assert!(
        reason.contains("distribution nameless: it declares 65 entry points"),
        "{reason}"
    );
}
