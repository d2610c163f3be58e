//! A tool run's success answer in the representation the client's `Accept`
//! header asks for, when the tool returned binary results beside its JSON:
//!
//! - `application/json` (the default, also for `*/*`, no `Accept`, or
//!   anything unknown): the JSON answer with each binary result put at its
//!   JSON Pointer in `result` as a standard base64 string;
//! - `multipart/mixed`: first part the JSON answer (`null` at each binary
//!   result's place), then one `application/octet-stream` part per binary
//!   result, in order, its `Content-Disposition: attachment;
//!   name="<pointer>"`;
//! - `application/octet-stream`: the one binary result's raw bytes, the
//!   rest in headers (`X-Forgesyte-Pointer` when at most
//!   [`MAX_RESULT_HEADER`] bytes, else `X-Forgesyte-Pointer-Omitted`,
//!   `X-Forgesyte-Processing-Time-Ms`, and the JSON answer in
//!   `X-Forgesyte-Result` when it is ASCII and at most
//!   [`MAX_RESULT_HEADER`] bytes, else `X-Forgesyte-Result-Omitted`);
//!   406 with a JSON failure when the result has not exactly one binary
//!   result and the client accepts nothing else.
//!
//! Each representation takes the weight of the most specific media range
//! that matches it (`q=0` excludes it, whatever a wildcard says; wildcards
//! select JSON, or multipart where JSON is refused); the highest weight wins, then the range given first. The bytes go out as they came from the plugin
//! (shared, never copied into another buffer). A leaf: it knows HTTP media
//! types and the answer's shape, nothing of plugins.

use std::hash::{BuildHasher as _, Hasher as _};

use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, VARY};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::accept::{Accept, preferred, refused};
use crate::budget::AnswerBudget;
use crate::error::{RunError, RunFailure};
use crate::respond::{json, json_bytes};
use crate::tools::RunSuccess;

/// Largest JSON answer sent in the `X-Forgesyte-Result` header of a raw
/// answer.
pub(crate) const MAX_RESULT_HEADER: usize = 8 * 1024;

/// Header: the JSON Pointer of the raw answer's bytes.
pub(crate) const POINTER_HEADER: &str = "x-forgesyte-pointer";
/// Header: why `X-Forgesyte-Pointer` is absent (`too-large`: the pointer's
/// text is over [`MAX_RESULT_HEADER`] bytes).
pub(crate) const POINTER_OMITTED_HEADER: &str = "x-forgesyte-pointer-omitted";
/// Header: the JSON answer (with `null` at the pointer) of a raw answer.
pub(crate) const RESULT_HEADER: &str = "x-forgesyte-result";
/// Header: why `X-Forgesyte-Result` is absent (`too-large`, `not-ascii`).
pub(crate) const RESULT_OMITTED_HEADER: &str = "x-forgesyte-result-omitted";
/// Header: the call's processing time in milliseconds, on a raw answer.
pub(crate) const TIME_HEADER: &str = "x-forgesyte-processing-time-ms";

/// Characters percent-encoded in a pointer sent in a header or a
/// `Content-Disposition` name: controls, non-ASCII, and what would end a
/// quoted string.
const POINTER_ESCAPES: &AsciiSet = &CONTROLS.add(b'"').add(b'\\').add(b'%');

/// How a success is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Representation {
    /// JSON, binary results as base64 strings.
    Json,
    /// `multipart/mixed`: the JSON, then the binary results.
    Multipart,
    /// The one binary result's bytes.
    Raw,
}

