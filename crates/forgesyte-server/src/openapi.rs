//! The OpenAPI document, generated from the handlers' annotations
//! (`utoipa`), so it cannot drift from the routes.
//!
//! Types of lower crates (the registry's status object, the loader's tool
//! description) are described by mirror structs here; unit tests compare
//! each mirror's properties with what the real type serialises to.

use std::sync::OnceLock;

use axum::body::Bytes;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::api::{self, HealthResponse};
use crate::probes::{self, LiveResponse, ReadyCheck, ReadyResponse};
use crate::reload::{self, ReloadOutcome, ReloadReport};
use crate::tools::{RunFailure, RunRequest, RunSuccess};

/// A plugin's lifecycle state (SPEC §4).
#[derive(ToSchema)]
#[schema(as = PluginState)]
#[allow(dead_code)] // Only its schema is used.
pub(crate) enum PluginStateSchema {
    /// Manifest read and registered; no instance yet.
    #[schema(rename = "LOADED")]
    Loaded,
    /// Instance created; ready for tool calls.
    #[schema(rename = "INITIALIZED")]
    Initialized,
    /// At least one tool call in flight.
    #[schema(rename = "RUNNING")]
    Running,
    /// Import, init or a run-time fault (see `reason`).
    #[schema(rename = "FAILED")]
    Failed,
    /// A dependency is missing (see `reason`).
    #[schema(rename = "UNAVAILABLE")]
    Unavailable,
}

/// The status object of SPEC §5. Every field is always present, `null`
/// where unknown.
#[derive(ToSchema)]
#[schema(as = PluginStatus)]
#[allow(dead_code)] // Only its schema is used.
pub(crate) struct PluginStatusSchema {
    /// Registry key.
    name: String,
    /// Lifecycle state.
    state: PluginStateSchema,
    /// Description from the manifest.
    #[schema(required = true)]
    description: Option<String>,
    /// Why the plugin is FAILED or UNAVAILABLE (`ImportError: …`,
    /// `InitError: …`, `Missing dependencies: …`); null otherwise.
    #[schema(required = true)]
    reason: Option<String>,
    /// Version from the manifest (`unknown` when it has none).
    #[schema(required = true)]
    version: Option<String>,
    /// Seconds since the plugin was registered.
    #[schema(required = true)]
    uptime_seconds: Option<f64>,
    /// When a tool call last ran (RFC 3339, UTC).
    #[schema(required = true, format = DateTime)]
    last_used: Option<String>,
    /// Tool calls that succeeded.
    success_count: u64,
    /// Tool calls that returned an error or faulted.
    error_count: u64,
    /// Duration of the most recent call, in milliseconds.
    #[schema(required = true)]
    last_execution_time_ms: Option<f64>,
    /// Mean duration of the last 10 calls, in milliseconds.
    #[schema(required = true)]
    avg_execution_time_ms: Option<f64>,
    /// Tool calls in flight right now.
    in_flight: u32,
    /// How many times the supervisor restarted the plugin's process (0 for
    /// in-process plugins).
    restart_count: u64,
    /// How the plugin's process last ended (`killed by signal SIGSEGV
    /// (11)`, `exited with code 3`, ...); kept after a restart.
    #[schema(required = true)]
    last_exit_reason: Option<String>,
    /// When the supervisor will restart the plugin (RFC 3339, UTC); null
    /// when no restart is scheduled.
    #[schema(required = true, format = DateTime)]
    next_retry_at: Option<String>,
}

/// One entry of a plugin's failure journal.
#[derive(ToSchema)]
#[schema(as = JournalEntry)]
#[allow(dead_code)] // Only its schema is used.
pub(crate) struct JournalEntrySchema {
    /// When it happened (RFC 3339, UTC).
    #[schema(format = DateTime)]
    at: String,
    /// The state entered (`FAILED`, `UNAVAILABLE`, or `LOADED` for a
    /// supervisor restart).
    state: PluginStateSchema,
    /// The reason given with the move.
    #[schema(required = true)]
    reason: Option<String>,
    /// The signal that ended the plugin's process, by name (`SIGSEGV`).
    #[schema(required = true)]
    exit_signal: Option<String>,
    /// The exit code of the plugin's process, when it exited on its own.
    #[schema(required = true)]
    exit_code: Option<i32>,
    /// The last lines the plugin's process wrote to stderr.
    stderr_tail: Vec<String>,
}

/// Answer of the plugin health route: the status object's fields plus the
/// failure journal.
#[derive(ToSchema)]
#[schema(as = PluginHealth)]
#[allow(dead_code)] // Only its schema is used.
pub(crate) struct PluginHealthSchema {
    /// The status object's fields, at the top level.
    #[serde(flatten)]
    status: PluginStatusSchema,
    /// The last moves into FAILED or UNAVAILABLE and the supervisor's
    /// restarts, oldest first.
    journal: Vec<JournalEntrySchema>,
}

