//! The run route's body in its three forms (SPEC §5): JSON
//! `{"args": {...}}`, `multipart/form-data` (parts are arguments under
//! their field names, as bytes until [`crate::arg_schema`] makes form
//! fields of those the tool's schema declares otherwise; an optional `args`
//! part holds the rest as JSON), and `application/octet-stream` (the tool's
//! one binary argument). A leaf: it knows HTTP bodies, nothing of plugins
//! or their schemas (its caller says when a body had best be received into
//! a memory file, the loader's `BodyFile`).

use std::collections::HashSet;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use forgesyte_deps::json_type_name;
use forgesyte_loader::process::BodyFile;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::budget::BodyBudget;
use crate::error::{MALFORMED_ARGS_PART, MALFORMED_MULTIPART, RunError, UNREADABLE_BODY};

/// Body of a tool run. An empty body means `{"args": {}}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The tool's arguments, a JSON object (default `{}`), each name once.
    #[serde(default, deserialize_with = "each_name_once")]
    #[schema(value_type = Object)]
    pub args: Map<String, Value>,
}

/// A multipart body's `args` part: as [`RunRequest::args`].
#[derive(Deserialize)]
#[serde(transparent)]
struct ArgsPart(#[serde(deserialize_with = "each_name_once")] Map<String, Value>);

/// `args` as a JSON object that names each argument once: a map keeps the
/// last value of a name given twice, so `{"data": "QQ==", "data": null}`
/// dropped a binary argument without a word (as `args` given twice is
/// refused, so is an argument).
fn each_name_once<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Map<String, Value>, D::Error> {
    struct Args;
    impl<'de> serde::de::Visitor<'de> for Args {
        type Value = Map<String, Value>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut args = Map::new();
            while let Some(name) = map.next_key::<String>()? {
                match args.entry(name) {
                    serde_json::map::Entry::Vacant(slot) => {
                        slot.insert(map.next_value()?);
                    }
                    serde_json::map::Entry::Occupied(given) => {
                        return Err(serde::de::Error::custom(format_args!(
                            "argument '{}' is given twice in args",
                            given.key()
                        )));
                    }
                }
            }
            Ok(args)
        }
    }
    deserializer.deserialize_map(Args)
}

/// The codings `header` names (a comma-separated list, as
/// `Transfer-Encoding` and `Content-Encoding` are, in every instance of
/// it); an unreadable value counts as `?`. Empty items are no coding (RFC
/// 9110 §5.6.1).
fn codings(headers: &HeaderMap, header: axum::http::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(header)
        .into_iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
}

/// The first of [`codings`] of `header` other than `undone`, the one the
/// server undoes.
fn coding_other_than<'a>(
    headers: &'a HeaderMap,
    header: axum::http::HeaderName,
    undone: &str,
) -> Option<&'a str> {
    codings(headers, header).find(|c| !c.eq_ignore_ascii_case(undone))
}

/// Reads a tool call's request body, at most `limit` bytes, taking room
/// for it from `budget` as its bytes arrive (by the KiB): a body announced
/// but never sent holds none, so slow clients cannot lock the others out
/// with lengths alone. A body whose `Content-Length` is over the limit is
/// refused before any of it is read. The room comes back with the bytes;
/// the caller keeps it for as long as it holds them (the call).
///
/// With `into_file` (a body for a plugin in a child process), a body whose
/// `Content-Length` takes a spare memory file that is ready is received
/// straight into it (see `forgesyte_loader::process::BodyFile`): the
/// runner then gets that file, where the bytes were copied into a new one.
pub(crate) async fn receive(
    budget: &BodyBudget,
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
    into_file: bool,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), RunError> {
    use http_body_util::BodyExt as _;
    // Which of two types the body is would be a guess (the first was taken,
    // where a proxy in front may have taken the last).
    if crate::respond::repeated(headers, &CONTENT_TYPE) {
        return Err(RunError::MalformedBody {
            message: format!("{UNREADABLE_BODY}: Content-Type given more than once"),
        });
    }
    // `chunked` once: applied twice (`chunked, chunked`, or the header
    // given twice) it is forbidden (RFC 9112 §6.1), and a proxy in front
    // may frame the body otherwise than the HTTP layer here, which undoes
    // it once.
    let te_items = codings(headers, axum::http::header::TRANSFER_ENCODING).count();
    if te_items > 1 {
        return Err(RunError::MalformedBody {
            message: format!(
                "{UNREADABLE_BODY}: its Transfer-Encoding names {te_items} codings (only chunked, \
                 once; send the body as it is)"
            ),
        });
    }
    // The HTTP layer undoes `chunked` only: a body sent with another coding
    // (`gzip, chunked`) would reach the plugin still encoded.
    if let Some(coding) =
        coding_other_than(headers, axum::http::header::TRANSFER_ENCODING, "chunked")
    {
        return Err(RunError::MalformedBody {
            message: format!(
                "{UNREADABLE_BODY}: its Transfer-Encoding {:?} is not supported (only chunked; \
                 send the body as it is)",
                crate::error::Shown(coding).to_string()
            ),
        });
    }
    // Nor does it undo a content coding: a gzip body would reach the plugin
    // compressed (and a JSON one read as broken JSON).
    if let Some(coding) =
        coding_other_than(headers, axum::http::header::CONTENT_ENCODING, "identity")
    {
        return Err(RunError::MalformedBody {
            message: format!(
                "{UNREADABLE_BODY}: its Content-Encoding {:?} is not supported (send the body \
                 uncompressed)",
                crate::error::Shown(coding).to_string()
            ),
        });
    }
    let stated = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if stated.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(RunError::PayloadTooLarge { limit });
    }
    let mut room = budget.take(0)?;
    let mut charged_kib = 0usize;
    // One piece is kept as it came (no copy); from a second one on, all go
    // into one buffer, sized by the stated length: a body sent in tiny
    // pieces costs its bytes, not a handle per piece.
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    // A spare's pages are the body's from the moment it is taken, all of
    // them, however little has arrived: its capacity is charged at once
    // (a body announced and never sent pinned up to 32 MiB uncounted).
    // Without room for it, the body is received into memory, charged as
    // it arrives.
    let mut file = None;
    if let Some(len) = stated.filter(|_| into_file)
        && let Some(capacity) = BodyFile::capacity_for(len)
    {
        let kib = usize::try_from(capacity.div_ceil(1024)).unwrap_or(usize::MAX);
        if let Ok(held) = budget.take(kib)
            && let Some(spare) = BodyFile::for_len(len)
        {
            room.merge(held);
            charged_kib = kib;
            file = Some(spare);
        }
    }
    let mut total = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| body_error(&e))?.into_data() else {
            continue; // trailers
        };
        total += data.len();
        if total > limit {
            return Err(RunError::PayloadTooLarge { limit });
        }
        let kib = total.div_ceil(1024);
        if kib > charged_kib {
            room.merge(budget.take(kib - charged_kib)?);
            charged_kib = kib;
        }
        if data.is_empty() {
            continue;
        }
        if let Some(into) = file.as_mut() {
            if into.write(&data).is_ok() {
                continue;
            }
            // What the file holds comes back into memory, and the rest
            // goes there too.
            if let Some(into) = file.take() {
                joined = read_back(into, stated, limit)?;
            }
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(one) => {
                let stated = stated.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
                joined.reserve(stated.max(total).min(limit));
                joined.extend_from_slice(&one);
                joined.extend_from_slice(&data);
            }
        }
    }
    if let Some(into) = file {
        match into.finish() {
            Ok(received) => {
                tracing::debug!(bytes = total, "a body received into a memory file");
                return Ok((Bytes::from_owner(received), room));
            }
            Err((into, e)) => {
                tracing::debug!(error = %e, "a body received into a memory file is read back");
                joined = read_back(into, stated, limit)?;
            }
        }
    }
    let bytes = match first {
        Some(one) => one,
        None => Bytes::from(joined),
    };
    Ok((bytes, room))
}

