//! The framed protocol between the host and a runner process.
//!
//! A frame is a `u32` little-endian length followed by that many bytes of
//! one JSON message. The host writes [`Request`]s to the runner's stdin; the
//! runner writes [`Response`]s to a private copy of its original stdout
//! (fd 1 itself is pointed at stderr, so a plugin's `println!` cannot corrupt
//! the stream). Every request carries an id and every answer repeats it, so
//! several calls can be in flight at once; the unsolicited first frame is the
//! [`Response::Hello`] (or [`Response::ImportFailed`]).
//!
//! Payloads that are JSON already (construction config, tool arguments and
//! results) travel as JSON *text* in a string, so neither side re-encodes
//! what the plugin produced. Errors travel as [`WireError`], a flat
//! description of the host's typed errors that turns back into them.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use forgesyte_errors::{ImportError, InitError, ToolError};
use serde::{Deserialize, Serialize};

use crate::host::ToolInfo;

/// Id of the hello frame (requests start at 1).
pub(crate) const HELLO_ID: u64 = 0;

/// From the host to the runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Construct the (one) instance from the config JSON text.
    Create {
        /// Request id.
        id: u64,
        /// `{"manifest", "plugin_dir", "models"}` as JSON text.
        config: String,
    },
    /// Run a tool.
    Call {
        /// Request id.
        id: u64,
        /// Tool id.
        tool: String,
        /// Arguments as JSON text.
        args: String,
    },
}

/// From the runner to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Response {
    /// The library is loaded and speaks the host's ABI.
    Hello {
        /// The ABI version the runner checked the library against.
        abi_version: u32,
        /// The SDK version the plugin reports.
        sdk_version: String,
        /// The runner's process id.
        pid: u32,
    },
    /// The library could not be loaded; the runner exits next.
    ImportFailed {
        /// Why.
        error: WireError,
    },
    /// The instance exists.
    Created {
        /// Request id.
        id: u64,
        /// Its tools.
        tools: Vec<ToolInfo>,
    },
    /// The constructor failed.
    InitFailed {
        /// Request id.
        id: u64,
        /// Why.
        error: WireError,
    },
    /// A tool call's result, as JSON text.
    Result {
        /// Request id.
        id: u64,
        /// The result JSON text.
        result: String,
    },
    /// A tool call's error.
    ToolFailed {
        /// Request id.
        id: u64,
        /// Why.
        error: WireError,
    },
}

impl Response {
    /// The request id this answers ([`HELLO_ID`] for the hello frames).
    pub(crate) fn id(&self) -> u64 {
        match self {
            Response::Hello { .. } | Response::ImportFailed { .. } => HELLO_ID,
            Response::Created { id, .. }
            | Response::InitFailed { id, .. }
            | Response::Result { id, .. }
            | Response::ToolFailed { id, .. } => *id,
        }
    }
}

/// A typed host error, flattened for the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireError {
    /// The variant's name (`AbiMismatch`, `Panicked`, ...).
    pub(crate) kind: String,
    /// Its message or detail.
    pub(crate) message: String,
    /// A tool error's own class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error_type: Option<String>,
    /// The library, for import errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<PathBuf>,
    /// A missing symbol or an unknown tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// ABI versions (host, plugin) of a mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) versions: Option<(u32, u32)>,
}

impl WireError {
    fn new(kind: &str, message: impl Into<String>) -> Self {
        WireError {
            kind: kind.to_owned(),
            message: message.into(),
            error_type: None,
            path: None,
            name: None,
            versions: None,
        }
    }

    fn with_path(mut self, path: &std::path::Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }

    /// Flattens an import error.
    pub(crate) fn import(e: &ImportError) -> Self {
        match e {
            ImportError::LibraryNotFound { path } => {
                WireError::new("LibraryNotFound", "").with_path(path)
            }
            ImportError::NotALibrary { path, detail } => {
                WireError::new("NotALibrary", detail).with_path(path)
            }
            ImportError::UnresolvedSymbol { path, detail } => {
                WireError::new("UnresolvedSymbol", detail).with_path(path)
            }
            ImportError::MissingSharedLibrary { path, detail } => {
                WireError::new("MissingSharedLibrary", detail).with_path(path)
            }
            ImportError::Open { path, detail } => WireError::new("Open", detail).with_path(path),
            ImportError::MissingEntrySymbol { path, symbol } => {
                let mut w = WireError::new("MissingEntrySymbol", "").with_path(path);
                w.name = Some(symbol.clone());
                w
            }
            ImportError::AbiMismatch { path, host, plugin } => {
                let mut w = WireError::new("AbiMismatch", "").with_path(path);
                w.versions = Some((*host, *plugin));
                w
            }
            ImportError::Incompatible { path, detail } => {
                WireError::new("Incompatible", detail).with_path(path)
            }
            ImportError::InvalidInterface { path, detail } => {
                WireError::new("InvalidInterface", detail).with_path(path)
            }
            other => WireError::new("Other", other.to_string()),
        }
    }

