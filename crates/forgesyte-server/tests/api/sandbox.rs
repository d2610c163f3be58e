//! Runner confinement (`forgesyte_loader::sandbox`), attacked through the
//! binary: a Python plugin (through the zygote and without it) and an
//! isolated native plugin each try to read `/etc/shadow`, another plugin's
//! files and an undeclared file, to write outside their scratch directory,
//! to open a TCP connection and to read a variable they did not declare.
//! Each is denied, and the tool's answer names what; the same plugin under a
//! manifest that declares what it needs gets it. `--confine off` turns it
//! all off.
//!
//! Landlock and network namespaces are Linux features this kernel has (CI's
//! too): where the kernel lacks them the status says `unconfined`, which
//! these tests would report as a failure rather than skip.

use std::net::TcpListener;
use std::path::Path;

use forgesyte_loader::sandbox::{CAPABILITIES_DROPPED, CAPABILITIES_NONE, MEMORY_PRIVATE};
use serde_json::{Value, json};

use super::support::{Forgesyte, PluginsDir};

/// A plugin directory `name` holding the Python fixture `snoop`, with
/// `extra` manifest fields, and a `secret.txt` of its own.
pub(super) fn python_snoop(plugins: &PluginsDir, name: &str, extra: Value) {
    plugins.python(name, "snoop");
    add_manifest_fields(&plugins.path().join(name), extra);
}

/// A plugin directory `name` holding the `faulty` native fixture (its sandbox
/// probes), isolated, with `extra` manifest fields, and a `secret.txt` of
/// its own.
pub(super) fn native_snoop(plugins: &PluginsDir, name: &str, extra: Value) {
    plugins.library(
        name,
        forgesyte_tests::zoo::FAULTY_LIBRARY,
        json!({"isolation": "process"}),
    );
    add_manifest_fields(&plugins.path().join(name), extra);
}

fn add_manifest_fields(dir: &Path, extra: Value) {
    super::support::merge_manifest(dir, &extra);
    std::fs::write(
        dir.join("secret.txt"),
        format!("secret of {}\n", dir.display()),
    )
    .unwrap();
}

/// Calls `tool` of `plugin` with `args`: `Ok(result)` or `Err((error_type,
/// error))`.
pub(super) fn call(
    server: &Forgesyte,
    plugin: &str,
    tool: &str,
    args: Value,
) -> Result<Value, (String, String)> {
    let reply = server.run(plugin, tool, &json!({ "args": args }).to_string());
    let body = reply.json();
    if body["ok"] == true {
        return Ok(body["result"].clone());
    }
    assert_eq!(reply.status, 422, "{plugin}.{tool}: {body}");
    Err((
        body["error_type"].as_str().unwrap_or_default().to_owned(),
        body["error"].as_str().unwrap_or_default().to_owned(),
    ))
}

fn status(server: &Forgesyte, plugin: &str) -> Value {
    server.get(&format!("/v1/plugins/{plugin}/health")).json()
}

/// Every attack on `confined` is denied, with what was denied named; the
/// same attacks on `open` (which declares what it needs) succeed where
/// declared. `denied` is the error type a refusal has in that runtime;
/// `network` what its health says of its network.
fn attack(
    server: &Forgesyte,
    plugins: &PluginsDir,
    [confined, open]: [&str; 2],
    denied: &str,
    network: &str,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let own = plugins.path().join(confined).join("secret.txt");
    let others = plugins.path().join(open).join("secret.txt");
    let outside = plugins.path().join("outside.txt");
    let declared = plugins.path().join("declared.txt");

    let shown = status(server, confined);
    let confinement = &shown["confinement"];
    assert!(
        confinement["filesystem"]
            .as_str()
            .is_some_and(|f| f.starts_with("confined: Landlock")),
        "{shown}"
    );
    assert_eq!(confinement["network"], network, "{shown}");
    assert_eq!(confinement["scopes"], SCOPES, "{shown}");
    assert_eq!(confinement["env"], "scrubbed", "{shown}");
    assert_eq!(confinement["syscalls"], SYSCALLS_NO_SOCKETS, "{shown}");
    // No capability left, whoever the runner runs as (a root server's
    // runners without --runner-user are root).
    let root = rustix::process::geteuid().is_root();
    let expected = if root {
        CAPABILITIES_DROPPED
    } else {
        CAPABILITIES_NONE
    };
    assert_eq!(confinement["capabilities"], expected, "{shown}");
    assert_eq!(confinement["memory"], MEMORY_PRIVATE, "{shown}");
    let proc_status = call(
        server,
        confined,
        "read",
        json!({"path": "/proc/self/status", "bytes": 65536}),
    )
    .unwrap();
    let proc_status = proc_status["text"].as_str().unwrap_or_default();
    let capabilities = |set: &str| {
        proc_status
            .lines()
            .find_map(|line| line.strip_prefix(set))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {set} in {proc_status}"))
            .to_owned()
    };
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(capabilities(set), "0000000000000000", "{confined}: {set}");
    }
    if root {
        assert_eq!(capabilities("CapBnd:"), "0000000000000000", "{confined}");
    }

    let p = |path: &Path| json!({"path": path.to_str().unwrap()});
    for (tool, args, named) in [
        (
            "read",
            json!({"path": "/etc/shadow"}),
            "/etc/shadow".to_owned(),
        ),
        // The host's TLS keys: `/etc/ssl` is readable, not its `private`.
        (
            "read",
            json!({"path": "/etc/ssl/private"}),
            "/etc/ssl/private".to_owned(),
        ),
        ("read", p(&others), others.display().to_string()),
        ("read", p(&declared), declared.display().to_string()),
        ("write", p(&outside), outside.display().to_string()),
    ] {
        let (kind, error) = call(server, confined, tool, args).unwrap_err();
        assert_eq!(kind, denied, "{confined}.{tool}: {error}");
        assert!(
            error.contains("Permission denied") || error.contains("denied"),
            "{error}"
        );
        if denied == "Denied" {
            assert!(error.contains(&named), "{error} should name {named}");
        } else {
            // Python's error alone does not say the sandbox refused it.
            assert!(
                error.contains("(a confined runner reads only its plugin's files"),
                "{error}"
            );
        }
    }
    assert!(!outside.exists(), "the write outside went through");
    let (kind, error) = call(server, confined, "connect", json!({"port": port})).unwrap_err();
    assert!(
        [denied, "ConnectionRefusedError", "OSError"].contains(&kind.as_str()),
        "{kind}: {error}"
    );
    if kind == denied && denied != "Denied" {
        assert!(
            error.contains("(a confined runner has no network"),
            "{error}"
        );
    }
    let (kind, error) =
        call(server, confined, "env", json!({"name": "SNOOP_DECLARED"})).unwrap_err();
    assert!(
        ["KeyError", "Denied"].contains(&kind.as_str()),
        "{kind}: {error}"
    );
    if denied != "Denied" {
        assert!(
            error.contains("environment holds only the variables"),
            "{error}"
        );
    }

    // What it may do: its own files, its scratch directory, the system's
    // certificates.
    call(
        server,
        confined,
        "read",
        json!({"path": "/etc/ssl/certs/ca-certificates.crt"}),
    )
    .unwrap();
    let own_text = call(server, confined, "read", p(&own)).unwrap();
    assert!(
        own_text["text"].as_str().unwrap().starts_with("secret of"),
        "{own_text}"
    );
    let scratch = call(server, confined, "scratch", json!({})).unwrap();
    assert!(
        scratch["path"]
            .as_str()
            .unwrap()
            .contains("forgesyte-scratch-"),
        "{scratch}"
    );

    // The same attacks under a manifest that declares what it needs.
    assert_eq!(status(server, open)["confinement"]["network"], "allowed");
    call(server, open, "read", p(&declared)).unwrap();
    call(server, open, "connect", json!({"port": port})).unwrap();
    let value = call(server, open, "env", json!({"name": "SNOOP_DECLARED"})).unwrap();
    assert_eq!(value["value"], "yes");
    // Still never what it did not declare.
    let (kind, error) = call(server, open, "read", json!({"path": "/etc/shadow"})).unwrap_err();
    assert_eq!(kind, denied, "{error}");
    call(server, open, "env", json!({"name": "SNOOP_SECRET"})).unwrap_err();
    drop(listener);
}