/// What `file` holds, read back into memory with room for the body's
/// stated length; a file that cannot be read is the server's failure.
fn read_back(file: BodyFile, stated: Option<u64>, limit: usize) -> Result<Vec<u8>, RunError> {
    let stated = stated.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    file.into_vec(stated.min(limit))
        .map_err(|e| RunError::Internal {
            message: format!("cannot read back a body received into a memory file: {e}"),
        })
}

/// Why a body could not be read: the body read timeout or the minimum
/// rate, else malformed.
fn body_error(e: &axum::Error) -> RunError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if error.is::<crate::body_pace::BodyIdle>() {
            return RunError::BodyTimedOut;
        }
        if let Some(slow) = error.downcast_ref::<crate::body_pace::BodyTooSlow>() {
            return RunError::BodyTooSlow {
                min_rate: slow.min_rate,
            };
        }
        source = error.source();
    }
    RunError::MalformedBody {
        message: format!("{UNREADABLE_BODY}: {}", error_chain(e)),
    }
}

/// `e` and its sources, each said once: hyper's "error reading a body
/// from connection" alone did not say what broke (a chunk size that is no
/// hex number, a body cut short).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut said = e.to_string();
    let mut source = e.source();
    while let Some(error) = source {
        let text = error.to_string();
        if !text.is_empty() && !said.contains(&text) {
            said.push_str(": ");
            said.push_str(&text);
        }
        source = error.source();
    }
    said
}

/// About how many bytes one JSON value takes once parsed, at most
/// ([`forgesyte_loader::json_text::PARSED_VALUE_BYTES`]): the body limit
/// alone let a body parse into some sixty times its size, room the body
/// budget never counted.
pub(crate) const PARSED_VALUE_BYTES: usize = forgesyte_loader::json_text::PARSED_VALUE_BYTES;

/// The most JSON values a body of at most `body_limit` bytes may hold:
/// what the limit's bytes hold parsed (at least a few thousand).
pub(crate) fn max_json_values(body_limit: usize) -> usize {
    (body_limit / PARSED_VALUE_BYTES).max(4096)
}

/// Refuses JSON text of more than `max` values before it is parsed
/// ([`RunError::TooManyValues`]). Text shorter than `max` bytes is not
/// looked at (a value takes a byte at least).
pub(crate) fn check_json_values(bytes: &[u8], max: usize) -> Result<(), RunError> {
    match forgesyte_loader::json_text::over(bytes, max) {
        Some(values) => Err(RunError::TooManyValues { values, max }),
        None => Ok(()),
    }
}

/// A JSON body: empty means no arguments; otherwise it must be
/// `{"args": {...}}` (400 when not JSON, 422 when JSON of another shape,
/// 413 beyond `max_values` values, see [`max_json_values`]).
pub(crate) fn parse_json_body(bytes: &[u8], max_values: usize) -> Result<RunRequest, RunError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RunRequest::default());
    }
    check_json_values(bytes, max_values)?;
    // serde would take `[]` for a struct: only an object may be a request.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(match serde_json::from_slice::<Value>(bytes) {
            Ok(value) => RunError::InvalidBody {
                message: format!("expected a JSON object, found {}", json_type_name(&value)),
            },
            Err(e) => unparsed(&e, ""),
        });
    }
    // One pass in the common case; a body that is not a `RunRequest` is
    // parsed again only to tell malformed JSON (400) from the wrong shape (422).
    serde_json::from_slice::<RunRequest>(bytes).map_err(|e| {
        if e.is_data() {
            match serde_json::from_slice::<Value>(bytes) {
                Ok(value) if !value.is_object() => RunError::InvalidBody {
                    message: format!("expected a JSON object, found {}", json_type_name(&value)),
                },
                Ok(_) => RunError::InvalidBody {
                    message: e.to_string(),
                },
                Err(e) => unparsed(&e, ""),
            }
        } else {
            unparsed(&e, "")
        }
    })
}

