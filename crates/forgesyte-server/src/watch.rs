//! `serve --watch`: file-change notification of the plugins directory,
//! debounced into one rescan ([`crate::rescan::rescan_when_free`]).
//!
//! What is watched (recursively) are the *roots*: the plugins directory,
//! and the directory each symbolic link directly in it leads to (a plugin
//! directory linked in). Every [`RESYNC`] the roots are worked out again
//! and compared with what is watched, by device and inode: a plugins
//! directory replaced (`mv plugins.new plugins`), one that did not exist
//! yet at the start, or a plugin linked in or re-linked since is watched
//! from then on, and one rescan runs. (A watch follows the inode it was
//! added on, and the watcher never follows a link made after it started:
//! each of those went unwatched for good.)
//!
//! What a plugin writes into its own directory as it loads (its
//! constructor or `on_load` saving a state file beside its code, with
//! confinement off) is its own output, not an edit: the files written
//! there, other than what plugins load or are checked by
//! ([`forgesyte_loader::loaded_by_plugins`]: manifests, the lock file, the
//! signature's files, code), while a `--watch` rescan loaded it (and
//! a moment after) set off no rescan. Each such rescan reloaded it, which
//! wrote again, which set off the next: 20 reloads in 6 s, for good. The
//! change stamp still counts the file (it is taken before the plugin's
//! files are read, so an edit made while it loads is never lost): the next
//! rescan for another change, `SIGHUP` or the admin route reloads it once.
//! Knows the rescan trigger, its report and the file system; nothing of
//! routes, and of the loader only which files plugins load.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use forgesyte_loader::manifest::{MANIFEST_FILE, PLUGIN_PY};

use crate::state::AppState;

/// How long file changes must have settled before `--watch` rescans. No
/// ceiling: a file still being written (a model copied in for minutes)
/// rescanned at a ceiling reloaded its plugin against half a file, again
/// and again, until the copy ended.
pub(crate) const WATCH_SETTLE: Duration = Duration::from_millis(300);
/// How often the watched roots are compared with what they should be.
pub(crate) const RESYNC: Duration = Duration::from_secs(2);
/// Changed paths `--watch` ignores: caches that running plugins write.
const IGNORED: [&str; 3] = ["__pycache__", ".pytest_cache", ".git"];
/// How long after a `--watch` rescan ends a file written into the directory
/// of a plugin it loaded is still taken for that plugin's own output: the
/// watcher reports a write a moment after it was made.
const OWN_OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Watched roots, each with the (device, inode) its watch was added on.
type Roots = BTreeMap<PathBuf, (u64, u64)>;

/// Changed paths (those [`relevant`]), each with when the watcher told.
type Changes = Vec<(PathBuf, Instant)>;

/// What the last `--watch` rescan loaded (added, changed, retried): each
/// plugin with its directory (as registered and as its links resolve), and
/// when the rescan began and ended.
struct Loaded {
    plugins: Vec<(String, Vec<PathBuf>)>,
    began: Instant,
    ended: Instant,
}

impl Loaded {
    fn of(report: &crate::wire::ReloadReport, began: Instant) -> Loaded {
        let loaded: BTreeSet<&str> = report
            .added
            .iter()
            .chain(&report.changed)
            .chain(&report.retried)
            .map(String::as_str)
            .collect();
        let plugins = report
            .plugins
            .iter()
            // An UNAVAILABLE one ran no code (a dependency is missing):
            // what lands in its directory meanwhile (the model file it
            // waits for) is no output of its own.
            .filter(|o| {
                loaded.contains(o.name.as_str())
                    && !matches!(o.state, crate::wire::PluginStateJson::Unavailable)
            })
            .map(|o| {
                let dir = PathBuf::from(&o.dir);
                // A plugin linked in is watched at the link's target.
                let resolved = std::fs::canonicalize(&dir).ok();
                (
                    o.name.clone(),
                    std::iter::once(dir).chain(resolved).collect(),
                )
            })
            .collect();
        Loaded {
            plugins,
            began,
            ended: Instant::now(),
        }
    }

