//! Builds the fixture zoo, so that `cargo test` alone has it on a fresh clone.
//!
//! 1. One `cargo build` of the separate workspace `tests/fixtures/` (tiny
//!    plugin libraries on the SDK), into `$OUT_DIR/fixtures-target`: a
//!    cargo started from a build script needs its own target directory,
//!    since the outer build holds the lock on the shared one.
//! 2. One plugin directory per fixture under `$OUT_DIR/zoo/<fixture>/`: a
//!    `manifest.json` written here and the library copied in (the
//!    manifest-only variants reuse the `good` library).
//! 3. The fault fixtures for process isolation, laid out the same way under
//!    `$OUT_DIR/faults/` (not in the zoo: loading the zoo stays in-process).
//! 4. `$OUT_DIR/zoo.rs`: path constants that `src/lib.rs` includes as
//!    `forgesyte_tests::zoo`, and the `FORGESYTE_ZOO_DIR` env of the crate.

use std::env;
use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

type BuildResult<T> = Result<T, Box<dyn Error>>;

/// The fixture crates of `tests/fixtures/` (package `fixture_<name>`).
const CRATES: &[&str] = &[
    "good",
    "panic_init",
    "err_init",
    "wrong_abi",
    "no_entry",
    "undefined_symbol",
    "faulty",
    "abi_v1",
];

/// How many bytes of the good library the `truncated` fixture keeps.
const TRUNCATED_LEN: usize = 4096;

