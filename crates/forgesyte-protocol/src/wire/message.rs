//! The messages: what the host sends ([`Request`], field `op`) and what a
//! runner answers ([`Response`], field `type`). `PROTOCOL.md` ("Messages")
//! is the normative text, with a JSON example of each.
//!
//! Payloads that are JSON already (construction config, tool arguments and
//! results) are embedded as JSON ([`RawValue`]): neither side escapes,
//! re-parses or re-encodes what the other produced.
//!
//! Decoding goes through one flat envelope per direction (serde cannot
//! decode a [`RawValue`] inside an internally tagged enum), so a message is
//! parsed in one pass and unknown fields are ignored. A payload present as
//! `null` is a payload, never a missing field. Nesting deeper than
//! `serde_json`'s limit (128) is an error where a decoder builds values
//! (tool specs); embedded payloads are skipped without recursion.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::tool::ToolSpec;
use crate::wire::context::CallContext;

/// Id of the hello frame (requests start at 1).
pub const HELLO_ID: u64 = 0;

/// From the host to the runner.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Construct the runner's (one) plugin instance.
    Create {
        /// Request id.
        id: u64,
        /// `{"manifest", "plugin_dir", "models"}`.
        config: Box<RawValue>,
    },
    /// Run a tool.
    Call {
        /// Request id.
        id: u64,
        /// Tool id.
        tool: String,
        /// The arguments (a JSON object).
        args: Box<RawValue>,
        /// Where attachment `i` goes in `args`: a JSON Pointer (RFC 6901);
        /// absent when the frame has no attachments.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<String>,
        /// Who the call is for (request id, `traceparent`); absent when
        /// there is nothing to say.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<CallContext>,
    },
}

impl Request {
    /// The request id.
    pub fn id(&self) -> u64 {
        match self {
            Request::Create { id, .. } | Request::Call { id, .. } => *id,
        }
    }
}

/// The runner's first frame when it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the runner speaks ([`crate::wire::PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// The runtime: `native`, `python`, …
    pub runtime: String,
    /// Its version, e.g. `ABI 1, SDK 0.1.0` or `3.11.7`.
    pub runtime_version: String,
    /// The runner's process id.
    pub pid: u32,
    /// What it can do beyond the required core (see [`crate::wire::capability`]).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The sandbox the runner put itself in, when the host asked for one
    /// (`--confine`): `filesystem`, `network`, `env`, each either what is
    /// enforced or `unconfined: why`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confinement: Option<BTreeMap<String, String>>,
    /// The signal on which the runner writes the stacks of its threads to
    /// its stderr (Python's `faulthandler`), when it has one: the host
    /// sends it before it kills the runner for a timeout, to say where the
    /// plugin's code was stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_signal: Option<i32>,
}

impl Hello {
    /// Whether the runner announced `capability`.
    pub fn can(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// From the runner to the host.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The plugin's code is loaded; the runner waits for `create`.
    Hello(Hello),
    /// The plugin's code could not be loaded; the runner exits next.
    ImportFailed {
        /// Why.
        error: WireError,
    },
    /// The instance exists.
    Created {
        /// Request id.
        id: u64,
        /// Its tools.
        tools: Vec<ToolSpec>,
    },
    /// The constructor failed.
    InitFailed {
        /// Request id.
        id: u64,
        /// Why.
        error: WireError,
    },
    /// A tool call's result.
    Result {
        /// Request id.
        id: u64,
        /// The result (any JSON value).
        result: Box<RawValue>,
        /// Where attachment `i` goes in `result`: a JSON Pointer.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<String>,
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
    /// The request id this answers ([`HELLO_ID`] for the first frame).
    pub fn id(&self) -> u64 {
        match self {
            Response::Hello(_) | Response::ImportFailed { .. } => HELLO_ID,
            Response::Created { id, .. }
            | Response::InitFailed { id, .. }
            | Response::Result { id, .. }
            | Response::ToolFailed { id, .. } => *id,
        }
    }
}

/// An error, flat: a `kind` from the lists in `PROTOCOL.md` ("Errors") and
/// the facts that kind needs. The host turns it back into its typed errors.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WireError {
    /// The kind (`AbiMismatch`, `Panicked`, `Failed`, …).
    pub kind: String,
    /// Its message or detail.
    #[serde(default)]
    pub message: String,
    /// A tool error's own class (for Python: the exception's class name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// The file concerned (import errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A missing symbol, module or tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The two versions of a mismatch: (host's, plugin's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<(u32, u32)>,
    /// The last lines of a traceback, for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traceback: Vec<String>,
}

impl WireError {
    /// An error of `kind` with `message`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        WireError {
            kind: kind.into(),
            message: message.into(),
            ..WireError::default()
        }
    }
}

