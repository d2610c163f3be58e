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

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn text_is_cut_at_a_character_not_a_byte() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "abc…");
        assert_eq!(shorten("ééé", 2), "éé…");
        assert_eq!(shorten("", 0), "");
    }
}
