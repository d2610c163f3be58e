//! A `multipart/form-data` body (RFC 7578 over RFC 2046) split in place:
//! each part's content is a [`Bytes`] slice of the body as received (one
//! buffer, no copy), its field name and file name read from its
//! `Content-Disposition`. A leaf: it knows the format, nothing of tools or
//! arguments ([`crate::body`] decides what the parts mean).
//!
//! The body must open with the delimiter (a preamble before it is allowed)
//! and end with the closing one (an epilogue after it is ignored). Part
//! headers are at most [`MAX_HEADER_BYTES`] long, field names
//! [`MAX_FIELD_NAME_BYTES`]. Whatever the bytes,
//! splitting ends in parts or an error, never a panic (the body module's
//! property tests drive it with arbitrary bodies).

use axum::body::Bytes;
use memchr::memmem;

/// Longest header block of one part.
pub(crate) const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Longest field name of a part: each one is copied (an argument's key, a
/// JSON Pointer) outside the body's room in `--body-memory`, so the parts
/// limit alone would let a body of long names hold twice or three times
/// its room.
pub(crate) const MAX_FIELD_NAME_BYTES: usize = 1024;

/// One part of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// The `name` of its `Content-Disposition: form-data`, if it has one.
    pub(crate) name: Option<String>,
    /// Whether it has a `filename` (a file part).
    pub(crate) is_file: bool,
    /// Its content: a slice of the body.
    pub(crate) data: Bytes,
}

/// Splits `body` at `boundary` into parts, in order; at most `max_parts`
/// (one more is an error naming the limit). `Err` says what is malformed.
pub(crate) fn split(body: &Bytes, boundary: &str, max_parts: usize) -> Result<Vec<Part>, String> {
    // RFC 2046 §5.1.1: 1 to 70 characters.
    if boundary.is_empty() || boundary.len() > 70 {
        return Err(format!(
            "the boundary must be 1 to 70 characters, not {}",
            boundary.len()
        ));
    }
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let next_delimiter = memmem::Finder::new(&[b"\r\n", delimiter].concat()).into_owned();
    let mut at = if body.starts_with(delimiter) {
        0
    } else {
        next_delimiter
            .find(body)
            .map(|i| i + 2)
            .ok_or("no opening boundary")?
    };
    let mut parts = Vec::new();
    loop {
        at += delimiter.len();
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding, then the end of the delimiter line.
        let padding = rest
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        if !rest[padding..].starts_with(b"\r\n") {
            return Err("a boundary line does not end with CRLF".into());
        }
        at += padding + 2;
        if parts.len() == max_parts {
            return Err(format!("more than {max_parts} parts"));
        }
        let head_len = if body[at..].starts_with(b"\r\n") {
            0
        } else {
            let window = &body[at..body.len().min(at + MAX_HEADER_BYTES + 4)];
            match memmem::find(window, b"\r\n\r\n") {
                Some(end) => end + 2,
                // Cut at the limit, not at the body's end: they may end
                // further on, and the limit is what refuses them.
                None if window.len() < body.len() - at => {
                    return Err(format!(
                        "a part's headers are longer than {MAX_HEADER_BYTES} bytes"
                    ));
                }
                None => return Err("part headers without an end".into()),
            }
        };
        let head = std::str::from_utf8(&body[at..at + head_len])
            .map_err(|_| "part headers are not UTF-8")?;
        let (name, is_file) = disposition(head)?;
        let start = at + head_len + 2;
        let end = next_delimiter
            .find(&body[start..])
            .map(|i| start + i)
            .ok_or("incomplete body: a part has no closing boundary")?;
        parts.push(Part {
            name,
            is_file,
            data: body.slice(start..end),
        });
        at = end + 2;
    }
}

/// The field name and whether there is a file name, from the part's
/// header lines (`Name: value`, CRLF-separated).
fn disposition(head: &str) -> Result<(Option<String>, bool), String> {
    let mut found = (None, false);
    // A name given twice (two parameters, or two dispositions) is
    // ambiguous: the last one won, where another parser takes the first.
    let mut named = false;
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let (header, value) = line
            .split_once(':')
            .ok_or_else(|| format!("a part header line has no colon: {line:?}"))?;
        if !header.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        for (key, value) in parameters(value) {
            match key.to_ascii_lowercase().as_str() {
                "name" if value.len() > MAX_FIELD_NAME_BYTES => {
                    return Err(format!(
                        "a part's field name has {} bytes, at most {MAX_FIELD_NAME_BYTES}",
                        value.len()
                    ));
                }
                "name" if named => {
                    return Err("a part names its field twice".to_owned());
                }
                // An empty name names no field.
                "name" => {
                    named = true;
                    found.0 = Some(value).filter(|name| !name.is_empty());
                }
                "filename" | "filename*" => found.1 = true,
                _ => {}
            }
        }
    }
    Ok(found)
}

