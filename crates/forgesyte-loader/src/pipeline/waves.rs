//! Dependency waves: plugins of a pass ordered so that every `plugin:`
//! dependency is loaded in an earlier wave; each wave instantiated in
//! parallel (in-process libraries opened on one thread, constructed in
//! parallel); cycles named.

use std::collections::{BTreeMap, BTreeSet};

use forgesyte_deps::Dependency;
use forgesyte_errors::{InitError, PluginError};

use super::construction::Running;
use super::instantiate::Step;
use super::loader::{Loader, Pending, plugin_dep_name};
use super::parallel::{Stage, par_map_pipeline};
use super::report::PluginLoadOutcome;
use crate::PluginHandle;
use crate::manifest::{Isolation, Runtime};

/// At most this many threads of a load pass wait for runner processes.
const MAX_WAITING_THREADS: usize = 64;

impl Loader {
    /// Phase 3 of a pass: dependency order, one wave at a time; each wave in
    /// parallel.
    pub(super) fn run_waves(
        &self,
        pending: &BTreeMap<String, Pending>,
        outcomes: &mut BTreeMap<String, PluginLoadOutcome>,
    ) {
        // The registered plugins outside the pass, with their `plugin:`
        // dependencies: a cycle may run through them (a reloaded plugin
        // that now depends on a loaded one that depends on it).
        let outside: BTreeMap<String, Vec<String>> = self
            .entries
            .read()
            .iter()
            .filter(|(name, _)| !pending.contains_key(*name))
            .map(|(name, e)| {
                (
                    name.clone(),
                    e.plugin_dep_names().map(str::to_owned).collect(),
                )
            })
            .collect();
        let (waves, cyclic) = dependency_waves(pending, &outside);
        // A plugin of a later wave waits for its dependencies' wave (and
        // every plugin of it, a slow constructor's too): its LOADED says
        // so, not `null` (a dependency FAILED already read as nothing yet).
        let later = waves
            .iter()
            .skip(1)
            .flatten()
            .chain(cyclic.iter().map(|(n, _)| n));
        for name in later {
            if let Some(p) = pending.get(name) {
                let on: Vec<String> = p
                    .manifest
                    .requirements
                    .dependencies
                    .iter()
                    .filter_map(|d| plugin_dep_name(d).map(|n| format!("plugin:{n}")))
                    .collect();
                let reason = format!(
                    "waiting for its dependencies to be loaded first: {}",
                    on.join(", ")
                );
                let _ = self.registry.mark_loaded_because(name, None, Some(&reason));
            }
        }
        // Every Python package of the pass, asked of each interpreter once.
        // Under `require_signed` the operator's interpreters only: one a
        // manifest names is the plugin's own file, which then runs only
        // once the plugin's signature verified, by its own dependency check
        // (one run per plugin). Under `require_confinement` such a plugin
        // is refused before its check (`refuse_own_interpreter`).
        // Not of a plugin whose manifest changed since its lock: the
        // interpreter it names is the change's to choose.
        let pending_checked: Vec<&Pending> = pending
            .values()
            .filter(|p| self.check_manifest_pin(p).is_ok())
            .collect();
        let requirements: Vec<_> = pending_checked
            .iter()
            .map(|p| self.requirements(p))
            .collect();
        self.prestart_zygotes(pending_checked.iter().copied().zip(&requirements));
        let prefetch = if self.config.require_signed || self.config.require_confinement {
            let operators: Vec<_> = pending_checked
                .iter()
                .zip(&requirements)
                .filter(|(p, _)| p.manifest.python.is_none())
                .map(|(_, req)| req.clone())
                .collect();
            self.checker.python_prefetch(&operators)
        } else {
            // Not of a pinned plugin whose interpreter lies in its own
            // directory: refused before it runs (`refuse_interpreter_inside`).
            let refused = |p: &Pending| {
                self.names_an_interpreter_inside(p)
                    && !self.pins(p).is_ok_and(|pins| pins.is_empty())
            };
            if pending_checked.iter().any(|p| refused(p)) {
                let runnable: Vec<_> = pending_checked
                    .iter()
                    .zip(&requirements)
                    .filter(|(p, _)| !refused(p))
                    .map(|(_, req)| req.clone())
                    .collect();
                self.checker.python_prefetch(&runnable)
            } else {
                self.checker.python_prefetch(&requirements)
            }
        };
        // The interpreters answer beside the waves: a plugin's check waits
        // for its own interpreter's answer, and one that needs none for
        // nothing (the pass waited for every interpreter first: one that
        // hung held every plugin LOADED for its time limit).
        prefetch.run_beside(|| self.run_each_wave(pending, waves, outcomes));
        let known = self.known_plugins();
        for (name, hops) in cyclic {
            if let Some(p) = pending.get(&name) {
                let err = self.in_a_cycle(p, &hops, &known);
                self.record_failure(&name, &err.into());
                self.finish_outcome(&name, &p.dir, p.started, outcomes);
            }
        }
    }

