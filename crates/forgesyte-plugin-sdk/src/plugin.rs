//! What a plugin author implements: [`Plugin`] and the types it exchanges
//! with the host. Nothing here is `unsafe` or knows about the C ABI.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use forgesyte_protocol::ToolSpec;

use crate::binary::{Call, Output};

/// The error a constructor returns; its `Display` (and that of its sources)
/// becomes the host's `InitError: …` reason.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A plugin: constructed once per load, then asked for its tools and run.
///
/// `run` is called from several threads at once on the same instance (hence
/// `Send + Sync`); keep mutable state behind a lock or in atomics.
///
/// A panic anywhere in these methods is caught by the SDK and reported to the
/// host as a fault (the plugin is then marked FAILED); return an error for
/// bad input instead.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Builds the plugin from its configuration. Load weights, open files
    /// and validate the manifest here; an `Err` becomes `InitError: <message>`.
    fn new(config: PluginConfig) -> Result<Self, BoxError>;

    /// The tools this plugin offers. Called once, right after [`Plugin::new`];
    /// the SDK caches the list and refuses calls to ids not in it, so `run`
    /// only ever sees ids listed here.
    fn tools(&self) -> Vec<ToolSpec>;

    /// Runs tool `tool` on `args` (the JSON object the client sent). Binary
    /// arguments arrive here as base64 strings at their places (as under
    /// ABI 1); implement [`Plugin::call`] instead to get them as byte slices
    /// and to return binary results. The default refuses every tool.
    fn run(&self, tool: &str, args: Value) -> Result<Value, ToolError> {
        let _ = args;
        Err(ToolError::new(
            "UnknownTool",
            format!("tool '{tool}' is not implemented"),
        ))
    }

    /// Runs one call with its binary arguments as borrowed byte slices
    /// ([`Call::binary`]) and returns the JSON result, possibly with binary
    /// results ([`Output::with_binary`]). The default puts the binary
    /// arguments into the JSON as base64 strings and calls [`Plugin::run`],
    /// so plugins written before ABI 3 work unchanged.
    fn call(&self, call: Call<'_>) -> Result<Output, ToolError> {
        let tool = call.tool();
        let args = call.into_json_args()?;
        self.run(tool, args).map(Output::json)
    }
}

/// What the host hands a plugin's constructor.
///
/// On the wire (the `config` JSON of [`crate::abi::PluginVTable::create`]):
/// `{"manifest": {...}, "plugin_dir": "/abs/dir", "models": {"name": "/abs/path"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PluginConfig {
    /// The whole `manifest.json`, as the host read it (unknown fields kept).
    #[serde(default)]
    pub manifest: Value,
    /// The plugin's directory (absolute).
    pub plugin_dir: PathBuf,
    /// The manifest's `models`, each path resolved against the plugin
    /// directory (absolute). The host has checked that they exist.
    #[serde(default)]
    pub models: BTreeMap<String, PathBuf>,
}

impl PluginConfig {
    /// A configuration with an empty (`null`) manifest and no models; for
    /// tests and for hosts other than ForgeSyte's.
    pub fn new(plugin_dir: impl Into<PathBuf>) -> Self {
        PluginConfig {
            manifest: Value::Null,
            plugin_dir: plugin_dir.into(),
            models: BTreeMap::new(),
        }
    }

    /// Replaces the manifest.
    pub fn with_manifest(mut self, manifest: Value) -> Self {
        self.manifest = manifest;
        self
    }

    /// Adds (or replaces) the model `name`.
    pub fn with_model(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.models.insert(name.into(), path.into());
        self
    }

    /// The resolved path of model `name`, if the manifest declares it.
    pub fn model(&self, name: &str) -> Option<&Path> {
        self.models.get(name).map(PathBuf::as_path)
    }
}

/// An error a tool *returns* (bad input, nothing found, …): counted as an
/// error by the host, which leaves the plugin running. Panics are not
/// `ToolError`s: they are faults.
///
/// On the wire: `{"error_type": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolError {
    /// A short class name, e.g. `"InvalidInput"`.
    pub error_type: String,
    /// What went wrong, for the client.
    pub message: String,
}

impl ToolError {
    /// The class of errors about malformed or unusable arguments.
    pub const INVALID_INPUT: &'static str = "InvalidInput";

