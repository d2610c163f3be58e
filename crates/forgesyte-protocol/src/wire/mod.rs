//! The child-process wire protocol, version [`PROTOCOL_VERSION`]: how a
//! host and a runner process (native, Python, any language) talk over the
//! runner's stdin and stdout. `PROTOCOL.md` beside this crate is the
//! normative, language-neutral text; this module is its Rust rendering:
//! framing ([`frame`]), messages ([`message`]), attachment placement
//! ([`attach`]) and the version handshake ([`greeting`]).
//!
//! No I/O policy lives here: no processes, threads, timeouts or limits
//! beyond what a reader is told. The host's transport is in the loader.

pub mod attach;
pub mod context;
pub mod frame;
pub mod message;
#[cfg(feature = "shm")]
pub mod shm;

pub use self::context::{CallContext, LOG_TAG_PREFIX, LogTags, fit_request_id, valid_traceparent};
pub use self::frame::{
    Frame, FrameError, MAX_FRAME_BYTES, frame_length, read_body, read_frame, write_frame,
    write_frame_parts,
};
pub use self::message::{HELLO_ID, Hello, Request, Response, WireError, to_header};

use serde::Deserialize;

/// The protocol version this crate speaks. Host and runner must speak the
/// same one.
pub const PROTOCOL_VERSION: u32 = 2;

/// The environment variable through which the host tells a runner the
/// protocol version it speaks (informational: the runner's hello decides).
pub const PROTOCOL_ENV: &str = "FORGESYTE_PROTOCOL";

/// Capabilities a runner may announce in its hello.
pub mod capability {
    /// It accepts attachments in `call` and may send them in `result`.
    pub const ATTACHMENTS: &str = "attachments";
    /// It runs several calls at once (answers may come out of order).
    pub const CONCURRENT_CALLS: &str = "concurrent_calls";
    /// It takes attachments through shared memory (`PROTOCOL.md` §3.1)
    /// when the host offers a shared-memory socket.
    pub const SHARED_MEMORY: &str = "shared_memory";
}

/// The runner's first frame, checked.
#[derive(Debug, Clone)]
pub enum Greeting {
    /// Ready, speaking this protocol version.
    Hello(Hello),
    /// The plugin's code did not load.
    ImportFailed(WireError),
}

/// Why a first frame is not an acceptable greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The runner speaks another protocol version.
    Version {
        /// The host's ([`PROTOCOL_VERSION`]).
        host: u32,
        /// The runner's (1 for a runner that predates version numbers).
        runner: u32,
    },
    /// Not a hello or an import failure.
    Malformed {
        /// What was wrong.
        detail: String,
    },
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Version { host, runner } => write!(
                f,
                "the runner speaks protocol version {runner}, this host speaks version {host}"
            ),
            HandshakeError::Malformed { detail } => write!(f, "bad greeting: {detail}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Checks that two protocol versions can talk: the one place that decides.
pub fn check_version(host: u32, runner: u32) -> Result<(), HandshakeError> {
    if host == runner {
        Ok(())
    } else {
        Err(HandshakeError::Version { host, runner })
    }
}

/// What every version's first frame has in common.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "type")]
    kind: Option<String>,
    protocol: Option<u32>,
}

/// Decodes and checks a runner's first frame body (as read by
/// [`frame::read_body`]). A version-1 runner's frame (a length and bare
/// JSON) is recognised, so that the mismatch names both versions instead of
/// failing as garbage.
pub fn greeting(body: Vec<u8>) -> Result<Greeting, HandshakeError> {
    let malformed = |detail: String| HandshakeError::Malformed { detail };
    let legacy = body.first() == Some(&b'{');
    let header = match Frame::parse(body) {
        Ok(frame) => frame.header().to_vec(),
        Err(e) => {
            return Err(match e {
                FrameError::Malformed { .. } if legacy => HandshakeError::Version {
                    host: PROTOCOL_VERSION,
                    runner: 1,
                },
                other => malformed(other.to_string()),
            });
        }
    };
    let probe: Probe = serde_json::from_slice(&header).map_err(|e| {
        // An object with a field of the wrong type (`"protocol": "2"`) is
        // one, and said so.
        let object = header.trim_ascii_start().first() == Some(&b'{');
        malformed(if e.is_data() && object {
            format!("the first frame's header: {e}")
        } else {
            format!("the first frame is not a JSON object: {e}")
        })
    })?;
    if probe.kind.as_deref() == Some("hello") {
        check_version(PROTOCOL_VERSION, probe.protocol.unwrap_or(1))?;
    }
    match serde_json::from_slice::<Response>(&header) {
        Ok(Response::Hello(hello)) => Ok(Greeting::Hello(hello)),
        Ok(Response::ImportFailed { error }) => Ok(Greeting::ImportFailed(error)),
        Ok(other) => Err(malformed(format!(
            "expected a hello, got a '{}' message",
            response_kind(&other)
        ))),
        Err(e) => Err(malformed(e.to_string())),
    }
}

