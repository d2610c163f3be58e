//! Property tests of the lifecycle state machine and the registry.
//!
//! (a) The transition function against an independently written reference
//!     table: all 25 pairs, and random sequences.
//! (b) Random operation sequences against a sequential reference model of the
//!     whole registry, compared after every step.
//! (c) Random operation sequences from several threads at once, with an
//!     observer taking snapshots during the run: afterwards every plugin has
//!     exactly one state, no update was lost, counts never went down,
//!     `list_all` is sorted and complete, and availability matches the state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forgesyte_registry::{
    PluginInfo, PluginLifecycleState, PluginStatus, Registry, RegistryError, Snapshot,
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
const REASONS: [&str; 3] = [
    "ImportError: cannot open /p/libx.so: no such file",
    "Missing dependencies: lib:foo, GPU (CUDA driver not found)",
    "CrashError: killed by signal SIGSEGV (11)",
];

/// One registry operation, on `NAMES[plugin]`.
#[derive(Debug, Clone)]
enum Op {
    Register(usize),
    MarkInitialized(usize),
    MarkRunning(usize),
    Finish(usize),
    MarkFailed(usize, usize),
    MarkUnavailable(usize, usize),
    MarkLoaded(usize),
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
            | Op::MarkFailed(p, _)
            | Op::MarkUnavailable(p, _)
            | Op::MarkLoaded(p)
            | Op::RecordSuccess(p, _)
            | Op::RecordError(p, _) => p,
        }
    }
}

fn any_op() -> impl Strategy<Value = Op> {
    let plugin = 0..NAMES.len();
    let reason = 0..REASONS.len();
    prop_oneof![
        2 => plugin.clone().prop_map(Op::Register),
        3 => plugin.clone().prop_map(Op::MarkInitialized),
        4 => plugin.clone().prop_map(Op::MarkRunning),
        4 => plugin.clone().prop_map(Op::Finish),
        1 => (plugin.clone(), reason.clone()).prop_map(|(p, r)| Op::MarkFailed(p, r)),
        1 => (plugin.clone(), reason).prop_map(|(p, r)| Op::MarkUnavailable(p, r)),
        1 => plugin.clone().prop_map(Op::MarkLoaded),
        3 => (plugin.clone(), 0..500u16).prop_map(|(p, ms)| Op::RecordSuccess(p, ms)),
        2 => (plugin, 0..500u16).prop_map(|(p, ms)| Op::RecordError(p, ms)),
    ]
}