/// JSON serde could not parse: malformed (400), or nested 128 levels deep
/// or more, deeper than serde reads (422: the text may be valid, its depth is what
/// is refused; serde's own word was "recursion limit exceeded").
/// `context` goes before the parser's message.
fn unparsed(e: &serde_json::Error, context: &str) -> RunError {
    if e.is_syntax() && e.to_string().starts_with("recursion limit exceeded") {
        return RunError::InvalidBody {
            message: format!(
                "{context}JSON nested 128 or more levels deep (at line {} column {}): \
                 the server reads no deeper",
                e.line(),
                e.column()
            ),
        };
    }
    RunError::MalformedBody {
        message: format!("{context}{e}"),
    }
}

/// What a run request carries: JSON arguments and raw binary ones (by
/// argument name), each body read once and never copied again.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RunInput {
    /// The JSON arguments.
    pub(crate) args: Map<String, Value>,
    /// Binary arguments, by name, as received.
    pub(crate) binary: Vec<(String, Bytes)>,
    /// The body was `application/octet-stream`: its one binary argument
    /// still needs a name (the tool's one binary input).
    pub(crate) unnamed: Option<Bytes>,
}

/// Whether a request's headers announce a body: chunked, or a
/// `Content-Length` that is not zero (`0`, `00`; one that is not a number
/// announces one).
pub(crate) fn announces_a_body(headers: &HeaderMap) -> bool {
    headers.contains_key(axum::http::header::TRANSFER_ENCODING)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|length| {
                length
                    .to_str()
                    .ok()
                    .and_then(|l| l.trim().parse::<u64>().ok())
                    != Some(0)
            })
}

/// Reads a run body of at most `body_limit` bytes according to its
/// `Content-Type`.
pub(crate) async fn read(
    headers: &HeaderMap,
    bytes: Bytes,
    body_limit: usize,
) -> Result<RunInput, RunError> {
    let max_values = max_json_values(body_limit);
    let (content_type, essence) = content_type(headers);
    match essence.as_str() {
        "multipart/form-data" => multipart(content_type, bytes, max_values).await,
        "application/octet-stream" => Ok(RunInput {
            unnamed: Some(bytes),
            ..RunInput::default()
        }),
        // JSON, or no type at all (curl -d sends form-urlencoded: JSON
        // clients that forget the header keep working).
        _ => parse_json_body(&bytes, max_values)
            .map(|RunRequest { args }| RunInput {
                args,
                ..RunInput::default()
            })
            .map_err(|e| hint_other_type(e, &essence, &bytes)),
    }
}

/// The `Content-Type` header (empty when absent or unreadable) and its
/// essence, lower case, without parameters.
fn content_type(headers: &HeaderMap) -> (&str, String) {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    (content_type, essence)
}

/// Whether the body is `application/octet-stream`: the tool's one binary
/// argument, handed on as it is.
pub(crate) fn is_octet_stream(headers: &HeaderMap) -> bool {
    content_type(headers).1 == "application/octet-stream"
}

/// A body of another declared type (`image/png`, `image/jpeg`, or the
/// `application/x-www-form-urlencoded` that `curl --data-binary @frame.png`
/// sends without a `-H`) that is not JSON: its error says how it was read
/// and how a frame is sent.
fn hint_other_type(error: RunError, essence: &str, body: &[u8]) -> RunError {
    // `curl -d '{"args": …}'` sends JSON as a form: a typo in it is told
    // as JSON's; a form body that is no JSON at all is a frame sent
    // without its type (`curl --data-binary @frame.png`).
    let json_form = essence == "application/x-www-form-urlencoded"
        && body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| matches!(b, b'{' | b'['));
    let json_like = essence.is_empty()
        || essence.ends_with("/json")
        || essence.ends_with("+json")
        || essence == "text/plain"
        || json_form;
    match error {
        RunError::MalformedBody { message } if !json_like => RunError::MalformedBody {
            message: format!(
                "{message} (a body of Content-Type {essence} is read as JSON: send a frame as \
                 application/octet-stream, or as a file part of multipart/form-data)"
            ),
        },
        other => other,
    }
}

/// The most parts a `multipart/form-data` body may have. The body's size is
/// already bounded, but a body of many tiny parts would still cost a
/// per-part allocation and a name each: a tool takes a handful of
/// arguments, so a body past this is refused (400) before its next part is
/// read.
pub(crate) const MAX_MULTIPART_PARTS: usize = 1024;

/// `content_type` without the optional whitespace before each `;` and with
/// none after it, outside quoted strings: RFC 9110 §5.6.6 allows `OWS ";"
/// OWS`, which the media-type parser behind [`multer::parse_boundary`]
/// refuses before a `;` (`multipart/form-data ; boundary=x`) or as a tab
/// after it.
fn without_ows_at_semicolons(content_type: &str) -> String {
    let mut out = String::with_capacity(content_type.len());
    let (mut quoted, mut escaped, mut after_semicolon) = (false, false, false);
    let mut pending = String::new();
    for c in content_type.chars() {
        if quoted {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            ' ' | '\t' => {
                if !after_semicolon {
                    pending.push(c);
                }
            }
            ';' => {
                pending.clear();
                out.push(';');
                after_semicolon = true;
            }
            _ => {
                out.push_str(&pending);
                pending.clear();
                after_semicolon = false;
                quoted = c == '"';
                out.push(c);
            }
        }
    }
    out
}

