//! The load's side of plugin signatures and of checked bytes: the
//! signature check and its policy (first step of instantiation), opening
//! an in-process library (checked on any thread, loaded on the pass's
//! serial one) from the very bytes that were checked, and the
//! re-check after a runner started (isolated native and Python plugins,
//! preflight), whose code the host does not load itself.
//!
//! What a signature is and how it is verified is [`crate::signature`]'s;
//! this file only decides when, and what a result means for the plugin.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forgesyte_errors::{ImportError, IntegrityError, PluginError};

use super::loader::{Loader, Pending};
use crate::handle::PluginHandle;
use crate::host::PluginLibrary;
use crate::integrity::{self, Target};
use crate::manifest;
use crate::signature::{self, SignatureState};

/// How [`Loader::load_library`] loads an in-process library.
#[derive(Debug)]
pub(super) enum Opening {
    /// No digest was checked: the importer opens (and checks) the file.
    Path,
    /// The bytes whose digest was checked: exactly they are loaded. They
    /// hold their share of the loader's [`ByteBudget`] until then.
    Bytes(Vec<u8>, Reserved),
    /// No digest was checked, but the file's bytes are loaded from a
    /// memory file of their own (`LoaderConfig::copy_libraries`, under
    /// `--watch`), with the identity the file had when they were read (a
    /// failed construction's retry reuses them while it is unchanged). A
    /// plugin in a runner, or a preflight, opens the file as for
    /// [`Opening::Path`].
    Copy(Vec<u8>, Reserved, Option<super::loader::FileIdentity>),
}

/// The most bytes of checked libraries held between their check and their
/// load: checks run ahead of the one thread that loads, and must not hold
/// a whole wave's libraries in memory. One library bigger than this is
/// read when nothing else is held.
const CHECKED_BYTES: u64 = 256 << 20;

/// The bytes of checked libraries that wait for their load.
#[derive(Debug, Default)]
pub(super) struct ByteBudget {
    held: parking_lot::Mutex<u64>,
    freed: parking_lot::Condvar,
}

impl ByteBudget {
    /// Waits until `bytes` more fit (or nothing is held), and holds them.
    fn reserve(self: &Arc<Self>, bytes: u64) -> Reserved {
        let mut held = self.held.lock();
        while *held > 0 && held.saturating_add(bytes) > CHECKED_BYTES {
            self.freed.wait(&mut held);
        }
        *held = held.saturating_add(bytes);
        Reserved {
            budget: Arc::clone(self),
            bytes,
        }
    }
}

