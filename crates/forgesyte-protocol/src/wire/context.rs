//! The context a `call` carries (`PROTOCOL.md` §5.4, field `context`): the
//! request id of the call's HTTP request and its W3C `traceparent`, so
//! that a plugin can read them and its log lines can name them, and the
//! stderr log tags a runner puts before a log line made during a call
//! (§8, "Stderr").
//!
//! Pure data and parsing: this module knows nothing of HTTP headers, the
//! server or the log; the server builds a [`CallContext`] from its request,
//! the host writes it into the call and reads [`LogTags`] back.

use serde::{Deserialize, Serialize};

/// Who a tool call is for: the request id and trace context of the request
/// that made it. Both parts are optional; an empty context is not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallContext {
    /// The request's id (the server's `x-request-id`: the client's, or
    /// one the server made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// A valid W3C `traceparent` (see [`valid_traceparent`]); never an
    /// invalid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl CallContext {
    /// A context with `request_id` and `traceparent`, the latter only if it
    /// is valid ([`valid_traceparent`], surrounding blanks trimmed): an
    /// invalid one is dropped, never an error.
    pub fn new(request_id: Option<&str>, traceparent: Option<&str>) -> Self {
        CallContext {
            request_id: request_id.map(str::to_owned),
            traceparent: traceparent
                .map(str::trim)
                .filter(|t| valid_traceparent(t))
                .map(str::to_owned),
        }
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.request_id.is_none() && self.traceparent.is_none()
    }

    /// The trace id (the 32 hex digits of the `traceparent`), if any.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref().and_then(trace_id)
    }
}

/// Whether `text` is a W3C Trace Context `traceparent` of version `00`:
/// `00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex digits, neither the trace
/// id nor the parent id all zeros. Other versions are not accepted.
pub fn valid_traceparent(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zeros = |s: &str| s.bytes().all(|b| b == b'0');
    match parts[..] {
        ["00", trace, parent, flags] => {
            hex(trace, 32) && hex(parent, 16) && hex(flags, 2) && !zeros(trace) && !zeros(parent)
        }
        _ => false,
    }
}

/// Whether `id` is a request id the host writes into log lines as it is:
/// 1 to 128 visible ASCII characters other than `"` and `\\` (a UUID, a
/// trace id, `job-42/7`). Spaces would let whoever chose it forge a line's
/// fields (`x plugin=other`).
pub fn fit_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\'))
}

/// Whether `id` is a trace id: 32 lower-case hex digits.
fn fit_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    valid_traceparent(traceparent).then(|| &traceparent[3..35])
}

/// What a runner puts before a log line made during a call, so that the
/// host can log the line with the call's request id and trace id:
/// [`LOG_TAG_PREFIX`], a JSON object of these fields, one space, then the
/// line (e.g. `@call {"request_id":"abc-123"} INFO ocr: started`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTags {
    /// The call's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The call's trace id (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// The marker at the start of a tagged stderr line.
pub const LOG_TAG_PREFIX: &str = "@call ";

impl LogTags {
    /// The tags of a stderr line and the rest of the line, or `None` and
    /// the whole line when it carries none (no prefix, or a prefix not
    /// followed by a JSON object of string fields and a space). A tag
    /// whose value does not fit ([`fit_request_id`], a trace id of 32 hex
    /// digits) is dropped: the plugin's process writes these, and its
    /// values go into the host's log lines as they are.
    pub fn split(line: &str) -> (Option<LogTags>, &str) {
        // An object only (serde would take an array for a struct too).
        let Some(rest) = line
            .strip_prefix(LOG_TAG_PREFIX)
            .filter(|rest| rest.starts_with('{'))
        else {
            return (None, line);
        };
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<LogTags>();
        match stream.next() {
            Some(Ok(mut tags)) => {
                tags.request_id = tags.request_id.filter(|id| fit_request_id(id.as_bytes()));
                tags.trace_id = tags.trace_id.filter(|id| fit_trace_id(id));
                let end = stream.byte_offset();
                match rest[end..].strip_prefix(' ') {
                    Some(text) => (Some(tags), text),
                    None if end == rest.len() => (Some(tags), ""),
                    None => (None, line),
                }
            }
            _ => (None, line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_are_validated_per_the_w3c_format() {
        assert!(valid_traceparent(VALID));
        assert_eq!(trace_id(VALID), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00",
            // Upper-case hex, another version, a field too short or long.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Not hex; a multi-byte character where a digit belongs.
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_context_keeps_a_valid_traceparent_and_drops_an_invalid_one() {
        let ctx = CallContext::new(Some("abc-123"), Some(&format!(" {VALID} ")));
        assert_eq!(ctx.request_id.as_deref(), Some("abc-123"));
        assert_eq!(ctx.traceparent.as_deref(), Some(VALID));
        assert_eq!(ctx.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let ctx = CallContext::new(Some("abc-123"), Some("00-zz"));
        assert_eq!(ctx.traceparent, None);
        assert_eq!(ctx.trace_id(), None);
        assert!(!ctx.is_empty());
        assert!(CallContext::new(None, Some("garbage")).is_empty());
        assert_eq!(
            serde_json::to_string(&CallContext::new(Some("a"), None)).unwrap(),
            r#"{"request_id":"a"}"#
        );
        assert_eq!(
            serde_json::to_string(&CallContext::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn tagged_log_lines_split_into_tags_and_text() {
        let (tags, text) = LogTags::split(
            r#"@call {"request_id":"job-42/7","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"} INFO x: hi"#,
        );
        assert_eq!(
            tags,
            Some(LogTags {
                request_id: Some("job-42/7".into()),
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            })
        );
        assert_eq!(text, "INFO x: hi");
        // Values that would add fields to the host's log line (a space, a
        // quote), or are no trace id, are dropped; the line stays.
        let (tags, text) = LogTags::split(
            r#"@call {"request_id":"r1 plugin=evil","trace_id":"zz\r\u0007"} ERROR hello"#,
        );
        assert_eq!(tags, Some(LogTags::default()));
        assert_eq!(text, "ERROR hello");
        let (tags, _) = LogTags::split(r#"@call {"request_id":"a b} \"c\"","trace_id":"t"} x"#);
        assert_eq!(tags, Some(LogTags::default()));
        assert_eq!(
            LogTags::split(r#"@call {"request_id":"a"}"#),
            (
                Some(LogTags {
                    request_id: Some("a".into()),
                    trace_id: None
                }),
                ""
            )
        );
        for untagged in [
            "INFO x: hi",
            "@call",
            "@call not json",
            r#"@call {"request_id":5} x"#,
            r#"@call {"request_id":"a"}x"#,
            r#"@call ["a"] x"#,
            r#"@call {"request_id":"a" x"#,
        ] {
            assert_eq!(LogTags::split(untagged), (None, untagged), "{untagged}");
        }
    }
}
