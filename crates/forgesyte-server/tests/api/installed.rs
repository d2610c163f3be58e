//! Installed Python plugins through the real binary: `forgesyte check
//! --python-entry-points --python WRAPPER --json EMPTYDIR` (and the
//! environment variable), a discovery that fails, and `serve` calling an
//! installed plugin's tool over HTTP. The "installation" is a throw-away
//! site directory with `.dist-info` metadata that a wrapper interpreter
//! (`PYTHONPATH=SITE exec python3 "$@"`) puts on its path: no network.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Forgesyte, plugin_named, run_forgesyte, site_python, write_dist_info};

const PLUGIN_PY: &str = r#"
class Plugin:
    def __init__(self):
        self.tools = {
            "hello": {
                "handler": lambda args: {"message": "Hello, %s!" % args.get("name", "world")},
                "description": "Greets `name`.",
                "input_schema": {"type": "object"},
                "output_schema": {"type": "object"},
            },
        }

    def run_tool(self, tool_name, args):
        return self.tools[tool_name]["handler"](args)
"#;

/// A site with `mypkg` (entry point `my-plugin`, a manifest naming it
/// `hello-installed`) and, when `broken`, `brokenpkg` (raises at import),
/// the wrapper interpreter, and an empty plugins directory.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(broken: bool) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        let write = |path: PathBuf, text: &str| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let package = |dist: &str, ep: &str, files: &[(&str, &str)]| {
            write(site.join(dist).join("__init__.py"), "");
            for (name, text) in files {
                write(site.join(dist).join(name), text);
            }
            write_dist_info(
                &site,
                dist,
                dist,
                "1.0",
                &format!("{ep} = {dist}.plugin:Plugin\n"),
            );
        };
        package(
            "mypkg",
            "my-plugin",
            &[
                ("plugin.py", PLUGIN_PY),
                (
                    "manifest.json",
                    r#"{"name": "hello-installed", "version": "2.0.0"}"#,
                ),
            ],
        );
        if broken {
            package(
                "brokenpkg",
                "broken",
                &[("plugin.py", "raise ImportError('brokenpkg is broken')\n")],
            );
        }
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        site_python(&dir.path().join("python"), &site);
        Site { dir }
    }

    fn python(&self) -> String {
        self.dir.path().join("python").display().to_string()
    }

    fn plugins(&self) -> String {
        self.dir.path().join("plugins").display().to_string()
    }
}

/// `forgesyte ARGS…` with extra environment: exit code, stdout, stderr.
fn forgesyte(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    run_forgesyte(args, env)
}