/// What the `open` variants declare: the network, a variable, and a file
/// outside the plugin directory (written here: a rule allows what exists
/// when the runner starts).
pub(super) fn declares(plugins: &PluginsDir) -> Value {
    std::fs::write(plugins.path().join("declared.txt"), "declared\n").unwrap();
    json!({
        "network": true,
        "env": ["SNOOP_DECLARED"],
        "filesystem": {"read": [plugins.path().join("declared.txt").to_str().unwrap()]},
    })
}

/// Health's `network` of a runner in a network namespace of its own, and of
/// one in its zygote's shared one; its `scopes` (Landlock ABI >= 6).
const OWN_NETWORK: &str = "isolated: a network namespace of its own";
const SHARED_NETWORK: &str = "isolated: an empty network namespace shared with its zygote's other runners, which Landlock scopes keep it from reaching";
const SCOPES: &str = "abstract Unix sockets and signals: its own processes only";
const SYSCALLS_NO_SOCKETS: &str = "filtered: no new socket (Unix pairs of streams or packets only), no System V IPC, no POSIX \
     message queue, no io_uring, no keyring, no new session or process group, no new namespace, no \
     truncate() by path, no other process's limits, no scheduling of its parents, no signal to every \
     process, another process group or its parents";

/// The snoop's variables, and the policy that grants the `open` variants
/// (unsigned) what their manifests ask for.
const ENV: [(&str, &str); 3] = [
    ("SNOOP_DECLARED", "yes"),
    ("SNOOP_SECRET", "no"),
    ("FORGESYTE_SANDBOX_WIDENING", "allow"),
];

fn python_server(zygote: &str) -> (PluginsDir, Forgesyte) {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "snoop", json!({}));
    let open = declares(&plugins);
    python_snoop(&plugins, "snoop-open", open);
    let server = Forgesyte::start_with_env(
        &["--plugins", plugins.path_str()],
        &[ENV[0], ENV[1], ENV[2], ("FORGESYTE_PYTHON_ZYGOTE", zygote)],
    );
    server.wait_loaded();
    (plugins, server)
}

/// A manifest comes with its plugin: by default what it asks beyond the
/// default sandbox is granted to plugins signed by a trusted key only
/// (`tests/api/signatures.rs` loads a signed one that writes its own
/// directory). An unsigned plugin asking for the network, a variable and a
/// file is FAILED, naming each and how to grant it; under `deny` the same;
/// the same plugin asking nothing loads.
#[test]
fn an_unsigned_plugin_may_not_widen_its_own_sandbox_by_default() {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "wide", declares(&plugins));
    native_snoop(&plugins, "wide-native", declares(&plugins));
    python_snoop(&plugins, "narrow", json!({}));
    let declared = plugins.path().join("declared.txt");
    for (policy, grant) in [
        (None, "--sandbox-widening allow"),
        (Some("deny"), "--sandbox-widening signed or allow"),
    ] {
        let mut args = vec!["--plugins", plugins.path_str()];
        if let Some(policy) = policy {
            args.extend(["--sandbox-widening", policy]);
        }
        let server = Forgesyte::start(&args);
        server.wait_loaded();
        for name in ["wide", "wide-native"] {
            let shown = status(&server, name);
            assert_eq!(shown["state"], "FAILED", "{policy:?}: {shown}");
            let reason = shown["reason"].as_str().unwrap_or_default();
            let asks = format!(
                "IntegrityError: its manifest asks for the network; the environment variables SNOOP_DECLARED; reading {}, which this server grants ",
                declared.display()
            );
            assert!(reason.starts_with(&asks), "{policy:?}: {reason}");
            assert!(reason.contains(grant), "{policy:?}: {reason}");
        }
        let narrow = status(&server, "narrow");
        assert_eq!(narrow["state"], "INITIALIZED", "{policy:?}: {narrow}");
    }
}

