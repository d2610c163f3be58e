//! What no runner holds of the server or of another plugin: the server's
//! environment (in the block a runner, or its zygote, was started with), a
//! plugin's granted variables (on any command line, in the zygote every
//! later runner is forked from), and descriptors the server inherited.

use std::os::fd::AsFd;

use serde_json::json;

use super::sandbox::{call, declares, native_snoop, python_snoop};
use super::support::{Forgesyte, PluginsDir, children_of, runner_pid};

/// A variable of the server no plugin declares, and the value of the one
/// `snoop-open` declares (and is granted).
const SERVER_SECRET: &str = "the-server-secret-no-runner-may-hold";
const GRANTED: &str = "the-value-granted-to-snoop-open-only";

fn holds(bytes: &[u8], text: &str) -> bool {
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

/// Runners forked by the zygote and runners started on their own, Python
/// and native: each has exactly its granted variables (`snoop-open` gets
/// its value), no process holds the server's secret in the block it was
/// started with (`/proc/PID/environ`), no command line holds a granted
/// value, and the zygote of confined runners is not dumpable.
#[test]
fn no_runner_holds_the_servers_environment_nor_another_plugins_values() {
    let root = rustix::process::geteuid().is_root();
    for zygote in ["1", "0"] {
        let plugins = PluginsDir::new();
        python_snoop(&plugins, "snoop", json!({}));
        python_snoop(&plugins, "snoop-open", declares(&plugins));
        native_snoop(&plugins, "native-open", declares(&plugins));
        let server = Forgesyte::start_with_env(
            &["--plugins", plugins.path_str()],
            &[
                ("SNOOP_SECRET", SERVER_SECRET),
                ("SNOOP_DECLARED", GRANTED),
                ("FORGESYTE_SANDBOX_WIDENING", "allow"),
                ("FORGESYTE_PYTHON_ZYGOTE", zygote),
            ],
        );
        server.wait_loaded();
        let got = call(
            &server,
            "snoop-open",
            "env",
            json!({"name": "SNOOP_DECLARED"}),
        );
        assert_eq!(got.unwrap()["value"], GRANTED, "zygote {zygote}");
        let (kind, _) =
            call(&server, "snoop", "env", json!({"name": "SNOOP_DECLARED"})).unwrap_err();
        assert_eq!(kind, "KeyError", "zygote {zygote}");

        let mut pids = Vec::new();
        for plugin in ["snoop", "snoop-open", "native-open"] {
            let pid = runner_pid(server.pid(), plugin)
                .unwrap_or_else(|| panic!("zygote {zygote}: no runner of {plugin}"));
            pids.push((plugin.to_owned(), pid));
        }
        let zygotes: Vec<u32> = children_of(server.pid())
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline.split(|&b| b == 0).any(|arg| arg == b"--zygote")
            })
            .collect();
        assert_eq!(zygotes.len(), usize::from(zygote == "1"), "{zygotes:?}");
        pids.extend(zygotes.iter().map(|&pid| ("the zygote".to_owned(), pid)));
        for (who, pid) in &pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            assert!(
                !holds(&cmdline, GRANTED),
                "zygote {zygote}: {who}'s command line"
            );
            assert!(
                !holds(&cmdline, SERVER_SECRET),
                "zygote {zygote}: {who}'s command line"
            );
            // Their starting blocks: readable to root only (every one of
            // them is not dumpable).
            match std::fs::read(format!("/proc/{pid}/environ")) {
                Ok(block) => {
                    assert!(root, "zygote {zygote}: {who} is dumpable");
                    assert!(
                        !holds(&block, SERVER_SECRET),
                        "zygote {zygote}: {who}'s environ"
                    );
                    let granted = who == "snoop-open" || who == "native-open";
                    // A forked runner's block is its zygote's: the value
                    // came in its spawn, not its environ.
                    let forked = zygote == "1" && who != "native-open";
                    assert_eq!(
                        holds(&block, GRANTED),
                        granted && !forked,
                        "zygote {zygote}: {who}'s environ"
                    );
                }
                Err(e) => assert!(!root, "zygote {zygote}: {who}: {e}"),
            }
        }
        if !root {
            crate::support::say_skipped(
                "not root: the runners' and the zygote's /proc/PID/environ are closed to this \
                 test (not dumpable), which is what it checked of them",
            );
        }
    }
}