#[test]
fn check_lists_installed_plugins_with_the_flag_or_the_variable() {
    let site = Site::new(true);
    let (python, plugins) = (site.python(), site.plugins());
    let (code, out, err) = forgesyte(
        &[
            "check",
            "--python-entry-points",
            "--python",
            &python,
            "--json",
            &plugins,
        ],
        &[],
    );
    assert_eq!(code, 1, "the broken one is not available: {out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list:#}");
    let hello = plugin_named(&list, "hello-installed");
    assert_eq!(hello["state"], "INITIALIZED", "{hello:#}");
    assert_eq!(hello["version"], "2.0.0");
    let broken = plugin_named(&list, "broken");
    assert_eq!(broken["state"], "FAILED");
    let reason = broken["reason"].as_str().unwrap();
    assert!(reason.starts_with("ImportError: "), "{reason}");
    assert!(reason.contains("brokenpkg is broken"), "{reason}");

    // The variable does what the flag does; without either, nothing.
    let (code, out, _) = forgesyte(
        &["check", "--python", &python, "--json", &plugins],
        &[("FORGESYTE_PYTHON_ENTRY_POINTS", "true")],
    );
    assert_eq!(code, 1);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list:#}");
    let (code, out, err) = forgesyte(&["check", "--python", &python, "--json", &plugins], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        Value::Array(vec![])
    );

    // Installed plugins alone: no plugins directory is needed (the default,
    // ./plugins, does not exist where the test runs), as for `serve`; a
    // directory named must exist.
    let scratch = tempfile::tempdir().unwrap();
    // `check` of installed plugins, run where ./plugins does not exist.
    let check_in_scratch = |last: &str| {
        crate::support::forgesyte_command()
            .current_dir(scratch.path())
            .args(["check", "--python-entry-points", "--python", &python, last])
            .output()
            .unwrap()
    };
    let output = check_in_scratch("--json");
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{out}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list:#}");
    let (code, _, err) = forgesyte(
        &[
            "check",
            "--python-entry-points",
            "--python",
            &python,
            "/no/such/dir",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // Named, even as the default's own words: checked.
    let output = check_in_scratch("./plugins");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // None installed either: said on stderr (it said nothing), exit 0 as
    // for an empty directory.
    let empty_site = scratch.path().join("empty-site");
    std::fs::create_dir_all(&empty_site).unwrap();
    let bare = scratch.path().join("bare-python");
    site_python(&bare, &empty_site);
    let output = crate::support::forgesyte_command()
        .current_dir(scratch.path())
        .args(["check", "--python-entry-points", "--python"])
        .arg(&bare)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(
        err.contains("no installed package declares a forgesyte.plugins entry point"),
        "{err}"
    );
}

#[test]
fn check_says_when_installed_plugins_could_not_be_listed() {
    let site = Site::new(false);
    let plugins = site.plugins();
    let missing = site.dir.path().join("no-python").display().to_string();
    let (code, out, err) = forgesyte(
        &[
            "check",
            "--python-entry-points",
            "--python",
            &missing,
            &plugins,
        ],
        &[],
    );
    assert_eq!(code, 1, "there may be plugins it did not see: {out}{err}");
    let summary = out.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("0 plugins: 0 loaded, 0 failed, 0 unavailable"),
        "{out}"
    );
    assert!(
        summary.contains("; entry points (forgesyte.plugins) not discovered: "),
        "{out}"
    );
    assert!(summary.contains(&missing), "{out}");
    // With --json the array stays an array; the reason goes to stderr.
    let (code, out, err) = forgesyte(
        &[
            "check",
            "--python-entry-points",
            "--python",
            &missing,
            "--json",
            &plugins,
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        Value::Array(vec![])
    );
    assert!(err.contains("not discovered"), "{err}");
    assert!(err.contains(&missing), "{err}");
}

/// A server asked for installed plugins whose interpreter cannot list them
/// says so in health (`degraded`) and readiness (check `entry-points`): it
/// answered `ok` with none of them there. A plugin directory still loads.
#[test]
fn serve_says_when_installed_plugins_could_not_be_listed() {
    let site = Site::new(false);
    let plugins = site.plugins();
    let missing = site.dir.path().join("no-python").display().to_string();
    let server = Forgesyte::start_with_env(
        &[
            "--plugins",
            &plugins,
            "--python",
            &missing,
            "--python-entry-points",
        ],
        &[("FORGESYTE_ADMIN_TOKEN", TOKEN)],
    );
    server.wait_loaded();
    let health = server.get("/v1/health").json();
    assert_eq!(health["status"], "degraded", "{health}");
    // A rescan's report says so too (it read as all unchanged).
    let reply = crate::support::admin_post(server.addr, "/v1/plugins/reload", TOKEN);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.json()["warning"].as_str().is_some_and(|w| w
            .starts_with("the installed plugins could not be listed (")
            && w.contains(&missing)),
        "{}",
        reply.text()
    );
    let ready = server.get("/readyz?verbose");
    assert_eq!(ready.status, 503, "{}", ready.text());
    let checks = ready.json()["checks"].clone();
    let check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "entry-points")
        .cloned()
        .unwrap_or_default();
    assert_eq!(check["ok"], false, "{checks}");
    assert!(
        check["detail"]
            .as_str()
            .is_some_and(|d| d.contains("were not discovered") && d.contains(&missing)),
        "{checks}"
    );
}