/// The `key=value` parameters after the disposition type; a value is a
/// token or a quoted string (backslash escapes a character).
fn parameters(value: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut rest = match value.split_once(';') {
        Some((_, rest)) => rest,
        None => return params,
    };
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(';').trim().to_owned();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((key, value));
        rest = match remaining.split_once(';') {
            Some((_, next)) => next,
            None => "",
        };
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_slices_of_the_body() {
        let body = Bytes::from_static(
            b"preamble\r\n--b\r\nContent-Disposition: form-data; name=\"args\"\r\n\r\n{}\r\n\
              --b  \r\ncontent-disposition: form-data; name=\"a\\\"b\"; filename=\"f.png\"\r\n\
              Content-Type: image/png\r\n\r\n\x00\r\n--x\r\n--b\r\n\r\nno headers\r\n--b--\r\nepilogue",
        );
        let parts = split(&body, "b", 10).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].name.as_deref(), Some("args"));
        assert!(!parts[0].is_file);
        assert_eq!(&parts[0].data[..], b"{}");
        assert_eq!(parts[1].name.as_deref(), Some("a\"b"));
        assert!(parts[1].is_file);
        assert_eq!(&parts[1].data[..], b"\x00\r\n--x");
        let offset = parts[1].data.as_ptr() as usize - body.as_ptr() as usize;
        assert_eq!(
            &body[offset..offset + 6],
            b"\x00\r\n--x",
            "a slice, not a copy"
        );
        assert_eq!(parts[2].name, None);
        assert_eq!(&parts[2].data[..], b"no headers");
    }

    #[test]
    fn malformed_bodies_say_why() {
        let cases: [(&[u8], &str); 5] = [
            (b"garbage", "no opening boundary"),
            (b"--b\r\n\r\nunclosed", "no closing boundary"),
            (b"--bx\r\n", "does not end with CRLF"),
            (
                b"--b\r\nContent-Disposition form-data\r\n\r\nx\r\n--b--",
                "no colon",
            ),
            (
                b"--b\r\n\r\n1\r\n--b\r\n\r\n2\r\n--b--",
                "more than 1 parts",
            ),
        ];
        for (body, why) in cases {
            let err = split(&Bytes::from_static(body), "b", 1).unwrap_err();
            assert!(err.contains(why), "{err} lacks {why}");
        }
        assert_eq!(split(&Bytes::from_static(b"--b--"), "b", 1), Ok(Vec::new()));
        // A boundary no sender may use.
        let body = Bytes::from_static(b"--\r\n\r\nhi\r\n----\r\n");
        for boundary in [String::new(), "b".repeat(71)] {
            let err = split(&body, &boundary, 8).unwrap_err();
            assert!(err.contains("1 to 70 characters"), "{err}");
        }
        // An empty field name names no field.
        let body = Bytes::from_static(
            b"--b\r\nContent-Disposition: form-data; name=\"\"\r\n\r\nhi\r\n--b--",
        );
        assert_eq!(split(&body, "b", 8).unwrap()[0].name, None);
        // A field named twice, in one disposition or two, is ambiguous.
        for body in [
            &b"--b\r\nContent-Disposition: form-data; name=\"a\"; name=\"b\"\r\n\r\nhi\r\n--b--"[..],
            &b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\nhi\r\n--b--"[..],
        ] {
            let err = split(&Bytes::copy_from_slice(body), "b", 8).unwrap_err();
            assert!(err.contains("names its field twice"), "{err}");
        }
        // A field name at the limit is taken, one longer is refused.
        let named = |len: usize| {
            Bytes::from(format!(
                "--b\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\nhi\r\n--b--",
                "n".repeat(len)
            ))
        };
        let parts = split(&named(MAX_FIELD_NAME_BYTES), "b", 8).unwrap();
        assert_eq!(
            parts[0].name.as_ref().map(String::len),
            Some(MAX_FIELD_NAME_BYTES)
        );
        let err = split(&named(MAX_FIELD_NAME_BYTES + 1), "b", 8).unwrap_err();
        assert!(
            err.contains("field name has 1025 bytes, at most 1024"),
            "{err}"
        );
    }

    #[test]
    fn headers_over_the_limit_are_named_as_such_not_as_endless() {
        let head = |pad: usize, end: &str| {
            let text = format!(
                "--b\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: {}{end}",
                "x".repeat(pad)
            );
            Bytes::from(text.into_bytes())
        };
        let err = split(&head(9000, "\r\n\r\nv\r\n--b--"), "b", 8).unwrap_err();
        assert_eq!(err, "a part's headers are longer than 8192 bytes");
        // Under the limit they are read; cut short, they have no end.
        let parts = split(&head(8000, "\r\n\r\nv\r\n--b--"), "b", 8).unwrap();
        assert_eq!(&parts[0].data[..], b"v");
        let err = split(&head(10, ""), "b", 8).unwrap_err();
        assert_eq!(err, "part headers without an end");
    }
}
