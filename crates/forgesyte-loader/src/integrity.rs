//! Integrity pins: the SHA-256 digests a manifest (`"sha256"`) or the
//! operator's lock file (`forgesyte.lock`) holds for a plugin's code, and
//! the digests of what is on disk.
//!
//! # What is hashed
//!
//! - **A native plugin**: its library file (the resolved `entrypoint`), the
//!   SHA-256 of its bytes, as `sha256sum libfoo.so` prints it.
//! - **A Python plugin**: its *source tree*, the SHA-256 of a canonical
//!   listing of every `*.py` file under the plugin directory (for an
//!   installed entry-point package: under the package's directory, the
//!   directory the loader treats as the plugin's), one line per file
//!   sorted by path (bytewise), each line
//!   `<sha256 of the file, 64 lowercase hex>  <path relative to the directory, '/'-separated>\n`
//!   (exactly what `sha256sum` prints). Entries whose name starts with `.`
//!   (hidden files and directories), `__pycache__` directories and
//!   virtual environments (a directory holding `pyvenv.cfg` and no
//!   `__init__.py`: an
//!   interpreter's installation, not the plugin's code; the runner of a
//!   signed or pinned plugin imports nothing from one in its tree) are
//!   skipped; a
//!   symbolic link to a file is hashed as the file it points to;
//!   a tree holding a symbolic link to a directory (other than
//!   `__pycache__`), a `*.py` or `*.so` link that leads to no file, a
//!   `*.py` or `*.so` that is (or leads to) a device, a FIFO or a socket, a path
//!   that is not UTF-8 or one that contains a newline cannot be pinned (an
//!   error).
//!
//! - **A plugin's manifest** (a lock file line's `manifest_sha256`): the
//!   SHA-256 of `manifest.json`'s bytes, compared with those the load
//!   parsed.
//!
//! Digests are written as 64 hexadecimal digits; the host compares them in
//! lowercase.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use forgesyte_deps::FileSystem;
use forgesyte_errors::{IntegrityError, ManifestError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{self, MANIFEST_FILE, Manifest, PLUGIN_PY, Runtime};

/// Writes `bytes` to `dir/name` by replacing that file: into a new file of
/// a random name in `dir` (created exclusively, `O_EXCL`, mode 0666 less
/// the umask), then renamed over `name`. Whatever was at `dir/name` (a
/// link to a file elsewhere, planted by whoever can write `dir`) is
/// replaced, never written through; a failed write leaves nothing behind.
/// Returns the path written.
///
/// # Errors
///
/// When the file cannot be created, written or renamed into place.
pub fn write_replacing(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    write_all_replacing(dir, &[(name, bytes)]).map(|mut paths| paths.remove(0))
}

/// [`write_replacing`] of several files, each written whole (and synced)
/// before any is moved to its name: a full disk leaves all of them as
/// they were (a new signature list beside the old signature left a plugin
/// `invalid`). A rename that fails after an earlier one succeeded (it
/// needs no space: not for want of it) leaves the earlier ones moved.
///
/// # Errors
///
/// The first error writing or moving one (those moved already stay).
pub fn write_all_replacing(dir: &Path, files: &[(&str, &[u8])]) -> io::Result<Vec<PathBuf>> {
    let staged = files
        .iter()
        .map(|(name, bytes)| {
            Ok((
                dir.join(name),
                staged(dir, &format!(".{name}."), 0o666, bytes)?,
            ))
        })
        .collect::<io::Result<Vec<_>>>()?;
    staged
        .into_iter()
        .map(|(path, fresh)| fresh.persist(&path).map(|_| path).map_err(|e| e.error))
        .collect()
}

/// A new file in `dir` named `PREFIXrandom.tmp` (created exclusively,
/// mode `mode` less the umask) holding `bytes`, synced: the caller moves
/// it to its name (`persist`); dropped, it is removed.
pub(crate) fn staged(
    dir: &Path,
    prefix: &str,
    mode: u32,
    bytes: &[u8],
) -> io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut fresh = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    io::Write::write_all(&mut fresh, bytes)?;
    fresh.as_file().sync_all()?;
    Ok(fresh)
}

