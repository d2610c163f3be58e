//! `/openapi.json` and `/docs`: the OpenAPI document as served, and a
//! self-contained HTML page rendered from it (routes, methods, parameters,
//! bodies, responses, schemas). No script, no external asset, so it works
//! on machines without internet access.
//!
//! The document itself is built by the router from the same registrations
//! as the routes ([`crate::router`]); it reaches these handlers as an
//! [`Extension`] of [`Published`], so this module knows nothing of the
//! router or the other handlers. It is built at the first request that
//! needs it, not with the app.

use std::fmt::Write as _;

use axum::Extension;
use axum::body::Bytes;
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::{Html, IntoResponse, Response};
use serde_json::Value;

/// [`Published`], built at its first use (the router's static).
pub(crate) type Lazy = std::sync::LazyLock<Published>;

/// The OpenAPI document serialised, and its HTML page; built once.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    json: Bytes,
    page: Bytes,
}

impl Published {
    /// Serialises `doc` and renders its page.
    pub(crate) fn new(doc: &utoipa::openapi::OpenApi) -> Published {
        let json = match doc.to_pretty_json() {
            Ok(text) => Bytes::from(text),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise the OpenAPI document");
                Bytes::from_static(b"{}")
            }
        };
        let value: Value = serde_json::from_slice(&json).unwrap_or(Value::Null);
        let page = Bytes::from(render(&value));
        Published { json, page }
    }

    /// The document as served at `/openapi.json`.
    pub(crate) fn json(&self) -> &Bytes {
        &self.json
    }

    /// The page as served at `/docs`.
    pub(crate) fn page(&self) -> &Bytes {
        &self.page
    }
}

/// The OpenAPI 3.1 document of this API, generated from the code.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "server",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub(crate) async fn openapi_json(Extension(docs): Extension<&'static Lazy>) -> Response {
    let mut response = docs.json().clone().into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A human-readable page of the OpenAPI document (no external assets).
#[utoipa::path(
    get,
    path = "/docs",
    tag = "server",
    responses((status = 200, description = "HTML documentation", content_type = "text/html"))
)]
pub(crate) async fn docs_page(Extension(docs): Extension<&'static Lazy>) -> Response {
    // The page is inline style and text only: nothing else may load or run.
    (
        [
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
                 form-action 'none'; frame-ancestors 'none'",
            ),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(docs.page().clone()),
    )
        .into_response()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
code,pre{font-family:ui-monospace,monospace;background:#f4f4f4;padding:0 .2em}\
.op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.5rem 1rem}\
.m{display:inline-block;min-width:4.5em;font-weight:bold;color:#fff;border-radius:4px;text-align:center;margin-right:.5em}\
.get{background:#2b7bb9}.post{background:#2a9d5c}\
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}";

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A short type name for a schema: a `$ref`'s target (linked), an array of
/// one, or the JSON type.
fn type_name(schema: &Value) -> String {
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let name = target.rsplit('/').next().unwrap_or(target);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    if let Some(items) = schema.get("items") {
        return format!("array of {}", type_name(items));
    }
    for combinator in ["oneOf", "anyOf", "allOf"] {
        if let Some(options) = schema.get(combinator).and_then(Value::as_array) {
            let names: Vec<String> = options.iter().map(type_name).collect();
            return names.join(" or ");
        }
    }
    match schema.get("type") {
        Some(Value::String(t)) => esc(t),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .map(esc)
            .collect::<Vec<_>>()
            .join(" or "),
        _ if schema.get("enum").is_some() => "enum".into(),
        _ => "any".into(),
    }
}

/// The page for `doc` (an OpenAPI document as JSON).
pub(crate) fn render(doc: &Value) -> String {
    let info = &doc["info"];
    let title = esc(text(info, "title"));
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{STYLE}</style></head><body><h1>{title} <small>{}</small></h1><p>{}</p>\
         <p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI {}).</p><h2>Routes</h2>",
        esc(text(info, "version")),
        esc(text(info, "description")),
        esc(text(doc, "openapi")),
    );
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            let Some(item) = item.as_object() else {
                continue;
            };
            for (method, op) in item {
                render_operation(&mut html, path, method, op);
            }
        }
    }
    html.push_str("<h2>Schemas</h2>");
    if let Some(schemas) = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, schema) in schemas {
            render_schema(&mut html, name, schema);
        }
    }
    html.push_str("</body></html>");
    html
}

