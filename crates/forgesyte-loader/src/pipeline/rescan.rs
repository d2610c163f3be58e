//! A rescan: the plugins directory (and the installed Python plugins, when
//! asked for) discovered again and compared with what is registered. New
//! plugins load through the normal load pass; removed ones are retired
//! after their calls in flight; changed ones (their change stamp moved)
//! reload: isolated and Python plugins restart, an in-process one is loaded
//! again with its library under a new file identity (the old one stays
//! mapped). Unchanged plugins that are FAILED or UNAVAILABLE are retried
//! (a dependency may have been installed); unchanged healthy ones are left
//! alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use forgesyte_registry::PluginLifecycleState;
use serde::Serialize;

use super::discovery::NoManifest;
use super::loader::Loader;
use super::parallel::par_map;
use super::report::{LoadReport, PluginLoadOutcome, ms};
use super::stamp::stamp;

/// What [`Loader::plan_moves`] found.
#[derive(Debug, Default)]
struct Moves {
    /// Plugin → the directory it moved to.
    to: BTreeMap<String, PathBuf>,
    /// Plugin → the plugin that moved into its directory.
    displaced: BTreeMap<String, String>,
}

/// A plugin retired by a rescan (its directory or entry point is gone).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetiredPlugin {
    /// Its registry key.
    pub name: String,
    /// Its plugin directory.
    pub dir: PathBuf,
    /// Calls that were in flight when it was retired.
    pub calls_in_flight: u32,
    /// Calls still in flight when the wait for them (their time limit and a
    /// second) gave up: an isolated or Python plugin's end with its process
    /// (they fail); an in-process plugin's threads cannot be stopped and
    /// run on, their outcome recorded nowhere.
    pub calls_cut_off: u32,
    /// How long its retirement took (mostly waiting for its calls), in
    /// milliseconds.
    pub elapsed_ms: f64,
}

/// What a [`Loader::rescan`] did, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RescanReport {
    /// Plugins found for the first time, with their outcome.
    pub added: Vec<PluginLoadOutcome>,
    /// Plugins whose files changed, reloaded, with their outcome.
    pub changed: Vec<PluginLoadOutcome>,
    /// Unchanged plugins that were FAILED or UNAVAILABLE, retried; and
    /// those whose `plugin:` dependencies changed availability, loaded
    /// again (one whose dependency went away is UNAVAILABLE, naming it).
    pub retried: Vec<PluginLoadOutcome>,
    /// Plugins whose directory (or entry point) is gone, retired.
    pub removed: Vec<RetiredPlugin>,
    /// Unchanged plugins, left as they were.
    pub unchanged: Vec<PluginLoadOutcome>,
    /// Wall time of the whole rescan, in milliseconds.
    pub elapsed_ms: f64,
    /// The plugins directory could not be listed: nothing of it was
    /// looked at (installed entry points were).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unlisted: bool,
}

impl RescanReport {
    /// Every registered plugin's outcome (added, changed, retried and
    /// unchanged), sorted by name, as a [`LoadReport`].
    pub fn plugins(&self) -> LoadReport {
        let mut plugins: Vec<PluginLoadOutcome> = self
            .added
            .iter()
            .chain(&self.changed)
            .chain(&self.retried)
            .chain(&self.unchanged)
            .cloned()
            .collect();
        plugins.sort_by(|a, b| a.name.cmp(&b.name));
        LoadReport {
            plugins,
            elapsed_ms: self.elapsed_ms,
        }
    }

    /// One line for the log: the counts of each kind.
    pub fn summary(&self) -> String {
        let failed =
            |list: &[PluginLoadOutcome]| list.iter().filter(|o| !o.state.is_available()).count();
        format!(
            "{} added, {} changed, {} retried, {} removed, {} unchanged; {} not available ({:.1} ms)",
            self.added.len(),
            self.changed.len(),
            self.retried.len(),
            self.removed.len(),
            self.unchanged.len(),
            failed(&self.added)
                + failed(&self.changed)
                + failed(&self.retried)
                + failed(&self.unchanged),
            self.elapsed_ms
        )
    }
}

