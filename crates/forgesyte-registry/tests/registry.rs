//! Property tests of the lifecycle state machine and the registry.
//!
//! (a) The transition function against an independently written reference
//!     table: all 25 pairs, and random sequences.
//! (b) Random operation sequences against a sequential reference model of the
//!     whole registry, compared after every step: state, reason, counts,
//!     in-flight calls, restart count, exit reason, next retry, info, history
//!     and failure journal. One generator makes only the writes production
//!     code makes (`register`, `mark_initialized`, `mark_running`, `finish`,
//!     `end_call`, `mark_failed`, `mark_unavailable`, `mark_crashed`,
//!     `set_next_retry`, `mark_restarting`, `mark_loaded` with and without
//!     new info); the other mixes in the test-only `record_success` /
//!     `record_error`.
//! (c) Random operation sequences from several threads at once, with an
//!     observer taking snapshots during the run: afterwards every plugin has
//!     exactly one state, no update was lost, counts never went down,
//!     `list_all` is sorted and complete, and availability matches the state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use forgesyte_registry::{
    AVERAGE_WINDOW, ExitInfo, HISTORY_LEN, JOURNAL_LEN, PluginInfo, PluginLifecycleState,
    PluginStatus, Registry, RegistryError, Snapshot,
};
use proptest::prelude::*;

use PluginLifecycleState::{Failed, Initialized, Loaded, Running, Unavailable};

// ---------------------------------------------------------------------------
// Reference model
// ---------------------------------------------------------------------------

/// SPEC §4, written out by hand as (from, to) name pairs, independent of the
/// crate's `match`.
const LEGAL: [(&str, &str); 11] = [
    ("LOADED", "INITIALIZED"),
    ("LOADED", "FAILED"),
    ("LOADED", "UNAVAILABLE"),
    ("INITIALIZED", "RUNNING"),
    ("INITIALIZED", "FAILED"),
    ("INITIALIZED", "UNAVAILABLE"),
    ("INITIALIZED", "LOADED"),
    ("RUNNING", "INITIALIZED"),
    ("RUNNING", "FAILED"),
    ("FAILED", "LOADED"),
    ("UNAVAILABLE", "LOADED"),
];

fn model_legal(from: PluginLifecycleState, to: PluginLifecycleState) -> bool {
    LEGAL.contains(&(from.as_str(), to.as_str()))
}

fn any_state() -> impl Strategy<Value = PluginLifecycleState> {
    prop::sample::select(PluginLifecycleState::ALL.to_vec())
}

const NAMES: [&str; 4] = ["delta", "alpha", "Charlie", "bravo"];
/// What `mark_failed_with_details` journals (a Python traceback's tail).
const TRACEBACK: &[&str] = &["  File \"plugin.py\", line 3", "ValueError: no weights"];

const REASONS: [&str; 3] = [
    "ImportError: cannot open /p/libx.so: no such file",
    "Missing dependencies: lib:foo, GPU (CUDA driver not found)",
    "CrashError: killed by signal SIGSEGV (11)",
];

const VERSIONS: [&str; 2] = ["1.0.0", "2.0.0"];

/// `set_next_retry` instants (seconds after the Unix epoch) and how the
/// status must show them, written out by hand.
const RETRIES: [(u64, &str); 2] = [
    (86_400, "1970-01-02T00:00:00.000Z"),
    (1_700_000_000, "2023-11-14T22:13:20.000Z"),
];

/// How a plugin process ended, as the supervisor reports it to
/// `mark_crashed`: (description, signal, exit code, stderr tail).
type Exit = (
    Option<&'static str>,
    Option<&'static str>,
    Option<i32>,
    &'static [&'static str],
);
const EXITS: [Exit; 3] = [
    (
        Some("killed by signal SIGSEGV (11)"),
        Some("SIGSEGV"),
        None,
        &["segfault at 0", "last words"],
    ),
    (Some("exited with code 3"), None, Some(3), &[]),
    (None, None, None, &[]),
];

fn exit_info(exit: usize) -> ExitInfo {
    let (description, signal, code, tail) = EXITS[exit];
    ExitInfo {
        description: description.map(str::to_owned),
        signal: signal.map(str::to_owned),
        code,
        stderr_tail: tail.iter().map(|line| (*line).to_owned()).collect(),
    }
}