/// Splits the body in place ([`crate::form`]): every part's bytes are a
/// slice of the body as received, never copied.
async fn multipart(
    content_type: &str,
    bytes: Bytes,
    max_values: usize,
) -> Result<RunInput, RunError> {
    let boundary = multer::parse_boundary(content_type)
        .or_else(|e| multer::parse_boundary(without_ows_at_semicolons(content_type)).map_err(|_| e))
        .map_err(|e| RunError::MalformedBody {
            message: format!(
                "{MALFORMED_MULTIPART}: {e} (the boundary parameter, quoted when it holds a space \
                 or one of ()<>@,;:\\\"/[]?=)"
            ),
        })?;
    let parts = crate::form::split(&bytes, &boundary, MAX_MULTIPART_PARTS).map_err(|e| {
        RunError::MalformedBody {
            message: format!("{MALFORMED_MULTIPART}: {e}"),
        }
    })?;
    let mut input = RunInput::default();
    let mut seen_args = false;
    // Names of the binary parts so far: a duplicate is found in O(1).
    let mut names: HashSet<String> = HashSet::new();
    for part in parts {
        let Some(name) = part.name else {
            return Err(RunError::InvalidForm {
                message: "a multipart part has no field name".into(),
            });
        };
        let data = part.data;
        // Whether a field or a file (`curl -F args=@args.json`).
        if name == "args" {
            if seen_args {
                return Err(RunError::InvalidForm {
                    message: "more than one 'args' part".into(),
                });
            }
            seen_args = true;
            check_json_values(&data, max_values)?;
            input.args = match serde_json::from_slice::<ArgsPart>(&data) {
                Ok(ArgsPart(args)) => args,
                // Not an object, or an argument named twice.
                Err(e) if e.is_data() => {
                    let message = if data.trim_ascii_start().first() == Some(&b'{') {
                        format!("the 'args' part: {e}")
                    } else {
                        "the 'args' part must be a JSON object".into()
                    };
                    return Err(RunError::InvalidForm { message });
                }
                Err(e) => {
                    return Err(unparsed(
                        &e,
                        &format!("{MALFORMED_ARGS_PART} is not JSON: "),
                    ));
                }
            };
        } else {
            if !names.insert(name.clone()) {
                return Err(RunError::InvalidForm {
                    message: format!("more than one part named '{name}'"),
                });
            }
            input.binary.push((name, data));
        }
    }
    // `null` in `args` is no value (as for a stream's arguments): the part
    // takes its place.
    for (name, _) in &input.binary {
        match input.args.get(name) {
            Some(Value::Null) => {
                input.args.remove(name);
            }
            Some(_) => {
                return Err(RunError::InvalidForm {
                    message: format!("argument '{name}' is given both as a part and in 'args'"),
                });
            }
            None => {}
        }
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};
    use proptest::prelude::*;
    use serde_json::json;

    /// A body arriving in `pieces`.
    fn streamed(pieces: Vec<&'static [u8]>) -> axum::body::Body {
        axum::body::Body::from_stream(futures_util::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p))),
        ))
    }

    /// A body received into a spare memory file is charged the spare's
    /// whole capacity as it is taken (its pages are all allocated, however
    /// little arrives; slow uploads pinned 1.6 GiB uncounted); without
    /// room for that, it is received into memory, charged as it arrives.
    #[tokio::test]
    async fn a_body_into_a_memory_file_is_charged_its_whole_spare_at_once() {
        const MIB: usize = 1 << 20;
        // 1 MiB + 5: a spare of 2 MiB (2048 KiB); in memory 1025 KiB.
        let len = MIB + 5;
        let data: &'static [u8] = Box::leak(vec![7u8; len].into_boxed_slice());
        let mut stated = HeaderMap::new();
        stated.insert(axum::http::header::CONTENT_LENGTH, HeaderValue::from(len));
        let budget = BodyBudget::new(4 * MIB, Some(8 * MIB));
        let since = std::time::Instant::now();
        loop {
            let (bytes, room) = receive(&budget, &stated, streamed(vec![data]), 4 * MIB, true)
                .await
                .unwrap();
            assert!(bytes == data);
            let charged = 8 * 1024 - budget.available_kib();
            drop((bytes, room));
            if charged == 2048 {
                break;
            }
            // The first body of a size finds no spare ready: in memory.
            assert_eq!(charged, 1025);
            assert!(
                since.elapsed() < std::time::Duration::from_secs(10),
                "no body went into a spare"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A budget without room for the spare: in memory, as it arrives.
        let small = BodyBudget::new(MIB + MIB / 4, Some(MIB + MIB / 2));
        assert_eq!(small.available_kib(), 1536);
        for _ in 0..5 {
            let (bytes, room) = receive(&small, &stated, streamed(vec![data]), 2 * MIB, true)
                .await
                .unwrap();
            assert!(bytes == data);
            assert_eq!(1536 - small.available_kib(), 1025);
            drop((bytes, room));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_body_takes_room_for_its_bytes_and_gives_it_back() {
        let budget = BodyBudget::new(4096, Some(8192));
        assert_eq!(budget.available_kib(), 8);
        // Many small pieces: joined once, charged by the KiB.
        let pieces = vec![&b"x"[..]; 3000];
        let (bytes, room) = receive(&budget, &HeaderMap::new(), streamed(pieces), 4096, false)
            .await
            .unwrap();
        assert_eq!(bytes.len(), 3000);
        assert!(bytes.iter().all(|&b| b == b'x'));
        assert_eq!(budget.available_kib(), 5);
        // Another body finds 5 KiB: 4 KiB fit, a second 4 KiB do not.
        let (_, second) = receive(
            &budget,
            &HeaderMap::new(),
            streamed(vec![&[0; 4096]]),
            4096,
            false,
        )
        .await
        .unwrap();
        let err = receive(
            &budget,
            &HeaderMap::new(),
            streamed(vec![&[0; 2048]]),
            4096,
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(err, RunError::BodiesInFlight { budget_kib: 8 });
        drop((room, second));
        assert_eq!(budget.available_kib(), 8);
        // Over the limit as it arrives, or as stated: 413.
        let err = receive(
            &budget,
            &HeaderMap::new(),
            streamed(vec![&[0; 3000], &[0; 3000]]),
            4096,
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(err, RunError::PayloadTooLarge { limit: 4096 });
        let mut stated = HeaderMap::new();
        stated.insert(
            axum::http::header::CONTENT_LENGTH,
            HeaderValue::from_static("5000"),
        );
        let err = receive(&budget, &stated, streamed(vec![]), 4096, false)
            .await
            .unwrap_err();
        assert_eq!(err, RunError::PayloadTooLarge { limit: 4096 });
        assert_eq!(budget.available_kib(), 8);
        // Never less room than one body at the limit.
        assert_eq!(BodyBudget::new(1 << 20, Some(1024)).available_kib(), 1024);
    }

    /// A transfer coding the HTTP layer does not undo is refused before
    /// the body is read: the plugin would get the bytes still encoded.
    #[tokio::test]
    async fn a_body_in_a_coding_other_than_chunked_is_refused() {
        let budget = BodyBudget::new(4096, Some(8192));
        for (coding, refused) in [
            ("chunked", false),
            ("Chunked", false),
            (", chunked", false),
            ("gzip, chunked", true),
            ("deflate", true),
            ("chunked, chunked", true),
            ("chunked,, chunked", true),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::header::TRANSFER_ENCODING,
                HeaderValue::from_static(coding),
            );
            let got = receive(&budget, &h, streamed(vec![&b"abc"[..]]), 4096, false).await;
            match (got, refused) {
                (Ok((bytes, _)), false) => assert_eq!(&bytes[..], b"abc"),
                (Err(RunError::MalformedBody { message }), true) => {
                    assert!(message.contains("Transfer-Encoding"), "{message}");
                }
                (other, _) => panic!("{coding}: {other:?}"),
            }
        }
        // The header twice, each `chunked`: applied twice all the same.
        let mut h = HeaderMap::new();
        for _ in 0..2 {
            h.append(
                axum::http::header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let got = receive(&budget, &h, streamed(vec![&b"abc"[..]]), 4096, false).await;
        assert!(
            matches!(&got, Err(RunError::MalformedBody { message }) if message.contains("2 codings")),
            "{got:?}"
        );
    }

    /// A body of two types is refused before it is read.
    #[tokio::test]
    async fn a_body_of_two_content_types_is_refused() {
        let budget = BodyBudget::new(4096, Some(8192));
        let mut h = headers("application/json");
        h.append(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        match receive(&budget, &h, streamed(vec![&b"{}"[..]]), 4096, false).await {
            Err(RunError::MalformedBody { message }) => {
                assert!(
                    message.ends_with("Content-Type given more than once"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let one = headers("application/json");
        let (bytes, _) = receive(&budget, &one, streamed(vec![&b"{}"[..]]), 4096, false)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"{}");
    }

    /// Nor is a content coding undone: a compressed body is refused.
    #[tokio::test]
    async fn a_compressed_body_is_refused() {
        let budget = BodyBudget::new(4096, Some(8192));
        for (coding, refused) in [
            ("identity", false),
            ("", false),
            ("gzip", true),
            ("identity, br", true),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::header::CONTENT_ENCODING,
                HeaderValue::from_static(coding),
            );
            let got = receive(&budget, &h, streamed(vec![&b"abc"[..]]), 4096, false).await;
            match (got, refused) {
                (Ok((bytes, _)), false) => assert_eq!(&bytes[..], b"abc"),
                (Err(RunError::MalformedBody { message }), true) => {
                    assert!(message.contains("Content-Encoding"), "{message}");
                }
                (other, _) => panic!("{coding}: {other:?}"),
            }
        }
    }

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        h
    }

    fn multipart_body(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
        let boundary = "XyZzY";
        let mut body = Vec::new();
        for (name, file, data) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(file) => body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (
            format!("multipart/form-data; boundary={boundary}"),
            Bytes::from(body),
        )
    }

    #[tokio::test]
    async fn multipart_parts_are_binary_arguments_and_args_the_rest() {
        let image: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let (ct, body) = multipart_body(&[
            ("args", None, br#"{"threshold": 3}"#),
            ("image", Some("frame.png"), &image),
            ("mask", None, b"\x00\xff"),
        ]);
        let input = read(&headers(&ct), body, 1 << 20).await.unwrap();
        assert_eq!(Value::Object(input.args), json!({"threshold": 3}));
        assert_eq!(input.binary.len(), 2);
        assert_eq!(input.binary[0].0, "image");
        assert_eq!(&input.binary[0].1[..], &image[..]);
        assert_eq!(&input.binary[1].1[..], b"\x00\xff");
    }

    #[tokio::test]
    async fn an_args_part_sent_as_a_file_is_the_json_arguments() {
        let (ct, body) = multipart_body(&[
            ("image", Some("frame.png"), b"\x89PNG"),
            ("args", Some("args.json"), br#"{"n": 3}"#),
        ]);
        let input = read(&headers(&ct), body, 1 << 20).await.unwrap();
        assert_eq!(Value::Object(input.args), json!({"n": 3}));
        let names: Vec<&str> = input.binary.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["image"]);
        // And it is still the one `args` part.
        let (ct, body) = multipart_body(&[
            ("args", Some("args.json"), br#"{"n": 3}"#),
            ("args", None, br#"{"n": 1}"#),
        ]);
        assert!(matches!(
            read(&headers(&ct), body, 1 << 20).await,
            Err(RunError::InvalidForm { .. })
        ));
    }

    #[tokio::test]
    async fn bad_multipart_bodies_are_client_errors() {
        let (ct, body) = multipart_body(&[("args", None, b"[1]")]);
        assert!(matches!(
            read(&headers(&ct), body, 1 << 20).await,
            Err(RunError::InvalidForm { .. })
        ));
        let (ct, body) = multipart_body(&[("args", None, b"{")]);
        assert!(matches!(
            read(&headers(&ct), body, 1 << 20).await,
            Err(RunError::MalformedBody { .. })
        ));
        let (ct, body) = multipart_body(&[("x", Some("a"), b"1"), ("x", Some("b"), b"2")]);
        assert!(matches!(
            read(&headers(&ct), body, 1 << 20).await,
            Err(RunError::InvalidForm { .. })
        ));
        let (ct, body) = multipart_body(&[("args", None, br#"{"x": 1}"#), ("x", Some("b"), b"2")]);
        assert!(matches!(
            read(&headers(&ct), body, 1 << 20).await,
            Err(RunError::InvalidForm { .. })
        ));
        for ct in ["multipart/form-data", "multipart/form-data; boundary=nope"] {
            assert!(matches!(
                read(&headers(ct), Bytes::from_static(b"garbage"), 1 << 20).await,
                Err(RunError::MalformedBody { .. })
            ));
        }
    }

    /// Optional whitespace around `;` (RFC 9110 §5.6.6) is a form's
    /// Content-Type as well: before it, and a tab after it (both were 400
    /// "failed to decode Content-Type"); a quoted boundary keeps its own.
    #[tokio::test]
    async fn a_form_s_content_type_may_have_whitespace_around_its_semicolon() {
        let (ct, body) = multipart_body(&[("x", Some("a"), b"1")]);
        let boundary = ct.rsplit_once("boundary=").unwrap().1.to_owned();
        for ct in [
            format!("multipart/form-data ; boundary={boundary}"),
            format!("multipart/form-data;\tboundary={boundary}"),
            format!("multipart/form-data \t;  boundary=\"{boundary}\" "),
        ] {
            let input = read(&headers(&ct), body.clone(), 1 << 20).await;
            assert!(input.is_ok(), "{ct:?}: {:?}", input.err());
        }
        assert_eq!(
            without_ows_at_semicolons("multipart/form-data ;\tboundary=\"a ; b\"\t; x=1"),
            "multipart/form-data;boundary=\"a ; b\";x=1"
        );
        let Err(RunError::MalformedBody { message }) =
            read(&headers("multipart/form-data; boundary=a b"), body, 1 << 20).await
        else {
            panic!("an unquoted boundary with a space was read");
        };
        assert!(
            message.contains("quoted when it holds a space"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_body_of_another_type_that_is_not_json_says_how_to_send_a_frame() {
        let png = Bytes::from_static(b"\x89PNG\r\n\x1a\n");
        // curl's default type for --data-binary, a frame sent without -H.
        let Err(RunError::MalformedBody { message }) = read(
            &headers("application/x-www-form-urlencoded"),
            png.clone(),
            1 << 20,
        )
        .await
        else {
            panic!("an image read as JSON is malformed");
        };
        assert!(
            message.contains("send a frame as application/octet-stream"),
            "{message}"
        );
        // JSON with a typo sent as a form (`curl -d`): told as JSON's.
        let Err(RunError::MalformedBody { message }) = read(
            &headers("application/x-www-form-urlencoded"),
            Bytes::from_static(b" {\"args\": {bad}}"),
            1 << 20,
        )
        .await
        else {
            panic!("a typo is malformed");
        };
        assert!(!message.contains("Content-Type"), "{message}");
        let Err(RunError::MalformedBody { message }) =
            read(&headers("image/png"), png.clone(), 1 << 20).await
        else {
            panic!("an image read as JSON is malformed");
        };
        assert!(
            message.ends_with(
                "(a body of Content-Type image/png is read as JSON: send a frame as \
                 application/octet-stream, or as a file part of multipart/form-data)"
            ),
            "{message}"
        );
        // JSON's own types, and none, keep the parser's message alone.
        for ct in [
            "",
            "application/json",
            "text/json",
            "application/problem+json",
            "text/plain",
        ] {
            let Err(RunError::MalformedBody { message }) =
                read(&headers(ct), png.clone(), 1 << 20).await
            else {
                panic!("{ct}: malformed");
            };
            assert!(!message.contains("Content-Type"), "{ct}: {message}");
        }
    }

    #[tokio::test]
    async fn a_multipart_body_over_the_part_limit_is_refused_naming_the_limit() {
        let names: Vec<String> = (0..=MAX_MULTIPART_PARTS).map(|i| format!("p{i}")).collect();
        let parts: Vec<(&str, Option<&str>, &[u8])> = names
            .iter()
            .map(|n| (n.as_str(), None, &b"x"[..]))
            .collect();
        let (ct, body) = multipart_body(&parts);
        let err = read(&headers(&ct), body, 1 << 20).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("more than {MAX_MULTIPART_PARTS} parts")),
            "{err}"
        );
        // Exactly at the limit is fine.
        let (ct, body) = multipart_body(&parts[..MAX_MULTIPART_PARTS]);
        let input = read(&headers(&ct), body, 1 << 20).await.unwrap();
        assert_eq!(input.binary.len(), MAX_MULTIPART_PARTS);
    }

    #[tokio::test]
    async fn octet_streams_and_json() {
        let input = read(
            &headers("application/octet-stream"),
            Bytes::from_static(b"\x89PNG"),
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(input.unnamed.as_deref(), Some(&b"\x89PNG"[..]));
        let input = read(
            &headers("application/json"),
            Bytes::from_static(br#"{"args": {"a": 1}}"#),
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(Value::Object(input.args), json!({"a": 1}));
        assert!(input.binary.is_empty() && input.unnamed.is_none());
    }

    // The JSON form (moved with the parser from `tools`).
    fn parse_body(body: &'static str, _limit: usize) -> Result<RunRequest, RunError> {
        parse_json_body(body.as_bytes(), max_json_values(1 << 20))
    }

    fn ok_body(text: &'static str) -> &'static str {
        text
    }

    #[test]
    fn json_values_are_counted_outside_strings_and_bounded_before_parsing() {
        // Short text is not looked at; long text of too many values is
        // refused, naming how many.
        assert_eq!(check_json_values(b"[0,0,0,0,0]", 16), Ok(()));
        let zeros = format!("[{}0]", "0,".repeat(5000));
        assert_eq!(
            check_json_values(zeros.as_bytes(), 4096),
            Err(RunError::TooManyValues {
                values: 5001,
                max: 4096
            })
        );
        assert_eq!(check_json_values(zeros.as_bytes(), 6000), Ok(()));
        let body = format!(r#"{{"args": {{"a": {zeros}}}}}"#);
        assert!(matches!(
            parse_json_body(body.as_bytes(), 4096),
            Err(RunError::TooManyValues { .. })
        ));
        assert_eq!(max_json_values(32 << 20), 262_144);
        assert_eq!(max_json_values(1024), 4096);
    }

    /// An argument named twice is refused (422), as `args` twice is: the
    /// last one won, and a binary argument could vanish under a `null`.
    #[test]
    fn an_argument_named_twice_is_refused() {
        for text in [
            r#"{"args": {"data": "QQ==", "data": "Qg=="}}"#,
            r#"{"args": {"data": "QQ==", "x": 1, "data": null}}"#,
            r#"{"args": {}, "args": {}}"#,
        ] {
            let err = parse_body(ok_body(text), 10).unwrap_err();
            assert_eq!(
                err.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{text}: {err:?}"
            );
        }
        let err = parse_body(ok_body(r#"{"args": {"data": 1, "data": 2}}"#), 10).unwrap_err();
        assert!(
            err.to_string()
                .contains("argument 'data' is given twice in args"),
            "{err}"
        );
        // Nested objects are the plugin's to read, as JSON reads them.
        let nested = parse_body(ok_body(r#"{"args": {"o": {"k": 1, "k": 2}}}"#), 10).unwrap();
        assert_eq!(nested.args["o"]["k"], 2);
        let err = parse_body(ok_body(r#"{"args": 5}"#), 10).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY, "{err:?}");
    }

    /// A multipart body's `args` part names each argument once too.
    #[tokio::test]
    async fn an_args_part_naming_an_argument_twice_is_refused() {
        let (ct, body) = multipart_body(&[("args", None, br#"{"data": "x", "data": null}"#)]);
        let Err(RunError::InvalidForm { message }) = read(&headers(&ct), body, 1 << 20).await
        else {
            panic!("an args part with a name twice was read");
        };
        assert!(
            message.contains("argument 'data' is given twice"),
            "{message}"
        );
        let (ct, body) = multipart_body(&[("args", None, b"[1]")]);
        let Err(RunError::InvalidForm { message }) = read(&headers(&ct), body, 1 << 20).await
        else {
            panic!("an args part that is an array was read");
        };
        assert_eq!(message, "the 'args' part must be a JSON object");
    }

    #[test]
    fn empty_and_args_only_bodies_parse() {
        assert_eq!(parse_body(ok_body(""), 10), Ok(RunRequest::default()));
        assert_eq!(parse_body(ok_body("  \n"), 10), Ok(RunRequest::default()));
        assert_eq!(parse_body(ok_body("{}"), 10), Ok(RunRequest::default()));
        let parsed = parse_body(ok_body(r#"{"args": {"x": 1}}"#), 10).unwrap();
        assert_eq!(parsed.args.get("x"), Some(&Value::from(1)));
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shape_is_422() {
        for text in ["{", "not json", r#"{"args": }"#, "{\"args\": {}} trailing"] {
            let err = parse_body(ok_body(text), 10).unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{text}: {err:?}");
        }
        for text in [
            "[]",
            "42",
            r#"{"args": [1, 2]}"#,
            r#"{"args": "x"}"#,
            r#"{"args": null}"#,
            r#"{"arg": {}}"#,
        ] {
            let err = parse_body(ok_body(text), 10).unwrap_err();
            assert_eq!(
                err.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{text}: {err:?}"
            );
        }
    }

    /// Valid JSON nested past serde's 128 levels is refused for its depth
    /// (422, saying so), not called malformed (found by review: "not
    /// valid JSON: recursion limit exceeded"); in a multipart `args` part
    /// too.
    #[tokio::test]
    async fn json_nested_too_deep_is_refused_for_its_depth() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let body = format!(r#"{{"args": {{"a": {deep}}}}}"#);
        let err = parse_json_body(body.as_bytes(), 1 << 20).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY, "{err:?}");
        assert!(
            err.to_string()
                .contains("JSON nested 128 or more levels deep"),
            "{err}"
        );
        // The body's object and `args` are two of the levels: 127 in all
        // are read, 128 are not, as the message says.
        let levels = |n: usize| {
            format!(
                r#"{{"args": {{"a": {}1{}}}}}"#,
                "[".repeat(n - 2),
                "]".repeat(n - 2)
            )
        };
        assert!(parse_json_body(levels(127).as_bytes(), 1 << 20).is_ok());
        let err = parse_json_body(levels(128).as_bytes(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("128 or more levels deep"), "{err}");
        let shallow = format!(
            r#"{{"args": {{"a": {}1{}}}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(parse_json_body(shallow.as_bytes(), 1 << 20).is_ok());
        let args = format!(r#"{{"a": {deep}}}"#);
        let (content_type, body) = multipart_body(&[("args", None, args.as_bytes())]);
        let err = read(&headers(&content_type), body, 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY, "{err:?}");
        assert!(err.to_string().contains("128 or more levels"), "{err}");
    }

    /// `read` on a runtime of its own (a proptest case is synchronous).
    fn read_blocking(content_type: &str, body: Vec<u8>) -> Result<RunInput, RunError> {
        let mut h = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(content_type) {
            h.insert(CONTENT_TYPE, value);
        }
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(read(&h, Bytes::from(body), 1 << 20))
    }

    /// A refused body: a client error (400 or 422) that says why.
    fn client_error(err: &RunError) -> Result<(), TestCaseError> {
        prop_assert!(
            matches!(
                err.status(),
                StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
            ),
            "{err:?}"
        );
        prop_assert!(err.to_string().len() > 10, "{err:?}");
        Ok(())
    }

    /// Boundaries as RFC 2046 allows them (1 to 70 characters), and some it
    /// does not.
    fn boundary() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[0-9A-Za-z]{1,70}",
            1 => "[0-9A-Za-z'()+_,./:=?-]{1,70}",
            1 => ".{0,80}",
        ]
    }

    /// One part: a name (often a duplicate, often `args`), a file name or
    /// none, and bytes that may look like a boundary or headers.
    const DATA: &[&[u8]] = &[
        b"{}",
        b"{\"x\": 1}",
        b"[1]",
        b"{",
        b"--",
        b"\r\n--",
        b"\r\n\r\n",
    ];

    fn part() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
        (
            prop_oneof![
                prop::sample::select(&["args", "image", "mask", "a\"b", ""][..])
                    .prop_map(str::to_owned),
                "[a-z]{1,6}",
            ],
            prop::option::of("[a-z.]{0,8}"),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                prop::sample::select(DATA).prop_map(<[u8]>::to_vec),
            ],
        )
    }

    fn encode(boundary: &str, parts: &[(String, Option<String>, Vec<u8>)], close: bool) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, file, data) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            let file = file
                .as_ref()
                .map(|f| format!("; filename=\"{f}\""))
                .unwrap_or_default();
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        if close {
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        }
        body
    }

    proptest! {
        // Each case parses one body of at most a few KiB on a fresh
        // current-thread runtime: 256 cases take well under a second.

        /// Arbitrary bytes under any of the body's content types, a
        /// multipart one with any boundary included.
        #[test]
        fn arbitrary_bodies_are_arguments_or_client_errors(
            body in prop::collection::vec(any::<u8>(), 0..512),
            content_type in prop_oneof![
                boundary().prop_map(|b| format!("multipart/form-data; boundary={b}")),
                prop::sample::select(&["multipart/form-data", "application/octet-stream", "application/json", "", "text/plain; charset=x"][..])
                    .prop_map(str::to_owned),
                ".{0,30}",
            ],
        ) {
            match read_blocking(&content_type, body.clone()) {
                Ok(input) => {
                    if content_type.starts_with("application/octet-stream") {
                        prop_assert_eq!(input.unnamed.as_deref(), Some(&body[..]));
                    }
                }
                Err(e) => client_error(&e)?,
            }
        }

        /// Well-formed multipart bodies, then cut short, flipped or left
        /// unclosed: arguments or a client error, never a panic; an intact
        /// body of distinct names without `args` gives back every part.
        #[test]
        fn multipart_bodies_are_arguments_or_client_errors(
            boundary in boundary(),
            parts in prop::collection::vec(part(), 0..8),
            close in any::<bool>(),
            cut in prop::option::of(any::<prop::sample::Index>()),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let mut body = encode(&boundary, &parts, close);
            let intact = cut.is_none() && flips.is_empty() && close;
            if let Some(cut) = cut {
                body.truncate(cut.index(body.len() + 1));
            }
            if !body.is_empty() {
                for (at, byte) in &flips {
                    let i = at.index(body.len());
                    body[i] = *byte;
                }
            }
            let content_type = format!("multipart/form-data; boundary={boundary}");
            match read_blocking(&content_type, body) {
                Ok(input) => {
                    prop_assert!(input.binary.len() <= MAX_MULTIPART_PARTS);
                    let names: HashSet<&str> = parts.iter().map(|(n, _, _)| n.as_str()).collect();
                    let plain = names.len() == parts.len()
                        && !names.contains("args")
                        && boundary.chars().all(|c| c.is_ascii_alphanumeric())
                        && parts.iter().all(|(n, _, d)| {
                            !n.contains('"') && !n.is_empty()
                                && !d.windows(boundary.len() + 2).any(|w| w[2..] == *boundary.as_bytes())
                        });
                    if intact && plain {
                        let expected: Vec<(String, &[u8])> =
                            parts.iter().map(|(n, _, d)| (n.clone(), d.as_slice())).collect();
                        let got: Vec<(String, &[u8])> =
                            input.binary.iter().map(|(n, d)| (n.clone(), &d[..])).collect();
                        prop_assert_eq!(got, expected);
                    }
                }
                Err(e) => client_error(&e)?,
            }
        }
    }

    proptest! {
        // Bodies of about a thousand parts: 16 cases, about a second.
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Part counts around the cap: accepted up to it, refused past it
        /// (400, naming the cap), wherever the count falls.
        #[test]
        fn part_counts_around_the_cap(count in MAX_MULTIPART_PARTS - 8..MAX_MULTIPART_PARTS + 64) {
            let parts: Vec<(String, Option<String>, Vec<u8>)> =
                (0..count).map(|i| (format!("p{i}"), None, b"x".to_vec())).collect();
            let body = encode("b", &parts, true);
            match read_blocking("multipart/form-data; boundary=b", body) {
                Ok(input) => prop_assert!(count <= MAX_MULTIPART_PARTS && input.binary.len() == count),
                Err(e) => {
                    prop_assert!(count > MAX_MULTIPART_PARTS, "{e:?}");
                    prop_assert!(e.to_string().contains("more than 1024 parts"), "{e}");
                    client_error(&e)?;
                }
            }
        }
    }
}