/// Which unchanged plugins a rescan tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// FAILED and UNAVAILABLE ones: an operator's rescan (`SIGHUP`, the
    /// admin route), after a fix outside the plugins directory.
    Terminal,
    /// UNAVAILABLE ones only (a package or a model may have arrived): a
    /// rescan for a file change elsewhere in the plugins directory. A
    /// FAILED plugin stays FAILED until its own files change or an operator
    /// asks, its restart budget with it: a plugin that writes files would
    /// otherwise retry every crash-looping plugin of the directory.
    Unavailable,
}

impl Loader {
    /// Discovers the plugins directory of the last
    /// [`load_all`](Self::load_all) (and the installed Python plugins, when
    /// [`LoaderConfig::python_entry_points`](super::LoaderConfig::python_entry_points)
    /// asks for them) again and brings the registry in line: new plugins
    /// load through the normal load pass; removed ones are retired after
    /// their calls in flight (new calls find no plugin at once); changed
    /// ones (their directory's change stamp moved: manifest, files, lock
    /// file) reload, isolated and Python ones restarted, an in-process one
    /// loaded again with its library under a new file identity (the old
    /// one stays mapped); unchanged FAILED or UNAVAILABLE ones are retried.
    /// Integrity pins are checked as on the first load. Blocks (plugins are
    /// constructed, retirements wait); callers run one rescan (or reload)
    /// at a time.
    pub fn rescan(&self) -> RescanReport {
        self.rescan_retrying(Retry::Terminal)
    }

