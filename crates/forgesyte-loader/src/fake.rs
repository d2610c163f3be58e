//! An in-memory [`Importer`] for tests: plugins whose behaviour is data.
//!
//! Pair it with `forgesyte_deps::fake::FakeFs`: the fake filesystem holds the
//! manifests (and a file at each library path), the fake importer decides
//! what opening each library path does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forgesyte_errors::{ImportError, InitError, ToolError};
use parking_lot::Mutex;

use crate::host::{Importer, PluginInstance, PluginLibrary, ToolInfo};

/// What opening a fake library does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeBehavior {
    /// Opens, constructs, and offers the tools `echo` (returns its args),
    /// `fail` (returns an error) and `panic` (a caught panic; after
    /// `after_ms` milliseconds when its arguments say so).
    Good,
    /// Opening fails: the ABI version is wrong.
    WrongAbi,
    /// Opening fails: the entry symbol is missing.
    NoEntry,
    /// The constructor returns an error with this message.
    InitError(String),
    /// The constructor panics with this message.
    InitPanic(String),
    /// The constructor takes this long, then constructs as [`Good`](Self::Good).
    InitSlow(std::time::Duration),
    /// Opening fails for want of the host's own resources
    /// ([`ImportError::HostResources`]), with this detail.
    HostShort(String),
    /// Constructs as [`Good`](Self::Good); the instance's destructor takes
    /// this long (a plugin whose `Drop` joins a thread, flushes slowly).
    DropSlow(std::time::Duration),
}

/// An importer whose libraries are entries of a table.
#[derive(Debug, Default)]
pub struct FakeImporter {
    libraries: Mutex<BTreeMap<PathBuf, FakeBehavior>>,
    /// Every preparation and every `open`, in order.
    log: Mutex<Vec<(&'static str, PathBuf)>>,
}

impl FakeImporter {
    /// An importer that knows no library (every open is "not found").
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares what opening `path` does.
    pub fn with(self, path: impl Into<PathBuf>, behavior: FakeBehavior) -> Self {
        self.libraries.lock().insert(path.into(), behavior);
        self
    }

    /// Declares what opening `path` does (by reference).
    pub fn set(&self, path: impl Into<PathBuf>, behavior: FakeBehavior) {
        self.libraries.lock().insert(path.into(), behavior);
    }

    /// The preparations and opens so far, in order: `("prepare", path)`
    /// and `("open", path)`.
    pub fn log(&self) -> Vec<(&'static str, PathBuf)> {
        self.log.lock().clone()
    }
}

impl Importer for FakeImporter {
    fn prepare(&self, path: &Path) -> Result<crate::host::Prepared, ImportError> {
        self.log.lock().push(("prepare", path.to_path_buf()));
        Ok(crate::host::Prepared::default())
    }

    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        self.log.lock().push(("open", path.to_path_buf()));
        let behavior = self.libraries.lock().get(path).cloned();
        match behavior {
            None => Err(ImportError::LibraryNotFound {
                path: path.to_path_buf(),
            }),
            Some(FakeBehavior::WrongAbi) => Err(ImportError::AbiMismatch {
                path: path.to_path_buf(),
                host: forgesyte_protocol::abi::ABI_VERSION,
                plugin: 999,
            }),
            Some(FakeBehavior::NoEntry) => Err(ImportError::MissingEntrySymbol {
                path: path.to_path_buf(),
                symbol: "forgesyte_plugin_entry".into(),
            }),
            Some(FakeBehavior::HostShort(detail)) => Err(ImportError::HostResources {
                what: path.display().to_string(),
                detail,
            }),
            Some(b) => Ok(Arc::new(FakeLibrary(b))),
        }
    }
}

#[derive(Debug)]
struct FakeLibrary(FakeBehavior);

impl PluginLibrary for FakeLibrary {
    fn instantiate(&self, _config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError> {
        match &self.0 {
            FakeBehavior::InitError(message) => Err(InitError::Failed {
                message: message.clone(),
            }),
            FakeBehavior::InitPanic(message) => Err(InitError::Panicked {
                message: message.clone(),
            }),
            FakeBehavior::InitSlow(pause) => {
                std::thread::sleep(*pause);
                FakeLibrary(FakeBehavior::Good).instantiate(_config)
            }
            other => Ok(Box::new(FakeInstance {
                drop_takes: match other {
                    FakeBehavior::DropSlow(pause) => Some(*pause),
                    _ => None,
                },
                tools: ["echo", "fail", "panic"]
                    .into_iter()
                    .map(|id| ToolInfo {
                        id: id.into(),
                        title: id.into(),
                        description: format!("fake {id}"),
                        input_schema: serde_json::json!({"type": "object"}),
                        output_schema: serde_json::json!({}),
                    })
                    .collect(),
            })),
        }
    }
}

#[derive(Debug)]
struct FakeInstance {
    tools: Vec<ToolInfo>,
    /// How long its destructor takes ([`FakeBehavior::DropSlow`]).
    drop_takes: Option<std::time::Duration>,
}

impl Drop for FakeInstance {
    fn drop(&mut self) {
        if let Some(pause) = self.drop_takes {
            std::thread::sleep(pause);
        }
    }
}

impl PluginInstance for FakeInstance {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn call(&self, tool: &str, args: &[u8]) -> Result<Vec<u8>, ToolError> {
        match tool {
            "echo" => Ok(args.to_vec()),
            "fail" => Err(ToolError::Failed {
                error_type: Some("InvalidInput".into()),
                message: "fake failure".into(),
                traceback: Vec::new(),
            }),
            "panic" => {
                // `{"after_ms": N}`: a call still running when its caller
                // gives up on it, that panics after.
                let after = serde_json::from_slice::<serde_json::Value>(args)
                    .ok()
                    .and_then(|v| v.get("after_ms").and_then(serde_json::Value::as_u64));
                if let Some(ms) = after {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                Err(ToolError::Panicked {
                    message: "fake panic".into(),
                })
            }
            other => Err(ToolError::UnknownTool {
                plugin: String::new(),
                tool: other.into(),
            }),
        }
    }
}
