//! Facts about JSON text read without parsing it: how many values it
//! holds, so that text which would parse into far more memory than its
//! size (a request's arguments, a plugin's result) is refused before it is
//! parsed; and JSON text written only up to a limit
//! ([`to_vec_capped`]). A leaf: bytes in, numbers out.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `value` as JSON text of at most `limit` bytes, written up to the limit
/// only: a value of tens of MiB is not serialised whole just to learn it
/// does not fit. Text that would be longer is an error whose
/// [`is_io`](serde_json::Error::is_io) is true; an error of the value's
/// own (`is_io` false) is `serde_json`'s.
pub fn to_vec_capped<T: serde::Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, serde_json::Error> {
    struct Capped {
        text: Vec<u8>,
        limit: usize,
    }
    impl std::io::Write for Capped {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if self.text.len() + bytes.len() > self.limit {
                return Err(std::io::ErrorKind::FileTooLarge.into());
            }
            self.text.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut capped = Capped {
        text: Vec::new(),
        limit,
    };
    serde_json::to_writer(&mut capped, value)?;
    Ok(capped.text)
}

/// About how many bytes one JSON value takes once parsed, at most: a
/// `serde_json::Value` (with `preserve_order`'s maps) in an array with a
/// vector's spare room, or an object's member. Its text may be two bytes
/// (`0,`), so a byte limit alone lets text parse into some sixty times its
/// size.
pub const PARSED_VALUE_BYTES: usize = 128;

/// How many bytes of `--max-response` each value of a result may stand
/// for: a result of the default 64 MiB holds at most 2 Mi values (at most
/// some 256 MiB once parsed, four times the limit).
pub const RESULT_BYTES_PER_VALUE: u64 = 32;

/// The most values a plugin's JSON result may hold (see
/// [`set_max_result_values`]).
static MAX_RESULT_VALUES: AtomicUsize = AtomicUsize::new(max_result_values_for(64 << 20));

/// The most values a result may hold under an answer limit of
/// `max_response` bytes: one per [`RESULT_BYTES_PER_VALUE`] bytes, and at
/// least 64 Ki.
pub const fn max_result_values_for(max_response: u64) -> usize {
    let values = max_response / RESULT_BYTES_PER_VALUE;
    let values = if values > usize::MAX as u64 {
        usize::MAX
    } else {
        values as usize
    };
    if values < 1 << 16 { 1 << 16 } else { values }
}

/// Sets the most values a plugin's JSON result may hold
/// ([`max_result_values_for`] the server's `--max-response`); a result of
/// more is the tool's `ResultTooLarge` error, refused before it is parsed.
pub fn set_max_result_values(values: usize) {
    MAX_RESULT_VALUES.store(values, Ordering::Relaxed);
}

/// The current most values of a result.
pub fn max_result_values() -> usize {
    MAX_RESULT_VALUES.load(Ordering::Relaxed)
}

/// `Some(values)` when JSON text `bytes` holds more than `max` values (an
/// upper bound, [`json_values`]); text shorter than `max` bytes is not
/// looked at (a value takes a byte at least).
pub fn over(bytes: &[u8], max: usize) -> Option<usize> {
    if bytes.len() < max {
        return None;
    }
    Some(json_values(bytes)).filter(|&values| values > max)
}

/// An upper bound of the values in JSON text, about: one, and one per `,`
/// and `:` outside strings (an array's elements are separated by commas,
/// an object's members have a colon each). Empty containers nested in one
/// another (`[[[]]]`) are not counted, but the parser nests at most 128
/// deep. One pass, which skips what has none of `"` `,` `:` (a base64
/// string) at `memchr`'s speed.
pub fn json_values(bytes: &[u8]) -> usize {
    let mut values = 1usize;
    let mut in_string = false;
    for at in memchr::memchr3_iter(b'"', b',', b':', bytes) {
        if bytes.get(at) == Some(&b'"') {
            // A quote ends (or starts) a string unless it is escaped: an
            // odd number of backslashes before it.
            let escapes = bytes.get(..at).map_or(0, |before| {
                before.iter().rev().take_while(|&&b| b == b'\\').count()
            });
            if escapes % 2 == 0 {
                in_string = !in_string;
            }
        } else if !in_string {
            values += 1;
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_written_up_to_its_limit_only() {
        let value = serde_json::json!({"a": [1, 2, 3]});
        let whole = serde_json::to_vec(&value).unwrap();
        assert_eq!(to_vec_capped(&value, whole.len()).unwrap(), whole);
        let over = to_vec_capped(&value, whole.len() - 1).unwrap_err();
        assert!(over.is_io(), "{over}");
        // The value's own error is not the limit's.
        let map = std::collections::BTreeMap::from([((1, 2), 3)]);
        let own = to_vec_capped(&map, 1 << 20).unwrap_err();
        assert!(!own.is_io(), "{own}");
    }

    #[test]
    fn values_are_counted_outside_strings() {
        assert_eq!(json_values(b"[0,0,0]"), 3);
        assert_eq!(json_values(br#"{"a":1,"b":[1,2]}"#), 5);
        // Commas and colons in strings are text, escaped quotes too.
        assert_eq!(json_values(br#"{"s":"a,b:c"}"#), 2);
        assert_eq!(json_values(br#"{"s":"a\",b"}"#), 2);
        assert_eq!(json_values(br#"{"s":"a\\","t":1}"#), 4);
        assert_eq!(json_values(b"\"\"\""), 1);
        // Short text is not looked at; long text of too many values is.
        assert_eq!(over(b"[0,0,0,0,0]", 16), None);
        let zeros = format!("[{}0]", "0,".repeat(5000));
        assert_eq!(over(zeros.as_bytes(), 4096), Some(5001));
        assert_eq!(over(zeros.as_bytes(), 6000), None);
    }

    #[test]
    fn a_result_may_hold_a_value_per_32_bytes_of_the_answer_limit() {
        assert_eq!(max_result_values_for(64 << 20), 2 << 20);
        assert_eq!(max_result_values_for(1 << 20), 1 << 16);
        assert_eq!(max_result_values_for(u64::MAX), (u64::MAX / 32) as usize);
    }
}
