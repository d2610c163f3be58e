//! The base64 text of a binary argument sent in JSON, decoded into the
//! buffer that held the text.
//!
//! A decoded argument is never longer than its text (three bytes for every
//! four symbols), so the text is decoded a chunk at a time and each chunk's
//! bytes are written over text already read: the argument never exists
//! twice, and a JSON body's peak stays the text the body budget charged
//! (`--body-memory`), not text plus bytes. `base64`'s own decoders need a
//! separate output, hence this loop around [`Engine::decode_slice`], through
//! a 48 KiB buffer.

use base64::engine::general_purpose::STANDARD;
use base64::{DecodeError, DecodeSliceError, Engine as _};

/// Symbols decoded per step: a multiple of 4, so only the last chunk may
/// end in a partial quad or padding, as the whole text may.
const CHUNK: usize = 64 * 1024;

/// Decodes standard base64 in `text`, after [`base64_text`] drops
/// surrounding whitespace and a `data:` URL prefix; whitespace inside
/// (base64 wrapped in lines: MIME, the `base64` command, Python's
/// `encodebytes`) is dropped, in place, from the first chunk that fails
/// on it on (base64 in one line, the common case, is read once). An
/// error's offsets count symbols, whitespace not included.
pub(crate) fn decode_in_place(text: String) -> Result<Vec<u8>, DecodeError> {
    let data = base64_text(&text);
    // `data` is a slice of `text`: its place in the buffer.
    let start = data.as_ptr() as usize - text.as_ptr() as usize;
    let len = data.len();
    let mut buf = text.into_bytes();
    buf.truncate(start + len);
    let mut bytes = vec![0u8; CHUNK / 4 * 3];
    // The symbols from `read` on are still text; the bytes decoded so far
    // lie before `written` (`written <= read - start`).
    let (mut read, mut written) = (start, 0);
    let mut compacted = false;
    while read < buf.len() {
        let end = buf.len().min(read + CHUNK);
        // A chunk may end in padding, the text only in its last: padding
        // before it is refused as the whole text's decoder refuses it, at
        // the first `=`, unless the chunk's decoder found a bad symbol
        // before it (its complaints about the padded quad itself, the last
        // symbol's bits or the padding, are the whole text's `=`).
        let padded_early = end < buf.len() && buf[end - 1] == b'=';
        let early_padding = || {
            let at = memchr::memchr(b'=', &buf[read..end]).unwrap_or(end - 1 - read);
            DecodeError::InvalidByte(read - start + at, b'=')
        };
        let failed = match STANDARD.decode_slice(&buf[read..end], &mut bytes) {
            Ok(_) if padded_early => return Err(early_padding()),
            Ok(decoded) => {
                // `written + decoded <= (end - start) / 4 * 3 < end`: the
                // text under it has been read.
                buf[written..written + decoded].copy_from_slice(&bytes[..decoded]);
                written += decoded;
                read = end;
                continue;
            }
            Err(DecodeSliceError::DecodeError(e)) => e,
            // `bytes` holds what a full chunk decodes to.
            Err(DecodeSliceError::OutputSliceTooSmall) => DecodeError::InvalidLength(end - read),
        };
        // Whitespace in the text: dropped from here to the end, once, and
        // the chunk decoded again.
        if !compacted && has_whitespace(&buf[read..]) {
            compact(&mut buf, read);
            compacted = true;
            continue;
        }
        return Err(match failed {
            DecodeError::InvalidLastSymbol { .. } | DecodeError::InvalidPadding if padded_early => {
                early_padding()
            }
            e => shifted(e, read - start),
        });
    }
    buf.truncate(written);
    // Gives the text's excess back (the allocator shrinks in place).
    buf.shrink_to_fit();
    Ok(buf)
}

/// `e` in words for the client: a bad symbol shown as itself, where it is
/// counted (symbols only: whitespace and a `data:` prefix are not), and,
/// for `-` and `_`, that URL-safe base64 is not read.
pub(crate) fn describe(e: &DecodeError) -> String {
    let shown = |byte: u8| match byte {
        b'!'..=b'~' => format!("'{}'", char::from(byte)),
        _ => format!("byte 0x{byte:02x}"),
    };
    match *e {
        DecodeError::InvalidByte(at, byte) => {
            let hint = if matches!(byte, b'-' | b'_') {
                " (URL-safe base64? send standard base64, with + and / for - and _)"
            } else {
                ""
            };
            format!(
                "{} is no base64 symbol, at symbol {at} (counted from 0, whitespace and a data: \
                 prefix not counted){hint}",
                shown(byte)
            )
        }
        DecodeError::InvalidLastSymbol { offset, symbol, .. } => format!(
            "the last symbol {} (symbol {offset}) leaves bits set that no byte holds: the text \
             was cut or altered",
            shown(symbol)
        ),
        DecodeError::InvalidLength(_) | DecodeError::InvalidPadding => {
            format!("{e} (standard base64 is a multiple of 4 symbols, padded with = as needed)")
        }
    }
}

