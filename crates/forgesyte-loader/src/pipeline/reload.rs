//! Reloading registered plugins: isolated ones restarted, failed ones
//! retried, in-process ones kept (libraries are never unloaded), new
//! directories loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_errors::ManifestError;
use forgesyte_registry::{PluginInfo, PluginLifecycleState};
use serde_json::Value;

use super::discovery::{BadManifest, NoManifest, bad};
use super::loader::{Entry, Loader, Pending, plugin_dep_name};
use super::report::{LoadReport, PluginLoadOutcome, ms};
use crate::entry_points::EntryPoint;
use crate::handle::PluginHandle;
use crate::manifest::{Isolation, Manifest};

/// How long a reload waits for calls in flight on a plugin to end, past
/// their time limit (by then the host has given up on each: a timed-out
/// call is settled).
const PAST_THE_CALL_LIMIT: Duration = Duration::from_secs(1);

/// How long a reload waits, once an old runner has ended, for the calls it
/// cut off to be answered (their count to fall) before it shows the plugin
/// LOADED.
const CUT_CALLS_END: Duration = Duration::from_millis(200);

/// The reason a plugin shows while LOADED in a reload or rescan, between
/// its old instance and its new one.
pub const RELOADING: &str =
    "being reloaded: its calls answer 503 (send them again) until its new instance is ready";

/// Why [`Loader::reload_with_others`] did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadRefused {
    /// No plugin of that name is registered.
    #[error("no plugin of that name is registered")]
    NotRegistered,
    /// The directory of a plugin that serves has no manifest any more: it
    /// was moved or removed. It is left serving; a rescan finds where it
    /// went, or lets it go.
    #[error(
        "its directory {} has no manifest any more (moved or removed); it is left serving: a rescan finds where it went, or lets it go",
        dir.display()
    )]
    FilesGone {
        /// The directory it was loaded from.
        dir: PathBuf,
    },
    /// An installed (entry-point) plugin that serves is no longer
    /// installed: the interpreter, asked again, declares no such entry point
    /// any more, or its module cannot be found (its package directory
    /// removed, an upgrade half done). It is left serving, as a plugin
    /// whose directory vanished is; a rescan lets it go.
    #[error(
        "its {entry_point} {why}; it is left serving: a rescan lets it go, or loads it again once it is installed"
    )]
    EntryPointGone {
        /// The entry point it was loaded from ([`EntryPoint::describe`](crate::entry_points::EntryPoint::describe)).
        entry_point: String,
        /// What the interpreter reports of it now.
        why: String,
    },
}

impl Loader {
    /// Reloads one plugin (the server's `POST /v1/plugins/{name}/reload`):
    /// re-reads its manifest, re-checks its dependencies, and
    ///
    /// - an isolated plugin: stops its process (calls in flight fail, and
    ///   are waited for) and starts it afresh, whatever its state;
    /// - an in-process plugin that is INITIALIZED or RUNNING: keeps its
    ///   instance as it is, unless its directory changed since it was
    ///   loaded (its manifest edited, its library rebuilt): then, as a
    ///   rescan does, its instance is let go and it is loaded again, its
    ///   library under a new file identity (libraries are never unloaded:
    ///   thread-local destructors and code of the plugin may still run
    ///   after its last instance is gone, so `dlclose` is unsound; the old
    ///   one stays mapped);
    /// - an in-process plugin that is FAILED or UNAVAILABLE: is retried.
    ///
    /// The trusted keys are read again first: when one changed, every
    /// plugin it signed is checked again too (and loaded again, in-process
    /// ones included), as a rescan would.
    ///
    /// An installed (entry-point) plugin is looked up again first, as a
    /// rescan looks it up: the interpreter is asked for the entry points,
    /// and the plugin is loaded from what it reports now (its class moved
    /// to another module, a manifest added or dropped, a new version), not
    /// from what was found when it was registered.
    ///
    /// `None` when no plugin of that name is registered, or when its
    /// directory's manifest is gone ([`ReloadRefused::FilesGone`]: it is
    /// left as it is), or, for an installed plugin, its entry point
    /// ([`ReloadRefused::EntryPointGone`]).
    pub fn reload(&self, name: &str) -> Option<PluginLoadOutcome> {
        self.reload_with_others(name)
            .ok()
            .and_then(|outcomes| outcomes.into_iter().next())
    }