    /// The waves of a pass, one after the other; the plugins of a wave in
    /// parallel.
    fn run_each_wave(
        &self,
        pending: &BTreeMap<String, Pending>,
        waves: Vec<Vec<String>>,
        outcomes: &mut BTreeMap<String, PluginLoadOutcome>,
    ) {
        for wave in waves {
            // A wave depends only on earlier waves, so the plugins available
            // to it are the same for all its members: list them once per wave
            // (listing them per plugin made a pass quadratic in plugins).
            let known = self.known_plugins();
            let members: Vec<&Pending> = wave.iter().filter_map(|n| pending.get(n)).collect();
            // A plugin in a runner process costs this pass a thread that
            // waits (for the runner's hello and its construction), not a
            // core: those get a thread each, up to a bound, so N runners
            // start together rather than a core's worth at a time.
            let waiting = members.iter().filter(|p| self.runs_in_a_process(p)).count();
            // In-process libraries are opened on this thread, one at a time
            // (the dynamic loader's lock), while the pool checks the next
            // plugins and constructs the opened ones (`par_map_pipeline`):
            // this thread is one of the pass's `threads`.
            // The waiting threads come on top of the working ones: in
            // their place, a runner that takes its time held the only
            // worker of a 2-core host, and the wave's other checks waited
            // for it (and the constructions' crew had one thread).
            // A wave that mixes both keeps a worker for the checks of its
            // other plugins even with one thread (`threads: 1`, one core).
            let mut working = self.config.threads.saturating_sub(1);
            if waiting > 0 && waiting < members.len() {
                working = working.max(1);
            }
            let workers = working + waiting.min(MAX_WAITING_THREADS);
            let running = Running::default();
            // Each plugin is published (INITIALIZED, or its failure) as
            // soon as its load ends: one in a runner from the pool thread
            // that started it, an in-process one on this thread as its
            // construction's result comes (`par_map_pipeline`'s `done`).
            // Kept for the end of the wave, every plugin of it waited
            // LOADED (503) for its slowest one, a hung constructor's whole
            // init timeout. When each ended is kept for its outcome's time
            // (written at the end of the wave).
            let published = parking_lot::Mutex::new(BTreeMap::new());
            let publish = |p: &Pending, result: Result<Option<PluginHandle>, PluginError>| {
                match result {
                    Ok(Some(handle)) => {
                        self.constructed(&p.name);
                        self.mark_loaded(p, handle)
                    }
                    // Published already.
                    Ok(None) => return Ok(None),
                    Err(err) => {
                        self.construction_failed(&p.name, &err);
                        self.record_failure(&p.name, &err)
                    }
                }
                published
                    .lock()
                    .insert(p.name.clone(), std::time::Instant::now());
                Ok(None)
            };
            let results = par_map_pipeline(
                workers,
                &members,
                |p| match self.check_and_start(p, &known) {
                    Ok(Step::Started(handle)) => Stage::Done(publish(p, Ok(Some(handle)))),
                    Ok(Step::ToOpen(checked)) => Stage::Next(checked),
                    Err(err) => Stage::Done(publish(p, Err(err))),
                },
                |p, checked| match self.refuse_while_constructing(p) {
                    // Before its library is opened again (each open of a
                    // refused reload left one more copy mapped).
                    Err(err) => Stage::Done(Err(err)),
                    // A pass (a rescan) still going when the host stops
                    // maps no more libraries: nothing would serve them, and
                    // their constructors would run during the stop.
                    Ok(()) if self.is_shutting_down() => {
                        Stage::Done(Err(super::construction::not_loaded_host_stopping()))
                    }
                    Ok(()) => match self.open_library(&p.name, checked) {
                        Ok(opened) => Stage::Next(opened),
                        Err(err) => Stage::Done(Err(err)),
                    },
                },
                |p, opened| self.construction(p, opened, &running).map(|r| r.map(Some)),
                |p, result| publish(p, result),
                |p, why| Err(self.construction_given_up(p, why, &running)),
            );
            for (p, result) in results {
                let result =
                    result.unwrap_or_else(|message| Err(InitError::Panicked { message }.into()));
                // Published as it came, but for a panic.
                let _ = publish(p, result);
                let ended = published
                    .lock()
                    .get(&p.name)
                    .copied()
                    .unwrap_or_else(std::time::Instant::now);
                self.finish_outcome_ended(&p.name, &p.dir, p.started, ended, outcomes);
            }
        }
    }