    /// [`rescan`](Self::rescan), trying again the unchanged plugins that
    /// `retry` says.
    pub fn rescan_retrying(&self, retry: Retry) -> RescanReport {
        let started = Instant::now();
        self.fresh_stamps.lock().clear();
        let changed_keys = self.reread_trusted_keys();
        let (new_entry_points, gone_entry_points) = self.rescan_entry_points(true);
        let plugins_dir = self.plugins_dir.read().clone();
        // Without a listing of the plugins directory (none was loaded, or it
        // cannot be read now) nothing is known to be gone: no retirements.
        let listed = plugins_dir
            .as_ref()
            .is_some_and(|d| self.fs.read_dir(d).is_ok());
        // A default directory that may be missing (installed plugins alone,
        // `plugins_dir_optional`) and is: no failure of the rescan's
        // (`unlisted` reports one), though nothing of it is retired either.
        let mut unlisted = false;
        let unread = plugins_dir.is_some() && !listed;
        if let (false, Some(dir)) = (listed, &plugins_dir) {
            if self.plugins_dir_missing_as_allowed(dir) {
                tracing::info!(dir = %dir.display(), "Rescan: no plugins directory {}: only the installed (entry-point) plugins are rescanned", dir.display());
            } else {
                tracing::warn!(dir = %dir.display(), "Rescan: the plugins directory {} cannot be read; no plugin is retired", dir.display());
                unlisted = true;
            }
        }
        let found: BTreeSet<PathBuf> = plugins_dir
            .filter(|_| listed)
            .map(|d| self.discover(&d).into_iter().collect())
            .unwrap_or_default();
        let installed: BTreeSet<String> = self.entry_points.read().keys().cloned().collect();
        let known: Vec<(String, PathBuf)> = self
            .entries
            .read()
            .iter()
            .map(|(name, e)| (name.clone(), e.dir.clone()))
            .collect();

        let mut report = RescanReport {
            unlisted,
            ..RescanReport::default()
        };
        let old_stamps = self.stamps.read().clone();
        let gone = |name: &str, dir: &PathBuf| {
            if installed.contains(name) {
                gone_entry_points.iter().any(|g| g == name)
            } else {
                listed && !found.contains(dir)
            }
        };
        // The stamps of the directories still there, taken once: for the
        // moves below and for what changed.
        let mut now_stamps: BTreeMap<PathBuf, Option<u64>> = BTreeMap::new();
        if listed {
            for (name, dir) in &known {
                if !installed.contains(name) && !gone(name, dir) {
                    now_stamps.insert(dir.clone(), stamp(dir, self.config.max_manifest_bytes));
                }
            }
        }
        let moves = self.plan_moves(&known, &found, &installed, &gone, |name, dir| {
            now_stamps
                .get(dir)
                .is_some_and(|now| old_stamps.get(name).is_none_or(|old| old != now))
        });
        let mut kept: Vec<(String, PathBuf)> = Vec::new();
        let mut retiring: Vec<(String, PathBuf, String)> = Vec::new();
        let mut moved: BTreeSet<String> = BTreeSet::new();
        for (name, dir) in known {
            if let Some(to) = moves.to.get(&name) {
                // Moved (a rename, a link re-pointed, a rotation of
                // directories): reloaded from its new directory as a
                // changed plugin, its calls meanwhile told to come back
                // (503), never "not found" while its old instance's calls
                // drain.
                tracing::info!(plugin = %name, from = %dir.display(), to = %to.display(), "Plugin {name} moved to {}: reloaded from there", to.display());
                if let Some(e) = self.entries.write().get_mut(&name) {
                    e.dir = to.clone();
                }
                moved.insert(name.clone());
                kept.push((name, to.clone()));
            } else if gone(&name, &dir) {
                let why = if installed.contains(&name) {
                    "its entry point is no longer installed"
                } else {
                    "its directory is gone"
                };
                retiring.push((name, dir, why.to_owned()));
            } else if let Some(by) = moves.displaced.get(&name) {
                let why = format!("its directory holds plugin '{by}' now");
                retiring.push((name, dir, why));
            } else {
                kept.push((name, dir));
            }
        }
        report.removed.extend(self.retire_plugins(retiring));

        let mut changed: Vec<String> = Vec::new();
        let mut retried: Vec<String> = Vec::new();
        let mut unchanged: Vec<(String, PathBuf)> = Vec::new();
        for (name, dir) in kept {
            // A directory that cannot be listed now tells nothing of its
            // plugins: a live one stays as it is (stamped as before), not
            // reloaded as changed. (Each had read as changed, its manifest
            // not found: every plugin torn down by a moment's `mv plugins
            // plugins.old`.) A FAILED or UNAVAILABLE one is retried as ever.
            if unread
                && !installed.contains(&name)
                && !self
                    .registry
                    .get_state(&name)
                    .is_some_and(|s| s.is_terminal())
            {
                unchanged.push((name, dir));
                continue;
            }
            let now = match now_stamps.remove(&dir) {
                Some(now) => now,
                None => self.stamp_of(&name, &dir),
            };
            // What a reload of it does not stamp again, keeps this stamp.
            self.fresh_stamps.lock().insert(dir.clone(), now);
            // A signature is only as good as the keys it is checked against:
            // a plugin signed by a key that was added, removed or replaced
            // is checked (and loaded) again.
            if old_stamps.get(&name).is_none_or(|old| *old != now)
                || moved.contains(&name)
                || (!changed_keys.is_empty() && self.signed_by_one_of(&name, &changed_keys))
                || self.outside_library_changed(&name)
            {
                changed.push(name);
            } else if self.registry.get_state(&name).is_some_and(|s| match retry {
                Retry::Terminal => s.is_terminal(),
                Retry::Unavailable => s == PluginLifecycleState::Unavailable,
            }) {
                retried.push(name);
            } else {
                unchanged.push((name, dir));
            }
        }
        // A plugin whose manifest now names another name, free: registered
        // under its directory's name (a duplicate, a broken manifest) or
        // renamed. Retired under the old name, its directory loads as new
        // below (a reload by the old name could never take the new one).
        // A name is free too when the plugin registered under it is renamed
        // in the same rescan: two plugins that swapped names, or a chain
        // (a→b, b→c), are all renamed at once (each was FAILED, its name
        // "already registered", and stayed so).
        let mut renaming: Vec<(String, PathBuf, String)> = Vec::new();
        for name in changed.iter().chain(&retried) {
            if installed.contains(name) {
                continue;
            }
            let Some(dir) = self.plugin_dir(name) else {
                continue;
            };
            if let Ok(m) = self.read_manifest(&dir)
                && m.name != *name
            {
                renaming.push((name.clone(), dir, m.name));
            }
        }
        // Blocked: a rename to a name that stays registered, its plugin not
        // renamed, or renamed itself but blocked (the end of a chain).
        let renamed_from: BTreeSet<&str> =
            renaming.iter().map(|(old, _, _)| old.as_str()).collect();
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        loop {
            let before = blocked.len();
            for (old, _, now) in &renaming {
                if self.registry.contains(now)
                    && (!renamed_from.contains(now.as_str()) || blocked.contains(now))
                {
                    blocked.insert(old.clone());
                }
            }
            if blocked.len() == before {
                break;
            }
        }
        let mut renamed_away = Vec::new();
        for (name, dir, now) in renaming {
            if blocked.contains(&name) {
                continue;
            }
            tracing::info!(plugin = %name, %now, "Plugin {name} is now named {now}: loaded under that name");
            renamed_away.push((
                name,
                dir,
                "its manifest names another plugin now".to_owned(),
            ));
        }
        report.removed.extend(self.retire_plugins(renamed_away));
        let renamed: BTreeSet<&str> = report.removed.iter().map(|r| r.name.as_str()).collect();
        changed.retain(|n| !renamed.contains(n.as_str()));
        retried.retain(|n| !renamed.contains(n.as_str()));
        let replace: BTreeSet<String> = changed.iter().cloned().collect();
        let mut names = changed.clone();
        names.extend(retried.iter().cloned());
        let reloaded = if names.is_empty() {
            LoadReport::default()
        } else {
            self.reload_names(&names, &replace)
        };
        for outcome in reloaded.plugins {
            if replace.contains(&outcome.name) {
                report.changed.push(outcome);
            } else {
                report.retried.push(outcome);
            }
        }

        let known_dirs = self.registered_dirs();
        let new_dirs: Vec<PathBuf> = found
            .into_iter()
            .filter(|d| !known_dirs.contains(d))
            .collect();
        if !new_dirs.is_empty() || !new_entry_points.is_empty() {
            report.added = self
                .load_pass(&new_dirs, &new_entry_points, NoManifest::Fail)
                .plugins;
        }
        // Dependents whose dependencies changed availability (a removal,
        // a failure, one added or fixed) are loaded again.
        let settled = self.settle_dependents();
        let settled_names: BTreeSet<String> = settled.iter().map(|o| o.name.clone()).collect();
        for outcome in settled {
            let slot = [&mut report.added, &mut report.changed, &mut report.retried]
                .into_iter()
                .find_map(|list| list.iter_mut().find(|o| o.name == outcome.name));
            match slot {
                Some(slot) => *slot = outcome,
                None => report.retried.push(outcome),
            }
        }

        let mut outcomes = BTreeMap::new();
        for (name, dir) in &unchanged {
            if !settled_names.contains(name) {
                self.finish_outcome(name, dir, started, &mut outcomes);
            }
        }
        report.unchanged = outcomes
            .into_values()
            .map(|mut o| {
                o.elapsed_ms = 0.0;
                o
            })
            .collect();
        self.restamp();
        report.elapsed_ms = ms(started.elapsed());
        // The server says it at INFO, with its trigger and the names.
        tracing::debug!("Rescanned: {}", report.summary());
        report
    }

