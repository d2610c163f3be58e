//! The runner conformance suite (`forgesyte_tests::conformance`) against
//! this crate's native runner hosting the fixture zoo's `good` plugin, one
//! test per check; and the suite's own sanity: it rejects runners that do
//! not speak the protocol.

use std::any::Any;
use std::ffi::OsString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use forgesyte_tests::conformance::{self, RunnerUnderTest};
use forgesyte_tests::zoo;
use serde_json::Value;

const RUNNER: &str = env!("CARGO_BIN_EXE_forgesyte-runner");

/// `forgesyte-runner` hosting the `good` fixture (tools `echo`, `sleep`, …).
fn native() -> RunnerUnderTest {
    let manifest = Path::new(zoo::GOOD).join("manifest.json");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(&manifest).expect("the good fixture's manifest"),
    )
    .expect("the good fixture's manifest is JSON");
    RunnerUnderTest {
        program: RUNNER.into(),
        args: [
            "--library",
            zoo::GOOD_LIBRARY,
            "--memory-limit-mb",
            "0",
            "--plugin",
            "conformance",
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
        envs: Vec::new(),
        manifest,
        plugin_dir: zoo::GOOD.into(),
        echo_tool: "echo".into(),
        sleep_tool: Some("sleep".into()),
    }
}

#[test]
fn native_runner_handshake() {
    conformance::check_handshake(&native());
}

#[test]
fn native_runner_construct() {
    conformance::check_construct(&native());
}

#[test]
fn native_runner_tools() {
    conformance::check_tools(&native());
}

#[test]
fn native_runner_call() {
    conformance::check_call(&native());
}

#[test]
fn native_runner_attachments() {
    conformance::check_attachments(&native());
}

#[test]
fn native_runner_oversized_frame() {
    conformance::check_oversized_frame(&native());
}

#[test]
fn native_runner_garbage() {
    conformance::check_garbage(&native());
}

#[test]
fn native_runner_early_exit() {
    conformance::check_early_exit(&native());
}

#[test]
fn native_runner_shared_memory() {
    conformance::check_shared_memory(&native());
}

/// A fake runner: a shell that prints `output` (a `printf` format), then
/// reads its stdin to the end, as a runner waiting for requests would.
fn shell_runner(output: &str) -> RunnerUnderTest {
    RunnerUnderTest {
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!("printf '{output}'; exec cat >/dev/null").into(),
        ],
        ..native()
    }
}

/// The message of the panic `check` ends with; fails if it does not panic.
fn failure_of(check: fn(&RunnerUnderTest), runner: &RunnerUnderTest) -> String {
    let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(runner))) else {
        panic!("the suite accepted a runner that does not speak the protocol")
    };
    let panic: Box<dyn Any + Send> = panic;
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => panic
            .downcast::<&str>()
            .map(|m| (*m).to_owned())
            .unwrap_or_default(),
    }
}

#[test]
fn the_suite_rejects_a_runner_that_prints_garbage() {
    let message = failure_of(
        conformance::check_handshake,
        &shell_runner("garbage, not a frame"),
    );
    assert!(
        message.contains("conformance check `handshake` failed") && message.contains("\"garb\""),
        "{message}"
    );
}

#[test]
fn the_suite_rejects_a_version_1_runner() {
    // A version-1 hello: a length and bare JSON, no protocol version.
    let json = r#"{"type":"hello","abi_version":1,"sdk_version":"0.1.0","pid":1}"#;
    let len = json.len();
    assert!(len < 256, "one length byte");
    let message = failure_of(
        conformance::check_handshake,
        &shell_runner(&format!("\\{len:03o}\\000\\000\\000{json}")),
    );
    assert!(message.contains("protocol version 1"), "{message}");
}

/// Under a memory limit, a frame announced larger than the runner can hold
/// (but under its frame cap) is a protocol error (exit 65), never an abort
/// from a failed allocation.
#[test]
fn a_memory_limited_runner_refuses_a_frame_it_cannot_hold() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(RUNNER)
        .args(["--library", zoo::GOOD_LIBRARY, "--memory-limit-mb", "256"])
        .args(["--plugin", "conformance"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the runner");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut len = [0u8; 4];
    stdout.read_exact(&mut len).expect("the hello's length");
    let mut hello = vec![0u8; u32::from_le_bytes(len) as usize];
    stdout.read_exact(&mut hello).expect("the hello");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(&(1u32 << 30).to_le_bytes())
        .expect("announce 1 GiB");
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the runner did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    assert_eq!(status.code(), Some(65), "{status:?}; stderr: {stderr}");
}