/// A manifest's read path that is a link leading nowhere when the plugin
/// loads (into its own scratch directory) asks nothing and allows nothing:
/// not once the plugin made the link lead to a file outside, and not in the
/// runner its restart starts either (which, when the plan kept the path as
/// written and each start followed it, read the file).
#[test]
fn a_link_a_plugin_aims_after_its_load_allows_nothing() {
    let plugins = PluginsDir::new();
    let name = format!("aim-{}", std::process::id());
    // Where the server's claim puts it (claimed here, the server would
    // take `NAME~2`).
    let scratch = forgesyte_loader::sandbox::first_scratch_dir(&name, None);
    let aim = scratch.join("l");
    let _ = std::fs::remove_file(&aim);
    python_snoop(&plugins, &name, json!({"filesystem": {"read": ["data"]}}));
    let dir = plugins.path().join(&name);
    std::os::unix::fs::symlink(&aim, dir.join("data")).unwrap();
    let outside = plugins.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "outside\n").unwrap();
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let shown = status(&server, &name);
    assert_eq!(shown["state"], "INITIALIZED", "{shown}");

    let through_link = dir.join("data/secret.txt");
    let read = |path: &Path| {
        call(
            &server,
            &name,
            "read",
            json!({"path": path.to_str().unwrap()}),
        )
    };
    let linked = call(
        &server,
        &name,
        "link",
        json!({"name": "l", "target": outside.to_str().unwrap()}),
    );
    assert!(linked.is_ok(), "{linked:?}");
    let both_denied = |when: &str| {
        for path in [&through_link, &outside.join("secret.txt")] {
            let denied = read(path);
            assert!(
                matches!(&denied, Err((kind, _)) if kind == "PermissionError"),
                "{when}, {}: {denied:?}",
                path.display()
            );
        }
    };
    both_denied("before the restart");

    // Restarted, with the link in place.
    let crashed = server.run(&name, "exit", r#"{"args": {}}"#);
    assert_eq!(crashed.status, 502, "{}", crashed.json());
    let limit = std::time::Duration::from_secs(30);
    crate::rescan::wait_for("the restart", limit, &server, || {
        let shown = status(&server, &name);
        (shown["state"] == "INITIALIZED" && shown["restart_count"].as_u64().unwrap_or(0) >= 1)
            .then_some(())
    });
    both_denied("after the restart");
    let _ = std::fs::remove_file(&aim);
}

#[test]
fn a_python_plugin_is_confined_through_the_zygote() {
    let (plugins, server) = python_server("1");
    let pair = ["snoop", "snoop-open"];
    attack(&server, &plugins, pair, "PermissionError", SHARED_NETWORK);
    spawns_in_its_group_only(&server);
}

/// A confined Python runner runs programs (`pytesseract` runs
/// `tesseract`), in its own process group only: a session of its own is
/// refused by the seccomp filter, and the error, which names no file, says
/// what the filter refuses (it was a bare `Permission denied`).
fn spawns_in_its_group_only(server: &Forgesyte) {
    let done = call(server, "snoop", "spawn", json!({})).unwrap();
    assert_eq!(done["returncode"], 0, "{done}");
    let (kind, error) = call(server, "snoop", "spawn", json!({"new_session": true})).unwrap_err();
    assert_eq!(kind, "PermissionError", "{error}");
    assert!(
        error.contains("a confined runner refuses a new session or process group")
            && error.contains("start_new_session"),
        "{error}"
    );
    // Any other tool error is left as it is.
    let (_, error) = call(server, "snoop", "read", json!({"path": "/no/such/file"})).unwrap_err();
    assert!(!error.contains("a confined runner refuses"), "{error}");
}

#[test]
fn a_python_plugin_is_confined_without_the_zygote() {
    let (plugins, server) = python_server("0");
    let pair = ["snoop", "snoop-open"];
    attack(&server, &plugins, pair, "PermissionError", OWN_NETWORK);
}