    /// The directories plugins are registered from.
    pub(super) fn registered_dirs(&self) -> BTreeSet<PathBuf> {
        self.entries
            .read()
            .values()
            .map(|e| e.dir.clone())
            .collect()
    }

    /// Which registered plugins moved, and where: a plugin whose
    /// directory is gone, or (available) whose directory's manifest names
    /// another plugin now (`renamed_here` says whether a directory changed
    /// since its plugin's last stamp: only those manifests are read),
    /// moved to the directory whose manifest gives its name, if exactly
    /// one does among the directories no plugin is registered from and
    /// those whose plugin, in any state, was renamed so. So a
    /// rename (`mv a a-2`), a rotation (`mv b c; mv a b`) and a swap of two
    /// directories are moves, each plugin keeping its counts. A plugin
    /// whose directory another one moved into, and that moved nowhere
    /// itself, is `displaced`: retired, naming the plugin that took its
    /// place.
    fn plan_moves(
        &self,
        known: &[(String, PathBuf)],
        found: &BTreeSet<PathBuf>,
        installed: &BTreeSet<String>,
        gone: &dyn Fn(&str, &PathBuf) -> bool,
        renamed_here: impl Fn(&str, &PathBuf) -> bool,
    ) -> Moves {
        let from_dirs: Vec<&(String, PathBuf)> = known
            .iter()
            .filter(|(n, _)| !installed.contains(n))
            .collect();
        // Plugins whose directory names another plugin now, with that name:
        // their directories are offered to plugins that move. A FAILED or
        // UNAVAILABLE one is left out when it is registered under a name
        // its manifest did not give (a duplicate registered under its
        // directory's name, a broken manifest), whose manifest named
        // another plugin all along.
        let mut offers: BTreeMap<&str, (&PathBuf, String)> = BTreeMap::new();
        let mut terminal = BTreeSet::new();
        for (name, dir) in &from_dirs {
            if gone(name, dir) || !renamed_here(name, dir) {
                continue;
            }
            let is_terminal = self
                .registry
                .get_state(name)
                .is_some_and(|s| s.is_terminal());
            if is_terminal && !self.registered_under_its_manifest_name(name) {
                continue;
            }
            if let Ok(m) = self.peek_manifest(dir)
                && m.name != *name
            {
                offers.insert(name.as_str(), (dir, m.name));
                if is_terminal {
                    terminal.insert(name.as_str());
                }
            }
        }
        // Of those, the ones that move themselves: not a FAILED or
        // UNAVAILABLE one, which is retried, and renamed or not by what its
        // manifest says then.
        let renamed = |name: &str| offers.contains_key(name) && !terminal.contains(name);
        let movable = |name: &str, dir: &PathBuf| gone(name, dir) || renamed(name);
        if !from_dirs.iter().any(|(n, d)| movable(n, d)) {
            return Moves::default();
        }
        // Where each name is given: the directories no plugin is registered
        // from, and those renamed; a name given twice is left out (which
        // of them a plugin moved to is not known).
        let mut given: BTreeMap<String, Option<PathBuf>> = BTreeMap::new();
        let mut give = |name: String, dir: &PathBuf| {
            given
                .entry(name)
                .and_modify(|seen| *seen = None)
                .or_insert_with(|| Some(dir.clone()));
        };
        for (name, dir) in self.unregistered_by_name(found) {
            give(name, &dir);
        }
        for (dir, now) in offers.values() {
            give(now.clone(), dir);
        }
        let mut moves = Moves::default();
        for (name, dir) in &from_dirs {
            if movable(name, dir)
                && let Some(Some(to)) = given.get(name)
            {
                moves.to.insert(name.clone(), to.clone());
            }
        }
        for (name, (dir, now)) in &offers {
            if !moves.to.contains_key(*name) && moves.to.get(now) == Some(*dir) {
                moves.displaced.insert((*name).to_owned(), now.clone());
            }
        }
        moves
    }