    /// The plugin whose own output a change of `path` told at `at` is: one
    /// this rescan loaded, written into its directory while the rescan ran
    /// (or a moment after), and not what plugins load. The directory
    /// itself is never its output: it was replaced, renamed or removed
    /// (a whole new version moved into place).
    fn own_output(&self, path: &Path, at: Instant) -> Option<&str> {
        if at < self.began
            || at > self.ended + OWN_OUTPUT_GRACE
            || forgesyte_loader::loaded_by_plugins(path)
        {
            return None;
        }
        self.plugins
            .iter()
            .find(|(_, dirs)| dirs.iter().any(|d| path != d && path.starts_with(d)))
            .map(|(name, _)| name.as_str())
    }
}

/// Leaves out of `changes` what the plugins the last rescan loaded wrote
/// into their own directories as they loaded ([`Loaded::own_output`]),
/// saying so at WARN the first time for each plugin (`told`), at INFO
/// after: what is left, if anything, is worth a rescan.
fn without_own_output(
    changes: Changes,
    last: Option<&Loaded>,
    told: &mut BTreeSet<String>,
) -> Changes {
    let Some(last) = last else {
        return changes;
    };
    let mut kept = Changes::new();
    for (path, at) in changes {
        match last.own_output(&path, at) {
            Some(plugin) => {
                if told.insert(plugin.to_owned()) {
                    tracing::warn!(plugin = %plugin, path = %path.display(), "--watch: plugin {plugin} wrote {} into its own directory as it loaded: taken for its own output, no rescan for it (one per load reloaded it without end). Write such files under its tmp/, logs/ or .cache/, or name them in its manifest's filesystem.write; SIGHUP reloads it", path.display());
                } else {
                    tracing::info!(plugin = %plugin, path = %path.display(), "--watch: {} written into plugin {plugin}'s directory as a watch rescan loaded it: no rescan for it", path.display());
                }
            }
            None => kept.push((path, at)),
        }
    }
    kept
}

/// Starts watching `plugins_dir`; the watch lives as long as the runtime.
pub(crate) fn start(state: &AppState, plugins_dir: &Path) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Changes>();
    let below = plugins_dir.to_path_buf();
    let handler = move |result: notify::Result<notify::Event>| match result {
        Ok(event) if changes(&event.kind) => {
            let at = Instant::now();
            let paths: Changes = event
                .paths
                .into_iter()
                .filter(|p| relevant(p, &below))
                .map(|p| (p, at))
                .collect();
            if !paths.is_empty() {
                let _ = tx.send(paths);
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Watching the plugins directory: {e}"),
    };
    // Links are the roots' business (see the module's doc), not the
    // watcher's: it follows those it finds when a watch is added only.
    let config = notify::Config::default().with_follow_symlinks(false);
    let watcher = match RecommendedWatcher::new(handler, config) {
        Ok(watcher) => Arc::new(Mutex::new(watcher)),
        Err(e) => {
            tracing::error!(error = %e, "--watch: cannot watch for file changes: {e}");
            return;
        }
    };
    let dir = plugins_dir.to_path_buf();
    let mut roots = Roots::new();
    // The first watches: nothing moved yet (the load pass runs anyway).
    let _ = resync(&watcher, &dir, &mut roots);
    if roots.contains_key(&dir) {
        tracing::info!(dir = %dir.display(), "Watching {} for plugin changes", dir.display());
    } else {
        tracing::warn!(dir = %dir.display(), "--watch: {} cannot be watched now; watching for it to appear", dir.display());
    }
    let state = state.clone();
    let roots = Arc::new(Mutex::new(roots));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RESYNC);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        // What the last rescan loaded, and the plugins whose own output
        // was said already.
        let mut last: Option<Loaded> = None;
        let mut told: BTreeSet<String> = BTreeSet::new();
        let rescan = |state: AppState| async move {
            let began = Instant::now();
            crate::rescan::rescan_when_free(&state, crate::rescan::WATCH)
                .await
                .map(|report| Loaded::of(&report, began))
        };
        loop {
            tokio::select! {
                changed = rx.recv() => {
                    let Some(mut changed) = changed else {
                        break;
                    };
                    // A rebuild writes in several steps: wait until it settles.
                    while let Ok(Some(more)) = tokio::time::timeout(WATCH_SETTLE, rx.recv()).await {
                        changed.extend(more);
                    }
                    if without_own_output(changed, last.as_ref(), &mut told).is_empty() {
                        continue;
                    }
                    tracing::info!(dir = %dir.display(), "Files changed under {}: rescanning", dir.display());
                    last = rescan(state.clone()).await;
                }
                _ = every.tick() => {
                    let (watcher, roots, at) = (Arc::clone(&watcher), Arc::clone(&roots), dir.clone());
                    let moved = crate::pool::on_a_thread("forgesyte-watch", move || {
                        let mut roots = roots.lock().unwrap_or_else(PoisonError::into_inner);
                        resync(&watcher, &at, &mut roots)
                    })
                    .await
                    .unwrap_or(false);
                    if moved {
                        tracing::info!(dir = %dir.display(), "The plugins directory {} or a directory linked into it was replaced or appeared: rescanning", dir.display());
                        last = rescan(state.clone()).await;
                    }
                }
            }
        }
    });
}

