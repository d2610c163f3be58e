//! The config file through the binary: `forgesyte config --print` names
//! each value's layer (flag > env > file > default), `serve --config`
//! really serves with the file's values, and a bad file is a usage error
//! (exit 2) naming the file and the key.

use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir, run_forgesyte};

/// A config file in its own temporary directory.
struct ConfigFile {
    dir: tempfile::TempDir,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forgesyte.toml"), text).unwrap();
        ConfigFile { dir }
    }

    fn path(&self) -> String {
        self.dir
            .path()
            .join("forgesyte.toml")
            .to_str()
            .unwrap()
            .to_owned()
    }
}

/// `forgesyte config --print ARGS`'s output, under the shell's `limit`
/// (`ulimit -n 256`).
fn print_under(limit: &str, args: &str) -> String {
    let output = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("{limit} && exec \"$0\" config --print {args}"),
            env!("CARGO_BIN_EXE_forgesyte"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The line of `key` in a `config --print` output.
fn line<'a>(printed: &'a str, key: &str) -> &'a str {
    printed
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no line for {key} in:\n{printed}"))
}

/// An on/off option's flag turns it off as well as on (`--preflight=off`
/// beats `preflight = true` in the file and `FORGESYTE_WATCH=1`); alone,
/// the flag turns it on; the file takes only `true` or `false`.
#[test]
fn an_on_off_flag_turns_off_what_the_file_or_the_environment_turned_on() {
    let file = ConfigFile::new("preflight = true\nrequire-signed = true\n");
    let path = file.path();
    let (code, out, err) = run_forgesyte(
        &[
            "config",
            "--print",
            "--config",
            &path,
            "--preflight=off",
            "--watch=no",
            "--no-gpu",
        ],
        &[("FORGESYTE_WATCH", "1"), ("FORGESYTE_CONFINE", "off")],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(line(&out, "preflight"), "preflight = false  # flag");
    assert_eq!(line(&out, "watch"), "watch = false  # flag");
    assert_eq!(line(&out, "no-gpu"), "no-gpu = true  # flag");
    assert_eq!(
        line(&out, "require-signed"),
        format!("require-signed = true  # file {path}")
    );
    assert_eq!(
        line(&out, "confine"),
        "confine = false  # env FORGESYTE_CONFINE"
    );
    // What `config --print` wrote is a config file giving the same values.
    let again = ConfigFile::new(&out);
    let (code, reread, err) = run_forgesyte(&["config", "--print", "--config", &again.path()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        line(&reread, "preflight").starts_with("preflight = false  # file"),
        "{reread}"
    );
    assert!(
        line(&reread, "no-gpu").starts_with("no-gpu = true  # file"),
        "{reread}"
    );

    let bad = ConfigFile::new("watch = \"yes\"\n");
    let (code, _, err) = run_forgesyte(&["config", "--print", "--config", &bad.path()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("key `watch`") && err.contains("true or false"),
        "{err}"
    );
}

#[test]
fn each_layer_beats_the_next_flag_env_file_default() {
    let file = ConfigFile::new(
        "bind = \"0.0.0.0:9000\"\nmax-connections = 500\ncall-timeout = 5\n\
         max-calls-per-plugin = 7\n",
    );
    let path = file.path();
    let (code, out, err) = run_forgesyte(
        &[
            "config",
            "--print",
            "--config",
            &path,
            "--call-timeout",
            "3",
        ],
        &[
            ("FORGESYTE_MAX_CONNECTIONS", "400"),
            ("FORGESYTE_CALL_TIMEOUT", "4"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    // flag > env > file
    assert_eq!(line(&out, "call-timeout"), "call-timeout = 3  # flag");
    // env > file
    assert_eq!(
        line(&out, "max-connections"),
        "max-connections = 400  # env FORGESYTE_MAX_CONNECTIONS"
    );
    // file > default
    assert_eq!(
        line(&out, "bind"),
        format!("bind = \"0.0.0.0:9000\"  # file {path}")
    );
    assert_eq!(
        line(&out, "max-calls-per-plugin"),
        format!("max-calls-per-plugin = 7  # file {path}")
    );
    // default
    assert_eq!(line(&out, "body-limit"), "body-limit = 33554432  # default");
    // What serve computes, and what it raises, said (it printed `not set`
    // and `1` where serve applied 256 MiB and the body limit).
    assert!(
        out.lines().any(|l| l
            == "# body-memory is not set  # unset; serve applies 268435456 (8 × body-limit, at \
                least 256 MiB, never less than body-limit)"),
        "{out}"
    );
    let (code, low, err) = run_forgesyte(&["config", "--print", "--body-memory", "1"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        line(&low, "body-memory"),
        "body-memory = 1  # flag; serve applies 33554432 here (never less than body-limit)"
    );
    // The output is TOML.
    let table: toml::Table = out.parse().unwrap();
    assert_eq!(table["max-connections"].as_integer(), Some(400));

    // A cap `serve` would lower (half the open-file limit) says so.
    let printed = print_under("ulimit -n 256", "--max-connections 1000");
    assert_eq!(
        line(&printed, "max-connections"),
        "max-connections = 1000  # flag; serve applies 128 here (half the hard open-file \
         limit, to which it raises the soft one: raise `ulimit -Hn` for more)",
        "{printed}"
    );
    // So does one past TOML's integers, printed as a string.
    let printed = print_under(
        "ulimit -n 256",
        "--max-connections 18446744073709551615 --body-limit 18446744073709551615",
    );
    assert_eq!(
        line(&printed, "max-connections"),
        "max-connections = \"18446744073709551615\"  # flag; serve applies 128 here (half the \
         hard open-file limit, to which it raises the soft one: raise `ulimit -Hn` for more)",
        "{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("# body-memory is not set")
                && l.contains("serve applies 18446744073709551615")),
        "{printed}"
    );
    // A soft limit alone is no cap: `serve` raises it to the hard one
    // first (it said 128 here, where `serve` applied the cap whole).
    let printed = print_under("ulimit -Sn 256", "--max-connections 1000");
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let expected = match hard.map(|h| h / 2).filter(|&half| half < 1000) {
        Some(half) => format!(
            "max-connections = 1000  # flag; serve applies {half} here (half the hard \
             open-file limit, to which it raises the soft one: raise `ulimit -Hn` for more)"
        ),
        None => "max-connections = 1000  # flag".to_owned(),
    };
    assert_eq!(line(&printed, "max-connections"), expected, "{printed}");

    // FORGESYTE_CONFIG names the file too.
    let (code, out, err) = run_forgesyte(
        &["config", "--print"],
        &[("FORGESYTE_CONFIG", path.as_str())],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "# config file: {path} (from env FORGESYTE_CONFIG)"
        )),
        "{out}"
    );
    assert_eq!(
        line(&out, "max-connections"),
        format!("max-connections = 500  # file {path}")
    );
}

#[test]
fn serve_runs_with_the_file_and_the_environment_beats_it() {
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    let file = ConfigFile::new(&format!(
        "plugins = {}\nbody-limit = 1024\n",
        toml::Value::String(plugins.path_str().to_owned())
    ));
    let big = format!(r#"{{"args": {{"blob": "{}"}}}}"#, "x".repeat(4000));

    // The plugins directory and the body limit come from the file (the
    // helper's own --bind flag beats nothing in it).
    let server = Forgesyte::start(&["--config", &file.path()]);
    server.wait_loaded();
    let listed = server.get("/v1/plugins").json();
    assert_eq!(listed[0]["name"], "alpha", "{listed}");
    assert_eq!(server.run("alpha", "echo", &big).status, 413);
    drop(server);

    // The environment beats the file.
    let server = Forgesyte::start_with_env(
        &["--config", &file.path()],
        &[("FORGESYTE_BODY_LIMIT", "100000")],
    );
    server.wait_loaded();
    let reply = server.run("alpha", "echo", &big);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn bad_files_are_usage_errors_naming_file_and_key() {
    for (text, expected) in [
        ("max-conections = 5\n", "unknown key `max-conections`"),
        ("idle-timeout = -1\n", "key `idle-timeout`"),
        ("isolation = 3\n", "key `isolation`"),
        // A float for a whole number, refused as `--body-limit 1e3` is.
        ("body-limit = 1e3\n", "key `body-limit`"),
        ("bind = \n", "not valid TOML"),
    ] {
        let file = ConfigFile::new(text);
        let path = file.path();
        for command in [&["serve"][..], &["config", "--print"]] {
            let mut args = command.to_vec();
            args.extend(["--config", path.as_str()]);
            let (code, out, err) = run_forgesyte(&args, &[]);
            assert_eq!(code, 2, "{text:?} {command:?}: {out}{err}");
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains(&path), "{text:?}: {err}");
        }
    }
    let (code, _, err) = run_forgesyte(&["serve", "--config", "/nonexistent/forgesyte.toml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot read the config file /nonexistent/forgesyte.toml"),
        "{err}"
    );
}

#[test]
fn check_loads_with_the_config_files_loader_options_and_plugins_directory() {
    // `check` loads as `serve` would: with the file's loader options (here
    // signatures required) and its plugins directory; the server's own keys
    // (`bind`) are the server's, and a directory given beats the file's.
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    let file = ConfigFile::new(&format!(
        "plugins = {:?}\nrequire-signed = true\nbind = \"127.0.0.1:9\"\n",
        plugins.path_str()
    ));
    let (code, out, err) = run_forgesyte(&["check", "--json", "--config", &file.path()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "alpha", "{list:#}");
    assert_eq!(list[0]["state"], "FAILED", "{list:#}");
    assert!(
        list[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("signature required"),
        "{list:#}"
    );
    let other = PluginsDir::new();
    other.good("beta", json!({}));
    let (code, out, err) = run_forgesyte(
        &["check", "--json", other.path_str()],
        &[("FORGESYTE_CONFIG", file.path().as_str())],
    );
    assert_eq!(code, 1, "{out}{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "beta", "{list:#}");
}

/// `check` takes the runners' answer limit (`max-response`) as `serve`
/// does: a Python plugin whose answers do not fit is FAILED in both. And
/// `serve`'s `python` key (its interpreter) is no plugin name to `new`.
#[test]
fn check_takes_the_answer_limit_and_new_ignores_serve_s_python() {
    let plugins = PluginsDir::new();
    plugins.python("py", "echo");
    let file = ConfigFile::new(&format!(
        "plugins = {:?}\nmax-response = 500\npython = \"python3\"\n",
        plugins.path_str()
    ));
    let (code, out, err) = run_forgesyte(&["check", "--json", "--config", &file.path()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["state"], "FAILED", "{list:#}");
    assert!(
        list[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("exceeds the limit of 500 bytes")),
        "{list:#}"
    );
    let (code, out, err) = run_forgesyte(&["new", "--rust", "demo", "--config", &file.path()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(plugins.path().join("demo/Cargo.toml").is_file());
}

#[test]
fn lock_and_new_take_the_plugins_directory_from_the_config_file() {
    // `lock` pins, and `new` scaffolds into, the file's `plugins` when no
    // directory is given, and a directory given beats the file's. `new`
    // prints its `curl` for the file's `bind` (the address `serve` will
    // listen on there), unless `FORGESYTE_BIND` says otherwise.
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    let file = ConfigFile::new(&format!(
        "plugins = {:?}\nbind = \"127.0.0.1:9\"\n",
        plugins.path_str()
    ));
    let lock = plugins.path().join("forgesyte.lock");
    let (code, out, err) = run_forgesyte(&["lock", "--config", &file.path()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&lock).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert!(text.contains("\"alpha\""), "{text}");

    let (code, out, err) = run_forgesyte(
        &["new", "--python", "from-file"],
        &[("FORGESYTE_CONFIG", file.path().as_str())],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        plugins
            .path()
            .join("from-file")
            .join("manifest.json")
            .is_file(),
        "{out}{err}"
    );
    assert!(
        out.contains("curl -s -X POST http://127.0.0.1:9/v1/plugins/from-file/tools/hello/run"),
        "{out}"
    );
    // The printed serve line listens there too, however the address came,
    // and reads the same config file (given here through the environment).
    // (The binary by its path, unless PATH leads to it: see the scaffold's
    // tests.)
    let me = std::fs::canonicalize(env!("CARGO_BIN_EXE_forgesyte")).unwrap();
    let serve = |program: &str| format!("  {program} serve --config {} --plugins ", file.path());
    let (bare, by_path) = (serve("forgesyte"), serve(&me.display().to_string()));
    assert!(
        out.lines()
            .any(|l| (l.starts_with(&bare) || l.starts_with(&by_path))
                && l.ends_with(" --bind 127.0.0.1:9")),
        "{out}"
    );
    let (code, out, err) = run_forgesyte(
        &["new", "--python", "from-env"],
        &[
            ("FORGESYTE_CONFIG", file.path().as_str()),
            ("FORGESYTE_BIND", "0.0.0.0:47203"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("curl -s -X POST http://127.0.0.1:47203/v1/plugins/from-env/"),
        "{out}"
    );
    assert!(out.contains(" --bind 0.0.0.0:47203\n"), "{out}");
    // An address `serve` would refuse is not `new`'s error: it scaffolds,
    // and its curl calls the default address, saying so.
    let scaffolds = tempfile::tempdir().unwrap();
    for bad in ["", ":8000"] {
        let name = format!("bad-bind-{}", bad.len());
        let (code, out, err) = run_forgesyte(
            &[
                "new",
                "--python",
                &name,
                "--dir",
                scaffolds.path().to_str().unwrap(),
            ],
            &[("FORGESYTE_BIND", bad)],
        );
        assert_eq!(code, 0, "{bad:?}: {out}{err}");
        assert!(
            out.contains(&format!(
                "curl -s -X POST http://127.0.0.1:8000/v1/plugins/{name}/"
            )),
            "{out}"
        );
        assert!(err.contains("the curl below calls 127.0.0.1:8000"), "{err}");
    }

    let other = tempfile::tempdir().unwrap();
    let other_s = other.path().to_str().unwrap();
    let (code, out, err) = run_forgesyte(
        &[
            "new",
            "--python",
            "given",
            "--dir",
            other_s,
            "--config",
            &file.path(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(other.path().join("given").join("manifest.json").is_file());
    assert!(!plugins.path().join("given").exists());
    let (code, out, err) = run_forgesyte(&["lock", "--config", &file.path(), other_s], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(other.path().join("forgesyte.lock").is_file(), "{out}{err}");
}

/// `check` of a plugins directory it cannot list fails (exit 2, naming
/// it), as `serve` never gets ready on it; it used to pass with "0
/// plugins". Root lists any directory, so as root the check runs as
/// `nobody` (`setpriv`, util-linux, on every machine here).
#[test]
fn check_of_a_directory_it_cannot_list_fails() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = parent.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut binary = env!("CARGO_BIN_EXE_forgesyte").to_owned();
    // SAFETY: (a test) geteuid has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        // A copy nobody may run, wherever the build is.
        let copy = parent.path().join("forgesyte");
        std::fs::copy(&binary, &copy).unwrap();
        binary = copy.to_str().unwrap().to_owned();
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            &binary,
        ]);
        c
    } else {
        std::process::Command::new(&binary)
    };
    let output = command
        .args(["check", dir.to_str().unwrap()])
        .env_remove("FORGESYTE_PLUGINS_DIR")
        .output()
        .expect("setpriv (util-linux) to run the check as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be listed"), "{stderr}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What `serve` logs under `RUST_LOG=value` until it says it listens (all
/// of it, when it never says so).
fn logged_until_listening(value: &str) -> String {
    use std::io::BufRead as _;
    let plugins = tempfile::tempdir().unwrap();
    let mut child = crate::support::forgesyte_command()
        .args(["serve", "--bind", "127.0.0.1:0", "--plugins"])
        .arg(plugins.path())
        .env("RUST_LOG", value)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read on a thread: a server that logs nothing is given 10 s.
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = String::new();
    while let Ok(line) =
        read.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("listening on") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// A `RUST_LOG` that is not a log filter is said at start, with the level
/// the server logs at instead; it used to be dropped silently. One set but
/// empty is the default (it silenced every line, errors included).
#[test]
fn an_invalid_rust_log_is_said_not_ignored() {
    let seen = logged_until_listening("not a filter[[[");
    assert!(
        seen.contains(r#"RUST_LOG="not a filter[[[" is not a log filter"#)
            && seen.contains("logging at the default level, info"),
        "{seen}"
    );
    let seen = logged_until_listening("");
    assert!(
        seen.contains("listening on") && !seen.contains("is not a log filter"),
        "{seen}"
    );
}

/// A `--runner` that cannot be started refuses `serve` and `check` at once
/// (exit code 2, naming the option and why); it used to fail every
/// isolated plugin with a reason about its library.
#[test]
fn a_runner_that_cannot_be_started_refuses_serve_and_check() {
    let plugins = tempfile::tempdir().unwrap();
    // `check` first: without the refusal it exits 0, where `serve` would
    // keep serving.
    // `config --print` says so too: it shows what `serve` would run with.
    for args in [
        &["check"][..],
        &["serve", "--bind", "127.0.0.1:0", "--plugins"][..],
        &["config", "--print", "--plugins"][..],
    ] {
        let stderr = refused(
            args,
            plugins.path(),
            &["--runner", "/nonexistent/forgesyte-runner"],
        );
        assert!(
            stderr.contains("--runner /nonexistent/forgesyte-runner: No such file"),
            "{args:?}: {stderr}"
        );
    }
}

/// A program that starts but is no runner (`/bin/true`) fails each
/// isolated plugin saying so: it read `exited with code 0`, with no hint.
#[test]
fn a_runner_that_is_no_runner_is_named() {
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({"isolation": "process"}));
    let (code, out, err) =
        run_forgesyte(&["check", "--runner", "/bin/true", plugins.path_str()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("alpha"))
        .unwrap_or_default();
    assert!(
        line.contains(
            "ImportError: the plugin runner /bin/true exited with code 0 before it said its \
             hello: is it a forgesyte runner (--runner)?"
        ),
        "{out}"
    );
}

/// Runs `forgesyte ARGS DIR MORE` and returns its stderr, once it has
/// exited 2 (a configuration refused before any start), within 30 s: a
/// `serve` that did start would otherwise hold the test for ever.
fn refused(args: &[&str], dir: &std::path::Path, more: &[&str]) -> String {
    let dir = dir.to_str().unwrap();
    let all: Vec<&str> = args
        .iter()
        .copied()
        .chain([dir])
        .chain(more.iter().copied())
        .collect();
    let (code, _, stderr) = crate::support::run_forgesyte_within(&all, 30);
    assert_eq!(code, 2, "{args:?}: {stderr}");
    stderr
}

/// A plugin's own directory given where a directory of plugins belongs
/// (the scaffold's `check ..` run one level too deep) is refused by
/// `check`, `lock` and `serve`, naming the directory to give instead; a
/// directory of no plugins is checked with a warning.
#[test]
fn a_plugin_directory_given_for_the_plugins_directory_is_refused() {
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    let alpha = plugins.path().join("alpha");
    for args in [
        &["check"][..],
        &["lock"][..],
        &["serve", "--bind", "127.0.0.1:0", "--plugins"][..],
    ] {
        let stderr = refused(args, &alpha, &[]);
        assert!(
            stderr.contains(&format!(
                "'{}' is a plugin directory (it holds manifest.json), not a directory of \
                 plugins: give the directory that holds it ('{}')",
                alpha.display(),
                plugins.path().display()
            )),
            "{args:?}: {stderr}"
        );
    }
    assert!(!alpha.join("forgesyte.lock").exists());
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) =
        crate::support::run_forgesyte(&["check", empty.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("no plugins in")
            && err.contains("none of its subdirectories holds a manifest.json"),
        "{err}"
    );
    // A plugin's own directory whose package subdirectory ships a manifest
    // of its own (the packaged example) is still a plugin's directory.
    let packaged = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/plugins/py-forgesyte-packaged");
    let (code, out, err) =
        crate::support::run_forgesyte(&["check", packaged.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("is a plugin directory (it holds manifest.json)"),
        "{err}"
    );
    // A directory of plugins with a stray manifest.json beside them is one
    // (it refused every plugin): checked, and the stray file named.
    std::fs::write(plugins.path().join("manifest.json"), r#"{"name": "top"}"#).unwrap();
    let (code, out, err) = crate::support::run_forgesyte(&["check", plugins.path_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("alpha  INITIALIZED"), "{out}");
    assert!(!out.contains("top"), "{out}");
    assert!(
        err.contains(&format!(
            "forgesyte check: {} is not read: the plugins are {}'s subdirectories",
            plugins.path().join("manifest.json").display(),
            plugins.path().display()
        )),
        "{err}"
    );
}

/// An option's environment variable set to the empty string is refused
/// naming the variable (it was refused naming a flag nobody typed: "a
/// value is required for '--python <PATH>'"), never read as unset: an
/// empty `FORGESYTE_REQUIRE_SIGNED` must not turn the requirement off. An
/// empty element of `--lib-path` is skipped.
/// An admin token that is empty, blank or unreadable refuses `serve` with
/// exit code 2, as every configuration refused at start (it was 1), and
/// `config --print` says so the same way (it printed "from env (not
/// shown)" and exit 0 for a token `serve` refuses).
#[test]
fn an_empty_or_unreadable_admin_token_refuses_serve_with_exit_code_2() {
    let plugins = PluginsDir::new();
    let options = ["--bind", "127.0.0.1:0", "--plugins", plugins.path_str()];
    for command in [&["serve"][..], &["config", "--print"]] {
        let serve = [command, &options[..]].concat();
        for (value, said) in [("", "is empty"), ("   ", "is empty")] {
            let (code, out, err) = run_forgesyte(&serve, &[("FORGESYTE_ADMIN_TOKEN", value)]);
            assert_eq!(code, 2, "{command:?} {value:?}: {out}{err}");
            assert!(
                err.contains(&format!(
                    "the admin token from FORGESYTE_ADMIN_TOKEN {said}"
                )),
                "{command:?}: {err}"
            );
        }
        let mut with_file = serve.to_vec();
        with_file.extend(["--admin-token-file", "/nonexistent/forgesyte-token"]);
        let (code, out, err) = run_forgesyte(&with_file, &[]);
        assert_eq!(code, 2, "{command:?}: {out}{err}");
        assert!(
            err.contains("cannot read the admin token file"),
            "{command:?}: {err}"
        );
    }
    // Where the token comes from, never the token.
    let print = ["config", "--print", "--plugins", plugins.path_str()];
    let token = "a-token-of-some-length-1234";
    for (env, said) in [
        (
            vec![],
            "# admin token: none (the admin routes are disabled)",
        ),
        (
            vec![("FORGESYTE_ADMIN_TOKEN", token)],
            "# admin token: from env FORGESYTE_ADMIN_TOKEN (not shown)",
        ),
    ] {
        let (code, out, err) = run_forgesyte(&print, &env);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.lines().any(|l| l == said), "{said}:\n{out}");
        assert!(!out.contains(token), "{out}");
    }
}

/// A FIFO or a device where the admin token file or the configuration
/// file is expected is refused at once, exit code 2: a FIFO waited for a
/// writer before the server listened (`serve`, `check`, `config --print`),
/// and a token file linked to `/dev/zero` was read without end.
#[test]
fn a_token_or_config_file_that_is_no_regular_file_is_refused_at_once() {
    let plugins = PluginsDir::new();
    let scratch = tempfile::tempdir().unwrap();
    let fifo = scratch.path().join("fifo");
    crate::support::make_fifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    for (option, file) in [
        ("--admin-token-file", fifo),
        ("--admin-token-file", "/dev/zero"),
        ("--config", fifo),
    ] {
        let (code, _, err) = crate::support::run_forgesyte_within(
            &[
                "config",
                "--print",
                "--plugins",
                plugins.path_str(),
                option,
                file,
            ],
            20,
        );
        assert_eq!(code, 2, "{option} {file}: {err}");
        assert!(err.contains("not a regular file"), "{option} {file}: {err}");
    }
}

#[test]
fn an_empty_environment_variable_is_refused_naming_it() {
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    for (command, name, option) in [
        (&["config", "--print"][..], "FORGESYTE_PYTHON", "--python"),
        (
            &["config", "--print"][..],
            "FORGESYTE_REQUIRE_SIGNED",
            "--require-signed",
        ),
        (
            &["config", "--print"][..],
            "FORGESYTE_CALL_TIMEOUT",
            "--call-timeout",
        ),
        (
            &["check", plugins.path_str()][..],
            "FORGESYTE_RUNNER_USER",
            "--runner-user",
        ),
        (&["lock"][..], "FORGESYTE_PLUGINS_DIR", "DIR"),
    ] {
        let (code, out, err) = run_forgesyte(command, &[(name, "")]);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "forgesyte: {name} is set but empty (it sets {option}): give it a value, or unset it"
            ),
            "{name}"
        );
    }
    // A variable the command line overrides, or that the command run has
    // no option for, is not the error: the command line's own errors are
    // said, and `check --config` reads its file.
    for (command, name, said) in [
        (
            &["serve", "--bind", "nonsense"][..],
            "FORGESYTE_BIND",
            "invalid value 'nonsense' for '--bind",
        ),
        (
            &["serve", "--pyhton", "/usr/bin/python3"][..],
            "FORGESYTE_PYTHON",
            "unexpected argument '--pyhton'",
        ),
    ] {
        let (code, out, err) = run_forgesyte(command, &[(name, "")]);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert!(err.contains(said), "{name}: {err}");
    }
    let file = ConfigFile::new(&format!(
        "plugins = {}\nisolation = \"process\"\n",
        toml::Value::String(plugins.path_str().to_owned())
    ));
    // Serve's own empty variables are serve's refusal, said as such by
    // `check` (exit 2), never put on a file key; `lock` has no use for
    // them.
    let (code, out, err) = run_forgesyte(
        &["check", "--config", &file.path()],
        &[("FORGESYTE_BIND", ""), ("FORGESYTE_SHUTDOWN_GRACE", "")],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("serve would refuse this configuration: FORGESYTE_BIND is set but empty"),
        "{err}"
    );
    let (code, out, err) = run_forgesyte(
        &["lock", "--config", &file.path()],
        &[("FORGESYTE_BIND", ""), ("FORGESYTE_SHUTDOWN_GRACE", "")],
    );
    assert_eq!(code, 0, "{out}{err}");
    // Empty elements of the library path are skipped, and not shown.
    let (code, out, err) = run_forgesyte(
        &["config", "--print"],
        &[("FORGESYTE_LIB_PATH", "/opt/a::/opt/b:")],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        line(&out, "lib-path"),
        "lib-path = [\"/opt/a\", \"/opt/b\"]  # env FORGESYTE_LIB_PATH"
    );
    let (code, out, err) = run_forgesyte(
        &["check", plugins.path_str()],
        &[("FORGESYTE_LIB_PATH", ":/opt/a::")],
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// A variable whose value its option refuses is named in the error (clap
/// names the flag nobody typed); a flag given beats its variable, a global
/// one (`--log-format`) too: its bad variable refused a good flag.
#[test]
fn a_refused_environment_variable_is_named_and_a_flag_beats_it() {
    let plugins = PluginsDir::new();
    for (command, name, value, option) in [
        (
            &["config", "--print"][..],
            "FORGESYTE_CALL_TIMEOUT",
            "abc",
            "--call-timeout",
        ),
        (
            &["check", plugins.path_str()][..],
            "FORGESYTE_LOG_FORMAT",
            "xml",
            "--log-format",
        ),
    ] {
        let (code, out, err) = run_forgesyte(command, &[(name, value)]);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert!(
            err.starts_with(&format!(
                "forgesyte: {name} (it sets {option}): invalid value '{value}'"
            )),
            "{name}: {err}"
        );
        // A value of a list names the list (clap writes it on a line the
        // message left out).
        if name == "FORGESYTE_LOG_FORMAT" {
            assert!(err.contains("(one of: text, json)"), "{err}");
        }
    }
    // A list variable, one of whose elements is refused: the variable
    // (clap quotes the element, and the flag nobody typed was named).
    let (code, out, err) = run_forgesyte(
        &["config", "--print"],
        &[("FORGESYTE_PUBLIC_HOST", "a.example.com,b.example.com:8443")],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.starts_with(
            "forgesyte: FORGESYTE_PUBLIC_HOST (it sets --public-host): invalid value \
             'b.example.com:8443'"
        ),
        "{err}"
    );
    for command in [
        &["check", plugins.path_str(), "--log-format", "json"][..],
        &["--log-format", "json", "check", plugins.path_str()][..],
        &["check", "--log-format=json", plugins.path_str()][..],
    ] {
        for value in ["xml", ""] {
            let (code, out, err) = run_forgesyte(command, &[("FORGESYTE_LOG_FORMAT", value)]);
            assert_eq!(code, 0, "{command:?} with {value:?}: {out}{err}");
        }
    }
    // An empty DIR typed on the command line is its own error, not the
    // variable's (a valid one was blamed: "FORGESYTE_PLUGINS_DIR (it sets
    // DIR): …").
    let (code, out, err) = run_forgesyte(
        &["check", ""],
        &[("FORGESYTE_PLUGINS_DIR", plugins.path_str())],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(!err.contains("FORGESYTE_PLUGINS_DIR"), "{err}");
    assert!(err.contains("DIR"), "{err}");
}

/// `check` of in-process plugins: one whose constructor prints to stdout
/// leaves the JSON report readable (the print goes to stderr), and one
/// whose constructor never returns is FAILED after its `init_timeout_s`
/// while the others load, and the command ends (it never did). Without
/// the preflight `check` runs by default, which would construct them in a
/// runner first: this is the check's own process.
#[test]
fn check_survives_constructors_that_print_or_never_return() {
    let plugins = PluginsDir::new();
    plugins
        .library(
            "prints",
            forgesyte_tests::zoo::FAULTY_LIBRARY,
            json!({"isolation": "in-process", "config": {"fault_at_init": "stdout_spam"}}),
        )
        .library(
            "hangs",
            forgesyte_tests::zoo::FAULTY_LIBRARY,
            json!({"isolation": "in-process", "config": {"fault_at_init": "hang"},
                   "limits": {"init_timeout_s": 0.5}}),
        )
        .good("fine", json!({}));
    let started = std::time::Instant::now();
    let (code, out, err) = run_forgesyte(
        &["check", "--json", "--preflight=off", plugins.path_str()],
        &[],
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let start: String = out.chars().take(300).collect();
    assert_eq!(code, 1, "{start}…");
    let report: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("stdout is not the JSON report ({e}): {start:?}…"));
    let state = |name: &str| {
        report
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {report}"))
    };
    assert_eq!(state("prints")["state"], "INITIALIZED", "{report}");
    assert_eq!(state("fine")["state"], "INITIALIZED", "{report}");
    let hangs = state("hangs");
    assert_eq!(hangs["state"], "FAILED", "{report}");
    assert!(
        hangs["reason"]
            .as_str()
            .is_some_and(|r| r.contains("timed out after 500 ms during construction in process")),
        "{hangs}"
    );
    assert!(
        err.contains("garbage line"),
        "the print went nowhere: {err}"
    );
}

/// `check` refuses (exit 2) what `serve` would refuse of the environment
/// and the config file, its own options aside: it passed
/// `FORGESYTE_MAX_CONNECTIONS=0`, a body limit that is no number, and an
/// unreadable admin token file, and `serve` then refused to start (from a
/// review).
#[test]
fn check_refuses_what_serve_would_refuse() {
    let dir = PluginsDir::new();
    dir.good("fine", json!({}));
    let (code, out, err) = run_forgesyte(&["check", dir.path_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    for (var, value, says) in [
        ("FORGESYTE_MAX_CONNECTIONS", "0", "must be at least 1"),
        ("FORGESYTE_BODY_LIMIT", "abc", "is not a number of bytes"),
        ("FORGESYTE_BODY_LIMIT", "", "is set but empty"),
    ] {
        let (code, out, err) = run_forgesyte(&["check", dir.path_str()], &[(var, value)]);
        assert_eq!(code, 2, "{var}={value}: {out}{err}");
        assert!(
            err.contains("serve would refuse this configuration") && err.contains(says),
            "{var}={value}: {err}"
        );
    }
    // `check`'s own options keep their precedence: a flag beats its bad
    // variable, which is not read again as serve's.
    let (code, out, err) = run_forgesyte(
        &["check", "--isolation", "process", dir.path_str()],
        &[("FORGESYTE_ISOLATION", "bogus")],
    );
    assert_eq!(code, 0, "{out}{err}");
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "admin-token-file = \"/nonexistent/token\"\n").unwrap();
    let file = file.to_str().unwrap();
    let (code, out, err) = run_forgesyte(&["check", "--config", file, dir.path_str()], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("cannot read the admin token file"), "{err}");
}

/// `new --dir` under a path that is not UTF-8 is refused (exit 2): a
/// plugin there could never load, and the commands it printed named
/// another directory (a lossy path).
#[test]
fn new_refuses_a_directory_that_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt as _;
    let parent = tempfile::tempdir().unwrap();
    let odd = parent
        .path()
        .join(std::ffi::OsStr::from_bytes(b"nu\xffdir"));
    std::fs::create_dir(&odd).unwrap();
    let output = crate::support::forgesyte_command()
        .args(["new", "--python", "ok", "--dir"])
        .arg(&odd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("is not valid UTF-8"), "{err}");
    assert!(!odd.join("ok").exists());
    // `config --print` cannot write it as TOML: commented out, exit 2
    // (printed lossy, it read back as another directory).
    let output = crate::support::forgesyte_command()
        .args(["config", "--print", "--plugins"])
        .arg(&odd)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(2), "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("# plugins = ") && l.contains("not valid UTF-8")),
        "{out}"
    );
    assert!(
        err.contains("config --print: plugins is not valid UTF-8, which TOML cannot hold"),
        "{err}"
    );
}

/// `check` logs nothing by default: a `RUST_LOG` that does not parse is
/// said on stderr (its WARN went nowhere).
#[test]
fn check_says_a_log_filter_that_does_not_parse() {
    let plugins = PluginsDir::new();
    plugins.good("alpha", json!({}));
    let (code, out, err) = run_forgesyte(&["check", plugins.path_str()], &[("RUST_LOG", "[[[=")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("RUST_LOG=\"[[[=\" is not a log filter"),
        "{err}"
    );
}

/// A server that cannot listen says why once where a person reads it:
/// the text log's ERROR line alone; under `--log-format json` the JSON
/// record and one plain line; with the log off (`RUST_LOG=off`), the plain
/// line.
#[test]
fn a_refused_bind_is_said_once_in_each_log_format() {
    let plugins = PluginsDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let serve = |format: &str, env: &[(&str, &str)]| {
        // The server's default filter, whatever the tests' environment
        // sets, unless the case sets its own.
        let output = crate::support::forgesyte_command()
            .args([
                "serve",
                "--plugins",
                plugins.path_str(),
                "--bind",
                &addr,
                "--log-format",
                format,
            ])
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(1), "{err}");
        err
    };
    let said = format!("cannot listen on {addr}");
    let plain = format!("forgesyte: {said}");
    let err = serve("text", &[]);
    assert_eq!(err.matches(&said).count(), 1, "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains(" ERROR ") && l.contains(&said)),
        "{err}"
    );
    let err = serve("json", &[]);
    assert_eq!(err.matches(&said).count(), 2, "{err}");
    assert!(err.lines().any(|l| l.starts_with(&plain)), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with('{') && l.contains("\"ERROR\"") && l.contains(&said)),
        "{err}"
    );
    let err = serve("text", &[("RUST_LOG", "off")]);
    assert_eq!(err.matches(&said).count(), 1, "{err}");
    assert!(err.lines().any(|l| l.starts_with(&plain)), "{err}");
}

/// `check` prints what the load said of each manifest (a likely typo, a
/// field given twice), which `serve` logs at WARN and `check`, logging
/// nothing, showed nowhere: under the plugin's line, or on stderr beside
/// `--json`'s array.
#[test]
fn check_prints_the_manifest_notes() {
    let dir = PluginsDir::new();
    dir.good("fine", json!({}));
    dir.good("typo", json!({"dependency": ["lib:c"]}));
    let twice = dir.path().join("twice");
    std::fs::create_dir_all(&twice).unwrap();
    let library = std::path::Path::new(forgesyte_tests::zoo::GOOD_LIBRARY);
    std::fs::copy(library, twice.join(library.file_name().unwrap())).unwrap();
    std::fs::write(
        twice.join("manifest.json"),
        format!(
            r#"{{"name": "twice", "version": "1", "version": "2", "entrypoint": "{}"}}"#,
            library.file_name().unwrap().to_str().unwrap()
        ),
    )
    .unwrap();
    let (code, out, err) = run_forgesyte(&["check", dir.path_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let under = |name: &str| {
        let at = lines
            .iter()
            .position(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}: {out}"));
        lines.get(at + 1).copied().unwrap_or_default()
    };
    assert_eq!(
        under("typo"),
        r#"    note: its manifest's field "dependency" is not one the host reads (did you mean "dependencies"?)"#,
        "{out}"
    );
    assert_eq!(
        under("twice"),
        r#"    note: its manifest's field "version" is given twice: the last one counts"#,
        "{out}"
    );
    assert!(out.contains("twice  INITIALIZED  2"), "{out}");
    assert!(!under("fine").starts_with("    note"), "{out}");
    let (code, out, err) = run_forgesyte(&["check", "--json", dir.path_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(serde_json::from_str::<Value>(&out).is_ok(), "{out}");
    assert!(
        err.contains(r#"forgesyte check: plugin typo: its manifest's field "dependency" is not one the host reads"#),
        "{err}"
    );
}
