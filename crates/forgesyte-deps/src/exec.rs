//! The executable seam and its real implementation (a `PATH` search).

use std::fmt::Debug;
use std::path::{Path, PathBuf};

/// Finds executables the way a shell does.
pub trait ExecutableProbe: Send + Sync + Debug {
    /// The executable's path, or `None`. A name containing `/` is taken as a
    /// path, when absolute (a relative one would depend on the server's
    /// working directory); any other name is searched on `PATH`.
    fn find(&self, name: &str) -> Option<PathBuf>;
}

/// Searches the process's `PATH` (relative entries, `.` or empty ones
/// meaning the working directory, are skipped on purpose: what a plugin
/// finds must not depend on where the server was started).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemPath;

impl ExecutableProbe for SystemPath {
    fn find(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() || name.contains('\0') {
            return None;
        }
        if name.contains('/') {
            let path = PathBuf::from(name);
            return (path.is_absolute() && is_executable(&path)).then_some(path);
        }
        let path_var = std::env::var_os("PATH")?;
        std::env::split_paths(&path_var)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    }
}

/// A regular file (after following links) with an execute bit set.
pub(crate) fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_on_path() {
        let sh = SystemPath
            .find("sh")
            .expect("sh is on PATH on any Linux box");
        assert!(sh.is_absolute());
        assert!(sh.ends_with("sh"));
    }

    #[test]
    fn misses_unknown_and_bad_names() {
        assert_eq!(SystemPath.find("definitely_missing_xyz_bin"), None);
        assert_eq!(SystemPath.find(""), None);
        assert_eq!(SystemPath.find("a\0b"), None);
    }

    #[cfg(unix)]
    #[test]
    fn path_names_need_the_execute_bit() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tool");
        std::fs::write(&file, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let name = file.to_str().unwrap();
        assert_eq!(SystemPath.find(name), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(SystemPath.find(name), Some(file.clone()));
        assert_eq!(SystemPath.find(dir.path().to_str().unwrap()), None);
        // The same executable named relative to the working directory.
        let cwd = std::env::current_dir().unwrap();
        let relative = "../".repeat(cwd.components().count()) + name.trim_start_matches('/');
        assert!(is_executable(Path::new(&relative)), "{relative}");
        assert_eq!(SystemPath.find(&relative), None);
    }
}