/// Drops the whitespace in `buf` from `from` on, moving the rest down.
fn compact(buf: &mut Vec<u8>, from: usize) {
    let mut kept = from;
    for i in from..buf.len() {
        let b = buf[i];
        if !b.is_ascii_whitespace() {
            buf[kept] = b;
            kept += 1;
        }
    }
    buf.truncate(kept);
}

/// Whether `text` holds a byte [`u8::is_ascii_whitespace`] names (a
/// vectorised scan).
fn has_whitespace(text: &[u8]) -> bool {
    memchr::memchr3(b' ', b'\n', b'\r', text).is_some()
        || memchr::memchr2(b'\t', 0x0C, text).is_some()
}

/// An error of one chunk, its offsets made the whole text's.
fn shifted(e: DecodeError, seen: usize) -> DecodeError {
    match e {
        DecodeError::InvalidByte(at, byte) => DecodeError::InvalidByte(seen + at, byte),
        DecodeError::InvalidLength(at) => DecodeError::InvalidLength(seen + at),
        DecodeError::InvalidLastSymbol {
            offset,
            symbol,
            symbol_value,
        } => DecodeError::InvalidLastSymbol {
            offset: seen + offset,
            symbol,
            symbol_value,
        },
        DecodeError::InvalidPadding => DecodeError::InvalidPadding,
    }
}