    /// [`reload`](Self::reload), with the outcomes of the other plugins it
    /// loaded again (those a changed trusted key signed) after the named
    /// one's, which comes first.
    ///
    /// # Errors
    ///
    /// [`ReloadRefused`]: no plugin of that name is registered, or its
    /// directory's manifest is gone (moved or removed: a rescan finds
    /// where it went, or lets it go), or its entry point (an installed
    /// plugin no longer installed, or its module not found); nothing is
    /// done then (a working plugin was FAILED "manifest not found" until
    /// the next rescan).
    pub fn reload_with_others(&self, name: &str) -> Result<Vec<PluginLoadOutcome>, ReloadRefused> {
        let dir = {
            let entries = self.entries.read();
            let entry = entries.get(name).ok_or(ReloadRefused::NotRegistered)?;
            entry.dir.clone()
        };
        // Only a plugin that serves is kept as it is: a FAILED or
        // UNAVAILABLE one is loaded, and fails for its missing manifest
        // (so a shortage retry lets it go).
        let serving = self.registry.is_available(name);
        if self.entry_points.read().contains_key(name) {
            self.refresh_entry_point(name, serving)?;
        } else if serving && self.manifest_gone(&dir) {
            return Err(ReloadRefused::FilesGone { dir });
        }
        // Its signature is checked against the keys as they are now; so
        // are the others' that a changed key signed.
        let mut resigned = self.reread_keys_for_reload();
        self.fresh_stamps.lock().clear();
        let mut names = vec![name.to_owned()];
        names.extend(resigned.iter().filter(|n| *n != name).cloned());
        // A library on `--lib-path` that was rebuilt, or a plugin
        // directory whose files changed (its manifest edited, its library
        // rebuilt): loaded again, as a rescan loads a changed one.
        if self.outside_library_changed(name) || self.directory_changed(name) {
            resigned.insert(name.to_owned());
        }
        let mut report = self.reload_names(&names, &resigned);
        report.settle(self.settle_dependents());
        // Its dependents that stay UNAVAILABLE over it still quote what it
        // was (its old reason, state or version) until a rescan: loaded
        // again, they say what it is now. (Nothing of theirs is
        // constructed: their dependency check fails first.)
        let done: BTreeSet<String> = report.plugins.iter().map(|o| o.name.clone()).collect();
        let stale = self.unavailable_dependents_of(name, &done);
        if !stale.is_empty() {
            let replace: BTreeSet<String> = stale.iter().cloned().collect();
            report.settle(self.reload_names(&stale, &replace).plugins);
        }
        let (mut outcomes, others): (Vec<_>, Vec<_>) =
            report.plugins.into_iter().partition(|o| o.name == name);
        outcomes.extend(others);
        // What it was loaded from is what the next rescan compares with:
        // else that rescan would find it changed and restart it again.
        self.restamp();
        if outcomes.first().is_some_and(|o| o.name == name) {
            Ok(outcomes)
        } else {
            Err(ReloadRefused::NotRegistered)
        }
    }