/// A tool as the loaded plugin describes it.
#[derive(ToSchema)]
#[schema(as = ToolInfo)]
#[allow(dead_code)] // Only its schema is used.
pub(crate) struct ToolInfoSchema {
    /// Tool id, as used in the run route.
    id: String,
    /// Short human title.
    title: String,
    /// What the tool does.
    description: String,
    /// JSON schema of the arguments.
    #[schema(value_type = Object)]
    input_schema: (),
    /// JSON schema of the result.
    #[schema(value_type = Object)]
    output_schema: (),
}

/// The error body of every route but the tool run (FastAPI's shape).
#[derive(ToSchema)]
#[allow(dead_code)] // Only its schema is used.
pub(crate) struct ErrorDetail {
    /// What went wrong.
    detail: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ForgeSyte plugin host",
        description = "Health, manifests and tool runs of the plugins loaded by `forgesyte serve`. \
                       Errors are `{\"detail\": \"...\"}`; tool-run failures are \
                       `{\"ok\": false, \"error\", \"error_type\", \"detail\"}`. \
                       The health endpoints answer 200 or 404, never 500."
    ),
    paths(
        api::server_health,
        api::list_plugins,
        api::plugin_health,
        api::plugin_manifest,
        api::plugin_tools,
        api::run_tool,
        reload::reload_plugin,
        reload::reload_all,
        probes::livez,
        probes::readyz,
        api::openapi_json,
        api::docs_page,
    ),
    components(schemas(
        HealthResponse,
        LiveResponse,
        ReadyResponse,
        ReadyCheck,
        ReloadOutcome,
        ReloadReport,
        PluginHealthSchema,
        JournalEntrySchema,
        PluginStatusSchema,
        PluginStateSchema,
        ToolInfoSchema,
        ErrorDetail,
        RunRequest,
        RunSuccess,
        RunFailure,
    )),
    modifiers(&AdminTokenScheme),
    tags(
        (name = "plugins", description = "Plugin status and manifests"),
        (name = "tools", description = "Running plugin tools"),
        (name = "admin", description = "Reloading plugins (bearer admin token; disabled when none is configured)"),
        (name = "server", description = "The server itself: health, liveness, readiness, this document"),
    )
)]
struct ApiDoc;

/// Declares the `admin_token` security scheme the admin routes name.
struct AdminTokenScheme;

