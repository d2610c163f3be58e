//! The JSON shapes of SPEC §5 that come from lower crates' types, as the
//! server's own types.
//!
//! The registry and the loader keep their types free of HTTP and OpenAPI;
//! the server converts them here (`From`) and derives [`ToSchema`] on the
//! result, so the OpenAPI document describes exactly what the handlers
//! serialise. The component names stay `PluginStatus`, `PluginState`,
//! `JournalEntry` and `ToolInfo`. The reload reports ([`ReloadReport`],
//! [`ReloadOutcome`], [`RemovedPlugin`]) live here too: the admin routes
//! ([`crate::reload`]) answer them and every rescan ([`crate::rescan`])
//! logs and publishes them.
//!
//! This module is a leaf: it depends on the lower crates only.

use std::collections::BTreeMap;

use forgesyte_loader::{PluginLoadOutcome, RescanReport, RetiredPlugin, ToolInfo};
use forgesyte_registry::{
    JournalEntry, PluginLifecycleState, PluginStatus, SignatureInfo, SignatureState,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A plugin's lifecycle state (SPEC §4), as its upper-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
#[schema(as = PluginState)]
pub enum PluginStateJson {
    /// Manifest read and registered; no instance yet.
    Loaded,
    /// Instance created; ready for tool calls.
    Initialized,
    /// At least one tool call in flight.
    Running,
    /// Import, init or a run-time fault (see `reason`).
    Failed,
    /// A dependency is missing (see `reason`).
    Unavailable,
}

impl From<PluginLifecycleState> for PluginStateJson {
    fn from(state: PluginLifecycleState) -> Self {
        match state {
            PluginLifecycleState::Loaded => PluginStateJson::Loaded,
            PluginLifecycleState::Initialized => PluginStateJson::Initialized,
            PluginLifecycleState::Running => PluginStateJson::Running,
            PluginLifecycleState::Failed => PluginStateJson::Failed,
            PluginLifecycleState::Unavailable => PluginStateJson::Unavailable,
        }
    }
}

/// The status object of SPEC §5. Every field is always present, `null`
/// where unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = PluginStatus)]
pub struct PluginStatusJson {
    /// Registry key.
    pub name: String,
    /// Lifecycle state.
    pub state: PluginStateJson,
    /// Description from the manifest.
    #[schema(required = true)]
    pub description: Option<String>,
    /// Why the plugin is FAILED or UNAVAILABLE (`ImportError: …`,
    /// `InitError: …`, `Missing dependencies: …`); null otherwise.
    #[schema(required = true)]
    pub reason: Option<String>,
    /// Version from the manifest (`unknown` when it has none).
    #[schema(required = true)]
    pub version: Option<String>,
    /// Seconds since the plugin was registered.
    #[schema(required = true)]
    pub uptime_seconds: Option<f64>,
    /// When a tool call last ran (RFC 3339, UTC).
    #[schema(required = true, format = DateTime)]
    pub last_used: Option<String>,
    /// Tool calls that succeeded.
    pub success_count: u64,
    /// Tool calls that returned an error or faulted.
    pub error_count: u64,
    /// Duration of the most recent call, in milliseconds.
    #[schema(required = true)]
    pub last_execution_time_ms: Option<f64>,
    /// Mean duration of the last 10 calls, in milliseconds.
    #[schema(required = true)]
    pub avg_execution_time_ms: Option<f64>,
    /// Tool calls in flight right now.
    pub in_flight: u32,
    /// How many times the supervisor restarted the plugin's process (0 for
    /// in-process plugins).
    pub restart_count: u64,
    /// How the plugin's process last ended (`killed by signal SIGSEGV
    /// (11)`, `exited with code 3`, ...); kept after a restart.
    #[schema(required = true)]
    pub last_exit_reason: Option<String>,
    /// When the supervisor will restart the plugin (RFC 3339, UTC); null
    /// when no restart is scheduled.
    #[schema(required = true, format = DateTime)]
    pub next_retry_at: Option<String>,
    /// The sandbox of the plugin's runner, part by part: `filesystem`,
    /// `network` and `env`, each what is enforced or `unconfined: why`;
    /// null for a plugin that runs unconfined (in-process, or with
    /// `--confine off`).
    #[schema(required = true)]
    pub confinement: Option<BTreeMap<String, String>>,
    /// The plugin's signature; null when it was not checked (a bad
    /// manifest).
    #[schema(required = true)]
    pub signature: Option<SignatureJson>,
}

/// What the host found of a plugin's signature (`forgesyte sign`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = Signature)]
pub struct SignatureJson {
    /// `signed` (by a trusted key, every loaded file as signed),
    /// `unsigned` (no signature files), `modified` (the signature
    /// verifies but a file changed or is not listed) or `invalid` (bad
    /// signature or list, or an untrusted key).
    pub status: SignatureStateJson,
    /// The signing key's id (16 hex digits, as minisign prints it).
    #[schema(required = true)]
    pub key_id: Option<String>,
    /// What is wrong or missing: the file, key or signature.
    #[schema(required = true)]
    pub detail: Option<String>,
}

/// A signature status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = SignatureState)]
pub enum SignatureStateJson {
    /// Signed by a trusted key; every file the plugin loads as signed.
    Signed,
    /// No signature files.
    Unsigned,
    /// The signature verifies, but a file changed or is not listed.
    Modified,
    /// Bad signature or list, or a key that is not trusted.
    Invalid,
}

impl From<SignatureInfo> for SignatureJson {
    fn from(s: SignatureInfo) -> Self {
        SignatureJson {
            status: match s.status {
                SignatureState::Signed => SignatureStateJson::Signed,
                SignatureState::Unsigned => SignatureStateJson::Unsigned,
                SignatureState::Modified => SignatureStateJson::Modified,
                SignatureState::Invalid => SignatureStateJson::Invalid,
            },
            key_id: s.key_id,
            detail: s.detail,
        }
    }
}

impl From<PluginStatus> for PluginStatusJson {
    fn from(s: PluginStatus) -> Self {
        PluginStatusJson {
            name: s.name,
            state: s.state.into(),
            description: s.description,
            reason: s.reason,
            version: s.version,
            uptime_seconds: s.uptime_seconds,
            last_used: s.last_used,
            success_count: s.success_count,
            error_count: s.error_count,
            last_execution_time_ms: s.last_execution_time_ms,
            avg_execution_time_ms: s.avg_execution_time_ms,
            in_flight: s.in_flight,
            restart_count: s.restart_count,
            last_exit_reason: s.last_exit_reason,
            next_retry_at: s.next_retry_at,
            confinement: s.confinement,
            signature: s.signature.map(SignatureJson::from),
        }
    }
}

impl From<&PluginStatus> for PluginStatusJson {
    fn from(s: &PluginStatus) -> Self {
        s.clone().into()
    }
}

/// One entry of a plugin's failure journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = JournalEntry)]
pub struct JournalEntryJson {
    /// When it happened (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub at: String,
    /// The state entered (`FAILED`, `UNAVAILABLE`, or `LOADED` for a
    /// supervisor restart).
    pub state: PluginStateJson,
    /// The reason given with the move.
    #[schema(required = true)]
    pub reason: Option<String>,
    /// The signal that ended the plugin's process, by name (`SIGSEGV`).
    #[schema(required = true)]
    pub exit_signal: Option<String>,
    /// The exit code of the plugin's process, when it exited on its own.
    #[schema(required = true)]
    pub exit_code: Option<i32>,
    /// The last lines the plugin's process wrote to stderr.
    pub stderr_tail: Vec<String>,
}

impl From<JournalEntry> for JournalEntryJson {
    fn from(e: JournalEntry) -> Self {
        JournalEntryJson {
            at: e.at,
            state: e.state.into(),
            reason: e.reason,
            exit_signal: e.exit_signal,
            exit_code: e.exit_code,
            stderr_tail: e.stderr_tail,
        }
    }
}

impl From<&JournalEntry> for JournalEntryJson {
    fn from(e: &JournalEntry) -> Self {
        e.clone().into()
    }
}

/// A tool as the loaded plugin describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = ToolInfo)]
pub struct ToolInfoJson {
    /// Tool id, as used in the run route.
    pub id: String,
    /// Short human title.
    pub title: String,
    /// What the tool does.
    pub description: String,
    /// JSON schema of the arguments.
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// JSON schema of the result.
    #[schema(value_type = Object)]
    pub output_schema: Value,
}

impl From<&ToolInfo> for ToolInfoJson {
    fn from(t: &ToolInfo) -> Self {
        ToolInfoJson {
            id: t.id.clone(),
            title: t.title.clone(),
            description: t.description.clone(),
            input_schema: t.input_schema.clone(),
            output_schema: t.output_schema.clone(),
        }
    }
}

/// What reloading one plugin led to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReloadOutcome {
    /// The plugin's registry key.
    pub name: String,
    /// Its plugin directory.
    pub dir: String,
    /// Its state after the reload.
    pub state: PluginStateJson,
    /// Why it is FAILED or UNAVAILABLE; null otherwise.
    #[schema(required = true)]
    pub reason: Option<String>,
    /// How long its reload took, in milliseconds.
    pub elapsed_ms: f64,
}