    /// An error of class `error_type`.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        ToolError {
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// An [`ToolError::INVALID_INPUT`] error.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        ToolError::new(Self::INVALID_INPUT, message)
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for ToolError {}

/// A tool's arguments as its own type `T`: `let args: MyArgs =
/// forgesyte_plugin_sdk::parse_args(args)?;`. Arguments that do not
/// deserialize are [`ToolError::INVALID_INPUT`], naming the field where
/// they went wrong: ``frame.width: invalid value: integer `300`, expected
/// u8`` (serde's own message names the expected type only).
///
/// # Errors
///
/// `InvalidInput`: the field's path, when the error is below the
/// arguments themselves, and serde's message (``missing field `tags` ``).
pub fn parse_args<T: serde::de::DeserializeOwned>(args: serde_json::Value) -> Result<T, ToolError> {
    serde_path_to_error::deserialize(args).map_err(|err| {
        if err.path().iter().next().is_none() {
            return ToolError::invalid_input(err.into_inner().to_string());
        }
        let path = err.path().to_string();
        ToolError::invalid_input(format!("{path}: {}", err.into_inner()))
    })
}

/// Arguments that do not deserialize into the tool's argument type are
/// invalid input: `let args: MyArgs = serde_json::from_value(args)?;`
/// ([`parse_args`] also names the field).
impl From<serde_json::Error> for ToolError {
    fn from(err: serde_json::Error) -> Self {
        ToolError::invalid_input(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_spec_builder_and_wire_shape() {
        let spec = ToolSpec::new("analyze")
            .title("Analyze")
            .description("d")
            .inputs(json!({"type": "object", "required": ["x"]}))
            .outputs(json!({"type": "number"}));
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({
                "id": "analyze", "title": "Analyze", "description": "d",
                "input_schema": {"type": "object", "required": ["x"]},
                "output_schema": {"type": "number"},
            })
        );
        let minimal: ToolSpec = serde_json::from_value(json!({"id": "x"})).unwrap();
        assert_eq!(minimal.input_schema, json!({"type": "object"}));
        let manifest_style: ToolSpec =
            serde_json::from_value(json!({"id": "x", "inputs": {"a": 1}})).unwrap();
        assert_eq!(manifest_style.input_schema, json!({"a": 1}));
    }

    #[test]
    fn parse_args_names_the_field_that_went_wrong() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Frame {
            width: u8,
        }
        #[derive(Debug, Deserialize, PartialEq)]
        struct Args {
            frame: Frame,
            tags: Vec<String>,
        }
        let err = parse_args::<Args>(json!({"frame": {"width": 300}, "tags": []})).unwrap_err();
        assert_eq!(err.error_type, "InvalidInput");
        assert_eq!(
            err.message,
            "frame.width: invalid value: integer `300`, expected u8"
        );
        let err = parse_args::<Args>(json!({"frame": {"width": 3}, "tags": ["a", 5]})).unwrap_err();
        assert!(
            err.message
                .starts_with("tags[1]: invalid type: integer `5`"),
            "{}",
            err.message
        );
        let err = parse_args::<Args>(json!({"frame": {"width": 3}})).unwrap_err();
        assert_eq!(err.message, "missing field `tags`");
        assert_eq!(
            parse_args::<Args>(json!({"frame": {"width": 3}, "tags": ["a"]})).unwrap(),
            Args {
                frame: Frame { width: 3 },
                tags: vec!["a".into()],
            }
        );
    }

    #[test]
    fn tool_error_from_serde_is_invalid_input() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Args {
            n: u32,
        }
        let err: ToolError = serde_json::from_value::<Args>(json!({"n": "x"}))
            .unwrap_err()
            .into();
        assert_eq!(err.error_type, "InvalidInput");
        assert!(err.message.contains("invalid type"), "{}", err.message);
        assert_eq!(
            ToolError::new("NotFound", "no face").to_string(),
            "NotFound: no face"
        );
    }

    #[test]
    fn config_wire_shape_and_helpers() {
        let config: PluginConfig = serde_json::from_value(json!({
            "manifest": {"name": "ocr"},
            "plugin_dir": "/p/ocr",
            "models": {"weights": "/p/ocr/w.bin"},
        }))
        .unwrap();
        assert_eq!(config.model("weights"), Some(Path::new("/p/ocr/w.bin")));
        assert_eq!(config.model("other"), None);
        assert_eq!(
            config,
            PluginConfig::new("/p/ocr")
                .with_manifest(json!({"name": "ocr"}))
                .with_model("weights", "/p/ocr/w.bin")
        );
        let bare: PluginConfig = serde_json::from_value(json!({"plugin_dir": "/x"})).unwrap();
        assert_eq!(bare, PluginConfig::new("/x"));
        assert!(serde_json::from_value::<PluginConfig>(json!({})).is_err());
    }
}