impl Modify for AdminTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The server's admin token (`FORGESYTE_ADMIN_TOKEN` or `--admin-token-file`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document of the HTTP API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document serialised once.
pub(crate) fn document_json() -> &'static Bytes {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    DOC.get_or_init(|| match openapi().to_pretty_json() {
        Ok(text) => Bytes::from(text),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise the OpenAPI document");
            Bytes::from_static(b"{}")
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use forgesyte_registry::{PluginInfo, PluginLifecycleState, Registry};
    use serde_json::Value;

    use super::*;

    fn doc() -> Value {
        serde_json::from_slice(document_json()).unwrap()
    }

    fn property_names(doc: &Value, schema: &str) -> BTreeSet<String> {
        doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {schema}"))
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn every_route_is_documented() {
        let doc = doc();
        let paths: BTreeSet<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let expected = BTreeSet::from([
            "/v1/health",
            "/v1/plugins",
            "/v1/plugins/{name}/health",
            "/v1/plugins/{name}/manifest",
            "/v1/plugins/{name}/tools",
            "/v1/plugins/{name}/tools/{tool}/run",
            "/v1/plugins/{name}/reload",
            "/v1/plugins/reload",
            "/livez",
            "/readyz",
            "/openapi.json",
            "/docs",
        ]);
        assert_eq!(paths, expected);
        for path in ["/v1/plugins/{name}/reload", "/v1/plugins/reload"] {
            let post = &doc["paths"][path]["post"];
            assert_eq!(
                post["security"],
                serde_json::json!([{"admin_token": []}]),
                "{path}"
            );
            for status in ["200", "401", "403", "409"] {
                assert!(post["responses"][status].is_object(), "{path} {status}");
            }
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["admin_token"]["scheme"],
            "bearer"
        );
        let readyz = &doc["paths"]["/readyz"]["get"]["responses"];
        assert!(readyz["200"].is_object() && readyz["503"].is_object());
        let run = &doc["paths"]["/v1/plugins/{name}/tools/{tool}/run"]["post"];
        let statuses: BTreeSet<&str> = run["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            statuses,
            BTreeSet::from(["200", "400", "404", "413", "422", "502", "503", "504"])
        );
    }

    #[test]
    fn status_schema_matches_the_registry_type() {
        let registry = Registry::new();
        registry.register("p", PluginInfo::default()).unwrap();
        let status = serde_json::to_value(registry.get_status("p").unwrap()).unwrap();
        let real: BTreeSet<String> = status.as_object().unwrap().keys().cloned().collect();
        let doc = doc();
        assert_eq!(property_names(&doc, "PluginStatus"), real);
        let required: BTreeSet<String> = doc["components"]["schemas"]["PluginStatus"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(required, real, "every status field is always present");
        let states: BTreeSet<String> = doc["components"]["schemas"]["PluginState"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let expected: BTreeSet<String> = PluginLifecycleState::ALL
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        assert_eq!(states, expected);
    }

    #[test]
    fn health_schema_is_the_status_plus_the_journal() {
        use forgesyte_registry::ExitInfo;

        let registry = Registry::new();
        registry.register("p", PluginInfo::default()).unwrap();
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
        let snapshot = registry.snapshot();
        let health = crate::api::PluginHealth {
            status: snapshot.get("p").unwrap(),
            journal: snapshot.journal("p").unwrap(),
        };
        let value = serde_json::to_value(&health).unwrap();
        let real: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        let doc = doc();
        // PluginHealth = allOf [PluginStatus, {journal}].
        let parts = doc["components"]["schemas"]["PluginHealth"]["allOf"]
            .as_array()
            .unwrap_or_else(|| panic!("{}", doc["components"]["schemas"]["PluginHealth"]));
        let mut documented = BTreeSet::new();
        for part in parts {
            if let Some(reference) = part["$ref"].as_str() {
                assert_eq!(reference, "#/components/schemas/PluginStatus");
                documented.extend(property_names(&doc, "PluginStatus"));
            } else {
                documented.extend(part["properties"].as_object().unwrap().keys().cloned());
            }
        }
        assert_eq!(documented, real);
        let entry = &value["journal"][0];
        let entry_keys: BTreeSet<String> = entry.as_object().unwrap().keys().cloned().collect();
        assert_eq!(property_names(&doc, "JournalEntry"), entry_keys);
        assert_eq!(entry["exit_signal"], "SIGSEGV");
    }

    #[test]
    fn reload_schemas_match_the_real_answers() {
        let outcome = ReloadOutcome {
            name: "p".into(),
            dir: "/plugins/p".into(),
            state: PluginLifecycleState::Initialized,
            reason: None,
            elapsed_ms: 1.0,
        };
        let report = ReloadReport {
            plugins: vec![outcome.clone()],
            loaded: 1,
            failed: 0,
            unavailable: 0,
            elapsed_ms: 2.0,
        };
        let doc = doc();
        for (schema, value) in [
            ("ReloadOutcome", serde_json::to_value(&outcome).unwrap()),
            ("ReloadReport", serde_json::to_value(&report).unwrap()),
        ] {
            let real: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
            assert_eq!(property_names(&doc, schema), real, "{schema}");
        }
        let ready = ReadyResponse {
            status: "ok".into(),
            detail: Some("d".into()),
            checks: Some(vec![ReadyCheck {
                name: "load-pass".into(),
                ok: true,
                detail: "finished".into(),
            }]),
        };
        let value = serde_json::to_value(&ready).unwrap();
        let real: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        assert_eq!(property_names(&doc, "ReadyResponse"), real);
        let check: BTreeSet<String> = value["checks"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(property_names(&doc, "ReadyCheck"), check);
    }

    #[test]
    fn tool_schema_matches_the_loader_type() {
        let tool = forgesyte_loader::ToolInfo {
            id: "t".into(),
            title: String::new(),
            description: String::new(),
            input_schema: Value::Null,
            output_schema: Value::Null,
        };
        let value = serde_json::to_value(tool).unwrap();
        let real: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        assert_eq!(property_names(&doc(), "ToolInfo"), real);
    }

    #[test]
    fn run_bodies_document_the_spec_fields() {
        let doc = doc();
        let success = property_names(&doc, "RunSuccess");
        for field in [
            "ok",
            "plugin_id",
            "tool_name",
            "result",
            "processing_time_ms",
        ] {
            assert!(success.contains(field), "RunSuccess lacks {field}");
        }
        let failure = property_names(&doc, "RunFailure");
        for field in ["ok", "error", "error_type", "detail"] {
            assert!(failure.contains(field), "RunFailure lacks {field}");
        }
        let health = property_names(&doc, "HealthResponse");
        for field in ["status", "plugins_loaded", "version"] {
            assert!(health.contains(field), "HealthResponse lacks {field}");
        }
    }
}
