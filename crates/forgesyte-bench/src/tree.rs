//! Plugin trees: `count` plugin directories, each a manifest (with one
//! dependency to check, `bin:sh`) and its own copy of the plugin library.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

/// The registry name of plugin `index` of a tree (`bench-0000`, ...).
pub fn plugin_name(index: usize) -> String {
    format!("bench-{index:04}")
}

/// Replaces `dir` with a tree of `count` plugins using copies of `library`
/// (distinct files, not links: the dynamic loader opens each one anew).
/// Each manifest names the library and declares one dependency, `bin:sh`.
///
/// # Errors
///
/// When a directory or file cannot be written.
pub fn generate(dir: &Path, count: usize, library: &Path) -> anyhow::Result<()> {
    remove(dir)?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file_name = library
        .file_name()
        .context("the plugin library path has no file name")?
        .to_string_lossy()
        .into_owned();
    for index in 0..count {
        let name = plugin_name(index);
        let plugin_dir = dir.join(&name);
        fs::create_dir(&plugin_dir)
            .with_context(|| format!("cannot create {}", plugin_dir.display()))?;
        let manifest = json!({
            "name": name,
            "version": "1.0.0",
            "description": format!("Benchmark plugin {index}"),
            "entrypoint": file_name,
            "dependencies": ["bin:sh"],
            "tools": [
                {"id": "noop", "title": "No-op", "description": "Does nothing"},
                {"id": "fail", "title": "Fail", "description": "Returns an error"},
                {"id": "panic", "title": "Panic", "description": "Panics"},
            ],
        });
        fs::write(
            plugin_dir.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        fs::copy(library, plugin_dir.join(&file_name)).with_context(|| {
            format!(
                "cannot copy {} into {}",
                library.display(),
                plugin_dir.display()
            )
        })?;
    }
    Ok(())
}

/// Removes a tree if it exists.
pub(crate) fn remove(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

/// The plugin libraries of a tree, sorted: every `*.so` file one level down.
pub(crate) fn libraries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let plugin_dir = entry?.path();
        if !plugin_dir.is_dir() {
            continue;
        }
        for file in fs::read_dir(&plugin_dir)? {
            let path = file?.path();
            if path
                .extension()
                .is_some_and(|e| e == std::env::consts::DLL_EXTENSION)
            {
                libraries.push(path);
            }
        }
    }
    libraries.sort();
    Ok(libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_has_distinct_copies_and_valid_manifests() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libfake.so");
        fs::write(&lib, b"not really a library").unwrap();
        let tree = tmp.path().join("tree");
        generate(&tree, 3, &lib).unwrap();
        let libs = libraries(&tree).unwrap();
        assert_eq!(libs.len(), 3);
        assert!(libs[0].ends_with("bench-0000/libfake.so"));
        use std::os::unix::fs::MetadataExt;
        let inodes: std::collections::BTreeSet<u64> = libs
            .iter()
            .map(|p| fs::metadata(p).unwrap().ino())
            .collect();
        assert_eq!(inodes.len(), 3, "copies, not hard links");
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(tree.join("bench-0002/manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["name"], "bench-0002");
        assert_eq!(manifest["entrypoint"], "libfake.so");
        assert_eq!(manifest["dependencies"][0], "bin:sh");
        // Regenerating replaces the tree.
        generate(&tree, 1, &lib).unwrap();
        assert_eq!(libraries(&tree).unwrap().len(), 1);
    }
}
