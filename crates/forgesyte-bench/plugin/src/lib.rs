//! The benchmark plugin of `forgesyte-bench`: tools that do as little as a
//! tool can, so a benchmark of them measures the host.
//!
//! Tools: `noop` (answers `{}`), `fail` (returns a `BenchError`: the
//! *tool returns an error* path, HTTP 422), `panic` (panics: the *fault*
//! path, HTTP 502, after which the host marks the plugin FAILED),
//! `noop_frame` (one binary argument, `frame`, declared `"format":
//! "binary"`, taken as the host's slice through ABI 3's binary call;
//! answers `{"len": N}`: the frames figures send it payloads as JSON
//! base64, multipart and octet-stream).
//!
//! It knows only the SDK: nothing of the host or of the bench, whose
//! figures must measure the host's work, not this library's.

use forgesyte_plugin_sdk::{BoxError, Call, Output, Plugin, PluginConfig, ToolError, ToolSpec};
use serde_json::Value;

/// The benchmark plugin. Stateless.
pub struct Bench;

impl Plugin for Bench {
    fn new(_config: PluginConfig) -> Result<Self, BoxError> {
        Ok(Bench)
    }

    fn tools(&self) -> Vec<ToolSpec> {
        vec![
            ToolSpec::new("noop").description("Does nothing; answers {}"),
            ToolSpec::new("fail").description("Returns a BenchError"),
            ToolSpec::new("panic").description("Panics (the plugin becomes FAILED)"),
            ToolSpec::new("noop_frame")
                .description("Takes one binary argument, frame; does nothing; answers {}")
                .inputs(serde_json::json!({
                    "type": "object",
                    "properties": {"frame": {"type": "string", "format": "binary"}},
                    "required": ["frame"],
                })),
        ]
    }

    fn call(&self, call: Call<'_>) -> Result<Output, ToolError> {
        if call.tool() == "noop_frame" {
            let frame = call
                .binary("frame")
                .ok_or_else(|| ToolError::invalid_input("`frame` must be a binary argument"))?;
            return Ok(Output::json(serde_json::json!({ "len": frame.len() })));
        }
        self.run(call.tool(), call.into_json_args()?).map(Output::json)
    }

    fn run(&self, tool: &str, _args: Value) -> Result<Value, ToolError> {
        match tool {
            "noop" => Ok(Value::Object(serde_json::Map::new())),
            "fail" => Err(ToolError::new("BenchError", "benchmark tool failed")),
            "panic" => panic!("benchmark tool panic"),
            other => Err(ToolError::new("UnknownTool", other)),
        }
    }
}

forgesyte_plugin_sdk::export_plugin!(Bench);
