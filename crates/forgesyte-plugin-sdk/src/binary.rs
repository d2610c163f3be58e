//! Binary payloads for tools (ABI 3): a [`Call`] hands a tool its binary
//! arguments as borrowed byte slices (zero copy: the host's own buffers),
//! and an [`Output`] carries binary results beside the JSON result.
//!
//! Owns the plugin-facing shape of binary data and the fallback to JSON
//! (base64 strings at the same places) for callers that speak JSON only.
//! Knows nothing of the C ABI: `abi` turns its types into C structures.

use serde_json::Value;

use crate::plugin::ToolError;

/// One tool call as the host made it: the tool id, the JSON arguments and
/// the binary arguments, each a JSON Pointer into the arguments (where the
/// JSON holds a `null` placeholder) and the bytes, borrowed from the host
/// for the duration of the call.
///
/// An argument reaches a tool as bytes when the tool's input schema
/// declares it binary (`"format": "binary"` or `"contentEncoding":
/// "base64"`), whether the client sent it as raw bytes (multipart,
/// octet-stream) or as base64 in JSON: the host decodes it once.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    tool: &'a str,
    args: Value,
    binary: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Call<'a> {
    /// A call of `tool` with JSON `args` and no binary argument (for unit
    /// tests of a plugin, and for hosts of ABI 1).
    pub fn new(tool: &'a str, args: Value) -> Self {
        Call {
            tool,
            args,
            binary: Vec::new(),
        }
    }

    /// Adds the binary argument `bytes` at JSON Pointer `pointer` (e.g.
    /// `/image`; the arguments' placeholder is not touched).
    pub fn with_binary(mut self, pointer: &'a str, bytes: &'a [u8]) -> Self {
        self.binary.push((pointer, bytes));
        self
    }

    /// The tool's id.
    pub fn tool(&self) -> &'a str {
        self.tool
    }

    /// The JSON arguments (binary ones are `null` placeholders).
    pub fn args(&self) -> &Value {
        &self.args
    }

    /// The top-level binary argument `name` (JSON Pointer `/name`), if the
    /// host passed one.
    pub fn binary(&self, name: &str) -> Option<&'a [u8]> {
        self.binary
            .iter()
            .find(|(pointer, _)| {
                pointer
                    .strip_prefix('/')
                    .is_some_and(|token| unescape_eq(token, name))
            })
            .map(|(_, bytes)| *bytes)
    }

    /// The binary argument at JSON Pointer `pointer`, if any.
    pub fn binary_at(&self, pointer: &str) -> Option<&'a [u8]> {
        self.binary
            .iter()
            .find(|(p, _)| *p == pointer)
            .map(|(_, bytes)| *bytes)
    }

    /// Every binary argument, `(pointer, bytes)`, in the host's order.
    pub fn binaries(&self) -> impl ExactSizeIterator<Item = (&'a str, &'a [u8])> + '_ {
        self.binary.iter().copied()
    }

    /// The JSON arguments with each binary argument put at its place as a
    /// standard base64 string: what a plugin that implements only
    /// [`crate::Plugin::run`] receives (as it did under ABI 1).
    pub fn into_json_args(self) -> Result<Value, ToolError> {
        let mut args = self.args;
        for (pointer, bytes) in self.binary {
            forgesyte_protocol::wire::attach::place(&mut args, pointer, base64(bytes).into())
                .map_err(|e| ToolError::invalid_input(e.to_string()))?;
        }
        Ok(args)
    }
}

/// Whether RFC 6901 reference token `token` (escaped) names `name`.
fn unescape_eq(token: &str, name: &str) -> bool {
    if !token.contains('~') {
        return token == name;
    }
    token.replace("~1", "/").replace("~0", "~") == name
}

/// What a tool returns: its JSON result and binary results, each a JSON
/// Pointer into the result (where the JSON should hold a `null`
/// placeholder) and the bytes. The bytes go to the host without a copy.
///
/// ```
/// use forgesyte_plugin_sdk::Output;
/// use serde_json::json;
/// let out = Output::json(json!({"mask": null, "width": 2})).with_binary("/mask", vec![0, 255]);
/// assert_eq!(out.binary.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Output {
    /// The JSON result.
    pub json: Value,
    /// The binary results, `(pointer, bytes)`.
    pub binary: Vec<(String, Vec<u8>)>,
}