/// Two Python runners the same zygote forked into the same network
/// namespace: neither may make an abstract Unix socket (nor any Unix
/// socket, nor a datagram pair: the seccomp filter) or a netlink one to
/// reach the other by, nor signal it. With `--confine off` all of it goes through (what shows the
/// test can see them).
#[test]
fn runners_sharing_a_network_namespace_cannot_reach_each_other() {
    for confine in ["on", "off"] {
        let plugins = PluginsDir::new();
        python_snoop(&plugins, "snoop-a", json!({}));
        python_snoop(&plugins, "snoop-b", json!({}));
        let server = Forgesyte::start_with_env(
            &["--plugins", plugins.path_str(), "--confine", confine],
            &[("FORGESYTE_PYTHON_ZYGOTE", "1")],
        );
        server.wait_loaded();
        let name = format!("forgesyte-sandbox-test-{}-{confine}", std::process::id());
        let a = call(&server, "snoop-a", "pid", json!({})).unwrap();
        let listen = call(&server, "snoop-a", "listen", json!({ "name": name }));
        let reach = call(&server, "snoop-b", "reach", json!({ "name": name }));
        let netlink = call(&server, "snoop-b", "netlink", json!({}));
        let dgram = call(&server, "snoop-b", "dgram_pair", json!({}));
        let signal = call(&server, "snoop-b", "signal", json!({"pid": a["pid"]}));
        // Its zygote, and every process (signal 0 only asks).
        let zygote = call(&server, "snoop-b", "signal", json!({"pid": "parent"}));
        let everyone = call(&server, "snoop-b", "signal", json!({"pid": "all"}));
        // MPTCP (IPPROTO_MPTCP, 262) and vsock (AF_VSOCK, 40): sockets
        // Landlock's TCP rights and the namespace do not rule. Unconfined
        // they open where the kernel has them.
        let mptcp = call(
            &server,
            "snoop-b",
            "socket",
            json!({"family": libc::AF_INET, "type": libc::SOCK_STREAM, "proto": 262}),
        );
        let vsock = call(
            &server,
            "snoop-b",
            "socket",
            json!({"family": libc::AF_VSOCK, "type": libc::SOCK_STREAM, "proto": 0}),
        );
        if confine == "off" {
            for (what, opened) in [("mptcp", mptcp), ("vsock", vsock)] {
                if let Err((kind, error)) = opened {
                    assert_ne!(kind, "PermissionError", "{what} unconfined: {error}");
                }
            }
            assert_eq!(listen.unwrap()["pid"], a["pid"]);
            assert_eq!(reach.unwrap()["connected"], true);
            assert_eq!(netlink.unwrap()["opened"], true);
            assert_eq!(dgram.unwrap()["made"], true);
            assert_eq!(signal.unwrap()["signalled"], true);
            assert_eq!(zygote.unwrap()["signalled"], true);
            assert_eq!(everyone.unwrap()["signalled"], true);
            continue;
        }
        let confinement = &status(&server, "snoop-b")["confinement"];
        assert_eq!(confinement["network"], SHARED_NETWORK);
        assert_eq!(confinement["syscalls"], SYSCALLS_NO_SOCKETS);
        for (what, refused) in [
            ("listen", listen),
            ("reach", reach),
            ("netlink", netlink),
            ("dgram_pair", dgram),
            ("signal", signal),
            ("mptcp", mptcp),
            ("vsock", vsock),
        ] {
            let (kind, error) = refused.unwrap_err();
            assert_eq!(kind, "PermissionError", "{what}: {error}");
        }
        // The seccomp filter's EACCES, not Landlock's EPERM: refused on a
        // kernel whose Landlock cannot scope signals too.
        for (what, refused) in [("zygote", zygote), ("everyone", everyone)] {
            let (kind, error) = refused.unwrap_err();
            assert_eq!(kind, "PermissionError", "{what}: {error}");
            assert!(error.contains("[Errno 13]"), "{what}: {error}");
        }
    }
}

/// A frame in transit is a memory file a runner holds open. No other
/// confined runner reads it through `/proc/PID/fd/N` (a Python sibling from
/// the same zygote, an isolated native runner), nor the server's open files
/// and memory: Landlock keeps a confined runner to its own domain. Each
/// runner is also not dumpable, which this test checks apart from
/// Landlock: the runners say so (`PR_GET_DUMPABLE`), and when the test runs
/// as a user that is not root (the runners' user), it cannot read a
/// runner's `/proc` files but can read the server's.
#[test]
fn a_confined_runner_reads_no_other_runners_frames_nor_the_servers_memory() {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "snoop-a", json!({}));
    python_snoop(&plugins, "snoop-b", json!({}));
    native_snoop(&plugins, "native", json!({}));
    let server = Forgesyte::start_with_env(
        &["--plugins", plugins.path_str()],
        &[("FORGESYTE_PYTHON_ZYGOTE", "1")],
    );
    server.wait_loaded();
    let secret = "the frame of snoop-a";
    let held = call(&server, "snoop-a", "hold", json!({ "text": secret })).unwrap();
    let (pid, fd) = (&held["pid"], &held["fd"]);
    let frame = json!({"path": format!("/proc/{pid}/fd/{fd}")});
    // Its own frame it reads, by the same path: the path is right.
    let own = call(&server, "snoop-a", "read", frame.clone()).unwrap();
    assert_eq!(own["text"], secret);
    let (kind, error) = call(&server, "snoop-b", "read", frame.clone()).unwrap_err();
    assert_eq!(kind, "PermissionError", "{error}");
    let (kind, error) = call(&server, "native", "read", frame).unwrap_err();
    assert_eq!(kind, "Denied", "{error}");
    for what in ["environ", "fd/0", "mem"] {
        let servers = json!({"path": format!("/proc/{}/{what}", server.pid())});
        let (kind, error) = call(&server, "snoop-b", "read", servers).unwrap_err();
        assert_eq!(kind, "PermissionError", "the server's {what}: {error}");
    }
    // Nor does a Python runner read the native runner's memory.
    let native = call(&server, "native", "pid", json!({})).unwrap();
    let natives = json!({"path": format!("/proc/{native}/environ")});
    let (kind, error) = call(&server, "snoop-b", "read", natives).unwrap_err();
    assert_eq!(kind, "PermissionError", "{error}");
    for plugin in ["snoop-a", "snoop-b", "native"] {
        let shown = status(&server, plugin);
        assert_eq!(shown["confinement"]["memory"], MEMORY_PRIVATE, "{shown}");
    }
    // Not dumpable, apart from Landlock: as the runner sees itself, and
    // (for a user that is not root) as the other processes of its user do.
    for plugin in ["snoop-a", "snoop-b"] {
        let got = call(&server, plugin, "dumpable", json!({})).unwrap();
        assert_eq!(got["dumpable"], 0, "{plugin}");
    }
    if rustix::process::geteuid().is_root() {
        crate::support::say_skipped(
            "root runs this test: its processes read root's /proc files whatever the \
             runners' dumpable flag, so only the runners' own word (PR_GET_DUMPABLE) is checked",
        );
    } else {
        let server_env = std::fs::read(format!("/proc/{}/environ", server.pid()));
        assert!(server_env.is_ok(), "the control: the server is dumpable");
        for pid in [pid.to_string(), native.to_string()] {
            let runner_env = std::fs::read(format!("/proc/{pid}/environ"));
            assert!(runner_env.is_err(), "runner {pid} is dumpable");
        }
    }
}