/// The operator's lock file, in the plugins directory.
pub const LOCK_FILE: &str = "forgesyte.lock";

/// The lock file format this host writes and reads.
pub const LOCK_VERSION: u64 = 1;

/// The largest file the host hashes (4 GiB).
const MAX_HASHED_BYTES: u64 = 4 << 30;

/// The largest lock file the host reads (16 MiB).
pub(crate) const MAX_LOCK_BYTES: u64 = 16 << 20;

/// Validates a pin as written in `field`: 64 hexadecimal digits. Returns it
/// in lowercase.
pub fn parse_pin(field: &str, value: &str) -> Result<String, ManifestError> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(value.to_ascii_lowercase());
    }
    let shown: String = value.chars().take(80).collect();
    Err(ManifestError::InvalidField {
        field: field.to_owned(),
        message: format!("expected a SHA-256 digest (64 hexadecimal digits), found {shown:?}"),
    })
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The digest of one file (at most 4 GiB), read through `fs` as a stream:
/// a large library is hashed without being held in memory.
pub fn file_digest(fs: &dyn FileSystem, path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let hashed = io::copy(&mut fs.reader(path, MAX_HASHED_BYTES)?, &mut hasher)?;
    if hashed > MAX_HASHED_BYTES {
        return Err(too_large());
    }
    Ok(hex::encode(hasher.finalize()))
}

fn too_large() -> io::Error {
    io::Error::other(format!("larger than the {MAX_HASHED_BYTES}-byte limit"))
}

/// The bytes of one file to be hashed (at most 4 GiB), read through `fs`.
pub fn read_hashed(fs: &dyn FileSystem, path: &Path) -> io::Result<Vec<u8>> {
    let bytes = fs.read(path, MAX_HASHED_BYTES)?;
    if bytes.len() as u64 > MAX_HASHED_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// The canonical listing of a Python source tree (see the [module
/// documentation](self)): one `<digest>  <relative path>` line per `*.py`
/// file, sorted by path.
pub fn python_tree_listing(fs: &dyn FileSystem, dir: &Path) -> io::Result<String> {
    Ok(format_listing(&python_tree_digests(fs, dir)?))
}

/// The digest of each file of a Python source tree (as its
/// [listing](python_tree_listing) has them), by relative path.
pub fn python_tree_digests(
    fs: &dyn FileSystem,
    dir: &Path,
) -> io::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    collect_py(fs, dir, "", &mut files)?;
    hash_files(fs, &files)
}

/// The digest of a Python source tree: SHA-256 of its
/// [listing](python_tree_listing).
pub fn python_tree_digest(fs: &dyn FileSystem, dir: &Path) -> io::Result<String> {
    Ok(sha256_hex(python_tree_listing(fs, dir)?.as_bytes()))
}

/// The files a plugin in `dir` loads, by path relative to `dir`
/// (`/`-separated): `manifest.json` (when it is on disk), a native
/// plugin's library as [`Target::of`] names it (whether or not it exists),
/// or every `*.py` file of a Python plugin's tree as the [module
/// documentation](self) defines it. The one enumeration behind the pins'
/// tree digest and the signed list (`crate::signature`).
pub fn loadable_files(
    fs: &dyn FileSystem,
    dir: &Path,
    manifest: &Manifest,
) -> io::Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    let manifest_path = dir.join(MANIFEST_FILE);
    if fs.exists(&manifest_path) {
        files.insert(MANIFEST_FILE.to_owned(), manifest_path);
    }
    match Target::of(dir, manifest) {
        Target::PythonTree(tree) => collect_py(fs, &tree, "", &mut files)?,
        Target::File(library) => {
            let rel = listed_name(dir, &library).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} cannot be listed", library.display()),
                )
            })?;
            files.insert(rel, library);
        }
    }
    Ok(files)
}

