//! The sandbox module's unit tests (beside it, out of its file).

use super::apply::rules_without_links;
use super::scratch::{remove_scratch_dir_in, scratch_dir_in};
use super::*;
use serde_json::{Value, json};

fn spec(v: Value) -> Result<SandboxSpec, String> {
    let Value::Object(obj) = v else {
        return Err("not an object".into());
    };
    parse_spec(&obj).map_err(|e| e.to_string())
}

#[test]
fn widening_is_named_part_by_part_and_granted_by_policy() {
    let dir = Path::new("/p/ocr");
    let asks = |spec: &SandboxSpec, models: &[PathBuf], env_deps: &[String]| {
        PlanInput {
            plugin_dir: dir,
            scratch: Path::new("/tmp/s"),
            spec,
            models,
            lib_paths: &[],
            env_deps,
            gpu: true,
        }
        .widening()
    };
    assert!(asks(&SandboxSpec::default(), &[], &[]).is_empty());
    // What the runner has anyway asks nothing more.
    let anyway = spec(json!({
        "env": ["PATH", "LC_ALL"],
        "filesystem": {"read": ["weights", "./a/b"]}
    }))
    .unwrap();
    assert!(asks(&anyway, &[dir.join("models/m.onnx")], &[]).is_empty());
    let wide = spec(json!({
        "network": true,
        "env": ["B", "A"],
        "filesystem": {"read": ["/srv/m", "../other"], "write": ["out"]}
    }))
    .unwrap();
    // An absolute model path is itself (`dir.join` keeps it).
    let models = [
        PathBuf::from("/etc"),
        dir.join("m/../../x"),
        dir.join("m/ok"),
    ];
    assert_eq!(
        asks(&wide, &models, &["SECRET".to_owned(), "A".to_owned()]),
        [
            "the network",
            "the environment variables A, B, SECRET",
            "reading /srv/m, ../other, /etc, /p/ocr/m/../../x",
            "writing out"
        ]
    );
    for (policy, unsigned, signed) in [
        (SandboxWidening::Allow, true, true),
        (SandboxWidening::Signed, false, true),
        (SandboxWidening::Deny, false, false),
    ] {
        assert_eq!(policy.grants(false), unsigned, "{policy:?}");
        assert_eq!(policy.grants(true), signed, "{policy:?}");
    }
    // A link inside the directory is judged by where it leads.
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("p");
    std::fs::create_dir(&plugin).unwrap();
    std::fs::create_dir(plugin.join("data")).unwrap();
    std::os::unix::fs::symlink("/", plugin.join("root")).unwrap();
    std::os::unix::fs::symlink("data", plugin.join("mine")).unwrap();
    let links = spec(json!({"filesystem": {"read": ["root", "mine", "data"]}})).unwrap();
    let linked_asks = PlanInput {
        plugin_dir: &plugin,
        scratch: Path::new("/tmp/s"),
        spec: &links,
        models: &[plugin.join("root/etc")],
        lib_paths: &[],
        env_deps: &[],
        gpu: false,
    }
    .widening();
    assert_eq!(
        linked_asks,
        [format!(
            "reading root, {}",
            plugin.join("root/etc").display()
        )]
    );
    assert_eq!(SandboxWidening::default(), SandboxWidening::Signed);
    assert_eq!("deny".parse(), Ok(SandboxWidening::Deny));
    assert_eq!(
        " deny ".parse(),
        Ok(SandboxWidening::Deny),
        "as other options are"
    );
    assert!("sometimes".parse::<SandboxWidening>().is_err());
}