#[test]
fn an_isolated_native_plugin_is_confined() {
    let plugins = PluginsDir::new();
    native_snoop(&plugins, "snoop", json!({}));
    native_snoop(&plugins, "snoop-open", declares(&plugins));
    let server = Forgesyte::start_with_env(&["--plugins", plugins.path_str()], &ENV);
    server.wait_loaded();
    attack(
        &server,
        &plugins,
        ["snoop", "snoop-open"],
        "Denied",
        OWN_NETWORK,
    );
}

#[test]
fn confine_off_leaves_runners_unconfined() {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "snoop", json!({}));
    native_snoop(&plugins, "native", json!({}));
    let server =
        Forgesyte::start_with_env(&["--plugins", plugins.path_str(), "--confine", "off"], &ENV);
    server.wait_loaded();
    for plugin in ["snoop", "native"] {
        let status = status(&server, plugin);
        assert_eq!(status["state"], "INITIALIZED", "{status}");
        assert_eq!(status["confinement"], Value::Null, "{status}");
        let value = call(&server, plugin, "env", json!({"name": "SNOOP_SECRET"})).unwrap();
        assert_eq!(value["value"], "no");
    }
    let done = call(&server, "snoop", "spawn", json!({"new_session": true})).unwrap();
    assert_eq!(done["returncode"], 0, "{done}");
}

