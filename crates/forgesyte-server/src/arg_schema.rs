//! What a tool's input schema says about its top-level arguments: which
//! are binary (they reach the plugin as bytes), and what a
//! `multipart/form-data` field named like one of the others holds (a JSON
//! value of the declared type). Knows JSON Schema as tools write it
//! (pydantic's output included), not how a body is read or a plugin called.

use axum::body::Bytes;
use serde_json::{Map, Value};

use crate::error::RunError;

/// The top-level arguments a tool's input schema declares binary:
/// `"format": "binary"` (what pydantic emits for `bytes`) or
/// `"contentEncoding": "base64"`, or an `anyOf` / `oneOf` of such a string
/// and `{"type": "null"}` (pydantic's `Optional[bytes]`).
pub(crate) fn binary_arguments(input_schema: &Value) -> Vec<&str> {
    let Some(properties) = input_schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    properties
        .iter()
        .filter(|(_, schema)| is_binary(schema) || is_optional_binary(schema))
        .map(|(name, _)| name.as_str())
        .collect()
}

/// A schema of bytes.
fn is_binary(schema: &Value) -> bool {
    schema.get("format").and_then(Value::as_str) == Some("binary")
        || schema.get("contentEncoding").and_then(Value::as_str) == Some("base64")
}

/// Bytes or null: every alternative of its `anyOf` (or `oneOf`) is bytes or
/// `{"type": "null"}`, one of them bytes.
fn is_optional_binary(schema: &Value) -> bool {
    ["anyOf", "oneOf"].iter().any(|key| {
        schema
            .get(*key)
            .and_then(Value::as_array)
            .is_some_and(|alternatives| {
                alternatives.iter().any(is_binary)
                    && alternatives.iter().all(|alternative| {
                        is_binary(alternative)
                            || alternative.get("type").and_then(Value::as_str) == Some("null")
                    })
            })
    })
}

/// Multipart parts named like a property the tool's input schema declares
/// and does not declare binary are form fields (`-F threshold=3`): each
/// becomes a JSON argument, the text itself where the property is a string,
/// otherwise the JSON it holds (a number, a boolean, an object …; text that
/// is not JSON stays text when the schema allows a string or names no
/// type). The other parts stay binary. Together the fields parsed as JSON
/// hold at most `max_values` values ([`crate::body::max_json_values`]),
/// a bound of their own beside the `args` part's. Only JSON is checked: a
/// value of another type than the schema's reaches the plugin, which
/// validates its own arguments.
pub(crate) fn form_fields(
    binary: &mut Vec<(String, Bytes)>,
    args: &mut Map<String, Value>,
    input_schema: &Value,
    max_values: usize,
) -> Result<(), RunError> {
    let Some(properties) = input_schema.get("properties").and_then(Value::as_object) else {
        return Ok(());
    };
    let mut left = max_values;
    let mut kept = Vec::with_capacity(binary.len());
    for (name, data) in binary.drain(..) {
        match properties.get(&name) {
            Some(schema) if !is_binary(schema) && !is_optional_binary(schema) => {
                let value = field_value(&name, &data, schema, &mut left, max_values)?;
                args.insert(name, value);
            }
            _ => kept.push((name, data)),
        }
    }
    *binary = kept;
    Ok(())
}

/// The JSON value of form field `name` for a property of `schema`.
fn field_value(
    name: &str,
    data: &[u8],
    schema: &Value,
    left: &mut usize,
    max_values: usize,
) -> Result<Value, RunError> {
    let types = declared_types(schema);
    let shown = match &types {
        Some(types) => format!(
            " (the tool's input schema declares it {})",
            types.join(" or ")
        ),
        None => String::new(),
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return Err(RunError::InvalidForm {
            message: format!(
                "the part '{name}' is a form field for argument '{name}'{shown}, and is not UTF-8 text"
            ),
        });
    };
    // Text where the schema allows nothing but a string (or null).
    let allows_text = types.as_ref().is_none_or(|t| t.contains(&"string"));
    if types
        .as_ref()
        .is_some_and(|t| t.contains(&"string") && t.iter().all(|t| matches!(*t, "string" | "null")))
    {
        return Ok(Value::String(text.to_owned()));
    }
    let values = forgesyte_loader::json_text::json_values(data);
    if values > *left {
        return Err(RunError::TooManyValues {
            values: max_values - *left + values,
            max: max_values,
        });
    }
    match serde_json::from_str::<Value>(text) {
        Ok(value) => {
            *left -= values;
            Ok(value)
        }
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            Err(RunError::InvalidForm {
                message: format!(
                    "the part '{name}' is a form field for argument '{name}'{shown}, and its \
                     JSON is nested 128 or more levels deep (at line {} column {}): the server \
                     reads no deeper",
                    e.line(),
                    e.column()
                ),
            })
        }
        Err(_) if allows_text => Ok(Value::String(text.to_owned())),
        Err(e) => Err(RunError::InvalidForm {
            message: format!(
                "the part '{name}' is a form field for argument '{name}'{shown}, and its text is not JSON: {e}"
            ),
        }),
    }
}

