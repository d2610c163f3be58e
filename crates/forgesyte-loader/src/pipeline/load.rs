//! A load pass: discovery, manifests read in parallel, registration in
//! sorted order (plugin directories, then installed Python plugins), then
//! the dependency waves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use forgesyte_errors::{ManifestError, PluginError};
use forgesyte_registry::{PluginInfo, PluginLifecycleState};

use super::discovery::{BadManifest, NoManifest, dir_name, manifest_panicked};
use super::loader::{Entry, Loader, Pending};
use super::parallel::par_map;
use super::report::{LoadReport, PluginLoadOutcome, ms};
use crate::entry_points::EntryPoint;
use crate::manifest::{self, MANIFEST_FILE, Manifest};

impl Loader {
    /// Loads every plugin directory under `plugins_dir` (seed
    /// `load_all_from_directory`) and, with
    /// [`LoaderConfig::python_entry_points`](super::LoaderConfig::python_entry_points),
    /// every installed Python plugin, in one pass: directories are
    /// registered first, so an entry point whose name a directory plugin
    /// already has is the one that ends FAILED.
    pub fn load_all(&self, plugins_dir: &Path) -> LoadReport {
        let started = Instant::now();
        self.fresh_stamps.lock().clear();
        *self.plugins_dir.write() = Some(plugins_dir.to_path_buf());
        let dirs = self.subdirectories(plugins_dir);
        let entry_points = self.discover_entry_points();
        let mut report = self.load_pass(&dirs, &entry_points, NoManifest::Skip);
        // The baseline of the next rescan.
        self.restamp();
        report.elapsed_ms = ms(started.elapsed());
        let dir = plugins_dir.display();
        let from = match (
            entry_points.is_empty(),
            self.fs.read_dir(plugins_dir).is_ok(),
        ) {
            (true, _) => dir.to_string(),
            (false, true) => format!("{dir} and installed packages"),
            (false, false) => "installed packages".to_owned(),
        };
        if self.is_shutting_down() {
            // The plugins the stop cut off are FAILED with no fault of
            // theirs: not counted as failures.
            tracing::info!(
                loaded = report.loaded(),
                "Load pass from {from} cut short by the stop: {} loaded, {} not",
                report.loaded(),
                report.failed() + report.unavailable()
            );
        } else {
            report.log_summary("Loaded", Some(&from));
        }
        report
    }

    /// Loads one plugin directory (seed `load_from_path`).
    pub fn load_from_path(&self, dir: &Path) -> PluginLoadOutcome {
        let report = self.load_dirs(&[dir.to_path_buf()]);
        report
            .plugins
            .into_iter()
            .next()
            .unwrap_or_else(|| PluginLoadOutcome {
                name: manifest::key_from_dir_name(&dir_name(dir)),
                dir: dir.to_path_buf(),
                state: PluginLifecycleState::Failed,
                reason: Some(
                    PluginError::from(ManifestError::NotFound {
                        path: dir.join(MANIFEST_FILE),
                    })
                    .reason(),
                ),
                elapsed_ms: 0.0,
            })
    }

    /// One load pass over `dirs`.
    pub(super) fn load_dirs(&self, dirs: &[PathBuf]) -> LoadReport {
        self.load_pass(dirs, &[], NoManifest::Fail)
    }

