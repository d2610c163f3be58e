//! The fields of the text log format: one record per line, whatever its
//! fields hold.
//!
//! Much of what the log says comes from plugins: a failure's reason (an
//! exception's message), a crash's stderr tail, the lines a runner writes.
//! `tracing-subscriber`'s own text fields write a field's value as it is
//! (and escape only some terminal controls, in the message only): a reason
//! holding a newline started a forged log line, and one holding `ESC [2J`
//! cleared the operator's terminal. Here every control character of every
//! field, the message included, is written escaped (`\n`, `\r`, `\t`,
//! `\u{1b}`). The JSON format needs none of this (its strings are escaped).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// The text format's fields, each `name=value` (the message's value
/// alone), a string as it is and any other value as its `Debug` form, as
/// `tracing-subscriber` writes them, with control characters escaped (see
/// the module's documentation). Delimit them with
/// [`tracing_subscriber::field::MakeExt::delimited`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> Self::Visitor {
        EscapedVisitor {
            writer,
            result: Ok(()),
        }
    }
}

/// The visitor of [`EscapedFields`].
pub(crate) struct EscapedVisitor<'a> {
    writer: Writer<'a>,
    result: fmt::Result,
}

impl EscapedVisitor<'_> {
    fn write(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        if name == "message" {
            // A message holding ` name=` (a plugin's stderr line, a reason
            // quoted in it) is quoted whole: ` plugin=victim` in it would
            // read as a field.
            self.result = if holds_a_field(&text) {
                self.quoted(&text)
            } else {
                Escaping(&mut self.writer).write_str(&text)
            };
            return;
        }
        // A value with a space or an `=` is quoted (its `"` and `\`
        // escaped): a reason holding ` plugin=victim` read as a field.
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = write!(self.writer, "{name}=").and_then(|()| {
            if text.is_empty() || text.contains([' ', '=']) {
                self.quoted(&text)
            } else {
                Escaping(&mut self.writer).write_str(&text)
            }
        });
    }

    /// `text` between double quotes, its `"` and `\` escaped, and its
    /// control characters.
    fn quoted(&mut self, text: &str) -> fmt::Result {
        let quoted = text.replace('\\', "\\\\").replace('"', "\\\"");
        self.writer.write_char('"')?;
        Escaping(&mut self.writer).write_str(&quoted)?;
        self.writer.write_char('"')
    }
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // A string as it is, not quoted (its `Debug` form).
        self.write(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, value);
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Whether `text` holds ` name=`: a space, then a word a field's name could
/// be, then `=`.
fn holds_a_field(text: &str) -> bool {
    text.split(' ').skip(1).any(|word| {
        word.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        })
    })
}

/// Writes through to a log record, control characters escaped.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        forgesyte_server::controls::write_escaped(self.0, text)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::field::MakeExt as _;

    /// What the text format writes for one event, with these fields.
    fn logged(emit: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&out);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(super::EscapedFields.delimited(" "))
            .with_writer(move || Writer(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).unwrap()
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(data);
            }
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_plugins_reason_cannot_start_a_line_or_drive_the_terminal() {
        let reason =
            "InitError: RuntimeError: x\n2026-12-04T17:18:51Z  INFO forged\x1b[2K\r\0\u{9b}";
        let text = logged(|| {
            tracing::error!(plugin = %"evil", %reason, "✗ Plugin FAILED: {}\nnext", "evil");
        });
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with('\n'), "{text:?}");
        assert!(
            text.contains(
                "✗ Plugin FAILED: evil\\nnext plugin=evil reason=\"InitError: RuntimeError: \
                 x\\n2026-12-04T17:18:51Z  INFO forged\\u{1b}[2K\\r\\u{0}\\u{9b}\""
            ),
            "{text:?}"
        );
        assert!(!text.contains('\x1b') && !text.contains('\r') && !text.contains('\0'));
        // Debug values keep their form (a string's quotes), escaped too;
        // a string field is written as it is.
        let text = logged(|| tracing::info!(value = ?"tab\there", name = "a\tb", "done"));
        assert!(
            text.contains(r#"done value="tab\there" name=a\tb"#),
            "{text:?}"
        );
        // A value with a space or `=` is quoted: it cannot pass for fields.
        let forged = r#"boom" plugin=victim \"#;
        // Nor can a message: one holding ` name=` is quoted whole.
        let text = logged(|| tracing::info!(plugin = "evil", "{forged}"));
        assert!(
            text.contains(r#""boom\" plugin=victim \\" plugin=evil"#),
            "{text:?}"
        );
        let text = logged(|| tracing::info!(plugin = "evil", "RUST_LOG=x a = b =d"));
        assert!(text.contains("RUST_LOG=x a = b =d plugin=evil"), "{text:?}");
        let text = logged(|| tracing::error!(plugin = "evil", reason = %forged, empty = "", "x"));
        assert!(
            text.contains(r#"x plugin=evil reason="boom\" plugin=victim \\" empty="""#),
            "{text:?}"
        );
    }
}
