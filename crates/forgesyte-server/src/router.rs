//! The router and the OpenAPI document, built from the same
//! registrations.
//!
//! Every route is registered once, in [`routes`], with `utoipa-axum`'s
//! `routes!`: the handler's `#[utoipa::path]` gives both the axum route and
//! its operation in the document, and the schemas come from the types the
//! handlers answer with. [`app`] takes the axum half, [`openapi`] the
//! document half; the document also gets the title, the tags and the
//! `admin_token` security scheme from [`ApiDoc`].
//!
//! This module is the top of the HTTP side: it knows every handler module,
//! and none of them knows it.

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::{Extension, Router};
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::map_request_body::MapRequestBodyLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::docs::{self, Published};
use crate::error::ApiError;
use crate::state::AppState;
use crate::{api, events, metrics, probes, reload, stream, ui};

/// The parts of the document that are not routes: title, tags, security.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ForgeSyte plugin host",
        description = "Health, manifests and tool runs of the plugins loaded by `forgesyte serve`. \
                       Errors are `{\"detail\": \"...\"}`; tool-run failures are \
                       `{\"ok\": false, \"error\", \"error_type\", \"detail\"}`. \
                       The health endpoints answer 200 or 404, never 500."
    ),
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

/// Every route of the API, each with its documentation.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(api::server_health))
        .routes(routes!(api::list_plugins))
        .routes(routes!(api::list_plugins_slash))
        .routes(routes!(api::plugin_health))
        .routes(routes!(api::plugin_manifest))
        .routes(routes!(api::plugin_tools))
        .routes(routes!(api::run_tool))
        .routes(routes!(stream::stream_tool))
        .routes(routes!(reload::reload_plugin))
        .routes(routes!(reload::reload_all))
        .routes(routes!(probes::livez))
        .routes(routes!(probes::readyz))
        .routes(routes!(docs::openapi_json))
        .routes(routes!(docs::docs_page))
        .routes(routes!(events::events))
        .routes(routes!(ui::dashboard_root))
        .routes(routes!(ui::dashboard_ui))
        .routes(routes!(ui::favicon))
        .routes(routes!(metrics::http::scrape))
}

/// The HTTP app over `state`: every route of SPEC §5, the probes
/// (`/livez`, `/readyz`), the admin reload routes, `/openapi.json` and
/// `/docs`, JSON 404 and 405 answers, the request body limit and request
/// tracing.
pub fn app(state: AppState) -> Router {
    let body_limit = state.body_limit();
    let body_pace = state.body_pace();
    let (router, _) = routes().split_for_parts();
    router
        // After the routes: it applies to the routes registered so far.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        // One layer, composed here: each `Router::layer` call wraps every
        // route in one more boxed service (a box and a boxed future per
        // request each); composed, the stack costs one (measured: the
        // six separate layers cost a fifth of a health check).
        .layer(
            tower::ServiceBuilder::new()
                // Outermost first: the id is set (kept when the client sent
                // one that fits) before the request's span opens, so every
                // log line of the request carries it, and copied onto the
                // answer.
                .map_request(drop_unfit_request_id)
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), RequestIds))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_failure(log_failure),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
                // Around the request body as it arrives: an answer that
                // leaves it unread says `Connection: close`.
                .layer(crate::unread::CloseUnreadLayer)
                .layer(MapRequestBodyLayer::new(move |body| {
                    crate::body_pace::PacedBody::new(body, body_pace)
                }))
                .layer(DefaultBodyLimit::max(body_limit))
                .layer(Extension(&PUBLISHED))
                // Innermost, after routing (so it sees the matched route
                // template) for every route and the fallback.
                .layer(metrics::http::TrackLayer::new(state.clone()))
                // Inside it, so a refusal is counted as any answer is.
                .layer(crate::origin::GuardLayer),
        )
        .with_state(state)
}

