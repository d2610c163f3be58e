//! Registration: a plugin's key in the registry (duplicates never
//! overwrite), and recording each plugin's final state and outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use forgesyte_errors::{IntegrityError, ManifestError, PluginError};
use forgesyte_registry::{PluginInfo, PluginLifecycleState, SignatureInfo, SignatureState};

use super::discovery::{BadManifest, dir_name};
use super::loader::{Entry, Loader, Pending};
use super::report::{PluginLoadOutcome, ms};
use crate::handle::PluginHandle;
use crate::manifest::{self, Manifest};

/// A plugin directory read and validated (or not), before it has a key.
pub(super) struct Claim<'a> {
    dir: &'a Path,
    dir_key: String,
    wanted: String,
    info: PluginInfo,
    raw: Option<Arc<serde_json::Value>>,
    optional: bool,
    outcome: Result<Manifest, PluginError>,
    started: Instant,
}

impl Claim<'_> {
    /// Whether its manifest is valid.
    pub(super) fn is_valid(&self) -> bool {
        self.outcome.is_ok()
    }

    /// The name its manifest asks for.
    pub(super) fn wanted(&self) -> &str {
        &self.wanted
    }
}

impl Loader {
    /// Of valid manifests that claim the same name, those signed by a
    /// trusted key claim it first: a directory that sorts first (or
    /// appeared later) cannot take a signed plugin's name and make it the
    /// duplicate, under `--require-signed` FAILED for good. Otherwise the
    /// order stays the directories'. Only claims of a name claimed twice
    /// are checked (the signature check hashes the plugin's files; it runs
    /// again at instantiation).
    fn signed_first(&self, claims: &mut Vec<Claim<'_>>) {
        let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for c in claims.iter() {
            *counts.entry(c.wanted.as_str()).or_default() += 1;
        }
        let contested: std::collections::HashSet<String> = counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(name, _)| name.to_owned())
            .collect();
        if contested.is_empty() {
            return;
        }
        let keys = self.trusted_keys.read();
        let mut keyed: Vec<(bool, Claim<'_>)> = claims
            .drain(..)
            .map(|c| {
                let late = contested.contains(&c.wanted)
                    && c.outcome.as_ref().is_ok_and(|manifest| {
                        crate::signature::check(self.fs.as_ref(), c.dir, manifest, &keys)
                            .info
                            .status
                            != crate::signature::SignatureState::Signed
                    });
                (late, c)
            })
            .collect();
        // Stable: the order of the directories otherwise.
        keyed.sort_by_key(|(late, _)| *late);
        claims.extend(keyed.into_iter().map(|(_, c)| c));
    }

