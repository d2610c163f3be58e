//! `forgesyte new`: the Python scaffold checked and served by the real
//! binary (its tool called over HTTP); the Rust scaffold's files, then the
//! scaffold built (`cargo build --offline` against this workspace's SDK,
//! into a target directory kept under `CARGO_TARGET_TMPDIR` so later runs
//! reuse the dependencies: about 15 s cold on 2 cores, a few seconds warm),
//! checked INITIALIZED and its tool called over HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{Forgesyte, run_forgesyte};

/// `forgesyte ARGS…`, with the binary's directory first on `PATH` (as
/// installed: the commands `new` prints then name it `forgesyte`): exit
/// code, stdout, stderr.
fn forgesyte(args: &[&str]) -> (i32, String, String) {
    let binary = Path::new(env!("CARGO_BIN_EXE_forgesyte"));
    let mut dirs = vec![binary.parent().unwrap().to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let path = std::env::join_paths(dirs).unwrap();
    run_forgesyte(args, &[("PATH", path.to_str().unwrap())])
}

/// Run as a path that `PATH` does not lead to (`target/release/forgesyte
/// new …`), `new` prints commands that name the binary by its path: a bare
/// `forgesyte` failed as pasted.
#[test]
fn the_scaffold_names_the_binary_by_its_path_when_path_does_not_lead_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("plugins");
    let parent_s = parent.display().to_string();
    let (code, out, err) = run_forgesyte(
        &["new", "--python", "hello-py", "--dir", &parent_s],
        &[("PATH", "/usr/bin:/bin")],
    );
    assert_eq!(code, 0, "{out}{err}");
    let me = std::fs::canonicalize(env!("CARGO_BIN_EXE_forgesyte")).unwrap();
    let line = format!("  {} check {parent_s}", me.display());
    assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
}

