//! How the interpreter is handed the runner: from a private cache
//! directory when one is usable, so the interpreter compiles the runner
//! once and later starts load its bytecode from `__pycache__`; else as
//! source on the command line (`-c`), compiled at every start.
//!
//! Compiling the runner costs about 25 ms of CPU per interpreter start
//! (measured with `compile()` on this machine), which is a good part of a
//! Python plugin's start-up. The cache directory is
//! `$XDG_CACHE_HOME/forgesyte/python` (else `~/.cache/forgesyte/python`),
//! created `0700`, and used only when it is a directory owned by this user
//! that nobody else can write to; the runner file in it is checked against
//! the runner this binary ships before each use, and rewritten when it
//! differs.

use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::RUNNER_SOURCE;

/// The interpreter arguments that start the runner (its own arguments
/// follow): `-u -c CODE`, CODE importing the cached runner or being the
/// runner's source.
pub fn runner_invocation() -> [OsString; 3] {
    static CODE: OnceLock<String> = OnceLock::new();
    let code = CODE.get_or_init(|| {
        cache_dir()
            .and_then(|dir| bootstrap(&dir).map_err(|e| format!("{}: {e}", dir.display())))
            .unwrap_or_else(|why| {
                tracing::debug!("the Python runner is not cached ({why}): run from source");
                RUNNER_SOURCE.to_owned()
            })
    });
    // Unbuffered, so print() from a plugin reaches the log now.
    ["-u".into(), "-c".into(), code.into()]
}

/// The interpreter's arguments that run the runner from its source, without
/// the cache: for runners that run as another user (`--runner-user`), who
/// cannot read this user's private cache.
pub fn runner_source_invocation() -> [OsString; 3] {
    ["-u".into(), "-c".into(), RUNNER_SOURCE.into()]
}

/// The cache directory, if this user has one.
fn cache_dir() -> Result<PathBuf, String> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").ok_or("no HOME")?).join(".cache"),
    };
    if !base.is_absolute() {
        return Err(format!("{} is not absolute", base.display()));
    }
    Ok(base.join("forgesyte").join("python"))
}

/// Writes the runner into `dir` (when it is not there already) and returns
/// the code that imports it and starts it.
fn bootstrap(dir: &Path) -> std::io::Result<String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir()
        || meta.uid() != rustix::process::geteuid().as_raw()
        || meta.mode() & 0o022 != 0
    {
        return Err(std::io::Error::other(
            "not a directory of this user's that only it can write to",
        ));
    }
    let module = module_name();
    let file = dir.join(format!("{module}.py"));
    if std::fs::read(&file).ok().as_deref() != Some(RUNNER_SOURCE.as_bytes()) {
        let temp = dir.join(format!("{module}.{}.tmp", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, RUNNER_SOURCE.as_bytes()))
            .and_then(|()| std::fs::rename(&temp, &file));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
    }
    // The directory as a Python string literal (a JSON string is one).
    let dir = dir
        .to_str()
        .and_then(|d| serde_json::to_string(d).ok())
        .ok_or_else(|| std::io::Error::other("the path is not UTF-8"))?;
    // The bytecode is written even under PYTHONDONTWRITEBYTECODE (which
    // still holds for everything else, plugins included): the cache is
    // this directory's whole point.
    Ok(format!(
        "import sys; w = sys.dont_write_bytecode; sys.dont_write_bytecode = False; \
         sys.path.insert(0, {dir}); import {module} as r; del sys.path[0]; \
         sys.dont_write_bytecode = w; del w; r.start(sys.argv[1:])"
    ))
}

/// `forgesyte_runner_HASH`: one name per runner source, so binaries of
/// different versions sharing the cache do not rewrite each other's.
fn module_name() -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    RUNNER_SOURCE.hash(&mut hasher);
    format!("forgesyte_runner_{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runner_is_written_once_and_rewritten_when_it_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("forgesyte/python");
        let code = bootstrap(&dir).unwrap();
        let file = dir.join(format!("{}.py", module_name()));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), RUNNER_SOURCE);
        assert!(code.contains(&module_name()), "{code}");
        assert!(
            code.contains(&format!("{:?}", dir.display().to_string())),
            "{code}"
        );
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "the cache directory is private"
        );
        std::fs::write(&file, "tampered").unwrap();
        bootstrap(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), RUNNER_SOURCE);
    }

    #[test]
    fn a_directory_others_can_write_to_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(bootstrap(&dir).is_err());
        assert!(!dir.join(format!("{}.py", module_name())).exists());
    }
}