/// Where a fixture's library file comes from.
enum LibrarySource {
    /// The library built from `tests/fixtures/<crate>`.
    Crate(&'static str),
    /// A text file named like a library.
    NotALibrary,
    /// The first [`TRUNCATED_LEN`] bytes of the good library.
    Truncated,
}

/// One plugin directory of the zoo.
struct Fixture {
    /// Directory name under the zoo, and (upper-cased) the constant's name.
    dir: &'static str,
    /// The manifest's `name` (the registry key).
    name: &'static str,
    library: LibrarySource,
    /// Extra manifest fields, merged over the common ones.
    extra: Value,
    /// What it is for (the constant's doc comment).
    doc: &'static str,
}

fn fixtures() -> Vec<Fixture> {
    use LibrarySource::{Crate, NotALibrary, Truncated};
    let fx = |dir, name, library, extra, doc| Fixture {
        dir,
        name,
        library,
        extra,
        doc,
    };
    vec![
        fx(
            "good",
            "good",
            Crate("good"),
            json!({
                "id": "good",
                "description": "A healthy fixture plugin",
                "author": "ForgeSyte tests",
                "license": "MIT",
                "type": "analysis",
                "capabilities": ["echo"],
                "tools": [
                    {"id": "echo", "title": "Echo", "description": "Returns its arguments",
                     "inputs": {}, "outputs": {}, "input_types": ["json"], "output_types": ["json"]},
                    {"id": "fail", "title": "Fail", "description": "Returns a FixtureError"},
                    {"id": "panic", "title": "Panic", "description": "Panics"},
                    {"id": "sleep", "title": "Sleep", "description": "Sleeps `ms` milliseconds"},
                    {"id": "config", "title": "Config", "description": "Its configuration"},
                ],
            }),
            "A healthy plugin (library `fixture_good`, ABI 3). Tools: `echo` (returns its args), \
             `fail` (returns `FixtureError: fixture tool failed`: the zoo's *tool returns an \
             error*), `panic` (panics with `fixture tool panic`: the zoo's *tool panics*), \
             `sleep` (`{\"ms\": N}` → `{\"slept_ms\": N}`), `config` (the config it got).",
        ),
        fx(
            "panic_init",
            "panic-init",
            Crate("panic_init"),
            json!({}),
            "The constructor panics with `fixture constructor panic`.",
        ),
        fx(
            "err_init",
            "err-init",
            Crate("err_init"),
            json!({}),
            "The constructor returns the error `fixture init failed: missing weights`.",
        ),
        fx(
            "wrong_abi",
            "wrong-abi",
            Crate("wrong_abi"),
            json!({}),
            "The entry returns a vtable with `abi_version` 999 (the host takes 1 and 3).",
        ),
        fx(
            "abi_v1",
            "abi-v1",
            Crate("abi_v1"),
            json!({}),
            "A library of ABI version 1 (JSON only; fingerprint and entry say 1). Tools: \
             `echo` (returns its args; `data` declared binary, so it arrives and comes back \
             as base64) and `len` (`{\"b64_len\": N}`, the length of the base64 `data`).",
        ),
        fx(
            "no_entry",
            "no-entry",
            Crate("no_entry"),
            json!({}),
            "A valid shared library without the `forgesyte_plugin_entry` symbol.",
        ),
        fx(
            "not_a_library",
            "not-a-library",
            NotALibrary,
            json!({}),
            "The library file is a text file.",
        ),
        fx(
            "truncated",
            "truncated",
            Truncated,
            json!({}),
            "The library file is the first 4096 bytes of the good library.",
        ),
        fx(
            "undefined_symbol",
            "undefined-symbol",
            Crate("undefined_symbol"),
            json!({}),
            "The library needs `forgesyte_fixture_missing_symbol`, which nothing defines: \
             `dlopen` fails with `undefined symbol: forgesyte_fixture_missing_symbol`.",
        ),
        fx(
            "missing_lib",
            "missing-lib",
            Crate("good"),
            json!({"dependencies": ["lib:definitely_missing_xyz"]}),
            "The good library, depending on `lib:definitely_missing_xyz`.",
        ),
        fx(
            "needs_gpu",
            "needs-gpu",
            Crate("good"),
            json!({"requires_gpu": true}),
            "The good library, with `requires_gpu: true`.",
        ),
        fx(
            "missing_model",
            "missing-model",
            Crate("good"),
            json!({"models": {"weights": "weights/model.bin"}}),
            "The good library, with model `weights` at `weights/model.bin`, which is absent.",
        ),
        fx(
            "dup_a",
            "duplicate",
            Crate("good"),
            json!({"description": "first of two plugins named duplicate"}),
            "The good library under the name `duplicate` (as is [`DUP_B`]).",
        ),
        fx(
            "dup_b",
            "duplicate",
            Crate("good"),
            json!({"description": "second of two plugins named duplicate"}),
            "The good library under the name `duplicate` (as is [`DUP_A`]).",
        ),
        fx(
            "chain_a",
            "chain-a",
            Crate("good"),
            json!({"version": "1.2.0"}),
            "The good library, version 1.2.0, the root of the chain a ← b ← c.",
        ),
        fx(
            "chain_b",
            "chain-b",
            Crate("good"),
            json!({"version": "1.0.0", "dependencies": ["plugin:chain-a"]}),
            "The good library, version 1.0.0, depending on `plugin:chain-a`.",
        ),
        fx(
            "chain_c",
            "chain-c",
            Crate("good"),
            json!({"dependencies": ["plugin:chain-b@^1"]}),
            "The good library, depending on `plugin:chain-b@^1`.",
        ),
        fx(
            "cycle_x",
            "cycle-x",
            Crate("good"),
            json!({"dependencies": ["plugin:cycle-y"]}),
            "The good library, depending on `plugin:cycle-y` (which depends on it).",
        ),
        fx(
            "cycle_y",
            "cycle-y",
            Crate("good"),
            json!({"dependencies": ["plugin:cycle-x"]}),
            "The good library, depending on `plugin:cycle-x` (which depends on it).",
        ),
    ]
}

/// The fault fixtures: the `faulty` library under manifests that run it in
/// its own process (`isolation: process`), one with every fault as a tool,
/// one per fault at construction, and one in-process plugin whose
/// constructor crashes, with `preflight: true`.
fn fault_fixtures() -> Vec<Fixture> {
    let faulty = |dir, name, extra, doc| Fixture {
        dir,
        name,
        library: LibrarySource::Crate("faulty"),
        extra,
        doc,
    };
    let at_init = |fault: &str, init_timeout_s: f64| {
        json!({
            "isolation": "process",
            "config": {"fault_at_init": fault},
            "limits": {"init_timeout_s": init_timeout_s, "memory_mb": 256},
        })
    };
    vec![
        faulty(
            "faulty",
            "faulty",
            json!({
                "isolation": "process",
                "limits": {"call_timeout_s": 2, "init_timeout_s": 5, "memory_mb": 256,
                           "max_response_mb": 1},
            }),
            "The `faulty` library in its own process (call timeout 2 s, memory 256 MiB, \
             answers up to 1 MiB). Tools: `ok`, `echo`, `sleep`, `pid`, and the faults \
             `segv`, `abort`, `panic_abort`, `overflow`, `exit3`, `hang`, `oom`, \
             `stdout_spam`, `huge`, `corrupt`, `stdin_read`, `panic`; the sandbox probes \
             `read`, `write`, `scratch`, `connect`, `env`.",
        ),
        faulty(
            "init_segv",
            "init-segv",
            at_init("segv", 5.0),
            "Isolated; the constructor writes to page zero (SIGSEGV).",
        ),
        faulty(
            "init_abort",
            "init-abort",
            at_init("abort", 5.0),
            "Isolated; the constructor calls `std::process::abort` (SIGABRT).",
        ),
        faulty(
            "init_overflow",
            "init-overflow",
            at_init("overflow", 5.0),
            "Isolated; the constructor overflows its stack (SIGABRT).",
        ),
        faulty(
            "init_exit3",
            "init-exit3",
            at_init("exit3", 5.0),
            "Isolated; the constructor calls `std::process::exit(3)`.",
        ),
        faulty(
            "init_hang",
            "init-hang",
            at_init("hang", 1.0),
            "Isolated; the constructor never returns (init timeout 1 s).",
        ),
        faulty(
            "init_oom",
            "init-oom",
            at_init("oom", 5.0),
            "Isolated; the constructor allocates past its 256 MiB limit.",
        ),
        faulty(
            "init_panic",
            "init-panic",
            at_init("panic", 5.0),
            "Isolated; the constructor panics (caught by the SDK).",
        ),
        faulty(
            "preflight_segv",
            "preflight-segv",
            json!({"isolation": "in-process", "preflight": true,
                   "config": {"fault_at_init": "segv"}}),
            "In-process with `preflight: true`; the constructor writes to page zero, so \
             preflight must stop it before the library is ever opened in the host.",
        ),
    ]
}

fn main() -> BuildResult<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fixtures_dir = manifest_dir.join("fixtures");
    let sdk_dir = manifest_dir.join("../crates/forgesyte-plugin-sdk");

