//! `forgesyte check`: load a plugins directory as `serve` would, without
//! serving, and report every plugin's state.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use forgesyte_loader::Loader;
use forgesyte_registry::{PluginLifecycleState, PluginStatus, SignatureState};

use crate::config::ServerConfig;
use crate::server::build_loader_from;
use crate::wire::PluginStatusJson;

/// The widest a column of [`CheckReport::to_text`] is padded to.
const MAX_COLUMN: usize = 40;

/// Why `check` could not run at all (a usage error: exit code 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The plugins directory is missing or not a directory.
    #[error("plugins directory '{}' does not exist or is not a directory", path.display())]
    NotADirectory {
        /// The directory given.
        path: PathBuf,
    },
    /// The directory given is a plugin's own (it holds a manifest), not a
    /// directory of plugins: nothing in it would load.
    #[error(
        "'{}' is a plugin directory (it holds manifest.json), not a directory of plugins: give the \
         directory that holds it{}",
        path.display(),
        path.parent().filter(|p| !p.as_os_str().is_empty()).map(|p| format!(" ('{}')", p.display())).unwrap_or_default()
    )]
    PluginDirectory {
        /// The directory given.
        path: PathBuf,
    },
    /// The plugins directory cannot be listed (no permission to read it):
    /// a check that found no plugin there would pass a directory `serve`
    /// never gets ready on.
    #[error("plugins directory '{}' cannot be listed: {source}", path.display())]
    Unreadable {
        /// The directory given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl CheckError {
    /// The error of a plugins directory `dir` that cannot be checked, if any.
    pub fn of_dir(dir: &Path) -> Option<CheckError> {
        if !dir.is_dir() {
            return Some(CheckError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        if let Some(e) = CheckError::plugin_directory(dir) {
            return Some(e);
        }
        std::fs::read_dir(dir)
            .err()
            .map(|source| CheckError::Unreadable {
                path: dir.to_path_buf(),
                source,
            })
    }
}

impl CheckError {
    /// [`CheckError::PluginDirectory`] when `dir` holds a plugin manifest
    /// and either a plugin's code or no subdirectory with a manifest: a
    /// plugin's own directory. One whose subdirectories hold plugins, with
    /// no code beside its manifest, is a directory of plugins with a stray
    /// manifest ([`stray_manifest`]): refused, one file took every plugin
    /// down.
    pub fn plugin_directory(dir: &Path) -> Option<CheckError> {
        (dir.join(forgesyte_loader::manifest::MANIFEST_FILE)
            .is_file()
            && (holds_plugin_code(dir) || !holds_plugins(dir)))
        .then(|| CheckError::PluginDirectory {
            path: dir.to_path_buf(),
        })
    }
}

/// Whether `dir` holds a plugin's code or package beside its manifest
/// (`plugin.py`, a `*.so` library, `pyproject.toml`, `setup.py`): a
/// plugin's own directory, whatever its subdirectories hold (a package's
/// module directory ships a `manifest.json` of its own).
fn holds_plugin_code(dir: &Path) -> bool {
    ["plugin.py", "pyproject.toml", "setup.py"]
        .iter()
        .any(|file| dir.join(file).is_file())
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.take(100_000).flatten().any(|entry| {
                let path = entry.path();
                path.extension().is_some_and(|ext| ext == "so") && path.is_file()
            })
        })
}

/// Whether a subdirectory of `dir` holds a plugin manifest (the first
/// 100,000 entries looked at).
fn holds_plugins(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.take(100_000).flatten().any(|entry| {
            entry
                .path()
                .join(forgesyte_loader::manifest::MANIFEST_FILE)
                .is_file()
        })
    })
}

/// What `serve` and `check` say of a plugins directory `dir` that holds a
/// `manifest.json` of its own beside its plugins: it is no plugin's, and
/// is not read.
pub fn stray_manifest(dir: &Path) -> Option<String> {
    let manifest = dir.join(forgesyte_loader::manifest::MANIFEST_FILE);
    manifest.is_file().then(|| {
        format!(
            "{} is not read: the plugins are {}'s subdirectories, and a manifest beside them is \
             no plugin's",
            manifest.display(),
            dir.display()
        )
    })
}

/// What a check found: every plugin's status after one load pass, sorted by
/// name (the array `GET /v1/plugins` would answer).
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Every plugin found, sorted by name.
    pub plugins: Vec<PluginStatus>,
    /// Wall time of the load pass, in milliseconds.
    pub elapsed_ms: f64,
    /// What each FAILED plugin's failure left, by name: a Python
    /// traceback's last lines, a crashed runner's last stderr lines (its
    /// journal's last entry). Shown under its line.
    pub details: std::collections::BTreeMap<String, Vec<String>>,
    /// What the load said of each plugin's manifest, by name (likely typos
    /// of fields, fields given twice, fields the host does not use:
    /// [`Loader::manifest_notes`]), which `serve` logs at WARN and
    /// `check` logs nowhere. Shown under its line.
    pub notes: std::collections::BTreeMap<String, Vec<String>>,
}

