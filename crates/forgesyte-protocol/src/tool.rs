//! Tool specs: what a plugin says about each of its tools, the same on
//! every boundary (the C ABI's `tools`, the wire protocol's `created`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One tool as the plugin describes it.
///
/// On the wire: `{"id", "title", "description", "input_schema",
/// "output_schema"}`; schemas are JSON Schema objects (free-form JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The id clients call it by (`/v1/plugins/{name}/tools/{id}/run`):
    /// not empty, `.` or `..`, which no URL can carry as a path segment
    /// (browsers and clients resolve them away), and without control
    /// characters (a carriage return or a NUL in a metrics label made
    /// common scrapers refuse the whole scrape; no client types them).
    #[serde(deserialize_with = "tool_id")]
    pub id: String,
    /// Short human-readable name.
    #[serde(default)]
    pub title: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of `args`.
    #[serde(default = "any_object", alias = "inputs")]
    pub input_schema: Value,
    /// JSON Schema of the result.
    #[serde(default = "any_object", alias = "outputs")]
    pub output_schema: Value,
}

fn tool_id<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let id = String::deserialize(deserializer)?;
    if matches!(id.as_str(), "" | "." | "..") {
        return Err(serde::de::Error::custom(format!(
            "a tool id may not be {id:?}: no URL path segment can carry it"
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(serde::de::Error::custom(format!(
            "a tool id may not hold control characters: {id:?}"
        )));
    }
    Ok(id)
}

fn any_object() -> Value {
    serde_json::json!({ "type": "object" })
}

impl ToolSpec {
    /// A tool `id`, titled `id`, without description, taking and returning
    /// any JSON object.
    pub fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        ToolSpec {
            title: id.clone(),
            id,
            description: String::new(),
            input_schema: any_object(),
            output_schema: any_object(),
        }
    }

    /// Sets the title.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the JSON Schema of the arguments.
    pub fn inputs(mut self, schema: Value) -> Self {
        self.input_schema = schema;
        self
    }

    /// Sets the JSON Schema of the result.
    pub fn outputs(mut self, schema: Value) -> Self {
        self.output_schema = schema;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn specs_default_their_schemas_and_accept_the_manifest_spelling() {
        let spec: ToolSpec = serde_json::from_value(json!({"id": "ocr"})).unwrap();
        assert_eq!(spec.input_schema, json!({"type": "object"}));
        assert_eq!(spec.title, "");
        let spec: ToolSpec =
            serde_json::from_value(json!({"id": "ocr", "inputs": {"type": "string"}})).unwrap();
        assert_eq!(spec.input_schema, json!({"type": "string"}));
        let built = ToolSpec::new("ocr").title("OCR").description("d");
        let back: ToolSpec = serde_json::from_value(serde_json::to_value(&built).unwrap()).unwrap();
        assert_eq!(back, built);
        assert_eq!(back.title, "OCR");
    }

    #[test]
    fn a_tool_id_no_url_can_carry_is_refused() {
        for id in ["", ".", ".."] {
            let err = serde_json::from_value::<ToolSpec>(json!({ "id": id }))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("a tool id may not be"), "{id:?}: {err}");
        }
        for id in ["a\rb", "a\nb", "nul\0", "tab\t", "\u{85}next-line"] {
            let err = serde_json::from_value::<ToolSpec>(json!({ "id": id }))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("a tool id may not hold control characters"),
                "{id:?}: {err}"
            );
        }
        for id in ["...", ".ocr", "a.b", "détection", "a b", "a\"b\\c"] {
            assert!(
                serde_json::from_value::<ToolSpec>(json!({ "id": id })).is_ok(),
                "{id}"
            );
        }
    }
}