    /// Turns a flattened import error back into the typed one; `library`
    /// stands in for a missing path.
    pub(crate) fn into_import(self, library: &std::path::Path) -> ImportError {
        let path = self.path.unwrap_or_else(|| library.to_path_buf());
        let detail = self.message;
        match self.kind.as_str() {
            "LibraryNotFound" => ImportError::LibraryNotFound { path },
            "NotALibrary" => ImportError::NotALibrary { path, detail },
            "UnresolvedSymbol" => ImportError::UnresolvedSymbol { path, detail },
            "MissingSharedLibrary" => ImportError::MissingSharedLibrary { path, detail },
            "MissingEntrySymbol" => ImportError::MissingEntrySymbol {
                path,
                symbol: self.name.unwrap_or_default(),
            },
            "AbiMismatch" => {
                let (host, plugin) = self.versions.unwrap_or_default();
                ImportError::AbiMismatch { path, host, plugin }
            }
            "Incompatible" => ImportError::Incompatible { path, detail },
            "InvalidInterface" => ImportError::InvalidInterface { path, detail },
            _ => ImportError::Open { path, detail },
        }
    }

    /// Flattens a construction error.
    pub(crate) fn init(e: &InitError) -> Self {
        match e {
            InitError::Failed { message } => WireError::new("Failed", message),
            InitError::Panicked { message } => WireError::new("Panicked", message),
            InitError::Protocol { detail } => WireError::new("Protocol", detail),
            other => WireError::new("Failed", other.to_string()),
        }
    }

    /// Turns a flattened construction error back into the typed one.
    pub(crate) fn into_init(self) -> InitError {
        match self.kind.as_str() {
            "Panicked" => InitError::Panicked {
                message: self.message,
            },
            "Protocol" => InitError::Protocol {
                detail: self.message,
            },
            _ => InitError::Failed {
                message: self.message,
            },
        }
    }

    /// Flattens a tool error.
    pub(crate) fn tool(e: &ToolError) -> Self {
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
            } => {
                let mut w = WireError::new("Failed", message);
                w.error_type = error_type.clone();
                w
            }
            ToolError::Panicked { message } => WireError::new("Panicked", message),
            ToolError::Protocol { detail } => WireError::new("Protocol", detail),
            other => WireError::new("Protocol", other.to_string()),
        }
    }

    /// Turns a flattened tool error back into the typed one.
    pub(crate) fn into_tool(self) -> ToolError {
        match self.kind.as_str() {
            "UnknownTool" => ToolError::UnknownTool {
                plugin: String::new(),
                tool: self.name.unwrap_or_default(),
            },
            "InvalidArgs" => ToolError::InvalidArgs {
                message: self.message,
            },
            "Failed" => ToolError::Failed {
                error_type: self.error_type,
                message: self.message,
            },
            "Panicked" => ToolError::Panicked {
                message: self.message,
            },
            _ => ToolError::Protocol {
                detail: self.message,
            },
        }
    }
}

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The stream ended cleanly, between frames.
    Eof,
    /// The announced length is over the limit (the body was not read).
    TooLarge {
        /// Announced length.
        len: u64,
    },
    /// The stream broke (or ended inside a frame).
    Io(io::Error),
}

/// Writes one frame (length and body in a single `write_all`).
pub(crate) fn write_frame(w: &mut impl Write, message: &impl Serialize) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one frame whose body is at most `limit` bytes.
pub(crate) fn read_frame(r: &mut impl Read, limit: u64) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Eof),
            Ok(0) => {
                return Err(FrameError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended inside a frame header",
                )));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u64::from(u32::from_le_bytes(header));
    if len > limit {
        return Err(FrameError::TooLarge { len });
    }
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body).map_err(FrameError::Io)?;
    if (body.len() as u64) < len {
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("stream ended inside a {len}-byte frame"),
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_frame<T: Serialize + for<'de> Deserialize<'de>>(message: &T) -> T {
        let mut buf = Vec::new();
        write_frame(&mut buf, message).unwrap();
        let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, buf.len());
        let body = read_frame(&mut buf.as_slice(), 1 << 20).unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let requests = [
            Request::Create {
                id: 1,
                config: r#"{"manifest":{}}"#.into(),
            },
            Request::Call {
                id: 2,
                tool: "echo".into(),
                args: "[1,2]".into(),
            },
        ];
        for r in requests {
            assert_eq!(round_trip_frame(&r), r);
        }
        let responses = [
            Response::Hello {
                abi_version: 1,
                sdk_version: "0.1.0".into(),
                pid: 42,
            },
            Response::Result {
                id: 7,
                result: "{\"a\":1}".into(),
            },
            Response::ToolFailed {
                id: 8,
                error: WireError::tool(&ToolError::Panicked {
                    message: "boom".into(),
                }),
            },
        ];
        for r in responses {
            assert_eq!(round_trip_frame(&r).id(), r.id());
            assert_eq!(round_trip_frame(&r), r);
        }
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

    #[test]
    fn frames_are_bounded_and_truncation_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &"x".repeat(100)).unwrap();
        assert!(matches!(
            read_frame(&mut buf.as_slice(), 10),
            Err(FrameError::TooLarge { len: 102 })
        ));
        assert!(matches!(
            read_frame(&mut &buf[..50], 1000),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &buf[..2], 1000),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &[][..], 1000),
            Err(FrameError::Eof)
        ));
    }
}
