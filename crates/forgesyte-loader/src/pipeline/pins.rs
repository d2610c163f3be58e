//! A plugin's integrity pins (its manifest's `sha256`, its line in the
//! lock file beside its directory) and their check. A part of instantiation
//! ([`super::instantiate`]) and of the interpreter policy
//! ([`super::interpreter`]); knows digests and lock files, nothing of what
//! is loaded.

use forgesyte_errors::{IntegrityError, PluginError};

use super::loader::{Loader, Pending};
use crate::integrity::{self, Target};
use crate::manifest;

impl Loader {
    /// Checks `target` (the plugin's library or Python source tree) against
    /// the manifest's `sha256` and the lock file's line for the plugin
    /// directory (both must match). The lock file is `forgesyte.lock` in the
    /// directory that holds the plugin directory; installed entry-point
    /// plugins are pinned by their manifest only.
    /// Returns the digest that matched (`None`: no pin).
    pub(super) fn check_integrity(
        &self,
        p: &Pending,
        target: &Target,
    ) -> Result<Option<String>, PluginError> {
        let pins = self.pins(p)?;
        Ok(integrity::verify(self.fs.as_ref(), &p.dir, target, &pins)?)
    }

    /// The digests `p`'s target is pinned to: its manifest's `sha256`, its
    /// line of the plugins directory's lock file; each with where it comes
    /// from.
    pub(super) fn pins(&self, p: &Pending) -> Result<Vec<(String, String)>, PluginError> {
        let mut pins = Vec::new();
        if let Some(pin) = &p.manifest.sha256 {
            pins.push(("the manifest".to_owned(), pin.clone()));
        }
        if let Some((who, line)) = self.lock_line(p)? {
            pins.push((who, line.sha256));
        }
        Ok(pins)
    }

    /// `p`'s line of the plugins directory's lock file, with how a reason
    /// names the file (installed entry-point plugins have none).
    fn lock_line(
        &self,
        p: &Pending,
    ) -> Result<Option<(String, integrity::LockEntry)>, PluginError> {
        let installed = self.entry_points.read().contains_key(&p.name);
        if let (false, Some(parent), Some(dir_name)) =
            (installed, p.dir.parent(), p.dir.file_name())
            && let Some(lock) = self.pass.lock(self.fs.as_ref(), parent)?
            && let Some(line) = lock.plugins.get(&*dir_name.to_string_lossy())
        {
            let who = format!(
                "the lock file {}",
                parent.join(integrity::LOCK_FILE).display()
            );
            return Ok(Some((who, line.clone())));
        }
        Ok(None)
    }

    /// Checks the manifest the load parsed against its lock file line's
    /// `manifest_sha256`, when it has one: a manifest changed since `lock`
    /// (a new interpreter, entrypoint or isolation) runs nothing, not even
    /// the dependency check of an interpreter it names.
    pub(super) fn check_manifest_pin(&self, p: &Pending) -> Result<(), PluginError> {
        let Some((who, line)) = self.lock_line(p)? else {
            return Ok(());
        };
        let (Some(expected), Some(actual)) = (line.manifest_sha256, &p.manifest.source_sha256)
        else {
            return Ok(());
        };
        if &expected == actual {
            return Ok(());
        }
        Err(IntegrityError::Mismatch {
            subject: manifest::MANIFEST_FILE.to_owned(),
            actual: actual.clone(),
            pinned_by: who,
            expected,
        }
        .into())
    }
}