    /// Whether `name` is registered under the name its manifest gave (not
    /// under its directory's: a duplicate, a manifest that could not be
    /// read).
    pub(super) fn registered_under_its_manifest_name(&self, name: &str) -> bool {
        self.entries.read().get(name).is_some_and(|e| {
            e.raw
                .as_ref()
                .and_then(|raw| raw.get("name"))
                .and_then(serde_json::Value::as_str)
                == Some(name)
        })
    }

    /// The directories of `found` that no plugin is registered from, with
    /// the name their manifest gives.
    fn unregistered_by_name(&self, found: &BTreeSet<PathBuf>) -> Vec<(String, PathBuf)> {
        let registered = self.registered_dirs();
        found
            .iter()
            .filter(|d| !registered.contains(*d))
            .filter_map(|dir| Some((self.read_manifest(dir).ok()?.name, dir.clone())))
            .collect()
    }

    /// Reads the trust store again (`--trusted-keys`), for this pass and
    /// every load after it; the ids of the keys added, removed or replaced.
    /// One that cannot be read now trusts no key (fail closed), as at
    /// start-up it would refuse to start.
    pub(super) fn reread_trusted_keys(&self) -> BTreeSet<String> {
        let Some((keys, error)) = self.trusted_keys.read().reread() else {
            return BTreeSet::new();
        };
        if let Some(e) = error {
            tracing::error!("{e}: no key is trusted until it can be read");
        }
        let mut current = self.trusted_keys.write();
        let changed = current.differing_ids(&keys);
        if !changed.is_empty() {
            tracing::info!(
                keys = ?keys.ids().collect::<Vec<_>>(),
                changed = ?changed,
                "The trusted keys changed: the plugins they signed are checked again"
            );
        }
        *current = keys;
        changed
    }

