//! Plugin signatures: a plugin directory may carry `forgesyte.sig.list`
//! (the canonical list of its files and their SHA-256 digests, see
//! [`list`]) and `forgesyte.sig.list.minisig` (a minisign ed25519
//! signature of that list). The host trusts the public keys of a
//! configured directory ([`TrustedKeys`]) and finds each plugin
//! [`signed`](SignatureState::Signed), [`unsigned`](SignatureState::Unsigned),
//! [`modified`](SignatureState::Modified) or
//! [`invalid`](SignatureState::Invalid) ([`check`]); `forgesyte sign`
//! writes both files ([`sign_dir`]).
//!
//! The files covered are [`integrity::loadable_files`]: `manifest.json`,
//! a native plugin's library, a Python plugin's `*.py` tree, enumerated
//! and hashed by the same code as the integrity pins. Every one of them
//! must be in the list with its current digest; the list may name more
//! (checked the same way).
//!
//! This module reads through the [`FileSystem`] seam and returns plain
//! data; it knows nothing of the registry's writes, the policy
//! (`--require-signed` is the pipeline's) or HTTP.

pub mod keys;
pub mod list;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use forgesyte_deps::FileSystem;
pub use forgesyte_registry::{SignatureInfo, SignatureState};

use crate::integrity;
use crate::manifest::{self, MANIFEST_FILE, Manifest, PLUGIN_PY};
pub use keys::TrustedKeys;

/// The signed list, in the plugin directory.
pub const LIST_FILE: &str = "forgesyte.sig.list";

/// Its minisign signature, beside it.
pub const SIG_FILE: &str = "forgesyte.sig.list.minisig";

/// What [`check`] found: the status shown, and for a `signed` plugin the
/// signed digests (relative path → digest), which the load compares with
/// the bytes it actually opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Status, key id and detail.
    pub info: SignatureInfo,
    /// The signed list; empty unless `signed`.
    pub digests: BTreeMap<String, String>,
}

impl Checked {
    fn new(status: SignatureState, key_id: Option<String>, detail: Option<String>) -> Self {
        Checked {
            info: SignatureInfo {
                status,
                key_id,
                detail,
            },
            digests: BTreeMap::new(),
        }
    }
}

/// Whether `path` exists or is a symbolic link (even a dangling one): one
/// `lstat` when it is absent, the common case of an unsigned plugin.
fn present(fs: &dyn FileSystem, path: &Path) -> bool {
    fs.metadata(path).is_ok()
}

fn read(fs: &dyn FileSystem, path: &Path, max: usize) -> Result<Vec<u8>, String> {
    let bytes = fs
        .read(path, max as u64)
        .map_err(|e| format!("cannot read {}: {e}", file_name(path)))?;
    if bytes.len() > max {
        return Err(format!(
            "{} is larger than the {max}-byte limit",
            file_name(path)
        ));
    }
    Ok(bytes)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Checks the signature of the plugin in `dir` against `keys`.
pub fn check(fs: &dyn FileSystem, dir: &Path, manifest: &Manifest, keys: &TrustedKeys) -> Checked {
    use SignatureState::{Invalid, Modified, Signed, Unsigned};
    let list_path = dir.join(LIST_FILE);
    let sig_path = dir.join(SIG_FILE);
    match (present(fs, &list_path), present(fs, &sig_path)) {
        (false, false) => {
            return Checked::new(
                Unsigned,
                None,
                Some(format!("no {LIST_FILE} and no {SIG_FILE}")),
            );
        }
        (true, false) => {
            return Checked::new(Invalid, None, Some(format!("{SIG_FILE} is missing")));
        }
        (false, true) => {
            return Checked::new(Invalid, None, Some(format!("{LIST_FILE} is missing")));
        }
        (true, true) => {}
    }
    let invalid = |key: Option<&str>, detail: String| {
        Checked::new(Invalid, key.map(str::to_owned), Some(detail))
    };
    let signature = match read(fs, &sig_path, keys::MAX_SIGNATURE_BYTES)
        .and_then(|b| keys::parse_signature(&b).map_err(|e| format!("{SIG_FILE}: {e}")))
    {
        Ok(signature) => signature,
        Err(e) => return invalid(None, e),
    };
    let id = keys::key_id(signature.keynum());
    let Some(key) = keys.get(&id) else {
        return invalid(
            Some(&id),
            format!("signed by key {id}, which is not among {}", keys.describe()),
        );
    };
    let list_bytes = match read(fs, &list_path, list::MAX_LIST_BYTES) {
        Ok(bytes) => bytes,
        Err(e) => return invalid(Some(&id), e),
    };
    if let Err(e) = minisign::verify(
        key,
        &signature,
        Cursor::new(&list_bytes),
        true,
        false,
        false,
    ) {
        return invalid(
            Some(&id),
            format!("the signature of {LIST_FILE} does not verify with key {id}: {e}"),
        );
    }
    let listed = match list::parse_list(&list_bytes) {
        Ok(listed) => listed,
        Err(e) => return invalid(Some(&id), format!("{LIST_FILE}: {e}")),
    };
    let problems = compare(fs, dir, manifest, &listed);
    if !problems.is_empty() {
        return Checked::new(Modified, Some(id), Some(problems.join("; ")));
    }
    Checked {
        info: SignatureInfo {
            status: Signed,
            key_id: Some(id),
            detail: None,
        },
        digests: listed,
    }
}

/// The files the plugin in `dir` would load now that `listed` (relative
/// path → digest) does not hold, by relative path.
///
/// # Errors
///
/// The plugin's files cannot be listed ([`integrity::loadable_files`]).
pub(crate) fn unlisted(
    fs: &dyn FileSystem,
    dir: &Path,
    manifest: &Manifest,
    listed: &BTreeMap<String, String>,
) -> std::io::Result<Vec<String>> {
    let loadable = integrity::loadable_files(fs, dir, manifest)?;
    Ok(loadable
        .into_keys()
        .filter(|rel| !listed.contains_key(rel))
        .collect())
}

/// What differs between the signed list and the directory: each file the
/// plugin loads that is not listed, each listed file missing or changed.
fn compare(
    fs: &dyn FileSystem,
    dir: &Path,
    manifest: &Manifest,
    listed: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match unlisted(fs, dir, manifest, listed) {
        Ok(unlisted) => {
            for rel in unlisted {
                problems.push(format!("{rel} is not in the signed list"));
            }
        }
        Err(e) => problems.push(format!("cannot list the plugin's files: {e}")),
    }
    for (rel, signed) in listed {
        let path = manifest::join_inside(dir, rel);
        if !present(fs, &path) {
            problems.push(format!("{rel} is listed but missing"));
            continue;
        }
        match integrity::file_digest(fs, &path) {
            Ok(now) if &now == signed => {}
            Ok(now) => problems.push(format!(
                "{rel} changed after signing (sha256 now {now}, signed {signed})"
            )),
            Err(e) => problems.push(format!("{rel} cannot be hashed: {e}")),
        }
    }
    problems
}

/// What `forgesyte sign` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignOutcome {
    /// The signing key's id.
    pub key_id: String,
    /// The files listed, by relative path.
    pub files: Vec<String>,
}

