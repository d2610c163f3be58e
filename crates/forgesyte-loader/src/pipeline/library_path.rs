//! Where a native plugin's library is: inside its directory (no escape by
//! `..` or a symbolic link), else on the configured library path. A part of
//! instantiation ([`super::instantiate`]); knows paths, not what is loaded
//! from them.

use std::path::{Path, PathBuf};

use forgesyte_errors::{ImportError, ManifestError, PluginError};

use super::loader::{Loader, Pending};
use crate::manifest::{self};

impl Loader {
    /// Where the plugin's library is: inside its directory (no escape by `..`
    /// or symlink), else on the configured library path.
    pub(super) fn resolve_library(
        &self,
        p: &Pending,
        signed: bool,
    ) -> Result<PathBuf, PluginError> {
        // Found on `--lib-path` below, or not at all this time.
        self.outside_libraries.lock().remove(&p.name);
        let entry = p
            .manifest
            .entrypoint
            .clone()
            .unwrap_or_else(|| format!("lib{}.so", p.name.replace(['-', '.'], "_")));
        let inside = manifest::join_inside(&p.dir, &entry);
        let bare = !entry.contains('/');
        // Resolving the path is the look-up: a library that resolves is
        // there (no separate `exists`).
        let resolved = self.check_contained(&p.dir, &inside, &entry)?;
        // The path as named is what is opened, not the resolved one: the
        // library's `$ORIGIN`, its pin and the reasons stay those of the
        // plugin's directory. A link swapped between the check and the
        // open needs write access to that directory, which could replace
        // the library itself; a checked (signed or pinned) library is
        // loaded from the bytes that were checked, whatever the link.
        // A signed plugin's library is one of its signed files, in its
        // directory: never one found on `--lib-path` (gone from the
        // directory since its signature was checked, a library of the same
        // name there would be loaded unchecked).
        if resolved || !bare || signed || self.fs.exists(&inside) {
            return Ok(inside);
        }
        for lib_dir in &self.config.lib_paths {
            let candidate = lib_dir.join(&entry);
            if self.fs.exists(&candidate) {
                // Outside the directory's change stamp: its identity is
                // what the next rescan compares.
                let identity = super::loader::file_identity(&candidate);
                self.outside_libraries
                    .lock()
                    .insert(p.name.clone(), (candidate.clone(), identity));
                return Ok(candidate);
            }
        }
        let searched = self
            .config
            .lib_paths
            .iter()
            .map(|dir| match self.fs.exists(dir) {
                true => dir.display().to_string(),
                false => format!("{} (missing)", dir.display()),
            })
            .collect();
        let python_file = format!("{entry}.py");
        let python_file = self
            .fs
            .exists(&p.dir.join(&python_file))
            .then_some(python_file);
        let not_found = ImportError::LibraryNotFoundInPath {
            path: inside,
            searched,
            python_file,
        };
        // A manifest that names neither a runtime nor an entrypoint, beside
        // no `plugin.py`: the seed's layout (its manifests never name
        // them) with its code missing, or a native plugin without its
        // library. The seed's reason first, then the library's.
        if names_no_runtime(&p.manifest) {
            return Err(seeds_not_found(
                manifest::PLUGIN_PY,
                &p.dir,
                &format!(" (nor a native plugin's {not_found})"),
            ));
        }
        Err(not_found.into())
    }

    /// Fails when `path` resolves outside `dir`; whether it resolved (`false`:
    /// missing, which the import step reports precisely).
    pub(super) fn check_contained(
        &self,
        dir: &Path,
        path: &Path,
        entry: &str,
    ) -> Result<bool, PluginError> {
        let Some((real, inside)) = self.resolved_inside(dir, path) else {
            return Ok(false);
        };
        if inside {
            Ok(true)
        } else {
            Err(ManifestError::PathEscape {
                field: "entrypoint".into(),
                path: format!("{entry} -> {}", real.display()),
            }
            .into())
        }
    }

    /// Where `path` resolves (links followed, through the pass's cache),
    /// and whether that is inside `dir`; `None` when it does not resolve.
    pub(super) fn resolved_inside(&self, dir: &Path, path: &Path) -> Option<(PathBuf, bool)> {
        let real = self.pass.canonicalize(self.fs.as_ref(), path).ok()?;
        let root = self
            .pass
            .canonicalize(self.fs.as_ref(), dir)
            .unwrap_or_else(|_| dir.to_path_buf());
        let inside = real.starts_with(&root);
        Some((real, inside))
    }
}

/// Whether `manifest` names neither a runtime nor an entrypoint (nor a
/// library): the seed's manifests never do. Beside no `plugin.py` (so read
/// as native), such a plugin is the seed's layout with its code missing,
/// or a native plugin whose library is its default name.
pub(super) fn names_no_runtime(manifest: &manifest::Manifest) -> bool {
    ["runtime", "entrypoint", "library"].iter().all(|field| {
        manifest
            .raw
            .get(field)
            .is_none_or(serde_json::Value::is_null)
    })
}

/// The seed's reason for a plugin's Python file missing from its directory
/// `dir`, as given: `ImportError: ImportError: FILE not found in DIR`,
/// then `more`.
pub(super) fn seeds_not_found(file: &str, dir: &Path, more: &str) -> PluginError {
    ImportError::Python {
        error_type: "ImportError".into(),
        message: format!("{file} not found in {}{more}", dir.display()),
        traceback: Vec::new(),
    }
    .into()
}