impl CheckReport {
    /// Loads `dir` with `loader` (the seam for tests) and reads the result.
    pub fn from_loader(loader: &Loader, dir: &Path) -> CheckReport {
        let report = loader.load_all(dir);
        let registry = loader.registry();
        let plugins = registry.list_all();
        let details = plugins
            .iter()
            .filter(|p| p.state == PluginLifecycleState::Failed)
            .filter_map(|p| {
                let last = registry.journal(&p.name)?.pop()?;
                (!last.stderr_tail.is_empty()).then(|| (p.name.clone(), last.stderr_tail))
            })
            .collect();
        let notes = plugins
            .iter()
            .map(|p| (p.name.clone(), loader.manifest_notes(&p.name)))
            .filter(|(_, notes)| !notes.is_empty())
            .collect();
        CheckReport {
            plugins,
            elapsed_ms: report.elapsed_ms,
            details,
            notes,
        }
    }

    /// Whether every plugin can take tool calls.
    pub fn all_available(&self) -> bool {
        self.plugins.iter().all(|p| p.state.is_available())
    }

    /// The process exit code: 0 when every plugin is available, else 1.
    pub fn exit_code(&self) -> u8 {
        if self.all_available() { 0 } else { 1 }
    }

    fn count(&self, state: PluginLifecycleState) -> usize {
        self.plugins.iter().filter(|p| p.state == state).count()
    }

    /// One line per plugin (`name  STATE  version  reason`, aligned), each
    /// FAILED one's details under it (`    | `) and each plugin's manifest
    /// notes (`    note: `), then a summary line.
    ///
    /// A column is as wide as its longest value up to 40
    /// characters (a longer value overflows it: a manifest's version may be
    /// any string, and a padding width past 65,535 made `format!` panic).
    /// Names and versions are escaped as reasons are: no control character
    /// of a manifest or a directory's name reaches the terminal.
    pub fn to_text(&self) -> String {
        let version = |p: &PluginStatus| match &p.version {
            Some(v) => crate::controls::Escaped(v).to_string(),
            None => "-".into(),
        };
        let width =
            |values: &mut dyn Iterator<Item = usize>| values.max().unwrap_or(0).min(MAX_COLUMN);
        let name = |p: &PluginStatus| crate::controls::Escaped(&p.name).to_string();
        let name_w = width(&mut self.plugins.iter().map(|p| name(p).chars().count()));
        let version_w = width(&mut self.plugins.iter().map(|p| version(p).chars().count()));
        let state_w = "INITIALIZED".len().max("UNAVAILABLE".len());
        let mut out = String::new();
        for p in &self.plugins {
            // A loaded plugin's signature that is modified or invalid is
            // said on its line too: only `--json` showed it.
            let note = match (&p.reason, &p.signature) {
                (Some(reason), _) => reason.clone(),
                (None, Some(s))
                    if matches!(s.status, SignatureState::Modified | SignatureState::Invalid) =>
                {
                    format!(
                        "signature {}: {}",
                        s.status.as_str(),
                        s.detail.as_deref().unwrap_or("no detail")
                    )
                }
                _ => String::new(),
            };
            let line = format!(
                "{:name_w$}  {:state_w$}  {:version_w$}  {}",
                name(p),
                p.state.as_str(),
                version(p),
                crate::controls::Escaped(&note)
            );
            let _ = writeln!(out, "{}", line.trim_end());
            // A traceback's lines (the file and line that raised), which
            // only the server's log showed.
            for detail in self.details.get(&p.name).into_iter().flatten() {
                let _ = writeln!(out, "    | {}", crate::controls::Escaped(detail));
            }
            for note in self.notes.get(&p.name).into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "    note: its manifest's {}",
                    crate::controls::Escaped(note)
                );
            }
        }
        let loaded = self
            .plugins
            .iter()
            .filter(|p| p.state.is_available())
            .count();
        let _ = writeln!(
            out,
            "{} plugin{}: {} loaded, {} failed, {} unavailable ({:.1} ms)",
            self.plugins.len(),
            if self.plugins.len() == 1 { "" } else { "s" },
            loaded,
            self.count(PluginLifecycleState::Failed),
            self.count(PluginLifecycleState::Unavailable),
            self.elapsed_ms
        );
        out
    }

    /// The JSON array of status objects, as `GET /v1/plugins` answers it.
    pub fn to_json(&self) -> String {
        let statuses: Vec<PluginStatusJson> =
            self.plugins.iter().map(PluginStatusJson::from).collect();
        serde_json::to_string_pretty(&statuses).unwrap_or_else(|_| "[]".into())
    }
}

