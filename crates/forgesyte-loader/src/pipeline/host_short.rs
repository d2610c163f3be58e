//! Plugins whose load failed for want of the host's own resources (file
//! descriptors, processes, memory: [`ImportError::HostResources`], or a
//! manifest that could not be read for that reason), or whose runner was
//! lost with the Python zygote that forked it as it imported or
//! constructed ([`CrashCause::Lost`]: the zygote killed, by the OOM killer
//! say, in the middle of a deploy; at most [`LOST_RETRIES`] times in a row):
//! no fault of theirs,
//! so they are not left FAILED until an operator rescans. The loader keeps
//! each with the reason it recorded; [`Loader::retry_host_short`] loads
//! again those still FAILED with that reason (the server calls it on a
//! backoff while any is left). A plugin whose state or reason moved on
//! since (loaded by a rescan, failed for its own reason) is dropped from
//! the list, not retried.

use std::collections::BTreeMap;

use forgesyte_errors::{
    CrashCause, CrashError, ImportError, InitError, LoadError, ManifestError, PluginError,
};
use forgesyte_registry::{PluginLifecycleState, Transition};

use super::loader::Loader;
use super::report::PluginLoadOutcome;

/// How many times in a row a plugin whose runner was lost with its zygote
/// as it loaded is loaded again: one whose own import ends its zygote (a
/// plugin may signal it with `--confine off`) took every other Python
/// plugin's runner with it at each try, for as long as it was retried.
pub(super) const LOST_RETRIES: usize = 2;

/// What the reason of a load lost with its zygote holds
/// (`CrashCause::Lost`'s text).
const LOST: &str = ": lost: ";

/// Whether `err` is a shortage of the host's, not the plugin's fault,
/// given the plugin's `history` before it (asked only for a loss with its
/// zygote, which counts [`LOST_RETRIES`] times in a row).
pub(super) fn is_host_short_after(
    err: &PluginError,
    history: impl FnOnce() -> Vec<Transition>,
) -> bool {
    is_host_short(err) && !(lost_with_its_zygote(err) && lost_in_a_row(&history()) >= LOST_RETRIES)
}

/// Whether `err` is a runner lost with the Python zygote that forked it,
/// as it imported or constructed the plugin.
fn lost_with_its_zygote(err: &PluginError) -> bool {
    matches!(
        err,
        PluginError::Load(
            LoadError::Import(ImportError::Crashed(CrashError {
                cause: CrashCause::Lost { .. },
                ..
            })) | LoadError::Init(InitError::Crashed(CrashError {
                cause: CrashCause::Lost { .. },
                ..
            }))
        )
    )
}

/// How many of the last failures in `history`, each tried again since
/// (LOADED after it), were losses with a zygote.
fn lost_in_a_row(history: &[Transition]) -> usize {
    let mut lost = 0;
    let mut back = history.iter().rev();
    while back
        .next()
        .is_some_and(|t| t.to == PluginLifecycleState::Loaded)
        && back.next().is_some_and(|t| {
            t.to == PluginLifecycleState::Failed
                && t.reason.as_deref().is_some_and(|r| r.contains(LOST))
        })
    {
        lost += 1;
    }
    lost
}

/// Whether `err` is a shortage of the host's, not the plugin's fault.
pub(super) fn is_host_short(err: &PluginError) -> bool {
    match err {
        PluginError::Load(LoadError::Import(ImportError::HostResources { .. })) => true,
        // A new zygote is started for the next runner.
        err if lost_with_its_zygote(err) => true,
        PluginError::Manifest(ManifestError::Io { source, .. }) => {
            crate::process::host_short(source).is_some()
        }
        _ => false,
    }
}

/// Records `name`'s load failure in the retry list `short`: kept (with
/// `reason`) when it is the host's shortage (`host_short`), dropped
/// otherwise. (A
/// plugin that loads later, or is retired, is dropped when the list is
/// next read: its state no longer matches.) The caller holds the list
/// until the registry records `reason`.
pub(super) fn note(
    short: &mut BTreeMap<String, String>,
    name: &str,
    host_short: bool,
    reason: &str,
) {
    if host_short {
        short.insert(name.to_owned(), reason.to_owned());
    } else {
        short.remove(name);
    }
}

impl Loader {
    /// The plugins FAILED because the host was short of its own resources
    /// when they loaded, and still FAILED with that reason, sorted by name.
    /// (Not to be asked from a registry observer: a failure is recorded
    /// with the list locked.) One being loaded again right now (by a
    /// rescan, say) stays listed until its load ends: dropped then, its
    /// next shortage was told as a new failure, and its backoff started
    /// over.
    ///
    /// A plugin whose crash could not be restarted for want of a thread
    /// (its reason says "not restarted: cannot start the restart thread")
    /// is one too: it stayed FAILED for good once threads were back.
    pub fn host_short_plugins(&self) -> Vec<String> {
        let mut short = self.host_short.lock();
        for status in self.registry.list_all() {
            if status.state == PluginLifecycleState::Failed
                && let Some(reason) = status
                    .reason
                    .filter(|r| r.contains(crate::supervise::NO_RESTART_THREAD))
            {
                short.entry(status.name).or_insert(reason);
            }
        }
        short.retain(|name, reason| {
            self.registry
                .state_and_reason(name)
                .is_some_and(|(state, now)| match state {
                    PluginLifecycleState::Failed => now.as_deref() == Some(reason),
                    PluginLifecycleState::Loaded => {
                        now.as_deref() == Some(super::reload::RELOADING)
                    }
                    _ => false,
                })
        });
        short.keys().cloned().collect()
    }

