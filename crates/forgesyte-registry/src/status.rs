//! Per-plugin data: what callers hand in ([`PluginInfo`]), what they read back
//! ([`PluginStatus`], [`Transition`]) and the immutable entry the registry
//! publishes (`Entry`, crate-private).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::PluginLifecycleState;

/// How many transitions each plugin's history keeps.
pub const HISTORY_LEN: usize = 16;

/// The most characters of a reason a history entry keeps (the status and
/// the failure journal's newest entry keep it whole): a reason may be 64 KiB (a Python
/// error's message), and each of the [`HISTORY_LEN`] entries of every
/// plugin kept its own copy, up to a MiB a plugin that nothing serves.
pub const HISTORY_REASON_CHARS: usize = 1024;

/// The most characters of a reason (and of a last exit reason) the
/// registry keeps: a Python error's message of 64 Ki characters with its
/// prefix and hints fits; anything longer is cut, with `…`.
pub const MAX_REASON_CHARS: usize = 80 * 1024;

/// How many recent execution times the average is taken over.
pub const AVERAGE_WINDOW: usize = 10;

/// How many entries each plugin's failure journal keeps.
pub const JOURNAL_LEN: usize = 20;

/// The most characters of a reason, and of each stderr line, that a
/// failure journal entry keeps once a newer entry follows it (the newest
/// keeps them whole, its reason shared with the status): twenty failures
/// that each gave a different 64 KiB message kept 1.3 MiB a plugin.
pub const JOURNAL_PAST_CHARS: usize = 1024;

/// Descriptive data a plugin is registered with, stored as given.
///
/// `version` stays `None` when the manifest has none; showing `"unknown"` is
/// the loader's decision, not the registry's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginInfo {
    /// One-line description from the manifest.
    pub description: Option<String>,
    /// Version string from the manifest.
    pub version: Option<String>,
    /// Where the plugin came from (its directory or manifest), for operators.
    pub source: Option<PathBuf>,
}

/// The status object of SPEC §5. Every field is always serialised, `null`
/// where unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginStatus {
    /// Registry key.
    pub name: String,
    /// Current lifecycle state.
    pub state: PluginLifecycleState,
    /// Description from the manifest.
    pub description: Option<String>,
    /// Why the plugin is `FAILED` or `UNAVAILABLE`; `None` otherwise.
    pub reason: Option<String>,
    /// Version from the manifest.
    pub version: Option<String>,
    /// Seconds since registration, computed when the status is read.
    pub uptime_seconds: Option<f64>,
    /// When a tool call last started or was recorded (RFC 3339, UTC).
    pub last_used: Option<String>,
    /// Tool calls that succeeded.
    pub success_count: u64,
    /// Tool calls that returned an error or faulted.
    pub error_count: u64,
    /// Duration of the most recent recorded call, in milliseconds.
    pub last_execution_time_ms: Option<f64>,
    /// Mean duration of the last 10 recorded calls, in milliseconds.
    pub avg_execution_time_ms: Option<f64>,
    /// Tool calls in flight right now (an addition to SPEC §5).
    pub in_flight: u32,
    /// How many times the plugin's process was restarted by its supervisor
    /// (0 for in-process plugins).
    pub restart_count: u64,
    /// How the plugin's process last ended (`killed by signal SIGSEGV (11)`,
    /// `exited with code 3`, ...); kept after a restart.
    pub last_exit_reason: Option<String>,
    /// When the supervisor will try to restart the plugin (RFC 3339, UTC);
    /// `null` when no restart is scheduled.
    pub next_retry_at: Option<String>,
    /// The sandbox of its runner, part by part (`filesystem`, `network`,
    /// `env`: what is enforced, or `unconfined: why`); `null` for a plugin
    /// that runs unconfined (in-process, or confinement turned off).
    pub confinement: Option<BTreeMap<String, String>>,
    /// The plugin's signature as the loader found it; `null` when it was
    /// not checked (a bad manifest, or not loaded yet).
    pub signature: Option<SignatureInfo>,
}

/// What the loader found of a plugin's signature (plain data: the
/// registry only stores and shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureInfo {
    /// Signed, unsigned, modified or invalid.
    pub status: SignatureState,
    /// The signing key's id, 16 upper-case hex digits as minisign prints
    /// it (`signed`, and `modified` when the signature itself verified).
    pub key_id: Option<String>,
    /// What is wrong (`modified`, `invalid`) or missing (`unsigned`).
    pub detail: Option<String>,
}

