//! The dependency checker from the outside: the seed's GREEN dependency
//! suite on the fakes, the real probes on any Linux box, and a property
//! test over arbitrary fake worlds.

// Helpers outside `#[test]` functions panic on purpose: they are assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use forgesyte_deps::fake::{FakeFs, FakeGpu, FakeWorld};
use forgesyte_deps::{
    CudaProbe, DependencyChecker, DependencyReport, GpuDevice, GpuProbe, Requirements,
    cuda_driver_library_present,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const PLUGIN_DIR: &str = "/plugins/vision";

/// Checks `manifest` with `checker` and asserts the report's invariants:
/// `available` exactly when nothing is missing, every missing item named in
/// the reason, the GPU sentence when the GPU is missing.
fn check_with(
    checker: &DependencyChecker,
    manifest: &Value,
    plugin_dir: &Path,
    known: &forgesyte_deps::KnownPlugins,
) -> DependencyReport {
    let req = Requirements::from_manifest(manifest).expect("valid manifest");
    let report = checker.check(&req, plugin_dir, known);
    assert_eq!(report.available, report.missing.is_empty(), "{report:?}");
    match &report.reason {
        None => assert!(report.available, "{report:?}"),
        Some(reason) => {
            assert!(reason.starts_with("Missing dependencies: "), "{reason}");
            for item in &report.missing {
                assert!(reason.contains(item.as_str()), "{reason:?} lacks {item:?}");
            }
            if report.missing.iter().any(|m| m == "gpu") {
                assert!(
                    reason.contains("GPU") && reason.contains("CUDA"),
                    "{reason}"
                );
            }
        }
    }
    report
}

/// [`check_with`] on a fake world, plugin directory [`PLUGIN_DIR`], no known plugins.
fn check(world: &FakeWorld, manifest: Value) -> DependencyReport {
    check_with(
        &world.checker(),
        &manifest,
        Path::new(PLUGIN_DIR),
        &BTreeMap::new(),
    )
}

fn device(ordinal: u32, mem_gib: u64, cc: (u32, u32)) -> GpuDevice {
    GpuDevice {
        ordinal,
        name: format!("Fake GPU {ordinal}"),
        total_memory_mb: mem_gib * 1024,
        compute_capability: cc,
    }
}

mod green {
    //! The seed's GREEN dependency-checker suite, on the fakes.
    use super::*;

    #[test]
    fn no_requirements_is_available() {
        let report = check(&FakeWorld::new(), json!({"name": "plain"}));
        assert_eq!(
            report,
            DependencyReport {
                available: true,
                reason: None,
                missing: vec![]
            }
        );
    }

    #[test]
    fn missing_gpu_is_unavailable_with_gpu_in_reason() {
        let world = FakeWorld::new();
        world
            .gpu
            .set_report(FakeGpu::none("CUDA driver library (libcuda.so) not found").probe());
        let report = check(&world, json!({"requires_gpu": true}));
        assert!(!report.available);
        assert_eq!(report.missing, ["gpu"]);
        let reason = report.reason.unwrap();
        assert!(reason.contains("GPU"), "{reason}");
        assert!(reason.contains("CUDA"), "{reason}");
        assert!(reason.contains("libcuda.so"), "says why: {reason}");
    }

    #[test]
    fn gpu_present_is_available() {
        let world = FakeWorld::new();
        world.gpu.set_devices(vec![device(0, 24, (8, 9))]);
        let report = check(
            &world,
            json!({"requires_gpu": {"min_memory_mb": 16384, "min_compute_capability": "8.0"}}),
        );
        assert!(report.available, "{report:?}");
    }

    #[test]
    fn missing_package_named_in_reason() {
        let world = FakeWorld::new();
        let report = check(&world, json!({"dependencies": ["nonexistent_package_xyz"]}));
        assert!(!report.available);
        assert_eq!(report.missing, ["lib:nonexistent_package_xyz"]);
        assert!(report.reason.unwrap().contains("nonexistent_package_xyz"));
    }

    #[test]
    fn several_dependencies_all_checked_and_all_named() {
        let world = FakeWorld::new();
        world.libraries.add("z");
        world.executables.add("sh");
        world.env.set("HOME", "/root");
        let report = check(
            &world,
            json!({
                "dependencies": ["lib:z", "lib:missing_a", "bin:sh", "bin:missing_b", "env:HOME", "env:MISSING_C", "plugin:missing_d"],
                "requires_gpu": true,
                "models": {"weights": "weights.bin"}
            }),
        );
        assert_eq!(
            report.missing,
            [
                "lib:missing_a",
                "bin:missing_b",
                "env:MISSING_C",
                "plugin:missing_d",
                "gpu",
                "weights (path: /plugins/vision/weights.bin)"
            ]
        );
    }

    #[test]
    fn missing_models_named_with_path() {
        let world = FakeWorld::new();
        world
            .fs
            .add_file("/plugins/vision/models/present.onnx", b"onnx");
        let report = check(
            &world,
            json!({"models": {"present": "models/present.onnx", "yolo": "models/yolo.pt", "abs": "/opt/models/big.bin"}}),
        );
        assert_eq!(
            report.missing,
            [
                "yolo (path: /plugins/vision/models/yolo.pt)",
                "abs (path: /opt/models/big.bin)"
            ]
        );
    }

    #[test]
    fn relative_model_path_resolved_against_plugin_dir_not_cwd() {
        // In the fake world: only the plugin directory counts.
        let world = FakeWorld::new();
        world.fs.add_file("/plugins/vision/models/w.bin", b"w");
        world.fs.add_file("/models/w.bin", b"w");
        let ok = check(&world, json!({"models": {"w": "models/w.bin"}}));
        assert!(ok.available, "{ok:?}");
        world.fs.remove("/plugins/vision/models/w.bin");
        let report = check(&world, json!({"models": {"w": "models/w.bin"}}));
        assert_eq!(report.missing, ["w (path: /plugins/vision/models/w.bin)"]);

        // On the real filesystem: `Cargo.toml` exists in the working
        // directory of this test, but not in the plugin directory.
        assert!(Path::new("Cargo.toml").exists());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models/m.bin"), b"m").unwrap();
        let real = DependencyChecker::system(vec![]);
        let manifest = json!({"models": {"m": "models/m.bin", "cwd": "Cargo.toml"}});
        let report = check_with(&real, &manifest, dir.path(), &BTreeMap::new());
        assert_eq!(
            report.missing,
            [format!(
                "cwd (path: {})",
                dir.path().join("Cargo.toml").display()
            )]
        );
    }

    #[test]
    fn plugin_versions_checked_with_semver() {
        let known = BTreeMap::from([
            ("base".to_string(), Ok(semver::Version::new(1, 4, 0))),
            ("ocr".to_string(), Ok(semver::Version::new(2, 0, 1))),
        ]);
        let manifest = json!({"dependencies": ["plugin:base", "plugin:ocr@^2", "plugin:base@^2", "plugin:nope"]});
        let report = check_with(
            &DependencyChecker::fake(),
            &manifest,
            Path::new(PLUGIN_DIR),
            &known,
        );
        assert_eq!(
            report.missing,
            ["plugin:base@^2 (found 1.4.0)", "plugin:nope"]
        );
    }

    #[test]
    fn symlinked_model_counts_when_its_target_exists() {
        let world = FakeWorld::new();
        world.fs.add_file("/shared/models/big.bin", b"x");
        world
            .fs
            .add_symlink("/plugins/vision/big.bin", "../../shared/models/big.bin");
        world
            .fs
            .add_symlink("/plugins/vision/gone.bin", "/shared/models/gone.bin");
        let report = check(
            &world,
            json!({"models": {"big": "big.bin", "gone": "gone.bin"}}),
        );
        assert_eq!(report.missing, ["gone (path: /plugins/vision/gone.bin)"]);
    }

    #[test]
    fn reason_lists_items_in_stable_order() {
        let world = FakeWorld::new();
        let manifest = json!({"dependencies": ["lib:b", "lib:a"], "requires_gpu": true, "models": {"z": "z", "a": "a"}});
        let first = check(&world, manifest.clone());
        let second = check(&world, manifest);
        assert_eq!(first, second);
        let reason = first.reason.unwrap();
        assert!(
            reason.starts_with("Missing dependencies: lib:b, lib:a, gpu, z (path: /plugins/vision/z), a (path: /plugins/vision/a); "),
            "{reason}"
        );
    }

    #[test]
    fn checker_works_through_the_fs_seam_alone() {
        let fs = FakeFs::new().add_file("/p/model.bin", b"m");
        let checker = DependencyChecker::builder()
            .fs(std::sync::Arc::new(fs))
            .gpu(std::sync::Arc::new(FakeGpu::none("no GPU (CUDA absent)")))
            .build();
        let report = check_with(
            &checker,
            &json!({"models": {"m": "model.bin"}}),
            Path::new("/p"),
            &BTreeMap::new(),
        );
        assert!(report.available);
    }
}

mod real {
    //! The real probes, on facts true of any Linux box.
    use super::*;

    fn check_real(deps: &[&str]) -> DependencyReport {
        check_with(
            &DependencyChecker::system(vec![]),
            &json!({ "dependencies": deps }),
            Path::new("/nonexistent-plugin-dir"),
            &BTreeMap::new(),
        )
    }

    #[test]
    fn libc_found_by_short_name_and_soname() {
        assert_eq!(
            check_real(&["lib:c", "libc.so.6", "lib:libc.so.6"]).missing,
            Vec::<String>::new()
        );
    }

    #[test]
    fn sh_found_on_path() {
        assert!(check_real(&["bin:sh"]).available);
    }

    #[test]
    fn path_variable_set() {
        assert!(check_real(&["env:PATH"]).available);
    }

    #[test]
    fn missing_things_are_named() {
        let report = check_real(&[
            "lib:c",
            "lib:definitely_missing_xyz",
            "bin:definitely_missing_xyz_bin",
            "env:FORGESYTE_DEFINITELY_UNSET_XYZ",
        ]);
        assert_eq!(
            report.missing,
            [
                "lib:definitely_missing_xyz",
                "bin:definitely_missing_xyz_bin",
                "env:FORGESYTE_DEFINITELY_UNSET_XYZ"
            ]
        );
    }

    #[test]
    fn real_gpu_probe_never_panics_and_agrees_with_the_driver_library() {
        let report = CudaProbe::new().report();
        if cuda_driver_library_present() {
            assert_eq!(report.available, !report.devices.is_empty(), "{report:?}");
            assert_eq!(report.available, report.reason.is_none(), "{report:?}");
        } else {
            assert!(!report.available, "{report:?}");
            assert!(report.devices.is_empty());
            let reason = report.reason.as_deref().unwrap_or_default();
            assert!(reason.contains("CUDA"), "{reason}");
        }
        // Through the checker, a GPU requirement follows the same report.
        let checked = check_with(
            &DependencyChecker::system(vec![]),
            &json!({"requires_gpu": true}),
            Path::new("/nonexistent-plugin-dir"),
            &BTreeMap::new(),
        );
        assert_eq!(checked.available, report.available);
    }
}

mod python {
    //! Python packages (`py:NAME`, bare names of Python plugins) on the fakes.
    use super::*;
    use forgesyte_deps::BareDependency;

    const VENV: &str = "/venv/bin/python";
    const SYSTEM: &str = "/usr/bin/python3";

    fn python_req(deps: &[&str], interpreter: Option<&str>) -> Requirements {
        let manifest = json!({ "dependencies": deps });
        let mut req = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
        req.python = interpreter.map(Into::into);
        req
    }

    fn check_req(checker: &DependencyChecker, req: &Requirements) -> DependencyReport {
        let report = checker.check(req, Path::new(PLUGIN_DIR), &BTreeMap::new());
        assert_eq!(report.available, report.missing.is_empty(), "{report:?}");
        report
    }

    #[test]
    fn every_missing_package_named_like_the_seed() {
        let world = FakeWorld::new();
        world.python.add(VENV, &["json"]);
        let req = python_req(&["torch", "numpy", "json"], Some(VENV));
        let checker = world.checker();
        checker.prefetch_python_for([&req]);
        let report = check_req(&checker, &req);
        assert_eq!(report.missing, ["torch", "numpy"]);
        assert_eq!(
            report.reason.as_deref(),
            Some("Missing dependencies: torch, numpy")
        );
        assert_eq!(world.python.calls(), 1);
    }

    #[test]
    fn bare_names_mean_lib_for_native_plugins() {
        let world = FakeWorld::new();
        world.python.add(VENV, &["torch"]);
        world.libraries.add("z");
        let manifest = json!({ "dependencies": ["torch", "z", "py:torch"] });
        let mut req = Requirements::from_manifest(&manifest).unwrap();
        req.python = Some(VENV.into());
        let report = check_req(&world.checker(), &req);
        assert_eq!(report.missing, ["lib:torch"], "py: works in any manifest");
    }

    #[test]
    fn py_prefix_in_any_manifest_and_kinds_mix() {
        let world = FakeWorld::new();
        world.python.add(VENV, &["torch"]);
        world.env.set("HOME", "/root");
        let req = python_req(
            &[
                "py:torch.cuda",
                "py:cv2",
                "env:HOME",
                "lib:missing",
                "numpy",
            ],
            Some(VENV),
        );
        let report = check_req(&world.checker(), &req);
        assert_eq!(report.missing, ["py:cv2", "lib:missing", "numpy"]);
        assert_eq!(
            report.reason.as_deref(),
            Some("Missing dependencies: py:cv2, lib:missing, numpy")
        );
    }

    #[test]
    fn one_run_per_interpreter_per_pass() {
        let world = FakeWorld::new();
        world.python.add(VENV, &["torch", "numpy"]);
        world.python.add(SYSTEM, &["numpy"]);
        let ocr = python_req(&["torch", "numpy"], Some(VENV));
        let det = python_req(&["numpy", "cv2", "torch.cuda"], Some(VENV));
        let seg = python_req(&["scipy", "py:numpy"], Some(VENV));
        let checker = world.checker();
        checker.prefetch_python_for([&ocr, &det, &seg]);
        assert_eq!(
            world.python.calls(),
            1,
            "three plugins, one interpreter: one run"
        );
        assert_eq!(
            world.python.asked(),
            [(
                VENV.into(),
                vec![
                    "torch".to_string(),
                    "numpy".into(),
                    "cv2".into(),
                    "torch.cuda".into(),
                    "scipy".into()
                ]
            )]
        );
        assert!(check_req(&checker, &ocr).available);
        assert_eq!(check_req(&checker, &det).missing, ["cv2"]);
        assert_eq!(check_req(&checker, &seg).missing, ["scipy"]);
        assert_eq!(world.python.calls(), 1, "the checks ask nothing more");

        // Two interpreters: two runs.
        checker.clear_cache();
        let sys = python_req(&["torch", "numpy"], Some(SYSTEM));
        checker.prefetch_python_for([&ocr, &det, &sys, &seg]);
        assert_eq!(world.python.calls(), 3);
        assert_eq!(check_req(&checker, &sys).missing, ["torch"]);
        assert!(check_req(&checker, &ocr).available);
        assert_eq!(world.python.calls(), 3);
    }

    #[test]
    fn a_failing_interpreter_is_named_for_each_package() {
        let world = FakeWorld::new();
        world.python.add(VENV, &["torch"]);
        world.python.add(SYSTEM, &["torch"]);
        world
            .python
            .fail(VENV, "exited with status 1: SyntaxError: bad");
        let broken = python_req(&["torch", "numpy"], Some(VENV));
        let fine = python_req(&["torch"], Some(SYSTEM));
        let checker = world.checker();
        checker.prefetch_python_for([&broken, &fine]);
        assert_eq!(world.python.calls(), 2);
        let report = check_req(&checker, &broken);
        assert_eq!(
            report.missing,
            [
                "torch (cannot ask /venv/bin/python: exited with status 1: SyntaxError: bad)",
                "numpy (cannot ask /venv/bin/python: exited with status 1: SyntaxError: bad)"
            ]
        );
        assert!(check_req(&checker, &fine).available);
        assert_eq!(
            world.python.calls(),
            2,
            "the failure is remembered for the pass"
        );
    }

    #[test]
    fn no_interpreter_resolved_means_missing() {
        let world = FakeWorld::new();
        let req = python_req(&["torch"], None);
        let report = check_req(&world.checker(), &req);
        assert_eq!(report.missing, ["torch (no Python interpreter)"]);
        assert_eq!(world.python.calls(), 0);
    }
}

mod real_python {
    //! [`SystemPython`] against the machine's real `python3`, which every
    //! machine here has: its absence is a failure, not a skip.
    use super::*;
    use forgesyte_deps::{BareDependency, ExecutableProbe, PythonProbe, SystemPath, SystemPython};
    use std::path::PathBuf;
    use std::time::Duration;

    fn python3() -> PathBuf {
        SystemPath.find("python3").unwrap_or_else(|| {
            panic!("python3 is not on PATH: these tests need a real Python interpreter")
        })
    }

    fn names(packages: &[&str]) -> Vec<String> {
        packages.iter().map(|p| p.to_string()).collect()
    }

    /// `find`, retried while another thread's fork still holds a freshly
    /// written wrapper script open (`ETXTBSY`).
    fn find(interpreter: &Path, packages: &[&str]) -> Result<Vec<bool>, String> {
        answers(interpreter, packages).map(|found| {
            found
                .iter()
                .map(|a| *a != forgesyte_deps::PythonAnswer::Missing)
                .collect()
        })
    }

    /// The probe's answers, retried like [`find`].
    fn answers(
        interpreter: &Path,
        packages: &[&str],
    ) -> Result<Vec<forgesyte_deps::PythonAnswer>, String> {
        let packages = names(packages);
        for _ in 0..20 {
            match SystemPython::new().find(interpreter, &packages) {
                Err(e) if e.contains("Text file busy") => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                answer => return answer,
            }
        }
        SystemPython::new().find(interpreter, &packages)
    }

    #[test]
    fn stdlib_found_and_missing_named() {
        let python = python3();
        assert_eq!(
            find(
                &python,
                &["json", "os.path", "forgesyte_surely_missing_pkg"]
            ),
            Ok(vec![true, true, false])
        );
    }

    /// An executable `python` in `dir` that runs the real interpreter with
    /// `site` as its `PYTHONPATH`.
    #[cfg(unix)]
    fn python_on(dir: &Path, site: &Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let wrapper = dir.join("python");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nPYTHONPATH={} exec {} \"$@\"\n",
                site.display(),
                python3().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        wrapper
    }

    /// `req` checked by the real checker after a prefetch, as the loader
    /// does, retried while another thread's fork still holds a freshly
    /// written wrapper open (`ETXTBSY`).
    fn checked(req: &Requirements) -> DependencyReport {
        let checker = DependencyChecker::system(vec![]);
        let mut report = DependencyReport::ok();
        for _ in 0..20 {
            checker.clear_cache();
            checker.prefetch_python_for([req]);
            report = checker.check(req, Path::new(PLUGIN_DIR), &BTreeMap::new());
            if !report.missing.iter().any(|m| m.contains("Text file busy")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        report
    }

    #[cfg(unix)]
    #[test]
    fn packages_are_found_without_being_imported() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        let pkg = site.join("forgesyte_boom");
        std::fs::create_dir_all(&pkg).unwrap();
        let marker = dir.path().join("imported");
        std::fs::write(
            pkg.join("__init__.py"),
            format!(
                "open({:?}, 'w').write('imported')\nraise RuntimeError('must not be imported')\n",
                marker.to_str().unwrap()
            ),
        )
        .unwrap();
        std::fs::write(pkg.join("sub.py"), "raise RuntimeError('nor this')\n").unwrap();
        let wrapper = python_on(dir.path(), &site);

        assert_eq!(
            find(
                &wrapper,
                &[
                    "forgesyte_boom",
                    "forgesyte_boom.sub",
                    "json",
                    "forgesyte_surely_missing_pkg"
                ]
            ),
            Ok(vec![true, true, true, false])
        );
        assert!(!marker.exists(), "the package was imported");

        // Through the checker, as the loader will use it.
        let manifest =
            json!({"dependencies": ["forgesyte_boom", "forgesyte_surely_missing_pkg", "py:json"]});
        let mut req = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
        req.python = Some(wrapper.clone());
        let report = checked(&req);
        assert_eq!(report.missing, ["forgesyte_surely_missing_pkg"]);
        assert_eq!(
            report.reason.as_deref(),
            Some("Missing dependencies: forgesyte_surely_missing_pkg")
        );
        assert!(!marker.exists(), "the package was imported");
    }

    /// Version requirements through a real interpreter: the version comes
    /// from a distribution's metadata (a `.dist-info` on `PYTHONPATH`, the
    /// package never imported), and every unmet one is named with what is
    /// installed.
    #[cfg(unix)]
    #[test]
    fn version_requirements_are_checked_against_installed_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        let pkg = site.join("forgesyte_versioned");
        std::fs::create_dir_all(&pkg).unwrap();
        let marker = dir.path().join("imported");
        std::fs::write(
            pkg.join("__init__.py"),
            format!(
                "open({:?}, 'w').write('imported')\n",
                marker.to_str().unwrap()
            ),
        )
        .unwrap();
        let dist = site.join("forgesyte_versioned-1.4.2.dist-info");
        std::fs::create_dir_all(&dist).unwrap();
        std::fs::write(
            dist.join("METADATA"),
            "Metadata-Version: 2.1\nName: forgesyte-versioned\nVersion: 1.4.2\n",
        )
        .unwrap();
        let wrapper = python_on(dir.path(), &site);

        assert_eq!(
            answers(
                &wrapper,
                &[
                    "=forgesyte-versioned",
                    "=forgesyte_versioned",
                    "=forgesyte-nothing",
                    "=json"
                ]
            ),
            Ok(vec![
                forgesyte_deps::PythonAnswer::Version("1.4.2".into()),
                forgesyte_deps::PythonAnswer::Version("1.4.2".into()),
                forgesyte_deps::PythonAnswer::Missing,
                // A module, no distribution: no version to read.
                forgesyte_deps::PythonAnswer::Found,
            ])
        );
        let manifest = json!({"dependencies": [
            "forgesyte-versioned>=1.4, <2",
            "forgesyte_versioned ~= 1.4.0",
            "forgesyte-versioned[extra]==1.4.*",
            "forgesyte-versioned>=2",
            "py:forgesyte-versioned!=1.4.2",
            "forgesyte-nothing>=1",
        ]});
        let mut req = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
        req.python = Some(wrapper.clone());
        let report = checked(&req);
        assert_eq!(
            report.missing,
            [
                "forgesyte-versioned>=2 (1.4.2 installed)",
                "py:forgesyte-versioned!=1.4.2 (1.4.2 installed)",
                "forgesyte-nothing>=1",
            ]
        );
        assert!(!marker.exists(), "the package was imported");
    }

    #[test]
    fn a_bogus_interpreter_is_named() {
        let err = find(Path::new("/nonexistent/bin/python3"), &["json"]).unwrap_err();
        assert!(err.contains("/nonexistent/bin/python3"), "{err}");
        let manifest = json!({"dependencies": ["json"]});
        let mut req = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
        req.python = Some("/nonexistent/bin/python3".into());
        let report =
            DependencyChecker::system(vec![]).check(&req, Path::new(PLUGIN_DIR), &BTreeMap::new());
        assert_eq!(report.missing.len(), 1);
        assert!(
            report.missing[0]
                .starts_with("json (cannot ask /nonexistent/bin/python3: cannot start: "),
            "{report:?}"
        );
    }
}

// ---------------------------------------------------------------- property

const LIBS: [&str; 4] = ["a", "b", "c", "libd.so.1"];
const BINS: [&str; 3] = ["sh", "ffmpeg", "convert"];
const VARS: [&str; 3] = ["HOME", "API_KEY", "TOKEN"];
const PLUGINS: [&str; 2] = ["base", "vision"];
const REQS: [&str; 4] = ["", "@^1", "@>=2", "@~1.2"];
const MODELS: [&str; 3] = ["m1", "m2", "m3"];

#[derive(Debug, Clone)]
struct World {
    libs: [bool; 4],
    bins: [bool; 3],
    vars: [bool; 3],
    plugins: [Option<(u64, u64)>; 2],
    /// `(memory GiB, compute capability)` per device; `None`: no driver.
    gpu: Option<Vec<(u64, (u32, u32))>>,
    models: [bool; 3],
}

#[derive(Debug, Clone)]
enum Dep {
    Lib(usize),
    Bin(usize),
    Env(usize),
    Plugin(usize, usize),
}

#[derive(Debug, Clone)]
enum Gpu {
    None,
    Any,
    Spec(Option<u32>, Option<u64>, Option<(u32, u32)>),
}

#[derive(Debug, Clone)]
struct Case {
    world: World,
    deps: Vec<Dep>,
    gpu: Gpu,
    /// `(model index, absolute path?)`.
    models: Vec<(usize, bool)>,
}

fn world() -> impl Strategy<Value = World> {
    (
        any::<[bool; 4]>(),
        any::<[bool; 3]>(),
        any::<[bool; 3]>(),
        [
            proptest::option::of((0u64..4, 0u64..4)),
            proptest::option::of((0u64..4, 0u64..4)),
        ],
        proptest::option::of(proptest::collection::vec(
            (1u64..=80, (6u32..=9, 0u32..=9)),
            0..3,
        )),
        any::<[bool; 3]>(),
    )
        .prop_map(|(libs, bins, vars, plugins, gpu, models)| World {
            libs,
            bins,
            vars,
            plugins,
            gpu,
            models,
        })
}

fn dep() -> impl Strategy<Value = Dep> {
    prop_oneof![
        (0..LIBS.len()).prop_map(Dep::Lib),
        (0..BINS.len()).prop_map(Dep::Bin),
        (0..VARS.len()).prop_map(Dep::Env),
        (0..PLUGINS.len(), 0..REQS.len()).prop_map(|(p, r)| Dep::Plugin(p, r)),
    ]
}

fn gpu_req() -> impl Strategy<Value = Gpu> {
    prop_oneof![
        Just(Gpu::None),
        Just(Gpu::Any),
        (
            proptest::option::of(1u32..=3),
            proptest::option::of(prop_oneof![
                Just(8 * 1024u64),
                Just(16 * 1024),
                Just(40 * 1024),
                Just(20000)
            ]),
            proptest::option::of((7u32..=9, 0u32..=9)),
        )
            .prop_map(|(n, m, c)| Gpu::Spec(n, m, c)),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        world(),
        proptest::collection::vec(dep(), 0..8),
        gpu_req(),
        proptest::collection::vec((0..MODELS.len(), any::<bool>()), 0..4),
    )
        .prop_map(|(world, deps, gpu, models)| Case {
            world,
            deps,
            gpu,
            models,
        })
}

fn model_path(i: usize, absolute: bool) -> String {
    if absolute {
        format!("/srv/models/{}.bin", MODELS[i])
    } else {
        format!("models/{}.bin", MODELS[i])
    }
}

impl Case {
    fn manifest(&self) -> Value {
        let deps: Vec<String> = self
            .deps
            .iter()
            .map(|d| match d {
                Dep::Lib(i) => format!("lib:{}", LIBS[*i]),
                Dep::Bin(i) => format!("bin:{}", BINS[*i]),
                Dep::Env(i) => format!("env:{}", VARS[*i]),
                Dep::Plugin(p, r) => format!("plugin:{}{}", PLUGINS[*p], REQS[*r]),
            })
            .collect();
        let gpu = match &self.gpu {
            Gpu::None => json!(false),
            Gpu::Any => json!(true),
            Gpu::Spec(n, m, c) => {
                let mut o = serde_json::Map::new();
                if let Some(n) = n {
                    o.insert("min_devices".into(), json!(n));
                }
                if let Some(m) = m {
                    o.insert("min_memory_mb".into(), json!(m));
                }
                if let Some((a, b)) = c {
                    o.insert("min_compute_capability".into(), json!(format!("{a}.{b}")));
                }
                Value::Object(o)
            }
        };
        // Later duplicates of a name replace earlier ones in a JSON object.
        let mut models = serde_json::Map::new();
        for (i, abs) in &self.models {
            models.insert(MODELS[*i].to_string(), json!(model_path(*i, *abs)));
        }
        json!({"dependencies": deps, "requires_gpu": gpu, "models": models})
    }

    fn build(&self) -> (FakeWorld, forgesyte_deps::KnownPlugins) {
        let w = &self.world;
        let fake = FakeWorld::new();
        for (i, lib) in LIBS.iter().enumerate() {
            if w.libs[i] {
                fake.libraries.add(lib);
            }
        }
        for (i, bin) in BINS.iter().enumerate() {
            if w.bins[i] {
                fake.executables.add(bin);
            }
        }
        for (i, var) in VARS.iter().enumerate() {
            if w.vars[i] {
                fake.env.set(var, "value");
            }
        }
        match &w.gpu {
            None => {
                fake.gpu.set_report(
                    FakeGpu::none("CUDA driver library (libcuda.so) not found").probe(),
                );
            }
            Some(devs) => {
                let devices = devs
                    .iter()
                    .enumerate()
                    .map(|(i, (mem, cc))| device(i as u32, *mem, *cc))
                    .collect();
                fake.gpu.set_devices(devices);
            }
        }
        for (i, present) in w.models.iter().enumerate() {
            if *present {
                fake.fs
                    .add_file(Path::new(PLUGIN_DIR).join(model_path(i, false)), b"m");
                fake.fs.add_file(model_path(i, true), b"m");
            }
        }
        let known = PLUGINS
            .iter()
            .zip(&w.plugins)
            .filter_map(|(name, v)| {
                v.map(|(maj, min)| (name.to_string(), Ok(semver::Version::new(maj, min, 0))))
            })
            .collect();
        (fake, known)
    }

    /// What a correct checker reports missing, worked out independently.
    fn expected_missing(&self, known: &forgesyte_deps::KnownPlugins) -> Vec<String> {
        let w = &self.world;
        let mut out: Vec<String> = Vec::new();
        for d in &self.deps {
            let item = match d {
                Dep::Lib(i) => (!w.libs[*i]).then(|| format!("lib:{}", LIBS[*i])),
                Dep::Bin(i) => (!w.bins[*i]).then(|| format!("bin:{}", BINS[*i])),
                Dep::Env(i) => (!w.vars[*i]).then(|| format!("env:{}", VARS[*i])),
                Dep::Plugin(p, r) => {
                    let req = REQS[*r]
                        .strip_prefix('@')
                        .map(|s| semver::VersionReq::parse(s).unwrap());
                    let shown = match &req {
                        Some(req) => format!("plugin:{}@{req}", PLUGINS[*p]),
                        None => format!("plugin:{}", PLUGINS[*p]),
                    };
                    match (known.get(PLUGINS[*p]), &req) {
                        (None, _) => Some(shown),
                        (Some(Ok(v)), Some(req)) if !req.matches(v) => {
                            Some(format!("{shown} (found {v})"))
                        }
                        _ => None,
                    }
                }
            };
            out.extend(item);
        }
        let devices = w.gpu.clone().unwrap_or_default();
        let gpu_ok = match &self.gpu {
            Gpu::None => true,
            Gpu::Any => !devices.is_empty(),
            Gpu::Spec(n, m, c) => {
                let qualifying = devices
                    .iter()
                    .filter(|(mem, cc)| {
                        m.is_none_or(|m| mem * 1024 >= m) && c.is_none_or(|c| *cc >= c)
                    })
                    .count();
                !devices.is_empty() && qualifying >= n.unwrap_or(1) as usize
            }
        };
        if !gpu_ok {
            out.push("gpu".into());
        }
        let mut models: Vec<(usize, bool)> = Vec::new();
        for (i, abs) in &self.models {
            match models.iter_mut().find(|(j, _)| j == i) {
                Some(slot) => slot.1 = *abs,
                None => models.push((*i, *abs)),
            }
        }
        for (i, abs) in models {
            if !w.models[i] {
                let path = DependencyChecker::resolve_model_path(
                    Path::new(PLUGIN_DIR),
                    Path::new(&model_path(i, abs)),
                );
                out.push(format!("{} (path: {})", MODELS[i], path.display()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|s| seen.insert(s.clone()));
        out
    }
}

proptest! {
    #[test]
    fn report_matches_the_world(case in case()) {
        let (world, known) = case.build();
        let manifest = case.manifest();
        let checker = world.checker();
        let first = check_with(&checker, &manifest, Path::new(PLUGIN_DIR), &known);
        prop_assert_eq!(&first.missing, &case.expected_missing(&known));
        // Stable: the same input twice, from the cache and from a fresh checker.
        let again = check_with(&checker, &manifest, Path::new(PLUGIN_DIR), &known);
        prop_assert_eq!(&again, &first);
        let fresh = check_with(&world.checker(), &manifest, Path::new(PLUGIN_DIR), &known);
        prop_assert_eq!(&fresh, &first);
        checker.clear_cache();
        let cleared = check_with(&checker, &manifest, Path::new(PLUGIN_DIR), &known);
        prop_assert_eq!(&cleared, &first);
        prop_assert_eq!(first.clone().into_error().is_none(), first.available);
    }
}

#[test]
fn model_names_keep_manifest_order_through_parsing() {
    let manifest: Value =
        serde_json::from_str(r#"{"models": {"zeta": "z.bin", "alpha": "a.bin"}}"#).unwrap();
    let report = check(&FakeWorld::new(), manifest);
    assert_eq!(
        report.missing,
        [
            "zeta (path: /plugins/vision/z.bin)",
            "alpha (path: /plugins/vision/a.bin)"
        ]
    );
}