/// Serialises a message to the JSON bytes of a frame header.
pub fn to_header(message: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(message)
}

/// Every field any request may have.
#[derive(Deserialize)]
struct RequestEnvelope {
    op: String,
    id: u64,
    // `args` is any JSON (PROTOCOL.md), `null` included: a present `null`
    // is a value, not a missing field (as `result` in a response).
    #[serde(default, deserialize_with = "present")]
    config: Option<Box<RawValue>>,
    tool: Option<String>,
    #[serde(default, deserialize_with = "present")]
    args: Option<Box<RawValue>>,
    #[serde(default)]
    attachments: Vec<String>,
    context: Option<CallContext>,
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let e = RequestEnvelope::deserialize(d)?;
        let missing = |field: &str| D::Error::custom(format!("'{}' needs '{field}'", e.op));
        match e.op.as_str() {
            "create" => Ok(Request::Create {
                id: e.id,
                config: e.config.clone().ok_or_else(|| missing("config"))?,
            }),
            "call" => Ok(Request::Call {
                id: e.id,
                tool: e.tool.clone().ok_or_else(|| missing("tool"))?,
                args: e.args.clone().ok_or_else(|| missing("args"))?,
                attachments: e.attachments,
                context: e.context,
            }),
            other => Err(D::Error::custom(format!("unknown op '{other}'"))),
        }
    }
}

/// Every field any response may have.
#[derive(Deserialize)]
struct ResponseEnvelope {
    #[serde(rename = "type")]
    kind: String,
    id: Option<u64>,
    protocol: Option<u32>,
    runtime: Option<String>,
    runtime_version: Option<String>,
    pid: Option<u32>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    confinement: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stack_signal: Option<i32>,
    error: Option<WireError>,
    tools: Option<Vec<ToolSpec>>,
    // A present `null` is a result (a tool that returned None), not absent.
    #[serde(default, deserialize_with = "present")]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    attachments: Vec<String>,
}