/// One registry operation, on `NAMES[plugin]`. The first group is every
/// write production code makes (the loader's pipeline, call handle and
/// supervisor); the last two are helpers only tests and embedders use.
#[derive(Debug, Clone)]
enum Op {
    Register(usize),
    MarkInitialized(usize),
    MarkRunning(usize),
    Finish(usize),
    /// `end_call(elapsed_ms, succeeded)`.
    EndCall(usize, u16, bool),
    MarkFailed(usize, usize),
    /// `mark_failed_with_details(REASONS[r], TRACEBACK)`.
    MarkFailedWithDetails(usize, usize),
    MarkUnavailable(usize, usize),
    /// `mark_crashed(REASONS[r], EXITS[e])`.
    MarkCrashed(usize, usize, usize),
    /// `set_next_retry(RETRIES[i])`, `None` to clear.
    SetNextRetry(usize, Option<usize>),
    MarkRestarting(usize),
    /// `mark_loaded`, replacing the info with `VERSIONS[v]` when given.
    MarkLoaded(usize, Option<usize>),
    RecordSuccess(usize, u16),
    RecordError(usize, u16),
}

impl Op {
    fn plugin(&self) -> usize {
        match *self {
            Op::Register(p)
            | Op::MarkInitialized(p)
            | Op::MarkRunning(p)
            | Op::Finish(p)
            | Op::EndCall(p, ..)
            | Op::MarkFailed(p, _)
            | Op::MarkFailedWithDetails(p, _)
            | Op::MarkUnavailable(p, _)
            | Op::MarkCrashed(p, ..)
            | Op::SetNextRetry(p, _)
            | Op::MarkRestarting(p)
            | Op::MarkLoaded(p, _)
            | Op::RecordSuccess(p, _)
            | Op::RecordError(p, _) => p,
        }
    }
}

/// Only the writes production code makes, weighted roughly as a running
/// host makes them (many calls, some faults, a crash-restart cycle now and
/// then).
fn production_op() -> BoxedStrategy<Op> {
    let plugin = 0..NAMES.len();
    let reason = 0..REASONS.len();
    prop_oneof![
        2 => plugin.clone().prop_map(Op::Register),
        3 => plugin.clone().prop_map(Op::MarkInitialized),
        5 => plugin.clone().prop_map(Op::MarkRunning),
        1 => plugin.clone().prop_map(Op::Finish),
        5 => (plugin.clone(), 0..500u16, any::<bool>())
            .prop_map(|(p, ms, ok)| Op::EndCall(p, ms, ok)),
        1 => (plugin.clone(), reason.clone()).prop_map(|(p, r)| Op::MarkFailed(p, r)),
        1 => (plugin.clone(), reason.clone()).prop_map(|(p, r)| Op::MarkFailedWithDetails(p, r)),
        1 => (plugin.clone(), reason.clone()).prop_map(|(p, r)| Op::MarkUnavailable(p, r)),
        2 => (plugin.clone(), reason, 0..EXITS.len())
            .prop_map(|(p, r, e)| Op::MarkCrashed(p, r, e)),
        1 => (plugin.clone(), prop::option::of(0..RETRIES.len()))
            .prop_map(|(p, at)| Op::SetNextRetry(p, at)),
        2 => plugin.clone().prop_map(Op::MarkRestarting),
        1 => (plugin, prop::option::of(0..VERSIONS.len()))
            .prop_map(|(p, v)| Op::MarkLoaded(p, v)),
    ]
    .boxed()
}

/// Every write: production's and the test-only counting helpers.
fn any_op() -> BoxedStrategy<Op> {
    let plugin = 0..NAMES.len();
    prop_oneof![
        12 => production_op(),
        1 => (plugin.clone(), 0..500u16).prop_map(|(p, ms)| Op::RecordSuccess(p, ms)),
        1 => (plugin, 0..500u16).prop_map(|(p, ms)| Op::RecordError(p, ms)),
    ]
    .boxed()
}