    /// Starts the zygotes of the pass's Python plugins now, before the
    /// package checks (an interpreter run of their own) and the checks of
    /// every wave: a zygote's interpreter start then overlaps them instead
    /// of following them. A plugin that a check then refuses leaves its
    /// zygote idle (one interpreter, no runner). Only the operator's
    /// interpreter (`--python`, else `python3` on `PATH`) starts early: one
    /// a manifest names (`"python": ".venv/bin/python"`) is the plugin's
    /// own file, which no signature covers, and runs only once the plugin
    /// passed its checks.
    ///
    /// Each plugin comes with its requirements, whose `python` is its
    /// interpreter, resolved once for the pass.
    fn prestart_zygotes<'a>(
        &self,
        plugins: impl Iterator<Item = (&'a Pending, &'a forgesyte_deps::Requirements)>,
    ) {
        for (p, req) in plugins {
            if p.manifest.runtime != Runtime::Python || p.manifest.python.is_some() {
                continue;
            }
            if let Some(interpreter) = &req.python {
                let limits = self.config.process.with_manifest(&p.manifest.limits);
                crate::process::prestart_python_zygote(
                    interpreter,
                    &limits,
                    self.config.runner_user,
                    self.config.confine,
                );
            }
        }
    }

    /// Whether `p` runs in a runner process (a Python plugin, or a native
    /// one isolated).
    fn runs_in_a_process(&self, p: &Pending) -> bool {
        p.manifest.runtime == Runtime::Python || self.isolation_of(p) == Isolation::Process
    }

    /// Where a native plugin runs: its manifest's `isolation`, else the
    /// loader's default.
    pub(super) fn isolation_of(&self, p: &Pending) -> Isolation {
        p.manifest
            .declared_isolation
            .unwrap_or(self.config.default_isolation)
    }

    /// Versions of the plugins available now, for `plugin:` requirements
    /// (one that is not semver is said to be, never read as 0.0.0).
    pub(super) fn known_plugins(&self) -> forgesyte_deps::KnownPlugins {
        known_of(&self.registry.list_all())
    }
}

/// The plugins available among `statuses`, with their versions, as
/// `plugin:` dependencies are checked against them.
pub(super) fn known_of(
    statuses: &[forgesyte_registry::PluginStatus],
) -> forgesyte_deps::KnownPlugins {
    statuses
        .iter()
        .filter(|s| s.state.is_available())
        .map(|s| {
            let version = match s.version.as_deref() {
                // What a manifest without a version shows (the seed's).
                Some("unknown") | None => Err(None),
                Some(text) => lenient_version(text).ok_or_else(|| Some(text.to_owned())),
            };
            (s.name.clone(), version)
        })
        .collect()
}

/// A plugin's version as a `plugin:NAME@REQ` dependency compares it:
/// semver, or one or two numbers (`1`, `1.0`, as manifests write them),
/// padded with zeros.
fn lenient_version(text: &str) -> Option<semver::Version> {
    let text = text.trim();
    if let Ok(version) = semver::Version::parse(text) {
        return Some(version);
    }
    let parts: Vec<u64> = text
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts[..] {
        [major] => Some(semver::Version::new(major, 0, 0)),
        [major, minor] => Some(semver::Version::new(major, minor, 0)),
        _ => None,
    }
}

/// A plugin on or behind a cycle: its name, and for each of its
/// dependencies that leads to one, (that dependency, the cycle spelt out).
type Cyclic = (String, Vec<(String, String)>);