/// The signing key's password is `keygen`'s and `sign`'s: a serving
/// process drops it from its environment (its starting block too), so no
/// runner inherits it, confined or not.
#[test]
fn no_runner_gets_the_signing_key_s_password() {
    const PASSWORD: &str = "the-key-password-no-runner-may-hold";
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "snoop", json!({}));
    let server = Forgesyte::start_with_env(
        &["--plugins", plugins.path_str(), "--confine", "off"],
        &[
            ("FORGESYTE_KEY_PASSWORD", PASSWORD),
            ("FORGESYTE_PYTHON_ZYGOTE", "0"),
        ],
    );
    server.wait_loaded();
    let (kind, _) = call(
        &server,
        "snoop",
        "env",
        json!({"name": "FORGESYTE_KEY_PASSWORD"}),
    )
    .unwrap_err();
    assert_eq!(kind, "KeyError");
    let block = std::fs::read(format!("/proc/{}/environ", server.pid())).unwrap();
    assert!(!holds(&block, PASSWORD), "the server's starting block");
    // Nor its memory: a runner under `--confine off` may read the server's
    // writable pages where the kernel lets it (the copy made to find the
    // variable stayed in freed heap).
    let read = |text| {
        writable_memory_holds(server.pid(), text)
            .unwrap_or_else(|e| panic!("cannot read the server's memory: {e}"))
    };
    // What the search finds: the plugins directory it was given.
    assert!(
        read(plugins.path_str()).is_some(),
        "the search reads nothing"
    );
    assert_eq!(read(PASSWORD), None, "the password in the server's memory");
}

/// The first writable mapping of `pid` whose bytes hold `text`, read
/// through `/proc/PID/mem` (this test started the process: a parent may
/// read its child's memory under the kernel's default ptrace scope).
fn writable_memory_holds(pid: u32, text: &str) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        if !perms.starts_with("rw") || line.ends_with("[vvar]") {
            continue;
        }
        let mut bytes = vec![0; (end - start) as usize];
        // A mapping may go between `maps` and this read: skip it.
        if mem.read_exact_at(&mut bytes, start).is_ok() && holds(&bytes, text) {
            return Ok(Some(line.to_owned()));
        }
    }
    Ok(None)
}

/// A descriptor the server inherited open (here a pipe end this test
/// leaves inheritable) reaches no runner, forked by the zygote or not;
/// the server itself keeps it (the control: the test's pipe did reach the
/// server).
#[test]
fn no_runner_inherits_a_descriptor_the_server_inherited() {
    use rustix::io::{FdFlags, fcntl_setfd};
    let (read, _write) = std::io::pipe().unwrap();
    // Inheritable: every process this test binary starts (its servers)
    // gets it, as a supervisor's or a shell's descriptor would reach one.
    fcntl_setfd(read.as_fd(), FdFlags::empty()).unwrap();
    let inode = rustix::fs::fstat(read.as_fd()).unwrap().st_ino;
    let link = format!("pipe:[{inode}]");
    for zygote in ["1", "0"] {
        let plugins = PluginsDir::new();
        python_snoop(&plugins, "snoop", json!({}));
        let server = Forgesyte::start_with_env(
            &["--plugins", plugins.path_str()],
            &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        );
        server.wait_loaded();
        let server_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        assert!(
            server_fds.contains(&link),
            "the control: the server inherited {link}: {server_fds:?}"
        );
        let fds = call(&server, "snoop", "fds", json!({})).unwrap();
        let held: Vec<&str> = fds["fds"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(!held.contains(&link.as_str()), "zygote {zygote}: {held:?}");
    }
}