/// Applies `op` to the real registry.
fn apply(registry: &Registry, op: &Op) -> Result<(), RegistryError> {
    let name = NAMES[op.plugin()];
    let ms = |ms: u16| Duration::from_millis(ms.into());
    match *op {
        Op::Register(_) => registry.register(name, PluginInfo::default()),
        Op::MarkInitialized(_) => registry.mark_initialized(name),
        Op::MarkRunning(_) => registry.mark_running(name),
        Op::Finish(_) => registry.finish(name),
        Op::EndCall(_, elapsed, ok) => registry.end_call(name, ms(elapsed), ok),
        Op::MarkFailed(_, r) => registry.mark_failed(name, REASONS[r]),
        Op::MarkFailedWithDetails(_, r) => registry.mark_failed_with_details(
            name,
            REASONS[r],
            TRACEBACK.iter().map(|l| (*l).to_owned()).collect(),
        ),
        Op::MarkUnavailable(_, r) => registry.mark_unavailable(name, REASONS[r]),
        Op::MarkCrashed(_, r, e) => registry.mark_crashed(name, REASONS[r], exit_info(e)),
        Op::SetNextRetry(_, at) => registry.set_next_retry(
            name,
            at.map(|i| SystemTime::UNIX_EPOCH + Duration::from_secs(RETRIES[i].0)),
        ),
        Op::MarkRestarting(_) => registry.mark_restarting(name),
        Op::MarkLoaded(_, version) => registry.mark_loaded(
            name,
            version.map(|v| PluginInfo {
                version: Some(VERSIONS[v].to_owned()),
                ..PluginInfo::default()
            }),
        ),
        Op::RecordSuccess(_, elapsed) => registry.record_success(name, ms(elapsed)),
        Op::RecordError(_, elapsed) => registry.record_error(name, ms(elapsed)),
    }
}

/// What the model expects a refused operation to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NotFound,
    AlreadyRegistered,
    Illegal(PluginLifecycleState, PluginLifecycleState),
    NotAvailable(PluginLifecycleState),
    NothingInFlight,
}

fn refusal_of(error: &RegistryError) -> Option<Refusal> {
    Some(match *error {
        RegistryError::NotFound { .. } => Refusal::NotFound,
        RegistryError::AlreadyRegistered { .. } => Refusal::AlreadyRegistered,
        RegistryError::IllegalTransition { from, to } => Refusal::Illegal(from, to),
        RegistryError::NotAvailable { state, .. } => Refusal::NotAvailable(state),
        RegistryError::NothingInFlight { .. } => Refusal::NothingInFlight,
        _ => return None,
    })
}

/// One failure-journal entry as the model expects it (the timestamp is
/// checked for its shape only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelJournal {
    state: PluginLifecycleState,
    reason: Option<String>,
    exit_signal: Option<String>,
    exit_code: Option<i32>,
    stderr_tail: Vec<String>,
}

/// One history entry as the model expects it: (from, to, reason).
type ModelTransition = (
    Option<PluginLifecycleState>,
    PluginLifecycleState,
    Option<String>,
);

#[derive(Debug, Clone)]
struct ModelPlugin {
    state: PluginLifecycleState,
    in_flight: u32,
    reason: Option<&'static str>,
    version: Option<&'static str>,
    success: u64,
    error: u64,
    /// Calls counted, by `end_call` or a `record_*` helper.
    counted: u64,
    /// Calls started (`mark_running`) and ended (`finish`, `end_call`).
    started: u64,
    ended: u64,
    times_ms: Vec<f64>,
    restart_count: u64,
    last_exit_reason: Option<&'static str>,
    next_retry_at: Option<&'static str>,
    history: Vec<ModelTransition>,
    journal: Vec<ModelJournal>,
}

impl ModelPlugin {
    fn new() -> Self {
        ModelPlugin {
            state: Loaded,
            in_flight: 0,
            reason: None,
            version: None,
            success: 0,
            error: 0,
            counted: 0,
            started: 0,
            ended: 0,
            times_ms: Vec::new(),
            restart_count: 0,
            last_exit_reason: None,
            next_retry_at: None,
            history: vec![(None, Loaded, None)],
            journal: Vec::new(),
        }
    }

    /// A state change. The INITIALIZED <-> RUNNING moves of tool calls are
    /// not history; every other one is, the last `HISTORY_LEN` kept.
    fn move_to(&mut self, next: PluginLifecycleState, reason: Option<&'static str>) {
        let call_move = matches!(
            (self.state, next),
            (Initialized, Running) | (Running, Initialized)
        );
        if !call_move {
            self.history
                .push((Some(self.state), next, reason.map(str::to_owned)));
            if self.history.len() > HISTORY_LEN {
                self.history.remove(0);
            }
        }
        self.state = next;
        self.reason = reason;
    }

    fn journal_push(&mut self, state: PluginLifecycleState, reason: String, exit: Option<usize>) {
        let (_, signal, code, tail) = exit.map_or((None, None, None, &[][..]), |e| EXITS[e]);
        self.journal.push(ModelJournal {
            state,
            reason: Some(reason),
            exit_signal: signal.map(str::to_owned),
            exit_code: code,
            stderr_tail: tail.iter().map(|line| (*line).to_owned()).collect(),
        });
        if self.journal.len() > JOURNAL_LEN {
            self.journal.remove(0);
        }
    }

