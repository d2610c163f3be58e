//! [`PluginHandle`]: what the server holds to call a loaded plugin's tools.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_errors::{PluginError, TimeoutError, ToolError};
use forgesyte_registry::{PluginLifecycleState, Registry};
use serde_json::Value;

use crate::host::{PluginInstance, ToolInfo};

/// Why a tool call produced no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The plugin is not in a state that runs tools (FAILED after a fault, ...).
    #[error("plugin '{name}' is {state:?} and cannot run tools{}", reason_suffix(.reason))]
    NotRunnable {
        /// The plugin.
        name: String,
        /// Its state.
        state: Option<PluginLifecycleState>,
        /// Its reason, if any.
        reason: Option<String>,
    },
    /// The tool did not produce a result.
    #[error(transparent)]
    Tool(#[from] ToolError),
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

/// A cheap, cloneable handle on a loaded plugin instance.
///
/// Every call goes through the registry: the state moves to RUNNING while the
/// call is in flight, success and error counts and timings are recorded, and a
/// fault (panic, broken answer) marks the plugin FAILED. The instance (and so
/// its library) lives as long as any handle does.
#[derive(Debug, Clone)]
pub struct PluginHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    registry: Registry,
    instance: Box<dyn PluginInstance>,
    call_timeout: Option<Duration>,
}

impl PluginHandle {
    pub(crate) fn new(
        name: String,
        registry: Registry,
        instance: Box<dyn PluginInstance>,
        call_timeout: Option<Duration>,
    ) -> Self {
        PluginHandle {
            inner: Arc::new(Inner {
                name,
                registry,
                instance,
                call_timeout,
            }),
        }
    }

    /// The plugin's registry name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The tools the loaded plugin offers.
    pub fn tools(&self) -> &[ToolInfo] {
        self.inner.instance.tools()
    }

    /// Whether the plugin offers `tool`.
    pub fn has_tool(&self, tool: &str) -> bool {
        self.tools().iter().any(|t| t.id == tool)
    }

    /// The manifest's per-call time limit, if it sets one.
    pub fn call_timeout(&self) -> Option<Duration> {
        self.inner.call_timeout
    }

    /// Runs `tool` with `args`, blocking the calling thread, and records the
    /// outcome in the registry.
    pub fn call(&self, tool: &str, args: &Value) -> Result<Value, CallError> {
        let name = &self.inner.name;
        let registry = &self.inner.registry;
        if !self.has_tool(tool) {
            return Err(ToolError::UnknownTool {
                plugin: name.clone(),
                tool: tool.to_owned(),
            }
            .into());
        }
        if registry.mark_running(name).is_err() {
            return Err(self.not_runnable());
        }
        let args = match serde_json::to_vec(args) {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = registry.finish(name);
                return Err(ToolError::InvalidArgs {
                    message: e.to_string(),
                }
                .into());
            }
        };
        let started = Instant::now();
        let outcome = self
            .inner
            .instance
            .call(tool, &args)
            .and_then(|bytes| {
                serde_json::from_slice::<Value>(&bytes).map_err(|e| ToolError::Protocol {
                    detail: format!("result is not valid JSON: {e}"),
                })
            })
            .map_err(|e| match e {
                ToolError::UnknownTool { tool, .. } => ToolError::UnknownTool {
                    plugin: name.clone(),
                    tool,
                },
                other => other,
            });
        let elapsed = started.elapsed();
        // Bookkeeping errors (the plugin was reloaded meanwhile) are not the
        // caller's problem: the outcome of the call stands.
        match &outcome {
            Ok(_) => {
                let _ = registry.record_success(name, elapsed);
            }
            Err(e) => {
                let _ = registry.record_error(name, elapsed);
                if e.is_fault() {
                    let reason = PluginError::Tool(e.clone()).reason();
                    tracing::error!(plugin = %name, %reason, "✗ Plugin FAILED: {name}");
                    let _ = registry.mark_failed(name, reason);
                }
            }
        }
        let _ = registry.finish(name);
        outcome.map_err(CallError::from)
    }

    /// Records that a call of `tool` ran past `after`. In-process the call's
    /// thread cannot be stopped, so the plugin is marked FAILED.
    pub fn fail_timeout(&self, tool: &str, after: Duration) -> String {
        let reason = PluginError::Timeout(TimeoutError {
            operation: format!("tool '{tool}'"),
            after,
        })
        .reason();
        let name = &self.inner.name;
        tracing::error!(plugin = %name, %reason, "✗ Plugin FAILED: {name}");
        let _ = self.inner.registry.mark_failed(name, reason.clone());
        reason
    }

    fn not_runnable(&self) -> CallError {
        let status = self.inner.registry.get_status(&self.inner.name);
        CallError::NotRunnable {
            name: self.inner.name.clone(),
            state: status.as_ref().map(|s| s.state),
            reason: status.and_then(|s| s.reason),
        }
    }
}