    /// What registering the plugin of `dir` needs: the name it wants, its
    /// registry info and its manifest (or why it has none).
    pub(super) fn claim_of<'a>(
        &self,
        dir: &'a Path,
        result: Result<Manifest, Box<BadManifest>>,
        started: Instant,
    ) -> Claim<'a> {
        let dir_key = manifest::key_from_dir_name(&dir_name(dir));
        let source = Some(dir.to_path_buf());
        let (wanted, info, raw, optional, outcome) = match result {
            Ok(m) => {
                let info = PluginInfo {
                    description: m.description.clone(),
                    version: Some(m.version.clone()),
                    source,
                };
                (
                    m.name.clone(),
                    info,
                    Some(Arc::clone(&m.raw)),
                    m.optional,
                    Ok(m),
                )
            }
            Err(bad) => {
                let claimed = bad.claimed_name_or(&dir_key);
                let (description, version) = (bad.description(), bad.version());
                let BadManifest { raw, error: err } = *bad;
                let info = PluginInfo {
                    description,
                    version: version.or_else(unknown_version),
                    source,
                };
                (claimed, info, raw.map(Arc::new), false, Err(err))
            }
        };
        Claim {
            dir,
            dir_key,
            wanted,
            info,
            raw,
            optional,
            outcome,
            started,
        }
    }

    /// Registers the plugins of `claims` in order, each under the name it
    /// wants or, when that is taken, a key from its directory (a
    /// duplicate; see [`claim`](Self::claim)). Runs of free names are
    /// registered in one registry write each ([`Registry::register_all`]:
    /// one per pass when no name collides), so a pass of N plugins does
    /// not copy the registry's map N times; the keys come out as one by
    /// one. Valid plugins go to `pending`; returns the keys (with their
    /// directories and start times) of those already final (a bad manifest
    /// or a duplicate).
    ///
    /// [`Registry::register_all`]: forgesyte_registry::Registry::register_all
    pub(super) fn register_claims<'a>(
        &self,
        claims: Vec<Claim<'a>>,
        asked: &BTreeSet<String>,
        pending: &mut BTreeMap<String, Pending>,
    ) -> Vec<(String, &'a Path, Instant)> {
        // Valid manifests claim their names first: a broken one that asks
        // for a valid plugin's name never takes it (it is registered under
        // its directory's key instead, with its own error).
        let (mut claims, broken): (Vec<_>, Vec<_>) =
            claims.into_iter().partition(|c| c.outcome.is_ok());
        self.signed_first(&mut claims);
        claims.extend(broken);
        let names: Vec<(String, PluginInfo)> = claims
            .iter()
            .map(|c| (c.wanted.clone(), c.info.clone()))
            .collect();
        let mut registered_until = 0;
        let mut finals = Vec::new();
        for (i, c) in claims.into_iter().enumerate() {
            if i == registered_until {
                registered_until += self.registry.register_all(&names[i..]);
            }
            let (name, outcome) = if i < registered_until {
                (c.wanted, c.outcome)
            } else {
                // Taken: the run of free names ends here.
                registered_until = i + 1;
                match self.claim(&c.wanted, (&c.dir_key, asked), c.dir, c.info) {
                    Ok(name) => (name, c.outcome),
                    // A broken manifest keeps its own error.
                    Err((name, _)) if c.outcome.is_err() => (name, c.outcome),
                    Err((name, existing)) => (
                        name,
                        Err(PluginError::from(ManifestError::DuplicateName {
                            name: c.wanted.clone(),
                            existing,
                            this: None,
                        })),
                    ),
                }
            };
            self.entries.write().insert(
                name.clone(),
                Entry::registered(c.dir.to_path_buf(), c.raw, c.optional, &outcome),
            );
            match outcome {
                Ok(manifest) => {
                    pending.insert(
                        name.clone(),
                        Pending {
                            name,
                            dir: c.dir.to_path_buf(),
                            manifest,
                            started: c.started,
                        },
                    );
                }
                Err(err) => {
                    self.record_failure(&name, &err);
                    finals.push((name, c.dir, c.started));
                }
            }
        }
        finals
    }

    /// Registers a plugin whose name `wanted` is taken under `key` (its
    /// directory's or entry point's) when that differs and no valid
    /// manifest of the pass asks for it (`asked`), else (or when that is
    /// taken too) under `KEY~duplicate`, `KEY~duplicate2`, …, and returns
    /// the key. `~` is in no plugin's name, so such a key never holds a
    /// name another plugin may ask for (a `NAME.duplicate` did, and a
    /// plugin of that name was then FAILED as the duplicate; a directory
    /// key asked for by a plugin registered later in the pass did too).
    pub(super) fn register_duplicate(
        &self,
        wanted: &str,
        key: &str,
        info: PluginInfo,
        asked: &BTreeSet<String>,
    ) -> String {
        if key != wanted
            && !asked.contains(key)
            && self.registry.register(key, info.clone()).is_ok()
        {
            return key.to_owned();
        }
        let mut candidate = format!("{key}~duplicate");
        let mut n = 1;
        while self.registry.register(&candidate, info.clone()).is_err() {
            n += 1;
            candidate = format!("{key}~duplicate{n}");
        }
        candidate
    }

    /// Registers under `wanted`; if that name is taken, registers under a
    /// key derived from the directory instead ([`Self::register_duplicate`])
    /// and returns `Err` with it and the directory that holds the name.
    fn claim(
        &self,
        wanted: &str,
        (dir_key, asked): (&str, &BTreeSet<String>),
        dir: &Path,
        info: PluginInfo,
    ) -> Result<String, (String, PathBuf)> {
        if self.registry.register(wanted, info.clone()).is_ok() {
            return Ok(wanted.to_owned());
        }
        let existing = self
            .plugin_dir(wanted)
            .unwrap_or_else(|| PathBuf::from("(registered earlier)"));
        let candidate = self.register_duplicate(wanted, dir_key, info, asked);
        tracing::error!(
            name = wanted,
            dir = %dir.display(),
            existing = %existing.display(),
            "Duplicate plugin name '{wanted}' in {}: registered as '{candidate}'",
            dir.display()
        );
        Err((candidate, existing))
    }

    pub(super) fn mark_loaded(&self, p: &Pending, handle: PluginHandle) {
        let _ = self.registry.set_confinement(&p.name, handle.confinement());
        if let Some(entry) = self.entries.write().get_mut(&p.name) {
            entry.handle = Some(handle.clone());
            entry.last_tools = None;
        }
        match handle.mark_first_initialized() {
            // Its runner ended while the rest of its wave was constructed:
            // its supervisor has recorded that, and restarts it.
            None => {
                tracing::debug!(plugin = %p.name, "its first runner already ended: the state is its supervisor's")
            }
            Some(Ok(())) => tracing::info!(
                plugin = %p.name,
                version = %p.manifest.version,
                "✓ Loaded plugin: {} ({})",
                p.name,
                p.manifest.version
            ),
            Some(Err(e)) => {
                tracing::error!(plugin = %p.name, error = %e, "registry refused INITIALIZED");
            }
        }
    }

    /// A signed plugin whose files changed between the signature's check
    /// and their load: what is on disk is no longer what was signed, and
    /// its signature reads `modified`, naming the file, beside the
    /// `IntegrityError` reason (not `signed`, which held only at the check).
    fn signature_changed_since_check(&self, name: &str, err: &PluginError) {
        let PluginError::Integrity(IntegrityError::ChangedSinceCheck { subject, .. }) = err else {
            return;
        };
        // Not a file that changed: the files could not be hashed, listed
        // or handed on again (too many open files, say).
        if subject == "the plugin's files" {
            return;
        }
        let Some(signed) = self
            .registry
            .get_status(name)
            .and_then(|s| s.signature)
            .filter(|s| s.status == SignatureState::Signed)
        else {
            return;
        };
        let _ = self.registry.set_signature(
            name,
            Some(SignatureInfo {
                status: SignatureState::Modified,
                key_id: signed.key_id,
                detail: Some(format!("{subject} changed after the signature was checked")),
            }),
        );
    }

    /// Records a load failure: UNAVAILABLE for dependencies, FAILED otherwise.
    pub(super) fn record_failure(&self, name: &str, err: &PluginError) {
        let reason = err.reason();
        // The list of shortages stays locked until the registry holds the
        // reason: the retry task, reading it in between, would drop the
        // entry as moved on, and never try the plugin again.
        let mut short = self.host_short.lock();
        // A shortage's reason counts what was open, and so differs at each
        // try of one that lasts: still the same failure.
        let host_short = super::host_short::is_host_short_after(err, || {
            self.registry.history(name).unwrap_or_default()
        });
        let short_before = short.get(name).cloned().filter(|_| host_short);
        super::host_short::note(&mut short, name, host_short, &reason);
        // No runner of its own now: what an earlier one enforced is not
        // shown as if it held.
        let _ = self.registry.set_confinement(name, None);
        self.signature_changed_since_check(name, err);
        // Asked once the new state is recorded.
        let repeated = || self.failed_alike_before(name, short_before.clone());
        if matches!(
            err,
            PluginError::Load(forgesyte_errors::LoadError::Dependency(_))
        ) {
            let _ = self.registry.mark_unavailable(name, reason.clone());
            drop(short);
            if repeated() {
                tracing::info!(plugin = %name, %reason, "Plugin {name} still UNAVAILABLE, for the same reason");
            } else {
                tracing::warn!(plugin = %name, %reason, "⊘ Plugin UNAVAILABLE: {name}");
            }
        } else {
            let report = crate::supervise::report_of(err);
            // A Python plugin's import or constructor raised: the journal
            // keeps the traceback's last lines, and the log line shows them.
            let traceback = crate::supervise::python_traceback(err);
            let folded = traceback.join(" | ");
            if report.crash.is_some() {
                // A runner died: the journal keeps its signal or exit code
                // and stderr tail.
                let exit = crate::supervise::exit_info(&report);
                let _ = self.registry.mark_crashed(name, reason.clone(), exit);
            } else {
                let _ = self
                    .registry
                    .mark_failed_with_details(name, reason.clone(), traceback);
            }
            drop(short);
            // A runner the host's stop killed while it constructed, or
            // refused to start: no fault of the plugin's, and no ERROR line
            // for every rollout to alert on. A plugin that failed for its
            // own reason says so at ERROR, whenever it is recorded.
            let stopped = self.is_shutting_down() && reason.contains(crate::process::HOST_STOPPING);
            if stopped {
                tracing::info!(plugin = %name, %reason, "Plugin {name} not loaded: the host is stopping");
            } else if repeated() {
                // Every rescan retries it: said at ERROR once, not again
                // each time for a plugin nobody touched.
                tracing::info!(plugin = %name, %reason, "Plugin {name} still FAILED, for the same reason");
            } else if folded.is_empty() {
                tracing::error!(plugin = %name, reason = %forgesyte_errors::logged(&reason), "✗ Plugin FAILED: {name}");
            } else {
                tracing::error!(plugin = %name, reason = %forgesyte_errors::logged(&reason), traceback = %forgesyte_errors::logged(&folded), "✗ Plugin FAILED: {name}");
            }
        }
    }

    /// Whether `name`'s state just recorded (FAILED or UNAVAILABLE) repeats
    /// the one before its retry: the same state and reason (or, with
    /// `short_before`, the shortage of the host's recorded then), then
    /// LOADED (the retry), then this one. Reasons are compared as the
    /// history keeps them: their first
    /// [`HISTORY_REASON_CHARS`](forgesyte_registry::HISTORY_REASON_CHARS).
    fn failed_alike_before(&self, name: &str, short_before: Option<String>) -> bool {
        let Some(history) = self.registry.history(name) else {
            return false;
        };
        let short_before = short_before.map(|reason| {
            forgesyte_errors::shorten(&reason, forgesyte_registry::HISTORY_REASON_CHARS)
        });
        match history.as_slice() {
            [.., before, retry, now] => {
                retry.to == PluginLifecycleState::Loaded
                    && before.to == now.to
                    && before.reason.is_some()
                    && (before.reason == now.reason || before.reason == short_before)
            }
            _ => false,
        }
    }

    pub(super) fn finish_outcome(
        &self,
        name: &str,
        dir: &Path,
        started: Instant,
        outcomes: &mut BTreeMap<String, PluginLoadOutcome>,
    ) {
        self.finish_outcome_ended(name, dir, started, Instant::now(), outcomes);
    }

    /// [`Self::finish_outcome`] of a plugin whose load ended at `ended`
    /// (published before its outcome is written).
    pub(super) fn finish_outcome_ended(
        &self,
        name: &str,
        dir: &Path,
        started: Instant,
        ended: Instant,
        outcomes: &mut BTreeMap<String, PluginLoadOutcome>,
    ) {
        let (state, reason) = self
            .registry
            .state_and_reason(name)
            .unwrap_or((PluginLifecycleState::Failed, None));
        outcomes.insert(
            name.to_owned(),
            PluginLoadOutcome {
                name: name.to_owned(),
                dir: dir.to_path_buf(),
                state,
                reason,
                elapsed_ms: ms(ended.saturating_duration_since(started)),
            },
        );
    }
}

/// The version a plugin whose manifest gives none is shown with (SPEC §3):
/// a refused manifest's too (it was `null`, and `-` in `check`'s table).
pub(super) fn unknown_version() -> Option<String> {
    Some(crate::manifest::UNKNOWN_VERSION.to_owned())
}
