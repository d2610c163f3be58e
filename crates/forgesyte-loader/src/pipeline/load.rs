//! A load pass: discovery, manifests read in parallel, registration in
//! sorted order, then the dependency waves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use forgesyte_errors::{ManifestError, PluginError};
use forgesyte_registry::PluginLifecycleState;

use super::discovery::{dir_name, manifest_panicked};
use super::loader::{Loader, Pending};
use super::parallel::par_map;
use super::report::{LoadReport, PluginLoadOutcome, ms};
use crate::manifest::{self, MANIFEST_FILE};

impl Loader {
    /// Loads every plugin directory under `plugins_dir` (seed `load_all_from_directory`).
    pub fn load_all(&self, plugins_dir: &Path) -> LoadReport {
        let started = Instant::now();
        *self.plugins_dir.write() = Some(plugins_dir.to_path_buf());
        let dirs = self.discover(plugins_dir);
        let mut report = self.load_dirs(&dirs);
        report.elapsed_ms = ms(started.elapsed());
        report.log_summary("Loaded", Some(plugins_dir));
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
        self.checker.clear_cache();
        // Phase 1 (parallel): read and validate every manifest.
        let pass_started = Instant::now();
        let parsed = par_map(self.config.threads, dirs, |dir| {
            let started = Instant::now();
            (started, self.read_manifest(dir))
        });
        // Phase 2 (sequential, sorted): register every plugin, so health shows
        // them all as LOADED while the rest of the pass runs.
        let mut outcomes: BTreeMap<String, PluginLoadOutcome> = BTreeMap::new();
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        for (dir, parsed) in parsed {
            let (started, result) =
                parsed.unwrap_or_else(|panic| (pass_started, Err(manifest_panicked(dir, panic))));
            let name = self.register(dir, result, started, &mut pending);
            if let Some(name) = name {
                self.finish_outcome(&name, dir, started, &mut outcomes);
            }
        }
        self.run_waves(&pending, &mut outcomes);
        LoadReport {
            plugins: outcomes.into_values().collect(),
            elapsed_ms: 0.0,
        }
    }
}
