//! Child-process hygiene, against the real binary and real runners: a
//! terminal's Ctrl-C reaches the server only (which drains), and runners
//! never outlive a killed server.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Forgesyte, PluginsDir, runner_pid};

/// Whether process `pid` has ended (gone, or a zombie waiting for its new
/// parent to reap it).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) STATE …`; comm may hold spaces, so read after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn signal(target: &str, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, "--", target])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {target} failed");
}

#[test]
fn ctrl_c_reaches_the_server_only_which_drains_isolated_calls() {
    let dir = PluginsDir::new();
    dir.good("iso", json!({"isolation": "process"}));
    let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let runner = runner_pid(server.pid(), "iso").expect("the runner of iso");
    let addr = server.addr;
    let call = std::thread::spawn(move || {
        crate::support::http(
            addr,
            "POST",
            "/v1/plugins/iso/tools/sleep/run",
            br#"{"args": {"ms": 1500}}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(400));
    // What a terminal does on Ctrl-C: SIGINT to its foreground process
    // group, which is the server's (and, before this fix, its runners').
    signal(&format!("-{}", server.pid()), "-INT");
    let reply = call.join().unwrap();
    assert_eq!(
        reply.status,
        200,
        "the in-flight call must finish: {}\nlog:\n{}",
        reply.text(),
        server.log()
    );
    let status = server.wait_exit(Duration::from_secs(20));
    let log = server.log();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(
        !log.contains("Restarting plugin"),
        "a restart during shutdown:\n{log}"
    );
    assert!(
        !log.contains("✗ Plugin FAILED"),
        "a plugin failed during shutdown:\n{log}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ended(runner) {
        assert!(
            Instant::now() < deadline,
            "runner {runner} outlived the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn runners_are_gone_within_a_second_of_a_sigkilled_server() {
    const PLUGINS: [&str; 3] = ["iso-a", "iso-b", "iso-c"];
    let dir = PluginsDir::new();
    for name in PLUGINS {
        dir.good(name, json!({"isolation": "process"}));
    }
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let runners: Vec<u32> = PLUGINS
        .iter()
        .map(|name| runner_pid(server.pid(), name).unwrap_or_else(|| panic!("no runner of {name}")))
        .collect();
    assert!(runners.iter().all(|&pid| !ended(pid)));
    signal(&server.pid().to_string(), "-KILL");
    let killed = Instant::now();
    let mut alive = runners.clone();
    while !alive.is_empty() {
        alive.retain(|&pid| !ended(pid));
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "runners {alive:?} outlived the SIGKILLed server by a second"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A runner that never reads its stdin (stuck before its hello, as in a
/// hanging library initialiser or a slow import) does not notice the pipe
/// closing: only the parent-death signal ends it with the server.
#[test]
fn a_stuck_runner_is_gone_within_a_second_of_a_sigkilled_server() {
    let dir = PluginsDir::new();
    dir.good(
        "stuck",
        json!({"isolation": "process", "limits": {"init_timeout_s": 60}}),
    );
    let script = dir.path().join("stuck-runner.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nexec python3 -c 'import time; time.sleep(60)' \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let server = Forgesyte::start(&[
        "--plugins",
        dir.path_str(),
        "--runner",
        script.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let runner = loop {
        if let Some(pid) = runner_pid(server.pid(), "stuck") {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no runner started; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    signal(&server.pid().to_string(), "-KILL");
    let killed = Instant::now();
    while !ended(runner) {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "the stuck runner {runner} outlived the SIGKILLed server by a second"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