/// A plugin's signature status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureState {
    /// Signed by a trusted key, and every file the plugin loads is listed
    /// with its current digest.
    Signed,
    /// No signature files.
    Unsigned,
    /// The signature verifies, but a file changed after signing, or a
    /// loadable file is not in the signed list.
    Modified,
    /// A bad or unparsable signature or list, or an untrusted key.
    Invalid,
}

impl SignatureState {
    /// Its name as shown (`signed`, `unsigned`, `modified`, `invalid`).
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureState::Signed => "signed",
            SignatureState::Unsigned => "unsigned",
            SignatureState::Modified => "modified",
            SignatureState::Invalid => "invalid",
        }
    }
}

/// One entry of a plugin's failure journal: a move into `FAILED` or
/// `UNAVAILABLE` (or a new reason while there), or a supervisor restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// When it happened (RFC 3339, UTC, milliseconds).
    pub at: String,
    /// The state entered (`FAILED`, `UNAVAILABLE`, or `LOADED` for a restart).
    pub state: PluginLifecycleState,
    /// The reason given with the move.
    pub reason: Option<String>,
    /// The signal that ended the plugin's process, by name (`SIGSEGV`).
    pub exit_signal: Option<String>,
    /// The exit code of the plugin's process, when it exited on its own.
    pub exit_code: Option<i32>,
    /// The last lines the plugin's process wrote to stderr.
    pub stderr_tail: Vec<String>,
}

/// A failure journal entry as the registry keeps it: its reason shared
/// with the status that gave it and with the entries of the same reason
/// before it, its stderr tail (a Python error's traceback) with those of
/// the same tail (a plugin that fails alike at every rescan kept up to 20
/// copies of each, of up to 64 KiB a line); read as a [`JournalEntry`].
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) at: String,
    pub(crate) state: PluginLifecycleState,
    pub(crate) reason: Option<Arc<str>>,
    pub(crate) exit_signal: Option<String>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) stderr_tail: Arc<Vec<String>>,
}

impl Recorded {
    /// Cuts the newest entry of `journal`, about to have a newer one after
    /// it, to [`JOURNAL_PAST_CHARS`] (its reason, each stderr line), sharing
    /// what is cut with an equal older entry's.
    fn cut_the_newest(journal: &mut VecDeque<Recorded>) {
        let Some((newest, older)) = journal.make_contiguous().split_last_mut() else {
            return;
        };
        let long = |text: &str| text.chars().nth(JOURNAL_PAST_CHARS).is_some();
        if let Some(reason) = newest.reason.as_deref()
            && long(reason)
        {
            let cut = forgesyte_errors::shorten(reason, JOURNAL_PAST_CHARS);
            let same = older
                .iter()
                .rev()
                .filter_map(|e| e.reason.as_ref())
                .find(|kept| ***kept == *cut);
            newest.reason = Some(same.map_or_else(|| Arc::from(cut), Arc::clone));
        }
        if newest.stderr_tail.iter().any(|line| long(line)) {
            let cut: Vec<String> = newest
                .stderr_tail
                .iter()
                .map(|line| forgesyte_errors::shorten(line, JOURNAL_PAST_CHARS))
                .collect();
            let same = older.iter().rev().find(|e| *e.stderr_tail == cut);
            newest.stderr_tail = same.map_or_else(|| Arc::new(cut), |e| Arc::clone(&e.stderr_tail));
        }
    }

    /// The entry as it is served.
    pub(crate) fn to_entry(&self) -> JournalEntry {
        JournalEntry {
            at: self.at.clone(),
            state: self.state,
            reason: self.reason.as_deref().map(str::to_owned),
            exit_signal: self.exit_signal.clone(),
            exit_code: self.exit_code,
            stderr_tail: Vec::clone(&self.stderr_tail),
        }
    }
}

/// How a plugin's process ended, as the host saw it (for
/// [`Registry::mark_crashed`](crate::Registry::mark_crashed)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// How it ended, in words (becomes `last_exit_reason`).
    pub description: Option<String>,
    /// The signal that ended it, by name (`SIGSEGV`).
    pub signal: Option<String>,
    /// Its exit code, when it exited on its own.
    pub code: Option<i32>,
    /// The last lines it wrote to stderr.
    pub stderr_tail: Vec<String>,
}

/// One entry of a plugin's transition history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The state left; `None` for the registration itself.
    pub from: Option<PluginLifecycleState>,
    /// The state entered.
    pub to: PluginLifecycleState,
    /// When it happened (RFC 3339, UTC, milliseconds).
    pub at: String,
    /// The reason given with the move (for `FAILED` and `UNAVAILABLE`),
    /// cut to [`HISTORY_REASON_CHARS`] characters and `…`.
    pub reason: Option<String>,
}

