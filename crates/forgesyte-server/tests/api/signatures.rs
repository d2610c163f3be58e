//! Plugin signatures through the real binary: `forgesyte keygen` and
//! `forgesyte sign`, every signature status in `check --json` and the
//! served health, and `--require-signed` refusing all but `signed`
//! plugins before any of their code runs.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::{Forgesyte, PluginsDir, good_library_name, plugin_named, run_forgesyte};

fn forgesyte(args: &[&str]) -> (i32, String, String) {
    run_forgesyte(args, &[])
}

/// `forgesyte keygen --unencrypted` into `dir` as `name`: the key id.
fn keygen(dir: &Path, name: &str) -> String {
    let (code, out, err) = forgesyte(&[
        "keygen",
        "--out",
        dir.to_str().unwrap(),
        "--name",
        name,
        "--unencrypted",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Key id "))
        .unwrap_or_else(|| panic!("no key id in {out}"));
    assert_eq!(id.len(), 16, "{id}");
    id.to_owned()
}

fn sign(dir: &Path, key: &Path) {
    let (code, out, err) = forgesyte(&[
        "sign",
        dir.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Signed "), "{out}");
}

/// A server of `plugins` trusting the keys of `trusted`, its load over.
fn serve_trusting(plugins: &str, trusted: &Path) -> Forgesyte {
    let server = Forgesyte::start(&[
        "--plugins",
        plugins,
        "--trusted-keys",
        trusted.to_str().unwrap(),
    ]);
    server.wait_loaded();
    server
}

/// `KEYS/trusted`, a trust store holding the key pair `author`'s public
/// key (made in `KEYS` by `keygen`) and no other.
fn trust_only_author(keys: &Path) -> PathBuf {
    let trusted = keys.join("trusted");
    std::fs::create_dir(&trusted).unwrap();
    std::fs::copy(keys.join("author.pub"), trusted.join("author.pub")).unwrap();
    trusted
}

/// The environment that trusts `trusted` and requires signatures.
fn require_signed_env(trusted: &Path) -> [(&'static str, &str); 2] {
    [
        ("FORGESYTE_TRUSTED_KEYS", trusted.to_str().unwrap()),
        ("FORGESYTE_REQUIRE_SIGNED", "true"),
    ]
}

/// A Python plugin whose import leaves a file `ran` beside it: proof that
/// its code ran (or, absent, that it did not).
fn marker_plugin(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        // Its runner may write its marker into its own directory (the
        // sandbox allows writes to its scratch directory only otherwise).
        json!({"name": name, "runtime": "python", "filesystem": {"write": ["."]}}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("plugin.py"),
        "import pathlib\n\
         pathlib.Path(__file__).with_name('ran').write_text('imported')\n\
         class Plugin:\n    name = 'marker'\n    tools = {}\n    def run_tool(self, tool, args):\n        return {}\n",
    )
    .unwrap();
    dir
}

/// A Python plugin in `dir` (made if missing): `manifest.json` and
/// `plugin.py` holding `source`.
fn python_plugin(dir: &Path, manifest: &Value, source: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(dir.join("plugin.py"), source).unwrap();
}

/// The pin of a Python tree in `dir` holding `files` (relative paths):
/// SHA-256 of its listing, one `sha256  path` line per file, sorted by path
/// (README, "Integrity").
fn tree_pin(dir: &Path, files: &[String]) -> String {
    let mut files = files.to_vec();
    files.sort();
    let listing: String = files
        .iter()
        .map(|rel| {
            format!(
                "{}  {rel}\n",
                crate::python::sha256(&std::fs::read(dir.join(rel)).unwrap())
            )
        })
        .collect();
    crate::python::sha256(listing.as_bytes())
}

struct Signed {
    plugins: PluginsDir,
    keys: tempfile::TempDir,
    trusted: PathBuf,
    author: String,
    other: String,
}

/// Plugins in every signature status: `n-signed`, `p-signed` (signed by
/// the trusted author), `n-modified` (library changed after signing),
/// `n-untrusted` (signed by another key), `n-forged` (list edited after
/// signing), `p-unsigned`.
fn every_status() -> Signed {
    let plugins = PluginsDir::new();
    plugins
        .good("n-signed", json!({}))
        .good("n-modified", json!({}))
        .good("n-untrusted", json!({}))
        .good("n-forged", json!({}))
        .python("p-signed", "echo")
        .python("p-unsigned", "echo");
    let keys = tempfile::tempdir().unwrap();
    let author = keygen(keys.path(), "author");
    let other = keygen(keys.path(), "other");
    let key = keys.path().join("author.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the secret key is private");
    let root = plugins.path();
    for name in ["n-signed", "n-modified", "n-forged", "p-signed"] {
        sign(&root.join(name), &key);
    }
    sign(&root.join("n-untrusted"), &keys.path().join("other.key"));
    // Changed after signing: one byte more in the library.
    let mut lib = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("n-modified").join(good_library_name()))
        .unwrap();
    lib.write_all(b"\0").unwrap();
    // The list edited after signing (a digest to match some other file).
    let list = root.join("n-forged/forgesyte.sig.list");
    let text = std::fs::read_to_string(&list).unwrap();
    let first = &text[..1];
    std::fs::write(
        &list,
        text.replacen(first, if first == "0" { "1" } else { "0" }, 1),
    )
    .unwrap();
    // The server trusts the author's public key only.
    let trusted = trust_only_author(keys.path());
    Signed {
        plugins,
        keys,
        trusted,
        author,
        other,
    }
}

#[test]
fn check_reports_every_signature_status_and_loads_them_all_by_default() {
    let s = every_status();
    let (code, out, err) = forgesyte(&[
        "check",
        "--json",
        "--trusted-keys",
        s.trusted.to_str().unwrap(),
        s.plugins.path_str(),
    ]);
    assert_eq!(code, 0, "the default only reports: {out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    for p in list.as_array().unwrap() {
        assert_eq!(p["state"], "INITIALIZED", "{p:#}");
    }
    let signature = |name: &str| plugin_named(&list, name)["signature"].clone();
    for name in ["n-signed", "p-signed"] {
        assert_eq!(
            signature(name),
            json!({"status": "signed", "key_id": s.author, "detail": null}),
            "{name}"
        );
    }
    let modified = signature("n-modified");
    assert_eq!(modified["status"], "modified");
    assert_eq!(modified["key_id"], s.author.as_str());
    assert!(
        modified["detail"].as_str().unwrap().starts_with(&format!(
            "{} changed after signing (sha256 now ",
            good_library_name()
        )),
        "{modified}"
    );
    let untrusted = signature("n-untrusted");
    assert_eq!(untrusted["status"], "invalid");
    assert_eq!(untrusted["key_id"], s.other.as_str());
    assert_eq!(
        untrusted["detail"],
        format!(
            "signed by key {}, which is not among the trusted keys of {}",
            s.other,
            s.trusted.display()
        )
    );
    let forged = signature("n-forged");
    assert_eq!(forged["status"], "invalid");
    assert!(
        forged["detail"]
            .as_str()
            .unwrap()
            .starts_with("the signature of forgesyte.sig.list does not verify"),
        "{forged}"
    );
    assert_eq!(
        signature("p-unsigned"),
        json!({
            "status": "unsigned",
            "key_id": null,
            "detail": "no forgesyte.sig.list and no forgesyte.sig.list.minisig"
        })
    );
    drop(s.keys);
}

#[test]
fn require_signed_refuses_all_but_signed_plugins_with_the_reason() {
    let s = every_status();
    let (code, out, err) = forgesyte(&[
        "check",
        "--json",
        "--require-signed",
        "--trusted-keys",
        s.trusted.to_str().unwrap(),
        s.plugins.path_str(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    for name in ["n-signed", "p-signed"] {
        assert_eq!(
            plugin_named(&list, name)["state"],
            "INITIALIZED",
            "{list:#}"
        );
    }
    for (name, status) in [
        ("n-modified", "modified"),
        ("n-untrusted", "invalid"),
        ("n-forged", "invalid"),
        ("p-unsigned", "unsigned"),
    ] {
        let p = plugin_named(&list, name);
        assert_eq!(p["state"], "FAILED", "{p:#}");
        let detail = p["signature"]["detail"].as_str().unwrap();
        assert_eq!(
            p["reason"],
            format!("IntegrityError: signature required, but the plugin is {status}: {detail}"),
            "{p:#}"
        );
    }
}

#[test]
fn a_refused_plugin_never_runs_and_a_signed_one_does_through_the_environment() {
    let plugins = PluginsDir::new();
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "author");
    let trusted = trust_only_author(keys.path());
    let signed = marker_plugin(plugins.path(), "marked-signed");
    sign(&signed, &keys.path().join("author.key"));
    let unsigned = marker_plugin(plugins.path(), "marked-unsigned");
    let env = require_signed_env(&trusted);
    let (code, out, err) = run_forgesyte(&["check", "--json", plugins.path_str()], &env);
    assert_eq!(code, 1, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plugin_named(&list, "marked-signed")["state"], "INITIALIZED");
    assert_eq!(plugin_named(&list, "marked-unsigned")["state"], "FAILED");
    assert!(
        signed.join("ran").exists(),
        "the signed plugin was imported"
    );
    assert!(
        !unsigned.join("ran").exists(),
        "the refused plugin's code ran"
    );
}

/// An unsigned plugin naming an interpreter of its own (its own file, which
/// the dependency check would run) is refused before that file runs.
#[test]
fn a_refused_plugins_own_interpreter_never_runs() {
    let plugins = PluginsDir::new();
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "author");
    let trusted = trust_only_author(keys.path());
    let dir = marker_plugin(plugins.path(), "own-python");
    let interpreter = dir.join("python.sh");
    std::fs::write(
        &interpreter,
        format!(
            "#!/bin/sh\necho ran > {}\nexec python3 \"$@\"\n",
            dir.join("interpreter-ran").display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&interpreter, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let manifest = json!({"name": "own-python", "runtime": "python", "python": "python.sh",
                          "dependencies": ["json"]});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let env = require_signed_env(&trusted);
    let (code, out, err) = run_forgesyte(&["check", "--json", plugins.path_str()], &env);
    assert_eq!(code, 1, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let p = plugin_named(&list, "own-python");
    assert_eq!(p["state"], "FAILED", "{p:#}");
    assert!(
        p["reason"]
            .as_str()
            .unwrap_or("")
            .contains("signature required"),
        "{p:#}"
    );
    assert!(
        !dir.join("interpreter-ran").exists(),
        "the refused plugin's interpreter ran"
    );

    // Signed, it is still refused before its interpreter runs: a signature
    // does not cover an interpreter in the plugin's own directory (nor a
    // virtual environment's `.pth` files and packages), which would run
    // before and beside the signed files.
    sign(&dir, &keys.path().join("author.key"));
    let refused_inside = |env: &[(&str, &str)], covered_by: &str| {
        let (code, out, err) = run_forgesyte(&["check", "--json", plugins.path_str()], env);
        assert_eq!(code, 1, "{out}{err}");
        let list: Value = serde_json::from_str(&out).unwrap();
        let p = plugin_named(&list, "own-python");
        let reason = p["reason"].as_str().unwrap_or("");
        assert!(
            reason
                .starts_with("IntegrityError: its interpreter python.sh lies in its own directory")
                && reason.contains(&format!("which {covered_by} does not cover")),
            "{p:#}"
        );
        assert!(
            !dir.join("interpreter-ran").exists(),
            "the refused plugin's interpreter ran"
        );
    };
    refused_inside(&env, "its signature (--require-signed)");
    // So is a pinned one, without --require-signed.
    let (code, out, err) = run_forgesyte(&["lock", plugins.path_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    refused_inside(&[], "its pin");
    // Neither required nor pinned, its interpreter runs as before (its
    // import then fails to write beside itself: this manifest asks for no
    // write there).
    std::fs::remove_file(plugins.path().join("forgesyte.lock")).unwrap();
    let (_, out, err) = run_forgesyte(&["check", "--json", plugins.path_str()], &[]);
    assert!(!out.contains("lies in its own directory"), "{out}{err}");
    assert!(dir.join("interpreter-ran").exists(), "{out}{err}");
}

#[test]
fn serve_shows_the_signature_in_health_and_list() {
    let s = every_status();
    let server = serve_trusting(s.plugins.path_str(), &s.trusted);
    let health = server.get("/v1/plugins/n-signed/health").json();
    assert_eq!(
        health["signature"],
        json!({"status": "signed", "key_id": s.author, "detail": null})
    );
    let list = server.get("/v1/plugins").json();
    assert_eq!(
        plugin_named(&list, "n-untrusted")["signature"]["status"],
        "invalid"
    );
    // The OpenAPI document describes the field.
    let doc = server.get("/openapi.json").json();
    let status = &doc["components"]["schemas"]["PluginStatus"]["properties"]["signature"];
    assert!(
        !status.is_null(),
        "{:#}",
        doc["components"]["schemas"]["PluginStatus"]
    );
    assert!(
        doc["components"]["schemas"]["Signature"]["properties"]["key_id"].is_object(),
        "{:#}",
        doc["components"]["schemas"]
    );
}

#[test]
fn keygen_wants_a_password_or_unencrypted_and_a_bad_trust_store_is_a_usage_error() {
    let keys = tempfile::tempdir().unwrap();
    let out_dir = keys.path().to_str().unwrap();
    let (code, _, err) = forgesyte(&["keygen", "--out", out_dir]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("FORGESYTE_KEY_PASSWORD"), "{err}");
    assert!(!keys.path().join("forgesyte.key").exists());
    std::fs::write(keys.path().join("broken.pub"), "not a key\n").unwrap();
    let plugins = PluginsDir::new();
    // `check` and `serve` alike refuse to start.
    for command in ["check", "serve"] {
        let (code, _, err) = match command {
            "check" => forgesyte(&["check", "--trusted-keys", out_dir, plugins.path_str()]),
            _ => forgesyte(&[
                "serve",
                "--trusted-keys",
                out_dir,
                "--plugins",
                plugins.path_str(),
                "--bind",
                "127.0.0.1:0",
            ]),
        };
        assert_eq!(code, 2, "{command}: {err}");
        assert!(
            err.contains(&format!(
                "trusted key {}",
                keys.path().join("broken.pub").display()
            )),
            "{command}: {err}"
        );
    }
    // A key's file name is one name, never a path.
    let (code, _, err) = forgesyte(&[
        "keygen",
        "--out",
        out_dir,
        "--name",
        "../escaped",
        "--unencrypted",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(!keys.path().join("../escaped.pub").exists());
    // `--out` naming a file: said so (it read "File exists").
    let file = keys.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, err) = forgesyte(&["keygen", "--out", file.to_str().unwrap(), "--unencrypted"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("it is not a directory"), "{err}");
}

/// A FIFO named `*.pub` in the trust store is refused at once, as any key
/// that cannot be read (it waited for a writer: `check` never ended,
/// `serve` never listened, and at a rescan every later reload was refused
/// as "another reload is running").
#[test]
fn a_fifo_in_the_trust_store_is_refused_without_waiting() {
    let keys = tempfile::tempdir().unwrap();
    crate::support::make_fifo(&keys.path().join("jam.pub"));
    let plugins = PluginsDir::new();
    let keys_dir = keys.path().to_str().unwrap();
    let (code, _, err) = crate::support::run_forgesyte_within(
        &["check", "--trusted-keys", keys_dir, plugins.path_str()],
        20,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("jam.pub") && err.contains("not a regular file"),
        "{err}"
    );
}

/// The trust store is read again by every rescan: a key taken out of it
/// revokes what it signed at the next `SIGHUP` (under `--require-signed`
/// its plugins are FAILED, naming the key), and a key put back restores
/// them.
#[test]
fn a_rescan_reads_the_trusted_keys_again_and_checks_signed_plugins_again() {
    let s = every_status();
    let server = Forgesyte::start(&[
        "--plugins",
        s.plugins.path_str(),
        "--trusted-keys",
        s.trusted.to_str().unwrap(),
        "--require-signed",
    ]);
    server.wait_loaded();
    let health = |name: &str| server.get(&format!("/v1/plugins/{name}/health")).json();
    assert_eq!(health("n-signed")["state"], "INITIALIZED");
    let key = s.trusted.join("author.pub");
    let saved = std::fs::read(&key).unwrap();

    // The author's key revoked.
    std::fs::remove_file(&key).unwrap();
    crate::rescan::hangup(&server);
    let limit = std::time::Duration::from_secs(20);
    crate::rescan::wait_for("the revocation", limit, &server, || {
        (health("n-signed")["state"] == "FAILED").then_some(())
    });
    let revoked = health("n-signed");
    let reason = revoked["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("IntegrityError: signature required")
            && reason.contains(&s.author)
            && reason.contains("not among the trusted keys"),
        "{revoked}"
    );
    assert_eq!(revoked["signature"]["status"], "invalid", "{revoked}");
    assert!(
        server
            .log()
            .contains("The trusted keys changed: the plugins they signed are checked again"),
        "{}",
        server.log()
    );

    // Put back: trusted again.
    std::fs::write(&key, &saved).unwrap();
    crate::rescan::hangup(&server);
    crate::rescan::wait_for("the key's return", limit, &server, || {
        ["n-signed", "p-signed"]
            .iter()
            .all(|name| health(name)["state"] == "INITIALIZED")
            .then_some(())
    });
    assert_eq!(health("n-signed")["signature"]["status"], "signed");
}

/// A reload (here of one other plugin) reads the trusted keys again, and
/// checks again every plugin a key that changed signed, the in-process
/// one included: a revoked key's plugins are FAILED then. Before, the
/// reload took the new keys without checking them, so the next rescan,
/// which compares with the keys as last read, found nothing changed and
/// left them running, signed.
#[test]
fn a_reload_after_a_revocation_checks_what_the_key_signed() {
    let s = every_status();
    let token = "a-long-enough-admin-token";
    let server = Forgesyte::start_with_env(
        &[
            "--plugins",
            s.plugins.path_str(),
            "--trusted-keys",
            s.trusted.to_str().unwrap(),
            "--require-signed",
        ],
        &[("FORGESYTE_ADMIN_TOKEN", token)],
    );
    server.wait_loaded();
    let health = |name: &str| server.get(&format!("/v1/plugins/{name}/health")).json();
    for name in ["n-signed", "p-signed"] {
        assert_eq!(health(name)["state"], "INITIALIZED", "{name}");
    }
    std::fs::remove_file(s.trusted.join("author.pub")).unwrap();
    let header = format!("Bearer {token}");
    let reply = crate::support::try_http_with(
        server.addr,
        "POST",
        "/v1/plugins/p-unsigned/reload",
        &[("authorization", header.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    crate::rescan::hangup(&server);
    let limit = std::time::Duration::from_secs(20);
    crate::rescan::wait_for("the revocation", limit, &server, || {
        ["n-signed", "p-signed"]
            .iter()
            .all(|name| health(name)["state"] == "FAILED")
            .then_some(())
    });
    for name in ["n-signed", "p-signed"] {
        let shown = health(name);
        assert_eq!(shown["signature"]["status"], "invalid", "{shown}");
        let refused = server.run(name, "echo", r#"{"args": {}}"#);
        assert_ne!(refused.status, 200, "{name}: {}", refused.text());
    }
}

#[test]
fn require_signed_refuses_an_isolated_library_that_loads_what_it_ships_beside_it() {
    // A library with `$ORIGIN` in its run path starts from its file and
    // loads the libraries beside it from theirs, which no signature covers.
    // (The library is no plugin: it is refused before any runner starts.)
    let plugins = PluginsDir::new();
    let dir = plugins.path().join("shipper");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("lib.c"),
        "int forgesyte_nothing(void) { return 0; }\n",
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .current_dir(&dir)
        .args([
            "-shared",
            "-fPIC",
            "-o",
            "libshipper.so",
            "lib.c",
            "-Wl,-rpath,$ORIGIN",
        ])
        .status()
        .expect("cc, to build a library with an $ORIGIN run path");
    assert!(built.success());
    std::fs::write(
        dir.join("manifest.json"),
        json!({"name": "shipper", "entrypoint": "libshipper.so", "isolation": "process"})
            .to_string(),
    )
    .unwrap();
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "author");
    let trusted = trust_only_author(keys.path());
    sign(&dir, &keys.path().join("author.key"));
    let env = require_signed_env(&trusted);
    let (code, out, err) = run_forgesyte(&["check", "--json", plugins.path_str()], &env);
    assert_eq!(code, 1, "{out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let p = plugin_named(&list, "shipper");
    assert_eq!(p["state"], "FAILED", "{p:#}");
    assert_eq!(p["signature"]["status"], "signed", "{p:#}");
    let reason = p["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("IntegrityError: signature required, but the plugin is signed in part")
            && reason.contains("$ORIGIN"),
        "{p:#}"
    );
}

/// A signed or pinned Python plugin imports only its checked sources,
/// whenever it imports them: a helper module swapped after the load (and
/// imported lazily, inside a call) or one added beside the checked ones is
/// refused by the runner (a tool error naming the file), never run; the
/// checked helper still runs. Before, the host checked the files once,
/// after the runner started, and a module imported later ran whatever was
/// on disk then.
#[test]
fn a_signed_or_pinned_python_plugin_imports_only_its_checked_sources() {
    let plugins = PluginsDir::new();
    let root = plugins.path().to_path_buf();
    let lazy = |name: &str| {
        let dir = root.join(name);
        python_plugin(
            &dir,
            &json!({"name": name, "runtime": "python"}),
            "class Plugin:\n    name = 'lazy'\n    tools = {'who': {'description': 'd'}, 'extra': {'description': 'd'}}\n    \
             def run_tool(self, tool, args):\n        \
             if tool == 'who':\n            import helper\n            return {'who': helper.WHO}\n        \
             import added\n        return {'who': added.WHO}\n",
        );
        std::fs::write(dir.join("helper.py"), "WHO = 'checked'\n").unwrap();
        dir
    };
    let signed = lazy("signed");
    let pinned = lazy("pinned");
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "author");
    sign(&signed, &keys.path().join("author.key"));
    let pin = tree_pin(&pinned, &["helper.py".into(), "plugin.py".into()]);
    std::fs::write(
        pinned.join("manifest.json"),
        json!({"name": "pinned", "runtime": "python", "sha256": pin}).to_string(),
    )
    .unwrap();
    let trusted = trust_only_author(keys.path());
    let server = serve_trusting(plugins.path_str(), &trusted);
    for name in ["signed", "pinned"] {
        let health = server.get(&format!("/v1/plugins/{name}/health")).json();
        assert_eq!(health["state"], "INITIALIZED", "{health}");
        // Swapped after the load, then imported for the first time.
        let dir = root.join(name);
        std::fs::write(dir.join("helper.py"), "WHO = 'swapped'\n").unwrap();
        std::fs::write(dir.join("added.py"), "WHO = 'added'\n").unwrap();
        for (tool, file, why) in [
            ("who", "helper.py", "changed since"),
            (
                "extra",
                "added.py",
                "is not among the plugin's checked files",
            ),
        ] {
            let reply = server.run(name, tool, r#"{"args": {}}"#);
            assert_eq!(reply.status, 422, "{name} {tool}: {}", reply.text());
            let body = reply.json();
            assert_eq!(body["error_type"], "ImportError", "{body}");
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(file) && detail.contains(why), "{detail}");
        }
        // Put back as checked, it runs.
        std::fs::write(dir.join("helper.py"), "WHO = 'checked'\n").unwrap();
        let reply = server.run(name, "who", r#"{"args": {}}"#);
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_eq!(reply.json()["result"]["who"], "checked");
    }
}

/// A signed manifest's path inside the plugin's directory that a link
/// turned into a way out after signing (`data/settings.cfg` → a file
/// outside) is refused, naming it: the signature covers the manifest's
/// text, not where the link leads. The same manifest with the file in
/// place is served.
#[test]
fn a_signed_path_that_a_link_leads_out_of_the_plugin_is_refused() {
    let plugins = PluginsDir::new();
    let root = plugins.path().to_path_buf();
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "author");
    let outside = keys.path().join("secret.txt");
    std::fs::write(&outside, "secret").unwrap();
    for name in ["reader", "linked"] {
        let dir = root.join(name);
        python_plugin(
            &dir,
            &json!({"name": name, "runtime": "python",
                    "filesystem": {"read": ["data/settings.cfg"]}}),
            "class Plugin:\n    name = 'r'\n    tools = {}\n    def run_tool(self, tool, args):\n        return {}\n",
        );
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("data/settings.cfg"), "mode = 1\n").unwrap();
        sign(&dir, &keys.path().join("author.key"));
    }
    let link = root.join("linked/data/settings.cfg");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let trusted = trust_only_author(keys.path());
    let server = serve_trusting(plugins.path_str(), &trusted);
    let reader = server.get("/v1/plugins/reader/health").json();
    assert_eq!(reader["state"], "INITIALIZED", "{reader}");
    let linked = server.get("/v1/plugins/linked/health").json();
    assert_eq!(linked["state"], "FAILED", "{linked}");
    assert_eq!(linked["signature"]["status"], "signed", "{linked}");
    let reason = linked["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(
            "reading data/settings.cfg (a link leads it out of the plugin's directory), which \
             this server grants"
        ) && reason.contains("--sandbox-widening allow"),
        "{reason}"
    );
}

/// A pinned Python plugin of 2,000 source files starts, with its zygote
/// and without: its checked sources reach the runner in a memory file (on
/// the command line, 90 bytes a file, they passed Linux's 128 KiB limit on
/// one argument near 1,400 files, and the runner could not start).
#[test]
fn a_pinned_python_plugin_of_thousands_of_files_starts() {
    let plugins = PluginsDir::new();
    let dir = plugins.path().join("big");
    std::fs::create_dir_all(dir.join("vendored")).unwrap();
    std::fs::write(
        dir.join("plugin.py"),
        "import vendored.m1999\nclass Plugin:\n    name = 'big'\n    tools = {'n': {'description': 'd'}}\n    \
         def run_tool(self, tool, args):\n        return {'n': vendored.m1999.N}\n",
    )
    .unwrap();
    std::fs::write(dir.join("vendored/__init__.py"), "").unwrap();
    for i in 0..2000 {
        std::fs::write(dir.join(format!("vendored/m{i}.py")), format!("N = {i}\n")).unwrap();
    }
    let files: Vec<String> = ["plugin.py".to_owned(), "vendored/__init__.py".to_owned()]
        .into_iter()
        .chain((0..2000).map(|i| format!("vendored/m{i}.py")))
        .collect();
    let pin = tree_pin(&dir, &files);
    std::fs::write(
        dir.join("manifest.json"),
        json!({"name": "big", "runtime": "python", "sha256": pin}).to_string(),
    )
    .unwrap();
    for zygote in ["1", "0"] {
        let server = Forgesyte::start_with_env(
            &["--plugins", plugins.path_str()],
            &[("FORGESYTE_PYTHON_ZYGOTE", zygote)],
        );
        server.wait_loaded();
        let health = server.get("/v1/plugins/big/health").json();
        assert_eq!(health["state"], "INITIALIZED", "zygote {zygote}: {health}");
        let reply = server.run("big", "n", r#"{"args": {}}"#);
        assert_eq!(reply.status, 200, "zygote {zygote}: {}", reply.text());
        assert_eq!(reply.json()["result"]["n"], 1999);
    }
}

/// An unsigned directory that sorts first and claims a signed plugin's
/// name does not take it: the signed plugin claims its name first, and the
/// impostor is the duplicate (it used to serve under the name, and under
/// `--require-signed` to make the signed plugin FAILED as the duplicate).
#[test]
fn an_unsigned_directory_cannot_take_a_signed_plugins_name() {
    let plugins = PluginsDir::new();
    let root = plugins.path().to_path_buf();
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "author");
    for (dir, who) in [("victim", "signed"), ("aaa", "impostor")] {
        let dir = root.join(dir);
        python_plugin(
            &dir,
            &json!({"name": "victim", "runtime": "python"}),
            &format!(
                "class Plugin:\n    name = 'victim'\n    tools = {{'who': {{'description': 'd'}}}}\n    \
                 def run_tool(self, tool, args):\n        return {{'who': '{who}'}}\n"
            ),
        );
    }
    sign(&root.join("victim"), &keys.path().join("author.key"));
    let trusted = trust_only_author(keys.path());
    for require in [false, true] {
        let mut args = vec![
            "--plugins",
            plugins.path_str(),
            "--trusted-keys",
            trusted.to_str().unwrap(),
        ];
        if require {
            args.push("--require-signed");
        }
        let server = Forgesyte::start(&args);
        server.wait_loaded();
        let health = server.get("/v1/plugins/victim/health").json();
        assert_eq!(health["state"], "INITIALIZED", "{require}: {health}");
        assert_eq!(health["signature"]["status"], "signed", "{health}");
        let reply = server.run("victim", "who", r#"{"args": {}}"#);
        assert_eq!(reply.json()["result"]["who"], "signed", "{}", reply.text());
        let list = server.get("/v1/plugins").json();
        let duplicate = list
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] != "victim")
            .unwrap_or_else(|| panic!("no entry for the impostor: {list}"));
        assert_eq!(duplicate["state"], "FAILED", "{duplicate}");
        assert!(
            duplicate["reason"]
                .as_str()
                .is_some_and(|r| r.contains("duplicate plugin name")),
            "{duplicate}"
        );
    }
}

/// `sign` says what is wrong as `lock` does: a library that is not in the
/// plugin's directory (the server finds it on `--lib-path`), and a public
/// key given as `--key` (it said "failed to fill whole buffer").
#[test]
fn sign_names_a_library_outside_the_directory_and_a_public_key() {
    let plugins = PluginsDir::new();
    plugins.good("elsewhere", json!({"entrypoint": "libelsewhere.so"}));
    plugins.good("here", json!({}));
    let keys = plugins.path().join("keys");
    keygen(&keys, "author");
    let run = |plugin: &str, key: &str| {
        forgesyte(&[
            "sign",
            plugins.path().join(plugin).to_str().unwrap(),
            "--key",
            keys.join(key).to_str().unwrap(),
        ])
    };
    let (code, out, err) = run("elsewhere", "author.key");
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("library libelsewhere.so is not in the plugin directory"),
        "{err}"
    );
    let (code, out, err) = run("here", "author.pub");
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("author.pub is a public key (the .pub file)"),
        "{err}"
    );
    // A password set and --unencrypted: which one was meant is not guessed.
    let (code, _, err) = run_forgesyte(
        &[
            "keygen",
            "--out",
            keys.to_str().unwrap(),
            "--name",
            "both",
            "--unencrypted",
        ],
        &[("FORGESYTE_KEY_PASSWORD", "secret")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is set, and --unencrypted"), "{err}");
    assert!(!keys.join("both.key").exists());
}

/// A password variable set to nothing is said as such: `keygen` does not
/// ask for the variable to be set (it is), `sign` of an encrypted key says
/// it is empty (of an unencrypted one, nothing); with `--unencrypted` an
/// empty one is no password.
/// One that is not UTF-8 is a usage error.
#[test]
fn an_empty_or_undecodable_key_password_is_said_as_such() {
    use std::os::unix::ffi::OsStrExt as _;
    let keys = tempfile::tempdir().unwrap();
    let out = keys.path().to_str().unwrap();
    let (code, _, err) = run_forgesyte(
        &["keygen", "--out", out, "--name", "blank"],
        &[("FORGESYTE_KEY_PASSWORD", "")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("FORGESYTE_KEY_PASSWORD is empty: set it to a password"),
        "{err}"
    );
    assert!(!keys.path().join("blank.key").exists());
    // Empty and --unencrypted: an unencrypted key.
    let (code, _, err) = run_forgesyte(
        &["keygen", "--out", out, "--name", "plain", "--unencrypted"],
        &[("FORGESYTE_KEY_PASSWORD", "")],
    );
    assert_eq!(code, 0, "{err}");
    // An encrypted key, then signed with the variable empty.
    let (code, _, err) = run_forgesyte(
        &["keygen", "--out", out, "--name", "locked"],
        &[("FORGESYTE_KEY_PASSWORD", "secret")],
    );
    assert_eq!(code, 0, "{err}");
    let plugins = PluginsDir::new();
    plugins.good("p", json!({}));
    let dir = plugins.path().join("p");
    let key = keys.path().join("locked.key");
    let sign_args = [
        "sign",
        dir.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let (code, _, err) = run_forgesyte(&sign_args, &[("FORGESYTE_KEY_PASSWORD", "")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("and FORGESYTE_KEY_PASSWORD is set, but empty: set it to the key's password"),
        "{err}"
    );
    assert!(!dir.join("forgesyte.sig.list.minisig").exists());
    // An unencrypted key signs whatever the empty variable.
    let plain = keys.path().join("plain.key");
    let (code, _, err) = run_forgesyte(
        &[
            "sign",
            dir.to_str().unwrap(),
            "--key",
            plain.to_str().unwrap(),
        ],
        &[("FORGESYTE_KEY_PASSWORD", "")],
    );
    assert_eq!(code, 0, "{err}");
    std::fs::remove_file(dir.join("forgesyte.sig.list.minisig")).unwrap();
    let bad = std::ffi::OsStr::from_bytes(b"\xff\xfe");
    let status = crate::support::forgesyte_command()
        .args(sign_args)
        .env("FORGESYTE_KEY_PASSWORD", bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(2), "{err}");
    assert!(
        err.contains("forgesyte sign: FORGESYTE_KEY_PASSWORD is not valid UTF-8"),
        "{err}"
    );
}
