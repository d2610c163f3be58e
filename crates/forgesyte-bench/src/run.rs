//! The benchmark itself: lays out plugin trees, starts the servers, drives
//! the load, and turns the runs into figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::config::{Options, Part, Plan, Program};
use crate::http::{self, Client, LoadResult, Req, Spec, Workload};
use crate::proc::{self, Server};
use crate::report::{Figure, Machine, Report, Target, loadavg, median};
use crate::tree::{self, plugin_name};

mod frames;
mod python_figures;
mod stream_figures;

/// How long a server may take to load its plugins.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs every figure of `options.mode`, writes the JSON report to
/// `options.results` and returns the report.
///
/// Speed targets that are missed are reported, not errors.
///
/// # Errors
///
/// When something the benchmark needs fails: a tree cannot be written, a
/// server does not start or never gets ready, a helper fails.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    let plan = Plan::for_mode(options.mode);
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    std::fs::create_dir_all(options.work_dir.join("logs"))
        .with_context(|| format!("cannot create {}", options.work_dir.display()))?;
    let mut bench = Bench {
        options,
        report: Report {
            mode: options.mode,
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seconds: 0.0,
            machine: Machine::detect(),
            plan: serde_json::to_value(&plan)?,
            figures: Vec::new(),
            checks: Vec::new(),
        },
        plan,
        runtime,
        serve_dir: options.work_dir.join("plugins-serve"),
        empty_dir: options.work_dir.join("plugins-none"),
    };
    bench.progress(&format!(
        "{} mode on {} CPUs ({}), load average {}",
        options.mode.as_str(),
        bench.report.machine.cpus,
        bench.report.machine.cpu_model,
        bench.report.machine.loadavg_start
    ));
    bench.lay_out()?;
    let runs = |part| options.runs(part);
    if runs(Part::Load) {
        bench.load()?;
    }
    if runs(Part::Startup) {
        bench.startup()?;
    }
    if runs(Part::Http) {
        bench.http()?;
    }
    if runs(Part::Calls) {
        bench.call_overhead()?;
    }
    if runs(Part::Memory) {
        bench.memory()?;
    }
    if runs(Part::Mixed) {
        bench.mixed()?;
    }
    if runs(Part::Python) {
        bench.python()?;
    }
    if runs(Part::Frames) || runs(Part::Streams) {
        let frames = bench.frames_setup()?;
        if runs(Part::Frames) {
            bench.frames(&frames)?;
        }
        if runs(Part::Streams) {
            bench.streams(&frames)?;
        }
    }
    if !options.keep_trees {
        tree::remove(&options.work_dir.join("plugins-frames"))?;
        tree::remove(&bench.serve_dir)?;
        tree::remove(&bench.empty_dir)?;
    }
    let mut report = bench.report;
    report.seconds = started.elapsed().as_secs_f64();
    report.machine.loadavg_end = loadavg();
    report.write_json(&options.results)?;
    Ok(report)
}

struct Bench<'a> {
    options: &'a Options,
    plan: Plan,
    runtime: tokio::runtime::Runtime,
    report: Report,
    serve_dir: PathBuf,
    empty_dir: PathBuf,
}

fn path_arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn number(value: &Value, key: &str) -> anyhow::Result<f64> {
    value[key]
        .as_f64()
        .with_context(|| format!("no number {key:?} in {value}"))
}

