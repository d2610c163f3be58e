//! The signed object: `forgesyte.sig.list`, the canonical list of a
//! plugin's files and their SHA-256 digests, and its strict parser.
//!
//! The list is exactly what [`integrity::format_listing`] writes (and
//! `sha256sum` prints): one `<64 lowercase hex>  <relative path>\n` line
//! per file, sorted bytewise by path, no duplicates, no empty or absolute
//! paths, no `.` or `..` components, no backslashes. Anything else is
//! refused with the line number, so one list has exactly one reading.
//!
//! This module knows bytes and text only: no filesystem, no keys.

use std::collections::BTreeMap;

use crate::integrity;

/// The largest list the host reads (1 MiB): parsing refuses anything
/// larger before it allocates.
pub const MAX_LIST_BYTES: usize = 1 << 20;

/// Why [`parse_list`] refused a list: what is wrong, and on which line
/// (1-based) when it is one line's fault rather than the whole list's
/// (its size, encoding or end). Displayed `line N: what`, or `what`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    /// The line at fault, if one is.
    pub line: Option<usize>,
    /// What is wrong.
    pub what: String,
}

impl std::error::Error for ListError {}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// Parses a list: relative path → digest.
///
/// # Errors
///
/// A one-line reason, naming the line at fault when one is.
pub fn parse_list(bytes: &[u8]) -> Result<BTreeMap<String, String>, ListError> {
    let whole = |what: String| ListError { line: None, what };
    if bytes.len() > MAX_LIST_BYTES {
        return Err(whole(format!(
            "{} bytes, larger than the {MAX_LIST_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| whole(format!("not UTF-8 text (byte {})", e.valid_up_to())))?;
    if text.is_empty() {
        return Err(whole("empty: it lists no file".to_owned()));
    }
    let Some(body) = text.strip_suffix('\n') else {
        return Err(whole(
            "the last line does not end with a newline".to_owned(),
        ));
    };
    let mut files = BTreeMap::new();
    let mut previous: Option<&str> = None;
    for (index, line) in body.split('\n').enumerate() {
        let bad = |what: &str| ListError {
            line: Some(index + 1),
            what: what.to_owned(),
        };
        let Some((digest, path)) = line.split_once("  ") else {
            return Err(bad("expected '<sha256>  <path>'"));
        };
        if digest.len() != 64
            || !digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad("the digest is not 64 lowercase hexadecimal digits"));
        }
        check_path(path).map_err(|why| bad(&why))?;
        if previous.is_some_and(|p| p >= path) {
            return Err(bad(&format!(
                "{path:?} is out of order or repeated (paths are sorted bytewise, once each)"
            )));
        }
        previous = Some(path);
        files.insert(path.to_owned(), digest.to_owned());
    }
    Ok(files)
}

/// The list of `digests`, as [`parse_list`] reads it back.
pub fn format_list(digests: &BTreeMap<String, String>) -> String {
    integrity::format_listing(digests)
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".to_owned());
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\r') {
        return Err(format!("{path:?} is not a relative '/'-separated path"));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "{path:?} has an empty, '.' or '..' component (it must stay inside the plugin directory)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn a_list_reads_back_as_written() {
        let mut digests = BTreeMap::new();
        digests.insert("manifest.json".to_owned(), A.to_owned());
        digests.insert("pkg/a.py".to_owned(), A.replace('a', "0"));
        let text = format_list(&digests);
        assert_eq!(
            text,
            format!("{A}  manifest.json\n{}  pkg/a.py\n", A.replace('a', "0"))
        );
        assert_eq!(parse_list(text.as_bytes()), Ok(digests));
    }

    #[test]
    fn every_deviation_is_refused_with_its_line() {
        let upper = A.to_ascii_uppercase();
        for (text, expected) in [
            (String::new(), "empty".to_owned()),
            (
                format!("{A}  a"),
                "the last line does not end with a newline".to_owned(),
            ),
            (format!("{A} a\n"), "line 1: expected".to_owned()),
            (format!("{upper}  a\n"), "line 1: the digest".to_owned()),
            (
                format!("{A}  b\n{A}  a\n"),
                "line 2: \"a\" is out of order".to_owned(),
            ),
            (
                format!("{A}  a\n{A}  a\n"),
                "line 2: \"a\" is out of order".to_owned(),
            ),
            (
                format!("{A}  ../a\n"),
                "line 1: \"../a\" has an empty".to_owned(),
            ),
            (
                format!("{A}  /etc/passwd\n"),
                "line 1: \"/etc/passwd\" is not".to_owned(),
            ),
            (
                format!("{A}  a//b\n"),
                "line 1: \"a//b\" has an empty".to_owned(),
            ),
            (format!("{A}  \n"), "line 1: empty path".to_owned()),
            ("\u{0}\u{ff}\n".to_owned(), "line 1: expected".to_owned()),
        ] {
            let err = parse_list(text.as_bytes()).unwrap_err();
            assert_eq!(
                err.line.is_some(),
                expected.starts_with("line "),
                "{text:?}: {err}"
            );
            assert!(err.to_string().starts_with(&expected), "{text:?}: {err}");
        }
        let err = parse_list(&[b'a', 0xff, b'\n']).unwrap_err();
        assert_eq!(err.to_string(), "not UTF-8 text (byte 1)");
        assert_eq!(err.line, None);
        let big = vec![b'a'; MAX_LIST_BYTES + 1];
        assert!(parse_list(&big).unwrap_err().what.contains("limit"));
    }
}
