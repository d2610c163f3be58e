//! The seam between the load pipeline and plugin code.
//!
//! The pipeline only sees these traits: an [`Importer`] opens a plugin
//! library, a [`PluginLibrary`] creates instances, a [`PluginInstance`] lists
//! and runs tools. The real implementation is [`crate::native`] (dlopen of an
//! SDK-built library); tests use the in-memory fake in [`crate::fake`];
//! process isolation plugs in here too.

use std::path::Path;
use std::sync::Arc;

use forgesyte_errors::{ImportError, InitError, ToolError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A tool as the loaded plugin describes it (authoritative over the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// Tool id, as used in the run route.
    pub id: String,
    /// Short human title.
    #[serde(default)]
    pub title: String,
    /// What the tool does.
    #[serde(default)]
    pub description: String,
    /// JSON schema of the arguments.
    #[serde(default)]
    pub input_schema: Value,
    /// JSON schema of the result.
    #[serde(default)]
    pub output_schema: Value,
}

/// Opens plugin libraries.
pub trait Importer: Send + Sync + std::fmt::Debug {
    /// Opens the library at `path` and checks it speaks the host's ABI.
    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError>;
}

/// An opened plugin library. Libraries are never unloaded.
pub trait PluginLibrary: Send + Sync + std::fmt::Debug {
    /// Constructs an instance from its configuration JSON
    /// (`{"manifest", "plugin_dir", "models"}`).
    fn instantiate(&self, config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError>;
}

/// A live plugin instance; tools may be called from several threads at once.
pub trait PluginInstance: Send + Sync + std::fmt::Debug {
    /// The tools the instance offers.
    fn tools(&self) -> &[ToolInfo];
    /// Runs `tool` with JSON-encoded `args`; returns the JSON-encoded result.
    fn call(&self, tool: &str, args: &[u8]) -> Result<Vec<u8>, ToolError>;
}