/// Loads `dir` over the real filesystem and libraries with the loader
/// settings of `config` (library search path, preflight, isolation, runner;
/// see [`ServerConfig::loader_config`]), exactly as `forgesyte serve` would.
///
/// # Errors
///
/// [`CheckError::NotADirectory`] when `dir` is not a directory,
/// [`CheckError::Unreadable`] when it cannot be listed.
pub fn check(dir: &Path, config: &ServerConfig) -> Result<CheckReport, CheckError> {
    if let Some(e) = CheckError::of_dir(dir) {
        return Err(e);
    }
    let loader = build_loader_from(config);
    Ok(CheckReport::from_loader(&loader, dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgesyte_registry::{PluginInfo, Registry};

    fn report() -> CheckReport {
        let registry = Registry::new();
        for name in ["good", "broken", "nogpu"] {
            registry
                .register(
                    name,
                    PluginInfo {
                        version: Some("1.2.0".into()),
                        ..PluginInfo::default()
                    },
                )
                .unwrap();
        }
        registry.mark_initialized("good").unwrap();
        registry
            .mark_failed("broken", "ImportError: no such file")
            .unwrap();
        registry
            .mark_unavailable("nogpu", "Missing dependencies: gpu")
            .unwrap();
        CheckReport {
            plugins: registry.list_all(),
            elapsed_ms: 1.0,
            details: std::collections::BTreeMap::new(),
            notes: std::collections::BTreeMap::new(),
        }
    }

    /// A FAILED plugin's traceback is under its line, escaped, each line
    /// marked: the file and line that raised, which only the server's log
    /// showed.
    #[test]
    fn a_failed_plugin_s_traceback_is_under_its_line() {
        let mut report = report();
        report.details.insert(
            "broken".into(),
            vec![
                "  File \"plugin.py\", line 32, in __init__".into(),
                "AttributeError: no helo\x1b[2J".into(),
            ],
        );
        let text = report.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[1], "    |   File \"plugin.py\", line 32, in __init__");
        assert_eq!(lines[2], "    | AttributeError: no helo\\u{1b}[2J");
        assert!(lines[3].starts_with("good "), "{text}");
    }

    #[test]
    fn a_loaded_plugin_s_modified_signature_is_on_its_line() {
        let mut report = report();
        report.plugins[1].signature = Some(forgesyte_registry::SignatureInfo {
            status: SignatureState::Modified,
            key_id: Some("ABCD".into()),
            detail: Some("plugin.py changed after signing".into()),
        });
        let text = report.to_text();
        assert_eq!(
            text.lines().nth(1),
            Some("good    INITIALIZED  1.2.0  signature modified: plugin.py changed after signing"),
            "{text}"
        );
    }

    #[test]
    fn text_has_one_line_per_plugin_and_a_summary() {
        let text = report().to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[0],
            "broken  FAILED       1.2.0  ImportError: no such file"
        );
        assert_eq!(lines[1], "good    INITIALIZED  1.2.0");
        assert_eq!(
            lines[2],
            "nogpu   UNAVAILABLE  1.2.0  Missing dependencies: gpu"
        );
        assert_eq!(
            lines[3],
            "3 plugins: 1 loaded, 1 failed, 1 unavailable (1.0 ms)"
        );
    }

    /// A reason a plugin wrote (an exception's message) stays on its
    /// plugin's line, and cannot drive the terminal.
    #[test]
    fn a_reason_with_control_characters_stays_on_its_line() {
        let mut report = report();
        report.plugins[0].reason = Some("x\nforged  INITIALIZED  1.0\x1b[2J".into());
        let text = report.to_text();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(
            text.lines()
                .next()
                .is_some_and(|l| l.ends_with("x\\nforged  INITIALIZED  1.0\\u{1b}[2J")),
            "{text}"
        );
    }

    /// A version of any length (a width past 65,535 made `format!` panic
    /// and `check` lost its whole report) or with control characters.
    #[test]
    fn a_huge_or_forged_version_keeps_the_report_whole() {
        let mut report = report();
        report.plugins[0].version = Some("x".repeat(100_000));
        report.plugins[1].version = Some("1.0\n✗ Plugin FAILED: ok\x1b[31m".into());
        let text = report.to_text();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.contains(&"x".repeat(100_000)));
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.contains("1.0\\n✗ Plugin FAILED: ok\\u{1b}[31m")),
            "{text}"
        );
        // The other columns stay aligned to at most 40 characters.
        assert!(
            text.lines()
                .nth(2)
                .is_some_and(|l| l.starts_with("nogpu   UNAVAILABLE  "))
        );
    }

    #[test]
    fn exit_code_is_zero_only_when_all_are_available() {
        let mut report = report();
        assert_eq!(report.exit_code(), 1);
        report.plugins.retain(|p| p.name == "good");
        assert_eq!(report.exit_code(), 0);
        report.plugins.clear();
        assert_eq!(
            report.exit_code(),
            0,
            "nothing to fix in an empty directory"
        );
    }

    #[test]
    fn json_is_the_status_array() {
        let json: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        let names: Vec<&str> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["broken", "good", "nogpu"]);
        assert_eq!(json[0]["state"], "FAILED");
    }

    #[test]
    fn a_missing_directory_is_a_usage_error() {
        let err = check(
            Path::new("/nonexistent/forgesyte/plugins"),
            &ServerConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