    /// Counts a call that ended with `ms` of work.
    fn count(&mut self, ms: u16, succeeded: bool) {
        if succeeded {
            self.success += 1;
        } else {
            self.error += 1;
        }
        self.counted += 1;
        self.times_ms.push(f64::from(ms));
    }

    /// A call leaves; the last one out of RUNNING goes back to INITIALIZED.
    fn leave(&mut self) -> Result<(), Refusal> {
        if self.in_flight == 0 {
            return Err(Refusal::NothingInFlight);
        }
        self.in_flight -= 1;
        self.ended += 1;
        if self.in_flight == 0 && self.state == Running {
            self.move_to(Initialized, None);
        }
        Ok(())
    }

    /// `mark_failed` / `mark_unavailable`: a same-state move only replaces
    /// the reason; the journal gets an entry when state or reason changed.
    /// Enters `target` with `reason`; `Ok(true)` when that was journalled.
    fn enter_terminal(
        &mut self,
        target: PluginLifecycleState,
        reason: &'static str,
    ) -> Result<bool, Refusal> {
        let changed = self.state != target || self.reason != Some(reason);
        if self.state == target {
            self.reason = Some(reason);
        } else if model_legal(self.state, target) {
            self.move_to(target, Some(reason));
        } else {
            return Err(Refusal::Illegal(self.state, target));
        }
        if changed {
            self.journal_push(target, reason.to_owned(), None);
        }
        Ok(changed)
    }
}

#[derive(Debug, Default)]
struct Model {
    plugins: BTreeMap<&'static str, ModelPlugin>,
}

impl Model {
    /// Applies `op` to the model; a refused op changes nothing.
    fn apply(&mut self, op: &Op) -> Result<(), Refusal> {
        let name = NAMES[op.plugin()];
        if let Op::Register(_) = op {
            if self.plugins.contains_key(name) {
                return Err(Refusal::AlreadyRegistered);
            }
            self.plugins.insert(name, ModelPlugin::new());
            return Ok(());
        }
        let plugin = self.plugins.get_mut(name).ok_or(Refusal::NotFound)?;
        match *op {
            Op::Register(_) => unreachable!("handled above"),
            Op::MarkInitialized(_) => {
                if plugin.state != Loaded {
                    return Err(Refusal::Illegal(plugin.state, Initialized));
                }
                plugin.move_to(Initialized, None);
                // Calls counted before a restart still in flight.
                if plugin.in_flight > 0 {
                    plugin.move_to(Running, None);
                }
            }
            Op::MarkRunning(_) => {
                if !matches!(plugin.state, Initialized | Running) {
                    return Err(Refusal::NotAvailable(plugin.state));
                }
                plugin.in_flight += 1;
                plugin.started += 1;
                if plugin.state == Initialized {
                    plugin.move_to(Running, None);
                }
            }
            Op::Finish(_) => plugin.leave()?,
            Op::EndCall(_, ms, ok) => {
                plugin.leave()?;
                plugin.count(ms, ok);
            }
            Op::MarkFailed(_, r) => {
                plugin.enter_terminal(Failed, REASONS[r])?;
            }
            Op::MarkFailedWithDetails(_, r) => {
                // The entry it journals (if any) carries the lines.
                if plugin.enter_terminal(Failed, REASONS[r])?
                    && let Some(last) = plugin.journal.last_mut()
                {
                    last.stderr_tail = TRACEBACK.iter().map(|l| (*l).to_owned()).collect();
                }
            }
            Op::MarkUnavailable(_, r) => {
                plugin.enter_terminal(Unavailable, REASONS[r])?;
            }
            Op::MarkCrashed(_, r, e) => {
                let reason = REASONS[r];
                if plugin.state == Failed {
                    plugin.reason = Some(reason);
                } else if model_legal(plugin.state, Failed) {
                    plugin.move_to(Failed, Some(reason));
                } else {
                    return Err(Refusal::Illegal(plugin.state, Failed));
                }
                // Every crash is journalled, even with an unchanged reason,
                // and an exit description replaces the last one (none keeps
                // it: a failure that says nothing of a process).
                if let Some(description) = EXITS[e].0 {
                    plugin.last_exit_reason = Some(description);
                }
                plugin.next_retry_at = None;
                plugin.journal_push(Failed, reason.to_owned(), Some(e));
            }
            Op::SetNextRetry(_, at) => plugin.next_retry_at = at.map(|i| RETRIES[i].1),
            Op::MarkRestarting(_) => {
                if plugin.state != Failed {
                    return Err(Refusal::Illegal(plugin.state, Loaded));
                }
                plugin.move_to(Loaded, Some(forgesyte_registry::RESTARTING));
                plugin.restart_count += 1;
                plugin.next_retry_at = None;
                let restart = format!("restart {}", plugin.restart_count);
                plugin.journal_push(Loaded, restart, None);
            }
            Op::MarkLoaded(_, version) => {
                if plugin.state != Loaded {
                    if !model_legal(plugin.state, Loaded) {
                        return Err(Refusal::Illegal(plugin.state, Loaded));
                    }
                    plugin.move_to(Loaded, None);
                }
                // A reload replaces any pending restart.
                plugin.next_retry_at = None;
                if let Some(v) = version {
                    plugin.version = Some(VERSIONS[v]);
                }
            }
            Op::RecordSuccess(_, ms) => plugin.count(ms, true),
            Op::RecordError(_, ms) => plugin.count(ms, false),
        }
        Ok(())
    }
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() < 1e-6,
        _ => false,
    }
}