impl Output {
    /// A JSON-only result.
    pub fn json(json: Value) -> Self {
        Output {
            json,
            binary: Vec::new(),
        }
    }

    /// Adds binary result `bytes` at JSON Pointer `pointer` (e.g. `/mask`;
    /// `""` for the whole result). Put a `null` at that place in the JSON.
    pub fn with_binary(mut self, pointer: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        self.binary.push((pointer.into(), bytes.into()));
        self
    }

    /// The JSON with each binary result put at its place as a base64
    /// string: what a caller that takes JSON only (ABI 1's `call`) gets.
    pub fn into_json(self) -> Result<Value, ToolError> {
        self.placed(|bytes| base64(bytes).into())
            .map(|output| output.json)
    }

    /// This output with `value_of(bytes)` in its JSON at each binary
    /// result's place. The places the host would refuse (a fault that
    /// makes the plugin FAILED) are the tool's `InvalidOutput` error
    /// instead, through either ABI: two results in one place (one would be
    /// lost), or one with no place in the result.
    pub(crate) fn placed(self, value_of: impl Fn(&[u8]) -> Value) -> Result<Output, ToolError> {
        use forgesyte_protocol::wire::attach;
        if let Some(conflict) = attach::conflict(&self.binary) {
            return Err(ToolError::new("InvalidOutput", conflict.to_string()));
        }
        let mut json = self.json;
        for (pointer, bytes) in &self.binary {
            attach::place(&mut json, pointer, value_of(bytes)).map_err(|e| {
                ToolError::new(
                    "InvalidOutput",
                    format!("a binary result has no place in the result: {e}"),
                )
            })?;
        }
        Ok(Output {
            json,
            binary: self.binary,
        })
    }
}

impl From<Value> for Output {
    fn from(json: Value) -> Self {
        Output::json(json)
    }
}

/// Standard base64 (RFC 4648 §4, padded): the spelling of bytes in JSON.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    let sextet = |n: u32, shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(sextet(n, 18));
        out.push(sextet(n, 12));
        out.push(if chunk.len() > 1 { sextet(n, 6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(n, 0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_is_the_standard_padded_alphabet() {
        for (bytes, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"\x00\xff\xfe", "AP/+"),
        ] {
            assert_eq!(base64(bytes), text);
        }
    }

    #[test]
    fn binary_arguments_are_found_by_name_and_pointer_without_copies() {
        let image = vec![1u8, 2, 3];
        let call = Call::new("t", json!({"image": null, "a/b": null, "n": 1}))
            .with_binary("/image", &image)
            .with_binary("/a~1b", b"xy");
        let got = call.binary("image").unwrap_or_default();
        assert_eq!(got, &image[..]);
        assert!(std::ptr::eq(got.as_ptr(), image.as_ptr()), "copied");
        assert_eq!(call.binary("a/b"), Some(&b"xy"[..]));
        assert_eq!(call.binary_at("/a~1b"), Some(&b"xy"[..]));
        assert_eq!(call.binary("n"), None);
        assert_eq!(call.binaries().len(), 2);
        assert_eq!(call.tool(), "t");
        assert_eq!(
            call.into_json_args().ok(),
            Some(json!({"image": "AQID", "a/b": "eHk=", "n": 1}))
        );
        let bad = Call::new("t", json!({})).with_binary("/missing/x", b"1");
        assert!(bad.into_json_args().is_err());
    }

    #[test]
    fn outputs_fall_back_to_base64_in_json() {
        let out = Output::json(json!({"mask": null, "w": 2})).with_binary("/mask", vec![0, 255]);
        assert_eq!(
            out.clone().into_json().ok(),
            Some(json!({"mask": "AP8=", "w": 2}))
        );
        assert_eq!(Output::from(json!(1)).into_json().ok(), Some(json!(1)));
        let whole = Output::json(Value::Null).with_binary("", b"ab".to_vec());
        assert_eq!(whole.into_json().ok(), Some(json!("YWI=")));
    }
}