/// The types a property's schema names: its `type` (a name or a list), or
/// those of the alternatives of its `anyOf` / `oneOf` (pydantic's
/// `Optional[int]`). `None` when it, or one of its alternatives, names
/// none (`$ref`, `enum`, `{}`: pydantic's nested models and enums, and
/// `Optional` of them): then any JSON value may fit.
fn declared_types(schema: &Value) -> Option<Vec<&str>> {
    fn named(one: &Value) -> Option<Vec<&str>> {
        match one.get("type")? {
            Value::String(t) => Some(vec![t.as_str()]),
            Value::Array(list) => Some(list.iter().filter_map(Value::as_str).collect()),
            _ => None,
        }
    }
    let alternatives: Vec<&Value> = ["anyOf", "oneOf"]
        .into_iter()
        .filter_map(|key| schema.get(key).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut types = match (named(schema), alternatives.is_empty()) {
        (Some(types), _) => types,
        (None, true) => return None,
        (None, false) => Vec::new(),
    };
    for alternative in alternatives {
        types.extend(named(alternative)?);
    }
    types.sort_unstable();
    types.dedup();
    Some(types)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn binary_arguments_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"},
            "mask": {"type": "string", "contentEncoding": "base64"},
            "name": {"type": "string"},
            // pydantic's Optional[bytes] and bytes | None.
            "thumb": {"anyOf": [{"type": "string", "format": "binary"}, {"type": "null"}], "default": null},
            "alt": {"oneOf": [{"type": "null"}, {"type": "string", "contentEncoding": "base64"}]},
            // Bytes or text is not bytes.
            "either": {"anyOf": [{"type": "string", "format": "binary"}, {"type": "string"}]},
            "none": {"anyOf": [{"type": "null"}]}
        }});
        let mut found = binary_arguments(&schema);
        found.sort_unstable();
        assert_eq!(found, ["alt", "image", "mask", "thumb"]);
        assert!(binary_arguments(&json!({"type": "object"})).is_empty());
    }

    fn parts(list: &[(&str, &'static [u8])]) -> Vec<(String, Bytes)> {
        list.iter()
            .map(|(n, d)| ((*n).to_owned(), Bytes::from_static(d)))
            .collect()
    }

    /// Fields named like a declared argument take its type; parts of
    /// binary or undeclared arguments stay bytes.
    #[test]
    fn form_fields_become_json_arguments_of_their_declared_type() {
        let schema = json!({"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"},
            "threshold": {"type": "integer"},
            "scale": {"type": "number"},
            "label": {"type": "string"},
            "debug": {"type": "boolean"},
            "opts": {"type": "object"},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "title": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "loose": {"$ref": "#/$defs/Loose"},
            "nested": {"$ref": "#/$defs/Options"},
            "mode": {"enum": [1, 2]},
            "maybe_nested": {"anyOf": [{"$ref": "#/$defs/Options"}, {"type": "null"}]},
            "either": {"type": ["integer", "string"]}
        }});
        let mut binary = parts(&[
            ("image", b"\x89PNG\xff"),
            ("threshold", b"3"),
            ("scale", b"0.5"),
            ("label", b"42"),
            ("debug", b"true"),
            ("opts", br#"{"k": [1, 2]}"#),
            ("maybe", b"null"),
            ("title", b"null"),
            ("loose", b"plain words"),
            ("nested", br#"{"k": 1}"#),
            ("mode", b"1"),
            ("maybe_nested", br#"{"k": 2}"#),
            ("either", b"seven"),
            ("undeclared", b"\x00\x01"),
        ]);
        let mut args = Map::new();
        form_fields(&mut binary, &mut args, &schema, 1000).unwrap();
        let names: Vec<&str> = binary.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["image", "undeclared"]);
        assert_eq!(
            Value::Object(args),
            json!({
                "threshold": 3, "scale": 0.5, "label": "42", "debug": true,
                "opts": {"k": [1, 2]}, "maybe": null, "title": "null",
                "loose": "plain words", "nested": {"k": 1}, "mode": 1, "maybe_nested": {"k": 2},
                "either": "seven"
            })
        );
    }

    /// A field that cannot hold its declared type is refused with a reason
    /// naming the argument and the type; a schema without properties
    /// leaves every part binary.
    #[test]
    fn a_form_field_that_is_not_its_type_is_refused_with_a_reason() {
        let schema =
            json!({"properties": {"threshold": {"type": "integer"}, "label": {"type": "string"}}});
        for (part, expected) in [
            (
                parts(&[("threshold", b"lots")]),
                "the part 'threshold' is a form field for argument 'threshold' (the tool's input \
                 schema declares it integer), and its text is not JSON: expected value at line 1 column 1",
            ),
            (
                parts(&[("label", b"\xff\xfe")]),
                "the part 'label' is a form field for argument 'label' (the tool's input schema \
                 declares it string), and is not UTF-8 text",
            ),
        ] {
            let mut binary = part;
            match form_fields(&mut binary, &mut Map::new(), &schema, 1000) {
                Err(RunError::InvalidForm { message }) => assert_eq!(message, expected),
                other => panic!("{other:?}"),
            }
        }
        // The fields together hold at most max_values values.
        let mut binary = parts(&[("a", b"[1, 2]"), ("b", b"[3, 4]")]);
        let schema = json!({"properties": {"a": {"type": "array"}, "b": {"type": "array"}}});
        assert!(matches!(
            form_fields(&mut binary, &mut Map::new(), &schema, 3),
            Err(RunError::TooManyValues { values: 4, max: 3 })
        ));
        let mut binary = parts(&[("a", b"[1, 2]"), ("b", b"[3]")]);
        form_fields(&mut binary, &mut Map::new(), &schema, 3).unwrap();
        // JSON nested past the parser's depth, under a schema of no type,
        // is refused as a body's is, not passed on as text.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let mut binary = vec![("loose".to_owned(), Bytes::from(deep))];
        let schema = json!({"properties": {"loose": {}}});
        match form_fields(&mut binary, &mut Map::new(), &schema, 1000) {
            Err(RunError::InvalidForm { message }) => assert!(
                message.contains("nested 128 or more levels deep (at line 1 column 128)"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        let mut binary = parts(&[("threshold", b"3")]);
        let mut args = Map::new();
        form_fields(&mut binary, &mut args, &json!({"type": "object"}), 10).unwrap();
        assert_eq!((binary.len(), args.len()), (1, 0));
    }
}
