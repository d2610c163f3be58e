//! Text that plugins or clients chose (a failure's reason, a line of a
//! runner's stderr), written where a control character does harm: the
//! text log (one record per line) and `forgesyte check`'s report (one line
//! per plugin). A newline there started a forged line, and `ESC [2J`
//! cleared the operator's terminal.

use std::fmt;

/// Writes `text` to `out` with every control character escaped: `\n`,
/// `\r`, `\t`, and any other as `\u{1b}` (C0, DEL and C1 alike).
///
/// # Errors
///
/// What `out` answers.
pub fn write_escaped(out: &mut dyn fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(char::is_control) {
        out.write_str(&rest[..at])?;
        let control = rest[at..].chars().next().unwrap_or('\0');
        match control {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            other => write!(out, "\\u{{{:x}}}", u32::from(other))?,
        }
        rest = &rest[at + control.len_utf8()..];
    }
    out.write_str(rest)
}

/// `text`, displayed with [`write_escaped`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            Escaped("a\nb\r\tc\x1b[2J\0\u{7f}\u{9b}é✓").to_string(),
            "a\\nb\\r\\tc\\u{1b}[2J\\u{0}\\u{7f}\\u{9b}é✓"
        );
        assert_eq!(Escaped("plain").to_string(), "plain");
    }
}