    /// Re-reads the trusted keys (see [`Self::reread_trusted_keys`]) for a
    /// reload: the registered plugins signed by a key that changed, which
    /// the reload checks again with the plugins it was asked for, in-process
    /// ones included. The rescan after it compares with these keys, so a
    /// reload that left them out would keep a revoked key's plugins
    /// running for good.
    pub(super) fn reread_keys_for_reload(&self) -> BTreeSet<String> {
        let changed = self.reread_trusted_keys();
        if changed.is_empty() {
            return BTreeSet::new();
        }
        let names: Vec<String> = self.entries.read().keys().cloned().collect();
        names
            .into_iter()
            .filter(|name| self.signed_by_one_of(name, &changed))
            .collect()
    }

    /// Whether `name`'s signature names one of `keys` (or names no key: a
    /// signature that could not be read, checked again with the rest).
    fn signed_by_one_of(&self, name: &str, keys: &BTreeSet<String>) -> bool {
        self.registry
            .get_status(name)
            .and_then(|status| status.signature)
            .is_some_and(|s| {
                s.status != forgesyte_registry::SignatureState::Unsigned
                    && s.key_id.as_ref().is_none_or(|id| keys.contains(id))
            })
    }

    /// The change stamp of plugin `name` in `dir`: the directory's, or,
    /// for an installed plugin whose module is one file in a directory it
    /// shares (a top-level module in `site-packages`) or was not found,
    /// that file's alone ([`stamp::stamp_file`]). The whole shared
    /// directory's walk took every rescan and load pass quadratic in such
    /// plugins (19 s for 2,000), and any unrelated package installed there
    /// "changed" them all.
    ///
    /// An installed plugin's entry point (its value, its distribution's
    /// version) is part of its stamp: an editable install reinstalled at a
    /// new version, or with its class moved to a module already there,
    /// changes no file of its package, and a rescan found it unchanged.
    pub(super) fn stamp_of(&self, name: &str, dir: &std::path::Path) -> Option<u64> {
        // What of its entry point counts, read under the lock; the files
        // stamped after it is let go.
        let installed = self.entry_points.read().get(name).map(|ep| {
            let own_file = (!ep.owns_dir).then(|| ep.origin.clone());
            (own_file, (ep.value.clone(), ep.version.clone()))
        });
        let Some((own_file, declared)) = installed else {
            return stamp(dir, self.config.max_manifest_bytes);
        };
        let files = match own_file {
            Some(origin) => super::stamp::stamp_file(origin.as_deref()),
            None => stamp(dir, self.config.max_manifest_bytes),
        };
        files.map(|files| {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::hash::DefaultHasher::new();
            (files, declared).hash(&mut hasher);
            hasher.finish()
        })
    }

