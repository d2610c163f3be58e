//! The OpenAPI document, generated from the handlers' annotations
//! (`utoipa`), so it cannot drift from the routes.
//!
//! Types of lower crates (the registry's status object, the loader's tool
//! description) are described by mirror structs here; unit tests compare
//! each mirror's properties with what the real type serialises to.

use std::sync::OnceLock;

use axum::body::Bytes;
use utoipa::{OpenApi, ToSchema};

use crate::api::{self, HealthResponse};
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
        api::openapi_json,
        api::docs_page,
    ),
    components(schemas(
        HealthResponse,
        PluginStatusSchema,
        PluginStateSchema,
        ToolInfoSchema,
        ErrorDetail,
        RunRequest,
        RunSuccess,
        RunFailure,
    )),
    tags(
        (name = "plugins", description = "Plugin status and manifests"),
        (name = "tools", description = "Running plugin tools"),
        (name = "server", description = "The server itself"),
    )
)]
struct ApiDoc;

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
            "/openapi.json",
            "/docs",
        ]);
        assert_eq!(paths, expected);
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