#[test]
fn serve_runs_an_installed_plugins_tool_over_http() {
    let site = Site::new(false);
    let (python, plugins) = (site.python(), site.plugins());
    let server = Forgesyte::start(&[
        "--plugins",
        &plugins,
        "--python",
        &python,
        "--python-entry-points",
    ]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/hello-installed/health").json();
    assert_eq!(
        health["state"],
        "INITIALIZED",
        "{health:#}\n{}",
        server.log()
    );
    let manifest = server.get("/v1/plugins/hello-installed/manifest").json();
    assert_eq!(
        manifest["entrypoint"], "mypkg.plugin:Plugin",
        "{manifest:#}"
    );
    assert_eq!(manifest["runtime"], "python");
    let run = server.run(
        "hello-installed",
        "hello",
        r#"{"args": {"name": "ForgeSyte"}}"#,
    );
    assert_eq!(run.status, 200, "{}", run.text());
    assert_eq!(run.json()["result"]["message"], "Hello, ForgeSyte!");
}

/// Installed plugins alone, and no plugins directory: served, ready, and
/// the default directory's absence said at INFO, at the start and at a
/// rescan, not as a WARN each time; a directory named and missing is still
/// a WARN (a mistyped `--plugins`).
#[test]
fn installed_plugins_alone_need_no_default_plugins_directory() {
    let site = Site::new(false);
    let python = site.python();
    let empty = tempfile::tempdir().unwrap();
    let args = ["--python", python.as_str(), "--python-entry-points"];
    let server = Forgesyte::start_in(Some(empty.path()), &args, &[]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/hello-installed/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health:#}");
    assert_eq!(server.get("/readyz").status, 200, "{}", server.log());
    crate::rescan::hangup(&server);
    crate::rescan::wait_for("the rescan", Duration::from_secs(20), &server, || {
        server
            .log()
            .contains("Rescan: no plugins directory")
            .then_some(())
    });
    let log = server.log();
    let info = |what: &str| {
        log.lines()
            .any(|line| line.contains(" INFO ") && line.contains(what))
    };
    assert!(info("No plugins directory ./plugins"), "{log}");
    assert!(info("Rescan: no plugins directory ./plugins"), "{log}");
    assert!(
        !log.lines().any(
            |line| line.contains(" WARN ") && line.to_lowercase().contains("plugins directory")
        ),
        "{log}"
    );

    let named = format!("{}/not-there", site.plugins());
    let server = Forgesyte::start_in(
        Some(empty.path()),
        &[
            "--plugins",
            &named,
            "--python",
            &python,
            "--python-entry-points",
        ],
        &[],
    );
    server.wait_loaded();
    let log = server.log();
    assert!(
        log.lines().any(|line| line.contains(" WARN ")
            && line.contains("Plugins directory not found: ")
            && line.contains("not-there")),
        "{log}"
    );
}

/// The admin token of the tests that reload installed plugins.
const TOKEN: &str = "installed-test-token-0123456789";

/// A server of installed plugins alone (an empty plugins directory, the
/// admin token), its interpreter's site `scratch/site` written by
/// `install` first: the site, and the server, loaded.
fn serve_site(scratch: &Path, install: impl FnOnce(&Path)) -> (PathBuf, Forgesyte) {
    let site = scratch.join("site");
    install(&site);
    let python = scratch.join("python");
    site_python(&python, &site);
    let empty = scratch.join("plugins");
    std::fs::create_dir_all(&empty).unwrap();
    let server = Forgesyte::start_with_env(
        &[
            "--plugins",
            &empty.display().to_string(),
            "--python",
            &python.display().to_string(),
            "--python-entry-points",
        ],
        &[("FORGESYTE_ADMIN_TOKEN", TOKEN)],
    );
    server.wait_loaded();
    (site, server)
}

/// Installed plugins alone, none installed yet, and no default plugins
/// directory: ready (nothing failed), and a package installed later is
/// served after a rescan, still ready. The start read as a failed pass
/// (an ERROR, not ready), and no rescan that did not list the missing
/// directory made it ready: a pod that never became ready.
#[test]
fn installed_plugins_alone_are_ready_with_none_installed_yet() {
    let scratch = tempfile::tempdir().unwrap();
    let site = scratch.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let python = scratch.path().join("python");
    site_python(&python, &site);
    let cwd = scratch.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let server = Forgesyte::start_in(
        Some(&cwd),
        &[
            "--python",
            &python.display().to_string(),
            "--python-entry-points",
        ],
        &[("FORGESYTE_ADMIN_TOKEN", TOKEN)],
    );
    server.wait_loaded();
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 200, "{}\n{}", ready.text(), server.log());
    assert!(!server.log().contains(" ERROR "), "{}", server.log());
    install_fact(&site, "plugin", 1, true);
    let reply = crate::support::admin_post(server.addr, "/v1/plugins/reload", TOKEN);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let run = server.run("fact", "t", r#"{"args": {}}"#);
    assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 200, "{}\n{}", ready.text(), server.log());
    assert_eq!(server.get("/v1/health").json()["status"], "ok");
}

/// An installed plugin `fact` of distribution `factpkg`, its class in
/// module `module` of package `factpkg` (a manifest beside it when
/// `manifest`), its tool `t` answering `{"v": version}`: written (again)
/// into `site`, as an upgrade leaves it.
fn install_fact(site: &std::path::Path, module: &str, version: u32, manifest: bool) {
    let package = site.join("factpkg");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("__init__.py"), "").unwrap();
    std::fs::write(
        package.join(format!("{module}.py")),
        format!(
            r#"
class Plugin:
    tools = {{"t": {{"handler": "t", "description": "", "input_schema": {{}}, "output_schema": {{}}}}}}

    def t(self):
        return {{"v": {version}}}
"#
        ),
    )
    .unwrap();
    let path = package.join("manifest.json");
    if manifest {
        std::fs::write(&path, r#"{"name": "fact", "version": "1.0.0"}"#).unwrap();
    } else if path.exists() {
        std::fs::remove_file(&path).unwrap();
    }
    write_dist_info(
        site,
        "factpkg",
        "factpkg",
        "1.0",
        &format!("fact = factpkg.{module}:Plugin\n"),
    );
}

/// A reload by name of an installed plugin asks the interpreter for its
/// entry point again, as a rescan does: a class moved to another module
/// and a manifest the new version no longer ships are loaded from what is
/// installed now (it imported the old module, and read the old manifest:
/// FAILED); the rescan after it finds nothing changed (it restarted the
/// plugin again); and one whose package directory is gone is left serving
/// with 409, as a plugin whose directory vanished is (it was FAILED
/// `No module named`).
#[test]
fn a_reload_by_name_of_an_installed_plugin_loads_what_is_installed_now() {
    let scratch = tempfile::tempdir().unwrap();
    let (site, server) = serve_site(scratch.path(), |site| {
        install_fact(site, "plugin", 1, true);
    });
    let served = |v: u32| {
        let run = server.run("fact", "t", r#"{"args": {}}"#);
        assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
        assert_eq!(run.json()["result"]["v"], v, "{}", run.text());
    };
    served(1);
    let reload = || crate::support::admin_post(server.addr, "/v1/plugins/fact/reload", TOKEN);
    let rescan = || {
        let reply = crate::support::admin_post(server.addr, "/v1/plugins/reload", TOKEN);
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    };

    // The class moves to another module, the entry point with it; the
    // new version ships no manifest (one is made of the entry point).
    std::fs::remove_file(site.join("factpkg/plugin.py")).unwrap();
    install_fact(&site, "plugin2", 2, false);
    let reply = reload();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["state"],
        "INITIALIZED",
        "{}\n{}",
        reply.text(),
        server.log()
    );
    served(2);
    let manifest = server.get("/v1/plugins/fact/manifest").json();
    assert_eq!(
        manifest["entrypoint"], "factpkg.plugin2:Plugin",
        "{manifest:#}"
    );
    // What the reload loaded is what the rescan compares with: nothing
    // changed since.
    let report = rescan();
    assert_eq!(report["changed"], serde_json::json!([]), "{report}");
    assert_eq!(report["unchanged"], serde_json::json!(["fact"]), "{report}");

    // The package directory gone (uninstalled, an upgrade half done): left
    // serving, as a plugin whose directory vanished is.
    std::fs::rename(site.join("factpkg"), site.join("factpkg.gone")).unwrap();
    let reply = reload();
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.detail().contains("left serving"), "{}", reply.text());
    served(2);
    let health = server.get("/v1/plugins/fact/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health:#}");
}