impl Bench<'_> {
    fn progress(&self, message: &str) {
        if self.options.progress {
            eprintln!("[forgesyte-bench] {message}");
        }
    }

    fn helper(&self, args: &[&str]) -> anyhow::Result<Value> {
        proc::helper(&self.options.helper, args)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.options
            .work_dir
            .join("logs")
            .join(format!("{name}.log"))
    }

    fn lay_out(&self) -> anyhow::Result<()> {
        let n = self.plan.serve_plugins;
        self.progress(&format!("laying out {n} plugin directories"));
        tree::generate(&self.serve_dir, n, &self.options.plugin_library)?;
        tree::remove(&self.empty_dir)?;
        std::fs::create_dir_all(&self.empty_dir)?;
        Ok(())
    }

    /// Starts the server under test on `plugins` and waits until `expect`
    /// plugins are available; returns it and the time from spawn to ready.
    fn start_server(
        &self,
        plugins: &Path,
        expect: usize,
        log: &str,
    ) -> anyhow::Result<(Server, Duration)> {
        self.start_server_with(plugins, expect, log, &[])
    }

    /// [`Self::start_server`] with more arguments (`--python PATH`).
    fn start_server_with(
        &self,
        plugins: &Path,
        expect: usize,
        log: &str,
        extra: &[&str],
    ) -> anyhow::Result<(Server, Duration)> {
        let mut args = vec!["--plugins", path_arg(plugins)?, "--bind", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let server = Server::start(&self.options.server, &args, &self.log(log))?;
        let ready_at = self
            .runtime
            .block_on(wait_ready(server.addr(), expect))
            .with_context(|| format!("server log: {}", self.log(log).display()))?;
        let ready = ready_at.saturating_duration_since(server.spawned);
        Ok((server, ready))
    }

    fn load_run(
        &self,
        server: &Server,
        spec: Spec,
        workload: &Arc<dyn Workload>,
    ) -> anyhow::Result<LoadResult> {
        self.runtime
            .block_on(http::run(server.addr(), spec, Arc::clone(workload)))
    }

    fn spec(&self) -> Spec {
        Spec {
            connections: self.plan.connections,
            warmup: self.plan.warmup,
            duration: self.plan.duration,
        }
    }

    /// Loading N plugin directories vs `dlopen` + `dlsym` of their libraries,
    /// each in a fresh process, alternating.
    fn load(&mut self) -> anyhow::Result<()> {
        let n = self.plan.load_plugins;
        let dir = self.options.work_dir.join("plugins-load");
        self.progress(&format!(
            "load: laying out {n} plugin directories (distinct copies)"
        ));
        tree::generate(&dir, n, &self.options.plugin_library)?;
        let dir_arg = path_arg(&dir)?;
        // One unmeasured pass of each: page cache and helper binary warm.
        self.helper(&["__dlopen", dir_arg])?;
        self.helper(&["__rawabi", dir_arg])?;
        self.helper(&["__load", dir_arg])?;
        let kinds = ["__load", "__dlopen", "__rawabi"];
        let mut passes: [Vec<Value>; 3] = Default::default();
        for repeat in 0..self.plan.load_repeats {
            self.progress(&format!(
                "load: repeat {}/{}",
                repeat + 1,
                self.plan.load_repeats
            ));
            // Each kind goes first in turn.
            for k in 0..kinds.len() {
                let which = (repeat + k) % kinds.len();
                passes[which].push(self.helper(&[kinds[which], dir_arg])?);
            }
        }
        let [loads, dlopens, raws] = passes;
        let all_loaded = loads.iter().all(|l| l["loaded"].as_u64() == Some(n as u64));
        self.report.check(
            "load: every plugin directory INITIALIZED",
            all_loaded,
            format!("{n} expected per pass; passes: {loads:?}"),
        );
        let all_constructed = raws
            .iter()
            .all(|l| l["instances"].as_u64() == Some(n as u64));
        self.report.check(
            "load: the raw-ABI baseline constructed every plugin",
            all_constructed,
            format!("{n} expected per pass; passes: {raws:?}"),
        );
        let times = |passes: &[Value]| -> anyhow::Result<Vec<f64>> {
            passes.iter().map(|l| number(l, "ms")).collect()
        };
        let (load_ms, dlopen_ms, raw_ms) = (times(&loads)?, times(&dlopens)?, times(&raws)?);
        self.report.figures.push(Figure::ratio(
            "load",
            format!("load {n} plugin dirs"),
            "ms",
            median(&load_ms),
            (median(&dlopen_ms), "dlopen+dlsym"),
            Target::RatioAtMost(1.5),
            json!({ "plugins": n, "load": loads, "dlopen": dlopens }),
        ));
        self.report.figures.push(Figure::ratio(
            "load_abi",
            format!("load {n} plugin dirs vs raw ABI"),
            "ms",
            median(&load_ms),
            (median(&raw_ms), "dlopen+create+tools, 1 thread"),
            Target::RatioAtMost(1.3),
            json!({ "plugins": n, "load": "see load", "raw_abi": raws }),
        ));
        if !self.options.keep_trees {
            tree::remove(&dir)?;
        }
        Ok(())
    }

    /// Process start to every plugin served INITIALIZED.
    fn startup(&mut self) -> anyhow::Result<()> {
        let n = self.plan.serve_plugins;
        let mut runs = Vec::new();
        for repeat in 0..self.plan.startup_repeats {
            self.progress(&format!(
                "startup: repeat {}/{}",
                repeat + 1,
                self.plan.startup_repeats
            ));
            let (server, ready) = self.start_server(&self.serve_dir, n, "startup")?;
            if repeat == 0 {
                let states = self.runtime.block_on(plugin_states(server.addr()))?;
                let initialized = states.iter().filter(|s| s.state == "INITIALIZED").count();
                self.report.check(
                    "startup: every plugin INITIALIZED",
                    initialized == n && states.len() == n,
                    format!(
                        "{initialized} of {} INITIALIZED, {n} expected",
                        states.len()
                    ),
                );
            }
            drop(server);
            runs.push(ms(ready));
        }
        self.report.figures.push(Figure::absolute(
            "startup",
            format!("start to serving {n} plugins"),
            "ms",
            median(&runs),
            Target::AtMost(30.0),
            json!({ "plugins": n, "ms": runs }),
        ));
        Ok(())
    }

    /// List, health and no-op tool call throughput against the baseline.
    fn http(&mut self) -> anyhow::Result<()> {
        let n = self.plan.serve_plugins;
        let (server, _) = self.start_server(&self.serve_dir, n, "http")?;
        let first = plugin_name(0);
        let list_path = "/v1/plugins";
        let health_path = format!("/v1/plugins/{first}/health");
        let tool_path = format!("/v1/plugins/{first}/tools/noop/run");
        let (list_body, health_body) = self.runtime.block_on(async {
            let mut client = Client::connect(server.addr()).await?;
            let (s1, list) = client.send(&Req::get("list", list_path)?).await?;
            let (s2, health) = client.send(&Req::get("health", &health_path)?).await?;
            if s1 != 200 || s2 != 200 {
                bail!("list answered {s1}, health answered {s2}");
            }
            Ok((list, health))
        })?;
        let list_file = self.options.work_dir.join("baseline-list.json");
        let health_file = self.options.work_dir.join("baseline-health.json");
        std::fs::write(&list_file, &list_body)?;
        std::fs::write(&health_file, &health_body)?;
        let baseline_program = Program {
            program: self.options.helper.clone(),
            args: vec![
                "__baseline".into(),
                "--list".into(),
                path_arg(&list_file)?.into(),
                "--health".into(),
                path_arg(&health_file)?.into(),
            ],
        };
        let baseline = Server::start(
            &baseline_program,
            &["--bind", "127.0.0.1:0"],
            &self.log("baseline"),
        )?;
        let list = http::repeat(Req::get("list", list_path)?);
        let health = http::repeat(Req::get("health", &health_path)?);
        let tool = http::repeat(Req::post_json("tool", &tool_path, r#"{"args":{}}"#)?);
        let metrics = http::repeat(Req::get("metrics", "/metrics")?);
        let spec = self.spec();
        let mut runs: [Vec<LoadResult>; 6] = Default::default();
        let [
            list_real,
            list_base,
            health_real,
            health_base,
            tool_real,
            metrics_real,
        ] = &mut runs;
        for repeat in 0..self.plan.repeats {
            self.progress(&format!(
                "http: repeat {}/{} ({} connections, {:?} each run)",
                repeat + 1,
                self.plan.repeats,
                spec.connections,
                spec.warmup + spec.duration
            ));
            let real_first = repeat.is_multiple_of(2);
            for real in [real_first, !real_first] {
                if real {
                    list_real.push(self.load_run(&server, spec, &list)?);
                    health_real.push(self.load_run(&server, spec, &health)?);
                } else {
                    list_base.push(self.load_run(&baseline, spec, &list)?);
                    health_base.push(self.load_run(&baseline, spec, &health)?);
                }
            }
            tool_real.push(self.load_run(&server, spec, &tool)?);
            metrics_real.push(self.load_run(&server, spec, &metrics)?);
        }
        drop(baseline);
        drop(server);
        let names = [
            "list (server)",
            "list (baseline)",
            "health (server)",
            "health (baseline)",
            "no-op tool call",
            "metrics scrape",
        ];
        let labels = ["list", "list", "health", "health", "tool", "metrics"];
        for ((results, name), label) in runs.iter().zip(names).zip(labels) {
            let sent: u64 = results.iter().map(|r| r.label(label).sent).sum();
            let lost: u64 = results.iter().map(LoadResult::unanswered).sum();
            let unexpected: u64 = results.iter().map(|r| r.label(label).unexpected(200)).sum();
            self.report.check(
                format!("http: {name}: every request answered 200"),
                lost == 0 && unexpected == 0 && sent > 0,
                format!("{sent} sent, {lost} unanswered, {unexpected} not 200"),
            );
        }
        let stat = |results: &[LoadResult], label: &str, f: fn(&http::LabelResult) -> f64| {
            median(
                &results
                    .iter()
                    .map(|r| f(&r.label(label)))
                    .collect::<Vec<_>>(),
            )
        };
        let rps = |r: &http::LabelResult| r.rps;
        let p99 = |r: &http::LabelResult| r.p99_us / 1000.0;
        let raw = |real: &[LoadResult], base: &[LoadResult]| json!({ "plugins": n, "server": real, "baseline": base });
        let [
            list_real,
            list_base,
            health_real,
            health_base,
            tool_real,
            metrics_real,
        ] = &runs;
        let list_size = list_body.len();
        self.report.figures.push(Figure::ratio(
            "list_rps",
            format!("GET /v1/plugins ({n} plugins, {list_size} B)"),
            "req/s",
            stat(list_real, "list", rps),
            (stat(list_base, "list", rps), "axum, fixed bytes"),
            Target::RatioAtLeast(0.6),
            raw(list_real, list_base),
        ));
        self.report.figures.push(Figure::ratio(
            "list_p99",
            "GET /v1/plugins p99".into(),
            "ms",
            stat(list_real, "list", p99),
            (stat(list_base, "list", p99), "axum, fixed bytes"),
            Target::RatioAtMost(2.0),
            Value::String("see list_rps".into()),
        ));
        self.report.figures.push(Figure::ratio(
            "health_rps",
            format!("GET one plugin's health ({} B)", health_body.len()),
            "req/s",
            stat(health_real, "health", rps),
            (stat(health_base, "health", rps), "axum, fixed bytes"),
            Target::RatioAtLeast(0.8),
            raw(health_real, health_base),
        ));
        self.report.figures.push(Figure::ratio(
            "health_p99",
            "GET one plugin's health p99".into(),
            "ms",
            stat(health_real, "health", p99),
            (stat(health_base, "health", p99), "axum, fixed bytes"),
            Target::RatioAtMost(2.0),
            Value::String("see health_rps".into()),
        ));
        self.report.figures.push(Figure::ratio(
            "tool_rps",
            "POST no-op tool call (in-process)".into(),
            "req/s",
            stat(tool_real, "tool", rps),
            (stat(health_real, "health", rps), "health endpoint"),
            Target::RatioAtLeast(0.5),
            json!({ "plugins": n, "server": tool_real }),
        ));
        // After the tool calls, so the scrape holds their counters and a
        // latency histogram too.
        self.report.figures.push(Figure::ratio(
            "metrics_rps",
            format!("GET /metrics ({n} plugins)"),
            "req/s",
            stat(metrics_real, "metrics", rps),
            (stat(list_real, "list", rps), "GET /v1/plugins, same server"),
            Target::RatioAtLeast(0.5),
            json!({ "plugins": n, "server": metrics_real }),
        ));
        Ok(())
    }

    /// `PluginHandle::call` of a no-op tool in this process, timed call by call.
    fn call_overhead(&mut self) -> anyhow::Result<()> {
        let n = self.plan.serve_plugins;
        self.progress(&format!(
            "call overhead: {} calls x {}",
            self.plan.calls, self.plan.repeats
        ));
        let loader = forgesyte_server::build_loader(&[]);
        let loaded = loader.load_all(&self.serve_dir).loaded();
        let name = plugin_name(0);
        let handle = loader
            .handle(&name)
            .with_context(|| format!("{name} did not load ({loaded} of {n} loaded)"))?;
        let args = json!({});
        let mut errors = 0u64;
        for _ in 0..self.plan.calls.min(10_000) {
            errors += u64::from(std::hint::black_box(handle.call("noop", &args)).is_err());
        }
        let mut runs = Vec::new();
        for _ in 0..self.plan.repeats {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
            let started = Instant::now();
            for _ in 0..self.plan.calls {
                let t = Instant::now();
                let result = std::hint::black_box(handle.call("noop", &args));
                let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                histogram.saturating_record(ns.max(1));
                errors += u64::from(result.is_err());
            }
            let total = started.elapsed();
            runs.push(json!({
                "calls": self.plan.calls,
                "p50_us": histogram.value_at_quantile(0.5) as f64 / 1000.0,
                "p90_us": histogram.value_at_quantile(0.9) as f64 / 1000.0,
                "p99_us": histogram.value_at_quantile(0.99) as f64 / 1000.0,
                "mean_us": total.as_secs_f64() * 1e6 / self.plan.calls.max(1) as f64,
            }));
        }
        self.report.check(
            "call overhead: every call succeeded",
            errors == 0,
            format!("{errors} calls failed"),
        );
        let p50: Vec<f64> = runs
            .iter()
            .map(|r| number(r, "p50_us"))
            .collect::<Result<_, _>>()?;
        self.report.figures.push(Figure::absolute(
            "call_overhead",
            format!("PluginHandle::call no-op, median ({n} plugins)"),
            "µs",
            median(&p50),
            Target::Below(5.0),
            json!({ "plugins": n, "runs": runs }),
        ));
        Ok(())
    }

    /// Resident memory with N plugins vs with none plus N opened libraries.
    fn memory(&mut self) -> anyhow::Result<()> {
        let n = self.plan.serve_plugins;
        let mut runs = Vec::new();
        for repeat in 0..self.plan.memory_repeats {
            self.progress(&format!(
                "memory: repeat {}/{}",
                repeat + 1,
                self.plan.memory_repeats
            ));
            let none = self.settled_rss(&self.empty_dir.clone(), 0, "memory-none")?;
            let full = self.settled_rss(&self.serve_dir.clone(), n, "memory-full")?;
            let libs = self.helper(&["__rss", path_arg(&self.serve_dir)?])?;
            let per_library = number(&libs, "per_library_kib")?;
            let made = self.helper(&["__rss", "--construct", path_arg(&self.serve_dir)?])?;
            let per_instance = number(&made, "per_library_kib")?;
            runs.push(json!({
                "server_none_kib": none,
                "server_full_kib": full,
                "per_library_kib": per_library,
                "expected_kib": none as f64 + n as f64 * per_library,
                "libraries": libs,
                "per_instance_kib": per_instance,
                "expected_constructed_kib": none as f64 + n as f64 * per_instance,
                "constructed": made,
            }));
        }
        // The median over the runs of one of their fields, in MiB.
        let mib = |field: &str| -> anyhow::Result<f64> {
            let values: Vec<f64> = runs
                .iter()
                .map(|r| number(r, field))
                .collect::<Result<_, _>>()?;
            Ok(median(&values) / 1024.0)
        };
        let full = mib("server_full_kib")?;
        let expected = mib("expected_kib")?;
        let constructed = mib("expected_constructed_kib")?;
        self.report.figures.push(Figure::ratio(
            "memory",
            format!("server RSS, {n} plugins"),
            "MiB",
            full,
            (expected, &format!("none + {n} × dlopen")),
            Target::RatioAtMost(1.2),
            json!({ "plugins": n, "runs": runs }),
        ));
        // The same server against what any host's process holds once it
        // made the instances (the plugins' own code and data that `create`
        // and `tools` touch): what is over it is the host's.
        self.report.figures.push(Figure::ratio(
            "memory_abi",
            format!("server RSS, {n} plugins, against instances made"),
            "MiB",
            full,
            (constructed, &format!("none + {n} × raw-ABI create")),
            Target::Report,
            Value::String("see memory".into()),
        ));
        Ok(())
    }

    /// RSS of a fresh server on `dir` after it is ready and has answered a
    /// few requests of each kind.
    fn settled_rss(&self, dir: &Path, expect: usize, log: &str) -> anyhow::Result<u64> {
        let (server, _) = self.start_server(dir, expect, log)?;
        self.runtime.block_on(async {
            let mut client = Client::connect(server.addr()).await?;
            let list = Req::get("list", "/v1/plugins")?;
            let health = Req::get("health", "/v1/health")?;
            for _ in 0..50 {
                client.send(&list).await?;
                client.send(&health).await?;
            }
            anyhow::Ok(())
        })?;
        // Let the blocking thread of the load pass and the allocator settle.
        std::thread::sleep(Duration::from_millis(200));
        server.rss_kib()
    }

    /// Readers and tool calls that succeed, fail and panic, all at once;
    /// then every request must have been answered as expected and the
    /// registry's counts must match the client's.
    fn mixed(&mut self) -> anyhow::Result<()> {
        let n = self.plan.serve_plugins;
        let half = n / 2;
        let panic_plugins = n - half;
        let readers = self.plan.mixed_readers;
        let callers = self.plan.mixed_callers;
        let duration = self.plan.mixed;
        self.progress(&format!(
            "mixed: {readers} readers, {callers} no-op and {callers} failing callers, {panic_plugins} panics, {duration:?}"
        ));
        let (server, _) = self.start_server(&self.serve_dir, n, "mixed")?;
        let list = Req::get("read", "/v1/plugins")?;
        let healths = (0..n)
            .map(|i| Req::get("read", &format!("/v1/plugins/{}/health", plugin_name(i))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tool = |label: &'static str, i: usize, tool: &str| {
            Req::post_json(
                label,
                &format!("/v1/plugins/{}/tools/{tool}/run", plugin_name(i)),
                r#"{"args":{}}"#,
            )
        };
        let noops = (0..half)
            .map(|i| tool("noop", i, "noop"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let fails = (0..half)
            .map(|i| tool("fail", i, "fail"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Spread over the run, with room for the last one to be answered.
        let pace = duration / u32::try_from(panic_plugins + 2).unwrap_or(u32::MAX);
        let panics = (half..n)
            .map(|i| tool("panic", i, "panic").map(|r| r.after(pace)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let workload: Arc<dyn Workload> = Arc::new(move |conn: usize, seq: u64| {
            let at = |reqs: &[Req], k: usize| reqs.get(k % reqs.len().max(1)).cloned();
            let seq = usize::try_from(seq).unwrap_or(usize::MAX);
            if conn < readers {
                if seq.is_multiple_of(2) {
                    Some(list.clone())
                } else {
                    at(&healths, conn * 7 + seq)
                }
            } else if conn < readers + callers {
                at(&noops, conn + seq)
            } else if conn < readers + 2 * callers {
                at(&fails, conn + seq)
            } else {
                panics.get(seq).cloned()
            }
        });
        let spec = Spec {
            connections: readers + 2 * callers + 1,
            warmup: Duration::ZERO,
            duration,
        };
        let result = self.load_run(&server, spec, &workload)?;
        let states = self.runtime.block_on(plugin_states(server.addr()))?;
        drop(server);

        let read = result.label("read");
        let noop = result.label("noop");
        let fail = result.label("fail");
        let panic = result.label("panic");
        let mut problems = Vec::new();
        for (name, label, expected) in [
            ("read", &read, 200),
            ("noop", &noop, 200),
            ("fail", &fail, 422),
            ("panic", &panic, 502),
        ] {
            if label.answered != label.sent || label.errors + label.timeouts > 0 {
                problems.push(format!(
                    "{name}: {} sent, {} answered, {} errors, {} timeouts",
                    label.sent, label.answered, label.errors, label.timeouts
                ));
            }
            let unexpected = label.unexpected(expected);
            if unexpected > 0 {
                problems.push(format!(
                    "{name}: {unexpected} answers not {expected}: {:?}",
                    label.statuses
                ));
            }
        }
        let successes: u64 = states.iter().map(|s| s.success_count).sum();
        let errors: u64 = states.iter().map(|s| s.error_count).sum();
        let ok_200 = noop.statuses.get(&200).copied().unwrap_or(0);
        let failed_422 = fail.statuses.get(&422).copied().unwrap_or(0);
        let panicked_502 = panic.statuses.get(&502).copied().unwrap_or(0);
        if successes != ok_200 {
            problems.push(format!(
                "registry counts {successes} successes, the client saw {ok_200}"
            ));
        }
        if errors != failed_422 + panicked_502 {
            problems.push(format!(
                "registry counts {errors} errors, the client saw {failed_422} + {panicked_502}"
            ));
        }
        let failed: Vec<&str> = states
            .iter()
            .filter(|s| s.state == "FAILED")
            .map(|s| s.name.as_str())
            .collect();
        let not_initialized = states
            .iter()
            .filter(|s| s.state != "FAILED" && s.state != "INITIALIZED")
            .count();
        if failed.len() as u64 != panicked_502 || not_initialized > 0 || states.len() != n {
            problems.push(format!(
                "{} FAILED after {panicked_502} panics, {not_initialized} neither FAILED nor INITIALIZED, {} plugins",
                failed.len(),
                states.len()
            ));
        }
        if panic.sent == 0 || noop.sent == 0 || fail.sent == 0 || read.sent == 0 {
            problems.push("a kind of request was never sent".into());
        }
        let reconciled = problems.is_empty();
        self.report.check(
            "mixed: every request answered, counts reconciled",
            reconciled,
            if reconciled {
                format!(
                    "{} reads, {ok_200} no-op, {failed_422} failing and {panicked_502} panicking calls",
                    read.answered
                )
            } else {
                problems.join("; ")
            },
        );
        let answered = read.answered + noop.answered + fail.answered + panic.answered;
        self.report.figures.push(Figure::holds(
            "mixed",
            format!(
                "mixed run {}s: {readers} readers + calls",
                duration.as_secs_f64()
            ),
            "requests",
            answered as f64,
            reconciled,
            json!({
                "plugins": n,
                "result": result,
                "registry": { "successes": successes, "errors": errors, "failed": failed },
                "problems": problems,
            }),
        ));
        Ok(())
    }
}

/// Polls `GET /v1/health` until the load pass is over and `expect`
/// plugins are available (0: until the load pass is over); returns when
/// that was first seen.
async fn wait_ready(addr: std::net::SocketAddr, expect: usize) -> anyhow::Result<Instant> {
    let started = Instant::now();
    let deadline = started + READY_TIMEOUT;
    let mut client = Client::connect(addr).await?;
    loop {
        let (status, health) = client.get_json("/v1/health").await?;
        let loaded = health["plugins_loaded"].as_u64().unwrap_or(0);
        if status == 200 && health["status"] != "loading" && loaded >= expect as u64 {
            return Ok(Instant::now());
        }
        let now = Instant::now();
        if now > deadline {
            bail!("not ready after {READY_TIMEOUT:?}: {health}");
        }
        // Every 200 µs for the first 50 ms, then every millisecond: a
        // long start (Python runners) is not slowed by the polling itself.
        let polling = now.saturating_duration_since(started);
        tokio::time::sleep(if polling < Duration::from_millis(50) {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(1)
        })
        .await;
    }
}

/// One plugin's line of `GET /v1/plugins`.
#[derive(Debug, serde::Deserialize)]
struct PluginState {
    name: String,
    state: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    success_count: u64,
    #[serde(default)]
    error_count: u64,
}

async fn plugin_states(addr: std::net::SocketAddr) -> anyhow::Result<Vec<PluginState>> {
    let mut client = Client::connect(addr).await?;
    let (status, body) = client.get_json("/v1/plugins").await?;
    if status != 200 {
        bail!("GET /v1/plugins answered {status}");
    }
    Ok(serde_json::from_value(body)?)
}
