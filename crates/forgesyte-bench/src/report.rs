//! The benchmark's results: figures against targets, correctness checks,
//! the printed table and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::config::Mode;

/// A figure's target (issue 6).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// measured / baseline must be at most this.
    RatioAtMost(f64),
    /// measured / baseline must be at least this.
    RatioAtLeast(f64),
    /// The measured value must be at most this.
    AtMost(f64),
    /// The measured value must be below this.
    Below(f64),
    /// A property that holds or not (the mixed run).
    Holds,
    /// The measured value must be at least this (frames per second).
    AtLeast(f64),
    /// No target: the figure is reported (with its baseline, when it has
    /// one) and counts neither as met nor as missed.
    Report,
}

impl Target {
    fn text(self, unit: &str) -> String {
        match self {
            Target::RatioAtMost(r) => format!("≤ {r}×"),
            Target::RatioAtLeast(r) => format!("≥ {r}×"),
            Target::AtMost(v) => format!("≤ {v} {unit}"),
            Target::Below(v) => format!("< {v} {unit}"),
            Target::Holds => "all answered, reconciled".into(),
            Target::AtLeast(v) => format!("≥ {v} {unit}"),
            Target::Report => "—".into(),
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable identifier (`load`, `startup`, `list_rps`, ...).
    pub id: String,
    /// What it measures, for people.
    pub title: String,
    /// Unit of `measured` and `baseline`.
    pub unit: String,
    /// The median of the measured runs.
    pub measured: f64,
    /// The median of the baseline runs, when the target is a ratio.
    pub baseline: Option<f64>,
    /// What the baseline is.
    pub baseline_title: Option<String>,
    /// `measured / baseline`.
    pub ratio: Option<f64>,
    /// The target.
    pub target: Target,
    /// Whether the target is met (never when not measured).
    pub pass: bool,
    /// Why the figure could not be measured (its baseline could not be
    /// run, say); `measured` may still hold the host's side.
    pub not_measured: Option<String>,
    /// The raw runs behind the medians.
    pub runs: serde_json::Value,
}

impl Figure {
    /// A figure compared with a baseline.
    pub(crate) fn ratio(
        id: &str,
        title: String,
        unit: &str,
        measured: f64,
        baseline: (f64, &str),
        target: Target,
        runs: serde_json::Value,
    ) -> Figure {
        let ratio = if baseline.0 > 0.0 {
            measured / baseline.0
        } else {
            f64::NAN
        };
        let pass = match target {
            Target::RatioAtMost(r) => ratio <= r,
            Target::RatioAtLeast(r) => ratio >= r,
            Target::Report => true,
            _ => false,
        };
        Figure {
            id: id.into(),
            title,
            unit: unit.into(),
            measured,
            baseline: Some(baseline.0),
            baseline_title: Some(baseline.1.into()),
            ratio: Some(ratio),
            target,
            pass,
            not_measured: None,
            runs,
        }
    }

    /// A figure compared with an absolute target.
    pub(crate) fn absolute(
        id: &str,
        title: String,
        unit: &str,
        measured: f64,
        target: Target,
        runs: serde_json::Value,
    ) -> Figure {
        let pass = match target {
            Target::AtMost(v) => measured <= v,
            Target::Below(v) => measured < v,
            Target::AtLeast(v) => measured >= v,
            Target::Report => true,
            _ => false,
        };
        Figure {
            id: id.into(),
            title,
            unit: unit.into(),
            measured,
            baseline: None,
            baseline_title: None,
            ratio: None,
            target,
            pass,
            not_measured: None,
            runs,
        }
    }

    /// A figure that could not be measured, and why: `measured` is the
    /// host's side when it ran (else NaN), there is no baseline, and it
    /// never passes.
    pub(crate) fn not_measured(
        id: &str,
        title: String,
        unit: &str,
        measured: Option<f64>,
        target: Target,
        reason: String,
        runs: serde_json::Value,
    ) -> Figure {
        Figure {
            id: id.into(),
            title,
            unit: unit.into(),
            measured: measured.unwrap_or(f64::NAN),
            baseline: None,
            baseline_title: None,
            ratio: None,
            target,
            pass: false,
            not_measured: Some(reason),
            runs,
        }
    }

    /// The same figure with a baseline shown for context: the ratio is
    /// printed, but an absolute target still decides the result.
    pub(crate) fn with_context(mut self, baseline: (f64, &str)) -> Figure {
        self.ratio = Some(if baseline.0 > 0.0 {
            self.measured / baseline.0
        } else {
            f64::NAN
        });
        self.baseline = Some(baseline.0);
        self.baseline_title = Some(baseline.1.into());
        self
    }

    /// A property that holds or not.
    pub(crate) fn holds(
        id: &str,
        title: String,
        unit: &str,
        measured: f64,
        pass: bool,
        runs: serde_json::Value,
    ) -> Figure {
        Figure {
            id: id.into(),
            title,
            unit: unit.into(),
            measured,
            baseline: None,
            baseline_title: None,
            ratio: None,
            target: Target::Holds,
            pass,
            not_measured: None,
            runs,
        }
    }
}

/// A correctness check (never about speed): requests answered as expected,
/// plugins loaded, counts reconciled.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// Numbers behind it.
    pub detail: String,
}

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs (`nproc`).
    pub cpus: usize,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// `/proc/loadavg` when the run started.
    pub loadavg_start: String,
    /// `/proc/loadavg` when the run ended.
    pub loadavg_end: String,
}

