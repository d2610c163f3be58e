//! Building what the benchmark runs: the release `forgesyte` binary and the
//! bench plugin library (`plugin/`, a Cargo workspace of its own).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The workspace root (this crate sits at `crates/forgesyte-bench`).
pub fn workspace_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .nth(2)
        .map_or_else(|| crate_dir.join("../.."), Path::to_path_buf)
}

/// The workspace's target directory: `CARGO_TARGET_DIR` when set, else
/// `target/` under the workspace root.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn run_cargo(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run cargo to build {what}"))?;
    if !output.status.success() {
        bail!(
            "building {what} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Builds the release `forgesyte` binary (and, beside it, the
/// `image-stats` example library the frames figures send images to) and
/// returns its path.
///
/// It builds `forgesyte-server` together with `forgesyte-bench` so Cargo
/// unifies features exactly as for `cargo run --release -p forgesyte-bench`,
/// which has built every dependency already: only the binary is linked.
///
/// # Errors
///
/// When cargo cannot be run or the build fails (its stderr is in the error).
pub fn build_server() -> anyhow::Result<PathBuf> {
    let mut command = Command::new(cargo());
    command
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            "forgesyte-server",
            "-p",
            "forgesyte-bench",
            "-p",
            "forgesyte-image-stats",
        ])
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    run_cargo(command, "the release forgesyte binary")?;
    let binary = target_dir()
        .join("release")
        .join(format!("forgesyte{}", std::env::consts::EXE_SUFFIX));
    if !binary.is_file() {
        bail!("the build succeeded but {} is missing", binary.display());
    }
    Ok(binary)
}

/// The bench plugin's Cargo manifest.
pub fn plugin_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin/Cargo.toml")
}

/// Builds the bench plugin (release or debug) with its own target
/// directory, `<target>/forgesyte-bench-plugin`, and returns the library.
///
/// A target directory of its own: when this runs inside `cargo test`, the
/// outer cargo holds the lock on the workspace's one.
///
/// # Errors
///
/// When cargo cannot be run or the build fails (its stderr is in the error).
pub fn build_plugin(release: bool) -> anyhow::Result<PathBuf> {
    let target = target_dir().join("forgesyte-bench-plugin");
    let mut command = Command::new(cargo());
    command
        .arg("build")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(plugin_manifest())
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_TARGET_DIR");
    if release {
        command.arg("--release");
    }
    run_cargo(
        command,
        "the bench plugin (if its lock file is out of date, run `cargo update --manifest-path \
         crates/forgesyte-bench/plugin/Cargo.toml --workspace`)",
    )?;
    let library = target
        .join(if release { "release" } else { "debug" })
        .join(format!(
            "{}forgesyte_bench_plugin{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
    if !library.is_file() {
        bail!("the build succeeded but {} is missing", library.display());
    }
    Ok(library)
}