/// Applies `op` to the real registry.
fn apply(registry: &Registry, op: &Op) -> Result<(), RegistryError> {
    let name = NAMES[op.plugin()];
    match *op {
        Op::Register(_) => registry.register(name, PluginInfo::default()),
        Op::MarkInitialized(_) => registry.mark_initialized(name),
        Op::MarkRunning(_) => registry.mark_running(name),
        Op::Finish(_) => registry.finish(name),
        Op::MarkFailed(_, r) => registry.mark_failed(name, REASONS[r]),
        Op::MarkUnavailable(_, r) => registry.mark_unavailable(name, REASONS[r]),
        Op::MarkLoaded(_) => registry.mark_loaded(name, None),
        Op::RecordSuccess(_, ms) => registry.record_success(name, Duration::from_millis(ms.into())),
        Op::RecordError(_, ms) => registry.record_error(name, Duration::from_millis(ms.into())),
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

#[derive(Debug, Clone)]
struct ModelPlugin {
    state: PluginLifecycleState,
    in_flight: u32,
    reason: Option<&'static str>,
    success: u64,
    error: u64,
    times_ms: Vec<f64>,
}

#[derive(Debug, Default)]
struct Model {
    plugins: BTreeMap<&'static str, ModelPlugin>,
}

impl Model {
    fn apply(&mut self, op: &Op) -> Result<(), Refusal> {
        let name = NAMES[op.plugin()];
        if let Op::Register(_) = op {
            if self.plugins.contains_key(name) {
                return Err(Refusal::AlreadyRegistered);
            }
            self.plugins.insert(
                name,
                ModelPlugin {
                    state: Loaded,
                    in_flight: 0,
                    reason: None,
                    success: 0,
                    error: 0,
                    times_ms: Vec::new(),
                },
            );
            return Ok(());
        }
        let plugin = self.plugins.get_mut(name).ok_or(Refusal::NotFound)?;
        let to_terminal = |plugin: &mut ModelPlugin, target, reason| {
            if plugin.state == target {
            } else if model_legal(plugin.state, target) {
                plugin.state = target;
            } else {
                return Err(Refusal::Illegal(plugin.state, target));
            }
            plugin.reason = Some(reason);
            Ok(())
        };
        match *op {
            Op::Register(_) => unreachable!("handled above"),
            Op::MarkInitialized(_) => {
                if plugin.state != Loaded {
                    return Err(Refusal::Illegal(plugin.state, Initialized));
                }
                plugin.state = Initialized;
            }
            Op::MarkRunning(_) => {
                if !matches!(plugin.state, Initialized | Running) {
                    return Err(Refusal::NotAvailable(plugin.state));
                }
                plugin.in_flight += 1;
                plugin.state = Running;
            }
            Op::Finish(_) => {
                if plugin.in_flight == 0 {
                    return Err(Refusal::NothingInFlight);
                }
                plugin.in_flight -= 1;
                if plugin.in_flight == 0 && plugin.state == Running {
                    plugin.state = Initialized;
                }
            }
            Op::MarkFailed(_, r) => to_terminal(plugin, Failed, REASONS[r])?,
            Op::MarkUnavailable(_, r) => to_terminal(plugin, Unavailable, REASONS[r])?,
            Op::MarkLoaded(_) => {
                if plugin.state != Loaded {
                    if !model_legal(plugin.state, Loaded) {
                        return Err(Refusal::Illegal(plugin.state, Loaded));
                    }
                    plugin.state = Loaded;
                    plugin.reason = None;
                }
            }
            Op::RecordSuccess(_, ms) => {
                plugin.success += 1;
                plugin.times_ms.push(f64::from(ms));
            }
            Op::RecordError(_, ms) => {
                plugin.error += 1;
                plugin.times_ms.push(f64::from(ms));
            }
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

/// Compares one real status with the model's plugin.
fn check_against_model(status: &PluginStatus, model: &ModelPlugin) -> Result<(), TestCaseError> {
    prop_assert_eq!(status.state, model.state);
    prop_assert_eq!(status.in_flight, model.in_flight);
    prop_assert_eq!(status.reason.as_deref(), model.reason);
    prop_assert_eq!(status.success_count, model.success);
    prop_assert_eq!(status.error_count, model.error);
    let last_ten = &model.times_ms[model.times_ms.len().saturating_sub(10)..];
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
    Ok(())
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
        prop_assert_eq!(
            status.reason.is_some(),
            matches!(status.state, Failed | Unavailable)
        );
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn registry_follows_the_model(ops in prop::collection::vec(any_op(), 0..60)) {
        let registry = Registry::new();
        let mut model = Model::default();
        let mut previous = (0, BTreeMap::new());
        for op in &ops {
            let generation = registry.generation();
            let real = apply(&registry, op);
            let expected = model.apply(op);
            prop_assert_eq!(real.as_ref().err().and_then(refusal_of), expected.err(), "op {:?}", op);
            prop_assert_eq!(registry.generation() > generation, expected.is_ok(), "generation after {:?}", op);

            let snapshot = registry.snapshot();
            let statuses = check_snapshot(&snapshot)?;
            let model_names: Vec<&str> = model.plugins.keys().copied().collect();
            let real_names: Vec<&str> = statuses.keys().map(String::as_str).collect();
            prop_assert_eq!(real_names, model_names);
            for (name, plugin) in &model.plugins {
                check_against_model(&statuses[*name], plugin)?;
                prop_assert_eq!(registry.is_available(name), matches!(plugin.state, Initialized | Running));
            }
            check_monotonic((previous.0, &previous.1), (snapshot.generation(), &statuses))?;
            previous = (snapshot.generation(), statuses);
        }
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