/// The `type` of a response, for messages.
pub fn response_kind(response: &Response) -> &'static str {
    match response {
        Response::Hello(_) => "hello",
        Response::ImportFailed { .. } => "import_failed",
        Response::Created { .. } => "created",
        Response::InitFailed { .. } => "init_failed",
        Response::Result { .. } => "result",
        Response::ToolFailed { .. } => "tool_failed",
    }
}

/// Strategies shared by the wire module's property tests.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;
    use serde_json::Value;

    /// Keys of every message, and a few more.
    pub(crate) const KEYS: &[&str] = &[
        "op",
        "type",
        "id",
        "config",
        "tool",
        "args",
        "attachments",
        "protocol",
        "runtime",
        "runtime_version",
        "pid",
        "capabilities",
        "error",
        "tools",
        "result",
        "kind",
        "message",
        "versions",
        "traceback",
        "context",
        "request_id",
        "traceparent",
        "trace_id",
        "0",
        "",
        "a/b",
        "~",
    ];

    /// Strings that are message values (`call`, `hello`, …), pointers, or
    /// anything.
    pub(crate) fn text() -> impl Strategy<Value = String> + Clone {
        prop_oneof![
            prop::sample::select(
                &[
                    "create",
                    "call",
                    "hello",
                    "import_failed",
                    "created",
                    "init_failed",
                    "result",
                    "tool_failed",
                    "/",
                    "/0",
                    "/a~1b",
                    "~",
                    "",
                ][..]
            )
            .prop_map(str::to_owned),
            ".{0,12}",
        ]
    }

    /// Any JSON value, at most 4 levels deep, its objects keyed mostly by
    /// message keys (so that decoders see right keys with wrong types).
    pub(crate) fn json() -> impl Strategy<Value = Value> + Clone {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            let key = prop_oneof![prop::sample::select(KEYS).prop_map(str::to_owned), ".{0,6}"];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(header: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, header.as_bytes(), &[]).unwrap();
        out.split_off(4)
    }

    #[test]
    fn a_hello_of_this_version_is_accepted() {
        let g = greeting(framed(
            r#"{"type":"hello","protocol":2,"runtime":"python","runtime_version":"3.11.7","pid":7,"capabilities":["attachments"]}"#,
        ))
        .unwrap();
        let Greeting::Hello(hello) = g else {
            panic!("{g:?}")
        };
        assert_eq!(hello.runtime, "python");
        assert!(hello.can(capability::ATTACHMENTS));
        assert!(!hello.can(capability::CONCURRENT_CALLS));
    }

    #[test]
    fn other_versions_are_named_never_garbage() {
        assert_eq!(
            greeting(framed(r#"{"type":"hello","protocol":3,"runtime":"x"}"#)).unwrap_err(),
            HandshakeError::Version { host: 2, runner: 3 }
        );
        // A version-1 runner: length + bare JSON, no protocol field.
        let v1 = br#"{"type":"hello","abi_version":1,"sdk_version":"0.1.0","pid":1}"#.to_vec();
        let err = greeting(v1).unwrap_err();
        assert_eq!(err, HandshakeError::Version { host: 2, runner: 1 });
        assert_eq!(
            err.to_string(),
            "the runner speaks protocol version 1, this host speaks version 2"
        );
    }

    #[test]
    fn import_failures_and_garbage() {
        let g = greeting(framed(
            r#"{"type":"import_failed","error":{"kind":"ModuleNotFound","message":"No module named 'x'","name":"x"}}"#,
        ))
        .unwrap();
        assert!(matches!(g, Greeting::ImportFailed(e) if e.name.as_deref() == Some("x")));
        for body in [
            b"\x00\x01garbage".to_vec(),
            framed("not json"),
            framed(r#"{"type":"result","id":1,"result":1}"#),
        ] {
            assert!(
                matches!(greeting(body), Err(HandshakeError::Malformed { .. })),
                "garbage accepted"
            );
        }
        // An object with a field of the wrong type is said to be one; an
        // array is not one.
        for (text, says) in [
            (
                r#"{"type":"hello","protocol":"2"}"#,
                "the first frame's header: invalid type: string \"2\"",
            ),
            ("[1,2,3]", "the first frame is not a JSON object"),
        ] {
            match greeting(framed(text)) {
                Err(HandshakeError::Malformed { detail }) => {
                    assert!(detail.starts_with(says), "{text}: {detail}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    proptest! {
        // Hostile first frames: 256 cases each, well under a second.
        #[test]
        fn arbitrary_first_frames_are_refused_with_a_reason(body in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Err(e) = greeting(body) {
                prop_assert!(e.to_string().len() > 10, "{e:?}");
            }
        }

        #[test]
        fn json_first_frames_are_refused_with_a_reason(value in strategies::json(), legacy in any::<bool>()) {
            let text = value.to_string();
            let body = if legacy { text.into_bytes() } else { framed(&text) };
            match greeting(body) {
                Ok(Greeting::Hello(hello)) => prop_assert_eq!(hello.protocol, PROTOCOL_VERSION),
                Ok(Greeting::ImportFailed(_)) => {}
                Err(e) => prop_assert!(e.to_string().len() > 10, "{e:?}"),
            }
        }
    }
}