/// How a 5xx answer is logged. The server's own answers about its plugins
/// and itself (502 and 504 for a plugin's fault, 503 for busy or not
/// ready) are not failures of the server: DEBUG (the metrics count them,
/// and a plugin's fault is logged where it happens). A 500, or an error
/// instead of an answer, is one: ERROR, as tower-http logs every 5xx.
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    let latency_ms = latency.as_secs_f64() * 1000.0;
    match class {
        ServerErrorsFailureClass::StatusCode(code) if code != StatusCode::INTERNAL_SERVER_ERROR => {
            tracing::debug!(status = code.as_u16(), latency_ms, "answered {code}");
        }
        class => tracing::error!(classification = %class, latency_ms, "response failed"),
    }
}

/// A client's request id is kept when it fits
/// ([`forgesyte_loader::fit_request_id`]: 1 to 128 visible ASCII
/// characters other than `"` and `\\`); another is dropped, and one is
/// made in its place. The id is written into every log line of the request
/// (and handed to plugins): spaces would let a client forge a line's
/// fields (`x plugin=other`), and its length was the client's to choose.
fn drop_unfit_request_id<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    if request
        .headers()
        .get(&REQUEST_ID)
        .is_some_and(|id| !forgesyte_loader::fit_request_id(id.as_bytes()))
    {
        request.headers_mut().remove(&REQUEST_ID);
    }
    request
}

/// The header that carries a request's id, in and out.
static REQUEST_ID: axum::http::HeaderName = axum::http::HeaderName::from_static("x-request-id");

/// New request ids: 32 hex digits, a random half drawn once per process
/// and a counter, so ids are unique across restarts and replicas without a
/// system call per request (a UUID v4 per request cost a measurable share
/// of a health check's time).
#[derive(Debug, Clone, Copy)]
struct RequestIds;

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static PROCESS: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let process =
            *PROCESS.get_or_init(|| std::hash::RandomState::new().build_hasher().finish());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // 32 hex digits written in place (`format!` cost a few per cent of
        // a health check).
        let mut id = [0u8; 32];
        let digits = b"0123456789abcdef";
        let value = (u128::from(process) << 64) | u128::from(n);
        for (i, byte) in id.iter_mut().enumerate() {
            let shift = 4 * (31 - i);
            *byte = digits[((value >> shift) & 0xF) as usize];
        }
        axum::http::HeaderValue::from_bytes(&id)
            .ok()
            .map(RequestId::new)
    }
}

/// The id an answer made outside the router carries (the connection cap's
/// 503): the client's `x-request-id` when it fits, else a new one, as the
/// router's layers give every routed answer.
pub(crate) fn request_id_of<B>(
    request: &axum::http::Request<B>,
) -> Option<(axum::http::HeaderName, axum::http::HeaderValue)> {
    let kept = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|id| forgesyte_loader::fit_request_id(id.as_bytes()))
        .cloned();
    kept.or_else(|| {
        RequestIds
            .make_request_id(request)
            .map(|id| id.header_value().clone())
    })
    .map(|id| (REQUEST_ID.clone(), id))
}

/// The span of one request: its method, path and id (cut to 128
/// characters: the id may be the client's). `INFO` for requests that change
/// or run something (their log lines, admin actions and tool failures, are
/// at `INFO` and above); `DEBUG` for reads, which log at `DEBUG` only, so
/// the hot read routes pay for no span unless debug logging is on.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let method = request.method();
    let path = crate::error::Shown(request.uri().path());
    let id = crate::error::Shown(id);
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        tracing::debug_span!("request", %method, %path, request_id = %id)
    } else {
        tracing::info_span!("request", %method, %path, request_id = %id)
    }
}

/// The OpenAPI document of the HTTP API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    corrected(routes().split_for_parts().1)
}

/// The run route's path in the document.
const RUN_PATH: &str = "/v1/plugins/{name}/tools/{tool}/run";