/// `Some` for any present value, `null` included.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let e = ResponseEnvelope::deserialize(d)?;
        let kind = e.kind.clone();
        let missing = |field: &str| D::Error::custom(format!("'{kind}' needs '{field}'"));
        Ok(match e.kind.as_str() {
            "hello" => Response::Hello(Hello {
                protocol: e.protocol.ok_or_else(|| missing("protocol"))?,
                runtime: e.runtime.ok_or_else(|| missing("runtime"))?,
                runtime_version: e.runtime_version.unwrap_or_default(),
                pid: e.pid.ok_or_else(|| missing("pid"))?,
                capabilities: e.capabilities,
                confinement: e.confinement,
                stack_signal: e.stack_signal,
            }),
            "import_failed" => Response::ImportFailed {
                error: e.error.ok_or_else(|| missing("error"))?,
            },
            "created" => Response::Created {
                id: e.id.ok_or_else(|| missing("id"))?,
                tools: e.tools.ok_or_else(|| missing("tools"))?,
            },
            "init_failed" => Response::InitFailed {
                id: e.id.ok_or_else(|| missing("id"))?,
                error: e.error.ok_or_else(|| missing("error"))?,
            },
            "result" => Response::Result {
                id: e.id.ok_or_else(|| missing("id"))?,
                result: e.result.ok_or_else(|| missing("result"))?,
                attachments: e.attachments,
            },
            "tool_failed" => Response::ToolFailed {
                id: e.id.ok_or_else(|| missing("id"))?,
                error: e.error.ok_or_else(|| missing("error"))?,
            },
            other => return Err(D::Error::custom(format!("unknown message type '{other}'"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies;
    use proptest::prelude::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn requests_round_trip_with_their_json_untouched() {
        let call = Request::Call {
            id: 2,
            tool: "echo".into(),
            args: raw(r#"{"text": "a \"b\"", "image": null}"#),
            attachments: vec!["/image".into()],
            context: None,
        };
        let text = serde_json::to_string(&call).unwrap();
        assert_eq!(
            text,
            r#"{"op":"call","id":2,"tool":"echo","args":{"text": "a \"b\"", "image": null},"attachments":["/image"]}"#
        );
        let Request::Call {
            args, attachments, ..
        } = serde_json::from_str(&text).unwrap()
        else {
            panic!("not a call")
        };
        assert_eq!(args.get(), r#"{"text": "a \"b\"", "image": null}"#);
        assert_eq!(attachments, ["/image"]);
        let create = Request::Create {
            id: 1,
            config: raw(r#"{"manifest":{}}"#),
        };
        let text = serde_json::to_string(&create).unwrap();
        assert_eq!(text, r#"{"op":"create","id":1,"config":{"manifest":{}}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap().id(), 1);
        // The call's context: absent when none, kept when present; its
        // unknown fields are ignored (a later host may say more).
        assert!(matches!(
            serde_json::from_str(r#"{"op":"call","id":1,"tool":"t","args":{}}"#).unwrap(),
            Request::Call { context: None, .. }
        ));
        let traced = r#"{"op":"call","id":3,"tool":"t","args":{},"context":{"request_id":"abc-123","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","baggage":"x"}}"#;
        let Request::Call {
            context: Some(context),
            ..
        } = serde_json::from_str(traced).unwrap()
        else {
            panic!("no context in {traced}")
        };
        assert_eq!(context.request_id.as_deref(), Some("abc-123"));
        assert_eq!(context.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // A context that is not an object of strings is a malformed call.
        for bad in [
            r#"{"op":"call","id":1,"tool":"t","args":{},"context":"abc"}"#,
            r#"{"op":"call","id":1,"tool":"t","args":{},"context":{"request_id":7}}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        // A present `null` is arguments (found by `any_request_round_trips`).
        let null: Request =
            serde_json::from_str(r#"{"op":"call","id":1,"tool":"t","args":null}"#).unwrap();
        assert!(matches!(null, Request::Call { ref args, .. } if args.get() == "null"));
        for bad in [
            r#"{"op":"call","id":1,"tool":"t"}"#,
            r#"{"op":"call","id":1,"args":{}}"#,
            r#"{"op":"frobnicate","id":1}"#,
            r#"{"id":1}"#,
            r#"{"op":"create"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let messages = [
            Response::Hello(Hello {
                protocol: 2,
                runtime: "native".into(),
                runtime_version: "ABI 1".into(),
                pid: 9,
                capabilities: vec!["attachments".into()],
                confinement: Some(BTreeMap::from([("network".into(), "allowed".into())])),
                stack_signal: Some(12),
            }),
            Response::ImportFailed {
                error: WireError::new("Open", "no"),
            },
            Response::Created {
                id: 1,
                tools: vec![ToolSpec::new("echo")],
            },
            Response::InitFailed {
                id: 1,
                error: WireError::new("Failed", "x"),
            },
            Response::Result {
                id: 3,
                result: raw("[1,2]"),
                attachments: vec!["/1".into()],
            },
            Response::ToolFailed {
                id: 4,
                error: WireError::new("Panicked", "boom"),
            },
        ];
        for m in messages {
            let text = serde_json::to_string(&m).unwrap();
            let back: Response = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), text);
            assert_eq!(back.id(), m.id());
        }
        assert!(serde_json::from_str::<Response>(r#"{"type":"result","id":1}"#).is_err());
        let null: Response =
            serde_json::from_str(r#"{"type":"result","id":1,"result":null}"#).unwrap();
        assert!(matches!(null, Response::Result { ref result, .. } if result.get() == "null"));
        assert!(serde_json::from_str::<Response>(r#"{"type":"bye"}"#).is_err());
    }

    /// Decodes `bytes` both ways; every refusal says why.
    fn decode_both(bytes: &[u8]) -> Result<(), TestCaseError> {
        for err in [
            serde_json::from_slice::<Request>(bytes).err(),
            serde_json::from_slice::<Response>(bytes).err(),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(err.to_string().len() > 5, "{err:?}");
        }
        Ok(())
    }

    fn request() -> impl Strategy<Value = Request> {
        let args = strategies::json().prop_map(|v| raw(&v.to_string()));
        prop_oneof![
            (any::<u64>(), args.clone()).prop_map(|(id, config)| Request::Create { id, config }),
            (
                any::<u64>(),
                strategies::text(),
                args,
                prop::collection::vec(strategies::text(), 0..3),
                prop::option::of(
                    (
                        prop::option::of(strategies::text()),
                        prop::option::of(strategies::text())
                    )
                        .prop_map(|(request_id, traceparent)| CallContext {
                            request_id,
                            traceparent
                        })
                ),
            )
                .prop_map(|(id, tool, args, attachments, context)| Request::Call {
                    id,
                    tool,
                    args,
                    attachments,
                    context,
                }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        let error = (
            strategies::text(),
            strategies::text(),
            any::<Option<(u32, u32)>>(),
        )
            .prop_map(|(kind, message, versions)| WireError {
                versions,
                ..WireError::new(kind, message)
            });
        prop_oneof![
            (any::<u32>(), strategies::text(), any::<u32>()).prop_map(
                |(protocol, runtime, pid)| {
                    Response::Hello(Hello {
                        protocol,
                        runtime,
                        runtime_version: String::new(),
                        pid,
                        capabilities: vec!["attachments".into()],
                        confinement: None,
                        stack_signal: None,
                    })
                }
            ),
            error
                .clone()
                .prop_map(|error| Response::ImportFailed { error }),
            (
                any::<u64>(),
                prop::collection::vec(
                    // A tool id is never "", "." or "..", nor holds a
                    // control character (`tool::tool_id`).
                    strategies::text().prop_filter("a tool id a URL can carry", |t| {
                        !matches!(t.as_str(), "" | "." | "..") && !t.chars().any(char::is_control)
                    }),
                    0..3
                )
            )
                .prop_map(|(id, ids)| Response::Created {
                    id,
                    tools: ids.into_iter().map(ToolSpec::new).collect(),
                }),
            (any::<u64>(), error.clone())
                .prop_map(|(id, error)| Response::InitFailed { id, error }),
            (
                any::<u64>(),
                strategies::json(),
                prop::collection::vec(strategies::text(), 0..3)
            )
                .prop_map(|(id, result, attachments)| Response::Result {
                    id,
                    result: raw(&result.to_string()),
                    attachments,
                }),
            (any::<u64>(), error).prop_map(|(id, error)| Response::ToolFailed { id, error }),
        ]
    }

    proptest! {
        // 256 cases each (the default): each runs in well under a second.
        #[test]
        fn arbitrary_bytes_are_refused_with_a_reason(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            decode_both(&bytes)?;
        }

        /// JSON with the messages' keys and values of any type in them.
        #[test]
        fn json_of_any_shape_is_decoded_or_refused_with_a_reason(value in strategies::json()) {
            decode_both(value.to_string().as_bytes())?;
        }

        /// Nesting far past the parser's depth limit (128) is refused, not a
        /// stack overflow, where the decoder builds values (a tool spec's
        /// schema); embedded raw JSON (`args`, `result`) is skipped without
        /// recursion and kept as it came.
        #[test]
        fn deep_nesting_is_refused_or_kept_raw(depth in 130usize..5_000, open in prop::sample::select(&["[", "{\"a\":"][..])) {
            let close = if open == "[" { "]" } else { "}" };
            let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let schema = format!(r#"{{"type":"created","id":1,"tools":[{{"id":"t","input_schema":{nested}}}]}}"#);
            let decoded = serde_json::from_str::<Response>(&schema);
            prop_assert!(
                decoded.as_ref().is_err_and(|e| e.to_string().contains("recursion limit")),
                "{decoded:?}"
            );
            let result = format!(r#"{{"type":"result","id":1,"result":{nested}}}"#);
            let decoded = serde_json::from_str::<Response>(&result);
            prop_assert!(
                matches!(&decoded, Ok(Response::Result { result, .. }) if result.get() == nested),
                "{decoded:?}"
            );
            decode_both(nested.as_bytes())?;
        }

        /// A request survives encoding and decoding, its JSON byte for byte.
        #[test]
        fn any_request_round_trips(request in request()) {
            let text = to_header(&request).unwrap();
            let back: Request = serde_json::from_slice(&text).unwrap();
            prop_assert_eq!(to_header(&back).unwrap(), text);
            prop_assert_eq!(back.id(), request.id());
        }

        #[test]
        fn any_response_round_trips(response in response()) {
            let text = to_header(&response).unwrap();
            let back: Response = serde_json::from_slice(&text).unwrap();
            prop_assert_eq!(to_header(&back).unwrap(), text);
            prop_assert_eq!(back.id(), response.id());
        }
    }
}
