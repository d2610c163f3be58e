//! Records the compiler that builds this crate and the target it builds for:
//! the build fingerprint of every plugin library (through the SDK) and the
//! host's own target (to compare a library's against) both come from here.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().replace('\0', ""))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=FORGESYTE_BUILD_RUSTC_VERSION={version}");
    // Cargo always sets TARGET for build scripts.
    let target = std::env::var("TARGET")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=FORGESYTE_BUILD_TARGET={target}");
}