/// The plan holds where each manifest path resolves when it is made (a
/// link is replaced by its target), and leaves out one that does not
/// resolve (a link leading nowhere yet); the runners then open the plan's
/// paths without following links, so a path that became a link allows
/// nothing.
#[test]
fn the_plan_holds_resolved_paths_and_runners_follow_no_link_in_them() {
    let tmp = tempfile::tempdir().unwrap();
    let real_tmp = std::fs::canonicalize(tmp.path()).unwrap();
    let plugin = tmp.path().join("p");
    std::fs::create_dir_all(plugin.join("data")).unwrap();
    std::os::unix::fs::symlink("data", plugin.join("mine")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("later"), plugin.join("dangling")).unwrap();
    let links = spec(json!({"filesystem": {"read": ["mine", "dangling"]}})).unwrap();
    let (plan, asks) = Confinement::plan_checked(
        PlanInput {
            plugin_dir: &plugin,
            scratch: tmp.path(),
            spec: &links,
            models: &[],
            lib_paths: &[],
            env_deps: &[],
            gpu: false,
        },
        std::iter::empty(),
    );
    assert_eq!(asks, Asks::default());
    assert!(
        plan.read.contains(&real_tmp.join("p/data")),
        "{:?}",
        plan.read
    );
    assert!(
        !plan
            .read
            .iter()
            .any(|p| p.ends_with("mine") || p.ends_with("dangling") || p.ends_with("later")),
        "{:?}",
        plan.read
    );

    let file = real_tmp.join("file");
    std::fs::write(&file, "x").unwrap();
    let link = real_tmp.join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let abi = landlock::ABI::V5;
    let access = landlock::AccessFs::from_read(abi);
    let mut left_out = Vec::new();
    let mut opened =
        |paths: &[PathBuf]| rules_without_links(paths, access, abi, &mut left_out).count();
    assert_eq!(opened(std::slice::from_ref(&file)), 1);
    assert_eq!(opened(std::slice::from_ref(&real_tmp)), 1);
    assert_eq!(
        opened(std::slice::from_ref(&link)),
        0,
        "a link is not followed"
    );
    assert_eq!(
        opened(&[real_tmp.join("missing"), file.join("under_a_file")]),
        0
    );
    // The link is named (the hello's `unreachable`); what is not there is not.
    assert_eq!(
        left_out,
        [format!(
            "{}: a link now, which is not followed",
            link.display()
        )]
    );
}

#[test]
fn the_manifest_fields_parse_and_bad_types_are_named() {
    assert_eq!(spec(json!({})), Ok(SandboxSpec::default()));
    let s = spec(
        json!({"network": true, "filesystem": {"read": ["models"], "write": ["/data"]},
                         "env": ["API_KEY"]}),
    )
    .unwrap_or_default();
    assert!(s.network);
    assert_eq!(s.read, ["models"]);
    assert_eq!(s.write, ["/data"]);
    assert_eq!(s.env, ["API_KEY"]);
    for (bad, field) in [
        (json!({"network": "yes"}), "network"),
        (json!({"filesystem": []}), "filesystem"),
        (json!({"filesystem": {"exec": []}}), "filesystem.exec"),
        (json!({"filesystem": {"read": [""]}}), "filesystem.read"),
        (json!({"env": "HOME"}), "env"),
        (json!({"env": [1]}), "env"),
    ] {
        let err = spec(bad.clone()).err().unwrap_or_default();
        assert!(err.contains(&format!("'{field}'")), "{bad}: {err}");
    }
}