    /// Loads again each of [`host_short_plugins`](Self::host_short_plugins)
    /// (as [`reload`](Self::reload) does, one after another), and returns
    /// their outcomes. One that is short again stays on the list. Run it
    /// where no other pass runs (the server holds its admin claim).
    pub fn retry_host_short(&self) -> Vec<PluginLoadOutcome> {
        if self.is_shutting_down() {
            return Vec::new();
        }
        let mut outcomes = Vec::new();
        let mut renamed = false;
        for name in self.host_short_plugins() {
            match self.renamed_since(&name) {
                // Registered under its directory's name while its manifest
                // could not be read; readable now, it names another plugin:
                // let go under the one, loaded as the other (a reload by
                // the directory's name refused the manifest's own).
                Some(dir) => {
                    self.retire_plugins(vec![(
                        name,
                        dir.clone(),
                        "its manifest can be read now, and names another plugin".to_owned(),
                    )]);
                    self.fresh_stamps.lock().clear();
                    outcomes.extend(self.load_dirs(&[dir]).plugins);
                    // Stamped as a rescan stamps what it loads (or the next
                    // rescan reloads it as changed), and its dependents
                    // settled.
                    self.restamp();
                    renamed = true;
                }
                None => outcomes.extend(self.reload(&name)),
            }
        }
        if renamed {
            outcomes.extend(self.settle_dependents());
        }
        outcomes
    }

    /// The directory of `name` when it is a plugin directory whose manifest
    /// now names another plugin.
    fn renamed_since(&self, name: &str) -> Option<std::path::PathBuf> {
        if self.entry_points.read().contains_key(name) {
            return None;
        }
        let dir = self.plugin_dir(name)?;
        let manifest = self.peek_manifest(&dir).ok()?;
        // A name another plugin holds is not free: left to a rescan, as its
        // renames are (one blocked stays where it is).
        (manifest.name != name && !self.registry.contains(&manifest.name)).then_some(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_shortages_are_told_from_the_plugins_failures() {
        let manifest = |source| {
            PluginError::Manifest(ManifestError::Io {
                path: "/plugins/a/manifest.json".into(),
                source,
            })
        };
        // EMFILE, ENFILE: the host's; EACCES: the plugin directory's.
        assert!(is_host_short(&manifest(std::io::Error::from_raw_os_error(
            24
        ))));
        assert!(is_host_short(&manifest(std::io::Error::from_raw_os_error(
            23
        ))));
        assert!(!is_host_short(&manifest(
            std::io::Error::from_raw_os_error(13)
        )));
        let import = |e| PluginError::Load(LoadError::Import(e));
        assert!(is_host_short(&import(ImportError::HostResources {
            what: "python3".into(),
            detail: "short".into(),
        })));
        assert!(!is_host_short(&import(ImportError::LibraryNotFound {
            path: "/x.so".into(),
        })));
        // Lost with its zygote as it started: the host's; any other crash
        // as it started: the plugin's.
        let crash = |cause| CrashError {
            cause,
            stderr_tail: Vec::new(),
        };
        let lost = || {
            crash(CrashCause::Lost {
                detail: "its Python zygote (pid 7) exited".into(),
            })
        };
        assert!(is_host_short(&import(ImportError::Crashed(lost()))));
        assert!(is_host_short(&PluginError::Load(LoadError::Init(
            InitError::Crashed(lost())
        ))));
        assert!(!is_host_short(&PluginError::Load(LoadError::Init(
            InitError::Crashed(crash(CrashCause::Exit { code: 3 }))
        ))));
        // Tried again after each loss (FAILED, then LOADED): a loss counts
        // LOST_RETRIES times in a row, another shortage without end.
        let step = |to, reason: Option<&str>| Transition {
            from: None,
            to,
            at: String::new(),
            reason: reason.map(str::to_owned),
        };
        let lost_reason = "ImportError: plugin process died while loading the plugin: lost: its Python zygote (pid 7) exited";
        let mut history = vec![step(PluginLifecycleState::Loaded, None)];
        let lost_err = import(ImportError::Crashed(lost()));
        for _ in 0..LOST_RETRIES {
            assert!(
                is_host_short_after(&lost_err, || history.clone()),
                "{history:?}"
            );
            history.push(step(PluginLifecycleState::Failed, Some(lost_reason)));
            history.push(step(PluginLifecycleState::Loaded, None));
        }
        assert!(!is_host_short_after(&lost_err, || history.clone()));
        let short_err = import(ImportError::HostResources {
            what: "python3".into(),
            detail: "short".into(),
        });
        assert!(is_host_short_after(&short_err, || history.clone()));
        // Another failure between them: counted from there.
        history.push(step(
            PluginLifecycleState::Failed,
            Some("InitError: ValueError: x"),
        ));
        history.push(step(PluginLifecycleState::Loaded, None));
        assert!(is_host_short_after(&lost_err, || history.clone()));
    }
}