    /// For a reload of installed plugin `name`: asks the interpreter for
    /// the entry points again, as a rescan does
    /// ([`rescan_entry_points`](Self::rescan_entry_points)), and records
    /// what it reports now of the one `name` was loaded from, its directory
    /// with it: the same declaration, else the one of the same name and
    /// distribution whose value changed (its class moved to another module
    /// in an upgrade). The reload then loads what is installed now; with
    /// what was found at start-up it imported a module that was gone, or
    /// read a `manifest.json` the new version no longer ships. When the
    /// discovery fails, nothing is known: the plugin is reloaded from what
    /// was found before.
    ///
    /// # Errors
    ///
    /// [`ReloadRefused::EntryPointGone`] when `serving` and the entry point
    /// is no longer declared, or its module is not found: left serving, as
    /// a directory plugin whose directory vanished is. One that does not
    /// serve is loaded and fails, naming why.
    fn refresh_entry_point(&self, name: &str, serving: bool) -> Result<(), ReloadRefused> {
        if !self.config.python_entry_points {
            return Ok(());
        }
        let found = self.discover_entry_points();
        if self.entry_points_error.read().is_some() {
            return Ok(());
        }
        let (known, others) = {
            let all = self.entry_points.read();
            let Some(known) = all.get(name).cloned() else {
                return Ok(());
            };
            let others: Vec<EntryPoint> = all
                .iter()
                .filter(|(key, _)| key.as_str() != name)
                .map(|(_, ep)| ep.clone())
                .collect();
            (known, others)
        };
        let now = known
            .now_among(&found, |ep| others.iter().any(|o| o.same_declaration(ep)))
            .cloned();
        let why = match &now {
            None => Some(format!(
                "is no longer installed (the interpreter declares no entry point '{}' of group {} of {})",
                known.name,
                crate::entry_points::GROUP,
                known.dist.as_deref().unwrap_or("its distribution")
            )),
            // Its package directory removed, or an upgrade half done: the
            // entry point is declared, its module is not there.
            Some(ep) if ep.module_not_found() => ep
                .error
                .as_deref()
                .map(|e| format!("cannot be found now: {e}")),
            Some(_) => None,
        };
        match (why, now) {
            (Some(why), _) if serving => Err(ReloadRefused::EntryPointGone {
                entry_point: known.describe(),
                why,
            }),
            // Not serving: loaded, and FAILED with the reason.
            (Some(why), None) => {
                if let Some(ep) = self.entry_points.write().get_mut(name) {
                    ep.error = Some(why);
                }
                Ok(())
            }
            (_, Some(ep)) => {
                if ep.value != known.value {
                    tracing::info!(plugin = %name, from = %known.value, to = %ep.value, "Plugin {name}: its entry point is {} now", ep.value);
                }
                self.record_entry_points(vec![(name.to_owned(), ep)]);
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// Whether plugin directory `dir` has no manifest any more (the
    /// directory, or the file, is not there; a link that leads nowhere is
    /// still a manifest, a bad one).
    fn manifest_gone(&self, dir: &std::path::Path) -> bool {
        self.manifest_not_found(dir)
            && !self
                .fs
                .is_symlink(&dir.join(crate::manifest::MANIFEST_FILE))
                .unwrap_or(false)
    }

    /// Whether plugin directory `name` (not an installed plugin's) has
    /// changed since its last stamp: what makes a rescan load it again.
    fn directory_changed(&self, name: &str) -> bool {
        if self.entry_points.read().contains_key(name) {
            return false;
        }
        let Some(dir) = self.entries.read().get(name).map(|e| e.dir.clone()) else {
            return false;
        };
        let now = super::stamp::stamp(&dir, self.config.max_manifest_bytes);
        self.stamps.read().get(name).is_none_or(|old| *old != now)
    }

    /// Reloads every registered plugin as [`reload`](Self::reload) does, in
    /// dependency order, and loads plugin directories that appeared under
    /// the directory of the last [`load_all`](Self::load_all) and, with
    /// [`LoaderConfig::python_entry_points`](super::LoaderConfig::python_entry_points),
    /// entry points that were installed since. What it loaded is the
    /// baseline of the next [`rescan`](Self::rescan), as after
    /// [`load_all`](Self::load_all).
    pub fn reload_all(&self) -> LoadReport {
        let started = Instant::now();
        let mut resigned = self.reread_keys_for_reload();
        self.fresh_stamps.lock().clear();
        let (new_entry_points, _gone) = self.rescan_entry_points(false);
        let names: Vec<String> = self.entries.read().keys().cloned().collect();
        resigned.extend(
            names
                .iter()
                .filter(|name| self.outside_library_changed(name) || self.directory_changed(name))
                .cloned(),
        );
        let mut report = self.reload_names(&names, &resigned);
        let plugins_dir = self.plugins_dir.read().clone();
        let mut new: Vec<PathBuf> = Vec::new();
        if let Some(plugins_dir) = plugins_dir {
            let known = self.registered_dirs();
            new = self
                .discover(&plugins_dir)
                .into_iter()
                .filter(|dir| !known.contains(dir))
                .collect();
        }
        if !new.is_empty() || !new_entry_points.is_empty() {
            report.plugins.extend(
                self.load_pass(&new, &new_entry_points, NoManifest::Fail)
                    .plugins,
            );
        }
        report.settle(self.settle_dependents());
        report.plugins.sort_by(|a, b| a.name.cmp(&b.name));
        // What was loaded is the next rescan's baseline, as after load_all.
        self.restamp();
        report.elapsed_ms = ms(started.elapsed());
        report.log_summary("Reloaded", None);
        report
    }

    /// One reload pass over registered plugins. An available in-process
    /// plugin is kept as it is unless it is in `replace` (a rescan found its
    /// files changed): then its instance is let go (its library stays
    /// mapped) and the plugin is loaded again, its library under a new file
    /// identity.
    pub(super) fn reload_names(&self, names: &[String], replace: &BTreeSet<String>) -> LoadReport {
        self.checker.clear_cache();
        self.pass.clear();
        let mut outcomes: BTreeMap<String, PluginLoadOutcome> = BTreeMap::new();
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        // First every old instance is let go, so that the old runners all
        // end (their `on_unload` runs) at once; then each is waited for. One
        // after the other, a rescan of N changed plugins kept the first down
        // for N unload times.
        let mut letting_go = Vec::with_capacity(names.len());
        for name in names {
            let started = Instant::now();
            let Some(entry) = self.entries.read().get(name).cloned() else {
                continue;
            };
            let mut retired = None;
            // Its calls in flight are waited for up to their time limit and
            // a second from when it is let go, as a removal waits (a fixed
            // 10 s failed a healthy plugin whose call was within its limit).
            let drain = entry
                .handle
                .as_ref()
                .and_then(PluginHandle::call_timeout)
                .unwrap_or(self.config.call_timeout)
                + PAST_THE_CALL_LIMIT;
            // An in-process instance is let go at its turn below, once the
            // plugins before it have drained: let go here, it was down (503)
            // for another plugin's calls, up to their time limit. A runner
            // is let go here, so that the old runners end together.
            let mut in_process = false;
            if let Some(handle) = &entry.handle {
                if handle.isolation() == Isolation::InProcess {
                    if self.registry.is_available(name) && !replace.contains(name) {
                        tracing::info!(plugin = %name, "Plugin {name} kept as it is: in-process libraries are never unloaded");
                        self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                        continue;
                    }
                    in_process = true;
                } else {
                    retired = self.retire(handle);
                    // An isolated plugin's: dropped here, it runs no plugin
                    // code (its runner was asked to stop).
                    drop(self.without_instance(name));
                }
            }
            letting_go.push((name, entry, started, drain, retired, in_process));
        }
        // The old runners end first, together (each its `on_unload` run, at
        // most 1.5 s), before any new one starts: a plugin that holds what
        // only one may hold (a lock, a port, a device, GPU memory) and frees
        // it there could not construct beside it. The calls they had in
        // flight (cut: "send it again") end with them; then each shows
        // LOADED. Left for its turn, one whose cut call ended showed
        // INITIALIZED without an instance while in-process plugins before it
        // drained.
        let stop_by = Instant::now() + crate::RUNNER_STOP_WAIT;
        for (name, _, _, _, retired, _) in &mut letting_go {
            let Some(old) = retired.take() else {
                continue;
            };
            if !old.wait_stopped(stop_by.saturating_duration_since(Instant::now())) {
                tracing::warn!(plugin = %name, "Plugin {name}: its old runner had not ended after {} s; starting the new one anyway", crate::RUNNER_STOP_WAIT.as_secs_f64());
                continue;
            }
            self.wait_idle(name, Instant::now() + CUT_CALLS_END);
            drop(self.without_instance(name));
        }
        for (name, mut entry, started, drain, _, in_process) in letting_go {
            // When its instance was let go: its calls' time limit counts
            // from then (an in-process one let go at its turn took calls
            // until then, and had its whole wait to come).
            let mut let_go = started;
            let mut old_handles = Vec::new();
            if in_process {
                if let Some(handle) = &entry.handle {
                    let _ = self.retire(handle);
                }
                old_handles.extend(self.without_instance(name));
                let_go = Instant::now();
            } else if entry.handle.is_none() {
                // No handle to take out: only its state moves.
                drop(self.without_instance(name));
            }
            let idle_by = let_go + drain;
            self.wait_idle(name, idle_by);
            if in_process {
                // Its calls ended: its destructor runs now, bounded, before
                // its successor is constructed.
                old_handles.extend(entry.handle.take());
                self.drop_let_go(vec![(name.to_owned(), old_handles)]);
            }
            let manifest = self
                .reread_manifest(name, &entry.dir)
                .and_then(|m| self.check_reload_name(name, m));
            match manifest {
                Ok(m) => {
                    let info = PluginInfo {
                        description: m.description.clone(),
                        version: Some(m.version.clone()),
                        source: Some(entry.dir.clone()),
                    };
                    // Only once no call of the old instance is in flight: a
                    // call that took the handle before it was retired may
                    // have begun after the first wait, so wait once more.
                    let busy = || self.registry.in_flight(name).is_some_and(|n| n > 0);
                    let mut loaded = (!busy()).then(|| {
                        self.registry
                            .mark_loaded_because(name, Some(info.clone()), Some(RELOADING))
                    });
                    if !matches!(loaded, Some(Ok(()))) {
                        self.wait_idle(name, idle_by);
                        loaded = (!busy()).then(|| {
                            self.registry
                                .mark_loaded_because(name, Some(info), Some(RELOADING))
                        });
                    }
                    if !matches!(loaded, Some(Ok(()))) {
                        // Its instance is let go already: a plugin left as it
                        // is would look available and have none. FAILED says
                        // so, and the next rescan or reload loads it again.
                        // The wait ends early when the host stops: no fault
                        // of the plugin's, and no ERROR line to alert on.
                        if self.is_shutting_down() {
                            let reason = format!(
                                "not reloaded: {} while its calls were running",
                                crate::process::HOST_STOPPING
                            );
                            tracing::info!(plugin = %name, %reason, "Plugin {name} not reloaded: the host is stopping");
                            let _ = self.registry.mark_failed(name, reason);
                            self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                            continue;
                        }
                        let reason = format!(
                            "not reloaded: a call was still running after the reload waited {:.0} s \
                             (its call time limit and a second) for its calls to end; reload it \
                             again (the next rescan does)",
                            drain.as_secs_f64()
                        );
                        tracing::error!(plugin = %name, reason = %forgesyte_errors::logged(&reason), "✗ Plugin FAILED: {name}");
                        let _ = self.registry.mark_failed(name, reason);
                        self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                        continue;
                    }
                    if let Some(e) = self.entries.write().get_mut(name) {
                        e.raw = Some(Arc::clone(&m.raw));
                        e.optional = m.optional;
                        e.describe(Some(&m));
                    }
                    pending.insert(
                        name.clone(),
                        Pending {
                            name: name.clone(),
                            dir: entry.dir.clone(),
                            manifest: m,
                            started,
                        },
                    );
                }
                Err(bad) => {
                    // What the broken text still says of itself is shown,
                    // not the old manifest's version and description.
                    // An installed plugin's falls back on its distribution's
                    // version, as at load (it read `unknown` after a rescan).
                    let installed = self
                        .entry_points
                        .read()
                        .get(name)
                        .and_then(|ep| ep.version.clone());
                    let info = PluginInfo {
                        description: bad.description(),
                        version: bad
                            .version()
                            .or(installed)
                            .or_else(super::registration::unknown_version),
                        source: Some(entry.dir.clone()),
                    };
                    let BadManifest { raw, error } = *bad;
                    let _ = self.registry.mark_loaded(name, Some(info));
                    let _ = self.registry.set_signature(name, None);
                    if let Some(e) = self.entries.write().get_mut(name) {
                        e.raw = raw.map(Arc::new);
                        e.optional = false;
                        e.describe(None);
                    }
                    self.record_failure(name, &error);
                    self.finish_outcome(name, &entry.dir, started, &mut outcomes);
                }
            }
        }
        self.run_waves(&pending, &mut outcomes);
        LoadReport {
            plugins: outcomes.into_values().collect(),
            elapsed_ms: 0.0,
        }
    }

    /// Loads again, as every reload and rescan does at its end, the plugins
    /// whose `plugin:` dependencies changed availability under them (one
    /// whose dependency is no longer available becomes UNAVAILABLE naming
    /// it; one UNAVAILABLE over a dependency available again is retried),
    /// outside any reload or rescan: after a supervisor restart brought a
    /// dependency back. Its report lists only the plugins it loaded again
    /// (none, mostly). Run it where no other pass runs (the server holds
    /// its admin claim).
    pub fn settle(&self) -> LoadReport {
        let started = Instant::now();
        self.fresh_stamps.lock().clear();
        let plugins = self.settle_dependents();
        let report = LoadReport {
            plugins,
            elapsed_ms: ms(started.elapsed()),
        };
        if !report.plugins.is_empty() {
            self.restamp();
            report.log_summary("Settled", Some("plugins whose dependencies changed"));
        }
        report
    }

    /// The plugins UNAVAILABLE over `name`, directly or through other such
    /// plugins (each names its dependency's state in its reason), but
    /// those in `done` (whose own dependents are followed all the same).
    fn unavailable_dependents_of(&self, name: &str, done: &BTreeSet<String>) -> Vec<String> {
        let entries = self.entries.read();
        let mut seen: BTreeSet<&str> = BTreeSet::from([name]);
        let mut found: Vec<String> = Vec::new();
        let mut frontier = vec![name];
        while let Some(dependency) = frontier.pop() {
            for (dependent, entry) in entries.iter() {
                if entry.plugin_dep_names().any(|d| d == dependency)
                    && self.registry.get_state(dependent) == Some(PluginLifecycleState::Unavailable)
                    && seen.insert(dependent.as_str())
                {
                    frontier.push(dependent.as_str());
                    if !done.contains(dependent) {
                        found.push(dependent.clone());
                    }
                }
            }
        }
        found
    }

    /// Whether [`settle`](Self::settle) has a plugin to load again: a read
    /// of the registry, no pass.
    pub fn has_unsettled_dependents(&self) -> bool {
        !self.unsettled_dependents().is_empty()
    }

    /// Loads again, as a reload does, every plugin whose `plugin:`
    /// dependencies changed availability under it, until none is left
    /// (each at most once: a dependent's change may unsettle its own
    /// dependents): an available one whose dependency is no longer
    /// available (FAILED, UNAVAILABLE, retired, or its directory gone) is
    /// let go and becomes UNAVAILABLE naming it; one UNAVAILABLE over a
    /// dependency that is available again is retried. Run after every
    /// reload and rescan. Their outcomes, in the order they were loaded.
    pub(super) fn settle_dependents(&self) -> Vec<PluginLoadOutcome> {
        let mut tried = BTreeSet::new();
        let mut outcomes = Vec::new();
        loop {
            let unsettled: Vec<String> = self
                .unsettled_dependents()
                .into_iter()
                .filter(|name| !tried.contains(name))
                .collect();
            if unsettled.is_empty() {
                return outcomes;
            }
            tracing::info!(plugins = ?unsettled, "Plugins whose plugin dependencies changed availability: loading them again");
            tried.extend(unsettled.iter().cloned());
            let replace: BTreeSet<String> = unsettled.iter().cloned().collect();
            outcomes.extend(self.reload_names(&unsettled, &replace).plugins);
        }
    }

    /// The registered plugins [`settle_dependents`](Self::settle_dependents)
    /// loads again: an available one with a `plugin:` dependency that is
    /// no longer met (not available, or of a version its requirement
    /// refuses), unless that dependency is only down for a restart its
    /// supervisor has scheduled; and one UNAVAILABLE over a dependency (its
    /// reason names it) while all of them are met.
    fn unsettled_dependents(&self) -> Vec<String> {
        // Every plugin read once: a dependency read unmet, and read again
        // a moment later no longer restarting (its restart just done),
        // had a healthy dependent reloaded for nothing.
        let statuses = self.registry.list_all();
        unsettled_among(&statuses, &self.entries.read())
    }

    /// Plugin `name` has no instance from now on: its handle is taken out
    /// and it is LOADED (the manifest's info follows), so a plugin without
    /// an instance does not show an available state meanwhile: at once when
    /// no call is in flight, else as the last one ends (RUNNING cannot go
    /// back to LOADED; it showed INITIALIZED, with no instance, until the
    /// reload came back to it).
    ///
    /// The handle taken out is returned, to be dropped outside the map's
    /// lock (an in-process instance's destructor may run where it drops).
    #[must_use = "an in-process instance's destructor runs where its handle drops: drop it \
                  outside every lock (`drop_let_go`)"]
    fn without_instance(&self, name: &str) -> Option<PluginHandle> {
        let handle = self.entries.write().get_mut(name).and_then(|e| {
            let handle = e.handle.take()?;
            e.last_tools = Some(handle.tools().iter().map(|t| t.id.clone()).collect());
            Some(handle)
        });
        let _ = self.registry.mark_loaded_when_idle(name, RELOADING);
        handle
    }

    /// A reloaded manifest must still name the plugin it was registered as.
    fn check_reload_name(&self, key: &str, m: Manifest) -> Result<Manifest, Box<BadManifest>> {
        if m.name == key {
            return Ok(m);
        }
        let raw = Some(Value::clone(&m.raw));
        let error = if self.registry.contains(&m.name) {
            // Said as at load: both sources.
            ManifestError::DuplicateName {
                existing: PathBuf::from(self.source_of(&m.name)),
                name: m.name,
                this: self.entry_points.read().get(key).map(EntryPoint::describe),
            }
        } else {
            ManifestError::InvalidField {
                field: "name".into(),
                message: format!(
                    "changed from '{key}' to '{}' since the plugin was registered; a rescan \
                     loads it under its new name",
                    m.name
                ),
            }
        };
        Err(bad(raw, error))
    }

    /// Waits until no call is in flight on `name` (counted, not by its
    /// state: a FAILED plugin may still have calls running), at most until
    /// `deadline`.
    fn wait_idle(&self, name: &str, deadline: Instant) {
        while !self.is_shutting_down()
            && self.registry.in_flight(name).is_some_and(|n| n > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Whether `reason` names the dependency `plugin:{name}` (alone, or with a
/// version requirement or a note after it), not merely one whose name
/// begins with `name`.
pub(super) fn names_plugin_dependency(reason: &str, name: &str) -> bool {
    let item = format!("plugin:{name}");
    reason.match_indices(&item).any(|(at, _)| {
        reason[at + item.len()..]
            .chars()
            .next()
            .is_none_or(|c| matches!(c, '@' | ' ' | ',' | ';' | ')'))
    })
}

/// [`Loader::unsettled_dependents`] among `statuses` (sorted by name, as
/// the registry lists them) and the loader's `entries`.
fn unsettled_among(
    statuses: &[forgesyte_registry::PluginStatus],
    entries: &BTreeMap<String, Entry>,
) -> Vec<String> {
    let known = super::waves::known_of(statuses);
    let status_of = |name: &str| {
        statuses
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .map(|i| &statuses[i])
    };
    let unmet = |d: &forgesyte_deps::Dependency| {
        forgesyte_deps::unmet_plugin_dependency(d, &known).is_some()
    };
    entries
        .iter()
        .filter(|(_, e)| !e.plugin_deps.is_empty())
        .filter(|(name, e)| {
            let Some(status) = status_of(name) else {
                return false;
            };
            if status.state.is_available() {
                return e.plugin_deps.iter().any(|d| {
                    unmet(d)
                        && !plugin_dep_name(d)
                            .and_then(status_of)
                            .is_some_and(restart_pending)
                });
            }
            status.state == PluginLifecycleState::Unavailable
                && !e.plugin_deps.iter().any(unmet)
                && status.reason.as_deref().is_some_and(|r| {
                    e.plugin_dep_names()
                        .any(|dep| names_plugin_dependency(r, dep))
                })
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Whether a plugin is down only until a restart its supervisor scheduled
/// (FAILED with a retry time, or LOADED restarting): its dependents are
/// left as they are meanwhile.
fn restart_pending(s: &forgesyte_registry::PluginStatus) -> bool {
    (s.state == PluginLifecycleState::Failed && s.next_retry_at.is_some())
        || (s.state == PluginLifecycleState::Loaded
            && s.reason.as_deref() == Some(forgesyte_registry::RESTARTING))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use forgesyte_registry::{PluginInfo, Registry};

    use super::Entry;

    /// The plugins `unsettled_among` finds when `dependent`, INITIALIZED,
    /// needs `plugin:base`, whose state `base_to` sets.
    fn unsettled_with(base_to: impl FnOnce(&Registry)) -> Vec<String> {
        let registry = Registry::new();
        for name in ["base", "dependent"] {
            registry.register(name, PluginInfo::default()).unwrap();
            registry.mark_initialized(name).unwrap();
        }
        base_to(&registry);
        let mut entry = Entry::registered(
            "/p/dependent".into(),
            None,
            false,
            &Err::<crate::manifest::Manifest, ()>(()),
        );
        entry.plugin_deps = vec![forgesyte_deps::Dependency::Plugin {
            name: "base".into(),
            req: None,
        }];
        let entries = BTreeMap::from([("dependent".to_owned(), entry)]);
        super::unsettled_among(&registry.list_all(), &entries)
    }

    /// A dependency down for a restart its supervisor scheduled leaves its
    /// dependents alone; one down for good has them loaded again. Both read
    /// from one listing of the registry.
    #[test]
    fn a_dependency_restarting_leaves_its_dependents_alone() {
        assert!(unsettled_with(|_| {}).is_empty());
        let restarting = unsettled_with(|r| {
            r.mark_failed("base", "CrashError: exited").unwrap();
            r.mark_restarting("base").unwrap();
        });
        assert!(restarting.is_empty(), "{restarting:?}");
        let down = unsettled_with(|r| r.mark_failed("base", "InitError: boom").unwrap());
        assert_eq!(down, ["dependent"]);
    }

    #[test]
    fn a_reason_names_a_dependency_by_its_whole_name() {
        use super::names_plugin_dependency as names;
        assert!(names("Missing dependencies: plugin:a", "a"));
        assert!(names(
            "Missing dependencies: plugin:a@^2 (found 1.0.0)",
            "a"
        ));
        assert!(names(
            "Missing dependencies: plugin:a (a is FAILED: x), plugin:b",
            "a"
        ));
        assert!(names("Missing dependencies: plugin:ab, plugin:a", "a"));
        assert!(!names("Missing dependencies: plugin:ab", "a"));
        assert!(!names("Missing dependencies: lib:a", "a"));
    }
}