/// Compares one real plugin (its status, history and journal, read from
/// one snapshot) with the model's plugin.
fn check_against_model(
    snapshot: &Snapshot,
    status: &PluginStatus,
    model: &ModelPlugin,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(status.state, model.state);
    prop_assert_eq!(status.in_flight, model.in_flight);
    prop_assert_eq!(status.reason.as_deref(), model.reason);
    prop_assert_eq!(status.version.as_deref(), model.version);
    prop_assert_eq!(status.success_count, model.success);
    prop_assert_eq!(status.error_count, model.error);
    prop_assert_eq!(
        status.success_count + status.error_count,
        model.counted,
        "every counted call is a success or an error"
    );
    prop_assert_eq!(
        u64::from(status.in_flight),
        model.started - model.ended,
        "in flight = started - ended"
    );
    prop_assert_eq!(status.restart_count, model.restart_count);
    prop_assert_eq!(status.last_exit_reason.as_deref(), model.last_exit_reason);
    prop_assert_eq!(status.next_retry_at.as_deref(), model.next_retry_at);
    let last_ten = &model.times_ms[model.times_ms.len().saturating_sub(AVERAGE_WINDOW)..];
    let mean = (!last_ten.is_empty()).then(|| last_ten.iter().sum::<f64>() / last_ten.len() as f64);
    prop_assert!(
        close(status.avg_execution_time_ms, mean),
        "avg {:?} vs {:?}",
        status.avg_execution_time_ms,
        mean
    );
    prop_assert!(close(
        status.last_execution_time_ms,
        model.times_ms.last().copied()
    ));

    let history: Vec<ModelTransition> = snapshot
        .history(&status.name)
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.from, t.to, t.reason))
        .collect();
    prop_assert_eq!(&history, &model.history, "history of {}", status.name);

    let journal = snapshot.journal(&status.name).unwrap_or_default();
    prop_assert!(
        journal.iter().all(|j| is_rfc3339_utc(&j.at)),
        "journal timestamps: {:?}",
        journal
    );
    let journal: Vec<ModelJournal> = journal
        .into_iter()
        .map(|j| ModelJournal {
            state: j.state,
            reason: j.reason,
            exit_signal: j.exit_signal,
            exit_code: j.exit_code,
            stderr_tail: j.stderr_tail,
        })
        .collect();
    prop_assert_eq!(&journal, &model.journal, "journal of {}", status.name);
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the one timestamp shape the registry writes.
fn is_rfc3339_utc(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = [0..4, 5..7, 8..10, 11..13, 14..16, 17..19, 20..23];
    bytes.len() == 24
        && digits
            .into_iter()
            .all(|range| bytes[range].iter().all(u8::is_ascii_digit))
        && [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (23, b'Z'),
        ]
        .into_iter()
        .all(|(i, c)| bytes[i] == c)
}

// ---------------------------------------------------------------------------
// Invariants that hold in every snapshot
// ---------------------------------------------------------------------------