/// An upgrade that moves the plugin's class to another module (its entry
/// point's value changes, its name and distribution do not) is one plugin
/// changed at the next rescan, its counts kept: it was retired and added
/// again, its calls answered 404 in between.
#[test]
fn a_rescan_after_an_upgrade_that_moved_the_class_changes_the_plugin() {
    let scratch = tempfile::tempdir().unwrap();
    let (site, server) = serve_site(scratch.path(), |site| {
        install_fact(site, "plugin", 1, true);
    });
    let run = server.run("fact", "t", r#"{"args": {}}"#);
    assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
    std::fs::remove_file(site.join("factpkg/plugin.py")).unwrap();
    install_fact(&site, "plugin2", 2, true);
    let reply = crate::support::admin_post(server.addr, "/v1/plugins/reload", TOKEN);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert_eq!(report["changed"], serde_json::json!(["fact"]), "{report}");
    assert_eq!(report["added"], serde_json::json!([]), "{report}");
    assert_eq!(report["removed"], serde_json::json!([]), "{report}");
    let run = server.run("fact", "t", r#"{"args": {}}"#);
    assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
    assert_eq!(run.json()["result"]["v"], 2, "{}", run.text());
    let health = server.get("/v1/plugins/fact/health").json();
    assert_eq!(health["success_count"], 2, "{health:#}");
}

/// A package reinstalled at a new version with no file of its own changed
/// (an editable install: its sources stay where they are) is changed at
/// the next rescan, its new version shown: it was `unchanged`, its old
/// version listed until a reload by name.
#[test]
fn a_rescan_sees_a_package_reinstalled_at_a_new_version() {
    let scratch = tempfile::tempdir().unwrap();
    let (site, server) = serve_site(scratch.path(), |site| {
        install_fact(site, "plugin", 1, false);
    });
    let version = || server.get("/v1/plugins/fact/health").json()["version"].clone();
    assert_eq!(version(), "1.0", "{}", server.log());
    let rescan = || {
        let reply = crate::support::admin_post(server.addr, "/v1/plugins/reload", TOKEN);
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    };
    assert_eq!(rescan()["changed"], serde_json::json!([]));
    std::fs::remove_dir_all(site.join("factpkg-1.0.dist-info")).unwrap();
    write_dist_info(
        &site,
        "factpkg",
        "factpkg",
        "1.1",
        "fact = factpkg.plugin:Plugin\n",
    );
    let report = rescan();
    assert_eq!(report["changed"], serde_json::json!(["fact"]), "{report}");
    assert_eq!(version(), "1.1");
    // And then nothing more.
    assert_eq!(rescan()["changed"], serde_json::json!([]));
}

/// An entry point moved to a module that was there already, at the same
/// version (an editable reinstall: no file of the package changes): the
/// rescan loads the new class. It kept the old one, `unchanged`.
#[test]
fn a_rescan_sees_an_entry_point_moved_to_a_module_already_there() {
    let scratch = tempfile::tempdir().unwrap();
    let (site, server) = serve_site(scratch.path(), |site| {
        install_fact(site, "plugin2", 2, true);
        install_fact(site, "plugin", 1, true);
    });
    let served = || {
        let run = server.run("fact", "t", r#"{"args": {}}"#);
        assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
        run.json()["result"]["v"].clone()
    };
    assert_eq!(served(), 1);
    write_dist_info(
        &site,
        "factpkg",
        "factpkg",
        "1.0",
        "fact = factpkg.plugin2:Plugin\n",
    );
    let reply = crate::support::admin_post(server.addr, "/v1/plugins/reload", TOKEN);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["changed"],
        serde_json::json!(["fact"]),
        "{}",
        reply.text()
    );
    assert_eq!(served(), 2);
}
