//! The Python examples the repo ships (`examples/plugins`), loaded by the
//! real binary: the seed-layout plugin and the packaged one as plugin
//! directories, side by side, and the packaged one installed, found through
//! the entry point its own `pyproject.toml` declares, with the interpreter
//! named by `FORGESYTE_PYTHON`.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::support::{
    Forgesyte, PluginsDir, http_with, plugin_named, site_python, write_dist_info,
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/plugins")
}

/// Copies the directory `from` to `to`, leaving out `__pycache__`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "__pycache__" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// A 2 × 1 RGB PNG (a red and a blue pixel), made with `zlib` and
/// `struct` as the PNG specification lays it out.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x7b, 0x40, 0xe8,
    0xdd, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0x00, 0x04,
    0xff, 0x01, 0x07, 0x00, 0x01, 0xff, 0xe2, 0x23, 0x9e, 0x59, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// `text-stats` (the packaged example) answers with the tools of its live
/// instance, and counts.
fn check_text_stats(server: &Forgesyte) {
    let tools = server.get("/v1/plugins/text-stats/tools").json();
    let ids: Vec<&str> = tools
        .as_array()
        .unwrap_or_else(|| panic!("{tools}"))
        .iter()
        .filter_map(|tool| tool["id"].as_str())
        .collect();
    assert_eq!(ids, ["count", "top_words"], "{tools}");
    let reply = server.run(
        "text-stats",
        "count",
        r#"{"args": {"text": "to be or not to be"}}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["result"],
        json!({"words": 6, "lines": 1, "chars": 18})
    );
    let reply = server.run(
        "text-stats",
        "top_words",
        r#"{"args": {"text": "b a b", "n": 1}}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["result"]["words"], json!([["b", 2]]));
}

#[test]
fn the_python_examples_serve_from_their_directories() {
    let plugins = PluginsDir::new();
    for example in ["py-image-stats", "py-forgesyte-packaged"] {
        copy_tree(&examples().join(example), &plugins.path().join(example));
    }
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let list = server.get("/v1/plugins").json();
    for name in ["py-image-stats", "text-stats"] {
        assert_eq!(
            plugin_named(&list, name)["state"],
            "INITIALIZED",
            "{list:#}\n{}",
            server.log()
        );
    }
    // The PNG as the octet-stream body of `analyze` (its one binary
    // argument, `image`).
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/plugins/py-image-stats/tools/analyze/run",
        &[("Content-Type", "application/octet-stream")],
        PNG,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let result = &reply.json()["result"];
    assert_eq!(
        (&result["format"], &result["width"], &result["height"]),
        (&json!("png"), &json!(2), &json!(1)),
        "{result}"
    );
    assert_eq!(result["channels"], 3, "{result}");
    check_text_stats(&server);
}

/// The packaged example's package directory (the manifest beside the
/// module, as published) served as a plugin directory of its own: the
/// directory is the package its entrypoint names, relative imports and all.
#[test]
fn a_package_directory_serves_as_a_plugin_directory() {
    let plugins = PluginsDir::new();
    copy_tree(
        &examples().join("py-forgesyte-packaged/forgesyte_example_text"),
        &plugins.path().join("forgesyte_example_text"),
    );
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let list = server.get("/v1/plugins").json();
    assert_eq!(
        plugin_named(&list, "text-stats")["state"],
        "INITIALIZED",
        "{list:#}\n{}",
        server.log()
    );
    check_text_stats(&server);
}

#[test]
fn the_packaged_example_is_found_through_its_entry_point() {
    // "Installed": the package and a `.dist-info` whose entry point is the
    // one `pyproject.toml` declares, in a site directory a wrapper
    // interpreter puts on its path.
    let example = examples().join("py-forgesyte-packaged");
    let pyproject: toml::Table =
        toml::from_str(&std::fs::read_to_string(example.join("pyproject.toml")).unwrap()).unwrap();
    let entry_points = &pyproject["project"]["entry-points"]["forgesyte.plugins"];
    let Some(entry_points) = entry_points.as_table() else {
        panic!("no forgesyte.plugins entry points in pyproject.toml: {pyproject}");
    };
    let lines: String = entry_points
        .iter()
        .map(|(name, target)| format!("{name} = {}\n", target.as_str().unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    copy_tree(
        &example.join("forgesyte_example_text"),
        &site.join("forgesyte_example_text"),
    );
    write_dist_info(
        &site,
        "forgesyte_example_text",
        "forgesyte-example-text",
        "0.1.0",
        &lines,
    );
    let python = dir.path().join("python");
    site_python(&python, &site);
    let plugins = PluginsDir::new();
    let server = Forgesyte::start_with_env(
        &["--plugins", plugins.path_str(), "--python-entry-points"],
        &[("FORGESYTE_PYTHON", python.to_str().unwrap())],
    );
    server.wait_loaded();
    let list = server.get("/v1/plugins").json();
    let stats = plugin_named(&list, "text-stats");
    assert_eq!(stats["state"], "INITIALIZED", "{list:#}\n{}", server.log());
    // The manifest shipped beside the module named and described it.
    assert_eq!(stats["version"], "0.1.0", "{stats}");
    assert!(
        stats["description"]
            .as_str()
            .is_some_and(|d| d.contains("packaged")),
        "{stats}"
    );
    check_text_stats(&server);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list:#}");
}