/// How `path` (inside `dir`) is named in a listing: its components from
/// `dir` joined by `/`, without `.` or empty ones (a manifest may write
/// `lib//x.so` or `./x.so`, which the signed list's parser refuses); `None`
/// outside `dir`, through `..`, not UTF-8 or holding a newline.
pub fn listed_name(dir: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(dir).ok()?;
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            std::path::Component::Normal(name) => parts.push(name.to_str()?),
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    let name = parts.join("/");
    (!name.is_empty() && !name.contains('\n')).then_some(name)
}

/// The digest of each file of `files` (relative path → path), by the same
/// relative path.
pub fn hash_files(
    fs: &dyn FileSystem,
    files: &BTreeMap<String, PathBuf>,
) -> io::Result<BTreeMap<String, String>> {
    files
        .iter()
        .map(|(rel, path)| Ok((rel.clone(), file_digest(fs, path)?)))
        .collect()
}

/// `digests` (relative path → digest) as `sha256sum` prints them: one
/// `<digest>  <relative path>\n` line per file, sorted by path (bytewise).
pub fn format_listing(digests: &BTreeMap<String, String>) -> String {
    let mut listing = String::new();
    for (rel, digest) in digests {
        let _ = writeln!(listing, "{digest}  {rel}");
    }
    listing
}

/// The file that makes a directory a virtual environment (PEP 405).
const VENV_MARKER: &str = "pyvenv.cfg";