/// Brings the watches in line with [`wanted`] roots of `plugins_dir`:
/// whether any root was added or dropped.
fn resync(watcher: &Mutex<RecommendedWatcher>, plugins_dir: &Path, roots: &mut Roots) -> bool {
    let wanted = wanted(plugins_dir);
    let mut watcher = watcher.lock().unwrap_or_else(PoisonError::into_inner);
    let mut moved = false;
    roots.retain(|path, id| {
        let keep = wanted.get(path) == Some(id);
        if !keep {
            // Its inode may be gone already: nothing left to unwatch.
            let _ = watcher.unwatch(path);
            moved = true;
        }
        keep
    });
    for (path, id) in wanted {
        if roots.contains_key(&path) {
            continue;
        }
        match watcher.watch(&path, RecursiveMode::Recursive) {
            Ok(()) => {
                roots.insert(path, id);
                moved = true;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "--watch: cannot watch {}: {e}", path.display());
            }
        }
    }
    moved
}

/// The roots `plugins_dir` needs now: itself (if it can be read), and the
/// plugin directory each symbolic link directly in it leads to.
fn wanted(plugins_dir: &Path) -> Roots {
    let identity = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let mut roots = Roots::new();
    let Ok(dir) = std::fs::metadata(plugins_dir) else {
        return roots;
    };
    let Ok(entries) = std::fs::read_dir(plugins_dir) else {
        return roots;
    };
    roots.insert(plugins_dir.to_path_buf(), identity(&dir));
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_symlink()) {
            continue;
        }
        // Only a plugin directory (a manifest or a `plugin.py` in it): a
        // link to `/` or a home directory is no plugin, and watching it
        // whole would walk and hold the whole tree.
        if let Ok(target) = std::fs::canonicalize(entry.path())
            && let Ok(meta) = std::fs::metadata(&target)
            && meta.is_dir()
            && [MANIFEST_FILE, PLUGIN_PY]
                .iter()
                .any(|file| target.join(file).is_file())
        {
            roots.insert(target, identity(&meta));
        }
    }
    roots
}

/// Whether an event changed something: the watcher also reports files
/// opened and closed unwritten, and a rescan opens every plugin's files,
/// so each rescan set off the next (an idle `--watch` server rescanned
/// twice a second).
fn changes(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(access) => {
            matches!(access, AccessKind::Close(AccessMode::Write))
        }
        _ => true,
    }
}