/// The stream route's path in the document.
const STREAM_PATH: &str = "/v1/plugins/{name}/tools/{tool}/stream";

/// What the route macros cannot say: the run route's body may be absent
/// (no arguments), and its `application/octet-stream` bodies, the
/// request's and the answer's, are bytes (the macros make an array of
/// integers of `Vec<u8>`); the stream route's 503 is a `RunFailure` or,
/// at the server's limit of streams, an `ErrorDetail`.
fn corrected(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    use utoipa::openapi::{Ref, RefOr};
    if let Some(RefOr::T(busy)) = doc
        .paths
        .paths
        .get_mut(STREAM_PATH)
        .and_then(|item| item.get.as_mut())
        .and_then(|op| op.responses.responses.get_mut("503"))
        && let Some(content) = busy.content.get_mut("application/json")
    {
        content.schema = Some(
            OneOfBuilder::new()
                .item(Ref::from_schema_name("RunFailure"))
                .item(Ref::from_schema_name("ErrorDetail"))
                .into(),
        );
    }
    let bytes = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    };
    let Some(run) = doc
        .paths
        .paths
        .get_mut(RUN_PATH)
        .and_then(|item| item.post.as_mut())
    else {
        return doc;
    };
    if let Some(body) = run.request_body.as_mut() {
        body.required = Some(utoipa::openapi::Required::False);
        if let Some(content) = body.content.get_mut("application/octet-stream") {
            content.schema = Some(bytes());
        }
    }
    if let Some(RefOr::T(ok)) = run.responses.responses.get_mut("200")
        && let Some(content) = ok.content.get_mut("application/octet-stream")
    {
        content.schema = Some(bytes());
    }
    doc
}

/// The OpenAPI document and its page, built by the first request that
/// needs them: built with the app, they took a millisecond or two of CPU
/// from the load pass that starts beside it.
static PUBLISHED: docs::Lazy = docs::Lazy::new(|| Published::new(&openapi()));