/// The base64 of a binary argument sent as a JSON string: surrounding
/// whitespace and a `data:<type>;base64,` URL prefix (in any case, as RFC
/// 2397 reads it) are dropped.
pub(crate) fn base64_text(text: &str) -> &str {
    let text = text.trim();
    // Only a text that starts as a data URL is searched (a search of the
    // whole text cost an 8 MB argument about 3 ms), up to the comma that
    // ends its header.
    let is_data_url = text
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"));
    if !is_data_url {
        return text;
    }
    match text.split_once(',') {
        Some((header, data))
            if header
                .len()
                .checked_sub(7)
                .and_then(|at| header.get(at..))
                .is_some_and(|end| end.eq_ignore_ascii_case(";base64")) =>
        {
            data
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use proptest::prelude::*;

    use super::{base64_text, decode_in_place};

    /// A bad symbol is shown as itself, with where it is counted; `-` and
    /// `_` say URL-safe base64 is not read.
    #[test]
    fn errors_are_described_for_the_client() {
        let said = |text: &str| super::describe(&decode_in_place(text.to_owned()).unwrap_err());
        let star = said("AAAA AAAA AAAA *AAA");
        assert!(
            star.starts_with("'*' is no base64 symbol, at symbol 12"),
            "{star}"
        );
        assert!(
            star.contains("whitespace and a data: prefix not counted"),
            "{star}"
        );
        assert!(!star.contains("URL-safe"), "{star}");
        for url_safe in ["AA-A", "AA_A"] {
            assert!(said(url_safe).contains("URL-safe base64?"), "{url_safe}");
        }
        assert!(said("AA\u{1}A").starts_with("byte 0x01 is no base64 symbol"));
        assert!(said("AAAAA").contains("multiple of 4 symbols"));
        assert!(said("QR==").contains("the last symbol 'R'"));
    }

    #[test]
    fn the_prefix_and_surrounding_whitespace_are_dropped() {
        assert_eq!(base64_text("data:x;base64,QQ=="), "QQ==");
        assert_eq!(base64_text(" QQ==\n"), "QQ==");
        assert_eq!(
            decode_in_place(" data:image/png;base64,AP8= ".into()).unwrap(),
            b"\x00\xff"
        );
        // Decoded where it lies (no move of the text): offsets count from
        // the base64, whitespace not included.
        assert_eq!(
            decode_in_place("data:x;base64,QUJD\nQU!D".into()).unwrap_err(),
            base64::DecodeError::InvalidByte(6, b'!')
        );
        assert_eq!(
            decode_in_place("data:x;base64,QUJD\r\nQUJD".into()).unwrap(),
            b"ABCABC"
        );
        assert_eq!(base64_text("x;base64,QQ=="), "x;base64,QQ==");
        // RFC 2397: the scheme and the marker in any case.
        assert_eq!(base64_text("DATA:image/png;BASE64,QUFB"), "QUFB");
        assert_eq!(base64_text("Data:;Base64,QQ=="), "QQ==");
        // A data URL that is not base64 is left whole (and refused as such).
        assert_eq!(base64_text("data:text/plain,QQ=="), "data:text/plain,QQ==");
    }

    #[test]
    fn the_bytes_are_decoded_into_the_texts_own_buffer() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let text = STANDARD.encode(&data);
        let at = text.as_ptr();
        let decoded = decode_in_place(text).unwrap();
        assert_eq!(decoded, data);
        assert_eq!(decoded.as_ptr(), at, "decoded into another buffer");
    }

    #[test]
    fn errors_name_the_offset_in_the_whole_text() {
        // A bad symbol in the third chunk, after line breaks.
        let mut text = "QUJD\n".repeat(3 * super::CHUNK / 4);
        text.push_str("QU!D");
        assert_eq!(
            decode_in_place(text).unwrap_err(),
            base64::DecodeError::InvalidByte(3 * super::CHUNK + 2, b'!')
        );
        // Padding before the end (at a chunk's end, too), and a length no
        // text may have.
        let text = format!("{}QQ==QUJD", "QUJD".repeat(super::CHUNK / 4));
        assert!(decode_in_place(text).is_err());
        let text = format!("{}QQ==QUJD", "QUJD".repeat(super::CHUNK / 4 - 1));
        assert_eq!(
            decode_in_place(text.clone()).unwrap_err(),
            STANDARD.decode(text).unwrap_err()
        );
        let text = format!("{}Q", "QUJD".repeat(super::CHUNK / 4));
        assert_eq!(
            decode_in_place(text).unwrap_err(),
            STANDARD
                .decode(format!("{}Q", "QUJD".repeat(super::CHUNK / 4)))
                .unwrap_err()
        );
        assert!(decode_in_place("QQ\n=!".into()).is_err());
        // A bad symbol before padding in the same early chunk is the one
        // named, as the crate's decoder names it.
        let mut text = "QUJD".repeat(super::CHUNK / 2);
        text.replace_range(4..5, "!");
        text.replace_range(100..101, "=");
        assert_eq!(
            decode_in_place(text.clone()).unwrap_err(),
            STANDARD.decode(&text).unwrap_err()
        );
        assert_eq!(
            decode_in_place(text).unwrap_err(),
            base64::DecodeError::InvalidByte(4, b'!')
        );
        // An early chunk ending in padding whose last symbol has bits left
        // over (`QR==`): the chunk's decoder names the symbol, the whole
        // text's the `=`, as here.
        for end in ["QR==", "QUJ="] {
            let mut text = "QUJD".repeat(super::CHUNK / 2);
            text.replace_range(super::CHUNK - 4..super::CHUNK, end);
            let expected = STANDARD.decode(&text).unwrap_err();
            assert_eq!(decode_in_place(text).unwrap_err(), expected, "{end}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// Whatever the data and however the text is wrapped, the bytes
        /// are the data; and text that is not base64 fails as the crate's
        /// own decoder fails on it, whitespace removed.
        #[test]
        fn decodes_as_the_crate_does(
            // Up to three chunks, so their seams are crossed.
            data in proptest::collection::vec(any::<u8>(), 0..3 * super::CHUNK / 4 * 3),
            width in prop_oneof![Just(0usize), 1usize..200],
            // Up to two bad bytes: the first is the one named.
            noise in proptest::collection::vec(
                (0usize..4 * super::CHUNK, prop_oneof![Just(b'='), any::<u8>()]),
                0..3,
            ),
        ) {
            let mut text = STANDARD.encode(&data);
            if width > 0 {
                let lines: Vec<String> = text
                    .as_bytes()
                    .chunks(width)
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .collect();
                text = lines.join("\r\n");
            }
            for (at, byte) in noise {
                if byte.is_ascii() && at <= text.len() {
                    text.insert(at, char::from(byte));
                }
            }
            let joined: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let expected = STANDARD.decode(base64_text(&joined));
            prop_assert_eq!(decode_in_place(text), expected);
        }
    }
}