/// Formats a wall-clock time the way every timestamp of the registry is shown.
pub(crate) fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The last [`AVERAGE_WINDOW`] execution times, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RecentTimes {
    times: [f64; AVERAGE_WINDOW],
    len: usize,
    next: usize,
}

impl RecentTimes {
    pub(crate) fn push(&mut self, ms: f64) {
        self.times[self.next] = ms;
        self.next = (self.next + 1) % AVERAGE_WINDOW;
        self.len = (self.len + 1).min(AVERAGE_WINDOW);
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        if self.len == 0 {
            return None;
        }
        // Slots past `len` are still zero and never read: until the ring is
        // full, `next == len` and the filled slots are `0..len`.
        let sum: f64 = self.times[..self.len].iter().sum();
        Some(sum / self.len as f64)
    }
}

/// One plugin as published in a snapshot. Immutable once published: writers
/// clone it (cheap: the big parts are behind `Arc`), change the clone and
/// publish a new snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) info: Arc<PluginInfo>,
    pub(crate) state: PluginLifecycleState,
    pub(crate) reason: Option<Arc<str>>,
    pub(crate) registered_at: Instant,
    pub(crate) last_used: Option<DateTime<Utc>>,
    pub(crate) success_count: u64,
    pub(crate) error_count: u64,
    pub(crate) last_execution_ms: Option<f64>,
    pub(crate) recent: RecentTimes,
    pub(crate) in_flight: u32,
    pub(crate) history: Arc<VecDeque<Transition>>,
    pub(crate) restart_count: u64,
    pub(crate) last_exit_reason: Option<Arc<str>>,
    pub(crate) next_retry_at: Option<DateTime<Utc>>,
    pub(crate) confinement: Option<Arc<BTreeMap<String, String>>>,
    pub(crate) journal: Arc<VecDeque<Recorded>>,
    pub(crate) signature: Option<Arc<SignatureInfo>>,
    /// The reason to move to `LOADED` with once the calls in flight have
    /// ended: a reload let the plugin's instance go while they ran
    /// ([`Registry::mark_loaded_when_idle`](crate::Registry::mark_loaded_when_idle)).
    /// Dropped by any other move.
    pub(crate) loaded_when_idle: Option<Arc<str>>,
}

impl Entry {
    /// A freshly registered plugin: `LOADED`, with its registration as the
    /// first history entry.
    pub(crate) fn new(info: PluginInfo, now: DateTime<Utc>) -> Self {
        let mut history = VecDeque::with_capacity(HISTORY_LEN);
        history.push_back(Transition {
            from: None,
            to: PluginLifecycleState::Loaded,
            at: rfc3339(now),
            reason: None,
        });
        Entry {
            info: Arc::new(info),
            state: PluginLifecycleState::Loaded,
            reason: None,
            registered_at: Instant::now(),
            last_used: None,
            success_count: 0,
            error_count: 0,
            last_execution_ms: None,
            recent: RecentTimes::default(),
            in_flight: 0,
            history: Arc::new(history),
            restart_count: 0,
            last_exit_reason: None,
            next_retry_at: None,
            confinement: None,
            journal: Arc::new(VecDeque::new()),
            signature: None,
            loaded_when_idle: None,
        }
    }

    /// Appends to the failure journal, dropping the oldest entry when full.
    pub(crate) fn journal_push(&mut self, mut entry: Recorded) {
        let journal = Arc::make_mut(&mut self.journal);
        if let Some(reason) = &entry.reason
            && let Some(same) = journal
                .iter()
                .rev()
                .filter_map(|e| e.reason.as_ref())
                .find(|kept| !Arc::ptr_eq(kept, reason) && ***kept == **reason)
        {
            entry.reason = Some(Arc::clone(same));
        }
        if !entry.stderr_tail.is_empty()
            && let Some(same) = journal.iter().rev().find(|kept| {
                !Arc::ptr_eq(&kept.stderr_tail, &entry.stderr_tail)
                    && kept.stderr_tail == entry.stderr_tail
            })
        {
            entry.stderr_tail = Arc::clone(&same.stderr_tail);
        }
        if journal.len() == JOURNAL_LEN {
            journal.pop_front();
        }
        Recorded::cut_the_newest(journal);
        // The status and the newest entry hold one copy of their reason.
        if let (Some(status), Some(newest)) = (&self.reason, &entry.reason)
            && !Arc::ptr_eq(status, newest)
            && **status == **newest
        {
            self.reason = Some(Arc::clone(newest));
        }
        journal.push_back(entry);
    }