fn render_operation(html: &mut String, path: &str, method: &str, op: &Value) {
    let _ = write!(
        html,
        "<div class=\"op\"><h3><span class=\"m {m}\">{M}</span><code>{p}</code></h3><p>{s}</p>",
        m = esc(method),
        M = esc(&method.to_uppercase()),
        p = esc(path),
        s = esc(text(op, "summary")),
    );
    let description = text(op, "description");
    if !description.is_empty() {
        let _ = write!(html, "<p>{}</p>", esc(description));
    }
    if let Some(params) = op.get("parameters").and_then(Value::as_array) {
        html.push_str(
            "<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>",
        );
        for param in params {
            let _ = write!(
                html,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(text(param, "name")),
                esc(text(param, "in")),
                type_name(&param["schema"]),
                esc(text(param, "description")),
            );
        }
        html.push_str("</table>");
    }
    if let Some(body) = op.get("requestBody") {
        let _ = write!(
            html,
            "<p><b>Request body</b>: {}",
            esc(text(body, "description"))
        );
        if let Some(content) = body.get("content").and_then(Value::as_object) {
            for (media, entry) in content {
                let _ = write!(
                    html,
                    " <code>{}</code> {}",
                    esc(media),
                    type_name(&entry["schema"])
                );
            }
        }
        html.push_str("</p>");
    }
    if let Some(responses) = op.get("responses").and_then(Value::as_object) {
        html.push_str("<table><tr><th>status</th><th>description</th><th>body</th></tr>");
        for (status, response) in responses {
            let body = response
                .get("content")
                .and_then(Value::as_object)
                .map(|content| {
                    content
                        .iter()
                        .map(|(media, entry)| {
                            let schema = entry.get("schema").map(type_name).unwrap_or_default();
                            format!("<code>{}</code> {schema}", esc(media))
                        })
                        .collect::<Vec<_>>()
                        .join("<br>")
                })
                .unwrap_or_default();
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{body}</td></tr>",
                esc(status),
                esc(text(response, "description")),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</div>");
}

fn render_schema(html: &mut String, name: &str, schema: &Value) {
    let _ = write!(
        html,
        "<div class=\"op\" id=\"schema-{n}\"><h3>{n}</h3><p>{d}</p>",
        n = esc(name),
        d = esc(text(schema, "description")),
    );
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = values
            .iter()
            .map(|v| format!("<code>{}</code>", esc(&v.to_string())))
            .collect();
        let _ = write!(html, "<p>One of: {}</p>", values.join(", "));
    }
    // A flattened struct: every field of the referenced schemas, and the
    // fields of the inline parts.
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        for part in parts {
            if part.get("$ref").is_some() {
                let _ = write!(html, "<p>Every field of {}, and:</p>", type_name(part));
            } else {
                render_properties(html, part);
            }
        }
    }
    render_properties(html, schema);
    html.push_str("</div>");
}

/// The table of `schema`'s properties, if it has any.
fn render_properties(html: &mut String, schema: &Value) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        html.push_str(
            "<table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>",
        );
        for (field, property) in properties {
            let _ = write!(
                html,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(field),
                type_name(property),
                if required.contains(&field.as_str()) {
                    "yes"
                } else {
                    "no"
                },
                esc(text(property, "description")),
            );
        }
        html.push_str("</table>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_document_is_escaped() {
        let doc = serde_json::json!({
            "info": {"title": "<script>x</script>", "version": "1"},
            "paths": {"/a": {"get": {"summary": "a & b", "responses": {}}}},
        });
        let html = render(&doc);
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(html.contains("a &amp; b"));
        assert!(!html.contains("<script>"));
    }
}