fn collect_py(
    fs: &dyn FileSystem,
    dir: &Path,
    prefix: &str,
    files: &mut BTreeMap<String, PathBuf>,
) -> io::Result<()> {
    for entry in fs.read_dir(dir)? {
        let Some(name) = entry.name.to_str() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a UTF-8 name", entry.path.display()),
            ));
        };
        if hidden(&entry.name) {
            continue;
        }
        if name.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{:?} contains a newline", entry.path.display()),
            ));
        }
        let rel = format!("{prefix}{name}");
        if entry.is_dir {
            if name == "__pycache__" {
                continue;
            }
            // Python imports through a link to a directory (the plugin's
            // directory is first on its path), so what lies behind it is
            // code of the plugin that no listing could pin: refused, not
            // skipped (skipped, a link `numpy -> .stash/numpy` ran unsigned
            // code in a signed plugin).
            if fs.metadata(&entry.path)?.is_symlink {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{rel} is a link to a directory: Python would import what lies behind it, \
                         which no digest covers (copy it into the plugin instead)"
                    ),
                ));
            }
            // A virtual environment (the manifest's `"python":
            // "venv/bin/python"`): an interpreter's installation, not the
            // plugin's code (its `lib64` is a link to a directory, which a
            // plugin's tree may not hold). Not listed, so the runner of a
            // signed or pinned plugin imports nothing from it.
            // A package (`__init__.py`) is never one, whatever it holds.
            if fs
                .metadata(&entry.path.join(VENV_MARKER))
                .is_ok_and(|m| m.is_file)
                && !fs.exists(&entry.path.join("__init__.py"))
            {
                continue;
            }
            collect_py(fs, &entry.path, &format!("{rel}/"), files)?;
            continue;
        }
        // Everything Python runs from the tree: sources, extension modules
        // (the runner never reads a plugin's bytecode), and the versioned
        // shared libraries extension modules load beside them
        // (`libfast.so.1`).
        if name.ends_with(".py") || name.ends_with(".so") || is_versioned_library(name) {
            let meta = fs.metadata(&entry.path)?;
            if meta.is_file {
                files.insert(rel, entry.path.clone());
            } else if meta.is_symlink && fs.canonicalize(&entry.path).is_err() {
                // A link that leads to no file now: what appears behind it
                // later is code Python imports and no digest covers.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{rel} is a link that leads to no file: Python would import what appears \
                         behind it later, which no digest covers (remove it, or copy the file in)"
                    ),
                ));
            } else {
                // A FIFO, a device or a socket (itself, or behind a link):
                // no digest can cover what Python would read from it.
                let is = if meta.is_symlink {
                    "is a link to something that is"
                } else {
                    "is"
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{rel} {is} neither a regular file nor a directory (a device, a FIFO or a \
                         socket): no digest covers what Python would read from it (remove it, or \
                         copy the file in)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `NAME.so.1`, `NAME.so.1.2.3`: a shared library's versioned file name.
fn is_versioned_library(name: &str) -> bool {
    name.split_once(".so.").is_some_and(|(stem, version)| {
        !stem.is_empty()
            && !version.is_empty()
            && version
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// What a plugin's pin covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A native plugin's library file.
    File(PathBuf),
    /// A Python plugin's source tree (the directory).
    PythonTree(PathBuf),
}

impl Target {
    /// The target of a plugin in `dir`: the Python source tree, or the
    /// library the manifest names (`lib<name>.so` when it names none)
    /// inside the directory.
    pub fn of(dir: &Path, manifest: &Manifest) -> Target {
        match manifest.runtime {
            Runtime::Python => Target::PythonTree(dir.to_path_buf()),
            Runtime::Native => Target::File(manifest::join_inside(dir, &default_library(manifest))),
        }
    }

    /// How a reason names it: the library's path relative to `dir` (or
    /// whole when outside it), or `the Python source tree of DIR`.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            Target::File(path) => path.strip_prefix(dir).unwrap_or(path).display().to_string(),
            Target::PythonTree(tree) => {
                format!("the Python source tree (*.py) of {}", tree.display())
            }
        }
    }

    /// Its digest now.
    pub fn digest(&self, fs: &dyn FileSystem) -> io::Result<String> {
        match self {
            Target::File(path) => file_digest(fs, path),
            Target::PythonTree(dir) => python_tree_digest(fs, dir),
        }
    }
}

/// The library a native manifest names, or `lib<name>.so`.
pub fn default_library(manifest: &Manifest) -> String {
    manifest
        .entrypoint
        .clone()
        .unwrap_or_else(|| format!("lib{}.so", manifest.name.replace(['-', '.'], "_")))
}

/// The operator's lock file: each plugin directory's digest, by the
/// directory's name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// [`LOCK_VERSION`].
    pub version: u64,
    /// By plugin directory name (the directory inside the plugins
    /// directory, not the manifest's `id`).
    pub plugins: BTreeMap<String, LockEntry>,
}

/// One plugin's line in the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    /// The digest (see the [module documentation](self)).
    pub sha256: String,
    /// What was hashed, for people: the library file (`libocr.so`) or
    /// `*.py` for a Python source tree. Not used when checking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<String>,
    /// The digest of the plugin's `manifest.json` (its bytes, as
    /// `sha256sum` prints it): the manifest decides what runs (its
    /// interpreter, isolation, entrypoint), so a changed one is refused as
    /// a changed library is. Lock files written before it have none (the
    /// manifest is then not pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

/// Reads `plugins_dir/forgesyte.lock`: `None` when there is none, an error
/// when it exists but cannot be used.
pub fn read_lock(fs: &dyn FileSystem, plugins_dir: &Path) -> Result<Option<Lock>, IntegrityError> {
    let path = plugins_dir.join(LOCK_FILE);
    if !fs.exists(&path) && !fs.metadata(&path).is_ok_and(|m| m.is_symlink) {
        return Ok(None);
    }
    let invalid = |detail: String| IntegrityError::LockFile {
        path: path.clone(),
        detail,
    };
    let bytes = fs
        .read(&path, MAX_LOCK_BYTES)
        .map_err(|e| invalid(e.to_string()))?;
    if bytes.len() as u64 > MAX_LOCK_BYTES {
        return Err(invalid(format!(
            "larger than the {MAX_LOCK_BYTES}-byte limit"
        )));
    }
    let mut lock: Lock = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if lock.version != LOCK_VERSION {
        return Err(invalid(format!(
            "version {} is not {LOCK_VERSION}, the version this host reads",
            lock.version
        )));
    }
    // Kept as they are compared: in lowercase (an uppercase pin failed
    // every Python plugin's check after its load).
    for (name, entry) in &mut lock.plugins {
        entry.sha256 = parse_pin(&format!("plugins.{name}.sha256"), &entry.sha256)
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(pin) = &entry.manifest_sha256 {
            entry.manifest_sha256 = Some(
                parse_pin(&format!("plugins.{name}.manifest_sha256"), pin)
                    .map_err(|e| invalid(e.to_string()))?,
            );
        }
    }
    Ok(Some(lock))
}

/// Checks `target`'s digest against every pin (`(who pins it, digest)`),
/// hashing it once, only when there is a pin. `dir` is the plugin
/// directory, for naming the target. Returns the digest that matched
/// (`None`: no pin, nothing hashed).
pub fn verify(
    fs: &dyn FileSystem,
    dir: &Path,
    target: &Target,
    pins: &[(String, String)],
) -> Result<Option<String>, IntegrityError> {
    if pins.is_empty() {
        return Ok(None);
    }
    let subject = target.describe(dir);
    let actual = target.digest(fs).map_err(|e| IntegrityError::Unreadable {
        subject: subject.clone(),
        detail: e.to_string(),
    })?;
    for (pinned_by, expected) in pins {
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(IntegrityError::Mismatch {
                subject,
                actual,
                pinned_by: pinned_by.clone(),
                expected: expected.to_ascii_lowercase(),
            });
        }
    }
    Ok(Some(actual))
}