/// The uid in `/proc/PID/status`.
fn uid_of(pid: u64) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_root_server_runs_its_runners_as_the_runner_user() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        // Only root can change a process's user: nothing to test as
        // anyone else (and the option is then ignored, with a warning).
        crate::support::say_skipped("--runner-user needs a server running as root");
        return;
    }
    // The native runner is this `forgesyte` binary: `nobody` must be able
    // to reach it (a checkout under a private home directory is out of its
    // reach; this test cannot run there).
    let binary = Path::new(env!("CARGO_BIN_EXE_forgesyte"));
    if let Some(private) = binary
        .ancestors()
        .skip(1)
        .find(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
    {
        crate::support::say_skipped(&format!(
            "nobody cannot enter {} on the way to the forgesyte binary",
            private.display()
        ));
        return;
    }
    let plugins = PluginsDir::new();
    native_snoop(&plugins, "native", json!({}));
    // The interpreter its manifest names is the plugin's own: it records
    // who runs it, for its dependency check as for its runner.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a system python3 that nobody can run");
    let own = tempfile::tempdir().unwrap();
    std::fs::set_permissions(own.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let runs = own.path().join("runs.log");
    let wrapper = own.path().join("python");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$(id -u) $1\" >> {}\nexec {python} \"$@\"\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    python_snoop(
        &plugins,
        "snoop",
        json!({"python": wrapper.to_str().unwrap(), "dependencies": ["json"]}),
    );
    // What `nobody` may read: the plugin directories, but not a file of
    // root's inside them (which the Landlock rules alone would allow).
    std::fs::set_permissions(plugins.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for plugin in ["native", "snoop"] {
        let dir = plugins.path().join(plugin);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let private = dir.join("root-only.txt");
        std::fs::write(&private, "root\n").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Debian's interpreter: pyenv's lives under /root, which `nobody`
    // cannot enter.
    let server = Forgesyte::start(&[
        "--plugins",
        plugins.path_str(),
        "--runner-user",
        "nobody",
        "--python",
        python,
    ]);
    server.wait_loaded();
    let nobody = 65534;
    for plugin in ["native", "snoop"] {
        let shown = status(&server, plugin);
        assert_eq!(shown["state"], "INITIALIZED", "{shown}\n{}", server.log());
        // Without CAP_SYS_ADMIN no network namespace: the seccomp filter,
        // which refuses every new socket, is what isolates it (Landlock's
        // TCP rights alone leave TCP Fast Open and UDP open).
        assert_eq!(
            shown["confinement"]["network"],
            "isolated: no network namespace (it may not make one), and no new socket (the seccomp filter)",
            "{shown}"
        );
        let (kind, error) = call(&server, plugin, "connect", json!({"port": 9})).unwrap_err();
        assert!(
            ["Denied", "PermissionError", "OSError"].contains(&kind.as_str())
                && error.contains("denied"),
            "{plugin}: {kind}: {error}"
        );
        let private = plugins.path().join(plugin).join("root-only.txt");
        let (_, error) = call(
            &server,
            plugin,
            "read",
            json!({"path": private.to_str().unwrap()}),
        )
        .unwrap_err();
        assert!(error.contains("Permission denied"), "{plugin}: {error}");
        let scratch = call(&server, plugin, "scratch", json!({})).unwrap();
        assert!(
            scratch["path"]
                .as_str()
                .unwrap()
                .contains(&format!("forgesyte-scratch-{nobody}")),
            "{scratch}"
        );
    }
    let pid = call(&server, "native", "pid", json!({}))
        .unwrap()
        .as_u64()
        .unwrap();
    assert_eq!(uid_of(pid), Some(nobody));
    let python_pid = super::support::runner_pid(server.pid(), "snoop").expect("the Python runner");
    assert_eq!(uid_of(u64::from(python_pid)), Some(nobody));
    // The dependency check (`-sB -c SCRIPT json`) ran it, as nobody, like
    // the runner's zygote did.
    let runs = std::fs::read_to_string(&runs).unwrap();
    assert!(runs.lines().any(|l| l == format!("{nobody} -sB")), "{runs}");
    assert!(
        runs.lines().all(|l| l.starts_with(&format!("{nobody} "))),
        "{runs}"
    );
}

/// The admin token never reaches a plugin: not its environment, not the
/// block a runner forked from the zygote was started with
/// (`/proc/self/environ`, which clearing `os.environ` leaves as it was), not
/// the zygote's own, whether the runner is confined or not.
#[test]
fn no_plugin_process_is_started_with_the_admin_token() {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "snoop", json!({}));
    let token = "the-admin-token-no-plugin-may-see";
    for confine in ["on", "off"] {
        let server = Forgesyte::start_with_env(
            &["--plugins", plugins.path_str(), "--confine", confine],
            &[
                ("FORGESYTE_ADMIN_TOKEN", token),
                ("FORGESYTE_PYTHON_ZYGOTE", "1"),
            ],
        );
        server.wait_loaded();
        let names = match call(&server, "snoop", "environ", json!({"pid": "self"})) {
            Ok(own) => {
                let names = own["names"].as_array().unwrap().clone();
                assert!(
                    !names.iter().any(|n| n == "FORGESYTE_ADMIN_TOKEN"),
                    "confine {confine}: {names:?}"
                );
                names
            }
            // A confined runner is not dumpable: its /proc files are
            // root's, and a runner that is not root cannot read its own
            // starting block either (nor can any process of its user).
            Err((kind, error))
                if confine == "on"
                    && kind == "PermissionError"
                    && !rustix::process::geteuid().is_root() =>
            {
                crate::support::say_skipped(&format!(
                    "its own /proc/self/environ is closed to a runner that is not root: {error}"
                ));
                Vec::new()
            }
            Err(other) => panic!("confine {confine}: {other:?}"),
        };
        if confine == "off" {
            // Unconfined, it sees the rest of the server's environment (the
            // check above is not passing for want of an environment).
            assert!(names.iter().any(|n| n == "PATH"), "{names:?}");
            // And may read its zygote's (its parent's) block: no token there.
            let zygote = call(&server, "snoop", "environ", json!({"pid": "parent"})).unwrap();
            let names = zygote["names"].as_array().unwrap();
            assert!(names.iter().any(|n| n == "PATH"), "{names:?}");
            assert!(
                !names.iter().any(|n| n == "FORGESYTE_ADMIN_TOKEN"),
                "the zygote: {names:?}"
            );
        }
        // Nor does the server's own starting block hold it any more (which
        // its user's processes may read).
        let own = std::fs::read(format!("/proc/{}/environ", server.pid())).unwrap();
        assert!(
            !own.windows(token.len()).any(|w| w == token.as_bytes()),
            "the token is in the server's /proc/PID/environ"
        );
        // Admin routes still take the token read at start.
        let reply = super::support::try_http_with(
            server.addr,
            "POST",
            "/v1/plugins/snoop/reload",
            &[("authorization", &format!("Bearer {token}"))],
            b"",
        )
        .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

/// `--require-confinement`: confined runners (Python, isolated native) are
/// served as before; an in-process plugin is FAILED before its library is
/// opened, naming how to run it isolated; with `--confine off` every
/// isolated plugin is FAILED; and a runner that comes back without its
/// confinement (a wrapper runner that drops `--confine`) is FAILED by the
/// host's own check and stopped.
#[test]
fn require_confinement_refuses_every_plugin_that_would_run_unconfined() {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "snoop", json!({}));
    native_snoop(&plugins, "native", json!({}));
    plugins.good("in-process", json!({}));
    let args = ["--plugins", plugins.path_str(), "--require-confinement"];
    let server = Forgesyte::start(&args);
    server.wait_loaded();
    for plugin in ["snoop", "native"] {
        let health = status(&server, plugin);
        assert_eq!(health["state"], "INITIALIZED", "{health}");
        assert!(
            !health["confinement"].to_string().contains("unconfined"),
            "{health}"
        );
    }
    let health = status(&server, "in-process");
    assert_eq!(health["state"], "FAILED", "{health}");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("ImportError: confinement is required (--require-confinement)")
            && reason.contains("server's process")
            && reason.contains("\"isolation\": \"process\""),
        "{reason}"
    );
    drop(server);

    let server = Forgesyte::start(&[&args[..], &["--confine", "off"]].concat());
    server.wait_loaded();
    for plugin in ["snoop", "native"] {
        let health = status(&server, plugin);
        assert_eq!(health["state"], "FAILED", "{health}");
        assert!(
            health["reason"]
                .as_str()
                .is_some_and(|r| r.contains("runners are not confined (--confine off)")),
            "{health}"
        );
    }
    drop(server);

    // A runner that starts the real one without its `--confine` plan.
    let wrapper = plugins.path().join("unconfined-runner.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nskip=0\nfor a in \"$@\"; do\n  shift\n  \
             if [ $skip = 1 ]; then skip=0; continue; fi\n  \
             if [ \"$a\" = --confine ]; then skip=1; continue; fi\n  \
             set -- \"$@\" \"$a\"\ndone\nexec '{}' __runner \"$@\"\n",
            env!("CARGO_BIN_EXE_forgesyte")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let wrapper = wrapper.to_str().unwrap();
    let server = Forgesyte::start(&[&args[..], &["--runner", wrapper]].concat());
    server.wait_loaded();
    let health = status(&server, "native");
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|r| r
                .contains("the plugin's runner came back unconfined: it reported no confinement")),
        "{health}"
    );
    // The refused runner is stopped (its stdin closed, killed after a
    // grace if it lingers).
    super::rescan::wait_for(
        "the refused runner's end",
        std::time::Duration::from_secs(10),
        &server,
        || {
            super::support::runner_pid(server.pid(), "native")
                .is_none()
                .then_some(())
        },
    );
    drop(server);

    // Not required, the same runner serves, and its health says what it
    // ignored: every part unconfined, never `null` (a plugin with no plan).
    let server = Forgesyte::start(&["--plugins", plugins.path_str(), "--runner", wrapper]);
    server.wait_loaded();
    let health = status(&server, "native");
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    for part in forgesyte_loader::sandbox::REPORTED_PARTS {
        assert_eq!(
            health["confinement"][part], "unconfined: not reported by the runner",
            "{part}: {health}"
        );
    }
    assert!(
        server.log().contains(
            "did not report these parts of its confinement plan, shown unconfined: env, \
             network, filesystem, capabilities, memory, syscalls"
        ),
        "{}",
        server.log()
    );
}

