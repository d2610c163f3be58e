//! The host's typed errors, flattened to the protocol's [`WireError`] (a
//! `kind` and the facts it needs, see `PROTOCOL.md` "Errors") and back.
//! Only the loader knows both sides, so the conversions live here.

use std::path::{Path, PathBuf};

use forgesyte_errors::{ImportError, InitError, ToolError};
use forgesyte_protocol::wire::WireError;

/// The error class a runner answers a call with when it cannot start a
/// thread for it (`Failed`, no traceback): the host's 503, not the tool's
/// error.
pub(crate) const RUNNER_OVERLOADED: &str = "RunnerOverloaded";

/// Conversions between [`WireError`] and the host's errors.
pub(crate) trait WireErrorExt: Sized {
    /// Flattens an import error.
    fn import(e: &ImportError) -> Self;
    /// Turns a flattened import error back into the typed one; `library`
    /// stands in for a missing path.
    fn into_import(self, library: &Path) -> ImportError;
    /// Flattens a construction error.
    fn init(e: &InitError) -> Self;
    /// Turns a flattened construction error back into the typed one.
    fn into_init(self) -> InitError;
    /// Flattens a tool error.
    fn tool(e: &ToolError) -> Self;
    /// Turns a flattened tool error back into the typed one.
    fn into_tool(self) -> ToolError;
}

/// The most characters of a runner's error message the host keeps (the
/// Python runner's own bound, `errors.py`'s 64 Ki, and room for its note
/// of what it cut), of its error class, of a path or name it gives, and of
/// each traceback line; and the most traceback lines (the last ones). A
/// runner is the plugin's code: a message of 30 MB it wrote to the pipe
/// was every list's and health answer's reason.
const MAX_MESSAGE_CHARS: usize = 65 * 1024;
const MAX_TYPE_CHARS: usize = 256;
const MAX_NAME_CHARS: usize = 4096;
const MAX_TRACEBACK_LINE_CHARS: usize = 4096;
const MAX_TRACEBACK_LINES: usize = 32;

/// `w`, as a runner sent it, within the bounds above (`…` where cut).
fn bounded(mut w: WireError) -> WireError {
    let cut = |text: &mut String, max: usize| {
        if let std::borrow::Cow::Owned(cut) = forgesyte_errors::within(text, max) {
            *text = cut;
        }
    };
    cut(&mut w.kind, MAX_TYPE_CHARS);
    cut(&mut w.message, MAX_MESSAGE_CHARS);
    if let Some(error_type) = &mut w.error_type {
        cut(error_type, MAX_TYPE_CHARS);
    }
    for text in [&mut w.path, &mut w.name].into_iter().flatten() {
        cut(text, MAX_NAME_CHARS);
    }
    let extra = w.traceback.len().saturating_sub(MAX_TRACEBACK_LINES);
    w.traceback.drain(..extra);
    for line in &mut w.traceback {
        cut(line, MAX_TRACEBACK_LINE_CHARS);
    }
    w
}

/// A Python exception: kind `Python`, its class and message.
fn python(error_type: &str, message: &str, traceback: &[String]) -> WireError {
    let mut w = WireError::new("Python", message);
    w.error_type = Some(error_type.to_owned());
    w.traceback = traceback.to_vec();
    w
}

fn with_path(mut w: WireError, path: &Path) -> WireError {
    w.path = Some(path.display().to_string());
    w
}

impl WireErrorExt for WireError {
    fn import(e: &ImportError) -> Self {
        let at =
            |kind: &str, detail: &str, path: &Path| with_path(WireError::new(kind, detail), path);
        match e {
            ImportError::LibraryNotFound { path } => at("LibraryNotFound", "", path),
            ImportError::NotALibrary { path, detail } => at("NotALibrary", detail, path),
            ImportError::UnresolvedSymbol { path, detail } => at("UnresolvedSymbol", detail, path),
            ImportError::MissingSharedLibrary { path, detail } => {
                at("MissingSharedLibrary", detail, path)
            }
            ImportError::Open { path, detail } => at("Open", detail, path),
            // Typed causes end at the process boundary: the text crosses.
            ImportError::Io { path, source } => at("Open", &source.to_string(), path),
            ImportError::MissingEntrySymbol { path, symbol } => {
                let mut w = at("MissingEntrySymbol", "", path);
                w.name = Some(symbol.clone());
                w
            }
            ImportError::AbiMismatch { path, host, plugin } => {
                let mut w = at("AbiMismatch", "", path);
                w.versions = Some((*host, *plugin));
                w
            }
            ImportError::Incompatible { path, detail } => at("Incompatible", detail, path),
            ImportError::InvalidInterface { path, detail } => at("InvalidInterface", detail, path),
            ImportError::NotConfined { detail } => WireError::new("NotConfined", detail),
            ImportError::Python {
                error_type,
                message,
                traceback,
            } => python(error_type, message, traceback),
            other => WireError::new("Other", other.to_string()),
        }
    }