#[test]
fn the_plan_keeps_declared_variables_only() {
    let dir = Path::new("/plugins/ocr");
    let scratch = Path::new("/tmp/s/ocr");
    let spec = SandboxSpec {
        env: vec!["API_KEY".into()],
        read: vec!["extra".into()],
        ..SandboxSpec::default()
    };
    let plan = Confinement::plan(
        PlanInput {
            plugin_dir: dir,
            scratch,
            spec: &spec,
            models: &[],
            lib_paths: &[],
            env_deps: &["CUDA_HOME".into()],
            gpu: false,
        },
        [
            ("PATH", "/opt/path-value/bin"),
            ("API_KEY", "k"),
            ("CUDA_HOME", "/cuda"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("LC_ALL", "C"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let names: Vec<&str> = plan.env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["API_KEY", "CUDA_HOME", "HOME", "LC_ALL", "PATH", "TMPDIR"]
    );
    assert_eq!(
        plan.env.get("TMPDIR").map(String::as_str),
        Some("/tmp/s/ocr")
    );
    assert!(plan.read.contains(&dir.to_path_buf()));
    // A manifest path that is not there allows nothing.
    assert!(!plan.read.contains(&dir.join("extra")));
    assert!(
        !plan
            .read
            .iter()
            .any(|p| p == Path::new("/etc") || p == Path::new("/tmp"))
    );
    assert_eq!(plan.write, [scratch.to_path_buf()]);
    assert!(!plan.network);
    assert!(!plan.devices.iter().any(|d| d.starts_with("/dev/nvidia")));
    // On the command line: the names of the variables, not their values.
    let arg = plan.to_arg();
    assert!(
        !arg.contains("/cuda") && !arg.contains("/opt/path-value"),
        "{arg}"
    );
    let shown: serde_json::Value = serde_json::from_str(&arg).unwrap_or_default();
    assert_eq!(shown["env"], serde_json::json!(names));
    let back: Confinement = serde_json::from_str(&arg).unwrap_or_default();
    assert_eq!(
        back,
        Confinement {
            env: BTreeMap::new(),
            ..plan.clone()
        }
    );
    // A path that is not UTF-8 is left out (allows nothing); the rest of
    // the plan stands (it was `null`, refused by every runner).
    use std::os::unix::ffi::OsStrExt as _;
    let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"/opt/lib\xff"));
    let mut with_odd = Confinement {
        required: true,
        ..plan.clone()
    };
    with_odd.read.push(odd);
    let back: Confinement = serde_json::from_str(&with_odd.to_arg()).unwrap();
    assert_eq!(
        back,
        Confinement {
            env: BTreeMap::new(),
            required: true,
            ..plan
        }
    );
}

#[test]
fn scratch_names_are_one_safe_component() {
    for (name, last) in [
        ("ocr", "ocr"),
        ("../x", ".._x"),
        ("..", "_"),
        ("a/b", "a_b"),
    ] {
        let dir = scratch_dir(name, None).unwrap_or_default();
        assert_eq!(
            dir.file_name().and_then(|n| n.to_str()),
            Some(last),
            "{name}"
        );
    }
}

#[test]
fn a_link_planted_where_a_scratch_directory_goes_is_not_followed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let me = rustix::process::geteuid().as_raw();
    let root = tmp.path().join(format!("forgesyte-scratch-{me}"));
    std::fs::create_dir(&root).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&victim, root.join("ocr")).unwrap();
    let err = scratch_dir_in(tmp.path(), "ocr", None).unwrap_err();
    assert!(err.to_string().contains("not followed"), "{err}");
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o755, "the link's target was changed");
    // The same for the first level.
    std::fs::remove_file(root.join("ocr")).unwrap();
    std::fs::remove_dir(&root).unwrap();
    std::os::unix::fs::symlink(&victim, &root).unwrap();
    assert!(scratch_dir_in(tmp.path(), "ocr", None).is_err());
    assert!(
        !victim.join("ocr").exists(),
        "a directory was made through the link"
    );
    // A real directory is made private and used.
    std::fs::remove_file(&root).unwrap();
    let dir = scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    assert_eq!(dir, root.join("ocr"));
    for path in [&root, &dir] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert!(meta.is_dir());
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (me, 0o700),
            "{}",
            path.display()
        );
    }
}

/// A retired plugin's scratch directory goes, with what its runner left;
/// a link its runner's user planted, in its place or in place of the
/// runners' directory, is removed or refused, never followed.
#[test]
fn a_scratch_directory_is_removed_without_following_links() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    std::fs::create_dir(dir.join("cache")).unwrap();
    std::fs::write(dir.join("cache/secret.txt"), "from the old plugin").unwrap();
    remove_scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    assert!(!dir.exists());
    // Nothing there: no error.
    remove_scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    remove_scratch_dir_in(tmp.path(), "never-ran", None).unwrap();

    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("keep.txt"), "keep").unwrap();
    // A link in the plugin's place: the link goes, not its target.
    assert_eq!(scratch_dir_in(tmp.path(), "ocr", None).unwrap(), dir);
    std::fs::remove_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&victim, &dir).unwrap();
    remove_scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    assert!(std::fs::symlink_metadata(&dir).is_err());
    assert!(victim.join("keep.txt").exists());
    // A link in the runners' directory's place: refused.
    assert_eq!(scratch_dir_in(tmp.path(), "ocr", None).unwrap(), dir);
    let root = dir.parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::create_dir(victim.join("ocr")).unwrap();
    std::os::unix::fs::symlink(&victim, &root).unwrap();
    assert!(remove_scratch_dir_in(tmp.path(), "ocr", None).is_err());
    assert!(victim.join("ocr").exists(), "removed through the link");
}

