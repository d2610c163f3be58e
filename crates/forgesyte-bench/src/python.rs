//! The Python side of the benchmark: the bench plugin (`plugin.py`, one
//! `noop` tool), the two baselines (a FastAPI reference server and a
//! one-process import of the same plugins), the interpreter, and the
//! virtualenv the reference server needs (`target/bench-venv`).
//!
//! The Python sources live in `src/python/` and are written into the work
//! dir by the run, so what ran can be read next to the results.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::tree;

/// The bench plugin: `class Plugin` with one tool, `noop`, returning `{}`.
pub(crate) const PLUGIN_SOURCE: &str = include_str!("python/plugin.py");

/// The reference server of the `python_http` figure (FastAPI on uvicorn).
pub(crate) const REFERENCE_SERVER_SOURCE: &str = include_str!("python/reference_server.py");

/// The baseline of the `python_startup` figure: one interpreter importing
/// and constructing every plugin.
pub(crate) const IMPORT_BASELINE_SOURCE: &str = include_str!("python/import_baseline.py");

/// File names of the two baselines in the work dir.
pub(crate) const REFERENCE_SERVER_FILE: &str = "reference_server.py";
pub(crate) const IMPORT_BASELINE_FILE: &str = "import_baseline.py";

/// What the reference server needs, installed with pip.
pub(crate) const REFERENCE_PACKAGES: &[&str] = &["fastapi", "uvicorn"];

/// The longest `python3 -m venv` or `pip install` may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Prints the reference environment as one JSON line (and fails when
/// fastapi or uvicorn cannot be imported).
const PROBE_REFERENCE: &str = "\
import importlib.util, json, sys
import fastapi, uvicorn
print(json.dumps({
    'python': sys.version.split()[0],
    'fastapi': fastapi.__version__,
    'uvicorn': uvicorn.__version__,
    'http': 'httptools' if importlib.util.find_spec('httptools') else 'h11',
    'loop': 'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio',
}))
";

/// The registry name of Python plugin `index` of a tree (`bench-py-0000`, ...).
pub fn python_plugin_name(index: usize) -> String {
    format!("bench-py-{index:04}")
}