/// The representation `headers`' `Accept` asks for, given that the result
/// has `binary` binary results; `Err` (406) when only raw bytes are
/// acceptable and there are not exactly one.
pub(crate) fn negotiate(headers: &HeaderMap, binary: usize) -> Result<Representation, String> {
    let accept = Accept::of(headers);
    // Each representation's weight is the most specific range's that
    // matches it (RFC 9110 §12.5.1: `application/json;q=0` excludes JSON
    // whatever `*/*` says); wildcards select JSON, the default, or
    // multipart where JSON is refused.
    let json = accept.weight(&["application/json", "application/*", "*/*"]);
    // JSON refused (`application/json;q=0, */*`): the wildcard selects
    // multipart, which holds any result, rather than the JSON refused.
    let multipart = if refused(json) {
        accept.weight(&["multipart/mixed", "multipart/*", "*/*"])
    } else {
        accept.weight(&["multipart/mixed", "multipart/*"])
    };
    // JSON refused and multipart not acceptable: the wildcards can only
    // mean the raw bytes (`application/json;q=0, application/*`).
    let raw = if refused(json) && !multipart.is_some_and(|(q, _)| q > 0.0) {
        accept.weight(&["application/octet-stream", "application/*", "*/*"])
    } else {
        accept.weight(&["application/octet-stream"])
    };
    let raw_asked = raw.is_some_and(|(q, _)| q > 0.0) && binary != 1;
    let chosen = preferred([
        (Representation::Json, json),
        (Representation::Multipart, multipart),
        (Representation::Raw, raw.filter(|_| binary == 1)),
    ]);
    match chosen {
        Some(representation) => Ok(representation),
        None if raw_asked => Err(format!(
            "the result has {binary} binary results; application/octet-stream answers exactly \
             one: accept application/json (base64 in the JSON) or multipart/mixed"
        )),
        // Nothing this route makes is asked for: the header is disregarded
        // (RFC 9110 §12.5.1 allows it), and JSON answers.
        None => Ok(Representation::Json),
    }
}

/// The 406 answer for a success the client cannot take (`detail` from
/// [`negotiate`]), in the run route's failure shape.
pub(crate) fn not_acceptable(success: &RunSuccess, detail: String) -> Response {
    let failure = RunFailure {
        ok: false,
        plugin_id: success.plugin_id.clone(),
        tool_name: success.tool_name.clone(),
        error: "not acceptable".into(),
        error_type: "NotAcceptable".into(),
        detail: format!(
            "tool '{}' of plugin '{}' ran, but {detail}",
            success.tool_name, success.plugin_id
        ),
        not_runnable: None,
    };
    json(StatusCode::NOT_ACCEPTABLE, &failure)
}

/// `success` (its result holding `null` at each binary result's place)
/// with each binary result put there as a base64 string.
pub(crate) fn with_base64(mut success: RunSuccess, binary: Vec<(String, Bytes)>) -> RunSuccess {
    let output = forgesyte_loader::ToolOutput {
        result: std::mem::take(&mut success.result),
        binary,
    };
    success.result = output.into_json();
    success
}

/// The answer to a success in `representation`, its bytes holding room
/// in `budget` until they are sent (`AnswersInFlight` or `AnswerTooLarge`
/// when there is none for them: the answer is dropped).
pub(crate) fn respond(
    success: RunSuccess,
    binary: Vec<(String, Bytes)>,
    representation: Representation,
    budget: &AnswerBudget,
) -> Result<Response, RunError> {
    let mut response = match representation {
        Representation::Json => match serde_json::to_vec(&with_base64(success, binary)) {
            Ok(body) => {
                let room = budget.charge(body.len())?;
                json_bytes(StatusCode::OK, AnswerBudget::hold(body, room))
            }
            Err(e) => {
                return Err(RunError::Internal {
                    message: format!("serialising a response: {e}"),
                });
            }
        },
        Representation::Multipart => multipart(&success, binary, budget)?,
        Representation::Raw => raw(&success, binary, budget)?,
    };
    // The representation depends on `Accept` (RFC 9110 §12.5.5).
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("accept"));
    Ok(response)
}

fn encoded_pointer(pointer: &str) -> String {
    utf8_percent_encode(pointer, POINTER_ESCAPES).to_string()
}

fn multipart(
    success: &RunSuccess,
    binary: Vec<(String, Bytes)>,
    budget: &AnswerBudget,
) -> Result<Response, RunError> {
    let head = match serde_json::to_vec(success) {
        Ok(head) => Bytes::from(head),
        Err(e) => {
            return Err(RunError::Internal {
                message: format!("serialising a response: {e}"),
            });
        }
    };
    let boundary =
        boundary(std::iter::once(&head[..]).chain(binary.iter().map(|(_, bytes)| &bytes[..])));
    let mut chunks: Vec<Bytes> = Vec::with_capacity(3 + 3 * binary.len());
    chunks.push(Bytes::from(format!(
        "--{boundary}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        head.len()
    )));
    chunks.push(head);
    for (pointer, bytes) in binary {
        chunks.push(Bytes::from(format!(
            "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\
             Content-Disposition: attachment; name=\"{}\"\r\nContent-Length: {}\r\n\r\n",
            encoded_pointer(&pointer),
            bytes.len()
        )));
        chunks.push(bytes);
    }
    let closing = format!("\r\n--{boundary}--\r\n");
    let length: usize = chunks.iter().map(Bytes::len).sum::<usize>() + closing.len();
    // The room goes with the last part: hyper takes it after all the
    // others, and it is dropped with the rest if the client leaves first.
    let room = budget.charge(length)?;
    chunks.push(AnswerBudget::hold(closing, room));
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let mut response = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
        headers.insert(CONTENT_TYPE, value);
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// A boundary that occurs in none of `parts` (RFC 2046: at most 70
/// characters).
fn boundary<'a>(parts: impl Iterator<Item = &'a [u8]> + Clone) -> String {
    loop {
        // A randomly keyed hash of the time: unpredictable enough that a
        // part cannot be made to hold the boundary, and checked besides.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let high = hasher.finish();
        hasher.write_u8(1);
        let candidate = format!("forgesyte-{high:016x}{:016x}", hasher.finish());
        let needle = candidate.as_bytes();
        if !parts
            .clone()
            .any(|part| part.windows(needle.len()).any(|w| w == needle))
        {
            return candidate;
        }
    }
}