async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use std::sync::Arc;

    use axum::body::{Body, to_bytes};
    use axum::http::{Method, Request, StatusCode};
    use forgesyte_registry::{PluginInfo, PluginLifecycleState, Registry};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::config::ServerConfig;
    use crate::probes::{ReadyCheck, ReadyResponse};
    use crate::reload::{ReloadOutcome, ReloadReport, RemovedPlugin};
    use crate::server::build_loader;
    use crate::wire::{JournalEntryJson, PluginStateJson};

    fn doc() -> Value {
        serde_json::from_slice(PUBLISHED.json()).unwrap()
    }

    fn property_names(doc: &Value, schema: &str) -> BTreeSet<String> {
        doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {schema}"))
            .keys()
            .cloned()
            .collect()
    }

    /// The paths the real router holds. axum has no API that lists them;
    /// its `Debug` form names every registered path (of the routes, before
    /// the fallbacks), and this reads them from there. Should a new axum
    /// print them differently, the assertions below fail, never pass.
    fn router_paths(router: &Router) -> BTreeSet<String> {
        let debug = format!("{router:?}");
        let routes = debug
            .split_once("path_router:")
            .and_then(|(_, rest)| rest.split_once("fallback_router:"))
            .map(|(routes, _)| routes)
            .unwrap_or_else(|| panic!("unexpected Debug form of axum::Router: {debug}"));
        routes
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|text| text.starts_with('/'))
            .map(str::to_owned)
            .collect()
    }

    fn app_over_no_plugins() -> Router {
        let config = ServerConfig::default();
        let loader = Arc::new(build_loader(&config.lib_paths));
        app(AppState::new(loader, &config))
    }

    /// `path` with every `{param}` replaced by `x`.
    fn concrete(path: &str) -> String {
        path.split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    "x"
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    async fn answer(app: &Router, method: &Method, uri: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        // An event stream never ends: its head is the answer.
        if response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            == Some("text/event-stream")
        {
            return (status, serde_json::json!({"stream": true}));
        }
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// The router's paths are the document's paths, every documented
    /// operation reaches a handler (not the 404 or 405 fallback), and every
    /// other method on a documented path is a 405.
    #[tokio::test]
    async fn every_route_is_documented_and_answers() {
        let app = app_over_no_plugins();
        let doc = doc();
        let documented: BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        let routed = router_paths(&app);
        assert!(routed.contains("/v1/health"), "{routed:?}");
        assert_eq!(routed, documented);
        // SPEC §5's routes are among them.
        for path in [
            "/v1/health",
            "/v1/plugins",
            "/v1/plugins/",
            "/v1/plugins/{name}/health",
            "/v1/plugins/{name}/manifest",
            "/v1/plugins/{name}/tools/{tool}/run",
        ] {
            assert!(documented.contains(path), "{path}");
        }
        let fallback_404 = serde_json::json!({"detail": "Not Found"});
        let fallback_405 = serde_json::json!({"detail": "Method Not Allowed"});
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            let uri = concrete(path);
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
            ] {
                let key = method.as_str().to_ascii_lowercase();
                let (status, body) = answer(&app, &method, &uri).await;
                if item.get(&key).is_some() {
                    operations += 1;
                    assert_ne!(body, fallback_404, "{method} {path}: {status}");
                    assert_ne!(body, fallback_405, "{method} {path}: {status}");
                    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{method} {path}");
                } else {
                    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                    assert_eq!(body, fallback_405, "{method} {path}");
                }
            }
        }
        assert_eq!(operations, documented.len(), "one operation per path");
        let (status, body) = answer(&app, &Method::GET, "/v1/nothing").await;
        assert_eq!((status, body), (StatusCode::NOT_FOUND, fallback_404));
    }

    #[test]
    fn admin_and_probe_routes_document_their_answers() {
        let doc = doc();
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
            BTreeSet::from([
                "200", "400", "404", "406", "408", "413", "422", "502", "503", "504"
            ])
        );
    }

    /// Request ids are 32 lowercase hex digits: the process's random half,
    /// then a counter.
    #[test]
    fn request_ids_are_the_process_half_then_a_counter_in_hex() {
        let request = Request::builder().body(()).unwrap();
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let id = RequestIds.make_request_id(&request).unwrap();
                id.header_value().to_str().unwrap().to_owned()
            })
            .collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        assert_eq!(ids[0][..16], ids[1][..16], "one process half");
        let counter = |id: &str| u64::from_str_radix(&id[16..], 16).unwrap();
        assert!(counter(&ids[1]) > counter(&ids[0]), "{ids:?}");
    }

    /// A client's request id is kept when it fits a log line's field, else
    /// dropped (and one made in its place).
    #[test]
    fn a_request_id_that_could_forge_log_fields_is_dropped() {
        let long = "x".repeat(129);
        for (id, kept) in [
            ("trace-me-42", true),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                true,
            ),
            ("job/42:7=a", true),
            ("zz1 plugin=forged", false),
            ("say \"hi\"", false),
            ("tab\there", false),
            (long.as_str(), false),
        ] {
            let request = Request::builder()
                .header("x-request-id", id)
                .body(())
                .unwrap();
            let request = super::drop_unfit_request_id(request);
            assert_eq!(
                request.headers().contains_key("x-request-id"),
                kept,
                "{id:?}"
            );
        }
    }

    /// A plugin's health is served from its cache until the registry
    /// changes: a recorded call shows at once, and a plugin that is gone
    /// is a 404 (and leaves the cache).
    #[tokio::test]
    async fn a_cached_health_follows_every_registry_change() {
        let config = ServerConfig::default();
        let loader = Arc::new(build_loader(&config.lib_paths));
        let registry = loader.registry().clone();
        registry.register("p", PluginInfo::default()).unwrap();
        registry.mark_initialized("p").unwrap();
        let app = app(AppState::new(loader, &config));
        let uri = "/v1/plugins/p/health";
        let (status, first) = answer(&app, &Method::GET, uri).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        assert_eq!(first["success_count"], 0);
        assert_eq!(answer(&app, &Method::GET, uri).await.1["success_count"], 0);
        registry
            .record_success("p", std::time::Duration::from_millis(3))
            .unwrap();
        let (_, after) = answer(&app, &Method::GET, uri).await;
        assert_eq!(after["success_count"], 1, "{after}");
        assert_eq!(after["last_execution_time_ms"], 3.0, "{after}");
        registry.retire("p").unwrap();
        registry.forget("p");
        let (status, gone) = answer(&app, &Method::GET, uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{gone}");
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
            status: snapshot.get("p").unwrap().into(),
            journal: snapshot
                .journal("p")
                .unwrap()
                .into_iter()
                .map(JournalEntryJson::from)
                .collect(),
            runtime: Some("native".into()),
            isolation: Some("process".into()),
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
            state: PluginStateJson::Initialized,
            reason: None,
            elapsed_ms: 1.0,
        };
        let report = ReloadReport {
            plugins: vec![outcome.clone()],
            loaded: 1,
            failed: 0,
            unavailable: 0,
            added: vec!["p".into()],
            changed: Vec::new(),
            retried: Vec::new(),
            unchanged: Vec::new(),
            removed: vec![RemovedPlugin {
                name: "gone".into(),
                dir: "/plugins/gone".into(),
                calls_in_flight: 1,
                calls_cut_off: 0,
                elapsed_ms: 3.0,
            }],
            elapsed_ms: 2.0,
            warning: Some("w".into()),
        };
        let doc = doc();
        for (schema, value) in [
            ("ReloadOutcome", serde_json::to_value(&outcome).unwrap()),
            ("ReloadReport", serde_json::to_value(&report).unwrap()),
            (
                "RemovedPlugin",
                serde_json::to_value(&report.removed[0]).unwrap(),
            ),
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
        // RunFailure = allOf [NotRunnable (state, reason: only for
        // PluginNotRunnable), {the fields of every failure}].
        let parts = doc["components"]["schemas"]["RunFailure"]["allOf"]
            .as_array()
            .unwrap_or_else(|| panic!("{}", doc["components"]["schemas"]["RunFailure"]));
        let mut failure = BTreeSet::new();
        for part in parts {
            match part["$ref"].as_str() {
                Some(reference) => {
                    assert_eq!(reference, "#/components/schemas/NotRunnable");
                    failure.extend(property_names(&doc, "NotRunnable"));
                }
                None => failure.extend(part["properties"].as_object().unwrap().keys().cloned()),
            }
        }
        assert!(failure.contains("state") && failure.contains("reason"));
        for field in ["ok", "error", "error_type", "detail"] {
            assert!(failure.contains(field), "RunFailure lacks {field}");
        }
        let health = property_names(&doc, "HealthResponse");
        for field in ["status", "plugins_loaded", "version"] {
            assert!(health.contains(field), "HealthResponse lacks {field}");
        }
    }

    #[test]
    fn page_lists_every_route_and_schema_without_external_assets() {
        let html = std::str::from_utf8(PUBLISHED.page()).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        for needle in [
            "/v1/plugins/{name}/health",
            "/v1/plugins/{name}/tools/{tool}/run",
            "/v1/health",
            "id=\"schema-PluginStatus\"",
            "id=\"schema-RunFailure\"",
            "avg_execution_time_ms",
            ">POST<",
            "/readyz",
            "/v1/plugins/{name}/reload",
            "id=\"schema-PluginHealth\"",
            "Every field of <a href=\"#schema-PluginStatus\">PluginStatus</a>, and:",
            "<code>journal</code>",
            "stderr_tail",
        ] {
            assert!(html.contains(needle), "page lacks {needle}");
        }
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}
