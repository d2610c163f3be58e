//! Python plugins: the runner the host ships, and finding a plugin's
//! interpreter.
//!
//! The runner (`python/runner.py`, standard library only) is compiled into
//! this crate, hence into the `forgesyte` binary, and started as
//! `INTERPRETER -u -c CODE --plugin-dir DIR (--file F | --module M) …`
//! ([`runner_invocation`]; CODE imports the runner from a private cache
//! that this binary writes, or is its source), so there is no file to
//! install, to find or to keep in step with the host. It speaks `PROTOCOL.md` like the native runner (and passes the same
//! conformance suite); `python/test_runner.py` tests it on its own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use forgesyte_deps::FileSystem;

mod cache;

pub use cache::{runner_invocation, runner_source_invocation};

/// The Python runner's source.
pub const RUNNER_SOURCE: &str = include_str!("python/runner.py");

/// The interpreter used when neither the manifest nor the host names one.
pub const DEFAULT_INTERPRETER: &str = "python3";

/// The interpreter of a Python plugin in `dir`: the manifest's `python`
/// (relative to `dir`, or absolute), else `configured` (`--python`,
/// `FORGESYTE_PYTHON`), else [`DEFAULT_INTERPRETER`]; a bare name is looked
/// up on `path_var` (`PATH`). `Err` names what was looked for.
pub fn resolve_interpreter(
    manifest_python: Option<&str>,
    configured: Option<&Path>,
    dir: &Path,
    fs: &dyn FileSystem,
    path_var: Option<OsString>,
) -> Result<PathBuf, String> {
    let wanted: PathBuf = match (manifest_python, configured) {
        (Some(python), _) => {
            let python = Path::new(python);
            if python.is_absolute() {
                python.to_path_buf()
            } else {
                dir.join(python)
            }
        }
        (None, Some(configured)) => configured.to_path_buf(),
        (None, None) => PathBuf::from(DEFAULT_INTERPRETER),
    };
    let bare = wanted.components().count() == 1 && !wanted.is_absolute();
    if !bare {
        return if fs.exists(&wanted) {
            Ok(wanted)
        } else {
            Err(wanted.display().to_string())
        };
    }
    path_var
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(&wanted))
        .find(|candidate| fs.exists(candidate))
        .ok_or_else(|| format!("{} (on PATH)", wanted.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgesyte_deps::fake::FakeFs;

    #[test]
    fn the_manifest_then_the_host_then_python3_on_path() {
        let fs = FakeFs::new();
        fs.add_file("/p/ocr/.venv/bin/python", b"");
        fs.add_file("/opt/py/bin/python3.12", b"");
        fs.add_file("/usr/bin/python3", b"");
        let path = Some(OsString::from("/nowhere:/usr/bin"));
        let dir = Path::new("/p/ocr");
        let host = Some(Path::new("/opt/py/bin/python3.12"));
        assert_eq!(
            resolve_interpreter(Some(".venv/bin/python"), host, dir, &fs, path.clone()),
            Ok(PathBuf::from("/p/ocr/.venv/bin/python"))
        );
        assert_eq!(
            resolve_interpreter(None, host, dir, &fs, path.clone()),
            Ok(PathBuf::from("/opt/py/bin/python3.12"))
        );
        assert_eq!(
            resolve_interpreter(None, None, dir, &fs, path.clone()),
            Ok(PathBuf::from("/usr/bin/python3"))
        );
        assert_eq!(
            resolve_interpreter(Some("venv/bin/python"), None, dir, &fs, path.clone()),
            Err("/p/ocr/venv/bin/python".into())
        );
        assert_eq!(
            resolve_interpreter(None, None, dir, &fs, Some("/nowhere".into())),
            Err("python3 (on PATH)".into())
        );
    }

    #[test]
    fn the_runner_source_is_the_shipped_file() {
        assert!(RUNNER_SOURCE.contains("def main("));
        assert!(RUNNER_SOURCE.len() > 10_000);
    }
}
