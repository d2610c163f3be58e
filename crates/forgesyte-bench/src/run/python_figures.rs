//! The Python figures: start-up of 20 Python plugins against one
//! interpreter importing them, a no-op tool call over HTTP against a
//! FastAPI reference server shaped like the Python original, and the host
//! → runner → host round trip of a tiny call.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use forgesyte_deps::DependencyChecker;
use forgesyte_loader::{Isolation, Loader, LoaderConfig, PluginHandle};
use forgesyte_registry::Registry;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{Bench, ms, path_arg, plugin_states};
use crate::artifacts::target_dir;
use crate::config::{Mode, Program};
use crate::http::{self, Client, LoadResult, Req};
use crate::proc::Server;
use crate::python::{self, Interpreter, Venv, python_plugin_name};
use crate::report::{Figure, Target, median};
use crate::tree::{self, plugin_name};

/// The figures of this module, in table order, with their units and targets.
const FIGURES: [(&str, &str, Target); 4] = [
    ("python_startup", "ms", Target::RatioAtMost(1.5)),
    ("python_http_rps", "req/s", Target::RatioAtLeast(3.0)),
    ("python_http_p99", "ms", Target::RatioAtMost(0.5)),
    ("python_roundtrip", "µs", Target::Below(100.0)),
];

/// What the reference server is, in the table.
const REFERENCE: &str = "FastAPI + uvicorn, run_tool in the route";

/// The body of every tool call.
const NOOP_BODY: &str = r#"{"args":{}}"#;