fn check_json(args: &[&str]) -> Value {
    let mut all = vec!["check", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = forgesyte(&all);
    assert_eq!(code, 0, "not every plugin is available:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn only_plugin(list: &Value, name: &str) -> Value {
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["name"], name);
    list[0].clone()
}

#[test]
fn the_python_scaffold_is_checked_and_served_as_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("plugins");
    let parent_s = parent.display().to_string();
    let (code, out, err) = forgesyte(&["new", "--python", "hello-py", "--dir", &parent_s]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        format!("Created the Python plugin 'hello-py' in {parent_s}/hello-py:"),
        format!("  forgesyte check {parent_s}"),
        format!("  forgesyte serve --plugins {parent_s}"),
        "  curl -s -X POST http://127.0.0.1:8000/v1/plugins/hello-py/tools/hello/run \
         -H 'Content-Type: application/json' -d '{\"args\": {\"name\": \"ForgeSyte\"}}'"
            .to_owned(),
        "With --watch, serve loads plugin.py again each time you save it.".to_owned(),
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
    }
    for file in ["manifest.json", "plugin.py", "README.md"] {
        assert!(parent.join("hello-py").join(file).is_file(), "{file}");
    }

    // `forgesyte check PARENT`, as printed.
    let list = check_json(&[&parent_s]);
    let status = only_plugin(&list, "hello-py");
    assert_eq!(status["state"], "INITIALIZED", "{status:#}");
    assert_eq!(status["version"], "0.1.0");

    // `forgesyte serve --plugins PARENT`, and the tool.
    let server = Forgesyte::start(&["--plugins", &parent_s]);
    server.wait_loaded();
    let run = server.run("hello-py", "hello", r#"{"args": {"name": "ForgeSyte"}}"#);
    assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
    assert_eq!(
        run.json()["result"],
        serde_json::json!({"message": "Hello, ForgeSyte!"})
    );
    let run = server.run("hello-py", "hello", r#"{"args": {}}"#);
    assert_eq!(run.json()["result"]["message"], "Hello, world!");
    // A bad argument is a tool error (422), the plugin stays available.
    let run = server.run("hello-py", "hello", r#"{"args": {"name": 3}}"#);
    assert_eq!(run.status, 422, "{}", run.text());
    let health = server.get("/v1/plugins/hello-py/health").json();
    assert_eq!(health["state"], "INITIALIZED");

    // Never over an existing plugin; names follow the manifest's rule.
    let before = std::fs::read(parent.join("hello-py/plugin.py")).unwrap();
    let (code, _, err) = forgesyte(&["new", "--python", "hello-py", "--dir", &parent_s]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("already exists and is a directory that is not empty"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(parent.join("hello-py/plugin.py")).unwrap(),
        before
    );
    let (code, _, err) = forgesyte(&["new", "--python", "no/slashes", "--dir", &parent_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a plugin name"), "{err}");
    let (code, _, err) = forgesyte(&["new", "--rust", "has.dot", "--dir", &parent_s]);
    assert_eq!(code, 2, "{err}");
    // Not inside a plugin's own directory.
    let inside = parent.join("hello-py");
    let (code, _, err) = forgesyte(&[
        "new",
        "--python",
        "inner",
        "--dir",
        inside.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a plugin directory"), "{err}");
    assert!(!inside.join("inner").exists());
}

/// A very small TOML shape check (no TOML parser in the workspace): every
/// line is blank, a comment, a `[table]` or `key = value` with a boolean,
/// number, quoted, bracketed or braced value; returns the tables.
fn toml_tables(text: &str) -> Vec<String> {
    let mut tables = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            tables.push(table.to_owned());
            continue;
        }
        let (key, value) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("not `key = value`: {line:?}"));
        assert!(
            key.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{line:?}"
        );
        let balanced = |open: char, close: char| value.starts_with(open) && value.ends_with(close);
        let scalar = matches!(value, "true" | "false") || value.parse::<f64>().is_ok();
        assert!(
            scalar || balanced('"', '"') || balanced('[', ']') || balanced('{', '}'),
            "{line:?}"
        );
        assert_eq!(value.matches('"').count() % 2, 0, "{line:?}");
    }
    tables
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../forgesyte-plugin-sdk")
        .canonicalize()
        .unwrap()
}

#[test]
fn the_rust_scaffold_builds_against_the_workspace_sdk_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("plugins");
    let parent_s = parent.display().to_string();
    let (code, out, err) = forgesyte(&["new", "--rust", "hello-rs", "--dir", &parent_s]);
    assert_eq!(code, 0, "{out}{err}");
    let dir = parent.join("hello-rs");
    let target = dir.join("target/debug");
    for line in [
        format!(
            "  cargo build --manifest-path {}",
            dir.join("Cargo.toml").display()
        ),
        format!(
            "  forgesyte check {parent_s} --lib-path {}",
            target.display()
        ),
        format!(
            "  forgesyte serve --plugins {parent_s} --lib-path {}",
            target.display()
        ),
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
    }
    assert!(
        out.contains(&format!("the SDK at {} (by path)", sdk_dir().display())),
        "{out}"
    );

    // The files.
    let cargo_toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert_eq!(
        toml_tables(&cargo_toml),
        ["package", "lib", "dependencies", "workspace"]
    );
    assert!(cargo_toml.contains("name = \"hello-rs\""), "{cargo_toml}");
    assert!(
        cargo_toml.contains("crate-type = [\"cdylib\", \"rlib\"]"),
        "{cargo_toml}"
    );
    assert!(
        cargo_toml.contains(&format!(
            "forgesyte-plugin-sdk = {{ path = \"{}\" }}",
            sdk_dir().display()
        )),
        "{cargo_toml}"
    );
    let lib_rs = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    assert!(
        lib_rs.contains("forgesyte_plugin_sdk::export_plugin!(HelloRsPlugin);"),
        "{lib_rs}"
    );
    assert!(lib_rs.contains("impl Plugin for HelloRsPlugin"), "{lib_rs}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["name"], "hello-rs");
    assert_eq!(manifest["entrypoint"], "libhello_rs.so");

    // `--sdk` must name the SDK.
    let (code, _, err) = forgesyte(&["new", "--rust", "other", "--dir", &parent_s, "--sdk", "/"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not the forgesyte-plugin-sdk crate"), "{err}");

    // Built as printed (into a target directory shared between runs, so
    // the dependencies are compiled once), with the scaffold's own test.
    let shared_target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffold-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for verb in ["build", "test"] {
        let output = Command::new(&cargo)
            .args([verb, "--offline", "--quiet", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &shared_target)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "cargo {verb} of the scaffold failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = shared_target.join("debug/libhello_rs.so");
    assert!(built.is_file(), "{}", built.display());
    // The printed way uses PARENT/NAME/target/debug; the library goes there.
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(&built, target.join("libhello_rs.so")).unwrap();
    let target_s = target.display().to_string();

    let list = check_json(&[&parent_s, "--lib-path", &target_s]);
    let status = only_plugin(&list, "hello-rs");
    assert_eq!(status["state"], "INITIALIZED", "{status:#}");

    let server = Forgesyte::start(&["--plugins", &parent_s, "--lib-path", &target_s]);
    server.wait_loaded();
    let run = server.run("hello-rs", "hello", r#"{"args": {"name": "ForgeSyte"}}"#);
    assert_eq!(run.status, 200, "{}\n{}", run.text(), server.log());
    assert_eq!(run.json()["result"]["message"], "Hello, ForgeSyte!");
}