/// Checks one snapshot on its own; returns its statuses by name.
fn check_snapshot(snapshot: &Snapshot) -> Result<BTreeMap<String, PluginStatus>, TestCaseError> {
    let statuses = snapshot.statuses();
    let names: Vec<&str> = statuses.iter().map(|s| s.name.as_str()).collect();
    prop_assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "not sorted or duplicated: {:?}",
        names
    );
    prop_assert_eq!(statuses.len(), snapshot.len());
    let available: Vec<String> = statuses
        .iter()
        .filter(|s| matches!(s.state, Initialized | Running))
        .map(|s| s.name.clone())
        .collect();
    prop_assert_eq!(snapshot.available(), available);
    for status in &statuses {
        prop_assert_eq!(snapshot.state(&status.name), Some(status.state));
        if status.state == Running {
            prop_assert!(
                status.in_flight > 0,
                "RUNNING with nothing in flight: {:?}",
                status
            );
        }
        // A terminal state has its reason, an available one none; LOADED
        // has one while a restart (or a reload) is under way.
        if matches!(status.state, Failed | Unavailable) {
            prop_assert!(status.reason.is_some(), "{:?}", status);
        }
        if matches!(status.state, Initialized | Running) {
            prop_assert!(status.reason.is_none(), "{:?}", status);
        }
        // History leaves out the INITIALIZED <-> RUNNING moves of tool
        // calls, so it chains with RUNNING read as INITIALIZED.
        let call_state = |s: PluginLifecycleState| if s == Running { Initialized } else { s };
        let history = snapshot.history(&status.name).unwrap_or_default();
        prop_assert_eq!(
            history.last().map(|t| call_state(t.to)),
            Some(call_state(status.state))
        );
        for pair in history.windows(2) {
            prop_assert_eq!(pair[1].from.map(call_state), Some(call_state(pair[0].to)));
            prop_assert!(
                !matches!(
                    (pair[1].from, pair[1].to),
                    (Some(Initialized), Running) | (Some(Running), Initialized)
                ),
                "a call move was recorded: {:?}",
                pair[1]
            );
        }
        for transition in &history {
            if let Some(from) = transition.from {
                prop_assert!(
                    model_legal(from, transition.to),
                    "illegal move recorded: {:?}",
                    transition
                );
            }
        }
        // A FAILED or UNAVAILABLE plugin's newest journal entry says so,
        // with the reason the status shows.
        let journal = snapshot.journal(&status.name).unwrap_or_default();
        prop_assert!(journal.len() <= JOURNAL_LEN);
        if status.state.is_terminal() {
            let newest = journal.last();
            prop_assert_eq!(
                newest.map(|j| j.state),
                Some(status.state),
                "journal of {:?}",
                status
            );
            prop_assert_eq!(
                newest.and_then(|j| j.reason.as_deref()),
                status.reason.as_deref()
            );
        }
    }
    Ok(statuses.into_iter().map(|s| (s.name.clone(), s)).collect())
}