    fn into_import(self, library: &Path) -> ImportError {
        let w = bounded(self);
        let path = w.path.map_or_else(|| library.to_path_buf(), PathBuf::from);
        if w.kind == "Python" {
            return ImportError::Python {
                error_type: w.error_type.unwrap_or_else(|| "ImportError".into()),
                message: w.message,
                traceback: w.traceback,
            };
        }
        let detail = w.message;
        match w.kind.as_str() {
            "LibraryNotFound" => ImportError::LibraryNotFound { path },
            "NotALibrary" => ImportError::NotALibrary { path, detail },
            "UnresolvedSymbol" => ImportError::UnresolvedSymbol { path, detail },
            "MissingSharedLibrary" => ImportError::MissingSharedLibrary { path, detail },
            "MissingEntrySymbol" => ImportError::MissingEntrySymbol {
                path,
                symbol: w.name.unwrap_or_default(),
            },
            "AbiMismatch" => {
                let (host, plugin) = w.versions.unwrap_or_default();
                ImportError::AbiMismatch { path, host, plugin }
            }
            "Incompatible" => ImportError::Incompatible { path, detail },
            "InvalidInterface" => ImportError::InvalidInterface { path, detail },
            "NotConfined" => ImportError::NotConfined { detail },
            _ => ImportError::Open { path, detail },
        }
    }

    fn init(e: &InitError) -> Self {
        match e {
            InitError::Failed { message } => WireError::new("Failed", message),
            InitError::Panicked { message } => WireError::new("Panicked", message),
            InitError::Protocol { detail } => WireError::new("Protocol", detail),
            InitError::InvalidJson { what, source } => {
                WireError::new("Protocol", format!("{what} is not valid JSON: {source}"))
            }
            InitError::Python {
                error_type,
                message,
                traceback,
            } => python(error_type, message, traceback),
            other => WireError::new("Failed", other.to_string()),
        }
    }

    fn into_init(self) -> InitError {
        let w = bounded(self);
        match w.kind.as_str() {
            "Python" => InitError::Python {
                error_type: w.error_type.unwrap_or_else(|| "Exception".into()),
                message: w.message,
                traceback: w.traceback,
            },
            "Panicked" => InitError::Panicked { message: w.message },
            "Protocol" => InitError::Protocol { detail: w.message },
            _ => InitError::Failed { message: w.message },
        }
    }

    fn tool(e: &ToolError) -> Self {
        match e {
            ToolError::UnknownTool { tool, .. } => {
                let mut w = WireError::new("UnknownTool", "");
                w.name = Some(tool.clone());
                w
            }
            ToolError::InvalidArgs { message } => WireError::new("InvalidArgs", message),
            ToolError::Failed {
                error_type,
                message,
                traceback,
            } => {
                let mut w = WireError::new("Failed", message);
                w.error_type = error_type.clone();
                w.traceback = traceback.clone();
                w
            }
            ToolError::Panicked { message } => WireError::new("Panicked", message),
            ToolError::Protocol { detail } => WireError::new("Protocol", detail),
            ToolError::InvalidJson { what, source } => {
                WireError::new("Protocol", format!("{what} is not valid JSON: {source}"))
            }
            other => WireError::new("Protocol", other.to_string()),
        }
    }