impl Machine {
    /// What this machine is.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The first three fields of `/proc/loadavg`.
pub(crate) fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mode it ran in.
    pub mode: Mode,
    /// Seconds since the Unix epoch when it started.
    pub started_unix: u64,
    /// Wall time of the whole run, in seconds.
    pub seconds: f64,
    /// The machine.
    pub machine: Machine,
    /// Sizes and durations used.
    pub plan: serde_json::Value,
    /// The figures, in table order.
    pub figures: Vec<Figure>,
    /// Correctness checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// The figure `id`, if measured.
    pub fn figure(&self, id: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.id == id)
    }

    /// The figures that could not be measured.
    pub fn not_measured(&self) -> Vec<&Figure> {
        self.figures
            .iter()
            .filter(|f| f.not_measured.is_some())
            .collect()
    }

    /// The checks that did not hold.
    pub fn failed_checks(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// Records a check.
    pub(crate) fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
    }

    /// The table: figure, measured, baseline, ratio, target, result.
    pub fn table(&self) -> String {
        let header = [
            "figure", "measured", "baseline", "ratio", "target", "result",
        ];
        let rows: Vec<[String; 6]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.title.clone(),
                    if f.measured.is_nan() {
                        "—".into()
                    } else {
                        value(f.measured, &f.unit)
                    },
                    match (&f.baseline, &f.baseline_title) {
                        (Some(b), Some(t)) => format!("{} ({t})", value(*b, &f.unit)),
                        _ => "—".into(),
                    },
                    f.ratio.map_or_else(|| "—".into(), |r| format!("{r:.2}×")),
                    f.target.text(&f.unit),
                    match (&f.not_measured, f.pass) {
                        (Some(_), _) => "not measured",
                        (None, _) if f.target == Target::Report => "—",
                        (None, true) => "pass",
                        (None, false) => "MISS",
                    }
                    .into(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let _ = write!(out, "|");
            for (cell, w) in cells.iter().zip(widths) {
                let pad = w - cell.chars().count();
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            }
            out.push('\n');
        };
        line(&mut out, &header.map(String::from));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&mut out, &rule);
        for row in &rows {
            line(&mut out, row);
        }
        out
    }

    /// A summary line: targets met, mode, duration, machine load.
    pub fn summary(&self) -> String {
        let targeted = || self.figures.iter().filter(|f| f.target != Target::Report);
        let met = targeted().filter(|f| f.pass).count();
        let unmeasured = match self.not_measured().len() {
            0 => String::new(),
            n => format!(", {n} not measured"),
        };
        format!(
            "{met} of {} targets met{unmeasured} ({} mode, {:.0} s, {} CPUs, load average {} at the start)",
            targeted().count(),
            self.mode.as_str(),
            self.seconds,
            self.machine.cpus,
            self.machine.loadavg_start
        )
    }

    /// Writes the JSON report (pretty) to `path`, creating its directory.
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A value with its unit, to a sensible precision.
fn value(v: f64, unit: &str) -> String {
    let number = if !v.is_finite() {
        format!("{v}")
    } else if v.abs() >= 10_000.0 {
        group(v.round() as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        number
    } else {
        format!("{number} {unit}")
    }
}

/// `12345` → `12,345`.
fn group(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// The median of `values` (NaN when empty).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if !n.is_multiple_of(2) => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(-999), "-999");
        assert_eq!(value(68_123.4, "req/s"), "68,123 req/s");
        assert_eq!(value(1.234, "ms"), "1.23 ms");
        assert_eq!(value(12.34, ""), "12.3");
    }

    #[test]
    fn at_least_and_report_targets() {
        let fps = |v: f64| {
            Figure::absolute(
                "s",
                "s".into(),
                "frames/s",
                v,
                Target::AtLeast(500.0),
                serde_json::Value::Null,
            )
        };
        assert!(fps(500.0).pass);
        assert!(!fps(499.0).pass);
        let report_only = Figure::ratio(
            "f",
            "f".into(),
            "ms",
            9.0,
            (1.0, "b"),
            Target::Report,
            serde_json::Value::Null,
        );
        assert_eq!(report_only.ratio, Some(9.0));
        let report = Report {
            mode: Mode::Smoke,
            started_unix: 0,
            seconds: 0.0,
            machine: Machine::detect(),
            plan: serde_json::Value::Null,
            figures: vec![fps(499.0), report_only],
            checks: Vec::new(),
        };
        // A figure without a target is neither met nor missed.
        assert!(
            report.summary().starts_with("0 of 1 targets met"),
            "{}",
            report.summary()
        );
        let table = report.table();
        assert!(table.contains("| MISS"), "{table}");
        assert!(table.contains("≥ 500 frames/s"), "{table}");
    }

    #[test]
    fn targets_decide_pass() {
        let r = Figure::ratio(
            "x",
            "x".into(),
            "ms",
            3.0,
            (2.0, "b"),
            Target::RatioAtMost(1.5),
            serde_json::Value::Null,
        );
        assert_eq!(r.ratio, Some(1.5));
        assert!(r.pass);
        let r = Figure::ratio(
            "x",
            "x".into(),
            "req/s",
            1.0,
            (2.0, "b"),
            Target::RatioAtLeast(0.6),
            serde_json::Value::Null,
        );
        assert!(!r.pass);
        let a = Figure::absolute(
            "x",
            "x".into(),
            "µs",
            5.0,
            Target::Below(5.0),
            serde_json::Value::Null,
        );
        assert!(!a.pass);
        let a = Figure::absolute(
            "x",
            "x".into(),
            "ms",
            30.0,
            Target::AtMost(30.0),
            serde_json::Value::Null,
        );
        assert!(a.pass);
        let zero = Figure::ratio(
            "x",
            "x".into(),
            "ms",
            1.0,
            (0.0, "b"),
            Target::RatioAtMost(1.5),
            serde_json::Value::Null,
        );
        assert!(!zero.pass);
    }

    #[test]
    fn the_table_has_a_row_per_figure() {
        let report = Report {
            mode: Mode::Smoke,
            started_unix: 0,
            seconds: 1.0,
            machine: Machine::detect(),
            plan: serde_json::Value::Null,
            figures: vec![Figure::absolute(
                "startup",
                "ready".into(),
                "ms",
                12.0,
                Target::AtMost(30.0),
                serde_json::Value::Null,
            )],
            checks: vec![],
        };
        let table = report.table();
        assert_eq!(table.lines().count(), 3);
        assert!(table.contains("≤ 30 ms"));
        assert!(table.contains("pass"));
    }

    #[test]
    fn a_figure_not_measured_never_passes_and_says_so() {
        let mut report = Report {
            mode: Mode::Quick,
            started_unix: 0,
            seconds: 1.0,
            machine: Machine::detect(),
            plan: serde_json::Value::Null,
            figures: vec![Figure::not_measured(
                "python_http_rps",
                "python http".into(),
                "req/s",
                Some(1234.0),
                Target::RatioAtLeast(3.0),
                "pip failed".into(),
                serde_json::Value::Null,
            )],
            checks: vec![],
        };
        let figure = &report.figures[0];
        assert!(!figure.pass);
        assert_eq!(figure.baseline, None);
        let table = report.table();
        assert!(table.contains("not measured"), "{table}");
        assert!(table.contains("1,234") || table.contains("1234"), "{table}");
        assert!(report.summary().contains("1 not measured"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["figures"][0]["not_measured"], "pip failed");
        report.figures[0] = Figure::not_measured(
            "x",
            "x".into(),
            "ms",
            None,
            Target::RatioAtMost(1.5),
            "no python3".into(),
            serde_json::Value::Null,
        );
        assert!(report.table().contains("| — "));
        let context = Figure::absolute(
            "x",
            "x".into(),
            "µs",
            80.0,
            Target::Below(100.0),
            serde_json::Value::Null,
        )
        .with_context((40.0, "native"));
        assert!(context.pass);
        assert_eq!(context.ratio, Some(2.0));
        assert_eq!(context.baseline, Some(40.0));
    }
}
