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

/// A pointer of `binary` (binary results, by JSON pointer) that another
/// one names too, or lies inside: their bytes would overwrite each other.
/// Pointers are compared as the places they name (each token decoded as
/// [`place`] decodes it: `/~2` and `/~02` both name the key `~2`). The
/// host refuses such results; the SDK finds them first.
pub fn overlapping<B>(binary: &[(String, B)]) -> Option<&str> {
    if binary.len() < 2 {
        return None;
    }
    let tokens = |pointer: &str| -> Vec<String> {
        pointer
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect()
    };
    let places: Vec<Vec<String>> = binary.iter().map(|(p, _)| tokens(p)).collect();
    let mut seen: std::collections::HashSet<&[String]> = std::collections::HashSet::new();
    for (i, place) in places.iter().enumerate() {
        if !seen.insert(place) {
            return Some(&binary[i].0);
        }
    }
    places
        .iter()
        .position(|place| (0..place.len()).any(|k| seen.contains(&place[..k])))
        .map(|i| binary[i].0.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_results_in_one_anothers_place_are_found() {
        let of = |pointers: &[&str]| {
            let binary: Vec<(String, ())> =
                pointers.iter().map(|p| ((*p).to_owned(), ())).collect();
            overlapping(&binary).map(str::to_owned)
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["/a"]), None);
        assert_eq!(of(&["/a", "/b", "/a0", "/a-b/c", "/ab"]), None);
        assert_eq!(of(&["/1", "/1"]).as_deref(), Some("/1"));
        assert_eq!(of(&["/a/b", "/a-b/c", "/a"]).as_deref(), Some("/a/b"));
        assert_eq!(of(&["", "/x"]).as_deref(), Some("/x"));
        // The same place spelled twice.
        assert_eq!(of(&["/~2", "/~02"]).as_deref(), Some("/~02"));
        assert_eq!(of(&["/a~0/b", "/a~"]).as_deref(), Some("/a~0/b"));
        assert_eq!(of(&["/x~1y", "/x/y"]), None);
    }

    use crate::wire::strategies;
    use proptest::prelude::*;
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

    /// Pointers made of the pieces that matter: separators, escapes (valid,
    /// in either order, and not), indices (canonical and not), message keys,
    /// anything.
    fn pointer() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            2 => prop::sample::select(&["~0", "~1", "~01", "~10", "~2", "~", "a~1b", "x~0"][..])
                .prop_map(str::to_owned),
            1 => prop::sample::select(strategies::KEYS).prop_map(str::to_owned),
            1 => prop::sample::select(&["0", "1", "5", "00", "+1", "-1", "18446744073709551616"][..])
                .prop_map(str::to_owned),
            1 => ".{0,4}",
        ];
        prop_oneof![
            4 => prop::collection::vec(token, 1..4).prop_map(|t| t.iter().map(|t| format!("/{t}")).collect()),
            1 => ".{0,12}",
        ]
    }

    /// A root that is an object or an array half of the time, so that
    /// pointers find parents.
    fn root() -> impl Strategy<Value = Value> {
        prop_oneof![
            strategies::json(),
            prop::collection::vec(strategies::json(), 0..3).prop_map(Value::Array),
            prop::collection::vec((".{0,3}", strategies::json()), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    }

    proptest! {
        // 256 cases (the default), well under a second.
        /// Any pointer into any value: placed where reading the same pointer
        /// finds it, or refused naming the pointer.
        #[test]
        fn any_pointer_is_placed_or_refused_by_name(mut root in root(), pointer in pointer()) {
            let marker = json!({"placed": pointer});
            match place(&mut root, &pointer, marker.clone()) {
                Ok(()) => prop_assert_eq!(root.pointer(&pointer), Some(&marker), "{}", pointer),
                Err(e) => {
                    prop_assert_eq!(&e.pointer, &pointer);
                    prop_assert!(e.to_string().contains(&format!("{pointer:?}")), "{}", e);
                }
            }
        }
    }
}
