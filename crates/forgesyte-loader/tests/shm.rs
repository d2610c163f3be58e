//! Attachments through shared memory (`PROTOCOL.md` §3.1) with real
//! runners: the native `forgesyte-runner` (the `faulty` fixture's `echo`
//! gets base64 strings, ABI 1) and the Python runner (a plugin written
//! here: `echo` returns its bytes, `view` opts in to zero-copy
//! `memoryview`s). Byte-exact round trips at the sizes around the
//! threshold, attachments across a crash, and no memory file or mapping
//! left in the host after thousands of calls and a hundred runner kills.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use forgesyte_deps::DependencyChecker;
use forgesyte_loader::{CallError, Loader, LoaderConfig, ProcessLimits, SupervisionPolicy};
use forgesyte_protocol::wire::shm::{DEFAULT_SHM_THRESHOLD, MEMFD_NAME, SPARE_MEMFD_NAME};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use forgesyte_tests::zoo;
use serde_json::{Value, json};

use crate::python::require_python;

const RUNNER: &str = env!("CARGO_BIN_EXE_forgesyte-runner");
const NATIVE: &str = "shm-native";
const PYTHON: &str = "shm-python";
const MIB: usize = 1024 * 1024;

const PLUGIN_PY: &str = r#"
import hashlib
import time


class Plugin:
    name = "shm-python"

    def __init__(self):
        obj = {"type": "object"}
        self.tools = {
            "echo": {"input_schema": obj, "output_schema": obj},
            "view": {"input_schema": obj, "output_schema": obj, "zero_copy": True},
            "sleep": {"input_schema": obj, "output_schema": obj},
        }

    def run_tool(self, tool, args):
        if tool == "echo":
            return args
        if tool == "view":
            data = args["data"]
            return {"type": type(data).__name__, "len": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        time.sleep(args.get("ms", 0) / 1000.0)
        return {}
"#;

/// A plugins directory with the native and the Python plugin, and a loader
/// over it that restarts crashed runners at once, any number of times.
fn setup() -> (tempfile::TempDir, Registry, Loader) {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join(NATIVE);
    std::fs::create_dir_all(&native).unwrap();
    std::fs::write(
        native.join("manifest.json"),
        json!({"name": NATIVE, "version": "1.0.0", "entrypoint": "libfixture_faulty.so",
               "isolation": "process"})
        .to_string(),
    )
    .unwrap();
    let python = dir.path().join(PYTHON);
    std::fs::create_dir_all(&python).unwrap();
    std::fs::write(python.join("plugin.py"), PLUGIN_PY).unwrap();
    std::fs::write(
        python.join("manifest.json"),
        json!({"name": PYTHON, "version": "1.0.0", "runtime": "python"}).to_string(),
    )
    .unwrap();
    let registry = Registry::new();
    let lib_dir = Path::new(zoo::FAULTY_LIBRARY)
        .parent()
        .unwrap()
        .to_path_buf();
    let config = LoaderConfig {
        lib_paths: vec![lib_dir],
        runner: Some(RUNNER.into()),
        process: ProcessLimits {
            init_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(10),
            memory_limit_mib: 0,
            max_response_bytes: 64 * MIB as u64,
        },
        supervision: SupervisionPolicy {
            max_restarts: 100_000,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(1),
            ..SupervisionPolicy::default()
        },
        ..LoaderConfig::default()
    };
    let loader = Loader::new(
        registry.clone(),
        Arc::new(DependencyChecker::system(Vec::new())),
        config,
    );
    loader.load_all(dir.path());
    for name in [NATIVE, PYTHON] {
        assert_eq!(
            registry.get_state(name),
            Some(S::Initialized),
            "{:#?}",
            registry.get_status(name)
        );
    }
    (dir, registry, loader)
}

fn call(loader: &Loader, name: &str, tool: &str, data: &[u8]) -> Result<Value, CallError> {
    loader
        .handle(name)
        .unwrap()
        .call_with(tool, &json!({"data": null}), &[("/data", data)])
}

fn decoded(result: &Value) -> Vec<u8> {
    let text = result["data"]
        .as_str()
        .unwrap_or_else(|| panic!("{result}"));
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// Bytes that differ at every position of a page (a misplaced page or a
/// shifted copy shows).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 12)) as u8 ^ seed)
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The host's descriptors and mappings of memory files.
fn host_memfds() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains(MEMFD_NAME))
        .count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .matches(MEMFD_NAME)
        .count();
    (fds, maps)
}