    println!("cargo:rerun-if-changed=build.rs");
    for file in ["Cargo.toml", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            fixtures_dir.join(file).display()
        );
    }
    for name in CRATES {
        println!(
            "cargo:rerun-if-changed={}",
            fixtures_dir.join(name).display()
        );
    }
    for path in ["Cargo.toml", "build.rs", "src"] {
        println!("cargo:rerun-if-changed={}", sdk_dir.join(path).display());
    }

    let lib_dir = build_fixture_crates(&fixtures_dir, &out_dir.join("fixtures-target"))?;
    let zoo_dir = out_dir.join("zoo");
    let fixtures = fixtures();
    lay_out_zoo(&fixtures, &lib_dir, &zoo_dir)?;
    let faults_dir = out_dir.join("faults");
    let faults = fault_fixtures();
    lay_out_zoo(&faults, &lib_dir, &faults_dir)?;
    let mut rs = zoo_rs(&fixtures, &lib_dir, &zoo_dir);
    rs.push_str(&faults_rs(&faults, &lib_dir, &faults_dir));
    fs::write(out_dir.join("zoo.rs"), rs)?;
    println!("cargo:rustc-env=FORGESYTE_ZOO_DIR={}", zoo_dir.display());
    Ok(())
}

/// File name of the library of fixture crate `name` on this platform.
fn library_file(name: &str) -> String {
    format!(
        "{}fixture_{name}{}",
        env::consts::DLL_PREFIX,
        env::consts::DLL_SUFFIX
    )
}

/// Builds every fixture crate with one cargo run; returns where the
/// libraries are.
fn build_fixture_crates(fixtures_dir: &Path, target_dir: &Path) -> BuildResult<PathBuf> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .arg("build")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(fixtures_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        // `cargo clippy` would otherwise lint the fixtures with its own flags.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "building the fixture zoo failed ({}). If the lock file is out of date, run \
             `cargo update --manifest-path tests/fixtures/Cargo.toml --workspace`.\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(target_dir.join("debug"))
}

/// Writes one plugin directory per fixture under a fresh `zoo_dir`.
fn lay_out_zoo(fixtures: &[Fixture], lib_dir: &Path, zoo_dir: &Path) -> BuildResult<()> {
    if zoo_dir.exists() {
        fs::remove_dir_all(zoo_dir)?;
    }
    let good_lib = lib_dir.join(library_file("good"));
    for fixture in fixtures {
        let dir = zoo_dir.join(fixture.dir);
        fs::create_dir_all(&dir)?;
        let file = fixture_library_file(fixture);
        let target = dir.join(&file);
        match fixture.library {
            LibrarySource::Crate(name) => {
                fs::copy(lib_dir.join(library_file(name)), &target)?;
            }
            LibrarySource::NotALibrary => fs::write(
                &target,
                "This is a text file named like a shared library, not one.\n",
            )?,
            LibrarySource::Truncated => {
                let bytes = fs::read(&good_lib)?;
                let len = bytes.len().min(TRUNCATED_LEN);
                fs::write(&target, &bytes[..len])?;
            }
        }
        let manifest = manifest(fixture, &file);
        fs::write(
            dir.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)? + "\n",
        )?;
    }
    Ok(())
}

