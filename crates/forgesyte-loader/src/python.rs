//! Python plugins: the runner the host ships, and finding a plugin's
//! interpreter.
//!
//! The runner (the package `python/runner/`, standard library only) is
//! compiled into this crate, hence into the `forgesyte` binary, and started
//! as `INTERPRETER -u -c CODE --plugin-dir DIR (--file F | --module M) …`
//! ([`runner_invocation`]; CODE imports the package from a private cache
//! that this binary writes, or from its sources, which CODE carries), so
//! there is no file to install, to find or to keep in step with the host.
//! It speaks `PROTOCOL.md` like the native runner (and passes the same
//! conformance suite); `python/test_runner.py` tests it on its own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use forgesyte_deps::FileSystem;

mod cache;

pub(crate) use cache::is_runner_file;
pub use cache::{runner_invocation, runner_source_invocation};

/// `[(file, its source)]` for files of `python/runner/`.
macro_rules! runner_modules {
    ($($file:literal),* $(,)?) => {
        &[$(($file, include_str!(concat!("python/runner/", $file)))),*]
    };
}

/// The Python runner: the modules of its package (`python/runner/`), each
/// as (file name, source). The package is one concern per module; see its
/// `__init__.py` for which.
pub const RUNNER_MODULES: &[(&str, &str)] = runner_modules![
    "__init__.py",
    "api.py",
    "args.py",
    "base.py",
    "confine.py",
    "errors.py",
    "loading.py",
    "main.py",
    "results.py",
    "serve.py",
    "tools.py",
    "wire.py",
    "zygote.py",
];

/// The interpreter used when neither the manifest nor the host names one.
pub const DEFAULT_INTERPRETER: &str = "python3";

/// The signal on which the Python runner writes its threads' stacks to
/// stderr (`faulthandler`, set up before it imports the plugin; its hello
/// says it again): sent before a timeout's kill, even one before the hello.
pub(crate) const STACK_SIGNAL: i32 = libc::SIGUSR2;

/// What [`resolve_interpreter`]'s error ends with when the path names
/// something that is not a file (a directory).
pub const NOT_A_FILE: &str = " (not a file)";

/// The interpreter of a Python plugin in `dir`: the manifest's `python`
/// (relative to `dir`, or absolute), else `configured` (`--python`,
/// `FORGESYTE_PYTHON`), else [`DEFAULT_INTERPRETER`]; a bare name is looked
/// up on `path_var` (`PATH`), where only a file counts. `Err` names what
/// was looked for, ending with [`NOT_A_FILE`] when it is no file.
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
    let is_file = |path: &Path| fs.metadata(path).is_ok_and(|m| m.is_file);
    if !bare {
        return if is_file(&wanted) {
            Ok(wanted)
        } else if fs.exists(&wanted) {
            // A directory (`"python": "."`), a device: no interpreter.
            Err(format!("{}{NOT_A_FILE}", wanted.display()))
        } else {
            Err(wanted.display().to_string())
        };
    }
    // Absolute directories only, as a `bin:` dependency's search: an empty
    // or relative entry (`PATH=:/usr/bin`) found an interpreter in the
    // server's working directory, and the runner then ran the bare name.
    path_var
        .iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(&wanted))
        .find(|candidate| is_file(candidate))
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
        // A directory is no interpreter: named as such, and passed over on
        // PATH.
        fs.add_dir("/p/ocr/pydir");
        fs.add_dir("/early/python3");
        assert_eq!(
            resolve_interpreter(Some("pydir"), None, dir, &fs, path.clone()),
            Err("/p/ocr/pydir (not a file)".into())
        );
        assert_eq!(
            resolve_interpreter(None, None, dir, &fs, Some("/early:/usr/bin".into())),
            Ok(PathBuf::from("/usr/bin/python3"))
        );
        // A relative entry (the server's working directory) is passed
        // over, as for a `bin:` dependency.
        fs.add_file("python3", b"");
        fs.add_file("rel/python3", b"");
        assert_eq!(
            resolve_interpreter(None, None, dir, &fs, Some(":rel:/usr/bin".into())),
            Ok(PathBuf::from("/usr/bin/python3"))
        );
    }

    /// An in-process plugin's destructor gets as long at a reload as a
    /// Python plugin's `on_unload` (`serve.py`'s `UNLOAD_GRACE_S`): two
    /// constants of one rule, in two languages.
    #[test]
    fn a_destructor_waits_as_long_as_on_unload() {
        let serve = RUNNER_MODULES
            .iter()
            .find(|(name, _)| *name == "serve.py")
            .map(|(_, source)| *source)
            .unwrap();
        let grace = serve
            .lines()
            .find_map(|l| l.strip_prefix("UNLOAD_GRACE_S = "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap();
        assert_eq!(
            std::time::Duration::from_secs_f64(grace),
            crate::DESTRUCTOR_WAIT
        );
    }

    #[test]
    fn every_module_of_the_runner_package_is_shipped() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/python/runner");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".py"))
            .collect();
        on_disk.sort();
        let shipped: Vec<&str> = RUNNER_MODULES.iter().map(|(name, _)| *name).collect();
        assert_eq!(on_disk, shipped, "RUNNER_MODULES lists {}", dir.display());
        for (name, source) in RUNNER_MODULES {
            let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
            assert_eq!(&on_disk, source, "{name}");
        }
    }
}