impl From<PluginLoadOutcome> for ReloadOutcome {
    fn from(o: PluginLoadOutcome) -> Self {
        ReloadOutcome {
            name: o.name,
            dir: o.dir.display().to_string(),
            state: o.state.into(),
            reason: o.reason,
            elapsed_ms: o.elapsed_ms,
        }
    }
}

/// A plugin retired by a rescan: its directory (or entry point) is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RemovedPlugin {
    /// Its registry key (now unknown: 404).
    pub name: String,
    /// Its plugin directory.
    pub dir: String,
    /// Calls that were in flight when it was retired (they were waited for).
    pub calls_in_flight: u32,
    /// Calls still in flight when the wait (their time limit and a second)
    /// gave up: an isolated or Python plugin's ended with its process (they
    /// failed); an in-process plugin's ran on, recorded nowhere.
    pub calls_cut_off: u32,
    /// How long its retirement took, in milliseconds.
    pub elapsed_ms: f64,
}

impl From<RetiredPlugin> for RemovedPlugin {
    fn from(r: RetiredPlugin) -> Self {
        RemovedPlugin {
            name: r.name,
            dir: r.dir.display().to_string(),
            calls_in_flight: r.calls_in_flight,
            calls_cut_off: r.calls_cut_off,
            elapsed_ms: r.elapsed_ms,
        }
    }
}

