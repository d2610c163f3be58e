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
    let library = crate::support::good_library_name();
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

/// The preflight of a pinned in-process plugin constructs the checked
/// bytes (its runner gets them as a memory file, `--library-fd`), as the
/// server then loads them: from its path, a library swapped after its
/// check and put back before its load ran unseen. Seen through a runner
/// that records its arguments.
#[test]
fn the_preflight_of_a_pinned_library_runs_the_checked_bytes() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = PluginsDir::new();
    dir.good("pinned", json!({"preflight": true}))
        .good("unpinned", json!({"preflight": true}));
    let library = crate::support::good_library_name();
    let digest = forgesyte_loader::integrity::file_digest(
        &forgesyte_deps::RealFs,
        &dir.path().join("pinned").join(&library),
    )
    .unwrap();
    dir.manifest_fields("pinned", json!({ "sha256": digest }));
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("args");
    let runner = scratch.path().join("runner");
    std::fs::write(
        &runner,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec {} __runner \"$@\"\n",
            log.display(),
            env!("CARGO_BIN_EXE_forgesyte")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner = runner.to_string_lossy().into_owned();
    let (code, out, err) = forgesyte(&["check", "--runner", &runner, dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let runs = std::fs::read_to_string(&log).unwrap();
    let of = |plugin: &str| {
        runs.lines()
            .find(|l| l.contains(&format!("/{plugin}/")))
            .unwrap_or_else(|| panic!("no preflight of {plugin}: {runs}"))
            .to_owned()
    };
    assert!(of("pinned").contains("--library-fd"), "{runs}");
    assert!(!of("unpinned").contains("--library-fd"), "{runs}");
}

/// A manifest changed since `lock` refuses its plugin before anything it
/// names runs: here an interpreter of its own beside it (a script that
/// would leave a mark), which the dependency check would have run.
#[test]
fn a_manifest_changed_since_lock_runs_nothing_it_names() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = PluginsDir::new();
    dir.python("py-ok", "echo").python("py-other", "echo");
    let root = dir.path();
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let lock: Value =
        serde_json::from_slice(&std::fs::read(root.join("forgesyte.lock")).unwrap()).unwrap();
    let pinned = lock["plugins"]["py-ok"]["manifest_sha256"]
        .as_str()
        .expect("the manifest pinned")
        .to_owned();
    let mark = root.join("ran");
    let interp = root.join("py-ok/interp");
    std::fs::write(
        &interp,
        format!("#!/bin/sh\ntouch {}\nexec python3 \"$@\"\n", mark.display()),
    )
    .unwrap();
    std::fs::set_permissions(&interp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manifest_path = root.join("py-ok/manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["python"] = json!("interp");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let now = forgesyte_loader::integrity::sha256_hex(&std::fs::read(&manifest_path).unwrap());

    let (code, out, err) = forgesyte(&["check", "--json", dir.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let status = plugin_named(&list, "py-ok");
    assert_eq!(status["state"], "FAILED", "{status:#}");
    assert_eq!(
        status["reason"],
        format!(
            "IntegrityError: sha256 of manifest.json is {now}, the lock file {} pins {pinned}",
            root.join("forgesyte.lock").display()
        )
    );
    assert!(!mark.exists(), "the manifest's interpreter ran");
    assert_eq!(plugin_named(&list, "py-other")["state"], "INITIALIZED");
}

/// Links planted at the lock file's name, or at the temporary name it
/// was once written under, are replaced, never written through; and the
/// pins of a lock file written in uppercase hold as in lowercase.
#[test]
fn lock_replaces_links_at_its_names_and_reads_uppercase_pins() {
    let dir = PluginsDir::new();
    dir.good("native-ok", json!({})).python("py-ok", "echo");
    let root = dir.path();
    let elsewhere = tempfile::tempdir().unwrap();
    let victims = ["victim", "victim-tmp"].map(|name| elsewhere.path().join(name));
    for victim in &victims {
        std::fs::write(victim, b"precious").unwrap();
    }
    let lock_path = root.join("forgesyte.lock");
    let fixed_tmp = root.join(".forgesyte.lock.tmp");
    std::os::unix::fs::symlink(&victims[0], &lock_path).unwrap();
    std::os::unix::fs::symlink(&victims[1], &fixed_tmp).unwrap();
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    for victim in &victims {
        assert_eq!(
            std::fs::read(victim).unwrap(),
            b"precious",
            "{}",
            victim.display()
        );
    }
    assert!(std::fs::symlink_metadata(&lock_path).unwrap().is_file());
    let lock: Value = serde_json::from_slice(&std::fs::read(&lock_path).unwrap()).unwrap();
    assert_eq!(
        lock["plugins"].as_object().map(serde_json::Map::len),
        Some(2)
    );
    // Nothing of its own left beside the plugins.
    let left: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(".forgesyte.lock"))
        .collect();
    assert_eq!(left, [".forgesyte.lock.tmp"], "{left:?}");

    let text = std::fs::read_to_string(&lock_path).unwrap();
    let mut upper = text.clone();
    for name in ["native-ok", "py-ok"] {
        let pin = lock["plugins"][name]["sha256"].as_str().unwrap();
        upper = upper.replace(pin, &pin.to_ascii_uppercase());
    }
    assert_ne!(upper, text);
    std::fs::write(&lock_path, upper).unwrap();
    let (code, out, err) = forgesyte(&["check", "--json", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    for name in ["native-ok", "py-ok"] {
        let status = plugin_named(&list, name);
        assert_eq!(status["state"], "INITIALIZED", "{status:#}");
    }
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

    // Not one plugin that can be locked: no lock file that pins nothing.
    let none = PluginsDir::new();
    none.good("gone", json!({"entrypoint": "libgone.so"}));
    let (code, out, err) = forgesyte(&["lock", none.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("forgesyte lock: gone not locked"), "{err}");
    assert!(err.contains("no plugin of"), "{err}");
    assert!(!none.path().join("forgesyte.lock").exists(), "{out}{err}");

    // No plugin at all (likely not the directory meant): the same.
    let empty = PluginsDir::new();
    let (code, out, err) = forgesyte(&["lock", empty.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("forgesyte lock: no plugins in ") && err.contains("not written"),
        "{err}"
    );
    assert!(!empty.path().join("forgesyte.lock").exists(), "{out}{err}");
}

/// `lock` writes a directory's name escaped, as `check` does: a control
/// sequence in it never reaches the terminal, nor a line break that would
/// forge a line of the report; and a report it cannot write (a full
/// device) is exit code 2, as for `check` and `config --print`.
#[test]
fn lock_escapes_names_and_says_when_its_report_is_lost() {
    let dir = PluginsDir::new();
    let odd = "ev\u{1b}[31mil\nFAKE";
    dir.python(odd, "echo");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(odd).join("manifest.json")).unwrap())
            .unwrap();
    manifest["name"] = json!("goodname");
    std::fs::write(
        dir.path().join(odd).join("manifest.json"),
        manifest.to_string(),
    )
    .unwrap();
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert_eq!(out.lines().count(), 2, "{out:?}");
    assert!(out.contains("ev\\u{1b}[31mil\\nFAKE"), "{out:?}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = crate::support::forgesyte_command()
        .args(["lock", dir.path_str()])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot write the report"), "{err}");
}

/// The files mapped into process `pid` (the path column of
/// `/proc/PID/maps`).
fn mapped_files(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("cannot read the maps of {pid}: {e}"))
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5).map(str::to_owned))
        .collect()
}

/// The runner of `plugin` once it is up, within 10 s.
fn runner_of(server: &crate::support::Forgesyte, plugin: &str) -> u32 {
    crate::rescan::wait_for(
        &format!("a runner of {plugin}"),
        std::time::Duration::from_secs(10),
        server,
        || crate::support::runner_pid(server.pid(), plugin),
    )
}

/// An isolated native plugin whose library is pinned runs the bytes that
/// were checked: its runner maps the sealed memory file the server made of
/// them, never the file in the plugin directory (which may have changed
/// since), and so does the runner that replaces it after a crash. One that
/// is not pinned maps its file. Confined runners (not dumpable, so their
/// maps are closed to a test that is not root) are checked to load and
/// serve it; the maps are read of runners that are not confined.
#[test]
fn a_pinned_isolated_library_runs_from_the_checked_bytes() {
    let dir = PluginsDir::new();
    dir.good("pinned", json!({"isolation": "process"}))
        .good("unpinned", json!({"isolation": "process"}));
    let library = crate::support::good_library_name();
    let fs = forgesyte_deps::RealFs;
    let digest =
        forgesyte_loader::integrity::file_digest(&fs, &dir.path().join("pinned").join(&library))
            .unwrap();
    dir.manifest_fields("pinned", json!({ "sha256": digest }));
    // Confined: Landlock lets the runner read its memory file.
    let server = crate::support::Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/pinned/health").json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    assert!(
        health["confinement"]["filesystem"]
            .as_str()
            .is_some_and(|f| f.starts_with("confined")),
        "{health}"
    );
    let reply = server.run("pinned", "echo", r#"{"args": {"x": 1}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    drop(server);

    let server =
        crate::support::Forgesyte::start(&["--plugins", dir.path_str(), "--confine", "off"]);
    server.wait_loaded();
    let in_dir = |pid: u32, plugin: &str| {
        mapped_files(pid).iter().any(|f| {
            f.starts_with(&*dir.path().join(plugin).to_string_lossy()) && f.ends_with(&library)
        })
    };
    let from_memory = |pid: u32| {
        mapped_files(pid)
            .iter()
            .any(|f| f.starts_with(&format!("/memfd:{library}")))
    };
    let unpinned = runner_of(&server, "unpinned");
    assert!(in_dir(unpinned, "unpinned"), "{:?}", mapped_files(unpinned));
    assert!(!from_memory(unpinned), "{:?}", mapped_files(unpinned));
    let mut pinned = runner_of(&server, "pinned");
    for round in 0..2 {
        assert!(
            from_memory(pinned) && !in_dir(pinned, "pinned"),
            "round {round}: {:?}",
            mapped_files(pinned)
        );
        let health = server.get("/v1/plugins/pinned/health").json();
        assert_eq!(health["state"], "INITIALIZED", "{health}");
        let reply = server.run("pinned", "echo", r#"{"args": {"x": 1}}"#);
        assert_eq!(reply.status, 200, "{}", reply.text());
        if round == 0 {
            // The runner dies; the one that replaces it loads the same
            // checked bytes.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pinned.to_string()])
                .status();
            let old = pinned;
            pinned = crate::rescan::wait_for(
                "the runner's restart",
                std::time::Duration::from_secs(20),
                &server,
                || {
                    let health = server.get("/v1/plugins/pinned/health").json();
                    (health["state"] == "INITIALIZED"
                        && health["restart_count"].as_u64() >= Some(1))
                    .then(|| crate::support::runner_pid(server.pid(), "pinned"))
                    .flatten()
                    .filter(|pid| *pid != old)
                },
            );
        }
    }
}

/// A plugin `lock` cannot hash keeps the pin it had (dropped, it would
/// load unpinned) and is named, exit 1; one whose manifest cannot be looked
/// at (a loop of links here; no permission for a server's user) is named
/// too, where `lock` left it out in silence and exited 0.
#[test]
fn a_plugin_lock_cannot_hash_keeps_its_pin_and_is_named() {
    let dir = PluginsDir::new();
    dir.good("kept", json!({})).good("fine", json!({}));
    let root = dir.path();
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    let read_lock = || -> Value {
        serde_json::from_slice(&std::fs::read(root.join("forgesyte.lock")).unwrap()).unwrap()
    };
    let pin = read_lock()["plugins"]["kept"].clone();
    std::fs::remove_file(root.join("kept").join(crate::support::good_library_name())).unwrap();
    std::fs::create_dir(root.join("looped")).unwrap();
    std::os::unix::fs::symlink("manifest.json", root.join("looped/manifest.json")).unwrap();
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("kept not locked again (it keeps its earlier pin): library"),
        "{err}"
    );
    assert!(err.contains("looped not locked: cannot read"), "{err}");
    // stdout lists the lock file's lines; the kept one says it is old.
    let kept_line = out.lines().find(|l| l.contains("  kept (")).unwrap_or("");
    assert!(kept_line.ends_with(" [earlier pin, kept]"), "{out}");
    let fine_line = out.lines().find(|l| l.contains("  fine (")).unwrap_or("");
    assert!(
        !fine_line.is_empty() && !fine_line.contains("kept]"),
        "{out}"
    );
    let lock = read_lock();
    assert_eq!(lock["plugins"]["kept"], pin, "{lock}");
    assert!(lock["plugins"]["fine"].is_object(), "{lock}");
}

/// A locked plugin's directory renamed: the plugin loads under its new
/// directory unpinned (pins are keyed by directory name), and the log says
/// which pins have no directory (it said nothing; from a review).
#[test]
fn a_pin_whose_directory_is_gone_is_named_in_the_log() {
    let dir = PluginsDir::new();
    dir.python("py-a", "echo").python("py-b", "echo");
    let (code, out, err) = forgesyte(&["lock", dir.path_str()]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::rename(dir.path().join("py-b"), dir.path().join("py-b2")).unwrap();
    let server = crate::support::Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("pins plugin directories that are not there"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("py-b;") && !line.contains("py-a"),
        "{line}"
    );
}