/// Whether a change of `path` (under `plugins_dir`, or under a plugin
/// directory linked into it) can matter to a plugin: caches do not, nor
/// what running plugins write by name (logs, temporary files: see
/// [`forgesyte_loader::runtime_output`]), which no change stamp counts.
/// Runtime output is judged below the plugins directory only (a plugins
/// directory under `/tmp` is not all runtime output); under a linked
/// plugin directory, by the file's name alone.
fn relevant(path: &Path, plugins_dir: &Path) -> bool {
    let cache = path.components().any(|c| match c {
        Component::Normal(name) => IGNORED.iter().any(|i| name == *i),
        _ => false,
    });
    let below = match path.strip_prefix(plugins_dir) {
        Ok(rel) => rel,
        Err(_) => Path::new(path.file_name().unwrap_or_default()),
    };
    // A hidden directory of the plugins directory is no plugin (a backup
    // copy, `.git`): what changes in it is nothing to rescan for.
    let in_hidden = path.strip_prefix(plugins_dir).is_ok_and(|rel| {
        rel.components()
            .next()
            .is_some_and(|c| forgesyte_loader::integrity::hidden(c.as_os_str()))
    });
    !cache && !in_hidden && !forgesyte_loader::runtime_output(below)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{changes, relevant, wanted};

    /// What a plugin the last rescan loaded wrote into its own directory
    /// while it loaded sets off no rescan; its code and manifest written
    /// then, another plugin's files, and its own files written later do.
    #[test]
    fn what_a_plugin_wrote_as_it_loaded_is_no_change() {
        use std::path::PathBuf;
        use std::time::{Duration, Instant};
        let began = Instant::now();
        let last = super::Loaded {
            plugins: vec![("writer".to_owned(), vec![PathBuf::from("/tmp/p/writer")])],
            began,
            ended: began + Duration::from_millis(500),
        };
        let during = began + Duration::from_millis(100);
        let later = last.ended + Duration::from_secs(5);
        let changes = vec![
            (PathBuf::from("/tmp/p/writer/state.json"), during),
            (PathBuf::from("/tmp/p/writer/plugin.py"), during),
            (PathBuf::from("/tmp/p/writer/manifest.json"), during),
            (PathBuf::from("/tmp/p/other/state.json"), during),
            // The directory itself, renamed away or moved into place.
            (PathBuf::from("/tmp/p/writer"), during),
            (PathBuf::from("/tmp/p/writer/state.json"), later),
        ];
        let mut told = std::collections::BTreeSet::new();
        let kept: Vec<PathBuf> = super::without_own_output(changes.clone(), Some(&last), &mut told)
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        assert_eq!(
            kept,
            [
                "/tmp/p/writer/plugin.py",
                "/tmp/p/writer/manifest.json",
                "/tmp/p/other/state.json",
                "/tmp/p/writer",
                "/tmp/p/writer/state.json",
            ]
            .map(PathBuf::from)
        );
        assert!(told.contains("writer"), "{told:?}");
        // No rescan yet: every change counts.
        assert_eq!(super::without_own_output(changes, None, &mut told).len(), 6);
    }

    #[test]
    fn a_plugin_that_ran_no_code_has_no_output_of_its_own() {
        use crate::wire::{PluginStateJson, ReloadOutcome, ReloadReport};
        let outcome = |name: &str, state| ReloadOutcome {
            name: name.into(),
            dir: format!("/tmp/p/{name}"),
            state,
            reason: None,
            elapsed_ms: 1.0,
        };
        let report = ReloadReport {
            plugins: vec![
                outcome("ran", PluginStateJson::Initialized),
                outcome("waits", PluginStateJson::Unavailable),
                outcome("still", PluginStateJson::Initialized),
            ],
            loaded: 2,
            failed: 0,
            unavailable: 1,
            added: vec![],
            changed: vec!["ran".into()],
            retried: vec!["waits".into()],
            unchanged: vec!["still".into()],
            removed: vec![],
            elapsed_ms: 1.0,
            warning: None,
        };
        let began = std::time::Instant::now();
        let loaded = super::Loaded::of(&report, began);
        let names: Vec<&str> = loaded.plugins.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ran"]);
        let at = began + std::time::Duration::from_millis(1);
        let path = |p: &str| std::path::PathBuf::from(p);
        assert_eq!(
            loaded.own_output(&path("/tmp/p/ran/state.json"), at),
            Some("ran")
        );
        assert_eq!(
            loaded.own_output(&path("/tmp/p/waits/model.onnx"), at),
            None
        );
        assert_eq!(
            loaded.own_output(&path("/tmp/p/ran/forgesyte.sig.list"), at),
            None
        );
    }

    #[test]
    fn opening_and_reading_files_are_not_changes() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind,
        };
        assert!(!changes(&EventKind::Access(AccessKind::Open(
            AccessMode::Read
        ))));
        assert!(!changes(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!changes(&EventKind::Access(AccessKind::Read)));
        assert!(changes(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes(&EventKind::Create(CreateKind::File)));
        assert!(changes(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
    }

    #[test]
    fn caches_are_not_changes() {
        let relevant = |path: &str| relevant(Path::new(path), Path::new("/tmp/p"));
        assert!(relevant("/tmp/p/alpha/libalpha.so"));
        assert!(relevant("/tmp/p/alpha/manifest.json"));
        assert!(relevant("/tmp/p/beta/plugin.py"));
        assert!(!relevant("/tmp/p/beta/__pycache__/plugin.cpython-311.pyc"));
        assert!(!relevant("/tmp/p/beta/plugin.pyc"));
        // What running plugins write: logs, temporary files, anything but
        // code under logs/, tmp/, .cache/ of a plugin (not of the plugins
        // directory's own path, here under /tmp).
        assert!(!relevant("/tmp/p/beta/run.log"));
        assert!(!relevant("/tmp/p/beta/logs/today.txt"));
        assert!(!relevant("/tmp/p/beta/.cache/hub/weights.bin"));
        assert!(relevant("/tmp/p/beta/tmp/helper.py"));
        // A hidden directory of the plugins directory is no plugin.
        assert!(!relevant("/tmp/p/.echo-old/manifest.json"));
        assert!(!relevant("/tmp/p/.git/index"));
        assert!(relevant("/tmp/p/beta/data.bin"));
        // Under a plugin directory linked in from elsewhere: by name.
        assert!(!relevant("/opt/ocr/run.log"));
        assert!(relevant("/opt/ocr/manifest.json"));
    }

    /// The roots: the plugins directory and what its links lead to (a
    /// directory, not a file), each by its identity; none while the
    /// directory is missing.
    #[test]
    fn the_roots_are_the_directory_and_the_directories_linked_in() {
        let scratch = tempfile::tempdir().unwrap();
        let plugins = scratch.path().join("plugins");
        assert!(wanted(&plugins).is_empty());
        std::fs::create_dir(&plugins).unwrap();
        std::fs::create_dir(plugins.join("plain")).unwrap();
        let elsewhere = scratch.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("manifest.json"), "{}").unwrap();
        std::os::unix::fs::symlink(&elsewhere, plugins.join("linked")).unwrap();
        // A link to a directory that is no plugin's (`/`): not watched.
        std::os::unix::fs::symlink("/", plugins.join("root")).unwrap();
        std::fs::write(scratch.path().join("file"), "x").unwrap();
        std::os::unix::fs::symlink(scratch.path().join("file"), plugins.join("to-a-file")).unwrap();
        let roots = wanted(&plugins);
        let paths: Vec<_> = roots.keys().cloned().collect();
        let elsewhere = std::fs::canonicalize(&elsewhere).unwrap();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(
            paths.contains(&plugins) && paths.contains(&elsewhere),
            "{paths:?}"
        );
        // Replaced: the same path, another identity.
        let before = roots[&plugins];
        std::fs::rename(&plugins, scratch.path().join("old")).unwrap();
        std::fs::create_dir(&plugins).unwrap();
        assert_ne!(wanted(&plugins)[&plugins], before);
    }
}
