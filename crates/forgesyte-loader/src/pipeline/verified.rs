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
use std::path::Path;
use std::sync::Arc;

use forgesyte_errors::{IntegrityError, PluginError};

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
    /// The bytes whose digest was checked: exactly they are loaded.
    Bytes(Vec<u8>),
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
            &self.config.trusted_keys,
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
    /// loads nothing and may run on any thread. When its digest was
    /// checked (signed, or pinned: `pinned`), the file is read once and
    /// its bytes compared with that digest, and
    /// [`load_library`](Self::load_library) loads exactly those bytes
    /// ([`Importer::open_bytes`](crate::host::Importer::open_bytes)); a
    /// file changed since the check is an
    /// [`IntegrityError::ChangedSinceCheck`]. An unchecked library is
    /// opened at its path (the importer loads it under a new file identity
    /// when the dynamic loader has mapped another version of it).
    pub(super) fn check_library(
        &self,
        p: &Pending,
        library: &Path,
        signed: &BTreeMap<String, String>,
        pinned: Option<String>,
    ) -> Result<Opening, PluginError> {
        let rel = library
            .strip_prefix(&p.dir)
            .ok()
            .map(|rel| rel.to_string_lossy().into_owned());
        let expected = rel
            .as_ref()
            .and_then(|rel| signed.get(rel).cloned())
            .or(pinned);
        let Some(expected) = expected else {
            return Ok(Opening::Path);
        };
        let subject = rel.unwrap_or_else(|| library.display().to_string());
        let changed = |detail: String| IntegrityError::ChangedSinceCheck {
            subject: subject.clone(),
            detail,
        };
        let bytes = integrity::read_hashed(self.fs.as_ref(), library)
            .map_err(|e| changed(format!("cannot read it again: {e}")))?;
        let now = integrity::sha256_hex(&bytes);
        if !now.eq_ignore_ascii_case(&expected) {
            return Err(changed(format!("sha256 now {now}, checked {expected}")).into());
        }
        Ok(Opening::Bytes(bytes))
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
            Opening::Bytes(bytes) => self.importer.open_bytes(library, &bytes)?,
        })
    }

    /// After a runner loaded the plugin's code from its files: checks the
    /// files again (every signed digest, every pin of `target`). A file
    /// swapped between the check and the runner's load, and still in
    /// place, is caught here; the runner is then stopped.
    pub(super) fn recheck_started(
        &self,
        p: &Pending,
        target: &Target,
        signed: &BTreeMap<String, String>,
        handle: PluginHandle,
    ) -> Result<PluginHandle, PluginError> {
        match self.recheck(p, target, signed) {
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
        for (rel, expected) in signed {
            let path = manifest::join_inside(&p.dir, rel);
            let now = integrity::file_digest(self.fs.as_ref(), &path)
                .unwrap_or_else(|e| format!("unreadable ({e})"));
            if &now != expected {
                return Err(IntegrityError::ChangedSinceCheck {
                    subject: rel.clone(),
                    detail: format!("sha256 now {now}, signed {expected}"),
                }
                .into());
            }
        }
        self.check_integrity(p, target)?;
        Ok(())
    }
}
