//! Discovery: plugin directories under the plugins directory, and reading
//! and validating each one's manifest.

use std::path::{Path, PathBuf};

use forgesyte_errors::ManifestError;
use serde_json::Value;

use super::loader::Loader;
use crate::manifest::{self, MANIFEST_FILE, Manifest};

/// A manifest that could not be validated, and the JSON it held, if any.
pub(super) struct BadManifest {
    pub(super) raw: Option<Value>,
    pub(super) error: ManifestError,
}

impl Loader {
    /// Plugin directories under `plugins_dir`: sorted, only those with a manifest.
    pub fn discover(&self, plugins_dir: &Path) -> Vec<PathBuf> {
        let entries = match self.fs.read_dir(plugins_dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %plugins_dir.display(), error = %e, "Plugins directory not readable: {}", plugins_dir.display());
                return Vec::new();
            }
        };
        let mut dirs: Vec<PathBuf> = entries
            .into_iter()
            .filter(|e| e.is_dir && self.fs.exists(&e.path.join(MANIFEST_FILE)))
            .map(|e| e.path)
            .collect();
        dirs.sort();
        dirs
    }

    pub(super) fn read_manifest(&self, dir: &Path) -> Result<Manifest, Box<BadManifest>> {
        let path = dir.join(MANIFEST_FILE);
        let limit = self.config.max_manifest_bytes;
        let bytes = match self.fs.read(&path, limit) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(None, ManifestError::NotFound { path }));
            }
            Err(source) => return Err(bad(None, ManifestError::Io { path, source })),
        };
        if bytes.len() as u64 > limit {
            let size = self
                .fs
                .metadata(&path)
                .map_or(bytes.len() as u64, |m| m.len);
            return Err(bad(None, ManifestError::TooLarge { path, size, limit }));
        }
        let dir_name = dir_name(dir);
        let raw: Option<Value> = serde_json::from_slice(&bytes).ok();
        let has_plugin_py = self.fs.exists(&dir.join(manifest::PLUGIN_PY));
        manifest::parse_in(&bytes, &path, &dir_name, has_plugin_py).map_err(|e| bad(raw, e))
    }
}

/// A panic while reading the manifest of `dir`, as a manifest that could not
/// be read.
pub(super) fn manifest_panicked(dir: &Path, panic: String) -> Box<BadManifest> {
    bad(
        None,
        ManifestError::Io {
            path: dir.join(MANIFEST_FILE),
            source: std::io::Error::other(format!("panicked while reading it: {panic}")),
        },
    )
}

pub(super) fn bad(raw: Option<Value>, error: ManifestError) -> Box<BadManifest> {
    Box::new(BadManifest { raw, error })
}

pub(super) fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}