/// Lists and hashes the files of the plugin in `dir` and writes
/// [`LIST_FILE`] and its signature [`SIG_FILE`] with `secret`.
///
/// # Errors
///
/// One line: the manifest is unreadable or invalid, a file the plugin
/// loads is missing or unreadable, signing or writing failed.
pub fn sign_dir(
    fs: &dyn FileSystem,
    dir: &Path,
    secret: &minisign::SecretKey,
) -> Result<SignOutcome, String> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = fs
        .read(&manifest_path, manifest::DEFAULT_MAX_MANIFEST_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
    let dir_name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let has_plugin_py = fs.exists(&dir.join(PLUGIN_PY));
    let manifest = manifest::parse_in(&bytes, &manifest_path, &dir_name, has_plugin_py)
        .map_err(|e| e.to_string())?;
    integrity::target_in_dir(fs, dir, &manifest)?;
    let files = integrity::loadable_files(fs, dir, &manifest)
        .map_err(|e| format!("cannot list the plugin's files: {e}"))?;
    let mut digests = BTreeMap::new();
    for (rel, path) in &files {
        let digest =
            integrity::file_digest(fs, path).map_err(|e| format!("cannot hash {rel}: {e}"))?;
        digests.insert(rel.clone(), digest);
    }
    let text = list::format_list(&digests);
    // A name the list cannot hold (a backslash, a carriage return) would
    // make a signature every check refuses: refused here instead.
    list::parse_list(text.as_bytes()).map_err(|why| match why.line {
        Some(_) => format!("cannot sign: a file's name cannot be listed ({why}); rename the file"),
        None => format!("cannot sign: the list of its files is {why}"),
    })?;
    let public = minisign::PublicKey::from_secret_key(secret).map_err(|e| e.to_string())?;
    let key_id = keys::key_id(public.keynum());
    let comment = format!("forgesyte plugin {dir_name}");
    let untrusted = format!("signature from forgesyte key {key_id}");
    let signature = minisign::sign(
        Some(&public),
        secret,
        Cursor::new(text.as_bytes()),
        Some(&comment),
        Some(&untrusted),
    )
    .map_err(|e| format!("cannot sign: {e}"))?;
    // A file the plugin shipped under that name (a link to the signer's
    // key, say) is replaced, never written through.
    // Both written whole before either replaces its old one: a full disk
    // left a new list beside the old signature (the plugin `invalid`).
    let signature = signature.into_string();
    crate::integrity::write_all_replacing(
        dir,
        &[
            (LIST_FILE, text.as_bytes()),
            (SIG_FILE, signature.as_bytes()),
        ],
    )
    .map_err(|e| {
        format!(
            "cannot write {} and {SIG_FILE}: {e}",
            dir.join(LIST_FILE).display()
        )
    })?;
    Ok(SignOutcome {
        key_id,
        files: digests.into_keys().collect(),
    })
}

#[cfg(test)]
mod tests;