/// Checks that nothing went backwards between two snapshots taken in order.
fn check_monotonic(
    before: (u64, &BTreeMap<String, PluginStatus>),
    after: (u64, &BTreeMap<String, PluginStatus>),
) -> Result<(), TestCaseError> {
    prop_assert!(after.0 >= before.0, "generation went down");
    for (name, old) in before.1 {
        let new = after.1.get(name);
        prop_assert!(new.is_some(), "{} disappeared", name);
        if let Some(new) = new {
            prop_assert!(
                new.success_count >= old.success_count,
                "{}: success count went down",
                name
            );
            prop_assert!(
                new.error_count >= old.error_count,
                "{}: error count went down",
                name
            );
            prop_assert!(
                new.restart_count >= old.restart_count,
                "{}: restart count went down",
                name
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// (a) the transition function
// ---------------------------------------------------------------------------

#[test]
fn all_25_pairs_match_the_reference_table() {
    let mut legal = 0;
    for from in PluginLifecycleState::ALL {
        for to in PluginLifecycleState::ALL {
            let expected = model_legal(from, to);
            assert_eq!(from.can_transition_to(to), expected, "{from} -> {to}");
            match from.transition(to) {
                Ok(next) => {
                    assert!(expected, "{from} -> {to} accepted");
                    assert_eq!(next, to);
                    legal += 1;
                }
                Err(RegistryError::IllegalTransition { from: f, to: t }) => {
                    assert!(!expected, "{from} -> {to} refused");
                    assert_eq!((f, t), (from, to));
                }
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
    }
    assert_eq!(legal, LEGAL.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn transition_sequences_follow_the_model(targets in prop::collection::vec(any_state(), 0..40)) {
        let mut real = Loaded;
        let mut model = Loaded;
        for to in targets {
            let expected_ok = model_legal(model, to);
            match real.transition(to) {
                Ok(next) => {
                    prop_assert!(expected_ok, "{} -> {} accepted", real, to);
                    real = next;
                }
                Err(error) => {
                    prop_assert!(!expected_ok, "{} -> {} refused", real, to);
                    let refusal = refusal_of(&error);
                    prop_assert_eq!(refusal, Some(Refusal::Illegal(model, to)));
                }
            }
            if expected_ok {
                model = to;
            }
            prop_assert_eq!(real, model);
            prop_assert_eq!(real.is_available(), matches!(real, Initialized | Running));
        }
    }
}

// ---------------------------------------------------------------------------
// (b) the registry against the sequential model
// ---------------------------------------------------------------------------

/// Drives a fresh registry and the model with `ops`, checking after every
/// step: the same answer (accepted, or refused for the same reason), a new
/// generation exactly when something was accepted, every plugin equal to the
/// model (status, history, journal), the snapshot invariants, every read
/// path agreeing with the snapshot, and nothing gone backwards.
fn check_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let registry = Registry::new();
    let mut model = Model::default();
    let mut previous = (0, BTreeMap::new());
    for op in ops {
        let generation = registry.generation();
        let real = apply(&registry, op);
        let expected = model.apply(op);
        prop_assert_eq!(
            real.as_ref().copied().map_err(refusal_of),
            expected.map_err(Some),
            "op {:?}",
            op
        );
        prop_assert_eq!(
            registry.generation() > generation,
            expected.is_ok(),
            "generation after {:?}",
            op
        );

        let snapshot = registry.snapshot();
        let statuses = check_snapshot(&snapshot)?;
        let model_names: Vec<&str> = model.plugins.keys().copied().collect();
        let real_names: Vec<&str> = statuses.keys().map(String::as_str).collect();
        prop_assert_eq!(real_names, model_names);
        for (name, plugin) in &model.plugins {
            let status = &statuses[*name];
            check_against_model(&snapshot, status, plugin)?;
            // The registry's own read paths agree with the snapshot (no
            // write happened since it was taken).
            prop_assert_eq!(
                registry.is_available(name),
                matches!(plugin.state, Initialized | Running)
            );
            prop_assert_eq!(registry.get_state(name), Some(status.state));
            prop_assert_eq!(registry.history(name), snapshot.history(name));
            prop_assert_eq!(registry.journal(name), snapshot.journal(name));
            let with_journal = registry.status_with_journal(name);
            prop_assert_eq!(
                with_journal.as_ref().map(|(s, j)| (
                    s.state,
                    s.reason.clone(),
                    s.restart_count,
                    j.clone()
                )),
                Some((
                    status.state,
                    status.reason.clone(),
                    status.restart_count,
                    snapshot.journal(name).unwrap_or_default()
                ))
            );
        }
        check_monotonic(
            (previous.0, &previous.1),
            (snapshot.generation(), &statuses),
        )?;
        previous = (snapshot.generation(), statuses);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Only the writes production code makes: the host's real call and
    /// crash-restart paths against the model.
    #[test]
    fn production_operations_follow_the_model(ops in prop::collection::vec(production_op(), 0..80)) {
        check_ops(&ops)?;
    }

    /// Production's writes mixed with the test-only counting helpers.
    #[test]
    fn registry_follows_the_model(ops in prop::collection::vec(any_op(), 0..60)) {
        check_ops(&ops)?;
    }
}

// ---------------------------------------------------------------------------
// (c) several threads at once
// ---------------------------------------------------------------------------

/// Per plugin, how many operations of each kind the registry accepted.
#[derive(Debug, Default, Clone, Copy)]
struct Accepted {
    register: u32,
    running: i64,
    finish: i64,
    success: u64,
    error: u64,
    restarts: u64,
}

fn run_thread(registry: &Registry, ops: &[Op]) -> Vec<Accepted> {
    let mut accepted = vec![Accepted::default(); NAMES.len()];
    for op in ops {
        if apply(registry, op).is_err() {
            continue;
        }
        let counts = &mut accepted[op.plugin()];
        match op {
            Op::Register(_) => counts.register += 1,
            Op::MarkRunning(_) => counts.running += 1,
            Op::Finish(_) => counts.finish += 1,
            Op::EndCall(_, _, true) => {
                counts.finish += 1;
                counts.success += 1;
            }
            Op::EndCall(_, _, false) => {
                counts.finish += 1;
                counts.error += 1;
            }
            Op::MarkRestarting(_) => counts.restarts += 1,
            Op::RecordSuccess(..) => counts.success += 1,
            Op::RecordError(..) => counts.error += 1,
            _ => {}
        }
    }
    accepted
}

/// Takes snapshots until `done`, checking each and checking that nothing went
/// backwards since the previous one.
fn observe(registry: &Registry, done: &AtomicBool) -> Result<usize, TestCaseError> {
    let mut previous = (0, BTreeMap::new());
    let mut seen = 0;
    loop {
        let finished = done.load(Ordering::Acquire);
        let snapshot = registry.snapshot();
        let statuses = check_snapshot(&snapshot)?;
        check_monotonic(
            (previous.0, &previous.1),
            (snapshot.generation(), &statuses),
        )?;
        previous = (snapshot.generation(), statuses);
        seen += 1;
        if finished {
            return Ok(seen);
        }
        std::thread::yield_now();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn concurrent_operations_keep_the_invariants(
        threads in prop::collection::vec(prop::collection::vec(any_op(), 0..50), 2..=4),
    ) {
        let registry = Registry::new();
        let done = AtomicBool::new(false);
        let (per_thread, observed) = std::thread::scope(|scope| {
            let observer = scope.spawn(|| observe(&registry, &done));
            let workers: Vec<_> = threads
                .iter()
                .map(|ops| {
                    let registry = registry.clone();
                    scope.spawn(move || run_thread(&registry, ops))
                })
                .collect();
            let per_thread: Option<Vec<Vec<Accepted>>> = workers
                .into_iter()
                .map(|worker| worker.join().ok())
                .collect();
            done.store(true, Ordering::Release);
            let observed = observer
                .join()
                .unwrap_or_else(|_| Err(TestCaseError::fail("observer panicked")));
            (per_thread, observed)
        });
        let Some(per_thread) = per_thread else {
            return Err(TestCaseError::fail("a worker panicked"));
        };
        prop_assert!(observed? >= 1);

        let mut total = vec![Accepted::default(); NAMES.len()];
        for accepted in &per_thread {
            for (sum, one) in total.iter_mut().zip(accepted) {
                sum.register += one.register;
                sum.running += one.running;
                sum.finish += one.finish;
                sum.success += one.success;
                sum.error += one.error;
                sum.restarts += one.restarts;
            }
        }

        let statuses = check_snapshot(&registry.snapshot())?;
        let all = registry.list_all();
        let listed: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        let mut expected: Vec<&str> = NAMES
            .iter()
            .zip(&total)
            .filter(|(_, t)| t.register > 0)
            .map(|(name, _)| *name)
            .collect();
        expected.sort_unstable();
        prop_assert_eq!(&listed, &expected, "list_all is not sorted and complete");
        prop_assert_eq!(registry.len(), expected.len());

        let mut available = BTreeSet::new();
        for (index, name) in NAMES.iter().enumerate() {
            let counts = total[index];
            prop_assert!(counts.register <= 1, "{} registered {} times", name, counts.register);
            let Some(status) = statuses.get(*name) else {
                prop_assert_eq!(registry.get_state(name), None);
                prop_assert!(!registry.is_available(name));
                continue;
            };
            // Exactly one state, the same through every read path.
            prop_assert_eq!(all.iter().filter(|s| s.name == *name).count(), 1);
            prop_assert_eq!(registry.get_state(name), Some(status.state));
            prop_assert_eq!(registry.get_status(name).map(|s| s.state), Some(status.state));
            prop_assert_eq!(registry.is_available(name), status.state.is_available());
            if status.state.is_available() {
                available.insert(name.to_string());
            }
            // No update was lost.
            prop_assert_eq!(status.success_count, counts.success, "{} successes", name);
            prop_assert_eq!(status.error_count, counts.error, "{} errors", name);
            prop_assert_eq!(status.restart_count, counts.restarts, "{} restarts", name);
            prop_assert_eq!(i64::from(status.in_flight), counts.running - counts.finish, "{} in flight", name);
        }
        prop_assert_eq!(registry.list_available(), available.into_iter().collect::<Vec<_>>());
    }
}

/// A write burst while readers hold old snapshots: the old snapshots stay
/// exactly as they were.
#[test]
fn held_snapshots_never_change() {
    let registry = Registry::new();
    registry.register("p", PluginInfo::default()).unwrap();
    registry.mark_initialized("p").unwrap();
    let held = registry.snapshot();
    let held_status = held.get("p").unwrap();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for ms in 0..200 {
                    let call = registry.begin_call("p").unwrap();
                    call.succeeded(Duration::from_millis(ms));
                }
            });
        }
    });
    let later = held.get("p").unwrap();
    assert_eq!(later.success_count, held_status.success_count);
    assert_eq!(later.state, Initialized);
    assert_eq!(registry.get_status("p").unwrap().success_count, 400);
    assert_eq!(registry.get_status("p").unwrap().in_flight, 0);
    assert!(registry.generation() > held.generation());
}