/// Waits (at most 10 s: other tests of this binary may hold some for the
/// length of a call) until the host holds no memory file, nor a mapping.
fn assert_no_memfd_left() {
    let started = Instant::now();
    loop {
        let held = host_memfds();
        if held == (0, 0) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the host still holds (descriptors, mappings) {held:?} of memory files"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The memory files a runner holds (fresh ones and filled spares alike).
fn runner_memfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| {
                    let l = l.to_string_lossy();
                    l.contains(MEMFD_NAME) || l.contains(SPARE_MEMFD_NAME)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Waits (at most 5 s each) until neither live runner holds a memory file.
fn assert_runners_hold_no_memfd(loader: &Loader) {
    for name in [NATIVE, PYTHON] {
        let pid = loader.handle(name).unwrap().pid().unwrap();
        let since = Instant::now();
        while runner_memfds(pid) > 0 {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "{name}'s runner holds memory files"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The host's spare memory files (descriptors, mappings).
fn host_spares() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains(SPARE_MEMFD_NAME))
        .count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .matches(SPARE_MEMFD_NAME)
        .count();
    (fds, maps)
}

fn kill_runner(loader: &Loader, registry: &Registry, name: &str) {
    let pid = loader.handle(name).unwrap().pid().unwrap();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    );
    wait_restarted(loader, registry, name, pid);
}

/// Waits until `name` runs again in a process other than `old`.
fn wait_restarted(loader: &Loader, registry: &Registry, name: &str, old: u32) {
    let started = Instant::now();
    loop {
        let pid = loader.handle(name).and_then(|h| h.pid());
        let up = matches!(registry.get_state(name), Some(S::Initialized | S::Running));
        if up && pid.is_some_and(|p| p != old) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name} not restarted: {:#?}",
            registry.get_status(name)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn attachments_round_trip_byte_exact_at_every_size() {
    let (_dir, _registry, loader) = setup();
    let t = DEFAULT_SHM_THRESHOLD as usize;
    for (n, size) in [0, 1, t - 1, t, t + 1, MIB, 8 * MIB]
        .into_iter()
        .enumerate()
    {
        let data = pattern(size, n as u8);
        // Both ways through the Python runner: bytes in, bytes out.
        let back = call(&loader, PYTHON, "echo", &data).unwrap();
        assert!(decoded(&back) == data, "python echo of {size} bytes");
        // Zero-copy: a memoryview exactly when the bytes came shared.
        let seen = call(&loader, PYTHON, "view", &data).unwrap();
        let expected = if size >= t { "memoryview" } else { "bytes" };
        assert_eq!(seen["type"], json!(expected), "{size}: {seen}");
        assert_eq!(seen["len"], json!(size));
        assert_eq!(seen["sha256"], json!(sha256_hex(&data)));
        // Host to the native runner (an ABI 1 plugin gets base64).
        let back = call(&loader, NATIVE, "echo", &data).unwrap();
        assert!(decoded(&back) == data, "native echo of {size} bytes");
    }
    assert_no_memfd_left();
}

#[test]
fn attachments_across_a_crash_fail_the_call_and_the_next_one_works() {
    let (_dir, registry, loader) = setup();
    let data = pattern(2 * MIB, 7);
    // The native runner dies of its tool while holding a shared attachment.
    let pid = loader.handle(NATIVE).unwrap().pid().unwrap();
    let err = call(&loader, NATIVE, "segv", &data).unwrap_err();
    assert!(err.to_string().contains("SIGSEGV"), "{err}");
    wait_restarted(&loader, &registry, NATIVE, pid);
    assert!(decoded(&call(&loader, NATIVE, "echo", &data).unwrap()) == data);
    // The Python runner is killed in the middle of a call.
    let pid = loader.handle(PYTHON).unwrap().pid().unwrap();
    let caller = {
        let handle = loader.handle(PYTHON).unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            handle.call_with(
                "sleep",
                &json!({"ms": 5000, "data": null}),
                &[("/data", &data)],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    kill_runner(&loader, &registry, PYTHON);
    assert!(caller.join().unwrap().is_err(), "a killed call fails");
    let _ = pid;
    assert!(decoded(&call(&loader, PYTHON, "echo", &data).unwrap()) == data);
    assert_no_memfd_left();
}

/// Attachments of 1 MiB and more are written into spares made in advance
/// (`PROTOCOL.md` §3.1): byte-exact both ways, a spare reaches a runner
/// only sealed and for one call, and the host's stock stays bounded (at
/// most 2 files, never mapped) across calls and kills.
#[test]
fn spares_carry_large_attachments_and_stay_bounded_across_calls_and_kills() {
    let (_dir, registry, loader) = setup();
    let sizes = [MIB, 2 * MIB + 3, 8 * MIB];
    for round in 0..30 {
        let data = pattern(sizes[round % sizes.len()], round as u8);
        let back = call(&loader, PYTHON, "echo", &data).unwrap();
        assert!(decoded(&back) == data, "python echo, round {round}");
        let seen = call(&loader, PYTHON, "view", &data).unwrap();
        assert_eq!(seen["sha256"], json!(sha256_hex(&data)), "round {round}");
        let back = call(&loader, NATIVE, "echo", &data).unwrap();
        assert!(decoded(&back) == data, "native echo, round {round}");
        if round % 10 == 9 {
            kill_runner(&loader, &registry, NATIVE);
            kill_runner(&loader, &registry, PYTHON);
        }
    }
    assert_runners_hold_no_memfd(&loader);
    assert_no_memfd_left();
    // Other tests of this binary may hold a filled spare for the length of
    // a call: wait (10 s at most) for the stock alone.
    let since = Instant::now();
    loop {
        let (fds, maps) = host_spares();
        assert!(maps == 0, "the host mapped a spare");
        if (1..=2).contains(&fds) {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "host spares: {fds} (1 to 2 expected)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_memory_file_outlives_its_call_after_10000_calls_and_100_kills() {
    let started = Instant::now();
    let (_dir, registry, loader) = setup();
    let data = pattern(DEFAULT_SHM_THRESHOLD as usize + 1000, 3);
    let loader = Arc::new(loader);
    // 10,000 calls from four threads, both runners, both directions for
    // Python; meanwhile 100 runner kills (50 each), calls failing then.
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let (loader, data) = (Arc::clone(&loader), data.clone());
            std::thread::spawn(move || {
                // Python echo shares both ways, `view` and the native
                // runner's `ok` only the argument (and cost less).
                let (name, tool) = [
                    (PYTHON, "echo"),
                    (PYTHON, "view"),
                    (NATIVE, "ok"),
                    (NATIVE, "ok"),
                ][i];
                let (mut ok, mut failed) = (0, 0);
                while ok < 2500 {
                    match call(&loader, name, tool, &data) {
                        Ok(back) => {
                            if tool == "echo" {
                                assert!(decoded(&back) == data);
                            } else {
                                assert!(back.is_object(), "{back}");
                            }
                            ok += 1;
                        }
                        Err(_) => {
                            // Killed, or restarting: the next call will do.
                            failed += 1;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                failed
            })
        })
        .collect();
    let kills = Instant::now();
    for k in 0..100 {
        let name = if k % 2 == 0 { PYTHON } else { NATIVE };
        kill_runner(&loader, &registry, name);
        // Calls get through between kills.
        std::thread::sleep(Duration::from_millis(20));
    }
    let kills = kills.elapsed();
    let failed: usize = callers.into_iter().map(|c| c.join().unwrap()).sum();
    assert_runners_hold_no_memfd(&loader);
    assert_no_memfd_left();
    eprintln!(
        "10,000 calls ({failed} more failed) and 100 kills (in {kills:?}) in {:?}",
        started.elapsed()
    );
}