/// What a rescan of the plugins directory led to (`POST
/// /v1/plugins/reload`, SIGHUP, `serve --watch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReloadReport {
    /// Every registered plugin's state after the rescan, sorted by name.
    pub plugins: Vec<ReloadOutcome>,
    /// Plugins available after the rescan.
    pub loaded: usize,
    /// Plugins FAILED after the rescan.
    pub failed: usize,
    /// Plugins UNAVAILABLE after the rescan.
    pub unavailable: usize,
    /// Plugins found for the first time (loaded through the load pass).
    #[serde(default)]
    pub added: Vec<String>,
    /// Plugins whose files changed, reloaded (isolated and Python ones
    /// restarted, in-process ones opened under a new file identity).
    #[serde(default)]
    pub changed: Vec<String>,
    /// Unchanged plugins that were FAILED or UNAVAILABLE, retried.
    #[serde(default)]
    pub retried: Vec<String>,
    /// Unchanged plugins, left as they were.
    #[serde(default)]
    pub unchanged: Vec<String>,
    /// Plugins whose directory is gone, retired after their calls in flight.
    #[serde(default)]
    pub removed: Vec<RemovedPlugin>,
    /// Wall time of the whole rescan, in milliseconds.
    pub elapsed_ms: f64,
    /// What the rescan could not do, when something: the plugins directory
    /// could not be listed (out of descriptors, gone, no permission), so
    /// nothing in it was looked at; the installed plugins could not be
    /// listed (`--python-entry-points`: the interpreter failed). Absent
    /// when all went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// [`ReloadReport::warning`] of a rescan that could not list the plugins
/// directory.
const UNLISTED: &str = "the plugins directory could not be listed (the log says why): nothing \
                        in it was looked at, so no plugin of it was added, changed, retried or \
                        removed (installed plugins, with --python-entry-points, were looked at)";

impl From<RescanReport> for ReloadReport {
    fn from(rescan: RescanReport) -> Self {
        let all = rescan.plugins();
        let (loaded, failed, unavailable) = (all.loaded(), all.failed(), all.unavailable());
        let names = |list: &[forgesyte_loader::PluginLoadOutcome]| -> Vec<String> {
            list.iter().map(|o| o.name.clone()).collect()
        };
        ReloadReport {
            added: names(&rescan.added),
            changed: names(&rescan.changed),
            retried: names(&rescan.retried),
            unchanged: names(&rescan.unchanged),
            removed: rescan
                .removed
                .into_iter()
                .map(RemovedPlugin::from)
                .collect(),
            plugins: all.plugins.into_iter().map(ReloadOutcome::from).collect(),
            loaded,
            failed,
            unavailable,
            elapsed_ms: rescan.elapsed_ms,
            warning: rescan.unlisted.then(|| UNLISTED.to_owned()),
        }
    }
}

