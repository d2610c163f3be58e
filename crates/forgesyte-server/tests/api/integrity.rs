//! `forgesyte lock` and the integrity check at load, through the real
//! binary: lock a plugins directory, change one native library and one
//! Python plugin's source, and `check` refuses exactly those two, naming
//! the file (or the tree) and both digests.

use std::io::Write as _;

use serde_json::{Value, json};

use crate::support::{PluginsDir, plugin_named, run_forgesyte};

/// `forgesyte ARGS…`: exit code, stdout, stderr.
fn forgesyte(args: &[&str]) -> (i32, String, String) {
    run_forgesyte(args, &[])
}

fn append(path: &std::path::Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

#[test]
fn lock_then_modify_then_load_refuses_exactly_the_modified_plugins() {
    let dir = PluginsDir::new();
    dir.good("native-ok", json!({}))
        .good("native-bad", json!({}))
        .python("py-ok", "echo")
        .python("py-bad", "echo");
    let root = dir.path();
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let lock_path = root.join("forgesyte.lock");
    assert!(
        out.contains(&format!("Wrote {} (4 plugins)", lock_path.display())),
        "{out}"
    );
    let lock: Value = serde_json::from_slice(&std::fs::read(&lock_path).unwrap()).unwrap();
    assert_eq!(lock["version"], 1);
    let pinned = |name: &str| lock["plugins"][name]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(lock["plugins"]["py-ok"]["of"], "*.py");

    // Change one library and one Python source.
    let library = std::path::Path::new(forgesyte_tests::zoo::GOOD_LIBRARY)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let bad_lib = root.join("native-bad").join(&library);
    append(&bad_lib, b"\0");
    append(&root.join("py-bad/plugin.py"), b"\n# changed\n");
    let fs = forgesyte_deps::RealFs;
    let lib_now = forgesyte_loader::integrity::file_digest(&fs, &bad_lib).unwrap();
    let tree_now =
        forgesyte_loader::integrity::python_tree_digest(&fs, &root.join("py-bad")).unwrap();
    assert_ne!(lib_now, pinned("native-bad"));

    let (code, out, err) = forgesyte(&["check", "--json", dir.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let status = |name: &str| plugin_named(&list, name);
    for ok in ["native-ok", "py-ok"] {
        assert_eq!(status(ok)["state"], "INITIALIZED", "{:#}", status(ok));
    }
    let lock_shown = lock_path.display();
    let native = status("native-bad");
    assert_eq!(native["state"], "FAILED");
    assert_eq!(
        native["reason"],
        format!(
            "IntegrityError: sha256 of {library} is {lib_now}, the lock file {lock_shown} pins {}",
            pinned("native-bad")
        )
    );
    let python = status("py-bad");
    assert_eq!(python["state"], "FAILED");
    assert_eq!(
        python["reason"],
        format!(
            "IntegrityError: sha256 of the Python source tree (*.py) of {} is {tree_now}, \
             the lock file {lock_shown} pins {}",
            root.join("py-bad").display(),
            pinned("py-bad")
        )
    );

    // Locking again accepts the change.
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = forgesyte(&["check", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn lock_names_what_it_cannot_hash_and_refuses_a_missing_directory() {
    let dir = PluginsDir::new();
    dir.good("ok", json!({}))
        .good("gone", json!({"entrypoint": "libgone.so"}));
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "forgesyte lock: gone not locked: library libgone.so is not in the plugin directory"
        ),
        "{err}"
    );
    let lock: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("forgesyte.lock")).unwrap()).unwrap();
    let names: Vec<&String> = lock["plugins"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["ok"]);

    let missing = dir.path().join("nope");
    let (code, out, err) = forgesyte(&["lock", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!missing.exists());
}