    /// One load pass over `dirs` and then `entry_points` (installed Python
    /// plugins), in one set of dependency waves; `no_manifest` says what a
    /// directory without a manifest is.
    pub(super) fn load_pass(
        &self,
        dirs: &[PathBuf],
        entry_points: &[EntryPoint],
        no_manifest: NoManifest,
    ) -> LoadReport {
        self.checker.clear_cache();
        self.pass.clear();
        // Phase 1 (parallel): read and validate every manifest.
        let pass_started = Instant::now();
        // The lock file of each directory holding plugin directories, read
        // once for their change stamps.
        let parents: BTreeSet<&Path> = dirs.iter().filter_map(|dir| dir.parent()).collect();
        let locks: BTreeMap<&Path, Option<Vec<u8>>> = parents
            .into_iter()
            .map(|parent| (parent, super::stamp::lock_beside(parent)))
            .collect();
        let parsed = par_map(self.config.threads, dirs, |dir| {
            let started = Instant::now();
            let lock = dir
                .parent()
                .and_then(|p| locks.get(p))
                .and_then(Option::as_deref);
            self.read_manifest_stamped_or(dir, lock, no_manifest)
                .map(|(read, stamped)| (started, read, stamped))
        });
        // Directories without a manifest, under `NoManifest::Skip`: not
        // plugins, left out as discovery leaves them out.
        let parsed: Vec<_> = parsed
            .into_iter()
            .filter_map(|(dir, r)| match r {
                Ok(None) => None,
                Ok(Some(read)) => Some((dir, Ok(read))),
                Err(panic) => Some((dir, Err(panic))),
            })
            .collect();
        // The stamps in one go: recorded one by one, the pass's threads
        // queued for the map's lock.
        self.fresh_stamps.lock().extend(
            parsed
                .iter()
                .filter_map(|(dir, r)| r.as_ref().ok().map(|(_, _, s)| ((*dir).clone(), *s))),
        );
        // Phase 2 (sequential, sorted): register every plugin, so health shows
        // them all as LOADED while the rest of the pass runs.
        let mut outcomes: BTreeMap<String, PluginLoadOutcome> = BTreeMap::new();
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        let claims: Vec<super::registration::Claim<'_>> = parsed
            .into_iter()
            .map(|(dir, parsed)| {
                let (started, result) = parsed.map_or_else(
                    |panic| (pass_started, Err(manifest_panicked(dir, panic))),
                    |(started, result, _)| (started, result),
                );
                self.claim_of(dir, result, started)
            })
            .collect();
        // Valid manifests take their names first, directories then entry
        // points (each in sorted order), then broken ones: a broken
        // manifest never takes a valid plugin's name, an installed one's
        // included. The names valid manifests ask for are reserved: a
        // duplicate's fallback key (its directory's or entry point's) is
        // never one of them.
        let (valid, broken): (Vec<super::registration::Claim<'_>>, Vec<_>) = claims
            .into_iter()
            .partition(super::registration::Claim::is_valid);
        let installed: Vec<_> = entry_points
            .iter()
            .map(|ep| (ep, Instant::now(), self.entry_point_manifest(ep)))
            .collect();
        let asked: BTreeSet<String> = valid
            .iter()
            .map(|c| c.wanted().to_owned())
            .chain(
                installed
                    .iter()
                    .filter_map(|(_, _, r)| r.as_ref().ok().map(|m| m.name.clone())),
            )
            .collect();
        let (valid_installed, broken_installed): (Vec<_>, Vec<_>) =
            installed.into_iter().partition(|(_, _, r)| r.is_ok());
        for (name, dir, started) in self.register_claims(valid, &asked, &mut pending) {
            self.finish_outcome(&name, dir, started, &mut outcomes);
        }
        for (ep, started, result) in valid_installed {
            if let Some(name) =
                self.register_entry_point(ep, result, (started, &asked), &mut pending)
            {
                self.finish_outcome(&name, &ep.plugin_dir(), started, &mut outcomes);
            }
        }
        for (name, dir, started) in self.register_claims(broken, &asked, &mut pending) {
            self.finish_outcome(&name, dir, started, &mut outcomes);
        }
        for (ep, started, result) in broken_installed {
            if let Some(name) =
                self.register_entry_point(ep, result, (started, &asked), &mut pending)
            {
                self.finish_outcome(&name, &ep.plugin_dir(), started, &mut outcomes);
            }
        }
        self.run_waves(&pending, &mut outcomes);
        LoadReport {
            plugins: outcomes.into_values().collect(),
            elapsed_ms: 0.0,
        }
    }
}

impl Loader {
    /// Registers the installed Python plugin of `ep` (as
    /// [`register`](Self::register) does a directory's) and returns its key
    /// when it is already final (a bad manifest or a duplicate name); valid
    /// ones go to `pending`.
    ///
    /// A name that is taken is never overwritten: the plugin is registered
    /// under a key derived from the entry point's name (`NAME~duplicate`
    /// when that is the taken name) and FAILED with a reason that names
    /// both sources.
    fn register_entry_point(
        &self,
        ep: &EntryPoint,
        result: Result<Manifest, Box<BadManifest>>,
        (started, asked): (Instant, &BTreeSet<String>),
        pending: &mut BTreeMap<String, Pending>,
    ) -> Option<String> {
        let dir = ep.plugin_dir();
        let ep_key = manifest::key_from_dir_name(&ep.name);
        let (wanted, info, raw, optional, outcome) = match result {
            Ok(m) => {
                let info = PluginInfo {
                    description: m.description.clone(),
                    version: Some(m.version.clone()),
                    source: Some(dir.clone()),
                };
                let raw = Some(Arc::clone(&m.raw));
                (m.name.clone(), info, raw, m.optional, Ok(m))
            }
            Err(bad) => {
                let claimed = bad.claimed_name_or(&ep_key);
                let (description, version) = (bad.description(), bad.version());
                let BadManifest { raw, error } = *bad;
                let info = PluginInfo {
                    description,
                    version: version
                        .or_else(|| ep.version.clone())
                        .or_else(super::registration::unknown_version),
                    source: Some(dir.clone()),
                };
                let reason = error.reason();
                (claimed, info, raw.map(Arc::new), false, Err(reason))
            }
        };
        let (name, outcome) = if self.registry.register(&wanted, info.clone()).is_ok() {
            (wanted, outcome)
        } else {
            let existing = self.source_of(&wanted);
            let name = self.register_duplicate(&wanted, &ep_key, info, asked);
            tracing::error!(
                name = %wanted,
                entry_point = %ep.name,
                existing = %existing,
                "Duplicate plugin name '{wanted}' of {}: registered as '{name}'",
                ep.describe()
            );
            let reason = PluginError::from(ManifestError::DuplicateName {
                name: wanted,
                existing: PathBuf::from(existing),
                this: Some(ep.describe()),
            })
            .reason();
            (name, Err(reason))
        };
        self.entries.write().insert(
            name.clone(),
            Entry::registered(dir.clone(), raw, optional, &outcome),
        );
        self.entry_points.write().insert(name.clone(), ep.clone());
        match outcome {
            Ok(manifest) => {
                pending.insert(
                    name.clone(),
                    Pending {
                        name,
                        dir,
                        manifest,
                        started,
                    },
                );
                None
            }
            Err(reason) => {
                let _ = self.registry.mark_failed(&name, reason.clone());
                tracing::error!(plugin = %name, reason = %forgesyte_errors::logged(&reason), "✗ Plugin FAILED: {name}");
                Some(name)
            }
        }
    }

    /// Where registered plugin `name` came from: its entry point, or its
    /// directory.
    pub(super) fn source_of(&self, name: &str) -> String {
        if let Some(ep) = self.entry_points.read().get(name) {
            return ep.describe();
        }
        match self.plugin_dir(name) {
            Some(dir) => dir.display().to_string(),
            None => "(registered earlier)".to_owned(),
        }
    }
}