#[test]
fn a_scratch_directory_another_user_made_first_is_refused() {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: making a directory another user owns needs root"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let runner = RunAs {
        uid: 65534,
        gid: 65534,
    };
    let root = tmp.path().join("forgesyte-scratch-65534");
    std::fs::create_dir(&root).unwrap();
    // Made first by a third user, who could plant links in it.
    std::os::unix::fs::chown(&root, Some(4242), Some(4242)).unwrap();
    let err = scratch_dir_in(tmp.path(), "ocr", Some(runner)).unwrap_err();
    assert!(err.to_string().contains("another user (uid 4242)"), "{err}");
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), 4242);
    // Made by this server: handed to the runner's user.
    std::fs::remove_dir(&root).unwrap();
    let dir = scratch_dir_in(tmp.path(), "ocr", Some(runner)).unwrap();
    for path in [&root, &dir] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65534),
            "{}",
            path.display()
        );
    }
}

/// A path outside the plugin's directory, under one of its write grants,
/// that resolves elsewhere leads through a link the runner may have made
/// there: a link out. One that resolves to itself is a plain widening.
#[test]
fn a_path_under_a_write_grant_that_a_link_leads_elsewhere_is_a_link_out() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("p");
    std::fs::create_dir_all(&plugin).unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(cache.join("plain")).unwrap();
    std::os::unix::fs::symlink("/", cache.join("models")).unwrap();
    let text = |p: &Path| p.to_str().unwrap().to_owned();
    let manifest = spec(json!({"filesystem": {
        "read": [text(&cache.join("models")), text(&cache.join("plain"))],
        "write": [text(&cache)]
    }}))
    .unwrap();
    let asks = asks_of(&plugin, tmp.path(), &manifest);
    assert_eq!(
        asks.links_out,
        [format!(
            "reading {} (a link under a path the plugin may write leads it elsewhere)",
            cache.join("models").display()
        )]
    );
}

/// What is not enforced, in one line; a report without any such part
/// passes, and no report at all is unconfined as a whole. The cases are
/// shared with the Python runner's `unconfined` (`test_runner.py`): the
/// two runners refuse by one rule.
#[test]
fn unconfined_names_every_part_not_enforced() {
    let cases: Vec<Value> =
        serde_json::from_str(include_str!("../../../../tests/fixtures/unconfined.json")).unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let report: Option<BTreeMap<String, String>> =
            serde_json::from_value(case["report"].clone()).unwrap();
        assert_eq!(
            unconfined(report.as_ref()).as_deref(),
            case["unconfined"].as_str(),
            "{case}"
        );
    }
}

/// What `manifest` of the plugin in `plugin` asks beyond the default
/// sandbox (no models, library paths, variables or GPU).
fn asks_of(plugin: &Path, scratch: &Path, manifest: &SandboxSpec) -> Asks {
    let (_, asks) = Confinement::plan_checked(
        PlanInput {
            plugin_dir: plugin,
            scratch,
            spec: manifest,
            models: &[],
            lib_paths: &[],
            env_deps: &[],
            gpu: false,
        },
        std::iter::empty(),
    );
    asks
}

/// A manifest path written inside the plugin's directory that leads out of
/// it through a link is a link out (granted by `allow` only, whoever signed
/// the manifest); a link that stays inside is not, nor a path written
/// outside (a plain widening).
#[test]
fn a_path_inside_by_name_and_outside_through_a_link_is_a_link_out() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("p");
    std::fs::create_dir_all(plugin.join("data")).unwrap();
    std::fs::write(tmp.path().join("secret"), "s").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret"), plugin.join("data/settings.cfg"))
        .unwrap();
    std::os::unix::fs::symlink("data", plugin.join("mine")).unwrap();
    std::os::unix::fs::symlink(tmp.path(), plugin.join("out")).unwrap();
    let outside = tmp.path().join("secret").to_str().unwrap().to_owned();
    let manifest = spec(json!({"filesystem": {
        "read": ["data/settings.cfg", "mine", outside],
        "write": ["out"]
    }}))
    .unwrap();
    let asks = asks_of(&plugin, tmp.path(), &manifest);
    assert_eq!(
        asks.links_out,
        [
            "reading data/settings.cfg (a link leads it out of the plugin's directory)",
            "writing out (a link leads it out of the plugin's directory)"
        ]
    );
    assert!(
        asks.widening.iter().any(|w| w.contains(&outside)),
        "{:?}",
        asks.widening
    );
}