/// Bytes held in a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub(super) struct Reserved {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl Reserved {
    /// Holds `bytes` in all, when that is more than is held: at once,
    /// without waiting (what is held already could be what is in the way).
    fn grow_to(&mut self, bytes: u64) {
        if bytes > self.bytes {
            let mut held = self.budget.held.lock();
            *held = held.saturating_add(bytes - self.bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock();
        *held = held.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

impl Loader {
    /// Checks the plugin's signature and records it in the registry.
    /// With [`require_signed`](super::LoaderConfig::require_signed),
    /// anything but `signed` is an [`IntegrityError::SignatureRequired`].
    /// Returns the signed digests (empty unless `signed`).
    pub(super) fn check_signature(
        &self,
        p: &Pending,
    ) -> Result<BTreeMap<String, String>, PluginError> {
        let checked = signature::check(
            self.fs.as_ref(),
            &p.dir,
            &p.manifest,
            &self.trusted_keys.read(),
        );
        let info = &checked.info;
        if info.status != SignatureState::Unsigned {
            tracing::info!(
                plugin = %p.name,
                signature = info.status.as_str(),
                key_id = info.key_id.as_deref().unwrap_or("-"),
                detail = info.detail.as_deref().unwrap_or(""),
                "Signature of {}: {}",
                p.name,
                info.status.as_str()
            );
        }
        let _ = self.registry.set_signature(&p.name, Some(info.clone()));
        if self.config.require_signed && info.status != SignatureState::Signed {
            return Err(IntegrityError::SignatureRequired {
                status: info.status.as_str().to_owned(),
                detail: info.detail.clone().unwrap_or_default(),
            }
            .into());
        }
        // The load parsed the manifest before this check: it must be the
        // bytes that were signed, or every field of it (its sandbox, its
        // interpreter ...) would be unsigned.
        if let (Some(signed), Some(parsed)) = (
            checked.digests.get(crate::manifest::MANIFEST_FILE),
            &p.manifest.source_sha256,
        ) && signed != parsed
        {
            return Err(IntegrityError::ChangedSinceCheck {
                subject: crate::manifest::MANIFEST_FILE.to_owned(),
                detail: format!("the load parsed sha256 {parsed}, the signed one is {signed}"),
            }
            .into());
        }
        Ok(checked.digests)
    }

    /// The first half of opening an in-process plugin's library, which
    /// loads nothing. It may run on any thread but the one that loads: a
    /// checked library's bytes may wait for room in the [`ByteBudget`],
    /// which only loads make. When its digest was
    /// checked (signed, or pinned: `pinned`), the file is read once and
    /// its bytes compared with that digest, and
    /// [`load_library`](Self::load_library) loads exactly those bytes
    /// ([`Importer::open_bytes`](crate::host::Importer::open_bytes)); a
    /// file changed since the check is an
    /// [`IntegrityError::ChangedSinceCheck`]. An unchecked library is
    /// opened at its path (the importer loads it under a new file identity
    /// when the dynamic loader has mapped another version of it), or,
    /// with [`LoaderConfig::copy_libraries`](super::LoaderConfig::copy_libraries),
    /// read to be loaded from a memory file ([`Opening::Copy`]) unless its
    /// run path names `$ORIGIN`.
    pub(super) fn check_library(
        &self,
        p: &Pending,
        library: &Path,
        signed: &BTreeMap<String, String>,
        pinned: Option<String>,
    ) -> Result<Opening, PluginError> {
        let rel = integrity::listed_name(&p.dir, library);
        let listed = rel.as_ref().and_then(|rel| signed.get(rel).cloned());
        let subject = rel.unwrap_or_else(|| library.display().to_string());
        let changed = |detail: String| IntegrityError::ChangedSinceCheck {
            subject: subject.clone(),
            detail,
        };
        // A signed plugin's library is always among its signed files.
        if !signed.is_empty() && listed.is_none() {
            return Err(changed("it is not among the files its signature lists".to_owned()).into());
        }
        // Every digest it was checked against, signed and pinned: each one
        // checked at its own moment, the bytes loaded must match both (a
        // file swapped between the checks passed each).
        let expected: Vec<String> = listed.into_iter().chain(pinned).collect();
        if expected.is_empty() && !self.config.copy_libraries {
            return Ok(Opening::Path);
        }
        // Its size now; a file that grew meanwhile is held in full once
        // read.
        let size = self.fs.metadata(library).map_or(0, |m| m.len);
        let mut reserved = self.checked_bytes.reserve(size);
        // Only copied (`copy_libraries`) when no digest was checked: no
        // check it could fail, and the file's identity kept from before it
        // is read.
        let copy_only = expected.is_empty();
        let identity = if copy_only {
            super::loader::file_identity(library)
        } else {
            None
        };
        let bytes = integrity::read_hashed(self.fs.as_ref(), library).map_err(|e| {
            if copy_only {
                PluginError::from(ImportError::Open {
                    path: library.to_path_buf(),
                    detail: format!("cannot read it to copy it into a memory file: {e}"),
                })
            } else {
                changed(format!("cannot read it again: {e}")).into()
            }
        })?;
        // One that finds libraries beside its file (`$ORIGIN`) is opened at
        // its path, as before: a memory file's `$ORIGIN` finds none.
        if copy_only && crate::native::names_origin(&bytes) {
            return Ok(Opening::Path);
        }
        reserved.grow_to(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        if copy_only {
            return Ok(Opening::Copy(bytes, reserved, identity));
        }
        let now = integrity::sha256_hex(&bytes);
        if let Some(checked) = expected.iter().find(|e| !now.eq_ignore_ascii_case(e)) {
            return Err(changed(format!("sha256 now {now}, checked {checked}")).into());
        }
        Ok(Opening::Bytes(bytes, reserved))
    }

    /// The second half: loads what [`check_library`](Self::check_library)
    /// checked of `library`.
    pub(super) fn load_library(
        &self,
        library: &Path,
        opening: Opening,
    ) -> Result<Arc<dyn PluginLibrary>, PluginError> {
        Ok(match opening {
            Opening::Path => self.importer.open(library)?,
            Opening::Bytes(bytes, _reserved) | Opening::Copy(bytes, _reserved, _) => {
                self.importer.open_bytes(library, &bytes)?
            }
        })
    }

    /// After a runner loaded the plugin's code from its files: checks the
    /// files again (every signed digest, every pin of `target`). A file
    /// swapped between the check and the runner's load, and still in
    /// place, is caught here; the runner is then stopped.
    pub(super) fn recheck_started(
        check: &FileCheck,
        handle: PluginHandle,
    ) -> Result<PluginHandle, PluginError> {
        match check.run() {
            Ok(()) => Ok(handle),
            Err(err) => {
                handle.retire();
                Err(err)
            }
        }
    }

    /// The checks of [`recheck_started`](Self::recheck_started), without a
    /// runner to stop (after a preflight).
    pub(super) fn recheck(
        &self,
        p: &Pending,
        target: &Target,
        signed: &BTreeMap<String, String>,
    ) -> Result<(), PluginError> {
        self.rechecker(p, target, signed)?.run()
    }

    /// The checks of [`recheck`](Self::recheck), kept for the plugin's
    /// restarts ([`FileCheck::is_empty`] when nothing is signed or pinned).
    pub(super) fn rechecker(
        &self,
        p: &Pending,
        target: &Target,
        signed: &BTreeMap<String, String>,
    ) -> Result<FileCheck, PluginError> {
        Ok(FileCheck {
            fs: Arc::clone(&self.fs),
            dir: p.dir.clone(),
            manifest: p.manifest.clone(),
            target: target.clone(),
            pins: self.pins(p)?,
            signed: signed.clone(),
        })
    }
}

/// A plugin's files checked again against what its load checked: every
/// signed digest (and no loadable file beside them that the signature does
/// not list), every pin of its target. After a runner loaded them, at
/// load and at every restart.
pub(super) struct FileCheck {
    fs: Arc<dyn forgesyte_deps::FileSystem>,
    dir: PathBuf,
    manifest: manifest::Manifest,
    target: Target,
    pins: Vec<(String, String)>,
    signed: BTreeMap<String, String>,
}

impl FileCheck {
    /// Whether there is anything to check.
    pub(super) fn is_empty(&self) -> bool {
        self.signed.is_empty() && self.pins.is_empty()
    }

    /// A signed or pinned Python plugin's sources as its runner must find
    /// them (relative path → SHA-256; `None` when nothing is signed or
    /// pinned, or for a native plugin): hashed once more and held against
    /// the signed digests and the pins themselves, never against the disk
    /// a second time, so that a file swapped in for this hashing only is
    /// refused here, and one swapped in after it is refused by the runner,
    /// whenever it imports it (a module imported lazily, inside a call,
    /// included).
    pub(super) fn sources(&self) -> Result<Option<BTreeMap<String, String>>, PluginError> {
        let Target::PythonTree(tree) = &self.target else {
            return Ok(None);
        };
        if self.is_empty() {
            return Ok(None);
        }
        let unreadable = |e: std::io::Error| IntegrityError::ChangedSinceCheck {
            subject: "the plugin's files".to_owned(),
            detail: format!("they cannot be hashed: {e}"),
        };
        let digests = integrity::python_tree_digests(self.fs.as_ref(), tree).map_err(unreadable)?;
        if !self.signed.is_empty()
            && let Some((rel, now)) = digests
                .iter()
                .find(|(rel, now)| self.signed.get(*rel) != Some(*now))
        {
            return Err(IntegrityError::ChangedSinceCheck {
                subject: rel.clone(),
                detail: match self.signed.get(rel) {
                    Some(signed) => format!("sha256 now {now}, signed {signed}"),
                    None => "it appeared, and the signed list does not hold it".to_owned(),
                },
            }
            .into());
        }
        let digest = integrity::sha256_hex(integrity::format_listing(&digests).as_bytes());
        if let Some((what, pin)) = self.pins.iter().find(|(_, pin)| *pin != digest) {
            return Err(IntegrityError::ChangedSinceCheck {
                subject: self.target.describe(&self.dir),
                detail: format!("sha256 now {digest}, pinned by {what} {pin}"),
            }
            .into());
        }
        Ok(Some(digests))
    }

    /// Checks the files.
    pub(super) fn run(&self) -> Result<(), PluginError> {
        let fs = self.fs.as_ref();
        for (rel, expected) in &self.signed {
            let path = manifest::join_inside(&self.dir, rel);
            let now =
                integrity::file_digest(fs, &path).unwrap_or_else(|e| format!("unreadable ({e})"));
            if &now != expected {
                return Err(IntegrityError::ChangedSinceCheck {
                    subject: rel.clone(),
                    detail: format!("sha256 now {now}, signed {expected}"),
                }
                .into());
            }
        }
        if !self.signed.is_empty() {
            // A module dropped in beside the signed ones would be imported.
            let unlisted = signature::unlisted(fs, &self.dir, &self.manifest, &self.signed)
                .map_err(|e| IntegrityError::ChangedSinceCheck {
                    subject: "the plugin's files".to_owned(),
                    detail: format!("they cannot be listed: {e}"),
                })?;
            if let Some(rel) = unlisted.into_iter().next() {
                return Err(IntegrityError::ChangedSinceCheck {
                    subject: rel,
                    detail: "it appeared, and the signed list does not hold it".to_owned(),
                }
                .into());
            }
        }
        integrity::verify(fs, &self.dir, &self.target, &self.pins)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_bytes_wait_for_room_and_a_library_bigger_than_the_budget_still_passes_alone() {
        let budget = Arc::new(ByteBudget::default());
        let first = budget.reserve(CHECKED_BYTES - 10);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let budget = Arc::clone(&budget);
            std::thread::spawn(move || {
                let reserved = budget.reserve(20);
                tx.send(()).unwrap();
                reserved
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "20 more bytes do not fit beside the first reservation"
        );
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("room once the first is given back");
        drop(waiting.join().unwrap());
        assert_eq!(*budget.held.lock(), 0);
        let mut grown = budget.reserve(10);
        grown.grow_to(CHECKED_BYTES * 2);
        assert_eq!(
            *budget.held.lock(),
            CHECKED_BYTES * 2,
            "growing never waits"
        );
        drop(grown);
        assert_eq!(*budget.held.lock(), 0);
        let huge = budget.reserve(CHECKED_BYTES * 3);
        assert_eq!(*budget.held.lock(), CHECKED_BYTES * 3, "alone, it passes");
        drop(huge);
        assert_eq!(*budget.held.lock(), 0);
    }
}
