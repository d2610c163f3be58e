//! How one message quotes another's text.

/// `text` cut to at most `max` characters, with `…` when cut: another
/// error's text quoted inside a reason stays bounded, however long (or
/// however deeply nested) what it quotes.
pub fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// The most characters of a plugin's text (a reason, an error's message,
/// a traceback) that one log line shows: what a plugin says may be tens of
/// KiB (a Python error's 64 Ki characters, a panic's message), the health
/// route and the answer have it whole.
pub const LOGGED_CHARS: usize = 4096;

/// [`shorten`] for text that mostly fits: borrowed, with no copy, when
/// `text` is within `max` characters (its bytes are checked first).
pub fn within(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(shorten(text, max))
    }
}

/// `text` as a log line shows it: its first [`LOGGED_CHARS`] characters
/// (with `…` when cut).
pub fn logged(text: &str) -> std::borrow::Cow<'_, str> {
    within(text, LOGGED_CHARS)
}

#[cfg(test)]
mod tests {
    use super::{LOGGED_CHARS, logged, shorten, within};

    #[test]
    fn a_logged_text_is_cut_at_its_bound() {
        assert_eq!(logged("short"), "short");
        let long = "é".repeat(LOGGED_CHARS + 1);
        assert_eq!(logged(&long).chars().count(), LOGGED_CHARS + 1);
        assert!(logged(&long).ends_with('…'));
        // Within its bound in characters though not in bytes: whole.
        assert_eq!(within("ééé", 3), "ééé");
        assert_eq!(within("éééé", 3), "ééé…");
        assert!(matches!(within("abc", 3), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn text_is_cut_at_a_character_not_a_byte() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "abc…");
        assert_eq!(shorten("ééé", 2), "éé…");
        assert_eq!(shorten("", 0), "");
    }
}