/// What `forgesyte lock` found in a plugins directory.
#[derive(Debug, Default)]
pub struct LockOutcome {
    /// The lock of every plugin that could be hashed.
    pub lock: Lock,
    /// Plugin directories left out, and why.
    pub skipped: Vec<(String, String)>,
}

/// Hashes every plugin directory (a directory holding `manifest.json`)
/// directly under `plugins_dir`.
pub fn lock_dir(fs: &dyn FileSystem, plugins_dir: &Path) -> io::Result<LockOutcome> {
    let mut outcome = LockOutcome {
        lock: Lock {
            version: LOCK_VERSION,
            plugins: BTreeMap::new(),
        },
        skipped: Vec::new(),
    };
    for entry in fs.read_dir(plugins_dir)? {
        if hidden(&entry.name) {
            continue;
        }
        let manifest_path = entry.path.join(MANIFEST_FILE);
        // As a load pass: a directory without a manifest is no plugin; one
        // whose manifest cannot be looked at (no permission) is one that
        // cannot be locked, said so, not left out in silence.
        if !entry.is_dir
            || matches!(fs.metadata(&manifest_path), Err(e) if e.kind() == io::ErrorKind::NotFound)
        {
            continue;
        }
        let dir_name = entry.name.to_string_lossy().into_owned();
        match lock_one(fs, &entry.path, &manifest_path, &dir_name) {
            Ok(line) => {
                outcome.lock.plugins.insert(dir_name, line);
            }
            Err(why) => outcome.skipped.push((dir_name, why)),
        }
    }
    Ok(outcome)
}

/// Whether an entry of the plugins directory is hidden (`.name`): a
/// backup copy (`.echo-old`), an editor's or a tool's directory (`.git`,
/// `.venv`). No plugin: a load pass, a rescan, `lock` and `serve --watch`
/// all leave it out (a stale copy sorted first and took its plugin's
/// name); nor is a hidden file of a plugin hashed.
pub fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}