/// `--require-confinement` and an interpreter the manifest names: the
/// plugin's own (`python.sh` in its directory, which records that it ran)
/// is FAILED with a reason naming it, and never runs, not even for the
/// dependency check; a manifest naming the server's own interpreter is
/// served. Without the requirement the same plugin runs on its own
/// interpreter (so the record's absence means what it says).
#[test]
fn require_confinement_refuses_an_interpreter_the_manifest_names() {
    let python3 = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("python3"))
        .find(|candidate| candidate.exists())
        .expect("python3 on PATH");
    let python3 = python3.to_str().unwrap();
    let plugins = PluginsDir::new();
    python_snoop(
        &plugins,
        "own",
        json!({"python": "python.sh", "dependencies": ["json"]}),
    );
    // Outside the plugin directory, whose changes the server reloads.
    let records = tempfile::tempdir().unwrap();
    let ran = records.path().join("interpreter-ran");
    recording_python(&plugins.path().join("own").join("python.sh"), &ran);
    python_snoop(&plugins, "operators", json!({"python": python3}));
    // A native plugin's `py:` dependencies are asked of its manifest's
    // interpreter too.
    plugins.good(
        "native",
        json!({"isolation": "process", "python": "python.sh", "dependencies": ["py:json"]}),
    );
    let native_ran = records.path().join("native-interpreter-ran");
    recording_python(
        &plugins.path().join("native").join("python.sh"),
        &native_ran,
    );
    let args = ["--plugins", plugins.path_str(), "--python", python3];
    let server = Forgesyte::start(&[&args[..], &["--require-confinement"]].concat());
    server.wait_loaded();
    let health = status(&server, "own");
    assert_eq!(health["state"], "FAILED", "{health}");
    assert_eq!(
        health["reason"],
        format!(
            "ImportError: confinement is required (--require-confinement) and the plugin's \
             manifest names its own Python interpreter (python.sh), which would run unconfined \
             (its dependency check, and a runner's start with its site-packages' .pth files, \
             come before any confinement); serve it with the server's interpreter ({python3}, \
             or --python) instead"
        ),
        "{health}"
    );
    assert!(!ran.exists(), "the refused plugin's interpreter ran");
    let health = status(&server, "native");
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|r| r.contains("names its own Python interpreter (python.sh)")),
        "{health}"
    );
    assert!(
        !native_ran.exists(),
        "the refused native plugin's interpreter ran"
    );
    let health = status(&server, "operators");
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    drop(server);

    let server = Forgesyte::start(&args);
    server.wait_loaded();
    let health = status(&server, "own");
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    assert!(ran.exists(), "the plugin's own interpreter did not run");
    assert_eq!(status(&server, "native")["state"], "INITIALIZED");
    assert!(
        native_ran.exists(),
        "the native plugin's interpreter did not run"
    );
}