    /// Moves to `next` (the caller has checked legality), sets the reason and
    /// appends to the history, except for the `INITIALIZED` ⇄ `RUNNING` moves
    /// around tool calls: those would push every lifecycle event out of the
    /// last [`HISTORY_LEN`] within a few calls (and cost a history copy per
    /// call); calls show as `in_flight`, `last_used` and the counts instead.
    pub(crate) fn move_to(
        &mut self,
        next: PluginLifecycleState,
        reason: Option<Arc<str>>,
        now: DateTime<Utc>,
    ) {
        use PluginLifecycleState::{Initialized, Running};
        if matches!(
            (self.state, next),
            (Initialized, Running) | (Running, Initialized)
        ) {
            self.state = next;
            self.reason = reason;
            return;
        }
        self.loaded_when_idle = None;
        let history = Arc::make_mut(&mut self.history);
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(Transition {
            from: Some(self.state),
            to: next,
            at: rfc3339(now),
            reason: reason
                .as_deref()
                .map(|reason| forgesyte_errors::shorten(reason, HISTORY_REASON_CHARS)),
        });
        self.state = next;
        self.reason = reason;
    }

    /// To `LOADED` (`reason` replaces the reason of a plugin already there
    /// when it is `Some`), no retry time left: what
    /// [`Registry::mark_loaded_because`](crate::Registry::mark_loaded_because)
    /// does to the entry.
    pub(crate) fn load_because(
        &mut self,
        reason: Option<Arc<str>>,
        now: DateTime<Utc>,
    ) -> Result<(), crate::RegistryError> {
        if self.state == PluginLifecycleState::Loaded {
            if reason.is_some() {
                self.reason = reason;
            }
        } else {
            let next = self.state.transition(PluginLifecycleState::Loaded)?;
            self.move_to(next, reason, now);
        }
        self.next_retry_at = None;
        Ok(())
    }

    /// One call in flight ended: the last one out moves `RUNNING` back to
    /// `INITIALIZED`, and on to `LOADED` when a reload let the instance go
    /// meanwhile ([`Self::loaded_when_idle`]). Any other state is kept.
    pub(crate) fn call_ended(&mut self, now: DateTime<Utc>) {
        self.in_flight -= 1;
        if self.in_flight == 0 && self.state == PluginLifecycleState::Running {
            let reload = self.loaded_when_idle.take();
            self.move_to(PluginLifecycleState::Initialized, None, now);
            if reload.is_some() {
                self.move_to(PluginLifecycleState::Loaded, reload, now);
            }
        }
    }

    /// Records one finished call's duration.
    pub(crate) fn record_time(&mut self, elapsed: Duration, now: DateTime<Utc>) {
        let ms = elapsed.as_secs_f64() * 1000.0;
        self.last_execution_ms = Some(ms);
        self.recent.push(ms);
        self.last_used = Some(now);
    }

    /// The SPEC §5 status object, with uptime measured at `now`.
    pub(crate) fn status(&self, name: &str, now: Instant) -> PluginStatus {
        PluginStatus {
            name: name.to_owned(),
            state: self.state,
            description: self.info.description.clone(),
            reason: self.reason.as_deref().map(str::to_owned),
            version: self.info.version.clone(),
            uptime_seconds: Some(
                now.saturating_duration_since(self.registered_at)
                    .as_secs_f64(),
            ),
            last_used: self.last_used.map(rfc3339),
            success_count: self.success_count,
            error_count: self.error_count,
            last_execution_time_ms: self.last_execution_ms,
            avg_execution_time_ms: self.recent.mean(),
            in_flight: self.in_flight,
            restart_count: self.restart_count,
            last_exit_reason: self.last_exit_reason.as_deref().map(str::to_owned),
            next_retry_at: self.next_retry_at.map(rfc3339),
            confinement: self.confinement.as_deref().cloned(),
            signature: self.signature.as_deref().cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{AVERAGE_WINDOW, RecentTimes, rfc3339};
    use chrono::{TimeZone, Utc};

    #[test]
    fn mean_is_none_until_a_time_is_recorded() {
        assert_eq!(RecentTimes::default().mean(), None);
    }

    #[test]
    fn mean_covers_only_the_last_ten() {
        let mut recent = RecentTimes::default();
        recent.push(4.0);
        recent.push(8.0);
        assert_eq!(recent.mean(), Some(6.0));
        for ms in 1..=25 {
            recent.push(f64::from(ms));
        }
        // The last ten are 16..=25, mean 20.5.
        assert_eq!(recent.mean(), Some(20.5));
        assert_eq!(AVERAGE_WINDOW, 10);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        let at = Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).single().unwrap();
        assert_eq!(rfc3339(at), "2024-05-06T07:08:09.000Z");
    }
}