    /// The installed plugins whose directory is not their own (see
    /// [`stamp_of`](Self::stamp_of)), or is another installed plugin's
    /// too (two entry points of one package, `pkg.a:A` and `pkg.b:B`): the
    /// fresh stamps are by directory, so one of two such plugins took the
    /// other's, and a reload of one left its sibling's change unseen.
    fn sharing_a_dir(&self) -> BTreeSet<String> {
        let entry_points = self.entry_points.read();
        let mut plugins_in: BTreeMap<&std::path::Path, usize> = BTreeMap::new();
        for ep in entry_points.values() {
            if let Some(dir) = ep.module_dir.as_deref() {
                *plugins_in.entry(dir).or_default() += 1;
            }
        }
        entry_points
            .iter()
            .filter(|(_, ep)| {
                !ep.owns_dir
                    || ep
                        .module_dir
                        .as_deref()
                        .is_some_and(|dir| plugins_in.get(dir).copied().unwrap_or(0) > 1)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Records the change stamp of every registered plugin, the baseline
    /// the next [`rescan`](Self::rescan) compares with: the one taken
    /// before its files were read this pass
    /// ([`fresh_stamps`](Loader::fresh_stamps)); for a plugin whose files
    /// this pass did not read (one `reload_all` kept as it was), the
    /// baseline it had, so a change on disk still shows; else one taken
    /// now.
    pub(super) fn restamp(&self) {
        let mut fresh = std::mem::take(&mut *self.fresh_stamps.lock());
        let old = self.stamps.read().clone();
        let mut stamps = BTreeMap::new();
        let mut missing: Vec<(String, PathBuf)> = Vec::new();
        let shares = self.sharing_a_dir();
        for (name, entry) in self.entries.read().iter() {
            // Of a plugin in a shared directory, the fresh stamps (by
            // directory) hold another's: its own is taken now.
            if shares.contains(name) {
                missing.push((name.clone(), entry.dir.clone()));
                continue;
            }
            match fresh.remove(&entry.dir).or_else(|| old.get(name).copied()) {
                Some(stamped) => {
                    stamps.insert(name.clone(), stamped);
                }
                None => missing.push((name.clone(), entry.dir.clone())),
            }
        }
        // On the pass's threads: a stamp is a few file-system calls per
        // file of the plugin (7% of a 1,000-plugin pass's CPU, one by one).
        stamps.extend(
            par_map(self.config.threads, &missing, |(name, dir)| {
                self.stamp_of(name, dir)
            })
            .into_iter()
            .map(|((name, _), stamped)| (name.clone(), stamped.ok().flatten())),
        );
        *self.stamps.write() = stamps;
    }

    /// Waits until the retiring `name` has no call in flight or `deadline`
    /// passes; the calls still in flight then (0 when all ended).
    fn retiring_calls_left(&self, name: &str, deadline: Instant) -> u32 {
        loop {
            let left = self.registry.retiring_in_flight(name).unwrap_or(0);
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Retires each plugin of `list` (name, directory, why), together:
    /// new calls are refused at once (the registry no longer shows them),
    /// their calls in flight are waited for (each bounded by its call time
    /// limit, the waits side by side: several removed plugins waited one
    /// after another), then their processes are stopped (isolated, Python)
    /// or their instances dropped (in-process: the libraries stay mapped;
    /// their destructors side by side, [`Loader::drop_let_go`]), and their
    /// names are freed. The outcomes come in `list`'s order.
    pub(super) fn retire_plugins(
        &self,
        list: Vec<(String, PathBuf, String)>,
    ) -> Vec<RetiredPlugin> {
        let mut retiring: Vec<Retiring> = list
            .into_iter()
            .map(|(name, dir, why)| self.begin_retiring(name, dir, why))
            .collect();
        // Absolute deadlines: waited one after another, they take as long
        // as the longest.
        for r in &mut retiring {
            r.calls_cut_off = self.retiring_calls_left(&r.name, r.started + r.wait);
        }
        let stop_deadline = Instant::now() + Duration::from_secs(5);
        let mut in_process = Vec::new();
        for r in &mut retiring {
            // Taken: an in-process instance's destructor runs where its last
            // handle drops, which must be `drop_let_go`'s thread.
            let Some(handle) = r.handle.take() else {
                continue;
            };
            r.stopping = self.retire(&handle);
            // An isolated plugin's calls cut off end with its process, which
            // `retire` stops (within its stop grace): they end on this
            // entry, before the name is free for another plugin.
            if r.calls_cut_off > 0 && handle.isolation() == crate::manifest::Isolation::Process {
                self.retiring_calls_left(&r.name, stop_deadline);
            }
            if handle.isolation() == crate::manifest::Isolation::InProcess {
                in_process.push((r.name.clone(), vec![handle]));
            }
        }
        self.drop_let_go(in_process);
        let stopped_by = Instant::now() + crate::RUNNER_STOP_WAIT;
        retiring
            .into_iter()
            .map(|r| self.end_retiring(r, stopped_by))
            .collect()
    }

    /// The end of a retirement: `r`'s name freed (registry, failed
    /// libraries), its scratch directory removed once its runner (if any)
    /// has stopped by `stopped_by`, and the outcome logged.
    fn end_retiring(&self, r: Retiring, stopped_by: Instant) -> RetiredPlugin {
        let Retiring {
            name,
            dir,
            why,
            started,
            calls_in_flight,
            calls_cut_off,
            wait,
            stopping,
            ..
        } = r;
        self.registry.forget(&name);
        self.failed_libraries.lock().remove(&name);
        // What its runner left in its scratch directory is not handed to
        // the next plugin of its name: removed once the runner has ended
        // (one still stopping could write on).
        if stopping.as_ref().is_none_or(|instance| {
            instance.wait_stopped(stopped_by.saturating_duration_since(Instant::now()))
        }) {
            if let Err(e) = crate::sandbox::remove_scratch_dir(&name, self.config.runner_user) {
                tracing::warn!(plugin = %name, error = %e, "Plugin {name} retired: its scratch directory could not be removed: {e}");
            }
        } else {
            tracing::warn!(plugin = %name, "Plugin {name} retired: its runner did not end in time; its scratch directory is kept");
        }
        if calls_cut_off > 0 {
            tracing::warn!(plugin = %name, calls_cut_off, "Plugin {name} retired with {calls_cut_off} call(s) still in flight after {:.1} s", wait.as_secs_f64());
        }
        tracing::info!(plugin = %name, dir = %dir.display(), calls_in_flight, "Plugin {name} retired: {why}");
        RetiredPlugin {
            name,
            dir,
            calls_in_flight,
            calls_cut_off,
            elapsed_ms: ms(started.elapsed()),
        }
    }

    /// The start of `name`'s retirement: out of the loader's and the
    /// registry's view (new calls refused), its calls in flight counted.
    fn begin_retiring(&self, name: String, dir: PathBuf, why: String) -> Retiring {
        let started = Instant::now();
        let entry = self.entries.write().remove(&name);
        self.entry_points.write().remove(&name);
        self.stamps.write().remove(&name);
        let handle = entry.and_then(|e| e.handle);
        let _ = self.registry.retire(&name);
        let calls_in_flight = self.registry.retiring_in_flight(&name).unwrap_or(0);
        // Its calls' time limit and a second: by then the host has given up
        // on each call left (a timed-out call is settled: its late return
        // records nothing), so none ends on a plugin that took the name.
        let wait = handle
            .as_ref()
            .and_then(|h| h.call_timeout())
            .unwrap_or(self.config.call_timeout)
            + Duration::from_secs(1);
        Retiring {
            name,
            dir,
            why,
            started,
            handle,
            calls_in_flight,
            calls_cut_off: 0,
            wait,
            stopping: None,
        }
    }
}

/// A plugin being retired ([`Loader::retire_plugins`]).
struct Retiring {
    name: String,
    dir: PathBuf,
    why: String,
    started: Instant,
    /// Its handle, until its instance is stopped or let go.
    handle: Option<crate::PluginHandle>,
    calls_in_flight: u32,
    /// Its calls still in flight when `wait` ran out.
    calls_cut_off: u32,
    /// How long its calls in flight are waited for, from `started`.
    wait: Duration,
    /// An isolated plugin's instance whose process is being stopped.
    stopping: Option<std::sync::Arc<dyn crate::PluginInstance>>,
}
