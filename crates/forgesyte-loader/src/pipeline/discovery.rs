//! Discovery: plugin directories under the plugins directory, the
//! installed Python plugins (entry points), and reading and validating each
//! one's manifest.

use std::path::{Path, PathBuf};

use forgesyte_errors::{ImportError, LoadError, ManifestError, PluginError};
use serde_json::{Value, json};

use super::loader::Loader;
use crate::entry_points::{self, EntryPoint};
use crate::manifest::{self, MANIFEST_FILE, Manifest, Runtime};
use crate::python;

/// A manifest that could not be validated, and the JSON it held, if any;
/// or an installed plugin whose entry point could not be resolved (its
/// module not found: an `ImportError`).
pub(super) struct BadManifest {
    pub(super) raw: Option<Value>,
    pub(super) error: PluginError,
}

impl BadManifest {
    /// The name the manifest claims when it is a valid one, else `fallback`.
    pub(super) fn claimed_name_or(&self, fallback: &str) -> String {
        self.raw
            .as_ref()
            .and_then(manifest::claimed_name)
            .filter(|n| manifest::is_valid_name(n))
            .map_or_else(|| fallback.to_owned(), str::to_owned)
    }

    /// The manifest's `description`, if it has a string one.
    pub(super) fn description(&self) -> Option<String> {
        self.text_field("description")
    }

    /// The version the manifest's text gives, if it gives one as a string
    /// or a number (a broken manifest still says which version is
    /// broken).
    pub(super) fn version(&self) -> Option<String> {
        self.raw
            .as_ref()
            .and_then(|r| r.get("version"))
            .and_then(manifest::version_text)
    }

