//! Text that plugins or clients chose (a failure's reason, a line of a
//! runner's stderr), written where a control character does harm: the
//! text log (one record per line) and `forgesyte check`'s report (one line
//! per plugin). A newline there started a forged line, and `ESC [2J`
//! cleared the operator's terminal.

use std::fmt;

/// Writes `text` to `out` with every control character escaped: `\n`,
/// `\r`, `\t`, and any other as `\u{1b}` (C0, DEL and C1 alike); so are
/// the line and paragraph separators and the bidirectional controls
/// (U+202E reorders what a terminal shows of the rest of its line).
///
/// # Errors
///
/// What `out` answers.
pub fn write_escaped(out: &mut dyn fmt::Write, text: &str) -> fmt::Result {
    let harmful = |c: char| {
        c.is_control()
            || matches!(
                c,
                '\u{061c}'
                    | '\u{200e}'
                    | '\u{200f}'
                    | '\u{2028}'
                    | '\u{2029}'
                    | '\u{202a}'..='\u{202e}'
                    | '\u{2066}'..='\u{2069}'
            )
    };
    let mut rest = text;
    while let Some(at) = rest.find(harmful) {
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
        assert_eq!(
            Escaped("v1\u{202e}gpj.exe\u{2066}x\u{2028}y").to_string(),
            "v1\\u{202e}gpj.exe\\u{2066}x\\u{2028}y"
        );
    }
}
