//! The test virtualenv `target/test-venv`: `python3 -m venv` and
//! `pip install` of [`REQUIREMENTS`] (numpy and pydantic), for the tests of
//! numpy and pydantic results under a real interpreter.
//!
//! Made once and reused: complete when its marker file (written last, with
//! the requirements it was made for) is there. Built in
//! `test-venv.partial-PID` and renamed into place, so test threads (one
//! build per process, behind a `OnceLock`) and several test processes at
//! once never see a half-made one. A virtualenv that cannot be made (no
//! network) skips the tests that need it, said on stderr past the test
//! harness's capture; with `CI` set it fails them.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What `pip install` puts into the virtualenv.
pub(crate) const REQUIREMENTS: &[&str] = &["numpy>=1.21,<3", "pydantic>=2,<3"];

/// Written last into a complete virtualenv; holds [`marker_text`].
const MARKER: &str = "forgesyte-test-venv.complete";

/// The longest `python3 -m venv` or `pip install` may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The workspace's target directory: `CARGO_TARGET_DIR` (relative: to the
/// workspace root), else `target/` of the workspace.
pub(crate) fn target_dir() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/forgesyte-loader → the workspace root.
    let root = manifest_dir.ancestors().nth(2).unwrap_or(manifest_dir);
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// The test virtualenv's interpreter, made on first use. `None` when it
/// cannot be made: `test` is then skipped, which is said on stderr, and
/// fails when `CI` is set.
pub(crate) fn venv_python(test: &str) -> Option<PathBuf> {
    crate::python::require_python();
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(|| ensure(&target_dir().join("test-venv"))) {
        Ok(python) => Some(python.clone()),
        Err(reason) => {
            let message = format!("SKIPPED {test}: no test virtualenv: {reason}");
            assert!(
                std::env::var_os("CI").is_none(),
                "{message}\n(CI is set: a test that cannot run is a failure)"
            );
            say(&message);
            None
        }
    }
}

/// A line on the real stderr, shown even for passing tests (libtest
/// captures only `print!`/`eprint!`).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn marker_text() -> String {
    format!("{}\n", REQUIREMENTS.join("\n"))
}

/// Whether `dir` is a complete virtualenv for [`REQUIREMENTS`].
fn complete(dir: &Path) -> bool {
    dir.join("bin").join("python").is_file()
        && fs::read_to_string(dir.join(MARKER)).is_ok_and(|text| text == marker_text())
}

/// `dir` made complete (by this process or another); `Err` says why not.
fn ensure(dir: &Path) -> Result<PathBuf, String> {
    let python = dir.join("bin").join("python");
    if complete(dir) {
        return Ok(python);
    }
    let parent = dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", dir.display()))?;
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    remove_abandoned(parent);
    let pid = std::process::id();
    let partial = parent.join(format!("test-venv.partial-{pid}"));
    let log = parent.join(format!("test-venv.partial-{pid}.log"));
    let _ = fs::remove_dir_all(&partial);
    let _ = fs::remove_file(&log);
    let started = Instant::now();
    say(&format!(
        "creating the test virtualenv {} (pip install {}; log {})",
        dir.display(),
        REQUIREMENTS.join(" "),
        log.display()
    ));
    if let Err(e) = build(&partial, &log) {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    // Into place. Another process may have put a complete one there
    // first (use it), or an older one may be in the way (replace it).
    for _ in 0..3 {
        match fs::rename(&partial, dir) {
            Ok(()) => break,
            Err(_) if complete(dir) => {
                let _ = fs::remove_dir_all(&partial);
                break;
            }
            Err(e) if dir.exists() => {
                let stale = parent.join(format!("test-venv.stale-{pid}"));
                if fs::rename(dir, &stale).is_ok() {
                    let _ = fs::remove_dir_all(&stale);
                } else if !dir.exists() {
                    continue;
                } else {
                    let _ = fs::remove_dir_all(&partial);
                    return Err(format!(
                        "cannot replace the incomplete {} with {}: {e}",
                        dir.display(),
                        partial.display()
                    ));
                }
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                return Err(format!(
                    "cannot rename {} to {}: {e}",
                    partial.display(),
                    dir.display()
                ));
            }
        }
    }
    if !complete(dir) {
        let _ = fs::remove_dir_all(&partial);
        return Err(format!("{} is still incomplete", dir.display()));
    }
    let _ = fs::remove_file(&log);
    say(&format!(
        "created the test virtualenv {} in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(python)
}

/// `python3 -m venv DIR`, `pip install`, an import check, then the marker.
fn build(dir: &Path, log: &Path) -> Result<(), String> {
    let mut venv = Command::new("python3");
    venv.arg("-m").arg("venv").arg(dir);
    run_logged(venv, log).map_err(|e| format!("`python3 -m venv {}`: {e}", dir.display()))?;
    let python = dir.join("bin").join("python");
    let mut pip = Command::new(&python);
    // Few retries and a short socket timeout: without a reachable package
    // index, say so within a minute rather than after pip's backoff.
    pip.args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(["--no-input", "--retries", "2", "--timeout", "30"])
        .args(REQUIREMENTS);
    run_logged(pip, log).map_err(|e| format!("`pip install {}`: {e}", REQUIREMENTS.join(" ")))?;
    let mut probe = Command::new(&python);
    probe.args(["-c", "import numpy, pydantic"]);
    run_logged(probe, log).map_err(|e| format!("numpy or pydantic does not import: {e}"))?;
    fs::write(dir.join(MARKER), marker_text())
        .map_err(|e| format!("cannot write {}: {e}", dir.join(MARKER).display()))
}

/// Removes `test-venv.partial-PID` directories (and their logs) of
/// processes that are gone (killed while building), where `/proc` says.
fn remove_abandoned(parent: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("test-venv.partial-"))
            .map(|rest| rest.trim_end_matches(".log"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path);
            let _ = fs::remove_file(&path);
        }
    }
}

/// Runs `command` with stdout and stderr appended to `log`, killed after
/// [`INSTALL_TIMEOUT`]; `Err` has the exit status and the log's end.
fn run_logged(mut command: Command, log: &Path) -> Result<(), String> {
    let open = || {
        File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let deadline = Instant::now() + INSTALL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no result within {INSTALL_TIMEOUT:?}: {}",
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
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("ERROR"))
        .collect();
    let chosen = if errors.is_empty() { &lines } else { &errors };
    chosen[chosen.len().saturating_sub(4)..].join(" | ")
}