/// Writes Python plugin `index` into `dir` (which must exist):
/// `bench-py-NNNN/manifest.json` (`"runtime": "python"`) and `plugin.py`.
///
/// # Errors
///
/// When a directory or file cannot be written.
pub(crate) fn write_plugin(dir: &Path, index: usize) -> anyhow::Result<()> {
    let name = python_plugin_name(index);
    let plugin_dir = dir.join(&name);
    fs::create_dir(&plugin_dir)
        .with_context(|| format!("cannot create {}", plugin_dir.display()))?;
    let manifest = json!({
        "name": name,
        "version": "1.0.0",
        "description": format!("Python benchmark plugin {index}"),
        "runtime": "python",
        "tools": [{"id": "noop", "title": "No-op", "description": "Does nothing"}],
    });
    fs::write(
        plugin_dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    fs::write(plugin_dir.join("plugin.py"), PLUGIN_SOURCE)
        .with_context(|| format!("cannot write {}", plugin_dir.display()))?;
    Ok(())
}

/// Replaces `dir` with a tree of `count` Python bench plugins
/// (`bench-py-0000`, ...).
///
/// # Errors
///
/// When a directory or file cannot be written.
pub fn lay_out(dir: &Path, count: usize) -> anyhow::Result<()> {
    tree::remove(dir)?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for index in 0..count {
        write_plugin(dir, index)?;
    }
    Ok(())
}

/// Writes the two baseline scripts into `work_dir`.
pub(crate) fn write_scripts(work_dir: &Path) -> anyhow::Result<()> {
    for (file, source) in [
        (REFERENCE_SERVER_FILE, REFERENCE_SERVER_SOURCE),
        (IMPORT_BASELINE_FILE, IMPORT_BASELINE_SOURCE),
    ] {
        let path = work_dir.join(file);
        fs::write(&path, source).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The Python interpreter every Python figure uses: the real executable
/// behind `python3` (or `FORGESYTE_BENCH_PYTHON`), so that a launcher shim
/// (pyenv's is a shell script, tens of milliseconds per start) is paid by
/// neither side.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Interpreter {
    /// `sys.executable`.
    pub(crate) path: PathBuf,
    /// `sys.version`, first word.
    pub(crate) version: String,
}

impl Interpreter {
    /// Finds the interpreter; `Err` says why there is none.
    pub(crate) fn find() -> Result<Interpreter, String> {
        let wanted = std::env::var_os("FORGESYTE_BENCH_PYTHON")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "python3".into());
        let shown = PathBuf::from(&wanted).display().to_string();
        let output = Command::new(&wanted)
            .args([
                "-c",
                "import sys; print(sys.executable); print(sys.version.split()[0])",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {shown}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{shown} failed ({}): {}",
                output.status,
                tail(&String::from_utf8_lossy(&output.stderr), 5)
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut lines = stdout.lines().map(str::trim);
        let path = PathBuf::from(lines.next().unwrap_or_default());
        let version = lines.next().unwrap_or_default().to_owned();
        if !path.is_file() {
            return Err(format!(
                "{shown} names no interpreter file (sys.executable = {path:?})"
            ));
        }
        if !version.starts_with('3') {
            return Err(format!("{shown} is Python {version:?}, not Python 3"));
        }
        Ok(Interpreter { path, version })
    }
}

/// A virtualenv with the reference server's packages.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Venv {
    /// The virtualenv.
    pub(crate) dir: PathBuf,
    /// Its interpreter.
    pub(crate) python: PathBuf,
    /// Whether it was already there (nothing installed this run).
    pub(crate) reused: bool,
    /// Versions and the HTTP and event-loop implementations uvicorn picks.
    pub(crate) packages: serde_json::Value,
}

/// The virtualenv `dir` with fastapi and uvicorn: reused when it already
/// imports them, else created with `INTERPRETER -m venv` and filled with
/// `pip install fastapi uvicorn` (output in `log`). `Err` says why not.
pub(crate) fn ensure_venv(
    interpreter: &Interpreter,
    dir: &Path,
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<Venv, String> {
    let python = dir.join("bin").join("python");
    if python.is_file()
        && let Ok(packages) = probe(&python)
    {
        return Ok(Venv {
            dir: dir.to_path_buf(),
            python,
            reused: true,
            packages,
        });
    }
    if !python.is_file() {
        progress(&format!("creating the virtualenv {}", dir.display()));
        let mut venv = Command::new(&interpreter.path);
        venv.arg("-m").arg("venv").arg(dir);
        run_logged(venv, log, INSTALL_TIMEOUT).map_err(|e| {
            format!(
                "cannot create the virtualenv {} with `{} -m venv`: {e}",
                dir.display(),
                interpreter.path.display()
            )
        })?;
    }
    let packages = REFERENCE_PACKAGES.join(" ");
    progress(&format!(
        "installing {packages} into {} (pip; log: {})",
        dir.display(),
        log.display()
    ));
    let mut pip = Command::new(&python);
    // Few retries and a short socket timeout: without a reachable index,
    // say so within a minute or two rather than after pip's backoff.
    pip.args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(["--retries", "2", "--timeout", "30"])
        .args(REFERENCE_PACKAGES);
    run_logged(pip, log, INSTALL_TIMEOUT).map_err(|e| {
        format!(
            "`pip install {packages}` into {} failed: {e}",
            dir.display()
        )
    })?;
    let packages = probe(&python).map_err(|e| {
        format!(
            "{} cannot import fastapi and uvicorn after pip: {e}",
            python.display()
        )
    })?;
    Ok(Venv {
        dir: dir.to_path_buf(),
        python,
        reused: false,
        packages,
    })
}

/// What the reference environment holds, or why it does not import.
fn probe(python: &Path) -> Result<serde_json::Value, String> {
    let output = Command::new(python)
        .args(["-c", PROBE_REFERENCE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(tail(&String::from_utf8_lossy(&output.stderr), 3));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| format!("probe printed {stdout:?}: {e}"))
}

/// Runs `command` with stdout and stderr appended to `log`, killed after
/// `timeout`; `Err` has the exit status and the log's last lines.
fn run_logged(mut command: Command, log: &Path, timeout: Duration) -> Result<(), String> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no result within {timeout:?} (log {}): {}",
                    log.display(),
                    log_tail(log)
                ));
            }
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", log_tail(log)))
    }
}

/// The end of a log: its `ERROR` lines when it has some (pip's verdict,
/// after its retry warnings), else its last lines.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let errors: String = text
        .lines()
        .filter(|l| l.trim_start().starts_with("ERROR"))
        .collect::<Vec<_>>()
        .join("\n");
    if errors.is_empty() {
        tail(&text, 4)
    } else {
        tail(&errors, 3)
    }
}

/// The last `n` non-empty lines of `text`, joined with " | ".
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_tree_has_the_seed_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("py");
        lay_out(&tree, 2).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(tree.join("bench-py-0001/manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["name"], "bench-py-0001");
        assert_eq!(manifest["runtime"], "python");
        let source = fs::read_to_string(tree.join("bench-py-0000/plugin.py")).unwrap();
        assert!(source.contains("class Plugin"));
        assert!(source.contains("def run_tool(self, tool_name, args)"));
        assert!(!tree.join("bench-py-0002").exists());
        lay_out(&tree, 1).unwrap();
        assert!(!tree.join("bench-py-0001").exists());
    }

    #[test]
    fn a_venv_that_cannot_be_created_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let interpreter = Interpreter {
            path: tmp.path().join("no-such-python3"),
            version: "3".into(),
        };
        let log = tmp.path().join("venv.log");
        let reason = ensure_venv(&interpreter, &tmp.path().join("venv"), &log, &|_| {})
            .map(|venv| venv.dir)
            .unwrap_err();
        assert!(reason.contains("cannot create the virtualenv"), "{reason}");
        assert!(reason.contains("no-such-python3"), "{reason}");
    }

    #[test]
    fn tails_keep_the_last_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("pip.log");
        fs::write(
            &log,
            "WARNING: Retrying\nERROR: no fastapi\nERROR: none found\n",
        )
        .unwrap();
        assert_eq!(log_tail(&log), "ERROR: no fastapi | ERROR: none found");
        fs::write(&log, "a\nb\n").unwrap();
        assert_eq!(log_tail(&log), "a | b");
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("x", 3), "x");
    }
}