impl ReloadReport {
    /// The report of a reload of one plugin (first), with the others it
    /// loaded again.
    pub(crate) fn of(outcomes: &[ReloadOutcome]) -> ReloadReport {
        let count = |states: &[PluginStateJson]| {
            outcomes
                .iter()
                .filter(|o| states.contains(&o.state))
                .count()
        };
        ReloadReport {
            loaded: count(&[PluginStateJson::Initialized, PluginStateJson::Running]),
            failed: count(&[PluginStateJson::Failed]),
            unavailable: count(&[PluginStateJson::Unavailable]),
            elapsed_ms: outcomes.iter().map(|o| o.elapsed_ms).fold(0.0, f64::max),
            changed: outcomes.iter().map(|o| o.name.clone()).collect(),
            added: Vec::new(),
            retried: Vec::new(),
            unchanged: Vec::new(),
            removed: Vec::new(),
            plugins: outcomes.to_vec(),
            warning: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use forgesyte_registry::{ExitInfo, PluginInfo, Registry};

    use super::*;

    fn keys(value: &Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    /// The wire types serialise exactly what the lower crates' own types
    /// do (their serde forms were the API before these types existed).
    #[test]
    fn wire_types_serialise_as_the_lower_crates_types() {
        let registry = Registry::new();
        registry
            .register(
                "p",
                PluginInfo {
                    description: Some("d".into()),
                    version: Some("1.0".into()),
                    ..PluginInfo::default()
                },
            )
            .unwrap();
        registry
            .mark_crashed(
                "p",
                "CrashError: killed by signal SIGSEGV",
                ExitInfo {
                    description: Some("killed by signal SIGSEGV (11)".into()),
                    signal: Some("SIGSEGV".into()),
                    code: None,
                    stderr_tail: vec!["segfault here".into()],
                },
            )
            .unwrap();
        registry
            .set_signature(
                "p",
                Some(forgesyte_registry::SignatureInfo {
                    status: SignatureState::Modified,
                    key_id: Some("0123456789ABCDEF".into()),
                    detail: Some("libp.so changed after signing".into()),
                }),
            )
            .unwrap();
        let (status, journal) = registry.status_with_journal("p").unwrap();
        assert!(!journal.is_empty());
        let real = serde_json::to_value(&status).unwrap();
        let wire = serde_json::to_value(PluginStatusJson::from(&status)).unwrap();
        assert_eq!(wire, real);
        assert_eq!(wire["state"], "FAILED");
        assert_eq!(wire["signature"]["status"], "modified");
        for entry in &journal {
            let real = serde_json::to_value(entry).unwrap();
            let wire = serde_json::to_value(JournalEntryJson::from(entry)).unwrap();
            assert_eq!(wire, real);
            assert_eq!(keys(&wire).len(), 6);
        }
        let tool = ToolInfo {
            id: "t".into(),
            title: "T".into(),
            description: "does t".into(),
            input_schema: serde_json::json!({"type": "object"}),
            output_schema: Value::Null,
        };
        assert_eq!(
            serde_json::to_value(ToolInfoJson::from(&tool)).unwrap(),
            serde_json::to_value(&tool).unwrap()
        );
    }

    #[test]
    fn every_state_has_its_upper_case_name() {
        for state in PluginLifecycleState::ALL {
            let wire = serde_json::to_value(PluginStateJson::from(state)).unwrap();
            assert_eq!(wire, serde_json::to_value(state).unwrap());
            assert_eq!(wire, state.as_str());
        }
    }

    #[test]
    fn a_reload_report_counts_the_named_plugin_and_those_reloaded_with_it() {
        let outcome = |name: &str, state, elapsed_ms| ReloadOutcome {
            name: name.into(),
            dir: format!("/plugins/{name}"),
            state,
            reason: None,
            elapsed_ms,
        };
        let outcomes = [
            outcome("named", PluginStateJson::Initialized, 3.0),
            outcome("signed-too", PluginStateJson::Failed, 7.0),
            outcome("busy", PluginStateJson::Running, 1.0),
        ];
        let report = ReloadReport::of(&outcomes);
        assert_eq!(
            (report.loaded, report.failed, report.unavailable),
            (2, 1, 0)
        );
        assert_eq!(report.changed, ["named", "signed-too", "busy"]);
        assert_eq!(report.plugins, outcomes);
        assert_eq!(report.elapsed_ms, 7.0);
    }
}
