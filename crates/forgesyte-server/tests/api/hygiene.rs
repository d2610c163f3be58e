//! Child-process hygiene, against the real binary and real runners: a
//! terminal's Ctrl-C reaches the server only (which drains), and runners
//! never outlive a killed server.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::rescan::wait_for;
use crate::support::{Forgesyte, PluginsDir, children_of, runner_pid, signal};

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

/// Waits (at most `limit`) until process `pid` has ended; `what` says, if
/// it has not, what outlived what.
fn wait_ended(pid: u32, limit: Duration, what: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ended(pid) {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid a tool answered as `result.pid`.
fn result_pid(reply: &crate::support::Reply) -> u32 {
    u32::try_from(reply.json()["result"]["pid"].as_u64().unwrap()).unwrap()
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
            br#"{"args": {"ms": 3000}}"#,
        )
    });
    crate::rescan::wait_running(&server, "iso");
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
    wait_ended(runner, Duration::from_secs(5), || {
        format!("runner {runner} outlived the server")
    });
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

/// A process a Python plugin started (in its runner's process group) ends
/// with the runner when the runner crashes: forked by the zygote (whose
/// exit report kills the group) and started on its own (the host kills
/// the group before it reaps the runner).
#[test]
fn a_python_plugins_own_processes_end_with_its_crashed_runner() {
    for zygote in ["1", "0"] {
        let dir = PluginsDir::new();
        dir.python("faulty", "faulty");
        let server = Forgesyte::start_with_env(
            &["--plugins", dir.path_str()],
            &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        );
        server.wait_loaded();
        let reply = server.run("faulty", "spawn", r#"{"args": {}}"#);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let sleeper = result_pid(&reply);
        assert!(!ended(sleeper));
        let crash = server.run("faulty", "exit", r#"{"args": {}}"#);
        assert_eq!(crash.status, 502, "{}", crash.text());
        wait_ended(sleeper, Duration::from_secs(3), || {
            format!(
                "FORGESYTE_PYTHON_ZYGOTE={zygote}: the plugin's process {sleeper} outlived its runner"
            )
        });
    }
}

/// A process a Python plugin started ends when the plugin's zygote dies
/// (its runner dies with the zygote, and the host kills what is left of
/// the runner's process group).
#[test]
fn a_python_plugins_own_processes_end_when_its_zygote_dies() {
    let dir = PluginsDir::new();
    dir.python("faulty", "faulty");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let reply = server.run("faulty", "spawn", r#"{"args": {}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sleeper = result_pid(&reply);
    assert!(!ended(sleeper));
    let zygote = zygote_pid(server.pid()).expect("a zygote");
    signal(&zygote.to_string(), "-KILL");
    wait_ended(sleeper, Duration::from_secs(5), || {
        format!(
            "the plugin's process {sleeper} outlived its zygote; log:\n{}",
            server.log()
        )
    });
}

/// With the zygote off, each Python runner is a child of the server, its
/// command line naming the plugin; with it on (the default), a grandchild.
#[test]
fn the_zygote_can_be_turned_off() {
    for (zygote, direct) in [("0", true), ("1", false)] {
        let dir = PluginsDir::new();
        dir.python("echo", "echo");
        let server = Forgesyte::start_with_env(
            &["--plugins", dir.path_str()],
            &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        );
        server.wait_loaded();
        let reply = server.run("echo", "echo", r#"{"args": {"n": 1}}"#);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let runner = runner_pid(server.pid(), "echo").expect("the runner of echo");
        let parent = std::fs::read_to_string(format!("/proc/{runner}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        assert_eq!(
            parent == Some(server.pid()),
            direct,
            "FORGESYTE_PYTHON_ZYGOTE={zygote}: runner {runner}'s parent is {parent:?}, the server {}",
            server.pid()
        );
    }
}

/// A directory holding a `sitecustomize.py` of `code`: on `PYTHONPATH`,
/// what every interpreter of the server runs as it starts.
fn site_customized(code: &str) -> tempfile::TempDir {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("sitecustomize.py"), code).unwrap();
    site
}

/// A loaded server of the Python `echo` fixture, its interpreters started
/// with `site` on `PYTHONPATH`, the zygote on (`"1"`) or off (`"0"`).
fn echo_under(site: &tempfile::TempDir, zygote: &str) -> (PluginsDir, Forgesyte) {
    let dir = PluginsDir::new();
    dir.python("echo", "echo");
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[
            ("FORGESYTE_PYTHON_ZYGOTE", zygote),
            ("PYTHONPATH", site.path().to_str().unwrap()),
        ],
    );
    server.wait_loaded();
    (dir, server)
}

/// A thread started before the runner confines itself (by a
/// `sitecustomize`, or by an at-fork hook it registered in the zygote)
/// would run outside the sandbox: the runner refuses to go on, and the
/// plugin is FAILED saying so, whether the server started the runner or
/// its zygote forked it.
#[test]
fn a_thread_started_before_confinement_fails_the_plugin() {
    let site = site_customized(
        "import os, threading, time\n\
         def _idle():\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n\
         _idle()\n\
         os.register_at_fork(after_in_child=_idle)\n",
    );
    for zygote in ["0", "1"] {
        let (_dir, server) = echo_under(&site, zygote);
        let health = server.get("/v1/plugins/echo/health").json();
        assert_eq!(health["state"], "FAILED", "zygote {zygote}: {health}");
        let log = server.log();
        assert!(
            log.contains("thread(s) run already"),
            "zygote {zygote}: {health}\n{log}"
        );
    }
}

/// What the interpreter's own start prints (a `sitecustomize`, a `.pth`
/// file), before the runner has taken fd 1 over, never reaches the
/// protocol: a runner the server starts itself writes the protocol to a
/// pipe of its own, and the text reaches the log; a zygote's runners start
/// after it.
#[test]
fn what_the_interpreter_prints_as_it_starts_does_not_break_the_handshake() {
    let site = site_customized(
        "import os\nprint('sitecustomize says hello')\n\
         os.write(1, b'\\x00\\x00\\x00\\x10 raw bytes on fd 1\\n')\n",
    );
    for zygote in ["0", "1"] {
        let (_dir, server) = echo_under(&site, zygote);
        let reply = server.run("echo", "echo", r#"{"args": {"n": 1}}"#);
        assert_eq!(
            reply.status,
            200,
            "FORGESYTE_PYTHON_ZYGOTE={zygote}: {}\nlog:\n{}",
            reply.text(),
            server.log()
        );
        if zygote == "0" {
            let log = server.log();
            assert!(
                log.contains("sitecustomize says hello") && log.contains("raw bytes on fd 1"),
                "the runner's start-up output is not in the log:\n{log}"
            );
        }
    }
}

/// The zygote dies (the OOM killer, say): its runners die with it (their
/// parent-death signal), each plugin is a crash the supervisor restarts,
/// through a new zygote, and health answers 200 throughout.
#[test]
fn python_plugins_come_back_when_their_zygote_is_killed() {
    let dir = PluginsDir::new();
    for name in ["py-a", "py-b"] {
        dir.python(name, "echo");
    }
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let zygote = zygote_pid(server.pid()).expect("a zygote");
    let runners: Vec<u32> = ["py-a", "py-b"]
        .iter()
        .map(|name| runner_pid(server.pid(), name).expect("a runner"))
        .collect();
    signal(&zygote.to_string(), "-KILL");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for name in ["py-a", "py-b"] {
            let health = server.get(&format!("/v1/plugins/{name}/health"));
            assert_eq!(health.status, 200, "{}", health.text());
        }
        let plugins = server.get("/v1/plugins").json();
        let back = plugins.as_array().is_some_and(|list| {
            list.iter().all(|p| {
                p["state"] == "INITIALIZED" && p["restart_count"].as_u64().unwrap_or(0) >= 1
            })
        });
        if back {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back: {plugins}\nlog:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(runners.iter().all(|&pid| ended(pid)), "old runners left");
    let again = zygote_pid(server.pid()).expect("a new zygote");
    assert_ne!(again, zygote);
    let reply = server.run("py-a", "echo", r#"{"args": {"n": 2}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let journal = server.get("/v1/plugins/py-a/health").json()["journal"].clone();
    assert!(
        journal
            .to_string()
            .contains("CrashError: lost: its Python zygote (pid"),
        "the crash reason names the zygote: {journal}"
    );
}

/// The zygote dies while the plugins it forked are still constructing (a
/// deploy under memory pressure): no fault of theirs, so they are not left
/// FAILED until someone reloads them. They are loaded again, through a new
/// zygote, on the host's backoff (2 s first), and the server gets ready.
#[test]
fn plugins_constructing_when_their_zygote_dies_are_loaded_again() {
    let dir = PluginsDir::new();
    for name in ["py-a", "py-b"] {
        echo_constructing_after(&dir, name, "time.sleep(2)");
    }
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    let zygote = wait_for(
        "both runners constructing",
        Duration::from_secs(20),
        &server,
        || {
            let constructing = ["py-a", "py-b"]
                .iter()
                .all(|name| runner_pid(server.pid(), name).is_some());
            zygote_pid(server.pid()).filter(|_| constructing)
        },
    );
    signal(&zygote.to_string(), "-KILL");
    // Meanwhile FAILED with the time of the server's next try, which a call
    // is told (it read as failed for good: no time, no Retry-After).
    wait_for(
        "py-a FAILED with a retry time",
        Duration::from_secs(20),
        &server,
        || {
            let health = server.get("/v1/plugins/py-a/health").json();
            (health["state"] == "FAILED" && health["next_retry_at"].is_string()).then_some(())
        },
    );
    wait_for(
        "both loaded again",
        Duration::from_secs(40),
        &server,
        || {
            let plugins = server.get("/v1/plugins").json();
            plugins
                .as_array()
                .is_some_and(|list| {
                    list.len() == 2 && list.iter().all(|p| p["state"] == "INITIALIZED")
                })
                .then_some(())
        },
    );
    assert_eq!(server.get("/readyz").status, 200);
    let reply = server.run("py-a", "echo", r#"{"args": {"n": 2}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(zygote_pid(server.pid()), Some(zygote));
}

/// A plugin whose own constructor ends its zygote (it may signal it with
/// `--confine off`) is loaded again twice, not for ever: each try took
/// every other Python plugin's runner with it. It stays FAILED with the
/// loss as its reason, and the other plugin is back.
#[test]
fn a_plugin_that_ends_its_zygote_is_retried_twice_not_for_ever() {
    let dir = PluginsDir::new();
    dir.python("py-ok", "echo");
    echo_constructing_after(
        &dir,
        "py-kill",
        "import signal; os.kill(os.getppid(), signal.SIGKILL); time.sleep(5)",
    );
    let server = Forgesyte::start(&["--plugins", dir.path_str(), "--confine", "off"]);
    // The first try (which takes the other plugin with it), and the two
    // after 2 s and 4 s, then no more.
    let tries = || {
        server
            .log()
            .matches("INFO forgesyte_server::host_retry: Retried ")
            .count()
            + server
                .log()
                .matches("WARN forgesyte_server::host_retry: Retried ")
                .count()
    };
    wait_for("two retries", Duration::from_secs(40), &server, || {
        (tries() >= 2).then_some(())
    });
    // The next try would come 8 s after the second.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(tries(), 2, "{}", server.log());
    let health = server.get("/v1/plugins/py-kill/health").json();
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|r| r.contains("lost: its Python zygote")),
        "{health}"
    );
    wait_for("py-ok back", Duration::from_secs(20), &server, || {
        (server.get("/v1/plugins/py-ok/health").json()["state"] == "INITIALIZED").then_some(())
    });
}

/// Plugin `name`: the echo fixture whose constructor first runs `code` (one
/// line of Python; the fixture imports `os` and `time`).
fn echo_constructing_after(dir: &PluginsDir, name: &str, code: &str) {
    dir.python(name, "echo");
    let file = dir.path().join(name).join("plugin.py");
    let mut source = std::fs::read_to_string(&file).unwrap();
    source.push_str(&format!(
        "\n\nclass _Constructing(Plugin):\n    def __init__(self):\n        {code}\n        \
         super().__init__()\n\n\nPlugin = _Constructing\n"
    ));
    std::fs::write(&file, source).unwrap();
}

/// A server that stops reaps its Python zygote before it exits: one left
/// to whatever adopts it stays a zombie there until that reaps it (a
/// container's first process may not, and one piled up per restart).
#[test]
fn a_stopping_server_reaps_its_zygote() {
    let dir = PluginsDir::new();
    dir.python("py-a", "echo");
    let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let zygote = zygote_pid(server.pid()).expect("a zygote");
    assert!(server.terminate().success());
    // Reaped by the server: gone. Else a zombie (state Z) of the process
    // that adopted it, until that one reaps it.
    let stat = std::fs::read_to_string(format!("/proc/{zygote}/stat"));
    let zombie = stat.as_deref().is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    });
    assert!(!zombie, "the zygote {zygote} was left a zombie: {stat:?}");
}

/// The runner's bytecode cache removed under a running server (a cache
/// cleaner): the next interpreter start writes it again, so a plugin whose
/// zygote died comes back instead of failing every start until a restart.
#[test]
fn a_removed_runner_cache_is_written_again_at_the_next_start() {
    let dir = PluginsDir::new();
    dir.python("py-a", "echo");
    let cache = tempfile::tempdir().unwrap();
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("XDG_CACHE_HOME", cache.path().to_str().unwrap())],
    );
    server.wait_loaded();
    let written = cache.path().join("forgesyte");
    assert!(written.is_dir(), "the cache was not used");
    std::fs::remove_dir_all(&written).unwrap();
    let zygote = zygote_pid(server.pid()).expect("a zygote");
    signal(&zygote.to_string(), "-KILL");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = server.get("/v1/plugins/py-a/health").json();
        if health["state"] == "INITIALIZED" && health["restart_count"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back: {health}\nlog:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(written.is_dir(), "the cache was not written again");
    let reply = server.run("py-a", "echo", r#"{"args": {"n": 2}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A runner cache that cannot be used (its directory is a file here) is
/// said once in the log, and the plugin runs from the runner's sources (it
/// was said at debug level only: a read-only or full cache went unseen).
#[test]
fn an_unusable_runner_cache_is_said_once_and_the_runner_runs_from_source() {
    let dir = PluginsDir::new();
    dir.python("py-a", "echo").python("py-b", "echo");
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("forgesyte"), "not a directory").unwrap();
    let server = Forgesyte::start_with_env(
        &["--plugins", dir.path_str()],
        &[("XDG_CACHE_HOME", cache.path().to_str().unwrap())],
    );
    server.wait_loaded();
    let reply = server.run("py-a", "echo", r#"{"args": {"n": 2}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let log = server.log();
    let said = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("The Python runner cannot be cached"))
        .count();
    assert_eq!(said, 1, "{log}");
}

/// A zygote that stops (stopped, stuck) is given up, and let go:
/// - a runner of it that ended, unreported, is seen as ended within 2 s,
///   what it started is killed, and the zygote, which has no runner left,
///   is killed although it never runs again (it and the threads that serve
///   it lived on);
/// - a spawn through it costs the fork timeout once (that runner starts on
///   its own), and later runners come from a new zygote.
#[test]
fn a_stopped_zygote_is_given_up_and_let_go() {
    let dir = PluginsDir::new();
    dir.python("py-a", "faulty");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let reply = server.run("py-a", "spawn", r#"{"args": {}}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sleeper = result_pid(&reply);
    let parent = |pid: u32| -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let restarted = |plugin: &str, old: u32, restarts: u64| -> u32 {
        crate::rescan::wait_for(
            "the runner's restart",
            Duration::from_secs(30),
            &server,
            || {
                let health = server.get(&format!("/v1/plugins/{plugin}/health")).json();
                (health["state"] == "INITIALIZED" && health["restart_count"] == restarts)
                    .then(|| runner_pid(server.pid(), plugin).filter(|&pid| pid != old))
                    .flatten()
            },
        )
    };

    // A runner's end its stopped zygote does not report.
    let first = zygote_pid(server.pid()).expect("a zygote");
    signal(&first.to_string(), "-STOP");
    let runner = runner_pid(server.pid(), "py-a").expect("a runner");
    signal(&runner.to_string(), "-KILL");
    let again = restarted("py-a", runner, 1);
    assert_ne!(parent(again), first, "asked the stopped zygote again");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ended(first) || !ended(sleeper) {
        assert!(
            Instant::now() < deadline,
            "the stopped zygote {first} (ended: {}), with no runner left, or the process {sleeper} \
             its runner started (ended: {}) lives on\nlog:\n{}",
            ended(first),
            ended(sleeper),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.log().contains("did not report the end of runner"),
        "{}",
        server.log()
    );

    // A spawn through a stopped zygote that has forked before: a new
    // plugin's runner waits out the fork timeout, then starts on its own.
    let second = zygote_pid(server.pid()).expect("a new zygote");
    assert_eq!(parent(again), second);
    signal(&second.to_string(), "-STOP");
    dir.python("py-b", "echo");
    signal(&server.pid().to_string(), "-HUP");
    let b = crate::rescan::wait_for("py-b", Duration::from_secs(30), &server, || {
        let health = server.get("/v1/plugins/py-b/health").json();
        (health["state"] == "INITIALIZED")
            .then(|| runner_pid(server.pid(), "py-b"))
            .flatten()
    });
    signal(&second.to_string(), "-CONT");
    assert_eq!(parent(b), server.pid(), "not started on its own");
    assert!(
        server.log().contains("did not fork within"),
        "{}",
        server.log()
    );
}

/// The server's Python zygote: its child whose command line says
/// `--zygote`.
fn zygote_pid(server: u32) -> Option<u32> {
    children_of(server).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"--zygote"))
    })
}

/// Runners (native, and Python ones forked by a zygote) run with
/// `no_new_privs`: nothing they execute gains privileges.
#[test]
fn runners_run_with_no_new_privs() {
    let dir = PluginsDir::new();
    dir.good("iso", json!({"isolation": "process"}));
    dir.python("py", "echo");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    for name in ["iso", "py"] {
        let pid = runner_pid(server.pid(), name).unwrap_or_else(|| panic!("no runner of {name}"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let flag = status
            .lines()
            .find_map(|l| l.strip_prefix("NoNewPrivs:"))
            .map(str::trim);
        assert_eq!(flag, Some("1"), "{name} (pid {pid}):\n{status}");
    }
}

/// A runner that dies while a process its plugin forked without exec (as
/// a `multiprocessing` worker is) lives on is seen dead at once, whoever
/// forked the runner (Python runners, and the native runner) and even when
/// that process left the runner's process group: the forked process no longer holds the runner's stdout, whose
/// end is how the host sees the death (it waited for the call's time
/// limit before), and one that keeps a copy of it (under another number)
/// does not hold the death up past a short grace either.
#[test]
fn a_runner_whose_forked_process_outlives_it_is_seen_dead_at_once() {
    for zygote in ["1", "0", "native"] {
        let dir = PluginsDir::new();
        if zygote == "native" {
            // The native runner: a library that forks without exec.
            dir.library(
                "faulty",
                forgesyte_tests::zoo::FAULTY_LIBRARY,
                serde_json::json!({"isolation": "process"}),
            );
        } else {
            dir.python("faulty", "faulty");
        }
        let env: &[(&str, &str)] = match zygote {
            "native" => &[],
            _ => &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        };
        // Unconfined: a confined runner's processes cannot leave its group
        // (`setsid` is refused), which the cases below need.
        let server = Forgesyte::start_with_env(
            &[
                "--plugins",
                dir.path_str(),
                "--call-timeout",
                "30",
                "--confine",
                "off",
            ],
            env,
        );
        server.wait_loaded();
        let bodies: &[&str] = if zygote == "native" {
            &[r#"{"args": {"s": 10}}"#]
        } else {
            &[
                r#"{"args": {"s": 10}}"#,
                r#"{"args": {"s": 10, "setsid": true}}"#,
                // It keeps the runner's protocol pipe open, out of reach
                // of the fork hook and the group kill: the runner's end
                // (its pidfd) is seen, not the pipe's.
                r#"{"args": {"s": 10, "setsid": true, "dup": true}}"#,
            ]
        };
        for body in bodies {
            let started = Instant::now();
            let crash = server.run("faulty", "forkexit", body);
            let took = started.elapsed();
            assert_eq!(crash.status, 502, "{}", crash.text());
            assert!(
                crash.json()["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("exited with code 3"),
                "{}",
                crash.text()
            );
            assert!(
                took < Duration::from_secs(5),
                "FORGESYTE_PYTHON_ZYGOTE={zygote}, {body}: the death took {took:?} to be seen"
            );
            crate::rescan::wait_for(
                "the runner's restart",
                Duration::from_secs(20),
                &server,
                || {
                    let health = server.get("/v1/plugins/faulty/health").json();
                    (health["state"] == "INITIALIZED").then_some(())
                },
            );
        }
    }
}

/// A process a confined plugin starts cannot leave its runner's process
/// group (`setsid` is refused), so it ends with the runner even when it is
/// nobody's child (forked twice) and the runner dies of its own accord:
/// forked by a zygote or started by the server alike, and with the
/// server's stop. Another plugin's end leaves it alone.
#[test]
fn a_process_a_confined_plugin_detaches_ends_with_its_runner() {
    for zygote in ["1", "0"] {
        let dir = PluginsDir::new();
        dir.python("faulty", "faulty");
        dir.python("other", "faulty");
        let mut server = Forgesyte::start_with_env(
            &["--plugins", dir.path_str()],
            &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        );
        server.wait_loaded();
        let detach = |plugin: &str| {
            let answer = server.run(plugin, "detach", r#"{"args": {"s": 120}}"#);
            assert_eq!(answer.status, 200, "{}", answer.text());
            let said = answer.json()["result"].clone();
            assert!(
                said["setsid"].as_str().unwrap_or("").starts_with("refused"),
                "FORGESYTE_PYTHON_ZYGOTE={zygote}: {said}"
            );
            let pid = u32::try_from(said["pid"].as_u64().unwrap()).unwrap();
            assert!(!ended(pid), "the detached process {pid} is not running");
            pid
        };
        // No child for the runner's parent either (which would never
        // reap it): EACCES.
        let clone = server.run("faulty", "clone_parent", "{}");
        assert_eq!(clone.status, 200, "{}", clone.text());
        assert_eq!(
            clone.json()["result"]["errno"],
            13,
            "FORGESYTE_PYTHON_ZYGOTE={zygote}"
        );
        let mine = detach("faulty");
        let theirs = detach("other");
        let crash = server.run("other", "exit", "{}");
        assert_eq!(crash.status, 502, "{}", crash.text());
        wait_ended(theirs, Duration::from_secs(10), || {
            format!(
                "FORGESYTE_PYTHON_ZYGOTE={zygote}: the process {theirs} its crashed runner \
                detached still runs"
            )
        });
        assert!(
            !ended(mine),
            "FORGESYTE_PYTHON_ZYGOTE={zygote}: another plugin's crash ended {mine}"
        );
        // A server that stops (SIGTERM) stops its runners, and so the
        // processes they started.
        assert!(server.terminate().success());
        wait_ended(mine, Duration::from_secs(10), || {
            format!("FORGESYTE_PYTHON_ZYGOTE={zygote}: {mine} outlived the server's stop")
        });
    }
}

/// A program a plugin starts may signal its whole process group (coreutils'
/// `timeout` sends SIGTERM to its own, which in a confined runner is the
/// runner's, since no process there may start one of its own): SIGTERM,
/// SIGHUP and SIGINT leave the runner serving, native and Python alike;
/// a process it forks without exec still ends on SIGTERM.
#[test]
fn a_runner_shrugs_off_signals_sent_to_its_process_group() {
    let dir = PluginsDir::new();
    dir.library(
        "native",
        forgesyte_tests::zoo::FAULTY_LIBRARY,
        json!({"isolation": "process"}),
    );
    dir.python("py", "faulty");
    let server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    for plugin in ["native", "py"] {
        let before = runner_pid(server.pid(), plugin).expect("a runner");
        let answer = server.run(plugin, "signal_group", "{}");
        assert_eq!(answer.status, 200, "{plugin}: {}", answer.text());
        assert_eq!(answer.json()["result"]["survived"], true, "{plugin}");
        // What it forks without exec gets the default actions back: a
        // worker pool stops its workers with SIGTERM.
        let answer = server.run(plugin, "fork_terminate", "{}");
        assert_eq!(answer.status, 200, "{plugin}: {}", answer.text());
        assert_eq!(answer.json()["result"]["terminated_by"], 15, "{plugin}");
        assert_eq!(server.run(plugin, "ok", "{}").status, 200, "{plugin}");
        let health = server.get(&format!("/v1/plugins/{plugin}/health")).json();
        assert_eq!(health["state"], "INITIALIZED", "{plugin}: {health}");
        assert_eq!(health["restart_count"], 0, "{plugin}: {health}");
        assert_eq!(runner_pid(server.pid(), plugin), Some(before), "{plugin}");
    }
}

/// A server stopping right after a rescan let a plugin go, while that
/// plugin's runner is still stopping (its `on_unload` takes 1.5 s), waits
/// for that runner too: what the plugin started ends with it.
#[test]
fn a_server_stopping_after_a_rescan_waits_for_the_runners_it_let_go() {
    let dir = PluginsDir::new();
    dir.python("slow-unload", "faulty");
    let mut server = Forgesyte::start(&["--plugins", dir.path_str()]);
    server.wait_loaded();
    let answer = server.run("slow-unload", "detach", r#"{"args": {"s": 120}}"#);
    assert_eq!(answer.status, 200, "{}", answer.text());
    let pid = result_pid(&answer);
    assert!(!ended(pid));
    std::fs::remove_dir_all(dir.path().join("slow-unload")).unwrap();
    crate::rescan::hangup(&server);
    crate::rescan::wait_for(
        "the plugin let go",
        Duration::from_secs(10),
        &server,
        || (server.get("/v1/plugins/slow-unload/health").status == 404).then_some(()),
    );
    assert!(server.terminate().success());
    wait_ended(pid, Duration::from_secs(10), || {
        format!("{pid}, started by a plugin a rescan let go, outlived the server's stop")
    });
}

/// The processes whose command line is `args` (joined by NULs, as
/// `/proc/PID/cmdline` holds them).
fn processes_running(args: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .filter(|pid| !ended(*pid))
        .collect()
}

/// A server stopped (SIGTERM) while a Python plugin is still being
/// constructed (its `__init__` started a process, then waits) ends that
/// runner and what it started: a runner counts from its start, not from
/// its plugin's registration, and none starts once the server stops.
#[test]
fn a_server_stopped_while_a_plugin_is_constructed_ends_what_it_started() {
    for zygote in ["1", "0"] {
        let dir = PluginsDir::new();
        let marker = format!("{}.{zygote}7", std::process::id());
        let plugin = dir.path().join("slow-init");
        std::fs::create_dir_all(&plugin).unwrap();
        std::fs::write(
            plugin.join("manifest.json"),
            json!({"name": "slow-init", "version": "1.0.0", "runtime": "python",
                   "limits": {"init_timeout_s": 60}})
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            plugin.join("plugin.py"),
            format!(
                "import subprocess, time\n\
                 class Plugin:\n\
                 \x20   def __init__(self):\n\
                 \x20       subprocess.Popen([\"sleep\", \"{marker}\"])\n\
                 \x20       time.sleep(60)\n"
            ),
        )
        .unwrap();
        let mut server = Forgesyte::start_with_env(
            &["--plugins", dir.path_str()],
            &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = loop {
            let found = processes_running(&["sleep", &marker]);
            if let [pid] = found[..] {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "FORGESYTE_PYTHON_ZYGOTE={zygote}: the plugin started no process ({found:?}); \
                 log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(server.terminate().success());
        wait_ended(started, Duration::from_secs(10), || {
            format!(
                "FORGESYTE_PYTHON_ZYGOTE={zygote}: {started}, started by a plugin being \
                 constructed, outlived the server's stop"
            )
        });
    }
}

/// A server whose stderr pipe is closed (its log shipper gone) keeps
/// serving and stops cleanly: a log line it cannot write is lost. It used
/// to panic on its first log line (exit code 101).
#[test]
fn a_closed_stderr_pipe_loses_log_lines_not_the_server() {
    use std::process::Stdio;
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    let mut child = crate::support::forgesyte_command()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--plugins",
            plugins.path_str(),
        ])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    let addr =
        crate::support::listening_addr(child.stdout.take().unwrap()).unwrap_or_else(|line| {
            let _ = child.kill();
            panic!("no listening line: {line:?} ({:?})", child.wait())
        });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = crate::support::http(addr, "GET", "/v1/health", b"");
        assert_eq!(health.status, 200, "{}", health.text());
        if health.json()["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", health.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Calls and a failing one, which log.
    let run = crate::support::http(
        addr,
        "POST",
        "/v1/plugins/alpha/tools/echo/run",
        br#"{"args": {"x": 1}}"#,
    );
    assert_eq!(run.status, 200, "{}", run.text());
    let missing = crate::support::http(addr, "POST", "/v1/plugins/ghost/tools/x/run", b"{}");
    assert_eq!(missing.status, 404, "{}", missing.text());
    signal(&child.id().to_string(), "-TERM");
    let status = exit_within(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// The soft limit of open files in `/proc/PID/limits`.
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// `serve` raises its soft open-file limit to the hard limit (a
/// container's soft 1,024 capped its connections at 512), and a plugin
/// runner gets the limit the server started with back, as does every run
/// of the plugin's interpreter (the dependency check's too).
#[test]
fn serve_raises_its_open_file_limit_and_runners_get_the_old_one() {
    use std::process::Stdio;
    let hard: u64 = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).and_then(|h| h.parse().ok()))
        .expect("a finite hard limit of open files");
    let soft = (hard / 2).min(1024);
    assert!(soft < hard, "hard limit {hard}");
    let dir = PluginsDir::new();
    dir.python("echo", "echo")
        .manifest_fields("echo", json!({"dependencies": ["json"]}));
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("stderr.log");
    // The interpreter, through a wrapper that writes down its limit.
    let limits = logdir.path().join("limits.txt");
    let python = logdir.path().join("python");
    forgesyte_tests::write_script(
        &python,
        &format!(
            "echo \"$(ulimit -Sn) $1\" >> {}\nexec python3 \"$@\"",
            limits.display()
        ),
    )
    .unwrap();
    let mut child = crate::support::Reaped(
        std::process::Command::new("prlimit")
            .arg(format!("--nofile={soft}:"))
            .arg(env!("CARGO_BIN_EXE_forgesyte"))
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--plugins",
                dir.path_str(),
            ])
            .arg("--python")
            .arg(&python)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prlimit (util-linux) runs"),
    );
    let addr = crate::support::listening_addr(child.stdout.take().unwrap())
        .unwrap_or_else(|line| panic!("{line:?}: {}", std::fs::read_to_string(&log).unwrap()));
    let server = child.id();
    assert_eq!(soft_open_files(server), hard);
    let deadline = Instant::now() + Duration::from_secs(30);
    let runner = loop {
        let ready = crate::support::http(addr, "GET", "/readyz", b"").status == 200;
        if let (true, Some(pid)) = (ready, runner_pid(server, "echo")) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(soft_open_files(runner), soft);
    // The dependency check (`-sB`) and the runner's zygote (`-su`) ran it.
    let runs = std::fs::read_to_string(&limits).unwrap();
    assert!(
        runs.lines().any(|l| l.ends_with(" -sB")) && runs.lines().any(|l| l.ends_with(" -su")),
        "{runs}"
    );
    for run in runs.lines() {
        assert!(run.starts_with(&format!("{soft} ")), "{runs}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!("Open-file limit raised from {soft} to {hard}")),
        "{logged}"
    );
    signal(&server.to_string(), "-TERM");
    exit_within(&mut child, Duration::from_secs(20));
}

/// A `serve` that refuses its configuration with its stderr pipe closed
/// still exits with the refusal's code (2), not a panic's (101).
#[test]
fn a_refused_start_with_a_closed_stderr_keeps_its_exit_code() {
    use std::process::Stdio;
    let plugins = PluginsDir::new();
    let mut child = crate::support::forgesyte_command()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--plugins",
            plugins.path_str(),
        ])
        .env("FORGESYTE_BLOCKING_THREADS", "0")
        .stdout(Stdio::null())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{status:?}");
    // `sign` refusing a key that is not there, too.
    let mut child = crate::support::forgesyte_command()
        .args(["sign", "/nonexistent/plugin", "--key", "/nonexistent/key"])
        .stdout(Stdio::null())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{status:?}");
}

/// `keygen` and `sign` with their stdout pipe closed do their work and
/// exit 0: what they report as done is lost, not the work (a `println!`
/// panicked after the keys were written: exit code 101).
#[test]
fn keygen_and_sign_with_a_closed_stdout_exit_0() {
    use std::process::Stdio;
    let plugins = PluginsDir::new();
    plugins.good("signed_quietly", json!({}));
    let plugin = plugins.path().join("signed_quietly");
    let keys = plugins.path().join("keys");
    let run = |args: &[&str]| {
        let mut child = crate::support::forgesyte_command()
            .args(args)
            .stdout(closed_pipe())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        exit_within(&mut child, Duration::from_secs(20))
    };
    let status = run(&[
        "keygen",
        "--out",
        keys.to_str().unwrap(),
        "--name",
        "quiet",
        "--unencrypted",
    ]);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let key = keys.join("quiet.key");
    assert!(key.is_file() && keys.join("quiet.pub").is_file());
    let status = run(&[
        "sign",
        plugin.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(plugin.join("forgesyte.sig.list.minisig").is_file());
}

/// Plugins under a directory whose path is not UTF-8 are FAILED with a
/// reason of the host's, naming the directory: they are given their
/// directory as JSON text. (The host panicked building that text, and the
/// reason blamed the plugin: "plugin panicked during construction".)
#[test]
fn plugins_under_a_path_that_is_not_utf8_fail_with_the_hosts_reason() {
    use std::os::unix::ffi::OsStrExt as _;
    let plugins = PluginsDir::new();
    plugins.good("native", json!({})).python("py", "echo");
    let odd = plugins.path().join(std::ffi::OsStr::from_bytes(b"nu\xff"));
    std::fs::create_dir(&odd).unwrap();
    for name in ["native", "py"] {
        std::fs::rename(plugins.path().join(name), odd.join(name)).unwrap();
    }
    let out = crate::support::forgesyte_command()
        .arg("check")
        .arg(&odd)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in ["native", "py"] {
        let plugin = report
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"));
        assert_eq!(plugin["state"], "FAILED", "{plugin}");
        let reason = plugin["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("ImportError: the plugin's directory")
                && reason.contains("is not valid UTF-8"),
            "{reason}"
        );
    }
}

/// An interpreter that never answers (a wrapper script whose program
/// hangs) is let go with everything it started: the zygote's own process
/// group is killed, not only its pid (a child of the script was left
/// behind, orphaned, for as long as it ran).
#[test]
fn a_hung_interpreter_is_let_go_with_what_it_started() {
    let plugins = PluginsDir::new();
    plugins.python("py", "echo");
    let scratch = tempfile::tempdir().unwrap();
    let (python, pids) = wrapper_interpreter(scratch.path(), "wait");
    let (code, out, err) = crate::support::run_forgesyte(
        &[
            "check",
            plugins.path_str(),
            "--python",
            python.to_str().unwrap(),
            "--init-timeout",
            "1",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert_all_ended(&pids);
}

/// An interpreter in `dir` that is a shell script: it starts a `sleep`,
/// writes its pid to the file it returns beside the script, then runs
/// `then` (`wait`: it hangs; `python3 "$@"`: a wrapper without `exec`).
fn wrapper_interpreter(
    dir: &std::path::Path,
    then: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let pids = dir.join("pids");
    let python = dir.join("python");
    forgesyte_tests::write_script(
        &python,
        &format!("sleep 300 &\necho $! >> '{}'\n{then}", pids.display()),
    )
    .unwrap();
    (python, pids)
}

/// Every process whose pid the file `pids` lists has ended within 5 s
/// (a zombie until someone reaps it counts as ended); those left are
/// killed, and the test fails naming them.
fn assert_all_ended(pids: &std::path::Path) {
    let started = std::fs::read_to_string(pids).unwrap();
    let started: Vec<&str> = started.split_whitespace().collect();
    assert!(!started.is_empty(), "the script never ran");
    let alive = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while started.iter().any(|pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<&&str> = started.iter().filter(|pid| alive(pid)).collect();
    for pid in &left {
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    assert!(left.is_empty(), "left running: {left:?} of {started:?}");
}

/// An interpreter that is a wrapper script (`python3 "$@"`, no `exec`)
/// leaves nothing it started running when `check` ends or `serve` stops:
/// the zygote ended with the host, the script's own child (here a `sleep`)
/// stayed, orphaned.
#[test]
fn a_wrapper_interpreters_children_end_with_the_host() {
    let plugins = PluginsDir::new();
    plugins.python("py", "echo");
    let scratch = tempfile::tempdir().unwrap();
    let (python, pids) = wrapper_interpreter(scratch.path(), "python3 \"$@\"");
    let args = ["--python", python.to_str().unwrap()];
    let (code, out, err) =
        crate::support::run_forgesyte(&[&["check", plugins.path_str()][..], &args].concat(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_all_ended(&pids);
    std::fs::remove_file(&pids).unwrap();
    let mut server = Forgesyte::start(&[&["--plugins", plugins.path_str()][..], &args].concat());
    server.wait_loaded();
    assert_eq!(server.run("py", "echo", "{}").status, 200);
    assert!(server.terminate().success());
    assert_all_ended(&pids);
}

/// The write end of a pipe whose read end is closed already: every write
/// to it fails (EPIPE) from the child's first line on.
fn closed_pipe() -> std::process::Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer.into()
}

/// `child`'s exit status, waited for at most `limit` (then it is killed,
/// not left running, and the test fails).
fn exit_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A stop during the load pass: a runner the stop kills while its plugin
/// constructs, or refuses to start (a plugin of a later wave), is logged
/// at INFO (no fault of the plugin's), while a plugin of the same pass
/// that failed for its own reason is still an ERROR.
#[test]
fn a_stop_during_the_load_pass_blames_only_what_it_cut_off() {
    let plugins = PluginsDir::new();
    plugins
        .zoo(forgesyte_tests::zoo::ERR_INIT)
        .library(
            "init-hang",
            forgesyte_tests::zoo::FAULTY_LIBRARY,
            json!({"isolation": "process", "config": {"fault_at_init": "hang"},
                   "limits": {"init_timeout_s": 20.0}}),
        )
        .good("base", json!({}))
        .good(
            "later",
            json!({"isolation": "process", "dependencies": ["plugin:base"]}),
        );
    let mut server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while runner_pid(server.pid(), "init-hang").is_none() {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The in-process err-init has failed by now (its constructor returns
    // an error at once; 2 s leave a loaded machine time for it); its
    // state waits for the pass's wave to end.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(server.terminate().code(), Some(0));
    let log = server.log();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
            .to_owned()
    };
    assert!(line("Plugin FAILED: err-init").contains("ERROR"), "{log}");
    let stopped = line("Plugin init-hang not loaded: the host is stopping");
    assert!(stopped.contains("INFO"), "{stopped}");
    assert!(!log.contains("Plugin FAILED: init-hang"), "{log}");
    // The later wave's runner is refused, not failed.
    assert!(!log.contains("Plugin FAILED: later"), "{log}");
    // The pass's summaries (when the process lives long enough to write
    // them) say it was cut short; none counts the plugins cut off as
    // failed, nor says plugins are ready.
    assert!(!log.contains("Plugins ready"), "{log}");
    assert!(!log.contains(" failed, "), "{log}");
}

/// The log tells each failure once, at the level it deserves: a Python
/// constructor's ERROR carries its traceback; a rescan that finds a plugin
/// failing as before says so at INFO, not at ERROR again; a runner that
/// ended after reporting its import failed is no crash; a crash is one
/// ERROR saying when the restart comes, the restart is INFO, and the
/// request the crash cut off is one WARN naming it and its tool.
#[test]
fn each_failure_is_logged_once_at_its_level() {
    let token = "a-token-of-well-over-thirty-two-characters";
    let plugins = PluginsDir::new();
    plugins
        .python("bad-init", "bad_init")
        .python("broken", "broken_plugin")
        .python("faulty", "faulty");
    let server = Forgesyte::start_with_env(
        &["--plugins", plugins.path_str()],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    for _ in 0..2 {
        let report = crate::support::admin_post(server.addr, "/v1/plugins/reload", token);
        assert_eq!(report.status, 200, "{}", report.text());
    }
    let crash = crate::support::http(
        server.addr,
        "POST",
        "/v1/plugins/faulty/tools/segfault/run",
        br#"{"args": {}}"#,
    );
    assert_eq!(crash.status, 502, "{}", crash.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("✓ Restarted plugin: faulty") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log();
    let lines =
        |needle: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(needle)).collect() };
    for name in ["bad-init", "broken"] {
        let failed = lines(&format!("✗ Plugin FAILED: {name}"));
        assert_eq!(failed.len(), 1, "{name}:\n{log}");
        assert!(failed[0].contains("ERROR"), "{}", failed[0]);
        let again = lines(&format!("Plugin {name} still FAILED, for the same reason"));
        assert_eq!(again.len(), 2, "{name}:\n{log}");
        assert!(again.iter().all(|l| l.contains("INFO")), "{again:?}");
    }
    let failed = lines("✗ Plugin FAILED: bad-init")[0];
    assert!(
        failed.contains("traceback=")
            && failed.contains("plugin.py")
            && failed.contains("no weights"),
        "{failed}"
    );
    // The runner of `broken` exits 0 once it has said its import failed.
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains("ended: exited with code 0")),
        "{log}"
    );
    let crashed = lines("✗ Plugin FAILED: faulty");
    assert_eq!(crashed.len(), 1, "{log}");
    assert!(
        crashed[0].contains("ERROR") && crashed[0].contains("restarting it in 1 s"),
        "{}",
        crashed[0]
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains("plugin process")),
        "{log}"
    );
    let restart = lines("Restarting plugin faulty (restart 1)");
    assert!(restart.len() == 1 && restart[0].contains("INFO"), "{log}");
    // The request the crash cut off is named, with its tool.
    let call = lines("The call of tool segfault failed its plugin faulty");
    assert_eq!(call.len(), 1, "{log}");
    assert!(
        call[0].contains("WARN") && call[0].contains("request_id"),
        "{}",
        call[0]
    );
}