/// What `lock` and `sign` hash of the plugin in `dir`; a native library
/// that is not in the directory (one the server finds on `--lib-path`) is
/// an error saying so, the same for both.
pub fn target_in_dir(
    fs: &dyn FileSystem,
    dir: &Path,
    manifest: &Manifest,
) -> Result<Target, String> {
    let target = Target::of(dir, manifest);
    if let Target::File(path) = &target
        && !fs.exists(path)
    {
        return Err(format!(
            "library {} is not in the plugin directory (copy it there from where the server \
             finds it, --lib-path)",
            target.describe(dir)
        ));
    }
    Ok(target)
}

fn lock_one(
    fs: &dyn FileSystem,
    dir: &Path,
    manifest_path: &Path,
    dir_name: &str,
) -> Result<LockEntry, String> {
    let bytes = fs
        .read(manifest_path, manifest::DEFAULT_MAX_MANIFEST_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
    let has_plugin_py = || fs.exists(&dir.join(PLUGIN_PY));
    let manifest = manifest::parse_asking(&bytes, manifest_path, dir_name, &has_plugin_py)
        .map_err(|e| e.to_string())?;
    let target = target_in_dir(fs, dir, &manifest)?;
    let sha256 = target
        .digest(fs)
        .map_err(|e| format!("cannot hash {}: {e}", target.describe(dir)))?;
    let of = match &target {
        Target::File(_) => target.describe(dir),
        Target::PythonTree(_) => "*.py".to_owned(),
    };
    Ok(LockEntry {
        sha256,
        of: Some(of),
        manifest_sha256: Some(sha256_hex(&bytes)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgesyte_deps::RealFs;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn a_listed_name_is_normalised_and_stays_inside() {
        let dir = Path::new("/p/x");
        for (path, name) in [
            ("/p/x/lib//libx.so", Some("lib/libx.so")),
            ("/p/x/./libx.so", Some("libx.so")),
            ("/p/x/libx.so", Some("libx.so")),
            ("/p/x/lib/../../y.so", None),
            ("/q/libx.so", None),
            ("/p/x", None),
        ] {
            assert_eq!(listed_name(dir, Path::new(path)).as_deref(), name, "{path}");
        }
    }

    #[test]
    fn pins_are_64_hex_digits() {
        let upper = EMPTY.to_ascii_uppercase();
        assert_eq!(parse_pin("sha256", &upper).ok().as_deref(), Some(EMPTY));
        for bad in [
            "",
            "abc",
            &EMPTY[1..],
            &format!("{EMPTY}0"),
            &EMPTY.replace('e', "g"),
        ] {
            let err = parse_pin("sha256", bad).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.starts_with("invalid field 'sha256'")),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn a_file_digest_is_sha256sum() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("libx.so");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(
            file_digest(&RealFs, &path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex(b""), EMPTY);
    }

    /// A virtual environment in the plugin (`"python": "venv/bin/python"`)
    /// is the interpreter's installation: skipped, its `lib64` link to a
    /// directory with it; a directory without `pyvenv.cfg` is listed.
    #[test]
    fn a_virtual_environment_in_a_python_tree_is_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let site = root.join("venv/lib/python3.11/site-packages/sympy");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(site.join("__init__.py"), "x").unwrap();
        std::os::unix::fs::symlink("lib", root.join("venv/lib64")).unwrap();
        std::fs::write(root.join("plugin.py"), "import sympy").unwrap();
        assert!(python_tree_listing(&RealFs, root).is_err());
        std::fs::write(root.join("venv").join(VENV_MARKER), "home = /usr/bin\n").unwrap();
        // A package is listed whatever it holds: a `pyvenv.cfg` put there
        // does not take its modules out of a signature.
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/__init__.py"), "x").unwrap();
        std::fs::write(root.join("sub").join(VENV_MARKER), "home = /usr/bin\n").unwrap();
        // A `pyvenv.cfg` that is a directory makes none either (the runner
        // reads a file).
        std::fs::create_dir_all(root.join("ns/pyvenv.cfg")).unwrap();
        std::fs::write(root.join("ns/mod.py"), "x").unwrap();
        let listed = python_tree_digests(&RealFs, root).unwrap();
        assert_eq!(
            listed.keys().collect::<Vec<_>>(),
            ["ns/mod.py", "plugin.py", "sub/__init__.py"],
            "{listed:?}"
        );
    }

    #[test]
    fn a_link_to_a_directory_in_a_python_tree_cannot_be_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join(".stash/numpy")).unwrap();
        std::fs::write(root.join(".stash/numpy/__init__.py"), "x").unwrap();
        std::fs::write(root.join("plugin.py"), "import numpy").unwrap();
        assert!(python_tree_listing(&RealFs, root).is_ok());
        // `import numpy` would run `.stash/numpy/__init__.py`, never listed.
        std::os::unix::fs::symlink(".stash/numpy", root.join("numpy")).unwrap();
        let err = python_tree_listing(&RealFs, root).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("numpy is a link to a directory"),
            "{err}"
        );
        // A link to `__pycache__` is skipped like the directory (the runner
        // never reads bytecode).
        std::fs::remove_file(root.join("numpy")).unwrap();
        std::os::unix::fs::symlink(".stash", root.join("__pycache__")).unwrap();
        assert!(python_tree_listing(&RealFs, root).is_ok());
        // A link to a file is listed as the file; one that leads nowhere
        // (yet) cannot be listed: what appeared there later would be
        // imported unlisted.
        std::os::unix::fs::symlink(".stash/numpy/__init__.py", root.join("helper.py")).unwrap();
        let listing = python_tree_listing(&RealFs, root).unwrap();
        assert!(listing.contains("  helper.py\n"), "{listing}");
        std::os::unix::fs::symlink(root.join("later.py"), root.join("dangling.py")).unwrap();
        let err = python_tree_listing(&RealFs, root).unwrap_err();
        assert!(
            err.to_string()
                .contains("dangling.py is a link that leads to no file"),
            "{err}"
        );
        // One that leads to a device, or a FIFO in the tree: no file
        // either, and said as what it is.
        std::fs::remove_file(root.join("dangling.py")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("zero.py")).unwrap();
        let err = python_tree_listing(&RealFs, root).unwrap_err();
        assert!(
            err.to_string().contains(
                "zero.py is a link to something that is neither a regular file nor a \
                 directory (a device, a FIFO or a socket)"
            ),
            "{err}"
        );
        std::fs::remove_file(root.join("zero.py")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("pipe.py"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        let err = python_tree_listing(&RealFs, root).unwrap_err();
        assert!(
            err.to_string()
                .contains("pipe.py is neither a regular file nor a directory"),
            "{err}"
        );
    }

    #[test]
    fn the_tree_listing_is_canonical() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for dir in ["pkg/sub", "__pycache__", ".git", "pkg/__pycache__"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for (file, text) in [
            ("plugin.py", "abc"),
            ("pkg/sub/z.py", ""),
            ("pkg/a.py", "abc"),
            ("notes.txt", "x"),
            (".hidden.py", "x"),
            ("__pycache__/plugin.py", "x"),
            (".git/hook.py", "x"),
            ("pkg/__pycache__/a.py", "x"),
        ] {
            std::fs::write(root.join(file), text).unwrap();
        }
        // A link to a file counts as the file.
        std::os::unix::fs::symlink("pkg/a.py", root.join("link.py")).unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let listing = python_tree_listing(&RealFs, root).unwrap();
        assert_eq!(
            listing,
            format!("{abc}  link.py\n{abc}  pkg/a.py\n{EMPTY}  pkg/sub/z.py\n{abc}  plugin.py\n")
        );
        let digest = python_tree_digest(&RealFs, root).unwrap();
        assert_eq!(digest, sha256_hex(listing.as_bytes()));
        // Any change to a .py file, added or removed, changes the digest;
        // other files do not.
        std::fs::write(root.join("notes.txt"), "y").unwrap();
        assert_eq!(python_tree_digest(&RealFs, root).unwrap(), digest);
        std::fs::write(root.join("pkg/sub/z.py"), " ").unwrap();
        assert_ne!(python_tree_digest(&RealFs, root).unwrap(), digest);
        std::fs::write(root.join("pkg/sub/z.py"), "").unwrap();
        std::fs::write(root.join("pkg/new.py"), "").unwrap();
        assert_ne!(python_tree_digest(&RealFs, root).unwrap(), digest);
        // Extension modules are code Python runs: covered; bytecode, which
        // the runner never reads, is not.
        std::fs::remove_file(root.join("pkg/new.py")).unwrap();
        std::fs::write(root.join("pkg/__pycache__/a.cpython-311.pyc"), "x").unwrap();
        assert_eq!(python_tree_digest(&RealFs, root).unwrap(), digest);
        std::fs::write(root.join("pkg/fast.cpython-311-x86_64-linux-gnu.so"), "").unwrap();
        assert!(
            python_tree_listing(&RealFs, root)
                .unwrap()
                .contains(&format!(
                    "{EMPTY}  pkg/fast.cpython-311-x86_64-linux-gnu.so\n"
                ))
        );
        // So are the versioned libraries extension modules load beside
        // them; names that only look alike are not.
        let before = python_tree_digest(&RealFs, root).unwrap();
        for other in ["pkg/notes.so.txt", "pkg/x.so.", "pkg/.so.1"] {
            std::fs::write(root.join(other), "x").unwrap();
        }
        assert_eq!(python_tree_digest(&RealFs, root).unwrap(), before);
        std::fs::write(root.join("pkg/libfast.so.1.2"), "").unwrap();
        assert!(
            python_tree_listing(&RealFs, root)
                .unwrap()
                .contains(&format!("{EMPTY}  pkg/libfast.so.1.2\n"))
        );
    }

    #[test]
    fn lock_files_are_read_strictly() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(read_lock(&RealFs, tmp.path()), Ok(None));
        let path = tmp.path().join(LOCK_FILE);
        let write = |text: String| std::fs::write(&path, text).unwrap();
        write(format!(
            r#"{{"version": 1, "plugins": {{"ocr": {{"sha256": "{EMPTY}", "of": "libocr.so"}}}}}}"#
        ));
        let lock = read_lock(&RealFs, tmp.path()).unwrap().unwrap();
        assert_eq!(lock.plugins["ocr"].sha256, EMPTY);
        for (text, detail) in [
            ("{".to_owned(), "EOF while parsing"),
            (r#"{"version": 2, "plugins": {}}"#.to_owned(), "version 2"),
            (
                r#"{"version": 1, "plugins": {"ocr": {"sha256": "12"}}}"#.to_owned(),
                "invalid field 'plugins.ocr.sha256'",
            ),
        ] {
            write(text);
            let err = read_lock(&RealFs, tmp.path()).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("lock file {} is invalid", path.display()))
                    && err.contains(detail),
                "{err}"
            );
        }
    }

    #[test]
    fn verify_names_the_file_and_both_digests() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libx.so");
        std::fs::write(&lib, "").unwrap();
        let target = Target::File(lib);
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(verify(&RealFs, tmp.path(), &target, &[]), Ok(None));
        let pins = [("the manifest".to_owned(), EMPTY.to_ascii_uppercase())];
        assert_eq!(
            verify(&RealFs, tmp.path(), &target, &pins),
            Ok(Some(EMPTY.to_owned()))
        );
        let pins = [
            ("the manifest".to_owned(), EMPTY.to_owned()),
            ("the lock file /p/forgesyte.lock".to_owned(), abc.to_owned()),
        ];
        let err = verify(&RealFs, tmp.path(), &target, &pins).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("sha256 of libx.so is {EMPTY}, the lock file /p/forgesyte.lock pins {abc}")
        );
        let gone = Target::File(tmp.path().join("gone.so"));
        let err = verify(&RealFs, tmp.path(), &gone, &pins).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot compute the sha256 of gone.so: "),
            "{err}"
        );
    }
}