/// `--require-confinement` and a manifest's interpreter that is a link in
/// the plugin's directory to the operator's: served, and started by the
/// operator's path, never by the link's (which could lead elsewhere by the
/// time it is started: a review swapped it between the check and the
/// start). The operator's interpreter here is a script that records the
/// name it was started by.
#[test]
fn require_confinement_runs_the_operators_path_not_a_link_to_it() {
    let records = tempfile::tempdir().unwrap();
    let operators = records.path().join("python.sh");
    let names = records.path().join("started-as");
    std::fs::write(
        &operators,
        format!(
            "#!/bin/sh
echo \"$0\" >> '{}'
exec python3 \"$@\"
",
            names.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &operators,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "linked", json!({"python": "py"}));
    std::os::unix::fs::symlink(&operators, plugins.path().join("linked").join("py")).unwrap();
    let server = Forgesyte::start(&[
        "--plugins",
        plugins.path_str(),
        "--python",
        operators.to_str().unwrap(),
        "--require-confinement",
    ]);
    server.wait_loaded();
    let health = status(&server, "linked");
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    let started = std::fs::read_to_string(&names).unwrap();
    assert!(!started.is_empty());
    for name in started.lines() {
        assert_eq!(name, operators.to_str().unwrap(), "{started}");
    }
}

/// An executable `sh` script `path` that creates `marker` (it ran), then
/// runs `python3` from `PATH` with its arguments.
fn recording_python(path: &Path, marker: &Path) {
    let script = format!(
        "#!/bin/sh\ntouch '{}'\nexec python3 \"$@\"\n",
        marker.display()
    );
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Starts its first argument (looked up on `PATH` when bare) with the rest
/// as its arguments, under a seccomp filter that fails Landlock's first
/// system call (`landlock_create_ruleset`, 444 on x86-64 and arm64) with
/// `ENOSYS`, as a kernel without Landlock does.
const NO_LANDLOCK: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    insn(0x20, 0, 0, 0),                 # A = the system call's number
    insn(0x15, 0, 1, 444),               # landlock_create_ruleset?
    insn(0x06, 0, 0, 0x00050000 | 38),   # fail with ENOSYS
    insn(0x06, 0, 0, 0x7FFF0000),        # allow
])
buf = ctypes.create_string_buffer(prog, len(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit("cannot install the seccomp filter: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
"#;

/// An executable `sh` script `path` that runs `command` (already quoted)
/// with its own arguments after.
fn wrapper(path: &Path, command: &str) -> String {
    std::fs::write(path, format!("#!/bin/sh\nexec {command} \"$@\"\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The runners themselves refuse: where Landlock cannot be used (a seccomp
/// filter fails its system calls, as a kernel without it does), a required
/// confinement cannot be enforced, and the native runner and the Python
/// runner (forked from a zygote under the same filter) each answer
/// `NotConfined` before the plugin's code is opened or imported. Without
/// `--require-confinement` the same runners serve, reporting
/// `unconfined`.
#[test]
fn runners_that_cannot_enforce_a_required_confinement_refuse_before_plugin_code() {
    let plugins = PluginsDir::new();
    native_snoop(&plugins, "native", json!({}));
    // A Python plugin whose import leaves a mark.
    let marked = plugins.path().join("marked");
    std::fs::create_dir(&marked).unwrap();
    std::fs::write(
        marked.join("manifest.json"),
        json!({"name": "marked", "version": "1.0.0", "runtime": "python"}).to_string(),
    )
    .unwrap();
    let mark = marked.join("imported");
    std::fs::write(
        marked.join("plugin.py"),
        format!(
            "open({:?}, 'w').close()\n\nclass Plugin:\n    name = 'marked'\n    tools = {{}}\n",
            mark.display().to_string()
        ),
    )
    .unwrap();
    // The interpreter itself, not a shim that needs the environment a
    // confined runner does not get.
    let output = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed");
    let python = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let filter = plugins.path().join("no-landlock.py");
    std::fs::write(&filter, NO_LANDLOCK).unwrap();
    let filtered = format!("'{python}' '{}'", filter.display());
    let tools = tempfile::tempdir().unwrap();
    let runner = wrapper(
        &tools.path().join("runner"),
        &format!("{filtered} '{}' __runner", env!("CARGO_BIN_EXE_forgesyte")),
    );
    let interpreter = wrapper(
        &tools.path().join("python"),
        &format!("{filtered} '{python}'"),
    );
    let args = [
        "--plugins",
        plugins.path_str(),
        "--runner",
        &runner,
        "--python",
        &interpreter,
    ];

    let server = Forgesyte::start(&[&args[..], &["--require-confinement"]].concat());
    server.wait_loaded();
    for plugin in ["native", "marked"] {
        let health = status(&server, plugin);
        assert_eq!(health["state"], "FAILED", "{health}");
        let reason = health["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(
                "ImportError: confinement is required (--require-confinement) and the plugin's runner could not confine itself: "
            ) && reason.contains("filesystem: unconfined"),
            "{reason}"
        );
    }
    assert!(!mark.exists(), "the plugin was imported before the refusal");
    drop(server);

    // The same runners, confinement not required: served, and what they
    // could not enforce is said.
    let server = Forgesyte::start(&args);
    server.wait_loaded();
    for plugin in ["native", "marked"] {
        let health = status(&server, plugin);
        assert_eq!(health["state"], "INITIALIZED", "{health}");
        assert!(
            health["confinement"]["filesystem"]
                .as_str()
                .is_some_and(|f| f.starts_with("unconfined")),
            "{health}"
        );
    }
    assert!(mark.exists(), "the plugin was never imported");
}

/// An interpreter the server's user may run and the runner user may not
/// is named as such in the plugin's reason, not as a file that cannot be
/// opened.
#[test]
fn an_interpreter_the_runner_user_cannot_run_is_named() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        crate::support::say_skipped("--runner-user needs a server running as root");
        return;
    }
    let plugins = PluginsDir::new();
    let own = tempfile::tempdir().unwrap();
    let python = own.path().join("python");
    std::fs::write(&python, "#!/bin/sh\nexec python3 \"$@\"\n").unwrap();
    // Root's alone.
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o700)).unwrap();
    plugins.python("echo", "echo");
    let manifest = plugins.path().join("echo").join("manifest.json");
    let mut value: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    value["python"] = json!(python.to_str().unwrap());
    std::fs::write(&manifest, value.to_string()).unwrap();
    let server = Forgesyte::start(&["--plugins", plugins.path_str(), "--runner-user", "nobody"]);
    server.wait_loaded();
    let shown = status(&server, "echo");
    assert_eq!(shown["state"], "FAILED", "{shown}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "cannot start the Python interpreter {} as the runner user (uid 65534",
            python.display()
        )) && reason.contains("Permission denied"),
        "{reason}\n{}",
        server.log()
    );
}

/// Under a memory limit a runner starts the numeric libraries' threads at
/// one per core, at most 4 (OpenBLAS reserves about 40 MiB of address
/// space a thread: on 16 cores `import numpy` alone passed 512 MiB),
/// confined or not, forked by a zygote or not, Python or native; a count
/// its manifest's grant passes, or (unconfined) the server's own, wins;
/// with no memory limit none is set.
#[test]
fn runners_under_a_memory_limit_start_few_numeric_threads() {
    let plugins = PluginsDir::new();
    python_snoop(&plugins, "capped", json!({}));
    native_snoop(&plugins, "native", json!({}));
    python_snoop(&plugins, "granted", json!({"env": ["OMP_NUM_THREADS"]}));
    python_snoop(&plugins, "unlimited", json!({"limits": {"memory_mb": 0}}));
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let capped = cores.min(4).to_string();
    let value = |server: &Forgesyte, plugin: &str, var: &str| {
        call(server, plugin, "env", json!({"name": var}))
            .ok()
            .and_then(|v| v["value"].as_str().map(str::to_owned))
    };
    for (confine, zygote) in [("on", "1"), ("on", "0"), ("off", "1")] {
        let server = Forgesyte::start_with_env(
            &["--plugins", plugins.path_str(), "--confine", confine],
            &[
                ("OMP_NUM_THREADS", "7"),
                ("FORGESYTE_SANDBOX_WIDENING", "allow"),
                ("FORGESYTE_PYTHON_ZYGOTE", zygote),
            ],
        );
        server.wait_loaded();
        let case = format!("--confine {confine}, zygote {zygote}");
        for plugin in ["capped", "native"] {
            for var in ["OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"] {
                assert_eq!(
                    value(&server, plugin, var).as_deref(),
                    Some(capped.as_str()),
                    "{case}: {plugin} {var}"
                );
            }
            // Confined, the server's own count does not reach it.
            let omp = if confine == "off" { "7" } else { &capped };
            assert_eq!(
                value(&server, plugin, "OMP_NUM_THREADS").as_deref(),
                Some(omp),
                "{case}: {plugin}"
            );
        }
        assert_eq!(
            value(&server, "granted", "OMP_NUM_THREADS").as_deref(),
            Some("7"),
            "{case}: the grant's count wins"
        );
        assert_eq!(
            value(&server, "unlimited", "OPENBLAS_NUM_THREADS"),
            None,
            "{case}: no limit, no count"
        );
    }
}