/// Name of the library file in the fixture's directory.
fn fixture_library_file(fixture: &Fixture) -> String {
    match fixture.library {
        LibrarySource::Crate(name) => library_file(name),
        LibrarySource::NotALibrary => library_file("not_a_library"),
        LibrarySource::Truncated => library_file("truncated"),
    }
}

/// The fixture's manifest: common fields, then its own.
fn manifest(fixture: &Fixture, library: &str) -> Value {
    let mut manifest = json!({
        "name": fixture.name,
        "version": "1.0.0",
        "description": format!("Fixture plugin {}", fixture.dir),
        "entrypoint": library,
    });
    if let (Some(base), Some(extra)) = (manifest.as_object_mut(), fixture.extra.as_object()) {
        for (key, value) in extra {
            base.insert(key.clone(), value.clone());
        }
    }
    manifest
}

/// The fault fixtures' part of the generated module.
fn faults_rs(fixtures: &[Fixture], lib_dir: &Path, faults_dir: &Path) -> String {
    let mut rs = String::new();
    let mut line = |text: String| {
        rs.push_str(&text);
        rs.push('\n');
    };
    line(String::new());
    line("/// The directory holding the fault fixtures (process isolation).".into());
    line(format!(
        "pub const FAULTS_DIR: &str = {:?};",
        faults_dir.display().to_string()
    ));
    line("/// The `faulty` fixture library as built.".into());
    line(format!(
        "pub const FAULTY_LIBRARY: &str = {:?};",
        lib_dir.join(library_file("faulty")).display().to_string()
    ));
    rs.push_str(&fixture_consts(
        fixtures,
        faults_dir,
        "FAULTS",
        "Every fault fixture, in directory order.",
    ));
    rs
}

/// The generated `zoo` module body.
fn zoo_rs(fixtures: &[Fixture], lib_dir: &Path, zoo_dir: &Path) -> String {
    let mut rs = String::new();
    let mut line = |text: String| {
        rs.push_str(&text);
        rs.push('\n');
    };
    line("// @generated by tests/build.rs; do not edit.".into());
    line(String::new());
    line("/// The directory holding every fixture's plugin directory: load it whole".into());
    line("/// to see them all in one pass.".into());
    line(format!(
        "pub const ZOO_DIR: &str = {:?};",
        zoo_dir.display().to_string()
    ));
    line("/// The good fixture library as built, outside the zoo.".into());
    line(format!(
        "pub const GOOD_LIBRARY: &str = {:?};",
        lib_dir.join(library_file("good")).display().to_string()
    ));
    line(String::new());
    line("/// One fixture of the zoo.".into());
    line("#[derive(Debug, Clone, Copy, PartialEq, Eq)]".into());
    line("pub struct Fixture {".into());
    line("    /// Name of the constant holding its directory.".into());
    line("    pub constant: &'static str,".into());
    line("    /// Its plugin directory (absolute).".into());
    line("    pub dir: &'static str,".into());
    line("    /// The manifest's `name`: the registry key.".into());
    line("    pub name: &'static str,".into());
    line("    /// The library's file name, as the manifest's `entrypoint` gives it.".into());
    line("    pub library: &'static str,".into());
    line("}".into());
    rs.push_str(&fixture_consts(
        fixtures,
        zoo_dir,
        "ALL",
        "Every fixture, in directory order.",
    ));
    rs
}

/// Per fixture a directory constant (`X`, under `root`) and a name constant
/// (`X_NAME`), then the list `list` of them all, sorted by directory.
fn fixture_consts(fixtures: &[Fixture], root: &Path, list: &str, list_doc: &str) -> String {
    let mut rs = String::new();
    for fixture in fixtures {
        let constant = fixture.dir.to_uppercase();
        let dir = root.join(fixture.dir).display().to_string();
        let _ = writeln!(rs);
        let _ = writeln!(rs, "/// `{}`: {}", fixture.dir, fixture.doc);
        let _ = writeln!(rs, "pub const {constant}: &str = {dir:?};");
        let _ = writeln!(rs, "/// Registry name of [`{constant}`].");
        let _ = writeln!(rs, "pub const {constant}_NAME: &str = {:?};", fixture.name);
    }
    let _ = writeln!(rs);
    let _ = writeln!(rs, "/// {list_doc}");
    let _ = writeln!(rs, "pub const {list}: &[Fixture] = &[");
    let mut sorted: Vec<&Fixture> = fixtures.iter().collect();
    sorted.sort_by_key(|f| f.dir);
    for fixture in sorted {
        let constant = fixture.dir.to_uppercase();
        let _ = writeln!(
            rs,
            "    Fixture {{ constant: {constant:?}, dir: {constant}, name: {constant}_NAME, \
             library: {:?} }},",
            fixture_library_file(fixture)
        );
    }
    let _ = writeln!(rs, "];");
    rs
}