fn raw(
    success: &RunSuccess,
    mut binary: Vec<(String, Bytes)>,
    budget: &AnswerBudget,
) -> Result<Response, RunError> {
    let Some((pointer, bytes)) = binary.pop() else {
        return Ok(not_acceptable(
            success,
            "the result has no binary result".into(),
        ));
    };
    let length = bytes.len();
    let room = budget.charge(length)?;
    let mut response =
        (StatusCode::OK, Body::from(AnswerBudget::hold(bytes, room))).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    // A plugin's bytes: never sniffed into HTML by a browser.
    headers.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    // A pointer is as long as the plugin's keys: past the limit it would
    // make a header that clients and proxies refuse (64 KiB and less).
    let pointer = encoded_pointer(&pointer);
    if pointer.len() <= MAX_RESULT_HEADER {
        set(POINTER_HEADER, pointer);
    } else {
        set(POINTER_OMITTED_HEADER, "too-large".into());
    }
    set(TIME_HEADER, success.processing_time_ms.to_string());
    // Written up to the limit only: a result of tens of MiB is not
    // serialised whole just to learn it does not fit.
    let text = forgesyte_loader::json_text::to_vec_capped(success, MAX_RESULT_HEADER)
        .map(|text| String::from_utf8_lossy(&text).into_owned());
    match text {
        Err(e) if e.is_io() => set(RESULT_OMITTED_HEADER, "too-large".into()),
        // Visible ASCII and spaces only: a header value cannot hold DEL,
        // which JSON leaves as it is.
        Ok(text) if !text.bytes().all(|b| (b' '..=b'~').contains(&b)) => {
            set(RESULT_OMITTED_HEADER, "not-ascii".into());
        }
        Ok(text) => set(RESULT_HEADER, text),
        Err(_) => set(RESULT_OMITTED_HEADER, "unserialisable".into()),
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accept(value: &str) -> HeaderMap {
        crate::accept::accept_headers(&[value])
    }

    #[test]
    fn accept_picks_by_q_then_order_and_raw_needs_exactly_one() {
        use Representation::*;
        assert_eq!(negotiate(&HeaderMap::new(), 1), Ok(Json));
        assert_eq!(negotiate(&accept("*/*"), 1), Ok(Json));
        assert_eq!(negotiate(&accept("text/html"), 1), Ok(Json));
        assert_eq!(negotiate(&accept("multipart/mixed"), 0), Ok(Multipart));
        assert_eq!(negotiate(&accept("application/octet-stream"), 1), Ok(Raw));
        assert_eq!(
            negotiate(
                &accept("application/json;q=0.5, application/octet-stream"),
                1
            ),
            Ok(Raw)
        );
        assert_eq!(
            negotiate(
                &accept("application/octet-stream;q=0.2, multipart/mixed;q=0.9"),
                1
            ),
            Ok(Multipart)
        );
        // `Q` is `q`; a weight that is not a number from 0 to 1 drops its range.
        assert_eq!(
            negotiate(
                &accept("application/octet-stream;Q=0.1, multipart/mixed;q=0.5"),
                1
            ),
            Ok(Multipart)
        );
        // JSON refused, a wildcard allowing the rest: multipart.
        assert_eq!(
            negotiate(&accept("application/json;q=0, */*"), 0),
            Ok(Multipart)
        );
        assert_eq!(
            negotiate(
                &accept("application/json;q=0, */*;q=0.5, application/octet-stream"),
                1
            ),
            Ok(Raw)
        );
        // A quoted parameter's comma or semicolon splits nothing.
        for quoted in [r#"foo="a,b""#, r#"foo="a;q=1""#, r#"foo="a\",b""#] {
            let header = format!("application/octet-stream;{quoted};q=0.1, multipart/mixed;q=0.5");
            assert_eq!(negotiate(&accept(&header), 1), Ok(Multipart), "{quoted}");
        }
        for bad in ["inf", "NaN", "2", "-1", "x"] {
            let header = format!("application/octet-stream;q={bad}, multipart/mixed;q=0.5");
            assert_eq!(negotiate(&accept(&header), 1), Ok(Multipart), "{bad}");
        }
        // Raw bytes when there are not exactly one: another acceptable type,
        // or 406.
        assert_eq!(
            negotiate(
                &accept("application/octet-stream, application/json;q=0.1"),
                2
            ),
            Ok(Json)
        );
        let err = negotiate(&accept("application/octet-stream"), 2).unwrap_err();
        assert!(err.contains("2 binary results"), "{err}");
        assert!(negotiate(&accept("application/octet-stream"), 0).is_err());
        assert_eq!(
            negotiate(&accept("application/json;q=0, multipart/mixed"), 0),
            Ok(Multipart)
        );
        // The most specific range decides: JSON excluded although `*/*`
        // would take it.
        assert_eq!(
            negotiate(
                &accept("application/json;q=0, */*;q=0.5, multipart/mixed;q=0.1"),
                1
            ),
            Ok(Multipart)
        );
        assert_eq!(
            negotiate(&accept("*/*;q=0.1, application/octet-stream;q=0.2"), 1),
            Ok(Raw)
        );
        assert_eq!(negotiate(&accept("multipart/*;q=0, */*"), 1), Ok(Json));
        // Equal weights: the range given first.
        assert_eq!(
            negotiate(&accept("multipart/mixed, application/json"), 1),
            Ok(Multipart)
        );
        assert_eq!(
            negotiate(&accept("application/json, multipart/mixed"), 1),
            Ok(Json)
        );
        // Nothing acceptable: the header is disregarded.
        assert_eq!(negotiate(&accept("*/*;q=0"), 1), Ok(Json));
        // JSON and multipart refused, a wildcard allowing the rest: the
        // raw bytes where there is one binary result, else 406 (JSON came
        // back, refused).
        for header in [
            "*/*, application/json;q=0, multipart/mixed;q=0",
            "application/json;q=0, multipart/mixed;q=0, application/*",
            "application/json;q=0, application/*",
        ] {
            assert_eq!(negotiate(&accept(header), 1), Ok(Raw), "{header}");
            assert!(negotiate(&accept(header), 2).is_err(), "{header}");
        }
    }

    #[test]
    fn base64_goes_where_the_pointers_say() {
        let success = RunSuccess {
            ok: true,
            plugin_id: "p".into(),
            tool_name: "t".into(),
            result: json!({"a": null, "list": [null, 1], "x/y": null}),
            processing_time_ms: 1.0,
        };
        let binary = [
            ("/a".to_owned(), Bytes::from_static(b"\x00\xff")),
            ("/list/0".to_owned(), Bytes::from_static(b"ab")),
            ("/x~1y".to_owned(), Bytes::from_static(b"")),
        ];
        let out = with_base64(success.clone(), binary.to_vec());
        assert_eq!(
            out.result,
            json!({"a": "AP8=", "list": ["YWI=", 1], "x/y": ""})
        );
        let whole = with_base64(success, vec![(String::new(), Bytes::from_static(b"f"))]);
        assert_eq!(whole.result, json!("Zg=="));
    }

    #[test]
    fn a_raw_answer_says_why_its_result_header_is_missing() {
        let with = |result: serde_json::Value| {
            let success = RunSuccess {
                ok: true,
                plugin_id: "p".into(),
                tool_name: "t".into(),
                result,
                processing_time_ms: 1.0,
            };
            let budget = AnswerBudget::new(1024, Some(4096));
            raw(
                &success,
                vec![("/b".into(), Bytes::from_static(b"x"))],
                &budget,
            )
            .unwrap()
        };
        let plain = with(json!({"s": "fine"}));
        assert!(plain.headers().contains_key(RESULT_HEADER));
        for text in ["\u{7f}", "\u{e9}"] {
            let answer = with(json!({ "s": text }));
            assert!(!answer.headers().contains_key(RESULT_HEADER), "{text:?}");
            assert_eq!(
                answer.headers()[RESULT_OMITTED_HEADER],
                "not-ascii",
                "{text:?}"
            );
        }
        // The whole answer at the limit fits; past it, too large.
        let empty_len = with(json!("")).headers()[RESULT_HEADER].len();
        let fits = with(json!("a".repeat(MAX_RESULT_HEADER - empty_len)));
        assert_eq!(fits.headers()[RESULT_HEADER].len(), MAX_RESULT_HEADER);
        for over in [1, 10 << 20] {
            let big = with(json!("a".repeat(MAX_RESULT_HEADER - empty_len + over)));
            assert!(!big.headers().contains_key(RESULT_HEADER), "{over}");
            assert_eq!(big.headers()[RESULT_OMITTED_HEADER], "too-large", "{over}");
        }
    }

    /// A pointer up to the header limit is sent; a longer one (a key of
    /// 100,000 characters made a 100 KB header that clients refuse) is
    /// omitted, and the answer says so.
    #[test]
    fn a_raw_answer_s_pointer_header_is_capped() {
        let with = |pointer: String| {
            let success = RunSuccess {
                ok: true,
                plugin_id: "p".into(),
                tool_name: "t".into(),
                result: json!({}),
                processing_time_ms: 1.0,
            };
            let budget = AnswerBudget::new(1024, Some(4096));
            raw(&success, vec![(pointer, Bytes::from_static(b"x"))], &budget).unwrap()
        };
        let fits = with(format!("/{}", "k".repeat(MAX_RESULT_HEADER - 1)));
        assert_eq!(fits.headers()[POINTER_HEADER].len(), MAX_RESULT_HEADER);
        assert!(!fits.headers().contains_key(POINTER_OMITTED_HEADER));
        for long in [MAX_RESULT_HEADER, 100_000] {
            let big = with(format!("/{}", "k".repeat(long)));
            assert!(!big.headers().contains_key(POINTER_HEADER), "{long}");
            assert_eq!(big.headers()[POINTER_OMITTED_HEADER], "too-large", "{long}");
        }
    }

    #[test]
    fn every_representation_holds_room_until_its_body_is_dropped() {
        use Representation::*;
        const K: usize = 1024;
        let budget = AnswerBudget::new(K, Some(512 * K));
        let success = RunSuccess {
            ok: true,
            plugin_id: "p".into(),
            tool_name: "t".into(),
            result: json!({"b": null}),
            processing_time_ms: 1.0,
        };
        let binary = vec![("/b".to_owned(), Bytes::from(vec![1u8; 288 * K]))];
        for representation in [Json, Multipart, Raw] {
            let answer = respond(success.clone(), binary.clone(), representation, &budget);
            let answer = answer.unwrap();
            assert_eq!(answer.headers()[VARY], "accept", "{representation:?}");
            let free = budget.available_kib();
            assert!(free <= 512 - 288, "{representation:?}: {free} KiB free");
            let second = respond(success.clone(), binary.clone(), representation, &budget);
            assert_eq!(
                second.unwrap_err(),
                RunError::AnswersInFlight { budget_kib: 512 },
                "{representation:?}"
            );
            drop(answer);
            assert_eq!(budget.available_kib(), 512, "{representation:?}");
        }
        // 480 KiB are 640 KiB as base64: more than the whole budget as
        // JSON, not as raw bytes.
        let large = vec![("/b".to_owned(), Bytes::from(vec![1u8; 480 * K]))];
        let err = respond(success.clone(), large.clone(), Json, &budget).unwrap_err();
        assert!(matches!(err, RunError::AnswerTooLarge { .. }), "{err:?}");
        assert!(respond(success, large, Raw, &budget).is_ok());
        assert_eq!(budget.available_kib(), 512);
    }

    #[test]
    fn boundaries_avoid_the_parts() {
        let part = b"--forgesyte-0123".to_vec();
        let b = boundary([&part[..]].into_iter());
        assert!(b.starts_with("forgesyte-") && b.len() <= 70, "{b}");
        assert_ne!(b, boundary([&part[..]].into_iter()), "boundaries differ");
        assert_eq!(encoded_pointer("/a\"b\n%"), "/a%22b%0A%25");
        assert_eq!(encoded_pointer("/mask"), "/mask");
    }
}