    fn text_field(&self, field: &str) -> Option<String> {
        self.raw
            .as_ref()
            .and_then(|r| r.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// A directory's manifest (or why it has none) and its change stamp
/// (`None`: the directory could not be read).
pub(super) type Stamped = (Result<Manifest, Box<BadManifest>>, Option<u64>);

/// What a pass makes of a directory without a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoManifest {
    /// Not a plugin directory: left out of the pass (a pass over every
    /// subdirectory of the plugins directory, as discovery leaves it out).
    Skip,
    /// A plugin that failed for want of its manifest (a directory asked for
    /// by name, or one whose manifest went away since discovery).
    Fail,
}

impl Loader {
    /// Plugin directories under `plugins_dir`: sorted, hidden ones (`.name`)
    /// left out, only those with a manifest (one that cannot be looked at, for want of permission, is
    /// kept: its plugin fails naming why, as in a full pass, which reads
    /// every directory's).
    pub fn discover(&self, plugins_dir: &Path) -> Vec<PathBuf> {
        let mut dirs = self.subdirectories(plugins_dir);
        dirs.retain(|dir| !self.manifest_not_found(dir));
        dirs
    }

    /// Whether plugin directory `dir` (or its manifest) is not there: a
    /// manifest that cannot be looked at, for want of permission, is.
    pub(super) fn manifest_not_found(&self, dir: &Path) -> bool {
        matches!(self.fs.metadata(&dir.join(MANIFEST_FILE)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    }

    /// Every directory under `plugins_dir` but hidden ones, sorted: [`discover`](Self::discover)
    /// without asking each for its manifest. A full load pass reads the
    /// manifests anyway and leaves out those without one
    /// ([`NoManifest::Skip`]), a `stat` per directory fewer.
    pub(super) fn subdirectories(&self, plugins_dir: &Path) -> Vec<PathBuf> {
        let entries = match self.fs.read_dir(plugins_dir) {
            Ok(entries) => entries,
            // Installed plugins need no directory: the default one, not
            // there, is said at INFO then (a WARN at every start and rescan
            // of a deployment of packages alone).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && self.config.plugins_dir_optional =>
            {
                tracing::info!(dir = %plugins_dir.display(), "No plugins directory {}: only the installed (entry-point) plugins are loaded", plugins_dir.display());
                return Vec::new();
            }
            // The seed's words for a missing one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %plugins_dir.display(), "Plugins directory not found: {}", plugins_dir.display());
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(dir = %plugins_dir.display(), error = %e, "Plugins directory not readable: {}", plugins_dir.display());
                return Vec::new();
            }
        };
        let mut dirs: Vec<PathBuf> = entries
            .into_iter()
            .filter(|e| e.is_dir && !crate::integrity::hidden(&e.name))
            .map(|e| e.path)
            .collect();
        dirs.sort();
        dirs
    }

    pub(super) fn read_manifest(&self, dir: &Path) -> Result<Manifest, Box<BadManifest>> {
        let lock = dir.parent().and_then(super::stamp::lock_beside);
        let (read, stamped) = self.read_manifest_stamped(dir, lock.as_deref());
        self.fresh_stamps.lock().insert(dir.to_path_buf(), stamped);
        read
    }

    /// The manifest of `dir`, read and parsed with no change stamp taken
    /// (its directory not walked): a look at what it says.
    pub(super) fn peek_manifest(&self, dir: &Path) -> Result<Manifest, Box<BadManifest>> {
        let path = dir.join(MANIFEST_FILE);
        let read = self.read_manifest_bytes(&path);
        self.parse_manifest(dir, &path, read)
    }

    /// [`read_manifest`](Self::read_manifest) without recording the
    /// change stamp: it comes back with the manifest. `lock` is the lock
    /// file beside `dir` ([`lock_beside`](super::stamp::lock_beside)),
    /// which a pass reads once for all its plugins.
    pub(super) fn read_manifest_stamped(&self, dir: &Path, lock: Option<&[u8]>) -> Stamped {
        let path = dir.join(MANIFEST_FILE);
        let read = self.read_manifest_bytes(&path);
        self.stamp_and_parse(dir, &path, read, lock)
    }

    /// [`read_manifest_stamped`](Self::read_manifest_stamped), but `None`
    /// for a directory without a manifest under [`NoManifest::Skip`]
    /// (nothing of it stamped either).
    pub(super) fn read_manifest_stamped_or(
        &self,
        dir: &Path,
        lock: Option<&[u8]>,
        no_manifest: NoManifest,
    ) -> Option<Stamped> {
        let path = dir.join(MANIFEST_FILE);
        let read = self.read_manifest_bytes(&path);
        let missing = matches!(&read, Err(bad) if matches!(bad.error, PluginError::Manifest(ManifestError::NotFound { .. })));
        (!missing || no_manifest == NoManifest::Fail)
            .then(|| self.stamp_and_parse(dir, &path, read, lock))
    }

    /// The change stamp of `dir`, taken before anything else of the plugin
    /// is read, and the manifest parsed from `read` (its bytes, read once).
    fn stamp_and_parse(
        &self,
        dir: &Path,
        path: &Path,
        read: Result<Vec<u8>, Box<BadManifest>>,
        lock: Option<&[u8]>,
    ) -> Stamped {
        // Whatever changes from here on differs from the stamp at the next
        // rescan. It hashes the manifest bytes parsed here; of a manifest
        // that could not be read (too large, not a regular file), its size,
        // time and inode in the walk stand for it, as in `stamp`; with the
        // lock file the caller read.
        let stamped = match &read {
            Ok(bytes) => super::stamp::stamp_with(dir, Some(bytes), lock),
            Err(_) => super::stamp::stamp_with(dir, None, lock),
        };
        (self.parse_manifest(dir, path, read), stamped)
    }

    fn parse_manifest(
        &self,
        dir: &Path,
        path: &Path,
        read: Result<Vec<u8>, Box<BadManifest>>,
    ) -> Result<Manifest, Box<BadManifest>> {
        let bytes = read?;
        let dir_name = dir_name(dir);
        let has_plugin_py = || self.fs.exists(&dir.join(manifest::PLUGIN_PY));
        let mut parsed = manifest::parse_asking(&bytes, path, &dir_name, &has_plugin_py)
            // The JSON again only for a refused manifest (its claimed name).
            .map_err(|e| bad(serde_json::from_slice(&bytes).ok(), e))?;
        parsed.source_sha256 = Some(crate::integrity::sha256_hex(&bytes));
        Ok(parsed)
    }

    /// The bytes of the manifest file `path`, within the size cap.
    fn read_manifest_bytes(&self, path: &Path) -> Result<Vec<u8>, Box<BadManifest>> {
        let path = path.to_path_buf();
        let limit = self.config.max_manifest_bytes;
        // A manifest linked out of its plugin's directory is not read: the
        // server would read any JSON file it can (and serve it: `GET
        // /v1/plugins/{name}/manifest`). Its target is not named.
        let inside_its_dir = || {
            path.parent()
                .and_then(|dir| self.resolved_inside(dir, &path))
                .is_some_and(|(_, inside)| inside)
        };
        if self.fs.is_symlink(&path).unwrap_or(false) {
            // A link that leads nowhere (dangling, or a loop) says so.
            if let Err(e) = self.fs.canonicalize(&path) {
                let source =
                    std::io::Error::new(e.kind(), format!("a link that cannot be followed: {e}"));
                return Err(bad(None, ManifestError::Io { path, source }));
            }
            if !inside_its_dir() {
                let source = std::io::Error::other("it links out of the plugin directory");
                return Err(bad(None, ManifestError::Io { path, source }));
            }
        }
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
        Ok(bytes)
    }

    /// The manifest of registered plugin `name` read again (for a reload):
    /// its entry point's when it is an installed Python plugin, else its
    /// directory's. Either way the change stamp is taken first and kept for
    /// the next rescan to compare with, as [`read_manifest`](Self::read_manifest)
    /// keeps a directory's: an installed plugin's was not, so the rescan
    /// after a reload by name compared with the stamp of its previous load,
    /// found it changed and restarted it again (`on_unload` twice for one
    /// change). (Of one in a directory it shares, `restamp` takes its own.)
    pub(super) fn reread_manifest(
        &self,
        name: &str,
        dir: &Path,
    ) -> Result<Manifest, Box<BadManifest>> {
        let entry_point = self.entry_points.read().get(name).cloned();
        match entry_point {
            Some(ep) => {
                if ep.owns_dir {
                    let stamped = self.stamp_of(name, dir);
                    self.fresh_stamps.lock().insert(dir.to_path_buf(), stamped);
                }
                self.entry_point_manifest(&ep)
            }
            None => self.read_manifest(dir),
        }
    }

    /// The installed Python plugins, when
    /// [`LoaderConfig::python_entry_points`](super::LoaderConfig::python_entry_points)
    /// asks for them: the entry points the interpreter reports (see
    /// [`entry_points::discover`]). When it cannot report them, the reason
    /// is logged as a warning and kept for
    /// [`Loader::entry_points_error`], and the pass goes on without them.
    pub(super) fn discover_entry_points(&self) -> Vec<EntryPoint> {
        if !self.config.python_entry_points {
            *self.entry_points_error.write() = None;
            return Vec::new();
        }
        let found = python::resolve_interpreter(
            None,
            self.config.python.as_deref(),
            Path::new("/"),
            self.fs.as_ref(),
            std::env::var_os("PATH"),
        )
        .map_err(|wanted| {
            // `X (not a file)` says what is wrong already.
            let missing = if wanted.ends_with(python::NOT_A_FILE) {
                ""
            } else {
                " not found"
            };
            format!("python interpreter {wanted}{missing}")
        })
        // The same interpreter's start as a runner's: an operator who gave
        // constructions longer (a slow file system) gives this as long.
        .and_then(|interpreter| {
            let limit = entry_points::DISCOVERY_TIMEOUT.max(self.config.process.init_timeout);
            entry_points::discover_with_timeout(&interpreter, limit)
        });
        match found {
            Ok(found) => {
                *self.entry_points_error.write() = None;
                tracing::info!(
                    count = found.len(),
                    "Found {} Python entry point{} of group {}",
                    found.len(),
                    if found.len() == 1 { "" } else { "s" },
                    entry_points::GROUP
                );
                for ep in found.iter().filter(|ep| ep.error.is_some()) {
                    tracing::warn!(
                        entry_point = %ep.name,
                        error = ep.error.as_deref().unwrap_or_default(),
                        "{} cannot be loaded: {}",
                        ep.describe(),
                        ep.error.as_deref().unwrap_or_default()
                    );
                }
                found
            }
            Err(reason) => {
                tracing::warn!(
                    %reason,
                    "Installed Python plugins (entry points of {}) not discovered: {reason}",
                    entry_points::GROUP
                );
                *self.entry_points_error.write() = Some(reason);
                Vec::new()
            }
        }
    }

    /// For a reload pass: discovers the entry points again, refreshes the
    /// ones already registered (version, directory) and returns the new ones
    /// and the registry keys of those no longer installed (none when the
    /// discovery failed: nothing is known to be gone then).
    ///
    /// With `rename` (a rescan, which retires what is gone), a duplicate
    /// whose name is free, or freed by this rescan, is among both: gone
    /// under its key, new under its name.
    pub(super) fn rescan_entry_points(&self, rename: bool) -> (Vec<EntryPoint>, Vec<String>) {
        if !self.config.python_entry_points {
            return (Vec::new(), Vec::new());
        }
        let found = self.discover_entry_points();
        let discovered = self.entry_points_error.read().is_none();
        let mut matched: Vec<(String, EntryPoint)> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        let mut new: Vec<EntryPoint>;
        {
            let known = self.entry_points.read();
            // Each registered one as it is now, as a reload by name finds
            // it: an upgrade that moved the plugin's class is the same
            // plugin, changed (not one retired and another added, whose
            // calls got 404 meanwhile and whose counts started again).
            for (name, k) in known.iter() {
                let taken = |ep: &EntryPoint| {
                    known
                        .iter()
                        .any(|(other, o)| other != name && o.same_declaration(ep))
                };
                if let Some(ep) = k.now_among(&found, taken) {
                    matched.push((name.clone(), ep.clone()));
                }
            }
            new = found
                .into_iter()
                .filter(|ep| !matched.iter().any(|(_, m)| m.same_declaration(ep)))
                .collect();
            if discovered {
                gone = known
                    .keys()
                    .filter(|name| !matched.iter().any(|(m, _)| m == *name))
                    .cloned()
                    .collect();
            }
        }
        // A duplicate (registered under a key of its own, not the name its
        // manifest asks for) whose name is free now, or freed by this
        // rescan: let go under its key and registered again under its name
        // (a reload keeps a plugin's key, and would refuse the new name).
        let (renamed, kept): (Vec<_>, Vec<_>) = matched.into_iter().partition(|(name, ep)| {
            // The manifest is read again only for a plugin not registered
            // under the name its manifest gave (no file read per installed
            // plugin at every rescan).
            rename
                && !self.registered_under_its_manifest_name(name)
                && self.entry_point_manifest(ep).is_ok_and(|m| {
                    m.name != *name && (!self.registry.contains(&m.name) || gone.contains(&m.name))
                })
        });
        for (name, ep) in renamed {
            tracing::info!(plugin = %name, "Plugin {name}: the name it asks for is free; registered again under it");
            gone.push(name);
            new.push(ep);
        }
        self.record_entry_points(kept);
        (new, gone)
    }

    /// Records what the interpreter reports now of registered installed
    /// plugins (name, entry point): each one's entry point, and its
    /// directory with it.
    pub(super) fn record_entry_points(&self, found: Vec<(String, EntryPoint)>) {
        {
            let mut entries = self.entries.write();
            for (name, ep) in &found {
                if let Some(entry) = entries.get_mut(name) {
                    entry.dir = ep.plugin_dir();
                }
            }
        }
        let mut known = self.entry_points.write();
        for (name, ep) in found {
            if let Some(k) = known.get_mut(&name) {
                *k = ep;
            }
        }
    }

    /// The manifest of an installed Python plugin: the `manifest.json` its
    /// package ships beside the module, else one made of the entry point
    /// (`name`, the distribution's `version`). Either way it is a Python
    /// plugin (`runtime` is set to `python`), its code is the entry point's
    /// `module:attr` unless the manifest names an `entrypoint`, its name is
    /// the manifest's (`id`, `name`) else the entry point's, and it runs
    /// under the configured interpreter (a `python` field is ignored: the
    /// package is installed for that interpreter).
    pub(super) fn entry_point_manifest(
        &self,
        ep: &EntryPoint,
    ) -> Result<Manifest, Box<BadManifest>> {
        if let Some(error) = &ep.error {
            return Err(unresolved(ep, error));
        }
        let mut source_sha256 = None;
        let mut duplicate_fields = manifest::Duplicates::default();
        let mut raw = match (&ep.module_dir, ep.has_manifest) {
            (Some(dir), true) => {
                let path = dir.join(MANIFEST_FILE);
                let bytes = self.read_manifest_bytes(&path)?;
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    return Err(bad(None, ManifestError::Empty { path }));
                }
                source_sha256 = Some(crate::integrity::sha256_hex(&bytes));
                let (raw, duplicates) = manifest::read_json(&bytes)
                    .map_err(|source| bad(None, ManifestError::Json { path, source }))?;
                duplicate_fields = duplicates;
                raw
            }
            _ => json!({
                "name": ep.name,
                "version": ep.version.as_deref().unwrap_or(manifest::UNKNOWN_VERSION),
                "description": format!("Installed Python plugin ({})", ep.describe()),
            }),
        };
        if let Some(obj) = raw.as_object_mut() {
            obj.insert("runtime".into(), json!(Runtime::Python.as_str()));
            let named = ["entrypoint", "library"]
                .iter()
                .any(|k| obj.get(*k).is_some_and(|v| !v.is_null()));
            if !named {
                match ep.target().filter(|t| manifest::is_module_path(t)) {
                    Some(target) => {
                        obj.insert("entrypoint".into(), json!(target));
                    }
                    None => {
                        let error = ManifestError::InvalidField {
                            field: "entrypoint".into(),
                            message: format!(
                                "{} does not name MODULE:CLASS or PACKAGE.MODULE[:CLASS] \
                                 (a top-level module needs its class: 'module:Plugin')",
                                ep.describe()
                            ),
                        };
                        return Err(bad(Some(raw), error));
                    }
                }
            }
        }
        let kept = raw.clone();
        let mut m = manifest::from_value_in(raw, &ep.name, false)
            .map_err(|e| bad(Some(kept), duplicate_fields.noted_on(e)))?;
        m.python = None;
        m.source_sha256 = source_sha256;
        m.duplicate_fields = duplicate_fields;
        Ok(m)
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
    Box::new(BadManifest {
        raw,
        error: error.into(),
    })
}

/// Why an installed plugin whose entry point the discovery could not
/// resolve (`error`) is FAILED: its module not found, or what its parent
/// package raised, is an `ImportError` as a runner's would be
/// (`ImportError: ModuleNotFoundError: No module named …`); a declaration
/// that cannot be read or used is a `ManifestError` naming the entry
/// point.
fn unresolved(ep: &EntryPoint, error: &str) -> Box<BadManifest> {
    let exception = error.split_once(": ").filter(|(kind, _)| {
        !kind.is_empty()
            && kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    });
    let error = match (&ep.module, exception) {
        // Which installed package declares the plugin: what a person
        // reinstalls when its module is gone.
        (Some(_), Some((kind, message))) => LoadError::from(ImportError::Python {
            error_type: kind.to_owned(),
            message: format!("{message} (declared by {})", ep.describe()),
            traceback: Vec::new(),
        })
        .into(),
        _ => ManifestError::InvalidField {
            field: "entry point".into(),
            message: format!("{}: {error}", ep.describe()),
        }
        .into(),
    };
    Box::new(BadManifest { raw: None, error })
}

pub(super) fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}