impl Bench<'_> {
    /// Every Python figure; without an interpreter, each is "not measured"
    /// and a check fails (CI has `python3`; the loader's tests need it too).
    pub(super) fn python(&mut self) -> anyhow::Result<()> {
        let interpreter = match Interpreter::find() {
            Ok(interpreter) => interpreter,
            Err(reason) => {
                let reason = format!("no Python interpreter: {reason}");
                self.report
                    .check("python: a Python 3 interpreter", false, reason.clone());
                for (id, unit, target) in FIGURES {
                    self.report.figures.push(Figure::not_measured(
                        id,
                        id.into(),
                        unit,
                        None,
                        target,
                        reason.clone(),
                        Value::Null,
                    ));
                }
                return Ok(());
            }
        };
        self.report.check(
            "python: a Python 3 interpreter",
            true,
            format!(
                "{} (Python {})",
                interpreter.path.display(),
                interpreter.version
            ),
        );
        python::write_scripts(&self.options.work_dir)?;
        self.python_startup(&interpreter)?;
        self.python_http(&interpreter)?;
        self.python_roundtrip(&interpreter)?;
        Ok(())
    }

    /// The server's arguments naming the interpreter.
    fn python_args(interpreter: &Interpreter) -> anyhow::Result<[&str; 2]> {
        Ok(["--python", path_arg(&interpreter.path)?])
    }

    /// From spawning `forgesyte serve` on N Python plugins to the load pass
    /// over with all of them INITIALIZED, against one interpreter importing
    /// and constructing the same N `plugin.py` files (its whole process).
    fn python_startup(&mut self, interpreter: &Interpreter) -> anyhow::Result<()> {
        let n = self.plan.python_plugins;
        let repeats = self.plan.python_startup_repeats;
        let dir = self.options.work_dir.join("plugins-python");
        self.progress(&format!(
            "python startup: {n} Python plugins, {repeats} repeats"
        ));
        python::lay_out(&dir, n)?;
        let extra = Self::python_args(interpreter)?;
        // One unmeasured pass of each: page cache, `__pycache__`.
        drop(self.start_server_with(&dir, 0, "python-startup", &extra)?);
        self.import_baseline(interpreter, &dir)?;
        let mut served = Vec::new();
        let mut baseline = Vec::new();
        // Context, not a figure: the interpreter's own start (`-c pass`),
        // which both sides pay once (the zygote before its first fork).
        let mut interpreter_alone = Vec::new();
        let mut problems = Vec::new();
        for repeat in 0..repeats {
            self.progress(&format!("python startup: repeat {}/{repeats}", repeat + 1));
            let host_first = repeat.is_multiple_of(2);
            for host in [host_first, !host_first] {
                if host {
                    let (server, ready) =
                        self.start_server_with(&dir, 0, "python-startup", &extra)?;
                    let states = self.runtime.block_on(plugin_states(server.addr()))?;
                    drop(server);
                    let not_ready: Vec<String> = states
                        .iter()
                        .filter(|s| s.state != "INITIALIZED")
                        .map(|s| {
                            format!(
                                "{} {} ({})",
                                s.name,
                                s.state,
                                s.reason.as_deref().unwrap_or("no reason")
                            )
                        })
                        .collect();
                    if states.len() != n || !not_ready.is_empty() {
                        problems.push(format!(
                            "repeat {}: {} plugins, {n} expected; not INITIALIZED: {}",
                            repeat + 1,
                            states.len(),
                            not_ready.join(", ")
                        ));
                    }
                    served.push(ms(ready));
                } else {
                    let (elapsed, result) = self.import_baseline(interpreter, &dir)?;
                    if result["constructed"].as_u64() != Some(n as u64) {
                        problems.push(format!("baseline, repeat {}: {result}", repeat + 1));
                    }
                    baseline.push(ms(elapsed));
                }
            }
            interpreter_alone.push(ms(Self::interpreter_start(interpreter)?));
        }
        self.report.check(
            "python startup: every Python plugin INITIALIZED, every baseline constructed all",
            problems.is_empty(),
            if problems.is_empty() {
                format!("{n} plugins, {repeats} repeats")
            } else {
                problems.join("; ")
            },
        );
        self.report.figures.push(Figure::ratio(
            "python_startup",
            format!("start to {n} Python plugins INITIALIZED"),
            "ms",
            median(&served),
            (median(&baseline), &format!("one python3 importing the {n}")),
            Target::RatioAtMost(1.5),
            json!({
                "plugins": n,
                "interpreter": interpreter,
                "server_ms": served,
                "baseline_ms": baseline,
                "interpreter_start_ms": interpreter_alone,
            }),
        ));
        self.remove_tree(&dir)
    }

    /// `python -c pass`, timed from spawn to exit: what any Python process
    /// pays before its first line (`site` included).
    fn interpreter_start(interpreter: &Interpreter) -> anyhow::Result<Duration> {
        let what = format!("{} -c pass", interpreter.path.display());
        Self::timed_python(interpreter, &["-c".as_ref(), "pass".as_ref()], &what)
            .map(|(elapsed, _)| elapsed)
    }

    /// One run of the start-up baseline, timed from spawn to exit.
    fn import_baseline(
        &self,
        interpreter: &Interpreter,
        dir: &Path,
    ) -> anyhow::Result<(Duration, Value)> {
        let script = self.options.work_dir.join(python::IMPORT_BASELINE_FILE);
        let what = script.display().to_string();
        let (elapsed, stdout) =
            Self::timed_python(interpreter, &[script.as_os_str(), dir.as_os_str()], &what)?;
        let stdout = String::from_utf8_lossy(&stdout);
        let result = serde_json::from_str(stdout.trim())
            .with_context(|| format!("{what} printed {stdout:?}"))?;
        Ok((elapsed, result))
    }

    /// The interpreter run with `args` (stdin closed), timed from spawn to
    /// exit, and what it printed; an error naming `what` and the end of
    /// its stderr when it fails.
    fn timed_python(
        interpreter: &Interpreter,
        args: &[&std::ffi::OsStr],
        what: &str,
    ) -> anyhow::Result<(Duration, Vec<u8>)> {
        let started = Instant::now();
        let output = Command::new(&interpreter.path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start {}", interpreter.path.display()))?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "{what} failed ({}): {}",
                output.status,
                python::tail(&String::from_utf8_lossy(&output.stderr), 5)
            );
        }
        Ok((elapsed, output.stdout))
    }

    /// `POST .../tools/noop/run` of one Python plugin over 32 connections,
    /// against the reference server on the same `plugin.py`. In smoke mode
    /// the reference is neither installed nor run: the host's side is a
    /// correctness check.
    fn python_http(&mut self, interpreter: &Interpreter) -> anyhow::Result<()> {
        let dir = self.options.work_dir.join("plugins-python-one");
        python::lay_out(&dir, 1)?;
        let name = python_plugin_name(0);
        let path = format!("/v1/plugins/{name}/tools/noop/run");
        let venv = self.reference_venv(interpreter);
        let (server, _) =
            self.start_server_with(&dir, 1, "python-http", &Self::python_args(interpreter)?)?;
        let request = Req::post_json("python", &path, NOOP_BODY)?;
        let host_answer = self.first_answer(&server, &request)?;
        let reference = venv.and_then(|venv| {
            let server = self.start_reference(&venv, &dir)?;
            let answer = self
                .first_answer(&server, &request)
                .map_err(|e| format!("the reference server did not answer: {e:#}"))?;
            Ok((venv, server, answer))
        });
        if let Ok((_, _, reference_answer)) = &reference {
            let same = same_shape(&host_answer, reference_answer);
            self.report.check(
                "python http: the reference answers in the host's shape",
                same,
                format!("host: {host_answer}; reference: {reference_answer}"),
            );
        }
        let workload = http::repeat(request);
        let spec = self.spec();
        let mut host_runs = Vec::new();
        let mut reference_runs = Vec::new();
        for repeat in 0..self.plan.repeats {
            self.progress(&format!(
                "python http: repeat {}/{} ({} connections, {:?} each run{})",
                repeat + 1,
                self.plan.repeats,
                spec.connections,
                spec.warmup + spec.duration,
                if reference.is_ok() { "" } else { ", host only" }
            ));
            let host_first = repeat.is_multiple_of(2);
            for host in [host_first, !host_first] {
                if host {
                    host_runs.push(self.load_run(&server, spec, &workload)?);
                } else if let Ok((_, reference, _)) = &reference {
                    reference_runs.push(self.load_run(reference, spec, &workload)?);
                }
            }
        }
        drop(server);
        self.answered_200(
            "python http: forgesyte: every request answered 200",
            &host_runs,
        );
        if reference.is_ok() {
            self.answered_200(
                "python http: reference: every request answered 200",
                &reference_runs,
            );
        }
        let stat = |runs: &[LoadResult], f: fn(&http::LabelResult) -> f64| {
            median(
                &runs
                    .iter()
                    .map(|r| f(&r.label("python")))
                    .collect::<Vec<_>>(),
            )
        };
        let rps = |r: &http::LabelResult| r.rps;
        let p50 = |r: &http::LabelResult| r.p50_us / 1000.0;
        let p99 = |r: &http::LabelResult| r.p99_us / 1000.0;
        let connections = spec.connections;
        let rps_title = format!("POST Python no-op tool call ({connections} connections)");
        let p99_title = "POST Python no-op tool call p99".to_owned();
        let (venv, reason) = match reference {
            Ok((venv, reference, _)) => {
                drop(reference);
                (Some(venv), None)
            }
            Err(reason) => (None, Some(reason)),
        };
        let runs = json!({
            "plugin": name,
            "connections": connections,
            "p50_ms": { "forgesyte": stat(&host_runs, p50), "reference": stat(&reference_runs, p50) },
            "reference_env": venv,
            "forgesyte": host_runs,
            "reference": reference_runs,
        });
        let measured = |f| Some(stat(&host_runs, f));
        if let Some(reason) = reason {
            self.report.figures.push(Figure::not_measured(
                "python_http_rps",
                rps_title,
                "req/s",
                measured(rps),
                Target::RatioAtLeast(3.0),
                reason.clone(),
                runs,
            ));
            self.report.figures.push(Figure::not_measured(
                "python_http_p99",
                p99_title,
                "ms",
                measured(p99),
                Target::RatioAtMost(0.5),
                reason,
                Value::String("see python_http_rps".into()),
            ));
        } else {
            self.report.figures.push(Figure::ratio(
                "python_http_rps",
                rps_title,
                "req/s",
                stat(&host_runs, rps),
                (stat(&reference_runs, rps), REFERENCE),
                Target::RatioAtLeast(3.0),
                runs,
            ));
            self.report.figures.push(Figure::ratio(
                "python_http_p99",
                p99_title,
                "ms",
                stat(&host_runs, p99),
                (stat(&reference_runs, p99), REFERENCE),
                Target::RatioAtMost(0.5),
                Value::String("see python_http_rps".into()),
            ));
        }
        self.remove_tree(&dir)
    }

    /// The reference's virtualenv, or why there is none (always none in
    /// smoke mode: CI must not depend on the package index).
    fn reference_venv(&self, interpreter: &Interpreter) -> Result<Venv, String> {
        if self.options.mode == Mode::Smoke {
            return Err("smoke mode does not install or run the reference server \
                        (the host's side ran as a correctness check)"
                .into());
        }
        let dir = target_dir().join("bench-venv");
        let venv = python::ensure_venv(interpreter, &dir, &self.log("bench-venv"), &|m| {
            self.progress(&format!("python http: {m}"));
        })?;
        self.progress(&format!(
            "python http: reference environment {} ({}): {}",
            venv.dir.display(),
            if venv.reused {
                "reused"
            } else {
                "installed now"
            },
            venv.packages
        ));
        Ok(venv)
    }

    /// Starts the reference server on `dir` with the virtualenv's Python.
    fn start_reference(&self, venv: &Venv, dir: &Path) -> Result<Server, String> {
        let script = self.options.work_dir.join(python::REFERENCE_SERVER_FILE);
        let program = Program {
            program: venv.python.clone(),
            args: vec![script.display().to_string()],
        };
        let log = self.log("reference");
        let dir = path_arg(dir).map_err(|e| e.to_string())?;
        Server::start(&program, &["--plugins", dir, "--bind", "127.0.0.1:0"], &log).map_err(|e| {
            format!(
                "the reference server did not start: {e:#}; log: {}",
                python::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 4)
            )
        })
    }

    /// One request; it must be answered 200 with a JSON object saying `ok`.
    fn first_answer(&self, server: &Server, request: &Req) -> anyhow::Result<Value> {
        self.runtime.block_on(async {
            let mut client = Client::connect(server.addr()).await?;
            let (status, body) = client.send(request).await?;
            let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if status != 200 || answer["ok"] != true {
                bail!(
                    "the no-op call answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(answer)
        })
    }

    /// Records that every request of `runs` was answered 200.
    fn answered_200(&mut self, name: &str, runs: &[LoadResult]) {
        let label = |r: &LoadResult| r.label("python");
        let sent: u64 = runs.iter().map(|r| label(r).sent).sum();
        let lost: u64 = runs.iter().map(LoadResult::unanswered).sum();
        let unexpected: u64 = runs.iter().map(|r| label(r).unexpected(200)).sum();
        self.report.check(
            name,
            lost == 0 && unexpected == 0 && sent > 0,
            format!("{sent} sent, {lost} unanswered, {unexpected} not 200"),
        );
    }

    /// `PluginHandle::call` of the Python plugin's `noop`, in this process
    /// through the loader (no HTTP), one call at a time; the same call to
    /// the native bench plugin in an isolated runner for context.
    fn python_roundtrip(&mut self, interpreter: &Interpreter) -> anyhow::Result<()> {
        let calls = self.plan.python_calls;
        let repeats = self.plan.repeats;
        let dir = self.options.work_dir.join("plugins-roundtrip");
        tree::generate(&dir, 1, &self.options.plugin_library)?;
        python::write_plugin(&dir, 0)?;
        self.progress(&format!(
            "python round trip: {calls} sequential calls x {repeats}, Python and isolated native"
        ));
        let config = LoaderConfig {
            default_isolation: Isolation::Process,
            // `forgesyte` (and this executable, for smoke runs) serve the
            // native runner behind `__runner`.
            runner: Some(self.options.server.program.clone()),
            runner_args: vec!["__runner".into()],
            python: Some(interpreter.path.clone()),
            ..LoaderConfig::default()
        };
        let loader = Loader::new(
            Registry::new(),
            Arc::new(DependencyChecker::system(Vec::new())),
            config,
        );
        let load = loader.load_all(&dir);
        let handle = |name: &str| {
            loader.handle(name).with_context(|| {
                let outcome = load.plugins.iter().find(|p| p.name == name);
                format!(
                    "{name} did not load: {:?}",
                    outcome.map(|p| (&p.state, &p.reason))
                )
            })
        };
        let python_handle = handle(&python_plugin_name(0))?;
        let native_handle = handle(&plugin_name(0))?;
        let args = json!({});
        let mut failures = Vec::new();
        let warmup = calls.min(500);
        for handle in [&python_handle, &native_handle] {
            time_calls(handle, &args, warmup, &mut failures)?;
        }
        let mut python_runs = Vec::new();
        let mut native_runs = Vec::new();
        for repeat in 0..repeats {
            let python_first = repeat.is_multiple_of(2);
            for python_side in [python_first, !python_first] {
                if python_side {
                    python_runs.push(time_calls(&python_handle, &args, calls, &mut failures)?);
                } else {
                    native_runs.push(time_calls(&native_handle, &args, calls, &mut failures)?);
                }
            }
        }
        let isolated = python_handle.isolation() == Isolation::Process
            && native_handle.isolation() == Isolation::Process;
        loader.shutdown();
        drop(loader);
        self.report.check(
            "python round trip: every no-op call returned {} (Python and isolated native)",
            failures.is_empty() && isolated,
            if failures.is_empty() {
                format!(
                    "{} calls each, both in runner processes: {isolated}",
                    warmup + calls * repeats
                )
            } else {
                format!("{} failed: {}", failures.len(), failures.join("; "))
            },
        );
        let stat = |runs: &[Value], key: &str| {
            median(
                &runs
                    .iter()
                    .filter_map(|r| r[key].as_f64())
                    .collect::<Vec<_>>(),
            )
        };
        let python_p99 = stat(&python_runs, "p99_us");
        self.report.figures.push(
            Figure::absolute(
                "python_roundtrip",
                format!("PluginHandle::call Python no-op, median (p99 {python_p99:.0} µs)"),
                "µs",
                stat(&python_runs, "p50_us"),
                Target::Below(100.0),
                json!({ "calls": calls, "python": python_runs, "native_isolated": native_runs }),
            )
            .with_context((stat(&native_runs, "p50_us"), "native, isolated runner")),
        );
        self.remove_tree(&dir)
    }

    fn remove_tree(&self, dir: &Path) -> anyhow::Result<()> {
        if self.options.keep_trees {
            Ok(())
        } else {
            tree::remove(dir)
        }
    }
}

/// Times `calls` calls of `noop` one by one; failures (and results other
/// than `{}`) are added to `failures` (at most 5 kept).
fn time_calls(
    handle: &PluginHandle,
    args: &Value,
    calls: usize,
    failures: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)?;
    let started = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let result = std::hint::black_box(handle.call("noop", args));
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        histogram.saturating_record(ns.max(1));
        let problem = match result {
            Ok(value) if value == json!({}) => None,
            Ok(value) => Some(format!("{}: noop returned {value}", handle.name())),
            Err(e) => Some(format!("{}: {e}", handle.name())),
        };
        if let Some(problem) = problem
            && failures.len() < 5
        {
            failures.push(problem);
        }
    }
    let total = started.elapsed();
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "calls": calls,
        "p50_us": us(0.5),
        "p90_us": us(0.9),
        "p99_us": us(0.99),
        "max_us": histogram.max() as f64 / 1000.0,
        "mean_us": total.as_secs_f64() * 1e6 / calls.max(1) as f64,
    }))
}

/// Whether two answers of the run route have the same shape: the same
/// fields, `ok`, and the same plugin, tool and result.
fn same_shape(host: &Value, reference: &Value) -> bool {
    let keys = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut a = keys(host);
    let mut b = keys(reference);
    a.sort();
    b.sort();
    !a.is_empty()
        && a == b
        && ["ok", "plugin_id", "tool_name", "result"]
            .iter()
            .all(|k| host[k] == reference[k])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_the_same_shape() {
        let host = json!({"ok": true, "plugin_id": "p", "tool_name": "noop", "result": {}, "processing_time_ms": 0.1});
        let reference = json!({"ok": true, "plugin_id": "p", "tool_name": "noop", "result": {}, "processing_time_ms": 0.3});
        assert!(same_shape(&host, &reference));
        let other = json!({"ok": true, "plugin_id": "p", "tool_name": "noop", "result": {}});
        assert!(!same_shape(&host, &other));
        let wrong = json!({"ok": true, "plugin_id": "q", "tool_name": "noop", "result": {}, "processing_time_ms": 0.3});
        assert!(!same_shape(&host, &wrong));
        assert!(!same_shape(&Value::Null, &Value::Null));
    }
}