/// Orders pending plugins into waves: every plugin's `plugin:`
/// dependencies in the pass are in earlier waves. Plugins on or behind a
/// cycle are returned separately with the cycle spelled out (`a -> b ->
/// a`). The graph holds the registered plugins `outside` the pass too (name
/// → the plugins they depend on), so a cycle through them is found; they
/// are in no wave.
fn dependency_waves(
    pending: &BTreeMap<String, Pending>,
    outside: &BTreeMap<String, Vec<String>>,
) -> (Vec<Vec<String>>, Vec<Cyclic>) {
    let known = |name: &str| pending.contains_key(name) || outside.contains_key(name);
    let mut deps: BTreeMap<&str, BTreeSet<&str>> = pending
        .iter()
        .map(|(name, p)| {
            let inner = p
                .manifest
                .requirements
                .dependencies
                .iter()
                .filter_map(|d| match d {
                    Dependency::Plugin { name, .. } if known(name) => Some(name.as_str()),
                    _ => None,
                })
                .collect();
            (name.as_str(), inner)
        })
        .collect();
    for (name, on) in outside {
        let inner = on.iter().map(String::as_str).filter(|d| known(d)).collect();
        deps.insert(name.as_str(), inner);
    }
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut waves = Vec::new();
    loop {
        let wave: Vec<String> = deps
            .iter()
            .filter(|(name, d)| !done.contains(*name) && d.iter().all(|x| done.contains(x)))
            .map(|(name, _)| (*name).to_owned())
            .collect();
        if wave.is_empty() {
            break;
        }
        done.extend(
            wave.iter()
                .filter_map(|n| deps.get_key_value(n.as_str()).map(|(k, _)| *k)),
        );
        let wave: Vec<String> = wave
            .into_iter()
            .filter(|n| pending.contains_key(n))
            .collect();
        if !wave.is_empty() {
            waves.push(wave);
        }
    }
    // Each of its unresolved dependencies leads to a cycle: each is named
    // with its own (a plugin on two cycles named one, and the other
    // dependency as not yet loaded).
    let cyclic = deps
        .iter()
        .filter(|(n, _)| pending.contains_key(**n) && !done.contains(*n))
        .map(|(n, on)| {
            let hops = on
                .iter()
                .filter(|x| !done.contains(*x))
                .map(|x| find_cycle(n, x, &deps, &done))
                .collect();
            ((*n).to_owned(), hops)
        })
        .collect();
    (waves, cyclic)
}

/// Follows unresolved dependencies from `start`, through its dependency
/// `first`, until a node repeats (back to `start` where a node can go
/// there). The cycle that way, spelt out (`a -> b -> a`, or `a -> [b ->
/// c -> b]` for one `start` is only behind), with `first`.
fn find_cycle<'a>(
    start: &'a str,
    first: &'a str,
    deps: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    done: &BTreeSet<&'a str>,
) -> (String, String) {
    let mut path: Vec<&str> = vec![start];
    let mut current = start;
    let mut first = Some(first);
    let hop = |path: &[&str]| path.get(1).copied().unwrap_or(start).to_owned();
    loop {
        // Back to `start` when it can: the cycle it is on, not another one
        // it is merely behind.
        let next = first.take().or_else(|| {
            let on = deps.get(current)?;
            if on.contains(start) {
                return Some(start);
            }
            on.iter().find(|x| !done.contains(*x)).copied()
        });
        let Some(next) = next else {
            return (hop(&path), path.join(" -> "));
        };
        if let Some(pos) = path.iter().position(|n| *n == next) {
            let mut cycle: Vec<&str> = path[pos..].to_vec();
            cycle.push(next);
            let prefix = &path[..pos];
            let spelt = if prefix.is_empty() {
                cycle.join(" -> ")
            } else {
                format!("{} -> [{}]", prefix.join(" -> "), cycle.join(" -> "))
            };
            path.push(next);
            return (hop(&path), spelt);
        }
        path.push(next);
        current = next;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_of_one_or_two_numbers_compare_as_semver() {
        use super::lenient_version as v;
        assert_eq!(v("1.2.3"), Some(semver::Version::new(1, 2, 3)));
        assert_eq!(v("1.0"), Some(semver::Version::new(1, 0, 0)));
        assert_eq!(v(" 2 "), Some(semver::Version::new(2, 0, 0)));
        assert_eq!(v("unknown"), None);
        assert_eq!(v("1..2"), None);
        assert_eq!(v("1.2.3.4"), None);
    }
}
