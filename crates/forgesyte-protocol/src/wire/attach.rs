//! Attachments in JSON: a message names, for each attachment, the JSON
//! Pointer (RFC 6901) of the place its bytes belong to in the payload.
//! A runtime whose plugins take bytes puts them there as bytes; one whose
//! plugins take JSON only (the native ABI 1) puts them there as base64
//! strings, which is also what the host does for HTTP answers.

use serde_json::Value;

/// Why an attachment could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerError {
    /// The pointer.
    pub pointer: String,
    /// What is wrong.
    pub detail: &'static str,
}

impl std::fmt::Display for PointerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "attachment pointer {:?}: {}", self.pointer, self.detail)
    }
}

impl std::error::Error for PointerError {}

/// Puts `value` at `pointer` in `root`: the empty pointer replaces the
/// root; otherwise the parent must exist and be an object (the key is
/// inserted or replaced) or an array (an existing index is replaced).
pub fn place(root: &mut Value, pointer: &str, value: Value) -> Result<(), PointerError> {
    let err = |detail| PointerError {
        pointer: pointer.to_owned(),
        detail,
    };
    if pointer.is_empty() {
        *root = value;
        return Ok(());
    }
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return Err(err("does not start with '/'"));
    };
    let key = last.replace("~1", "/").replace("~0", "~");
    let parent = if parent.is_empty() {
        Some(root)
    } else {
        root.pointer_mut(parent)
    };
    match parent {
        Some(Value::Object(map)) => {
            map.insert(key, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            // RFC 6901: an index is "0" or digits without a leading zero.
            let canonical = key == "0"
                || (!key.is_empty()
                    && !key.starts_with('0')
                    && key.bytes().all(|b| b.is_ascii_digit()));
            let slot = canonical
                .then(|| key.parse::<usize>().ok())
                .flatten()
                .and_then(|i| items.get_mut(i))
                .ok_or_else(|| err("names no element of its array"))?;
            *slot = value;
            Ok(())
        }
        Some(_) => Err(err("its parent is neither an object nor an array")),
        None => Err(err("its parent does not exist")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_placed_where_the_pointer_says() {
        let mut v = json!({"image": null, "list": [0, 1], "a/b": {}});
        place(&mut v, "/image", json!("AAE=")).unwrap();
        place(&mut v, "/list/1", json!("x")).unwrap();
        place(&mut v, "/a~1b/c~0d", json!(1)).unwrap();
        assert_eq!(
            v,
            json!({"image": "AAE=", "list": [0, "x"], "a/b": {"c~d": 1}})
        );
        place(&mut v, "", json!("all")).unwrap();
        assert_eq!(v, json!("all"));
    }

    #[test]
    fn bad_pointers_are_errors() {
        let mut v = json!({"list": [0], "n": 1});
        for p in [
            "image",
            "/missing/x",
            "/list/5",
            "/list/x",
            "/n/x",
            "/list/+0",
            "/list/00",
        ] {
            assert!(place(&mut v, p, json!(null)).is_err(), "{p}");
        }
    }
}