/// A GPU plugin's runner may reach the driver's devices, MIG's capability
/// devices among them (a MIG instance is reached through them); a plugin
/// that needs no GPU reaches none.
#[test]
fn a_gpu_plugin_reaches_the_driver_and_mig_devices() {
    let plan = |gpu: bool| {
        Confinement::plan(
            PlanInput {
                plugin_dir: Path::new("/plugins/yolo"),
                scratch: Path::new("/tmp/s/yolo"),
                spec: &SandboxSpec::default(),
                models: &[],
                lib_paths: &[],
                env_deps: &[],
                gpu,
            },
            std::iter::empty(),
        )
    };
    let gpu = plan(true);
    for device in [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia0",
        "/dev/nvidia-caps",
    ] {
        assert!(gpu.devices.contains(&PathBuf::from(device)), "{device}");
    }
    assert!(
        !plan(false)
            .devices
            .iter()
            .any(|d| d.to_string_lossy().contains("nvidia"))
    );
}

/// Two servers of one user never share a plugin's scratch directory: the
/// second claims `NAME~2` while the first holds `NAME`, and a removal by
/// one leaves the other's alone. (A Python process stands for the other
/// server: a lock this process holds is its own.)
#[test]
fn two_servers_never_share_or_remove_each_others_scratch_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mine = scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    assert_eq!(mine.file_name().unwrap(), "ocr");
    // The same process asks again: the same directory.
    assert_eq!(scratch_dir_in(tmp.path(), "ocr", None).unwrap(), mine);
    std::fs::write(mine.join("mine.txt"), "mine").unwrap();
    // Another process holds `pdf` (as another server would: a lock on the
    // directory itself) while this one claims that name.
    let root = mine.parent().unwrap().to_path_buf();
    let lock = root.join("pdf");
    std::fs::create_dir(&lock).unwrap();
    let mut other = std::process::Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\n\
             import os\n\
             fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n\
             fcntl.flock(fd, fcntl.LOCK_EX)\n\
             print('held', flush=True)\n\
             time.sleep(60)",
        ])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.take().unwrap()),
        &mut held,
    )
    .unwrap();
    assert_eq!(held, "held\n");
    let theirs = scratch_dir_in(tmp.path(), "pdf", None).unwrap();
    assert_eq!(theirs, root.join("pdf~2"));
    std::fs::write(root.join("pdf/theirs.txt"), "theirs").unwrap();
    // This process's removal takes its own directory only.
    remove_scratch_dir_in(tmp.path(), "pdf", None).unwrap();
    assert!(!theirs.exists());
    assert!(
        root.join("pdf/theirs.txt").exists(),
        "another server's directory was removed"
    );
    // Once the other lets go, the name is free again.
    other.kill().unwrap();
    other.wait().unwrap();
    assert_eq!(
        scratch_dir_in(tmp.path(), "pdf", None).unwrap(),
        root.join("pdf")
    );
    remove_scratch_dir_in(tmp.path(), "pdf", None).unwrap();
    remove_scratch_dir_in(tmp.path(), "ocr", None).unwrap();
    assert!(!mine.exists());
}

/// A runner handed a plan that reports nothing, or only some parts, is
/// shown with every part it left out unconfined, and those parts named;
/// a full report is kept as it is.
#[test]
fn a_report_that_leaves_parts_of_the_plan_out_shows_them_unconfined() {
    let (report, missing) = against_plan(None);
    assert_eq!(missing, REPORTED_PARTS.to_vec());
    assert!(report.values().all(|v| v == NOT_REPORTED), "{report:?}");
    assert_eq!(report.len(), REPORTED_PARTS.len());
    assert_eq!(
        unconfined(Some(&report)).map(|why| why.matches(NOT_REPORTED).count()),
        Some(REPORTED_PARTS.len()),
        "a part shown so reads as unconfined"
    );

    let partial = BTreeMap::from([
        ("network".to_owned(), "denied".to_owned()),
        ("gpu".to_owned(), "none".to_owned()),
    ]);
    let (report, missing) = against_plan(Some(partial));
    assert_eq!(
        missing,
        ["env", "filesystem", "capabilities", "memory", "syscalls"]
    );
    assert_eq!(report["network"], "denied");
    assert_eq!(report["gpu"], "none", "a part beyond the six is kept");
    assert_eq!(report["syscalls"], NOT_REPORTED);

    let full: BTreeMap<String, String> = REPORTED_PARTS
        .iter()
        .map(|p| ((*p).to_owned(), "confined".to_owned()))
        .collect();
    let (report, missing) = against_plan(Some(full.clone()));
    assert!(missing.is_empty());
    assert_eq!(report, full);
}