    fn into_tool(self) -> ToolError {
        let w = bounded(self);
        match w.kind.as_str() {
            "UnknownTool" => ToolError::UnknownTool {
                plugin: String::new(),
                tool: w.name.unwrap_or_default(),
            },
            "InvalidArgs" => ToolError::InvalidArgs { message: w.message },
            // The runner's own: it could not start a thread for the call
            // (native and Python runners alike; a plugin's exception of
            // that name comes with its traceback).
            "Failed"
                if w.error_type.as_deref() == Some(RUNNER_OVERLOADED) && w.traceback.is_empty() =>
            {
                ToolError::RunnerOverloaded { detail: w.message }
            }
            "Failed" => ToolError::Failed {
                error_type: w.error_type,
                message: w.message,
                traceback: w.traceback,
            },
            "Panicked" => ToolError::Panicked { message: w.message },
            _ => ToolError::Protocol { detail: w.message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner that could not start a thread for a call says so as
    /// `Failed` of class `RunnerOverloaded`, without a traceback: the
    /// runner's lack, not the tool's error. A plugin's own exception of
    /// that name (it has a traceback) stays the tool's.
    #[test]
    fn a_runner_out_of_threads_is_not_the_tools_error() {
        let mut said = WireError::new("Failed", "can't start new thread");
        said.error_type = Some(RUNNER_OVERLOADED.into());
        assert_eq!(
            said.clone().into_tool(),
            ToolError::RunnerOverloaded {
                detail: "can't start new thread".into()
            }
        );
        said.traceback = vec!["  File \"plugin.py\", line 3, in run_tool".into()];
        assert!(matches!(said.into_tool(), ToolError::Failed { .. }));
    }

    /// What a runner sends is the plugin's code's: however long its
    /// texts, the host keeps the runner's own bounds of them.
    #[test]
    fn a_runners_error_texts_are_bounded() {
        let mut said = WireError::new("Failed", "m".repeat(10 * MAX_MESSAGE_CHARS));
        said.error_type = Some("T".repeat(100_000));
        said.traceback = (0..100_000)
            .map(|i| format!("{i}{}", "x".repeat(5000)))
            .collect();
        let ToolError::Failed {
            error_type,
            message,
            traceback,
        } = said.clone().into_tool()
        else {
            panic!("not Failed");
        };
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(
            error_type.map(|t| t.chars().count()),
            Some(MAX_TYPE_CHARS + 1)
        );
        assert_eq!(traceback.len(), MAX_TRACEBACK_LINES);
        assert!(traceback[MAX_TRACEBACK_LINES - 1].starts_with("99999x"));
        assert!(
            traceback
                .iter()
                .all(|l| l.chars().count() == MAX_TRACEBACK_LINE_CHARS + 1)
        );
        said.kind = "Python".into();
        let InitError::Python { message, .. } = said.clone().into_init() else {
            panic!("not Python");
        };
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
        said.kind = "NotALibrary".into();
        said.path = Some("/".repeat(100_000));
        let ImportError::NotALibrary { path, detail } = said.into_import("/l".as_ref()) else {
            panic!("not NotALibrary");
        };
        assert_eq!(path.as_os_str().len(), MAX_NAME_CHARS + "…".len());
        assert_eq!(detail.chars().count(), MAX_MESSAGE_CHARS + 1);
        // Within the bounds: as sent.
        let small = WireError::new("Panicked", "boom");
        assert_eq!(
            small.into_tool(),
            ToolError::Panicked {
                message: "boom".into()
            }
        );
    }

    #[test]
    fn python_exceptions_survive_the_wire_as_the_seed_reads_them() {
        use forgesyte_errors::PluginError;
        let import = ImportError::Python {
            error_type: "SyntaxError".into(),
            message: "invalid syntax (plugin.py, line 3)".into(),
            traceback: vec!["  File \"plugin.py\", line 3".into()],
        };
        let back = WireError::import(&import).into_import("/p".as_ref());
        assert_eq!(
            PluginError::from(back).reason(),
            "ImportError: SyntaxError: invalid syntax (plugin.py, line 3)"
        );
        let init = InitError::Python {
            error_type: "AttributeError".into(),
            message: "No 'Plugin' class found in module".into(),
            traceback: Vec::new(),
        };
        let back = WireError::init(&init).into_init();
        assert_eq!(
            PluginError::from(back).reason(),
            "InitError: AttributeError: No 'Plugin' class found in module"
        );
    }

    #[test]
    fn errors_survive_the_wire() {
        let imports = [
            ImportError::AbiMismatch {
                path: "/p/l.so".into(),
                host: 1,
                plugin: 999,
            },
            ImportError::MissingEntrySymbol {
                path: "/p/l.so".into(),
                symbol: "forgesyte_plugin_entry".into(),
            },
            ImportError::UnresolvedSymbol {
                path: "/p/l.so".into(),
                detail: "undefined symbol: x".into(),
            },
            ImportError::LibraryNotFound {
                path: "/p/l.so".into(),
            },
            ImportError::NotConfined {
                detail: "the plugin's runner could not confine itself: network: unconfined: x"
                    .into(),
            },
        ];
        for e in imports {
            let back = WireError::import(&e).into_import("/other".as_ref());
            assert_eq!(back.to_string(), e.to_string());
        }
        for e in [
            InitError::Failed {
                message: "no weights".into(),
            },
            InitError::Panicked {
                message: "boom".into(),
            },
        ] {
            assert_eq!(WireError::init(&e).into_init().to_string(), e.to_string());
        }
        for e in [
            ToolError::Failed {
                error_type: Some("InvalidInput".into()),
                message: "bad".into(),
                traceback: vec!["  File \"plugin.py\", line 9".into()],
            },
            ToolError::UnknownTool {
                plugin: String::new(),
                tool: "x".into(),
            },
            ToolError::InvalidArgs {
                message: "not JSON".into(),
            },
            ToolError::Protocol {
                detail: "odd".into(),
            },
        ] {
            assert_eq!(WireError::tool(&e).into_tool(), e);
        }
    }
}
